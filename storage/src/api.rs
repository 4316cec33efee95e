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
    /// Internal user id of the sender. If the conversation is active in the sender's index,
    /// their read position moves to this message (see the crate docs, "Unread").
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
    /// Hidden from the list (the history stays) until a newer message than the hide arrives
    /// in the conversation (up to where the user may read: a group they left stays hidden, and
    /// so does one hidden before the event that removed them). Records stored before the
    /// hide's position was kept stay hidden until unhidden (see the record's format docs).
    pub hidden: bool,
    /// Do not disturb.
    pub muted: bool,
    /// History up to and including this seq is cleared for this user (0 = nothing).
    pub cleared_seq: Seq,
}

/// A change to a user's settings of one conversation. The store applies it to the settings
/// stored when it writes the change, so fields left `None` keep their value even if another
/// device changed them a moment before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SettingsChange {
    /// Pin or unpin; `None` keeps it.
    pub pinned: Option<bool>,
    /// Hide or show; `None` keeps it (a conversation shown again by a new message stays shown).
    pub hidden: Option<bool>,
    /// Do not disturb on or off; `None` keeps it.
    pub muted: Option<bool>,
    /// Clear history up to and including this seq: clamped to the conversation's latest seq,
    /// and never moves backwards (0, or a value below the current one, keeps the current one).
    pub clear_upto_seq: Seq,
}

impl SettingsChange {
    /// The settings after this change to `current`, in a conversation whose latest seq is
    /// `latest_seq`.
    pub fn apply(&self, current: ConversationSettings, latest_seq: Seq) -> ConversationSettings {
        ConversationSettings {
            pinned: self.pinned.unwrap_or(current.pinned),
            hidden: self.hidden.unwrap_or(current.hidden),
            muted: self.muted.unwrap_or(current.muted),
            cleared_seq: self.clear_upto_seq.min(latest_seq).max(current.cleared_seq),
        }
    }
}

/// Every field set to `s`'s value (its `cleared_seq` as the seq to clear up to).
impl From<ConversationSettings> for SettingsChange {
    fn from(s: ConversationSettings) -> Self {
        SettingsChange {
            pinned: Some(s.pinned),
            hidden: Some(s.hidden),
            muted: Some(s.muted),
            clear_upto_seq: s.cleared_seq,
        }
    }
}

/// What [`MessageStore::sync_view`] read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncView {
    /// The conversations changed since the version asked for, by conversation id.
    pub conversations: Vec<ConversationInfo>,
    /// The user's version in the same view.
    pub user_version: u64,
}

/// What [`MessageStore::set_conversation_settings`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingsUpdate {
    /// The settings after the change.
    pub settings: ConversationSettings,
    /// Whether they differ from the settings before (only then was anything written).
    pub changed: bool,
}

impl SettingsUpdate {
    /// `change` applied to `current`, in a conversation whose latest seq is `latest_seq`.
    pub(crate) fn of(
        change: SettingsChange,
        current: ConversationSettings,
        latest_seq: Seq,
    ) -> Self {
        let settings = change.apply(current, latest_seq);
        SettingsUpdate {
            settings,
            changed: settings != current,
        }
    }
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

/// One change of the account state in [`MessageStore::set_meta`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaChange {
    /// The key (1..=[`MAX_META_KEY_LEN`] bytes), opaque to the store; keys sort bytewise.
    pub key: Bytes,
    /// The value (at most [`MAX_META_VALUE_LEN`] bytes, may be empty), opaque to the store;
    /// None deletes the key.
    pub value: Option<Bytes>,
}

/// Longest key of the account state, bytes.
pub const MAX_META_KEY_LEN: usize = 512;
/// Longest value of the account state, bytes (64 KiB).
pub const MAX_META_VALUE_LEN: usize = 64 << 10;
/// Most changes one [`MessageStore::set_meta`] may carry.
pub const MAX_META_CHANGES: usize = 1_000;
/// Most entries one [`MessageStore::scan_meta`] returns (a larger `limit` is capped).
pub const MAX_META_SCAN: usize = 10_000;

pub(crate) fn check_meta(changes: &[MetaChange]) -> Result<()> {
    // The messages name the limits; a test keeps them in step with the constants.
    if changes.len() > MAX_META_CHANGES {
        return Err(StorageError::InvalidArgument(
            "more than 1000 meta changes in one call",
        ));
    }
    for c in changes {
        if c.key.is_empty() {
            return Err(StorageError::InvalidArgument(
                "empty meta key (keys are 1 to 512 bytes)",
            ));
        }
        if c.key.len() > MAX_META_KEY_LEN {
            return Err(StorageError::InvalidArgument(
                "meta key longer than 512 bytes",
            ));
        }
        if c.value
            .as_ref()
            .is_some_and(|v| v.len() > MAX_META_VALUE_LEN)
        {
            return Err(StorageError::InvalidArgument(
                "meta value longer than 65536 bytes (64 KiB)",
            ));
        }
    }
    Ok(())
}

