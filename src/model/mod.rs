//! Model bundles on disk, the project's ONNX writer, and the inference backends.
//!
//! A frame goes through three stages: a ResNet-50 trunk (`backbone.onnx`, any export a user
//! has, cut at its 2048-channel feature map), a PCA projection (`pca.safetensors`, folded into a
//! 1×1 convolution) and a small CNN head (`head.onnx`). [`Bundle::open`] checks the files,
//! [`open_backend`] loads them behind the [`Backend`] trait that the engine calls, and
//! [`synth::write_bundle`] makes a seeded, architecture-exact bundle for tests and benchmarks,
//! because pretrained weights cannot be downloaded where we build.
//!
//! Files: `bundle` (manifest and checks), `onnx` (writer), `resnet` (the synthetic trunk),
//! `pca`, `head`, `backbone` (where to cut a user's graph), `tract_backend`, `inspect`
//! (shapes, parameters, FLOPs), `synth` (bundle writer), `prng` (the weight generator).

use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod bundle;
pub mod pca;
pub mod prng;

#[cfg(feature = "tract")]
pub mod backbone;
#[cfg(feature = "tract")]
pub mod head;
#[cfg(feature = "tract")]
mod inspect;
#[cfg(feature = "tract")]
pub mod onnx;
#[cfg(feature = "tract")]
pub mod resnet;
#[cfg(feature = "tract")]
pub mod synth;
#[cfg(feature = "torch")]
pub mod torch_backend;
#[cfg(feature = "tract")]
pub mod tract_backend;

pub use bundle::Manifest;
#[cfg(feature = "tract")]
pub use inspect::{GraphCost, NodeCost, graph_cost, inspect};
#[cfg(feature = "tract")]
pub use synth::{SynthOptions, VariantOptions};
#[cfg(feature = "tract")]
pub use tract_backend::{TractBackbone, TractBackend};

/// Channels of a ResNet-50 feature map, the input of the PCA stage.
pub const FEATURE_CHANNELS: usize = 2048;

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
    /// A file of a bundle (or the bundle directory) is missing, damaged or inconsistent.
    #[error("{path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
    #[error("inference failed: {0}")]
    Inference(String),
    /// The device or precision asked for is not available here.
    #[error("model.device/precision: {0}")]
    Device(String),
}

impl ModelError {
    /// A [`ModelError::Bundle`] naming `path`.
    pub fn bundle(path: &Path, reason: impl std::fmt::Display) -> ModelError {
        ModelError::Bundle { path: path.to_path_buf(), reason: reason.to_string() }
    }
}

/// Name, version and checksum that every payload carries.
#[derive(Debug, Clone)]
pub struct ModelIdentity {
    pub name: String,
    pub version: String,
    /// sha256 of the manifest's checksum list, hex.
    pub checksum: String,
}

/// A bundle directory, opened and checked (see [`Bundle::open`] in `bundle.rs`).
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub identity: ModelIdentity,
    pub labels: Vec<String>,
    pub input_size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// k, the number of PCA components.
    pub components: usize,
    /// The parsed manifest (file checksums, `backbone_output`, metrics).
    pub manifest: Manifest,
}

/// Which library runs the model.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// tract, pure Rust, CPU only; the default and the only backend on ARM.
    Tract,
    /// libtorch through tch (cargo feature `torch`): CUDA devices and x86 CPUs.
    Torch,
}

/// Number format of the trunk's weights and activations (torch backend; tract runs f32).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// bfloat16: fast on CPUs with AVX-512 BF16 or AMX, and on recent GPUs.
    Bf16,
    /// float16: CUDA devices only.
    F16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

/// How to open a backend: `model.backend`, `model.device`, `model.precision`, `model.threads`.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendOptions {
    pub kind: BackendKind,
    /// `auto`, `cpu`, `cuda` or `cuda:N` (torch only; tract always runs on the CPU).
    pub device: String,
    pub precision: Precision,
    /// Intra-op threads; 0 = one per core.
    pub threads: usize,
}

impl BackendOptions {
    /// tract, f32, on `threads` threads.
    pub fn tract(threads: usize) -> BackendOptions {
        BackendOptions {
            kind: BackendKind::Tract,
            device: "cpu".into(),
            precision: Precision::F32,
            threads,
        }
    }
}

