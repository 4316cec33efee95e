//! QUIC datagrams into the endpoints of two cores: a client's handshake and first packets,
//! dropped, damaged, truncated, replaced by arbitrary bytes or delivered to the wrong core as the
//! fuzz input decides, each routed by connection id as the per-core driver routes it. The
//! checks live in `tern_quic::fuzzing::mutated_handshake`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tern_quic::fuzzing::mutated_handshake(data);
});
