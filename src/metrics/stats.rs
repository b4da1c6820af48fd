//! The `<prefix>/<device>/stats` topic: a periodic summary of the [`Metrics`] counters.
//!
//! [`StatsBuilder`] turns two readings of the counters into rates (frames in and out per
//! second, the mean batch size) over the interval between them; it takes the time as an
//! argument, so its arithmetic is tested without waiting. [`spawn`] is the I/O around it: a
//! tokio task that hands a [`Stats`] message to the publisher every `metrics.stats_interval_s`
//! and once more when it is stopped, so a short run still reports its totals.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::debug;

use super::{LatencySnapshot, Metrics};
use crate::publish::Message;
use crate::publish::payload::{
    EngineStats, Percentiles, PublishStats, SCHEMA_VERSION, Stats, StreamStats, rfc3339_ms,
};

/// How long a stats message waits for room in the publisher's queue before it is skipped.
const SEND_WAIT: Duration = Duration::from_secs(1);

/// Counters at the previous reading, to turn totals into rates.
#[derive(Debug)]
pub struct StatsBuilder {
    device: String,
    run_id: String,
    previous: Instant,
    streams: HashMap<String, (u64, u64)>,
    batches: u64,
    batched_frames: u64,
}

impl StatsBuilder {
    /// Rates of the first message count from `start`.
    pub fn new(device: &str, run_id: &str, start: Instant) -> StatsBuilder {
        StatsBuilder {
            device: device.to_string(),
            run_id: run_id.to_string(),
            previous: start,
            streams: HashMap::new(),
            batches: 0,
            batched_frames: 0,
        }
    }

    /// The payload for the interval that ends at `now`.
    pub fn build(&mut self, metrics: &Metrics, now: Instant) -> Stats {
        let interval = now.saturating_duration_since(self.previous).as_secs_f64();
        self.previous = now;
        let rate = |delta: u64| if interval > 0.0 { delta as f64 / interval } else { 0.0 };
        let mut streams = BTreeMap::new();
        for (name, counters) in metrics.streams() {
            let sampled = counters.sampled.load(Ordering::Relaxed);
            let classified = counters.classified.load(Ordering::Relaxed);
            let (sampled_before, classified_before) =
                self.streams.insert(name.clone(), (sampled, classified)).unwrap_or((0, 0));
            let status = counters.status();
            streams.insert(
                name,
                StreamStats {
                    status: if status.is_empty() { "unknown".into() } else { status },
                    fps_in: round3(rate(sampled.saturating_sub(sampled_before))),
                    fps_out: round3(rate(classified.saturating_sub(classified_before))),
                    decoded: counters.decoded.load(Ordering::Relaxed),
                    sampled,
                    classified,
                    dropped: counters.dropped.load(Ordering::Relaxed),
                    reconnects: counters.reconnects.load(Ordering::Relaxed),
                    queued: counters.queued.load(Ordering::Relaxed),
                    inference_ms: percentiles(&counters.inference_ms.snapshot()),
                    capture_to_publish_ms: percentiles(&counters.capture_to_publish_ms.snapshot()),
                },
            );
        }
        let engine = &metrics.engine;
        let backend = engine.backend();
        let batches = engine.batches.load(Ordering::Relaxed);
        let batched_frames = engine.batched_frames.load(Ordering::Relaxed);
        let new_batches = batches.saturating_sub(self.batches);
        let new_frames = batched_frames.saturating_sub(self.batched_frames);
        (self.batches, self.batched_frames) = (batches, batched_frames);
        let publish = &metrics.publish;
        Stats {
            schema: SCHEMA_VERSION,
            device: self.device.clone(),
            run_id: self.run_id.clone(),
            at: rfc3339_ms(SystemTime::now()),
            interval_s: round3(interval),
            uptime_s: round3(metrics.uptime_s()),
            streams,
            engine: EngineStats {
                backend: backend.as_ref().map(|b| b.backend.to_string()),
                device: backend.as_ref().map(|b| b.device.clone()),
                precision: backend.as_ref().map(|b| b.precision.as_str().to_string()),
                queue_depth: engine.queue_depth.load(Ordering::Relaxed),
                batches,
                batched_frames,
                batch_mean: (new_batches > 0)
                    .then(|| round3(new_frames as f64 / new_batches as f64)),
            },
            publish: PublishStats {
                connected: publish.connected.load(Ordering::Relaxed) > 0,
                spool_depth: publish.spool_depth.load(Ordering::Relaxed),
                spool_bytes: publish.spool_bytes.load(Ordering::Relaxed),
                spool_overflow: publish.spool_overflow.load(Ordering::Relaxed),
                replayed: publish.replayed.load(Ordering::Relaxed),
                failures: publish.failures.load(Ordering::Relaxed),
            },
        }
    }
}

