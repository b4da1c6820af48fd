//! The training mode: from a folder of labelled images to a bundle the daemon runs unchanged.
//!
//! Plain Rust: reading an ImageFolder and its stratified split (`folder`), the five visual
//! conditions (`conditions`), the scores (`metrics`) and the report's pictures (`plot`). On tch
//! (feature `torch`): feature extraction with its on-disk cache (`features`), the PCA fit
//! (`pca_fit`), head training (`head_fit`) and the whole `edgesight train` run (`run`).

use std::path::{Path, PathBuf};

pub mod conditions;
#[cfg(feature = "torch")]
pub mod features;
pub mod folder;
#[cfg(feature = "torch")]
pub mod head_fit;
pub mod metrics;
#[cfg(feature = "torch")]
pub mod pca_fit;
pub mod plot;
#[cfg(feature = "torch")]
pub mod run;
#[cfg(feature = "torch")]
pub mod trunk_fit;

/// Why a training run failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error(transparent)]
    Folder(#[from] folder::FolderError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error("{0}")]
    Invalid(String),
    /// A flag out of range or a device that is not there: the command line is at fault.
    #[error("{0}")]
    Usage(String),
    #[cfg(feature = "torch")]
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[cfg(feature = "torch")]
    #[error(transparent)]
    Pca(#[from] pca_fit::PcaError),
    #[cfg(feature = "torch")]
    #[error(transparent)]
    Head(#[from] head_fit::HeadError),
    #[cfg(feature = "torch")]
    #[error(transparent)]
    Trunk(#[from] trunk_fit::TrunkError),
    #[error("stopped before the end; nothing was written to the output directory")]
    Interrupted,
}

/// The values of `tensor` as a vector of `T` on the host (converted, made contiguous).
#[cfg(feature = "torch")]
pub(crate) fn host_values<T: tch::kind::Element + Default + Clone>(
    tensor: &tch::Tensor,
) -> Result<Vec<T>, tch::TchError> {
    let tensor =
        tensor.f_detach()?.f_to_device(tch::Device::Cpu)?.f_to_kind(T::KIND)?.f_contiguous()?;
    let count = tensor.numel();
    let mut out = vec![T::default(); count];
    tensor.f_copy_data(&mut out, count)?;
    Ok(out)
}

impl TrainError {
    pub fn file(path: &Path, reason: impl std::fmt::Display) -> TrainError {
        TrainError::File { path: path.to_path_buf(), reason: reason.to_string() }
    }
}
