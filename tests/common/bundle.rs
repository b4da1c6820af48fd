//! The bundle and media files the daemon and classify tests run on.

use std::path::{Path, PathBuf};

/// Input side of the test bundle: small, so that inference in tests stays fast.
pub const TEST_INPUT: u32 = 64;

/// The seed-0 synthetic bundle at [`TEST_INPUT`], written once per test binary.
pub fn test_bundle() -> PathBuf {
    super::model::synth_bundle(0, TEST_INPUT)
}

/// A file of the shared corpus that sits beside the repository.
pub fn corpus(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus").join(name);
    assert!(path.exists(), "corpus file {} is missing", path.display());
    path
}
