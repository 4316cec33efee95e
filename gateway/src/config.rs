//! Gateway configuration: one typed struct with written defaults, read from an optional TOML file,
//! with `--set key=value` / `TERN_SET` settings applied over it ([`Config::with_settings`]),
//! then the common options' own flags and `TERN_*` environment variables; validated once at
//! start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How durable an append must be before the sender gets its SendAck.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledge after the write-ahead log is fsynced (one fsync per group commit). Default.
    Fsync,
    /// Acknowledge after the WAL write; fsync every `wal_sync_interval_ms`.
    Wal,
    /// No WAL: for tests and benchmarks only.
    Memory,
}

/// What a login over `max_devices_per_user` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceLimitPolicy {
    /// The new login is refused with `TOO_MANY_DEVICES` (default).
    Refuse,
    /// The device of the user that logged in first (of those connected) is kicked with
    /// `Kick{REPLACED}`, and the new login goes on.
    KickOldest,
}

/// An optional listen address whose absence is written `"off"` (TOML has no null).
mod address_or_off {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text == "off" {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            D::Error::custom(format!(
                "expected an address such as \"127.0.0.1:7680\" or \"off\", got {text:?}"
            ))
        })
    }
}

/// Every option of the gateway. Field docs are the reference; `tern-gateway --help` and
/// docs/architecture.md point here.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// TCP listen address for client connections. Default `127.0.0.1:7600`.
    pub tcp: SocketAddr,
    /// Serve plaintext TCP on `tcp` (default true). false: no plaintext listener; clients connect
    /// over TLS (`tls`) or QUIC (`quic`), one of which must be set.
    pub plaintext: bool,
    /// QUIC listen address (UDP) for client connections; none (default) means no QUIC. The same
    /// frames run over one bidirectional stream per connection.
    pub quic: Option<SocketAddr>,
    /// TLS-over-TCP listen address; none (default) means no TLS listener. Same certificate as
    /// QUIC.
    pub tls: Option<SocketAddr>,
    /// PEM certificate chain for QUIC and TLS. Without `tls_cert` and `tls_key`, a self-signed
    /// development certificate is generated on first start and kept in
    /// `<data_dir>/tls/cert.pem` and `key.pem` (clients trust it with `tern --ca`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key matching `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Number of cores (executors) to run; 0 means every available core.
    pub cores: usize,
    /// Directory for the message log, the server secret and (later) TLS material.
    pub data_dir: PathBuf,
    /// `fsync` (default), `wal` or `memory`.
    pub durability: Durability,
    /// WAL sync interval for `durability = "wal"`, in milliseconds.
    pub wal_sync_interval_ms: u64,
    /// With `durability = "fsync"`, the least time between the starts of two WAL syncs, in
    /// microseconds (default 500; 0 to 100,000). Sends that arrive sooner wait for the next sync
    /// and share it, so the disk gets at most one sync per interval at any load; a Send with no
    /// sync started within the interval is synced at once. 0 syncs as often as the disk allows,
    /// which on a cloud or virtual disk spends its request budget (docs/PERFORMANCE.md, "Syncs
    /// spaced").
    pub min_sync_interval_us: u64,
    /// Secret used to sign tokens (at least 32 characters). Default: generated on first start and
    /// stored in `<data_dir>/secret`.
    #[serde(skip_serializing)]
    pub secret: Option<String>,
    /// Maximum frame size in bytes (the length prefix). Default 1 MiB.
    pub max_frame_bytes: u32,
    /// Maximum message payload size in bytes. Default 64 KiB.
    pub max_payload_bytes: u32,
    /// A connection that has not sent Hello within this many milliseconds is closed.
    pub login_timeout_ms: u64,
    /// Clients are told to ping this often (milliseconds).
    pub heartbeat_interval_ms: u32,
    /// A logged-in connection that sends nothing for this long (milliseconds) is closed.
    pub idle_timeout_ms: u64,
    /// A logged-in TCP connection that sent nothing for this long (milliseconds), with nothing
    /// queued for it, is parked: its socket waits in one epoll set shared by all cores and its
    /// session keeps only its state, no read buffer, tasks or I/O requests (docs/architecture.md,
    /// "Parked connections"). It comes back on the next frame, delivery or kick. 0: never park.
    pub park_after_ms: u64,
    /// Maximum simultaneously connected devices per user (default 10; a dual-channel session is
    /// one device).
    pub max_devices_per_user: usize,
    /// A login over `max_devices_per_user`: `"refuse"` (default; `TOO_MANY_DEVICES`) or
    /// `"kick_oldest"` (the device connected longest is kicked with `Kick{REPLACED}`).
    pub device_limit_policy: DeviceLimitPolicy,
    /// Frames queued for one connection before the server stops pushing to it and asks it to sync
    /// (default 4,096, at least 16).
    pub outbound_queue_frames: usize,
    /// Bytes queued for one connection before the server stops pushing to it and asks it to sync
    /// (default 4 MiB, at least 4 × (`max_payload_bytes` + 1024), so that a quarter of it holds
    /// a message of any size; a queue with nothing in it takes any one frame). With
    /// `outbound_queue_frames` it bounds what a device that does not read costs the server: live
    /// messages that arrive during its sync wait within the same bounds.
    pub outbound_queue_bytes: usize,
    /// Messages per sync or history page (upper bound on what a client may ask for).
    pub max_page: u32,
    /// Graceful shutdown bound in milliseconds.
    pub shutdown_timeout_ms: u64,
    /// Bytes of io_uring memory glommio locks per core. Keep it small: it counts against
    /// `ulimit -l` (locked memory).
    pub io_memory_bytes: usize,
    /// Whether the process may back its heap with transparent huge pages (2 MiB). Off by
    /// default: the allocator asks for them, and the first touch of each one zeroes 2 MiB in
    /// one page fault, which held a storage writer thread for about 5 ms at a time on a virtual
    /// machine while every queued append waited (docs/PERFORMANCE.md, "Huge pages"). Applies
    /// to the whole process.
    pub transparent_huge_pages: bool,
    /// Idempotency window: a Send repeated within this many seconds with the same client message
    /// id is answered with the original SendAck.
    pub dedup_window_secs: u64,
    /// Idempotency window by count: the most recent Sends remembered, over all users (about 100
    /// bytes of memory each, whatever the id's length). A Send repeated after this many later
    /// Sends is stored again even within `dedup_window_secs`: at 200,000 Sends a second the
    /// default million covers 5 seconds. At least 1000.
    pub dedup_window_entries: usize,
    /// Most connections the process holds (logged in or not); more are refused with
    /// `CONNECTION_LIMIT`. 0 (default) means the open-file limit minus 512 descriptors kept for
    /// the message log and listeners, so the gateway refuses cleanly before accept fails.
    pub max_connections: usize,
    /// Most connections from one IP address; 0 (default) means no per-address limit. Without
    /// one, a single address can hold every connection `max_connections` allows, and new logins
    /// are refused with CONNECTION_LIMIT until it lets go (users already logged in are not
    /// affected). Clients behind carrier-grade NAT share addresses: set it with that in mind.
    pub max_connections_per_ip: usize,
    /// Sends per second one connection may make (bursts up to twice that); more get
    /// `RATE_LIMITED`. 0 = no limit.
    pub rate_messages_per_sec: u32,
    /// Sends per second one user may make over all devices (bursts up to twice that). 0 = no limit.
    pub rate_user_messages_per_sec: u32,
    /// Requests (frames of any kind) per second one connection may make (bursts up to twice
    /// that); more get `RATE_LIMITED`. 0 = no limit.
    pub rate_requests_per_sec: u32,
    /// Bytes per second the server reads from one connection; a faster client is not read until
    /// it is within the rate again (TCP flow control slows it down). Bursts up to twice that, and
    /// always at least one maximum-size frame. 0 = no limit.
    pub rate_read_bytes_per_sec: u64,
    /// A connection whose socket accepts none of the bytes queued for it for this long
    /// (milliseconds; a client that stopped reading) is reset.
    pub write_timeout_ms: u64,
    /// Most members a group may have (the owner included); an invite or join past it fails with
    /// `LIMIT_EXCEEDED`. Default 100,000.
    pub group_max_members: u32,
    /// Most hidden members a group may have (members added through the admin API who receive
    /// everything and are listed to nobody; they do not count against `group_max_members`).
    /// 1..=10,000; default 100. Adding one past it fails with `LIMIT_EXCEEDED`.
    pub group_max_hidden_members: u32,
    /// Whether a user who joins a group may read its messages from before they joined (default
    /// false). When false, a member's sync and history start at the event that added them (their
    /// latest join: a member who left and came back starts at the return), as in most chat
    /// apps; members who joined before the server recorded where (older data directories) read
    /// the whole group. Hidden members (added through the admin API) always read the whole
    /// log.
    pub new_members_see_history: bool,
    /// Whether users who are not friends may send each other 1:1 messages (default true). When
    /// false, such a Send (or Typing notice) fails with FORBIDDEN.
    pub allow_non_friend_messages: bool,
    /// Whether blocking a friend keeps the friendship (default false: blocking ends it both
    /// ways, with `FRIEND_DELETED` to both users, and drops friend requests between the two,
    /// as Tencent Cloud IM does by default).
    pub block_keeps_friends: bool,
    /// A live room with at least this many viewers on one core gets its messages in batches on
    /// that core: each flush writes every viewer once, with everything that arrived since the
    /// last, instead of once per message. 0 turns batching off. Default 1,000.
    pub room_batch_viewers: usize,
    /// The shortest interval between two flushes of big rooms on a core (milliseconds,
    /// 1..=10,000). A message to a quiet room goes out at once; the ones that follow within
    /// the interval wait for its end. Default 200.
    pub room_batch_ms: u64,
    /// The socket writes per second a core may spend on big rooms' viewers (at least 100): after
    /// a flush that wrote to N viewers the next waits N / `room_writes_per_sec` seconds if that
    /// is longer than `room_batch_ms`, so a bigger room is flushed less often instead of costing
    /// more. Default 10,000 (about a tenth of a core).
    pub room_writes_per_sec: u32,
    /// The latest messages of each live room kept in memory for viewers who ask for them when
    /// they enter (`EnterRoom.recent`), at most 1,000; 0 keeps none. Default 20.
    pub room_history_messages: usize,
    /// The oldest such message a viewer entering gets, in seconds (1..=86,400). Default 300.
    pub room_history_secs: u64,
    /// Bytes of room messages kept per core for entering viewers, over all rooms (at least
    /// 65,536); past it the core's oldest go first. Default 16 MiB.
    pub room_history_bytes: usize,
    /// Most friends one user may have; more fail with LIMIT_EXCEEDED. Default 3,000.
    pub max_friends: u32,
    /// How long after sending its sender may recall a message (ms; group owners and admins may
    /// recall any time). Default 120,000 (2 minutes).
    pub recall_window_ms: u64,
    /// Listen address of the admin and push HTTP API (docs/API.md). Default
    /// `127.0.0.1:7680`; `"off"` (or `--no-api`) turns it off. HTTPS when `tls_cert` is set.
    #[serde(with = "address_or_off")]
    pub api: Option<SocketAddr>,
    /// The admin secret API requests present as `Authorization: Bearer <secret>` (at least 32
    /// characters). Default: generated on first start and stored in `<data_dir>/api_secret`.
    #[serde(skip_serializing)]
    pub api_secret: Option<String>,
    /// API requests per second, all callers together (bursts up to twice that); more get 429
    /// RATE_LIMITED. 0 = no limit. Default 2,000.
    pub api_rate_per_sec: u32,
    /// The user the API sends as when a message names no sender ("send as the system"): it may
    /// message anyone and acts as an owner in every group. Default `administrator`. Do not
    /// give this id to a real user.
    pub system_user: String,
    /// Webhooks to the app's server (`[webhook]` table; off while `url` is empty). See
    /// [`crate::webhook::WebhookConfig`] for its keys and defaults.
    pub webhook: crate::webhook::WebhookConfig,
    /// Offline push notifications (`[notify]` with `[notify.apns]`, `[notify.fcm]`,
    /// `[notify.webhook]`): when a 1:1 message's recipient has no online device, each of their
    /// devices with a registered push token gets a notification through its provider. Off
    /// while no provider is configured. See [`crate::notify::NotifyConfig`].
    pub notify: crate::notify::NotifyConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tcp: "127.0.0.1:7600".parse().expect("static address"),
            plaintext: true,
            quic: None,
            tls: None,
            tls_cert: None,
            tls_key: None,
            cores: 0,
            data_dir: PathBuf::from("./tern-data"),
            durability: Durability::Fsync,
            wal_sync_interval_ms: 100,
            min_sync_interval_us: 500,
            secret: None,
            max_frame_bytes: 1 << 20,
            max_payload_bytes: 64 << 10,
            login_timeout_ms: 10_000,
            heartbeat_interval_ms: 30_000,
            idle_timeout_ms: 60_000,
            park_after_ms: 2_000,
            max_devices_per_user: 10,
            device_limit_policy: DeviceLimitPolicy::Refuse,
            outbound_queue_frames: 4096,
            outbound_queue_bytes: 4 << 20,
            max_page: 200,
            shutdown_timeout_ms: 5_000,
            io_memory_bytes: 512 << 10,
            transparent_huge_pages: false,
            dedup_window_secs: 24 * 3600,
            dedup_window_entries: 1_000_000,
            max_connections: 0,
            max_connections_per_ip: 0,
            rate_messages_per_sec: 100,
            rate_user_messages_per_sec: 200,
            rate_requests_per_sec: 500,
            rate_read_bytes_per_sec: 1 << 20,
            write_timeout_ms: 30_000,
            group_max_members: 100_000,
            group_max_hidden_members: 100,
            new_members_see_history: false,
            allow_non_friend_messages: true,
            block_keeps_friends: false,
            room_batch_viewers: 1_000,
            room_batch_ms: 200,
            room_writes_per_sec: 10_000,
            room_history_messages: 20,
            room_history_secs: 300,
            room_history_bytes: 16 << 20,
            max_friends: 3000,
            recall_window_ms: 120_000,
            api: Some("127.0.0.1:7680".parse().expect("static address")),
            api_secret: None,
            api_rate_per_sec: 2000,
            system_user: "administrator".into(),
            webhook: crate::webhook::WebhookConfig::default(),
            notify: crate::notify::NotifyConfig::default(),
        }
    }
}

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error("invalid --set {setting:?}: {message}")]
    Set { setting: String, message: String },
}

