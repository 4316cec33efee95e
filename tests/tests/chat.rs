//! 1:1 chat end to end: a real gateway process, real sockets, RocksDB in a temp dir. Every test
//! runs over plain TCP, TLS over TCP and QUIC (`tcp::`, `tls::`, `quic::`).

use bytes::Bytes;
use tern_protocol::v1::frame::Body;
use tern_protocol::{
    ConversationState, Deliver, Frame, HistoryRequest, SetConversation, SyncRequest, Target,
};
use tern_tests::{
    Conn, Gateway, NO_RATE_LIMITS, Via, collect_sync, expect_ack, expect_deliver, hello,
    over_every_transport, send_acked, text,
};

over_every_transport!(
    one_to_one_both_ways,
    every_device_of_the_recipient_and_the_senders_other_devices_receive,
    offline_recipient_gets_everything_in_order_on_login,
    a_sync_may_bring_only_the_latest_messages_of_each_conversation,
    nothing_acknowledged_is_lost_across_restart_and_kill,
    retried_send_gets_the_same_ack_and_is_delivered_once,
    sync_racing_with_live_sends_has_no_gap_and_no_duplicate,
    history_pages_backwards,
    sync_and_history_of_large_messages_are_split_to_fit_the_frame_limit,
    slow_consumer_is_paused_with_bounded_memory_and_catches_up_by_sync,
    slow_consumer_of_big_messages_is_paused_at_the_byte_bound,
    requests_pipelined_with_hello_survive_the_hand_off_to_the_users_core,
    custom_messages_pass_through_untouched,
    a_graceful_shutdown_tells_every_client_why,
);

fn one_to_one_both_ways(via: Via) {
    let gw = Gateway::start_via(via, &[]);
    let (mut alice, ok) = gw.login(via, &gw.token("alice"), "phone");
    assert_eq!(ok.user_id, "alice");
    assert_eq!(ok.device_id, "phone");
    let (mut bob, _) = gw.login(via, &gw.token("bob"), "phone");

    let a1 = send_acked(&mut alice, "bob", "m1", "hello bob");
    assert_eq!(a1.seq, 1);
    assert_eq!(a1.client_msg_id, "m1");
    assert!(!a1.duplicate);
    let d = expect_deliver(&mut bob);
    assert_eq!(
        (d.conversation_id, d.seq, d.sender.as_str()),
        (a1.conversation_id, 1, "alice")
    );
    assert_eq!(d.target, Some(Target::user("alice")));
    assert_eq!(text(&d), "hello bob");
    assert_eq!(d.server_time_ms, a1.server_time_ms);

    let b1 = send_acked(&mut bob, "alice", "m1", "hi alice");
    assert_eq!((b1.conversation_id, b1.seq), (a1.conversation_id, 2));
    let d = expect_deliver(&mut alice);
    assert_eq!((d.seq, d.sender.as_str(), text(&d)), (2, "bob", "hi alice"));
}

fn every_device_of_the_recipient_and_the_senders_other_devices_receive(via: Via) {
    let gw = Gateway::start_via(via, &[]);
    let (mut alice, _) = gw.login(via, &gw.token("alice"), "phone");
    let (mut alice_laptop, _) = gw.login(via, &gw.token("alice"), "laptop");
    let mut bobs: Vec<Conn> = ["phone", "tablet", "laptop"]
        .iter()
        .map(|d| gw.login(via, &gw.token("bob"), d).0)
        .collect();
    let ack = send_acked(&mut alice, "bob", "x", "to all of bob");
    for b in &mut bobs {
        let d = expect_deliver(b);
        assert_eq!(
            (d.seq, d.sender.as_str(), text(&d)),
            (ack.seq, "alice", "to all of bob")
        );
    }
    let own = expect_deliver(&mut alice_laptop);
    assert_eq!(own.target, Some(Target::user("bob")));
    assert_eq!((own.seq, own.sender.as_str()), (ack.seq, "alice"));
    // The sending device gets its SendAck, not a Deliver of its own message.
    let rid = alice.send_body(Body::Ping(Default::default()));
    assert!(
        matches!(alice.recv_frame().body, Some(Body::Pong(_))),
        "{rid}"
    );
}

