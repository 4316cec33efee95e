//! Stored record formats and key encodings.
//!
//! Every value starts with a format version byte. Decoders reject unknown versions with
//! [`StorageError::UnknownRecordVersion`] and short or inconsistent input with
//! [`StorageError::Corrupt`]; they never panic, whatever the input (the fuzz target calls
//! [`decode_record`]). Integers inside values are little-endian; integers inside keys are
//! big-endian so that byte order is numeric order.
//!
//! Message record, version 1 (the value under `conv BE ++ seq BE` in the messages column
//! family):
//!
//! ```text
//! 0      u8   record version (1)
//! 1..9   u64  global version (commit counter) of this append
//! 9..17  u64  sender (internal user id)
//! 17..25 u64  server timestamp, ms since the Unix epoch
//! 25..29 u32  content type
//! 29..31 u16  client message id length (n)
//! 31..33 u16  custom type length (m)
//! 33..   n bytes client message id (UTF-8), m bytes custom type (UTF-8), payload (the rest)
//! ```
//!
//! A recalled message ([`crate::AppendRequest::recall`]) is stored in the same layout with
//! record version 2 ([`RECALLED_RECORD_VERSION`]) and no payload: the version byte is the
//! recalled flag. Everything else (global version, sender, timestamp, content type, client
//! message id, custom type) is kept from the original. A version 1 record is a message that
//! was not recalled, so every record written before recall existed still decodes as is; a
//! version 2 record with a payload is corrupt.

use bytes::Bytes;

use crate::error::{Result, StorageError};
use crate::ids::{ConversationId, Seq, UserId};

/// The message record version this build writes and reads.
pub const RECORD_VERSION: u8 = 1;
/// The version byte of a recalled message's record (otherwise laid out as version 1).
pub const RECALLED_RECORD_VERSION: u8 = 2;
const HEADER: usize = 33;
/// Longest accepted client message id, in bytes.
pub const MAX_CLIENT_MSG_ID_LEN: usize = 256;
/// Longest accepted custom type, in bytes.
pub const MAX_CUSTOM_TYPE_LEN: usize = 1024;

/// A message record borrowed from its encoded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRecord<'a> {
    /// Global version (commit counter) of the append.
    pub version: u64,
    /// Internal user id of the sender.
    pub sender: UserId,
    /// Server timestamp, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// Application content type.
    pub content_type: u32,
    /// The sender's client message id (idempotency key); may be empty.
    pub client_msg_id: &'a str,
    /// Application custom type.
    pub custom_type: &'a str,
    /// The opaque message body.
    pub payload: &'a [u8],
    /// The message was recalled (record version 2; the payload is empty).
    pub recalled: bool,
}

/// Decodes a stored message record, version 1 or 2 (recalled; see the module docs). Total:
/// returns an error for any input that is not a well-formed record of a known version.
pub fn decode_record(buf: &[u8]) -> Result<MessageRecord<'_>> {
    let Some(&v) = buf.first() else {
        return Err(StorageError::Corrupt("empty message record"));
    };
    if v != RECORD_VERSION && v != RECALLED_RECORD_VERSION {
        return Err(StorageError::UnknownRecordVersion {
            found: v,
            supported: RECALLED_RECORD_VERSION,
        });
    }
    if buf.len() < HEADER {
        return Err(StorageError::Corrupt(
            "message record shorter than its header",
        ));
    }
    let id_len = u16_at(buf, 29) as usize;
    let ct_len = u16_at(buf, 31) as usize;
    // The writer never stores longer ones: a record that claims them is damaged.
    if id_len > MAX_CLIENT_MSG_ID_LEN || ct_len > MAX_CUSTOM_TYPE_LEN {
        return Err(StorageError::Corrupt(
            "message record id or custom type longer than the limit",
        ));
    }
    let rest = &buf[HEADER..];
    if rest.len() < id_len + ct_len {
        return Err(StorageError::Corrupt(
            "message record lengths exceed the record",
        ));
    }
    let client_msg_id = std::str::from_utf8(&rest[..id_len])
        .map_err(|_| StorageError::Corrupt("client message id is not UTF-8"))?;
    let custom_type = std::str::from_utf8(&rest[id_len..id_len + ct_len])
        .map_err(|_| StorageError::Corrupt("custom type is not UTF-8"))?;
    let payload = &rest[id_len + ct_len..];
    let recalled = v == RECALLED_RECORD_VERSION;
    if recalled && !payload.is_empty() {
        return Err(StorageError::Corrupt(
            "recalled message record has a payload",
        ));
    }
    Ok(MessageRecord {
        version: u64_at(buf, 1),
        sender: u64_at(buf, 9),
        timestamp_ms: u64_at(buf, 17),
        content_type: u32_at(buf, 25),
        client_msg_id,
        custom_type,
        payload,
        recalled,
    })
}

