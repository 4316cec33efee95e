//! The dual channel: one logical session over a TCP and a QUIC connection at once.
//!
//! On the wire: a second connection joins with `Hello.resume_session_id`, a Send made on both is
//! stored once and answered on both, deliveries go out on both, and bad resumes are refused.
//! With the SDK: a dual-channel client behind a TCP and a UDP proxy keeps its session while one
//! path at a time is stalled, dropped or reset, and the receiver gets every message once and in
//! order. `TERN_DUAL_ROUNDS` (default 1) sets how many times each path fails.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tern_client::{Client, ClientConfig, ClientError, Event, Target, Transport};
use tern_protocol::{Body, ErrorCode, Frame, KickReason, Ping};
use tern_tests::proxy::{TcpProxy, UdpProxy};
use tern_tests::{Conn, Gateway, NO_RATE_LIMITS, WAIT, expect_ack, expect_deliver, hello, send};

/// Sends a Hello on `conn` that joins logical session `session` as a further path; returns
/// the answer.
fn join(conn: &mut Conn, token: &str, device: &str, session: u64) -> Frame {
    let mut h = hello(token, device);
    h.resume_session_id = session;
    conn.send_body(Body::Hello(h));
    conn.recv_frame()
}

/// Like [`join`], and asserts that the path joined `session`.
fn joined(conn: &mut Conn, token: &str, device: &str, session: u64) {
    match join(conn, token, device, session).body {
        Some(Body::HelloOk(ok)) => {
            assert_eq!(ok.session_id, session, "the path joins the same session");
            assert_eq!(
                (ok.user_id.as_str(), ok.device_id.as_str()),
                ("alice", device)
            );
        }
        other => panic!("expected HelloOk, got {other:?}"),
    }
}

/// Pings and asserts that the Pong is the next frame: nothing else was queued for `conn`.
fn expect_nothing_queued(conn: &mut Conn) {
    let rid = conn.send_body(Body::Ping(Ping { client_time_ms: 1 }));
    match conn.recv_frame() {
        Frame {
            request_id,
            body: Some(Body::Pong(_)),
        } if request_id == rid => {}
        other => panic!("expected only the Pong, got {other:?}"),
    }
}

fn config_file(gw_dir: &std::path::Path, extra: &str) -> String {
    let path = gw_dir.join("dual.toml");
    std::fs::create_dir_all(gw_dir).unwrap();
    std::fs::write(&path, format!("{NO_RATE_LIMITS}{extra}")).unwrap();
    path.display().to_string()
}

#[test]
fn a_second_path_joins_the_session_and_a_send_on_both_is_stored_once() {
    let gw = Gateway::start(&["--quic", "127.0.0.1:0"]);
    let quic = gw.quic.expect("QUIC listener");
    let (alice, bob) = (gw.token("alice"), gw.token("bob"));
    let (mut tcp, ok) = Conn::login(gw.addr, &alice, "phone");
    let session = ok.session_id;
    let mut udp = Conn::connect_quic(quic, &gw.dev_cert());
    joined(&mut udp, &alice, "phone", session);
    let (mut bob_conn, _) = Conn::login(gw.addr, &bob, "laptop");

    // The same Send on both paths: one message, acked on both with the same seq.
    let r1 = send(&mut tcp, "bob", "m1", "over both");
    let r2 = send(&mut udp, "bob", "m1", "over both");
    let (a1, a2) = (expect_ack(&mut tcp, r1), expect_ack(&mut udp, r2));
    assert_eq!((a1.seq, a2.seq), (1, 1));
    assert_eq!(a1.conversation_id, a2.conversation_id);
    assert_eq!(
        [a1.duplicate, a2.duplicate].iter().filter(|d| **d).count(),
        1,
        "exactly one of the two is the stored one: {a1:?} {a2:?}"
    );
    let d = expect_deliver(&mut bob_conn);
    assert_eq!((d.seq, tern_tests::text(&d)), (1, "over both"));
    expect_nothing_queued(&mut bob_conn);
    // Neither path of the sending session gets its own message as a delivery.
    expect_nothing_queued(&mut tcp);
    expect_nothing_queued(&mut udp);

    // A message to alice goes out on both paths.
    let ack = tern_tests::send_acked(&mut bob_conn, "alice", "b1", "to both");
    for path in [&mut tcp, &mut udp] {
        let d = expect_deliver(path);
        assert_eq!((d.seq, tern_tests::text(&d)), (ack.seq, "to both"));
        expect_nothing_queued(path);
    }

    // A third connection of the same device without resume replaces the session: both paths
    // are kicked.
    let (_again, ok) = Conn::login(gw.addr, &alice, "phone");
    assert_ne!(ok.session_id, session);
    tcp.expect_kick(KickReason::Replaced);
    udp.expect_kick(KickReason::Replaced);
}

