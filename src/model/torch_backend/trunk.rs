//! A ResNet-50 trunk read from ONNX and run on tch operators.
//!
//! The trunk is not a fixed torchvision module filled by tensor names: it is the bundle's own
//! `backbone.onnx`, cut where the tract backend cuts it, and executed node by node. That way
//! every layout a user may bring (torchvision exports with names or with `onnx::Conv_*` numbers,
//! ONNX zoo v1 with the stride on the 1×1 convolution, batch norm folded or not; pre-activation
//! v2 graphs use the same operators but are untested) runs exactly as written. Before anything
//! runs, each convolution weight is matched to a convolution of the canonical ResNet-50
//! ([`resnet::canonical_convolutions`]) by shape, in graph order, and a file whose convolutions
//! do not match all 53 is refused with the first one that does not.
//!
//! Speed on CPUs comes from what oneDNN likes: batch norm folded into the convolution before
//! it (a BN that follows something else stays an affine op), activations and weights in
//! channels-last strides (tch 0.26 has no memory-format call; permute → contiguous → permute
//! gives NHWC strides under the NCHW shape), oneDNN's convolution called directly in f32, ReLU
//! in place, no autograd. What each step was worth is in benches/results.md and the README.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use tract_onnx::pb::{ModelProto, NodeProto};

use super::torch_error;
use crate::model::ModelError;
use crate::model::backbone;
use crate::model::onnx::{self, node_int, node_ints};
use crate::model::resnet::{self, BN_EPSILON};

/// Gives NHWC strides to a 4-d tensor while keeping its NCHW shape (oneDNN and cuDNN run
/// channels-last convolutions faster).
pub(crate) fn channels_last(tensor: &Tensor) -> Tensor {
    if tensor.dim() == 4 {
        tensor.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
    } else {
        tensor.shallow_clone()
    }
}

/// One trunk operation on value slots.
enum Op {
    Conv(Conv),
    /// Batch norm that could not be folded into a convolution: `x · scale + shift`.
    Affine {
        input: usize,
        output: usize,
        scale: Tensor,
        shift: Tensor,
    },
    Relu {
        input: usize,
        output: usize,
    },
    MaxPool {
        input: usize,
        output: usize,
        kernel: [i64; 2],
        stride: [i64; 2],
        pads: [i64; 4],
    },
    Add {
        left: usize,
        right: usize,
        output: usize,
    },
}

/// A convolution ready to run.
struct Conv {
    input: usize,
    output: usize,
    weight: Tensor,
    bias: Option<Tensor>,
    stride: [i64; 2],
    padding: [i64; 2],
    /// Padding that is not the same on both sides, applied before the convolution.
    extra_pad: Option<[i64; 4]>,
    dilation: [i64; 2],
    groups: i64,
}

impl Conv {
    /// `onednn`: call oneDNN's convolution directly (f32 on a CPU) instead of `conv2d`.
    fn forward(&self, mut x: Tensor, onednn: bool) -> Result<Tensor, tch::TchError> {
        if let Some(pads) = self.extra_pad {
            x = x.f_constant_pad_nd(pads.as_slice())?;
        }
        let (weight, bias) = (&self.weight, self.bias.as_ref());
        let (stride, padding, dilation) = (self.stride, self.padding, self.dilation);
        if onednn {
            x.f_mkldnn_convolution(weight, bias, padding, stride, dilation, self.groups)
        } else {
            x.f_conv2d(weight, bias, stride, padding, dilation, self.groups)
        }
    }
}

/// The parameters of a convolution while the graph is read (before tensors are made).
struct ConvParams {
    name: String,
    shape: Vec<usize>,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
}

/// A ResNet-50 trunk read from ONNX and run on tch.
pub struct TorchTrunk {
    path: PathBuf,
    ops: Vec<Op>,
    input: usize,
    output: usize,
    /// Index of the last op that reads each slot, so values are dropped as soon as possible.
    last_use: Vec<usize>,
    device: Device,
    kind: Kind,
    /// Call oneDNN's convolution directly (f32 on a CPU) instead of `conv2d`, whose dispatch
    /// picks a slower path for some of ResNet-50's shapes (measured: 60.5 → 53.4 ms/img at
    /// batch 8 on 2 threads, benches/results.md).
    onednn: bool,
    /// The tensor the graph was cut at.
    cut: String,
}

