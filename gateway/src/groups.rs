//! Groups: their state on the owner core, permission checks, the events that record every change,
//! and the fan-out of group messages to the cores with online members.
//!
//! A group is owned by the core of its conversation ([`Router::conversation`]); every request
//! about it (a Send, an operation, a read) travels there as one [`GroupJob`]. The owner keeps the
//! group's record and member list in memory (loaded from the store on first use), checks
//! permissions against it, and appends the message, or the event with the state change
//! (atomically, [`GroupChange`]), through the core's ordered completion queue, like 1:1 messages.
//! While a change is being committed the group's later jobs wait, so every check sees committed
//! state and a failed commit leaves nothing to undo.
//!
//! Fan-out: a committed group message goes once to every core ([`ShardMsg::GroupDeliver`]), never
//! once per member. Each core keeps [`LocalGroups`], the groups of its online users, and delivers
//! to those members, encoding the frame once. Membership changes reach every core's index
//! ([`ShardMsg::GroupMembers`]) on the same queues and before (for joins) or after (for removals)
//! the event, so a new member gets its join event live and a removed one its removal.
//!
//! Join requests of APPROVAL groups live in the group's record (at most [`MAX_PENDING_JOINS`]),
//! each filed and settled with an event like any other change.
//!
//! Hidden members ([`HiddenOp`], only through the admin API) are members for everything that
//! delivers or reads (fan-out, sync, history, sends, read positions) and for nothing that lists
//! or counts members to clients: member lists, `member_count`, read counts and every operation
//! naming a member treat them as non-members. Their changes are recorded with
//! GROUP_HIDDEN_MEMBERS_CHANGED events that name nobody and are sent by the system user, so the
//! log stays one contiguous sequence for everyone. They do not count against
//! `group_max_members` (so what members see stays consistent), but against
//! `group_max_hidden_members`.
//!
//! Not here yet: evicting idle groups' state from the owner's memory.
//!
//! [`Router::conversation`]: crate::route::Router::conversation

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use tern_protocol::v1::group_request::Op;
use tern_protocol::v1::{
    ContentType, Deliver, Frame, GroupEvent, GroupEventKind, GroupInfo, GroupMember, GroupProfile,
    GroupResponse, GroupRole, JoinPolicy, JoinRequest, MemberPage, RecallOk, SendAck, SocialEvent,
    SocialEventKind, Target,
};
use tern_protocol::{ErrorCode, GROUP_EVENT_TYPE};
use tern_storage::{AppendRequest, Appended, GroupChange, GroupId, StorageError, UserId};

use crate::core::{AppendMsg, Core, Recipient, ReplyTo, ShardMsg, now_ms, storage_error_code};

/// Most users one create, invite or kick may name.
pub const MAX_USERS_PER_REQUEST: usize = 500;
/// Most custom profile fields.
pub const MAX_CUSTOM_FIELDS: usize = 20;

/// A group's stored record (the store keeps it opaque). Protobuf, so later releases add fields
/// and still read old records; `format` is 1.
#[derive(Clone, PartialEq, Message)]
pub struct GroupRecord {
    #[prost(uint32, tag = "1")]
    pub format: u32,
    #[prost(uint64, tag = "2")]
    pub owner: u64,
    #[prost(message, optional, tag = "3")]
    pub profile: Option<GroupProfile>,
    #[prost(bool, tag = "4")]
    pub muted_all: bool,
    #[prost(bool, tag = "5")]
    pub dissolved: bool,
    #[prost(uint64, tag = "6")]
    pub created_at_ms: u64,
    /// Join requests awaiting review (APPROVAL groups), oldest first.
    #[prost(message, repeated, tag = "7")]
    pub pending: Vec<PendingJoin>,
}

/// Whom a change of a group's record alone tells ([`Core::submit_record_change`]).
enum RecordNotice {
    /// A join request: the owner and admins online, with a `SocialEvent` `JOIN_REQUESTED`.
    Requested,
    /// A declined request: the applicant online, with `JOIN_DECLINED`.
    Declined {
        applicant: UserId,
        applicant_name: String,
    },
}

/// A join request in a group's record.
#[derive(Clone, PartialEq, Message)]
pub struct PendingJoin {
    #[prost(uint64, tag = "1")]
    pub user: u64,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(uint64, tag = "3")]
    pub at_ms: u64,
}

/// Most join requests a group keeps pending.
pub const MAX_PENDING_JOINS: usize = 1000;
/// Longest join request message.
pub const MAX_JOIN_MESSAGE: usize = 256;

/// A member's stored attributes (the value of the store's member entry).
#[derive(Clone, PartialEq, Message)]
pub struct MemberRecord {
    #[prost(uint32, tag = "1")]
    pub format: u32,
    #[prost(enumeration = "GroupRole", tag = "2")]
    pub role: i32,
    #[prost(uint64, tag = "3")]
    pub muted_until_ms: u64,
    #[prost(uint64, tag = "4")]
    pub joined_at_ms: u64,
    /// A hidden member (added through the admin API). Absent in records written before hidden
    /// members existed, which decode as visible members.
    #[prost(bool, tag = "5")]
    pub hidden: bool,
}

impl MemberRecord {
    fn new(role: GroupRole, now: u64) -> MemberRecord {
        MemberRecord {
            format: 1,
            role: role.into(),
            muted_until_ms: 0,
            joined_at_ms: now,
            hidden: false,
        }
    }

    fn hidden(now: u64) -> MemberRecord {
        MemberRecord {
            hidden: true,
            ..MemberRecord::new(GroupRole::RoleMember, now)
        }
    }

    fn is_admin(&self) -> bool {
        matches!(self.role(), GroupRole::RoleAdmin | GroupRole::RoleOwner)
    }
}

/// Whether a stored member record is a hidden member's (a record that does not decode is not).
pub(crate) fn is_hidden(attrs: &[u8]) -> bool {
    MemberRecord::decode(attrs).is_ok_and(|m| m.hidden)
}

/// A request about one group, on its way to (or waiting on) the group's owner core.
#[derive(Debug)]
pub struct GroupJob {
    pub group: GroupId,
    pub name: Arc<str>,
    pub actor: UserId,
    pub actor_name: Arc<str>,
    /// The HTTP API acting as the system user: treated as the group's owner.
    pub admin: bool,
    pub reply: ReplyTo,
    pub what: GroupWhat,
}

#[derive(Debug)]
pub enum GroupWhat {
    /// A chat message (the request as the session built it, without `group_change`).
    Send(AppendRequest),
    Op(Op),
    /// Recall the message with this seq (its sender within the window, or an admin).
    Recall(u64),
    /// Manage hidden members (the admin API only: refused unless `GroupJob::admin`).
    Hidden(HiddenOp),
}

/// An operation on a group's hidden members, made by the admin API.
#[derive(Debug, Clone)]
pub enum HiddenOp {
    /// Make this user (not a member yet) a hidden member.
    Add(String),
    /// Remove this hidden member.
    Remove(String),
    /// List the hidden members.
    List,
}

/// What a committed group append must do afterwards, carried through the completion queue.
#[derive(Debug)]
pub struct GroupAfter {
    pub group: GroupId,
    pub name: Arc<str>,
    /// For an operation: the state to install once committed, and how to answer.
    pub change: Option<Pending>,
}

#[derive(Debug)]
pub struct Pending {
    record: GroupRecord,
    members: Vec<(UserId, Option<MemberRecord>)>,
    /// Members who join: indexed on their cores before the event is delivered.
    added: Vec<UserId>,
    /// Members who go: dropped from the indexes after the event is delivered (they get it).
    removed: Vec<UserId>,
    /// Answer with the group's info (create).
    with_info: bool,
    /// A hidden member's change: who, and `added`, `removed` or `left` (for the webhook, which
    /// names them; the event does not). Such events are sent by the system user.
    hidden: Option<(String, &'static str)>,
    /// An approved join request: the applicant (id, name), told once the approval is stored.
    /// Stored as GROUP_JOINED, reported to the webhook as `join_approved`.
    approved: Option<(UserId, String)>,
}

impl Pending {
    fn new(record: GroupRecord) -> Pending {
        Pending {
            record,
            members: Vec::new(),
            added: Vec::new(),
            removed: Vec::new(),
            with_info: false,
            hidden: None,
            approved: None,
        }
    }
}

/// The owner core's copy of one group.
#[derive(Debug, Default)]
pub struct GroupState {
    /// None until the group is created.
    record: Option<GroupRecord>,
    members: BTreeMap<UserId, MemberRecord>,
    /// The hidden ones among `members`.
    hidden: BTreeSet<UserId>,
    /// A change is being committed; jobs wait in `waiting`.
    busy: bool,
    waiting: VecDeque<GroupJob>,
}

impl GroupState {
    /// Members as clients see them: without the hidden ones.
    fn visible_count(&self) -> usize {
        self.members.len() - self.hidden.len()
    }

