//! `edgesight train`: folder → feature maps → PCA → head → evaluated bundle.
//!
//! The steps, in order: read the ImageFolder and split it (stratified, seeded); put the backbone
//! (the synthetic ResNet-50 or `--backbone`) in a staging directory beside `--out`; extract the
//! feature maps of every training image (clean, and once more under one of the chosen
//! conditions as augmentation) and of every validation and test image under every condition,
//! through the feature cache; fit the PCA on the training maps; project every map; train the
//! head; score the validation and test sets per condition; write the bundle; run the bundle's
//! clean validation images through tract and compare its top-1 with tch's; write the report
//! and its two pictures; and only then rename the staging directory to `--out`. An error or a
//! stop request removes the staging directory, so `--out` is either the old bundle or the new
//! one, never half of one.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::TrainError;
use super::conditions::Condition;
use super::features::{
    Extracted, Extractor, FeatureCache, RecordKey, Request, Trunk, load_images, trunk_key,
};
use super::folder::{ImageFolder, Sample};
use super::head_fit::{self, EpochRecord, FeatureSet, HeadOptions};
use super::metrics::{self, Evaluation};
use super::pca_fit::PcaAccumulator;
use super::plot;
use super::trunk_fit::{self, ImageSet, TrainBackbone, TrunkOptions};
use crate::model::bundle::{BACKBONE, HEAD, HEAD_WEIGHTS, MANIFEST, Manifest, PCA, sha256_file};
use crate::model::resnet::{GraphStyle, Naming, ResNet50, Tail, write_graph};
use crate::model::synth::{
    VariantOptions, not_replaceable, replace_dir, sibling, write_resnet50_variant,
};
use crate::model::torch_backend::{TorchTrunk, device_name, resolve_device};
use crate::model::{self, BackendOptions, Bundle, FEATURE_CHANNELS, Precision};
use crate::preprocess::Preprocess;

pub const REPORT: &str = "report.json";
pub const CONFUSION_PNG: &str = "confusion.png";
pub const HISTORY_PNG: &str = "training.png";
pub const BACKBONE_PNG: &str = "backbone-training.png";

/// The most threads `--threads` may ask for.
const MAX_THREADS: usize = 1024;

/// The most epochs `--epochs` and `--backbone-epochs` may ask for.
const MAX_EPOCHS: usize = 100_000;

/// The largest `--input-size`: a 2048 × 32 × 32 map per image already takes 8 MiB.
const MAX_INPUT_SIZE: u32 = 1024;

/// The largest `--batch-size`.
const MAX_BATCH: usize = 65_536;

/// Whether `path` is `dir` or below it. Both are made absolute with symbolic links resolved up
/// to their deepest existing ancestor; what lies below it is taken as written.
fn inside(path: &Path, dir: &Path) -> bool {
    match (resolved(path), resolved(dir)) {
        (Some(path), Some(dir)) => path.starts_with(dir),
        _ => false,
    }
}

fn resolved(path: &Path) -> Option<PathBuf> {
    let path = std::path::absolute(path).ok()?;
    let mut missing = Vec::new();
    let mut base = path.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(base) {
            return Some(missing.iter().rev().fold(real, |p, name| p.join(name)));
        }
        missing.push(base.file_name()?.to_owned());
        base = base.parent()?;
    }
}

/// A learning rate libtorch's optimisers can take (they hold it as f32): finite, above 0, at
/// most 10.
fn lr_ok(lr: f64) -> bool {
    lr.is_finite() && lr > 0.0 && lr <= 10.0
}

/// ImageNet normalisation, what the ResNet-50 trunk expects.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Everything `edgesight train` takes.
#[derive(Debug, Clone, Serialize)]
pub struct TrainOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    /// A ResNet-50 ONNX file; `None` for the synthetic one (seed 0).
    pub backbone: Option<PathBuf>,
    pub input_size: u32,
    pub val_split: f64,
    pub test: Option<PathBuf>,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub patience: usize,
    pub pca_variance: f64,
    pub max_components: usize,
    pub device: String,
    pub seed: u64,
    /// Conditions of the evaluation axis and the augmentation (clean is always evaluated).
    #[serde(serialize_with = "condition_names")]
    pub conditions: Vec<Condition>,
    /// Which part of the trunk to train before the PCA and the head.
    pub train_backbone: TrainBackbone,
    /// Epochs of trunk training.
    pub backbone_epochs: usize,
    /// Peak learning rate of trunk training.
    pub backbone_lr: f64,
    /// Arithmetic of trunk training (f32 or bf16; the weights stay f32 either way).
    pub backbone_precision: Precision,
    /// Feature cache directory.
    pub cache: PathBuf,
    /// CPU threads for libtorch and decoding; 0 = one per core.
    pub threads: usize,
    /// Skip the tract-vs-tch comparison (it runs every clean validation image through tract).
    pub skip_agreement: bool,
    /// Show progress bars (when stderr is a terminal).
    pub progress: bool,
}

fn condition_names<S: serde::Serializer>(
    conditions: &[Condition],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(conditions.iter().map(|c| c.name()))
}

