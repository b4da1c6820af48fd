//! An architecture-exact ResNet-50 trunk (torchvision v1.5 layout) with seeded weights, written
//! as ONNX in the naming and operator-set styles that real exports use.
//!
//! Pretrained weights cannot be fetched on our build machines, so tests and benchmarks run this
//! network instead: same graph, same FLOPs, deterministic weights. The weights are generated per
//! convolution from its canonical torchvision name (see [`super::prng`]), then emitted by
//! [`write_graph`] in one of several styles — torchvision names at opset 17, ONNX-zoo-v1 names
//! at opset 8, batch norm folded into the convolutions, fixed or symbolic batch, with or without
//! the pooling + classifier tail — so the loader can be tested on each style and every style of
//! one seed computes the same feature map.

use tract_onnx::pb::ModelProto;

use super::onnx::{Dim, GraphWriter, attr_float, attr_int, attr_ints};
use super::prng::Rng;

/// Blocks and bottleneck width of the four stages (output channels are 4 × width).
pub const STAGES: [(usize, usize); 4] = [(3, 64), (4, 128), (6, 256), (3, 512)];
pub use super::FEATURE_CHANNELS;
/// Batch-norm epsilon, as torchvision uses.
pub const BN_EPSILON: f32 = 1e-5;

/// One convolution followed by batch norm, with its generated parameters.
#[derive(Debug, Clone)]
pub struct ConvBn {
    /// Canonical torchvision prefix of the convolution, e.g. `layer1.0.conv1`.
    pub conv: String,
    /// Canonical torchvision prefix of the batch norm, e.g. `layer1.0.bn1`.
    pub bn: String,
    pub cin: usize,
    pub cout: usize,
    pub kernel: usize,
    pub stride: usize,
    /// Weight `[cout, cin, kernel, kernel]`, row-major.
    pub weight: Vec<f32>,
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
    pub mean: Vec<f32>,
    pub var: Vec<f32>,
}

impl ConvBn {
    /// `level` scales the batch-norm gamma: 1 inside a branch, 0.2 at the end of a residual
    /// branch, 0.7 on a projection shortcut.
    fn generate(seed: u64, conv: &str, bn: &str, shape: [usize; 4], level: f64) -> ConvBn {
        let [cout, cin, kernel, stride] = shape;
        let fan_in = cin * kernel * kernel;
        let weight = Rng::derive(seed, conv).normals(cout * fan_in, (2.0 / fan_in as f64).sqrt());
        // Batch norm close to identity with a little spread, so that folding it is not a no-op.
        // He initialisation keeps the second moment through conv + ReLU, but every residual sum
        // adds to it, and a projection shortcut (no ReLU before it) doubles it. The last norm of
        // each branch is therefore scaled down (0.2) and projections by 1/√2, which keeps the
        // activations of order one through sixteen blocks.
        let mut rng = Rng::derive(seed, bn);
        let gamma = (0..cout).map(|_| (level * (1.0 + 0.1 * rng.normal())) as f32).collect();
        let beta = rng.normals(cout, 0.05);
        let mean = rng.normals(cout, 0.05);
        let var = (0..cout).map(|_| (1.0 + 0.2 * rng.uniform()) as f32).collect();
        ConvBn {
            conv: conv.to_string(),
            bn: bn.to_string(),
            cin,
            cout,
            kernel,
            stride,
            weight,
            gamma,
            beta,
            mean,
            var,
        }
    }

    /// The convolution with the batch norm folded in: `(weight', bias')`.
    pub fn folded(&self) -> (Vec<f32>, Vec<f32>) {
        let per_out = self.cin * self.kernel * self.kernel;
        let mut weight = self.weight.clone();
        let mut bias = Vec::with_capacity(self.cout);
        for o in 0..self.cout {
            let factor = f64::from(self.gamma[o]) / (f64::from(self.var[o]) + 1e-5).sqrt();
            for w in &mut weight[o * per_out..(o + 1) * per_out] {
                *w = (f64::from(*w) * factor) as f32;
            }
            bias.push((f64::from(self.beta[o]) - f64::from(self.mean[o]) * factor) as f32);
        }
        (weight, bias)
    }
}

/// A bottleneck block: three conv+BN and, in the first block of a stage, a projection.
#[derive(Debug, Clone)]
pub struct Bottleneck {
    pub convs: [ConvBn; 3],
    pub downsample: Option<ConvBn>,
}

