//! The storage API: the [`MessageStore`] trait and its request and result types.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use crate::completion::Completion;
use crate::dedup::DedupWindow;
use crate::error::{Result, StorageError};
use crate::ids::{ConversationId, GroupId, MAX_USER_ID, Peer, Seq, UserId, group_conversation};
use crate::record::{MAX_CLIENT_MSG_ID_LEN, MAX_CUSTOM_TYPE_LEN, StoredMessage};

/// One message to append.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppendRequest {
    /// The conversation ([`crate::direct_conversation`] or [`crate::group_conversation`]).
    pub conversation: ConversationId,
    /// Internal user id of the sender.
    pub sender: UserId,
    /// The sender's id for this message, the idempotency key together with `sender`
    /// (at most 256 bytes; empty = not idempotent).
    pub client_msg_id: String,
    /// Application content type.
    pub content_type: u32,
    /// Application custom type (at most 1024 bytes).
    pub custom_type: String,
    /// The opaque body, stored as is.
    pub payload: Bytes,
    /// Users whose conversation index must include this conversation (for a 1:1
    /// conversation: both users; for groups, members are indexed by
    /// [`MessageStore::add_member`] and this is usually empty). Costs a write only the first
    /// time a (user, conversation) pair is seen.
    pub participants: Vec<UserId>,
    /// A group state change committed with this message (only for that group's conversation).
    pub group_change: Option<Box<GroupChange>>,
    /// Recall the message at this seq of the same conversation in the same atomic write: its
    /// stored record loses its payload and is marked recalled ([`StoredMessage::recalled`]);
    /// everything else about it (seq, version, sender, time, ids, types) stays. The seq must
    /// be in `1..=` the conversation's latest seq before this append (appends queued before
    /// this one count, acknowledged or not); otherwise the append fails with
    /// `InvalidArgument` and writes nothing. Recalling a recalled message changes nothing
    /// (the append still happens). A duplicate append recalls nothing.
    pub recall: Option<Seq>,
}

/// A user's own settings of one conversation, synced to all their devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConversationSettings {
    /// Pinned to the top of the list.
    pub pinned: bool,
    /// Hidden from the list (the history stays).
    pub hidden: bool,
    /// Do not disturb.
    pub muted: bool,
    /// History up to and including this seq is cleared for this user (0 = nothing).
    pub cleared_seq: Seq,
}

/// Kinds of directed user-to-user relations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RelationKind {
    /// `user` counts `other` as a friend.
    Friend = 1,
    /// `user` asked `other` to be friends.
    FriendRequestSent = 2,
    /// `other` asked `user` to be friends.
    FriendRequestReceived = 3,
    /// `user` blocked `other`.
    Blocked = 4,
}

/// One change of a relation in [`MessageStore::set_relations`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationChange {
    /// Whose relation it is (1..=[`MAX_USER_ID`]).
    pub user: UserId,
    /// Which list it is in.
    pub kind: RelationKind,
    /// The user it is with (1..=[`MAX_USER_ID`]).
    pub other: UserId,
    /// The relation's value, opaque to the store (may be empty); None deletes it.
    pub value: Option<Bytes>,
}

/// Most changes one [`MessageStore::set_relations`] may carry.
pub const MAX_RELATION_CHANGES: usize = 10_000;

pub(crate) fn check_relations(changes: &[RelationChange]) -> Result<()> {
    if changes.len() > MAX_RELATION_CHANGES {
        return Err(StorageError::InvalidArgument("too many relation changes"));
    }
    for c in changes {
        if c.user == 0 || c.user > MAX_USER_ID || c.other == 0 || c.other > MAX_USER_ID {
            return Err(StorageError::InvalidArgument("user id out of range"));
        }
    }
    Ok(())
}

pub(crate) fn check_user(user: UserId) -> Result<()> {
    if user == 0 || user > MAX_USER_ID {
        return Err(StorageError::InvalidArgument("user id out of range"));
    }
    Ok(())
}

