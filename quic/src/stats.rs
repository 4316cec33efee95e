//! Per-core counters, readable from any thread.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one core's endpoint. Written by that core only (no contention); read by anyone
/// holding the `Arc`, e.g. a metrics exporter or a test on another thread. Increments release
/// and reads acquire, so a reader that sees a datagram counted in one core's `forwarded_in`
/// and then reads the other cores sees it in their `forwarded_out` too.
#[derive(Debug, Default)]
pub struct Stats {
    datagrams_in: AtomicU64,
    bytes_in: AtomicU64,
    datagrams_out: AtomicU64,
    bytes_out: AtomicU64,
    send_errors: AtomicU64,
    forwarded_out: AtomicU64,
    forwarded_in: AtomicU64,
    forward_dropped: AtomicU64,
    inbox_dropped: AtomicU64,
    handshakes: AtomicU64,
    refused: AtomicU64,
    established: AtomicU64,
    open: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Datagrams read from this core's socket.
    pub datagrams_in: u64,
    /// Bytes of those datagrams.
    pub bytes_in: u64,
    /// Datagrams sent from this core's socket.
    pub datagrams_out: u64,
    /// Bytes of those datagrams.
    pub bytes_out: u64,
    /// Sends the socket refused (the datagram is lost; QUIC retransmits).
    pub send_errors: u64,
    /// Datagrams read here for a connection another core owns, counted before they are handed
    /// over (those that could not be are in `forward_dropped` as well).
    pub forwarded_out: u64,
    /// Datagrams another core read and handed to this one.
    pub forwarded_in: u64,
    /// Datagrams for another core dropped because its queue was full or not yet connected.
    pub forward_dropped: u64,
    /// Datagrams dropped because their connection had too many unprocessed ones queued.
    pub inbox_dropped: u64,
    /// Connection attempts this core accepted into the handshake.
    pub handshakes: u64,
    /// Connection attempts refused (listener closed or accept backlog full).
    pub refused: u64,
    /// Connections whose handshake completed (handed to [`Listener::accept`](crate::Listener::accept)).
    pub established: u64,
    /// Connections this core currently drives (handshaking, open or closing).
    pub open: u64,
}

impl Stats {
    /// The current values.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Acquire);
        StatsSnapshot {
            datagrams_in: get(&self.datagrams_in),
            bytes_in: get(&self.bytes_in),
            datagrams_out: get(&self.datagrams_out),
            bytes_out: get(&self.bytes_out),
            send_errors: get(&self.send_errors),
            forwarded_out: get(&self.forwarded_out),
            forwarded_in: get(&self.forwarded_in),
            forward_dropped: get(&self.forward_dropped),
            inbox_dropped: get(&self.inbox_dropped),
            handshakes: get(&self.handshakes),
            refused: get(&self.refused),
            established: get(&self.established),
            open: get(&self.open),
        }
    }

    pub(crate) fn received(&self, bytes: usize) {
        bump(&self.datagrams_in, 1);
        bump(&self.bytes_in, bytes as u64);
    }

    pub(crate) fn sent(&self, bytes: usize) {
        bump(&self.datagrams_out, 1);
        bump(&self.bytes_out, bytes as u64);
    }

    pub(crate) fn send_error(&self) {
        bump(&self.send_errors, 1);
    }

    pub(crate) fn forwarded_out(&self) {
        bump(&self.forwarded_out, 1);
    }

    pub(crate) fn forwarded_in(&self) {
        bump(&self.forwarded_in, 1);
    }

    pub(crate) fn forward_dropped(&self) {
        bump(&self.forward_dropped, 1);
    }

    pub(crate) fn inbox_dropped(&self) {
        bump(&self.inbox_dropped, 1);
    }

    pub(crate) fn handshake(&self) {
        bump(&self.handshakes, 1);
        bump(&self.open, 1);
    }

    pub(crate) fn refused(&self) {
        bump(&self.refused, 1);
    }

    pub(crate) fn established(&self) {
        bump(&self.established, 1);
    }

    pub(crate) fn drained(&self) {
        self.open.fetch_sub(1, Ordering::Release);
    }
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Release);
}
