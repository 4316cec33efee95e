//! Test harness: a real tern-quic server on 127.0.0.1 (one glommio executor per core, serving
//! every connection in one [`Mode`], echo by default) and quinn (tokio) clients.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_lite::AsyncWriteExt;
use glommio::{LocalExecutorBuilder, Placement};
use tern_quic::{Connection, ConnectionError, Stats, StatsSnapshot, TransportConfig, VarInt};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Application close code the test server uses when it shuts down.
pub const SHUTDOWN_CODE: u32 = 7;
pub const SHUTDOWN_REASON: &[u8] = b"shutting down";

/// glommio executors lock memory (8 MiB limit here): tests in one binary run one server at a
/// time.
static SERIAL: Mutex<()> = Mutex::new(());

/// What the test server does with each connection.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Echo every bidirectional stream the client opens.
    Echo,
    /// On every stream the client opens, write `total` bytes of `pattern(total, seed)` without
    /// reading; report how much went in before the first write had to wait.
    Fill { total: usize, seed: u64 },
    /// Open a stream to the client and send it `pattern(len, seed)`.
    Push { len: usize, seed: u64 },
}

#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    Accepted {
        core: usize,
        id: u64,
        remote: SocketAddr,
    },
    Closed {
        core: usize,
        id: u64,
        reason: ConnectionError,
    },
    Idle {
        core: usize,
    },
    /// `Mode::Fill`: bytes accepted by writes before one returned `Pending`.
    Blocked {
        written: usize,
    },
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub cert_path: PathBuf,
    pub stats: Vec<Arc<Stats>>,
    pub events: UnboundedReceiver<ServerEvent>,
    stop: Arc<AtomicBool>,
    executors: Vec<glommio::ExecutorJoinHandle<()>>,
    _dir: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

impl TestServer {
    /// Starts `cores` executors serving QUIC on 127.0.0.1 with a fresh self-signed certificate.
    pub fn start(cores: usize, transport: Option<TransportConfig>) -> Self {
        Self::start_with(cores, transport, Mode::Echo)
    }

    pub fn start_with(cores: usize, transport: Option<TransportConfig>, mode: Mode) -> Self {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let identity = tern_quic::tls::load_or_generate(dir.path()).unwrap();
        assert!(identity.generated());
        let mut server_config = tern_quic::tls::quic_server_config(&identity).unwrap();
        if let Some(t) = transport {
            server_config.transport_config(Arc::new(t));
        }
        let setup = tern_quic::QuicSetup::new("127.0.0.1:0".parse().unwrap(), cores, server_config)
            .bind()
            .unwrap();
        let addr = setup[0].local_addr();
        assert_ne!(addr.port(), 0);
        assert!(setup.iter().all(|c| c.local_addr() == addr));
        let stats = setup.iter().map(|c| c.stats()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let (events_tx, events) = unbounded_channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut executors = Vec::new();
        for core in setup {
            let stop = stop.clone();
            let events = events_tx.clone();
            let ready = ready_tx.clone();
            let handle = LocalExecutorBuilder::new(Placement::Unbound)
                .name(&format!("quic-test-{}", core.index()))
                .io_memory(512 * 1024)
                .spawn(move || serve_core(core, mode, stop, events, ready))
                .unwrap();
            executors.push(handle);
        }
        for _ in 0..cores {
            ready_rx
                .recv_timeout(Duration::from_secs(20))
                .expect("every core starts");
        }
        TestServer {
            addr,
            cert_path: identity.cert_path().to_owned(),
            stats,
            events,
            stop,
            executors,
            _dir: dir,
            _serial: serial,
        }
    }

    pub fn snapshots(&self) -> Vec<StatsSnapshot> {
        self.stats.iter().map(|s| s.snapshot()).collect()
    }

    /// Datagrams forwarded between cores so far: (sent by readers, received by owners). The
    /// owners are read first: a datagram they count was counted by its reader before, so
    /// sent >= received holds even while datagrams are in flight.
    pub fn forwarded(&self) -> (u64, u64) {
        let received = self.snapshots().iter().map(|s| s.forwarded_in).sum();
        let sent = self.snapshots().iter().map(|s| s.forwarded_out).sum();
        (sent, received)
    }

    /// Every event reported so far.
    pub fn drain_events(&mut self) -> Vec<ServerEvent> {
        let mut events = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            events.push(e);
        }
        events
    }

    /// The next event, waiting at most `secs`.
    pub async fn next_event(&mut self, secs: u64) -> ServerEvent {
        within(secs, "server event", self.events.recv())
            .await
            .expect("server running")
    }

