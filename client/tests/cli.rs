//! The `tern` binary against the fake server: output lines and exit codes scripts rely on.

mod common;

use std::{
    io::Write,
    process::{Command, Output, Stdio},
};

use common::{
    FakeServer, LIVE, Peer, QuicServer, TestCert, TlsServer, deliver, next_room_request,
    room_deliver, room_response,
};
use prost::Message;
use tern_protocol::{
    Body, ContentType, ConversationSettings, ConversationState, Deliver, ErrorCode, Frame,
    GROUP_EVENT_TYPE, GroupEvent, GroupEventKind, GroupMember, GroupProfile, GroupRequest,
    GroupResponse, GroupRole, HistoryPage, JoinPolicy, ListKind, MarkRead, MemberPage, Presence,
    RECALL_EVENT_TYPE, ReadReceipt, ReadState, Recall, RecallEvent, RecallOk, SendAck, SocialEvent,
    SocialEventKind, SocialRequest, SocialResponse, SyncConversations, SyncDone, SyncMessages,
    Target, TargetKind, Typing, UserProfile,
    v1::{
        AcceptFriend, AddFriend, Block, CreateGroup, DeclineFriend, DeleteFriend, DissolveGroup,
        GetProfiles, InviteMembers, JoinGroup, KickMembers, LeaveGroup, ListMembers, ListUsers,
        ListedUser, MuteAll, MuteMember, SetProfile, SetRole, TransferOwner, Unblock, UpdateGroup,
        group_request::Op, social_request::Op as SocialOp,
    },
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
            .env_remove("TERN_WAIT")
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

/// A missing `--ca` file is waited for like a refused port (a gateway starting for the first
/// time writes its certificate once its log is open), up to `--wait` seconds, then named.
#[tokio::test]
async fn a_missing_ca_file_is_waited_for_then_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("not-yet.pem");
    let ca = missing.to_str().unwrap();
    let args = |wait| {
        [
            "--transport",
            "tls",
            "--ca",
            ca,
            "--wait",
            wait,
            "send",
            "--to",
            "bob",
            "x",
        ]
    };
    let out = tern_at("127.0.0.1:9", &args("0"), &[], "").await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("not-yet.pem") && !err.contains("# waiting"),
        "{err}"
    );
    let started = std::time::Instant::now();
    let out = tern_at("127.0.0.1:9", &args("1"), &[], "").await.unwrap();
    let waited = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!("# waiting for {ca} (--wait 1s)\n"))
            && err.contains("not-yet.pem"),
        "{err}"
    );
    // Retries after 20, 40, 80, 160 and 320 ms: the next 500 ms would pass the deadline.
    assert!(
        waited >= std::time::Duration::from_millis(620),
        "{waited:?}"
    );
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

/// The next GroupRequest `tern` wrote on `peer` and its request id.
async fn next_group_request(peer: &mut Peer) -> (u64, GroupRequest) {
    let frame = peer.recv_request().await;
    match frame.body {
        Some(Body::Group(request)) => (frame.request_id, request),
        other => panic!("expected GroupRequest, got {other:?}"),
    }
}

/// Runs `tern group ARGS`, checks the one request it makes is `op` on group g1, answers it with
/// event seq `event_seq` and returns the output.
async fn group_command(args: &[&str], op: Op, event_seq: u64) -> Output {
    let server = FakeServer::start().await;
    let args: Vec<&str> = ["group"].iter().chain(args).copied().collect();
    let run = tern(&server, &args);
    let mut peer = server.accept_login(0).await;
    assert_eq!(peer.hello.device_id, "cli-group");
    assert!(!peer.hello.sync_on_login);
    let (id, request) = next_group_request(&mut peer).await;
    assert_eq!(request.group_id, "g1", "{args:?}");
    assert_eq!(request.op, Some(op), "{args:?}");
    peer.send(Frame::new(
        id,
        GroupResponse {
            group_id: "g1".into(),
            conversation_id: 77,
            event_seq,
            info: None,
            members: None,
            ..GroupResponse::default()
        },
    ))
    .await;
    run.await.unwrap()
}

