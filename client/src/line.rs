//! The one-line text formats the `tern` CLI prints, so scripts (and tests) can rely on them.
//!
//! A message: `conversation=<id> seq=<n> from=<sender> time=<ms> text=<text>`. The text is the
//! payload as UTF-8 and runs to the end of the line; backslashes and control characters in it
//! are escaped (`\\`, `\n`, `\r`, `\t`, `\u{1b}`) so a message is always one line. A payload that
//! is not valid UTF-8 is printed as `hex=<lowercase hex>` instead of `text=`.
//!
//! A message that records a change of a group (see [`group_event`](crate::group_event)) is
//! printed as `conversation=<id> seq=<n> from=<actor> time=<ms> event=<kind>` followed by what
//! the event carries; see [`group_event_line`].
//!
//! Group commands print [`group_response`] for a change, [`group_info`] for a group's info and
//! [`group_member`] for each member. Roles are printed as `owner`, `admin` or `member`, join
//! policies as `free`, `invite-only` or `approval`, as the CLI takes them; a value this client
//! does not know is printed as its number.
//!
//! A recalled message has no payload: it is printed as `conversation=<id> seq=<n> from=<sender>
//! time=<ms> recalled=true`. The tombstone that records the recall (see
//! [`recall_event`](crate::recall_event)) is printed as `conversation=<id> seq=<n> from=<actor>
//! time=<ms> event=recall recalled_seq=<recalled seq>`; see [`recall_event_line`].
//!
//! What the server pushes besides messages has a line of its own, starting with a word that
//! says what it is: [`read_state`] and [`read_receipt`] (`read ...`), [`typing`], [`presence`],
//! [`conversation_settings`] (`settings ...`), [`social_event`] (`friend event=...`) and
//! [`push_notice`] (`push id=...`).
//!
//! The answers of the other commands: [`read_state`] for `tern read`, [`recall_ok`] for `tern
//! recall`, [`listed_user`] for each user of `tern friend list`, [`friend_done`] for the other
//! friend commands, and [`profile`] for each profile of `tern profile get`.
//!
//! Free text (a message's text, a friend request's message, a nickname, a field's value) comes
//! last on its line and is escaped like a message's text.

use std::fmt::Write;

use tern_protocol::{
    ConversationSettings, Deliver, GroupEvent, GroupEventKind, GroupInfo, GroupMember,
    GroupProfile, GroupResponse, GroupRole, JoinPolicy, Presence, PushNotice, ReadReceipt,
    ReadState, RecallEvent, RecallOk, SendAck, SocialEvent, SocialEventKind, Target, TargetKind,
    Typing, UserProfile, v1::ListedUser,
};

use crate::ClientError;

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// `text` with backslashes and control characters escaped, so it fits on one line.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// The line for one message; a group's event message is printed by [`group_event_line`], a
/// recall's tombstone by [`recall_event_line`], and a recalled message with `recalled=true`
/// instead of its text.
pub fn message(m: &Deliver) -> String {
    if let Some(event) = crate::group_event(m) {
        return group_event_line(m, &event);
    }
    if let Some(event) = crate::recall_event(m) {
        return recall_event_line(m, &event);
    }
    let body = if m.recalled {
        "recalled=true".to_owned()
    } else {
        match std::str::from_utf8(&m.payload) {
            Ok(text) => format!("text={}", escape(text)),
            Err(_) => format!("hex={}", hex(&m.payload)),
        }
    };
    format!(
        "conversation={} seq={} from={} time={} {body}",
        m.conversation_id, m.seq, m.sender, m.server_time_ms
    )
}

/// The line for a server push: `push id=<id> time=<ms> title=<title> text=<text>` (the title
/// escaped, without spaces: `\s`; the payload as for a message).
pub fn push_notice(p: &PushNotice) -> String {
    let body = match std::str::from_utf8(&p.payload) {
        Ok(text) => format!("text={}", escape(text)),
        Err(_) => format!("hex={}", hex(&p.payload)),
    };
    format!(
        "push id={} time={} title={} {body}",
        p.push_id,
        p.sent_at_ms,
        escape(&p.title).replace(' ', "\\s")
    )
}

