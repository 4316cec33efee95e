//! Push notifications for devices that are offline: Apple Push Notification service (APNs),
//! Firebase Cloud Messaging (FCM HTTP v1), or the app's own server through a signed webhook.
//!
//! When a message's recipient has no online device, the gateway builds one [`Notification`]
//! per device that registered a push token and hands it to [`Notifier::enqueue`]. The notifier
//! holds at most `queue` jobs (queued, in flight or waiting to retry), runs `concurrency`
//! requests at once on the side runtime, and counts each job's outcome per provider
//! ([`NotifyCounters`]).
//!
//! # Providers
//!
//! * **APNs**, token-based authentication over HTTP/2 (APNs speaks nothing else):
//!   `POST {endpoint}/3/device/{token}` with `authorization: bearer <JWT>`, `apns-topic`,
//!   `apns-push-type: alert`, `apns-priority: 10`, `apns-expiration` (unix seconds, 0 when the
//!   notification has no expiry: APNs tries once and does not store it) and `apns-collapse-id`
//!   when given. The body is `{"aps":{"alert":{"title","body"},"sound":"default",
//!   "thread-id":"<conversation id>"},"tern":{"conversation_id":"<decimal>","seq","sender",
//!   "data"}}`. The JWT (ES256, `kid` = key id, claims `iss` = team id and `iat`) is signed
//!   with the `.p8` key and reused for 50 minutes: Apple refuses tokens older than an hour and
//!   throttles providers that mint them more often than every 20 minutes.
//! * **FCM HTTP v1**: the OAuth 2.0 service-account flow (an RS256 JWT exchanged at the
//!   account's `token_uri` for an access token, kept until a minute before it expires), then
//!   `POST {endpoint}/v1/projects/{project_id}/messages:send` with `{"message":{"token",
//!   "notification":{"title","body"},"data":{..},"android":{"priority":"HIGH","ttl",
//!   "collapse_key"}}}`. FCM data values are strings, so `conversation_id` and `seq` are sent
//!   as decimals; the gateway's keys win over the notification's `data` keys of the same name.
//!   `ttl` is the time left until `expires_at_ms`, `"0s"` without an expiry (now or never, as
//!   on APNs).
//! * **Webhook**: `POST <url>` with `{"user","device","token","title","body",
//!   "conversation_id":"<decimal>","seq","sender","data"}` and the headers of
//!   [`crate::webhook`]: `X-Tern-Event: push`, `X-Tern-Delivery` (the same on every retry) and
//!   `X-Tern-Signature` ([`crate::webhook::sign`]). The app answers 2xx when it has taken the
//!   notification, or 410 when the token is dead.
//!
//! # Outcomes
//!
//! Each job ends in exactly one counter of its provider:
//!
//! * `sent`: the provider took it (200, or 2xx from a webhook);
//! * `invalid_token`: the provider says the token will never work again: APNs 410, or 400 with
//!   `BadDeviceToken`, `Unregistered` or `DeviceTokenNotForTopic`; FCM 404 or `UNREGISTERED`,
//!   or 400 `INVALID_ARGUMENT` whose field violation is `message.token`; webhook 410; an APNs
//!   token that is not alphanumeric is not sent at all. The `on_invalid_token` callback given
//!   to [`Notifier::start`] then gets the notification, so the app can forget the token;
//! * `failed`: any other answer, or 429, 5xx, timeouts and connection errors on every one of
//!   `max_attempts` attempts (with exponential backoff, at least `Retry-After` when the
//!   provider sends one, at most 60 s), or an expiry that passed while retrying;
//! * `dropped`: never sent: the queue was full, the provider is not configured, or the
//!   notification had expired before its first attempt.
//!
//! An answer saying the gateway's own credentials expired (APNs 403 `ExpiredProviderToken`,
//! FCM 401) makes a new JWT or access token and tries again at once, once per job.
//!
//! # Threads
//!
//! Requests, timers and retries run on the side runtime (tokio), whose [`Handle`] is given to
//! [`Notifier::start`]. [`Notifier::enqueue`] is a `try_send` and never blocks, so cores and
//! any other thread call it directly. `on_invalid_token` runs on the side runtime and must not
//! block.
//!
//! What this module does not do: keep jobs across restarts, order them, deduplicate them (an
//! attempt that timed out may have been delivered, and its retry is delivered again), send
//! background or VoIP pushes, keep payloads within the providers' size limits (APNs refuses
//! more than 4 KiB with 413, counted as failed), or use certificate-based APNs authentication.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::runtime::Handle;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};

use crate::token::now_secs;
use crate::webhook::{self, backoff_ms, now_ms};

/// APNs' production endpoint; the development one is `https://api.sandbox.push.apple.com`.
pub const DEFAULT_APNS_ENDPOINT: &str = "https://api.push.apple.com";
/// FCM's endpoint.
pub const DEFAULT_FCM_ENDPOINT: &str = "https://fcm.googleapis.com";
/// Google's token endpoint, for service-account files that do not name one.
pub const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The `X-Tern-Event` value of the webhook provider's requests.
pub const PUSH_EVENT: &str = "push";

/// The OAuth 2.0 scope of FCM sends.
const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// The form body of a token request, up to the assertion (RFC 7523; `:` percent-encoded).
const TOKEN_REQUEST_PREFIX: &str =
    "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=";
/// How long one APNs JWT is used.
const APNS_JWT_LIFETIME_SECS: u64 = 50 * 60;
/// Lifetime asked for an FCM assertion (Google's maximum).
const FCM_ASSERTION_LIFETIME_SECS: u64 = 3600;
/// An access token is replaced this long before it expires.
const ACCESS_TOKEN_MARGIN_SECS: u64 = 60;
/// FCM's longest time to live, 28 days.
const FCM_MAX_TTL_SECS: u64 = 28 * 24 * 3600;
/// Longest wait a `Retry-After` can ask for.
const MAX_RETRY_AFTER_MS: u64 = 60_000;
/// Largest provider answer read; the useful ones are a few hundred bytes.
const MAX_ANSWER_BYTES: usize = 64 << 10;
/// At most one warning per this many milliseconds; the counters carry the rest.
const WARN_EVERY_MS: u64 = 10_000;

/// The `[notify]` table of the gateway config. A provider is on when its table is present.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// `[notify.webhook]`: notifications go to the app's server.
    pub webhook: Option<NotifyWebhookConfig>,
    /// `[notify.apns]`: notifications to Apple devices.
    pub apns: Option<ApnsConfig>,
    /// `[notify.fcm]`: notifications through Firebase Cloud Messaging.
    pub fcm: Option<FcmConfig>,
    /// Most jobs held at once: queued, in flight or waiting to retry. More are dropped and
    /// counted. Default 10,000.
    pub queue: usize,
    /// Most requests in flight at once, all providers together. Default 64.
    pub concurrency: usize,
    /// Attempts per job when the provider is busy or unreachable (429, 5xx, timeout,
    /// connection error), the first included. Default 3.
    pub max_attempts: u32,
    /// Wait before the first retry in milliseconds, doubled for each further retry and capped
    /// at 60 s; each wait is cut by a random amount of up to half. Default 500.
    pub retry_base_ms: u64,
    /// PEM file of root certificates trusted by the providers' clients besides Mozilla's
    /// (a private push gateway, tests). Default none.
    pub ca_file: Option<PathBuf>,
    /// Group messages notify the group's offline members only in groups of at most this many
    /// members (each message costs a look-up per member). 0: no notifications for group
    /// messages. Default 1,000.
    pub group_max_members: usize,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            webhook: None,
            apns: None,
            fcm: None,
            queue: 10_000,
            concurrency: 64,
            max_attempts: 3,
            retry_base_ms: 500,
            ca_file: None,
            group_max_members: 1000,
        }
    }
}

/// The `[notify.webhook]` table.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyWebhookConfig {
    /// The app's endpoint, `http://` or `https://`. Required. A password in it is printed and
    /// logged as `REDACTED`.
    #[serde(serialize_with = "crate::config::serialize_redacted_url")]
    pub url: String,
    /// HMAC-SHA256 key of the `X-Tern-Signature` header. Required; never logged.
    #[serde(skip_serializing)]
    pub secret: String,
    /// Time limit of one attempt in milliseconds. Default 5000.
    pub timeout_ms: u64,
}

impl Default for NotifyWebhookConfig {
    fn default() -> Self {
        NotifyWebhookConfig {
            url: String::new(),
            secret: String::new(),
            timeout_ms: 5000,
        }
    }
}

impl fmt::Debug for NotifyWebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifyWebhookConfig")
            .field("url", &crate::config::redact_url(&self.url))
            .field("secret", &"..")
            .field("timeout_ms", &self.timeout_ms)
            .finish()
    }
}

/// The `[notify.apns]` table: token-based authentication with a key from Apple's developer
/// account.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApnsConfig {
    /// The 10-character team id. Required.
    pub team_id: String,
    /// The id of the key in `key_file`. Required.
    pub key_id: String,
    /// The `.p8` file Apple issued: a PKCS#8 P-256 key in PEM. Required.
    pub key_file: PathBuf,
    /// The app's bundle id. Required.
    pub topic: String,
    /// `https://` base URL. Default [`DEFAULT_APNS_ENDPOINT`].
    #[serde(serialize_with = "crate::config::serialize_redacted_url")]
    pub endpoint: String,
    /// Time limit of one attempt in milliseconds. Default 10,000.
    pub timeout_ms: u64,
}

impl Default for ApnsConfig {
    fn default() -> Self {
        ApnsConfig {
            team_id: String::new(),
            key_id: String::new(),
            key_file: PathBuf::new(),
            topic: String::new(),
            endpoint: DEFAULT_APNS_ENDPOINT.to_owned(),
            timeout_ms: 10_000,
        }
    }
}

/// The `[notify.fcm]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FcmConfig {
    /// The service account's JSON key file from the Google Cloud console (`project_id`,
    /// `client_email`, `private_key`, `token_uri`). Required.
    pub service_account_file: PathBuf,
    /// `https://` base URL. Default [`DEFAULT_FCM_ENDPOINT`].
    #[serde(serialize_with = "crate::config::serialize_redacted_url")]
    pub endpoint: String,
    /// Time limit of one attempt, a token request included, in milliseconds. Default 10,000.
    pub timeout_ms: u64,
}

