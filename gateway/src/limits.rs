//! Limits against hostile or broken clients: connection counts (in total and per IP address)
//! and per-connection / per-user rates.
//!
//! Rates use GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp): the
//! state is 8 bytes per limited thing and the rate parameters live once per core, which matters
//! with hundreds of thousands of mostly idle connections. Rate-limiter crates keep a clock and
//! parameters in every limiter.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Nanoseconds since the first call in this process (monotonic).
pub fn mono_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A rate: `per_sec` units per second with bursts of up to `burst` units. `per_sec == 0` means
/// no limit.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    /// Nanoseconds one unit costs (0 = unlimited).
    interval: u64,
    /// How far ahead of now the bucket's time may run: burst × interval.
    tolerance: u64,
}

impl Rate {
    pub fn new(per_sec: u64, burst: u64) -> Rate {
        if per_sec == 0 {
            return Rate {
                interval: 0,
                tolerance: 0,
            };
        }
        let interval = (1_000_000_000 / per_sec).max(1);
        Rate {
            interval,
            tolerance: interval.saturating_mul(burst.max(1)),
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.interval == 0
    }
}

/// One limited thing's state: its theoretical arrival time, in [`mono_nanos`].
#[derive(Debug, Default, Clone, Copy)]
pub struct Gcra {
    tat: u64,
}

impl Gcra {
    /// Takes `n` units if the rate allows it now; otherwise takes nothing and returns false.
    pub fn allow(&mut self, rate: &Rate, now: u64, n: u64) -> bool {
        if rate.is_unlimited() {
            return true;
        }
        let new_tat = self.tat.max(now) + rate.interval.saturating_mul(n);
        if new_tat - now > rate.tolerance {
            return false;
        }
        self.tat = new_tat;
        true
    }

    /// Takes `n` units unconditionally and returns how long to wait before the bucket is back
    /// within its burst (zero if it is). For throttling a stream rather than refusing requests.
    pub fn charge(&mut self, rate: &Rate, now: u64, n: u64) -> Duration {
        if rate.is_unlimited() {
            return Duration::ZERO;
        }
        self.tat = self.tat.max(now) + rate.interval.saturating_mul(n);
        Duration::from_nanos((self.tat - now).saturating_sub(rate.tolerance))
    }
}

/// The per-core copy of the configured rates.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    pub messages: Rate,
    pub user_messages: Rate,
    pub requests: Rate,
    pub read_bytes: Rate,
}

impl Rates {
    pub fn from_config(cfg: &crate::config::Config) -> Rates {
        let burst = |r: u32| 2 * u64::from(r);
        let bytes = cfg.rate_read_bytes_per_sec;
        Rates {
            messages: Rate::new(
                cfg.rate_messages_per_sec.into(),
                burst(cfg.rate_messages_per_sec),
            ),
            user_messages: Rate::new(
                cfg.rate_user_messages_per_sec.into(),
                burst(cfg.rate_user_messages_per_sec),
            ),
            requests: Rate::new(
                cfg.rate_requests_per_sec.into(),
                burst(cfg.rate_requests_per_sec),
            ),
            // Units of 64 bytes keep the interval above a nanosecond for any sane rate; the burst
            // always admits a maximum-size frame.
            read_bytes: Rate::new(
                bytes.div_ceil(64),
                (2 * bytes)
                    .max(u64::from(cfg.max_frame_bytes) + 4)
                    .div_ceil(64),
            ),
        }
    }
}

/// Connection counts shared by every core.
#[derive(Debug)]
pub struct ConnLimits {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Total(usize),
    PerIp(usize),
}

impl Refused {
    pub fn message(&self) -> String {
        match self {
            Refused::Total(n) => format!("the server has its maximum of {n} connections"),
            Refused::PerIp(n) => format!("this IP address has its maximum of {n} connections"),
        }
    }
}

