//! Start-up and shutdown: open the store, start one glommio executor per core, join them into a
//! channel mesh, listen with SO_REUSEPORT on every core, and stop cleanly on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use glommio::channels::channel_mesh::MeshBuilder;
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use tern_storage::{MessageStore, StoreOptions};
use tracing::{info, warn};

use crate::config::{Config, Durability};
use crate::core::{Core, ShardMsg};
use crate::limits::ConnLimits;
use crate::ports::Proto;
use crate::route::Router;
use crate::token::Secret;

/// Why the gateway could not start or stopped with an error. Each message says what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot use data directory {path}: {message}")]
    DataDir { path: String, message: String },
    #[error("cannot open the message log: {0}")]
    Storage(#[from] tern_storage::StorageError),
    #[error(
        "the message log could not be flushed and closed: {0}. Everything acknowledged to \
         clients was committed before; the next start recovers from the log"
    )]
    Close(tern_storage::StorageError),
    #[error(
        "cannot start the I/O executor for core {core}: {message}. Tern needs io_uring (Linux \
         5.8 or later) and locked memory for it: about {need_kib} KiB per core, the limit is \
         {limit_kib} KiB. Raise it with `ulimit -l {suggest_kib}` (or LimitMEMLOCK= in a systemd \
         unit), or lower `io_memory_bytes` / `cores`."
    )]
    Executor {
        core: usize,
        message: String,
        need_kib: u64,
        limit_kib: u64,
        suggest_kib: u64,
    },
    #[error("io_uring is not available ({error}), and Tern's cores need it. {advice}")]
    IoUring {
        error: std::io::Error,
        advice: &'static str,
    },
    #[error(
        "cannot start the watcher of parked connections (epoll): {0}; park_after_ms = 0 runs \
         without parking"
    )]
    Parker(std::io::Error),
    #[error("cannot listen on {addr}: {message}")]
    Listen { addr: SocketAddr, message: String },
    #[error("TLS: {0}")]
    Tls(#[from] tern_quic::tls::TlsError),
    #[error("QUIC: {0}")]
    Quic(#[from] tern_quic::QuicError),
    #[error("admin API: {0}")]
    Api(String),
}

/// Where the gateway listens, once every core does.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The plaintext TCP listener; none with `plaintext = false`.
    pub tcp: Option<SocketAddr>,
    pub quic: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    /// The admin API, as a URL base (`http://127.0.0.1:7680` or `https://...`).
    pub api: Option<String>,
}

/// The store options the config asks for.
pub fn store_options(cfg: &Config) -> StoreOptions {
    let durability = match cfg.durability {
        Durability::Fsync => tern_storage::Durability::Fsync,
        Durability::Wal => tern_storage::Durability::Wal {
            sync_interval_ms: cfg.wal_sync_interval_ms,
        },
        Durability::Memory => tern_storage::Durability::Memory,
    };
    let mut o = StoreOptions::with_durability(durability);
    o.dedup_window.max_age = Duration::from_secs(cfg.dedup_window_secs);
    o.dedup_window.max_entries = cfg.dedup_window_entries;
    o.min_sync_interval = Duration::from_micros(cfg.min_sync_interval_us);
    o
}

/// The secret from the config, or the one persisted in the data directory.
pub fn load_secret(cfg: &Config) -> Result<Secret, GatewayError> {
    if let Some(s) = &cfg.secret {
        return Ok(Secret::new(s.as_bytes().to_vec()));
    }
    Secret::load_or_create(&cfg.data_dir).map_err(|e| GatewayError::DataDir {
        path: cfg.data_dir.display().to_string(),
        message: e.to_string(),
    })
}

/// Checks the config and that no other process serves its ports, and creates the data
/// directory: before anything is opened or started.
fn prepare(cfg: &Config) -> Result<(), GatewayError> {
    cfg.validate()?;
    for (addr, proto) in [
        (cfg.plaintext.then_some(cfg.tcp), Proto::Tcp),
        (cfg.tls, Proto::Tcp),
        (cfg.quic, Proto::Udp),
    ] {
        if let Some(addr) = addr {
            refuse_a_served_port(addr, proto)?;
        }
    }
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| GatewayError::DataDir {
        path: cfg.data_dir.display().to_string(),
        message: e.to_string(),
    })
}

