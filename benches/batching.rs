//! Engine throughput with and without cross-stream batching: frames/s of `Engine::run` at
//! `max_batch` 1 and 4 on the 224-px synthetic ResNet-50 bundle, and what each extra tract plan
//! (one per batch size) costs in resident memory.
//!
//! Not a criterion bench: one run of the engine is seconds long, and the figure wanted is
//! frames per second through the real engine loop (preprocessing, batching, payloads), not a
//! per-call distribution. Run with `cargo bench --bench batching`; `EDGESIGHT_BENCH_THREADS`
//! (default 1) sets tract's threads, `EDGESIGHT_BENCH_FRAMES` (default 32) the frames per run.
//! Numbers go to `benches/results.md`; nothing is asserted.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::bundle_224;
use edgesight::engine::{Engine, EngineOptions};
use edgesight::metrics::Metrics;
use edgesight::model::{self, Backend, BackendOptions, Bundle, TractBackend};
use edgesight::preprocess::Frame;
use edgesight::source::{SourceEvent, SourceFrame};

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// Resident set size of this process, MiB (Linux).
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// A 320×240 frame; `seed` varies the pixels.
fn frame(seed: usize) -> Frame {
    let (width, height) = (320u32, 240u32);
    let data =
        (0..(width * height * 3) as usize).map(|i| ((i * 7 + seed * 31) % 251) as u8).collect();
    Frame { width, height, data }
}

/// Frames/s of the engine over `frames` frames from 4 streams, all queued up front.
fn engine_fps(bundle: &Bundle, threads: usize, max_batch: usize, frames: usize) -> f64 {
    let mut backend = model::open_backend(bundle, &BackendOptions::tract(threads))
        .unwrap_or_else(|e| panic!("{e}"));
    // Build every plan the run can use first (one per batch size); not part of the figure.
    let side = bundle.input_size as usize;
    for n in 1..=max_batch {
        let input = vec![0.1f32; n * 3 * side * side];
        backend.infer(&input, n).unwrap_or_else(|e| panic!("{e}"));
    }
    let mut options = EngineOptions::new("bench", "bench");
    options.max_batch = max_batch;
    options.max_wait = Duration::from_millis(20);
    let engine = Engine::new(backend, bundle, options, Metrics::new());
    let streams: Vec<Arc<str>> = (0..4).map(|i| Arc::from(format!("s{i}"))).collect();
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    for index in 0..frames {
        let stream = Arc::clone(&streams[index % streams.len()]);
        let index_in_stream = (index / streams.len()) as u64;
        let frame =
            SourceFrame::new(stream, index_in_stream, None, SystemTime::now(), frame(index));
        events_tx.send(SourceEvent::Frame(frame)).expect("queued");
    }
    for stream in &streams {
        events_tx.send(SourceEvent::Ended { stream: Arc::clone(stream) }).expect("queued");
    }
    drop(events_tx);
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(1024);
    let drain = std::thread::spawn(move || while out_rx.blocking_recv().is_some() {});
    let started = Instant::now();
    let summary = engine.run(events_rx, out_tx);
    let elapsed = started.elapsed();
    drain.join().expect("drain thread");
    let classified: u64 = summary.classified.values().sum();
    assert_eq!(classified as usize, frames, "every frame classified");
    frames as f64 / elapsed.as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this with other flags.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let threads = env_number("EDGESIGHT_BENCH_THREADS", 1);
    let frames = env_number("EDGESIGHT_BENCH_FRAMES", 32);
    let dir = bundle_224();
    let bundle = Bundle::open(&dir).unwrap_or_else(|e| panic!("{e}"));

    // Plan memory: one backend, plans for batch 1, 4, then 3 built one after the other.
    model::set_tract_threads(threads);
    let before = rss_mib();
    let mut backend = TractBackend::open(&bundle).unwrap_or_else(|e| panic!("{e}"));
    let opened = rss_mib();
    println!("rss: {before:.0} MiB before open, {opened:.0} MiB with the batch-1 plans");
    let side = bundle.input_size as usize;
    for n in [4usize, 3] {
        let input = vec![0.1f32; n * 3 * side * side];
        let first = Instant::now();
        backend.infer(&input, n).unwrap_or_else(|e| panic!("{e}"));
        let build = first.elapsed();
        let after = rss_mib();
        let again = Instant::now();
        backend.infer(&input, n).unwrap_or_else(|e| panic!("{e}"));
        println!(
            "batch {n}: first call {:.0} ms (plan built), second {:.0} ms; rss {after:.0} MiB",
            build.as_secs_f64() * 1e3,
            again.elapsed().as_secs_f64() * 1e3
        );
    }
    drop(backend);

    for max_batch in [1usize, 4] {
        let fps = engine_fps(&bundle, threads, max_batch, frames);
        println!(
            "engine max_batch {max_batch}: {fps:.2} frames/s ({frames} frames, {threads} threads)"
        );
    }
}
