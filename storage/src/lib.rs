//! Tern's durable message log: the source of truth the gateway acknowledges against and
//! every device catches up from.
//!
//! The API is the [`MessageStore`] trait; [`RocksStore`] implements it on RocksDB and
//! [`MemStore`] in memory (for unit tests of higher layers). No RocksDB type appears in the
//! public API.
//!
//! * **Append** a message to a conversation: it gets the next sequence number of that
//!   conversation (1, 2, 3, ...), the server time and a global version. Writes return a
//!   [`Completion`], a runtime-agnostic future (the gateway awaits it on its glommio
//!   executors; [`Completion::wait`] blocks a plain thread).
//! * **Idempotency**: a retry of `(sender, client_msg_id)` within the [`DedupWindow`]
//!   returns the original sequence number, flagged `duplicate`, and writes nothing.
//! * **Read** pages forward from a seq or backward from a seq, and the latest seq.
//! * **Sync state**: each user's conversations with latest seq, read position, per-device
//!   delivered cursors, and a per-user version so that a device that knows version V asks
//!   [`MessageStore::sync_view`] for only what changed (and the version to ask from next time,
//!   read from the same snapshot).
//! * **Metadata**: string user and group ids interned to compact `u64`s, group membership.
//! * **Groups**: an append may carry a [`GroupChange`] (the group's record, members joining,
//!   leaving or changing attributes) that commits atomically with the message recording it;
//!   read back with [`MessageStore::group_record`], [`MessageStore::member_records`] and
//!   [`MessageStore::membership`].
//! * **Settings and recall**: a user's own settings of a conversation (pinned, hidden, muted,
//!   cleared seq), synced like read positions; an append may recall an earlier message of
//!   its conversation ([`AppendRequest::recall`]), emptying it atomically with the append.
//! * **Social graph**: directed relations between users (friends, friend requests, blocked)
//!   and user profiles, opaque values written in atomic batches
//!   ([`MessageStore::set_relations`], [`MessageStore::set_user_profile`]).
//! * **Account state**: a small key-value map of server-side state that is not messages
//!   (bans, push tokens, aliases, tags, ...), opaque keys and values changed in atomic
//!   batches and read by key or by key prefix ([`MessageStore::set_meta`],
//!   [`MessageStore::meta`], [`MessageStore::scan_meta`]).
//!
//! What it does **not** do: authorisation (any caller may append to any conversation; the
//! gateway checks membership), delivery or fan-out, deleting or editing messages (a recall
//! only empties one in place), retention, replication, or sharding across machines. It does
//! not know the wire protocol: payloads are opaque bytes.
//!
//! # Ids
//!
//! See [`ids`](crate::direct_conversation): users and groups are interned to `u64`; the id
//! of a 1:1 conversation packs both user ids (so user ids have 31 bits), group
//! conversations have the top bit set.
//!
//! # Layout (RocksDB column families)
//!
//! | column family | key | value | why |
//! |---|---|---|---|
//! | `messages` | conv BE ++ seq BE | message record (version 2 once recalled: no payload) | a conversation is one contiguous key range in seq order: a page read is one seek plus `next`/`prev`; a fixed 8-byte prefix extractor with prefix bloom filters (SST and memtable) makes seeks into a conversation skip files that do not hold it; the latest seq is one `seek_for_prev`; since a conversation's keys arrive in order, each memtable insert starts from a hint kept per conversation (`memtable_insert_with_hint_prefix_extractor`) instead of a skiplist search |
//! | `user_convs` | user BE ++ conv BE | user-conversation record (member flag, read position, versions, seqs the user last joined and left at, the user's settings: pinned, hidden and the seq it was hidden at, muted, cleared seq) | all conversations of a user in one range scan (prefix 8) |
//! | `cursors` | user BE ++ conv BE ++ device | delivered seq | point reads; whole-key bloom |
//! | `members`, `user_groups` | group ++ user, user ++ group | the member's attributes (opaque, as given; empty from `add_member`), empty | paged member lists (with attributes) and a user's groups, each a prefix scan |
//! | `groups` | group BE | the group's record (opaque, as given) | point read |
//! | `relations` | user BE ++ kind u8 ++ other BE | the relation's value (opaque) | one user's friends, requests or blacklist as a prefix scan (fixed 9-byte prefix bloom); "is this sender blocked?" as a point read with whole-key bloom, on every 1:1 send |
//! | `profiles` | user BE | the user's profile (opaque) | point read |
//! | `account_meta` | the caller's key (1 to 512 bytes, opaque) | the caller's value (opaque, at most 64 KiB) | point reads with whole-key bloom; prefix scans in bytewise key order with the iterator's upper bound at the end of the prefix (no prefix extractor: callers' prefixes have any length) |
//! | `user_ids`, `user_names`, `group_ids`, `group_names` | name, id BE | id, name | interning both ways |
//! | `dedup_journal` | first version of a batch, BE | the batch's idempotent appends | rebuilds the idempotency index on open |
//! | `meta` | `format_version`, `version`, `next_user_id`, `next_group_id` | counters | the store's own; callers' keys never go here |
//!
//! Separate column families keep the small, hot metadata out of the message log's
//! compactions, and let each have its own prefix extractor, filters and memtable size.
//! Big-endian keys make byte order numeric order. Record values start with a version byte
//! ([`decode_record`] documents the message record), except the gateway's opaque group
//! records and member attributes, stored as given; the directory's `format_version`
//! is checked on open ([`StorageError::UnsupportedFormat`]). Column families missing from an
//! existing directory are created on open (`groups`, `relations`, `profiles` and
//! `account_meta` in a directory written before they existed); the format version is the
//! same, and records in the older forms decode (see [`decode_record`]; user-conversation
//! records of 26, 34, 51 and 59 bytes get default values for the newer fields and are
//! rewritten on their next change). The reverse does not hold: a build refuses record forms
//! newer than itself as corrupt, so a data directory goes forward only (keep a backup to go
//! back to an older build).
//!
//! **Keys written per message**: one (`messages`) in the steady state. Per committed batch:
//! one `meta` key (the version counter) and, if the batch had idempotent appends, one
//! `dedup_journal` key. A `user_convs` key is written only the first time a participant is
//! seen in a conversation. The idempotency record is not a second key per message. An append
//! with a group change also writes the group's record (if given) and, per member entry that
//! adds, updates or removes a member, its `members` key, plus on a join or leave its
//! `user_groups` key and the user's `user_convs` record. An append with a recall also
//! rewrites the recalled message's key (nothing if it is recalled already). A settings change
//! writes the user's `user_convs` record; a relation change one `relations` key (a put or a
//! delete); a profile one `profiles` key; an account state change one `account_meta` key (a
//! put or a delete).
//!
//! # Sync and versions
//!
//! The writer gives every change a **version** from one store-wide counter: each append
//! (stored inside the message record), each membership change, each read-position change and
//! each settings change (stored in the user-conversation record). A conversation's
//! `last_version` for a user is the maximum of its newest message's version, the user's
//! record's versions (membership, read position, settings) and, in a 1:1 conversation, the
//! version of the other user's read position; the user's version is the maximum over their
//! conversations. Versions only grow, so "what changed since V" is `last_version > V`; it is
//! computed by scanning the user's conversation index, with one `seek_for_prev` per
//! conversation and one point read of the other user's record per 1:1 conversation (cost
//! linear in the user's number of conversations): a read receipt costs no write to the other
//! user's records. Delivered cursors are per device and do not change versions.
//!
//! Read positions, delivered cursors and membership changes go through the same writer as
//! appends (batched with them, same durability); read positions and cursors are monotonic (a
//! lower value is a no-op) and clamped to the conversation's latest seq.
//!
//! **Unread.** A user's unread count is `latest_seq - read_seq`, and the writer keeps it free
//! of what the user already knows: an append moves its sender's read position to it (a user
//! has read what they wrote; only for a sender with the conversation active in their index,
//! in the same write, no extra version), and joining a group moves the new member's read
//! position to the event that added them ([`MessageStore::add_member`]: to the latest
//! message). Both are one more write of a record the writer caches, at most one per user and
//! conversation per batch.
//!
//! **Settings and recall.** A user's settings of a conversation
//! ([`MessageStore::set_conversation_settings`]) live in their user-conversation record and
//! take a version like a read position, so other devices learn them through sync. A change
//! ([`SettingsChange`]) names only the fields it sets and is applied by the writer to the
//! record as stored then, so concurrent changes of different fields both hold; the
//! cleared seq is monotonic and clamped like a read position, and a change that leaves the
//! settings as they are writes nothing and takes no version. Hiding records the
//! conversation's latest readable seq; the conversation reads as hidden only while nothing
//! newer arrived, so a new message shows it again without any write to the record (its
//! version makes sync report the conversation). A recall
//! ([`AppendRequest::recall`]) rewrites the recalled message's record (record version 2, no
//! payload; its seq, version, sender, time, ids and types stay) in the same `WriteBatch` as
//! the append that announces it; a duplicate append recalls nothing. The recalled record
//! keeps its old version, so the recall reaches sync through its append (the conversation's
//! newest message). Relations, profiles and account state go through the writer too (batched,
//! same durability) but take no version: they are not part of sync.
//!
//! **Group changes.** A change of a group's stored state is recorded as a message in the
//! group's conversation, and the append carries the change ([`AppendRequest::group_change`]):
//! the message and the change get the same seq and version and are written in the same
//! `WriteBatch`, so after a crash either both are there or neither. A duplicate append (an
//! idempotency hit) applies nothing. A member who joins gets the conversation active in
//! their index with the append's version and [`ConversationInfo::joined_seq`] = the append's
//! seq (the gateway may hide what came before it); a member who is removed keeps it, inactive, with
//! the append's version and [`ConversationInfo::left_seq`] = the append's seq (the removal
//! event is the last message they may read). Changing only a member's attributes changes
//! nothing in their index (the message itself is news to every member, as any message). [`MessageStore::add_member`] and [`MessageStore::remove_member`] are
//! the same without a message: they get their own version, a removal's `left_seq` is
//! the conversation's latest seq, and an addition's `joined_seq` the seq after it.
//!
//! # Durability
//!
//! | policy | acknowledged after | after a process crash | after power loss / kernel crash |
//! |---|---|---|---|
//! | [`Durability::Fsync`] (default) | the batch's WAL record is fsync'ed (one fsync per batch) | every acknowledged write is there | every acknowledged write is there |
//! | [`Durability::Wal`] | the WAL record is written to the OS | every acknowledged write is there | writes acknowledged in the last `sync_interval_ms` (plus one fsync) may be lost, always a suffix of the log (no gaps); the lost seqs are then assigned again to later messages, so a client holding such an ack may later see another message under that seq |
//! | [`Durability::Memory`] | the memtable insert | everything since the last memtable flush may be lost, seqs are then reused (a clean `close` flushes) | same |
//!
//! Unacknowledged writes (in flight at a crash) may or may not be there; if one is there,
//! a retry with the same client message id finds it (idempotency covers both cases).
//!
//! # Writer threads
//!
//! Writes go through one queue to the **writer**, a two-stage pipeline on two threads:
//!
//! * the **builder** (`tern-storage-writer`) takes everything queued (up to
//!   [`StoreOptions::max_batch`]), assigns seqs and versions, checks and fills the
//!   idempotency index and builds one `WriteBatch`;
//! * the **committer** (`tern-storage-commit`) writes the batches to RocksDB one at a time,
//!   in the order they were built, with the durability policy (one fsync per batch under
//!   `Fsync`), and then completes that batch's writes, in order.
//!
//! While batch N is committed the builder builds batch N+1 (a rendezvous hand-off: at most
//! one batch is built ahead), so RocksDB's half of the work (memtable insert, WAL checksum
//! and write, fsync) and ours (sequencing, idempotency, encoding) run on two cores. The
//! builder's in-memory state (conversation heads, user-conversation records, cursor and
//! membership caches, idempotency index, version counter) therefore runs ahead of the
//! database by at most two batches; reads go to RocksDB and see only committed batches.
//!
//! Under `Fsync` the builder also keeps [`StoreOptions::min_sync_interval`] (default 500 µs)
//! between hand-offs: a write that comes sooner after the last commit started waits, and what
//! arrives meanwhile joins its batch, so the disk is asked for at most one sync per interval
//! (a full batch of `max_batch` writes does not wait). A write with no commit that recent is
//! built at once.
//!
//! # Invariants
//!
//! * **Single writer.** One pipeline per open store (the builder thread, whose batches one
//!   committer thread writes in build order) assigns all sequence numbers and versions and
//!   owns the idempotency index; everything else only reads. A data directory is open at
//!   most once: a second open in the same process fails with [`StorageError::AlreadyOpen`],
//!   in another process with [`StorageError::Locked`] (RocksDB's `LOCK` file). So no second
//!   writer can exist for any conversation.
//! * **Recall reads.** The builder reads the record a recall rewrites from the database or,
//!   if the message was appended earlier in the same batch, from that batch. A batch with a
//!   recall is therefore built only once every batch before it is committed (the pipeline
//!   pauses for one commit; recalls are rare), so a recall never misses a message in flight
//!   nor rewrites one that a failed commit rolls back.
//! * **Sequences.** Per conversation, acknowledged seqs are 1, 2, 3, ... with no gap and no
//!   reuse, across restarts and crashes (under `Fsync`; under `Wal` across process crashes,
//!   see the table above): the writer reloads a conversation's head from the log. The
//!   builder's caches never drop an entry that a built but uncommitted batch wrote (a full
//!   cache is dropped only once every built batch is committed).
//! * **Failed commits.** If a batch's commit fails, its ops fail with
//!   [`StorageError::CommitFailed`], and so do the ops of every batch already built on top
//!   of it (the committer writes none of them: batches carry the builder's epoch, and a
//!   failure ends the epoch). The builder then rolls its in-memory state back to the last
//!   committed batch (caches dropped and reloaded from the database, the failed batches'
//!   idempotency entries forgotten) before it builds anything else, so no seq is skipped or
//!   reused and no retry is answered from an uncommitted append. The committer reports the
//!   failure to the builder before it resolves the failed completions, so a write submitted
//!   after seeing the failure is built on the rolled-back state.
//! * **Interned ids.** Interning writes a new id (its name both ways) to the WAL without
//!   syncing it, under a mutex, from the calling thread. The WAL is one sequence and RocksDB
//!   recovers a prefix of it, so the id is durable once any later write is synced, and every
//!   write that refers to an id (an append, a membership, a relation) comes after the intern
//!   that returned it: what survives a power loss never refers to an id that did not. Ids are
//!   reserved in blocks of 1,024: the first id of a block stores the block's end with a synced
//!   write (under `Wal` too), and a store reopened after a crash hands out ids from there on,
//!   so an id that a client saw (in a conversation id, say) and that was lost is never given
//!   to another name; the name gets a fresh id when next interned. A clean close stores the
//!   next id itself, so ids continue without a gap. Callers that report an intern outside the
//!   process before any write (the admin API's user import) call
//!   [`MessageStore::sync_interned`] first.
//! * **Ordering.** Appends are sequenced in the order the writer receives them; appends
//!   submitted from one thread (the conversation's owner core) are sequenced in submission
//!   order. Server timestamps never decrease; versions strictly increase (a failed batch
//!   leaves a gap in versions, which is harmless).
//! * **What an ack promises.** An `Ok` completion means the write is committed under the
//!   durability policy and visible to every read that starts afterwards. Reads never see
//!   uncommitted writes. Completions resolve in batch order, and only after every batch
//!   built before theirs is committed (so a duplicate answer or a no-op never resolves
//!   before the write it refers to is committed).
//! * **Atomicity.** Everything in a batch (messages, recalled records, index entries, group
//!   changes, settings, relations, profiles, account state, journal, version counter) commits
//!   atomically in one `WriteBatch`; in particular a group change or a recall and the message
//!   recording it are never one without the other, and one [`MessageStore::set_relations`] or
//!   [`MessageStore::set_meta`] call is applied whole or not at all. A group change is
//!   validated before it is queued, and the builder does every read an append needs before
//!   it changes any in-memory state, so a failing append leaves nothing behind; a failed
//!   commit rolls back the member flags and user-conversation records a group change cached
//!   (the builder caches nothing else of it), and the user-conversation records settings
//!   changes cached; recalls, relations, profiles and account state leave nothing in the
//!   builder's memory beyond their batch.
//! * **Shutdown.** [`MessageStore::close`] (or dropping the last handle) completes every
//!   write queued before it, syncs, and joins both writer threads; writes after it resolve to
//!   [`StorageError::Closed`]. No completion ever hangs.