/// Appends the encoding of `r` to `out` (version 2 if `recalled`, else 1). Lengths must have
/// been validated (`client_msg_id` ≤ [`MAX_CLIENT_MSG_ID_LEN`], `custom_type` ≤
/// [`MAX_CUSTOM_TYPE_LEN`]), and a recalled record has an empty payload.
pub fn encode_record(r: &MessageRecord<'_>, out: &mut Vec<u8>) {
    debug_assert!(r.client_msg_id.len() <= MAX_CLIENT_MSG_ID_LEN);
    debug_assert!(r.custom_type.len() <= MAX_CUSTOM_TYPE_LEN);
    debug_assert!(!r.recalled || r.payload.is_empty());
    out.reserve(HEADER + r.client_msg_id.len() + r.custom_type.len() + r.payload.len());
    out.push(if r.recalled {
        RECALLED_RECORD_VERSION
    } else {
        RECORD_VERSION
    });
    out.extend_from_slice(&r.version.to_le_bytes());
    out.extend_from_slice(&r.sender.to_le_bytes());
    out.extend_from_slice(&r.timestamp_ms.to_le_bytes());
    out.extend_from_slice(&r.content_type.to_le_bytes());
    out.extend_from_slice(&(r.client_msg_id.len() as u16).to_le_bytes());
    out.extend_from_slice(&(r.custom_type.len() as u16).to_le_bytes());
    out.extend_from_slice(r.client_msg_id.as_bytes());
    out.extend_from_slice(r.custom_type.as_bytes());
    out.extend_from_slice(r.payload);
}

/// A message as returned by reads. The payload is a [`Bytes`] slice of one buffer per page
/// (the page is copied once out of the storage engine), so it can be forwarded to
/// recipients without further copies; it keeps that page buffer alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The conversation.
    pub conversation: ConversationId,
    /// Sequence number within the conversation (1, 2, 3, ...).
    pub seq: Seq,
    /// Global version (commit counter) of the append; see the crate docs on sync.
    pub version: u64,
    /// Internal user id of the sender.
    pub sender: UserId,
    /// Server timestamp, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The sender's client message id.
    pub client_msg_id: String,
    /// Application content type.
    pub content_type: u32,
    /// Application custom type.
    pub custom_type: String,
    /// The opaque message body (empty once recalled).
    pub payload: Bytes,
    /// The message was recalled ([`crate::AppendRequest::recall`]).
    pub recalled: bool,
}

impl StoredMessage {
    /// Builds a message whose payload is a slice of `page`, the buffer `r` was decoded from.
    #[cfg(feature = "store")]
    pub(crate) fn from_page(
        conv: ConversationId,
        seq: Seq,
        r: &MessageRecord<'_>,
        page: &Bytes,
    ) -> Self {
        StoredMessage {
            conversation: conv,
            seq,
            version: r.version,
            sender: r.sender,
            timestamp_ms: r.timestamp_ms,
            client_msg_id: r.client_msg_id.to_owned(),
            content_type: r.content_type,
            custom_type: r.custom_type.to_owned(),
            payload: page.slice_ref(r.payload),
            recalled: r.recalled,
        }
    }
}

