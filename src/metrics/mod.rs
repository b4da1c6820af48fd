//! Counters every stage updates and the `stats` topic and the Prometheus endpoint read.
//!
//! One [`Metrics`] is made per daemon run and shared as an `Arc`: sources count frames decoded,
//! sampled and dropped and their reconnects; the engine counts classifications, its queue depth
//! and its latencies; the publisher counts the spool and failed publishes. Everything is an
//! atomic or a short critical section, so updating a counter never blocks a streaming thread
//! for longer than a few nanoseconds. Readers take a [`Snapshot`]-style copy when they report.
//!
//! Readers: [`stats`] builds the periodic `stats` payload, [`prometheus`] renders the text
//! exposition format and [`server`] serves it on `metrics.listen`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

pub mod prometheus;
pub mod server;
pub mod stats;

/// Upper bounds of the latency histogram buckets, milliseconds. The last bucket is +Inf.
pub const LATENCY_BUCKETS_MS: [f64; 14] = [
    5.0, 10.0, 25.0, 50.0, 100.0, 150.0, 250.0, 400.0, 600.0, 1000.0, 2000.0, 5000.0, 10000.0,
    30000.0,
];

/// How many recent samples a [`Latencies`] keeps for percentiles.
const RECENT: usize = 512;

/// All counters of one daemon run.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    streams: RwLock<BTreeMap<String, Arc<StreamMetrics>>>,
    pub engine: EngineMetrics,
    pub publish: PublishMetrics,
}

/// Counters of one stream. Sources write the first group, the engine the second.
#[derive(Debug, Default)]
pub struct StreamMetrics {
    /// Frames that left the decoder.
    pub decoded: AtomicU64,
    /// Frames the fps cap let through and that were handed to the engine.
    pub sampled: AtomicU64,
    /// Frames lost before inference: stale live frames replaced by newer ones, or frames the
    /// engine's queue had no room for.
    pub dropped: AtomicU64,
    /// Times a live source was torn down and started again.
    pub reconnects: AtomicU64,
    /// Frames of this stream in the engine's queue now. A live source hands over a new frame
    /// only when none of its frames waits there, so the newest frame wins across the queue.
    pub queued: AtomicU64,
    /// Frames classified.
    pub classified: AtomicU64,
    /// Backend time per frame (preprocess + backbone + head), milliseconds.
    pub inference_ms: Latencies,
    /// Capture to hand-over to the publisher, milliseconds.
    pub capture_to_publish_ms: Latencies,
    /// The source's state as last reported (`online`, `reconnecting`, `failed`, `ended`).
    status: Mutex<String>,
}

/// Counters of the engine.
#[derive(Debug, Default)]
pub struct EngineMetrics {
    /// Frames waiting for inference right now.
    pub queue_depth: AtomicU64,
    /// Batches run, and frames in them.
    pub batches: AtomicU64,
    pub batched_frames: AtomicU64,
    /// Bumped after every batch; the watchdog checks that it moves.
    pub progress: AtomicU64,
    /// The backend running the model (set at load and after a reload).
    backend: Mutex<Option<crate::model::BackendInfo>>,
}

