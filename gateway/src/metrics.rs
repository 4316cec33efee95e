//! Counters and histograms for Prometheus, written by the cores without locks and read by the
//! API thread's `/metrics` endpoint.
//!
//! Each core writes only its own [`CoreMetrics`] (relaxed atomics on a cache line of their own,
//! so cores never contend); the scrape sums nothing and exports one series per core. The text
//! exposition format is simple enough that a registry crate would add only indirection: the
//! histograms here are fixed-bucket atomics, which a registry would put behind a lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use tern_protocol::ErrorCode;

/// Upper bounds (µs) of the latency histograms' buckets.
const BUCKETS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe_us(&self, us: u64) {
        if let Some(i) = BUCKETS_US.iter().position(|&b| us <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }
}

/// The error codes counted (index = position).
const CODES: [ErrorCode; 26] = [
    ErrorCode::BadFrame,
    ErrorCode::FrameTooLarge,
    ErrorCode::UnsupportedVersion,
    ErrorCode::UnknownMessage,
    ErrorCode::UnexpectedMessage,
    ErrorCode::Unauthenticated,
    ErrorCode::TokenInvalid,
    ErrorCode::TokenExpired,
    ErrorCode::TokenRevoked,
    ErrorCode::AlreadyAuthenticated,
    ErrorCode::LoginTimeout,
    ErrorCode::SessionNotFound,
    ErrorCode::InvalidArgument,
    ErrorCode::PayloadTooLarge,
    ErrorCode::NotFound,
    ErrorCode::Conflict,
    ErrorCode::RateLimited,
    ErrorCode::LimitExceeded,
    ErrorCode::Forbidden,
    ErrorCode::Blocked,
    ErrorCode::Muted,
    ErrorCode::NotMember,
    ErrorCode::TooManyDevices,
    ErrorCode::ConnectionLimit,
    ErrorCode::Internal,
    ErrorCode::Unavailable,
];

/// One core's counters.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CoreMetrics {
    /// Successful logins (HelloOk sent).
    pub logins: AtomicU64,
    /// Messages accepted for sending (1:1, group, room), counted when they leave the session.
    pub messages_in: AtomicU64,
    /// Deliveries queued to connections (one per device and message).
    pub deliveries_out: AtomicU64,
    /// Room messages queued to viewers of a big room, written at the room's next batch flush
    /// (also counted in `deliveries_out`).
    pub room_deliveries_batched: AtomicU64,
    /// Offline-notification jobs dropped because the side thread's queue was full.
    pub offline_dropped: AtomicU64,
    /// Connections parked right now (`park.rs`).
    parked: AtomicI64,
    /// Messages this core put on its queue to each core (index: the receiving core).
    pub mesh_sent: Vec<AtomicU64>,
    /// Messages this core took off the queue from each core (index: the sending core).
    pub mesh_received: Vec<AtomicU64>,
    /// Time from a Send's arrival to its SendAck being ready on the conversation's owner core.
    pub send_ack: Histogram,
    /// Time from handing an append to the store to its completion (group commit included).
    pub storage_append: Histogram,
    /// Error frames sent to clients, by code (see `CODES`), plus everything else in the last.
    errors: [AtomicU64; CODES.len() + 1],
}

impl CoreMetrics {
    pub fn error(&self, code: ErrorCode) {
        let i = CODES.iter().position(|c| *c == code).unwrap_or(CODES.len());
        self.errors[i].fetch_add(1, Relaxed);
    }

    /// A connection parked (`+1`) or came back (`-1`).
    pub fn parked(&self, delta: i64) {
        self.parked.fetch_add(delta, Relaxed);
    }

    pub fn errors(&self, code: ErrorCode) -> u64 {
        let i = CODES.iter().position(|c| *c == code).unwrap_or(CODES.len());
        self.errors[i].load(Relaxed)
    }
}

/// Every core's metrics, shared by the cores and the API thread.
#[derive(Debug)]
pub struct Metrics {
    pub cores: Vec<CoreMetrics>,
}

impl Metrics {
    pub fn new(cores: usize) -> Metrics {
        let per_core = || (0..cores).map(|_| AtomicU64::new(0)).collect::<Vec<_>>();
        Metrics {
            cores: (0..cores)
                .map(|_| CoreMetrics {
                    mesh_sent: per_core(),
                    mesh_received: per_core(),
                    ..CoreMetrics::default()
                })
                .collect(),
        }
    }

