//! Append load generator: throughput and latency of `RocksStore::append`.
//!
//! ```text
//! cargo run --release -p tern-storage --example append_load -- \
//!     [--policy fsync|wal|memory] [--outstanding N | --rate APPENDS_PER_S] \
//!     [--secs S] [--convs C] [--body BYTES] [--dir PATH]
//! ```
//!
//! `--outstanding N` (default 4096) is a closed loop: N appends in flight at all times, a
//! new one submitted as each completes (maximum throughput at that concurrency).
//! `--rate R` is an open loop: appends submitted at R per second on a fixed schedule,
//! whatever the store does, with latency measured from the scheduled time.
//! Latency is submission to completion as seen by the caller, in microseconds.

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
    }
}

fn main() {
    let args = parse();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_string_lossy().into_owned());
    let store = RocksStore::open(&dir, StoreOptions::with_durability(args.policy)).expect("open");
    let body = Bytes::from(vec![0x5a; args.body]);
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
    println!(
        "policy={:?} mode={} convs={} body={}B: {} appends in {:.2}s = {:.0} appends/s; latency us p50={} p99={} p99.9={} max={}",
        args.policy,
        match args.rate {
            Some(r) => format!("rate={r}/s"),
            None => format!("outstanding={}", args.outstanding),
        },
        args.convs,
        args.body,
        done,
        secs,
        done as f64 / secs,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max(),
    );
    store.close().expect("close");
}
