//! Revoking a user's tokens through the admin API: the tokens issued until then stop working
//! (also after a restart), the user's connections are kicked, and new tokens work.

use serde_json::{Value, json};
use tern_protocol::v1::frame::Body;
use tern_protocol::{ErrorCode, KickReason};
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
