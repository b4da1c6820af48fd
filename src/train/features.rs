//! Backbone feature maps for training: decode, apply a condition, preprocess, run the trunk on
//! tch, and keep every map in an on-disk cache so that a second run skips extraction.
//!
//! The cache is one file per trunk (`<key>.features`, the key a sha256 of the backbone file's
//! checksum, the input size and the normalisation): a header with the map shape, then
//! fixed-size records of a 32-byte record key, the `[2048,h,w]` map in little-endian f32 and a
//! CRC-32 of the map, checked on every read. A record key is a sha256 of the image file's bytes,
//! the condition and, for a condition other than clean, the seed it was drawn with, so renaming
//! or moving images keeps their records and editing an image makes a new one. Records are
//! appended after each batch; a run stopped in the middle of a write leaves a torn last record,
//! which the next open cuts off. The file is locked from extraction until the maps are projected
//! (before head training), so two runs never interleave their writes.
//!
//! Decoding and preprocessing run on `threads` threads per batch; unreadable images are not
//! fatal: they are returned with the decoder's reason, so the caller can skip, count and name
//! them.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use image::imageops::FilterType;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::TrainError;
use super::conditions::Condition;
use crate::model::FEATURE_CHANNELS;
use crate::model::TractBackbone;
use crate::model::torch_backend::TorchTrunk;
use crate::preprocess::{Frame, Preprocess, load_image};

const MAGIC: &[u8; 8] = b"ESFEAT02";
/// Magic, then the map shape as three little-endian u32.
const HEADER: u64 = 8 + 12;

/// A record key: which image, under which condition.
pub type RecordKey = [u8; 32];

/// The on-disk store of feature maps of one trunk.
pub struct FeatureCache {
    path: PathBuf,
    file: File,
    /// Values per map (`2048·h·w`).
    values: usize,
    shape: [usize; 3],
    index: HashMap<RecordKey, u64>,
    records: u64,
}