    /// Installs a member's committed record (None: removed).
    fn set_member(&mut self, user: UserId, member: Option<MemberRecord>) {
        match member {
            Some(m) => {
                if m.hidden {
                    self.hidden.insert(user);
                } else {
                    self.hidden.remove(&user);
                }
                self.members.insert(user, m);
            }
            None => {
                self.hidden.remove(&user);
                self.members.remove(&user);
            }
        }
    }
}

/// The groups of this core's online users, for fan-out.
#[derive(Debug, Default)]
pub struct LocalGroups {
    by_group: crate::FastMap<GroupId, crate::FastSet<UserId>>,
    by_user: crate::FastMap<UserId, Vec<GroupId>>,
}

impl LocalGroups {
    fn add(&mut self, group: GroupId, user: UserId) {
        if self.by_group.entry(group).or_default().insert(user) {
            self.by_user.entry(user).or_default().push(group);
        }
    }

    fn remove(&mut self, group: GroupId, user: UserId) {
        if let Some(set) = self.by_group.get_mut(&group)
            && set.remove(&user)
        {
            if set.is_empty() {
                self.by_group.remove(&group);
            }
            if let Some(gs) = self.by_user.get_mut(&user) {
                gs.retain(|&g| g != group);
            }
        }
    }

    /// Online members of `group` on this core.
    pub fn members(&self, group: GroupId) -> impl Iterator<Item = UserId> + '_ {
        self.by_group.get(&group).into_iter().flatten().copied()
    }
}

/// A refused request: the wire code and the message for the client.
pub(crate) type Refusal = (ErrorCode, String);

pub(crate) fn refuse<T>(code: ErrorCode, msg: impl Into<String>) -> Result<T, Refusal> {
    Err((code, msg.into()))
}

pub(crate) fn storage_refusal(e: &StorageError) -> Refusal {
    let (code, msg) = storage_error_code(e);
    (code, msg.to_owned())
}

