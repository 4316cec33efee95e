//! The client handle and the connection task that drives the session over a transport.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::{Bytes, BytesMut};
use rand::RngCore;
use tern_protocol::{
    Body, Codec, Frame, HelloOk, HistoryPage, HistoryRequest, Kick, KickReason, Ping, SendAck,
    Target,
};
use tokio::sync::{mpsc, oneshot};

use crate::{
    Backoff, ClientConfig, ClientError, Event, Result,
    session::{Session, kick_is_final},
    transport::{Connector, Reader, Writer},
};

/// Read buffer growth step. The buffer is reused for the connection's lifetime.
const READ_CHUNK: usize = 16 * 1024;

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
        body: Body,
        reply: oneshot::Sender<Result<Body>>,
    },
    Sync {
        reply: oneshot::Sender<Result<Body>>,
    },
    Ack {
        conversation_id: u64,
        seq: u64,
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

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Client {
    /// Connects to `config.server` and logs in. Fails without retrying if the first login fails
    /// (unreachable server, bad token...): reconnecting is for connections that were up.
    pub async fn connect(config: ClientConfig) -> Result<Self> {
        config.validate()?;
        let connector = Connector::new(&config)?;
        let mut session = Session::new(&config);
        let (conn, ok) = establish(&config, &connector, &mut session, false).await?;
        session.on_login(&ok, config.sync_on_login);
        tracing::debug!(user = %ok.user_id, device = %ok.device_id, session = ok.session_id, "logged in");

        let shared = Arc::new(Shared::default());
        shared
            .sync_version
            .store(session.sync_version(), Ordering::Relaxed);
        *lock(&shared.login) = Some(ok);
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (events, event_rx) = mpsc::unbounded_channel();
        let driver = Driver {
            backoff: Backoff::new(config.backoff),
            config,
            connector,
            session,
            commands: command_rx,
            events,
            pending: HashMap::new(),
            shared: shared.clone(),
        };
        let request_timeout = driver.config.request_timeout;
        tokio::spawn(driver.run(conn));
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

    async fn request(&self, body: Body) -> Result<Body> {
        self.call(|reply| Command::Request { body, reply }).await
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

    /// Sends a message with the given client message id. Retrying with the same id after
    /// [`ClientError::Disconnected`] or [`ClientError::Timeout`] is safe: the server stores the
    /// message once and answers with the original SendAck (`duplicate` set).
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

fn unexpected(wanted: &str, got: &Body) -> ClientError {
    ClientError::Protocol(format!("expected {wanted}, got {}", got.name()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One live connection: the transport halves and their buffers.
#[derive(Debug)]
struct Conn {
    reader: Reader,
    writer: Writer,
    rbuf: BytesMut,
    wbuf: BytesMut,
    codec: Codec,
    heartbeat: Duration,
}

impl Conn {
    async fn read_more(&mut self) -> Result<()> {
        if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        match self.reader.read_buf(&mut self.rbuf).await? {
            0 => Err(ClientError::Disconnected),
            _ => Ok(()),
        }
    }

    async fn read_frame(&mut self) -> Result<Frame> {
        loop {
            if let Some(frame) = self.codec.decode(&mut self.rbuf)? {
                return Ok(frame);
            }
            self.read_more().await?;
        }
    }

    fn queue(&mut self, frame: &Frame) -> Result<()> {
        Ok(self.codec.encode(frame, &mut self.wbuf)?)
    }

    async fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            self.writer.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        Ok(())
    }
}

/// Opens a transport and logs in. Frames that follow HelloOk stay in the read buffer.
async fn establish(
    config: &ClientConfig,
    connector: &Connector,
    session: &mut Session,
    resume: bool,
) -> Result<(Conn, HelloOk)> {
    let login = async {
        let (reader, writer) = connector
            .connect(&config.server, config.connect_timeout)
            .await?;
        let mut conn = Conn {
            reader,
            writer,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::new(),
            codec: Codec::new(config.max_frame_bytes),
            heartbeat: config.heartbeat_interval,
        };
        let hello = session.hello(config, resume);
        conn.queue(&hello)?;
        conn.flush().await?;
        let frame = conn.read_frame().await?;
        match frame.body {
            Some(Body::HelloOk(ok)) => {
                if ok.max_frame_bytes > 0 {
                    let server_max = ok.max_frame_bytes as usize;
                    conn.codec = Codec::new(server_max.max(config.max_frame_bytes));
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

/// The connection task.
#[derive(Debug)]
struct Driver {
    config: ClientConfig,
    connector: Connector,
    session: Session,
    commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    pending: HashMap<u64, oneshot::Sender<Result<Body>>>,
    shared: Arc<Shared>,
    backoff: Backoff,
}

impl Driver {
    async fn run(mut self, first: Conn) {
        let mut next = Some(first);
        loop {
            let conn = match next.take() {
                Some(conn) => conn,
                None => match self.reconnect().await {
                    Some(conn) => conn,
                    None => return,
                },
            };
            let end = self.serve(conn).await;
            self.session.on_disconnect();
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
                    self.fail_pending(&ClientError::Disconnected);
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
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(error.clone()));
        }
    }

    /// Waits out the backoff and logs in again; `None` if the client should stop.
    async fn reconnect(&mut self) -> Option<Conn> {
        loop {
            let delay = self.backoff.next_delay();
            tracing::debug!(?delay, attempt = self.backoff.attempts(), "reconnecting");
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
                        Some(Command::Request { reply, .. } | Command::Sync { reply }) => {
                            let _ = reply.send(Err(ClientError::Disconnected));
                        }
                        Some(Command::Ack { .. }) => {}
                    },
                }
            }
            match establish(&self.config, &self.connector, &mut self.session, true).await {
                Ok((conn, ok)) => {
                    self.backoff.reset();
                    self.session.on_login(&ok, true);
                    tracing::info!(session = ok.session_id, "reconnected");
                    *lock(&self.shared.login) = Some(ok);
                    self.emit(Event::Reconnected);
                    return Some(conn);
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

    /// Writes what the session queued and hands out events and answers.
    async fn pump(&mut self, conn: &mut Conn) -> Result<()> {
        while let Some(frame) = self.session.poll_transmit() {
            conn.queue(&frame)?;
        }
        while let Some(event) = self.session.poll_event() {
            self.emit(event);
        }
        while let Some((request_id, result)) = self.session.poll_completion() {
            if let Some(reply) = self.pending.remove(&request_id) {
                let _ = reply.send(result);
            }
        }
        self.shared
            .sync_version
            .store(self.session.sync_version(), Ordering::Relaxed);
        conn.flush().await
    }

    fn command(&mut self, command: Command) -> Option<End> {
        match command {
            Command::Request { body, reply } => {
                let id = self.session.request(body);
                self.pending.insert(id, reply);
            }
            Command::Sync { reply } => {
                let id = self.session.start_sync();
                self.pending.insert(id, reply);
            }
            Command::Ack {
                conversation_id,
                seq,
            } => self.session.ack(conversation_id, seq),
            Command::Close { done } => return Some(End::Closed(Some(done))),
        }
        None
    }

    async fn serve(&mut self, mut conn: Conn) -> End {
        let heartbeat = conn.heartbeat;
        let mut tick = tokio::time::interval((heartbeat / 4).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_read = Instant::now();
        let mut last_write = Instant::now();
        // Frames that arrived together with HelloOk.
        let mut end = self.handle_read(&mut conn).err();
        loop {
            if end.is_none() {
                if self.session.has_transmit() {
                    last_write = Instant::now();
                }
                if let Err(error) = self.pump(&mut conn).await {
                    end = Some(End::Lost(error));
                }
            }
            if end.is_none() {
                end = self.check_session();
            }
            if let Some(end) = end.take() {
                return self.finish(conn, end).await;
            }
            tokio::select! {
                command = self.commands.recv() => match command {
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
                read = conn.read_more() => match read {
                    Ok(()) => {
                        last_read = Instant::now();
                        end = self.handle_read(&mut conn).err();
                    }
                    Err(error) => end = Some(End::Lost(error)),
                },
                _ = tick.tick() => {
                    if last_read.elapsed() >= heartbeat * 3 {
                        end = Some(End::Lost(ClientError::Timeout));
                    } else if last_write.elapsed() >= heartbeat {
                        // Idle: the Pong also proves the server is alive (checked above).
                        self.session.ping(now_ms());
                    }
                    // Requests whose caller gave up (timeout) need no answer.
                    self.pending.retain(|_, reply| !reply.is_closed());
                }
            }
        }
    }

    /// Decodes and handles every whole frame in the read buffer.
    fn handle_read(&mut self, conn: &mut Conn) -> Result<(), End> {
        loop {
            match conn.codec.decode(&mut conn.rbuf) {
                Ok(Some(frame)) => self.session.handle_frame(frame),
                Ok(None) => break,
                Err(error) => return Err(End::Lost(error.into())),
            }
        }
        self.session.flush_acks();
        Ok(())
    }

    fn check_session(&self) -> Option<End> {
        if let Some(kick) = self.session.kick() {
            let error = kicked(kick.clone());
            return Some(if kick_is_final(kick) {
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

    async fn finish(&mut self, mut conn: Conn, end: End) -> End {
        if matches!(end, End::Closed(_)) {
            // Leave cleanly: send the acks that are due, then close our direction.
            self.session.flush_acks();
            let _ = self.pump(&mut conn).await;
            let _ = conn.writer.shutdown().await;
        }
        end
    }
}
