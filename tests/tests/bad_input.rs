//! Bad input gets its documented error code, closes only the offending connection, and never
//! disturbs other sessions. Every test runs over plain TCP, TLS over TCP and QUIC (`tcp::`,
//! `tls::`, `quic::`).

use bytes::Bytes;
use tern_protocol::v1::frame::Body;
use tern_protocol::v1::group_request::Op;
use tern_protocol::v1::{CreateGroup, TargetKind};
use tern_protocol::{
    ContentType, ErrorCode, GROUP_EVENT_TYPE, GroupRequest, HistoryRequest, RECALL_EVENT_TYPE,
    Target,
};
use tern_tests::{Conn, Gateway, Via, expect_deliver, hello, over_every_transport};

over_every_transport!(
    garbage_oversize_and_frames_before_login,
    bad_tokens_are_refused,
    session_errors_after_login,
    login_timeout_and_replaced_device,
    group_sends_get_the_same_checks,
);

/// A healthy pair of sessions that must keep working whatever the bad client does.
struct Witness {
    alice: Conn,
    bob: Conn,
    n: u64,
}

impl Witness {
    fn new(gw: &Gateway, via: Via) -> Witness {
        Witness {
            alice: gw.login(via, &gw.token("alice"), "w").0,
            bob: gw.login(via, &gw.token("bob"), "w").0,
            n: 0,
        }
    }

    fn check(&mut self) {
        self.n += 1;
        let rid = self.alice.send_body(Body::Send(tern_protocol::Send {
            client_msg_id: format!("w{}", self.n),
            target: Some(Target::user("bob")),
            content_type: 1,
            custom_type: String::new(),
            payload: Bytes::from_static(b"still here"),
            priority: false,
        }));
        let f = self.alice.recv_frame();
        assert_eq!(f.request_id, rid);
        let Some(Body::SendAck(a)) = f.body else {
            panic!("{f:?}")
        };
        assert_eq!(a.seq, self.n);
        let Some(Body::Deliver(d)) = self.bob.recv_frame().body else {
            panic!("no deliver")
        };
        assert_eq!(d.seq, self.n);
    }
}

fn garbage_oversize_and_frames_before_login(via: Via) {
    let gw = Gateway::start_via(via, &[]);
    let mut w = Witness::new(&gw, via);

    // Undecodable protobuf body.
    let mut c = gw.connect(via);
    c.send_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
    let (_, fatal) = c.expect_error(ErrorCode::BadFrame);
    assert!(fatal);
    c.expect_closed();
    w.check();

    // A zero-length frame.
    let mut c = gw.connect(via);
    c.send_raw(&[0, 0, 0, 0]);
    c.expect_error(ErrorCode::BadFrame);
    c.expect_closed();

    // A length prefix over the 1 MiB limit is refused before the body arrives.
    let mut c = gw.connect(via);
    c.send_raw(&[0x7f, 0xff, 0xff, 0xff]);
    let (_, fatal) = c.expect_error(ErrorCode::FrameTooLarge);
    assert!(fatal);
    c.expect_closed();
    w.check();

    // Anything but Hello first.
    let mut c = gw.connect(via);
    let rid = c.send_body(Body::Ping(Default::default()));
    let (answered, fatal) = c.expect_error(ErrorCode::Unauthenticated);
    assert_eq!((answered, fatal), (rid, true));
    c.expect_closed();

    // Wrong protocol version.
    let mut c = gw.connect(via);
    let mut h = hello(&gw.token("carol"), "d");
    h.protocol_version = 99;
    c.send_body(Body::Hello(h));
    c.expect_error(ErrorCode::UnsupportedVersion);
    c.expect_closed();
    w.check();
}

