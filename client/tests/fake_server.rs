//! The SDK against a tiny in-process server that speaks the protocol over a real TCP socket:
//! login, request matching, typed errors, de-duplication of sync pages against live pushes,
//! auto-ack, SyncNeeded, heartbeats, reconnect with the sync position, final kicks, and group
//! requests.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{FakeServer, WAIT, deliver};
use prost::Message;
use tern_client::{
    Client, ClientError, ContentType, ErrorCode, Event, GroupEvent, GroupEventKind, GroupOp,
    GroupResponse, Incoming, KickReason, Target,
};
use tern_protocol::{
    Ack, Body, ConversationState, Frame, GROUP_EVENT_TYPE, GroupRequest, HistoryPage, Pong,
    SendAck, SyncConversations, SyncDone, SyncMessages, SyncNeeded,
    v1::{GetGroup, KickMembers, MuteMember},
};
use tokio::time::timeout;

async fn next_event(incoming: &mut Incoming) -> Option<Event> {
    timeout(WAIT, incoming.recv()).await.expect("no event")
}

/// Messages until SyncDone; returns (conversation, seq) pairs and the sync version.
async fn messages_until_sync_done(incoming: &mut Incoming) -> (Vec<(u64, u64)>, u64) {
    let mut seen = Vec::new();
    loop {
        match next_event(incoming).await {
            Some(Event::Message(m)) => seen.push((m.conversation_id, m.seq)),
            Some(Event::SyncDone { user_version }) => return (seen, user_version),
            Some(Event::Conversations(_)) => {}
            other => panic!("unexpected event {other:?}"),
        }
    }
}

#[tokio::test]
async fn send_gets_its_ack_and_server_errors_are_typed() {
    let server = FakeServer::start().await;
    let config = server.config();
    let (client, peer) = tokio::join!(Client::connect(config), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    assert_eq!(peer.hello.protocol_version, 1);
    assert_eq!(peer.hello.token, "token-bob");
    assert_eq!(peer.hello.device_id, "test-device");
    assert!(peer.hello.sync_on_login);
    assert_eq!(peer.hello.sync_version, 0);
    assert_eq!(client.login().unwrap().user_id, "bob");

    let ack = common::send_text_answered(&client, &mut peer, "hi").await;
    assert_eq!(ack.client_msg_id.len(), 32, "128-bit hex id");
    assert_eq!((ack.conversation_id, ack.seq), (12, 1));

    let sending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .send_with_id("fixed", Target::user("nobody"), 1, "x")
                .await
        }
    });
    let frame = peer.recv_request().await;
    assert!(matches!(&frame.body, Some(Body::Send(s)) if s.client_msg_id == "fixed"));
    peer.send(Frame::error(
        frame.request_id,
        ErrorCode::NotFound,
        "no such user",
        false,
    ))
    .await;
    match sending.await.unwrap() {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::NotFound);
            assert_eq!(message, "no such user");
        }
        other => panic!("expected a server error, got {other:?}"),
    }

    let paging = tokio::spawn({
        let client = client.clone();
        async move { client.history(Target::user("alice"), 0, 2).await }
    });
    let frame = peer.recv_request().await;
    let Some(Body::History(request)) = frame.body else {
        panic!("expected HistoryRequest, got {frame:?}");
    };
    assert_eq!(request.target, Some(Target::user("alice")));
    assert_eq!(request.limit, 2);
    peer.send(Frame::new(
        frame.request_id,
        HistoryPage {
            conversation_id: 12,
            messages: vec![deliver(12, 2), deliver(12, 1)],
            has_more: false,
        },
    ))
    .await;
    let page = paging.await.unwrap().unwrap();
    assert_eq!(page.messages.len(), 2);

    client.close().await;
    assert!(peer.recv().await.is_none(), "close shuts the connection");
    assert!(matches!(
        client.send(Target::user("a"), 1, "x").await,
        Err(ClientError::Closed)
    ));
}

#[tokio::test]
async fn rejected_login_fails_connect() {
    let server = FakeServer::start().await;
    let config = server.config();
    let refuse = async {
        let mut peer = server.accept().await;
        let id = peer.hello_id;
        peer.send(Frame::error(id, ErrorCode::TokenExpired, "expired", true))
            .await;
        peer
    };
    let (result, _peer) = tokio::join!(Client::connect(config), refuse);
    match result {
        Err(e @ ClientError::Server { .. }) => {
            assert_eq!(e.code(), Some(ErrorCode::TokenExpired));
            assert!(e.is_permanent());
        }
        other => panic!("expected TOKEN_EXPIRED, got {other:?}"),
    }
}

