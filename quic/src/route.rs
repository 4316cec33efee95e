//! Which core owns a datagram: connection IDs that name their core, and the header peek that
//! reads the name back. No I/O.
//!
//! Every connection ID this server issues is [`CID_LEN`] bytes: the index of the core whose
//! endpoint owns the connection, then random bytes. A peer addresses every packet after the
//! handshake's first flight to one of those IDs, so the first byte of the destination
//! connection ID says which core must handle it, whatever port the kernel's SO_REUSEPORT hash
//! delivered it to.

use std::time::Duration;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use rand::RngCore;

/// Length of the connection IDs this server issues.
pub const CID_LEN: usize = 8;

/// Issues connection IDs whose first byte is the owning core's index.
///
/// The index is visible to on-path observers. It tells them which core serves a connection,
/// nothing about the connection itself; the other seven bytes are random, so IDs of one
/// connection cannot be linked to each other beyond "same core".
#[derive(Debug, Clone, Copy)]
pub struct CoreCidGenerator {
    core: u8,
}

impl CoreCidGenerator {
    /// A generator for the endpoint of core `core`.
    pub fn new(core: u8) -> Self {
        Self { core }
    }
}

impl ConnectionIdGenerator for CoreCidGenerator {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        bytes[0] = self.core;
        rand::rng().fill_bytes(&mut bytes[1..]);
        ConnectionId::new(&bytes)
    }

    /// Only IDs naming this core can belong to this endpoint. quinn-proto drops a short-header
    /// packet with an invalid ID instead of answering it with a stateless reset, so a packet
    /// that reached the wrong core cannot reset a live connection owned by another.
    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        if cid.len() == CID_LEN && cid[0] == self.core {
            Ok(())
        } else {
            Err(InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The core named by the destination connection ID of `datagram`, if the packet must go to the
/// endpoint that issued that ID; `None` if any core may handle it (the receiving core does).
///
/// Routed: short-header packets, and long-header Handshake packets of QUIC versions quinn-proto
/// speaks, whose destination ID has our length. Not routed: Initial and 0-RTT packets (their
/// destination ID is chosen by the client, and they open connections on the core that receives
/// them; the kernel sends all of a handshake's packets from one address to one core), Retry and
/// Version Negotiation, unknown versions, and anything too short to parse.
pub fn owner_core(datagram: &[u8]) -> Option<u8> {
    let first = *datagram.first()?;
    if first & 0x80 == 0 {
        // Short header: flags, then the destination ID with no length byte.
        return datagram.get(1..1 + CID_LEN).map(|cid| cid[0]);
    }
    let version = u32::from_be_bytes(datagram.get(1..5)?.try_into().ok()?);
    if !quinn_proto::DEFAULT_SUPPORTED_VERSIONS.contains(&version) {
        return None;
    }
    // Long packet types of QUIC v1 and its drafts: 0 Initial, 1 0-RTT, 2 Handshake, 3 Retry.
    if (first >> 4) & 0x03 != 2 {
        return None;
    }
    let dcid_len = usize::from(*datagram.get(5)?);
    if dcid_len != CID_LEN {
        return None;
    }
    datagram.get(6..6 + CID_LEN).map(|cid| cid[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_name_their_core_and_validate_only_there() {
        let mut gen3 = CoreCidGenerator::new(3);
        let gen4 = CoreCidGenerator::new(4);
        let a = gen3.generate_cid();
        let b = gen3.generate_cid();
        assert_eq!(a.len(), CID_LEN);
        assert_eq!(a[0], 3);
        assert_ne!(a, b, "random tail");
        assert!(gen3.validate(&a).is_ok());
        assert!(gen4.validate(&a).is_err());
        assert!(gen3.validate(&ConnectionId::new(&[3; 4])).is_err());
    }

    fn long(first: u8, version: u32, dcid: &[u8]) -> Vec<u8> {
        let mut d = vec![first];
        d.extend_from_slice(&version.to_be_bytes());
        d.push(dcid.len() as u8);
        d.extend_from_slice(dcid);
        d.extend_from_slice(&[0; 40]);
        d
    }

    #[test]
    fn header_peek() {
        let cid = [5, 1, 2, 3, 4, 5, 6, 7];
        // Short header.
        let mut short = vec![0x40];
        short.extend_from_slice(&cid);
        short.extend_from_slice(&[0; 20]);
        assert_eq!(owner_core(&short), Some(5));
        assert_eq!(owner_core(&short[..5]), None, "truncated");
        // Handshake (type 2) is routed.
        assert_eq!(owner_core(&long(0xe0, 1, &cid)), Some(5));
        // Initial, 0-RTT and Retry are not.
        assert_eq!(owner_core(&long(0xc0, 1, &cid)), None);
        assert_eq!(owner_core(&long(0xd0, 1, &cid)), None);
        assert_eq!(owner_core(&long(0xf0, 1, &cid)), None);
        // Other lengths (client-chosen IDs), unknown versions, version negotiation.
        assert_eq!(owner_core(&long(0xe0, 1, &cid[..5])), None);
        assert_eq!(owner_core(&long(0xe0, 0x0a1a_2a3a, &cid)), None);
        assert_eq!(owner_core(&long(0xe0, 0, &cid)), None);
        assert_eq!(owner_core(&[]), None);
        assert_eq!(owner_core(&[0xe0, 0, 0]), None);
    }
}
