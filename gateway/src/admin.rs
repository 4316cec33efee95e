//! The cores' side of the HTTP API: jobs the API thread hands to a core, and how a core runs them.
//!
//! The API runs on its own (tokio) thread and never touches a core's state. It sends an
//! [`AdminJob`] to the core that owns the user in question (the same [`Router`] as for
//! connections) over an `async_channel` (the core's task awaits it; the sender wakes it from
//! the other thread), and awaits a `tokio::sync::oneshot` answer.
//!
//! A client request made through the API ([`AdminJob::Request`]) runs exactly as if it came
//! from a connection of that user: a session handle without a socket is registered on the
//! user's core for the duration of the request (so answers routed back through the mesh find
//! it), the request goes through [`Ctx::handle`], and the first frame answering its request id
//! is the result. The handle is not one of the user's devices: it gets no deliveries and does
//! not count against `max_devices_per_user`; the user's real devices get the message as from
//! another device of theirs.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_lite::future;
use tern_protocol::v1::frame::Body;
use tern_protocol::{Codec, ErrorCode, Frame, KickReason};
use tokio::sync::oneshot;

use crate::core::{Core, SessionHandle, now_ms};
use crate::outbound::Outbound;
use crate::route::Router;
use crate::session::Ctx;

/// The device id of the API's request sessions. It never registers as one of the user's
/// devices, so a client using the same id is not affected.
pub const API_DEVICE: &str = "@api";

/// How long a request through the API may wait for its answer from the cores.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the API asks of a core.
#[derive(Debug)]
pub enum AdminJob {
    /// Run a client request as `user` (on the user's core) and answer with the response frame.
    Request {
        user: String,
        /// Acting as the system user: may message anyone; owner rights in every group.
        admin: bool,
        frame: Frame,
        reply: oneshot::Sender<Frame>,
    },
    /// An operation on a group's hidden members, as the system user (on its core); answered
    /// with a GroupResponse or an Error frame.
    Hidden {
        group: String,
        op: crate::groups::HiddenOp,
        reply: oneshot::Sender<Frame>,
    },
    /// End every connection of `user` on this core with Kick(`reason`); answers how many.
    Kick {
        user: String,
        reason: KickReason,
        message: String,
        reply: oneshot::Sender<usize>,
    },
    /// This core's counts.
    Stats { reply: oneshot::Sender<CoreStats> },
    /// A server push for this core's online devices it addresses; answers how many got it.
    Push {
        notice: Arc<tern_protocol::v1::PushNotice>,
        targets: Arc<crate::push::PushTargets>,
        reply: oneshot::Sender<usize>,
    },
    /// Which of these users (routed to this core) have a session on it.
    Online {
        users: Vec<tern_storage::UserId>,
        reply: oneshot::Sender<Vec<bool>>,
    },
    /// This core's counters of these pushes.
    PushCounts {
        ids: Vec<u64>,
        reply: oneshot::Sender<Vec<crate::push::PushCount>>,
    },
}

/// One core's view of its connections.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CoreStats {
    pub core: usize,
    /// Open connections (logged in or not) accepted or adopted by this core.
    pub connections: usize,
    /// Logged-in sessions (paths) of users routed to this core.
    pub sessions: usize,
    /// Users with at least one session on this core.
    pub users: usize,
    /// Distinct devices (logical sessions) online.
    pub devices: usize,
    /// Appends waiting for the store on this core (owner of their conversation).
    pub appends_pending: usize,
    /// Room messages waiting to be numbered and fanned out.
    pub room_queue: usize,
    /// Bytes of room messages kept for viewers entering (counted against
    /// `room_history_bytes`).
    pub room_history_bytes: usize,
}

/// The API thread's handle on the cores.
#[derive(Debug, Clone)]
pub struct Bridge {
    cores: Vec<async_channel::Sender<AdminJob>>,
    router: Router,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Why a job did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("the server is shutting down")]
    Stopped,
}