/// All parameters of the trunk plus a 1000-class classifier for the tail variants.
#[derive(Debug, Clone)]
pub struct ResNet50 {
    pub stem: ConvBn,
    pub stages: Vec<Vec<Bottleneck>>,
    /// `fc.weight` `[1000, 2048]` and `fc.bias` `[1000]`, used only when a tail is written.
    pub fc_weight: Vec<f32>,
    pub fc_bias: Vec<f32>,
}

pub const CLASSIFIER_CLASSES: usize = 1000;

impl ResNet50 {
    /// He-initialised weights drawn from `seed`; identical for every naming style.
    pub fn generate(seed: u64) -> ResNet50 {
        let stem = ConvBn::generate(seed, "conv1", "bn1", [64, 3, 7, 2], 1.0);
        let mut stages = Vec::new();
        let mut cin = 64;
        for (stage_index, &(blocks, width)) in STAGES.iter().enumerate() {
            let mut stage = Vec::new();
            for block in 0..blocks {
                let prefix = format!("layer{}.{block}", stage_index + 1);
                // torchvision v1.5: the stride of a stage sits on the 3×3 convolution.
                let stride = if block == 0 && stage_index > 0 { 2 } else { 1 };
                let name = |part: &str| format!("{prefix}.{part}");
                let convs = [
                    ConvBn::generate(seed, &name("conv1"), &name("bn1"), [width, cin, 1, 1], 1.0),
                    ConvBn::generate(
                        seed,
                        &name("conv2"),
                        &name("bn2"),
                        [width, width, 3, stride],
                        1.0,
                    ),
                    ConvBn::generate(
                        seed,
                        &name("conv3"),
                        &name("bn3"),
                        [width * 4, width, 1, 1],
                        0.2,
                    ),
                ];
                let downsample = (block == 0).then(|| {
                    let conv = name("downsample.0");
                    let bn = name("downsample.1");
                    ConvBn::generate(seed, &conv, &bn, [width * 4, cin, 1, stride], 0.7)
                });
                stage.push(Bottleneck { convs, downsample });
                cin = width * 4;
            }
            stages.push(stage);
        }
        let fc_weight = Rng::derive(seed, "fc.weight")
            .normals(CLASSIFIER_CLASSES * FEATURE_CHANNELS, (1.0 / 2048.0f64).sqrt());
        let fc_bias = Rng::derive(seed, "fc.bias").normals(CLASSIFIER_CLASSES, 0.01);
        ResNet50 { stem, stages, fc_weight, fc_bias }
    }
}

/// Canonical names and weight shapes (`[out, in, kh, kw]`) of ResNet-50's 53 convolutions, in
/// torchvision order (a block's downsample after its three convolutions). Loaders match a
/// user's graph against this list.
pub fn canonical_convolutions() -> Vec<(String, [usize; 4])> {
    let mut convs = vec![("conv1".to_string(), [64, 3, 7, 7])];
    let mut cin = 64;
    for (stage, &(blocks, width)) in STAGES.iter().enumerate() {
        for block in 0..blocks {
            let name = |part: &str| format!("layer{}.{block}.{part}", stage + 1);
            convs.push((name("conv1"), [width, cin, 1, 1]));
            convs.push((name("conv2"), [width, width, 3, 3]));
            convs.push((name("conv3"), [width * 4, width, 1, 1]));
            if block == 0 {
                convs.push((name("downsample.0"), [width * 4, cin, 1, 1]));
            }
            cin = width * 4;
        }
    }
    convs
}

/// How tensors and nodes are named in the written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// `layer1.0.conv1.weight`, nodes `/layer1/layer1.0/conv1/Conv` (torch.onnx.export style).
    Torchvision,
    /// `resnetv17_stage1_conv0_weight`, outputs `resnetv17_stage1_conv0_fwd` (ONNX zoo v1).
    ZooV1,
}

/// What follows the last feature map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// The graph output is the feature map `[N,2048,S/32,S/32]` (the bundle layout).
    None,
    /// GlobalAveragePool → Flatten → Gemm(2048→1000).
    FlattenGemm,
    /// GlobalAveragePool → Reshape → Gemm(2048→1000).
    ReshapeGemm,
}

/// How to write a ResNet-50 as ONNX.
#[derive(Debug, Clone)]
pub struct GraphStyle {
    pub naming: Naming,
    pub opset: i64,
    /// Fold batch norm into convolution biases instead of writing BatchNormalization nodes.
    pub fold_bn: bool,
    /// `None`: symbolic batch `N`; `Some(b)`: fixed batch.
    pub batch: Option<u32>,
    pub input_size: u32,
    pub tail: Tail,
}

