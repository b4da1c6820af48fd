//! Synthetic bundles for the model tests: one per (seed, input size) and test binary, scratch
//! directories, deterministic inputs and the error measure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use edgesight::model::{SynthOptions, synth};

/// The shared synthetic bundle for `seed` and `size`, written on first use in this binary.
pub fn synth_bundle(seed: u64, size: u32) -> PathBuf {
    static BUNDLES: OnceLock<Mutex<HashMap<(u64, u32), PathBuf>>> = OnceLock::new();
    let bundles = BUNDLES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut bundles = bundles.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    bundles
        .entry((seed, size))
        .or_insert_with(|| {
            let dir = std::env::temp_dir().join(format!("edgesight-test-bundle-s{seed}-{size}"));
            let options = SynthOptions { seed, input_size: size, ..SynthOptions::default() };
            let started = std::time::Instant::now();
            if let Err(error) = synth::write_bundle(&dir, &options) {
                panic!("cannot write the test bundle {}: {error}", dir.display());
            }
            eprintln!("synth bundle s{seed} {size}px: {:.2} s", started.elapsed().as_secs_f64());
            dir
        })
        .clone()
}

/// A fresh, empty directory for one test.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("edgesight-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(error) = std::fs::create_dir_all(&dir) {
        panic!("cannot create {}: {error}", dir.display());
    }
    dir
}

/// Copies a bundle as hard links (falling back to copies), so a test can damage one file.
pub fn link_copy(bundle: &Path, test: &str) -> PathBuf {
    let dir = scratch(test);
    let entries = std::fs::read_dir(bundle).unwrap_or_else(|e| panic!("{}: {e}", bundle.display()));
    for entry in entries.flatten() {
        let target = dir.join(entry.file_name());
        if std::fs::hard_link(entry.path(), &target).is_err() {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
        }
    }
    dir
}

/// `n` normalised-looking CHW frames, the same on every machine.
pub fn test_input(size: u32, n: usize) -> Vec<f32> {
    let frame = 3 * (size as usize).pow(2);
    (0..n * frame)
        .map(|i| {
            let x = (i % frame) as f32;
            let frame_index = (i / frame) as f32;
            ((x * 0.013 + frame_index).sin() * 1.5) + ((x * 0.0007).cos() * 0.5)
        })
        .collect()
}

/// max |a − b| / max |b|: the error relative to the reference's largest magnitude. Element-wise
/// relative error is meaningless for the many activations near zero, so we scale by the
/// tensor's range instead.
pub fn relative_error(actual: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(actual.len(), reference.len(), "tensor lengths differ");
    let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let diff = actual.iter().zip(reference).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}
