//! Friends, the blacklist, profiles, conversation settings and recall, end to end over real
//! sockets on a two-core gateway.

use prost::Message;
use tern_protocol::v1::frame::Body;
use tern_protocol::v1::group_request::Op as GroupOp;
use tern_protocol::v1::social_request::Op;
use tern_protocol::v1::{
    AcceptFriend, AddFriend, Block, CreateGroup, DeclineFriend, DeleteFriend, GetProfiles,
    ListUsers, ListedUser, SetProfile, Unblock,
};
use tern_protocol::{
    ContentType, ConversationSettings, Deliver, ErrorCode, GroupRequest, HistoryRequest, ListKind,
    RECALL_EVENT_TYPE, Recall, RecallEvent, RecallOk, SetConversation, SocialEvent,
    SocialEventKind, SocialRequest, SocialResponse, SyncRequest, Target, Typing, UserProfile,
};
use tern_tests::{
    Conn, Gateway, NO_RATE_LIMITS, Via, collect_sync, expect_deliver, send, send_acked, text,
};

fn login(gw: &Gateway, user: &str, device: &str) -> Conn {
    gw.login(Via::Tcp, &gw.token(user), device).0
}

fn social(c: &mut Conn, op: Op) -> SocialResponse {
    let rid = c.send_body(Body::Social(SocialRequest { op: Some(op) }));
    match c.answer(rid) {
        Body::SocialResponse(r) => r,
        other => panic!("expected SocialResponse, got {other:?}"),
    }
}

fn social_err(c: &mut Conn, op: Op, code: ErrorCode) {
    let rid = c.send_body(Body::Social(SocialRequest { op: Some(op) }));
    assert_eq!(c.expect_error(code), (rid, false));
}

fn event(kind: SocialEventKind, user: &str, message: &str) -> Body {
    Body::SocialEvent(SocialEvent {
        kind: kind.into(),
        user_id: user.into(),
        message: message.into(),
        group_id: String::new(),
    })
}

fn add(user: &str, message: &str) -> Op {
    Op::AddFriend(AddFriend {
        user_id: user.into(),
        message: message.into(),
    })
}

fn list(c: &mut Conn, kind: ListKind, limit: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut token = 0;
    loop {
        let r = social(
            c,
            Op::List(ListUsers {
                kind: kind.into(),
                page_token: token,
                limit,
            }),
        );
        out.extend(
            r.users
                .into_iter()
                .map(|ListedUser { user_id, message }| (user_id, message)),
        );
        if r.next_page_token == 0 {
            return out;
        }
        token = r.next_page_token;
    }
}

fn names(list: &[(String, String)]) -> Vec<&str> {
    list.iter().map(|(u, _)| u.as_str()).collect()
}