impl BackendOptions {
    /// What cannot work whatever the machine, as (`device` or `precision`, message): a device
    /// name that is not auto/cpu/cuda/cuda:N, tract asked for a GPU or a precision other than
    /// f32, f16 on a CPU. The config check and `classify` both report these.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        let device = self.device.as_str();
        if self.kind == BackendKind::Tract && self.precision != Precision::F32 {
            let precision = self.precision.as_str();
            let message = format!("{precision:?} needs backend = \"torch\"; tract runs f32 only");
            problems.push(("precision", message));
        }
        if self.kind == BackendKind::Tract && !matches!(device, "auto" | "cpu") {
            let message = format!("{device:?} needs backend = \"torch\"; tract runs on the CPU");
            problems.push(("device", message));
        }
        if self.precision == Precision::F16 && device == "cpu" {
            let message = "\"f16\" runs on CUDA devices only; use \"bf16\" or \"f32\" on a CPU";
            problems.push(("precision", message.to_string()));
        }
        if !is_device(device) {
            problems.push(("device", format!("{device:?} is not auto, cpu, cuda or cuda:N")));
        }
        problems
    }
}

/// `auto`, `cpu`, `cuda` or `cuda:N` with N a valid index.
pub fn is_device(device: &str) -> bool {
    match device {
        "auto" | "cpu" | "cuda" => true,
        other => other
            .strip_prefix("cuda:")
            .is_some_and(|index| index.parse::<usize>().is_ok() && !index.starts_with('+')),
    }
}

/// What a loaded backend runs on, for logs and the `stats` topic.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendInfo {
    /// `tract` or `torch`.
    pub backend: &'static str,
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub precision: Precision,
}

/// An inference backend: a batch of CHW f32 frames in, one [`Prediction`] per frame out.
pub trait Backend: Send {
    /// `input` holds `n` frames of `3 * S * S` values each.
    fn infer(
        &mut self,
        input: &[f32],
        n: usize,
    ) -> Result<(Vec<Prediction>, StageTimes), ModelError>;

    /// The library, device and precision this backend runs with.
    fn info(&self) -> BackendInfo;
}

/// Runs one all-zero batch of every size from 2 to `max_batch` through `backend`, so that a
/// backend that prepares itself per batch size (tract builds and keeps one optimised plan per
/// size; the plan for one frame is built when the bundle opens) does so before the streams
/// start. Otherwise the first batch of each size pays for its plan in the middle of a run and
/// every live stream waits: about 1 s per size for the 64-px test model on the 2-core
/// development VM (tests/daemon_many_streams.rs), several seconds at 224 px. A batcher closes
/// batches of every size up to its maximum, so these plans would all be built anyway. Returns
/// the sizes run.
pub fn warm_up(
    backend: &mut dyn Backend,
    input_size: u32,
    max_batch: usize,
) -> Result<Vec<usize>, ModelError> {
    let frame = 3 * (input_size as usize).pow(2);
    let sizes: Vec<usize> = (2..=max_batch).collect();
    let input = vec![0.0; frame * max_batch];
    for &n in &sizes {
        backend.infer(&input[..frame * n], n)?;
    }
    Ok(sizes)
}

/// Numerically stable softmax (subtracts the maximum first). An empty slice gives an empty
/// vector; non-finite logits give NaN scores rather than a panic.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// Loads the bundle's models with the backend `options` name. tract's thread pool is
/// process-wide (tract keeps one default executor) and so is libtorch's: the last call decides.
/// Asking for `torch` in a build without the `torch` feature is an error (the config check
/// catches it first).
pub fn open_backend(
    bundle: &Bundle,
    options: &BackendOptions,
) -> Result<Box<dyn Backend>, ModelError> {
    match options.kind {
        #[cfg(feature = "tract")]
        BackendKind::Tract => {
            set_tract_threads(options.threads);
            Ok(Box::new(TractBackend::open(bundle)?))
        }
        #[cfg(feature = "torch")]
        BackendKind::Torch => {
            let torch = torch_backend::TorchOptions {
                device: options.device.clone(),
                precision: options.precision,
                threads: options.threads,
            };
            Ok(Box::new(torch_backend::TorchBackend::open(bundle, &torch)?))
        }
        #[allow(unreachable_patterns)]
        kind => Err(ModelError::bundle(
            &bundle.dir,
            format!("this build has no {kind:?} backend (cargo feature `{kind:?}`)").to_lowercase(),
        )),
    }
}

/// The threads a `threads` setting means: 0 is one per core.
pub fn thread_count(threads: usize) -> usize {
    match threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    }
}

/// Sets the process-wide thread count of tract's matrix products (0 = all cores); returns the
/// count in effect.
#[cfg(feature = "tract")]
pub fn set_tract_threads(threads: usize) -> usize {
    use tract_linalg::multithread::{Executor, set_default_executor};
    let threads = thread_count(threads);
    let executor =
        if threads > 1 { Executor::multithread(threads) } else { Executor::SingleThread };
    set_default_executor(executor);
    threads
}

