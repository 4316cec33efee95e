//! Read positions, read receipts and read counts, typing indicators and presence.
//!
//! * **Read positions** are stored (the store's `set_read`, group-committed like everything
//!   else); the user's other devices live on the same core and get the new position at once,
//!   the other user of a 1:1 conversation gets a `ReadReceipt` on their core.
//! * **Read counts** are computed on demand from the stored read positions of the
//!   conversation's members.
//! * **Typing** and **presence** are never stored. Typing goes to the peer's core (1:1) or to
//!   every core for a group's local online members, as a frame encoded once, and is dropped for
//!   a device whose queue is half full. Presence subscriptions live on the followed user's core
//!   (where all of that user's devices are): it notices the first device arriving and the last
//!   one leaving and tells each follower's core. A subscription lasts as long as the following
//!   connection, which cancels its subscriptions when it closes.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tern_protocol::ErrorCode;
use tern_protocol::v1::{
    Frame, GetReadCounts, MarkRead, Presence, PresenceSubscribed, ReadCounts, ReadReceipt,
    ReadState, SubscribePresence, Target, TargetKind, Typing,
};
use tern_storage::{ConversationKind, GroupId, UserId, conversation_kind};

use crate::core::{Core, ShardMsg};
use crate::session::Ctx;
use crate::token::valid_id;

/// Most users one SubscribePresence may name, and one connection may follow.
pub const MAX_PRESENCE_PER_REQUEST: usize = 1000;
pub const MAX_FOLLOWED: usize = 5000;
/// Most seqs one GetReadCounts may ask about.
pub const MAX_READ_COUNT_SEQS: usize = 100;

/// Followers of one user, kept on that user's core.
#[derive(Debug, Default)]
pub struct Followers {
    name: Arc<str>,
    /// (core, connection id) of each following connection.
    list: Vec<(usize, u64)>,
    /// Devices online when the followers were last told.
    told: Option<u32>,
}

impl Core {
    /// Pushes a prepared frame to `user`'s connections on this core, except the paths of
    /// `except`. A `droppable` frame (typing) is skipped for connections whose queue is half
    /// full.
    pub fn push_to_user(&self, user: UserId, except: u64, frame: &Bytes, droppable: bool) {
        let users = self.users.borrow();
        let Some(list) = users.get(&user) else {
            return;
        };
        let cap = self.cfg.outbound_queue_frames;
        for s in list {
            if s.logical == except {
                continue;
            }
            if droppable {
                s.out.push_below(frame.clone(), cap / 2);
            } else {
                s.out.push(frame.clone());
            }
        }
    }

    /// Pushes a droppable frame to this core's online members of `group`.
    pub fn push_to_group(&self, group: GroupId, except: u64, frame: &Bytes) {
        for user in self.local_groups.borrow().members(group) {
            self.push_to_user(user, except, frame, true);
        }
    }

    /// Adds or removes a follower of `user` (on `user`'s core). A new follower is told the
    /// current state at once.
    pub fn follow(&self, user: UserId, name: Arc<str>, core: usize, session: u64, add: bool) {
        let mut all = self.followers.borrow_mut();
        if add {
            let f = all.entry(user).or_insert_with(|| Followers {
                name,
                ..Followers::default()
            });
            if !f.list.contains(&(core, session)) {
                f.list.push((core, session));
            }
            let devices = self.devices_online(user);
            // What every follower now knows (the state is kept only while there are followers).
            f.told = Some(devices);
            let frame = self.presence_frame(&f.name, devices);
            drop(all);
            self.tell(core, session, frame);
        } else if let Some(f) = all.get_mut(&user) {
            f.list.retain(|&x| x != (core, session));
            if f.list.is_empty() {
                all.remove(&user);
            }
        }
    }

    fn devices_online(&self, user: UserId) -> u32 {
        self.users.borrow().get(&user).map_or(0, |list| {
            let mut logical: Vec<u64> = list.iter().map(|s| s.logical).collect();
            logical.sort_unstable();
            logical.dedup();
            logical.len() as u32
        })
    }

