//! The project's ONNX writer and the few protobuf helpers the loader needs.
//!
//! We write ONNX ourselves (synthetic backbones, heads, and the in-memory "PCA projection + head"
//! graph the tract backend runs) instead of shipping a Python exporter, so the model files are a
//! pure function of a seed and this code. The protobuf types are the ones `tract-onnx` generated
//! with prost; using them means the graphs we build and the graphs users bring are the same
//! Rust values, and an in-memory graph can be handed to tract without a round trip through
//! disk. Weights are stored as little-endian `raw_data`, which is what exporters write and what
//! every runtime reads fastest.

use std::path::Path;

use prost::Message;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataType, tensor_shape_proto, type_proto,
};

use super::ModelError;

/// One dimension of a graph input or output: a number, or a symbol such as `N` for the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Symbol(String),
}

impl Dim {
    pub fn symbol(name: &str) -> Dim {
        Dim::Symbol(name.to_string())
    }
}

/// Builds one `GraphProto` node by node; `finish` wraps it into a `ModelProto`.
#[derive(Debug, Default)]
pub struct GraphWriter {
    graph: GraphProto,
    /// List initializers among the graph inputs too, as IR version 3 files (opset ≤ 8) do.
    initializers_as_inputs: bool,
}

impl GraphWriter {
    pub fn new(name: &str) -> GraphWriter {
        let graph = GraphProto { name: name.to_string(), ..GraphProto::default() };
        GraphWriter { graph, initializers_as_inputs: false }
    }

    /// Old exporters (IR version 3) list every initializer as a graph input as well.
    pub fn list_initializers_as_inputs(&mut self, yes: bool) {
        self.initializers_as_inputs = yes;
    }

    /// Declares a float graph input with the given shape.
    pub fn input(&mut self, name: &str, dims: &[Dim]) {
        self.graph.input.push(value_info(name, Some(dims)));
    }

    /// Declares a float graph output; `dims` may be omitted and left to shape inference.
    pub fn output(&mut self, name: &str, dims: Option<&[Dim]>) {
        self.graph.output.push(value_info(name, dims));
    }

    /// Adds a float32 initializer (row-major `data` of shape `dims`).
    pub fn initializer(&mut self, name: &str, dims: &[usize], data: &[f32]) {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len(), "initializer {name}");
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, dims, DataType::Float, raw);
    }

    /// Adds an int64 initializer, e.g. the target shape of a `Reshape`.
    pub fn initializer_i64(&mut self, name: &str, dims: &[usize], data: &[i64]) {
        let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name, dims, DataType::Int64, raw);
    }

    fn push_initializer(&mut self, name: &str, dims: &[usize], kind: DataType, raw: Vec<u8>) {
        let tensor = TensorProto {
            name: name.to_string(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: kind as i32,
            raw_data: raw,
            ..TensorProto::default()
        };
        if self.initializers_as_inputs {
            let dims: Vec<Dim> = dims.iter().map(|&d| Dim::Fixed(d as i64)).collect();
            let mut info = value_info(name, Some(&dims));
            if let Some(type_proto::Value::TensorType(t)) =
                info.r#type.as_mut().and_then(|t| t.value.as_mut())
            {
                t.elem_type = kind as i32;
            }
            self.graph.input.push(info);
        }
        self.graph.initializer.push(tensor);
    }

    /// Appends a node; nodes must be added in topological order.
    pub fn node(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        outputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) {
        self.graph.node.push(NodeProto {
            name: name.to_string(),
            op_type: op_type.to_string(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attributes,
            ..NodeProto::default()
        });
    }

    /// Wraps the graph into a model of the given operator set. The IR version follows the
    /// operator set the way the ONNX release that introduced it did (opset 8 → IR 3,
    /// opset 17 → IR 8).
    pub fn finish(self, opset: i64) -> ModelProto {
        let ir_version = match opset {
            ..=8 => 3,
            9 => 4,
            10 => 5,
            11 => 6,
            12..=14 => 7,
            15..=18 => 8,
            _ => 9,
        };
        ModelProto {
            ir_version,
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }],
            producer_name: "edgesight".to_string(),
            producer_version: env!("CARGO_PKG_VERSION").to_string(),
            graph: Some(self.graph),
            ..ModelProto::default()
        }
    }
}

fn value_info(name: &str, dims: Option<&[Dim]>) -> ValueInfoProto {
    let shape = dims.map(|dims| TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| tensor_shape_proto::Dimension {
                value: Some(match d {
                    Dim::Fixed(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                    Dim::Symbol(s) => tensor_shape_proto::dimension::Value::DimParam(s.clone()),
                }),
                ..Default::default()
            })
            .collect(),
    });
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape,
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}

