//! The admin HTTP API end to end: real HTTP against a real two-core gateway, with clients on
//! real sockets seeing the effects.

use serde_json::{Value, json};
use tern_protocol::v1::frame::Body;
use tern_protocol::{ContentType, ErrorCode, KickReason, TargetKind};
use tern_tests::{Conn, Gateway, Via, api_request, expect_deliver, metric, send_acked, text};

fn login(gw: &Gateway, user: &str, device: &str) -> Conn {
    gw.login(Via::Tcp, &gw.token(user), device).0
}

/// Asserts an error answer: its HTTP status, wire code and name.
fn assert_error(got: &(u16, Value), status: u16, code: ErrorCode) {
    assert_eq!(got.0, status, "{got:?}");
    assert_eq!(got.1["error"]["code"], json!(code as i32), "{got:?}");
    assert_eq!(got.1["error"]["name"], json!(code.as_str_name()), "{got:?}");
}

fn ok(got: (u16, Value)) -> Value {
    assert_eq!(got.0, 200, "{got:?}");
    got.1
}

/// A u64 in the protocol's JSON mapping (a decimal string).
fn num(v: &Value) -> u64 {
    v.as_str()
        .unwrap_or_else(|| panic!("not a u64 string: {v}"))
        .parse()
        .unwrap()
}

#[test]
fn bad_credentials_get_401_and_change_nothing() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut bob = login(&gw, "bob", "phone");
    let body = json!({"to_user": "bob", "text": "forged"});
    let base = gw.api.clone().unwrap();
    let secret = gw.api_secret();
    for auth in [
        None,
        Some("Bearer wrong-secret".to_string()),
        Some(format!("Basic {secret}")),
        Some(format!("Bearer {secret}x")),
        Some(format!("bearer {secret}")),
    ] {
        let got = gw.api_call_with("POST", "/v1/messages", Some(&body), auth.as_deref());
        assert_error(&got, 401, ErrorCode::Unauthenticated);
    }
    // Unknown paths are not revealed without credentials either.
    assert_error(
        &gw.api_call_with("GET", "/v1/nope", None, None),
        401,
        ErrorCode::Unauthenticated,
    );
    let got = api_request(
        &format!("{base}/v1/users/eve/token"),
        "POST",
        None,
        None,
        None,
    );
    assert_error(&got, 401, ErrorCode::Unauthenticated);
    // Nothing was sent: bob got nothing, and the first real message is seq 1 of the
    // conversation.
    bob.nothing_pending();
    let ack = ok(gw.api_call(
        "POST",
        "/v1/messages",
        Some(&json!({"to_user": "bob", "text": "real"})),
    ));
    assert_eq!(num(&ack["sendAck"]["seq"]), 1);
    let d = expect_deliver(&mut bob);
    assert_eq!((d.seq, text(&d)), (1, "real"));
}

/// POSTs `body` to `/v1/messages` over a plain socket, writing the body while the server may
/// already have answered and closed: (status, JSON body of the answer).
fn post_over_limit(base: &str, authorization: &str, body: &str) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let addr = base.strip_prefix("http://").expect("a plain HTTP API");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the API");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {authorization}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // Either write may fail once the server has answered (broken pipe, reset).
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()));
    let mut answer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A reset after the answer arrived: what was received is still read above.
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let (head, json_body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (
        status,
        serde_json::from_str(json_body).expect("a JSON body"),
    )
}

