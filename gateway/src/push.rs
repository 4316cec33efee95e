//! Server push (JPush / Getui semantics) and device registrations.
//!
//! A push is made through the admin API (`POST /v1/push`) to every user, or to a union of user
//! ids, aliases and tags. It gets a push id from one counter (the API thread's), is stored once
//! as a record, and is indexed for the devices that must get it later:
//!
//! - to everyone: one index entry (`push/all/<id>`), whatever the number of users; every device
//!   reads the index at login;
//! - to users, aliases and tags: resolved when the push is made, one small entry per user
//!   (`push/u/<user>\0<id>`) naming the user's devices it is for (none = all of them).
//!
//! Online devices get it at once (through the [`crate::admin::Bridge`], one job per core). A
//! device that logs in later reads both indexes from its cursor (the highest push id it
//! acknowledged) and gets every push addressed to it that has not expired, oldest first, at
//! most [`MAX_PENDING_AT_LOGIN`] per login. A push with a time-to-live of 0 is for online devices
//! only and is not indexed. Expired records and index entries are deleted by the janitor.
//!
//! All of it lives in the store's account state (`set_meta`), next to the device registrations:
//! `dev/<user>\0<device>` (push provider and token, alias, do-not-disturb), aliases
//! `alias/<alias>\0<user>\0<device>`, tags `tag/<tag>\0<user>\0<device>` (device empty: the
//! whole user) with the reverse `utag/<user>\0<device>\0<tag>`, and provider tokens
//! `tok/<provider>\0<token>` (a token belongs to one device at a time). Ids never contain NUL
//! (they have no control characters), so the separators are unambiguous.
//!
//! # Invariants
//! - Push ids only increase, also across restarts (blocks of ids are reserved in the store
//!   before they are handed out).
//! - A push's record and index entries are durable before any device gets it, so a device
//!   either is online when the cores deliver it, or finds it at its next login.
//! - A device's cursor only moves to a push id that was delivered to it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tern_protocol::v1::{DeviceSettings, DoNotDisturb, PushAck, PushNotice, SetDevice};
use tern_protocol::{ErrorCode, Frame};
use tern_storage::{MessageStore, MetaChange, StorageError};

use crate::core::{Core, SessionHandle, now_ms};
use crate::session::Ctx;
use crate::token::valid_id;

/// Longest time-to-live of a push (10 days, as JPush).
pub const MAX_TTL_SECS: u64 = 10 * 86_400;
/// Time-to-live when the request names none (1 day).
pub const DEFAULT_TTL_SECS: u64 = 86_400;
/// Most stored pushes one login delivers (oldest first); the rest come at the next login after
/// the device acknowledged these.
pub const MAX_PENDING_AT_LOGIN: usize = 1000;
/// Most devices one alias names.
pub const MAX_ALIAS_DEVICES: usize = 10;
/// Most tags of one device or user.
pub const MAX_TAGS: usize = 100;
/// Longest push token accepted.
pub const MAX_TOKEN_LEN: usize = 4096;
/// Delivered, unacknowledged push ids a connection remembers (for the acknowledged counters).
const UNACKED_KEEP: usize = 256;
/// Push ids whose per-core counters a core keeps.
const COUNTED_PUSHES: usize = 4096;

/// The providers a device can register a token for.
pub const PROVIDERS: [&str; 3] = ["apns", "fcm", "webhook"];

fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 1 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

/// Where the next block of push ids starts (u64 big-endian).
pub const NEXT_KEY: &[u8] = b"push/next";
pub const REC_PREFIX: &[u8] = b"push/rec/";
pub const ALL_PREFIX: &[u8] = b"push/all/";
pub const USER_PREFIX: &[u8] = b"push/u/";

pub fn rec_key(id: u64) -> Vec<u8> {
    key(&[REC_PREFIX, &id.to_be_bytes()])
}
pub fn all_key(id: u64) -> Vec<u8> {
    key(&[ALL_PREFIX, &id.to_be_bytes()])
}
pub fn user_prefix(user: &str) -> Vec<u8> {
    let mut k = key(&[USER_PREFIX, user.as_bytes()]);
    k.push(0);
    k
}
pub fn user_key(user: &str, id: u64) -> Vec<u8> {
    let mut k = user_prefix(user);
    k.extend_from_slice(&id.to_be_bytes());
    k
}
pub fn cursor_key(user: &str, device: &str) -> Vec<u8> {
    key(&[b"push/cur/", user.as_bytes(), device.as_bytes()])
}
pub fn dev_prefix(user: &str) -> Vec<u8> {
    let mut k = key(&[b"dev/", user.as_bytes()]);
    k.push(0);
    k
}
pub fn dev_key(user: &str, device: &str) -> Vec<u8> {
    key(&[b"dev/", user.as_bytes(), device.as_bytes()])
}
pub fn alias_prefix(alias: &str) -> Vec<u8> {
    let mut k = key(&[b"alias/", alias.as_bytes()]);
    k.push(0);
    k
}
pub fn alias_key(alias: &str, user: &str, device: &str) -> Vec<u8> {
    key(&[
        b"alias/",
        alias.as_bytes(),
        user.as_bytes(),
        device.as_bytes(),
    ])
}
pub fn tag_prefix(tag: &str) -> Vec<u8> {
    let mut k = key(&[b"tag/", tag.as_bytes()]);
    k.push(0);
    k
}
pub fn tag_key(tag: &str, user: &str, device: &str) -> Vec<u8> {
    key(&[b"tag/", tag.as_bytes(), user.as_bytes(), device.as_bytes()])
}
pub fn utag_prefix(user: &str) -> Vec<u8> {
    let mut k = key(&[b"utag/", user.as_bytes()]);
    k.push(0);
    k
}
pub fn utag_key(user: &str, device: &str, tag: &str) -> Vec<u8> {
    key(&[b"utag/", user.as_bytes(), device.as_bytes(), tag.as_bytes()])
}
pub fn token_key(provider: &str, token: &str) -> Vec<u8> {
    key(&[b"tok/", provider.as_bytes(), token.as_bytes()])
}

