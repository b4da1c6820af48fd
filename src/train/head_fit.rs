//! Training the CNN head on projected features: conv3×3(k→512)+ReLU → conv3×3(512→512)+ReLU →
//! global average pool → linear(512→C), the layout `head.onnx` and `head.safetensors` carry.
//!
//! AdamW with a cosine learning-rate schedule, cross-entropy, shuffled mini-batches; after each
//! epoch the validation loss decides: the best epoch's weights are kept, and training stops
//! after `patience` epochs without improvement. Everything random (initialisation, shuffling)
//! follows `seed`. The result converts to [`HeadWeights`], so the bundle writer emits the same
//! tensors under the same names for tract and for tch.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::model::head::{HEAD_WIDTH, HeadWeights};

pub use super::metrics::EpochRecord;

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("head training: {0}")]
    Invalid(String),
    #[error("head training: libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("head training: stopped")]
    Stopped,
}

#[derive(Debug, Clone)]
pub struct HeadOptions {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate (the cosine schedule starts here).
    pub lr: f64,
    pub weight_decay: f64,
    /// Epochs without a better validation loss before stopping.
    pub patience: usize,
    pub seed: u64,
    pub device: Device,
}

impl Default for HeadOptions {
    fn default() -> Self {
        HeadOptions {
            epochs: 30,
            batch_size: 64,
            lr: 1e-3,
            weight_decay: 1e-2,
            patience: 5,
            seed: 0,
            device: Device::Cpu,
        }
    }
}

/// A labelled set of projected feature maps: `features [N,k,h,w]` f32, `labels [N]` i64.
pub struct FeatureSet {
    pub features: Tensor,
    pub labels: Tensor,
}

impl FeatureSet {
    pub fn len(&self) -> usize {
        self.labels.size().first().copied().unwrap_or(0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct TrainedHead {
    pub weights: HeadWeights,
    pub history: Vec<EpochRecord>,
    /// The epoch (from 1) whose weights were kept.
    pub best_epoch: usize,
}

/// The head as a tch module under the names `head.safetensors` uses.
#[derive(Debug)]
struct HeadNet {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc: nn::Linear,
}

impl HeadNet {
    fn new(root: &nn::Path, k: usize, classes: usize) -> HeadNet {
        let config = nn::ConvConfig { padding: 1, ..Default::default() };
        HeadNet {
            conv1: nn::conv2d(root / "conv1", k as i64, HEAD_WIDTH as i64, 3, config),
            conv2: nn::conv2d(root / "conv2", HEAD_WIDTH as i64, HEAD_WIDTH as i64, 3, config),
            fc: nn::linear(root / "fc", HEAD_WIDTH as i64, classes as i64, Default::default()),
        }
    }
}

impl Module for HeadNet {
    fn forward(&self, x: &Tensor) -> Tensor {
        let y = x.apply(&self.conv1).relu().apply(&self.conv2).relu();
        y.mean_dim([2i64, 3].as_slice(), false, Kind::Float).apply(&self.fc)
    }
}

/// Mean cross-entropy of `logits` against `labels`.
fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor, tch::TchError> {
    logits.f_cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Mean, -100, 0.0)
}

/// Fraction of rows whose largest logit is the label.
fn accuracy(logits: &Tensor, labels: &Tensor) -> Result<f64, tch::TchError> {
    let hits = logits.f_argmax(-1, false)?.f_eq_tensor(labels)?;
    hits.f_to_kind(Kind::Double)?.f_mean(Kind::Double)?.f_double_value(&[])
}

/// Mean loss and accuracy of `net` over `set`, in batches, without gradients.
fn evaluate(net: &HeadNet, set: &FeatureSet, batch: usize) -> Result<(f64, f64), HeadError> {
    let _no_grad = tch::no_grad_guard();
    let (mut loss, mut correct) = (0.0, 0.0);
    let n = set.len();
    for start in (0..n).step_by(batch) {
        let size = batch.min(n - start) as i64;
        let x = set.features.f_narrow(0, start as i64, size)?;
        let y = set.labels.f_narrow(0, start as i64, size)?;
        let logits = net.forward(&x);
        loss += cross_entropy(&logits, &y)?.f_double_value(&[])? * size as f64;
        correct += accuracy(&logits, &y)? * size as f64;
    }
    Ok((loss / n as f64, correct / n as f64))
}

/// Trains a head for `classes` classes on `train`, choosing the epoch by `val`. A raised
/// `stop` ends training between batches with [`HeadError::Stopped`].
pub fn train_head(
    train: &FeatureSet,
    val: &FeatureSet,
    classes: usize,
    options: &HeadOptions,
    stop: &AtomicBool,
    mut on_epoch: impl FnMut(&EpochRecord),
) -> Result<TrainedHead, HeadError> {
    if train.is_empty() || val.is_empty() {
        return Err(HeadError::Invalid(format!(
            "{} training and {} validation samples: both need at least one",
            train.len(),
            val.len()
        )));
    }
    if options.epochs == 0 || options.batch_size == 0 {
        return Err(HeadError::Invalid("epochs and batch size must be at least 1".into()));
    }
    let k = train.features.size()[1] as usize;
    tch::manual_seed(options.seed as i64);
    let device = options.device;
    let vs = nn::VarStore::new(device);
    let net = HeadNet::new(&vs.root(), k, classes);
    let mut best = nn::VarStore::new(device);
    let _ = HeadNet::new(&best.root(), k, classes);
    let mut optimizer = nn::adamw(0.9, 0.999, options.weight_decay).build(&vs, options.lr)?;

    let train_x = train.features.f_to_device(device)?;
    let train_y = train.labels.f_to_device(device)?;
    let val = FeatureSet {
        features: val.features.f_to_device(device)?,
        labels: val.labels.f_to_device(device)?,
    };
    let n = train.len();
    let steps_per_epoch = n.div_ceil(options.batch_size);
    let total_steps = (steps_per_epoch * options.epochs) as f64;
    let mut history = Vec::new();
    let (mut best_loss, mut best_epoch, mut waited) = (f64::INFINITY, 0, 0);
    let mut step = 0usize;
    for epoch in 1..=options.epochs {
        let order = Tensor::f_randperm(n as i64, (Kind::Int64, device))?;
        let (mut loss_sum, mut correct) = (0.0, 0.0);
        let mut lr = options.lr;
        for start in (0..n).step_by(options.batch_size) {
            if stop.load(Ordering::Relaxed) {
                return Err(HeadError::Stopped);
            }
            let size = options.batch_size.min(n - start) as i64;
            let index = order.f_narrow(0, start as i64, size)?;
            let x = train_x.f_index_select(0, &index)?;
            let y = train_y.f_index_select(0, &index)?;
            lr =
                options.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total_steps).cos());
            optimizer.set_lr(lr);
            let logits = net.forward(&x);
            let loss = cross_entropy(&logits, &y)?;
            optimizer.backward_step(&loss);
            loss_sum += loss.f_double_value(&[])? * size as f64;
            correct += accuracy(&logits, &y)? * size as f64;
            step += 1;
        }
        let (val_loss, val_accuracy) = evaluate(&net, &val, options.batch_size)?;
        let record = EpochRecord {
            epoch,
            lr,
            train_loss: loss_sum / n as f64,
            train_accuracy: correct / n as f64,
            val_loss,
            val_accuracy,
        };
        on_epoch(&record);
        history.push(record);
        if val_loss < best_loss {
            (best_loss, best_epoch, waited) = (val_loss, epoch, 0);
            best.copy(&vs)?;
        } else {
            waited += 1;
            if waited >= options.patience.max(1) {
                break;
            }
        }
    }
    if !best_loss.is_finite() {
        return Err(HeadError::Invalid("the validation loss never became finite".into()));
    }
    Ok(TrainedHead { weights: to_weights(&best, k, classes)?, history, best_epoch })
}