#[tokio::test]
async fn group_create_sends_the_profile_and_members_and_prints_the_change() {
    let out = group_command(
        &[
            "create",
            "g1",
            "--name",
            "Book club",
            "--policy",
            "invite-only",
            "bob",
            "carol",
        ],
        Op::Create(CreateGroup {
            profile: Some(Box::new(GroupProfile {
                name: Some("Book club".into()),
                join_policy: Some(JoinPolicy::InviteOnly.into()),
                ..Default::default()
            })),
            members: vec!["bob".into(), "carol".into()],
        }),
        1,
    )
    .await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "group=g1 conversation=77 event_seq=1\n");
    assert_eq!(text(&out.stderr), "");
}

#[tokio::test]
async fn each_group_command_sends_its_operation_and_prints_the_change() {
    let update = GroupProfile {
        name: Some("Readers".into()),
        notice: Some("Chapter 3 on Friday".into()),
        introduction: None,
        avatar_url: Some("https://example.com/r.png".into()),
        join_policy: Some(JoinPolicy::Approval.into()),
        custom: [
            ("topic".into(), "novels".into()),
            ("old".into(), String::new()),
        ]
        .into_iter()
        .collect(),
    };
    let cases: Vec<(Vec<&str>, Op)> = vec![
        (
            vec!["create", "g1"],
            Op::Create(CreateGroup {
                profile: Some(Box::default()),
                members: vec![],
            }),
        ),
        (vec!["join", "g1"], Op::Join(JoinGroup::default())),
        (vec!["leave", "g1"], Op::Leave(LeaveGroup {})),
        (
            vec!["invite", "g1", "dave", "erin"],
            Op::Invite(InviteMembers {
                user_ids: vec!["dave".into(), "erin".into()],
            }),
        ),
        (
            vec!["kick", "g1", "dave", "--reason", "spam links"],
            Op::Kick(KickMembers {
                user_ids: vec!["dave".into()],
                reason: "spam links".into(),
            }),
        ),
        (
            vec!["role", "g1", "bob", "admin"],
            Op::SetRole(SetRole {
                user_id: "bob".into(),
                role: GroupRole::RoleAdmin.into(),
            }),
        ),
        (
            vec!["role", "g1", "bob", "member"],
            Op::SetRole(SetRole {
                user_id: "bob".into(),
                role: GroupRole::RoleMember.into(),
            }),
        ),
        (
            vec!["mute", "g1", "bob", "10m"],
            Op::Mute(MuteMember {
                user_id: "bob".into(),
                duration_ms: 600_000,
            }),
        ),
        (
            vec!["mute", "g1", "bob", "0"],
            Op::Mute(MuteMember {
                user_id: "bob".into(),
                duration_ms: 0,
            }),
        ),
        (
            vec!["mute-all", "g1", "on"],
            Op::MuteAll(MuteAll { muted: true }),
        ),
        (
            vec!["mute-all", "g1", "off"],
            Op::MuteAll(MuteAll { muted: false }),
        ),
        (
            vec![
                "update",
                "g1",
                "--name",
                "Readers",
                "--notice",
                "Chapter 3 on Friday",
                "--avatar-url",
                "https://example.com/r.png",
                "--policy",
                "approval",
                "--field",
                "topic=novels",
                "--field",
                "old=",
            ],
            Op::Update(UpdateGroup {
                profile: Some(Box::new(update)),
            }),
        ),
        (
            vec!["transfer", "g1", "bob"],
            Op::Transfer(TransferOwner {
                user_id: "bob".into(),
            }),
        ),
        (vec!["dissolve", "g1"], Op::Dissolve(DissolveGroup {})),
    ];
    for (seq, (args, op)) in (1..).zip(cases) {
        let out = group_command(&args, op, seq).await;
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            format!("group=g1 conversation=77 event_seq={seq}\n"),
            "{args:?}"
        );
    }
}