/// The NUL-separated parts of a key after `prefix`.
pub fn split_rest<'a>(k: &'a [u8], prefix: &[u8]) -> Vec<&'a str> {
    k.get(prefix.len()..)
        .unwrap_or_default()
        .split(|&b| b == 0)
        .map(|p| std::str::from_utf8(p).unwrap_or_default())
        .collect()
}

fn be_u64(v: &[u8]) -> u64 {
    <[u8; 8]>::try_from(v).map_or(0, u64::from_be_bytes)
}

/// The trailing push id of an index key.
pub fn id_of_key(k: &[u8]) -> u64 {
    k.len().checked_sub(8).map_or(0, |at| be_u64(&k[at..]))
}

/// A stored push (JSON, versioned).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushRecord {
    pub v: u8,
    pub id: u64,
    pub created_ms: u64,
    /// 0: online devices only.
    pub expires_ms: u64,
    pub title: String,
    pub content_type: u32,
    pub custom_type: String,
    /// Base64.
    pub payload: String,
    /// The audience as requested (for the API's answer).
    pub audience: serde_json::Value,
}

impl PushRecord {
    pub fn notice(&self) -> PushNotice {
        PushNotice {
            push_id: self.id,
            title: self.title.clone(),
            content_type: self.content_type,
            custom_type: self.custom_type.clone(),
            payload: Bytes::from(BASE64.decode(&self.payload).unwrap_or_default()),
            sent_at_ms: self.created_ms,
            expires_at_ms: self.expires_ms,
        }
    }
}

/// A per-user index entry: until when, and for which devices (empty: all of them).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserEntry {
    pub e: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub d: Vec<String>,
}

/// Do-not-disturb window of a device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dnd {
    pub enabled: bool,
    pub start_minute: u32,
    pub end_minute: u32,
    pub utc_offset_minutes: i32,
}

impl Dnd {
    pub fn from_wire(d: &DoNotDisturb) -> Result<Dnd, &'static str> {
        if d.start_minute >= 1440 || d.end_minute >= 1440 {
            return Err("dnd minutes must be 0..=1439");
        }
        if d.utc_offset_minutes.abs() > 14 * 60 {
            return Err("dnd utc_offset_minutes must be within -840..=840");
        }
        Ok(Dnd {
            enabled: d.enabled,
            start_minute: d.start_minute,
            end_minute: d.end_minute,
            utc_offset_minutes: d.utc_offset_minutes,
        })
    }

    pub fn to_wire(self) -> DoNotDisturb {
        DoNotDisturb {
            enabled: self.enabled,
            start_minute: self.start_minute,
            end_minute: self.end_minute,
            utc_offset_minutes: self.utc_offset_minutes,
        }
    }

    /// Whether notifications are held back at `now_ms`.
    pub fn quiet_at(&self, now_ms: u64) -> bool {
        if !self.enabled {
            return false;
        }
        if self.start_minute == self.end_minute {
            return true;
        }
        let local = (now_ms / 60_000) as i64 + i64::from(self.utc_offset_minutes);
        let minute = local.rem_euclid(1440) as u32;
        if self.start_minute < self.end_minute {
            (self.start_minute..self.end_minute).contains(&minute)
        } else {
            minute >= self.start_minute || minute < self.end_minute
        }
    }
}

/// A device's registration (JSON, versioned).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub v: u8,
    #[serde(default)]
    pub platform: i32,
    #[serde(default)]
    pub provider: String,
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub alias: String,
    #[serde(default)]
    pub dnd: Dnd,
    #[serde(default)]
    pub updated_ms: u64,
}

/// Reads `user`'s `device` registration (the default when never registered).
pub fn device_record(
    store: &dyn MessageStore,
    user: &str,
    device: &str,
) -> Result<DeviceRecord, StorageError> {
    Ok(store
        .meta(&dev_key(user, device))?
        .and_then(|v| serde_json::from_slice(&v).ok())
        .unwrap_or_default())
}

/// Every registered device of `user`, by device id.
pub fn devices_of(
    store: &dyn MessageStore,
    user: &str,
) -> Result<Vec<(String, DeviceRecord)>, StorageError> {
    let prefix = dev_prefix(user);
    let rows = store.scan_meta(&prefix, b"", tern_storage::MAX_META_SCAN)?;
    Ok(rows
        .into_iter()
        .filter_map(|(k, v)| {
            let device = std::str::from_utf8(&k[prefix.len()..]).ok()?.to_owned();
            Some((device, serde_json::from_slice(&v).ok()?))
        })
        .collect())
}