/// Logits `[N,classes]` (on the CPU) of a head with `weights` for projected features
/// `[N,k,h,w]`, in batches of `batch` on `device`, and each row's cross-entropy against
/// `labels`.
pub fn predict(
    weights: &HeadWeights,
    set: &FeatureSet,
    batch: usize,
    device: Device,
) -> Result<(Tensor, Vec<f64>), HeadError> {
    let _no_grad = tch::no_grad_guard();
    let vs = nn::VarStore::new(device);
    let net = HeadNet::new(&vs.root(), weights.k, weights.classes);
    let mut variables = vs.variables();
    for (name, shape, values) in &weights.tensors {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let source = Tensor::from_slice(values).f_reshape(dims)?;
        let variable = variables
            .get_mut(name)
            .ok_or_else(|| HeadError::Invalid(format!("no variable `{name}`")))?;
        variable.f_copy_(&source)?;
    }
    let mut logits = Vec::new();
    let mut losses = Vec::with_capacity(set.len());
    let n = set.len();
    for start in (0..n).step_by(batch.max(1)) {
        let size = batch.max(1).min(n - start) as i64;
        let x = set.features.f_narrow(0, start as i64, size)?.f_to_device(device)?;
        let y = set.labels.f_narrow(0, start as i64, size)?.f_to_device(device)?;
        let out = net.forward(&x);
        let loss = out.f_cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::None, -100, 0.0)?;
        losses.extend(super::host_values::<f64>(&loss)?);
        logits.push(out.f_to_device(Device::Cpu)?);
    }
    let logits = if logits.is_empty() {
        Tensor::zeros([0, weights.classes as i64], (Kind::Float, Device::Cpu))
    } else {
        Tensor::f_cat(&logits, 0)?
    };
    Ok((logits, losses))
}

