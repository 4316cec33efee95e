//! Feeds arbitrary bytes to every decoder of a stored value format (message records, the
//! idempotency journal, user-conversation state, counters, keys): a damaged or hostile data
//! directory must give errors, never panics, and whatever a decoder accepts must re-encode to the
//! same bytes. The checks live in `tern_storage::fuzzing::check_decoders`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tern_storage::fuzzing::check_decoders(data);
});