/// Tags of `user`'s `device` and of the user as a whole, sorted.
pub fn tags_of(
    store: &dyn MessageStore,
    user: &str,
    device: Option<&str>,
) -> Result<Vec<String>, StorageError> {
    let prefix = utag_prefix(user);
    let rows = store.scan_meta(&prefix, b"", tern_storage::MAX_META_SCAN)?;
    let mut tags: Vec<String> = rows
        .iter()
        .filter_map(|(k, _)| {
            let rest = &k[prefix.len()..];
            let at = rest.iter().position(|&b| b == 0)?;
            let (dev, tag) = (&rest[..at], &rest[at + 1..]);
            let wanted = dev.is_empty() || device.is_some_and(|d| d.as_bytes() == dev);
            wanted.then(|| String::from_utf8_lossy(tag).into_owned())
        })
        .collect();
    tags.sort();
    tags.dedup();
    Ok(tags)
}

/// A refused change of a registration.
#[derive(Debug)]
pub struct Refusal(pub ErrorCode, pub String);

impl From<StorageError> for Refusal {
    fn from(e: StorageError) -> Refusal {
        let (code, msg) = crate::core::storage_error_code(&e);
        Refusal(code, msg.into())
    }
}

fn bad(msg: impl Into<String>) -> Refusal {
    Refusal(ErrorCode::InvalidArgument, msg.into())
}

/// Checks an alias or a tag.
pub fn valid_label(label: &str) -> bool {
    valid_id(label)
}

/// The writes that apply `req` to `user`'s `device` registration (all in one atomic
/// `set_meta`), and the resulting record.
pub fn device_changes(
    store: &dyn MessageStore,
    user: &str,
    device: &str,
    platform: Option<i32>,
    req: &SetDevice,
) -> Result<(Vec<MetaChange>, DeviceRecord), Refusal> {
    let old = device_record(store, user, device)?;
    let mut rec = old.clone();
    rec.v = 1;
    if let Some(p) = platform {
        rec.platform = p;
    }
    let mut changes = Vec::new();
    let me = Bytes::from(key(&[b"", user.as_bytes(), device.as_bytes()])[..].to_vec());
    if let Some(provider) = &req.push_provider {
        let token = req.push_token.clone().unwrap_or_default();
        if provider.is_empty() {
            rec.provider.clear();
            rec.token.clear();
        } else {
            if !PROVIDERS.contains(&provider.as_str()) {
                return Err(bad("push_provider must be apns, fcm, webhook or empty"));
            }
            if token.is_empty()
                || token.len() > MAX_TOKEN_LEN
                || token.chars().any(char::is_control)
            {
                return Err(bad(format!(
                    "push_token must be 1..={MAX_TOKEN_LEN} bytes without control characters"
                )));
            }
            // The token's previous device (an app reinstalled, another account on the same
            // phone) stops getting notifications.
            if let Some(owner) = store.meta(&token_key(provider, &token))?
                && owner != me
            {
                let parts: Vec<&str> = split_rest(&owner, b"");
                if let [u, d] = parts[..] {
                    let mut prev = device_record(store, u, d)?;
                    if prev.provider == *provider && prev.token == token {
                        prev.provider.clear();
                        prev.token.clear();
                        changes.push(MetaChange {
                            key: dev_key(u, d).into(),
                            value: Some(serde_json::to_vec(&prev).unwrap_or_default().into()),
                        });
                    }
                }
            }
            rec.provider = provider.clone();
            rec.token = token;
        }
    } else if req.push_token.is_some() {
        return Err(bad("push_token needs push_provider"));
    }
    if !old.token.is_empty() && (old.provider != rec.provider || old.token != rec.token) {
        changes.push(MetaChange {
            key: token_key(&old.provider, &old.token).into(),
            value: None,
        });
    }
    if !rec.token.is_empty() {
        changes.push(MetaChange {
            key: token_key(&rec.provider, &rec.token).into(),
            value: Some(me.clone()),
        });
    }
    if let Some(alias) = &req.alias {
        if !alias.is_empty() && !valid_label(alias) {
            return Err(bad(
                "alias must be 1..=64 bytes without control characters (\"\" removes it)",
            ));
        }
        if *alias != old.alias {
            if !old.alias.is_empty() {
                changes.push(MetaChange {
                    key: alias_key(&old.alias, user, device).into(),
                    value: None,
                });
            }
            if !alias.is_empty() {
                let bound = store.scan_meta(&alias_prefix(alias), b"", MAX_ALIAS_DEVICES + 1)?;
                if bound.len() >= MAX_ALIAS_DEVICES {
                    return Err(Refusal(
                        ErrorCode::LimitExceeded,
                        format!("alias {alias:?} already names {MAX_ALIAS_DEVICES} devices"),
                    ));
                }
                changes.push(MetaChange {
                    key: alias_key(alias, user, device).into(),
                    value: Some(Bytes::new()),
                });
            }
            rec.alias = alias.clone();
        }
    }
    if let Some(d) = &req.dnd {
        rec.dnd = Dnd::from_wire(d).map_err(bad)?;
    }
    if rec != old || old.v == 0 {
        rec.updated_ms = now_ms();
        changes.push(MetaChange {
            key: dev_key(user, device).into(),
            value: Some(serde_json::to_vec(&rec).unwrap_or_default().into()),
        });
    }
    Ok((changes, rec))
}

/// The devices one alias names, as (user, device).
pub fn alias_devices(
    store: &dyn MessageStore,
    alias: &str,
) -> Result<Vec<(String, String)>, StorageError> {
    let prefix = alias_prefix(alias);
    Ok(store
        .scan_meta(&prefix, b"", MAX_ALIAS_DEVICES + 1)?
        .iter()
        .filter_map(|(k, _)| match split_rest(k, &prefix)[..] {
            [u, d] => Some((u.to_owned(), d.to_owned())),
            _ => None,
        })
        .collect())
}

