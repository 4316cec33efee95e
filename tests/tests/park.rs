//! Parked connections: a quiet logged-in TCP connection leaves glommio (its socket waits in the
//! shared epoll set, its tasks end) and comes back for a frame, a delivery, a kick, the peer's
//! close and shutdown, with nothing lost, doubled or reordered.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use tern_protocol::v1::frame::Body;
use tern_protocol::{Codec, Frame, KickReason, Ping, Target};
use tern_tests::{
    Conn, Gateway, NO_RATE_LIMITS, Via, WAIT, expect_ack, expect_deliver, metric, send, text,
};

fn gateway(extra_config: &str) -> Gateway {
    gateway_with_args(extra_config, &[])
}

fn gateway_with_args(extra_config: &str, args: &[&str]) -> Gateway {
    Gateway::start_with_config(
        &format!("park_after_ms = 100\n{extra_config}{NO_RATE_LIMITS}"),
        args,
    )
}

/// Waits (at most [`WAIT`]) until the gateway reports `name` at `n`, polling its metrics.
fn wait_metric(gw: &Gateway, name: &str, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = metric(&gw.metrics(), name, "");
        if now == n {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {now}, expected {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_parked(gw: &Gateway, n: u64) {
    wait_metric(gw, "tern_parked_connections", n);
}

fn ping(c: &mut Conn, at: u64) {
    let rid = c.send_body(Body::Ping(Ping { client_time_ms: at }));
    match c.answer(rid) {
        Body::Pong(p) => assert_eq!(p.client_time_ms, at),
        other => panic!("expected Pong, got {other:?}"),
    }
}

#[test]
fn parked_connections_take_frames_and_deliveries() {
    let gw = gateway("");
    let (mut alice, _) = Conn::login(gw.addr, &gw.token("alice"), "a1");
    let (mut bob, _) = Conn::login(gw.addr, &gw.token("bob"), "b1");
    wait_parked(&gw, 2);

    // A frame wakes the sender's connection; the delivery wakes the receiver's.
    let rid = send(&mut alice, "bob", "m1", "one");
    let ack = expect_ack(&mut alice, rid);
    assert_eq!(ack.seq, 1);
    let d = expect_deliver(&mut bob);
    assert_eq!((d.seq, text(&d)), (1, "one"));
    wait_parked(&gw, 2);
    ping(&mut bob, 7);

    // A frame cut in two around a parking attempt: half a frame keeps the connection awake,
    // and the second half completes it.
    let mut bytes = BytesMut::new();
    let frame = Frame {
        request_id: 99,
        body: Some(Body::Send(tern_protocol::Send {
            client_msg_id: "m2".into(),
            target: Some(Target::user("bob")),
            content_type: 1,
            custom_type: String::new(),
            payload: "two".as_bytes().to_vec().into(),
            priority: false,
        })),
    };
    Codec::default().encode(&frame, &mut bytes).unwrap();
    let half = bytes.len() / 2;
    alice.send_raw(&bytes[..half]);
    // Bob's connection parks again only after his Ping is 100 ms old; by then the sweep has
    // asked Alice's quieter connection to park too, and it must have stayed awake.
    ping(&mut bob, 8);
    wait_parked(&gw, 1);
    alice.send_raw(&bytes[half..]);
    let ack = expect_ack(&mut alice, 99);
    assert_eq!(ack.seq, 2);
    let d = expect_deliver(&mut bob);
    assert_eq!((d.seq, text(&d)), (2, "two"));

    // Many round trips through parking and back, in order and exactly once.
    for i in 3..=6u64 {
        wait_parked(&gw, 2);
        let rid = send(&mut alice, "bob", &format!("m{i}"), "again");
        let ack = expect_ack(&mut alice, rid);
        assert_eq!(ack.seq, i);
        assert_eq!(expect_deliver(&mut bob).seq, i);
    }
    alice.nothing_pending();
    bob.nothing_pending();
}

#[test]
fn parked_connections_are_kicked_and_closed() {
    // The idle timeout runs from each login: everything slow (minting tokens runs a process)
    // happens before the first one, and the timeout leaves room for a loaded machine.
    let gw = gateway("heartbeat_interval_ms = 1000\nidle_timeout_ms = 5000\n");
    let (bob_token, carol_token) = (gw.token("bob"), gw.token("carol"));
    let (mut old, _) = Conn::login(gw.addr, &bob_token, "b1");
    let (carol, _) = Conn::login(gw.addr, &carol_token, "c1");
    wait_parked(&gw, 2);

    // The same device logging in again replaces the parked connection.
    let (mut bob, _) = Conn::login(gw.addr, &bob_token, "b1");
    old.expect_kick(KickReason::Replaced);

    // The peer closing a parked connection ends its session.
    drop(carol);
    wait_metric(&gw, "tern_sessions", 1);
    wait_parked(&gw, 1);

    // Nothing for the idle timeout: kicked from parking, and closed.
    bob.expect_kick(KickReason::Idle);
    wait_metric(&gw, "tern_sessions", 0);
    wait_parked(&gw, 0);
}

#[test]
fn shutdown_wakes_parked_connections() {
    let mut gw = gateway("");
    let (mut alice, _) = Conn::login(gw.addr, &gw.token("alice"), "a1");
    let (mut bob, _) = Conn::login(gw.addr, &gw.token("bob"), "b1");
    wait_parked(&gw, 2);
    gw.stop();
    alice.expect_kick(KickReason::Shutdown);
    bob.expect_kick(KickReason::Shutdown);
}

#[test]
fn tls_and_quic_connections_do_not_park() {
    let gw = gateway_with_args("", &["--tls", "127.0.0.1:0", "--quic", "127.0.0.1:0"]);
    let (mut alice, _) = gw.login(Via::Tls, &gw.token("alice"), "a1");
    let (mut carol, _) = gw.login(Via::Quic, &gw.token("carol"), "c1");
    let (mut bob, _) = gw.login(Via::Tcp, &gw.token("bob"), "b1");
    // Only the plain TCP connection parks, although the other two were quiet for longer.
    wait_parked(&gw, 1);
    let rid = send(&mut alice, "bob", "t1", "over TLS");
    assert_eq!(expect_ack(&mut alice, rid).seq, 1);
    assert_eq!(text(&expect_deliver(&mut bob)), "over TLS");
    wait_parked(&gw, 1);
    let rid = send(&mut carol, "alice", "q1", "over QUIC");
    assert_eq!(expect_ack(&mut carol, rid).seq, 1);
    assert_eq!(text(&expect_deliver(&mut alice)), "over QUIC");
    // Bob stayed parked all along; the sweeps that parked him twice asked the others too.
    assert_eq!(metric(&gw.metrics(), "tern_parked_connections", ""), 1);
    bob.nothing_pending();
}
