//! The admin and push HTTP API: JSON over HTTP/1.1 or HTTP/2 on its own listen address, HTTPS
//! when a certificate is configured.
//!
//! It runs on the side runtime (one tokio thread, off the cores). Everything about connected
//! users goes to the user's core through the [`Bridge`]; reads of the log go to the store
//! directly (RocksDB reads are thread-safe, and they block this thread, not a core).
//!
//! Every request must carry `Authorization: Bearer <api secret>`; anything else is answered
//! 401 and changes nothing. Requests are rate-limited as a whole (`api_rate_per_sec`). Errors
//! are JSON objects with the wire protocol's error code (docs/API.md).
//!
//! Not done here: per-key quotas (there is one admin secret), request signing with timestamps.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tern_protocol::v1::frame::Body;
use tern_protocol::v1::{ContentType, Target, TargetKind};
use tern_protocol::{ErrorCode, Frame, KickReason};
use tern_storage::MessageStore;

use crate::admin::{Bridge, BridgeError};
use crate::config::Config;
use crate::limits::{Gcra, Rate, mono_nanos};
use crate::token::{self, Claims, Secret, valid_id};

/// Largest request body the API reads.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Most users one import may register.
pub const MAX_IMPORT: usize = 1000;

/// What every handler shares.
#[derive(Debug)]
pub struct ApiState {
    pub bridge: Bridge,
    pub store: Arc<dyn MessageStore>,
    pub cfg: Arc<Config>,
    /// Signs user tokens (the gateway's secret).
    pub secret: Secret,
    /// SHA-256 of the admin secret: requests are compared by digest, so the comparison's timing
    /// says nothing about the secret.
    api_key_digest: [u8; 32],
    limiter: Mutex<Gcra>,
    rate: Rate,
    /// For their counters in /metrics.
    pub webhooks: crate::webhook::Webhooks,
    /// Push ids.
    pub push_ids: crate::push_api::PushIds,
    /// For the push providers' counters in /metrics.
    pub notifier: crate::notify::Notifier,
}

impl ApiState {
    pub fn new(
        bridge: Bridge,
        store: Arc<dyn MessageStore>,
        cfg: Arc<Config>,
        secret: Secret,
        api_secret: &str,
    ) -> ApiState {
        let per_sec = u64::from(cfg.api_rate_per_sec);
        ApiState {
            bridge,
            store,
            rate: Rate::new(per_sec, per_sec.saturating_mul(2)),
            cfg,
            secret,
            api_key_digest: Sha256::digest(api_secret.as_bytes()).into(),
            limiter: Mutex::new(Gcra::default()),
            webhooks: crate::webhook::Webhooks::disabled(),
            push_ids: Default::default(),
            notifier: crate::notify::Notifier::disabled(),
        }
    }
}

/// An API error: an HTTP status and the wire error code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status: status_of(code),
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidArgument, message)
    }
}

impl From<BridgeError> for ApiError {
    fn from(e: BridgeError) -> ApiError {
        ApiError::new(ErrorCode::Unavailable, e.to_string())
    }
}

impl From<tern_storage::StorageError> for ApiError {
    fn from(e: tern_storage::StorageError) -> ApiError {
        let (code, msg) = crate::core::storage_error_code(&e);
        ApiError::new(code, msg)
    }
}

/// The HTTP status for a wire error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    use ErrorCode as E;
    match code {
        E::Unauthenticated | E::TokenInvalid | E::TokenExpired | E::TokenRevoked => {
            StatusCode::UNAUTHORIZED
        }
        E::NotFound | E::SessionNotFound => StatusCode::NOT_FOUND,
        E::Conflict => StatusCode::CONFLICT,
        E::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        E::PayloadTooLarge | E::FrameTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        E::LimitExceeded => StatusCode::UNPROCESSABLE_ENTITY,
        E::Forbidden | E::Blocked | E::Muted | E::NotMember | E::TooManyDevices => {
            StatusCode::FORBIDDEN
        }
        E::Unavailable | E::ConnectionLimit => StatusCode::SERVICE_UNAVAILABLE,
        E::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "code": self.code as i32,
                "name": self.code.as_str_name(),
                "message": self.message,
            }
        });
        (self.status, axum::Json(body)).into_response()
    }
}

pub(crate) type ApiResult = Result<axum::Json<Value>, ApiError>;

