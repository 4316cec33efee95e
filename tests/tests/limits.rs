//! Limits against hostile or broken clients: rates, connection counts, slow senders and clients
//! that never read. Each case asserts the documented error code or close, and that nothing a
//! limit refused was stored.

use std::io::Write;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_protocol::v1::frame::Body;
use tern_protocol::{Codec, ErrorCode, Frame, KickReason, Ping, SyncRequest, Target};
use tern_tests::{Conn, Gateway, Recv, WAIT, hello};

fn gateway_with(config: &str) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tern.toml");
    std::fs::write(&cfg, config).unwrap();
    let gw = Gateway::start(&["--config", cfg.to_str().unwrap()]);
    (gw, dir)
}

fn send(to: &str, id: &str, payload: Bytes) -> Body {
    Body::Send(tern_protocol::Send {
        client_msg_id: id.to_string(),
        target: Some(Target::user(to)),
        content_type: 1,
        custom_type: String::new(),
        payload,
        priority: false,
    })
}

/// Sends `n` messages back to back, then counts SendAcks and RATE_LIMITED errors (the error
/// text is returned for the first refusal).
fn burst(c: &mut Conn, prefix: &str, n: usize) -> (usize, usize, Option<String>) {
    let ids: Vec<u64> = (0..n)
        .map(|i| {
            c.send_body(send(
                "bob",
                &format!("{prefix}{i}"),
                Bytes::from_static(b"x"),
            ))
        })
        .collect();
    let (mut acked, mut limited, mut text) = (0, 0, None);
    let mut answered = Vec::new();
    for _ in 0..n {
        // Refusals are answered at once, SendAcks after the commit: match by request id.
        let f = c.recv_frame();
        answered.push(f.request_id);
        match f.body {
            Some(Body::SendAck(_)) => acked += 1,
            Some(Body::Error(e)) => {
                assert_eq!(e.code, ErrorCode::RateLimited as i32, "{e:?}");
                assert!(!e.fatal);
                text.get_or_insert(e.message);
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, ids, "one answer per request");
    (acked, limited, text)
}

/// Bob's messages from a full sync.
fn synced_seqs(gw: &Gateway) -> Vec<u64> {
    let (mut bob, _) = Conn::login(gw.addr, &gw.token("bob"), "reader");
    let rid = bob.send_body(Body::Sync(SyncRequest {
        since_version: 0,
        page_size: 0,
        ..Default::default()
    }));
    let mut seqs = Vec::new();
    loop {
        let f = bob.recv_frame();
        assert_eq!(f.request_id, rid);
        match f.body {
            Some(Body::SyncConversations(_)) => {}
            Some(Body::SyncMessages(m)) => seqs.extend(m.messages.iter().map(|d| d.seq)),
            Some(Body::SyncDone(_)) => return seqs,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn send_rate_is_limited_per_connection_and_per_user_and_refused_sends_are_not_stored() {
    // 1 message/s per connection (bursts of 2), 2/s per user (bursts of 4): a burst of 10 from
    // one device gets exactly 2 through, however fast the machine is.
    let (gw, _cfg) = gateway_with("rate_messages_per_sec = 1\nrate_user_messages_per_sec = 2\n");
    let token = gw.token("alice");
    let (mut phone, _) = Conn::login(gw.addr, &token, "phone");
    let spent_at = std::time::Instant::now();
    let (acked, limited, text) = burst(&mut phone, "p", 10);
    assert_eq!((acked, limited), (2, 8));
    assert!(text.unwrap().contains("on this connection"));

    // A second device has its own connection budget but shares the user's: 2 more.
    let (mut laptop, _) = Conn::login(gw.addr, &token, "laptop");
    assert_eq!(burst(&mut laptop, "l", 10).0, 2);
    // A third device finds the user's budget spent, but for what it regained since (one
    // message per 500 ms; none unless the logins and commits in between were slow).
    let (mut tablet, _) = Conn::login(gw.addr, &token, "tablet");
    let (acked, limited, text) = burst(&mut tablet, "t", 5);
    let regained = (spent_at.elapsed().as_millis() / 500) as usize;
    assert!(acked <= regained, "{acked} sent, {regained} regained");
    assert_eq!(acked + limited, 5);
    if acked < 2 {
        // (From 2 on the connection's own budget is spent too.)
        assert!(text.unwrap().contains("from this user"));
    }

    // The limit is not fatal: the connection still answers.
    let rid = tablet.send_body(Body::Ping(Ping { client_time_ms: 7 }));
    let f = tablet.recv_frame();
    assert_eq!(f.request_id, rid);
    assert!(matches!(f.body, Some(Body::Pong(_))), "{f:?}");

    // Exactly the acknowledged messages were stored.
    assert_eq!(synced_seqs(&gw), (1..=4 + acked as u64).collect::<Vec<_>>());
}

#[test]
fn request_rate_is_limited_per_connection() {
    let (gw, _cfg) = gateway_with("rate_requests_per_sec = 1\n");
    let (mut c, _) = Conn::login(gw.addr, &gw.token("alice"), "phone");
    let ids: Vec<u64> = (0..6)
        .map(|i| c.send_body(Body::Ping(Ping { client_time_ms: i })))
        .collect();
    let mut pongs = 0;
    for id in ids {
        let f = c.recv_frame();
        assert_eq!(f.request_id, id);
        match f.body {
            Some(Body::Pong(_)) => pongs += 1,
            Some(Body::Error(e)) => assert_eq!(e.code, ErrorCode::RateLimited as i32),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pongs, 2);
}

#[test]
fn read_byte_rate_slows_a_fast_sender_down_without_refusing_it() {
    // 256 KiB/s with bursts of 512 KiB. 1 MiB of sends cannot all be read in less than
    // (1 MiB - 512 KiB - one 64 KiB read) / 256 KiB/s = 1.75 s: a lower bound, so the check
    // cannot fail on a slow machine.
    let (gw, _cfg) = gateway_with(
        "rate_read_bytes_per_sec = 262144\nmax_frame_bytes = 32768\nmax_payload_bytes = 16384\n\
         rate_messages_per_sec = 0\nrate_user_messages_per_sec = 0\nrate_requests_per_sec = 0\n",
    );
    let (mut c, _) = Conn::login(gw.addr, &gw.token("alice"), "phone");
    let payload = Bytes::from(vec![7u8; 16 << 10]);
    let started = Instant::now();
    let ids: Vec<u64> = (0..64)
        .map(|i| c.send_body(send("bob", &format!("m{i}"), payload.clone())))
        .collect();
    for (i, id) in ids.into_iter().enumerate() {
        let f = c.recv_frame();
        assert_eq!(f.request_id, id);
        match f.body {
            Some(Body::SendAck(a)) => assert_eq!(a.seq, i as u64 + 1),
            other => panic!("unexpected {other:?}"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1750),
        "1 MiB was read in {took:?}, faster than the configured rate allows"
    );
}

#[test]
fn connections_are_limited_in_total_and_per_address() {
    let (gw, _cfg) = gateway_with("max_connections = 3\nmax_connections_per_ip = 2\n");
    let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    let refused = |c: &mut Conn| -> String {
        match c.recv_frame() {
            Frame {
                request_id: 0,
                body: Some(Body::Error(e)),
            } => {
                assert_eq!(e.code, ErrorCode::ConnectionLimit as i32, "{e:?}");
                assert!(e.fatal);
                e.message
            }
            other => panic!("expected CONNECTION_LIMIT, got {other:?}"),
        }
    };
    // Two logged-in connections from 127.0.0.1 (whichever core they end up on).
    let (a1, _) = Conn::login(gw.addr, &gw.token("a1"), "d");
    let (_a2, _) = Conn::login(gw.addr, &gw.token("a2"), "d");
    let mut a3 = Conn::connect_with(gw.addr, ip("127.0.0.1"), None);
    assert!(refused(&mut a3).contains("this IP address"));
    a3.expect_closed();
    // A third from another address fills the server.
    let mut b1 = Conn::connect_with(gw.addr, ip("127.0.0.2"), None);
    b1.send_body(Body::Hello(hello(&gw.token("b1"), "d")));
    assert!(matches!(b1.recv_frame().body, Some(Body::HelloOk(_))));
    let mut c1 = Conn::connect_with(gw.addr, ip("127.0.0.3"), None);
    assert!(refused(&mut c1).contains("the server has its maximum of 3"));
    c1.expect_closed();

    // When a connection closes its place is free again (the server notices the close
    // asynchronously: try until admitted, bounded by WAIT).
    drop(a1);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut c = Conn::connect_with(gw.addr, ip("127.0.0.3"), None);
        c.send_body(Body::Hello(hello(&gw.token("c1"), "d")));
        match c.recv_frame().body {
            Some(Body::HelloOk(_)) => break,
            Some(Body::Error(e)) if e.code == ErrorCode::ConnectionLimit as i32 => {
                assert!(
                    Instant::now() < deadline,
                    "the closed connection was never released"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn trickled_frames_are_closed_by_the_login_and_idle_timeouts() {
    let (gw, _cfg) = gateway_with(
        "login_timeout_ms = 300\nheartbeat_interval_ms = 100\nidle_timeout_ms = 400\n",
    );
    // One byte every 50 ms of a frame of more than 100 bytes: the frame would take over 5 s.
    let trickle = |c: &Conn, frame: &Frame| -> Arc<AtomicUsize> {
        let mut bytes = bytes::BytesMut::new();
        Codec::default().encode(frame, &mut bytes).unwrap();
        assert!(bytes.len() > 100);
        let sent = Arc::new(AtomicUsize::new(0));
        let mut stream = c.stream().try_clone().unwrap();
        let counter = sent.clone();
        std::thread::spawn(move || {
            for b in bytes.iter() {
                if stream.write_all(&[*b]).is_err() {
                    return;
                }
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        sent
    };
    let mut h = hello(&gw.token("alice"), "phone");
    h.client_version = "x".repeat(100);

    // Before login: the login timeout counts from accept, whatever arrives meanwhile.
    let mut pre = Conn::connect(gw.addr);
    let sent = trickle(
        &pre,
        &Frame {
            request_id: 1,
            body: Some(Body::Hello(h.clone())),
        },
    );
    pre.expect_error(ErrorCode::LoginTimeout);
    pre.expect_closed();
    assert!(sent.load(Ordering::SeqCst) < 100, "the Hello was complete");

    // After login: only whole frames count as activity.
    let (mut post, _) = Conn::login(gw.addr, &gw.token("bob"), "phone");
    let sent = trickle(
        &post,
        &Frame {
            request_id: 2,
            body: Some(send("alice", "m1", Bytes::from(vec![1u8; 200]))),
        },
    );
    post.expect_kick(KickReason::Idle);
    assert!(sent.load(Ordering::SeqCst) < 100, "the frame was complete");
}

/// Rate limits off, as a client that never reads needs many messages sent to it.
const NO_RATES: &str = "rate_messages_per_sec = 0\nrate_user_messages_per_sec = 0\n\
    rate_requests_per_sec = 0\nrate_read_bytes_per_sec = 0\n";

/// Logs Bob in on a connection with a tiny receive window that he never reads, and has Alice
/// send him `n` messages of 32 KiB: enough to fill his window and the server's send buffer many
/// times over, so that his writer waits on a full socket.
fn bob_stops_reading(gw: &Gateway, n: usize) -> Conn {
    let mut bob = Conn::connect_with(gw.addr, None, Some(4096));
    bob.send_body(Body::Hello(hello(&gw.token("bob"), "phone")));
    let (mut alice, _) = Conn::login(gw.addr, &gw.token("alice"), "phone");
    let payload = Bytes::from(vec![3u8; 32 << 10]);
    for i in 0..n {
        alice.send_body(send("bob", &format!("m{i}"), payload.clone()));
    }
    for _ in 0..n {
        assert!(matches!(alice.recv_frame().body, Some(Body::SendAck(_))));
    }
    bob
}

/// Without reading, waits (bounded by WAIT) until the server resets `c`: POLLERR/POLLHUP, and
/// reading then ends.
fn expect_reset(c: &mut Conn) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(c.stream());
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a descriptor `c` owns for the duration of the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, WAIT.as_millis() as i32) };
    assert_eq!(
        ready, 1,
        "the server did not drop the client within {WAIT:?}"
    );
    assert_ne!(
        pfd.revents & (libc::POLLERR | libc::POLLHUP),
        0,
        "{:#x}",
        pfd.revents
    );
    loop {
        match c.recv() {
            Recv::Closed => break,
            Recv::Frame(_) => {}
        }
    }
}

#[test]
fn a_client_that_never_reads_is_reset_after_the_write_timeout() {
    let (gw, _cfg) = gateway_with(&format!(
        "write_timeout_ms = 300\noutbound_queue_frames = 16\n{NO_RATES}"
    ));
    let n = 400;
    let mut bob = bob_stops_reading(&gw, n);
    expect_reset(&mut bob);
    // Bob catches up on another connection: nothing was lost.
    assert_eq!(synced_seqs(&gw), (1..=n as u64).collect::<Vec<_>>());
}

/// A connection reset after the write timeout while its login sync waits for room in the full
/// queue gives its session and connection slot back.
#[test]
fn a_reset_connection_whose_sync_waits_for_room_is_released() {
    let (gw, _cfg) = gateway_with(&format!(
        "write_timeout_ms = 300\noutbound_queue_frames = 16\n{NO_RATES}"
    ));
    // 400 messages of 32 KiB wait for bob, far more than his socket takes.
    let (mut alice, _) = Conn::login(gw.addr, &gw.token("alice"), "phone");
    let payload = Bytes::from(vec![3u8; 32 << 10]);
    for i in 0..400 {
        alice.send_body(send("bob", &format!("m{i}"), payload.clone()));
    }
    for _ in 0..400 {
        assert!(matches!(alice.recv_frame().body, Some(Body::SendAck(_))));
    }
    drop(alice);
    // Bob logs in asking for the sync and never reads.
    let mut bob = Conn::connect_with(gw.addr, None, Some(4096));
    let mut login = hello(&gw.token("bob"), "phone");
    login.sync_on_login = true;
    bob.send_body(Body::Hello(login));
    expect_reset(&mut bob);
    // Polled, bounded: the reset session closes on the gateway's own time.
    let deadline = Instant::now() + WAIT;
    loop {
        let open = tern_tests::metric(&gw.metrics(), "tern_connections", "");
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} connections still held {WAIT:?} after the reset"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A session that ends while its writer waits on a full socket (here: replaced by a new login
/// from the same device, long before the write timeout) resets the connection, so that the
/// writer's write fails and the writer ends by itself.
#[test]
fn a_replaced_connection_whose_client_does_not_read_is_reset() {
    let (gw, _cfg) = gateway_with(&format!(
        "write_timeout_ms = 600000\nshutdown_timeout_ms = 500\n{NO_RATES}"
    ));
    // More than the server's socket send buffer can ever hold, so that the writer waits.
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<usize>().ok())
        .unwrap_or(4 << 20);
    let n = (wmem_max / (32 << 10) + 100).max(400);
    let mut bob = bob_stops_reading(&gw, n);
    let (mut bob2, _) = Conn::login(gw.addr, &gw.token("bob"), "phone");
    expect_reset(&mut bob);
    assert_eq!(synced_seqs(&gw), (1..=n as u64).collect::<Vec<_>>());
    // The gateway goes on serving Bob's new connection.
    let (mut alice, _) = Conn::login(gw.addr, &gw.token("alice"), "tablet");
    alice.send_body(send("bob", "after", Bytes::from_static(b"after")));
    assert!(matches!(alice.recv_frame().body, Some(Body::SendAck(_))));
    loop {
        if let Some(Body::Deliver(d)) = bob2.recv_frame().body {
            assert_eq!((d.seq, &d.payload[..]), (n as u64 + 1, &b"after"[..]));
            break;
        }
    }
    // The writer ended by itself after the reset (its task was not dropped while waiting).
    // Logged before the connection closed, so it is in the log by now if it happened.
    let log = gw.log();
    assert!(!log.contains("did not end after a reset"), "{log}");
}

/// The idempotency window also ends after `dedup_window_entries` later Sends: a retry within it
/// gets the original SendAck, one after it is stored again.
#[test]
fn the_idempotency_window_holds_the_configured_number_of_sends() {
    let (gw, _dir) = gateway_with(&format!("dedup_window_entries = 1000\n{NO_RATES}"));
    let (mut alice, _) = Conn::login(gw.addr, &gw.token("alice"), "phone");
    // Sends every id back to back, then reads their SendAcks.
    fn send_all(c: &mut Conn, ids: &[String]) -> Vec<tern_protocol::SendAck> {
        let rids: Vec<u64> = ids
            .iter()
            .map(|id| c.send_body(send("bob", id, Bytes::from_static(b"m"))))
            .collect();
        rids.iter()
            .map(|&rid| match c.answer(rid) {
                Body::SendAck(a) => a,
                other => panic!("expected SendAck, got {other:?}"),
            })
            .collect()
    }
    let first = send_all(&mut alice, &["x".to_string()]).remove(0);
    assert_eq!((first.seq, first.duplicate), (1, false));
    // 999 later Sends: "x" is still remembered.
    let others: Vec<String> = (0..999).map(|i| format!("o{i}")).collect();
    let acks = send_all(&mut alice, &others);
    assert_eq!(acks.last().unwrap().seq, 1000);
    let retry = send_all(&mut alice, &["x".to_string()]).remove(0);
    assert_eq!((retry.seq, retry.duplicate), (1, true));
    // The 1000th later Send pushes it out: the next retry is a new message.
    let last = send_all(&mut alice, &["o999".to_string()]).remove(0);
    assert_eq!(last.seq, 1001);
    let again = send_all(&mut alice, &["x".to_string()]).remove(0);
    assert_eq!((again.seq, again.duplicate), (1002, false));
}

/// With `device_limit_policy = "kick_oldest"`, a login over the device limit goes on and the
/// device connected longest is kicked (REPLACED), both paths of it; the others stay.
#[test]
fn over_the_device_limit_the_oldest_device_may_be_kicked() {
    let gw = Gateway::start(&[
        "--set",
        "max_devices_per_user=2",
        "--set",
        "device_limit_policy=kick_oldest",
    ]);
    let (mut phone, ok) = Conn::login(gw.addr, &gw.token("alice"), "phone");
    // A second path of the phone's session: still one device.
    let mut phone_path = Conn::connect(gw.addr);
    let mut again = hello(&gw.token("alice"), "phone");
    again.resume_session_id = ok.session_id;
    let rid = phone_path.send_body(Body::Hello(again));
    assert!(matches!(phone_path.answer(rid), Body::HelloOk(_)));
    let (mut tablet, _) = Conn::login(gw.addr, &gw.token("alice"), "tablet");
    let (mut laptop, _) = Conn::login(gw.addr, &gw.token("alice"), "laptop");
    phone.expect_kick(KickReason::Replaced);
    phone_path.expect_kick(KickReason::Replaced);
    tablet.nothing_pending();
    laptop.nothing_pending();
    // The kicked session is gone: a path cannot join it.
    let mut late = Conn::connect(gw.addr);
    let mut join = hello(&gw.token("alice"), "phone");
    join.resume_session_id = ok.session_id;
    let rid = late.send_body(Body::Hello(join));
    assert_eq!(late.expect_error(ErrorCode::SessionNotFound), (rid, true));
    // Two devices are connected: the next login takes the tablet's place, then the laptop's.
    let (mut desktop, _) = Conn::login(gw.addr, &gw.token("alice"), "desktop");
    tablet.expect_kick(KickReason::Replaced);
    laptop.nothing_pending();
    let (_watch, _) = Conn::login(gw.addr, &gw.token("alice"), "watch");
    laptop.expect_kick(KickReason::Replaced);
    desktop.nothing_pending();
}

/// Any key of the configuration file can be set on the command line (here the device limit,
/// over which a login is refused by default).
#[test]
fn any_key_can_be_set_on_the_command_line() {
    let gw = Gateway::start(&["--set", "max_devices_per_user=1"]);
    let (_phone, _) = Conn::login(gw.addr, &gw.token("alice"), "phone");
    let mut laptop = Conn::connect(gw.addr);
    let rid = laptop.send_body(Body::Hello(hello(&gw.token("alice"), "laptop")));
    assert_eq!(laptop.expect_error(ErrorCode::TooManyDevices), (rid, true));
}

/// `tern-gateway config` prints the configuration the server would run with: every key, with
/// the file, TERN_SET, --set and the flags applied, as TOML that the server takes back as its
/// --config file, without the secrets (a password in a URL reads REDACTED). It touches no data
/// directory.
#[test]
fn the_effective_configuration_is_printed_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "max_page = 77\nrecall_window_ms = 5000\n").unwrap();
    let data = dir.path().join("data");
    let run = |extra: &[&str]| {
        std::process::Command::new(tern_tests::binary("tern-gateway"))
            .arg("--config")
            .arg(&file)
            .arg("--data-dir")
            .arg(&data)
            .args(extra)
            .env("TERN_SET", "max_friends=12;recall_window_ms=6000")
            .output()
            .unwrap()
    };
    let out = run(&[
        "--no-api",
        "--tcp",
        "127.0.0.1:9999",
        "--set",
        "recall_window_ms=7000",
        "--set",
        "secret=0123456789abcdef0123456789abcdef-not-printed",
        "--set",
        "webhook.url=http://tern:pw-not-printed@127.0.0.1:9/hook",
        "--set",
        "webhook.secret=0123456789abcdef0123456789abcdef-not-printed",
        "config",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("not-printed"), "{text}");
    let printed: toml::Table = text.parse().unwrap();
    for (key, want) in [
        ("max_page", toml::Value::Integer(77)),
        ("max_friends", toml::Value::Integer(12)),
        ("recall_window_ms", toml::Value::Integer(7000)),
        ("tcp", toml::Value::String("127.0.0.1:9999".into())),
        ("durability", toml::Value::String("fsync".into())),
        ("new_members_see_history", toml::Value::Boolean(false)),
        ("api", toml::Value::String("off".into())),
    ] {
        assert_eq!(printed.get(key), Some(&want), "{key} in\n{text}");
    }
    assert_eq!(
        printed["webhook"]["url"],
        toml::Value::String("http://tern:REDACTED@127.0.0.1:9/hook".into())
    );
    assert!(!data.exists(), "the data directory was created");
    // The printout is a configuration file the server takes (with the webhook's secret given
    // again): printed again from it, it is the same.
    std::fs::write(&file, &text).unwrap();
    let again = run(&[
        "--set",
        "webhook.secret=0123456789abcdef0123456789abcdef-not-printed",
        "config",
    ]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let reprinted: toml::Table = String::from_utf8(again.stdout).unwrap().parse().unwrap();
    let mut expected = printed.clone();
    // TERN_SET still sets recall_window_ms; the flags of the first run are not given again
    // (the file keeps them, the API's "off" too).
    expected.insert("recall_window_ms".into(), toml::Value::Integer(6000));
    assert_eq!(reprinted, expected);
    // A bad value is refused naming its key, as when the server starts.
    let bad = run(&["--set", "max_page=0", "config"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("`max_page`"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
