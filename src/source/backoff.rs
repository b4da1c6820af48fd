//! The delay before a live source is rebuilt: the shared [`Backoff`](crate::backoff::Backoff)
//! with the `[sources]` policy. A camera that drops off the network is retried quickly once (a
//! reboot takes seconds) but not hammered for hours, and the growth starts over once the
//! source has delivered frames again.

use std::time::Duration;

use crate::backoff::Backoff;
use crate::config::SourcesSettings;

/// Reconnection delays of one live source.
#[derive(Debug, Clone)]
pub struct ReconnectBackoff(Backoff);

impl ReconnectBackoff {
    /// Delays following `policy`, jitter drawn from a generator seeded with `seed`.
    pub fn new(policy: &SourcesSettings, seed: u64) -> ReconnectBackoff {
        ReconnectBackoff(Backoff::new(
            Duration::from_millis(policy.backoff_initial_ms),
            Duration::from_millis(policy.backoff_max_ms),
            policy.backoff_multiplier,
            policy.backoff_jitter,
            seed,
        ))
    }

    /// Notes a failure; returns its number since the last success (from 1) and the delay
    /// before the next attempt. The jittered delay never exceeds `max`.
    pub fn failed(&mut self) -> (u32, Duration) {
        self.0.failed()
    }

    /// The source delivered frames again: the next failure starts from `initial`.
    pub fn succeeded(&mut self) {
        self.0.succeeded();
    }

    /// Failures since the last success.
    pub fn attempt(&self) -> u32 {
        self.0.attempt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: f64) -> SourcesSettings {
        SourcesSettings {
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            backoff_multiplier: 2.0,
            backoff_jitter: jitter,
            ..SourcesSettings::default()
        }
    }

    fn delays(backoff: &mut ReconnectBackoff, count: usize) -> Vec<u64> {
        (0..count).map(|_| backoff.failed().1.as_millis() as u64).collect()
    }

    #[test]
    fn without_jitter_doubles_up_to_the_cap() {
        let mut backoff = ReconnectBackoff::new(&policy(0.0), 1);
        assert_eq!(
            delays(&mut backoff, 9),
            [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]
        );
        assert_eq!(backoff.attempt(), 9);
    }

    #[test]
    fn counts_attempts_and_starts_over_after_a_success() {
        let mut backoff = ReconnectBackoff::new(&policy(0.0), 1);
        assert_eq!(backoff.failed(), (1, Duration::from_millis(500)));
        assert_eq!(backoff.failed(), (2, Duration::from_millis(1000)));
        backoff.succeeded();
        assert_eq!(backoff.failed(), (1, Duration::from_millis(500)));
    }

    #[test]
    fn jitter_stays_within_its_fraction_and_the_cap() {
        let mut backoff = ReconnectBackoff::new(&policy(0.2), 7);
        let mut base = 500.0_f64;
        for delay in delays(&mut backoff, 12) {
            let (low, high) = (base * 0.8, (base * 1.2).min(30_000.0));
            assert!((low.floor() as u64..=high.ceil() as u64).contains(&delay), "{delay} {base}");
            base = (base * 2.0).min(30_000.0);
        }
    }

    #[test]
    fn jitter_is_reproducible_per_seed_and_differs_between_seeds() {
        let first = delays(&mut ReconnectBackoff::new(&policy(0.2), 42), 6);
        let again = delays(&mut ReconnectBackoff::new(&policy(0.2), 42), 6);
        let other = delays(&mut ReconnectBackoff::new(&policy(0.2), 43), 6);
        assert_eq!(first, again);
        assert_ne!(first, other);
        // Spread really happens: not every delay is the plain doubling.
        assert_ne!(first, [500, 1000, 2000, 4000, 8000, 16_000]);
    }

    #[test]
    fn a_multiplier_of_one_keeps_the_delay_flat() {
        let mut settings = policy(0.0);
        settings.backoff_multiplier = 1.0;
        let mut backoff = ReconnectBackoff::new(&settings, 1);
        assert_eq!(delays(&mut backoff, 3), [500, 500, 500]);
    }
}
