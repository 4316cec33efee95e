//! Append load generator: throughput and latency of `RocksStore::append`.
//!
//! ```text
//! cargo run --release -p tern-storage --example append_load -- \
//!     [--policy fsync|wal|memory] [--outstanding N | --rate APPENDS_PER_S] \
//!     [--secs S] [--convs C] [--body BYTES] [--dir PATH] [--min-sync-us US]
//! ```
//!
//! `--outstanding N` (default 4096) is a closed loop: N appends in flight at all times, a
//! new one submitted as each completes (maximum throughput at that concurrency).
//! `--rate R` is an open loop: appends submitted at R per second on a fixed schedule,
//! whatever the store does, with latency measured from the scheduled time.
//! Latency is submission to completion as seen by the caller, in microseconds.
//! It also reports the CPU time per append of the writer's two threads, the builder and the
//! committer (from `/proc/self/task/*/schedstat`), which stays meaningful on a busy machine:
//! 1e6 divided by the larger one is the pipeline's ceiling in appends/s.
//! `--min-sync-us` sets `StoreOptions::min_sync_interval` (default: the store's, 500; 0 syncs
//! as often as the committer can). The result line also counts the commits, which under
//! `fsync` are the WAL syncs.
//!
//! `--reads` instead measures 50-message page reads (forward and backward) from one
//! conversation of 10,000 messages (interleaved with 90,000 in other conversations), first
//! from the memtable, then from SST files after a flush; wall time and the calling thread's
//! CPU time per page.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use tern_storage::{
    AppendRequest, Completion, Durability, MessageStore, RocksStore, StoreOptions,
    group_conversation,
};

struct Args {
    policy: Durability,
    outstanding: usize,
    rate: Option<u64>,
    secs: u64,
    convs: u64,
    body: usize,
    dir: Option<String>,
    reads: bool,
    min_sync_us: Option<u64>,
}

/// CPU time (ns) consumed so far by the thread of this process whose name starts with
/// `name`, or by the calling thread when `name` is `None`.
fn cpu_ns(name: Option<&str>) -> u64 {
    let path = match name {
        None => "/proc/thread-self/schedstat".to_owned(),
        Some(n) => {
            // A new thread names itself once it runs: retry briefly.
            let task = (0..100)
                .find_map(|_| {
                    let found = std::fs::read_dir("/proc/self/task")
                        .expect("proc")
                        .filter_map(|e| e.ok())
                        .find(|e| {
                            std::fs::read_to_string(e.path().join("comm"))
                                .map(|c| c.starts_with(n))
                                .unwrap_or(false)
                        });
                    if found.is_none() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    found
                })
                .expect("thread not found");
            task.path().join("schedstat").to_string_lossy().into_owned()
        }
    };
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn parse() -> Args {
    let mut a = Args {
        policy: Durability::Fsync,
        outstanding: 4096,
        rate: None,
        secs: 10,
        convs: 10_000,
        body: 200,
        dir: None,
        reads: false,
        min_sync_us: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--policy" => {
                a.policy = match val().as_str() {
                    "fsync" => Durability::Fsync,
                    "wal" => Durability::Wal {
                        sync_interval_ms: 10,
                    },
                    "memory" => Durability::Memory,
                    p => panic!("unknown policy {p}"),
                }
            }
            "--outstanding" => a.outstanding = val().parse().expect("--outstanding"),
            "--rate" => a.rate = Some(val().parse().expect("--rate")),
            "--secs" => a.secs = val().parse().expect("--secs"),
            "--convs" => a.convs = val().parse().expect("--convs"),
            "--body" => a.body = val().parse().expect("--body"),
            "--dir" => a.dir = Some(val()),
            "--reads" => a.reads = true,
            "--min-sync-us" => a.min_sync_us = Some(val().parse().expect("--min-sync-us")),
            f => panic!("unknown flag {f}"),
        }
    }
    a
}

fn request(n: u64, convs: u64, body: &Bytes) -> AppendRequest {
    AppendRequest {
        conversation: group_conversation(n % convs + 1).expect("group id"),
        sender: n % 100_000 + 1,
        client_msg_id: format!("load-{n}"),
        content_type: 1,
        custom_type: String::new(),
        payload: body.clone(),
        participants: Vec::new(),
        ..AppendRequest::default()
    }
}

