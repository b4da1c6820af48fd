//! The engine: sampled frames in, [`Classification`]s and stream states out.
//!
//! It runs on a thread of its own because inference blocks for tens of milliseconds per frame.
//! Frames arrive from every source through one bounded channel (so a slow model shows up as
//! back-pressure on file sources, not as memory), go through preprocessing and the backend,
//! and leave as [`Message`]s for the publisher. The bookkeeping that decides sequence numbers
//! and when a stream's retained state changes lives in [`StreamBook`], a plain struct with no
//! I/O, so it is tested without a model or a broker.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::Receiver;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::model::{Backend, Bundle, Prediction, StageTimes};
use crate::preprocess::{Frame, Preprocess};
use crate::publish::Message;
use crate::publish::payload::{
    Classification, LabelScore, Latency, ModelRef, SCHEMA_VERSION, StreamState, rfc3339_ms,
};
use crate::source::{SourceEvent, SourceFrame};

/// Who the engine is publishing as, and how much it puts in each payload.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: String,
    pub run_id: String,
    /// Labels listed in `top_k`; at least 1.
    pub top_k: usize,
    /// Include the PCA embedding in each payload.
    pub embeddings: bool,
}

/// How each stream ended, once the engine has drained its input.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EngineSummary {
    /// Classifications produced per stream.
    pub classified: HashMap<String, u64>,
    /// Streams that ended normally.
    pub ended: Vec<String>,
    /// Streams that stopped on an error, with the reason.
    pub failed: Vec<(String, String)>,
}

/// Per-stream sequence numbers and current labels.
#[derive(Debug, Default)]
pub struct StreamBook {
    streams: HashMap<Arc<str>, StreamEntry>,
}

#[derive(Debug, Default)]
struct StreamEntry {
    next_seq: u64,
    label: Option<String>,
    since: Option<SystemTime>,
}

/// What [`StreamBook::record`] decided for one classification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub seq: u64,
    /// The label differs from the stream's previous one (or is its first).
    pub changed: bool,
    /// When the current label began.
    pub since: SystemTime,
}

impl StreamBook {
    /// Gives the stream's next sequence number and notes its label.
    pub fn record(&mut self, stream: &Arc<str>, label: &str, at: SystemTime) -> Recorded {
        let entry = self.streams.entry(stream.clone()).or_default();
        let seq = entry.next_seq;
        entry.next_seq += 1;
        let changed = entry.label.as_deref() != Some(label);
        if changed {
            entry.label = Some(label.to_string());
            entry.since = Some(at);
        }
        Recorded { seq, changed, since: entry.since.unwrap_or(at) }
    }

    /// Classifications so far for `stream`.
    pub fn count(&self, stream: &str) -> u64 {
        self.streams.get(stream).map_or(0, |entry| entry.next_seq)
    }

    fn label(&self, stream: &str) -> Option<String> {
        self.streams.get(stream).and_then(|entry| entry.label.clone())
    }
}

/// Indices of the `k` best scores, best first (ties keep label order).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(k.max(1));
    order
}

/// One frame through preprocessing and the backend, with the bundle's labels: the part the
/// daemon's engine and the one-shot `classify` command share. The input buffer is reused from
/// frame to frame.
pub struct FrameModel {
    backend: Box<dyn Backend>,
    preprocess: Preprocess,
    labels: Vec<String>,
    input: Vec<f32>,
}

/// A frame's prediction and what each step cost.
#[derive(Debug)]
pub struct FrameResult {
    pub prediction: Prediction,
    pub preprocess: Duration,
    pub stages: StageTimes,
}

impl FrameModel {
    pub fn new(backend: Box<dyn Backend>, bundle: &Bundle) -> FrameModel {
        let side = bundle.input_size as usize;
        FrameModel {
            backend,
            preprocess: Preprocess { size: bundle.input_size, mean: bundle.mean, std: bundle.std },
            labels: bundle.labels.clone(),
            input: vec![0.0; 3 * side * side],
        }
    }

    /// Preprocesses `frame` and runs it through the backend (batch of one).
    pub fn run(&mut self, frame: &Frame) -> Result<FrameResult, String> {
        let started = Instant::now();
        self.preprocess.try_write_tensor(frame, &mut self.input).map_err(|e| e.to_string())?;
        let preprocess = started.elapsed();
        let (predictions, stages) =
            self.backend.infer(&self.input, 1).map_err(|error| error.to_string())?;
        let prediction =
            predictions.into_iter().next().ok_or("the backend returned no prediction")?;
        Ok(FrameResult { prediction, preprocess, stages })
    }

    /// The label of score `index`, or `#index` when the bundle has fewer labels.
    pub fn label(&self, index: usize) -> String {
        self.labels.get(index).cloned().unwrap_or_else(|| format!("#{index}"))
    }
}

/// Runs frames through the model until every stream has ended and the channel is closed.
pub struct Engine {
    frames: FrameModel,
    model: ModelRef,
    options: EngineOptions,
    book: StreamBook,
}

impl Engine {
    pub fn new(backend: Box<dyn Backend>, bundle: &Bundle, options: EngineOptions) -> Engine {
        Engine {
            frames: FrameModel::new(backend, bundle),
            model: ModelRef {
                name: bundle.identity.name.clone(),
                version: bundle.identity.version.clone(),
                checksum: bundle.identity.checksum.clone(),
            },
            options,
            book: StreamBook::default(),
        }
    }