/// Who a push is for, on one core.
#[derive(Debug, Clone)]
pub enum PushTargets {
    All,
    /// User name → devices (empty: all of the user's devices).
    Users(Vec<(String, Vec<String>)>),
}

/// What a connection remembers of the pushes it got.
#[derive(Debug, Default)]
pub struct PushState {
    /// The device's cursor: every push up to it is acknowledged.
    pub cursor: u64,
    /// The highest push id delivered on this connection.
    pub delivered_max: u64,
    /// Delivered and not yet acknowledged, oldest first (bounded).
    pub unacked: VecDeque<u64>,
}

impl PushState {
    fn delivered(&mut self, id: u64) {
        self.delivered_max = self.delivered_max.max(id);
        if self.unacked.len() == UNACKED_KEEP {
            self.unacked.pop_front();
        }
        self.unacked.push_back(id);
    }

    fn has(&self, id: u64) -> bool {
        id <= self.cursor || self.unacked.contains(&id)
    }
}

/// Per-core counters of one push.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PushCount {
    /// Devices it was delivered to (a device that did not acknowledge and logs in again counts
    /// again).
    pub reached: u64,
    /// Devices that acknowledged it.
    pub acked: u64,
}

impl Core {
    fn count_push(&self, id: u64, reached: u64, acked: u64) {
        let mut counts = self.push_counts.borrow_mut();
        let c = counts.entry(id).or_default();
        c.reached += reached;
        c.acked += acked;
        if counts.len() > COUNTED_PUSHES {
            counts.pop_first();
        }
    }

    /// This core's counters of `ids`.
    pub fn push_counts_of(&self, ids: &[u64]) -> Vec<PushCount> {
        let counts = self.push_counts.borrow();
        ids.iter()
            .map(|id| counts.get(id).copied().unwrap_or_default())
            .collect()
    }

    /// Sends a push to this core's online devices it is for; how many devices (logical
    /// sessions) got it.
    pub fn deliver_push(&self, notice: &PushNotice, targets: &PushTargets) -> usize {
        let frame = self.encode(&Frame::new(0, notice.clone()));
        let id = notice.push_id;
        let users = self.users.borrow();
        let mut reached = 0;
        let mut send = |list: &[Rc<SessionHandle>], devices: &[String]| {
            let mut logicals: Vec<u64> = Vec::new();
            for s in list {
                if !devices.is_empty() && !devices.contains(&s.device) {
                    continue;
                }
                let mut st = s.push.borrow_mut();
                if st.has(id) {
                    continue;
                }
                st.delivered(id);
                s.out.push(frame.clone());
                if !logicals.contains(&s.logical) {
                    logicals.push(s.logical);
                }
            }
            reached += logicals.len();
        };
        match targets {
            PushTargets::All => {
                for list in users.values() {
                    send(list, &[]);
                }
            }
            PushTargets::Users(list) => {
                for (name, devices) in list {
                    let Ok(Some(uid)) = self.store.lookup_user(name) else {
                        continue;
                    };
                    if let Some(sessions) = users.get(&uid) {
                        send(sessions, devices);
                    }
                }
            }
        }
        drop(users);
        self.count_push(id, reached as u64, 0);
        reached
    }

    /// At the login of a new logical session: the stored pushes the device has not
    /// acknowledged and that have not expired, queued on `session` oldest first.
    pub fn send_pending_pushes(&self, session: &SessionHandle, user: &str) {
        if let Err(e) = self.pending_pushes(session, user) {
            tracing::warn!(error = %e, "cannot read pending pushes");
        }
    }

    fn pending_pushes(&self, session: &SessionHandle, user: &str) -> Result<(), StorageError> {
        let store = &*self.store;
        let cursor = store
            .meta(&cursor_key(user, &session.device))?
            .map_or(0, |v| be_u64(&v));
        session.push.borrow_mut().cursor = cursor;
        let now = now_ms();
        let mut ids = BTreeSet::new();
        for (k, v) in store.scan_meta(ALL_PREFIX, &all_key(cursor), MAX_PENDING_AT_LOGIN)? {
            if be_u64(&v) > now {
                ids.insert(id_of_key(&k));
            }
        }
        for (k, v) in store.scan_meta(
            &user_prefix(user),
            &user_key(user, cursor),
            MAX_PENDING_AT_LOGIN,
        )? {
            let Ok(entry) = serde_json::from_slice::<UserEntry>(&v) else {
                continue;
            };
            if entry.e > now && (entry.d.is_empty() || entry.d.contains(&session.device)) {
                ids.insert(id_of_key(&k));
            }
        }
        for id in ids.into_iter().take(MAX_PENDING_AT_LOGIN) {
            let Some(rec) = store.meta(&rec_key(id))? else {
                continue;
            };
            let Ok(rec) = serde_json::from_slice::<PushRecord>(&rec) else {
                continue;
            };
            session.push.borrow_mut().delivered(id);
            session.out.push(self.encode(&Frame::new(0, rec.notice())));
            self.count_push(id, 1, 0);
        }
        Ok(())
    }
}