    fn presence_frame(&self, name: &str, devices: u32) -> Bytes {
        self.encode(&Frame::new(
            0,
            Presence {
                user_id: name.to_owned(),
                online: devices > 0,
                devices,
            },
        ))
    }

    /// After `user`'s devices on this core changed: tells the followers if the user came
    /// online or went offline.
    pub fn presence_changed(&self, user: UserId) {
        let devices = self.devices_online(user);
        let mut all = self.followers.borrow_mut();
        let Some(f) = all.get_mut(&user) else {
            return;
        };
        let was = f.told.unwrap_or(0);
        f.told = Some(devices);
        if (was > 0) == (devices > 0) {
            return;
        }
        let frame = self.presence_frame(&f.name, devices);
        let targets = f.list.clone();
        drop(all);
        for (core, session) in targets {
            self.tell(core, session, frame.clone());
        }
    }

    fn tell(&self, core: usize, session: u64, frame: Bytes) {
        if core == self.id {
            self.push_to_session(session, frame);
        } else {
            match self
                .mesh
                .try_send_to(core, ShardMsg::ToSession { session, frame })
            {
                Ok(()) => {
                    if let Some(n) = self.m().mesh_sent.get(core) {
                        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                // A full ring means that core is overwhelmed; presence is best effort.
                Err(e) => tracing::debug!(error = %e, "presence notice dropped"),
            }
        }
    }

    /// Queues a frame for one connection of this core (if it still exists), bounded.
    pub fn push_to_session(&self, session: u64, frame: Bytes) {
        if let Some(s) = self.sessions.borrow().get(&session) {
            s.out.push_below(frame, self.cfg.outbound_queue_frames);
        }
    }
}

impl Ctx {
    pub(crate) async fn mark_read(&mut self, rid: u64, req: MarkRead) {
        let conv = req.conversation_id;
        let limit = match self.readable(conv) {
            Ok(Some(limit)) => limit,
            Ok(None) => {
                return self.error(rid, ErrorCode::Forbidden, "not a conversation of this user");
            }
            Err(e) => return self.storage_error(rid, &e),
        };
        let seq = if limit > 0 {
            req.seq.min(limit)
        } else {
            req.seq
        };
        let store = self.core.store.clone();
        let before = match store.read_seq(self.user, conv) {
            Ok(s) => s,
            Err(e) => return self.storage_error(rid, &e),
        };
        let read_seq = match store.set_read(self.user, conv, seq).await {
            Ok(s) => s,
            Err(e) => return self.storage_error(rid, &e),
        };
        let state = ReadState {
            conversation_id: conv,
            read_seq,
        };
        self.reply(&Frame::new(rid, state));
        if read_seq <= before {
            return;
        }
        let frame = self.core.encode(&Frame::new(0, state));
        self.core
            .push_to_user(self.user, self.session.logical, &frame, false);
        if let Some(ConversationKind::Direct { low, high }) = conversation_kind(conv) {
            let peer = if low == self.user { high } else { low };
            if peer == self.user {
                return;
            }
            let Ok(Some(peer_name)) = store.user_name(peer) else {
                return;
            };
            let receipt = self.core.encode(&Frame::new(
                0,
                ReadReceipt {
                    conversation_id: conv,
                    reader: self.user_name.to_string(),
                    read_seq,
                },
            ));
            let core = self.core.router.user(&peer_name).core;
            self.core
                .send_to_core(
                    core,
                    ShardMsg::ToUser {
                        user: peer,
                        except_logical: 0,
                        frame: receipt,
                        droppable: false,
                    },
                )
                .await;
        }
    }

    pub(crate) async fn read_counts(&mut self, rid: u64, req: GetReadCounts) {
        let conv = req.conversation_id;
        if req.seqs.len() > MAX_READ_COUNT_SEQS {
            return self.error(
                rid,
                ErrorCode::InvalidArgument,
                format!("at most {MAX_READ_COUNT_SEQS} seqs"),
            );
        }
        match self.readable(conv) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return self.error(rid, ErrorCode::Forbidden, "not a conversation of this user");
            }
            Err(e) => return self.storage_error(rid, &e),
        }
        let store = self.core.store.clone();
        let members: Vec<UserId> = match conversation_kind(conv) {
            Some(ConversationKind::Direct { low, high }) => {
                if low == high {
                    vec![low]
                } else {
                    vec![low, high]
                }
            }
            Some(ConversationKind::Group(g)) => {
                // Hidden members are neither counted nor count as readers: the counts would
                // reveal them.
                let mut all = Vec::new();
                let mut after = 0;
                loop {
                    let page = match store.member_records(g, after, 4096) {
                        Ok(p) => p,
                        Err(e) => return self.storage_error(rid, &e),
                    };
                    let Some(&(last, _)) = page.last() else { break };
                    all.extend(
                        page.into_iter()
                            .filter(|(_, attrs)| !crate::groups::is_hidden(attrs))
                            .map(|(u, _)| u),
                    );
                    after = last;
                    glommio::yield_if_needed().await;
                }
                all
            }
            None => Vec::new(),
        };
        // Each asked message's sender does not count as its reader.
        let mut senders = HashMap::new();
        for &seq in &req.seqs {
            if let Ok(msgs) = store.read_forward(conv, seq, 1)
                && let Some(m) = msgs.first()
                && m.seq == seq
            {
                senders.insert(seq, m.sender);
            }
        }
        // Unless new members see the history, a member has not read what came before the
        // event that added them (their read position starts there), and the asker gets no
        // count of a message they cannot read.
        let hide = !self.core.cfg.new_members_see_history
            && matches!(conversation_kind(conv), Some(ConversationKind::Group(_)));
        let own_floor = if hide {
            match store.read_and_joined_seq(self.user, conv) {
                Ok((_, joined)) => joined,
                Err(e) => return self.storage_error(rid, &e),
            }
        } else {
            0
        };
        let mut counts = vec![0u32; req.seqs.len()];
        for (i, &member) in members.iter().enumerate() {
            let (read, joined) = match store.read_and_joined_seq(member, conv) {
                Ok((read, joined)) if hide => (read, joined),
                Ok((read, _)) => (read, 0),
                Err(e) => return self.storage_error(rid, &e),
            };
            for (count, seq) in counts.iter_mut().zip(&req.seqs) {
                if *seq > 0
                    && *seq >= joined
                    && *seq >= own_floor
                    && read >= *seq
                    && senders.get(seq) != Some(&member)
                {
                    *count += 1;
                }
            }
            if i % 1024 == 1023 {
                glommio::yield_if_needed().await;
            }
        }
        self.reply(&Frame::new(
            rid,
            ReadCounts {
                conversation_id: conv,
                counts,
                members: members.len() as u32,
            },
        ));
    }

