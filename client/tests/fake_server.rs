//! The SDK against a tiny in-process server that speaks the protocol over a real TCP socket:
//! login, request matching, typed errors, de-duplication of sync pages against live pushes,
//! auto-ack, SyncNeeded, heartbeats, reconnect with the sync position, final kicks, group
//! requests, live rooms (requests, no acks, entered again on each new connection), read
//! positions, presence (followed again on each new connection, only changes told), settings,
//! recall and social requests, and the server's other pushes as events.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{
    FakeServer, LIVE, WAIT, answer_ping, deliver, next_room_request, presence, room_deliver,
    room_response,
};
use prost::Message;
use tern_client::{
    Client, ClientError, ContentType, ErrorCode, Event, GroupEvent, GroupEventKind, GroupOp,
    GroupResponse, Incoming, KickReason, ListKind, ListedUser, SocialOp, Target, TargetKind,
};
use tern_protocol::{
    Ack, Body, ConversationSettings, ConversationState, Deliver, Frame, GROUP_EVENT_TYPE,
    GetReadCounts, GroupRequest, HistoryPage, MarkRead, Presence, PresenceSubscribed,
    RECALL_EVENT_TYPE, ReadCounts, ReadReceipt, ReadState, Recall, RecallEvent, RecallOk, SendAck,
    SetConversation, SocialEvent, SocialEventKind, SocialRequest, SocialResponse,
    SubscribePresence, SyncConversations, SyncDone, SyncMessages, SyncNeeded, Typing, UserProfile,
    v1::{
        AcceptFriend, AddFriend, Block, GetGroup, GetProfiles, KickMembers, ListUsers, MuteMember,
    },
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
                peer_read_seq: 0,
                skipped_to_seq: 0,
                unread: 4,
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
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(300));
    let (client, mut peer) = (client.unwrap(), peer);
    let frame = peer.recv().await.unwrap();
    let ping = answer_ping(&mut peer, &frame)
        .await
        .unwrap_or_else(|| panic!("expected Ping, got {frame:?}"));
    assert!(ping.client_time_ms > 0);
    // An explicit ping round trip too.
    let pinging = tokio::spawn({
        let client = client.clone();
        async move { client.ping().await }
    });
    loop {
        let frame = peer.recv().await.unwrap();
        answer_ping(&mut peer, &frame).await;
        if pinging.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(pinging.await.unwrap().is_ok());
}

#[tokio::test]
async fn reconnects_from_the_sync_position_and_sends_again_what_was_in_flight() {
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
        next_event(&mut incoming).await,
        Some(Event::Disconnected { .. })
    ));
    // A Send made while the client is disconnected (polled once: it is with the client now).
    let mut two = std::pin::pin!(client.send_with_id("two", Target::user("alice"), 1, "y"));
    tokio::select! {
        biased;
        answer = &mut two => panic!("answered while disconnected: {answer:?}"),
        () = std::future::ready(()) => {}
    }
    // The next login fails (closed before HelloOk), so the client waits out a backoff with the
    // Send in hand whether it came before or during that attempt.
    drop(server.accept().await);

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

    // The Send goes out again with the same id on the new connection, and its answer (the
    // server had stored it) answers the call.
    common::answer_send(&mut peer, "retry-me", 3, true).await;
    let ack = sending.await.unwrap().unwrap();
    assert_eq!((ack.seq, ack.duplicate), (3, true));
    // Then the Send made while disconnected.
    common::answer_send(&mut peer, "two", 4, false).await;
    assert_eq!(two.await.unwrap().seq, 4);
    // A retry by the application with the same id is answered the same way.
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