impl Ctx {
    /// PushAck: moves the device's cursor (stored) and counts the acknowledgements.
    pub(crate) async fn push_ack(&mut self, rid: u64, ack: PushAck) {
        let id = ack.push_id;
        // Any path of the logical session may carry the ack of a push another path delivered.
        let (delivered_max, cursor) = {
            let users = self.core.users.borrow();
            let paths = users.get(&self.user).into_iter().flatten();
            paths
                .filter(|s| s.logical == self.session.logical)
                .fold((0, 0), |(d, c), s| {
                    let st = s.push.borrow();
                    (d.max(st.delivered_max), c.max(st.cursor))
                })
        };
        if id == 0 || id > delivered_max {
            self.error(
                rid,
                ErrorCode::InvalidArgument,
                "push_id was not delivered to this device",
            );
            return;
        }
        if id <= cursor {
            return;
        }
        let core = self.core.clone();
        let mut acked: Vec<u64> = Vec::new();
        if let Some(list) = core.users.borrow().get(&self.user) {
            for s in list.iter().filter(|s| s.logical == self.session.logical) {
                let mut st = s.push.borrow_mut();
                st.cursor = st.cursor.max(id);
                st.unacked.retain(|&u| {
                    if u <= id {
                        acked.push(u);
                        false
                    } else {
                        true
                    }
                });
            }
        }
        acked.sort_unstable();
        acked.dedup();
        for u in acked {
            core.count_push(u, 0, 1);
        }
        // Stored before the connection's next request is read, so a login of the device that
        // follows finds it (push acks are rare: one per push, not per message).
        let stored = core
            .store
            .set_meta(vec![MetaChange {
                key: cursor_key(&self.user_name, &self.session.device).into(),
                value: Some(Bytes::copy_from_slice(&id.to_be_bytes())),
            }])
            .await;
        if let Err(e) = stored {
            self.storage_error(rid, &e);
        }
    }

    /// SetDevice: changes this device's registration and answers DeviceSettings.
    pub(crate) async fn set_device(&mut self, rid: u64, req: SetDevice) {
        if self.api {
            self.error(
                rid,
                ErrorCode::UnexpectedMessage,
                "SetDevice is for a device's own connection",
            );
            return;
        }
        let store = self.core.store.clone();
        let (user, device) = (self.user_name.clone(), self.session.device.clone());
        let result = device_changes(&*store, &user, &device, Some(self.platform), &req);
        let (changes, rec) = match result {
            Ok(r) => r,
            Err(Refusal(code, msg)) => {
                self.error(rid, code, msg);
                return;
            }
        };
        if !changes.is_empty()
            && let Err(e) = store.set_meta(changes).await
        {
            self.storage_error(rid, &e);
            return;
        }
        let tags = tags_of(&*store, &user, Some(&device)).unwrap_or_default();
        self.reply(&Frame::new(rid, settings_of(&device, &rec, tags)));
    }
}

/// The wire view of a registration.
pub fn settings_of(device: &str, rec: &DeviceRecord, tags: Vec<String>) -> DeviceSettings {
    DeviceSettings {
        device_id: device.to_owned(),
        push_provider: rec.provider.clone(),
        has_push_token: !rec.token.is_empty(),
        alias: rec.alias.clone(),
        dnd: Some(rec.dnd.to_wire()),
        tags,
        platform: rec.platform,
    }
}

/// A resolved audience: user → devices (None: every device of the user).
pub type Audience = BTreeMap<String, Option<BTreeSet<String>>>;

/// Adds `device` of `user` (None: the whole user) to an audience.
pub fn add_to_audience(a: &mut Audience, user: &str, device: Option<&str>) {
    match (a.get_mut(user), device) {
        (Some(None), _) => {}
        (Some(slot), None) => *slot = None,
        (Some(Some(set)), Some(d)) => {
            set.insert(d.to_owned());
        }
        (None, d) => {
            a.insert(user.to_owned(), d.map(|d| BTreeSet::from([d.to_owned()])));
        }
    }
}

/// The writes that store a push: its record, and unless it is for online devices only
/// (`expires_ms` 0) one index entry for everyone (`all`), or one per user of `audience`.
pub fn push_writes(record: &PushRecord, audience: &Audience, all: bool) -> Vec<MetaChange> {
    let mut changes = vec![MetaChange {
        key: rec_key(record.id).into(),
        value: json(record),
    }];
    if record.expires_ms == 0 {
        return changes;
    }
    if all {
        changes.push(MetaChange {
            key: all_key(record.id).into(),
            value: Some(Bytes::copy_from_slice(&record.expires_ms.to_be_bytes())),
        });
    } else {
        for (user, devices) in audience {
            let entry = UserEntry {
                e: record.expires_ms,
                d: devices.iter().flatten().cloned().collect(),
            };
            changes.push(MetaChange {
                key: user_key(user, record.id).into(),
                value: json(&entry),
            });
        }
    }
    changes
}

fn json<T: Serialize>(v: &T) -> Option<Bytes> {
    Some(Bytes::from(serde_json::to_vec(v).unwrap_or_default()))
}

/// Deletes expired pushes: records (kept `RECORD_GRACE_MS` past their expiry, for the API's
/// counters) and index entries. One pass; returns how many keys it deleted.
pub async fn sweep_expired(store: &dyn MessageStore, now: u64) -> Result<usize, StorageError> {
    const RECORD_GRACE_MS: u64 = 3_600_000;
    let mut deleted = 0;
    for prefix in [ALL_PREFIX, USER_PREFIX, REC_PREFIX] {
        let mut after: Vec<u8> = Vec::new();
        loop {
            let page = store.scan_meta(prefix, &after, tern_storage::MAX_META_SCAN)?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = last.to_vec();
            let full = page.len() == tern_storage::MAX_META_SCAN;
            let expired: Vec<MetaChange> = page
                .into_iter()
                .filter(|(_, v)| {
                    if prefix == ALL_PREFIX {
                        be_u64(v) <= now
                    } else if prefix == USER_PREFIX {
                        serde_json::from_slice::<UserEntry>(v).is_ok_and(|e| e.e <= now)
                    } else {
                        serde_json::from_slice::<PushRecord>(v)
                            .is_ok_and(|r| r.expires_ms.max(r.created_ms) + RECORD_GRACE_MS <= now)
                    }
                })
                .map(|(k, _)| MetaChange {
                    key: k,
                    value: None,
                })
                .collect();
            for chunk in expired.chunks(tern_storage::MAX_META_CHANGES) {
                deleted += chunk.len();
                store.set_meta(chunk.to_vec()).await?;
            }
            if !full {
                break;
            }
        }
    }
    Ok(deleted)
}

