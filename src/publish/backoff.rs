//! Delays between MQTT reconnection attempts: the shared [`Backoff`](crate::backoff::Backoff)
//! doubling from 500 ms to 30 s with ± 20 % jitter. The client reconnects whenever its event
//! loop is polled again, so without a delay a dead broker means a busy loop and a flood of
//! warnings; doubling keeps a long outage quiet while a short one (a broker restart) is bridged
//! within a second or two, and the jitter keeps a fleet of devices that lost the same broker
//! from reconnecting in lockstep after its restart.

use std::time::Duration;

use crate::backoff::{self, Backoff as Shared};

/// Relative jitter of each delay: ± 20 %.
const JITTER: f64 = 0.2;

/// The publisher's reconnect delays.
#[derive(Debug, Clone)]
pub struct Backoff(Shared);

impl Backoff {
    /// The publisher's default: 500 ms, doubling to at most 30 s, seeded so that devices differ.
    pub fn mqtt() -> Backoff {
        let seed = backoff::seed_from_clock();
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30), seed)
    }

    /// `seed` drives the jitter; a fixed seed gives a repeatable sequence (tests).
    pub fn new(initial: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff(Shared::new(initial, max, 2.0, JITTER, seed))
    }

    /// The delay before the next attempt; each call doubles the base of the one after it.
    pub fn failed(&mut self) -> Duration {
        self.0.failed().1
    }

    /// The longest delay, for failures that retrying soon cannot fix (a refused login).
    pub fn max(&self) -> Duration {
        self.0.max()
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.0.attempt()
    }

    /// A connection succeeded: the next failure waits about `initial` again.
    pub fn reset(&mut self) {
        self.0.succeeded();
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
