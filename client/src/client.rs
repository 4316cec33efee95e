//! The client handle and the connection task that drives the session over a transport.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};
use rand::RngCore;
use tern_protocol::{
    Body, Codec, CodecError, Frame, HelloOk, HistoryPage, HistoryRequest, Kick, KickReason, Ping,
    Refresh, SendAck, Target,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    Backoff, ClientConfig, ClientError, Event, Result, Transport,
    rooms::{Rooms, room_op},
    session::{Session, kick_is_final},
    transport::{Connector, Reader, Writer},
};

/// Read buffer growth step. The buffer is reused for the connection's lifetime.
const READ_CHUNK: usize = 16 * 1024;

/// Most bytes written to one connection and not yet taken by its transport. Past it the
/// connection counts as stalled and is dropped (a dual-channel session goes on over its other
/// path). The client stops taking requests before: see [`HIGH_WATER`].
const MAX_QUEUED_BYTES: usize = 16 << 20;

/// While every connection has this much written and not yet taken by its transport, the client
/// takes no new requests (back-pressure on the application, as a blocking write would be).
const HIGH_WATER: usize = 1 << 20;

/// How long a closing client waits for a connection's last frames to be written.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How many of the latest notifications' request ids are kept to recognise their refusals.
const NOTICES_KEPT: usize = 64;

/// A connected Tern client. Cheap to clone; every clone talks through the same connection task.
///
/// Created by [`Client::connect`], which needs a tokio runtime. The connection task owns the
/// socket: it writes requests, matches answers to them by request id, hands messages to
/// [`Client::incoming`] after de-duplication, acknowledges them (unless
/// [`ClientConfig::auto_ack`] is off), pings when idle and reconnects with backoff. It stops when
/// [`Client::close`] is called, when every clone is dropped, or when reconnecting cannot help
/// (then [`Event::Stopped`] says why).
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    commands: mpsc::UnboundedSender<Command>,
    incoming: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    shared: Arc<Shared>,
    request_timeout: Duration,
}

/// State the connection task publishes to the handles.
#[derive(Debug, Default)]
struct Shared {
    sync_version: AtomicU64,
    login: Mutex<Option<HelloOk>>,
}

#[derive(Debug)]
enum Command {
    Request {
        /// Boxed: bodies are large, the other commands small.
        body: Box<Body>,
        reply: oneshot::Sender<Result<Body>>,
    },
    Sync {
        reply: oneshot::Sender<Result<Body>>,
    },
    /// A request whose answer nobody waits for (Typing: answered only if refused).
    Notify {
        body: Box<Body>,
    },
    Ack {
        conversation_id: u64,
        seq: u64,
    },
    PushAck {
        push_id: u64,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// Which conversation a history request reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conversation {
    /// By conversation id.
    Id(u64),
    /// The user's conversation with a user or group.
    With(Target),
}

impl From<u64> for Conversation {
    fn from(id: u64) -> Self {
        Self::Id(id)
    }
}

impl From<Target> for Conversation {
    fn from(target: Target) -> Self {
        Self::With(target)
    }
}

/// The events of a client: messages (each (conversation, seq) once) and connection changes.
/// Ends (`None`) when the client stops.
///
/// The queue behind it is unbounded, so an application must keep reading it (or drop it).
#[derive(Debug)]
pub struct Incoming {
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Incoming {
    /// The next event; `None` once the client has stopped. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

impl futures_core::Stream for Incoming {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

/// A fresh client message id: 128 random bits in hex.
pub fn new_client_msg_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    crate::line::hex(&bytes)
}

/// The server's clock (`server_time_ms` of a HelloOk just read) minus this machine's.
fn clock_skew(server_time_ms: u64) -> i64 {
    i64::try_from(server_time_ms).unwrap_or(i64::MAX) - i64::try_from(now_ms()).unwrap_or(i64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Client {
    /// Connects to `config.server` and logs in. Fails without retrying if the first login fails
    /// (unreachable server, bad token...): reconnecting is for connections that were up.
    ///
    /// With [`Transport::Dual`](crate::Transport::Dual) it logs in over TCP (over QUIC if TCP
    /// fails) and adds the other path in the background ([`Event::PathUp`] says when).
    pub async fn connect(config: ClientConfig) -> Result<Self> {
        config.validate()?;
        let legs = legs(&config)?;
        let mut session = Session::new(&config);
        let mut first = None;
        let mut failure = None;
        for (i, leg) in legs.iter().enumerate() {
            let hello = session.hello(&config, false);
            match establish(&config, leg, &hello).await {
                Ok((conn, ok)) => {
                    session.on_login(&hello);
                    first = Some((i, conn, ok));
                    break;
                }
                Err(error) if error.is_permanent() => return Err(error),
                Err(error) => {
                    tracing::debug!(transport = %leg.transport, %error, "login failed");
                    failure = Some(error);
                }
            }
        }
        let Some((leg, conn, ok)) = first else {
            return Err(failure.unwrap_or(ClientError::Disconnected));
        };
        tracing::debug!(user = %ok.user_id, device = %ok.device_id, session = ok.session_id, "logged in");

        let shared = Arc::new(Shared::default());
        shared
            .sync_version
            .store(session.sync_version(), Ordering::Relaxed);
        let (session_id, server_time_ms) = (ok.session_id, ok.server_time_ms);
        *lock(&shared.login) = Some(ok);
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (events, event_rx) = mpsc::unbounded_channel();
        let driver = Driver {
            backoff: Backoff::new(config.backoff),
            config,
            legs,
            session_id,
            sync_leg: None,
            copies: HashMap::new(),
            session,
            commands: command_rx,
            events,
            pending: HashMap::new(),
            shared: shared.clone(),
            rooms: Rooms::default(),
            presence_leg: leg,
            notices: VecDeque::new(),
            sends: HashMap::new(),
            outbox: Vec::new(),
            refreshes: HashMap::new(),
            refresh_at: None,
            fetching: None,
            expired: false,
            clock_skew_ms: clock_skew(server_time_ms),
        };
        let request_timeout = driver.config.request_timeout;
        tokio::spawn(driver.run(leg, conn));
        Ok(Self {
            inner: Arc::new(Inner {
                commands,
                incoming: Mutex::new(Some(event_rx)),
                shared,
                request_timeout,
            }),
        })
    }

    /// The client's event stream. Only the first call gets the events; later calls return a
    /// stream that is already ended.
    pub fn incoming(&self) -> Incoming {
        match lock(&self.inner.incoming).take() {
            Some(rx) => Incoming { rx },
            None => {
                tracing::warn!("Client::incoming called twice; the second stream is empty");
                let (_, rx) = mpsc::unbounded_channel();
                Incoming { rx }
            }
        }
    }

    /// The HelloOk of the current (or last) connection: user id, device id, limits.
    pub fn login(&self) -> Option<HelloOk> {
        lock(&self.inner.shared.login).clone()
    }

    /// The sync position: the `user_version` of the last SyncDone (or the configured start).
    /// Store it to start the next process from it ([`ClientConfig::sync_version`]).
    pub fn sync_version(&self) -> u64 {
        self.inner.shared.sync_version.load(Ordering::Relaxed)
    }

    async fn call(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<Body>>) -> Command,
    ) -> Result<Body> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .commands
            .send(make(reply))
            .map_err(|_| ClientError::Closed)?;
        match tokio::time::timeout(self.inner.request_timeout, rx).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Err(_)) => Err(ClientError::Closed),
            Ok(Ok(result)) => result,
        }
    }

