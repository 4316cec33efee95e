//! Connect and log in: one Hello, one HelloOk. Nothing else of a client session.

use std::net::{IpAddr, SocketAddr};

use bytes::BytesMut;
use tern_protocol::{Body, Codec, Frame, Hello, PROTOCOL_VERSION, Platform};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::wire::MAX_FRAME;

/// A logged-in connection and whatever the server sent after HelloOk.
#[derive(Debug)]
pub struct Conn {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
}

/// How long a connect + login may take before it counts as failed.
pub const LOGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Connects from `source` (any port) or the default address, sends Hello and waits for HelloOk,
/// all within [`LOGIN_TIMEOUT`]. An `Error` answer becomes the error text.
pub async fn connect(
    server: SocketAddr,
    source: Option<IpAddr>,
    token: String,
    device: &str,
) -> Result<Conn, String> {
    tokio::time::timeout(LOGIN_TIMEOUT, login(server, source, token, device))
        .await
        .map_err(|_| format!("no HelloOk within {LOGIN_TIMEOUT:?}"))?
}

async fn login(
    server: SocketAddr,
    source: Option<IpAddr>,
    token: String,
    device: &str,
) -> Result<Conn, String> {
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let mut stream = socket
        .connect(server)
        .await
        .map_err(|e| format!("connect {server}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let mut codec = Codec::new(MAX_FRAME);
    let hello = Frame::new(
        1,
        Hello {
            protocol_version: PROTOCOL_VERSION,
            token,
            device_id: device.into(),
            platform: Platform::Other.into(),
            client_version: concat!("tern-load/", env!("CARGO_PKG_VERSION")).into(),
            ..Hello::default()
        },
    );
    let mut out = BytesMut::new();
    codec.encode(&hello, &mut out).map_err(|e| e.to_string())?;
    stream
        .write_all(&out)
        .await
        .map_err(|e| format!("write Hello: {e}"))?;
    let mut rbuf = BytesMut::with_capacity(512);
    loop {
        if let Some(frame) = codec.decode(&mut rbuf).map_err(|e| format!("login: {e}"))? {
            return match frame.body {
                Some(Body::HelloOk(_)) => Ok(Conn { stream, rbuf }),
                Some(Body::Error(e)) => {
                    Err(format!("login refused: code {} {}", e.code, e.message))
                }
                _ => Err(format!("login: unexpected {}", frame.body_name())),
            };
        }
        match stream.read_buf(&mut rbuf).await {
            Ok(0) => return Err("login: server closed the connection".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("login: {e}")),
        }
    }
}

/// A prefix that makes this run's user ids unique: repeated runs against one data directory
/// must not find the previous run's conversations, devices or message ids.
pub fn run_prefix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("ld{:x}{:x}", t % (1 << 40), std::process::id())
}

/// Parses `10s`, `500ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1e3,
        "us" => v / 1e6,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("`{s}` is out of range (0..=24h)"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}