/// The line for a SendAck: `sent conversation=<id> seq=<n> time=<ms>`, plus ` duplicate=true`
/// when the server had the message already.
pub fn send_ack(ack: &SendAck) -> String {
    let mut line = format!(
        "sent conversation={} seq={} time={}",
        ack.conversation_id, ack.seq, ack.server_time_ms
    );
    if ack.duplicate {
        line.push_str(" duplicate=true");
    }
    line
}

/// The line for an error: `error: <CODE_NAME> (<number>): <message>` for a server error,
/// `error: <description>` otherwise.
pub fn error(e: &ClientError) -> String {
    match e {
        ClientError::Server { code, message } => {
            format!("error: {} ({}): {message}", code.name(), code.number())
        }
        other => format!("error: {other}"),
    }
}

/// The line for a group operation's answer: `group=<id> conversation=<id> event_seq=<n>`, where
/// `event_seq` is the sequence number of the event the change appended to the group's
/// conversation (0 if it changed nothing).
pub fn group_response(r: &GroupResponse) -> String {
    format!(
        "group={} conversation={} event_seq={}",
        r.group_id, r.conversation_id, r.event_seq
    )
}

/// The lines for a group's info. First `group=<id> conversation=<id> owner=<user>
/// members=<n> max_members=<n> muted_all=<bool> policy=<policy> created=<ms> latest_seq=<n>
/// name=<name>`, the name (escaped, possibly empty) running to the end of the line. Then, each
/// on a line of its own and only if set and not empty: `notice=<text>`, `introduction=<text>`,
/// `avatar_url=<text>`, and `field=<key>=<value>` for each custom field in key order, each value
/// escaped and running to the end of its line.
pub fn group_info(info: &GroupInfo) -> Vec<String> {
    let profile = info.profile.clone().unwrap_or_default();
    let mut lines = vec![format!(
        "group={} conversation={} owner={} members={} max_members={} muted_all={} policy={} \
         created={} latest_seq={} name={}",
        info.group_id,
        info.conversation_id,
        info.owner,
        info.member_count,
        info.max_members,
        info.muted_all,
        policy_name(profile.join_policy.unwrap_or_default()),
        info.created_at_ms,
        info.latest_seq,
        escape(profile.name.as_deref().unwrap_or_default()),
    )];
    for (key, value) in [
        ("notice", &profile.notice),
        ("introduction", &profile.introduction),
        ("avatar_url", &profile.avatar_url),
    ] {
        if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
            lines.push(format!("{key}={}", escape(value)));
        }
    }
    let mut custom: Vec<_> = profile.custom.iter().collect();
    custom.sort();
    for (key, value) in custom {
        lines.push(format!("field={}={}", escape(key), escape(value)));
    }
    lines
}

/// The line for one group member: `member=<user> role=<role> muted_until=<ms> joined=<ms>`
/// (`muted_until=0`: not muted).
pub fn group_member(m: &GroupMember) -> String {
    format!(
        "member={} role={} muted_until={} joined={}",
        m.user_id,
        role_name(m.role),
        m.muted_until_ms,
        m.joined_at_ms
    )
}

/// The line for message `m` recording group event `e`: `conversation=<id> seq=<n> from=<actor>
/// time=<ms> event=<kind>`, then what the event carries, in this order: `users=<u1,u2,...>`
/// (the users it concerns: joined, invited, left, kicked, the member whose role or mute
/// changed, the new owner), `role=<role>`, `muted_until=<ms>`, `profile=<fields>` (the profile
/// fields set by a creation or changed: `name`, `notice`, `introduction`, `avatar_url`,
/// `policy`, `custom`), and last either `reason=<text>` (a kick's reason) or, without a reason,
/// `name=<name>` (the group's new name), escaped and running to the end of the line.
///
/// Kinds: `created`, `joined`, `invited`, `left`, `kicked`, `role_changed`, `muted`,
/// `unmuted`, `muted_all`, `unmuted_all`, `profile_changed`, `owner_changed`, `dissolved`
/// (another value: its number).
pub fn group_event_line(m: &Deliver, e: &GroupEvent) -> String {
    let from = if e.actor.is_empty() {
        &m.sender
    } else {
        &e.actor
    };
    let mut line = format!(
        "conversation={} seq={} from={from} time={} event={}",
        m.conversation_id,
        m.seq,
        m.server_time_ms,
        event_name(e.kind)
    );
    if !e.user_ids.is_empty() {
        let _ = write!(line, " users={}", e.user_ids.join(","));
    }
    if e.role != GroupRole::Unspecified as i32 {
        let _ = write!(line, " role={}", role_name(e.role));
    }
    if e.muted_until_ms != 0 {
        let _ = write!(line, " muted_until={}", e.muted_until_ms);
    }
    if let Some(profile) = &e.profile {
        let _ = write!(line, " profile={}", profile_fields(profile).join(","));
    }
    if !e.reason.is_empty() {
        let _ = write!(line, " reason={}", escape(&e.reason));
    } else if let Some(name) = e.profile.as_ref().and_then(|p| p.name.as_deref()) {
        let _ = write!(line, " name={}", escape(name));
    }
    line
}

