//! The bundle and media files the daemon and classify tests run on.

use std::path::{Path, PathBuf};

/// Input side of the test bundle: small, so that inference in tests stays fast.
pub const TEST_INPUT: u32 = 64;

/// The seed-0 synthetic bundle at [`TEST_INPUT`], written once per test binary.
pub fn test_bundle() -> PathBuf {
    super::model::synth_bundle(0, TEST_INPUT)
}

/// The shared media corpus (`FILES.md` says what each file exercises): `$EDGESIGHT_CORPUS`
/// when set, else `shared/corpus` beside the repository, where the project keeps it.
pub fn corpus_dir() -> PathBuf {
    let dir = match std::env::var_os("EDGESIGHT_CORPUS").filter(|dir| !dir.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus"),
    };
    assert!(
        dir.is_dir(),
        "the media corpus is not at {}; point EDGESIGHT_CORPUS at the shared corpus directory",
        dir.display()
    );
    dir
}

/// A file of the shared corpus.
pub fn corpus(name: &str) -> PathBuf {
    let path = corpus_dir().join(name);
    assert!(path.exists(), "corpus file {} is missing", path.display());
    path
}

/// Every image and video of the corpus (`img_*`, `vid_*`), sorted by name.
pub fn media_files() -> Vec<PathBuf> {
    let dir = corpus_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            name.starts_with("img_") || name.starts_with("vid_")
        })
        .collect();
    files.sort();
    files
}
