//! TLS over TCP end to end: the same frames inside TLS, against a gateway with two cores (so
//! sessions whose connection landed on another core than their user's are relayed), mixed with
//! plain TCP and QUIC devices.

use tern_protocol::v1::frame::Body;
use tern_protocol::{ErrorCode, SyncRequest};
use tern_tests::{Conn, Gateway, collect_sync, hello, send_acked};

fn login_tls(gw: &Gateway, user: &str, device: &str) -> Conn {
    Conn::connect_tls(gw.tls.expect("TLS address"), &gw.dev_cert())
        .hello_ok(&gw.token(user), device)
        .0
}

#[test]
fn tls_devices_chat_with_tcp_and_quic_devices_and_sync() {
    let gw = Gateway::start(&[
        "--cores",
        "2",
        "--tls",
        "127.0.0.1:0",
        "--quic",
        "127.0.0.1:0",
    ]);
    // Sixteen senders over TLS, each to its own receiver over plain TCP: about half of the TLS
    // sessions are relayed between cores (checked in the log below).
    for i in 0..16 {
        let mut sender = login_tls(&gw, &format!("t{i}"), "phone");
        let (mut receiver, _) = Conn::login(gw.addr, &gw.token(&format!("r{i}")), "phone");
        for n in 1..=5u64 {
            let ack = send_acked(
                &mut sender,
                &format!("r{i}"),
                &format!("m{n}"),
                &format!("{i}/{n}"),
            );
            assert_eq!(ack.seq, n);
        }
        for n in 1..=5u64 {
            match receiver.recv_frame().body {
                Some(Body::Deliver(d)) => {
                    assert_eq!(
                        (d.seq, d.payload.as_ref()),
                        (n, format!("{i}/{n}").as_bytes())
                    );
                    assert_eq!(d.sender, format!("t{i}"));
                }
                other => panic!("expected Deliver, got {other:?}"),
            }
        }
        // A reply reaches the TLS device live.
        send_acked(&mut receiver, &format!("t{i}"), "reply", "ok");
        match sender.recv_frame().body {
            Some(Body::Deliver(d)) => assert_eq!((d.seq, d.payload.as_ref()), (6, &b"ok"[..])),
            other => panic!("expected Deliver, got {other:?}"),
        }
    }
    assert!(gw.log().contains("relay="), "no TLS session was relayed");

    // An offline TLS device catches up by sync; a QUIC device of the same user gets it live.
    let (mut alice, _) = Conn::login(gw.addr, &gw.token("alice"), "phone");
    for n in 1..=30u64 {
        send_acked(&mut alice, "carol", &format!("c{n}"), &format!("c {n}"));
    }
    let mut carol = Conn::connect_tls(gw.tls.unwrap(), &gw.dev_cert());
    let mut h = hello(&gw.token("carol"), "laptop");
    h.sync_on_login = true;
    let rid = carol.send_body(Body::Hello(h));
    assert!(matches!(carol.recv_frame().body, Some(Body::HelloOk(_))));
    let (_, synced, _) = collect_sync(&mut carol, rid);
    let seqs: Vec<u64> = synced.iter().map(|d| d.seq).collect();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
    let (mut carol_quic, _) = Conn::login_quic(
        gw.quic.unwrap(),
        &gw.dev_cert(),
        &gw.token("carol"),
        "phone",
    );
    send_acked(&mut alice, "carol", "c31", "c 31");
    let mut conversation = 0;
    for dev in [&mut carol, &mut carol_quic] {
        match dev.recv_frame().body {
            Some(Body::Deliver(d)) => {
                assert_eq!(d.seq, 31);
                conversation = d.conversation_id;
            }
            other => panic!("expected Deliver, got {other:?}"),
        }
    }
    // Acknowledged up to 31: a sync on the TLS session carries no message.
    carol.send_body(Body::Ack(tern_protocol::Ack {
        conversation_id: conversation,
        seq: 31,
    }));
    let rid = carol.send_body(Body::Sync(SyncRequest {
        since_version: 0,
        page_size: 0,
        ..Default::default()
    }));
    loop {
        let f = carol.recv_frame();
        assert_eq!(f.request_id, rid, "{f:?}");
        match f.body {
            Some(Body::SyncConversations(_)) => {}
            Some(Body::SyncDone(_)) => break,
            other => panic!("nothing should be left to sync, got {other:?}"),
        }
    }
}

