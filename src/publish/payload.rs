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
    /// The current label; absent before the first classification.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// When `label` last changed, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// `seq` of the classification this state reflects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Why the stream failed, for `status = "failed"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub updated_at: String,
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