#[tokio::test]
async fn room_requests_get_their_own_answers_and_room_sends_carry_priority() {
    let server = FakeServer::start().await;
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    peer.send(Frame::new(peer.hello_id, SyncDone { user_version: 1 }))
        .await;

    // Two enters in flight, answered in the opposite order.
    let entering_live = tokio::spawn({
        let client = client.clone();
        async move { client.enter_room("live").await }
    });
    let (live_id, live) = next_room_request(&mut peer).await;
    assert_eq!(live, ("enter", "live".into()));
    let entering_busy = tokio::spawn({
        let client = client.clone();
        async move { client.enter_room("busy").await }
    });
    let (busy_id, busy) = next_room_request(&mut peer).await;
    assert_eq!(busy, ("enter", "busy".into()));
    assert_ne!(live_id, busy_id);
    peer.send(room_response(busy_id, "busy", (1 << 62) | 5))
        .await;
    peer.send(room_response(live_id, "live", LIVE)).await;
    let busy = entering_busy.await.unwrap().unwrap();
    assert_eq!(
        (busy.room_id.as_str(), busy.conversation_id),
        ("busy", (1 << 62) | 5)
    );
    let live = entering_live.await.unwrap().unwrap();
    assert_eq!(
        (live.room_id.as_str(), live.conversation_id),
        ("live", LIVE)
    );

    // A refusal is a typed server error.
    let entering = tokio::spawn({
        let client = client.clone();
        async move { client.enter_room("seventeenth").await }
    });
    let (id, request) = next_room_request(&mut peer).await;
    assert_eq!(request, ("enter", "seventeenth".into()));
    peer.send(Frame::error(
        id,
        ErrorCode::LimitExceeded,
        "at most 16 rooms",
        false,
    ))
    .await;
    match entering.await.unwrap() {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::LimitExceeded);
            assert_eq!(message, "at most 16 rooms");
        }
        other => panic!("expected LIMIT_EXCEEDED, got {other:?}"),
    }

    // A room Send: target ROOM, priority as asked.
    for priority in [true, false] {
        let sending = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .send_room("live", ContentType::Text as u32, "gift", priority)
                    .await
            }
        });
        let frame = peer.recv_request().await;
        let Some(Body::Send(send)) = frame.body else {
            panic!("expected Send, got {frame:?}");
        };
        assert_eq!(send.target, Some(Target::new(TargetKind::Room, "live")));
        assert_eq!(send.priority, priority);
        assert_eq!(send.content_type, ContentType::Text as u32);
        assert_eq!(&send.payload[..], b"gift");
        assert_eq!(send.client_msg_id.len(), 32);
        peer.send(Frame::new(
            frame.request_id,
            SendAck {
                client_msg_id: send.client_msg_id.clone(),
                conversation_id: LIVE,
                seq: 9,
                server_time_ms: 5,
                duplicate: false,
            },
        ))
        .await;
        let ack = sending.await.unwrap().unwrap();
        assert_eq!((ack.conversation_id, ack.seq), (LIVE, 9));
        assert_eq!(ack.client_msg_id, send.client_msg_id);
    }

    let leaving = tokio::spawn({
        let client = client.clone();
        async move { client.leave_room("busy").await }
    });
    let (id, request) = next_room_request(&mut peer).await;
    assert_eq!(request, ("leave", "busy".into()));
    peer.send(room_response(id, "busy", (1 << 62) | 5)).await;
    assert_eq!(leaving.await.unwrap().unwrap().room_id, "busy");
}

