//! The writer thread: the only place that assigns sequence numbers and versions.
//!
//! It blocks on its queue, takes everything queued (up to `max_batch` ops), applies them to
//! its in-memory state (conversation heads, idempotency index, user-conversation records)
//! while building one `WriteBatch`, commits that batch with the durability policy, and only
//! then completes the batch's futures. There is no timer: under load the queue refills
//! during a commit, so batches grow with the load and one fsync covers them all.
//!
//! If a commit fails, the in-memory state touched by the batch is dropped (conversation
//! heads and user-conversation records are reloaded from the database on next use, the
//! idempotency entries of the batch are removed) and every op of the batch fails with
//! [`StorageError::CommitFailed`]; so no sequence number is skipped or reused. Versions
//! are not rolled back: they must only increase, gaps are harmless.

use std::collections::VecDeque;

// ahash: fast, and randomly keyed so client-chosen ids cannot be used for hash flooding.
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
type HashSet<K> = std::collections::HashSet<K, ahash::RandomState>;
use std::sync::Arc;

use crossbeam_channel::Receiver;
use rocksdb::{WriteBatch, WriteOptions};

use super::{CF_CURSORS, CF_JOURNAL, CF_MEMBERS, CF_MESSAGES, CF_META, CF_USER_CONVS};
use super::{CF_USER_GROUPS, Db, META_VERSION};
use crate::api::{AppendRequest, Appended, StoreOptions, now_ms};
use crate::completion::Completer;
use crate::dedup::{DedupEntry, DedupIndex, DedupKey};
use crate::error::{Result, StorageError};
use crate::ids::{ConversationId, GroupId, MAX_USER_ID, Seq, UserId, group_conversation};
use crate::record::{
    MessageRecord, UserConvRecord, cursor_key, encode_journal_header, encode_record, encode_u64,
    msg_key, pair_key, push_journal_entry,
};

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
    Shutdown,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Append(..) => "Append",
            Op::SetRead { .. } => "SetRead",
            Op::SetDelivered { .. } => "SetDelivered",
            Op::Member { .. } => "Member",
            Op::Shutdown => "Shutdown",
        })
    }
}

enum Done {
    Append(Completer<Appended>, Result<Appended>),
    Seq(Completer<Seq>, Result<Seq>),
    Bool(Completer<bool>, Result<bool>),
}

impl Done {
    fn fail_if_ok(&mut self, e: &StorageError) {
        match self {
            Done::Append(_, r @ Ok(_)) => *r = Err(e.clone()),
            Done::Seq(_, r @ Ok(_)) => *r = Err(e.clone()),
            Done::Bool(_, r @ Ok(_)) => *r = Err(e.clone()),
            _ => {}
        }
    }

    fn complete(self) {
        // A dropped receiver means the caller stopped waiting; the write stands.
        match self {
            Done::Append(tx, r) => drop(tx.send(r)),
            Done::Seq(tx, r) => drop(tx.send(r)),
            Done::Bool(tx, r) => drop(tx.send(r)),
        }
    }
}

/// Test hook: the next this-many commits fail (unit tests inject commit failures).
#[cfg(test)]
pub(crate) static FAIL_COMMITS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

fn commit(db: &Db, batch: WriteBatch, opts: &WriteOptions) -> Result<(), String> {
    #[cfg(test)]
    {
        use std::sync::atomic::Ordering::SeqCst;
        if FAIL_COMMITS
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err("injected commit failure".into());
        }
    }
    db.db.write_opt(batch, opts).map_err(|e| e.into_string())
}

pub(crate) struct Writer {
    db: Arc<Db>,
    rx: Receiver<Op>,
    write_opts: WriteOptions,
    max_batch: usize,
    cache_entries: usize,
    /// Latest assigned seq per conversation (committed, or in the batch being built).
    heads: HashMap<ConversationId, Seq>,
    /// Cached user-conversation records (absent = not cached, look in the database).
    user_convs: HashMap<(UserId, ConversationId), UserConvRecord>,
    dedup: DedupIndex,
    /// Dedup journal records in the database: (key, highest version inside).
    journal: VecDeque<(u64, u64)>,
    version: u64,
    last_time: u64,
    // Per-batch state.
    rec_buf: Vec<u8>,
    journal_buf: Vec<u8>,
    journal_entries: usize,
    touched_heads: Vec<ConversationId>,
    dirty_user_convs: HashSet<(UserId, ConversationId)>,
    cursor_overlay: HashMap<Vec<u8>, Seq>,
    member_overlay: HashMap<(GroupId, UserId), bool>,
}