/// The variables of `vs` as [`HeadWeights`] in file order.
fn to_weights(vs: &nn::VarStore, k: usize, classes: usize) -> Result<HeadWeights, HeadError> {
    let variables = vs.variables();
    let mut tensors = Vec::new();
    for layer in ["conv1", "conv2", "fc"] {
        for part in ["weight", "bias"] {
            let name = format!("{layer}.{part}");
            let tensor = variables
                .get(&name)
                .ok_or_else(|| HeadError::Invalid(format!("no variable `{name}`")))?
                .f_to_device(Device::Cpu)?
                .f_contiguous()?;
            let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
            let count = tensor.numel();
            let mut values = vec![0.0f32; count];
            tensor.f_copy_data(&mut values, count)?;
            tensors.push((name, shape, values));
        }
    }
    Ok(HeadWeights { k, classes, tensors })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` samples of 3 classes in k = 6 channels on a 2×2 map: each class raises its own pair
    /// of channels, plus noise.
    fn blobs(n: usize, seed: i64) -> FeatureSet {
        tch::manual_seed(seed);
        let labels = Tensor::randint(3, [n as i64], (Kind::Int64, Device::Cpu));
        let noise = Tensor::randn([n as i64, 6, 2, 2], (Kind::Float, Device::Cpu));
        let centres = Tensor::from_slice(&[
            2.0f32, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0,
            2.0,
        ])
        .reshape([3, 6, 1, 1]);
        let features = noise * 0.7 + centres.index_select(0, &labels);
        FeatureSet { features, labels }
    }

    #[test]
    fn learns_separable_classes_and_exports_what_tract_runs_the_same() {
        let (train, val) = (blobs(300, 1), blobs(90, 2));
        let options = HeadOptions { epochs: 6, batch_size: 32, ..HeadOptions::default() };
        let mut seen = 0;
        let trained =
            train_head(&train, &val, 3, &options, &AtomicBool::new(false), |_| seen += 1).unwrap();
        assert_eq!(seen, trained.history.len());
        let best = &trained.history[trained.best_epoch - 1];
        assert!(best.val_accuracy > 0.9, "{:?}", trained.history);
        let min_loss = trained.history.iter().map(|r| r.val_loss).fold(f64::INFINITY, f64::min);
        assert_eq!(best.val_loss, min_loss, "the kept epoch has the lowest validation loss");

        // The exported head, written as head.onnx and run by tract, gives tch's logits for the
        // kept weights.
        let weights = &trained.weights;
        let shapes: Vec<Vec<usize>> = weights.tensors.iter().map(|t| t.1.clone()).collect();
        assert_eq!(shapes[0], [HEAD_WIDTH, 6, 3, 3]);
        assert_eq!(shapes[4], [3, HEAD_WIDTH]);
        let onnx = crate::model::onnx::encode(&weights.to_onnx());
        let x = val.features.narrow(0, 0, 4).contiguous();
        let mut input = vec![0.0f32; 4 * 24];
        x.copy_data(&mut input, 4 * 24);
        let tract_logits = run_tract(&onnx, &input);

        let four = FeatureSet { features: x.shallow_clone(), labels: val.labels.narrow(0, 0, 4) };
        let (logits, losses) = predict(weights, &four, 3, Device::Cpu).unwrap();
        assert_eq!(losses.len(), 4);
        let mut tch_logits = vec![0.0f32; 12];
        logits.contiguous().copy_data(&mut tch_logits, 12);
        for (a, b) in tract_logits.iter().zip(&tch_logits) {
            assert!((a - b).abs() < 1e-4, "{tract_logits:?} vs {tch_logits:?}");
        }
    }

    /// Runs `head.onnx` bytes in tract on a `[4,6,2,2]` input.
    fn run_tract(bytes: &[u8], input: &[f32]) -> Vec<f32> {
        use tract_onnx::prelude::*;
        let model = tract_onnx::onnx().model_for_read(&mut &bytes[..]).unwrap();
        let fact = InferenceFact::dt_shape(f32::datum_type(), tvec!(4, 6, 2, 2));
        let plan = model.with_input_fact(0, fact).unwrap().into_optimized().unwrap();
        let plan = plan.into_runnable().unwrap();
        let tensor = tract_onnx::prelude::Tensor::from_shape(&[4, 6, 2, 2], input).unwrap();
        let out = plan.run(tvec!(tensor.into_tvalue())).unwrap();
        out[0].try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    #[test]
    fn stops_early_when_validation_stops_improving_and_refuses_empty_sets() {
        // Labels that are noise: validation loss cannot improve for long.
        let train = blobs(60, 3);
        let mut val = blobs(30, 4);
        val.labels = Tensor::randint(3, [30], (Kind::Int64, Device::Cpu));
        let options =
            HeadOptions { epochs: 40, batch_size: 16, patience: 2, ..HeadOptions::default() };
        let trained =
            train_head(&train, &val, 3, &options, &AtomicBool::new(false), |_| {}).unwrap();
        assert!(trained.history.len() < 40, "{} epochs ran", trained.history.len());
        assert_eq!(trained.history.len(), trained.best_epoch + 2);

        let empty = FeatureSet {
            features: Tensor::zeros([0, 6, 2, 2], (Kind::Float, Device::Cpu)),
            labels: Tensor::zeros([0], (Kind::Int64, Device::Cpu)),
        };
        let error = train_head(&train, &empty, 3, &options, &AtomicBool::new(false), |_| {})
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("0 validation samples"), "{error}");
    }
}