#[tokio::test]
async fn group_members_pages_through_every_member() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["group", "members", "g1", "--limit", "2"]);
    let mut peer = server.accept_login(0).await;
    let member =
        |user: &str, role: GroupRole, muted_until_ms: u64, joined_at_ms: u64| GroupMember {
            user_id: user.into(),
            role: role.into(),
            muted_until_ms,
            joined_at_ms,
        };
    let pages = [
        (
            0,
            vec![
                member("alice", GroupRole::RoleOwner, 0, 1_000),
                member("bob", GroupRole::RoleAdmin, 0, 2_000),
            ],
            17,
        ),
        (
            17,
            vec![member(
                "carol",
                GroupRole::RoleMember,
                1_732_234_200_000,
                3_000,
            )],
            0,
        ),
    ];
    for (token, members, next_page_token) in pages {
        let (id, request) = next_group_request(&mut peer).await;
        assert_eq!(request.group_id, "g1");
        assert_eq!(
            request.op,
            Some(Op::ListMembers(ListMembers {
                page_token: token,
                limit: 2,
            }))
        );
        peer.send(Frame::new(
            id,
            GroupResponse {
                group_id: "g1".into(),
                conversation_id: 77,
                event_seq: 0,
                info: None,
                members: Some(MemberPage {
                    members,
                    next_page_token,
                }),
                ..GroupResponse::default()
            },
        ))
        .await;
    }
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "member=alice role=owner muted_until=0 joined=1000\n\
         member=bob role=admin muted_until=0 joined=2000\n\
         member=carol role=member muted_until=1732234200000 joined=3000\n"
    );
}

#[tokio::test]
async fn group_info_prints_the_info_lines() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["group", "info", "g1"]);
    let mut peer = server.accept_login(0).await;
    let (id, request) = next_group_request(&mut peer).await;
    assert_eq!(request.group_id, "g1");
    assert_eq!(request.op, Some(Op::Get(tern_protocol::v1::GetGroup {})));
    let info = tern_protocol::GroupInfo {
        group_id: "g1".into(),
        conversation_id: 77,
        owner: "alice".into(),
        profile: Some(GroupProfile {
            name: Some("Book club".into()),
            notice: Some("Chapter 3 on Friday".into()),
            join_policy: Some(JoinPolicy::Free.into()),
            ..Default::default()
        }),
        muted_all: true,
        member_count: 3,
        max_members: 500,
        created_at_ms: 1_732_233_600_000,
        latest_seq: 9,
    };
    peer.send(Frame::new(
        id,
        GroupResponse {
            group_id: "g1".into(),
            conversation_id: 77,
            event_seq: 0,
            info: Some(Box::new(info)),
            members: None,
            ..GroupResponse::default()
        },
    ))
    .await;
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "group=g1 conversation=77 owner=alice members=3 max_members=500 muted_all=true \
         policy=free created=1732233600000 latest_seq=9 name=Book club\n\
         notice=Chapter 3 on Friday\n"
    );
}

#[tokio::test]
async fn group_refusal_prints_the_code_and_exits_1() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["group", "join", "g1"]);
    let mut peer = server.accept_login(0).await;
    let (id, request) = next_group_request(&mut peer).await;
    assert_eq!(request.op, Some(Op::Join(JoinGroup::default())));
    peer.send(Frame::error(
        id,
        ErrorCode::Forbidden,
        "g1 is invite-only",
        false,
    ))
    .await;
    let out = run.await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr),
        "error: FORBIDDEN (4001): g1 is invite-only\n"
    );
}

