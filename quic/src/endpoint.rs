//! One core's endpoint: the socket reader, forwarding between cores, accepting connections,
//! and the [`Listener`] the application uses.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use glommio::channels::shared_channel::{ConnectedReceiver, ConnectedSender};
use glommio::net::UdpSocket;
use quinn_proto::{ConnectionHandle, DatagramEvent, Incoming, VarInt};
use tracing::{Instrument, debug, trace};

use crate::connection::{self, ConnShared, Connection};
use crate::route;
use crate::setup::CoreQuic;
use crate::stats::Stats;

/// Smallest receive buffer. The buffer is sized from the endpoint's advertised maximum UDP
/// payload (1472 bytes by default), which peers must respect once they know it; a larger
/// datagram is truncated and fails authentication. Kept small on purpose: while the socket is
/// idle, glommio holds a buffer of this size from the executor's locked `io_memory`.
const MIN_RECV_BUFFER: usize = 2048;

/// Datagrams the reader handles before letting other tasks (connection drivers) run.
const RECV_BATCH: usize = 64;

/// A datagram read by one core for a connection owned by another.
#[derive(Debug)]
pub(crate) struct Forwarded {
    remote: SocketAddr,
    data: BytesMut,
}

/// State of one core's endpoint, shared by its tasks (single-threaded: `Rc` + `RefCell`, no
/// borrow is held across an `.await`).
pub(crate) struct CoreState {
    pub(crate) index: u8,
    cores: usize,
    local_addr: SocketAddr,
    socket: UdpSocket,
    recv_buffer: usize,
    pub(crate) endpoint: RefCell<quinn_proto::Endpoint>,
    conns: RefCell<HashMap<ConnectionHandle, Rc<ConnShared>>>,
    accept: RefCell<AcceptQueue>,
    forward: RefCell<Vec<Option<ConnectedSender<Forwarded>>>>,
    pub(crate) stats: Arc<Stats>,
    backlog: usize,
    handshaking: Cell<usize>,
    next_id: Cell<u64>,
    /// Transmit buffers lent to connection drivers while they send, so an idle connection holds
    /// none.
    buffers: RefCell<Vec<Vec<u8>>>,
    mesh_pending: Cell<usize>,
    mesh_waiters: RefCell<Vec<Waker>>,
    idle_waiters: RefCell<Vec<Waker>>,
}

#[derive(Default)]
struct AcceptQueue {
    ready: VecDeque<Connection>,
    waiters: Vec<Waker>,
    closed: Option<(VarInt, Bytes)>,
}