/// A change of a group's stored state, committed atomically with the append that records it.
///
/// The change is applied only if the append is (a duplicate applies nothing). Members are
/// applied in order; for each:
///
/// * `Some(attributes)` stores the attributes. If the user was not a member, they join: the
///   group's conversation becomes active in their index ([`ConversationInfo::active`],
///   [`ConversationInfo::left_seq`] 0) with this append's version. If they were, only the
///   attributes change.
/// * `None` removes a member: the conversation stays in their index, inactive, with
///   [`ConversationInfo::left_seq`] = this append's seq and this append's version. Removing a
///   non-member is a no-op.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupChange {
    /// The group; the append must be to its conversation ([`crate::group_conversation`]).
    pub group: GroupId,
    /// The group's new record, opaque to the store (None leaves it unchanged).
    pub record: Option<Bytes>,
    /// In order: members to add or update with their attributes (opaque bytes, may be
    /// empty), or remove (None).
    pub members: Vec<(UserId, Option<Bytes>)>,
}

impl AppendRequest {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.conversation == 0 {
            return Err(StorageError::InvalidArgument("conversation id 0"));
        }
        if self.sender == 0 {
            return Err(StorageError::InvalidArgument("sender id 0"));
        }
        if self.client_msg_id.len() > MAX_CLIENT_MSG_ID_LEN {
            return Err(StorageError::InvalidArgument("client message id too long"));
        }
        if self.custom_type.len() > MAX_CUSTOM_TYPE_LEN {
            return Err(StorageError::InvalidArgument("custom type too long"));
        }
        if self.participants.contains(&0) {
            return Err(StorageError::InvalidArgument("participant id 0"));
        }
        if let Some(change) = &self.group_change {
            match group_conversation(change.group) {
                None => return Err(StorageError::InvalidArgument("group id out of range")),
                Some(conv) if conv != self.conversation => {
                    return Err(StorageError::InvalidArgument(
                        "group change for another conversation",
                    ));
                }
                Some(_) => {}
            }
            if change
                .members
                .iter()
                .any(|&(user, _)| user == 0 || user > MAX_USER_ID)
            {
                return Err(StorageError::InvalidArgument("user id out of range"));
            }
        }
        if self.recall == Some(0) {
            return Err(StorageError::InvalidArgument("no such message to recall"));
        }
        Ok(())
    }
}

/// The outcome of a successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The conversation the message is in (for a duplicate: the original's conversation).
    pub conversation: ConversationId,
    /// Its sequence number in the conversation.
    pub seq: Seq,
    /// Server timestamp, ms since the Unix epoch (non-decreasing across the whole store).
    pub server_time_ms: u64,
    /// The global version assigned to the append (strictly increasing across the store).
    pub version: u64,
    /// True if this was a retry of an already stored `(sender, client_msg_id)`: the values
    /// above are the original's and nothing was written.
    pub duplicate: bool,
}

/// When an acknowledged write is durable. See the crate docs, "Durability".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge after the batch's WAL record is fsync'ed (one fsync per batch).
    /// Survives process crashes and power loss.
    #[default]
    Fsync,
    /// Acknowledge after the WAL write reached the OS; a background thread fsyncs the WAL
    /// every `sync_interval_ms`. Survives process crashes; power loss may lose the last
    /// `sync_interval_ms` (plus one fsync) of acknowledged writes, always a suffix.
    Wal {
        /// Interval of the background WAL fsync, ms (at least 1).
        sync_interval_ms: u64,
    },
    /// No WAL at all: writes live in memtables until a flush. A crash loses everything not
    /// flushed; a clean [`MessageStore::close`] flushes. For tests and benchmarks.
    Memory,
}

/// Options for opening a store. Every field has a documented default.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoreOptions {
    /// Durability policy (default [`Durability::Fsync`]).
    pub durability: Durability,
    /// Idempotency window (default 1M entries, 24 h).
    pub dedup_window: DedupWindow,
    /// Most writes committed in one batch (default 4096).
    pub max_batch: usize,
    /// RocksDB block cache, bytes (default 256 MiB).
    pub block_cache_bytes: usize,
    /// Memtable size of the messages column family, bytes (default 64 MiB).
    pub write_buffer_bytes: usize,
    /// Entries of the writer's in-memory caches (conversation heads, user-conversation
    /// records, delivered cursors, memberships) before they are dropped and reloaded on
    /// demand (default 1M each). A cache is dropped only once every built batch is
    /// committed, so the writer pauses for one commit each time.
    pub cache_entries: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            durability: Durability::Fsync,
            dedup_window: DedupWindow::default(),
            max_batch: 4096,
            block_cache_bytes: 256 << 20,
            write_buffer_bytes: 64 << 20,
            cache_entries: 1_000_000,
        }
    }
}

impl StoreOptions {
    /// Options with the given durability and defaults otherwise.
    pub fn with_durability(durability: Durability) -> Self {
        StoreOptions {
            durability,
            ..StoreOptions::default()
        }
    }