impl Default for FcmConfig {
    fn default() -> Self {
        FcmConfig {
            service_account_file: PathBuf::new(),
            endpoint: DEFAULT_FCM_ENDPOINT.to_owned(),
            timeout_ms: 10_000,
        }
    }
}

/// The fields of a service-account file that FCM needs; the file has more.
#[derive(Deserialize)]
struct ServiceAccount {
    project_id: String,
    client_email: String,
    private_key: String,
    #[serde(default)]
    token_uri: Option<String>,
}

/// What the files of a config hold, read and checked.
struct Loaded {
    roots: Vec<CertificateDer<'static>>,
    webhook: Option<(reqwest::Url, NotifyWebhookConfig)>,
    apns: Option<(ApnsAuth, String)>,
    fcm: Option<(FcmAuth, String)>,
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    if path.as_os_str().is_empty() {
        return Err(format!("{key}: required"));
    }
    std::fs::read(path).map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))
}

fn pkcs8_from_pem(pem: &[u8]) -> Result<PrivatePkcs8KeyDer<'static>, String> {
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(PrivateKeyDer::Pkcs8(key)) => Ok(key),
        Ok(_) => Err("not a PKCS#8 key (-----BEGIN PRIVATE KEY-----)".to_owned()),
        Err(e) => Err(format!("no private key found: {e}")),
    }
}

/// Parses a base URL, which must be `https://` when `https_only`, and drops a trailing `/`.
fn base_url(key: &str, value: &str, https_only: bool) -> Result<String, String> {
    let url = reqwest::Url::parse(value).map_err(|e| format!("{key}: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if !https_only => {}
        _ if https_only => return Err(format!("{key}: must start with https://")),
        _ => return Err(format!("{key}: must start with http:// or https://")),
    }
    Ok(value.trim_end_matches('/').to_owned())
}

fn positive(key: &str, value: u64) -> Result<(), String> {
    if value == 0 {
        return Err(format!("{key}: must be at least 1"));
    }
    Ok(())
}

impl NotifyConfig {
    /// Checks every value and reads every file; the error names the bad key.
    pub fn validate(&self) -> Result<(), String> {
        self.load().map(drop)
    }

    fn load(&self) -> Result<Loaded, String> {
        // Upper bounds keep tokio's channel and semaphore below their limits (they panic
        // beyond), far above anything useful.
        for (key, value, max) in [
            ("notify.queue", self.queue, 100_000_000),
            ("notify.concurrency", self.concurrency, 100_000),
        ] {
            if !(1..=max).contains(&value) {
                return Err(format!("{key}: must be between 1 and {max}"));
            }
        }
        positive("notify.max_attempts", self.max_attempts.into())?;
        if !(1..=60_000).contains(&self.retry_base_ms) {
            return Err("notify.retry_base_ms: must be between 1 and 60000".to_owned());
        }
        let mut roots = Vec::new();
        if let Some(path) = &self.ca_file {
            let key = "notify.ca_file";
            let pem = read_file(key, path)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                roots.push(cert.map_err(|e| format!("{key}: {}: {e}", path.display()))?);
            }
            if roots.is_empty() {
                return Err(format!("{key}: no certificate in {}", path.display()));
            }
        }
        let webhook = match &self.webhook {
            None => None,
            Some(cfg) => {
                if cfg.url.is_empty() {
                    return Err("notify.webhook.url: required".to_owned());
                }
                base_url("notify.webhook.url", &cfg.url, false)?;
                let url = reqwest::Url::parse(&cfg.url)
                    .map_err(|e| format!("notify.webhook.url: {e}"))?;
                if cfg.secret.is_empty() {
                    return Err("notify.webhook.secret: required".to_owned());
                }
                positive("notify.webhook.timeout_ms", cfg.timeout_ms)?;
                Some((url, cfg.clone()))
            }
        };
        let apns = match &self.apns {
            None => None,
            Some(cfg) => {
                for (key, value) in [
                    ("team_id", &cfg.team_id),
                    ("key_id", &cfg.key_id),
                    ("topic", &cfg.topic),
                ] {
                    if value.is_empty() {
                        return Err(format!("notify.apns.{key}: required"));
                    }
                }
                let key = "notify.apns.key_file";
                let pem = read_file(key, &cfg.key_file)?;
                let der = pkcs8_from_pem(&pem)
                    .map_err(|e| format!("{key}: {}: {e}", cfg.key_file.display()))?;
                let rng = SystemRandom::new();
                let pair = EcdsaKeyPair::from_pkcs8(
                    &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    der.secret_pkcs8_der(),
                    &rng,
                )
                .map_err(|e| {
                    format!(
                        "{key}: {}: not a P-256 key with its public key ({e}); \
                         `openssl pkey -in <file> -out <new file>` rewrites it with one",
                        cfg.key_file.display()
                    )
                })?;
                let endpoint = base_url("notify.apns.endpoint", &cfg.endpoint, true)?;
                positive("notify.apns.timeout_ms", cfg.timeout_ms)?;
                let auth = ApnsAuth {
                    team_id: cfg.team_id.clone(),
                    key_id: cfg.key_id.clone(),
                    key: pair,
                    rng,
                    cached: Mutex::new(None),
                };
                Some((auth, endpoint))
            }
        };
        let fcm = match &self.fcm {
            None => None,
            Some(cfg) => {
                let key = "notify.fcm.service_account_file";
                let path = &cfg.service_account_file;
                let bad = |e: &dyn fmt::Display| format!("{key}: {}: {e}", path.display());
                let account: ServiceAccount =
                    serde_json::from_slice(&read_file(key, path)?).map_err(|e| bad(&e))?;
                for (field, value) in [
                    ("project_id", &account.project_id),
                    ("client_email", &account.client_email),
                ] {
                    if value.is_empty() {
                        return Err(bad(&format_args!("{field} is empty")));
                    }
                }
                let der = pkcs8_from_pem(account.private_key.as_bytes())
                    .map_err(|e| bad(&format_args!("private_key: {e}")))?;
                let pair = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
                    .map_err(|e| bad(&format_args!("private_key: not an RSA key ({e})")))?;
                let token_uri = account
                    .token_uri
                    .unwrap_or_else(|| DEFAULT_TOKEN_URI.to_owned());
                let token_uri = base_url("token_uri", &token_uri, true).map_err(|e| bad(&e))?;
                let endpoint = base_url("notify.fcm.endpoint", &cfg.endpoint, true)?;
                positive("notify.fcm.timeout_ms", cfg.timeout_ms)?;
                // Project ids are lowercase letters, digits and hyphens; checking keeps the
                // send URL's path what it looks like.
                if !account
                    .project_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                {
                    return Err(bad(&"project_id is not a Google Cloud project id"));
                }
                let send_url = format!(
                    "{endpoint}/v1/projects/{}/messages:send",
                    account.project_id
                );
                let auth = FcmAuth {
                    client_email: account.client_email,
                    token_uri,
                    key: pair,
                    rng: SystemRandom::new(),
                    cached: tokio::sync::Mutex::new(None),
                };
                Some((auth, send_url))
            }
        };
        Ok(Loaded {
            roots,
            webhook,
            apns,
            fcm,
        })
    }
}

/// A push provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Provider {
    /// Apple Push Notification service.
    Apns,
    /// Firebase Cloud Messaging (HTTP v1).
    Fcm,
    /// The app's server, through the notify webhook.
    Webhook,
}

impl Provider {
    /// Every provider.
    pub const ALL: [Provider; 3] = [Provider::Apns, Provider::Fcm, Provider::Webhook];