impl FeatureCache {
    /// Opens (or creates) the cache of the trunk `trunk_key` in `dir` for maps of `shape`.
    pub fn open(
        dir: &Path,
        trunk_key: &str,
        shape: [usize; 3],
    ) -> Result<FeatureCache, TrainError> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::file(dir, e))?;
        let path = dir.join(format!("{trunk_key}.features"));
        let fail = |e: std::io::Error| TrainError::file(&path, e);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(fail)?;
        if file.try_lock().is_err() {
            return Err(TrainError::file(
                &path,
                "another training run is using this feature cache; wait for it or pass --cache \
                 with another directory",
            ));
        }
        let values = shape.iter().product::<usize>();
        let mut cache = FeatureCache {
            path: path.clone(),
            file,
            values,
            shape,
            index: HashMap::new(),
            records: 0,
        };
        cache.load_index()?;
        Ok(cache)
    }

    /// Key, map, CRC-32 of the map's bytes.
    fn record_bytes(&self) -> u64 {
        32 + 4 * self.values as u64 + 4
    }

    /// Reads the header and the record keys; starts afresh when the header is not ours, and cuts
    /// a torn last record.
    fn load_index(&mut self) -> Result<(), TrainError> {
        let fail = |e: std::io::Error| TrainError::file(&self.path, e);
        let length = self.file.metadata().map_err(fail)?.len();
        let mut header = vec![0u8; HEADER as usize];
        header[..8].copy_from_slice(MAGIC);
        for (i, dim) in self.shape.iter().enumerate() {
            header[8 + 4 * i..12 + 4 * i].copy_from_slice(&(*dim as u32).to_le_bytes());
        }
        let mut found = vec![0u8; HEADER as usize];
        let ours = length >= HEADER && self.file.read_exact_at(&mut found, 0).is_ok();
        if !ours || found != header {
            if length > 0 {
                tracing::warn!(
                    cache = %self.path.display(),
                    bytes = length,
                    "the feature cache has another format or map shape, or a damaged header; \
                     its maps are dropped and extracted again"
                );
            }
            self.file.set_len(0).map_err(fail)?;
            self.file.write_all_at(&header, 0).map_err(fail)?;
            return Ok(());
        }
        let record = self.record_bytes();
        let records = (length - HEADER) / record;
        if HEADER + records * record != length {
            tracing::info!(
                cache = %self.path.display(),
                "cutting a torn last record (a run stopped while writing)"
            );
            self.file.set_len(HEADER + records * record).map_err(fail)?;
        }
        let mut key = [0u8; 32];
        for at in 0..records {
            self.file.read_exact_at(&mut key, HEADER + at * record).map_err(fail)?;
            self.index.insert(key, at);
        }
        self.records = records;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn contains(&self, key: &RecordKey) -> bool {
        self.index.contains_key(key)
    }

    /// Appends a map unless its key is already there.
    fn put(&mut self, key: RecordKey, map: &[f32]) -> Result<(), TrainError> {
        if self.index.contains_key(&key) || map.len() != self.values {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(self.record_bytes() as usize);
        bytes.extend_from_slice(&key);
        for value in map {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        let crc = crc32fast::hash(&bytes[32..]);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let at = HEADER + self.records * self.record_bytes();
        self.file.write_all_at(&bytes, at).map_err(|e| TrainError::file(&self.path, e))?;
        self.index.insert(key, self.records);
        self.records += 1;
        Ok(())
    }

    /// The maps of `keys` as one `[n,2048,h,w]` f32 tensor on the CPU.
    pub fn read(&self, keys: &[RecordKey]) -> Result<Tensor, TrainError> {
        let mut values = vec![0f32; keys.len() * self.values];
        let mut bytes = vec![0u8; 4 * self.values + 4];
        for (key, out) in keys.iter().zip(values.chunks_exact_mut(self.values)) {
            let at = *self.index.get(key).ok_or_else(|| {
                TrainError::file(&self.path, "a record the run wrote is missing (cache damaged?)")
            })?;
            let offset = HEADER + at * self.record_bytes() + 32;
            self.file
                .read_exact_at(&mut bytes, offset)
                .map_err(|e| TrainError::file(&self.path, e))?;
            let (map, crc) = bytes.split_at(4 * self.values);
            if crc32fast::hash(map).to_le_bytes() != crc {
                return Err(TrainError::file(
                    &self.path,
                    format!(
                        "record {at} is damaged (checksum mismatch); delete this file and the \
                         next run extracts the maps again"
                    ),
                ));
            }
            for (value, chunk) in out.iter_mut().zip(map.chunks_exact(4)) {
                *value = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
        }
        let [c, h, w] = self.shape.map(|d| d as i64);
        Ok(Tensor::from_slice(&values).reshape([keys.len() as i64, c, h, w]))
    }
}

/// The cache key of a trunk: its file's checksum, the input size and the normalisation.
pub fn trunk_key(backbone_sha256: &str, preprocess: &Preprocess) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"edgesight-features-v1\n");
    hasher.update(backbone_sha256.as_bytes());
    hasher.update(format!("\n{} {:?} {:?}\n", preprocess.size, preprocess.mean, preprocess.std));
    hex::encode(&hasher.finalize()[..16])
}

/// One image to extract, under one condition.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: PathBuf,
    pub condition: Condition,
}

/// What extraction made of a request: the record key of its map, or why the image could not
/// be used.
pub type Extracted = Result<RecordKey, String>;

/// The trunk that makes the feature maps: libtorch, or tract for a graph libtorch's reader
/// does not take (an operator outside ResNet-50's Conv, BatchNormalization, Relu, MaxPool, Add).
pub enum Trunk {
    Torch(TorchTrunk),
    Tract(Box<TractBackbone>),
}

impl Trunk {
    /// `[n,2048,h,w]` f32 on the CPU for `n` preprocessed frames.
    pub fn forward(&mut self, input: &[f32], n: usize, size: u32) -> Result<Tensor, TrainError> {
        let s = i64::from(size);
        match self {
            Trunk::Torch(trunk) => {
                let batch = Tensor::from_slice(input).f_reshape([n as i64, 3, s, s])?;
                let maps = trunk.forward(&batch)?;
                Ok(maps.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?)
            }
            Trunk::Tract(trunk) => {
                let h = trunk.feature_size() as i64;
                let maps = trunk.features(input, n)?;
                Ok(Tensor::from_slice(&maps).f_reshape([
                    n as i64,
                    FEATURE_CHANNELS as i64,
                    h,
                    h,
                ])?)
            }
        }
    }