#![forbid(unsafe_code)]

#[cfg(feature = "mem")]
mod api;
#[cfg(feature = "mem")]
mod completion;
#[cfg(feature = "mem")]
mod dedup;
mod error;
mod ids;
#[cfg(feature = "mem")]
mod mem;
mod record;
#[cfg(feature = "store")]
mod rocks;
#[cfg(feature = "mem")]
mod sharded;

#[cfg(feature = "mem")]
pub use api::{
    AppendRequest, Appended, COMMIT_MICROS_BOUNDS, COMMIT_SIZE_BOUNDS, CommitStats,
    ConversationInfo, ConversationSettings, Durability, GroupChange, MAX_META_CHANGES,
    MAX_META_KEY_LEN, MAX_META_SCAN, MAX_META_VALUE_LEN, MAX_RELATION_CHANGES, MessageStore,
    MetaChange, RelationChange, RelationKind, SettingsChange, SettingsUpdate, StoreOptions,
    SyncView,
};
#[cfg(feature = "mem")]
pub use completion::Completion;
#[cfg(feature = "mem")]
pub use dedup::DedupWindow;
pub use error::{Result, StorageError};
pub use ids::{
    ConversationId, ConversationKind, GroupId, MAX_GROUP_ID, MAX_USER_ID, Peer, Seq, UserId,
    conversation_kind, direct_conversation, group_conversation,
};
#[cfg(feature = "mem")]
pub use mem::MemStore;
pub use record::{
    MAX_CLIENT_MSG_ID_LEN, MAX_CUSTOM_TYPE_LEN, MessageRecord, RECALLED_RECORD_VERSION,
    RECORD_VERSION, StoredMessage, decode_record, encode_record,
};
#[cfg(feature = "store")]
pub use rocks::{FORMAT_VERSION, RocksStore};

/// Entry points for the fuzz targets. Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::record::check_decoders;
}
