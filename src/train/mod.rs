//! The training mode: from a folder of labelled images to a bundle the daemon runs unchanged.
//! Built so far: the five visual conditions (`conditions`, plain Rust, used for augmentation and
//! as an evaluation axis), the PCA fit on backbone feature maps (`pca_fit`) and head training
//! (`head_fit`), both feature `torch`.
//! The rest of `edgesight train` (feature extraction and its cache, the bundle and the report)
//! is the training issue's remaining work.

pub mod conditions;
#[cfg(feature = "torch")]
pub mod head_fit;
#[cfg(feature = "torch")]
pub mod pca_fit;
