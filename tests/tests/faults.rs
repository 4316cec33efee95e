//! Storage write failures in a running gateway, two kinds that RocksDB treats differently.
//!
//! * A full disk (`ENOSPC`, on a small tmpfs): RocksDB stops writes, waits for free space and
//!   resumes by itself, so the gateway takes Sends again without a restart.
//! * Any other write error: the gateway's file-size limit (`RLIMIT_FSIZE`, lowered from outside
//!   with prlimit(2), as `prlimit --fsize` does) makes RocksDB's next WAL append fail with
//!   `EFBIG`, which RocksDB treats as fatal: writes stay refused until the store is opened
//!   again.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tern_protocol::v1::frame::Body;
use tern_protocol::{ErrorCode, Frame, HistoryRequest, Target};
use tern_tests::{Conn, Gateway, expect_ack, send, send_acked};

/// Sets the soft file-size limit of process `pid` (the hard limit stays).
fn set_file_size_limit(pid: u32, bytes: u64) {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with a null new limit only reads into `old`.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            std::ptr::null(),
            &mut old,
        )
    };
    assert_eq!(rc, 0, "read the gateway's file-size limit");
    let new = libc::rlimit {
        rlim_cur: bytes.min(old.rlim_max),
        rlim_max: old.rlim_max,
    };
    // SAFETY: both pointers are valid rlimit values for the duration of the call.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_FSIZE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(
        rc,
        0,
        "set the gateway's file-size limit: {}",
        std::io::Error::last_os_error()
    );
}