#[tokio::test]
async fn room_messages_are_handed_over_once_and_never_acked() {
    let server = FakeServer::start().await;
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    let mut incoming = client.incoming();
    peer.send(Frame::new(peer.hello_id, SyncDone { user_version: 1 }))
        .await;
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::SyncDone { user_version: 1 })
    ));

    // Each batch read is handled (and its acks written) before the next is sent.
    let batches = [
        (vec![deliver(7, 1)], 1),
        (
            vec![
                room_deliver(5),
                room_deliver(6),
                room_deliver(6),
                room_deliver(5),
            ],
            2,
        ),
        (vec![deliver(7, 2)], 1),
    ];
    let mut seen = Vec::new();
    for (batch, new) in batches {
        let wanted = seen.len() + new;
        for m in batch {
            peer.send(Frame::new(0, m)).await;
        }
        while seen.len() < wanted {
            match next_event(&mut incoming).await {
                Some(Event::Message(m)) => seen.push((m.conversation_id, m.seq)),
                other => panic!("unexpected event {other:?}"),
            }
        }
        // The application acks a room message itself too: not sent either.
        client.ack(LIVE, 6).unwrap();
    }
    assert_eq!(seen, [(7, 1), (LIVE, 5), (LIVE, 6), (7, 2)]);

    // Everything written before the application's ping: only the 1:1 conversation's acks.
    let pinging = tokio::spawn({
        let client = client.clone();
        async move { client.ping().await }
    });
    let mut acks = Vec::new();
    loop {
        let frame = peer.recv().await.expect("closed");
        match &frame.body {
            Some(Body::Ack(Ack {
                conversation_id,
                seq,
            })) => acks.push((*conversation_id, *seq)),
            Some(Body::Ping(_)) => {
                answer_ping(&mut peer, &frame).await;
                break;
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
    pinging.await.unwrap().unwrap();
    assert_eq!(acks, [(7, 1), (7, 2)]);
    assert!(incoming.try_recv().is_none(), "nothing handed over twice");
}

#[tokio::test]
async fn rooms_are_entered_again_first_thing_on_each_new_connection() {
    let server = FakeServer::start().await;
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    let mut incoming = client.incoming();
    peer.send(Frame::new(peer.hello_id, SyncDone { user_version: 1 }))
        .await;

    // In: live and busy. Not in: full (refused) and gone (left).
    for (room, refuse) in [
        ("live", false),
        ("busy", false),
        ("full", true),
        ("gone", false),
    ] {
        let entering = tokio::spawn({
            let client = client.clone();
            async move { client.enter_room(room).await }
        });
        let (id, request) = next_room_request(&mut peer).await;
        assert_eq!(request, ("enter", room.into()));
        if refuse {
            peer.send(Frame::error(id, ErrorCode::LimitExceeded, "full", false))
                .await;
            assert!(entering.await.unwrap().is_err());
        } else {
            peer.send(room_response(id, room, LIVE)).await;
            entering.await.unwrap().unwrap();
        }
    }
    let leaving = tokio::spawn({
        let client = client.clone();
        async move { client.leave_room("gone").await }
    });
    let (id, request) = next_room_request(&mut peer).await;
    assert_eq!(request, ("leave", "gone".into()));
    peer.send(room_response(id, "gone", LIVE)).await;
    leaving.await.unwrap().unwrap();

    peer.send(Frame::new(0, room_deliver(1))).await;
    peer.send(Frame::new(0, room_deliver(2))).await;
    let (seen, _) = messages_until_sync_done(&mut incoming).await;
    assert!(seen.is_empty());
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match next_event(&mut incoming).await {
            Some(Event::Message(m)) => seen.push((m.conversation_id, m.seq)),
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(seen, [(LIVE, 1), (LIVE, 2)]);

    // The connection drops (the server restarted).
    drop(peer);
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Disconnected { .. })
    ));
    let mut peer = server.accept_login(0).await;
    // The first requests on the new connection enter the rooms again, before Reconnected.
    let (busy_id, busy) = next_room_request(&mut peer).await;
    let (live_id, live) = next_room_request(&mut peer).await;
    assert_eq!(
        [busy, live],
        [("enter", "busy".into()), ("enter", "live".into())]
    );
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Reconnected)
    ));
    // busy is refused this time: the application hears it is out.
    peer.send(Frame::error(
        busy_id,
        ErrorCode::LimitExceeded,
        "at most 16 rooms",
        false,
    ))
    .await;
    peer.send(room_response(live_id, "live", LIVE)).await;
    match next_event(&mut incoming).await {
        Some(Event::RoomLost { room_id, reason }) => {
            assert_eq!(room_id, "busy");
            assert_eq!(reason.code(), Some(ErrorCode::LimitExceeded));
        }
        other => panic!("expected RoomLost, got {other:?}"),
    }
    // The restarted server numbers the room's messages from 1 again: they are new.
    peer.send(Frame::new(0, room_deliver(1))).await;
    match next_event(&mut incoming).await {
        Some(Event::Message(m)) => assert_eq!((m.conversation_id, m.seq), (LIVE, 1)),
        other => panic!("expected the room's message, got {other:?}"),
    }

    // Another reconnect enters only live.
    drop(peer);
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Disconnected { .. })
    ));
    let mut peer = server.accept_login(0).await;
    let (_, live) = next_room_request(&mut peer).await;
    assert_eq!(live, ("enter", "live".into()));
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Reconnected)
    ));
    common::ping_pong(&client, &mut peer).await;
}

