//! The source thread's outer loop: runs attempts, rebuilds live sources, sends the final event.
//!
//! A `file` source (and a `test` with `frames`, and a finite `uri`) runs once: its end or its
//! error is final. A live source that fails, stalls or ends is torn down and rebuilt after a
//! [`ReconnectBackoff`] delay, reporting `reconnecting` (attempt, delay, reason) on its status
//! topic and counting a reconnect; once it delivers frames again it reports `online` and the
//! delay starts over. Errors that a retry cannot fix ([`SourceError::is_permanent`]: a missing
//! decoder, refused credentials, no video, a graph that can no longer be built) end it as
//! `failed`. Whatever happens, exactly one [`SourceEvent::Ended`] or [`SourceEvent::Failed`] is
//! sent last, preceded by the matching status.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::backoff::ReconnectBackoff;
use super::pipeline::{self, Built};
use super::runner::{Context, Outcome, Runner};
use super::{Sampler, SourceError, SourceEvent, SourceStatus};
use crate::config::{SourcesSettings, StreamSettings};

/// How often the stop flag is looked at while waiting to rebuild.
const WAIT_STEP: Duration = Duration::from_millis(50);

pub(super) struct Supervisor {
    pub settings: StreamSettings,
    pub policy: SourcesSettings,
    pub context: Context,
    /// The graph built by `spawn`, used for the first attempt.
    pub first: Option<Built>,
}

impl Supervisor {
    pub(super) fn run(mut self) {
        let stream = Arc::clone(&self.context.stream);
        let seed = seed(&stream);
        let mut backoff = ReconnectBackoff::new(&self.policy, seed);
        let end = loop {
            let built = match self.first.take() {
                Some(built) => built,
                None => match pipeline::build(&self.settings, &stream) {
                    Ok(built) => built,
                    Err(error) => break Err(error),
                },
            };
            let live = built.live;
            let Some(sampler) = Sampler::new(self.settings.fps()) else {
                break Err(SourceError::Setup {
                    stream: stream.to_string(),
                    reason: format!("fps {} must be a positive number", self.settings.fps()),
                });
            };
            let report = Runner::new(built, sampler, &self.context).run();
            if report.online {
                backoff.succeeded();
            }
            let reason = match report.outcome {
                Outcome::Stopped | Outcome::Finished => break Ok(()),
                Outcome::Failed(error) if !live || error.is_permanent() => break Err(error),
                Outcome::Failed(error) => error.to_string(),
                Outcome::Ended(reason) => format!("stream {stream}: {reason}"),
            };
            let (attempt, delay) = backoff.failed();
            let next_delay_ms = delay.as_millis() as u64;
            tracing::warn!(
                stream = %stream, attempt, next_delay_ms, %reason, "source lost; rebuilding it"
            );
            self.context.metrics.reconnects.fetch_add(1, Ordering::Relaxed);
            self.context.metrics.set_status("reconnecting");
            let status = SourceStatus::Reconnecting { attempt, next_delay_ms, reason };
            if !self.send(SourceEvent::Status { stream: Arc::clone(&stream), status }) {
                return;
            }
            if !self.wait(delay) {
                break Ok(());
            }
        };
        let (status, last) = match end {
            Ok(()) => {
                tracing::info!(stream = %stream, "source ended");
                (SourceStatus::Ended, SourceEvent::Ended { stream: Arc::clone(&stream) })
            }
            Err(error) => {
                tracing::warn!(stream = %stream, %error, "source failed");
                let reason = error.to_string();
                (
                    SourceStatus::Failed { reason },
                    SourceEvent::Failed { stream: Arc::clone(&stream), error },
                )
            }
        };
        self.context.metrics.set_status(status.word());
        if self.send(SourceEvent::Status { stream, status }) {
            let _ = self.send(last);
        }
    }

    /// Sends an event, waiting for room; false when nobody takes events any more.
    fn send(&self, event: SourceEvent) -> bool {
        self.context.events.send(event).is_ok()
    }

    /// Waits `delay` unless asked to stop; false when asked to stop.
    fn wait(&self, delay: Duration) -> bool {
        let until = Instant::now() + delay;
        while Instant::now() < until {
            if self.context.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(WAIT_STEP.min(until.saturating_duration_since(Instant::now())));
        }
        !self.context.stop.load(Ordering::Relaxed)
    }
}

/// A jitter seed that differs between streams and between runs, so cameras that fail together
/// do not come back together.
fn seed(stream: &str) -> u64 {
    stream.bytes().fold(crate::backoff::seed_from_clock(), |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}
