//! The engine: sampled frames in, [`Classification`]s and stream states out.
//!
//! It runs on a thread of its own because inference blocks for tens of milliseconds per frame.
//! Frames arrive from every source through one bounded channel (so a slow model shows up as
//! back-pressure on file sources, not as memory). Frames of different streams are gathered
//! into batches (policy in [`batch`]: at most `engine.max_batch` frames, never held longer
//! than `engine.max_wait_ms`) and run through the backend in one call; results leave in
//! arrival order, so each stream's order is kept. The bookkeeping that decides sequence
//! numbers, the smoothed label ([`smoothing`]) and when a stream's retained state is due lives
//! in [`StreamBook`], a plain struct with no I/O, so it is tested without a model or a broker.

pub mod batch;
pub mod smoothing;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::config::{Classifications, Settings, SmoothingSettings};
use crate::metrics::Metrics;
use crate::model::{Backend, Bundle, Prediction, StageTimes};
use crate::preprocess::{Frame, Preprocess};
use crate::publish::Message;
use crate::publish::payload::{
    Classification, LabelScore, Latency, ModelRef, SCHEMA_VERSION, StreamState, rfc3339_ms,
};
use crate::source::{SourceEvent, SourceFrame, SourceStatus};

pub use batch::{Batcher, Next};
pub use smoothing::{Smoothed, Smoother};

/// How often an idle engine wakes up to check for due state heartbeats.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// Who the engine is publishing as, how it batches and what it puts in each payload.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub device: String,
    pub run_id: String,
    /// Labels listed in `top_k`; at least 1.
    pub top_k: usize,
    /// Include the PCA embedding in each payload.
    pub embeddings: bool,
    /// Most frames per backend call (1 = no batching).
    pub max_batch: usize,
    /// Longest the first frame of a batch waits for company.
    pub max_wait: Duration,
    /// Republish running streams' states this often; `None` = on change only.
    pub state_heartbeat: Option<Duration>,
    pub classifications: Classifications,
    /// Smoothing of streams without their own, and per-stream settings (already merged).
    pub smoothing: SmoothingSettings,
    pub stream_smoothing: HashMap<String, SmoothingSettings>,
}

impl EngineOptions {
    /// The options `settings` ask for, publishing as `run_id`.
    pub fn from_settings(settings: &Settings, run_id: &str) -> EngineOptions {
        let engine = &settings.engine;
        EngineOptions {
            device: settings.device_id.clone(),
            run_id: run_id.to_string(),
            top_k: engine.top_k,
            embeddings: engine.embeddings,
            max_batch: engine.max_batch.max(1),
            max_wait: Duration::from_millis(engine.max_wait_ms),
            state_heartbeat: (engine.state_heartbeat_s > 0)
                .then(|| Duration::from_secs(engine.state_heartbeat_s)),
            classifications: engine.classifications,
            smoothing: settings.smoothing.clone(),
            stream_smoothing: settings
                .streams
                .iter()
                .filter_map(|stream| {
                    let own = stream.smoothing.as_ref()?;
                    Some((stream.name.clone(), settings.smoothing.with(Some(own))))
                })
                .collect(),
        }
    }

    /// Plain defaults (no batching wait, no smoothing, no heartbeat), for tests and tools.
    pub fn new(device: &str, run_id: &str) -> EngineOptions {
        EngineOptions {
            device: device.to_string(),
            run_id: run_id.to_string(),
            top_k: 3,
            embeddings: false,
            max_batch: 1,
            max_wait: Duration::ZERO,
            state_heartbeat: None,
            classifications: Classifications::Every,
            smoothing: SmoothingSettings::default(),
            stream_smoothing: HashMap::new(),
        }
    }
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

/// Per-stream sequence numbers, smoothed labels and state timing.
#[derive(Debug, Default)]
pub struct StreamBook {
    defaults: SmoothingSettings,
    overrides: HashMap<String, SmoothingSettings>,
    streams: HashMap<Arc<str>, StreamEntry>,
}

#[derive(Debug)]
struct StreamEntry {
    next_seq: u64,
    smoother: Smoother,
    /// When the smoothed label took over.
    since: Option<SystemTime>,
    /// The latest frame's top-1 label and score.
    raw: Option<(usize, f32)>,
    /// The latest frame's score of the smoothed label.
    score: Option<f32>,
    /// When a state of this stream was last handed to the publisher.
    last_state: Option<Instant>,
    /// Ended or failed: no more heartbeats.
    finished: bool,
}

/// What [`StreamBook::record`] decided for one classified frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// Per stream from 0; counts every classified frame, published or not.
    pub seq: u64,
    /// The smoothed label after this frame.
    pub label: Option<usize>,
    /// The smoothed label differs from the one before (or is the first).
    pub changed: bool,
    /// When the smoothed label took over (the frame's time when there is none).
    pub since: SystemTime,
}