/// The line for message `m` recording recall `e`: `conversation=<id> seq=<n> from=<actor>
/// time=<ms> event=recall recalled_seq=<recalled seq>`: `seq` is the tombstone's own,
/// `recalled_seq` that of the message it recalled.
pub fn recall_event_line(m: &Deliver, e: &RecallEvent) -> String {
    let from = if e.actor.is_empty() {
        &m.sender
    } else {
        &e.actor
    };
    format!(
        "conversation={} seq={} from={from} time={} event=recall recalled_seq={}",
        m.conversation_id, m.seq, m.server_time_ms, e.seq
    )
}

/// The line for a read position, the answer of `tern read` and what another device of the
/// user reports: `read conversation=<id> read_seq=<n>`.
pub fn read_state(s: &ReadState) -> String {
    format!(
        "read conversation={} read_seq={}",
        s.conversation_id, s.read_seq
    )
}

/// The line for the other user's read receipt: `read conversation=<id> reader=<user>
/// read_seq=<n>`.
pub fn read_receipt(r: &ReadReceipt) -> String {
    format!(
        "read conversation={} reader={} read_seq={}",
        r.conversation_id, r.reader, r.read_seq
    )
}

/// The line for a typing notice: `typing from=<user> target=<kind>:<id> typing=<bool>`, the
/// target `user:<id>` (a 1:1 conversation: the typing user) or `group:<id>`; `typing=false`
/// when they stopped.
pub fn typing(t: &Typing) -> String {
    format!(
        "typing from={} target={} typing={}",
        t.from,
        target(t.target.as_ref()),
        t.typing
    )
}

/// The line for a followed user's presence: `presence user=<user> online=<bool> devices=<n>`.
pub fn presence(p: &Presence) -> String {
    format!(
        "presence user={} online={} devices={}",
        p.user_id, p.online, p.devices
    )
}

/// The line for a conversation's settings changed by another device of the user: `settings
/// conversation=<id> pinned=<bool> hidden=<bool> muted=<bool> cleared_seq=<n>`.
pub fn conversation_settings(s: &ConversationSettings) -> String {
    format!(
        "settings conversation={} pinned={} hidden={} muted={} cleared_seq={}",
        s.conversation_id, s.pinned, s.hidden, s.muted, s.cleared_seq
    )
}

/// The line for a friend event: `friend event=<kind> user=<user> message=<text>`, kind
/// `request`, `added`, `declined` or `deleted` (another value: its number), `user` the other
/// user, the message (a request's) escaped and running to the end of the line. A decision on
/// the user's join request: `group event=join_approved|join_declined group=<group> by=<admin>`;
/// a request to join a group this user administers: `group event=join_request group=<group>
/// user=<applicant> message=<text>` (escaped, to the end of the line).
pub fn social_event(e: &SocialEvent) -> String {
    let kind = match SocialEventKind::try_from(e.kind) {
        Ok(SocialEventKind::FriendRequest) => "request".to_owned(),
        Ok(SocialEventKind::FriendAdded) => "added".to_owned(),
        Ok(SocialEventKind::FriendDeclined) => "declined".to_owned(),
        Ok(SocialEventKind::FriendDeleted) => "deleted".to_owned(),
        Ok(SocialEventKind::JoinApproved) => {
            return format!(
                "group event=join_approved group={} by={}",
                e.group_id, e.user_id
            );
        }
        Ok(SocialEventKind::JoinDeclined) => {
            return format!(
                "group event=join_declined group={} by={}",
                e.group_id, e.user_id
            );
        }
        Ok(SocialEventKind::JoinRequested) => {
            return format!(
                "group event=join_request group={} user={} message={}",
                e.group_id,
                e.user_id,
                escape(&e.message)
            );
        }
        Ok(SocialEventKind::Unspecified) | Err(_) => e.kind.to_string(),
    };
    format!(
        "friend event={kind} user={} message={}",
        e.user_id,
        escape(&e.message)
    )
}