impl TrainOptions {
    /// Every option out of range, with its flag.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.input_size < 32
            || self.input_size > MAX_INPUT_SIZE
            || !self.input_size.is_multiple_of(32)
        {
            problems.push(format!(
                "--input-size {} is not a multiple of 32 in 32..={MAX_INPUT_SIZE}",
                self.input_size
            ));
        }
        if !(self.val_split > 0.0 && self.val_split < 1.0) {
            problems.push(format!("--val-split {} is not in (0, 1)", self.val_split));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            problems.push(format!("--weight-decay {} must be 0 or more", self.weight_decay));
        }
        if self.patience == 0 {
            problems.push("--patience must be at least 1".into());
        }
        if self.threads > MAX_THREADS {
            problems.push(format!("--threads {} is above {MAX_THREADS}", self.threads));
        }
        for (flag, dir) in [("--data", Some(&self.data)), ("--test", self.test.as_ref())] {
            let Some(dir) = dir else { continue };
            for (what, path) in [("--out", &self.out), ("--cache", &self.cache)] {
                if inside(path, dir) {
                    problems.push(format!(
                        "{what} {} is inside {flag} {}: it would become a class of the next run",
                        path.display(),
                        dir.display()
                    ));
                }
            }
        }
        if self.epochs == 0 || self.epochs > MAX_EPOCHS {
            problems.push(format!("--epochs {} is not in 1..={MAX_EPOCHS}", self.epochs));
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH {
            problems.push(format!("--batch-size {} is not in 1..={MAX_BATCH}", self.batch_size));
        }
        if !lr_ok(self.lr) {
            problems.push(format!("--lr {} is not in (0, 10]", self.lr));
        }
        if !(self.pca_variance > 0.0 && self.pca_variance <= 1.0) {
            problems.push(format!("--pca-variance {} is not in (0, 1]", self.pca_variance));
        }
        if self.max_components == 0 || self.max_components > FEATURE_CHANNELS {
            problems.push(format!(
                "--max-components {} is not in 1..={FEATURE_CHANNELS}",
                self.max_components
            ));
        }
        if self.backbone_precision == Precision::F16 {
            problems.push(
                "--backbone-precision f16: training in float16 needs loss scaling, which \
                 trunk training does not do; use bf16 or f32"
                    .to_string(),
            );
        }
        if self.train_backbone != TrainBackbone::None {
            if self.backbone_epochs == 0 || self.backbone_epochs > MAX_EPOCHS {
                problems.push(format!(
                    "--backbone-epochs {} is not in 1..={MAX_EPOCHS}",
                    self.backbone_epochs
                ));
            }
            if !lr_ok(self.backbone_lr) {
                problems.push(format!("--backbone-lr {} is not in (0, 10]", self.backbone_lr));
            }
            if self.batch_size == 1 {
                problems.push("--batch-size must be at least 2 to train the backbone".into());
            }
        }
        if !model::is_device(&self.device) {
            problems.push(format!("--device {:?} is not auto, cpu, cuda or cuda:N", self.device));
        }
        problems
    }

    /// Clean first, then the others in the order given, each once.
    fn evaluated_conditions(&self) -> Vec<Condition> {
        let mut out = vec![Condition::Clean];
        for &c in &self.conditions {
            if !out.contains(&c) {
                out.push(c);
            }
        }
        out
    }
}

/// The per-condition score of a set.
#[derive(Debug, Clone, Serialize)]
pub struct ConditionScore {
    pub condition: String,
    pub images: u64,
    pub accuracy: f64,
    pub loss: f64,
}

/// The scores of the validation or test set.
#[derive(Debug, Clone, Serialize)]
pub struct SetReport {
    /// Clean images: accuracy, loss, per-class precision and recall, confusion matrix.
    pub clean: Evaluation,
    /// Every condition, clean included.
    pub conditions: Vec<ConditionScore>,
    /// All conditions pooled.
    pub all_conditions: ConditionScore,
}

/// An image that could not be used, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Unreadable {
    pub path: PathBuf,
    pub reason: String,
}

/// tract's top-1 against tch's on the clean validation images.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    pub images: u64,
    pub same_top1: u64,
    pub fraction: f64,
    /// Images that could no longer be read when the check ran (changed or removed).
    pub unreadable: u64,
}

/// How the trunk was trained (`--train-backbone`).
#[derive(Debug, Clone, Serialize)]
pub struct BackboneTraining {
    pub scope: TrainBackbone,
    /// Loss and accuracy of the temporary classifier behind the trunk.
    pub history: Vec<EpochRecord>,
    pub best_epoch: usize,
    pub seconds: f64,
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub bundle: String,
    pub created: String,
    pub classes: Vec<String>,
    pub options: TrainOptions,
    pub device: String,
    /// Images per split after unreadable ones were dropped.
    pub images: BTreeMap<String, u64>,
    /// Files that are not images by their extension (not read).
    pub skipped_not_images: u64,
    pub unreadable: Vec<Unreadable>,
    /// Validation and test images whose content also appears among the training images.
    pub same_as_training: BTreeMap<String, u64>,
    pub feature_map: [usize; 3],
    pub k: usize,
    pub variance_kept: f64,
    pub pca_samples: u64,
    pub backbone_training: Option<BackboneTraining>,
    pub history: Vec<EpochRecord>,
    pub best_epoch: usize,
    pub validation: SetReport,
    pub test: Option<SetReport>,
    pub agreement: Option<Agreement>,
    /// Seconds per step.
    pub seconds: BTreeMap<String, f64>,
}

/// What a finished run made.
pub struct Outcome {
    pub out: PathBuf,
    pub report: Report,
}