/// A stream's current state as the book knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamView {
    pub label: Option<usize>,
    pub score: Option<f32>,
    pub raw: Option<(usize, f32)>,
    pub since: Option<SystemTime>,
    /// `seq` of the latest classified frame.
    pub seq: Option<u64>,
}

impl StreamBook {
    /// A book smoothing with `defaults`, or a stream's own settings from `overrides`.
    pub fn new(defaults: SmoothingSettings, overrides: HashMap<String, SmoothingSettings>) -> Self {
        StreamBook { defaults, overrides, streams: HashMap::new() }
    }

    fn entry(&mut self, stream: &Arc<str>) -> &mut StreamEntry {
        let settings = self.overrides.get(&**stream).unwrap_or(&self.defaults).clone();
        self.streams.entry(stream.clone()).or_insert_with(|| StreamEntry {
            next_seq: 0,
            smoother: Smoother::new(settings),
            since: None,
            raw: None,
            score: None,
            last_state: None,
            finished: false,
        })
    }

    /// Gives the stream's next sequence number and runs `scores` through its smoother.
    pub fn record(&mut self, stream: &Arc<str>, scores: &[f32], at: SystemTime) -> Recorded {
        let entry = self.entry(stream);
        let seq = entry.next_seq;
        entry.next_seq += 1;
        // A stream that ended and runs again (restarted by a reload) says so in its state.
        let resumed = std::mem::replace(&mut entry.finished, false);
        let seconds = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let smoothed = entry.smoother.push(scores, seconds.as_secs_f64());
        let raw = top_k(scores, 1).first().map(|&index| (index, scores[index]));
        entry.raw = raw;
        entry.score = smoothed.label.and_then(|label| scores.get(label).copied());
        if smoothed.changed {
            entry.since = smoothed
                .label
                .map(|_| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(smoothed.since));
        }
        Recorded {
            seq,
            label: smoothed.label,
            changed: smoothed.changed || resumed,
            since: entry.since.unwrap_or(at),
        }
    }

    /// Classifications so far for `stream`.
    pub fn count(&self, stream: &str) -> u64 {
        self.streams.get(stream).map_or(0, |entry| entry.next_seq)
    }

    /// What a state message of `stream` says now.
    pub fn view(&self, stream: &str) -> StreamView {
        match self.streams.get(stream) {
            None => StreamView { label: None, score: None, raw: None, since: None, seq: None },
            Some(entry) => StreamView {
                label: entry.smoother.label(),
                score: entry.score,
                raw: entry.raw,
                since: entry.since,
                seq: entry.next_seq.checked_sub(1),
            },
        }
    }

    /// A state of `stream` went to the publisher at `now`.
    pub fn state_sent(&mut self, stream: &Arc<str>, now: Instant) {
        self.entry(stream).last_state = Some(now);
    }

    /// Forgets every stream's labels and smoothing (a new model with other labels), keeping
    /// the sequence numbers; each stream's next frame publishes its state again.
    pub fn reset_labels(&mut self) {
        for entry in self.streams.values_mut() {
            entry.smoother = entry.smoother.fresh();
            entry.since = None;
            entry.raw = None;
            entry.score = None;
        }
    }

