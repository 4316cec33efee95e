//! A tiny in-process server that speaks the Tern protocol over a real TCP socket, for testing
//! the SDK and the CLI without a gateway.

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tern_client::{BackoffConfig, ClientConfig, ContentType, Target};
use tern_protocol::{Body, Codec, Deliver, Frame, Hello, HelloOk};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

pub const WAIT: Duration = Duration::from_secs(5);

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
        let mut config = ClientConfig::new(
            self.listener.local_addr().unwrap(),
            "token-bob",
            "test-device",
        );
        config.backoff = BackoffConfig {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
        };
        config.request_timeout = WAIT;
        config
    }

    /// Accepts a connection and reads its Hello.
    pub async fn accept(&self) -> Peer {
        let (stream, _) = timeout(WAIT, self.listener.accept())
            .await
            .expect("no connection")
            .unwrap();
        let mut peer = Peer {
            stream,
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

    /// Accepts and answers HelloOk.
    pub async fn accept_login(&self, heartbeat_ms: u32) -> Peer {
        let mut peer = self.accept().await;
        peer.hello_ok(heartbeat_ms).await;
        peer
    }
}

pub struct Peer {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
    pub codec: Codec,
    pub hello: Hello,
    pub hello_id: u64,
}

impl Peer {
    /// The next frame from the client; `None` at end of stream.
    pub async fn recv(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.rbuf).unwrap() {
                return Some(frame);
            }
            let n = timeout(WAIT, self.stream.read_buf(&mut self.rbuf))
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
        self.stream.write_all(&buf).await.unwrap();
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
    }
}
