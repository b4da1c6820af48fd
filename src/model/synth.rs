//! `edgesight model synth`: a complete bundle with a seeded, architecture-exact ResNet-50, and
//! the ResNet-50 file variants the loader is tested on.
//!
//! Real pretrained weights cannot be downloaded on build machines, yet tests and benchmarks
//! need a model with the real graph and the real cost. A synthetic bundle is that model: every
//! file is a pure function of [`SynthOptions`] (apart from the `created` time in the manifest),
//! and the bundle appears at its destination only when complete — it is written to a temporary
//! directory beside it and renamed, so a daemon watching for a new bundle never sees half of one.

use std::path::{Path, PathBuf};

use super::ModelError;
use super::bundle::{BACKBONE, HEAD, HEAD_WEIGHTS, MANIFEST, Manifest, PCA, sha256_file};
use super::head::HeadWeights;
use super::onnx;
use super::pca::Pca;
use super::resnet::{self, FEATURE_CHANNELS, GraphStyle, ResNet50};

pub use super::resnet::{Naming, Tail};

/// PCA components kept by synthetic bundles (the cap the training mode uses).
pub const SYNTH_COMPONENTS: usize = 200;

/// What `edgesight model synth` makes.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthOptions {
    /// Seed of every weight (default 0).
    pub seed: u64,
    /// Class labels, one per head output (default `class-0` … `class-9`).
    pub labels: Vec<String>,
    /// Input side in pixels, a multiple of 32 (default 224).
    pub input_size: u32,
    /// Bundle name in the manifest (default `synth-resnet50`).
    pub name: String,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            seed: 0,
            labels: (0..10).map(|i| format!("class-{i}")).collect(),
            input_size: 224,
            name: "synth-resnet50".to_string(),
        }
    }
}

/// How to write one ResNet-50 file for loader tests (see [`write_resnet50_variant`]).
#[derive(Debug, Clone)]
pub struct VariantOptions {
    pub seed: u64,
    pub input_size: u32,
    pub naming: Naming,
    pub opset: i64,
    /// Fold batch norm into convolution biases.
    pub fold_bn: bool,
    /// `None` for a symbolic batch dimension `N`.
    pub batch: Option<u32>,
    pub tail: Tail,
}

impl VariantOptions {
    /// The layout of a bundle's `backbone.onnx`: torchvision names, opset 17, symbolic batch,
    /// batch norm as separate nodes, no classifier.
    pub fn torchvision(seed: u64, input_size: u32) -> VariantOptions {
        VariantOptions {
            seed,
            input_size,
            naming: Naming::Torchvision,
            opset: 17,
            fold_bn: false,
            batch: None,
            tail: Tail::None,
        }
    }

    /// An ONNX-zoo-v1-style file: `resnetv17_*` names, opset 8 (IR 3, initializers listed as
    /// inputs), global pool → Flatten → Gemm(2048→1000) classifier.
    pub fn zoo_v1(seed: u64, input_size: u32) -> VariantOptions {
        VariantOptions {
            naming: Naming::ZooV1,
            opset: 8,
            tail: Tail::FlattenGemm,
            ..VariantOptions::torchvision(seed, input_size)
        }
    }
}

/// Writes a ResNet-50 ONNX file in the given style; returns the name of its 2048-channel
/// feature-map tensor. Every style of one seed computes the same feature map.
pub fn write_resnet50_variant(path: &Path, options: &VariantOptions) -> Result<String, ModelError> {
    check_input_size(options.input_size, path)?;
    let net = ResNet50::generate(options.seed);
    let style = GraphStyle {
        naming: options.naming,
        opset: options.opset,
        fold_bn: options.fold_bn,
        batch: options.batch,
        input_size: options.input_size,
        tail: options.tail,
    };
    let (model, features) = resnet::write_graph(&net, &style);
    std::fs::write(path, onnx::encode(&model)).map_err(|e| ModelError::bundle(path, e))?;
    Ok(features)
}

fn check_input_size(size: u32, path: &Path) -> Result<(), ModelError> {
    if size < 32 || !size.is_multiple_of(32) {
        let reason = format!("input size {size} is not a positive multiple of 32");
        return Err(ModelError::bundle(path, reason));
    }
    Ok(())
}

/// Why a new bundle may not take the place of `out`, if it may not: `out` exists and is not a
/// bundle directory (one with a `manifest.toml`).
pub fn not_replaceable(out: &Path) -> Option<&'static str> {
    if !out.exists() {
        None
    } else if !out.is_dir() {
        Some("is a file, not a bundle directory; refusing to replace it")
    } else if !out.join(MANIFEST).is_file() {
        Some("exists and is not a bundle (no manifest.toml); refusing to replace it")
    } else {
        None
    }
}

