//! One connection: the shared state around quinn-proto's `Connection`, the task that drives it,
//! and the [`Connection`] handle the application holds.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::timer::Timer;
use quinn_proto::{
    ConnectionError, ConnectionEvent, ConnectionHandle, Dir, Event, StreamEvent, StreamId, VarInt,
};
use tracing::{debug, trace};

use crate::endpoint::{CoreState, register, wake_all};
use crate::stats::Stats;
use crate::stream::{RecvStream, SendStream};

/// Datagrams a driver feeds to its connection per turn before it lets other tasks run.
const INPUT_BUDGET: usize = 32;
/// Datagrams a driver sends per turn before it lets other tasks run.
const SEND_BUDGET: usize = 32;
/// Unprocessed datagrams one connection may have queued; more are dropped (and counted).
const INBOX_LIMIT: usize = 1024;

/// State shared by a connection's driver task, its [`Connection`] handles and its streams.
pub(crate) struct ConnShared {
    pub(crate) id: u64,
    pub(crate) core: u8,
    pub(crate) handle: ConnectionHandle,
    /// Handles held by the application ([`Connection`]s and streams). When the last one goes,
    /// the connection is closed (code 0), as in quinn.
    app_refs: Cell<usize>,
    pub(crate) state: RefCell<ConnState>,
}

pub(crate) struct ConnState {
    pub(crate) inner: quinn_proto::Connection,
    /// Datagrams from the endpoint, not yet fed to `inner`.
    inbox: VecDeque<ConnectionEvent>,
    driver: Option<Waker>,
    /// Set by anyone who gave the driver work since it last looked.
    woken: bool,
    established: bool,
    /// Why the connection ended, once it has (locally or not).
    pub(crate) error: Option<ConnectionError>,
    pub(crate) blocked_readers: HashMap<StreamId, Waker>,
    pub(crate) blocked_writers: HashMap<StreamId, Waker>,
    incoming_bi: Vec<Waker>,
    open_bi: Vec<Waker>,
    closed: Vec<Waker>,
}

impl ConnShared {
    pub(crate) fn new(
        id: u64,
        core: u8,
        handle: ConnectionHandle,
        inner: quinn_proto::Connection,
    ) -> Self {
        Self {
            id,
            core,
            handle,
            app_refs: Cell::new(0),
            state: RefCell::new(ConnState {
                inner,
                inbox: VecDeque::new(),
                driver: None,
                woken: false,
                established: false,
                error: None,
                blocked_readers: HashMap::new(),
                blocked_writers: HashMap::new(),
                incoming_bi: Vec::new(),
                open_bi: Vec::new(),
                closed: Vec::new(),
            }),
        }
    }

    /// Queues a datagram the endpoint routed to this connection.
    pub(crate) fn deliver(&self, event: ConnectionEvent, stats: &Stats) {
        let mut st = self.state.borrow_mut();
        if st.inbox.len() >= INBOX_LIMIT {
            stats.inbox_dropped();
            return;
        }
        st.inbox.push_back(event);
        st.wake_driver();
    }

    pub(crate) fn close(&self, code: VarInt, reason: Bytes) {
        self.state.borrow_mut().close(code, reason);
    }
}

impl ConnState {
    pub(crate) fn wake_driver(&mut self) {
        self.woken = true;
        if let Some(w) = self.driver.take() {
            w.wake();
        }
    }

    /// Records why the connection ended and wakes everyone waiting on it.
    fn terminate(&mut self, reason: ConnectionError) {
        if self.error.is_none() {
            debug!(%reason, "connection ended");
            self.error = Some(reason);
        }
        for (_, w) in self.blocked_readers.drain() {
            w.wake();
        }
        for (_, w) in self.blocked_writers.drain() {
            w.wake();
        }
        wake_all(&mut self.incoming_bi);
        wake_all(&mut self.open_bi);
        wake_all(&mut self.closed);
    }

    pub(crate) fn close(&mut self, code: VarInt, reason: Bytes) {
        if self.error.is_some() {
            return;
        }
        self.inner.close(Instant::now(), code, reason);
        self.terminate(ConnectionError::LocallyClosed);
        self.wake_driver();
    }