#[test]
fn a_resume_that_names_no_live_session_of_the_device_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // One device per user: the paths of a dual-channel session count as one device.
    let cfg = config_file(tmp.path(), "max_devices_per_user = 1\n");
    let gw = Gateway::start_in(tmp.path(), &["--config", &cfg]);
    let alice = gw.token("alice");
    let (mut first, ok) = Conn::login(gw.addr, &alice, "phone");
    let session = ok.session_id;

    let mallory = gw.token("mallory");
    for (token, device, id, what) in [
        (&alice, "phone", session + 1000, "an unknown session id"),
        (&alice, "tablet", session, "another device's session"),
        (&mallory, "phone", session, "another user's session"),
    ] {
        let mut c = Conn::connect(gw.addr);
        match join(&mut c, token, device, id).body {
            Some(Body::Error(e)) => {
                assert_eq!(e.code, ErrorCode::SessionNotFound as i32, "{what}: {e:?}");
                assert!(e.fatal, "{what}");
            }
            other => panic!("{what}: expected SESSION_NOT_FOUND, got {other:?}"),
        }
        c.expect_closed();
    }

    // A second path of the same device is not a second device.
    let mut second = Conn::connect(gw.addr);
    joined(&mut second, &alice, "phone", session);
    // A second device is.
    let mut other = Conn::connect(gw.addr);
    other.send_body(Body::Hello(hello(&alice, "tablet")));
    other.expect_error(ErrorCode::TooManyDevices);

    // The session lives as long as one of its paths: the first path closes, a new path
    // joins through the second.
    first.stream().shutdown(std::net::Shutdown::Write).unwrap();
    first.expect_closed();
    expect_nothing_queued(&mut second);
    let mut third = Conn::connect(gw.addr);
    joined(&mut third, &alice, "phone", session);
    // Both paths close: the session is gone and cannot be joined any more.
    drop(second);
    drop(third);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut c = Conn::connect(gw.addr);
        match join(&mut c, &alice, "phone", session).body {
            Some(Body::Error(e)) if e.code == ErrorCode::SessionNotFound as i32 => break,
            // The server has not seen the closes yet; this joined path closes again at once.
            Some(Body::HelloOk(_)) => assert!(Instant::now() < deadline, "session never ended"),
            other => panic!("expected HelloOk or SESSION_NOT_FOUND, got {other:?}"),
        }
    }
}

#[test]
fn a_message_sent_on_two_paths_counts_once_against_the_users_rate() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("rates.toml");
    // 1 message a second per user, bursts of 2; nothing else limited.
    std::fs::write(
        &path,
        "rate_messages_per_sec = 0\nrate_user_messages_per_sec = 1\n\
         rate_requests_per_sec = 0\nrate_read_bytes_per_sec = 0\n",
    )
    .unwrap();
    let gw = Gateway::start_in(tmp.path(), &["--config", path.to_str().unwrap()]);
    let alice = gw.token("alice");
    let (mut first, ok) = Conn::login(gw.addr, &alice, "phone");
    let mut second = Conn::connect(gw.addr);
    joined(&mut second, &alice, "phone", ok.session_id);
    // Two messages, each on both paths: four copies, two messages, within the burst.
    let started = Instant::now();
    for i in 1..=2u64 {
        let id = format!("m{i}");
        let (r1, r2) = (
            send(&mut first, "bob", &id, "x"),
            send(&mut second, "bob", &id, "x"),
        );
        assert_eq!(expect_ack(&mut first, r1).seq, i);
        assert_eq!(expect_ack(&mut second, r2).seq, i);
    }
    // The third is over the burst, on both paths (unless a second passed since the first).
    for path in [&mut first, &mut second] {
        send(path, "bob", "m3", "x");
        match path.recv_frame().body {
            Some(Body::Error(e)) => assert_eq!(e.code, ErrorCode::RateLimited as i32, "{e:?}"),
            other => assert!(started.elapsed() >= Duration::from_secs(1), "{other:?}"),
        }
    }
}