#[test]
fn bad_input_over_tls_and_plaintext_on_the_tls_port() {
    let gw = Gateway::start(&["--cores", "2", "--tls", "127.0.0.1:0"]);
    let tls = gw.tls.expect("TLS address");
    // Garbage inside TLS: BAD_FRAME, fatal, closed.
    let mut c = Conn::connect_tls(tls, &gw.dev_cert());
    c.send_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]);
    let (_, fatal) = c.expect_error(ErrorCode::BadFrame);
    assert!(fatal);
    c.expect_closed();
    // A second Hello after login over TLS: ALREADY_AUTHENTICATED, closed.
    let mut c = login_tls(&gw, "dave", "phone");
    c.send_body(Body::Hello(hello(&gw.token("dave"), "phone")));
    c.expect_error(ErrorCode::AlreadyAuthenticated);
    c.expect_closed();
    // A plaintext client on the TLS port: the handshake fails, the server answers with a TLS
    // alert record (content type 21), never a frame, and closes.
    let mut plain = Conn::connect(tls);
    plain.send_body(Body::Hello(hello(&gw.token("erin"), "phone")));
    let mut answer = Vec::new();
    let _ = std::io::Read::read_to_end(&mut plain.stream(), &mut answer);
    assert_eq!(answer.first(), Some(&21u8), "{answer:?}");
    // The gateway still serves TLS clients.
    let mut c = login_tls(&gw, "erin", "phone");
    send_acked(&mut c, "frank", "m1", "still fine");
}

#[test]
fn the_plaintext_listener_can_be_turned_off() {
    let gw = Gateway::start(&[
        "--no-plaintext",
        "--tls",
        "127.0.0.1:0",
        "--quic",
        "127.0.0.1:0",
    ]);
    // Nothing listens on the plaintext address.
    let refused = std::net::TcpStream::connect(gw.addr).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    // TLS and QUIC serve as usual.
    let mut alice = login_tls(&gw, "alice", "phone");
    let (mut bob, _) = gw.login(tern_tests::Via::Quic, &gw.token("bob"), "phone");
    let ack = send_acked(&mut alice, "bob", "m1", "no plaintext here");
    let d = tern_tests::expect_deliver(&mut bob);
    assert_eq!(
        (d.seq, tern_tests::text(&d)),
        (ack.seq, "no plaintext here")
    );
}

#[test]
fn turning_off_plaintext_without_tls_or_quic_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(tern_tests::binary("tern-gateway"))
        .env("TERN_API", "127.0.0.1:0")
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--no-plaintext")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.lines().last(),
        Some(
            "error: invalid value for `plaintext`: false (--no-plaintext) needs a `tls` or `quic` \
             listener (--tls, --quic), or clients could not connect at all"
        ),
        "{stderr}"
    );
}

