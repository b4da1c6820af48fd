//! The training mode (feature `torch`): from a folder of labelled images to a bundle the daemon
//! runs unchanged. Built so far: the PCA fit on backbone feature maps (`pca_fit`). The rest of
//! `edgesight train` (feature extraction and its cache, head training, the five visual
//! conditions, the report) is the training issue's remaining work.

pub mod pca_fit;
