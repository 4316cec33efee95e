//! The `tern` binary against the fake server: output lines and exit codes scripts rely on.

mod common;

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use common::{FakeServer, Peer, QuicServer, TestCert, TlsServer, deliver};
use tern_protocol::{
    Body, ConversationState, ErrorCode, Frame, HistoryPage, SendAck, SyncConversations, SyncDone,
    SyncMessages, Target,
};

/// Runs `tern` with `args` against `server` on a blocking thread.
fn tern(server: &FakeServer, args: &[&str]) -> tokio::task::JoinHandle<Output> {
    tern_with_input(server, args, "")
}

/// Runs `tern` with `args` and `input` on stdin.
fn tern_with_input(
    server: &FakeServer,
    args: &[&str],
    input: &str,
) -> tokio::task::JoinHandle<Output> {
    let addr = server.listener.local_addr().unwrap().to_string();
    tern_at(&addr, args, &[], input)
}

/// Runs `tern --server addr` with `args`, the environment variables `env` and `input` on stdin,
/// on a blocking thread.
fn tern_at(
    addr: &str,
    args: &[&str],
    env: &[(&str, &str)],
    input: &str,
) -> tokio::task::JoinHandle<Output> {
    let input = input.to_owned();
    let addr = addr.to_owned();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["--server", &addr])
            .args(&args)
            .env("TERN_TOKEN", "token-alice")
            .env_remove("TERN_SERVER")
            .env_remove("TERN_DEVICE")
            .env_remove("TERN_TRANSPORT")
            .env_remove("TERN_CA")
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Keep stdin open until the input is written; dropping it is the EOF.
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn send_prints_the_send_ack() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["send", "--to", "bob", "hello bob"]);
    let mut peer = server.accept_login(0).await;
    assert_eq!(peer.hello.token, "token-alice");
    assert_eq!(peer.hello.device_id, "cli-send");
    assert!(!peer.hello.sync_on_login);
    let frame = peer.recv_request().await;
    let Some(Body::Send(send)) = frame.body else {
        panic!("expected Send, got {frame:?}");
    };
    assert_eq!(send.target, Some(Target::user("bob")));
    assert_eq!(&send.payload[..], b"hello bob");
    assert_eq!(send.content_type, 1);
    peer.send(Frame::new(
        frame.request_id,
        SendAck {
            client_msg_id: send.client_msg_id,
            conversation_id: 123,
            seq: 1,
            server_time_ms: 1_732_233_600_000,
            duplicate: false,
        },
    ))
    .await;
    let out = run.await.unwrap();
    assert_eq!(
        text(&out.stdout),
        "sent conversation=123 seq=1 time=1732233600000\n"
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
}

#[tokio::test]
async fn send_error_prints_the_code_and_exits_1() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["send", "--group", "g1", "hi"]);
    let mut peer = server.accept_login(0).await;
    let frame = peer.recv_request().await;
    assert!(matches!(&frame.body, Some(Body::Send(s)) if s.target == Some(Target::group("g1"))));
    peer.send(Frame::error(
        frame.request_id,
        ErrorCode::NotMember,
        "not a member of g1",
        false,
    ))
    .await;
    let out = run.await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr),
        "error: NOT_MEMBER (4004): not a member of g1\n"
    );
}

#[tokio::test]
async fn unreachable_server_exits_1() {
    let server = FakeServer::start().await;
    let addr = server.listener.local_addr().unwrap().to_string();
    drop(server);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args([
                "--server", &addr, "--token", "t", "send", "--to", "bob", "x",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("error: "),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn listen_prints_each_message_once_and_stops_at_count() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["listen", "--count", "3", "--timeout", "10"]);
    let mut peer = server.accept_login(0).await;
    assert_eq!(peer.hello.device_id, "cli-listen");
    assert!(peer.hello.sync_on_login);
    let id = peer.hello_id;
    peer.send(Frame::new(
        id,
        SyncConversations {
            conversations: vec![ConversationState {
                conversation_id: 4,
                delivered_seq: 0,
                latest_seq: 2,
                ..Default::default()
            }],
        },
    ))
    .await;
    peer.send(Frame::new(0, deliver(4, 2))).await;
    peer.send(Frame::new(
        id,
        SyncMessages {
            conversation_id: 4,
            messages: vec![deliver(4, 1), deliver(4, 2)],
        },
    ))
    .await;
    peer.send(Frame::new(id, SyncDone { user_version: 3 }))
        .await;
    let mut binary = deliver(4, 3);
    binary.payload = bytes::Bytes::from_static(&[0xff, 0xfe]);
    peer.send(Frame::new(0, binary)).await;
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "conversation=4 seq=2 from=alice time=1002 text=hello 2\n\
         conversation=4 seq=1 from=alice time=1001 text=hello 1\n\
         conversation=4 seq=3 from=alice time=1003 hex=fffe\n"
    );
}

