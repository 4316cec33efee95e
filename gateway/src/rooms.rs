//! Live chat rooms: anyone may enter, no member limit, nothing written to disk.
//!
//! A room lives only in memory, per server run:
//!
//! * Each core indexes the connections that entered a room ([`LocalRooms`]); entering and leaving
//!   touch only the connection's own core, and a closed connection leaves its rooms.
//! * A room is owned by the core of its conversation id ([`Router::conversation`]). That core
//!   numbers the room's messages (for order and de-duplication; the numbering starts again when
//!   the server restarts), remembers the last [`RECENT_IDS`] client message ids of the room so a
//!   retried or dual-channel Send is answered with the first's seq instead of being sent twice,
//!   and fans each message out once per core ([`ShardMsg::RoomDeliver`]).
//! * Each core pushes a room message to its viewers' queues without ever making them lag or
//!   grow: a viewer whose queue holds half its bounds (`outbound_queue_frames` frames,
//!   `outbound_queue_bytes` bytes) misses ordinary room messages, and priority ones (gifts,
//!   notices) once it holds three quarters. Room
//!   messages never cause `SyncNeeded`, and a busy room always leaves a quarter of each queue
//!   to the viewer's own messages, which are never dropped.
//! * A big room (at least `room_batch_viewers` viewers on a core) is written in batches on that
//!   core ([`Held`]): its messages wait on the core, and each flush gives every viewer one
//!   buffer with all of them (shared by the viewers, except the senders, whose own messages are
//!   left out), so a viewer costs one queue entry and one socket write per flush whatever the
//!   message rate. A socket write costs about as much as everything else a delivery does many
//!   times over, so this is what keeps a busy room from taking the cores from other traffic.
//!   Flushes are spaced by at least `room_batch_ms`, and by as long as writing to that many
//!   viewers takes at `room_writes_per_sec` (a per-core budget), up to [`MAX_SPACING`]: a quiet
//!   room's message goes out at once, a room of 9,000 viewers on a core is flushed about once a
//!   second under the default budget, and a bigger one less often, never costing the core more
//!   writes. A room that falls below the threshold keeps holding until its held messages are
//!   flushed, so that none is overtaken. Held
//!   messages are bounded like a queue: ordinary ones are dropped for everyone once a room
//!   holds half of `outbound_queue_frames` frames or [`HELD_BYTES`], priority ones at three
//!   quarters or twice the bytes; and a viewer's queue takes a batch (one entry) only within
//!   the same share of its byte bound, so a viewer that does not read misses batches until it
//!   has read them.
//!
//! * Each core keeps the latest messages of each room ([`RoomHistory`]; every core gets every
//!   room message) for viewers who ask for some when they enter: they come back in the answer,
//!   read in the same step that adds the viewer, so that none of them is also pushed to that
//!   connection; the messages a big room holds on the core are left out, since its next flush
//!   gives them to the new viewer too.
//!
//! Rooms have no stored history, no unread counts and never appear in sync.
//!
//! [`Router::conversation`]: crate::route::Router::conversation

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_protocol::v1::{Deliver, Frame, SendAck, Target, TargetKind};
use xxhash_rust::xxh3::xxh3_64;

use crate::core::{Core, ReplyTo, SessionHandle, ShardMsg, now_ms};

/// Client message ids a room's owner remembers for de-duplication.
pub const RECENT_IDS: usize = 1024;
/// Rooms one connection may be in at once.
pub const MAX_ROOMS_PER_CONNECTION: usize = 16;

const ROOM_BIT: u64 = 1 << 62;

/// The conversation id of room `name`: bit 62 set and bit 63 clear, which no 1:1 conversation
/// (below 2^62) or group conversation (bit 63) has. A 62-bit hash of the name: two names that
/// collide share a room.
pub fn room_conversation(name: &str) -> u64 {
    ROOM_BIT | (xxh3_64(name.as_bytes()) & (ROOM_BIT - 1))
}

/// Whether `conv` is a room's conversation id.
pub fn is_room(conv: u64) -> bool {
    conv & (3 << 62) == ROOM_BIT
}

/// A message on its way to the room's owner core.
#[derive(Debug)]
pub struct RoomSend {
    pub room: u64,
    pub name: Arc<str>,
    pub sender_name: Arc<str>,
    pub client_msg_id: String,
    pub content_type: u32,
    pub custom_type: String,
    pub payload: Bytes,
    pub priority: bool,
    pub reply: ReplyTo,
}

/// The owner core's state of one room.
#[derive(Debug, Default)]
pub struct RoomOwned {
    seq: u64,
    /// (hash of sender and client message id, seq, time), oldest first.
    recent: VecDeque<(u64, u64, u64)>,
}