/// Removes the staging directory unless the run completed.
struct Staging {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// One labelled map of a split.
#[derive(Debug, Clone)]
struct Item {
    key: RecordKey,
    label: usize,
    condition: Condition,
    path: PathBuf,
}

/// Trains a bundle; see the module documentation for the steps.
pub fn train(options: &TrainOptions, stop: &AtomicBool) -> Result<Outcome, TrainError> {
    let problems = options.problems();
    if !problems.is_empty() {
        return Err(TrainError::Usage(problems.join("; ")));
    }
    let out = &options.out;
    let empty = std::fs::read_dir(out).is_ok_and(|mut entries| entries.next().is_none());
    if let Some(reason) = not_replaceable(out).filter(|_| !empty) {
        return Err(TrainError::file(out, reason));
    }
    let device = resolve_device(&options.device).map_err(|e| match e {
        crate::model::ModelError::Device(reason) => {
            TrainError::Usage(format!("--device: {reason}"))
        }
        other => other.into(),
    })?;
    sweep_leftovers(out);
    let mut seconds = BTreeMap::new();
    let started = Instant::now();

    let folder = ImageFolder::read(&options.data)?;
    let (train_samples, val_samples) = folder.split(options.val_split, options.seed)?;
    let test_folder = match &options.test {
        Some(dir) => Some(read_test(dir, &folder.classes)?),
        None => None,
    };
    let test_skipped = test_folder.as_ref().map_or(0, |f| f.skipped as u64);
    let test_samples = test_folder.map(|f| f.samples);
    tracing::info!(
        data = %options.data.display(),
        classes = folder.classes.len(),
        train = train_samples.len(),
        validation = val_samples.len(),
        test = test_samples.as_ref().map_or(0, Vec::len),
        "dataset read"
    );

    let staging = Staging { dir: sibling(out, "tmp")?, keep: false };
    std::fs::create_dir_all(&staging.dir).map_err(|e| {
        let staging = staging.dir.display();
        TrainError::file(out, format!("--out: cannot write beside it (staging {staging}): {e}"))
    })?;
    let backbone_path = staging.dir.join(BACKBONE);
    if options.threads > 0 {
        tch::set_num_threads(options.threads as i32);
    }
    let preprocess = Preprocess { size: options.input_size, mean: MEAN, std: STD };

    // The conditions: every validation and test image is scored under each; every training
    // image is used clean and under one drawn condition.
    let evaluated = options.evaluated_conditions();
    let augment: Vec<Condition> =
        evaluated.iter().copied().filter(|c| *c != Condition::Clean).collect();
    let mut draw = crate::model::prng::Rng::derive(options.seed, "augmentation");
    let drawn: Vec<Option<Condition>> = train_samples
        .iter()
        .map(|_| {
            (!augment.is_empty())
                .then(|| augment[(draw.next_u64() % augment.len() as u64) as usize])
        })
        .collect();

    let (mut trunk, backbone_training) = if options.train_backbone == TrainBackbone::None {
        match &options.backbone {
            Some(path) => {
                let trunk = open_trunk(path, options.input_size, device)?;
                std::fs::copy(path, &backbone_path).map_err(|e| TrainError::file(path, e))?;
                (trunk, None)
            }
            None => {
                let variant = VariantOptions::torchvision(0, options.input_size);
                write_resnet50_variant(&backbone_path, &variant)?;
                (open_trunk(&backbone_path, options.input_size, device)?, None)
            }
        }
    } else {
        let started = Instant::now();
        let trained = train_backbone(
            options,
            (&train_samples, &drawn),
            &val_samples,
            folder.classes.len(),
            preprocess,
            device,
            stop,
        )?;
        let style = GraphStyle {
            naming: Naming::Torchvision,
            opset: 17,
            fold_bn: false,
            batch: None,
            input_size: options.input_size,
            tail: Tail::None,
        };
        let (graph, _) = write_graph(&trained.net, &style);
        std::fs::write(&backbone_path, crate::model::onnx::encode(&graph))
            .map_err(|e| TrainError::file(&backbone_path, e))?;
        let trunk = Trunk::Torch(TorchTrunk::open(
            &backbone_path,
            options.input_size,
            None,
            device,
            Kind::Float,
        )?);
        let report = BackboneTraining {
            scope: options.train_backbone,
            best_epoch: trained.best_epoch,
            history: trained.history,
            seconds: started.elapsed().as_secs_f64(),
        };
        seconds.insert("backbone".to_string(), report.seconds);
        (trunk, Some(report))
    };
    let shape = probe_shape(&mut trunk, options.input_size)?;
    let key = trunk_key(&sha256_file(&backbone_path)?, &preprocess);
    // A trained trunk is new every run: its maps go to a scratch cache removed at the end
    // rather than filling the shared one with records nothing will read again.
    let scratch = Staging { dir: sibling(out, "features")?, keep: false };
    let cache_dir = if backbone_training.is_some() { &scratch.dir } else { &options.cache };
    let mut cache = FeatureCache::open(cache_dir, &key, shape)?;
    tracing::info!(
        device = %device_name(device),
        library = trunk.library(),
        feature_map = ?shape,
        cache = %cache.path().display(),
        cache_records = cache.len(),
        "backbone ready"
    );

    let mut plan: Vec<(Split, &Sample, Condition)> = Vec::new();
    for (sample, drawn) in train_samples.iter().zip(&drawn) {
        plan.push((Split::Train, sample, Condition::Clean));
        if let Some(condition) = drawn {
            plan.push((Split::Train, sample, *condition));
        }
    }
    for (split, samples) in [(Split::Val, Some(&val_samples)), (Split::Test, test_samples.as_ref())]
    {
        for sample in samples.into_iter().flatten() {
            for &condition in &evaluated {
                plan.push((split, sample, condition));
            }
        }
    }
    let requests: Vec<Request> = plan
        .iter()
        .map(|(_, sample, condition)| Request { path: sample.path.clone(), condition: *condition })
        .collect();

    let extract_started = Instant::now();
    let bar = progress_bar(options.progress, requests.len() as u64, "features");
    let mut extractor = Extractor {
        trunk: &mut trunk,
        preprocess,
        batch: 32,
        threads: model::thread_count(options.threads),
        seed: options.seed,
    };
    let mut cached = 0;
    let mut milestones = Milestones::new("feature maps", requests.len() as u64);
    let extracted = extractor.extract(&mut cache, &requests, stop, |done, hits| {
        cached = hits;
        milestones.reach(done as u64);
        bar.set_position(done as u64);
        bar.set_message(format!("features ({hits} cached)"));
    })?;
    bar.finish_and_clear();
    seconds.insert("features".to_string(), extract_started.elapsed().as_secs_f64());
    let (splits, unreadable) = sort_out(&plan, extracted);
    for bad in &unreadable {
        let file = bad.path.display();
        tracing::warn!(%file, reason = %bad.reason, "unreadable image skipped");
    }
    tracing::info!(
        maps = requests.len(),
        from_cache = cached,
        unreadable = unreadable.len(),
        seconds = extract_started.elapsed().as_secs(),
        "feature maps ready"
    );
    let [train_items, val_items, test_items] = splits;
    let overlap = overlap_with_training(&train_items, [&val_items, &test_items]);
    for (set, count) in ["validation", "test"].iter().zip(overlap) {
        if count > 0 {
            tracing::warn!(
                count,
                "{set} images with the same content as training images: their scores are not \
                 held-out figures"
            );
        }
    }
    check_every_class(&folder.classes, &train_items, "training")?;
    check_every_class(&folder.classes, &val_items, "validation")?;

    // PCA on the training maps.
    let pca_started = Instant::now();
    let mut accumulator = PcaAccumulator::new(FEATURE_CHANNELS, device);
    for chunk in train_items.chunks(256) {
        if stop.load(Ordering::Relaxed) {
            return Err(TrainError::Interrupted);
        }
        let keys: Vec<RecordKey> = chunk.iter().map(|item| item.key).collect();
        accumulator.add_maps(&cache.read(&keys)?)?;
    }
    let fit = accumulator.finish(options.pca_variance, options.max_components)?;
    seconds.insert("pca".to_string(), pca_started.elapsed().as_secs_f64());
    tracing::info!(
        k = fit.pca.k,
        variance_kept = format!("{:.4}", fit.variance_kept),
        samples = fit.samples,
        "PCA fitted"
    );

    let project = |items: &[Item]| -> Result<FeatureSet, TrainError> {
        project_set(&cache, &fit.pca, items, device, stop)
    };
    let train_set = project(&train_items)?;
    let val_set = project(&val_items)?;
    let test_set = if test_items.is_empty() { None } else { Some(project(&test_items)?) };
    // The maps are projected: another run may use the cache while this one trains.
    drop(cache);

    // The head.
    let head_started = Instant::now();
    let head_options = HeadOptions {
        epochs: options.epochs,
        batch_size: options.batch_size,
        lr: options.lr,
        weight_decay: options.weight_decay,
        patience: options.patience,
        seed: options.seed,
        device,
    };
    let classes = folder.classes.len();
    let bar = progress_bar(options.progress, options.epochs as u64, "head");
    let trained = head_fit::train_head(&train_set, &val_set, classes, &head_options, stop, |r| {
        bar.inc(1);
        log_epoch("epoch", r);
    })
    .map_err(|e| match e {
        head_fit::HeadError::Stopped => TrainError::Interrupted,
        other => TrainError::Head(other),
    })?;
    bar.finish_and_clear();
    seconds.insert("head".to_string(), head_started.elapsed().as_secs_f64());

    let (validation, val_predictions) =
        score(&trained.weights, &val_set, &val_items, &folder.classes, &evaluated, device)?;
    let test = match &test_set {
        Some(set) => {
            Some(score(&trained.weights, set, &test_items, &folder.classes, &evaluated, device)?.0)
        }
        None => None,
    };

    // The bundle.
    let created = chrono::Utc::now();
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "edgesight-model".into());
    let write = |file: &str, bytes: Vec<u8>| {
        let path = staging.dir.join(file);
        std::fs::write(&path, bytes).map_err(|e| TrainError::file(&path, e))
    };
    write(PCA, fit.pca.to_safetensors(&staging.dir.join(PCA))?)?;
    write(HEAD, crate::model::onnx::encode(&trained.weights.to_onnx()))?;
    write(HEAD_WEIGHTS, trained.weights.to_safetensors(&staging.dir.join(HEAD_WEIGHTS))?)?;
    let mut manifest = Manifest {
        name: name.clone(),
        version: format!("1.0.0+{}", created.format("%Y%m%d%H%M%S")),
        created: created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        input_size: options.input_size,
        mean: MEAN,
        std: STD,
        labels: folder.classes.clone(),
        k: fit.pca.k,
        explained_variance: Some(fit.variance_kept as f32),
        backbone_output: None,
        files: BTreeMap::new(),
        metrics: Some(manifest_metrics(&validation, test.as_ref(), &trained)),
    };
    write_manifest(&staging.dir, &mut manifest, &[BACKBONE, PCA, HEAD, HEAD_WEIGHTS])?;