/// The size of the largest write-ahead log file of the gateway's store.
fn wal_bytes(gw: &Gateway) -> u64 {
    std::fs::read_dir(gw.data_dir.join("log"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().len())
        .max()
        .expect("a WAL file")
}

/// The history of the conversation with alice, oldest first: (seq, text).
fn history(conn: &mut Conn) -> Vec<(u64, String)> {
    let rid = conn.send_body(Body::History(HistoryRequest {
        conversation_id: 0,
        target: Some(Target::user("alice")),
        before_seq: 0,
        limit: 100,
    }));
    // Live deliveries may come first.
    let f = loop {
        let f = conn.recv_frame();
        if !matches!(f.body, Some(Body::Deliver(_))) {
            break f;
        }
    };
    assert_eq!(f.request_id, rid);
    let Some(Body::HistoryPage(page)) = f.body else {
        panic!("expected HistoryPage, got {f:?}")
    };
    let mut got: Vec<(u64, String)> = page
        .messages
        .iter()
        .map(|m| (m.seq, tern_tests::text(m).to_owned()))
        .collect();
    got.reverse();
    got
}

/// What the gateway answered to one Send.
#[derive(Debug)]
enum Sent {
    Acked(u64),
    /// `UNAVAILABLE`, not fatal.
    Refused,
}

/// Sends one message from `conn` to bob and reads the answer, which must be a SendAck or a
/// non-fatal `UNAVAILABLE`.
fn try_send(conn: &mut Conn, id: &str, text: &str) -> Sent {
    let rid = send(conn, "bob", id, text);
    match conn.recv_frame() {
        Frame {
            request_id,
            body: Some(Body::SendAck(a)),
        } if request_id == rid => Sent::Acked(a.seq),
        Frame {
            request_id,
            body: Some(Body::Error(e)),
        } if request_id == rid => {
            assert_eq!(e.code, ErrorCode::Unavailable as i32, "{e:?}");
            assert!(!e.fatal, "the session goes on");
            Sent::Refused
        }
        other => panic!("expected SendAck or Error, got {other:?}"),
    }
}

/// Sends messages to bob until three are refused with `UNAVAILABLE` (at most `limit` in all),
/// adding those acknowledged on the way to `acked`.
fn send_until_refused(conn: &mut Conn, acked: &mut Vec<(u64, String)>, limit: usize) {
    let mut refused = 0;
    for i in 1..=limit {
        let text = format!("during {i}");
        match try_send(conn, &format!("d{i}"), &text) {
            Sent::Acked(seq) => acked.push((seq, text)),
            Sent::Refused => {
                refused += 1;
                if refused == 3 {
                    return;
                }
            }
        }
    }
    panic!("the store still took writes after {limit} sends ({refused} refused)");
}

/// Alice and bob logged in, and alice's first five messages to bob acknowledged (seqs 1-5).
struct Before {
    alice_token: String,
    bob_token: String,
    alice: Conn,
    bob: Conn,
    acked: Vec<(u64, String)>,
}

fn log_in_and_send_five(gw: &Gateway) -> Before {
    let (alice_token, bob_token) = (gw.token("alice"), gw.token("bob"));
    let (mut alice, _) = Conn::login(gw.addr, &alice_token, "phone");
    // Bob's user id is registered before the disk fails (a first login writes).
    let (bob, _) = Conn::login(gw.addr, &bob_token, "phone");
    let mut acked = Vec::new();
    for i in 1..=5u64 {
        let text = format!("before {i}");
        assert_eq!(
            send_acked(&mut alice, "bob", &format!("m{i}"), &text).seq,
            i
        );
        acked.push((i, text));
    }
    Before {
        alice_token,
        bob_token,
        alice,
        bob,
        acked,
    }
}

#[test]
fn a_write_error_other_than_no_space_refuses_sends_until_a_restart_and_loses_nothing_acked() {
    let mut gw = Gateway::start(&[]);
    let Before {
        alice_token,
        bob_token,
        mut alice,
        mut bob,
        mut acked,
    } = log_in_and_send_five(&gw);

    // The next WAL append that passes this size fails.
    set_file_size_limit(gw.pid(), wal_bytes(&gw) + 256);
    send_until_refused(&mut alice, &mut acked, 60);

    // Reads go on: history has exactly what was acknowledged, with contiguous sequences.
    let seqs: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=acked.len() as u64).collect::<Vec<_>>());
    assert_eq!(history(&mut bob), acked);
    // New connections log in (known users) and read too.
    let (mut bob2, _) = Conn::login(gw.addr, &bob_token, "tablet");
    assert_eq!(history(&mut bob2), acked);
    drop((alice, bob, bob2));

    // The limit is lifted. RocksDB treats a WAL write error other than "no space" as fatal
    // (ErrorHandler maps it to kFatalError): it refuses writes until the store is opened again,
    // so the gateway is restarted; it continues where it was.
    set_file_size_limit(gw.pid(), u64::MAX);
    gw.kill();
    gw.start_again();
    let (mut alice, _) = Conn::login(gw.addr, &alice_token, "phone");
    let next = acked.len() as u64 + 1;
    let rid = send(&mut alice, "bob", "after", "after");
    assert_eq!(
        expect_ack(&mut alice, rid).seq,
        next,
        "no sequence lost or reused"
    );
    acked.push((next, "after".into()));
    let (mut bob, _) = Conn::login(gw.addr, &bob_token, "phone");
    assert_eq!(history(&mut bob), acked);
}

