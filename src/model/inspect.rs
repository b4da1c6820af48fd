//! `edgesight model inspect`: what a bundle holds and what it costs per frame.
//!
//! Costs are computed from the ONNX graphs themselves, with a small shape propagation over the
//! operators a ResNet and our head use, rather than from a table of "what ResNet-50 costs": a
//! user's backbone may be a different depth or input size, and the operator of a fleet wants the
//! cost of the file that is actually deployed. Convolutions and matrix products are counted as
//! multiply–accumulates (MACs); one MAC is two FLOPs. Element-wise work (batch norm, ReLU, adds,
//! pooling) is left out, as the usual ResNet figures (4.1 GMACs at 224²) leave it out.

use std::collections::HashMap;
use std::fmt::Write as _;

use tract_onnx::pb::{GraphProto, NodeProto};

use super::backbone;
use super::bundle::{BACKBONE, HEAD};
use super::onnx::{self, node_int, node_ints};
use super::resnet::FEATURE_CHANNELS;
use super::{Bundle, ModelError};

/// Cost of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeCost {
    pub node: String,
    pub op: String,
    /// `stem`, `layer1` … `layer4`, or `tail`, from the node and weight names.
    pub stage: String,
    pub macs: u64,
    pub params: u64,
}

/// Costs of a graph for the given input shapes, plus the shapes that could be inferred.
#[derive(Debug, Clone, Default)]
pub struct GraphCost {
    pub nodes: Vec<NodeCost>,
    pub shapes: HashMap<String, Vec<usize>>,
    /// Operators whose output shape this module cannot infer (their successors are not costed).
    pub unknown_ops: Vec<String>,
}

impl GraphCost {
    pub fn total_macs(&self) -> u64 {
        self.nodes.iter().map(|n| n.macs).sum()
    }

    pub fn total_params(&self) -> u64 {
        self.nodes.iter().map(|n| n.params).sum()
    }

    /// (stage, params, MACs) in order of first appearance.
    pub fn by_stage(&self) -> Vec<(String, u64, u64)> {
        let mut stages: Vec<(String, u64, u64)> = Vec::new();
        for node in &self.nodes {
            match stages.iter_mut().find(|s| s.0 == node.stage) {
                Some(stage) => {
                    stage.1 += node.params;
                    stage.2 += node.macs;
                }
                None => stages.push((node.stage.clone(), node.params, node.macs)),
            }
        }
        stages
    }
}

/// Propagates shapes from `inputs` through `graph` and counts conv/gemm MACs and parameters.
pub fn graph_cost(graph: &GraphProto, inputs: &[(&str, Vec<usize>)]) -> GraphCost {
    let mut cost = GraphCost::default();
    let mut ints: HashMap<&str, Vec<i64>> = HashMap::new();
    for tensor in &graph.initializer {
        let dims = tensor.dims.iter().map(|&d| d.max(0) as usize).collect();
        cost.shapes.insert(tensor.name.clone(), dims);
        if let Some(values) = onnx::tensor_i64(tensor) {
            ints.insert(&tensor.name, values);
        }
    }
    for (name, dims) in inputs {
        cost.shapes.insert(name.to_string(), dims.clone());
    }
    let mut seen_stage = false;
    for node in &graph.node {
        let stage = stage_of(node, &mut seen_stage);
        let input_shapes: Option<Vec<&Vec<usize>>> =
            node.input.iter().filter(|i| !i.is_empty()).map(|i| cost.shapes.get(i)).collect();
        let Some(shapes) = input_shapes else { continue };
        let Some((out, macs, params)) = infer(node, &shapes, &ints) else {
            cost.unknown_ops.push(format!("{} ({})", node.name, node.op_type));
            continue;
        };
        if let Some(name) = node.output.first() {
            cost.shapes.insert(name.clone(), out);
        }
        if macs > 0 || params > 0 {
            let node_name = node.name.clone();
            cost.nodes.push(NodeCost {
                node: node_name,
                op: node.op_type.clone(),
                stage,
                macs,
                params,
            });
        }
    }
    cost
}

/// `layerN` / `stageN` found in the node or its weight names; `stem` before, `tail` after.
fn stage_of(node: &NodeProto, seen_stage: &mut bool) -> String {
    let names = std::iter::once(&node.name).chain(node.input.iter().skip(1));
    for name in names {
        for (marker, label) in [("layer", "layer"), ("stage", "layer")] {
            if let Some(at) = name.find(marker) {
                let digit = name[at + marker.len()..].chars().next().filter(char::is_ascii_digit);
                if let Some(digit) = digit {
                    *seen_stage = true;
                    return format!("{label}{digit}");
                }
            }
        }
    }
    if *seen_stage { "tail".to_string() } else { "stem".to_string() }
}

