//! A session's bounded outbound queue and its delivery state (live, syncing, lagging).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::task::{Poll, Waker};

use bytes::Bytes;

/// Whether live messages are pushed to a device right now.
#[derive(Debug)]
pub enum DeliveryState {
    /// Live messages are queued for the device as they are committed.
    Live,
    /// A sync is being sent; live messages wait here (bounded) and go out after SyncDone,
    /// minus those the sync already carried.
    Syncing {
        pending: Vec<(u64, u64, Bytes)>,
        /// Bytes in `pending`.
        pending_bytes: usize,
        overflow: bool,
    },
    /// The device fell behind: live messages are dropped until it syncs. `notified` says whether
    /// SyncNeeded was queued.
    Lagging { notified: bool, since_ms: u64 },
}

impl DeliveryState {
    fn lagging() -> DeliveryState {
        DeliveryState::Lagging {
            notified: false,
            since_ms: crate::core::now_ms(),
        }
    }
}

/// What became of a live delivery offered to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Queued for the writer, or not needed (already sent, held by a sync, lagging).
    Done,
    /// Queued without waking the writer: the core's flusher writes it ([`Outbound::flush`]).
    Flush,
    /// The device just became lagging.
    Lagging,
}

/// Frames waiting to be written to one connection.
///
/// Live deliveries are refused when `cap` frames or `cap_bytes` bytes are queued (the caller
/// then switches the session to lagging; an empty queue takes any frame); responses to the
/// client's own requests are always accepted, because the reader allows only a bounded number of
/// requests in flight. Holds no allocation when empty.
#[derive(Debug)]
pub struct Outbound {
    queue: RefCell<VecDeque<Bytes>>,
    /// Bytes in `queue`.
    bytes: Cell<usize>,
    cap: usize,
    cap_bytes: usize,
    writer: RefCell<Option<Waker>>,
    space: RefCell<Vec<Waker>>,
    closed: Cell<bool>,
    /// The session ends: waiting for room is over ([`Outbound::release`]).
    released: Cell<bool>,
    /// The last poll of [`Outbound::wait_ready`] found nothing to do (and none found work
    /// since): the writer is parked there, not in the middle of a write.
    waiting: Cell<bool>,
    /// The writer is asked to stop once nothing is queued (its connection parks).
    stopping: Cell<bool>,
    /// The writer took something to write since the idle sweep last looked.
    wrote: Cell<bool>,
    /// The plain TCP socket the writer writes to (-1: none, or not plain TCP). While the
    /// writer waits with nothing to do, the core's flusher writes live deliveries to it
    /// instead: one task for all of a core's connections rather than one wake-up each.
    direct: Cell<RawFd>,
    pub state: RefCell<DeliveryState>,
    /// Highest sequence sent per conversation (by sync or live push). A live delivery at or
    /// below it is a message the device already got through a sync: its Deliver was still
    /// crossing cores when the sync read the log.
    high: RefCell<Highs>,
}

/// Highest sequence sent per conversation. The conversation used last is kept inline, the others
/// in a map: a group fan-out offers one message to thousands of sessions, and reading each
/// session's map cost a cache miss per delivery. 0 means nothing sent. The map is boxed, and
/// made only once a second conversation is used: inline it would be part of every connection.
#[derive(Debug, Default)]
struct Highs {
    conv: u64,
    seq: u64,
    rest: Option<Box<crate::FastMap<u64, u64>>>,
}

impl Highs {
    /// The highest sequence sent in `conv`, made the inline entry.
    fn slot(&mut self, conv: u64) -> &mut u64 {
        if conv != self.conv {
            let rest = self.rest.get_or_insert_default();
            if self.seq > 0 {
                rest.insert(self.conv, self.seq);
            }
            self.seq = rest.remove(&conv).unwrap_or(0);
            self.conv = conv;
        }
        &mut self.seq
    }
}

