//! The SDK's dual channel against an in-process TCP server and an in-process QUIC server on
//! 127.0.0.1: the QUIC path joins the session the TCP login opened, each Send goes out on both
//! paths and is answered by the first SendAck (a copy refused on one path does not fail it), and
//! a path that fails leaves the session running on the other; other requests (groups) go on one
//! path.

mod common;

use common::{FakeServer, Peer, QuicServer, WAIT};
use tern_client::{
    Client, ClientError, ErrorCode, Event, GroupResponse, Incoming, Target, Transport,
};
use tern_protocol::{Body, Frame};
use tokio::time::timeout;

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
    let mut config = tcp.config();
    config.transport = Transport::Dual;
    config.server = format!("{},{}", tcp.listener.local_addr().unwrap(), quic.addr());
    config.ca = Some(quic.cert_path.clone());
    let (client, tcp_peer) = tokio::join!(Client::connect(config), tcp.accept_login(0));
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
    let tcp = FakeServer::start().await;
    let quic = QuicServer::start();
    let mut config = tcp.config();
    config.transport = Transport::Dual;
    config.server = format!("{},{}", tcp.listener.local_addr().unwrap(), quic.addr());
    config.ca = Some(quic.cert_path.clone());
    let (client, tcp_peer) = tokio::join!(Client::connect(config), tcp.accept_login(0));
    let (client, mut tcp_peer) = (client.unwrap(), tcp_peer);
    let mut incoming = client.incoming();
    let mut quic_peer = quic.accept().await;
    quic_peer.hello_ok(0).await;
    match next_event(&mut incoming).await {
        Event::PathUp { transport } => assert_eq!(transport, Transport::Quic),
        other => panic!("expected PathUp, got {other:?}"),
    }

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
