//! Live rooms end to end: a real gateway on two cores, real sockets. Who gets room messages,
//! de-duplication of retries, rooms staying out of sync, a viewer that stops reading missing
//! room messages without lagging or losing its own messages, and big rooms written in batches.

use bytes::Bytes;
use tern_protocol::v1::frame::Body;
use tern_protocol::v1::room_request::Op;
use tern_protocol::v1::{EnterRoom, LeaveRoom};
use tern_protocol::{
    Ack, ContentType, ErrorCode, Frame, RoomRequest, RoomResponse, SyncRequest, Target, TargetKind,
};
use tern_tests::{
    Conn, Gateway, NO_RATE_LIMITS, Recv, Via, collect_sync, expect_ack, expect_deliver, metric,
    send_acked, text,
};

fn login(gw: &Gateway, user: &str) -> Conn {
    gw.login(Via::Tcp, &gw.token(user), "phone").0
}

fn room_op(c: &mut Conn, room: &str, op: Op) -> RoomResponse {
    let rid = c.send_body(Body::Room(RoomRequest {
        room_id: room.into(),
        op: Some(op),
    }));
    match c.recv_frame() {
        Frame {
            request_id,
            body: Some(Body::RoomResponse(r)),
        } if request_id == rid => r,
        other => panic!("expected RoomResponse for {rid}, got {other:?}"),
    }
}

fn enter(c: &mut Conn, room: &str) -> RoomResponse {
    room_op(c, room, Op::Enter(EnterRoom::default()))
}

fn send_room(c: &mut Conn, room: &str, id: &str, body: Bytes, priority: bool) -> u64 {
    c.send_body(Body::Send(tern_protocol::Send {
        client_msg_id: id.into(),
        target: Some(Target::new(TargetKind::Room, room)),
        content_type: ContentType::Text as u32,
        custom_type: String::new(),
        payload: body,
        priority,
    }))
}

#[test]
fn viewers_in_the_room_get_each_message_once_and_nobody_else_does() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut viewers: Vec<Conn> = (0..6).map(|i| login(&gw, &format!("viewer{i}"))).collect();
    let mut host = login(&gw, "host");
    let mut passer_by = login(&gw, "passer");
    let conv = enter(&mut host, "live").conversation_id;
    for v in &mut viewers {
        assert_eq!(enter(v, "live").conversation_id, conv);
    }
    // The room's id is neither a 1:1 nor a group conversation id.
    assert_eq!(conv >> 62, 1);

    // Outside the room: no posting.
    let rid = send_room(
        &mut passer_by,
        "live",
        "p1",
        Bytes::from_static(b"x"),
        false,
    );
    assert_eq!(passer_by.expect_error(ErrorCode::NotMember), (rid, false));

    for i in 1..=3u64 {
        let rid = send_room(
            &mut host,
            "live",
            &format!("h{i}"),
            format!("hello {i}").into(),
            false,
        );
        let ack = expect_ack(&mut host, rid);
        assert_eq!(
            (ack.conversation_id, ack.seq, ack.duplicate),
            (conv, i, false)
        );
        for v in &mut viewers {
            let d = expect_deliver(v);
            assert_eq!(
                (d.conversation_id, d.seq, d.sender.as_str()),
                (conv, i, "host")
            );
            assert_eq!(d.target, Some(Target::new(TargetKind::Room, "live")));
            assert_eq!(text(&d), format!("hello {i}"));
        }
    }
    // A retry (or the same Send on a second path) is answered with the first seq, sent once.
    let rid = send_room(&mut host, "live", "h3", Bytes::from_static(b"again"), false);
    let ack = expect_ack(&mut host, rid);
    assert_eq!((ack.seq, ack.duplicate), (3, true));

    // A viewer may post too; the host hears it.
    let rid = send_room(
        &mut viewers[0],
        "live",
        "v1",
        Bytes::from_static(b"wow"),
        false,
    );
    assert_eq!(expect_ack(&mut viewers[0], rid).seq, 4);
    let d = expect_deliver(&mut host);
    assert_eq!((d.seq, d.sender.as_str(), text(&d)), (4, "viewer0", "wow"));
    for v in &mut viewers[1..] {
        assert_eq!(expect_deliver(v).seq, 4);
    }

    // Leaving stops the flow for that connection only; closing a connection leaves its rooms.
    room_op(&mut viewers[1], "live", Op::Leave(LeaveRoom {}));
    let rid = send_room(
        &mut viewers[1],
        "live",
        "v2",
        Bytes::from_static(b"x"),
        false,
    );
    assert_eq!(viewers[1].expect_error(ErrorCode::NotMember), (rid, false));
    drop(viewers.pop());
    let rid = send_room(&mut host, "live", "h5", Bytes::from_static(b"five"), false);
    assert_eq!(expect_ack(&mut host, rid).seq, 5);
    for (i, v) in viewers.iter_mut().enumerate() {
        if i == 1 {
            continue;
        }
        assert_eq!(text(&expect_deliver(v)), "five");
    }
    for v in viewers.iter_mut().chain([&mut passer_by, &mut host]) {
        v.nothing_pending();
    }

    // Rooms have no history and no cursor: acks are ignored, sync does not list them.
    viewers[0].send_body(Body::Ack(Ack {
        conversation_id: conv,
        seq: 5,
    }));
    viewers[0].nothing_pending();
    let rid = viewers[0].send_body(Body::Sync(SyncRequest::default()));
    let (convs, msgs, _) = collect_sync(&mut viewers[0], rid);
    assert!(convs.is_empty() && msgs.is_empty(), "{convs:?} {msgs:?}");
}