impl Core {
    /// Indexes the groups of a user whose first session on this core just registered. Called
    /// right after registration, with no await in between, so that every membership change
    /// committed later reaches the index through [`ShardMsg::GroupMembers`].
    pub fn groups_online(&self, user: UserId) {
        if self.local_groups.borrow().by_user.contains_key(&user) {
            return;
        }
        match self.store.groups_of(user) {
            Ok(groups) => {
                let mut local = self.local_groups.borrow_mut();
                local.by_user.insert(user, Vec::new());
                for g in groups {
                    local.add(g, user);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot load the user's groups; live group messages reach them through sync only");
            }
        }
    }

    /// Forgets a user whose last session on this core closed.
    pub fn groups_offline(&self, user: UserId) {
        let mut local = self.local_groups.borrow_mut();
        if let Some(groups) = local.by_user.remove(&user) {
            for g in groups {
                if let Some(set) = local.by_group.get_mut(&g) {
                    set.remove(&user);
                    if set.is_empty() {
                        local.by_group.remove(&g);
                    }
                }
            }
        }
    }

    /// Applies a membership change to this core's index (only users online here matter).
    pub fn update_local_groups(&self, group: GroupId, added: &[UserId], removed: &[UserId]) {
        let users = self.users.borrow();
        let mut local = self.local_groups.borrow_mut();
        for &u in added {
            if users.contains_key(&u) {
                local.add(group, u);
            }
        }
        for &u in removed {
            local.remove(group, u);
        }
    }

    /// Delivers a committed group message to this core's online members, encoding it once.
    pub fn deliver_group(&self, group: GroupId, except: u64, message: &Deliver) {
        let local = self.local_groups.borrow();
        let mut frame = None;
        let mut offered = 0;
        for user in local.members(group) {
            offered += self.deliver_to_user(user, except, message, &mut frame);
        }
        self.m()
            .deliveries_out
            .fetch_add(offered, std::sync::atomic::Ordering::Relaxed);
    }

    /// Handles a job on the group's owner core: waits behind a change being committed, or runs.
    pub fn group_job(self: &Rc<Self>, job: GroupJob) {
        let group = job.group;
        let mut groups = self.groups.borrow_mut();
        let state = match groups.get_mut(&group) {
            Some(s) => s,
            None => match self.load_group(group) {
                Ok(s) => groups.entry(group).or_insert(s),
                Err(e) => {
                    drop(groups);
                    return self.group_reply_error(&job, storage_refusal(&e));
                }
            },
        };
        if state.busy {
            state.waiting.push_back(job);
            return;
        }
        let outcome = self.run_group_job(state, &job);
        drop(groups);
        match outcome {
            Ok(Some(frame)) => self.group_reply(job.reply, frame),
            Ok(None) => {}
            Err(refusal) => self.group_reply_error(&job, refusal),
        }
    }

    fn load_group(&self, group: GroupId) -> Result<GroupState, StorageError> {
        let record = match self.store.group_record(group)? {
            Some(b) => Some(
                GroupRecord::decode(b)
                    .map_err(|_| StorageError::Corrupt("group record does not decode"))?,
            ),
            None => None,
        };
        let mut state = GroupState {
            record,
            ..GroupState::default()
        };
        if state.record.is_some() {
            let mut after = 0;
            loop {
                let page = self.store.member_records(group, after, 4096)?;
                let Some(&(last, _)) = page.last() else {
                    break;
                };
                for (u, b) in page {
                    let m = MemberRecord::decode(b).map_err(|_| {
                        StorageError::Corrupt("group member record does not decode")
                    })?;
                    state.set_member(u, Some(m));
                }
                after = last;
            }
        }
        Ok(state)
    }

    /// Checks a job against the group's state. A send or a change is submitted (the change
    /// marks the group busy until committed); a read is answered at once (`Ok(Some(frame))`).
    fn run_group_job(
        self: &Rc<Self>,
        state: &mut GroupState,
        job: &GroupJob,
    ) -> Result<Option<Bytes>, Refusal> {
        let now = now_ms();
        let conv = tern_storage::group_conversation(job.group).unwrap_or(0);
        if let GroupWhat::Op(Op::Create(create)) = &job.what {
            if let Some(r) = &state.record {
                return refuse(
                    ErrorCode::Conflict,
                    if r.dissolved {
                        "a dissolved group had this id; group ids are not reused"
                    } else {
                        "a group with this id exists"
                    },
                );
            }
            let profile = create.profile.as_deref().cloned().unwrap_or_default();
            check_profile(&profile)?;
            let invited = self.resolve_users(&create.members)?;
            let mut members = vec![(
                job.actor,
                Some(MemberRecord::new(GroupRole::RoleOwner, now)),
            )];
            for u in invited {
                if u != job.actor && !members.iter().any(|(m, _)| *m == u) {
                    members.push((u, Some(MemberRecord::new(GroupRole::RoleMember, now))));
                }
            }
            if members.len() > self.cfg.group_max_members as usize {
                return refuse(
                    ErrorCode::LimitExceeded,
                    format!("a group has at most {} members", self.cfg.group_max_members),
                );
            }
            let record = GroupRecord {
                format: 1,
                owner: job.actor,
                profile: Some(profile.clone()),
                muted_all: false,
                dissolved: false,
                created_at_ms: now,
                pending: Vec::new(),
            };
            let names = members
                .iter()
                .skip(1)
                .map(|(u, _)| self.name_of(*u))
                .collect();
            let event = GroupEvent {
                kind: GroupEventKind::GroupCreated.into(),
                actor: job.actor_name.to_string(),
                user_ids: names,
                profile: Some(profile),
                ..GroupEvent::default()
            };
            let added = members.iter().map(|(u, _)| *u).collect();
            let pending = Pending {
                members,
                added,
                with_info: true,
                ..Pending::new(record)
            };
            self.submit_group_change(state, job, event, pending);
            return Ok(None);
        }
        let record = match &state.record {
            Some(r) if !r.dissolved => r.clone(),
            Some(_) => return refuse(ErrorCode::NotFound, "the group was dissolved"),
            None => return refuse(ErrorCode::NotFound, "no such group"),
        };
        let me = state.members.get(&job.actor).cloned().or_else(|| {
            job.admin
                .then(|| MemberRecord::new(GroupRole::RoleOwner, now))
        });
        let op = match &job.what {
            GroupWhat::Send(req) => {
                let Some(me) = me else {
                    return refuse(ErrorCode::NotMember, "not a member of this group");
                };
                if me.muted_until_ms > now {
                    return refuse(
                        ErrorCode::Muted,
                        format!("muted in this group until {} ms", me.muted_until_ms),
                    );
                }
                if record.muted_all && !me.is_admin() {
                    return refuse(ErrorCode::Muted, "the group is muted for members");
                }
                self.submit_append(AppendMsg {
                    req: req.clone(),
                    reply: job.reply.clone(),
                    sender_name: job.actor_name.clone(),
                    to: Recipient::Group(Box::new(GroupAfter {
                        group: job.group,
                        name: job.name.clone(),
                        change: None,
                    })),
                    recall_of: 0,
                });
                return Ok(None);
            }
            &GroupWhat::Recall(seq) => {
                let Some(me) = me else {
                    return refuse(ErrorCode::NotMember, "not a member of this group");
                };
                self.check_recall(conv, seq, job.actor, me.is_admin())?;
                self.submit_append(AppendMsg {
                    req: crate::social::recall_request(conv, seq, job.actor, &job.actor_name),
                    reply: job.reply.clone(),
                    sender_name: job.actor_name.clone(),
                    to: Recipient::Group(Box::new(GroupAfter {
                        group: job.group,
                        name: job.name.clone(),
                        change: None,
                    })),
                    recall_of: seq,
                });
                return Ok(None);
            }
            GroupWhat::Hidden(op) => return self.hidden_op(state, job, &record, op, now, conv),
            GroupWhat::Op(op) => op,
        };
        if let Op::Join(join) = op {
            if me.is_some() {
                return refuse(ErrorCode::Conflict, "already a member of this group");
            }
            let policy = join_policy(&record);
            if policy == JoinPolicy::InviteOnly {
                return refuse(
                    ErrorCode::Forbidden,
                    "this group takes no join requests: a member must invite you",
                );
            }
            self.check_room(state, 1)?;
            if policy == JoinPolicy::Approval {
                if join.message.len() > MAX_JOIN_MESSAGE {
                    return refuse(
                        ErrorCode::InvalidArgument,
                        format!("message exceeds {MAX_JOIN_MESSAGE} bytes"),
                    );
                }
                if record.pending.iter().any(|p| p.user == job.actor) {
                    return refuse(ErrorCode::Conflict, "a join request is pending already");
                }
                if record.pending.len() >= MAX_PENDING_JOINS {
                    return refuse(
                        ErrorCode::LimitExceeded,
                        format!("the group has {MAX_PENDING_JOINS} pending join requests"),
                    );
                }
                let mut record = record;
                record.pending.push(PendingJoin {
                    user: job.actor,
                    message: join.message.clone(),
                    at_ms: now,
                });
                // Not an event of the group's log: only the owner and admins see a request.
                let event = GroupEvent {
                    kind: GroupEventKind::GroupJoinRequested.into(),
                    actor: job.actor_name.to_string(),
                    user_ids: vec![job.actor_name.to_string()],
                    reason: join.message.clone(),
                    ..GroupEvent::default()
                };
                self.submit_record_change(state, job, record, event, RecordNotice::Requested);
                return Ok(None);
            }
            let event = GroupEvent {
                kind: GroupEventKind::GroupJoined.into(),
                actor: job.actor_name.to_string(),
                user_ids: vec![job.actor_name.to_string()],
                ..GroupEvent::default()
            };
            // A request filed while the group took approvals is settled by joining.
            let mut record = record;
            record.pending.retain(|p| p.user != job.actor);
            let pending = Pending {
                members: vec![(
                    job.actor,
                    Some(MemberRecord::new(GroupRole::RoleMember, now)),
                )],
                added: vec![job.actor],
                ..Pending::new(record)
            };
            self.submit_group_change(state, job, event, pending);
            return Ok(None);
        }
        if matches!(op, Op::Get(_)) {
            // A group one may ask to join shows its public face to anyone who might.
            let member = me.is_some();
            if !member && join_policy(&record) == JoinPolicy::InviteOnly {
                return refuse(ErrorCode::NotMember, "not a member of this group");
            }
            let info = self.group_info(&job.name, state, &record, conv, member);
            return Ok(Some(self.encode(&Frame::new(
                job.reply.request_id,
                GroupResponse {
                    group_id: job.name.to_string(),
                    conversation_id: conv,
                    info: Some(Box::new(info)),
                    // Whether the asker's join request still waits.
                    pending: !member && record.pending.iter().any(|p| p.user == job.actor),
                    ..GroupResponse::default()
                },
            ))));
        }
        let Some(me) = me else {
            return refuse(ErrorCode::NotMember, "not a member of this group");
        };
        let admin = me.is_admin();
        let owner = me.role() == GroupRole::RoleOwner;
        let mut event = GroupEvent {
            actor: job.actor_name.to_string(),
            ..GroupEvent::default()
        };
        let mut pending = Pending::new(record.clone());
        match op {
            Op::Create(_) | Op::Join(_) | Op::Get(_) => unreachable!("handled above"),
            Op::ListMembers(req) => {
                let limit = if req.limit == 0 {
                    100
                } else {
                    req.limit.min(self.cfg.max_page)
                } as usize;
                let mut members = Vec::with_capacity(limit);
                let mut next = 0;
                // Hidden members are listed to nobody, themselves included.
                let mut visible = state
                    .members
                    .range(req.page_token.saturating_add(1)..)
                    .filter(|(_, m)| !m.hidden);
                for (&u, m) in visible.by_ref().take(limit) {
                    members.push(self.wire_member(u, m));
                    next = u;
                }
                let more = next != 0 && visible.next().is_some();
                let page = MemberPage {
                    members,
                    next_page_token: if more { next } else { 0 },
                };
                return Ok(Some(self.group_response(job, conv, 0, None, Some(page))));
            }
            Op::Leave(_) => {
                if owner {
                    return refuse(
                        ErrorCode::Forbidden,
                        "the owner cannot leave: transfer ownership or dissolve the group",
                    );
                }
                if me.hidden {
                    // Recorded without naming them, like their addition.
                    event = self.hidden_event();
                    pending.hidden = Some((job.actor_name.to_string(), "left"));
                } else {
                    event.kind = GroupEventKind::GroupLeft.into();
                    event.user_ids = vec![job.actor_name.to_string()];
                }
                pending.members.push((job.actor, None));
                pending.removed.push(job.actor);
            }
            Op::ReviewJoin(req) => {
                if !admin {
                    return refuse(
                        ErrorCode::Forbidden,
                        "only the owner and admins review join requests",
                    );
                }
                let user = match self.store.lookup_user(&req.user_id) {
                    Ok(u) => u,
                    Err(e) => return Err(storage_refusal(&e)),
                };
                let Some(i) = user.and_then(|u| record.pending.iter().position(|p| p.user == u))
                else {
                    return refuse(
                        ErrorCode::NotFound,
                        "no pending join request from this user",
                    );
                };
                let user = pending.record.pending.remove(i).user;
                if req.approve && state.members.contains_key(&user) {
                    return refuse(ErrorCode::Conflict, "already a member of this group");
                }
                event.user_ids = vec![req.user_id.clone()];
                if !req.approve {
                    // Nothing in the group's log: only the applicant and the admins' list
                    // learn of it.
                    event.kind = GroupEventKind::GroupJoinDeclined.into();
                    let declined = RecordNotice::Declined {
                        applicant: user,
                        applicant_name: req.user_id.clone(),
                    };
                    self.submit_record_change(state, job, pending.record, event, declined);
                    return Ok(None);
                }
                self.check_room(state, 1)?;
                pending.approved = Some((user, req.user_id.clone()));
                pending
                    .members
                    .push((user, Some(MemberRecord::new(GroupRole::RoleMember, now))));
                pending.added.push(user);
                event.kind = GroupEventKind::GroupJoined.into();
            }
            Op::ListJoinRequests(_) => {
                if !admin {
                    return refuse(
                        ErrorCode::Forbidden,
                        "only the owner and admins see join requests",
                    );
                }
                let join_requests = record
                    .pending
                    .iter()
                    .map(|p| JoinRequest {
                        user_id: self.name_of(p.user),
                        message: p.message.clone(),
                        requested_at_ms: p.at_ms,
                    })
                    .collect();
                return Ok(Some(self.encode(&Frame::new(
                    job.reply.request_id,
                    GroupResponse {
                        group_id: job.name.to_string(),
                        conversation_id: conv,
                        join_requests,
                        ..GroupResponse::default()
                    },
                ))));
            }
            Op::Invite(req) => {
                let policy = join_policy(&record);
                if policy == JoinPolicy::Approval && !admin {
                    return refuse(
                        ErrorCode::Forbidden,
                        "only the owner and admins invite to this group",
                    );
                }
                if req.user_ids.is_empty() {
                    return refuse(ErrorCode::InvalidArgument, "user_ids is empty");
                }
                let users = self.resolve_users(&req.user_ids)?;
                for u in users {
                    if !state.members.contains_key(&u) && !pending.added.contains(&u) {
                        // An invitation settles a pending request.
                        pending.record.pending.retain(|p| p.user != u);
                        pending.added.push(u);
                        pending
                            .members
                            .push((u, Some(MemberRecord::new(GroupRole::RoleMember, now))));
                        event.user_ids.push(self.name_of(u));
                    }
                }
                if pending.added.is_empty() {
                    return Ok(Some(self.group_response(job, conv, 0, None, None)));
                }
                self.check_room(state, pending.added.len())?;
                event.kind = GroupEventKind::GroupInvited.into();
            }
            Op::Kick(req) => {
                if !admin {
                    return refuse(
                        ErrorCode::Forbidden,
                        "only the owner and admins remove members",
                    );
                }
                if req.user_ids.is_empty() {
                    return refuse(ErrorCode::InvalidArgument, "user_ids is empty");
                }
                let users = self.resolve_users(&req.user_ids)?;
                for u in users {
                    if u == job.actor {
                        return refuse(
                            ErrorCode::InvalidArgument,
                            "cannot remove yourself: leave the group instead",
                        );
                    }
                    // Hidden members are not members to a kick: they are removed through the
                    // admin API, with an event that does not name them.
                    let Some(m) = state.members.get(&u).filter(|m| !m.hidden) else {
                        continue;
                    };
                    if !owner && m.is_admin() {
                        return refuse(
                            ErrorCode::Forbidden,
                            "an admin cannot remove the owner or another admin",
                        );
                    }
                    if !pending.removed.contains(&u) {
                        pending.removed.push(u);
                        pending.members.push((u, None));
                        event.user_ids.push(self.name_of(u));
                    }
                }
                if pending.removed.is_empty() {
                    return refuse(ErrorCode::NotMember, "none of the users is a member");
                }
                event.kind = GroupEventKind::GroupKicked.into();
                event.reason = req.reason.clone();
            }
            Op::SetRole(req) => {
                if !owner {
                    return refuse(ErrorCode::Forbidden, "only the owner sets roles");
                }
                let role = GroupRole::try_from(req.role).unwrap_or(GroupRole::Unspecified);
                if !matches!(role, GroupRole::RoleAdmin | GroupRole::RoleMember) {
                    return refuse(
                        ErrorCode::InvalidArgument,
                        "role must be ROLE_ADMIN or ROLE_MEMBER (use TransferOwner for the owner)",
                    );
                }
                let (u, mut m) = self.member_named(state, &req.user_id)?;
                if u == job.actor {
                    return refuse(
                        ErrorCode::InvalidArgument,
                        "the owner's role does not change",
                    );
                }
                if m.role() == role {
                    return Ok(Some(self.group_response(job, conv, 0, None, None)));
                }
                m.role = role.into();
                pending.members.push((u, Some(m)));
                event.kind = GroupEventKind::GroupRoleChanged.into();
                event.user_ids = vec![req.user_id.clone()];
                event.role = role.into();
            }
            Op::Mute(req) => {
                if !admin {
                    return refuse(
                        ErrorCode::Forbidden,
                        "only the owner and admins mute members",
                    );
                }
                let (u, mut m) = self.member_named(state, &req.user_id)?;
                if m.role() == GroupRole::RoleOwner || (!owner && m.is_admin()) {
                    return refuse(
                        ErrorCode::Forbidden,
                        "the owner cannot be muted, and an admin cannot mute another admin",
                    );
                }
                m.muted_until_ms = if req.duration_ms == 0 {
                    0
                } else {
                    now.saturating_add(req.duration_ms)
                };
                event.kind = if req.duration_ms == 0 {
                    GroupEventKind::GroupUnmuted
                } else {
                    GroupEventKind::GroupMuted
                }
                .into();
                event.user_ids = vec![req.user_id.clone()];
                event.muted_until_ms = m.muted_until_ms;
                pending.members.push((u, Some(m)));
            }
            Op::MuteAll(req) => {
                if !admin {
                    return refuse(
                        ErrorCode::Forbidden,
                        "only the owner and admins mute the group",
                    );
                }
                if record.muted_all == req.muted {
                    return Ok(Some(self.group_response(job, conv, 0, None, None)));
                }
                pending.record.muted_all = req.muted;
                event.kind = if req.muted {
                    GroupEventKind::GroupMutedAll
                } else {
                    GroupEventKind::GroupUnmutedAll
                }
                .into();
            }
            Op::Update(req) => {
                if !admin {
                    return refuse(
                        ErrorCode::Forbidden,
                        "only the owner and admins change the profile",
                    );
                }
                let change = req.profile.as_deref().cloned().unwrap_or_default();
                check_profile(&change)?;
                let merged = merge_profile(record.profile.clone().unwrap_or_default(), &change)?;
                pending.record.profile = Some(merged);
                event.kind = GroupEventKind::GroupProfileChanged.into();
                event.profile = Some(change);
            }
            Op::Transfer(req) => {
                if !owner {
                    return refuse(ErrorCode::Forbidden, "only the owner transfers ownership");
                }
                let (u, mut m) = self.member_named(state, &req.user_id)?;
                // The current owner is the actor, except for the system user acting as an
                // owner without being a member: then the group's real owner steps down.
                let previous = record.owner;
                if u == previous {
                    return refuse(ErrorCode::InvalidArgument, "already the owner");
                }
                m.role = GroupRole::RoleOwner.into();
                m.muted_until_ms = 0;
                pending.record.owner = u;
                pending.members.push((u, Some(m)));
                if let Some(old) = state.members.get(&previous) {
                    let mut old = old.clone();
                    old.role = GroupRole::RoleMember.into();
                    pending.members.push((previous, Some(old)));
                }
                event.kind = GroupEventKind::GroupOwnerChanged.into();
                event.user_ids = vec![req.user_id.clone()];
            }
            Op::Dissolve(_) => {
                if !owner {
                    return refuse(ErrorCode::Forbidden, "only the owner dissolves the group");
                }
                pending.record.dissolved = true;
                for &u in state.members.keys() {
                    pending.members.push((u, None));
                    pending.removed.push(u);
                }
                event.kind = GroupEventKind::GroupDissolved.into();
            }
        }
        self.submit_group_change(state, job, event, pending);
        Ok(None)
    }

    fn check_room(&self, state: &GroupState, more: usize) -> Result<(), Refusal> {
        if state.visible_count() + more > self.cfg.group_max_members as usize {
            return refuse(
                ErrorCode::LimitExceeded,
                format!("a group has at most {} members", self.cfg.group_max_members),
            );
        }
        Ok(())
    }

    fn member_named(
        &self,
        state: &GroupState,
        name: &str,
    ) -> Result<(UserId, MemberRecord), Refusal> {
        let id = match self.store.lookup_user(name) {
            Ok(Some(id)) => id,
            Ok(None) => return refuse(ErrorCode::NotMember, format!("{name} is not a member")),
            Err(e) => return Err(storage_refusal(&e)),
        };
        // A hidden member is answered as a non-member: nothing reveals them.
        match state.members.get(&id) {
            Some(m) if !m.hidden => Ok((id, m.clone())),
            _ => refuse(ErrorCode::NotMember, format!("{name} is not a member")),
        }
    }

    fn wire_member(&self, user: UserId, m: &MemberRecord) -> GroupMember {
        GroupMember {
            user_id: self.name_of(user),
            role: m.role,
            muted_until_ms: m.muted_until_ms,
            joined_at_ms: m.joined_at_ms,
        }
    }

    /// The system user: the sender and actor of hidden members' events.
    fn system_user(&self) -> Result<(UserId, Arc<str>), Refusal> {
        let name = &self.cfg.system_user;
        let id = self.user_id(name).map_err(|e| storage_refusal(&e))?;
        Ok((id, Arc::from(name.as_str())))
    }

    /// The event of a hidden member's change: it names nobody.
    fn hidden_event(&self) -> GroupEvent {
        GroupEvent {
            kind: GroupEventKind::GroupHiddenMembersChanged.into(),
            actor: self.cfg.system_user.clone(),
            ..GroupEvent::default()
        }
    }

    /// Adds, removes or lists hidden members (the admin API only).
    fn hidden_op(
        self: &Rc<Self>,
        state: &mut GroupState,
        job: &GroupJob,
        record: &GroupRecord,
        op: &HiddenOp,
        now: u64,
        conv: u64,
    ) -> Result<Option<Bytes>, Refusal> {
        if !job.admin {
            return refuse(
                ErrorCode::Forbidden,
                "hidden members are managed through the admin API only",
            );
        }
        let mut pending = Pending::new(record.clone());
        match op {
            HiddenOp::List => {
                let members = state
                    .hidden
                    .iter()
                    .filter_map(|&u| state.members.get(&u).map(|m| self.wire_member(u, m)))
                    .collect();
                let page = MemberPage {
                    members,
                    next_page_token: 0,
                };
                return Ok(Some(self.group_response(job, conv, 0, None, Some(page))));
            }
            HiddenOp::Add(name) => {
                if *name == self.cfg.system_user {
                    return refuse(
                        ErrorCode::InvalidArgument,
                        "the system user has an owner's rights in every group already",
                    );
                }
                let user = self.user_id(name).map_err(|e| storage_refusal(&e))?;
                match state.members.get(&user) {
                    Some(m) if m.hidden => {
                        return Ok(Some(self.group_response(job, conv, 0, None, None)));
                    }
                    Some(_) => {
                        return refuse(
                            ErrorCode::Conflict,
                            format!(
                                "{name} is a visible member of this group: remove them first to \
                                 add them as a hidden member"
                            ),
                        );
                    }
                    None => {}
                }
                if state.hidden.len() >= self.cfg.group_max_hidden_members as usize {
                    return refuse(
                        ErrorCode::LimitExceeded,
                        format!(
                            "a group has at most {} hidden members",
                            self.cfg.group_max_hidden_members
                        ),
                    );
                }
                // A join request they filed is settled: they are in.
                pending.record.pending.retain(|p| p.user != user);
                pending
                    .members
                    .push((user, Some(MemberRecord::hidden(now))));
                pending.added.push(user);
                pending.hidden = Some((name.clone(), "added"));
            }
            HiddenOp::Remove(name) => {
                let user = match self.store.lookup_user(name) {
                    Ok(u) => u,
                    Err(e) => return Err(storage_refusal(&e)),
                };
                match user.and_then(|u| state.members.get(&u).map(|m| (u, m))) {
                    Some((u, m)) if m.hidden => {
                        pending.members.push((u, None));
                        pending.removed.push(u);
                        pending.hidden = Some((name.clone(), "removed"));
                    }
                    Some(_) => {
                        return refuse(
                            ErrorCode::Conflict,
                            format!(
                                "{name} is a visible member of this group: remove them with a kick"
                            ),
                        );
                    }
                    None => {
                        return refuse(
                            ErrorCode::NotMember,
                            format!("{name} is not a hidden member of this group"),
                        );
                    }
                }
            }
        }
        let event = self.hidden_event();
        self.submit_group_change(state, job, event, pending);
        Ok(None)
    }

    fn resolve_users(&self, names: &[String]) -> Result<Vec<UserId>, Refusal> {
        if names.len() > MAX_USERS_PER_REQUEST {
            return refuse(
                ErrorCode::InvalidArgument,
                format!("at most {MAX_USERS_PER_REQUEST} users per request"),
            );
        }
        let mut ids = Vec::with_capacity(names.len());
        for n in names {
            if !crate::token::valid_id(n) {
                return refuse(
                    ErrorCode::InvalidArgument,
                    "user ids must be 1..=64 bytes without control characters",
                );
            }
            ids.push(self.user_id(n).map_err(|e| storage_refusal(&e))?);
        }
        Ok(ids)
    }

    fn name_of(&self, id: UserId) -> String {
        self.store.user_name(id).ok().flatten().unwrap_or_default()
    }

    /// The group's info as its members see it, or (`member` false) the public part a non-member
    /// of a `FREE` or `APPROVAL` group sees: its id, owner, name, introduction, avatar, join
    /// policy, member counts and creation time; not its notice, custom fields, mute state or
    /// latest seq.
    fn group_info(
        &self,
        name: &str,
        state: &GroupState,
        record: &GroupRecord,
        conv: u64,
        member: bool,
    ) -> GroupInfo {
        let profile = record.profile.as_ref().map(|p| {
            if member {
                p.clone()
            } else {
                GroupProfile {
                    name: p.name.clone(),
                    introduction: p.introduction.clone(),
                    avatar_url: p.avatar_url.clone(),
                    join_policy: p.join_policy,
                    ..GroupProfile::default()
                }
            }
        });
        GroupInfo {
            group_id: name.to_owned(),
            conversation_id: conv,
            owner: self.name_of(record.owner),
            profile,
            muted_all: member && record.muted_all,
            member_count: state.visible_count() as u32,
            max_members: self.cfg.group_max_members,
            created_at_ms: record.created_at_ms,
            latest_seq: if member {
                self.store.latest_seq(conv).unwrap_or(0)
            } else {
                0
            },
        }
    }

    fn group_response(
        &self,
        job: &GroupJob,
        conv: u64,
        event_seq: u64,
        info: Option<Box<GroupInfo>>,
        members: Option<MemberPage>,
    ) -> Bytes {
        self.encode(&Frame::new(
            job.reply.request_id,
            GroupResponse {
                group_id: job.name.to_string(),
                conversation_id: conv,
                event_seq,
                info,
                members,
                ..GroupResponse::default()
            },
        ))
    }

    /// Tells the online devices of `user` (`name`) that `reviewer` decided on their request to
    /// join `group`.
    async fn tell_applicant(
        self: &Rc<Self>,
        user: UserId,
        name: &str,
        approved: bool,
        reviewer: &str,
        group: &str,
    ) {
        let kind = if approved {
            SocialEventKind::JoinApproved
        } else {
            SocialEventKind::JoinDeclined
        };
        let frame = self.encode(&Frame::new(
            0,
            SocialEvent {
                kind: kind.into(),
                user_id: reviewer.to_owned(),
                message: String::new(),
                group_id: group.to_owned(),
            },
        ));
        let core = self.router.user(name).core;
        self.send_to_core(
            core,
            ShardMsg::ToUser {
                user,
                except_logical: 0,
                frame,
                droppable: false,
            },
        )
        .await;
    }

    /// Stores a change of the group's record alone, with no event in the group's log (a join
    /// request, a declined one): the group waits until it is committed, then `notice` says whom
    /// to tell. `event` is what the `group_event` webhook reports, with `event_seq` 0.
    fn submit_record_change(
        self: &Rc<Self>,
        state: &mut GroupState,
        job: &GroupJob,
        record: GroupRecord,
        event: GroupEvent,
        notice: RecordNotice,
    ) {
        state.busy = true;
        let write = self
            .store
            .set_group_record(job.group, Bytes::from(record.encode_to_vec()));
        let core = self.clone();
        let (group, name, reply) = (job.group, job.name.clone(), job.reply.clone());
        glommio::spawn_local(async move {
            let result = write.await;
            core.finish_record_change(group, name, reply, record, event, notice, result)
                .await;
        })
        .detach();
    }

    #[allow(clippy::too_many_arguments)]
    async fn finish_record_change(
        self: &Rc<Self>,
        group: GroupId,
        name: Arc<str>,
        reply: ReplyTo,
        record: GroupRecord,
        event: GroupEvent,
        notice: RecordNotice,
        result: Result<(), StorageError>,
    ) {
        let conv = tern_storage::group_conversation(group).unwrap_or(0);
        let frame = match result {
            Ok(()) => {
                if self.webhooks.wants(crate::webhook::GROUP_EVENT) {
                    let at = Appended {
                        conversation: conv,
                        seq: 0,
                        server_time_ms: now_ms(),
                        version: 0,
                        duplicate: false,
                    };
                    self.webhooks.emit(
                        crate::webhook::GROUP_EVENT,
                        group_event_hook(&name, &at, &event, false, None),
                    );
                }
                let admins: Vec<UserId> = {
                    let mut groups = self.groups.borrow_mut();
                    let state = groups.entry(group).or_default();
                    state.record = Some(record);
                    state
                        .members
                        .iter()
                        .filter(|(_, m)| m.is_admin() && !m.hidden)
                        .map(|(&u, _)| u)
                        .collect()
                };
                let pending = matches!(notice, RecordNotice::Requested);
                match notice {
                    RecordNotice::Requested => {
                        let frame = self.encode(&Frame::new(
                            0,
                            SocialEvent {
                                kind: SocialEventKind::JoinRequested.into(),
                                user_id: event.actor.clone(),
                                message: event.reason.clone(),
                                group_id: name.to_string(),
                            },
                        ));
                        for admin in admins {
                            let core = self.router.user(&self.name_of(admin)).core;
                            self.send_to_core(
                                core,
                                ShardMsg::ToUser {
                                    user: admin,
                                    except_logical: 0,
                                    frame: frame.clone(),
                                    droppable: false,
                                },
                            )
                            .await;
                        }
                    }
                    RecordNotice::Declined {
                        applicant,
                        applicant_name,
                    } => {
                        self.tell_applicant(applicant, &applicant_name, false, &event.actor, &name)
                            .await;
                    }
                }
                Frame::new(
                    reply.request_id,
                    GroupResponse {
                        group_id: name.to_string(),
                        conversation_id: conv,
                        pending,
                        ..GroupResponse::default()
                    },
                )
            }
            Err(e) => {
                let (code, msg) = storage_error_code(&e);
                Frame::error(reply.request_id, code, msg, false)
            }
        };
        let frame = self.encode(&frame);
        self.send_reply(reply, frame).await;
        self.release_group(group);
    }

    /// Appends the event of a change with the change itself; the group waits until committed.
    fn submit_group_change(
        self: &Rc<Self>,
        state: &mut GroupState,
        job: &GroupJob,
        event: GroupEvent,
        pending: Pending,
    ) {
        let conv = tern_storage::group_conversation(job.group).unwrap_or(0);
        let change = GroupChange {
            group: job.group,
            record: Some(Bytes::from(pending.record.encode_to_vec())),
            members: pending
                .members
                .iter()
                .map(|(u, m)| (*u, m.as_ref().map(|m| Bytes::from(m.encode_to_vec()))))
                .collect(),
            // A hidden member (support, moderation) reads the conversation they were added to.
            joiners_read_history: pending.hidden.is_some(),
        };
        // A hidden member's change is sent by the system user: its sender would name them.
        let (sender, sender_name) = if pending.hidden.is_some() {
            match self.system_user() {
                Ok(s) => s,
                Err(refusal) => return self.group_reply_error(job, refusal),
            }
        } else {
            (job.actor, job.actor_name.clone())
        };
        state.busy = true;
        self.submit_append(AppendMsg {
            req: AppendRequest {
                conversation: conv,
                sender,
                client_msg_id: String::new(),
                content_type: ContentType::System as u32,
                custom_type: GROUP_EVENT_TYPE.to_owned(),
                payload: Bytes::from(event.encode_to_vec()),
                participants: Vec::new(),
                group_change: Some(Box::new(change)),
                recall: None,
            },
            reply: job.reply.clone(),
            sender_name,
            to: Recipient::Group(Box::new(GroupAfter {
                group: job.group,
                name: job.name.clone(),
                change: Some(pending),
            })),
            recall_of: 0,
        });
    }

    /// After a group append: installs a committed change, updates every core's index, fans the
    /// message out, answers the sender, and lets the group's waiting jobs run.
    pub(crate) async fn finish_group_append(
        self: &Rc<Self>,
        after: GroupAfter,
        req: AppendRequest,
        reply: ReplyTo,
        sender_name: Arc<str>,
        recall_of: u64,
        result: Result<Appended, StorageError>,
    ) {
        let group = after.group;
        let is_change = after.change.is_some();
        let frame = match result {
            Ok(a) => {
                let mut removed = Vec::new();
                let mut info = None;
                let mut approved = None;
                if let Some(p) = after.change {
                    approved = p.approved.clone();
                    if self.webhooks.wants(crate::webhook::GROUP_EVENT) {
                        // The event was encoded here a moment ago; it decodes.
                        if let Ok(event) = GroupEvent::decode(req.payload.clone()) {
                            self.webhooks.emit(
                                crate::webhook::GROUP_EVENT,
                                group_event_hook(
                                    &after.name,
                                    &a,
                                    &event,
                                    p.approved.is_some(),
                                    p.hidden.as_ref().map(|(u, c)| (u.as_str(), *c)),
                                ),
                            );
                        }
                    }
                    let added = Arc::new(p.added);
                    removed = p.removed;
                    {
                        let mut groups = self.groups.borrow_mut();
                        let state = groups.entry(group).or_default();
                        state.record = Some(p.record);
                        for (u, m) in p.members {
                            state.set_member(u, m);
                        }
                    }
                    if !added.is_empty() {
                        for core in 0..self.router.cores() {
                            self.send_to_core(
                                core,
                                ShardMsg::GroupMembers {
                                    group,
                                    added: added.clone(),
                                    removed: Arc::new(Vec::new()),
                                },
                            )
                            .await;
                        }
                    }
                    if p.with_info {
                        let groups = self.groups.borrow();
                        let state = &groups[&group];
                        let record = state.record.clone().unwrap_or_default();
                        info = Some(Box::new(self.group_info(
                            &after.name,
                            state,
                            &record,
                            a.conversation,
                            true,
                        )));
                    }
                }
                if !a.duplicate
                    && !is_change
                    && recall_of == 0
                    && self.webhooks.wants(crate::webhook::AFTER_SEND)
                {
                    self.webhooks.emit_with(crate::webhook::AFTER_SEND, || {
                        serde_json::json!({
                            "from": &*sender_name,
                            "to_kind": "group",
                            "to": &*after.name,
                            "conversation_id": a.conversation.to_string(),
                            "seq": a.seq,
                            "client_msg_id": &req.client_msg_id,
                            "content_type": req.content_type,
                            "custom_type": &req.custom_type,
                            "server_time_ms": a.server_time_ms,
                        })
                    });
                }
                if !a.duplicate {
                    let message = Arc::new(Deliver {
                        conversation_id: a.conversation,
                        seq: a.seq,
                        sender: sender_name.to_string(),
                        target: Some(Target::group(after.name.to_string())),
                        server_time_ms: a.server_time_ms,
                        client_msg_id: req.client_msg_id.clone(),
                        content_type: req.content_type,
                        custom_type: req.custom_type,
                        payload: req.payload,
                        recalled: false,
                    });
                    let limit = self.cfg.notify.group_max_members;
                    if self.offline.is_some() && !is_change && recall_of == 0 && limit > 0 {
                        let members: Option<Vec<UserId>> = {
                            let groups = self.groups.borrow();
                            groups.get(&group).and_then(|state| {
                                (state.members.len() <= limit).then(|| {
                                    state
                                        .members
                                        .keys()
                                        .copied()
                                        .filter(|&u| u != req.sender)
                                        .collect()
                                })
                            })
                        };
                        if let Some(members) = members {
                            self.notify_offline_group(&after.name, members, &message);
                        }
                    }
                    for core in 0..self.router.cores() {
                        self.send_to_core(
                            core,
                            ShardMsg::GroupDeliver {
                                group,
                                except_logical: reply.logical,
                                message: message.clone(),
                            },
                        )
                        .await;
                    }
                }
                // After the event: an approved applicant is a member by then.
                if let Some((user, name)) = approved {
                    self.tell_applicant(user, &name, true, &sender_name, &after.name)
                        .await;
                }
                if !removed.is_empty() {
                    let removed = Arc::new(removed);
                    for core in 0..self.router.cores() {
                        self.send_to_core(
                            core,
                            ShardMsg::GroupMembers {
                                group,
                                added: Arc::new(Vec::new()),
                                removed: removed.clone(),
                            },
                        )
                        .await;
                    }
                }
                if is_change {
                    Frame::new(
                        reply.request_id,
                        GroupResponse {
                            group_id: after.name.to_string(),
                            conversation_id: a.conversation,
                            event_seq: a.seq,
                            info,
                            ..GroupResponse::default()
                        },
                    )
                } else if recall_of != 0 {
                    Frame::new(
                        reply.request_id,
                        RecallOk {
                            conversation_id: a.conversation,
                            seq: recall_of,
                            event_seq: a.seq,
                        },
                    )
                } else {
                    Frame::new(
                        reply.request_id,
                        SendAck {
                            client_msg_id: req.client_msg_id,
                            conversation_id: a.conversation,
                            seq: a.seq,
                            server_time_ms: a.server_time_ms,
                            duplicate: a.duplicate,
                        },
                    )
                }
            }
            Err(e) => {
                let (code, msg) = storage_error_code(&e);
                Frame::error(reply.request_id, code, msg, false)
            }
        };
        let frame = self.encode(&frame);
        self.send_reply(reply, frame).await;
        if is_change {
            self.release_group(group);
        }
    }

    /// Ends a group's busy state and runs its waiting jobs until one starts another change.
    fn release_group(self: &Rc<Self>, group: GroupId) {
        loop {
            let job = {
                let mut groups = self.groups.borrow_mut();
                let Some(state) = groups.get_mut(&group) else {
                    return;
                };
                state.busy = false;
                match state.waiting.pop_front() {
                    Some(job) => job,
                    None => return,
                }
            };
            self.group_job(job);
            if self.groups.borrow().get(&group).is_some_and(|s| s.busy) {
                return;
            }
        }
    }

    fn group_reply(self: &Rc<Self>, reply: ReplyTo, frame: Bytes) {
        let core = self.clone();
        glommio::spawn_local(async move { core.send_reply(reply, frame).await }).detach();
    }

    /// Sends an answer to the requesting session's core.
    async fn send_reply(self: &Rc<Self>, reply: ReplyTo, frame: Bytes) {
        let to = reply.core;
        self.send_to_core(
            to,
            ShardMsg::Reply {
                reply,
                frame,
                own_copy: None,
            },
        )
        .await;
    }

    fn group_reply_error(self: &Rc<Self>, job: &GroupJob, (code, msg): Refusal) {
        let frame = self.encode(&Frame::error(job.reply.request_id, code, msg, false));
        self.group_reply(job.reply.clone(), frame);
    }
}

/// The `group_event` webhook's data for a committed change (see the webhook section of
/// docs/API.md): the group, the event's name, who did it, whom it concerns, the fields of its
/// kind, and the seq of the event in the group's conversation. A hidden member's change
/// (`hidden`: who, and what happened) names them here, unlike its event: the webhook goes to the
/// application's server.
fn group_event_hook(
    group: &str,
    appended: &Appended,
    event: &GroupEvent,
    join_approved: bool,
    hidden: Option<(&str, &str)>,
) -> serde_json::Value {
    use serde_json::{Value, json};
    let kind = event.kind();
    let name = match kind {
        GroupEventKind::GroupJoined if join_approved => "join_approved",
        _ => group_event_name(kind),
    };
    let mut data = json!({
        "group_id": group,
        "conversation_id": appended.conversation.to_string(),
        "event": name,
        "operator": &event.actor,
        "users": &event.user_ids,
        "event_seq": appended.seq,
        "server_time_ms": appended.server_time_ms,
    });
    let extra = match kind {
        GroupEventKind::GroupCreated | GroupEventKind::GroupProfileChanged => {
            Some(("profile", profile_json(event.profile.as_ref())))
        }
        GroupEventKind::GroupKicked => Some(("reason", Value::from(event.reason.as_str()))),
        GroupEventKind::GroupJoinRequested => Some(("message", Value::from(event.reason.as_str()))),
        GroupEventKind::GroupRoleChanged => Some((
            "role",
            Value::from(match event.role() {
                GroupRole::RoleAdmin => "admin",
                GroupRole::RoleOwner => "owner",
                _ => "member",
            }),
        )),
        GroupEventKind::GroupMuted => Some(("muted_until_ms", Value::from(event.muted_until_ms))),
        GroupEventKind::GroupHiddenMembersChanged => {
            hidden.map(|(_, change)| ("change", Value::from(change)))
        }
        _ => None,
    };
    if let (Some((user, _)), Some(map)) = (hidden, data.as_object_mut()) {
        map.insert("users".to_owned(), json!([user]));
    }
    if let (Some((key, value)), Some(map)) = (extra, data.as_object_mut()) {
        map.insert(key.to_owned(), value);
    }
    data
}

/// The webhook name of a group event kind: the protocol's name without `GROUP_`, in lower case.
fn group_event_name(kind: GroupEventKind) -> &'static str {
    match kind {
        GroupEventKind::Unspecified => "unspecified",
        GroupEventKind::GroupCreated => "created",
        GroupEventKind::GroupJoined => "joined",
        GroupEventKind::GroupInvited => "invited",
        GroupEventKind::GroupLeft => "left",
        GroupEventKind::GroupKicked => "kicked",
        GroupEventKind::GroupRoleChanged => "role_changed",
        GroupEventKind::GroupMuted => "muted",
        GroupEventKind::GroupUnmuted => "unmuted",
        GroupEventKind::GroupMutedAll => "muted_all",
        GroupEventKind::GroupUnmutedAll => "unmuted_all",
        GroupEventKind::GroupProfileChanged => "profile_changed",
        GroupEventKind::GroupOwnerChanged => "owner_changed",
        GroupEventKind::GroupDissolved => "dissolved",
        GroupEventKind::GroupJoinRequested => "join_requested",
        GroupEventKind::GroupJoinDeclined => "join_declined",
        GroupEventKind::GroupHiddenMembersChanged => "hidden_members_changed",
    }
}

