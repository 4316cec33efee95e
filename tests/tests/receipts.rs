//! Read positions and receipts, read counts, typing and presence, end to end over real sockets
//! on a two-core gateway.

use std::collections::BTreeSet;

use tern_protocol::v1::frame::Body;
use tern_protocol::v1::group_request::Op;
use tern_protocol::v1::{CreateGroup, InviteMembers};
use tern_protocol::{
    ErrorCode, GetReadCounts, GroupRequest, MarkRead, Presence, ReadCounts, ReadReceipt, ReadState,
    SetConversation, SubscribePresence, SyncRequest, Target, Typing,
};
use tern_tests::{Conn, Gateway, Via, collect_sync, expect_deliver, send_acked, send_group_acked};

fn login(gw: &Gateway, user: &str, device: &str) -> Conn {
    gw.login(Via::Tcp, &gw.token(user), device).0
}

fn mark_read(c: &mut Conn, conv: u64, seq: u64) -> u64 {
    let rid = c.send_body(Body::MarkRead(MarkRead {
        conversation_id: conv,
        seq,
    }));
    match c.answer(rid) {
        Body::ReadState(s) => {
            assert_eq!(s.conversation_id, conv);
            s.read_seq
        }
        other => panic!("expected ReadState, got {other:?}"),
    }
}

#[test]
fn reading_clears_unread_on_every_device_and_tells_the_sender() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut phone = login(&gw, "alice", "phone");
    let mut laptop = login(&gw, "alice", "laptop");
    let mut bob = login(&gw, "bob", "phone");
    let mut mallory = login(&gw, "mallory", "phone");
    let mut conv = 0;
    for i in 1..=3 {
        conv = send_acked(&mut bob, "alice", &format!("b{i}"), "hi").conversation_id;
        assert_eq!(expect_deliver(&mut phone).seq, i);
        assert_eq!(expect_deliver(&mut laptop).seq, i);
    }

    assert_eq!(mark_read(&mut phone, conv, 2), 2);
    assert_eq!(
        laptop.pushed(),
        Body::ReadState(ReadState {
            conversation_id: conv,
            read_seq: 2
        })
    );
    assert_eq!(
        bob.pushed(),
        Body::ReadReceipt(ReadReceipt {
            conversation_id: conv,
            reader: "alice".into(),
            read_seq: 2
        })
    );
    // Never backwards, and a no-op tells nobody.
    assert_eq!(mark_read(&mut laptop, conv, 1), 2);
    // Clamped to the latest message.
    assert_eq!(mark_read(&mut laptop, conv, 99), 3);
    assert_eq!(
        phone.pushed(),
        Body::ReadState(ReadState {
            conversation_id: conv,
            read_seq: 3
        })
    );
    match bob.pushed() {
        Body::ReadReceipt(r) => assert_eq!(r.read_seq, 3),
        other => panic!("expected ReadReceipt, got {other:?}"),
    }
    for c in [&mut phone, &mut laptop, &mut bob] {
        c.nothing_pending();
    }
    // Sync reports the read position; an outsider may not touch it.
    let rid = phone.send_body(Body::Sync(SyncRequest::default()));
    let (convs, _, _) = collect_sync(&mut phone, rid);
    assert_eq!((convs[0].conversation_id, convs[0].read_seq), (conv, 3));
    let rid = mallory.send_body(Body::MarkRead(MarkRead {
        conversation_id: conv,
        seq: 1,
    }));
    assert_eq!(mallory.expect_error(ErrorCode::Forbidden), (rid, false));
    // Bob's own read counts: alice read all three.
    let rid = bob.send_body(Body::GetReadCounts(GetReadCounts {
        conversation_id: conv,
        seqs: vec![1, 3],
    }));
    assert_eq!(
        bob.answer(rid),
        Body::ReadCounts(ReadCounts {
            conversation_id: conv,
            counts: vec![1, 1],
            members: 2
        })
    );
}

/// The state of the only conversation a fresh sync of `since` reports, and the sync's version.
fn synced_state(c: &mut Conn, since: u64) -> (tern_protocol::ConversationState, u64) {
    let rid = c.send_body(Body::Sync(SyncRequest {
        since_version: since,
        page_size: 0,
        ..Default::default()
    }));
    let (mut convs, _, version) = collect_sync(c, rid);
    assert_eq!(convs.len(), 1, "{convs:?}");
    (convs.remove(0), version)
}

