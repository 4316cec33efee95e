//! The admin API's push endpoints: pushes, aliases, tags and device registrations
//! (docs/API.md). How pushes are stored and delivered is in [`crate::push`].

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE_NO_PAD as B64URL};
use serde::Deserialize;
use serde_json::{Value, json};
use tern_protocol::ErrorCode;
use tern_protocol::v1::SetDevice;
use tern_storage::{MessageStore, MetaChange, StorageError};

use crate::api::{ApiError, ApiResult, ApiState, check_user, parse};
use crate::core::now_ms;
use crate::push::{self, Audience, PushRecord, PushTargets, Refusal};

/// Most user ids, and most aliases, one push names.
pub const MAX_PUSH_USERS: usize = 1000;
/// Most tags one push names.
pub const MAX_PUSH_TAGS: usize = 20;
/// Longest push title.
pub const MAX_TITLE_BYTES: usize = 256;
/// Most tag changes in one request.
pub const MAX_TAG_CHANGES: usize = 1000;

/// Hands out push ids: blocks of [`PushIds::BLOCK`] are reserved in the store before use, so ids
/// keep increasing across restarts (a restart skips the rest of a block).
#[derive(Debug, Default)]
pub struct PushIds(tokio::sync::Mutex<(u64, u64)>, tokio::sync::Mutex<()>);

impl PushIds {
    const BLOCK: u64 = 1000;

    /// Held from a push's id to the end of its live delivery, so pushes reach every device in
    /// id order (a device's PushAck acknowledges everything up to its id).
    pub async fn in_order(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.1.lock().await
    }

    pub async fn next(&self, store: &dyn MessageStore) -> Result<u64, StorageError> {
        let mut g = self.0.lock().await;
        if g.0 == 0 || g.0 >= g.1 {
            let start = if g.0 == 0 {
                store
                    .meta(push::NEXT_KEY)?
                    .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
                    .map_or(1, u64::from_be_bytes)
                    .max(1)
            } else {
                g.1
            };
            let end = start + Self::BLOCK;
            store
                .set_meta(vec![MetaChange {
                    key: Bytes::from_static(push::NEXT_KEY),
                    value: Some(Bytes::copy_from_slice(&end.to_be_bytes())),
                }])
                .await?;
            *g = (start, end);
        }
        let id = g.0;
        g.0 += 1;
        Ok(id)
    }
}

/// The push routes (authenticated by the API's guard like every other route).
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/push", post(make_push))
        .route("/v1/push/{id}", get(push_info))
        .route("/v1/aliases", post(bind_alias))
        .route("/v1/aliases/{alias}", get(get_alias).delete(delete_alias))
        .route("/v1/tags/{tag}", get(tag_members).post(change_tag))
        .route("/v1/users/{user}/devices", get(user_devices))
        .route("/v1/users/{user}/devices/{device}", post(register_device))
}

impl From<Refusal> for ApiError {
    fn from(Refusal(code, msg): Refusal) -> ApiError {
        ApiError::new(code, msg)
    }
}

