//! Server push end to end: the admin API makes pushes to tags, aliases, users and everyone;
//! clients on real sockets get them live or at their next login within the time-to-live, and
//! acknowledge them; registrations (alias, push token, do-not-disturb) go through the protocol.

use serde_json::{Value, json};
use tern_protocol::v1::frame::Body;
use tern_protocol::{DeviceSettings, DoNotDisturb, ErrorCode, PushAck, PushNotice, SetDevice};
use tern_tests::{Conn, Gateway, Via};

fn login(gw: &Gateway, user: &str, device: &str) -> Conn {
    gw.login(Via::Tcp, &gw.token(user), device).0
}

fn ok(got: (u16, Value)) -> Value {
    assert_eq!(got.0, 200, "{got:?}");
    got.1
}

fn assert_error(got: &(u16, Value), status: u16, code: ErrorCode) {
    assert_eq!(got.0, status, "{got:?}");
    assert_eq!(got.1["error"]["name"], json!(code.as_str_name()), "{got:?}");
}

fn push(gw: &Gateway, body: Value) -> Value {
    ok(gw.api_call("POST", "/v1/push", Some(&body)))
}

/// The next frame, which must be a PushNotice.
fn expect_push(c: &mut Conn) -> PushNotice {
    match c.pushed() {
        Body::PushNotice(p) => p,
        other => panic!("expected PushNotice, got {other:?}"),
    }
}

fn ack(c: &mut Conn, push_id: u64) {
    c.send_body(Body::PushAck(PushAck { push_id }));
}

fn set_device(c: &mut Conn, req: SetDevice) -> DeviceSettings {
    let rid = c.send_body(Body::SetDevice(req));
    match c.answer(rid) {
        Body::DeviceSettings(s) => s,
        other => panic!("expected DeviceSettings, got {other:?}"),
    }
}

fn tag(gw: &Gateway, tag: &str, add: Value) {
    let body = json!({ "add": add });
    let got = ok(gw.api_call("POST", &format!("/v1/tags/{tag}"), Some(&body)));
    assert_eq!(got["added"], json!(add.as_array().unwrap().len()));
}

fn counters(gw: &Gateway, id: u64) -> (u64, u64) {
    let got = ok(gw.api_call("GET", &format!("/v1/push/{id}"), None));
    (
        got["reached"].as_u64().unwrap(),
        got["acked"].as_u64().unwrap(),
    )
}

#[test]
fn a_push_to_a_tag_reaches_exactly_the_tagged_devices_online_and_later_within_its_ttl() {
    let gw = Gateway::start(&["--cores", "2"]);
    // vip: alice's phone only, bob as a whole, dave (offline) as a whole, erin's tablet.
    tag(
        &gw,
        "vip",
        json!([
            {"user": "alice", "device": "phone"},
            {"user": "bob"},
            {"user": "dave"},
            {"user": "erin", "device": "tablet"},
        ]),
    );
    let members = ok(gw.api_call("GET", "/v1/tags/vip", None));
    assert_eq!(
        members["members"],
        json!([
            {"user": "alice", "device": "phone"},
            {"user": "bob"},
            {"user": "dave"},
            {"user": "erin", "device": "tablet"},
        ])
    );
    let mut alice_phone = login(&gw, "alice", "phone");
    let mut alice_pad = login(&gw, "alice", "pad");
    let mut bob = login(&gw, "bob", "phone");
    let mut carol = login(&gw, "carol", "phone");

    let made = push(
        &gw,
        json!({"tags": ["vip"], "title": "Sale", "text": "50% off", "ttl_secs": 600}),
    );
    let id = made["push_id"].as_u64().unwrap();
    assert_eq!(made["users"], json!(4));
    assert_eq!(made["online_devices"], json!(2));
    let expires = made["expires_at_ms"].as_u64().unwrap();

    for c in [&mut alice_phone, &mut bob] {
        let p = expect_push(c);
        assert_eq!(p.push_id, id);
        assert_eq!(p.title, "Sale");
        assert_eq!(&p.payload[..], b"50% off");
        assert_eq!(p.content_type, tern_protocol::ContentType::Text as u32);
        assert_eq!(p.expires_at_ms, expires);
        assert!(p.sent_at_ms < expires);
    }
    alice_pad.nothing_pending();
    carol.nothing_pending();
    ack(&mut alice_phone, id);
    alice_phone.nothing_pending();

    // Later logins: the tagged ones get it right after HelloOk, the others nothing.
    let mut dave = login(&gw, "dave", "phone");
    assert_eq!(expect_push(&mut dave).push_id, id);
    ack(&mut dave, id);
    dave.nothing_pending();
    let mut erin_tablet = login(&gw, "erin", "tablet");
    assert_eq!(expect_push(&mut erin_tablet).push_id, id);
    login(&gw, "erin", "phone").nothing_pending();
    login(&gw, "frank", "phone").nothing_pending();

    // A device that acknowledged does not get it again; one that did not, does.
    drop(alice_phone);
    login(&gw, "alice", "phone").nothing_pending();
    drop(bob);
    let mut bob = login(&gw, "bob", "phone");
    assert_eq!(expect_push(&mut bob).push_id, id);
    ack(&mut bob, id);
    bob.nothing_pending();
    drop(bob);
    login(&gw, "bob", "phone").nothing_pending();

    // reached: alice's phone, bob twice (he reconnected without acknowledging), dave, erin's
    // tablet; acked: alice, dave, bob.
    assert_eq!(counters(&gw, id), (5, 3));
}

