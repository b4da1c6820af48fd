//! What the benchmarks share: the 224-px synthetic bundle they measure.

use std::path::PathBuf;

use edgesight::model::{self, Bundle, SynthOptions};

/// The seed-0 synthetic bundle at 224 px, written once under the target directory.
pub fn bundle_224() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-bundle-224");
    if Bundle::open(&dir).is_err() {
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(error) = model::synth::write_bundle(&dir, &SynthOptions::default()) {
            panic!("cannot write the benchmark bundle {}: {error}", dir.display());
        }
    }
    dir
}
