//! The byte stream under a session: a TCP socket, a QUIC bidirectional stream, or a relay to the
//! core that holds a QUIC connection.
//!
//! A TCP connection moves to its user's core (its descriptor is duplicated there). A QUIC
//! connection cannot move: its packets arrive at the core whose id is in its connection ids.
//! When a QUIC client's user lives on another core, the session still runs on the user's core
//! (all of a user's devices stay on one core) and the bytes are relayed between the two cores:
//! the QUIC core copies stream bytes into a [`Relay`] and back, the user's core reads and writes
//! its end as it would a socket. Each direction is flow-controlled by credit (at most
//! [`RELAY_WINDOW`] bytes unacknowledged), so a relay never buffers more than that per direction.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures_lite::io::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use tern_quic::{Connection, RecvStream, SendStream, VarInt};

use crate::core::{Core, ShardMsg};

/// Bytes one relay direction may have in flight between cores.
pub const RELAY_WINDOW: usize = 256 << 10;
/// Largest chunk sent in one cross-core message.
const RELAY_CHUNK: usize = 32 << 10;

/// QUIC application error code sent when the server aborts a connection (a client that does not
/// read, a failed hand-off).
pub const QUIC_ABORT: u32 = 1;

/// TLS over a TCP socket (rustls).
pub type TlsStream = futures_rustls::server::TlsStream<TcpStream>;

/// A session's byte stream.
pub enum Transport {
    Tcp(TcpStream),
    Tls(Box<TlsStream>),
    Quic {
        send: SendStream,
        recv: RecvStream,
        conn: Connection,
    },
    Relay(Rc<Relay>),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Tcp(_) => f.write_str("Transport::Tcp"),
            Transport::Tls(_) => f.write_str("Transport::Tls"),
            Transport::Quic { conn, .. } => write!(f, "Transport::Quic({})", conn.id()),
            Transport::Relay(r) => write!(f, "Transport::Relay({})", r.id),
        }
    }
}

impl Transport {
    pub fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            Transport::Quic { recv, .. } => Pin::new(recv).poll_read(cx, buf),
            Transport::Relay(r) => r.poll_read(cx, buf),
        }
    }

    pub fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            Transport::Quic { send, .. } => Pin::new(send).poll_write(cx, buf),
            Transport::Relay(r) => r.poll_write(cx, buf),
        }
    }

    /// Pushes out what a write left buffered (TLS records); a no-op for the other transports.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Transport::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// The TCP socket under a TCP or TLS connection.
    fn socket(&self) -> Option<&TcpStream> {
        match self {
            Transport::Tcp(s) => Some(s),
            Transport::Tls(s) => Some(s.get_ref().0),
            Transport::Quic { .. } | Transport::Relay(_) => None,
        }
    }

    /// Ends the sending direction (`Write`) or both after what was written: a TCP FIN, a QUIC
    /// stream FIN, the end of a relay. A QUIC stream or a relay can only end its sending side;
    /// the peer then ends the rest. TLS ends without close_notify: frames are length-prefixed,
    /// so a truncation is detected by the client anyway, and sending the alert would need an
    /// await here.
    pub fn shutdown(&mut self, how: std::net::Shutdown) {
        if let Some(socket) = self.socket() {
            return crate::sys::shutdown(socket, how);
        }
        match self {
            Transport::Quic { send, .. } => {
                let _ = send.finish();
            }
            Transport::Relay(r) => r.close(),
            Transport::Tcp(_) | Transport::Tls(_) => {}
        }
    }

    /// Drops the connection at once, discarding whatever is queued either way.
    pub fn abort(&mut self) {
        if let Some(socket) = self.socket() {
            return crate::sys::set_linger_zero(socket.as_raw_fd());
        }
        match self {
            Transport::Quic { conn, .. } => conn.close(VarInt::from_u32(QUIC_ABORT), b"abort"),
            Transport::Relay(r) => r.abort(),
            Transport::Tcp(_) | Transport::Tls(_) => {}
        }
    }

    /// The socket of a plain TCP connection, which bytes may be sent to directly.
    pub fn plain_fd(&self) -> Option<RawFd> {
        match self {
            Transport::Tcp(s) => Some(s.as_raw_fd()),
            _ => None,
        }
    }

    /// The socket, for checks only TCP supports (unsent bytes).
    pub fn raw_fd(&self) -> Option<RawFd> {
        self.socket().map(AsRawFd::as_raw_fd)
    }
}