/// What the test's event collectors report.
#[derive(Debug)]
enum Seen {
    Path(&'static str, Event),
}

fn dual_config(gw: &Gateway, tcp: SocketAddr, udp: SocketAddr, user: &str) -> ClientConfig {
    let mut c = ClientConfig::new(format!("{tcp},{udp}"), gw.token(user), "phone");
    c.transport = Transport::Dual;
    c.ca = Some(gw.dev_cert());
    c.connect_timeout = Duration::from_millis(1000);
    c.backoff.initial = Duration::from_millis(50);
    c.backoff.max = Duration::from_millis(400);
    c
}

/// Forwards path events of `client` to `events`, and the messages to `messages`.
fn collect(
    who: &'static str,
    client: &Client,
    events: tokio::sync::mpsc::UnboundedSender<Seen>,
    messages: Option<tokio::sync::mpsc::UnboundedSender<tern_client::Deliver>>,
) {
    let mut incoming = client.incoming();
    tokio::spawn(async move {
        while let Some(event) = incoming.recv().await {
            match event {
                Event::Message(m) => {
                    if let Some(messages) = &messages {
                        let _ = messages.send(m);
                    }
                }
                Event::Conversations(_) | Event::SyncDone { .. } => {}
                // Path events, and anything that says the session itself was lost.
                e => {
                    let _ = events.send(Seen::Path(who, e));
                }
            }
        }
    });
}

/// The sending side of the test: alice sends numbered messages to bob, retrying a send that
/// failed with the path it was on (same client message id).
struct Sender {
    client: Client,
    next: u64,
    retries: u64,
}

impl Sender {
    async fn send_one(&mut self) {
        let i = self.next + 1;
        let id = format!("m{i}");
        loop {
            match self
                .client
                .send_with_id(id.clone(), Target::user("bob"), 1, format!("message {i}"))
                .await
            {
                Ok(ack) => {
                    assert_eq!(ack.seq, i, "message {i} stored with seq {}", ack.seq);
                    break;
                }
                Err(ClientError::Disconnected | ClientError::Timeout) => self.retries += 1,
                Err(e) => panic!("send {i}: {e}"),
            }
        }
        self.next = i;
    }