/// A profile as webhook JSON: only the fields it has; `join_policy` by name.
fn profile_json(profile: Option<&GroupProfile>) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    let Some(p) = profile else {
        return map.into();
    };
    for (key, value) in [
        ("name", &p.name),
        ("notice", &p.notice),
        ("introduction", &p.introduction),
        ("avatar_url", &p.avatar_url),
    ] {
        if let Some(v) = value {
            map.insert(key.to_owned(), v.as_str().into());
        }
    }
    if let Some(policy) = p.join_policy {
        let policy = match JoinPolicy::try_from(policy) {
            Ok(JoinPolicy::Free) => "free",
            Ok(JoinPolicy::InviteOnly) => "invite_only",
            Ok(JoinPolicy::Approval) => "approval",
            Err(_) => "unknown",
        };
        map.insert("join_policy".to_owned(), policy.into());
    }
    if !p.custom.is_empty() {
        let custom: serde_json::Map<String, serde_json::Value> = p
            .custom
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().into()))
            .collect();
        map.insert("custom".to_owned(), custom.into());
    }
    map.into()
}

fn join_policy(record: &GroupRecord) -> JoinPolicy {
    record
        .profile
        .as_ref()
        .and_then(|p| p.join_policy)
        .and_then(|p| JoinPolicy::try_from(p).ok())
        .unwrap_or(JoinPolicy::Free)
}