/// The connections of this core in one room, in no particular order, with each one's place in
/// the list and how many connections of each logical session are in it: entering, leaving and
/// checking whether a session is in the room cost the same however big the room is (a room of
/// 19,000 viewers that all leave at once would otherwise cost the core 180 million steps).
#[derive(Debug, Default)]
pub struct Viewers {
    list: Vec<Rc<SessionHandle>>,
    /// Connection id -> its index in `list`.
    at: crate::FastMap<u64, usize>,
    /// Logical session id -> its connections in the room (a dual-channel session has two).
    logical: crate::FastMap<u64, u32>,
}

impl Viewers {
    /// Adds a connection (not in the room yet).
    fn add(&mut self, session: Rc<SessionHandle>) {
        self.at.insert(session.id, self.list.len());
        *self.logical.entry(session.logical).or_default() += 1;
        self.list.push(session);
    }

    /// Removes connection `id` if it is in the room.
    fn remove(&mut self, id: u64) {
        let Some(i) = self.at.remove(&id) else {
            return;
        };
        let gone = self.list.swap_remove(i);
        if let Some(moved) = self.list.get(i) {
            self.at.insert(moved.id, i);
        }
        match self.logical.get_mut(&gone.logical) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                self.logical.remove(&gone.logical);
            }
        }
    }

    fn has_logical(&self, logical: u64) -> bool {
        self.logical.contains_key(&logical)
    }

    fn as_slice(&self) -> &[Rc<SessionHandle>] {
        &self.list
    }

    fn len(&self) -> usize {
        self.list.len()
    }

    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// The connections of this core in each room.
#[derive(Debug, Default)]
pub struct LocalRooms {
    viewers: crate::FastMap<u64, Viewers>,
    /// The rooms' latest messages, for viewers entering.
    history: RoomHistory,
    /// Big rooms' messages waiting for the next batch flush, by room.
    held: crate::FastMap<u64, Held>,
    /// The batch flush task, while it waits for a room to hold something.
    flush_waker: Option<Waker>,
}

/// The longest wait between two flushes of big rooms on a core, however many viewers they
/// have (the write budget is exceeded rather than holding messages longer).
pub const MAX_SPACING: Duration = Duration::from_secs(10);

/// Bytes of ordinary messages one big room holds on a core between two flushes (priority
/// messages: twice this); more are dropped, as a full queue drops them.
pub const HELD_BYTES: usize = 1 << 20;

/// How many frames a viewer's queue (or a big room's held messages) may hold for another room
/// message to be added: half of `outbound_queue_frames` (`cap`), three quarters for priority
/// messages; the last quarter is left to the viewer's own messages. A viewer's queue applies the
/// same share to its byte bound ([`Outbound::push_below`](crate::outbound::Outbound::push_below)).
fn room_bound(cap: usize, priority: bool) -> usize {
    if priority { cap * 3 / 4 } else { cap / 2 }
}

/// A big room's messages held on a core until its next flush, oldest first.
#[derive(Debug, Default)]
pub struct Held {
    /// (encoded Deliver frame, its sender's logical session, priority).
    frames: Vec<(Bytes, u64, bool)>,
    bytes: usize,
    /// The lowest seq held, 0 if the room's numbering started again while it held messages:
    /// a viewer entering then gets none of the room's kept messages ([`Core::room_recent`]).
    first_seq: u64,
    /// The seq of the last message held.
    last_seq: u64,
}

impl Held {
    /// Holds a frame unless the room holds too much already (see [`HELD_BYTES`]; a first
    /// frame is always held); `cap` is `outbound_queue_frames`. Returns false if it was
    /// dropped.
    fn hold(&mut self, frame: Bytes, seq: u64, sender: u64, priority: bool, cap: usize) -> bool {
        let frames = room_bound(cap, priority);
        let bytes = if priority { 2 * HELD_BYTES } else { HELD_BYTES };
        // The first frame is always held, however big (up to `max_frame_bytes`).
        if !self.frames.is_empty()
            && (self.frames.len() >= frames || self.bytes + frame.len() > bytes)
        {
            return false;
        }
        if self.frames.is_empty() {
            self.first_seq = seq;
        } else if seq <= self.last_seq {
            self.first_seq = 0;
        }
        self.last_seq = seq;
        self.bytes += frame.len();
        self.frames.push((frame, sender, priority));
        true
    }

