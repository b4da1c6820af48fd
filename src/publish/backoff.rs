//! Delays between MQTT reconnection attempts. The client reconnects whenever its event loop is
//! polled again, so without a delay a dead broker means a busy loop and a flood of warnings;
//! doubling the delay up to a cap keeps a long outage quiet while a short one (a broker
//! restart) is bridged within a second or two.

use std::time::Duration;

/// Exponential backoff: `initial`, doubled after each failure, capped at `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
}

impl Backoff {
    /// The publisher's default: 500 ms, doubling to at most 30 s.
    pub fn mqtt() -> Backoff {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }

    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let initial = initial.min(max);
        Backoff { initial, max, next: initial, failures: 0 }
    }

    /// The delay before the next attempt; each call doubles the one after it.
    pub fn failed(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// The longest delay, for failures that retrying soon cannot fix (a refused login).
    pub fn max(&self) -> Duration {
        self.max
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// A connection succeeded: the next failure waits `initial` again.
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets_on_success() {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(3));
        let delays: Vec<u128> = (0..5).map(|_| backoff.failed().as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 3000, 3000]);
        assert_eq!(backoff.failures(), 5);
        backoff.reset();
        assert_eq!(backoff.failed(), Duration::from_millis(500));
        assert_eq!(backoff.failures(), 1);
    }
}
