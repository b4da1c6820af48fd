//! The torch backend against the tract backend: same bundle, same frames. f32 must agree on
//! top-1 for every corpus image and video frame with scores within 1e-4; every backbone layout
//! the loader accepts must give tract's feature map; files that are not a ResNet-50 are refused
//! naming the file; bf16 agreement is measured and printed. CUDA checks run where libtorch sees
//! a GPU and say they were skipped otherwise. Needs the `torch` feature (and libtorch on the
//! loader path: `eval "$(scripts/libtorch.sh)"`).
#![cfg(feature = "torch")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::bundle::{TEST_INPUT, corpus, media_files, test_bundle};
use common::model::{link_copy, relative_error, scratch, test_input};
use edgesight::model::synth::{Tail, VariantOptions, write_resnet50_variant};
use edgesight::model::torch_backend::{TorchTrunk, resolve_device};
use edgesight::model::{
    Backend, BackendKind, BackendOptions, Bundle, Precision, TractBackbone, open_backend,
};
use serde_json::Value;

const SIZE: u32 = TEST_INPUT;

fn torch(device: &str, precision: Precision) -> BackendOptions {
    BackendOptions { kind: BackendKind::Torch, device: device.into(), precision, threads: 2 }
}

fn open(dir: &Path, options: &BackendOptions) -> Box<dyn Backend> {
    let bundle = Bundle::open(dir).unwrap_or_else(|e| panic!("{e}"));
    open_backend(&bundle, options).unwrap_or_else(|e| panic!("{e}"))
}

