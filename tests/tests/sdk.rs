//! The Rust SDK against a real gateway: rooms, read receipts, presence, conversation settings,
//! recall and friends, with the server's pushes arriving as events; rooms entered and users
//! followed again after a reconnect.

use std::time::Duration;

use tern_client::{
    Client, ClientConfig, ContentType, Event, Incoming, ListKind, SetConversation, SocialEventKind,
    Target, TargetKind, recall_event,
};
use tern_tests::Gateway;

async fn connect(gw: &Gateway, user: &str, device: &str) -> (Client, Incoming) {
    let c = Client::connect(ClientConfig::new(
        gw.addr.to_string(),
        gw.token(user),
        device,
    ))
    .await
    .expect("login");
    let incoming = c.incoming();
    (c, incoming)
}

/// A phone of `user` that reconnects within 50–200 ms of losing its connection.
fn quick_reconnects(gw: &Gateway, user: &str) -> ClientConfig {
    let mut c = ClientConfig::new(gw.addr.to_string(), gw.token(user), "phone");
    c.backoff.initial = Duration::from_millis(50);
    c.backoff.max = Duration::from_millis(200);
    c
}

/// The next event that `pick` accepts, skipping others (sync bookkeeping, own messages).
async fn next<T>(incoming: &mut Incoming, mut pick: impl FnMut(Event) -> Option<T>) -> T {
    let wait = async {
        loop {
            let e = incoming.recv().await.expect("event stream ended");
            if let Some(t) = pick(e) {
                return t;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .expect("no such event within 20 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_covers_rooms_receipts_presence_settings_recall_and_friends() {
    let gw = Gateway::start(&["--cores", "2"]);
    let (alice, mut alice_in) = connect(&gw, "alice", "phone").await;
    let (alice_tab, mut tab_in) = connect(&gw, "alice", "tablet").await;
    let (bob, mut bob_in) = connect(&gw, "bob", "phone").await;

    // Rooms.
    let room = alice.enter_room("live").await.unwrap().conversation_id;
    assert_eq!(bob.enter_room("live").await.unwrap().conversation_id, room);
    let ack = alice
        .send_room("live", ContentType::Text as u32, "hi room", true)
        .await
        .unwrap();
    assert_eq!((ack.conversation_id, ack.seq), (room, 1));
    let m = next(&mut bob_in, |e| match e {
        Event::Message(m) if m.conversation_id == room => Some(m),
        _ => None,
    })
    .await;
    assert_eq!(m.target, Some(Target::new(TargetKind::Room, "live")));
    assert_eq!(&m.payload[..], b"hi room");
    bob.leave_room("live").await.unwrap();

    // Presence: alice follows bob, who is online.
    assert_eq!(alice.subscribe_presence(["bob"], false).await.unwrap(), 1);
    let p = next(&mut alice_in, |e| match e {
        Event::Presence(p) => Some(p),
        _ => None,
    })
    .await;
    assert_eq!((p.user_id.as_str(), p.online, p.devices), ("bob", true, 1));

    // A 1:1 message, read on one device: the other device and the sender hear it.
    let sent = bob
        .send(Target::user("alice"), ContentType::Text as u32, "psst")
        .await
        .unwrap();
    let conv = sent.conversation_id;
    next(&mut alice_in, |e| match e {
        Event::Message(m) if m.conversation_id == conv => Some(()),
        _ => None,
    })
    .await;
    assert_eq!(alice.mark_read(conv, sent.seq).await.unwrap(), sent.seq);
    let r = next(&mut bob_in, |e| match e {
        Event::ReadReceipt(r) => Some(r),
        _ => None,
    })
    .await;
    assert_eq!((r.reader.as_str(), r.read_seq), ("alice", sent.seq));
    let s = next(&mut tab_in, |e| match e {
        Event::ReadState(s) => Some(s),
        _ => None,
    })
    .await;
    assert_eq!((s.conversation_id, s.read_seq), (conv, sent.seq));
    let counts = bob.read_counts(conv, vec![sent.seq]).await.unwrap();
    assert_eq!((counts.counts, counts.members), (vec![1], 2));

    // Settings reach the other device.
    let pinned = alice
        .set_conversation(SetConversation {
            conversation_id: conv,
            pinned: Some(true),
            ..SetConversation::default()
        })
        .await
        .unwrap();
    assert!(pinned.pinned);
    let s = next(&mut tab_in, |e| match e {
        Event::ConversationSettings(s) => Some(s),
        _ => None,
    })
    .await;
    assert_eq!(s, pinned);

    // Recall: the tombstone reaches alice's devices.
    let ok = bob.recall(conv, sent.seq).await.unwrap();
    assert_eq!(ok.seq, sent.seq);
    let tomb = next(&mut alice_in, |e| match e {
        Event::Message(m) => recall_event(&m),
        _ => None,
    })
    .await;
    assert_eq!((tomb.seq, tomb.actor.as_str()), (sent.seq, "bob"));

    // Friends.
    assert!(!bob.add_friend("alice", "hello").await.unwrap());
    let e = next(&mut alice_in, |e| match e {
        Event::Social(s) => Some(s),
        _ => None,
    })
    .await;
    assert_eq!(
        (e.kind, e.user_id.as_str(), e.message.as_str()),
        (SocialEventKind::FriendRequest as i32, "bob", "hello")
    );
    alice_tab.accept_friend("bob").await.unwrap();
    let e = next(&mut bob_in, |e| match e {
        Event::Social(s) => Some(s),
        _ => None,
    })
    .await;
    assert_eq!(e.kind, SocialEventKind::FriendAdded as i32);
    let friends = alice
        .list_users(ListKind::ListFriends, 0, 10)
        .await
        .unwrap();
    assert_eq!(friends.users.len(), 1);
    assert_eq!(friends.users[0].user_id, "bob");

    // Bob goes: alice hears it.
    bob.close().await;
    let p = next(&mut alice_in, |e| match e {
        Event::Presence(p) => Some(p),
        _ => None,
    })
    .await;
    assert_eq!((p.user_id.as_str(), p.online), ("bob", false));
    alice.close().await;
    alice_tab.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_are_entered_again_after_a_reconnect() {
    let mut gw = Gateway::start(&[]);
    let alice = Client::connect(quick_reconnects(&gw, "alice"))
        .await
        .unwrap();
    let bob = Client::connect(quick_reconnects(&gw, "bob")).await.unwrap();
    let (mut alice_in, mut bob_in) = (alice.incoming(), bob.incoming());
    alice.enter_room("live").await.unwrap();
    bob.enter_room("live").await.unwrap();
    bob.enter_room("other").await.unwrap();
    bob.leave_room("other").await.unwrap();

    // The gateway restarts: the connections, and the rooms' memberships with them, are gone.
    tokio::task::block_in_place(|| gw.restart());
    for incoming in [&mut alice_in, &mut bob_in] {
        next(incoming, |e| matches!(e, Event::Reconnected).then_some(())).await;
    }
    // Each client entered "live" again on its new connection before saying Reconnected; a
    // request made now is answered after that.
    alice.ping().await.unwrap();
    bob.ping().await.unwrap();
    let ack = alice
        .send_room("live", ContentType::Text as u32, "back again", false)
        .await
        .unwrap();
    assert_eq!(ack.seq, 1, "room numbering starts again with the server");
    let m = next(&mut bob_in, |e| match e {
        Event::Message(m) if m.target == Some(Target::new(TargetKind::Room, "live")) => Some(m),
        _ => None,
    })
    .await;
    assert_eq!(&m.payload[..], b"back again");
    // The room it left is not entered again.
    let err = bob
        .send_room("other", ContentType::Text as u32, "x", false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, tern_client::ClientError::Server { code, .. } if code == tern_client::ErrorCode::NotMember),
        "{err:?}"
    );
}

/// The next Presence: (user, online).
async fn next_presence(incoming: &mut Incoming) -> (String, bool) {
    next(incoming, |e| match e {
        Event::Presence(p) => Some((p.user_id, p.online)),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followed_users_stay_followed_across_a_reconnect() {
    let mut gw = Gateway::start(&["--cores", "2"]);
    let alice = Client::connect(quick_reconnects(&gw, "alice"))
        .await
        .unwrap();
    let bob = Client::connect(quick_reconnects(&gw, "bob")).await.unwrap();
    let mut alice_in = alice.incoming();
    assert_eq!(
        alice
            .subscribe_presence(["bob", "carol"], false)
            .await
            .unwrap(),
        2
    );
    let mut first = [
        next_presence(&mut alice_in).await,
        next_presence(&mut alice_in).await,
    ];
    first.sort();
    assert_eq!(first, [("bob".into(), true), ("carol".into(), false)]);

    // The gateway dies (killed: no notices on the way out), and with it every connection and
    // presence subscription; bob leaves while it is down.
    tokio::task::block_in_place(|| gw.kill());
    bob.close().await;
    tokio::task::block_in_place(|| gw.start_again());
    next(&mut alice_in, |e| match e {
        Event::Reconnected => Some(()),
        Event::Presence(p) => panic!("presence before the reconnect: {p:?}"),
        _ => None,
    })
    .await;

    // What changed meanwhile is told after the reconnect: bob is offline. carol, still
    // offline, is not told again.
    assert_eq!(next_presence(&mut alice_in).await, ("bob".into(), false));
    // Later changes arrive without alice subscribing again.
    let carol = Client::connect(quick_reconnects(&gw, "carol"))
        .await
        .unwrap();
    assert_eq!(next_presence(&mut alice_in).await, ("carol".into(), true));
    let bob = Client::connect(quick_reconnects(&gw, "bob")).await.unwrap();
    assert_eq!(next_presence(&mut alice_in).await, ("bob".into(), true));
    bob.close().await;
    assert_eq!(next_presence(&mut alice_in).await, ("bob".into(), false));
    carol.close().await;
    assert_eq!(next_presence(&mut alice_in).await, ("carol".into(), false));

    // Unsubscribed: no longer followed, after another reconnect either.
    assert_eq!(alice.subscribe_presence(["bob"], true).await.unwrap(), 1);
    tokio::task::block_in_place(|| {
        gw.kill();
        gw.start_again();
    });
    next(&mut alice_in, |e| match e {
        Event::Reconnected => Some(()),
        Event::Presence(p) => panic!("presence before the reconnect: {p:?}"),
        _ => None,
    })
    .await;
    let bob = Client::connect(quick_reconnects(&gw, "bob")).await.unwrap();
    let carol = Client::connect(quick_reconnects(&gw, "carol"))
        .await
        .unwrap();
    assert_eq!(
        next_presence(&mut alice_in).await,
        ("carol".into(), true),
        "bob's coming online is not told"
    );
    bob.close().await;
    carol.close().await;
    alice.close().await;
}
