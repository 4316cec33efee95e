//! Storage write failures in a running gateway. The gateway's file-size limit (`RLIMIT_FSIZE`,
//! lowered from outside with prlimit(2), as `prlimit --fsize` does) makes RocksDB's next WAL
//! append fail with `EFBIG`: the same path as a full disk, without needing a filesystem to fill.

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

#[test]
fn a_failing_disk_refuses_sends_with_unavailable_keeps_serving_reads_and_loses_nothing_acked() {
    let mut gw = Gateway::start(&[]);
    let (alice_token, bob_token) = (gw.token("alice"), gw.token("bob"));
    let (mut alice, _) = Conn::login(gw.addr, &alice_token, "phone");
    // Bob's user id is registered before the disk fails (a first login writes).
    let (mut bob, _) = Conn::login(gw.addr, &bob_token, "phone");
    let mut acked = Vec::new();
    for i in 1..=5u64 {
        let text = format!("before {i}");
        assert_eq!(
            send_acked(&mut alice, "bob", &format!("m{i}"), &text).seq,
            i
        );
        acked.push((i, text));
    }

    // The next WAL append that passes this size fails.
    set_file_size_limit(gw.pid(), wal_bytes(&gw) + 256);
    let mut refused = 0;
    for i in 6..=60u64 {
        let text = format!("during {i}");
        let rid = send(&mut alice, "bob", &format!("m{i}"), &text);
        match alice.recv_frame() {
            Frame {
                request_id,
                body: Some(Body::SendAck(a)),
            } if request_id == rid => acked.push((a.seq, text)),
            Frame {
                request_id,
                body: Some(Body::Error(e)),
            } if request_id == rid => {
                assert_eq!(e.code, ErrorCode::Unavailable as i32, "{e:?}");
                assert!(!e.fatal, "the session goes on");
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
            other => panic!("expected SendAck or Error, got {other:?}"),
        }
    }
    assert_eq!(
        refused, 3,
        "the store refused writes once the WAL hit the limit"
    );

    // Reads go on: history has exactly what was acknowledged, with contiguous sequences.
    let seqs: Vec<u64> = acked.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=acked.len() as u64).collect::<Vec<_>>());
    assert_eq!(history(&mut bob), acked);
    // New connections log in (known users) and read too.
    let (mut bob2, _) = Conn::login(gw.addr, &bob_token, "tablet");
    assert_eq!(history(&mut bob2), acked);
    drop((alice, bob, bob2));

    // Space returns. RocksDB stays read-only after a failed WAL write until the store is opened
    // again, so the gateway is restarted; it continues where it was.
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