/// A message for the offline-notification path. For a 1:1 message (`group` None), `user`
/// had no online device when it arrived at their core, and the recipient's conversation is not
/// muted. For a group message, `members` are the group's members except the sender; the side
/// thread asks their cores which are offline and checks each one's mute.
#[derive(Debug, Clone)]
pub struct OfflineJob {
    pub user: String,
    pub conversation_id: u64,
    pub seq: u64,
    pub sender: String,
    /// What the notification says: the text (first [`PREVIEW_CHARS`] characters) or the kind
    /// of message ("[image]").
    pub preview: String,
    /// For a group message: the group's id and its members other than the sender.
    pub group: Option<(String, Vec<tern_storage::UserId>)>,
}

/// Characters of a text message shown in its notification.
pub const PREVIEW_CHARS: usize = 100;
/// How long a provider may hold a notification for a device that is off (1 day).
pub const NOTIFICATION_TTL_MS: u64 = 86_400_000;

/// The notification text of a message.
pub fn preview(content_type: u32, payload: &[u8]) -> String {
    use tern_protocol::ContentType as C;
    match C::try_from(content_type as i32) {
        Ok(C::Text) => {
            let text = String::from_utf8_lossy(payload);
            let mut p: String = text.chars().take(PREVIEW_CHARS).collect();
            if text.chars().nth(PREVIEW_CHARS).is_some() {
                p.push('…');
            }
            p
        }
        Ok(C::Image) => "[image]".into(),
        Ok(C::Audio) => "[voice message]".into(),
        Ok(C::Video) => "[video]".into(),
        Ok(C::File) => "[file]".into(),
        Ok(C::Location) => "[location]".into(),
        _ => "[new message]".into(),
    }
}