#[test]
fn bad_json_and_bad_fields_are_named() {
    let gw = Gateway::start(&["--cores", "2"]);
    let secret = format!("Bearer {}", gw.api_secret());
    let base = gw.api.clone().unwrap();
    let raw = |body: &str, ct: Option<&str>| {
        api_request(
            &format!("{base}/v1/messages"),
            "POST",
            Some(body),
            Some(&secret),
            ct,
        )
    };
    let got = raw("{bad", Some("application/json"));
    assert_error(&got, 400, ErrorCode::InvalidArgument);
    assert!(
        got.1["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("bad JSON body:"),
        "{got:?}"
    );
    let got = raw(r#"{"to_user":"bob","text":"x"}"#, Some("text/plain"));
    assert_error(&got, 400, ErrorCode::InvalidArgument);
    assert_eq!(
        got.1["error"]["message"],
        json!("Content-Type must be application/json")
    );
    let got = raw(r#"{"to_user":"bob","txt":"x"}"#, Some("application/json"));
    assert_error(&got, 400, ErrorCode::InvalidArgument);
    assert!(
        got.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `txt`"),
        "{got:?}"
    );
    for (body, message) in [
        (
            json!({"text": "x"}),
            "give exactly one of to_user, to_group and to_room",
        ),
        (
            json!({"to_user": "bob", "to_group": "g", "text": "x"}),
            "give exactly one of to_user, to_group and to_room",
        ),
        (
            json!({"to_user": "bob"}),
            "give exactly one of text and payload_base64",
        ),
        (
            json!({"to_user": "bob", "text": "x", "content_type": "SHOUTING"}),
            "content_type: unknown content type \"SHOUTING\"",
        ),
    ] {
        let got = gw.api_call("POST", "/v1/messages", Some(&body));
        assert_error(&got, 400, ErrorCode::InvalidArgument);
        assert_eq!(got.1["error"]["message"], json!(message), "{body}");
    }
    let got = gw.api_call(
        "POST",
        "/v1/messages",
        Some(&json!({"to_user": "bob", "payload_base64": "***"})),
    );
    assert_error(&got, 400, ErrorCode::InvalidArgument);
    // Checks of the protocol apply as for clients: an over-size payload.
    let big = "x".repeat(64 * 1024 + 1);
    let got = gw.api_call(
        "POST",
        "/v1/messages",
        Some(&json!({"to_user": "bob", "text": big})),
    );
    assert_error(&got, 413, ErrorCode::PayloadTooLarge);
    // A body over the API's limit (1 MiB) is refused before it is parsed. The server answers
    // and closes without reading the rest, so the client's write may fail: the answer is read
    // from the socket whatever happened to the write.
    let huge = format!(r#"{{"to_user":"bob","text":"{}"}}"#, "y".repeat(2 << 20));
    let (status, answer) = post_over_limit(&base, &secret, &huge);
    assert_eq!(status, 413, "{answer}");
    assert_eq!(
        answer["error"]["code"],
        json!(ErrorCode::PayloadTooLarge as i32),
        "{answer}"
    );
    // Unknown endpoint with good credentials.
    assert_error(
        &gw.api_call("GET", "/v1/nope", None),
        404,
        ErrorCode::NotFound,
    );
    // Requests that would leave state on a connection are not available.
    let got = gw.api_call(
        "POST",
        "/v1/users/alice/request",
        Some(&json!({"sync": {}})),
    );
    assert_error(&got, 400, ErrorCode::InvalidArgument);
    let got = gw.api_call("POST", "/v1/users/alice/request", Some(&json!({})));
    assert_error(&got, 400, ErrorCode::InvalidArgument);
    let got = gw.api_call(
        "POST",
        "/v1/users/import",
        Some(&json!({"users": [{"id": "ok"}, {"id": ""}]})),
    );
    assert_error(&got, 400, ErrorCode::InvalidArgument);
}

#[test]
fn over_limit_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!("{}api_rate_per_sec = 1\n", tern_tests::NO_RATE_LIMITS),
    )
    .unwrap();
    let gw = Gateway::start(&["--cores", "2", "--config", cfg.to_str().unwrap()]);
    // One request per second with a burst of two: of ten back-to-back requests, at most the
    // burst plus one per elapsed second succeed, and the rest are 429 RATE_LIMITED.
    let started = std::time::Instant::now();
    let mut ok_count = 0;
    let mut limited = 0;
    for _ in 0..10 {
        let got = gw.api_call("GET", "/v1/stats", None);
        match got.0 {
            200 => ok_count += 1,
            _ => {
                assert_error(&got, 429, ErrorCode::RateLimited);
                limited += 1;
            }
        }
    }
    let elapsed = started.elapsed().as_secs();
    assert!(ok_count >= 2, "the burst is allowed: {ok_count}");
    assert!(
        ok_count <= 2 + elapsed + 1,
        "{ok_count} allowed in {elapsed} s"
    );
    assert_eq!(ok_count + limited, 10);
    // Wrong credentials do not use up the rate (and are refused first).
    let got = gw.api_call_with("GET", "/v1/stats", None, Some("Bearer nope"));
    assert_error(&got, 401, ErrorCode::Unauthenticated);

    // A batch over the import limit.
    let gw = Gateway::start(&["--cores", "2"]);
    let users: Vec<Value> = (0..1001).map(|i| json!({"id": format!("u{i}")})).collect();
    let got = gw.api_call("POST", "/v1/users/import", Some(&json!({ "users": users })));
    assert_error(&got, 422, ErrorCode::LimitExceeded);
    assert_eq!(
        got.1["error"]["message"],
        json!("at most 1000 users per import")
    );
}

#[test]
fn send_as_system_and_as_user_reaches_devices_with_sequence_numbers() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice", "phone");
    let mut bob_phone = login(&gw, "bob", "phone");
    let mut bob_laptop = login(&gw, "bob", "laptop");

    // As the system (no `from`).
    let ack = ok(gw.api_call(
        "POST",
        "/v1/messages",
        Some(&json!({"to_user": "alice", "text": "welcome", "client_msg_id": "w-1"})),
    ));
    let ack = &ack["sendAck"];
    assert_eq!(ack["clientMsgId"], json!("w-1"));
    assert_eq!(num(&ack["seq"]), 1);
    let d = expect_deliver(&mut alice);
    assert_eq!(d.sender, "administrator");
    assert_eq!(text(&d), "welcome");
    assert_eq!(d.seq, 1);
    assert_eq!(d.conversation_id, num(&ack["conversationId"]));
    // A repeat with the same client_msg_id is the same message, not delivered again.
    let again = ok(gw.api_call(
        "POST",
        "/v1/messages",
        Some(&json!({"to_user": "alice", "text": "welcome", "client_msg_id": "w-1"})),
    ));
    assert_eq!(again["sendAck"]["duplicate"], json!(true));
    assert_eq!(num(&again["sendAck"]["seq"]), 1);

    // As bob: alice gets it, and both of bob's devices get their own copy.
    let ack = ok(gw.api_call(
        "POST",
        "/v1/messages",
        Some(
            &json!({"from": "bob", "to_user": "alice", "text": "hi from the backend",
                     "content_type": "CUSTOM", "custom_type": "note"}),
        ),
    ));
    let seq = num(&ack["sendAck"]["seq"]);
    assert_eq!(seq, 1, "first message of the alice-bob conversation");
    let d = expect_deliver(&mut alice);
    assert_eq!(
        (d.sender.as_str(), text(&d)),
        ("bob", "hi from the backend")
    );
    assert_eq!(d.content_type, ContentType::Custom as u32);
    assert_eq!(d.custom_type, "note");
    for dev in [&mut bob_phone, &mut bob_laptop] {
        let d = expect_deliver(dev);
        assert_eq!(text(&d), "hi from the backend");
        let target = d.target.unwrap();
        assert_eq!(
            (target.kind, target.id.as_str()),
            (TargetKind::User as i32, "alice")
        );
    }
    // And a client's reply continues the same conversation's numbering.
    let reply = send_acked(&mut alice, "bob", "r-1", "thanks");
    assert_eq!(reply.seq, 2);

    // History through the API: newest first, exact.
    let conv = reply.conversation_id;
    let h = ok(gw.api_call(
        "GET",
        &format!("/v1/conversations/{conv}/messages?limit=10"),
        None,
    ));
    let msgs = h["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["seq"], json!(2));
    assert_eq!(msgs[0]["sender"], json!("alice"));
    assert_eq!(msgs[1]["seq"], json!(1));
    assert_eq!(msgs[1]["sender"], json!("bob"));
    assert_eq!(msgs[1]["content_type"], json!("CUSTOM"));
    // "hi from the backend" in base64.
    assert_eq!(
        msgs[1]["payload_base64"],
        json!("aGkgZnJvbSB0aGUgYmFja2VuZA==")
    );
    let h = ok(gw.api_call(
        "GET",
        &format!("/v1/conversations/{conv}/messages?before=2"),
        None,
    ));
    assert_eq!(h["messages"].as_array().unwrap().len(), 1);

    // Recall as the sender through the API: alice sees the tombstone.
    let r = ok(gw.api_call(
        "POST",
        "/v1/messages/recall",
        Some(&json!({"as": "bob", "conversation_id": conv, "seq": 1})),
    ));
    assert_eq!(num(&r["recallOk"]["seq"]), 1);
    let tomb = expect_deliver(&mut alice);
    assert_eq!(tomb.seq, 3);
    assert_eq!(tomb.custom_type, tern_protocol::RECALL_EVENT_TYPE);
    // A recall of someone else's message is refused with the protocol's code.
    let got = gw.api_call(
        "POST",
        "/v1/messages/recall",
        Some(&json!({"as": "bob", "conversation_id": conv, "seq": 2})),
    );
    assert_error(&got, 403, ErrorCode::Forbidden);
    alice.nothing_pending();
    for dev in [&mut bob_phone, &mut bob_laptop] {
        assert_eq!(expect_deliver(dev).seq, 2, "alice's reply");
        assert_eq!(expect_deliver(dev).seq, 3, "the recall tombstone");
        dev.nothing_pending();
    }

    // The API may send SYSTEM notices (clients may not); nobody may use the server's `tern.`
    // types, and nothing is stored for them.
    let got = gw.api_call(
        "POST",
        "/v1/messages",
        Some(&json!({"from": "bob", "to_user": "alice", "text": "forged",
                     "content_type": "SYSTEM", "custom_type": "tern.group"})),
    );
    assert_error(&got, 400, ErrorCode::InvalidArgument);
    let notice = ok(gw.api_call(
        "POST",
        "/v1/messages",
        Some(
            &json!({"from": "bob", "to_user": "alice", "text": "bob is away",
                     "content_type": "SYSTEM", "custom_type": "away"}),
        ),
    ));
    assert_eq!(num(&notice["sendAck"]["seq"]), 4);
    let d = expect_deliver(&mut alice);
    assert_eq!(
        (d.content_type, text(&d)),
        (ContentType::System as u32, "bob is away")
    );
}

#[test]
fn tokens_kick_and_stats() {
    let gw = Gateway::start(&["--cores", "2"]);
    let secs = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let before = secs();
    let got = ok(gw.api_call(
        "POST",
        "/v1/users/carol/token",
        Some(&json!({"ttl_secs": 600, "device": "tablet"})),
    ));
    let after = secs();
    assert_eq!(got["user"], json!("carol"));
    let token = got["token"].as_str().unwrap().to_string();
    let exp = got["expires_at"].as_u64().unwrap();
    assert!(
        (before + 600..=after + 600).contains(&exp),
        "{exp} vs {before}..={after}"
    );
    // The token logs in, for its device only.
    let (mut carol, ok_hello) = gw.login(Via::Tcp, &token, "tablet");
    assert_eq!(ok_hello.user_id, "carol");
    let mut other = gw.connect(Via::Tcp);
    other.send_body(Body::Hello(tern_tests::hello(&token, "phone")));
    other.expect_error(ErrorCode::TokenInvalid);
    let got = gw.api_call(
        "POST",
        "/v1/users/carol/token",
        Some(&json!({"ttl_secs": 0})),
    );
    assert_error(&got, 400, ErrorCode::InvalidArgument);

    let mut dave1 = login(&gw, "dave", "phone");
    let _dave2 = login(&gw, "dave", "laptop");
    let stats = ok(gw.api_call("GET", "/v1/stats", None));
    assert_eq!(stats["users_online"], json!(2));
    assert_eq!(stats["devices_online"], json!(3));
    assert_eq!(stats["sessions"], json!(3));
    assert_eq!(stats["cores"].as_array().unwrap().len(), 2);
    let per_core: u64 = stats["cores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["devices"].as_u64().unwrap())
        .sum();
    assert_eq!(per_core, 3);

    // Kick carol: her connection gets Kick(ADMIN) and closes.
    let got = ok(gw.api_call(
        "POST",
        "/v1/users/carol/kick",
        Some(&json!({"reason": "maintenance"})),
    ));
    assert_eq!(got["kicked"], json!(1));
    carol.expect_kick(KickReason::Admin);
    let got = ok(gw.api_call("POST", "/v1/users/nobody/kick", None));
    assert_eq!(got["kicked"], json!(0));
    dave1.nothing_pending();
    let stats = ok(gw.api_call("GET", "/v1/stats", None));
    assert_eq!(stats["users_online"], json!(1));
    assert_eq!(stats["devices_online"], json!(2));
}

#[test]
fn group_operations_as_the_admin_and_as_a_user() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice", "phone");
    let mut bob = login(&gw, "bob", "phone");
    // Create as alice (she owns it), with bob.
    let got = ok(gw.api_call(
        "POST",
        "/v1/groups?as=alice",
        Some(&json!({"groupId": "team", "create": {"profile": {"name": "Team"}, "members": ["bob"]}})),
    ));
    assert_eq!(got["groupResponse"]["info"]["owner"], json!("alice"));
    assert_eq!(got["groupResponse"]["info"]["memberCount"], json!(2));
    for c in [&mut alice, &mut bob] {
        let d = expect_deliver(c);
        assert_eq!(d.custom_type, tern_protocol::GROUP_EVENT_TYPE);
    }
    // The admin (not a member) kicks bob: owner rights.
    let got = ok(gw.api_call(
        "POST",
        "/v1/groups",
        Some(&json!({"groupId": "team", "kick": {"userIds": ["bob"]}})),
    ));
    assert_eq!(num(&got["groupResponse"]["eventSeq"]), 2);
    for c in [&mut alice, &mut bob] {
        let d = expect_deliver(c);
        assert_eq!(
            (d.seq, d.custom_type.as_str()),
            (2, tern_protocol::GROUP_EVENT_TYPE)
        );
    }
    // The admin posts to the group; only alice is left to get it.
    let ack = ok(gw.api_call(
        "POST",
        "/v1/messages",
        Some(&json!({"to_group": "team", "text": "notice"})),
    ));
    assert_eq!(num(&ack["sendAck"]["seq"]), 3);
    let d = expect_deliver(&mut alice);
    assert_eq!(
        (d.sender.as_str(), text(&d), d.seq),
        ("administrator", "notice", 3)
    );
    bob.nothing_pending();
    // As a user the rules of the group apply: bob is no longer a member.
    let got = gw.api_call(
        "POST",
        "/v1/messages",
        Some(&json!({"from": "bob", "to_group": "team", "text": "let me in"})),
    );
    assert_error(&got, 403, ErrorCode::NotMember);
    let got = gw.api_call(
        "POST",
        "/v1/groups?as=bob",
        Some(&json!({"groupId": "team", "dissolve": {}})),
    );
    assert_error(&got, 403, ErrorCode::NotMember);
    let got = gw.api_call(
        "POST",
        "/v1/groups",
        Some(&json!({"groupId": "nope", "get": {}})),
    );
    assert_error(&got, 404, ErrorCode::NotFound);
    // The admin's member listing sees alice only.
    let got = ok(gw.api_call(
        "POST",
        "/v1/groups?as=alice",
        Some(&json!({"groupId": "team", "listMembers": {}})),
    ));
    let members: Vec<&str> = got["groupResponse"]["members"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["userId"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["alice"]);
}

#[test]
fn any_client_request_as_a_user() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut bob = login(&gw, "bob", "phone");
    // A friend request from alice, made by the backend.
    let got = ok(gw.api_call(
        "POST",
        "/v1/users/alice/request",
        Some(&json!({"social": {"addFriend": {"userId": "bob", "message": "hi"}}})),
    ));
    assert!(got.get("socialResponse").is_some(), "{got}");
    match bob.pushed() {
        Body::SocialEvent(e) => {
            assert_eq!((e.user_id.as_str(), e.message.as_str()), ("alice", "hi"));
        }
        other => panic!("expected a SocialEvent, got {other:?}"),
    }
    // The protocol's own refusals come back with their codes.
    let got = gw.api_call(
        "POST",
        "/v1/users/alice/request",
        Some(&json!({"history": {"conversationId": "12345", "limit": 10}})),
    );
    assert_error(&got, 403, ErrorCode::Forbidden);
}

#[test]
fn metrics_count_exactly() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut alice = login(&gw, "alice", "phone");
    let mut bob = login(&gw, "bob", "phone");
    let _bob2 = login(&gw, "bob", "laptop");
    for i in 0..5 {
        send_acked(&mut alice, "bob", &format!("m{i}"), "x");
    }
    for _ in 0..5 {
        expect_deliver(&mut bob);
    }
    // One refusal with a known code: a message to a group that does not exist.
    let rid = alice.send_body(Body::Send(tern_protocol::Send {
        client_msg_id: "g".into(),
        target: Some(tern_protocol::Target {
            kind: TargetKind::Group as i32,
            id: "nope".into(),
        }),
        content_type: 1,
        ..Default::default()
    }));
    assert_eq!(alice.expect_error(ErrorCode::NotFound), (rid, false));
    let base = gw.api.clone().unwrap();
    let text = gw.metrics();
    assert_eq!(metric(&text, "tern_logins_total", ""), 3);
    assert_eq!(metric(&text, "tern_messages_in_total", ""), 6);
    // Five messages to bob's two devices.
    assert_eq!(metric(&text, "tern_deliveries_out_total", ""), 10);
    assert_eq!(metric(&text, "tern_send_ack_seconds_count", ""), 5);
    assert_eq!(
        metric(&text, "tern_send_ack_seconds_bucket", "le=\"+Inf\""),
        5
    );
    assert_eq!(metric(&text, "tern_storage_append_seconds_count", ""), 5);
    // Group commits: the five appends were each awaited, so at least five batches; both
    // histograms count the same commits.
    let commits = metric(
        &text,
        "tern_storage_commit_batch_size_bucket",
        "le=\"+Inf\"",
    );
    assert!(commits >= 5, "{text}");
    assert_eq!(
        metric(&text, "tern_storage_commit_seconds_bucket", "le=\"+Inf\""),
        commits
    );
    assert!(text.contains(&format!("tern_storage_commit_batch_size_count {commits}\n")));
    assert_eq!(metric(&text, "tern_errors_total", "code=\"NOT_FOUND\""), 1);
    assert_eq!(metric(&text, "tern_devices_online", ""), 3);
    // Quiet now: nothing waits between the cores, and both directions are reported.
    assert_eq!(metric(&text, "tern_mesh_queue_depth", ""), 0);
    assert!(text.contains("tern_mesh_queue_depth{from=\"0\",to=\"1\"} 0\n"));
    assert!(text.contains("tern_mesh_queue_depth{from=\"1\",to=\"0\"} 0\n"));
    assert_eq!(metric(&text, "tern_users_online", ""), 2);
    // Without credentials: 401 like every endpoint.
    let got = api_request(&format!("{base}/metrics"), "GET", None, None, None);
    assert_eq!(got.0, 401);
}

#[test]
fn https_when_a_certificate_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}tls_cert = {:?}\ntls_key = {:?}\n",
            tern_tests::NO_RATE_LIMITS,
            cert_path,
            key_path
        ),
    )
    .unwrap();
    let gw = Gateway::start(&["--cores", "2", "--config", cfg.to_str().unwrap()]);
    let base = gw.api.clone().unwrap();
    assert!(base.starts_with("https://127.0.0.1:"), "{base}");
    let roots = ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
        ureq::tls::Certificate::from_der(cert.cert.der()).to_owned(),
    ]));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build())
        .build()
        .into();
    let mut resp = agent
        .get(&format!("{base}/v1/stats"))
        .header("Authorization", &format!("Bearer {}", gw.api_secret()))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(v["users_online"], json!(0));
    // Plain HTTP to the HTTPS port gets no API answer.
    let plain = base.replace("https://", "http://");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(5)))
        .build()
        .into();
    assert!(agent.get(&format!("{plain}/v1/stats")).call().is_err());
}

