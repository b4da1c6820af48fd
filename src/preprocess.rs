//! Frames and the preprocessing that turns them into the model's input tensor.
//!
//! SKELETON: the shared types are fixed here; the bodies are filled in by the preprocessing
//! work.

use std::path::{Path, PathBuf};

/// One decoded picture: RGB8, rows packed tightly (`data.len() == width * height * 3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// How a bundle wants its input: square side `size`, per-channel mean and std (0–1 scale).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("{path}: {reason}")]
    Decode { path: PathBuf, reason: String },
}

impl Preprocess {
    /// Writes one frame as CHW f32 (`3 * size * size` values) into `out`.
    pub fn write_tensor(&self, frame: &Frame, out: &mut [f32]) {
        let _ = (frame, out);
        unimplemented!("filled by the preprocessing work")
    }
}

/// Decodes an image file to RGB, applying EXIF orientation.
pub fn load_image(path: &Path) -> Result<Frame, PreprocessError> {
    let _ = path;
    unimplemented!("filled by the preprocessing work")
}
