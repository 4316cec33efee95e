//! The writer: the only place that assigns sequence numbers and versions. It is a
//! two-stage pipeline on two threads.
//!
//! * The **builder** (`tern-storage-writer`, [`Writer`]) blocks on its queue, takes
//!   everything queued (up to `max_batch` ops), applies them to its in-memory state
//!   (conversation heads, idempotency index, user-conversation records, cursor and
//!   membership caches, version counter) while building one `WriteBatch`, and hands the
//!   batch to the committer.
//! * The **committer** (`tern-storage-commit`, [`Committer`]) commits batches one at a time,
//!   strictly in the order they were built, with the durability policy, and only then
//!   completes the batch's futures (in order).
//!
//! The hand-off is a rendezvous channel: while batch N is being committed the builder may
//! build batch N+1 and then waits until the committer takes it, so at most one batch is
//! built ahead. Under load the queue refills during a commit, so batches grow with the load
//! and one fsync covers them all. Under `Fsync` the builder also keeps
//! `StoreOptions::min_sync_interval` between hand-offs (`keep_spacing`): holding the first
//! op of a batch, it waits until that long after the committer took the last batch, so
//! that a fast disk is not asked for a sync every few appends. An op with no hand-off that
//! recent does not wait.
//!
//! The builder's in-memory state therefore describes the committed log **plus** the batches
//! built but not yet committed. Its caches never drop an entry that an uncommitted batch
//! wrote: when one outgrows `cache_entries`, the builder first waits until every built batch
//! is committed, then clears it. Reads of the store (`read_forward`, ...) go to RocksDB and
//! only ever see committed batches.
//!
//! If a commit fails, every op of that batch fails with [`StorageError::CommitFailed`], and
//! so does every op of each batch already built on top of it: the committer tags batches
//! with the builder's epoch, and after a failure in epoch E it writes nothing more from
//! epoch E. It reports each batch's outcome to the builder in order; when the builder sees
//! the failure (it looks after collecting ops and before building, so an op submitted after
//! a failed completion resolved is built on the rolled-back state), it rolls back to the
//! last committed point: it drops all its caches (heads, user-conversation records, cursors
//! and memberships are reloaded from the database on next use), forgets the idempotency
//! entries and journal records of the failed batch and the batches after it, and moves to
//! epoch E+1. So no sequence number is skipped or reused and no idempotency entry points
//! to an uncommitted message. Versions are not rolled back: they must only increase, gaps
//! are harmless. A group change carried by an append ([`GroupChange`]) leaves state only
//! in those caches (member flags and user-conversation records); group records and member
//! attributes are written to the batch and never cached, so the rollback forgets the whole
//! change.
//!
//! A recall rewrites a stored message record, which the builder must read: from the current
//! batch if the message was appended earlier in it, else from the database. So before it
//! builds a batch that holds a recall, the builder waits until every batch built before is
//! committed (and rolls back first if one failed). Settings changes are cached like read
//! positions (in the user-conversation records); relations, profiles and account state are
//! only written to the batch.

use std::collections::VecDeque;

// ahash: fast, and randomly keyed so client-chosen ids cannot be used for hash flooding.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
type HashSet<K> = std::collections::HashSet<K, ahash::RandomState>;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use rocksdb::{ColumnFamily, WriteBatch, WriteOptions};

use super::{CF_ACCOUNT_META, CF_CURSORS, CF_GROUPS, CF_JOURNAL, CF_MEMBERS, CF_MESSAGES, CF_META};
use super::{CF_PROFILES, CF_RELATIONS, CF_USER_CONVS, CF_USER_GROUPS, Db, META_VERSION};
use crate::api::{
    AppendRequest, Appended, GroupChange, MetaChange, RelationChange, SettingsChange,
    SettingsUpdate, StoreOptions, now_ms,
};
use crate::completion::Completer;
use crate::dedup::{DedupEntry, DedupIndex, DedupKey};
use crate::error::{Result, StorageError};
use crate::ids::{ConversationId, GroupId, MAX_USER_ID, Seq, UserId, group_conversation};
use crate::record::{
    MessageRecord, UserConvRecord, cursor_key, decode_record, encode_journal_header, encode_record,
    encode_u64, msg_key, pair_key, push_journal_entry, relation_key,
};
use crate::sharded::ShardedMap;

/// Journal records are trimmed in chunks of this many to keep range tombstones rare.
const JOURNAL_TRIM_CHUNK: usize = 64;