#[test]
fn unread_leaves_out_own_messages_and_sync_carries_the_peers_read_position() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice", "phone");
    let mut bob = login(&gw, "bob", "phone");
    let conv = send_acked(&mut bob, "alice", "b1", "one").conversation_id;
    assert_eq!(send_acked(&mut bob, "alice", "b2", "two").seq, 2);
    assert_eq!(expect_deliver(&mut alice).seq, 1);
    assert_eq!(expect_deliver(&mut alice).seq, 2);
    assert_eq!(send_acked(&mut alice, "bob", "a3", "three").seq, 3);
    assert_eq!(expect_deliver(&mut bob).seq, 3);
    // No ReadState or ReadReceipt for the reads a send implies.
    alice.nothing_pending();
    bob.nothing_pending();

    // Bob's laptop, never seen: bob wrote 1 and 2, alice's reply at 3 is his one unread; alice
    // has read everything up to her reply.
    let mut laptop = login(&gw, "bob", "laptop");
    let (state, version) = synced_state(&mut laptop, 0);
    assert_eq!(
        (
            state.conversation_id,
            state.latest_seq,
            state.read_seq,
            state.peer_read_seq,
            state.unread
        ),
        (conv, 3, 2, 3, 1)
    );
    let (state, _) = synced_state(&mut alice, 0);
    assert_eq!(
        (state.read_seq, state.peer_read_seq, state.unread),
        (3, 2, 0)
    );
    drop(laptop);

    // Bob writes again. The laptop comes back, gets it, acknowledges it and goes away again
    // (the sync after the Ack stores the cursor first).
    assert_eq!(send_acked(&mut bob, "alice", "b4", "four").seq, 4);
    assert_eq!(expect_deliver(&mut alice).seq, 4);
    let mut laptop = login(&gw, "bob", "laptop");
    laptop.send_body(Body::Ack(tern_protocol::Ack {
        conversation_id: conv,
        seq: 4,
    }));
    let (state, version) = synced_state(&mut laptop, version);
    assert_eq!(
        (state.latest_seq, state.delivered_seq, state.peer_read_seq),
        (4, 4, 3)
    );
    drop(laptop);

    // Alice reads it while the laptop is away; the phone hears it live.
    let rid = alice.send_body(Body::MarkRead(MarkRead {
        conversation_id: conv,
        seq: 4,
    }));
    assert!(matches!(alice.answer(rid), Body::ReadState(_)));
    assert_eq!(
        bob.pushed(),
        Body::ReadReceipt(ReadReceipt {
            conversation_id: conv,
            reader: "alice".into(),
            read_seq: 4
        })
    );
    // Only alice's read changed since the laptop's version: its sync has the conversation
    // again, with her read position and no message.
    let mut laptop = login(&gw, "bob", "laptop");
    let rid = laptop.send_body(Body::Sync(SyncRequest {
        since_version: version,
        page_size: 0,
        ..Default::default()
    }));
    let (convs, msgs, later) = collect_sync(&mut laptop, rid);
    assert_eq!(convs.len(), 1, "{convs:?}");
    assert_eq!(
        (
            convs[0].latest_seq,
            convs[0].read_seq,
            convs[0].peer_read_seq
        ),
        (4, 4, 4)
    );
    assert!(msgs.is_empty(), "{msgs:?}");
    assert!(later > version && convs[0].version > version);
    // Nothing changed since: an empty sync.
    let rid = laptop.send_body(Body::Sync(SyncRequest {
        since_version: later,
        page_size: 0,
        ..Default::default()
    }));
    let (convs, msgs, _) = collect_sync(&mut laptop, rid);
    assert!(convs.is_empty() && msgs.is_empty(), "{convs:?} {msgs:?}");
}

#[test]
fn a_new_group_member_starts_with_nothing_unread() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice", "phone");
    let rid = alice.send_body(Body::Group(GroupRequest {
        group_id: "g".into(),
        op: Some(Op::Create(CreateGroup {
            profile: None,
            members: vec![],
        })),
    }));
    assert!(matches!(alice.answer(rid), Body::GroupResponse(_)));
    for i in 0..3 {
        send_group_acked(&mut alice, "g", &format!("m{i}"), "before bob");
    }
    let (state, _) = synced_state(&mut alice, 0);
    assert_eq!(
        (state.latest_seq, state.read_seq),
        (4, 4),
        "alice wrote all four"
    );
    let rid = alice.send_body(Body::Group(GroupRequest {
        group_id: "g".into(),
        op: Some(Op::Invite(InviteMembers {
            user_ids: vec!["bob".into()],
        })),
    }));
    assert!(matches!(alice.answer(rid), Body::GroupResponse(_)));
    send_group_acked(&mut alice, "g", "m3", "after bob");
    let mut bob = login(&gw, "bob", "phone");
    let (state, _) = synced_state(&mut bob, 0);
    assert_eq!(
        (
            state.latest_seq,
            state.read_seq,
            state.peer_read_seq,
            state.unread
        ),
        (6, 5, 0, 1),
        "one unread: the message after the invitation"
    );
}

