//! One `backbone.onnx`, every engine, one run: tract, tch f32 and bf16 (with the `torch`
//! feature), onnxruntime, and OpenVINO f32 and bf16, at batch 1 and 8 on 1 and 2 threads, in
//! ms per image, images per second and as a fraction of the machine's measured f32 GEMM peak.
//!
//! `cargo bench --bench compare --features torch` (after `eval "$(scripts/libtorch.sh)"`) writes
//! the synthetic 224×224 bundle once, measures each engine on its trunk (the median of repeated
//! runs after a warm-up: at least 5 runs and 3 s), runs `benches/engines.py` for onnxruntime,
//! OpenVINO and the GEMM peak (numpy's OpenBLAS f32 2048² product with the same thread count),
//! prints the table and writes it to `benches/results.md` and into the README between the
//! `compare:start` and `compare:end` marks. The fraction of peak is achieved GFLOP/s (the
//! trunk's FLOPs from `model::graph_cost` divided by the time) over the GEMM peak for that
//! thread count. Under `cargo test` (no `--bench` argument) it only checks that it starts.
//!
//! The Python is `$EDGESIGHT_PYTHON`, else `python3`; it needs numpy, onnxruntime and
//! openvino (`pip install onnxruntime openvino`); an engine that cannot be imported is listed as
//! not measured.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::bundle_224;
use edgesight::model::{self, Bundle, TractBackbone};

const SIZE: u32 = 224;
const MIN_RUNS: usize = 5;
const MIN_SECONDS: f64 = 3.0;

/// One measured row.
struct Row {
    engine: String,
    precision: String,
    batch: usize,
    threads: usize,
    /// `None` when the engine could not run here, with the reason.
    ms_per_image: Result<f64, String>,
}

fn main() {
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("compare: run with `cargo bench --bench compare [--features torch]`");
        return;
    }
    let dir = bundle_224();
    let bundle = Bundle::open(&dir).unwrap_or_else(|error| panic!("{error}"));
    let backbone = dir.join("backbone.onnx");
    let gflop = trunk_gflop(&bundle);
    let python = std::env::var("EDGESIGHT_PYTHON").unwrap_or_else(|_| "python3".into());
    // `-- --bench --only "tch f32"` measures the rows whose engine and precision contain every
    // word given, and writes no table.
    let args: Vec<String> = std::env::args().collect();
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let wanted = |engine: &str, precision: &str| {
        let name = format!("{engine} {precision}");
        only.as_deref().is_none_or(|o| o.split_whitespace().all(|word| name.contains(word)))
    };

    let mut rows = Vec::new();
    let mut peaks = Vec::new();
    for threads in [1, 2] {
        peaks.push((threads, gemm_peak(&python, threads)));
        for batch in [1, 8] {
            let row = |engine: &str, precision: &str, ms_per_image| Row {
                engine: engine.into(),
                precision: precision.into(),
                batch,
                threads,
                ms_per_image,
            };
            let before = rows.len();
            if wanted("tract", "f32") {
                rows.push(row("tract 0.23", "f32", Ok(time_tract(&backbone, batch, threads))));
            }
            for precision in [model::Precision::F32, model::Precision::Bf16] {
                if wanted("tch", precision.as_str()) {
                    let ms = time_torch(&backbone, batch, threads, precision);
                    rows.push(row("tch 0.26 (libtorch 2.13)", precision.as_str(), ms));
                }
            }
            for (engine, precision) in
                [("onnxruntime", "f32"), ("openvino", "f32"), ("openvino", "bf16")]
            {
                if !wanted(engine, precision) {
                    continue;
                }
                let measured = time_python(&python, &backbone, engine, precision, batch, threads);
                rows.push(match measured {
                    Ok((version, ran, ms)) => {
                        let precision = if ran == precision {
                            ran
                        } else {
                            format!("{precision} asked, {ran} ran")
                        };
                        row(&format!("{engine} {version}"), &precision, Ok(ms))
                    }
                    Err(reason) => row(engine, precision, Err(reason)),
                });
            }
            for row in &rows[before..] {
                eprintln!(
                    "{} {} b{} t{}: {:?}",
                    row.engine, row.precision, row.batch, row.threads, row.ms_per_image
                );
            }
        }
    }

    let table = render(&rows, &peaks, gflop);
    println!("{table}");
    if only.is_some() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let results = root.join("benches/results.md");
    let text = std::fs::read_to_string(&results).unwrap_or_default();
    if let Err(error) = std::fs::write(&results, splice(&text, &table)) {
        eprintln!("cannot write {}: {error}", results.display());
    }
    let readme = root.join("README.md");
    match std::fs::read_to_string(&readme) {
        Ok(text) if text.contains("<!-- compare:start -->") => {
            if let Err(error) = std::fs::write(&readme, splice(&text, &table)) {
                eprintln!("cannot write {}: {error}", readme.display());
            }
        }
        _ => eprintln!("README.md has no compare:start mark; table not copied there"),
    }
}