    /// Sends until `done` says so (checked between sends against the path events seen), and at
    /// least `min` messages; bounded.
    async fn send_until(
        &mut self,
        min: u64,
        events: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>,
        mut want: Vec<(&'static str, &'static str, Transport)>,
    ) {
        let start = self.next;
        let deadline = Instant::now() + WAIT;
        while self.next - start < min || !want.is_empty() {
            assert!(
                Instant::now() < deadline,
                "still waiting for {want:?} after {} messages",
                self.next - start
            );
            self.send_one().await;
            while let Ok(Seen::Path(who, e)) = events.try_recv() {
                let (what, transport) = match e {
                    Event::PathUp { transport } => ("up", transport),
                    Event::PathDown { transport, .. } => ("down", transport),
                    other => panic!("{who}: the session did not survive: {other:?}"),
                };
                if let Some(i) = want.iter().position(|w| *w == (who, what, transport)) {
                    want.remove(i);
                }
            }
        }
    }
}

/// Stalls TCP, then drops every UDP datagram, then resets the TCP connections, each until both
/// clients lost that path and added it again, sending all along.
async fn fail_each_path_once(
    tcp: &TcpProxy,
    udp: &UdpProxy,
    sender: &mut Sender,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<Seen>,
) {
    use Transport::{Quic, Tcp};
    // TCP stalls (every packet lost): the session goes on over QUIC; TCP comes back.
    tcp.stall();
    sender
        .send_until(
            50,
            events,
            vec![("alice", "down", Tcp), ("bob", "down", Tcp)],
        )
        .await;
    tcp.resume();
    sender
        .send_until(20, events, vec![("alice", "up", Tcp), ("bob", "up", Tcp)])
        .await;

    // UDP loses every datagram: the session goes on over TCP; QUIC comes back.
    udp.drop_all();
    sender
        .send_until(
            50,
            events,
            vec![("alice", "down", Quic), ("bob", "down", Quic)],
        )
        .await;
    udp.resume();
    sender
        .send_until(20, events, vec![("alice", "up", Quic), ("bob", "up", Quic)])
        .await;

    // The TCP connections are reset (a NAT forgot them).
    tcp.reset_all();
    sender
        .send_until(
            20,
            events,
            vec![
                ("alice", "down", Tcp),
                ("bob", "down", Tcp),
                ("alice", "up", Tcp),
                ("bob", "up", Tcp),
            ],
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_channel_session_survives_each_path_failing_and_delivers_every_message_once_in_order()
 {
    let tmp = tempfile::tempdir().unwrap();
    // A path that stops answering is noticed within 3 heartbeats (long enough that a busy
    // machine's pause does not end the session's last path).
    let cfg = config_file(
        tmp.path(),
        "heartbeat_interval_ms = 500\nidle_timeout_ms = 3000\n",
    );
    let gw = Gateway::start_in(tmp.path(), &["--config", &cfg, "--quic", "127.0.0.1:0"]);
    let tcp = TcpProxy::start(gw.addr);
    let udp = UdpProxy::start(gw.quic.expect("QUIC listener"));

    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let (messages_tx, mut messages) = tokio::sync::mpsc::unbounded_channel();
    let bob = Client::connect(dual_config(&gw, tcp.addr, udp.addr, "bob"))
        .await
        .expect("bob logs in");
    collect("bob", &bob, events_tx.clone(), Some(messages_tx));
    let alice = Client::connect(dual_config(&gw, tcp.addr, udp.addr, "alice"))
        .await
        .expect("alice logs in");
    collect("alice", &alice, events_tx, None);
    let mut sender = Sender {
        client: alice.clone(),
        next: 0,
        retries: 0,
    };
    use Transport::Quic;
    // Both log in over TCP and add QUIC.
    sender
        .send_until(
            20,
            &mut events,
            vec![("alice", "up", Quic), ("bob", "up", Quic)],
        )
        .await;

    // `TERN_DUAL_ROUNDS` (default 1) repeats the three failures, for a soak.
    let rounds: u32 = std::env::var("TERN_DUAL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for _ in 0..rounds {
        fail_each_path_once(&tcp, &udp, &mut sender, &mut events).await;
    }
    let total = sender.next;

    // Every message reached bob once, in order; a sync afterwards brings nothing new.
    let mut got = Vec::new();
    while got.len() < total as usize {
        let m = tokio::time::timeout(WAIT, messages.recv())
            .await
            .unwrap_or_else(|_| panic!("bob got {} of {total} messages", got.len()))
            .expect("bob's client stopped");
        got.push(m);
    }
    bob.sync().await.expect("sync");
    let end = alice
        .send_with_id("last", Target::user("bob"), 1, "last")
        .await
        .expect("last send");
    let last = tokio::time::timeout(WAIT, messages.recv())
        .await
        .expect("the last message")
        .expect("bob's client stopped");
    assert_eq!((last.seq, end.seq), (total + 1, total + 1));
    assert!(
        messages.try_recv().is_err(),
        "nothing after the last message"
    );
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "once each, in order");
    for m in &got {
        assert_eq!(
            (m.sender.as_str(), &m.payload[..]),
            ("alice", format!("message {}", m.seq).as_bytes())
        );
    }
    let conversations: BTreeSet<u64> = got.iter().map(|m| m.conversation_id).collect();
    assert_eq!(conversations.len(), 1);
    assert!(udp.dropped() > 0, "the UDP outage dropped datagrams");
    eprintln!(
        "dual channel: {rounds} rounds, {total} messages, {} send retries, {} TCP connections through the proxy, \
         {} datagrams forwarded, {} dropped",
        sender.retries,
        tcp.accepted(),
        udp.forwarded(),
        udp.dropped()
    );
    alice.close().await;
    bob.close().await;
}