    pub(crate) fn sync_interval(&self) -> Option<Duration> {
        match self.durability {
            Durability::Wal { sync_interval_ms } => {
                Some(Duration::from_millis(sync_interval_ms.max(1)))
            }
            _ => None,
        }
    }
}

/// One conversation of a user, as reported to sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationInfo {
    /// The conversation.
    pub conversation: ConversationId,
    /// The other side of it.
    pub peer: Peer,
    /// False once the user left (or was removed from) the group.
    pub active: bool,
    /// Latest sequence number (0 = no message yet).
    pub latest_seq: Seq,
    /// The highest version of any change of this conversation relevant to the user
    /// (newest message, join or leave, the user's read position or settings).
    pub last_version: u64,
    /// The user's read position (0 = nothing read).
    pub read_seq: Seq,
    /// 0 while the user is a member (and always for 1:1); otherwise the seq of the event that
    /// removed the user: they may read up to and including it and no further.
    pub left_seq: Seq,
    /// The asking device's delivered cursor (0 when no device was given).
    pub delivered_seq: Seq,
    /// The user's own settings of it.
    pub settings: ConversationSettings,
}

/// The durable message log and the metadata sync needs.
///
/// Implemented by [`crate::RocksStore`] (durable) and [`crate::MemStore`] (in memory, for
/// unit tests of higher layers); both are cheap to clone, `Send + Sync`, and behave the same
/// (one behavioural test suite runs against both).
///
/// Writes return a [`Completion`] and never block the calling thread; reads are synchronous
/// (RocksDB point and short range reads served from memtables and the block cache take
/// microseconds).
pub trait MessageStore: Send + Sync + fmt::Debug {
    /// The internal id of user `name`, allocated on first use (durably, before returning).
    /// Blocks for one WAL sync under [`Durability::Fsync`] the first time only.
    fn intern_user(&self, name: &str) -> Result<UserId>;
    /// The internal id of user `name`, if allocated.
    fn lookup_user(&self, name: &str) -> Result<Option<UserId>>;
    /// The name of internal user `id`.
    fn user_name(&self, id: UserId) -> Result<Option<String>>;
    /// The internal id of group `name`, allocated on first use.
    fn intern_group(&self, name: &str) -> Result<GroupId>;
    /// The internal id of group `name`, if allocated.
    fn lookup_group(&self, name: &str) -> Result<Option<GroupId>>;
    /// The name of internal group `id`.
    fn group_name(&self, id: GroupId) -> Result<Option<String>>;

    /// Adds `user` to `group` (with empty attributes) and its conversation to the user's
    /// index. Resolves to false if the user already was a member.
    fn add_member(&self, group: GroupId, user: UserId) -> Completion<bool>;
    /// Removes `user` from `group`; the conversation stays in the user's index, inactive, with
    /// [`ConversationInfo::left_seq`] = the conversation's latest seq (0 if it has no message
    /// yet: then only `active` tells). Resolves to false if the user was not a member.
    fn remove_member(&self, group: GroupId, user: UserId) -> Completion<bool>;
    /// Up to `limit` members of `group` with ids greater than `after` (0 = from the start),
    /// ascending. Page with `after` = the last id of the previous page.
    fn members(&self, group: GroupId, after: UserId, limit: usize) -> Result<Vec<UserId>>;
    /// The groups `user` is a member of, ascending.
    fn groups_of(&self, user: UserId) -> Result<Vec<GroupId>>;
    /// The group's record as last stored by a [`GroupChange`] (committed writes only).
    fn group_record(&self, group: GroupId) -> Result<Option<Bytes>>;
    /// Up to `limit` members of `group` with ids greater than `after`, ascending, with their
    /// attributes (empty for members added by [`MessageStore::add_member`]).
    fn member_records(
        &self,
        group: GroupId,
        after: UserId,
        limit: usize,
    ) -> Result<Vec<(UserId, Bytes)>>;
    /// The user's membership state in the group's conversation: `Some(left_seq)` if the user
    /// has (or had) the group's conversation in their index (0 = still a member), None if
    /// never. See [`ConversationInfo::left_seq`].
    fn membership(&self, user: UserId, group: GroupId) -> Result<Option<Seq>>;