impl Outbound {
    /// A queue bounded at `cap` frames and `cap_bytes` bytes (`outbound_queue_frames`,
    /// `outbound_queue_bytes`).
    pub fn new(cap: usize, cap_bytes: usize) -> Outbound {
        Outbound {
            queue: RefCell::new(VecDeque::new()),
            bytes: Cell::new(0),
            cap,
            cap_bytes,
            writer: RefCell::new(None),
            space: RefCell::new(Vec::new()),
            closed: Cell::new(false),
            released: Cell::new(false),
            waiting: Cell::new(false),
            stopping: Cell::new(false),
            wrote: Cell::new(false),
            direct: Cell::new(-1),
            state: RefCell::new(DeliveryState::Live),
            high: RefCell::default(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.queue.borrow().len()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.get()
    }

    /// Queues a response or control frame regardless of the bound.
    pub fn push(&self, frame: Bytes) {
        if self.closed.get() {
            return;
        }
        self.bytes.set(self.bytes.get() + frame.len());
        self.queue.borrow_mut().push_back(frame);
        self.wake_writer();
    }

    /// Whether a queue of `len` frames may take one more of `add` bytes within a share of its
    /// bounds: fewer than `frames` frames (at most `cap`), and at most the same share of
    /// `cap_bytes` bytes. An empty queue takes any frame.
    fn fits(&self, len: usize, frames: usize, add: usize) -> bool {
        let bytes = if frames >= self.cap {
            self.cap_bytes
        } else {
            (self.cap_bytes as u128 * frames as u128 / self.cap as u128) as usize
        };
        len == 0 || (len < frames.min(self.cap) && self.bytes.get() + add <= bytes)
    }

    /// Queues a frame if fewer than `bound` frames are queued and the bytes stay within the same
    /// share of the byte bound (room messages, which a full queue misses without the session
    /// becoming lagging; a live room's batch is one entry of many frames). Returns false if it
    /// was dropped.
    pub fn push_below(&self, frame: Bytes, bound: usize) -> bool {
        if self.closed.get() {
            return true;
        }
        let mut q = self.queue.borrow_mut();
        if !self.fits(q.len(), bound, frame.len()) {
            return false;
        }
        self.bytes.set(self.bytes.get() + frame.len());
        q.push_back(frame);
        drop(q);
        self.wake_writer();
        true
    }

    /// Whether [`Outbound::wait_room`] would return at once.
    pub fn has_room(&self) -> bool {
        self.closed.get()
            || self.released.get()
            || (self.queue.borrow().len() < self.cap && self.bytes.get() < self.cap_bytes)
    }

    /// Lets whoever waits for room go on, now and from now on: the session ends, and its
    /// writer may be gone with nothing left to drain the queue (they check that the session
    /// ends and stop).
    pub fn release(&self) {
        self.released.set(true);
        for w in self.space.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// Waits until fewer than `cap` frames and `cap_bytes` bytes are queued (or the session
    /// ends, [`Outbound::release`]). The reader calls it before each request, so a client that
    /// does not read its socket stops being read too; sync pages wait for it. Room messages never
    /// fill more than three quarters of the bytes, so they cannot hold either up.
    pub async fn wait_room(&self) {
        std::future::poll_fn(|cx| {
            if self.has_room() {
                Poll::Ready(())
            } else {
                self.space.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Waits until the queue has room for bulk output (sync pages), then queues `frame`.
    pub async fn push_wait(&self, frame: Bytes) {
        self.wait_room().await;
        self.push(frame);
    }

    /// Delivers a live message according to the delivery state.
    pub fn deliver(&self, conv: u64, seq: u64, frame: &Bytes, pending_cap: usize) -> Offered {
        let mut st = self.state.borrow_mut();
        match &mut *st {
            DeliveryState::Live => {
                let mut high = self.high.borrow_mut();
                let h = high.slot(conv);
                if seq <= *h {
                    return Offered::Done;
                }
                match self.queue_live(frame.clone()) {
                    Some(offered) => {
                        *h = seq;
                        offered
                    }
                    None => {
                        drop(high);
                        *st = DeliveryState::lagging();
                        self.wake_writer();
                        Offered::Lagging
                    }
                }
            }
            DeliveryState::Syncing {
                pending,
                pending_bytes,
                overflow,
            } => {
                if pending.is_empty()
                    || (pending.len() < pending_cap
                        && *pending_bytes + frame.len() <= self.cap_bytes)
                {
                    *pending_bytes += frame.len();
                    pending.push((conv, seq, frame.clone()));
                } else {
                    *overflow = true;
                }
                Offered::Done
            }
            DeliveryState::Lagging { .. } => Offered::Done,
        }
    }

    /// Queues a live delivery if there is room (None if not). While the writer waits for work on
    /// a plain TCP socket it is not woken: the first frame queued asks for the core's flusher.
    fn queue_live(&self, frame: Bytes) -> Option<Offered> {
        if self.closed.get() {
            return Some(Offered::Done);
        }
        let mut q = self.queue.borrow_mut();
        if !self.fits(q.len(), self.cap, frame.len()) {
            return None;
        }
        let first = q.is_empty();
        self.bytes.set(self.bytes.get() + frame.len());
        q.push_back(frame);
        drop(q);
        if self.direct.get() >= 0 && self.waiting.get() && !self.stopping.get() {
            return Some(if first { Offered::Flush } else { Offered::Done });
        }
        self.wake_writer();
        Some(Offered::Done)
    }

    /// For the core's flusher: writes what is queued (up to about `max` bytes, gathered in
    /// `buf` unless the first entry alone is that big) straight to the socket if the writer
    /// still waits for work, so that nothing of the connection is being written. What the
    /// socket does not take now goes back to the front of the queue, and the writer is woken
    /// for it (and for any error).
    pub fn flush(&self, buf: &mut Vec<u8>, max: usize) {
        if self.queue.borrow().is_empty() {
            return;
        }
        let fd = self.direct.get();
        if fd >= 0 && self.waiting.get() && !self.stopping.get() && !self.closed.get() {
            // As the writer does: a big entry (a live room's batch) is sent from where it is.
            let big = self.pop_large(max);
            let bytes: &[u8] = match &big {
                Some(b) => b,
                None => {
                    buf.clear();
                    self.drain_into(buf, max);
                    buf
                }
            };
            let sent = crate::sys::send_now(fd, bytes).unwrap_or(0);
            if sent < bytes.len() {
                let rest = match &big {
                    Some(b) => b.slice(sent..),
                    None => Bytes::copy_from_slice(&buf[sent..]),
                };
                self.bytes.set(self.bytes.get() + rest.len());
                self.queue.borrow_mut().push_front(rest);
            }
        }
        if !self.queue.borrow().is_empty() {
            self.wake_writer();
        }
    }

    /// For the writer: the plain TCP socket it writes to, or -1 (none, or the writer ends).
    pub fn set_direct(&self, fd: RawFd) {
        self.direct.set(fd);
    }

    /// Since when (ms since the epoch) live messages are dropped for this device, if they are.
    pub fn lagging_since(&self) -> Option<u64> {
        match &*self.state.borrow() {
            DeliveryState::Lagging { since_ms, .. } => Some(*since_ms),
            _ => None,
        }
    }

    pub fn begin_sync(&self) {
        *self.state.borrow_mut() = DeliveryState::Syncing {
            pending: Vec::new(),
            pending_bytes: 0,
            overflow: false,
        };
    }

    /// Ends a sync: pushes the live messages that arrived during it and that the sync did not
    /// already carry (bounded as they were held, so they are queued whatever the sync's pages
    /// still take), then goes live (or lagging, if too many arrived).
    pub fn end_sync(&self, synced_upto: &HashMap<u64, u64>) {
        let old = std::mem::replace(&mut *self.state.borrow_mut(), DeliveryState::Live);
        if let DeliveryState::Syncing {
            pending, overflow, ..
        } = old
        {
            {
                let mut high = self.high.borrow_mut();
                for (&conv, &upto) in synced_upto {
                    let h = high.slot(conv);
                    *h = (*h).max(upto);
                }
            }
            if overflow {
                *self.state.borrow_mut() = DeliveryState::lagging();
                self.wake_writer();
                return;
            }
            for (conv, seq, frame) in pending {
                if seq <= *self.high.borrow_mut().slot(conv) {
                    continue;
                }
                self.push(frame);
                *self.high.borrow_mut().slot(conv) = seq;
            }
        }
    }

    /// For the writer: true if SyncNeeded should be sent now (lagging, not yet told, and the
    /// queue has drained).
    pub fn take_sync_needed(&self) -> bool {
        if !self.queue.borrow().is_empty() {
            return false;
        }
        let mut st = self.state.borrow_mut();
        if let DeliveryState::Lagging { notified, .. } = &mut *st
            && !*notified
        {
            *notified = true;
            return true;
        }
        false
    }

    /// For the writer: moves queued frames into `buf` up to about `max` bytes. Returns false if
    /// nothing was queued.
    pub fn drain_into(&self, buf: &mut Vec<u8>, max: usize) -> bool {
        let mut q = self.queue.borrow_mut();
        if q.is_empty() {
            return false;
        }
        while let Some(f) = q.front() {
            if !buf.is_empty() && buf.len() + f.len() > max {
                break;
            }
            buf.extend_from_slice(f);
            self.bytes.set(self.bytes.get() - f.len());
            q.pop_front();
        }
        if q.is_empty() && q.capacity() > 64 {
            *q = VecDeque::new();
        }
        drop(q);
        self.wrote.set(true);
        for w in self.space.borrow_mut().drain(..) {
            w.wake();
        }
        true
    }

    /// Whether the writer took something to write since the last call (the idle sweep's: a
    /// connection that only receives is not idle).
    pub fn take_wrote(&self) -> bool {
        self.wrote.replace(false)
    }

    /// Frees the buffers of an empty queue. The core's idle sweep calls it, so an idle
    /// connection keeps none, and a busy one allocates them again at most once a sweep.
    pub fn release_if_empty(&self) {
        let mut q = self.queue.borrow_mut();
        if q.is_empty() && q.capacity() > 0 {
            *q = VecDeque::new();
        }
        let mut space = self.space.borrow_mut();
        if space.is_empty() && space.capacity() > 0 {
            *space = Vec::new();
        }
    }

    /// For the writer: takes the first queued frame if it is at least `min` bytes long, to be
    /// written without a copy.
    pub fn pop_large(&self, min: usize) -> Option<Bytes> {
        let mut q = self.queue.borrow_mut();
        if q.front().is_none_or(|f| f.len() < min) {
            return None;
        }
        let frame = q.pop_front();
        drop(q);
        if let Some(f) = &frame {
            self.bytes.set(self.bytes.get() - f.len());
            self.wrote.set(true);
        }
        for w in self.space.borrow_mut().drain(..) {
            w.wake();
        }
        frame
    }

    /// Whether the writer waits for work with nothing queued and nothing owed (no sync in
    /// progress, no SyncNeeded to send): ending it now cuts no write short.
    pub fn writer_idle(&self) -> bool {
        self.queue.borrow().is_empty()
            && self.waiting.get()
            && !self.closed.get()
            && matches!(
                *self.state.borrow(),
                DeliveryState::Live | DeliveryState::Lagging { notified: true, .. }
            )
    }

    /// Asks the writer to stop once it has written what is queued (`true`), or lets a new
    /// writer run (`false`). The writer's task then ends by itself: its connection parks.
    pub fn stop_writer(&self, stop: bool) {
        self.stopping.set(stop);
        if stop {
            self.wake_writer();
        }
    }

    /// For the writer: whether to stop now (nothing queued, and asked to).
    pub fn writer_stops(&self) -> bool {
        self.stopping.get() && self.queue.borrow().is_empty()
    }

    /// For the writer: waits for something to write (or close, or stop).
    pub async fn wait_ready(&self) {
        std::future::poll_fn(|cx| {
            let ready = self.closed.get()
                || self.stopping.get()
                || !self.queue.borrow().is_empty()
                || matches!(
                    *self.state.borrow(),
                    DeliveryState::Lagging {
                        notified: false,
                        ..
                    }
                );
            self.waiting.set(!ready);
            if ready {
                return Poll::Ready(());
            }
            *self.writer.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Closes the queue: the writer flushes what is queued and stops.
    pub fn close(&self) {
        self.closed.set(true);
        self.wake_writer();
        for w in self.space.borrow_mut().drain(..) {
            w.wake();
        }
    }

    fn wake_writer(&self) {
        if let Some(w) = self.writer.borrow_mut().take() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(n: u8) -> Bytes {
        Bytes::from(vec![n])
    }

    /// Records that the writer was woken.
    #[derive(Default)]
    struct Woken(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Woken {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Woken {
        fn get(&self) -> bool {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// Puts `o`'s writer where the writer task waits for work, with a waker that records
    /// being woken.
    fn writer_waits(o: &Outbound) -> std::sync::Arc<Woken> {
        let woken = std::sync::Arc::new(Woken::default());
        let waker = Waker::from(woken.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let mut wait = std::pin::pin!(o.wait_ready());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        woken
    }

    /// A socket pair that keeps each send a record of its own: one read returns what one send
    /// sent, so the tests see how the flusher grouped its writes.
    fn record_pair() -> (socket2::Socket, socket2::Socket) {
        use socket2::{Domain, Socket, Type};
        let (ours, peer) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        peer.set_nonblocking(true).unwrap();
        (ours, peer)
    }

    /// The next record the peer received, or None if there is none.
    fn next_record(peer: &socket2::Socket) -> Option<Vec<u8>> {
        let mut buf = [0u8; 256];
        match std::io::Read::read(&mut &*peer, &mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("reading the peer: {e}"),
        }
    }

    /// A queue whose writer waits for work, lent our end of a record socket pair; with both
    /// ends (ours must stay open while the queue is used) and the writer's wake record.
    fn waiting_on_records() -> (
        Outbound,
        socket2::Socket,
        socket2::Socket,
        std::sync::Arc<Woken>,
    ) {
        let (ours, peer) = record_pair();
        let o = Outbound::new(100, 1 << 20);
        o.set_direct(std::os::fd::AsRawFd::as_raw_fd(&ours));
        let woken = writer_waits(&o);
        (o, ours, peer, woken)
    }

    #[test]
    fn flusher_sends_what_was_queued_for_a_waiting_writer_in_one_send() {
        let (o, _ours, peer, woken) = waiting_on_records();
        assert_eq!(o.deliver(1, 1, &b(1), 10), Offered::Flush);
        assert_eq!(o.deliver(1, 2, &b(2), 10), Offered::Done);
        assert_eq!(o.deliver(2, 1, &b(3), 10), Offered::Done);
        assert_eq!(o.len(), 3);
        let mut buf = Vec::new();
        o.flush(&mut buf, 1 << 16);
        assert_eq!(o.len(), 0);
        assert!(!woken.get(), "the writer had nothing left to do");
        assert!(o.take_wrote(), "the idle sweep sees the connection busy");
        assert_eq!(next_record(&peer), Some(vec![1, 2, 3]));
        assert_eq!(next_record(&peer), None);
        // The next delivery asks for the flusher again; one already sent is not queued.
        assert_eq!(o.deliver(1, 2, &b(2), 10), Offered::Done);
        assert_eq!(o.deliver(1, 3, &b(4), 10), Offered::Flush);
    }

    #[test]
    fn a_flush_sends_at_most_max_bytes_and_leaves_the_rest_to_the_writer() {
        let (o, _ours, peer, woken) = waiting_on_records();
        for (seq, n) in [(1, 1u8), (2, 2), (3, 3)] {
            o.deliver(1, seq, &Bytes::from(vec![n; 40]), 10);
        }
        o.flush(&mut Vec::new(), 100);
        let mut first = vec![1; 40];
        first.extend_from_slice(&[2; 40]);
        assert_eq!(next_record(&peer), Some(first));
        assert_eq!(next_record(&peer), None);
        assert!(woken.get(), "the writer takes the rest");
        let mut rest = Vec::new();
        assert!(o.drain_into(&mut rest, 1 << 16));
        assert_eq!(rest, vec![3; 40]);
    }

    #[test]
    fn flusher_leaves_the_queue_of_a_stopping_or_closed_writer_to_it() {
        use std::os::fd::AsRawFd;
        let (ours, peer) = record_pair();
        let stopping = Outbound::new(100, 1 << 20);
        let closed = Outbound::new(100, 1 << 20);
        for o in [&stopping, &closed] {
            o.set_direct(ours.as_raw_fd());
            writer_waits(o);
            assert_eq!(o.deliver(1, 1, &b(1), 10), Offered::Flush);
        }
        // The writer writes what is queued before it stops (the connection parks) or closes.
        stopping.stop_writer(true);
        closed.close();
        for o in [&stopping, &closed] {
            o.flush(&mut Vec::new(), 1 << 16);
            assert_eq!(o.len(), 1);
        }
        assert_eq!(next_record(&peer), None);
    }

    #[test]
    fn writer_is_woken_without_a_direct_socket_or_while_it_writes() {
        let o = Outbound::new(100, 1 << 20);
        let woken = writer_waits(&o);
        assert_eq!(o.deliver(1, 1, &b(1), 10), Offered::Done);
        assert!(woken.get());

        let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let o = Outbound::new(100, 1 << 20);
        o.set_direct(std::os::fd::AsRawFd::as_raw_fd(&ours));
        let woken = writer_waits(&o);
        // A response wakes the writer, which takes it to write.
        o.push(b(0));
        assert!(woken.get());
        let ready = futures_lite::future::poll_once(o.wait_ready());
        assert!(futures_lite::future::block_on(ready).is_some());
        assert!(o.drain_into(&mut Vec::new(), 1 << 16));
        // While that write is under way, a delivery is left to the writer, not sent beside it.
        assert_eq!(o.deliver(1, 1, &b(1), 10), Offered::Done);
        o.flush(&mut Vec::new(), 1 << 16);
        assert_eq!(o.len(), 1);
        peer.set_nonblocking(true).unwrap();
        let e = std::io::Read::read(&mut peer, &mut [0u8; 8]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    }

    #[test]
    fn what_a_full_socket_does_not_take_goes_back_first_in_line() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let (mut ours, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        for size in [4096, 1] {
            let chunk = vec![0u8; size];
            loop {
                match ours.write(&chunk) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("filling the socket: {e}"),
                }
            }
        }
        let o = Outbound::new(100, 1 << 20);
        o.set_direct(ours.as_raw_fd());
        let woken = writer_waits(&o);
        assert_eq!(
            o.deliver(1, 1, &Bytes::from(vec![7; 100]), 10),
            Offered::Flush
        );
        assert_eq!(o.deliver(1, 2, &b(8), 10), Offered::Done);
        // The flush takes the first frame only (100 bytes), which the socket refuses: it goes
        // back ahead of the second.
        o.flush(&mut Vec::new(), 100);
        assert!(woken.get(), "the writer waits for room");
        assert_eq!(o.deliver(1, 3, &b(9), 10), Offered::Done);
        let mut rest = Vec::new();
        assert!(o.drain_into(&mut rest, 1 << 16));
        let mut want = vec![7; 100];
        want.extend_from_slice(&[8, 9]);
        assert_eq!(rest, want);
    }

    #[test]
    fn live_overflow_turns_lagging_and_drops() {
        let o = Outbound::new(2, 1 << 20);
        assert_eq!(o.deliver(1, 1, &b(1), 10), Offered::Done);
        assert_eq!(o.deliver(1, 2, &b(2), 10), Offered::Done);
        assert_eq!(o.deliver(1, 3, &b(3), 10), Offered::Lagging);
        assert_eq!(o.deliver(1, 4, &b(4), 10), Offered::Done);
        assert_eq!(o.len(), 2);
        assert!(!o.take_sync_needed(), "only once the queue drained");
        let mut buf = Vec::new();
        assert!(o.drain_into(&mut buf, 1 << 16));
        assert_eq!(buf, vec![1, 2]);
        assert!(o.take_sync_needed());
        assert!(!o.take_sync_needed());
    }

    #[test]
    fn sync_holds_live_and_skips_what_sync_carried() {
        let o = Outbound::new(100, 1 << 20);
        o.begin_sync();
        o.deliver(7, 5, &b(5), 10);
        o.deliver(7, 6, &b(6), 10);
        o.deliver(8, 1, &b(81), 10);
        assert_eq!(o.len(), 0);
        let upto = HashMap::from([(7u64, 5u64)]);
        o.end_sync(&upto);
        let mut buf = Vec::new();
        o.drain_into(&mut buf, 1 << 16);
        assert_eq!(buf, vec![6, 81]);
        assert!(matches!(*o.state.borrow(), DeliveryState::Live));
    }

    #[test]
    fn late_live_copy_of_a_synced_message_is_dropped() {
        let o = Outbound::new(100, 1 << 20);
        o.begin_sync();
        o.end_sync(&HashMap::from([(7u64, 5u64)]));
        // seq 5 was read by the sync while its Deliver was still in flight.
        o.deliver(7, 5, &b(5), 10);
        o.deliver(7, 6, &b(6), 10);
        o.deliver(7, 6, &b(6), 10);
        let mut buf = Vec::new();
        o.drain_into(&mut buf, 1 << 16);
        assert_eq!(buf, vec![6]);
    }

    #[test]
    fn sync_pending_overflow_lags() {
        let o = Outbound::new(100, 1 << 20);
        o.begin_sync();
        for s in 1..=3 {
            o.deliver(1, s, &b(s as u8), 2);
        }
        o.end_sync(&HashMap::new());
        assert!(o.lagging_since().is_some());
        assert!(o.take_sync_needed());
    }

    #[test]
    fn highs_keep_every_conversation_across_switches() {
        let mut h = Highs::default();
        *h.slot(0) = 3;
        assert!(h.rest.is_none(), "one conversation needs no map");
        *h.slot(0) = 0;
        *h.slot(7) = 5;
        *h.slot(9) = 2;
        assert_eq!(*h.slot(7), 5);
        assert_eq!(*h.slot(9), 2);
        assert_eq!(*h.slot(11), 0);
        assert_eq!(*h.slot(0), 0);
        assert_eq!(
            h.rest.as_ref().map_or(0, |r| r.len()),
            2,
            "conversations with nothing sent are not stored"
        );
        assert_eq!(*h.slot(7), 5);
        assert_eq!(*h.slot(9), 2);
    }

    #[test]
    fn only_a_large_first_frame_is_taken_whole() {
        let out = Outbound::new(16, 1 << 20);
        assert_eq!(out.pop_large(4), None);
        out.push(b(1));
        out.push(Bytes::from(vec![2; 4]));
        assert_eq!(out.pop_large(4), None, "the first frame is small");
        let mut buf = Vec::new();
        assert!(out.drain_into(&mut buf, 1));
        assert_eq!(buf, [1]);
        assert_eq!(out.pop_large(4), Some(Bytes::from(vec![2; 4])));
        assert_eq!(out.len(), 0);
    }

    #[test]
    fn the_writer_is_idle_only_while_it_waits_at_an_empty_queue() {
        use std::future::Future;
        let out = Outbound::new(4, 1 << 20);
        let mut cx = std::task::Context::from_waker(Waker::noop());
        assert!(!out.writer_idle(), "a writer that never waited");
        let mut wait = Box::pin(out.wait_ready());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        assert!(out.writer_idle());
        out.push(b(1));
        assert!(!out.writer_idle(), "something is queued");
        assert!(wait.as_mut().poll(&mut cx).is_ready());
        let mut buf = Vec::new();
        out.drain_into(&mut buf, 1 << 20);
        assert!(!out.writer_idle(), "writing what it took");
        let mut wait = Box::pin(out.wait_ready());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        assert!(out.writer_idle());
        out.begin_sync();
        assert!(!out.writer_idle(), "a sync is in progress");
    }

    #[test]
    fn a_stopped_writer_writes_what_is_queued_first() {
        use std::future::Future;
        let out = Outbound::new(4, 1 << 20);
        let mut cx = std::task::Context::from_waker(Waker::noop());
        let mut wait = Box::pin(out.wait_ready());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        out.push(b(1));
        out.stop_writer(true);
        assert!(wait.as_mut().poll(&mut cx).is_ready());
        assert!(!out.writer_stops(), "a frame is still queued");
        let mut buf = Vec::new();
        assert!(out.drain_into(&mut buf, 1 << 20));
        assert_eq!(buf, [1]);
        assert!(out.writer_stops());
        assert!(out.take_wrote());
        assert!(!out.take_wrote(), "reported once");
        out.stop_writer(false);
        let mut wait = Box::pin(out.wait_ready());
        assert!(
            wait.as_mut().poll(&mut cx).is_pending(),
            "a new writer waits again"
        );
        assert!(!out.writer_stops());
    }

    #[test]
    fn an_empty_queue_gives_its_buffer_back() {
        let out = Outbound::new(16, 1 << 20);
        out.push(b(1));
        out.release_if_empty();
        assert!(out.queue.borrow().capacity() > 0, "a queued frame keeps it");
        let mut buf = Vec::new();
        assert!(out.drain_into(&mut buf, usize::MAX));
        assert!(out.queue.borrow().capacity() > 0);
        out.release_if_empty();
        assert_eq!(out.queue.borrow().capacity(), 0);
        out.push(b(2));
        buf.clear();
        assert!(out.drain_into(&mut buf, usize::MAX));
        assert_eq!(buf, [2]);
    }

    #[test]
    fn a_byte_bound_counts_what_is_queued() {
        // 16 frames and 20 bytes: a bound of 8 frames is half of each, 10 bytes.
        let out = Outbound::new(16, 20);
        let big = |n: u8| Bytes::from(vec![n; 6]);
        assert!(out.push_below(big(1), 8), "an empty queue takes any frame");
        assert!(!out.push_below(big(2), 8), "6 + 6 bytes is over 10");
        out.push(b(3));
        assert_eq!(out.bytes.get(), 7);
        assert!(out.push_below(b(4), 8));
        assert!(out.push_below(b(5), 8));
        assert!(out.push_below(b(6), 8));
        assert!(!out.push_below(b(7), 8), "10 bytes are queued");
        assert!(out.push_below(b(7), 16), "the whole bound is 20 bytes");
        assert_eq!(out.pop_large(6), Some(big(1)));
        let mut buf = Vec::new();
        assert!(out.drain_into(&mut buf, usize::MAX));
        assert_eq!(buf, [3, 4, 5, 6, 7]);
        assert_eq!(out.bytes.get(), 0);
        assert!(out.push_below(Bytes::from(vec![8; 30]), 8));
    }

    #[test]
    fn live_deliveries_stop_at_the_byte_bound() {
        let out = Outbound::new(100, 10);
        let big = |n: u8| Bytes::from(vec![n; 30]);
        assert_eq!(
            out.deliver(1, 1, &big(1), 100),
            Offered::Done,
            "an empty queue takes it"
        );
        assert!(!out.has_room(), "30 bytes are over the bound of 10");
        assert_eq!(out.deliver(1, 2, &b(2), 100), Offered::Lagging);
        assert!(out.lagging_since().is_some());
        let mut buf = Vec::new();
        assert!(out.drain_into(&mut buf, usize::MAX));
        assert_eq!(buf, vec![1; 30]);
        assert!(out.has_room());
        assert!(out.take_sync_needed());

        let out = Outbound::new(100, 10);
        for seq in 1..=10 {
            assert_eq!(out.deliver(1, seq, &b(seq as u8), 100), Offered::Done);
        }
        assert!(!out.has_room(), "10 bytes queued");
        assert_eq!(out.deliver(1, 11, &b(11), 100), Offered::Lagging);
    }

    #[test]
    fn live_messages_held_by_a_sync_are_queued_after_its_pages() {
        let out = Outbound::new(100, 40);
        out.begin_sync();
        for seq in 5..=7 {
            assert_eq!(
                out.deliver(1, seq, &b(seq as u8), 100),
                Offered::Done,
                "held"
            );
        }
        // The sync's pages: each waits for room, below the byte bound.
        out.push(Bytes::from(vec![0; 19]));
        assert!(out.has_room());
        out.push(Bytes::from(vec![0; 21]));
        assert!(!out.has_room(), "40 bytes queued");
        out.end_sync(&HashMap::new());
        assert!(
            out.lagging_since().is_none(),
            "all three held messages are queued"
        );
        assert_eq!(out.deliver(1, 8, &b(8), 100), Offered::Lagging, "44 bytes");
        let mut buf = Vec::new();
        assert!(out.drain_into(&mut buf, usize::MAX));
        assert_eq!(buf[40..], [5, 6, 7]);
    }

    #[test]
    fn a_released_queue_lets_waiters_go() {
        use std::future::Future;
        let out = Outbound::new(100, 10);
        out.push(Bytes::from(vec![0; 10]));
        let mut cx = std::task::Context::from_waker(Waker::noop());
        let mut wait = Box::pin(out.wait_room());
        assert!(wait.as_mut().poll(&mut cx).is_pending(), "full");
        out.release();
        assert!(wait.as_mut().poll(&mut cx).is_ready());
        assert!(out.has_room());
    }

    #[test]
    fn sync_pending_overflows_at_the_byte_bound() {
        let out = Outbound::new(100, 10);
        out.begin_sync();
        for seq in 1..=10 {
            out.deliver(1, seq, &b(seq as u8), 100);
        }
        out.end_sync(&HashMap::new());
        assert!(out.lagging_since().is_none(), "10 bytes fit");
        let mut buf = Vec::new();
        assert!(out.drain_into(&mut buf, usize::MAX));
        assert_eq!(buf, (1..=10).collect::<Vec<u8>>());

        out.begin_sync();
        for seq in 11..=21 {
            out.deliver(1, seq, &b(seq as u8), 100);
        }
        out.end_sync(&HashMap::new());
        assert!(out.lagging_since().is_some(), "11 bytes do not");
        assert!(out.take_sync_needed());
    }
}
