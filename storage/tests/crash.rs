//! Crash test: a child process appends as fast as it can under `Durability::Fsync` and
//! prints every acknowledged (conversation, seq, client message id); the parent SIGKILLs it
//! at a random moment, reopens the store and checks that every acknowledged message is
//! there, in order, with no gaps and no duplicates. Every 64th append comes from a user the
//! child interns just before it (printing the new id): every id printed survives the crash
//! of the process too, with its name, no two names share an id, and each round's ids are
//! above the last round's. Five rounds on the same directory, then appends
//! continue after the last reopen.
//!
//! The child is this test binary itself, re-executed with `TERN_CRASH_CHILD_DIR` set and
//! filtered to the `crash_child` test.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tern_storage::{
    AppendRequest, Durability, MessageStore, RocksStore, StorageError, StoreOptions,
    group_conversation,
};

const CONVS: u64 = 64;
const OUTSTANDING: usize = 2048;
const ROUNDS: u32 = 5;

fn conv(i: u64) -> u64 {
    group_conversation(i + 1).unwrap()
}

/// Runs only inside the child process.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("TERN_CRASH_CHILD_DIR") else {
        return;
    };
    let round: u32 = std::env::var("TERN_CRASH_ROUND").unwrap().parse().unwrap();
    let store = RocksStore::open(&dir, StoreOptions::with_durability(Durability::Fsync)).unwrap();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    writeln!(out, "READY").unwrap();
    out.flush().unwrap();
    let mut pending = std::collections::VecDeque::new();
    let mut n = 0u64;
    loop {
        while pending.len() < OUTSTANDING {
            let c = n % CONVS;
            let id = format!("r{round}-c{c}-n{n}");
            let sender = if n.is_multiple_of(64) {
                let name = format!("u{round}-{n}");
                let user = store.intern_user(&name).unwrap();
                writeln!(out, "INTERN {name} {user}").unwrap();
                user
            } else {
                1
            };
            let p = store.append(AppendRequest {
                conversation: conv(c),
                sender,
                client_msg_id: id.clone(),
                content_type: 0,
                custom_type: String::new(),
                payload: Bytes::from(vec![b'x'; 100]),
                participants: Vec::new(),
                ..AppendRequest::default()
            });
            pending.push_back((c, id, p));
            n += 1;
        }
        for _ in 0..256 {
            let (c, id, p) = pending.pop_front().unwrap();
            let a = p.wait().unwrap();
            writeln!(out, "ACK {} {} {}", conv(c), a.seq, id).unwrap();
        }
        out.flush().unwrap();
    }
}

fn rand_between(lo: u64, hi: u64, salt: u64) -> u64 {
    let mut x = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    lo + x % (hi - lo + 1)
}

struct Ack {
    conv: u64,
    seq: u64,
    id: String,
}

