//! Friends, friend requests, the blacklist, user profiles, per-user conversation settings and
//! message recall.
//!
//! Relations are stored per user and direction (the store's `RelationKind`); a friendship or a
//! pending request is written for both users in one atomic batch. Operations run on the acting
//! user's core against committed state; two users acting on each other at the same moment
//! (both accepting, one deleting while the other accepts) end in a consistent state because
//! every write sets both directions at once, though a friend limit may be passed by one.
//! Notifications (`SocialEvent`) go to the other user's online devices and the actor's other
//! devices; offline users find pending requests in their lists.
//!
//! Recall appends a tombstone event with the store's `recall` set, so the message's body is
//! emptied in the same batch as the event that announces it. A 1:1 recall goes through the
//! conversation's owner core like a Send; a group recall through the group's owner, which
//! checks the role.

use prost::Message;
use tern_protocol::v1::social_request::Op;
use tern_protocol::v1::{
    ConversationSettings as WireSettings, Frame, ListKind, ListedUser, Recall, RecallEvent,
    SetConversation, SocialEvent, SocialEventKind, SocialRequest, SocialResponse, UserProfile,
};
use tern_protocol::{ContentType, ErrorCode, RECALL_EVENT_TYPE, RESERVED_TYPE_PREFIX};
use tern_storage::{
    AppendRequest, ConversationKind, ConversationSettings, RelationChange, RelationKind,
    SettingsChange, UserId, conversation_kind,
};

use crate::core::{AppendMsg, Core, Recipient, ShardMsg};
use crate::groups::{GroupWhat, Refusal, refuse, storage_refusal};
use crate::rooms::is_room;
use crate::session::Ctx;
use crate::token::valid_id;

/// Most users one GetProfiles may name.
pub const MAX_PROFILES_PER_REQUEST: usize = 100;
/// Largest encoded profile.
pub const MAX_PROFILE_BYTES: usize = 4096;
/// Longest friend request message.
pub const MAX_REQUEST_MESSAGE: usize = 256;

/// The content of a recall's tombstone event.
pub fn recall_request(conv: u64, seq: u64, actor: UserId, actor_name: &str) -> AppendRequest {
    AppendRequest {
        conversation: conv,
        sender: actor,
        // Idempotent: a retried Recall finds the first tombstone.
        client_msg_id: format!("tern.recall:{conv}:{seq}"),
        content_type: ContentType::System as u32,
        custom_type: RECALL_EVENT_TYPE.to_owned(),
        payload: RecallEvent {
            seq,
            actor: actor_name.to_owned(),
        }
        .encode_to_vec()
        .into(),
        recall: Some(seq),
        ..AppendRequest::default()
    }
}

impl Core {
    /// Checks a recall of `seq` in `conv` by `actor`: the message must not be recalled yet nor
    /// be one of the server's events, and unless `admin` it must be the actor's and within the
    /// recall window.
    pub fn check_recall(
        &self,
        conv: u64,
        seq: u64,
        actor: UserId,
        admin: bool,
    ) -> Result<(), Refusal> {
        let msgs = self
            .store
            .read_forward(conv, seq, 1)
            .map_err(|e| storage_refusal(&e))?;
        let Some(m) = msgs.into_iter().next().filter(|m| m.seq == seq) else {
            return refuse(ErrorCode::NotFound, "no such message");
        };
        if m.recalled {
            return refuse(ErrorCode::Conflict, "the message was recalled already");
        }
        // A group's events are how its members rebuild its membership: they stay, for admins
        // too, and so do recall notices.
        if m.content_type == ContentType::System as u32
            && m.custom_type.starts_with(RESERVED_TYPE_PREFIX)
        {
            return refuse(
                ErrorCode::Forbidden,
                "group events and recall notices cannot be recalled",
            );
        }
        if admin {
            return Ok(());
        }
        if m.sender != actor {
            return refuse(ErrorCode::Forbidden, "only the sender may recall a message");
        }
        let age = crate::core::now_ms().saturating_sub(m.timestamp_ms);
        if age > self.cfg.recall_window_ms {
            return refuse(
                ErrorCode::Forbidden,
                format!(
                    "the recall window of {} ms has passed",
                    self.cfg.recall_window_ms
                ),
            );
        }
        Ok(())
    }
}