    /// Consumes events until all senders are gone, sending results to `out`. Returns early
    /// only if the publisher has gone away.
    pub fn run(
        mut self,
        events: Receiver<SourceEvent>,
        out: mpsc::Sender<Message>,
    ) -> EngineSummary {
        let mut summary = EngineSummary::default();
        for event in events {
            let message = match event {
                SourceEvent::Frame(frame) => match self.classify(frame) {
                    Ok(messages) => messages,
                    Err((stream, reason)) => {
                        error!(%stream, error = %reason, "frame not classified; frame lost");
                        continue;
                    }
                },
                SourceEvent::Status { stream, status } => {
                    let (device, run_id) = (&self.options.device, &self.options.run_id);
                    vec![Message::StreamStatus(status.payload(&stream, device, run_id))]
                }
                SourceEvent::Ended { stream } => {
                    info!(%stream, frames = self.book.count(&stream), "stream ended");
                    summary.ended.push(stream.to_string());
                    vec![Message::State(self.state(&stream, "ended", None))]
                }
                SourceEvent::Failed { stream, error } => {
                    error!(%stream, %error, "stream failed");
                    let reason = error.to_string();
                    summary.failed.push((stream.to_string(), reason.clone()));
                    vec![Message::State(self.state(&stream, "failed", Some(reason)))]
                }
            };
            for message in message {
                if out.blocking_send(message).is_err() {
                    warn!("publisher stopped; engine stops");
                    return summary;
                }
            }
        }
        for stream in summary.ended.iter().chain(summary.failed.iter().map(|(s, _)| s)) {
            summary.classified.insert(stream.clone(), self.book.count(stream));
        }
        summary
    }

    /// One frame through the model: a classification, and a state when the label changed.
    fn classify(&mut self, frame: SourceFrame) -> Result<Vec<Message>, (Arc<str>, String)> {
        let queued = frame.captured.elapsed().unwrap_or_default();
        let result =
            self.frames.run(&frame.frame).map_err(|reason| (frame.stream.clone(), reason))?;
        let total = frame.captured.elapsed().unwrap_or_default();
        let latency = Latency {
            queue: millis(queued),
            preprocess: millis(result.preprocess),
            backbone: millis(result.stages.backbone),
            head: millis(result.stages.head),
            total: millis(total),
        };
        Ok(self.messages(&frame, result.prediction, latency))
    }

    fn messages(
        &mut self,
        frame: &SourceFrame,
        prediction: Prediction,
        latency: Latency,
    ) -> Vec<Message> {
        let best = top_k(&prediction.scores, self.options.top_k);
        let top: Vec<LabelScore> = best
            .iter()
            .map(|&index| LabelScore {
                label: self.frames.label(index),
                score: prediction.scores[index],
            })
            .collect();
        let label = top[0].label.clone();
        let score = top[0].score;
        let recorded = self.book.record(&frame.stream, &label, frame.captured);
        debug!(stream = %frame.stream, seq = recorded.seq, %label, score, "classified");
        let classification = Classification {
            schema: SCHEMA_VERSION,
            device: self.options.device.clone(),
            stream: frame.stream.to_string(),
            run_id: self.options.run_id.clone(),
            seq: recorded.seq,
            captured_at: rfc3339_ms(frame.captured),
            position_ms: frame.position_ms,
            label: label.clone(),
            score,
            top_k: top,
            latency_ms: latency,
            model: self.model.clone(),
            embedding: self.options.embeddings.then_some(prediction.embedding),
        };
        let mut messages = vec![Message::Classification(classification)];
        if recorded.changed {
            let mut state = self.state(&frame.stream, "running", None);
            state.score = Some(score);
            state.since = Some(rfc3339_ms(recorded.since));
            state.seq = Some(recorded.seq);
            messages.push(Message::State(state));
        }
        messages
    }

    fn state(&self, stream: &str, status: &str, error: Option<String>) -> StreamState {
        StreamState {
            schema: SCHEMA_VERSION,
            device: self.options.device.clone(),
            stream: stream.to_string(),
            run_id: self.options.run_id.clone(),
            status: status.into(),
            label: self.book.label(stream),
            score: None,
            since: None,
            seq: self.book.count(stream).checked_sub(1),
            error,
            updated_at: rfc3339_ms(SystemTime::now()),
        }
    }
}

fn millis(duration: std::time::Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn numbers_each_stream_from_zero_without_gaps() {
        let mut book = StreamBook::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let now = SystemTime::now();
        let seqs: Vec<u64> =
            [&a, &b, &a, &a, &b].iter().map(|stream| book.record(stream, "x", now).seq).collect();
        assert_eq!(seqs, [0, 0, 1, 2, 1]);
        assert_eq!(book.count("a"), 3);
        assert_eq!(book.count("c"), 0);
    }

    #[test]
    fn reports_a_change_only_when_the_label_changes() {
        let mut book = StreamBook::default();
        let stream: Arc<str> = "door".into();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let t1 = t0 + Duration::from_secs(1);
        let t2 = t0 + Duration::from_secs(2);
        assert!(book.record(&stream, "cat", t0).changed);
        let same = book.record(&stream, "cat", t1);
        assert!(!same.changed);
        assert_eq!(same.since, t0);
        let new = book.record(&stream, "dog", t2);
        assert!(new.changed);
        assert_eq!(new.since, t2);
    }

    #[test]
    fn top_k_orders_best_first_and_breaks_ties_by_label_order() {
        assert_eq!(top_k(&[0.1, 0.5, 0.2, 0.5], 3), [1, 3, 2]);
        assert_eq!(top_k(&[0.3, 0.7], 5), [1, 0]);
        assert_eq!(top_k(&[0.3, 0.7], 0), [1]);
    }
}