#[tokio::test]
async fn group_usage_errors_exit_2_before_connecting() {
    // Nothing listens there: the refusal comes before any connection attempt.
    for (args, expected) in [
        (
            &["group", "mute", "g1", "bob", "10x"][..],
            "invalid value '10x' for '<DURATION>': `10x` is not a duration",
        ),
        (
            &["group", "update", "g1"][..],
            "the following required arguments were not provided",
        ),
        (
            &["group", "update", "g1", "--field", "topic"][..],
            "invalid value 'topic' for '--field <KEY=VALUE>': `topic` is not KEY=VALUE",
        ),
        (
            &["group", "role", "g1", "bob", "owner"][..],
            "invalid value 'owner'",
        ),
        (
            &["group", "invite", "g1"][..],
            "the following required arguments were not provided",
        ),
    ] {
        let out = tern_at("127.0.0.1:9", args, &[], "").await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
        assert!(
            text(&out.stderr).contains(expected),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[tokio::test]
async fn listen_prints_group_events_readably() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["listen", "--count", "3", "--timeout", "10"]);
    let mut peer = server.accept_login(0).await;
    peer.send(Frame::new(peer.hello_id, SyncDone { user_version: 1 }))
        .await;
    let event_message = |seq: u64, event: GroupEvent| {
        let mut m = deliver(40, seq);
        m.sender = event.actor.clone();
        m.target = Some(Target::group("g1"));
        m.content_type = ContentType::System as u32;
        m.custom_type = GROUP_EVENT_TYPE.into();
        m.payload = bytes::Bytes::from(event.encode_to_vec());
        m
    };
    peer.send(Frame::new(
        0,
        event_message(
            1,
            GroupEvent {
                kind: GroupEventKind::GroupKicked.into(),
                actor: "alice".into(),
                user_ids: vec!["bob".into(), "carol".into()],
                ..Default::default()
            },
        ),
    ))
    .await;
    let mut text_message = deliver(40, 2);
    text_message.target = Some(Target::group("g1"));
    peer.send(Frame::new(0, text_message)).await;
    peer.send(Frame::new(
        0,
        event_message(
            3,
            GroupEvent {
                kind: GroupEventKind::GroupMuted.into(),
                actor: "alice".into(),
                user_ids: vec!["dave".into()],
                muted_until_ms: 1_732_234_200_000,
                ..Default::default()
            },
        ),
    ))
    .await;
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "conversation=40 seq=1 from=alice time=1001 event=kicked users=bob,carol\n\
         conversation=40 seq=2 from=alice time=1002 text=hello 2\n\
         conversation=40 seq=3 from=alice time=1003 event=muted users=dave \
         muted_until=1732234200000\n"
    );
}

#[tokio::test]
async fn room_enters_the_room_and_prints_its_messages_until_count() {
    let server = FakeServer::start().await;
    let run = tern(
        &server,
        &["room", "live", "--count", "2", "--timeout", "10"],
    );
    let mut peer = server.accept_login(0).await;
    assert_eq!(peer.hello.device_id, "cli-room");
    assert!(!peer.hello.sync_on_login, "rooms are never synced");
    let (id, request) = next_room_request(&mut peer).await;
    assert_eq!(request, ("enter", "live".into()));
    peer.send(room_response(id, "live", LIVE)).await;
    // Only the room's messages are printed, each once.
    peer.send(Frame::new(0, deliver(7, 1))).await;
    peer.send(Frame::new(0, room_deliver(1))).await;
    peer.send(Frame::new(0, room_deliver(1))).await;
    let mut gift = room_deliver(2);
    gift.sender = "carol".into();
    gift.payload = bytes::Bytes::from_static(b"a rose\tfor you");
    peer.send(Frame::new(0, gift)).await;
    peer.send(Frame::new(0, room_deliver(3))).await;
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "conversation=4611686018427387981 seq=1 from=alice time=1001 text=hello 1\n\
         conversation=4611686018427387981 seq=2 from=carol time=1002 text=a rose\\tfor you\n"
    );
    assert!(
        text(&out.stderr).contains("# in room=live conversation=4611686018427387981\n"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn room_timeout_short_of_count_exits_1_and_a_refused_room_exits_1() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["room", "live", "--count", "2", "--timeout", "2"]);
    let mut peer = server.accept_login(0).await;
    let (id, _) = next_room_request(&mut peer).await;
    peer.send(room_response(id, "live", LIVE)).await;
    peer.send(Frame::new(0, room_deliver(1))).await;
    let out = run.await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout),
        "conversation=4611686018427387981 seq=1 from=alice time=1001 text=hello 1\n"
    );
    assert!(
        text(&out.stderr).ends_with("error: timed out after 1 of 2 messages\n"),
        "{}",
        text(&out.stderr)
    );

    let run = tern(&server, &["room", "bad room"]);
    let mut peer = server.accept_login(0).await;
    let (id, request) = next_room_request(&mut peer).await;
    assert_eq!(request, ("enter", "bad room".into()));
    peer.send(Frame::error(
        id,
        ErrorCode::InvalidArgument,
        "bad room id",
        false,
    ))
    .await;
    let out = run.await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr),
        "error: INVALID_ARGUMENT (3001): bad room id\n"
    );
}