impl Ctx {
    fn other_user(&self, name: &str) -> Result<UserId, Refusal> {
        if !valid_id(name) {
            return refuse(
                ErrorCode::InvalidArgument,
                "user_id must be 1..=64 bytes without control characters",
            );
        }
        if name == &*self.user_name {
            return refuse(ErrorCode::InvalidArgument, "that is yourself");
        }
        self.core.user_id(name).map_err(|e| storage_refusal(&e))
    }

    fn relation(
        &self,
        user: UserId,
        kind: RelationKind,
        other: UserId,
    ) -> Result<Option<bytes::Bytes>, Refusal> {
        self.core
            .store
            .relation(user, kind, other)
            .map_err(|e| storage_refusal(&e))
    }

    fn check_friend_room(&self, user: UserId, name: &str) -> Result<(), Refusal> {
        let n = self
            .core
            .store
            .count_relations(user, RelationKind::Friend)
            .map_err(|e| storage_refusal(&e))?;
        if n >= u64::from(self.core.cfg.max_friends) {
            return refuse(
                ErrorCode::LimitExceeded,
                format!(
                    "{name} has the maximum of {} friends",
                    self.core.cfg.max_friends
                ),
            );
        }
        Ok(())
    }

    async fn write_relations(&self, changes: Vec<RelationChange>) -> Result<(), Refusal> {
        self.core
            .store
            .set_relations(changes)
            .await
            .map_err(|e| storage_refusal(&e))
    }

    /// Tells `other` (on their core) and this user's other devices about a friend operation.
    async fn notify(&self, other: UserId, other_name: &str, kind: SocialEventKind, message: &str) {
        let to_other = self.core.encode(&Frame::new(
            0,
            SocialEvent {
                kind: kind.into(),
                user_id: self.user_name.to_string(),
                message: message.to_owned(),
                group_id: String::new(),
            },
        ));
        let core = self.core.router.user(other_name).core;
        self.core
            .send_to_core(
                core,
                ShardMsg::ToUser {
                    user: other,
                    except_logical: 0,
                    frame: to_other,
                    droppable: false,
                },
            )
            .await;
        if kind != SocialEventKind::FriendRequest {
            let to_self = self.core.encode(&Frame::new(
                0,
                SocialEvent {
                    kind: kind.into(),
                    user_id: other_name.to_owned(),
                    message: String::new(),
                    group_id: String::new(),
                },
            ));
            self.core
                .push_to_user(self.user, self.session.logical, &to_self, false);
        }
    }

    fn befriend(me: UserId, other: UserId) -> Vec<RelationChange> {
        let change = |user, kind, other, value: Option<bytes::Bytes>| RelationChange {
            user,
            kind,
            other,
            value,
        };
        vec![
            change(me, RelationKind::Friend, other, Some(bytes::Bytes::new())),
            change(other, RelationKind::Friend, me, Some(bytes::Bytes::new())),
            change(me, RelationKind::FriendRequestReceived, other, None),
            change(other, RelationKind::FriendRequestSent, me, None),
            change(me, RelationKind::FriendRequestSent, other, None),
            change(other, RelationKind::FriendRequestReceived, me, None),
        ]
    }

    pub(crate) async fn social(&mut self, rid: u64, req: SocialRequest) {
        let Some(op) = req.op else {
            return self.error(rid, ErrorCode::InvalidArgument, "op is required");
        };
        match self.social_op(op).await {
            Ok(resp) => self.reply(&Frame::new(rid, resp)),
            Err((code, msg)) => self.error(rid, code, msg),
        }
    }