#[test]
fn friend_requests_are_sent_accepted_declined_and_deleted() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice", "phone");
    let mut bob = login(&gw, "bob", "phone");
    let mut bob_laptop = login(&gw, "bob", "laptop");
    let mut carol = login(&gw, "carol", "phone");

    assert!(!social(&mut alice, add("bob", "hi, it's alice")).friends);
    for b in [&mut bob, &mut bob_laptop] {
        assert_eq!(
            b.pushed(),
            event(SocialEventKind::FriendRequest, "alice", "hi, it's alice")
        );
    }
    assert_eq!(
        list(&mut bob, ListKind::ListRequestsReceived, 10),
        vec![("alice".to_string(), "hi, it's alice".to_string())]
    );
    assert_eq!(
        names(&list(&mut alice, ListKind::ListRequestsSent, 10)),
        ["bob"]
    );
    social_err(
        &mut alice,
        Op::AcceptFriend(AcceptFriend {
            user_id: "bob".into(),
        }),
        ErrorCode::NotFound,
    );
    assert!(
        social(
            &mut bob,
            Op::AcceptFriend(AcceptFriend {
                user_id: "alice".into(),
            })
        )
        .friends
    );
    assert_eq!(
        alice.pushed(),
        event(SocialEventKind::FriendAdded, "bob", "")
    );
    assert_eq!(
        bob_laptop.pushed(),
        event(SocialEventKind::FriendAdded, "alice", "")
    );
    assert_eq!(names(&list(&mut alice, ListKind::ListFriends, 10)), ["bob"]);
    assert_eq!(names(&list(&mut bob, ListKind::ListFriends, 10)), ["alice"]);
    assert!(list(&mut bob, ListKind::ListRequestsReceived, 10).is_empty());
    assert!(list(&mut alice, ListKind::ListRequestsSent, 10).is_empty());
    social_err(&mut alice, add("bob", ""), ErrorCode::Conflict);
    social_err(&mut alice, add("alice", ""), ErrorCode::InvalidArgument);
    social_err(
        &mut alice,
        add("bob", &"x".repeat(257)),
        ErrorCode::InvalidArgument,
    );

    // Carol asks bob, bob declines.
    social(&mut carol, add("bob", "me too"));
    bob.pushed();
    bob_laptop.pushed();
    social(
        &mut bob,
        Op::DeclineFriend(DeclineFriend {
            user_id: "carol".into(),
        }),
    );
    assert_eq!(
        carol.pushed(),
        event(SocialEventKind::FriendDeclined, "bob", "")
    );
    bob_laptop.pushed();
    assert!(list(&mut carol, ListKind::ListRequestsSent, 10).is_empty());

    // Asking someone who asked you first makes you friends at once.
    social(&mut carol, add("alice", ""));
    alice.pushed();
    assert!(social(&mut alice, add("carol", "")).friends);
    assert_eq!(
        carol.pushed(),
        event(SocialEventKind::FriendAdded, "alice", "")
    );
    // Two pages of one.
    assert_eq!(
        names(&list(&mut alice, ListKind::ListFriends, 1)),
        ["bob", "carol"]
    );

    social(
        &mut alice,
        Op::DeleteFriend(DeleteFriend {
            user_id: "bob".into(),
        }),
    );
    for b in [&mut bob, &mut bob_laptop] {
        assert_eq!(
            b.pushed(),
            event(SocialEventKind::FriendDeleted, "alice", "")
        );
    }
    assert_eq!(
        names(&list(&mut bob, ListKind::ListFriends, 10)),
        Vec::<&str>::new()
    );
    social_err(
        &mut alice,
        Op::DeleteFriend(DeleteFriend {
            user_id: "bob".into(),
        }),
        ErrorCode::NotFound,
    );
    for c in [&mut alice, &mut bob, &mut bob_laptop, &mut carol] {
        c.nothing_pending();
    }
}

#[test]
fn a_blocked_user_cannot_message_or_befriend_the_blocker() {
    let gw = Gateway::start(&[]);
    let mut alice = login(&gw, "alice", "phone");
    let mut bob = login(&gw, "bob", "phone");
    social(
        &mut bob,
        Op::Block(Block {
            user_id: "alice".into(),
        }),
    );
    assert_eq!(names(&list(&mut bob, ListKind::ListBlocked, 10)), ["alice"]);
    let rid = send(&mut alice, "bob", "a1", "hello?");
    assert_eq!(alice.expect_error(ErrorCode::Blocked), (rid, false));
    social_err(&mut alice, add("bob", ""), ErrorCode::Blocked);
    // Nor show him that she is typing.
    let typing = Body::Typing(Typing {
        target: Some(Target::user("bob")),
        typing: true,
        from: String::new(),
    });
    let rid = alice.send_body(typing.clone());
    assert_eq!(alice.expect_error(ErrorCode::Blocked), (rid, false));
    bob.nothing_pending();
    // The blocker may still write.
    send_acked(&mut bob, "alice", "b1", "I can talk");
    assert_eq!(text(&expect_deliver(&mut alice)), "I can talk");
    social(
        &mut bob,
        Op::Unblock(Unblock {
            user_id: "alice".into(),
        }),
    );
    social_err(
        &mut bob,
        Op::Unblock(Unblock {
            user_id: "alice".into(),
        }),
        ErrorCode::NotFound,
    );
    let ack = send_acked(&mut alice, "bob", "a2", "hello again");
    assert_eq!(ack.seq, 2);
    assert_eq!(text(&expect_deliver(&mut bob)), "hello again");
    alice.send_body(typing);
    assert_eq!(
        bob.pushed(),
        Body::Typing(Typing {
            target: Some(Target::user("alice")),
            typing: true,
            from: "alice".into()
        })
    );
}