impl TorchTrunk {
    /// Reads `path`, cuts it like the tract backend does, checks its declared input against
    /// `input_size` and that its convolutions are those of a ResNet-50, and puts the weights on
    /// `device` in `kind`. Errors name the file.
    pub fn open(
        path: &Path,
        input_size: u32,
        output: Option<&str>,
        device: Device,
        kind: Kind,
    ) -> Result<TorchTrunk, ModelError> {
        let proto = onnx::read_model(path)?;
        let cut = backbone::cut(&proto, path, output)?;
        crate::model::tract_backend::check_input(&cut, path, input_size)?;
        let mut reader = GraphReader::new(&cut.model, path)?;
        let input = reader.slot(&cut.input);
        let nodes = &reader.graph_nodes(&cut.model);
        let mut pending = Vec::new();
        let consumers = consumer_counts(nodes);
        let mut index = 0;
        while index < nodes.len() {
            let node = &nodes[index];
            let folded_bn = nodes.get(index + 1).filter(|next| {
                node.op_type == "Conv"
                    && next.op_type == "BatchNormalization"
                    && next.input.first() == node.output.first()
                    && consumers.get(node.output[0].as_str()).copied() == Some(1)
            });
            pending.extend(reader.node(node, folded_bn)?);
            index += if folded_bn.is_some() { 2 } else { 1 };
        }
        check_resnet50(&pending, path)?;
        let output = reader.existing(&cut.output, path)?;
        let ops = pending
            .into_iter()
            .map(|op| op.into_op(device, kind))
            .collect::<Result<Vec<_>, _>>()?;
        let mut last_use = vec![0; reader.slots.len()];
        for (at, op) in ops.iter().enumerate() {
            for slot in op.inputs() {
                last_use[slot] = at;
            }
        }
        last_use[output] = usize::MAX;
        Ok(TorchTrunk {
            path: path.to_path_buf(),
            ops,
            input,
            output,
            last_use,
            device,
            kind,
            onednn: device == Device::Cpu && kind == Kind::Float && tch::utils::has_mkldnn(),
            cut: cut.output,
        })
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The tensor the graph was cut at.
    pub fn cut_name(&self) -> &str {
        &self.cut
    }

    /// Runs a `[N,3,S,S]` batch (any kind, any device); returns the `[N,2048,h,w]` feature map
    /// in the trunk's kind, on its device.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let mut values: Vec<Option<Tensor>> = Vec::new();
        values.resize_with(self.last_use.len(), || None);
        let x = input.f_to_device(self.device).map_err(torch_error)?;
        let x = x.f_to_kind(self.kind).map_err(torch_error)?;
        values[self.input] = Some(channels_last(&x));
        for (at, op) in self.ops.iter().enumerate() {
            let get = |values: &[Option<Tensor>], slot: usize| -> Result<Tensor, ModelError> {
                values[slot].as_ref().map(Tensor::shallow_clone).ok_or_else(|| {
                    ModelError::Inference(format!(
                        "{}: a value is read before it is written",
                        self.path.display()
                    ))
                })
            };
            let (output, value) = match op {
                Op::Conv(conv) => {
                    let x = get(&values, conv.input)?;
                    (conv.output, conv.forward(x, self.onednn).map_err(torch_error)?)
                }
                Op::Affine { input, output, scale, shift } => {
                    let x = get(&values, *input)?;
                    (*output, x.f_mul(scale).and_then(|y| y.f_add(shift)).map_err(torch_error)?)
                }
                Op::Relu { input, output } => {
                    let mut x = get(&values, *input)?;
                    // In place when nothing else reads the input afterwards.
                    let y = if self.last_use[*input] == at && *input != self.input {
                        x.f_relu_().map_err(torch_error)?
                    } else {
                        x.f_relu().map_err(torch_error)?
                    };
                    (*output, y)
                }
                Op::MaxPool { input, output, kernel, stride, pads } => {
                    let x = get(&values, *input)?;
                    let [top, left, bottom, right] = *pads;
                    let y = if top == bottom && left == right {
                        x.f_max_pool2d(kernel, stride, [top, left], [1, 1], false)
                    } else {
                        // Uneven padding must never win the max: shift the values above zero,
                        // pad with zeros, pool, shift back (tch 0.26 pads with zeros only).
                        let run = || -> Result<Tensor, tch::TchError> {
                            let floor = x.f_min()?.f_sub_scalar(1.0)?;
                            let pad = [left, right, top, bottom];
                            let padded = x.f_sub(&floor)?.f_constant_pad_nd(pad.as_slice())?;
                            padded
                                .f_max_pool2d(kernel, stride, [0, 0], [1, 1], false)?
                                .f_add(&floor)
                        };
                        run()
                    };
                    (*output, y.map_err(torch_error)?)
                }
                Op::Add { left, right, output } => {
                    let a = get(&values, *left)?;
                    let b = get(&values, *right)?;
                    (*output, a.f_add(&b).map_err(torch_error)?)
                }
            };
            values[output] = Some(value);
            for slot in op.inputs() {
                if self.last_use[slot] == at {
                    values[slot] = None;
                }
            }
        }
        values[self.output].take().ok_or_else(|| {
            ModelError::Inference(format!(
                "{}: the cut `{}` was never computed",
                self.path.display(),
                self.cut
            ))
        })
    }
}