    pub fn library(&self) -> &'static str {
        match self {
            Trunk::Torch(_) => "libtorch",
            Trunk::Tract(_) => "tract",
        }
    }
}

/// Runs the trunk over images and fills the cache.
pub struct Extractor<'a> {
    pub trunk: &'a mut Trunk,
    pub preprocess: Preprocess,
    /// Images per forward pass.
    pub batch: usize,
    /// Decoding threads.
    pub threads: usize,
    /// The seed of the conditions' random draws.
    pub seed: u64,
}

impl Extractor<'_> {
    /// Makes sure the cache holds a map for every request that decodes; returns, per request,
    /// its record key or the reason it failed. `progress` is called with the requests done so
    /// far; a raised `stop` ends the work between batches.
    pub fn extract(
        &mut self,
        cache: &mut FeatureCache,
        requests: &[Request],
        stop: &AtomicBool,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<Extracted>, TrainError> {
        let mut out = Vec::with_capacity(requests.len());
        let mut hits = 0;
        for chunk in requests.chunks(self.batch.max(1)) {
            if stop.load(Ordering::Relaxed) {
                return Err(TrainError::Interrupted);
            }
            let prepared = self.prepare(chunk, cache);
            let mut misses = Vec::new();
            let mut inputs = Vec::new();
            for outcome in &prepared {
                match outcome {
                    Prepared::Hit(_) => hits += 1,
                    Prepared::Miss(key, tensor) => {
                        misses.push(*key);
                        inputs.extend_from_slice(tensor);
                    }
                    Prepared::Bad(_) => {}
                }
            }
            if !misses.is_empty() {
                let maps = self.trunk.forward(&inputs, misses.len(), self.preprocess.size)?;
                check_shape(&maps, cache.shape)?;
                let count = maps.numel();
                let mut values = vec![0f32; count];
                maps.f_copy_data(&mut values, count).map_err(TrainError::Torch)?;
                for (key, map) in misses.iter().zip(values.chunks_exact(count / misses.len())) {
                    cache.put(*key, map)?;
                }
            }
            out.extend(prepared.into_iter().map(|outcome| match outcome {
                Prepared::Hit(key) | Prepared::Miss(key, _) => Ok(key),
                Prepared::Bad(reason) => Err(reason),
            }));
            progress(out.len(), hits);
        }
        Ok(out)
    }

    fn prepare(&self, chunk: &[Request], cache: &FeatureCache) -> Vec<Prepared> {
        prepare_chunk(chunk, self.preprocess, self.seed, self.threads, Some(cache))
    }
}

/// Reads, hashes and (for keys the cache lacks) decodes and preprocesses a batch, spread over
/// `threads` threads.
fn prepare_chunk(
    chunk: &[Request],
    preprocess: Preprocess,
    seed: u64,
    threads: usize,
    cache: Option<&FeatureCache>,
) -> Vec<Prepared> {
    let threads = threads.clamp(1, chunk.len().max(1));
    let per_thread = chunk.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunk
            .chunks(per_thread.max(1))
            .map(|part| {
                let handle = scope.spawn(move || -> Vec<Prepared> {
                    part.iter()
                        .map(|request| prepare_one(preprocess, seed, request, cache))
                        .collect()
                });
                (part.len(), handle)
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(count, handle)| {
                handle.join().unwrap_or_else(|_| {
                    (0..count).map(|_| Prepared::Bad("the decoder panicked".to_string())).collect()
                })
            })
            .collect::<Vec<_>>()
    })
}

/// Reads and hashes one image; decodes, conditions and preprocesses it when the cache lacks it.
fn prepare_one(
    preprocess: Preprocess,
    seed: u64,
    request: &Request,
    cache: Option<&FeatureCache>,
) -> Prepared {
    let bytes = match std::fs::read(&request.path) {
        Ok(bytes) => bytes,
        Err(error) => return Prepared::Bad(error.to_string()),
    };
    let key = record_key(&bytes, request.condition, seed);
    if cache.is_some_and(|cache| cache.contains(&key)) {
        return Prepared::Hit(key);
    }
    let frame = match load_image(&request.path) {
        Ok(frame) => frame,
        Err(crate::preprocess::PreprocessError::Decode { reason, .. }) => {
            return Prepared::Bad(reason);
        }
        Err(error) => return Prepared::Bad(error.to_string()),
    };
    let frame = apply_condition(frame, request.condition, seed, &key, &preprocess);
    let size = preprocess.size as usize;
    let mut tensor = vec![0f32; 3 * size * size];
    match preprocess.try_write_tensor(&frame, &mut tensor) {
        Ok(()) => Prepared::Miss(key, tensor),
        Err(error) => Prepared::Bad(error.to_string()),
    }
}