    /// Writes request `body` without waiting for an answer. Fails only if the client has
    /// stopped; while disconnected the request is dropped. A refusal by the server is logged.
    pub(crate) fn notify(&self, body: Body) -> Result<()> {
        self.inner
            .commands
            .send(Command::Notify {
                body: Box::new(body),
            })
            .map_err(|_| ClientError::Closed)
    }

    pub(crate) async fn request(&self, body: Body) -> Result<Body> {
        self.call(|reply| Command::Request {
            body: Box::new(body),
            reply,
        })
        .await
    }

    /// Sends a message with a fresh client message id and returns the server's SendAck.
    ///
    /// `content_type` is a `ContentType` number (`ContentType::Text as u32` for UTF-8 text).
    pub async fn send(
        &self,
        target: Target,
        content_type: u32,
        payload: impl Into<Bytes>,
    ) -> Result<SendAck> {
        self.send_with_id(new_client_msg_id(), target, content_type, payload)
            .await
    }

    /// Sends a message with the given client message id. A Send cut off by a lost connection,
    /// or made while the client reconnects, goes out again with the same id once it is
    /// connected, within [`ClientConfig::request_timeout`](crate::ClientConfig::request_timeout)
    /// of the call; the server stores the message once and answers a repeat with the original
    /// SendAck (`duplicate` set). Retrying with the same id after [`ClientError::Timeout`] (or
    /// [`ClientError::Disconnected`], with reconnects off) is safe for the same reason.
    pub async fn send_with_id(
        &self,
        client_msg_id: impl Into<String>,
        target: Target,
        content_type: u32,
        payload: impl Into<Bytes>,
    ) -> Result<SendAck> {
        self.send_message(tern_protocol::Send {
            client_msg_id: client_msg_id.into(),
            target: Some(target),
            content_type,
            custom_type: String::new(),
            payload: payload.into(),
            priority: false,
        })
        .await
    }

    /// Sends a fully built `Send` (e.g. with `custom_type`). An empty `client_msg_id` is
    /// replaced by a fresh one.
    pub async fn send_message(&self, mut send: tern_protocol::Send) -> Result<SendAck> {
        if send.client_msg_id.is_empty() {
            send.client_msg_id = new_client_msg_id();
        }
        match self.request(Body::Send(send)).await? {
            Body::SendAck(ack) => Ok(ack),
            other => Err(unexpected("SendAck", &other)),
        }
    }

    /// Acknowledges every message of `conversation_id` up to `seq`. Only needed with
    /// [`ClientConfig::auto_ack`] off. Fails only if the client has stopped; if disconnected the
    /// ack is dropped (the next sync re-delivers, and de-duplication hides what was seen).
    pub fn ack(&self, conversation_id: u64, seq: u64) -> Result<()> {
        self.inner
            .commands
            .send(Command::Ack {
                conversation_id,
                seq,
            })
            .map_err(|_| ClientError::Closed)
    }

    /// Acknowledges every server push up to `push_id` (only needed with auto-ack off).
    pub fn ack_push(&self, push_id: u64) -> Result<()> {
        self.inner
            .commands
            .send(Command::PushAck { push_id })
            .map_err(|_| ClientError::Closed)
    }

    /// Syncs now from the stored position; returns the new position once SyncDone arrived. The
    /// synced messages come through [`Client::incoming`] before the matching `SyncDone` event.
    pub async fn sync(&self) -> Result<u64> {
        match self.call(|reply| Command::Sync { reply }).await? {
            Body::SyncDone(done) => Ok(done.user_version),
            other => Err(unexpected("SyncDone", &other)),
        }
    }

    /// One page of a conversation's history: messages with `seq < before_seq` (0: from the
    /// latest), newest first, at most `limit` (0: the server's default). History is not
    /// de-duplicated against live messages and does not move the delivered cursor.
    pub async fn history(
        &self,
        conversation: impl Into<Conversation>,
        before_seq: u64,
        limit: u32,
    ) -> Result<HistoryPage> {
        let (conversation_id, target) = match conversation.into() {
            Conversation::Id(id) => (id, None),
            Conversation::With(target) => (0, Some(target)),
        };
        let body = Body::History(HistoryRequest {
            conversation_id,
            target,
            before_seq,
            limit,
        });
        match self.request(body).await? {
            Body::HistoryPage(page) => Ok(page),
            other => Err(unexpected("HistoryPage", &other)),
        }
    }

    /// Replaces the session's token with `token` (a newer one of the same user) before the
    /// current one expires, without reconnecting, and returns the new expiry (Unix seconds, also
    /// in [`Client::login`]'s `token_expires_at`). When the current token expires without a
    /// refresh, the server ends the session with Kick `EXPIRED` and the client stops
    /// ([`ClientError::Kicked`]), unless it has a [`TokenSource`](crate::TokenSource) to log in
    /// again with. The server refuses a token that is invalid, expired, revoked, of another user
    /// or bound to another device ([`ClientError::Server`] with `TOKEN_INVALID`, `TOKEN_EXPIRED`
    /// or `TOKEN_REVOKED`), and the session keeps its current token. Reconnects log in with the
    /// last accepted token; while the client is reconnecting, the call fails with
    /// [`ClientError::Disconnected`] and changes nothing.
    pub async fn refresh_token(&self, token: impl Into<String>) -> Result<u64> {
        match self
            .request(Body::Refresh(Refresh {
                token: token.into(),
            }))
            .await?
        {
            Body::RefreshOk(ok) => Ok(ok.token_expires_at),
            other => Err(unexpected("RefreshOk", &other)),
        }
    }

