//! The generator's side of the wire: pre-encoded `Send` frames patched in place, and a frame
//! scanner that pulls the few fields the hot path needs out of `SendAck` and `Deliver` without
//! allocating. Everything else (HelloOk, Error, SyncNeeded, Kick) is rare and goes through
//! `tern_protocol`'s decoder.

use bytes::{Bytes, BytesMut};
use tern_protocol::{Codec, ContentType, Frame, PREFIX_LEN, Send, Target};

/// Largest frame body the generator accepts from the server.
pub const MAX_FRAME: usize = 1 << 20;

/// `Frame.body` field numbers the scanner distinguishes (tern.proto).
pub const F_SEND_ACK: u32 = 21;
pub const F_DELIVER: u32 = 22;

/// Request ids of Sends are `RID_BASE | seq`: every value in `[2^56, 2^63)` is a 9-byte varint,
/// so the template's request id can be patched in place.
pub const RID_BASE: u64 = 1 << 56;

/// Payload layout of a load message: send time, per-pair sequence, pair index, then filler.
pub const PAYLOAD_HEADER: usize = 20;

/// A malformed frame from the server; the run reports it and stops that connection.
#[derive(Debug)]
pub struct WireError(pub String);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One encoded `Send` frame whose request id, client message id and payload header are
/// overwritten for each message, so sending costs a memcpy and a few stores.
#[derive(Debug, Clone)]
pub struct SendTemplate {
    bytes: Vec<u8>,
    rid_off: usize,
    id_off: usize,
    payload_off: usize,
    pair: u32,
}

impl SendTemplate {
    /// A Send from pair `pair` to user `to`, `payload` bytes long (at least [`PAYLOAD_HEADER`]).
    /// `id_prefix` makes client message ids unique per run and sender.
    pub fn new(pair: u32, id_prefix: &str, to: &str, payload: usize) -> SendTemplate {
        SendTemplate::to_target(pair, id_prefix, Target::user(to), payload, false)
    }

    /// As [`SendTemplate::new`], to any target (a group or a room), `priority` as given.
    pub fn to_target(
        pair: u32,
        id_prefix: &str,
        target: Target,
        payload: usize,
        priority: bool,
    ) -> SendTemplate {
        let payload = payload.max(PAYLOAD_HEADER);
        let placeholder = format!("{id_prefix}-{:016x}", 0u64);
        let frame = Frame::new(
            RID_BASE,
            Send {
                client_msg_id: placeholder.clone(),
                target: Some(target),
                content_type: ContentType::Custom as u32,
                custom_type: "tern-load".into(),
                payload: Bytes::from(vec![b'x'; payload]),
                priority,
            },
        );
        let mut buf = BytesMut::new();
        Codec::new(MAX_FRAME)
            .encode(&frame, &mut buf)
            .expect("a load frame fits the codec limit");
        let bytes = buf.to_vec();
        // prost writes fields in tag order: request_id (tag byte 0x08, then the varint) comes
        // first and the payload, the last field of the last field, ends the frame.
        assert_eq!(bytes[PREFIX_LEN], 0x08, "request_id leads the frame");
        let rid_off = PREFIX_LEN + 1;
        let id_off = find(&bytes, placeholder.as_bytes()).expect("client_msg_id in the template")
            + placeholder.len()
            - 16;
        // `priority` (field 6, two bytes when set) follows the payload.
        let trailer = if priority { 2 } else { 0 };
        SendTemplate {
            payload_off: bytes.len() - payload - trailer,
            bytes,
            rid_off,
            id_off,
            pair,
        }
    }