/// Per (user, conversation) state, stored in the user-conversation index.
///
/// Version 1 layout (67 bytes, written by this build):
///
/// ```text
/// 0      u8   record version (1)
/// 1      u8   flags (bit 0: active member)
/// 2..10  u64  member_version
/// 10..18 u64  read_seq
/// 18..26 u64  read_version
/// 26..34 u64  left_seq
/// 34     u8   settings flags (bit 0 pinned, bit 1 hidden, bit 2 muted)
/// 35..43 u64  cleared_seq
/// 43..51 u64  settings_version
/// 51..59 u64  hidden_seq
/// 59..67 u64  joined_seq
/// ```
///
/// Four older forms are prefixes of it and still decode: records written before `left_seq`
/// existed are the first 26 bytes (they decode with `left_seq` 0: right for members and 1:1
/// conversations; for a user who had already left, the seq they left at was not recorded,
/// `active` is false), records written before the settings existed the first 34 bytes (they
/// decode with the default settings and `settings_version` 0), records written before
/// `hidden_seq` existed the first 51 bytes (a hidden one decodes with `hidden_seq`
/// `u64::MAX`: hidden until unhidden, as it was stored), records written before `joined_seq`
/// existed the first 59 bytes (they decode with `joined_seq` 0: the member joined before the
/// server recorded where, and may read the group from its start, as then). All are rewritten in
/// the 67-byte form on their next change. Any other length is corrupt, so a build older than a
/// form refuses it: a data directory is not meant to go back to an older build. Flag bits
/// other than those listed are ignored (and written as 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct UserConvRecord {
    pub active: bool,
    /// Version of the last membership change (join, leave, first message).
    pub member_version: u64,
    pub read_seq: Seq,
    /// Version of the last read-position change.
    pub read_version: u64,
    /// 0 while a member (and for 1:1 conversations); after leaving a group, the seq of the
    /// event that removed the user.
    pub left_seq: Seq,
    /// Bit 0 pinned, bit 1 hidden, bit 2 muted.
    pub flags: u8,
    pub cleared_seq: Seq,
    /// Version of the last settings change.
    pub settings_version: u64,
    /// With the hidden flag: the conversation's latest readable seq when it was hidden. It is
    /// hidden while no message after this one arrived (see [`UserConvRecord::settings`]).
    pub hidden_seq: Seq,
    /// For a group: the first seq of the conversation after the user's latest join (the event
    /// that added them, or the next message for [`crate::MessageStore::add_member`]); 0 if they
    /// joined before it was recorded, and for 1:1 conversations.
    pub joined_seq: Seq,
}

/// The current form.
const USER_CONV_LEN: usize = 67;
/// The form without `joined_seq`.
const USER_CONV_LEN_NO_JOINED_SEQ: usize = 59;
/// The form without `hidden_seq`.
const USER_CONV_LEN_NO_HIDDEN_SEQ: usize = 51;
/// The form without the settings.
const USER_CONV_LEN_NO_SETTINGS: usize = 34;
/// The form without `left_seq`.
const USER_CONV_LEN_SHORT: usize = 26;