    /// Round trip to the server.
    pub async fn ping(&self) -> Result<Duration> {
        let start = Instant::now();
        match self
            .request(Body::Ping(Ping {
                client_time_ms: now_ms(),
            }))
            .await?
        {
            Body::Pong(_) => Ok(start.elapsed()),
            other => Err(unexpected("Pong", &other)),
        }
    }

    /// Flushes pending acks, closes the connection and stops the connection task. Requests still
    /// waiting fail with [`ClientError::Closed`]; the event stream ends.
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        if self.inner.commands.send(Command::Close { done }).is_ok() {
            let _ = rx.await;
        }
    }
}

pub(crate) fn unexpected(wanted: &str, got: &Body) -> ClientError {
    ClientError::Protocol(format!("expected {wanted}, got {}", got.name()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One way to the server: a transport, its address and how to open it.
#[derive(Debug)]
struct Leg {
    transport: Transport,
    server: String,
    connector: Arc<Connector>,
    /// Shared by the legs of a client: notified when a connection's queued bytes fall below
    /// [`HIGH_WATER`].
    drained: Arc<tokio::sync::Notify>,
}

/// The legs of a session: one, or a TCP and a QUIC one for the dual channel.
fn legs(config: &ClientConfig) -> Result<Vec<Leg>> {
    let drained = Arc::new(tokio::sync::Notify::new());
    config
        .paths()?
        .into_iter()
        .map(|(transport, server)| {
            let mut one = config.clone();
            one.transport = transport;
            one.server.clone_from(&server);
            Ok(Leg {
                transport,
                server,
                connector: Arc::new(Connector::new(&one)?),
                drained: drained.clone(),
            })
        })
        .collect()
}

/// The writing side of a connection: a task of its own, so that a connection whose network
/// stalls never holds up the client (or the other path of a dual-channel session). Aborted when
/// dropped.
#[derive(Debug)]
struct PathWriter {
    out: Option<mpsc::UnboundedSender<Bytes>>,
    queued: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl PathWriter {
    fn spawn(mut writer: Writer, drained: Arc<tokio::sync::Notify>) -> Self {
        let (out, mut rx) = mpsc::unbounded_channel::<Bytes>();
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = queued.clone();
        let task = tokio::spawn(async move {
            while let Some(buf) = rx.recv().await {
                writer.write_all(&buf).await?;
                let before = taken.fetch_sub(buf.len(), Ordering::Relaxed);
                if before >= HIGH_WATER && before - buf.len() < HIGH_WATER {
                    drained.notify_one();
                }
            }
            // The client closed this connection: leave cleanly.
            writer.shutdown().await
        });
        Self {
            out: Some(out),
            queued,
            task,
        }
    }

    fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn send(&self, buf: Bytes) -> Result<()> {
        let queued = self.queued.fetch_add(buf.len(), Ordering::Relaxed) + buf.len();
        if queued > MAX_QUEUED_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{queued} bytes written and not taken by the network: connection stalled"),
            )
            .into());
        }
        match &self.out {
            Some(out) => out.send(buf).map_err(|_| ClientError::Disconnected),
            None => Err(ClientError::Disconnected),
        }
    }

    /// Resolves when the writer task ends by itself, i.e. a write failed.
    async fn failed(&mut self) -> ClientError {
        match (&mut self.task).await {
            Ok(Err(e)) => e.into(),
            _ => ClientError::Disconnected,
        }
    }

    /// Lets the queued frames go out, then closes the sending direction (bounded).
    async fn close(mut self) {
        self.out = None;
        let _ = tokio::time::timeout(CLOSE_WAIT, &mut self.task).await;
    }
}

impl Drop for PathWriter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One live connection of the session (one path of a dual-channel session).
#[derive(Debug)]
struct Conn {
    reader: Reader,
    writer: PathWriter,
    rbuf: BytesMut,
    wbuf: BytesMut,
    codec: Codec,
    /// Encodes what is written, within the largest frame the server takes
    /// (`HelloOk.max_frame_bytes`) once it said, even where `codec` reads bigger ones.
    encoder: Codec,
    heartbeat: Duration,
    last_read: Instant,
    last_write: Instant,
    /// Requests written on this connection (pruned of answered ones on each tick).
    requests: Vec<u64>,
}

impl Conn {
    async fn read_more(&mut self) -> Result<()> {
        read_into(&mut self.reader, &mut self.rbuf).await
    }

    async fn read_frame(&mut self) -> Result<Frame> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.rbuf)? {
                return Ok(frame);
            }
            self.read_more().await?;
        }
    }

    /// Encodes `frame` into the write buffer; a frame over the server's limit is refused
    /// (`FrameTooLarge`) with nothing written, whatever this side accepts.
    fn queue(&mut self, frame: &Frame) -> Result<()> {
        Ok(self.encoder.encode(frame, &mut self.wbuf)?)
    }

    /// Hands what was queued to the writer task.
    fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.writer.send(self.wbuf.split().freeze())?;
            self.last_write = Instant::now();
        }
        Ok(())
    }

    /// The next thing that happens to this connection: bytes read (or the read failed), or
    /// its writer failed. Cancel-safe.
    async fn next_io(&mut self) -> Result<()> {
        let Self {
            reader,
            rbuf,
            writer,
            ..
        } = self;
        tokio::select! {
            read = read_into(reader, rbuf) => read,
            failed = writer.failed() => Err(failed),
        }
    }
}

/// Reads what is available into `rbuf`. Cancel-safe.
async fn read_into(reader: &mut Reader, rbuf: &mut BytesMut) -> Result<()> {
    if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
        rbuf.reserve(READ_CHUNK);
    }
    match reader.read_buf(rbuf).await? {
        0 => Err(ClientError::Disconnected),
        _ => Ok(()),
    }
}

/// [`Conn::next_io`] of a path that may be absent (then never ready).
async fn next_io(conn: Option<&mut Conn>) -> Result<()> {
    match conn {
        Some(conn) => conn.next_io().await,
        None => std::future::pending().await,
    }
}

