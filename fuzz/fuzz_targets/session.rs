//! The session state machine under arbitrary sequences of client frames.
//!
//! A real gateway (two glommio cores, the same code as `tern-gateway`) runs in this process on
//! an in-memory store ([`MemStore`]) and listens on 127.0.0.1. Each input is decoded into a
//! sequence of operations by three users with two devices each: logins (good, expired, forged
//! or mangled tokens, wrong protocol versions), 1:1 and group sends (client message ids reused
//! on purpose), syncs, history, acks, read positions, recalls, group and social operations,
//! arbitrary protobuf frames, bytes that break the framing, and connections that send garbage
//! before logging in. Every request is answered before the next operation starts: a Ping sent
//! behind it is the barrier, and requests that have an answer are awaited.
//!
//! Checked, for every input:
//! * the gateway never panics (a panic on any thread aborts the process) and answers every
//!   request within [`WAIT`];
//! * idempotency: a `client_msg_id` acknowledged once is acknowledged again only as a
//!   duplicate, with the original conversation and seq;
//! * at the end, a fresh device of each user syncs from zero: every conversation's messages
//!   come in ascending, contiguous seqs up to its `latest_seq` (from 1, or right after the
//!   user's cleared seq, in 1:1 conversations), each exactly once;
//! * every acknowledged 1:1 message is in the sync of both users (unless the user cleared the
//!   conversation), every acknowledged group message in its sender's, and every copy of a
//!   message (live deliveries, every user's sync) is the message that was acknowledged: same
//!   sender, client id, type and payload, or recalled (empty) where a recall was asked.
//!
//! Users are fresh for every input (their names carry the input's number), so inputs do not
//! see each other's state. The gateway is replaced by a new one on a new store every 500
//! inputs, to bound memory, and the stopped one must have released its store.
#![no_main]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tern_gateway::token::{Claims, Secret};
use tern_protocol::v1::frame::Body;
use tern_protocol::v1::{self, group_request, social_request};
use tern_protocol::{
    Codec, ContentType, Deliver, ErrorCode, Frame, GROUP_EVENT_TYPE, PROTOCOL_VERSION, Target,
    TargetKind,
};
use tern_storage::{MemStore, MessageStore};

/// How long any answer may take.
const WAIT: Duration = Duration::from_secs(10);
/// Inputs served by one gateway before it is replaced (its store only grows).
const INPUTS_PER_GATEWAY: u64 = 500;
const USERS: usize = 3;
const DEVICES: usize = 2;
const GROUPS: usize = 2;
const MAX_OPS: usize = 40;
const MAX_BYTES: usize = 96;
const API_SECRET: &str = "session-fuzz-api-secret-0123456789";

// ---------------------------------------------------------------------------------------------
// The gateway under test.

struct Running {
    addr: SocketAddr,
    api: SocketAddr,
    /// Nothing may hold the store once the gateway has stopped.
    store: std::sync::Weak<dyn MessageStore>,
    secret: Secret,
    shutdown: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    served: u64,
    generation: u64,
    _dir: tempfile::TempDir,
}

impl Running {
    fn start(generation: u64) -> Running {
        let dir = tempfile::tempdir().expect("a temp dir for the gateway's secret");
        let cfg = tern_gateway::Config {
            tcp: "127.0.0.1:0".parse().unwrap(),
            api: Some("127.0.0.1:0".parse().unwrap()),
            api_secret: Some(API_SECRET.into()),
            cores: 2,
            data_dir: dir.path().to_path_buf(),
            secret: Some("session-fuzz-secret-0123456789abcdef".into()),
            group_max_members: 8,
            // Both ways, by turns: the first gateway (the only one of a short run) with the
            // default, where a member who left and joined again reads from the return.
            new_members_see_history: !generation.is_multiple_of(2),
            recall_window_ms: 60_000,
            // Any room of two connections on a core takes the batched path.
            room_batch_viewers: 2,
            room_batch_ms: 1,
            // Connections park between the operations of an input and come back for them.
            park_after_ms: 20,
            ..Default::default()
        };
        let secret = Secret::new(cfg.secret.clone().unwrap().into_bytes());
        let store: Arc<dyn MessageStore> = Arc::new(MemStore::new(
            tern_gateway::server::store_options(&cfg).dedup_window,
        ));
        let store_ref = Arc::downgrade(&store);
        let shutdown = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let result = tern_gateway::run_with_store(cfg, store, stop, false, move |ready| {
                let api = ready.api.expect("the API listens");
                let api = api
                    .strip_prefix("http://")
                    .expect("a plain HTTP API")
                    .parse();
                let _ = tx.send((ready.tcp.expect("a plaintext listener"), api.unwrap()));
            });
            if let Err(e) = result {
                panic!("the gateway stopped with an error: {e}");
            }
        });
        let (addr, api) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the gateway listens within 30 s");
        Running {
            addr,
            api,
            store: store_ref,
            secret,
            shutdown,
            thread: Some(thread),
            served: 0,
            generation,
            _dir: dir,
        }
    }

    fn stop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("the gateway thread ends cleanly");
        }
        assert_eq!(
            self.store.strong_count(),
            0,
            "the stopped gateway still holds its store"
        );
    }
}

static GATEWAY: Mutex<Option<Running>> = Mutex::new(None);

/// What the current input did, printed when a check fails.
static TRACE: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn trace(line: String) {
    let mut t = TRACE.lock().unwrap_or_else(|e| e.into_inner());
    if t.len() < 2_000 {
        t.push(line);
    }
}

/// The gateway's last log lines (its `info` level, or `TERN_FUZZ_LOG`), printed with the trace.
static LOG: Mutex<std::collections::VecDeque<String>> =
    Mutex::new(std::collections::VecDeque::new());

struct LogRing;

impl Write for LogRing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut log = LOG.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() >= 400 {
            log.pop_front();
        }
        log.push_back(String::from_utf8_lossy(buf).trim_end().to_string());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Prints the trace before the panic is reported (and the process aborted).
fn install_trace_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("TERN_FUZZ_LOG").unwrap_or_else(|_| "info".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_ansi(false)
            .with_writer(|| LogRing)
            .try_init();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(log) = LOG.try_lock() {
                eprintln!("---- the gateway's last log lines ----");
                for line in log.iter() {
                    eprintln!("{line}");
                }
            }
            if let Ok(t) = TRACE.try_lock() {
                eprintln!("---- what this input did ----");
                for line in t.iter() {
                    eprintln!("{line}");
                }
                eprintln!("-----------------------------");
            }
            previous(info);
        }));
    });
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// Operations, as the fuzzer chooses them.

#[derive(Arbitrary, Debug, Clone, Copy)]
struct Who {
    user: u8,
    device: u8,
}