    /// The Prometheus text exposition of these metrics, followed by `extra` (gauges and
    /// counters the caller gathered elsewhere, already in the text format).
    pub fn render(&self, extra: &str) -> String {
        let mut out = String::with_capacity(8192);
        let counter =
            |out: &mut String, name: &str, help: &str, f: &dyn Fn(&CoreMetrics) -> u64| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for (i, c) in self.cores.iter().enumerate() {
                    let _ = writeln!(out, "{name}{{core=\"{i}\"}} {}", f(c));
                }
            };
        counter(&mut out, "tern_logins_total", "Successful logins.", &|c| {
            c.logins.load(Relaxed)
        });
        counter(
            &mut out,
            "tern_messages_in_total",
            "Messages accepted from clients and the API for sending.",
            &|c| c.messages_in.load(Relaxed),
        );
        counter(
            &mut out,
            "tern_deliveries_out_total",
            "Messages queued to connections (one per device).",
            &|c| c.deliveries_out.load(Relaxed),
        );
        counter(
            &mut out,
            "tern_room_deliveries_batched_total",
            "Room messages queued to viewers of a big room and written at its next batch flush.",
            &|c| c.room_deliveries_batched.load(Relaxed),
        );
        counter(
            &mut out,
            "tern_offline_jobs_dropped_total",
            "Messages for offline users not passed to the push providers (queue full).",
            &|c| c.offline_dropped.load(Relaxed),
        );
        let name = "tern_parked_connections";
        let _ = writeln!(
            out,
            "# HELP {name} Idle connections parked (no tasks, socket in the shared epoll set).\n# TYPE {name} gauge"
        );
        for (i, c) in self.cores.iter().enumerate() {
            let _ = writeln!(out, "{name}{{core=\"{i}\"}} {}", c.parked.load(Relaxed));
        }
        let name = "tern_errors_total";
        let _ = writeln!(
            out,
            "# HELP {name} Error frames sent, by wire error code.\n# TYPE {name} counter"
        );
        for (i, c) in self.cores.iter().enumerate() {
            for (j, code) in CODES.iter().enumerate() {
                let n = c.errors[j].load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "{name}{{core=\"{i}\",code=\"{}\"}} {n}",
                        code.as_str_name()
                    );
                }
            }
            let other = c.errors[CODES.len()].load(Relaxed);
            if other > 0 {
                let _ = writeln!(out, "{name}{{core=\"{i}\",code=\"OTHER\"}} {other}");
            }
        }
        self.histogram(
            &mut out,
            "tern_send_ack_seconds",
            "Time from a Send's arrival to its SendAck (on the conversation's owner core).",
            |c| &c.send_ack,
        );
        self.histogram(
            &mut out,
            "tern_storage_append_seconds",
            "Time from handing an append to the store to its completion (group commit).",
            |c| &c.storage_append,
        );
        let name = "tern_mesh_queue_depth";
        let _ = writeln!(
            out,
            "# HELP {name} Messages waiting on the queue from one core to another.\n# TYPE {name} gauge"
        );
        for (from, c) in self.cores.iter().enumerate() {
            for (to, sent) in c.mesh_sent.iter().enumerate() {
                if from == to {
                    continue;
                }
                let taken = self.cores[to]
                    .mesh_received
                    .get(from)
                    .map_or(0, |r| r.load(Relaxed));
                let depth = sent.load(Relaxed).saturating_sub(taken);
                let _ = writeln!(out, "{name}{{from=\"{from}\",to=\"{to}\"}} {depth}");
            }
        }
        out.push_str(extra);
        out
    }

    fn histogram(
        &self,
        out: &mut String,
        name: &str,
        help: &str,
        get: impl Fn(&CoreMetrics) -> &Histogram,
    ) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, c) in self.cores.iter().enumerate() {
            let h = get(c);
            let mut cumulative = 0;
            for (b, n) in BUCKETS_US.iter().zip(&h.buckets) {
                cumulative += n.load(Relaxed);
                let le = *b as f64 / 1e6;
                let _ = writeln!(
                    out,
                    "{name}_bucket{{core=\"{i}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let count = h.count.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{core=\"{i}\",le=\"+Inf\"}} {count}");
            let sum = h.sum_us.load(Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "{name}_sum{{core=\"{i}\"}} {sum}");
            let _ = writeln!(out, "{name}_count{{core=\"{i}\"}} {count}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_exact() {
        let m = Metrics::new(2);
        for us in [50, 100, 101, 3_000, 10_000_000] {
            m.cores[1].send_ack.observe_us(us);
        }
        m.cores[0].error(ErrorCode::RateLimited);
        m.cores[0].error(ErrorCode::Unspecified);
        let text = m.render("");
        assert!(text.contains("tern_send_ack_seconds_bucket{core=\"1\",le=\"0.0001\"} 2\n"));
        assert!(text.contains("tern_send_ack_seconds_bucket{core=\"1\",le=\"0.00025\"} 3\n"));
        assert!(text.contains("tern_send_ack_seconds_bucket{core=\"1\",le=\"0.005\"} 4\n"));
        assert!(text.contains("tern_send_ack_seconds_bucket{core=\"1\",le=\"5\"} 4\n"));
        assert!(text.contains("tern_send_ack_seconds_bucket{core=\"1\",le=\"+Inf\"} 5\n"));
        assert!(text.contains("tern_send_ack_seconds_count{core=\"1\"} 5\n"));
        assert!(text.contains("tern_send_ack_seconds_count{core=\"0\"} 0\n"));
        assert!(text.contains("tern_errors_total{core=\"0\",code=\"RATE_LIMITED\"} 1\n"));
        assert!(text.contains("tern_errors_total{core=\"0\",code=\"OTHER\"} 1\n"));
        assert_eq!(m.cores[0].errors(ErrorCode::RateLimited), 1);
    }

    #[test]
    fn mesh_queue_depth_is_sent_minus_taken_per_pair() {
        let m = Metrics::new(2);
        m.cores[0].mesh_sent[1].fetch_add(5, Relaxed);
        m.cores[1].mesh_received[0].fetch_add(3, Relaxed);
        m.cores[1].mesh_sent[0].fetch_add(2, Relaxed);
        m.cores[0].mesh_received[1].fetch_add(2, Relaxed);
        let text = m.render("");
        assert!(text.contains("tern_mesh_queue_depth{from=\"0\",to=\"1\"} 2\n"));
        assert!(text.contains("tern_mesh_queue_depth{from=\"1\",to=\"0\"} 0\n"));
        assert!(!text.contains("from=\"0\",to=\"0\""));
    }
}