/// The line for a recall's answer: `recalled conversation=<id> seq=<n> event_seq=<n>`, where
/// `event_seq` is the seq of the tombstone appended to the conversation.
pub fn recall_ok(r: &RecallOk) -> String {
    format!(
        "recalled conversation={} seq={} event_seq={}",
        r.conversation_id, r.seq, r.event_seq
    )
}

/// The line for one user of a friend list: `user=<user> message=<text>`, the message (of a
/// friend request; empty otherwise) escaped and running to the end of the line.
pub fn listed_user(u: &ListedUser) -> String {
    format!("user={} message={}", u.user_id, escape(&u.message))
}

/// The line for a friend operation done: `friend <op> user=<user>` (`op` as the command:
/// `add`, `accept`, `decline`, `delete`, `block`, `unblock`), plus ` friends=true` when an
/// `add` made you friends at once (the other user had asked first).
pub fn friend_done(op: &str, user: &str, friends: bool) -> String {
    let mut line = format!("friend {op} user={user}");
    if friends {
        line.push_str(" friends=true");
    }
    line
}

/// The lines for one user's profile: first `user=<user> avatar_url=<url> nickname=<name>`
/// (the nickname running to the end of the line), then `user=<user> field=<key>=<value>` for
/// each application-defined field in key order, values running to the end of their line.
/// Everything but the user id is escaped.
pub fn profile(p: &UserProfile) -> Vec<String> {
    let mut lines = vec![format!(
        "user={} avatar_url={} nickname={}",
        p.user_id,
        escape(&p.avatar_url),
        escape(&p.nickname)
    )];
    let mut custom: Vec<_> = p.custom.iter().collect();
    custom.sort();
    for (key, value) in custom {
        lines.push(format!(
            "user={} field={}={}",
            p.user_id,
            escape(key),
            escape(value)
        ));
    }
    lines
}

/// `user:<id>`, `group:<id>` or `room:<id>`; `<number>:<id>` for another kind, `none:` without
/// a target.
fn target(t: Option<&Target>) -> String {
    let Some(t) = t else {
        return "none:".into();
    };
    match TargetKind::try_from(t.kind) {
        Ok(TargetKind::User) => format!("user:{}", t.id),
        Ok(TargetKind::Group) => format!("group:{}", t.id),
        Ok(TargetKind::Room) => format!("room:{}", t.id),
        Ok(TargetKind::Unspecified) | Err(_) => format!("{}:{}", t.kind, t.id),
    }
}

