//! The SDK over TLS on TCP against an in-process tokio-rustls server on 127.0.0.1 (a self-signed
//! certificate given as the CA file): login, requests and answers, close with close_notify,
//! reconnect, TLS 1.2 and a server that selects no ALPN protocol; and the errors for an
//! untrusted certificate, a certificate for another name, a server that refuses ALPN `tern/1`,
//! a server that does not speak TLS, and an unusable CA file.

mod common;

use bytes::BytesMut;
use common::{TestCert, TlsHandshake, TlsServer, WAIT};
use tern_client::{Client, ClientError, Event, Incoming, Target, Transport};
use tern_protocol::{Ack, Body, Codec, Frame, SyncDone, SyncMessages};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

async fn next_event(incoming: &mut Incoming) -> Option<Event> {
    timeout(WAIT, incoming.recv()).await.expect("no event")
}

#[tokio::test]
async fn logs_in_sends_and_pings_over_tls() {
    let server = TlsServer::start().await;
    let config = server.config();
    assert_eq!(config.transport, Transport::Tls);
    assert_eq!(config.transport.to_string(), "tls");
    let (client, peer) = tokio::join!(Client::connect(config), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    assert_eq!(peer.hello.protocol_version, 1);
    assert_eq!(peer.hello.token, "token-bob");
    assert_eq!(peer.hello.device_id, "test-device");
    assert_eq!(client.login().unwrap().user_id, "bob");

    // TLS 1.3, ALPN tern/1 offered and selected, no SNI for an IP address.
    assert_eq!(
        peer.tls,
        Some(TlsHandshake {
            version: Some(rustls::ProtocolVersion::TLSv1_3),
            alpn: Some(b"tern/1".to_vec()),
            sni: None,
        })
    );

    let ack = common::send_text_answered(&client, &mut peer, "hi over tls").await;
    assert_eq!((ack.conversation_id, ack.seq), (12, 1));
    common::ping_pong(&client, &mut peer).await;

    // Close sends close_notify: the server reads a clean end of stream (an end without it
    // would be an UnexpectedEof error, which `recv` does not accept).
    client.close().await;
    assert!(peer.recv().await.is_none(), "close ends the TLS stream");
    assert!(matches!(
        client.send(Target::user("a"), 1, "x").await,
        Err(ClientError::Closed)
    ));
}

#[tokio::test]
async fn tls_1_2_and_a_server_that_selects_no_alpn_protocol_are_accepted() {
    let server = TlsServer::with(
        &TestCert::new(&["127.0.0.1"]),
        &[],
        &[&rustls::version::TLS12],
    )
    .await;
    let (client, peer) = tokio::join!(Client::connect(server.config()), server.accept_login(0));
    let (client, mut peer) = (client.unwrap(), peer);
    assert_eq!(
        peer.tls,
        Some(TlsHandshake {
            version: Some(rustls::ProtocolVersion::TLSv1_2),
            alpn: None,
            sni: None,
        })
    );
    let ack = common::send_text_answered(&client, &mut peer, "hi over tls 1.2").await;
    assert_eq!((ack.conversation_id, ack.seq), (12, 1));
    common::ping_pong(&client, &mut peer).await;
    client.close().await;
    assert!(peer.recv().await.is_none(), "close ends the TLS stream");
}

#[tokio::test]
async fn reconnects_over_tls_from_the_sync_position() {
    let server = TlsServer::start().await;
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

    // Read everything the client sent (its ack), so closing the socket sends FIN, not RST.
    let frame = peer.recv().await.expect("closed");
    assert!(
        matches!(
            frame.body,
            Some(Body::Ack(Ack {
                conversation_id: 7,
                seq: 1
            }))
        ),
        "expected the Ack, got {frame:?}"
    );
    // The server closes the socket without close_notify, as the gateway does: the client sees
    // the end of the connection (not a TLS error) and logs in again over TLS.
    drop(peer);
    match next_event(&mut incoming).await {
        Some(Event::Disconnected {
            reason: ClientError::Disconnected,
        }) => {}
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

/// Connects to `server` and returns the TLS error's reason and the server's handshake error.
async fn tls_failure(
    server: &TlsServer,
    config: tern_client::ClientConfig,
) -> (String, rustls::Error) {
    let (result, handshake) = tokio::join!(Client::connect(config), server.handshake());
    let server_error = handshake
        .expect_err("the server saw the handshake fail")
        .into_inner()
        .expect("a rustls error")
        .downcast::<rustls::Error>()
        .map(|e| *e)
        .expect("a rustls error");
    match result {
        Err(ClientError::Tls {
            server: name,
            reason,
        }) => {
            assert_eq!(name, server.addr().to_string());
            (reason, server_error)
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_untrusted_certificate_fails_with_a_tls_error() {
    let versions: &[&rustls::SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    // A certificate from another issuer.
    let server = TlsServer::with(
        &TestCert::with_common_name(&["127.0.0.1"], "gateway"),
        &[b"tern/1"],
        versions,
    )
    .await;
    let mut config = server.config();
    let other = TestCert::with_common_name(&["127.0.0.1"], "someone else")
        .write_pem(server.dir.path(), "other.pem");
    config.ca = Some(other.clone());
    let (reason, server_error) = tls_failure(&server, config).await;
    assert_eq!(
        reason,
        format!(
            "invalid peer certificate: UnknownIssuer (trusting only the certificates in {})",
            other.display()
        )
    );
    assert_eq!(
        server_error,
        rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
        "the client told the server why"
    );

    // Another development certificate (as after the gateway made a new one): same issuer
    // name, another key.
    let server = TlsServer::start().await;
    let mut config = server.config();
    let other = TestCert::new(&["127.0.0.1"]).write_pem(server.dir.path(), "other.pem");
    config.ca = Some(other.clone());
    let (reason, _) = tls_failure(&server, config).await;
    assert_eq!(
        reason,
        format!(
            "invalid peer certificate: BadSignature (trusting only the certificates in {})",
            other.display()
        )
    );
}

#[tokio::test]
async fn a_certificate_for_another_name_fails_with_a_tls_error() {
    // Valid for `localhost` only, while the client connects to 127.0.0.1 (an IP server name).
    let server = TlsServer::with(
        &TestCert::new(&["localhost"]),
        &[b"tern/1"],
        &[&rustls::version::TLS13],
    )
    .await;
    let (reason, _) = tls_failure(&server, server.config()).await;
    assert_eq!(
        reason,
        format!(
            "invalid peer certificate: certificate not valid for name \"127.0.0.1\"; \
             certificate is only valid for DnsName(\"localhost\") (trusting only the \
             certificates in {})",
            server.cert_path.display()
        )
    );
}

#[tokio::test]
async fn a_server_that_refuses_alpn_tern_1_fails_with_a_tls_error() {
    let server = TlsServer::with(
        &TestCert::new(&["127.0.0.1"]),
        &[b"tern/2"],
        &[&rustls::version::TLS13],
    )
    .await;
    let (result, handshake) = tokio::join!(Client::connect(server.config()), server.handshake());
    let err = result.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "TLS handshake with {} failed: the server sent TLS alert NoApplicationProtocol: it \
             speaks none of the offered ALPN protocols (tern/1)",
            server.addr()
        )
    );
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
    assert!(!err.is_permanent());
    assert!(handshake.is_err());
}

/// Reads one whole TLS record (the ClientHello) from `stream`.
async fn read_client_hello(stream: &mut TcpStream) {
    let mut header = [0u8; 5];
    timeout(WAIT, stream.read_exact(&mut header))
        .await
        .expect("no ClientHello")
        .unwrap();
    assert_eq!(header[0], 22, "a handshake record");
    let mut body = vec![0u8; usize::from(u16::from_be_bytes([header[3], header[4]]))];
    stream.read_exact(&mut body).await.unwrap();
}

/// Waits until the client closes `stream`, ignoring what it sends (an alert).
async fn until_closed(mut stream: TcpStream) {
    let mut sink = Vec::new();
    let _ = timeout(WAIT, stream.read_to_end(&mut sink))
        .await
        .expect("the client keeps the connection open");
}

#[tokio::test]
async fn a_server_that_does_not_speak_tls_fails_with_a_tls_error() {
    // A plain Tern TCP listener answers with a length-prefixed frame.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = tern_client::ClientConfig::new(addr, "token-bob", "test-device");
    config.transport = Transport::Tls;
    let plain = async {
        let (mut stream, _) = listener.accept().await.unwrap();
        read_client_hello(&mut stream).await;
        let mut frame = BytesMut::new();
        Codec::default()
            .encode(&Frame::new(0, SyncDone { user_version: 1 }), &mut frame)
            .unwrap();
        stream.write_all(&frame).await.unwrap();
        until_closed(stream).await;
    };
    let (result, ()) = tokio::join!(Client::connect(config.clone()), plain);
    match result {
        Err(ClientError::Tls { server, reason }) => {
            assert_eq!(server, addr.to_string());
            assert_eq!(
                reason,
                "received corrupt message of type InvalidContentType; the server does not \
                 speak TLS (a plain TCP port?)"
            );
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }

    // A server that closes its side during the handshake.
    let closing = async {
        let (mut stream, _) = listener.accept().await.unwrap();
        read_client_hello(&mut stream).await;
        stream.shutdown().await.unwrap();
        until_closed(stream).await;
    };
    let (result, ()) = tokio::join!(Client::connect(config), closing);
    assert_eq!(
        result.unwrap_err().to_string(),
        format!(
            "TLS handshake with {addr} failed: the server closed the connection during the \
             handshake (not a TLS port, or it turned the connection away)"
        )
    );
}

#[tokio::test]
async fn an_unusable_ca_file_fails_connect_and_names_the_file() {
    let server = TlsServer::start().await;
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
    assert!(err.is_permanent());
    assert_eq!(
        err.to_string(),
        format!(
            "CA file {}: no PEM certificate (BEGIN CERTIFICATE) in the file",
            key_only.display()
        )
    );

    // The CA file is read before any connection is made.
    let accepted = timeout(
        std::time::Duration::from_millis(0),
        server.listener.accept(),
    )
    .await;
    assert!(accepted.is_err(), "no connection was attempted");
}
