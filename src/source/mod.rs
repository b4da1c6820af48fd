//! GStreamer sources: one pipeline per stream, frames handed off through a bounded channel.
//!
//! SKELETON: the shared types are fixed here; the bodies are filled in by the source work.

use std::sync::Arc;
use std::time::SystemTime;

use crate::preprocess::Frame;

/// A sampled frame from a stream.
#[derive(Debug)]
pub struct SourceFrame {
    pub stream: Arc<str>,
    /// 0-based count of sampled frames of this stream.
    pub index: u64,
    /// Stream position in milliseconds (the buffer's PTS), when known.
    pub position_ms: Option<u64>,
    /// Wall-clock time the frame left the decoder.
    pub captured: SystemTime,
    pub frame: Frame,
}

/// What sources tell the engine.
#[derive(Debug)]
pub enum SourceEvent {
    Frame(SourceFrame),
    /// The stream ended normally (end of file, or `frames` reached).
    Ended { stream: Arc<str> },
    /// The stream stopped on an error; other streams go on.
    Failed { stream: Arc<str>, error: SourceError },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    #[error("stream {stream}: {reason}")]
    Pipeline { stream: String, reason: String },
}