    /// Stops every core (closing its connections with `SHUTDOWN_CODE`) and joins the executors.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.executors.drain(..) {
            let joined = h.join();
            // A test already failing should report its own panic, not this one.
            if !std::thread::panicking() {
                joined.expect("server core ran cleanly");
            }
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve_core(
    core: tern_quic::CoreQuic,
    mode: Mode,
    stop: Arc<AtomicBool>,
    events: UnboundedSender<ServerEvent>,
    ready: mpsc::Sender<()>,
) {
    let listener = core.start().await;
    ready.send(()).unwrap();
    let accept_loop = {
        let listener = listener.clone();
        let events = events.clone();
        async move {
            while let Some(conn) = listener.accept().await {
                let _ = events.send(ServerEvent::Accepted {
                    core: conn.core(),
                    id: conn.id(),
                    remote: conn.remote_address(),
                });
                glommio::spawn_local(serve_connection(conn, mode, events.clone())).detach();
            }
        }
    };
    // Shutdown is a flag set by another thread; an executor only sees it when it wakes, so look
    // now and then.
    let stopped = async {
        while !stop.load(Ordering::SeqCst) {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    };
    futures_lite::future::or(accept_loop, stopped).await;
    listener.close(VarInt::from_u32(SHUTDOWN_CODE), SHUTDOWN_REASON);
    assert!(listener.accept().await.is_none());
    let idle = futures_lite::future::or(
        async {
            listener.wait_idle().await;
            true
        },
        async {
            glommio::timer::sleep(Duration::from_secs(10)).await;
            false
        },
    )
    .await;
    if idle {
        let _ = events.send(ServerEvent::Idle {
            core: listener.core(),
        });
    }
}

/// Serves one connection in `mode` and reports when it ends.
async fn serve_connection(conn: Connection, mode: Mode, events: UnboundedSender<ServerEvent>) {
    {
        let conn = conn.clone();
        let events = events.clone();
        glommio::spawn_local(async move {
            let reason = conn.closed().await;
            let _ = events.send(ServerEvent::Closed {
                core: conn.core(),
                id: conn.id(),
                reason,
            });
        })
        .detach();
    }
    if let Mode::Push { len, seed } = mode {
        let (mut send, _recv) = conn.open_bi().await.expect("open stream");
        send.write_all(&pattern(len, seed)).await.expect("push");
        send.close().await.expect("finish");
    }
    while let Some((mut send, mut recv)) = conn.accept_bi().await {
        let events = events.clone();
        glommio::spawn_local(async move {
            match mode {
                Mode::Echo | Mode::Push { .. } => {
                    if futures_lite::io::copy(&mut recv, &mut send).await.is_ok() {
                        let _ = send.close().await;
                    }
                }
                Mode::Fill { total, seed } => fill(send, total, seed, events).await,
            }
        })
        .detach();
    }
}

async fn fill(
    mut send: tern_quic::SendStream,
    total: usize,
    seed: u64,
    events: UnboundedSender<ServerEvent>,
) {
    let data = pattern(total, seed);
    let mut written = 0;
    while written < total {
        match futures_lite::future::poll_once(send.write(&data[written..])).await {
            Some(n) => written += n.expect("write"),
            None => break,
        }
    }
    let _ = events.send(ServerEvent::Blocked { written });
    send.write_all(&data[written..]).await.expect("write rest");
    send.close().await.expect("finish");
}

/// A quinn client endpoint on 127.0.0.1 trusting the server's certificate file.
pub fn client(cert_path: &std::path::Path) -> quinn::Endpoint {
    client_with(cert_path, None)
}

pub fn client_with(
    cert_path: &std::path::Path,
    transport: Option<quinn::TransportConfig>,
) -> quinn::Endpoint {
    let tls = tern_quic::tls::client_config_trusting(cert_path).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    if let Some(t) = transport {
        config.transport_config(Arc::new(t));
    }
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub async fn connect(endpoint: &quinn::Endpoint, addr: SocketAddr) -> quinn::Connection {
    endpoint
        .connect(addr, "localhost")
        .unwrap()
        .await
        .expect("handshake")
}

/// Sends `data` on a new stream in `chunk`-byte writes, finishes it, and returns everything read
/// back until the server finished its side.
///
/// Returns once the server has also acknowledged everything sent. A connection closed while its
/// congestion window is still full of unacknowledged data may never send its CONNECTION_CLOSE
/// (quinn-proto 0.11.19 holds the close back behind congestion control, quinn issue 2785), and
/// the server would then learn of the close only from its idle timeout. (quinn's fix, pull
/// request 2787, sends the close regardless; with a release that has it, this wait can go.)
pub async fn echo(conn: &quinn::Connection, data: &[u8], chunk: usize) -> Vec<u8> {
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    let write = async {
        for part in data.chunks(chunk) {
            send.write_all(part).await.expect("write");
        }
        send.finish().expect("finish");
        assert_eq!(send.stopped().await.expect("acknowledged"), None);
    };
    let read = async { recv.read_to_end(usize::MAX).await.expect("read") };
    let ((), back) = tokio::join!(write, read);
    back
}

/// Deterministic bytes that differ with `seed` and position, so a reordering or a mix-up between
/// streams shows.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Fails a test that hangs instead of letting it run forever.
pub async fn within<T>(secs: u64, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {secs} s"))
}