impl Bridge {
    /// A bridge and each core's receiving end (index = core id).
    pub fn new(
        router: Router,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> (Bridge, Vec<async_channel::Receiver<AdminJob>>) {
        let (senders, receivers) = (0..router.cores())
            .map(|_| async_channel::bounded(1024))
            .unzip();
        (
            Bridge {
                cores: senders,
                router,
                metrics,
            },
            receivers,
        )
    }

    pub fn cores(&self) -> usize {
        self.cores.len()
    }

    async fn ask<T>(
        &self,
        core: usize,
        job: impl FnOnce(oneshot::Sender<T>) -> AdminJob,
    ) -> Result<T, BridgeError> {
        let (tx, rx) = oneshot::channel();
        self.cores[core]
            .send(job(tx))
            .await
            .map_err(|_| BridgeError::Stopped)?;
        rx.await.map_err(|_| BridgeError::Stopped)
    }

    /// Runs `frame` as a request of `user`; the answer frame (an Error frame for a refusal).
    pub async fn request(
        &self,
        user: &str,
        admin: bool,
        frame: Frame,
    ) -> Result<Frame, BridgeError> {
        let core = self.router.user(user).core;
        self.ask(core, |reply| AdminJob::Request {
            user: user.to_owned(),
            admin,
            frame,
            reply,
        })
        .await
    }

    /// Runs a hidden-member operation on `group` as the system user `system`; the answer frame
    /// (an Error frame for a refusal).
    pub async fn hidden_members(
        &self,
        system: &str,
        group: &str,
        op: crate::groups::HiddenOp,
    ) -> Result<Frame, BridgeError> {
        let core = self.router.user(system).core;
        self.ask(core, |reply| AdminJob::Hidden {
            group: group.to_owned(),
            op,
            reply,
        })
        .await
    }

    /// Kicks every connection of `user`; how many were ended.
    pub async fn kick(
        &self,
        user: &str,
        reason: KickReason,
        message: &str,
    ) -> Result<usize, BridgeError> {
        let core = self.router.user(user).core;
        self.ask(core, |reply| AdminJob::Kick {
            user: user.to_owned(),
            reason,
            message: message.to_owned(),
            reply,
        })
        .await
    }

    /// Delivers a push to the online devices of `targets` on `core`; how many got it.
    pub async fn push(
        &self,
        core: usize,
        notice: Arc<tern_protocol::v1::PushNotice>,
        targets: Arc<crate::push::PushTargets>,
    ) -> Result<usize, BridgeError> {
        self.ask(core, |reply| AdminJob::Push {
            notice,
            targets,
            reply,
        })
        .await
    }

    /// Which of `users` (all routed to `core`) are online.
    pub async fn online(
        &self,
        core: usize,
        users: Vec<tern_storage::UserId>,
    ) -> Result<Vec<bool>, BridgeError> {
        self.ask(core, |reply| AdminJob::Online { users, reply })
            .await
    }

    /// The core that owns `user`.
    pub fn core_of(&self, user: &str) -> usize {
        self.router.user(user).core
    }

    /// The counters of `ids`, summed over the cores.
    pub async fn push_counts(
        &self,
        ids: &[u64],
    ) -> Result<Vec<crate::push::PushCount>, BridgeError> {
        let mut sum = vec![crate::push::PushCount::default(); ids.len()];
        for core in 0..self.cores.len() {
            let counts = self
                .ask(core, |reply| AdminJob::PushCounts {
                    ids: ids.to_vec(),
                    reply,
                })
                .await?;
            for (s, c) in sum.iter_mut().zip(counts) {
                s.reached += c.reached;
                s.acked += c.acked;
            }
        }
        Ok(sum)
    }

    /// Every core's counts, in core order.
    pub async fn stats(&self) -> Result<Vec<CoreStats>, BridgeError> {
        let mut all = Vec::with_capacity(self.cores.len());
        for core in 0..self.cores.len() {
            all.push(self.ask(core, |reply| AdminJob::Stats { reply }).await?);
        }
        Ok(all)
    }
}

impl Core {
    /// The task that takes the API's jobs for this core until shutdown.
    pub async fn run_admin(self: Rc<Self>, jobs: async_channel::Receiver<AdminJob>) {
        loop {
            let next = future::or(async { jobs.recv().await.ok() }, async {
                self.stopped().await;
                None
            })
            .await;
            let Some(job) = next else {
                return;
            };
            let core = self.clone();
            glommio::spawn_local(async move { core.admin_job(job).await }).detach();
        }
    }

    async fn admin_job(self: Rc<Self>, job: AdminJob) {
        match job {
            AdminJob::Request {
                user,
                admin,
                frame,
                reply,
            } => {
                let answer = self.api_request(&user, admin, ApiWork::Frame(frame)).await;
                let _ = reply.send(answer);
            }
            AdminJob::Hidden { group, op, reply } => {
                let system = self.cfg.system_user.clone();
                let answer = self
                    .api_request(&system, true, ApiWork::Hidden { group, op })
                    .await;
                let _ = reply.send(answer);
            }
            AdminJob::Kick {
                user,
                reason,
                message,
                reply,
            } => {
                let _ = reply.send(self.kick_user(&user, reason, &message));
            }
            AdminJob::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            AdminJob::Push {
                notice,
                targets,
                reply,
            } => {
                let _ = reply.send(self.deliver_push(&notice, &targets));
            }
            AdminJob::Online { users, reply } => {
                let online = self.users.borrow();
                let _ = reply.send(users.iter().map(|u| online.contains_key(u)).collect());
            }
            AdminJob::PushCounts { ids, reply } => {
                let _ = reply.send(self.push_counts_of(&ids));
            }
        }
    }