fn offline_recipient_gets_everything_in_order_on_login(via: Via) {
    let gw = Gateway::start_via(via, &[]);
    let (mut alice, _) = gw.login(via, &gw.token("alice"), "phone");
    for i in 1..=250u64 {
        let a = send_acked(&mut alice, "bob", &format!("m{i}"), &format!("msg {i}"));
        assert_eq!(a.seq, i);
    }
    let (mut bob, (convs, msgs, version)) = gw.login_synced(via, "bob", "phone", 0);
    assert_eq!(convs.len(), 1);
    assert_eq!(convs[0].latest_seq, 250);
    assert_eq!(convs[0].target, Some(Target::user("alice")));
    assert_eq!(
        msgs.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=250).collect::<Vec<_>>()
    );
    assert_eq!(text(&msgs[249]), "msg 250");
    assert!(version > 0);

    // Acking moves this device's cursor: the next sync from scratch sends nothing again.
    bob.send_body(Body::Ack(tern_protocol::Ack {
        conversation_id: convs[0].conversation_id,
        seq: 250,
    }));
    let rid = bob.send_body(Body::Sync(SyncRequest {
        since_version: 0,
        page_size: 0,
        ..Default::default()
    }));
    let (convs, msgs, _) = collect_sync(&mut bob, rid);
    assert_eq!(convs[0].delivered_seq, 250, "{}", gw.log());
    assert!(msgs.is_empty(), "{msgs:?}");
}

/// A sync's conversations by the other user, each with (skipped_to_seq, delivered_seq, the seqs
/// of its messages in the order they came).
fn by_peer(convs: &[ConversationState], msgs: &[Deliver]) -> Vec<(String, u64, u64, Vec<u64>)> {
    let mut out: Vec<_> = convs
        .iter()
        .map(|c| {
            let seqs = msgs
                .iter()
                .filter(|m| m.conversation_id == c.conversation_id)
                .map(|m| m.seq)
                .collect();
            let peer = c.target.as_ref().unwrap().id.clone();
            (peer, c.skipped_to_seq, c.delivered_seq, seqs)
        })
        .collect();
    out.sort();
    out
}

fn a_sync_may_bring_only_the_latest_messages_of_each_conversation(via: Via) {
    let gw = Gateway::start_via(via, &[]);
    let (mut alice, _) = gw.login(via, &gw.token("alice"), "phone");
    let (mut carol, _) = gw.login(via, &gw.token("carol"), "phone");
    for i in 1..=12 {
        send_acked(
            &mut alice,
            "bob",
            &format!("a{i}"),
            &format!("from alice {i}"),
        );
    }
    for i in 1..=2 {
        send_acked(
            &mut carol,
            "bob",
            &format!("c{i}"),
            &format!("from carol {i}"),
        );
    }
    let sync = |c: &mut Conn, max: u32| {
        let rid = c.send_body(Body::Sync(SyncRequest {
            since_version: 0,
            page_size: 2,
            max_messages_per_conversation: max,
        }));
        let (convs, msgs, _) = collect_sync(c, rid);
        by_peer(&convs, &msgs)
    };
    let row = |peer: &str, skipped: u64, delivered: u64, seqs: std::ops::RangeInclusive<u64>| {
        (
            peer.to_string(),
            skipped,
            delivered,
            seqs.collect::<Vec<_>>(),
        )
    };

    // A new device logs in with at most 3 per conversation: alice's 10..=12, all of carol's.
    let mut phone = gw.connect(via);
    let mut h = hello(&gw.token("bob"), "phone");
    h.sync_on_login = true;
    h.sync_max_messages_per_conversation = 3;
    let rid = phone.send_body(Body::Hello(h));
    assert!(matches!(phone.recv_frame().body, Some(Body::HelloOk(_))));
    let (convs, msgs, _) = collect_sync(&mut phone, rid);
    assert_eq!(
        by_peer(&convs, &msgs),
        vec![row("alice", 9, 0, 10..=12), row("carol", 0, 0, 1..=2)]
    );
    assert_eq!(
        text(msgs.iter().find(|m| m.seq == 12).unwrap()),
        "from alice 12"
    );
    let alice_conv = if convs[0].target == Some(Target::user("alice")) {
        convs[0].conversation_id
    } else {
        convs[1].conversation_id
    };

    // What was left out stays on the server: history pages it, and a sync without the bound
    // (nothing was acknowledged) brings everything.
    let rid = phone.send_body(Body::History(HistoryRequest {
        conversation_id: alice_conv,
        target: None,
        before_seq: 10,
        limit: 50,
    }));
    let Body::HistoryPage(page) = phone.answer(rid) else {
        panic!("expected a HistoryPage")
    };
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=9).rev().collect::<Vec<_>>()
    );
    // A bound at least as large as what is unseen leaves nothing out either.
    for max in [0, 12] {
        assert_eq!(
            sync(&mut phone, max),
            vec![row("alice", 0, 0, 1..=12), row("carol", 0, 0, 1..=2)]
        );
    }

    // The bound counts from the device's delivered cursor and from what the user cleared.
    phone.send_body(Body::Ack(tern_protocol::Ack {
        conversation_id: alice_conv,
        seq: 4,
    }));
    assert_eq!(
        sync(&mut phone, 5),
        vec![row("alice", 7, 4, 8..=12), row("carol", 0, 0, 1..=2)]
    );
    let rid = phone.send_body(Body::SetConversation(SetConversation {
        conversation_id: alice_conv,
        clear_upto_seq: 10,
        ..SetConversation::default()
    }));
    assert!(matches!(phone.answer(rid), Body::ConversationSettings(_)));
    let (mut laptop, _) = gw.login(via, &gw.token("bob"), "laptop");
    assert_eq!(
        sync(&mut laptop, 1),
        vec![row("alice", 11, 0, 12..=12), row("carol", 1, 0, 2..=2)]
    );
    assert_eq!(
        sync(&mut laptop, 2),
        vec![row("alice", 0, 0, 11..=12), row("carol", 0, 0, 1..=2)]
    );
}

