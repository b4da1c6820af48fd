//! The daemon's pulse: watchdog pings and the status line systemd shows.
//!
//! One task looks at the shared [`Metrics`] every few seconds. It pings the systemd watchdog
//! when [`WatchdogGate`] says the engine is healthy and refreshes the `STATUS=` line, which
//! says in words how many streams run, how fast frames are classified, and whether the broker
//! is connected or messages are being spooled.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tracing::warn;

use super::notify::{Notifier, WatchdogGate};
use crate::metrics::Metrics;

/// How often the status line is refreshed when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Starts the pulse task; abort the handle to stop it.
pub fn spawn(notifier: Arc<Notifier>, metrics: Arc<Metrics>) -> JoinHandle<()> {
    let period = notifier.watchdog_period().map_or(STATUS_EVERY, |ping| ping.min(STATUS_EVERY));
    tokio::spawn(async move {
        let mut gate = WatchdogGate::default();
        let mut rate = Rate::default();
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut silent = false;
        loop {
            ticker.tick().await;
            let progress = metrics.engine.progress.load(Ordering::Relaxed);
            let waiting = metrics.engine.queue_depth.load(Ordering::Relaxed);
            if gate.healthy(progress, waiting) {
                if silent {
                    warn!("the engine is making progress again; watchdog pings resume");
                    silent = false;
                }
                notifier.watchdog();
            } else if !silent {
                warn!(waiting, "the engine made no progress with frames waiting; watchdog paused");
                silent = true;
            }
            notifier.status(&status_line(&metrics, &mut rate));
        }
    })
}

/// Classified frames per second between two looks.
#[derive(Debug, Default)]
struct Rate {
    last: Option<(Instant, u64)>,
}

impl Rate {
    fn update(&mut self, classified: u64) -> f64 {
        let now = Instant::now();
        let rate = match self.last {
            Some((then, count)) => {
                let seconds = now.duration_since(then).as_secs_f64();
                if seconds > 0.0 { classified.saturating_sub(count) as f64 / seconds } else { 0.0 }
            }
            None => 0.0,
        };
        self.last = Some((now, classified));
        rate
    }
}

/// E.g. `running: 3/4 streams online, 2.4 frames/s, broker connected`.
fn status_line(metrics: &Metrics, rate: &mut Rate) -> String {
    let streams = metrics.streams();
    let online = streams
        .iter()
        .filter(|(_, stream)| matches!(stream.status().as_str(), "online" | "running" | ""))
        .count();
    let classified: u64 =
        streams.iter().map(|(_, stream)| stream.classified.load(Ordering::Relaxed)).sum();
    let fps = rate.update(classified);
    let publish = &metrics.publish;
    let broker = if publish.connected.load(Ordering::Relaxed) == 1 {
        "broker connected".to_string()
    } else {
        let spooled = publish.spool_depth.load(Ordering::Relaxed);
        format!("broker unreachable, {spooled} messages spooled")
    };
    format!("running: {online}/{} streams online, {fps:.1} frames/s, {broker}", streams.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_counts_streams_and_says_where_messages_go() {
        let metrics = Metrics::new();
        metrics.stream("door").set_status("online");
        metrics.stream("yard").set_status("reconnecting");
        metrics.publish.spool_depth.store(12, Ordering::Relaxed);
        let mut rate = Rate::default();
        let line = status_line(&metrics, &mut rate);
        assert_eq!(
            line,
            "running: 1/2 streams online, 0.0 frames/s, broker unreachable, 12 messages spooled"
        );
        metrics.publish.connected.store(1, Ordering::Relaxed);
        assert!(status_line(&metrics, &mut rate).ends_with("broker connected"));
    }
}
