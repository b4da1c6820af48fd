//! The tract backend: the backbone cut at its feature map, then the folded PCA projection and
//! the head, as two optimised tract plans per batch size.
//!
//! Two plans rather than one because the stages are timed separately (the payload reports both)
//! and because a user's backbone and our head come from different files. Each plan is built for
//! a concrete `[n,3,S,S]` input: tract optimises a model with a symbolic batch much less well
//! (measured about 60 % slower), so plans are built lazily per batch size and cached. A
//! backbone file whose batch is fixed is always run at that batch, frame by frame if need be.
//! Softmax runs in Rust on the logits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tract_onnx::prelude::*;

use super::backbone::{self, CutGraph};
use super::bundle::{BACKBONE, HEAD, PCA};
use super::head::{EMBEDDING_OUTPUT, runtime_graph};
use super::onnx::{self, Dim};
use super::pca::Pca;
use super::resnet::FEATURE_CHANNELS;
use super::{Backend, BackendInfo, Bundle, ModelError, Precision, Prediction, StageTimes, softmax};

type Plan = Arc<TypedRunnableModel>;

/// The backbone of a bundle (or any ResNet-50 ONNX file) loaded in tract, cut at its last
/// 2048-channel feature map.
pub struct TractBackbone {
    path: PathBuf,
    model: InferenceModel,
    cut: String,
    input_size: usize,
    fixed_batch: Option<usize>,
    feature_size: usize,
    plans: HashMap<usize, Plan>,
}

impl TractBackbone {
    /// Loads `path`, cuts it (at `output` if given, else automatically, see
    /// [`backbone::find_cut`]) and builds the plan for one frame, which checks that the cut is a
    /// `[1,2048,h,w]` map. Errors name the file.
    pub fn open(path: &Path, input_size: u32, output: Option<&str>) -> Result<Self, ModelError> {
        let proto = onnx::read_model(path)?;
        let cut = backbone::cut(&proto, path, output)?;
        check_input(&cut, path, input_size)?;
        let model = tract_onnx::onnx().model_for_proto_model(&cut.model).map_err(|e| {
            ModelError::bundle(path, format!("tract cannot parse the graph: {e:#}"))
        })?;
        let mut backbone = TractBackbone {
            path: path.to_path_buf(),
            model,
            cut: cut.output.clone(),
            input_size: input_size as usize,
            fixed_batch: cut.fixed_batch(),
            feature_size: 0,
            plans: HashMap::new(),
        };
        let first_batch = backbone.fixed_batch.unwrap_or(1);
        let shape = backbone.plan(first_batch)?.model().output_fact(0).map(|f| f.shape.clone());
        let shape = shape.map_err(|e| ModelError::bundle(path, e))?;
        let dims = shape.as_concrete().unwrap_or(&[]).to_vec();
        match dims.as_slice() {
            [_, channels, h, w] if *channels == FEATURE_CHANNELS && h == w => {
                backbone.feature_size = *h;
                Ok(backbone)
            }
            _ => Err(ModelError::bundle(
                path,
                format!(
                    "not a ResNet-50 trunk: the cut at `{}` ({}) has shape {shape:?}, expected \
                     [{first_batch},{FEATURE_CHANNELS},h,h] (set backbone_output in \
                     manifest.toml to choose the tensor)",
                    cut.output, cut.rule
                ),
            )),
        }
    }

    /// The tensor the graph was cut at.
    pub fn cut_name(&self) -> &str {
        &self.cut
    }

    /// Side of the feature map (S/32 for a ResNet).
    pub fn feature_size(&self) -> usize {
        self.feature_size
    }

    /// The plan for batch `n`, built on first use.
    fn plan(&mut self, n: usize) -> Result<Plan, ModelError> {
        if let Some(plan) = self.plans.get(&n) {
            return Ok(plan.clone());
        }
        let s = self.input_size;
        let fact = InferenceFact::dt_shape(f32::datum_type(), tvec!(n, 3, s, s));
        let plan = build_plan(self.model.clone(), fact, &self.path)?;
        self.plans.insert(n, plan.clone());
        Ok(plan)
    }

    /// Runs `n` CHW frames; returns the feature maps, `[n, 2048, h, h]` row-major.
    pub fn features(&mut self, input: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
        let frame = 3 * self.input_size * self.input_size;
        if input.len() != n * frame {
            return Err(ModelError::Inference(format!(
                "backbone input holds {} values, expected {n} frames × {frame}",
                input.len()
            )));
        }
        let batch = self.fixed_batch.unwrap_or(n.max(1));
        if n == 0 {
            return Ok(Vec::new());
        }
        if batch == n {
            return self.run(input, n);
        }
        if batch != 1 {
            return Err(ModelError::Inference(format!(
                "{}: the graph has a fixed batch of {batch}, cannot run {n} frames",
                self.path.display()
            )));
        }
        let mut out = Vec::with_capacity(n * FEATURE_CHANNELS * self.feature_size.pow(2));
        for one in input.chunks_exact(frame) {
            out.extend(self.run(one, 1)?);
        }
        Ok(out)
    }

    fn run(&mut self, input: &[f32], n: usize) -> Result<Vec<f32>, ModelError> {
        let s = self.input_size;
        let plan = self.plan(n)?;
        let tensor = Tensor::from_shape(&[n, 3, s, s], input).map_err(inference)?;
        let outputs = plan.run(tvec!(tensor.into_tvalue())).map_err(inference)?;
        first_as_vec(&outputs)
    }
}