    async fn social_op(&mut self, op: Op) -> Result<SocialResponse, Refusal> {
        let me = self.user;
        let mut resp = SocialResponse::default();
        match op {
            Op::AddFriend(req) => {
                if req.message.len() > MAX_REQUEST_MESSAGE {
                    return refuse(
                        ErrorCode::InvalidArgument,
                        format!("message exceeds {MAX_REQUEST_MESSAGE} bytes"),
                    );
                }
                let other = self.other_user(&req.user_id)?;
                if self.relation(me, RelationKind::Friend, other)?.is_some() {
                    return refuse(ErrorCode::Conflict, "already friends");
                }
                if self.relation(other, RelationKind::Blocked, me)?.is_some() {
                    return refuse(ErrorCode::Blocked, "the user has blocked you");
                }
                self.check_friend_room(me, "you")?;
                if self
                    .relation(me, RelationKind::FriendRequestReceived, other)?
                    .is_some()
                {
                    // They asked first: this is an accept.
                    self.check_friend_room(other, &req.user_id)?;
                    self.write_relations(Self::befriend(me, other)).await?;
                    self.notify(other, &req.user_id, SocialEventKind::FriendAdded, "")
                        .await;
                    resp.friends = true;
                } else {
                    let msg = bytes::Bytes::from(req.message.clone());
                    self.write_relations(vec![
                        RelationChange {
                            user: me,
                            kind: RelationKind::FriendRequestSent,
                            other,
                            value: Some(msg.clone()),
                        },
                        RelationChange {
                            user: other,
                            kind: RelationKind::FriendRequestReceived,
                            other: me,
                            value: Some(msg),
                        },
                    ])
                    .await?;
                    self.notify(
                        other,
                        &req.user_id,
                        SocialEventKind::FriendRequest,
                        &req.message,
                    )
                    .await;
                }
            }
            Op::AcceptFriend(req) => {
                let other = self.other_user(&req.user_id)?;
                if self
                    .relation(me, RelationKind::FriendRequestReceived, other)?
                    .is_none()
                {
                    return refuse(ErrorCode::NotFound, "no friend request from this user");
                }
                self.check_friend_room(me, "you")?;
                self.check_friend_room(other, &req.user_id)?;
                self.write_relations(Self::befriend(me, other)).await?;
                self.notify(other, &req.user_id, SocialEventKind::FriendAdded, "")
                    .await;
                resp.friends = true;
            }
            Op::DeclineFriend(req) => {
                let other = self.other_user(&req.user_id)?;
                if self
                    .relation(me, RelationKind::FriendRequestReceived, other)?
                    .is_none()
                {
                    return refuse(ErrorCode::NotFound, "no friend request from this user");
                }
                self.write_relations(vec![
                    RelationChange {
                        user: me,
                        kind: RelationKind::FriendRequestReceived,
                        other,
                        value: None,
                    },
                    RelationChange {
                        user: other,
                        kind: RelationKind::FriendRequestSent,
                        other: me,
                        value: None,
                    },
                ])
                .await?;
                self.notify(other, &req.user_id, SocialEventKind::FriendDeclined, "")
                    .await;
            }
            Op::DeleteFriend(req) => {
                let other = self.other_user(&req.user_id)?;
                if self.relation(me, RelationKind::Friend, other)?.is_none() {
                    return refuse(ErrorCode::NotFound, "not friends");
                }
                self.write_relations(vec![
                    RelationChange {
                        user: me,
                        kind: RelationKind::Friend,
                        other,
                        value: None,
                    },
                    RelationChange {
                        user: other,
                        kind: RelationKind::Friend,
                        other: me,
                        value: None,
                    },
                ])
                .await?;
                self.notify(other, &req.user_id, SocialEventKind::FriendDeleted, "")
                    .await;
            }
            Op::Block(req) => {
                let other = self.other_user(&req.user_id)?;
                let mut changes = vec![RelationChange {
                    user: me,
                    kind: RelationKind::Blocked,
                    other,
                    value: Some(bytes::Bytes::new()),
                }];
                // Blocking ends a friendship both ways, and any request between the two,
                // unless the server keeps friends.
                let were_friends = !self.core.cfg.block_keeps_friends
                    && self.relation(me, RelationKind::Friend, other)?.is_some();
                if !self.core.cfg.block_keeps_friends {
                    changes.extend(
                        Self::befriend(me, other)
                            .into_iter()
                            .map(|c| RelationChange { value: None, ..c }),
                    );
                }
                self.write_relations(changes).await?;
                if were_friends {
                    self.notify(other, &req.user_id, SocialEventKind::FriendDeleted, "")
                        .await;
                }
            }
            Op::Unblock(req) => {
                let other = self.other_user(&req.user_id)?;
                if self.relation(me, RelationKind::Blocked, other)?.is_none() {
                    return refuse(ErrorCode::NotFound, "the user is not blocked");
                }
                self.write_relations(vec![RelationChange {
                    user: me,
                    kind: RelationKind::Blocked,
                    other,
                    value: None,
                }])
                .await?;
            }
            Op::List(req) => {
                let kind = match ListKind::try_from(req.kind) {
                    Ok(ListKind::ListFriends) => RelationKind::Friend,
                    Ok(ListKind::ListRequestsReceived) => RelationKind::FriendRequestReceived,
                    Ok(ListKind::ListRequestsSent) => RelationKind::FriendRequestSent,
                    Ok(ListKind::ListBlocked) => RelationKind::Blocked,
                    Err(_) => return refuse(ErrorCode::InvalidArgument, "unknown list kind"),
                };
                let limit = if req.limit == 0 {
                    100
                } else {
                    req.limit.min(self.core.cfg.max_page)
                } as usize;
                let mut page = self
                    .core
                    .store
                    .relations(me, kind, req.page_token, limit + 1)
                    .map_err(|e| storage_refusal(&e))?;
                if page.len() > limit {
                    page.truncate(limit);
                    resp.next_page_token = page.last().map_or(0, |(u, _)| *u);
                }
                for (u, value) in page {
                    let name = self
                        .core
                        .store
                        .user_name(u)
                        .map_err(|e| storage_refusal(&e))?;
                    resp.users.push(ListedUser {
                        user_id: name.unwrap_or_default(),
                        message: String::from_utf8_lossy(&value).into_owned(),
                    });
                }
            }
            Op::SetProfile(req) => {
                let mut profile = req.profile.unwrap_or_default();
                profile.user_id = self.user_name.to_string();
                check_profile(&profile)?;
                self.core
                    .store
                    .set_user_profile(me, profile.encode_to_vec().into())
                    .await
                    .map_err(|e| storage_refusal(&e))?;
            }
            Op::GetProfiles(req) => {
                if req.user_ids.len() > MAX_PROFILES_PER_REQUEST {
                    return refuse(
                        ErrorCode::InvalidArgument,
                        format!("at most {MAX_PROFILES_PER_REQUEST} users per request"),
                    );
                }
                for name in &req.user_ids {
                    if !valid_id(name) {
                        return refuse(
                            ErrorCode::InvalidArgument,
                            "user ids must be 1..=64 bytes without control characters",
                        );
                    }
                    let Some(id) = self
                        .core
                        .store
                        .lookup_user(name)
                        .map_err(|e| storage_refusal(&e))?
                    else {
                        continue;
                    };
                    let Some(bytes) = self
                        .core
                        .store
                        .user_profile(id)
                        .map_err(|e| storage_refusal(&e))?
                    else {
                        continue;
                    };
                    let mut p = UserProfile::decode(bytes).map_err(|_| {
                        (
                            ErrorCode::Internal,
                            "stored profile does not decode".to_owned(),
                        )
                    })?;
                    p.user_id.clone_from(name);
                    resp.profiles.push(p);
                }
            }
        }
        Ok(resp)
    }