fn nothing_acknowledged_is_lost_across_restart_and_kill(via: Via) {
    let mut gw = Gateway::start_via(via, &[]);
    let (mut alice, _) = gw.login(via, &gw.token("alice"), "phone");
    for i in 1..=20u64 {
        send_acked(
            &mut alice,
            "bob",
            &format!("a{i}"),
            &format!("before restart {i}"),
        );
    }
    drop(alice);
    gw.restart();
    let (mut alice, _) = gw.login(via, &gw.token("alice"), "phone");
    for i in 21..=40u64 {
        let a = send_acked(
            &mut alice,
            "bob",
            &format!("a{i}"),
            &format!("before kill {i}"),
        );
        assert_eq!(a.seq, i, "sequence continues after restart");
    }
    drop(alice);
    gw.kill();
    gw.start_again();
    let (_bob, (_, msgs, _)) = gw.login_synced(via, "bob", "phone", 0);
    assert_eq!(
        msgs.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>()
    );
    assert_eq!(text(&msgs[0]), "before restart 1");
    assert_eq!(text(&msgs[39]), "before kill 40");
}

fn retried_send_gets_the_same_ack_and_is_delivered_once(via: Via) {
    let gw = Gateway::start_via(via, &[]);
    let (mut alice, _) = gw.login(via, &gw.token("alice"), "phone");
    let (mut bob, _) = gw.login(via, &gw.token("bob"), "phone");
    let first = send_acked(&mut alice, "bob", "same-id", "once");
    let again = send_acked(&mut alice, "bob", "same-id", "once");
    assert!(again.duplicate);
    assert_eq!(
        (again.conversation_id, again.seq, again.server_time_ms),
        (first.conversation_id, first.seq, first.server_time_ms)
    );
    // Also after reconnecting (a retry after a lost ack).
    drop(alice);
    let (mut alice, _) = gw.login(via, &gw.token("alice"), "phone");
    let third = send_acked(&mut alice, "bob", "same-id", "once");
    assert!(third.duplicate);
    assert_eq!(third.seq, first.seq);
    let next = send_acked(&mut alice, "bob", "other-id", "twice");
    assert_eq!(next.seq, first.seq + 1);
    // Bob sees exactly two messages: the retries produced no Deliver.
    assert_eq!(expect_deliver(&mut bob).seq, first.seq);
    let d = expect_deliver(&mut bob);
    assert_eq!((d.seq, text(&d)), (first.seq + 1, "twice"));
}