/// The first key of a bytewise-ordered key space that does not start with `prefix`: the
/// exclusive upper bound of a prefix scan. None if there is none (`prefix` is empty or all
/// 0xFF: every key after it starts with it).
#[cfg(feature = "store")]
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|&b| b != 0xFF)?;
    let mut end = prefix[..=last].to_vec();
    end[last] += 1;
    Some(end)
}

/// Where a [`MessageStore::scan_meta`] starts: the first key that may start with `prefix`
/// and be greater than `after` (an empty `after` excludes nothing).
/// Upper bounds (operations per batch) of the buckets of [`CommitStats::size_buckets`].
pub const COMMIT_SIZE_BOUNDS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
/// Upper bounds (microseconds) of the buckets of [`CommitStats::micros_buckets`].
pub const COMMIT_MICROS_BOUNDS: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
];

/// The group commit's counters since the store was opened, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Batches committed (a batch of only duplicates writes nothing but counts).
    pub commits: u64,
    /// Operations (appends, cursor and account-state changes, ...) in them.
    pub ops: u64,
    /// `size_buckets[i]`: batches of at most `COMMIT_SIZE_BOUNDS[i]` operations (and more than
    /// the bound before); the last entry counts larger batches.
    pub size_buckets: [u64; COMMIT_SIZE_BOUNDS.len() + 1],
    /// Total time spent in commits (the WAL write and its sync), in microseconds.
    pub micros_sum: u64,
    /// `micros_buckets[i]`: commits that took at most `COMMIT_MICROS_BOUNDS[i]` µs (and more
    /// than the bound before); the last entry counts slower ones.
    pub micros_buckets: [u64; COMMIT_MICROS_BOUNDS.len() + 1],
}

