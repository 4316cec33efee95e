//! Webhooks end to end: a real gateway calling a local HTTP server that checks the signature of
//! every request, decides before-send hooks, and records after-events.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde_json::{Value, json};
use tern_protocol::{Body, ErrorCode, Target};
use tern_tests::{
    Conn, Gateway, NO_RATE_LIMITS, Via, WAIT, expect_deliver, send, send_acked, text,
};

const SECRET: &str = "webhook-test-secret";

/// One request the server got: its event kind, whether the signature verified, and the body.
#[derive(Debug)]
struct Hook {
    event: String,
    signed: bool,
    body: Value,
}

/// A webhook receiver on 127.0.0.1: before-send rejects payloads containing "bad", replaces
/// "swap" with "swapped", allows the rest; every request is reported on the channel.
fn receiver(secret: &'static str) -> (String, mpsc::Receiver<Hook>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut out = stream;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let (mut len, mut event, mut sig) = (0usize, String::new(), String::new());
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let (k, v) = h.split_once(':').unwrap();
                        match k.to_ascii_lowercase().as_str() {
                            "content-length" => len = v.trim().parse().unwrap(),
                            "x-tern-event" => event = v.trim().to_string(),
                            "x-tern-signature" => sig = v.trim().to_string(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; len];
                    reader.read_exact(&mut body).unwrap();
                    let signed = tern_tests::signature_valid(&sig, &body, secret);
                    let body: Value = serde_json::from_slice(&body).unwrap();
                    let answer = if event == "before_send" && signed {
                        let payload = BASE64
                            .decode(body["data"]["payload_base64"].as_str().unwrap())
                            .unwrap();
                        let text = String::from_utf8(payload).unwrap();
                        if text.contains("bad") {
                            json!({"action": "reject", "reason": "no bad words"})
                        } else if text.contains("swap") {
                            json!({"action": "replace", "payload_base64": BASE64.encode("swapped")})
                        } else {
                            json!({"action": "allow"})
                        }
                    } else if signed {
                        json!({})
                    } else {
                        json!({"action": "reject", "reason": "bad signature"})
                    };
                    let status = if signed { "200 OK" } else { "401 Unauthorized" };
                    let answer = answer.to_string();
                    let _ = tx.send(Hook {
                        event,
                        signed,
                        body,
                    });
                    let _ = write!(
                        out,
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                }
            });
        }
    });
    (url, rx)
}

fn gateway(url: &str, secret: &str, fail_open: bool) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("gw.toml");
    std::fs::write(
        &cfg,
        format!(
            "{NO_RATE_LIMITS}[webhook]\nurl = {url:?}\nsecret = {secret:?}\nbefore_send = true\n\
             fail_open = {fail_open}\nretry_base_ms = 10\nbefore_send_timeout_ms = 10000\n"
        ),
    )
    .unwrap();
    let gw = Gateway::start(&["--cores", "2", "--config", cfg.to_str().unwrap()]);
    (gw, dir)
}

/// The next hook of `kind`, skipping others.
fn next_of(rx: &mpsc::Receiver<Hook>, kind: &str) -> Hook {
    loop {
        let h = rx.recv_timeout(WAIT).expect("a webhook request");
        if h.event == kind {
            return h;
        }
    }
}

fn login(gw: &Gateway, user: &str) -> Conn {
    gw.login(Via::Tcp, &gw.token(user), "phone").0
}

