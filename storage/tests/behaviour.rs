//! The behavioural suite against both implementations.

mod suite;

use suite::Fixture;
use tern_storage::{DedupWindow, Durability, MemStore, RocksStore, StoreOptions};

fn mem(window: DedupWindow) -> Fixture {
    Fixture {
        store: Box::new(MemStore::new(window)),
        _keep: None,
    }
}

fn rocks(window: DedupWindow) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = StoreOptions::with_durability(Durability::Fsync);
    opts.dedup_window = window;
    Fixture {
        store: Box::new(RocksStore::open(dir.path(), opts).unwrap()),
        _keep: Some(dir),
    }
}

mod mem_store {
    crate::suite!(super::mem);
}

mod rocks_store {
    crate::suite!(super::rocks);
}
