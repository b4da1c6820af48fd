//! `edgesight dataset import-idx`: MNIST-family IDX files (gzip or not) → an ImageFolder
//! (`DIR/<class>/<n>.png`), the layout `edgesight train` reads.
//!
//! IDX is a big-endian header — two zero bytes, a type byte (0x08 = unsigned byte) and the rank
//! — then one u32 per dimension and the data. Images are rank 3 `[n, rows, cols]`, labels rank 1
//! `[n]`. Fashion-MNIST (Debian's `dataset-fashion-mnist`, in
//! `/usr/share/datasets/fashion-mnist/`) is recognised by the checksum of its label files (or a
//! path naming it) and gets its ten class names; other files get the digit names `0`…`9`
//! unless `--names` says otherwise. Output goes to a temporary sibling directory renamed when
//! complete, so an interrupted import leaves nothing half-written under `DIR`.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Fashion-MNIST's classes, in label order.
pub const FASHION_MNIST_NAMES: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
];

/// sha256 of the labels (the data after the IDX header) of Fashion-MNIST's train and t10k sets.
const FASHION_MNIST_LABELS: [&str; 2] = [
    "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
    "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
];

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> DatasetError {
    DatasetError::File { path: path.to_path_buf(), reason: reason.to_string() }
}

/// One IDX array of unsigned bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads an IDX file, gunzipping it when it starts with the gzip magic.
pub fn read_idx(path: &Path) -> Result<Idx, DatasetError> {
    let raw = std::fs::read(path).map_err(|e| file_error(path, e))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| file_error(path, format!("not a readable gzip file: {e}")))?;
        out
    } else {
        raw
    };
    parse_idx(&bytes).map_err(|reason| file_error(path, reason))
}

/// Parses IDX bytes (unsigned-byte data only, which is what the MNIST family uses).
pub fn parse_idx(bytes: &[u8]) -> Result<Idx, String> {
    let [0, 0, kind, rank, ..] = *bytes else {
        return Err("not an IDX file (it must start with two zero bytes)".into());
    };
    if kind != 0x08 {
        return Err(format!("IDX data type 0x{kind:02x} is not unsigned bytes (0x08)"));
    }
    let header = 4 + 4 * rank as usize;
    if rank == 0 || bytes.len() < header {
        return Err(format!("IDX header of rank {rank} is truncated"));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let count = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    let Some(count) = count else {
        return Err(format!("IDX dimensions {dims:?} overflow"));
    };
    let data = &bytes[header..];
    if data.len() != count {
        return Err(format!(
            "IDX dimensions {dims:?} need {count} bytes of data, the file holds {}",
            data.len()
        ));
    }
    Ok(Idx { dims, data: data.to_vec() })
}

/// What `import_idx` was asked to do.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub images: PathBuf,
    pub labels: PathBuf,
    pub out: PathBuf,
    /// Class names in label order; `None`: Fashion-MNIST's when recognised, else digits.
    pub names: Option<Vec<String>>,
    /// Import only the first N images.
    pub limit: Option<usize>,
}

/// What an import wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportSummary {
    pub images: usize,
    /// (class name, images) in label order.
    pub per_class: Vec<(String, usize)>,
    pub fashion_mnist: bool,
}

/// Writes `out/<class>/<index>.png` for every image (8-bit grayscale PNG). `out` must not exist
/// or be empty; the import is written beside it and renamed at the end.
pub fn import_idx(options: &ImportOptions) -> Result<ImportSummary, DatasetError> {
    let images = read_idx(&options.images)?;
    let labels = read_idx(&options.labels)?;
    let [n, rows, cols] = images.dims[..] else {
        let reason = format!("images must be rank 3 [n, rows, cols], not {:?}", images.dims);
        return Err(file_error(&options.images, reason));
    };
    let [label_count] = labels.dims[..] else {
        let reason = format!("labels must be rank 1 [n], not {:?}", labels.dims);
        return Err(file_error(&options.labels, reason));
    };
    if label_count != n {
        return Err(DatasetError::Invalid(format!(
            "{} holds {n} images but {} holds {label_count} labels",
            options.images.display(),
            options.labels.display()
        )));
    }
    let fashion = is_fashion_mnist(&options.labels, &labels.data);
    let names: Vec<String> = match &options.names {
        Some(names) => names.clone(),
        None if fashion => FASHION_MNIST_NAMES.iter().map(|s| s.to_string()).collect(),
        None => (0..10).map(|d| d.to_string()).collect(),
    };
    check_names(&names)?;
    if let Some(max) = labels.data.iter().max()
        && *max as usize >= names.len()
    {
        return Err(file_error(
            &options.labels,
            format!("label {max} has no class name ({} names given)", names.len()),
        ));
    }
    if options.limit == Some(0) {
        return Err(DatasetError::Invalid("--limit 0 would import nothing".into()));
    }
    let take = options.limit.map_or(n, |limit| limit.min(n));

    let out = &options.out;
    if out.exists() && std::fs::read_dir(out).map_err(|e| file_error(out, e))?.next().is_some() {
        return Err(file_error(out, "exists and is not empty; choose a new directory"));
    }
    let partial = partial_dir(out);
    let _ = std::fs::remove_dir_all(&partial);
    let write = || -> Result<Vec<usize>, DatasetError> {
        for name in &names {
            let dir = partial.join(name);
            std::fs::create_dir_all(&dir).map_err(|e| file_error(&dir, e))?;
        }
        let mut counts = vec![0usize; names.len()];
        let pixels = rows * cols;
        for index in 0..take {
            let label = labels.data[index] as usize;
            let data = images.data[index * pixels..(index + 1) * pixels].to_vec();
            let image = image::GrayImage::from_raw(cols as u32, rows as u32, data)
                .ok_or_else(|| DatasetError::Invalid("image buffer size".into()))?;
            let path = partial.join(&names[label]).join(format!("{index:05}.png"));
            image.save(&path).map_err(|e| file_error(&path, e))?;
            counts[label] += 1;
        }
        Ok(counts)
    };
    let counts = match write() {
        Ok(counts) => counts,
        Err(error) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(error);
        }
    };
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| file_error(out, e))?;
    }
    std::fs::rename(&partial, out).map_err(|e| file_error(out, e))?;
    Ok(ImportSummary {
        images: take,
        per_class: names.into_iter().zip(counts).collect(),
        fashion_mnist: fashion && options.names.is_none(),
    })
}