#[test]
fn cleared_messages_are_not_unread_and_send_no_receipt() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice", "phone");
    let mut bob = login(&gw, "bob", "phone");
    let mut conv = 0;
    for i in 1..=4 {
        conv = send_acked(&mut bob, "alice", &format!("b{i}"), "hi").conversation_id;
        assert_eq!(expect_deliver(&mut alice).seq, i);
    }
    assert_eq!(mark_read(&mut alice, conv, 1), 1);
    assert!(matches!(bob.pushed(), Body::ReadReceipt(r) if r.read_seq == 1));
    let (state, _) = synced_state(&mut alice, 0);
    assert_eq!((state.latest_seq, state.read_seq, state.unread), (4, 1, 3));

    let rid = alice.send_body(Body::SetConversation(SetConversation {
        conversation_id: conv,
        clear_upto_seq: 3,
        ..SetConversation::default()
    }));
    assert!(matches!(alice.answer(rid), Body::ConversationSettings(_)));
    let mut laptop = login(&gw, "alice", "laptop");
    let (state, _) = synced_state(&mut laptop, 0);
    assert_eq!(
        (
            state.latest_seq,
            state.read_seq,
            state.settings.unwrap().cleared_seq,
            state.unread
        ),
        (4, 1, 3, 1),
        "only 4 is unread; the read position stays"
    );
    // Clearing is not reading: bob gets no receipt.
    bob.nothing_pending();
    assert_eq!(send_acked(&mut bob, "alice", "b5", "hi").seq, 5);
    assert_eq!(expect_deliver(&mut laptop).seq, 5);
    let (state, _) = synced_state(&mut laptop, 0);
    assert_eq!((state.latest_seq, state.unread), (5, 2));
}

#[test]
fn group_read_counts_count_readers_other_than_the_sender() {
    let gw = Gateway::start(&[]);
    let mut alice = login(&gw, "alice", "phone");
    let mut bob = login(&gw, "bob", "phone");
    let mut carol = login(&gw, "carol", "phone");
    let mut mallory = login(&gw, "mallory", "phone");
    let rid = alice.send_body(Body::Group(GroupRequest {
        group_id: "g".into(),
        op: Some(Op::Create(CreateGroup {
            profile: None,
            members: vec!["bob".into(), "carol".into()],
        })),
    }));
    let conv = match alice.answer(rid) {
        Body::GroupResponse(r) => r.conversation_id,
        other => panic!("expected GroupResponse, got {other:?}"),
    };
    expect_deliver(&mut bob);
    expect_deliver(&mut carol);
    let rid = bob.send_body(Body::Send(tern_protocol::Send {
        client_msg_id: "b1".into(),
        target: Some(Target::group("g")),
        content_type: 1,
        custom_type: String::new(),
        payload: "from bob".into(),
        priority: false,
    }));
    let counts = |c: &mut Conn, seqs: Vec<u64>| {
        let rid = c.send_body(Body::GetReadCounts(GetReadCounts {
            conversation_id: conv,
            seqs,
        }));
        match c.answer(rid) {
            Body::ReadCounts(r) => (r.counts, r.members),
            other => panic!("expected ReadCounts, got {other:?}"),
        }
    };
    assert!(matches!(bob.answer(rid), Body::SendAck(_)));
    assert_eq!(expect_deliver(&mut carol).seq, 2);
    assert_eq!(expect_deliver(&mut alice).seq, 2);
    // The created event (seq 1) is alice's, the message (seq 2) bob's. Bob and carol joined
    // at the event, so they have read it; nobody but its sender has read the message.
    assert_eq!(counts(&mut bob, vec![1, 2]), (vec![2, 0], 3));
    assert_eq!(mark_read(&mut carol, conv, 2), 2);
    assert_eq!(counts(&mut bob, vec![1, 2]), (vec![2, 1], 3));
    assert_eq!(mark_read(&mut bob, conv, 2), 2);
    // Bob read his own message: it does not count; he did read alice's event.
    assert_eq!(counts(&mut alice, vec![1, 2, 3]), (vec![2, 1, 0], 3));
    assert_eq!(mark_read(&mut alice, conv, 2), 2);
    assert_eq!(counts(&mut alice, vec![2]), (vec![2], 3));

    let rid = mallory.send_body(Body::GetReadCounts(GetReadCounts {
        conversation_id: conv,
        seqs: vec![1],
    }));
    assert_eq!(mallory.expect_error(ErrorCode::Forbidden), (rid, false));
    let rid = alice.send_body(Body::GetReadCounts(GetReadCounts {
        conversation_id: conv,
        seqs: (1..=101).collect(),
    }));
    assert_eq!(alice.expect_error(ErrorCode::InvalidArgument), (rid, false));
}

