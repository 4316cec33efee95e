//! Storage micro-benchmarks: append throughput per durability policy and batch size,
//! 50-message page reads, and a sync's read of a user's 1,000 conversations. Run with
//! `cargo bench -p tern-benches --bench storage`.
//!
//! A "batch" of N is N appends (to N different conversations) submitted together and then
//! awaited, so the writer thread sees up to N queued appends per commit. Bodies are 200
//! bytes. Sustained throughput at high concurrency and latency percentiles under a fixed
//! rate are measured by `storage/examples/append_load.rs` (see docs/PERFORMANCE.md).

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tern_storage::{
    AppendRequest, Durability, MessageStore, RocksStore, StoreOptions, direct_conversation,
    group_conversation,
};

const BODY: usize = 200;
const CONVS: u64 = 10_000;

fn request(n: u64, body: &Bytes) -> AppendRequest {
    AppendRequest {
        conversation: group_conversation(n % CONVS + 1).unwrap(),
        sender: n % 1000 + 1,
        client_msg_id: format!("b-{n}"),
        content_type: 1,
        custom_type: String::new(),
        payload: body.clone(),
        participants: Vec::new(),
        group_change: None,
        recall: None,
    }
}

fn append(c: &mut Criterion) {
    let body = Bytes::from(vec![0x5a; BODY]);
    let mut g = c.benchmark_group("storage_append");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (name, policy) in [
        ("fsync", Durability::Fsync),
        (
            "wal",
            Durability::Wal {
                sync_interval_ms: 10,
            },
        ),
        ("memory", Durability::Memory),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path(), StoreOptions::with_durability(policy)).unwrap();
        let mut n = 0u64;
        for batch in [1u64, 64, 512] {
            g.throughput(Throughput::Elements(batch));
            g.bench_function(BenchmarkId::new(name, batch), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let pending: Vec<_> = (0..batch)
                            .map(|_| {
                                n += 1;
                                store.append(request(n, &body))
                            })
                            .collect();
                        for p in pending {
                            black_box(p.wait().unwrap());
                        }
                    }
                    start.elapsed()
                })
            });
        }
        store.close().unwrap();
    }
    g.finish();
}

fn reads(c: &mut Criterion) {
    let body = Bytes::from(vec![0x5a; BODY]);
    let dir = tempfile::tempdir().unwrap();
    let conv = group_conversation(1).unwrap();
    let fill = |store: &RocksStore| {
        let mut pending = Vec::new();
        for n in 0..100_000u64 {
            // Every tenth message goes to the measured conversation, the rest elsewhere.
            let mut r = request(n, &body);
            if n % 10 == 0 {
                r.conversation = conv;
            }
            pending.push(store.append(r));
            if pending.len() == 4096 {
                pending.drain(..).for_each(|p| {
                    p.wait().unwrap();
                });
            }
        }
        pending.into_iter().for_each(|p| {
            p.wait().unwrap();
        });
    };
    let mut g = c.benchmark_group("storage_read_page_50");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(50));
    for stage in ["memtable", "sst"] {
        let store = RocksStore::open(
            dir.path(),
            StoreOptions::with_durability(Durability::Memory),
        )
        .unwrap();
        if stage == "memtable" {
            fill(&store);
        }
        let latest = store.latest_seq(conv).unwrap();
        assert_eq!(latest, 10_000);
        let mut i = 0u64;
        g.bench_function(BenchmarkId::new("forward", stage), |b| {
            b.iter(|| {
                i = (i + 97) % (latest - 50);
                let page = store.read_forward(conv, i + 1, 50).unwrap();
                assert_eq!(page.len(), 50);
                black_box(page)
            })
        });
        g.bench_function(BenchmarkId::new("backward", stage), |b| {
            b.iter(|| {
                i = (i + 97) % (latest - 50);
                let page = store.read_backward(conv, i + 51, 50).unwrap();
                assert_eq!(page.len(), 50);
                black_box(page)
            })
        });
        // Closing flushes the memtables (Memory policy), so the next stage reads SST files
        // through the block cache.
        store.close().unwrap();
    }
    g.finish();
}

/// What a login with sync reads: a user's conversations changed since a version, and the
/// user's version. One pass over one snapshot (`sync_view`), against the two passes of asking
/// for the version and then for the conversations. The user has 1,000 conversations: 900 1:1
/// (each also reads the peer's read position) and 100 groups, 10 messages each, 100 of them
/// changed since the device's version.
fn sync_reads(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = RocksStore::open(
        dir.path(),
        StoreOptions::with_durability(Durability::Memory),
    )
    .unwrap();
    let user = 1;
    let convs: Vec<(u64, u64)> = (0..1000u64)
        .map(|i| match i {
            0..900 => (direct_conversation(user, i + 2).unwrap(), i + 2),
            _ => {
                let g = i - 899;
                assert!(store.add_member(g, user).wait().unwrap());
                (group_conversation(g).unwrap(), 5000 + i)
            }
        })
        .collect();
    let mut since = 0;
    for round in 0..10u64 {
        if round == 9 {
            since = store.user_version(user).unwrap();
        }
        let pending: Vec<_> = convs
            .iter()
            .enumerate()
            .filter(|(i, _)| round < 9 || i % 10 == 0)
            .map(|(i, &(conv, peer))| {
                store.append(AppendRequest {
                    conversation: conv,
                    sender: peer,
                    client_msg_id: format!("s-{round}-{i}"),
                    content_type: 1,
                    payload: Bytes::from_static(b"hello"),
                    participants: if i < 900 {
                        vec![user, peer]
                    } else {
                        Vec::new()
                    },
                    ..AppendRequest::default()
                })
            })
            .collect();
        pending.into_iter().for_each(|p| {
            p.wait().unwrap();
        });
    }
    let view = store.sync_view(user, since, Some("phone")).unwrap();
    assert_eq!(view.conversations.len(), 100);
    let mut g = c.benchmark_group("storage_sync_1000_conversations");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("one_pass", |b| {
        b.iter(|| black_box(store.sync_view(user, since, Some("phone")).unwrap()))
    });
    g.bench_function("two_passes", |b| {
        b.iter(|| {
            let version = store.user_version(user).unwrap();
            let changed = store
                .conversations_changed_since(user, since, Some("phone"))
                .unwrap();
            black_box((version, changed))
        })
    });
    g.finish();
}

criterion_group!(benches, append, reads, sync_reads);
criterion_main!(benches);
