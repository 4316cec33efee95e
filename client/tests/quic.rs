//! The SDK over QUIC against an in-process quinn server on 127.0.0.1 (one bidirectional stream,
//! ALPN `tern/1`, a self-signed certificate given as the CA file): login, requests and answers,
//! close, reconnect; and the errors for an untrusted certificate, a certificate for another
//! name, a server without ALPN `tern/1`, and an unusable CA file.

mod common;

use common::{QuicServer, TestCert, WAIT};
use tern_client::{Client, ClientError, Event, Incoming, Target, Transport};
use tern_protocol::{Frame, SyncDone, SyncMessages};
use tokio::time::timeout;

async fn next_event(incoming: &mut Incoming) -> Option<Event> {
    timeout(WAIT, incoming.recv()).await.expect("no event")
}

#[tokio::test]
async fn logs_in_sends_and_pings_over_one_quic_stream() {
    let server = QuicServer::start();
    let config = server.config();
    assert_eq!(config.transport, Transport::Quic);
    let (client, peer) = tokio::join!(Client::connect(config), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    assert_eq!(peer.hello.protocol_version, 1);
    assert_eq!(peer.hello.token, "token-bob");
    assert_eq!(peer.hello.device_id, "test-device");
    assert_eq!(client.login().unwrap().user_id, "bob");

    // The handshake used ALPN tern/1 and the IP address as the server name.
    let connection = peer.connection.clone().unwrap();
    let data = connection
        .handshake_data()
        .unwrap()
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .unwrap();
    assert_eq!(data.protocol.as_deref(), Some(&b"tern/1"[..]));
    assert_eq!(data.server_name, None, "no SNI for an IP address");

    let ack = common::send_text_answered(&client, &mut peer, "hi over quic").await;
    assert_eq!((ack.conversation_id, ack.seq), (12, 1));

    common::ping_pong(&client, &mut peer).await;

    // Close finishes the stream (the server reads its end), then closes the connection.
    client.close().await;
    assert!(peer.recv().await.is_none(), "close finishes the stream");
    let closed = timeout(WAIT, connection.closed())
        .await
        .expect("not closed");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.reason == "client closed"),
        "{closed:?}"
    );
    assert!(matches!(
        client.send(Target::user("a"), 1, "x").await,
        Err(ClientError::Closed)
    ));
}

