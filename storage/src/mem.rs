//! [`MemStore`]: an in-memory [`MessageStore`] for unit tests of higher layers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::api::{
    AppendRequest, Appended, ConversationSettings, GroupChange, MAX_META_SCAN, MessageStore,
    MetaChange, RelationChange, RelationKind, SettingsChange, SettingsUpdate, SyncView,
    check_device, check_meta, check_name, check_relations, check_user, meta_scan_start, now_ms,
};
use crate::completion::Completion;
use crate::dedup::{DedupEntry, DedupIndex, DedupWindow};
use crate::error::{Result, StorageError};
use crate::ids::{
    ConversationId, GroupId, MAX_GROUP_ID, MAX_USER_ID, Seq, UserId, group_conversation,
};
use crate::record::{StoredMessage, UserConvRecord};

/// An in-memory store with the same behaviour as [`crate::RocksStore`] (the same
/// behavioural test suite runs against both), minus durability: everything is lost when the
/// last clone is dropped. Writes complete immediately. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MemStore {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    closed: bool,
    users: Names,
    groups: Names,
    messages: BTreeMap<(ConversationId, Seq), StoredMessage>,
    /// Members with their attributes.
    members: BTreeMap<(GroupId, UserId), Bytes>,
    user_groups: BTreeSet<(UserId, GroupId)>,
    group_records: HashMap<GroupId, Bytes>,
    relations: BTreeMap<(UserId, u8, UserId), Bytes>,
    profiles: HashMap<UserId, Bytes>,
    meta: BTreeMap<Bytes, Bytes>,
    user_convs: BTreeMap<(UserId, ConversationId), UserConvRecord>,
    cursors: HashMap<(UserId, ConversationId, String), Seq>,
    dedup: DedupIndex,
    version: u64,
    last_time: u64,
}

#[derive(Debug, Default)]
struct Names {
    by_name: HashMap<String, u64>,
    by_id: Vec<String>,
}

impl Names {
    fn intern(&mut self, name: &str, max: u64) -> Result<u64> {
        check_name(name)?;
        if let Some(&id) = self.by_name.get(name) {
            return Ok(id);
        }
        let id = self.by_id.len() as u64 + 1;
        if id > max {
            return Err(StorageError::IdSpaceExhausted);
        }
        self.by_id.push(name.to_owned());
        self.by_name.insert(name.to_owned(), id);
        Ok(id)
    }

    fn name(&self, id: u64) -> Option<String> {
        let i = usize::try_from(id.checked_sub(1)?).ok()?;
        self.by_id.get(i).cloned()
    }
}

impl Default for MemStore {
    fn default() -> Self {
        MemStore::new(DedupWindow::default())
    }
}

impl MemStore {
    /// An empty store with the given idempotency window.
    pub fn new(window: DedupWindow) -> Self {
        MemStore {
            state: Arc::new(Mutex::new(State {
                closed: false,
                users: Names::default(),
                groups: Names::default(),
                messages: BTreeMap::new(),
                members: BTreeMap::new(),
                user_groups: BTreeSet::new(),
                group_records: HashMap::new(),
                relations: BTreeMap::new(),
                profiles: HashMap::new(),
                meta: BTreeMap::new(),
                user_convs: BTreeMap::new(),
                cursors: HashMap::new(),
                dedup: DedupIndex::new(window),
                version: 0,
                last_time: 0,
            })),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.closed {
            return Err(StorageError::Closed);
        }
        Ok(s)
    }
}

impl State {
    fn head(&self, conv: ConversationId) -> Option<&StoredMessage> {
        self.messages
            .range((conv, 0)..=(conv, u64::MAX))
            .next_back()
            .map(|(_, m)| m)
    }

    fn latest(&self, conv: ConversationId) -> Seq {
        self.head(conv).map_or(0, |m| m.seq)
    }

    fn next_version(&mut self) -> u64 {
        self.version += 1;
        self.version
    }

