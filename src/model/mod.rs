//! Model bundles on disk, the project's ONNX writer, and the inference backends.
//!
//! SKELETON: the shared types are fixed here; the bodies are filled in by the model work.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The outcome of one frame through backbone → PCA → head.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Softmax scores, one per label, in label order.
    pub scores: Vec<f32>,
    /// The pooled PCA projection (k floats).
    pub embedding: Vec<f32>,
}

/// Wall time of each model stage for one batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    pub backbone: Duration,
    /// PCA projection and head together.
    pub head: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    #[error("inference failed: {0}")]
    Inference(String),
}

/// Name, version and checksum that every payload carries.
#[derive(Debug, Clone)]
pub struct ModelIdentity {
    pub name: String,
    pub version: String,
    /// sha256 of the manifest's checksum list, hex.
    pub checksum: String,
}

/// A bundle directory, opened and checked.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub identity: ModelIdentity,
    pub labels: Vec<String>,
    pub input_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub components: usize,
}

impl Bundle {
    pub fn open(dir: &Path) -> Result<Bundle, ModelError> {
        let _ = dir;
        unimplemented!("filled by the model work")
    }
}

/// An inference backend: a batch of CHW f32 frames in, one [`Prediction`] per frame out.
pub trait Backend: Send {
    /// `input` holds `n` frames of `3 * S * S` values each.
    fn infer(&mut self, input: &[f32], n: usize) -> Result<(Vec<Prediction>, StageTimes), ModelError>;
}