#[tokio::test]
async fn sync_pages_and_live_pushes_are_deduplicated_and_acked() {
    let server = FakeServer::start().await;
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    let mut incoming = client.incoming();

    // A live push overtakes the login sync, which then repeats it.
    let id = peer.hello_id;
    peer.send(Frame::new(0, deliver(5, 3))).await;
    peer.send(Frame::new(
        id,
        SyncConversations {
            conversations: vec![ConversationState {
                conversation_id: 5,
                target: Some(Target::user("alice")),
                latest_seq: 4,
                read_seq: 0,
                delivered_seq: 1,
                version: 9,
                left: false,
                settings: None,
            }],
        },
    ))
    .await;
    peer.send(Frame::new(
        id,
        SyncMessages {
            conversation_id: 5,
            messages: vec![deliver(5, 2), deliver(5, 3), deliver(5, 4)],
        },
    ))
    .await;
    peer.send(Frame::new(id, SyncDone { user_version: 10 }))
        .await;
    peer.send(Frame::new(0, deliver(5, 4))).await;
    peer.send(Frame::new(0, deliver(5, 5))).await;
    peer.send(Frame::new(0, deliver(5, 3))).await;

    let (mut seen, version) = messages_until_sync_done(&mut incoming).await;
    assert_eq!(version, 10);
    while seen.len() < 4 {
        match next_event(&mut incoming).await {
            Some(Event::Message(m)) => seen.push((m.conversation_id, m.seq)),
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(seen, [(5, 3), (5, 2), (5, 4), (5, 5)]);
    assert!(incoming.try_recv().is_none(), "nothing handed over twice");
    assert_eq!(client.sync_version(), 10);

    // Acks: coalesced, increasing, ending at the highest contiguous seq.
    let mut acks = Vec::new();
    while acks.last() != Some(&5) {
        match peer.recv().await.expect("closed").body {
            Some(Body::Ack(Ack {
                conversation_id,
                seq,
            })) => {
                assert_eq!(conversation_id, 5);
                acks.push(seq);
            }
            other => panic!("expected Ack, got {other:?}"),
        }
    }
    assert!(acks.windows(2).all(|w| w[0] < w[1]), "acks {acks:?}");
    assert!(acks.len() <= 3, "acks are coalesced: {acks:?}");
    assert!(!acks.contains(&3), "no ack while the base was unknown");
}

#[tokio::test]
async fn sync_needed_and_explicit_sync_start_from_the_stored_position() {
    let server = FakeServer::start().await;
    let mut config = server.config();
    config.sync_version = 4;
    config.auto_ack = false;
    let (client, peer) = tokio::join!(Client::connect(config), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    assert_eq!(peer.hello.sync_version, 4);
    let mut incoming = client.incoming();

    peer.send(Frame::new(peer.hello_id, SyncDone { user_version: 6 }))
        .await;
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::SyncDone { user_version: 6 })
    ));
    peer.send(Frame::new(0, SyncNeeded { user_version: 8 }))
        .await;
    let frame = peer.recv_request().await;
    assert!(matches!(frame.body, Some(Body::Sync(ref r)) if r.since_version == 6));
    peer.send(Frame::new(frame.request_id, SyncDone { user_version: 8 }))
        .await;
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::SyncDone { user_version: 8 })
    ));

    let syncing = tokio::spawn({
        let client = client.clone();
        async move { client.sync().await }
    });
    let frame = peer.recv_request().await;
    assert!(matches!(frame.body, Some(Body::Sync(ref r)) if r.since_version == 8));
    peer.send(Frame::new(
        frame.request_id,
        SyncMessages {
            conversation_id: 3,
            messages: vec![deliver(3, 1)],
        },
    ))
    .await;
    peer.send(Frame::new(frame.request_id, SyncDone { user_version: 9 }))
        .await;
    assert_eq!(syncing.await.unwrap().unwrap(), 9);
    let (seen, _) = messages_until_sync_done(&mut incoming).await;
    assert_eq!(seen, [(3, 1)]);

    // Manual ack mode: only what the application asks for.
    client.ack(3, 1).unwrap();
    let frame = peer.recv().await.unwrap();
    assert!(matches!(
        frame.body,
        Some(Body::Ack(Ack {
            conversation_id: 3,
            seq: 1
        }))
    ));
}

#[tokio::test]
async fn pings_when_idle() {
    let server = FakeServer::start().await;
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(50));
    let (client, mut peer) = (client.unwrap(), peer);
    let frame = peer.recv().await.unwrap();
    let Some(Body::Ping(ping)) = frame.body else {
        panic!("expected Ping, got {frame:?}");
    };
    assert!(ping.client_time_ms > 0);
    peer.send(Frame::new(
        frame.request_id,
        Pong {
            client_time_ms: ping.client_time_ms,
            server_time_ms: 1,
        },
    ))
    .await;
    // An explicit ping round trip too.
    let pinging = tokio::spawn({
        let client = client.clone();
        async move { client.ping().await }
    });
    loop {
        let frame = peer.recv().await.unwrap();
        if let Some(Body::Ping(ping)) = frame.body {
            peer.send(Frame::new(
                frame.request_id,
                Pong {
                    client_time_ms: ping.client_time_ms,
                    server_time_ms: 1,
                },
            ))
            .await;
        }
        if pinging.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(pinging.await.unwrap().is_ok());
}

