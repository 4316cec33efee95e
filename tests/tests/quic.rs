//! QUIC end to end: the same frames over one bidirectional QUIC stream, against a real gateway
//! with two cores (so sessions whose QUIC connection landed on the other core than their user's
//! are relayed between cores), mixed with TCP devices.

use tern_protocol::v1::frame::Body;
use tern_protocol::{Deliver, ErrorCode, HistoryRequest, SyncRequest, Target};
use tern_tests::{Conn, Gateway, collect_sync, expect_deliver, hello, send, send_acked, text};

fn gateway() -> Gateway {
    Gateway::start(&["--cores", "2", "--quic", "127.0.0.1:0"])
}

#[test]
fn quic_and_tcp_devices_chat_both_ways() {
    let gw = gateway();
    let quic = gw.quic.expect("QUIC address");
    let ca = gw.dev_cert();
    assert!(ca.exists(), "the development certificate was not written");
    // Sixteen users over QUIC: with two cores, the kernel puts about half of their connections
    // on the core that does not own the user, whose bytes are then relayed (that none is has a
    // probability of 2^-16; the log check below makes sure the relay was used).
    let users: Vec<String> = (0..16).map(|i| format!("q{i}")).collect();
    let mut conns: Vec<Conn> = users
        .iter()
        .map(|u| Conn::login_quic(quic, &ca, &gw.token(u), "phone").0)
        .collect();
    // The same users' laptops over TCP.
    let mut laptops: Vec<Conn> = users
        .iter()
        .map(|u| Conn::login(gw.addr, &gw.token(u), "laptop").0)
        .collect();
    // Every phone sends three messages to the next user, all at once; Delivers that arrive
    // before a phone's own acks are kept for the checks below.
    let mut early: Vec<Vec<Deliver>> = vec![Vec::new(); users.len()];
    for (i, c) in conns.iter_mut().enumerate() {
        let to = (i + 1) % users.len();
        for n in 1..=3u64 {
            send(
                c,
                &users[to],
                &format!("m{i}-{n}"),
                &format!("{i}->{to} #{n}"),
            );
        }
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let mut acks = Vec::new();
        while acks.len() < 3 {
            match c.recv_frame().body {
                Some(Body::SendAck(a)) => acks.push(a.seq),
                Some(Body::Deliver(d)) => early[i].push(d),
                other => panic!("unexpected {other:?}"),
            }
        }
        acks.sort_unstable();
        assert_eq!(acks, vec![1, 2, 3]);
    }
    for (i, (phone, laptop)) in conns.iter_mut().zip(laptops.iter_mut()).enumerate() {
        let from = (i + users.len() - 1) % users.len();
        let to = (i + 1) % users.len();
        let received: Vec<(String, u64, String)> = (1..=3u64)
            .map(|n| (users[from].clone(), n, format!("{from}->{i} #{n}")))
            .collect();
        let sent: Vec<(String, u64, String)> = (1..=3u64)
            .map(|n| (users[i].clone(), n, format!("{i}->{to} #{n}")))
            .collect();
        // The sending phone gets what was sent to it; the laptop also gets copies of what the
        // phone sent. Order is per conversation, so compare sorted.
        let mut got = collect(phone, std::mem::take(&mut early[i]), 3);
        got.sort();
        assert_eq!(got, received, "phone of {}", users[i]);
        let mut got = collect(laptop, Vec::new(), 6);
        got.sort();
        let mut want = [received, sent].concat();
        want.sort();
        assert_eq!(got, want, "laptop of {}", users[i]);
    }
    assert!(
        gw.log().contains("relay="),
        "no QUIC session was relayed between cores"
    );
}

/// `n` Delivers (those already received first) as (sender, seq, text), checking each
/// conversation is in seq order.
fn collect(c: &mut Conn, early: Vec<Deliver>, n: usize) -> Vec<(String, u64, String)> {
    let mut last: std::collections::HashMap<u64, u64> = Default::default();
    let mut early = early.into_iter();
    (0..n)
        .map(|_| {
            let d = early.next().unwrap_or_else(|| expect_deliver(c));
            let prev = last.insert(d.conversation_id, d.seq).unwrap_or(0);
            assert_eq!(
                d.seq,
                prev + 1,
                "out of order in conversation {}",
                d.conversation_id
            );
            (d.sender.clone(), d.seq, text(&d).to_string())
        })
        .collect()
}

#[test]
fn offline_quic_device_catches_up_by_sync_and_reads_history() {
    let gw = gateway();
    let quic = gw.quic.expect("QUIC address");
    let ca = gw.dev_cert();
    let (mut alice, _) = Conn::login(gw.addr, &gw.token("alice"), "phone");
    for i in 1..=120u64 {
        send_acked(&mut alice, "carol", &format!("m{i}"), &format!("msg {i}"));
    }
    let mut carol = Conn::connect_quic(quic, &ca);
    let mut h = hello(&gw.token("carol"), "tablet");
    h.sync_on_login = true;
    let rid = carol.send_body(Body::Hello(h));
    assert!(matches!(carol.recv_frame().body, Some(Body::HelloOk(_))));
    let (_, synced, _) = collect_sync(&mut carol, rid);
    for d in &synced {
        assert_eq!(text(d), format!("msg {}", d.seq));
    }
    let seqs: Vec<u64> = synced.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, (1..=120).collect::<Vec<_>>());
    // Live after the sync, and history backwards.
    send_acked(&mut alice, "carol", "live", "msg 121");
    assert_eq!(expect_deliver(&mut carol).seq, 121);
    let rid = carol.send_body(Body::History(HistoryRequest {
        conversation_id: 0,
        target: Some(Target::user("alice")),
        before_seq: 0,
        limit: 5,
    }));
    let f = carol.recv_frame();
    assert_eq!(f.request_id, rid);
    let Some(Body::HistoryPage(p)) = f.body else {
        panic!("{f:?}")
    };
    assert_eq!(
        p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![121, 120, 119, 118, 117]
    );
    assert!(p.has_more);
    // Acknowledged up to 121: a new sync on the open session carries nothing.
    carol.send_body(Body::Ack(tern_protocol::Ack {
        conversation_id: p.conversation_id,
        seq: 121,
    }));
    let rid = carol.send_body(Body::Sync(SyncRequest {
        since_version: 0,
        page_size: 0,
        ..Default::default()
    }));
    loop {
        let f = carol.recv_frame();
        assert_eq!(f.request_id, rid);
        match f.body {
            Some(Body::SyncDone(_)) => break,
            Some(Body::SyncConversations(_)) => {}
            other => panic!("nothing should be left to sync, got {other:?}"),
        }
    }
}

