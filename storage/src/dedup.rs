//! The in-memory idempotency index shared by both stores.

use std::collections::VecDeque;
use std::hash::Hasher;
use std::time::Duration;

use siphasher::sip128::{Hasher128, SipHasher13};

use crate::ids::{ConversationId, Seq, UserId};
use crate::sharded::ShardedMap;

/// Entries of the eviction order allocated up front (at most; fewer with a smaller window):
/// the order then never doubles and copies a full queue while appends wait. Untouched, the
/// reservation costs address space, not memory.
const ORDER_RESERVE: usize = 1 << 20;

/// How long an idempotent append is remembered.
///
/// A retry of `(sender, client_msg_id)` is recognised as a duplicate if and only if
///
/// * the original append was committed (acknowledged, or committed just before a crash),
/// * the original's server time is at most `max_age` before the retry is processed, and
/// * fewer than `max_entries` idempotent appends (any sender) were committed after it.
///
/// Both stores apply the same rule, and [`crate::RocksStore`] rebuilds the index from its
/// dedup journal when it opens, so the window survives restarts and crashes. Appends with an
/// empty client message id are never de-duplicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupWindow {
    /// Maximum number of remembered appends (default 1,000,000; about 100 bytes of memory
    /// each, whatever the length of the id).
    pub max_entries: usize,
    /// Maximum age of a remembered append (default 24 h).
    pub max_age: Duration,
}