#[tokio::test]
async fn listen_timeout_short_of_count_exits_1() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["listen", "--count", "1", "--timeout", "0.3"]);
    let _peer = server.accept_login(0).await;
    let out = run.await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn history_prints_oldest_first_across_pages() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["history", "--with", "bob", "--limit", "3"]);
    let mut peer = server.accept_login(0).await;
    let frame = peer.recv_request().await;
    let Some(Body::History(request)) = frame.body else {
        panic!("expected HistoryRequest, got {frame:?}");
    };
    assert_eq!(request.target, Some(Target::user("bob")));
    assert_eq!((request.before_seq, request.limit), (0, 3));
    peer.send(Frame::new(
        frame.request_id,
        HistoryPage {
            conversation_id: 4,
            messages: vec![deliver(4, 5), deliver(4, 4)],
            has_more: true,
        },
    ))
    .await;
    let frame = peer.recv_request().await;
    let Some(Body::History(request)) = frame.body else {
        panic!("expected HistoryRequest, got {frame:?}");
    };
    assert_eq!((request.before_seq, request.limit), (4, 1));
    peer.send(Frame::new(
        frame.request_id,
        HistoryPage {
            conversation_id: 4,
            messages: vec![deliver(4, 3)],
            has_more: true,
        },
    ))
    .await;
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let seqs: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| l.split(' ').nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(seqs, ["seq=3", "seq=4", "seq=5"]);
}

#[tokio::test]
async fn chat_sends_each_line_and_prints_incoming_messages() {
    let server = FakeServer::start().await;
    let run = tern_with_input(&server, &["chat", "bob"], "first line\n\nsecond line\n");
    let mut peer = server.accept_login(0).await;
    assert_eq!(peer.hello.device_id, "cli-chat");
    peer.send(Frame::new(0, deliver(4, 1))).await;
    for (seq, expected) in [(2, "first line"), (3, "second line")] {
        let frame = peer.recv_request().await;
        let Some(Body::Send(send)) = frame.body else {
            panic!("expected Send, got {frame:?}");
        };
        assert_eq!(send.target, Some(Target::user("bob")));
        assert_eq!(&send.payload[..], expected.as_bytes());
        peer.send(Frame::new(
            frame.request_id,
            SendAck {
                client_msg_id: send.client_msg_id,
                conversation_id: 4,
                seq,
                server_time_ms: 7,
                duplicate: false,
            },
        ))
        .await;
    }
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("sent conversation=4 seq=2 time=7\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("sent conversation=4 seq=3 time=7\n"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
}

/// `tern send` over QUIC against `server`; answers the Send and returns the output.
async fn send_over_quic(server: &QuicServer, run: tokio::task::JoinHandle<Output>) -> Output {
    answer_send(server.accept_login(0).await, b"hello over quic", run).await
}

/// `tern send` over TLS against `server`; answers the Send and returns the output.
async fn send_over_tls(server: &TlsServer, run: tokio::task::JoinHandle<Output>) -> Output {
    answer_send(server.accept_login(0).await, b"hello over tls", run).await
}

/// Checks the logged-in `peer` is `tern send --to bob` with `payload`, answers its Send, checks
/// `tern` then ends the stream cleanly, and returns its output.
async fn answer_send(
    mut peer: Peer,
    payload: &[u8],
    run: tokio::task::JoinHandle<Output>,
) -> Output {
    assert_eq!(peer.hello.token, "token-alice");
    assert_eq!(peer.hello.device_id, "cli-send");
    let frame = peer.recv_request().await;
    let Some(Body::Send(send)) = frame.body else {
        panic!("expected Send, got {frame:?}");
    };
    assert_eq!(send.target, Some(Target::user("bob")));
    assert_eq!(&send.payload[..], payload);
    peer.send(Frame::new(
        frame.request_id,
        SendAck {
            client_msg_id: send.client_msg_id,
            conversation_id: 123,
            seq: 2,
            server_time_ms: 9,
            duplicate: false,
        },
    ))
    .await;
    assert!(peer.recv().await.is_none(), "tern finishes the stream");
    run.await.unwrap()
}

#[tokio::test]
async fn send_over_quic_with_flags_prints_the_send_ack() {
    let server = QuicServer::start();
    let ca = server.cert_path.to_str().unwrap().to_owned();
    let run = tern_at(
        &server.addr().to_string(),
        &[
            "--transport",
            "quic",
            "--ca",
            &ca,
            "send",
            "--to",
            "bob",
            "hello over quic",
        ],
        &[],
        "",
    );
    let out = send_over_quic(&server, run).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "sent conversation=123 seq=2 time=9\n");
}

#[tokio::test]
async fn send_over_quic_with_environment_variables_prints_the_send_ack() {
    let server = QuicServer::start();
    let ca = server.cert_path.to_str().unwrap().to_owned();
    let run = tern_at(
        &server.addr().to_string(),
        &["send", "--to", "bob", "hello over quic"],
        &[("TERN_TRANSPORT", "quic"), ("TERN_CA", &ca)],
        "",
    );
    let out = send_over_quic(&server, run).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "sent conversation=123 seq=2 time=9\n");
}