#[test]
fn a_friends_only_server_refuses_strangers_and_limits_friends() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("friends-only.toml");
    std::fs::write(
        &cfg,
        format!("{NO_RATE_LIMITS}allow_non_friend_messages = false\nmax_friends = 1\n"),
    )
    .unwrap();
    let gw = Gateway::start_in(
        &dir.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
    );
    let mut alice = login(&gw, "alice", "phone");
    let mut bob = login(&gw, "bob", "phone");
    let mut carol = login(&gw, "carol", "phone");
    let rid = send(&mut alice, "bob", "a1", "hi");
    assert_eq!(alice.expect_error(ErrorCode::Forbidden), (rid, false));
    social(&mut alice, add("bob", ""));
    bob.pushed();
    social(
        &mut bob,
        Op::AcceptFriend(AcceptFriend {
            user_id: "alice".into(),
        }),
    );
    alice.pushed();
    send_acked(&mut alice, "bob", "a2", "friends now");
    assert_eq!(text(&expect_deliver(&mut bob)), "friends now");
    // Alice has her one friend.
    social_err(&mut alice, add("carol", ""), ErrorCode::LimitExceeded);
    social(&mut carol, add("alice", ""));
    alice.pushed();
    social_err(
        &mut alice,
        Op::AcceptFriend(AcceptFriend {
            user_id: "carol".into(),
        }),
        ErrorCode::LimitExceeded,
    );
}

#[test]
fn profiles_are_stored_and_read_by_others() {
    let gw = Gateway::start(&[]);
    let mut alice = login(&gw, "alice", "phone");
    let mut bob = login(&gw, "bob", "phone");
    let profile = UserProfile {
        user_id: "someone else".into(),
        nickname: "Alice A.".into(),
        avatar_url: "https://example.com/a.png".into(),
        custom: [("city".to_string(), "Oslo".to_string())].into(),
    };
    social(
        &mut alice,
        Op::SetProfile(SetProfile {
            profile: Some(profile.clone()),
        }),
    );
    let r = social(
        &mut bob,
        Op::GetProfiles(GetProfiles {
            user_ids: vec!["alice".into(), "bob".into(), "nobody".into()],
        }),
    );
    // The profile is always the caller's own; users without one are left out.
    let want = UserProfile {
        user_id: "alice".into(),
        ..profile
    };
    assert_eq!(r.profiles, vec![want]);
    social_err(
        &mut alice,
        Op::SetProfile(SetProfile {
            profile: Some(UserProfile {
                nickname: "n".repeat(257),
                ..UserProfile::default()
            }),
        }),
        ErrorCode::InvalidArgument,
    );
    social_err(
        &mut bob,
        Op::GetProfiles(GetProfiles {
            user_ids: (0..101).map(|i| format!("u{i}")).collect(),
        }),
        ErrorCode::InvalidArgument,
    );
}

fn set_conversation(c: &mut Conn, req: SetConversation) -> ConversationSettings {
    let rid = c.send_body(Body::SetConversation(req));
    match c.answer(rid) {
        Body::ConversationSettings(s) => s,
        other => panic!("expected ConversationSettings, got {other:?}"),
    }
}

