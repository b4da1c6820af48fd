//! Training the ResNet-50 trunk itself (`--train-backbone last-stage|all`).
//!
//! A frozen trunk only helps when its features already suit the task: a pretrained ResNet-50
//! on photographs, usually. Our synthetic trunk has seeded weights, and a domain far from
//! ImageNet (Fashion-MNIST's 28×28 greyscale) needs trained features too, so this module trains
//! the trunk with tch — the last stage (`layer4`, the other stages frozen with their batch norms
//! in inference mode) or all of it — behind a temporary classifier (global average pool and a
//! linear layer, discarded afterwards). The trunk is laid out under torchvision's names, loads
//! from and goes back to [`ResNet50`], and is written as `backbone.onnx` by the project's own
//! ONNX writer; the PCA and the head are then fitted on the trained trunk's features.
//!
//! AdamW with a cosine schedule and cross-entropy, in f32 or in bfloat16 with f32 weights
//! (`--backbone-precision`); each epoch sees every training image once, clean or under its
//! drawn condition (half and half), randomly flipped left to right and shifted by up to an
//! eighth of its side; the epoch with the highest validation accuracy is kept (the lower
//! validation loss breaks a tie).

use std::sync::atomic::{AtomicBool, Ordering};

use tch::nn::{self, ModuleT, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::head_fit::EpochRecord;
use crate::model::onnx::{self as onnx_file, tensor_f32};
use crate::model::resnet::{BN_EPSILON, ConvBn, ResNet50};
use crate::model::torch_backend::{channels_last, kind_of};
use crate::model::{FEATURE_CHANNELS, Precision};

/// Which part of the trunk `--train-backbone` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainBackbone {
    None,
    LastStage,
    All,
}

