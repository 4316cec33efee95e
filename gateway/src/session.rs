//! Connections: accept, login, hand-off to the user's core, and the logged-in session.
//!
//! A connection is read by one task (requests, in order) and written by another (responses and
//! live deliveries from the session's bounded [`Outbound`](crate::outbound::Outbound) queue).
//! Reads go through the core's scratch buffer, so an idle connection holds no read buffer.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use futures_lite::future;
use glommio::net::{TcpListener, TcpStream};
use tern_protocol::v1::group_request::Op as GroupOp;
use tern_protocol::v1::room_request::Op as RoomOp;
use tern_protocol::v1::{
    ConversationState, Deliver, HelloOk, HistoryPage, HistoryRequest, Pong, RefreshOk,
    SyncConversations, SyncDone, SyncMessages, SyncNeeded, Target, TargetKind, frame::Body,
};
use tern_protocol::v1::{GroupRequest, RoomRequest, RoomResponse};
use tern_protocol::{
    CodecError, ContentType, ErrorCode, Frame, KickReason, PROTOCOL_VERSION, RESERVED_TYPE_PREFIX,
};
use tern_storage::{
    ConversationInfo, ConversationKind, GroupId, Peer, StoredMessage, UserId, conversation_kind,
};
use tracing::{Instrument, debug, info, warn};

use crate::core::{
    AppendMsg, ConnCount, Core, Login, Park, Recipient, ReplyTo, SessionHandle, ShardMsg, now_ms,
};
use crate::groups::{GroupJob, GroupWhat, HiddenOp};
use crate::limits::{ConnSlot, Gcra, Refused, mono_nanos};
use crate::outbound::Outbound;
use crate::rooms::{Entered, MAX_ROOMS_PER_CONNECTION, RoomSend, is_room, room_conversation};
use crate::token::{self, valid_id};
use crate::transport::{Relay, Transport};

type Stream = Rc<RefCell<Transport>>;