#[test]
fn conversation_settings_reach_every_device_and_clearing_hides_history() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut phone = login(&gw, "alice", "phone");
    let mut laptop = login(&gw, "alice", "laptop");
    let mut bob = login(&gw, "bob", "phone");
    let mut conv = 0;
    for i in 1..=3 {
        conv = send_acked(&mut bob, "alice", &format!("b{i}"), &format!("m{i}")).conversation_id;
        expect_deliver(&mut phone);
        expect_deliver(&mut laptop);
    }
    let s = set_conversation(
        &mut phone,
        SetConversation {
            conversation_id: conv,
            pinned: Some(true),
            muted: Some(true),
            ..SetConversation::default()
        },
    );
    let want = ConversationSettings {
        conversation_id: conv,
        pinned: true,
        hidden: false,
        muted: true,
        cleared_seq: 0,
    };
    assert_eq!(s, want);
    assert_eq!(laptop.pushed(), Body::ConversationSettings(want));
    // Clear up to 2: gone from history and sync for alice, not for bob.
    let s = set_conversation(
        &mut laptop,
        SetConversation {
            conversation_id: conv,
            clear_upto_seq: 2,
            hidden: Some(true),
            ..SetConversation::default()
        },
    );
    assert_eq!((s.cleared_seq, s.hidden, s.pinned), (2, true, true));
    phone.pushed();
    // Never backwards.
    let s = set_conversation(
        &mut laptop,
        SetConversation {
            conversation_id: conv,
            clear_upto_seq: 1,
            ..SetConversation::default()
        },
    );
    assert_eq!(s.cleared_seq, 2);
    let history = |c: &mut Conn| {
        let rid = c.send_body(Body::History(HistoryRequest {
            conversation_id: conv,
            ..HistoryRequest::default()
        }));
        match c.answer(rid) {
            Body::HistoryPage(p) => p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            other => panic!("expected HistoryPage, got {other:?}"),
        }
    };
    assert_eq!(history(&mut phone), vec![3]);
    assert_eq!(history(&mut bob), vec![3, 2, 1]);
    let (mut tablet, (convs, msgs, since)) = gw.login_synced(Via::Tcp, "alice", "tablet", 0);
    assert_eq!(convs[0].settings.unwrap().cleared_seq, 2);
    assert!(convs[0].settings.unwrap().hidden);
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![3]);
    // Bob writes again: the hidden conversation shows again, pinned and muted as before; the
    // tablet's next sync reports it changed.
    assert_eq!(send_acked(&mut bob, "alice", "b4", "back").seq, 4);
    for c in [&mut phone, &mut laptop, &mut tablet] {
        assert_eq!(expect_deliver(c).seq, 4);
    }
    let rid = tablet.send_body(Body::Sync(SyncRequest {
        since_version: since,
        page_size: 0,
        ..Default::default()
    }));
    let (convs, _, _) = collect_sync(&mut tablet, rid);
    assert_eq!(
        convs
            .iter()
            .map(|c| c.settings.unwrap())
            .collect::<Vec<_>>(),
        vec![ConversationSettings {
            conversation_id: conv,
            pinned: true,
            hidden: false,
            muted: true,
            cleared_seq: 2,
        }]
    );
    // Two devices at once, each changing one setting: both changes hold.
    let unpin = phone.send_body(Body::SetConversation(SetConversation {
        conversation_id: conv,
        pinned: Some(false),
        ..SetConversation::default()
    }));
    let unmute = laptop.send_body(Body::SetConversation(SetConversation {
        conversation_id: conv,
        muted: Some(false),
        ..SetConversation::default()
    }));
    for (c, rid) in [(&mut phone, unpin), (&mut laptop, unmute)] {
        // Its answer, and the other device's change pushed, in either order.
        let mut ids = [c.recv_frame().request_id, c.recv_frame().request_id];
        ids.sort();
        assert_eq!(ids, [0, rid]);
    }
    let both = ConversationSettings {
        conversation_id: conv,
        pinned: false,
        hidden: false,
        muted: false,
        cleared_seq: 2,
    };
    // The tablet got both changes, in the order they were written (all of Alice's sessions
    // live on her core, which hears of each write in order): the first with one field
    // changed, the second with both.
    let Body::ConversationSettings(first) = tablet.pushed() else {
        panic!("expected the first change");
    };
    assert!(first.pinned != first.muted, "{first:?}");
    assert_eq!(tablet.pushed(), Body::ConversationSettings(both));
    let unchanged = SetConversation {
        conversation_id: conv,
        ..SetConversation::default()
    };
    assert_eq!(set_conversation(&mut tablet, unchanged), both);
    phone.nothing_pending();
    laptop.nothing_pending();
    // Not a conversation of hers.
    let rid = bob.send_body(Body::SetConversation(SetConversation {
        conversation_id: conv + 1,
        pinned: Some(true),
        ..SetConversation::default()
    }));
    assert_eq!(bob.expect_error(ErrorCode::Forbidden), (rid, false));
}

fn recall(c: &mut Conn, conv: u64, seq: u64) -> Result<RecallOk, ErrorCode> {
    let rid = c.send_body(Body::Recall(Recall {
        conversation_id: conv,
        seq,
    }));
    match c.answer(rid) {
        Body::RecallOk(r) => Ok(r),
        Body::Error(e) => Err(ErrorCode::try_from(e.code).unwrap()),
        other => panic!("expected RecallOk, got {other:?}"),
    }
}

fn tombstone(d: &Deliver) -> RecallEvent {
    assert_eq!(d.content_type, ContentType::System as u32);
    assert_eq!(d.custom_type, RECALL_EVENT_TYPE);
    RecallEvent::decode(d.payload.clone()).unwrap()
}