    fn append(&mut self, req: AppendRequest) -> Result<Appended> {
        req.validate()?;
        let now = now_ms().max(self.last_time);
        self.last_time = now;
        self.dedup.evict_old(now);
        let key =
            (!req.client_msg_id.is_empty()).then(|| self.dedup.key(req.sender, &req.client_msg_id));
        if let Some(k) = &key
            && let Some(e) = self.dedup.get(k, now)
        {
            return Ok(Appended {
                conversation: e.conv,
                seq: e.seq,
                server_time_ms: e.time_ms,
                version: e.version,
                duplicate: true,
            });
        }
        let conv = req.conversation;
        let head = self.latest(conv);
        if let Some(target) = req.recall
            && (target > head || !self.messages.contains_key(&(conv, target)))
        {
            return Err(StorageError::InvalidArgument("no such message to recall"));
        }
        let seq = head + 1;
        let version = self.next_version();
        if let Some(target) = req.recall
            && let Some(m) = self.messages.get_mut(&(conv, target))
        {
            m.recalled = true;
            m.payload = Bytes::new();
        }
        for &p in &req.participants {
            self.user_convs.entry((p, conv)).or_insert(UserConvRecord {
                active: true,
                member_version: version,
                ..UserConvRecord::default()
            });
        }
        // The sender has read what they wrote (before the group change: a leaver's event too).
        self.advance_read(req.sender, conv, seq, version);
        if let Some(change) = req.group_change {
            self.apply_group_change(*change, conv, seq, version);
        }
        if let Some(k) = key {
            self.dedup.insert(
                k,
                DedupEntry {
                    conv,
                    seq,
                    time_ms: now,
                    version,
                },
            );
        }
        self.messages.insert(
            (conv, seq),
            StoredMessage {
                conversation: conv,
                seq,
                version,
                sender: req.sender,
                timestamp_ms: now,
                client_msg_id: req.client_msg_id,
                content_type: req.content_type,
                custom_type: req.custom_type,
                payload: req.payload,
                recalled: false,
            },
        );
        Ok(Appended {
            conversation: conv,
            seq,
            server_time_ms: now,
            version,
            duplicate: false,
        })
    }

    fn member(&mut self, group: GroupId, user: UserId, add: bool) -> Result<bool> {
        let Some(conv) = group_conversation(group) else {
            return Err(StorageError::InvalidArgument("group id out of range"));
        };
        if user == 0 || user > MAX_USER_ID {
            return Err(StorageError::InvalidArgument("user id out of range"));
        }
        if self.members.contains_key(&(group, user)) == add {
            return Ok(false);
        }
        let version = self.next_version();
        let head = self.latest(conv);
        if add {
            self.join(group, user, conv, Bytes::new(), head + 1, version);
            // A new member has nothing unread.
            self.advance_read(user, conv, head, version);
        } else {
            self.leave(group, user, conv, head, version);
        }
        Ok(true)
    }

    /// Applies a (validated) group change recorded by the append `(seq, version)` of the
    /// group's conversation `conv`.
    fn apply_group_change(
        &mut self,
        change: GroupChange,
        conv: ConversationId,
        seq: Seq,
        version: u64,
    ) {
        let group = change.group;
        if let Some(record) = change.record {
            self.group_records.insert(group, record);
        }
        let first_seq = if change.joiners_read_history { 0 } else { seq };
        for (user, attrs) in change.members {
            match (attrs, self.members.get_mut(&(group, user))) {
                (Some(attrs), Some(current)) => *current = attrs,
                (Some(attrs), None) => {
                    self.join(group, user, conv, attrs, first_seq, version);
                    // A new member has read everything up to the event that added them.
                    self.advance_read(user, conv, seq, version);
                }
                (None, Some(_)) => {
                    self.leave(group, user, conv, seq, version);
                    // Hidden before the event that removes them: hidden still.
                    if let Some(rec) = self.user_convs.get_mut(&(user, conv)) {
                        rec.hidden_through(seq);
                    }
                }
                (None, None) => {}
            }
        }
    }

    fn join(
        &mut self,
        group: GroupId,
        user: UserId,
        conv: ConversationId,
        attrs: Bytes,
        first_seq: Seq,
        version: u64,
    ) {
        self.members.insert((group, user), attrs);
        self.user_groups.insert((user, group));
        let rec = self.user_convs.entry((user, conv)).or_default();
        rec.active = true;
        rec.left_seq = 0;
        rec.joined_seq = first_seq;
        rec.member_version = version;
    }

    fn leave(
        &mut self,
        group: GroupId,
        user: UserId,
        conv: ConversationId,
        left_seq: Seq,
        version: u64,
    ) {
        self.members.remove(&(group, user));
        self.user_groups.remove(&(user, group));
        let rec = self.user_convs.entry((user, conv)).or_default();
        rec.active = false;
        rec.left_seq = left_seq;
        rec.member_version = version;
    }