    fn stats(&self) -> CoreStats {
        let users = self.users.borrow();
        let mut devices = 0;
        for list in users.values() {
            let mut logical: Vec<u64> = list.iter().map(|s| s.logical).collect();
            logical.sort_unstable();
            logical.dedup();
            devices += logical.len();
        }
        CoreStats {
            core: self.id,
            connections: self.connections.get(),
            sessions: users.values().map(|list| list.len()).sum(),
            users: users.len(),
            devices,
            appends_pending: self.queue_depths().0,
            room_queue: self.queue_depths().1,
            room_history_bytes: self.room_history_size().1,
        }
    }

    /// Ends every session of `user` on this core (their connections get Kick first).
    pub fn kick_user(&self, user: &str, reason: KickReason, message: &str) -> usize {
        let Ok(Some(id)) = self.store.lookup_user(user) else {
            return 0;
        };
        let kick = self.encode(&Frame::kick(reason, message));
        let users = self.users.borrow();
        let Some(list) = users.get(&id) else {
            return 0;
        };
        for s in list {
            s.out.push(kick.clone());
            s.end();
        }
        list.len()
    }

    async fn api_request(self: &Rc<Self>, user: &str, admin: bool, work: ApiWork) -> Frame {
        let rid = match &work {
            ApiWork::Frame(frame) => frame.request_id.max(1),
            ApiWork::Hidden { .. } => 1,
        };
        let id = match self.user_id(user) {
            Ok(id) => id,
            Err(e) => {
                let (code, msg) = crate::core::storage_error_code(&e);
                return Frame::error(rid, code, msg, false);
            }
        };
        let session_id = self.new_session_id();
        let session = Rc::new(SessionHandle {
            id: session_id,
            logical: session_id,
            user: id,
            device: API_DEVICE.to_owned(),
            out: Outbound::new(
                self.cfg.outbound_queue_frames,
                self.cfg.outbound_queue_bytes,
            ),
            ending: Default::default(),
            last_active: std::cell::Cell::new(now_ms()),
            end_waker: Default::default(),
            rooms: Default::default(),
            fd: std::cell::Cell::new(-1),
            park: std::cell::Cell::new(crate::core::Park::Never),
            push: Default::default(),
            token_expires_at: std::cell::Cell::new(u64::MAX),
        });
        self.sessions
            .borrow_mut()
            .insert(session_id, session.clone());
        let mut ctx = Ctx::for_api(self.clone(), session.clone(), id, Arc::from(user), admin);
        match work {
            ApiWork::Frame(mut frame) => {
                frame.request_id = rid;
                Box::pin(ctx.handle(frame)).await;
            }
            ApiWork::Hidden { group, op } => ctx.hidden_members(rid, &group, op).await,
        }
        let answer = future::or(answer_of(&self.codec, &session.out, rid), async {
            glommio::timer::sleep(ANSWER_TIMEOUT).await;
            None
        })
        .await;
        self.sessions.borrow_mut().remove(&session_id);
        session.out.close();
        answer.unwrap_or_else(|| {
            Frame::error(
                rid,
                ErrorCode::Unavailable,
                "no answer from the server within 10 s; retry later",
                false,
            )
        })
    }
}

/// What an API request session runs.
enum ApiWork {
    /// A client request.
    Frame(Frame),
    /// A hidden-member operation (as the system user).
    Hidden {
        group: String,
        op: crate::groups::HiddenOp,
    },
}

/// The account-state key of `user`'s ban: its value is the end of the ban (ms since the epoch,
/// big-endian u64; 0 = until lifted).
pub fn ban_key(user: &str) -> Vec<u8> {
    let mut k = b"ban/".to_vec();
    k.extend_from_slice(user.as_bytes());
    k
}

/// The account-state key of the revocation of `user`'s tokens: tokens issued at or before its
/// value (ms since the epoch, big-endian u64) are refused.
pub fn revoke_key(user: &str) -> Vec<u8> {
    let mut k = b"revoked/".to_vec();
    k.extend_from_slice(user.as_bytes());
    k
}

/// The end of the last revocation of `user`'s tokens: tokens issued at or before it are refused.
/// A store error counts as no revocation (logged), like [`banned`].
fn revoked_until(store: &dyn tern_storage::MessageStore, user: &str) -> Option<u64> {
    match store.meta(&revoke_key(user)) {
        Ok(Some(v)) => <[u8; 8]>::try_from(v.as_ref()).ok().map(u64::from_be_bytes),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a token revocation");
            None
        }
    }
}