#[test]
fn recalled_messages_lose_their_body_and_everyone_sees_the_tombstone() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice", "phone");
    let mut alice_laptop = login(&gw, "alice", "laptop");
    let mut bob = login(&gw, "bob", "phone");
    let ack = send_acked(&mut alice, "bob", "a1", "oops");
    let conv = ack.conversation_id;
    expect_deliver(&mut bob);
    expect_deliver(&mut alice_laptop);
    // Only the sender.
    assert_eq!(recall(&mut bob, conv, 1), Err(ErrorCode::Forbidden));
    assert_eq!(recall(&mut alice, conv, 9), Err(ErrorCode::NotFound));
    let ok = recall(&mut alice, conv, 1).unwrap();
    assert_eq!((ok.conversation_id, ok.seq, ok.event_seq), (conv, 1, 2));
    for c in [&mut bob, &mut alice_laptop] {
        let d = expect_deliver(c);
        assert_eq!((d.seq, d.sender.as_str()), (2, "alice"));
        assert_eq!(
            tombstone(&d),
            RecallEvent {
                seq: 1,
                actor: "alice".into()
            }
        );
    }
    assert_eq!(recall(&mut alice, conv, 1), Err(ErrorCode::Conflict));
    // The body is no longer served.
    let rid = bob.send_body(Body::History(HistoryRequest {
        conversation_id: conv,
        ..HistoryRequest::default()
    }));
    match bob.answer(rid) {
        Body::HistoryPage(p) => {
            let first = p.messages.last().unwrap();
            assert_eq!(first.seq, 1);
            assert!(first.recalled);
            assert!(first.payload.is_empty());
        }
        other => panic!("expected HistoryPage, got {other:?}"),
    }

    // In a group, an admin (the owner) may recall anyone's message, a member only their own.
    let rid = alice.send_body(Body::Group(GroupRequest {
        group_id: "g".into(),
        op: Some(GroupOp::Create(CreateGroup {
            profile: None,
            members: vec!["bob".into(), "carol".into()],
        })),
    }));
    let gconv = match alice.answer(rid) {
        Body::GroupResponse(r) => r.conversation_id,
        other => panic!("expected GroupResponse, got {other:?}"),
    };
    expect_deliver(&mut bob);
    expect_deliver(&mut alice_laptop);
    let mut carol = login(&gw, "carol", "phone");
    let rid = carol.send_body(Body::Send(tern_protocol::Send {
        client_msg_id: "c1".into(),
        target: Some(Target::group("g")),
        content_type: 1,
        custom_type: String::new(),
        payload: "from carol".into(),
        priority: false,
    }));
    assert!(matches!(carol.answer(rid), Body::SendAck(_)));
    for c in [&mut alice, &mut alice_laptop, &mut bob] {
        assert_eq!(expect_deliver(c).seq, 2);
    }
    assert_eq!(recall(&mut bob, gconv, 2), Err(ErrorCode::Forbidden));
    assert_eq!(recall(&mut alice, gconv, 2).unwrap().event_seq, 3);
    for c in [&mut alice_laptop, &mut bob, &mut carol] {
        let d = expect_deliver(c);
        assert_eq!(tombstone(&d).seq, 2);
    }
    let mut mallory = login(&gw, "mallory", "phone");
    assert_eq!(recall(&mut mallory, gconv, 1), Err(ErrorCode::NotMember));

    // The server's own events stay, for their actor and for admins: the group's creation (seq
    // 1, alice's), a recall notice in the group (seq 3) and one in the 1:1 conversation (seq 2,
    // alice's, within the window).
    assert_eq!(recall(&mut alice, gconv, 1), Err(ErrorCode::Forbidden));
    assert_eq!(recall(&mut alice, gconv, 3), Err(ErrorCode::Forbidden));
    assert_eq!(recall(&mut alice, conv, 2), Err(ErrorCode::Forbidden));
    for c in [&mut alice, &mut alice_laptop, &mut bob, &mut carol] {
        c.nothing_pending();
    }
}

/// The server's clock, read from a Pong.
fn server_now(c: &mut Conn) -> u64 {
    let rid = c.send_body(Body::Ping(tern_protocol::Ping { client_time_ms: 0 }));
    match c.answer(rid) {
        Body::Pong(p) => p.server_time_ms,
        other => panic!("expected Pong, got {other:?}"),
    }
}