/// Opens a connection over `leg` and logs in with `hello`. Frames that follow HelloOk stay in
/// the read buffer.
async fn establish(config: &ClientConfig, leg: &Leg, hello: &Frame) -> Result<(Conn, HelloOk)> {
    let login = async {
        let (reader, writer) = leg
            .connector
            .connect(&leg.server, config.connect_timeout)
            .await?;
        let mut conn = Conn {
            reader,
            writer: PathWriter::spawn(writer, leg.drained.clone()),
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::new(),
            codec: Codec::new(config.max_frame_bytes),
            encoder: Codec::new(config.max_frame_bytes),
            heartbeat: config.heartbeat_interval,
            last_read: Instant::now(),
            last_write: Instant::now(),
            requests: Vec::new(),
        };
        if matches!(&hello.body, Some(Body::Hello(h)) if h.sync_on_login) {
            // The login sync is answered on this connection.
            conn.requests.push(hello.request_id);
        }
        conn.queue(hello)?;
        conn.flush()?;
        let frame = conn.read_frame().await?;
        conn.last_read = Instant::now();
        match frame.body {
            Some(Body::HelloOk(ok)) => {
                if ok.max_frame_bytes > 0 {
                    let server_max = ok.max_frame_bytes as usize;
                    conn.codec = Codec::new(server_max.max(config.max_frame_bytes));
                    conn.encoder = Codec::new(server_max);
                }
                if ok.heartbeat_interval_ms > 0 {
                    conn.heartbeat = Duration::from_millis(ok.heartbeat_interval_ms.into());
                }
                Ok((conn, ok))
            }
            Some(Body::Error(e)) => Err(ClientError::from_wire(&e)),
            Some(Body::Kick(kick)) if kick_is_final(&kick) => Err(kicked(kick)),
            Some(Body::Kick(_)) => Err(ClientError::Disconnected),
            other => Err(ClientError::Protocol(format!(
                "expected HelloOk, got {}",
                other.as_ref().map_or("nothing", Body::name)
            ))),
        }
    };
    tokio::time::timeout(config.connect_timeout, login)
        .await
        .map_err(|_| ClientError::Timeout)?
}

fn kicked(kick: Kick) -> ClientError {
    ClientError::Kicked {
        reason: KickReason::try_from(kick.reason).unwrap_or(KickReason::Unspecified),
        message: kick.message,
    }
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The application closed the client (`done` is answered once the socket is shut).
    Closed(Option<oneshot::Sender<()>>),
    /// Lost; reconnecting may help.
    Lost(ClientError),
    /// Reconnecting cannot help (final kick, token revoked).
    Final(ClientError),
}

/// A path being added to the live session in the background (dual channel). Aborted when
/// dropped.
#[derive(Debug)]
struct Adding(tokio::task::JoinHandle<Result<(Conn, HelloOk)>>);

impl Drop for Adding {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Shortest wait between two refreshes (a source of very short tokens must not spin).
const MIN_REFRESH_DELAY: Duration = Duration::from_millis(500);

/// The token source's answer, once the fetch in `task` ends (never without one).
async fn next_token(
    task: &mut Option<tokio::task::JoinHandle<std::result::Result<String, String>>>,
) -> std::result::Result<String, String> {
    match task {
        Some(task) => match task.await {
            Ok(result) => result,
            Err(e) => Err(format!("token source task failed: {e}")),
        },
        None => std::future::pending().await,
    }
}

/// The next path added (or that failed to be), by leg. Never ready without an attempt.
async fn next_added(adding: &mut [Option<Adding>]) -> (usize, Result<(Conn, HelloOk)>) {
    std::future::poll_fn(|cx| {
        for (leg, slot) in adding.iter_mut().enumerate() {
            if let Some(Adding(task)) = slot
                && let Poll::Ready(done) = Pin::new(task).poll(cx)
            {
                *slot = None;
                let result = done.unwrap_or_else(|e| {
                    Err(ClientError::Protocol(format!("path task failed: {e}")))
                });
                return Poll::Ready((leg, result));
            }
        }
        Poll::Pending
    })
    .await
}

/// The connection task.
#[derive(Debug)]
struct Driver {
    config: ClientConfig,
    legs: Vec<Leg>,
    session: Session,
    /// The logical session (HelloOk.session_id) that further paths join.
    session_id: u64,
    /// The path the server last sent SyncNeeded on: the next sync goes there.
    sync_leg: Option<usize>,
    /// Sends written on several paths: how many of those paths may still answer.
    copies: HashMap<u64, usize>,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    pending: HashMap<u64, oneshot::Sender<Result<Body>>>,
    shared: Arc<Shared>,
    backoff: Backoff,
    /// The live rooms the application is in: each new connection enters them again.
    rooms: Rooms,
    /// The path whose connection follows the users the application follows (presence is
    /// pushed only to the connection that subscribed): the first of a session, until it is
    /// lost while the session goes on.
    presence_leg: usize,
    /// Request ids of the latest notifications ([`Command::Notify`]), to log their refusals.
    notices: VecDeque<u64>,
    /// The Sends in flight, by request id: sent again (same client message id) if the
    /// connection they were written on is lost.
    sends: HashMap<u64, Box<Body>>,
    /// Sends waiting for the next connection: those in flight when the session was lost, and
    /// those made while reconnecting. Their callers' `request_timeout` bounds the wait.
    outbox: Vec<(Box<Body>, oneshot::Sender<Result<Body>>)>,
    /// The tokens of the Refresh requests in flight, by request id: the one the server accepts
    /// becomes the token of the next logins.
    refreshes: HashMap<u64, String>,
    /// With a [`TokenSource`](crate::TokenSource): when to ask it for the next token.
    refresh_at: Option<tokio::time::Instant>,
    /// The token source's answer being awaited.
    fetching: Option<tokio::task::JoinHandle<std::result::Result<String, String>>>,
    /// The session ended because its token expired: the next login needs a fresh token.
    expired: bool,
    /// The server's clock minus this machine's, as of the last login (ms).
    clock_skew_ms: i64,
}

/// How long to wait before asking a token source again after it or the server refused.
const TOKEN_RETRY: Duration = Duration::from_secs(5);

/// The session's connections, by leg.
type Paths = Vec<Option<Conn>>;

impl Driver {
    async fn run(mut self, leg: usize, first: Conn) {
        let mut paths: Paths = self.legs.iter().map(|_| None).collect();
        paths[leg] = Some(first);
        loop {
            if paths.iter().all(Option::is_none) {
                match self.reconnect().await {
                    Some((leg, conn)) => paths[leg] = Some(conn),
                    None => return,
                }
            }
            let end = self.serve(&mut paths).await;
            self.session.on_disconnect();
            self.rooms.disconnected();
            match end {
                End::Closed(done) => {
                    self.fail_pending(&ClientError::Closed);
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                End::Final(error) => {
                    self.fail_pending(&error);
                    self.emit(Event::Stopped(error));
                    return;
                }
                End::Lost(error) => {
                    tracing::info!(%error, "connection lost");
                    if let ClientError::Kicked {
                        reason: KickReason::Expired,
                        ..
                    } = error
                    {
                        self.expired = true;
                    }
                    let held = if self.config.reconnect {
                        self.held_sends()
                    } else {
                        Vec::new()
                    };
                    self.fail_pending(&ClientError::Disconnected);
                    self.outbox = held;
                    self.emit(Event::Disconnected {
                        reason: error.clone(),
                    });
                    if !self.config.reconnect {
                        self.emit(Event::Stopped(error));
                        return;
                    }
                }
            }
        }
    }

    fn emit(&self, event: Event) {
        // The application may have dropped its stream; events are then discarded.
        let _ = self.events.send(event);
    }

    fn fail_pending(&mut self, error: &ClientError) {
        self.copies.clear();
        self.sends.clear();
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(error.clone()));
        }
        for (_, reply) in self.outbox.drain(..) {
            let _ = reply.send(Err(error.clone()));
        }
    }

