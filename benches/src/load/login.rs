//! Connect and log in: one Hello, one HelloOk. Nothing else of a client session, except that a
//! connection may join an existing logical session as a further path (dual channel), and that a
//! login may ask for a sync (the reconnect storm reads it).

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tern_protocol::{Body, Codec, Frame, Hello, PROTOCOL_VERSION, Platform};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use crate::wire::MAX_FRAME;

/// A logged-in connection and whatever the server sent after HelloOk.
#[derive(Debug)]
pub struct Conn {
    pub stream: Stream,
    pub rbuf: BytesMut,
    /// `HelloOk.session_id`: the logical session, which a further path joins with
    /// `Hello.resume_session_id`.
    pub session_id: u64,
}

/// The byte stream of a connection: TCP, or one bidirectional QUIC stream (with the endpoint
/// and connection it lives on; each connection has its own UDP socket, so the gateway's kernel
/// spreads them over its cores as it does TCP connections).
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Quic {
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        /// Kept open for as long as the stream is used.
        _conn: quinn::Connection,
        _endpoint: quinn::Endpoint,
    },
}

impl Stream {
    /// The TCP stream (idle-connection runs are TCP only).
    pub fn into_tcp(self) -> Option<TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            Stream::Quic { .. } => None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Quic { recv, .. } => Pin::new(recv).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Quic { send, .. } => Pin::new(send)
                .poll_write(cx, buf)
                .map_err(std::io::Error::other),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Quic { send, .. } => Pin::new(send).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Quic { send, .. } => Pin::new(send).poll_shutdown(cx),
        }
    }
}

/// QUIC client settings: trust the gateway's certificate (PEM), ALPN `tern/1`.
pub fn quic_client_config(ca: &std::path::Path) -> Result<quinn::ClientConfig, String> {
    let pem = std::fs::read(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in the file", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"tern/1".to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Like [`connect`], over QUIC. With `resume_session_id` other than 0 the connection joins that
/// logical session of the same user and device as a further path (without a sync), and the
/// HelloOk must name the same session.
pub async fn connect_quic(
    server: SocketAddr,
    config: quinn::ClientConfig,
    token: String,
    device: &str,
    resume_session_id: u64,
) -> Result<Conn, String> {
    tokio::time::timeout(LOGIN_TIMEOUT, async {
        let mut endpoint =
            quinn::Endpoint::client(SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), 0))
                .map_err(|e| format!("UDP socket: {e}"))?;
        endpoint.set_default_client_config(config);
        let conn = endpoint
            .connect(server, "localhost")
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("QUIC handshake with {server}: {e}"))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        hello(
            Stream::Quic {
                send,
                recv,
                _conn: conn,
                _endpoint: endpoint,
            },
            token,
            device,
            resume_session_id,
            false,
        )
        .await
    })
    .await
    .map_err(|_| format!("no HelloOk within {LOGIN_TIMEOUT:?}"))?
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
    tokio::time::timeout(LOGIN_TIMEOUT, login(server, source, token, device, false))
        .await
        .map_err(|_| format!("no HelloOk within {LOGIN_TIMEOUT:?}"))?
}

/// Like [`connect`], with `Hello.sync_on_login` set and `sync_version` 0: the server follows
/// HelloOk with a full sync (SyncConversations*, SyncMessages*, SyncDone, request id
/// [`HELLO_REQUEST_ID`]), which the caller reads from the returned connection.
pub async fn connect_syncing(
    server: SocketAddr,
    source: Option<IpAddr>,
    token: String,
    device: &str,
) -> Result<Conn, String> {
    tokio::time::timeout(LOGIN_TIMEOUT, login(server, source, token, device, true))
        .await
        .map_err(|_| format!("no HelloOk within {LOGIN_TIMEOUT:?}"))?
}

/// The request id of every Hello the generator sends (and so of a login sync's answers).
pub const HELLO_REQUEST_ID: u64 = 1;

async fn login(
    server: SocketAddr,
    source: Option<IpAddr>,
    token: String,
    device: &str,
    sync_on_login: bool,
) -> Result<Conn, String> {
    let stream = tcp_connect(server, source).await?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    hello(Stream::Tcp(stream), token, device, 0, sync_on_login).await
}

/// Opens a TCP connection from `source` (any port, chosen at `connect` with
/// `IP_BIND_ADDRESS_NO_PORT`) or from the default address. Errors name the failing step.
pub async fn tcp_connect(server: SocketAddr, source: Option<IpAddr>) -> Result<TcpStream, String> {
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(ip) = source {
        if ip.is_ipv4() {
            crate::sys::bind_address_no_port(socket.as_raw_fd())
                .map_err(|e| format!("IP_BIND_ADDRESS_NO_PORT: {e}"))?;
        }
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    socket
        .connect(server)
        .await
        .map_err(|e| format!("connect {server}: {e}"))
}

/// Sends Hello (`resume_session_id` 0: a new logical session; otherwise join that one as a
/// further path; `sync_on_login`: ask for a sync from version 0 after HelloOk) and waits for
/// HelloOk.
async fn hello(
    mut stream: Stream,
    token: String,
    device: &str,
    resume_session_id: u64,
    sync_on_login: bool,
) -> Result<Conn, String> {
    let mut codec = Codec::new(MAX_FRAME);
    let hello = Frame::new(
        HELLO_REQUEST_ID,
        Hello {
            protocol_version: PROTOCOL_VERSION,
            token,
            device_id: device.into(),
            platform: Platform::Other.into(),
            client_version: concat!("tern-load/", env!("CARGO_PKG_VERSION")).into(),
            sync_on_login,
            sync_version: 0,
            resume_session_id,
            sync_max_messages_per_conversation: 0,
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
                Some(Body::HelloOk(ok)) => {
                    if resume_session_id != 0 && ok.session_id != resume_session_id {
                        return Err(format!(
                            "join: HelloOk names session {}, not the joined {resume_session_id}",
                            ok.session_id
                        ));
                    }
                    Ok(Conn {
                        stream,
                        rbuf,
                        session_id: ok.session_id,
                    })
                }
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