    /// `stream` ended or failed: it gets no more heartbeats.
    pub fn finish(&mut self, stream: &Arc<str>) {
        self.entry(stream).finished = true;
    }

    /// Running streams whose last state is at least `every` old at `now`, by name.
    pub fn heartbeats_due(&self, now: Instant, every: Duration) -> Vec<Arc<str>> {
        let mut due: Vec<Arc<str>> = self
            .streams
            .iter()
            .filter(|(_, entry)| !entry.finished)
            .filter(|(_, entry)| {
                entry.last_state.is_some_and(|sent| now.saturating_duration_since(sent) >= every)
            })
            .map(|(stream, _)| stream.clone())
            .collect();
        due.sort();
        due
    }
}

/// Indices of the `k` best scores, best first (ties keep label order).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order.truncate(k.max(1));
    order
}

/// Frames through preprocessing and the backend, with the bundle's labels: the part the
/// daemon's engine and the one-shot `classify` command share. The input buffer is reused from
/// batch to batch.
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
    /// This frame's preprocessing.
    pub preprocess: Duration,
    /// The backend stages of the whole batch the frame ran in.
    pub stages: StageTimes,
    /// Frames in that batch.
    pub batch: usize,
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

    /// The library, device and precision of the backend.
    pub fn backend_info(&self) -> crate::model::BackendInfo {
        self.backend.info()
    }

    /// Preprocesses `frame` and runs it through the backend (batch of one).
    pub fn run(&mut self, frame: &Frame) -> Result<FrameResult, String> {
        self.run_batch(&[frame]).pop().unwrap_or_else(|| Err("no result".into()))
    }

    /// Preprocesses `frames` and runs the ones that preprocessed in one backend call. The
    /// results are in the order of `frames`; a frame that cannot be preprocessed fails alone.
    pub fn run_batch(&mut self, frames: &[&Frame]) -> Vec<Result<FrameResult, String>> {
        let side = self.preprocess.size as usize;
        let size = 3 * side * side;
        if self.input.len() < frames.len() * size {
            self.input.resize(frames.len() * size, 0.0);
        }
        let mut prepared: Vec<Result<Duration, String>> = Vec::with_capacity(frames.len());
        let mut ok = 0;
        for frame in frames {
            let started = Instant::now();
            let slot = &mut self.input[ok * size..(ok + 1) * size];
            match self.preprocess.try_write_tensor(frame, slot) {
                Ok(()) => {
                    ok += 1;
                    prepared.push(Ok(started.elapsed()));
                }
                Err(error) => prepared.push(Err(error.to_string())),
            }
        }
        let inferred = if ok == 0 {
            Ok((Vec::new(), StageTimes::default()))
        } else {
            match self.backend.infer(&self.input[..ok * size], ok) {
                Ok((predictions, _)) if predictions.len() != ok => Err(format!(
                    "the backend returned {} predictions for {ok} frames",
                    predictions.len()
                )),
                Ok(done) => Ok(done),
                Err(error) => Err(error.to_string()),
            }
        };
        match inferred {
            Ok((predictions, stages)) => {
                let mut predictions = predictions.into_iter();
                prepared
                    .into_iter()
                    .map(|prepared| {
                        let preprocess = prepared?;
                        let prediction = predictions.next().ok_or("no prediction")?;
                        Ok(FrameResult { prediction, preprocess, stages, batch: ok })
                    })
                    .collect()
            }
            Err(reason) => prepared.into_iter().map(|p| p.and(Err(reason.clone()))).collect(),
        }
    }

    /// The label of score `index`, or `#index` when the bundle has fewer labels.
    pub fn label(&self, index: usize) -> String {
        self.labels.get(index).cloned().unwrap_or_else(|| format!("#{index}"))
    }
}

/// The publisher has gone away; the engine stops.
struct Stopped;

/// The model fields of every payload.
fn model_ref(bundle: &Bundle) -> ModelRef {
    ModelRef {
        name: bundle.identity.name.clone(),
        version: bundle.identity.version.clone(),
        checksum: bundle.identity.checksum.clone(),
    }
}