    /// The session is lost: its Sends in flight, to wait for the next connection in the order
    /// they were made (with those already waiting).
    fn held_sends(&mut self) -> Vec<(Box<Body>, oneshot::Sender<Result<Body>>)> {
        let mut sends: Vec<(u64, Box<Body>)> = self.sends.drain().collect();
        sends.sort_unstable_by_key(|&(id, _)| id);
        let mut held = std::mem::take(&mut self.outbox);
        for (id, body) in sends {
            if let Some(reply) = self.pending.remove(&id) {
                held.push((body, reply));
            }
        }
        held
    }

    /// Makes Send request `body` for the caller waiting on `reply` (a Send kept for another
    /// connection, or the application's).
    fn request_send(&mut self, body: Box<Body>, reply: oneshot::Sender<Result<Body>>) {
        let id = self.session.request((*body).clone());
        self.sends.insert(id, body);
        self.pending.insert(id, reply);
    }

    /// Fails request `id`, which was not written: it cannot be sent (see [`Driver::pump`]).
    fn refuse(&mut self, id: u64, error: ClientError) {
        self.sends.remove(&id);
        self.copies.remove(&id);
        self.session.request_lost(id);
        let error = Err(error);
        if let Some(event) = self.rooms.answered(id, &error) {
            self.emit(event);
        }
        match (self.pending.remove(&id), error) {
            (Some(reply), error) => {
                let _ = reply.send(error);
            }
            (None, Err(error)) => tracing::warn!(request_id = id, %error, "request not sent"),
            (None, Ok(_)) => {}
        }
    }

    /// On a new connection: sends again what waited for it, unless its caller gave up.
    fn send_outbox(&mut self) {
        for (body, reply) in std::mem::take(&mut self.outbox) {
            if !reply.is_closed() {
                self.request_send(body, reply);
            }
        }
    }