/// A tmpfs of a given size mounted on a fresh temporary directory, unmounted when dropped (also
/// when the test panics). Declare it before the gateway that uses it: locals drop in reverse
/// order, so the gateway is killed first and nothing keeps the mount busy.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let target = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        let options = CString::new(format!("size={bytes},mode=0700")).unwrap();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) {
                panic!(
                    "this test fills a real file system: it mounts a tmpfs, which needs \
                     CAP_SYS_ADMIN (run it as root, or in a container with that capability): {e}"
                );
            }
            panic!("mount a tmpfs on {}: {e}", dir.path().display());
        }
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes free, as RocksDB's free-space check reads them (`PosixFileSystem::GetFreeSpace`;
    /// a tmpfs keeps no blocks back for root).
    fn free_bytes(&self) -> u64 {
        let path = CString::new(self.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: statvfs only writes into `st`, a plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated and `st` is valid for writes.
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs: {}", std::io::Error::last_os_error());
        st.f_bfree * st.f_bsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: `target` is a NUL-terminated path that outlives the calls.
        unsafe {
            if libc::umount2(target.as_ptr(), 0) != 0 {
                // Still busy (a process that outlived the test): detach it, so the mount
                // goes away once the last file on it is closed.
                libc::umount2(target.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// Writes `path` until its file system is full (`ENOSPC`), to the last page.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).expect("create the filler");
    let chunk = vec![0xa5u8; 1 << 20];
    loop {
        // A write that finds less room than the chunk writes what fits; the next one fails.
        match f.write_all(&chunk) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => return,
            Err(e) => panic!("write the filler: {e}"),
        }
    }
}

/// The lines of RocksDB's own log about its background error and its recovery (for a failure
/// message).
fn rocksdb_error_log(gw: &Gateway) -> String {
    std::fs::read_to_string(gw.data_dir.join("log").join("LOG"))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            [
                "ErrorHandler",
                "free space",
                "resume DB",
                "resumed DB",
                "No space",
            ]
            .iter()
            .any(|w| l.contains(w))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// RocksDB resumes writes after a "no space" error only once this much is free: the largest
/// memtable (the messages column family's, 64 MiB by default; `SstFileManagerImpl::ClearError`
/// compares the free space with the disk buffer `DB::Open` reserves).
const ROCKSDB_RESUME_FREE_BYTES: u64 = 64 << 20;

/// The tmpfs size. RocksDB preallocates each WAL file in blocks of the largest memtable plus
/// 10% (70.4 MiB here); on a file system with more room than that at open, the WAL would
/// append into its preallocated space and never meet the full disk. With 72 MiB the block does
/// not fit next to the 4 MiB MANIFEST preallocation, so the WAL grows page by page and its next
/// append fails once the filler takes the rest; and removing the filler frees more than the
/// 64 MiB RocksDB waits for.
const TMPFS_BYTES: u64 = 72 << 20;

#[test]
fn a_full_disk_refuses_sends_and_the_gateway_takes_them_again_once_space_returns_without_a_restart()
{
    let tmpfs = Tmpfs::mount(TMPFS_BYTES);
    let data = tmpfs.path().join("data");
    let mut gw = Gateway::start_in(&data, &[]);
    let Before {
        alice_token,
        bob_token,
        mut alice,
        mut bob,
        mut acked,
    } = log_in_and_send_five(&gw);
    let wal = std::fs::read_dir(gw.data_dir.join("log"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().blocks() * 512)
        .max()
        .expect("a WAL file");
    assert!(
        wal < 1 << 20,
        "RocksDB preallocated its WAL ({wal} bytes allocated): filling the tmpfs would not make \
         WAL appends fail; the tmpfs must leave less room than a preallocation block at open"
    );

    // The disk fills up: the next WAL append that needs a new page fails with ENOSPC.
    let filler = tmpfs.path().join("filler");
    fill(&filler);
    send_until_refused(&mut alice, &mut acked, 500);

    // Reads go on: history has exactly what was acknowledged, with contiguous sequences.
    let seqs: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=acked.len() as u64).collect::<Vec<_>>());
    assert_eq!(history(&mut bob), acked);
    // New connections log in (known users) and read too.
    let (mut bob2, _) = Conn::login(gw.addr, &bob_token, "tablet");
    assert_eq!(history(&mut bob2), acked);
    drop(bob2);

    // Space returns, and the same gateway takes Sends again. RocksDB checks the free space
    // every 5 s; until then Sends are refused. The client retries with its message id, as an
    // app resends an unacknowledged message.
    std::fs::remove_file(&filler).unwrap();
    let free = tmpfs.free_bytes();
    assert!(
        free > ROCKSDB_RESUME_FREE_BYTES,
        "{free} bytes free: RocksDB would wait for {ROCKSDB_RESUME_FREE_BYTES}"
    );
    let pid = gw.pid();
    let started = Instant::now();
    let mut refused = 0;
    let seq = loop {
        match try_send(&mut alice, "after", "after") {
            Sent::Acked(seq) => break seq,
            Sent::Refused => refused += 1,
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "Sends still refused 30 s after space returned ({refused} tries, {} bytes free); \
             RocksDB's log:\n{}",
            tmpfs.free_bytes(),
            rocksdb_error_log(&gw)
        );
        // One try every 100 ms: a client's retry interval, not a wait for an event.
        std::thread::park_timeout(Duration::from_millis(100));
    };
    assert_eq!(seq, acked.len() as u64 + 1, "no sequence lost or reused");
    acked.push((seq, "after".into()));
    assert_eq!(gw.pid(), pid, "the same gateway process");
    for i in 1..=3 {
        let text = format!("recovered {i}");
        let ack = send_acked(&mut alice, "bob", &format!("r{i}"), &text);
        assert_eq!(ack.seq, acked.len() as u64 + 1);
        acked.push((ack.seq, text));
    }
    assert_eq!(history(&mut bob), acked);
    eprintln!(
        "disk full: {} acknowledged, writes taken again {:?} after space returned ({refused} \
         Sends refused meanwhile)",
        acked.len(),
        started.elapsed()
    );
    drop((alice, bob));

    // Nothing acknowledged is lost across the recovery: a killed and restarted gateway has
    // exactly the same history, and continues the sequence.
    gw.kill();
    gw.start_again();
    let (mut bob, _) = Conn::login(gw.addr, &bob_token, "phone");
    assert_eq!(history(&mut bob), acked);
    let (mut alice, _) = Conn::login(gw.addr, &alice_token, "phone");
    let ack = send_acked(&mut alice, "bob", "restarted", "restarted");
    assert_eq!(ack.seq, acked.len() as u64 + 1);
}

#[test]
fn a_log_file_that_cannot_grow_does_not_stop_the_gateway() {
    // The gateway's stderr is a file (as with `2>gateway.log`), and then the disk refuses to
    // let it grow: every log line fails to be written. The gateway must go on serving.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("gateway.log");
    let config = dir.path().join("tern.toml");
    std::fs::write(&config, tern_tests::NO_RATE_LIMITS).unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", tern_tests::free_port())
        .parse()
        .unwrap();
    let child = std::process::Command::new(tern_tests::binary("tern-gateway"))
        .env("TERN_API", "127.0.0.1:0")
        .arg("--data-dir")
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .arg("--tcp")
        .arg(addr.to_string())
        .arg("--log")
        .arg("info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Killed however the test ends.
    let mut child = KillOnDrop(child);
    let child = &mut child.0;
    let deadline = std::time::Instant::now() + tern_tests::WAIT;
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("tern-gateway listening on")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "gateway did not start"
        );
        assert!(child.try_wait().unwrap().is_none(), "gateway exited");
        std::thread::park_timeout(std::time::Duration::from_millis(10));
    }
    let token = |user: &str| {
        let out = std::process::Command::new(tern_tests::binary("tern-gateway"))
            .args(["token", "--user", user, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let (alice, bob) = (token("alice"), token("bob"));
    // Logins of known users write log lines and nothing to the store: grow the log well past
    // the WAL, so that a limit at the log's size still leaves the WAL room for a few messages.
    for _ in 0..100 {
        drop(Conn::login(addr, &alice, "warm-up"));
    }
    let wal = std::fs::read_dir(data.join("log"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().len())
        .max()
        .unwrap();
    let logged = std::fs::metadata(&log).unwrap().len();
    assert!(logged > wal + 4096, "log {logged} bytes, WAL {wal} bytes");
    // The log file cannot grow any more; the WAL has room for a few messages.
    set_file_size_limit(child.id(), logged);
    // (The last warm-up's "closed" line may have landed just before the limit.)
    let logged = std::fs::metadata(&log).unwrap().len();
    // Every login and close writes a log line.
    for round in 1..=3u64 {
        let (mut a, _) = Conn::login(addr, &alice, "phone");
        let (mut b, _) = Conn::login(addr, &bob, &format!("phone{round}"));
        let ack = send_acked(&mut a, "bob", &format!("m{round}"), "still here");
        assert_eq!(ack.seq, round);
        assert_eq!(tern_tests::expect_deliver(&mut b).seq, round);
    }
    assert_eq!(
        std::fs::metadata(&log).unwrap().len(),
        logged,
        "nothing more was logged"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the gateway is still running"
    );
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