    /// Forwards the connection's events to the endpoint and to whoever waits on the connection.
    /// Returns whether that produced more work for the driver, and whether the handshake just
    /// completed.
    fn process_events(&mut self, handle: ConnectionHandle, core: &CoreState) -> (bool, bool) {
        let mut more = false;
        let mut established = false;
        while let Some(event) = self.inner.poll_endpoint_events() {
            let reply = core.endpoint.borrow_mut().handle_event(handle, event);
            if let Some(reply) = reply {
                self.inner.handle_event(reply);
                more = true;
            }
        }
        while let Some(event) = self.inner.poll() {
            match event {
                Event::HandshakeDataReady => {}
                Event::Connected => {
                    self.established = true;
                    established = true;
                }
                Event::ConnectionLost { reason } => self.terminate(reason),
                Event::Stream(StreamEvent::Readable { id }) => {
                    if let Some(w) = self.blocked_readers.remove(&id) {
                        w.wake();
                    }
                }
                Event::Stream(StreamEvent::Writable { id })
                | Event::Stream(StreamEvent::Stopped { id, .. }) => {
                    if let Some(w) = self.blocked_writers.remove(&id) {
                        w.wake();
                    }
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    wake_all(&mut self.incoming_bi);
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                    // Only bidirectional streams are offered to the application; refuse the
                    // peer's unidirectional ones so they do not pin flow-control credit.
                    while let Some(id) = self.inner.streams().accept(Dir::Uni) {
                        let _ = self.inner.recv_stream(id).stop(VarInt::from_u32(0));
                    }
                    more = true;
                }
                Event::Stream(StreamEvent::Available { dir: Dir::Bi }) => {
                    wake_all(&mut self.open_bi);
                }
                Event::Stream(StreamEvent::Available { dir: Dir::Uni })
                | Event::Stream(StreamEvent::Finished { .. }) => {}
                Event::DatagramReceived => {
                    // Unreliable datagrams are not part of this transport's API.
                    while self.inner.datagrams().recv().is_some() {}
                }
                Event::DatagramsUnblocked => {}
            }
        }
        (more, established)
    }
}