#[test]
fn ban_kicks_refuses_logins_survives_restart_and_lifts() {
    let mut gw = Gateway::start(&["--cores", "2"]);
    let mut eve = login(&gw, "eve", "phone");
    let got = ok(gw.api_call("POST", "/v1/users/eve/ban", None));
    assert_eq!(got["kicked"], json!(1));
    assert_eq!(got["banned_until_ms"], json!(0));
    eve.expect_kick(KickReason::Revoked);
    let token = gw.token("eve");
    let mut again = gw.connect(Via::Tcp);
    again.send_body(Body::Hello(tern_tests::hello(&token, "phone")));
    again.expect_error(ErrorCode::TokenRevoked);
    // Other users are not affected.
    let _frank = login(&gw, "frank", "phone");
    // The ban is stored: still banned after a restart.
    gw.restart();
    let mut again = gw.connect(Via::Tcp);
    again.send_body(Body::Hello(tern_tests::hello(&token, "phone")));
    again.expect_error(ErrorCode::TokenRevoked);
    // Lifted: the same token logs in.
    let got = ok(gw.api_call("DELETE", "/v1/users/eve/ban", None));
    assert_eq!(got["was_banned"], json!(true));
    let (_eve, hello) = gw.login(Via::Tcp, &token, "phone");
    assert_eq!(hello.user_id, "eve");
    let got = ok(gw.api_call("DELETE", "/v1/users/eve/ban", None));
    assert_eq!(got["was_banned"], json!(false));
    // A ban with a duration in the past is impossible; zero is refused.
    let got = gw.api_call(
        "POST",
        "/v1/users/eve/ban",
        Some(&json!({"duration_secs": 0})),
    );
    assert_error(&got, 400, ErrorCode::InvalidArgument);
    let got = ok(gw.api_call(
        "POST",
        "/v1/users/eve/ban",
        Some(&json!({"duration_secs": 3600})),
    ));
    let until = got["banned_until_ms"].as_u64().unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        until > now_ms + 3_590_000 && until <= now_ms + 3_600_000,
        "{until}"
    );
}