#[test]
fn an_offline_device_gets_a_push_within_its_ttl_and_not_after_it() {
    let gw = Gateway::start(&["--cores", "2"]);
    tag(&gw, "beta", json!([{"user": "gina"}, {"user": "hal"}]));
    // Tokens first: gina must log in within the short ttl, with nothing slow in between.
    let (gina_token, hal_token) = (gw.token("gina"), gw.token("hal"));
    let short = push(
        &gw,
        json!({"tags": ["beta"], "text": "short", "ttl_secs": 8}),
    );
    let long = push(
        &gw,
        json!({"tags": ["beta"], "text": "long", "ttl_secs": 600}),
    );
    let online_only = push(&gw, json!({"tags": ["beta"], "text": "now", "ttl_secs": 0}));
    assert_eq!(online_only["expires_at_ms"], json!(0));
    assert_eq!(online_only["online_devices"], json!(0));
    let (short_id, long_id) = (
        short["push_id"].as_u64().unwrap(),
        long["push_id"].as_u64().unwrap(),
    );
    assert!(short_id < long_id);

    // gina logs in within the short push's ttl: both, oldest first.
    let mut gina = gw.login(Via::Tcp, &gina_token, "phone").0;
    assert_eq!(expect_push(&mut gina).push_id, short_id);
    assert_eq!(expect_push(&mut gina).push_id, long_id);
    gina.nothing_pending();

    // hal logs in after it expired: only the long one. The wait is for the server's clock to
    // pass the expiry the server answered, not for anything the server does.
    let expires = short["expires_at_ms"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    if expires >= now {
        std::thread::sleep(std::time::Duration::from_millis(expires - now + 5));
    }
    let mut hal = gw.login(Via::Tcp, &hal_token, "phone").0;
    assert_eq!(expect_push(&mut hal).push_id, long_id);
    hal.nothing_pending();
}

#[test]
fn a_push_to_everyone_reaches_online_devices_and_new_logins_and_survives_a_restart() {
    let mut gw = Gateway::start(&["--cores", "2"]);
    let mut ivy = login(&gw, "ivy", "phone");
    let mut jack = login(&gw, "jack", "laptop");
    let made = push(
        &gw,
        json!({"all": true, "title": "Maintenance", "text": "at 2am"}),
    );
    let id = made["push_id"].as_u64().unwrap();
    assert_eq!(made["users"], json!(0));
    assert_eq!(made["online_devices"], json!(2));
    for c in [&mut ivy, &mut jack] {
        let p = expect_push(c);
        assert_eq!((p.push_id, p.title.as_str()), (id, "Maintenance"));
    }
    ack(&mut ivy, id);
    ivy.nothing_pending();
    drop((ivy, jack));

    gw.restart();
    // After the restart: a user who never logged in gets it, ivy (acknowledged) does not,
    // jack (did not) does; push ids keep increasing.
    let mut kim = login(&gw, "kim", "phone");
    assert_eq!(expect_push(&mut kim).push_id, id);
    login(&gw, "ivy", "phone").nothing_pending();
    let mut jack = login(&gw, "jack", "laptop");
    assert_eq!(expect_push(&mut jack).push_id, id);
    let next = push(&gw, json!({"users": ["kim"], "text": "hi"}));
    assert!(next["push_id"].as_u64().unwrap() > id);
    assert_eq!(
        expect_push(&mut kim).push_id,
        next["push_id"].as_u64().unwrap()
    );
    jack.nothing_pending();
    let info = ok(gw.api_call("GET", &format!("/v1/push/{id}"), None));
    assert_eq!(info["title"], json!("Maintenance"));
    assert_eq!(info["audience"], json!("all"));
}

#[test]
fn aliases_are_bound_by_devices_or_the_api_and_address_only_their_devices() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut lena_phone = login(&gw, "lena", "phone");
    let mut lena_pad = login(&gw, "lena", "pad");
    let s = set_device(
        &mut lena_phone,
        SetDevice {
            alias: Some("lena-main".into()),
            push_provider: Some("fcm".into()),
            push_token: Some("fcm-token-1".into()),
            dnd: Some(DoNotDisturb {
                enabled: true,
                start_minute: 1320,
                end_minute: 420,
                utc_offset_minutes: 60,
            }),
        },
    );
    assert_eq!(s.device_id, "phone");
    assert_eq!(s.alias, "lena-main");
    assert_eq!(s.push_provider, "fcm");
    assert!(s.has_push_token);
    assert_eq!(s.platform, tern_protocol::Platform::Linux as i32);
    assert_eq!(s.dnd.as_ref().unwrap().start_minute, 1320);
    // The API binds a device of another user to the same alias.
    let bound = ok(gw.api_call(
        "POST",
        "/v1/aliases",
        Some(&json!({"alias": "lena-main", "user": "max", "device": "watch"})),
    ));
    assert_eq!(
        bound["devices"],
        json!([{"user": "lena", "device": "phone"}, {"user": "max", "device": "watch"}])
    );
    let mut max_watch = login(&gw, "max", "watch");
    let mut max_phone = login(&gw, "max", "phone");

    let made = push(
        &gw,
        json!({"aliases": ["lena-main"], "text": "for the alias"}),
    );
    let id = made["push_id"].as_u64().unwrap();
    assert_eq!(made["online_devices"], json!(2));
    assert_eq!(expect_push(&mut lena_phone).push_id, id);
    assert_eq!(expect_push(&mut max_watch).push_id, id);
    lena_pad.nothing_pending();
    max_phone.nothing_pending();

    // The registration as the API shows it (never the token itself).
    let devices = ok(gw.api_call("GET", "/v1/users/lena/devices", None));
    let phone = &devices["devices"][0];
    assert_eq!(phone["device"], json!("phone"));
    assert_eq!(phone["alias"], json!("lena-main"));
    assert_eq!(phone["push_provider"], json!("fcm"));
    assert_eq!(phone["has_push_token"], json!(true));
    assert_eq!(phone["platform"], json!("LINUX"));
    assert!(!devices.to_string().contains("fcm-token-1"));

    // Removing the alias through the protocol, then deleting it through the API.
    let s = set_device(
        &mut lena_phone,
        SetDevice {
            alias: Some(String::new()),
            ..Default::default()
        },
    );
    assert_eq!(s.alias, "");
    let got = ok(gw.api_call("DELETE", "/v1/aliases/lena-main", None));
    assert_eq!(got["removed"], json!(1));
    assert_error(
        &gw.api_call(
            "POST",
            "/v1/push",
            Some(&json!({"aliases": ["lena-main"], "text": "x"})),
        ),
        404,
        ErrorCode::NotFound,
    );
    // Bad registrations are refused with their code and change nothing.
    let rid = lena_phone.send_body(Body::SetDevice(SetDevice {
        push_provider: Some("pager".into()),
        push_token: Some("t".into()),
        ..Default::default()
    }));
    let (got, _) = lena_phone.expect_error(ErrorCode::InvalidArgument);
    assert_eq!(got, rid);
    let s = set_device(&mut lena_phone, SetDevice::default());
    assert_eq!((s.push_provider.as_str(), s.has_push_token), ("fcm", true));
}

