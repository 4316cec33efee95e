//! A tiny in-process server that speaks the Tern protocol over a real TCP socket, over TLS on a
//! real TCP socket, or over one bidirectional stream of a real QUIC connection on 127.0.0.1, for
//! testing the SDK and the CLI without a gateway.

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tern_client::{
    BackoffConfig, Client, ClientConfig, ContentType, Target, TargetKind, Transport,
};
use tern_protocol::{
    Body, Codec, Deliver, Frame, Hello, HelloOk, Ping, Pong, Presence, RoomRequest, RoomResponse,
    SendAck,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

/// An upper bound only (nothing waits for it to pass): generous for a loaded machine.
pub const WAIT: Duration = Duration::from_secs(20);

/// Test settings shared by both fake servers: quick reconnects, bounded requests.
fn test_config(server: impl ToString) -> ClientConfig {
    let mut config = ClientConfig::new(server, "token-bob", "test-device");
    config.backoff = BackoffConfig {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(50),
    };
    config.request_timeout = WAIT;
    config
}

pub struct FakeServer {
    pub listener: TcpListener,
}

impl FakeServer {
    pub async fn start() -> Self {
        Self {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    pub fn config(&self) -> ClientConfig {
        test_config(self.listener.local_addr().unwrap())
    }

    /// Accepts a connection and reads its Hello.
    pub async fn accept(&self) -> Peer {
        let (stream, _) = timeout(WAIT, self.listener.accept())
            .await
            .expect("no connection")
            .unwrap();
        let (reader, writer) = stream.into_split();
        Peer::login(Box::new(reader), Box::new(writer), None).await
    }

    /// Accepts and answers HelloOk.
    pub async fn accept_login(&self, heartbeat_ms: u32) -> Peer {
        let mut peer = self.accept().await;
        peer.hello_ok(heartbeat_ms).await;
        peer
    }
}

/// A self-signed certificate for `names` and its key; `pem` is the certificate alone.
pub struct TestCert {
    pub der: CertificateDer<'static>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub pem: String,
}

impl TestCert {
    /// Like the gateway's development certificate: rcgen's default subject, so any two of them
    /// have the same issuer name (and differ in key).
    pub fn new(names: &[&str]) -> Self {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let generated = rcgen::generate_simple_self_signed(names).unwrap();
        Self {
            der: generated.cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der()),
            pem: generated.cert.pem(),
        }
    }

    /// With its own subject (and so issuer) common name.
    pub fn with_common_name(names: &[&str], common_name: &str) -> Self {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            der: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            pem: cert.pem(),
        }
    }

    /// Writes the certificate as PEM to `dir/name` and returns the path.
    pub fn write_pem(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).unwrap();
        path
    }
}

/// A QUIC server on 127.0.0.1 with a fresh self-signed certificate (for `localhost`,
/// `127.0.0.1`, `::1`, like the gateway's development certificate) whose PEM is `cert_path`.
pub struct QuicServer {
    pub endpoint: quinn::Endpoint,
    pub cert_path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl QuicServer {
    /// Offers ALPN `tern/1`, as the gateway does.
    pub fn start() -> Self {
        Self::with_alpn(&[b"tern/1"])
    }

    pub fn with_alpn(alpn: &[&[u8]]) -> Self {
        Self::with_cert_and_alpn(&TestCert::new(&["localhost", "127.0.0.1", "::1"]), alpn)
    }

    pub fn with_cert_and_alpn(cert: &TestCert, alpn: &[&[u8]]) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der.clone()],
                PrivateKeyDer::Pkcs8(cert.key.clone_key()),
            )
            .unwrap();
        tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).unwrap();
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert_path = cert.write_pem(dir.path(), "cert.pem");
        Self {
            endpoint,
            cert_path,
            dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap()
    }

    /// A QUIC client config for this server that trusts its certificate.
    pub fn config(&self) -> ClientConfig {
        let mut config = test_config(self.addr());
        config.transport = Transport::Quic;
        config.ca = Some(self.cert_path.clone());
        config
    }

    /// Completes the handshake of the next incoming connection (the server drives a handshake
    /// only once the connection is accepted).
    pub async fn handshake(&self) -> Result<quinn::Connection, quinn::ConnectionError> {
        let incoming = timeout(WAIT, self.endpoint.accept())
            .await
            .expect("no connection")
            .expect("endpoint closed");
        timeout(WAIT, incoming).await.expect("handshake hangs")
    }

    /// Accepts a connection and its one bidirectional stream, and reads the Hello on it.
    pub async fn accept(&self) -> Peer {
        let connection = self.handshake().await.expect("handshake failed");
        let (send, recv) = timeout(WAIT, connection.accept_bi())
            .await
            .expect("no stream")
            .unwrap();
        Peer::login(Box::new(recv), Box::new(send), Some(connection)).await
    }

    /// Accepts and answers HelloOk.
    pub async fn accept_login(&self, heartbeat_ms: u32) -> Peer {
        let mut peer = self.accept().await;
        peer.hello_ok(heartbeat_ms).await;
        peer
    }
}

