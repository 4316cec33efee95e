//! [`RocksStore`]: the durable implementation of [`MessageStore`] on RocksDB.

mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::Sender;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, Options,
    ReadOptions, SliceTransform, WriteBatch, WriteOptions,
};

use crate::api::{
    AppendRequest, Appended, ConversationSettings, Durability, MAX_META_SCAN, MessageStore,
    MetaChange, RelationChange, RelationKind, SettingsChange, SettingsUpdate, StoreOptions,
    SyncView, check_device, check_meta, check_name, check_relations, check_user, meta_scan_start,
    now_ms, prefix_end,
};
use crate::completion::Completion;
use crate::dedup::{DedupEntry, DedupIndex};
use crate::error::{Result, StorageError, backend};
use crate::ids::{
    ConversationId, GroupId, MAX_GROUP_ID, MAX_USER_ID, Seq, UserId, group_conversation,
};
use crate::record::{
    StoredMessage, UserConvRecord, be_at, cursor_key, decode_journal, decode_record, decode_u64,
    encode_u64, msg_key, pair_key, relation_key, split_pair_key,
};
use writer::{Op, Writer};

/// The storage format version this build reads and writes (meta key `format_version`).
pub const FORMAT_VERSION: u32 = 1;

pub(crate) const CF_MESSAGES: &str = "messages";
pub(crate) const CF_USER_IDS: &str = "user_ids";
pub(crate) const CF_USER_NAMES: &str = "user_names";
pub(crate) const CF_GROUP_IDS: &str = "group_ids";
pub(crate) const CF_GROUP_NAMES: &str = "group_names";
pub(crate) const CF_GROUPS: &str = "groups";
pub(crate) const CF_MEMBERS: &str = "members";
pub(crate) const CF_USER_GROUPS: &str = "user_groups";
pub(crate) const CF_USER_CONVS: &str = "user_convs";
pub(crate) const CF_CURSORS: &str = "cursors";
pub(crate) const CF_JOURNAL: &str = "dedup_journal";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_RELATIONS: &str = "relations";
pub(crate) const CF_PROFILES: &str = "profiles";
/// The account state ([`MessageStore::set_meta`]); not `meta`, which holds the store's own
/// counters.
pub(crate) const CF_ACCOUNT_META: &str = "account_meta";

/// Opened, or created if missing (a directory written before `groups`, `relations`,
/// `profiles` or `account_meta` existed gets them on its first open by this build).
const ALL_CFS: [&str; 15] = [
    CF_MESSAGES,
    CF_USER_IDS,
    CF_USER_NAMES,
    CF_GROUP_IDS,
    CF_GROUP_NAMES,
    CF_GROUPS,
    CF_MEMBERS,
    CF_USER_GROUPS,
    CF_USER_CONVS,
    CF_CURSORS,
    CF_JOURNAL,
    CF_META,
    CF_RELATIONS,
    CF_PROFILES,
    CF_ACCOUNT_META,
];

pub(crate) const META_FORMAT: &[u8] = b"format_version";
pub(crate) const META_VERSION: &[u8] = b"version";
const META_NEXT_USER: &[u8] = b"next_user_id";
const META_NEXT_GROUP: &[u8] = b"next_group_id";

/// Directories open in this process (canonical paths). RocksDB's LOCK file already
/// excludes other processes; this makes the in-process case a clear error too.
static OPEN_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct DirGuard(PathBuf);

impl DirGuard {
    fn acquire(path: &Path) -> Result<DirGuard> {
        let mut open = lock(&OPEN_DIRS);
        if open.iter().any(|p| p == path) {
            return Err(StorageError::AlreadyOpen {
                path: path.to_owned(),
            });
        }
        open.push(path.to_owned());
        Ok(DirGuard(path.to_owned()))
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        lock(&OPEN_DIRS).retain(|p| p != &self.0);
    }
}

/// The RocksDB handle with the read helpers shared by readers and the writer thread.
pub(crate) struct Db {
    pub db: DB,
    /// The committer's counters.
    pub stats: writer::CommitCounters,
    #[cfg(test)]
    pub hooks: writer::Hooks,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Db")
    }
}

impl Db {
    pub fn cf(&self, name: &str) -> &ColumnFamily {
        // Every name in ALL_CFS is opened (or created) by `RocksStore::open`.
        self.db
            .cf_handle(name)
            .expect("column family is opened at start")
    }

    fn get_u64(&self, cf: &str, key: &[u8]) -> Result<Option<u64>> {
        self.get_u64_at(cf, key, &ReadOptions::default())
    }

    fn get_u64_at(&self, cf: &str, key: &[u8], ro: &ReadOptions) -> Result<Option<u64>> {
        match self
            .db
            .get_pinned_cf_opt(self.cf(cf), key, ro)
            .map_err(backend)?
        {
            Some(v) => decode_u64(&v).map(Some),
            None => Ok(None),
        }
    }

    /// The newest (seq, version) of a conversation.
    pub fn head(&self, conv: ConversationId) -> Result<Option<(Seq, u64)>> {
        let mut it = self
            .db
            .raw_iterator_cf_opt(self.cf(CF_MESSAGES), prefix_read_opts());
        head_with(&mut it, conv)
    }

    pub fn user_conv(&self, user: UserId, conv: ConversationId) -> Result<Option<UserConvRecord>> {
        self.user_conv_at(user, conv, &ReadOptions::default())
    }

    /// [`Db::user_conv`] read with `ro` (a snapshot's, say).
    fn user_conv_at(
        &self,
        user: UserId,
        conv: ConversationId,
        ro: &ReadOptions,
    ) -> Result<Option<UserConvRecord>> {
        match self
            .db
            .get_pinned_cf_opt(self.cf(CF_USER_CONVS), pair_key(user, conv), ro)
            .map_err(backend)?
        {
            Some(v) => UserConvRecord::decode(&v).map(Some),
            None => Ok(None),
        }
    }

    pub fn cursor(&self, key: &[u8]) -> Result<Seq> {
        Ok(self.get_u64(CF_CURSORS, key)?.unwrap_or(0))
    }

    pub fn is_member(&self, group: GroupId, user: UserId) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_MEMBERS), pair_key(group, user))
            .map_err(backend)?
            .is_some())
    }

    /// The stored record of one message (committed), as bytes.
    pub fn message_record(&self, conv: ConversationId, seq: Seq) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_MESSAGES), msg_key(conv, seq))
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    /// `f(other, value)` for the relations of `kind` of `user` with `other > after`, up to
    /// `limit`, ascending: one prefix-bounded scan.
    fn scan_relations<T>(
        &self,
        user: UserId,
        kind: RelationKind,
        after: UserId,
        limit: usize,
        mut f: impl FnMut(UserId, &[u8]) -> T,
    ) -> Result<Vec<T>> {
        let mut out = Vec::new();
        let Some(start) = after.checked_add(1) else {
            return Ok(out);
        };
        let lower = relation_key(user, kind, start);
        let mut upper = relation_key(user, kind, 0);
        upper[8] += 1;
        let mut ro = ReadOptions::default();
        ro.set_prefix_same_as_start(true);
        ro.set_iterate_upper_bound(upper[..9].to_vec());
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_RELATIONS), ro);
        it.seek(lower);
        while out.len() < limit {
            let Some((k, v)) = it.item() else { break };
            if k.len() != 17 || k[..9] != lower[..9] {
                break;
            }
            out.push(f(be_at(k, 9), v));
            it.next();
        }
        it.status().map_err(backend)?;
        Ok(out)
    }

    /// Up to `limit` entries of the account state with keys starting with `prefix` and
    /// greater than `after`, ascending. The iterator's upper bound is the end of the prefix,
    /// so it never reads a key beyond it (nor steps over tombstones there). A prefix without
    /// an end (empty or all 0xFF) needs no bound: every key from it on starts with it.
    fn scan_meta(&self, prefix: &[u8], after: &[u8], limit: usize) -> Result<Vec<(Bytes, Bytes)>> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let start = meta_scan_start(prefix, after);
        let mut ro = ReadOptions::default();
        if let Some(end) = prefix_end(prefix) {
            if start >= end {
                return Ok(out);
            }
            ro.set_iterate_upper_bound(end);
        }
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_ACCOUNT_META), ro);
        it.seek(&start);
        while out.len() < limit {
            let Some((k, v)) = it.item() else { break };
            out.push((Bytes::copy_from_slice(k), Bytes::copy_from_slice(v)));
            it.next();
        }
        it.status().map_err(backend)?;
        Ok(out)
    }

    pub fn meta_version(&self) -> Result<u64> {
        Ok(self.get_u64(CF_META, META_VERSION)?.unwrap_or(0))
    }

    /// All keys `prefix BE ++ x BE` with `x > after`, up to `limit`, returning `x`.
    fn scan_pairs(&self, cf: &str, prefix: u64, after: u64, limit: usize) -> Result<Vec<u64>> {
        self.scan_pairs_with(cf, prefix, after, limit, |x, _| x)
    }

    /// As [`Db::scan_pairs`], returning `f(x, value)` for each.
    fn scan_pairs_with<T>(
        &self,
        cf: &str,
        prefix: u64,
        after: u64,
        limit: usize,
        mut f: impl FnMut(u64, &[u8]) -> T,
    ) -> Result<Vec<T>> {
        let mut out = Vec::new();
        let Some(start) = after.checked_add(1) else {
            return Ok(out);
        };
        let mut it = self
            .db
            .raw_iterator_cf_opt(self.cf(cf), bounded_opts(prefix));
        it.seek(pair_key(prefix, start));
        while out.len() < limit {
            let Some((k, v)) = it.item() else { break };
            let (p, x) = split_pair_key(k)?;
            if p != prefix {
                break;
            }
            out.push(f(x, v));
            it.next();
        }
        it.status().map_err(backend)?;
        Ok(out)
    }
}

type RawIter<'a> = rocksdb::DBRawIterator<'a>;

fn head_with(it: &mut RawIter<'_>, conv: ConversationId) -> Result<Option<(Seq, u64)>> {
    it.seek_for_prev(msg_key(conv, u64::MAX));
    let out = match it.item() {
        Some((k, v)) => {
            let (c, s) = split_pair_key(k)?;
            if c == conv {
                Some((s, decode_record(v)?.version))
            } else {
                None
            }
        }
        None => None,
    };
    it.status().map_err(backend)?;
    Ok(out)
}