    /// Appends the frame for message `seq`, stamped `ts_ns`, to `out`.
    pub fn write(&self, out: &mut Vec<u8>, seq: u64, ts_ns: u64) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        let f = &mut out[start..];
        put_varint9(&mut f[self.rid_off..self.rid_off + 9], RID_BASE | seq);
        put_hex16(&mut f[self.id_off..self.id_off + 16], seq);
        let p = &mut f[self.payload_off..self.payload_off + PAYLOAD_HEADER];
        p[0..8].copy_from_slice(&ts_ns.to_le_bytes());
        p[8..16].copy_from_slice(&seq.to_le_bytes());
        p[16..20].copy_from_slice(&self.pair.to_le_bytes());
    }

    /// Bytes of one frame on the wire, prefix included.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// The header of a load message's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub ts_ns: u64,
    pub seq: u64,
    pub pair: u32,
}

impl Stamp {
    pub fn parse(payload: &[u8]) -> Option<Stamp> {
        let h = payload.get(..PAYLOAD_HEADER)?;
        Some(Stamp {
            ts_ns: u64::from_le_bytes(h[0..8].try_into().ok()?),
            seq: u64::from_le_bytes(h[8..16].try_into().ok()?),
            pair: u32::from_le_bytes(h[16..20].try_into().ok()?),
        })
    }
}

/// A histogram of latencies in nanoseconds (now minus a [`Stamp`]'s `ts_ns`), up to an hour.
pub fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("static bounds")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn put_varint9(dst: &mut [u8], mut v: u64) {
    debug_assert!((RID_BASE..1 << 63).contains(&v));
    for b in dst.iter_mut().take(8) {
        *b = (v as u8 & 0x7f) | 0x80;
        v >>= 7;
    }
    dst[8] = v as u8;
}

fn put_hex16(dst: &mut [u8], v: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in dst.iter_mut().enumerate() {
        *b = HEX[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
}

/// What the scanner found in one frame body.
#[derive(Debug, PartialEq, Eq)]
pub enum Scanned<'a> {
    SendAck {
        request_id: u64,
    },
    Deliver {
        conversation_id: u64,
        seq: u64,
        payload: &'a [u8],
    },
    /// Any other body field number (decode it with `tern_protocol::decode_frame`).
    Other(u32),
}

/// Calls `f` with the body of every complete frame at the front of `buf` and returns how many
/// bytes that consumed. A bad length prefix is an error (the stream cannot be resynchronised).
pub fn for_each_frame(
    buf: &[u8],
    mut f: impl FnMut(&[u8]) -> Result<(), WireError>,
) -> Result<usize, WireError> {
    let mut at = 0;
    while let Some(&[a, b, c, d]) = buf.get(at..at + PREFIX_LEN) {
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(WireError(format!("bad frame length {len}")));
        }
        let Some(body) = buf.get(at + PREFIX_LEN..at + PREFIX_LEN + len) else {
            break;
        };
        f(body)?;
        at += PREFIX_LEN + len;
    }
    Ok(at)
}

/// Reads `Frame.request_id` and the body's field number, and for SendAck and Deliver the fields
/// the generator uses.
pub fn scan(body: &[u8]) -> Result<Scanned<'_>, WireError> {
    let mut r = Reader(body);
    let mut request_id = 0;
    while !r.0.is_empty() {
        let (field, wire) = r.key()?;
        match (field, wire) {
            (1, 0) => request_id = r.varint()?,
            (F_SEND_ACK, 2) => {
                r.bytes()?;
                return Ok(Scanned::SendAck { request_id });
            }
            (F_DELIVER, 2) => return scan_deliver(r.bytes()?),
            (f, 2) if (10..500).contains(&f) => return Ok(Scanned::Other(f)),
            (_, w) => r.skip(w)?,
        }
    }
    Ok(Scanned::Other(0))
}