    /// Changes the user's settings of `conv`: `cleared_seq` is clamped to the latest seq and
    /// never moves backwards (a lower value keeps the current one). A real change gets a new
    /// version, so [`MessageStore::conversations_changed_since`] reports the conversation again
    /// with its settings; an unchanged result writes nothing. Resolves to the resulting
    /// settings.
    fn set_conversation_settings(
        &self,
        user: UserId,
        conv: ConversationId,
        settings: ConversationSettings,
    ) -> Completion<ConversationSettings>;
    /// The user's settings of `conv` (the default if never set).
    fn conversation_settings(
        &self,
        user: UserId,
        conv: ConversationId,
    ) -> Result<ConversationSettings>;

    /// Applies relation changes, all in one atomic write (at most [`MAX_RELATION_CHANGES`]).
    /// Relations do not take part in sync (no version changes).
    fn set_relations(&self, changes: Vec<RelationChange>) -> Completion<()>;
    /// The value of one relation, if it exists.
    fn relation(&self, user: UserId, kind: RelationKind, other: UserId) -> Result<Option<Bytes>>;
    /// Up to `limit` relations of `kind` of `user` with `other > after`, ascending by `other`.
    fn relations(
        &self,
        user: UserId,
        kind: RelationKind,
        after: UserId,
        limit: usize,
    ) -> Result<Vec<(UserId, Bytes)>>;
    /// How many relations of `kind` `user` has. No counter is kept: this scans their keys
    /// (cost linear in the count; cheap for friend lists and blacklists of usual size).
    fn count_relations(&self, user: UserId, kind: RelationKind) -> Result<u64>;
    /// Stores the user's profile (opaque bytes), replacing any earlier one.
    fn set_user_profile(&self, user: UserId, profile: Bytes) -> Completion<()>;
    /// The user's profile, if set.
    fn user_profile(&self, user: UserId) -> Result<Option<Bytes>>;

    /// Appends a message, and applies its [`AppendRequest::group_change`] in the same atomic
    /// write; resolves once it is stored under the durability policy.
    fn append(&self, req: AppendRequest) -> Completion<Appended>;
    /// Up to `limit` messages with `seq >= from_seq`, ascending.
    fn read_forward(
        &self,
        conv: ConversationId,
        from_seq: Seq,
        limit: usize,
    ) -> Result<Vec<StoredMessage>>;
    /// Up to `limit` messages with `seq < before_seq` (0 = from the latest), newest first.
    fn read_backward(
        &self,
        conv: ConversationId,
        before_seq: Seq,
        limit: usize,
    ) -> Result<Vec<StoredMessage>>;
    /// The latest acknowledged sequence number of `conv` (0 if empty).
    fn latest_seq(&self, conv: ConversationId) -> Result<Seq>;

    /// The user's conversations whose `last_version > since_version`, by conversation id.
    /// `device` selects whose delivered cursor is reported.
    fn conversations_changed_since(
        &self,
        user: UserId,
        since_version: u64,
        device: Option<&str>,
    ) -> Result<Vec<ConversationInfo>>;
    /// The user's version: the maximum `last_version` over the user's conversations.
    fn user_version(&self, user: UserId) -> Result<u64>;
    /// Moves the user's read position in `conv` forward to `seq` (clamped to the latest
    /// seq; never backwards). Resolves to the resulting read position.
    fn set_read(&self, user: UserId, conv: ConversationId, seq: Seq) -> Completion<Seq>;
    /// The user's read position in `conv`.
    fn read_seq(&self, user: UserId, conv: ConversationId) -> Result<Seq>;
    /// Moves a device's delivered cursor forward to `seq` (clamped to the latest seq; never
    /// backwards). Resolves to the resulting cursor.
    fn set_delivered(
        &self,
        user: UserId,
        device: &str,
        conv: ConversationId,
        seq: Seq,
    ) -> Completion<Seq>;
    /// A device's delivered cursor in `conv` (0 if none).
    fn delivered(&self, user: UserId, device: &str, conv: ConversationId) -> Result<Seq>;

    /// Stops accepting writes, completes everything already queued, makes it durable
    /// (flushing memtables under [`Durability::Memory`]) and joins the writer. Idempotent.
    /// Later calls on any clone fail with [`StorageError::Closed`].
    fn close(&self) -> Result<()>;
}

pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(StorageError::InvalidArgument("empty name"));
    }
    if name.len() > 1024 {
        return Err(StorageError::InvalidArgument("name too long"));
    }
    Ok(())
}

pub(crate) fn check_device(device: &str) -> Result<()> {
    if device.len() > 256 {
        return Err(StorageError::InvalidArgument("device id too long"));
    }
    Ok(())
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