/// A model waiting to replace the engine's current one (SIGHUP reload). The engine takes it
/// before its next batch, so a batch never mixes two models and no frame waits for the load.
#[derive(Clone, Default)]
pub struct ModelSlot(Arc<Mutex<Option<(FrameModel, ModelRef)>>>);

impl ModelSlot {
    /// Queues `model` (built from `bundle`); a model queued earlier and not taken yet is
    /// replaced.
    pub fn put(&self, model: FrameModel, bundle: &Bundle) {
        let identity = model_ref(bundle);
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some((model, identity));
    }

    fn take(&self) -> Option<(FrameModel, ModelRef)> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take()
    }
}

/// Runs frames through the model until every stream has ended and the channel is closed.
pub struct Engine {
    frames: FrameModel,
    model: ModelRef,
    slot: ModelSlot,
    options: EngineOptions,
    book: StreamBook,
    metrics: Arc<Metrics>,
    /// Each stream's latest source status and when it was last handed to the publisher, so
    /// that the heartbeat restores a retained status a restarted broker forgot.
    statuses: HashMap<Arc<str>, (SourceStatus, Instant)>,
}

impl Engine {
    pub fn new(
        backend: Box<dyn Backend>,
        bundle: &Bundle,
        options: EngineOptions,
        metrics: Arc<Metrics>,
    ) -> Engine {
        Engine {
            frames: FrameModel::new(backend, bundle),
            model: model_ref(bundle),
            slot: ModelSlot::default(),
            book: StreamBook::new(options.smoothing.clone(), options.stream_smoothing.clone()),
            options,
            metrics,
            statuses: HashMap::new(),
        }
    }

    /// Where a reload puts the next model; the engine swaps it in before its next batch.
    pub fn model_slot(&self) -> ModelSlot {
        self.slot.clone()
    }

    /// Consumes events until all senders are gone, sending results to `out`. Returns early
    /// only if the publisher has gone away.
    pub fn run(
        mut self,
        events: Receiver<SourceEvent>,
        out: mpsc::Sender<Message>,
    ) -> EngineSummary {
        let mut summary = EngineSummary::default();
        let mut batcher = Batcher::new(self.options.max_batch, self.options.max_wait);
        let mut batch: Vec<SourceFrame> = Vec::with_capacity(batcher.max_batch());
        let mut deferred: Option<SourceEvent> = None;
        let mut open = true;
        while open || !batch.is_empty() || deferred.is_some() {
            if self.heartbeats(&out).is_err() {
                return summary;
            }
            let depth = events.len() + batch.len();
            self.metrics.engine.queue_depth.store(depth as u64, Ordering::Relaxed);
            let event = if let Some(event) = deferred.take() {
                Some(event)
            } else {
                match batcher.next(Instant::now()) {
                    Next::Run => None,
                    Next::Idle if !open => None,
                    Next::Idle => match self.options.state_heartbeat {
                        Some(_) => match events.recv_timeout(IDLE_TICK) {
                            Ok(event) => Some(event),
                            Err(RecvTimeoutError::Timeout) => continue,
                            Err(RecvTimeoutError::Disconnected) => {
                                open = false;
                                continue;
                            }
                        },
                        None => match events.recv() {
                            Ok(event) => Some(event),
                            Err(_) => {
                                open = false;
                                continue;
                            }
                        },
                    },
                    Next::WaitUntil(deadline) if open => match events.recv_deadline(deadline) {
                        Ok(event) => Some(event),
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => {
                            open = false;
                            continue;
                        }
                    },
                    Next::WaitUntil(_) => None,
                }
            };
            match event {
                Some(SourceEvent::Frame(mut frame)) => {
                    frame.taken();
                    batch.push(frame);
                    batcher.push(Instant::now());
                }
                Some(other) if !batch.is_empty() => {
                    // The stream's frames in the open batch come before its end.
                    deferred = Some(other);
                    if self.run_batch(&mut batch, &out).is_err() {
                        return summary;
                    }
                    batcher.clear();
                }
                Some(other) => {
                    if self.end_of_stream(other, &mut summary, &out).is_err() {
                        return summary;
                    }
                }
                None => {
                    // Due: top the batch up with what is already queued, then run it.
                    while open && batch.len() < batcher.max_batch() {
                        match events.try_recv() {
                            Ok(SourceEvent::Frame(mut frame)) => {
                                frame.taken();
                                batch.push(frame);
                            }
                            Ok(other) => {
                                deferred = Some(other);
                                break;
                            }
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => open = false,
                        }
                    }
                    if !batch.is_empty() && self.run_batch(&mut batch, &out).is_err() {
                        return summary;
                    }
                    batcher.clear();
                }
            }
        }
        self.metrics.engine.queue_depth.store(0, Ordering::Relaxed);
        for stream in summary.ended.iter().chain(summary.failed.iter().map(|(s, _)| s)) {
            summary.classified.insert(stream.clone(), self.book.count(stream));
        }
        summary
    }