/// Runs the gateway on its RocksDB log in `cfg.data_dir` until `shutdown` is set (or
/// SIGTERM/SIGINT when `handle_signals`). `on_ready` is called with the bound addresses once
/// every core listens.
#[cfg(feature = "rocks")]
pub fn run(
    cfg: Config,
    shutdown: Arc<AtomicBool>,
    handle_signals: bool,
    on_ready: impl FnOnce(Ready),
) -> Result<(), GatewayError> {
    prepare(&cfg)?;
    crate::sys::ignore_file_size_signal();
    let store: Arc<dyn MessageStore> = Arc::new(tern_storage::RocksStore::open(
        cfg.data_dir.join("log"),
        store_options(&cfg),
    )?);
    serve(cfg, store, shutdown, handle_signals, on_ready)
}

/// Runs the gateway on `store` (which it closes when it stops), as [`run`] does on its
/// RocksDB log. `cfg.data_dir` still holds the login secret unless `cfg.secret` is set.
pub fn run_with_store(
    cfg: Config,
    store: Arc<dyn MessageStore>,
    shutdown: Arc<AtomicBool>,
    handle_signals: bool,
    on_ready: impl FnOnce(Ready),
) -> Result<(), GatewayError> {
    prepare(&cfg)?;
    serve(cfg, store, shutdown, handle_signals, on_ready)
}

/// [`run_with_store`] once `cfg` is prepared.
fn serve(
    cfg: Config,
    store: Arc<dyn MessageStore>,
    shutdown: Arc<AtomicBool>,
    handle_signals: bool,
    on_ready: impl FnOnce(Ready),
) -> Result<(), GatewayError> {
    let secret = load_secret(&cfg)?;
    crate::sys::ignore_broken_pipe_signal();
    if handle_signals {
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, shutdown.clone()).map_err(|e| {
                GatewayError::DataDir {
                    path: String::new(),
                    message: format!("cannot install signal handler: {e}"),
                }
            })?;
        }
    }
    let result = run_cores(&cfg, store.clone(), secret, shutdown, on_ready);
    // (The side runtime, if any, stopped with the cores: its thread was joined in run_cores.)
    // Flush and close the log whatever happened to the cores.
    let closed = store.close();
    result?;
    closed.map_err(GatewayError::Close)?;
    info!("stopped");
    Ok(())
}

