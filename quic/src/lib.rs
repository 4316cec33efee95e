//! QUIC transport for Tern.
//!
//! This crate will drive quinn-proto's `Endpoint` and `Connection` state machines on glommio,
//! one endpoint per core, and yield connections and byte streams to the gateway. It knows
//! nothing about chat. It is empty until the QUIC transport lands.
#![forbid(unsafe_code)]