#[test]
fn before_send_decides_and_after_events_are_signed() {
    let (url, rx) = receiver(SECRET);
    let (gw, _dir) = gateway(&url, SECRET, true);
    let mut alice = login(&gw, "alice");
    let h = next_of(&rx, "login");
    assert!(h.signed);
    assert_eq!(h.body["data"]["user"], json!("alice"));
    let mut bob = login(&gw, "bob");

    // Allowed: delivered as sent, then after_send reports it.
    let ack = send_acked(&mut alice, "bob", "m1", "hello");
    assert_eq!(text(&expect_deliver(&mut bob)), "hello");
    let h = next_of(&rx, "before_send");
    assert_eq!(h.body["data"]["from"], json!("alice"));
    assert_eq!(h.body["data"]["to"], json!("bob"));
    let h = next_of(&rx, "after_send");
    assert!(h.signed);
    assert_eq!(h.body["data"]["seq"], json!(ack.seq));
    assert_eq!(h.body["data"]["client_msg_id"], json!("m1"));
    assert_eq!(
        h.body["data"]["conversation_id"],
        json!(ack.conversation_id.to_string())
    );

    // Rejected: the sender gets FORBIDDEN with the app's reason, nothing is stored or delivered.
    let rid = send(&mut alice, "bob", "m2", "a bad word");
    let (got, fatal) = alice.expect_error(ErrorCode::Forbidden);
    assert_eq!((got, fatal), (rid, false));
    // Replaced: bob gets the app's payload; the seq follows the first message directly.
    let ack2 = send_acked(&mut alice, "bob", "m3", "swap me");
    assert_eq!(ack2.seq, ack.seq + 1);
    let d = expect_deliver(&mut bob);
    assert_eq!((d.seq, text(&d)), (ack2.seq, "swapped"));
    bob.nothing_pending();
}

#[test]
fn a_hook_that_fails_follows_fail_closed() {
    // The receiver checks with another secret: every request fails its signature and is
    // answered 401, so before-send fails and fail_open = false rejects.
    let (url, _rx) = receiver("another-secret");
    let (gw, _dir) = gateway(&url, SECRET, false);
    let mut alice = login(&gw, "alice");
    let mut bob = login(&gw, "bob");
    let rid = send(&mut alice, "bob", "m1", "hello");
    assert_eq!(alice.expect_error(ErrorCode::Forbidden), (rid, false));
    bob.nothing_pending();
    // And the failures are counted in /metrics.
    let (status, body) = tern_tests::api_request(
        &format!("{}/metrics", gw.api.clone().unwrap()),
        "GET",
        None,
        Some(&format!("Bearer {}", gw.api_secret())),
        None,
    );
    assert_eq!(status, 200);
    let text = body.as_str().unwrap();
    assert!(
        text.contains("tern_webhook_before_send_total{outcome=\"failed\"} 1\n"),
        "{text}"
    );
}

/// The hooks received so far, taken by kind in arrival order; other kinds wait their turn.
struct Inbox {
    rx: mpsc::Receiver<Hook>,
    held: Vec<Hook>,
}

impl Inbox {
    fn new(rx: mpsc::Receiver<Hook>) -> Inbox {
        Inbox {
            rx,
            held: Vec::new(),
        }
    }

    /// The next hook of `kind`, signed and in its envelope; its data.
    fn next(&mut self, kind: &str) -> Value {
        let hook = match self.held.iter().position(|h| h.event == kind) {
            Some(i) => self.held.remove(i),
            None => loop {
                let h = self.rx.recv_timeout(WAIT).expect("a webhook request");
                if h.event == kind {
                    break h;
                }
                self.held.push(h);
            },
        };
        assert!(hook.signed, "{hook:?}");
        assert_eq!(hook.body["event"], json!(kind), "{hook:?}");
        hook.body["data"].clone()
    }