#[test]
fn bad_input_over_quic_gets_its_error_code_and_the_certificate_survives_restart() {
    let mut gw = gateway();
    let quic = gw.quic.expect("QUIC address");
    let ca = gw.dev_cert();
    let before = std::fs::read(&ca).unwrap();

    // Garbage before login: BAD_FRAME, fatal, and the stream ends.
    let mut c = Conn::connect_quic(quic, &ca);
    c.send_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
    let (_, fatal) = c.expect_error(ErrorCode::BadFrame);
    assert!(fatal);
    c.expect_closed();

    // A bad token: TOKEN_INVALID.
    let mut c = Conn::connect_quic(quic, &ca);
    c.send_body(Body::Hello(hello("not-a-token", "phone")));
    c.expect_error(ErrorCode::TokenInvalid);
    c.expect_closed();

    // A second Hello on a logged-in QUIC session: ALREADY_AUTHENTICATED, closed.
    let token = gw.token("dave");
    let (mut c, _) = Conn::login_quic(quic, &ca, &token, "phone");
    c.send_body(Body::Hello(hello(&token, "phone")));
    c.expect_error(ErrorCode::AlreadyAuthenticated);
    c.expect_closed();

    // Restart: the same certificate is served from the data directory.
    gw.restart();
    assert_eq!(std::fs::read(&ca).unwrap(), before);
    let quic = gw.quic.expect("QUIC address");
    let (mut c, _) = Conn::login_quic(quic, &ca, &token, "phone");
    send_acked(&mut c, "erin", "after-restart", "hello again");
}

#[test]
fn a_client_that_changes_address_keeps_its_session() {
    // Each rebind gives the client a new port, which the kernel hashes to either core; datagrams
    // that reach the core not holding the connection are forwarded to it. Without that, the
    // connection would stall on the first rebind that lands on the other core (sixteen rebinds
    // all landing on the same core: probability 2^-16).
    let gw = gateway();
    let quic = gw.quic.expect("QUIC address");
    let ca = gw.dev_cert();
    let (mut alice, _) = Conn::login_quic(quic, &ca, &gw.token("alice"), "phone");
    let (mut bob, _) = Conn::login(gw.addr, &gw.token("bob"), "phone");
    for n in 1..=16u64 {
        alice.quic().rebind();
        let ack = send_acked(
            &mut alice,
            "bob",
            &format!("m{n}"),
            &format!("after rebind {n}"),
        );
        // One conversation, both directions: alice's message is 2n-1, bob's reply 2n.
        assert_eq!(ack.seq, 2 * n - 1);
        let d = expect_deliver(&mut bob);
        assert_eq!(
            (d.seq, text(&d)),
            (2 * n - 1, format!("after rebind {n}").as_str())
        );
        // And the server's pushes reach the client at its new address.
        send_acked(&mut bob, "alice", &format!("r{n}"), &format!("reply {n}"));
        let d = expect_deliver(&mut alice);
        assert_eq!((d.seq, text(&d)), (2 * n, format!("reply {n}").as_str()));
    }
    assert!(
        alice.quic().connection().close_reason().is_none(),
        "the connection was replaced"
    );
}

#[test]
fn a_second_gateway_on_a_served_port_is_refused() {
    let gw = gateway();
    let quic = gw.quic.expect("QUIC address");
    let dir = tempfile::tempdir().unwrap();
    // Runs a second gateway, which must exit by itself; its standard error.
    let second = |args: &[&str]| {
        let log = dir.path().join("stderr");
        let mut child = std::process::Command::new(tern_tests::binary("tern-gateway"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--api", "127.0.0.1:0"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("run tern-gateway");
        let status = tern_tests::wait_child(&mut child, tern_tests::WAIT);
        assert!(status.is_some_and(|s| !s.success()), "{status:?}");
        std::fs::read_to_string(&log).unwrap()
    };
    let refused = |args: &[&str], addr: &str, verb: &str| {
        let err = second(args);
        let want = format!("cannot listen on {addr}: another process already {verb} this port");
        assert!(err.contains(&want), "{err}");
    };
    let tcp = gw.addr.to_string();
    refused(&["--tcp", &tcp], &tcp, "listens on");
    let wildcard = format!("0.0.0.0:{}", gw.addr.port());
    refused(&["--tcp", &wildcard], &wildcard, "listens on");
    let quic = quic.to_string();
    refused(
        &["--tcp", "127.0.0.1:0", "--quic", &quic],
        &quic,
        "receives on",
    );
    // The first gateway serves on, alone.
    let (mut alice, _) = gw.login(tern_tests::Via::Tcp, &gw.token("alice"), "phone");
    send_acked(&mut alice, "alice", "a1", "still here");
}