    /// What the viewer of logical session `viewer` (None: a viewer that sent none of them) gets:
    /// the held frames, or only the priority ones, without its own, in one buffer; and how many
    /// frames that is.
    fn for_viewer(&self, viewer: Option<u64>, priority_only: bool) -> (Bytes, u64) {
        let mut out = Vec::new();
        let mut n = 0;
        for (frame, sender, priority) in &self.frames {
            if Some(*sender) == viewer || (priority_only && !priority) {
                continue;
            }
            out.extend_from_slice(frame);
            n += 1;
        }
        (Bytes::from(out), n)
    }
}

/// What [`RoomHistory`] keeps: per room, per core and how long.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    /// Messages per room (`room_history_messages`); 0 keeps none.
    pub messages: usize,
    /// Age of the oldest kept, in milliseconds (`room_history_secs`).
    pub max_age_ms: u64,
    /// Bytes over all rooms on the core (`room_history_bytes`).
    pub bytes: usize,
}

/// The latest messages of each room, for viewers who ask for them when they enter
/// (`EnterRoom.recent`). Every core keeps its own (each gets every room message), so entering
/// reads only the core's memory, in the same step that adds the viewer: a message kept then is
/// not pushed to the viewer afterwards.
///
/// Bounded three ways ([`HistoryLimits`]): messages per room, their age, and bytes over all rooms
/// on the core, the oldest message of the core going first. The bytes are the messages'
/// encoding plus their bookkeeping ([`weight`]); the payloads are shared by the cores.
#[derive(Debug, Default)]
pub struct RoomHistory {
    /// Per room, its messages (oldest first) with their [`weight`].
    rooms: crate::FastMap<u64, VecDeque<(Arc<Deliver>, usize)>>,
    /// (room, seq) of each message kept, oldest first over all rooms. An entry whose message a
    /// room's own bound dropped already is skipped when it comes first, and such entries are
    /// removed once they are as many as the kept ones.
    order: VecDeque<(u64, u64)>,
    kept: usize,
    bytes: usize,
}

/// The memory a kept message stands for: its encoding (payload and strings), the message
/// itself, and the entries that point at it.
fn weight(message: &Deliver) -> usize {
    use prost::Message;
    message.encoded_len() + std::mem::size_of::<Deliver>() + 64
}

impl RoomHistory {
    /// Keeps `message` of `room`, then drops what the limits no longer allow (`now_ms`: the
    /// server's clock, against the messages' `server_time_ms`).
    pub fn keep(&mut self, room: u64, message: &Arc<Deliver>, limits: &HistoryLimits, now_ms: u64) {
        if limits.messages == 0 {
            return;
        }
        let ring = self.rooms.entry(room).or_default();
        if ring.back().is_some_and(|(last, _)| last.seq >= message.seq) {
            // The owner numbers the room afresh (it forgot it): the old numbers mean nothing.
            self.kept -= ring.len();
            self.bytes -= ring.iter().map(|(_, w)| w).sum::<usize>();
            ring.clear();
        }
        let w = weight(message);
        ring.push_back((message.clone(), w));
        self.kept += 1;
        self.bytes += w;
        self.order.push_back((room, message.seq));
        while ring.len() > limits.messages {
            let (_, w) = ring.pop_front().expect("longer than the bound");
            self.kept -= 1;
            self.bytes -= w;
        }
        self.expire(limits, now_ms);
        if self.order.len() > 2 * self.kept + 1024 {
            let rooms = &self.rooms;
            self.order.retain(|(room, seq)| {
                rooms.get(room).is_some_and(|ring| {
                    ring.front().is_some_and(|(m, _)| m.seq <= *seq)
                        && ring.back().is_some_and(|(m, _)| *seq <= m.seq)
                })
            });
        }
    }

    /// Drops the core's oldest messages while they are too old or the core keeps too many
    /// bytes, and the entries of messages dropped already that come first.
    fn expire(&mut self, limits: &HistoryLimits, now_ms: u64) {
        while let Some(&(room, seq)) = self.order.front() {
            let mut emptied = false;
            if let Some(ring) = self.rooms.get_mut(&room)
                && let Some((first, w)) = ring.front()
                && first.seq == seq
            {
                let w = *w;
                let old = now_ms.saturating_sub(first.server_time_ms) > limits.max_age_ms;
                if !old && self.bytes <= limits.bytes {
                    return;
                }
                self.bytes -= w;
                self.kept -= 1;
                ring.pop_front();
                emptied = ring.is_empty();
            }
            if emptied {
                self.rooms.remove(&room);
            }
            self.order.pop_front();
        }
    }