impl Core {
    /// Called for a committed 1:1 message whose recipient has no session on this core (their
    /// core): queues an [`OfflineJob`] unless the recipient muted the conversation. Never
    /// blocks: a full queue drops the job (counted).
    pub fn notify_offline(&self, user: tern_storage::UserId, message: &tern_protocol::Deliver) {
        let Some(queue) = &self.offline else {
            return;
        };
        if message.recalled || message.content_type == tern_protocol::ContentType::System as u32 {
            return;
        }
        match self
            .store
            .conversation_settings(user, message.conversation_id)
        {
            Ok(s) if s.muted => return,
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot read conversation settings"),
        }
        let Ok(Some(name)) = self.store.user_name(user) else {
            return;
        };
        let job = OfflineJob {
            user: name,
            conversation_id: message.conversation_id,
            seq: message.seq,
            sender: message.sender.clone(),
            preview: preview(message.content_type, &message.payload),
            group: None,
        };
        if queue.try_send(job).is_err() {
            self.m()
                .offline_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl Core {
    /// On a group's owner core, for a committed group message: queues an [`OfflineJob`] naming
    /// the members (not the sender) when the group is small enough for notifications.
    pub fn notify_offline_group(
        &self,
        group: &str,
        members: Vec<tern_storage::UserId>,
        message: &tern_protocol::Deliver,
    ) {
        let Some(queue) = &self.offline else {
            return;
        };
        if message.content_type == tern_protocol::ContentType::System as u32 || members.is_empty() {
            return;
        }
        let job = OfflineJob {
            user: String::new(),
            conversation_id: message.conversation_id,
            seq: message.seq,
            sender: message.sender.clone(),
            preview: preview(message.content_type, &message.payload),
            group: Some((group.to_owned(), members)),
        };
        if queue.try_send(job).is_err() {
            self.m()
                .offline_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The offline members of a group message whose conversation is not muted, by name.
async fn offline_members(
    store: &dyn MessageStore,
    bridge: &crate::admin::Bridge,
    conversation: u64,
    members: &[tern_storage::UserId],
) -> Vec<String> {
    let mut by_core: BTreeMap<usize, Vec<(tern_storage::UserId, String)>> = BTreeMap::new();
    for &id in members {
        if let Ok(Some(name)) = store.user_name(id) {
            by_core
                .entry(bridge.core_of(&name))
                .or_default()
                .push((id, name));
        }
    }
    let mut offline = Vec::new();
    for (core, users) in by_core {
        let ids: Vec<tern_storage::UserId> = users.iter().map(|(id, _)| *id).collect();
        let Ok(online) = bridge.online(core, ids).await else {
            return Vec::new();
        };
        for ((id, name), on) in users.into_iter().zip(online) {
            let muted = store
                .conversation_settings(id, conversation)
                .is_ok_and(|s| s.muted);
            if !on && !muted {
                offline.push(name);
            }
        }
    }
    offline
}

/// The side thread's task that turns offline jobs into provider notifications.
pub async fn run_offline(
    store: std::sync::Arc<dyn MessageStore>,
    notifier: crate::notify::Notifier,
    bridge: crate::admin::Bridge,
    jobs: async_channel::Receiver<OfflineJob>,
) {
    while let Ok(mut job) = jobs.recv().await {
        match job.group.take() {
            None => notify_user(&*store, &notifier, &job, None),
            Some((group, members)) => {
                for user in offline_members(&*store, &bridge, job.conversation_id, &members).await {
                    job.user = user;
                    notify_user(&*store, &notifier, &job, Some(&group));
                }
            }
        }
    }
}

/// Queues a notification for each of `job.user`'s devices that takes them.
fn notify_user(
    store: &dyn MessageStore,
    notifier: &crate::notify::Notifier,
    job: &OfflineJob,
    group: Option<&str>,
) {
    {
        let devices = match devices_of(store, &job.user) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read device registrations");
                return;
            }
        };
        let (title, body) = match group {
            None => (job.sender.clone(), job.preview.clone()),
            Some(g) => (g.to_owned(), format!("{}: {}", job.sender, job.preview)),
        };
        let mut data = BTreeMap::new();
        if let Some(g) = group {
            data.insert("group_id".to_owned(), g.to_owned());
        }
        let now = now_ms();
        for (device, rec) in devices {
            let Ok(provider) = rec.provider.parse::<crate::notify::Provider>() else {
                continue;
            };
            if rec.token.is_empty() || !notifier.provides(provider) || rec.dnd.quiet_at(now) {
                continue;
            }
            notifier.enqueue(crate::notify::Notification {
                user: job.user.clone(),
                device,
                provider,
                token: rec.token,
                title: title.clone(),
                body: body.clone(),
                conversation_id: job.conversation_id,
                seq: job.seq,
                sender: job.sender.clone(),
                collapse_id: None,
                expires_at_ms: Some(now + NOTIFICATION_TTL_MS),
                data: data.clone(),
            });
        }
    }
}

/// What to do when a provider says a token is dead: forget it (if the device still has it).
pub fn forget_token(store: &dyn MessageStore, n: &crate::notify::Notification) {
    let Ok(mut rec) = device_record(store, &n.user, &n.device) else {
        return;
    };
    if rec.token != n.token || rec.provider != n.provider.as_str() {
        return;
    }
    let old = token_key(&rec.provider, &rec.token);
    rec.provider.clear();
    rec.token.clear();
    rec.updated_ms = now_ms();
    drop(store.set_meta(vec![
        MetaChange {
            key: old.into(),
            value: None,
        },
        MetaChange {
            key: dev_key(&n.user, &n.device).into(),
            value: Some(serde_json::to_vec(&rec).unwrap_or_default().into()),
        },
    ]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnd_windows() {
        let at = |h: u64, m: u64| (h * 60 + m) * 60_000 + 40 * 86_400_000;
        let night = Dnd {
            enabled: true,
            start_minute: 22 * 60,
            end_minute: 7 * 60,
            utc_offset_minutes: 0,
        };
        assert!(night.quiet_at(at(23, 0)));
        assert!(night.quiet_at(at(0, 0)));
        assert!(night.quiet_at(at(6, 59)));
        assert!(!night.quiet_at(at(7, 0)));
        assert!(!night.quiet_at(at(12, 0)));
        assert!(
            !Dnd {
                enabled: false,
                ..night
            }
            .quiet_at(at(23, 0))
        );
        // UTC+2: 21:00 UTC is 23:00 local.
        let plus2 = Dnd {
            utc_offset_minutes: 120,
            ..night
        };
        assert!(plus2.quiet_at(at(21, 0)));
        assert!(!plus2.quiet_at(at(5, 30)));
        let lunch = Dnd {
            enabled: true,
            start_minute: 12 * 60,
            end_minute: 13 * 60,
            utc_offset_minutes: 0,
        };
        assert!(lunch.quiet_at(at(12, 30)));
        assert!(!lunch.quiet_at(at(13, 0)));
        let all_day = Dnd {
            start_minute: 5,
            end_minute: 5,
            ..lunch
        };
        assert!(all_day.quiet_at(at(3, 0)));
        assert!(
            Dnd::from_wire(&DoNotDisturb {
                enabled: true,
                start_minute: 1440,
                end_minute: 0,
                utc_offset_minutes: 0
            })
            .is_err()
        );
    }

    #[test]
    fn previews_cut_text_and_name_other_kinds() {
        assert_eq!(preview(1, b"hello"), "hello");
        let long = "é".repeat(150);
        let p = preview(1, long.as_bytes());
        assert_eq!(p.chars().count(), PREVIEW_CHARS + 1);
        assert!(p.ends_with('…'));
        assert_eq!(preview(2, b"\x89PNG"), "[image]");
        assert_eq!(preview(100, b"{}"), "[new message]");
    }

    fn record(id: u64, expires_ms: u64) -> PushRecord {
        PushRecord {
            v: 1,
            id,
            created_ms: 1,
            expires_ms,
            title: "t".into(),
            content_type: 1,
            custom_type: String::new(),
            payload: BASE64.encode("hi"),
            audience: serde_json::Value::Null,
        }
    }

    #[test]
    fn a_push_to_everyone_is_stored_once_and_others_once_per_user() {
        let mut many = Audience::new();
        for i in 0..5000 {
            add_to_audience(&mut many, &format!("u{i}"), None);
        }
        // Everyone: the record and one index entry, whatever the number of users.
        let all = push_writes(&record(7, 100), &Audience::new(), true);
        assert_eq!(all.len(), 2);
        assert_eq!(&all[0].key[..], &rec_key(7)[..]);
        assert_eq!(&all[1].key[..], &all_key(7)[..]);
        assert_eq!(all[1].value.as_deref(), Some(&100u64.to_be_bytes()[..]));
        // Users: one small entry each, naming the devices when only some are meant.
        let mut some = Audience::new();
        add_to_audience(&mut some, "alice", Some("phone"));
        add_to_audience(&mut some, "bob", None);
        let w = push_writes(&record(8, 100), &some, false);
        assert_eq!(w.len(), 3);
        let alice: UserEntry = serde_json::from_slice(w[1].value.as_ref().unwrap()).unwrap();
        assert_eq!((alice.e, alice.d), (100, vec!["phone".to_owned()]));
        assert_eq!(&w[2].key[..], &user_key("bob", 8)[..]);
        assert_eq!(push_writes(&record(9, 100), &many, false).len(), 5001);
        // Online only: the record alone.
        assert_eq!(push_writes(&record(10, 0), &many, false).len(), 1);
    }

    #[test]
    fn expired_pushes_are_swept() {
        let store = tern_storage::MemStore::new(tern_storage::DedupWindow::default());
        let mut some = Audience::new();
        add_to_audience(&mut some, "alice", None);
        for (id, expires, all) in [(1, 1_000, true), (2, 1_000, false), (3, 9_000_000, true)] {
            store
                .set_meta(push_writes(&record(id, expires), &some, all))
                .wait()
                .unwrap();
        }
        let deleted = futures_lite::future::block_on(sweep_expired(&store, 2_000)).unwrap();
        // The expired index entries go at once; the records an hour past their expiry.
        assert_eq!(deleted, 2);
        assert!(store.meta(&all_key(1)).unwrap().is_none());
        assert!(store.meta(&user_key("alice", 2)).unwrap().is_none());
        assert!(store.meta(&rec_key(1)).unwrap().is_some());
        assert!(store.meta(&all_key(3)).unwrap().is_some());
        let deleted =
            futures_lite::future::block_on(sweep_expired(&store, 1_000 + 3_600_000)).unwrap();
        assert_eq!(deleted, 2);
        assert!(store.meta(&rec_key(1)).unwrap().is_none());
        assert!(store.meta(&rec_key(3)).unwrap().is_some());
    }

    #[test]
    fn keys_split_back() {
        let k = alias_key("a1", "alice", "phone");
        assert_eq!(split_rest(&k, &alias_prefix("a1")), vec!["alice", "phone"]);
        let k = user_key("bob", 42);
        assert!(k.starts_with(&user_prefix("bob")));
        assert_eq!(id_of_key(&k), 42);
        assert!(user_key("bob", 41) < user_key("bob", 42));
        assert!(!user_key("bo", 1).starts_with(&user_prefix("b")));
        assert_eq!(id_of_key(&all_key(7)), 7);
    }

    #[test]
    fn audience_merges_devices_and_whole_users() {
        let mut a = Audience::new();
        add_to_audience(&mut a, "alice", Some("phone"));
        add_to_audience(&mut a, "alice", Some("pad"));
        add_to_audience(&mut a, "bob", Some("phone"));
        add_to_audience(&mut a, "bob", None);
        add_to_audience(&mut a, "bob", Some("pad"));
        assert_eq!(
            a["alice"],
            Some(BTreeSet::from(["pad".to_owned(), "phone".to_owned()]))
        );
        assert_eq!(a["bob"], None);
    }

    #[test]
    fn device_changes_move_tokens_and_aliases() {
        let store = tern_storage::MemStore::new(tern_storage::DedupWindow::default());
        let set = |user: &str, device: &str, req: SetDevice| {
            let (changes, rec) = device_changes(&store, user, device, Some(1), &req).unwrap();
            store.set_meta(changes).wait().unwrap();
            rec
        };
        let rec = set(
            "alice",
            "phone",
            SetDevice {
                push_provider: Some("apns".into()),
                push_token: Some("t1".into()),
                alias: Some("a1".into()),
                dnd: None,
            },
        );
        assert_eq!((rec.provider.as_str(), rec.token.as_str()), ("apns", "t1"));
        assert_eq!(
            alias_devices(&store, "a1").unwrap(),
            vec![("alice".to_owned(), "phone".to_owned())]
        );
        // The same token on bob's device: alice's phone loses it.
        set(
            "bob",
            "phone",
            SetDevice {
                push_provider: Some("apns".into()),
                push_token: Some("t1".into()),
                ..Default::default()
            },
        );
        assert_eq!(device_record(&store, "alice", "phone").unwrap().token, "");
        assert_eq!(device_record(&store, "bob", "phone").unwrap().token, "t1");
        // Moving alice's alias.
        set(
            "alice",
            "phone",
            SetDevice {
                alias: Some("a2".into()),
                ..Default::default()
            },
        );
        assert!(alias_devices(&store, "a1").unwrap().is_empty());
        assert_eq!(alias_devices(&store, "a2").unwrap().len(), 1);
        let err = device_changes(
            &store,
            "alice",
            "phone",
            None,
            &SetDevice {
                push_provider: Some("carrier-pigeon".into()),
                push_token: Some("x".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(err.0, ErrorCode::InvalidArgument);
        // An alias full with ten devices refuses an eleventh.
        for i in 0..MAX_ALIAS_DEVICES {
            set(
                "carol",
                &format!("d{i}"),
                SetDevice {
                    alias: Some("crowd".into()),
                    ..Default::default()
                },
            );
        }
        let err = device_changes(
            &store,
            "dave",
            "phone",
            None,
            &SetDevice {
                alias: Some("crowd".into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(err.0, ErrorCode::LimitExceeded);
    }
}