impl CoreQuic {
    /// Starts this core's endpoint inside its glommio executor: spawns the socket reader and
    /// the forwarding tasks, then waits until the forwarding channels to and from every other
    /// core are connected, which needs every core to call `start`. Datagrams are read (and
    /// connections accepted) from the moment this is called.
    pub async fn start(self) -> Listener {
        let socket = UdpSocket::from(self.socket);
        let recv_buffer = usize::try_from(self.endpoint_config.get_max_udp_payload_size())
            .unwrap_or(usize::MAX)
            .clamp(MIN_RECV_BUFFER, 64 * 1024);
        let endpoint = quinn_proto::Endpoint::new(
            self.endpoint_config,
            Some(self.server_config),
            // Path MTU discovery needs "don't fragment" on the socket, which this crate does not
            // set: packets stay at quinn-proto's safe initial size (1200 bytes).
            false,
            None,
        );
        let mut forward = Vec::with_capacity(self.cores);
        forward.resize_with(self.cores, || None);
        let core = Rc::new(CoreState {
            index: self.index,
            cores: self.cores,
            local_addr: self.local_addr,
            socket,
            recv_buffer,
            endpoint: RefCell::new(endpoint),
            conns: RefCell::new(HashMap::new()),
            accept: RefCell::new(AcceptQueue::default()),
            forward: RefCell::new(forward),
            stats: self.stats,
            backlog: self.accept_backlog,
            handshaking: Cell::new(0),
            next_id: Cell::new(0),
            buffers: RefCell::new(Vec::new()),
            mesh_pending: Cell::new(self.to.len() + self.from.len()),
            mesh_waiters: RefCell::new(Vec::new()),
            idle_waiters: RefCell::new(Vec::new()),
        });
        let span = tracing::debug_span!("quic_core", core = self.index);
        glommio::spawn_local(recv_loop(core.clone()).instrument(span.clone())).detach();
        for (peer, tx) in self.to {
            let core = core.clone();
            glommio::spawn_local(async move {
                let tx = tx.connect().await;
                core.forward.borrow_mut()[peer] = Some(tx);
                core.mesh_connected();
            })
            .detach();
        }
        for (_peer, rx) in self.from {
            let core = core.clone();
            glommio::spawn_local(
                async move {
                    let rx = rx.connect().await;
                    core.mesh_connected();
                    forward_loop(core, rx).await;
                }
                .instrument(span.clone()),
            )
            .detach();
        }
        // glommio notices that a channel's peer connected only when this executor's reactor
        // turns, and an idle executor sleeps until its next timer. Tick until joined.
        let joined = Rc::new(Cell::new(false));
        {
            let joined = joined.clone();
            glommio::spawn_local(async move {
                while !joined.get() {
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
            })
            .detach();
        }
        poll_fn(|cx| {
            if core.mesh_pending.get() == 0 {
                Poll::Ready(())
            } else {
                register(&mut core.mesh_waiters.borrow_mut(), cx.waker());
                Poll::Pending
            }
        })
        .await;
        joined.set(true);
        debug!(core = core.index, addr = %core.local_addr, "QUIC endpoint started");
        Listener { core }
    }
}

impl CoreState {
    fn mesh_connected(&self) {
        self.mesh_pending.set(self.mesh_pending.get() - 1);
        if self.mesh_pending.get() == 0 {
            wake_all(&mut self.mesh_waiters.borrow_mut());
        }
    }

    /// Sends one datagram; a failed send is counted and otherwise ignored (QUIC retransmits).
    pub(crate) async fn send(&self, data: &[u8], to: SocketAddr) {
        match self.socket.send_to(data, to).await {
            Ok(_) => self.stats.sent(data.len()),
            Err(e) => {
                self.stats.send_error();
                debug!(%to, error = %e, "UDP send failed");
            }
        }
    }

    pub(crate) fn take_buffer(&self) -> Vec<u8> {
        self.buffers.borrow_mut().pop().unwrap_or_default()
    }

    pub(crate) fn put_buffer(&self, mut buf: Vec<u8>) {
        buf.clear();
        self.buffers.borrow_mut().push(buf);
    }

    /// Hands a datagram to the core that owns its connection. Never waits: a full queue drops
    /// the datagram like a congested router would. Counted before it is handed over, so the
    /// owner's `forwarded_in` never runs ahead of this core's `forwarded_out`.
    fn forward(&self, owner: u8, remote: SocketAddr, data: &[u8]) {
        self.stats.forwarded_out();
        let forward = self.forward.borrow();
        let Some(tx) = forward.get(usize::from(owner)).and_then(Option::as_ref) else {
            self.stats.forward_dropped();
            return;
        };
        let msg = Forwarded {
            remote,
            data: BytesMut::from(data),
        };
        if tx.try_send(msg).is_err() {
            self.stats.forward_dropped();
        }
    }

