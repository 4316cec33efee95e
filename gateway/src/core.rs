//! Per-core state and the messages cores send each other.
//!
//! Each executor owns one [`Core`]: the sessions of the users routed to it, the appends of the
//! conversations routed to it, and the sending side of the lock-free channel mesh to every other
//! core. Nothing here is shared between threads except the store handle and the config.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::task::{Poll, Waker};

use bytes::{Bytes, BytesMut};
use glommio::channels::channel_mesh::Senders;
use tern_protocol::v1::{Deliver, Frame, RecallOk, SendAck, Target, TargetKind, frame::Body};
use tern_protocol::{Codec, ErrorCode};
use tern_storage::{
    AppendRequest, Appended, Completion, GroupId, MessageStore, StorageError, UserId,
};

use crate::config::Config;
use crate::groups::{GroupAfter, GroupJob, GroupState, LocalGroups};
use crate::limits::{ConnLimits, ConnSlot, Rates, UserSends};
use crate::outbound::{Offered, Outbound};
use crate::presence::Followers;
use crate::rooms::{LocalRooms, RoomOwned, RoomSend};
use crate::route::Router;
use crate::sys::MovedFd;
use crate::token::Secret;
use crate::transport::Relay;

/// What a login hands to the user's core together with the socket.
#[derive(Debug)]
pub struct Login {
    pub user: String,
    pub device: String,
    pub request_id: u64,
    pub sync_version: u64,
    pub sync_on_login: bool,
    /// `Hello.sync_max_messages_per_conversation`.
    pub sync_max: u32,
    /// `Hello.resume_session_id`: the logical session this connection joins as another path
    /// (dual channel), or 0 for a new one.
    pub resume: u64,
    /// `Hello.platform`.
    pub platform: i32,
    /// When the token expires (Unix seconds).
    pub token_expires_at: u64,
}

/// Where to send the answer to a Send.
#[derive(Debug, Clone)]
pub struct ReplyTo {
    pub core: usize,
    /// The connection (path) that sent the request: the answer goes there.
    pub session: u64,
    /// Its logical session: none of that session's paths gets the message as a delivery.
    pub logical: u64,
    /// The sender, whose other devices get the message (even if the connection that sent it
    /// is gone by then: another path of its session may live on).
    pub user: UserId,
    pub request_id: u64,
    /// When the request arrived ([`crate::limits::mono_nanos`]), for the SendAck latency.
    pub at_ns: u64,
}

/// An append routed to the conversation's owner core.
#[derive(Debug)]
pub struct AppendMsg {
    pub req: AppendRequest,
    pub reply: ReplyTo,
    pub sender_name: Arc<str>,
    pub to: Recipient,
    /// For a recall's tombstone: the recalled seq (answered with RecallOk); 0 otherwise.
    pub recall_of: u64,
}

/// Who gets a committed message.
#[derive(Debug)]
pub enum Recipient {
    /// The other user of a 1:1 conversation (or the sender, writing to themself).
    User { id: UserId, name: Arc<str> },
    /// The members of a group, and what the group's owner does after the commit.
    Group(Box<GroupAfter>),
}

/// A 1:1 message as the sender's other devices see it: the recipient's [`Deliver`] (shared,
/// not copied) with `target` naming the peer instead of the sender.
#[derive(Debug)]
pub struct OwnCopy {
    pub message: Arc<Deliver>,
    pub peer: Arc<str>,
}

impl OwnCopy {
    /// The Deliver for the sender's devices.
    fn deliver(&self) -> Deliver {
        Deliver {
            target: Some(Target {
                kind: TargetKind::User as i32,
                id: self.peer.to_string(),
            }),
            ..(*self.message).clone()
        }
    }
}