    /// The latest `n` messages of `room` (oldest first) numbered below `below` and not older than
    /// the age limit.
    pub fn recent(
        &self,
        room: u64,
        n: usize,
        below: u64,
        limits: &HistoryLimits,
        now_ms: u64,
    ) -> Vec<Arc<Deliver>> {
        let Some(ring) = self.rooms.get(&room) else {
            return Vec::new();
        };
        let mut out: Vec<Arc<Deliver>> = ring
            .iter()
            .rev()
            .map(|(m, _)| m)
            .filter(|m| m.seq < below)
            .take_while(|m| now_ms.saturating_sub(m.server_time_ms) <= limits.max_age_ms)
            .take(n)
            .cloned()
            .collect();
        out.reverse();
        out
    }

    /// Messages kept on this core, and their bytes (as counted against the limit).
    pub fn size(&self) -> (usize, usize) {
        (self.kept, self.bytes)
    }
}

impl LocalRooms {
    /// Number of this core's connections in `room`.
    pub fn viewers(&self, room: u64) -> usize {
        self.viewers.get(&room).map_or(0, Viewers::len)
    }
}

/// What [`Core::enter_room`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entered {
    /// The connection is in the room from now on.
    Now,
    /// It was in the room already.
    Already,
    /// It is in [`MAX_ROOMS_PER_CONNECTION`] rooms already.
    TooMany,
}

impl Core {
    /// Adds `session` to `room`.
    pub fn enter_room(&self, session: &Rc<SessionHandle>, room: u64) -> Entered {
        let mut rooms = session.rooms.borrow_mut();
        if rooms.contains(&room) {
            return Entered::Already;
        }
        if rooms.len() >= MAX_ROOMS_PER_CONNECTION {
            return Entered::TooMany;
        }
        rooms.push(room);
        self.local_rooms
            .borrow_mut()
            .viewers
            .entry(room)
            .or_default()
            .add(session.clone());
        Entered::Now
    }

    /// The latest `n` messages of `room` kept on this core (oldest first) that its viewers will
    /// not get otherwise: those a big room holds here are left out, the next flush gives them
    /// to every viewer there is then. Call it in the same step that added the viewer.
    pub fn room_recent(&self, room: u64, n: usize) -> Vec<Arc<Deliver>> {
        let local = self.local_rooms.borrow();
        let below = local.held.get(&room).map_or(u64::MAX, |h| h.first_seq);
        let limits = self.history_limits();
        let n = n.min(limits.messages);
        local.history.recent(room, n, below, &limits, now_ms())
    }

    /// Room messages kept on this core for viewers entering, and their bytes.
    pub fn room_history_size(&self) -> (usize, usize) {
        self.local_rooms.borrow().history.size()
    }

    fn history_limits(&self) -> HistoryLimits {
        HistoryLimits {
            messages: self.cfg.room_history_messages,
            max_age_ms: self.cfg.room_history_secs * 1000,
            bytes: self.cfg.room_history_bytes,
        }
    }

    /// Removes `session` from `room` (if it was in it).
    pub fn leave_room(&self, session: &SessionHandle, room: u64) {
        session.rooms.borrow_mut().retain(|&r| r != room);
        let mut local = self.local_rooms.borrow_mut();
        if let Some(list) = local.viewers.get_mut(&room) {
            list.remove(session.id);
            if list.is_empty() {
                local.viewers.remove(&room);
            }
        }
    }

    /// Removes a closing connection from every room it is in.
    pub fn leave_all_rooms(&self, session: &SessionHandle) {
        let rooms = std::mem::take(&mut *session.rooms.borrow_mut());
        for room in rooms {
            self.leave_room(session, room);
        }
    }

    /// Whether a connection of logical session `logical` on this core is in `room` (any path of
    /// a dual-channel session may have entered it).
    pub fn in_room(&self, logical: u64, room: u64) -> bool {
        self.local_rooms
            .borrow()
            .viewers
            .get(&room)
            .is_some_and(|list| list.has_logical(logical))
    }