impl ConnLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a new connection from `ip`, or says which limit it would break.
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<ConnSlot, Refused> {
        if self.total.fetch_add(1, Ordering::Relaxed) >= self.max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Total(self.max_total));
        }
        let ip = match ip {
            Some(ip) if self.max_per_ip != 0 => {
                let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
                let n = map.entry(ip).or_insert(0);
                if *n >= self.max_per_ip {
                    drop(map);
                    self.total.fetch_sub(1, Ordering::Relaxed);
                    return Err(Refused::PerIp(self.max_per_ip));
                }
                *n += 1;
                Some(ip)
            }
            _ => None,
        };
        Ok(ConnSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections counted now.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

/// A counted connection; dropping it releases the count. It moves with the connection when the
/// connection changes core.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    ip: Option<IpAddr>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut map = self.limits.per_ip.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
        self.limits.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A user's message rate, shared by all of the user's connections on its core. A message is
/// charged once: the same `client_msg_id` seen again shortly after (the copy a dual-channel
/// client sends on its other path, or a retry) is not charged again.
#[derive(Debug, Default)]
pub struct UserSends {
    gcra: Gcra,
    /// Hashes of the last client message ids charged.
    recent: [u64; 16],
    next: usize,
}

impl UserSends {
    /// Charges one message with id `client_msg_id` if it was not charged just before; false if
    /// the rate does not allow it.
    pub fn allow(&mut self, rate: &Rate, now: u64, client_msg_id: &str) -> bool {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        if rate.is_unlimited() {
            return true;
        }
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(client_msg_id) | 1;
        if self.recent.contains(&h) {
            return true;
        }
        if !self.gcra.allow(rate, now, 1) {
            return false;
        }
        self.recent[self.next] = h;
        self.next = (self.next + 1) % self.recent.len();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn gcra_allows_burst_then_rate() {
        let rate = Rate::new(10, 20);
        let mut g = Gcra::default();
        let t0 = 5 * SEC;
        let allowed = (0..100).filter(|_| g.allow(&rate, t0, 1)).count();
        assert_eq!(allowed, 20);
        // Half a second later, five more (10/s).
        let allowed = (0..100).filter(|_| g.allow(&rate, t0 + SEC / 2, 1)).count();
        assert_eq!(allowed, 5);
        // After a long pause, the full burst again, never more.
        let allowed = (0..100)
            .filter(|_| g.allow(&rate, t0 + 100 * SEC, 1))
            .count();
        assert_eq!(allowed, 20);
    }

    #[test]
    fn unlimited_rate_allows_everything() {
        let rate = Rate::new(0, 0);
        let mut g = Gcra::default();
        assert!((0..10_000).all(|_| g.allow(&rate, 1, 1)));
        assert_eq!(g.charge(&rate, 1, u64::MAX), Duration::ZERO);
    }

    #[test]
    fn charge_returns_wait_beyond_burst() {
        let rate = Rate::new(100, 100); // 10 ms per unit, burst 1 s
        let mut g = Gcra::default();
        let t0 = SEC;
        assert_eq!(g.charge(&rate, t0, 100), Duration::ZERO);
        assert_eq!(g.charge(&rate, t0, 50), Duration::from_millis(500));
        // Waiting that long brings it back within the burst.
        assert_eq!(g.charge(&rate, t0 + SEC / 2, 0), Duration::ZERO);
    }

    #[test]
    fn connection_limits_count_and_release() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let limits = ConnLimits::new(3, 2);
        let s1 = limits.admit(Some(a)).unwrap();
        let _s2 = limits.admit(Some(a)).unwrap();
        assert_eq!(limits.admit(Some(a)).unwrap_err(), Refused::PerIp(2));
        let _s3 = limits.admit(Some(b)).unwrap();
        assert_eq!(limits.admit(Some(b)).unwrap_err(), Refused::Total(3));
        assert_eq!(limits.total(), 3);
        drop(s1);
        assert_eq!(limits.total(), 2);
        let _s4 = limits.admit(Some(a)).unwrap();
        assert_eq!(limits.admit(Some(a)).unwrap_err(), Refused::Total(3));
    }

    #[test]
    fn a_users_message_is_charged_once_however_many_paths_carry_it() {
        let rate = Rate::new(1, 2);
        let mut user = UserSends::default();
        let now = 1_000_000_000;
        // The burst is 2 messages: m1 on both paths, m2 on both paths, then m3 is refused.
        for id in ["m1", "m1", "m2", "m2"] {
            assert!(user.allow(&rate, now, id), "{id}");
        }
        assert!(!user.allow(&rate, now, "m3"));
        // A second later there is room for one more.
        assert!(user.allow(&rate, now + 1_000_000_000, "m3"));
        assert!(user.allow(&rate, now + 1_000_000_000, "m3"));
    }
}