#[test]
fn bad_room_requests_get_their_error_codes() {
    let gw = Gateway::start(&[]);
    let mut c = login(&gw, "alice");
    let rid = c.send_body(Body::Room(RoomRequest {
        room_id: "r".into(),
        op: None,
    }));
    assert_eq!(c.expect_error(ErrorCode::InvalidArgument), (rid, false));
    let rid = c.send_body(Body::Room(RoomRequest {
        room_id: String::new(),
        op: Some(Op::Enter(EnterRoom::default())),
    }));
    assert_eq!(c.expect_error(ErrorCode::InvalidArgument), (rid, false));
    for i in 0..16 {
        enter(&mut c, &format!("room{i}"));
    }
    // Entering a room one is in already changes nothing.
    enter(&mut c, "room0");
    let rid = c.send_body(Body::Room(RoomRequest {
        room_id: "room16".into(),
        op: Some(Op::Enter(EnterRoom::default())),
    }));
    assert_eq!(c.expect_error(ErrorCode::LimitExceeded), (rid, false));
}

/// A viewer that stops reading while a busy room floods it misses ordinary room messages, keeps
/// the priority ones, is never told to sync, and still gets its own 1:1 message live.
#[test]
fn a_viewer_that_stops_reading_misses_room_messages_but_nothing_else() {
    let gw = Gateway::start_with_config(
        &format!("{NO_RATE_LIMITS}outbound_queue_frames = 16\n"),
        &[],
    );
    let mut host = login(&gw, "host");
    let mut slow = login(&gw, "slow");
    let mut friend = login(&gw, "friend");
    enter(&mut host, "busy");
    enter(&mut slow, "busy");

    // 400 messages of 64 KiB: far more than the socket buffers and the queue hold. Every 100th
    // is a priority message: at most 4 of them come after the queue is half full, and a quarter
    // of the 16-frame queue (4) is theirs.
    const N: u64 = 400;
    let body = Bytes::from(vec![b'r'; 64 << 10]);
    for i in 1..=N {
        let rid = send_room(
            &mut host,
            "busy",
            &format!("m{i}"),
            body.clone(),
            i % 100 == 0,
        );
        assert_eq!(expect_ack(&mut host, rid).seq, i);
    }
    send_acked(&mut friend, "slow", "f1", "still reaches you");

    // Now read everything queued for the slow viewer: rounds of Ping until the 1:1 message came
    // and a round brought nothing new.
    let mut seqs = Vec::new();
    let mut personal = 0;
    for _ in 0..1000 {
        let rid = slow.send_body(Body::Ping(Default::default()));
        let mut new = 0;
        loop {
            match slow.recv() {
                Recv::Frame(Frame {
                    body: Some(Body::Deliver(d)),
                    ..
                }) if d.target == Some(Target::new(TargetKind::Room, "busy")) => {
                    seqs.push(d.seq);
                    new += 1;
                }
                Recv::Frame(Frame {
                    body: Some(Body::Deliver(d)),
                    ..
                }) => {
                    assert_eq!(
                        (d.sender.as_str(), text(&d)),
                        ("friend", "still reaches you")
                    );
                    personal += 1;
                    new += 1;
                }
                Recv::Frame(Frame {
                    request_id,
                    body: Some(Body::Pong(_)),
                }) if request_id == rid => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        if personal == 1 && new == 0 {
            break;
        }
    }
    assert_eq!(personal, 1, "the 1:1 message arrives live, exactly once");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, no repeats");
    let missed = N - seqs.len() as u64;
    assert!(
        missed > 0,
        "a viewer that does not read must miss room messages"
    );
    for p in (100..=N).step_by(100) {
        assert!(
            seqs.contains(&p),
            "priority message {p} was dropped: got {seqs:?}"
        );
    }
    slow.nothing_pending();
}

/// A room with at least `room_batch_viewers` viewers on a core is written in batches: its
/// messages reach every viewer once and in order, a sender never gets its own, and they are
/// counted as batched. A smaller room on the same core is written at once.
#[test]
fn a_big_room_is_written_in_batches_and_a_small_one_at_once() {
    let gw = Gateway::start_with_config(
        &format!("{NO_RATE_LIMITS}room_batch_viewers = 4\nroom_batch_ms = 100\n"),
        &["--cores", "1"],
    );
    let mut host = login(&gw, "host");
    let mut viewers: Vec<Conn> = (0..3).map(|i| login(&gw, &format!("viewer{i}"))).collect();
    // "big": the host and three viewers (4, batched); "small": the host and viewer0 (2).
    let big = enter(&mut host, "big").conversation_id;
    for v in &mut viewers {
        enter(v, "big");
    }
    let small = enter(&mut host, "small").conversation_id;
    enter(&mut viewers[0], "small");

    for i in 1..=3u64 {
        let rid = send_room(
            &mut host,
            "big",
            &format!("b{i}"),
            format!("big {i}").into(),
            i == 2,
        );
        assert_eq!(expect_ack(&mut host, rid).seq, i);
    }
    // What a connection got, per conversation, in arrival order.
    let got = |c: &mut Conn, n: usize| -> Vec<(u64, u64, String)> {
        let mut all: Vec<(u64, u64, String)> = (0..n)
            .map(|_| {
                let d = expect_deliver(c);
                (d.conversation_id, d.seq, text(&d).to_string())
            })
            .collect();
        // Big and small rooms are written independently; within each, order is kept.
        all.sort_by_key(|m| m.0 != big);
        all
    };
    let mut big_ones: Vec<(u64, u64, String)> =
        (1..=3).map(|i| (big, i, format!("big {i}"))).collect();
    assert_eq!(got(&mut viewers[1], 3), big_ones);

    // A viewer posts: everyone else in the room gets it, in the same batches.
    let rid = send_room(
        &mut viewers[1],
        "big",
        "v1",
        Bytes::from_static(b"from v1"),
        false,
    );
    assert_eq!(expect_ack(&mut viewers[1], rid).seq, 4);
    big_ones.push((big, 4, "from v1".into()));
    assert_eq!(got(&mut host, 1), big_ones[3..].to_vec());
    let rid = send_room(
        &mut host,
        "small",
        "s1",
        Bytes::from_static(b"small"),
        false,
    );
    assert_eq!(expect_ack(&mut host, rid).seq, 1);
    let mut with_small = big_ones.clone();
    with_small.push((small, 1, "small".into()));
    assert_eq!(got(&mut viewers[0], 5), with_small);
    assert_eq!(got(&mut viewers[2], 4), big_ones);
    // Nothing is sent twice: the next message is the next thing every viewer gets.
    let rid = send_room(&mut host, "big", "b5", Bytes::from_static(b"big 5"), false);
    assert_eq!(expect_ack(&mut host, rid).seq, 5);
    for v in &mut viewers {
        assert_eq!(got(v, 1), [(big, 5, "big 5".to_string())]);
    }
    for c in viewers.iter_mut().chain([&mut host]) {
        c.nothing_pending();
    }
    let text = gw.metrics();
    assert_eq!(
        metric(&text, "tern_room_deliveries_batched_total", ""),
        15,
        "four messages to three viewers and one to three"
    );
    assert_eq!(metric(&text, "tern_deliveries_out_total", ""), 16);
}

/// A big room that falls below `room_batch_viewers` while messages are held keeps holding
/// until they are flushed: a message written at once would overtake them.
#[test]
fn a_room_that_shrinks_keeps_its_order() {
    let gw = Gateway::start_with_config(
        &format!("{NO_RATE_LIMITS}room_batch_viewers = 3\nroom_batch_ms = 5000\n"),
        &["--cores", "1"],
    );
    let mut host = login(&gw, "host");
    let mut stays = login(&gw, "stays");
    let mut leaves = login(&gw, "leaves");
    for c in [&mut host, &mut stays, &mut leaves] {
        enter(c, "live");
    }
    // The first message to a quiet room goes out at once; the second waits for the next
    // flush, five seconds later (long enough for the Leave to be answered first).
    post(&mut host, "live", 1);
    assert_eq!(text(&expect_deliver(&mut stays)), "m1");
    assert_eq!(text(&expect_deliver(&mut leaves)), "m1");
    post(&mut host, "live", 2);
    room_op(&mut leaves, "live", Op::Leave(LeaveRoom {}));
    post(&mut host, "live", 3);
    let seqs: Vec<u64> = (0..2).map(|_| expect_deliver(&mut stays).seq).collect();
    assert_eq!(seqs, [2, 3]);
    for c in [&mut host, &mut stays, &mut leaves] {
        c.nothing_pending();
    }
}

fn enter_recent(c: &mut Conn, room: &str, recent: u32) -> Vec<(u64, String)> {
    let r = room_op(c, room, Op::Enter(EnterRoom { recent }));
    r.recent
        .iter()
        .map(|d| (d.seq, text(d).to_string()))
        .collect()
}

fn post(host: &mut Conn, room: &str, i: u64) {
    let rid = send_room(host, room, &format!("m{i}"), format!("m{i}").into(), false);
    assert_eq!(expect_ack(host, rid).seq, i);
}

/// (seq, text) of messages `seqs` as `post` sent them.
fn posted(seqs: std::ops::RangeInclusive<u64>) -> Vec<(u64, String)> {
    seqs.map(|i| (i, format!("m{i}"))).collect()
}

/// A viewer may ask for the room's latest messages when it enters: they come in the answer, at
/// most `room_history_messages` of them, and the room's next message is the next it gets.
#[test]
fn a_viewer_entering_gets_the_latest_messages_and_then_the_next_ones() {
    let gw = Gateway::start_with_config(
        &format!("{NO_RATE_LIMITS}room_history_messages = 3\n"),
        &["--cores", "2"],
    );
    let mut host = login(&gw, "host");
    assert_eq!(enter_recent(&mut host, "live", 10), []);
    for i in 1..=5 {
        post(&mut host, "live", i);
    }
    // Viewers on both cores (users hash to either).
    let mut viewers: Vec<Conn> = (0..4).map(|i| login(&gw, &format!("viewer{i}"))).collect();
    for v in &mut viewers {
        assert_eq!(enter_recent(v, "live", 10), posted(3..=5));
    }
    let mut late = login(&gw, "late");
    assert_eq!(enter_recent(&mut late, "live", 2), posted(4..=5));
    // Entering again gives nothing again.
    assert_eq!(enter_recent(&mut late, "live", 2), []);
    let mut plain = login(&gw, "plain");
    assert_eq!(enter_recent(&mut plain, "live", 0), []);
    // Another room's history is its own.
    assert_eq!(enter_recent(&mut plain, "other", 10), []);
    let metrics = gw.metrics();
    let per_core =
        |name: &str| ["core=\"0\"", "core=\"1\""].map(|core| metric(&metrics, name, core));
    assert!(
        !per_core("tern_sessions").contains(&0),
        "viewers on both cores"
    );
    // Each core keeps the same three messages.
    let kept = per_core("tern_room_history_bytes");
    assert!(kept[0] == kept[1] && kept[0] > 0, "{kept:?}");

    for i in 6..=8 {
        post(&mut host, "live", i);
        for v in viewers.iter_mut().chain([&mut late, &mut plain]) {
            let d = expect_deliver(v);
            assert_eq!((d.seq, text(&d)), (i, format!("m{i}").as_str()));
        }
    }
    for v in viewers.iter_mut().chain([&mut late, &mut plain]) {
        v.nothing_pending();
    }
    // Three messages of the same sizes replaced the three kept.
    let metrics = gw.metrics();
    let now =
        ["core=\"0\"", "core=\"1\""].map(|core| metric(&metrics, "tern_room_history_bytes", core));
    assert_eq!(now, kept);
    let mut last = login(&gw, "last");
    assert_eq!(enter_recent(&mut last, "live", 10), posted(6..=8));
}

/// What a big room holds on the core for its next flush is not in the answer: the flush gives
/// it to the new viewer, once.
#[test]
fn a_viewer_entering_a_big_room_gets_each_message_once() {
    let gw = Gateway::start_with_config(
        &format!("{NO_RATE_LIMITS}room_batch_viewers = 2\nroom_batch_ms = 5000\n"),
        &["--cores", "1"],
    );
    let mut host = login(&gw, "host");
    let mut viewer = login(&gw, "viewer");
    enter(&mut host, "live");
    enter(&mut viewer, "live");
    // The first message to a quiet room goes out at once; the next waits for the next flush,
    // five seconds later.
    post(&mut host, "live", 1);
    assert_eq!(text(&expect_deliver(&mut viewer)), "m1");
    post(&mut host, "live", 2);
    let mut newcomer = login(&gw, "newcomer");
    assert_eq!(enter_recent(&mut newcomer, "live", 10), posted(1..=1));
    post(&mut host, "live", 3);
    for v in [&mut viewer, &mut newcomer] {
        let got: Vec<u64> = (0..2).map(|_| expect_deliver(v).seq).collect();
        assert_eq!(got, [2, 3]);
    }
    for c in [&mut host, &mut viewer, &mut newcomer] {
        c.nothing_pending();
    }
}

/// The HTTP API posts to a room without entering it: as the system user (a notice, here marked
/// priority) or as a named user; a repeated client message id is answered with the first seq.
#[test]
fn the_api_posts_to_a_room_without_entering_it() {
    use serde_json::json;
    let gw = Gateway::start(&["--cores", "2"]);
    let mut viewers: Vec<Conn> = (0..3).map(|i| login(&gw, &format!("viewer{i}"))).collect();
    let mut outsider = login(&gw, "outsider");
    let conv = enter(&mut viewers[0], "live").conversation_id;
    for v in &mut viewers[1..] {
        enter(v, "live");
    }
    let post = |body: serde_json::Value| gw.api_call("POST", "/v1/messages", Some(&body));
    let notice =
        json!({"to_room": "live", "text": "gift!", "priority": true, "client_msg_id": "n1"});
    let (status, answer) = post(notice.clone());
    assert_eq!(status, 200, "{answer}");
    let ack = &answer["sendAck"];
    assert_eq!(
        (&ack["seq"], &ack["conversationId"]),
        (&json!("1"), &json!(conv.to_string()))
    );
    let (status, answer) = post(json!({"from": "host", "to_room": "live", "text": "hello"}));
    assert_eq!(
        (status, &answer["sendAck"]["seq"]),
        (200, &json!("2")),
        "{answer}"
    );
    for v in &mut viewers {
        for (seq, sender, body) in [(1, "administrator", "gift!"), (2, "host", "hello")] {
            let d = expect_deliver(v);
            assert_eq!(
                (d.conversation_id, d.seq, d.sender.as_str(), text(&d)),
                (conv, seq, sender, body)
            );
            assert_eq!(d.target, Some(Target::new(TargetKind::Room, "live")));
        }
    }
    let (status, answer) = post(notice);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (&answer["sendAck"]["seq"], &answer["sendAck"]["duplicate"]),
        (&json!("1"), &json!(true))
    );
    for (bad, code) in [
        (
            json!({"to_room": "live", "to_user": "bob", "text": "x"}),
            ErrorCode::InvalidArgument,
        ),
        (
            json!({"to_user": "bob", "text": "x", "priority": true}),
            ErrorCode::InvalidArgument,
        ),
        (
            json!({"to_room": "", "text": "x"}),
            ErrorCode::InvalidArgument,
        ),
    ] {
        let (status, answer) = post(bad);
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["code"], json!(code as i32), "{answer}");
    }
    for v in viewers.iter_mut().chain([&mut outsider]) {
        v.nothing_pending();
    }
}