    /// The next `group_event`'s data; its `server_time_ms` must lie in `from..=to` and is taken
    /// out, so the rest can be compared exactly.
    fn group_event(&mut self, from: u64, to: u64) -> Value {
        let mut data = self.next("group_event");
        let t = data
            .as_object_mut()
            .unwrap()
            .remove("server_time_ms")
            .and_then(|t| t.as_u64())
            .expect("server_time_ms");
        assert!((from..=to).contains(&t), "{t} not in {from}..={to}");
        data
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A group operation through the admin API, as `user` (None: as the system user); the
/// GroupResponse.
fn group_op(gw: &Gateway, user: Option<&str>, body: Value) -> Value {
    let path = match user {
        Some(u) => format!("/v1/groups?as={u}"),
        None => "/v1/groups".to_string(),
    };
    let (status, got) = gw.api_call("POST", &path, Some(&body));
    assert_eq!(status, 200, "{body} -> {got}");
    got["groupResponse"].clone()
}

/// The value of one webhook counter in /metrics.
fn webhook_metric(gw: &Gateway, series: &str) -> u64 {
    let (status, body) = tern_tests::api_request(
        &format!("{}/metrics", gw.api.clone().unwrap()),
        "GET",
        None,
        Some(&format!("Bearer {}", gw.api_secret())),
        None,
    );
    assert_eq!(status, 200);
    let text = body.as_str().unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {series} in {text}"));
    line[series.len() + 1..].parse().unwrap()
}

#[test]
fn every_group_change_sends_one_group_event() {
    let (url, rx) = receiver(SECRET);
    let (gw, _dir) = gateway(&url, SECRET, true);
    let mut inbox = Inbox::new(rx);

    let t0 = wall_ms();
    let created = group_op(
        &gw,
        Some("alice"),
        json!({"groupId": "team", "create": {"profile": {"name": "Team"}, "members": ["bob"]}}),
    );
    let conv = created["conversationId"].as_str().unwrap().to_string();
    assert_eq!(created["eventSeq"], json!("1"));
    assert_eq!(
        inbox.group_event(t0, wall_ms()),
        json!({"group_id": "team", "conversation_id": conv, "event": "created",
               "operator": "alice", "users": ["bob"], "event_seq": 1,
               "profile": {"name": "Team"}})
    );

    // Each step: who acts, the request, then the expected webhook (operator, event, users and
    // the fields of its kind); the event_seq counts up from 2.
    let steps: Vec<(Option<&str>, Value, Value)> = vec![
        (
            Some("alice"),
            json!({"invite": {"userIds": ["carol", "bob"]}}),
            json!({"operator": "alice", "event": "invited", "users": ["carol"]}),
        ),
        (
            Some("dave"),
            json!({"join": {}}),
            json!({"operator": "dave", "event": "joined", "users": ["dave"]}),
        ),
        (
            Some("alice"),
            json!({"setRole": {"userId": "bob", "role": "ROLE_ADMIN"}}),
            json!({"operator": "alice", "event": "role_changed", "users": ["bob"], "role": "admin"}),
        ),
        // muted_until_ms is checked against the member list below.
        (
            Some("bob"),
            json!({"mute": {"userId": "carol", "durationMs": "600000"}}),
            json!({"operator": "bob", "event": "muted", "users": ["carol"]}),
        ),
        (
            Some("bob"),
            json!({"mute": {"userId": "carol", "durationMs": "0"}}),
            json!({"operator": "bob", "event": "unmuted", "users": ["carol"]}),
        ),
        (
            Some("alice"),
            json!({"muteAll": {"muted": true}}),
            json!({"operator": "alice", "event": "muted_all", "users": []}),
        ),
        (
            Some("alice"),
            json!({"muteAll": {"muted": false}}),
            json!({"operator": "alice", "event": "unmuted_all", "users": []}),
        ),
        (
            Some("bob"),
            json!({"update": {"profile": {"notice": "be nice", "joinPolicy": "APPROVAL",
                                          "custom": {"topic": "rust"}}}}),
            json!({"operator": "bob", "event": "profile_changed", "users": [],
                   "profile": {"notice": "be nice", "join_policy": "approval",
                               "custom": {"topic": "rust"}}}),
        ),
        (
            Some("erin"),
            json!({"join": {"message": "let me in"}}),
            json!({"operator": "erin", "event": "join_requested", "users": ["erin"],
                   "message": "let me in"}),
        ),
        (
            Some("bob"),
            json!({"reviewJoin": {"userId": "erin", "approve": true}}),
            json!({"operator": "bob", "event": "join_approved", "users": ["erin"]}),
        ),
        (
            Some("frank"),
            json!({"join": {"message": "me too"}}),
            json!({"operator": "frank", "event": "join_requested", "users": ["frank"],
                   "message": "me too"}),
        ),
        (
            Some("alice"),
            json!({"reviewJoin": {"userId": "frank", "approve": false}}),
            json!({"operator": "alice", "event": "join_declined", "users": ["frank"]}),
        ),
        (
            Some("bob"),
            json!({"kick": {"userIds": ["dave"], "reason": "spam"}}),
            json!({"operator": "bob", "event": "kicked", "users": ["dave"], "reason": "spam"}),
        ),
        (
            Some("carol"),
            json!({"leave": {}}),
            json!({"operator": "carol", "event": "left", "users": ["carol"]}),
        ),
        (
            Some("alice"),
            json!({"transfer": {"userId": "bob"}}),
            json!({"operator": "alice", "event": "owner_changed", "users": ["bob"]}),
        ),
        (
            None,
            json!({"dissolve": {}}),
            json!({"operator": "administrator", "event": "dissolved", "users": []}),
        ),
    ];
    let mut muted_until = None;
    let mut next_seq = 2;
    for (user, op, expected) in steps {
        // A join request and a decline are kept out of the group's log: event_seq 0.
        let logged =
            !["join_requested", "join_declined"].contains(&expected["event"].as_str().unwrap());
        let seq = if logged { next_seq } else { 0 };
        next_seq += u64::from(logged);
        let mut request = op.clone();
        request["groupId"] = json!("team");
        let t0 = wall_ms();
        let got = group_op(&gw, user, request);
        if logged {
            assert_eq!(got["eventSeq"], json!(seq.to_string()), "{op}");
        } else {
            assert_eq!(got["eventSeq"], serde_json::Value::Null, "{op}");
        }
        let mut data = inbox.group_event(t0, wall_ms());
        if expected["event"] == json!("muted") {
            muted_until = data.as_object_mut().unwrap().remove("muted_until_ms");
            // Read back while carol is muted: the member list has the same time.
            let members = group_op(
                &gw,
                Some("alice"),
                json!({"groupId": "team", "listMembers": {}}),
            );
            let carol = members["members"]["members"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["userId"] == json!("carol"))
                .unwrap()
                .clone();
            assert_eq!(
                Some(json!(
                    carol["mutedUntilMs"]
                        .as_str()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap()
                )),
                muted_until
            );
        }
        let mut want = expected.clone();
        want["group_id"] = json!("team");
        want["conversation_id"] = json!(conv);
        want["event_seq"] = json!(seq);
        assert_eq!(data, want, "{op}");
    }
    assert!(muted_until.is_some_and(|t| t.as_u64().unwrap() > t0));

    // Requests that change nothing store no event and send no webhook: after them, the counter
    // of accepted events is exactly one per change above.
    let refused = gw.api_call(
        "POST",
        "/v1/groups?as=alice",
        Some(&json!({"groupId": "team", "leave": {}})),
    );
    assert_eq!(refused.0, 404, "{refused:?}");
    let (status, _) = gw.api_call(
        "POST",
        "/v1/groups?as=bob",
        Some(&json!({"groupId": "other", "create": {}})),
    );
    assert_eq!(status, 200);
    let data = inbox.group_event(t0, wall_ms());
    assert_eq!(
        (&data["group_id"], &data["event"]),
        (&json!("other"), &json!("created"))
    );
    let unchanged = group_op(
        &gw,
        Some("bob"),
        json!({"groupId": "other", "muteAll": {"muted": false}}),
    );
    assert_eq!(unchanged["eventSeq"], Value::Null);
    assert_eq!(
        webhook_metric(&gw, "tern_webhook_events_total{outcome=\"queued\"}"),
        18
    );
    assert!(inbox.held.iter().all(|h| h.event != "group_event"));
}

/// Sends a text message to group `to`; returns the request id.
fn send_to_group(c: &mut Conn, to: &str, id: &str, text: &str) -> u64 {
    c.send_body(Body::Send(tern_protocol::Send {
        client_msg_id: id.into(),
        target: Some(Target::group(to)),
        content_type: 1,
        custom_type: String::new(),
        payload: Bytes::copy_from_slice(text.as_bytes()),
        priority: false,
    }))
}

#[test]
fn group_messages_pass_before_send_and_report_after_send() {
    let (url, rx) = receiver(SECRET);
    let (gw, _dir) = gateway(&url, SECRET, true);
    let mut inbox = Inbox::new(rx);
    let mut alice = login(&gw, "alice");
    let mut bob = login(&gw, "bob");
    let created = group_op(
        &gw,
        Some("alice"),
        json!({"groupId": "team", "create": {"members": ["bob"]}}),
    );
    let conv: u64 = created["conversationId"].as_str().unwrap().parse().unwrap();
    for c in [&mut alice, &mut bob] {
        let d = expect_deliver(c);
        assert_eq!(
            (d.seq, d.custom_type.as_str()),
            (1, tern_protocol::GROUP_EVENT_TYPE)
        );
    }
    inbox.next("group_event");

    // Allowed: the hook sees the group's conversation; after_send reports the stored message.
    let rid = send_to_group(&mut alice, "team", "m1", "hello");
    let ack = tern_tests::expect_ack(&mut alice, rid);
    assert_eq!((ack.conversation_id, ack.seq), (conv, 2));
    let d = expect_deliver(&mut bob);
    assert_eq!((d.seq, text(&d)), (2, "hello"));
    assert_eq!(
        inbox.next("before_send"),
        json!({"from": "alice", "to_kind": "group", "to": "team",
               "conversation_id": conv.to_string(), "client_msg_id": "m1", "content_type": 1,
               "custom_type": "", "payload_base64": BASE64.encode("hello")})
    );
    assert_eq!(
        inbox.next("after_send"),
        json!({"from": "alice", "to_kind": "group", "to": "team",
               "conversation_id": conv.to_string(), "seq": 2, "client_msg_id": "m1",
               "content_type": 1, "custom_type": "", "server_time_ms": ack.server_time_ms})
    );

    // Rejected: FORBIDDEN, nothing stored, nobody gets it.
    let rid = send_to_group(&mut bob, "team", "m2", "a bad word");
    assert_eq!(bob.expect_error(ErrorCode::Forbidden), (rid, false));
    assert_eq!(inbox.next("before_send")["client_msg_id"], json!("m2"));
    // Replaced: every member gets the app's payload, at the next seq.
    let rid = send_to_group(&mut bob, "team", "m3", "swap me");
    let ack = tern_tests::expect_ack(&mut bob, rid);
    assert_eq!(ack.seq, 3);
    let d = expect_deliver(&mut alice);
    assert_eq!((d.seq, text(&d)), (3, "swapped"));
    assert_eq!(inbox.next("before_send")["client_msg_id"], json!("m3"));
    assert_eq!(
        inbox.next("after_send"),
        json!({"from": "bob", "to_kind": "group", "to": "team",
               "conversation_id": conv.to_string(), "seq": 3, "client_msg_id": "m3",
               "content_type": 1, "custom_type": "", "server_time_ms": ack.server_time_ms})
    );
    // A retry of m1 is answered as a duplicate and reported no second time.
    let rid = send_to_group(&mut alice, "team", "m1", "hello");
    let again = tern_tests::expect_ack(&mut alice, rid);
    assert_eq!((again.seq, again.duplicate), (2, true));
    assert_eq!(inbox.next("before_send")["client_msg_id"], json!("m1"));
    // A group that does not exist is refused before the hook is asked.
    let rid = send_to_group(&mut alice, "nope", "m4", "hello");
    assert_eq!(alice.expect_error(ErrorCode::NotFound), (rid, false));
    alice.nothing_pending();
    bob.nothing_pending();

    // Exactly: two logins, the group's creation and two messages; before-send allowed m1 and
    // its retry, rejected m2 and replaced m3.
    let metric = |outcome: &str| {
        webhook_metric(
            &gw,
            &format!("tern_webhook_events_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(metric("queued"), 5);
    let before = |outcome: &str| {
        webhook_metric(
            &gw,
            &format!("tern_webhook_before_send_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(
        (before("allowed"), before("rejected"), before("replaced")),
        (2, 1, 1)
    );
}