/// Messages between cores (one bounded lock-free SPSC queue per ordered pair of cores).
#[derive(Debug)]
pub enum ShardMsg {
    /// A logged-in connection moving to its user's core.
    Adopt {
        fd: MovedFd,
        leftover: Vec<u8>,
        login: Login,
        slot: ConnSlot,
    },
    /// A QUIC session whose connection stays on core `from` (its packets arrive there): run
    /// the session here over relay `id`.
    AdoptRelay {
        id: u64,
        from: usize,
        leftover: Vec<u8>,
        login: Login,
    },
    /// Bytes, credit or close for one end of a relay.
    Relay {
        id: u64,
        event: crate::transport::RelayEvent,
    },
    /// An append for a conversation this core owns.
    Append(AppendMsg),
    /// The result of an append, for the sender's session, with the message for the sender's
    /// other devices (built and encoded only if the sender has any).
    Reply {
        reply: ReplyTo,
        frame: Bytes,
        own_copy: Option<OwnCopy>,
    },
    /// A request about a group, for the group's owner core.
    Group(GroupJob),
    /// A committed group message for this core's online members of `group`, except the paths
    /// of logical session `except_logical` (the sender's).
    GroupDeliver {
        group: GroupId,
        except_logical: u64,
        message: Arc<Deliver>,
    },
    /// Members who joined or left `group`, for this core's index of its online users' groups.
    GroupMembers {
        group: GroupId,
        added: Arc<Vec<UserId>>,
        removed: Arc<Vec<UserId>>,
    },
    /// A message for a live room, for the room's owner core.
    RoomSend(RoomSend),
    /// A room message for this core's connections in `room`, except the paths of logical
    /// session `except_logical` (the sender's).
    RoomDeliver {
        room: u64,
        except_logical: u64,
        priority: bool,
        message: Arc<Deliver>,
    },
    /// A prepared frame for `user`'s connections on this core, except logical session
    /// `except_logical` (read receipts, typing). `droppable`: skipped for a connection whose
    /// queue is half full.
    ToUser {
        user: UserId,
        except_logical: u64,
        frame: Bytes,
        droppable: bool,
    },
    /// A droppable frame for this core's online members of `group` (typing).
    ToGroup {
        group: GroupId,
        except_logical: u64,
        frame: Bytes,
    },
    /// A frame for one connection of this core (presence notices).
    ToSession { session: u64, frame: Bytes },
    /// Connection `session` of core `core` starts or stops following `user` (on `user`'s core).
    Follow {
        user: UserId,
        name: Arc<str>,
        core: usize,
        session: u64,
        add: bool,
    },
    /// A committed message for the online devices of `user` on this core. Encoded on this core,
    /// once, and only if the user has a device here. `except_logical` names a logical session
    /// (all its paths) that must not get it.
    Deliver {
        user: UserId,
        except_logical: u64,
        message: Arc<Deliver>,
    },
}

/// One session (connection) as the rest of the core sees it.
#[derive(Debug)]
pub struct SessionHandle {
    /// This connection's id (unique in the process).
    pub id: u64,
    /// The logical session it belongs to: its own id, or for a further path of a dual-channel
    /// session the id that the path presented in `Hello.resume_session_id`.
    pub logical: u64,
    pub user: UserId,
    pub device: String,
    pub out: Outbound,
    /// Set when the session must end (kicked, shutdown); the reader notices and closes.
    pub ending: Cell<bool>,
    /// When the last frame arrived (ms since the epoch); the core's idle sweep reads it.
    pub last_active: Cell<u64>,
    pub end_waker: RefCell<Option<Waker>>,
    /// Live rooms this connection entered.
    pub rooms: RefCell<Vec<u64>>,
    /// The connection's socket, for the sweep's checks (TCP only; -1 otherwise). Open for as
    /// long as the session is in [`Core::sessions`] (it is removed before the socket closes).
    /// Parking moves the socket to another descriptor.
    pub fd: Cell<std::os::fd::RawFd>,
    /// Whether the connection is parked (`park.rs`), or asked to park by the idle sweep.
    pub park: Cell<Park>,
    /// Server pushes delivered on this connection and the device's cursor.
    pub push: RefCell<crate::push::PushState>,
    /// When the session's token expires (Unix seconds): the idle sweep kicks it then (Kick
    /// EXPIRED). A Refresh moves it.
    pub token_expires_at: Cell<u64>,
}

/// Where a connection is with parking (`park.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Park {
    /// Reading its socket.
    #[default]
    Active,
    /// The idle sweep asked it to park; its reader parks if nothing is in flight.
    Asked,
    /// Parked.
    Parked,
    /// Parked, and its socket became ready (set by the core's unparker).
    Readable,
    /// Never parks (not a plain TCP connection).
    Never,
}