fn run_cores(
    cfg: &Config,
    store: Arc<dyn MessageStore>,
    secret: Secret,
    shutdown: Arc<AtomicBool>,
    on_ready: impl FnOnce(Ready),
) -> Result<(), GatewayError> {
    let n = cfg.effective_cores();
    let cpus = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    let router = Router::new(n);
    let cfg = Arc::new(cfg.clone());
    let (nofile, _) = crate::sys::rlimit(libc::RLIMIT_NOFILE);
    let max_connections = cfg.effective_max_connections(nofile);
    let conn_limits = ConnLimits::new(max_connections, cfg.max_connections_per_ip);
    let parker = match cfg.park_after_ms {
        0 => None,
        _ => Some(Arc::new(
            crate::park::Parker::start(n).map_err(GatewayError::Parker)?,
        )),
    };
    let mesh = MeshBuilder::<ShardMsg, _>::full(n, 4096);
    let metrics = Arc::new(crate::metrics::Metrics::new(n));
    let (bridge, mut admin_jobs) = crate::admin::Bridge::new(router, metrics.clone());
    let mut side = crate::side::Side::start(
        &cfg,
        store.clone(),
        secret.clone(),
        bridge,
        shutdown.clone(),
    )?;
    // Bind on core 0 first so that port 0 (tests) resolves to one port every core then shares.
    let addr = if cfg.plaintext {
        Some(
            resolve_listen_addr(cfg.tcp).map_err(|e| GatewayError::Listen {
                addr: cfg.tcp,
                message: e.to_string(),
            })?,
        )
    } else {
        None
    };
    let identity = if cfg.quic.is_some() || cfg.tls.is_some() {
        Some(tls_identity(&cfg)?)
    } else {
        None
    };
    let quic_cores: Vec<Option<tern_quic::CoreQuic>> = match (cfg.quic, &identity) {
        (Some(quic_addr), Some(identity)) => quic_setup(&cfg, identity, quic_addr, n)?
            .into_iter()
            .map(Some)
            .collect(),
        _ => (0..n).map(|_| None).collect(),
    };
    let tls = match (cfg.tls, &identity) {
        (Some(tls_addr), Some(identity)) => {
            let addr = resolve_listen_addr(tls_addr).map_err(|e| GatewayError::Listen {
                addr: tls_addr,
                message: e.to_string(),
            })?;
            let config = tern_quic::tls::server_config(identity)?;
            Some((addr, futures_rustls::TlsAcceptor::from(config)))
        }
        _ => None,
    };
    let tls_addr = tls.as_ref().map(|(a, _)| *a);
    let quic_addr = quic_cores
        .first()
        .and_then(|q| q.as_ref().map(|q| q.local_addr()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), GatewayError>>();
    let mut handles = Vec::with_capacity(n);
    for (id, core_quic) in quic_cores.into_iter().enumerate() {
        let placement = if n <= cpus {
            Placement::Fixed(id)
        } else {
            Placement::Unbound
        };
        let mesh = mesh.clone();
        let core_cfg = cfg.clone();
        let store = store.clone();
        let secret = secret.clone();
        let core_shutdown = shutdown.clone();
        let ready = ready_tx.clone();
        let conn_limits = conn_limits.clone();
        let parker = parker.clone();
        let tls = tls.clone();
        let admin_jobs = admin_jobs.remove(0);
        let metrics = metrics.clone();
        let hooks = side.hooks.clone();
        let builder = LocalExecutorBuilder::new(placement)
            .name(&format!("tern-core-{id}"))
            .io_memory(cfg.io_memory_bytes)
            // Every idle connection keeps a poll request in the ring, and the kernel finds the
            // target of each cancellation (glommio cancels a timeout on every reactor turn) by
            // walking one bucket of a hash table whose size follows the ring's: 256 entries
            // gave 16 buckets, and with 9,000 connections a core spent 17% of its time in those
            // walks. 4096 gives the maximum of 256 buckets, for 3 MiB more pinned memory per core.
            .ring_depth(4096)
            .preempt_timer(Duration::from_millis(5));
        let spawned = builder.spawn(move || async move {
            core_main(
                id,
                router,
                core_cfg,
                store,
                secret,
                mesh,
                core_shutdown,
                conn_limits,
                parker,
                core_quic,
                tls,
                addr,
                admin_jobs,
                metrics,
                hooks,
                ready,
            )
            .await
        });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                shutdown.store(true, Ordering::SeqCst);
                for h in handles {
                    let _ = h.join();
                }
                side.join();
                return Err(executor_error(id, cfg.io_memory_bytes, e.to_string()));
            }
        }
    }
    drop(ready_tx);
    let mut failure = None;
    let mut died = false;
    // A core that has not reported within this bound is stuck before its listener (seen, rarely,
    // while cores join their channel mesh on a heavily loaded machine): fail the start with a
    // message instead of hanging. Its thread is not joined; the process exits.
    let start_deadline = std::time::Instant::now() + Duration::from_secs(15);
    for started in 0..n {
        let left = start_deadline.saturating_duration_since(std::time::Instant::now());
        match ready_rx.recv_timeout(left) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                shutdown.store(true, Ordering::SeqCst);
                return Err(executor_error(
                    started,
                    cfg.io_memory_bytes,
                    format!("only {started} of {n} cores started within 15 s"),
                ));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // A core ended before reporting: its executor could not start (the join below
                // says why).
                died = true;
                break;
            }
        }
    }
    if failure.is_some() || died {
        shutdown.store(true, Ordering::SeqCst);
    } else {
        match addr {
            Some(addr) => {
                info!(%addr, cores = n, max_connections, data_dir = %cfg.data_dir.display(), "tern-gateway listening")
            }
            None => {
                info!(cores = n, max_connections, data_dir = %cfg.data_dir.display(), "tern-gateway listening, plaintext TCP disabled")
            }
        }
        if let Some(q) = quic_addr {
            info!(%q, "QUIC listening");
        }
        if let Some(t) = tls_addr {
            info!(%t, "TLS listening");
        }
        if let Some(api) = side.api_url() {
            info!(%api, "API listening");
        }
        on_ready(Ready {
            tcp: addr,
            quic: quic_addr,
            tls: tls_addr,
            api: side.api_url(),
        });
    }
    for (id, h) in handles.into_iter().enumerate() {
        if let Err(e) = h.join() {
            failure.get_or_insert(executor_error(id, cfg.io_memory_bytes, e.to_string()));
        }
    }
    side.join();
    if died && failure.is_none() {
        failure = Some(executor_error(
            0,
            cfg.io_memory_bytes,
            "the executor stopped".into(),
        ));
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The TLS identity: the configured certificate, or the development certificate in the data
/// directory (generated on first use).
fn tls_identity(cfg: &Config) -> Result<tern_quic::tls::TlsIdentity, GatewayError> {
    use tern_quic::tls;
    let identity = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => tls::load(cert, key)?,
        _ => tls::load_or_generate(&cfg.data_dir)?,
    };
    if identity.generated() {
        info!(
            cert = %identity.cert_path().display(),
            "generated a self-signed development certificate (clients trust it with --ca)"
        );
    }
    if let Some(cert) = identity.cert_chain().first() {
        use sha2::Digest;
        let sha256: String = sha2::Sha256::digest(cert.as_ref())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        info!(
            cert = %identity.cert_path().display(),
            %sha256,
            "TLS certificate (clients may pin it with --pin)"
        );
    }
    Ok(identity)
}