/// Output shape, MACs and parameters of one node, or `None` if the op is not understood.
fn infer(
    node: &NodeProto,
    shapes: &[&Vec<usize>],
    ints: &HashMap<&str, Vec<i64>>,
) -> Option<(Vec<usize>, u64, u64)> {
    let x = shapes.first()?;
    let numel = |s: &Vec<usize>| s.iter().product::<usize>() as u64;
    match node.op_type.as_str() {
        "Conv" => {
            let w = shapes.get(1)?;
            if w.len() < 3 || x.len() != w.len() {
                return None;
            }
            let spatial = window_output(node, x, &w[2..])?;
            let mut out = vec![x[0], w[0]];
            out.extend(&spatial);
            let macs = numel(&out) * (w[1] * w[2..].iter().product::<usize>()) as u64;
            let params = numel(w) + shapes.get(2).map_or(0, |b| numel(b));
            Some((out, macs, params))
        }
        "MaxPool" | "AveragePool" if x.len() > 2 => {
            let kernel: Vec<usize> =
                node_ints(node, "kernel_shape")?.iter().map(|&k| k as usize).collect();
            let mut out = x[..2].to_vec();
            out.extend(window_output(node, x, &kernel)?);
            Some((out, 0, 0))
        }
        "GlobalAveragePool" | "GlobalMaxPool" if x.len() > 2 => {
            let mut out = x[..2].to_vec();
            out.extend(std::iter::repeat_n(1, x.len().saturating_sub(2)));
            Some((out, 0, 0))
        }
        "BatchNormalization" => {
            let params = shapes[1..].iter().map(|s| numel(s)).sum();
            Some(((*x).clone(), 0, params))
        }
        "Relu" | "Clip" | "Sigmoid" | "Identity" | "Dropout" | "LeakyRelu" | "Softmax" => {
            Some(((*x).clone(), 0, 0))
        }
        "Add" | "Sum" | "Mul" | "Sub" | "Div" => broadcast(shapes).map(|s| (s, 0, 0)),
        "Flatten" => {
            let axis = node_int(node, "axis").unwrap_or(1).clamp(0, x.len() as i64) as usize;
            Some((vec![x[..axis].iter().product(), x[axis..].iter().product()], 0, 0))
        }
        "Reshape" => {
            let target = ints.get(node.input.get(1)?.as_str())?;
            reshape(x, target).map(|s| (s, 0, 0))
        }
        "ReduceMean" => {
            let axes = node_ints(node, "axes")?;
            let keep = node_int(node, "keepdims").unwrap_or(1) != 0;
            let rank = x.len() as i64;
            if rank == 0 {
                return None;
            }
            let axes: Vec<usize> = axes.iter().map(|&a| a.rem_euclid(rank) as usize).collect();
            let out = (0..x.len())
                .filter_map(|i| match (axes.contains(&i), keep) {
                    (true, true) => Some(1),
                    (true, false) => None,
                    (false, _) => Some(x[i]),
                })
                .collect();
            Some((out, 0, 0))
        }
        "Gemm" | "MatMul" => {
            let w = shapes.get(1)?;
            if x.len() != 2 || w.len() != 2 {
                return None;
            }
            let trans = |name| node.op_type == "Gemm" && node_int(node, name) == Some(1);
            let (m, k) = if trans("transA") { (x[1], x[0]) } else { (x[0], x[1]) };
            let n = if trans("transB") { w[0] } else { w[1] };
            let params = numel(w) + shapes.get(2).map_or(0, |b| numel(b));
            Some((vec![m, n], (m * k * n) as u64, params))
        }
        _ => None,
    }
}

/// Spatial output size of a convolution or pooling window (pads, strides, dilations,
/// `auto_pad`, `ceil_mode`).
fn window_output(node: &NodeProto, x: &[usize], kernel: &[usize]) -> Option<Vec<usize>> {
    let rank = kernel.len();
    let spatial = x.get(2..)?;
    if spatial.len() != rank {
        return None;
    }
    let strides = node_ints(node, "strides").unwrap_or_else(|| vec![1; rank]);
    let dilations = node_ints(node, "dilations").unwrap_or_else(|| vec![1; rank]);
    let pads = node_ints(node, "pads").unwrap_or_else(|| vec![0; 2 * rank]);
    let auto_pad = node.attribute.iter().find(|a| a.name == "auto_pad").map(|a| a.s.clone());
    let same = auto_pad.as_deref().is_some_and(|p| p.starts_with(b"SAME"));
    let ceil = node_int(node, "ceil_mode") == Some(1);
    (0..rank)
        .map(|i| {
            let stride = (*strides.get(i)?).max(0) as usize;
            if stride == 0 {
                return None;
            }
            if same {
                return Some(spatial[i].div_ceil(stride));
            }
            let span = ((*dilations.get(i)?).max(1) as usize) * kernel[i].saturating_sub(1) + 1;
            let padded = spatial[i] + (pads.get(i)? + pads.get(i + rank)?).max(0) as usize;
            let room = padded.checked_sub(span)?;
            Some(if ceil { room.div_ceil(stride) } else { room / stride } + 1)
        })
        .collect()
}