/// Writes a complete synthetic bundle to `out` (created or replaced). `out` must not exist, or
/// be a bundle directory (one with a `manifest.toml`): anything else is refused rather than
/// overwritten.
pub fn write_bundle(out: &Path, options: &SynthOptions) -> Result<(), ModelError> {
    check_input_size(options.input_size, out)?;
    if options.labels.is_empty() {
        return Err(ModelError::bundle(out, "a bundle needs at least one label"));
    }
    if let Some(reason) = not_replaceable(out) {
        return Err(ModelError::bundle(out, reason));
    }
    let staging = sibling(out, "tmp")?;
    std::fs::create_dir_all(&staging).map_err(|e| ModelError::bundle(&staging, e))?;
    let written = write_files(&staging, options);
    let placed = written.and_then(|()| replace_dir(&staging, out));
    if placed.is_err() {
        // Best effort: the staging directory is ours and useless after a failure.
        let _ = std::fs::remove_dir_all(&staging);
    }
    placed
}

/// `.<name>.<tag>-<pid>-<nanos>` next to `out`.
pub(crate) fn sibling(out: &Path, tag: &str) -> Result<PathBuf, ModelError> {
    let name = out
        .file_name()
        .ok_or_else(|| ModelError::bundle(out, "the output path has no directory name"))?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let unique = format!(".{}.{tag}-{}-{nanos}", name.to_string_lossy(), std::process::id());
    Ok(parent.join(unique))
}

/// Moves `staging` to `out`, replacing an existing bundle there.
pub(crate) fn replace_dir(staging: &Path, out: &Path) -> Result<(), ModelError> {
    if out.exists() {
        let old = sibling(out, "old")?;
        std::fs::rename(out, &old).map_err(|e| ModelError::bundle(out, e))?;
        if let Err(error) = std::fs::rename(staging, out) {
            // Put the old bundle back; `edgesight train` also does that for a killed run.
            let _ = std::fs::rename(&old, out);
            return Err(ModelError::bundle(out, error));
        }
        std::fs::remove_dir_all(&old).map_err(|e| ModelError::bundle(&old, e))?;
        return Ok(());
    }
    std::fs::rename(staging, out).map_err(|e| ModelError::bundle(out, e))
}

fn write_files(dir: &Path, options: &SynthOptions) -> Result<(), ModelError> {
    let write = |name: &str, bytes: Vec<u8>| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| ModelError::bundle(&path, e))
    };
    let k = SYNTH_COMPONENTS;

    let backbone_options = VariantOptions::torchvision(options.seed, options.input_size);
    write_resnet50_variant(&dir.join(BACKBONE), &backbone_options)?;

    let (pca, kept) = Pca::synthetic(options.seed, FEATURE_CHANNELS, k);
    write(PCA, pca.to_safetensors(&dir.join(PCA))?)?;

    let head = HeadWeights::synthetic(options.seed, k, options.labels.len());
    write(HEAD, onnx::encode(&head.to_onnx()))?;
    write(HEAD_WEIGHTS, head.to_safetensors(&dir.join(HEAD_WEIGHTS))?)?;

    let mut files = std::collections::BTreeMap::new();
    for name in [BACKBONE, PCA, HEAD, HEAD_WEIGHTS] {
        files.insert(name.to_string(), sha256_file(&dir.join(name))?);
    }
    let manifest = Manifest {
        name: options.name.clone(),
        version: format!("0.1.0+seed.{}", options.seed),
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        input_size: options.input_size,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        labels: options.labels.clone(),
        k,
        explained_variance: Some(kept),
        // The trunk ends at its feature map, which the loader finds by itself. Naming the tensor
        // here would break the README's "replace backbone.onnx with your own" path for files
        // whose tensors are named differently.
        backbone_output: None,
        files,
        metrics: None,
    };
    // Validate what we are about to write with the same rules the reader applies.
    let text = manifest.to_toml()?;
    Manifest::parse(&text, &dir.join(MANIFEST))?;
    write(MANIFEST, text.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_replace_a_directory_that_is_not_a_bundle() {
        let dir = std::env::temp_dir().join(format!("edgesight-synth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        std::fs::write(dir.join("precious.txt"), b"keep me").ok();
        let error = write_bundle(&dir, &SynthOptions::default()).err().map(|e| e.to_string());
        assert!(error.unwrap_or_default().contains("not a bundle"));
        assert!(dir.join("precious.txt").is_file());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn refuses_to_replace_a_file_and_says_it_is_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model");
        std::fs::write(&file, b"keep me").unwrap();
        let error = write_bundle(&file, &SynthOptions::default()).unwrap_err().to_string();
        assert!(error.contains("is a file, not a bundle directory"), "{error}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }

    #[test]
    fn rejects_input_sizes_that_are_not_multiples_of_32() {
        let options = SynthOptions { input_size: 100, ..SynthOptions::default() };
        let out = std::env::temp_dir().join("edgesight-never-written");
        assert!(write_bundle(&out, &options).is_err());
        assert!(!out.exists());
    }
}
