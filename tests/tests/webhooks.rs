//! Webhooks end to end: a real gateway calling a local HTTP server that checks the signature of
//! every request, decides before-send hooks, and records after-events.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use tern_protocol::ErrorCode;
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

fn verify(header: &str, body: &[u8], secret: &str) -> bool {
    let Some((t, v1)) = header
        .strip_prefix("t=")
        .and_then(|rest| rest.split_once(",v1="))
    else {
        return false;
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex == v1
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
                    let signed = verify(&sig, &body, secret);
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
             fail_open = {fail_open}\nretry_base_ms = 10\n"
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
