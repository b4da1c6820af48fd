//! Exponential backoff with jitter, shared by the live-source supervisor and the MQTT
//! publisher.
//!
//! Whatever is retried — a camera that dropped off the network, a broker that restarted — the
//! first retry should come quickly and later ones ever more slowly, up to a cap, and many
//! retriers that failed together (twenty cameras behind one switch, a fleet of boxes on one
//! broker) should not all come back in the same millisecond. So the delay grows from `initial`
//! by `multiplier` up to `max`, each delay is spread by ± `jitter` (never above `max`), and the
//! growth starts over after a success. Plain arithmetic with a seeded generator, so tests pin
//! exact sequences.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::model::prng::Rng;

/// Retry delays of one thing being retried.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial_ms: f64,
    max_ms: f64,
    multiplier: f64,
    jitter: f64,
    /// The delay before jitter for the next failure, milliseconds.
    next_ms: f64,
    /// Failures since the last success.
    attempt: u32,
    rng: Rng,
}

impl Backoff {
    /// Delays from `initial` growing by `multiplier` (at least 1) to `max`, spread by
    /// ± `jitter` (a fraction, clamped to [0, 0.99]) drawn from a generator seeded with `seed`.
    pub fn new(initial: Duration, max: Duration, multiplier: f64, jitter: f64, seed: u64) -> Self {
        let initial_ms = (initial.as_secs_f64() * 1e3).max(1.0);
        let max_ms = (max.as_secs_f64() * 1e3).max(initial_ms);
        Backoff {
            initial_ms,
            max_ms,
            multiplier: multiplier.max(1.0),
            jitter: jitter.clamp(0.0, 0.99),
            next_ms: initial_ms,
            attempt: 0,
            rng: Rng::new(seed),
        }
    }

    /// Notes a failure; returns its number since the last success (from 1) and the delay
    /// before the next attempt.
    pub fn failed(&mut self) -> (u32, Duration) {
        self.attempt = self.attempt.saturating_add(1);
        let spread = (self.rng.uniform() * 2.0 - 1.0) * self.jitter;
        let delay_ms = (self.next_ms * (1.0 + spread)).clamp(1.0, self.max_ms);
        self.next_ms = (self.next_ms * self.multiplier).min(self.max_ms);
        (self.attempt, Duration::from_millis(delay_ms.round() as u64))
    }

    /// A success: the next failure starts from `initial` again.
    pub fn succeeded(&mut self) {
        self.attempt = 0;
        self.next_ms = self.initial_ms;
    }

    /// Failures since the last success.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The longest delay.
    pub fn max(&self) -> Duration {
        Duration::from_millis(self.max_ms.round() as u64)
    }
}

/// A seed that differs between processes and runs, for jitter in production.
pub fn seed_from_clock() -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    (nanos as u64) ^ (u64::from(std::process::id()) << 32)
}