    /// Waits out the backoff and logs in again (a new session), alternating between the legs
    /// of a dual-channel client; `None` if the client should stop.
    async fn reconnect(&mut self) -> Option<(usize, Conn)> {
        loop {
            let delay = self.backoff.next_delay();
            let attempt = self.backoff.attempts();
            tracing::debug!(?delay, attempt, "reconnecting");
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    command = self.commands.recv() => match command {
                        None => return None,
                        Some(Command::Close { done }) => {
                            let _ = done.send(());
                            return None;
                        }
                        Some(Command::Request { body, reply }) if matches!(*body, Body::Send(_)) => {
                            // Only Sends whose callers still wait are kept.
                            self.outbox.retain(|(_, reply)| !reply.is_closed());
                            self.outbox.push((body, reply));
                        }
                        Some(Command::Request { reply, .. } | Command::Sync { reply }) => {
                            let _ = reply.send(Err(ClientError::Disconnected));
                        }
                        Some(
                            Command::Ack { .. } | Command::PushAck { .. } | Command::Notify { .. },
                        ) => {}
                    },
                }
            }
            if self.expired
                && let Some(source) = self.config.token_source.clone()
            {
                match tokio::time::timeout(self.config.connect_timeout, source.fetch()).await {
                    Ok(Ok(token)) => {
                        self.config.token = token;
                        self.expired = false;
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "the token source gave no token");
                        continue;
                    }
                    Err(_) => {
                        tracing::warn!("the token source did not answer in time");
                        continue;
                    }
                }
            }
            let leg = attempt as usize % self.legs.len();
            let hello = self.session.hello(&self.config, true);
            let login = establish(&self.config, &self.legs[leg], &hello).await;
            match login.and_then(|(mut conn, ok)| {
                self.session.on_login(&hello);
                // Before anything else on the new connection, and before the application hears
                // of it: the rooms it is in, and the users it follows.
                self.enter_rooms(&mut conn, leg, true)?;
                self.follow_again(&mut conn, leg)?;
                Ok((conn, ok))
            }) {
                Ok((conn, ok)) => {
                    self.backoff.reset();
                    tracing::info!(session = ok.session_id, transport = %self.legs[leg].transport, "reconnected");
                    self.session_id = ok.session_id;
                    self.presence_leg = leg;
                    self.clock_skew_ms = clock_skew(ok.server_time_ms);
                    *lock(&self.shared.login) = Some(ok);
                    self.send_outbox();
                    self.emit(Event::Reconnected);
                    return Some((leg, conn));
                }
                Err(error)
                    if error.code() == Some(tern_protocol::ErrorCode::TokenExpired)
                        && self.config.token_source.is_some() =>
                {
                    tracing::info!("the token expired; asking the token source for a fresh one");
                    self.expired = true;
                }
                Err(error) if error.is_permanent() => {
                    tracing::warn!(%error, "cannot log in again; stopping");
                    self.emit(Event::Stopped(error));
                    return None;
                }
                Err(error) => tracing::debug!(%error, "reconnect failed"),
            }
        }
    }

    /// Queues an EnterRoom for each room the application is in on `conn`, the new connection
    /// of path `leg` (`new_session`: after a reconnect; otherwise a path joining the session).
    fn enter_rooms(&mut self, conn: &mut Conn, leg: usize, new_session: bool) -> Result<()> {
        let session = &mut self.session;
        for frame in self
            .rooms
            .enter_again(leg, new_session, |body| session.unqueued(body))
        {
            conn.queue(&frame)?;
        }
        Ok(())
    }

    /// Queues a SubscribePresence for the users the application follows on `conn`, the new
    /// connection of path `leg`, which carries presence from now on.
    fn follow_again(&mut self, conn: &mut Conn, leg: usize) -> Result<()> {
        for frame in self.session.follow_again(leg) {
            conn.queue(&frame)?;
        }
        Ok(())
    }

    /// Writes what the session queued and hands out events and answers. A `Send`, and an
    /// EnterRoom or LeaveRoom (room messages reach only the connections in the room), goes out
    /// on every path; anything else on one (a sync the server asked for on the path that
    /// asked, a SubscribePresence on the path that carries presence). Returns the paths whose
    /// writing failed.
    fn pump(&mut self, paths: &mut Paths) -> Vec<(usize, ClientError)> {
        let mut lost = Vec::new();
        let live: Vec<usize> = (0..paths.len()).filter(|&i| paths[i].is_some()).collect();
        if let Some(&primary) = live.first() {
            let sync_leg = self.sync_leg.take().filter(|leg| live.contains(leg));
            while let Some(frame) = self.session.poll_transmit() {
                let one = if matches!(frame.body, Some(Body::Send(_) | Body::Room(_))) {
                    None
                } else if self.session.is_sync(frame.request_id) {
                    Some(sync_leg.unwrap_or(primary))
                } else if matches!(frame.body, Some(Body::SubscribePresence(_))) {
                    Some(if live.contains(&self.presence_leg) {
                        self.presence_leg
                    } else {
                        primary
                    })
                } else {
                    Some(primary)
                };
                let mut refused = None;
                for &leg in &live {
                    if one.is_some_and(|one| one != leg) {
                        continue;
                    }
                    let Some(conn) = paths[leg].as_mut() else {
                        continue;
                    };
                    match conn.queue(&frame) {
                        Ok(()) if frame.request_id != 0 => conn.requests.push(frame.request_id),
                        Ok(()) => {}
                        // Over the server's frame limit (the same on every path): the request
                        // fails, nothing was written and the connection is fine.
                        Err(ClientError::Codec(CodecError::FrameTooLarge { len, max })) => {
                            refused = Some(ClientError::RequestTooLarge { len, max });
                            break;
                        }
                        Err(error) => lost.push((leg, error)),
                    }
                }
                if let Some(error) = refused {
                    self.refuse(frame.request_id, error);
                    continue;
                }
                if one.is_none() && live.len() > 1 && frame.request_id != 0 {
                    self.copies.insert(frame.request_id, live.len());
                }
            }
        }
        // Before the events: an application that saw SyncDone reads the new position.
        self.shared
            .sync_version
            .store(self.session.sync_version(), Ordering::Relaxed);
        while let Some(event) = self.session.poll_event() {
            self.emit(event);
        }
        while let Some((request_id, result)) = self.session.poll_completion() {
            // A request made on several paths is answered by its first success; an error only
            // once every copy failed (one copy may be refused, e.g. rate-limited, while the
            // other is stored). Later answers find no one waiting.
            if result.is_err()
                && let Some(left) = self.copies.get_mut(&request_id)
                && *left > 1
            {
                *left -= 1;
                continue;
            }
            self.copies.remove(&request_id);
            self.sends.remove(&request_id);
            if let Some(token) = self.refreshes.remove(&request_id) {
                match &result {
                    Ok(Body::RefreshOk(ok)) => {
                        self.config.token = token;
                        if let Some(login) = lock(&self.shared.login).as_mut() {
                            login.token_expires_at = ok.token_expires_at;
                        }
                        self.schedule_refresh(ok.token_expires_at);
                    }
                    Err(error) if self.config.token_source.is_some() => {
                        tracing::warn!(%error, "the server refused the fresh token");
                        self.refresh_at = Some(tokio::time::Instant::now() + TOKEN_RETRY);
                    }
                    _ => {}
                }
            }
            if let Some(event) = self.rooms.answered(request_id, &result) {
                self.emit(event);
            }
            let mut result = result;
            if let Ok(Body::RoomResponse(response)) = &mut result {
                self.session.admit_recent(response);
            }
            match (self.pending.remove(&request_id), result) {
                (Some(reply), result) => {
                    let _ = reply.send(result);
                }
                (None, Err(error)) if self.notices.contains(&request_id) => {
                    tracing::warn!(request_id, %error, "the server refused a notification");
                }
                // A request whose caller gave up, or the client's own.
                (None, _) => {}
            }
        }
        for (leg, conn) in paths.iter_mut().enumerate() {
            if let Some(conn) = conn
                && let Err(error) = conn.flush()
            {
                lost.push((leg, error));
            }
        }
        lost
    }

    fn command(&mut self, command: Command) -> Option<End> {
        match command {
            Command::Request { body, reply } if matches!(*body, Body::Send(_)) => {
                self.request_send(body, reply);
            }
            Command::Request { body, reply } => {
                let room = room_op(&body);
                let token = match &*body {
                    Body::Refresh(r) => Some(r.token.clone()),
                    _ => None,
                };
                let id = self.session.request(*body);
                if let Some(room) = room {
                    self.rooms.requested(id, room);
                }
                if let Some(token) = token {
                    // Refreshes cut off by a lost connection are never answered.
                    self.refreshes.retain(|id, _| self.pending.contains_key(id));
                    self.refreshes.insert(id, token);
                }
                self.pending.insert(id, reply);
            }
            Command::Sync { reply } => {
                let id = self.session.start_sync();
                self.pending.insert(id, reply);
            }
            Command::Notify { body } => {
                let id = self.session.request(*body);
                if self.notices.len() == NOTICES_KEPT {
                    self.notices.pop_front();
                }
                self.notices.push_back(id);
            }
            Command::Ack {
                conversation_id,
                seq,
            } => self.session.ack(conversation_id, seq),
            Command::PushAck { push_id } => self.session.ack_push(push_id),
            Command::Close { done } => return Some(End::Closed(Some(done))),
        }
        None
    }

    /// Serves the session until every path is lost, or it ends for good. A dual-channel
    /// session adds missing paths in the background, each leg with its own backoff.
    async fn serve(&mut self, paths: &mut Paths) -> End {
        let heartbeat = paths
            .iter()
            .flatten()
            .map(|c| c.heartbeat)
            .min()
            .unwrap_or(self.config.heartbeat_interval);
        let mut tick = tokio::time::interval((heartbeat / 4).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if self.fetching.is_none() {
            let expires_at = lock(&self.shared.login)
                .as_ref()
                .map_or(0, |l| l.token_expires_at);
            self.schedule_refresh(expires_at);
        }
        let dual = self.legs.len() > 1;
        let mut adding: Vec<Option<Adding>> = self.legs.iter().map(|_| None).collect();
        let mut backoffs: Vec<Backoff> = self
            .legs
            .iter()
            .map(|_| Backoff::new(self.config.backoff))
            .collect();
        // Missing paths are added at once.
        let mut retry_at: Vec<Option<tokio::time::Instant>> = paths
            .iter()
            .map(|p| (dual && p.is_none()).then(tokio::time::Instant::now))
            .collect();
        let mut lost = Vec::new();
        let mut end = None;
        // Frames that arrived together with HelloOk.
        for leg in 0..paths.len() {
            self.read_path(paths, leg, &mut lost, &mut end);
        }
        loop {
            // Lost paths go first, so that nothing more is written to them; then what is due
            // goes out (even when the session ends: the events and answers read before the end),
            // which may lose a path in turn.
            // Three rounds: a path lost in the second (by what the first wrote) may have had
            // requests to ask again on the path that is left, written by the second pump.
            for round in 0..3 {
                for (leg, error) in std::mem::take(&mut lost) {
                    let Some(conn) = paths[leg].take() else {
                        continue;
                    };
                    if paths.iter().all(Option::is_none) {
                        end = end.or(Some(End::Lost(error)));
                    } else {
                        self.path_lost(conn, leg, error);
                        retry_at[leg] =
                            Some(tokio::time::Instant::now() + backoffs[leg].next_delay());
                        if leg == self.presence_leg
                            && let Some(other) = paths.iter().position(Option::is_some)
                            && let Some(conn) = paths[other].as_mut()
                        {
                            // The users followed on the lost path are followed on the other.
                            self.presence_leg = other;
                            if let Err(error) =
                                self.follow_again(conn, other).and_then(|()| conn.flush())
                            {
                                lost.push((other, error));
                            }
                        }
                    }
                }
                if round < 2 {
                    lost.extend(self.pump(paths));
                }
            }
            if let Some(end) = end.take() {
                return self.finish(paths, end).await;
            }
            let now = tokio::time::Instant::now();
            for leg in 0..paths.len() {
                if paths[leg].is_none()
                    && adding[leg].is_none()
                    && retry_at[leg].is_some_and(|at| at <= now)
                {
                    retry_at[leg] = None;
                    let hello = self.session.path_hello(&self.config, self.session_id);
                    let config = self.config.clone();
                    let leg_ = Leg {
                        transport: self.legs[leg].transport,
                        server: self.legs[leg].server.clone(),
                        connector: self.legs[leg].connector.clone(),
                        drained: self.legs[leg].drained.clone(),
                    };
                    adding[leg] = Some(Adding(tokio::spawn(async move {
                        establish(&config, &leg_, &hello).await
                    })));
                }
            }
            let next_retry = (0..paths.len())
                .filter(|&leg| adding[leg].is_none())
                .filter_map(|leg| retry_at[leg])
                .min();
            let accepting = paths
                .iter()
                .flatten()
                .any(|c| c.writer.queued() < HIGH_WATER);
            let (first, rest) = paths.split_at_mut(1);
            let (refresh_at, fetching) = (self.refresh_at, self.fetching.is_some());
            tokio::select! {
                () = async {
                    match refresh_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if !fetching => {
                    self.refresh_at = None;
                    if let Some(source) = &self.config.token_source {
                        let (fetch, wait) = (source.fetch(), self.config.request_timeout);
                        self.fetching = Some(tokio::spawn(async move {
                            tokio::time::timeout(wait, fetch)
                                .await
                                .unwrap_or_else(|_| Err("no answer in time".to_owned()))
                        }));
                    }
                }
                token = next_token(&mut self.fetching), if fetching => {
                    self.fetching = None;
                    match token {
                        Ok(token) => {
                            let id = self.session.request(Body::Refresh(Refresh { token: token.clone() }));
                            self.refreshes.insert(id, token);
                        }
                        Err(error) => {
                            tracing::warn!(%error, "the token source gave no token");
                            self.refresh_at = Some(tokio::time::Instant::now() + TOKEN_RETRY);
                        }
                    }
                }
                () = self.legs[0].drained.notified(), if !accepting => {}
                command = self.commands.recv(), if accepting => match command {
                    // Every handle is gone: nobody can use the client any more.
                    None => end = Some(End::Closed(None)),
                    Some(command) => {
                        end = self.command(command);
                        // Take what else is queued, within a budget, before writing.
                        for _ in 0..64 {
                            if end.is_some() {
                                break;
                            }
                            match self.commands.try_recv() {
                                Ok(command) => end = self.command(command),
                                Err(_) => break,
                            }
                        }
                    }
                },
                io = next_io(first[0].as_mut()) => match io {
                    Ok(()) => self.read_path(paths, 0, &mut lost, &mut end),
                    Err(error) => lost.push((0, error)),
                },
                io = next_io(rest.first_mut().and_then(Option::as_mut)) => match io {
                    Ok(()) => self.read_path(paths, 1, &mut lost, &mut end),
                    Err(error) => lost.push((1, error)),
                },
                (leg, added) = next_added(&mut adding) => match added {
                    Ok((mut conn, ok)) if ok.session_id == self.session_id && paths[leg].is_none() => {
                        tracing::info!(transport = %self.legs[leg].transport, "path added");
                        backoffs[leg].reset();
                        if let Err(error) = self.enter_rooms(&mut conn, leg, false) {
                            lost.push((leg, error));
                        }
                        paths[leg] = Some(conn);
                        self.emit(Event::PathUp { transport: self.legs[leg].transport });
                        // Until now this path carried nothing: its first live message of a
                        // conversation may overtake earlier ones still on the other path, so it
                        // must not set where that conversation starts. A sync does (and
                        // meanwhile such messages wait, see `dedup`).
                        self.session.start_sync();
                        self.read_path(paths, leg, &mut lost, &mut end);
                    }
                    Ok((conn, _)) => conn.writer.close().await,
                    Err(error) if error.is_permanent() => {
                        tracing::warn!(transport = %self.legs[leg].transport, %error, "cannot add the path; going on without it");
                    }
                    Err(error) => {
                        tracing::debug!(transport = %self.legs[leg].transport, %error, "adding the path failed");
                        retry_at[leg] = Some(tokio::time::Instant::now() + backoffs[leg].next_delay());
                    }
                },
                () = async {
                    match next_retry {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = tick.tick() => {
                    for (leg, conn) in paths.iter_mut().enumerate() {
                        let Some(conn) = conn else { continue };
                        if conn.last_read.elapsed() >= conn.heartbeat * 3 {
                            lost.push((leg, ClientError::Timeout));
                        } else if conn.last_write.elapsed() >= conn.heartbeat {
                            // Idle: the Pong also proves the path is alive (checked above).
                            let ping = self.session.ping(now_ms());
                            if let Err(error) = conn.queue(&ping) {
                                lost.push((leg, error));
                            }
                        }
                        let (pending, session, refreshes) =
                            (&self.pending, &self.session, &self.refreshes);
                        conn.requests.retain(|id| {
                            pending.contains_key(id)
                                || session.is_sync(*id)
                                || refreshes.contains_key(id)
                        });
                    }
                    // Requests whose caller gave up (timeout) need no answer.
                    self.pending.retain(|_, reply| !reply.is_closed());
                    let pending = &self.pending;
                    self.copies.retain(|id, _| pending.contains_key(id));
                    self.sends.retain(|id, _| pending.contains_key(id));
                }
            }
        }
    }

    /// Decodes and handles every whole frame read on path `leg`. A Kick or fatal Error ends
    /// that path (`lost`), or the session if reconnecting cannot help (`end`).
    fn read_path(
        &mut self,
        paths: &mut Paths,
        leg: usize,
        lost: &mut Vec<(usize, ClientError)>,
        end: &mut Option<End>,
    ) {
        let Some(conn) = paths[leg].as_mut() else {
            return;
        };
        conn.last_read = Instant::now();
        loop {
            match conn.codec.decode(&mut conn.rbuf) {
                Ok(Some(frame)) => self.session.handle_frame(frame),
                Ok(None) => break,
                Err(error) => {
                    lost.push((leg, error.into()));
                    break;
                }
            }
        }
        if self.session.take_sync_needed() {
            self.sync_leg = Some(leg);
        }
        self.session.flush_acks();
        match self.check_session() {
            Some(End::Lost(error)) => {
                self.session.clear_path_end();
                lost.push((leg, error));
            }
            Some(other) => *end = end.take().or(Some(other)),
            None => {}
        }
    }

    /// One path of a session that goes on over another is gone: what was asked on it only is
    /// asked again on the paths left (a sync, a Send: same client message id) or fails with
    /// [`ClientError::Disconnected`]; a Send also made on another path waits for that path's
    /// answer.
    fn path_lost(&mut self, conn: Conn, leg: usize, reason: ClientError) {
        let transport = self.legs[leg].transport;
        tracing::info!(%transport, %reason, "path lost; the session goes on");
        for id in &conn.requests {
            if let Some(left) = self.copies.get_mut(id)
                && *left > 1
            {
                *left -= 1;
                continue;
            }
            self.copies.remove(id);
            if let Some(token) = self.refreshes.remove(id) {
                // A Refresh goes again on the paths that are left.
                let again = self.session.request(Body::Refresh(Refresh {
                    token: token.clone(),
                }));
                self.refreshes.insert(again, token);
                if let Some(reply) = self.pending.remove(id) {
                    self.pending.insert(again, reply);
                }
            } else if let Some(again) = self.session.sync_lost(*id) {
                if let Some(reply) = self.pending.remove(id) {
                    self.pending.insert(again, reply);
                }
            } else if let Some(body) = self.sends.remove(id) {
                // A Send goes again on the paths that are left.
                if let Some(reply) = self.pending.remove(id) {
                    self.request_send(body, reply);
                }
            } else if let Some(reply) = self.pending.remove(id) {
                let error = Err(ClientError::Disconnected);
                self.rooms.answered(*id, &error);
                self.session.request_lost(*id);
                let _ = reply.send(error);
            }
        }
        self.rooms.path_lost(leg);
        self.session.presence_path_lost(leg);
        drop(conn);
        self.emit(Event::PathDown { transport, reason });
    }

    /// With a token source: asks it for the next token when a tenth of the lifetime of the
    /// token expiring at `expires_at` (Unix seconds), at least a second, is left.
    fn schedule_refresh(&mut self, expires_at: u64) {
        if self.config.token_source.is_none() || expires_at == 0 {
            return;
        }
        // By the server's clock, which decides.
        let server_now = now_ms().saturating_add_signed(self.clock_skew_ms);
        let left = expires_at.saturating_mul(1000).saturating_sub(server_now);
        let margin = (left / 10).max(1000);
        let delay = Duration::from_millis(left.saturating_sub(margin)).max(MIN_REFRESH_DELAY);
        self.refresh_at = Some(tokio::time::Instant::now() + delay);
    }

    fn check_session(&self) -> Option<End> {
        if let Some(kick) = self.session.kick() {
            let error = kicked(kick.clone());
            let expired = kick.reason == KickReason::Expired as i32;
            return Some(if expired && self.config.token_source.is_some() {
                // Logs in again with a fresh token.
                End::Lost(error)
            } else if kick_is_final(kick) {
                End::Final(error)
            } else {
                End::Lost(error)
            });
        }
        let error = self.session.fatal()?.clone();
        Some(if error.is_permanent() {
            End::Final(error)
        } else {
            End::Lost(error)
        })
    }

    /// Ends the session: on close, sends the acks that are due and closes each connection
    /// after its last frames; otherwise drops the connections.
    async fn finish(&mut self, paths: &mut Paths, end: End) -> End {
        if matches!(end, End::Closed(_)) {
            self.session.flush_acks();
            let _ = self.pump(paths);
        }
        let conns: Vec<Conn> = paths.iter_mut().filter_map(Option::take).collect();
        if matches!(end, End::Closed(_)) {
            let closing: Vec<_> = conns
                .into_iter()
                .map(|c| tokio::spawn(c.writer.close()))
                .collect();
            for close in closing {
                let _ = close.await;
            }
        }
        end
    }
}
