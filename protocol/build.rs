//! Compiles `proto/tern.proto` with protox (a pure-Rust protobuf compiler, so no `protoc` is
//! needed) and generates prost types into `OUT_DIR/tern.v1.rs` and their JSON (serde)
//! implementations into `OUT_DIR/tern.v1.serde.rs`.

use std::io;

fn main() -> io::Result<()> {
    const PROTO: &str = "proto/tern.proto";
    println!("cargo:rerun-if-changed={PROTO}");

    let fds = protox::compile([PROTO], ["proto"]).map_err(io::Error::other)?;

    let mut config = prost_build::Config::new();
    // Every `bytes` field becomes `bytes::Bytes`, so decoding from a `Bytes` buffer slices the
    // payload out of it instead of copying.
    config.bytes(["."]);
    // Large optional messages inside Frame's oneof are boxed, so a Frame (and every enum that
    // holds one) stays small: the largest body sizes every frame.
    config.boxed(".tern.v1.GroupResponse.info");
    config.boxed(".tern.v1.CreateGroup.profile");
    config.boxed(".tern.v1.UpdateGroup.profile");
    // Descriptor bytes for pbjson: serde impls with protobuf's canonical JSON mapping, used by
    // the gateway's HTTP API (a client request in JSON is the same message as on the wire).
    let descriptors = prost::Message::encode_to_vec(&fds);
    config.compile_fds(fds)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors)?
        .build(&[".tern.v1"])
        .map_err(io::Error::other)
}
