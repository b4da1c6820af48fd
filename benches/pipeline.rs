//! Criterion benchmarks of the stages a frame goes through: preprocessing, the ResNet-50
//! backbone on tract, PCA + head, and `classify` on a short video end to end.
//!
//! The bundle is the seeded synthetic one at 224×224 (same graph and FLOPs as a pretrained
//! ResNet-50), written once under the target directory. Run with `cargo bench --bench pipeline`;
//! the figures in the README come from this and from `benches/compare.rs`.

mod common;

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use common::bundle_224;
use criterion::{Criterion, criterion_group, criterion_main};
use edgesight::classify::Classifier;
use edgesight::model::{self, Backend, BackendOptions, Bundle, TractBackbone, TractBackend};
use edgesight::preprocess::{Frame, Preprocess};

fn open(dir: &Path) -> Bundle {
    Bundle::open(dir).unwrap_or_else(|error| panic!("{error}"))
}

/// A 1280×720 frame with a gradient, so the resample touches varied values.
fn hd_frame() -> Frame {
    let (width, height) = (1280u32, 720u32);
    let data = (0..width * height * 3).map(|i| (i % 251) as u8).collect();
    Frame { width, height, data }
}

fn stages(c: &mut Criterion) {
    let dir = bundle_224();
    let bundle = open(&dir);
    model::set_tract_threads(1);

    let preprocess = Preprocess { size: 224, mean: bundle.mean, std: bundle.std };
    let frame = hd_frame();
    let mut input = vec![0.0f32; 3 * 224 * 224];
    c.bench_function("preprocess 1280x720 -> 224", |b| {
        b.iter(|| preprocess.write_tensor(black_box(&frame), &mut input))
    });

    let mut backbone = TractBackbone::open(&dir.join("backbone.onnx"), 224, None)
        .unwrap_or_else(|error| panic!("{error}"));
    let mut group = c.benchmark_group("model");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.bench_function("backbone 224 b1 1 thread", |b| {
        b.iter(|| backbone.features(black_box(&input), 1))
    });
    let mut backend = TractBackend::open(&bundle).unwrap_or_else(|error| panic!("{error}"));
    group.bench_function("backbone + pca + head 224 b1 1 thread", |b| {
        b.iter(|| backend.infer(black_box(&input), 1))
    });
    group.finish();
}

fn classify_video(c: &mut Criterion) {
    let dir = bundle_224();
    let bundle = open(&dir);
    let video =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus/vid_h264_aac_160x90.mp4");
    let backend = model::open_backend(&bundle, &BackendOptions::tract(1))
        .unwrap_or_else(|error| panic!("{error}"));
    let mut classifier = Classifier::new(backend, &bundle, 5.0);
    let mut group = c.benchmark_group("classify");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.bench_function("vid_h264_aac_160x90.mp4 at 5 fps", |b| {
        b.iter(|| {
            let mut rows = 0;
            classifier.classify_path(&video, &mut |_| rows += 1);
            rows
        })
    });
    group.finish();
}

criterion_group!(benches, stages, classify_video);
criterion_main!(benches);