/// The next request on `peer`, which must be a SubscribePresence: its id, users and direction.
async fn next_presence_request(peer: &mut common::Peer) -> (u64, Vec<String>, bool) {
    let frame = peer.recv_request().await;
    match frame.body {
        Some(Body::SubscribePresence(s)) => (frame.request_id, s.user_ids, s.unsubscribe),
        other => panic!("expected SubscribePresence, got {other:?}"),
    }
}

/// The next event, which must be a Presence: (user, online).
async fn next_presence(incoming: &mut Incoming) -> (String, bool) {
    match next_event(incoming).await {
        Some(Event::Presence(p)) => (p.user_id, p.online),
        other => panic!("expected Presence, got {other:?}"),
    }
}

/// Calls subscribe_presence(`users`, `unsubscribe`) and answers it with `following`.
async fn subscribe_answered(
    client: &Client,
    peer: &mut common::Peer,
    users: &'static [&'static str],
    unsubscribe: bool,
    following: u32,
) {
    let calling = tokio::spawn({
        let client = client.clone();
        async move { client.subscribe_presence(users, unsubscribe).await }
    });
    let (id, asked, unsub) = next_presence_request(peer).await;
    assert_eq!(
        (asked, unsub),
        (users.iter().map(|u| u.to_string()).collect(), unsubscribe)
    );
    peer.send(Frame::new(id, PresenceSubscribed { following }))
        .await;
    assert_eq!(calling.await.unwrap().unwrap(), following);
}

#[tokio::test]
async fn followed_users_are_followed_again_on_each_new_connection_and_only_changes_reported() {
    let server = FakeServer::start().await;
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    let mut incoming = client.incoming();
    peer.send(Frame::new(peer.hello_id, SyncDone { user_version: 1 }))
        .await;
    let (seen, _) = messages_until_sync_done(&mut incoming).await;
    assert!(seen.is_empty());

    // Followed: alice, carol, dave. Not: erin (refused), frank (unsubscribed).
    subscribe_answered(&client, &mut peer, &["carol", "alice", "frank"], false, 3).await;
    let refused = tokio::spawn({
        let client = client.clone();
        async move { client.subscribe_presence(["erin"], false).await }
    });
    let (id, _, _) = next_presence_request(&mut peer).await;
    peer.send(Frame::error(
        id,
        ErrorCode::LimitExceeded,
        "too many",
        false,
    ))
    .await;
    assert!(refused.await.unwrap().is_err());
    subscribe_answered(&client, &mut peer, &["frank"], true, 2).await;
    subscribe_answered(&client, &mut peer, &["dave"], false, 3).await;
    for (user, online) in [
        ("alice", true),
        ("carol", false),
        ("dave", true),
        ("alice", true),
    ] {
        peer.send(presence(user, online)).await;
    }
    let mut told = Vec::new();
    for _ in 0..3 {
        told.push(next_presence(&mut incoming).await);
    }
    assert_eq!(
        told,
        [
            ("alice".into(), true),
            ("carol".into(), false),
            ("dave".into(), true)
        ],
        "a repeat is not told"
    );

    // The connection drops (the server restarted).
    drop(peer);
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Disconnected { .. })
    ));
    let mut peer = server.accept_login(0).await;
    // The first request on the new connection follows everyone again, before Reconnected.
    let (id, users, unsubscribe) = next_presence_request(&mut peer).await;
    assert_eq!(users, ["alice", "carol", "dave"]);
    assert!(!unsubscribe);
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Reconnected)
    ));
    // alice went offline and carol came online meanwhile; dave did not change.
    peer.send(Frame::new(id, PresenceSubscribed { following: 3 }))
        .await;
    for (user, online) in [("alice", false), ("carol", true), ("dave", true)] {
        peer.send(presence(user, online)).await;
    }
    assert_eq!(next_presence(&mut incoming).await, ("alice".into(), false));
    assert_eq!(next_presence(&mut incoming).await, ("carol".into(), true));
    // Later changes come on the new connection without a new subscription.
    peer.send(presence("dave", false)).await;
    assert_eq!(next_presence(&mut incoming).await, ("dave".into(), false));

    // Unsubscribed now: not followed again.
    subscribe_answered(&client, &mut peer, &["carol"], true, 2).await;
    drop(peer);
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Disconnected { .. })
    ));
    let mut peer = server.accept_login(0).await;
    let (id, users, _) = next_presence_request(&mut peer).await;
    assert_eq!(users, ["alice", "dave"]);
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Reconnected)
    ));
    // This time the server refuses: the application hears whom it no longer follows.
    peer.send(Frame::error(
        id,
        ErrorCode::LimitExceeded,
        "a connection follows at most 5000 users",
        false,
    ))
    .await;
    match next_event(&mut incoming).await {
        Some(Event::PresenceLost { user_ids, reason }) => {
            assert_eq!(user_ids, ["alice", "dave"]);
            assert_eq!(reason.code(), Some(ErrorCode::LimitExceeded));
        }
        other => panic!("expected PresenceLost, got {other:?}"),
    }

    // Nobody followed: the next connection subscribes nothing; the application's Ping is first.
    drop(peer);
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Disconnected { .. })
    ));
    let mut peer = server.accept_login(0).await;
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Reconnected)
    ));
    common::ping_pong(&client, &mut peer).await;
}

