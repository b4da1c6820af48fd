//! Delays between MQTT reconnection attempts. The client reconnects whenever its event loop is
//! polled again, so without a delay a dead broker means a busy loop and a flood of warnings;
//! doubling the delay up to a cap keeps a long outage quiet while a short one (a broker
//! restart) is bridged within a second or two. Each delay is jittered by ± 20 % so that a
//! fleet of devices that lost the same broker does not reconnect in lockstep after its
//! restart.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Relative jitter of each delay: ± 20 %.
const JITTER: f64 = 0.2;

/// Exponential backoff: `initial`, doubled after each failure, capped at `max`; each delay
/// handed out is the doubled base times a factor in [0.8, 1.2), never more than `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
    rng: SplitMix64,
}

impl Backoff {
    /// The publisher's default: 500 ms, doubling to at most 30 s, seeded from the process id
    /// and the clock so that devices differ.
    pub fn mqtt() -> Backoff {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let seed = (nanos as u64) ^ (u64::from(std::process::id()) << 32);
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30), seed)
    }

    /// `seed` drives the jitter; a fixed seed gives a repeatable sequence (tests).
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Backoff {
        let initial = initial.min(max);
        Backoff { initial, max, next: initial, failures: 0, rng: SplitMix64(seed) }
    }

    /// The delay before the next attempt; each call doubles the base of the one after it.
    pub fn failed(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        let factor = 1.0 - JITTER + 2.0 * JITTER * self.rng.unit();
        base.mul_f64(factor).min(self.max)
    }

    /// The longest delay, for failures that retrying soon cannot fix (a refused login).
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A connection succeeded: the next failure waits about `initial` again.
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.failures = 0;
    }
}

/// SplitMix64: a tiny, well-mixed PRNG; plenty for spreading reconnects, not for secrets.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASES: [u64; 6] = [500, 1000, 2000, 3000, 3000, 3000];

    fn delays(seed: u64) -> Vec<u64> {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(3), seed);
        (0..BASES.len()).map(|_| backoff.failed().as_millis() as u64).collect()
    }

    #[test]
    fn doubles_up_to_the_cap_within_the_jitter_and_resets_on_success() {
        for seed in 0..200 {
            for (delay, base) in delays(seed).into_iter().zip(BASES) {
                let low = base * 8 / 10;
                let high = (base * 12 / 10).min(3000);
                assert!((low..=high).contains(&delay), "seed {seed}: {delay} ms, base {base}");
            }
        }
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(3), 9);
        for _ in 0..5 {
            backoff.failed();
        }
        assert_eq!(backoff.failures(), 5);
        backoff.reset();
        let first = backoff.failed().as_millis();
        assert!((400..=600).contains(&first), "{first}");
        assert_eq!(backoff.failures(), 1);
    }

    #[test]
    fn the_jitter_spreads_delays_and_a_seed_repeats_them() {
        assert_eq!(delays(42), delays(42));
        let firsts: Vec<u64> = (0..100).map(|seed| delays(seed)[0]).collect();
        let (min, max) = (firsts.iter().min().unwrap(), firsts.iter().max().unwrap());
        // 100 draws over [400, 600): the spread covers most of the range.
        assert!(*min < 440 && *max > 560, "min {min}, max {max}");
    }
}