fn broadcast(shapes: &[&Vec<usize>]) -> Option<Vec<usize>> {
    let rank = shapes.iter().map(|s| s.len()).max()?;
    (0..rank)
        .map(|i| {
            let mut dims =
                shapes.iter().filter_map(|s| (i + s.len()).checked_sub(rank).map(|j| s[j]));
            dims.try_fold(1, |acc, d| match acc {
                1 => Some(d),
                a if d == 1 || d == a => Some(a),
                _ => None,
            })
        })
        .collect()
}

fn reshape(x: &[usize], target: &[i64]) -> Option<Vec<usize>> {
    let total: usize = x.iter().product();
    let mut out: Vec<usize> = target
        .iter()
        .enumerate()
        .map(|(i, &t)| match t {
            0 => x.get(i).copied().unwrap_or(0),
            -1 => 0,
            t => t as usize,
        })
        .collect();
    if let Some(free) = target.iter().position(|&t| t == -1) {
        let known: usize =
            out.iter().enumerate().filter(|(i, _)| *i != free).map(|(_, d)| d).product();
        out[free] = total.checked_div(known)?;
    }
    (out.iter().product::<usize>() == total).then_some(out)
}

/// The report printed by `edgesight model inspect`.
pub fn inspect(bundle: &Bundle) -> Result<String, ModelError> {
    let s = bundle.input_size as usize;
    let backbone_path = bundle.dir.join(BACKBONE);
    let proto = onnx::read_model(&backbone_path)?;
    let cut = backbone::cut(&proto, &backbone_path, bundle.manifest.backbone_output.as_deref())?;
    let graph = onnx::graph_of(&cut.model, &backbone_path)?;
    let trunk = graph_cost(graph, &[(cut.input.as_str(), vec![1, 3, s, s])]);
    let features = trunk.shapes.get(&cut.output).cloned().unwrap_or_default();
    // The same rule the loader applies: a report on a graph that cannot run would mislead.
    if features.len() != 4 || features[1] != FEATURE_CHANNELS {
        let reason = format!(
            "not a ResNet-50 trunk: the cut at `{}` has shape {features:?}, expected \
             [1, {FEATURE_CHANNELS}, h, w]",
            cut.output
        );
        return Err(ModelError::bundle(&backbone_path, reason));
    }
    let h = features[2];

    let head_path = bundle.dir.join(HEAD);
    let head_proto = onnx::read_model(&head_path)?;
    let head_graph = onnx::graph_of(&head_proto, &head_path)?;
    let head_input = super::head::real_inputs(head_graph).first().map(|s| s.to_string());
    let head_input = head_input.unwrap_or_default();
    let head = graph_cost(head_graph, &[(head_input.as_str(), vec![1, bundle.components, h, h])]);
    let projection_macs = (h * h * bundle.components * FEATURE_CHANNELS) as u64;
    let gflops = |macs: u64| 2.0 * macs as f64 / 1e9;

    let mut out = String::new();
    let m = &bundle.manifest;
    let _ =
        writeln!(out, "model     {} {} (checksum {})", m.name, m.version, bundle.identity.checksum);
    let _ = writeln!(out, "created   {}", m.created);
    let _ = writeln!(out, "input     [N,3,{s},{s}] mean {:?} std {:?}", m.mean, m.std);
    let _ = writeln!(
        out,
        "backbone  {BACKBONE}: opset {}, input `{}`, cut at `{}` ({}) -> {:?}",
        onnx::opset_of(&proto),
        cut.input,
        cut.output,
        cut.rule,
        features
    );
    // Parameters count every initializer a stage reads, batch-norm running statistics included.
    let _ = writeln!(out, "  {:<8} {:>12} {:>10}", "stage", "params", "GFLOPs");
    for (stage, params, macs) in trunk.by_stage() {
        let _ = writeln!(out, "  {stage:<8} {params:>12} {:>10.3}", gflops(macs));
    }
    let (trunk_params, trunk_macs) = (trunk.total_params(), trunk.total_macs());
    let _ = writeln!(out, "  {:<8} {trunk_params:>12} {:>10.3}", "total", gflops(trunk_macs));
    let _ = writeln!(out, "  (params include batch-norm statistics; 1 MAC = 2 FLOPs)");
    if !trunk.unknown_ops.is_empty() {
        let _ = writeln!(out, "  (not costed: {})", trunk.unknown_ops.join(", "));
    }
    let variance = m.explained_variance.map_or("n/a".to_string(), |v| format!("{v:.3}"));
    let _ = writeln!(
        out,
        "pca       k = {} of {FEATURE_CHANNELS} channels, explained variance {variance}, \
         projection {:.3} GFLOPs",
        bundle.components,
        gflops(projection_macs)
    );
    let _ = writeln!(
        out,
        "head      {HEAD}: {} params, {:.3} GFLOPs, output [N,{}]",
        head.total_params(),
        gflops(head.total_macs()),
        bundle.labels.len()
    );
    let total = trunk_macs + projection_macs + head.total_macs();
    let _ = writeln!(out, "total     {:.3} GFLOPs per frame at {s}x{s}", gflops(total));
    let _ = writeln!(out, "labels    ({}) {}", bundle.labels.len(), bundle.labels.join(", "));
    if let Some(metrics) = m.metrics.as_ref().filter(|t| !t.is_empty()) {
        let _ = writeln!(out, "metrics   {}", metrics_line(metrics));
    }
    Ok(out)
}