/// Runs `tern send --room live` with `flags`; checks that the room is entered before the Send,
/// and returns the Send's priority and the output.
async fn send_to_room(flags: &[&str]) -> (bool, Output) {
    let server = FakeServer::start().await;
    let mut args = vec!["send", "--room", "live"];
    args.extend_from_slice(flags);
    args.push("a gift");
    let run = tern(&server, &args);
    let mut peer = server.accept_login(0).await;
    assert_eq!(peer.hello.device_id, "cli-send");
    let (id, request) = next_room_request(&mut peer).await;
    assert_eq!(request, ("enter", "live".into()));
    peer.send(room_response(id, "live", LIVE)).await;
    let frame = peer.recv_request().await;
    let Some(Body::Send(send)) = frame.body else {
        panic!("expected Send, got {frame:?}");
    };
    assert_eq!(send.target, Some(Target::new(TargetKind::Room, "live")));
    assert_eq!(&send.payload[..], b"a gift");
    assert_eq!(send.content_type, ContentType::Text as u32);
    peer.send(Frame::new(
        frame.request_id,
        SendAck {
            client_msg_id: send.client_msg_id,
            conversation_id: LIVE,
            seq: 3,
            server_time_ms: 1_732_233_600_000,
            duplicate: false,
        },
    ))
    .await;
    (send.priority, run.await.unwrap())
}

#[tokio::test]
async fn send_to_a_room_enters_it_then_sends_with_priority_if_asked() {
    for (flags, priority) in [(&["--priority"][..], true), (&[][..], false)] {
        let (sent_priority, out) = send_to_room(flags).await;
        assert_eq!(sent_priority, priority, "{flags:?}");
        assert!(out.status.success(), "stderr: {}", text(&out.stderr));
        assert_eq!(
            text(&out.stdout),
            "sent conversation=4611686018427387981 seq=3 time=1732233600000\n"
        );
    }
}

#[tokio::test]
async fn send_to_a_room_that_refuses_entry_sends_nothing_and_exits_1() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["send", "--room", "live", "--priority", "hi"]);
    let mut peer = server.accept_login(0).await;
    let (id, _) = next_room_request(&mut peer).await;
    peer.send(Frame::error(
        id,
        ErrorCode::LimitExceeded,
        "at most 16 rooms",
        false,
    ))
    .await;
    let out = run.await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr),
        "error: LIMIT_EXCEEDED (3006): at most 16 rooms\n"
    );
    assert!(
        peer.recv().await.is_none(),
        "no Send, the connection is closed"
    );
}