/// Decodes, conditions and preprocesses images without running the trunk (the input of trunk
/// training): a `[n,3,S,S]` half-precision tensor on the CPU of the images that decoded, and
/// per request whether it did (with the reason when not).
pub fn load_images(
    requests: &[Request],
    preprocess: Preprocess,
    seed: u64,
    threads: usize,
    stop: &AtomicBool,
    mut progress: impl FnMut(usize),
) -> Result<(Tensor, Vec<Extracted>), TrainError> {
    let size = i64::from(preprocess.size);
    let mut parts = Vec::new();
    let mut outcomes = Vec::with_capacity(requests.len());
    for chunk in requests.chunks(256) {
        if stop.load(Ordering::Relaxed) {
            return Err(TrainError::Interrupted);
        }
        let mut values = Vec::new();
        let mut count = 0;
        for prepared in prepare_chunk(chunk, preprocess, seed, threads, None) {
            match prepared {
                Prepared::Miss(key, tensor) => {
                    values.extend_from_slice(&tensor);
                    count += 1;
                    outcomes.push(Ok(key));
                }
                Prepared::Hit(key) => outcomes.push(Ok(key)),
                Prepared::Bad(reason) => outcomes.push(Err(reason)),
            }
        }
        if count > 0 {
            let part = Tensor::from_slice(&values).f_reshape([count, 3, size, size])?;
            parts.push(part.f_to_kind(Kind::Half)?);
        }
        progress(outcomes.len());
    }
    let images = if parts.is_empty() {
        Tensor::zeros([0, 3, size, size], (Kind::Half, Device::Cpu))
    } else {
        Tensor::f_cat(&parts, 0)?
    };
    Ok((images, outcomes))
}

enum Prepared {
    Hit(RecordKey),
    Miss(RecordKey, Vec<f32>),
    Bad(String),
}

/// sha256 of the image bytes, the condition and (unless clean) the seed.
fn record_key(bytes: &[u8], condition: Condition, seed: u64) -> RecordKey {
    let mut hasher = Sha256::new();
    hasher.update(Sha256::digest(bytes));
    hasher.update(condition.name().as_bytes());
    if condition != Condition::Clean {
        hasher.update(seed.to_le_bytes());
    }
    hasher.finalize().into()
}

/// The frame under `condition`; the draws follow the seed and the image (its record key), not
/// its position in the dataset, so a cached map stays valid when the split changes.
///
/// A frame whose shorter side is over twice the preprocessing's resize side is first scaled
/// down to that (a conditions' cost grows with the pixels, a motion blur's with their width
/// too, and the trunk sees the resize side anyway); the conditions scale with the frame.
fn apply_condition(
    frame: Frame,
    condition: Condition,
    seed: u64,
    key: &RecordKey,
    preprocess: &Preprocess,
) -> Frame {
    if condition == Condition::Clean {
        return frame;
    }
    let Some(mut image) = image::RgbImage::from_raw(frame.width, frame.height, frame.data) else {
        unreachable!("load_image returns tight RGB8 rows");
    };
    let limit = 2 * preprocess.resize_side();
    let short = u64::from(image.width().min(image.height()));
    if short > limit {
        let scale = |side: u32| ((u64::from(side) * limit).div_ceil(short)).max(1) as u32;
        let (width, height) = (scale(image.width()), scale(image.height()));
        image = image::imageops::resize(&image, width, height, FilterType::Triangle);
    }
    let id = u64::from_le_bytes([key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7]]);
    let out = condition.apply(&image, seed, id);
    Frame { width: out.width(), height: out.height(), data: out.into_raw() }
}