/// Reads up to `limit` messages of `conv` forward from a positioned iterator. All values of the page are copied into one buffer (one allocation, measured
/// faster than one per message); each payload is a `Bytes` slice of it.
fn collect_page(
    it: &mut RawIter<'_>,
    conv: ConversationId,
    limit: usize,
) -> Result<Vec<StoredMessage>> {
    let mut spans = Vec::with_capacity(limit.min(1024));
    let mut buf = Vec::with_capacity(limit.min(1024) * 320);
    while spans.len() < limit {
        let Some((k, v)) = it.item() else { break };
        let (c, s) = split_pair_key(k)?;
        if c != conv || s == 0 {
            break;
        }
        spans.push((s, buf.len(), buf.len() + v.len()));
        buf.extend_from_slice(v);
        it.next();
    }
    it.status().map_err(backend)?;
    let page = bytes::Bytes::from(buf);
    spans
        .into_iter()
        .map(|(seq, start, end)| {
            let r = decode_record(&page[start..end])?;
            Ok(StoredMessage::from_page(conv, seq, &r, &page))
        })
        .collect()
}

/// Iteration confined to the seek key's 8-byte prefix (uses the prefix bloom filters).
fn prefix_read_opts() -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.set_prefix_same_as_start(true);
    ro
}

/// Iteration confined to keys starting with `prefix BE`.
fn bounded_opts(prefix: u64) -> ReadOptions {
    let mut ro = prefix_read_opts();
    ro.set_iterate_lower_bound(pair_key(prefix, 0).to_vec());
    if let Some(next) = prefix.checked_add(1) {
        ro.set_iterate_upper_bound(pair_key(next, 0).to_vec());
    }
    ro
}

/// The next ids to hand out, and the end of the block of ids reserved for them (what the
/// `meta` column family stores; see "Interned ids" in the crate docs).
#[derive(Debug)]
struct Counters {
    next_user: u64,
    next_group: u64,
    reserved_user: u64,
    reserved_group: u64,
}

/// Ids reserved with one synced write.
const ID_BLOCK: u64 = 1024;

struct Inner {
    tx: Sender<Op>,
    closed: AtomicBool,
    durability: Durability,
    /// Interning's writes (unsynced), and those that reserve a block of ids (synced).
    write_opts: WriteOptions,
    reserve_opts: WriteOptions,
    counters: Mutex<Counters>,
    writer: Mutex<Option<JoinHandle<()>>>,
    syncer: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
    path: PathBuf,
    db: Arc<Db>,
    // Declared last: released after the database above is closed.
    _guard: DirGuard,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .field("closed", &self.closed)
            .field("queued", &self.tx.len())
            .finish()
    }
}

/// The durable [`MessageStore`] on RocksDB. Cheap to clone (an `Arc`); all clones share one
/// writer thread. See the crate docs for the layout and the invariants.
#[derive(Debug, Clone)]
pub struct RocksStore {
    inner: Arc<Inner>,
}

fn write_options(d: Durability) -> WriteOptions {
    let mut wo = WriteOptions::default();
    match d {
        Durability::Fsync => wo.set_sync(true),
        Durability::Wal { .. } => wo.set_sync(false),
        Durability::Memory => wo.disable_wal(true),
    }
    wo
}

/// Interning's writes: to the WAL (unless `memory`), not synced by themselves. A new id is
/// durable once any later synced write is (the WAL is one sequence), and every write that
/// can refer to it comes later; see "Invariants" in the crate docs. With `sync`, for the
/// write that reserves a block of ids (under `wal` too, so no id is handed out twice).
fn intern_write_options(d: Durability, sync: bool) -> WriteOptions {
    let mut wo = WriteOptions::default();
    if d == Durability::Memory {
        wo.disable_wal(true);
    } else {
        wo.set_sync(sync);
    }
    wo
}

/// Bytes of the conversation id at the front of a `messages` key (and of the user or group id
/// in `user_convs`, `members`, `user_groups`): their prefix extractors' length.
const ID_PREFIX_LEN: usize = 8;

fn cf_options(name: &str, opts: &StoreOptions, cache: &Cache) -> Result<Options> {
    let mut o = Options::default();
    if name == CF_MESSAGES {
        // A conversation's messages arrive in sequence order, so each memtable insert starts
        // from where the conversation's previous one went (a hint per prefix) instead of
        // searching the skiplist from the top: about 0.4 us less per append for the committer
        // (docs/PERFORMANCE.md). The hints live as long as the memtable, one per conversation
        // in it. Not settable through the C API, hence the options string; applied first, as it
        // returns new options that would not keep alive what the wrapper holds for settings
        // made before (the block cache of the table options).
        o = o
            .get_options_from_string(format!(
                "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.{ID_PREFIX_LEN}"
            ))
            .map_err(backend)?;
    }
    let mut t = BlockBasedOptions::default();
    t.set_block_cache(cache);
    t.set_bloom_filter(10.0, false);
    t.set_cache_index_and_filter_blocks(true);
    t.set_pin_l0_filter_and_index_blocks_in_cache(true);
    match name {
        // Range reads by (conv | user | group) prefix: prefix bloom in SSTs and memtables.
        CF_MESSAGES | CF_USER_CONVS | CF_MEMBERS | CF_USER_GROUPS => {
            o.set_prefix_extractor(SliceTransform::create_fixed_prefix(ID_PREFIX_LEN));
            o.set_memtable_prefix_bloom_ratio(0.1);
            t.set_whole_key_filtering(false);
        }
        // One user's relations of one kind by prefix; point reads (is this user blocked?) on
        // every 1:1 send, so whole-key filters too.
        CF_RELATIONS => {
            o.set_prefix_extractor(SliceTransform::create_fixed_prefix(9));
            o.set_memtable_prefix_bloom_ratio(0.1);
        }
        _ => {}
    }
    o.set_block_based_table_factory(&t);
    if name == CF_MESSAGES {
        o.set_write_buffer_size(opts.write_buffer_bytes);
        // Room for two memtables being flushed while the third fills: a slow flush on a
        // busy machine must not stall appends.
        o.set_max_write_buffer_number(4);
        // Fresh data is read most (catch-up); keep the top levels uncompressed.
        o.set_compression_per_level(&[
            DBCompressionType::None,
            DBCompressionType::None,
            DBCompressionType::Lz4,
            DBCompressionType::Lz4,
            DBCompressionType::Lz4,
            DBCompressionType::Lz4,
            DBCompressionType::Lz4,
        ]);
    } else {
        o.set_write_buffer_size(8 << 20);
        o.set_compression_type(DBCompressionType::Lz4);
    }
    Ok(o)
}