/// The API's routes, with authentication and the rate limit in front of all of them.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/v1/users/import", post(import_users))
        .route("/v1/users/{user}/token", post(issue_token))
        .route("/v1/users/{user}/kick", post(kick))
        .route("/v1/users/{user}/ban", post(ban).delete(unban))
        .route("/v1/users/{user}/revoke-tokens", post(revoke_tokens))
        .route("/v1/users/{user}/request", post(user_request))
        .route("/v1/system/request", post(system_request))
        .route("/v1/messages", post(send_message))
        .route("/v1/messages/recall", post(recall))
        .route("/v1/conversations/{conversation}/messages", get(history))
        .route("/v1/groups", post(group_request))
        .route(
            "/v1/groups/{group}/hidden-members",
            post(add_hidden_member).get(list_hidden_members),
        )
        .route(
            "/v1/groups/{group}/hidden-members/{user}",
            axum::routing::delete(remove_hidden_member),
        )
        .merge(crate::push_api::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Authentication, then the rate limit: a request without the right secret changes nothing and
/// does not use up the rate.
async fn guard(State(st): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok =
        given.is_some_and(|g| <[u8; 32]>::from(Sha256::digest(g.as_bytes())) == st.api_key_digest);
    if !ok {
        let mut r = ApiError::new(
            ErrorCode::Unauthenticated,
            "missing or wrong admin secret: send `Authorization: Bearer <api secret>`",
        )
        .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    let allowed = st
        .limiter
        .lock()
        .map(|mut g| g.allow(&st.rate, mono_nanos(), 1))
        .unwrap_or(true);
    if !allowed {
        return ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "more than {} API requests per second",
                st.cfg.api_rate_per_sec
            ),
        )
        .into_response();
    }
    json_errors(next.run(req).await).await
}

/// Refusals made before a handler runs (a body over the limit, a query or path that does not
/// parse, a method the path does not take) come from the framework as plain text: they are
/// turned into the API's JSON errors, keeping their status.
async fn json_errors(r: Response) -> Response {
    let status = r.status();
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return r;
    }
    let text = axum::body::to_bytes(r.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let (code, fallback) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            ErrorCode::PayloadTooLarge,
            format!("the request body is over {MAX_BODY_BYTES} bytes"),
        ),
        StatusCode::METHOD_NOT_ALLOWED => (
            ErrorCode::InvalidArgument,
            "this path does not take this method (see docs/API.md)".to_owned(),
        ),
        StatusCode::NOT_FOUND => (ErrorCode::NotFound, "not found".to_owned()),
        s if s.is_server_error() => (ErrorCode::Internal, "server error".to_owned()),
        _ => (ErrorCode::InvalidArgument, "bad request".to_owned()),
    };
    let message = if text.is_empty() || status == StatusCode::PAYLOAD_TOO_LARGE {
        fallback
    } else {
        text
    };
    ApiError {
        status,
        code,
        message,
    }
    .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such endpoint (see docs/API.md)")
}

/// Parses a JSON body, answering INVALID_ARGUMENT with serde's message (it names the field).
pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<T, ApiError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE)
        && !ct.to_str().is_ok_and(|c| c.starts_with("application/json"))
    {
        return Err(ApiError::bad("Content-Type must be application/json"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("bad JSON body: {e}")))
}

pub(crate) fn check_user(user: &str) -> Result<(), ApiError> {
    if valid_id(user) {
        Ok(())
    } else {
        Err(ApiError::bad(
            "user id must be 1..=64 bytes without control characters",
        ))
    }
}

/// The JSON of an answer frame (its body, keyed by its type as in the protocol's JSON mapping),
/// or the error it carries.
fn answer(frame: Frame) -> ApiResult {
    if let Some(Body::Error(e)) = &frame.body {
        let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
        return Err(ApiError::new(code, e.message.clone()));
    }
    let mut v = serde_json::to_value(&frame)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    if let Some(o) = v.as_object_mut() {
        o.remove("requestId");
    }
    Ok(axum::Json(v))
}

async fn stats(State(st): State<Arc<ApiState>>) -> ApiResult {
    let cores = st.bridge.stats().await?;
    let sum = |f: fn(&crate::admin::CoreStats) -> usize| cores.iter().map(f).sum::<usize>();
    Ok(axum::Json(json!({
        "users_online": sum(|c| c.users),
        "devices_online": sum(|c| c.devices),
        "sessions": sum(|c| c.sessions),
        "connections": sum(|c| c.connections),
        "cores": cores,
    })))
}

