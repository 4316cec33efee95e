//! Groups: [`Client::group`] and its conveniences, and [`group_event`], which reads a group's
//! change out of the message that records it.
//!
//! A group is one conversation: chat messages go to it with [`Client::send`] and
//! [`Target::group`](crate::Target::group), and every change of the group (members, roles, mutes,
//! profile) is a message in it too, a SYSTEM message that [`group_event`] decodes. The
//! conversation's sequence orders both.

use std::time::Duration;

use prost::Message;
use tern_protocol::{
    Body, ContentType, Deliver, GROUP_EVENT_TYPE, GroupEvent, GroupInfo, GroupProfile,
    GroupRequest, GroupResponse, GroupRole, MemberPage,
    v1::{
        CreateGroup, DissolveGroup, GetGroup, InviteMembers, JoinGroup, KickMembers, LeaveGroup,
        ListMembers, MuteAll, MuteMember, SetRole, TransferOwner, UpdateGroup, group_request::Op,
    },
};

use crate::{Client, ClientError, Result, client::unexpected};

/// The group change that message `m` records: `Some` only for a SYSTEM message with custom type
/// `tern.group` (`tern_protocol::GROUP_EVENT_TYPE`) whose payload decodes as a [`GroupEvent`].
pub fn group_event(m: &Deliver) -> Option<GroupEvent> {
    if m.content_type != ContentType::System as u32 || m.custom_type != GROUP_EVENT_TYPE {
        return None;
    }
    GroupEvent::decode(&m.payload[..]).ok()
}

/// `users` as owned strings.
fn strings(users: impl IntoIterator<Item = impl AsRef<str>>) -> Vec<String> {
    users.into_iter().map(|u| u.as_ref().to_owned()).collect()
}