    /// Moves `user`'s read position forward to `seq`, if `conv` is active in their index.
    fn advance_read(&mut self, user: UserId, conv: ConversationId, seq: Seq, version: u64) {
        if let Some(rec) = self.user_convs.get_mut(&(user, conv))
            && rec.active
            && rec.read_seq < seq
        {
            *rec = rec.read_upto(seq, version);
        }
    }

    fn set_read(&mut self, user: UserId, conv: ConversationId, seq: Seq) -> Seq {
        let target = seq.min(self.latest(conv));
        let current = self.user_convs.get(&(user, conv)).map_or(0, |r| r.read_seq);
        if target <= current {
            return current;
        }
        let version = self.next_version();
        let rec = self
            .user_convs
            .entry((user, conv))
            .or_insert(UserConvRecord {
                active: true,
                member_version: version,
                ..UserConvRecord::default()
            });
        *rec = rec.read_upto(target, version);
        target
    }

    fn set_settings(
        &mut self,
        user: UserId,
        conv: ConversationId,
        change: SettingsChange,
    ) -> SettingsUpdate {
        let head = self.latest(conv);
        let current = self
            .user_convs
            .get(&(user, conv))
            .map(|r| r.settings(head))
            .unwrap_or_default();
        let update = SettingsUpdate::of(change, current, head);
        if !update.changed {
            return update;
        }
        let version = self.next_version();
        let rec = self
            .user_convs
            .entry((user, conv))
            .or_insert(UserConvRecord {
                active: true,
                member_version: version,
                ..UserConvRecord::default()
            });
        rec.set_settings(&update.settings, head);
        rec.settings_version = version;
        update
    }

    fn set_delivered(&mut self, user: UserId, device: &str, conv: ConversationId, seq: Seq) -> Seq {
        let target = seq.min(self.latest(conv));
        let cur = self
            .cursors
            .entry((user, conv, device.to_owned()))
            .or_insert(0);
        *cur = (*cur).max(target);
        *cur
    }
}

impl MessageStore for MemStore {
    fn intern_user(&self, name: &str) -> Result<UserId> {
        self.lock()?.users.intern(name, MAX_USER_ID)
    }

    fn lookup_user(&self, name: &str) -> Result<Option<UserId>> {
        Ok(self.lock()?.users.by_name.get(name).copied())
    }

    fn user_name(&self, id: UserId) -> Result<Option<String>> {
        Ok(self.lock()?.users.name(id))
    }

    fn intern_group(&self, name: &str) -> Result<GroupId> {
        self.lock()?.groups.intern(name, MAX_GROUP_ID)
    }

    fn lookup_group(&self, name: &str) -> Result<Option<GroupId>> {
        Ok(self.lock()?.groups.by_name.get(name).copied())
    }

    fn sync_interned(&self) -> Result<()> {
        // Nothing here outlives the process.
        self.lock().map(drop)
    }

    fn group_name(&self, id: GroupId) -> Result<Option<String>> {
        Ok(self.lock()?.groups.name(id))
    }

    fn add_member(&self, group: GroupId, user: UserId) -> Completion<bool> {
        Completion::ready(self.lock().and_then(|mut s| s.member(group, user, true)))
    }

    fn remove_member(&self, group: GroupId, user: UserId) -> Completion<bool> {
        Completion::ready(self.lock().and_then(|mut s| s.member(group, user, false)))
    }

    fn members(&self, group: GroupId, after: UserId, limit: usize) -> Result<Vec<UserId>> {
        let s = self.lock()?;
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        Ok(s.members
            .range((group, start)..=(group, u64::MAX))
            .take(limit)
            .map(|(&(_, u), _)| u)
            .collect())
    }

    fn groups_of(&self, user: UserId) -> Result<Vec<GroupId>> {
        let s = self.lock()?;
        Ok(s.user_groups
            .range((user, 0)..=(user, u64::MAX))
            .map(|&(_, g)| g)
            .collect())
    }

    fn group_record(&self, group: GroupId) -> Result<Option<Bytes>> {
        Ok(self.lock()?.group_records.get(&group).cloned())
    }

    fn set_group_record(&self, group: GroupId, record: Bytes) -> Completion<()> {
        Completion::ready(self.lock().map(|mut s| {
            s.group_records.insert(group, record);
        }))
    }

