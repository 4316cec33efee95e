//! Revoking a user's tokens through the admin API: the tokens issued until then stop working
//! (also after a restart), the user's connections are kicked, and new tokens work. A session
//! ends when its token expires, unless it refreshed the token first.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tern_protocol::v1::frame::Body;
use tern_protocol::{ErrorCode, KickReason, Refresh};
use tern_tests::{Conn, Gateway, Via, hello};

fn ok(got: (u16, Value)) -> Value {
    assert_eq!(got.0, 200, "{got:?}");
    got.1
}

fn api_token(gw: &Gateway, user: &str) -> String {
    let got = ok(gw.api_call("POST", &format!("/v1/users/{user}/token"), None));
    got["token"].as_str().unwrap().to_owned()
}

/// A login that must be refused with TOKEN_REVOKED (fatal: the connection closes).
fn refused(gw: &Gateway, token: &str) {
    let mut c: Conn = gw.connect(Via::Tcp);
    let rid = c.send_body(Body::Hello(hello(token, "phone")));
    assert_eq!(c.expect_error(ErrorCode::TokenRevoked), (rid, true));
    c.expect_closed();
}

#[test]
fn revoked_tokens_are_refused_and_their_sessions_kicked_while_new_tokens_work() {
    let mut gw = Gateway::start(&["--cores", "2"]);
    let old = api_token(&gw, "alice");
    let cli_token = gw.token("alice");
    let (mut alice, _) = gw.login(Via::Tcp, &old, "phone");
    let (mut bob, _) = gw.login(Via::Tcp, &gw.token("bob"), "phone");

    let got = ok(gw.api_call("POST", "/v1/users/alice/revoke-tokens", None));
    assert_eq!(got["kicked"], json!(1));
    assert!(got["revoked_until_ms"].as_u64().unwrap() > 0);
    alice.expect_kick(KickReason::Revoked);
    refused(&gw, &old);
    refused(&gw, &cli_token);
    // Others are not affected; a token issued after the revocation works.
    bob.nothing_pending();
    let new = api_token(&gw, "alice");
    let (mut alice, _) = gw.login(Via::Tcp, &new, "phone");
    alice.nothing_pending();
    drop(alice);

    gw.restart();
    refused(&gw, &old);
    gw.login(Via::Tcp, &new, "phone").0.nothing_pending();
    // A bad user id is refused and changes nothing.
    let got = gw.api_call("POST", "/v1/users/%00/revoke-tokens", None);
    assert_eq!(got.0, 400, "{got:?}");
    assert_eq!(got.1["error"]["name"], json!("INVALID_ARGUMENT"));
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn refresh(c: &mut Conn, token: &str) -> u64 {
    c.send_body(Body::Refresh(Refresh {
        token: token.to_owned(),
    }))
}

#[test]
fn a_session_ends_when_its_token_expires_unless_it_refreshed_it() {
    let gw = Gateway::start(&["--cores", "2"]);
    // Every token is minted before the short one, so that the refusals below happen before it
    // expires.
    let refused = [
        (gw.token("bob"), ErrorCode::TokenInvalid),
        (
            gw.token_with("alice", &["--expires-at", "1"]),
            ErrorCode::TokenExpired,
        ),
        ("not.a-token".to_owned(), ErrorCode::TokenInvalid),
        (
            gw.token_with("alice", &["--device", "tablet"]),
            ErrorCode::TokenInvalid,
        ),
    ];
    let long_exp = now_secs() + 3600;
    let long = gw.token_with("alice", &["--expires-at", &long_exp.to_string()]);
    let exp = now_secs() + 3;
    let short = gw.token_with("alice", &["--expires-at", &exp.to_string()]);

    // The phone's session has two paths (dual channel); the laptop logs in with the same token.
    let (mut phone, ok) = gw.login(Via::Tcp, &short, "phone");
    assert_eq!(ok.token_expires_at, exp);
    let mut path = gw.connect(Via::Tcp);
    let mut h = hello(&short, "phone");
    h.resume_session_id = ok.session_id;
    path.send_body(Body::Hello(h));
    match path.recv_frame().body {
        Some(Body::HelloOk(joined)) => {
            assert_eq!(
                (joined.session_id, joined.token_expires_at),
                (ok.session_id, exp)
            );
        }
        other => panic!("expected HelloOk, got {other:?}"),
    }
    let (mut laptop, _) = gw.login(Via::Tcp, &short, "laptop");

    // Refused refreshes leave the session as it was: it still answers.
    for (token, code) in &refused {
        let rid = refresh(&mut phone, token);
        assert_eq!(phone.expect_error(*code), (rid, false), "{token}");
    }
    phone.nothing_pending();
    let rid = refresh(&mut phone, &long);
    match phone.answer(rid) {
        Body::RefreshOk(ok) => assert_eq!(ok.token_expires_at, long_exp),
        other => panic!("expected RefreshOk, got {other:?}"),
    }
    // A path that joins the session afterwards, still with the first token, takes the
    // session's expiry.
    let mut late = gw.connect(Via::Tcp);
    let mut h = hello(&short, "phone");
    h.resume_session_id = ok.session_id;
    late.send_body(Body::Hello(h));
    match late.recv_frame().body {
        Some(Body::HelloOk(joined)) => assert_eq!(joined.token_expires_at, long_exp),
        other => panic!("expected HelloOk, got {other:?}"),
    }

    // The laptop's session, on the same core with the same expiry, is kicked by the sweep that
    // would have kicked both of the phone's paths: they had a Kick queued before this Pong.
    laptop.expect_kick(KickReason::Expired);
    phone.nothing_pending();
    path.nothing_pending();
    late.nothing_pending();
    // The expired token no longer logs in.
    let mut again = gw.connect(Via::Tcp);
    let rid = again.send_body(Body::Hello(hello(&short, "laptop")));
    assert_eq!(again.expect_error(ErrorCode::TokenExpired), (rid, true));
    again.expect_closed();
}