impl TrainBackbone {
    pub fn parse(name: &str) -> Option<TrainBackbone> {
        match name {
            "none" => Some(TrainBackbone::None),
            "last-stage" => Some(TrainBackbone::LastStage),
            "all" => Some(TrainBackbone::All),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrunkError {
    #[error("trunk training: {0}")]
    Invalid(String),
    #[error("trunk training: libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("trunk training: stopped")]
    Stopped,
}

#[derive(Debug, Clone)]
pub struct TrunkOptions {
    pub scope: TrainBackbone,
    /// Outputs of the temporary classifier.
    pub classes: usize,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// The arithmetic of the forward and backward passes: f32, or bf16 with the weights, the
    /// optimizer state and batch norm's statistics kept in f32.
    pub precision: Precision,
    pub seed: u64,
    pub device: Device,
}

/// Images for trunk training: `clean` and `varied` `[N,3,S,S]` (preprocessed, any float kind,
/// on the CPU; `varied` is the same images under their drawn conditions), `labels [N]` i64.
pub struct ImageSet {
    pub clean: Tensor,
    pub varied: Option<Tensor>,
    pub labels: Tensor,
}

impl ImageSet {
    fn len(&self) -> usize {
        self.labels.size().first().copied().unwrap_or(0) as usize
    }
}

/// Conv (no bias) + batch norm, under torchvision's names.
#[derive(Debug)]
struct ConvBnNet {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    stride: i64,
    padding: i64,
}

impl ConvBnNet {
    fn new(root: &nn::Path, layer: &ConvBn) -> ConvBnNet {
        let (stride, padding) = (layer.stride as i64, (layer.kernel / 2) as i64);
        let config = nn::ConvConfig { stride, padding, bias: false, ..Default::default() };
        let bn_config = nn::BatchNormConfig { eps: f64::from(BN_EPSILON), ..Default::default() };
        let conv_path = path(root, &layer.conv);
        let bn_path = path(root, &layer.bn);
        ConvBnNet {
            conv: nn::conv2d(
                conv_path,
                layer.cin as i64,
                layer.cout as i64,
                layer.kernel as i64,
                config,
            ),
            bn: nn::batch_norm2d(bn_path, layer.cout as i64, bn_config),
            stride,
            padding,
        }
    }

    /// Runs in `x`'s kind: in bfloat16 the weights are cast for the convolution (gradients
    /// flow back to the f32 weights) and batch norm keeps its f32 parameters and statistics.
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let weight = match x.kind() {
            kind if kind == self.conv.ws.kind() => self.conv.ws.shallow_clone(),
            kind => self.conv.ws.to_kind(kind),
        };
        let (s, p) = (self.stride, self.padding);
        x.conv2d(&weight, None::<Tensor>, [s, s], [p, p], [1, 1], 1).apply_t(&self.bn, train)
    }

    /// Copies `layer`'s parameters in.
    fn load(&mut self, layer: &ConvBn) -> Result<(), tch::TchError> {
        let _no_grad = tch::no_grad_guard();
        let shape = [layer.cout as i64, layer.cin as i64, layer.kernel as i64, layer.kernel as i64];
        let device = self.conv.ws.device();
        let put =
            |target: &mut Tensor, values: &[f32], shape: &[i64]| -> Result<(), tch::TchError> {
                let source = Tensor::from_slice(values).f_reshape(shape)?.f_to_device(device)?;
                target.f_copy_(&source)
            };
        put(&mut self.conv.ws, &layer.weight, &shape)?;
        let c = [layer.cout as i64];
        if let Some(ws) = self.bn.ws.as_mut() {
            put(ws, &layer.gamma, &c)?;
        }
        if let Some(bs) = self.bn.bs.as_mut() {
            put(bs, &layer.beta, &c)?;
        }
        put(&mut self.bn.running_mean, &layer.mean, &c)?;
        put(&mut self.bn.running_var, &layer.var, &c)?;
        Ok(())
    }

    /// Copies the parameters out into `layer`.
    fn store(&self, layer: &mut ConvBn) -> Result<(), tch::TchError> {
        layer.weight = values(&self.conv.ws)?;
        if let Some(ws) = &self.bn.ws {
            layer.gamma = values(ws)?;
        }
        if let Some(bs) = &self.bn.bs {
            layer.beta = values(bs)?;
        }
        layer.mean = values(&self.bn.running_mean)?;
        layer.var = values(&self.bn.running_var)?;
        Ok(())
    }
}

/// `root / "layer1" / "0" / "conv1"` for `layer1.0.conv1`.
fn path<'a>(root: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    dotted.split('.').fold(root.sub(""), |p, part| p / part)
}

fn values(tensor: &Tensor) -> Result<Vec<f32>, tch::TchError> {
    super::host_values(tensor)
}

#[derive(Debug)]
struct BlockNet {
    convs: [ConvBnNet; 3],
    downsample: Option<ConvBnNet>,
}

/// The trunk and the temporary classifier.
#[derive(Debug)]
struct TrunkNet {
    stem: ConvBnNet,
    stages: Vec<Vec<BlockNet>>,
    classifier: nn::Linear,
    /// The first part (0 the stem, 1..=4 the stages) whose parameters train; the parts before it
    /// run in inference mode without gradients.
    first_trained: usize,
    /// The kind activations are computed in.
    compute: Kind,
}

impl TrunkNet {
    /// Builds the net on two stores: frozen parts on `frozen`, trained parts on `trained`.
    fn new(
        net: &ResNet50,
        frozen: &nn::Path,
        trained: &nn::Path,
        scope: TrainBackbone,
        classes: usize,
        compute: Kind,
    ) -> TrunkNet {
        // Parts: 0 is the stem, 1..=4 the stages.
        let first_trained = match scope {
            TrainBackbone::All => 0,
            TrainBackbone::LastStage => net.stages.len(),
            TrainBackbone::None => usize::MAX,
        };
        let root_for = |part: usize| if part >= first_trained { trained } else { frozen };
        let stem = ConvBnNet::new(root_for(0), &net.stem);
        let stages = net
            .stages
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                stage
                    .iter()
                    .map(|block| BlockNet {
                        convs: [0, 1, 2].map(|c| ConvBnNet::new(root_for(i + 1), &block.convs[c])),
                        downsample: block
                            .downsample
                            .as_ref()
                            .map(|d| ConvBnNet::new(root_for(i + 1), d)),
                    })
                    .collect()
            })
            .collect();
        let classifier = nn::linear(
            trained / "classifier",
            FEATURE_CHANNELS as i64,
            classes as i64,
            Default::default(),
        );
        TrunkNet { stem, stages, classifier, first_trained, compute }
    }

    fn load(&mut self, net: &ResNet50) -> Result<(), tch::TchError> {
        self.stem.load(&net.stem)?;
        for (stage, source) in self.stages.iter_mut().zip(&net.stages) {
            for (block, source) in stage.iter_mut().zip(source) {
                for (conv, layer) in block.convs.iter_mut().zip(&source.convs) {
                    conv.load(layer)?;
                }
                if let (Some(d), Some(layer)) = (block.downsample.as_mut(), &source.downsample) {
                    d.load(layer)?;
                }
            }
        }
        Ok(())
    }

    fn store(&self, net: &mut ResNet50) -> Result<(), tch::TchError> {
        self.stem.store(&mut net.stem)?;
        for (stage, target) in self.stages.iter().zip(net.stages.iter_mut()) {
            for (block, target) in stage.iter().zip(target.iter_mut()) {
                for (conv, layer) in block.convs.iter().zip(target.convs.iter_mut()) {
                    conv.store(layer)?;
                }
                if let (Some(d), Some(layer)) = (&block.downsample, target.downsample.as_mut()) {
                    d.store(layer)?;
                }
            }
        }
        Ok(())
    }

    /// The `[N,2048,h,w]` feature map, in the compute kind. Activations are laid out channels
    /// last (strides of NHWC, shape still NCHW), which libtorch's CPU convolutions run faster
    /// and every later layer keeps.
    fn features(&self, x: &Tensor, train: bool) -> Tensor {
        let x = &channels_last(&x.to_kind(self.compute));
        let frozen_part = |part: usize| part < self.first_trained;
        let run_stem = |x: &Tensor| {
            self.stem.forward(x, train && !frozen_part(0)).relu().max_pool2d(
                [3, 3],
                [2, 2],
                [1, 1],
                [1, 1],
                false,
            )
        };
        let mut y = if frozen_part(0) { tch::no_grad(|| run_stem(x)) } else { run_stem(x) };
        for (i, stage) in self.stages.iter().enumerate() {
            let frozen = frozen_part(i + 1);
            let run = |input: &Tensor| {
                let mut y = input.shallow_clone();
                for block in stage {
                    let t = train && !frozen;
                    let branch = block.convs[0].forward(&y, t).relu();
                    let branch = block.convs[1].forward(&branch, t).relu();
                    let branch = block.convs[2].forward(&branch, t);
                    let shortcut = match &block.downsample {
                        Some(d) => d.forward(&y, t),
                        None => y.shallow_clone(),
                    };
                    y = (branch + shortcut).relu();
                }
                y
            };
            y = if frozen { tch::no_grad(|| run(&y)) } else { run(&y) };
        }
        y
    }
}