    /// A stream's last event: its final retained state.
    fn end_of_stream(
        &mut self,
        event: SourceEvent,
        summary: &mut EngineSummary,
        out: &mpsc::Sender<Message>,
    ) -> Result<(), Stopped> {
        let (stream, state) = match event {
            SourceEvent::Frame(_) => return Ok(()),
            SourceEvent::Status { stream, status } => {
                let (device, run_id) = (&self.options.device, &self.options.run_id);
                let message = Message::StreamStatus(status.payload(&stream, device, run_id));
                self.statuses.insert(stream, (status, Instant::now()));
                return send(out, message);
            }
            SourceEvent::Ended { stream } => {
                info!(%stream, frames = self.book.count(&stream), "stream ended");
                summary.ended.push(stream.to_string());
                self.metrics.stream(&stream).set_status("ended");
                let state = self.state(&stream, "ended", None);
                (stream, state)
            }
            SourceEvent::Failed { stream, error } => {
                error!(%stream, %error, "stream failed");
                let reason = error.to_string();
                summary.failed.push((stream.to_string(), reason.clone()));
                self.metrics.stream(&stream).set_status("failed");
                let state = self.state(&stream, "failed", Some(reason));
                (stream, state)
            }
        };
        self.book.finish(&stream);
        send(out, Message::State(state))
    }

    /// Republishes the state of every running stream whose heartbeat is due.
    fn heartbeats(&mut self, out: &mpsc::Sender<Message>) -> Result<(), Stopped> {
        let Some(every) = self.options.state_heartbeat else { return Ok(()) };
        let now = Instant::now();
        for stream in self.book.heartbeats_due(now, every) {
            debug!(%stream, "state heartbeat");
            send(out, Message::State(self.state(&stream, "running", None)))?;
            self.book.state_sent(&stream, now);
        }
        // Source statuses too, but not `ended`: a stream a reload removed stays quiet.
        let (device, run_id) = (&self.options.device, &self.options.run_id);
        for (stream, (status, sent)) in &mut self.statuses {
            if *status == SourceStatus::Ended || now.saturating_duration_since(*sent) < every {
                continue;
            }
            debug!(%stream, status = status.word(), "status heartbeat");
            send(out, Message::StreamStatus(status.payload(stream, device, run_id)))?;
            *sent = now;
        }
        Ok(())
    }