    /// Feeds one datagram that belongs to this core to its endpoint.
    async fn handle_datagram(
        self: &Rc<Self>,
        remote: SocketAddr,
        data: BytesMut,
        response: &mut Vec<u8>,
    ) {
        response.clear();
        let event =
            self.endpoint
                .borrow_mut()
                .handle(Instant::now(), remote, None, None, data, response);
        match event {
            None => {}
            Some(DatagramEvent::ConnectionEvent(handle, event)) => {
                let conn = self.conns.borrow().get(&handle).cloned();
                match conn {
                    Some(conn) => conn.deliver(event, &self.stats),
                    None => trace!(?handle, "datagram for a finished connection"),
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                self.incoming(incoming, response).await;
            }
            Some(DatagramEvent::Response(transmit)) => {
                self.send(&response[..transmit.size], transmit.destination)
                    .await;
            }
        }
    }

    async fn incoming(self: &Rc<Self>, incoming: Incoming, response: &mut Vec<u8>) {
        let closed = self.accept.borrow().closed.is_some();
        let waiting = self.handshaking.get() + self.accept.borrow().ready.len();
        if closed || waiting >= self.backlog {
            debug!(remote = %incoming.remote_address(), closed, waiting, "refusing connection");
            self.stats.refused();
            let transmit = self.endpoint.borrow_mut().refuse(incoming, response);
            self.send(&response[..transmit.size], transmit.destination)
                .await;
            return;
        }
        let accepted = self
            .endpoint
            .borrow_mut()
            .accept(incoming, Instant::now(), response, None);
        match accepted {
            Ok((handle, conn)) => self.spawn_connection(handle, conn),
            Err(e) => {
                debug!(cause = %e.cause, "cannot accept connection");
                if let Some(transmit) = e.response {
                    self.send(&response[..transmit.size], transmit.destination)
                        .await;
                }
            }
        }
    }

    fn spawn_connection(self: &Rc<Self>, handle: ConnectionHandle, conn: quinn_proto::Connection) {
        let seq = self.next_id.get();
        self.next_id.set(seq + 1);
        // Unique per process: the core in the top byte, a per-core sequence below.
        let id = (u64::from(self.index) << 56) | (seq & ((1 << 56) - 1));
        let remote = conn.remote_address();
        let shared = Rc::new(ConnShared::new(id, self.index, handle, conn));
        self.conns.borrow_mut().insert(handle, shared.clone());
        self.handshaking.set(self.handshaking.get() + 1);
        self.stats.handshake();
        let span = tracing::debug_span!("quic_conn", core = self.index, id, %remote);
        glommio::spawn_local(connection::drive(shared, self.clone()).instrument(span)).detach();
    }

    /// The handshake of `conn` completed: hand it to `accept`, or close it if the listener was
    /// closed meanwhile.
    pub(crate) fn established(&self, conn: &Rc<ConnShared>) {
        self.handshaking.set(self.handshaking.get() - 1);
        self.stats.established();
        let conn = Connection::new(conn.clone());
        let mut accept = self.accept.borrow_mut();
        if let Some((code, reason)) = &accept.closed {
            let (code, reason) = (*code, reason.clone());
            drop(accept);
            conn.close(code, &reason);
            return;
        }
        accept.ready.push_back(conn);
        wake_all(&mut accept.waiters);
    }

    /// `conn` is drained: its driver ends and the endpoint has forgotten it.
    pub(crate) fn drained(&self, conn: &ConnShared, was_established: bool) {
        if !was_established {
            self.handshaking.set(self.handshaking.get() - 1);
        }
        self.stats.drained();
        let mut conns = self.conns.borrow_mut();
        // The endpoint freed the handle when it saw the connection drain, a moment ago: a new
        // connection accepted meanwhile may already own it.
        if conns
            .get(&conn.handle)
            .is_some_and(|c| std::ptr::eq(&**c, conn))
        {
            conns.remove(&conn.handle);
        }
        if conns.is_empty() {
            drop(conns);
            wake_all(&mut self.idle_waiters.borrow_mut());
        }
    }
}

async fn recv_loop(core: Rc<CoreState>) {
    let mut buf = vec![0u8; core.recv_buffer];
    let mut response = Vec::new();
    let mut batch = 0;
    loop {
        let (len, remote) = match core.socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "UDP receive failed");
                // Do not spin on a persistent error.
                glommio::timer::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        core.stats.received(len);
        let data = &buf[..len];
        match route::owner_core(data) {
            Some(owner) if owner != core.index && usize::from(owner) < core.cores => {
                core.forward(owner, remote, data);
            }
            _ => {
                core.handle_datagram(remote, BytesMut::from(data), &mut response)
                    .await;
            }
        }
        batch += 1;
        if batch == RECV_BATCH {
            batch = 0;
            futures_lite::future::yield_now().await;
        }
    }
}

/// Datagrams other cores read for connections of this core. Never forwarded again: whatever
/// the endpoint makes of them is final.
async fn forward_loop(core: Rc<CoreState>, rx: ConnectedReceiver<Forwarded>) {
    let mut response = Vec::new();
    let mut batch = 0;
    while let Some(msg) = rx.recv().await {
        core.stats.forwarded_in();
        core.handle_datagram(msg.remote, msg.data, &mut response)
            .await;
        batch += 1;
        if batch == RECV_BATCH {
            batch = 0;
            futures_lite::future::yield_now().await;
        }
    }
}

/// One core's QUIC endpoint, as the application sees it: established connections to accept,
/// counters, and shutdown. Cheap to clone; not `Send` (it lives on its core).
#[derive(Clone)]
pub struct Listener {
    core: Rc<CoreState>,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("core", &self.core.index)
            .field("local_addr", &self.core.local_addr)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// The next connection whose handshake completed on this core; `None` once [`close`]d.
    ///
    /// [`close`]: Listener::close
    pub async fn accept(&self) -> Option<Connection> {
        poll_fn(|cx| {
            let mut accept = self.core.accept.borrow_mut();
            if let Some(conn) = accept.ready.pop_front() {
                return Poll::Ready(Some(conn));
            }
            if accept.closed.is_some() {
                return Poll::Ready(None);
            }
            register(&mut accept.waiters, cx.waker());
            Poll::Pending
        })
        .await
    }