/// Emits names in the chosen style and keeps the per-stage counters ONNX-zoo names need
/// (`resnetv17_stage2_conv0` is the first convolution of stage 2).
struct Namer {
    naming: Naming,
    counters: std::collections::HashMap<(String, &'static str), usize>,
}

impl Namer {
    fn next(&mut self, scope: &str, kind: &'static str) -> usize {
        let counter = self.counters.entry((scope.to_string(), kind)).or_insert(0);
        *counter += 1;
        *counter - 1
    }

    fn scope(&self, canonical: &str) -> String {
        // `layer2.1.conv1` → `resnetv17_stage2_`; stem names have no stage.
        match canonical.strip_prefix("layer").and_then(|r| r.chars().next()) {
            Some(stage) => format!("resnetv17_stage{stage}_"),
            None => "resnetv17_".to_string(),
        }
    }

    /// (weight name, node name, output name) of a convolution.
    fn conv(&mut self, canonical: &str) -> (String, String, String) {
        match self.naming {
            Naming::Torchvision => {
                let node = torch_node(canonical, "Conv");
                (format!("{canonical}.weight"), node.clone(), format!("{node}_output_0"))
            }
            Naming::ZooV1 => {
                let scope = self.scope(canonical);
                let base = format!("{scope}conv{}", self.next(&scope, "conv"));
                (format!("{base}_weight"), format!("{base}_fwd"), format!("{base}_fwd"))
            }
        }
    }

    /// (parameter prefix and separator, node name, output name) of a batch norm.
    fn norm(&mut self, canonical: &str) -> ([String; 4], String, String) {
        match self.naming {
            Naming::Torchvision => {
                let node = torch_node(canonical, "BatchNormalization");
                let params = ["weight", "bias", "running_mean", "running_var"]
                    .map(|p| format!("{canonical}.{p}"));
                (params, node.clone(), format!("{node}_output_0"))
            }
            Naming::ZooV1 => {
                let scope = self.scope(canonical);
                let base = format!("{scope}batchnorm{}", self.next(&scope, "batchnorm"));
                let params =
                    ["gamma", "beta", "running_mean", "running_var"].map(|p| format!("{base}_{p}"));
                (params, format!("{base}_fwd"), format!("{base}_fwd"))
            }
        }
    }