fn check_shape(maps: &Tensor, shape: [usize; 3]) -> Result<(), TrainError> {
    let size = maps.size();
    let expected: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    if size.len() != 4 || size[1..] != expected[..] || size[1] != FEATURE_CHANNELS as i64 {
        return Err(TrainError::Invalid(format!(
            "the trunk gave feature maps of shape {size:?}, expected [N,{}]",
            shape.map(|d| d.to_string()).join(",")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let shape = [FEATURE_CHANNELS, 1, 1];
        let map_a: Vec<f32> = (0..FEATURE_CHANNELS).map(|i| i as f32).collect();
        let map_b: Vec<f32> = (0..FEATURE_CHANNELS).map(|i| -(i as f32)).collect();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let path = {
            let mut cache = FeatureCache::open(dir.path(), "t", shape).unwrap();
            cache.put(a, &map_a).unwrap();
            cache.put(b, &map_b).unwrap();
            cache.put(a, &map_b).unwrap();
            assert_eq!(cache.len(), 2, "a known key is not written twice");
            cache.path().to_path_buf()
        };
        // A run killed in the middle of its third record.
        let length = std::fs::metadata(&path).unwrap().len();
        let file = File::options().append(true).open(&path).unwrap();
        file.write_all_at(&[9u8; 100], length).unwrap();
        drop(file);

        let cache = FeatureCache::open(dir.path(), "t", shape).unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), length);
        let maps = cache.read(&[b, a]).unwrap();
        let mut values = vec![0f32; 2 * FEATURE_CHANNELS];
        maps.copy_data(&mut values, 2 * FEATURE_CHANNELS);
        assert_eq!(&values[..FEATURE_CHANNELS], &map_b[..]);
        assert_eq!(&values[FEATURE_CHANNELS..], &map_a[..]);
        assert!(cache.read(&[[3u8; 32]]).is_err(), "an unknown key is an error");

        // A flipped byte in a map is caught by its checksum and the error names the file.
        drop(cache);
        let file = File::options().write(true).open(&path).unwrap();
        file.write_all_at(&[0xff; 4], HEADER + 32 + 40).unwrap();
        drop(file);
        let cache = FeatureCache::open(dir.path(), "t", shape).unwrap();
        let error = cache.read(&[a]).err().unwrap().to_string();
        assert!(error.contains("damaged") && error.contains(".features"), "{error}");
        assert!(cache.read(&[b]).is_ok());

        // Another map shape (another input size) starts the file afresh.
        drop(cache);
        let other = FeatureCache::open(dir.path(), "t", [FEATURE_CHANNELS, 2, 2]).unwrap();
        assert!(other.is_empty());
    }

    #[test]
    fn one_run_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let shape = [FEATURE_CHANNELS, 1, 1];
        let _first = FeatureCache::open(dir.path(), "t", shape).unwrap();
        let error = FeatureCache::open(dir.path(), "t", shape).err().unwrap().to_string();
        assert!(error.contains("another training run"), "{error}");
    }

    #[test]
    fn a_large_frame_is_scaled_down_before_its_condition() {
        let preprocess = Preprocess { size: 32, mean: [0.5; 3], std: [0.5; 3] };
        let frame = |width: u32, height: u32| Frame {
            width,
            height,
            data: vec![128; (width * height * 3) as usize],
        };
        // Resize side 37: a 4000×3000 frame becomes 99×74 before the blur.
        let out =
            apply_condition(frame(4000, 3000), Condition::MotionBlur, 1, &[0; 32], &preprocess);
        assert_eq!((out.width, out.height), (99, 74));
        let out = apply_condition(frame(60, 40), Condition::MotionBlur, 1, &[0; 32], &preprocess);
        assert_eq!((out.width, out.height), (60, 40), "a small frame keeps its size");
        let out = apply_condition(frame(4000, 3000), Condition::Clean, 1, &[0; 32], &preprocess);
        assert_eq!((out.width, out.height), (4000, 3000), "clean is the frame as decoded");
    }

    #[test]
    fn record_keys_follow_content_condition_and_seed() {
        let clean = record_key(b"image", Condition::Clean, 1);
        assert_eq!(clean, record_key(b"image", Condition::Clean, 2), "clean ignores the seed");
        assert_ne!(clean, record_key(b"imagf", Condition::Clean, 1));
        let hazy = record_key(b"image", Condition::Haze, 1);
        assert_ne!(clean, hazy);
        assert_ne!(hazy, record_key(b"image", Condition::Haze, 2));
    }
}
