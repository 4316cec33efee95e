//! Feeds arbitrary bytes to the JSON reader of the admin API's client-request endpoints
//! (`POST /v1/users/{user}/request`, `POST /v1/system/request`, `POST /v1/groups`): the
//! protocol's canonical JSON mapping of a `Frame` and of a `GroupRequest`, the same code the
//! gateway runs on those bodies.
//!
//! Checked: reading never panics; whatever is accepted writes back to JSON that reads back
//! equal, and encodes to protobuf that decodes equal (so what the API accepted is exactly what
//! the cores run).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tern_protocol::{Frame, GroupRequest};

fn round_trip<T>(data: &[u8])
where
    T: serde::Serialize
        + serde::de::DeserializeOwned
        + Message
        + Default
        + PartialEq
        + std::fmt::Debug,
{
    let Ok(value) = serde_json::from_slice::<T>(data) else {
        return;
    };
    let json = serde_json::to_vec(&value).expect("an accepted body writes back to JSON");
    let again: T = serde_json::from_slice(&json).expect("its own JSON reads back");
    assert_eq!(value, again, "JSON round trip changed the value");
    let wire = value.encode_to_vec();
    let decoded = T::decode(&wire[..]).expect("its protobuf decodes");
    assert_eq!(value, decoded, "protobuf round trip changed the value");
}

fuzz_target!(|data: &[u8]| {
    round_trip::<Frame>(data);
    round_trip::<GroupRequest>(data);
});