    /// (node name, output name) of the ReLU or Add placed after `canonical` (a convolution,
    /// or `layerS.B.out` for the ReLU after a block's sum, or `layerS.B` for the sum itself).
    fn after(&mut self, canonical: &str, op: &str) -> (String, String) {
        match self.naming {
            Naming::Torchvision => {
                // torchvision reuses one ReLU module per block, which torch.onnx numbers.
                let (scope, last) = canonical.rsplit_once('.').unwrap_or(("", canonical));
                let module = match (op, last) {
                    ("Add", _) => canonical.to_string(),
                    (_, "conv2") => format!("{scope}.relu_1"),
                    (_, "out") => format!("{scope}.relu_2"),
                    _ if scope.is_empty() => "relu".to_string(),
                    _ => format!("{scope}.relu"),
                };
                let node = torch_node(&module, op);
                (node.clone(), format!("{node}_output_0"))
            }
            Naming::ZooV1 => {
                let scope = self.scope(canonical);
                let name = if op == "Add" {
                    format!("{scope}_plus{}", self.next(&scope, "plus"))
                } else {
                    format!("{scope}relu{}_fwd", self.next(&scope, "relu"))
                };
                (name.clone(), name)
            }
        }
    }
}

/// `layer1.0.conv1` → `/layer1/layer1.0/conv1/Conv`, the way torch.onnx names module calls.
fn torch_node(canonical: &str, op: &str) -> String {
    let parts: Vec<&str> = canonical.split('.').collect();
    let mut scope = String::new();
    for (i, part) in parts.iter().enumerate() {
        scope.push('/');
        // The first two levels are named by their full path (`layer1`, `layer1.0`), deeper
        // modules by their attribute name (`conv1`, `downsample`, `0`).
        if i < 2 {
            scope.push_str(&parts[..=i].join("."));
        } else {
            scope.push_str(part);
        }
    }
    format!("{scope}/{op}")
}

/// Writes `net` as an ONNX model in the given style. Returns the model and the name of the
/// 2048-channel feature-map tensor.
pub fn write_graph(net: &ResNet50, style: &GraphStyle) -> (ModelProto, String) {
    let mut namer = Namer { naming: style.naming, counters: Default::default() };
    let mut writer = GraphWriter::new(match style.naming {
        Naming::Torchvision => "main_graph",
        Naming::ZooV1 => "resnetv17",
    });
    writer.list_initializers_as_inputs(style.opset <= 8);
    let input = match style.naming {
        Naming::Torchvision => "input",
        Naming::ZooV1 => "data",
    };
    let batch = match style.batch {
        Some(b) => Dim::Fixed(i64::from(b)),
        None => Dim::symbol("N"),
    };
    let size = Dim::Fixed(i64::from(style.input_size));
    writer.input(input, &[batch.clone(), Dim::Fixed(3), size.clone(), size]);

    let mut emit = Emitter { writer: &mut writer, namer: &mut namer, style };
    let mut x = emit.conv_bn(input, &net.stem);
    x = emit.relu(&x, "conv1");
    let (pool_node, pool_out) = match style.naming {
        Naming::Torchvision => ("/maxpool/MaxPool".to_string(), "/maxpool/MaxPool_output_0"),
        Naming::ZooV1 => ("resnetv17_pool0_fwd".to_string(), "resnetv17_pool0_fwd"),
    };
    let pool_attrs = vec![
        attr_ints("kernel_shape", &[3, 3]),
        attr_ints("pads", &[1, 1, 1, 1]),
        attr_ints("strides", &[2, 2]),
    ];
    emit.writer.node("MaxPool", &pool_node, &[&x], &[pool_out], pool_attrs);
    x = pool_out.to_string();

    for stage in &net.stages {
        for block in stage {
            let identity = x.clone();
            let mut y = emit.conv_bn(&x, &block.convs[0]);
            y = emit.relu(&y, &block.convs[0].conv);
            y = emit.conv_bn(&y, &block.convs[1]);
            y = emit.relu(&y, &block.convs[1].conv);
            y = emit.conv_bn(&y, &block.convs[2]);
            let shortcut = match &block.downsample {
                Some(projection) => emit.conv_bn(&identity, projection),
                None => identity,
            };
            let block_name = block.convs[2].conv.trim_end_matches(".conv3").to_string();
            let (add_node, add_out) = emit.namer.after(&block_name, "Add");
            emit.writer.node("Add", &add_node, &[&y, &shortcut], &[&add_out], vec![]);
            x = emit.relu(&add_out, &format!("{block_name}.out"));
        }
    }
    let features = x.clone();
    emit.tail(net, &features);
    (writer.finish(style.opset), features)
}

struct Emitter<'a> {
    writer: &'a mut GraphWriter,
    namer: &'a mut Namer,
    style: &'a GraphStyle,
}