pub(crate) fn meta_scan_start(prefix: &[u8], after: &[u8]) -> Vec<u8> {
    if after.is_empty() || after < prefix {
        return prefix.to_vec();
    }
    // The smallest key greater than `after`.
    let mut start = Vec::with_capacity(after.len() + 1);
    start.extend_from_slice(after);
    start.push(0);
    start
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
///   [`ConversationInfo::left_seq`] 0) with this append's version, and their read position
///   moves to this append (nothing unread). If they were, only the attributes change.
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
    /// The members this change adds get [`ConversationInfo::joined_seq`] 0 (they may read the
    /// group from its start) instead of this append's seq.
    pub joiners_read_history: bool,
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
    /// Under [`Durability::Fsync`], the least time between the starts of two commits, each
    /// one WAL sync (default 500 µs). Appends that arrive sooner wait and share the next sync,
    /// so the disk is asked for at most one sync per interval (2,000 a second) however fast
    /// appends come, unless `max_batch` appends are already queued (a full batch is committed
    /// without waiting). An append with no commit started within the interval is committed at
    /// once; a caller appending one at a time gets at most one commit per interval. Fewer
    /// syncs keep the tail short where a sync costs more than its own time: a virtual or cloud
    /// disk charges every request to the machine's I/O or CPU budget, and syncing every few
    /// appends used that budget up (docs/PERFORMANCE.md, "Syncs spaced"). Zero commits as soon
    /// as the committer is free. A close waits for the interval too, so keep it short. The
    /// other policies do not sync per commit and ignore it.
    pub min_sync_interval: Duration,
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
            min_sync_interval: Duration::from_micros(500),
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

    /// The spacing the builder keeps between commits (see `min_sync_interval`), if any.
    #[cfg(feature = "store")]
    pub(crate) fn commit_spacing(&self) -> Option<Duration> {
        (self.durability == Durability::Fsync && !self.min_sync_interval.is_zero())
            .then_some(self.min_sync_interval)
    }

    #[cfg(feature = "store")]
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
    /// (newest message, join or leave, the user's read position or settings, the other
    /// user's read position).
    pub last_version: u64,
    /// The user's read position (0 = nothing read). Never below the user's own latest message
    /// in the conversation, nor below the event that added them to the group (see the crate
    /// docs, "Unread").
    pub read_seq: Seq,
    /// In a 1:1 conversation, the other user's read position (their `read_seq`); 0 for a
    /// group. A change of it changes `last_version`.
    pub peer_read_seq: Seq,
    /// 0 while the user is a member (and always for 1:1); otherwise the seq of the event that
    /// removed the user: they may read up to and including it and no further.
    pub left_seq: Seq,
    /// For a group: the first seq after the user's latest join (the event that added them); 0
    /// for 1:1 conversations and for members who joined before the store recorded it. Whether
    /// the messages before it are shown to the user is the caller's policy.
    pub joined_seq: Seq,
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
    /// The internal id of user `name`, allocated on first use. A new id is in the log before
    /// this returns (it survives a crash of the process) but not synced by itself: it becomes
    /// durable against power loss with the next synced write, such as any append that
    /// refers to it ("Interned ids" in the crate's invariants). [`MessageStore::sync_interned`]
    /// syncs at once.
    fn intern_user(&self, name: &str) -> Result<UserId>;
    /// The internal id of user `name`, if allocated.
    fn lookup_user(&self, name: &str) -> Result<Option<UserId>>;
    /// The name of internal user `id`.
    fn user_name(&self, id: UserId) -> Result<Option<String>>;
    /// The internal id of group `name`, allocated on first use, as
    /// [`MessageStore::intern_user`] allocates users'.
    fn intern_group(&self, name: &str) -> Result<GroupId>;
    /// Makes every id interned so far durable under the store's policy: one WAL sync under
    /// [`Durability::Fsync`], nothing under the others (`Wal` syncs on its own schedule).
    fn sync_interned(&self) -> Result<()>;
    /// The internal id of group `name`, if allocated.
    fn lookup_group(&self, name: &str) -> Result<Option<GroupId>>;
    /// The name of internal group `id`.
    fn group_name(&self, id: GroupId) -> Result<Option<String>>;

    /// Adds `user` to `group` (with empty attributes) and its conversation to the user's
    /// index, with the read position moved to the latest message (nothing unread). Resolves
    /// to false if the user already was a member.
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
    /// The group's record as last stored by a [`GroupChange`] or
    /// [`MessageStore::set_group_record`] (committed writes only).
    fn group_record(&self, group: GroupId) -> Result<Option<Bytes>>;
    /// Replaces the group's record without a message in its log: for state that members do
    /// not see, such as pending join requests. Ordered with appends like every write (a
    /// [`GroupChange`] submitted after it replaces it, one submitted before is replaced).
    fn set_group_record(&self, group: GroupId, record: Bytes) -> Completion<()>;
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
    /// [`ConversationInfo::joined_seq`] of `user` in `group` (0 if they never were a member).
    fn joined_seq(&self, user: UserId, group: GroupId) -> Result<Seq>;

    /// Applies `change` to the user's settings of `conv` as stored when the change is written
    /// (see [`SettingsChange::apply`]). A real change gets a new version, so
    /// [`MessageStore::conversations_changed_since`] reports the conversation again with its
    /// settings; an unchanged result writes nothing.
    fn set_conversation_settings(
        &self,
        user: UserId,
        conv: ConversationId,
        change: SettingsChange,
    ) -> Completion<SettingsUpdate>;
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

    /// Applies changes to the account state, a small key-value map of server-side state that
    /// is not messages (bans, push tokens, aliases, tags, ...): keys and values are opaque
    /// bytes, keys sort bytewise, so a caller namespaces them with prefixes.
    ///
    /// # Invariants
    ///
    /// * **Limits.** At most [`MAX_META_CHANGES`] changes, each key 1..=[`MAX_META_KEY_LEN`]
    ///   bytes, each value at most [`MAX_META_VALUE_LEN`] bytes. A call over a limit resolves
    ///   to [`StorageError::InvalidArgument`] naming it, and writes nothing.
    /// * **Atomicity.** All changes of one call are applied in one atomic write, in order (the
    ///   last change of a key wins): after a crash, all of them or none.
    /// * **Durability.** An `Ok` completion means the write is committed under the store's
    ///   durability policy and visible to every read that starts afterwards; reads never see
    ///   a call half applied or not yet committed.
    /// * **Ordering.** Calls go through the same writer as appends: calls submitted from one
    ///   thread are applied in submission order.
    /// * **Not synced.** Account state takes no version and is not part of sync.
    fn set_meta(&self, changes: Vec<MetaChange>) -> Completion<()>;
    /// The value of `key` in the account state, if set (committed writes only).
    fn meta(&self, key: &[u8]) -> Result<Option<Bytes>>;
    /// Up to `limit` (at most [`MAX_META_SCAN`]) entries of the account state whose keys start
    /// with `prefix` and are greater than `after` (empty = from the start of the prefix),
    /// ascending by key. Page with `after` = the last key of the previous page. Reads nothing
    /// outside the prefix (an empty prefix scans everything).
    fn scan_meta(&self, prefix: &[u8], after: &[u8], limit: usize) -> Result<Vec<(Bytes, Bytes)>>;
    /// The group commit's counters (all zero for a store without one).
    fn commit_stats(&self) -> CommitStats {
        CommitStats::default()
    }

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

    /// What a sync needs, read in one pass over one consistent view of the store: the user's
    /// conversations whose `last_version > since_version`, by conversation id (`device`
    /// selects whose delivered cursor is reported), and the user's version, the maximum
    /// `last_version` over all the user's conversations in the same view. Every change with a
    /// version up to that one is in the view, so a later sync from it misses nothing.
    fn sync_view(&self, user: UserId, since_version: u64, device: Option<&str>)
    -> Result<SyncView>;
    /// The conversations of [`MessageStore::sync_view`] alone.
    fn conversations_changed_since(
        &self,
        user: UserId,
        since_version: u64,
        device: Option<&str>,
    ) -> Result<Vec<ConversationInfo>> {
        Ok(self.sync_view(user, since_version, device)?.conversations)
    }
    /// The user's version alone: the maximum `last_version` over the user's conversations.
    fn user_version(&self, user: UserId) -> Result<u64> {
        Ok(self.sync_view(user, u64::MAX, None)?.user_version)
    }
    /// Moves the user's read position in `conv` forward to `seq` (clamped to the latest
    /// seq; never backwards). Resolves to the resulting read position.
    fn set_read(&self, user: UserId, conv: ConversationId, seq: Seq) -> Completion<Seq>;
    /// The user's read position in `conv`.
    fn read_seq(&self, user: UserId, conv: ConversationId) -> Result<Seq>;
    /// [`MessageStore::read_seq`] and [`ConversationInfo::joined_seq`] of `user` in `conv`,
    /// from one read.
    fn read_and_joined_seq(&self, user: UserId, conv: ConversationId) -> Result<(Seq, Seq)>;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "store")]
    fn prefix_end_is_the_first_key_outside_the_prefix() {
        assert_eq!(prefix_end(b"tag/a"), Some(b"tag/b".to_vec()));
        assert_eq!(prefix_end(b"tag/a\xff"), Some(b"tag/b".to_vec()));
        assert_eq!(prefix_end(b"a\xfe\xff\xff"), Some(b"a\xff".to_vec()));
        assert_eq!(prefix_end(b"\x00"), Some(b"\x01".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn meta_scan_starts_after_after_within_the_prefix() {
        assert_eq!(meta_scan_start(b"tag/", b""), b"tag/");
        assert_eq!(meta_scan_start(b"tag/", b"tad"), b"tag/");
        assert_eq!(meta_scan_start(b"tag/", b"tag/"), b"tag/\x00");
        assert_eq!(meta_scan_start(b"tag/", b"tag/x"), b"tag/x\x00");
        assert_eq!(meta_scan_start(b"", b"\xff"), b"\xff\x00");
    }

    /// The errors name the limits they report.
    #[test]
    fn meta_limit_errors_name_the_limits() {
        let change = |key: usize, value: Option<usize>| MetaChange {
            key: vec![b'k'; key].into(),
            value: value.map(|n| vec![b'v'; n].into()),
        };
        let message = |changes: &[MetaChange]| match check_meta(changes) {
            Err(StorageError::InvalidArgument(m)) => m,
            r => panic!("{r:?}"),
        };
        let key = MAX_META_KEY_LEN.to_string();
        assert!(message(&[change(0, None)]).contains(&key));
        assert!(message(&[change(MAX_META_KEY_LEN + 1, None)]).contains(&key));
        let value = message(&[change(1, Some(MAX_META_VALUE_LEN + 1))]);
        assert!(value.contains(&MAX_META_VALUE_LEN.to_string()), "{value}");
        let many = vec![change(1, None); MAX_META_CHANGES + 1];
        assert!(message(&many).contains(&MAX_META_CHANGES.to_string()));
        assert!(check_meta(&[change(MAX_META_KEY_LEN, Some(MAX_META_VALUE_LEN))]).is_ok());
        assert!(check_meta(&vec![change(1, None); MAX_META_CHANGES]).is_ok());
    }
}