impl Config {
    /// Parses TOML text (errors are toml's messages, which name the key and line).
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The file's configuration (the defaults without one; unknown keys are errors that name
    /// the key) with `settings` applied in order. Each is `key=value`: any key of the file,
    /// dotted for a table's key (`webhook.url=...`); the value in TOML syntax (`30000`, `true`,
    /// `"a b"`, `["x", "y"]`) or else taken as a string. An unknown key or a value of the wrong
    /// type is an error naming the setting.
    pub fn with_settings(file: Option<&Path>, settings: &[String]) -> Result<Config, ConfigError> {
        let (text, path) = match file {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?,
                path.to_owned(),
            ),
            None => (String::new(), PathBuf::new()),
        };
        // The file alone first, so that its own mistakes are reported with their line.
        let mut cfg = Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.clone(),
            message,
        })?;
        if settings.is_empty() {
            return Ok(cfg);
        }
        let mut table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path,
            message: e.to_string(),
        })?;
        for setting in settings {
            let bad = |message: String| ConfigError::Set {
                setting: setting.clone(),
                message,
            };
            let (key, value) = setting
                .split_once('=')
                .ok_or_else(|| bad("expected key=value".into()))?;
            let value = value.trim();
            let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_owned()));
            let mut parts: Vec<&str> = key.trim().split('.').collect();
            let last = parts.pop().filter(|k| !k.is_empty());
            let Some(last) = last else {
                return Err(bad("the key is empty".into()));
            };
            let mut at = &mut table;
            for part in parts {
                at = at
                    .entry(part)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .ok_or_else(|| bad(format!("`{part}` is not a table")))?;
            }
            at.insert(last.to_owned(), value);
            // Read after each setting, so that an error names the setting at fault.
            cfg = toml::Value::Table(table.clone())
                .try_into()
                .map_err(|e: toml::de::Error| bad(e.to_string()))?;
        }
        Ok(cfg)
    }

    /// Checks every value once; the error names the bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, message: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        }
        if !self.plaintext && self.quic.is_none() && self.tls.is_none() {
            return bad(
                "plaintext",
                "false (--no-plaintext) needs a `tls` or `quic` listener (--tls, --quic), or clients \
                 could not connect at all",
            );
        }
        if self.max_frame_bytes < 1024 || self.max_frame_bytes > 64 << 20 {
            return bad("max_frame_bytes", "must be between 1024 and 67108864");
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes + 1024 > self.max_frame_bytes {
            return bad(
                "max_payload_bytes",
                "must be at least 1 and at least 1024 below max_frame_bytes",
            );
        }
        if self.login_timeout_ms == 0 {
            return bad("login_timeout_ms", "must be greater than 0");
        }
        if self.heartbeat_interval_ms == 0 {
            return bad("heartbeat_interval_ms", "must be greater than 0");
        }
        if self.idle_timeout_ms <= u64::from(self.heartbeat_interval_ms) {
            return bad(
                "idle_timeout_ms",
                "must be greater than heartbeat_interval_ms",
            );
        }
        if self.min_sync_interval_us > 100_000 {
            return bad("min_sync_interval_us", "must be between 0 and 100000");
        }
        if self.max_devices_per_user == 0 {
            return bad("max_devices_per_user", "must be at least 1");
        }
        if self.group_max_members < 2 {
            return bad("group_max_members", "must be at least 2");
        }
        if self.group_max_hidden_members == 0 || self.group_max_hidden_members > 10_000 {
            return bad("group_max_hidden_members", "must be between 1 and 10000");
        }
        if self.outbound_queue_frames < 16 {
            return bad("outbound_queue_frames", "must be at least 16");
        }
        let least = 4 * (self.max_payload_bytes as usize + 1024);
        if self.outbound_queue_bytes < least {
            return bad(
                "outbound_queue_bytes",
                format!("must be at least 4 x (max_payload_bytes + 1024) = {least}"),
            );
        }
        if self.room_batch_ms == 0 || self.room_batch_ms > 10_000 {
            return bad("room_batch_ms", "must be between 1 and 10000");
        }
        if self.room_writes_per_sec < 100 {
            return bad("room_writes_per_sec", "must be at least 100");
        }
        if self.room_history_messages > 1000 {
            return bad("room_history_messages", "must be at most 1000");
        }
        if self.room_history_secs == 0 || self.room_history_secs > 86_400 {
            return bad("room_history_secs", "must be between 1 and 86400");
        }
        if self.room_history_bytes < 65_536 {
            return bad("room_history_bytes", "must be at least 65536");
        }
        if self.dedup_window_entries < 1000 {
            return bad("dedup_window_entries", "must be at least 1000");
        }
        if self.max_page == 0 || self.max_page > 10_000 {
            return bad("max_page", "must be between 1 and 10000");
        }
        if let Some(s) = &self.secret
            && s.len() < 32
        {
            return bad("secret", "must be at least 32 characters");
        }
        if let Some(s) = &self.api_secret
            && s.len() < 32
        {
            return bad("api_secret", "must be at least 32 characters");
        }
        if !crate::token::valid_id(&self.system_user) {
            return bad(
                "system_user",
                "must be 1..=64 bytes without control characters",
            );
        }
        if let Err(message) = self.webhook.validate() {
            return bad("webhook", message);
        }
        if let Err(message) = self.notify.validate() {
            return bad("notify", message);
        }
        if self.io_memory_bytes < 64 << 10 {
            return bad("io_memory_bytes", "must be at least 65536");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad(
                if self.tls_cert.is_some() {
                    "tls_key"
                } else {
                    "tls_cert"
                },
                "tls_cert and tls_key must be given together",
            );
        }
        if self.write_timeout_ms == 0 {
            return bad("write_timeout_ms", "must be greater than 0");
        }
        if self.cores > 1024 {
            return bad("cores", "must be at most 1024 (0 = all cores)");
        }
        Ok(())
    }

    /// The number of executors to start.
    pub fn effective_cores(&self) -> usize {
        if self.cores == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            self.cores
        }
    }

    pub fn login_timeout(&self) -> Duration {
        Duration::from_millis(self.login_timeout_ms)
    }

    /// The connection limit in force: `max_connections`, or the open-file limit less a reserve.
    pub fn effective_max_connections(&self, open_file_limit: u64) -> usize {
        if self.max_connections != 0 {
            self.max_connections
        } else {
            (open_file_limit.saturating_sub(512).max(16)).min(usize::MAX as u64) as usize
        }
    }
}