/// The manifest's `[metrics]` on one line, keys in the table's (alphabetical) order, numbers
/// to 4 decimal places (`edgesight train` writes accuracies, losses, the kept epoch and the
/// report's file name).
fn metrics_line(metrics: &toml::Table) -> String {
    let value = |v: &toml::Value| match v {
        toml::Value::Float(f) => format!("{f:.4}"),
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    metrics.iter().map(|(k, v)| format!("{k} {}", value(v))).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::resnet::{GraphStyle, Naming, ResNet50, Tail, write_graph};

    #[test]
    fn resnet50_at_224_costs_4_1_gmacs() {
        let style = GraphStyle {
            naming: Naming::Torchvision,
            opset: 17,
            fold_bn: false,
            batch: None,
            input_size: 224,
            tail: Tail::FlattenGemm,
        };
        let (model, features) = write_graph(&ResNet50::generate(0), &style);
        let graph = model.graph.unwrap_or_default();
        let cost = graph_cost(&graph, &[("input", vec![1, 3, 224, 224])]);
        assert!(cost.unknown_ops.is_empty(), "{:?}", cost.unknown_ops);
        assert_eq!(cost.shapes.get(&features), Some(&vec![1, 2048, 7, 7]));
        let gmacs = cost.total_macs() as f64 / 1e9;
        // torchvision's published figure: 4.09 GMACs (8.2 GFLOPs), classifier included.
        assert!((gmacs - 4.09).abs() < 0.03, "{gmacs} GMACs");
        // 25.56 M parameters with the classifier (BN running statistics counted too).
        let params = cost.total_params() as f64 / 1e6;
        assert!((params - 25.6).abs() < 0.1, "{params} M parameters");
        let stages: Vec<String> = cost.by_stage().into_iter().map(|s| s.0).collect();
        assert_eq!(stages, ["stem", "layer1", "layer2", "layer3", "layer4", "tail"]);
    }

    #[test]
    fn metrics_are_one_sorted_line() {
        let table: toml::Table = toml::from_str(
            "val_loss = 0.2481\nbest_epoch = 4\nreport = \"report.json\"\n\
                            test_accuracy = 0.90821",
        )
        .unwrap();
        assert_eq!(
            metrics_line(&table),
            "best_epoch 4, report report.json, test_accuracy 0.9082, val_loss 0.2481"
        );
    }

    #[test]
    fn window_output_handles_padding_and_stride() {
        let node = NodeProto {
            attribute: vec![
                onnx::attr_ints("strides", &[2, 2]),
                onnx::attr_ints("pads", &[3, 3, 3, 3]),
            ],
            ..NodeProto::default()
        };
        assert_eq!(window_output(&node, &[1, 3, 224, 224], &[7, 7]), Some(vec![112, 112]));
    }

    #[test]
    fn reshape_resolves_zero_and_minus_one() {
        assert_eq!(reshape(&[2, 2048, 1, 1], &[0, -1]), Some(vec![2, 2048]));
        assert_eq!(reshape(&[2, 6], &[4, -1]), Some(vec![4, 3]));
        assert_eq!(reshape(&[2, 6], &[5, -1]), None);
    }
}
