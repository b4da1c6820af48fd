//! The CNN head: synthetic weights, `head.onnx` / `head.safetensors`, the shape checks a bundle
//! needs, and the in-memory "PCA projection + head" graph that the tract backend runs.
//!
//! The head is conv3×3(k→512)+ReLU → conv3×3(512→512)+ReLU → global average pool → linear
//! (512→C). `head.onnx` is what tract runs and `head.safetensors` carries the same weights under
//! the same names for the torch backend. At load time the PCA projection is folded into a 1×1
//! convolution and prepended to whatever graph `head.onnx` holds (a trained head may come from
//! another exporter, so we splice by tensor name instead of rebuilding the head), and the pooled
//! projection is added as a second output: the frame's embedding.

use std::path::Path;

use tract_onnx::pb::{GraphProto, ModelProto};

use super::ModelError;
use super::onnx::{self, Dim, GraphWriter, attr_int, attr_ints};
use super::pca::{self, Pca};
use super::prng::Rng;

/// Channels of the two 3×3 convolutions.
pub const HEAD_WIDTH: usize = 512;
/// Name of the head's input (the projected feature map) and output in files we write.
pub const HEAD_INPUT: &str = "features";
pub const HEAD_OUTPUT: &str = "logits";
/// Names of the two outputs of the runtime graph, and of its input.
pub const RUNTIME_INPUT: &str = "edgesight.backbone_features";
pub const EMBEDDING_OUTPUT: &str = "edgesight.embedding";

/// Parameters of a head, in torch layout (`fc.weight` is `[C, 512]`).
#[derive(Debug, Clone)]
pub struct HeadWeights {
    pub k: usize,
    pub classes: usize,
    /// (name, shape, values) in file order.
    pub tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl HeadWeights {
    /// He-initialised convolutions, a small classifier, small biases.
    pub fn synthetic(seed: u64, k: usize, classes: usize) -> HeadWeights {
        let he = |fan_in: usize| (2.0 / fan_in as f64).sqrt();
        let layers = [
            ("conv1", vec![HEAD_WIDTH, k, 3, 3], he(k * 9)),
            ("conv2", vec![HEAD_WIDTH, HEAD_WIDTH, 3, 3], he(HEAD_WIDTH * 9)),
            ("fc", vec![classes, HEAD_WIDTH], (1.0 / HEAD_WIDTH as f64).sqrt()),
        ];
        let mut tensors = Vec::new();
        for (layer, shape, std) in layers {
            let weight_name = format!("head.{layer}.weight");
            let count = shape.iter().product();
            let weight = Rng::derive(seed, &weight_name).normals(count, std);
            let bias = Rng::derive(seed, &format!("head.{layer}.bias")).normals(shape[0], 0.01);
            tensors.push((format!("{layer}.weight"), shape.clone(), weight));
            tensors.push((format!("{layer}.bias"), vec![shape[0]], bias));
        }
        HeadWeights { k, classes, tensors }
    }

    /// `head.safetensors`: the same tensors under the same names as the ONNX initializers.
    pub fn to_safetensors(&self, path: &Path) -> Result<Vec<u8>, ModelError> {
        let entries: Vec<(&str, Vec<usize>, &Vec<f32>)> =
            self.tensors.iter().map(|(n, s, v)| (n.as_str(), s.clone(), v)).collect();
        pca::serialize_f32(path, &entries)
    }

    /// `head.onnx` at opset 17: input `features` `[N,k,h,w]`, output `logits` `[N,C]`.
    pub fn to_onnx(&self) -> ModelProto {
        let mut writer = GraphWriter::new("edgesight_head");
        let (batch, k) = (Dim::symbol("N"), Dim::Fixed(self.k as i64));
        writer.input(HEAD_INPUT, &[batch.clone(), k, Dim::symbol("h"), Dim::symbol("w")]);
        for (name, shape, values) in &self.tensors {
            writer.initializer(name, shape, values);
        }
        let conv_attrs = || {
            vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("pads", &[1, 1, 1, 1]),
                attr_ints("strides", &[1, 1]),
            ]
        };
        let mut x = HEAD_INPUT.to_string();
        for layer in ["conv1", "conv2"] {
            let conv_out = format!("/{layer}/Conv_output_0");
            let (weight, bias) = (format!("{layer}.weight"), format!("{layer}.bias"));
            let inputs = [x.as_str(), weight.as_str(), bias.as_str()];
            writer.node("Conv", &format!("/{layer}/Conv"), &inputs, &[&conv_out], conv_attrs());
            x = format!("/{layer}/Relu_output_0");
            writer.node("Relu", &format!("/{layer}/Relu"), &[&conv_out], &[&x], vec![]);
        }
        let pooled = "/pool/GlobalAveragePool_output_0";
        writer.node("GlobalAveragePool", "/pool/GlobalAveragePool", &[&x], &[pooled], vec![]);
        let flat = "/Flatten_output_0";
        writer.node("Flatten", "/Flatten", &[pooled], &[flat], vec![attr_int("axis", 1)]);
        let gemm_inputs = [flat, "fc.weight", "fc.bias"];
        let gemm_attrs = vec![attr_int("transB", 1)];
        writer.node("Gemm", "/fc/Gemm", &gemm_inputs, &[HEAD_OUTPUT], gemm_attrs);
        writer.output(HEAD_OUTPUT, Some(&[batch, Dim::Fixed(self.classes as i64)]));
        writer.finish(17)
    }
}

