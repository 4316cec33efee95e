//! Webhooks: signed HTTP callbacks from the gateway to the app's own server.
//!
//! Two kinds of call, both `POST <url>` with a JSON body:
//!
//! * **After-events** ([`Webhooks::emit`]) tell the app what happened. They are queued and sent
//!   in the background; the gateway never waits for them. The kinds the gateway emits (the
//!   `events` option picks some of them; empty means all):
//!   - `after_send` ([`AFTER_SEND`]): a 1:1 or group message was stored and sent (room
//!     messages are not reported);
//!   - `login` ([`LOGIN`]): a device logged in;
//!   - `logout` ([`LOGOUT`]): a device logged out or its connection closed;
//!   - `group_event` ([`GROUP_EVENT`]): a group was created or changed, or its members did;
//!   - `delivery_receipt` ([`DELIVERY_RECEIPT`]): a recipient's device acknowledged messages.
//! * **Before-send** ([`Webhooks::before_send`], kind `before_send`, only when the
//!   `before_send` option is on) asks the app about a message before it is stored. The app
//!   answers 200 with `{"action":"allow"}`, `{"action":"reject","reason":"..."}` (the reason
//!   goes back to the sender; absent means empty) or
//!   `{"action":"replace","payload_base64":"...","custom_type":"..."}` (`custom_type` optional;
//!   standard base64 with padding). A timeout, another status, an answer that does not parse or
//!   a bad `payload_base64` count as a failure, and `fail_open` decides: allow the message, or
//!   reject it with "webhook unavailable". The caller checks a replaced payload against its own
//!   size limit.
//!
//! # Requests
//!
//! The body is the envelope `{"event": <kind>, "id": <delivery id>, "time_ms": <unix ms when the
//! event happened>, "data": <the event's data>}`. Before-send data is [`BeforeSend`]; its
//! `conversation_id` is a decimal string because conversation ids go past 2^53, where
//! JavaScript numbers lose digits (the protobuf JSON mapping writes 64-bit integers the same way).
//! Headers:
//!
//! * `X-Tern-Event: <kind>`;
//! * `X-Tern-Delivery: <id>`, 32 hex digits, the same on every retry of one event, so the
//!   receiver can drop duplicates;
//! * `X-Tern-Signature: t=<unix ms>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`, signed again
//!   for each attempt. Receivers check it with [`verify`]: compute the HMAC over the raw body
//!   bytes as received, compare in constant time, and refuse a `t` too far from their clock.
//!
//! # After-event guarantees
//!
//! At least once while the process lives: an attempt fails on a non-2xx status, a timeout or a
//! connection error, and is retried with exponential backoff up to `max_attempts` times. Events
//! are not ordered (`concurrency` requests run at once, and a retried event arrives after later
//! ones), and they live in memory only. At most `queue_capacity` events are held at once, counting those in
//! flight and those waiting to retry; past that, `emit` drops the event and counts it, so a dead
//! or slow endpoint costs memory up to that bound and never time on the cores.
//!
//! # Threads
//!
//! The cores are glommio executors; HTTP, timers and retries run on the side runtime (tokio),
//! whose [`Handle`] is given to [`Webhooks::start`] and which must have I/O and time enabled.
//! What cores call never blocks: `emit` is a `try_send`, and the futures of
//! [`Webhooks::before_send`] and [`Webhooks::flush`] only wait on a channel or a notification,
//! so any executor can await them.
//!
//! What this module does not do: keep events across restarts, order them, follow redirects
//! (a 3xx is a failure, so a signed body never goes to another host), use proxies from the
//! environment, or trust other certificate authorities than Mozilla's (`webpki-roots`).

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize, Serializer};
use sha2::Sha256;
use tokio::runtime::Handle;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

type HmacSha256 = Hmac<Sha256>;

/// After-event: a 1:1 or group message was stored and sent.
pub const AFTER_SEND: &str = "after_send";
/// After-event: a device logged in.
pub const LOGIN: &str = "login";
/// After-event: a device logged out or its connection closed.
pub const LOGOUT: &str = "logout";
/// After-event: a group or its membership changed.
pub const GROUP_EVENT: &str = "group_event";
/// After-event: a recipient's device acknowledged messages.
pub const DELIVERY_RECEIPT: &str = "delivery_receipt";
/// The kind of the before-send call.
pub const BEFORE_SEND: &str = "before_send";
/// Every after-event kind, the values `events` accepts.
pub const EVENT_KINDS: [&str; 5] = [AFTER_SEND, LOGIN, LOGOUT, GROUP_EVENT, DELIVERY_RECEIPT];

/// Header naming the event kind.
pub const HEADER_EVENT: &str = "x-tern-event";
/// Header with the delivery id (the same on every retry).
pub const HEADER_DELIVERY: &str = "x-tern-delivery";
/// Header with the signature, see [`sign`].
pub const HEADER_SIGNATURE: &str = "x-tern-signature";

/// The reason of a rejection by `fail_open = false`.
pub const UNAVAILABLE: &str = "webhook unavailable";

/// Longest wait between two attempts.
const MAX_BACKOFF_MS: u64 = 60_000;
/// Largest before-send answer read; a replaced payload in base64 fits with room to spare.
const MAX_ANSWER_BYTES: usize = 4 << 20;
/// How much of an after-event answer is read (and thrown away) so the connection can be reused.
const DRAIN_BYTES: usize = 64 << 10;
/// At most one warning per this many milliseconds; the counters carry the rest.
const WARN_EVERY_MS: u64 = 10_000;

/// The `[webhook]` table of the gateway config.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// The app's endpoint, `http://` or `https://`. Default empty: no webhooks (`emit` does
    /// nothing and before-send allows every message). A password in it is printed and logged
    /// as `REDACTED`.
    #[serde(serialize_with = "crate::config::serialize_redacted_url")]
    pub url: String,
    /// HMAC-SHA256 key signing every request; required when `url` is set. Default empty.
    /// Never logged.
    #[serde(skip_serializing)]
    pub secret: String,
    /// Time limit of one after-event attempt (connect, send, answer), in milliseconds.
    /// Default 3000.
    pub timeout_ms: u64,
    /// Call the before-send hook for every message. Default false.
    pub before_send: bool,
    /// Time limit of one before-send call in milliseconds: the sender waits this long at most.
    /// Default 500.
    pub before_send_timeout_ms: u64,
    /// When the before-send hook times out or fails: true (default) allows the message, false
    /// rejects it with "webhook unavailable".
    pub fail_open: bool,
    /// Most after-events held at once: queued, in flight or waiting to retry. More are dropped
    /// and counted. Default 10,000.
    pub queue_capacity: usize,
    /// Attempts per after-event, the first included. Default 5.
    pub max_attempts: u32,
    /// Wait before the first retry in milliseconds, doubled for each further retry and capped
    /// at 60 s; each wait is cut by a random amount of up to half. Default 500.
    pub retry_base_ms: u64,
    /// Most after-event requests in flight at once. Default 16.
    pub concurrency: usize,
    /// After-event kinds to send (`after_send`, `login`, `logout`, `group_event`,
    /// `delivery_receipt`); empty (default) sends all.
    pub events: Vec<String>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            url: String::new(),
            secret: String::new(),
            timeout_ms: 3000,
            before_send: false,
            before_send_timeout_ms: 500,
            fail_open: true,
            queue_capacity: 10_000,
            max_attempts: 5,
            retry_base_ms: 500,
            concurrency: 16,
            events: Vec::new(),
        }
    }
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &crate::config::redact_url(&self.url))
            .field("secret", &"..")
            .field("timeout_ms", &self.timeout_ms)
            .field("before_send", &self.before_send)
            .field("before_send_timeout_ms", &self.before_send_timeout_ms)
            .field("fail_open", &self.fail_open)
            .field("queue_capacity", &self.queue_capacity)
            .field("max_attempts", &self.max_attempts)
            .field("retry_base_ms", &self.retry_base_ms)
            .field("concurrency", &self.concurrency)
            .field("events", &self.events)
            .finish()
    }
}