/// Accepts connections until shutdown. Hitting the open-file limit is reported (once a second)
/// and waited out instead of spinning on accept.
pub async fn accept_loop(core: Rc<Core>, listener: TcpListener) {
    let mut last_limit_warning: Option<std::time::Instant> = None;
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            core.stopped().await;
            None
        })
        .await;
        match accepted {
            None => break,
            Some(Ok(stream)) => {
                let core = core.clone();
                let count = ConnCount::new(&core);
                glommio::spawn_local(async move {
                    let peer = stream.peer_addr().ok();
                    let span = tracing::info_span!("conn", core = core.id, peer = ?peer);
                    let _ = stream.set_nodelay(true);
                    let transport = Transport::Tcp(stream);
                    match core.conn_limits.admit(peer.map(|p| p.ip())) {
                        Ok(slot) => {
                            handle_new(core, transport, count, slot)
                                .instrument(span)
                                .await
                        }
                        Err(refused) => refuse(&core, transport, refused).instrument(span).await,
                    }
                })
                .detach();
            }
            Some(Err(e)) => {
                let io: std::io::Error = e.into();
                let code = io.raw_os_error();
                if code == Some(libc::EMFILE) || code == Some(libc::ENFILE) {
                    let now = std::time::Instant::now();
                    if last_limit_warning.is_none_or(|t| now.duration_since(t).as_secs() >= 1) {
                        let (soft, _) = open_file_limit();
                        warn!(
                            core = core.id,
                            limit = soft,
                            "open-file limit reached (ulimit -n = {soft}): not accepting new \
                             connections until some close"
                        );
                        last_limit_warning = Some(now);
                    }
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                } else {
                    warn!(core = core.id, error = %io, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

pub fn open_file_limit() -> (u64, u64) {
    crate::sys::rlimit(libc::RLIMIT_NOFILE)
}

/// Reads once into the core's scratch buffer and appends what arrived to `inbuf`.
async fn read_some(core: &Core, stream: &Stream, inbuf: &mut BytesMut) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut scratch = core.read_scratch.borrow_mut();
        let mut s = stream.borrow_mut();
        match s.poll_read(cx, &mut scratch[..]) {
            Poll::Ready(Ok(n)) => {
                inbuf.extend_from_slice(&scratch[..n]);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    })
    .await
}

async fn write_all(stream: &Stream, buf: &[u8]) -> std::io::Result<()> {
    write_all_within(stream, buf, Duration::MAX).await
}

/// Writes to a plain TCP socket what it takes without waiting, and returns how much that was
/// (0 for the other transports: their writes may need a flush, and go through
/// [`write_all_within`]).
fn write_now(stream: &Stream, buf: &[u8]) -> std::io::Result<usize> {
    let mut s = stream.borrow_mut();
    if !matches!(&*s, Transport::Tcp(_)) {
        return Ok(0);
    }
    // Nothing waits on this context: a write that would block is retried with a real waker.
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut n = 0;
    while n < buf.len() {
        match s.poll_write(&mut cx, &buf[n..]) {
            Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(k)) => n += k,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok(n)
}

/// Writes all of `buf`, failing with `TimedOut` if the socket accepts nothing for `stall`.
async fn write_all_within(stream: &Stream, mut buf: &[u8], stall: Duration) -> std::io::Result<()> {
    while !buf.is_empty() {
        let mut write = std::pin::pin!(std::future::poll_fn(|cx| {
            stream.borrow_mut().poll_write(cx, buf)
        }));
        // The timer is armed only when the socket is full, not on every write.
        let n = match future::poll_once(write.as_mut()).await {
            Some(r) => r?,
            None if stall == Duration::MAX => write.await?,
            None => {
                future::or(write, async {
                    glommio::timer::sleep(stall).await;
                    Err(std::io::ErrorKind::TimedOut.into())
                })
                .await?
            }
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    // TLS keeps records buffered until flushed.
    std::future::poll_fn(|cx| stream.borrow_mut().poll_flush(cx)).await?;
    Ok(())
}

/// Sends a last frame, then closes so that the peer reads it: shut down writing and drain what
/// the peer still sends for a short while (closing with unread input would reset the connection
/// and could destroy the frame in flight).
async fn close_with(core: &Core, stream: &Stream, frame: &Frame) {
    let bytes = core.encode(frame);
    let _ = future::or(
        async {
            if write_all(stream, &bytes).await.is_ok() {
                stream.borrow_mut().shutdown(std::net::Shutdown::Write);
                let mut sink = BytesMut::new();
                let mut total = 0usize;
                while total < (1 << 20) {
                    sink.clear();
                    match read_some(core, stream, &mut sink).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                }
            }
        },
        glommio::timer::sleep(Duration::from_millis(500)),
    )
    .await;
}

/// Tells a connection over a connection limit why, and closes it without waiting for the peer:
/// under a flood of connections the descriptor is what is scarce.
async fn refuse(core: &Core, stream: Transport, refused: Refused) {
    debug!(?refused, "connection refused");
    let stream: Stream = Rc::new(RefCell::new(stream));
    let frame = Frame::error(0, ErrorCode::ConnectionLimit, refused.message(), true);
    let bytes = core.encode(&frame);
    let _ = future::or(async { write_all(&stream, &bytes).await.is_ok() }, async {
        glommio::timer::sleep(Duration::from_millis(100)).await;
        false
    })
    .await;
    stream.borrow_mut().shutdown(std::net::Shutdown::Write);
}

enum First {
    Frame(Frame),
    Bad(CodecError),
    Closed,
    Timeout,
}

/// A new connection: wait for Hello, check it, and move the connection to its user's core.
async fn handle_new(core: Rc<Core>, stream: Transport, count: ConnCount, slot: ConnSlot) {
    let stream: Stream = Rc::new(RefCell::new(stream));
    let mut inbuf = BytesMut::new();
    let mut codec = core.codec;
    let first = future::or(
        async {
            loop {
                match codec.decode(&mut inbuf) {
                    Ok(Some(f)) => return First::Frame(f),
                    Ok(None) => {}
                    Err(e) => return First::Bad(e),
                }
                match read_some(&core, &stream, &mut inbuf).await {
                    Ok(0) | Err(_) => return First::Closed,
                    Ok(_) => {}
                }
            }
        },
        async {
            glommio::timer::sleep(core.cfg.login_timeout()).await;
            First::Timeout
        },
    )
    .await;
    let frame = match first {
        First::Frame(f) => f,
        First::Closed => {
            return;
        }
        First::Timeout => {
            debug!("login timeout");
            let f = Frame::error(
                0,
                ErrorCode::LoginTimeout,
                "no Hello within the login timeout",
                true,
            );
            close_with(&core, &stream, &f).await;
            return;
        }
        First::Bad(e) => {
            debug!(error = %e, "bad first frame");
            close_with(&core, &stream, &e.to_frame()).await;
            return;
        }
    };
    let request_id = frame.request_id;
    let login = match check_hello(&core, frame) {
        Ok(l) => l,
        Err((code, msg)) => {
            debug!(?code, msg, "login refused");
            close_with(&core, &stream, &Frame::error(request_id, code, msg, true)).await;
            return;
        }
    };
    let owner = core.router.user(&login.user).core;
    if owner == core.id {
        // A task of its own, so the login phase's state is freed rather than kept as part of a
        // long-lived session's future.
        glommio::spawn_local(run_session(Start {
            core,
            stream,
            inbuf,
            login,
            count,
            slot: Some(slot),
            span: tracing::Span::current(),
        }))
        .detach();
        return;
    }
    let transport = Rc::try_unwrap(stream)
        .map(RefCell::into_inner)
        .expect("the login phase holds the only reference");
    match transport {
        Transport::Tcp(tcp) => {
            // Move the socket (and whatever was read after Hello) to the user's core.
            let fd = match crate::sys::dup_stream(&tcp) {
                Ok(fd) => fd,
                Err(e) => {
                    warn!(error = %e, "cannot move connection to its core");
                    let stream = Rc::new(RefCell::new(Transport::Tcp(tcp)));
                    let f = Frame::error(request_id, ErrorCode::Internal, "server error", true);
                    close_with(&core, &stream, &f).await;
                    return;
                }
            };
            drop(tcp);
            drop(count);
            core.send_to_core(
                owner,
                ShardMsg::Adopt {
                    fd,
                    leftover: inbuf.to_vec(),
                    login,
                    slot,
                },
            )
            .await;
        }
        // A QUIC connection or a TLS session stays here (its packets arrive here, its TLS
        // state lives here); its bytes are relayed to the session on the user's core. This
        // task, and with it the connection count and slot, lives as long as the relay.
        Transport::Quic { send, recv, conn } => {
            let relay = open_relay(&core, owner, &inbuf, login).await;
            crate::transport::run_quic_end(relay, send, recv, conn).await;
            drop((count, slot));
        }
        Transport::Tls(tls) => {
            let relay = open_relay(&core, owner, &inbuf, login).await;
            crate::transport::run_tls_end(relay, *tls).await;
            drop((count, slot));
        }
        Transport::Relay(_) => unreachable!("relays are created after login"),
    }
}

/// Opens this core's end of a relay to `owner` and has `owner` run the session on the other
/// end, starting with what was read after Hello.
async fn open_relay(core: &Rc<Core>, owner: usize, inbuf: &BytesMut, login: Login) -> Rc<Relay> {
    let id = core.new_session_id();
    let relay = Relay::open(core, id, owner);
    core.send_to_core(
        owner,
        ShardMsg::AdoptRelay {
            id,
            from: core.id,
            leftover: inbuf.to_vec(),
            login,
        },
    )
    .await;
    relay
}

fn check_hello(core: &Core, frame: Frame) -> Result<Login, (ErrorCode, &'static str)> {
    let hello = match frame.body {
        Some(Body::Hello(h)) => h,
        _ => return Err((ErrorCode::Unauthenticated, "the first frame must be Hello")),
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err((
            ErrorCode::UnsupportedVersion,
            "unsupported protocol_version (this server speaks 1)",
        ));
    }
    if !valid_id(&hello.device_id) {
        return Err((
            ErrorCode::InvalidArgument,
            "device_id must be 1..=64 bytes without control characters",
        ));
    }
    let claims = check_token(core, &hello.token, &hello.device_id)?;
    Ok(Login {
        user: claims.sub,
        device: hello.device_id,
        request_id: frame.request_id,
        sync_version: hello.sync_version,
        sync_on_login: hello.sync_on_login,
        sync_max: hello.sync_max_messages_per_conversation,
        resume: hello.resume_session_id,
        platform: hello.platform,
        token_expires_at: claims.exp,
    })
}

/// Whether `token` lets `device` log in (Hello) or stay logged in (Refresh): signed by this
/// server, not expired, bound to no other device, its user not banned and the token not revoked.
pub(crate) fn check_token(
    core: &Core,
    token: &str,
    device: &str,
) -> Result<token::Claims, (ErrorCode, &'static str)> {
    let claims = token::verify(&core.secret, token, token::now_secs()).map_err(|e| {
        (
            e.code(),
            match e {
                token::TokenError::Expired => "token has expired",
                token::TokenError::BadSignature => "token signature is wrong",
                _ => "token is malformed",
            },
        )
    })?;
    if claims.dev.as_deref().is_some_and(|dev| dev != device) {
        return Err((
            ErrorCode::TokenInvalid,
            "the token is bound to another device_id",
        ));
    }
    if crate::admin::banned(&*core.store, &claims.sub, now_ms()) {
        return Err((ErrorCode::TokenRevoked, "the user is banned"));
    }
    if crate::admin::revoked(&*core.store, &claims.sub, claims.iat_ms) {
        return Err((ErrorCode::TokenRevoked, "the token was revoked"));
    }
    Ok(claims)
}

/// A connection handed over by another core. A plain function returning the session's future
/// (not an `async fn`): an async wrapper would keep its own copy of the arguments beside the
/// session's state for as long as the connection lives.
pub fn run_adopted(
    core: Rc<Core>,
    stream: TcpStream,
    leftover: Vec<u8>,
    login: Login,
    slot: ConnSlot,
) -> impl Future<Output = ()> {
    let count = ConnCount::new(&core);
    let span =
        tracing::info_span!("conn", core = core.id, user = %login.user, device = %login.device);
    run_session(Start {
        core,
        stream: Rc::new(RefCell::new(Transport::Tcp(stream))),
        inbuf: BytesMut::from(&leftover[..]),
        login,
        count,
        slot: Some(slot),
        span,
    })
}

/// A QUIC session relayed from the core that holds its connection (which counts it against
/// the connection limits). A plain function, as [`run_adopted`].
pub fn run_relayed(
    core: Rc<Core>,
    relay: Rc<Relay>,
    leftover: Vec<u8>,
    login: Login,
) -> impl Future<Output = ()> {
    let count = ConnCount::new(&core);
    let span = tracing::info_span!("conn", core = core.id, user = %login.user, device = %login.device, relay = relay.id);
    run_session(Start {
        core,
        stream: Rc::new(RefCell::new(Transport::Relay(relay))),
        inbuf: BytesMut::from(&leftover[..]),
        login,
        count,
        slot: None,
        span,
    })
}

/// Accepts TLS-over-TCP connections until shutdown: the TLS handshake must complete within
/// the login timeout, then the session is the same as over plain TCP.
pub async fn tls_accept_loop(
    core: Rc<Core>,
    listener: TcpListener,
    acceptor: futures_rustls::TlsAcceptor,
) {
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            core.stopped().await;
            None
        })
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                let io: std::io::Error = e.into();
                warn!(core = core.id, error = %io, "TLS accept failed");
                glommio::timer::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let core = core.clone();
        let acceptor = acceptor.clone();
        let count = ConnCount::new(&core);
        glommio::spawn_local(async move {
            let peer = stream.peer_addr().ok();
            let span = tracing::info_span!("conn", core = core.id, peer = ?peer, tls = true);
            async move {
                let _ = stream.set_nodelay(true);
                let slot = match core.conn_limits.admit(peer.map(|p| p.ip())) {
                    Ok(slot) => slot,
                    Err(refused) => {
                        debug!(?refused, "TLS connection refused before the handshake");
                        return;
                    }
                };
                let handshake = future::or(async { Some(acceptor.accept(stream).await) }, async {
                    glommio::timer::sleep(core.cfg.login_timeout()).await;
                    None
                })
                .await;
                match handshake {
                    Some(Ok(tls)) => {
                        handle_new(core, Transport::Tls(Box::new(tls)), count, slot).await
                    }
                    Some(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                    None => debug!("no TLS handshake within the login timeout"),
                }
            }
            .instrument(span)
            .await
        })
        .detach();
    }
}

/// Accepts QUIC connections until shutdown: each brings one bidirectional stream (opened by
/// the client within the login timeout) that carries the same frames as a TCP connection.
pub async fn quic_accept_loop(core: Rc<Core>, listener: tern_quic::Listener) {
    loop {
        let accepted = future::or(async { listener.accept().await }, async {
            core.stopped().await;
            None
        })
        .await;
        let Some(conn) = accepted else { break };
        let core = core.clone();
        let count = ConnCount::new(&core);
        glommio::spawn_local(async move {
            let peer = conn.remote_address();
            let span = tracing::info_span!("conn", core = core.id, peer = ?peer, quic = true);
            async move {
                let stream = future::or(conn.accept_bi(), async {
                    glommio::timer::sleep(core.cfg.login_timeout()).await;
                    None
                })
                .await;
                let Some((send, recv)) = stream else {
                    debug!("no stream within the login timeout");
                    conn.close(tern_quic::VarInt::from_u32(0), b"login timeout");
                    return;
                };
                let transport = Transport::Quic { send, recv, conn };
                match core.conn_limits.admit(Some(peer.ip())) {
                    Ok(slot) => handle_new(core, transport, count, slot).await,
                    Err(refused) => refuse(&core, transport, refused).await,
                }
            }
            .instrument(span)
            .await
        })
        .detach();
    }
    // Each session ends with Kick SHUTDOWN, and its connection then closes itself once the
    // client has read that (see `run_quic_end`). Closing every connection now would throw the
    // Kick away with whatever else is in flight: wait for them within the shutdown bound,
    // turning away connections that arrive meanwhile, then close what is left.
    let turn_away = async {
        while let Some(conn) = listener.accept().await {
            conn.close(tern_quic::VarInt::from_u32(0), b"shutting down");
        }
        std::future::pending::<()>().await;
    };
    let bound = Duration::from_millis(core.cfg.shutdown_timeout_ms);
    future::or(
        turn_away,
        future::or(listener.wait_idle(), glommio::timer::sleep(bound)),
    )
    .await;
    listener.close(tern_quic::VarInt::from_u32(0), b"shutting down");
    let _ = future::or(
        listener.wait_idle(),
        glommio::timer::sleep(Duration::from_secs(1)),
    )
    .await;
}

/// The logged-in session on the user's core: the login (registration, HelloOk, the sync on
/// login), then its connection served until it closes, parked whenever it is quiet
/// (`park.rs`), then the tear-down.
///
/// A plain function returning an `async` block rather than an `async fn`: an `async fn` keeps
/// its arguments in its state for the whole session. The login and the reader run as boxed
/// futures and the session's state is boxed ([`Live`]), so that what a parked connection's task
/// holds is little more than that state. Keep the future within 200 bytes (192 now): with
/// glommio's task header the task is then a 256-byte block, an allocator size class that no
/// short-lived block shares, so that parked connections leave no half-empty pages behind
/// (docs/PERFORMANCE.md, "Parked connections").
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments for the whole session"
)]
fn run_session(start: Start) -> impl Future<Output = ()> {
    // Boxed, and consumed by its await: the login's state (and what it was started with) is
    // freed once the login is done.
    let span = start.span.clone();
    let login = Box::pin(log_in(start).instrument(span));
    async move {
        let Some((live, stream, inbuf, writer)) = login.await else {
            return;
        };
        let mut live = live;
        let mut conn = (stream, writer);
        let mut inbuf = inbuf;
        loop {
            let input = inbuf.take().map(|b| *b).unwrap_or_default();
            let read = live.ctx.read_loop(&conn.0, input);
            match Box::pin(read.instrument(live.span.clone())).await {
                ReadEnd::Closed => break,
                ReadEnd::Park => {
                    let (stream, writer) = conn;
                    // The writer ends by itself once nothing is queued (the reader checked that
                    // it waits at its empty queue). Not cancelled: glommio 0.9 never frees the
                    // memory of a task cancelled while it waits.
                    let out = &live.ctx.session.out;
                    out.stop_writer(true);
                    writer.await;
                    out.stop_writer(false);
                    let stream = park(&live.ctx.core, &live.ctx.session, stream).await;
                    let writer = glommio::spawn_local(write_loop(
                        live.ctx.core.clone(),
                        stream.clone(),
                        live.ctx.session.clone(),
                    ));
                    conn = (stream, writer);
                }
            }
        }
        let span = live.span.clone();
        Box::pin(live.close(conn.0, conn.1).instrument(span)).await;
    }
}

/// What a session starts with, handed over by the login.
struct Start {
    core: Rc<Core>,
    stream: Stream,
    inbuf: BytesMut,
    login: Login,
    count: ConnCount,
    slot: Option<ConnSlot>,
    span: tracing::Span,
}

/// What a logged-in session keeps for its whole life, parked or not.
struct Live {
    ctx: Ctx,
    /// The connection's span (the task is not instrumented as a whole: the span would be part
    /// of its future).
    span: tracing::Span,
    /// Held (counted against the limits) until the session ends.
    _count: ConnCount,
    _slot: Option<ConnSlot>,
}

/// Registers the session (a refusal is sent and the connection closed), queues HelloOk, starts
/// the writer and runs the sync on login. What was read after Hello comes back boxed, and only
/// if there is some: the session's task keeps it until its first read.
async fn log_in(start: Start) -> Option<LoggedIn> {
    let Start {
        core,
        stream,
        inbuf,
        login,
        count,
        slot,
        span,
    } = start;
    let user = match core.store.intern_user(&login.user) {
        Ok(u) => u,
        Err(e) => {
            warn!(error = %e, "cannot register user");
            let f = Frame::error(login.request_id, ErrorCode::Internal, "server error", true);
            close_with(&core, &stream, &f).await;
            return None;
        }
    };
    // Register (kicking an older connection of the same device) before anything can be
    // committed for this session, so that sync + live push cover every message.
    let registered = register(&core, user, &login, stream.borrow().raw_fd().unwrap_or(-1));
    let session = match registered {
        Ok(session) => session,
        Err((code, message)) => {
            let f = Frame::error(login.request_id, code, message, true);
            close_with(&core, &stream, &f).await;
            return None;
        }
    };
    if core.parker.is_none() || !matches!(&*stream.borrow(), Transport::Tcp(_)) {
        session.park.set(Park::Never);
    }
    core.groups_online(user);
    core.presence_changed(user);
    core.m()
        .logins
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if core.webhooks.wants(crate::webhook::LOGIN) {
        core.webhooks.emit(
            crate::webhook::LOGIN,
            serde_json::json!({"user": &login.user, "device": &login.device, "session_id": session.logical}),
        );
    }
    let user_name: Arc<str> = Arc::from(login.user.as_str());
    info!(session = session.id, logical = session.logical, "logged in");
    let writer = glommio::spawn_local(write_loop(core.clone(), stream.clone(), session.clone()));
    // A device that syncs at login gets HelloOk's version and its sync from one read of the
    // store. Live messages wait for the sync from here on: nothing is awaited before the read.
    let view = login.sync_on_login.then(|| {
        session.out.begin_sync();
        core.store
            .sync_view(user, login.sync_version, Some(&login.device))
    });
    let user_version = match &view {
        Some(Ok(v)) => v.user_version,
        // The sync reports the error; reading again would fail the same way.
        Some(Err(_)) => 0,
        None => core.store.user_version(user).unwrap_or(0),
    };
    session.out.push(core.encode(&Frame::new(
        login.request_id,
        HelloOk {
            user_id: login.user.clone(),
            device_id: login.device.clone(),
            session_id: session.logical,
            server_time_ms: now_ms(),
            user_version,
            max_frame_bytes: core.cfg.max_frame_bytes,
            max_payload_bytes: core.cfg.max_payload_bytes,
            heartbeat_interval_ms: core.cfg.heartbeat_interval_ms,
            token_expires_at: session.token_expires_at.get(),
        },
    )));
    let mut live = Box::new(Live {
        ctx: Ctx::new(
            core.clone(),
            session.clone(),
            user,
            user_name,
            false,
            login.platform,
        ),
        span,
        _count: count,
        _slot: slot,
    });
    if login.resume == 0 {
        core.send_pending_pushes(&session, &login.user);
    }
    if let Some(view) = view {
        Box::pin(live.ctx.sync_with(
            login.request_id,
            SyncLimits {
                page_size: 0,
                per_conversation: login.sync_max,
            },
            view,
        ))
        .await;
    }
    let inbuf = (!inbuf.is_empty()).then(|| Box::new(inbuf));
    Some((live, stream, inbuf, writer))
}

/// The session's state, its stream, what was read after Hello, its writer.
type LoggedIn = (Box<Live>, Stream, Option<Box<BytesMut>>, glommio::Task<()>);

impl Live {
    /// Tears the session down: unregisters it, lets the writer flush (bounded), closes.
    async fn close(mut self: Box<Self>, stream: Stream, mut writer: glommio::Task<()>) {
        self.ctx.unfollow_all().await;
        let (core, session, user) = (&self.ctx.core, &self.ctx.session, self.ctx.user);
        {
            let mut users = core.users.borrow_mut();
            if let Some(list) = users.get_mut(&user) {
                list.retain(|s| s.id != session.id);
                if list.is_empty() {
                    users.remove(&user);
                    core.user_rates.borrow_mut().remove(&user);
                    core.groups_offline(user);
                }
            }
            core.sessions.borrow_mut().remove(&session.id);
        }
        core.presence_changed(user);
        core.leave_all_rooms(session);
        if core.webhooks.wants(crate::webhook::LOGOUT) {
            core.webhooks.emit(
                crate::webhook::LOGOUT,
                serde_json::json!({"user": &*self.ctx.user_name, "device": &session.device, "session_id": session.logical}),
            );
        }
        session.out.close();
        let grace = Duration::from_millis(core.cfg.shutdown_timeout_ms.min(2000));
        let flushed = ends_within(&mut writer, grace).await;
        if !flushed {
            // The writer is stuck on a connection whose client does not read: reset it rather
            // than close it.
            stream.borrow_mut().abort();
        }
        stream.borrow_mut().shutdown(std::net::Shutdown::Both);
        // The shutdown fails a stuck write, so the writer ends by itself: dropping it would
        // cancel it, and glommio 0.9 never frees a task cancelled while it waits.
        if !flushed && !ends_within(&mut writer, grace).await {
            warn!(session = session.id, "the writer did not end after a reset");
        }
        core.wake_completions();
        info!(session = session.id, "closed");
    }
}

/// Whether `task` ends within `limit`; it keeps running if not.
async fn ends_within(task: &mut glommio::Task<()>, limit: Duration) -> bool {
    future::or(
        async {
            task.await;
            true
        },
        async {
            glommio::timer::sleep(limit).await;
            false
        },
    )
    .await
}

/// Parks a quiet plain-TCP connection (`park.rs`) until its socket is ready, something is
/// queued for it, or it must end, and returns its stream adopted again. Returns the stream at
/// once when it cannot park.
async fn park(core: &Core, session: &SessionHandle, stream: Stream) -> Stream {
    let Some(parker) = &core.parker else {
        session.park.set(Park::Never);
        return stream;
    };
    let fd = match leave_glommio(session, stream) {
        Ok(fd) => fd,
        Err(stream) => return stream,
    };
    let fd = match parker.park(fd, session.id) {
        Ok(parked) => {
            session.fd.set(parked.as_raw_fd());
            session.park.set(Park::Parked);
            core.m().parked(1);
            session.unparked().await;
            core.m().parked(-1);
            session.park.set(Park::Active);
            parked.unpark()
        }
        Err((e, fd)) => {
            warn!(error = %e, "cannot park a connection");
            session.park.set(Park::Never);
            fd
        }
    };
    let tcp = crate::sys::adopt_stream(fd);
    session.fd.set(tcp.as_raw_fd());
    Rc::new(RefCell::new(Transport::Tcp(tcp)))
}

/// Takes a plain TCP connection's socket out of glommio: a duplicate of its descriptor, the
/// stream (and with it its I/O requests) dropped. Gives the stream back if it cannot.
fn leave_glommio(session: &SessionHandle, stream: Stream) -> Result<crate::sys::MovedFd, Stream> {
    let tcp = match Rc::try_unwrap(stream).map(RefCell::into_inner) {
        Ok(Transport::Tcp(tcp)) => tcp,
        Ok(other) => {
            session.park.set(Park::Never);
            return Err(Rc::new(RefCell::new(other)));
        }
        Err(stream) => {
            session.park.set(Park::Active);
            return Err(stream);
        }
    };
    match crate::sys::dup_stream(&tcp) {
        Ok(fd) => Ok(fd),
        Err(e) => {
            debug!(error = %e, "cannot park");
            session.park.set(Park::Active);
            Err(Rc::new(RefCell::new(Transport::Tcp(tcp))))
        }
    }
}

/// Most connections one logical session may have at once (a dual-channel client uses two; a
/// path re-added before the server noticed the old one was gone makes a third for a while).
/// Past it the path silent the longest is closed.
pub const MAX_PATHS: usize = 4;

/// Ends the user's connections that `replaced` picks, with `Kick{REPLACED, message}`, and takes
/// them out of `list`.
fn replace_where(
    core: &Core,
    list: &mut crate::core::Sessions,
    message: &str,
    replaced: impl Fn(&SessionHandle) -> bool,
) {
    list.retain(|old| {
        if !replaced(old) {
            return true;
        }
        old.out
            .push(core.encode(&Frame::kick(KickReason::Replaced, message)));
        old.end();
        false
    });
}

/// Adds a logged-in connection to its user's sessions on this core: a new logical session (an
/// older one of the same device is kicked with REPLACED, all its paths), or with
/// `Hello.resume_session_id` one more path of a live logical session of the same device.
fn register(
    core: &Core,
    user: UserId,
    login: &Login,
    fd: std::os::fd::RawFd,
) -> Result<Rc<SessionHandle>, (ErrorCode, &'static str)> {
    let mut users = core.users.borrow_mut();
    let list = users.entry(user).or_default();
    let id = core.new_session_id();
    // A path joining a session keeps the session's expiry if a Refresh moved it past its own.
    let mut token_expires_at = login.token_expires_at;
    let logical = if login.resume != 0 {
        let paths: Vec<usize> = (0..list.len())
            .filter(|&i| {
                let s = &list[i];
                s.logical == login.resume && s.device == login.device && !s.ending.get()
            })
            .collect();
        for &i in &paths {
            token_expires_at = token_expires_at.max(list[i].token_expires_at.get());
        }
        if paths.is_empty() {
            if list.is_empty() {
                users.remove(&user);
            }
            return Err((
                ErrorCode::SessionNotFound,
                "resume_session_id names no live session of this user and device",
            ));
        }
        if paths.len() >= MAX_PATHS {
            // The path silent the longest has most likely lost its network without the server
            // noticing.
            let stale = paths
                .iter()
                .copied()
                .min_by_key(|&i| list[i].last_active.get())
                .unwrap_or(paths[0]);
            let old = list.remove(stale);
            debug!(session = old.id, "too many paths: closing the oldest");
            old.end();
        }
        login.resume
    } else {
        replace_where(
            core,
            list,
            "the same device logged in on another connection",
            |old| old.device == login.device,
        );
        // Devices connected now: sessions already ending hold no place.
        let mut logicals: Vec<u64> = list
            .iter()
            .filter(|s| !s.ending.get())
            .map(|s| s.logical)
            .collect();
        logicals.sort_unstable();
        logicals.dedup();
        if logicals.len() >= core.cfg.max_devices_per_user {
            if core.cfg.device_limit_policy == crate::config::DeviceLimitPolicy::Refuse {
                return Err((
                    ErrorCode::TooManyDevices,
                    "the user has the maximum number of connected devices",
                ));
            }
            // A logical session's id is its first connection's, and ids grow: the lowest is
            // the device connected longest. Every path of it goes.
            let oldest = logicals[0];
            replace_where(
                core,
                list,
                "the user logged in on another device, over the device limit",
                |old| old.logical == oldest,
            );
        }
        id
    };
    let session = Rc::new(SessionHandle {
        id,
        logical,
        user,
        device: login.device.clone(),
        out: Outbound::new(
            core.cfg.outbound_queue_frames,
            core.cfg.outbound_queue_bytes,
        ),
        ending: Default::default(),
        last_active: std::cell::Cell::new(now_ms()),
        rooms: Default::default(),
        end_waker: Default::default(),
        fd: std::cell::Cell::new(fd),
        park: Default::default(),
        push: Default::default(),
        token_expires_at: std::cell::Cell::new(token_expires_at),
    });
    list.push(session.clone());
    core.sessions
        .borrow_mut()
        .insert(session.id, session.clone());
    Ok(session)
}

/// Bytes a session's writer gathers into one write.
pub(crate) const WRITE_CHUNK: usize = 64 << 10;

/// A plain function returning an `async` block: an `async fn` would keep its arguments twice
/// in the task's state.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
fn write_loop(
    core: Rc<Core>,
    stream: Stream,
    session: Rc<SessionHandle>,
) -> impl Future<Output = ()> {
    async move {
        let out = &session.out;
        let _direct = DirectSocket::new(out, stream.borrow().plain_fd());
        loop {
            out.wait_ready().await;
            if out.take_sync_needed() {
                let v = core.store.user_version(session.user).unwrap_or(0);
                out.push(core.encode(&Frame::new(0, SyncNeeded { user_version: v })));
            }
            // A big entry (a live room's batch, shared by its viewers) is written from where it
            // is; smaller frames are gathered into one buffer.
            let big = out.pop_large(WRITE_CHUNK);
            let mut buf = Vec::new();
            let bytes: &[u8] = match &big {
                Some(b) => b,
                None if out.drain_into(&mut buf, WRITE_CHUNK) => &buf,
                None if out.is_closed() || out.writer_stops() => return,
                None => continue,
            };
            let stall = Duration::from_millis(core.cfg.write_timeout_ms);
            let written = match write_now(&stream, bytes) {
                Ok(n) if n == bytes.len() => Ok(()),
                // The socket is full (or not plain TCP): wait for it. Boxed, so that the waiting
                // write's state is not part of every idle writer's task.
                Ok(n) => Box::pin(write_all_within(&stream, &bytes[n..], stall)).await,
                Err(e) => Err(e),
            };
            match written {
                Ok(()) => {}
                Err(e) if e.kind() != std::io::ErrorKind::TimedOut => {
                    debug!(error = %e, "write failed");
                    session.end();
                    return;
                }
                Err(_) => {
                    // The client stopped reading: reset rather than close, so that neither its
                    // unread bytes nor ours keep kernel memory.
                    info!(session = session.id, "write timeout: client is not reading");
                    stream.borrow_mut().abort();
                    session.end();
                    return;
                }
            }
        }
    }
}

/// Lends the writer's plain TCP socket to its queue for direct sends (see
/// [`Outbound::set_direct`]) for as long as the writer runs, however it ends.
struct DirectSocket<'a>(&'a Outbound);

impl<'a> DirectSocket<'a> {
    fn new(out: &'a Outbound, fd: Option<RawFd>) -> DirectSocket<'a> {
        out.set_direct(fd.unwrap_or(-1));
        DirectSocket(out)
    }
}

impl Drop for DirectSocket<'_> {
    fn drop(&mut self) {
        self.0.set_direct(-1);
    }
}

enum Wake {
    Read(std::io::Result<usize>),
    /// The session must end, or was asked to park.
    Interrupted,
}

/// Why a connection's reader stopped.
enum ReadEnd {
    /// The connection closes.
    Closed,
    /// It parks (`park.rs`): nothing is in flight.
    Park,
}

/// A logged-in connection's request handling state (the reader task's).
pub(crate) struct Ctx {
    pub(crate) core: Rc<Core>,
    pub(crate) session: Rc<SessionHandle>,
    pub(crate) user: UserId,
    pub(crate) user_name: Arc<str>,
    acks: Vec<tern_storage::Completion<u64>>,
    sends: Gcra,
    requests: Gcra,
    read_bytes: Gcra,
    /// Users this connection follows (presence), by name.
    pub(crate) following: HashMap<Arc<str>, UserId>,
    /// A request of the HTTP API run as this user (no connection): the per-connection and
    /// per-user rates do not apply (the API has its own).
    pub(crate) api: bool,
    /// The API acting as the system user: may message anyone, and acts as an owner in every
    /// group.
    pub(crate) admin: bool,
    /// The device's platform (`Hello.platform`).
    pub(crate) platform: i32,
}

impl Ctx {
    /// A connection's context (`admin` only for the API's system user).
    fn new(
        core: Rc<Core>,
        session: Rc<SessionHandle>,
        user: UserId,
        user_name: Arc<str>,
        admin: bool,
        platform: i32,
    ) -> Ctx {
        Ctx {
            core,
            session,
            user,
            user_name,
            acks: Vec::new(),
            sends: Gcra::default(),
            requests: Gcra::default(),
            read_bytes: Gcra::default(),
            following: HashMap::new(),
            api: false,
            admin,
            platform,
        }
    }

    /// A context for one request of the HTTP API, run as `user` on the user's core.
    pub(crate) fn for_api(
        core: Rc<Core>,
        session: Rc<SessionHandle>,
        user: UserId,
        user_name: Arc<str>,
        admin: bool,
    ) -> Ctx {
        Ctx {
            api: true,
            ..Ctx::new(core, session, user, user_name, admin, 0)
        }
    }

    async fn flush_acks(&mut self) {
        for c in self.acks.drain(..) {
            if let Err(e) = c.await {
                debug!(error = %e, "delivered cursor not stored");
            }
        }
    }

    pub(crate) fn storage_error(&self, request_id: u64, e: &tern_storage::StorageError) {
        let (code, msg) = crate::core::storage_error_code(e);
        self.error(request_id, code, msg);
    }

    pub(crate) fn reply(&self, frame: &Frame) {
        self.session.out.push(self.core.encode(frame));
    }

    /// Refresh: the session (every path of it) stays logged in until the new token expires.
    fn refresh(&self, rid: u64, token: &str) {
        let claims = match check_token(&self.core, token, &self.session.device) {
            Ok(claims) if claims.sub != *self.user_name => {
                return self.error(rid, ErrorCode::TokenInvalid, "the token names another user");
            }
            Ok(claims) => claims,
            Err((code, msg)) => return self.error(rid, code, msg),
        };
        if let Some(list) = self.core.users.borrow().get(&self.user) {
            for s in list.iter().filter(|s| s.logical == self.session.logical) {
                s.token_expires_at.set(claims.exp);
            }
        }
        self.reply(&Frame::new(
            rid,
            RefreshOk {
                token_expires_at: claims.exp,
            },
        ));
    }

    pub(crate) fn error(&self, request_id: u64, code: ErrorCode, msg: impl Into<String>) {
        self.core.m().error(code);
        self.reply(&Frame::error(request_id, code, msg, false));
    }

    /// A plain function returning an `async` block, as [`write_loop`].
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn stores its arguments twice"
    )]
    fn read_loop<'a>(
        &'a mut self,
        stream: &'a Stream,
        mut inbuf: BytesMut,
    ) -> impl Future<Output = ReadEnd> + 'a {
        async move {
            let core = self.core.clone();
            let mut codec = core.codec;
            loop {
                loop {
                    if self.session.ending.get() {
                        return ReadEnd::Closed;
                    }
                    match codec.decode(&mut inbuf) {
                        Ok(Some(frame)) => {
                            // Only whole frames count as activity: a client trickling a frame byte
                            // by byte is closed by the idle timeout.
                            self.session.last_active.set(now_ms());
                            // A decoded frame is large: boxed while it waits for room, so that
                            // it is not part of every idle connection's task.
                            let frame = if self.session.out.has_room() {
                                frame
                            } else {
                                let frame = Box::new(frame);
                                self.session.out.wait_room().await;
                                if self.session.ending.get() {
                                    return ReadEnd::Closed;
                                }
                                *frame
                            };
                            // Boxed: request handling has the largest state of the session; inline
                            // it would be carried by every idle connection's task.
                            if !Box::pin(self.handle(frame)).await {
                                return ReadEnd::Closed;
                            }
                        }
                        Ok(None) => break,
                        Err(e) if !e.is_fatal() => {
                            self.reply(&e.to_frame());
                        }
                        Err(e) => {
                            debug!(error = %e, "bad frame; closing");
                            self.reply(&e.to_frame());
                            self.session.end();
                            return ReadEnd::Closed;
                        }
                    }
                }
                if inbuf.is_empty() && inbuf.capacity() > 0 {
                    // Idle connections keep no read buffer.
                    inbuf = BytesMut::new();
                }
                let woke = future::or(
                    async { Wake::Read(read_some(&core, stream, &mut inbuf).await) },
                    async {
                        self.session.interrupted().await;
                        Wake::Interrupted
                    },
                )
                .await;
                match woke {
                    Wake::Read(Ok(0)) | Wake::Read(Err(_)) => return ReadEnd::Closed,
                    Wake::Interrupted if self.session.ending.get() => return ReadEnd::Closed,
                    Wake::Interrupted => {
                        // Asked to park (only plain TCP sessions are: the login marks the others
                        // `Park::Never`): only between frames, with nothing left to write and
                        // the writer waiting for more (so ending it cuts nothing short).
                        self.flush_acks().await;
                        if inbuf.is_empty() && self.session.out.writer_idle() {
                            return ReadEnd::Park;
                        }
                        self.session.park.set(crate::core::Park::Active);
                    }
                    Wake::Read(Ok(n)) => {
                        let rate = &core.rates.read_bytes;
                        let wait =
                            self.read_bytes
                                .charge(rate, mono_nanos(), (n as u64).div_ceil(64));
                        if !wait.is_zero() {
                            // Over the byte rate: stop reading for a while (the frames already
                            // read are still handled first).
                            let ended = future::or(
                                async {
                                    glommio::timer::sleep(wait).await;
                                    false
                                },
                                async {
                                    self.session.ended().await;
                                    true
                                },
                            )
                            .await;
                            if ended {
                                return ReadEnd::Closed;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Handles one request. Returns false if the connection must close.
    pub(crate) async fn handle(&mut self, frame: Frame) -> bool {
        let rid = frame.request_id;
        if !self.api
            && !self
                .requests
                .allow(&self.core.rates.requests, mono_nanos(), 1)
        {
            self.error(
                rid,
                ErrorCode::RateLimited,
                format!(
                    "more than {} requests per second on this connection",
                    self.core.cfg.rate_requests_per_sec
                ),
            );
            return true;
        }
        match frame.body {
            Some(Body::Ping(p)) => {
                self.reply(&Frame::new(
                    rid,
                    Pong {
                        client_time_ms: p.client_time_ms,
                        server_time_ms: now_ms(),
                    },
                ));
            }
            Some(Body::Refresh(r)) if !self.api => self.refresh(rid, &r.token),
            Some(Body::Send(send)) => self.send(rid, send).await,
            // Room messages are not stored: there is no cursor to move.
            Some(Body::Ack(ack)) if is_room(ack.conversation_id) => {}
            Some(Body::Ack(ack)) => {
                if let Ok(Some(_)) = self.readable(ack.conversation_id) {
                    // Cursor writes are group-committed by the store; they are awaited before
                    // this connection's next sync (which reads them) or when many are pending.
                    if self.core.webhooks.wants(crate::webhook::DELIVERY_RECEIPT) {
                        self.core
                            .webhooks
                            .emit_with(crate::webhook::DELIVERY_RECEIPT, || {
                                serde_json::json!({
                                    "user": &*self.user_name,
                                    "device": &self.session.device,
                                    "conversation_id": ack.conversation_id.to_string(),
                                    "seq": ack.seq,
                                })
                            });
                    }
                    self.acks.push(self.core.store.set_delivered(
                        self.user,
                        &self.session.device,
                        ack.conversation_id,
                        ack.seq,
                    ));
                    if self.acks.len() >= 256 {
                        self.flush_acks().await;
                    }
                } else {
                    self.error(rid, ErrorCode::Forbidden, "not a conversation of this user");
                }
            }
            // Boxed: the sync state is large and rare; it must not size every idle session's task.
            Some(Body::Sync(req)) => {
                let limits = SyncLimits {
                    page_size: req.page_size,
                    per_conversation: req.max_messages_per_conversation,
                };
                Box::pin(self.sync(rid, req.since_version, limits)).await
            }
            Some(Body::History(req)) => self.history(rid, req),
            Some(Body::Group(req)) => self.group(rid, req).await,
            Some(Body::Room(req)) => self.room(rid, req),
            Some(Body::MarkRead(req)) => self.mark_read(rid, req).await,
            Some(Body::GetReadCounts(req)) => Box::pin(self.read_counts(rid, req)).await,
            Some(Body::Typing(req)) => self.typing(rid, req).await,
            Some(Body::SubscribePresence(req)) => self.subscribe_presence(rid, req).await,
            Some(Body::SetConversation(req)) => self.set_conversation(rid, req).await,
            Some(Body::Recall(req)) => self.recall(rid, req).await,
            Some(Body::Social(req)) => Box::pin(self.social(rid, req)).await,
            Some(Body::SetDevice(req)) => self.set_device(rid, req).await,
            Some(Body::PushAck(ack)) => self.push_ack(rid, ack).await,
            Some(Body::Hello(_)) => {
                self.reply(&Frame::error(
                    rid,
                    ErrorCode::AlreadyAuthenticated,
                    "already logged in",
                    true,
                ));
                return false;
            }
            Some(_) => {
                self.error(
                    rid,
                    ErrorCode::UnexpectedMessage,
                    "this message type is sent by the server, not by clients",
                );
            }
            None => {
                self.error(rid, ErrorCode::UnknownMessage, "unknown message type");
            }
        }
        true
    }

    /// Bytes of messages one response frame may carry (room left for the envelope).
    fn frame_budget(&self) -> usize {
        self.core.codec.max_frame_bytes.saturating_sub(512)
    }

    async fn send(&mut self, rid: u64, mut send: tern_protocol::Send) {
        let cfg = &self.core.cfg;
        if send.client_msg_id.is_empty() || send.client_msg_id.len() > 64 {
            return self.error(
                rid,
                ErrorCode::InvalidArgument,
                "client_msg_id must be 1..=64 bytes",
            );
        }
        if send.payload.len() > cfg.max_payload_bytes as usize {
            return self.error(
                rid,
                ErrorCode::PayloadTooLarge,
                format!("payload exceeds {} bytes", cfg.max_payload_bytes),
            );
        }
        if send.custom_type.len() > 64 {
            return self.error(
                rid,
                ErrorCode::InvalidArgument,
                "custom_type must be at most 64 bytes",
            );
        }
        // Group events and recall notices are SYSTEM messages with a `tern.` type, which clients
        // take as the server's word: the server writes them itself, never through a Send, and
        // only its API sends other SYSTEM messages.
        if send.custom_type.starts_with(RESERVED_TYPE_PREFIX) {
            return self.error(
                rid,
                ErrorCode::InvalidArgument,
                "custom types starting with \"tern.\" are the server's",
            );
        }
        if !self.api && send.content_type == ContentType::System as u32 {
            return self.error(
                rid,
                ErrorCode::InvalidArgument,
                "content_type SYSTEM is sent by the server only",
            );
        }
        let Some(target) = send.target else {
            return self.error(rid, ErrorCode::InvalidArgument, "target is required");
        };
        let now = mono_nanos();
        if !self.api && !self.sends.allow(&self.core.rates.messages, now, 1) {
            return self.error(
                rid,
                ErrorCode::RateLimited,
                format!(
                    "more than {} messages per second on this connection",
                    cfg.rate_messages_per_sec
                ),
            );
        }
        let user_ok = self.api
            || self
                .core
                .user_rates
                .borrow_mut()
                .entry(self.user)
                .or_default()
                .allow(&self.core.rates.user_messages, now, &send.client_msg_id);
        if !user_ok {
            return self.error(
                rid,
                ErrorCode::RateLimited,
                format!(
                    "more than {} messages per second from this user",
                    cfg.rate_user_messages_per_sec
                ),
            );
        }
        self.core
            .m()
            .messages_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kind = TargetKind::try_from(target.kind);
        if matches!(kind, Ok(TargetKind::User) | Ok(TargetKind::Group)) && !valid_id(&target.id) {
            return self.error(
                rid,
                ErrorCode::InvalidArgument,
                "target.id must be 1..=64 bytes without control characters",
            );
        }
        // The destination is resolved first: the before-send hook sees the real conversation,
        // and a message that cannot be sent (no such group, not in the room, blocked) costs no
        // call to it.
        let dest = match kind {
            Ok(TargetKind::User) => {
                let recipient = match self.core.user_id(&target.id) {
                    Ok(r) => r,
                    Err(e) => {
                        let (code, msg) = crate::core::storage_error_code(&e);
                        return self.error(rid, code, msg);
                    }
                };
                if let Err((code, msg)) = self.may_message(recipient) {
                    return self.error(rid, code, msg);
                }
                let Some(conv) = tern_storage::direct_conversation(self.user, recipient) else {
                    return self.error(rid, ErrorCode::Internal, "user id space exhausted");
                };
                Dest::User { recipient, conv }
            }
            Ok(TargetKind::Group) => {
                let Some((group, conv)) = self.find_group(rid, &target.id) else {
                    return;
                };
                Dest::Group { group, conv }
            }
            Ok(TargetKind::Room) => {
                if !valid_id(&target.id) {
                    return self.error(
                        rid,
                        ErrorCode::InvalidArgument,
                        "target.id must be 1..=64 bytes without control characters",
                    );
                }
                let room = room_conversation(&target.id);
                // The HTTP API posts to a room without entering it (a system notice).
                if !self.api && !self.core.in_room(self.session.logical, room) {
                    return self.error(rid, ErrorCode::NotMember, "enter the room first");
                }
                Dest::Room { room }
            }
            _ => {
                return self.error(
                    rid,
                    ErrorCode::InvalidArgument,
                    "target.kind must be USER, GROUP or ROOM",
                );
            }
        };
        if self.core.webhooks.wants(crate::webhook::BEFORE_SEND) {
            let (to_kind, conversation_id) = match dest {
                Dest::User { conv, .. } => ("user", conv),
                Dest::Group { conv, .. } => ("group", conv),
                Dest::Room { room } => ("room", room),
            };
            let verdict = self
                .core
                .webhooks
                .before_send(crate::webhook::BeforeSend {
                    from: self.user_name.to_string(),
                    to_kind,
                    to: target.id.clone(),
                    conversation_id,
                    client_msg_id: send.client_msg_id.clone(),
                    content_type: send.content_type as i32,
                    custom_type: send.custom_type.clone(),
                    payload: send.payload.clone(),
                })
                .await;
            match verdict {
                crate::webhook::Verdict::Allow => {}
                crate::webhook::Verdict::Reject(reason) => {
                    return self.error(rid, ErrorCode::Forbidden, format!("rejected: {reason}"));
                }
                crate::webhook::Verdict::Replace {
                    payload,
                    custom_type,
                } => {
                    if payload.len() > cfg.max_payload_bytes as usize {
                        return self.error(
                            rid,
                            ErrorCode::PayloadTooLarge,
                            "the before-send hook's replacement exceeds the payload limit",
                        );
                    }
                    send.payload = payload;
                    if let Some(c) = custom_type {
                        send.custom_type = c;
                    }
                }
            }
        }
        match dest {
            Dest::User { recipient, conv } => {
                let job = AppendMsg {
                    req: tern_storage::AppendRequest {
                        conversation: conv,
                        sender: self.user,
                        client_msg_id: send.client_msg_id,
                        content_type: send.content_type,
                        custom_type: send.custom_type,
                        payload: send.payload,
                        participants: vec![self.user, recipient],
                        group_change: None,
                        recall: None,
                    },
                    reply: self.reply_to(rid),
                    sender_name: self.user_name.clone(),
                    to: Recipient::User {
                        id: recipient,
                        name: Arc::from(target.id.as_str()),
                    },
                    recall_of: 0,
                };
                let owner = self.core.router.conversation(conv).core;
                self.core.send_to_core(owner, ShardMsg::Append(job)).await;
            }
            Dest::Group { group, conv } => {
                let req = tern_storage::AppendRequest {
                    conversation: conv,
                    sender: self.user,
                    client_msg_id: send.client_msg_id,
                    content_type: send.content_type,
                    custom_type: send.custom_type,
                    payload: send.payload,
                    participants: Vec::new(),
                    group_change: None,
                    recall: None,
                };
                self.to_group_owner(rid, group, conv, &target.id, GroupWhat::Send(req))
                    .await;
            }
            Dest::Room { room } => {
                let msg = RoomSend {
                    room,
                    name: Arc::from(target.id.as_str()),
                    sender_name: self.user_name.clone(),
                    client_msg_id: send.client_msg_id,
                    content_type: send.content_type,
                    custom_type: send.custom_type,
                    payload: send.payload,
                    priority: send.priority,
                    reply: self.reply_to(rid),
                };
                let owner = self.core.router.conversation(room).core;
                self.core.send_to_core(owner, ShardMsg::RoomSend(msg)).await;
            }
        }
    }

    pub(crate) fn reply_to(&self, rid: u64) -> ReplyTo {
        ReplyTo {
            core: self.core.id,
            session: self.session.id,
            logical: self.session.logical,
            user: self.user,
            request_id: rid,
            at_ns: mono_nanos(),
        }
    }

    /// The internal id and conversation of an existing group, or an error answered.
    pub(crate) fn find_group(&self, rid: u64, name: &str) -> Option<(GroupId, u64)> {
        match self.core.store.lookup_group(name) {
            Ok(Some(g)) => match tern_storage::group_conversation(g) {
                Some(conv) => Some((g, conv)),
                None => {
                    self.error(rid, ErrorCode::Internal, "group id out of range");
                    None
                }
            },
            Ok(None) => {
                self.error(rid, ErrorCode::NotFound, "no such group");
                None
            }
            Err(e) => {
                let (code, msg) = crate::core::storage_error_code(&e);
                self.error(rid, code, msg);
                None
            }
        }
    }

    pub(crate) async fn to_group_owner(
        &self,
        rid: u64,
        group: GroupId,
        conv: u64,
        name: &str,
        what: GroupWhat,
    ) {
        let job = GroupJob {
            group,
            name: Arc::from(name),
            actor: self.user,
            actor_name: self.user_name.clone(),
            admin: self.admin,
            reply: self.reply_to(rid),
            what,
        };
        let owner = self.core.router.conversation(conv).core;
        self.core.send_to_core(owner, ShardMsg::Group(job)).await;
    }

    /// A hidden-member operation of the admin API: goes to the group's owner core like any
    /// group operation, which refuses it unless the context is the admin's.
    pub(crate) async fn hidden_members(&mut self, rid: u64, group: &str, op: HiddenOp) {
        if !valid_id(group) {
            return self.error(
                rid,
                ErrorCode::InvalidArgument,
                "group id must be 1..=64 bytes without control characters",
            );
        }
        let Some((id, conv)) = self.find_group(rid, group) else {
            return;
        };
        self.to_group_owner(rid, id, conv, group, GroupWhat::Hidden(op))
            .await;
    }

    /// A group operation: checked here for form, then decided by the group's owner core.
    async fn group(&mut self, rid: u64, req: GroupRequest) {
        if !valid_id(&req.group_id) {
            return self.error(
                rid,
                ErrorCode::InvalidArgument,
                "group_id must be 1..=64 bytes without control characters",
            );
        }
        let Some(op) = req.op else {
            return self.error(rid, ErrorCode::InvalidArgument, "op is required");
        };
        let found = if matches!(op, GroupOp::Create(_)) {
            match self.core.store.intern_group(&req.group_id) {
                Ok(g) => tern_storage::group_conversation(g).map(|c| (g, c)),
                Err(e) => {
                    let (code, msg) = crate::core::storage_error_code(&e);
                    return self.error(rid, code, msg);
                }
            }
        } else {
            self.find_group(rid, &req.group_id)
        };
        let Some((group, conv)) = found else {
            return;
        };
        self.to_group_owner(rid, group, conv, &req.group_id, GroupWhat::Op(op))
            .await;
    }

    fn room(&mut self, rid: u64, req: RoomRequest) {
        if !valid_id(&req.room_id) {
            return self.error(
                rid,
                ErrorCode::InvalidArgument,
                "room_id must be 1..=64 bytes without control characters",
            );
        }
        let room = room_conversation(&req.room_id);
        let mut recent = Vec::new();
        match req.op {
            Some(RoomOp::Enter(enter)) => match self.core.enter_room(&self.session, room) {
                Entered::TooMany => {
                    return self.error(
                        rid,
                        ErrorCode::LimitExceeded,
                        format!("a connection may be in at most {MAX_ROOMS_PER_CONNECTION} rooms"),
                    );
                }
                // In the step that added the viewer: what comes back is not pushed to it too.
                Entered::Now => recent = self.core.room_recent(room, enter.recent as usize),
                // Pushed to this connection already: nothing again.
                Entered::Already => {}
            },
            Some(RoomOp::Leave(_)) => self.core.leave_room(&self.session, room),
            None => return self.error(rid, ErrorCode::InvalidArgument, "op is required"),
        }
        // The newest that fit in one frame (each with its field key and length).
        let mut room_left = self.frame_budget();
        let fit = recent
            .iter()
            .rev()
            .take_while(|m| {
                let len = prost::Message::encoded_len(&***m) + 8;
                let fits = len <= room_left;
                room_left = room_left.saturating_sub(len);
                fits
            })
            .count();
        let recent = recent[recent.len() - fit..]
            .iter()
            .map(|m| Deliver::clone(m))
            .collect();
        self.reply(&Frame::new(
            rid,
            RoomResponse {
                room_id: req.room_id,
                conversation_id: room,
                recent,
            },
        ));
    }

    /// How far the user may read a conversation: `Some(0)` entirely, `Some(s)` up to seq `s`
    /// (a group they left), None not at all.
    pub(crate) fn readable(&self, conv: u64) -> Result<Option<u64>, tern_storage::StorageError> {
        Ok(match conversation_kind(conv) {
            Some(ConversationKind::Direct { low, high }) => {
                (low == self.user || high == self.user).then_some(0)
            }
            Some(ConversationKind::Group(g)) => self.core.store.membership(self.user, g)?,
            None => None,
        })
    }

    fn name_of(&self, cache: &mut HashMap<UserId, String>, id: UserId) -> String {
        cache
            .entry(id)
            .or_insert_with(|| {
                self.core
                    .store
                    .user_name(id)
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            })
            .clone()
    }

    fn target_of(&self, cache: &mut HashMap<UserId, String>, conv: u64) -> Option<Target> {
        match conversation_kind(conv)? {
            ConversationKind::Direct { low, high } => {
                let other = if low == self.user { high } else { low };
                Some(Target {
                    kind: TargetKind::User as i32,
                    id: self.name_of(cache, other),
                })
            }
            ConversationKind::Group(g) => Some(Target {
                kind: TargetKind::Group as i32,
                id: self
                    .core
                    .store
                    .group_name(g)
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            }),
        }
    }

    fn to_deliver(
        &self,
        cache: &mut HashMap<UserId, String>,
        target: &Option<Target>,
        m: StoredMessage,
    ) -> Deliver {
        Deliver {
            conversation_id: m.conversation,
            seq: m.seq,
            sender: self.name_of(cache, m.sender),
            target: target.clone(),
            server_time_ms: m.timestamp_ms,
            client_msg_id: m.client_msg_id,
            content_type: m.content_type,
            custom_type: m.custom_type,
            payload: m.payload,
            recalled: m.recalled,
        }
    }

    /// Sends everything that changed since `since`: conversation states, then each
    /// conversation's messages after this device's delivered cursor (within `limits`), then
    /// SyncDone. Live messages committed meanwhile wait in the session and follow SyncDone,
    /// minus those the sync already carried.
    async fn sync(&mut self, rid: u64, since: u64, limits: SyncLimits) {
        // Live messages from here on wait for the end of the sync.
        self.session.out.begin_sync();
        // The device's acks first: the view then has its delivered cursors.
        self.flush_acks().await;
        let view = self
            .core
            .store
            .sync_view(self.user, since, Some(&self.session.device));
        self.sync_with(rid, limits, view).await;
    }

    /// Sends the sync of `view` (read after `begin_sync`, so that a message committed after
    /// the read is either live after the sync or newer than the version in SyncDone), then
    /// ends the sync.
    async fn sync_with(
        &mut self,
        rid: u64,
        limits: SyncLimits,
        view: Result<tern_storage::SyncView, tern_storage::StorageError>,
    ) {
        let mut synced_upto: HashMap<u64, u64> = HashMap::new();
        let result = match view {
            Ok(view) => self.sync_pages(rid, limits, view, &mut synced_upto).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let (code, msg) = crate::core::storage_error_code(&e);
            self.error(rid, code, msg);
        }
        self.session.out.end_sync(&synced_upto);
    }

    async fn sync_pages(
        &mut self,
        rid: u64,
        limits: SyncLimits,
        view: tern_storage::SyncView,
        synced_upto: &mut HashMap<u64, u64>,
    ) -> Result<(), tern_storage::StorageError> {
        let store = self.core.store.clone();
        let page = if limits.page_size == 0 {
            100
        } else {
            limits.page_size.min(self.core.cfg.max_page)
        } as usize;
        let (mut convs, version) = (view.conversations, view.user_version);
        if !self.core.cfg.new_members_see_history {
            // Nothing before the event that added the user to a group: for the sync, as if the
            // device had been delivered everything before it (a client takes its base from
            // `delivered_seq` and acknowledges from there).
            for c in &mut convs {
                c.delivered_seq = c.delivered_seq.max(c.joined_seq.saturating_sub(1));
            }
        }
        let mut names = HashMap::new();
        let mut to_send = Vec::with_capacity(convs.len());
        for chunk in convs.chunks(256) {
            let mut states = Vec::with_capacity(chunk.len());
            for c in chunk {
                let target = match c.peer {
                    Peer::User(_) | Peer::Group(_) => self.target_of(&mut names, c.conversation),
                    _ => None,
                };
                let (from, upto, skipped_to_seq) = limits.sync_range(c);
                to_send.push((target.clone(), from, upto));
                states.push(ConversationState {
                    conversation_id: c.conversation,
                    target,
                    latest_seq: upto,
                    left: c.left_seq > 0,
                    read_seq: c.read_seq,
                    peer_read_seq: c.peer_read_seq,
                    delivered_seq: c.delivered_seq,
                    version: c.last_version,
                    settings: Some(crate::social::wire_settings(c.conversation, &c.settings)),
                    skipped_to_seq,
                    unread: upto.saturating_sub(c.read_seq.max(c.settings.cleared_seq)),
                });
            }
            let f = self.core.encode(&Frame::new(
                rid,
                SyncConversations {
                    conversations: states,
                },
            ));
            self.session.out.push_wait(f).await;
        }
        for (c, (target, mut from, upto)) in convs.iter().zip(to_send) {
            while from <= upto {
                // An ending session's queue is not drained any more: stop reading for it.
                if self.session.ending.get() {
                    return Ok(());
                }
                let want = page.min((upto - from + 1) as usize);
                let msgs = store.read_forward(c.conversation, from, want)?;
                let Some(last) = msgs.last().map(|m| m.seq) else {
                    break;
                };
                let n = msgs.len();
                let messages: Vec<Deliver> = msgs
                    .into_iter()
                    .map(|m| self.to_deliver(&mut names, &target, m))
                    .collect();
                // A page of large messages is sent as several frames, each within the frame
                // limit.
                for messages in split_by_size(messages, self.frame_budget()) {
                    let f = self.core.encode(&Frame::new(
                        rid,
                        SyncMessages {
                            conversation_id: c.conversation,
                            messages,
                        },
                    ));
                    self.session.out.push_wait(f).await;
                }
                synced_upto.insert(c.conversation, last);
                from = last + 1;
                if n < want {
                    break;
                }
            }
        }
        let f = self.core.encode(&Frame::new(
            rid,
            SyncDone {
                user_version: version,
            },
        ));
        self.session.out.push_wait(f).await;
        Ok(())
    }

    fn history(&mut self, rid: u64, req: HistoryRequest) {
        let store = self.core.store.clone();
        let conv = if req.conversation_id != 0 {
            req.conversation_id
        } else {
            let Some(t) = req.target.as_ref() else {
                return self.error(
                    rid,
                    ErrorCode::InvalidArgument,
                    "conversation_id or target is required",
                );
            };
            if t.kind == TargetKind::Group as i32 {
                match self.find_group(rid, &t.id) {
                    Some((_, conv)) => conv,
                    None => return,
                }
            } else if t.kind != TargetKind::User as i32 {
                return self.error(
                    rid,
                    ErrorCode::InvalidArgument,
                    "target.kind must be USER or GROUP",
                );
            } else {
                match store.lookup_user(&t.id) {
                    Ok(Some(other)) => match tern_storage::direct_conversation(self.user, other) {
                        Some(c) => c,
                        None => {
                            return self.error(rid, ErrorCode::NotFound, "no such conversation");
                        }
                    },
                    Ok(None) => return self.error(rid, ErrorCode::NotFound, "no such user"),
                    Err(e) => {
                        let (code, msg) = crate::core::storage_error_code(&e);
                        return self.error(rid, code, msg);
                    }
                }
            }
        };
        let before_seq = match self.readable(conv) {
            Ok(Some(0)) => req.before_seq,
            // A group the user left: nothing after the event that removed them.
            Ok(Some(left)) if req.before_seq == 0 => left + 1,
            Ok(Some(left)) => req.before_seq.min(left + 1),
            Ok(None) => {
                return self.error(rid, ErrorCode::Forbidden, "not a conversation of this user");
            }
            Err(e) => {
                let (code, msg) = crate::core::storage_error_code(&e);
                return self.error(rid, code, msg);
            }
        };
        let limit = if req.limit == 0 {
            50
        } else {
            req.limit.min(self.core.cfg.max_page)
        } as usize;
        let cleared = match store.conversation_settings(self.user, conv) {
            Ok(settings) => settings.cleared_seq,
            Err(e) => return self.storage_error(rid, &e),
        };
        // Nothing before the event that added the user to a group.
        let joined = match conversation_kind(conv) {
            Some(ConversationKind::Group(g)) if !self.core.cfg.new_members_see_history => {
                match store.joined_seq(self.user, g) {
                    Ok(joined) => joined,
                    Err(e) => return self.storage_error(rid, &e),
                }
            }
            _ => 0,
        };
        let floor = cleared.max(joined.saturating_sub(1));
        match store.read_backward(conv, before_seq, limit + 1) {
            Ok(mut msgs) => {
                // More only if the one past the page may be read.
                let mut has_more = msgs.len() > limit && msgs[limit].seq > floor;
                msgs.truncate(limit);
                // Nothing the user cleared, nor from before they joined.
                if let Some(first_hidden) = msgs.iter().position(|m| m.seq <= floor) {
                    msgs.truncate(first_hidden);
                    has_more = false;
                }
                let mut names = HashMap::new();
                let target = self.target_of(&mut names, conv);
                let messages: Vec<Deliver> = msgs
                    .into_iter()
                    .map(|m| self.to_deliver(&mut names, &target, m))
                    .collect();
                // Newest first: keep as many as fit in one frame; the client pages on from the
                // oldest it got.
                let total = messages.len();
                let messages = split_by_size(messages, self.frame_budget())
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                has_more |= messages.len() < total;
                self.reply(&Frame::new(
                    rid,
                    HistoryPage {
                        conversation_id: conv,
                        messages,
                        has_more,
                    },
                ));
            }
            Err(e) => {
                let (code, msg) = crate::core::storage_error_code(&e);
                self.error(rid, code, msg);
            }
        }
    }
}

/// What a sync sends: messages per page (0: the server's default) and per conversation (0: all).
#[derive(Debug, Clone, Copy)]
struct SyncLimits {
    page_size: u32,
    per_conversation: u32,
}

impl SyncLimits {
    /// The seqs `from..=upto` of `c` the sync sends to the device (after its delivered cursor
    /// and what the user cleared, up to the last readable one, at most the latest
    /// `per_conversation`), and the last seq left out by that bound (0 if none was):
    /// `ConversationState.skipped_to_seq`.
    fn sync_range(&self, c: &ConversationInfo) -> (u64, u64, u64) {
        let upto = readable_upto(c);
        let from = c.delivered_seq.max(c.settings.cleared_seq) + 1;
        let n = u64::from(self.per_conversation);
        if n > 0 && upto >= from && upto - from + 1 > n {
            (upto - n + 1, upto, upto - n)
        } else {
            (from, upto, 0)
        }
    }
}

/// The last seq of a conversation the user may read: the latest, or for a group they left the
/// event that removed them.
fn readable_upto(c: &ConversationInfo) -> u64 {
    if c.left_seq > 0 {
        c.left_seq.min(c.latest_seq)
    } else {
        c.latest_seq
    }
}

/// Splits messages, in order, into groups whose encoding fits in `budget` bytes. A group always
/// has at least one message (a single message always fits: payloads are limited well below the
/// frame size).
fn split_by_size(messages: Vec<Deliver>, budget: usize) -> Vec<Vec<Deliver>> {
    use prost::Message;
    let mut groups = Vec::new();
    let mut current = Vec::new();
    let mut size = 0usize;
    for m in messages {
        // The message, its field tag and its length prefix.
        let len = m.encoded_len() + 1 + prost::length_delimiter_len(m.encoded_len());
        if !current.is_empty() && size + len > budget {
            groups.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(m);
    }
    if !current.is_empty() || groups.is_empty() {
        groups.push(current);
    }
    groups
}

/// Where a Send goes, resolved before the before-send hook is asked.
#[derive(Clone, Copy)]
enum Dest {
    User { recipient: UserId, conv: u64 },
    Group { group: GroupId, conv: u64 },
    Room { room: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, payload: usize) -> Deliver {
        Deliver {
            conversation_id: 1,
            seq,
            payload: vec![0u8; payload].into(),
            ..Default::default()
        }
    }

    #[test]
    fn split_by_size_keeps_order_and_budget() {
        let msgs: Vec<Deliver> = (1..=10).map(|s| msg(s, 1000)).collect();
        let groups = split_by_size(msgs, 3500);
        let seqs: Vec<Vec<u64>> = groups
            .iter()
            .map(|g| g.iter().map(|m| m.seq).collect())
            .collect();
        assert_eq!(
            seqs,
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9], vec![10]]
        );
        // Empty input gives one empty group (an empty page is still answered).
        assert_eq!(split_by_size(Vec::new(), 10).len(), 1);
        // A message larger than the budget goes alone.
        let groups = split_by_size(vec![msg(1, 5000), msg(2, 10)], 3500);
        assert_eq!(groups.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1]);
    }

    #[test]
    fn a_bounded_sync_sends_the_latest_readable_messages_after_the_cursor() {
        // (latest, left_seq, delivered, cleared) of a conversation.
        let conv = |latest, left_seq, delivered_seq, cleared_seq| ConversationInfo {
            conversation: 1 << 63,
            peer: Peer::Group(1),
            active: left_seq == 0,
            latest_seq: latest,
            last_version: 1,
            read_seq: 0,
            peer_read_seq: 0,
            left_seq,
            joined_seq: 0,
            delivered_seq,
            settings: tern_storage::ConversationSettings {
                cleared_seq,
                ..Default::default()
            },
        };
        let range = |per_conversation, c| {
            SyncLimits {
                page_size: 0,
                per_conversation,
            }
            .sync_range(&c)
        };
        // (from, upto, skipped_to)
        assert_eq!(range(0, conv(12, 0, 0, 0)), (1, 12, 0));
        assert_eq!(range(3, conv(12, 0, 0, 0)), (10, 12, 9));
        assert_eq!(range(12, conv(12, 0, 0, 0)), (1, 12, 0));
        assert_eq!(range(3, conv(12, 0, 4, 0)), (10, 12, 9));
        assert_eq!(range(8, conv(12, 0, 4, 0)), (5, 12, 0));
        assert_eq!(range(1, conv(12, 0, 4, 10)), (12, 12, 11));
        assert_eq!(range(2, conv(12, 0, 4, 10)), (11, 12, 0));
        // Removed from the group at seq 6: nothing after it, and the bound counts from there.
        assert_eq!(range(2, conv(20, 6, 0, 0)), (5, 6, 4));
        assert_eq!(range(0, conv(20, 6, 0, 0)), (1, 6, 0));
        // Everything readable seen already: an empty range, nothing skipped.
        assert_eq!(range(2, conv(20, 6, 9, 0)), (10, 6, 0));
        assert_eq!(range(2, conv(12, 0, 12, 0)), (13, 12, 0));
    }
}