    /// Queues a room message that arrived at its owner core.
    pub fn queue_room_send(&self, msg: RoomSend) {
        self.room_queue.borrow_mut().push_back(msg);
        if let Some(w) = self.room_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// The task that handles this core's room messages one at a time, so that each room's
    /// messages reach every core in the order they were numbered.
    pub async fn run_room_sends(self: Rc<Self>) {
        loop {
            let next = std::future::poll_fn(|cx| match self.room_queue.borrow_mut().pop_front() {
                Some(msg) => Poll::Ready(Some(msg)),
                None if self.stopping.get() => Poll::Ready(None),
                None => {
                    *self.room_waker.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
            match next {
                Some(msg) => self.room_send(msg).await,
                None => return,
            }
        }
    }

    /// On the room's owner core: numbers the message (or finds the retry's original), fans it
    /// out to every core and answers the sender.
    async fn room_send(self: &Rc<Self>, msg: RoomSend) {
        let now = now_ms();
        let key = xxh3_64(format!("{}\u{0}{}", msg.sender_name, msg.client_msg_id).as_bytes());
        let (seq, time, duplicate) = {
            let mut owned = self.rooms_owned.borrow_mut();
            if owned.len() >= 1_000_000 && !owned.contains_key(&msg.room) {
                // Numbering restarts for rooms dropped here; clients de-duplicate by seq only
                // within a run of a room, which this keeps bounded.
                owned.clear();
            }
            let room = owned.entry(msg.room).or_default();
            match room.recent.iter().find(|(k, _, _)| *k == key) {
                Some(&(_, seq, time)) => (seq, time, true),
                None => {
                    room.seq += 1;
                    if room.recent.len() == RECENT_IDS {
                        room.recent.pop_front();
                    }
                    room.recent.push_back((key, room.seq, now));
                    (room.seq, now, false)
                }
            }
        };
        if !duplicate {
            let message = Arc::new(Deliver {
                conversation_id: msg.room,
                seq,
                sender: msg.sender_name.to_string(),
                target: Some(Target::new(TargetKind::Room, msg.name.to_string())),
                server_time_ms: time,
                client_msg_id: msg.client_msg_id.clone(),
                content_type: msg.content_type,
                custom_type: msg.custom_type,
                // The payload is a slice of the sender's read buffer: a message kept for
                // viewers entering gets its own copy, so that it does not hold that buffer.
                payload: if self.cfg.room_history_messages > 0 {
                    Bytes::copy_from_slice(&msg.payload)
                } else {
                    msg.payload
                },
                recalled: false,
            });
            for core in 0..self.router.cores() {
                self.send_to_core(
                    core,
                    ShardMsg::RoomDeliver {
                        room: msg.room,
                        except_logical: msg.reply.logical,
                        priority: msg.priority,
                        message: message.clone(),
                    },
                )
                .await;
            }
        }
        let frame = self.encode(&Frame::new(
            msg.reply.request_id,
            SendAck {
                client_msg_id: msg.client_msg_id,
                conversation_id: msg.room,
                seq,
                server_time_ms: time,
                duplicate,
            },
        ));
        let to = msg.reply.core;
        self.send_to_core(
            to,
            ShardMsg::Reply {
                reply: msg.reply,
                frame,
                own_copy: None,
            },
        )
        .await;
    }

    /// Pushes a room message to this core's viewers of `room`, encoded once. A full queue
    /// misses it (see the module docs); nobody becomes lagging. A big room's message (at least
    /// `room_batch_viewers` viewers here, or messages held already) is held for
    /// [`Core::run_room_flush`] instead.
    pub fn deliver_room(&self, room: u64, except: u64, priority: bool, message: &Arc<Deliver>) {
        let mut local = self.local_rooms.borrow_mut();
        let local = &mut *local;
        local
            .history
            .keep(room, message, &self.history_limits(), now_ms());
        let holding = local.held.contains_key(&room);
        let list = match local.viewers.get(&room) {
            Some(list) => list.as_slice(),
            // A room that holds messages holds this one too, for whoever enters before the
            // flush (its kept messages stop below what is held).
            None if holding => &[],
            None => return,
        };
        let cap = self.cfg.outbound_queue_frames;
        let batch = self.cfg.room_batch_viewers;
        // A room with messages held keeps holding until they are flushed, even if it just
        // fell below the threshold: a message written at once would overtake them.
        if batch > 0 && (list.len() >= batch || holding) {
            let frame = self.encode_deliver(message);
            if local
                .held
                .entry(room)
                .or_default()
                .hold(frame, message.seq, except, priority, cap)
                && let Some(w) = local.flush_waker.take()
            {
                w.wake();
            }
            return;
        }
        let bound = room_bound(cap, priority);
        let mut frame: Option<Bytes> = None;
        let mut queued = 0;
        for s in list {
            if s.logical == except {
                continue;
            }
            let f = frame.get_or_insert_with(|| self.encode_deliver(message));
            queued += u64::from(s.out.push_below(f.clone(), bound));
        }
        self.m()
            .deliveries_out
            .fetch_add(queued, std::sync::atomic::Ordering::Relaxed);
    }

    /// Wakes the room flush task (to stop, when the server does).
    pub fn wake_room_flush(&self) {
        if let Some(w) = self.local_rooms.borrow_mut().flush_waker.take() {
            w.wake();
        }
    }

    /// Gives each viewer of every room in `held` its batch: everything held if its queue is
    /// below half its bound, only the priority messages below three quarters, nothing above
    /// (the bounds of [`Core::deliver_room`], in frames and bytes; a batch is one queue entry).
    /// Returns the number of viewers written to.
    fn flush_rooms(&self, held: crate::FastMap<u64, Held>) -> usize {
        let local = self.local_rooms.borrow();
        let cap = self.cfg.outbound_queue_frames;
        let (mut writes, mut delivered) = (0, 0);
        for (room, held) in held {
            let Some(list) = local.viewers.get(&room) else {
                continue;
            };
            let mut senders: Vec<u64> = held.frames.iter().map(|f| f.1).collect();
            senders.sort_unstable();
            senders.dedup();
            let all = held.for_viewer(None, false);
            let priority = held.for_viewer(None, true);
            for s in list.as_slice() {
                let sender = senders.binary_search(&s.logical).is_ok();
                let pick = |priority_only: bool| {
                    if sender {
                        held.for_viewer(Some(s.logical), priority_only)
                    } else if priority_only {
                        priority.clone()
                    } else {
                        all.clone()
                    }
                };
                for priority_only in [false, true] {
                    let (bytes, n) = pick(priority_only);
                    let bound = room_bound(cap, priority_only);
                    if n == 0 {
                        break;
                    }
                    if s.out.push_below(bytes, bound) {
                        writes += 1;
                        delivered += n;
                        break;
                    }
                }
            }
        }
        let m = self.m();
        m.deliveries_out
            .fetch_add(delivered, std::sync::atomic::Ordering::Relaxed);
        m.room_deliveries_batched
            .fetch_add(delivered, std::sync::atomic::Ordering::Relaxed);
        writes
    }

    /// The task that flushes big rooms' held messages: at once if the core's last flush is
    /// long enough ago, otherwise when it is. After a flush that wrote to N viewers the next
    /// waits `room_batch_ms`, or N / `room_writes_per_sec` seconds if that is longer, but never
    /// more than [`MAX_SPACING`].
    pub async fn run_room_flush(self: Rc<Self>) {
        let min = Duration::from_millis(self.cfg.room_batch_ms);
        let budget = self.cfg.room_writes_per_sec as f64;
        let mut next: Option<Instant> = None;
        loop {
            std::future::poll_fn(|cx| {
                let mut local = self.local_rooms.borrow_mut();
                if local.held.is_empty() && !self.stopping.get() {
                    local.flush_waker = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            if let Some(wait) = next.and_then(|t| t.checked_duration_since(Instant::now())) {
                glommio::timer::sleep(wait).await;
            }
            if self.stopping.get() {
                // Rooms keep nothing: what is held when the server stops is not sent.
                return;
            }
            let held = std::mem::take(&mut self.local_rooms.borrow_mut().held);
            let writes = self.flush_rooms(held);
            let spacing = Duration::from_secs_f64(writes as f64 / budget).clamp(min, MAX_SPACING);
            next = Some(Instant::now() + spacing);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(id: u64, logical: u64) -> Rc<SessionHandle> {
        Rc::new(SessionHandle {
            token_expires_at: std::cell::Cell::new(u64::MAX),
            id,
            logical,
            user: 1,
            device: String::new(),
            out: crate::outbound::Outbound::new(16, 1 << 20),
            ending: Default::default(),
            last_active: Default::default(),
            end_waker: Default::default(),
            rooms: Default::default(),
            fd: std::cell::Cell::new(-1),
            park: Default::default(),
            push: Default::default(),
        })
    }

    fn ids(v: &Viewers) -> Vec<u64> {
        let mut ids: Vec<u64> = v.as_slice().iter().map(|s| s.id).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn viewers_leave_from_anywhere_and_count_each_logical_session() {
        let mut v = Viewers::default();
        // Connections 1..=5; 4 is a second path of logical session 3.
        for (id, logical) in [(1, 1), (2, 2), (3, 3), (4, 3), (5, 5)] {
            v.add(connection(id, logical));
        }
        assert_eq!(v.len(), 5);
        v.remove(1);
        assert_eq!(ids(&v), [2, 3, 4, 5]);
        assert!(!v.has_logical(1));
        v.remove(3);
        assert!(v.has_logical(3), "its other path is still in the room");
        v.remove(9);
        assert_eq!(ids(&v), [2, 4, 5], "an unknown id changes nothing");
        for (place, s) in v.as_slice().iter().enumerate() {
            assert_eq!(v.at[&s.id], place);
        }
        v.remove(4);
        assert!(!v.has_logical(3));
        // Every place stays right after the swaps: each one can still leave.
        for (i, id) in [5, 2].into_iter().enumerate() {
            v.remove(id);
            assert_eq!(v.len(), 1 - i);
            for (place, s) in v.as_slice().iter().enumerate() {
                assert_eq!(v.at[&s.id], place);
            }
        }
        assert!(v.is_empty());
        assert!(v.at.is_empty() && v.logical.is_empty());
    }

    fn frame(n: u8, len: usize) -> Bytes {
        Bytes::from(vec![n; len])
    }

    /// Message `seq` of a room, sent at `time` (ms), with a payload of `len` bytes.
    fn msg(seq: u64, time: u64, len: usize) -> Arc<Deliver> {
        Arc::new(Deliver {
            conversation_id: ROOM_BIT | 1,
            seq,
            server_time_ms: time,
            payload: Bytes::from(vec![0; len]),
            ..Default::default()
        })
    }

    fn seqs(messages: &[Arc<Deliver>]) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    const ALL: u64 = u64::MAX;

    #[test]
    fn a_room_keeps_its_latest_messages_within_the_age_limit() {
        let limits = HistoryLimits {
            messages: 3,
            max_age_ms: 1000,
            bytes: 1 << 20,
        };
        let mut h = RoomHistory::default();
        for seq in 1..=5 {
            h.keep(1, &msg(seq, 100 * seq, 10), &limits, 100 * seq);
        }
        assert_eq!(seqs(&h.recent(1, 10, ALL, &limits, 500)), [3, 4, 5]);
        assert_eq!(seqs(&h.recent(1, 2, ALL, &limits, 500)), [4, 5]);
        assert_eq!(h.recent(1, 0, ALL, &limits, 500), []);
        // Below the first message a big room holds.
        assert_eq!(seqs(&h.recent(1, 10, 5, &limits, 500)), [3, 4]);
        assert_eq!(seqs(&h.recent(1, 1, 5, &limits, 500)), [4]);
        assert_eq!(h.recent(1, 10, 0, &limits, 500), []);
        // At 1,350 ms message 3 (sent at 300) is too old, 4 (at 400) is not.
        assert_eq!(seqs(&h.recent(1, 10, ALL, &limits, 1350)), [4, 5]);
        assert_eq!(h.recent(2, 10, ALL, &limits, 500), []);
        // Messages of the same encoded size (times 300-500 and seqs 3-5 take as many bytes).
        let w = weight(&msg(3, 300, 10));
        assert_eq!(h.size(), (3, 3 * w));

        // The next message kept, of any room, drops those too old by then: 3 and 4 at 1,450.
        h.keep(2, &msg(1, 1450, 10), &limits, 1450);
        assert_eq!(h.size(), (2, w + weight(&msg(1, 1450, 10))));
        assert_eq!(seqs(&h.recent(1, 10, ALL, &limits, 1450)), [5]);
        // A room numbered afresh (its owner forgot it) starts again.
        h.keep(1, &msg(1, 1460, 10), &limits, 1460);
        assert_eq!(seqs(&h.recent(1, 10, ALL, &limits, 1460)), [1]);
        assert_eq!(h.size(), (2, 2 * weight(&msg(1, 1450, 10))));

        let off = HistoryLimits {
            messages: 0,
            ..limits
        };
        let mut h = RoomHistory::default();
        h.keep(1, &msg(1, 0, 10), &off, 0);
        assert_eq!(h.size(), (0, 0));
    }

    #[test]
    fn a_cores_bytes_go_oldest_first_over_all_rooms() {
        // Each message's encoding has the same size (seqs and times below 128).
        let w = weight(&msg(1, 1, 1000));
        let limits = HistoryLimits {
            messages: 10,
            max_age_ms: 1000,
            bytes: 3 * w,
        };
        let mut h = RoomHistory::default();
        for room in 1..=3 {
            h.keep(room, &msg(1, room, 1000), &limits, room);
        }
        assert_eq!(h.size(), (3, 3 * w));
        // A fourth message: room 1's first, the oldest of the core, goes.
        h.keep(1, &msg(2, 4, 1000), &limits, 4);
        assert_eq!(seqs(&h.recent(1, 10, ALL, &limits, 4)), [2]);
        assert_eq!(seqs(&h.recent(2, 10, ALL, &limits, 4)), [1]);
        h.keep(4, &msg(1, 5, 1000), &limits, 5);
        assert_eq!(h.recent(2, 10, ALL, &limits, 5), []);
        assert!(!h.rooms.contains_key(&2));
        assert_eq!(seqs(&h.recent(3, 10, ALL, &limits, 5)), [1]);
        assert_eq!(h.size(), (3, 3 * w));
    }

    #[test]
    fn a_busy_room_keeps_memory_bounded_and_the_order_of_the_rest() {
        let limits = HistoryLimits {
            messages: 2,
            max_age_ms: 100_000,
            bytes: 1 << 20,
        };
        let mut h = RoomHistory::default();
        // A quiet room's message first, then a busy room's 10,000, of which the room keeps 2.
        h.keep(1, &msg(1, 0, 1), &limits, 0);
        for seq in 1..=10_000 {
            h.keep(2, &msg(seq, 0, 1), &limits, 0);
            assert!(h.order.len() <= 2 * h.kept + 1024);
        }
        assert_eq!(seqs(&h.recent(2, 10, ALL, &limits, 0)), [9_999, 10_000]);
        let busy = weight(&msg(9_999, 0, 1)) + weight(&msg(10_000, 0, 1));
        assert_eq!(h.size(), (3, weight(&msg(1, 0, 1)) + busy));
        // The core's byte limit still drops the oldest first: the quiet room's message.
        let tight = HistoryLimits {
            bytes: busy + weight(&msg(3, 0, 1)),
            ..limits
        };
        h.keep(3, &msg(1, 0, 1), &tight, 0);
        assert_eq!(h.recent(1, 10, ALL, &tight, 0), []);
        assert_eq!(seqs(&h.recent(2, 10, ALL, &tight, 0)), [9_999, 10_000]);
        assert_eq!(seqs(&h.recent(3, 10, ALL, &tight, 0)), [1]);
    }

    #[test]
    fn each_viewer_gets_one_buffer_without_its_own_messages() {
        let mut held = Held::default();
        // Messages 1 and 3 from session 7, 2 (priority) from session 9.
        assert!(held.hold(frame(1, 2), 1, 7, false, 16));
        assert!(held.hold(frame(2, 2), 2, 9, true, 16));
        assert!(held.hold(frame(3, 2), 3, 7, false, 16));
        assert_eq!(
            held.for_viewer(None, false),
            (Bytes::from(vec![1, 1, 2, 2, 3, 3]), 3)
        );
        assert_eq!(
            held.for_viewer(Some(7), false),
            (Bytes::from(vec![2, 2]), 1)
        );
        assert_eq!(
            held.for_viewer(Some(9), false),
            (Bytes::from(vec![1, 1, 3, 3]), 2)
        );
        assert_eq!(held.for_viewer(None, true), (Bytes::from(vec![2, 2]), 1));
        assert_eq!(held.for_viewer(Some(9), true), (Bytes::new(), 0));
        assert_eq!(held.first_seq, 1);
        // The room's numbering starts again: no kept message is below what is held.
        assert!(held.hold(frame(4, 2), 1, 7, false, 16));
        assert_eq!(held.first_seq, 0);
    }

    #[test]
    fn a_room_holds_a_bounded_number_of_frames_and_bytes() {
        // cap 16: ordinary messages up to 8 frames, priority ones up to 12.
        let mut held = Held::default();
        for i in 0..8 {
            assert!(held.hold(frame(i, 1), u64::from(i) + 1, 1, false, 16));
        }
        assert!(!held.hold(frame(8, 1), 9, 1, false, 16));
        for i in 0..4 {
            assert!(held.hold(frame(i, 1), u64::from(i) + 10, 1, true, 16));
        }
        assert!(!held.hold(frame(4, 1), 14, 1, true, 16));
        assert_eq!(held.frames.len(), 12);

        // Bytes: ordinary messages up to HELD_BYTES, priority ones up to twice that.
        let mut held = Held::default();
        let half = HELD_BYTES / 2;
        assert!(held.hold(frame(1, half), 5, 1, false, 4096));
        assert!(held.hold(frame(2, half), 6, 1, false, 4096));
        assert!(!held.hold(frame(3, 1), 7, 1, false, 4096));
        assert!(held.hold(frame(4, HELD_BYTES), 8, 1, true, 4096));
        assert!(!held.hold(frame(5, 1), 9, 1, true, 4096));
        assert_eq!(held.bytes, 2 * HELD_BYTES);

        // A first frame is held whatever its size.
        let mut held = Held::default();
        assert!(held.hold(frame(1, 3 * HELD_BYTES), 10, 1, false, 4096));
        assert!(!held.hold(frame(2, 1), 11, 1, true, 4096));
    }
}