#[tokio::test]
async fn reconnects_from_the_sync_position_and_fails_requests_in_flight() {
    let server = FakeServer::start().await;
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    let mut incoming = client.incoming();
    peer.send(Frame::new(0, deliver(7, 1))).await;
    peer.send(Frame::new(peer.hello_id, SyncDone { user_version: 21 }))
        .await;
    let (seen, _) = messages_until_sync_done(&mut incoming).await;
    assert_eq!(seen, [(7, 1)]);

    let sending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .send_with_id("retry-me", Target::user("alice"), 1, "x")
                .await
        }
    });
    let frame = peer.recv_request().await;
    assert!(matches!(frame.body, Some(Body::Send(_))));
    drop(peer); // the connection dies before the SendAck
    assert!(matches!(
        sending.await.unwrap(),
        Err(ClientError::Disconnected)
    ));
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Disconnected { .. })
    ));

    let mut peer = server.accept_login(0).await;
    assert_eq!(
        peer.hello.sync_version, 21,
        "resumes from the last SyncDone"
    );
    assert!(peer.hello.sync_on_login);
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Reconnected)
    ));

    // The resumed sync repeats seq 1 and adds seq 2; only 2 is new.
    let id = peer.hello_id;
    peer.send(Frame::new(
        id,
        SyncMessages {
            conversation_id: 7,
            messages: vec![deliver(7, 1), deliver(7, 2)],
        },
    ))
    .await;
    peer.send(Frame::new(id, SyncDone { user_version: 22 }))
        .await;
    let (seen, version) = messages_until_sync_done(&mut incoming).await;
    assert_eq!(seen, [(7, 2)]);
    assert_eq!(version, 22);

    // The retry with the same id goes through on the new connection.
    let ack = common::send_answered(&client, &mut peer, "retry-me", 3, true).await;
    assert!(ack.duplicate);
}

#[tokio::test]
async fn a_replaced_kick_stops_the_client_and_a_shutdown_kick_reconnects() {
    let server = FakeServer::start().await;
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    let mut incoming = client.incoming();

    peer.send(Frame::kick(KickReason::Shutdown, "restarting"))
        .await;
    drop(peer);
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Kicked(_))
    ));
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Disconnected { .. })
    ));
    let mut peer = server.accept_login(0).await;
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Reconnected)
    ));

    peer.send(Frame::kick(KickReason::Replaced, "another login"))
        .await;
    drop(peer);
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Kicked(_))
    ));
    match next_event(&mut incoming).await {
        Some(Event::Stopped(ClientError::Kicked { reason, .. })) => {
            assert_eq!(reason, KickReason::Replaced);
        }
        other => panic!("expected Stopped, got {other:?}"),
    }
    assert!(next_event(&mut incoming).await.is_none(), "stream ends");
    assert!(
        timeout(Duration::from_millis(300), server.listener.accept())
            .await
            .is_err(),
        "no reconnect after REPLACED"
    );
    assert!(matches!(
        client.send(Target::user("a"), 1, "x").await,
        Err(ClientError::Closed)
    ));
}