#[tokio::test]
async fn room_usage_errors_exit_2_before_connecting() {
    for (args, expected) in [
        (
            &["send", "--to", "bob", "--priority", "hi"][..],
            "the argument '--to <TO>' cannot be used with '--priority'",
        ),
        (
            &["send", "--group", "g1", "--room", "live", "hi"][..],
            "the argument '--group <GROUP>' cannot be used with '--room <ROOM>'",
        ),
        (
            &["room"][..],
            "the following required arguments were not provided",
        ),
    ] {
        let out = tern_at("127.0.0.1:9", args, &[], "").await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
        assert!(
            text(&out.stderr).contains(expected),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

/// The next frame `tern` wrote on `peer` that is not a Ping or an Ack: its request id and body.
async fn next_request(peer: &mut Peer) -> (u64, Body) {
    let frame = peer.recv_request().await;
    (frame.request_id, frame.body.expect("a body"))
}

/// `Body::Social` with `op`.
fn social(op: SocialOp) -> Body {
    Body::Social(SocialRequest { op: Some(op) })
}

#[tokio::test]
async fn read_marks_the_conversation_read_and_prints_the_position() {
    // By conversation id: one request.
    let server = FakeServer::start().await;
    let run = tern(&server, &["read", "--conversation", "12", "40"]);
    let mut peer = server.accept_login(0).await;
    assert_eq!(peer.hello.device_id, "cli-read");
    assert!(!peer.hello.sync_on_login);
    let (id, body) = next_request(&mut peer).await;
    assert_eq!(
        body,
        Body::MarkRead(MarkRead {
            conversation_id: 12,
            seq: 40
        })
    );
    peer.send(Frame::new(
        id,
        ReadState {
            conversation_id: 12,
            read_seq: 38,
        },
    ))
    .await;
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "read conversation=12 read_seq=38\n");

    // By user: the conversation is looked up first.
    let run = tern(&server, &["read", "--to", "bob", "7"]);
    let mut peer = server.accept_login(0).await;
    let (id, body) = next_request(&mut peer).await;
    let Body::History(request) = body else {
        panic!("expected HistoryRequest, got {body:?}");
    };
    assert_eq!(request.target, Some(Target::user("bob")));
    assert_eq!((request.before_seq, request.limit), (0, 1));
    peer.send(Frame::new(
        id,
        HistoryPage {
            conversation_id: 21,
            messages: vec![deliver(21, 9)],
            has_more: true,
        },
    ))
    .await;
    let (id, body) = next_request(&mut peer).await;
    assert_eq!(
        body,
        Body::MarkRead(MarkRead {
            conversation_id: 21,
            seq: 7
        })
    );
    peer.send(Frame::new(
        id,
        ReadState {
            conversation_id: 21,
            read_seq: 7,
        },
    ))
    .await;
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "read conversation=21 read_seq=7\n");

    // A refusal.
    let run = tern(&server, &["read", "--conversation", "99", "1"]);
    let mut peer = server.accept_login(0).await;
    let (id, _) = next_request(&mut peer).await;
    peer.send(Frame::error(id, ErrorCode::Forbidden, "not yours", false))
        .await;
    let out = run.await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(text(&out.stderr), "error: FORBIDDEN (4001): not yours\n");
}

#[tokio::test]
async fn recall_prints_the_recall_and_its_tombstone_seq() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["recall", "--conversation", "12", "4"]);
    let mut peer = server.accept_login(0).await;
    assert_eq!(peer.hello.device_id, "cli-recall");
    let (id, body) = next_request(&mut peer).await;
    assert_eq!(
        body,
        Body::Recall(Recall {
            conversation_id: 12,
            seq: 4
        })
    );
    peer.send(Frame::new(
        id,
        RecallOk {
            conversation_id: 12,
            seq: 4,
            event_seq: 41,
        },
    ))
    .await;
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "recalled conversation=12 seq=4 event_seq=41\n"
    );

    let run = tern(&server, &["recall", "--conversation", "12", "3"]);
    let mut peer = server.accept_login(0).await;
    let (id, _) = next_request(&mut peer).await;
    peer.send(Frame::error(
        id,
        ErrorCode::Conflict,
        "recalled already",
        false,
    ))
    .await;
    let out = run.await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        text(&out.stderr),
        "error: CONFLICT (3004): recalled already\n"
    );
}