/// Runs `call` on a clone of `client`, checks the one request it writes on `peer` with
/// `check`, answers it with `answer` (echoing its request id) and returns what `call` returned.
async fn answered<T, F>(
    client: &Client,
    peer: &mut common::Peer,
    call: impl FnOnce(Client) -> F,
    check: impl FnOnce(Body),
    answer: impl Into<Body>,
) -> tern_client::Result<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = tern_client::Result<T>> + Send + 'static,
{
    let calling = tokio::spawn(call(client.clone()));
    let frame = peer.recv_request().await;
    assert_ne!(frame.request_id, 0);
    check(frame.body.expect("a body"));
    peer.send(Frame::new(frame.request_id, answer.into())).await;
    calling.await.unwrap()
}

#[tokio::test]
async fn read_presence_settings_recall_and_social_requests_get_their_answers() {
    let server = FakeServer::start().await;
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    let mut incoming = client.incoming();
    peer.send(Frame::new(peer.hello_id, SyncDone { user_version: 1 }))
        .await;
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::SyncDone { user_version: 1 })
    ));

    let read = answered(
        &client,
        &mut peer,
        |c| async move { c.mark_read(12, 40).await },
        |body| {
            assert_eq!(
                body,
                Body::MarkRead(MarkRead {
                    conversation_id: 12,
                    seq: 40
                })
            )
        },
        ReadState {
            conversation_id: 12,
            read_seq: 38,
        },
    )
    .await;
    assert_eq!(read.unwrap(), 38, "the resulting position, clamped");
    assert!(
        incoming.try_recv().is_none(),
        "the answer is not an event too"
    );

    let counts = answered(
        &client,
        &mut peer,
        |c| async move { c.read_counts(12, vec![3, 5]).await },
        |body| {
            assert_eq!(
                body,
                Body::GetReadCounts(GetReadCounts {
                    conversation_id: 12,
                    seqs: vec![3, 5],
                })
            );
        },
        ReadCounts {
            conversation_id: 12,
            counts: vec![1, 0],
            members: 2,
        },
    )
    .await
    .unwrap();
    assert_eq!((counts.counts, counts.members), (vec![1, 0], 2));

    let following = answered(
        &client,
        &mut peer,
        |c| async move { c.subscribe_presence(["alice", "carol"], false).await },
        |body| {
            assert_eq!(
                body,
                Body::SubscribePresence(SubscribePresence {
                    user_ids: vec!["alice".into(), "carol".into()],
                    unsubscribe: false,
                })
            );
        },
        PresenceSubscribed { following: 2 },
    )
    .await;
    assert_eq!(following.unwrap(), 2);

    let change = SetConversation {
        conversation_id: 12,
        pinned: Some(true),
        hidden: None,
        muted: Some(false),
        clear_upto_seq: 0,
    };
    let settings = answered(
        &client,
        &mut peer,
        move |c| async move { c.set_conversation(change).await },
        |body| assert_eq!(body, Body::SetConversation(change)),
        ConversationSettings {
            conversation_id: 12,
            pinned: true,
            hidden: false,
            muted: false,
            cleared_seq: 0,
        },
    )
    .await
    .unwrap();
    assert!(settings.pinned && !settings.muted);

    let recalled = answered(
        &client,
        &mut peer,
        |c| async move { c.recall(12, 4).await },
        |body| {
            assert_eq!(
                body,
                Body::Recall(Recall {
                    conversation_id: 12,
                    seq: 4
                })
            )
        },
        RecallOk {
            conversation_id: 12,
            seq: 4,
            event_seq: 41,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (recalled.conversation_id, recalled.seq, recalled.event_seq),
        (12, 4, 41)
    );

    // A refused recall is a typed error.
    let refused = answered(
        &client,
        &mut peer,
        |c| async move { c.recall(12, 3).await },
        |body| assert!(matches!(body, Body::Recall(_))),
        tern_protocol::Error {
            code: ErrorCode::Forbidden.into(),
            message: "the recall window has passed".into(),
            fatal: false,
        },
    )
    .await;
    match refused {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::Forbidden);
            assert_eq!(message, "the recall window has passed");
        }
        other => panic!("expected FORBIDDEN, got {other:?}"),
    }

    let social = |op: SocialOp| Body::Social(SocialRequest { op: Some(op) });
    let friends = answered(
        &client,
        &mut peer,
        |c| async move { c.add_friend("alice", "hi, it's bob").await },
        |body| {
            assert_eq!(
                body,
                social(SocialOp::AddFriend(AddFriend {
                    user_id: "alice".into(),
                    message: "hi, it's bob".into(),
                }))
            );
        },
        SocialResponse {
            friends: true,
            ..Default::default()
        },
    )
    .await;
    assert!(friends.unwrap(), "alice had asked first");

    answered(
        &client,
        &mut peer,
        |c| async move { c.block("eve").await },
        |body| {
            assert_eq!(
                body,
                social(SocialOp::Block(Block {
                    user_id: "eve".into()
                }))
            );
        },
        SocialResponse::default(),
    )
    .await
    .unwrap();

    let page = answered(
        &client,
        &mut peer,
        |c| async move { c.list_users(ListKind::ListRequestsReceived, 9, 2).await },
        |body| {
            assert_eq!(
                body,
                social(SocialOp::List(ListUsers {
                    kind: ListKind::ListRequestsReceived.into(),
                    page_token: 9,
                    limit: 2,
                }))
            );
        },
        SocialResponse {
            users: vec![ListedUser {
                user_id: "carol".into(),
                message: "hello".into(),
            }],
            next_page_token: 11,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(page.next_page_token, 11);
    assert_eq!(page.users[0].user_id, "carol");
    assert_eq!(page.users[0].message, "hello");

    let profiles = answered(
        &client,
        &mut peer,
        |c| async move { c.get_profiles(["alice", "nobody"]).await },
        |body| {
            assert_eq!(
                body,
                social(SocialOp::GetProfiles(GetProfiles {
                    user_ids: vec!["alice".into(), "nobody".into()],
                }))
            );
        },
        SocialResponse {
            profiles: vec![UserProfile {
                user_id: "alice".into(),
                nickname: "Alice".into(),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(profiles.len(), 1);
    assert_eq!(profiles[0].nickname, "Alice");

    let refused = answered(
        &client,
        &mut peer,
        |c| async move { c.accept_friend("dave").await },
        |body| {
            assert_eq!(
                body,
                social(SocialOp::AcceptFriend(AcceptFriend {
                    user_id: "dave".into()
                }))
            );
        },
        tern_protocol::Error {
            code: ErrorCode::NotFound.into(),
            message: "no request from dave".into(),
            fatal: false,
        },
    )
    .await;
    assert_eq!(
        refused.unwrap_err().code(),
        Some(ErrorCode::NotFound),
        "typed"
    );
    assert!(incoming.try_recv().is_none(), "no events from answers");
}

#[tokio::test]
async fn pushed_frames_arrive_as_events_and_typing_waits_for_nothing() {
    let server = FakeServer::start().await;
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    let mut incoming = client.incoming();
    peer.send(Frame::new(peer.hello_id, SyncDone { user_version: 1 }))
        .await;
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::SyncDone { user_version: 1 })
    ));

    // Typing returns at once; its frame has a request id that nothing answers.
    client.typing(Target::user("alice"), true).unwrap();
    let frame = peer.recv_request().await;
    assert_ne!(frame.request_id, 0);
    assert_eq!(
        frame.body,
        Some(Body::Typing(Typing {
            target: Some(Target::user("alice")),
            typing: true,
            from: String::new(),
        }))
    );
    // A refusal of it is no event and breaks nothing.
    peer.send(Frame::error(
        frame.request_id,
        ErrorCode::NotFound,
        "no such user",
        false,
    ))
    .await;

    let tombstone = Deliver {
        seq: 6,
        sender: "alice".into(),
        content_type: ContentType::System as u32,
        custom_type: RECALL_EVENT_TYPE.into(),
        payload: Bytes::from(
            RecallEvent {
                seq: 4,
                actor: "alice".into(),
            }
            .encode_to_vec(),
        ),
        ..deliver(12, 6)
    };
    let pushed: Vec<Body> = vec![
        ReadState {
            conversation_id: 12,
            read_seq: 5,
        }
        .into(),
        ReadReceipt {
            conversation_id: 12,
            reader: "alice".into(),
            read_seq: 5,
        }
        .into(),
        Typing {
            target: Some(Target::user("alice")),
            typing: true,
            from: "alice".into(),
        }
        .into(),
        Presence {
            user_id: "carol".into(),
            online: true,
            devices: 2,
        }
        .into(),
        ConversationSettings {
            conversation_id: 12,
            pinned: false,
            hidden: true,
            muted: false,
            cleared_seq: 0,
        }
        .into(),
        SocialEvent {
            kind: SocialEventKind::FriendRequest.into(),
            user_id: "carol".into(),
            message: "hello".into(),
            group_id: String::new(),
        }
        .into(),
        Deliver {
            recalled: true,
            payload: Bytes::new(),
            ..deliver(12, 4)
        }
        .into(),
        tombstone.clone().into(),
    ];
    for body in pushed {
        peer.send(Frame::new(0, body)).await;
    }
    let mut events = Vec::new();
    while events.len() < 8 {
        events.push(next_event(&mut incoming).await.expect("an event"));
    }
    match &events[..] {
        [
            Event::ReadState(state),
            Event::ReadReceipt(receipt),
            Event::Typing(typing),
            Event::Presence(presence),
            Event::ConversationSettings(settings),
            Event::Social(social),
            Event::Message(recalled),
            Event::Message(event),
        ] => {
            assert_eq!((state.conversation_id, state.read_seq), (12, 5));
            assert_eq!(
                (
                    receipt.conversation_id,
                    receipt.reader.as_str(),
                    receipt.read_seq
                ),
                (12, "alice", 5)
            );
            assert_eq!((typing.from.as_str(), typing.typing), ("alice", true));
            assert_eq!(
                (presence.user_id.as_str(), presence.online, presence.devices),
                ("carol", true, 2)
            );
            assert!(settings.hidden);
            assert_eq!(social.kind(), SocialEventKind::FriendRequest);
            assert_eq!(
                (social.user_id.as_str(), social.message.as_str()),
                ("carol", "hello")
            );
            assert!(recalled.recalled && recalled.payload.is_empty());
            assert_eq!(recalled.seq, 4);
            assert_eq!(tern_client::recall_event(recalled), None);
            assert_eq!(event, &tombstone);
            assert_eq!(
                tern_client::recall_event(event),
                Some(RecallEvent {
                    seq: 4,
                    actor: "alice".into()
                })
            );
            assert_eq!(tern_client::group_event(event), None);
        }
        other => panic!("unexpected events {other:?}"),
    }
    assert!(incoming.try_recv().is_none());

    // The session goes on: the next request is answered.
    let pinging = tokio::spawn({
        let client = client.clone();
        async move { client.ping().await }
    });
    // Before it: the ack of the messages (4; 6 waits for 5).
    let frame = peer.recv().await.expect("open");
    assert_eq!(
        frame.body,
        Some(Body::Ack(Ack {
            conversation_id: 12,
            seq: 4
        }))
    );
    let frame = peer.recv().await.expect("open");
    answer_ping(&mut peer, &frame)
        .await
        .unwrap_or_else(|| panic!("expected the application's Ping, got {frame:?}"));
    pinging.await.unwrap().unwrap();

    client.close().await;
    assert!(matches!(
        client.typing(Target::group("g1"), false),
        Err(ClientError::Closed)
    ));
}