impl Emitter<'_> {
    fn conv_bn(&mut self, input: &str, layer: &ConvBn) -> String {
        let (weight_name, node, out) = self.namer.conv(&layer.conv);
        let shape = [layer.cout, layer.cin, layer.kernel, layer.kernel];
        let k = layer.kernel as i64;
        let pad = k / 2;
        let attrs = vec![
            attr_ints("dilations", &[1, 1]),
            attr_int("group", 1),
            attr_ints("kernel_shape", &[k, k]),
            attr_ints("pads", &[pad, pad, pad, pad]),
            attr_ints("strides", &[layer.stride as i64, layer.stride as i64]),
        ];
        if self.style.fold_bn {
            let (weight, bias) = layer.folded();
            let bias_name = match self.style.naming {
                Naming::Torchvision => format!("{}.bias", layer.conv),
                Naming::ZooV1 => weight_name.replace("_weight", "_bias"),
            };
            self.writer.initializer(&weight_name, &shape, &weight);
            self.writer.initializer(&bias_name, &[layer.cout], &bias);
            self.writer.node("Conv", &node, &[input, &weight_name, &bias_name], &[&out], attrs);
            return out;
        }
        self.writer.initializer(&weight_name, &shape, &layer.weight);
        self.writer.node("Conv", &node, &[input, &weight_name], &[&out], attrs);

        let (params, bn_node, bn_out) = self.namer.norm(&layer.bn);
        let values = [&layer.gamma, &layer.beta, &layer.mean, &layer.var];
        for (name, value) in params.iter().zip(values) {
            self.writer.initializer(name, &[layer.cout], value);
        }
        let mut attrs = vec![attr_float("epsilon", BN_EPSILON), attr_float("momentum", 0.9)];
        if (7..=8).contains(&self.style.opset) {
            // BatchNormalization-7 still has `spatial` (removed in opset 9); exporters of that
            // era wrote it explicitly.
            attrs.push(attr_int("spatial", 1));
        }
        let inputs: Vec<&str> =
            std::iter::once(out.as_str()).chain(params.iter().map(String::as_str)).collect();
        self.writer.node("BatchNormalization", &bn_node, &inputs, &[&bn_out], attrs);
        bn_out
    }

    fn relu(&mut self, input: &str, after: &str) -> String {
        let (node, out) = self.namer.after(after, "Relu");
        self.writer.node("Relu", &node, &[input], &[&out], vec![]);
        out
    }

    fn tail(&mut self, net: &ResNet50, features: &str) {
        let zoo = self.style.naming == Naming::ZooV1;
        if self.style.tail == Tail::None {
            let size = i64::from(self.style.input_size / 32);
            let batch = match self.style.batch {
                Some(b) => Dim::Fixed(i64::from(b)),
                None => Dim::symbol("N"),
            };
            let dims =
                [batch, Dim::Fixed(FEATURE_CHANNELS as i64), Dim::Fixed(size), Dim::Fixed(size)];
            self.writer.output(features, Some(&dims));
            return;
        }
        let name = |torch: &str, zoo_name: &str| {
            if zoo { zoo_name.to_string() } else { torch.to_string() }
        };
        let pooled = name("/avgpool/GlobalAveragePool_output_0", "resnetv17_pool1_fwd");
        let pool_node = name("/avgpool/GlobalAveragePool", "resnetv17_pool1_fwd");
        self.writer.node("GlobalAveragePool", &pool_node, &[features], &[&pooled], vec![]);
        let flat = name("/Flatten_output_0", "resnetv17_flatten0_flatten0");
        if self.style.tail == Tail::FlattenGemm {
            let node = name("/Flatten", "resnetv17_flatten0_flatten0");
            self.writer.node("Flatten", &node, &[&pooled], &[&flat], vec![attr_int("axis", 1)]);
        } else {
            let shape = name("/Constant_output_0", "reshape_attr_tensor0");
            self.writer.initializer_i64(&shape, &[2], &[0, -1]);
            let node = name("/Reshape", "resnetv17_flatten0_reshape0");
            self.writer.node("Reshape", &node, &[&pooled, &shape], &[&flat], vec![]);
        }
        let weight = name("fc.weight", "resnetv17_dense0_weight");
        let bias = name("fc.bias", "resnetv17_dense0_bias");
        let classes = CLASSIFIER_CLASSES;
        self.writer.initializer(&weight, &[classes, FEATURE_CHANNELS], &net.fc_weight);
        self.writer.initializer(&bias, &[classes], &net.fc_bias);
        let logits = name("output", "resnetv17_dense0_fwd");
        let gemm_node = name("/fc/Gemm", "resnetv17_dense0_fwd");
        let attrs = vec![attr_float("alpha", 1.0), attr_float("beta", 1.0), attr_int("transB", 1)];
        self.writer.node("Gemm", &gemm_node, &[&flat, &weight, &bias], &[&logits], attrs);
        let batch = match self.style.batch {
            Some(b) => Dim::Fixed(i64::from(b)),
            None => Dim::symbol("N"),
        };
        self.writer.output(&logits, Some(&[batch, Dim::Fixed(classes as i64)]));
    }
}

/// Parameter count of the trunk (without the classifier), for documentation and tests.
pub fn trunk_parameters(net: &ResNet50) -> usize {
    let count = |l: &ConvBn| l.weight.len() + 4 * l.cout;
    let blocks: usize = net
        .stages
        .iter()
        .flatten()
        .map(|b| b.convs.iter().map(count).sum::<usize>() + b.downsample.as_ref().map_or(0, count))
        .sum();
    count(&net.stem) + blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_node_names_follow_module_scopes() {
        assert_eq!(torch_node("layer1.0.conv1", "Conv"), "/layer1/layer1.0/conv1/Conv");
        assert_eq!(torch_node("layer1.0", "Add"), "/layer1/layer1.0/Add");
        assert_eq!(torch_node("conv1", "Conv"), "/conv1/Conv");
    }

    #[test]
    fn folding_matches_batch_norm_on_one_channel() {
        let layer = ConvBn::generate(5, "c", "b", [2, 1, 1, 1], 1.0);
        let (weight, bias) = layer.folded();
        let x = 0.7f32;
        for o in 0..2 {
            let conv = layer.weight[o] * x;
            let bn = (conv - layer.mean[o]) / (layer.var[o] + BN_EPSILON).sqrt() * layer.gamma[o]
                + layer.beta[o];
            assert!((bn - (weight[o] * x + bias[o])).abs() < 1e-6);
        }
    }
}