impl UserConvRecord {
    pub fn encode(&self) -> [u8; USER_CONV_LEN] {
        let mut b = [0u8; USER_CONV_LEN];
        b[0] = RECORD_VERSION;
        b[1] = u8::from(self.active);
        b[2..10].copy_from_slice(&self.member_version.to_le_bytes());
        b[10..18].copy_from_slice(&self.read_seq.to_le_bytes());
        b[18..26].copy_from_slice(&self.read_version.to_le_bytes());
        b[26..34].copy_from_slice(&self.left_seq.to_le_bytes());
        b[34] = self.flags & 7;
        b[35..43].copy_from_slice(&self.cleared_seq.to_le_bytes());
        b[43..51].copy_from_slice(&self.settings_version.to_le_bytes());
        b[51..59].copy_from_slice(&self.hidden_seq.to_le_bytes());
        b[59..67].copy_from_slice(&self.joined_seq.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        check_version(b)?;
        let left_seq = match b.len() {
            USER_CONV_LEN
            | USER_CONV_LEN_NO_JOINED_SEQ
            | USER_CONV_LEN_NO_HIDDEN_SEQ
            | USER_CONV_LEN_NO_SETTINGS => u64_at(b, 26),
            USER_CONV_LEN_SHORT => 0,
            _ => {
                return Err(StorageError::Corrupt(
                    "user-conversation record has a wrong length",
                ));
            }
        };
        let has_settings = b.len() >= USER_CONV_LEN_NO_HIDDEN_SEQ;
        let flags = if has_settings { b[34] & 7 } else { 0 };
        Ok(UserConvRecord {
            active: b[1] & 1 != 0,
            member_version: u64_at(b, 2),
            read_seq: u64_at(b, 10),
            read_version: u64_at(b, 18),
            left_seq,
            flags,
            cleared_seq: if has_settings { u64_at(b, 35) } else { 0 },
            settings_version: if has_settings { u64_at(b, 43) } else { 0 },
            hidden_seq: match b.len() {
                USER_CONV_LEN | USER_CONV_LEN_NO_JOINED_SEQ => u64_at(b, 51),
                _ if flags & 2 != 0 => u64::MAX,
                _ => 0,
            },
            joined_seq: if b.len() == USER_CONV_LEN {
                u64_at(b, 59)
            } else {
                0
            },
        })
    }

    /// This record with the read position moved to `seq` by the change at `version`.
    #[cfg(feature = "mem")]
    pub fn read_upto(self, seq: Seq, version: u64) -> Self {
        UserConvRecord {
            read_seq: seq,
            read_version: version,
            ..self
        }
    }

    /// The sync view of this record, `user`'s of `conv`, whose newest message is
    /// `(latest_seq, its version)`; `peer` is the other user's record of a 1:1 conversation
    /// ([`UserConvRecord::peer`]). The delivered cursor is left 0.
    #[cfg(feature = "mem")]
    pub fn info(
        &self,
        user: UserId,
        conv: ConversationId,
        (latest_seq, msg_version): (Seq, u64),
        peer: Option<&UserConvRecord>,
    ) -> crate::api::ConversationInfo {
        let (peer_read_seq, peer_read_version) =
            peer.map_or((0, 0), |p| (p.read_seq, p.read_version));
        crate::api::ConversationInfo {
            conversation: conv,
            peer: crate::ids::peer_of(user, conv),
            active: self.active,
            latest_seq,
            last_version: self.last_version().max(msg_version).max(peer_read_version),
            read_seq: self.read_seq,
            peer_read_seq,
            left_seq: self.left_seq,
            joined_seq: self.joined_seq,
            delivered_seq: 0,
            settings: self.settings(latest_seq),
        }
    }

    /// The other user's record of `user`'s 1:1 conversation `conv`, found with `lookup`
    /// (this record itself for a conversation with oneself); None for a group.
    #[cfg(feature = "mem")]
    pub fn peer(
        &self,
        user: UserId,
        conv: ConversationId,
        lookup: impl FnOnce(UserId) -> Result<Option<UserConvRecord>>,
    ) -> Result<Option<UserConvRecord>> {
        match crate::ids::peer_of(user, conv) {
            crate::ids::Peer::User(other) if other == user => Ok(Some(*self)),
            crate::ids::Peer::User(other) => lookup(other),
            _ => Ok(None),
        }
    }

    /// The highest version of any change recorded here.
    #[cfg(feature = "mem")]
    pub fn last_version(&self) -> u64 {
        self.member_version
            .max(self.read_version)
            .max(self.settings_version)
    }

    /// The settings stored here, for a conversation whose latest seq is `latest_seq`. A hidden
    /// conversation shows again once a message newer than the hide arrived (up to where the
    /// user may read: a group they left stays hidden).
    #[cfg(feature = "mem")]
    pub fn settings(&self, latest_seq: Seq) -> crate::api::ConversationSettings {
        crate::api::ConversationSettings {
            pinned: self.flags & 1 != 0,
            hidden: self.flags & 2 != 0 && self.readable(latest_seq) <= self.hidden_seq,
            muted: self.flags & 4 != 0,
            cleared_seq: self.cleared_seq,
        }
    }

    /// Stores `s`'s flags and cleared seq for a conversation whose latest seq is `latest_seq`
    /// (the caller sets the version). Hiding a shown conversation records where it was hidden.
    #[cfg(feature = "mem")]
    pub fn set_settings(&mut self, s: &crate::api::ConversationSettings, latest_seq: Seq) {
        self.hidden_seq = match (s.hidden, self.settings(latest_seq).hidden) {
            (true, true) => self.hidden_seq,
            (true, false) => self.readable(latest_seq),
            (false, _) => 0,
        };
        self.flags = u8::from(s.pinned) | u8::from(s.hidden) << 1 | u8::from(s.muted) << 2;
        self.cleared_seq = s.cleared_seq;
    }

    /// Keeps a conversation that was hidden until the event at `event_seq` hidden through it:
    /// the event that removes the user from a group is the last they may read, and not news.
    #[cfg(feature = "mem")]
    pub fn hidden_through(&mut self, event_seq: Seq) {
        if self.flags & 2 != 0 && self.hidden_seq.saturating_add(1) == event_seq {
            self.hidden_seq = event_seq;
        }
    }

    /// The last seq of a conversation whose latest seq is `latest_seq` that the user may read.
    #[cfg(feature = "mem")]
    fn readable(&self, latest_seq: Seq) -> Seq {
        if self.left_seq > 0 {
            self.left_seq.min(latest_seq)
        } else {
            latest_seq
        }
    }
}

/// A versioned `u64` value (cursors, meta counters): `u8 version, u64 LE`.
pub(crate) fn encode_u64(v: u64) -> [u8; 9] {
    let mut b = [0u8; 9];
    b[0] = RECORD_VERSION;
    b[1..].copy_from_slice(&v.to_le_bytes());
    b
}

pub(crate) fn decode_u64(b: &[u8]) -> Result<u64> {
    check_version(b)?;
    if b.len() != 9 {
        return Err(StorageError::Corrupt("counter record has a wrong length"));
    }
    Ok(u64_at(b, 1))
}

fn check_version(b: &[u8]) -> Result<()> {
    match b.first() {
        None => Err(StorageError::Corrupt("empty record")),
        Some(&RECORD_VERSION) => Ok(()),
        Some(&found) => Err(StorageError::UnknownRecordVersion {
            found,
            supported: RECORD_VERSION,
        }),
    }
}

/// One idempotent append as remembered in the dedup journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JournalEntry {
    pub sender: UserId,
    pub conv: ConversationId,
    pub seq: Seq,
    pub version: u64,
    pub client_msg_id: String,
}

