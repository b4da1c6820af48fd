//! The bundle on disk: `manifest.toml`, the checksums of its files, and the checks that run
//! before any model is loaded.
//!
//! A bundle is copied from a training workstation to many boxes, so `Bundle::open` assumes the
//! copy may be incomplete or damaged and says exactly what is wrong and with which file: a
//! missing file, a checksum mismatch, an unknown or mistyped manifest key, or shapes that do not
//! agree with `k` and the labels. The identity checksum is computed from the manifest's list of
//! file checksums (not from the manifest text), so reformatting the manifest or editing its
//! metrics does not change the identity that every MQTT payload carries.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::pca::Pca;
use super::{Bundle, FEATURE_CHANNELS, ModelError, ModelIdentity};

pub const MANIFEST: &str = "manifest.toml";
pub const BACKBONE: &str = "backbone.onnx";
pub const PCA: &str = "pca.safetensors";
pub const HEAD: &str = "head.onnx";
pub const HEAD_WEIGHTS: &str = "head.safetensors";
/// Files every bundle lists; `head.safetensors` (torch) and `report.json` are optional.
const REQUIRED: [&str; 3] = [BACKBONE, PCA, HEAD];

/// `manifest.toml`, as written by `edgesight model synth` and the training mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// RFC 3339 time the bundle was made.
    pub created: String,
    /// Side of the square input in pixels; a multiple of 32.
    pub input_size: u32,
    /// Per-channel RGB normalisation applied before the backbone.
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// One label per head output, in output order.
    pub labels: Vec<String>,
    /// Number of PCA components (the head's input channels).
    pub k: usize,
    /// Fraction of the feature variance the k components keep (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explained_variance: Option<f32>,
    /// Tensor of `backbone.onnx` to cut at, when the automatic rule does not find it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone_output: Option<String>,
    /// File name → sha256 (lower-case hex) of every file of the bundle.
    pub files: BTreeMap<String, String>,
    /// Training metrics (free-form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<toml::Table>,
}

impl Manifest {
    /// Parses manifest text; errors name the file and the key.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, ModelError> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| text[..span.start.min(text.len())].lines().count());
            let reason = match line {
                Some(line) => format!("line {}: {}", line.max(1), e.message()),
                None => e.message().to_string(),
            };
            ModelError::bundle(path, reason)
        })?;
        let problems = manifest.problems();
        if !problems.is_empty() {
            return Err(ModelError::bundle(path, problems.join("; ")));
        }
        Ok(manifest)
    }

    /// Every inconsistency of the manifest on its own, so that all are reported at once.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.input_size < 32 || !self.input_size.is_multiple_of(32) {
            problems.push(format!("input_size = {} is not a multiple of 32", self.input_size));
        }
        if self.labels.is_empty() {
            problems.push("labels is empty".to_string());
        }
        let mut seen = HashSet::new();
        for label in &self.labels {
            if !seen.insert(label) {
                problems.push(format!("label `{label}` appears twice"));
            }
        }
        if self.k == 0 || self.k > FEATURE_CHANNELS {
            problems.push(format!("k = {} is outside 1..={FEATURE_CHANNELS}", self.k));
        }
        if let Some(i) = self.std.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            problems.push(format!("std[{i}] = {} must be positive", self.std[i]));
        }
        for required in REQUIRED {
            if !self.files.contains_key(required) {
                problems.push(format!("files has no entry for `{required}`"));
            }
        }
        for (name, sum) in &self.files {
            if name.contains(['/', '\\']) || name.starts_with('.') {
                problems.push(format!("files entry `{name}` is not a plain file name"));
            }
            if sum.len() != 64 || !sum.bytes().all(|b| b.is_ascii_hexdigit()) {
                problems.push(format!("files.`{name}` = `{sum}` is not a sha256 hex digest"));
            }
        }
        problems
    }

    pub fn to_toml(&self) -> Result<String, ModelError> {
        toml::to_string(self)
            .map_err(|e| ModelError::bundle(Path::new(MANIFEST), format!("cannot encode: {e}")))
    }

    /// sha256 over the sorted `name  checksum` lines of the file list.
    pub fn identity_checksum(&self) -> String {
        let mut hasher = Sha256::new();
        for (name, sum) in &self.files {
            hasher.update(format!("{}  {name}\n", sum.to_ascii_lowercase()));
        }
        hex::encode(hasher.finalize())
    }
}