impl Op {
    fn inputs(&self) -> Vec<usize> {
        match self {
            Op::Conv(Conv { input, .. })
            | Op::Affine { input, .. }
            | Op::Relu { input, .. }
            | Op::MaxPool { input, .. } => vec![*input],
            Op::Add { left, right, .. } => vec![*left, *right],
        }
    }
}

/// An op as read from the graph, weights still in `Vec`s.
enum PendingOp {
    Conv {
        input: usize,
        output: usize,
        params: ConvParams,
        stride: [i64; 2],
        pads: [i64; 4],
        dilation: [i64; 2],
        groups: i64,
    },
    Affine {
        input: usize,
        output: usize,
        scale: Vec<f32>,
        shift: Vec<f32>,
    },
    Ready(Op),
}

impl PendingOp {
    fn into_op(self, device: Device, kind: Kind) -> Result<Op, ModelError> {
        let tensor = |values: &[f32], shape: &[i64]| -> Result<Tensor, ModelError> {
            Tensor::f_from_slice(values)
                .and_then(|t| t.f_reshape(shape))
                .and_then(|t| t.f_to_device(device))
                .and_then(|t| t.f_to_kind(kind))
                .map_err(torch_error)
        };
        Ok(match self {
            PendingOp::Conv { input, output, params, stride, pads, dilation, groups } => {
                let shape: Vec<i64> = params.shape.iter().map(|&d| d as i64).collect();
                let weight = channels_last(&tensor(&params.weight, &shape)?);
                let bias = params.bias.as_deref().map(|b| tensor(b, &[shape[0]])).transpose()?;
                let [top, left, bottom, right] = pads;
                let (padding, extra_pad) = if top == bottom && left == right {
                    ([top, left], None)
                } else {
                    ([0, 0], Some([left, right, top, bottom]))
                };
                let conv = Conv {
                    input,
                    output,
                    weight,
                    bias,
                    stride,
                    padding,
                    extra_pad,
                    dilation,
                    groups,
                };
                Op::Conv(conv)
            }
            PendingOp::Affine { input, output, scale, shift } => {
                let shape = [1, scale.len() as i64, 1, 1];
                Op::Affine {
                    input,
                    output,
                    scale: tensor(&scale, &shape)?,
                    shift: tensor(&shift, &shape)?,
                }
            }
            PendingOp::Ready(op) => op,
        })
    }
}

/// How many nodes read each tensor.
fn consumer_counts(nodes: &[NodeProto]) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for node in nodes {
        for input in node.input.iter().filter(|i| !i.is_empty()) {
            *counts.entry(input.as_str()).or_insert(0) += 1;
        }
    }
    counts
}

