//! The per-stream fps cap: which decoded frames go on to the model.
//!
//! A stream decodes every frame, but the model only needs `fps` of them per second of stream
//! time. [`Sampler`] decides from timestamps alone, before the frame is copied out of its
//! GStreamer buffer, so a skipped frame costs no copy. It is a plain struct without I/O, so its
//! rules are tested here without a pipeline.

/// Picks at most `fps` frames per second of stream time.
///
/// Stream time is cut into cells of `1/fps` seconds (floored to the nanosecond), starting at
/// the first frame. The sampler takes the first frame, then the first frame at or after the
/// start of each later cell, so it never takes two frames in one cell: over a run the rate is
/// at most `fps`, and each whole second counted from the first frame holds at most
/// `ceil(fps)` frames. (A one-second window that straddles cells may see one more: a frame late
/// in one cell and the first frame of the next can be close together. The cells keep the
/// long-run rate exact, where spacing frames at least `1/fps` apart would fall short of the
/// cap whenever the source rate is not a multiple of it.) When the source is slower than the
/// cap, every frame is taken. A cell without frames (a gap in a variable-frame-rate file) is
/// skipped, not made up for later.
///
/// Timestamps are the buffer's stream time when it has one. A frame without a timestamp is
/// placed by its arrival time instead; when a stream switches between the two clocks, or its
/// timestamps jump back by more than a cell (a seek, a loop, a restarted camera), the cells are
/// laid out again from that frame, which is taken.
#[derive(Debug, Clone)]
pub struct Sampler {
    interval_ns: u64,
    state: Option<Anchor>,
}

#[derive(Debug, Clone, Copy)]
struct Anchor {
    clock: Clock,
    /// The start of cell 0.
    origin_ns: u64,
    /// The start of the next cell that has no frame taken yet.
    next_ns: u64,
    /// The timestamp of the last frame taken.
    last_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clock {
    Stream,
    Arrival,
}

impl Sampler {
    /// A sampler for `fps` frames per second; `None` unless `fps` is finite and positive.
    pub fn new(fps: f64) -> Option<Sampler> {
        if !(fps.is_finite() && fps > 0.0) {
            return None;
        }
        let interval_ns = (1e9 / fps).floor().max(1.0) as u64;
        Some(Sampler { interval_ns, state: None })
    }

    /// The cell length in nanoseconds.
    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// Forgets the past: the next frame is taken and the cells start there. Call it after a
    /// seek.
    pub fn reset(&mut self) {
        self.state = None;
    }

