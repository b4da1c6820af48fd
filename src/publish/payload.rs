//! The JSON payloads edgesight publishes. `schema/classification.schema.json` describes
//! [`Classification`]; a test checks every message sent against it.

use serde::{Deserialize, Serialize};

/// Version of the payload layout; bumped when a field changes meaning or goes away.
pub const SCHEMA_VERSION: u32 = 1;

/// `<prefix>/<stream>/classification`: one sampled frame's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Classification {
    pub schema: u32,
    pub device: String,
    pub stream: String,
    /// New at each daemon start, so a consumer can tell a restart from a gap in `seq`.
    pub run_id: String,
    /// Per stream, from 0, without gaps within one run.
    pub seq: u64,
    /// When the frame left the decoder, UTC, RFC 3339 with milliseconds.
    pub captured_at: String,
    /// The frame's position in the stream, milliseconds, when the source knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position_ms: Option<u64>,
    pub label: String,
    pub score: f32,
    /// The best labels, best first; the first is `label`.
    pub top_k: Vec<LabelScore>,
    pub latency_ms: Latency,
    pub model: ModelRef,
    /// The pooled PCA projection (k floats), when `engine.embeddings` is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
    /// True when the message waited in the on-disk spool during a broker outage and is
    /// published late; absent otherwise.
    #[serde(default, skip_serializing_if = "is_false")]
    pub replayed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelScore {
    pub label: String,
    pub score: f32,
}

/// Per-stage wall time for the frame, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Waiting between capture and the start of inference.
    pub queue: f64,
    pub preprocess: f64,
    pub backbone: f64,
    /// PCA projection and head.
    pub head: f64,
    /// Capture to the payload being handed to the publisher.
    pub total: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
    pub checksum: String,
}

/// `<prefix>/<stream>/state` (retained): the stream's current label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamState {
    pub schema: u32,
    pub device: String,
    pub stream: String,
    pub run_id: String,
    /// `running`, `ended` or `failed`.
    pub status: String,
    /// The current smoothed label; absent before the first classification, and while the
    /// smoothing holds no label (ema below its thresholds, or the first label's dwell time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// When `label` last changed, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// `seq` of the latest classified frame (with `engine.classifications = "on_change"`
    /// that frame's classification may not have been published).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The top-1 label and score of the latest frame, before smoothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_score: Option<f32>,
    /// Why the stream failed, for `status = "failed"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub updated_at: String,
    /// True when the message waited in the on-disk spool; absent otherwise.
    #[serde(default, skip_serializing_if = "is_false")]
    pub replayed: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// `<prefix>/<device>/stats` (QoS 0, not retained): counters over the last interval.
/// `schema/stats.schema.json` describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub schema: u32,
    pub device: String,
    pub run_id: String,
    /// When the figures were taken, RFC 3339.
    pub at: String,
    /// Seconds the rates were measured over (since the previous message or the start).
    pub interval_s: f64,
    pub uptime_s: f64,
    /// Per stream, by name.
    pub streams: std::collections::BTreeMap<String, StreamStats>,
    pub engine: EngineStats,
    pub publish: PublishStats,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamStats {
    /// The source's state (`online`, `reconnecting`, `failed`, `ended`; `unknown` before the
    /// source reported one).
    pub status: String,
    /// Sampled frames per second over the interval.
    pub fps_in: f64,
    /// Classified frames per second over the interval.
    pub fps_out: f64,
    /// Totals since the start.
    pub decoded: u64,
    pub sampled: u64,
    pub classified: u64,
    pub dropped: u64,
    pub reconnects: u64,
    /// Frames of this stream waiting in the engine's queue now.
    pub queued: u64,
    /// Percentiles of the recent frames (up to 512), milliseconds.
    pub inference_ms: Percentiles,
    pub capture_to_publish_ms: Percentiles,
}

/// p50, p90, p99 in milliseconds; absent before the first sample.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Percentiles {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p90: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineStats {
    /// `tract` or `torch`, the device it runs on (`cpu`, `cuda:N`) and the trunk's precision;
    /// absent before the model is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    /// Frames waiting for inference when the figures were taken.
    pub queue_depth: u64,
    /// Totals since the start.
    pub batches: u64,
    pub batched_frames: u64,
    /// Mean frames per backend call over the interval; absent when no batch ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_mean: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishStats {
    pub connected: bool,
    pub spool_depth: u64,
    pub spool_bytes: u64,
    /// Totals since the start.
    pub spool_overflow: u64,
    pub replayed: u64,
    pub failures: u64,
}

/// `<prefix>/<stream>/status` (retained): whether the stream's source is delivering frames.
/// `schema/status.schema.json` describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamStatus {
    pub schema: u32,
    pub device: String,
    pub stream: String,
    pub run_id: String,
    /// `online`, `reconnecting`, `failed` or `ended`.
    pub status: String,
    /// `reconnecting`: failures since the source last delivered frames, from 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// `reconnecting`: milliseconds until the source is rebuilt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_delay_ms: Option<u64>,
    /// `reconnecting` and `failed`: what went wrong (credentials masked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub updated_at: String,
}

/// UTC time as RFC 3339 with milliseconds, e.g. `2026-12-04T17:07:18.123Z`.
pub fn rfc3339_ms(time: std::time::SystemTime) -> String {
    let time: chrono::DateTime<chrono::Utc> = time.into();
    time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