/// Replaces what lies between the compare marks of `text` (or appends the marked table).
fn splice(text: &str, table: &str) -> String {
    let (start, end) = ("<!-- compare:start -->", "<!-- compare:end -->");
    match (text.find(start), text.find(end)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{start}\n{table}{}", &text[..a], &text[b..])
        }
        _ => format!("{start}\n{table}{end}\n\n{text}"),
    }
}

fn render(rows: &[Row], peaks: &[(usize, Result<f64, String>)], gflop: f64) -> String {
    let peak_of = |threads: usize| {
        peaks.iter().find(|(t, _)| *t == threads).and_then(|(_, p)| p.as_ref().ok().copied())
    };
    let mut table = format!(
        "ResNet-50 trunk of the same `backbone.onnx` ({SIZE}×{SIZE}, {gflop:.2} GFLOP per image), \
         median of ≥ {MIN_RUNS} runs and ≥ {MIN_SECONDS} s after warm-up, {machine}; f32 GEMM \
         peak (numpy/OpenBLAS 2048²): {peaks}.\n\n\
         | engine | precision | batch | threads | ms/img | img/s | of f32 GEMM peak |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
        machine = machine(),
        peaks = peaks
            .iter()
            .map(|(threads, peak)| match peak {
                Ok(gflops) => format!("{gflops:.0} GFLOP/s on {threads} thread(s)"),
                Err(_) => format!("not measured on {threads} thread(s)"),
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    for row in rows {
        let (ms, rate, fraction) = match (&row.ms_per_image, peak_of(row.threads)) {
            (Ok(ms), peak) => (
                format!("{ms:.1}"),
                format!("{:.1}", 1e3 / ms),
                peak.map_or("?".to_string(), |p| {
                    format!("{:.0} %", 100.0 * gflop / (ms / 1e3) / p)
                }),
            ),
            (Err(reason), _) => (format!("not measured: {reason}"), "–".into(), "–".into()),
        };
        table.push_str(&format!(
            "| {} | {} | {} | {} | {ms} | {rate} | {fraction} |\n",
            row.engine, row.precision, row.batch, row.threads
        ));
    }
    table
}

/// GFLOP of one image through the trunk (a multiply-add counts 2).
fn trunk_gflop(bundle: &Bundle) -> f64 {
    let path = bundle.dir.join("backbone.onnx");
    let proto = model::onnx::read_model(&path).unwrap_or_else(|error| panic!("{error}"));
    let cut = model::backbone::cut(&proto, &path, None).unwrap_or_else(|error| panic!("{error}"));
    let graph = model::onnx::graph_of(&cut.model, &path).unwrap_or_else(|error| panic!("{error}"));
    let s = SIZE as usize;
    let cost = model::graph_cost(graph, &[(cut.input.as_str(), vec![1, 3, s, s])]);
    2.0 * cost.total_macs() as f64 / 1e9
}

/// Median ms per image of `run`, which processes `batch` images.
fn median_ms(batch: usize, mut run: impl FnMut()) -> f64 {
    for _ in 0..2 {
        run();
    }
    let started = Instant::now();
    let mut times = Vec::new();
    while times.len() < MIN_RUNS || started.elapsed().as_secs_f64() < MIN_SECONDS {
        let one = Instant::now();
        run();
        times.push(one.elapsed().as_secs_f64() * 1e3 / batch as f64);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn input(batch: usize) -> Vec<f32> {
    let frame = 3 * (SIZE as usize).pow(2);
    (0..batch * frame).map(|i| ((i % 97) as f32 / 97.0) - 0.5).collect()
}

fn time_tract(backbone: &Path, batch: usize, threads: usize) -> f64 {
    model::set_tract_threads(threads);
    let mut net =
        TractBackbone::open(backbone, SIZE, None).unwrap_or_else(|error| panic!("{error}"));
    let input = input(batch);
    median_ms(batch, || {
        net.features(&input, batch).unwrap_or_else(|error| panic!("{error}"));
    })
}

#[cfg(feature = "torch")]
fn time_torch(
    backbone: &Path,
    batch: usize,
    threads: usize,
    precision: model::Precision,
) -> Result<f64, String> {
    use edgesight::model::torch_backend::TorchTrunk;
    tch::set_num_threads(threads as i32);
    let kind = match precision {
        model::Precision::Bf16 => tch::Kind::BFloat16,
        model::Precision::F16 => tch::Kind::Half,
        model::Precision::F32 => tch::Kind::Float,
    };
    let trunk = TorchTrunk::open(backbone, SIZE, None, tch::Device::Cpu, kind)
        .map_err(|e| e.to_string())?;
    let s = SIZE as i64;
    let batch_tensor = tch::Tensor::from_slice(&input(batch)).reshape([batch as i64, 3, s, s]);
    Ok(median_ms(batch, || {
        let _ = trunk.forward(&batch_tensor).unwrap_or_else(|error| panic!("{error}"));
    }))
}

#[cfg(not(feature = "torch"))]
fn time_torch(_: &Path, _: usize, _: usize, _: model::Precision) -> Result<f64, String> {
    Err("built without the `torch` feature".into())
}

/// (version, precision the engine reports it ran, ms per image) from `benches/engines.py`.
fn time_python(
    python: &str,
    backbone: &Path,
    engine: &str,
    precision: &str,
    batch: usize,
    threads: usize,
) -> Result<(String, String, f64), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/engines.py");
    let output = Command::new(python)
        .arg(&script)
        .arg(backbone)
        .args(["--engine", engine, "--precision", precision])
        .args(["--size", &SIZE.to_string(), "--threads", &threads.to_string()])
        .args(["--batch", &batch.to_string(), "--iterations", &MIN_RUNS.to_string()])
        .args(["--seconds", &MIN_SECONDS.to_string()])
        .output()
        .map_err(|error| format!("cannot run {python}: {error}"))?;
    let report = json_report(&output)?;
    let ms = report["ms_per_image"].as_f64().ok_or("no ms_per_image")?;
    let version = report["version"].as_str().unwrap_or("?").to_string();
    let ran = report["precision"].as_str().unwrap_or("?").to_string();
    Ok((version, ran, ms))
}

/// GFLOP/s of numpy's f32 matrix product on `threads` threads.
fn gemm_peak(python: &str, threads: usize) -> Result<f64, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/engines.py");
    let output = Command::new(python)
        .arg(&script)
        .args(["--gemm", "--threads", &threads.to_string()])
        .env("OPENBLAS_NUM_THREADS", threads.to_string())
        .env("OMP_NUM_THREADS", threads.to_string())
        .output()
        .map_err(|error| format!("cannot run {python}: {error}"))?;
    json_report(&output)?["gflops"].as_f64().ok_or_else(|| "no gflops".into())
}

fn json_report(output: &std::process::Output) -> Result<serde_json::Value, String> {
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or("failed").to_string();
        return Err(last);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).map_err(|error| format!("{error}: {stdout}"))
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