impl Who {
    fn user(self) -> usize {
        usize::from(self.user) % USERS
    }
    fn device(self) -> usize {
        usize::from(self.device) % DEVICES
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum To {
    User(u8),
    Group(u8),
    /// A user who never logs in.
    Stranger,
    /// The sender.
    Myself,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum ConvRef {
    /// One of the conversations seen so far.
    Known(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum SeqRef {
    /// The highest seq seen so far in the conversation, plus this.
    Latest(i8),
    Raw(u64),
}

#[derive(Arbitrary, Debug, Clone)]
enum TokenKind {
    Good,
    Expired,
    /// Signed with another secret.
    Forged,
    Empty,
    /// Valid, but bound to another device.
    OtherDevice,
    Mangled(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone)]
enum GroupOp {
    Create { members: u8, policy: u8 },
    Join,
    Leave,
    Invite { users: u8 },
    Kick { users: u8 },
    SetRole { user: u8, admin: bool },
    Mute { user: u8, mute: bool },
    MuteAll(bool),
    Transfer { user: u8 },
    Dissolve,
    Get,
    ListMembers { limit: u8 },
    Review { user: u8, approve: bool },
}

#[derive(Arbitrary, Debug, Clone)]
enum SocialOp {
    AddFriend,
    Accept,
    Decline,
    Delete,
    Block,
    Unblock,
    List(u8),
}

#[derive(Arbitrary, Debug, Clone)]
enum Op {
    Login {
        who: Who,
        token: TokenKind,
        wrong_version: bool,
        sync_on_login: bool,
        sync_version: u8,
    },
    Close(Who),
    Send {
        who: Who,
        to: To,
        id: u8,
        kind: u8,
        payload: Vec<u8>,
    },
    Sync {
        who: Who,
        since_zero: bool,
        page_size: u8,
    },
    Ack {
        who: Who,
        conv: ConvRef,
        seq: SeqRef,
    },
    MarkRead {
        who: Who,
        conv: ConvRef,
        seq: SeqRef,
    },
    History {
        who: Who,
        to: To,
        before: SeqRef,
        limit: u8,
    },
    Recall {
        who: Who,
        conv: ConvRef,
        seq: SeqRef,
    },
    Group {
        who: Who,
        group: u8,
        op: GroupOp,
    },
    Social {
        who: Who,
        other: u8,
        op: SocialOp,
    },
    /// Bytes decoded as a protobuf `Frame` (sent well framed), or sent as a frame body that
    /// does not decode.
    Frame {
        who: Who,
        bytes: Vec<u8>,
    },
    /// Bytes written as they are: the framing may break. The client then stops writing.
    Garbage {
        who: Who,
        bytes: Vec<u8>,
    },
    /// A new connection that sends bytes instead of a Hello, then stops writing.
    PreLogin(Vec<u8>),
    /// A call to the admin and push HTTP API; `raw` replaces its JSON body.
    Api {
        call: ApiCall,
        raw: Option<Vec<u8>>,
    },
}

#[derive(Arbitrary, Debug, Clone)]
enum Name {
    Tracked(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug, Clone)]
enum ApiCall {
    Stats,
    Metrics,
    Import(Vec<Name>),
    Token {
        user: Name,
        ttl: Option<u64>,
        device: Option<String>,
    },
    Kick {
        user: Name,
        reason: Option<String>,
    },
    Ban {
        user: Name,
        secs: Option<u64>,
    },
    Unban(Name),
    Revoke(Name),
    /// A protobuf frame (from the bytes) in its JSON form, as a user or as the system user.
    Request {
        user: Option<Name>,
        frame: Vec<u8>,
    },
    Send {
        from: Option<Name>,
        to: To,
        text: String,
        id: Option<u8>,
    },
    Recall {
        user: Option<Name>,
        conv: ConvRef,
        seq: SeqRef,
    },
    History {
        conv: ConvRef,
        before: Option<u64>,
        limit: Option<u32>,
    },
    Group {
        user: Option<Name>,
        group: u8,
        op: GroupOp,
    },
    Push {
        all: bool,
        users: Vec<Name>,
        aliases: Vec<String>,
        tags: Vec<String>,
        text: String,
        ttl: Option<u64>,
    },
    PushInfo(String),
    Alias {
        alias: String,
        user: Name,
        device: u8,
    },
    GetAlias(String),
    DeleteAlias(String),
    Tag {
        tag: String,
        add: Vec<Name>,
        remove: Vec<Name>,
    },
    TagMembers {
        tag: String,
        limit: Option<u8>,
    },
    Devices(Name),
    HideMember {
        group: u8,
        user: Name,
    },
    HiddenMembers(u8),
    UnhideMember {
        group: u8,
        user: Name,
    },
    Device {
        user: Name,
        device: u8,
        provider: Option<String>,
        token: Option<String>,
        alias: Option<String>,
    },
}

// ---------------------------------------------------------------------------------------------
// A blocking client connection.

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    codec: Codec,
    next_id: u64,
}

enum Got {
    Frame(Frame),
    Closed,
}

impl Conn {
    fn connect(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect to the gateway");
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        // Closed with a reset, so that millions of inputs leave no TIME_WAIT behind.
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        Conn {
            stream,
            buf: BytesMut::new(),
            codec: Codec::default(),
            next_id: 1,
        }
    }

    /// The connection in traces: descriptor and local port (the gateway logs the peer port).
    fn name(&self) -> String {
        use std::os::fd::AsRawFd;
        let port = self.stream.local_addr().map_or(0, |a| a.port());
        format!("connection fd={} port={port}", self.stream.as_raw_fd())
    }

    fn rid(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Writes a frame; false if the connection is gone.
    fn write_frame(&mut self, frame: &Frame) -> bool {
        let mut out = BytesMut::new();
        self.codec.encode(frame, &mut out).expect("encode");
        self.stream.write_all(&out).is_ok()
    }

    fn write_raw(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// The next frame or the connection's end; panics if the server is silent for [`WAIT`].
    fn recv(&mut self, waiting_for: &str) -> Got {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => return Got::Frame(f),
                Ok(None) => {}
                Err(e) => panic!("the gateway sent an undecodable frame: {e}"),
            }
            let mut chunk = [0u8; 16 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    trace(format!(
                        "  {} closed by the gateway (end of stream)",
                        self.name()
                    ));
                    return Got::Closed;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                // libFuzzer's timer signal interrupts blocking reads.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    panic!("the gateway did not answer within {WAIT:?}: waiting for {waiting_for}")
                }
                Err(e) => {
                    // EBADF would mean that something in this process closed the descriptor.
                    trace(format!("  {} closed: {e}", self.name()));
                    return Got::Closed;
                }
            }
        }
    }
}

/// Requests answered by the server only when they fail.
fn answered(body: &Option<Body>) -> bool {
    !matches!(
        body,
        Some(Body::Ack(_)) | Some(Body::Typing(_)) | Some(Body::PushAck(_)) | Some(Body::Hello(_))
    )
}

fn is_room(target: Option<&Target>) -> bool {
    target.is_some_and(|t| t.kind == TargetKind::Room as i32)
}

/// The last frame of an answer (a sync answers with several).
fn is_final(body: &Option<Body>) -> bool {
    !matches!(
        body,
        Some(Body::SyncConversations(_)) | Some(Body::SyncMessages(_))
    )
}

// ---------------------------------------------------------------------------------------------
// The model: what the gateway acknowledged.

#[derive(Debug, Clone, PartialEq)]
struct Stored {
    sender: String,
    client_msg_id: String,
    content_type: u32,
    custom_type: String,
    payload: Bytes,
}

struct AckedMsg {
    group: bool,
    /// The tracked users who must find it in their sync.
    readers: Vec<usize>,
    conv: u64,
    seq: u64,
}

/// One user's view at the end: conversation -> (state, messages by seq).
type View = BTreeMap<u64, (v1::ConversationState, BTreeMap<u64, Deliver>)>;

struct Harness {
    addr: SocketAddr,
    api: SocketAddr,
    secret: Secret,
    prefix: String,
    conns: Vec<Vec<Option<Conn>>>,
    /// Every message the gateway acknowledged or delivered: (conv, seq) -> what it is.
    messages: HashMap<(u64, u64), Stored>,
    acked: Vec<AckedMsg>,
    /// (sender, client_msg_id) -> (conv, seq) of its first acknowledgement.
    idempotency: HashMap<(String, String), (u64, u64)>,
    convs: Vec<u64>,
    latest: HashMap<u64, u64>,
    /// Conversations where a recall was asked: their messages may come back recalled.
    recalls: HashSet<u64>,
    /// Users who changed their conversation settings (clear, hide) with an arbitrary frame.
    settings_changed: HashSet<usize>,
    /// Garbage was written on a logged-in connection: whatever whole frames it held were
    /// handled without the harness knowing (recalls, cleared conversations).
    unseen_requests: bool,
    /// Sends whose connection ended before their answer: (sender, client_msg_id).
    unanswered_sends: HashSet<(String, String)>,
    /// Users banned or whose tokens were revoked through the API: they may not log in.
    locked_out: HashSet<usize>,
    /// The gateway hides from a group member what came before their latest join.
    hide_history: bool,
}

impl Harness {
    fn user_name(&self, i: usize) -> String {
        format!("{}u{i}", self.prefix)
    }

    fn group_name(&self, i: u8) -> String {
        format!("{}g{}", self.prefix, usize::from(i) % GROUPS)
    }

    fn target(&self, from: usize, to: To) -> Target {
        match to {
            To::User(u) => Target::user(self.user_name(usize::from(u) % USERS)),
            To::Group(g) => Target::group(self.group_name(g)),
            To::Stranger => Target::user(format!("{}x", self.prefix)),
            To::Myself => Target::user(self.user_name(from)),
        }
    }

    fn conv(&self, c: ConvRef) -> u64 {
        match c {
            ConvRef::Known(i) if !self.convs.is_empty() => {
                self.convs[usize::from(i) % self.convs.len()]
            }
            ConvRef::Known(i) => u64::from(i),
            ConvRef::Raw(c) => c,
        }
    }

    fn seq(&self, conv: u64, s: SeqRef) -> u64 {
        match s {
            SeqRef::Latest(d) => {
                let latest = self.latest.get(&conv).copied().unwrap_or(0);
                latest.saturating_add_signed(i64::from(d))
            }
            SeqRef::Raw(s) => s,
        }
    }

    fn token(&self, user: usize, kind: &TokenKind, device: &str) -> String {
        let claims = |sub: String, exp: u64, dev: Option<String>| Claims {
            v: 1,
            sub,
            exp,
            dev,
            iat_ms: now_secs() * 1000,
        };
        let name = self.user_name(user);
        match kind {
            TokenKind::Good => {
                tern_gateway::token::mint(&self.secret, &claims(name, now_secs() + 3600, None))
            }
            TokenKind::Expired => tern_gateway::token::mint(
                &self.secret,
                &claims(name, now_secs().saturating_sub(3600), None),
            ),
            TokenKind::Forged => tern_gateway::token::mint(
                &Secret::new(b"not-the-gateway-secret-0123456789".to_vec()),
                &claims(name, now_secs() + 3600, None),
            ),
            TokenKind::Empty => String::new(),
            TokenKind::OtherDevice => tern_gateway::token::mint(
                &self.secret,
                &claims(name, now_secs() + 3600, Some(format!("{device}-other"))),
            ),
            TokenKind::Mangled(bytes) => {
                let mut t =
                    tern_gateway::token::mint(&self.secret, &claims(name, now_secs() + 3600, None))
                        .into_bytes();
                for (i, b) in bytes.iter().take(8).enumerate() {
                    let at = usize::from(*b) % t.len();
                    t[at] = b"AZaz09-_."[i % 9];
                }
                String::from_utf8(t).unwrap()
            }
        }
    }

    /// Records a frame the gateway sent to `user`, checking what it says about messages.
    fn observe(&mut self, frame: &Frame) {
        trace(format!("  got {frame:?}"));
        match &frame.body {
            Some(Body::Deliver(d)) => self.saw_message(d),
            Some(Body::SyncMessages(m)) => {
                for d in &m.messages {
                    self.saw_message(d);
                }
            }
            Some(Body::HistoryPage(p)) => {
                for d in &p.messages {
                    self.saw_message(d);
                }
            }
            Some(Body::SyncConversations(s)) => {
                for c in &s.conversations {
                    self.saw_conv(c.conversation_id, c.latest_seq);
                }
            }
            Some(Body::GroupResponse(g)) => {
                self.saw_conv(g.conversation_id, g.event_seq);
            }
            _ => {}
        }
    }

    fn saw_conv(&mut self, conv: u64, seq: u64) {
        if conv == 0 {
            return;
        }
        if !self.convs.contains(&conv) {
            self.convs.push(conv);
        }
        let l = self.latest.entry(conv).or_default();
        *l = (*l).max(seq);
    }

    /// A copy of a message: it must be the message first seen at that (conv, seq).
    fn saw_message(&mut self, d: &Deliver) {
        self.saw_conv(d.conversation_id, d.seq);
        if is_room(d.target.as_ref()) {
            return; // not stored; numbered by the room alone
        }
        let got = Stored {
            sender: d.sender.clone(),
            client_msg_id: d.client_msg_id.clone(),
            content_type: d.content_type,
            custom_type: d.custom_type.clone(),
            payload: d.payload.clone(),
        };
        self.check_copy(d.conversation_id, d.seq, &got, d.recalled);
    }

    fn check_copy(&mut self, conv: u64, seq: u64, got: &Stored, recalled: bool) {
        match self.messages.get(&(conv, seq)) {
            None => {
                if !recalled {
                    self.messages.insert((conv, seq), got.clone());
                }
            }
            Some(want) if recalled => {
                assert!(
                    self.unseen_requests || self.recalls.contains(&conv),
                    "message {conv}/{seq} came back recalled, but no recall was asked: {want:?}"
                );
                assert!(
                    got.payload.is_empty(),
                    "a recalled message keeps its payload"
                );
            }
            Some(want) => assert_eq!(
                want, got,
                "two different messages at conversation {conv} seq {seq}"
            ),
        }
    }

    fn conn(&mut self, who: Who) -> Option<&mut Conn> {
        self.conns[who.user()][who.device()].as_mut()
    }

    /// Logs `who` in with a good token if it has no connection.
    fn ensure(&mut self, who: Who) -> bool {
        if self.conn(who).is_none() {
            self.login(who, &TokenKind::Good, false, false, 0);
        }
        self.conn(who).is_some()
    }

    fn login(
        &mut self,
        who: Who,
        token: &TokenKind,
        wrong_version: bool,
        sync_on_login: bool,
        sync_version: u8,
    ) {
        let (u, dev) = (who.user(), who.device());
        let device = format!("d{dev}");
        let token = self.token(u, token, &device);
        let mut conn = Conn::connect(self.addr);
        trace(format!("  login on {}", conn.name()));
        let rid = conn.rid();
        let hello = v1::Hello {
            protocol_version: if wrong_version { 7 } else { PROTOCOL_VERSION },
            token,
            device_id: device,
            platform: v1::Platform::Linux as i32,
            client_version: "session-fuzz".into(),
            sync_version: u64::from(sync_version),
            sync_on_login,
            resume_session_id: 0,
            sync_max_messages_per_conversation: 0,
        };
        if !conn.write_frame(&Frame::new(rid, hello)) {
            return;
        }
        let ok = match conn.recv("HelloOk") {
            Got::Frame(Frame {
                request_id,
                body: Some(Body::HelloOk(ok)),
            }) if request_id == rid => ok,
            Got::Frame(Frame {
                body: Some(Body::Error(e)),
                ..
            }) => {
                assert!(e.fatal, "a refused login is fatal: {e:?}");
                expect_closed(&mut conn, "the close after a refused login");
                return;
            }
            Got::Frame(f) => panic!("expected HelloOk or an error, got {f:?}"),
            Got::Closed => panic!("the gateway closed a login without an answer"),
        };
        assert_eq!(ok.user_id, self.user_name(u));
        // The replaced connection of this device is kicked and closed.
        if let Some(mut old) = self.conns[u][dev].take() {
            self.drain_to_close(&mut old);
        }
        self.conns[u][dev] = Some(conn);
        if sync_on_login {
            self.await_answer(who, rid, "the sync on login");
        }
    }

    /// Reads `conn` until the server closes it.
    fn drain_to_close(&mut self, conn: &mut Conn) {
        loop {
            match conn.recv("the connection to close") {
                Got::Frame(f) => self.observe(&f),
                Got::Closed => return,
            }
        }
    }

    /// Reads `who`'s connection until the final answer to `rid` (or its end).
    fn await_answer(&mut self, who: Who, rid: u64, what: &str) -> Option<Frame> {
        let u = who.user();
        loop {
            let got = match self.conn(who) {
                Some(c) => c.recv(what),
                None => return None,
            };
            match got {
                Got::Frame(f) => {
                    self.observe(&f);
                    let done = f.request_id == rid && is_final(&f.body);
                    let fatal = matches!(&f.body, Some(Body::Error(e)) if e.fatal)
                        || matches!(&f.body, Some(Body::Kick(_)));
                    if fatal {
                        let mut c = self.conns[u][who.device()].take().unwrap();
                        self.drain_to_close(&mut c);
                        return done.then_some(f);
                    }
                    if done {
                        return Some(f);
                    }
                }
                Got::Closed => {
                    self.conns[u][who.device()] = None;
                    return None;
                }
            }
        }
    }

    /// Sends `body` on `who`'s connection and waits until the gateway has handled it: its
    /// answer if it has one, else the Pong of a Ping sent behind it.
    fn request(&mut self, who: Who, body: Option<Body>) -> Option<Frame> {
        if !self.ensure(who) {
            return None;
        }
        let expect = answered(&body);
        let kind = Frame {
            request_id: 0,
            body: body.clone(),
        }
        .body_name()
        .to_string();
        trace(format!("  u{}d{} sends {kind}", who.user(), who.device()));
        let c = self.conn(who).unwrap();
        let rid = c.rid();
        let ping = c.rid();
        let sent = c.write_frame(&Frame {
            request_id: rid,
            body: body.clone(),
        }) && c.write_frame(&Frame::new(ping, v1::Ping::default()));
        if !sent {
            self.conns[who.user()][who.device()] = None;
            return None;
        }
        let hello = matches!(body, Some(Body::Hello(_)));
        let mut answer = None;
        let mut ponged = false;
        let u = who.user();
        while !(ponged && (answer.is_some() || !expect)) {
            let got = match self.conn(who) {
                Some(c) => c.recv(&kind),
                None => break,
            };
            let f = match got {
                Got::Frame(f) => f,
                Got::Closed => {
                    assert!(hello, "the gateway closed the connection after {kind}");
                    self.conns[u][who.device()] = None;
                    break;
                }
            };
            self.observe(&f);
            if f.request_id == ping && matches!(f.body, Some(Body::Pong(_))) {
                ponged = true;
                continue;
            }
            let fatal = matches!(&f.body, Some(Body::Error(e)) if e.fatal)
                || matches!(&f.body, Some(Body::Kick(_)));
            if f.request_id == rid && is_final(&f.body) {
                answer = Some(f.clone());
            }
            if fatal {
                if let Some(Body::Error(e)) = &f.body {
                    // Only a second Hello ends a logged-in session from the client's side.
                    assert!(
                        hello || e.code == ErrorCode::RateLimited as i32,
                        "fatal error after {kind}: {e:?}"
                    );
                }
                let mut c = self.conns[u][who.device()].take().unwrap();
                self.drain_to_close(&mut c);
                break;
            }
        }
        if let Some(Body::Send(send)) = &body {
            self.track_send(u, send, answer.as_ref());
        }
        match &body {
            Some(Body::Recall(r)) => {
                self.recalls.insert(r.conversation_id);
            }
            Some(Body::SetConversation(_)) => {
                self.settings_changed.insert(u);
            }
            _ => {}
        }
        answer
    }

    fn track_send(&mut self, user: usize, send: &v1::Send, answer: Option<&Frame>) {
        if send.content_type == ContentType::System as u32 {
            // The server's own content type: refused, and nothing stored.
            if let Some(f) = answer {
                assert!(
                    matches!(&f.body, Some(Body::Error(e)) if e.code == ErrorCode::InvalidArgument as i32),
                    "a client's SYSTEM send answered with {f:?}"
                );
            }
            return;
        }
        let sender = self.user_name(user);
        let key = (sender.clone(), send.client_msg_id.clone());
        let Some(Frame {
            body: Some(Body::SendAck(ack)),
            ..
        }) = answer
        else {
            if answer.is_none() {
                self.unanswered_sends.insert(key);
            }
            return;
        };
        assert_eq!(ack.client_msg_id, send.client_msg_id);
        match self.idempotency.get(&key) {
            Some(&(conv, seq)) => {
                assert!(
                    ack.duplicate,
                    "client_msg_id {:?} acknowledged twice as new: first {conv}/{seq}, now {}/{}",
                    send.client_msg_id, ack.conversation_id, ack.seq
                );
                assert_eq!(
                    (ack.conversation_id, ack.seq),
                    (conv, seq),
                    "a duplicate answered with another message"
                );
                return;
            }
            None if ack.duplicate => {
                // Only a first send whose answer was lost (with its connection) can have
                // been stored unseen.
                assert!(
                    self.unseen_requests || self.unanswered_sends.contains(&key),
                    "client_msg_id {:?} acknowledged as a duplicate of nothing sent",
                    send.client_msg_id
                );
                self.idempotency.insert(key, (ack.conversation_id, ack.seq));
                self.saw_conv(ack.conversation_id, ack.seq);
                return;
            }
            None => {}
        }
        self.idempotency.insert(key, (ack.conversation_id, ack.seq));
        self.saw_conv(ack.conversation_id, ack.seq);
        let target = send.target.clone().unwrap_or_default();
        if is_room(Some(&target)) {
            return; // not stored
        }
        let group = target.kind == TargetKind::Group as i32;
        let mut readers = vec![user];
        if !group
            && let Some(peer) = (0..USERS).find(|&i| self.user_name(i) == target.id)
            && peer != user
        {
            readers.push(peer);
        }
        let stored = Stored {
            sender,
            client_msg_id: send.client_msg_id.clone(),
            content_type: send.content_type,
            custom_type: send.custom_type.clone(),
            payload: send.payload.clone(),
        };
        self.check_copy(ack.conversation_id, ack.seq, &stored, false);
        self.acked.push(AckedMsg {
            group,
            readers,
            conv: ack.conversation_id,
            seq: ack.seq,
        });
    }

    fn apply(&mut self, op: Op) {
        trace(format!("op {op:?}"));
        match op {
            Op::Login {
                who,
                token,
                wrong_version,
                sync_on_login,
                sync_version,
            } => self.login(who, &token, wrong_version, sync_on_login, sync_version),
            Op::Close(who) => {
                self.conns[who.user()][who.device()] = None;
            }
            Op::Send {
                who,
                to,
                id,
                kind,
                mut payload,
            } => {
                payload.truncate(MAX_BYTES);
                let (content_type, custom_type) = match kind % 5 {
                    0 | 1 => (1, String::new()),
                    2 => (100, "fuzz.custom".to_string()),
                    3 => (200, String::new()),
                    _ => (u32::from(kind), String::new()),
                };
                let send = v1::Send {
                    client_msg_id: format!("c{}", id % 16),
                    target: Some(self.target(who.user(), to)),
                    content_type,
                    custom_type,
                    payload: Bytes::from(payload),
                    priority: false,
                };
                self.request(who, Some(Body::Send(send)));
            }
            Op::Sync {
                who,
                since_zero,
                page_size,
            } => {
                let since = if since_zero { 0 } else { u64::from(page_size) };
                self.request(
                    who,
                    Some(Body::Sync(v1::SyncRequest {
                        since_version: since,
                        page_size: u32::from(page_size % 8),
                        // 0 (every message) in a quarter of the syncs, else at most 1..=3.
                        max_messages_per_conversation: u32::from(page_size >> 6),
                    })),
                );
            }
            Op::Ack { who, conv, seq } => {
                let conv = self.conv(conv);
                let seq = self.seq(conv, seq);
                self.request(
                    who,
                    Some(Body::Ack(v1::Ack {
                        conversation_id: conv,
                        seq,
                    })),
                );
            }
            Op::MarkRead { who, conv, seq } => {
                let conv = self.conv(conv);
                let seq = self.seq(conv, seq);
                self.request(
                    who,
                    Some(Body::MarkRead(v1::MarkRead {
                        conversation_id: conv,
                        seq,
                    })),
                );
            }
            Op::History {
                who,
                to,
                before,
                limit,
            } => {
                let target = self.target(who.user(), to);
                let before = match before {
                    SeqRef::Raw(s) => s,
                    SeqRef::Latest(d) => u64::from(d.unsigned_abs()),
                };
                self.request(
                    who,
                    Some(Body::History(v1::HistoryRequest {
                        conversation_id: 0,
                        target: Some(target),
                        before_seq: before,
                        limit: u32::from(limit % 16),
                    })),
                );
            }
            Op::Recall { who, conv, seq } => {
                let conv = self.conv(conv);
                let seq = self.seq(conv, seq);
                self.recalls.insert(conv);
                self.request(
                    who,
                    Some(Body::Recall(v1::Recall {
                        conversation_id: conv,
                        seq,
                    })),
                );
            }
            Op::Group { who, group, op } => {
                let req = self.group_request(group, op);
                self.request(who, Some(Body::Group(req)));
            }
            Op::Social { who, other, op } => {
                let other = self.user_name(usize::from(other) % USERS);
                use social_request::Op as S;
                let op = match op {
                    SocialOp::AddFriend => S::AddFriend(v1::AddFriend {
                        user_id: other,
                        message: "hi".into(),
                    }),
                    SocialOp::Accept => S::AcceptFriend(v1::AcceptFriend { user_id: other }),
                    SocialOp::Decline => S::DeclineFriend(v1::DeclineFriend { user_id: other }),
                    SocialOp::Delete => S::DeleteFriend(v1::DeleteFriend { user_id: other }),
                    SocialOp::Block => S::Block(v1::Block { user_id: other }),
                    SocialOp::Unblock => S::Unblock(v1::Unblock { user_id: other }),
                    SocialOp::List(k) => S::List(v1::ListUsers {
                        kind: i32::from(k % 5),
                        ..Default::default()
                    }),
                };
                self.request(who, Some(Body::Social(v1::SocialRequest { op: Some(op) })));
            }
            Op::Frame { who, bytes } => match Frame::decode(&bytes[..]) {
                Ok(frame) => {
                    self.request(who, frame.body);
                }
                Err(_) => {
                    if !self.ensure(who) {
                        return;
                    }
                    let mut raw = (bytes.len() as u32).to_be_bytes().to_vec();
                    raw.extend_from_slice(&bytes);
                    let c = self.conn(who).unwrap();
                    let ping = c.rid();
                    let _ =
                        c.write_raw(&raw) && c.write_frame(&Frame::new(ping, v1::Ping::default()));
                    // An undecodable frame is refused; the connection may end.
                    let u = who.user();
                    while let Some(c) = self.conn(who) {
                        match c.recv("the answer to an undecodable frame") {
                            Got::Frame(f) => {
                                self.observe(&f);
                                if f.request_id == ping && matches!(f.body, Some(Body::Pong(_))) {
                                    break;
                                }
                            }
                            Got::Closed => {
                                self.conns[u][who.device()] = None;
                                break;
                            }
                        }
                    }
                }
            },
            Op::Garbage { who, bytes } => {
                if !self.ensure(who) {
                    return;
                }
                // Whole frames in the bytes are handled unseen: they may recall or clear.
                self.unseen_requests = true;
                let mut c = self.conns[who.user()][who.device()].take().unwrap();
                let _ = c.write_raw(&bytes);
                let _ = c.stream.shutdown(Shutdown::Write);
                self.drain_to_close(&mut c);
            }
            Op::Api { call, raw } => self.api_call(call, raw),
            Op::PreLogin(bytes) => {
                let mut c = Conn::connect(self.addr);
                let _ = c.write_raw(&bytes);
                let _ = c.stream.shutdown(Shutdown::Write);
                loop {
                    match c.recv("the close of a connection that never logged in") {
                        Got::Frame(Frame {
                            body: Some(Body::Error(e)),
                            ..
                        }) => assert!(e.fatal, "an error before login is fatal: {e:?}"),
                        Got::Frame(f) => panic!("a connection that never logged in got {f:?}"),
                        Got::Closed => break,
                    }
                }
            }
        }
    }

    fn name(&self, n: &Name) -> String {
        match n {
            Name::Tracked(u) => self.user_name(usize::from(*u) % USERS),
            Name::Raw(s) => s.chars().take(80).collect(),
        }
    }

    fn tracked(&self, n: &Name) -> Option<usize> {
        match n {
            Name::Tracked(u) => Some(usize::from(*u) % USERS),
            Name::Raw(s) => (0..USERS).find(|&i| self.user_name(i) == *s),
        }
    }

    /// One call to the admin API: it is never a server error, and every refusal is a JSON
    /// error naming its code.
    fn api_call(&mut self, call: ApiCall, raw: Option<Vec<u8>>) {
        use serde_json::json;
        let short = |s: &str| -> String { s.chars().take(80).collect() };
        let (method, path, body): (&str, String, Option<serde_json::Value>) = match &call {
            ApiCall::Stats => ("GET", "/v1/stats".into(), None),
            ApiCall::Metrics => ("GET", "/metrics".into(), None),
            ApiCall::Import(names) => {
                let users: Vec<_> = names
                    .iter()
                    .take(4)
                    .map(|n| json!({"id": self.name(n)}))
                    .collect();
                (
                    "POST",
                    "/v1/users/import".into(),
                    Some(json!({ "users": users })),
                )
            }
            ApiCall::Token { user, ttl, device } => (
                "POST",
                format!("/v1/users/{}/token", pct(&self.name(user))),
                Some(json!({"ttl_secs": ttl, "device": device.as_deref().map(short)})),
            ),
            ApiCall::Kick { user, reason } => (
                "POST",
                format!("/v1/users/{}/kick", pct(&self.name(user))),
                Some(json!({"reason": reason.as_deref().map(short)})),
            ),
            ApiCall::Ban { user, secs } => {
                if let Some(u) = self.tracked(user) {
                    self.locked_out.insert(u);
                }
                (
                    "POST",
                    format!("/v1/users/{}/ban", pct(&self.name(user))),
                    Some(json!({"duration_secs": secs})),
                )
            }
            ApiCall::Unban(user) => (
                "DELETE",
                format!("/v1/users/{}/ban", pct(&self.name(user))),
                None,
            ),
            ApiCall::Revoke(user) => {
                if let Some(u) = self.tracked(user) {
                    self.locked_out.insert(u);
                }
                (
                    "POST",
                    format!("/v1/users/{}/revoke-tokens", pct(&self.name(user))),
                    None,
                )
            }
            ApiCall::Request { user, frame } => {
                self.unseen_requests = true;
                let frame = Frame::decode(&frame[..]).unwrap_or_default();
                let path = match user {
                    Some(u) => format!("/v1/users/{}/request", pct(&self.name(u))),
                    None => "/v1/system/request".into(),
                };
                (
                    "POST",
                    path,
                    Some(serde_json::to_value(&frame).unwrap_or_default()),
                )
            }
            ApiCall::Send { from, to, text, id } => {
                self.unseen_requests = true;
                let target = self.target(0, *to);
                let group = target.kind == TargetKind::Group as i32;
                let mut body = json!({
                    "from": from.as_ref().map(|f| self.name(f)),
                    "text": short(text),
                    "client_msg_id": id.map(|i| format!("c{}", i % 16)),
                });
                body[if group { "to_group" } else { "to_user" }] = json!(target.id);
                ("POST", "/v1/messages".into(), Some(body))
            }
            ApiCall::Recall { user, conv, seq } => {
                self.unseen_requests = true;
                let conv = self.conv(*conv);
                let seq = self.seq(conv, *seq);
                self.recalls.insert(conv);
                (
                    "POST",
                    "/v1/messages/recall".into(),
                    Some(
                        json!({"as": user.as_ref().map(|u| self.name(u)), "conversation_id": conv, "seq": seq}),
                    ),
                )
            }
            ApiCall::History {
                conv,
                before,
                limit,
            } => {
                let conv = self.conv(*conv);
                let mut q = Vec::new();
                if let Some(b) = before {
                    q.push(format!("before={b}"));
                }
                if let Some(l) = limit {
                    q.push(format!("limit={l}"));
                }
                (
                    "GET",
                    format!("/v1/conversations/{conv}/messages?{}", q.join("&")),
                    None,
                )
            }
            ApiCall::Group { user, group, op } => {
                self.unseen_requests = true;
                let req = self.group_request(*group, op.clone());
                let path = match user {
                    Some(u) => format!("/v1/groups?as={}", pct(&self.name(u))),
                    None => "/v1/groups".into(),
                };
                (
                    "POST",
                    path,
                    Some(serde_json::to_value(&req).unwrap_or_default()),
                )
            }
            ApiCall::Push {
                all,
                users,
                aliases,
                tags,
                text,
                ttl,
            } => (
                "POST",
                "/v1/push".into(),
                Some(json!({
                    "all": all,
                    "users": users.iter().take(4).map(|u| self.name(u)).collect::<Vec<_>>(),
                    "aliases": aliases.iter().take(4).map(|a| short(a)).collect::<Vec<_>>(),
                    "tags": tags.iter().take(4).map(|t| short(t)).collect::<Vec<_>>(),
                    "text": short(text),
                    "ttl_secs": ttl,
                })),
            ),
            ApiCall::PushInfo(id) => ("GET", format!("/v1/push/{}", pct(id)), None),
            ApiCall::Alias {
                alias,
                user,
                device,
            } => (
                "POST",
                "/v1/aliases".into(),
                Some(
                    json!({"alias": short(alias), "user": self.name(user), "device": format!("d{}", device % 3)}),
                ),
            ),
            ApiCall::GetAlias(a) => ("GET", format!("/v1/aliases/{}", pct(a)), None),
            ApiCall::DeleteAlias(a) => ("DELETE", format!("/v1/aliases/{}", pct(a)), None),
            ApiCall::Tag { tag, add, remove } => {
                let members = |v: &Vec<Name>| -> Vec<serde_json::Value> {
                    v.iter()
                        .take(4)
                        .map(|n| json!({"user": self.name(n)}))
                        .collect()
                };
                (
                    "POST",
                    format!("/v1/tags/{}", pct(tag)),
                    Some(json!({"add": members(add), "remove": members(remove)})),
                )
            }
            ApiCall::TagMembers { tag, limit } => (
                "GET",
                format!(
                    "/v1/tags/{}{}",
                    pct(tag),
                    limit.map(|l| format!("?limit={l}")).unwrap_or_default()
                ),
                None,
            ),
            ApiCall::HideMember { group, user } => (
                "POST",
                format!(
                    "/v1/groups/{}/hidden-members",
                    pct(&self.group_name(*group))
                ),
                Some(json!({"user": self.name(user)})),
            ),
            ApiCall::HiddenMembers(group) => (
                "GET",
                format!(
                    "/v1/groups/{}/hidden-members",
                    pct(&self.group_name(*group))
                ),
                None,
            ),
            ApiCall::UnhideMember { group, user } => (
                "DELETE",
                format!(
                    "/v1/groups/{}/hidden-members/{}",
                    pct(&self.group_name(*group)),
                    pct(&self.name(user))
                ),
                None,
            ),
            ApiCall::Devices(user) => (
                "GET",
                format!("/v1/users/{}/devices", pct(&self.name(user))),
                None,
            ),
            ApiCall::Device {
                user,
                device,
                provider,
                token,
                alias,
            } => (
                "POST",
                format!(
                    "/v1/users/{}/devices/d{}",
                    pct(&self.name(user)),
                    device % 3
                ),
                Some(json!({
                    "push_provider": provider.as_deref().map(short),
                    "push_token": token.as_deref().map(short),
                    "alias": alias.as_deref().map(short),
                })),
            ),
        };
        let body: Option<Vec<u8>> = match raw {
            Some(mut r) => {
                r.truncate(4 * MAX_BYTES);
                Some(r)
            }
            None => body.map(|b| serde_json::to_vec(&b).unwrap()),
        };
        let (status, head, answer) = http(self.api, method, &path, body.as_deref());
        assert!(
            status < 500,
            "{method} {path} answered {status}: {}",
            String::from_utf8_lossy(&answer)
        );
        if matches!(call, ApiCall::Metrics) && status == 200 {
            return;
        }
        let v: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_else(|e| {
            panic!(
                "{method} {path} answered {status} with a body that is not JSON ({e}): {head} {}",
                String::from_utf8_lossy(&answer)
            )
        });
        if status >= 400 {
            assert!(
                v["error"]["code"].is_u64() && v["error"]["name"].is_string(),
                "{method} {path} refused with {status} without a JSON error: {v}"
            );
        }
    }

    fn group_request(&self, group: u8, op: GroupOp) -> v1::GroupRequest {
        use group_request::Op as G;
        let users = |mask: u8| -> Vec<String> {
            (0..USERS)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| self.user_name(i))
                .chain((mask & 0x80 != 0).then(|| format!("{}x", self.prefix)))
                .collect()
        };
        let user = |u: u8| self.user_name(usize::from(u) % USERS);
        let op = match op {
            GroupOp::Create { members, policy } => G::Create(v1::CreateGroup {
                profile: Some(Box::new(v1::GroupProfile {
                    name: Some("fuzz".into()),
                    join_policy: Some(i32::from(policy % 4)),
                    ..Default::default()
                })),
                members: users(members),
            }),
            GroupOp::Join => G::Join(v1::JoinGroup {
                message: "let me in".into(),
            }),
            GroupOp::Leave => G::Leave(v1::LeaveGroup {}),
            GroupOp::Invite { users: m } => G::Invite(v1::InviteMembers { user_ids: users(m) }),
            GroupOp::Kick { users: m } => G::Kick(v1::KickMembers {
                user_ids: users(m),
                reason: String::new(),
            }),
            GroupOp::SetRole { user: u, admin } => G::SetRole(v1::SetRole {
                user_id: user(u),
                role: if admin { 2 } else { 1 },
            }),
            GroupOp::Mute { user: u, mute } => G::Mute(v1::MuteMember {
                user_id: user(u),
                duration_ms: if mute { 3_600_000 } else { 0 },
            }),
            GroupOp::MuteAll(m) => G::MuteAll(v1::MuteAll { muted: m }),
            GroupOp::Transfer { user: u } => G::Transfer(v1::TransferOwner { user_id: user(u) }),
            GroupOp::Dissolve => G::Dissolve(v1::DissolveGroup {}),
            GroupOp::Get => G::Get(v1::GetGroup {}),
            GroupOp::ListMembers { limit } => G::ListMembers(v1::ListMembers {
                page_token: 0,
                limit: u32::from(limit % 4),
            }),
            GroupOp::Review { user: u, approve } => G::ReviewJoin(v1::ReviewJoin {
                user_id: user(u),
                approve,
            }),
        };
        v1::GroupRequest {
            group_id: self.group_name(group),
            op: Some(op),
        }
    }

    /// A fresh device of `user` syncs everything, or with `bound` > 0 the latest `bound` of
    /// each conversation (another fresh device); checks the answer's shape.
    fn view(&mut self, user: usize, bound: u32) -> Option<View> {
        let mut conn = Conn::connect(self.addr);
        let token = tern_gateway::token::mint(
            &self.secret,
            &Claims {
                v: 1,
                sub: self.user_name(user),
                exp: now_secs() + 3600,
                dev: None,
                iat_ms: 0,
            },
        );
        let rid = conn.rid();
        assert!(conn.write_frame(&Frame::new(
            rid,
            v1::Hello {
                protocol_version: PROTOCOL_VERSION,
                token,
                device_id: if bound == 0 { "check" } else { "check-bounded" }.into(),
                platform: v1::Platform::Linux as i32,
                client_version: "session-fuzz".into(),
                sync_version: 0,
                sync_on_login: true,
                resume_session_id: 0,
                sync_max_messages_per_conversation: bound,
            },
        )));
        let mut view = View::new();
        let mut logged_in = false;
        loop {
            let f = match conn.recv("the checking sync") {
                Got::Frame(f) => f,
                Got::Closed => panic!("the gateway closed the checking device's connection"),
            };
            if !logged_in
                && self.locked_out.contains(&user)
                && let Some(Body::Error(e)) = &f.body
            {
                assert!(e.fatal, "a refused login is fatal: {e:?}");
                return None;
            }
            self.observe(&f);
            if f.request_id != rid {
                continue; // live traffic, checked by observe
            }
            match f.body {
                Some(Body::HelloOk(_)) => logged_in = true,
                Some(Body::SyncConversations(s)) => {
                    assert!(logged_in);
                    for c in s.conversations {
                        let id = c.conversation_id;
                        assert!(
                            view.insert(id, (c, BTreeMap::new())).is_none(),
                            "conversation {id} listed twice in one sync"
                        );
                    }
                }
                Some(Body::SyncMessages(m)) => {
                    let (_, msgs) = view.get_mut(&m.conversation_id).unwrap_or_else(|| {
                        panic!(
                            "messages of conversation {} before its state",
                            m.conversation_id
                        )
                    });
                    for d in m.messages {
                        let seq = d.seq;
                        if let Some((&last, _)) = msgs.last_key_value() {
                            assert_eq!(
                                seq,
                                last + 1,
                                "conversation {}: seq {seq} follows {last}",
                                m.conversation_id
                            );
                        }
                        msgs.insert(seq, d);
                    }
                }
                Some(Body::SyncDone(_)) => break,
                other => panic!("unexpected answer to the checking sync: {other:?}"),
            }
        }
        drop(conn);
        for (id, (state, msgs)) in &view {
            let group = id >> 63 == 1;
            let cleared = state.settings.as_ref().map_or(0, |s| s.cleared_seq);
            if bound == 0 {
                assert_eq!(
                    state.skipped_to_seq, 0,
                    "conversation {id}: skipped without a bound"
                );
            }
            let Some((&first, _)) = msgs.first_key_value() else {
                assert!(
                    group || state.latest_seq <= cleared,
                    "1:1 conversation {id}: latest_seq {} but a fresh device's sync has no message",
                    state.latest_seq
                );
                continue;
            };
            let (&last, _) = msgs.last_key_value().unwrap();
            assert_eq!(
                last, state.latest_seq,
                "conversation {id}: sync ends at {last}, latest_seq is {}",
                state.latest_seq
            );
            if !group {
                assert_eq!(
                    first,
                    cleared.max(state.skipped_to_seq) + 1,
                    "1:1 conversation {id}: a fresh device's sync starts at {first}"
                );
            }
        }
        Some(view)
    }

    /// A fresh device's sync bounded to 2 per conversation brings the latest 2 of what the
    /// unbounded one (`full`) brought, and names the last one it left out.
    fn check_bounded(&mut self, user: usize, full: &View) {
        let Some(bounded) = self.view(user, 2) else {
            return;
        };
        assert_eq!(
            bounded.keys().collect::<Vec<_>>(),
            full.keys().collect::<Vec<_>>(),
            "a bounded sync lists other conversations"
        );
        for (id, (_, msgs)) in full {
            let (state, got) = &bounded[id];
            let mut want: Vec<u64> = msgs.keys().rev().take(2).copied().collect();
            want.reverse();
            assert_eq!(
                got.keys().copied().collect::<Vec<_>>(),
                want,
                "conversation {id}: the bounded sync's messages"
            );
            let skipped = if msgs.len() > 2 { want[0] - 1 } else { 0 };
            assert_eq!(
                state.skipped_to_seq, skipped,
                "conversation {id}: skipped_to_seq of the bounded sync"
            );
        }
    }

    fn check(&mut self) {
        let views: Vec<Option<View>> = (0..USERS).map(|u| self.view(u, 0)).collect();
        for (u, full) in views.iter().enumerate() {
            if let Some(full) = full {
                self.check_bounded(u, full);
            }
        }
        for m in &self.acked {
            let readers: &[usize] = if m.group { &m.readers[..1] } else { &m.readers };
            for &r in readers {
                if self.unseen_requests || self.settings_changed.contains(&r) {
                    continue;
                }
                let Some(view) = &views[r] else {
                    continue; // banned or revoked: cannot log in to look
                };
                let name = self.user_name(r);
                let found = view.get(&m.conv).is_some_and(|(state, msgs)| {
                    msgs.contains_key(&m.seq)
                        // Sent before the sender's latest join: no longer theirs to read. The
                        // checking device never acknowledges, so its cursor is the one before
                        // the join, and the sync's first message must be that join.
                        || (self.hide_history
                            && m.group
                            && m.seq <= state.delivered_seq
                            && adds(msgs.get(&(state.delivered_seq + 1)), &name))
                });
                assert!(
                    found,
                    "acknowledged message {}/{} is missing from {}'s sync",
                    m.conv,
                    m.seq,
                    self.user_name(r)
                );
            }
        }
    }
}

/// Whether `d` is a group event that made `user` a member (joined, or invited).
fn adds(d: Option<&Deliver>, user: &str) -> bool {
    let Some(d) = d else { return false };
    if d.content_type != ContentType::System as u32 || d.custom_type != GROUP_EVENT_TYPE {
        return false;
    }
    v1::GroupEvent::decode(d.payload.clone()).is_ok_and(|e| {
        matches!(
            v1::GroupEventKind::try_from(e.kind),
            Ok(v1::GroupEventKind::GroupJoined | v1::GroupEventKind::GroupInvited)
        ) && e.user_ids.iter().any(|u| u == user)
    })
}

/// Percent-encodes a path segment or query value.
fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One HTTP/1.1 request to the admin API: (status, head, body).
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> (u16, String, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).expect("connect to the admin API");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    let body = body.unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_SECRET}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    stream.write_all(&req).expect("write an API request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) => panic!("the API closed {method} {path} without an answer"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("no answer from the API to {method} {path} within {WAIT:?}: {e}"),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head}"));
    let lower = head.to_ascii_lowercase();
    let length: usize = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().expect("a content length"))
        .unwrap_or_else(|| panic!("an API answer without Content-Length: {head}"));
    while buf.len() < head_end + length {
        match stream.read(&mut chunk) {
            Ok(0) => panic!("the API's answer to {method} {path} was cut short"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("the API's answer to {method} {path} stalled: {e}"),
        }
    }
    (status, head, buf[head_end..head_end + length].to_vec())
}

