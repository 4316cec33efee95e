//! Feeds arbitrary bytes to the frame decoder in arbitrary chunks.
//!
//! Input layout: the first byte is `n`, the number of split sizes that follow (at most 16); the
//! next `n` bytes are chunk sizes (0 means 1); the rest is the stream. After the sizes run out,
//! the remaining stream is fed in one chunk. The codec limit is small (4 KiB) so oversize
//! prefixes are reached often.
//!
//! Checked: decoding never panics and every error maps to a wire code; the frames decoded and
//! the error that ends the stream do not depend on how it was chunked (compared with feeding it
//! whole); every decoded frame re-encodes to a frame that decodes equal. After an error the
//! decoder stops, as a server closes the connection.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tern_protocol::{Codec, CodecError, Frame};

const MAX: usize = 4096;

/// Decodes `stream` fed in the given chunks; returns the frames and the error that ended it.
fn run(chunks: impl Iterator<Item = usize>, stream: &[u8]) -> (Vec<Frame>, Option<CodecError>) {
    let mut codec = Codec::new(MAX);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut rest = stream;
    let mut chunks = chunks.chain(std::iter::once(usize::MAX));
    while !rest.is_empty() {
        let n = chunks.next().unwrap_or(usize::MAX).min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(err) => {
                    check_error(&err);
                    return (frames, Some(err));
                }
            }
        }
        // The decoder reserves at most one frame's worth beyond what was fed.
        assert!(
            buf.capacity() <= 2 * (MAX + 4 + stream.len()),
            "over-reserved"
        );
    }
    (frames, None)
}

fn check_error(err: &CodecError) {
    // Every error maps to a documented wire code and a sendable Error frame.
    let code = err.code();
    assert_ne!(code, tern_protocol::ErrorCode::Unspecified);
    let frame = err.to_frame();
    assert!(frame.encoded_len() < MAX);
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 17).min(rest.len());
    let (sizes, stream) = rest.split_at(n);

    let chunked = run(sizes.iter().map(|&s| usize::from(s).max(1)), stream);
    let whole = run(std::iter::empty(), stream);
    assert_eq!(chunked, whole, "result depends on chunking");

    // Re-encoding is canonical and can be longer than the input (e.g. a negative enum value
    // sent as a 5-byte varint re-encodes in 10), so it gets the default 1 MiB limit.
    let mut codec = Codec::default();
    for frame in &chunked.0 {
        let mut buf = BytesMut::new();
        codec
            .encode(frame, &mut buf)
            .expect("a decoded frame re-encodes within the limit");
        let again = codec.decode(&mut buf).expect("re-encoded frame decodes");
        assert_eq!(again.as_ref(), Some(frame));
        assert!(buf.is_empty());
    }
});