/// A TLS-over-TCP server on 127.0.0.1 (tokio-rustls) with a fresh self-signed certificate for
/// `localhost`, `127.0.0.1`, `::1` whose PEM is `cert_path`. Like the gateway, it closes a
/// connection without close_notify (dropping a [`Peer`] just closes the socket).
pub struct TlsServer {
    pub listener: TcpListener,
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub cert_path: PathBuf,
    pub dir: tempfile::TempDir,
}

/// What a TLS server saw of the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsHandshake {
    pub version: Option<rustls::ProtocolVersion>,
    pub alpn: Option<Vec<u8>>,
    pub sni: Option<String>,
}

pub type TlsServerStream = tokio_rustls::server::TlsStream<TcpStream>;

impl TlsServer {
    /// TLS 1.3 and 1.2, ALPN `tern/1` (the client's offer is selected).
    pub async fn start() -> Self {
        Self::with(
            &TestCert::new(&["localhost", "127.0.0.1", "::1"]),
            &[b"tern/1"],
            &[&rustls::version::TLS13, &rustls::version::TLS12],
        )
        .await
    }

    pub async fn with(
        cert: &TestCert,
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der.clone()],
                PrivateKeyDer::Pkcs8(cert.key.clone_key()),
            )
            .unwrap();
        tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let dir = tempfile::tempdir().unwrap();
        let cert_path = cert.write_pem(dir.path(), "cert.pem");
        Self {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            cert_path,
            dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap()
    }

    /// A TLS client config for this server that trusts its certificate.
    pub fn config(&self) -> ClientConfig {
        let mut config = test_config(self.addr());
        config.transport = Transport::Tls;
        config.ca = Some(self.cert_path.clone());
        config
    }

    /// Accepts the next TCP connection and runs the server side of the TLS handshake.
    pub async fn handshake(&self) -> std::io::Result<TlsServerStream> {
        let (tcp, _) = timeout(WAIT, self.listener.accept())
            .await
            .expect("no connection")
            .unwrap();
        timeout(WAIT, self.acceptor.accept(tcp))
            .await
            .expect("handshake hangs")
    }

    /// Accepts a connection, completes the handshake, and reads the Hello.
    pub async fn accept(&self) -> Peer {
        let stream = self.handshake().await.expect("handshake failed");
        let session = stream.get_ref().1;
        let handshake = TlsHandshake {
            version: session.protocol_version(),
            alpn: session.alpn_protocol().map(<[u8]>::to_vec),
            sni: session.server_name().map(str::to_owned),
        };
        let (reader, writer) = tokio::io::split(stream);
        let mut peer = Peer::login(Box::new(reader), Box::new(writer), None).await;
        peer.tls = Some(handshake);
        peer
    }

    /// Accepts and answers HelloOk.
    pub async fn accept_login(&self, heartbeat_ms: u32) -> Peer {
        let mut peer = self.accept().await;
        peer.hello_ok(heartbeat_ms).await;
        peer
    }
}

/// The server's side of one client connection. Dropping it closes the connection.
pub struct Peer {
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
    pub writer: Box<dyn AsyncWrite + Send + Unpin>,
    /// QUIC: the connection the stream belongs to.
    pub connection: Option<quinn::Connection>,
    /// TLS: what the handshake agreed on.
    pub tls: Option<TlsHandshake>,
    pub rbuf: BytesMut,
    pub codec: Codec,
    pub hello: Hello,
    pub hello_id: u64,
}