/// Prometheus text format: the cores' counters and histograms, and their current gauges.
async fn metrics(State(st): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    use std::fmt::Write as _;
    let cores = st.bridge.stats().await?;
    let mut extra = String::new();
    type Gauge = (
        &'static str,
        &'static str,
        fn(&crate::admin::CoreStats) -> usize,
    );
    let gauges: [Gauge; 7] = [
        ("tern_connections", "Open connections.", |c| c.connections),
        ("tern_sessions", "Logged-in sessions (paths).", |c| {
            c.sessions
        }),
        ("tern_users_online", "Users with a session.", |c| c.users),
        (
            "tern_devices_online",
            "Devices (logical sessions) online.",
            |c| c.devices,
        ),
        (
            "tern_appends_pending",
            "Appends waiting for the store.",
            |c| c.appends_pending,
        ),
        (
            "tern_room_queue",
            "Room messages waiting for fan-out.",
            |c| c.room_queue,
        ),
        (
            "tern_room_history_bytes",
            "Bytes of room messages kept for viewers entering.",
            |c| c.room_history_bytes,
        ),
    ];
    for (name, help, get) in gauges {
        let _ = writeln!(extra, "# HELP {name} {help}\n# TYPE {name} gauge");
        for c in &cores {
            let _ = writeln!(extra, "{name}{{core=\"{}\"}} {}", c.core, get(c));
        }
    }
    let w = st.webhooks.counters();
    let name = "tern_webhook_events_total";
    let _ = writeln!(
        extra,
        "# HELP {name} Webhook after-events by outcome.\n# TYPE {name} counter"
    );
    for (outcome, n) in [
        ("queued", w.queued),
        ("delivered", w.delivered),
        ("attempt_failed", w.attempts_failed),
        ("retried", w.retried),
        ("dropped", w.dropped),
        ("gave_up", w.gave_up),
    ] {
        let _ = writeln!(extra, "{name}{{outcome=\"{outcome}\"}} {n}");
    }
    let name = "tern_webhook_before_send_total";
    let _ = writeln!(
        extra,
        "# HELP {name} Before-send hook calls by outcome.\n# TYPE {name} counter"
    );
    for (outcome, n) in [
        ("allowed", w.before_send_allowed),
        ("rejected", w.before_send_rejected),
        ("replaced", w.before_send_replaced),
        ("failed", w.before_send_failed),
    ] {
        let _ = writeln!(extra, "{name}{{outcome=\"{outcome}\"}} {n}");
    }
    commit_histograms(&mut extra, &st.store.commit_stats());
    let n = st.notifier.counters();
    let name = "tern_push_provider_total";
    let _ = writeln!(
        extra,
        "# HELP {name} Offline push notifications by provider and outcome.\n# TYPE {name} counter"
    );
    for provider in crate::notify::Provider::ALL {
        let c = n.get(provider);
        for (outcome, v) in [
            ("sent", c.sent),
            ("failed", c.failed),
            ("dropped", c.dropped),
            ("invalid_token", c.invalid_token),
        ] {
            let _ = writeln!(
                extra,
                "{name}{{provider=\"{}\",outcome=\"{outcome}\"}} {v}",
                provider.as_str()
            );
        }
    }
    let text = st.bridge.metrics.render(&extra);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// The store's group-commit counters as two Prometheus histograms: batch size (operations) and
/// commit time (seconds).
fn commit_histograms(out: &mut String, c: &tern_storage::CommitStats) {
    use std::fmt::Write as _;
    let name = "tern_storage_commit_batch_size";
    let _ = writeln!(
        out,
        "# HELP {name} Operations per group commit.\n# TYPE {name} histogram"
    );
    let mut cumulative = 0;
    for (bound, n) in tern_storage::COMMIT_SIZE_BOUNDS.iter().zip(&c.size_buckets) {
        cumulative += n;
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", c.commits);
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", c.ops, c.commits);
    let name = "tern_storage_commit_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time of a group commit (WAL write and sync).\n# TYPE {name} histogram"
    );
    let mut cumulative = 0;
    for (bound, n) in tern_storage::COMMIT_MICROS_BOUNDS
        .iter()
        .zip(&c.micros_buckets)
    {
        cumulative += n;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", c.commits);
    let _ = writeln!(
        out,
        "{name}_sum {}\n{name}_count {}",
        c.micros_sum as f64 / 1e6,
        c.commits
    );
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportUsers {
    users: Vec<ImportUser>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportUser {
    id: String,
}

/// Registers users (allocates their ids) so they can be messaged and added to groups before
/// they first log in. Idempotent.
async fn import_users(
    State(st): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let req: ImportUsers = parse(&headers, &body)?;
    if req.users.len() > MAX_IMPORT {
        return Err(ApiError::new(
            ErrorCode::LimitExceeded,
            format!("at most {MAX_IMPORT} users per import"),
        ));
    }
    for u in &req.users {
        check_user(&u.id)?;
    }
    let mut created = 0;
    for u in &req.users {
        if st.store.lookup_user(&u.id)?.is_none() {
            created += 1;
        }
        st.store.intern_user(&u.id)?;
    }
    // Registered means registered: one sync for the whole import.
    st.store.sync_interned()?;
    Ok(axum::Json(
        json!({ "imported": req.users.len(), "created": created }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    /// Lifetime in seconds (default 7 days).
    ttl_secs: Option<u64>,
    /// Bind the token to one device id.
    device: Option<String>,
}

async fn issue_token(
    State(st): State<Arc<ApiState>>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    check_user(&user)?;
    let req: TokenRequest = if body.is_empty() {
        TokenRequest::default()
    } else {
        parse(&headers, &body)?
    };
    let ttl = req.ttl_secs.unwrap_or(7 * 86_400);
    if ttl == 0 || ttl > 366 * 86_400 {
        return Err(ApiError::bad("ttl_secs must be 1..=31622400 (one year)"));
    }
    if let Some(d) = &req.device
        && !valid_id(d)
    {
        return Err(ApiError::bad(
            "device must be 1..=64 bytes without control characters",
        ));
    }
    let exp = token::now_secs() + ttl;
    let token = token::mint(
        &st.secret,
        &Claims {
            v: 1,
            sub: user.clone(),
            exp,
            dev: req.device,
            iat_ms: crate::admin::after_revocation(&*st.store, &user, crate::core::now_ms()),
        },
    );
    Ok(axum::Json(
        json!({ "user": user, "token": token, "expires_at": exp }),
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KickRequest {
    reason: Option<String>,
}

async fn kick(
    State(st): State<Arc<ApiState>>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    check_user(&user)?;
    let req: KickRequest = if body.is_empty() {
        KickRequest::default()
    } else {
        parse(&headers, &body)?
    };
    let message = req
        .reason
        .unwrap_or_else(|| "disconnected by an administrator".into());
    if message.len() > 256 {
        return Err(ApiError::bad("reason must be at most 256 bytes"));
    }
    let kicked = st.bridge.kick(&user, KickReason::Admin, &message).await?;
    Ok(axum::Json(json!({ "user": user, "kicked": kicked })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct BanRequest {
    /// How long (seconds); until lifted when absent.
    duration_secs: Option<u64>,
}

/// Bans a user: their connections are kicked (REVOKED) and logins fail with TOKEN_REVOKED until
/// the ban ends or is lifted. Stored, so it survives restarts.
async fn ban(
    State(st): State<Arc<ApiState>>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    check_user(&user)?;
    let req: BanRequest = if body.is_empty() {
        BanRequest::default()
    } else {
        parse(&headers, &body)?
    };
    let until = match req.duration_secs {
        None => 0,
        Some(0) => return Err(ApiError::bad("duration_secs must be at least 1")),
        Some(s) => crate::core::now_ms().saturating_add(s.saturating_mul(1000)),
    };
    st.store
        .set_meta(vec![tern_storage::MetaChange {
            key: crate::admin::ban_key(&user).into(),
            value: Some(bytes::Bytes::copy_from_slice(&until.to_be_bytes())),
        }])
        .await?;
    let kicked = st
        .bridge
        .kick(&user, KickReason::Revoked, "the user is banned")
        .await?;
    Ok(axum::Json(
        json!({ "user": user, "banned_until_ms": until, "kicked": kicked }),
    ))
}

async fn unban(State(st): State<Arc<ApiState>>, Path(user): Path<String>) -> ApiResult {
    check_user(&user)?;
    let was = crate::admin::banned(&*st.store, &user, crate::core::now_ms());
    st.store
        .set_meta(vec![tern_storage::MetaChange {
            key: crate::admin::ban_key(&user).into(),
            value: None,
        }])
        .await?;
    Ok(axum::Json(json!({ "user": user, "was_banned": was })))
}

/// Revokes every token of `user` issued until now (a lost phone, a leaked token): logins with
/// them fail with TOKEN_REVOKED, the user's connections are kicked (REVOKED), and tokens issued
/// afterwards work. Stored, so it survives restarts.
async fn revoke_tokens(State(st): State<Arc<ApiState>>, Path(user): Path<String>) -> ApiResult {
    check_user(&user)?;
    // After the last revocation: it must cover tokens minted just after that one.
    let at = crate::admin::after_revocation(&*st.store, &user, crate::core::now_ms());
    st.store
        .set_meta(vec![tern_storage::MetaChange {
            key: crate::admin::revoke_key(&user).into(),
            value: Some(bytes::Bytes::copy_from_slice(&at.to_be_bytes())),
        }])
        .await?;
    let kicked = st
        .bridge
        .kick(&user, KickReason::Revoked, "the user's tokens were revoked")
        .await?;
    Ok(axum::Json(
        json!({ "user": user, "revoked_until_ms": at, "kicked": kicked }),
    ))
}

/// Client requests the API may make on a user's behalf: those that answer once and leave no
/// state behind on a connection (not Sync, Ack, rooms, typing or presence).
fn api_request_allowed(body: &Body) -> bool {
    matches!(
        body,
        Body::Send(_)
            | Body::History(_)
            | Body::Group(_)
            | Body::MarkRead(_)
            | Body::GetReadCounts(_)
            | Body::SetConversation(_)
            | Body::Recall(_)
            | Body::Social(_)
    )
}

async fn run_request(
    st: &ApiState,
    user: &str,
    admin: bool,
    body: &Bytes,
    headers: &HeaderMap,
) -> ApiResult {
    let frame: Frame = parse(headers, body)?;
    match &frame.body {
        Some(b) if api_request_allowed(b) => {}
        Some(_) => {
            return Err(ApiError::bad(
                "this request is not available through the API (allowed: send, history, group, \
                 markRead, getReadCounts, setConversation, recall, social)",
            ));
        }
        None => {
            return Err(ApiError::bad(
                "the body names no request (e.g. {\"send\": {...}})",
            ));
        }
    }
    answer(st.bridge.request(user, admin, frame).await?)
}

/// Any client request, made as `user` (the protocol's JSON mapping of a Frame's body).
async fn user_request(
    State(st): State<Arc<ApiState>>,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    check_user(&user)?;
    run_request(&st, &user, user == st.cfg.system_user, &body, &headers).await
}

/// Any client request, made as the system user (owner rights in every group).
async fn system_request(
    State(st): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let system = st.cfg.system_user.clone();
    run_request(&st, &system, true, &body, &headers).await
}

/// A group operation (the protocol's GroupRequest in JSON) as the system user, or as `as`.
async fn group_request(
    State(st): State<Arc<ApiState>>,
    Query(q): Query<AsUser>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let req: tern_protocol::v1::GroupRequest = parse(&headers, &body)?;
    let (user, admin) = acting(&st, q.r#as)?;
    answer(st.bridge.request(&user, admin, Frame::new(1, req)).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HiddenMember {
    user: String,
}

/// No query parameters: the hidden-member endpoints act as the system user only, so an `as`
/// (or anything else) is refused rather than ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

fn check_group(group: &str) -> Result<(), ApiError> {
    if valid_id(group) {
        Ok(())
    } else {
        Err(ApiError::bad(
            "group id must be 1..=64 bytes without control characters",
        ))
    }
}

/// The GroupResponse of a hidden-member operation, or the error it was refused with.
async fn hidden_op(
    st: &ApiState,
    group: &str,
    op: crate::groups::HiddenOp,
) -> Result<tern_protocol::v1::GroupResponse, ApiError> {
    let frame = st
        .bridge
        .hidden_members(&st.cfg.system_user, group, op)
        .await?;
    match frame.body {
        Some(Body::GroupResponse(r)) => Ok(r),
        Some(Body::Error(e)) => {
            let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Internal);
            Err(ApiError::new(code, e.message))
        }
        _ => Err(ApiError::new(ErrorCode::Internal, "unexpected answer")),
    }
}

/// Makes a user a hidden member of a group: they receive everything, may send, and are listed
/// to no member. The group's log records it with an event that names nobody.
async fn add_hidden_member(
    State(st): State<Arc<ApiState>>,
    Path(group): Path<String>,
    Query(NoParams {}): Query<NoParams>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    check_group(&group)?;
    let req: HiddenMember = parse(&headers, &body)?;
    check_user(&req.user)?;
    let r = hidden_op(&st, &group, crate::groups::HiddenOp::Add(req.user.clone())).await?;
    Ok(axum::Json(json!({
        "group_id": group,
        "user": req.user,
        "added": r.event_seq != 0,
        "conversation_id": r.conversation_id.to_string(),
        "event_seq": r.event_seq,
    })))
}

/// Removes a hidden member: their history ends at the event that removed them.
async fn remove_hidden_member(
    State(st): State<Arc<ApiState>>,
    Path((group, user)): Path<(String, String)>,
    Query(NoParams {}): Query<NoParams>,
) -> ApiResult {
    check_group(&group)?;
    check_user(&user)?;
    let r = hidden_op(&st, &group, crate::groups::HiddenOp::Remove(user.clone())).await?;
    Ok(axum::Json(json!({
        "group_id": group,
        "user": user,
        "conversation_id": r.conversation_id.to_string(),
        "event_seq": r.event_seq,
    })))
}

/// A group's hidden members, in ascending order of internal id.
async fn list_hidden_members(
    State(st): State<Arc<ApiState>>,
    Path(group): Path<String>,
    Query(NoParams {}): Query<NoParams>,
) -> ApiResult {
    check_group(&group)?;
    let r = hidden_op(&st, &group, crate::groups::HiddenOp::List).await?;
    let members: Vec<Value> = r
        .members
        .map(|p| p.members)
        .unwrap_or_default()
        .into_iter()
        .map(|m| json!({"user": m.user_id, "joined_at_ms": m.joined_at_ms}))
        .collect();
    Ok(axum::Json(json!({
        "group_id": group,
        "hidden_members": members,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AsUser {
    r#as: Option<String>,
}

/// Who a request acts as: a named user, or the system user (with admin rights).
fn acting(st: &ApiState, user: Option<String>) -> Result<(String, bool), ApiError> {
    match user {
        Some(u) => {
            check_user(&u)?;
            let admin = u == st.cfg.system_user;
            Ok((u, admin))
        }
        None => Ok((st.cfg.system_user.clone(), true)),
    }
}

/// A request's payload: `text` (UTF-8) or `payload_base64`, exactly one of them.
pub(crate) fn payload_of(
    text: Option<String>,
    payload_base64: Option<String>,
) -> Result<bytes::Bytes, ApiError> {
    match (text, payload_base64) {
        (Some(t), None) => Ok(bytes::Bytes::from(t)),
        (None, Some(b)) => BASE64
            .decode(b)
            .map(bytes::Bytes::from)
            .map_err(|e| ApiError::bad(format!("payload_base64: {e}"))),
        _ => Err(ApiError::bad("give exactly one of text and payload_base64")),
    }
}

/// A ContentType by its name (TEXT, IMAGE, ..., CUSTOM, SYSTEM); TEXT when absent.
pub(crate) fn content_type_of(name: Option<&str>) -> Result<ContentType, ApiError> {
    match name {
        None => Ok(ContentType::Text),
        Some(name) => ContentType::from_str_name(name)
            .filter(|c| *c != ContentType::Unspecified)
            .ok_or_else(|| ApiError::bad(format!("content_type: unknown content type {name:?}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendMessage {
    /// The sender; the system user when absent.
    from: Option<String>,
    /// A user id (1:1) ...
    to_user: Option<String>,
    /// ... or a group id ...
    to_group: Option<String>,
    /// ... or a live room's id (the room's viewers get it; no viewer needed).
    to_room: Option<String>,
    /// A priority room message (a gift, a notice): kept for viewers whose queue is fuller.
    #[serde(default)]
    priority: bool,
    /// UTF-8 text (content type TEXT unless `content_type` says otherwise) ...
    text: Option<String>,
    /// ... or the payload's bytes in base64.
    payload_base64: Option<String>,
    /// A ContentType name (TEXT, IMAGE, ..., CUSTOM, SYSTEM).
    content_type: Option<String>,
    #[serde(default)]
    custom_type: String,
    /// Idempotency key (generated when absent).
    client_msg_id: Option<String>,
}

async fn send_message(
    State(st): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    let req: SendMessage = parse(&headers, &body)?;
    let (from, admin) = acting(&st, req.from)?;
    let (kind, id) = match (req.to_user, req.to_group, req.to_room) {
        (Some(u), None, None) => (TargetKind::User, u),
        (None, Some(g), None) => (TargetKind::Group, g),
        (None, None, Some(r)) => (TargetKind::Room, r),
        _ => {
            return Err(ApiError::bad(
                "give exactly one of to_user, to_group and to_room",
            ));
        }
    };
    if req.priority && kind != TargetKind::Room {
        return Err(ApiError::bad("priority is for to_room only"));
    }
    let target = Target {
        kind: kind as i32,
        id,
    };
    let payload = payload_of(req.text, req.payload_base64)?;
    let content_type = content_type_of(req.content_type.as_deref())?;
    let client_msg_id = req
        .client_msg_id
        .unwrap_or_else(|| format!("api-{:032x}", rand::random::<u128>()));
    let send = tern_protocol::Send {
        client_msg_id,
        target: Some(target),
        content_type: content_type as u32,
        custom_type: req.custom_type,
        payload,
        priority: req.priority,
    };
    answer(st.bridge.request(&from, admin, Frame::new(1, send)).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecallRequest {
    /// Who recalls: the sender (within the recall window) or a group admin; the system user
    /// (owner rights in groups) when absent.
    r#as: Option<String>,
    conversation_id: u64,
    seq: u64,
}

async fn recall(State(st): State<Arc<ApiState>>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let req: RecallRequest = parse(&headers, &body)?;
    let (user, admin) = acting(&st, req.r#as)?;
    let frame = Frame::new(
        1,
        tern_protocol::v1::Recall {
            conversation_id: req.conversation_id,
            seq: req.seq,
        },
    );
    answer(st.bridge.request(&user, admin, frame).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    /// Messages before this seq (newest first); the latest when absent.
    before: Option<u64>,
    limit: Option<u32>,
}

/// A conversation's messages read straight from the log, newest first (no membership check:
/// the admin reads everything).
async fn history(
    State(st): State<Arc<ApiState>>,
    Path(conversation): Path<u64>,
    Query(q): Query<HistoryQuery>,
) -> ApiResult {
    let limit = q.limit.unwrap_or(50).clamp(1, st.cfg.max_page) as usize;
    let before = match q.before {
        Some(b) => b,
        None => st.store.latest_seq(conversation)?.saturating_add(1),
    };
    let messages = st.store.read_backward(conversation, before, limit)?;
    let mut names = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        let sender = match names.get(&m.sender) {
            Some(n) => String::clone(n),
            None => {
                let n = st.store.user_name(m.sender)?.unwrap_or_default();
                names.insert(m.sender, n.clone());
                n
            }
        };
        out.push(json!({
            "seq": m.seq,
            "sender": sender,
            "server_time_ms": m.timestamp_ms,
            "client_msg_id": m.client_msg_id,
            "content_type": ContentType::try_from(m.content_type as i32)
                .map(|c| c.as_str_name().to_owned())
                .unwrap_or_else(|_| m.content_type.to_string()),
            "custom_type": m.custom_type,
            "payload_base64": BASE64.encode(&m.payload),
            "recalled": m.recalled,
        }));
    }
    Ok(axum::Json(json!({
        "conversation_id": conversation,
        "messages": out,
    })))
}

/// Serves the API on `listener` until `stop` resolves (TLS when `tls` is given).
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    stop: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let service = hyper_util::service::TowerToHyperService::new(app);
    let accept = async {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors or similar: say so, and back off rather than spin.
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = service.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let result = match tls {
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(s) => builder.serve_connection(TokioIo::new(s), service).await,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "API TLS handshake failed");
                            return;
                        }
                    },
                    None => {
                        builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "API connection ended");
                }
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = stop => {}
    }
}

/// The address the API listens on, for logs.
pub fn describe(addr: SocketAddr, tls: bool) -> String {
    format!("{}://{addr}", if tls { "https" } else { "http" })
}
