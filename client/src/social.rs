//! Read positions and receipts, presence, conversation settings, recall, and the social graph
//! (friends, blacklist, profiles): one request each, answered by the server. Live rooms are in
//! `rooms.rs`.
//!
//! What the server pushes for these (another device's read position, a peer's read receipt,
//! typing, presence changes, another device's conversation settings, friend events) arrives as
//! [`Event`](crate::Event)s.

use prost::Message;
use tern_protocol::v1::{
    AcceptFriend, AddFriend, Block, DeclineFriend, DeleteFriend, GetProfiles, ListUsers,
    SetProfile, Unblock, social_request::Op,
};
use tern_protocol::{
    Body, ContentType, ConversationSettings, Deliver, DeviceSettings, GetReadCounts, ListKind,
    MarkRead, RECALL_EVENT_TYPE, ReadCounts, Recall, RecallEvent, RecallOk, SetConversation,
    SetDevice, SocialRequest, SocialResponse, SubscribePresence, Target, Typing, UserProfile,
};

use crate::{Client, Result, client::unexpected};

/// The recall that message `m` records: `Some` only for a SYSTEM message with custom type
/// `tern.recall` whose payload decodes as a [`RecallEvent`].
pub fn recall_event(m: &Deliver) -> Option<RecallEvent> {
    if m.content_type != ContentType::System as u32 || m.custom_type != RECALL_EVENT_TYPE {
        return None;
    }
    RecallEvent::decode(&m.payload[..]).ok()
}

impl Client {
    /// Marks `conversation_id` read up to `seq`; returns the resulting read position (never
    /// lower than before, at most the latest message).
    pub async fn mark_read(&self, conversation_id: u64, seq: u64) -> Result<u64> {
        let body = Body::MarkRead(MarkRead {
            conversation_id,
            seq,
        });
        match self.request(body).await? {
            Body::ReadState(s) => Ok(s.read_seq),
            other => Err(unexpected("ReadState", &other)),
        }
    }

    /// For each of `seqs` (at most 100), how many members other than its sender read it.
    pub async fn read_counts(&self, conversation_id: u64, seqs: Vec<u64>) -> Result<ReadCounts> {
        let body = Body::GetReadCounts(GetReadCounts {
            conversation_id,
            seqs,
        });
        match self.request(body).await? {
            Body::ReadCounts(r) => Ok(r),
            other => Err(unexpected("ReadCounts", &other)),
        }
    }

    /// Tells `target` (a user, or a group's members) that this user is typing, or with
    /// `typing` false that they stopped. Fire and forget: the server answers nothing unless it
    /// refuses (`NOT_FOUND`, `NOT_MEMBER`), and such a refusal is only logged. Returns once the
    /// notice is queued; fails only if the client has stopped, and while disconnected the
    /// notice is dropped. Nothing is stored: a notice that does not arrive is simply not seen.
    pub fn typing(&self, target: Target, typing: bool) -> Result<()> {
        self.notify(Body::Typing(Typing {
            target: Some(target),
            typing,
            from: String::new(),
        }))
    }

    /// Follows (or with `unsubscribe`, stops following) whether `users` are online (at most
    /// 1000 per call); returns how many users the connection follows. Their state then arrives
    /// as [`Event::Presence`](crate::Event::Presence): each newly followed user's current state,
    /// then each change.
    ///
    /// The client keeps following them across reconnects (see the crate docs, Presence) from
    /// the server's answer until that of the call that unsubscribes them; a call that fails
    /// (refused, or [`ClientError::Disconnected`](crate::ClientError::Disconnected)) changes
    /// nothing the client keeps, and one that timed out counts if its answer arrives later.
    pub async fn subscribe_presence(
        &self,
        users: impl IntoIterator<Item = impl AsRef<str>>,
        unsubscribe: bool,
    ) -> Result<u32> {
        let body = Body::SubscribePresence(SubscribePresence {
            user_ids: users.into_iter().map(|u| u.as_ref().to_owned()).collect(),
            unsubscribe,
        });
        match self.request(body).await? {
            Body::PresenceSubscribed(s) => Ok(s.following),
            other => Err(unexpected("PresenceSubscribed", &other)),
        }
    }