fn sync_racing_with_live_sends_has_no_gap_and_no_duplicate(via: Via) {
    let gw = Gateway::start_via(via, &[]);
    let total = 600u64;
    let alice_token = gw.token("alice");
    let (mut alice, _) = gw.login(via, &alice_token, "phone");
    // Some history first, so the sync has pages to send while live messages arrive.
    for i in 1..=200u64 {
        send_acked(&mut alice, "bob", &format!("m{i}"), "x");
    }
    let sender = std::thread::spawn(move || {
        for i in 201..=total {
            let a = send_acked(&mut alice, "bob", &format!("m{i}"), "x");
            assert_eq!(a.seq, i);
        }
    });
    let (mut bob, (_, synced, _)) = gw.login_synced(via, "bob", "phone", 0);
    let mut seqs: Vec<u64> = synced.iter().map(|m| m.seq).collect();
    assert!(!seqs.is_empty());
    while seqs.last().copied() != Some(total) {
        seqs.push(expect_deliver(&mut bob).seq);
    }
    sender.join().unwrap();
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "every message once, in order"
    );
}

fn history_pages_backwards(via: Via) {
    let gw = Gateway::start_via(via, &[]);
    let (mut alice, _) = gw.login(via, &gw.token("alice"), "phone");
    for i in 1..=25u64 {
        send_acked(&mut alice, "bob", &format!("m{i}"), &format!("h{i}"));
    }
    let (mut bob, _) = gw.login(via, &gw.token("bob"), "phone");
    let mut before = 0;
    let mut pages = Vec::new();
    loop {
        let rid = bob.send_body(Body::History(HistoryRequest {
            conversation_id: 0,
            target: Some(Target::user("alice")),
            before_seq: before,
            limit: 10,
        }));
        let f = bob.recv_frame();
        let Some(Body::HistoryPage(p)) = f.body else {
            panic!("expected HistoryPage, got {f:?}")
        };
        assert_eq!(f.request_id, rid);
        let seqs: Vec<u64> = p.messages.iter().map(|m| m.seq).collect();
        pages.push((seqs, p.has_more));
        if !p.has_more {
            break;
        }
        before = p.messages.last().unwrap().seq;
    }
    assert_eq!(
        pages,
        vec![
            ((16..=25).rev().collect(), true),
            ((6..=15).rev().collect(), true),
            ((1..=5).rev().collect(), false),
        ]
    );
}