pub fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..Default::default()
    }
}

pub fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..Default::default()
    }
}

pub fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.to_string(),
        r#type: AttributeType::Float as i32,
        f: value,
        ..Default::default()
    }
}

/// Serialises a model to the ONNX file format (protobuf bytes).
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Reads and decodes an ONNX file; errors name the file.
pub fn read_model(path: &Path) -> Result<ModelProto, ModelError> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::bundle(path, e))?;
    ModelProto::decode(bytes.as_slice())
        .map_err(|e| ModelError::bundle(path, format!("not an ONNX model: {e}")))
}

/// The graph of a model, or an error naming the file.
pub fn graph_of<'a>(model: &'a ModelProto, path: &Path) -> Result<&'a GraphProto, ModelError> {
    model.graph.as_ref().ok_or_else(|| ModelError::bundle(path, "the ONNX file has no graph"))
}

/// The operator-set version of the default ONNX domain (0 when the file does not say).
pub fn opset_of(model: &ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0)
}

/// The float values of an initializer (raw little-endian or `float_data`), if it is float32.
pub fn tensor_f32(tensor: &TensorProto) -> Option<Vec<f32>> {
    if tensor.data_type != DataType::Float as i32 {
        return None;
    }
    if !tensor.raw_data.is_empty() {
        let values = tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        return Some(values);
    }
    Some(tensor.float_data.clone())
}

/// The int64 values of an initializer (raw little-endian or `int64_data`), if it is int64.
pub fn tensor_i64(tensor: &TensorProto) -> Option<Vec<i64>> {
    if tensor.data_type != DataType::Int64 as i32 {
        return None;
    }
    if !tensor.raw_data.is_empty() {
        let values = tensor
            .raw_data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect();
        return Some(values);
    }
    Some(tensor.int64_data.clone())
}

/// The declared shape of a graph input or output (`None` where it has no shape).
pub fn declared_dims(info: &ValueInfoProto) -> Option<Vec<Dim>> {
    let type_proto::Value::TensorType(tensor) = info.r#type.as_ref()?.value.as_ref()?;
    let shape = tensor.shape.as_ref()?;
    Some(
        shape
            .dim
            .iter()
            .map(|d| match &d.value {
                Some(tensor_shape_proto::dimension::Value::DimValue(v)) => Dim::Fixed(*v),
                Some(tensor_shape_proto::dimension::Value::DimParam(s)) => Dim::Symbol(s.clone()),
                None => Dim::Symbol(String::new()),
            })
            .collect(),
    )
}

/// An integer-list attribute of a node, if present.
pub fn node_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.ints.clone())
}

/// An integer attribute of a node, if present.
pub fn node_int(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_model_decodes_to_the_same_graph() {
        let mut writer = GraphWriter::new("tiny");
        writer.input("x", &[Dim::symbol("N"), Dim::Fixed(2)]);
        writer.initializer("w", &[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        writer.initializer_i64("shape", &[2], &[0, -1]);
        writer.node("MatMul", "mm", &["x", "w"], &["y"], vec![attr_int("unused", 1)]);
        writer.output("y", None);
        let model = writer.finish(17);
        let decoded = ModelProto::decode(encode(&model).as_slice()).map_err(|e| e.to_string());
        assert_eq!(decoded.as_ref(), Ok(&model));
        let graph = model.graph.as_ref().map(|g| g.initializer.clone()).unwrap_or_default();
        assert_eq!(tensor_f32(&graph[0]), Some(vec![1.0, 2.0, 3.0, 4.0]));
        assert_eq!(tensor_i64(&graph[1]), Some(vec![0, -1]));
        assert_eq!(opset_of(&model), 17);
        assert_eq!(model.ir_version, 8);
    }

    #[test]
    fn old_ir_lists_initializers_as_inputs() {
        let mut writer = GraphWriter::new("old");
        writer.list_initializers_as_inputs(true);
        writer.input("data", &[Dim::Fixed(1)]);
        writer.initializer("w", &[1], &[0.5]);
        let model = writer.finish(8);
        let inputs: Vec<String> =
            model.graph.iter().flat_map(|g| g.input.iter().map(|i| i.name.clone())).collect();
        assert_eq!(inputs, ["data", "w"]);
        assert_eq!(model.ir_version, 3);
    }
}