/// Dedup journal value (one per committed batch that had idempotent appends), version 1:
/// `u8 version, u64 server time ms, u32 count, count × (u64 sender, u64 conv, u64 seq,
/// u64 version, u16 id length, id bytes)`.
pub(crate) fn encode_journal_header(time_ms: u64, out: &mut Vec<u8>) {
    out.clear();
    out.push(RECORD_VERSION);
    out.extend_from_slice(&time_ms.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
}

pub(crate) fn push_journal_entry(
    out: &mut Vec<u8>,
    sender: UserId,
    conv: ConversationId,
    seq: Seq,
    version: u64,
    id: &str,
) {
    out.extend_from_slice(&sender.to_le_bytes());
    out.extend_from_slice(&conv.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(id.len() as u16).to_le_bytes());
    out.extend_from_slice(id.as_bytes());
    let n = u32_at(out, 9) + 1;
    out[9..13].copy_from_slice(&n.to_le_bytes());
}

pub(crate) fn decode_journal(b: &[u8]) -> Result<(u64, Vec<JournalEntry>)> {
    check_version(b)?;
    if b.len() < 13 {
        return Err(StorageError::Corrupt(
            "journal record shorter than its header",
        ));
    }
    let time = u64_at(b, 1);
    let n = u32_at(b, 9) as usize;
    let mut at = 13;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        if b.len() < at + 34 {
            return Err(StorageError::Corrupt("journal record truncated"));
        }
        let len = u16_at(b, at + 32) as usize;
        let id_at = at + 34;
        if b.len() < id_at + len {
            return Err(StorageError::Corrupt("journal record truncated"));
        }
        let id = std::str::from_utf8(&b[id_at..id_at + len])
            .map_err(|_| StorageError::Corrupt("journal id is not UTF-8"))?;
        out.push(JournalEntry {
            sender: u64_at(b, at),
            conv: u64_at(b, at + 8),
            seq: u64_at(b, at + 16),
            version: u64_at(b, at + 24),
            client_msg_id: id.to_owned(),
        });
        at = id_at + len;
    }
    Ok((time, out))
}