impl RocksStore {
    /// Opens (creating if needed) the store in directory `path`.
    ///
    /// Fails with [`StorageError::AlreadyOpen`] if this process has it open,
    /// [`StorageError::Locked`] if another process does, and
    /// [`StorageError::UnsupportedFormat`] if it was written by an unknown format version.
    pub fn open(path: impl AsRef<Path>, opts: StoreOptions) -> Result<RocksStore> {
        let path = path.as_ref();
        std::fs::create_dir_all(path)
            .map_err(|e| StorageError::Backend(format!("create {}: {e}", path.display())))?;
        let path = path
            .canonicalize()
            .map_err(|e| StorageError::Backend(format!("canonicalize {}: {e}", path.display())))?;
        let guard = DirGuard::acquire(&path)?;

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.increase_parallelism(2);
        db_opts.set_max_background_jobs(2);
        db_opts.set_max_total_wal_size(512 << 20);
        // Flushes and compactions hand their files to the disk every MiB instead of in one
        // burst at the end, which queued the WAL's fsyncs (every acknowledged append) behind
        // tens of megabytes.
        db_opts.set_bytes_per_sync(1 << 20);
        // A full disk needs no reopen: on a "no space" error RocksDB refuses writes, and the
        // SstFileManager it creates by default checks the free space every 5 s and, once the
        // largest memtable's size is free, resumes them (it flushes the memtables and starts
        // a new WAL). That relies on defaults kept here: one data path, paranoid checks, no
        // manual WAL flush. Other write errors are fatal to RocksDB until the store is opened
        // again.
        if opts.durability == Durability::Memory {
            // Without a WAL, only atomic flushes keep the column families consistent.
            db_opts.set_atomic_flush(true);
        }
        let cache = Cache::new_lru_cache(opts.block_cache_bytes);
        // Open column families this build does not know too (a newer format may have added
        // some), so that the format check below can report the version clearly.
        let existing = DB::list_cf(&db_opts, &path).unwrap_or_default();
        let mut names: Vec<String> = ALL_CFS.iter().map(|s| s.to_string()).collect();
        for n in existing {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        let cfs = names
            .iter()
            .map(|n| {
                Ok(ColumnFamilyDescriptor::new(
                    n,
                    cf_options(n, &opts, &cache)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let db = DB::open_cf_descriptors(&db_opts, &path, cfs).map_err(|e| {
            let msg = e.into_string();
            if msg.contains("lock") || msg.contains("LOCK") {
                StorageError::Locked {
                    path: path.clone(),
                    detail: msg,
                }
            } else {
                StorageError::Backend(msg)
            }
        })?;
        let db = Arc::new(Db {
            db,
            stats: Default::default(),
            #[cfg(test)]
            hooks: writer::Hooks::default(),
        });

        // Format version.
        let meta = db.cf(CF_META);
        match db.db.get_pinned_cf(meta, META_FORMAT).map_err(backend)? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(&v[..])
                    .map(u32::from_le_bytes)
                    .unwrap_or(u32::MAX);
                if found != FORMAT_VERSION {
                    return Err(StorageError::UnsupportedFormat {
                        path,
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
            }
            None => {
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                db.db
                    .put_cf_opt(meta, META_FORMAT, FORMAT_VERSION.to_le_bytes(), &wo)
                    .map_err(backend)?;
            }
        }

        // Ids up to the stored end of the last reserved block may have been handed out before
        // a crash: continue after it.
        let next_user = db.get_u64(CF_META, META_NEXT_USER)?.unwrap_or(1);
        let next_group = db.get_u64(CF_META, META_NEXT_GROUP)?.unwrap_or(1);
        let counters = Counters {
            next_user,
            next_group,
            reserved_user: next_user,
            reserved_group: next_group,
        };
        let version = db.meta_version()?;
        let (dedup, journal) = load_journal(&db, &opts)?;

        let (tx, rx) = crossbeam_channel::unbounded();
        let write_opts = intern_write_options(opts.durability, false);
        let reserve_opts = intern_write_options(opts.durability, true);
        let link = writer::spawn_committer(db.clone(), write_options(opts.durability))?;
        let w = Writer::new(db.clone(), rx, link, &opts, version, dedup, journal);
        let writer = std::thread::Builder::new()
            .name("tern-storage-writer".into())
            .spawn(move || w.run())
            .map_err(|e| StorageError::Backend(format!("spawn writer: {e}")))?;
        let syncer = match opts.sync_interval() {
            Some(every) => Some(spawn_syncer(db.clone(), every)?),
            None => None,
        };
        Ok(RocksStore {
            inner: Arc::new(Inner {
                tx,
                closed: AtomicBool::new(false),
                durability: opts.durability,
                write_opts,
                reserve_opts,
                counters: Mutex::new(counters),
                writer: Mutex::new(Some(writer)),
                syncer: Mutex::new(syncer),
                path,
                db,
                _guard: guard,
            }),
        })
    }

    /// The canonical path of the data directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Writes queued for the writer thread (for back-pressure and metrics).
    pub fn queue_len(&self) -> usize {
        self.inner.tx.len()
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(StorageError::Closed)
        } else {
            Ok(())
        }
    }

    fn submit<T>(&self, make: impl FnOnce(crate::completion::Completer<T>) -> Op) -> Completion<T> {
        if let Err(e) = self.check_open() {
            return Completion::ready(Err(e));
        }
        let (done, completion) = Completion::channel();
        // If the writer is gone the op (and its completer) is dropped: the completion
        // resolves to `Closed`.
        let _ = self.inner.tx.send(make(done));
        completion
    }

    fn intern(&self, name: &str, group: bool) -> Result<u64> {
        check_name(name)?;
        self.check_open()?;
        let (ids_cf, names_cf) = if group {
            (CF_GROUP_IDS, CF_GROUP_NAMES)
        } else {
            (CF_USER_IDS, CF_USER_NAMES)
        };
        let db = &self.inner.db;
        if let Some(id) = db.get_u64(ids_cf, name.as_bytes())? {
            return Ok(id);
        }
        let mut c = lock(&self.inner.counters);
        // A close that took the lock first has stored the next ids already.
        self.check_open()?;
        // Another thread may have interned it while we waited for the lock.
        if let Some(id) = db.get_u64(ids_cf, name.as_bytes())? {
            return Ok(id);
        }
        let c = &mut *c;
        let (next, reserved, max, key) = if group {
            (
                &mut c.next_group,
                &mut c.reserved_group,
                MAX_GROUP_ID,
                META_NEXT_GROUP,
            )
        } else {
            (
                &mut c.next_user,
                &mut c.reserved_user,
                MAX_USER_ID,
                META_NEXT_USER,
            )
        };
        let id = *next;
        if id > max {
            return Err(StorageError::IdSpaceExhausted);
        }
        let mut b = WriteBatch::default();
        b.put_cf(db.cf(ids_cf), name.as_bytes(), encode_u64(id));
        let mut named = Vec::with_capacity(name.len() + 1);
        named.push(crate::record::RECORD_VERSION);
        named.extend_from_slice(name.as_bytes());
        b.put_cf(db.cf(names_cf), id.to_be_bytes(), named);
        // The first id past the reserved block reserves the next block, synced with it.
        let block_end = (id >= *reserved).then(|| id.saturating_add(ID_BLOCK).min(max + 1));
        let opts = match block_end {
            Some(end) => {
                b.put_cf(db.cf(CF_META), key, encode_u64(end));
                &self.inner.reserve_opts
            }
            None => &self.inner.write_opts,
        };
        db.db.write_opt(b, opts).map_err(backend)?;
        *next = id + 1;
        if let Some(end) = block_end {
            *reserved = end;
        }
        Ok(id)
    }

    fn lookup(&self, name: &str, group: bool) -> Result<Option<u64>> {
        self.check_open()?;
        self.inner.db.get_u64(
            if group { CF_GROUP_IDS } else { CF_USER_IDS },
            name.as_bytes(),
        )
    }

    fn name_of(&self, id: u64, group: bool) -> Result<Option<String>> {
        self.check_open()?;
        let db = &self.inner.db;
        let cf = db.cf(if group { CF_GROUP_NAMES } else { CF_USER_NAMES });
        let Some(v) = db.db.get_pinned_cf(cf, id.to_be_bytes()).map_err(backend)? else {
            return Ok(None);
        };
        match v.split_first() {
            Some((&crate::record::RECORD_VERSION, rest)) => std::str::from_utf8(rest)
                .map(|s| Some(s.to_owned()))
                .map_err(|_| StorageError::Corrupt("name is not UTF-8")),
            Some((&found, _)) => Err(StorageError::UnknownRecordVersion {
                found,
                supported: crate::record::RECORD_VERSION,
            }),
            None => Err(StorageError::Corrupt("empty name record")),
        }
    }
}

fn spawn_syncer(db: Arc<Db>, every: Duration) -> Result<(Sender<()>, JoinHandle<()>)> {
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    let h = std::thread::Builder::new()
        .name("tern-storage-walsync".into())
        .spawn(move || {
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                stop_rx.recv_timeout(every)
            {
                // A failed sync is retried at the next tick; acknowledged writes were
                // promised only process-crash durability under this policy.
                let _ = db.db.flush_wal(true);
            }
        })
        .map_err(|e| StorageError::Backend(format!("spawn WAL sync thread: {e}")))?;
    Ok((stop_tx, h))
}

/// Rebuilds the idempotency index from the dedup journal, dropping journal records that
/// fell out of the window.
fn load_journal(db: &Db, opts: &StoreOptions) -> Result<(DedupIndex, Vec<(u64, u64)>)> {
    let now = now_ms();
    let max_age = u64::try_from(opts.dedup_window.max_age.as_millis()).unwrap_or(u64::MAX);
    let mut dedup = DedupIndex::new(opts.dedup_window);
    let mut journal = Vec::new();
    let mut expired_to: Option<u64> = None;
    let mut it = db.db.raw_iterator_cf(db.cf(CF_JOURNAL));
    it.seek_to_first();
    while let Some((k, v)) = it.item() {
        if k.len() != 8 {
            return Err(StorageError::Corrupt(
                "dedup journal key has a wrong length",
            ));
        }
        let key = be_at(k, 0);
        let (time, entries) = decode_journal(v)?;
        if time.saturating_add(max_age) < now {
            expired_to = Some(key);
        } else {
            let mut last = key;
            for e in entries {
                last = last.max(e.version);
                let k = dedup.key(e.sender, &e.client_msg_id);
                dedup.insert(
                    k,
                    DedupEntry {
                        conv: e.conv,
                        seq: e.seq,
                        time_ms: time,
                        version: e.version,
                    },
                );
            }
            journal.push((key, last));
        }
        it.next();
    }
    it.status().map_err(backend)?;
    drop(it);
    // Records whose entries were all evicted by count are dropped too.
    let keep_from = dedup.oldest_version().unwrap_or(u64::MAX);
    let split = journal.partition_point(|&(_, last)| last < keep_from);
    if split > 0 {
        expired_to = Some(expired_to.unwrap_or(0).max(journal[split - 1].0));
        journal.drain(..split);
    }
    if let Some(to) = expired_to {
        db.db
            .delete_range_cf(
                db.cf(CF_JOURNAL),
                0u64.to_be_bytes(),
                (to + 1).to_be_bytes(),
            )
            .map_err(backend)?;
    }
    Ok((dedup, journal))
}

impl MessageStore for RocksStore {
    fn intern_user(&self, name: &str) -> Result<UserId> {
        self.intern(name, false)
    }

    fn lookup_user(&self, name: &str) -> Result<Option<UserId>> {
        self.lookup(name, false)
    }

    fn user_name(&self, id: UserId) -> Result<Option<String>> {
        self.name_of(id, false)
    }

    fn intern_group(&self, name: &str) -> Result<GroupId> {
        self.intern(name, true)
    }

    fn lookup_group(&self, name: &str) -> Result<Option<GroupId>> {
        self.lookup(name, true)
    }

    fn sync_interned(&self) -> Result<()> {
        self.check_open()?;
        match self.inner.durability {
            Durability::Fsync => self.inner.db.db.flush_wal(true).map_err(backend),
            Durability::Wal { .. } | Durability::Memory => Ok(()),
        }
    }

    fn group_name(&self, id: GroupId) -> Result<Option<String>> {
        self.name_of(id, true)
    }

    fn add_member(&self, group: GroupId, user: UserId) -> Completion<bool> {
        self.submit(|done| Op::Member {
            group,
            user,
            add: true,
            done,
        })
    }

    fn remove_member(&self, group: GroupId, user: UserId) -> Completion<bool> {
        self.submit(|done| Op::Member {
            group,
            user,
            add: false,
            done,
        })
    }

    fn members(&self, group: GroupId, after: UserId, limit: usize) -> Result<Vec<UserId>> {
        self.check_open()?;
        self.inner.db.scan_pairs(CF_MEMBERS, group, after, limit)
    }

    fn groups_of(&self, user: UserId) -> Result<Vec<GroupId>> {
        self.check_open()?;
        self.inner
            .db
            .scan_pairs(CF_USER_GROUPS, user, 0, usize::MAX)
    }

    fn group_record(&self, group: GroupId) -> Result<Option<Bytes>> {
        self.check_open()?;
        let db = &self.inner.db;
        Ok(db
            .db
            .get_pinned_cf(db.cf(CF_GROUPS), group.to_be_bytes())
            .map_err(backend)?
            .map(|v| Bytes::copy_from_slice(&v)))
    }

    fn set_group_record(&self, group: GroupId, record: Bytes) -> Completion<()> {
        self.submit(|done| Op::GroupRecord {
            group,
            record,
            done,
        })
    }

    fn member_records(
        &self,
        group: GroupId,
        after: UserId,
        limit: usize,
    ) -> Result<Vec<(UserId, Bytes)>> {
        self.check_open()?;
        self.inner
            .db
            .scan_pairs_with(CF_MEMBERS, group, after, limit, |user, attrs| {
                (user, Bytes::copy_from_slice(attrs))
            })
    }

    fn membership(&self, user: UserId, group: GroupId) -> Result<Option<Seq>> {
        self.check_open()?;
        let Some(conv) = group_conversation(group) else {
            return Ok(None);
        };
        Ok(self.inner.db.user_conv(user, conv)?.map(|r| r.left_seq))
    }

    fn joined_seq(&self, user: UserId, group: GroupId) -> Result<Seq> {
        self.check_open()?;
        let Some(conv) = group_conversation(group) else {
            return Ok(0);
        };
        Ok(self
            .inner
            .db
            .user_conv(user, conv)?
            .map_or(0, |r| r.joined_seq))
    }

    fn set_conversation_settings(
        &self,
        user: UserId,
        conv: ConversationId,
        change: SettingsChange,
    ) -> Completion<SettingsUpdate> {
        if let Err(e) = check_user(user) {
            return Completion::ready(Err(e));
        }
        self.submit(|done| Op::Settings {
            user,
            conv,
            change,
            done,
        })
    }

    fn conversation_settings(
        &self,
        user: UserId,
        conv: ConversationId,
    ) -> Result<ConversationSettings> {
        self.check_open()?;
        let db = &self.inner.db;
        let Some(rec) = db.user_conv(user, conv)? else {
            return Ok(ConversationSettings::default());
        };
        Ok(rec.settings(db.head(conv)?.map_or(0, |(seq, _)| seq)))
    }

    fn set_relations(&self, changes: Vec<RelationChange>) -> Completion<()> {
        if let Err(e) = check_relations(&changes) {
            return Completion::ready(Err(e));
        }
        self.submit(|done| Op::Relations(changes, done))
    }

    fn relation(&self, user: UserId, kind: RelationKind, other: UserId) -> Result<Option<Bytes>> {
        self.check_open()?;
        let db = &self.inner.db;
        Ok(db
            .db
            .get_pinned_cf(db.cf(CF_RELATIONS), relation_key(user, kind, other))
            .map_err(backend)?
            .map(|v| Bytes::copy_from_slice(&v)))
    }

    fn relations(
        &self,
        user: UserId,
        kind: RelationKind,
        after: UserId,
        limit: usize,
    ) -> Result<Vec<(UserId, Bytes)>> {
        self.check_open()?;
        self.inner
            .db
            .scan_relations(user, kind, after, limit, |other, value| {
                (other, Bytes::copy_from_slice(value))
            })
    }

    fn count_relations(&self, user: UserId, kind: RelationKind) -> Result<u64> {
        self.check_open()?;
        // A scan of the keys (values are not copied; a `Vec<()>` does not allocate).
        let n = self
            .inner
            .db
            .scan_relations(user, kind, 0, usize::MAX, |_, _| ())?
            .len();
        Ok(n as u64)
    }

    fn set_user_profile(&self, user: UserId, profile: Bytes) -> Completion<()> {
        if let Err(e) = check_user(user) {
            return Completion::ready(Err(e));
        }
        self.submit(|done| Op::Profile {
            user,
            profile,
            done,
        })
    }

    fn user_profile(&self, user: UserId) -> Result<Option<Bytes>> {
        self.check_open()?;
        let db = &self.inner.db;
        Ok(db
            .db
            .get_pinned_cf(db.cf(CF_PROFILES), user.to_be_bytes())
            .map_err(backend)?
            .map(|v| Bytes::copy_from_slice(&v)))
    }

    fn set_meta(&self, changes: Vec<MetaChange>) -> Completion<()> {
        if let Err(e) = check_meta(&changes) {
            return Completion::ready(Err(e));
        }
        self.submit(|done| Op::Meta(changes, done))
    }

    fn meta(&self, key: &[u8]) -> Result<Option<Bytes>> {
        self.check_open()?;
        let db = &self.inner.db;
        Ok(db
            .db
            .get_pinned_cf(db.cf(CF_ACCOUNT_META), key)
            .map_err(backend)?
            .map(|v| Bytes::copy_from_slice(&v)))
    }

    fn scan_meta(&self, prefix: &[u8], after: &[u8], limit: usize) -> Result<Vec<(Bytes, Bytes)>> {
        self.check_open()?;
        self.inner
            .db
            .scan_meta(prefix, after, limit.min(MAX_META_SCAN))
    }

    fn commit_stats(&self) -> crate::api::CommitStats {
        self.inner.db.stats.snapshot()
    }

    fn append(&self, req: AppendRequest) -> Completion<Appended> {
        if let Err(e) = req.validate() {
            return Completion::ready(Err(e));
        }
        self.submit(|done| Op::Append(req, done))
    }

    fn read_forward(
        &self,
        conv: ConversationId,
        from_seq: Seq,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        self.check_open()?;
        let db = &self.inner.db;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut it = db
            .db
            .raw_iterator_cf_opt(db.cf(CF_MESSAGES), bounded_opts(conv));
        it.seek(msg_key(conv, from_seq.max(1)));
        collect_page(&mut it, conv, limit)
    }

    fn read_backward(
        &self,
        conv: ConversationId,
        before_seq: Seq,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        self.check_open()?;
        let db = &self.inner.db;
        if limit == 0 || before_seq == 1 {
            return Ok(Vec::new());
        }
        let mut it = db
            .db
            .raw_iterator_cf_opt(db.cf(CF_MESSAGES), bounded_opts(conv));
        // Seqs are contiguous from 1 (no gaps, nothing is deleted), so the page is the seq
        // range [end - limit, end): read it forward and reverse it. Stepping a RocksDB
        // iterator backwards is much slower than forwards (a memtable skiplist has no back
        // links: each `prev` is a search), measured 58 vs 25 us per page of 50.
        if before_seq != 0 {
            // A page below the head (the usual case when paging back) needs no look for the
            // head: it comes back whole. Short, `before_seq` is past the head.
            let start = before_seq.saturating_sub(limit as u64).max(1);
            let want = (before_seq - start) as usize;
            it.seek(msg_key(conv, start));
            let mut page = collect_page(&mut it, conv, want)?;
            if page.len() == want {
                page.reverse();
                return Ok(page);
            }
        }
        let Some((latest, _)) = head_with(&mut it, conv)? else {
            return Ok(Vec::new());
        };
        let end = if before_seq == 0 {
            latest.saturating_add(1)
        } else {
            before_seq.min(latest.saturating_add(1))
        };
        let start = end.saturating_sub(limit as u64).max(1);
        if start >= end {
            return Ok(Vec::new());
        }
        it.seek(msg_key(conv, start));
        let mut page = collect_page(&mut it, conv, (end - start) as usize)?;
        page.reverse();
        Ok(page)
    }

    fn latest_seq(&self, conv: ConversationId) -> Result<Seq> {
        self.check_open()?;
        Ok(self.inner.db.head(conv)?.map_or(0, |(s, _)| s))
    }

    fn sync_view(
        &self,
        user: UserId,
        since_version: u64,
        device: Option<&str>,
    ) -> Result<SyncView> {
        self.check_open()?;
        if let Some(d) = device {
            check_device(d)?;
        }
        let db = &self.inner.db;
        // Every read from one snapshot: the version and the conversations agree.
        let snapshot = db.db.snapshot();
        let at = |mut ro: ReadOptions| {
            ro.set_snapshot(&snapshot);
            ro
        };
        let point = at(ReadOptions::default());
        let mut heads = db
            .db
            .raw_iterator_cf_opt(db.cf(CF_MESSAGES), at(prefix_read_opts()));
        let mut it = db
            .db
            .raw_iterator_cf_opt(db.cf(CF_USER_CONVS), at(bounded_opts(user)));
        it.seek(pair_key(user, 0));
        let mut view = SyncView::default();
        while let Some((k, v)) = it.item() {
            let (u, conv) = split_pair_key(k)?;
            if u != user {
                break;
            }
            let rec = UserConvRecord::decode(v)?;
            let head = head_with(&mut heads, conv)?.unwrap_or((0, 0));
            let peer = rec.peer(user, conv, |other| db.user_conv_at(other, conv, &point))?;
            let mut info = rec.info(user, conv, head, peer.as_ref());
            view.user_version = view.user_version.max(info.last_version);
            if info.last_version > since_version {
                if let Some(d) = device {
                    info.delivered_seq = db
                        .get_u64_at(CF_CURSORS, &cursor_key(user, conv, d), &point)?
                        .unwrap_or(0);
                }
                view.conversations.push(info);
            }
            it.next();
        }
        it.status().map_err(backend)?;
        Ok(view)
    }

    fn set_read(&self, user: UserId, conv: ConversationId, seq: Seq) -> Completion<Seq> {
        self.submit(|done| Op::SetRead {
            user,
            conv,
            seq,
            done,
        })
    }

    fn read_seq(&self, user: UserId, conv: ConversationId) -> Result<Seq> {
        self.check_open()?;
        Ok(self
            .inner
            .db
            .user_conv(user, conv)?
            .map_or(0, |r| r.read_seq))
    }

    fn read_and_joined_seq(&self, user: UserId, conv: ConversationId) -> Result<(Seq, Seq)> {
        self.check_open()?;
        Ok(self
            .inner
            .db
            .user_conv(user, conv)?
            .map_or((0, 0), |r| (r.read_seq, r.joined_seq)))
    }

    fn set_delivered(
        &self,
        user: UserId,
        device: &str,
        conv: ConversationId,
        seq: Seq,
    ) -> Completion<Seq> {
        if let Err(e) = check_device(device) {
            return Completion::ready(Err(e));
        }
        let device = device.to_owned();
        self.submit(|done| Op::SetDelivered {
            user,
            conv,
            device,
            seq,
            done,
        })
    }

    fn delivered(&self, user: UserId, device: &str, conv: ConversationId) -> Result<Seq> {
        self.check_open()?;
        check_device(device)?;
        self.inner.db.cursor(&cursor_key(user, conv, device))
    }

    fn close(&self) -> Result<()> {
        self.inner.close()
    }
}

impl Inner {
    fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Everything queued before this marker is committed and completed; anything sent
        // after it is dropped with the channel and resolves to `Closed`.
        let _ = self.tx.send(Op::Shutdown);
        if let Some(h) = lock(&self.writer).take() {
            let _ = h.join();
        }
        if let Some((stop, h)) = lock(&self.syncer).take() {
            drop(stop);
            let _ = h.join();
        }
        let db = &self.db;
        {
            // A clean close gives back what is left of the reserved blocks: ids continue from
            // the next one after a restart. `intern` checks `closed` under this lock, so none is
            // handed out after this. If the write fails, the stored block ends stand (safe).
            let c = lock(&self.counters);
            let mut b = WriteBatch::default();
            b.put_cf(db.cf(CF_META), META_NEXT_USER, encode_u64(c.next_user));
            b.put_cf(db.cf(CF_META), META_NEXT_GROUP, encode_u64(c.next_group));
            let _ = db.db.write_opt(b, &self.write_opts);
        }
        match self.durability {
            Durability::Fsync | Durability::Wal { .. } => db.db.flush_wal(true).map_err(backend),
            Durability::Memory => {
                let cfs: Vec<&ColumnFamily> = ALL_CFS.iter().map(|n| db.cf(n)).collect();
                db.db
                    .flush_cfs_opt(&cfs, &rocksdb::FlushOptions::default())
                    .map_err(backend)
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::SeqCst;

    use super::*;
    use crate::api::GroupChange;
    use crate::ids::direct_conversation;

    fn msg(conv: u64, id: &str) -> AppendRequest {
        AppendRequest {
            conversation: conv,
            sender: 1,
            client_msg_id: id.to_owned(),
            payload: Bytes::from_static(b"x"),
            participants: vec![1, 2],
            ..AppendRequest::default()
        }
    }

    /// The messages column family inserts with a hint per conversation, and appends to
    /// interleaved conversations (within batches and across them) read back in order from the
    /// memtable, forwards and backwards, and again after a reopen.
    #[test]
    fn messages_memtable_inserts_with_a_hint_per_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let convs: Vec<u64> = (2..=4)
            .map(|p| direct_conversation(1, p).unwrap())
            .collect();
        let check = |s: &RocksStore| {
            for (k, &c) in convs.iter().enumerate() {
                let fwd = s.read_forward(c, 1, 100).unwrap();
                let seqs: Vec<u64> = fwd.iter().map(|m| m.seq).collect();
                assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
                let ids: Vec<&str> = fwd.iter().map(|m| m.client_msg_id.as_str()).collect();
                let want: Vec<String> = (0..20).map(|i| format!("c{k}-{i}")).collect();
                assert_eq!(ids, want);
                let back: Vec<u64> = s
                    .read_backward(c, 0, 5)
                    .unwrap()
                    .iter()
                    .map(|m| m.seq)
                    .collect();
                assert_eq!(back, vec![20, 19, 18, 17, 16]);
            }
        };
        {
            let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
            // Round one submits everything before waiting (large batches, conversations
            // interleaved inside each); round two waits for each append (one per batch).
            let mut pending = Vec::new();
            for i in 0..10 {
                for (k, &c) in convs.iter().enumerate() {
                    pending.push(s.append(msg(c, &format!("c{k}-{i}"))));
                }
            }
            for p in pending {
                p.wait().unwrap();
            }
            for i in 10..20 {
                for (k, &c) in convs.iter().enumerate().rev() {
                    s.append(msg(c, &format!("c{k}-{i}"))).wait().unwrap();
                }
            }
            check(&s);
        }
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        check(&s);
        // The setting is in the options RocksDB persisted for the messages column family.
        let options = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("OPTIONS-")
            })
            .max()
            .unwrap();
        let text = std::fs::read_to_string(options).unwrap();
        let section = text
            .split("[CFOptions \"")
            .find(|sec| sec.starts_with(&format!("{CF_MESSAGES}\"")))
            .unwrap();
        assert!(
            section.contains("memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.8"),
            "{section}"
        );
    }

    /// A failed commit consumes no sequence number, leaves no idempotency entry behind, and
    /// fails every write of its batch with an "unavailable" error.
    #[test]
    fn failed_commit_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        let c = direct_conversation(1, 2).unwrap();
        for i in 1..=3 {
            assert_eq!(s.append(msg(c, &format!("m{i}"))).wait().unwrap().seq, i);
        }
        s.inner.db.hooks.fail_commits.store(1, SeqCst);
        let e = s.append(msg(c, "m4")).wait().unwrap_err();
        assert!(matches!(e, StorageError::CommitFailed(_)), "{e:?}");
        assert!(e.is_unavailable());
        assert_eq!(s.latest_seq(c).unwrap(), 3);
        let r = s.append(msg(c, "m4")).wait().unwrap();
        assert_eq!(
            (r.seq, r.duplicate),
            (4, false),
            "no gap, no stale dedup entry"
        );

        // User 2 (user 1 sent everything, so has read it).
        s.inner.db.hooks.fail_commits.store(1, SeqCst);
        assert!(s.set_read(2, c, 4).wait().is_err());
        assert_eq!(s.read_seq(2, c).unwrap(), 0);
        assert_eq!(s.set_read(2, c, 2).wait().unwrap(), 2);

        s.inner.db.hooks.fail_commits.store(1, SeqCst);
        assert!(s.add_member(5, 1).wait().is_err());
        assert!(s.members(5, 0, 10).unwrap().is_empty());
        assert!(s.add_member(5, 1).wait().unwrap());

        // A new conversation whose first batch fails: its index entries are retried too.
        let c2 = direct_conversation(1, 3).unwrap();
        s.inner.db.hooks.fail_commits.store(1, SeqCst);
        assert!(s.append(msg(c2, "n1")).wait().is_err());
        assert!(s.conversations_changed_since(2, 0, None).unwrap().len() == 1);
        let mut r = msg(c2, "n1");
        r.participants = vec![1, 3];
        assert_eq!(s.append(r).wait().unwrap().seq, 1);
        assert_eq!(s.conversations_changed_since(3, 0, None).unwrap().len(), 1);
        assert_eq!(seqs(&s, c), vec![1, 2, 3, 4]);
    }

    #[test]
    fn failed_commit_rolls_back_settings_recall_and_relations() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        let c = direct_conversation(1, 2).unwrap();
        s.append(msg(c, "m1")).wait().unwrap();
        let pinned = ConversationSettings {
            pinned: true,
            ..ConversationSettings::default()
        };
        s.inner.db.hooks.fail_commits.store(1, SeqCst);
        assert!(
            s.set_conversation_settings(1, c, pinned.into())
                .wait()
                .is_err()
        );
        assert_eq!(
            s.conversation_settings(1, c).unwrap(),
            ConversationSettings::default()
        );
        // The builder's cache forgot it too: the same change is written again, not a no-op.
        assert_eq!(
            s.set_conversation_settings(1, c, pinned.into())
                .wait()
                .unwrap(),
            SettingsUpdate {
                settings: pinned,
                changed: true
            }
        );
        assert_eq!(s.conversation_settings(1, c).unwrap(), pinned);

        s.inner.db.hooks.fail_commits.store(1, SeqCst);
        let mut tomb = msg(c, "t1");
        tomb.recall = Some(1);
        assert!(s.append(tomb.clone()).wait().is_err());
        let m = &s.read_forward(c, 1, 1).unwrap()[0];
        assert!(!m.recalled && !m.payload.is_empty());
        assert_eq!(s.append(tomb).wait().unwrap().seq, 2);
        assert!(s.read_forward(c, 1, 1).unwrap()[0].recalled);

        s.inner.db.hooks.fail_commits.store(1, SeqCst);
        let friend = RelationChange {
            user: 1,
            kind: RelationKind::Friend,
            other: 2,
            value: Some(Bytes::new()),
        };
        assert!(s.set_relations(vec![friend.clone()]).wait().is_err());
        assert_eq!(s.relation(1, RelationKind::Friend, 2).unwrap(), None);
        s.set_relations(vec![friend]).wait().unwrap();
        assert_eq!(s.count_relations(1, RelationKind::Friend).unwrap(), 1);

        s.inner.db.hooks.fail_commits.store(1, SeqCst);
        assert!(
            s.set_user_profile(1, Bytes::from_static(b"p"))
                .wait()
                .is_err()
        );
        assert_eq!(s.user_profile(1).unwrap(), None);
        s.set_user_profile(1, Bytes::from_static(b"p"))
            .wait()
            .unwrap();
        assert_eq!(s.user_profile(1).unwrap(), Some(Bytes::from_static(b"p")));

        let meta = || {
            vec![
                MetaChange {
                    key: Bytes::from_static(b"ban/1"),
                    value: Some(Bytes::from_static(b"b")),
                },
                MetaChange {
                    key: Bytes::from_static(b"tag/1"),
                    value: Some(Bytes::from_static(b"t")),
                },
            ]
        };
        s.inner.db.hooks.fail_commits.store(1, SeqCst);
        let e = s.set_meta(meta()).wait().unwrap_err();
        assert!(matches!(e, StorageError::CommitFailed(_)), "{e:?}");
        assert!(s.scan_meta(b"", b"", 10).unwrap().is_empty());
        s.set_meta(meta()).wait().unwrap();
        assert_eq!(s.scan_meta(b"", b"", 10).unwrap().len(), 2);
    }

    /// While the disk is full every commit fails, for as long as it lasts (RocksDB refuses
    /// writes until it has recovered): each failure is rolled back on its own and nothing is
    /// latched, so the first commit that succeeds continues every sequence where the last
    /// acknowledged write left it, before and after a reopen.
    #[test]
    fn a_run_of_failed_commits_latches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        let c = direct_conversation(1, 2).unwrap();
        for i in 1..=2 {
            assert_eq!(s.append(msg(c, &format!("m{i}"))).wait().unwrap().seq, i);
        }
        s.inner.db.hooks.fail_commits.store(usize::MAX, SeqCst);
        for round in 0..20 {
            // A client retrying one message, and a burst queued together: several batches,
            // the later ones built on a batch that fails.
            let retry = s.append(msg(c, "m3"));
            let burst: Vec<_> = (0..10)
                .map(|i| s.append(msg(c, &format!("b{round}-{i}"))))
                .collect();
            let read = s.set_read(2, c, 2);
            for r in std::iter::once(retry).chain(burst) {
                let r = r.wait();
                assert!(matches!(r, Err(StorageError::CommitFailed(_))), "{r:?}");
            }
            assert!(read.wait().is_err());
        }
        assert_eq!(s.latest_seq(c).unwrap(), 2);
        assert_eq!(s.read_seq(2, c).unwrap(), 0);

        // Space returns.
        s.inner.db.hooks.fail_commits.store(0, SeqCst);
        let r = s.append(msg(c, "m3")).wait().unwrap();
        assert_eq!((r.seq, r.duplicate), (3, false), "no gap, no stale entry");
        let r = s.append(msg(c, "b0-0")).wait().unwrap();
        assert_eq!((r.seq, r.duplicate), (4, false), "never written before");
        assert_eq!(s.set_read(2, c, 4).wait().unwrap(), 4);
        assert_eq!(seqs(&s, c), vec![1, 2, 3, 4]);
        drop(s);

        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(seqs(&s, c), vec![1, 2, 3, 4]);
        assert_eq!(s.read_seq(2, c).unwrap(), 4);
        let r = s.append(msg(c, "m3")).wait().unwrap();
        assert_eq!((r.seq, r.duplicate), (3, true));
        assert_eq!(s.append(msg(c, "m5")).wait().unwrap().seq, 5);
    }

    /// A scan of the account state stops at the end of its prefix: it does not even step over
    /// the deleted keys that follow it.
    #[test]
    fn meta_scan_reads_nothing_past_the_prefix() {
        use rocksdb::perf::{PerfContext, PerfMetric, PerfStatsLevel, set_perf_stats};

        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        let put = |k: &[u8]| MetaChange {
            key: Bytes::copy_from_slice(k),
            value: Some(Bytes::new()),
        };
        // Keys right after the prefixes "p/" and "q\xff", deleted: tombstones.
        for (first, end) in [(&b"p/"[..], &b"p0"[..]), (b"q\xff", b"r")] {
            let keys: Vec<Vec<u8>> = (0..999)
                .map(|i| [end, format!("/{i:03}").as_bytes()].concat())
                .collect();
            let changes: Vec<_> = keys.iter().map(|k| put(k)).collect();
            s.set_meta(changes).wait().unwrap();
            let mut changes: Vec<_> = keys
                .iter()
                .map(|k| MetaChange {
                    key: Bytes::copy_from_slice(k),
                    value: None,
                })
                .collect();
            changes.push(put(&[first, b"1"].concat()));
            s.set_meta(changes).wait().unwrap();
        }
        s.set_meta(vec![put(b"z")]).wait().unwrap();

        set_perf_stats(PerfStatsLevel::EnableCount);
        let mut ctx = PerfContext::default();
        let skipped = |ctx: &PerfContext| ctx.metric(PerfMetric::InternalDeleteSkippedCount);
        for (prefix, key) in [(&b"p/"[..], &b"p/1"[..]), (b"q\xff", b"q\xff1")] {
            ctx.reset();
            let found = s.scan_meta(prefix, b"", 100).unwrap();
            assert_eq!(found, vec![(Bytes::copy_from_slice(key), Bytes::new())]);
            assert_eq!(skipped(&ctx), 0, "{prefix:?}");
        }
        // Without the bound the same iteration steps over every tombstone.
        ctx.reset();
        let db = &s.inner.db;
        let mut it = db.db.raw_iterator_cf(db.cf(CF_ACCOUNT_META));
        it.seek(b"p/");
        while it.item().is_some_and(|(k, _)| k.starts_with(b"p/")) {
            it.next();
        }
        assert_eq!(it.key(), Some(&b"q\xff1"[..]));
        assert_eq!(skipped(&ctx), 999);
        set_perf_stats(PerfStatsLevel::Disable);
    }

    /// A recall whose target is not committed yet: in the batch being committed (the builder
    /// waits for that commit before it builds the recall), or earlier in the recall's own
    /// batch. If the target's batch fails, the recall finds no such message.
    #[test]
    fn recall_of_an_uncommitted_message() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        let hooks = &s.inner.db.hooks;
        let c = direct_conversation(1, 2).unwrap();
        s.append(msg(c, "m1")).wait().unwrap();
        let recall = |id: &str, seq| AppendRequest {
            recall: Some(seq),
            ..msg(c, id)
        };
        let recalled = |seq| {
            let raw = s.inner.db.message_record(c, seq).unwrap().unwrap();
            let r = decode_record(&raw).unwrap();
            r.recalled && r.payload.is_empty()
        };

        // Batch F (m2) is held by the committer; the recall of m2 waits for it.
        hooks.hold_commits.store(true, SeqCst);
        let received = hooks.received.load(SeqCst);
        let f2 = s.append(msg(c, "m2"));
        wait_until("F held", || hooks.received.load(SeqCst) == received + 1);
        let built = hooks.built.load(SeqCst);
        let r2 = s.append(recall("r2", 2));
        wait_until("recall taken", || s.queue_len() == 0);
        std::thread::sleep(Duration::from_millis(20));
        let built_early = hooks.built.load(SeqCst) != built;
        // Released before asserting: a held committer would hang the store's drop.
        hooks.hold_commits.store(false, SeqCst);
        assert!(!built_early, "built before F committed");
        assert_eq!(f2.wait().unwrap().seq, 2);
        assert_eq!(r2.wait().unwrap().seq, 3);
        assert!(recalled(2));
        assert!(!recalled(1));

        // One batch: m4, its recall, and a second recall of it.
        hooks.hold_build.store(true, SeqCst);
        let f4 = s.append(msg(c, "m4"));
        let r4 = s.append(recall("r4", 4));
        let r4b = s.append(recall("r4b", 4));
        wait_until("ops queued", || s.queue_len() == 2);
        let built = hooks.built.load(SeqCst);
        hooks.hold_build.store(false, SeqCst);
        assert_eq!(f4.wait().unwrap().seq, 4);
        assert_eq!(r4.wait().unwrap().seq, 5);
        assert_eq!(r4b.wait().unwrap().seq, 6);
        assert_eq!(hooks.built.load(SeqCst), built + 1, "one batch");
        assert!(recalled(4));
        let page = s.read_forward(c, 4, 1).unwrap();
        assert_eq!(page[0].client_msg_id, "m4");

        // The target's batch fails: the recall behind it is built on the rolled-back state.
        hooks.hold_commits.store(true, SeqCst);
        let received = hooks.received.load(SeqCst);
        let f7 = s.append(msg(c, "m7"));
        wait_until("F held", || hooks.received.load(SeqCst) == received + 1);
        let r7 = s.append(recall("r7", 7));
        wait_until("recall taken", || s.queue_len() == 0);
        hooks.fail_commits.store(1, SeqCst);
        hooks.hold_commits.store(false, SeqCst);
        assert!(matches!(f7.wait(), Err(StorageError::CommitFailed(_))));
        assert!(matches!(r7.wait(), Err(StorageError::InvalidArgument(_))));
        assert_eq!(s.latest_seq(c).unwrap(), 6);
        let r = s.append(recall("r7", 6)).wait().unwrap();
        assert_eq!((r.seq, r.duplicate), (7, false));
        assert!(recalled(6));
        assert_eq!(seqs(&s, c), (1..=7).collect::<Vec<_>>());
    }

