//! The SDK's dual channel against an in-process TCP server and an in-process QUIC server on
//! 127.0.0.1: the QUIC path joins the session the TCP login opened, each Send goes out on both
//! paths and is answered by the first SendAck (a copy refused on one path does not fail it), and
//! a path that fails leaves the session running on the other; room requests go on both paths,
//! and a path that joins enters the rooms again; presence is followed on one path, and on the
//! other when that one fails; other requests (groups) go on one path.

mod common;

use common::{
    FakeServer, LIVE, Peer, QuicServer, WAIT, next_room_request, presence, room_deliver,
    room_response,
};
use tern_client::{
    Client, ClientError, ErrorCode, Event, GroupResponse, Incoming, Target, Transport,
};
use tern_protocol::{Body, Frame, PresenceSubscribed};
use tokio::time::timeout;

/// A dual-channel configuration: TCP to `tcp`, QUIC to `quic`.
fn dual_config(tcp: &FakeServer, quic: &QuicServer) -> tern_client::ClientConfig {
    let mut config = tcp.config();
    config.transport = Transport::Dual;
    config.server = format!("{},{}", tcp.listener.local_addr().unwrap(), quic.addr());
    config.ca = Some(quic.cert_path.clone());
    config
}

/// A dual-channel client logged in on `tcp` whose QUIC path joined on `quic` and was reported
/// up: the client, the TCP peer, the QUIC peer and the client's events.
async fn both_paths_up(tcp: &FakeServer, quic: &QuicServer) -> (Client, Peer, Peer, Incoming) {
    let (client, tcp_peer) =
        tokio::join!(Client::connect(dual_config(tcp, quic)), tcp.accept_login(0));
    let client = client.unwrap();
    let mut incoming = client.incoming();
    let mut quic_peer = quic.accept().await;
    quic_peer.hello_ok(0).await;
    match next_event(&mut incoming).await {
        Event::PathUp { transport } => assert_eq!(transport, Transport::Quic),
        other => panic!("expected PathUp, got {other:?}"),
    }
    (client, tcp_peer, quic_peer, incoming)
}

/// The next event that is not about sync.
async fn next_event(incoming: &mut Incoming) -> Event {
    loop {
        match timeout(WAIT, incoming.recv()).await.expect("no event") {
            Some(Event::SyncDone { .. } | Event::Conversations(_)) => {}
            Some(event) => return event,
            None => panic!("the client stopped"),
        }
    }
}