/// Opens the bundle in `dir` and runs one deterministic frame through it (single-threaded);
/// returns a one-paragraph summary: identity, top label and score, stage times.
#[cfg(feature = "tract")]
pub fn verify(dir: &Path) -> Result<String, ModelError> {
    let opened = std::time::Instant::now();
    let bundle = Bundle::open(dir)?;
    let mut backend = TractBackend::open(&bundle)?;
    let load = opened.elapsed();
    let s = bundle.input_size as usize;
    // A smooth deterministic pattern in the normalised range, the same on every machine.
    let input: Vec<f32> =
        (0..3 * s * s).map(|i| ((i % 97) as f32 / 48.0 - 1.0) * (1.0 + (i % 3) as f32)).collect();
    let (predictions, times) = backend.infer(&input, 1)?;
    let Some(prediction) = predictions.first() else {
        return Err(ModelError::Inference("no prediction for the test frame".to_string()));
    };
    let scores_ok = prediction.scores.iter().all(|s| s.is_finite())
        && (prediction.scores.iter().sum::<f32>() - 1.0).abs() < 1e-3;
    let embedding_ok = prediction.embedding.iter().all(|v| v.is_finite());
    if !(scores_ok && embedding_ok) {
        return Err(ModelError::Inference(format!(
            "{}: the test frame gave non-finite or unnormalised outputs",
            dir.display()
        )));
    }
    let (top, score) = prediction
        .scores
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |best, (i, &s)| if s > best.1 { (i, s) } else { best });
    Ok(format!(
        "{} {} (checksum {}): ok; {} labels, k = {}, input {s}x{s}; test frame -> `{}` {:.3}; \
         load {:.0} ms, backbone {:.1} ms, head {:.1} ms",
        bundle.identity.name,
        bundle.identity.version,
        &bundle.identity.checksum[..12.min(bundle.identity.checksum.len())],
        bundle.labels.len(),
        bundle.components,
        bundle.labels.get(top).map_or("?", String::as_str),
        score,
        load.as_secs_f64() * 1e3,
        times.backbone.as_secs_f64() * 1e3,
        times.head.as_secs_f64() * 1e3,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let scores = softmax(&[1.0, 2.0, 3.0]);
        assert!((scores.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(scores[0] < scores[1] && scores[1] < scores[2]);
        // e^1 / (e^1 + e^2 + e^3)
        assert!((scores[0] - 0.090_030_57).abs() < 1e-6);
    }

    /// The real tract backend, with the sizes it was asked for written down.
    struct Recording {
        inner: Box<dyn Backend>,
        sizes: Vec<usize>,
    }

    impl Backend for Recording {
        fn infer(
            &mut self,
            input: &[f32],
            n: usize,
        ) -> Result<(Vec<Prediction>, StageTimes), ModelError> {
            self.sizes.push(n);
            self.inner.infer(input, n)
        }

        fn info(&self) -> BackendInfo {
            self.inner.info()
        }
    }

    #[cfg(feature = "tract")]
    #[test]
    fn warm_up_runs_every_batch_size_once_and_leaves_the_answers_alone() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bundle");
        let options = SynthOptions { input_size: 64, ..SynthOptions::default() };
        synth::write_bundle(&out, &options).unwrap();
        let bundle = Bundle::open(&out).unwrap();
        let inner = open_backend(&bundle, &BackendOptions::tract(1)).unwrap();
        let mut backend = Recording { inner, sizes: Vec::new() };
        let frame = 3 * 64 * 64;
        let input: Vec<f32> = (0..3 * frame).map(|i| (i % 31) as f32 / 15.0 - 1.0).collect();
        let before = backend.infer(&input, 3).unwrap().0;

        assert_eq!(warm_up(&mut backend, 64, 4).unwrap(), [2, 3, 4]);
        assert_eq!(backend.sizes, [3, 2, 3, 4]);
        let after = backend.infer(&input, 3).unwrap().0;
        for (a, b) in before.iter().zip(&after) {
            assert_eq!(a.scores, b.scores, "a warm-up batch changed later answers");
        }
        assert!(warm_up(&mut backend, 64, 1).unwrap().is_empty(), "batch 1 is ready at open");
        assert_eq!(backend.sizes.len(), 5);
    }

    #[test]
    fn softmax_does_not_overflow_on_large_logits() {
        let scores = softmax(&[1000.0, 1000.0]);
        assert_eq!(scores, vec![0.5, 0.5]);
        assert!(softmax(&[]).is_empty());
    }
}