fn percentiles(snapshot: &LatencySnapshot) -> Percentiles {
    Percentiles {
        p50: snapshot.p50.map(round3),
        p90: snapshot.p90.map(round3),
        p99: snapshot.p99.map(round3),
    }
}

fn round3(value: f64) -> f64 {
    (value * 1e3).round() / 1e3
}

/// The running stats task; [`StatsTask::stop`] sends the last message and ends it.
pub struct StatsTask {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl StatsTask {
    /// Publishes a final message and waits for the task to end (which drops its sender).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Starts the task: one [`Message::Stats`] to `out` every `every`, and one when stopped.
pub fn spawn(
    metrics: Arc<Metrics>,
    every: Duration,
    device: &str,
    run_id: &str,
    out: mpsc::Sender<Message>,
) -> StatsTask {
    let (stop, mut stopped) = watch::channel(false);
    let mut builder = StatsBuilder::new(device, run_id, Instant::now());
    let task = tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let last = tokio::select! {
                _ = ticks.tick() => false,
                _ = stopped.wait_for(|stop| *stop) => true,
            };
            let stats = builder.build(&metrics, Instant::now());
            debug!(streams = stats.streams.len(), last, "stats");
            // Stats are QoS 0 and best effort: a publisher that cannot take one within a second
            // (broker away, queue full) misses it; the next one carries the totals.
            let sent = tokio::time::timeout(SEND_WAIT, out.send(Message::Stats(stats))).await;
            if !matches!(sent, Ok(Ok(()))) {
                debug!("publisher busy; stats message skipped");
            }
            if last {
                return;
            }
        }
    });
    StatsTask { stop, task }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_count_over_the_interval_and_totals_since_the_start() {
        let metrics = Metrics::new();
        let door = metrics.stream("door");
        let t0 = Instant::now();
        let mut builder = StatsBuilder::new("box", "run", t0);
        door.sampled.fetch_add(20, Ordering::Relaxed);
        door.classified.fetch_add(10, Ordering::Relaxed);
        door.inference_ms.record(40.0);
        metrics.engine.batches.fetch_add(4, Ordering::Relaxed);
        metrics.engine.batched_frames.fetch_add(10, Ordering::Relaxed);
        let first = builder.build(&metrics, t0 + Duration::from_secs(10));
        let stream = &first.streams["door"];
        assert_eq!((stream.fps_in, stream.fps_out), (2.0, 1.0));
        assert_eq!(stream.status, "unknown");
        assert_eq!(stream.inference_ms.p50, Some(40.0));
        assert_eq!(first.engine.batch_mean, Some(2.5));

        door.sampled.fetch_add(5, Ordering::Relaxed);
        door.set_status("online");
        metrics.engine.batches.fetch_add(1, Ordering::Relaxed);
        metrics.engine.batched_frames.fetch_add(4, Ordering::Relaxed);
        let second = builder.build(&metrics, t0 + Duration::from_secs(15));
        let stream = &second.streams["door"];
        assert_eq!((stream.fps_in, stream.fps_out, stream.sampled), (1.0, 0.0, 25));
        assert_eq!(stream.status, "online");
        assert_eq!((second.engine.batch_mean, second.engine.batches), (Some(4.0), 5));
        assert_eq!(second.interval_s, 5.0);

        let idle = builder.build(&metrics, t0 + Duration::from_secs(20));
        assert_eq!(idle.engine.batch_mean, None, "no batch in the interval");
    }
}