/// A root CA, an intermediate CA signed by it, and a certificate for `localhost` and
/// `127.0.0.1` signed by the intermediate, written to `dir`: `root.pem` (what clients trust),
/// `chain.pem` (leaf then intermediate), `leaf.pem` (the leaf alone) and `key.pem`.
fn certificate_chain(dir: &std::path::Path) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let ca_params = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p
    };
    let root =
        CertifiedIssuer::self_signed(ca_params("Tern Test Root"), KeyPair::generate().unwrap())
            .unwrap();
    let intermediate = CertifiedIssuer::signed_by(
        ca_params("Tern Test Intermediate"),
        KeyPair::generate().unwrap(),
        &root,
    )
    .unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &intermediate)
        .unwrap();
    std::fs::write(dir.join("root.pem"), root.pem()).unwrap();
    std::fs::write(dir.join("chain.pem"), leaf.pem() + &intermediate.pem()).unwrap();
    std::fs::write(dir.join("leaf.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

/// A gateway serving `cert` (and `key.pem`) from `dir` on TLS and QUIC.
fn gateway_with_certificate(dir: &std::path::Path, cert: &str) -> Gateway {
    let config = dir.join(format!("{cert}.toml"));
    std::fs::write(
        &config,
        format!(
            "{}tls_cert = {:?}\ntls_key = {:?}\n",
            tern_tests::NO_RATE_LIMITS,
            dir.join(cert),
            dir.join("key.pem")
        ),
    )
    .unwrap();
    Gateway::start(&[
        "--config",
        config.to_str().unwrap(),
        "--tls",
        "127.0.0.1:0",
        "--quic",
        "127.0.0.1:0",
    ])
}

#[test]
fn a_certificate_chain_from_a_root_ca_is_served_over_tls_and_quic() {
    let certs = tempfile::tempdir().unwrap();
    certificate_chain(certs.path());
    let root = certs.path().join("root.pem");
    let gw = gateway_with_certificate(certs.path(), "chain.pem");
    assert!(
        !gw.dev_cert().exists(),
        "no development certificate when one is configured"
    );
    // Clients that trust only the root: over TLS and over QUIC.
    let (mut alice, _) =
        Conn::connect_tls(gw.tls.unwrap(), &root).hello_ok(&gw.token("alice"), "phone");
    let (mut bob, _) =
        Conn::connect_quic(gw.quic.unwrap(), &root).hello_ok(&gw.token("bob"), "phone");
    let ack = send_acked(&mut alice, "bob", "m1", "signed by a real chain");
    let d = tern_tests::expect_deliver(&mut bob);
    assert_eq!(
        (d.seq, tern_tests::text(&d)),
        (ack.seq, "signed by a real chain")
    );

    // The SDK, trusting the root, over both.
    sdk_logins_over_tls_and_quic(&gw, &root, |transport, login| {
        let _ = login.unwrap_or_else(|e| panic!("{transport}: {e}"));
    });
}

/// Logs in with the SDK over TLS and over QUIC, trusting `ca`, and hands each outcome to
/// `check` (the client, if any, is closed afterwards).
fn sdk_logins_over_tls_and_quic(
    gw: &Gateway,
    ca: &std::path::Path,
    check: impl Fn(tern_client::Transport, Result<&tern_client::Client, &tern_client::ClientError>),
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (transport, addr) in [
        (tern_client::Transport::Tls, gw.tls.unwrap()),
        (tern_client::Transport::Quic, gw.quic.unwrap()),
    ] {
        let mut config = tern_client::ClientConfig::new(addr, gw.token("carol"), "laptop");
        config.transport = transport;
        config.ca = Some(ca.to_path_buf());
        config.connect_timeout = std::time::Duration::from_secs(5);
        let login = rt.block_on(tern_client::Client::connect(config));
        check(transport, login.as_ref());
        if let Ok(client) = login {
            rt.block_on(client.close());
        }
    }
}

#[test]
fn a_server_that_leaves_out_the_intermediate_is_not_trusted() {
    let certs = tempfile::tempdir().unwrap();
    certificate_chain(certs.path());
    let gw = gateway_with_certificate(certs.path(), "leaf.pem");
    sdk_logins_over_tls_and_quic(
        &gw,
        &certs.path().join("root.pem"),
        |transport, login| match login {
            Err(tern_client::ClientError::Tls { reason, .. }) => {
                assert!(reason.contains("UnknownIssuer"), "{transport}: {reason}")
            }
            other => panic!("{transport}: expected a TLS error, got {other:?}"),
        },
    );
}

/// A development certificate reached by an address it was not made for (127.0.0.2): a client
/// trusting it as a CA refuses the name, a client pinning its SHA-256 (as the gateway logs it)
/// logs in over TLS and QUIC, and a wrong pin is refused.
#[test]
fn a_pinned_certificate_is_trusted_whatever_its_names() {
    let gw = Gateway::start(&["--tls", "127.0.0.2:0", "--quic", "127.0.0.2:0"]);
    let log = gw.log();
    let logged = log
        .lines()
        .find(|l| l.contains("clients may pin it"))
        .and_then(|l| l.split("sha256=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no fingerprint in the log:\n{log}"))
        .to_owned();
    assert_eq!(logged.len(), 64, "{logged}");
    let mut pin = [0u8; 32];
    for (i, b) in pin.iter_mut().enumerate() {
        *b = u8::from_str_radix(&logged[2 * i..2 * i + 2], 16).unwrap();
    }
    let mut wrong = pin;
    wrong[0] ^= 1;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (transport, addr) in [
        (tern_client::Transport::Tls, gw.tls.unwrap()),
        (tern_client::Transport::Quic, gw.quic.unwrap()),
    ] {
        assert_eq!(addr.ip().to_string(), "127.0.0.2");
        let config = |ca: bool, pin: Option<[u8; 32]>| {
            let mut config = tern_client::ClientConfig::new(addr, gw.token("carol"), "laptop");
            config.transport = transport;
            config.ca = ca.then(|| gw.dev_cert());
            config.pin = pin;
            config.connect_timeout = std::time::Duration::from_secs(5);
            config
        };
        match rt.block_on(tern_client::Client::connect(config(true, None))) {
            Err(tern_client::ClientError::Tls { reason, .. }) => {
                assert!(
                    reason.contains("not valid for name"),
                    "{transport}: {reason}"
                );
            }
            other => panic!("{transport}: expected a TLS error, got {other:?}"),
        }
        match rt.block_on(tern_client::Client::connect(config(false, Some(wrong)))) {
            Err(tern_client::ClientError::Tls { reason, .. }) => {
                assert!(reason.contains("not the pinned"), "{transport}: {reason}");
            }
            other => panic!("{transport}: expected a TLS error, got {other:?}"),
        }
        let client = rt
            .block_on(tern_client::Client::connect(config(false, Some(pin))))
            .unwrap_or_else(|e| panic!("{transport}: {e}"));
        assert_eq!(client.login().unwrap().user_id, "carol");
        rt.block_on(client.close());
        assert!(matches!(
            rt.block_on(tern_client::Client::connect(config(true, Some(pin)))),
            Err(tern_client::ClientError::Config(_))
        ));
    }
}
