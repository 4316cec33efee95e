//! The Rust SDK against a real gateway: rooms, read receipts, presence, conversation settings,
//! recall and friends, with the server's pushes arriving as events; rooms entered and users
//! followed again after a reconnect.

use std::time::Duration;

use tern_client::{
    Client, ClientConfig, ClientError, ContentType, Event, Incoming, ListKind, SetConversation,
    SocialEventKind, Target, TargetKind, recall_event,
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

/// Everything a login's sync hands over, up to its SyncDone: the conversations'
/// `skipped_to_seq` and the seqs of the messages, in the order they came.
async fn login_sync(incoming: &mut Incoming) -> (Vec<u64>, Vec<u64>) {
    let (mut skipped, mut seqs) = (Vec::new(), Vec::new());
    loop {
        let e = next(incoming, Some).await;
        match e {
            Event::Conversations(convs) => skipped.extend(convs.iter().map(|c| c.skipped_to_seq)),
            Event::Message(m) => seqs.push(m.seq),
            Event::SyncDone { .. } => return (skipped, seqs),
            _ => {}
        }
    }
}

/// Once the live message `seq` arrived (and was auto-acknowledged), a sync's report of the
/// device's delivered cursors; no message may come again.
async fn cursors_after(client: &Client, incoming: &mut Incoming, seq: u64) -> Vec<u64> {
    next(incoming, |e| {
        matches!(e, Event::Message(m) if m.seq == seq).then_some(())
    })
    .await;
    client.sync().await.unwrap();
    next(incoming, |e| match e {
        Event::Conversations(c) => Some(c.iter().map(|c| c.delivered_seq).collect()),
        Event::Message(m) => panic!("seq {} came again", m.seq),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_installation_may_sync_only_the_latest_messages() {
    let gw = Gateway::start(&[]);
    let (alice, _alice_in) = connect(&gw, "alice", "phone").await;
    let send = async |n: usize| {
        for _ in 0..n {
            alice
                .send(Target::user("bob"), ContentType::Text as u32, "hi")
                .await
                .unwrap();
        }
    };
    let bob = |device: &str, sync_version: u64| {
        let mut c = ClientConfig::new(gw.addr.to_string(), gw.token("bob"), device);
        c.initial_sync_limit = 2;
        c.sync_version = sync_version;
        c
    };
    send(5).await;
    // No sync position: the latest 2.
    let phone = Client::connect(bob("phone", 0)).await.unwrap();
    let mut phone_in = phone.incoming();
    assert_eq!(login_sync(&mut phone_in).await, (vec![3], vec![4, 5]));
    let version = phone.sync_version();
    assert!(version > 0);

    // The phone acknowledged what it got (it counts the messages left out as seen): its next
    // sync finds its cursor at the latest message and sends nothing again.
    send(4).await;
    assert_eq!(cursors_after(&phone, &mut phone_in, 9).await, vec![9]);

    // From a stored position a sync brings every unseen message, whatever the limit: the
    // tablet has seen none of the 9.
    let tablet = Client::connect(bob("tablet", version)).await.unwrap();
    let mut tablet_in = tablet.incoming();
    assert_eq!(
        login_sync(&mut tablet_in).await,
        (vec![0], (1..=9).collect())
    );
    let laptop = Client::connect(bob("laptop", 0)).await.unwrap();
    let mut laptop_in = laptop.incoming();
    assert_eq!(login_sync(&mut laptop_in).await, (vec![7], vec![8, 9]));
    // The application pages what was left out.
    let page = laptop.history(Target::user("alice"), 8, 0).await.unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=7).rev().collect::<Vec<_>>()
    );

    // A sync that starts after what the user cleared: the device acknowledges what it got.
    let conversation_id = page.conversation_id;
    phone
        .set_conversation(SetConversation {
            conversation_id,
            clear_upto_seq: 9,
            ..SetConversation::default()
        })
        .await
        .unwrap();
    send(1).await;
    let watch = Client::connect(ClientConfig::new(
        gw.addr.to_string(),
        gw.token("bob"),
        "watch",
    ))
    .await
    .unwrap();
    let mut watch_in = watch.incoming();
    assert_eq!(login_sync(&mut watch_in).await, (vec![0], vec![10]));
    send(1).await;
    assert_eq!(cursors_after(&watch, &mut watch_in, 11).await, vec![11]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_first_sync_is_bounded_by_the_initial_limit() {
    let gw = Gateway::start(&[]);
    let proxy = tern_tests::proxy::TcpProxy::start(gw.addr);
    let (alice, _alice_in) = connect(&gw, "alice", "phone").await;
    let mut config = quick_reconnects(&gw, "bob");
    config.server = proxy.addr.to_string();
    config.initial_sync_limit = 2;
    // A user with no conversation yet: the first sync completes at version 0.
    let bob = Client::connect(config).await.unwrap();
    let mut bob_in = bob.incoming();
    assert_eq!(login_sync(&mut bob_in).await, (vec![], vec![]));
    assert_eq!(bob.sync_version(), 0);
    let send = async |text: &str| {
        alice
            .send(
                Target::user("bob"),
                ContentType::Text as u32,
                text.to_owned(),
            )
            .await
            .unwrap()
    };
    send("live").await;
    next(&mut bob_in, |e| {
        matches!(e, Event::Message(m) if m.seq == 1).then_some(())
    })
    .await;

    // Five messages while bob's connection is cut; the sync after its reconnect brings them all.
    proxy.stall();
    for i in 2..=6 {
        assert_eq!(send(&format!("m{i}")).await.seq, i);
    }
    proxy.reset_all();
    proxy.resume();
    next(&mut bob_in, |e| {
        matches!(e, Event::Reconnected).then_some(())
    })
    .await;
    let (_, seqs) = login_sync(&mut bob_in).await;
    assert_eq!(seqs, (2..=6).collect::<Vec<_>>());
}

/// A Send cut off by a lost connection, and one made while the client reconnects, go out again
/// with their client message ids once it is connected: each is stored and delivered once, and
/// the one the server had stored before the cut is answered with its first seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_cut_off_by_a_lost_connection_go_out_after_the_reconnect() {
    let gw = Gateway::start(&[]);
    let proxy = tern_tests::proxy::TcpProxy::start(gw.addr);
    let (_bob, mut bob_in) = connect(&gw, "bob", "phone").await;
    assert_eq!(login_sync(&mut bob_in).await, (vec![], vec![]));
    let mut config = quick_reconnects(&gw, "alice");
    config.server = proxy.addr.to_string();
    let alice = std::sync::Arc::new(Client::connect(config).await.unwrap());
    let mut alice_in = alice.incoming();
    let send = |text: &'static str| {
        let alice = alice.clone();
        tokio::spawn(async move {
            alice
                .send_with_id(text, Target::user("bob"), ContentType::Text as u32, text)
                .await
        })
    };
    let message = |e| match e {
        Event::Message(m) => Some((m.seq, String::from_utf8(m.payload.to_vec()).unwrap())),
        _ => None,
    };

    // "one" reaches the server and is stored, but its SendAck is held back; then the connection
    // is cut.
    proxy.stall_replies();
    let one = send("one");
    assert_eq!(next(&mut bob_in, message).await, (1, "one".into()));
    proxy.reset_all();
    next(&mut alice_in, |e| {
        matches!(e, Event::Disconnected { .. }).then_some(())
    })
    .await;
    // "two" is made while the client is disconnected (its next login waits for the replies).
    let two = send("two");
    proxy.resume();
    let one = one.await.unwrap().expect("sent again after the reconnect");
    let two = two.await.unwrap().expect("sent after the reconnect");
    assert_eq!(
        (one.seq, one.duplicate, one.client_msg_id.as_str()),
        (1, true, "one")
    );
    assert_eq!(
        (two.seq, two.duplicate, two.client_msg_id.as_str()),
        (2, false, "two")
    );
    // Bob got each once: after "one", "two", then a third message.
    assert_eq!(next(&mut bob_in, message).await, (2, "two".into()));
    let three = alice
        .send(Target::user("bob"), ContentType::Text as u32, "three")
        .await
        .unwrap();
    assert_eq!(three.seq, 3);
    assert_eq!(next(&mut bob_in, message).await, (3, "three".into()));
}

/// A request over the server's frame limit (here 256 KiB, below the client's own 1 MiB) fails
/// by itself: nothing is written, the connection goes on (it is not lost and opened again), and
/// the next request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_over_the_frame_limit_fails_alone() {
    let gw = Gateway::start(&["--set", "max_frame_bytes=262144"]);
    let proxy = tern_tests::proxy::TcpProxy::start(gw.addr);
    let mut config = quick_reconnects(&gw, "alice");
    config.server = proxy.addr.to_string();
    let alice = Client::connect(config).await.unwrap();
    let text = ContentType::Text as u32;
    let error = alice
        .send(Target::user("bob"), text, vec![b'x'; 300 << 10])
        .await
        .unwrap_err();
    assert!(
        matches!(error, ClientError::RequestTooLarge { len, max } if len > 300 << 10 && max == 256 << 10),
        "{error}"
    );
    let ack = alice
        .send(Target::user("bob"), text, "small")
        .await
        .unwrap();
    assert_eq!(ack.seq, 1);
    assert_eq!(proxy.accepted(), 1, "one connection all along");
}

/// Two tokens of alice minted now: one for an hour and one that expires in 2–3 s, each with
/// its expiry (Unix seconds): `(long_exp, long, exp, short)`.
fn long_and_short_tokens(gw: &Gateway) -> (u64, String, u64, String) {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let long_exp = now() + 3600;
    let long = gw.token_with("alice", &["--expires-at", &long_exp.to_string()]);
    let exp = now() + 3;
    let short = gw.token_with("alice", &["--expires-at", &exp.to_string()]);
    (long_exp, long, exp, short)
}

/// Logs a tablet of alice in with `token` (no token source) and waits until it stops because
/// the token expired (Kick EXPIRED).
async fn tablet_stopped_at_expiry(gw: &Gateway, token: String) {
    let tablet = Client::connect(ClientConfig::new(gw.addr.to_string(), token, "tablet"))
        .await
        .unwrap();
    let mut tablet_in = tablet.incoming();
    let stopped = next(&mut tablet_in, |e| match e {
        Event::Stopped(error) => Some(error),
        _ => None,
    })
    .await;
    assert!(
        matches!(
            stopped,
            ClientError::Kicked {
                reason: tern_client::KickReason::Expired,
                ..
            }
        ),
        "{stopped:?}"
    );
}

/// A client that refreshed its token outlives the first one, and logs in with the new one after
/// a reconnect; a client that did not is stopped with Kick EXPIRED when its token expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_token_outlives_the_first_and_serves_the_reconnect() {
    let gw = Gateway::start(&["--cores", "2"]);
    let proxy = tern_tests::proxy::TcpProxy::start(gw.addr);
    let other_user = gw.token("bob");
    let (long_exp, long, exp, short) = long_and_short_tokens(&gw);

    let mut config = quick_reconnects(&gw, "alice");
    config.server = proxy.addr.to_string();
    config.token = short.clone();
    let phone = Client::connect(config).await.unwrap();
    let mut phone_in = phone.incoming();
    assert_eq!(phone.login().unwrap().token_expires_at, exp);
    match phone.refresh_token(other_user).await {
        Err(ClientError::Server { code, .. }) => {
            assert_eq!(code, tern_client::ErrorCode::TokenInvalid);
        }
        other => panic!("expected TOKEN_INVALID, got {other:?}"),
    }
    assert_eq!(phone.login().unwrap().token_expires_at, exp);
    assert_eq!(phone.refresh_token(long).await.unwrap(), long_exp);
    assert_eq!(phone.login().unwrap().token_expires_at, long_exp);

    // The tablet, on the same core with the first token, is stopped when it expires; by then the
    // phone's old expiry has passed as well.
    tablet_stopped_at_expiry(&gw, short).await;
    phone.ping().await.expect("the refreshed session goes on");

    // A reconnect logs in with the refreshed token (the first one is refused by now).
    proxy.reset_all();
    next(&mut phone_in, |e| match e {
        Event::Reconnected => Some(()),
        Event::Stopped(error) => panic!("stopped: {error:?}"),
        _ => None,
    })
    .await;
    assert_eq!(phone.login().unwrap().token_expires_at, long_exp);
    phone.ping().await.unwrap();
}