fn bad_tokens_are_refused(via: Via) {
    let gw = Gateway::start_via(via, &[]);
    let other = Gateway::start_via(via, &[]);
    let mut w = Witness::new(&gw, via);

    // Signed by another server's secret.
    let mut c = gw.connect(via);
    c.send_body(Body::Hello(hello(&other.token("alice"), "d")));
    c.expect_error(ErrorCode::TokenInvalid);
    c.expect_closed();

    // Expired.
    let expired = gw.token_with("alice", &["--expires-at", "1000"]);
    let mut c = gw.connect(via);
    c.send_body(Body::Hello(hello(&expired, "d")));
    c.expect_error(ErrorCode::TokenExpired);
    c.expect_closed();

    // Alice's signature on a payload claiming to be bob: sending as another user is impossible.
    let alice = gw.token("alice");
    let bob = gw.token("bob");
    let forged = format!(
        "{}.{}",
        bob.split_once('.').unwrap().0,
        alice.split_once('.').unwrap().1
    );
    let mut c = gw.connect(via);
    c.send_body(Body::Hello(hello(&forged, "d")));
    c.expect_error(ErrorCode::TokenInvalid);
    c.expect_closed();

    // Garbage token.
    let mut c = gw.connect(via);
    c.send_body(Body::Hello(hello("not-a-token", "d")));
    c.expect_error(ErrorCode::TokenInvalid);
    c.expect_closed();

    // A token bound to a device cannot log in another device.
    let bound = gw.token_with("alice", &["--device", "phone"]);
    let mut c = gw.connect(via);
    c.send_body(Body::Hello(hello(&bound, "laptop")));
    c.expect_error(ErrorCode::TokenInvalid);
    c.expect_closed();
    let (_, ok) = gw.login(via, &bound, "phone");
    assert_eq!(ok.device_id, "phone");
    w.check();
}

