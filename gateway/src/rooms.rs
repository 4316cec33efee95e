//! Live chat rooms: anyone may enter, no member limit, nothing stored.
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
//!   grow: a viewer whose queue holds half its bound (`outbound_queue_frames`) misses ordinary
//!   room messages, and priority ones (gifts, notices) once it holds three quarters. Room
//!   messages never cause `SyncNeeded`, and a busy room always leaves a quarter of each queue
//!   to the viewer's own messages, which are never dropped.
//! * A big room (at least `room_batch_viewers` viewers on a core) is written in batches on that
//!   core: its messages are queued to the viewers at once but their sockets are written once per
//!   `room_batch_ms`, each write carrying every room message since the last. A socket write to a
//!   viewer costs about as much as the whole fan-out of one message to it does, so this is what
//!   keeps a busy room with tens of thousands of viewers from taking the cores from other
//!   traffic. A viewer's own traffic (replies, 1:1 and group messages) is written at once, and
//!   takes the held room messages with it.
//!
//! Rooms have no history, no unread counts and never appear in sync.
//!
//! [`Router::conversation`]: crate::route::Router::conversation

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

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

/// The connections of this core in each room.
#[derive(Debug, Default)]
pub struct LocalRooms {
    viewers: crate::FastMap<u64, Vec<Rc<SessionHandle>>>,
    /// Big rooms with messages queued to their viewers since the last batch flush.
    held: Vec<u64>,
    /// The batch flush task, while it waits for a room to hold something.
    flush_waker: Option<Waker>,
}

impl LocalRooms {
    /// Number of this core's connections in `room`.
    pub fn viewers(&self, room: u64) -> usize {
        self.viewers.get(&room).map_or(0, Vec::len)
    }
}

impl Core {
    /// Adds `session` to `room`. Returns false if it is in too many rooms.
    pub fn enter_room(&self, session: &Rc<SessionHandle>, room: u64) -> bool {
        let mut rooms = session.rooms.borrow_mut();
        if rooms.contains(&room) {
            return true;
        }
        if rooms.len() >= MAX_ROOMS_PER_CONNECTION {
            return false;
        }
        rooms.push(room);
        self.local_rooms
            .borrow_mut()
            .viewers
            .entry(room)
            .or_default()
            .push(session.clone());
        true
    }

    /// Removes `session` from `room` (if it was in it).
    pub fn leave_room(&self, session: &SessionHandle, room: u64) {
        session.rooms.borrow_mut().retain(|&r| r != room);
        let mut local = self.local_rooms.borrow_mut();
        if let Some(list) = local.viewers.get_mut(&room) {
            list.retain(|s| s.id != session.id);
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
            .is_some_and(|list| list.iter().any(|s| s.logical == logical))
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
                payload: msg.payload,
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
    /// misses it (see the module docs); nobody becomes lagging. In a big room (at least
    /// `room_batch_viewers` viewers here) the message is only queued: [`Core::run_room_flush`]
    /// starts the viewers' writes once per `room_batch_ms`, so that each write carries every
    /// room message since the last one.
    pub fn deliver_room(&self, room: u64, except: u64, priority: bool, message: &Deliver) {
        let mut local = self.local_rooms.borrow_mut();
        let local = &mut *local;
        let Some(list) = local.viewers.get(&room) else {
            return;
        };
        let batch = self.cfg.room_batch_viewers;
        let hold = batch > 0 && list.len() >= batch;
        let cap = self.cfg.outbound_queue_frames;
        let bound = if priority { cap * 3 / 4 } else { cap / 2 };
        let mut frame: Option<Bytes> = None;
        let mut queued = 0;
        for s in list {
            if s.logical == except {
                continue;
            }
            let f = frame.get_or_insert_with(|| self.encode_deliver(message));
            let ok = if hold {
                s.out.hold_below(f.clone(), bound)
            } else {
                s.out.push_below(f.clone(), bound)
            };
            queued += u64::from(ok);
        }
        let m = self.m();
        m.deliveries_out
            .fetch_add(queued, std::sync::atomic::Ordering::Relaxed);
        if hold {
            m.room_deliveries_batched
                .fetch_add(queued, std::sync::atomic::Ordering::Relaxed);
            if !local.held.contains(&room) {
                local.held.push(room);
            }
            if let Some(w) = local.flush_waker.take() {
                w.wake();
            }
        }
    }

    /// The task that writes big rooms' held messages to their viewers, once per
    /// `room_batch_ms` while any room holds some.
    pub async fn run_room_flush(self: Rc<Self>) {
        let every = Duration::from_millis(self.cfg.room_batch_ms);
        loop {
            std::future::poll_fn(|cx| {
                let mut local = self.local_rooms.borrow_mut();
                if local.held.is_empty() {
                    local.flush_waker = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            glommio::timer::sleep(every).await;
            let mut local = self.local_rooms.borrow_mut();
            for room in std::mem::take(&mut local.held) {
                for s in local.viewers.get(&room).into_iter().flatten() {
                    s.out.flush();
                }
            }
        }
    }
}