impl WebhookConfig {
    /// Checks every value; the error names the bad key.
    pub fn validate(&self) -> Result<(), String> {
        fn bad(key: &str, message: impl fmt::Display) -> Result<(), String> {
            Err(format!("webhook.{key}: {message}"))
        }
        if self.url.is_empty() {
            if self.before_send {
                return bad("before_send", "needs webhook.url");
            }
        } else {
            match reqwest::Url::parse(&self.url) {
                Err(e) => return bad("url", e),
                Ok(url) if !matches!(url.scheme(), "http" | "https") => {
                    return bad("url", "must start with http:// or https://");
                }
                Ok(_) => {}
            }
            if self.secret.is_empty() {
                return bad("secret", "required when webhook.url is set");
            }
        }
        for (key, value) in [
            ("timeout_ms", self.timeout_ms),
            ("before_send_timeout_ms", self.before_send_timeout_ms),
            ("max_attempts", u64::from(self.max_attempts)),
            ("retry_base_ms", self.retry_base_ms),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if self.retry_base_ms > MAX_BACKOFF_MS {
            return bad("retry_base_ms", format!("must be at most {MAX_BACKOFF_MS}"));
        }
        // Upper bounds keep tokio's channel and semaphore below their limits (they panic
        // beyond), far above anything useful.
        for (key, value, max) in [
            ("queue_capacity", self.queue_capacity, 100_000_000),
            ("concurrency", self.concurrency, 100_000),
        ] {
            if !(1..=max).contains(&value) {
                return bad(key, format!("must be between 1 and {max}"));
            }
        }
        if let Some(unknown) = self
            .events
            .iter()
            .find(|e| !EVENT_KINDS.contains(&e.as_str()))
        {
            return bad(
                "events",
                format!(
                    "unknown event kind {unknown:?} (known: {})",
                    EVENT_KINDS.join(", ")
                ),
            );
        }
        Ok(())
    }
}

/// Why [`verify`] refused a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// Not `t=<unix ms>,v1=<64 hex digits>` (other `key=value` parts are ignored).
    #[error("malformed signature header")]
    Malformed,
    /// Signed with another secret, or the body or timestamp was changed.
    #[error("signature does not match")]
    Mismatch,
    /// Authentic but signed too long ago (a replay) or too far in the future.
    #[error("signature time {t_ms} is outside the tolerance around {now_ms}")]
    Stale { t_ms: u64, now_ms: u64 },
}

fn mac(secret: &[u8], t_ms: u64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{t_ms}.").as_bytes());
    mac.update(body);
    mac
}

/// The `X-Tern-Signature` value for `body` signed at `t_ms` (unix milliseconds):
/// `t=<t_ms>,v1=<lowercase hex HMAC-SHA256(secret, "<t_ms>." + body)>`.
pub fn sign(secret: &[u8], t_ms: u64, body: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = mac(secret, t_ms, body).finalize().into_bytes();
    let mut out = format!("t={t_ms},v1=");
    for b in digest {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
    out
}

/// Checks an `X-Tern-Signature` header against the raw `body`: the HMAC (compared in constant
/// time), then that `t` is within `tolerance_ms` of `now_ms` either way.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now_ms: u64,
    tolerance_ms: u64,
) -> Result<(), SignatureError> {
    let (mut t, mut v1) = (None, None);
    for part in header.split(',') {
        let (key, value) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match key {
            "t" if t.is_none() => t = Some(parse_ms(value).ok_or(SignatureError::Malformed)?),
            "v1" if v1.is_none() => v1 = Some(unhex32(value).ok_or(SignatureError::Malformed)?),
            "t" | "v1" => return Err(SignatureError::Malformed),
            // Later schemes (v2, ...) may be added next to v1; old receivers keep working.
            _ => {}
        }
    }
    let (t_ms, v1) = (
        t.ok_or(SignatureError::Malformed)?,
        v1.ok_or(SignatureError::Malformed)?,
    );
    mac(secret, t_ms, body)
        .verify_slice(&v1)
        .map_err(|_| SignatureError::Mismatch)?;
    if now_ms.abs_diff(t_ms) > tolerance_ms {
        return Err(SignatureError::Stale { t_ms, now_ms });
    }
    Ok(())
}

fn parse_ms(s: &str) -> Option<u64> {
    // Digits only: u64's parser would take a sign, which no signer writes.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// What the before-send hook is asked about: one message on its way to be stored.
#[derive(Clone, Serialize)]
pub struct BeforeSend {
    /// The sender's user id.
    pub from: String,
    /// `"user"`, `"group"` or `"room"`.
    pub to_kind: &'static str,
    /// The recipient user, group or room.
    pub to: String,
    /// Sent as a decimal string (see the module docs).
    #[serde(serialize_with = "decimal")]
    pub conversation_id: u64,
    pub client_msg_id: String,
    pub content_type: i32,
    pub custom_type: String,
    /// Sent as `payload_base64` (standard alphabet, padded).
    #[serde(rename = "payload_base64", serialize_with = "base64")]
    pub payload: Bytes,
}

impl fmt::Debug for BeforeSend {
    // Message bodies stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BeforeSend")
            .field("from", &self.from)
            .field("to_kind", &self.to_kind)
            .field("to", &self.to)
            .field("conversation_id", &self.conversation_id)
            .field("client_msg_id", &self.client_msg_id)
            .field("content_type", &self.content_type)
            .field("custom_type", &self.custom_type)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

fn decimal<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(n)
}

fn base64<S: Serializer>(bytes: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&STANDARD.encode(bytes))
}

/// The before-send decision about a message.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Store and send it as it is.
    Allow,
    /// Refuse it; the reason goes back to the sender.
    Reject(String),
    /// Store and send this payload instead, with this custom type if given (else the original).
    Replace {
        payload: Bytes,
        custom_type: Option<String>,
    },
}