/// sha256 of a file, lower-case hex; errors name the file.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::bundle(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(|e| ModelError::bundle(path, e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

impl Bundle {
    /// Reads `dir/manifest.toml`, checks that every listed file exists with the listed sha256,
    /// and that the PCA and head shapes agree with `k` and the labels. Reads every file once
    /// (about 100 MB for a ResNet-50 bundle); the backbone graph itself is checked when a
    /// backend loads it.
    pub fn open(dir: &Path) -> Result<Bundle, ModelError> {
        let manifest_path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| ModelError::bundle(&manifest_path, e))?;
        let manifest = Manifest::parse(&text, &manifest_path)?;

        for (name, expected) in &manifest.files {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(ModelError::bundle(&path, "missing (listed in manifest.toml)"));
            }
            let actual = sha256_file(&path)?;
            if !actual.eq_ignore_ascii_case(expected) {
                let reason = format!(
                    "checksum mismatch: manifest.toml says sha256 {expected}, the file has \
                     {actual} (damaged or incomplete copy?)"
                );
                return Err(ModelError::bundle(&path, reason));
            }
        }

        Pca::read(&dir.join(PCA), FEATURE_CHANNELS, manifest.k)?;
        #[cfg(feature = "tract")]
        {
            let head_path = dir.join(HEAD);
            let head = super::onnx::read_model(&head_path)?;
            super::head::check_head(&head, &head_path, manifest.k, manifest.labels.len())?;
        }

        Ok(Bundle {
            dir: dir.to_path_buf(),
            identity: ModelIdentity {
                name: manifest.name.clone(),
                version: manifest.version.clone(),
                checksum: manifest.identity_checksum(),
            },
            labels: manifest.labels.clone(),
            input_size: manifest.input_size,
            mean: manifest.mean,
            std: manifest.std,
            components: manifest.k,
            manifest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let digest = "ab".repeat(32);
        Manifest {
            name: "m".into(),
            version: "1".into(),
            created: "2025-01-01T00:00:00Z".into(),
            input_size: 64,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            labels: vec!["a".into(), "b".into()],
            k: 8,
            explained_variance: Some(0.9),
            backbone_output: None,
            files: REQUIRED.iter().map(|f| (f.to_string(), digest.clone())).collect(),
            metrics: None,
        }
    }

    #[test]
    fn manifest_round_trips_through_toml() {
        let original = manifest();
        let text = original.to_toml().unwrap_or_default();
        let parsed = Manifest::parse(&text, Path::new(MANIFEST)).map_err(|e| e.to_string());
        assert_eq!(parsed, Ok(original));
    }

    #[test]
    fn unknown_key_is_named() {
        let text = manifest().to_toml().unwrap_or_default().replace("k = 8", "kk = 8");
        let error = Manifest::parse(&text, Path::new("b/manifest.toml")).err();
        let message = error.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("b/manifest.toml") && message.contains("kk"), "{message}");
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let mut bad = manifest();
        bad.input_size = 100;
        bad.labels = vec!["x".into(), "x".into()];
        bad.files.remove(HEAD);
        let text = bad.to_toml().unwrap_or_default();
        let message = Manifest::parse(&text, Path::new(MANIFEST))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        for needle in ["input_size", "`x` appears twice", "head.onnx"] {
            assert!(message.contains(needle), "{needle} missing from {message}");
        }
    }

    #[test]
    fn identity_checksum_depends_only_on_file_checksums() {
        let a = manifest();
        let mut b = manifest();
        b.metrics = Some(toml::Table::new());
        b.version = "2".into();
        assert_eq!(a.identity_checksum(), b.identity_checksum());
        b.files.insert(HEAD.into(), "cd".repeat(32));
        assert_ne!(a.identity_checksum(), b.identity_checksum());
    }

    #[test]
    fn checksum_mismatch_is_detected_and_names_the_file() {
        let dir = std::env::temp_dir().join(format!("edgesight-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let mut m = manifest();
        for name in REQUIRED {
            std::fs::write(dir.join(name), name.as_bytes()).ok();
        }
        m.files = REQUIRED
            .iter()
            .map(|n| (n.to_string(), sha256_file(&dir.join(n)).unwrap_or_default()))
            .collect();
        std::fs::write(dir.join(HEAD), b"tampered").ok();
        std::fs::write(dir.join(MANIFEST), m.to_toml().unwrap_or_default()).ok();
        let message = Bundle::open(&dir).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("head.onnx") && message.contains("checksum mismatch"),
            "{message}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