    let agreement = if options.skip_agreement {
        None
    } else {
        let started = Instant::now();
        let clean: Vec<(usize, &Item)> = val_items
            .iter()
            .enumerate()
            .filter(|(_, item)| item.condition == Condition::Clean)
            .collect();
        let agreement = agree(&staging.dir, &clean, &val_predictions, preprocess, options, stop)?;
        seconds.insert("agreement".to_string(), started.elapsed().as_secs_f64());
        tracing::info!(
            images = agreement.images,
            same_top1 = agreement.same_top1,
            fraction = format!("{:.4}", agreement.fraction),
            "tract and tch compared on the clean validation images"
        );
        Some(agreement)
    };
    seconds.insert("total".to_string(), started.elapsed().as_secs_f64());

    let mut images = BTreeMap::new();
    for (split, items) in
        [("train", &train_items), ("validation", &val_items), ("test", &test_items)]
    {
        let distinct: HashSet<&Path> = items.iter().map(|item| item.path.as_path()).collect();
        images.insert(split.to_string(), distinct.len() as u64);
    }
    let report = Report {
        bundle: name,
        created: manifest.created.clone(),
        classes: folder.classes.clone(),
        options: options.clone(),
        device: device_name(device),
        images,
        skipped_not_images: folder.skipped as u64 + test_skipped,
        unreadable,
        same_as_training: [
            ("validation".to_string(), overlap[0]),
            ("test".to_string(), overlap[1]),
        ]
        .into_iter()
        .collect(),
        feature_map: shape,
        k: fit.pca.k,
        variance_kept: fit.variance_kept,
        pca_samples: fit.samples,
        backbone_training,
        history: trained.history.clone(),
        best_epoch: trained.best_epoch,
        validation,
        test,
        agreement,
        seconds,
    };
    let json = serde_json::to_vec_pretty(&report)
        .map_err(|e| TrainError::Invalid(format!("cannot encode the report: {e}")))?;
    write(REPORT, json)?;
    let confusion_of = report.test.as_ref().unwrap_or(&report.validation);
    let title = if report.test.is_some() { "TEST, CLEAN" } else { "VALIDATION, CLEAN" };
    save_png(
        &plot::confusion_png(&report.classes, &confusion_of.clean.confusion, title),
        &staging.dir.join(CONFUSION_PNG),
    )?;
    save_png(
        &plot::history_png(&report.history, report.best_epoch),
        &staging.dir.join(HISTORY_PNG),
    )?;
    let mut files = vec![BACKBONE, PCA, HEAD, HEAD_WEIGHTS, REPORT, CONFUSION_PNG, HISTORY_PNG];
    if let Some(trunk) = &report.backbone_training {
        let picture = plot::history_png(&trunk.history, trunk.best_epoch);
        save_png(&picture, &staging.dir.join(BACKBONE_PNG))?;
        files.push(BACKBONE_PNG);
    }
    write_manifest(&staging.dir, &mut manifest, &files)?;
    if stop.load(Ordering::Relaxed) {
        return Err(TrainError::Interrupted);
    }
    let mut staging = staging;
    replace_dir(&staging.dir, out)?;
    staging.keep = true;
    Ok(Outcome { out: out.clone(), report })
}

