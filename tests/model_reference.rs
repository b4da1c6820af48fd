//! tract's backbone output against onnxruntime's, on the synthetic bundle and on the
//! ONNX-zoo-style opset-8 file.
//!
//! onnxruntime is the independent reference: if our writer produced a graph that tract reads
//! one way and the ONNX spec means another, or tract's optimiser changed the arithmetic, these
//! tests catch it. The reference runs through `scripts/onnx_reference.py`; CI installs python3
//! with `pip install onnxruntime numpy`. A missing interpreter or package fails the test with
//! the install command — it never skips, so a green run means the comparison happened.
//!
//! Error measure: max |tract − ort| / max |ort| over the whole tensor (see
//! `common::relative_error`), required ≤ 1e-4.

#![cfg(feature = "tract")]

mod common;

use std::path::Path;
use std::process::Command;

use common::{relative_error, scratch, synth_bundle, test_input};
use edgesight::model::TractBackbone;
use edgesight::model::synth::{Tail, VariantOptions, write_resnet50_variant};

const TOLERANCE: f32 = 1e-4;

/// Runs the reference script on `model` with `input` of `shape`; returns (output, shape).
fn onnxruntime(model: &Path, input: &[f32], shape: [usize; 4], work: &Path) -> (Vec<f32>, String) {
    let input_path = work.join("input.f32");
    let output_path = work.join("output.f32");
    let bytes: Vec<u8> = input.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&input_path, bytes).unwrap_or_else(|e| panic!("{}: {e}", input_path.display()));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/onnx_reference.py");
    let shape_arg = shape.map(|d| d.to_string()).join(",");
    // scripts/test.sh points EDGESIGHT_PYTHON at a virtual environment with onnxruntime.
    let python = std::env::var("EDGESIGHT_PYTHON").unwrap_or_else(|_| "python3".into());
    let result = Command::new(&python)
        .arg(&script)
        .arg(model)
        .arg(&input_path)
        .args(["--shape", &shape_arg])
        .arg("--out")
        .arg(&output_path)
        .output();
    let output = match result {
        Ok(output) => output,
        Err(error) => panic!(
            "cannot run {python} ({error}): the onnxruntime reference needs python3 with \
             `pip install onnxruntime numpy` (scripts/test.sh sets that up)"
        ),
    };
    assert!(
        output.status.success(),
        "{} failed ({}); it needs `pip install onnxruntime numpy`:\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let raw = std::fs::read(&output_path).unwrap_or_else(|e| panic!("{e}"));
    let values =
        raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    (values, String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn compare_bundle_backbone(size: u32, n: usize) {
    let bundle = synth_bundle(0, size);
    let model = bundle.join("backbone.onnx");
    let input = test_input(size, n);
    let s = size as usize;
    let mut backbone = TractBackbone::open(&model, size, None).unwrap_or_else(|e| panic!("{e}"));
    let tract = backbone.features(&input, n).unwrap_or_else(|e| panic!("{e}"));

    let work = scratch(&format!("reference-{size}"));
    let (reference, info) = onnxruntime(&model, &input, [n, 3, s, s], &work);
    let h = s / 32;
    assert!(info.contains(&format!("[{n}, 2048, {h}, {h}]")), "onnxruntime output: {info}");
    let error = relative_error(&tract, &reference);
    eprintln!("{size}px, {n} frame(s): relative error {error:e}");
    assert!(error <= TOLERANCE, "tract vs onnxruntime at {size}px: {error:e} > {TOLERANCE:e}");
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn tract_matches_onnxruntime_at_64() {
    compare_bundle_backbone(64, 2);
}

#[test]
fn tract_matches_onnxruntime_at_224() {
    compare_bundle_backbone(224, 1);
}

#[test]
fn zoo_v1_opset_8_file_is_valid_for_onnxruntime_and_matches_tract() {
    let work = scratch("reference-zoo");
    let model = work.join("zoo.onnx");
    // Without the classifier so that the feature map is a graph output onnxruntime can return.
    let variant = VariantOptions { tail: Tail::None, ..VariantOptions::zoo_v1(5, 64) };
    write_resnet50_variant(&model, &variant).unwrap_or_else(|e| panic!("{e}"));
    let input = test_input(64, 1);
    let mut backbone = TractBackbone::open(&model, 64, None).unwrap_or_else(|e| panic!("{e}"));
    let tract = backbone.features(&input, 1).unwrap_or_else(|e| panic!("{e}"));
    let (reference, _) = onnxruntime(&model, &input, [1, 3, 64, 64], &work);
    let error = relative_error(&tract, &reference);
    assert!(error <= TOLERANCE, "zoo v1 opset 8: {error:e} > {TOLERANCE:e}");
    let _ = std::fs::remove_dir_all(&work);
}