    /// Whether to take a frame with stream timestamp `stream_ns` (when it has one) that
    /// arrived at `arrival_ns` (nanoseconds on any monotonic clock).
    pub fn admit(&mut self, stream_ns: Option<u64>, arrival_ns: u64) -> bool {
        let (clock, now) = match stream_ns {
            Some(stream_ns) => (Clock::Stream, stream_ns),
            None => (Clock::Arrival, arrival_ns),
        };
        if let Some(anchor) = &mut self.state {
            let jumped_back = now.saturating_add(self.interval_ns) < anchor.last_ns;
            if anchor.clock == clock && !jumped_back {
                if now < anchor.next_ns {
                    return false;
                }
                let cell = (now - anchor.origin_ns) / self.interval_ns;
                anchor.next_ns = anchor.origin_ns + (cell + 1) * self.interval_ns;
                anchor.last_ns = now;
                return true;
            }
        }
        self.state = Some(Anchor {
            clock,
            origin_ns: now,
            next_ns: now.saturating_add(self.interval_ns),
            last_ns: now,
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Timestamps of frames at `rate` per second, as GStreamer computes them (floored ns).
    fn timestamps(rate: u64, count: u64) -> impl Iterator<Item = u64> {
        (0..count).map(move |index| index * 1_000_000_000 / rate)
    }

    fn taken(sampler: &mut Sampler, stamps: impl Iterator<Item = u64>) -> Vec<u64> {
        stamps.filter(|stamp| sampler.admit(Some(*stamp), 0)).collect()
    }

    #[test]
    fn takes_the_first_frame_then_one_per_step() {
        let mut sampler = Sampler::new(2.0).unwrap();
        let picked = taken(&mut sampler, timestamps(15, 30));
        // Cells start at 0, 500 ms, 1000 ms, 1500 ms; frames are 66.7 ms apart.
        assert_eq!(picked, vec![0, 533_333_333, 1_000_000_000, 1_533_333_333]);
    }

    #[test]
    fn takes_every_frame_when_the_source_is_slower_than_the_cap() {
        let mut sampler = Sampler::new(30.0).unwrap();
        assert_eq!(taken(&mut sampler, timestamps(30, 90)).len(), 90);
        let mut sampler = Sampler::new(100.0).unwrap();
        assert_eq!(taken(&mut sampler, timestamps(25, 50)).len(), 50);
    }

    #[test]
    fn never_takes_more_than_fps_per_second() {
        for fps in [0.5, 1.0, 2.0, 3.0, 7.0, 12.5, 29.97] {
            let mut sampler = Sampler::new(fps).unwrap();
            let picked = taken(&mut sampler, timestamps(60, 600));
            for second in 0..10 {
                let range = second * 1000 * MS..(second + 1) * 1000 * MS;
                let in_second = picked.iter().filter(|t| range.contains(*t)).count();
                assert!(in_second as f64 <= fps.ceil(), "fps {fps}, second {second}");
            }
            // Ten seconds of stream: the cap times ten, give or take the first frame.
            let expected = (10.0 * fps).ceil() as usize;
            assert!(picked.len() == expected, "fps {fps}: {} not {expected}", picked.len());
        }
    }

    #[test]
    fn skips_empty_cells_without_making_up_for_them() {
        // Variable frame rate: a frame at 0, then a gap of 1.1 s, then frames 5 ms apart.
        let mut sampler = Sampler::new(4.0).unwrap();
        let stamps = [0, 1100 * MS, 1105 * MS, 1110 * MS, 1250 * MS, 1255 * MS, 1499 * MS];
        assert_eq!(taken(&mut sampler, stamps.into_iter()), vec![0, 1100 * MS, 1250 * MS]);
    }

    #[test]
    fn starts_again_when_timestamps_jump_back() {
        let mut sampler = Sampler::new(1.0).unwrap();
        assert!(sampler.admit(Some(5000 * MS), 0));
        assert!(!sampler.admit(Some(5500 * MS), 0));
        // A loop back to the start of the file.
        assert!(sampler.admit(Some(0), 0));
        assert!(!sampler.admit(Some(400 * MS), 0));
        assert!(sampler.admit(Some(1000 * MS), 0));
    }

    #[test]
    fn ignores_a_small_step_back() {
        let mut sampler = Sampler::new(1.0).unwrap();
        assert!(sampler.admit(Some(1000 * MS), 0));
        assert!(!sampler.admit(Some(990 * MS), 0));
    }

    #[test]
    fn falls_back_to_arrival_time_without_timestamps() {
        let mut sampler = Sampler::new(10.0).unwrap();
        let arrivals = [0, 40 * MS, 99 * MS, 100 * MS, 150 * MS, 230 * MS];
        let picked: Vec<u64> =
            arrivals.into_iter().filter(|arrival| sampler.admit(None, *arrival)).collect();
        assert_eq!(picked, vec![0, 100 * MS, 230 * MS]);
    }

    #[test]
    fn reset_takes_the_next_frame() {
        let mut sampler = Sampler::new(1.0).unwrap();
        assert!(sampler.admit(Some(0), 0));
        assert!(!sampler.admit(Some(10 * MS), 0));
        sampler.reset();
        assert!(sampler.admit(Some(20 * MS), 0));
    }

    #[test]
    fn refuses_a_rate_that_is_not_positive() {
        assert!(Sampler::new(0.0).is_none());
        assert!(Sampler::new(-1.0).is_none());
        assert!(Sampler::new(f64::NAN).is_none());
        assert!(Sampler::new(f64::INFINITY).is_none());
    }
}