/// A trunk trained by [`train_backbone`].
struct TrainedTrunk {
    net: ResNet50,
    history: Vec<EpochRecord>,
    best_epoch: usize,
}

/// Decodes the training images (clean and under their drawn condition) and the clean
/// validation images, and trains the trunk on them (`--train-backbone`).
fn train_backbone(
    options: &TrainOptions,
    (train_samples, drawn): (&[Sample], &[Option<Condition>]),
    val_samples: &[Sample],
    classes: usize,
    preprocess: Preprocess,
    device: Device,
    stop: &AtomicBool,
) -> Result<TrainedTrunk, TrainError> {
    let mut net = match &options.backbone {
        Some(path) => trunk_fit::resnet_from_onnx(path)?,
        None => ResNet50::generate(0),
    };
    let threads = model::thread_count(options.threads);
    let varied = drawn.iter().any(Option::is_some);
    let mut requests = Vec::new();
    for (sample, condition) in train_samples.iter().zip(drawn) {
        requests.push(Request { path: sample.path.clone(), condition: Condition::Clean });
        if varied {
            let condition = condition.unwrap_or(Condition::Clean);
            requests.push(Request { path: sample.path.clone(), condition });
        }
    }
    let bar = progress_bar(options.progress, requests.len() as u64, "decoding");
    let (images, outcomes) =
        load_images(&requests, preprocess, options.seed, threads, stop, |n| {
            bar.set_position(n as u64)
        })?;
    bar.finish_and_clear();
    // Row of each decoded request in `images`; a training image is used when all its variants
    // decoded (the ones that did not are reported by the extraction that follows).
    let mut rows = Vec::with_capacity(outcomes.len());
    let mut next = 0i64;
    for outcome in &outcomes {
        rows.push(outcome.is_ok().then(|| {
            next += 1;
            next - 1
        }));
    }
    let per_sample = if varied { 2 } else { 1 };
    let (mut clean_rows, mut varied_rows, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for (i, sample) in train_samples.iter().enumerate() {
        let own = &rows[i * per_sample..(i + 1) * per_sample];
        if own.iter().all(Option::is_some) {
            clean_rows.push(own[0].unwrap_or_default());
            varied_rows.push(own[per_sample - 1].unwrap_or_default());
            labels.push(sample.label as i64);
        }
    }
    let pick = |rows: &[i64]| images.f_index_select(0, &Tensor::from_slice(rows));
    let train = ImageSet {
        clean: pick(&clean_rows)?,
        varied: if varied { Some(pick(&varied_rows)?) } else { None },
        labels: Tensor::from_slice(&labels),
    };
    drop(images);
    let val_requests: Vec<Request> = val_samples
        .iter()
        .map(|s| Request { path: s.path.clone(), condition: Condition::Clean })
        .collect();
    let (val_images, val_outcomes) =
        load_images(&val_requests, preprocess, options.seed, threads, stop, |_| {})?;
    let val_labels: Vec<i64> = val_samples
        .iter()
        .zip(&val_outcomes)
        .filter(|(_, outcome)| outcome.is_ok())
        .map(|(s, _)| s.label as i64)
        .collect();
    let val = ImageSet { clean: val_images, varied: None, labels: Tensor::from_slice(&val_labels) };
    tracing::info!(
        scope = ?options.train_backbone,
        images = labels.len(),
        validation = val_labels.len(),
        epochs = options.backbone_epochs,
        precision = options.backbone_precision.as_str(),
        "training the backbone"
    );

    let trunk_options = TrunkOptions {
        scope: options.train_backbone,
        classes,
        epochs: options.backbone_epochs,
        batch_size: options.batch_size,
        lr: options.backbone_lr,
        weight_decay: options.weight_decay,
        precision: options.backbone_precision,
        seed: options.seed,
        device,
    };
    let total = (options.backbone_epochs * labels.len()) as u64;
    let bar = progress_bar(options.progress, total, "backbone");
    let mut milestones = Milestones::new("backbone training", total);
    let (history, best_epoch) = trunk_fit::train_trunk(
        &mut net,
        &train,
        &val,
        &trunk_options,
        stop,
        |r| log_epoch("backbone epoch", r),
        |n| {
            bar.inc(n as u64);
            milestones.reach(bar.position());
        },
    )
    .map_err(|e| match e {
        trunk_fit::TrunkError::Stopped => TrainError::Interrupted,
        other => TrainError::Trunk(other),
    })?;
    bar.finish_and_clear();
    Ok(TrainedTrunk { net, history, best_epoch })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    Train,
    Val,
    Test,
}

fn read_test(dir: &Path, classes: &[String]) -> Result<ImageFolder, TrainError> {
    let test = ImageFolder::read(dir)?;
    if test.classes != classes {
        return Err(TrainError::file(
            dir,
            format!(
                "its classes [{}] are not the training classes [{}]",
                test.classes.join(", "),
                classes.join(", ")
            ),
        ));
    }
    Ok(test)
}

/// Removes what runs killed without a chance to clean up left beside `out`: staging
/// directories `.NAME.tmp-PID-…` and scratch caches `.NAME.features-PID-…` whose process is
/// gone. A live process's directories (another run writing the same bundle) are left alone.
fn sweep_leftovers(out: &Path) {
    let (Some(name), parent) = (out.file_name(), out.parent()) else { return };
    let parent = parent.filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let prefix = format!(".{}.", name.to_string_lossy());
    for entry in entries.filter_map(Result::ok) {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file_name.strip_prefix(&prefix) else { continue };
        let tags = ["tmp-", "features-", "old-"];
        let Some((tag, rest)) = tags.iter().find_map(|t| Some((*t, rest.strip_prefix(t)?))) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        // A run killed between moving the old bundle aside and moving the new one in.
        if tag == "old-" && !out.exists() {
            match std::fs::rename(&path, out) {
                Ok(()) => tracing::warn!(
                    out = %out.display(),
                    "put back the bundle a stopped run had moved aside"
                ),
                Err(error) => tracing::warn!(path = %path.display(), %error, "cannot put back"),
            }
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed what a stopped run left"),
            Err(error) => tracing::warn!(path = %path.display(), %error, "cannot remove"),
        }
    }
}

/// The `[2048,h,w]` shape of the trunk's feature map at this input size.
fn probe_shape(trunk: &mut Trunk, input_size: u32) -> Result<[usize; 3], TrainError> {
    let s = input_size as usize;
    let maps = trunk.forward(&vec![0f32; 3 * s * s], 1, input_size)?;
    let size = maps.size();
    match size.as_slice() {
        [1, c, h, w] if *c == FEATURE_CHANNELS as i64 => {
            Ok([*c as usize, *h as usize, *w as usize])
        }
        _ => Err(TrainError::Invalid(format!("the trunk gave a feature map of shape {size:?}"))),
    }
}

/// The trunk on libtorch; on tract when libtorch's graph reader refuses the file for a reason
/// other than it not being a ResNet-50 (an operator it does not implement), since tract runs
/// any ONNX graph. Feature extraction is then slower, and the error says why.
fn open_trunk(path: &Path, input_size: u32, device: Device) -> Result<Trunk, TrainError> {
    let torch_error = match TorchTrunk::open(path, input_size, None, device, Kind::Float) {
        Ok(trunk) => return Ok(Trunk::Torch(trunk)),
        Err(error) => error,
    };
    let message = torch_error.to_string();
    if message.contains("not a ResNet-50") {
        return Err(torch_error.into());
    }
    match crate::model::TractBackbone::open(path, input_size, None) {
        Ok(trunk) => {
            tracing::warn!(
                backbone = %path.display(),
                reason = %message,
                "libtorch cannot run this backbone; extracting features with tract (CPU, slower)"
            );
            Ok(Trunk::Tract(Box::new(trunk)))
        }
        Err(_) => Err(torch_error.into()),
    }
}

/// Splits the extraction results back into the three sets; images that failed are gathered
/// once each.
fn sort_out(
    plan: &[(Split, &Sample, Condition)],
    extracted: Vec<Extracted>,
) -> ([Vec<Item>; 3], Vec<Unreadable>) {
    let mut sets: [Vec<Item>; 3] = Default::default();
    let mut unreadable: Vec<Unreadable> = Vec::new();
    let mut seen: HashSet<PathBuf> = HashSet::new();
    for ((split, sample, condition), result) in plan.iter().zip(extracted) {
        match result {
            Ok(key) => {
                let index = match split {
                    Split::Train => 0,
                    Split::Val => 1,
                    Split::Test => 2,
                };
                sets[index].push(Item {
                    key,
                    label: sample.label,
                    condition: *condition,
                    path: sample.path.clone(),
                });
            }
            Err(reason) => {
                if seen.insert(sample.path.clone()) {
                    unreadable.push(Unreadable { path: sample.path.clone(), reason });
                }
            }
        }
    }
    (sets, unreadable)
}

/// Clean images of each other set whose content (record key) is also a training image's.
fn overlap_with_training(train: &[Item], others: [&[Item]; 2]) -> [u64; 2] {
    let clean = |item: &&Item| item.condition == Condition::Clean;
    let seen: HashSet<RecordKey> = train.iter().filter(clean).map(|item| item.key).collect();
    others
        .map(|set| set.iter().filter(clean).filter(|item| seen.contains(&item.key)).count() as u64)
}

fn check_every_class(classes: &[String], items: &[Item], set: &str) -> Result<(), TrainError> {
    let mut counts = vec![0usize; classes.len()];
    for item in items {
        counts[item.label] += 1;
    }
    let empty: Vec<&str> =
        classes.iter().zip(&counts).filter(|(_, n)| **n == 0).map(|(c, _)| c.as_str()).collect();
    if !empty.is_empty() {
        return Err(TrainError::Invalid(format!(
            "no readable {set} image left in class(es) {}",
            empty.join(", ")
        )));
    }
    Ok(())
}

/// Projects the maps of `items` through the PCA (a 1×1 convolution) on `device`; the set
/// lives on the CPU.
fn project_set(
    cache: &FeatureCache,
    pca: &crate::model::pca::Pca,
    items: &[Item],
    device: Device,
    stop: &AtomicBool,
) -> Result<FeatureSet, TrainError> {
    let (weight, bias) = pca.fold();
    let k = pca.k as i64;
    let weight = Tensor::from_slice(&weight).reshape([k, FEATURE_CHANNELS as i64, 1, 1]).to(device);
    let bias = Tensor::from_slice(&bias).to(device);
    let _no_grad = tch::no_grad_guard();
    let mut parts = Vec::new();
    for chunk in items.chunks(256) {
        if stop.load(Ordering::Relaxed) {
            return Err(TrainError::Interrupted);
        }
        let keys: Vec<RecordKey> = chunk.iter().map(|item| item.key).collect();
        let maps = cache.read(&keys)?.f_to_device(device)?;
        let projected = maps.f_conv2d(&weight, Some(&bias), [1, 1], [0, 0], [1, 1], 1)?;
        parts.push(projected.f_to_device(Device::Cpu)?);
    }
    let features = if parts.is_empty() {
        Tensor::zeros([0, k, 1, 1], (Kind::Float, Device::Cpu))
    } else {
        Tensor::f_cat(&parts, 0)?
    };
    let labels: Vec<i64> = items.iter().map(|item| item.label as i64).collect();
    Ok(FeatureSet { features, labels: Tensor::from_slice(&labels) })
}

/// Scores a set per condition; also returns every item's predicted class.
fn score(
    weights: &crate::model::head::HeadWeights,
    set: &FeatureSet,
    items: &[Item],
    classes: &[String],
    conditions: &[Condition],
    device: Device,
) -> Result<(SetReport, Vec<usize>), TrainError> {
    let (logits, losses) = head_fit::predict(weights, set, 256, device)?;
    let predicted: Vec<i64> = Vec::<i64>::try_from(logits.f_argmax(-1, false)?)?;
    let predicted: Vec<usize> = predicted.into_iter().map(|p| p as usize).collect();
    let mut per_condition = Vec::new();
    let mut clean = None;
    for &condition in conditions {
        let (mut truth, mut guess, mut loss) = (Vec::new(), Vec::new(), Vec::new());
        for (i, item) in items.iter().enumerate() {
            if item.condition == condition {
                truth.push(item.label);
                guess.push(predicted[i]);
                loss.push(losses[i]);
            }
        }
        let evaluation = metrics::evaluate(classes, &truth, &guess, &loss);
        per_condition.push(ConditionScore {
            condition: condition.name().to_string(),
            images: evaluation.images,
            accuracy: evaluation.accuracy,
            loss: evaluation.loss,
        });
        if condition == Condition::Clean {
            clean = Some(evaluation);
        }
    }
    let truth: Vec<usize> = items.iter().map(|item| item.label).collect();
    let all = metrics::evaluate(classes, &truth, &predicted, &losses);
    let report = SetReport {
        clean: clean.unwrap_or_else(|| metrics::evaluate(classes, &[], &[], &[])),
        conditions: per_condition,
        all_conditions: ConditionScore {
            condition: "all".into(),
            images: all.images,
            accuracy: all.accuracy,
            loss: all.loss,
        },
    };
    Ok((report, predicted))
}

fn manifest_metrics(
    validation: &SetReport,
    test: Option<&SetReport>,
    trained: &head_fit::TrainedHead,
) -> toml::Table {
    let mut table = toml::Table::new();
    table.insert("val_accuracy".into(), toml::Value::Float(validation.clean.accuracy));
    table.insert("val_loss".into(), toml::Value::Float(validation.clean.loss));
    table.insert(
        "val_accuracy_all_conditions".into(),
        toml::Value::Float(validation.all_conditions.accuracy),
    );
    if let Some(test) = test {
        table.insert("test_accuracy".into(), toml::Value::Float(test.clean.accuracy));
        table.insert("test_loss".into(), toml::Value::Float(test.clean.loss));
    }
    table.insert("best_epoch".into(), toml::Value::Integer(trained.best_epoch as i64));
    table.insert("report".into(), toml::Value::String(REPORT.into()));
    table
}

/// Writes `manifest.toml` listing `files` with their checksums, checked by the reader's rules.
fn write_manifest(dir: &Path, manifest: &mut Manifest, files: &[&str]) -> Result<(), TrainError> {
    manifest.files.clear();
    for name in files {
        manifest.files.insert(name.to_string(), sha256_file(&dir.join(name))?);
    }
    let text = manifest.to_toml()?;
    let path = dir.join(MANIFEST);
    Manifest::parse(&text, &path)?;
    std::fs::write(&path, text).map_err(|e| TrainError::file(&path, e))
}

/// Opens the staged bundle on tract and runs every clean validation image through it.
fn agree(
    dir: &Path,
    clean: &[(usize, &Item)],
    tch_predictions: &[usize],
    preprocess: Preprocess,
    options: &TrainOptions,
    stop: &AtomicBool,
) -> Result<Agreement, TrainError> {
    let bundle = Bundle::open(dir)?;
    let mut backend = model::open_backend(&bundle, &BackendOptions::tract(options.threads))?;
    let size = preprocess.size as usize;
    let mut input = vec![0f32; 3 * size * size];
    let (mut images, mut same, mut unreadable) = (0u64, 0u64, 0u64);
    for (index, item) in clean {
        if stop.load(Ordering::Relaxed) {
            return Err(TrainError::Interrupted);
        }
        // An image changed or removed since its features were taken is left out, not fatal.
        let read = crate::preprocess::load_image(&item.path)
            .and_then(|frame| preprocess.try_write_tensor(&frame, &mut input));
        if let Err(error) = read {
            tracing::warn!(path = %item.path.display(), %error, "left out of the agreement check");
            unreadable += 1;
            continue;
        }
        let (predictions, _) = backend.infer(&input, 1)?;
        let scores = &predictions[0].scores;
        let top = scores
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(usize::MAX, |(i, _)| i);
        images += 1;
        if top == tch_predictions[*index] {
            same += 1;
        }
    }
    let fraction = if images == 0 { 1.0 } else { same as f64 / images as f64 };
    Ok(Agreement { images, same_top1: same, fraction, unreadable })
}

fn save_png(image: &image::RgbImage, path: &Path) -> Result<(), TrainError> {
    image.save_with_format(path, image::ImageFormat::Png).map_err(|e| TrainError::file(path, e))
}

fn log_epoch(what: &str, r: &EpochRecord) {
    tracing::info!(
        epoch = r.epoch,
        train_loss = format!("{:.4}", r.train_loss),
        train_accuracy = format!("{:.4}", r.train_accuracy),
        val_loss = format!("{:.4}", r.val_loss),
        val_accuracy = format!("{:.4}", r.val_accuracy),
        "{what}"
    );
}

/// Logs every tenth of a long step, for runs whose stderr is a log rather than a terminal.
struct Milestones {
    what: &'static str,
    total: u64,
    logged: u64,
    started: Instant,
}

impl Milestones {
    fn new(what: &'static str, total: u64) -> Milestones {
        Milestones { what, total: total.max(1), logged: 0, started: Instant::now() }
    }

    fn reach(&mut self, done: u64) {
        let tenth = done * 10 / self.total;
        if tenth > self.logged && tenth < 10 {
            self.logged = tenth;
            let elapsed = self.started.elapsed().as_secs_f64();
            let left = elapsed * (self.total - done) as f64 / done.max(1) as f64;
            tracing::info!(
                done,
                total = self.total,
                elapsed_s = elapsed.round(),
                left_s = left.round(),
                "{} {} %",
                self.what,
                tenth * 10
            );
        }
    }
}

fn progress_bar(show: bool, length: u64, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(length);
    let style =
        ProgressStyle::with_template("{msg:>22} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)")
            .map(|style| style.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar.set_message(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{NodeProto, TensorProto};

    /// What dead runs left beside `--out` is removed, except a bundle moved aside while `--out`
    /// is missing, which is put back; a live run's directories stay.
    #[test]
    fn leftovers_of_dead_runs_are_swept_and_a_moved_bundle_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bundle");
        let dead = 4_000_000_000u32;
        let live = std::process::id();
        for name in [
            format!(".bundle.tmp-{dead}-1"),
            format!(".bundle.features-{dead}-2"),
            format!(".bundle.old-{dead}-3"),
            format!(".bundle.tmp-{live}-4"),
            format!(".other.tmp-{dead}-5"),
        ] {
            std::fs::create_dir(dir.path().join(&name)).unwrap();
            std::fs::write(dir.path().join(&name).join(MANIFEST), &name).unwrap();
        }
        sweep_leftovers(&out);
        let manifest = std::fs::read_to_string(out.join(MANIFEST)).unwrap();
        assert_eq!(manifest, format!(".bundle.old-{dead}-3"));
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let expected = [
            ".bundle.tmp-LIVE-4".replace("LIVE", &live.to_string()),
            ".other.tmp-4000000000-5".into(),
            "bundle".into(),
        ];
        assert_eq!(left, expected);
    }

    /// A ResNet-50 with one operator libtorch's reader lacks (a Mul by 1 after the stem) is
    /// extracted on tract, with the same maps; a file that is not a ResNet-50 is still refused.
    #[test]
    fn a_graph_libtorch_cannot_read_falls_back_to_tract() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain.onnx");
        write_resnet50_variant(&plain, &VariantOptions::torchvision(2, 32)).unwrap();
        let mut proto = crate::model::onnx::read_model(&plain).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        let pool = graph.node.iter().position(|n| n.op_type == "MaxPool").unwrap();
        let input = graph.node[pool].input[0].clone();
        graph.initializer.push(TensorProto {
            name: "one".into(),
            data_type: 1,
            float_data: vec![1.0],
            ..Default::default()
        });
        graph.node.insert(
            pool,
            NodeProto {
                name: "scale".into(),
                op_type: "Mul".into(),
                input: vec![input, "one".into()],
                output: vec!["scaled".into()],
                ..Default::default()
            },
        );
        graph.node[pool + 1].input[0] = "scaled".into();
        let odd = dir.path().join("odd.onnx");
        std::fs::write(&odd, crate::model::onnx::encode(&proto)).unwrap();

        let mut torch = open_trunk(&plain, 32, Device::Cpu).unwrap();
        let mut tract = open_trunk(&odd, 32, Device::Cpu).unwrap();
        assert_eq!((torch.library(), tract.library()), ("libtorch", "tract"));
        assert_eq!(probe_shape(&mut tract, 32).unwrap(), [FEATURE_CHANNELS, 1, 1]);
        let input: Vec<f32> = (0..2 * 3 * 32 * 32).map(|i| ((i % 13) as f32 - 6.0) / 4.0).collect();
        let a = torch.forward(&input, 2, 32).unwrap();
        let b = tract.forward(&input, 2, 32).unwrap();
        let error = (&a - &b).abs().max().double_value(&[]);
        let scale = a.abs().max().double_value(&[]);
        assert!(error <= 1e-3 * scale.max(1.0), "{error} vs scale {scale}");

        let synth = dir.path().join("synth");
        crate::model::synth::write_bundle(
            &synth,
            &crate::model::SynthOptions { input_size: 32, ..Default::default() },
        )
        .unwrap();
        let head = synth.join(HEAD);
        let error = open_trunk(&head, 32, Device::Cpu).err().unwrap().to_string();
        assert!(error.contains("head.onnx"), "{error}");
    }
}