fn expect_closed(conn: &mut Conn, what: &str) {
    loop {
        match conn.recv(what) {
            Got::Closed => return,
            Got::Frame(f) => assert!(
                matches!(f.body, Some(Body::Error(_)) | Some(Body::Kick(_))),
                "expected the connection to close, got {f:?}"
            ),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS && !u.is_empty() {
        match Op::arbitrary(&mut u) {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    if ops.is_empty() {
        return;
    }
    install_trace_hook();
    TRACE.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let mut guard = GATEWAY.lock().unwrap();
    if guard
        .as_ref()
        .is_some_and(|g| g.served >= INPUTS_PER_GATEWAY)
    {
        let mut old = guard.take().unwrap();
        old.stop();
        *guard = Some(Running::start(old.generation + 1));
    }
    let gw = guard.get_or_insert_with(|| Running::start(0));
    gw.served += 1;
    let mut h = Harness {
        addr: gw.addr,
        api: gw.api,
        secret: gw.secret.clone(),
        prefix: format!("r{}i{}", gw.generation, gw.served),
        conns: (0..USERS)
            .map(|_| (0..DEVICES).map(|_| None).collect())
            .collect(),
        messages: HashMap::new(),
        acked: Vec::new(),
        idempotency: HashMap::new(),
        convs: Vec::new(),
        latest: HashMap::new(),
        recalls: HashSet::new(),
        settings_changed: HashSet::new(),
        unseen_requests: false,
        unanswered_sends: HashSet::new(),
        locked_out: HashSet::new(),
        hide_history: gw.generation.is_multiple_of(2),
    };
    for op in ops {
        h.apply(op);
    }
    h.check();
});