impl Writer {
    pub fn new(
        db: Arc<Db>,
        rx: Receiver<Op>,
        write_opts: WriteOptions,
        opts: &StoreOptions,
        version: u64,
        dedup: DedupIndex,
        journal: Vec<(u64, u64)>,
    ) -> Self {
        Writer {
            db,
            rx,
            write_opts,
            max_batch: opts.max_batch.max(1),
            cache_entries: opts.cache_entries.max(1),
            heads: HashMap::default(),
            user_convs: HashMap::default(),
            dedup,
            journal: journal.into(),
            version,
            last_time: 0,
            rec_buf: Vec::with_capacity(1024),
            journal_buf: Vec::with_capacity(64 * 1024),
            journal_entries: 0,
            touched_heads: Vec::new(),
            dirty_user_convs: HashSet::default(),
            cursor_overlay: HashMap::default(),
            member_overlay: HashMap::default(),
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
            while !shutdown && ops.len() < self.max_batch {
                match self.rx.try_recv() {
                    Ok(Op::Shutdown) => shutdown = true,
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            if !ops.is_empty() {
                self.process(&mut ops);
            }
            if shutdown {
                // Ops queued after the shutdown marker are dropped with the receiver; their
                // completions resolve to `Closed`.
                return;
            }
        }
    }

    fn process(&mut self, ops: &mut Vec<Op>) {
        let now = now_ms().max(self.last_time);
        self.last_time = now;
        if self.heads.len() > self.cache_entries {
            self.heads.clear();
        }
        if self.user_convs.len() > self.cache_entries {
            self.user_convs.clear();
        }
        self.dedup.evict_old(now);
        let first_version = self.version + 1;
        encode_journal_header(now, &mut self.journal_buf);
        self.journal_entries = 0;

        let mut batch = WriteBatch::default();
        let mut done = Vec::with_capacity(ops.len());
        for op in ops.drain(..) {
            match op {
                Op::Append(req, tx) => {
                    let r = self.append(req, now, &mut batch);
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
                Op::Shutdown => {}
            }
        }

        let db = &self.db;
        for &(user, conv) in &self.dirty_user_convs {
            if let Some(rec) = self.user_convs.get(&(user, conv)) {
                batch.put_cf(db.cf(CF_USER_CONVS), pair_key(user, conv), rec.encode());
            }
        }
        let journal_pushed = self.journal_entries > 0;
        if journal_pushed {
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

        if !batch.is_empty() {
            batch.put_cf(db.cf(CF_META), META_VERSION, encode_u64(self.version));
            if let Err(e) = commit(db, batch, &self.write_opts) {
                let e = StorageError::CommitFailed(e);
                for d in &mut done {
                    d.fail_if_ok(&e);
                }
                self.rollback(first_version, journal_pushed);
            }
        }
        self.touched_heads.clear();
        self.dirty_user_convs.clear();
        self.cursor_overlay.clear();
        self.member_overlay.clear();
        for d in done {
            d.complete();
        }
    }

    fn rollback(&mut self, first_version: u64, journal_pushed: bool) {
        for c in self.touched_heads.drain(..) {
            self.heads.remove(&c);
        }
        for k in self.dirty_user_convs.drain() {
            self.user_convs.remove(&k);
        }
        self.dedup.rollback(first_version);
        if journal_pushed {
            self.journal.pop_back();
        }
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

    fn append(&mut self, req: AppendRequest, now: u64, batch: &mut WriteBatch) -> Result<Appended> {
        let conv = req.conversation;
        let key: Option<DedupKey> = (!req.client_msg_id.is_empty())
            .then(|| (req.sender, Arc::<str>::from(req.client_msg_id.as_str())));
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

        let seq = head + 1;
        let version = self.next_version();
        self.heads.insert(conv, seq);
        self.touched_heads.push(conv);
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
            },
            &mut self.rec_buf,
        );
        batch.put_cf(self.db.cf(CF_MESSAGES), msg_key(conv, seq), &self.rec_buf);
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

    fn set_read(&mut self, user: UserId, conv: ConversationId, seq: Seq) -> Result<Seq> {
        let target = seq.min(self.head(conv)?);
        let rec = self.user_conv(user, conv)?;
        let current = rec.map_or(0, |r| r.read_seq);
        if target <= current {
            return Ok(current);
        }
        let version = self.next_version();
        let mut rec = rec.unwrap_or(UserConvRecord {
            active: true,
            member_version: version,
            ..UserConvRecord::default()
        });
        rec.read_seq = target;
        rec.read_version = version;
        self.put_user_conv(user, conv, rec);
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
        let current = match self.cursor_overlay.get(&key) {
            Some(&s) => s,
            None => self.db.cursor(&key)?,
        };
        if target <= current {
            return Ok(current);
        }
        batch.put_cf(self.db.cf(CF_CURSORS), &key, encode_u64(target));
        self.cursor_overlay.insert(key, target);
        Ok(target)
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
        let is_member = match self.member_overlay.get(&(group, user)) {
            Some(&m) => m,
            None => self.db.is_member(group, user)?,
        };
        if is_member == add {
            return Ok(false);
        }
        let rec = self.user_conv(user, conv)?;
        let version = self.next_version();
        let db = &self.db;
        if add {
            batch.put_cf(db.cf(CF_MEMBERS), pair_key(group, user), b"");
            batch.put_cf(db.cf(CF_USER_GROUPS), pair_key(user, group), b"");
        } else {
            batch.delete_cf(db.cf(CF_MEMBERS), pair_key(group, user));
            batch.delete_cf(db.cf(CF_USER_GROUPS), pair_key(user, group));
        }
        let mut rec = rec.unwrap_or_default();
        rec.active = add;
        rec.member_version = version;
        self.put_user_conv(user, conv, rec);
        self.member_overlay.insert((group, user), add);
        Ok(true)
    }
}