/// The next Send the client wrote on `peer` (syncs and pings are skipped).
async fn next_send(peer: &mut Peer) -> (u64, String) {
    loop {
        let frame = peer.recv_request().await;
        match frame.body {
            Some(Body::Send(send)) => return (frame.request_id, send.client_msg_id),
            Some(Body::Sync(_)) => {}
            other => panic!("expected Send, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn sends_go_on_both_paths_and_the_first_ack_answers_even_if_the_other_copy_is_refused() {
    let tcp = FakeServer::start().await;
    let quic = QuicServer::start();
    let (client, tcp_peer) = tokio::join!(
        Client::connect(dual_config(&tcp, &quic)),
        tcp.accept_login(0)
    );
    let (client, mut tcp_peer) = (client.unwrap(), tcp_peer);
    assert_eq!(tcp_peer.hello.resume_session_id, 0);
    assert!(tcp_peer.hello.sync_on_login);
    let mut incoming = client.incoming();

    // The QUIC path joins the TCP login's session (HelloOk.session_id 99), without a sync.
    let mut quic_peer = quic.accept().await;
    assert_eq!(quic_peer.hello.resume_session_id, 99);
    assert!(!quic_peer.hello.sync_on_login);
    assert_eq!(quic_peer.hello.device_id, "test-device");
    quic_peer.hello_ok(0).await;
    match next_event(&mut incoming).await {
        Event::PathUp { transport } => assert_eq!(transport, Transport::Quic),
        other => panic!("expected PathUp, got {other:?}"),
    }

    // One copy refused (rate-limited), the other stored: the call succeeds.
    let sending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .send_with_id("m1", Target::user("alice"), 1, "hi")
                .await
        }
    });
    let (t_rid, t_id) = next_send(&mut tcp_peer).await;
    let (q_rid, q_id) = next_send(&mut quic_peer).await;
    assert_eq!((t_id.as_str(), q_id.as_str()), ("m1", "m1"));
    tcp_peer
        .send(Frame::error(
            t_rid,
            ErrorCode::RateLimited,
            "slow down",
            false,
        ))
        .await;
    quic_peer
        .send(common::send_ack(q_rid, "m1", 1, false))
        .await;
    let got = sending.await.unwrap().expect("stored on one path");
    assert_eq!((got.seq, got.duplicate), (1, false));

    // Refused on both paths: the call fails with the error.
    let sending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .send_with_id("m2", Target::user("alice"), 1, "hi")
                .await
        }
    });
    let (t_rid, _) = next_send(&mut tcp_peer).await;
    let (q_rid, _) = next_send(&mut quic_peer).await;
    for (peer, rid) in [(&mut tcp_peer, t_rid), (&mut quic_peer, q_rid)] {
        peer.send(Frame::error(
            rid,
            ErrorCode::RateLimited,
            "slow down",
            false,
        ))
        .await;
    }
    match sending.await.unwrap() {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::RateLimited),
        other => panic!("expected RATE_LIMITED, got {other:?}"),
    }

    // The QUIC path dies with a Send in flight on both: the TCP path answers it.
    let sending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .send_with_id("m3", Target::user("alice"), 1, "hi")
                .await
        }
    });
    let (t_rid, _) = next_send(&mut tcp_peer).await;
    let _ = next_send(&mut quic_peer).await;
    quic_peer
        .connection
        .take()
        .unwrap()
        .close(0u32.into(), b"gone");
    drop(quic_peer);
    match next_event(&mut incoming).await {
        Event::PathDown { transport, .. } => assert_eq!(transport, Transport::Quic),
        other => panic!("expected PathDown, got {other:?}"),
    }
    tcp_peer.send(common::send_ack(t_rid, "m3", 3, false)).await;
    assert_eq!(sending.await.unwrap().expect("answered on TCP").seq, 3);

    // The QUIC path comes back, joining the same session again.
    let quic_peer = quic.accept().await;
    assert_eq!(quic_peer.hello.resume_session_id, 99);
    client.close().await;
}

#[tokio::test]
async fn group_requests_go_on_one_path_only() {
    let (tcp, quic) = (FakeServer::start().await, QuicServer::start());
    let (client, mut tcp_peer, mut quic_peer, _incoming) = both_paths_up(&tcp, &quic).await;

    let leaving = tokio::spawn({
        let client = client.clone();
        async move { client.leave_group("g1").await }
    });
    let (id, group_id) = loop {
        let frame = tcp_peer.recv_request().await;
        match frame.body {
            Some(Body::Group(request)) => break (frame.request_id, request.group_id),
            Some(Body::Sync(_)) => {}
            other => panic!("expected GroupRequest, got {other:?}"),
        }
    };
    assert_eq!(group_id, "g1");
    tcp_peer
        .send(Frame::new(
            id,
            GroupResponse {
                group_id: "g1".into(),
                conversation_id: 40,
                event_seq: 6,
                info: None,
                members: None,
                ..GroupResponse::default()
            },
        ))
        .await;
    assert_eq!(leaving.await.unwrap().unwrap().event_seq, 6);

    // A Send made afterwards is the next request on the QUIC path: the group request was not.
    let sending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .send_with_id("m1", Target::user("alice"), 1, "hi")
                .await
        }
    });
    let (q_rid, q_id) = next_send(&mut quic_peer).await;
    assert_eq!(q_id, "m1");
    let (_, t_id) = next_send(&mut tcp_peer).await;
    assert_eq!(t_id, "m1");
    quic_peer
        .send(common::send_ack(q_rid, "m1", 1, false))
        .await;
    assert_eq!(sending.await.unwrap().unwrap().seq, 1);
    client.close().await;
}