fn scan_deliver(msg: &[u8]) -> Result<Scanned<'_>, WireError> {
    let mut r = Reader(msg);
    let (mut conversation_id, mut seq, mut payload) = (0, 0, &[][..]);
    while !r.0.is_empty() {
        match r.key()? {
            (1, 0) => conversation_id = r.varint()?,
            (2, 0) => seq = r.varint()?,
            (9, 2) => payload = r.bytes()?,
            (_, w) => r.skip(w)?,
        }
    }
    Ok(Scanned::Deliver {
        conversation_id,
        seq,
        payload,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, WireError> {
        let mut v = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                self.0 = &self.0[i + 1..];
                return Ok(v);
            }
        }
        Err(WireError("bad varint".into()))
    }

    fn key(&mut self) -> Result<(u32, u8), WireError> {
        let k = self.varint()?;
        Ok(((k >> 3) as u32, (k & 7) as u8))
    }

    fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let len = self.varint()? as usize;
        if len > self.0.len() {
            return Err(WireError("truncated field".into()));
        }
        let (b, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(b)
    }

    fn skip(&mut self, wire: u8) -> Result<(), WireError> {
        let n = match wire {
            0 => return self.varint().map(drop),
            1 => 8,
            2 => return self.bytes().map(drop),
            5 => 4,
            w => return Err(WireError(format!("unsupported wire type {w}"))),
        };
        if n > self.0.len() {
            return Err(WireError("truncated field".into()));
        }
        self.0 = &self.0[n..];
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::{Body, Deliver, SendAck, decode_frame};

    #[test]
    fn patched_template_decodes_as_the_send_it_claims() {
        let t = SendTemplate::new(7, "run-s7", "run-r7", 64);
        let mut out = Vec::new();
        t.write(&mut out, 0x1234, 99);
        t.write(&mut out, 5, 100);
        assert_eq!(out.len(), 2 * t.len());
        let mut sends = Vec::new();
        let used = for_each_frame(&out, |body| {
            sends.push(decode_frame(Bytes::copy_from_slice(body)).unwrap());
            Ok(())
        })
        .unwrap();
        assert_eq!(used, out.len());
        let Some(Body::Send(s)) = &sends[0].body else {
            panic!("not a Send: {:?}", sends[0]);
        };
        assert_eq!(sends[0].request_id, RID_BASE | 0x1234);
        assert_eq!(s.client_msg_id, "run-s7-0000000000001234");
        assert_eq!(s.target, Some(Target::user("run-r7")));
        assert_eq!(s.payload.len(), 64);
        assert_eq!(
            Stamp::parse(&s.payload),
            Some(Stamp {
                ts_ns: 99,
                seq: 0x1234,
                pair: 7
            })
        );
        assert_eq!(sends[1].request_id, RID_BASE | 5);
    }

    #[test]
    fn scanner_reads_send_ack_and_deliver() {
        let mut codec = Codec::default();
        let ack = Frame::new(
            RID_BASE | 9,
            SendAck {
                client_msg_id: "x".into(),
                conversation_id: 3,
                seq: 4,
                server_time_ms: 5,
                duplicate: false,
            },
        );
        let del = Frame::new(
            0,
            Deliver {
                conversation_id: 77,
                seq: 300,
                sender: "a".into(),
                target: Some(Target::user("a")),
                server_time_ms: 1,
                client_msg_id: "m".into(),
                content_type: 100,
                custom_type: "t".into(),
                payload: Bytes::from_static(b"hello"),
                recalled: false,
            },
        );
        let mut buf = BytesMut::new();
        codec.encode(&ack, &mut buf).unwrap();
        codec.encode(&del, &mut buf).unwrap();
        buf.extend_from_slice(&[0, 0, 0, 9, 1]); // an incomplete frame stays unread
        let mut seen = Vec::new();
        let used = for_each_frame(&buf, |body| {
            seen.push(format!("{:?}", scan(body)?));
            Ok(())
        })
        .unwrap();
        assert_eq!(used, buf.len() - 5);
        assert_eq!(
            seen,
            vec![
                format!(
                    "{:?}",
                    Scanned::SendAck {
                        request_id: RID_BASE | 9
                    }
                ),
                format!(
                    "{:?}",
                    Scanned::Deliver {
                        conversation_id: 77,
                        seq: 300,
                        payload: b"hello"
                    }
                ),
            ]
        );
        assert!(for_each_frame(&[0, 0, 0, 0], |_| Ok(())).is_err());
    }
}