    /// Runs the gathered frames in one backend call and publishes the results in order.
    fn run_batch(
        &mut self,
        batch: &mut Vec<SourceFrame>,
        out: &mpsc::Sender<Message>,
    ) -> Result<(), Stopped> {
        if let Some((model, identity)) = self.slot.take() {
            info!(
                from = %self.model.checksum, to = %identity.checksum, model = %identity.name,
                "model swapped"
            );
            self.frames = model;
            self.model = identity;
            // Label indices of the old model mean nothing to the new one.
            self.book.reset_labels();
        }
        let frames: Vec<SourceFrame> = std::mem::take(batch);
        let queued: Vec<Duration> =
            frames.iter().map(|frame| frame.captured.elapsed().unwrap_or_default()).collect();
        let inputs: Vec<&Frame> = frames.iter().map(|frame| &frame.frame).collect();
        let results = self.frames.run_batch(&inputs);
        let engine = &self.metrics.engine;
        let ran = results.iter().filter(|result| result.is_ok()).count() as u64;
        if ran > 0 {
            engine.batches.fetch_add(1, Ordering::Relaxed);
            engine.batched_frames.fetch_add(ran, Ordering::Relaxed);
        }
        engine.progress.fetch_add(1, Ordering::Relaxed);
        debug!(frames = frames.len(), ran, "batch");
        for ((frame, result), queued) in frames.into_iter().zip(results).zip(queued) {
            let result = match result {
                Ok(result) => result,
                Err(reason) => {
                    error!(stream = %frame.stream, error = %reason, "frame not classified; lost");
                    continue;
                }
            };
            let stream_metrics = self.metrics.stream(&frame.stream);
            if stream_metrics.status().is_empty() {
                stream_metrics.set_status("online");
            }
            let inference = result.preprocess + result.stages.backbone + result.stages.head;
            stream_metrics.inference_ms.record(inference.as_secs_f64() * 1e3);
            stream_metrics.classified.fetch_add(1, Ordering::Relaxed);
            let latency = Latency {
                queue: millis(queued),
                preprocess: millis(result.preprocess),
                backbone: millis(result.stages.backbone),
                head: millis(result.stages.head),
                total: millis(frame.captured.elapsed().unwrap_or_default()),
            };
            for message in self.messages(&frame, result.prediction, latency) {
                let is_classification = matches!(message, Message::Classification(_));
                send(out, message)?;
                if is_classification {
                    let total = frame.captured.elapsed().unwrap_or_default();
                    stream_metrics.capture_to_publish_ms.record(total.as_secs_f64() * 1e3);
                }
            }
        }
        Ok(())
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
        let recorded = self.book.record(&frame.stream, &prediction.scores, frame.captured);
        debug!(stream = %frame.stream, seq = recorded.seq, %label, score, "classified");
        let mut messages = Vec::with_capacity(2);
        if self.options.classifications == Classifications::Every || recorded.changed {
            messages.push(Message::Classification(Classification {
                schema: SCHEMA_VERSION,
                device: self.options.device.clone(),
                stream: frame.stream.to_string(),
                run_id: self.options.run_id.clone(),
                seq: recorded.seq,
                captured_at: rfc3339_ms(frame.captured),
                position_ms: frame.position_ms,
                label,
                score,
                top_k: top,
                latency_ms: latency,
                model: self.model.clone(),
                embedding: self.options.embeddings.then_some(prediction.embedding),
                replayed: false,
            }));
        }
        if recorded.changed {
            messages.push(Message::State(self.state(&frame.stream, "running", None)));
            self.book.state_sent(&frame.stream, Instant::now());
        }
        messages
    }

    fn state(&self, stream: &str, status: &str, error: Option<String>) -> StreamState {
        let view = self.book.view(stream);
        StreamState {
            schema: SCHEMA_VERSION,
            device: self.options.device.clone(),
            stream: stream.to_string(),
            run_id: self.options.run_id.clone(),
            status: status.into(),
            label: view.label.map(|index| self.frames.label(index)),
            score: view.label.and(view.score),
            since: view.label.and(view.since).map(rfc3339_ms),
            seq: view.seq,
            raw_label: view.raw.map(|(index, _)| self.frames.label(index)),
            raw_score: view.raw.map(|(_, score)| score),
            error,
            updated_at: rfc3339_ms(SystemTime::now()),
            replayed: false,
        }
    }
}

fn send(out: &mpsc::Sender<Message>, message: Message) -> Result<(), Stopped> {
    out.blocking_send(message).map_err(|_| {
        warn!("publisher stopped; engine stops");
        Stopped
    })
}

fn millis(duration: std::time::Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests;