/// Messages between the two ends of a relay.
#[derive(Debug)]
pub enum RelayEvent {
    Data(Bytes),
    /// The peer consumed this many bytes: more may be sent.
    Credit(usize),
    /// The peer will send nothing more.
    Close,
    /// The peer dropped the connection: stop both ways.
    Abort,
}

/// One end of a relay between two cores. The end on the QUIC core and the end on the user's
/// core are the same type; each has a pump task that sends what its end produced.
pub struct Relay {
    pub id: u64,
    peer_core: usize,
    inbox: RefCell<VecDeque<Bytes>>,
    peer_closed: Cell<bool>,
    aborted: Cell<bool>,
    reader: RefCell<Option<Waker>>,
    outbox: RefCell<VecDeque<Bytes>>,
    /// Bytes this end may still send before the peer grants more.
    credit: Cell<usize>,
    writer: RefCell<Option<Waker>>,
    /// Bytes read here and not yet credited back to the peer.
    consumed: Cell<usize>,
    closing: Cell<bool>,
    pump: RefCell<Option<Waker>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("id", &self.id).finish()
    }
}

impl Relay {
    /// Creates this core's end of relay `id` to `peer_core`, registers it and starts its pump.
    pub fn open(core: &Rc<Core>, id: u64, peer_core: usize) -> Rc<Relay> {
        let relay = Rc::new(Relay {
            id,
            peer_core,
            inbox: RefCell::default(),
            peer_closed: Cell::new(false),
            aborted: Cell::new(false),
            reader: RefCell::default(),
            outbox: RefCell::default(),
            credit: Cell::new(RELAY_WINDOW),
            writer: RefCell::default(),
            consumed: Cell::new(0),
            closing: Cell::new(false),
            pump: RefCell::default(),
        });
        core.relays.borrow_mut().insert(id, relay.clone());
        glommio::spawn_local(pump(core.clone(), relay.clone())).detach();
        relay
    }