impl ModuleT for TrunkNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        self.features(x, train)
            .mean_dim([2i64, 3].as_slice(), false, Kind::Float)
            .apply(&self.classifier)
    }
}

/// Trains the trunk of `net` as `options.scope` says and writes the kept weights back into
/// it; returns the history (loss and accuracy of the temporary classifier) and the kept epoch
/// (highest validation accuracy, lower loss breaking a tie; 0 when nothing trained).
pub fn train_trunk(
    net: &mut ResNet50,
    train: &ImageSet,
    val: &ImageSet,
    options: &TrunkOptions,
    stop: &AtomicBool,
    mut on_epoch: impl FnMut(&EpochRecord),
    mut on_batch: impl FnMut(usize),
) -> Result<(Vec<EpochRecord>, usize), TrunkError> {
    if options.scope == TrainBackbone::None {
        return Ok((Vec::new(), 0));
    }
    if train.len() == 0 || val.len() == 0 || options.epochs == 0 || options.batch_size < 2 {
        return Err(TrunkError::Invalid(format!(
            "{} training and {} validation images, {} epochs, batch {}: each needs at least one \
             (batch at least 2, for batch norm)",
            train.len(),
            val.len(),
            options.epochs,
            options.batch_size
        )));
    }
    tch::manual_seed(options.seed as i64);
    let device = options.device;
    let frozen_store = nn::VarStore::new(device);
    let trained_store = nn::VarStore::new(device);
    let mut model = TrunkNet::new(
        net,
        &frozen_store.root(),
        &trained_store.root(),
        options.scope,
        options.classes,
        compute_kind(options.precision)?,
    );
    model.load(net)?;
    let mut optimizer =
        nn::adamw(0.9, 0.999, options.weight_decay).build(&trained_store, options.lr)?;
    let n = train.len();
    let steps = (n.div_ceil(options.batch_size) * options.epochs) as f64;
    let (mut step, mut history) = (0usize, Vec::new());
    let (mut best_score, mut best_epoch) = ((f64::NEG_INFINITY, f64::NEG_INFINITY), 0);
    let mut best: Option<Vec<(String, Tensor)>> = None;
    for epoch in 1..=options.epochs {
        let order = Tensor::f_randperm(n as i64, (Kind::Int64, Device::Cpu))?;
        let pick_varied = Tensor::f_rand([n as i64], (Kind::Float, Device::Cpu))?.f_lt(0.5)?;
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0.0, 0usize);
        let mut lr = options.lr;
        for start in (0..n).step_by(options.batch_size) {
            if stop.load(Ordering::Relaxed) {
                return Err(TrunkError::Stopped);
            }
            let size = options.batch_size.min(n - start);
            if size < 2 {
                // Batch norm needs two images; a last one alone waits for the next epoch.
                on_batch(size);
                continue;
            }
            let index = order.f_narrow(0, start as i64, size as i64)?;
            let clean = train.clean.f_index_select(0, &index)?;
            let x = match &train.varied {
                Some(varied) => {
                    let varied = varied.f_index_select(0, &index)?;
                    let mask = pick_varied.f_index_select(0, &index)?.f_view([-1, 1, 1, 1])?;
                    varied.f_where_self(&mask, &clean)?
                }
                None => clean,
            };
            let flip =
                Tensor::f_rand([size as i64, 1, 1, 1], (Kind::Float, Device::Cpu))?.f_lt(0.5)?;
            let x = x.f_flip([3])?.f_where_self(&flip, &x)?;
            let x = random_shift(&x.f_to_kind(Kind::Float)?)?.f_to_device(device)?;
            let y = train.labels.f_index_select(0, &index)?.f_to_device(device)?;
            lr = options.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / steps).cos());
            optimizer.set_lr(lr);
            let logits = model.forward_t(&x, true);
            let loss =
                logits.f_cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Mean, -100, 0.0)?;
            optimizer.backward_step(&loss);
            loss_sum += loss.f_double_value(&[])? * size as f64;
            correct += hits(&logits, &y)?;
            seen += size;
            step += 1;
            on_batch(size);
        }
        let (val_loss, val_accuracy) = evaluate(&model, val, options.batch_size, device)?;
        let record = EpochRecord {
            epoch,
            lr,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct / seen.max(1) as f64,
            val_loss,
            val_accuracy,
        };
        on_epoch(&record);
        history.push(record);
        // The trunk's classifier is thrown away: what counts is how well its features separate
        // the classes, which accuracy follows; the loss rises from the point where the
        // classifier grows over-confident while accuracy still climbs (Fashion-MNIST, 32 px:
        // lowest loss at epoch 8 of 12 with 91.7 %, 92.3 % at epoch 11).
        let score = (val_accuracy, -val_loss);
        if val_loss.is_finite() && score > best_score {
            (best_score, best_epoch) = (score, epoch);
            best = Some(snapshot(&trained_store)?);
        }
    }
    let Some(best) = best else {
        return Err(TrunkError::Invalid("the validation loss never became finite".into()));
    };
    restore(&trained_store, &best)?;
    model.store(net)?;
    Ok((history, best_epoch))
}