fn check_label(what: &str, label: &str) -> Result<(), ApiError> {
    if push::valid_label(label) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("{what} must be 1..=64 bytes without control characters"),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushRequest {
    /// Every user (stored once, whatever their number).
    #[serde(default)]
    all: bool,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    title: String,
    text: Option<String>,
    payload_base64: Option<String>,
    /// A ContentType name; TEXT when absent.
    content_type: Option<String>,
    #[serde(default)]
    custom_type: String,
    /// Seconds an offline device may still get it at login (0: online devices only).
    ttl_secs: Option<u64>,
}

/// Resolves the users, aliases and tags of a push to users and their devices.
fn resolve(store: &dyn MessageStore, req: &PushRequest) -> Result<Audience, ApiError> {
    let mut a = Audience::new();
    for u in &req.users {
        push::add_to_audience(&mut a, u, None);
    }
    for alias in &req.aliases {
        for (u, d) in push::alias_devices(store, alias)? {
            push::add_to_audience(&mut a, &u, Some(&d));
        }
    }
    for tag in &req.tags {
        let prefix = push::tag_prefix(tag);
        let mut after: Vec<u8> = Vec::new();
        loop {
            let page = store.scan_meta(&prefix, &after, tern_storage::MAX_META_SCAN)?;
            for (k, _) in &page {
                if let [u, d] = push::split_rest(k, &prefix)[..] {
                    push::add_to_audience(&mut a, u, (!d.is_empty()).then_some(d));
                }
            }
            match page.last() {
                Some((k, _)) if page.len() == tern_storage::MAX_META_SCAN => after = k.to_vec(),
                _ => break,
            }
        }
    }
    Ok(a)
}

/// Makes a push: stores it (unless its ttl is 0), delivers it to the online devices it
/// addresses, and answers its id.
async fn make_push(State(st): State<Arc<ApiState>>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let req: PushRequest = parse(&headers, &body)?;
    let listed = !req.users.is_empty() || !req.aliases.is_empty() || !req.tags.is_empty();
    if req.all == listed {
        return Err(ApiError::bad(
            "give either \"all\": true or at least one of users, aliases and tags",
        ));
    }
    if req.users.len() > MAX_PUSH_USERS || req.aliases.len() > MAX_PUSH_USERS {
        return Err(ApiError::new(
            ErrorCode::LimitExceeded,
            format!("at most {MAX_PUSH_USERS} users and {MAX_PUSH_USERS} aliases per push"),
        ));
    }
    if req.tags.len() > MAX_PUSH_TAGS {
        return Err(ApiError::new(
            ErrorCode::LimitExceeded,
            format!("at most {MAX_PUSH_TAGS} tags per push"),
        ));
    }
    for u in &req.users {
        check_user(u)?;
    }
    for a in &req.aliases {
        check_label("alias", a)?;
    }
    for t in &req.tags {
        check_label("tag", t)?;
    }
    if req.title.len() > MAX_TITLE_BYTES {
        return Err(ApiError::bad(format!(
            "title must be at most {MAX_TITLE_BYTES} bytes"
        )));
    }
    let payload = crate::api::payload_of(req.text.clone(), req.payload_base64.clone())?;
    if payload.len() > st.cfg.max_payload_bytes as usize {
        return Err(ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "the payload is {} bytes; at most {} (max_payload_bytes)",
                payload.len(),
                st.cfg.max_payload_bytes
            ),
        ));
    }
    let content_type = crate::api::content_type_of(req.content_type.as_deref())?;
    let ttl = req.ttl_secs.unwrap_or(push::DEFAULT_TTL_SECS);
    if ttl > push::MAX_TTL_SECS {
        return Err(ApiError::bad(format!(
            "ttl_secs must be 0..={} (10 days)",
            push::MAX_TTL_SECS
        )));
    }
    let audience = if req.all {
        Audience::new()
    } else {
        let a = resolve(&*st.store, &req)?;
        if a.is_empty() {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                "no user or device matches the audience",
            ));
        }
        a
    };

    let _in_order = st.push_ids.in_order().await;
    let id = st.push_ids.next(&*st.store).await?;
    let now = now_ms();
    let expires = if ttl == 0 { 0 } else { now + ttl * 1000 };
    let record = PushRecord {
        v: 1,
        id,
        created_ms: now,
        expires_ms: expires,
        title: req.title.clone(),
        content_type: content_type as u32,
        custom_type: req.custom_type.clone(),
        payload: BASE64.encode(&payload),
        audience: if req.all {
            json!("all")
        } else {
            json!({"users": req.users, "aliases": req.aliases, "tags": req.tags})
        },
    };
    let changes = push::push_writes(&record, &audience, req.all);
    // Durable before any device gets it: a device logging in meanwhile finds it in the index.
    for chunk in changes.chunks(tern_storage::MAX_META_CHANGES) {
        st.store.set_meta(chunk.to_vec()).await?;
    }

    let notice = Arc::new(record.notice());
    let mut online = 0;
    if req.all {
        let all = Arc::new(PushTargets::All);
        for core in 0..st.bridge.cores() {
            online += st.bridge.push(core, notice.clone(), all.clone()).await?;
        }
    } else {
        let mut by_core: BTreeMap<usize, Vec<(String, Vec<String>)>> = BTreeMap::new();
        for (user, devices) in &audience {
            by_core
                .entry(st.bridge.core_of(user))
                .or_default()
                .push((user.clone(), devices.iter().flatten().cloned().collect()));
        }
        for (core, list) in by_core {
            online += st
                .bridge
                .push(core, notice.clone(), Arc::new(PushTargets::Users(list)))
                .await?;
        }
    }
    Ok(axum::Json(json!({
        "push_id": id,
        "expires_at_ms": expires,
        "users": audience.len(),
        "online_devices": online,
    })))
}

