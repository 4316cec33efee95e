//! Start-up on the main thread: one UDP socket per core on one port, the forwarding channels
//! between cores, and the per-core endpoint configuration.

use std::net::SocketAddr;
use std::sync::Arc;

use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use socket2::{Domain, Protocol, Socket, Type};

use crate::endpoint::Forwarded;
use crate::route::CoreCidGenerator;
use crate::stats::Stats;

/// Why the QUIC endpoints could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuicError {
    #[error("QUIC needs between 1 and 256 cores, got {0}")]
    Cores(usize),
    #[error("cannot bind UDP {addr} for core {core}: {source}")]
    Bind {
        addr: SocketAddr,
        core: usize,
        source: std::io::Error,
    },
    #[error("invalid QUIC setting `{key}`: {message}")]
    Config { key: &'static str, message: String },
}

/// Set-up of the per-core QUIC endpoints, run on the main thread before the executors start.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let identity = tern_quic::tls::load_or_generate(std::path::Path::new("/var/lib/tern"))?;
/// let server_config = tern_quic::tls::quic_server_config(&identity)?;
/// let cores = tern_quic::QuicSetup::new("0.0.0.0:7443".parse()?, 4, server_config).bind()?;
/// // Move cores[i] into executor i and call `cores[i].start().await` there.
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct QuicSetup {
    addr: SocketAddr,
    cores: usize,
    server_config: Arc<quinn_proto::ServerConfig>,
    endpoint_config: quinn_proto::EndpointConfig,
    forward_queue: usize,
    accept_backlog: usize,
    socket_buffer: usize,
}

impl QuicSetup {
    /// Default capacity of each core-to-core forwarding queue, in datagrams.
    pub const DEFAULT_FORWARD_QUEUE: usize = 1024;
    /// Default limit of connections handshaking or waiting in [`Listener::accept`] per core.
    ///
    /// [`Listener::accept`]: crate::Listener::accept
    pub const DEFAULT_ACCEPT_BACKLOG: usize = 1024;
    /// Default SO_RCVBUF / SO_SNDBUF request per socket (the kernel caps it at
    /// `net.core.rmem_max` / `wmem_max`).
    pub const DEFAULT_SOCKET_BUFFER: usize = 2 << 20;

    /// `cores` endpoints sharing `addr` (port 0 picks one free port for all of them), serving
    /// connections with `server_config`.
    pub fn new(addr: SocketAddr, cores: usize, server_config: quinn_proto::ServerConfig) -> Self {
        Self {
            addr,
            cores,
            server_config: Arc::new(server_config),
            endpoint_config: quinn_proto::EndpointConfig::default(),
            forward_queue: Self::DEFAULT_FORWARD_QUEUE,
            accept_backlog: Self::DEFAULT_ACCEPT_BACKLOG,
            socket_buffer: Self::DEFAULT_SOCKET_BUFFER,
        }
    }

    /// Capacity of each core-to-core forwarding queue; a datagram for a core whose queue is full
    /// is dropped (and counted), as a router would.
    pub fn forward_queue(mut self, datagrams: usize) -> Self {
        self.forward_queue = datagrams;
        self
    }

    /// Connections that may be handshaking or waiting to be accepted on one core; further
    /// attempts are refused with CONNECTION_REFUSED.
    pub fn accept_backlog(mut self, connections: usize) -> Self {
        self.accept_backlog = connections;
        self
    }

    /// SO_RCVBUF and SO_SNDBUF to request for each socket.
    pub fn socket_buffer(mut self, bytes: usize) -> Self {
        self.socket_buffer = bytes;
        self
    }

    /// Endpoint settings shared by all cores (the stateless-reset key, supported versions,
    /// maximum UDP payload). Its connection ID generator is replaced: the core-naming one is
    /// required for forwarding.
    pub fn endpoint_config(mut self, config: quinn_proto::EndpointConfig) -> Self {
        self.endpoint_config = config;
        self
    }