pub(crate) enum Op {
    Append(AppendRequest, Completer<Appended>),
    SetRead {
        user: UserId,
        conv: ConversationId,
        seq: Seq,
        done: Completer<Seq>,
    },
    SetDelivered {
        user: UserId,
        conv: ConversationId,
        device: String,
        seq: Seq,
        done: Completer<Seq>,
    },
    Member {
        group: GroupId,
        user: UserId,
        add: bool,
        done: Completer<bool>,
    },
    Settings {
        user: UserId,
        conv: ConversationId,
        change: SettingsChange,
        done: Completer<SettingsUpdate>,
    },
    Relations(Vec<RelationChange>, Completer<()>),
    Profile {
        user: UserId,
        profile: bytes::Bytes,
        done: Completer<()>,
    },
    Meta(Vec<MetaChange>, Completer<()>),
    GroupRecord {
        group: GroupId,
        record: bytes::Bytes,
        done: Completer<()>,
    },
    Shutdown,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Append(..) => "Append",
            Op::SetRead { .. } => "SetRead",
            Op::SetDelivered { .. } => "SetDelivered",
            Op::Member { .. } => "Member",
            Op::Settings { .. } => "Settings",
            Op::Relations(..) => "Relations",
            Op::Profile { .. } => "Profile",
            Op::Meta(..) => "Meta",
            Op::GroupRecord { .. } => "GroupRecord",
            Op::Shutdown => "Shutdown",
        })
    }
}

enum Done {
    Append(Completer<Appended>, Result<Appended>),
    Seq(Completer<Seq>, Result<Seq>),
    Bool(Completer<bool>, Result<bool>),
    Settings(Completer<SettingsUpdate>, Result<SettingsUpdate>),
    Unit(Completer<()>, Result<()>),
}

impl Done {
    fn fail_if_ok(&mut self, e: &StorageError) {
        match self {
            Done::Append(_, r @ Ok(_)) => *r = Err(e.clone()),
            Done::Seq(_, r @ Ok(_)) => *r = Err(e.clone()),
            Done::Bool(_, r @ Ok(_)) => *r = Err(e.clone()),
            Done::Settings(_, r @ Ok(_)) => *r = Err(e.clone()),
            Done::Unit(_, r @ Ok(_)) => *r = Err(e.clone()),
            _ => {}
        }
    }

    fn complete(self) {
        // A dropped receiver means the caller stopped waiting; the write stands.
        match self {
            Done::Append(tx, r) => drop(tx.send(r)),
            Done::Seq(tx, r) => drop(tx.send(r)),
            Done::Bool(tx, r) => drop(tx.send(r)),
            Done::Settings(tx, r) => drop(tx.send(r)),
            Done::Unit(tx, r) => drop(tx.send(r)),
        }
    }
}