impl fmt::Debug for Verdict {
    // Message bodies stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allow => f.write_str("Allow"),
            Verdict::Reject(reason) => f.debug_tuple("Reject").field(reason).finish(),
            Verdict::Replace {
                payload,
                custom_type,
            } => f
                .debug_struct("Replace")
                .field("payload_len", &payload.len())
                .field("custom_type", custom_type)
                .finish(),
        }
    }
}

/// The app's answer to a before-send call.
#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
enum Answer {
    Allow,
    Reject {
        #[serde(default)]
        reason: String,
    },
    Replace {
        payload_base64: String,
        #[serde(default)]
        custom_type: Option<String>,
    },
}

/// A snapshot of the webhook counters, for metrics. All but `pending` only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WebhookCounters {
    /// After-events accepted by `emit`.
    pub queued: u64,
    /// After-events the app answered with 2xx.
    pub delivered: u64,
    /// After-event attempts that failed (status, timeout, connection).
    pub attempts_failed: u64,
    /// After-event attempts after the first.
    pub retried: u64,
    /// After-events `emit` dropped because `queue_capacity` events were held.
    pub dropped: u64,
    /// After-events abandoned after `max_attempts` failed attempts.
    pub gave_up: u64,
    /// After-events held now (queued, in flight or waiting to retry).
    pub pending: u64,
    /// Before-send calls the app answered with allow.
    pub before_send_allowed: u64,
    /// Before-send calls the app answered with reject.
    pub before_send_rejected: u64,
    /// Before-send calls the app answered with replace.
    pub before_send_replaced: u64,
    /// Before-send calls that failed, decided by `fail_open`.
    pub before_send_failed: u64,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    delivered: AtomicU64,
    attempts_failed: AtomicU64,
    retried: AtomicU64,
    dropped: AtomicU64,
    gave_up: AtomicU64,
    before_send_allowed: AtomicU64,
    before_send_rejected: AtomicU64,
    before_send_replaced: AtomicU64,
    before_send_failed: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Why one call failed; logged, never shown to clients.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("timed out")]
    Timeout,
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("{0}")]
    Http(reqwest::Error),
    #[error("answer longer than {MAX_ANSWER_BYTES} bytes")]
    TooLong,
    #[error("answer does not parse: {0}")]
    Answer(#[from] serde_json::Error),
    #[error("invalid payload_base64: {0}")]
    Base64(#[from] base64::DecodeError),
}

impl From<reqwest::Error> for CallError {
    fn from(e: reqwest::Error) -> Self {
        // The URL may carry credentials or a token.
        CallError::Http(e.without_url())
    }
}

/// An after-event waiting for the sender task.
struct Event {
    kind: &'static str,
    time_ms: u64,
    data: serde_json::Value,
}

#[derive(Serialize)]
struct Envelope<'a, T> {
    event: &'a str,
    id: &'a str,
    time_ms: u64,
    data: &'a T,
}

fn envelope<T: Serialize>(event: &str, id: &str, time_ms: u64, data: &T) -> Bytes {
    let envelope = Envelope {
        event,
        id,
        time_ms,
        data,
    };
    serde_json::to_vec(&envelope)
        .expect("JSON values and BeforeSend always serialize")
        .into()
}

pub(crate) fn delivery_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The wait before retry number `failures` (1 after the first failed attempt):
/// `base_ms * 2^(failures - 1)` capped at 60 s, less `roll(half of it)`, a random amount in
/// `0..=half`, so that events which failed together do not all retry together.
pub(crate) fn backoff_ms(base_ms: u64, failures: u32, roll: impl FnOnce(u64) -> u64) -> u64 {
    let doubling = 1u64 << failures.saturating_sub(1).min(32);
    let step = base_ms.saturating_mul(doubling).min(MAX_BACKOFF_MS);
    step - roll(step / 2).min(step / 2)
}

/// What the queue task, the delivery tasks and the handles share.
struct Shared {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Box<[u8]>,
    timeout: Duration,
    before_send_timeout: Duration,
    fail_open: bool,
    max_attempts: u32,
    retry_base_ms: u64,
    capacity: usize,
    /// After-events accepted and not settled; `emit` admits against it.
    pending: AtomicUsize,
    /// Notified when `pending` drops to zero.
    settled: Notify,
    /// Request slots for after-events (`concurrency`).
    slots: Arc<Semaphore>,
    counters: Counters,
    last_warning_ms: AtomicU64,
}

impl Shared {
    fn settle(&self) {
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.settled.notify_waiters();
        }
    }

    /// Whether to warn now rather than only debug-log: a dead endpoint fails every call.
    fn may_warn(&self) -> bool {
        let now = now_ms();
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= WARN_EVERY_MS
            && self
                .last_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    async fn post(
        &self,
        kind: &str,
        id: &str,
        body: Bytes,
    ) -> Result<reqwest::Response, CallError> {
        let signature = sign(&self.secret, now_ms(), &body);
        let answer = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(HEADER_EVENT, kind)
            .header(HEADER_DELIVERY, id)
            .header(HEADER_SIGNATURE, signature)
            .body(body)
            .send()
            .await?;
        Ok(answer)
    }

    /// One after-event attempt, within `timeout`.
    async fn attempt(&self, kind: &str, id: &str, body: Bytes) -> Result<(), CallError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let answer = tokio::time::timeout_at(deadline, self.post(kind, id, body))
            .await
            .map_err(|_| CallError::Timeout)??;
        let status = answer.status();
        // Reading the (unused) answer lets HTTP/1.1 reuse the connection. Its failure changes
        // nothing: the status has arrived.
        let _ = tokio::time::timeout_at(deadline, drain(answer)).await;
        if status.is_success() {
            Ok(())
        } else {
            Err(CallError::Status(status.as_u16()))
        }
    }

    /// Sends one after-event until it is delivered or `max_attempts` failed, holding a request
    /// slot only while a request is in flight.
    async fn deliver(self: Arc<Self>, event: Event, mut slot: OwnedSemaphorePermit) {
        let _settle = SettleOnDrop(&self);
        let id = delivery_id();
        // The body is built once: retries resend the same bytes, signed anew.
        let body = envelope(event.kind, &id, event.time_ms, &event.data);
        drop(event.data);
        let mut failures = 0;
        loop {
            let result = self.attempt(event.kind, &id, body.clone()).await;
            drop(slot);
            let error = match result {
                Ok(()) => {
                    bump(&self.counters.delivered);
                    return;
                }
                Err(e) => e,
            };
            bump(&self.counters.attempts_failed);
            failures += 1;
            if failures >= self.max_attempts {
                bump(&self.counters.gave_up);
                if self.may_warn() {
                    tracing::warn!(kind = event.kind, delivery = %id, %error, attempts = failures,
                        "webhook: giving up on an event");
                } else {
                    tracing::debug!(kind = event.kind, delivery = %id, %error, "webhook: giving up");
                }
                return;
            }
            tracing::debug!(kind = event.kind, delivery = %id, %error, "webhook: will retry");
            let wait = backoff_ms(self.retry_base_ms, failures, |max| {
                rand::random_range(0..=max)
            });
            tokio::time::sleep(Duration::from_millis(wait)).await;
            slot = self.acquire_slot().await;
            bump(&self.counters.retried);
        }
    }

    async fn acquire_slot(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the slots semaphore is never closed")
    }

    async fn ask(&self, req: &BeforeSend) -> Result<Verdict, CallError> {
        let id = delivery_id();
        let body = envelope(BEFORE_SEND, &id, now_ms(), req);
        let answer = self.post(BEFORE_SEND, &id, body).await?;
        let status = answer.status();
        if !status.is_success() {
            return Err(CallError::Status(status.as_u16()));
        }
        let answer: Answer = serde_json::from_slice(&read_answer(answer).await?)?;
        Ok(match answer {
            Answer::Allow => Verdict::Allow,
            Answer::Reject { reason } => Verdict::Reject(reason),
            Answer::Replace {
                payload_base64,
                custom_type,
            } => Verdict::Replace {
                payload: STANDARD.decode(payload_base64)?.into(),
                custom_type,
            },
        })
    }

    async fn before_send(&self, req: BeforeSend) -> Verdict {
        let error = match tokio::time::timeout(self.before_send_timeout, self.ask(&req)).await {
            Ok(Ok(verdict)) => {
                bump(match &verdict {
                    Verdict::Allow => &self.counters.before_send_allowed,
                    Verdict::Reject(_) => &self.counters.before_send_rejected,
                    Verdict::Replace { .. } => &self.counters.before_send_replaced,
                });
                return verdict;
            }
            Ok(Err(e)) => e,
            Err(_) => CallError::Timeout,
        };
        if self.may_warn() {
            tracing::warn!(%error, fail_open = self.fail_open, "webhook: before-send failed");
        } else {
            tracing::debug!(%error, "webhook: before-send failed");
        }
        self.unavailable()
    }

    /// The verdict when the hook cannot answer.
    fn unavailable(&self) -> Verdict {
        bump(&self.counters.before_send_failed);
        if self.fail_open {
            Verdict::Allow
        } else {
            Verdict::Reject(UNAVAILABLE.to_owned())
        }
    }
}