#[test]
fn the_admin_transfers_a_group_it_is_not_a_member_of_to_exactly_one_new_owner() {
    let gw = Gateway::start(&["--cores", "2"]);
    ok(gw.api_call(
        "POST",
        "/v1/groups?as=alice",
        Some(&json!({"groupId": "club", "create": {"profile": {"name": "Club"}, "members": ["bob"]}})),
    ));
    // As the system user (not a member): bob becomes the owner, alice a member.
    ok(gw.api_call(
        "POST",
        "/v1/groups",
        Some(&json!({"groupId": "club", "transfer": {"userId": "bob"}})),
    ));
    let got = ok(gw.api_call(
        "POST",
        "/v1/groups?as=bob",
        Some(&json!({"groupId": "club", "listMembers": {}})),
    ));
    let mut members: Vec<(String, String)> = got["groupResponse"]["members"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["userId"].as_str().unwrap().to_owned(),
                m["role"].as_str().unwrap_or("ROLE_MEMBER").to_owned(),
            )
        })
        .collect();
    members.sort();
    assert_eq!(
        members,
        [
            ("alice".to_owned(), "ROLE_MEMBER".to_owned()),
            ("bob".to_owned(), "ROLE_OWNER".to_owned())
        ]
    );
    let got = ok(gw.api_call(
        "POST",
        "/v1/groups",
        Some(&json!({"groupId": "club", "get": {}})),
    ));
    assert_eq!(got["groupResponse"]["info"]["owner"], json!("bob"));
    assert_eq!(got["groupResponse"]["info"]["memberCount"], json!(2));
    // Transferring to the owner is refused.
    assert_error(
        &gw.api_call(
            "POST",
            "/v1/groups",
            Some(&json!({"groupId": "club", "transfer": {"userId": "bob"}})),
        ),
        400,
        ErrorCode::InvalidArgument,
    );
}