fn sync_and_history_of_large_messages_are_split_to_fit_the_frame_limit(via: Via) {
    // 120 messages of 60 KiB: one sync page (100) or history page (50) of them is several
    // times the 1 MiB frame limit.
    let gw = Gateway::start_via(via, &[]);
    let (mut alice, _) = gw.login(via, &gw.token("alice"), "phone");
    let total = 120u64;
    for i in 1..=total {
        let text = format!("{i:>6}").repeat(10 << 10);
        send_acked(&mut alice, "bob", &format!("m{i}"), &text);
    }
    let (mut bob, _) = gw.login(via, &gw.token("bob"), "phone");
    let rid = bob.send_body(Body::Sync(SyncRequest {
        since_version: 0,
        page_size: 100,
        ..Default::default()
    }));
    let (_, msgs, _) = collect_sync(&mut bob, rid);
    assert_eq!(
        msgs.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    for m in &msgs {
        assert_eq!(text(m), format!("{:>6}", m.seq).repeat(10 << 10));
    }

    let mut before = 0;
    let mut seen = Vec::new();
    loop {
        let rid = bob.send_body(Body::History(HistoryRequest {
            conversation_id: 0,
            target: Some(Target::user("alice")),
            before_seq: before,
            limit: 50,
        }));
        let f = bob.recv_frame();
        assert_eq!(f.request_id, rid);
        let Some(Body::HistoryPage(p)) = f.body else {
            panic!("expected HistoryPage, got {f:?}")
        };
        assert!(
            !p.messages.is_empty() && p.messages.len() < 50,
            "{}",
            p.messages.len()
        );
        seen.extend(p.messages.iter().map(|m| m.seq));
        if !p.has_more {
            break;
        }
        before = p.messages.last().unwrap().seq;
    }
    assert_eq!(seen, (1..=total).rev().collect::<Vec<_>>());
}

fn slow_consumer_is_paused_with_bounded_memory_and_catches_up_by_sync(via: Via) {
    let (_gw, mut bob, grew) =
        bob_does_not_read_while_alice_sends(via, "outbound_queue_frames = 64");
    // The queue holds at most 64 frames; the rest is RocksDB's memtable and caches.
    assert!(grew < 160 << 20, "gateway grew by {} MiB", grew >> 20);
    reads_until_sync_needed_then_syncs_everything(&mut bob, SENT);
}

/// With a byte bound of 260 KiB (the least the default maximum payload allows) and the default
/// 4,096 frames, a device that does not read while 3,000 messages of 8 KiB are sent (fewer
/// frames than the frame bound) is paused too.
fn slow_consumer_of_big_messages_is_paused_at_the_byte_bound(via: Via) {
    let (_gw, mut bob, _) =
        bob_does_not_read_while_alice_sends(via, "outbound_queue_bytes = 266240");
    reads_until_sync_needed_then_syncs_everything(&mut bob, SENT);
}

/// Messages alice sends bob while he does not read.
const SENT: u64 = 3000;

/// Starts a gateway with `config` (plus no rate limits), logs alice and bob in over `via`, and
/// has alice send bob [`SENT`] messages of 8 KiB (24 MiB: far more than the socket buffers
/// hold, so the server's queue for him fills) while bob does not read. Returns the gateway, bob,
/// and how much the gateway's memory grew meanwhile.
fn bob_does_not_read_while_alice_sends(via: Via, config: &str) -> (Gateway, Conn, u64) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tern.toml"),
        // Bob's blocked writer must not be reset while Alice's synced sends run.
        format!("{config}\nwrite_timeout_ms = 600000\n{NO_RATE_LIMITS}"),
    )
    .unwrap();
    let cfg = dir.path().join("tern.toml");
    let gw = Gateway::start_via(via, &["--config", cfg.to_str().unwrap()]);
    let (mut alice, _) = gw.login(via, &gw.token("alice"), "phone");
    let (bob, _) = gw.login(via, &gw.token("bob"), "phone");
    let body = "y".repeat(8 << 10);
    let rss_before = tern_tests::rss_bytes(gw.pid());
    for i in 1..=SENT {
        send_acked(&mut alice, "bob", &format!("s{i}"), &body);
    }
    let grew = tern_tests::rss_bytes(gw.pid()).saturating_sub(rss_before);
    (gw, bob, grew)
}