/// A push's record and its counters.
async fn push_info(State(st): State<Arc<ApiState>>, Path(id): Path<String>) -> ApiResult {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad("the push id must be a decimal number"))?;
    let rec = st
        .store
        .meta(&push::rec_key(id))?
        .and_then(|v| serde_json::from_slice::<PushRecord>(&v).ok())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no push {id} (unknown, or expired more than an hour ago)"),
            )
        })?;
    let counts = st.bridge.push_counts(&[id]).await?;
    let c = counts.first().copied().unwrap_or_default();
    Ok(axum::Json(json!({
        "push_id": id,
        "created_ms": rec.created_ms,
        "expires_at_ms": rec.expires_ms,
        "title": rec.title,
        "audience": rec.audience,
        "reached": c.reached,
        "acked": c.acked,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AliasBinding {
    alias: String,
    user: String,
    device: String,
}

/// Binds a device to an alias (its previous alias, if any, is replaced).
async fn bind_alias(State(st): State<Arc<ApiState>>, headers: HeaderMap, body: Bytes) -> ApiResult {
    let req: AliasBinding = parse(&headers, &body)?;
    check_label("alias", &req.alias)?;
    check_user(&req.user)?;
    check_label("device", &req.device)?;
    set_alias(&st, &req.user, &req.device, &req.alias).await?;
    let devices = push::alias_devices(&*st.store, &req.alias)?;
    Ok(axum::Json(alias_json(&req.alias, &devices)))
}

async fn set_alias(st: &ApiState, user: &str, device: &str, alias: &str) -> Result<(), ApiError> {
    let req = SetDevice {
        alias: Some(alias.to_owned()),
        ..Default::default()
    };
    let (changes, _) = push::device_changes(&*st.store, user, device, None, &req)?;
    if !changes.is_empty() {
        st.store.set_meta(changes).await?;
    }
    Ok(())
}

fn alias_json(alias: &str, devices: &[(String, String)]) -> Value {
    json!({
        "alias": alias,
        "devices": devices
            .iter()
            .map(|(u, d)| json!({"user": u, "device": d}))
            .collect::<Vec<_>>(),
    })
}

async fn get_alias(State(st): State<Arc<ApiState>>, Path(alias): Path<String>) -> ApiResult {
    check_label("alias", &alias)?;
    let devices = push::alias_devices(&*st.store, &alias)?;
    Ok(axum::Json(alias_json(&alias, &devices)))
}

/// Unbinds every device of an alias.
async fn delete_alias(State(st): State<Arc<ApiState>>, Path(alias): Path<String>) -> ApiResult {
    check_label("alias", &alias)?;
    let devices = push::alias_devices(&*st.store, &alias)?;
    for (u, d) in &devices {
        set_alias(&st, u, d, "").await?;
    }
    Ok(axum::Json(
        json!({"alias": alias, "removed": devices.len()}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TagMember {
    user: String,
    /// One device of the user; the whole user (every device) when absent.
    device: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TagChange {
    #[serde(default)]
    add: Vec<TagMember>,
    #[serde(default)]
    remove: Vec<TagMember>,
}

/// Adds users or devices to a tag and removes others (one atomic write).
async fn change_tag(
    State(st): State<Arc<ApiState>>,
    Path(tag): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    check_label("tag", &tag)?;
    let req: TagChange = parse(&headers, &body)?;
    if req.add.len() + req.remove.len() > MAX_TAG_CHANGES {
        return Err(ApiError::new(
            ErrorCode::LimitExceeded,
            format!("at most {MAX_TAG_CHANGES} tag changes per request"),
        ));
    }
    if req.add.is_empty() && req.remove.is_empty() {
        return Err(ApiError::bad("give add or remove"));
    }
    let mut changes = Vec::new();
    let mut added_per_user: BTreeMap<&str, usize> = BTreeMap::new();
    for (members, add) in [(&req.add, true), (&req.remove, false)] {
        for m in members {
            check_user(&m.user)?;
            if let Some(d) = &m.device {
                check_label("device", d)?;
            }
            let device = m.device.as_deref().unwrap_or("");
            let value = add.then(Bytes::new);
            if add {
                let n = added_per_user.entry(&m.user).or_insert_with(|| {
                    st.store
                        .scan_meta(&push::utag_prefix(&m.user), b"", push::MAX_TAGS + 1)
                        .map_or(0, |v| v.len())
                });
                *n += 1;
                if *n > push::MAX_TAGS {
                    return Err(ApiError::new(
                        ErrorCode::LimitExceeded,
                        format!(
                            "user {:?} would have more than {} tags (over all devices)",
                            m.user,
                            push::MAX_TAGS
                        ),
                    ));
                }
            }
            changes.push(MetaChange {
                key: push::tag_key(&tag, &m.user, device).into(),
                value: value.clone(),
            });
            changes.push(MetaChange {
                key: push::utag_key(&m.user, device, &tag).into(),
                value,
            });
        }
    }
    // Each member is two keys; 1000 members fit the store's limit in two writes.
    for chunk in changes.chunks(tern_storage::MAX_META_CHANGES) {
        st.store.set_meta(chunk.to_vec()).await?;
    }
    Ok(axum::Json(json!({
        "tag": tag,
        "added": req.add.len(),
        "removed": req.remove.len(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Page {
    /// The `next` of the previous page.
    after: Option<String>,
    limit: Option<usize>,
}

/// A tag's members, a page at a time.
async fn tag_members(
    State(st): State<Arc<ApiState>>,
    Path(tag): Path<String>,
    Query(q): Query<Page>,
) -> ApiResult {
    check_label("tag", &tag)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::bad("limit must be 1..=1000"));
    }
    let prefix = push::tag_prefix(&tag);
    let after = match &q.after {
        None => Vec::new(),
        Some(a) => {
            let mut k = prefix.clone();
            k.extend(
                B64URL
                    .decode(a)
                    .map_err(|_| ApiError::bad("after: not a page cursor"))?,
            );
            k
        }
    };
    let page = st.store.scan_meta(&prefix, &after, limit)?;
    let members: Vec<Value> = page
        .iter()
        .filter_map(|(k, _)| match push::split_rest(k, &prefix)[..] {
            [u, ""] => Some(json!({"user": u})),
            [u, d] => Some(json!({"user": u, "device": d})),
            _ => None,
        })
        .collect();
    let next = (page.len() == limit)
        .then(|| page.last().map(|(k, _)| B64URL.encode(&k[prefix.len()..])))
        .flatten();
    Ok(axum::Json(
        json!({"tag": tag, "members": members, "next": next}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceChange {
    push_provider: Option<String>,
    push_token: Option<String>,
    alias: Option<String>,
    dnd: Option<push::Dnd>,
}

/// Changes a device's registration as the device itself would with SetDevice (for app servers
/// that hold their users' push tokens).
async fn register_device(
    State(st): State<Arc<ApiState>>,
    Path((user, device)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult {
    check_user(&user)?;
    check_label("device", &device)?;
    let req: DeviceChange = parse(&headers, &body)?;
    let set = SetDevice {
        push_provider: req.push_provider,
        push_token: req.push_token,
        alias: req.alias,
        dnd: req.dnd.map(push::Dnd::to_wire),
    };
    let (changes, rec) = push::device_changes(&*st.store, &user, &device, None, &set)?;
    if !changes.is_empty() {
        st.store.set_meta(changes).await?;
    }
    let tags = push::tags_of(&*st.store, &user, Some(&device))?;
    let s = push::settings_of(&device, &rec, tags);
    Ok(axum::Json(json!({
        "device": device,
        "push_provider": s.push_provider,
        "has_push_token": s.has_push_token,
        "alias": s.alias,
        "dnd": rec.dnd,
        "tags": s.tags,
    })))
}

/// A user's registered devices (without their push tokens) and tags.
async fn user_devices(State(st): State<Arc<ApiState>>, Path(user): Path<String>) -> ApiResult {
    check_user(&user)?;
    let mut devices = Vec::new();
    for (device, rec) in push::devices_of(&*st.store, &user)? {
        let tags = push::tags_of(&*st.store, &user, Some(&device))?;
        let s = push::settings_of(&device, &rec, tags);
        devices.push(json!({
            "device": device,
            "platform": tern_protocol::v1::Platform::try_from(s.platform)
                .map_or("PLATFORM_UNSPECIFIED", |p| p.as_str_name()),
            "push_provider": s.push_provider,
            "has_push_token": s.has_push_token,
            "alias": s.alias,
            "dnd": rec.dnd,
            "tags": s.tags,
        }));
    }
    let tags = push::tags_of(&*st.store, &user, None)?;
    Ok(axum::Json(
        json!({"user": user, "tags": tags, "devices": devices}),
    ))
}