/// `edgesight classify --json` rows (file, frame, label, score) with the given backend flags.
fn classify_rows(flags: &[&str], files: &[PathBuf]) -> Vec<Value> {
    let output = Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .arg("classify")
        .arg("--json")
        .arg("--model")
        .arg(test_bundle())
        .args(flags)
        .args(files)
        .output()
        .expect("classify runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout.lines().map(|line| serde_json::from_str(line).expect("a JSON row")).collect()
}

#[test]
fn torch_and_tract_agree_on_every_corpus_image_and_video_frame() {
    let files = media_files();
    assert!(files.len() > 40, "corpus has {} media files", files.len());
    let tract = classify_rows(&["--backend", "tract", "--threads", "2"], &files);
    let torch = classify_rows(&["--backend", "torch", "--device", "cpu", "--threads", "2"], &files);
    assert_eq!(tract.len(), torch.len(), "the backends gave different numbers of rows");
    let mut compared = 0;
    let mut worst = 0.0f64;
    for (a, b) in tract.iter().zip(&torch) {
        assert_eq!((&a["file"], &a["frame"]), (&b["file"], &b["frame"]), "rows out of step");
        assert_eq!(a["error"], b["error"], "{}: different errors", a["file"]);
        if a["label"].is_null() {
            continue;
        }
        assert_eq!(a["label"], b["label"], "{} frame {}: top-1 differs", a["file"], a["frame"]);
        let (sa, sb) = (a["score"].as_f64().unwrap_or(-1.0), b["score"].as_f64().unwrap_or(1.0));
        worst = worst.max((sa - sb).abs());
        assert!((sa - sb).abs() <= 1e-4, "{} frame {}: {sa} vs {sb}", a["file"], a["frame"]);
        compared += 1;
    }
    eprintln!(
        "tract vs torch f32: {compared} frames, same top-1, worst score difference {worst:e}"
    );
    assert!(compared > 60, "only {compared} frames were classified");
}

#[test]
fn every_score_and_embedding_agrees_within_1e_4_at_batch_1_and_5() {
    let dir = test_bundle();
    let mut tract = open(&dir, &BackendOptions::tract(2));
    let mut torch = open(&dir, &torch("cpu", Precision::F32));
    for n in [1, 5] {
        let input = test_input(SIZE, n);
        let (expected, _) = tract.infer(&input, n).unwrap_or_else(|e| panic!("{e}"));
        let (actual, times) = torch.infer(&input, n).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(actual.len(), n);
        assert!(!times.backbone.is_zero() && !times.head.is_zero(), "{times:?}");
        for (a, e) in actual.iter().zip(&expected) {
            let score_diff =
                a.scores.iter().zip(&e.scores).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(score_diff <= 1e-4, "batch {n}: scores differ by {score_diff:e}");
            let error = relative_error(&a.embedding, &e.embedding);
            assert!(error <= 1e-4, "batch {n}: embedding relative error {error:e}");
        }
    }
    let info = torch.info();
    assert_eq!(
        (info.backend, info.device.as_str(), info.precision),
        ("torch", "cpu", Precision::F32)
    );
}

/// The trunk of `variant` on tch gives the tract feature map of the same file.
fn assert_trunk_matches_tract(variant: &VariantOptions, name: &str) {
    let dir = scratch(&format!("torch-trunk-{name}"));
    let path = dir.join(format!("{name}.onnx"));
    write_resnet50_variant(&path, variant).unwrap_or_else(|e| panic!("{e}"));
    let mut tract =
        TractBackbone::open(&path, variant.input_size, None).unwrap_or_else(|e| panic!("{e}"));
    let input = test_input(variant.input_size, 2);
    let expected = tract.features(&input, 2).unwrap_or_else(|e| panic!("{e}"));
    let trunk =
        TorchTrunk::open(&path, variant.input_size, None, tch::Device::Cpu, tch::Kind::Float)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    let s = variant.input_size as i64;
    let batch = tch::Tensor::from_slice(&input).reshape([2, 3, s, s]);
    let features = trunk.forward(&batch).unwrap_or_else(|e| panic!("{e}")).contiguous();
    let count = features.numel();
    let mut actual = vec![0.0f32; count];
    features.copy_data(&mut actual, count);
    let error = relative_error(&actual, &expected);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(error < 1e-5, "{name}: feature map relative error {error:e}");
}

#[test]
fn torchvision_zoo_v1_and_folded_layouts_give_tracts_feature_map() {
    assert_trunk_matches_tract(&VariantOptions::torchvision(3, SIZE), "torchvision");
    let tail = VariantOptions { tail: Tail::FlattenGemm, ..VariantOptions::torchvision(3, SIZE) };
    assert_trunk_matches_tract(&tail, "torchvision-classifier");
    assert_trunk_matches_tract(&VariantOptions::zoo_v1(3, SIZE), "zoo-v1");
    let folded = VariantOptions { fold_bn: true, ..VariantOptions::torchvision(3, SIZE) };
    assert_trunk_matches_tract(&folded, "folded");
    let fixed = VariantOptions { batch: Some(1), ..VariantOptions::torchvision(3, SIZE) };
    let dir = scratch("torch-trunk-fixed");
    let path = dir.join("fixed.onnx");
    write_resnet50_variant(&path, &fixed).unwrap_or_else(|e| panic!("{e}"));
    // A fixed batch in the file does not bind tch, which runs any batch.
    let trunk = TorchTrunk::open(&path, SIZE, None, tch::Device::Cpu, tch::Kind::Float);
    let features =
        trunk.and_then(|t| t.forward(&tch::Tensor::zeros([3, 3, 64, 64], tch::kind::FLOAT_CPU)));
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(features.map(|f| f.size()).ok(), Some(vec![3, 2048, 2, 2]));
}

fn trunk_error(path: &Path, size: u32) -> String {
    match TorchTrunk::open(path, size, None, tch::Device::Cpu, tch::Kind::Float) {
        Ok(_) => panic!("{} was accepted as a ResNet-50", path.display()),
        Err(error) => {
            let message = error.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            message
        }
    }
}

#[test]
fn files_that_are_not_resnet50_are_refused_naming_the_file() {
    let squeezenet = trunk_error(&corpus("model_light_squeezenet.onnx"), 224);
    assert!(
        squeezenet.contains("not one of a ResNet-50 trunk's")
            || squeezenet.contains("not a ResNet-50"),
        "{squeezenet}"
    );
    let mnist = trunk_error(&corpus("model_mnist_pytorch27_opset18.onnx"), 224);
    assert!(mnist.contains("expected [N,3,224,224]"), "{mnist}");

    // A bundle whose backbone lost a block: every convolution shape is a ResNet-50 one, but
    // one is missing.
    let dir = scratch("torch-short-resnet");
    let path = dir.join("short.onnx");
    write_resnet50_variant(&path, &VariantOptions::torchvision(1, SIZE))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut model = edgesight::model::onnx::read_model(&path).unwrap_or_else(|e| panic!("{e}"));
    let graph = model.graph.as_mut().expect("graph");
    // Drop layer4.2 (its three convolutions, norms, ReLUs and the Add) and rewire the output.
    let first = graph.node.iter().position(|n| n.name.contains("layer4.2")).expect("layer4.2");
    let last_input = graph.node[first].input[0].clone();
    graph.node.truncate(first);
    graph.output[0].name = last_input;
    std::fs::write(&path, edgesight::model::onnx::encode(&model)).unwrap_or_else(|e| panic!("{e}"));
    let short = trunk_error(&path, SIZE);
    // A file declared for another input size than the bundle's is refused as tract refuses it.
    let size = trunk_error(&path, 224);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(size.contains("expected [N,3,224,224]"), "{size}");
    assert!(
        short.contains("50 of its 53 convolutions") && short.contains("layer4.2.conv1"),
        "{short}"
    );
}

#[test]
fn bf16_agreement_with_f32_is_measured() {
    let dir = test_bundle();
    let mut f32_backend = open(&dir, &torch("cpu", Precision::F32));
    let mut bf16_backend = open(&dir, &torch("cpu", Precision::Bf16));
    let n = 16;
    let input = test_input(SIZE, n);
    let (reference, _) = f32_backend.infer(&input, n).unwrap_or_else(|e| panic!("{e}"));
    let (actual, _) = bf16_backend.infer(&input, n).unwrap_or_else(|e| panic!("{e}"));
    let top = |scores: &[f32]| {
        scores
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &s)| if s > b.1 { (i, s) } else { b })
            .0
    };
    let mut same = 0;
    let mut worst = 0.0f32;
    for (a, r) in actual.iter().zip(&reference) {
        assert!(a.scores.iter().all(|s| s.is_finite()));
        assert!((a.scores.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        same += usize::from(top(&a.scores) == top(&r.scores));
        worst = a.scores.iter().zip(&r.scores).fold(worst, |m, (x, y)| m.max((x - y).abs()));
    }
    eprintln!(
        "bf16 vs f32 on the synthetic bundle: top-1 {same}/{n}, worst score difference {worst:e}"
    );
    assert_eq!(bf16_backend.info().precision, Precision::Bf16);
    // bf16 keeps 8 bits of mantissa: scores move, but not by more than the scores themselves.
    assert!(worst < 0.5, "bf16 scores differ by {worst}");
}

#[test]
fn cuda_runs_where_a_gpu_is_present_and_is_refused_clearly_elsewhere() {
    let dir = test_bundle();
    let bundle = Bundle::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    if tch::Cuda::device_count() == 0 {
        eprintln!("no CUDA device seen by libtorch: CUDA parity skipped, checking the refusal");
        let error = open_backend(&bundle, &torch("cuda", Precision::F16)).err();
        let message = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("\"cuda\"") && message.contains("0 CUDA device"), "{message}");
        assert_eq!(resolve_device("auto").ok(), Some(tch::Device::Cpu));
        return;
    }
    let mut tract = open(&dir, &BackendOptions::tract(2));
    let input = test_input(SIZE, 4);
    let (expected, _) = tract.infer(&input, 4).unwrap_or_else(|e| panic!("{e}"));
    for precision in [Precision::F32, Precision::F16, Precision::Bf16] {
        let mut cuda =
            open_backend(&bundle, &torch("auto", precision)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cuda.info().device, "cuda:0");
        let (actual, _) = cuda.infer(&input, 4).unwrap_or_else(|e| panic!("{e}"));
        let worst = actual
            .iter()
            .zip(&expected)
            .flat_map(|(a, e)| a.scores.iter().zip(&e.scores).map(|(x, y)| (x - y).abs()))
            .fold(0.0f32, f32::max);
        eprintln!("cuda {precision:?} vs tract: worst score difference {worst:e}");
        if precision == Precision::F32 {
            // cuDNN may use TF32 on Ampere and later; libtorch leaves it off for convolutions
            // only when told, so f32 on CUDA is held to 1e-3.
            assert!(worst < 1e-3, "cuda f32 scores differ by {worst}");
        }
    }
}

