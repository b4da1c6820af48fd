//! When to close a batch: the engine's batching policy, with no clock of its own.
//!
//! Running several frames through the model in one call amortises the per-call overhead and
//! lets the matrix products work on bigger blocks, but every frame waiting for company is
//! latency. [`Batcher`] decides with two limits: a batch holds at most `max_batch` frames, and
//! never waits longer than `max_wait` after its first frame arrived. Times are passed in, so
//! the tests drive it with a fake clock.

use std::time::{Duration, Instant};

/// The open batch's bookkeeping: how many frames it holds and when the first one came.
#[derive(Debug, Clone)]
pub struct Batcher {
    max_batch: usize,
    max_wait: Duration,
    len: usize,
    opened: Option<Instant>,
}

/// What the engine should do next with the open batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing is waiting: block for the next event.
    Idle,
    /// Wait for more frames until this instant at the latest.
    WaitUntil(Instant),
    /// Run the batch now.
    Run,
}

impl Batcher {
    /// `max_batch` of at least 1 (0 counts as 1).
    pub fn new(max_batch: usize, max_wait: Duration) -> Batcher {
        Batcher { max_batch: max_batch.max(1), max_wait, len: 0, opened: None }
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Frames in the open batch.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A frame joined the batch at `now`; says what to do next.
    pub fn push(&mut self, now: Instant) -> Next {
        if self.opened.is_none() {
            self.opened = Some(now);
        }
        self.len += 1;
        self.next(now)
    }

    /// What to do at `now`: run when full or past the deadline, else wait until the deadline.
    pub fn next(&self, now: Instant) -> Next {
        let Some(opened) = self.opened else { return Next::Idle };
        let deadline = opened + self.max_wait;
        if self.len >= self.max_batch || now >= deadline {
            Next::Run
        } else {
            Next::WaitUntil(deadline)
        }
    }

    /// The batch was run (or dropped); the next frame opens a new one.
    pub fn clear(&mut self) {
        self.len = 0;
        self.opened = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(20);

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn idle_until_the_first_frame() {
        let batcher = Batcher::new(4, WAIT);
        assert_eq!(batcher.next(Instant::now()), Next::Idle);
        assert!(batcher.is_empty());
    }

    #[test]
    fn runs_as_soon_as_the_batch_is_full() {
        let t0 = Instant::now();
        let mut batcher = Batcher::new(3, WAIT);
        assert_eq!(batcher.push(t0), Next::WaitUntil(ms(t0, 20)));
        assert_eq!(batcher.push(ms(t0, 1)), Next::WaitUntil(ms(t0, 20)));
        assert_eq!(batcher.push(ms(t0, 2)), Next::Run);
        assert_eq!(batcher.len(), 3);
    }

    #[test]
    fn the_deadline_counts_from_the_first_frame() {
        let t0 = Instant::now();
        let mut batcher = Batcher::new(8, WAIT);
        batcher.push(t0);
        // A later frame does not move the deadline.
        assert_eq!(batcher.push(ms(t0, 15)), Next::WaitUntil(ms(t0, 20)));
        assert_eq!(batcher.next(ms(t0, 19)), Next::WaitUntil(ms(t0, 20)));
        assert_eq!(batcher.next(ms(t0, 20)), Next::Run);
        // A frame that arrives late still runs at once.
        assert_eq!(batcher.push(ms(t0, 30)), Next::Run);
    }

    #[test]
    fn a_new_batch_opens_after_clear() {
        let t0 = Instant::now();
        let mut batcher = Batcher::new(2, WAIT);
        batcher.push(t0);
        batcher.push(t0);
        batcher.clear();
        assert_eq!(batcher.next(ms(t0, 100)), Next::Idle);
        assert_eq!(batcher.push(ms(t0, 100)), Next::WaitUntil(ms(t0, 120)));
    }

    #[test]
    fn batch_of_one_or_no_wait_runs_every_frame_at_once() {
        let t0 = Instant::now();
        assert_eq!(Batcher::new(1, WAIT).push(t0), Next::Run);
        assert_eq!(Batcher::new(0, WAIT).push(t0), Next::Run);
        assert_eq!(Batcher::new(4, Duration::ZERO).push(t0), Next::Run);
    }
}