/// Tensor names → slots, and the graph's initializers.
struct GraphReader<'a> {
    path: &'a Path,
    slots: HashMap<String, usize>,
    initializers: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl<'a> GraphReader<'a> {
    fn new(model: &ModelProto, path: &'a Path) -> Result<GraphReader<'a>, ModelError> {
        let graph = onnx::graph_of(model, path)?;
        let mut initializers = HashMap::new();
        for tensor in &graph.initializer {
            if let Some(values) = onnx::tensor_f32(tensor) {
                let dims = tensor.dims.iter().map(|&d| d.max(0) as usize).collect();
                initializers.insert(tensor.name.clone(), (dims, values));
            }
        }
        Ok(GraphReader { path, slots: HashMap::new(), initializers })
    }

    fn graph_nodes(&self, model: &ModelProto) -> Vec<NodeProto> {
        model.graph.as_ref().map(|g| g.node.clone()).unwrap_or_default()
    }

    fn slot(&mut self, name: &str) -> usize {
        let next = self.slots.len();
        *self.slots.entry(name.to_string()).or_insert(next)
    }

    fn existing(&self, name: &str, path: &Path) -> Result<usize, ModelError> {
        self.slots
            .get(name)
            .copied()
            .ok_or_else(|| ModelError::bundle(path, format!("no node computes `{name}`")))
    }

    fn bundle_error(&self, node: &NodeProto, reason: impl std::fmt::Display) -> ModelError {
        let name = match (node.name.as_str(), node.output.first()) {
            ("", Some(output)) => format!("computing `{output}`"),
            ("", None) => "(unnamed)".to_string(),
            (name, _) => format!("`{name}`"),
        };
        ModelError::bundle(self.path, format!("{} node {name}: {reason}", node.op_type))
    }

    fn input(&self, node: &NodeProto, index: usize) -> Result<usize, ModelError> {
        let name = node.input.get(index).filter(|n| !n.is_empty());
        let name =
            name.ok_or_else(|| self.bundle_error(node, format!("input {index} is missing")))?;
        self.slots.get(name).copied().ok_or_else(|| {
            self.bundle_error(node, format!("reads `{name}`, which no earlier node computes"))
        })
    }

    fn weight(&self, node: &NodeProto, index: usize) -> Result<(Vec<usize>, Vec<f32>), ModelError> {
        let name = node.input.get(index).filter(|n| !n.is_empty());
        let name =
            name.ok_or_else(|| self.bundle_error(node, format!("input {index} is missing")))?;
        self.initializers.get(name).cloned().ok_or_else(|| {
            self.bundle_error(node, format!("`{name}` is not a constant f32 tensor"))
        })
    }

    fn output(&mut self, node: &NodeProto) -> Result<usize, ModelError> {
        match node.output.first() {
            Some(name) => Ok(self.slot(name)),
            None => Err(self.bundle_error(node, "has no output")),
        }
    }

    /// Reads one node; `bn`, when given, is a batch norm to fold into this convolution.
    /// `None` for a node that only renames a value (Identity, Dropout at inference).
    fn node(
        &mut self,
        node: &NodeProto,
        bn: Option<&NodeProto>,
    ) -> Result<Option<PendingOp>, ModelError> {
        let pair = |values: Option<Vec<i64>>, default: i64| -> [i64; 2] {
            match values.as_deref() {
                Some([a, b]) => [*a, *b],
                _ => [default, default],
            }
        };
        match node.op_type.as_str() {
            "Conv" => {
                let input = self.input(node, 0)?;
                let (shape, weight) = self.weight(node, 1)?;
                if shape.len() != 4 {
                    return Err(
                        self.bundle_error(node, format!("weight shape {shape:?} is not 4-d"))
                    );
                }
                let bias = if node.input.get(2).is_some_and(|b| !b.is_empty()) {
                    Some(self.weight(node, 2)?.1)
                } else {
                    None
                };
                check_auto_pad(self, node)?;
                let pads = match node_ints(node, "pads").as_deref() {
                    Some([t, l, b, r]) => [*t, *l, *b, *r],
                    _ => [0; 4],
                };
                let name = node.input[1].clone();
                let mut params = ConvParams { name, shape, weight, bias };
                if let Some(bn) = bn {
                    let (scale, shift) = self.batch_norm(bn)?;
                    fold(&mut params, &scale, &shift);
                }
                let output = self.output(bn.unwrap_or(node))?;
                Ok(Some(PendingOp::Conv {
                    input,
                    output,
                    params,
                    stride: pair(node_ints(node, "strides"), 1),
                    pads,
                    dilation: pair(node_ints(node, "dilations"), 1),
                    groups: node_int(node, "group").unwrap_or(1),
                }))
            }
            "BatchNormalization" => {
                let input = self.input(node, 0)?;
                let (scale, shift) = self.batch_norm(node)?;
                let output = self.output(node)?;
                Ok(Some(PendingOp::Affine { input, output, scale, shift }))
            }
            "Relu" => {
                let input = self.input(node, 0)?;
                Ok(Some(PendingOp::Ready(Op::Relu { input, output: self.output(node)? })))
            }
            "MaxPool" => {
                let input = self.input(node, 0)?;
                check_auto_pad(self, node)?;
                if node_int(node, "ceil_mode").unwrap_or(0) != 0 {
                    return Err(self.bundle_error(node, "ceil_mode = 1 is not supported"));
                }
                if node_ints(node, "dilations").is_some_and(|d| d.iter().any(|&v| v != 1)) {
                    return Err(self.bundle_error(node, "dilations other than 1 are not supported"));
                }
                let kernel = pair(node_ints(node, "kernel_shape"), 1);
                let pads = match node_ints(node, "pads").as_deref() {
                    Some([t, l, b, r]) => [*t, *l, *b, *r],
                    _ => [0; 4],
                };
                let stride = pair(node_ints(node, "strides"), 1);
                let output = self.output(node)?;
                Ok(Some(PendingOp::Ready(Op::MaxPool { input, output, kernel, stride, pads })))
            }
            "Add" | "Sum" if node.input.len() == 2 => {
                let (left, right) = (self.input(node, 0)?, self.input(node, 1)?);
                Ok(Some(PendingOp::Ready(Op::Add { left, right, output: self.output(node)? })))
            }
            "Identity" | "Dropout" => {
                // The output is another name for the input's value: one slot, so an in-place
                // ReLU sees every reader of it.
                let input = self.input(node, 0)?;
                if let Some(name) = node.output.first() {
                    self.slots.insert(name.clone(), input);
                }
                Ok(None)
            }
            other => Err(self.bundle_error(
                node,
                format!(
                    "operator `{other}` is not one of a ResNet-50 trunk's (Conv, \
                     BatchNormalization, Relu, MaxPool, Add); the tract backend runs any graph \
                     (model.backend = \"tract\")"
                ),
            )),
        }
    }

    /// A batch norm as per-channel `(scale, shift)`, computed in f64.
    fn batch_norm(&self, node: &NodeProto) -> Result<(Vec<f32>, Vec<f32>), ModelError> {
        let epsilon = node
            .attribute
            .iter()
            .find(|a| a.name == "epsilon")
            .map_or(f64::from(BN_EPSILON), |a| f64::from(a.f));
        let [gamma, beta, mean, var] = [1, 2, 3, 4].map(|i| self.weight(node, i));
        let (gamma, beta, mean, var) = (gamma?.1, beta?.1, mean?.1, var?.1);
        let channels = gamma.len();
        if [&beta, &mean, &var].iter().any(|v| v.len() != channels) || channels == 0 {
            return Err(self.bundle_error(node, "scale, bias, mean and variance differ in length"));
        }
        let mut scale = Vec::with_capacity(channels);
        let mut shift = Vec::with_capacity(channels);
        for c in 0..channels {
            let s = f64::from(gamma[c]) / (f64::from(var[c]) + epsilon).sqrt();
            scale.push(s as f32);
            shift.push((f64::from(beta[c]) - f64::from(mean[c]) * s) as f32);
        }
        Ok((scale, shift))
    }
}

fn check_auto_pad(reader: &GraphReader, node: &NodeProto) -> Result<(), ModelError> {
    let auto_pad = node.attribute.iter().find(|a| a.name == "auto_pad");
    match auto_pad.map(|a| String::from_utf8_lossy(&a.s).to_string()).as_deref() {
        None | Some("NOTSET") | Some("VALID") | Some("") => Ok(()),
        Some(other) => {
            Err(reader.bundle_error(node, format!("auto_pad = {other} is not supported")))
        }
    }
}

/// Folds `y = x · scale + shift` after a convolution into its weight and bias.
fn fold(params: &mut ConvParams, scale: &[f32], shift: &[f32]) {
    let per_output = params.weight.len() / params.shape[0].max(1);
    for (o, chunk) in params.weight.chunks_mut(per_output).enumerate() {
        chunk.iter_mut().for_each(|w| *w = (f64::from(*w) * f64::from(scale[o])) as f32);
    }
    let bias = params.bias.take().unwrap_or_else(|| vec![0.0; params.shape[0]]);
    params.bias = Some(
        bias.iter()
            .enumerate()
            .map(|(o, b)| (f64::from(*b) * f64::from(scale[o]) + f64::from(shift[o])) as f32)
            .collect(),
    );
}

/// Matches each convolution of the graph, in graph order, to the first unmatched convolution of
/// the canonical ResNet-50 with the same weight shape; a convolution without a match, or a
/// canonical one left over, means the file is not a ResNet-50.
fn check_resnet50(ops: &[PendingOp], path: &Path) -> Result<(), ModelError> {
    let canonical = resnet::canonical_convolutions();
    let mut matched = vec![false; canonical.len()];
    for op in ops {
        let PendingOp::Conv { params, .. } = op else { continue };
        let found = canonical
            .iter()
            .enumerate()
            .find(|(i, (_, shape))| !matched[*i] && shape.as_slice() == params.shape.as_slice());
        match found {
            Some((i, _)) => matched[i] = true,
            None => {
                return Err(ModelError::bundle(
                    path,
                    format!(
                        "not a ResNet-50 trunk: convolution weight `{}` {:?} matches none of \
                         ResNet-50's remaining convolutions",
                        params.name, params.shape
                    ),
                ));
            }
        }
    }
    if let Some(missing) = matched.iter().position(|m| !m) {
        let (name, shape) = &canonical[missing];
        let found = matched.iter().filter(|m| **m).count();
        return Err(ModelError::bundle(
            path,
            format!(
                "not a ResNet-50 trunk: {found} of its {} convolutions found, none for `{name}` \
                 {shape:?}",
                canonical.len()
            ),
        ));
    }
    Ok(())
}
