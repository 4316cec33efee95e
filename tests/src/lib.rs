//! Helpers shared by Tern's end-to-end tests: start a real `tern-gateway` process on a temporary
//! data directory and a free 127.0.0.1 port, mint tokens with its own CLI, and talk to it over
//! real sockets with the protocol crate's codec.
//!
//! The gateway and `tern` binaries are the ones cargo built next to the test executable
//! (`target/<profile>/`); `scripts/test` builds them before running the tests.

pub mod proxy;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tern_protocol::v1::frame::Body;
use tern_protocol::{Codec, Deliver, Frame, Hello, PROTOCOL_VERSION, SendAck, Target};

/// How long any single wait in a test may take before the test fails (not a sleep: an upper
/// bound on waiting for an event that should come much sooner).
pub const WAIT: Duration = Duration::from_secs(20);

/// Path of a binary built by cargo next to the running test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable is in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build it first (`cargo build --release --bins`, which scripts/test does)",
        path.display()
    );
    path
}

/// A free port below the kernel's ephemeral range. A gateway on an ephemeral port can lose its
/// port while it restarts: a client reconnecting meanwhile may be given that very port as its
/// own and connect to itself, and the socket's TIME_WAIT then blocks the gateway's bind. A port
/// is handed out once per test process: the tests of one binary run in parallel, and a port
/// checked free here is bound by its gateway only later (with `SO_REUSEPORT`, so two gateways
/// given the same port would both bind it and share its connections).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (start, span) = (10_000u16, low.saturating_sub(10_000).max(1000));
    let mut x = (std::process::id() as u64) << 32
        | std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(1);
    for _ in 0..1000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let port = start + ((x >> 33) % u64::from(span)) as u16;
        if !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port below {low}");
}

/// The config every test gateway gets unless the test passes `--config`.
pub const NO_RATE_LIMITS: &str = "rate_messages_per_sec = 0\nrate_user_messages_per_sec = 0\n\
     rate_requests_per_sec = 0\nrate_read_bytes_per_sec = 0\n";

/// A gateway process for one test.
#[derive(Debug)]
pub struct Gateway {
    pub addr: SocketAddr,
    /// The QUIC address, if the gateway was started with `--quic`.
    pub quic: Option<SocketAddr>,
    /// The TLS-over-TCP address, if the gateway was started with `--tls`.
    pub tls: Option<SocketAddr>,
    /// The admin API's URL base (`http://127.0.0.1:<port>`), unless started with `--no-api`.
    pub api: Option<String>,
    pub data_dir: PathBuf,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    _tmp: Option<tempfile::TempDir>,
    extra: Vec<String>,
}

impl Gateway {
    /// Starts a gateway on a fresh temporary data directory.
    pub fn start(extra_args: &[&str]) -> Gateway {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut g = Gateway::start_in(&dir, extra_args);
        g._tmp = Some(tmp);
        g
    }

    /// Starts a gateway on a fresh temporary data directory with `config` as its configuration
    /// file (TOML), and `extra_args`.
    pub fn start_with_config(config: &str, extra_args: &[&str]) -> Gateway {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = tmp.path().join("tern.toml");
        std::fs::write(&cfg, config).expect("write the configuration file");
        let mut args = vec!["--config", cfg.to_str().expect("a UTF-8 temp path")];
        args.extend_from_slice(extra_args);
        let mut g = Gateway::start_in(&tmp.path().join("data"), &args);
        g._tmp = Some(tmp);
        g
    }

    /// Starts a gateway on `dir` (which may hold data from an earlier run).
    pub fn start_in(dir: &Path, extra_args: &[&str]) -> Gateway {
        Gateway::spawn(dir, &format!("127.0.0.1:{}", free_port()), extra_args)
    }

    fn spawn(dir: &Path, tcp: &str, extra_args: &[&str]) -> Gateway {
        // One retry: a start that fails outright (the gateway gives up on a core that did not
        // come up in time) is tried once more before the test fails.
        match Gateway::try_spawn(dir, tcp, extra_args) {
            Ok(g) => g,
            Err(first) => Gateway::try_spawn(dir, tcp, extra_args).unwrap_or_else(|second| {
                panic!("gateway did not start; first log:\n{first}\nsecond log:\n{second}")
            }),
        }
    }

