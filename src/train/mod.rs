//! The training mode: from a folder of labelled images to a bundle the daemon runs unchanged.
//!
//! Built so far: reading an ImageFolder and its stratified split (`folder`) and the five visual
//! conditions (`conditions`), both plain Rust; the PCA fit on backbone feature maps (`pca_fit`)
//! and head training (`head_fit`), both on tch (feature `torch`). Still to come for
//! `edgesight train`: feature extraction with its on-disk cache, the bundle writer, the report.

pub mod conditions;
pub mod folder;
#[cfg(feature = "torch")]
pub mod head_fit;
#[cfg(feature = "torch")]
pub mod pca_fit;