/// Whether a token of `user` issued at `iat_ms` was revoked.
pub fn revoked(store: &dyn tern_storage::MessageStore, user: &str, iat_ms: u64) -> bool {
    revoked_until(store, user).is_some_and(|until| iat_ms <= until)
}

/// `now_ms`, or just after `user`'s last revocation if that is later. The gateway stamps with
/// it both the tokens it mints (`iat_ms`), so that one issued after a revocation works even
/// within the same millisecond (or when the revocation was stamped by a clock running ahead),
/// and a new revocation, so that it covers every token minted before it.
pub fn after_revocation(store: &dyn tern_storage::MessageStore, user: &str, now_ms: u64) -> u64 {
    revoked_until(store, user).map_or(now_ms, |until| now_ms.max(until.saturating_add(1)))
}

/// Whether `user` is banned at `now_ms`. A store error counts as not banned (logins do not
/// fail because the account state cannot be read; the error is logged).
pub fn banned(store: &dyn tern_storage::MessageStore, user: &str, now_ms: u64) -> bool {
    match store.meta(&ban_key(user)) {
        Ok(Some(v)) => {
            let until = <[u8; 8]>::try_from(v.as_ref()).map_or(0, u64::from_be_bytes);
            until == 0 || until > now_ms
        }
        Ok(None) => false,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a ban");
            false
        }
    }
}

/// The first frame queued on `out` that answers request `rid` (others, such as SyncNeeded,
/// are skipped).
async fn answer_of(codec: &Codec, out: &Outbound, rid: u64) -> Option<Frame> {
    let mut codec = *codec;
    let mut pending = BytesMut::new();
    loop {
        out.wait_ready().await;
        let _ = out.take_sync_needed();
        let mut buf = Vec::new();
        if !out.drain_into(&mut buf, usize::MAX) {
            if out.is_closed() {
                return None;
            }
            continue;
        }
        pending.extend_from_slice(&buf);
        while let Ok(Some(frame)) = codec.decode(&mut pending) {
            if frame.request_id == rid && !matches!(frame.body, Some(Body::Deliver(_))) {
                return Some(frame);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_storage::{MessageStore, MetaChange};

    #[test]
    fn tokens_minted_after_a_revocation_are_not_revoked_even_in_its_millisecond() {
        let dir = tempfile::tempdir().unwrap();
        let store = tern_storage::RocksStore::open(
            dir.path(),
            tern_storage::StoreOptions::with_durability(tern_storage::Durability::Memory),
        )
        .unwrap();
        // No revocation: the clock's time, nothing refused.
        assert_eq!(after_revocation(&store, "alice", 5_000), 5_000);
        assert!(!revoked(&store, "alice", 0));
        let revoke = |at: u64| {
            store
                .set_meta(vec![MetaChange {
                    key: revoke_key("alice").into(),
                    value: Some(bytes::Bytes::copy_from_slice(&at.to_be_bytes())),
                }])
                .wait()
                .unwrap();
        };
        // Revoked at 5,000: a token of that millisecond was issued before it, one the gateway
        // mints in it is stamped just after.
        revoke(5_000);
        assert!(revoked(&store, "alice", 5_000));
        assert!(!revoked(&store, "alice", 5_001));
        assert_eq!(after_revocation(&store, "alice", 5_000), 5_001);
        // A revocation stamped ahead of this clock.
        revoke(9_000);
        assert_eq!(after_revocation(&store, "alice", 5_000), 9_001);
        // A second revocation in the same millisecond covers the token minted after the first.
        revoke(after_revocation(&store, "alice", 5_000));
        assert!(revoked(&store, "alice", 9_001));
        assert!(!revoked(&store, "alice", 9_002));
        // Later clocks keep their time; other users are not affected.
        assert_eq!(after_revocation(&store, "alice", 12_000), 12_000);
        assert_eq!(after_revocation(&store, "bob", 5_000), 5_000);
        assert!(!revoked(&store, "bob", 1));
    }
}