/// `d` in whole milliseconds, rounded up (so that a non-zero duration never means "unmute").
fn millis_rounded_up(d: Duration) -> u64 {
    let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// Group operations. Each is one request answered by a [`GroupResponse`]; a refusal is
/// [`ClientError::Server`] with the server's code (e.g. `FORBIDDEN` for a member who may not do
/// it, `NOT_MEMBER`, `NOT_FOUND` for an unknown group, `CONFLICT` for a group id in use,
/// `LIMIT_EXCEEDED` for a full group). [`GroupResponse::event_seq`] is the sequence number of
/// the event the change appended to the group's conversation (0 if nothing changed).
///
/// Group requests are not retried: one in flight when the connection drops fails with
/// [`ClientError::Disconnected`] and may or may not have been applied (the group's event
/// messages, or [`Client::group_info`], tell). With the dual channel they go on one path.
impl Client {
    /// Sends one group operation `op` on group `group_id` and returns the server's answer. The
    /// conveniences below build `op` for each operation; the op messages are in
    /// `tern_protocol::v1`.
    pub async fn group(&self, group_id: impl Into<String>, op: Op) -> Result<GroupResponse> {
        let body = Body::Group(GroupRequest {
            group_id: group_id.into(),
            op: Some(op),
        });
        match self.request(body).await? {
            Body::GroupResponse(response) => Ok(response),
            other => Err(unexpected("GroupResponse", &other)),
        }
    }

    /// Creates group `group_id` (1..=64 bytes, chosen by the client) with this user as its
    /// owner, `profile` and the initial `members` besides the owner (at most 500; none:
    /// `[] as [&str; 0]`). The answer carries the new group's [`GroupInfo`].
    pub async fn create_group(
        &self,
        group_id: impl Into<String>,
        profile: GroupProfile,
        members: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> Result<GroupResponse> {
        let create = CreateGroup {
            profile: Some(Box::new(profile)),
            members: strings(members),
        };
        self.group(group_id, Op::Create(create)).await
    }

    /// Joins a group whose join policy is `FREE` (others answer `FORBIDDEN`).
    pub async fn join_group(&self, group_id: impl Into<String>) -> Result<GroupResponse> {
        self.group(group_id, Op::Join(JoinGroup::default())).await
    }

    /// Leaves a group. The owner cannot (`FORBIDDEN`): transfer the ownership or dissolve the
    /// group instead.
    pub async fn leave_group(&self, group_id: impl Into<String>) -> Result<GroupResponse> {
        self.group(group_id, Op::Leave(LeaveGroup {})).await
    }

    /// Adds `users` to a group (at most 500 at once); users already members are skipped. In
    /// `FREE` and `INVITE_ONLY` groups any member may invite, in `APPROVAL` groups the owner
    /// and admins.
    pub async fn invite(
        &self,
        group_id: impl Into<String>,
        users: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> Result<GroupResponse> {
        let invite = InviteMembers {
            user_ids: strings(users),
        };
        self.group(group_id, Op::Invite(invite)).await
    }

    /// Removes `users` from a group, with a `reason` recorded in the event ("" for none). The
    /// owner and admins may; an admin cannot remove the owner or another admin.
    pub async fn kick_members(
        &self,
        group_id: impl Into<String>,
        users: impl IntoIterator<Item = impl AsRef<str>>,
        reason: impl Into<String>,
    ) -> Result<GroupResponse> {
        let kick = KickMembers {
            user_ids: strings(users),
            reason: reason.into(),
        };
        self.group(group_id, Op::Kick(kick)).await
    }

    /// Makes member `user` [`GroupRole::RoleAdmin`] or [`GroupRole::RoleMember`] again (the
    /// owner only; ownership moves with [`Client::transfer_owner`]).
    pub async fn set_role(
        &self,
        group_id: impl Into<String>,
        user: impl Into<String>,
        role: GroupRole,
    ) -> Result<GroupResponse> {
        let set = SetRole {
            user_id: user.into(),
            role: role.into(),
        };
        self.group(group_id, Op::SetRole(set)).await
    }

    /// Mutes member `user` for `duration` (rounded up to whole milliseconds; `Duration::ZERO`
    /// unmutes). A muted member's sends to the group fail with `MUTED`. The owner and admins
    /// may; an admin cannot mute the owner or another admin.
    pub async fn mute_member(
        &self,
        group_id: impl Into<String>,
        user: impl Into<String>,
        duration: Duration,
    ) -> Result<GroupResponse> {
        let mute = MuteMember {
            user_id: user.into(),
            duration_ms: millis_rounded_up(duration),
        };
        self.group(group_id, Op::Mute(mute)).await
    }

    /// Mutes every member except the owner and admins (`muted` true), or lifts it.
    pub async fn mute_all(
        &self,
        group_id: impl Into<String>,
        muted: bool,
    ) -> Result<GroupResponse> {
        self.group(group_id, Op::MuteAll(MuteAll { muted })).await
    }

    /// Changes the fields present in `profile` (the owner and admins); a `custom` entry with an
    /// empty value is removed.
    pub async fn update_group(
        &self,
        group_id: impl Into<String>,
        profile: GroupProfile,
    ) -> Result<GroupResponse> {
        let update = UpdateGroup {
            profile: Some(Box::new(profile)),
        };
        self.group(group_id, Op::Update(update)).await
    }

    /// Hands the ownership to member `user` (the owner only); the old owner becomes a member.
    pub async fn transfer_owner(
        &self,
        group_id: impl Into<String>,
        user: impl Into<String>,
    ) -> Result<GroupResponse> {
        let transfer = TransferOwner {
            user_id: user.into(),
        };
        self.group(group_id, Op::Transfer(transfer)).await
    }

    /// Dissolves a group (the owner only): every member is removed, the history stays readable
    /// to them up to the dissolve event, and the group id cannot be used again.
    pub async fn dissolve_group(&self, group_id: impl Into<String>) -> Result<GroupResponse> {
        self.group(group_id, Op::Dissolve(DissolveGroup {})).await
    }

    /// The group's info: owner, profile, member count, latest sequence number. Members get all
    /// of it; anyone else gets a `FREE` or `APPROVAL` group's public part (docs/PROTOCOL.md,
    /// `get`) and [`ErrorCode::NotMember`](crate::ErrorCode::NotMember) for an `INVITE_ONLY` one.
    pub async fn group_info(&self, group_id: impl Into<String>) -> Result<GroupInfo> {
        let response = self.group(group_id, Op::Get(GetGroup {})).await?;
        response
            .info
            .map(|info| *info)
            .ok_or_else(|| ClientError::Protocol("GroupResponse to GetGroup without info".into()))
    }

    /// One page of a group's members (members only), at most `limit` (0: the server's
    /// default). Start with `page_token` 0 and go on with [`MemberPage::next_page_token`] until
    /// it is 0. An answer without a page counts as an empty last page.
    pub async fn list_members(
        &self,
        group_id: impl Into<String>,
        page_token: u64,
        limit: u32,
    ) -> Result<MemberPage> {
        let list = ListMembers { page_token, limit };
        let response = self.group(group_id, Op::ListMembers(list)).await?;
        Ok(response.members.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use tern_protocol::{GroupEventKind, Target};

    use super::*;

    fn system(custom_type: &str, payload: Vec<u8>) -> Deliver {
        Deliver {
            conversation_id: 9,
            seq: 3,
            sender: "alice".into(),
            target: Some(Target::group("g1")),
            server_time_ms: 5,
            client_msg_id: String::new(),
            content_type: ContentType::System as u32,
            custom_type: custom_type.into(),
            payload: Bytes::from(payload),
            recalled: false,
        }
    }

    fn kicked() -> GroupEvent {
        GroupEvent {
            kind: GroupEventKind::GroupKicked.into(),
            actor: "alice".into(),
            user_ids: vec!["bob".into()],
            reason: "spam".into(),
            ..Default::default()
        }
    }

    #[test]
    fn group_event_decodes_only_group_system_messages() {
        let m = system(GROUP_EVENT_TYPE, kicked().encode_to_vec());
        assert_eq!(group_event(&m), Some(kicked()));

        let mut text = m.clone();
        text.content_type = ContentType::Text as u32;
        assert_eq!(group_event(&text), None, "not SYSTEM");
        assert_eq!(
            group_event(&system("tern.other", kicked().encode_to_vec())),
            None,
            "another custom type"
        );
        assert_eq!(
            group_event(&system(GROUP_EVENT_TYPE, vec![0xff, 0xff, 0xff])),
            None,
            "undecodable payload"
        );
    }

    #[test]
    fn mute_durations_round_up_to_whole_milliseconds() {
        assert_eq!(millis_rounded_up(Duration::ZERO), 0);
        assert_eq!(millis_rounded_up(Duration::from_nanos(1)), 1);
        assert_eq!(millis_rounded_up(Duration::from_millis(1500)), 1500);
        assert_eq!(millis_rounded_up(Duration::from_micros(1500)), 2);
        assert_eq!(millis_rounded_up(Duration::MAX), u64::MAX);
    }
}