/// The names of the fields set in `profile`.
fn profile_fields(profile: &GroupProfile) -> Vec<&'static str> {
    [
        ("name", profile.name.is_some()),
        ("notice", profile.notice.is_some()),
        ("introduction", profile.introduction.is_some()),
        ("avatar_url", profile.avatar_url.is_some()),
        ("policy", profile.join_policy.is_some()),
        ("custom", !profile.custom.is_empty()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect()
}

/// `owner`, `admin`, `member` or `unspecified`; another value as its number.
fn role_name(role: i32) -> String {
    match GroupRole::try_from(role) {
        Ok(GroupRole::RoleOwner) => "owner".into(),
        Ok(GroupRole::RoleAdmin) => "admin".into(),
        Ok(GroupRole::RoleMember) => "member".into(),
        Ok(GroupRole::Unspecified) => "unspecified".into(),
        Err(_) => role.to_string(),
    }
}

/// `free`, `invite-only` or `approval`; another value as its number.
fn policy_name(policy: i32) -> String {
    match JoinPolicy::try_from(policy) {
        Ok(JoinPolicy::Free) => "free".into(),
        Ok(JoinPolicy::InviteOnly) => "invite-only".into(),
        Ok(JoinPolicy::Approval) => "approval".into(),
        Err(_) => policy.to_string(),
    }
}

/// The event kind's name in a group event line; another value as its number.
fn event_name(kind: i32) -> String {
    let name = match GroupEventKind::try_from(kind) {
        Ok(GroupEventKind::GroupCreated) => "created",
        Ok(GroupEventKind::GroupJoined) => "joined",
        Ok(GroupEventKind::GroupInvited) => "invited",
        Ok(GroupEventKind::GroupLeft) => "left",
        Ok(GroupEventKind::GroupKicked) => "kicked",
        Ok(GroupEventKind::GroupRoleChanged) => "role_changed",
        Ok(GroupEventKind::GroupMuted) => "muted",
        Ok(GroupEventKind::GroupUnmuted) => "unmuted",
        Ok(GroupEventKind::GroupMutedAll) => "muted_all",
        Ok(GroupEventKind::GroupUnmutedAll) => "unmuted_all",
        Ok(GroupEventKind::GroupProfileChanged) => "profile_changed",
        Ok(GroupEventKind::GroupOwnerChanged) => "owner_changed",
        Ok(GroupEventKind::GroupDissolved) => "dissolved",
        Ok(GroupEventKind::GroupJoinRequested) => "join_requested",
        Ok(GroupEventKind::GroupJoinDeclined) => "join_declined",
        Ok(GroupEventKind::GroupHiddenMembersChanged) => "hidden_members_changed",
        Ok(GroupEventKind::Unspecified) | Err(_) => return kind.to_string(),
    };
    name.into()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use prost::Message;
    use tern_protocol::{ContentType, ErrorCode, GROUP_EVENT_TYPE, MemberPage, RECALL_EVENT_TYPE};

    use super::*;

    fn deliver(payload: &'static [u8]) -> Deliver {
        Deliver {
            conversation_id: 123,
            seq: 4,
            sender: "alice".into(),
            target: Some(Target::user("alice")),
            server_time_ms: 1_732_233_600_000,
            client_msg_id: "x".into(),
            content_type: 1,
            custom_type: String::new(),
            payload: Bytes::from_static(payload),
            recalled: false,
        }
    }

    #[test]
    fn message_line() {
        assert_eq!(
            message(&deliver(b"hello bob")),
            "conversation=123 seq=4 from=alice time=1732233600000 text=hello bob"
        );
    }

    #[test]
    fn message_line_stays_on_one_line() {
        assert_eq!(
            message(&deliver("a\nb\\c\t\u{1b}é".as_bytes())),
            "conversation=123 seq=4 from=alice time=1732233600000 text=a\\nb\\\\c\\t\\u{1b}é"
        );
    }

    #[test]
    fn binary_payload_is_hex() {
        assert_eq!(
            message(&deliver(&[0xff, 0x00, 0x41])),
            "conversation=123 seq=4 from=alice time=1732233600000 hex=ff0041"
        );
    }

    #[test]
    fn send_ack_line() {
        let mut ack = SendAck {
            client_msg_id: "x".into(),
            conversation_id: 123,
            seq: 1,
            server_time_ms: 1_732_233_600_000,
            duplicate: false,
        };
        assert_eq!(
            send_ack(&ack),
            "sent conversation=123 seq=1 time=1732233600000"
        );
        ack.duplicate = true;
        assert_eq!(
            send_ack(&ack),
            "sent conversation=123 seq=1 time=1732233600000 duplicate=true"
        );
    }

    #[test]
    fn error_line() {
        let e = ClientError::Server {
            code: ErrorCode::NotFound,
            message: "no user bob".into(),
        };
        assert_eq!(error(&e), "error: NOT_FOUND (3003): no user bob");
        assert_eq!(
            error(&ClientError::Disconnected),
            "error: disconnected from the server"
        );
    }

    fn event_message(event: &GroupEvent) -> Deliver {
        Deliver {
            conversation_id: 77,
            seq: 5,
            sender: "alice".into(),
            target: Some(Target::group("g1")),
            server_time_ms: 1_732_233_600_000,
            client_msg_id: String::new(),
            content_type: ContentType::System as u32,
            custom_type: GROUP_EVENT_TYPE.into(),
            payload: Bytes::from(event.encode_to_vec()),
            recalled: false,
        }
    }

    fn event(kind: GroupEventKind) -> GroupEvent {
        GroupEvent {
            kind: kind.into(),
            actor: "alice".into(),
            ..Default::default()
        }
    }

    #[test]
    fn group_response_line() {
        let r = GroupResponse {
            group_id: "g1".into(),
            conversation_id: 77,
            event_seq: 3,
            info: None,
            members: Some(MemberPage::default()),
            ..GroupResponse::default()
        };
        assert_eq!(group_response(&r), "group=g1 conversation=77 event_seq=3");
    }

    #[test]
    fn group_info_lines() {
        let mut info = GroupInfo {
            group_id: "g1".into(),
            conversation_id: 77,
            owner: "alice".into(),
            profile: Some(GroupProfile {
                name: Some("Book club".into()),
                join_policy: Some(JoinPolicy::InviteOnly.into()),
                ..Default::default()
            }),
            muted_all: false,
            member_count: 3,
            max_members: 500,
            created_at_ms: 1_732_233_600_000,
            latest_seq: 4,
        };
        assert_eq!(
            group_info(&info),
            [
                "group=g1 conversation=77 owner=alice members=3 max_members=500 muted_all=false \
              policy=invite-only created=1732233600000 latest_seq=4 name=Book club"
            ]
        );

        let profile = info.profile.as_mut().unwrap();
        profile.notice = Some("read\nchapter 2".into());
        profile.introduction = Some(String::new());
        profile.avatar_url = Some("https://example.com/a.png".into());
        profile.join_policy = None;
        profile.custom.insert("topic".into(), "novels".into());
        profile.custom.insert("city".into(), "Lyon".into());
        info.muted_all = true;
        assert_eq!(
            group_info(&info),
            [
                "group=g1 conversation=77 owner=alice members=3 max_members=500 muted_all=true \
                 policy=free created=1732233600000 latest_seq=4 name=Book club",
                "notice=read\\nchapter 2",
                "avatar_url=https://example.com/a.png",
                "field=city=Lyon",
                "field=topic=novels",
            ]
        );

        info.profile = None;
        assert!(
            group_info(&info)[0].ends_with(" policy=free created=1732233600000 latest_seq=4 name=")
        );
    }

    #[test]
    fn group_member_line() {
        let m = GroupMember {
            user_id: "bob".into(),
            role: GroupRole::RoleAdmin.into(),
            muted_until_ms: 1_732_233_660_000,
            joined_at_ms: 1_732_233_600_000,
        };
        assert_eq!(
            group_member(&m),
            "member=bob role=admin muted_until=1732233660000 joined=1732233600000"
        );
        let owner = GroupMember {
            role: GroupRole::RoleOwner.into(),
            muted_until_ms: 0,
            ..m.clone()
        };
        assert_eq!(
            group_member(&owner),
            "member=bob role=owner muted_until=0 joined=1732233600000"
        );
        let unknown = GroupMember { role: 9, ..m };
        assert!(group_member(&unknown).contains(" role=9 "));
    }

    #[test]
    fn group_event_lines() {
        let prefix = "conversation=77 seq=5 from=alice time=1732233600000";
        let mut kicked = event(GroupEventKind::GroupKicked);
        kicked.user_ids = vec!["bob".into(), "carol".into()];
        assert_eq!(
            message(&event_message(&kicked)),
            format!("{prefix} event=kicked users=bob,carol")
        );
        kicked.reason = "spam, twice\n".into();
        assert_eq!(
            message(&event_message(&kicked)),
            format!("{prefix} event=kicked users=bob,carol reason=spam, twice\\n")
        );

        let mut role = event(GroupEventKind::GroupRoleChanged);
        role.user_ids = vec!["bob".into()];
        role.role = GroupRole::RoleAdmin.into();
        assert_eq!(
            message(&event_message(&role)),
            format!("{prefix} event=role_changed users=bob role=admin")
        );

        let mut muted = event(GroupEventKind::GroupMuted);
        muted.user_ids = vec!["bob".into()];
        muted.muted_until_ms = 1_732_234_200_000;
        assert_eq!(
            message(&event_message(&muted)),
            format!("{prefix} event=muted users=bob muted_until=1732234200000")
        );

        let mut created = event(GroupEventKind::GroupCreated);
        created.user_ids = vec!["bob".into()];
        created.profile = Some(GroupProfile {
            name: Some("Book club".into()),
            join_policy: Some(JoinPolicy::Free.into()),
            ..Default::default()
        });
        assert_eq!(
            message(&event_message(&created)),
            format!("{prefix} event=created users=bob profile=name,policy name=Book club")
        );

        let mut changed = event(GroupEventKind::GroupProfileChanged);
        changed.profile = Some(GroupProfile {
            notice: Some("new rules".into()),
            ..Default::default()
        });
        changed
            .profile
            .as_mut()
            .unwrap()
            .custom
            .insert("k".into(), "v".into());
        assert_eq!(
            message(&event_message(&changed)),
            format!("{prefix} event=profile_changed profile=notice,custom")
        );

        for (kind, name) in [
            (GroupEventKind::GroupMutedAll, "muted_all"),
            (GroupEventKind::GroupUnmutedAll, "unmuted_all"),
            (GroupEventKind::GroupDissolved, "dissolved"),
        ] {
            assert_eq!(
                message(&event_message(&event(kind))),
                format!("{prefix} event={name}")
            );
        }

        // The actor is who did it, whoever the message names as sender.
        let mut joined = event(GroupEventKind::GroupJoined);
        joined.actor = "dave".into();
        joined.user_ids = vec!["dave".into()];
        assert_eq!(
            message(&event_message(&joined)),
            "conversation=77 seq=5 from=dave time=1732233600000 event=joined users=dave"
        );

        let mut unknown = event(GroupEventKind::GroupLeft);
        unknown.kind = 99;
        assert_eq!(
            message(&event_message(&unknown)),
            format!("{prefix} event=99")
        );
    }

    #[test]
    fn an_undecodable_group_event_is_printed_as_a_message() {
        let mut m = event_message(&event(GroupEventKind::GroupLeft));
        m.payload = Bytes::from_static(&[0xff, 0xff]);
        assert_eq!(
            message(&m),
            "conversation=77 seq=5 from=alice time=1732233600000 hex=ffff"
        );
    }

    #[test]
    fn recalled_messages_and_recall_tombstones() {
        let mut recalled = deliver(b"");
        recalled.recalled = true;
        assert_eq!(
            message(&recalled),
            "conversation=123 seq=4 from=alice time=1732233600000 recalled=true"
        );

        let event = RecallEvent {
            seq: 4,
            actor: "carol".into(),
        };
        let mut tombstone = deliver(b"");
        tombstone.seq = 6;
        tombstone.content_type = ContentType::System as u32;
        tombstone.custom_type = RECALL_EVENT_TYPE.into();
        tombstone.payload = Bytes::from(event.encode_to_vec());
        assert_eq!(
            message(&tombstone),
            "conversation=123 seq=6 from=carol time=1732233600000 event=recall recalled_seq=4"
        );
        // Without an actor in the event: the message's sender.
        let anonymous = RecallEvent {
            seq: 4,
            actor: String::new(),
        };
        tombstone.payload = Bytes::from(anonymous.encode_to_vec());
        tombstone.sender = "dave".into();
        assert_eq!(
            message(&tombstone),
            "conversation=123 seq=6 from=dave time=1732233600000 event=recall recalled_seq=4"
        );
        // Not a SYSTEM message: an ordinary one.
        tombstone.content_type = ContentType::Custom as u32;
        assert_eq!(
            message(&tombstone),
            "conversation=123 seq=6 from=dave time=1732233600000 text=\\u{8}\\u{4}"
        );
    }

    #[test]
    fn pushed_event_lines() {
        assert_eq!(
            read_state(&ReadState {
                conversation_id: 12,
                read_seq: 40
            }),
            "read conversation=12 read_seq=40"
        );
        assert_eq!(
            read_receipt(&ReadReceipt {
                conversation_id: 12,
                reader: "alice".into(),
                read_seq: 41
            }),
            "read conversation=12 reader=alice read_seq=41"
        );
        let mut t = Typing {
            target: Some(Target::user("alice")),
            typing: true,
            from: "alice".into(),
        };
        assert_eq!(
            typing(&t),
            "typing from=alice target=user:alice typing=true"
        );
        t.target = Some(Target::group("g1"));
        t.typing = false;
        assert_eq!(typing(&t), "typing from=alice target=group:g1 typing=false");
        t.target = None;
        assert_eq!(typing(&t), "typing from=alice target=none: typing=false");
        assert_eq!(
            presence(&Presence {
                user_id: "alice".into(),
                online: true,
                devices: 1
            }),
            "presence user=alice online=true devices=1"
        );
        assert_eq!(
            conversation_settings(&ConversationSettings {
                conversation_id: 12,
                pinned: true,
                hidden: false,
                muted: true,
                cleared_seq: 3
            }),
            "settings conversation=12 pinned=true hidden=false muted=true cleared_seq=3"
        );
        let mut e = SocialEvent {
            kind: SocialEventKind::FriendRequest.into(),
            user_id: "alice".into(),
            message: "hi,\nit's me".into(),
            group_id: String::new(),
        };
        assert_eq!(
            social_event(&e),
            "friend event=request user=alice message=hi,\\nit's me"
        );
        for (kind, name) in [
            (SocialEventKind::FriendAdded, "added"),
            (SocialEventKind::FriendDeclined, "declined"),
            (SocialEventKind::FriendDeleted, "deleted"),
        ] {
            e.kind = kind.into();
            e.message.clear();
            assert_eq!(
                social_event(&e),
                format!("friend event={name} user=alice message=")
            );
        }
        e.kind = 9;
        assert_eq!(social_event(&e), "friend event=9 user=alice message=");
        e.group_id = "books".into();
        e.kind = SocialEventKind::JoinApproved.into();
        assert_eq!(
            social_event(&e),
            "group event=join_approved group=books by=alice"
        );
        e.kind = SocialEventKind::JoinDeclined.into();
        assert_eq!(
            social_event(&e),
            "group event=join_declined group=books by=alice"
        );
        e.kind = SocialEventKind::JoinRequested.into();
        e.message = "let me\nin".into();
        assert_eq!(
            social_event(&e),
            "group event=join_request group=books user=alice message=let me\\nin"
        );
    }

    #[test]
    fn answer_lines() {
        assert_eq!(
            recall_ok(&RecallOk {
                conversation_id: 12,
                seq: 4,
                event_seq: 6
            }),
            "recalled conversation=12 seq=4 event_seq=6"
        );
        assert_eq!(
            listed_user(&ListedUser {
                user_id: "alice".into(),
                message: "let's be\tfriends".into()
            }),
            "user=alice message=let's be\\tfriends"
        );
        assert_eq!(
            listed_user(&ListedUser {
                user_id: "carol".into(),
                message: String::new()
            }),
            "user=carol message="
        );
        assert_eq!(friend_done("add", "alice", false), "friend add user=alice");
        assert_eq!(
            friend_done("add", "alice", true),
            "friend add user=alice friends=true"
        );
        assert_eq!(friend_done("block", "eve", false), "friend block user=eve");

        let mut p = UserProfile {
            user_id: "alice".into(),
            nickname: "Alice B.".into(),
            avatar_url: "https://example.com/a.png".into(),
            custom: Default::default(),
        };
        assert_eq!(
            profile(&p),
            ["user=alice avatar_url=https://example.com/a.png nickname=Alice B."]
        );
        p.custom.insert("city".into(), "Lyon".into());
        p.custom.insert("about".into(), "two\nlines".into());
        p.nickname.clear();
        p.avatar_url.clear();
        assert_eq!(
            profile(&p),
            [
                "user=alice avatar_url= nickname=",
                "user=alice field=about=two\\nlines",
                "user=alice field=city=Lyon",
            ]
        );
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0, 1, 0xab]), "0001ab");
    }
}