    /// `"apns"`, `"fcm"` or `"webhook"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Apns => "apns",
            Provider::Fcm => "fcm",
            Provider::Webhook => "webhook",
        }
    }

    fn index(self) -> usize {
        match self {
            Provider::Apns => 0,
            Provider::Fcm => 1,
            Provider::Webhook => 2,
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider name that is not one of [`Provider::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown push provider {0:?} (known: apns, fcm, webhook)")]
pub struct UnknownProvider(pub String);

impl FromStr for Provider {
    type Err = UnknownProvider;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Provider::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownProvider(s.to_owned()))
    }
}

/// One push notification to one device.
#[derive(Clone, PartialEq, Eq)]
pub struct Notification {
    /// The recipient.
    pub user: String,
    /// The recipient's device the token belongs to.
    pub device: String,
    pub provider: Provider,
    /// The device's push token from the provider.
    pub token: String,
    pub title: String,
    pub body: String,
    pub conversation_id: u64,
    pub seq: u64,
    /// The sender's user id.
    pub sender: String,
    /// Notifications with the same collapse id replace each other on the device
    /// (`apns-collapse-id`, at most 64 bytes; FCM `collapse_key`).
    pub collapse_id: Option<String>,
    /// Unix milliseconds after which the notification is useless. None: the provider tries
    /// once and does not store it for a device that is off.
    pub expires_at_ms: Option<u64>,
    /// Extra key-value pairs for the app.
    pub data: BTreeMap<String, String>,
}

impl fmt::Debug for Notification {
    // Tokens, titles and bodies stay out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notification")
            .field("user", &self.user)
            .field("device", &self.device)
            .field("provider", &self.provider)
            .field("conversation_id", &self.conversation_id)
            .field("seq", &self.seq)
            .field("sender", &self.sender)
            .field("collapse_id", &self.collapse_id)
            .field("expires_at_ms", &self.expires_at_ms)
            .field("data_keys", &self.data.len())
            .finish_non_exhaustive()
    }
}

/// How the jobs of one provider ended. Every counter only grows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProviderCounters {
    /// Taken by the provider.
    pub sent: u64,
    /// Refused, or unreachable on every attempt.
    pub failed: u64,
    /// Never sent: queue full, provider not configured, or expired before the first attempt.
    pub dropped: u64,
    /// The provider said the token is dead; `on_invalid_token` was called.
    pub invalid_token: u64,
}

/// A snapshot of the counters of every provider, for metrics
/// (`tern_push_provider_total{provider, outcome}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NotifyCounters {
    pub apns: ProviderCounters,
    pub fcm: ProviderCounters,
    pub webhook: ProviderCounters,
}

impl NotifyCounters {
    /// The counters of `provider`.
    pub fn get(&self, provider: Provider) -> ProviderCounters {
        match provider {
            Provider::Apns => self.apns,
            Provider::Fcm => self.fcm,
            Provider::Webhook => self.webhook,
        }
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    invalid_token: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ProviderCounters {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ProviderCounters {
            sent: get(&self.sent),
            failed: get(&self.failed),
            dropped: get(&self.dropped),
            invalid_token: get(&self.invalid_token),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Why an attempt did not succeed; logged, never shown to clients.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("timed out")]
    Timeout,
    #[error("HTTP status {0} {1}")]
    Status(u16, String),
    #[error("{0}")]
    Http(reqwest::Error),
    #[error("token request: HTTP status {0}")]
    TokenStatus(u16),
    #[error("token answer does not parse: {0}")]
    TokenAnswer(serde_json::Error),
    #[error("signing: {0}")]
    Sign(&'static str),
    #[error("expired")]
    Expired,
    #[error("provider not configured")]
    NotConfigured,
}

impl From<reqwest::Error> for CallError {
    fn from(e: reqwest::Error) -> Self {
        // The URL carries the device token.
        CallError::Http(e.without_url())
    }
}

/// How one attempt ended.
#[derive(Debug)]
enum Outcome {
    Sent,
    /// The token is dead; the provider's reason.
    InvalidToken(String),
    /// The gateway's credentials were refused; they are forgotten, try again at once.
    Reauth(CallError),
    /// Try again after a backoff (at least `after_ms` when the provider asked).
    Retry {
        error: CallError,
        after_ms: Option<u64>,
    },
    Fail(CallError),
}

impl Outcome {
    fn retry(error: CallError) -> Outcome {
        Outcome::Retry {
            error,
            after_ms: None,
        }
    }
}

impl From<CallError> for Outcome {
    /// Connection errors and timeouts may pass; a request that cannot be built will not.
    fn from(error: CallError) -> Outcome {
        match &error {
            CallError::Http(e) if e.is_builder() => Outcome::Fail(error),
            CallError::Sign(_) | CallError::Expired | CallError::NotConfigured => {
                Outcome::Fail(error)
            }
            _ => Outcome::retry(error),
        }
    }
}

/// The status, `Retry-After` and (bounded) body of an answer. A body that cannot be read is
/// empty: the status has arrived.
async fn read_answer(mut answer: reqwest::Response) -> (u16, Option<u64>, Vec<u8>) {
    let status = answer.status().as_u16();
    let retry_after_ms = answer
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|secs| secs.saturating_mul(1000).min(MAX_RETRY_AFTER_MS));
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = answer.chunk().await {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            break;
        }
        body.extend_from_slice(&chunk);
    }
    (status, retry_after_ms, body)
}

/// The outcome of a status no provider-specific rule claimed.
fn by_status(status: u16, reason: String, retry_after_ms: Option<u64>) -> Outcome {
    let error = CallError::Status(status, reason);
    if status == 429 || status >= 500 {
        Outcome::Retry {
            error,
            after_ms: retry_after_ms,
        }
    } else {
        Outcome::Fail(error)
    }
}

fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// A compact JWS: `b64(header).b64(claims).b64(sign(first two parts))`.
fn jwt(
    header: &serde_json::Value,
    claims: &serde_json::Value,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, CallError>,
) -> Result<String, CallError> {
    let mut out = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signed = sign(out.as_bytes())?;
    out.push('.');
    out.push_str(&b64(&signed));
    Ok(out)
}

/// The APNs provider token: an ES256 JWT reused for [`APNS_JWT_LIFETIME_SECS`].
struct ApnsAuth {
    team_id: String,
    key_id: String,
    key: EcdsaKeyPair,
    rng: SystemRandom,
    /// The JWT in use and its `iat`.
    cached: Mutex<Option<(Arc<str>, u64)>>,
}

impl ApnsAuth {
    fn mint(&self, iat: u64) -> Result<String, CallError> {
        jwt(
            &json!({"alg": "ES256", "kid": self.key_id}),
            &json!({"iss": self.team_id, "iat": iat}),
            |message| {
                self.key
                    .sign(&self.rng, message)
                    .map(|s| s.as_ref().to_vec())
                    .map_err(|_| CallError::Sign("ECDSA"))
            },
        )
    }

    /// The JWT to use at `now` (unix seconds): the cached one while it is younger than
    /// [`APNS_JWT_LIFETIME_SECS`], else a new one.
    fn token(&self, now: u64) -> Result<Arc<str>, CallError> {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((token, iat)) = &*cached
            && now.saturating_sub(*iat) < APNS_JWT_LIFETIME_SECS
        {
            return Ok(token.clone());
        }
        let token: Arc<str> = self.mint(now)?.into();
        *cached = Some((token.clone(), now));
        Ok(token)
    }

    /// Forgets `token` if it is still the one in use (concurrent refusals mint one new JWT).
    fn forget(&self, token: &str) {
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if cached.as_ref().is_some_and(|(t, _)| &**t == token) {
            *cached = None;
        }
    }
}

/// APNs' reasons for a 400 that mean the token is dead.
const APNS_DEAD_TOKEN_REASONS: [&str; 3] =
    ["BadDeviceToken", "Unregistered", "DeviceTokenNotForTopic"];

struct Apns {
    client: reqwest::Client,
    endpoint: String,
    topic: String,
    timeout: Duration,
    auth: ApnsAuth,
}

#[derive(Deserialize)]
struct ApnsAnswer {
    #[serde(default)]
    reason: String,
}

impl Apns {
    fn body(n: &Notification) -> Bytes {
        let body = json!({
            "aps": {
                "alert": {"title": n.title, "body": n.body},
                "sound": "default",
                "thread-id": n.conversation_id.to_string(),
            },
            "tern": {
                "conversation_id": n.conversation_id.to_string(),
                "seq": n.seq,
                "sender": n.sender,
                "data": n.data,
            },
        });
        body.to_string().into()
    }

    async fn send(&self, n: &Notification) -> Outcome {
        // Tokens are hex; anything else would change the request's path.
        if n.token.is_empty() || !n.token.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Outcome::InvalidToken("malformed token".to_owned());
        }
        let jwt = match self.auth.token(now_secs()) {
            Ok(jwt) => jwt,
            Err(e) => return e.into(),
        };
        let expiration = n.expires_at_ms.map_or(0, |ms| ms / 1000);
        let mut request = self
            .client
            .post(format!("{}/3/device/{}", self.endpoint, n.token))
            .header(reqwest::header::AUTHORIZATION, format!("bearer {jwt}"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("apns-topic", &self.topic)
            .header("apns-push-type", "alert")
            .header("apns-priority", "10")
            .header("apns-expiration", expiration.to_string());
        if let Some(collapse_id) = &n.collapse_id {
            request = request.header("apns-collapse-id", collapse_id);
        }
        let answer = match request.body(Self::body(n)).send().await {
            Ok(answer) => answer,
            Err(e) => return CallError::from(e).into(),
        };
        let (status, retry_after_ms, body) = read_answer(answer).await;
        if status == 200 {
            return Outcome::Sent;
        }
        let reason = serde_json::from_slice::<ApnsAnswer>(&body)
            .map(|a| a.reason)
            .unwrap_or_default();
        match status {
            410 => Outcome::InvalidToken(reason),
            400 if APNS_DEAD_TOKEN_REASONS.contains(&reason.as_str()) => {
                Outcome::InvalidToken(reason)
            }
            403 if reason == "ExpiredProviderToken" => {
                self.auth.forget(&jwt);
                Outcome::Reauth(CallError::Status(status, reason))
            }
            _ => by_status(status, reason, retry_after_ms),
        }
    }
}

/// An OAuth 2.0 access token and when it expires (unix seconds).
#[derive(Clone)]
struct AccessToken {
    value: Arc<str>,
    expires_at: u64,
}

impl AccessToken {
    /// Whether it is still used at `now`: until [`ACCESS_TOKEN_MARGIN_SECS`] before it expires.
    fn fresh(&self, now: u64) -> bool {
        now.saturating_add(ACCESS_TOKEN_MARGIN_SECS) < self.expires_at
    }
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

/// FCM's credentials: the service account's key and the access token it was exchanged for.
struct FcmAuth {
    client_email: String,
    token_uri: String,
    key: RsaKeyPair,
    rng: SystemRandom,
    /// A tokio mutex: held across the token request, so concurrent sends make one.
    cached: tokio::sync::Mutex<Option<AccessToken>>,
}

impl FcmAuth {
    /// The signed assertion of a token request (RFC 7523).
    fn assertion(&self, iat: u64) -> Result<String, CallError> {
        jwt(
            &json!({"alg": "RS256", "typ": "JWT"}),
            &json!({
                "iss": self.client_email,
                "scope": FCM_SCOPE,
                "aud": self.token_uri,
                "iat": iat,
                "exp": iat + FCM_ASSERTION_LIFETIME_SECS,
            }),
            |message| {
                let mut out = vec![0; self.key.public().modulus_len()];
                self.key
                    .sign(&signature::RSA_PKCS1_SHA256, &self.rng, message, &mut out)
                    .map_err(|_| CallError::Sign("RSA"))?;
                Ok(out)
            },
        )
    }

    /// The access token to send with, requested when there is none fresh.
    async fn access_token(&self, client: &reqwest::Client) -> Result<Arc<str>, Outcome> {
        let mut cached = self.cached.lock().await;
        let now = now_secs();
        if let Some(token) = cached.as_ref().filter(|t| t.fresh(now)) {
            return Ok(token.value.clone());
        }
        let assertion = self.assertion(now).map_err(Outcome::from)?;
        let answer = client
            .post(&self.token_uri)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(format!("{TOKEN_REQUEST_PREFIX}{assertion}"))
            .send()
            .await
            .map_err(|e| Outcome::from(CallError::from(e)))?;
        let (status, retry_after_ms, body) = read_answer(answer).await;
        if status != 200 {
            let error = CallError::TokenStatus(status);
            return Err(if status == 429 || status >= 500 {
                Outcome::Retry {
                    error,
                    after_ms: retry_after_ms,
                }
            } else {
                Outcome::Fail(error)
            });
        }
        let answer: TokenAnswer =
            serde_json::from_slice(&body).map_err(|e| Outcome::Fail(CallError::TokenAnswer(e)))?;
        let token = AccessToken {
            value: answer.access_token.into(),
            expires_at: now.saturating_add(answer.expires_in),
        };
        *cached = Some(token.clone());
        Ok(token.value)
    }

    async fn forget(&self, token: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|t| &*t.value == token) {
            *cached = None;
        }
    }
}

struct Fcm {
    client: reqwest::Client,
    send_url: String,
    timeout: Duration,
    auth: FcmAuth,
}

/// FCM's error answer: `{"error":{"code","message","status","details":[..]}}`.
#[derive(Deserialize, Default)]
#[serde(default)]
struct FcmAnswer {
    error: FcmError,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FcmError {
    status: String,
    details: Vec<FcmDetail>,
}

/// One entry of `details`: an `FcmError` (`errorCode`) or a `BadRequest` (`fieldViolations`).
#[derive(Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct FcmDetail {
    error_code: String,
    field_violations: Vec<FieldViolation>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FieldViolation {
    field: String,
}

impl FcmError {
    fn unregistered(&self) -> bool {
        self.status == "UNREGISTERED" || self.details.iter().any(|d| d.error_code == "UNREGISTERED")
    }

    /// INVALID_ARGUMENT blaming the token, not the rest of the message.
    fn bad_token(&self) -> bool {
        self.status == "INVALID_ARGUMENT"
            && self
                .details
                .iter()
                .flat_map(|d| &d.field_violations)
                .any(|v| v.field == "message.token")
    }
}

impl Fcm {
    fn body(n: &Notification, now_ms: u64) -> Bytes {
        let mut data = n.data.clone();
        data.insert("conversation_id".to_owned(), n.conversation_id.to_string());
        data.insert("seq".to_owned(), n.seq.to_string());
        data.insert("sender".to_owned(), n.sender.clone());
        let ttl = n
            .expires_at_ms
            .map_or(0, |ms| ms.saturating_sub(now_ms) / 1000)
            .min(FCM_MAX_TTL_SECS);
        let mut android = json!({"priority": "HIGH", "ttl": format!("{ttl}s")});
        if let Some(collapse_id) = &n.collapse_id {
            android["collapse_key"] = json!(collapse_id);
        }
        let body = json!({
            "message": {
                "token": n.token,
                "notification": {"title": n.title, "body": n.body},
                "data": data,
                "android": android,
            }
        });
        body.to_string().into()
    }

    async fn send(&self, n: &Notification) -> Outcome {
        let token = match self.auth.access_token(&self.client).await {
            Ok(token) => token,
            Err(outcome) => return outcome,
        };
        let answer = self
            .client
            .post(&self.send_url)
            .header(reqwest::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(Self::body(n, now_ms()))
            .send()
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => return CallError::from(e).into(),
        };
        let (status, retry_after_ms, body) = read_answer(answer).await;
        if status == 200 {
            return Outcome::Sent;
        }
        let error = serde_json::from_slice::<FcmAnswer>(&body)
            .unwrap_or_default()
            .error;
        if status == 404 || error.unregistered() {
            return Outcome::InvalidToken(error.status);
        }
        if status == 400 && error.bad_token() {
            return Outcome::InvalidToken(error.status);
        }
        if status == 401 {
            self.auth.forget(&token).await;
            return Outcome::Reauth(CallError::Status(status, error.status));
        }
        by_status(status, error.status, retry_after_ms)
    }
}

struct Hook {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Box<[u8]>,
    timeout: Duration,
}

impl Hook {
    fn body(n: &Notification) -> Bytes {
        let body = json!({
            "user": n.user,
            "device": n.device,
            "token": n.token,
            "title": n.title,
            "body": n.body,
            "conversation_id": n.conversation_id.to_string(),
            "seq": n.seq,
            "sender": n.sender,
            "data": n.data,
        });
        body.to_string().into()
    }

    async fn send(&self, delivery: &str, body: Bytes) -> Outcome {
        let signature = webhook::sign(&self.secret, now_ms(), &body);
        let answer = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(webhook::HEADER_EVENT, PUSH_EVENT)
            .header(webhook::HEADER_DELIVERY, delivery)
            .header(webhook::HEADER_SIGNATURE, signature)
            .body(body)
            .send()
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => return CallError::from(e).into(),
        };
        let (status, retry_after_ms, _) = read_answer(answer).await;
        match status {
            200..=299 => Outcome::Sent,
            410 => Outcome::InvalidToken("410 Gone".to_owned()),
            _ => by_status(status, String::new(), retry_after_ms),
        }
    }
}

/// Called with a notification whose token the provider declared dead.
pub type InvalidTokenHook = Arc<dyn Fn(&Notification) + Send + Sync>;

/// What the queue task, the delivery tasks and the handles share.
struct Shared {
    apns: Option<Apns>,
    fcm: Option<Fcm>,
    webhook: Option<Hook>,
    max_attempts: u32,
    retry_base_ms: u64,
    capacity: usize,
    /// Jobs accepted and not settled; `enqueue` admits against it.
    pending: AtomicUsize,
    /// Notified when `pending` drops to zero.
    settled: Notify,
    /// Request slots (`concurrency`).
    slots: Arc<Semaphore>,
    /// By [`Provider::index`].
    counters: [Counters; 3],
    on_invalid_token: Option<InvalidTokenHook>,
    last_warning_ms: AtomicU64,
}

impl Shared {
    fn provides(&self, provider: Provider) -> bool {
        match provider {
            Provider::Apns => self.apns.is_some(),
            Provider::Fcm => self.fcm.is_some(),
            Provider::Webhook => self.webhook.is_some(),
        }
    }

    fn settle(&self) {
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.settled.notify_waiters();
        }
    }

    /// Whether to warn now rather than only debug-log: a dead provider fails every job.
    fn may_warn(&self) -> bool {
        let now = now_ms();
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= WARN_EVERY_MS
            && self
                .last_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    async fn acquire_slot(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the slots semaphore is never closed")
    }

    /// One attempt within the provider's time limit.
    async fn attempt(&self, n: &Notification, delivery: &str, hook_body: &Bytes) -> Outcome {
        let answered = match (n.provider, &self.apns, &self.fcm, &self.webhook) {
            (Provider::Apns, Some(apns), _, _) => {
                tokio::time::timeout(apns.timeout, apns.send(n)).await
            }
            (Provider::Fcm, _, Some(fcm), _) => {
                tokio::time::timeout(fcm.timeout, fcm.send(n)).await
            }
            (Provider::Webhook, _, _, Some(hook)) => {
                tokio::time::timeout(hook.timeout, hook.send(delivery, hook_body.clone())).await
            }
            _ => return Outcome::Fail(CallError::NotConfigured),
        };
        answered.unwrap_or_else(|_| Outcome::retry(CallError::Timeout))
    }

    fn failed(&self, n: &Notification, error: &CallError, attempts: u32) {
        bump(&self.counters[n.provider.index()].failed);
        if self.may_warn() {
            tracing::warn!(provider = %n.provider, user = %n.user, device = %n.device, %error,
                attempts, "push: notification failed");
        } else {
            tracing::debug!(provider = %n.provider, user = %n.user, device = %n.device, %error,
                attempts, "push: notification failed");
        }
    }

    /// Sends one notification until it has an outcome, holding a request slot only while a
    /// request is in flight.
    async fn deliver(self: Arc<Self>, n: Notification, mut slot: OwnedSemaphorePermit) {
        let _settle = SettleOnDrop(&self);
        let counters = &self.counters[n.provider.index()];
        // The webhook body is built once: retries resend the same bytes, signed anew.
        let (delivery, hook_body) = match n.provider {
            Provider::Webhook => (webhook::delivery_id(), Hook::body(&n)),
            _ => (String::new(), Bytes::new()),
        };
        let (mut attempts, mut failures, mut reauthed) = (0, 0, false);
        loop {
            if n.expires_at_ms.is_some_and(|at| at <= now_ms()) {
                if attempts == 0 {
                    bump(&counters.dropped);
                } else {
                    self.failed(&n, &CallError::Expired, attempts);
                }
                return;
            }
            attempts += 1;
            match self.attempt(&n, &delivery, &hook_body).await {
                Outcome::Sent => {
                    bump(&counters.sent);
                    return;
                }
                Outcome::InvalidToken(reason) => {
                    bump(&counters.invalid_token);
                    tracing::debug!(provider = %n.provider, user = %n.user, device = %n.device,
                        %reason, "push: token is no longer valid");
                    if let Some(hook) = &self.on_invalid_token {
                        hook(&n);
                    }
                    return;
                }
                Outcome::Reauth(error) if !reauthed => {
                    tracing::debug!(provider = %n.provider, %error, "push: credentials refused, renewing them");
                    reauthed = true;
                }
                Outcome::Reauth(error) | Outcome::Fail(error) => {
                    self.failed(&n, &error, attempts);
                    return;
                }
                Outcome::Retry { error, after_ms } => {
                    failures += 1;
                    if failures >= self.max_attempts {
                        self.failed(&n, &error, attempts);
                        return;
                    }
                    tracing::debug!(provider = %n.provider, %error, "push: will retry");
                    drop(slot);
                    let wait = backoff_ms(self.retry_base_ms, failures, |max| {
                        rand::random_range(0..=max)
                    })
                    .max(after_ms.unwrap_or(0));
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    slot = self.acquire_slot().await;
                }
            }
        }
    }
}

/// Settles the job however its delivery task ends, a panic included, so `pending` never
/// leaks capacity.
struct SettleOnDrop<'a>(&'a Shared);

impl Drop for SettleOnDrop<'_> {
    fn drop(&mut self) {
        self.0.settle();
    }
}

/// Takes queued jobs and starts their deliveries, `concurrency` at a time.
async fn run_queue(shared: Arc<Shared>, mut queue: mpsc::Receiver<Notification>) {
    // Waiting for a slot here rather than in the task keeps the backlog in the bounded queue.
    // The loop ends when every `Notifier` handle is gone and the queue is empty.
    while let Some(n) = queue.recv().await {
        let slot = shared.acquire_slot().await;
        tokio::spawn(shared.clone().deliver(n, slot));
    }
}

/// The push notifier: cheap to clone, one per core is fine.
#[derive(Clone)]
pub struct Notifier {
    shared: Arc<Shared>,
    /// None when no provider is configured.
    queue: Option<mpsc::Sender<Notification>>,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let providers: Vec<&str> = Provider::ALL
            .into_iter()
            .filter(|p| self.provides(*p))
            .map(Provider::as_str)
            .collect();
        f.debug_struct("Notifier")
            .field("providers", &providers)
            .field("pending", &self.shared.pending.load(Ordering::Relaxed))
            .finish()
    }
}

impl Notifier {
    /// Validates `cfg`, reads its key files and starts the sender on `rt` (the side runtime,
    /// I/O and time enabled). `on_invalid_token` is called on `rt` for every notification
    /// whose token a provider declared dead. With no provider configured, returns a notifier
    /// that drops everything, like [`Notifier::disabled`].
    pub fn start(
        cfg: NotifyConfig,
        rt: &Handle,
        on_invalid_token: Option<InvalidTokenHook>,
    ) -> Result<Notifier, String> {
        let loaded = cfg.load()?;
        if loaded.webhook.is_none() && loaded.apns.is_none() && loaded.fcm.is_none() {
            return Ok(Notifier::disabled());
        }
        let client = |http2_only| {
            webhook::http_client(rt, &loaded.roots, http2_only).map_err(|e| format!("notify: {e}"))
        };
        let apns = match (loaded.apns, &cfg.apns) {
            (Some((auth, endpoint)), Some(c)) => Some(Apns {
                client: client(true)?,
                endpoint,
                topic: c.topic.clone(),
                timeout: Duration::from_millis(c.timeout_ms),
                auth,
            }),
            _ => None,
        };
        let shared_client = if loaded.fcm.is_some() || loaded.webhook.is_some() {
            Some(client(false)?)
        } else {
            None
        };
        let fcm = match (loaded.fcm, &cfg.fcm, &shared_client) {
            (Some((auth, send_url)), Some(c), Some(client)) => Some(Fcm {
                client: client.clone(),
                send_url,
                timeout: Duration::from_millis(c.timeout_ms),
                auth,
            }),
            _ => None,
        };
        let webhook = match (loaded.webhook, &shared_client) {
            (Some((url, c)), Some(client)) => Some(Hook {
                client: client.clone(),
                url,
                secret: c.secret.into_bytes().into_boxed_slice(),
                timeout: Duration::from_millis(c.timeout_ms),
            }),
            _ => None,
        };
        let shared = Arc::new(Shared {
            apns,
            fcm,
            webhook,
            max_attempts: cfg.max_attempts,
            retry_base_ms: cfg.retry_base_ms,
            capacity: cfg.queue,
            pending: AtomicUsize::new(0),
            settled: Notify::new(),
            slots: Arc::new(Semaphore::new(cfg.concurrency)),
            counters: Default::default(),
            on_invalid_token,
            last_warning_ms: AtomicU64::new(0),
        });
        let (queue, jobs) = mpsc::channel(cfg.queue);
        rt.spawn(run_queue(shared.clone(), jobs));
        Ok(Notifier {
            shared,
            queue: Some(queue),
        })
    }

    /// A notifier with no provider: every `enqueue` is dropped (and counted).
    pub fn disabled() -> Notifier {
        Notifier {
            shared: Arc::new(Shared {
                apns: None,
                fcm: None,
                webhook: None,
                max_attempts: 1,
                retry_base_ms: 1,
                capacity: 0,
                pending: AtomicUsize::new(0),
                settled: Notify::new(),
                slots: Arc::new(Semaphore::new(0)),
                counters: Default::default(),
                on_invalid_token: None,
                last_warning_ms: AtomicU64::new(0),
            }),
            queue: None,
        }
    }

    /// Whether `provider` is configured. Callers check it before building a notification.
    pub fn provides(&self, provider: Provider) -> bool {
        self.shared.provides(provider)
    }

    /// Queues a notification without blocking, from any thread. False, and counted as
    /// dropped, when its provider is not configured or `queue` jobs are held.
    pub fn enqueue(&self, n: Notification) -> bool {
        let shared = &self.shared;
        let counters = &shared.counters[n.provider.index()];
        let Some(queue) = self.queue.as_ref().filter(|_| shared.provides(n.provider)) else {
            bump(&counters.dropped);
            return false;
        };
        // Admission counts every job held, not just the queued ones: jobs waiting to retry
        // have left the queue but still hold memory.
        let admitted = shared
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                (held < shared.capacity).then_some(held + 1)
            })
            .is_ok();
        if !admitted {
            bump(&counters.dropped);
            return false;
        }
        // The queue holds at most `pending` jobs, so it is never full here; it is closed only
        // when the side runtime has shut down.
        match queue.try_send(n) {
            Ok(()) => true,
            Err(_) => {
                shared.settle();
                bump(&counters.dropped);
                false
            }
        }
    }

    /// Resolves when every job accepted so far has an outcome, which its attempts' time
    /// limits and backoffs bound. Jobs enqueued meanwhile keep it waiting: at shutdown, stop
    /// enqueueing first. It only waits on a notification, so any executor can await it.
    pub fn flush(&self) -> impl Future<Output = ()> + Send + 'static {
        let shared = self.shared.clone();
        async move {
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
    pub fn counters(&self) -> NotifyCounters {
        let c = &self.shared.counters;
        NotifyCounters {
            apns: c[Provider::Apns.index()].snapshot(),
            fcm: c[Provider::Fcm.index()].snapshot(),
            webhook: c[Provider::Webhook.index()].snapshot(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::mpsc as std_mpsc;

    use axum::body::Body;
    use axum::http::{HeaderMap, Request, Response, Version};
    use base64::engine::general_purpose::STANDARD;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use ring::signature::{KeyPair, UnparsedPublicKey};

    /// A test-only RSA key, as in a service-account file.
    const FCM_TEST_KEY: &str = include_str!("../tests/data/fcm-test-key.pem");
    const TEAM: &str = "TEAM123456";
    const KEY_ID: &str = "KEY1234567";
    const TOPIC: &str = "org.tern.app";
    const CLIENT_EMAIL: &str = "push@tern-test.iam.gserviceaccount.com";
    const SEND_PATH: &str = "/v1/projects/tern-test/messages:send";
    const SECRET: &str = "pushsec_test";

    use crate::test_side::{Side, WAIT};

    /// One request as the provider's server saw it.
    #[derive(Debug)]
    struct Seen {
        method: String,
        path: String,
        version: Version,
        headers: HeaderMap,
        body: Bytes,
    }

    impl Seen {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).map(|v| v.to_str().unwrap())
        }

        fn json(&self) -> serde_json::Value {
            serde_json::from_slice(&self.body).unwrap()
        }

        fn text(&self) -> &str {
            std::str::from_utf8(&self.body).unwrap()
        }
    }

    type Script = dyn Fn(&Seen, usize) -> (u16, String) + Send + Sync;

    /// An HTTPS server that speaks HTTP/2 only (ALPN `h2` alone), with a self-signed
    /// certificate for 127.0.0.1 in `ca_file`.
    struct Server {
        base: String,
        ca_file: PathBuf,
        seen: std_mpsc::Receiver<Seen>,
        _dir: tempfile::TempDir,
    }

    impl Server {
        /// The next request, in the order they were answered.
        fn next(&self) -> Seen {
            self.seen.recv_timeout(WAIT).expect("no request")
        }

        fn assert_no_more(&self) {
            let left: Vec<String> = self.seen.try_iter().map(|s| s.path).collect();
            assert!(left.is_empty(), "unexpected requests: {left:?}");
        }
    }

    /// Answers request number n (from 0) with `script(request, n)` (status and body), then
    /// reports the request.
    fn h2_server(
        side: &Side,
        script: impl Fn(&Seen, usize) -> (u16, String) + Send + Sync + 'static,
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.cert.pem()).unwrap();
        let key = PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key.into())
        .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let base = format!("https://{}", listener.local_addr().unwrap());
        let (report, seen) = std_mpsc::channel();
        let state = Arc::new((report, Box::new(script) as Box<Script>, AtomicUsize::new(0)));
        side.handle.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, state) = (acceptor.clone(), state.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let state = state.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = axum::body::to_bytes(Body::new(body), usize::MAX)
                                    .await
                                    .unwrap();
                                let seen = Seen {
                                    method: parts.method.to_string(),
                                    path: parts.uri.path_and_query().unwrap().to_string(),
                                    version: parts.version,
                                    headers: parts.headers,
                                    body,
                                };
                                let (report, script, n) = &*state;
                                let (status, answer) =
                                    script(&seen, n.fetch_add(1, Ordering::SeqCst));
                                let _ = report.send(seen);
                                Ok::<_, Infallible>(
                                    Response::builder()
                                        .status(status)
                                        .body(Body::from(answer))
                                        .unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Server {
            base,
            ca_file,
            seen,
            _dir: dir,
        }
    }

    fn pem(label: &str, der: &[u8]) -> String {
        let text = STANDARD.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in text.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    /// A new P-256 key written as a `.p8` file; returns the file and the public key.
    fn apns_key(dir: &Path) -> (PathBuf, Vec<u8>) {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let path = dir.join(format!("AuthKey_{KEY_ID}.p8"));
        std::fs::write(&path, pem("PRIVATE KEY", pkcs8.as_ref())).unwrap();
        (path, pair.public_key().as_ref().to_vec())
    }

    fn apns_config(server: &Server, key_file: PathBuf) -> NotifyConfig {
        NotifyConfig {
            apns: Some(ApnsConfig {
                team_id: TEAM.into(),
                key_id: KEY_ID.into(),
                key_file,
                topic: TOPIC.into(),
                endpoint: server.base.clone(),
                timeout_ms: WAIT.as_millis() as u64,
            }),
            ca_file: Some(server.ca_file.clone()),
            retry_base_ms: 1,
            ..NotifyConfig::default()
        }
    }

    /// A service-account file whose token endpoint is on `server`.
    fn fcm_config(server: &Server, dir: &Path) -> NotifyConfig {
        let path = dir.join("service-account.json");
        let account = json!({
            "type": "service_account",
            "project_id": "tern-test",
            "private_key_id": "0123456789abcdef",
            "private_key": FCM_TEST_KEY,
            "client_email": CLIENT_EMAIL,
            "client_id": "1234567890",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": format!("{}/token", server.base),
        });
        std::fs::write(&path, account.to_string()).unwrap();
        NotifyConfig {
            fcm: Some(FcmConfig {
                service_account_file: path,
                endpoint: server.base.clone(),
                timeout_ms: WAIT.as_millis() as u64,
            }),
            ca_file: Some(server.ca_file.clone()),
            retry_base_ms: 1,
            ..NotifyConfig::default()
        }
    }

    fn notification(provider: Provider, token: &str) -> Notification {
        Notification {
            user: "bob".into(),
            device: "phone".into(),
            provider,
            token: token.into(),
            title: "alice".into(),
            body: "hello".into(),
            conversation_id: (1 << 63) | 1,
            seq: 42,
            sender: "alice".into(),
            collapse_id: Some("c1".into()),
            expires_at_ms: None,
            data: BTreeMap::from([("kind".to_owned(), "text".to_owned())]),
        }
    }

    /// A hook reporting the tokens declared dead.
    fn dead_tokens() -> (InvalidTokenHook, std_mpsc::Receiver<String>) {
        let (report, reported) = std_mpsc::channel();
        let report = Mutex::new(report);
        let hook: InvalidTokenHook = Arc::new(move |n: &Notification| {
            report.lock().unwrap().send(n.token.clone()).unwrap();
        });
        (hook, reported)
    }

    /// A JWT's header and claims, checked against `verify(signed part, signature)`.
    fn open_jwt(
        jwt: &str,
        verify: impl FnOnce(&[u8], &[u8]),
    ) -> (serde_json::Value, serde_json::Value) {
        let (signed, sig) = jwt.rsplit_once('.').unwrap();
        let (header, claims) = signed.split_once('.').unwrap();
        verify(signed.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap());
        let decode = |part: &str| -> serde_json::Value {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
        };
        (decode(header), decode(claims))
    }

    fn apns_only(c: ProviderCounters) -> NotifyCounters {
        NotifyCounters {
            apns: c,
            ..NotifyCounters::default()
        }
    }

    #[test]
    fn apns_sends_the_documented_request_over_http2_with_a_reused_jwt() {
        let side = Side::start();
        let server = h2_server(&side, |_, _| (200, String::new()));
        let dir = tempfile::tempdir().unwrap();
        let (key_file, public_key) = apns_key(dir.path());
        let notifier = Notifier::start(apns_config(&server, key_file), &side.handle, None).unwrap();
        assert_eq!(
            Provider::ALL.map(|p| notifier.provides(p)),
            [true, false, false]
        );

        let before = now_secs();
        assert!(notifier.enqueue(notification(Provider::Apns, "a1b2c3")));
        side.wait(notifier.flush());
        let after = now_secs();
        let mut second = notification(Provider::Apns, "d4e5f6");
        second.collapse_id = None;
        second.expires_at_ms = Some(4_102_444_800_123);
        assert!(notifier.enqueue(second));
        side.wait(notifier.flush());

        let first = server.next();
        assert_eq!(first.method, "POST");
        assert_eq!(first.path, "/3/device/a1b2c3");
        assert_eq!(first.version, Version::HTTP_2);
        for (name, value) in [
            ("apns-topic", TOPIC),
            ("apns-push-type", "alert"),
            ("apns-priority", "10"),
            ("apns-expiration", "0"),
            ("apns-collapse-id", "c1"),
            ("content-type", "application/json"),
        ] {
            assert_eq!(first.header(name), Some(value), "{name}");
        }
        let mut apns_headers: Vec<&str> = first
            .headers
            .keys()
            .map(|k| k.as_str())
            .filter(|k| k.starts_with("apns-"))
            .collect();
        apns_headers.sort();
        assert_eq!(
            apns_headers,
            [
                "apns-collapse-id",
                "apns-expiration",
                "apns-priority",
                "apns-push-type",
                "apns-topic"
            ]
        );
        assert_eq!(
            first.json(),
            json!({
                "aps": {
                    "alert": {"title": "alice", "body": "hello"},
                    "sound": "default",
                    "thread-id": "9223372036854775809",
                },
                "tern": {
                    "conversation_id": "9223372036854775809",
                    "seq": 42,
                    "sender": "alice",
                    "data": {"kind": "text"},
                },
            })
        );
        let jwt = first
            .header("authorization")
            .unwrap()
            .strip_prefix("bearer ")
            .unwrap();
        let (header, claims) = open_jwt(jwt, |signed, sig| {
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &public_key)
                .verify(signed, sig)
                .expect("the JWT verifies with the key's public key");
        });
        assert_eq!(header, json!({"alg": "ES256", "kid": KEY_ID}));
        let iat = claims["iat"].as_u64().unwrap();
        assert!(
            (before..=after).contains(&iat),
            "{before} <= {iat} <= {after}"
        );
        assert_eq!(claims, json!({"iss": TEAM, "iat": iat}));

        let second = server.next();
        assert_eq!(second.path, "/3/device/d4e5f6");
        assert_eq!(second.version, Version::HTTP_2);
        assert_eq!(second.header("apns-expiration"), Some("4102444800"));
        assert_eq!(second.header("apns-collapse-id"), None);
        assert_eq!(
            second.header("authorization"),
            first.header("authorization")
        );
        server.assert_no_more();
        assert_eq!(
            notifier.counters(),
            apns_only(ProviderCounters {
                sent: 2,
                ..ProviderCounters::default()
            })
        );
    }

    #[test]
    fn apns_jwt_is_minted_again_after_50_minutes() {
        let dir = tempfile::tempdir().unwrap();
        let (key_file, _) = apns_key(dir.path());
        let cfg = NotifyConfig {
            apns: Some(ApnsConfig {
                team_id: TEAM.into(),
                key_id: KEY_ID.into(),
                key_file,
                topic: TOPIC.into(),
                ..ApnsConfig::default()
            }),
            ..NotifyConfig::default()
        };
        let (auth, endpoint) = cfg.load().unwrap().apns.unwrap();
        assert_eq!(endpoint, DEFAULT_APNS_ENDPOINT);
        let t = 1_700_000_000;
        let first = auth.token(t).unwrap();
        assert_eq!(auth.token(t + 50 * 60 - 1).unwrap(), first);
        let renewed = auth.token(t + 50 * 60).unwrap();
        assert_ne!(renewed, first);
        let (_, claims) = open_jwt(&renewed, |_, _| {});
        assert_eq!(claims, json!({"iss": TEAM, "iat": t + 50 * 60}));
        assert_eq!(auth.token(t + 50 * 60 + 1).unwrap(), renewed);
        // A refusal of an older JWT does not throw away the newer one.
        auth.forget(&first);
        assert_eq!(auth.token(t + 50 * 60 + 2).unwrap(), renewed);
        auth.forget(&renewed);
        assert_ne!(auth.token(t + 50 * 60 + 2).unwrap(), renewed);
    }

    #[test]
    fn apns_dead_tokens_are_reported_and_other_refusals_fail_at_once() {
        let side = Side::start();
        let server = h2_server(&side, |seen, _| match seen.path.as_str() {
            "/3/device/gone" => (410, r#"{"reason":"Unregistered","timestamp":1}"#.into()),
            "/3/device/bad" => (400, r#"{"reason":"BadDeviceToken"}"#.into()),
            "/3/device/othertopic" => (400, r#"{"reason":"DeviceTokenNotForTopic"}"#.into()),
            _ => (400, r#"{"reason":"BadCollapseId"}"#.into()),
        });
        let dir = tempfile::tempdir().unwrap();
        let (key_file, _) = apns_key(dir.path());
        let (hook, dead) = dead_tokens();
        let notifier =
            Notifier::start(apns_config(&server, key_file), &side.handle, Some(hook)).unwrap();
        for token in ["gone", "bad", "othertopic", "collapse", "not/hex"] {
            assert!(notifier.enqueue(notification(Provider::Apns, token)));
        }
        side.wait(notifier.flush());

        let mut reported: Vec<String> = dead.try_iter().collect();
        reported.sort();
        assert_eq!(reported, ["bad", "gone", "not/hex", "othertopic"]);
        // One request each, and none for the malformed token.
        let mut paths: Vec<String> = (0..4).map(|_| server.next().path).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "/3/device/bad",
                "/3/device/collapse",
                "/3/device/gone",
                "/3/device/othertopic"
            ]
        );
        server.assert_no_more();
        assert_eq!(
            notifier.counters(),
            apns_only(ProviderCounters {
                invalid_token: 4,
                failed: 1,
                ..ProviderCounters::default()
            })
        );
    }

    #[test]
    fn apns_busy_answers_are_retried_with_backoff_then_failed() {
        let side = Side::start();
        let server = h2_server(&side, |_, n| match n {
            0..=2 => (500, r#"{"reason":"InternalServerError"}"#.into()),
            3 => (429, r#"{"reason":"TooManyRequests"}"#.into()),
            _ => (200, String::new()),
        });
        let dir = tempfile::tempdir().unwrap();
        let (key_file, _) = apns_key(dir.path());
        let (hook, dead) = dead_tokens();
        let notifier =
            Notifier::start(apns_config(&server, key_file), &side.handle, Some(hook)).unwrap();
        assert!(notifier.enqueue(notification(Provider::Apns, "down")));
        side.wait(notifier.flush());
        assert_eq!(
            notifier.counters(),
            apns_only(ProviderCounters {
                failed: 1,
                ..ProviderCounters::default()
            })
        );
        assert!(notifier.enqueue(notification(Provider::Apns, "busy")));
        side.wait(notifier.flush());

        let paths: Vec<String> = (0..5).map(|_| server.next().path).collect();
        assert_eq!(
            paths,
            [
                "/3/device/down",
                "/3/device/down",
                "/3/device/down",
                "/3/device/busy",
                "/3/device/busy"
            ]
        );
        server.assert_no_more();
        assert!(dead.try_recv().is_err());
        assert_eq!(
            notifier.counters(),
            apns_only(ProviderCounters {
                sent: 1,
                failed: 1,
                ..ProviderCounters::default()
            })
        );
    }

    #[test]
    fn apns_expired_provider_token_is_replaced_once() {
        let side = Side::start();
        let server = h2_server(&side, |seen, n| match (seen.path.as_str(), n) {
            ("/3/device/renew", 0) | ("/3/device/never", _) => {
                (403, r#"{"reason":"ExpiredProviderToken"}"#.into())
            }
            _ => (200, String::new()),
        });
        let dir = tempfile::tempdir().unwrap();
        let (key_file, _) = apns_key(dir.path());
        let notifier = Notifier::start(apns_config(&server, key_file), &side.handle, None).unwrap();
        assert!(notifier.enqueue(notification(Provider::Apns, "renew")));
        side.wait(notifier.flush());
        let (refused, accepted) = (server.next(), server.next());
        assert_eq!(refused.path, "/3/device/renew");
        assert_eq!(accepted.path, "/3/device/renew");
        // ECDSA signatures are randomised, so a new JWT differs even within the same second.
        assert_ne!(
            refused.header("authorization"),
            accepted.header("authorization")
        );

        assert!(notifier.enqueue(notification(Provider::Apns, "never")));
        side.wait(notifier.flush());
        assert_eq!(server.next().path, "/3/device/never");
        assert_eq!(server.next().path, "/3/device/never");
        server.assert_no_more();
        assert_eq!(
            notifier.counters(),
            apns_only(ProviderCounters {
                sent: 1,
                failed: 1,
                ..ProviderCounters::default()
            })
        );
    }

    fn token_answer(token: &str) -> (u16, String) {
        let answer = json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"});
        (200, answer.to_string())
    }

    fn fcm_only(c: ProviderCounters) -> NotifyCounters {
        NotifyCounters {
            fcm: c,
            ..NotifyCounters::default()
        }
    }

    #[test]
    fn fcm_exchanges_a_signed_assertion_and_sends_the_v1_message() {
        let side = Side::start();
        let server = h2_server(&side, |seen, _| match seen.path.as_str() {
            "/token" => token_answer("ya29.first"),
            SEND_PATH => (200, r#"{"name":"projects/tern-test/messages/0:1"}"#.into()),
            _ => (404, String::new()),
        });
        let dir = tempfile::tempdir().unwrap();
        let notifier =
            Notifier::start(fcm_config(&server, dir.path()), &side.handle, None).unwrap();
        assert_eq!(
            Provider::ALL.map(|p| notifier.provides(p)),
            [false, true, false]
        );
        let before = now_secs();
        assert!(notifier.enqueue(notification(Provider::Fcm, "fcm-token-1")));
        side.wait(notifier.flush());
        let after = now_secs();
        let mut second = notification(Provider::Fcm, "fcm-token-2");
        second.collapse_id = None;
        second.expires_at_ms = Some(now_ms() + 120_000);
        second.data.insert("seq".into(), "overridden".into());
        assert!(notifier.enqueue(second));
        side.wait(notifier.flush());

        let token = server.next();
        assert_eq!(
            (token.method.as_str(), token.path.as_str(), token.version),
            ("POST", "/token", Version::HTTP_2)
        );
        assert_eq!(
            token.header("content-type"),
            Some("application/x-www-form-urlencoded")
        );
        let assertion = token
            .text()
            .strip_prefix(
                "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=",
            )
            .expect("the form body");
        let key = RsaKeyPair::from_pkcs8(
            pkcs8_from_pem(FCM_TEST_KEY.as_bytes())
                .unwrap()
                .secret_pkcs8_der(),
        )
        .unwrap();
        let (header, claims) = open_jwt(assertion, |signed, sig| {
            UnparsedPublicKey::new(
                &signature::RSA_PKCS1_2048_8192_SHA256,
                key.public().as_ref(),
            )
            .verify(signed, sig)
            .expect("the assertion verifies with the service account's public key");
        });
        assert_eq!(header, json!({"alg": "RS256", "typ": "JWT"}));
        let iat = claims["iat"].as_u64().unwrap();
        assert!(
            (before..=after).contains(&iat),
            "{before} <= {iat} <= {after}"
        );
        assert_eq!(
            claims,
            json!({
                "iss": CLIENT_EMAIL,
                "scope": "https://www.googleapis.com/auth/firebase.messaging",
                "aud": format!("{}/token", server.base),
                "iat": iat,
                "exp": iat + 3600,
            })
        );

        let send = server.next();
        assert_eq!(
            (send.method.as_str(), send.path.as_str(), send.version),
            ("POST", SEND_PATH, Version::HTTP_2)
        );
        assert_eq!(send.header("authorization"), Some("Bearer ya29.first"));
        assert_eq!(send.header("content-type"), Some("application/json"));
        assert_eq!(
            send.json(),
            json!({
                "message": {
                    "token": "fcm-token-1",
                    "notification": {"title": "alice", "body": "hello"},
                    "data": {
                        "conversation_id": "9223372036854775809",
                        "seq": "42",
                        "sender": "alice",
                        "kind": "text",
                    },
                    "android": {"priority": "HIGH", "ttl": "0s", "collapse_key": "c1"},
                }
            })
        );

        // The access token is reused: no second token request.
        let send = server.next();
        assert_eq!(send.path, SEND_PATH);
        assert_eq!(send.header("authorization"), Some("Bearer ya29.first"));
        let message = &send.json()["message"];
        assert_eq!(message["token"], "fcm-token-2");
        assert_eq!(message["data"]["seq"], "42");
        let ttl = message["android"]["ttl"].as_str().unwrap();
        let ttl: u64 = ttl.strip_suffix('s').unwrap().parse().unwrap();
        assert!((100..=120).contains(&ttl), "ttl {ttl}");
        assert_eq!(message["android"].get("collapse_key"), None);
        server.assert_no_more();
        assert_eq!(
            notifier.counters(),
            fcm_only(ProviderCounters {
                sent: 2,
                ..ProviderCounters::default()
            })
        );
    }

    #[test]
    fn fcm_renews_the_access_token_once_on_401() {
        let side = Side::start();
        let minted = AtomicUsize::new(0);
        let server = h2_server(&side, move |seen, _| {
            if seen.path == "/token" {
                return token_answer(&format!(
                    "tok-{}",
                    minted.fetch_add(1, Ordering::SeqCst) + 1
                ));
            }
            let stale = seen.header("authorization") == Some("Bearer tok-1");
            let never = seen.json()["message"]["token"] == "fcm-never";
            if stale || never {
                let error = json!({"error": {"code": 401, "status": "UNAUTHENTICATED"}});
                (401, error.to_string())
            } else {
                (200, "{}".into())
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let notifier =
            Notifier::start(fcm_config(&server, dir.path()), &side.handle, None).unwrap();
        assert!(notifier.enqueue(notification(Provider::Fcm, "fcm-stale")));
        side.wait(notifier.flush());
        assert!(notifier.enqueue(notification(Provider::Fcm, "fcm-never")));
        side.wait(notifier.flush());

        let seen: Vec<(String, Option<String>)> = (0..7)
            .map(|_| {
                let s = server.next();
                let auth = s.header("authorization").map(str::to_owned);
                (s.path, auth)
            })
            .collect();
        let send = |token: &str| (SEND_PATH.to_owned(), Some(format!("Bearer {token}")));
        let token = || ("/token".to_owned(), None);
        assert_eq!(
            seen,
            [
                token(),
                send("tok-1"),
                token(),
                send("tok-2"),
                send("tok-2"),
                token(),
                send("tok-3"),
            ]
        );
        server.assert_no_more();
        assert_eq!(
            notifier.counters(),
            fcm_only(ProviderCounters {
                sent: 1,
                failed: 1,
                ..ProviderCounters::default()
            })
        );
    }

    #[test]
    fn fcm_unregistered_and_invalid_tokens_are_reported() {
        let side = Side::start();
        let server = h2_server(&side, |seen, _| {
            if seen.path == "/token" {
                return token_answer("ya29.t");
            }
            let violation = |field: &str| {
                json!({"error": {
                    "code": 400,
                    "message": "Invalid value",
                    "status": "INVALID_ARGUMENT",
                    "details": [
                        {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                         "errorCode": "INVALID_ARGUMENT"},
                        {"@type": "type.googleapis.com/google.rpc.BadRequest",
                         "fieldViolations": [{"field": field, "description": "bad"}]},
                    ],
                }})
                .to_string()
            };
            match seen.json()["message"]["token"].as_str().unwrap() {
                "fcm-gone" => (
                    404,
                    json!({"error": {
                        "code": 404,
                        "message": "Requested entity was not found.",
                        "status": "NOT_FOUND",
                        "details": [{
                            "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                            "errorCode": "UNREGISTERED",
                        }],
                    }})
                    .to_string(),
                ),
                "fcm-bad" => (400, violation("message.token")),
                _ => (400, violation("message.data[0].key")),
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let (hook, dead) = dead_tokens();
        let notifier =
            Notifier::start(fcm_config(&server, dir.path()), &side.handle, Some(hook)).unwrap();
        for token in ["fcm-gone", "fcm-bad", "fcm-bad-data"] {
            assert!(notifier.enqueue(notification(Provider::Fcm, token)));
        }
        side.wait(notifier.flush());

        let mut reported: Vec<String> = dead.try_iter().collect();
        reported.sort();
        assert_eq!(reported, ["fcm-bad", "fcm-gone"]);
        let paths: Vec<String> = (0..4).map(|_| server.next().path).collect();
        assert_eq!(paths.iter().filter(|p| *p == "/token").count(), 1);
        assert_eq!(paths.iter().filter(|p| *p == SEND_PATH).count(), 3);
        server.assert_no_more();
        assert_eq!(
            notifier.counters(),
            fcm_only(ProviderCounters {
                invalid_token: 2,
                failed: 1,
                ..ProviderCounters::default()
            })
        );
    }

    #[test]
    fn webhook_provider_posts_a_signed_body() {
        let side = Side::start();
        let server = h2_server(&side, |seen, _| match seen.json()["token"].as_str() {
            Some("dead") => (410, String::new()),
            _ => (204, String::new()),
        });
        let cfg = NotifyConfig {
            webhook: Some(NotifyWebhookConfig {
                url: format!("{}/push?app=1", server.base),
                secret: SECRET.into(),
                ..NotifyWebhookConfig::default()
            }),
            ca_file: Some(server.ca_file.clone()),
            ..NotifyConfig::default()
        };
        let (hook, dead) = dead_tokens();
        let notifier = Notifier::start(cfg, &side.handle, Some(hook)).unwrap();
        assert_eq!(
            Provider::ALL.map(|p| notifier.provides(p)),
            [false, false, true]
        );
        assert!(notifier.enqueue(notification(Provider::Webhook, "tok")));
        side.wait(notifier.flush());
        let seen = server.next();
        assert_eq!(
            (seen.method.as_str(), seen.path.as_str()),
            ("POST", "/push?app=1")
        );
        assert_eq!(seen.header("content-type"), Some("application/json"));
        assert_eq!(seen.header(webhook::HEADER_EVENT), Some(PUSH_EVENT));
        let delivery = seen.header(webhook::HEADER_DELIVERY).unwrap();
        assert!(delivery.len() == 32 && delivery.bytes().all(|b| b.is_ascii_hexdigit()));
        let signature = seen.header(webhook::HEADER_SIGNATURE).unwrap();
        assert_eq!(
            webhook::verify(SECRET.as_bytes(), signature, &seen.body, now_ms(), 60_000),
            Ok(())
        );
        assert_eq!(
            seen.json(),
            json!({
                "user": "bob",
                "device": "phone",
                "token": "tok",
                "title": "alice",
                "body": "hello",
                "conversation_id": "9223372036854775809",
                "seq": 42,
                "sender": "alice",
                "data": {"kind": "text"},
            })
        );

        let mut expired = notification(Provider::Webhook, "tok");
        expired.expires_at_ms = Some(1);
        assert!(notifier.enqueue(expired));
        assert!(notifier.enqueue(notification(Provider::Webhook, "dead")));
        side.wait(notifier.flush());
        assert_eq!(server.next().json()["token"], "dead");
        server.assert_no_more();
        assert_eq!(dead.try_iter().collect::<Vec<_>>(), ["dead"]);
        assert_eq!(
            notifier.counters(),
            NotifyCounters {
                webhook: ProviderCounters {
                    sent: 1,
                    invalid_token: 1,
                    dropped: 1,
                    ..ProviderCounters::default()
                },
                ..NotifyCounters::default()
            }
        );
    }

    #[test]
    fn a_full_queue_and_unconfigured_providers_drop_without_blocking() {
        let side = Side::start();
        // Takes connections (the kernel's backlog does) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = NotifyConfig {
            webhook: Some(NotifyWebhookConfig {
                url: format!("http://{}/push", silent.local_addr().unwrap()),
                secret: SECRET.into(),
                timeout_ms: 600_000,
            }),
            queue: 2,
            concurrency: 1,
            ..NotifyConfig::default()
        };
        let notifier = Notifier::start(cfg, &side.handle, None).unwrap();
        let accepted = [0; 3].map(|_| notifier.enqueue(notification(Provider::Webhook, "t")));
        assert_eq!(accepted, [true, true, false]);
        assert!(!notifier.enqueue(notification(Provider::Apns, "t")));
        assert_eq!(
            notifier.counters(),
            NotifyCounters {
                apns: ProviderCounters {
                    dropped: 1,
                    ..ProviderCounters::default()
                },
                webhook: ProviderCounters {
                    dropped: 1,
                    ..ProviderCounters::default()
                },
                ..NotifyCounters::default()
            }
        );

        let disabled = Notifier::disabled();
        assert_eq!(
            Provider::ALL.map(|p| disabled.provides(p)),
            [false, false, false]
        );
        assert!(!disabled.enqueue(notification(Provider::Fcm, "t")));
        side.wait(disabled.flush());
        assert_eq!(
            disabled.counters(),
            fcm_only(ProviderCounters {
                dropped: 1,
                ..ProviderCounters::default()
            })
        );
        let none = Notifier::start(NotifyConfig::default(), &side.handle, None).unwrap();
        assert!(!none.enqueue(notification(Provider::Webhook, "t")));
    }

    #[test]
    fn config_has_written_defaults_and_errors_name_the_key() {
        let cfg: NotifyConfig = toml::from_str("").unwrap();
        assert_eq!(
            (
                cfg.queue,
                cfg.concurrency,
                cfg.max_attempts,
                cfg.retry_base_ms
            ),
            (10_000, 64, 3, 500)
        );
        assert!(cfg.webhook.is_none() && cfg.apns.is_none() && cfg.fcm.is_none());
        assert_eq!(cfg.validate(), Ok(()));

        let cfg: NotifyConfig = toml::from_str(
            r#"
            queue = 5
            [apns]
            team_id = "T"
            key_id = "K"
            key_file = "/nonexistent/AuthKey.p8"
            topic = "org.tern.app"
            [fcm]
            service_account_file = "/nonexistent/sa.json"
            [webhook]
            url = "https://push.example/hook"
            secret = "s"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.queue, 5);
        let apns = cfg.apns.as_ref().unwrap();
        assert_eq!(
            (apns.endpoint.as_str(), apns.timeout_ms),
            (DEFAULT_APNS_ENDPOINT, 10_000)
        );
        let fcm = cfg.fcm.as_ref().unwrap();
        assert_eq!(
            (fcm.endpoint.as_str(), fcm.timeout_ms),
            (DEFAULT_FCM_ENDPOINT, 10_000)
        );
        assert_eq!(cfg.webhook.as_ref().unwrap().timeout_ms, 5000);
        assert!(!format!("{cfg:?}").contains("secret: \"s\""));
        let err = cfg.validate().unwrap_err();
        assert!(
            err.starts_with("notify.apns.key_file: cannot read /nonexistent/AuthKey.p8: "),
            "{err}"
        );

        let err = toml::from_str::<NotifyConfig>("[apns]\nteam = \"T\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `team`"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let (key_file, _) = apns_key(dir.path());
        let rsa = dir.path().join("rsa.p8");
        std::fs::write(&rsa, FCM_TEST_KEY).unwrap();
        let no_certs = dir.path().join("empty.pem");
        std::fs::write(&no_certs, "nothing here\n").unwrap();
        let bad_json = dir.path().join("sa.json");
        std::fs::write(&bad_json, "{\"project_id\": 1}").unwrap();
        let apns = |f: &dyn Fn(&mut ApnsConfig)| {
            let mut c = ApnsConfig {
                team_id: TEAM.into(),
                key_id: KEY_ID.into(),
                key_file: key_file.clone(),
                topic: TOPIC.into(),
                ..ApnsConfig::default()
            };
            f(&mut c);
            NotifyConfig {
                apns: Some(c),
                ..NotifyConfig::default()
            }
        };
        assert_eq!(apns(&|_| {}).validate(), Ok(()));
        let cases = [
            (
                apns(&|c| c.key_file = rsa.clone()),
                format!("notify.apns.key_file: {}: not a P-256 key", rsa.display()),
            ),
            (
                apns(&|c| c.topic.clear()),
                "notify.apns.topic: required".into(),
            ),
            (
                apns(&|c| c.endpoint = "http://api.push.apple.com".into()),
                "notify.apns.endpoint: must start with https://".into(),
            ),
            (
                apns(&|c| c.timeout_ms = 0),
                "notify.apns.timeout_ms: must be at least 1".into(),
            ),
            (
                NotifyConfig {
                    queue: 0,
                    ..NotifyConfig::default()
                },
                "notify.queue: must be between 1 and 100000000".into(),
            ),
            (
                NotifyConfig {
                    ca_file: Some(no_certs.clone()),
                    ..NotifyConfig::default()
                },
                format!("notify.ca_file: no certificate in {}", no_certs.display()),
            ),
            (
                NotifyConfig {
                    webhook: Some(NotifyWebhookConfig {
                        url: "https://push.example/hook".into(),
                        ..NotifyWebhookConfig::default()
                    }),
                    ..NotifyConfig::default()
                },
                "notify.webhook.secret: required".into(),
            ),
            (
                NotifyConfig {
                    fcm: Some(FcmConfig {
                        service_account_file: bad_json.clone(),
                        ..FcmConfig::default()
                    }),
                    ..NotifyConfig::default()
                },
                format!(
                    "notify.fcm.service_account_file: {}: invalid type",
                    bad_json.display()
                ),
            ),
        ];
        for (cfg, prefix) in cases {
            let err = cfg.validate().unwrap_err();
            assert!(
                err.starts_with(&prefix),
                "{err:?} should start with {prefix:?}"
            );
        }
    }

    #[test]
    fn providers_counters_and_notifications_print_as_documented() {
        for p in Provider::ALL {
            assert_eq!(p.as_str().parse::<Provider>(), Ok(p));
            assert_eq!(p.to_string(), p.as_str());
        }
        assert_eq!(
            "gcm".parse::<Provider>(),
            Err(UnknownProvider("gcm".into()))
        );
        let zero = json!({"sent": 0, "failed": 0, "dropped": 0, "invalid_token": 0});
        assert_eq!(
            serde_json::to_value(NotifyCounters::default()).unwrap(),
            json!({"apns": zero, "fcm": zero, "webhook": zero})
        );
        let printed = format!("{:?}", notification(Provider::Fcm, "secret-token"));
        assert!(
            printed.contains("bob") && printed.contains("Fcm"),
            "{printed}"
        );
        assert!(
            !printed.contains("secret-token") && !printed.contains("hello"),
            "{printed}"
        );
    }

    #[test]
    fn access_tokens_are_kept_until_a_minute_before_they_expire() {
        let token = AccessToken {
            value: "t".into(),
            expires_at: 10_000,
        };
        assert!(token.fresh(0));
        assert!(token.fresh(10_000 - 61));
        assert!(!token.fresh(10_000 - 60));
        assert!(!token.fresh(20_000));
    }
}