    /// This core's index.
    pub fn core(&self) -> usize {
        usize::from(self.core.index)
    }

    /// The address the endpoints listen on.
    pub fn local_addr(&self) -> SocketAddr {
        self.core.local_addr
    }

    /// This core's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.core.stats.clone()
    }

    /// Connections this core drives now (handshaking, open or closing).
    pub fn connection_count(&self) -> usize {
        self.core.conns.borrow().len()
    }

    /// Stops accepting (new attempts are refused, `accept` returns `None`) and closes every
    /// connection of this core with `code` and `reason`. Datagrams for closing connections are
    /// still handled until they drain; see [`wait_idle`](Listener::wait_idle).
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        let ready = {
            let mut accept = self.core.accept.borrow_mut();
            if accept.closed.is_none() {
                accept.closed = Some((code, Bytes::copy_from_slice(reason)));
            }
            wake_all(&mut accept.waiters);
            std::mem::take(&mut accept.ready)
        };
        for conn in ready {
            conn.close(code, reason);
        }
        let conns: Vec<Rc<ConnShared>> = self.core.conns.borrow().values().cloned().collect();
        for conn in conns {
            conn.close(code, Bytes::copy_from_slice(reason));
        }
    }

    /// Resolves once this core drives no connection (all drained).
    pub async fn wait_idle(&self) {
        poll_fn(|cx| {
            if self.core.conns.borrow().is_empty() {
                Poll::Ready(())
            } else {
                register(&mut self.core.idle_waiters.borrow_mut(), cx.waker());
                Poll::Pending
            }
        })
        .await
    }
}

/// Adds `waker` to `list` unless a waker for the same task is already there.
pub(crate) fn register(list: &mut Vec<Waker>, waker: &Waker) {
    if !list.iter().any(|w| w.will_wake(waker)) {
        list.push(waker.clone());
    }
}

pub(crate) fn wake_all(list: &mut Vec<Waker>) {
    for w in list.drain(..) {
        w.wake();
    }
}