impl Peer {
    /// Reads the Hello that opens the session.
    async fn login(
        reader: Box<dyn AsyncRead + Send + Unpin>,
        writer: Box<dyn AsyncWrite + Send + Unpin>,
        connection: Option<quinn::Connection>,
    ) -> Self {
        let mut peer = Peer {
            reader,
            writer,
            connection,
            tls: None,
            rbuf: BytesMut::new(),
            codec: Codec::default(),
            hello: Hello::default(),
            hello_id: 0,
        };
        let frame = peer.recv().await.expect("no Hello");
        peer.hello_id = frame.request_id;
        match frame.body {
            Some(Body::Hello(hello)) => peer.hello = hello,
            other => panic!("expected Hello, got {other:?}"),
        }
        peer
    }

    /// The next frame from the client; `None` at end of stream.
    pub async fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.rbuf).unwrap() {
                return Some(frame);
            }
            let n = timeout(WAIT, self.reader.read_buf(&mut self.rbuf))
                .await
                .expect("client sent nothing")
                .unwrap();
            if n == 0 {
                return None;
            }
        }
    }

    /// The next frame that is not a Ping or an Ack.
    pub async fn recv_request(&mut self) -> Frame {
        loop {
            let frame = self.recv().await.expect("connection closed");
            if !matches!(frame.body, Some(Body::Ping(_) | Body::Ack(_))) {
                return frame;
            }
        }
    }

    pub async fn send(&mut self, frame: Frame) {
        let mut buf = BytesMut::new();
        self.codec.encode(&frame, &mut buf).unwrap();
        self.writer.write_all(&buf).await.unwrap();
        // TLS may hold records back until flushed; a no-op for TCP and QUIC.
        self.writer.flush().await.unwrap();
    }

    pub async fn hello_ok(&mut self, heartbeat_ms: u32) {
        let ok = HelloOk {
            user_id: "bob".into(),
            device_id: self.hello.device_id.clone(),
            session_id: 99,
            server_time_ms: 1,
            user_version: 0,
            max_frame_bytes: 1 << 20,
            max_payload_bytes: 1 << 16,
            heartbeat_interval_ms: heartbeat_ms,
            token_expires_at: u64::MAX,
        };
        self.send(Frame::new(self.hello_id, ok)).await;
    }
}

pub fn deliver(conversation_id: u64, seq: u64) -> Deliver {
    Deliver {
        conversation_id,
        seq,
        sender: "alice".into(),
        target: Some(Target::user("alice")),
        server_time_ms: 1000 + seq,
        client_msg_id: format!("m{seq}"),
        content_type: ContentType::Text as u32,
        custom_type: String::new(),
        payload: Bytes::from(format!("hello {seq}")),
        recalled: false,
    }
}

/// A SendAck answering request `request_id` for client message `id` (conversation 7, server
/// time 1).
pub fn send_ack(request_id: u64, id: &str, seq: u64, duplicate: bool) -> Frame {
    Frame::new(
        request_id,
        SendAck {
            client_msg_id: id.into(),
            conversation_id: 7,
            seq,
            server_time_ms: 1,
            duplicate,
        },
    )
}

/// Sends message `id` to alice through `client`, checks that `peer` receives that Send, answers
/// it with seq `seq` (`duplicate` as given) and returns the SendAck the client got.
pub async fn send_answered(
    client: &Client,
    peer: &mut Peer,
    id: &'static str,
    seq: u64,
    duplicate: bool,
) -> SendAck {
    let sending = tokio::spawn({
        let client = client.clone();
        async move { client.send_with_id(id, Target::user("alice"), 1, "x").await }
    });
    answer_send(peer, id, seq, duplicate).await;
    sending.await.unwrap().unwrap()
}

/// Checks that the next request on `peer` is a Send with client message id `id`, and answers it
/// with a SendAck of `seq` (`duplicate` as given).
pub async fn answer_send(peer: &mut Peer, id: &str, seq: u64, duplicate: bool) {
    let frame = peer.recv_request().await;
    assert!(
        matches!(&frame.body, Some(Body::Send(s)) if s.client_msg_id == id),
        "{frame:?}"
    );
    peer.send(send_ack(frame.request_id, id, seq, duplicate))
        .await;
}