#[tokio::test]
async fn friend_list_pages_through_every_user() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["friend", "list", "requests", "--limit", "2"]);
    let mut peer = server.accept_login(0).await;
    assert_eq!(peer.hello.device_id, "cli-friend");
    let user = |user: &str, message: &str| ListedUser {
        user_id: user.into(),
        message: message.into(),
    };
    let pages = [
        (
            0,
            vec![user("carol", "hi, it's carol"), user("dave", "")],
            5,
        ),
        (5, vec![user("erin", "two\nlines")], 0),
    ];
    for (token, users, next_page_token) in pages {
        let (id, body) = next_request(&mut peer).await;
        assert_eq!(
            body,
            social(SocialOp::List(ListUsers {
                kind: ListKind::ListRequestsReceived.into(),
                page_token: token,
                limit: 2,
            }))
        );
        peer.send(Frame::new(
            id,
            SocialResponse {
                users,
                next_page_token,
                ..Default::default()
            },
        ))
        .await;
    }
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "user=carol message=hi, it's carol\n\
         user=dave message=\n\
         user=erin message=two\\nlines\n"
    );

    // Friends by default, the server's page size.
    let run = tern(&server, &["friend", "list"]);
    let mut peer = server.accept_login(0).await;
    let (id, body) = next_request(&mut peer).await;
    assert_eq!(
        body,
        social(SocialOp::List(ListUsers {
            kind: ListKind::ListFriends.into(),
            page_token: 0,
            limit: 0,
        }))
    );
    peer.send(Frame::new(id, SocialResponse::default())).await;
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn each_friend_command_sends_its_operation_and_prints_it() {
    let cases: [(&[&str], SocialOp, bool, &str); 6] = [
        (
            &["add", "alice", "--message", "hi there"],
            SocialOp::AddFriend(AddFriend {
                user_id: "alice".into(),
                message: "hi there".into(),
            }),
            true,
            "friend add user=alice friends=true\n",
        ),
        (
            &["accept", "carol"],
            SocialOp::AcceptFriend(AcceptFriend {
                user_id: "carol".into(),
            }),
            false,
            "friend accept user=carol\n",
        ),
        (
            &["decline", "dave"],
            SocialOp::DeclineFriend(DeclineFriend {
                user_id: "dave".into(),
            }),
            false,
            "friend decline user=dave\n",
        ),
        (
            &["delete", "erin"],
            SocialOp::DeleteFriend(DeleteFriend {
                user_id: "erin".into(),
            }),
            false,
            "friend delete user=erin\n",
        ),
        (
            &["block", "eve"],
            SocialOp::Block(Block {
                user_id: "eve".into(),
            }),
            false,
            "friend block user=eve\n",
        ),
        (
            &["unblock", "eve"],
            SocialOp::Unblock(Unblock {
                user_id: "eve".into(),
            }),
            false,
            "friend unblock user=eve\n",
        ),
    ];
    let server = FakeServer::start().await;
    for (args, op, friends, expected) in cases {
        let args: Vec<&str> = ["friend"].iter().chain(args).copied().collect();
        let run = tern(&server, &args);
        let mut peer = server.accept_login(0).await;
        let (id, body) = next_request(&mut peer).await;
        assert_eq!(body, social(op), "{args:?}");
        peer.send(Frame::new(
            id,
            SocialResponse {
                friends,
                ..Default::default()
            },
        ))
        .await;
        let out = run.await.unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), expected, "{args:?}");
    }

    let run = tern(&server, &["friend", "add", "mallory"]);
    let mut peer = server.accept_login(0).await;
    let (id, _) = next_request(&mut peer).await;
    peer.send(Frame::error(id, ErrorCode::Blocked, "blocked", false))
        .await;
    let out = run.await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(text(&out.stderr), "error: BLOCKED (4002): blocked\n");
}