/// The QUIC server config and one bound endpoint per core.
fn quic_setup(
    cfg: &Config,
    identity: &tern_quic::tls::TlsIdentity,
    addr: SocketAddr,
    cores: usize,
) -> Result<Vec<tern_quic::CoreQuic>, GatewayError> {
    let mut server = tern_quic::tls::quic_server_config(identity)?;
    let mut transport = tern_quic::TransportConfig::default();
    // The session's own idle timeout (pings every heartbeat) decides; QUIC's only catches a
    // client that vanished without a word.
    let idle = Duration::from_millis(cfg.idle_timeout_ms.saturating_mul(2));
    transport.max_idle_timeout(tern_quic::quinn_proto::IdleTimeout::try_from(idle).ok());
    transport.max_concurrent_bidi_streams(tern_quic::VarInt::from_u32(1));
    transport.max_concurrent_uni_streams(tern_quic::VarInt::from_u32(0));
    server.transport_config(Arc::new(transport));
    Ok(tern_quic::QuicSetup::new(addr, cores, server).bind()?)
}

/// Fails if another process serves `addr` already (see [`crate::ports`]). Where `/proc/net`
/// cannot be read the check is skipped, with a warning.
fn refuse_a_served_port(addr: SocketAddr, proto: Proto) -> Result<(), GatewayError> {
    match crate::ports::in_use(addr, proto) {
        Ok(false) => Ok(()),
        Ok(true) => Err(GatewayError::Listen {
            addr,
            message: format!(
                "another process already {} this port (a second gateway would share it through \
                 SO_REUSEPORT and take part of the connections); stop it or choose another address",
                match proto {
                    Proto::Tcp => "listens on",
                    Proto::Udp => "receives on",
                }
            ),
        }),
        Err(e) => {
            warn!(%addr, error = %e, "cannot read /proc/net to check that the port is free");
            Ok(())
        }
    }
}

/// Binds once to learn the port (when 0 is asked for) and to fail early on a bad address. With
/// SO_REUSEPORT like the cores' listeners: after a crash, the connections the old process had
/// accepted linger in TIME_WAIT on this port and would refuse a plain bind for a minute.
fn resolve_listen_addr(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP address"))
}

