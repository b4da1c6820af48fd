//! An ImageFolder (one subfolder per class, images inside) read into a list of labelled files,
//! and the seeded, stratified split into training and validation sets.
//!
//! Classes are the subfolders in name order, so the same folder always gives the same label
//! numbers. Files are taken by extension (the image formats the daemon decodes); anything else
//! is skipped and counted, hidden entries are ignored. Whether a file really decodes is found
//! out later, when features are extracted, where unreadable images are skipped and named.

use std::path::{Path, PathBuf};

use crate::model::prng::Rng;

/// Extensions taken as images (lower case).
pub const IMAGE_EXTENSIONS: [&str; 11] =
    ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "pnm", "ppm", "pgm"];

#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error("{path}: {reason}")]
    Folder { path: PathBuf, reason: String },
}

fn folder_error(path: &Path, reason: impl std::fmt::Display) -> FolderError {
    FolderError::Folder { path: path.to_path_buf(), reason: reason.to_string() }
}

/// A labelled image file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
}

/// The classes and samples of a folder.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    /// Class names (subfolder names), in label order.
    pub classes: Vec<String>,
    pub samples: Vec<Sample>,
    /// Files that are not images by their extension.
    pub skipped: usize,
}

impl ImageFolder {
    /// Reads `root`: at least two classes, each with at least one image.
    pub fn read(root: &Path) -> Result<ImageFolder, FolderError> {
        let entries = std::fs::read_dir(root).map_err(|e| folder_error(root, e))?;
        let mut classes = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            // `is_dir` on the path follows symbolic links: a linked class folder counts.
            if !entry.path().is_dir() {
                continue;
            }
            let Ok(name) = entry.file_name().into_string() else {
                let path = entry.path();
                return Err(folder_error(&path, "the class folder's name is not UTF-8; rename it"));
            };
            if !name.starts_with('.') {
                classes.push(name);
            }
        }
        classes.sort();
        if classes.len() < 2 {
            return Err(folder_error(
                root,
                format!(
                    "{} class folder(s); a training folder holds one subfolder per class, at \
                     least two",
                    classes.len()
                ),
            ));
        }
        let mut samples = Vec::new();
        let mut skipped = 0;
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| folder_error(&dir, e))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
                .filter(|p| !p.is_dir())
                .collect();
            files.sort();
            let before = samples.len();
            for path in files {
                // A dangling link is not an image: counted with the skipped files.
                if is_image(&path) && path.is_file() {
                    samples.push(Sample { path, label });
                } else {
                    skipped += 1;
                }
            }
            if samples.len() == before {
                return Err(folder_error(&dir, "the class has no images"));
            }
        }
        Ok(ImageFolder { root: root.to_path_buf(), classes, samples, skipped })
    }

    /// Images per class, in label order.
    pub fn counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for sample in &self.samples {
            counts[sample.label] += 1;
        }
        counts
    }

    /// Splits into (train, validation): in every class, a seeded shuffle and then
    /// `round(fraction · count)` images to validation — at least one, and at least one left for
    /// training. A class with a single image cannot be split and is an error naming it.
    pub fn split(
        &self,
        fraction: f64,
        seed: u64,
    ) -> Result<(Vec<Sample>, Vec<Sample>), FolderError> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(folder_error(
                &self.root,
                format!("validation split {fraction} is not in (0, 1)"),
            ));
        }
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (label, class) in self.classes.iter().enumerate() {
            let mut members: Vec<&Sample> =
                self.samples.iter().filter(|s| s.label == label).collect();
            if members.len() < 2 {
                return Err(folder_error(
                    &self.root.join(class),
                    "one image cannot be split into training and validation; add images to this \
                     class or remove it",
                ));
            }
            let mut rng = Rng::derive(seed, class);
            for i in (1..members.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                members.swap(i, j);
            }
            let count =
                ((fraction * members.len() as f64).round() as usize).clamp(1, members.len() - 1);
            val.extend(members[..count].iter().map(|s| (*s).clone()));
            train.extend(members[count..].iter().map(|s| (*s).clone()));
        }
        Ok((train, val))
    }
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(layout: &[(&str, &[&str])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (class, files) in layout {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            for file in *files {
                std::fs::write(dir.path().join(class).join(file), b"x").unwrap();
            }
        }
        dir
    }

    #[test]
    fn classes_in_name_order_images_by_extension() {
        let dir = folder(&[
            ("dog", &["b.PNG", "a.jpg", "notes.txt", ".hidden.jpg"]),
            ("cat", &["1.webp"]),
            (".git", &["x.png"]),
        ]);
        let read = ImageFolder::read(dir.path()).unwrap();
        assert_eq!(read.classes, ["cat", "dog"]);
        let names: Vec<String> = read
            .samples
            .iter()
            .map(|s| format!("{}:{}", s.label, s.path.file_name().unwrap().to_string_lossy()))
            .collect();
        assert_eq!(names, ["0:1.webp", "1:a.jpg", "1:b.PNG"]);
        assert_eq!((read.skipped, read.counts()), (1, vec![1, 2]));
    }

    #[test]
    fn linked_class_folders_count_and_dangling_links_are_skipped() {
        let dir = folder(&[("a", &["1.png"]), ("elsewhere", &["2.png"])]);
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join("b")).unwrap();
        std::os::unix::fs::symlink("/nonexistent.png", dir.path().join("a/gone.png")).unwrap();
        let read = ImageFolder::read(dir.path()).unwrap();
        assert_eq!(read.classes, ["a", "b", "elsewhere"]);
        assert_eq!((read.skipped, read.counts()), (1, vec![1, 1, 1]));
    }

    #[test]
    fn empty_folders_and_empty_classes_are_named() {
        let empty = tempfile::tempdir().unwrap();
        let error = ImageFolder::read(empty.path()).unwrap_err().to_string();
        assert!(error.contains("0 class folder(s)"), "{error}");
        let dir = folder(&[("a", &["1.png"]), ("b", &["readme.md"])]);
        let error = ImageFolder::read(dir.path()).unwrap_err().to_string();
        assert!(error.contains("/b: the class has no images"), "{error}");
    }

    #[test]
    fn split_is_stratified_seeded_and_refuses_a_single_image_class() {
        let many: Vec<String> = (0..10).map(|i| format!("{i}.png")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let dir = folder(&[("a", &many), ("b", &many[..4])]);
        let read = ImageFolder::read(dir.path()).unwrap();
        let (train, val) = read.split(0.2, 7).unwrap();
        let count = |set: &[Sample], label| set.iter().filter(|s| s.label == label).count();
        assert_eq!((count(&val, 0), count(&val, 1)), (2, 1));
        assert_eq!((count(&train, 0), count(&train, 1)), (8, 3));
        assert_eq!(read.split(0.2, 7).unwrap().1, val, "same seed, same split");
        let other: Vec<_> = (0..20).map(|seed| read.split(0.2, seed).unwrap().1).collect();
        assert!(other.iter().any(|v| *v != val), "the seed changes the split");

        let single = folder(&[("a", &["1.png", "2.png"]), ("lonely", &["1.png"])]);
        let read = ImageFolder::read(single.path()).unwrap();
        let error = read.split(0.2, 0).unwrap_err().to_string();
        assert!(error.contains("lonely") && error.contains("one image"), "{error}");
    }
}