impl Default for DedupWindow {
    fn default() -> Self {
        DedupWindow {
            max_entries: 1_000_000,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// Where an idempotent append was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DedupEntry {
    pub conv: ConversationId,
    pub seq: Seq,
    pub time_ms: u64,
    pub version: u64,
}

/// What identifies a remembered append: a 128-bit SipHash-1-3 of (sender, client message id)
/// under a key drawn at random for each index ([`DedupIndex::key`]).
///
/// Holding a fixed-size fingerprint instead of the id keeps an entry's size independent of the
/// id's length and spares the writer an allocation, a free and a string compare per append.
/// Two different ids of one index share a fingerprint with a probability of about
/// n² / 2¹²⁹ (10⁻²⁷ for the million entries of the default window), and without the key,
/// which never leaves the process, a client cannot choose ids that collide. The index is
/// rebuilt from the dedup journal, which stores the ids, whenever the store opens.
pub(crate) type DedupKey = u128;

#[derive(Debug)]
pub(crate) struct DedupIndex {
    window: DedupWindow,
    /// The SipHash key of [`DedupIndex::key`].
    hash_key: (u64, u64),
    /// Sharded: it holds up to `max_entries` (a million by default) and must not stall the
    /// writer while it grows.
    map: ShardedMap<DedupKey, DedupEntry>,
    /// Insertion order (= version order) for eviction.
    order: VecDeque<(DedupKey, u64 /* time */, u64 /* version */)>,
}

impl DedupIndex {
    pub fn new(window: DedupWindow) -> Self {
        DedupIndex {
            window,
            hash_key: rand::random(),
            map: ShardedMap::default(),
            order: VecDeque::with_capacity(window.max_entries.min(ORDER_RESERVE)),
        }
    }

    /// The key of `sender`'s append with `client_msg_id` in this index.
    pub fn key(&self, sender: UserId, client_msg_id: &str) -> DedupKey {
        let mut h = SipHasher13::new_with_keys(self.hash_key.0, self.hash_key.1);
        // The sender has a fixed width, so (sender, id) pairs cannot run into each other.
        h.write_u64(sender);
        h.write(client_msg_id.as_bytes());
        h.finish128().as_u128()
    }

    fn max_age_ms(&self) -> u64 {
        u64::try_from(self.window.max_age.as_millis()).unwrap_or(u64::MAX)
    }

    pub fn get(&self, key: &DedupKey, now_ms: u64) -> Option<DedupEntry> {
        let e = self.map.get(key)?;
        (e.time_ms.saturating_add(self.max_age_ms()) >= now_ms).then_some(*e)
    }

    pub fn insert(&mut self, key: DedupKey, e: DedupEntry) {
        if self.window.max_entries == 0 {
            return;
        }
        // Evict first, so the order never holds more than `max_entries` (nor outgrows its
        // reservation).
        while self.order.len() >= self.window.max_entries {
            self.pop_front();
        }
        self.order.push_back((key, e.time_ms, e.version));
        self.map.insert(key, e);
    }

    /// Drops entries that left the window by age.
    pub fn evict_old(&mut self, now_ms: u64) {
        let age = self.max_age_ms();
        while let Some((_, t, _)) = self.order.front() {
            if t.saturating_add(age) >= now_ms {
                break;
            }
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((k, _, _)) = self.order.pop_front() {
            self.map.remove(&k);
        }
    }

    /// Forgets entries with version ≥ `from_version` (a failed batch).
    #[cfg(feature = "store")]
    pub fn rollback(&mut self, from_version: u64) {
        while let Some((_, _, v)) = self.order.back() {
            if *v < from_version {
                break;
            }
            if let Some((k, _, _)) = self.order.pop_back() {
                self.map.remove(&k);
            }
        }
    }

    /// Version of the oldest remembered entry.
    #[cfg(feature = "store")]
    pub fn oldest_version(&self) -> Option<u64> {
        self.order.front().map(|(_, _, v)| *v)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(seq: u64, t: u64) -> DedupEntry {
        DedupEntry {
            conv: 1,
            seq,
            time_ms: t,
            version: seq,
        }
    }

    #[test]
    fn window_by_count_age_and_rollback() {
        let mut d = DedupIndex::new(DedupWindow {
            max_entries: 2,
            max_age: Duration::from_millis(100),
        });
        let (a, b, c) = (d.key(1, "a"), d.key(1, "b"), d.key(1, "c"));
        d.insert(a, e(1, 1000));
        d.insert(b, e(2, 1000));
        assert_eq!(d.get(&a, 1000), Some(e(1, 1000)));
        d.insert(c, e(3, 1050));
        assert_eq!(d.get(&a, 1050), None, "evicted by count");
        assert_eq!(d.get(&b, 1100), Some(e(2, 1000)), "exactly max_age old");
        assert_eq!(d.get(&b, 1101), None, "older than max_age");
        d.evict_old(1101);
        assert_eq!(d.len(), 1);
        assert_eq!(d.oldest_version(), Some(3));
        d.rollback(3);
        assert_eq!(d.len(), 0);
        assert_eq!(d.get(&c, 1050), None);
    }

    #[test]
    fn keys_tell_senders_and_ids_apart_and_differ_between_indexes() {
        let d = DedupIndex::new(DedupWindow::default());
        assert_eq!(d.key(1, "m1"), d.key(1, "m1"));
        let keys = [
            d.key(1, "m1"),
            d.key(2, "m1"),
            d.key(1, "m1 "),
            d.key(1, ""),
            d.key(0, ""),
        ];
        for (i, x) in keys.iter().enumerate() {
            for y in &keys[i + 1..] {
                assert_ne!(x, y);
            }
        }
        // Each index draws its own hash key, so fingerprints cannot be precomputed.
        let other = DedupIndex::new(DedupWindow::default());
        assert_ne!(d.key(1, "m1"), other.key(1, "m1"));
    }

    #[test]
    fn a_full_window_keeps_its_reservation() {
        let mut d = DedupIndex::new(DedupWindow {
            max_entries: 100,
            max_age: Duration::from_secs(60),
        });
        let reserved = d.order.capacity();
        assert!(reserved >= 100);
        for i in 0..1_000u64 {
            d.insert(d.key(1, &format!("m{i}")), e(i + 1, 1000));
        }
        assert_eq!(d.len(), 100);
        assert_eq!(d.order.capacity(), reserved);
        assert_eq!(d.oldest_version(), Some(901));
        assert_eq!(d.get(&d.key(1, "m899"), 1000), None);
        assert_eq!(d.get(&d.key(1, "m900"), 1000), Some(e(901, 1000)));
    }
}
