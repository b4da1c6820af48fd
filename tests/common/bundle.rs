//! A synthetic bundle shared by the tests of one test binary, generated once.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use edgesight::model::{Bundle, SynthOptions, synth};

/// Input side of the test bundle: small, so that inference in tests stays fast.
pub const TEST_INPUT: u32 = 64;

/// The path of a seed-0 bundle at [`TEST_INPUT`], written on first use, one per test binary
/// so that binaries running at once never write the same directory. Bundles left by an
/// earlier run are reused when they still open.
pub fn test_bundle() -> &'static Path {
    static BUNDLE: OnceLock<PathBuf> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bundle-{TEST_INPUT}-{}", env!("CARGO_CRATE_NAME")));
        if Bundle::open(&dir).is_err() {
            let _ = std::fs::remove_dir_all(&dir);
            let options = SynthOptions { input_size: TEST_INPUT, ..SynthOptions::default() };
            if let Err(error) = synth::write_bundle(&dir, &options) {
                panic!("cannot write the test bundle to {}: {error}", dir.display());
            }
        }
        dir
    })
}

/// A file of the shared corpus that sits beside the repository.
pub fn corpus(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus").join(name);
    assert!(path.exists(), "corpus file {} is missing", path.display());
    path
}