    fn member_records(
        &self,
        group: GroupId,
        after: UserId,
        limit: usize,
    ) -> Result<Vec<(UserId, Bytes)>> {
        let s = self.lock()?;
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        Ok(s.members
            .range((group, start)..=(group, u64::MAX))
            .take(limit)
            .map(|(&(_, u), attrs)| (u, attrs.clone()))
            .collect())
    }

    fn membership(&self, user: UserId, group: GroupId) -> Result<Option<Seq>> {
        let s = self.lock()?;
        let Some(conv) = group_conversation(group) else {
            return Ok(None);
        };
        Ok(s.user_convs.get(&(user, conv)).map(|r| r.left_seq))
    }

    fn joined_seq(&self, user: UserId, group: GroupId) -> Result<Seq> {
        let s = self.lock()?;
        let Some(conv) = group_conversation(group) else {
            return Ok(0);
        };
        Ok(s.user_convs.get(&(user, conv)).map_or(0, |r| r.joined_seq))
    }

    fn set_conversation_settings(
        &self,
        user: UserId,
        conv: ConversationId,
        change: SettingsChange,
    ) -> Completion<SettingsUpdate> {
        Completion::ready(
            check_user(user)
                .and_then(|()| self.lock())
                .map(|mut s| s.set_settings(user, conv, change)),
        )
    }

    fn conversation_settings(
        &self,
        user: UserId,
        conv: ConversationId,
    ) -> Result<ConversationSettings> {
        let s = self.lock()?;
        Ok(s.user_convs
            .get(&(user, conv))
            .map(|r| r.settings(s.latest(conv)))
            .unwrap_or_default())
    }

    fn set_relations(&self, changes: Vec<RelationChange>) -> Completion<()> {
        Completion::ready(check_relations(&changes).and_then(|()| {
            let mut s = self.lock()?;
            for c in changes {
                let key = (c.user, c.kind as u8, c.other);
                match c.value {
                    Some(v) => s.relations.insert(key, v),
                    None => s.relations.remove(&key),
                };
            }
            Ok(())
        }))
    }

    fn relation(&self, user: UserId, kind: RelationKind, other: UserId) -> Result<Option<Bytes>> {
        Ok(self
            .lock()?
            .relations
            .get(&(user, kind as u8, other))
            .cloned())
    }

    fn relations(
        &self,
        user: UserId,
        kind: RelationKind,
        after: UserId,
        limit: usize,
    ) -> Result<Vec<(UserId, Bytes)>> {
        let s = self.lock()?;
        let Some(start) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let k = kind as u8;
        Ok(s.relations
            .range((user, k, start)..=(user, k, u64::MAX))
            .take(limit)
            .map(|(&(_, _, other), v)| (other, v.clone()))
            .collect())
    }

    fn count_relations(&self, user: UserId, kind: RelationKind) -> Result<u64> {
        let s = self.lock()?;
        let k = kind as u8;
        Ok(s.relations
            .range((user, k, 0)..=(user, k, u64::MAX))
            .count() as u64)
    }

    fn set_user_profile(&self, user: UserId, profile: Bytes) -> Completion<()> {
        Completion::ready(check_user(user).and_then(|()| {
            self.lock()?.profiles.insert(user, profile);
            Ok(())
        }))
    }

    fn user_profile(&self, user: UserId) -> Result<Option<Bytes>> {
        Ok(self.lock()?.profiles.get(&user).cloned())
    }

    fn set_meta(&self, changes: Vec<MetaChange>) -> Completion<()> {
        Completion::ready(check_meta(&changes).and_then(|()| {
            let mut s = self.lock()?;
            for c in changes {
                match c.value {
                    Some(v) => s.meta.insert(c.key, v),
                    None => s.meta.remove(&c.key),
                };
            }
            Ok(())
        }))
    }

    fn meta(&self, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self.lock()?.meta.get(key).cloned())
    }