/// Reads live messages 1, 2, ... until SyncNeeded (which must come before message `total`),
/// then syncs and checks that the sync brings all `total` messages (nothing was acked).
fn reads_until_sync_needed_then_syncs_everything(bob: &mut Conn, total: u64) {
    let mut seen = Vec::new();
    loop {
        let f = bob.recv_frame();
        match f.body {
            Some(Body::Deliver(d)) => seen.push(d.seq),
            Some(Body::SyncNeeded(_)) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        (seen.len() as u64) < total,
        "the server stopped pushing at some point"
    );
    assert_eq!(seen, (1..=seen.len() as u64).collect::<Vec<_>>());
    let rid = bob.send_body(Body::Sync(SyncRequest {
        since_version: 0,
        page_size: 100,
        ..Default::default()
    }));
    let (_, msgs, _) = collect_sync(bob, rid);
    let synced: Vec<u64> = msgs.iter().map(|m| m.seq).collect();
    assert_eq!(
        synced,
        (1..=total).collect::<Vec<_>>(),
        "bob never acked, so sync sends all"
    );
}

fn requests_pipelined_with_hello_survive_the_hand_off_to_the_users_core(via: Via) {
    let gw = Gateway::start_via(via, &["--cores", "2"]);
    // Enough users that some are owned by the core that did not accept the connection.
    for i in 0..12 {
        let user = format!("pipelined{i}");
        let mut c = gw.connect(via);
        let mut bytes = bytes::BytesMut::new();
        let mut codec = tern_protocol::Codec::default();
        let frames = [
            Frame::new(1, hello(&gw.token(&user), "d")),
            Frame::new(2, tern_protocol::Ping { client_time_ms: 42 }),
            Frame::new(
                3,
                tern_protocol::Send {
                    client_msg_id: "p".into(),
                    target: Some(Target::user("sink")),
                    content_type: 1,
                    custom_type: String::new(),
                    payload: Bytes::from_static(b"pipelined"),
                    priority: false,
                },
            ),
        ];
        for f in &frames {
            codec.encode(f, &mut bytes).unwrap();
        }
        c.send_raw(&bytes);
        let f = c.recv_frame();
        assert!(
            matches!(f.body, Some(Body::HelloOk(_))) && f.request_id == 1,
            "{f:?}"
        );
        let f = c.recv_frame();
        assert!(
            matches!(f.body, Some(Body::Pong(ref p)) if p.client_time_ms == 42)
                && f.request_id == 2
        );
        let ack = expect_ack(&mut c, 3);
        assert_eq!(ack.seq, 1);
    }
}

/// With every log level on, the log names what happened but never a message body, a token or
/// a secret: not for a client's Send, an API message, a token minted by the API, or a login
/// refused for a bad signature.
#[test]
fn logs_never_carry_bodies_tokens_or_secrets() {
    let mut gw = Gateway::start(&["--log", "trace"]);
    let alice = gw.token("alice");
    let (mut a, _) = gw.login(Via::Tcp, &alice, "phone");
    let (mut b, _) = gw.login(Via::Tcp, &gw.token("bob"), "phone");
    let canary = "canary-body-5f1e9b";
    send_acked(&mut a, "bob", "m1", canary);
    assert_eq!(text(&expect_deliver(&mut b)), canary);
    let api_canary = "canary-api-body-77c2d0";
    let (status, _) = gw.api_call(
        "POST",
        "/v1/messages",
        Some(&serde_json::json!({"from": "alice", "to_user": "bob", "text": api_canary})),
    );
    assert_eq!(status, 200);
    assert_eq!(text(&expect_deliver(&mut b)), api_canary);
    let (status, minted) = gw.api_call("POST", "/v1/users/carol/token", None);
    assert_eq!(status, 200);
    let minted = minted["token"].as_str().expect("a token").to_string();
    // The same token with its signature's last character changed.
    let mut forged = alice.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let mut refused = gw.connect(Via::Tcp);
    refused.send_body(Body::Hello(hello(&forged, "laptop")));
    assert!(matches!(refused.recv_frame().body, Some(Body::Error(_))));

    let secret = std::fs::read_to_string(gw.data_dir.join("secret")).unwrap();
    let api_secret = gw.api_secret();
    gw.stop();
    let log = gw.log();
    // Logging was on at every level: the logins are there, and trace lines.
    assert!(
        log.contains("logged in") && log.contains(" TRACE "),
        "{log}"
    );
    for (what, s) in [
        ("a body", canary),
        ("an API body", api_canary),
        ("a token", alice.as_str()),
        ("a minted token", minted.as_str()),
        ("a forged token", forged.as_str()),
        ("the token secret", secret.trim()),
        ("the API secret", api_secret.as_str()),
    ] {
        assert!(!log.contains(s), "the log carries {what}:\n{log}");
    }
}

/// SIGTERM with a client that reads nothing while megabytes wait for it: the gateway still
/// exits cleanly within its shutdown bound (`shutdown_timeout_ms`, here 1 s, plus the store's
/// close), a reading client is told why, and the stuck connection is reset.
#[test]
fn shutdown_keeps_its_bound_with_a_client_that_reads_nothing() {
    let mut gw = Gateway::start(&["--set", "shutdown_timeout_ms=1000"]);
    let (mut alice, _) = gw.login(Via::Tcp, &gw.token("alice"), "phone");
    let bob = gw.connect(Via::Tcp);
    // A small receive buffer that cannot grow: the gateway's writer for Bob blocks soon.
    socket2::SockRef::from(bob.stream())
        .set_recv_buffer_size(16 << 10)
        .unwrap();
    let (mut bob, _) = bob.hello_ok(&gw.token("bob"), "phone");
    let body = "z".repeat(60 << 10);
    for i in 0..100 {
        send_acked(&mut alice, "bob", &format!("z{i}"), &body);
    }
    let start = std::time::Instant::now();
    gw.stop();
    let took = start.elapsed();
    assert!(
        took < std::time::Duration::from_secs(4),
        "shutdown took {took:?}:\n{}",
        gw.log()
    );
    alice.expect_kick(tern_protocol::KickReason::Shutdown);
    // Bob gets what was in flight, then the reset; never the 6 MB queued for him.
    let mut delivered = 0;
    while let tern_tests::Recv::Frame(f) = bob.recv() {
        assert!(matches!(f.body, Some(Body::Deliver(_))), "{f:?}");
        delivered += 1;
    }
    assert!(delivered < 100, "{delivered}");
}

/// A custom message (an application's type and opaque bytes, here not UTF-8) reaches the peer
/// live, a new device's sync and the history exactly as sent.
fn custom_messages_pass_through_untouched(via: Via) {
    let gw = Gateway::start_via(via, &[]);
    let (mut alice, _) = gw.login(via, &gw.token("alice"), "phone");
    let (mut bob, _) = gw.login(via, &gw.token("bob"), "phone");
    let payload = Bytes::from_static(&[0, 159, 146, 150, 255, b'\n', 0]);
    let custom = tern_protocol::ContentType::Custom as u32;
    let rid = alice.send_body(Body::Send(tern_protocol::Send {
        client_msg_id: "c1".into(),
        target: Some(Target::user("bob")),
        content_type: custom,
        custom_type: "shop.order".into(),
        payload: payload.clone(),
        priority: false,
    }));
    let ack = expect_ack(&mut alice, rid);
    let check = |d: &Deliver| {
        assert_eq!(
            (
                d.seq,
                d.content_type,
                d.custom_type.as_str(),
                &d.payload,
                d.sender.as_str(),
                d.client_msg_id.as_str()
            ),
            (ack.seq, custom, "shop.order", &payload, "alice", "c1")
        );
    };
    check(&expect_deliver(&mut bob));
    let (mut laptop, _) = gw.login(via, &gw.token("bob"), "laptop");
    let rid = laptop.send_body(Body::Sync(SyncRequest::default()));
    let (_, msgs, _) = collect_sync(&mut laptop, rid);
    assert_eq!(msgs.len(), 1);
    check(&msgs[0]);
    let rid = laptop.send_body(Body::History(HistoryRequest {
        target: Some(Target::user("alice")),
        ..HistoryRequest::default()
    }));
    let Body::HistoryPage(page) = laptop.answer(rid) else {
        panic!("expected HistoryPage")
    };
    assert_eq!(page.messages.len(), 1);
    check(&page.messages[0]);
}

/// SIGTERM: every logged-in client gets Kick SHUTDOWN and then the end of its connection, and
/// the gateway exits 0; after a start on the same data directory the messages are there.
fn a_graceful_shutdown_tells_every_client_why(via: Via) {
    let mut gw = Gateway::start_via(via, &[]);
    let (mut alice, _) = gw.login(via, &gw.token("alice"), "phone");
    let (mut bob, _) = gw.login(via, &gw.token("bob"), "phone");
    let ack = send_acked(&mut alice, "bob", "m1", "before the stop");
    assert_eq!(text(&expect_deliver(&mut bob)), "before the stop");
    gw.stop();
    alice.expect_kick(tern_protocol::KickReason::Shutdown);
    bob.expect_kick(tern_protocol::KickReason::Shutdown);
    gw.start_again();
    let (mut bob, _) = gw.login(via, &gw.token("bob"), "phone");
    let rid = bob.send_body(Body::History(tern_protocol::HistoryRequest {
        conversation_id: ack.conversation_id,
        ..Default::default()
    }));
    match bob.answer(rid) {
        Body::HistoryPage(p) => {
            let got: Vec<(u64, &str)> = p.messages.iter().map(|m| (m.seq, text(m))).collect();
            assert_eq!(got, [(1, "before the stop")]);
        }
        other => panic!("expected HistoryPage, got {other:?}"),
    }
}