#[tokio::test]
async fn room_requests_go_on_both_paths_and_a_path_that_joins_enters_the_rooms() {
    let (tcp, quic) = (FakeServer::start().await, QuicServer::start());
    let (client, mut tcp_peer, mut quic_peer, mut incoming) = both_paths_up(&tcp, &quic).await;

    // EnterRoom goes on both paths; the first answer answers the call.
    let entering = tokio::spawn({
        let client = client.clone();
        async move { client.enter_room("live").await }
    });
    let (t_id, t_request) = next_room_request(&mut tcp_peer).await;
    let (q_id, q_request) = next_room_request(&mut quic_peer).await;
    assert_eq!(t_request, ("enter", "live".into()));
    assert_eq!(q_request, ("enter", "live".into()));
    quic_peer.send(room_response(q_id, "live", LIVE)).await;
    assert_eq!(entering.await.unwrap().unwrap().conversation_id, LIVE);
    tcp_peer.send(room_response(t_id, "live", LIVE)).await;

    // A room message comes on both paths and is handed over once.
    tcp_peer.send(Frame::new(0, room_deliver(1))).await;
    quic_peer.send(Frame::new(0, room_deliver(1))).await;
    match next_event(&mut incoming).await {
        Event::Message(m) => assert_eq!((m.conversation_id, m.seq), (LIVE, 1)),
        other => panic!("expected the room's message, got {other:?}"),
    }

    // The QUIC path dies and comes back: it enters the room again by itself, first thing.
    quic_peer
        .connection
        .take()
        .unwrap()
        .close(0u32.into(), b"gone");
    drop(quic_peer);
    match next_event(&mut incoming).await {
        Event::PathDown { transport, .. } => assert_eq!(transport, Transport::Quic),
        other => panic!("expected PathDown, got {other:?}"),
    }
    let mut quic_peer = quic.accept().await;
    quic_peer.hello_ok(0).await;
    let frame = quic_peer.recv_request().await;
    let Some(Body::Room(request)) = frame.body else {
        panic!("expected the path's first request to be EnterRoom, got {frame:?}");
    };
    assert_eq!(common::room_op(&request), ("enter", "live".into()));
    quic_peer
        .send(room_response(frame.request_id, "live", LIVE))
        .await;
    match next_event(&mut incoming).await {
        Event::PathUp { transport } => assert_eq!(transport, Transport::Quic),
        other => panic!("expected PathUp, got {other:?}"),
    }
    quic_peer.send(Frame::new(0, room_deliver(2))).await;
    tcp_peer.send(Frame::new(0, room_deliver(2))).await;
    match next_event(&mut incoming).await {
        Event::Message(m) => assert_eq!((m.conversation_id, m.seq), (LIVE, 2)),
        other => panic!("expected the room's message, got {other:?}"),
    }

    // LeaveRoom goes on both paths too.
    let leaving = tokio::spawn({
        let client = client.clone();
        async move { client.leave_room("live").await }
    });
    let (t_id, t_request) = next_room_request(&mut tcp_peer).await;
    let (q_id, q_request) = next_room_request(&mut quic_peer).await;
    assert_eq!(t_request, ("leave", "live".into()));
    assert_eq!(q_request, ("leave", "live".into()));
    tcp_peer.send(room_response(t_id, "live", LIVE)).await;
    quic_peer.send(room_response(q_id, "live", LIVE)).await;
    assert_eq!(leaving.await.unwrap().unwrap().room_id, "live");
    assert!(
        !matches!(incoming.try_recv(), Some(Event::Message(_))),
        "each room message handed over once"
    );
    client.close().await;
}