/// Pings through `client`, checks that the next frame on `peer` is the Ping, answers it with a
/// Pong and checks that the ping succeeded.
pub async fn ping_pong(client: &Client, peer: &mut Peer) {
    let pinging = tokio::spawn({
        let client = client.clone();
        async move { client.ping().await }
    });
    let frame = peer.recv().await.unwrap();
    answer_ping(peer, &frame)
        .await
        .unwrap_or_else(|| panic!("expected Ping, got {frame:?}"));
    assert!(pinging.await.unwrap().is_ok());
}

/// If `frame` is a Ping, answers it with its Pong and returns the Ping; otherwise sends nothing.
pub async fn answer_ping(peer: &mut Peer, frame: &Frame) -> Option<Ping> {
    let Some(Body::Ping(ping)) = &frame.body else {
        return None;
    };
    peer.send(Frame::new(
        frame.request_id,
        Pong {
            client_time_ms: ping.client_time_ms,
            server_time_ms: 1,
        },
    ))
    .await;
    Some(*ping)
}

/// A Presence push: `user` online (one device) or offline.
pub fn presence(user: &str, online: bool) -> Frame {
    Frame::new(
        0,
        Presence {
            user_id: user.into(),
            online,
            devices: u32::from(online),
        },
    )
}

/// Sends `text` to alice through `client`, checks the Send that reaches `peer` (target and
/// payload), answers it (conversation 12, seq 1) and returns the SendAck the client got, whose
/// client message id is checked to be the Send's.
pub async fn send_text_answered(client: &Client, peer: &mut Peer, text: &'static str) -> SendAck {
    let sending = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .send(Target::user("alice"), ContentType::Text as u32, text)
                .await
        }
    });
    let frame = peer.recv_request().await;
    let Some(Body::Send(send)) = frame.body else {
        panic!("expected Send, got {frame:?}");
    };
    assert_eq!(send.target, Some(Target::user("alice")));
    assert_eq!(send.payload, Bytes::from_static(text.as_bytes()));
    peer.send(Frame::new(
        frame.request_id,
        SendAck {
            client_msg_id: send.client_msg_id.clone(),
            conversation_id: 12,
            seq: 1,
            server_time_ms: 5,
            duplicate: false,
        },
    ))
    .await;
    let ack = sending.await.unwrap().unwrap();
    assert_eq!(ack.client_msg_id, send.client_msg_id);
    ack
}

/// The conversation id of room "live" in these tests (bit 62 set).
pub const LIVE: u64 = (1 << 62) | 77;

/// Message `seq` of room "live", from alice.
pub fn room_deliver(seq: u64) -> Deliver {
    let mut m = deliver(LIVE, seq);
    m.target = Some(Target::new(TargetKind::Room, "live"));
    m
}

/// A RoomResponse answering request `request_id` for `room` (conversation `conversation_id`).
pub fn room_response(request_id: u64, room: &str, conversation_id: u64) -> Frame {
    Frame::new(
        request_id,
        RoomResponse {
            room_id: room.into(),
            conversation_id,
            recent: Vec::new(),
        },
    )
}

/// What a RoomRequest asks: `("enter" | "leave", room)`.
pub fn room_op(request: &RoomRequest) -> (&'static str, String) {
    use tern_protocol::v1::room_request::Op;
    let op = match request.op {
        Some(Op::Enter(_)) => "enter",
        Some(Op::Leave(_)) => "leave",
        None => "none",
    };
    (op, request.room_id.clone())
}

/// The next RoomRequest the client wrote on `peer` (syncs, pings and acks skipped): its request
/// id and what it asks (see [`room_op`]).
pub async fn next_room_request(peer: &mut Peer) -> (u64, (&'static str, String)) {
    loop {
        let frame = peer.recv_request().await;
        match frame.body {
            Some(Body::Room(request)) => return (frame.request_id, room_op(&request)),
            Some(Body::Sync(_)) => {}
            other => panic!("expected RoomRequest, got {other:?}"),
        }
    }
}
