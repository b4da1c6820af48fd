//! The PCA stage of a bundle: reading and writing `pca.safetensors`, and folding the projection
//! into a 1×1 convolution.
//!
//! At run time the projection `((x − mean) / scale) · componentsᵀ` is applied to every spatial
//! position of the backbone's feature map. Written that way it is three passes over a
//! `[N,2048,h,w]` tensor; folded into one convolution (`W = C / scale`, `b = −C · (mean / scale)`)
//! it is a single matrix product that tract fuses with the head, which is why the backend never
//! evaluates the formula directly. [`Pca::project`] keeps the direct formula for tests.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use super::ModelError;
use super::prng::Rng;

/// Tensor names inside `pca.safetensors`.
pub const MEAN: &str = "mean";
pub const SCALE: &str = "scale";
pub const COMPONENTS: &str = "components";
pub const EXPLAINED_VARIANCE: &str = "explained_variance";

/// A fitted projection from `dims` channels to `k` components.
#[derive(Debug, Clone, PartialEq)]
pub struct Pca {
    pub dims: usize,
    pub k: usize,
    pub mean: Vec<f32>,
    /// Per-channel standard deviation used to standardise before projecting; all > 0.
    pub scale: Vec<f32>,
    /// `[k, dims]`, row-major; rows are orthonormal.
    pub components: Vec<f32>,
    /// `[k]`, variance along each component, decreasing.
    pub explained_variance: Vec<f32>,
}

impl Pca {
    /// Reads `pca.safetensors` and checks its shapes against `dims` and `k`; errors name the
    /// file, the tensor and the shape.
    pub fn read(path: &Path, dims: usize, k: usize) -> Result<Pca, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::bundle(path, e))?;
        let tensors = SafeTensors::deserialize(&bytes)
            .map_err(|e| ModelError::bundle(path, format!("not a safetensors file: {e}")))?;
        let load = |name: &str, shape: &[usize]| -> Result<Vec<f32>, ModelError> {
            let view = tensors
                .tensor(name)
                .map_err(|_| ModelError::bundle(path, format!("tensor `{name}` is missing")))?;
            if view.dtype() != Dtype::F32 {
                let reason = format!("tensor `{name}` is {:?}, expected F32", view.dtype());
                return Err(ModelError::bundle(path, reason));
            }
            if view.shape() != shape {
                let reason =
                    format!("tensor `{name}` has shape {:?}, expected {shape:?}", view.shape());
                return Err(ModelError::bundle(path, reason));
            }
            Ok(view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let pca = Pca {
            dims,
            k,
            mean: load(MEAN, &[dims])?,
            scale: load(SCALE, &[dims])?,
            components: load(COMPONENTS, &[k, dims])?,
            explained_variance: load(EXPLAINED_VARIANCE, &[k])?,
        };
        if let Some(i) = pca.scale.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            let reason = format!("`scale[{i}]` is {}, must be positive", pca.scale[i]);
            return Err(ModelError::bundle(path, reason));
        }
        Ok(pca)
    }

    /// The safetensors encoding of this projection (`path` is where it will go, for errors).
    pub fn to_safetensors(&self, path: &Path) -> Result<Vec<u8>, ModelError> {
        let entries = [
            (MEAN, vec![self.dims], &self.mean),
            (SCALE, vec![self.dims], &self.scale),
            (COMPONENTS, vec![self.k, self.dims], &self.components),
            (EXPLAINED_VARIANCE, vec![self.k], &self.explained_variance),
        ];
        serialize_f32(path, &entries)
    }

    /// A random projection with orthonormal rows, plausible means and scales, and a decaying
    /// spectrum. Returns the projection and the fraction of the spectrum's variance it keeps.
    pub fn synthetic(seed: u64, dims: usize, k: usize) -> (Pca, f32) {
        let mut rng = Rng::derive(seed, "pca.mean");
        let mean = (0..dims).map(|_| (0.3 + 0.2 * rng.uniform()) as f32).collect();
        let mut rng = Rng::derive(seed, "pca.scale");
        let scale = (0..dims).map(|_| (0.5 + 0.5 * rng.uniform()) as f32).collect();
        let components = orthonormal_rows(&mut Rng::derive(seed, "pca.components"), k, dims);
        // A power-law spectrum over all `dims` directions; the kept part is the first `k`. With
        // k = 200 of 2048 that keeps about 96 %, as a fitted PCA must (≥ 95 %, DESIGN.md).
        let spectrum: Vec<f64> = (0..dims).map(|i| 1.0 / (i as f64 + 1.0).powf(1.5)).collect();
        let total: f64 = spectrum.iter().sum();
        let kept: f64 = spectrum[..k].iter().sum();
        let explained_variance = spectrum[..k].iter().map(|v| *v as f32).collect();
        let pca = Pca { dims, k, mean, scale, components, explained_variance };
        (pca, (kept / total) as f32)
    }

    /// The projection as a 1×1 convolution: weight `[k, dims]` (= `[k, dims, 1, 1]`) and bias
    /// `[k]`, accumulated in f64.
    pub fn fold(&self) -> (Vec<f32>, Vec<f32>) {
        let mut weight = Vec::with_capacity(self.k * self.dims);
        let mut bias = Vec::with_capacity(self.k);
        for row in self.components.chunks_exact(self.dims) {
            let mut offset = 0.0f64;
            for ((c, m), s) in row.iter().zip(&self.mean).zip(&self.scale) {
                let w = f64::from(*c) / f64::from(*s);
                weight.push(w as f32);
                offset += w * f64::from(*m);
            }
            bias.push((-offset) as f32);
        }
        (weight, bias)
    }

    /// The direct formula `((x − mean) / scale) · componentsᵀ` for one channel vector.
    pub fn project(&self, x: &[f32]) -> Vec<f32> {
        self.components
            .chunks_exact(self.dims)
            .map(|row| {
                let sum: f64 = (0..self.dims)
                    .map(|j| {
                        let standardised =
                            (f64::from(x[j]) - f64::from(self.mean[j])) / f64::from(self.scale[j]);
                        standardised * f64::from(row[j])
                    })
                    .sum();
                sum as f32
            })
            .collect()
    }
}

