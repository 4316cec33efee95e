//! Compiles `proto/tern.proto` with protox (a pure-Rust protobuf compiler, so no `protoc` is
//! needed) and generates prost types into `OUT_DIR/tern.v1.rs`.

use std::io;

fn main() -> io::Result<()> {
    const PROTO: &str = "proto/tern.proto";
    println!("cargo:rerun-if-changed={PROTO}");

    let fds = protox::compile([PROTO], ["proto"]).map_err(io::Error::other)?;

    let mut config = prost_build::Config::new();
    // Every `bytes` field becomes `bytes::Bytes`, so decoding from a `Bytes` buffer slices the
    // payload out of it instead of copying.
    config.bytes(["."]);
    config.compile_fds(fds)
}