#[tokio::test]
async fn profile_set_replaces_the_profile_and_get_prints_each() {
    let server = FakeServer::start().await;
    let run = tern(
        &server,
        &[
            "profile",
            "set",
            "--nickname",
            "Alice B.",
            "--field",
            "city=Lyon",
            "--field",
            "about=books",
        ],
    );
    let mut peer = server.accept_login(0).await;
    assert_eq!(peer.hello.device_id, "cli-profile");
    let (id, body) = next_request(&mut peer).await;
    let expected = UserProfile {
        user_id: String::new(),
        nickname: "Alice B.".into(),
        avatar_url: String::new(),
        custom: [("city", "Lyon"), ("about", "books")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    };
    assert_eq!(
        body,
        social(SocialOp::SetProfile(SetProfile {
            profile: Some(expected)
        }))
    );
    peer.send(Frame::new(id, SocialResponse::default())).await;
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "profile set\n");

    let run = tern(&server, &["profile", "get", "alice", "nobody", "bob"]);
    let mut peer = server.accept_login(0).await;
    let (id, body) = next_request(&mut peer).await;
    assert_eq!(
        body,
        social(SocialOp::GetProfiles(GetProfiles {
            user_ids: vec!["alice".into(), "nobody".into(), "bob".into()],
        }))
    );
    peer.send(Frame::new(
        id,
        SocialResponse {
            profiles: vec![
                UserProfile {
                    user_id: "alice".into(),
                    nickname: "Alice B.".into(),
                    avatar_url: "https://example.com/a.png".into(),
                    custom: [("city".to_owned(), "Lyon".to_owned())].into(),
                },
                UserProfile {
                    user_id: "bob".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        },
    ))
    .await;
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "user=alice avatar_url=https://example.com/a.png nickname=Alice B.\n\
         user=alice field=city=Lyon\n\
         user=bob avatar_url= nickname=\n"
    );
}

#[tokio::test]
async fn listen_prints_pushed_events_and_recalls_readably() {
    let server = FakeServer::start().await;
    let run = tern(&server, &["listen", "--count", "3", "--timeout", "10"]);
    let mut peer = server.accept_login(0).await;
    peer.send(Frame::new(peer.hello_id, SyncDone { user_version: 1 }))
        .await;
    let recalled = Deliver {
        recalled: true,
        payload: bytes::Bytes::new(),
        ..deliver(12, 4)
    };
    let tombstone = Deliver {
        content_type: ContentType::System as u32,
        custom_type: RECALL_EVENT_TYPE.into(),
        payload: bytes::Bytes::from(
            RecallEvent {
                seq: 4,
                actor: "alice".into(),
            }
            .encode_to_vec(),
        ),
        ..deliver(12, 5)
    };
    let pushed: Vec<Body> = vec![
        ReadState {
            conversation_id: 12,
            read_seq: 3,
        }
        .into(),
        recalled.into(),
        ReadReceipt {
            conversation_id: 12,
            reader: "alice".into(),
            read_seq: 4,
        }
        .into(),
        Typing {
            target: Some(Target::user("alice")),
            typing: true,
            from: "alice".into(),
        }
        .into(),
        Presence {
            user_id: "alice".into(),
            online: true,
            devices: 1,
        }
        .into(),
        ConversationSettings {
            conversation_id: 12,
            pinned: true,
            hidden: false,
            muted: true,
            cleared_seq: 0,
        }
        .into(),
        SocialEvent {
            kind: SocialEventKind::FriendRequest.into(),
            user_id: "carol".into(),
            message: "hi, it's carol".into(),
            group_id: String::new(),
        }
        .into(),
        tombstone.into(),
        Typing {
            target: Some(Target::group("g1")),
            typing: false,
            from: "dave".into(),
        }
        .into(),
        deliver(12, 6).into(),
    ];
    for body in pushed {
        peer.send(Frame::new(0, body)).await;
    }
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "read conversation=12 read_seq=3\n\
         conversation=12 seq=4 from=alice time=1004 recalled=true\n\
         read conversation=12 reader=alice read_seq=4\n\
         typing from=alice target=user:alice typing=true\n\
         presence user=alice online=true devices=1\n\
         settings conversation=12 pinned=true hidden=false muted=true cleared_seq=0\n\
         friend event=request user=carol message=hi, it's carol\n\
         conversation=12 seq=5 from=alice time=1005 event=recall recalled_seq=4\n\
         typing from=dave target=group:g1 typing=false\n\
         conversation=12 seq=6 from=alice time=1006 text=hello 6\n"
    );
}

#[tokio::test]
async fn room_prints_only_the_rooms_messages_not_other_events() {
    let server = FakeServer::start().await;
    let run = tern(
        &server,
        &["room", "live", "--count", "1", "--timeout", "10"],
    );
    let mut peer = server.accept_login(0).await;
    let (id, _) = next_room_request(&mut peer).await;
    peer.send(room_response(id, "live", LIVE)).await;
    peer.send(Frame::new(
        0,
        Presence {
            user_id: "alice".into(),
            online: true,
            devices: 1,
        },
    ))
    .await;
    peer.send(Frame::new(0, room_deliver(1))).await;
    let out = run.await.unwrap();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "conversation=4611686018427387981 seq=1 from=alice time=1001 text=hello 1\n"
    );
}

#[tokio::test]
async fn read_recall_friend_and_profile_usage_errors_exit_2_before_connecting() {
    for (args, expected) in [
        (
            &["read", "5"][..],
            "the following required arguments were not provided",
        ),
        (
            &["read", "--to", "bob", "--conversation", "3", "5"][..],
            "the argument '--to <TO>' cannot be used with '--conversation <CONVERSATION>'",
        ),
        (
            &["recall", "4"][..],
            "the following required arguments were not provided",
        ),
        (
            &["friend", "list", "enemies"][..],
            "invalid value 'enemies'",
        ),
        (
            &["friend", "block"][..],
            "the following required arguments were not provided",
        ),
        (
            &["profile", "get"][..],
            "the following required arguments were not provided",
        ),
        (
            &["profile", "set", "--field", "city"][..],
            "is not KEY=VALUE",
        ),
    ] {
        let out = tern_at("127.0.0.1:9", args, &[], "").await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty());
        assert!(
            text(&out.stderr).contains(expected),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}