    pub(crate) async fn typing(&mut self, rid: u64, req: Typing) {
        let Some(target) = req.target else {
            return self.error(rid, ErrorCode::InvalidArgument, "target is required");
        };
        if !valid_id(&target.id) {
            return self.error(
                rid,
                ErrorCode::InvalidArgument,
                "target.id must be 1..=64 bytes without control characters",
            );
        }
        let notice = |core: &Core, target: Target| {
            core.encode(&Frame::new(
                0,
                Typing {
                    target: Some(target),
                    typing: req.typing,
                    from: self.user_name.to_string(),
                },
            ))
        };
        match TargetKind::try_from(target.kind) {
            Ok(TargetKind::User) => {
                let peer = match self.core.store.lookup_user(&target.id) {
                    Ok(Some(p)) => p,
                    Ok(None) => return self.error(rid, ErrorCode::NotFound, "no such user"),
                    Err(e) => return self.storage_error(rid, &e),
                };
                // Whoever may not message the peer (blocked, or no friend where only friends
                // may) may not show them typing either.
                if let Err((code, msg)) = self.may_message(peer) {
                    return self.error(rid, code, msg);
                }
                // The peer sees who is typing to them.
                let frame = notice(&self.core, Target::user(self.user_name.to_string()));
                let core = self.core.router.user(&target.id).core;
                self.core
                    .send_to_core(
                        core,
                        ShardMsg::ToUser {
                            user: peer,
                            except_logical: self.session.logical,
                            frame,
                            droppable: true,
                        },
                    )
                    .await;
            }
            Ok(TargetKind::Group) => {
                let Some((group, _)) = self.find_group(rid, &target.id) else {
                    return;
                };
                match self.core.store.membership(self.user, group) {
                    Ok(Some(0)) => {}
                    Ok(_) => {
                        return self.error(rid, ErrorCode::NotMember, "not a member of this group");
                    }
                    Err(e) => return self.storage_error(rid, &e),
                }
                let frame = notice(&self.core, target);
                for core in 0..self.core.router.cores() {
                    self.core
                        .send_to_core(
                            core,
                            ShardMsg::ToGroup {
                                group,
                                except_logical: self.session.logical,
                                frame: frame.clone(),
                            },
                        )
                        .await;
                }
            }
            _ => self.error(
                rid,
                ErrorCode::InvalidArgument,
                "typing goes to a USER or a GROUP",
            ),
        }
    }