#[test]
fn f16_on_a_cpu_and_a_damaged_head_are_clear_errors() {
    let dir = test_bundle();
    let bundle = Bundle::open(&dir).unwrap_or_else(|e| panic!("{e}"));
    let f16 = open_backend(&bundle, &torch("cpu", Precision::F16)).err().map(|e| e.to_string());
    assert!(f16.as_deref().is_some_and(|m| m.contains("f16 needs a CUDA device")), "{f16:?}");

    // head.safetensors with conv2 missing: the error names the file and the tensor. The
    // checksum check runs first, so the manifest's checksum is updated to match.
    let copy = link_copy(&dir, "torch-bad-head");
    let head = copy.join("head.safetensors");
    let bytes = std::fs::read(&head).unwrap_or_else(|e| panic!("{e}"));
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{e}"));
    let kept: Vec<(String, safetensors::tensor::TensorView)> =
        tensors.tensors().into_iter().filter(|(name, _)| !name.starts_with("conv2")).collect();
    let damaged = safetensors::serialize(kept, None).unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_file(&head);
    std::fs::write(&head, &damaged).unwrap_or_else(|e| panic!("{e}"));
    let manifest_path = copy.join("manifest.toml");
    let manifest = std::fs::read_to_string(&manifest_path).unwrap_or_else(|e| panic!("{e}"));
    let old =
        edgesight::model::bundle::sha256_file(&dir.join("head.safetensors")).unwrap_or_default();
    let new = edgesight::model::bundle::sha256_file(&head).unwrap_or_default();
    let _ = std::fs::remove_file(&manifest_path);
    std::fs::write(&manifest_path, manifest.replace(&old, &new)).unwrap_or_else(|e| panic!("{e}"));
    let bundle = Bundle::open(&copy).unwrap_or_else(|e| panic!("{e}"));
    let error = open_backend(&bundle, &torch("cpu", Precision::F32)).err().map(|e| e.to_string());
    let _ = std::fs::remove_dir_all(&copy);
    let message = error.unwrap_or_default();
    assert!(message.contains("head.safetensors") && message.contains("conv2.weight"), "{message}");
}

