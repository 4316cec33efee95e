//! A hash map that grows in small steps.
//!
//! A `HashMap` doubles when it fills: it allocates twice the memory and rehashes every entry in
//! one go. The writer's maps hold up to a million entries, so one such step took 50–80 ms of
//! the writer thread (rehashing and faulting in the new pages), during which no batch was built
//! and every append waited. Split into [`SHARDS`] maps, a step moves at most 1/[`SHARDS`] of the
//! entries, and the shards, filling at random, reach their steps at different times. The more
//! shards, the more their sizes differ relative to their average, and the wider those times
//! spread: with 64 shards, at 200,000 appends a second, the steps of one doubling still came
//! within about 100 ms of each other; with 1,024 they spread over most of a second.

use std::borrow::Borrow;
use std::hash::Hash;

/// Number of maps an index is split into.
pub(crate) const SHARDS: usize = 1024;

// ahash: fast, and randomly keyed so client-chosen keys cannot be used for hash flooding.
type Map<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;

#[derive(Debug)]
pub(crate) struct ShardedMap<K, V> {
    hasher: ahash::RandomState,
    shards: Vec<Map<K, V>>,
    len: usize,
}

impl<K: Hash + Eq, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        let hasher = ahash::RandomState::new();
        ShardedMap {
            shards: (0..SHARDS)
                .map(|_| Map::with_hasher(hasher.clone()))
                .collect(),
            hasher,
            len: 0,
        }
    }
}

impl<K: Hash + Eq, V> ShardedMap<K, V> {
    /// The shard of `key`, in `0..SHARDS`. Taken from the middle of the hash: a shard's map
    /// uses the low bits for the bucket and the top seven as the bucket's tag, and neither must
    /// be the same for all of a shard's keys.
    fn shard_of<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        (self.hasher.hash_one(key) >> 32) as usize % SHARDS
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard_of(key)].get(key)
    }

    #[cfg(feature = "store")]
    pub(crate) fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let shard = self.shard_of(key);
        self.shards[shard].get_mut(key)
    }

    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let shard = self.shard_of(&key);
        let old = self.shards[shard].insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let shard = self.shard_of(key);
        let old = self.shards[shard].remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    #[cfg(feature = "store")]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[cfg(feature = "store")]
    pub(crate) fn clear(&mut self) {
        for s in &mut self.shards {
            *s = Map::with_hasher(self.hasher.clone());
        }
        self.len = 0;
    }

    /// The largest capacity of one shard (what a growth step rehashes at most).
    #[cfg(test)]
    pub(crate) fn max_shard_capacity(&self) -> usize {
        self.shards.iter().map(Map::capacity).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_as_one_map_and_grows_in_small_steps() {
        let mut m = ShardedMap::<Vec<u8>, u64>::default();
        for i in 0..100_000u64 {
            assert_eq!(m.insert(i.to_be_bytes().to_vec(), i), None);
        }
        assert_eq!(m.len(), 100_000);
        assert_eq!(m.insert(7u64.to_be_bytes().to_vec(), 70), Some(7));
        assert_eq!(m.len(), 100_000);
        // Lookups by the borrowed form.
        assert_eq!(m.get(&7u64.to_be_bytes()[..]), Some(&70));
        assert_eq!(m.get(&99_999u64.to_be_bytes()[..]), Some(&99_999));
        assert_eq!(m.get(&100_000u64.to_be_bytes()[..]), None);
        assert_eq!(m.remove(&5u64.to_be_bytes()[..]), Some(5));
        assert_eq!(m.remove(&5u64.to_be_bytes()[..]), None);
        assert_eq!(m.len(), 99_999);
        // One map would have 131,072 buckets here; an even spread gives a shard ~98 entries,
        // and none has outgrown 512 buckets (448 entries).
        assert!(m.max_shard_capacity() <= 448, "{}", m.max_shard_capacity());
        m.clear();
        assert_eq!(m.len(), 0);
        assert_eq!(m.get(&7u64.to_be_bytes()[..]), None);
        assert_eq!(m.max_shard_capacity(), 0);
    }
}