    fn scan_meta(&self, prefix: &[u8], after: &[u8], limit: usize) -> Result<Vec<(Bytes, Bytes)>> {
        let s = self.lock()?;
        let start = meta_scan_start(prefix, after);
        Ok(s.meta
            .range::<[u8], _>((Bound::Included(&start[..]), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit.min(MAX_META_SCAN))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn append(&self, req: AppendRequest) -> Completion<Appended> {
        Completion::ready(self.lock().and_then(|mut s| s.append(req)))
    }

    fn read_forward(
        &self,
        conv: ConversationId,
        from_seq: Seq,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let s = self.lock()?;
        Ok(s.messages
            .range((conv, from_seq.max(1))..=(conv, u64::MAX))
            .take(limit)
            .map(|(_, m)| m.clone())
            .collect())
    }

    fn read_backward(
        &self,
        conv: ConversationId,
        before_seq: Seq,
        limit: usize,
    ) -> Result<Vec<StoredMessage>> {
        let s = self.lock()?;
        if before_seq == 1 {
            return Ok(Vec::new());
        }
        let last = if before_seq == 0 {
            u64::MAX
        } else {
            before_seq - 1
        };
        Ok(s.messages
            .range((conv, 1)..=(conv, last))
            .rev()
            .take(limit)
            .map(|(_, m)| m.clone())
            .collect())
    }

    fn latest_seq(&self, conv: ConversationId) -> Result<Seq> {
        Ok(self.lock()?.latest(conv))
    }

    fn sync_view(
        &self,
        user: UserId,
        since_version: u64,
        device: Option<&str>,
    ) -> Result<SyncView> {
        if let Some(d) = device {
            check_device(d)?;
        }
        // One lock for the whole pass: the view is consistent.
        let s = self.lock()?;
        let mut view = SyncView::default();
        for (&(_, conv), rec) in s.user_convs.range((user, 0)..=(user, u64::MAX)) {
            let head = s.head(conv).map_or((0, 0), |m| (m.seq, m.version));
            let peer = rec.peer(user, conv, |other| {
                Ok(s.user_convs.get(&(other, conv)).copied())
            })?;
            let mut info = rec.info(user, conv, head, peer.as_ref());
            view.user_version = view.user_version.max(info.last_version);
            if info.last_version <= since_version {
                continue;
            }
            info.delivered_seq = device.map_or(0, |d| {
                s.cursors
                    .get(&(user, conv, d.to_owned()))
                    .copied()
                    .unwrap_or(0)
            });
            view.conversations.push(info);
        }
        Ok(view)
    }

    fn set_read(&self, user: UserId, conv: ConversationId, seq: Seq) -> Completion<Seq> {
        Completion::ready(self.lock().map(|mut s| s.set_read(user, conv, seq)))
    }

    fn read_seq(&self, user: UserId, conv: ConversationId) -> Result<Seq> {
        Ok(self
            .lock()?
            .user_convs
            .get(&(user, conv))
            .map_or(0, |r| r.read_seq))
    }

    fn read_and_joined_seq(&self, user: UserId, conv: ConversationId) -> Result<(Seq, Seq)> {
        Ok(self
            .lock()?
            .user_convs
            .get(&(user, conv))
            .map_or((0, 0), |r| (r.read_seq, r.joined_seq)))
    }

    fn set_delivered(
        &self,
        user: UserId,
        device: &str,
        conv: ConversationId,
        seq: Seq,
    ) -> Completion<Seq> {
        if let Err(e) = check_device(device) {
            return Completion::ready(Err(e));
        }
        Completion::ready(
            self.lock()
                .map(|mut s| s.set_delivered(user, device, conv, seq)),
        )
    }

    fn delivered(&self, user: UserId, device: &str, conv: ConversationId) -> Result<Seq> {
        check_device(device)?;
        Ok(self
            .lock()?
            .cursors
            .get(&(user, conv, device.to_owned()))
            .copied()
            .unwrap_or(0))
    }

    fn close(&self) -> Result<()> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.closed = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Changing a member's attributes is not a join: the member's record keeps its version.
    #[test]
    fn attribute_update_keeps_member_version() {
        let s = MemStore::default();
        let g = 3;
        let conv = group_conversation(g).unwrap();
        let change = |id: &str, attrs: &'static [u8]| AppendRequest {
            conversation: conv,
            sender: 1,
            client_msg_id: id.to_owned(),
            group_change: Some(Box::new(GroupChange {
                group: g,
                record: None,
                members: vec![(4, Some(Bytes::from_static(attrs)))],
                joiners_read_history: false,
            })),
            ..AppendRequest::default()
        };
        let record = || s.state.lock().unwrap().user_convs[&(4, conv)];
        let joined = s.append(change("join", b"a")).wait().unwrap();
        let rec = record();
        assert_eq!(rec.member_version, joined.version);
        s.append(change("update", b"b")).wait().unwrap();
        assert_eq!(record(), rec);
        assert_eq!(
            s.member_records(g, 0, 10).unwrap(),
            vec![(4, Bytes::from_static(b"b"))]
        );
    }
}