#[test]
fn refusals_before_a_handler_are_json_errors_too() {
    let gw = Gateway::start(&["--cores", "2"]);
    // A body over 1 MiB (the answer may come before the whole body is written).
    let big = json!({"to_user": "bob", "text": "x".repeat(1 << 20)});
    let secret = format!("Bearer {}", gw.api_secret());
    let got = post_over_limit(gw.api.as_ref().unwrap(), &secret, &big.to_string());
    assert_error(&got, 413, ErrorCode::PayloadTooLarge);
    // A path parameter and a query that do not parse, an unknown query parameter.
    let got = gw.api_call("GET", "/v1/conversations/abc/messages", None);
    assert_error(&got, 400, ErrorCode::InvalidArgument);
    assert!(!got.1["error"]["message"].as_str().unwrap().is_empty());
    assert_error(
        &gw.api_call("GET", "/v1/conversations/1/messages?limit=many", None),
        400,
        ErrorCode::InvalidArgument,
    );
    assert_error(
        &gw.api_call("GET", "/v1/tags/vip?colour=red", None),
        400,
        ErrorCode::InvalidArgument,
    );
    // A method the path does not take.
    assert_error(
        &gw.api_call("DELETE", "/v1/push", None),
        405,
        ErrorCode::InvalidArgument,
    );
}