#[test]
fn the_daemon_runs_on_torch_and_says_so_in_the_log_and_in_stats() {
    let broker = common::mosquitto::Mosquitto::start();
    let dir = scratch("torch-daemon");
    let video = corpus("vid_mjpeg_160x120.avi");
    let config = dir.join("edgesight.toml");
    let text = format!(
        "device_id = \"tch\"\nlog = \"info\"\n\
         [model]\npath = \"{model}\"\nbackend = \"torch\"\ndevice = \"auto\"\nthreads = 2\n\
         [engine]\nmax_batch = 4\nmax_wait_ms = 50\n\
         [metrics]\nstats_interval_s = 1\n\
         [mqtt]\nport = {port}\nprefix = \"test\"\nspool_dir = \"{spool}\"\n\
         [[streams]]\nname = \"cam\"\nkind = \"file\"\npath = \"{video}\"\nfps = 10.0\n",
        model = test_bundle().display(),
        port = broker.port,
        spool = dir.join("spool").display(),
        video = video.display(),
    );
    std::fs::write(&config, text).unwrap_or_else(|e| panic!("{e}"));
    let expected = edgesight::source::read_video(&video, 10.0).filter(Result::is_ok).count();

    let (_client, rx) = common::watch::watch(broker.port, "test/tch/#", "torch-watcher");
    let output = Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("daemon runs");
    let log = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "daemon exited with {}:\n{log}", output.status);
    assert!(log.contains("backend=\"torch\"") || log.contains("backend=torch"), "{log}");
    assert!(log.contains("device=cpu"), "auto must name the device it took:\n{log}");

    let mut seen = Vec::new();
    while let Ok(message) = rx.recv_timeout(std::time::Duration::from_secs(2)) {
        seen.push(message);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let classified = seen.iter().filter(|m| m.topic == "test/tch/cam/classification").count();
    assert_eq!(classified, expected, "one classification per sampled frame");
    let stats_schema = common::watch::validator("stats.schema.json");
    let stats: Vec<Value> = seen
        .iter()
        .filter(|m| m.topic == "test/tch/stats")
        .map(|m| serde_json::from_str(&m.payload).expect("stats is JSON"))
        .collect();
    let last =
        stats.last().unwrap_or_else(|| panic!("no stats message in {} messages", seen.len()));
    let problems: Vec<String> = stats_schema.iter_errors(last).map(|e| e.to_string()).collect();
    assert!(problems.is_empty(), "{problems:?}");
    let engine = &last["engine"];
    assert_eq!(
        (engine["backend"].as_str(), engine["device"].as_str()),
        (Some("torch"), Some("cpu"))
    );
    assert_eq!(engine["precision"].as_str(), Some("f32"));
}