    fn try_spawn(dir: &Path, tcp: &str, extra_args: &[&str]) -> Result<Gateway, String> {
        let mut cmd = Command::new(binary("tern-gateway"));
        cmd.arg("--data-dir").arg(dir).arg("--tcp").arg(tcp);
        if !extra_args.contains(&"--config") {
            // Tests send bursts far above the per-client rate limits a public server wants;
            // tests of the limits pass a config of their own.
            let cfg = dir.join("test-no-rate-limits.toml");
            std::fs::create_dir_all(dir).expect("data dir");
            std::fs::write(&cfg, NO_RATE_LIMITS).expect("write test config");
            cmd.arg("--config").arg(cfg);
        }
        if !extra_args.iter().any(|a| *a == "--api" || *a == "--no-api") {
            cmd.arg("--api").arg("127.0.0.1:0");
        }
        cmd.args(extra_args)
            .env(
                "TERN_LOG",
                std::env::var("TERN_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // Settings from the caller's environment would change what the tests check.
            .env_remove("TERN_SET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tern-gateway");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some(rest) = line.strip_prefix("tern-gateway QUIC listening on ") {
                        let _ = tx.send(format!("quic {}", rest.trim()));
                    }
                    if let Some(rest) = line.strip_prefix("tern-gateway TLS listening on ") {
                        let _ = tx.send(format!("tls {}", rest.trim()));
                    }
                    if let Some(rest) = line.strip_prefix("tern-gateway API listening on ") {
                        let _ = tx.send(format!("api {}", rest.trim()));
                    }
                    if let Some(rest) = line.strip_prefix("tern-gateway listening on ") {
                        let _ = tx.send(rest.trim().to_string());
                    }
                    if line.starts_with("tern-gateway listening, plaintext TCP disabled") {
                        let _ = tx.send("no plaintext".to_string());
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let (mut quic, mut tls, mut api) = (None, None, None);
        let addr = loop {
            match rx.recv_timeout(WAIT) {
                Ok(a) => {
                    if let Some(q) = a.strip_prefix("quic ") {
                        quic = Some(q.parse().expect("QUIC address"));
                    } else if let Some(t) = a.strip_prefix("tls ") {
                        tls = Some(t.parse().expect("TLS address"));
                    } else if let Some(t) = a.strip_prefix("api ") {
                        api = Some(t.to_string());
                    } else if a == "no plaintext" {
                        // `--no-plaintext`: the TCP address is one nothing listens on.
                        break tcp.parse().expect("the --tcp address");
                    } else {
                        break a.parse().expect("listen address");
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(log.lock().unwrap().join("\n"));
                }
            }
        };
        Ok(Gateway {
            addr,
            quic,
            tls,
            api,
            data_dir: dir.to_path_buf(),
            child: Some(child),
            log,
            _tmp: None,
            extra: extra_args.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// Starts a gateway that listens on `via` (TCP always; `--quic` or `--tls` on a free port
    /// as well for those).
    pub fn start_via(via: Via, extra_args: &[&str]) -> Gateway {
        let mut args: Vec<&str> = extra_args.to_vec();
        match via {
            Via::Tcp => {}
            Via::Tls => args.extend(["--tls", "127.0.0.1:0"]),
            Via::Quic => args.extend(["--quic", "127.0.0.1:0"]),
        }
        Gateway::start(&args)
    }

    /// A new connection over `via` (trusting the development certificate for TLS and QUIC).
    pub fn connect(&self, via: Via) -> Conn {
        let listener = |a: Option<SocketAddr>| a.unwrap_or_else(|| panic!("no {via:?} listener"));
        match via {
            Via::Tcp => Conn::connect(self.addr),
            Via::Tls => Conn::connect_tls(listener(self.tls), &self.dev_cert()),
            Via::Quic => Conn::connect_quic(listener(self.quic), &self.dev_cert()),
        }
    }

    /// Connects over `via` and logs in; panics unless HelloOk comes back.
    pub fn login(&self, via: Via, token: &str, device: &str) -> (Conn, tern_protocol::HelloOk) {
        self.connect(via).hello_ok(token, device)
    }

    /// Connects over `via` and logs `user`'s `device` in with a sync from `since_version` at
    /// login; the connection and what the sync answered (see [`collect_sync`]).
    pub fn login_synced(
        &self,
        via: Via,
        user: &str,
        device: &str,
        since_version: u64,
    ) -> (Conn, Synced) {
        let mut c = self.connect(via);
        let mut h = hello(&self.token(user), device);
        h.sync_on_login = true;
        h.sync_version = since_version;
        let rid = c.send_body(Body::Hello(h));
        assert!(matches!(c.recv_frame().body, Some(Body::HelloOk(_))));
        let synced = collect_sync(&mut c, rid);
        (c, synced)
    }

    /// The admin API secret the gateway generated (`<data-dir>/api_secret`).
    pub fn api_secret(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("api_secret"))
            .expect("api_secret")
            .trim()
            .to_string()
    }

    /// An admin API call with the gateway's secret: the status and the JSON body.
    pub fn api_call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let secret = self.api_secret();
        self.api_call_with(method, path, body, Some(&format!("Bearer {secret}")))
    }

    /// The gateway's `/metrics` text (Prometheus exposition).
    pub fn metrics(&self) -> String {
        let base = self.api.as_deref().expect("the gateway has no API");
        let (status, body) = api_request(
            &format!("{base}/metrics"),
            "GET",
            None,
            Some(&format!("Bearer {}", self.api_secret())),
            None,
        );
        assert_eq!(status, 200, "{body}");
        body.as_str().expect("metrics are text").to_string()
    }

    /// An admin API call with the given Authorization header (none: no header).
    pub fn api_call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
        authorization: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let base = self.api.as_deref().expect("the gateway has no API");
        api_request(
            &format!("{base}{path}"),
            method,
            body.map(|b| b.to_string()).as_deref(),
            authorization,
            Some("application/json"),
        )
    }

    /// The development certificate the gateway wrote (`<data-dir>/tls/cert.pem`).
    pub fn dev_cert(&self) -> PathBuf {
        self.data_dir.join("tls").join("cert.pem")
    }

    /// The gateway's log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Mints a token with `tern-gateway token` for this data directory.
    pub fn token(&self, user: &str) -> String {
        self.token_with(user, &["--ttl", "1h"])
    }

    pub fn token_with(&self, user: &str, args: &[&str]) -> String {
        let out = Command::new(binary("tern-gateway"))
            .arg("token")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--user")
            .arg(user)
            .args(args)
            .output()
            .expect("run tern-gateway token");
        assert!(
            out.status.success(),
            "token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// SIGTERM and wait for a clean exit (status 0) within the bound.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        signal(child.id(), libc::SIGTERM);
        let status = wait_child(&mut child, WAIT).expect("gateway did not exit after SIGTERM");
        assert!(
            status.success(),
            "gateway exited with {status}:\n{}",
            self.log()
        );
    }

    /// SIGKILL, no cleanup.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (SIGTERM) and starts again on the same data directory and port.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Starts again after `kill` or `stop`, on the same data directory and port.
    pub fn start_again(&mut self) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let deadline = Instant::now() + WAIT;
        // The old socket may linger briefly in the kernel; SO_REUSEPORT lets us rebind at once.
        let mut g = loop {
            let g = std::panic::catch_unwind(|| {
                Gateway::spawn(&self.data_dir, &self.addr.to_string(), &extra)
            });
            match g {
                Ok(g) => break g,
                Err(e) if Instant::now() > deadline => std::panic::resume_unwind(e),
                Err(_) => std::thread::yield_now(),
            }
        };
        self.child = g.child.take();
        self.log = g.log.clone();
        self.quic = g.quic;
        self.tls = g.tls;
        self.api = g.api.clone();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `sig` to process `pid` (a child of this test).
pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) takes plain integers and has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// Waits for a child to exit, up to `limit`. Polls `try_wait` with a short park between polls
/// (the process gives no other completion signal).
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::park_timeout(Duration::from_millis(5));
    }
}

/// The transport a test connection uses; every one carries the same frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Tcp,
    Tls,
    Quic,
}

/// Runs each named test function (`fn name(via: Via)`) once per transport, as `tcp::name`,
/// `tls::name` and `quic::name`.
#[macro_export]
macro_rules! over_every_transport {
    ($($name:ident),* $(,)?) => {
        mod tcp {
            $(#[test] fn $name() { super::$name($crate::Via::Tcp) })*
        }
        mod tls {
            $(#[test] fn $name() { super::$name($crate::Via::Tls) })*
        }
        mod quic {
            $(#[test] fn $name() { super::$name($crate::Via::Quic) })*
        }
    };
}

/// A raw protocol connection: blocking socket + the codec. Every read has a deadline.
#[derive(Debug)]
pub struct Conn {
    stream: Wire,
    buf: BytesMut,
    codec: Codec,
    next_id: u64,
}

/// What `Conn::recv` saw.
#[derive(Debug, PartialEq)]
pub enum Recv {
    Frame(Frame),
    /// The server closed the connection (EOF or reset).
    Closed,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Conn {
        Conn::from_stream(TcpStream::connect(addr).expect("connect"))
    }

    /// Connects from a given local address (any of 127.0.0.0/8 works on loopback) and/or with
    /// a small receive buffer (set before connecting, so the window stays small).
    pub fn connect_with(
        addr: SocketAddr,
        local_ip: Option<std::net::IpAddr>,
        recv_buffer: Option<usize>,
    ) -> Conn {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
        if let Some(n) = recv_buffer {
            socket.set_recv_buffer_size(n).expect("SO_RCVBUF");
        }
        if let Some(ip) = local_ip {
            socket
                .bind(&SocketAddr::new(ip, 0).into())
                .expect("bind local address");
        }
        socket.connect(&addr.into()).expect("connect");
        Conn::from_stream(socket.into())
    }

    pub fn from_stream(stream: TcpStream) -> Conn {
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Conn {
            stream: Wire::Tcp(stream),
            buf: BytesMut::new(),
            codec: Codec::default(),
            next_id: 1,
        }
    }

    /// Connects and logs in; panics unless HelloOk comes back.
    pub fn login(addr: SocketAddr, token: &str, device: &str) -> (Conn, tern_protocol::HelloOk) {
        Conn::connect(addr).hello_ok(token, device)
    }

    /// Sends Hello on a fresh connection; panics unless HelloOk comes back.
    pub fn hello_ok(mut self, token: &str, device: &str) -> (Conn, tern_protocol::HelloOk) {
        let id = self.send_body(Body::Hello(hello(token, device)));
        match self.recv_frame() {
            Frame {
                request_id,
                body: Some(Body::HelloOk(ok)),
            } if request_id == id => (self, ok),
            other => panic!("expected HelloOk, got {other:?}"),
        }
    }

    /// Sends a frame with a fresh request id; returns the id.
    pub fn send_body(&mut self, body: Body) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send_frame(&Frame {
            request_id: id,
            body: Some(body),
        });
        id
    }

    pub fn send_frame(&mut self, frame: &Frame) {
        let mut out = BytesMut::new();
        self.codec.encode(frame, &mut out).expect("encode");
        self.stream.write_all(&out).expect("write");
        self.stream.flush().expect("flush");
    }

    /// Connects over QUIC (one bidirectional stream), trusting the PEM certificate `ca`.
    pub fn connect_quic(addr: SocketAddr, ca: &Path) -> Conn {
        Conn {
            stream: Wire::Quic(Box::new(QuicWire::connect(addr, ca))),
            buf: BytesMut::new(),
            codec: Codec::default(),
            next_id: 1,
        }
    }

    /// Connects with TLS over TCP, trusting the PEM certificate `ca`.
    pub fn connect_tls(addr: SocketAddr, ca: &Path) -> Conn {
        let config = tern_quic::tls::client_config_trusting(ca).expect("trust the CA");
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
        let tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_nodelay(true).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        Conn {
            stream: Wire::Tls(Box::new(rustls::StreamOwned::new(tls, tcp))),
            buf: BytesMut::new(),
            codec: Codec::default(),
            next_id: 1,
        }
    }

    /// Connects over QUIC and logs in; panics unless HelloOk comes back.
    pub fn login_quic(
        addr: SocketAddr,
        ca: &Path,
        token: &str,
        device: &str,
    ) -> (Conn, tern_protocol::HelloOk) {
        Conn::connect_quic(addr, ca).hello_ok(token, device)
    }

    /// The QUIC client under this connection (panics for TCP).
    pub fn quic(&mut self) -> &mut QuicWire {
        match &mut self.stream {
            Wire::Quic(q) => q,
            _ => panic!("not a QUIC connection"),
        }
    }

    /// The TCP socket, for tests that poke at it directly.
    pub fn stream(&self) -> &TcpStream {
        match &self.stream {
            Wire::Tcp(s) => s,
            _ => panic!("not a TCP connection"),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
        self.stream.flush().expect("flush");
    }

    /// The next frame or the connection's end, waiting at most [`WAIT`].
    pub fn recv(&mut self) -> Recv {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => return Recv::Frame(f),
                Ok(None) => {}
                Err(e) => panic!("server sent an undecodable frame: {e}"),
            }
            let mut chunk = [0u8; 16 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Recv::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    panic!("no frame from the server within {WAIT:?}")
                }
                Err(_) => return Recv::Closed,
            }
        }
    }

    pub fn recv_frame(&mut self) -> Frame {
        match self.recv() {
            Recv::Frame(f) => f,
            Recv::Closed => panic!("connection closed while a frame was expected"),
        }
    }

    /// Asserts the next frame is an Error with `code` (and returns its request id and
    /// fatal flag).
    pub fn expect_error(&mut self, code: tern_protocol::ErrorCode) -> (u64, bool) {
        match self.recv_frame() {
            Frame {
                request_id,
                body: Some(Body::Error(e)),
            } => {
                assert_eq!(e.code, code as i32, "error {e:?}");
                (request_id, e.fatal)
            }
            other => panic!("expected error {code:?}, got {other:?}"),
        }
    }

    /// Asserts the next frame is a Kick with `reason`, and that the connection closes after it.
    pub fn expect_kick(&mut self, reason: tern_protocol::KickReason) {
        match self.recv_frame() {
            Frame {
                body: Some(Body::Kick(k)),
                ..
            } => assert_eq!(k.reason, reason as i32, "kick {k:?}"),
            other => panic!("expected Kick {reason:?}, got {other:?}"),
        }
        self.expect_closed();
    }

    /// The next frame, which must answer request `rid`; its body.
    pub fn answer(&mut self, rid: u64) -> Body {
        let f = self.recv_frame();
        assert_eq!(f.request_id, rid, "{f:?}");
        f.body.expect("a body")
    }

    /// The next frame, which must be server-initiated (request id 0); its body.
    pub fn pushed(&mut self) -> Body {
        let f = self.recv_frame();
        assert_eq!(f.request_id, 0, "{f:?}");
        f.body.expect("a body")
    }

    /// Asserts nothing is waiting: a Ping is answered by the very next frame.
    pub fn nothing_pending(&mut self) {
        let rid = self.send_body(Body::Ping(Default::default()));
        let f = self.recv_frame();
        assert!(
            f.request_id == rid && matches!(f.body, Some(Body::Pong(_))),
            "expected only the Pong, got {f:?}"
        );
    }

    /// Asserts the server closes the connection next.
    pub fn expect_closed(&mut self) {
        match self.recv() {
            Recv::Closed => {}
            Recv::Frame(f) => panic!("expected the connection to close, got {f:?}"),
        }
    }
}

/// The sum of the series of metric `name` whose labels contain `labels` (e.g. `code="X"`), in
/// a `/metrics` text.
pub fn metric(text: &str, name: &str, labels: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{')?;
            (n == name && rest.contains(labels)).then(|| value.parse::<u64>().ok())?
        })
        .sum()
}

/// Sends a text message to user `to`; returns the request id.
pub fn send(c: &mut Conn, to: &str, id: &str, text: &str) -> u64 {
    send_to(c, Target::user(to), id, text)
}

/// What a sync answered: the conversation states, the messages, `SyncDone.user_version`.
pub type Synced = (Vec<tern_protocol::ConversationState>, Vec<Deliver>, u64);

/// Sends a text message to group `group`; returns the request id.
pub fn send_group(c: &mut Conn, group: &str, id: &str, text: &str) -> u64 {
    send_to(c, Target::group(group), id, text)
}

/// Sends a text message to group `group` and returns the seq of its SendAck.
pub fn send_group_acked(c: &mut Conn, group: &str, id: &str, text: &str) -> u64 {
    let rid = send_group(c, group, id, text);
    expect_ack(c, rid).seq
}

fn send_to(c: &mut Conn, target: Target, id: &str, text: &str) -> u64 {
    c.send_body(Body::Send(tern_protocol::Send {
        client_msg_id: id.into(),
        target: Some(target),
        content_type: 1,
        custom_type: String::new(),
        payload: Bytes::copy_from_slice(text.as_bytes()),
        priority: false,
    }))
}

/// The next frame, which must be the SendAck for `rid`.
pub fn expect_ack(c: &mut Conn, rid: u64) -> SendAck {
    match c.recv_frame() {
        Frame {
            request_id,
            body: Some(Body::SendAck(a)),
        } if request_id == rid => a,
        other => panic!("expected SendAck for {rid}, got {other:?}"),
    }
}

/// Sends and waits for the SendAck.
pub fn send_acked(c: &mut Conn, to: &str, id: &str, text: &str) -> SendAck {
    let rid = send(c, to, id, text);
    expect_ack(c, rid)
}

/// The next frame, which must be a live Deliver.
pub fn expect_deliver(c: &mut Conn) -> Deliver {
    match c.recv_frame() {
        Frame {
            request_id: 0,
            body: Some(Body::Deliver(d)),
        } => d,
        other => panic!("expected Deliver, got {other:?}"),
    }
}

/// Collects a whole sync answer: (conversation states, messages in arrival order, version).
pub fn collect_sync(c: &mut Conn, rid: u64) -> Synced {
    let mut convs = Vec::new();
    let mut msgs = Vec::new();
    loop {
        let f = c.recv_frame();
        match f.body {
            Some(Body::SyncConversations(s)) if f.request_id == rid => {
                convs.extend(s.conversations)
            }
            Some(Body::SyncMessages(m)) if f.request_id == rid => msgs.extend(m.messages),
            Some(Body::SyncDone(d)) if f.request_id == rid => return (convs, msgs, d.user_version),
            other => panic!("unexpected frame during sync: {other:?}"),
        }
    }
}

/// A Deliver's payload as text.
pub fn text(d: &Deliver) -> &str {
    std::str::from_utf8(&d.payload).unwrap()
}

pub fn hello(token: &str, device: &str) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        token: token.to_string(),
        device_id: device.to_string(),
        platform: tern_protocol::Platform::Linux as i32,
        client_version: "tern-tests".into(),
        sync_version: 0,
        sync_on_login: false,
        resume_session_id: 0,
        sync_max_messages_per_conversation: 0,
    }
}