/// Concretises the input fact, optimises, and makes a runnable plan.
fn build_plan(
    model: InferenceModel,
    input: InferenceFact,
    path: &Path,
) -> Result<Plan, ModelError> {
    let plan = model
        .with_input_fact(0, input)
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .map_err(|e| ModelError::bundle(path, format!("tract cannot plan the graph: {e:#}")))?;
    Ok(plan)
}

/// Checks the declared `[N,3,S,S]` input of a cut backbone against the bundle's input size
/// (both backends call it; a symbolic or undeclared dimension passes).
pub(crate) fn check_input(cut: &CutGraph, path: &Path, input_size: u32) -> Result<(), ModelError> {
    let Some(dims) = &cut.input_dims else { return Ok(()) };
    let expected = [None, Some(3), Some(i64::from(input_size)), Some(i64::from(input_size))];
    let fits = dims.len() == 4
        && dims.iter().zip(expected).all(|(dim, want)| match (dim, want) {
            (Dim::Fixed(have), Some(want)) => *have == want,
            _ => true,
        });
    if fits {
        return Ok(());
    }
    let reason = format!(
        "input `{}` has shape {dims:?}, expected [N,3,{input_size},{input_size}]",
        cut.input
    );
    Err(ModelError::bundle(path, reason))
}

fn inference(error: impl std::fmt::Display) -> ModelError {
    ModelError::Inference(format!("{error:#}"))
}

fn first_as_vec(outputs: &TVec<TValue>) -> Result<Vec<f32>, ModelError> {
    output_as_vec(outputs, 0)
}

fn output_as_vec(outputs: &TVec<TValue>, index: usize) -> Result<Vec<f32>, ModelError> {
    let tensor = outputs
        .get(index)
        .ok_or_else(|| ModelError::Inference(format!("plan gave no output {index}")))?;
    let view = tensor.try_as_plain_ram().map_err(inference)?;
    Ok(view.as_slice::<f32>().map_err(inference)?.to_vec())
}

/// The folded PCA projection and the head, one plan per batch size.
struct TractHead {
    path: PathBuf,
    model: InferenceModel,
    feature_size: usize,
    plans: HashMap<usize, Plan>,
}

impl TractHead {
    fn plan(&mut self, n: usize) -> Result<Plan, ModelError> {
        if let Some(plan) = self.plans.get(&n) {
            return Ok(plan.clone());
        }
        let h = self.feature_size;
        let fact = InferenceFact::dt_shape(f32::datum_type(), tvec!(n, FEATURE_CHANNELS, h, h));
        let plan = build_plan(self.model.clone(), fact, &self.path)?;
        self.plans.insert(n, plan.clone());
        Ok(plan)
    }
}

/// The complete tract pipeline: backbone → PCA → head → softmax.
pub struct TractBackend {
    backbone: TractBackbone,
    head: TractHead,
    classes: usize,
    k: usize,
}

impl TractBackend {
    /// Loads the three model files of an opened bundle.
    pub fn open(bundle: &Bundle) -> Result<TractBackend, ModelError> {
        let backbone_path = bundle.dir.join(BACKBONE);
        let output = bundle.manifest.backbone_output.as_deref();
        let backbone = TractBackbone::open(&backbone_path, bundle.input_size, output)?;

        let pca = Pca::read(&bundle.dir.join(PCA), FEATURE_CHANNELS, bundle.components)?;
        let head_path = bundle.dir.join(HEAD);
        let head_proto = onnx::read_model(&head_path)?;
        let combined = runtime_graph(&head_proto, &head_path, &pca)?;
        let model = tract_onnx::onnx()
            .model_for_proto_model(&combined)
            .map_err(|e| ModelError::bundle(&head_path, format!("tract cannot parse: {e:#}")))?;
        let mut head = TractHead {
            path: head_path,
            model,
            feature_size: backbone.feature_size(),
            plans: HashMap::new(),
        };
        head.plan(1)?;
        Ok(TractBackend { backbone, head, classes: bundle.labels.len(), k: bundle.components })
    }

    /// The backbone alone, e.g. to compare its output with another runtime.
    pub fn backbone_mut(&mut self) -> &mut TractBackbone {
        &mut self.backbone
    }
}

impl Backend for TractBackend {
    fn infer(
        &mut self,
        input: &[f32],
        n: usize,
    ) -> Result<(Vec<Prediction>, StageTimes), ModelError> {
        if n == 0 {
            return Ok((Vec::new(), StageTimes::default()));
        }
        let started = Instant::now();
        let features = self.backbone.features(input, n)?;
        let backbone_done = Instant::now();

        let h = self.head.feature_size;
        let plan = self.head.plan(n)?;
        let tensor =
            Tensor::from_shape(&[n, FEATURE_CHANNELS, h, h], &features).map_err(inference)?;
        let outputs = plan.run(tvec!(tensor.into_tvalue())).map_err(inference)?;
        let logits = output_as_vec(&outputs, 0)?;
        let embeddings = output_as_vec(&outputs, 1)?;
        if logits.len() != n * self.classes || embeddings.len() != n * self.k {
            return Err(ModelError::Inference(format!(
                "head gave {} logits and {} `{EMBEDDING_OUTPUT}` values for {n} frames, \
                 expected {} and {}",
                logits.len(),
                embeddings.len(),
                n * self.classes,
                n * self.k,
            )));
        }
        let predictions = logits
            .chunks_exact(self.classes)
            .zip(embeddings.chunks_exact(self.k))
            .map(|(l, e)| Prediction { scores: softmax(l), embedding: e.to_vec() })
            .collect();
        let times = StageTimes { backbone: backbone_done - started, head: backbone_done.elapsed() };
        Ok((predictions, times))
    }

    fn info(&self) -> BackendInfo {
        BackendInfo { backend: "tract", device: "cpu".into(), precision: Precision::F32 }
    }
}