    /// Binds one socket per core and creates the forwarding channels. Returns one [`CoreQuic`]
    /// per core, in core order; each is `Send` and must be moved into its executor.
    pub fn bind(self) -> Result<Vec<CoreQuic>, QuicError> {
        if self.cores == 0 || self.cores > 256 {
            return Err(QuicError::Cores(self.cores));
        }
        if self.forward_queue == 0 {
            return Err(QuicError::Config {
                key: "forward_queue",
                message: "must be at least 1".into(),
            });
        }
        if self.accept_backlog == 0 {
            return Err(QuicError::Config {
                key: "accept_backlog",
                message: "must be at least 1".into(),
            });
        }
        let n = self.cores;
        let mut sockets = Vec::with_capacity(n);
        let mut addr = self.addr;
        for core in 0..n {
            let socket = bind_socket(addr, self.socket_buffer)
                .map_err(|source| QuicError::Bind { addr, core, source })?;
            if core == 0 {
                // Port 0: every other core binds the port the kernel chose for the first.
                addr = socket
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .ok_or_else(|| QuicError::Bind {
                        addr,
                        core,
                        source: std::io::Error::other("bound socket has no IP address"),
                    })?;
            }
            sockets.push(socket);
        }

        // One channel per ordered pair (from, to).
        let mut senders: Vec<Vec<(usize, SharedSender<Forwarded>)>> =
            (0..n).map(|_| Vec::new()).collect();
        let mut receivers: Vec<Vec<(usize, SharedReceiver<Forwarded>)>> =
            (0..n).map(|_| Vec::new()).collect();
        for (from, to) in (0..n).flat_map(|from| (0..n).map(move |to| (from, to))) {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(self.forward_queue);
                senders[from].push((to, tx));
                receivers[to].push((from, rx));
            }
        }

        let mut cores = Vec::with_capacity(n);
        for (index, ((socket, to), from)) in
            sockets.into_iter().zip(senders).zip(receivers).enumerate()
        {
            let core = index as u8;
            let mut endpoint_config = self.endpoint_config.clone();
            endpoint_config.cid_generator(move || Box::new(CoreCidGenerator::new(core)));
            cores.push(CoreQuic {
                index: core,
                cores: n,
                local_addr: addr,
                socket,
                endpoint_config: Arc::new(endpoint_config),
                server_config: self.server_config.clone(),
                to,
                from,
                stats: Arc::new(Stats::default()),
                accept_backlog: self.accept_backlog,
            });
        }
        Ok(cores)
    }
}

fn bind_socket(addr: SocketAddr, buffer: usize) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if buffer > 0 {
        // Best effort: the kernel silently caps the request, and a refusal is not fatal.
        let _ = socket.set_recv_buffer_size(buffer);
        let _ = socket.set_send_buffer_size(buffer);
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// One core's share of the QUIC set-up: its bound socket and its ends of the forwarding
/// channels. Created on the main thread by [`QuicSetup::bind`], moved into the core's executor,
/// and started there with [`CoreQuic::start`].
#[derive(Debug)]
pub struct CoreQuic {
    pub(crate) index: u8,
    pub(crate) cores: usize,
    pub(crate) local_addr: SocketAddr,
    pub(crate) socket: Socket,
    pub(crate) endpoint_config: Arc<quinn_proto::EndpointConfig>,
    pub(crate) server_config: Arc<quinn_proto::ServerConfig>,
    pub(crate) to: Vec<(usize, SharedSender<Forwarded>)>,
    pub(crate) from: Vec<(usize, SharedReceiver<Forwarded>)>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) accept_backlog: usize,
}

impl CoreQuic {
    /// This core's index (the first byte of the connection IDs it issues).
    pub fn index(&self) -> usize {
        usize::from(self.index)
    }

    /// The address every core's socket is bound to (with the port resolved if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This core's counters; keep a clone to read them from another thread.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }
}

// `CoreQuic` crosses from the main thread into its executor.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<CoreQuic>();
};