fn main() {
    let args = parse();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_string_lossy().into_owned());
    let body = Bytes::from(vec![0x5a; args.body]);
    if args.reads {
        return reads(&dir, &body);
    }
    let mut opts = StoreOptions::with_durability(args.policy);
    if let Some(us) = args.min_sync_us {
        opts.min_sync_interval = Duration::from_micros(us);
    }
    let min_sync_us = opts.min_sync_interval.as_micros();
    let store = RocksStore::open(&dir, opts).expect("open");
    let commits0 = store.commit_stats().commits;
    let writer_cpu0 = cpu_ns(Some("tern-storage-wr"));
    let commit_cpu0 = cpu_ns(Some("tern-storage-co"));
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let run_for = Duration::from_secs(args.secs);
    let start = Instant::now();
    let mut done = 0u64;

    match args.rate {
        None => {
            let mut pending: VecDeque<(Instant, Completion<_>)> = VecDeque::new();
            let mut n = 0u64;
            while start.elapsed() < run_for {
                while pending.len() < args.outstanding {
                    pending
                        .push_back((Instant::now(), store.append(request(n, args.convs, &body))));
                    n += 1;
                }
                let (t, c) = pending.pop_front().expect("pending");
                c.wait().expect("append");
                hist.record(t.elapsed().as_micros() as u64).ok();
                done += 1;
            }
            for (_, c) in pending {
                c.wait().expect("append");
            }
        }
        Some(rate) => {
            let (tx, rx) = std::sync::mpsc::channel::<(Instant, Completion<_>)>();
            let waiter = std::thread::spawn(move || {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("hist");
                let mut n = 0u64;
                for (t, c) in rx {
                    c.wait().expect("append");
                    h.record(t.elapsed().as_micros() as u64).ok();
                    n += 1;
                }
                (h, n)
            });
            let interval = Duration::from_secs_f64(1.0 / rate as f64);
            let mut n = 0u64;
            while start.elapsed() < run_for {
                // Submit everything that is due, each stamped with its scheduled time.
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                while n < due {
                    let scheduled = start + interval.mul_f64(n as f64);
                    tx.send((scheduled, store.append(request(n, args.convs, &body))))
                        .expect("waiter");
                    n += 1;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            drop(tx);
            let (h, n) = waiter.join().expect("waiter");
            hist = h;
            done = n;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let writer_us = (cpu_ns(Some("tern-storage-wr")) - writer_cpu0) as f64 / 1e3 / done as f64;
    let commit_us = (cpu_ns(Some("tern-storage-co")) - commit_cpu0) as f64 / 1e3 / done as f64;
    let commits = store.commit_stats().commits - commits0;
    println!(
        "policy={:?} mode={} convs={} body={}B min_sync_us={}: {} appends in {:.2}s = {:.0} appends/s; latency us p50={} p99={} p99.9={} max={}; CPU/append: builder {:.2} us, committer {:.2} us; commits/s {:.0}",
        args.policy,
        match args.rate {
            Some(r) => format!("rate={r}/s"),
            None => format!("outstanding={}", args.outstanding),
        },
        args.convs,
        args.body,
        min_sync_us,
        done,
        secs,
        done as f64 / secs,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max(),
        writer_us,
        commit_us,
        commits as f64 / secs,
    );
    store.close().expect("close");
}

fn reads(dir: &str, body: &Bytes) {
    let conv = group_conversation(1).expect("group id");
    for stage in ["memtable", "sst"] {
        let store =
            RocksStore::open(dir, StoreOptions::with_durability(Durability::Memory)).expect("open");
        if stage == "memtable" {
            let mut pending = Vec::new();
            for n in 0..100_000u64 {
                let mut r = request(n, 10_000, body);
                if n % 10 == 0 {
                    r.conversation = conv;
                }
                pending.push(store.append(r));
            }
            for p in pending {
                p.wait().expect("append");
            }
        }
        let latest = store.latest_seq(conv).expect("latest");
        assert_eq!(latest, 10_000);
        for forward in [true, false] {
            let pages = 20_000u64;
            let (t0, c0) = (Instant::now(), cpu_ns(None));
            let mut i = 0;
            for _ in 0..pages {
                i = (i + 97) % (latest - 50);
                let page = if forward {
                    store.read_forward(conv, i + 1, 50)
                } else {
                    store.read_backward(conv, i + 51, 50)
                }
                .expect("read");
                assert_eq!(page.len(), 50);
                std::hint::black_box(page);
            }
            println!(
                "read {} page of 50 from {stage}: {:.1} us/page wall, {:.1} us/page CPU",
                if forward { "forward" } else { "backward" },
                t0.elapsed().as_secs_f64() * 1e6 / pages as f64,
                (cpu_ns(None) - c0) as f64 / 1e3 / pages as f64,
            );
        }
        // Closing flushes the memtables (Memory policy): the next stage reads SST files.
        store.close().expect("close");
    }
}