    /// Whether this user may send a 1:1 message to `recipient` (blacklist, friends-only option).
    pub(crate) fn may_message(&self, recipient: UserId) -> Result<(), Refusal> {
        if recipient == self.user || self.admin {
            return Ok(());
        }
        if self
            .relation(recipient, RelationKind::Blocked, self.user)?
            .is_some()
        {
            return refuse(ErrorCode::Blocked, "the recipient has blocked you");
        }
        if !self.core.cfg.allow_non_friend_messages
            && self
                .relation(self.user, RelationKind::Friend, recipient)?
                .is_none()
        {
            return refuse(
                ErrorCode::Forbidden,
                "on this server only friends may message each other",
            );
        }
        Ok(())
    }

    pub(crate) async fn set_conversation(&mut self, rid: u64, req: SetConversation) {
        let conv = req.conversation_id;
        if is_room(conv) {
            return self.error(rid, ErrorCode::InvalidArgument, "rooms have no settings");
        }
        match self.readable(conv) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return self.error(rid, ErrorCode::Forbidden, "not a conversation of this user");
            }
            Err(e) => return self.storage_error(rid, &e),
        }
        let change = SettingsChange {
            pinned: req.pinned,
            hidden: req.hidden,
            muted: req.muted,
            clear_upto_seq: req.clear_upto_seq,
        };
        let store = self.core.store.clone();
        let now = match store
            .set_conversation_settings(self.user, conv, change)
            .await
        {
            Ok(s) => s,
            Err(e) => return self.storage_error(rid, &e),
        };
        let wire = wire_settings(conv, &now.settings);
        self.reply(&Frame::new(rid, wire));
        if now.changed {
            let frame = self.core.encode(&Frame::new(0, wire));
            self.core
                .push_to_user(self.user, self.session.logical, &frame, false);
        }
    }

    pub(crate) async fn recall(&mut self, rid: u64, req: Recall) {
        let conv = req.conversation_id;
        match conversation_kind(conv) {
            Some(ConversationKind::Direct { low, high })
                if low == self.user || high == self.user =>
            {
                let peer = if low == self.user { high } else { low };
                if let Err((code, msg)) = self.core.check_recall(conv, req.seq, self.user, false) {
                    return self.error(rid, code, msg);
                }
                let peer_name = match self.core.store.user_name(peer) {
                    Ok(Some(n)) => n,
                    Ok(None) => return self.error(rid, ErrorCode::NotFound, "no such user"),
                    Err(e) => return self.storage_error(rid, &e),
                };
                let job = AppendMsg {
                    req: recall_request(conv, req.seq, self.user, &self.user_name),
                    reply: self.reply_to(rid),
                    sender_name: self.user_name.clone(),
                    to: Recipient::User {
                        id: peer,
                        name: peer_name.into(),
                    },
                    recall_of: req.seq,
                };
                let owner = self.core.router.conversation(conv).core;
                self.core.send_to_core(owner, ShardMsg::Append(job)).await;
            }
            Some(ConversationKind::Group(g)) => {
                let name = match self.core.store.group_name(g) {
                    Ok(Some(n)) => n,
                    Ok(None) => return self.error(rid, ErrorCode::NotFound, "no such group"),
                    Err(e) => return self.storage_error(rid, &e),
                };
                self.to_group_owner(rid, g, conv, &name, GroupWhat::Recall(req.seq))
                    .await;
            }
            _ => self.error(rid, ErrorCode::Forbidden, "not a conversation of this user"),
        }
    }
}

/// The wire form of a user's conversation settings.
pub fn wire_settings(conv: u64, s: &ConversationSettings) -> WireSettings {
    WireSettings {
        conversation_id: conv,
        pinned: s.pinned,
        hidden: s.hidden,
        muted: s.muted,
        cleared_seq: s.cleared_seq,
    }
}

fn check_profile(p: &UserProfile) -> Result<(), Refusal> {
    if p.nickname.len() > 256 || p.avatar_url.len() > 1024 {
        return refuse(
            ErrorCode::InvalidArgument,
            "nickname is at most 256 bytes and avatar_url at most 1024",
        );
    }
    if p.custom.len() > 20
        || p.custom
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 64 || v.len() > 1024)
    {
        return refuse(
            ErrorCode::InvalidArgument,
            "at most 20 custom fields, keys 1..=64 bytes, values at most 1024 bytes",
        );
    }
    if p.encoded_len() > MAX_PROFILE_BYTES {
        return refuse(
            ErrorCode::InvalidArgument,
            format!("the profile exceeds {MAX_PROFILE_BYTES} bytes"),
        );
    }
    Ok(())
}
