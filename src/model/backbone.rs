//! Finding where to cut a user's ResNet-50 ONNX file, and cutting it.
//!
//! Users bring backbones as they have them: torchvision exports (with the classifier), ONNX zoo
//! v1/v2 files (old operator sets, initializers listed as inputs, `Reshape` or `Flatten` before
//! the `Gemm`), or our own trunk-only `backbone.onnx`. All of them hold the same thing before
//! the tail: the last `[N,2048,h,w]` feature map. We find it on the protobuf, before tract sees
//! the graph: the input of the last global pooling node (`GlobalAveragePool`, `AveragePool` or
//! `ReduceMean`), else the graph output, unless the manifest names the tensor. Then we prune the
//! graph to what that tensor needs, so operators of the classifier (which tract might not even
//! support) are never parsed, and drop declared intermediate shapes that would pin a batch size.
//! Whether the cut really is a 2048-channel map is checked once shapes are known (by tract in
//! the backend, by [`super::inspect`] for reports).

use std::collections::HashSet;
use std::path::Path;

use tract_onnx::pb::{GraphProto, ModelProto, ValueInfoProto};

use super::ModelError;
use super::head::real_inputs;
use super::onnx::{self, Dim};

/// Pooling operators that end a ResNet trunk.
const POOLING_OPS: [&str; 3] = ["GlobalAveragePool", "AveragePool", "ReduceMean"];

/// A backbone graph cut at its feature map.
#[derive(Debug, Clone)]
pub struct CutGraph {
    /// The pruned model: one input, one output (the feature map).
    pub model: ModelProto,
    pub input: String,
    /// Declared dims of the input in the original file.
    pub input_dims: Option<Vec<Dim>>,
    /// The tensor the graph was cut at.
    pub output: String,
    /// How the cut was chosen, for reports: "manifest", "pooling input" or "graph output".
    pub rule: &'static str,
}

impl CutGraph {
    /// The fixed batch size of the file's input, if it has one.
    pub fn fixed_batch(&self) -> Option<usize> {
        match self.input_dims.as_ref()?.first()? {
            Dim::Fixed(b) if *b > 0 => Some(*b as usize),
            _ => None,
        }
    }
}

/// The name of the tensor to cut at: `requested` if given (it must exist), else the input of
/// the last pooling node, else the first graph output.
pub fn find_cut(
    graph: &GraphProto,
    path: &Path,
    requested: Option<&str>,
) -> Result<(String, &'static str), ModelError> {
    if let Some(name) = requested {
        let produced = graph.node.iter().any(|n| n.output.iter().any(|o| o == name));
        if !produced {
            let reason = format!("no node produces `{name}` (named by manifest backbone_output)");
            return Err(ModelError::bundle(path, reason));
        }
        return Ok((name.to_string(), "manifest"));
    }
    let pooling = graph.node.iter().rev().find(|n| POOLING_OPS.contains(&n.op_type.as_str()));
    if let Some(input) = pooling.and_then(|n| n.input.first()) {
        return Ok((input.clone(), "pooling input"));
    }
    match graph.output.first() {
        Some(output) => Ok((output.name.clone(), "graph output")),
        None => Err(ModelError::bundle(path, "the graph has no output")),
    }
}

/// Cuts `model` at its feature map (see [`find_cut`]) and keeps only the nodes and initializers
/// that the feature map depends on.
pub fn cut(
    model: &ModelProto,
    path: &Path,
    requested: Option<&str>,
) -> Result<CutGraph, ModelError> {
    let graph = onnx::graph_of(model, path)?;
    let inputs = real_inputs(graph);
    let [input] = inputs.as_slice() else {
        let reason = format!("a backbone has one image input, this graph has {inputs:?}");
        return Err(ModelError::bundle(path, reason));
    };
    let input = input.to_string();
    let input_info = graph.input.iter().find(|i| i.name == input).cloned();
    let (output, rule) = find_cut(graph, path, requested)?;

    // Walk back from the cut: a node is kept when one of its outputs is needed.
    let mut needed: HashSet<&str> = HashSet::from([output.as_str()]);
    let mut keep = vec![false; graph.node.len()];
    for (index, node) in graph.node.iter().enumerate().rev() {
        if node.output.iter().any(|o| needed.contains(o.as_str())) {
            keep[index] = true;
            needed.extend(node.input.iter().filter(|i| !i.is_empty()).map(String::as_str));
        }
    }
    if !needed.contains(input.as_str()) {
        let reason = format!("`{output}` does not depend on the input `{input}`");
        return Err(ModelError::bundle(path, reason));
    }

    let mut pruned = graph.clone();
    pruned.node =
        graph.node.iter().zip(&keep).filter(|(_, k)| **k).map(|(n, _)| n.clone()).collect();
    pruned.initializer.retain(|t| needed.contains(t.name.as_str()));
    pruned.input.retain(|i| needed.contains(i.name.as_str()));
    pruned.value_info.clear();
    pruned.output = vec![ValueInfoProto { name: output.clone(), ..ValueInfoProto::default() }];
    let mut model = model.clone();
    model.graph = Some(pruned);
    let input_dims = input_info.as_ref().and_then(onnx::declared_dims);
    Ok(CutGraph { model, input, input_dims, output, rule })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::onnx::GraphWriter;

    fn toy(with_tail: bool) -> ModelProto {
        let mut writer = GraphWriter::new("toy");
        writer.input("image", &[Dim::symbol("N"), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)]);
        writer.initializer("w", &[4, 3, 1, 1], &[0.1; 12]);
        writer.node("Conv", "conv", &["image", "w"], &["map"], vec![]);
        writer.node("Relu", "relu", &["map"], &["act"], vec![]);
        if with_tail {
            writer.initializer("fc", &[4, 2], &[0.1; 8]);
            writer.node("GlobalAveragePool", "pool", &["act"], &["pooled"], vec![]);
            writer.node("Flatten", "flat", &["pooled"], &["flat"], vec![]);
            writer.node("MatMul", "fc", &["flat", "fc"], &["logits"], vec![]);
            writer.output("logits", None);
        } else {
            writer.output("act", None);
        }
        writer.finish(17)
    }

    #[test]
    fn cuts_at_the_input_of_the_last_pooling_node() {
        let cut = cut(&toy(true), Path::new("toy.onnx"), None).map_err(|e| e.to_string());
        let cut = cut.as_ref().map(|c| (c.output.as_str(), c.rule));
        assert_eq!(cut, Ok(("act", "pooling input")));
    }

    #[test]
    fn prunes_the_classifier() {
        let Ok(cut) = cut(&toy(true), Path::new("toy.onnx"), None) else {
            panic!("cut failed");
        };
        let graph = cut.model.graph.unwrap_or_default();
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["Conv", "Relu"]);
        assert_eq!(graph.initializer.len(), 1);
    }

    #[test]
    fn without_pooling_the_graph_output_is_the_cut() {
        let cut = cut(&toy(false), Path::new("toy.onnx"), None).map(|c| c.rule);
        assert_eq!(cut.ok(), Some("graph output"));
    }

    #[test]
    fn a_requested_output_that_does_not_exist_is_refused_naming_the_file() {
        let error = cut(&toy(true), Path::new("toy.onnx"), Some("nope")).err();
        let message = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("toy.onnx") && message.contains("nope"), "{message}");
    }
}