/// The next request on `peer` that is not a Sync.
async fn next_request(peer: &mut Peer) -> Frame {
    loop {
        let frame = peer.recv_request().await;
        if !matches!(frame.body, Some(Body::Sync(_))) {
            return frame;
        }
    }
}

/// The next request on `peer` (syncs skipped), which must be a SubscribePresence: its id and
/// users.
async fn next_subscription(peer: &mut Peer) -> (u64, Vec<String>) {
    let frame = next_request(peer).await;
    match frame.body {
        Some(Body::SubscribePresence(s)) if !s.unsubscribe => (frame.request_id, s.user_ids),
        other => panic!("expected SubscribePresence, got {other:?}"),
    }
}

#[tokio::test]
async fn presence_is_followed_on_one_path_and_on_the_other_when_it_fails() {
    let (tcp, quic) = (FakeServer::start().await, QuicServer::start());
    let (client, mut tcp_peer, mut quic_peer, mut incoming) = both_paths_up(&tcp, &quic).await;

    // The subscription goes on the login path (TCP) only.
    let subscribing = tokio::spawn({
        let client = client.clone();
        async move { client.subscribe_presence(["alice"], false).await }
    });
    let (id, users) = next_subscription(&mut tcp_peer).await;
    assert_eq!(users, ["alice"]);
    tcp_peer
        .send(Frame::new(id, PresenceSubscribed { following: 1 }))
        .await;
    assert_eq!(subscribing.await.unwrap().unwrap(), 1);
    tcp_peer.send(presence("alice", true)).await;
    match next_event(&mut incoming).await {
        Event::Presence(p) => assert_eq!((p.user_id.as_str(), p.online), ("alice", true)),
        other => panic!("expected Presence, got {other:?}"),
    }

    // The TCP path dies: alice is followed on the QUIC path at once (the first request there,
    // so the application's subscription never went on it), and only a change is told.
    drop(tcp_peer);
    match next_event(&mut incoming).await {
        Event::PathDown { transport, .. } => assert_eq!(transport, Transport::Tcp),
        other => panic!("expected PathDown, got {other:?}"),
    }
    let (id, users) = next_subscription(&mut quic_peer).await;
    assert_eq!(users, ["alice"]);
    quic_peer
        .send(Frame::new(id, PresenceSubscribed { following: 1 }))
        .await;
    quic_peer.send(presence("alice", true)).await;
    quic_peer.send(presence("alice", false)).await;
    match next_event(&mut incoming).await {
        Event::Presence(p) => assert_eq!((p.user_id.as_str(), p.online), ("alice", false)),
        other => panic!("expected Presence, got {other:?}"),
    }

    // TCP comes back; presence stays on QUIC, where the application's next subscription goes.
    let mut tcp_peer = tcp.accept_login(0).await;
    match next_event(&mut incoming).await {
        Event::PathUp { transport } => assert_eq!(transport, Transport::Tcp),
        other => panic!("expected PathUp, got {other:?}"),
    }
    let subscribing = tokio::spawn({
        let client = client.clone();
        async move { client.subscribe_presence(["bob"], false).await }
    });
    let (id, users) = next_subscription(&mut quic_peer).await;
    assert_eq!(users, ["bob"]);
    quic_peer
        .send(Frame::new(id, PresenceSubscribed { following: 2 }))
        .await;
    assert_eq!(subscribing.await.unwrap().unwrap(), 2);
    // A group request goes on TCP, the first path, and is the first request there.
    let leaving = tokio::spawn({
        let client = client.clone();
        async move { client.leave_group("g1").await }
    });
    let frame = next_request(&mut tcp_peer).await;
    let Some(Body::Group(request)) = frame.body else {
        panic!("expected the group request first on TCP, got {frame:?}");
    };
    assert_eq!(request.group_id, "g1");
    tcp_peer
        .send(Frame::new(
            frame.request_id,
            GroupResponse {
                group_id: "g1".into(),
                ..GroupResponse::default()
            },
        ))
        .await;
    leaving.await.unwrap().unwrap();
    client.close().await;
}