fn session_errors_after_login(via: Via) {
    let gw = Gateway::start_via(via, &[]);
    let mut w = Witness::new(&gw, via);
    let (mut carol, _) = gw.login(via, &gw.token("carol"), "d");

    // An unknown message type (a newer client): error, connection stays usable.
    let mut raw = bytes::BytesMut::new();
    // Frame{request_id: 7, field 99 (length-delimited, empty)}
    let body = [0x08, 0x07, 0x9a, 0x06, 0x00];
    raw.extend_from_slice(&(body.len() as u32).to_be_bytes());
    raw.extend_from_slice(&body);
    carol.send_raw(&raw);
    let (rid, fatal) = carol.expect_error(ErrorCode::UnknownMessage);
    assert_eq!((rid, fatal), (7, false));

    // A server-only message from a client.
    let rid = carol.send_body(Body::SyncDone(Default::default()));
    assert_eq!(carol.expect_error(ErrorCode::UnexpectedMessage).0, rid);

    // Reading another user's conversation: erin<->frank history.
    let (mut erin, _) = gw.login(via, &gw.token("erin"), "x");
    let rid = erin.send_body(Body::Send(tern_protocol::Send {
        client_msg_id: "secret".into(),
        target: Some(Target::user("frank")),
        content_type: 1,
        custom_type: String::new(),
        payload: Bytes::from_static(b"private"),
        priority: false,
    }));
    let f = erin.recv_frame();
    assert_eq!(f.request_id, rid);
    let Some(Body::SendAck(ack)) = f.body else {
        panic!("{f:?}")
    };
    let rid = carol.send_body(Body::History(HistoryRequest {
        conversation_id: ack.conversation_id,
        target: None,
        before_seq: 0,
        limit: 10,
    }));
    assert_eq!(carol.expect_error(ErrorCode::Forbidden).0, rid);
    let rid = carol.send_body(Body::Ack(tern_protocol::Ack {
        conversation_id: ack.conversation_id,
        seq: 1,
    }));
    assert_eq!(carol.expect_error(ErrorCode::Forbidden).0, rid);

    // Invalid sends.
    let rid = carol.send_body(Body::Send(tern_protocol::Send {
        client_msg_id: String::new(),
        target: Some(Target::user("bob")),
        ..Default::default()
    }));
    assert_eq!(carol.expect_error(ErrorCode::InvalidArgument).0, rid);
    let rid = carol.send_body(Body::Send(tern_protocol::Send {
        client_msg_id: "big".into(),
        target: Some(Target::user("bob")),
        payload: Bytes::from(vec![0u8; 65 << 10]),
        ..Default::default()
    }));
    assert_eq!(carol.expect_error(ErrorCode::PayloadTooLarge).0, rid);
    let rid = carol.send_body(Body::Send(tern_protocol::Send {
        client_msg_id: "nobody".into(),
        target: None,
        ..Default::default()
    }));
    assert_eq!(carol.expect_error(ErrorCode::InvalidArgument).0, rid);
    // custom_type: 64 bytes are accepted, 65 are not (docs/PROTOCOL.md, Limits).
    let mut stored = 0;
    for (len, ok) in [(64, true), (65, false)] {
        let rid = carol.send_body(Body::Send(tern_protocol::Send {
            client_msg_id: format!("custom{len}"),
            target: Some(Target::user("bob")),
            content_type: 1,
            custom_type: "t".repeat(len),
            payload: Bytes::from_static(b"x"),
            priority: false,
        }));
        let f = carol.recv_frame();
        assert_eq!(f.request_id, rid);
        match f.body {
            Some(Body::SendAck(a)) if ok => stored = a.seq,
            Some(Body::Error(e)) if !ok => {
                assert_eq!(e.code, ErrorCode::InvalidArgument as i32);
                assert!(e.message.contains("custom_type"), "{}", e.message);
            }
            other => panic!("custom_type of {len} bytes: {other:?}"),
        }
    }
    // SYSTEM messages and custom types starting with "tern." are the server's (a forged group
    // event would be decoded as real): refused, and nothing is stored.
    let system = ContentType::System as u32;
    let custom = ContentType::Custom as u32;
    for (content_type, custom_type) in [
        (system, ""),
        (system, GROUP_EVENT_TYPE),
        (custom, GROUP_EVENT_TYPE),
        (custom, RECALL_EVENT_TYPE),
        (1, "tern.anything"),
    ] {
        let rid = carol.send_body(Body::Send(tern_protocol::Send {
            client_msg_id: format!("forged-{content_type}-{custom_type}"),
            target: Some(Target::user("bob")),
            content_type,
            custom_type: custom_type.into(),
            payload: Bytes::from_static(b"bob was kicked"),
            priority: false,
        }));
        assert_eq!(
            carol.expect_error(ErrorCode::InvalidArgument),
            (rid, false),
            "{content_type} {custom_type:?}"
        );
    }
    let rid = carol.send_body(Body::Send(tern_protocol::Send {
        client_msg_id: "after-forged".into(),
        target: Some(Target::user("bob")),
        content_type: custom,
        custom_type: "tern-app.note".into(),
        payload: Bytes::from_static(b"x"),
        priority: false,
    }));
    match carol.answer(rid) {
        Body::SendAck(a) => assert_eq!(a.seq, stored + 1),
        other => panic!("expected SendAck, got {other:?}"),
    }

    // Still logged in: a ping works.
    let rid = carol.send_body(Body::Ping(Default::default()));
    let f = carol.recv_frame();
    assert!(matches!(f.body, Some(Body::Pong(_))) && f.request_id == rid);

    // A second Hello closes the connection.
    let rid = carol.send_body(Body::Hello(hello(&gw.token("carol"), "d")));
    let (answered, fatal) = carol.expect_error(ErrorCode::AlreadyAuthenticated);
    assert_eq!((answered, fatal), (rid, true));
    carol.expect_closed();
    w.check();
}