/// Inputs of a graph that are not initializers (old files list initializers as inputs too).
pub fn real_inputs(graph: &GraphProto) -> Vec<&str> {
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph
        .input
        .iter()
        .map(|i| i.name.as_str())
        .filter(|name| !initializers.contains(name))
        .collect()
}

/// Checks that `head.onnx` takes k channels and gives one logit per label; errors name the file
/// and the shapes.
pub fn check_head(
    model: &ModelProto,
    path: &Path,
    k: usize,
    classes: usize,
) -> Result<(), ModelError> {
    let graph = onnx::graph_of(model, path)?;
    let inputs = real_inputs(graph);
    let [input] = inputs.as_slice() else {
        let reason = format!("expected one input, found {}: {inputs:?}", inputs.len());
        return Err(ModelError::bundle(path, reason));
    };
    let Some(output) = graph.output.first() else {
        return Err(ModelError::bundle(path, "the graph has no output"));
    };
    let declared = graph.input.iter().find(|i| i.name == *input).and_then(onnx::declared_dims);
    if let Some(dims) = declared {
        if dims.len() != 4 {
            let reason = format!("input `{input}` has rank {}, expected [N,k,h,w]", dims.len());
            return Err(ModelError::bundle(path, reason));
        }
        if let Dim::Fixed(channels) = dims[1]
            && channels as usize != k
        {
            let reason = format!("input `{input}` has {channels} channels, manifest k = {k}");
            return Err(ModelError::bundle(path, reason));
        }
    }
    // The first convolution reading the input must expect k channels (covers heads whose input
    // shape is left symbolic).
    let first_conv = graph.node.iter().find(|n| n.op_type == "Conv" && n.input[0] == *input);
    if let Some(weight) = first_conv
        .and_then(|conv| conv.input.get(1))
        .and_then(|w| graph.initializer.iter().find(|t| t.name == *w))
        && weight.dims.get(1).is_some_and(|&c| c as usize != k)
    {
        let reason = format!(
            "first convolution weight `{}` has shape {:?}, expected [_, {k}, _, _]",
            weight.name, weight.dims
        );
        return Err(ModelError::bundle(path, reason));
    }
    if let Some(Dim::Fixed(c)) = onnx::declared_dims(output).and_then(|d| d.last().cloned())
        && c as usize != classes
    {
        let reason =
            format!("output `{}` has {c} classes, manifest has {classes} labels", output.name);
        return Err(ModelError::bundle(path, reason));
    }
    Ok(())
}

/// The graph the backend runs after the backbone: `features [N,2048,h,w]` → folded PCA 1×1
/// convolution → the head from `head.onnx`, plus the pooled projection as a second output.
/// Outputs are `[logits, embedding]`.
pub fn runtime_graph(head: &ModelProto, path: &Path, pca: &Pca) -> Result<ModelProto, ModelError> {
    let mut model = head.clone();
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| ModelError::bundle(path, "the ONNX file has no graph"))?;
    let head_input = match real_inputs(graph).as_slice() {
        [one] => one.to_string(),
        other => {
            let reason = format!("expected one input, found {}: {other:?}", other.len());
            return Err(ModelError::bundle(path, reason));
        }
    };
    let Some(logits) = graph.output.first().map(|o| o.name.clone()) else {
        return Err(ModelError::bundle(path, "the graph has no output"));
    };

    // Build the prefix (projection) and the embedding branch with our writer, then splice.
    let (weight, bias) = pca.fold();
    let mut prefix = GraphWriter::new("projection");
    let dims = [Dim::symbol("N"), Dim::Fixed(pca.dims as i64), Dim::symbol("h"), Dim::symbol("w")];
    prefix.input(RUNTIME_INPUT, &dims);
    prefix.initializer("edgesight.pca.weight", &[pca.k, pca.dims, 1, 1], &weight);
    prefix.initializer("edgesight.pca.bias", &[pca.k], &bias);
    let conv_inputs = [RUNTIME_INPUT, "edgesight.pca.weight", "edgesight.pca.bias"];
    let kernel = vec![attr_ints("kernel_shape", &[1, 1])];
    prefix.node("Conv", "edgesight.pca.projection", &conv_inputs, &[&head_input], kernel);
    let pooled = "edgesight.pca.pooled";
    prefix.node("GlobalAveragePool", "edgesight.pca.pool", &[&head_input], &[pooled], vec![]);
    let flatten = vec![attr_int("axis", 1)];
    prefix.node("Flatten", "edgesight.pca.flatten", &[pooled], &[EMBEDDING_OUTPUT], flatten);
    prefix.output(EMBEDDING_OUTPUT, None);
    let prefix = prefix.finish(17).graph.unwrap_or_default();

    let head_nodes = std::mem::take(&mut graph.node);
    graph.node = prefix.node.into_iter().chain(head_nodes).collect();
    graph.initializer.extend(prefix.initializer);
    graph.input.retain(|i| i.name != head_input);
    graph.input.insert(0, prefix.input[0].clone());
    // Shapes declared for the old input or intermediate values would only constrain tract.
    graph.value_info.clear();
    graph.output.retain(|o| o.name == logits);
    graph.output.iter_mut().for_each(|o| o.r#type = None);
    graph.output.extend(prefix.output);
    Ok(model)
}