impl SessionHandle {
    pub fn end(&self) {
        self.ending.set(true);
        // Its writer may be gone: whoever waits for room in its queue must not wait forever.
        self.out.release();
        self.wake_reader();
    }

    fn wake_reader(&self) {
        if let Some(w) = self.end_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Asks an active connection to park (the idle sweep).
    pub fn ask_park(&self) {
        if self.park.get() == Park::Active {
            self.park.set(Park::Asked);
            self.wake_reader();
        }
    }

    /// A parked connection's socket became ready.
    pub fn wake_readable(&self) {
        if self.park.get() == Park::Parked {
            self.park.set(Park::Readable);
            self.wake_reader();
        }
    }

    /// Resolves once the session must end, or (for a reader) stop reading and park.
    pub fn interrupted(&self) -> impl Future<Output = ()> + '_ {
        self.ending_or(Some(Park::Asked))
    }

    /// For a parked connection: resolves once its socket is ready, something is queued for it,
    /// or it must end.
    pub fn unparked(&self) -> impl Future<Output = ()> + '_ {
        futures_lite::future::or(self.ending_or(Some(Park::Readable)), self.out.wait_ready())
    }

    /// Resolves once [`SessionHandle::end`] was called.
    pub fn ended(&self) -> impl Future<Output = ()> + '_ {
        self.ending_or(None)
    }

    /// Resolves once the session must end, or its parking state is `park`. Plain functions
    /// returning the future, not `async fn`s: a parked connection's task holds one, and each
    /// `async` layer would add its own state to it.
    fn ending_or(&self, park: Option<Park>) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.ending.get() || park.is_some_and(|p| self.park.get() == p) {
                Poll::Ready(())
            } else {
                *self.end_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }
}

/// Per-core state.
pub struct Core {
    pub id: usize,
    pub router: Router,
    pub cfg: Arc<Config>,
    pub store: Arc<dyn MessageStore>,
    pub secret: Secret,
    pub codec: Codec,
    pub mesh: Senders<ShardMsg>,
    pub users: RefCell<crate::FastMap<UserId, Sessions>>,
    pub sessions: RefCell<crate::FastMap<u64, Rc<SessionHandle>>>,
    next_session: Cell<u64>,
    appends: RefCell<VecDeque<(Completion<Appended>, AppendMsg, u64)>>,
    appends_waker: RefCell<Option<Waker>>,
    /// Scratch buffer every connection of this core reads into (no per-connection buffer while
    /// idle).
    pub read_scratch: RefCell<Vec<u8>>,
    /// Sessions with live deliveries for [`Core::run_flusher`] to write, and its waker.
    flush_list: RefCell<Vec<Rc<SessionHandle>>>,
    flush_waker: RefCell<Option<Waker>>,
    pub shutdown: Arc<AtomicBool>,
    pub stopping: Cell<bool>,
    /// The accept loops (TCP, QUIC), waiting for shutdown.
    stop_wakers: RefCell<Vec<Waker>>,
    pub connections: Cell<usize>,
    /// Interned ids of users this core sent to recently (bounded), so a Send does not look the
    /// recipient up in the store every time.
    user_ids: RefCell<HashMap<String, UserId>>,
    /// Connection counts shared by all cores.
    pub conn_limits: Arc<ConnLimits>,
    pub rates: Rates,
    /// Per-user send rate of users with a session on this core (removed with their last session).
    pub user_rates: RefCell<HashMap<UserId, UserSends>>,
    /// This core's ends of relays to QUIC connections held by other cores.
    pub relays: RefCell<HashMap<u64, Rc<Relay>>>,
    /// The groups this core owns (those whose conversation routes here) that were used.
    pub groups: RefCell<HashMap<GroupId, GroupState>>,
    /// The groups of the users online on this core.
    pub local_groups: RefCell<LocalGroups>,
    /// The connections of this core in each live room.
    pub local_rooms: RefCell<LocalRooms>,
    /// The live rooms this core owns (numbering and de-duplication of their messages).
    pub rooms_owned: RefCell<HashMap<u64, RoomOwned>>,
    /// Followers of the users of this core (presence).
    pub followers: RefCell<HashMap<UserId, Followers>>,
    /// Room messages waiting for [`Core::run_room_sends`], in arrival order.
    pub room_queue: RefCell<VecDeque<RoomSend>>,
    pub room_waker: RefCell<Option<Waker>>,
    /// Every core's counters (this core writes its own slot only).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Webhooks to the app's server (a disabled handle sends nothing).
    pub webhooks: crate::webhook::Webhooks,
    /// Per-push counters of this core's devices (bounded, newest pushes kept).
    pub push_counts: RefCell<std::collections::BTreeMap<u64, crate::push::PushCount>>,
    /// Where messages for users without an online device go (offline push notifications);
    /// None when no push provider is configured.
    pub offline: Option<async_channel::Sender<crate::push::OfflineJob>>,
    /// Where idle connections park (None when `park_after_ms` is 0).
    pub parker: Option<Arc<crate::park::Parker>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core").field("id", &self.id).finish()
    }
}