#[tokio::test]
async fn a_sender_faster_than_the_connection_is_slowed_down_not_disconnected() {
    let server = FakeServer::start().await;
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    let mut incoming = client.incoming();
    // 400 Sends of 60 KiB (24 MiB) at once: more than the client keeps queued for a connection.
    let payload = Bytes::from(vec![b'x'; 60 << 10]);
    let sends: Vec<_> = (0..400)
        .map(|i| {
            let (client, payload) = (client.clone(), payload.clone());
            tokio::spawn(async move {
                client
                    .send_with_id(format!("s{i}"), Target::user("a"), 1, payload)
                    .await
            })
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 400 {
        let frame = peer.recv_request().await;
        match frame.body {
            Some(Body::Send(send)) => {
                assert_eq!(send.payload.len(), 60 << 10);
                assert!(seen.insert(send.client_msg_id.clone()), "sent twice");
                peer.send(Frame::new(
                    frame.request_id,
                    SendAck {
                        client_msg_id: send.client_msg_id,
                        conversation_id: 1,
                        seq: seen.len() as u64,
                        server_time_ms: 1,
                        duplicate: false,
                    },
                ))
                .await;
            }
            Some(Body::Sync(_)) => {}
            other => panic!("expected Send, got {other:?}"),
        }
    }
    for send in sends {
        send.await.unwrap().expect("every send answered");
    }
    while let Some(event) = incoming.try_recv() {
        assert!(
            !matches!(event, Event::Disconnected { .. }),
            "the connection was dropped: {event:?}"
        );
    }
}

/// The next GroupRequest the client wrote on `peer` and its request id.
async fn next_group_request(peer: &mut common::Peer) -> (u64, GroupRequest) {
    let frame = peer.recv_request().await;
    match frame.body {
        Some(Body::Group(request)) => (frame.request_id, request),
        other => panic!("expected GroupRequest, got {other:?}"),
    }
}

fn group_response(group_id: &str, event_seq: u64) -> GroupResponse {
    GroupResponse {
        group_id: group_id.into(),
        conversation_id: 40,
        event_seq,
        info: None,
        members: None,
        ..GroupResponse::default()
    }
}

#[tokio::test]
async fn group_requests_get_the_answer_to_their_own_request_id_and_typed_errors() {
    let server = FakeServer::start().await;
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    let mut incoming = client.incoming();
    peer.send(Frame::new(peer.hello_id, SyncDone { user_version: 1 }))
        .await;

    // Two requests in flight, answered in the opposite order.
    let getting = tokio::spawn({
        let client = client.clone();
        async move { client.group("g1", GroupOp::Get(GetGroup {})).await }
    });
    let (first_id, first) = next_group_request(&mut peer).await;
    assert_eq!(first.group_id, "g1");
    assert_eq!(first.op, Some(GroupOp::Get(GetGroup {})));
    let muting = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .mute_member("g2", "carol", Duration::from_secs(600))
                .await
        }
    });
    let (second_id, second) = next_group_request(&mut peer).await;
    assert_ne!(first_id, second_id);
    assert_eq!(second.group_id, "g2");
    assert_eq!(
        second.op,
        Some(GroupOp::Mute(MuteMember {
            user_id: "carol".into(),
            duration_ms: 600_000,
        }))
    );
    peer.send(Frame::new(second_id, group_response("g2", 8)))
        .await;
    peer.send(Frame::new(first_id, group_response("g1", 0)))
        .await;
    assert_eq!(muting.await.unwrap().unwrap(), group_response("g2", 8));
    assert_eq!(getting.await.unwrap().unwrap(), group_response("g1", 0));

    // A refusal is a typed server error.
    let kicking = tokio::spawn({
        let client = client.clone();
        async move { client.kick_members("g1", ["bob", "dave"], "spam").await }
    });
    let (id, request) = next_group_request(&mut peer).await;
    assert_eq!(
        request.op,
        Some(GroupOp::Kick(KickMembers {
            user_ids: vec!["bob".into(), "dave".into()],
            reason: "spam".into(),
        }))
    );
    peer.send(Frame::error(
        id,
        ErrorCode::Forbidden,
        "an admin cannot remove another admin",
        false,
    ))
    .await;
    match kicking.await.unwrap() {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::Forbidden);
            assert_eq!(message, "an admin cannot remove another admin");
        }
        other => panic!("expected FORBIDDEN, got {other:?}"),
    }

    // Any other answer is a protocol violation; a GetGroup answer needs the info.
    let joining = tokio::spawn({
        let client = client.clone();
        async move { client.join_group("g3").await }
    });
    let (id, _) = next_group_request(&mut peer).await;
    peer.send(common::send_ack(id, "x", 1, false)).await;
    match joining.await.unwrap() {
        Err(ClientError::Protocol(text)) => {
            assert_eq!(text, "expected GroupResponse, got SendAck");
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
    let reading = tokio::spawn({
        let client = client.clone();
        async move { client.group_info("g1").await }
    });
    let (id, _) = next_group_request(&mut peer).await;
    peer.send(Frame::new(id, group_response("g1", 0))).await;
    match reading.await.unwrap() {
        Err(ClientError::Protocol(text)) => {
            assert_eq!(text, "GroupResponse to GetGroup without info");
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }

    // A group's change arrives as a message that group_event decodes.
    let event = GroupEvent {
        kind: GroupEventKind::GroupKicked.into(),
        actor: "alice".into(),
        user_ids: vec!["bob".into()],
        ..Default::default()
    };
    let mut message = deliver(40, 3);
    message.target = Some(Target::group("g1"));
    message.content_type = ContentType::System as u32;
    message.custom_type = GROUP_EVENT_TYPE.into();
    message.payload = Bytes::from(event.encode_to_vec());
    peer.send(Frame::new(0, message)).await;
    loop {
        match next_event(&mut incoming).await {
            Some(Event::Message(m)) => {
                assert_eq!(tern_client::group_event(&m), Some(event));
                assert_eq!(tern_client::group_event(&deliver(40, 4)), None);
                break;
            }
            Some(Event::SyncDone { .. }) => {}
            other => panic!("unexpected event {other:?}"),
        }
    }
}