#[test]
fn bad_push_requests_are_refused_with_their_error_and_send_nothing() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut nia = login(&gw, "nia", "phone");
    let cases = [
        (
            json!({"text": "no audience"}),
            400,
            ErrorCode::InvalidArgument,
        ),
        (
            json!({"all": true, "users": ["nia"], "text": "both"}),
            400,
            ErrorCode::InvalidArgument,
        ),
        (json!({"users": ["nia"]}), 400, ErrorCode::InvalidArgument),
        (
            json!({"users": ["nia"], "text": "x", "ttl_secs": 864001}),
            400,
            ErrorCode::InvalidArgument,
        ),
        (
            json!({"users": ["nia"], "text": "x", "colour": "red"}),
            400,
            ErrorCode::InvalidArgument,
        ),
        (
            json!({"users": [""], "text": "x"}),
            400,
            ErrorCode::InvalidArgument,
        ),
        (
            json!({"tags": ["nobody-has-it"], "text": "x"}),
            404,
            ErrorCode::NotFound,
        ),
        (
            json!({"tags": (0..21).map(|i| format!("t{i}")).collect::<Vec<_>>(), "text": "x"}),
            422,
            ErrorCode::LimitExceeded,
        ),
        (
            json!({"users": ["nia"], "payload_base64": "%%%"}),
            400,
            ErrorCode::InvalidArgument,
        ),
        (
            json!({"users": ["nia"], "text": "x".repeat(70_000)}),
            413,
            ErrorCode::PayloadTooLarge,
        ),
    ];
    for (body, status, code) in cases {
        let got = gw.api_call("POST", "/v1/push", Some(&body));
        assert_error(&got, status, code);
    }
    assert_error(
        &gw.api_call("GET", "/v1/push/12345", None),
        404,
        ErrorCode::NotFound,
    );
    assert_error(
        &gw.api_call("GET", "/v1/push/abc", None),
        400,
        ErrorCode::InvalidArgument,
    );
    // Nothing reached nia; an acknowledgement of a push she never got is refused.
    nia.nothing_pending();
    let rid = nia.send_body(Body::PushAck(PushAck { push_id: 1 }));
    assert_eq!(nia.expect_error(ErrorCode::InvalidArgument).0, rid);
    // The first real push gets the first id.
    let made = push(&gw, json!({"users": ["nia"], "text": "real"}));
    let p = expect_push(&mut nia);
    assert_eq!(p.push_id, made["push_id"].as_u64().unwrap());
    assert_eq!(&p.payload[..], b"real");
}