    /// Changes this user's settings of a conversation (the fields present in `change`);
    /// returns the resulting settings, which the user's other devices get too.
    pub async fn set_conversation(&self, change: SetConversation) -> Result<ConversationSettings> {
        match self.request(Body::SetConversation(change)).await? {
            Body::ConversationSettings(s) => Ok(s),
            other => Err(unexpected("ConversationSettings", &other)),
        }
    }

    /// Changes this device's registration (push provider and token, alias, do-not-disturb:
    /// the fields present in `change`); returns the whole registration.
    pub async fn set_device(&self, change: SetDevice) -> Result<DeviceSettings> {
        match self.request(Body::SetDevice(change)).await? {
            Body::DeviceSettings(s) => Ok(s),
            other => Err(unexpected("DeviceSettings", &other)),
        }
    }

    /// Recalls message `seq` of `conversation_id`.
    pub async fn recall(&self, conversation_id: u64, seq: u64) -> Result<RecallOk> {
        let body = Body::Recall(Recall {
            conversation_id,
            seq,
        });
        match self.request(body).await? {
            Body::RecallOk(r) => Ok(r),
            other => Err(unexpected("RecallOk", &other)),
        }
    }

    /// One social operation (the op messages are in `tern_protocol::v1`).
    pub async fn social(&self, op: Op) -> Result<SocialResponse> {
        match self
            .request(Body::Social(SocialRequest { op: Some(op) }))
            .await?
        {
            Body::SocialResponse(r) => Ok(r),
            other => Err(unexpected("SocialResponse", &other)),
        }
    }

    /// Asks `user` to be friends; `Ok(true)` if they had asked first, so you are friends now.
    pub async fn add_friend(
        &self,
        user: impl Into<String>,
        message: impl Into<String>,
    ) -> Result<bool> {
        let op = Op::AddFriend(AddFriend {
            user_id: user.into(),
            message: message.into(),
        });
        Ok(self.social(op).await?.friends)
    }

    /// Accepts `user`'s friend request.
    pub async fn accept_friend(&self, user: impl Into<String>) -> Result<()> {
        let op = Op::AcceptFriend(AcceptFriend {
            user_id: user.into(),
        });
        self.social(op).await.map(drop)
    }

    /// Declines `user`'s friend request.
    pub async fn decline_friend(&self, user: impl Into<String>) -> Result<()> {
        let op = Op::DeclineFriend(DeclineFriend {
            user_id: user.into(),
        });
        self.social(op).await.map(drop)
    }

    /// Ends the friendship with `user`.
    pub async fn delete_friend(&self, user: impl Into<String>) -> Result<()> {
        let op = Op::DeleteFriend(DeleteFriend {
            user_id: user.into(),
        });
        self.social(op).await.map(drop)
    }

    /// Blocks `user`: their 1:1 messages and friend requests are refused with `BLOCKED`, and a
    /// friendship with them ends, with the requests between you (unless the server sets
    /// `block_keeps_friends`).
    pub async fn block(&self, user: impl Into<String>) -> Result<()> {
        let op = Op::Block(Block {
            user_id: user.into(),
        });
        self.social(op).await.map(drop)
    }

    /// Unblocks `user`.
    pub async fn unblock(&self, user: impl Into<String>) -> Result<()> {
        let op = Op::Unblock(Unblock {
            user_id: user.into(),
        });
        self.social(op).await.map(drop)
    }

    /// One page of a list; go on with `SocialResponse::next_page_token` until it is 0.
    pub async fn list_users(
        &self,
        kind: ListKind,
        page_token: u64,
        limit: u32,
    ) -> Result<SocialResponse> {
        let op = Op::List(ListUsers {
            kind: kind.into(),
            page_token,
            limit,
        });
        self.social(op).await
    }

    /// Replaces this user's profile.
    pub async fn set_profile(&self, profile: UserProfile) -> Result<()> {
        let op = Op::SetProfile(SetProfile {
            profile: Some(profile),
        });
        self.social(op).await.map(drop)
    }

    /// The profiles of `users` (at most 100; users without one are left out).
    pub async fn get_profiles(
        &self,
        users: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> Result<Vec<UserProfile>> {
        let op = Op::GetProfiles(GetProfiles {
            user_ids: users.into_iter().map(|u| u.as_ref().to_owned()).collect(),
        });
        Ok(self.social(op).await?.profiles)
    }
}
