//! Reconnect delays: exponential backoff with full jitter.
//!
//! Attempt `n` (from 0) waits a uniformly random time in `[0, min(max, initial * 2^n)]`. Full
//! jitter spreads the reconnects of many clients dropped at once (a gateway restart) instead of
//! having them all return in lockstep.

use std::time::Duration;

use rand::Rng;

/// Backoff settings. The defaults: 100 ms doubling to 10 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Upper bound of the first delay.
    pub initial: Duration,
    /// Upper bound of every delay.
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// The delay schedule of one reconnecting client.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    /// A schedule at its first attempt.
    pub fn new(config: BackoffConfig) -> Self {
        Self { config, attempt: 0 }
    }

    /// The upper bound of the delay before the next attempt.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.config
            .initial
            .saturating_mul(factor)
            .min(self.config.max)
    }

    /// The delay before the next attempt; moves the schedule on.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::rng())
    }

    /// [`Backoff::next_delay`] with a given random source.
    pub fn next_delay_with(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// Back to the first attempt, after a successful login.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts made since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_maximum() {
        let mut b = Backoff::new(BackoffConfig::default());
        let ms: Vec<u128> = (0..10)
            .map(|_| {
                let c = b.ceiling().as_millis();
                b.next_delay();
                c
            })
            .collect();
        assert_eq!(
            ms,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
    }

    #[test]
    fn delays_stay_within_bounds_and_spread() {
        let config = BackoffConfig::default();
        let mut b = Backoff::new(config);
        for _ in 0..100 {
            b.next_delay();
        }
        let delays: Vec<Duration> = (0..1000).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= config.max));
        assert!(
            delays.iter().any(|d| *d < config.max / 2),
            "full jitter spreads delays below half the cap"
        );
        assert!(delays.iter().any(|d| *d > config.max / 2));
    }

    #[test]
    fn first_delay_is_at_most_initial_and_reset_starts_over() {
        let mut b = Backoff::new(BackoffConfig::default());
        for _ in 0..1000 {
            b.reset();
            assert!(b.next_delay() <= Duration::from_millis(100));
        }
        for _ in 0..64 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(10), "no overflow");
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }
}