fn login_timeout_and_replaced_device(via: Via) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tern.toml");
    std::fs::write(
        &cfg,
        "login_timeout_ms = 200\nheartbeat_interval_ms = 100\nidle_timeout_ms = 1500\n",
    )
    .unwrap();
    let gw = Gateway::start_via(via, &["--config", cfg.to_str().unwrap()]);

    let mut silent = gw.connect(via);
    if via != Via::Quic {
        let (rid, fatal) = silent.expect_error(ErrorCode::LoginTimeout);
        assert_eq!((rid, fatal), (0, true));
    }
    // Over QUIC a client that opened no stream has nothing to read a frame from: the
    // connection is closed (docs/PROTOCOL.md, "Transports").
    silent.expect_closed();
    // One byte of a length prefix and no more: the timeout's error, then the end.
    let mut stalled = gw.connect(via);
    stalled.send_raw(&[0]);
    let (rid, fatal) = stalled.expect_error(ErrorCode::LoginTimeout);
    assert_eq!((rid, fatal), (0, true));
    stalled.expect_closed();

    // The same device logging in again kicks the older connection.
    let token = gw.token("dave");
    let (mut first, _) = gw.login(via, &token, "phone");
    let (_second, _) = gw.login(via, &token, "phone");
    first.expect_kick(tern_protocol::KickReason::Replaced);

    // A logged-in connection that sends nothing is kicked after the idle timeout.
    let (mut quiet, ok) = gw.login(via, &gw.token("erin"), "d");
    assert_eq!(ok.heartbeat_interval_ms, 100);
    quiet.expect_kick(tern_protocol::KickReason::Idle);
}

/// A Send to a group gets the same checks as a 1:1 Send, before anything is stored: the
/// members get nothing until a valid message, which takes the next seq.
fn group_sends_get_the_same_checks(via: Via) {
    let gw = Gateway::start_via(via, &[]);
    let mut w = Witness::new(&gw, via);
    let (mut carol, _) = gw.login(via, &gw.token("carol"), "d");
    let (mut dave, _) = gw.login(via, &gw.token("dave"), "d");
    let rid = carol.send_body(Body::Group(GroupRequest {
        group_id: "g".into(),
        op: Some(Op::Create(CreateGroup {
            profile: None,
            members: vec!["dave".into()],
        })),
    }));
    assert!(matches!(carol.answer(rid), Body::GroupResponse(_)));
    assert_eq!(expect_deliver(&mut dave).seq, 1);

    let to_group = |group: &str, id: &str| tern_protocol::Send {
        client_msg_id: id.into(),
        target: Some(Target::group(group)),
        content_type: ContentType::Text as u32,
        custom_type: String::new(),
        payload: Bytes::from_static(b"x"),
        priority: false,
    };
    let refused = [
        (to_group("g", ""), ErrorCode::InvalidArgument),
        (
            to_group(&"g".repeat(65), "long-id"),
            ErrorCode::InvalidArgument,
        ),
        (
            tern_protocol::Send {
                payload: Bytes::from(vec![0u8; 65 << 10]),
                ..to_group("g", "big")
            },
            ErrorCode::PayloadTooLarge,
        ),
        (
            tern_protocol::Send {
                custom_type: "t".repeat(65),
                ..to_group("g", "custom")
            },
            ErrorCode::InvalidArgument,
        ),
        (
            tern_protocol::Send {
                content_type: ContentType::System as u32,
                custom_type: GROUP_EVENT_TYPE.into(),
                ..to_group("g", "forged")
            },
            ErrorCode::InvalidArgument,
        ),
        (
            tern_protocol::Send {
                target: Some(Target::new(TargetKind::Unspecified, "g")),
                ..to_group("g", "no-kind")
            },
            ErrorCode::InvalidArgument,
        ),
    ];
    for (send, code) in refused {
        let what = format!("{send:?}").chars().take(120).collect::<String>();
        let rid = carol.send_body(Body::Send(send));
        assert_eq!(carol.expect_error(code), (rid, false), "{what}");
    }
    let rid = carol.send_body(Body::Send(to_group("g", "fine")));
    match carol.answer(rid) {
        Body::SendAck(a) => assert_eq!(a.seq, 2),
        other => panic!("expected SendAck, got {other:?}"),
    }
    let d = expect_deliver(&mut dave);
    assert_eq!((d.seq, d.client_msg_id.as_str()), (2, "fine"));
    dave.nothing_pending();
    w.check();
}