/// Test hooks, one set per open store (so parallel tests do not disturb each other).
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Hooks {
    /// The next this-many commits fail.
    pub fail_commits: std::sync::atomic::AtomicUsize,
    /// While set, the committer holds each batch it receives before committing it.
    pub hold_commits: std::sync::atomic::AtomicBool,
    /// Batches the committer has received (held or not).
    pub received: std::sync::atomic::AtomicUsize,
    /// While set, the builder waits after taking the first op of a batch, before taking the
    /// rest (so a test can put several ops into one batch).
    pub hold_build: std::sync::atomic::AtomicBool,
    /// Batches the builder has built (and is handing, or has handed, to the committer).
    pub built: std::sync::atomic::AtomicUsize,
    /// Times the builder has waited to keep `min_sync_interval` between commits.
    pub spaced: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
fn hold(flag: &std::sync::atomic::AtomicBool) {
    while flag.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn commit(db: &Db, batch: WriteBatch, opts: &WriteOptions) -> Result<(), String> {
    #[cfg(test)]
    {
        use std::sync::atomic::Ordering::SeqCst;
        if db
            .hooks
            .fail_commits
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err("injected commit failure".into());
        }
    }
    db.db.write_opt(batch, opts).map_err(|e| e.into_string())
}

/// The committer's counters (one writer thread; read by metrics from any thread).
#[derive(Debug, Default)]
pub(crate) struct CommitCounters {
    commits: AtomicU64,
    ops: AtomicU64,
    size_buckets: [AtomicU64; crate::api::COMMIT_SIZE_BOUNDS.len() + 1],
    micros_sum: AtomicU64,
    micros_buckets: [AtomicU64; crate::api::COMMIT_MICROS_BOUNDS.len() + 1],
}

impl CommitCounters {
    fn record(&self, ops: usize, micros: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let ops = ops as u64;
        self.commits.fetch_add(1, Relaxed);
        self.ops.fetch_add(ops, Relaxed);
        let i = crate::api::COMMIT_SIZE_BOUNDS.partition_point(|&b| b < ops);
        self.size_buckets[i].fetch_add(1, Relaxed);
        self.micros_sum.fetch_add(micros, Relaxed);
        let i = crate::api::COMMIT_MICROS_BOUNDS.partition_point(|&b| b < micros);
        self.micros_buckets[i].fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> crate::api::CommitStats {
        use std::sync::atomic::Ordering::Relaxed;
        crate::api::CommitStats {
            commits: self.commits.load(Relaxed),
            ops: self.ops.load(Relaxed),
            size_buckets: std::array::from_fn(|i| self.size_buckets[i].load(Relaxed)),
            micros_sum: self.micros_sum.load(Relaxed),
            micros_buckets: std::array::from_fn(|i| self.micros_buckets[i].load(Relaxed)),
        }
    }
}

/// A batch on its way from the builder to the committer.
pub(crate) struct Built {
    /// The builder's epoch when it built the batch (see the module docs).
    epoch: u64,
    /// `None` if the batch writes nothing (only duplicates and no-ops); its completions
    /// still wait for every batch built before it.
    batch: Option<WriteBatch>,
    done: Vec<Done>,
}

/// The committer's verdict on one batch, reported to the builder in build order.
pub(crate) enum Outcome {
    Committed,
    /// The commit failed: the builder must roll back.
    Failed,
    /// Not written: built on top of a batch whose commit failed.
    Skipped,
}

/// The second stage of the writer: commits built batches in order and completes them.
pub(crate) struct Committer {
    db: Arc<Db>,
    rx: Receiver<Built>,
    outcomes: Sender<Outcome>,
    write_opts: WriteOptions,
}

impl Committer {
    pub fn run(self) {
        // Batches of an epoch below this were built on top of a failed batch.
        let mut live_epoch = 0;
        let mut last_failure = String::new();
        for built in self.rx.iter() {
            let (outcome, err) = if built.epoch < live_epoch {
                let e = format!("an earlier batch failed to commit: {last_failure}");
                (Outcome::Skipped, Some(StorageError::CommitFailed(e)))
            } else {
                #[cfg(test)]
                {
                    use std::sync::atomic::Ordering::SeqCst;
                    self.db.hooks.received.fetch_add(1, SeqCst);
                    hold(&self.db.hooks.hold_commits);
                }
                let started = std::time::Instant::now();
                let ops = built.done.len();
                match built.batch.map(|b| commit(&self.db, b, &self.write_opts)) {
                    None | Some(Ok(())) => {
                        let micros = started.elapsed().as_micros() as u64;
                        self.db.stats.record(ops, micros);
                        (Outcome::Committed, None)
                    }
                    Some(Err(e)) => {
                        live_epoch = built.epoch + 1;
                        last_failure.clone_from(&e);
                        (Outcome::Failed, Some(StorageError::CommitFailed(e)))
                    }
                }
            };
            // The verdict goes to the builder before any completion resolves, so a caller
            // that retries after a failure is never built on the failed batch.
            let _ = self.outcomes.send(outcome);
            for mut d in built.done {
                if let Some(e) = &err {
                    d.fail_if_ok(e);
                }
                d.complete();
            }
        }
    }
}

/// Builder-side record of a batch handed to the committer and not yet reported on.
struct InFlight {
    first_version: u64,
}

/// The first stage of the writer (the builder); see the module docs.
pub(crate) struct Writer {
    db: Arc<Db>,
    rx: Receiver<Op>,
    /// To the committer; `None` once shut down.
    to_commit: Option<Sender<Built>>,
    outcomes: Receiver<Outcome>,
    committer: Option<JoinHandle<()>>,
    /// Batches handed to the committer whose outcome has not been seen yet, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Bumped by each rollback; batches of older epochs are never written.
    epoch: u64,
    max_batch: usize,
    cache_entries: usize,
    /// Least time between two hand-offs to the committer (`StoreOptions::min_sync_interval`,
    /// under fsync only).
    spacing: Option<Duration>,
    /// When the committer took the latest batch (its commit started then).
    last_hand_off: Option<Instant>,
    /// Latest assigned seq per conversation (committed, or in a batch built and not yet
    /// committed).
    /// These caches hold up to `cache_entries` each: sharded, so that growing does not stall
    /// the writer.
    heads: ShardedMap<ConversationId, Seq>,
    /// Cached user-conversation records (absent = not cached, look in the database).
    user_convs: ShardedMap<(UserId, ConversationId), UserConvRecord>,
    /// Cached delivered cursors and memberships (as `heads`: committed or built).
    cursors: ShardedMap<Vec<u8>, Seq>,
    members: ShardedMap<(GroupId, UserId), bool>,
    dedup: DedupIndex,
    /// Dedup journal records in the database (or in a built batch): (key, highest version
    /// inside).
    journal: VecDeque<(u64, u64)>,
    version: u64,
    last_time: u64,
    // Per-batch state.
    rec_buf: Vec<u8>,
    journal_buf: Vec<u8>,
    journal_entries: usize,
    dirty_user_convs: HashSet<(UserId, ConversationId)>,
    /// The messages this batch recalls (conversation, seq).
    recall_targets: HashSet<(ConversationId, Seq)>,
    /// Encoded records of recall targets written in this batch (appended, or rewritten as
    /// recalled), newest wins: what a later recall in the batch must see instead of the
    /// database.
    batch_records: HashMap<(ConversationId, Seq), Vec<u8>>,
}

/// The builder's ends of the channels to and from the committer.
pub(crate) struct CommitterLink {
    pub to_commit: Sender<Built>,
    pub outcomes: Receiver<Outcome>,
    pub handle: JoinHandle<()>,
}

/// Spawns the committer thread.
pub(crate) fn spawn_committer(db: Arc<Db>, write_opts: WriteOptions) -> Result<CommitterLink> {
    // Rendezvous: the builder gets at most one batch ahead of the one being committed.
    let (to_commit, rx) = crossbeam_channel::bounded(0);
    let (outcomes_tx, outcomes) = crossbeam_channel::unbounded();
    let c = Committer {
        db,
        rx,
        outcomes: outcomes_tx,
        write_opts,
    };
    let handle = std::thread::Builder::new()
        .name("tern-storage-commit".into())
        .spawn(move || c.run())
        .map_err(|e| StorageError::Backend(format!("spawn committer: {e}")))?;
    Ok(CommitterLink {
        to_commit,
        outcomes,
        handle,
    })
}

impl Writer {
    pub fn new(
        db: Arc<Db>,
        rx: Receiver<Op>,
        link: CommitterLink,
        opts: &StoreOptions,
        version: u64,
        dedup: DedupIndex,
        journal: Vec<(u64, u64)>,
    ) -> Self {
        Writer {
            db,
            rx,
            to_commit: Some(link.to_commit),
            outcomes: link.outcomes,
            committer: Some(link.handle),
            in_flight: VecDeque::new(),
            epoch: 0,
            max_batch: opts.max_batch.max(1),
            cache_entries: opts.cache_entries.max(1),
            spacing: opts.commit_spacing(),
            last_hand_off: None,
            heads: ShardedMap::default(),
            user_convs: ShardedMap::default(),
            cursors: ShardedMap::default(),
            members: ShardedMap::default(),
            dedup,
            journal: journal.into(),
            version,
            last_time: 0,
            rec_buf: Vec::with_capacity(1024),
            journal_buf: Vec::with_capacity(64 * 1024),
            journal_entries: 0,
            dirty_user_convs: HashSet::default(),
            recall_targets: HashSet::default(),
            batch_records: HashMap::default(),
        }
    }

    pub fn run(mut self) {
        let mut ops = Vec::with_capacity(self.max_batch);
        loop {
            let mut shutdown = match self.rx.recv() {
                Ok(Op::Shutdown) | Err(_) => true,
                Ok(op) => {
                    ops.push(op);
                    false
                }
            };
            if !shutdown {
                self.keep_spacing();
            }
            #[cfg(test)]
            hold(&self.db.hooks.hold_build);
            while !shutdown && ops.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(Op::Shutdown) => shutdown = true,
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            if !ops.is_empty() {
                // After collecting the ops: a failure reported before an op was submitted
                // is rolled back before that op is built.
                self.take_outcomes();
                let (built, first_version) = self.build(&mut ops);
                #[cfg(test)]
                self.db
                    .hooks
                    .built
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.hand_off(built, first_version);
            }
            if shutdown {
                // Ops queued after the shutdown marker are dropped with the receiver; their
                // completions resolve to `Closed`. Everything built is committed and
                // completed before the committer exits.
                self.to_commit = None;
                if let Some(h) = self.committer.take() {
                    let _ = h.join();
                }
                return;
            }
        }
    }

    fn hand_off(&mut self, built: Built, first_version: u64) {
        let Some(tx) = &self.to_commit else { return };
        // If the committer is gone (it panicked) the batch is dropped with its completers:
        // its completions resolve to `Closed`, and so will every later one.
        let syncs = built.batch.is_some();
        if tx.send(built).is_ok() {
            // A rendezvous: the committer has just taken the batch and starts its commit (a
            // batch that writes nothing does not sync, so it leaves the spacing alone).
            if syncs && self.spacing.is_some() {
                self.last_hand_off = Some(Instant::now());
            }
            self.in_flight.push_back(InFlight { first_version });
        }
    }

    /// With an op in hand, waits until `spacing` has passed since the committer took the last
    /// batch that syncs, so that what arrives meanwhile shares this batch's sync. When a full
    /// batch (`max_batch` ops) is already queued it does not wait: the batch could not grow.
    fn keep_spacing(&self) {
        let (Some(spacing), Some(last)) = (self.spacing, self.last_hand_off) else {
            return;
        };
        let Some(due) = last.checked_add(spacing) else {
            return;
        };
        let wait = due.saturating_duration_since(Instant::now());
        if wait.is_zero() || self.rx.len() + 1 >= self.max_batch {
            return;
        }
        #[cfg(test)]
        self.db
            .hooks
            .spaced
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(wait);
    }

    /// Applies the committer's verdicts that have arrived, without blocking.
    fn take_outcomes(&mut self) {
        while let Ok(o) = self.outcomes.try_recv() {
            self.on_outcome(o);
        }
    }

    /// Waits until every built batch has been committed (or failed).
    fn wait_idle(&mut self) {
        while !self.in_flight.is_empty() {
            match self.outcomes.recv() {
                Ok(o) => self.on_outcome(o),
                // The committer is gone: nothing will ever be committed again.
                Err(_) => self.in_flight.clear(),
            }
        }
    }

    fn on_outcome(&mut self, o: Outcome) {
        let Some(f) = self.in_flight.pop_front() else {
            return;
        };
        if let Outcome::Failed = o {
            self.rollback(f.first_version);
        }
    }

    /// Rolls the in-memory state back to the last committed batch: the one that started at
    /// `first_version` failed, and every batch built after it is skipped by the committer.
    fn rollback(&mut self, first_version: u64) {
        self.heads.clear();
        self.user_convs.clear();
        self.cursors.clear();
        self.members.clear();
        self.dedup.rollback(first_version);
        while self
            .journal
            .back()
            .is_some_and(|&(first, _)| first >= first_version)
        {
            self.journal.pop_back();
        }
        self.epoch += 1;
    }

    /// Builds one batch from `ops`; also returns the first version it could contain.
    fn build(&mut self, ops: &mut Vec<Op>) -> (Built, u64) {
        let now = now_ms().max(self.last_time);
        self.last_time = now;
        let cap = self.cache_entries;
        if self.heads.len() > cap
            || self.user_convs.len() > cap
            || self.cursors.len() > cap
            || self.members.len() > cap
        {
            // Uncommitted batches may be behind any entry: clear only once all are committed.
            self.wait_idle();
            if self.heads.len() > cap {
                self.heads.clear();
            }
            if self.user_convs.len() > cap {
                self.user_convs.clear();
            }
            if self.cursors.len() > cap {
                self.cursors.clear();
            }
            if self.members.len() > cap {
                self.members.clear();
            }
        }
        // A recall reads the record it rewrites from the database, so it must see every
        // batch built before this one committed (recalls are rare: the pipeline pauses for
        // one commit); targets appended in this batch are kept in `batch_records`.
        self.recall_targets.clear();
        self.batch_records.clear();
        for op in ops.iter() {
            if let Op::Append(req, _) = op
                && let Some(target) = req.recall
            {
                self.recall_targets.insert((req.conversation, target));
            }
        }
        if !self.recall_targets.is_empty() {
            self.wait_idle();
        }
        self.dedup.evict_old(now);
        let first_version = self.version + 1;
        encode_journal_header(now, &mut self.journal_buf);
        self.journal_entries = 0;

        let mut batch = WriteBatch::default();
        let mut done = Vec::with_capacity(ops.len());
        // Looked up once per batch, not per append (it is a map lookup by name).
        let db = Arc::clone(&self.db);
        let messages = db.cf(CF_MESSAGES);
        for op in ops.drain(..) {
            match op {
                Op::Append(req, tx) => {
                    let r = self.append(req, now, messages, &mut batch);
                    done.push(Done::Append(tx, r));
                }
                Op::SetRead {
                    user,
                    conv,
                    seq,
                    done: tx,
                } => {
                    let r = self.set_read(user, conv, seq);
                    done.push(Done::Seq(tx, r));
                }
                Op::SetDelivered {
                    user,
                    conv,
                    device,
                    seq,
                    done: tx,
                } => {
                    let r = self.set_delivered(user, conv, &device, seq, &mut batch);
                    done.push(Done::Seq(tx, r));
                }
                Op::Member {
                    group,
                    user,
                    add,
                    done: tx,
                } => {
                    let r = self.member(group, user, add, &mut batch);
                    done.push(Done::Bool(tx, r));
                }
                Op::Settings {
                    user,
                    conv,
                    change,
                    done: tx,
                } => {
                    let r = self.set_settings(user, conv, change);
                    done.push(Done::Settings(tx, r));
                }
                Op::Relations(changes, tx) => {
                    let cf = db.cf(CF_RELATIONS);
                    for c in &changes {
                        let key = relation_key(c.user, c.kind, c.other);
                        match &c.value {
                            Some(v) => batch.put_cf(cf, key, v),
                            None => batch.delete_cf(cf, key),
                        }
                    }
                    done.push(Done::Unit(tx, Ok(())));
                }
                Op::Profile {
                    user,
                    profile,
                    done: tx,
                } => {
                    batch.put_cf(db.cf(CF_PROFILES), user.to_be_bytes(), &profile);
                    done.push(Done::Unit(tx, Ok(())));
                }
                Op::GroupRecord {
                    group,
                    record,
                    done: tx,
                } => {
                    batch.put_cf(db.cf(CF_GROUPS), group.to_be_bytes(), &record);
                    done.push(Done::Unit(tx, Ok(())));
                }
                Op::Meta(changes, tx) => {
                    let cf = db.cf(CF_ACCOUNT_META);
                    for c in &changes {
                        match &c.value {
                            Some(v) => batch.put_cf(cf, &c.key, v),
                            None => batch.delete_cf(cf, &c.key),
                        }
                    }
                    done.push(Done::Unit(tx, Ok(())));
                }
                Op::Shutdown => {}
            }
        }

        for (user, conv) in self.dirty_user_convs.drain() {
            if let Some(rec) = self.user_convs.get(&(user, conv)) {
                batch.put_cf(db.cf(CF_USER_CONVS), pair_key(user, conv), rec.encode());
            }
        }
        if self.journal_entries > 0 {
            batch.put_cf(
                db.cf(CF_JOURNAL),
                first_version.to_be_bytes(),
                &self.journal_buf,
            );
            self.journal.push_back((first_version, self.version));
        }
        let keep_from = self.dedup.oldest_version().unwrap_or(self.version + 1);
        let expired = self
            .journal
            .iter()
            .take_while(|&&(_, last)| last < keep_from)
            .count();
        if expired >= JOURNAL_TRIM_CHUNK {
            let (to, _) = self.journal[expired - 1];
            self.journal.drain(..expired);
            batch.delete_range_cf(
                db.cf(CF_JOURNAL),
                0u64.to_be_bytes(),
                (to + 1).to_be_bytes(),
            );
        }

        let batch = (!batch.is_empty()).then(|| {
            batch.put_cf(db.cf(CF_META), META_VERSION, encode_u64(self.version));
            batch
        });
        let built = Built {
            epoch: self.epoch,
            batch,
            done,
        };
        (built, first_version)
    }

    fn head(&mut self, conv: ConversationId) -> Result<Seq> {
        if let Some(&s) = self.heads.get(&conv) {
            return Ok(s);
        }
        let s = self.db.head(conv)?.map_or(0, |(s, _)| s);
        self.heads.insert(conv, s);
        Ok(s)
    }

    fn user_conv(&mut self, user: UserId, conv: ConversationId) -> Result<Option<UserConvRecord>> {
        if let Some(r) = self.user_convs.get(&(user, conv)) {
            return Ok(Some(*r));
        }
        let r = self.db.user_conv(user, conv)?;
        if let Some(r) = r {
            self.user_convs.insert((user, conv), r);
        }
        Ok(r)
    }

    fn put_user_conv(&mut self, user: UserId, conv: ConversationId, rec: UserConvRecord) {
        self.user_convs.insert((user, conv), rec);
        self.dirty_user_convs.insert((user, conv));
    }

    fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    fn append(
        &mut self,
        req: AppendRequest,
        now: u64,
        messages: &ColumnFamily,
        batch: &mut WriteBatch,
    ) -> Result<Appended> {
        let conv = req.conversation;
        let key: Option<DedupKey> =
            (!req.client_msg_id.is_empty()).then(|| self.dedup.key(req.sender, &req.client_msg_id));
        if let Some(k) = &key
            && let Some(e) = self.dedup.get(k, now)
        {
            return Ok(Appended {
                conversation: e.conv,
                seq: e.seq,
                server_time_ms: e.time_ms,
                version: e.version,
                duplicate: true,
            });
        }
        // All reads first, so that a read error leaves no trace in the in-memory state.
        let head = self.head(conv)?;
        let mut new_members = Vec::new();
        for &p in &req.participants {
            if self.user_conv(p, conv)?.is_none() && !new_members.contains(&p) {
                new_members.push(p);
            }
        }
        let recalled = match req.recall {
            Some(target) => self.recalled_record(conv, target, head)?,
            None => None,
        };
        if let Some(change) = &req.group_change {
            // Caches what `apply_group_change` needs: every member flag, and every existing
            // user-conversation record (a user without one has none in the database either).
            for &(user, _) in &change.members {
                self.is_member(change.group, user)?;
                self.user_conv(user, conv)?;
            }
        }
        // Caches the sender's record for `advance_read` (a participant's is cached above).
        if !req.participants.contains(&req.sender) {
            self.user_conv(req.sender, conv)?;
        }

        let seq = head + 1;
        let version = self.next_version();
        self.heads.insert(conv, seq);
        self.rec_buf.clear();
        encode_record(
            &MessageRecord {
                version,
                sender: req.sender,
                timestamp_ms: now,
                content_type: req.content_type,
                client_msg_id: &req.client_msg_id,
                custom_type: &req.custom_type,
                payload: &req.payload,
                recalled: false,
            },
            &mut self.rec_buf,
        );
        batch.put_cf(messages, msg_key(conv, seq), &self.rec_buf);
        if !self.recall_targets.is_empty() && self.recall_targets.contains(&(conv, seq)) {
            self.batch_records.insert((conv, seq), self.rec_buf.clone());
        }
        if let (Some(target), Some(record)) = (req.recall, recalled) {
            batch.put_cf(messages, msg_key(conv, target), &record);
            self.batch_records.insert((conv, target), record);
        }
        for p in new_members {
            self.put_user_conv(
                p,
                conv,
                UserConvRecord {
                    active: true,
                    member_version: version,
                    ..UserConvRecord::default()
                },
            );
        }
        // The sender has read what they wrote: a user's unread count never includes their own
        // messages. Before the group change, so that the event of a sender who leaves is read
        // too (a sender who joins is covered by the join).
        self.advance_read(req.sender, conv, seq, version);
        if let Some(change) = &req.group_change {
            self.apply_group_change(change, conv, seq, version, batch);
        }
        if let Some(k) = key {
            push_journal_entry(
                &mut self.journal_buf,
                req.sender,
                conv,
                seq,
                version,
                &req.client_msg_id,
            );
            self.journal_entries += 1;
            self.dedup.insert(
                k,
                DedupEntry {
                    conv,
                    seq,
                    time_ms: now,
                    version,
                },
            );
        }
        Ok(Appended {
            conversation: conv,
            seq,
            server_time_ms: now,
            version,
            duplicate: false,
        })
    }

    /// The record of message `target` (`1..=head`) rewritten as recalled, or None if it is
    /// recalled already. The message is in this batch or committed (`build` waited for the
    /// batches before it). Reads only.
    fn recalled_record(
        &self,
        conv: ConversationId,
        target: Seq,
        head: Seq,
    ) -> Result<Option<Vec<u8>>> {
        if target == 0 || target > head {
            return Err(StorageError::InvalidArgument("no such message to recall"));
        }
        let stored;
        let bytes = match self.batch_records.get(&(conv, target)) {
            Some(b) => &b[..],
            None => {
                // Every seq up to the head is stored (no gaps): a miss means a lost message.
                stored = self
                    .db
                    .message_record(conv, target)?
                    .ok_or(StorageError::Corrupt("message below the head is missing"))?;
                &stored[..]
            }
        };
        let r = decode_record(bytes)?;
        if r.recalled {
            return Ok(None);
        }
        let mut out = Vec::new();
        encode_record(
            &MessageRecord {
                payload: &[],
                recalled: true,
                ..r
            },
            &mut out,
        );
        Ok(Some(out))
    }

    /// Moves `user`'s read position in `conv` forward to `seq` with `version`, if the
    /// conversation is active in their index (a 1:1 participant, a group member); nothing
    /// otherwise. The record, if any, must be cached.
    fn advance_read(&mut self, user: UserId, conv: ConversationId, seq: Seq, version: u64) {
        if let Some(rec) = self.user_convs.get_mut(&(user, conv))
            && rec.active
            && rec.read_seq < seq
        {
            *rec = rec.read_upto(seq, version);
            self.dirty_user_convs.insert((user, conv));
        }
    }

    fn set_settings(
        &mut self,
        user: UserId,
        conv: ConversationId,
        change: SettingsChange,
    ) -> Result<SettingsUpdate> {
        let head = self.head(conv)?;
        let rec = self.user_conv(user, conv)?;
        let current = rec.map(|r| r.settings(head)).unwrap_or_default();
        let update = SettingsUpdate::of(change, current, head);
        if !update.changed {
            return Ok(update);
        }
        let version = self.next_version();
        let mut rec = rec.unwrap_or(UserConvRecord {
            active: true,
            member_version: version,
            ..UserConvRecord::default()
        });
        rec.set_settings(&update.settings, head);
        rec.settings_version = version;
        self.put_user_conv(user, conv, rec);
        Ok(update)
    }

    fn set_read(&mut self, user: UserId, conv: ConversationId, seq: Seq) -> Result<Seq> {
        let target = seq.min(self.head(conv)?);
        let rec = self.user_conv(user, conv)?;
        let current = rec.map_or(0, |r| r.read_seq);
        if target <= current {
            return Ok(current);
        }
        let version = self.next_version();
        let rec = rec.unwrap_or(UserConvRecord {
            active: true,
            member_version: version,
            ..UserConvRecord::default()
        });
        self.put_user_conv(user, conv, rec.read_upto(target, version));
        Ok(target)
    }

    fn set_delivered(
        &mut self,
        user: UserId,
        conv: ConversationId,
        device: &str,
        seq: Seq,
        batch: &mut WriteBatch,
    ) -> Result<Seq> {
        let target = seq.min(self.head(conv)?);
        let key = cursor_key(user, conv, device);
        let current = match self.cursors.get(&key) {
            Some(&s) => s,
            None => self.db.cursor(&key)?,
        };
        if target <= current {
            return Ok(current);
        }
        batch.put_cf(self.db.cf(CF_CURSORS), &key, encode_u64(target));
        self.cursors.insert(key, target);
        Ok(target)
    }

    /// Whether `user` is a member of `group` (committed or built), cached.
    fn is_member(&mut self, group: GroupId, user: UserId) -> Result<bool> {
        if let Some(&m) = self.members.get(&(group, user)) {
            return Ok(m);
        }
        let m = self.db.is_member(group, user)?;
        self.members.insert((group, user), m);
        Ok(m)
    }

    fn member(
        &mut self,
        group: GroupId,
        user: UserId,
        add: bool,
        batch: &mut WriteBatch,
    ) -> Result<bool> {
        let Some(conv) = group_conversation(group) else {
            return Err(StorageError::InvalidArgument("group id out of range"));
        };
        if user == 0 || user > MAX_USER_ID {
            return Err(StorageError::InvalidArgument("user id out of range"));
        }
        if self.is_member(group, user)? == add {
            return Ok(false);
        }
        // Reads first (this caches the record `join` and `leave` update).
        self.user_conv(user, conv)?;
        let head = self.head(conv)?;
        let version = self.next_version();
        if add {
            self.join(group, user, conv, b"", head + 1, version, batch);
            // A new member has nothing unread.
            self.advance_read(user, conv, head, version);
        } else {
            self.leave(group, user, conv, head, version, batch);
        }
        Ok(true)
    }

    /// Applies a group change recorded by the append `(seq, version)` of the group's
    /// conversation `conv`. Everything it reads was cached by the append's reads.
    fn apply_group_change(
        &mut self,
        change: &GroupChange,
        conv: ConversationId,
        seq: Seq,
        version: u64,
        batch: &mut WriteBatch,
    ) {
        let group = change.group;
        if let Some(record) = &change.record {
            batch.put_cf(self.db.cf(CF_GROUPS), group.to_be_bytes(), record);
        }
        for (user, attrs) in &change.members {
            let user = *user;
            let was_member = self.members.get(&(group, user)) == Some(&true);
            match attrs {
                Some(attrs) if was_member => {
                    batch.put_cf(self.db.cf(CF_MEMBERS), pair_key(group, user), attrs);
                }
                Some(attrs) => {
                    let first_seq = if change.joiners_read_history { 0 } else { seq };
                    self.join(group, user, conv, attrs, first_seq, version, batch);
                    // A new member has read everything up to the event that added them.
                    self.advance_read(user, conv, seq, version);
                }
                None if was_member => {
                    self.leave(group, user, conv, seq, version, batch);
                    // Hidden before the event that removes them: hidden still.
                    if let Some(rec) = self.user_convs.get_mut(&(user, conv)) {
                        rec.hidden_through(seq);
                    }
                }
                None => {}
            }
        }
    }

    /// Makes a non-member `user` a member of `group` with `attrs` from seq `first_seq` of the
    /// group's conversation `conv`. The user's record for `conv`, if any, must be cached.
    #[allow(clippy::too_many_arguments)]
    fn join(
        &mut self,
        group: GroupId,
        user: UserId,
        conv: ConversationId,
        attrs: &[u8],
        first_seq: Seq,
        version: u64,
        batch: &mut WriteBatch,
    ) {
        let db = &self.db;
        batch.put_cf(db.cf(CF_MEMBERS), pair_key(group, user), attrs);
        batch.put_cf(db.cf(CF_USER_GROUPS), pair_key(user, group), b"");
        self.members.insert((group, user), true);
        let mut rec = self.cached_user_conv(user, conv);
        rec.active = true;
        rec.left_seq = 0;
        rec.joined_seq = first_seq;
        rec.member_version = version;
        self.put_user_conv(user, conv, rec);
    }

    /// Removes member `user` from `group`; they may read `conv` up to `left_seq`. The user's
    /// record for `conv`, if any, must be cached.
    fn leave(
        &mut self,
        group: GroupId,
        user: UserId,
        conv: ConversationId,
        left_seq: Seq,
        version: u64,
        batch: &mut WriteBatch,
    ) {
        let db = &self.db;
        batch.delete_cf(db.cf(CF_MEMBERS), pair_key(group, user));
        batch.delete_cf(db.cf(CF_USER_GROUPS), pair_key(user, group));
        self.members.insert((group, user), false);
        let mut rec = self.cached_user_conv(user, conv);
        rec.active = false;
        rec.left_seq = left_seq;
        rec.member_version = version;
        self.put_user_conv(user, conv, rec);
    }

    /// The cached record (a default one if there is none; callers have read it first).
    fn cached_user_conv(&self, user: UserId, conv: ConversationId) -> UserConvRecord {
        self.user_convs
            .get(&(user, conv))
            .copied()
            .unwrap_or_default()
    }
}