/// Moves each image of `x` (`[N,C,H,W]`, float) by its own random offset of up to an eighth of
/// its side in each direction, the uncovered border filled by repeating the edge pixels: an
/// object is rarely centred the same way twice, and without this the trunk learns the
/// training images' framing (at 32 px it overfitted from the eighth epoch on Fashion-MNIST).
fn random_shift(x: &Tensor) -> Result<Tensor, tch::TchError> {
    let (n, _, h, w) = x.size4()?;
    let pad = (h.min(w) / 8).max(1);
    let padded = x.f_replication_pad2d([pad, pad, pad, pad])?;
    let offsets = Tensor::f_randint(2 * pad + 1, [n, 2], (Kind::Int64, Device::Cpu))?;
    let offsets: Vec<i64> = super::host_values(&offsets)?;
    let crops = offsets
        .chunks_exact(2)
        .enumerate()
        .map(|(i, yx)| padded.f_get(i as i64)?.f_narrow(1, yx[0], h)?.f_narrow(2, yx[1], w))
        .collect::<Result<Vec<_>, _>>()?;
    Tensor::f_stack(&crops, 0)
}

fn compute_kind(precision: Precision) -> Result<Kind, TrunkError> {
    if precision == Precision::F16 {
        return Err(TrunkError::Invalid(
            "float16 needs loss scaling, which trunk training does not do; use bf16 or f32".into(),
        ));
    }
    Ok(kind_of(precision))
}

