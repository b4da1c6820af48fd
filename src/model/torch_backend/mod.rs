//! The torch backend: the bundle's ResNet-50 trunk, PCA projection and head run natively on
//! libtorch (through `tch`), on a CUDA device or the CPU, in f32, bf16 or f16.
//!
//! [`TorchTrunk`] (`trunk.rs`) runs the bundle's own `backbone.onnx` node by node; this file
//! resolves the device, loads the PCA projection and the head from their safetensors files and
//! puts the three stages behind the engine's [`Backend`] trait. The head runs in f32 whatever
//! the trunk's precision, so bf16/f16 only touch the 4 GFLOPs of the trunk; softmax runs in Rust
//! on the logits, as on tract.

mod trunk;

pub(crate) use trunk::channels_last;

use std::time::Instant;

use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use super::bundle::{BACKBONE, HEAD_WEIGHTS, PCA};
use super::pca::Pca;
use super::{Backend, BackendInfo, Bundle, FEATURE_CHANNELS, ModelError, Precision};
use super::{Prediction, StageTimes, softmax};

pub use trunk::TorchTrunk;

/// Where and how the torch backend runs.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchOptions {
    /// `auto`, `cpu`, `cuda` or `cuda:N` (checked by the config).
    pub device: String,
    pub precision: Precision,
    /// Intra-op threads on the CPU; 0 = one per core.
    pub threads: usize,
}

/// Resolves a device name: `auto` takes CUDA device 0 when libtorch sees one, else the CPU.
/// Asking for CUDA where there is none is an error that says how many devices tch sees.
pub fn resolve_device(name: &str) -> Result<Device, ModelError> {
    let cuda = tch::Cuda::device_count();
    let index = match name {
        "auto" => return Ok(if cuda > 0 { Device::Cuda(0) } else { Device::Cpu }),
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(index) => index,
            None => {
                let reason = format!("device {other:?} is not auto, cpu, cuda or cuda:N");
                return Err(ModelError::Device(reason));
            }
        },
    };
    if index as i64 >= cuda {
        return Err(ModelError::Device(format!(
            "device {name:?} asked for, but libtorch sees {cuda} CUDA device(s) (this build's \
             libtorch may be the CPU-only one from scripts/libtorch.sh; use device \"cpu\")"
        )));
    }
    Ok(Device::Cuda(index))
}

/// `cpu` or `cuda:N`, the way payloads and logs name a device.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(index) => format!("cuda:{index}"),
        _ => "cpu".to_string(),
    }
}

pub(crate) fn kind_of(precision: Precision) -> Kind {
    match precision {
        Precision::F32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
        Precision::F16 => Kind::Half,
    }
}

fn torch_error(error: tch::TchError) -> ModelError {
    ModelError::Inference(format!("libtorch: {error}"))
}

/// The PCA projection (a 1×1 convolution) and the head, in f32 on the trunk's device.
struct TorchHead {
    pca_weight: Tensor,
    pca_bias: Tensor,
    conv1: (Tensor, Tensor),
    conv2: (Tensor, Tensor),
    fc: (Tensor, Tensor),
}

impl TorchHead {
    fn open(bundle: &Bundle, device: Device) -> Result<TorchHead, ModelError> {
        let k = bundle.components;
        let pca = Pca::read(&bundle.dir.join(PCA), FEATURE_CHANNELS, k)?;
        let (weight, bias) = pca.fold();
        let on_device = |values: &[f32], shape: &[i64]| {
            Tensor::f_from_slice(values)
                .and_then(|t| t.f_reshape(shape))
                .and_then(|t| t.f_to_device(device))
                .map_err(torch_error)
        };
        let pca_weight = on_device(&weight, &[k as i64, FEATURE_CHANNELS as i64, 1, 1])?;
        let pca_bias = on_device(&bias, &[k as i64])?;

        let path = bundle.dir.join(HEAD_WEIGHTS);
        let bytes = std::fs::read(&path).map_err(|e| ModelError::bundle(&path, e))?;
        let tensors = SafeTensors::deserialize(&bytes)
            .map_err(|e| ModelError::bundle(&path, format!("not a safetensors file: {e}")))?;
        let classes = bundle.labels.len();
        let load = |name: &str, expected: &[Option<usize>]| -> Result<Tensor, ModelError> {
            let view = tensors
                .tensor(name)
                .map_err(|_| ModelError::bundle(&path, format!("tensor `{name}` is missing")))?;
            let shape = view.shape();
            let fits = view.dtype() == Dtype::F32
                && shape.len() == expected.len()
                && shape.iter().zip(expected).all(|(s, e)| e.is_none_or(|e| e == *s));
            if !fits {
                let reason = format!(
                    "tensor `{name}` is {:?} {shape:?}, expected F32 {expected:?} (None = any)",
                    view.dtype()
                );
                return Err(ModelError::bundle(&path, reason));
            }
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            on_device(&values, &dims)
        };
        let width = None;
        let conv1 = (
            load("conv1.weight", &[width, Some(k), Some(3), Some(3)])?,
            load("conv1.bias", &[width])?,
        );
        let hidden = conv1.0.size()[0] as usize;
        let conv2 = (
            load("conv2.weight", &[width, Some(hidden), Some(3), Some(3)])?,
            load("conv2.bias", &[width])?,
        );
        let last = conv2.0.size()[0] as usize;
        let fc =
            (load("fc.weight", &[Some(classes), Some(last)])?, load("fc.bias", &[Some(classes)])?);
        Ok(TorchHead { pca_weight, pca_bias, conv1, conv2, fc })
    }