/// A user's sessions on a core, kept inline in the users map for the usual one or two: a group
/// fan-out looks up thousands of users per message, and an inline list saves a cache miss on
/// each.
pub type Sessions = smallvec::SmallVec<[Rc<SessionHandle>; 2]>;

/// Counts an open connection on its core for as long as it lives (shutdown waits for the count
/// to reach zero). Moves with the connection; a hand-off to another core drops it here.
#[derive(Debug)]
pub struct ConnCount(Rc<Core>);

impl ConnCount {
    pub fn new(core: &Rc<Core>) -> ConnCount {
        core.connections.set(core.connections.get() + 1);
        ConnCount(core.clone())
    }
}

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0.connections.set(self.0.connections.get() - 1);
    }
}

/// The core a session id ([`Core::new_session_id`]) belongs to.
pub fn core_of_session(id: u64) -> usize {
    (id >> 48) as usize
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: usize,
        router: Router,
        cfg: Arc<Config>,
        store: Arc<dyn MessageStore>,
        secret: Secret,
        mesh: Senders<ShardMsg>,
        shutdown: Arc<AtomicBool>,
        conn_limits: Arc<ConnLimits>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Core {
        Core {
            metrics,
            webhooks: crate::webhook::Webhooks::disabled(),
            push_counts: Default::default(),
            offline: None,
            parker: None,
            rates: Rates::from_config(&cfg),
            conn_limits,
            user_rates: RefCell::default(),
            relays: RefCell::default(),
            groups: RefCell::default(),
            local_groups: RefCell::default(),
            local_rooms: RefCell::default(),
            rooms_owned: RefCell::default(),
            room_queue: RefCell::default(),
            followers: RefCell::default(),
            room_waker: RefCell::default(),
            id,
            router,
            codec: Codec::new(cfg.max_frame_bytes as usize),
            cfg,
            store,
            secret,
            mesh,
            users: RefCell::default(),
            sessions: RefCell::default(),
            next_session: Cell::new(1),
            appends: RefCell::default(),
            appends_waker: RefCell::default(),
            read_scratch: RefCell::new(vec![0; 64 << 10]),
            flush_list: RefCell::default(),
            flush_waker: RefCell::default(),
            shutdown,
            stopping: Cell::new(false),
            stop_wakers: RefCell::default(),
            connections: Cell::new(0),
            user_ids: RefCell::default(),
        }
    }

    /// This core's counters.
    pub fn m(&self) -> &crate::metrics::CoreMetrics {
        &self.metrics.cores[self.id]
    }

    /// Pending appends and room messages waiting on this core.
    pub fn queue_depths(&self) -> (usize, usize) {
        (self.appends.borrow().len(), self.room_queue.borrow().len())
    }

    /// The internal id of user `name`, from the core's cache or the store.
    pub fn user_id(&self, name: &str) -> Result<UserId, StorageError> {
        if let Some(&id) = self.user_ids.borrow().get(name) {
            return Ok(id);
        }
        let id = self.store.intern_user(name)?;
        let mut cache = self.user_ids.borrow_mut();
        if cache.len() >= 100_000 {
            cache.clear();
        }
        cache.insert(name.to_owned(), id);
        Ok(id)
    }

    /// A session id unique across the process: core in the top 16 bits.
    pub fn new_session_id(&self) -> u64 {
        let n = self.next_session.get();
        self.next_session.set(n + 1);
        ((self.id as u64) << 48) | n
    }

    /// Encodes a frame into its own buffer (length prefix included).
    pub fn encode(&self, frame: &Frame) -> Bytes {
        use prost::Message;
        let len = frame.encoded_len();
        if len > self.codec.max_frame_bytes {
            // Responses are bounded by the page limits; this is a safety net, not a path.
            let mut buf = BytesMut::new();
            let mut codec = self.codec;
            let fallback = Frame::error(
                frame.request_id,
                ErrorCode::Internal,
                "response too large",
                false,
            );
            let _ = codec.encode(&fallback, &mut buf);
            return buf.freeze();
        }
        // A Vec is prost's fastest output buffer; one allocation, prefix included.
        let mut v = Vec::with_capacity(4 + len);
        v.extend_from_slice(&(len as u32).to_be_bytes());
        frame.encode_raw(&mut v);
        Bytes::from(v)
    }

    /// Resolves when shutdown begins on this core.
    pub async fn stopped(&self) {
        std::future::poll_fn(|cx| {
            if self.stopping.get() {
                Poll::Ready(())
            } else {
                let mut wakers = self.stop_wakers.borrow_mut();
                if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        })
        .await
    }

    pub fn begin_stop(&self) {
        self.stopping.set(true);
        for w in self.stop_wakers.borrow_mut().drain(..) {
            w.wake();
        }
        if let Some(w) = self.room_waker.borrow_mut().take() {
            w.wake();
        }
        self.wake_room_flush();
        let kick = self.encode(&Frame::kick(
            tern_protocol::KickReason::Shutdown,
            "server is shutting down",
        ));
        for s in self.sessions.borrow().values() {
            s.out.push(kick.clone());
            s.end();
        }
    }

    /// Ends sessions that sent nothing for `idle_timeout`, and those whose token expired. One
    /// sweep per core instead of a timer per connection: idle connections cost no timer, and
    /// reads arm nothing. Also frees the
    /// buffers of empty outbound queues, and asks connections quiet for `park_after_ms` to park.
    pub async fn run_idle_sweep(self: Rc<Self>) {
        let idle = self.cfg.idle_timeout_ms;
        let park_after = match self.parker {
            Some(_) => self.cfg.park_after_ms,
            None => u64::MAX,
        };
        let period =
            std::time::Duration::from_millis((idle / 4).min(park_after / 2).clamp(10, 1000));
        let kick = self.encode(&Frame::kick(
            tern_protocol::KickReason::Idle,
            "no frame within the idle timeout",
        ));
        let expired = self.encode(&Frame::kick(
            tern_protocol::KickReason::Expired,
            "the session's token expired",
        ));
        while !self.stopping.get() {
            glommio::timer::sleep(period).await;
            let now = now_ms();
            for s in self.sessions.borrow().values() {
                if s.ending.get() {
                    continue;
                }
                s.out.release_if_empty();
                let wrote = s.out.take_wrote();
                let quiet = now.saturating_sub(s.last_active.get());
                if now / 1000 >= s.token_expires_at.get() {
                    s.out.push(expired.clone());
                    s.end();
                } else if quiet > idle {
                    s.out.push(kick.clone());
                    s.end();
                } else if let Some(since) = s.out.lagging_since()
                    && now.saturating_sub(since) > self.cfg.write_timeout_ms
                    && s.fd.get() >= 0
                    && crate::sys::unsent_bytes(s.fd.get()) > 0
                {
                    // Live messages stopped long ago and what was written is still not
                    // taken: the client does not read. (A blocked write is timed out by the
                    // writer itself; this catches a client whose kernel buffer absorbed it all.)
                    tracing::info!(session = s.id, "client is not reading: resetting");
                    crate::sys::set_linger_zero(s.fd.get());
                    s.end();
                } else if quiet >= park_after && !wrote {
                    // Nothing from the client for `park_after_ms` and nothing to it since the
                    // last sweep.
                    s.ask_park();
                }
            }
        }
    }

    /// Sends to another core, or handles locally.
    pub async fn send_to_core(self: &Rc<Self>, core: usize, msg: ShardMsg) {
        if core == self.id {
            self.handle(msg);
            return;
        }
        match self.mesh.send_to(core, msg).await {
            Ok(()) => {
                if let Some(n) = self.m().mesh_sent.get(core) {
                    n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Err(_msg) => tracing::warn!(core, "cross-core channel closed; message dropped"),
        }
    }

    /// Handles a message from another core (or from this one). Never blocks.
    pub fn handle(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Adopt {
                fd,
                leftover,
                login,
                slot,
            } => {
                let stream = crate::sys::adopt_stream(fd);
                let core = self.clone();
                glommio::spawn_local(crate::session::run_adopted(
                    core, stream, leftover, login, slot,
                ))
                .detach();
            }
            ShardMsg::AdoptRelay {
                id,
                from,
                leftover,
                login,
            } => {
                let relay = Relay::open(self, id, from);
                let core = self.clone();
                glommio::spawn_local(crate::session::run_relayed(core, relay, leftover, login))
                    .detach();
            }
            ShardMsg::Relay { id, event } => {
                let relay = self.relays.borrow().get(&id).cloned();
                if let Some(relay) = relay {
                    relay.handle(event);
                }
            }
            ShardMsg::Append(job) => self.submit_append(job),
            ShardMsg::Reply {
                reply,
                frame,
                own_copy,
            } => {
                if let Some(s) = self.sessions.borrow().get(&reply.session) {
                    s.out.push(frame);
                }
                // Most senders have no other device online: then the copy is never built.
                if let Some(own) = own_copy
                    && self.has_other_paths(reply.user, reply.logical)
                {
                    self.deliver_local(reply.user, reply.logical, &own.deliver());
                }
            }
            ShardMsg::Deliver {
                user,
                except_logical,
                message,
            } => {
                // except_logical is 0 unless a user writes to themself.
                if except_logical == 0
                    && self.offline.is_some()
                    && !self.users.borrow().contains_key(&user)
                {
                    self.notify_offline(user, &message);
                }
                self.deliver_local(user, except_logical, &message)
            }
            ShardMsg::Group(job) => self.group_job(job),
            ShardMsg::RoomSend(msg) => self.queue_room_send(msg),
            ShardMsg::ToUser {
                user,
                except_logical,
                frame,
                droppable,
            } => self.push_to_user(user, except_logical, &frame, droppable),
            ShardMsg::ToGroup {
                group,
                except_logical,
                frame,
            } => self.push_to_group(group, except_logical, &frame),
            ShardMsg::ToSession { session, frame } => self.push_to_session(session, frame),
            ShardMsg::Follow {
                user,
                name,
                core,
                session,
                add,
            } => self.follow(user, name, core, session, add),
            ShardMsg::RoomDeliver {
                room,
                except_logical,
                priority,
                message,
            } => self.deliver_room(room, except_logical, priority, &message),
            ShardMsg::GroupDeliver {
                group,
                except_logical,
                message,
            } => self.deliver_group(group, except_logical, &message),
            ShardMsg::GroupMembers {
                group,
                added,
                removed,
            } => self.update_local_groups(group, &added, &removed),
        }
    }

    /// Whether `user` has a session on this core outside logical session `except`.
    fn has_other_paths(&self, user: UserId, except: u64) -> bool {
        self.users
            .borrow()
            .get(&user)
            .is_some_and(|list| list.iter().any(|s| s.logical != except))
    }

    /// Pushes a committed message to every local session of `user` except the paths of logical
    /// session `except`, encoding it once, on first need. Every path of a dual-channel session
    /// gets it; the client keeps the first copy.
    pub fn deliver_local(&self, user: UserId, except: u64, message: &Deliver) {
        let n = self.deliver_to_user(user, except, message, &mut None);
        self.m()
            .deliveries_out
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// [`Core::deliver_local`] with the frame encoded at most once across calls (`frame`).
    /// Returns the number of sessions it was offered to; the caller counts them in
    /// `deliveries_out`.
    pub fn deliver_to_user(
        &self,
        user: UserId,
        except: u64,
        message: &Deliver,
        frame: &mut Option<Bytes>,
    ) -> u64 {
        let users = self.users.borrow();
        let Some(list) = users.get(&user) else {
            return 0;
        };
        let pending_cap = self.cfg.outbound_queue_frames;
        let mut offered = 0;
        for s in list {
            if s.logical == except {
                continue;
            }
            let f = frame.get_or_insert_with(|| self.encode_deliver(message));
            offered += 1;
            match s
                .out
                .deliver(message.conversation_id, message.seq, f, pending_cap)
            {
                Offered::Done => {}
                Offered::Flush => self.flush_later(s),
                Offered::Lagging => {
                    tracing::debug!(session = s.id, "slow consumer: live push paused until sync");
                }
            }
        }
        offered
    }

    /// Has the flusher write what was queued for `session` (see [`Offered::Flush`]).
    fn flush_later(&self, session: &Rc<SessionHandle>) {
        let mut list = self.flush_list.borrow_mut();
        list.push(session.clone());
        if list.len() == 1
            && let Some(w) = self.flush_waker.borrow_mut().take()
        {
            w.wake();
        }
    }

    /// The task that writes live deliveries to connections whose writer waits for work: after
    /// the task that queued them, so that what one run of the core queued for a connection
    /// leaves in one write, without a wake-up of each connection's writer.
    pub async fn run_flusher(self: Rc<Self>) {
        let mut batch = Vec::new();
        let mut buf = Vec::new();
        loop {
            std::future::poll_fn(|cx| {
                if self.flush_list.borrow().is_empty() {
                    *self.flush_waker.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            std::mem::swap(&mut batch, &mut *self.flush_list.borrow_mut());
            // `buf` stays within twice the chunk: a bigger entry is sent from where it is.
            for s in batch.drain(..) {
                s.out.flush(&mut buf, crate::session::WRITE_CHUNK);
            }
        }
    }

    pub(crate) fn encode_deliver(&self, message: &Deliver) -> Bytes {
        use prost::Message;
        // Frame{request_id: 0, deliver = 22}: the envelope is written by hand so the Deliver
        // (and its payload) is encoded once, straight into the output.
        let inner = message.encoded_len();
        let body = prost::encoding::key_len(22)
            + prost::encoding::encoded_len_varint(inner as u64)
            + inner;
        let mut v = Vec::with_capacity(4 + body);
        v.extend_from_slice(&(body as u32).to_be_bytes());
        prost::encoding::encode_key(22, prost::encoding::WireType::LengthDelimited, &mut v);
        prost::encoding::encode_varint(inner as u64, &mut v);
        message.encode_raw(&mut v);
        Bytes::from(v)
    }

    /// Starts an append of a conversation this core owns. Completions are processed in
    /// submission order by [`Core::run_completions`], so live deliveries of a conversation leave
    /// in sequence order.
    pub fn submit_append(&self, mut job: AppendMsg) {
        let req = std::mem::take(&mut job.req);
        // What the SendAck and the Deliver need stays with the job; the request goes to the store.
        job.req = AppendRequest {
            conversation: req.conversation,
            sender: req.sender,
            client_msg_id: req.client_msg_id.clone(),
            content_type: req.content_type,
            custom_type: req.custom_type.clone(),
            payload: req.payload.clone(),
            participants: Vec::new(),
            group_change: None,
            recall: None,
        };
        let completion = self.store.append(req);
        self.appends
            .borrow_mut()
            .push_back((completion, job, crate::limits::mono_nanos()));
        if let Some(w) = self.appends_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// The task that turns completed appends into SendAcks and deliveries, in order.
    pub async fn run_completions(self: Rc<Self>) {
        loop {
            let next = std::future::poll_fn(|cx| {
                let mut q = self.appends.borrow_mut();
                match q.pop_front() {
                    Some(item) => Poll::Ready(Some(item)),
                    None if self.stopping.get() && self.shutdown_complete() => Poll::Ready(None),
                    None => {
                        *self.appends_waker.borrow_mut() = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            })
            .await;
            let Some((completion, job, submitted)) = next else {
                return;
            };
            let result = completion.await;
            let now = crate::limits::mono_nanos();
            self.m()
                .storage_append
                .observe_us(now.saturating_sub(submitted) / 1000);
            let is_change = matches!(&job.to, Recipient::Group(after) if after.change.is_some());
            if result.is_ok() && job.recall_of == 0 && !is_change && job.reply.at_ns != 0 {
                self.m()
                    .send_ack
                    .observe_us(now.saturating_sub(job.reply.at_ns) / 1000);
            }
            self.finish_append(job, result).await;
        }
    }

    fn shutdown_complete(&self) -> bool {
        self.sessions.borrow().is_empty()
    }

    pub fn wake_completions(&self) {
        if let Some(w) = self.appends_waker.borrow_mut().take() {
            w.wake();
        }
    }

    async fn finish_append(
        self: &Rc<Self>,
        job: AppendMsg,
        result: Result<Appended, StorageError>,
    ) {
        let (recipient, recipient_name) = match job.to {
            Recipient::User { id, name } => (id, name),
            Recipient::Group(after) => {
                return self
                    .finish_group_append(
                        *after,
                        job.req,
                        job.reply,
                        job.sender_name,
                        job.recall_of,
                        result,
                    )
                    .await;
            }
        };
        let request_id = job.reply.request_id;
        let sender = job.req.sender;
        let (reply_frame, own_copy) = match result {
            Ok(a) => {
                let ack = if job.recall_of != 0 {
                    Frame::new(
                        request_id,
                        RecallOk {
                            conversation_id: a.conversation,
                            seq: job.recall_of,
                            event_seq: a.seq,
                        },
                    )
                } else {
                    Frame {
                        request_id,
                        body: Some(Body::SendAck(SendAck {
                            client_msg_id: job.req.client_msg_id.clone(),
                            conversation_id: a.conversation,
                            seq: a.seq,
                            server_time_ms: a.server_time_ms,
                            duplicate: a.duplicate,
                        })),
                    }
                };
                let mut own_copy = None;
                if !a.duplicate
                    && job.recall_of == 0
                    && self.webhooks.wants(crate::webhook::AFTER_SEND)
                {
                    self.webhooks.emit_with(crate::webhook::AFTER_SEND, || {
                        serde_json::json!({
                            "from": &*job.sender_name,
                            "to_kind": "user",
                            "to": &*recipient_name,
                            "conversation_id": a.conversation.to_string(),
                            "seq": a.seq,
                            "client_msg_id": &job.req.client_msg_id,
                            "content_type": job.req.content_type,
                            "custom_type": &job.req.custom_type,
                            "server_time_ms": a.server_time_ms,
                        })
                    });
                }
                if !a.duplicate {
                    let for_recipient = Deliver {
                        conversation_id: a.conversation,
                        seq: a.seq,
                        sender: job.sender_name.to_string(),
                        target: Some(Target {
                            kind: TargetKind::User as i32,
                            id: job.sender_name.to_string(),
                        }),
                        server_time_ms: a.server_time_ms,
                        client_msg_id: job.req.client_msg_id,
                        content_type: job.req.content_type,
                        custom_type: job.req.custom_type,
                        payload: job.req.payload,
                        recalled: false,
                    };
                    let message = Arc::new(for_recipient);
                    let recipient_core = self.router.user(&recipient_name).core;
                    if recipient != sender {
                        // The sender's other devices see their own message with the peer as
                        // target; it rides with the SendAck to the sender's core.
                        own_copy = Some(OwnCopy {
                            message: message.clone(),
                            peer: recipient_name,
                        });
                    }
                    self.send_to_core(
                        recipient_core,
                        ShardMsg::Deliver {
                            user: recipient,
                            except_logical: if recipient == sender {
                                job.reply.logical
                            } else {
                                0
                            },
                            message,
                        },
                    )
                    .await;
                }
                (ack, own_copy)
            }
            Err(e) => {
                let (code, msg) = storage_error_code(&e);
                (Frame::error(request_id, code, msg, false), None)
            }
        };
        let frame = self.encode(&reply_frame);
        self.send_to_core(
            job.reply.core,
            ShardMsg::Reply {
                reply: job.reply,
                frame,
                own_copy,
            },
        )
        .await;
    }
}

/// Maps a storage failure to the wire error code and a message for the client.
pub fn storage_error_code(e: &StorageError) -> (ErrorCode, &'static str) {
    if e.is_unavailable() {
        (
            ErrorCode::Unavailable,
            "storage is not accepting writes; retry later",
        )
    } else {
        match e {
            StorageError::InvalidArgument(m) => (ErrorCode::InvalidArgument, m),
            _ => (ErrorCode::Internal, "storage error"),
        }
    }
}