    /// The sequence numbers stored in `c`, ascending.
    fn seqs(s: &RocksStore, c: ConversationId) -> Vec<Seq> {
        s.read_forward(c, 1, 1000)
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect()
    }

    /// The commit counters count batches, their operations, and their sizes and times in
    /// buckets; appends made while a commit is held share batches.
    #[test]
    fn commit_stats_count_batches_and_their_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        let c = direct_conversation(1, 2).unwrap();
        let before = s.commit_stats();
        for i in 1..=3 {
            s.append(msg(c, &format!("a{i}"))).wait().unwrap();
        }
        let after = s.commit_stats();
        assert_eq!(after.commits - before.commits, 3);
        assert_eq!(after.ops - before.ops, 3);
        assert_eq!(after.size_buckets[0] - before.size_buckets[0], 3);
        let timed = |st: &crate::CommitStats| st.micros_buckets.iter().sum::<u64>();
        assert_eq!(timed(&after) - timed(&before), 3);

        // One commit held: the appends that follow wait and are built together.
        let hooks = &s.inner.db.hooks;
        hooks.hold_commits.store(true, SeqCst);
        let received = hooks.received.load(SeqCst);
        let first = s.append(msg(c, "b0"));
        wait_until("held", || hooks.received.load(SeqCst) == received + 1);
        // All twenty are queued before the commit is released: at most one batch (the one the
        // builder hands over next) is built while it is held, the rest make one more.
        let rest: Vec<_> = (1..=20)
            .map(|i| s.append(msg(c, &format!("b{i}"))))
            .collect();
        hooks.hold_commits.store(false, SeqCst);
        first.wait().unwrap();
        for r in rest {
            r.wait().unwrap();
        }
        let end = s.commit_stats();
        assert_eq!(end.ops - after.ops, 21);
        assert!(end.commits - after.commits <= 3, "{end:?}");
        let sized = |st: &crate::CommitStats| st.size_buckets.iter().sum::<u64>();
        assert_eq!(sized(&end), end.commits);
    }

    /// The interval of the spacing tests: long enough that a test's next steps surely happen
    /// within it on a slow machine.
    const SPACING: Duration = Duration::from_secs(1);

    /// A store under fsync (the default) with `min_sync_interval` = [`SPACING`].
    fn spaced_store() -> (tempfile::TempDir, RocksStore) {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            min_sync_interval: SPACING,
            ..StoreOptions::default()
        };
        let s = RocksStore::open(dir.path(), opts).unwrap();
        (dir, s)
    }

    /// Under fsync the builder keeps `min_sync_interval` between commits: an append with no
    /// recent commit is committed at once; one that comes within the interval waits until the
    /// interval has passed, and what is appended meanwhile shares its batch (one sync).
    #[test]
    fn fsync_commits_keep_the_minimum_interval() {
        let (_dir, s) = spaced_store();
        let hooks = &s.inner.db.hooks;
        let c = direct_conversation(1, 2).unwrap();

        // a1 is handed to the committer after this instant, so a2's commit starts at least
        // `SPACING` after it.
        let a1_sent = std::time::Instant::now();
        assert_eq!(s.append(msg(c, "a1")).wait().unwrap().seq, 1);
        assert_eq!(hooks.spaced.load(SeqCst), 0, "nothing to keep apart from");
        let built = hooks.built.load(SeqCst);
        let a2 = s.append(msg(c, "a2"));
        wait_until("a2 waits", || hooks.spaced.load(SeqCst) == 1);
        let rest: Vec<_> = (3..=5)
            .map(|i| s.append(msg(c, &format!("a{i}"))))
            .collect();
        assert_eq!(a2.wait().unwrap().seq, 2);
        assert!(a1_sent.elapsed() >= SPACING, "a2 committed too early");
        for (r, seq) in rest.into_iter().zip(3..) {
            assert_eq!(r.wait().unwrap().seq, seq);
        }
        assert_eq!(hooks.built.load(SeqCst), built + 1, "one batch");

        // Once the interval has passed, the next append does not wait.
        std::thread::sleep(SPACING);
        assert_eq!(s.append(msg(c, "a6")).wait().unwrap().seq, 6);
        assert_eq!(hooks.spaced.load(SeqCst), 1);
        assert_eq!(seqs(&s, c), (1..=6).collect::<Vec<_>>());
    }

    /// A batch that writes nothing (only a repeated append) syncs nothing, so the interval
    /// still counts from the last commit that synced.
    #[test]
    fn a_batch_without_writes_leaves_the_interval_alone() {
        let (_dir, s) = spaced_store();
        let c = direct_conversation(1, 2).unwrap();
        assert_eq!(s.append(msg(c, "a1")).wait().unwrap().seq, 1);
        std::thread::sleep(SPACING);
        let again = s.append(msg(c, "a1")).wait().unwrap();
        assert_eq!((again.seq, again.duplicate), (1, true));
        assert_eq!(s.append(msg(c, "a2")).wait().unwrap().seq, 2);
        assert_eq!(s.inner.db.hooks.spaced.load(SeqCst), 0);
    }

    /// A full batch already queued is committed without waiting for the interval.
    #[test]
    fn a_full_batch_does_not_wait_for_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            min_sync_interval: Duration::from_secs(30),
            max_batch: 2,
            ..StoreOptions::default()
        };
        let s = RocksStore::open(dir.path(), opts).unwrap();
        let hooks = &s.inner.db.hooks;
        let c = direct_conversation(1, 2).unwrap();
        // b0 is held by the builder while b1..b3 queue up: [b0, b1] is built first, then b2
        // is taken with b3 already queued behind it, a full batch.
        hooks.hold_build.store(true, SeqCst);
        let b0 = s.append(msg(c, "b0"));
        wait_until("b0 taken", || s.queue_len() == 0);
        let rest: Vec<_> = (1..=3)
            .map(|i| s.append(msg(c, &format!("b{i}"))))
            .collect();
        hooks.hold_build.store(false, SeqCst);
        assert_eq!(b0.wait().unwrap().seq, 1);
        for (r, seq) in rest.into_iter().zip(2..) {
            assert_eq!(r.wait().unwrap().seq, seq);
        }
        assert_eq!(hooks.spaced.load(SeqCst), 0);
        assert_eq!(seqs(&s, c), (1..=4).collect::<Vec<_>>());
    }

    /// Only fsync syncs per commit, so only fsync keeps the interval; zero turns it off.
    #[test]
    fn only_fsync_keeps_the_minimum_interval() {
        let with = |durability, min_sync_interval| StoreOptions {
            min_sync_interval,
            ..StoreOptions::with_durability(durability)
        };
        let wal = Durability::Wal {
            sync_interval_ms: 5,
        };
        assert_eq!(
            with(Durability::Fsync, SPACING).commit_spacing(),
            Some(SPACING)
        );
        assert_eq!(
            with(Durability::Fsync, Duration::ZERO).commit_spacing(),
            None
        );
        assert_eq!(with(wal, SPACING).commit_spacing(), None);
        assert_eq!(with(Durability::Memory, SPACING).commit_spacing(), None);
        assert_eq!(
            StoreOptions::default().commit_spacing(),
            Some(Duration::from_micros(500))
        );

        // Appends one after another under wal never wait.
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), with(wal, Duration::from_secs(10))).unwrap();
        let c = direct_conversation(1, 2).unwrap();
        for seq in 1..=3 {
            let id = format!("a{seq}");
            assert_eq!(s.append(msg(c, &id)).wait().unwrap().seq, seq);
        }
        assert_eq!(s.inner.db.hooks.spaced.load(SeqCst), 0);
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let t0 = std::time::Instant::now();
        while !cond() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{what}");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// A batch built on top of a batch whose commit fails fails too, and the builder rolls
    /// back to the last committed state: no gap, no reused seq, no stale idempotency entry,
    /// membership or cursor.
    #[test]
    fn failed_commit_fails_batches_built_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        let hooks = &s.inner.db.hooks;
        let c = direct_conversation(1, 2).unwrap();
        for i in 1..=3 {
            assert_eq!(s.append(msg(c, &format!("m{i}"))).wait().unwrap().seq, i);
        }
        assert_eq!(s.set_delivered(2, "phone", c, 1).wait().unwrap(), 1);

        // Batch F: m4 and a new member; the committer holds it.
        hooks.hold_commits.store(true, SeqCst);
        hooks.hold_build.store(true, SeqCst);
        let received = hooks.received.load(SeqCst);
        let f4 = s.append(msg(c, "m4"));
        let fm = s.add_member(7, 2);
        wait_until("both ops queued", || s.queue_len() == 1);
        hooks.hold_build.store(false, SeqCst);
        wait_until("F held", || hooks.received.load(SeqCst) == received + 1);

        // Batch F+1, built on top of F: m5 gets seq 5, the member is already there, the
        // cursor moves to seq 4, a retry of m4 is a duplicate.
        let built = hooks.built.load(SeqCst);
        hooks.hold_build.store(true, SeqCst);
        let f5 = s.append(msg(c, "m5"));
        let fm2 = s.add_member(7, 2);
        let fd = s.set_delivered(2, "phone", c, 10);
        let f4b = s.append(msg(c, "m4"));
        wait_until("F+1 ops queued", || s.queue_len() == 3);
        hooks.hold_build.store(false, SeqCst);
        wait_until("F+1 built", || hooks.built.load(SeqCst) == built + 1);

        hooks.fail_commits.store(1, SeqCst);
        hooks.hold_commits.store(false, SeqCst);
        for (what, r) in [
            ("m4", f4.wait().map(|_| ())),
            ("member", fm.wait().map(|_| ())),
            ("m5", f5.wait().map(|_| ())),
            ("member again", fm2.wait().map(|_| ())),
            ("cursor", fd.wait().map(|_| ())),
            ("m4 retry", f4b.wait().map(|_| ())),
        ] {
            assert!(
                matches!(r, Err(StorageError::CommitFailed(_))),
                "{what}: {r:?}"
            );
        }
        assert_eq!(hooks.fail_commits.load(SeqCst), 0);

        // Nothing of F or F+1 is visible, and the builder starts again from seq 3.
        assert_eq!(s.latest_seq(c).unwrap(), 3);
        assert!(s.members(7, 0, 10).unwrap().is_empty());
        assert_eq!(s.delivered(2, "phone", c).unwrap(), 1);
        let r = s.append(msg(c, "m5")).wait().unwrap();
        assert_eq!((r.seq, r.duplicate), (4, false));
        let r = s.append(msg(c, "m4")).wait().unwrap();
        assert_eq!((r.seq, r.duplicate), (5, false), "no stale dedup entry");
        let r = s.append(msg(c, "m4")).wait().unwrap();
        assert_eq!((r.seq, r.duplicate), (5, true));
        assert!(s.add_member(7, 2).wait().unwrap());
        assert_eq!(s.set_delivered(2, "phone", c, 10).wait().unwrap(), 5);
        assert_eq!(seqs(&s, c), vec![1, 2, 3, 4, 5]);

        // And after a restart.
        drop(s);
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(s.latest_seq(c).unwrap(), 5);
        let r = s.append(msg(c, "m4")).wait().unwrap();
        assert_eq!((r.seq, r.duplicate), (5, true));
        assert_eq!(s.append(msg(c, "m6")).wait().unwrap().seq, 6);
    }

    /// An append to group `g`'s conversation carrying a change of it.
    fn group_msg(
        g: GroupId,
        id: &str,
        record: Option<&'static str>,
        members: &[(UserId, Option<&'static str>)],
    ) -> AppendRequest {
        AppendRequest {
            conversation: group_conversation(g).unwrap(),
            sender: 1,
            client_msg_id: id.to_owned(),
            payload: Bytes::from_static(b"event"),
            group_change: Some(Box::new(GroupChange {
                group: g,
                record: record.map(Bytes::from),
                members: members
                    .iter()
                    .map(|&(u, a)| (u, a.map(Bytes::from)))
                    .collect(),
                joiners_read_history: false,
            })),
            ..AppendRequest::default()
        }
    }

    /// The group's members with their attributes, as `user=attributes` separated by spaces.
    fn attrs(s: &RocksStore, g: GroupId) -> String {
        let members: Vec<String> = s
            .member_records(g, 0, 100)
            .unwrap()
            .iter()
            .map(|(u, a)| format!("{u}={}", String::from_utf8_lossy(a)))
            .collect();
        members.join(" ")
    }

    /// A group change whose commit fails leaves nothing behind: not in the database, not in
    /// the builder's membership and user-conversation caches, not in the idempotency index.
    #[test]
    fn failed_commit_rolls_back_a_group_change() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        let g = 5;
        let conv = group_conversation(g).unwrap();
        let created = s
            .append(group_msg(g, "create", Some("v1"), &[(1, Some("owner"))]))
            .wait()
            .unwrap();
        let change = || group_msg(g, "change", Some("v2"), &[(1, None), (2, Some("new"))]);

        s.inner.db.hooks.fail_commits.store(1, SeqCst);
        let e = s.append(change()).wait().unwrap_err();
        assert!(matches!(e, StorageError::CommitFailed(_)), "{e:?}");
        assert_eq!(s.latest_seq(conv).unwrap(), 1);
        assert_eq!(s.group_record(g).unwrap(), Some(Bytes::from_static(b"v1")));
        assert_eq!(attrs(&s, g), "1=owner");
        assert_eq!(s.groups_of(1).unwrap(), vec![g]);
        assert!(s.groups_of(2).unwrap().is_empty());
        assert_eq!(s.membership(1, g).unwrap(), Some(0));
        assert_eq!(s.membership(2, g).unwrap(), None);
        let i = s.conversations_changed_since(1, 0, None).unwrap();
        assert_eq!((i[0].active, i[0].left_seq), (true, 0));
        assert_eq!(i[0].last_version, created.version);

        // The builder's membership cache was rolled back: 1 still is a member, 2 is not.
        assert!(!s.add_member(g, 1).wait().unwrap());
        assert!(s.add_member(g, 2).wait().unwrap());
        assert!(s.remove_member(g, 2).wait().unwrap());
        // The retry is applied in full, under the next seq.
        let r = s.append(change()).wait().unwrap();
        assert_eq!((r.seq, r.duplicate), (2, false));
        assert_eq!(s.group_record(g).unwrap(), Some(Bytes::from_static(b"v2")));
        assert_eq!(attrs(&s, g), "2=new");
        assert_eq!(s.membership(1, g).unwrap(), Some(2));
        assert_eq!(s.membership(2, g).unwrap(), Some(0));
        assert_eq!(
            s.inner
                .db
                .user_conv(2, conv)
                .unwrap()
                .unwrap()
                .member_version,
            r.version,
            "a join"
        );
    }

    /// A failed batch with a group change, and a batch built on top of it that relied on the
    /// change (an attribute update of the new member, the member's removal and a new join):
    /// both fail, and the builder forgets the membership they left it with.
    #[test]
    fn failed_commit_rolls_back_group_changes_built_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        let hooks = &s.inner.db.hooks;
        let g = 8;
        let conv = group_conversation(g).unwrap();

        // Batch F: user 2 joins; the committer holds it.
        hooks.hold_commits.store(true, SeqCst);
        let received = hooks.received.load(SeqCst);
        let f = s.append(group_msg(g, "join", Some("v1"), &[(2, Some("a"))]));
        wait_until("F held", || hooks.received.load(SeqCst) == received + 1);

        // Batch F+1, built on F: to the builder, 2 is a member.
        let built = hooks.built.load(SeqCst);
        hooks.hold_build.store(true, SeqCst);
        let f1 = s.append(group_msg(g, "promote", None, &[(2, Some("b"))]));
        let f2 = s.remove_member(g, 2);
        let f3 = s.add_member(g, 2);
        wait_until("F+1 ops queued", || s.queue_len() == 2);
        hooks.hold_build.store(false, SeqCst);
        wait_until("F+1 built", || hooks.built.load(SeqCst) == built + 1);

        hooks.fail_commits.store(1, SeqCst);
        hooks.hold_commits.store(false, SeqCst);
        for (what, r) in [
            ("join", f.wait().map(|_| ())),
            ("promote", f1.wait().map(|_| ())),
            ("remove", f2.wait().map(|_| ())),
            ("join again", f3.wait().map(|_| ())),
        ] {
            assert!(
                matches!(r, Err(StorageError::CommitFailed(_))),
                "{what}: {r:?}"
            );
        }

        assert_eq!(s.latest_seq(conv).unwrap(), 0);
        assert_eq!(s.group_record(g).unwrap(), None);
        assert_eq!(attrs(&s, g), "");
        assert!(s.groups_of(2).unwrap().is_empty());
        assert_eq!(s.membership(2, g).unwrap(), None);
        assert!(
            s.conversations_changed_since(2, 0, None)
                .unwrap()
                .is_empty()
        );

        // The same attribute update now is a join, and the removal finds no member.
        assert!(!s.remove_member(g, 2).wait().unwrap());
        let r = s
            .append(group_msg(g, "promote", None, &[(2, Some("b"))]))
            .wait()
            .unwrap();
        assert_eq!((r.seq, r.duplicate), (1, false));
        assert_eq!(attrs(&s, g), "2=b");
        assert_eq!(s.membership(2, g).unwrap(), Some(0));
        let i = s.conversations_changed_since(2, 0, None).unwrap();
        assert_eq!((i[0].conversation, i[0].active), (conv, true));
        assert!(s.remove_member(g, 2).wait().unwrap());
        assert_eq!(s.membership(2, g).unwrap(), Some(1));
    }

    /// Changing a member's attributes is not a join: the member's record keeps its version.
    #[test]
    fn attribute_update_keeps_member_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        let g = 3;
        let conv = group_conversation(g).unwrap();
        let joined = s
            .append(group_msg(g, "join", None, &[(4, Some("a"))]))
            .wait()
            .unwrap();
        let rec = s.inner.db.user_conv(4, conv).unwrap().unwrap();
        assert_eq!(rec.member_version, joined.version);
        s.append(group_msg(g, "update", None, &[(4, Some("b"))]))
            .wait()
            .unwrap();
        assert_eq!(s.inner.db.user_conv(4, conv).unwrap().unwrap(), rec);
        assert_eq!(attrs(&s, g), "4=b");
    }

    /// A directory written before the `relations` and `profiles` column families, the settings
    /// and recall existed (34-byte user-conversation records, version 1 message records)
    /// opens: the column families are created, old records read with default settings, and
    /// are rewritten in the current forms on their next change.
    #[test]
    fn opens_a_directory_without_the_relations_and_profiles_column_families() {
        let dir = tempfile::tempdir().unwrap();
        let c = direct_conversation(1, 2).unwrap();
        let new_cfs = [CF_RELATIONS, CF_PROFILES];
        {
            let mut o = Options::default();
            o.create_if_missing(true);
            o.create_missing_column_families(true);
            let old: Vec<&str> = ALL_CFS
                .into_iter()
                .filter(|n| !new_cfs.contains(n))
                .collect();
            let db = DB::open_cf(&o, dir.path(), &old).unwrap();
            let cf = |n: &str| db.cf_handle(n).unwrap();
            db.put_cf(cf(CF_META), META_FORMAT, FORMAT_VERSION.to_le_bytes())
                .unwrap();
            db.put_cf(cf(CF_META), META_VERSION, encode_u64(5)).unwrap();
            let mut rec = Vec::new();
            crate::record::encode_record(
                &crate::record::MessageRecord {
                    version: 5,
                    sender: 1,
                    timestamp_ms: 1000,
                    content_type: 1,
                    client_msg_id: "old",
                    custom_type: "",
                    payload: b"old body",
                    recalled: false,
                },
                &mut rec,
            );
            assert_eq!(rec[0], 1);
            db.put_cf(cf(CF_MESSAGES), msg_key(c, 1), &rec).unwrap();
            for user in [1, 2] {
                let uc = UserConvRecord {
                    active: true,
                    member_version: 4,
                    read_seq: 1,
                    read_version: 5,
                    ..UserConvRecord::default()
                }
                .encode();
                db.put_cf(cf(CF_USER_CONVS), pair_key(user, c), &uc[..34])
                    .unwrap();
            }
        }
        let listed = || DB::list_cf(&Options::default(), dir.path()).unwrap();
        assert!(new_cfs.iter().all(|n| !listed().contains(&n.to_string())));

        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(
            s.conversation_settings(1, c).unwrap(),
            ConversationSettings::default()
        );
        assert_eq!(s.read_seq(1, c).unwrap(), 1);
        let i = s.conversations_changed_since(1, 0, None).unwrap();
        assert_eq!((i[0].last_version, i[0].settings), (5, Default::default()));
        assert_eq!(s.relation(1, RelationKind::Friend, 2).unwrap(), None);
        assert_eq!(s.count_relations(1, RelationKind::Friend).unwrap(), 0);
        assert_eq!(s.user_profile(1).unwrap(), None);
        let m = &s.read_forward(c, 1, 1).unwrap()[0];
        assert!(!m.recalled);
        assert_eq!((&m.payload[..], m.version), (&b"old body"[..], 5));

        let pinned = ConversationSettings {
            pinned: true,
            ..ConversationSettings::default()
        };
        s.set_conversation_settings(1, c, pinned.into())
            .wait()
            .unwrap();
        let r = s
            .append(AppendRequest {
                recall: Some(1),
                ..msg(c, "r1")
            })
            .wait()
            .unwrap();
        assert_eq!(r.seq, 2);
        s.set_relations(vec![RelationChange {
            user: 1,
            kind: RelationKind::Friend,
            other: 2,
            value: Some(Bytes::from_static(b"since")),
        }])
        .wait()
        .unwrap();
        s.set_user_profile(1, Bytes::from_static(b"me"))
            .wait()
            .unwrap();
        drop(s);

        assert!(new_cfs.iter().all(|n| listed().contains(&n.to_string())));
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        let raw = |user| {
            let db = &s.inner.db;
            db.db
                .get_cf(db.cf(CF_USER_CONVS), pair_key(user, c))
                .unwrap()
                .unwrap()
                .len()
        };
        assert_eq!((raw(1), raw(2)), (67, 34), "rewritten on change only");
        // Read up to the recall notice user 1 sent.
        let uc = s.inner.db.user_conv(1, c).unwrap().unwrap();
        assert_eq!((uc.read_seq, uc.member_version), (2, 4));
        assert_eq!(s.conversation_settings(1, c).unwrap(), pinned);
        assert_eq!(
            s.conversation_settings(2, c).unwrap(),
            ConversationSettings::default()
        );
        let m = &s.read_forward(c, 1, 1).unwrap()[0];
        assert!(m.recalled && m.payload.is_empty());
        assert_eq!(
            (m.version, m.timestamp_ms, m.client_msg_id.as_str()),
            (5, 1000, "old")
        );
        assert_eq!(
            s.relation(1, RelationKind::Friend, 2).unwrap(),
            Some(Bytes::from_static(b"since"))
        );
        assert_eq!(s.user_profile(1).unwrap(), Some(Bytes::from_static(b"me")));
    }

    /// A directory written before the `account_meta` column family existed opens: the column
    /// family is created, and the store's own `meta` counters are untouched by it.
    #[test]
    fn opens_a_directory_without_the_account_meta_column_family() {
        let dir = tempfile::tempdir().unwrap();
        let c = direct_conversation(1, 2).unwrap();
        {
            let mut o = Options::default();
            o.create_if_missing(true);
            o.create_missing_column_families(true);
            let old: Vec<&str> = ALL_CFS
                .into_iter()
                .filter(|&n| n != CF_ACCOUNT_META)
                .collect();
            let db = DB::open_cf(&o, dir.path(), &old).unwrap();
            let cf = |n: &str| db.cf_handle(n).unwrap();
            db.put_cf(cf(CF_META), META_FORMAT, FORMAT_VERSION.to_le_bytes())
                .unwrap();
            db.put_cf(cf(CF_META), META_VERSION, encode_u64(7)).unwrap();
            db.put_cf(cf(CF_META), META_NEXT_USER, encode_u64(3))
                .unwrap();
            db.put_cf(cf(CF_PROFILES), 1u64.to_be_bytes(), b"me")
                .unwrap();
        }
        let listed = || DB::list_cf(&Options::default(), dir.path()).unwrap();
        assert!(!listed().contains(&CF_ACCOUNT_META.to_owned()));

        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(s.meta(b"version").unwrap(), None);
        assert!(s.scan_meta(b"", b"", 10).unwrap().is_empty());
        assert_eq!(s.user_profile(1).unwrap(), Some(Bytes::from_static(b"me")));
        s.set_meta(vec![MetaChange {
            key: Bytes::from_static(b"ban/1"),
            value: Some(Bytes::from_static(b"yes")),
        }])
        .wait()
        .unwrap();
        let r = s.append(msg(c, "m1")).wait().unwrap();
        assert_eq!((r.seq, r.version), (1, 8));
        assert_eq!(s.intern_user("carol").unwrap(), 3);
        drop(s);

        assert!(listed().contains(&CF_ACCOUNT_META.to_owned()));
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(s.meta(b"ban/1").unwrap(), Some(Bytes::from_static(b"yes")));
        assert_eq!(s.inner.db.meta_version().unwrap(), 8);
        assert_eq!(s.intern_user("dave").unwrap(), 4);
    }

    /// A directory written before the `groups` column family existed (and with 26-byte
    /// user-conversation records) opens: the column family is created, and the old records
    /// read with `left_seq` 0.
    #[test]
    fn opens_a_directory_without_the_groups_column_family() {
        let dir = tempfile::tempdir().unwrap();
        let (g, user) = (4, 9);
        let conv = group_conversation(g).unwrap();
        {
            let mut o = Options::default();
            o.create_if_missing(true);
            o.create_missing_column_families(true);
            let old: Vec<&str> = ALL_CFS.into_iter().filter(|&n| n != CF_GROUPS).collect();
            let db = DB::open_cf(&o, dir.path(), &old).unwrap();
            let cf = |n: &str| db.cf_handle(n).unwrap();
            db.put_cf(cf(CF_META), META_FORMAT, FORMAT_VERSION.to_le_bytes())
                .unwrap();
            db.put_cf(cf(CF_META), META_VERSION, encode_u64(1)).unwrap();
            db.put_cf(cf(CF_MEMBERS), pair_key(g, user), b"").unwrap();
            db.put_cf(cf(CF_USER_GROUPS), pair_key(user, g), b"")
                .unwrap();
            let short = &UserConvRecord {
                active: true,
                member_version: 1,
                ..UserConvRecord::default()
            }
            .encode()[..26];
            db.put_cf(cf(CF_USER_CONVS), pair_key(user, conv), short)
                .unwrap();
        }
        assert!(
            !DB::list_cf(&Options::default(), dir.path())
                .unwrap()
                .contains(&CF_GROUPS.to_owned())
        );

        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(s.group_record(g).unwrap(), None);
        assert_eq!(
            s.member_records(g, 0, 10).unwrap(),
            vec![(user, Bytes::new())]
        );
        assert_eq!(s.membership(user, g).unwrap(), Some(0));
        let i = s.conversations_changed_since(user, 0, None).unwrap();
        assert_eq!(
            (i[0].active, i[0].left_seq, i[0].last_version),
            (true, 0, 1)
        );
        let r = s
            .append(group_msg(g, "kick", Some("rec"), &[(user, None)]))
            .wait()
            .unwrap();
        assert!(r.version > 1);
        drop(s);

        assert!(
            DB::list_cf(&Options::default(), dir.path())
                .unwrap()
                .contains(&CF_GROUPS.to_owned())
        );
        let s = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(s.group_record(g).unwrap(), Some(Bytes::from_static(b"rec")));
        assert_eq!(s.membership(user, g).unwrap(), Some(1));
        assert!(s.members(g, 0, 10).unwrap().is_empty());
    }
}