/// With a token source the client refreshes its token before it expires; when the source
/// failed and the server ended the session (Kick EXPIRED), it logs in again with a fresh token
/// instead of stopping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_source_keeps_the_client_logged_in_past_each_expiry() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let gw = Gateway::start(&["--cores", "2"]);
    let (long_exp, long, _, short) = long_and_short_tokens(&gw);
    let with_source = |device: &str, fails: usize| {
        let mut config = quick_reconnects(&gw, "alice");
        config.token = short.clone();
        config.device_id = device.to_owned();
        let (long, calls) = (long.clone(), std::sync::Arc::new(AtomicUsize::new(0)));
        let counted = calls.clone();
        config.token_source = Some(tern_client::TokenSource::new(move || {
            let (long, n) = (long.clone(), counted.fetch_add(1, Ordering::SeqCst));
            async move {
                if n < fails {
                    Err("the backend is down".to_owned())
                } else {
                    Ok(long)
                }
            }
        }));
        (config, calls)
    };
    let (config, phone_calls) = with_source("phone", 0);
    let phone = Client::connect(config).await.unwrap();
    let mut phone_in = phone.incoming();
    let (config, laptop_calls) = with_source("laptop", 1);
    let laptop = Client::connect(config).await.unwrap();
    let mut laptop_in = laptop.incoming();

    // A tablet without a source stops when the token expires.
    tablet_stopped_at_expiry(&gw, short).await;
    // The phone refreshed before that, on the same connection.
    assert_eq!(phone.login().unwrap().token_expires_at, long_exp);
    assert_eq!(phone_calls.load(Ordering::SeqCst), 1);
    phone.ping().await.unwrap();
    while let Some(event) = phone_in.try_recv() {
        assert!(
            !matches!(event, Event::Disconnected { .. } | Event::Stopped(_)),
            "{event:?}"
        );
    }
    // The laptop's source failed: it was kicked, and logged in again with a fresh token.
    let reason = next(&mut laptop_in, |e| match e {
        Event::Disconnected { reason } => Some(reason),
        Event::Stopped(error) => panic!("stopped: {error:?}"),
        _ => None,
    })
    .await;
    assert!(
        matches!(
            reason,
            ClientError::Kicked {
                reason: tern_client::KickReason::Expired,
                ..
            }
        ),
        "{reason:?}"
    );
    next(&mut laptop_in, |e| match e {
        Event::Reconnected => Some(()),
        Event::Stopped(error) => panic!("stopped: {error:?}"),
        _ => None,
    })
    .await;
    assert_eq!(laptop.login().unwrap().token_expires_at, long_exp);
    assert_eq!(laptop_calls.load(Ordering::SeqCst), 2);
    laptop.ping().await.unwrap();
}