/// `url` with the password of its user info, if it has one, replaced by `REDACTED`: how URLs
/// from the configuration are printed (`tern-gateway config`) and logged.
pub fn redact_url(url: &str) -> std::borrow::Cow<'_, str> {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Cannot fail: a URL with a password has a host.
            let _ = parsed.set_password(Some("REDACTED"));
            parsed.to_string().into()
        }
        _ => url.into(),
    }
}

/// `#[serde(serialize_with)]` for a URL of the configuration: see [`redact_url`].
pub(crate) fn serialize_redacted_url<S: serde::Serializer>(
    url: &str,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redact_url(url))
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_in_urls_are_redacted_and_nothing_else_changes() {
        assert_eq!(
            redact_url("https://app:hunter2@hooks.example.com:8443/tern?x=1"),
            "https://app:REDACTED@hooks.example.com:8443/tern?x=1"
        );
        for kept in [
            "https://hooks.example.com/tern",
            "http://app@127.0.0.1:9/hook",
            "",
            "not a url",
        ] {
            assert_eq!(redact_url(kept), kept);
        }
    }

    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("tcp = \"127.0.0.1:1\"\nbogus_key = 3\n").unwrap_err();
        assert!(err.contains("bogus_key"), "{err}");
    }

    #[test]
    fn bad_value_names_key() {
        let cfg = Config::from_toml("max_frame_bytes = 10\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("`max_frame_bytes`"), "{err}");
        for bad in [
            "room_batch_ms = 0",
            "room_history_messages = 1001",
            "room_history_secs = 0",
            "room_history_bytes = 1000",
            "outbound_queue_bytes = 65535",
        ] {
            let cfg = Config::from_toml(&format!("{bad}\n")).unwrap();
            let err = cfg.validate().unwrap_err().to_string();
            let key = bad.split(' ').next().unwrap();
            assert!(err.contains(&format!("`{key}`")), "{err}");
        }
        let err = Config::from_toml("durability = \"sometimes\"\n").unwrap_err();
        assert!(err.contains("durability"), "{err}");
        let err = Config::from_toml("device_limit_policy = \"kick_newest\"\n").unwrap_err();
        assert!(err.contains("device_limit_policy"), "{err}");
        let cfg = Config::from_toml("device_limit_policy = \"kick_oldest\"\n").unwrap();
        assert_eq!(cfg.device_limit_policy, DeviceLimitPolicy::KickOldest);
        let cfg = Config::from_toml("min_sync_interval_us = 100001\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("`min_sync_interval_us`"), "{err}");
    }

    /// `--set` values override the file's in order, keep their TOML type, reach tables by a
    /// dotted key, and fall back to a string; mistakes name the setting.
    #[test]
    fn settings_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tern.toml");
        std::fs::write(&file, "idle_timeout_ms = 50000\ncores = 1\n").unwrap();
        let set = |s: &[&str]| {
            let s: Vec<String> = s.iter().map(|s| s.to_string()).collect();
            Config::with_settings(Some(&file), &s)
        };
        let cfg = set(&[]).unwrap();
        assert_eq!((cfg.idle_timeout_ms, cfg.cores), (50_000, 1));
        let cfg = set(&[
            "idle_timeout_ms=70000",
            "idle_timeout_ms = 80000",
            "durability=wal",
            "system_user=\"ops team\"",
            "data_dir = /srv/tern data ",
            "webhook.url=http://127.0.0.1:9/hook",
        ])
        .unwrap();
        assert_eq!((cfg.idle_timeout_ms, cfg.cores), (80_000, 1));
        assert_eq!(cfg.durability, Durability::Wal);
        assert_eq!(cfg.system_user, "ops team");
        assert_eq!(cfg.data_dir, PathBuf::from("/srv/tern data"));
        assert_eq!(cfg.webhook.url, "http://127.0.0.1:9/hook");
        for (bad, names) in [
            ("bogus_key=1", "unknown field `bogus_key`"),
            ("idle_timeout_ms=soon", "invalid type"),
            ("idle_timeout_ms", "key=value"),
            ("=3", "empty"),
            ("cores.x=1", "`cores` is not a table"),
        ] {
            let err = set(&[bad]).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains(names), "{bad}: {err}");
        }
        let err = Config::with_settings(Some(&dir.path().join("missing.toml")), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.toml"), "{err}");
        // Without a file: the defaults, then the settings.
        let cfg = Config::with_settings(None, &["cores=3".to_string()]).unwrap();
        assert_eq!(
            (cfg.cores, cfg.idle_timeout_ms),
            (3, Config::default().idle_timeout_ms)
        );
    }

    /// Both bounds of the idempotency window reach the store; fewer than 1000 entries is refused.
    #[test]
    fn dedup_window_reaches_the_store() {
        let opts = crate::server::store_options(&Config::default());
        assert_eq!(opts.dedup_window.max_entries, 1_000_000);
        assert_eq!(opts.dedup_window.max_age, Duration::from_secs(24 * 3600));
        let cfg =
            Config::from_toml("dedup_window_entries = 1000\ndedup_window_secs = 60\n").unwrap();
        cfg.validate().unwrap();
        let opts = crate::server::store_options(&cfg);
        assert_eq!(opts.dedup_window.max_entries, 1000);
        assert_eq!(opts.dedup_window.max_age, Duration::from_secs(60));
        let cfg = Config::from_toml("dedup_window_entries = 999\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("`dedup_window_entries`"), "{err}");
    }

    /// The spacing of fsyncs reaches the store in microseconds; 0 and the bound are valid.
    #[test]
    fn min_sync_interval_reaches_the_store() {
        let cfg = Config::default();
        let opts = crate::server::store_options(&cfg);
        assert_eq!(opts.min_sync_interval, Duration::from_micros(500));
        for us in [0, 100_000] {
            let cfg = Config::from_toml(&format!("min_sync_interval_us = {us}\n")).unwrap();
            cfg.validate().unwrap();
            let opts = crate::server::store_options(&cfg);
            assert_eq!(opts.min_sync_interval, Duration::from_micros(us));
        }
    }

    #[test]
    fn file_values_override_defaults() {
        let cfg =
            Config::from_toml("tcp = \"127.0.0.1:9\"\ndurability = \"wal\"\ncores = 1\n").unwrap();
        assert_eq!(cfg.tcp, "127.0.0.1:9".parse().unwrap());
        assert_eq!(cfg.durability, Durability::Wal);
        assert_eq!(cfg.effective_cores(), 1);
        assert_eq!(cfg.max_frame_bytes, 1 << 20);
    }
}