fn executor_error(core: usize, io_memory: usize, message: String) -> GatewayError {
    if let Some(error) = crate::sys::io_uring_refused() {
        let advice = io_uring_advice(error.raw_os_error());
        return GatewayError::IoUring { error, advice };
    }
    let (soft, _) = crate::sys::rlimit(libc::RLIMIT_MEMLOCK);
    let need_kib = (io_memory as u64 / 1024) + 256;
    GatewayError::Executor {
        core,
        message,
        need_kib,
        limit_kib: soft / 1024,
        suggest_kib: (need_kib * 4).max(65536),
    }
}

/// What to change when the kernel refuses io_uring with `errno`.
fn io_uring_advice(errno: Option<i32>) -> &'static str {
    if errno == Some(libc::EPERM) {
        "Either a seccomp profile forbids it, as container runtimes' default profiles do (allow \
         the io_uring_setup, io_uring_enter and io_uring_register system calls), or it is turned \
         off: set `sysctl kernel.io_uring_disabled=0` (with 1, only members of the group in \
         kernel.io_uring_group may use it)."
    } else {
        "This kernel has no io_uring (Linux 5.8 or later is needed), or a seccomp filter hides \
         it: allow the io_uring_setup, io_uring_enter and io_uring_register system calls."
    }
}