#[test]
fn typing_reaches_the_peer_or_the_group_and_nobody_else() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice", "phone");
    let mut alice_laptop = login(&gw, "alice", "laptop");
    let mut bob = login(&gw, "bob", "phone");
    let mut carol = login(&gw, "carol", "phone");
    let mut dave = login(&gw, "dave", "phone");
    let typing = |target: Target, on: bool| {
        Body::Typing(Typing {
            target: Some(target),
            typing: on,
            from: String::new(),
        })
    };

    alice.send_body(typing(Target::user("bob"), true));
    assert_eq!(
        bob.pushed(),
        Body::Typing(Typing {
            target: Some(Target::user("alice")),
            typing: true,
            from: "alice".into()
        })
    );

    let rid = alice.send_body(Body::Group(GroupRequest {
        group_id: "g".into(),
        op: Some(Op::Create(CreateGroup {
            profile: None,
            members: vec!["bob".into(), "carol".into()],
        })),
    }));
    assert!(matches!(alice.answer(rid), Body::GroupResponse(_)));
    for c in [&mut alice_laptop, &mut bob, &mut carol] {
        expect_deliver(c);
    }
    carol.send_body(typing(Target::group("g"), false));
    for c in [&mut alice, &mut alice_laptop, &mut bob] {
        assert_eq!(
            c.pushed(),
            Body::Typing(Typing {
                target: Some(Target::group("g")),
                typing: false,
                from: "carol".into()
            })
        );
    }
    let rid = dave.send_body(typing(Target::group("g"), true));
    assert_eq!(dave.expect_error(ErrorCode::NotMember), (rid, false));
    let rid = dave.send_body(typing(Target::user("nobody-by-that-name"), true));
    assert_eq!(dave.expect_error(ErrorCode::NotFound), (rid, false));
    for c in [
        &mut alice,
        &mut alice_laptop,
        &mut bob,
        &mut carol,
        &mut dave,
    ] {
        c.nothing_pending();
    }
}

#[test]
fn followers_learn_when_users_come_online_and_go_offline() {
    let gw = Gateway::start(&["--cores", "2"]);
    let _alice = login(&gw, "alice", "phone");
    let mut carol = login(&gw, "carol", "phone");
    let rid = carol.send_body(Body::SubscribePresence(SubscribePresence {
        user_ids: vec!["alice".into(), "bob".into()],
        unsubscribe: false,
    }));
    match carol.answer(rid) {
        Body::PresenceSubscribed(s) => assert_eq!(s.following, 2),
        other => panic!("expected PresenceSubscribed, got {other:?}"),
    }
    let mut initial = BTreeSet::new();
    for _ in 0..2 {
        match carol.pushed() {
            Body::Presence(p) => initial.insert((p.user_id, p.online, p.devices)),
            other => panic!("expected Presence, got {other:?}"),
        };
    }
    assert_eq!(
        initial,
        [
            ("alice".to_string(), true, 1),
            ("bob".to_string(), false, 0)
        ]
        .into()
    );

    let bob_phone = login(&gw, "bob", "phone");
    let presence = |online, devices| {
        Body::Presence(Presence {
            user_id: "bob".into(),
            online,
            devices,
        })
    };
    assert_eq!(carol.pushed(), presence(true, 1));
    // A second device is no news; the last one leaving is.
    let bob_laptop = login(&gw, "bob", "laptop");
    drop(bob_phone);
    drop(bob_laptop);
    assert_eq!(carol.pushed(), presence(false, 0));

    let rid = carol.send_body(Body::SubscribePresence(SubscribePresence {
        user_ids: vec!["bob".into()],
        unsubscribe: true,
    }));
    match carol.answer(rid) {
        Body::PresenceSubscribed(s) => assert_eq!(s.following, 1),
        other => panic!("expected PresenceSubscribed, got {other:?}"),
    }
    let rid = carol.send_body(Body::SubscribePresence(SubscribePresence {
        user_ids: (0..1001).map(|i| format!("u{i}")).collect(),
        unsubscribe: false,
    }));
    assert_eq!(carol.expect_error(ErrorCode::InvalidArgument), (rid, false));
}