/// Drives one connection until it is drained: feeds it datagrams, sends what it produces,
/// fires its timer, and relays its events. Each turn is bounded by [`INPUT_BUDGET`] and
/// [`SEND_BUDGET`]; a driver with work left yields to the back of the run queue instead of
/// looping, so a busy connection cannot starve the others on its core.
pub(crate) async fn drive(conn: Rc<ConnShared>, core: Rc<CoreState>) {
    // One timer per connection, re-armed from `poll_timeout`; glommio keeps timers ordered, so
    // nothing scans idle connections.
    let mut timer: Option<(Instant, Timer)> = None;
    loop {
        let mut keep_going = false;
        let mut established = false;
        {
            let mut st = conn.state.borrow_mut();
            st.woken = false;
            let now = Instant::now();
            for _ in 0..INPUT_BUDGET {
                let Some(event) = st.inbox.pop_front() else {
                    break;
                };
                st.inner.handle_event(event);
            }
            keep_going |= !st.inbox.is_empty();
            if st.inner.poll_timeout().is_some_and(|t| t <= now) {
                st.inner.handle_timeout(now);
            }
            let (more, est) = st.process_events(conn.handle, &core);
            keep_going |= more;
            established |= est;
        }

        keep_going |= transmit(&conn, &core).await;

        let drained = {
            let mut st = conn.state.borrow_mut();
            let (more, est) = st.process_events(conn.handle, &core);
            keep_going |= more;
            established |= est;
            st.inner.is_drained()
        };
        if established {
            core.established(&conn);
        }
        if drained {
            let was_established = {
                let mut st = conn.state.borrow_mut();
                let reason = st.error.clone().unwrap_or(ConnectionError::LocallyClosed);
                st.terminate(reason);
                st.established
            };
            core.drained(&conn, was_established);
            trace!("connection drained");
            return;
        }
        if keep_going {
            futures_lite::future::yield_now().await;
            continue;
        }

        let deadline = conn.state.borrow_mut().inner.poll_timeout();
        match deadline {
            Some(deadline) => {
                let now = Instant::now();
                if deadline <= now {
                    continue;
                }
                match &mut timer {
                    Some((armed, _)) if *armed == deadline => {}
                    Some((armed, t)) => {
                        t.reset(deadline - now);
                        *armed = deadline;
                    }
                    None => timer = Some((deadline, Timer::new(deadline - now))),
                }
            }
            None => timer = None,
        }
        poll_fn(|cx| {
            {
                let mut st = conn.state.borrow_mut();
                if st.woken {
                    return Poll::Ready(());
                }
                st.driver = Some(cx.waker().clone());
            }
            if let Some((_, t)) = &mut timer
                && Pin::new(t).poll(cx).is_ready()
            {
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await;
    }
}

/// Sends up to [`SEND_BUDGET`] datagrams; returns whether more may be waiting.
async fn transmit(conn: &ConnShared, core: &CoreState) -> bool {
    let mut buf = core.take_buffer();
    let mut sent = 0;
    let more = loop {
        if sent == SEND_BUDGET {
            break true;
        }
        buf.clear();
        let transmit = conn
            .state
            .borrow_mut()
            .inner
            .poll_transmit(Instant::now(), 1, &mut buf);
        let Some(transmit) = transmit else {
            break false;
        };
        core.send(&buf[..transmit.size], transmit.destination).await;
        sent += 1;
    };
    core.put_buffer(buf);
    more
}

/// A counted reference held by the application.
pub(crate) struct ConnectionRef(Rc<ConnShared>);

impl ConnectionRef {
    pub(crate) fn new(shared: Rc<ConnShared>) -> Self {
        shared.app_refs.set(shared.app_refs.get() + 1);
        Self(shared)
    }

    pub(crate) fn shared(&self) -> &ConnShared {
        &self.0
    }
}

impl Clone for ConnectionRef {
    fn clone(&self) -> Self {
        Self::new(self.0.clone())
    }
}

impl Drop for ConnectionRef {
    fn drop(&mut self) {
        let refs = self.0.app_refs.get() - 1;
        self.0.app_refs.set(refs);
        if refs == 0 {
            // Nobody can use the connection any more: close it rather than let it idle out.
            if let Ok(mut st) = self.0.state.try_borrow_mut() {
                st.close(VarInt::from_u32(0), Bytes::new());
            }
        }
    }
}

/// An established QUIC connection on this core. Cheap to clone; not `Send`.
///
/// When every clone and every stream of a connection is dropped, the connection is closed with
/// code 0.
#[derive(Clone)]
pub struct Connection {
    conn: ConnectionRef,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = self.conn.shared();
        f.debug_struct("Connection")
            .field("id", &shared.id)
            .field("core", &shared.core)
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub(crate) fn new(shared: Rc<ConnShared>) -> Self {
        Self {
            conn: ConnectionRef::new(shared),
        }
    }

    fn shared(&self) -> &ConnShared {
        self.conn.shared()
    }

    /// An id unique in this process: the core index in the top byte, a per-core sequence below.
    pub fn id(&self) -> u64 {
        self.shared().id
    }

    /// The core that owns this connection.
    pub fn core(&self) -> usize {
        usize::from(self.shared().core)
    }

    /// The peer's current address (it changes when the peer migrates).
    pub fn remote_address(&self) -> SocketAddr {
        self.shared().state.borrow().inner.remote_address()
    }

    /// Current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.shared().state.borrow().inner.rtt()
    }

    /// quinn-proto's statistics of this connection.
    pub fn quic_stats(&self) -> quinn_proto::ConnectionStats {
        self.shared().state.borrow().inner.stats()
    }

    /// The next bidirectional stream the peer opened; `None` once the connection has ended.
    pub async fn accept_bi(&self) -> Option<(SendStream, RecvStream)> {
        let id = poll_fn(|cx| {
            let mut st = self.shared().state.borrow_mut();
            if let Some(id) = st.inner.streams().accept(Dir::Bi) {
                // Accepting may raise the peer's stream limit: let the driver tell it.
                st.wake_driver();
                return Poll::Ready(Some(id));
            }
            if st.error.is_some() {
                return Poll::Ready(None);
            }
            register(&mut st.incoming_bi, cx.waker());
            Poll::Pending
        })
        .await?;
        Some(self.streams(id))
    }

    /// Opens a bidirectional stream, waiting while the peer's stream limit is reached; `None`
    /// once the connection has ended. The peer learns of the stream when data is first sent.
    pub async fn open_bi(&self) -> Option<(SendStream, RecvStream)> {
        let id = poll_fn(|cx| {
            let mut st = self.shared().state.borrow_mut();
            if st.error.is_some() {
                return Poll::Ready(None);
            }
            if let Some(id) = st.inner.streams().open(Dir::Bi) {
                return Poll::Ready(Some(id));
            }
            register(&mut st.open_bi, cx.waker());
            Poll::Pending
        })
        .await?;
        Some(self.streams(id))
    }

    fn streams(&self, id: StreamId) -> (SendStream, RecvStream) {
        (
            SendStream::new(self.conn.clone(), id),
            RecvStream::new(self.conn.clone(), id),
        )
    }

    /// Closes the connection immediately with an application error code and reason (sent to
    /// the peer). Data not yet acknowledged is abandoned: finish streams and wait for the
    /// peer's answer first if it matters.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        self.shared().close(code, Bytes::copy_from_slice(reason));
    }

    /// Why the connection ended, if it has.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        self.shared().state.borrow().error.clone()
    }

    /// Resolves when the connection ends, for whatever reason, with that reason.
    pub async fn closed(&self) -> ConnectionError {
        poll_fn(|cx| {
            let mut st = self.shared().state.borrow_mut();
            if let Some(e) = &st.error {
                return Poll::Ready(e.clone());
            }
            register(&mut st.closed, cx.waker());
            Poll::Pending
        })
        .await
    }
}