#[allow(clippy::too_many_arguments)]
async fn core_main(
    id: usize,
    router: Router,
    cfg: Arc<Config>,
    store: Arc<dyn MessageStore>,
    secret: Secret,
    mesh: MeshBuilder<ShardMsg, glommio::channels::channel_mesh::Full>,
    shutdown: Arc<AtomicBool>,
    conn_limits: Arc<ConnLimits>,
    parker: Option<Arc<crate::park::Parker>>,
    core_quic: Option<tern_quic::CoreQuic>,
    tls: Option<(SocketAddr, futures_rustls::TlsAcceptor)>,
    addr: Option<SocketAddr>,
    admin_jobs: async_channel::Receiver<crate::admin::AdminJob>,
    metrics: Arc<crate::metrics::Metrics>,
    hooks: crate::side::Hooks,
    ready: std::sync::mpsc::Sender<Result<(), GatewayError>>,
) {
    // glommio wakes a task waiting for a mesh peer to connect only when its reactor loop turns;
    // an idle executor sleeps until its next timer. Tick while joining so that a peer that
    // connects after this core fell asleep is noticed.
    let joining = Rc::new(std::cell::Cell::new(true));
    {
        let joining = joining.clone();
        glommio::spawn_local(async move {
            while joining.get() {
                glommio::timer::sleep(Duration::from_millis(2)).await;
            }
        })
        .detach();
    }
    let joined = mesh.join().await;
    joining.set(false);
    let (senders, mut receivers) = match joined {
        Ok(x) => x,
        Err(_) => {
            let _ = ready.send(Err(GatewayError::Listen {
                addr: addr.unwrap_or(cfg.tcp),
                message: "cannot join the core mesh".into(),
            }));
            return;
        }
    };
    // Every core starts its QUIC endpoint at the same point (after the mesh), as the endpoints
    // wait for each other's forwarding channels.
    let quic_listener = match core_quic {
        Some(q) => Some(q.start().await),
        None => None,
    };
    let tls_listener = match tls {
        Some((tls_addr, acceptor)) => match TcpListener::bind(tls_addr) {
            Ok(l) => Some((l, acceptor)),
            Err(e) => {
                let _ = ready.send(Err(GatewayError::Listen {
                    addr: tls_addr,
                    message: e.to_string(),
                }));
                return;
            }
        },
        None => None,
    };
    let listener = match addr.map(|addr| (addr, TcpListener::bind(addr))) {
        None => None,
        Some((_, Ok(l))) => Some(l),
        Some((addr, Err(e))) => {
            let _ = ready.send(Err(GatewayError::Listen {
                addr,
                message: e.to_string(),
            }));
            return;
        }
    };
    let mut core = Core::new(
        id,
        router,
        cfg.clone(),
        store,
        secret,
        senders,
        shutdown.clone(),
        conn_limits,
        metrics,
    );
    core.webhooks = hooks.webhooks;
    core.offline = hooks.offline;
    core.parker = parker.clone();
    let core = Rc::new(core);
    // The core's own loops, which never end by themselves: cancelled when the core stops, so
    // that nothing keeps the core (and with it the store) alive after this function returns.
    let mut loops = Vec::new();
    for (from, rx) in receivers.streams() {
        let core = core.clone();
        loops.push(
            glommio::spawn_local(async move {
                while let Some(msg) = rx.recv().await {
                    if let Some(n) = core.m().mesh_received.get(from) {
                        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    core.handle(msg);
                }
            })
            .detach(),
        );
    }
    let completions = glommio::spawn_local(core.clone().run_completions());
    loops.push(glommio::spawn_local(core.clone().run_idle_sweep()).detach());
    if let Some(parker) = parker {
        loops.push(glommio::spawn_local(crate::park::run_unparker(core.clone(), parker)).detach());
    }
    loops.push(glommio::spawn_local(core.clone().run_room_sends()).detach());
    loops.push(glommio::spawn_local(core.clone().run_room_flush()).detach());
    loops.push(glommio::spawn_local(core.clone().run_flusher()).detach());
    loops.push(glommio::spawn_local(core.clone().run_admin(admin_jobs)).detach());
    {
        let core = core.clone();
        glommio::spawn_local(async move {
            while !core.shutdown.load(Ordering::Relaxed) {
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
            core.begin_stop();
        })
        .detach();
    }
    let quic_loop = quic_listener
        .map(|l| glommio::spawn_local(crate::session::quic_accept_loop(core.clone(), l)));
    let tls_loop = tls_listener.map(|(l, acceptor)| {
        glommio::spawn_local(crate::session::tls_accept_loop(core.clone(), l, acceptor))
    });
    let _ = ready.send(Ok(()));
    match listener {
        Some(listener) => crate::session::accept_loop(core.clone(), listener).await,
        None => core.stopped().await,
    }
    // Shutdown: sessions got Kick(SHUTDOWN) from their readers; wait for them to close.
    let deadline = std::time::Instant::now() + Duration::from_millis(cfg.shutdown_timeout_ms);
    while (core.connections.get() > 0 || !core.sessions.borrow().is_empty())
        && std::time::Instant::now() < deadline
    {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if !core.sessions.borrow().is_empty() {
        warn!(
            core = id,
            left = core.sessions.borrow().len(),
            "shutdown timeout: closing remaining sessions"
        );
    }
    if let Some(q) = quic_loop {
        q.await;
    }
    if let Some(t) = tls_loop {
        t.await;
    }
    core.wake_completions();
    let _ = futures_lite::future::or(
        async {
            completions.await;
        },
        glommio::timer::sleep(Duration::from_millis(500)),
    )
    .await;
    // A cancelled task drops its future when the executor next runs it: yield so that it does
    // before this executor ends.
    for task in &loops {
        task.cancel();
    }
    drop(loops);
    for _ in 0..4 {
        futures_lite::future::yield_now().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_io_uring_is_named_with_what_to_change() {
        assert!(
            crate::sys::io_uring_refused().is_none(),
            "the gateway's tests need io_uring"
        );
        let refused = |errno| {
            GatewayError::IoUring {
                error: std::io::Error::from_raw_os_error(errno),
                advice: io_uring_advice(Some(errno)),
            }
            .to_string()
        };
        let off = refused(libc::EPERM);
        assert!(
            off.starts_with("io_uring is not available (Operation not permitted")
                && off.contains("seccomp profile")
                && off.contains("sysctl kernel.io_uring_disabled=0"),
            "{off}"
        );
        let missing = refused(libc::ENOSYS);
        assert!(
            missing.contains("Linux 5.8") && missing.contains("allow the io_uring_setup"),
            "{missing}"
        );
    }
}