impl EngineMetrics {
    pub fn set_backend(&self, info: &crate::model::BackendInfo) {
        *self.backend.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.clone());
    }

    pub fn backend(&self) -> Option<crate::model::BackendInfo> {
        self.backend.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Counters of the publisher.
#[derive(Debug, Default)]
pub struct PublishMetrics {
    /// Messages in the on-disk spool right now, and their size in bytes.
    pub spool_depth: AtomicU64,
    pub spool_bytes: AtomicU64,
    /// Spooled messages dropped (oldest first) because the spool reached its bound.
    pub spool_overflow: AtomicU64,
    /// Spooled messages published again after a reconnect.
    pub replayed: AtomicU64,
    /// Publishes the client did not take, or messages that could not be encoded.
    pub failures: AtomicU64,
    /// Connections accepted by the broker (1 after the first connect).
    pub connections: AtomicU64,
    /// 1 while connected, 0 otherwise.
    pub connected: AtomicU64,
}

/// A latency record: a cumulative histogram (for Prometheus) and the most recent samples (for
/// percentiles in `stats`).
#[derive(Debug)]
pub struct Latencies {
    buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    /// Sum of all samples, microseconds.
    sum_us: AtomicU64,
    count: AtomicU64,
    recent: Mutex<Recent>,
}

#[derive(Debug, Default)]
struct Recent {
    samples: Vec<f64>,
    next: usize,
}

/// A copy of a [`Latencies`] taken for a report.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySnapshot {
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS_MS`], then +Inf.
    pub buckets: Vec<u64>,
    pub sum_ms: f64,
    pub count: u64,
    /// Percentiles of the recent samples: p50, p90, p99; `None` before the first sample.
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
            recent: Mutex::new(Recent::default()),
        }
    }
}

impl Latencies {
    /// Records one sample in milliseconds.
    pub fn record(&self, ms: f64) {
        let ms = if ms.is_finite() && ms > 0.0 { ms } else { 0.0 };
        let index = LATENCY_BUCKETS_MS
            .iter()
            .position(|&bound| ms <= bound)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((ms * 1000.0) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut recent = self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if recent.samples.len() < RECENT {
            recent.samples.push(ms);
        } else {
            let next = recent.next;
            recent.samples[next] = ms;
        }
        recent.next = (recent.next + 1) % RECENT;
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        let mut running = 0;
        let buckets = self
            .buckets
            .iter()
            .map(|bucket| {
                running += bucket.load(Ordering::Relaxed);
                running
            })
            .collect();
        let mut samples =
            self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).samples.clone();
        samples.sort_by(f64::total_cmp);
        let percentile = |p: f64| {
            (!samples.is_empty()).then(|| {
                let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
                samples[rank.min(samples.len() - 1)]
            })
        };
        LatencySnapshot {
            buckets,
            sum_ms: self.sum_us.load(Ordering::Relaxed) as f64 / 1000.0,
            count: self.count.load(Ordering::Relaxed),
            p50: percentile(50.0),
            p90: percentile(90.0),
            p99: percentile(99.0),
        }
    }
}

impl StreamMetrics {
    /// A frame of this stream is about to enter the engine's queue.
    pub fn enqueue(&self) {
        self.queued.fetch_add(1, Ordering::AcqRel);
    }

    /// A frame of this stream left the engine's queue (or never entered it).
    pub fn dequeue(&self) {
        let _ = self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
            Some(queued.saturating_sub(1))
        });
    }

    pub fn set_status(&self, status: &str) {
        let mut current = self.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        current.clear();
        current.push_str(status);
    }

    pub fn status(&self) -> String {
        self.status.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            streams: RwLock::new(BTreeMap::new()),
            engine: EngineMetrics::default(),
            publish: PublishMetrics::default(),
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    /// The counters of `stream`, made on first use.
    pub fn stream(&self, stream: &str) -> Arc<StreamMetrics> {
        if let Some(found) =
            self.streams.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(stream)
        {
            return Arc::clone(found);
        }
        let mut streams = self.streams.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(streams.entry(stream.to_string()).or_default())
    }

    /// Every stream's counters, by name.
    pub fn streams(&self) -> Vec<(String, Arc<StreamMetrics>)> {
        let streams = self.streams.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        streams.iter().map(|(name, metrics)| (name.clone(), Arc::clone(metrics))).collect()
    }

    /// Seconds since the run started.
    pub fn uptime_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_percentiles_follow_the_samples() {
        let latencies = Latencies::default();
        for ms in 1..=100 {
            latencies.record(ms as f64);
        }
        let snapshot = latencies.snapshot();
        assert_eq!(snapshot.count, 100);
        assert_eq!(snapshot.buckets[0], 5, "≤ 5 ms");
        assert_eq!(snapshot.buckets[4], 100, "≤ 100 ms");
        assert_eq!(*snapshot.buckets.last().unwrap(), 100);
        assert_eq!(snapshot.p50, Some(51.0));
        assert_eq!(snapshot.p99, Some(99.0));
        assert!((snapshot.sum_ms - 5050.0).abs() < 1e-6);
    }

    #[test]
    fn keeps_only_recent_samples_for_percentiles() {
        let latencies = Latencies::default();
        for _ in 0..RECENT {
            latencies.record(1000.0);
        }
        for _ in 0..RECENT {
            latencies.record(2.0);
        }
        assert_eq!(latencies.snapshot().p99, Some(2.0));
    }

    #[test]
    fn one_record_per_stream_name() {
        let metrics = Metrics::new();
        metrics.stream("door").decoded.fetch_add(3, Ordering::Relaxed);
        assert_eq!(metrics.stream("door").decoded.load(Ordering::Relaxed), 3);
        assert_eq!(metrics.streams().len(), 1);
    }
}