#[test]
fn a_message_older_than_the_recall_window_stays() {
    const WINDOW_MS: u64 = 1_500;
    let window = format!("recall_window_ms={WINDOW_MS}");
    let gw = Gateway::start(&["--set", &window]);
    let mut alice = login(&gw, "alice", "phone");
    let mut bob = login(&gw, "bob", "phone");
    let old = send_acked(&mut alice, "bob", "a1", "kept");
    let fresh = send_acked(&mut alice, "bob", "a2", "taken back");
    let conv = old.conversation_id;
    for seq in [1, 2] {
        assert_eq!(expect_deliver(&mut bob).seq, seq);
    }
    // Within the window.
    assert_eq!(recall(&mut alice, conv, fresh.seq).unwrap().event_seq, 3);
    assert_eq!(tombstone(&expect_deliver(&mut bob)).seq, fresh.seq);
    // Past it, by the server's clock: refused, and nothing changes.
    while server_now(&mut alice) <= old.server_time_ms + WINDOW_MS {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(recall(&mut alice, conv, old.seq), Err(ErrorCode::Forbidden));
    bob.nothing_pending();
    let rid = bob.send_body(Body::History(HistoryRequest {
        conversation_id: conv,
        ..HistoryRequest::default()
    }));
    match bob.answer(rid) {
        Body::HistoryPage(p) => {
            let bodies: Vec<(u64, bool, &[u8])> = p
                .messages
                .iter()
                .map(|m| (m.seq, m.recalled, &m.payload[..]))
                .collect();
            assert_eq!(bodies[1..], [(2, true, &b""[..]), (1, false, &b"kept"[..])]);
        }
        other => panic!("expected HistoryPage, got {other:?}"),
    }
}

/// Blocking a friend ends the friendship both ways (FRIEND_DELETED to the other user and to
/// the blocker's other devices) and drops requests between the two; with
/// `block_keeps_friends = true` the friendship stays. Either way the blocked user cannot
/// message the blocker.
#[test]
fn blocking_a_friend_ends_the_friendship_unless_the_server_keeps_friends() {
    for keep in [false, true] {
        let setting = format!("block_keeps_friends={keep}");
        let gw = Gateway::start(&["--cores", "2", "--set", &setting]);
        let mut alice = login(&gw, "alice", "phone");
        let mut bob = login(&gw, "bob", "phone");
        let mut bob_laptop = login(&gw, "bob", "laptop");
        let mut carol = login(&gw, "carol", "phone");
        social(&mut alice, add("bob", "hi"));
        for b in [&mut bob, &mut bob_laptop] {
            b.pushed();
        }
        social(
            &mut bob,
            Op::AcceptFriend(AcceptFriend {
                user_id: "alice".into(),
            }),
        );
        alice.pushed();
        bob_laptop.pushed();
        // Bob asked carol, who has not answered, and blocks both.
        social(&mut bob, add("carol", "hello"));
        carol.pushed();
        for user in ["alice", "carol"] {
            social(
                &mut bob,
                Op::Block(Block {
                    user_id: user.into(),
                }),
            );
        }
        if !keep {
            assert_eq!(
                alice.pushed(),
                event(SocialEventKind::FriendDeleted, "bob", "")
            );
            assert_eq!(
                bob_laptop.pushed(),
                event(SocialEventKind::FriendDeleted, "alice", "")
            );
        }
        let friends = if keep { vec!["alice"] } else { vec![] };
        assert_eq!(
            names(&list(&mut bob, ListKind::ListFriends, 10)),
            friends,
            "{setting}"
        );
        let friends = if keep { vec!["bob"] } else { vec![] };
        assert_eq!(
            names(&list(&mut alice, ListKind::ListFriends, 10)),
            friends,
            "{setting}"
        );
        let requests = if keep { vec!["bob"] } else { vec![] };
        assert_eq!(
            names(&list(&mut carol, ListKind::ListRequestsReceived, 10)),
            requests,
            "{setting}"
        );
        let requests = if keep { vec!["carol"] } else { vec![] };
        assert_eq!(
            names(&list(&mut bob, ListKind::ListRequestsSent, 10)),
            requests,
            "{setting}"
        );
        alice.nothing_pending();
        bob_laptop.nothing_pending();
        carol.nothing_pending();
        assert_eq!(
            names(&list(&mut bob, ListKind::ListBlocked, 10)),
            ["alice", "carol"]
        );
        let rid = send(&mut alice, "bob", "a1", "still friends?");
        assert_eq!(alice.expect_error(ErrorCode::Blocked), (rid, false));
    }
}