    pub(crate) async fn subscribe_presence(&mut self, rid: u64, req: SubscribePresence) {
        if req.user_ids.len() > MAX_PRESENCE_PER_REQUEST {
            return self.error(
                rid,
                ErrorCode::InvalidArgument,
                format!("at most {MAX_PRESENCE_PER_REQUEST} users per request"),
            );
        }
        if req.user_ids.iter().any(|u| !valid_id(u)) {
            return self.error(
                rid,
                ErrorCode::InvalidArgument,
                "user ids must be 1..=64 bytes without control characters",
            );
        }
        if !req.unsubscribe {
            let mut new: Vec<&str> = req
                .user_ids
                .iter()
                .map(String::as_str)
                .filter(|u| !self.following.contains_key(*u))
                .collect();
            new.sort_unstable();
            new.dedup();
            if self.following.len() + new.len() > MAX_FOLLOWED {
                return self.error(
                    rid,
                    ErrorCode::LimitExceeded,
                    format!("a connection follows at most {MAX_FOLLOWED} users"),
                );
            }
        }
        let mut changes = Vec::new();
        for name in &req.user_ids {
            if req.unsubscribe {
                if let Some(id) = self.following.remove(name.as_str()) {
                    changes.push((id, Arc::<str>::from(name.as_str()), false));
                }
            } else if !self.following.contains_key(name.as_str()) {
                let id = match self.core.user_id(name) {
                    Ok(id) => id,
                    Err(e) => return self.storage_error(rid, &e),
                };
                self.following.insert(Arc::from(name.as_str()), id);
                changes.push((id, Arc::from(name.as_str()), true));
            }
        }
        self.reply(&Frame::new(
            rid,
            PresenceSubscribed {
                following: self.following.len() as u32,
            },
        ));
        for (user, name, add) in changes {
            self.follow_on_core(user, name, add).await;
        }
    }

    async fn follow_on_core(&self, user: UserId, name: Arc<str>, add: bool) {
        let core = self.core.router.user(&name).core;
        self.core
            .send_to_core(
                core,
                ShardMsg::Follow {
                    user,
                    name,
                    core: self.core.id,
                    session: self.session.id,
                    add,
                },
            )
            .await;
    }

    /// Cancels this connection's presence subscriptions (it is closing).
    pub(crate) async fn unfollow_all(&mut self) {
        let following = std::mem::take(&mut self.following);
        for (name, user) in following {
            self.follow_on_core(user, name, false).await;
        }
    }
}