const NOTIFY_SECRET: &str = "notify-test-secret";

/// A two-core gateway whose offline notifications go to `url` (a generic webhook provider)
/// one request at a time, so they arrive in the order of the messages.
fn notify_gateway(url: &str) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "[notify]\nconcurrency = 1\n[notify.webhook]\nurl = \"{url}/notify\"\n\
             secret = {NOTIFY_SECRET:?}\n"
        ),
    )
    .unwrap();
    let gw = Gateway::start(&["--cores", "2", "--config", cfg.to_str().unwrap()]);
    (gw, dir)
}

#[test]
fn offline_recipients_get_a_notification_unless_muted_or_in_do_not_disturb() {
    let (url, rx) = tern_tests::http_receiver();
    let (gw, _dir) = notify_gateway(&url);
    // bob's devices, registered by the app server: the phone takes notifications, the pad is
    // in do-not-disturb all day.
    let phone = ok(gw.api_call(
        "POST",
        "/v1/users/bob/devices/phone",
        Some(&json!({"push_provider": "webhook", "push_token": "bob-phone-token"})),
    ));
    assert_eq!(phone["has_push_token"], json!(true));
    ok(gw.api_call(
        "POST",
        "/v1/users/bob/devices/pad",
        Some(&json!({
            "push_provider": "webhook",
            "push_token": "bob-pad-token",
            "dnd": {"enabled": true, "start_minute": 0, "end_minute": 0, "utc_offset_minutes": 0},
        })),
    ));
    ok(gw.api_call(
        "POST",
        "/v1/users/carol/devices/phone",
        Some(&json!({"push_provider": "webhook", "push_token": "carol-token"})),
    ));
    let mut alice = login(&gw, "alice", "phone");
    let next = || rx.recv_timeout(tern_tests::WAIT).expect("a notification");

    let a1 = tern_tests::send_acked(&mut alice, "bob", "m1", "hello bob");
    let n = next();
    assert_eq!((n.method.as_str(), n.path.as_str()), ("POST", "/notify"));
    assert!(tern_tests::signature_valid(
        n.header("x-tern-signature").unwrap(),
        &n.body,
        NOTIFY_SECRET
    ));
    let body = n.json();
    assert_eq!(body["user"], json!("bob"));
    assert_eq!(body["device"], json!("phone"));
    assert_eq!(body["token"], json!("bob-phone-token"));
    assert_eq!(body["title"], json!("alice"));
    assert_eq!(body["body"], json!("hello bob"));
    assert_eq!(body["sender"], json!("alice"));
    assert_eq!(body["seq"], json!(a1.seq));
    assert_eq!(
        body["conversation_id"],
        json!(a1.conversation_id.to_string())
    );

    // bob mutes the conversation: no notification for m2; unmuted again, m3 is the next one.
    let mute = |muted: bool| {
        let req = json!({"setConversation": {
            "conversationId": a1.conversation_id.to_string(), "muted": muted}});
        ok(gw.api_call("POST", "/v1/users/bob/request", Some(&req)));
    };
    mute(true);
    tern_tests::send_acked(&mut alice, "bob", "m2", "muted");
    mute(false);
    let a3 = tern_tests::send_acked(&mut alice, "bob", "m3", "unmuted");
    let body = next().json();
    assert_eq!(
        (body["seq"].clone(), body["body"].clone()),
        (json!(a3.seq), json!("unmuted"))
    );

    // Online, bob gets the message itself and no notification: the next one is carol's.
    let mut bob = login(&gw, "bob", "phone");
    tern_tests::send_acked(&mut alice, "bob", "m4", "live");
    assert_eq!(
        tern_tests::text(&tern_tests::expect_deliver(&mut bob)),
        "live"
    );
    tern_tests::send_acked(&mut alice, "carol", "m5", "hi carol");
    let body = next().json();
    assert_eq!(
        (body["user"].clone(), body["token"].clone()),
        (json!("carol"), json!("carol-token"))
    );
    assert!(rx.try_recv().is_err());
}