/// Writes the torchvision variant after `change` edits its graph; returns the path.
fn edited_variant(
    dir: &Path,
    name: &str,
    change: impl FnOnce(&mut tract_onnx::pb::GraphProto),
) -> PathBuf {
    let path = dir.join(format!("{name}.onnx"));
    write_resnet50_variant(&path, &VariantOptions::torchvision(5, SIZE))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut model = edgesight::model::onnx::read_model(&path).unwrap_or_else(|e| panic!("{e}"));
    change(model.graph.as_mut().expect("graph"));
    std::fs::write(&path, edgesight::model::onnx::encode(&model)).unwrap_or_else(|e| panic!("{e}"));
    path
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> tract_onnx::pb::NodeProto {
    tract_onnx::pb::NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// tract and tch feature maps of `path` on the same input, and their relative error.
fn tract_vs_tch(path: &Path) -> f32 {
    let mut tract = TractBackbone::open(path, SIZE, None).unwrap_or_else(|e| panic!("{e}"));
    let input = test_input(SIZE, 1);
    let expected = tract.features(&input, 1).unwrap_or_else(|e| panic!("{e}"));
    let trunk = TorchTrunk::open(path, SIZE, None, tch::Device::Cpu, tch::Kind::Float)
        .unwrap_or_else(|e| panic!("{e}"));
    let s = SIZE as i64;
    let batch = tch::Tensor::from_slice(&input).reshape([1, 3, s, s]);
    let features = trunk.forward(&batch).unwrap_or_else(|e| panic!("{e}")).contiguous();
    let count = features.numel();
    let mut actual = vec![0.0f32; count];
    features.copy_data(&mut actual, count);
    relative_error(&actual, &expected)
}

#[test]
fn identity_aliases_and_uneven_max_pool_padding_run_as_tract_runs_them() {
    let dir = scratch("torch-trunk-edits");
    // relu(b) + b through an Identity alias of b, before the first block's sum: an in-place
    // ReLU on the alias would overwrite b.
    let alias = edited_variant(&dir, "alias", |graph| {
        let at = graph.node.iter().position(|n| n.op_type == "Add").expect("an Add");
        let shortcut = graph.node[at].input[1].clone();
        graph.node[at].input[1] = "edit.sum".into();
        let inserted = [
            node("Identity", "edit.identity", &[&shortcut], &["edit.alias"]),
            node("Relu", "edit.relu", &["edit.alias"], &["edit.relu"]),
            node("Add", "edit.add", &["edit.relu", &shortcut], &["edit.sum"]),
        ];
        for (offset, n) in inserted.into_iter().enumerate() {
            graph.node.insert(at + offset, n);
        }
    });
    // The stem without its ReLU and with padding only at the bottom and right: the max-pool
    // sees negative values next to its padding, which must never win.
    let pool = edited_variant(&dir, "pool", |graph| {
        let relu = graph.node.iter().position(|n| n.op_type == "Relu").expect("a Relu");
        let pool = graph.node.iter().position(|n| n.op_type == "MaxPool").expect("a MaxPool");
        assert_eq!(pool, relu + 1, "the stem is Conv, BN, Relu, MaxPool");
        graph.node[pool].input[0] = graph.node[relu].input[0].clone();
        for attribute in &mut graph.node[pool].attribute {
            if attribute.name == "pads" {
                attribute.ints = vec![0, 0, 1, 1];
            }
        }
        graph.node.remove(relu);
    });
    let (alias_error, pool_error) = (tract_vs_tch(&alias), tract_vs_tch(&pool));
    eprintln!("relative errors: alias {alias_error:e}, pool {pool_error:e}");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(alias_error < 1e-5, "Identity alias: relative error {alias_error:e}");
    assert!(pool_error < 1e-5, "uneven max-pool padding: relative error {pool_error:e}");
}