    /// An event from the other end.
    pub fn handle(&self, ev: RelayEvent) {
        match ev {
            RelayEvent::Data(b) => self.inbox.borrow_mut().push_back(b),
            RelayEvent::Credit(n) => {
                self.credit.set(self.credit.get() + n);
                wake(&self.writer);
            }
            RelayEvent::Close => {
                self.peer_closed.set(true);
                wake(&self.pump);
            }
            RelayEvent::Abort => {
                self.aborted.set(true);
                self.peer_closed.set(true);
                self.closing.set(true);
                wake(&self.writer);
                wake(&self.pump);
            }
        }
        wake(&self.reader);
    }

    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if self.aborted.get() {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        let mut inbox = self.inbox.borrow_mut();
        let Some(front) = inbox.front_mut() else {
            if self.peer_closed.get() {
                return Poll::Ready(Ok(0));
            }
            *self.reader.borrow_mut() = Some(cx.waker().clone());
            return Poll::Pending;
        };
        let n = front.len().min(buf.len());
        buf[..n].copy_from_slice(&front[..n]);
        if n == front.len() {
            inbox.pop_front();
        } else {
            let _ = front.split_to(n);
        }
        // Credit back in batches (a quarter window), not one message per read.
        self.consumed.set(self.consumed.get() + n);
        if self.consumed.get() >= RELAY_WINDOW / 4 || inbox.is_empty() {
            wake(&self.pump);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.aborted.get() || self.closing.get() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let credit = self.credit.get();
        if credit == 0 {
            *self.writer.borrow_mut() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(credit).min(RELAY_CHUNK);
        self.credit.set(credit - n);
        self.outbox
            .borrow_mut()
            .push_back(Bytes::copy_from_slice(&buf[..n]));
        wake(&self.pump);
        Poll::Ready(Ok(n))
    }

    /// This end sends nothing more (after what is queued).
    pub fn close(&self) {
        self.closing.set(true);
        wake(&self.pump);
    }

    /// Drops both directions now.
    pub fn abort(&self) {
        self.aborted.set(true);
        self.closing.set(true);
        self.outbox.borrow_mut().clear();
        wake(&self.pump);
        wake(&self.reader);
        wake(&self.writer);
    }
}

fn wake(w: &RefCell<Option<Waker>>) {
    if let Some(w) = w.borrow_mut().take() {
        w.wake();
    }
}

/// Sends this end's data, credits and close to the other core, until both ends are done.
async fn pump(core: Rc<Core>, relay: Rc<Relay>) {
    let peer = relay.peer_core;
    let id = relay.id;
    loop {
        // What to send next, decided without holding a borrow across the await.
        let next = std::future::poll_fn(|cx| {
            if relay.aborted.get() {
                return Poll::Ready(Some(RelayEvent::Abort));
            }
            let consumed = relay.consumed.get();
            if consumed > 0 {
                relay.consumed.set(0);
                return Poll::Ready(Some(RelayEvent::Credit(consumed)));
            }
            if let Some(b) = relay.outbox.borrow_mut().pop_front() {
                return Poll::Ready(Some(RelayEvent::Data(b)));
            }
            if relay.closing.get() {
                return Poll::Ready(Some(RelayEvent::Close));
            }
            *relay.pump.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        let Some(ev) = next else { break };
        let last = matches!(ev, RelayEvent::Close | RelayEvent::Abort);
        core.send_to_core(peer, ShardMsg::Relay { id, event: ev })
            .await;
        if last {
            break;
        }
    }
    // This end is done sending; once the peer is done too nothing refers to the id any more.
    let done = std::future::poll_fn(|cx| {
        if relay.peer_closed.get() || relay.aborted.get() || core.stopping.get() {
            Poll::Ready(())
        } else {
            *relay.pump.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    });
    // The peer's close normally follows at once; bound the wait so an id never leaks.
    futures_lite::future::or(done, async {
        glommio::timer::sleep(std::time::Duration::from_secs(30)).await;
    })
    .await;
    core.relays.borrow_mut().remove(&id);
}

/// The side of a relay on the core that holds the connection: copies the client's stream into
/// the relay and the relay into the client's stream until either side ends. `end` is called
/// once the session's side is done (true if it ended gracefully) and must make the client's
/// reading side end too (close the connection or shut the socket down).
pub async fn run_relay_end<R, W>(
    relay: Rc<Relay>,
    mut recv: R,
    mut send: W,
    end: impl std::future::Future<Output = ()>,
) where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin,
{
    let up = {
        let relay = relay.clone();
        async move {
            let mut buf = vec![0u8; RELAY_CHUNK];
            loop {
                let n = match futures_lite::AsyncReadExt::read(&mut recv, &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut at = 0;
                while at < n {
                    match std::future::poll_fn(|cx| relay.poll_write(cx, &buf[at..n])).await {
                        Ok(w) => at += w,
                        Err(_) => return,
                    }
                }
            }
            relay.close();
        }
    };
    // The client's side ends when the client finishes its stream or the connection ends,
    // which `end` brings about.
    let up = glommio::spawn_local(up);
    let mut buf = vec![0u8; RELAY_CHUNK];
    loop {
        let n = match std::future::poll_fn(|cx| relay.poll_read(cx, &mut buf)).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let written = futures_lite::AsyncWriteExt::write_all(&mut send, &buf[..n]).await;
        if written.is_err() || futures_lite::AsyncWriteExt::flush(&mut send).await.is_err() {
            relay.abort();
            break;
        }
    }
    if !relay.aborted.get() {
        let _ = futures_lite::AsyncWriteExt::close(&mut send).await;
    }
    drop(send);
    end.await;
    up.await;
}

/// [`run_relay_end`] for a QUIC connection.
pub async fn run_quic_end(relay: Rc<Relay>, send: SendStream, recv: RecvStream, conn: Connection) {
    let graceful = {
        let relay = relay.clone();
        move || !relay.aborted.get()
    };
    let end = async move {
        if graceful() {
            // Let the client read the end of the stream and close first (bounded), as a TCP
            // close drains; closing at once would discard what is still in flight.
            futures_lite::future::or(
                async {
                    conn.closed().await;
                },
                glommio::timer::sleep(std::time::Duration::from_millis(500)),
            )
            .await;
        }
        conn.close(VarInt::from_u32(0), b"");
    };
    run_relay_end(relay, recv, send, end).await;
}

/// [`run_relay_end`] for a TLS connection.
pub async fn run_tls_end(relay: Rc<Relay>, tls: TlsStream) {
    let fd = tls.get_ref().0.as_raw_fd();
    let (recv, send) = futures_lite::io::split(tls);
    let end = async move {
        // The socket is still owned by the halves (so the descriptor is open); shutting it down
        // makes the reading half see the end.
        crate::sys::shutdown_fd(fd, std::net::Shutdown::Both);
    };
    run_relay_end(relay, recv, send, end).await;
}