/// Feeds `b` to every decoder of a stored format and checks what a decoder accepts: decoding
/// never panics, and whatever decodes re-encodes to the same bytes (no two encodings of one
/// value, nothing silently ignored), except for the documented exceptions: a
/// user-conversation record ignores the flag bits it does not define (bits 1-7 of byte 1,
/// bits 3-7 of byte 34), and its 26-, 34- and 51-byte forms re-encode to the 59-byte one with
/// the missing fields 0 (`hidden_seq` of a hidden 51-byte record: `u64::MAX`). Message records
/// of both versions (1, and 2 = recalled) re-encode exactly. Panics on a violation; the fuzz
/// target `record_decoder` calls it with arbitrary input.
pub fn check_decoders(b: &[u8]) {
    if let Ok(r) = decode_record(b) {
        let mut out = Vec::new();
        encode_record(&r, &mut out);
        assert_eq!(out, b, "message record does not re-encode to its bytes");
    }
    if let Ok((time, entries)) = decode_journal(b) {
        let mut out = Vec::new();
        encode_journal_header(time, &mut out);
        for e in &entries {
            push_journal_entry(
                &mut out,
                e.sender,
                e.conv,
                e.seq,
                e.version,
                &e.client_msg_id,
            );
        }
        assert_eq!(
            out,
            &b[..out.len().min(b.len())],
            "journal does not re-encode to its bytes"
        );
    }
    if let Ok(u) = UserConvRecord::decode(b) {
        // The older forms are the current one without their trailing fields, all 0, except
        // that a hidden record without `hidden_seq` stays hidden (u64::MAX).
        let mut expected = b.to_vec();
        expected[1] &= 1;
        if expected.len() >= USER_CONV_LEN_NO_HIDDEN_SEQ {
            expected[34] &= 7;
        }
        let hidden_for_good =
            expected.len() == USER_CONV_LEN_NO_HIDDEN_SEQ && expected[34] & 2 != 0;
        let len = expected.len().max(USER_CONV_LEN_NO_JOINED_SEQ);
        expected.resize(len, if hidden_for_good { 0xFF } else { 0 });
        expected.resize(USER_CONV_LEN, 0);
        assert_eq!(u.encode()[..], expected[..], "user-conversation record");
    }
    if let Ok(v) = decode_u64(b) {
        assert_eq!(encode_u64(v)[..], b[..]);
    }
    if let Ok((x, y)) = split_pair_key(b) {
        assert_eq!(pair_key(x, y)[..], b[..]);
    }
}

// Keys.

/// Messages key: `conv BE ++ seq BE`.
#[cfg(feature = "store")]
pub(crate) fn msg_key(conv: ConversationId, seq: Seq) -> [u8; 16] {
    pair_key(conv, seq)
}

/// Two big-endian u64s.
pub(crate) fn pair_key(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

pub(crate) fn split_pair_key(k: &[u8]) -> Result<(u64, u64)> {
    if k.len() != 16 {
        return Err(StorageError::Corrupt("key has a wrong length"));
    }
    Ok((be_at(k, 0), be_at(k, 8)))
}

/// Relations key: `user BE ++ kind u8 ++ other BE` (17 bytes; the first 9 are the prefix of one
/// user's relations of one kind).
#[cfg(feature = "store")]
pub(crate) fn relation_key(
    user: UserId,
    kind: crate::api::RelationKind,
    other: UserId,
) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[..8].copy_from_slice(&user.to_be_bytes());
    k[8] = kind as u8;
    k[9..].copy_from_slice(&other.to_be_bytes());
    k
}