#[tokio::test]
async fn quic_with_another_ca_exits_1_naming_the_tls_problem() {
    let server = QuicServer::with_cert_and_alpn(
        &TestCert::with_common_name(&["127.0.0.1"], "gateway"),
        &[b"tern/1"],
    );
    let other = TestCert::with_common_name(&["127.0.0.1"], "someone else")
        .write_pem(server.dir.path(), "other.pem");
    let addr = server.addr().to_string();
    let run = tern_at(
        &addr,
        &["--transport", "quic", "send", "--to", "bob", "x"],
        &[("TERN_CA", other.to_str().unwrap())],
        "",
    );
    assert!(server.handshake().await.is_err());
    expect_unknown_issuer(run.await.unwrap(), &addr, &other);
}

#[tokio::test]
async fn send_over_tls_with_flags_prints_the_send_ack() {
    let server = TlsServer::start().await;
    let ca = server.cert_path.to_str().unwrap().to_owned();
    let run = tern_at(
        &server.addr().to_string(),
        &[
            "--transport",
            "tls",
            "--ca",
            &ca,
            "send",
            "--to",
            "bob",
            "hello over tls",
        ],
        &[],
        "",
    );
    let out = send_over_tls(&server, run).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "sent conversation=123 seq=2 time=9\n");
    assert_eq!(text(&out.stderr), "");
}

#[tokio::test]
async fn send_over_tls_with_environment_variables_prints_the_send_ack() {
    let server = TlsServer::start().await;
    let ca = server.cert_path.to_str().unwrap().to_owned();
    let run = tern_at(
        &server.addr().to_string(),
        &["send", "--to", "bob", "hello over tls"],
        &[("TERN_TRANSPORT", "tls"), ("TERN_CA", &ca)],
        "",
    );
    let out = send_over_tls(&server, run).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "sent conversation=123 seq=2 time=9\n");
}

#[tokio::test]
async fn tls_with_another_ca_exits_1_naming_the_tls_problem() {
    let server = TlsServer::with(
        &TestCert::with_common_name(&["127.0.0.1"], "gateway"),
        &[b"tern/1"],
        &[&rustls::version::TLS13],
    )
    .await;
    let other = TestCert::with_common_name(&["127.0.0.1"], "someone else")
        .write_pem(server.dir.path(), "other.pem");
    let addr = server.addr().to_string();
    let run = tern_at(
        &addr,
        &[
            "--transport",
            "tls",
            "--ca",
            other.to_str().unwrap(),
            "send",
            "--to",
            "bob",
            "x",
        ],
        &[],
        "",
    );
    assert!(server.handshake().await.is_err());
    expect_unknown_issuer(run.await.unwrap(), &addr, &other);
}

#[tokio::test]
async fn help_lists_the_tls_transport() {
    let out = tern_at("127.0.0.1:9", &["--help"], &[], "").await.unwrap();
    assert!(out.status.success());
    let help = text(&out.stdout);
    let lines: Vec<&str> = help.lines().map(str::trim).collect();
    for line in [
        "- tcp:  Plain TCP",
        "- tls:  TLS 1.3 or 1.2 over TCP, ALPN tern/1 offered (see --ca)",
        "- quic: QUIC: TLS 1.3, ALPN tern/1, one stream (see --ca)",
        "- dual: TCP and QUIC at once as one session: each message goes both ways (see --server)",
    ] {
        assert!(lines.contains(&line), "no line {line:?} in:\n{help}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l
                .starts_with("TLS, QUIC and dual only: PEM file with the certificate(s) to trust")),
        "{help}"
    );
}

#[tokio::test]
async fn dual_transport_without_two_addresses_is_refused_with_a_clear_message() {
    // Nothing listens there: the refusal comes before any connection attempt.
    let run = tern_at(
        "127.0.0.1:9",
        &["--transport", "dual", "send", "--to", "bob", "x"],
        &[],
        "",
    );
    let out = run.await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr),
        "error: invalid client config: server: `127.0.0.1:9`: the dual transport needs the TCP \
         and the QUIC address, comma-separated (TCP_ADDR,QUIC_ADDR)\n"
    );

    let run = tern_at(
        "127.0.0.1:9",
        &["--transport", "udp", "send", "--to", "bob", "x"],
        &[],
        "",
    );
    let out = run.await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap rejects unknown transports"
    );
    assert!(
        text(&out.stderr).contains("invalid value 'udp' for '--transport <TRANSPORT>'"),
        "{}",
        text(&out.stderr)
    );
}

/// Asserts that `out` is the CLI failing (exit 1, nothing on stdout) because the certificate of
/// `addr` is not signed by the one trusted, `other`.
fn expect_unknown_issuer(out: Output, addr: &str, other: &std::path::Path) {
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr),
        format!(
            "error: TLS handshake with {addr} failed: invalid peer certificate: UnknownIssuer \
             (trusting only the certificates in {})\n",
            other.display()
        )
    );
}