/// Gram–Schmidt (twice, for stability) on Gaussian rows: `rows` orthonormal vectors of `dims`.
fn orthonormal_rows(rng: &mut Rng, rows: usize, dims: usize) -> Vec<f32> {
    let mut basis: Vec<Vec<f64>> = Vec::with_capacity(rows);
    for _ in 0..rows {
        let mut v: Vec<f64> = (0..dims).map(|_| rng.normal()).collect();
        for _ in 0..2 {
            for b in &basis {
                let dot: f64 = v.iter().zip(b).map(|(x, y)| x * y).sum();
                v.iter_mut().zip(b).for_each(|(x, y)| *x -= dot * y);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        basis.push(v);
    }
    basis.into_iter().flatten().map(|x| x as f32).collect()
}

/// Serialises named f32 tensors with safetensors (little-endian, sorted by name); `path` is
/// where the bytes will be written, for errors.
pub fn serialize_f32(
    path: &Path,
    entries: &[(&str, Vec<usize>, &Vec<f32>)],
) -> Result<Vec<u8>, ModelError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = entries
        .iter()
        .map(|(name, shape, data)| {
            let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.to_string(), shape.clone(), raw)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, raw)| {
            TensorView::new(Dtype::F32, shape.clone(), raw)
                .map(|view| (name.clone(), view))
                .map_err(|e| ModelError::bundle(path, format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<HashMap<_, _>, _>>()?;
    safetensors::serialize(views, None)
        .map_err(|e| ModelError::bundle(path, format!("safetensors encoding: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Pca {
        Pca {
            dims: 3,
            k: 2,
            mean: vec![0.5, -1.0, 2.0],
            scale: vec![2.0, 0.5, 1.0],
            components: vec![0.6, 0.8, 0.0, 0.0, 0.0, 1.0],
            explained_variance: vec![2.0, 1.0],
        }
    }

    #[test]
    fn folded_convolution_matches_direct_formula() {
        let pca = tiny();
        let (weight, bias) = pca.fold();
        let x = [1.5f32, 0.25, -3.0];
        let direct = pca.project(&x);
        for i in 0..pca.k {
            let conv: f32 = (0..3).map(|j| weight[i * 3 + j] * x[j]).sum::<f32>() + bias[i];
            assert!((conv - direct[i]).abs() < 1e-6, "{conv} vs {}", direct[i]);
        }
        // By hand: row 0 = 0.6·(1.5−0.5)/2 + 0.8·(0.25+1)/0.5 = 0.3 + 2.0.
        assert!((direct[0] - 2.3).abs() < 1e-6);
    }

    #[test]
    fn synthetic_components_are_orthonormal() {
        let (pca, kept) = Pca::synthetic(1, 64, 10);
        for a in 0..10 {
            for b in 0..10 {
                let dot: f32 =
                    (0..64).map(|j| pca.components[a * 64 + j] * pca.components[b * 64 + j]).sum();
                let expected = if a == b { 1.0 } else { 0.0 };
                assert!((dot - expected).abs() < 1e-5, "rows {a},{b}: {dot}");
            }
        }
        assert!(kept > 0.0 && kept < 1.0);
    }

    #[test]
    fn safetensors_round_trip_and_shape_check() {
        let dir = std::env::temp_dir().join(format!("edgesight-pca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string()).ok();
        let path = dir.join("pca.safetensors");
        let pca = tiny();
        let written = pca.to_safetensors(&path).map(|b| std::fs::write(&path, b).is_ok());
        assert!(matches!(written, Ok(true)));
        assert_eq!(Pca::read(&path, 3, 2).ok(), Some(pca));
        let error = Pca::read(&path, 3, 5).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("pca.safetensors") && error.contains("components"), "{error}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