fn hits(logits: &Tensor, labels: &Tensor) -> Result<f64, tch::TchError> {
    logits.f_argmax(-1, false)?.f_eq_tensor(labels)?.f_sum(Kind::Double)?.f_double_value(&[])
}

fn evaluate(
    model: &TrunkNet,
    set: &ImageSet,
    batch: usize,
    device: Device,
) -> Result<(f64, f64), TrunkError> {
    let _no_grad = tch::no_grad_guard();
    let n = set.len();
    let (mut loss, mut correct) = (0.0, 0.0);
    for start in (0..n).step_by(batch) {
        let size = batch.min(n - start) as i64;
        let x = set
            .clean
            .f_narrow(0, start as i64, size)?
            .f_to_kind(Kind::Float)?
            .f_to_device(device)?;
        let y = set.labels.f_narrow(0, start as i64, size)?.f_to_device(device)?;
        let logits = model.forward_t(&x, false);
        let l = logits.f_cross_entropy_loss::<Tensor>(&y, None, tch::Reduction::Sum, -100, 0.0)?;
        loss += l.f_double_value(&[])?;
        correct += hits(&logits, &y)?;
    }
    Ok((loss / n as f64, correct / n as f64))
}

fn snapshot(store: &nn::VarStore) -> Result<Vec<(String, Tensor)>, tch::TchError> {
    let _no_grad = tch::no_grad_guard();
    store.variables().into_iter().map(|(name, t)| Ok((name, t.f_detach()?.copy()))).collect()
}

fn restore(store: &nn::VarStore, saved: &[(String, Tensor)]) -> Result<(), tch::TchError> {
    let _no_grad = tch::no_grad_guard();
    let mut variables = store.variables();
    for (name, value) in saved {
        if let Some(variable) = variables.get_mut(name) {
            variable.f_copy_(value)?;
        }
    }
    Ok(())
}