/// The resident set size of a process, in bytes (from /proc).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The byte stream under a test connection.
#[derive(Debug)]
enum Wire {
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
    Quic(Box<QuicWire>),
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Wire::Tcp(s) => s.read(buf),
            Wire::Tls(s) => s.read(buf),
            Wire::Quic(q) => q.read(buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Wire::Tcp(s) => s.write(buf),
            Wire::Tls(s) => s.write(buf),
            Wire::Quic(q) => q.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Wire::Tls(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

/// A blocking QUIC client stream for tests: quinn on a private single-threaded tokio runtime.
pub struct QuicWire {
    rt: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl std::fmt::Debug for QuicWire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicWire").finish_non_exhaustive()
    }
}

impl QuicWire {
    pub fn connect(addr: SocketAddr, ca: &Path) -> QuicWire {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let tls = tern_quic::tls::client_config_trusting(ca).expect("trust the CA");
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
        let (endpoint, conn, send, recv) = rt.block_on(async {
            let mut endpoint =
                quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("UDP socket");
            endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
            let conn = tokio::time::timeout(WAIT, endpoint.connect(addr, "localhost").unwrap())
                .await
                .expect("QUIC handshake timed out")
                .expect("QUIC handshake");
            let (send, recv) = conn.open_bi().await.expect("open stream");
            (endpoint, conn, send, recv)
        });
        QuicWire {
            rt,
            endpoint,
            conn,
            send,
            recv,
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let recv = &mut self.recv;
        match self
            .rt
            .block_on(async { tokio::time::timeout(WAIT, recv.read(buf)).await })
        {
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
            Ok(Ok(Some(n))) => Ok(n),
            Ok(Ok(None)) => Ok(0),
            Ok(Err(e)) => Err(std::io::Error::other(e)),
        }
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let send = &mut self.send;
        self.rt
            .block_on(send.write_all(buf))
            .map(|()| buf.len())
            .map_err(std::io::Error::other)
    }

    /// The QUIC connection (to close it, or read why it closed).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Moves the client to a new local UDP port, as a phone changing network does: a new
    /// 4-tuple, which the server's kernel may hand to another core than the connection's.
    pub fn rebind(&mut self) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("UDP socket");
        let _guard = self.rt.enter();
        self.endpoint.rebind(socket).expect("rebind");
    }
}

/// An HTTP request over a real socket: the status and the body parsed as JSON (`Null` if empty,
/// the text as a JSON string if it is not JSON). Panics if the server cannot be reached.
pub fn api_request(
    url: &str,
    method: &str,
    body: Option<&str>,
    authorization: Option<&str>,
    content_type: Option<&str>,
) -> (u16, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(WAIT))
        .build()
        .into();
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    if let Some(c) = content_type
        && body.is_some()
    {
        req = req.header("Content-Type", c);
    }
    let req = req.body(body.unwrap_or("").to_string()).expect("request");
    let mut resp = agent
        .run(req)
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    let value = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
    };
    (status, value)
}