#[tokio::test]
async fn reconnects_over_quic_from_the_sync_position() {
    let server = QuicServer::start();
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    let mut incoming = client.incoming();
    peer.send(Frame::new(
        peer.hello_id,
        SyncMessages {
            conversation_id: 7,
            messages: vec![common::deliver(7, 1)],
        },
    ))
    .await;
    peer.send(Frame::new(peer.hello_id, SyncDone { user_version: 21 }))
        .await;
    assert!(matches!(next_event(&mut incoming).await, Some(Event::Message(m)) if m.seq == 1));
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::SyncDone { user_version: 21 })
    ));

    // The server drops the connection; the client notices and logs in again over QUIC.
    drop(peer);
    match next_event(&mut incoming).await {
        Some(Event::Disconnected {
            reason: ClientError::Io(e),
        }) => assert_eq!(e.kind(), std::io::ErrorKind::NotConnected, "{e}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    let mut peer = server.accept_login(0).await;
    assert_eq!(
        peer.hello.sync_version, 21,
        "resumes from the last SyncDone"
    );
    assert!(peer.hello.sync_on_login);
    assert!(matches!(
        next_event(&mut incoming).await,
        Some(Event::Reconnected)
    ));

    let ack = common::send_answered(&client, &mut peer, "after-reconnect", 2, false).await;
    assert_eq!(ack.seq, 2);
}

/// Connects to `server` trusting only `other` and returns the TLS error's reason.
async fn tls_reason_trusting(
    server: &QuicServer,
    other: &TestCert,
) -> (String, std::path::PathBuf) {
    let mut config = server.config();
    let other_path = other.write_pem(server.dir.path(), "other.pem");
    config.ca = Some(other_path.clone());
    let (result, handshake) = tokio::join!(Client::connect(config), server.handshake());
    assert!(handshake.is_err(), "the server saw the handshake fail");
    match result {
        Err(ClientError::Tls {
            server: name,
            reason,
        }) => {
            assert_eq!(name, server.addr().to_string());
            (reason, other_path)
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_untrusted_certificate_fails_with_a_tls_error() {
    // A certificate from another issuer.
    let server = QuicServer::with_cert_and_alpn(
        &TestCert::with_common_name(&["127.0.0.1"], "gateway"),
        &[b"tern/1"],
    );
    let other = TestCert::with_common_name(&["127.0.0.1"], "someone else");
    let (reason, path) = tls_reason_trusting(&server, &other).await;
    assert_eq!(
        reason,
        format!(
            "invalid peer certificate: UnknownIssuer (trusting only the certificates in {})",
            path.display()
        )
    );

    // Another development certificate (as after the gateway made a new one): same issuer
    // name, another key.
    let server = QuicServer::start();
    let (reason, path) = tls_reason_trusting(&server, &TestCert::new(&["127.0.0.1"])).await;
    assert_eq!(
        reason,
        format!(
            "invalid peer certificate: BadSignature (trusting only the certificates in {})",
            path.display()
        )
    );
}

#[tokio::test]
async fn a_certificate_for_another_name_fails_with_a_tls_error() {
    // Valid for `localhost` only, while the client connects to 127.0.0.1 (an IP server name).
    let server = QuicServer::with_cert_and_alpn(&TestCert::new(&["localhost"]), &[b"tern/1"]);
    let (result, _) = tokio::join!(Client::connect(server.config()), server.handshake());
    match result {
        Err(ClientError::Tls { reason, .. }) => assert_eq!(
            reason,
            format!(
                "invalid peer certificate: certificate not valid for name \"127.0.0.1\"; \
                 certificate is only valid for DnsName(\"localhost\") (trusting only the \
                 certificates in {})",
                server.cert_path.display()
            )
        ),
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_server_without_alpn_tern_1_fails_with_an_alpn_error() {
    let server = QuicServer::with_alpn(&[b"tern/2"]);
    let (result, handshake) = tokio::join!(Client::connect(server.config()), server.handshake());
    match &result {
        Err(ClientError::Alpn {
            server: name,
            reason,
        }) => {
            assert_eq!(*name, server.addr().to_string());
            assert_eq!(
                reason,
                "it refused the handshake with TLS alert NoApplicationProtocol"
            );
        }
        other => panic!("expected an ALPN error, got {other:?}"),
    }
    assert_eq!(
        result.unwrap_err().to_string(),
        format!(
            "{} does not speak the Tern protocol over QUIC (ALPN tern/1): it refused the \
             handshake with TLS alert NoApplicationProtocol",
            server.addr()
        )
    );
    assert!(handshake.is_err());

    // A server that offers no ALPN at all: the client refuses.
    let server = QuicServer::with_alpn(&[]);
    let (result, handshake) = tokio::join!(Client::connect(server.config()), server.handshake());
    match &result {
        Err(ClientError::Alpn { reason, .. }) => assert_eq!(
            reason,
            "it refused the handshake with TLS alert NoApplicationProtocol"
        ),
        other => panic!("expected an ALPN error, got {other:?}"),
    }
    assert!(handshake.is_err());
}

#[tokio::test]
async fn an_unusable_ca_file_fails_connect_and_names_the_file() {
    let server = QuicServer::start();
    let mut config = server.config();
    let missing = server.dir.path().join("missing.pem");
    config.ca = Some(missing.clone());
    match Client::connect(config.clone()).await {
        Err(ClientError::CaFile { path, reason }) => {
            assert_eq!(path, missing);
            assert!(
                reason.starts_with("cannot read it: No such file or directory"),
                "{reason}"
            );
        }
        other => panic!("expected a CA file error, got {other:?}"),
    }

    // A key is PEM too, but not a certificate.
    let key_only = server.dir.path().join("key.pem");
    std::fs::write(
        &key_only,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    config.ca = Some(key_only.clone());
    let err = Client::connect(config).await.unwrap_err();
    assert!(matches!(err, ClientError::CaFile { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "CA file {}: no PEM certificate (BEGIN CERTIFICATE) in the file",
            key_only.display()
        )
    );
}