/// Reads a ResNet-50 whose tensors carry torchvision's names with batch norm as separate
/// parameters (`layer1.0.conv1.weight`, `layer1.0.bn1.running_mean`, …): the layout of the
/// synthetic trunk and of exports made without constant folding. A file whose batch norms were
/// folded into its convolutions cannot be trained as it is; the error says which tensor is
/// missing.
pub fn resnet_from_onnx(path: &std::path::Path) -> Result<ResNet50, crate::model::ModelError> {
    let model = onnx_file::read_model(path)?;
    let graph = onnx_file::graph_of(&model, path)?;
    let tensors: std::collections::HashMap<&str, &tract_onnx::pb::TensorProto> =
        graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut net = ResNet50::generate(0);
    let fill = |layer: &mut ConvBn| -> Result<(), crate::model::ModelError> {
        let per_out = layer.cin * layer.kernel * layer.kernel;
        let wanted = [
            (format!("{}.weight", layer.conv), layer.cout * per_out),
            (format!("{}.weight", layer.bn), layer.cout),
            (format!("{}.bias", layer.bn), layer.cout),
            (format!("{}.running_mean", layer.bn), layer.cout),
            (format!("{}.running_var", layer.bn), layer.cout),
        ];
        let mut found = Vec::new();
        for (name, count) in &wanted {
            let values = tensors
                .get(name.as_str())
                .and_then(|t| tensor_f32(t))
                .filter(|v| v.len() == *count);
            let Some(values) = values else {
                return Err(crate::model::ModelError::bundle(
                    path,
                    format!(
                        "--train-backbone needs torchvision tensor names with batch norm kept \
                         apart (export without constant folding); no float tensor `{name}` of \
                         {count} values"
                    ),
                ));
            };
            found.push(values);
        }
        let mut found = found.into_iter();
        let mut next = || found.next().unwrap_or_default();
        layer.weight = next();
        layer.gamma = next();
        layer.beta = next();
        layer.mean = next();
        layer.var = next();
        Ok(())
    };
    fill(&mut net.stem)?;
    for stage in &mut net.stages {
        for block in stage {
            for layer in &mut block.convs {
                fill(layer)?;
            }
            if let Some(layer) = block.downsample.as_mut() {
                fill(layer)?;
            }
        }
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tch trunk loaded from a seeded ResNet-50 computes, in inference mode, the feature
    /// map that the ONNX file of the same weights gives on tract's side of the project (the
    /// TorchTrunk reading the written graph), and storing it back changes nothing.
    #[test]
    fn loads_runs_and_stores_a_resnet_like_the_onnx_graph() {
        let mut net = ResNet50::generate(5);
        let frozen = nn::VarStore::new(Device::Cpu);
        let trained = nn::VarStore::new(Device::Cpu);
        let mut model = TrunkNet::new(
            &net,
            &frozen.root(),
            &trained.root(),
            TrainBackbone::LastStage,
            3,
            Kind::Float,
        );
        model.load(&net).unwrap();
        let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let ours = tch::no_grad(|| model.features(&x, false));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("backbone.onnx");
        let style = crate::model::resnet::GraphStyle {
            naming: crate::model::resnet::Naming::Torchvision,
            opset: 17,
            fold_bn: false,
            batch: None,
            input_size: 64,
            tail: crate::model::resnet::Tail::None,
        };
        let (proto, _) = crate::model::resnet::write_graph(&net, &style);
        std::fs::write(&file, crate::model::onnx::encode(&proto)).unwrap();
        let trunk = crate::model::torch_backend::TorchTrunk::open(
            &file,
            64,
            None,
            Device::Cpu,
            Kind::Float,
        )
        .unwrap();
        let reference = trunk.forward(&x).unwrap();
        assert_eq!(ours.size(), [2, 2048, 2, 2]);
        let error = (&ours - &reference).abs().max().double_value(&[]);
        let scale = reference.abs().max().double_value(&[]);
        assert!(error <= 1e-3 * scale.max(1.0), "max error {error} (scale {scale})");

        let before = net.stages[3][2].convs[2].weight.clone();
        model.store(&mut net).unwrap();
        assert_eq!(net.stages[3][2].convs[2].weight, before);

        // The file reads back into the same parameters.
        let read = resnet_from_onnx(&file).unwrap();
        assert_eq!(read.stages[2][4].convs[1].weight, net.stages[2][4].convs[1].weight);
        assert_eq!(read.stem.var, net.stem.var);
    }

    /// One epoch of last-stage training on eight random images.
    fn train_last_stage(net: &mut ResNet50, precision: Precision) -> (Vec<EpochRecord>, usize) {
        tch::manual_seed(0);
        let labels = Tensor::from_slice(&[0i64, 1, 0, 1, 0, 1, 0, 1]);
        let clean = Tensor::randn([8, 3, 32, 32], (Kind::Float, Device::Cpu))
            + labels.view([-1, 1, 1, 1]).to_kind(Kind::Float);
        let set =
            ImageSet { clean: clean.shallow_clone(), varied: None, labels: labels.shallow_clone() };
        let val = ImageSet { clean, varied: None, labels };
        let options = TrunkOptions {
            scope: TrainBackbone::LastStage,
            classes: 2,
            epochs: 1,
            batch_size: 4,
            lr: 1e-3,
            weight_decay: 0.0,
            precision,
            seed: 0,
            device: Device::Cpu,
        };
        train_trunk(net, &set, &val, &options, &AtomicBool::new(false), |_| {}, |_| {}).unwrap()
    }

    #[test]
    fn training_the_last_stage_leaves_the_others_alone() {
        for precision in [Precision::F32, Precision::Bf16] {
            let mut net = ResNet50::generate(1);
            let stem_before = net.stem.weight.clone();
            let layer3_before = net.stages[2][0].convs[0].weight.clone();
            let layer4_before = net.stages[3][0].convs[0].weight.clone();
            let (history, kept) = train_last_stage(&mut net, precision);
            assert_eq!((history.len(), kept), (1, 1));
            assert!(history[0].train_loss.is_finite() && history[0].val_loss.is_finite());
            assert_eq!(net.stem.weight, stem_before);
            assert_eq!(net.stages[2][0].convs[0].weight, layer3_before);
            assert_ne!(net.stages[3][0].convs[0].weight, layer4_before, "{precision:?}");
        }
    }

    /// In bfloat16 the trunk computes the f32 feature map to within bfloat16's rounding (8
    /// significant bits, compounded over 53 layers), from the same f32 weights.
    #[test]
    fn bf16_features_follow_the_f32_ones() {
        let net = ResNet50::generate(4);
        let run = |kind: Kind| {
            let frozen = nn::VarStore::new(Device::Cpu);
            let trained = nn::VarStore::new(Device::Cpu);
            let scope = TrainBackbone::All;
            let mut model = TrunkNet::new(&net, &frozen.root(), &trained.root(), scope, 3, kind);
            model.load(&net).unwrap();
            tch::manual_seed(9);
            let x = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
            let y = tch::no_grad(|| model.features(&x, false));
            assert_eq!(y.kind(), kind);
            y.to_kind(Kind::Float)
        };
        let (exact, reduced) = (run(Kind::Float), run(Kind::BFloat16));
        let error = (&reduced - &exact).norm().double_value(&[]);
        let scale = exact.norm().double_value(&[]);
        assert!(scale > 0.0);
        assert!(error <= 0.05 * scale, "relative error {}", error / scale);
        assert!(error > 0.0, "bf16 ran in f32");
    }

    #[test]
    fn random_shift_moves_each_image_within_an_eighth_and_repeats_the_edge() {
        tch::manual_seed(3);
        // 64 images of 16×16 with one bright pixel at (8, 8): after the shift each image still
        // has its pixel, at most 2 px away, and the shifts differ between images.
        let x = Tensor::zeros([64, 1, 16, 16], (Kind::Float, Device::Cpu));
        let _ = x.narrow(2, 8, 1).narrow(3, 8, 1).fill_(1.0);
        let shifted = random_shift(&x).unwrap();
        assert_eq!(shifted.size(), [64, 1, 16, 16]);
        let pixels: Vec<f32> = values(&shifted).unwrap();
        let mut places = std::collections::HashSet::new();
        for image in pixels.chunks_exact(256) {
            let bright: Vec<usize> = (0..256).filter(|&i| image[i] == 1.0).collect();
            assert_eq!(bright.len(), 1, "{bright:?}");
            let (y, x) = (bright[0] / 16, bright[0] % 16);
            assert!(y.abs_diff(8) <= 2 && x.abs_diff(8) <= 2, "({y}, {x})");
            places.insert((y, x));
        }
        assert!(places.len() > 10, "{places:?}");
        // A constant image stays constant: the border repeats the edge, it is not black.
        let grey = Tensor::full([4, 3, 8, 8], 0.5, (Kind::Float, Device::Cpu));
        let shifted: Vec<f32> = values(&random_shift(&grey).unwrap()).unwrap();
        assert!(shifted.iter().all(|&v| v == 0.5));
    }
}