/// Delivered-cursor key: `user BE ++ conv BE ++ device`.
#[cfg(feature = "store")]
pub(crate) fn cursor_key(user: UserId, conv: ConversationId, device: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + device.len());
    k.extend_from_slice(&pair_key(user, conv));
    k.extend_from_slice(device.as_bytes());
    k
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn be_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {

    /// Found by the `record_decoder` fuzz target: a record claiming a client message id longer
    /// than the limit decoded, and re-encoding it tripped the encoder's length assertion.
    #[test]
    fn record_with_overlong_id_is_corrupt() {
        let mut b = vec![RECORD_VERSION];
        b.extend_from_slice(&[0u8; 28]);
        b.extend_from_slice(&((MAX_CLIENT_MSG_ID_LEN + 1) as u16).to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend(std::iter::repeat_n(b'a', MAX_CLIENT_MSG_ID_LEN + 1));
        assert!(matches!(decode_record(&b), Err(StorageError::Corrupt(_))));
        check_decoders(&b);
    }

    #[test]
    fn check_decoders_accepts_valid_encodings() {
        let mut rec = Vec::new();
        encode_record(
            &MessageRecord {
                version: 7,
                sender: 3,
                timestamp_ms: 1,
                content_type: 2,
                client_msg_id: "m1",
                custom_type: "c",
                payload: b"body",
                recalled: false,
            },
            &mut rec,
        );
        let mut recalled = Vec::new();
        encode_record(
            &MessageRecord {
                version: 8,
                sender: 3,
                timestamp_ms: 1,
                content_type: 2,
                client_msg_id: "m1",
                custom_type: "c",
                payload: b"",
                recalled: true,
            },
            &mut recalled,
        );
        let mut journal = Vec::new();
        encode_journal_header(9, &mut journal);
        push_journal_entry(&mut journal, 1, 2, 3, 4, "id");
        let uc = UserConvRecord {
            active: true,
            member_version: 1,
            read_seq: 2,
            read_version: 3,
            left_seq: 4,
            flags: 5,
            cleared_seq: 6,
            settings_version: 7,
            hidden_seq: 8,
            joined_seq: 9,
        };
        for b in [
            rec,
            recalled,
            journal,
            uc.encode().to_vec(),
            uc.encode()[..USER_CONV_LEN_SHORT].to_vec(),
            uc.encode()[..USER_CONV_LEN_NO_SETTINGS].to_vec(),
            uc.encode()[..USER_CONV_LEN_NO_HIDDEN_SEQ].to_vec(),
            encode_u64(5).to_vec(),
            pair_key(1, 2).to_vec(),
            Vec::new(),
            vec![0xff; 40],
        ] {
            check_decoders(&b);
        }
    }
    use super::*;

    fn sample() -> MessageRecord<'static> {
        MessageRecord {
            version: 42,
            sender: 7,
            timestamp_ms: 1_700_000_000_000,
            content_type: 3,
            client_msg_id: "c-1",
            custom_type: "x.custom",
            payload: b"hello",
            recalled: false,
        }
    }

    #[test]
    fn record_round_trip() {
        let mut buf = Vec::new();
        encode_record(&sample(), &mut buf);
        assert_eq!(buf.len(), HEADER + 3 + 8 + 5);
        assert_eq!(decode_record(&buf).unwrap(), sample());
    }

    #[test]
    fn record_rejects_garbage_without_panicking() {
        let mut buf = Vec::new();
        encode_record(&sample(), &mut buf);
        assert_eq!(
            decode_record(&[]),
            Err(StorageError::Corrupt("empty message record"))
        );
        // Version 2 (recalled) has no payload: one with a payload is damaged.
        let mut v2 = buf.clone();
        v2[0] = RECALLED_RECORD_VERSION;
        assert!(matches!(decode_record(&v2), Err(StorageError::Corrupt(_))));
        check_decoders(&v2);
        let mut v3 = buf.clone();
        v3[0] = 3;
        assert_eq!(
            decode_record(&v3),
            Err(StorageError::UnknownRecordVersion {
                found: 3,
                supported: RECALLED_RECORD_VERSION
            })
        );
        for cut in 0..buf.len() {
            // Every prefix is either an error or (once past the ids) a shorter payload.
            if let Ok(r) = decode_record(&buf[..cut]) {
                assert!(cut >= HEADER + 11);
                assert_eq!(r.client_msg_id, "c-1");
            }
        }
        let mut bad_len = buf.clone();
        bad_len[29] = 0xff;
        assert!(matches!(
            decode_record(&bad_len),
            Err(StorageError::Corrupt(_))
        ));
        let mut bad_utf8 = buf.clone();
        bad_utf8[HEADER] = 0xff;
        assert!(matches!(
            decode_record(&bad_utf8),
            Err(StorageError::Corrupt(_))
        ));
    }

    /// A recalled record is the original's header and ids under version 2, without the
    /// payload; the original (version 1, as written before recall existed) is unchanged.
    #[test]
    fn recalled_record_round_trip() {
        let mut original = Vec::new();
        encode_record(&sample(), &mut original);
        assert_eq!(original[0], RECORD_VERSION);
        assert!(!decode_record(&original).unwrap().recalled);

        let recalled = MessageRecord {
            payload: &[],
            recalled: true,
            ..sample()
        };
        let mut out = Vec::new();
        encode_record(&recalled, &mut out);
        assert_eq!(out[0], RECALLED_RECORD_VERSION);
        assert_eq!(out.len(), original.len() - sample().payload.len());
        assert_eq!(out[1..], original[1..out.len()]);
        let back = decode_record(&out).unwrap();
        assert_eq!(back, recalled);
        assert_eq!(
            (
                back.version,
                back.sender,
                back.timestamp_ms,
                back.content_type
            ),
            (42, 7, 1_700_000_000_000, 3)
        );
        assert_eq!((back.client_msg_id, back.custom_type), ("c-1", "x.custom"));
        check_decoders(&out);
        // Truncated inside the ids it is corrupt, like version 1.
        for cut in 1..out.len() {
            assert!(decode_record(&out[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn user_conv_and_journal_round_trip() {
        let r = UserConvRecord {
            active: true,
            member_version: 5,
            read_seq: 9,
            read_version: 11,
            left_seq: 13,
            flags: 6,
            cleared_seq: 3,
            settings_version: 12,
            hidden_seq: 8,
            joined_seq: 4,
        };
        assert_eq!(r.encode().len(), 67);
        // The form without joined_seq: joined before it was recorded.
        assert_eq!(
            UserConvRecord::decode(&r.encode()[..59]).unwrap(),
            UserConvRecord { joined_seq: 0, ..r }
        );
        assert_eq!(r.last_version(), 12);
        let settings = crate::api::ConversationSettings {
            pinned: false,
            hidden: true,
            muted: true,
            cleared_seq: 3,
        };
        assert_eq!(r.settings(8), settings);
        // A message after the hide shows it again; after leaving (at seq 8), none can.
        let shown = crate::api::ConversationSettings {
            hidden: false,
            ..settings
        };
        assert_eq!(r.settings(9), shown);
        let left = UserConvRecord { left_seq: 8, ..r };
        assert_eq!(left.settings(20), settings);
        // The form without hidden_seq: a hidden record stays hidden, whatever comes.
        let no_hidden_seq = UserConvRecord::decode(&r.encode()[..51]).unwrap();
        assert_eq!(
            no_hidden_seq,
            UserConvRecord {
                hidden_seq: u64::MAX,
                joined_seq: 0,
                ..r
            }
        );
        assert_eq!(no_hidden_seq.settings(1 << 40), settings);
        check_decoders(&r.encode()[..51]);
        check_decoders(&r.encode()[..59]);
        let mut shown_rec = r.encode();
        shown_rec[34] = 1;
        assert_eq!(
            UserConvRecord::decode(&shown_rec[..51]).unwrap().hidden_seq,
            0
        );
        // The form without settings decodes with default settings.
        let no_settings = UserConvRecord::decode(&r.encode()[..34]).unwrap();
        assert_eq!(
            no_settings,
            UserConvRecord {
                flags: 0,
                cleared_seq: 0,
                settings_version: 0,
                hidden_seq: 0,
                joined_seq: 0,
                ..r
            }
        );
        assert_eq!(UserConvRecord::decode(&r.encode()).unwrap(), r);
        assert!(UserConvRecord::decode(&r.encode()[..10]).is_err());
        // Undefined settings flag bits are ignored.
        let mut extra = r.encode();
        extra[34] = 0xf9;
        let decoded = UserConvRecord::decode(&extra).unwrap();
        assert_eq!(decoded.flags, 1);
        assert!(decoded.settings(0).pinned && !decoded.settings(0).muted);
        check_decoders(&extra);
        assert_eq!(decode_u64(&encode_u64(77)).unwrap(), 77);

        let mut j = Vec::new();
        encode_journal_header(1234, &mut j);
        push_journal_entry(&mut j, 1, 2, 3, 4, "a");
        push_journal_entry(&mut j, 5, 6, 7, 8, "bcd");
        let (t, e) = decode_journal(&j).unwrap();
        assert_eq!(t, 1234);
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].client_msg_id, "bcd");
        assert_eq!(
            (e[1].sender, e[1].conv, e[1].seq, e[1].version),
            (5, 6, 7, 8)
        );
        assert!(decode_journal(&j[..j.len() - 1]).is_err());
    }

    /// Records stored before `left_seq` existed (26 bytes) still decode, with `left_seq` 0;
    /// every other length is corrupt.
    #[test]
    fn user_conv_short_form_decodes() {
        let mut old = vec![RECORD_VERSION, 1];
        for v in [5u64, 9, 11] {
            old.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(old.len(), 26);
        let r = UserConvRecord::decode(&old).unwrap();
        assert_eq!(
            r,
            UserConvRecord {
                active: true,
                member_version: 5,
                read_seq: 9,
                read_version: 11,
                left_seq: 0,
                ..UserConvRecord::default()
            }
        );
        assert_eq!(r.encode()[..26], old[..]);
        assert_eq!(r.encode()[26..], [0u8; 41]);
        check_decoders(&old);

        let long = UserConvRecord { left_seq: 7, ..r }.encode();
        for len in (0..=80).filter(|&n| ![26, 34, 51, 59, 67].contains(&n)) {
            let mut b = long.to_vec();
            b.resize(len, 0);
            assert!(
                matches!(UserConvRecord::decode(&b), Err(StorageError::Corrupt(_))),
                "length {len}"
            );
        }
    }
}