#[test]
fn a_group_message_notifies_the_offline_members_who_did_not_mute_the_group() {
    let (url, rx) = tern_tests::http_receiver();
    let (gw, _dir) = notify_gateway(&url);
    for user in ["alice", "bob", "carol", "dave", "erin"] {
        ok(gw.api_call(
            "POST",
            &format!("/v1/users/{user}/devices/phone"),
            Some(&json!({"push_provider": "webhook", "push_token": format!("{user}-token")})),
        ));
    }
    let made = ok(gw.api_call(
        "POST",
        "/v1/groups?as=alice",
        Some(
            &json!({"groupId": "crew", "create": {"profile": {"name": "Crew"},
            "members": ["bob", "carol", "dave"]}}),
        ),
    ));
    let conv = made["groupResponse"]["info"]["conversationId"].clone();
    // dave mutes the group; carol is online; bob is offline.
    let req = json!({"setConversation": {"conversationId": conv, "muted": true}});
    ok(gw.api_call("POST", "/v1/users/dave/request", Some(&req)));
    let mut carol = login(&gw, "carol", "phone");
    let mut alice = login(&gw, "alice", "phone");
    let rid = alice.send_body(Body::Send(tern_protocol::Send {
        client_msg_id: "g1".into(),
        target: Some(tern_protocol::Target::group("crew")),
        content_type: tern_protocol::ContentType::Text as u32,
        custom_type: String::new(),
        payload: bytes::Bytes::from_static(b"hi crew"),
        priority: false,
    }));
    let ack = tern_tests::expect_ack(&mut alice, rid);
    // carol's delivery (after the group's creation event).
    loop {
        let d = tern_tests::expect_deliver(&mut carol);
        if d.seq == ack.seq {
            assert_eq!(tern_tests::text(&d), "hi crew");
            break;
        }
    }
    let next = || {
        rx.recv_timeout(tern_tests::WAIT)
            .expect("a notification")
            .json()
    };
    let n = next();
    assert_eq!(n["user"], json!("bob"));
    assert_eq!(n["token"], json!("bob-token"));
    assert_eq!(n["title"], json!("crew"));
    assert_eq!(n["body"], json!("alice: hi crew"));
    assert_eq!(n["seq"], json!(ack.seq));
    assert_eq!(n["data"]["group_id"], json!("crew"));
    // Nothing for carol (online), dave (muted) or alice (the sender): the next notification
    // is for a later 1:1 message to erin.
    tern_tests::send_acked(&mut alice, "erin", "m1", "hi erin");
    let n = next();
    assert_eq!(
        (n["user"].clone(), n["body"].clone()),
        (json!("erin"), json!("hi erin"))
    );
    assert!(rx.try_recv().is_err());
}