/// Settles the event however its delivery task ends, a panic included, so `pending` never
/// leaks capacity.
struct SettleOnDrop<'a>(&'a Shared);

impl Drop for SettleOnDrop<'_> {
    fn drop(&mut self) {
        self.0.settle();
    }
}

async fn drain(mut answer: reqwest::Response) {
    let mut read = 0;
    while let Ok(Some(chunk)) = answer.chunk().await {
        read += chunk.len();
        if read > DRAIN_BYTES {
            break;
        }
    }
}

async fn read_answer(mut answer: reqwest::Response) -> Result<Vec<u8>, CallError> {
    // A declared length over the limit is refused before anything is read.
    if answer
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(CallError::TooLong);
    }
    let mut out = Vec::new();
    while let Some(chunk) = answer.chunk().await? {
        if out.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(CallError::TooLong);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Takes queued after-events and starts their deliveries, `concurrency` at a time.
async fn run_queue(shared: Arc<Shared>, mut queue: mpsc::Receiver<Event>) {
    // Waiting for a slot here rather than in the task keeps the backlog in the bounded queue.
    // The loop ends when every `Webhooks` handle is gone and the queue is empty.
    while let Some(event) = queue.recv().await {
        let slot = shared.acquire_slot().await;
        tokio::spawn(shared.clone().deliver(event, slot));
    }
}

/// The HTTP client of the gateway's outgoing calls (webhooks, push providers): rustls with
/// ring, Mozilla's roots plus `extra_roots`, no proxies from the environment, no redirects.
/// With `http2_only` it speaks HTTP/2 alone (offered by ALPN, and no fallback to HTTP/1.1);
/// otherwise it offers HTTP/2 and falls back to HTTP/1.1. Errors do not name the caller.
pub(crate) fn http_client(
    rt: &Handle,
    extra_roots: &[rustls::pki_types::CertificateDer<'static>],
    http2_only: bool,
) -> Result<reqwest::Client, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in extra_roots {
        roots
            .add(cert.clone())
            .map_err(|e| format!("TLS: root certificate: {e}"))?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // reqwest leaves ALPN of a preconfigured TLS config alone.
    tls.alpn_protocols = if http2_only {
        vec![b"h2".to_vec()]
    } else {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    };
    let _runtime = rt.enter();
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tern-gateway/", env!("CARGO_PKG_VERSION")));
    if http2_only {
        builder = builder.http2_prior_knowledge();
    }
    builder.build().map_err(|e| format!("HTTP client: {e}"))
}

struct Inner {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Event>,
    rt: Handle,
    /// Bit i set: `EVENT_KINDS[i]` is sent.
    wanted: u32,
    before_send: bool,
}

impl Inner {
    fn wants_event(&self, kind: &str) -> bool {
        EVENT_KINDS
            .iter()
            .position(|k| *k == kind)
            .is_some_and(|i| self.wanted & (1 << i) != 0)
    }
}

/// The webhook client: cheap to clone, one per core is fine. Disabled (every call a no-op that
/// allows) when no `url` is configured.
#[derive(Clone)]
pub struct Webhooks {
    inner: Option<Arc<Inner>>,
}

impl fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            None => f.write_str("Webhooks(disabled)"),
            Some(inner) => f
                .debug_struct("Webhooks")
                .field("endpoint", &inner.shared.url.origin().ascii_serialization())
                .field("before_send", &inner.before_send)
                .field("pending", &inner.shared.pending.load(Ordering::Relaxed))
                .finish(),
        }
    }
}

