//! The same `backbone.onnx` in tract and in onnxruntime, in one run, and the ratio.
//!
//! `cargo bench --bench compare` writes a synthetic 224×224 ResNet-50 bundle (once), times
//! tract's backbone at batch 1 with 1 and 2 threads (median of repeated runs after a warm-up),
//! runs `benches/onnxruntime_bench.py` on the same file with the same thread counts, prints a
//! table and writes it to `benches/results.md`. Under `cargo test` (no `--bench` argument) it
//! only checks that it starts, so the test suite stays fast.
//!
//! The Python used is `$EDGESIGHT_PYTHON`, else `python3`; it needs `onnxruntime` and `numpy`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use edgesight::model::{self, Bundle, SynthOptions, TractBackbone};

const SIZE: u32 = 224;
const ITERATIONS: usize = 15;

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("compare: run with `cargo bench --bench compare`");
        return;
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-bundle-224");
    if Bundle::open(&dir).is_err() {
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(error) = model::synth::write_bundle(&dir, &SynthOptions::default()) {
            panic!("cannot write {}: {error}", dir.display());
        }
    }
    let backbone = dir.join("backbone.onnx");
    let mut rows = Vec::new();
    for threads in [1, 2] {
        let tract = time_tract(&backbone, threads);
        let ort = time_onnxruntime(&backbone, threads);
        rows.push((threads, tract, ort));
    }

    let machine = machine();
    let mut table = format!(
        "Backbone only (ResNet-50 trunk, {SIZE}×{SIZE}, batch 1, f32), median of {ITERATIONS} \
         runs after warm-up, {machine}.\n\n\
         | threads | tract {tract} ms/img | onnxruntime {ort} ms/img | tract / onnxruntime |\n\
         | --- | --- | --- | --- |\n",
        tract = "0.23",
        ort = rows.first().map_or("?".to_string(), |row| row.2.1.clone()),
    );
    for (threads, tract, (ort, _)) in &rows {
        table.push_str(&format!("| {threads} | {tract:.1} | {ort:.1} | {:.2}× |\n", tract / ort));
    }
    println!("{table}");
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results.md");
    if let Err(error) = std::fs::write(&results, &table) {
        eprintln!("cannot write {}: {error}", results.display());
    }
}

fn time_tract(backbone: &Path, threads: usize) -> f64 {
    model::set_tract_threads(threads);
    let mut net =
        TractBackbone::open(backbone, SIZE, None).unwrap_or_else(|error| panic!("{error}"));
    let input: Vec<f32> = (0..3 * SIZE * SIZE).map(|i| ((i % 97) as f32 / 97.0) - 0.5).collect();
    for _ in 0..3 {
        net.features(&input, 1).unwrap_or_else(|error| panic!("{error}"));
    }
    let mut times: Vec<f64> = (0..ITERATIONS)
        .map(|_| {
            let started = Instant::now();
            net.features(&input, 1).unwrap_or_else(|error| panic!("{error}"));
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Returns (ms per image, onnxruntime version).
fn time_onnxruntime(backbone: &Path, threads: usize) -> (f64, String) {
    let python = std::env::var("EDGESIGHT_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/onnxruntime_bench.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(backbone)
        .args(["--size", &SIZE.to_string(), "--threads", &threads.to_string()])
        .args(["--iterations", &ITERATIONS.to_string()])
        .output()
        .unwrap_or_else(|error| panic!("cannot run {python}: {error}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|error| panic!("{error}: {stdout}"));
    let ms = report["ms_per_image"].as_f64().unwrap_or(f64::NAN);
    let version = report["version"].as_str().unwrap_or("?").to_string();
    (ms, version)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}