/// `DIR` → `DIR.partial` beside it.
fn partial_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

fn is_fashion_mnist(path: &Path, labels: &[u8]) -> bool {
    let digest = hex::encode(Sha256::digest(labels));
    FASHION_MNIST_LABELS.contains(&digest.as_str())
        || path.to_string_lossy().to_lowercase().contains("fashion")
}

/// Class names become directory names: non-empty, unique, no path separators.
fn check_names(names: &[String]) -> Result<(), DatasetError> {
    let mut seen = std::collections::HashSet::new();
    for name in names {
        let bad = name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\']);
        if bad || !seen.insert(name) {
            return Err(DatasetError::Invalid(format!(
                "--names: {name:?} cannot be a class folder (empty, a path or repeated)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend(data);
        bytes
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn parses_headers_and_refuses_bad_ones() {
        let parsed = parse_idx(&idx(&[2, 2, 3], &[7; 12])).unwrap();
        assert_eq!((parsed.dims, parsed.data.len()), (vec![2, 2, 3], 12));
        assert!(parse_idx(b"\x89PNG").unwrap_err().contains("not an IDX file"));
        assert!(parse_idx(&[0, 0, 0x0d, 1, 0, 0, 0, 1, 0]).unwrap_err().contains("0x0d"));
        let short = parse_idx(&idx(&[3], &[1, 2])).unwrap_err();
        assert!(short.contains("need 3 bytes") && short.contains("holds 2"), "{short}");
    }

    #[test]
    fn writes_one_png_per_image_under_its_class_gzip_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let pixels: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 4) as u8).collect();
        let images = dir.path().join("images.gz");
        std::fs::write(&images, gzip(&idx(&[5, 4, 3], &pixels))).unwrap();
        let labels = dir.path().join("labels");
        std::fs::write(&labels, idx(&[5], &[1, 0, 1, 2, 1])).unwrap();
        let out = dir.path().join("folder");
        let options = ImportOptions {
            images,
            labels,
            out: out.clone(),
            names: Some(vec!["a".into(), "b".into(), "c".into()]),
            limit: Some(4),
        };
        let summary = import_idx(&options).unwrap();
        let per_class = vec![("a".to_string(), 1), ("b".to_string(), 2), ("c".to_string(), 1)];
        assert_eq!((summary.images, summary.per_class), (4, per_class));
        // Image 3 (label 2): rows of 3 pixels, values 4·(36..48).
        let image = image::open(out.join("c/00003.png")).unwrap().to_luma8();
        assert_eq!(image.dimensions(), (3, 4));
        assert_eq!(image.get_pixel(1, 0)[0], (37 * 4) as u8);
        assert!(!out.join("b/00004.png").exists(), "--limit 4 stops before image 4");
        assert!(!dir.path().join("folder.partial").exists());
        // A second import into the same, now full, directory is refused.
        let again = import_idx(&options).unwrap_err().to_string();
        assert!(again.contains("not empty") && again.contains("folder"), "{again}");
        let none = ImportOptions { limit: Some(0), out: dir.path().join("none"), ..options };
        let error = import_idx(&none).unwrap_err().to_string();
        assert!(error.contains("--limit 0"), "{error}");
    }

    #[test]
    fn mismatched_counts_and_labels_without_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        std::fs::write(&images, idx(&[2, 1, 1], &[0, 0])).unwrap();
        let labels = dir.path().join("labels");
        std::fs::write(&labels, idx(&[3], &[0, 0, 0])).unwrap();
        let out = dir.path().join("out");
        let mut options =
            ImportOptions { images, labels: labels.clone(), out, names: None, limit: None };
        let error = import_idx(&options).unwrap_err().to_string();
        assert!(error.contains("2 images but") && error.contains("3 labels"), "{error}");
        std::fs::write(&labels, idx(&[2], &[0, 11])).unwrap();
        options.labels = labels;
        let error = import_idx(&options).unwrap_err().to_string();
        assert!(error.contains("label 11 has no class name"), "{error}");
        assert!(!options.out.exists() && !dir.path().join("out.partial").exists());
    }

    #[test]
    fn class_names_must_be_folder_names() {
        for names in [vec!["a", "a"], vec!["a", "../x"], vec![""]] {
            let names: Vec<String> = names.into_iter().map(String::from).collect();
            assert!(check_names(&names).is_err(), "{names:?}");
        }
        assert!(check_names(&["t-shirt".to_string(), "bag".to_string()]).is_ok());
    }

    #[test]
    fn debian_fashion_mnist_is_recognised_when_installed() {
        let labels = Path::new("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz");
        if !labels.exists() {
            eprintln!("dataset-fashion-mnist is not installed; recognition by checksum skipped");
            return;
        }
        let idx = read_idx(labels).unwrap();
        assert_eq!(idx.dims, [10_000]);
        // Recognised by content, whatever the file is called.
        assert!(is_fashion_mnist(Path::new("/tmp/l.idx"), &idx.data));
        assert!(!is_fashion_mnist(Path::new("/tmp/l.idx"), &idx.data[1..]));
    }
}