/// Runs one child, kills it, returns the acknowledgements it printed.
/// What the child printed before it was killed: its acknowledged appends and the users it
/// interned (name, id).
fn run_child(dir: &std::path::Path, round: u32) -> (Vec<Ack>, Vec<(String, u64)>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("TERN_CRASH_CHILD_DIR", dir)
        .env("TERN_CRASH_ROUND", round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                // A line cut by the kill has no newline: it was never fully printed.
                Ok(n) if n > 0 && line.ends_with('\n') => {
                    if tx.send(line.trim_end().to_owned()).is_err() {
                        break;
                    }
                }
                _ => break,
            }
        }
    });
    // Wait until the child has the store open.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("child did not start");
        // libtest's "test crash_child ... " precedes it on the same line.
        if l.ends_with("READY") {
            break;
        }
    }
    // Another process holds the directory: opening it must fail, not corrupt it.
    match RocksStore::open(dir, StoreOptions::default()) {
        Err(StorageError::Locked { .. }) => {}
        other => panic!("expected Locked while the child runs, got {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(rand_between(200, 800, round as u64)));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    let lines: Vec<String> = rx.try_iter().collect();
    let acks = lines
        .iter()
        .filter_map(|l| {
            let mut f = l.strip_prefix("ACK ")?.split(' ');
            Some(Ack {
                conv: f.next()?.parse().ok()?,
                seq: f.next()?.parse().ok()?,
                id: f.next()?.to_owned(),
            })
        })
        .collect();
    let interned = lines
        .iter()
        .filter_map(|l| {
            let (name, id) = l.strip_prefix("INTERN ")?.split_once(' ')?;
            Some((name.to_owned(), id.parse().ok()?))
        })
        .collect();
    (acks, interned)
}

/// Every interned user kept its id and name, and no two share an id.
fn check_interned(store: &RocksStore, interned: &[(String, u64)]) {
    let mut ids = HashSet::new();
    for (name, id) in interned {
        assert_eq!(store.lookup_user(name).unwrap(), Some(*id), "{name} lost");
        assert_eq!(
            store.user_name(*id).unwrap().as_deref(),
            Some(name.as_str())
        );
        assert!(ids.insert(*id), "id {id} given twice");
    }
}

/// Parses `r{round}-c{c}-n{n}`.
fn parse_id(id: &str) -> (u32, u64) {
    let mut f = id.split('-');
    let round = f.next().unwrap()[1..].parse().unwrap();
    let _c = f.next().unwrap();
    let n = f.next().unwrap()[1..].parse().unwrap();
    (round, n)
}

fn check(store: &RocksStore, acked: &[Ack]) {
    let mut ids = HashSet::new();
    let mut by_conv: HashMap<u64, Vec<String>> = HashMap::new();
    for c in 0..CONVS {
        let msgs = store.read_forward(conv(c), 1, usize::MAX).unwrap();
        for (i, m) in msgs.iter().enumerate() {
            assert_eq!(m.seq, i as u64 + 1, "gap in conversation {c}");
            assert!(
                ids.insert(m.client_msg_id.clone()),
                "duplicate {}",
                m.client_msg_id
            );
        }
        assert_eq!(store.latest_seq(conv(c)).unwrap(), msgs.len() as u64);
        // Submission order is sequence order, within every round.
        let mut last: HashMap<u32, u64> = HashMap::new();
        for m in &msgs {
            let (round, n) = parse_id(&m.client_msg_id);
            let prev = last.insert(round, n);
            assert!(
                prev.is_none_or(|p| p < n),
                "out of order in conversation {c}"
            );
        }
        by_conv.insert(conv(c), msgs.into_iter().map(|m| m.client_msg_id).collect());
    }
    for a in acked {
        let ids = &by_conv[&a.conv];
        let got = ids.get(a.seq as usize - 1);
        assert_eq!(got, Some(&a.id), "acknowledged message lost or moved");
    }
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    if std::env::var("TERN_CRASH_CHILD_DIR").is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut acked = Vec::new();
    let mut interned = Vec::new();
    for round in 0..ROUNDS {
        let (acks, users) = run_child(dir.path(), round);
        assert!(
            !acks.is_empty(),
            "round {round}: the child acknowledged nothing"
        );
        eprintln!(
            "round {round}: {} acknowledged appends before SIGKILL",
            acks.len()
        );
        acked.extend(acks);
        assert!(
            !users.is_empty(),
            "round {round}: the child interned nobody"
        );
        // After a crash ids go on from the end of the reserved block: above all earlier ones.
        let before = interned.iter().map(|(_, id)| *id).max().unwrap_or(0);
        assert!(users.iter().all(|(_, id)| *id > before), "round {round}");
        interned.extend(users);
        let store = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
        check(&store, &acked);
        check_interned(&store, &interned);
    }
    // Appends continue where the log ends.
    let store = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
    for c in 0..CONVS {
        let latest = store.latest_seq(conv(c)).unwrap();
        let a = store
            .append(AppendRequest {
                conversation: conv(c),
                sender: 1,
                client_msg_id: format!("r{ROUNDS}-c{c}-n0"),
                ..AppendRequest::default()
            })
            .wait()
            .unwrap();
        assert_eq!(a.seq, latest + 1);
    }
    // Retrying an acknowledged append of a killed child finds the original.
    let last = acked.last().unwrap();
    let a = store
        .append(AppendRequest {
            conversation: last.conv,
            sender: 1,
            client_msg_id: last.id.clone(),
            ..AppendRequest::default()
        })
        .wait()
        .unwrap();
    assert!(a.duplicate);
    assert_eq!(a.seq, last.seq);
    drop(store);
    let store = RocksStore::open(dir.path(), StoreOptions::default()).unwrap();
    check(&store, &acked);
}