/// One HTTP request a [`http_receiver`] got.
#[derive(Debug, Clone)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    /// Header names in lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A plain HTTP/1.1 server on 127.0.0.1 that answers every request `200 {}` and reports it on
/// the channel (in arrival order). Its threads end with the test process.
pub fn http_receiver() -> (String, std::sync::mpsc::Receiver<HttpRequest>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let Ok(read_half) = stream.try_clone() else {
                    return;
                };
                let mut reader = BufReader::new(read_half);
                let mut out = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or_default().to_string();
                    let path = parts.next().unwrap_or_default().to_string();
                    let mut headers = Vec::new();
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            let k = k.trim().to_ascii_lowercase();
                            if k == "content-length" {
                                len = v.trim().parse().unwrap_or(0);
                            }
                            headers.push((k, v.trim().to_string()));
                        }
                    }
                    let mut body = vec![0; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let _ = tx.send(HttpRequest {
                        method,
                        path,
                        headers,
                        body,
                    });
                    if out
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
                        )
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, rx)
}

/// Whether `header` (`X-Tern-Signature: t=<ms>,v1=<hex>`) is the HMAC-SHA256 of `t.body` under
/// `secret`, as a webhook receiver checks it.
pub fn signature_valid(header: &str, body: &[u8], secret: &str) -> bool {
    use hmac::{Hmac, Mac};
    let Some((t, v1)) = header
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
    else {
        return false;
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key");
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex == v1
}
