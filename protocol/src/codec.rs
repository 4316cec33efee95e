//! Length-prefixed framing: a 4-byte big-endian body length, then one protobuf-encoded
//! [`Frame`].
//!
//! The codec is sans-IO: the caller reads from its socket into a reused [`BytesMut`] and calls
//! [`Codec::decode`] until it returns `Ok(None)`; to send, it calls [`Codec::encode`] into its
//! write buffer and writes that buffer out.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::{CodecError, Frame};

/// Default maximum size of a frame body: 1 MiB.
pub const MAX_FRAME_DEFAULT: usize = 1_048_576;

/// Size of the length prefix in bytes.
pub const PREFIX_LEN: usize = 4;

/// Frame encoder and decoder.
///
/// `max_frame_bytes` bounds the body length (the prefix not included) in both directions. It is
/// checked against the length prefix before any memory is reserved for the frame, so a peer
/// cannot make the decoder allocate more than `max_frame_bytes + 4` bytes per read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    /// Largest accepted body length in bytes. Values above `u32::MAX` act as `u32::MAX`.
    pub max_frame_bytes: usize,
}

impl Default for Codec {
    fn default() -> Self {
        Self::new(MAX_FRAME_DEFAULT)
    }
}

impl Codec {
    /// A codec accepting bodies of up to `max_frame_bytes` bytes.
    pub const fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes }
    }

    fn limit(&self) -> usize {
        // The prefix cannot express more, whatever the configuration says.
        self.max_frame_bytes.min(u32::MAX as usize)
    }

    /// Decodes the next frame from the front of `buf`.
    ///
    /// Returns `Ok(None)` if `buf` does not yet hold a whole frame; the bytes stay in `buf` and
    /// enough capacity is reserved for the rest of the frame (never more than the limit). On
    /// success the frame's bytes are removed from `buf`, and any following bytes stay. `bytes`
    /// fields of the returned frame (payloads) point into `buf`'s allocation: no copy.
    ///
    /// See [`CodecError`] for what is left in `buf` after an error.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        match self.decode_raw(buf)? {
            Some(body) => decode_frame(body).map(Some),
            None => Ok(None),
        }
    }

    /// Like [`Codec::decode`], but returns the frame's body (the encoded `Frame`, without the
    /// prefix) instead of decoding it. Decode it later with [`decode_frame`].
    pub fn decode_raw(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, CodecError> {
        let Some(&[a, b, c, d]) = buf.get(..PREFIX_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len > self.limit() {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.limit(),
            });
        }
        if len == 0 {
            buf.advance(PREFIX_LEN);
            return Err(CodecError::EmptyFrame);
        }
        let total = PREFIX_LEN + len;
        if buf.len() < total {
            // Only now, with the length known to be acceptable, make room for the rest so the
            // caller's next read can complete the frame.
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut frame = buf.split_to(total);
        frame.advance(PREFIX_LEN);
        Ok(Some(frame.freeze()))
    }

    /// Appends `frame` to `buf`: the 4-byte length, then the encoded frame. Reserves once.
    ///
    /// Fails with [`CodecError::FrameTooLarge`], leaving `buf` unchanged, if the encoded frame
    /// exceeds the limit.
    pub fn encode(&mut self, frame: &Frame, buf: &mut BytesMut) -> Result<(), CodecError> {
        let len = frame.encoded_len();
        if len > self.limit() {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.limit(),
            });
        }
        buf.reserve(PREFIX_LEN + len);
        // `len <= limit() <= u32::MAX`, so the cast is lossless.
        buf.put_u32(len as u32);
        let encoded = frame.encode(buf);
        // `BytesMut` grows on demand (`remaining_mut` is `usize::MAX - len`), so prost's
        // capacity check cannot fail.
        debug_assert!(encoded.is_ok(), "encoding into BytesMut cannot fail");
        Ok(())
    }

    /// Encodes `frame` (prefix included) into a new buffer of exactly the right size.
    pub fn encode_to_bytes(&mut self, frame: &Frame) -> Result<Bytes, CodecError> {
        let mut buf = BytesMut::new();
        self.encode(frame, &mut buf)?;
        Ok(buf.freeze())
    }
}

/// Decodes a frame body (without the length prefix), as returned by [`Codec::decode_raw`].
///
/// `bytes` fields of the result point into `body`.
pub fn decode_frame(body: Bytes) -> Result<Frame, CodecError> {
    let frame = Frame::decode(body)?;
    if frame.body.is_none() {
        return Err(CodecError::MissingBody {
            request_id: frame.request_id,
        });
    }
    Ok(frame)
}