impl Webhooks {
    /// Validates `cfg` and starts the sender on `rt` (the side runtime, I/O and time enabled).
    /// With no `url`, returns [`Webhooks::disabled`].
    pub fn start(cfg: WebhookConfig, rt: &Handle) -> Result<Webhooks, String> {
        cfg.validate()?;
        if cfg.url.is_empty() {
            return Ok(Webhooks::disabled());
        }
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| format!("webhook.url: {e}"))?;
        let wanted = if cfg.events.is_empty() {
            (1 << EVENT_KINDS.len()) - 1
        } else {
            cfg.events
                .iter()
                .filter_map(|e| EVENT_KINDS.iter().position(|k| k == e))
                .fold(0, |mask, i| mask | 1 << i)
        };
        let shared = Arc::new(Shared {
            client: http_client(rt, &[], false).map_err(|e| format!("webhook: {e}"))?,
            url,
            secret: cfg.secret.into_bytes().into_boxed_slice(),
            timeout: Duration::from_millis(cfg.timeout_ms),
            before_send_timeout: Duration::from_millis(cfg.before_send_timeout_ms),
            fail_open: cfg.fail_open,
            max_attempts: cfg.max_attempts,
            retry_base_ms: cfg.retry_base_ms,
            capacity: cfg.queue_capacity,
            pending: AtomicUsize::new(0),
            settled: Notify::new(),
            slots: Arc::new(Semaphore::new(cfg.concurrency)),
            counters: Counters::default(),
            last_warning_ms: AtomicU64::new(0),
        });
        let (queue, events) = mpsc::channel(cfg.queue_capacity);
        rt.spawn(run_queue(shared.clone(), events));
        Ok(Webhooks {
            inner: Some(Arc::new(Inner {
                shared,
                queue,
                rt: rt.clone(),
                wanted,
                before_send: cfg.before_send,
            })),
        })
    }

    /// Webhooks that send nothing: `emit` does nothing, before-send allows.
    pub fn disabled() -> Webhooks {
        Webhooks { inner: None }
    }

    /// Whether `kind` would be sent: an after-event kind in `events`, or [`BEFORE_SEND`] when
    /// the hook is on. Callers check it before building an event's data.
    pub fn wants(&self, kind: &str) -> bool {
        match &self.inner {
            None => false,
            Some(inner) if kind == BEFORE_SEND => inner.before_send,
            Some(inner) => inner.wants_event(kind),
        }
    }

    /// Queues an after-event without blocking: kinds not wanted are skipped; when
    /// `queue_capacity` events are held, the event is dropped and counted.
    pub fn emit(&self, kind: &'static str, data: serde_json::Value) {
        self.emit_with(kind, || data);
    }

    /// [`Webhooks::emit`] with the data built by `data` only if the event is queued, so that
    /// events dropped while the endpoint is dead or slow cost the hot path no allocation.
    pub fn emit_with(&self, kind: &'static str, data: impl FnOnce() -> serde_json::Value) {
        let Some(inner) = &self.inner else { return };
        debug_assert!(EVENT_KINDS.contains(&kind), "unknown webhook event {kind}");
        if !inner.wants_event(kind) {
            return;
        }
        let shared = &inner.shared;
        // Admission counts every event held, not just the queued ones: events waiting to
        // retry have left the queue but still hold memory.
        let admitted = shared
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < shared.capacity).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            bump(&shared.counters.dropped);
            return;
        }
        let event = Event {
            kind,
            time_ms: now_ms(),
            data: data(),
        };
        // The queue holds at most `pending` events, so it is never full here; it is closed
        // only when the side runtime has shut down.
        match inner.queue.try_send(event) {
            Ok(()) => bump(&shared.counters.queued),
            Err(_) => {
                shared.settle();
                bump(&shared.counters.dropped);
            }
        }
    }

    /// Asks the app about a message. The call starts at once on the side runtime; the returned
    /// future only waits for its verdict, so any executor can await it. Allows at once when
    /// the hook is off.
    pub fn before_send(&self, req: BeforeSend) -> impl Future<Output = Verdict> + Send + 'static {
        let call = self.inner.as_ref().filter(|i| i.before_send).map(|inner| {
            let (tx, rx) = oneshot::channel();
            let shared = inner.shared.clone();
            inner.rt.spawn(async move {
                let _ = tx.send(shared.before_send(req).await);
            });
            (rx, inner.shared.clone())
        });
        async move {
            let Some((verdict, shared)) = call else {
                return Verdict::Allow;
            };
            // The task is gone only when the side runtime has shut down.
            verdict.await.unwrap_or_else(|_| shared.unavailable())
        }
    }

    /// Resolves when every after-event accepted so far is delivered or given up on. Events
    /// emitted meanwhile keep it waiting: at shutdown, stop emitting first and bound the wait.
    pub fn flush(&self) -> impl Future<Output = ()> + Send + 'static {
        let shared = self.inner.as_ref().map(|i| i.shared.clone());
        async move {
            let Some(shared) = shared else { return };
            loop {
                let notified = shared.settled.notified();
                let mut notified = std::pin::pin!(notified);
                // Registered before the check, so a settle between the two is not missed.
                notified.as_mut().enable();
                if shared.pending.load(Ordering::SeqCst) == 0 {
                    return;
                }
                notified.await;
            }
        }
    }

    /// The counters now.
    pub fn counters(&self) -> WebhookCounters {
        let Some(inner) = &self.inner else {
            return WebhookCounters::default();
        };
        let c = &inner.shared.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        WebhookCounters {
            queued: get(&c.queued),
            delivered: get(&c.delivered),
            attempts_failed: get(&c.attempts_failed),
            retried: get(&c.retried),
            dropped: get(&c.dropped),
            gave_up: get(&c.gave_up),
            pending: inner.shared.pending.load(Ordering::Relaxed) as u64,
            before_send_allowed: get(&c.before_send_allowed),
            before_send_rejected: get(&c.before_send_rejected),
            before_send_replaced: get(&c.before_send_replaced),
            before_send_failed: get(&c.before_send_failed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc as std_mpsc;

    use axum::http::{HeaderMap, StatusCode};
    use serde_json::json;

    const SECRET: &str = "whsec_test";

    use crate::test_side::{Side, WAIT};

    /// One request as the app's server saw it.
    #[derive(Debug)]
    struct Hit {
        event: String,
        delivery: String,
        signature: String,
        body: Bytes,
    }

    impl Hit {
        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap()
        }

        fn verify(&self, secret: &str) -> Result<(), SignatureError> {
            verify(
                secret.as_bytes(),
                &self.signature,
                &self.body,
                now_ms(),
                60_000,
            )
        }
    }

    type Reply = dyn Fn(&Hit, usize) -> (StatusCode, String) + Send + Sync;

    /// The app's server on 127.0.0.1 at `/hook`: answers request number n (from 0) with
    /// `reply(hit, n)` and then reports it on the returned channel.
    fn app(
        side: &Side,
        reply: impl Fn(&Hit, usize) -> (StatusCode, String) + Send + Sync + 'static,
    ) -> (String, std_mpsc::Receiver<Hit>) {
        let (hits, seen) = std_mpsc::channel();
        let state = Arc::new((hits, Box::new(reply) as Box<Reply>, AtomicUsize::new(0)));
        let handler = move |headers: HeaderMap, body: Bytes| {
            let state = state.clone();
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                let hit = Hit {
                    event: header(HEADER_EVENT),
                    delivery: header(HEADER_DELIVERY),
                    signature: header(HEADER_SIGNATURE),
                    body,
                };
                let (hits, reply, n) = &*state;
                let answer = reply(&hit, n.fetch_add(1, Ordering::SeqCst));
                let _ = hits.send(hit);
                answer
            }
        };
        let router = axum::Router::new().route("/hook", axum::routing::post(handler));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        side.handle.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, router).await.unwrap();
        });
        (url, seen)
    }

    /// An endpoint that takes connections (the kernel's backlog does) and never answers.
    fn silent() -> (String, std::net::TcpListener) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        (url, listener)
    }

    fn ok() -> (StatusCode, String) {
        (StatusCode::OK, String::new())
    }

    fn config(url: &str) -> WebhookConfig {
        WebhookConfig {
            url: url.to_owned(),
            secret: SECRET.to_owned(),
            retry_base_ms: 1,
            // Before-send answers must not time out on a loaded machine (the timeout test sets
            // its own).
            before_send_timeout_ms: 10_000,
            ..WebhookConfig::default()
        }
    }

    fn message(client_msg_id: &str) -> BeforeSend {
        BeforeSend {
            from: "alice".into(),
            to_kind: "group",
            to: "g1".into(),
            conversation_id: (1 << 63) | 1,
            client_msg_id: client_msg_id.into(),
            content_type: 1,
            custom_type: String::new(),
            payload: Bytes::from_static(b"hello"),
        }
    }

    #[test]
    fn sign_matches_a_reference_and_verifies() {
        let body = br#"{"hello":"world"}"#;
        let header = sign(SECRET.as_bytes(), 1_700_000_000_000, body);
        // HMAC-SHA256("whsec_test", "1700000000000." + body), computed independently.
        assert_eq!(
            header,
            "t=1700000000000,v1=195306fc6e208b472595aee6784b376a8e70d774a8dc37119a209093c6923ee5"
        );
        let check = |header: &str, now| verify(SECRET.as_bytes(), header, body, now, 300_000);
        assert_eq!(check(&header, 1_700_000_000_000), Ok(()));
        assert_eq!(check(&header, 1_700_000_300_000), Ok(()));
        assert_eq!(check(&header, 1_699_999_700_000), Ok(()));
        assert_eq!(
            check(
                &header
                    .to_uppercase()
                    .replace("T=", "t=")
                    .replace("V1=", "v1="),
                1_700_000_000_000
            ),
            Ok(())
        );
        let spaced_with_future_scheme = header.replace(",v1=", ", v2=abc, v1=");
        assert_eq!(check(&spaced_with_future_scheme, 1_700_000_000_000), Ok(()));
    }

    #[test]
    fn verify_rejects_wrong_secret_tampering_staleness_and_garbage() {
        let body = br#"{"hello":"world"}"#;
        let t = 1_700_000_000_000;
        let header = sign(SECRET.as_bytes(), t, body);
        assert_eq!(
            verify(b"other", &header, body, t, 300_000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(
                SECRET.as_bytes(),
                &header,
                br#"{"hello":"World"}"#,
                t,
                300_000
            ),
            Err(SignatureError::Mismatch)
        );
        let moved_time = header.replace("t=1700000000000", "t=1700000000001");
        assert_eq!(
            verify(SECRET.as_bytes(), &moved_time, body, t, 300_000),
            Err(SignatureError::Mismatch)
        );
        for now in [t + 300_001, t - 300_001] {
            assert_eq!(
                verify(SECRET.as_bytes(), &header, body, now, 300_000),
                Err(SignatureError::Stale {
                    t_ms: t,
                    now_ms: now
                })
            );
        }
        let hex = &header["t=1700000000000,v1=".len()..];
        for garbage in [
            String::new(),
            "t=1700000000000".into(),
            format!("v1={hex}"),
            format!("t=,v1={hex}"),
            format!("t=-1,v1={hex}"),
            format!("t=+1700000000000,v1={hex}"),
            format!("t=1700000000000,v1={}", &hex[1..]),
            format!("t=1700000000000,v1={}zz", &hex[2..]),
            format!("t=1700000000000,t=1700000000000,v1={hex}"),
            format!("t=1700000000000,v1={hex},v1={hex}"),
            format!("t=1700000000000,v1={hex},junk"),
        ] {
            assert_eq!(
                verify(SECRET.as_bytes(), &garbage, body, t, 300_000),
                Err(SignatureError::Malformed),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn config_defaults_toml_and_validation() {
        let d = WebhookConfig::default();
        assert_eq!(
            (
                d.url.as_str(),
                d.secret.as_str(),
                d.timeout_ms,
                d.before_send
            ),
            ("", "", 3000, false)
        );
        assert_eq!(
            (d.before_send_timeout_ms, d.fail_open, d.queue_capacity),
            (500, true, 10_000)
        );
        assert_eq!(
            (
                d.max_attempts,
                d.retry_base_ms,
                d.concurrency,
                d.events.len()
            ),
            (5, 500, 16, 0)
        );
        assert_eq!(d.validate(), Ok(()));

        let parsed: WebhookConfig = toml::from_str(
            "url = \"https://app.example/hook\"\nsecret = \"s3cret\"\nevents = [\"login\"]\n\
             fail_open = false\n",
        )
        .unwrap();
        assert_eq!(parsed.url, "https://app.example/hook");
        assert_eq!(parsed.events, ["login"]);
        assert!(!parsed.fail_open);
        assert_eq!(parsed.timeout_ms, 3000);
        assert_eq!(parsed.validate(), Ok(()));
        assert!(!format!("{parsed:?}").contains("s3cret"));
        let unknown = toml::from_str::<WebhookConfig>("retries = 3").unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `retries`"),
            "{unknown}"
        );

        let good = || WebhookConfig {
            url: "http://127.0.0.1:9/hook".into(),
            secret: "s".into(),
            ..WebhookConfig::default()
        };
        let cases: [(WebhookConfig, &str); 11] = [
            (
                WebhookConfig {
                    url: "ftp://app.example/".into(),
                    ..good()
                },
                "webhook.url: must start with http:// or https://",
            ),
            (
                WebhookConfig {
                    url: "app.example/hook".into(),
                    ..good()
                },
                "webhook.url: relative URL without a base",
            ),
            (
                WebhookConfig {
                    secret: String::new(),
                    ..good()
                },
                "webhook.secret: required when webhook.url is set",
            ),
            (
                WebhookConfig {
                    before_send: true,
                    ..WebhookConfig::default()
                },
                "webhook.before_send: needs webhook.url",
            ),
            (
                WebhookConfig {
                    timeout_ms: 0,
                    ..good()
                },
                "webhook.timeout_ms: must be at least 1",
            ),
            (
                WebhookConfig {
                    before_send_timeout_ms: 0,
                    ..good()
                },
                "webhook.before_send_timeout_ms: must be at least 1",
            ),
            (
                WebhookConfig {
                    max_attempts: 0,
                    ..good()
                },
                "webhook.max_attempts: must be at least 1",
            ),
            (
                WebhookConfig {
                    retry_base_ms: 60_001,
                    ..good()
                },
                "webhook.retry_base_ms: must be at most 60000",
            ),
            (
                WebhookConfig {
                    queue_capacity: 0,
                    ..good()
                },
                "webhook.queue_capacity: must be between 1 and 100000000",
            ),
            (
                WebhookConfig {
                    concurrency: 0,
                    ..good()
                },
                "webhook.concurrency: must be between 1 and 100000",
            ),
            (
                WebhookConfig {
                    events: vec!["login".into(), "before_send".into()],
                    ..good()
                },
                "webhook.events: unknown event kind \"before_send\" (known: after_send, login, \
                 logout, group_event, delivery_receipt)",
            ),
        ];
        assert_eq!(good().validate(), Ok(()));
        for (cfg, error) in cases {
            assert_eq!(cfg.validate(), Err(error.to_owned()));
        }
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered_by_up_to_half() {
        let longest = |failures| backoff_ms(500, failures, |_| 0);
        let shortest = |failures| backoff_ms(500, failures, |max| max);
        assert_eq!(
            [1, 2, 3, 4, 7, 8, 40].map(longest),
            [500, 1000, 2000, 4000, 32_000, 60_000, 60_000]
        );
        assert_eq!(
            [1, 2, 3, 4, 7, 8, 40].map(shortest),
            [250, 500, 1000, 2000, 16_000, 30_000, 30_000]
        );
        assert_eq!(backoff_ms(1, 1, |max| max), 1);
        assert_eq!(backoff_ms(3, 1, |max| max), 2);
    }

    #[test]
    fn https_endpoint_gets_a_tls_client() {
        let side = Side::start();
        let wh = Webhooks::start(
            WebhookConfig {
                url: "https://app.example.invalid/hook".into(),
                secret: SECRET.into(),
                ..WebhookConfig::default()
            },
            &side.handle,
        )
        .unwrap();
        assert_eq!(
            format!("{wh:?}"),
            "Webhooks { endpoint: \"https://app.example.invalid\", before_send: false, pending: 0 }"
        );
    }

    #[test]
    fn disabled_webhooks_send_nothing_and_allow() {
        let side = Side::start();
        let wh = Webhooks::start(WebhookConfig::default(), &side.handle).unwrap();
        assert_eq!(format!("{wh:?}"), "Webhooks(disabled)");
        for kind in EVENT_KINDS.into_iter().chain([BEFORE_SEND]) {
            assert!(!wh.wants(kind));
        }
        wh.emit(LOGIN, json!({}));
        assert_eq!(side.wait(wh.before_send(message("a"))), Verdict::Allow);
        side.wait(wh.flush());
        assert_eq!(wh.counters(), WebhookCounters::default());
    }

    #[test]
    fn after_events_arrive_signed_in_the_envelope() {
        let side = Side::start();
        let (url, hits) = app(&side, |hit, _| match hit.verify(SECRET) {
            Ok(()) => ok(),
            Err(_) => (StatusCode::UNAUTHORIZED, String::new()),
        });
        let wh = Webhooks::start(config(&url), &side.handle).unwrap();
        let before = now_ms();
        wh.emit(LOGIN, json!({"user": "alice", "device": "phone"}));
        let after = now_ms();
        side.wait(wh.flush());

        let hit = hits.try_recv().unwrap();
        assert!(hits.try_recv().is_err());
        assert_eq!(hit.event, LOGIN);
        assert_eq!(hit.verify(SECRET), Ok(()));
        assert_eq!(hit.delivery.len(), 32);
        assert!(hit.delivery.bytes().all(|b| b.is_ascii_hexdigit()));
        let body = hit.json();
        let time_ms = body["time_ms"].as_u64().unwrap();
        assert!((before..=after).contains(&time_ms));
        assert_eq!(
            body,
            json!({
                "event": "login",
                "id": hit.delivery,
                "time_ms": time_ms,
                "data": {"user": "alice", "device": "phone"},
            })
        );
        assert_eq!(
            wh.counters(),
            WebhookCounters {
                queued: 1,
                delivered: 1,
                ..WebhookCounters::default()
            }
        );
    }

    #[test]
    fn a_receiver_with_another_secret_rejects_them() {
        let side = Side::start();
        let (url, hits) = app(&side, |hit, _| match hit.verify("not-the-secret") {
            Ok(()) => ok(),
            Err(_) => (StatusCode::UNAUTHORIZED, String::new()),
        });
        let wh = Webhooks::start(
            WebhookConfig {
                max_attempts: 1,
                ..config(&url)
            },
            &side.handle,
        )
        .unwrap();
        wh.emit(AFTER_SEND, json!({"seq": 1}));
        side.wait(wh.flush());

        let hit = hits.try_recv().unwrap();
        assert!(hits.try_recv().is_err());
        assert_eq!(hit.verify("not-the-secret"), Err(SignatureError::Mismatch));
        assert_eq!(hit.verify(SECRET), Ok(()));
        assert_eq!(
            wh.counters(),
            WebhookCounters {
                queued: 1,
                attempts_failed: 1,
                gave_up: 1,
                ..WebhookCounters::default()
            }
        );
    }

    #[test]
    fn failing_endpoint_is_retried_with_the_same_delivery_id() {
        let side = Side::start();
        let (url, hits) = app(&side, |_, n| match n {
            0 | 1 => (StatusCode::INTERNAL_SERVER_ERROR, String::new()),
            _ => ok(),
        });
        let wh = Webhooks::start(config(&url), &side.handle).unwrap();
        wh.emit(GROUP_EVENT, json!({"group": "g1", "op": "join"}));
        side.wait(wh.flush());

        let seen: Vec<Hit> = hits.try_iter().collect();
        assert_eq!(seen.len(), 3);
        for hit in &seen {
            assert_eq!(hit.delivery, seen[0].delivery);
            assert_eq!(hit.body, seen[0].body);
            assert_eq!(hit.event, GROUP_EVENT);
            assert_eq!(hit.verify(SECRET), Ok(()));
        }
        assert_eq!(
            wh.counters(),
            WebhookCounters {
                queued: 1,
                delivered: 1,
                attempts_failed: 2,
                retried: 2,
                ..WebhookCounters::default()
            }
        );
    }

    #[test]
    fn dropped_events_are_never_built() {
        let side = Side::start();
        let (url, _listener) = silent();
        let wh = Webhooks::start(
            WebhookConfig {
                queue_capacity: 2,
                concurrency: 1,
                timeout_ms: 600_000,
                events: vec![AFTER_SEND.into()],
                ..config(&url)
            },
            &side.handle,
        )
        .unwrap();
        let built = std::cell::Cell::new(0);
        for seq in 0..5 {
            wh.emit_with(AFTER_SEND, || {
                built.set(built.get() + 1);
                json!({ "seq": seq })
            });
        }
        // Not wanted: not built either.
        wh.emit_with(LOGIN, || unreachable!("login is not among the events"));
        assert_eq!(built.get(), 2);
        let c = wh.counters();
        assert_eq!((c.queued, c.dropped, c.pending), (2, 3, 2));
    }

    #[test]
    fn a_dead_endpoint_never_stalls_emit() {
        let side = Side::start();
        let (url, _listener) = silent();
        let wh = Webhooks::start(
            WebhookConfig {
                queue_capacity: 4,
                concurrency: 1,
                timeout_ms: 600_000,
                ..config(&url)
            },
            &side.handle,
        )
        .unwrap();
        let started = std::time::Instant::now();
        for seq in 0..10_000 {
            wh.emit(AFTER_SEND, json!({ "seq": seq }));
        }
        // Generous on a loaded machine; a blocked emit would wait for the 10-minute timeout.
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            wh.counters(),
            WebhookCounters {
                queued: 4,
                dropped: 9_996,
                pending: 4,
                ..WebhookCounters::default()
            }
        );
    }

    #[test]
    fn waiting_retries_free_their_slot_but_hold_queue_capacity() {
        let side = Side::start();
        let (url, hits) = app(&side, |_, _| {
            (StatusCode::SERVICE_UNAVAILABLE, String::new())
        });
        let wh = Webhooks::start(
            WebhookConfig {
                queue_capacity: 3,
                concurrency: 1,
                max_attempts: 2,
                // Every retry waits 30 s or more, far beyond this test.
                retry_base_ms: 60_000,
                ..config(&url)
            },
            &side.handle,
        )
        .unwrap();
        for seq in 0..3 {
            wh.emit(AFTER_SEND, json!({ "seq": seq }));
        }
        // With one slot, the second and third events can only be tried because the first one
        // let go of it while waiting to retry.
        let mut ids: Vec<String> = (0..3)
            .map(|_| hits.recv_timeout(WAIT).unwrap().delivery)
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 3);
        for seq in 3..8 {
            wh.emit(AFTER_SEND, json!({ "seq": seq }));
        }
        let c = wh.counters();
        assert_eq!(
            (
                c.queued,
                c.dropped,
                c.pending,
                c.retried,
                c.delivered,
                c.gave_up
            ),
            (3, 5, 3, 0, 0, 0)
        );
    }

    #[test]
    fn only_the_configured_events_are_sent() {
        let side = Side::start();
        let (url, hits) = app(&side, |_, _| ok());
        let wh = Webhooks::start(
            WebhookConfig {
                events: vec![LOGIN.into(), DELIVERY_RECEIPT.into()],
                ..config(&url)
            },
            &side.handle,
        )
        .unwrap();
        let wanted = [
            AFTER_SEND,
            LOGIN,
            LOGOUT,
            GROUP_EVENT,
            DELIVERY_RECEIPT,
            BEFORE_SEND,
        ]
        .map(|kind| wh.wants(kind));
        assert_eq!(wanted, [false, true, false, false, true, false]);
        assert!(!wh.wants("nonsense"));
        for kind in EVENT_KINDS {
            wh.emit(kind, json!({ "kind": kind }));
        }
        side.wait(wh.flush());

        let mut kinds: Vec<String> = hits.try_iter().map(|hit| hit.event).collect();
        kinds.sort();
        assert_eq!(kinds, [DELIVERY_RECEIPT, LOGIN]);
        assert_eq!(
            wh.counters(),
            WebhookCounters {
                queued: 2,
                delivered: 2,
                ..WebhookCounters::default()
            }
        );
    }

    /// An app answering before-send by the message's client id.
    fn judge(hit: &Hit, _: usize) -> (StatusCode, String) {
        if hit.verify(SECRET).is_err() {
            return (StatusCode::UNAUTHORIZED, String::new());
        }
        let answer = match hit.json()["data"]["client_msg_id"].as_str().unwrap() {
            "allow" => json!({"action": "allow"}),
            "reject" => json!({"action": "reject", "reason": "no spam"}),
            "replace" => json!({
                "action": "replace",
                "payload_base64": STANDARD.encode("clean"),
                "custom_type": "text/clean",
            }),
            "replace-payload" => json!({"action": "replace", "payload_base64": "eA=="}),
            "status" => return (StatusCode::INTERNAL_SERVER_ERROR, String::new()),
            "garbage" => return (StatusCode::OK, "not json".into()),
            "bad-base64" => json!({"action": "replace", "payload_base64": "***"}),
            other => json!({ "action": other }),
        };
        (StatusCode::OK, answer.to_string())
    }

    #[test]
    fn before_send_decodes_allow_reject_and_replace() {
        let side = Side::start();
        let (url, hits) = app(&side, judge);
        let wh = Webhooks::start(
            WebhookConfig {
                before_send: true,
                ..config(&url)
            },
            &side.handle,
        )
        .unwrap();
        assert!(wh.wants(BEFORE_SEND));
        let ask = |id| side.wait(wh.before_send(message(id)));
        assert_eq!(ask("allow"), Verdict::Allow);
        assert_eq!(ask("reject"), Verdict::Reject("no spam".into()));
        assert_eq!(
            ask("replace"),
            Verdict::Replace {
                payload: Bytes::from_static(b"clean"),
                custom_type: Some("text/clean".into()),
            }
        );
        assert_eq!(
            ask("replace-payload"),
            Verdict::Replace {
                payload: Bytes::from_static(b"x"),
                custom_type: None,
            }
        );

        let hit = hits.try_recv().unwrap();
        assert_eq!(hit.event, BEFORE_SEND);
        let body = hit.json();
        assert_eq!(body["event"], BEFORE_SEND);
        assert_eq!(body["id"], hit.delivery.as_str());
        assert_eq!(
            body["data"],
            json!({
                "from": "alice",
                "to_kind": "group",
                "to": "g1",
                "conversation_id": "9223372036854775809",
                "client_msg_id": "allow",
                "content_type": 1,
                "custom_type": "",
                "payload_base64": "aGVsbG8=",
            })
        );
        assert_eq!(hits.try_iter().count(), 3);
        assert_eq!(
            wh.counters(),
            WebhookCounters {
                before_send_allowed: 1,
                before_send_rejected: 1,
                before_send_replaced: 2,
                ..WebhookCounters::default()
            }
        );
    }

    #[test]
    fn before_send_failures_follow_fail_open() {
        let side = Side::start();
        let (url, _hits) = app(&side, judge);
        let failing = ["status", "garbage", "bad-base64", "maybe"];
        for (fail_open, verdict) in [
            (true, Verdict::Allow),
            (false, Verdict::Reject(UNAVAILABLE.into())),
        ] {
            let wh = Webhooks::start(
                WebhookConfig {
                    before_send: true,
                    fail_open,
                    ..config(&url)
                },
                &side.handle,
            )
            .unwrap();
            for id in failing {
                assert_eq!(side.wait(wh.before_send(message(id))), verdict, "{id}");
            }
            assert_eq!(
                wh.counters(),
                WebhookCounters {
                    before_send_failed: 4,
                    ..WebhookCounters::default()
                }
            );
        }
    }

    #[test]
    fn before_send_timeout_follows_fail_open() {
        let side = Side::start();
        let (url, _listener) = silent();
        for (fail_open, verdict) in [
            (true, Verdict::Allow),
            (false, Verdict::Reject(UNAVAILABLE.into())),
        ] {
            let wh = Webhooks::start(
                WebhookConfig {
                    before_send: true,
                    before_send_timeout_ms: 50,
                    fail_open,
                    ..config(&url)
                },
                &side.handle,
            )
            .unwrap();
            assert_eq!(side.wait(wh.before_send(message("allow"))), verdict);
            assert_eq!(
                wh.counters(),
                WebhookCounters {
                    before_send_failed: 1,
                    ..WebhookCounters::default()
                }
            );
        }
    }
}