    /// `[N,2048,h,w]` features (any kind) → (logits `[N,C]`, embedding `[N,k]`), f32.
    fn forward(&self, features: &Tensor) -> Result<(Tensor, Tensor), ModelError> {
        let _no_grad = tch::no_grad_guard();
        let run = || -> Result<(Tensor, Tensor), tch::TchError> {
            let x = features.f_to_kind(Kind::Float)?;
            let projected =
                x.f_conv2d(&self.pca_weight, Some(&self.pca_bias), [1, 1], [0, 0], [1, 1], 1)?;
            let embedding = projected.f_mean_dim([2i64, 3].as_slice(), false, Kind::Float)?;
            let y = projected.f_conv2d(
                &self.conv1.0,
                Some(&self.conv1.1),
                [1, 1],
                [1, 1],
                [1, 1],
                1,
            )?;
            let y = y.f_relu()?;
            let y = y.f_conv2d(&self.conv2.0, Some(&self.conv2.1), [1, 1], [1, 1], [1, 1], 1)?;
            let y = y.f_relu()?;
            let pooled = y.f_mean_dim([2i64, 3].as_slice(), false, Kind::Float)?;
            let logits = pooled.f_linear(&self.fc.0, Some(&self.fc.1))?;
            Ok((logits, embedding))
        };
        run().map_err(torch_error)
    }
}

/// The complete torch pipeline: trunk → PCA → head → softmax.
pub struct TorchBackend {
    trunk: TorchTrunk,
    head: TorchHead,
    input_size: usize,
    classes: usize,
    k: usize,
    info: BackendInfo,
}

impl TorchBackend {
    /// Loads an opened bundle on the device and in the precision of `options`.
    pub fn open(bundle: &Bundle, options: &TorchOptions) -> Result<TorchBackend, ModelError> {
        let device = resolve_device(&options.device)?;
        if options.precision == Precision::F16 && device == Device::Cpu {
            return Err(ModelError::Device(
                "precision f16 needs a CUDA device; on CPUs use bf16 or f32".to_string(),
            ));
        }
        if device == Device::Cpu {
            tch::set_num_threads(super::thread_count(options.threads) as i32);
        }
        let kind = kind_of(options.precision);
        let output = bundle.manifest.backbone_output.as_deref();
        let trunk =
            TorchTrunk::open(&bundle.dir.join(BACKBONE), bundle.input_size, output, device, kind)?;
        let head = TorchHead::open(bundle, device)?;
        let info = BackendInfo {
            backend: "torch",
            device: device_name(device),
            precision: options.precision,
        };
        let backend = TorchBackend {
            trunk,
            head,
            input_size: bundle.input_size as usize,
            classes: bundle.labels.len(),
            k: bundle.components,
            info,
        };
        // One frame through, so shape errors surface at load, not on the first camera frame.
        let s = backend.input_size as i64;
        let probe = Tensor::f_zeros([1, 3, s, s], (Kind::Float, device)).map_err(torch_error)?;
        let features = backend.trunk.forward(&probe)?;
        match features.size().as_slice() {
            [1, c, h, w] if *c == FEATURE_CHANNELS as i64 && h == w => {}
            other => {
                return Err(ModelError::bundle(
                    &bundle.dir.join(BACKBONE),
                    format!(
                        "not a ResNet-50 trunk: the cut at `{}` has shape {other:?}, expected \
                         [1,{FEATURE_CHANNELS},h,h]",
                        backend.trunk.cut_name()
                    ),
                ));
            }
        }
        Ok(backend)
    }
}

impl Backend for TorchBackend {
    fn infer(
        &mut self,
        input: &[f32],
        n: usize,
    ) -> Result<(Vec<Prediction>, StageTimes), ModelError> {
        if n == 0 {
            return Ok((Vec::new(), StageTimes::default()));
        }
        let s = self.input_size;
        if input.len() != n * 3 * s * s {
            return Err(ModelError::Inference(format!(
                "input holds {} values, expected {n} frames × {}",
                input.len(),
                3 * s * s
            )));
        }
        let started = Instant::now();
        let batch = Tensor::f_from_slice(input)
            .and_then(|t| t.f_reshape([n as i64, 3, s as i64, s as i64]))
            .map_err(torch_error)?;
        let features = self.trunk.forward(&batch)?;
        if let Device::Cuda(index) = self.trunk.device() {
            tch::Cuda::synchronize(index as i64);
        }
        let backbone_done = Instant::now();
        let (logits, embedding) = self.head.forward(&features)?;
        let logits = tensor_values(&logits, n * self.classes)?;
        let embedding = tensor_values(&embedding, n * self.k)?;
        let head_done = Instant::now();
        let predictions = logits
            .chunks_exact(self.classes)
            .zip(embedding.chunks_exact(self.k))
            .map(|(l, e)| Prediction { scores: softmax(l), embedding: e.to_vec() })
            .collect();
        let times =
            StageTimes { backbone: backbone_done - started, head: head_done - backbone_done };
        Ok((predictions, times))
    }

    fn info(&self) -> BackendInfo {
        self.info.clone()
    }
}

/// Copies an f32 tensor of `count` values to a `Vec` (from any device).
fn tensor_values(tensor: &Tensor, count: usize) -> Result<Vec<f32>, ModelError> {
    let tensor = tensor.f_to_device(Device::Cpu).map_err(torch_error)?;
    let tensor = tensor.f_contiguous().map_err(torch_error)?;
    if tensor.numel() != count {
        return Err(ModelError::Inference(format!(
            "the head gave {} values, expected {count}",
            tensor.numel()
        )));
    }
    let mut values = vec![0.0f32; count];
    tensor.f_copy_data(&mut values, count).map_err(torch_error)?;
    Ok(values)
}