fn check_profile(p: &GroupProfile) -> Result<(), Refusal> {
    let fields = [
        ("name", &p.name, 256),
        ("notice", &p.notice, 4096),
        ("introduction", &p.introduction, 4096),
        ("avatar_url", &p.avatar_url, 1024),
    ];
    for (field, value, max) in fields {
        if let Some(v) = value
            && v.len() > max
        {
            return refuse(
                ErrorCode::InvalidArgument,
                format!("profile.{field} exceeds {max} bytes"),
            );
        }
    }
    if let Some(policy) = p.join_policy
        && JoinPolicy::try_from(policy).is_err()
    {
        return refuse(ErrorCode::InvalidArgument, "profile.join_policy is unknown");
    }
    if p.custom.len() > MAX_CUSTOM_FIELDS {
        return refuse(
            ErrorCode::InvalidArgument,
            format!("at most {MAX_CUSTOM_FIELDS} custom fields"),
        );
    }
    for (k, v) in &p.custom {
        if k.is_empty() || k.len() > 64 || v.len() > 1024 {
            return refuse(
                ErrorCode::InvalidArgument,
                "custom field keys are 1..=64 bytes and values at most 1024 bytes",
            );
        }
    }
    Ok(())
}

/// `change` applied to `base`: present fields replace, custom entries with an empty value go.
fn merge_profile(mut base: GroupProfile, change: &GroupProfile) -> Result<GroupProfile, Refusal> {
    if change.name.is_some() {
        base.name.clone_from(&change.name);
    }
    if change.notice.is_some() {
        base.notice.clone_from(&change.notice);
    }
    if change.introduction.is_some() {
        base.introduction.clone_from(&change.introduction);
    }
    if change.avatar_url.is_some() {
        base.avatar_url.clone_from(&change.avatar_url);
    }
    if change.join_policy.is_some() {
        base.join_policy = change.join_policy;
    }
    for (k, v) in &change.custom {
        if v.is_empty() {
            base.custom.remove(k);
        } else {
            base.custom.insert(k.clone(), v.clone());
        }
    }
    if base.custom.len() > MAX_CUSTOM_FIELDS {
        return refuse(
            ErrorCode::InvalidArgument,
            format!("at most {MAX_CUSTOM_FIELDS} custom fields"),
        );
    }
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_replaces_present_fields_and_removes_empty_custom_values() {
        let base = GroupProfile {
            name: Some("a".into()),
            notice: Some("n".into()),
            custom: [
                ("x".to_string(), "1".to_string()),
                ("y".to_string(), "2".to_string()),
            ]
            .into(),
            ..GroupProfile::default()
        };
        let change = GroupProfile {
            notice: Some(String::new()),
            custom: [
                ("x".to_string(), String::new()),
                ("z".to_string(), "3".to_string()),
            ]
            .into(),
            ..GroupProfile::default()
        };
        let merged = merge_profile(base, &change).unwrap();
        assert_eq!(merged.name.as_deref(), Some("a"));
        assert_eq!(merged.notice.as_deref(), Some(""));
        assert_eq!(
            merged.custom,
            [
                ("y".to_string(), "2".to_string()),
                ("z".to_string(), "3".to_string())
            ]
            .into()
        );
    }

    #[test]
    fn profile_limits_are_checked() {
        let mut p = GroupProfile {
            name: Some("x".repeat(257)),
            ..GroupProfile::default()
        };
        assert_eq!(check_profile(&p).unwrap_err().0, ErrorCode::InvalidArgument);
        p.name = None;
        p.custom = (0..21)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert_eq!(check_profile(&p).unwrap_err().0, ErrorCode::InvalidArgument);
        p.custom.clear();
        p.join_policy = Some(7);
        assert_eq!(check_profile(&p).unwrap_err().0, ErrorCode::InvalidArgument);
    }

    #[test]
    fn group_event_hooks_carry_the_fields_of_their_kind() {
        let appended = Appended {
            conversation: 9_223_372_036_854_775_809,
            seq: 4,
            server_time_ms: 1_700_000_000_000,
            version: 77,
            duplicate: false,
        };
        let event = |kind: GroupEventKind, users: &[&str]| GroupEvent {
            kind: kind.into(),
            actor: "alice".into(),
            user_ids: users.iter().map(|u| u.to_string()).collect(),
            ..GroupEvent::default()
        };
        let base = |name: &str, users: &[&str]| {
            serde_json::json!({
                "group_id": "team",
                "conversation_id": "9223372036854775809",
                "event": name,
                "operator": "alice",
                "users": users,
                "event_seq": 4,
                "server_time_ms": 1_700_000_000_000u64,
            })
        };
        let with = |mut v: serde_json::Value, key: &str, value: serde_json::Value| {
            v.as_object_mut().unwrap().insert(key.into(), value);
            v
        };

        let mut created = event(GroupEventKind::GroupCreated, &["bob"]);
        created.profile = Some(GroupProfile {
            name: Some("Team".into()),
            join_policy: Some(JoinPolicy::Approval.into()),
            custom: [("k".to_string(), "v".to_string())].into(),
            ..GroupProfile::default()
        });
        assert_eq!(
            group_event_hook("team", &appended, &created, false, None),
            with(
                base("created", &["bob"]),
                "profile",
                serde_json::json!({"name": "Team", "join_policy": "approval", "custom": {"k": "v"}}),
            )
        );

        let mut kicked = event(GroupEventKind::GroupKicked, &["bob", "carol"]);
        kicked.reason = "spam".into();
        assert_eq!(
            group_event_hook("team", &appended, &kicked, false, None),
            with(base("kicked", &["bob", "carol"]), "reason", "spam".into())
        );

        let mut role = event(GroupEventKind::GroupRoleChanged, &["bob"]);
        role.role = GroupRole::RoleAdmin.into();
        assert_eq!(
            group_event_hook("team", &appended, &role, false, None),
            with(base("role_changed", &["bob"]), "role", "admin".into())
        );

        let mut muted = event(GroupEventKind::GroupMuted, &["bob"]);
        muted.muted_until_ms = 5;
        assert_eq!(
            group_event_hook("team", &appended, &muted, false, None),
            with(base("muted", &["bob"]), "muted_until_ms", 5.into())
        );

        let mut asked = event(GroupEventKind::GroupJoinRequested, &["alice"]);
        asked.reason = "let me in".into();
        assert_eq!(
            group_event_hook("team", &appended, &asked, false, None),
            with(
                base("join_requested", &["alice"]),
                "message",
                "let me in".into()
            )
        );

        let joined = event(GroupEventKind::GroupJoined, &["bob"]);
        assert_eq!(
            group_event_hook("team", &appended, &joined, false, None),
            base("joined", &["bob"])
        );
        assert_eq!(
            group_event_hook("team", &appended, &joined, true, None),
            base("join_approved", &["bob"])
        );
        assert_eq!(
            group_event_hook(
                "team",
                &appended,
                &event(GroupEventKind::GroupDissolved, &[]),
                false,
                None
            ),
            base("dissolved", &[])
        );

        // A hidden member's event names nobody; its webhook names them and what happened.
        let hidden = GroupEvent {
            kind: GroupEventKind::GroupHiddenMembersChanged.into(),
            actor: "administrator".into(),
            ..GroupEvent::default()
        };
        let mut want = with(
            base("hidden_members_changed", &["agent"]),
            "change",
            "added".into(),
        );
        want["operator"] = "administrator".into();
        assert_eq!(
            group_event_hook("team", &appended, &hidden, false, Some(("agent", "added"))),
            want
        );
    }

    #[test]
    fn records_decode_what_they_encode() {
        let r = GroupRecord {
            format: 1,
            owner: 7,
            profile: Some(GroupProfile {
                name: Some("g".into()),
                ..GroupProfile::default()
            }),
            muted_all: true,
            dissolved: false,
            created_at_ms: 5,
            pending: vec![PendingJoin {
                user: 3,
                message: "hi".into(),
                at_ms: 4,
            }],
        };
        assert_eq!(GroupRecord::decode(&r.encode_to_vec()[..]).unwrap(), r);
        let m = MemberRecord::new(GroupRole::RoleAdmin, 9);
        assert_eq!(MemberRecord::decode(&m.encode_to_vec()[..]).unwrap(), m);
        assert!(m.is_admin());
        let h = MemberRecord::hidden(9);
        assert_eq!(MemberRecord::decode(&h.encode_to_vec()[..]).unwrap(), h);
        assert!(h.hidden && !h.is_admin());
    }

    /// A member record written before hidden members existed (fields 1 to 4 only) decodes as a
    /// visible member; a hidden one adds exactly field 5 = 1.
    #[test]
    fn member_records_without_the_hidden_flag_decode_as_visible() {
        // format 1, role ROLE_ADMIN (2), muted_until_ms 0 (omitted), joined_at_ms 9.
        let old = [0x08, 0x01, 0x10, 0x02, 0x20, 0x09];
        let m = MemberRecord::decode(&old[..]).unwrap();
        assert_eq!(m, MemberRecord::new(GroupRole::RoleAdmin, 9));
        assert!(!m.hidden);
        assert_eq!(
            MemberRecord::new(GroupRole::RoleAdmin, 9).encode_to_vec(),
            old
        );
        let mut hidden = MemberRecord::new(GroupRole::RoleMember, 9).encode_to_vec();
        hidden.extend_from_slice(&[0x28, 0x01]);
        assert_eq!(hidden, MemberRecord::hidden(9).encode_to_vec());
    }
}
