//! Fitting the PCA stage of a bundle on backbone feature maps.
//!
//! Every spatial position of a `[N,2048,h,w]` feature map is one 2048-d sample (DESIGN.md). The
//! fit streams batches through an accumulator of Σx and Σxxᵀ in f64 (on whatever device the
//! features are on), so the training set never has to fit in memory; `finish` standardises
//! (per-channel mean and standard deviation: the projection is `((x − mean) / scale) · Cᵀ`),
//! takes the eigen-decomposition of the correlation matrix, and keeps the smallest k whose
//! components hold at least the variance target, capped at `max_components`. Standardising
//! matters with an untrained trunk, where one direction otherwise holds most of the variance.

use tch::{Device, Kind, Tensor};

use crate::model::pca::Pca;

/// Channels whose standard deviation is below this are treated as constant: their scale is set
/// to 1 so the projection stays finite (a dead ReLU channel is common).
const MIN_STD: f64 = 1e-6;

#[derive(Debug, thiserror::Error)]
pub enum PcaError {
    #[error("PCA: {0}")]
    Invalid(String),
    #[error("PCA: libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Running sums of channel vectors.
pub struct PcaAccumulator {
    dims: usize,
    samples: u64,
    sum: Tensor,
    outer: Tensor,
}

/// A fitted projection and what it keeps.
#[derive(Debug, Clone)]
pub struct PcaFit {
    pub pca: Pca,
    /// Fraction of the total (standardised) variance the k components keep.
    pub variance_kept: f64,
    /// Channel vectors the fit saw.
    pub samples: u64,
}

impl PcaAccumulator {
    pub fn new(dims: usize, device: Device) -> PcaAccumulator {
        let options = (Kind::Double, device);
        PcaAccumulator {
            dims,
            samples: 0,
            sum: Tensor::zeros([dims as i64], options),
            outer: Tensor::zeros([dims as i64, dims as i64], options),
        }
    }

    /// Adds a `[N,dims,h,w]` feature map (any float kind): N·h·w samples.
    pub fn add_maps(&mut self, maps: &Tensor) -> Result<(), PcaError> {
        let size = maps.size();
        if size.len() != 4 || size[1] != self.dims as i64 {
            return Err(PcaError::Invalid(format!(
                "feature maps of shape {size:?}, expected [N,{},h,w]",
                self.dims
            )));
        }
        let vectors = maps.f_permute([0, 2, 3, 1])?.f_reshape([-1, self.dims as i64])?;
        self.add_vectors(&vectors)
    }

    /// Adds `[M,dims]` samples.
    pub fn add_vectors(&mut self, vectors: &Tensor) -> Result<(), PcaError> {
        let _no_grad = tch::no_grad_guard();
        let x = vectors.f_to_device(self.sum.device())?.f_to_kind(Kind::Double)?;
        self.sum += x.f_sum_dim_intlist([0i64].as_slice(), false, Kind::Double)?;
        self.outer += x.f_tr()?.f_matmul(&x)?;
        self.samples += x.size()[0] as u64;
        Ok(())
    }

    /// Standardises, decomposes and keeps the smallest k reaching `variance` (0–1], at most
    /// `max_components`.
    pub fn finish(self, variance: f64, max_components: usize) -> Result<PcaFit, PcaError> {
        if !(variance > 0.0 && variance <= 1.0) {
            return Err(PcaError::Invalid(format!("variance target {variance} is not in (0, 1]")));
        }
        if self.samples < 2 {
            return Err(PcaError::Invalid(format!("{} samples are too few", self.samples)));
        }
        let _no_grad = tch::no_grad_guard();
        let n = self.samples as f64;
        let mean = self.sum.f_div_scalar(n)?;
        let covariance = self.outer.f_div_scalar(n)?.f_sub(&mean.f_outer(&mean)?)?;
        let std = covariance.f_diagonal(0, 0, 1)?.f_clamp_min(0.0)?.f_sqrt()?;
        let scale = std.f_where_scalarother(&std.f_gt(MIN_STD)?, 1.0)?;
        let correlation = covariance.f_div(&scale.f_outer(&scale)?)?;
        // Symmetric by construction; eigh reads the lower triangle.
        let (values, vectors) = correlation.f_linalg_eigh("L")?;
        let (values, order) = values.f_sort(0, true)?;
        let vectors = vectors.f_index_select(1, &order)?;
        let values: Vec<f64> = to_vec(&values.f_clamp_min(0.0)?)?;
        let total: f64 = values.iter().sum();
        if total <= 0.0 {
            return Err(PcaError::Invalid("the features have no variance".into()));
        }
        let mut kept = 0.0;
        let mut k = 0;
        while k < values.len() && k < max_components.max(1) {
            kept += values[k];
            k += 1;
            if kept / total >= variance - 1e-12 {
                break;
            }
        }
        let components = vectors.f_narrow(1, 0, k as i64)?.f_tr()?.f_contiguous()?;
        let pca = Pca {
            dims: self.dims,
            k,
            mean: to_vec(&mean)?.into_iter().map(|v| v as f32).collect(),
            scale: to_vec(&scale)?.into_iter().map(|v| v as f32).collect(),
            components: to_vec(&components)?.into_iter().map(|v| v as f32).collect(),
            explained_variance: values[..k].iter().map(|v| *v as f32).collect(),
        };
        Ok(PcaFit { pca, variance_kept: kept / total, samples: self.samples })
    }
}

fn to_vec(tensor: &Tensor) -> Result<Vec<f64>, PcaError> {
    Ok(super::host_values(tensor)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Eigenvalues of a small symmetric matrix by cyclic Jacobi rotations, in plain f64: the
    /// reference the fit is checked against.
    fn jacobi_eigenvalues(mut a: Vec<Vec<f64>>) -> Vec<f64> {
        let n = a.len();
        for _ in 0..100 {
            let off: f64 = (0..n)
                .flat_map(|i| (0..n).map(move |j| (i, j)))
                .filter(|(i, j)| i != j)
                .map(|(i, j)| a[i][j] * a[i][j])
                .sum();
            if off < 1e-24 {
                break;
            }
            for p in 0..n {
                for q in p + 1..n {
                    if a[p][q].abs() < 1e-300 {
                        continue;
                    }
                    let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                    let t = if theta == 0.0 { 1.0 } else { t };
                    let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                    for row in a.iter_mut() {
                        let (akp, akq) = (row[p], row[q]);
                        row[p] = c * akp - s * akq;
                        row[q] = s * akp + c * akq;
                    }
                    let (row_p, row_q) = (a[p].clone(), a[q].clone());
                    for (k, (apk, aqk)) in row_p.into_iter().zip(row_q).enumerate() {
                        a[p][k] = c * apk - s * aqk;
                        a[q][k] = s * apk + c * aqk;
                    }
                }
            }
        }
        let mut values: Vec<f64> = (0..n).map(|i| a[i][i]).collect();
        values.sort_by(|x, y| y.total_cmp(x));
        values
    }

    /// 400 samples of 5 correlated channels with different scales, deterministic.
    fn samples() -> Vec<[f64; 5]> {
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        (0..400)
            .map(|_| {
                let (a, b, c) = (next(), next(), next());
                [10.0 * a + 3.0, 2.0 * a + 0.5 * b, 0.1 * b - 1.0, 5.0 * c, c + 0.2 * next()]
            })
            .collect()
    }

    fn fit(variance: f64, cap: usize) -> PcaFit {
        let data = samples();
        let flat: Vec<f64> = data.iter().flatten().copied().collect();
        let mut accumulator = PcaAccumulator::new(5, Device::Cpu);
        let tensor = Tensor::from_slice(&flat).reshape([400, 5]);
        // Two batches, to exercise accumulation.
        accumulator.add_vectors(&tensor.narrow(0, 0, 150)).unwrap();
        accumulator.add_vectors(&tensor.narrow(0, 150, 250)).unwrap();
        accumulator.finish(variance, cap).unwrap()
    }

    #[test]
    fn eigenvalues_k_and_variance_match_a_plain_jacobi_reference() {
        let data = samples();
        let n = data.len() as f64;
        let mean: Vec<f64> = (0..5).map(|j| data.iter().map(|x| x[j]).sum::<f64>() / n).collect();
        let std: Vec<f64> = (0..5)
            .map(|j| (data.iter().map(|x| (x[j] - mean[j]).powi(2)).sum::<f64>() / n).sqrt())
            .collect();
        let correlation: Vec<Vec<f64>> = (0..5)
            .map(|i| {
                (0..5)
                    .map(|j| {
                        data.iter().map(|x| (x[i] - mean[i]) * (x[j] - mean[j])).sum::<f64>()
                            / n
                            / (std[i] * std[j])
                    })
                    .collect()
            })
            .collect();
        let reference = jacobi_eigenvalues(correlation);
        let total: f64 = reference.iter().sum();
        assert!((total - 5.0).abs() < 1e-9, "a correlation matrix has trace 5");
        let expected_k =
            (1..=5).find(|&k| reference[..k].iter().sum::<f64>() / total >= 0.95).unwrap_or(5);

        let fitted = fit(0.95, 200);
        assert_eq!(fitted.pca.k, expected_k);
        assert_eq!(fitted.samples, 400);
        let kept: f64 = reference[..expected_k].iter().sum::<f64>() / total;
        assert!((fitted.variance_kept - kept).abs() < 1e-9, "{} vs {kept}", fitted.variance_kept);
        for (got, want) in fitted.pca.explained_variance.iter().zip(&reference) {
            assert!((f64::from(*got) - want).abs() < 1e-5, "{got} vs {want}");
        }
        for j in 0..5 {
            assert!((f64::from(fitted.pca.mean[j]) - mean[j]).abs() < 1e-5);
            assert!((f64::from(fitted.pca.scale[j]) - std[j]).abs() < 1e-5);
        }
        // The cap wins over the variance target.
        assert_eq!(fit(0.999, 2).pca.k, 2);
    }

    #[test]
    fn components_are_orthonormal_and_project_a_known_vector() {
        let fitted = fit(1.0, 5);
        let pca = &fitted.pca;
        // Channel 1 is a combination of channels 0 and 2: the data has rank 4, and the fifth
        // component holds no variance.
        assert_eq!(pca.k, 4);
        for a in 0..4 {
            for b in 0..4 {
                let dot: f32 =
                    (0..5).map(|j| pca.components[a * 5 + j] * pca.components[b * 5 + j]).sum();
                let expected = if a == b { 1.0 } else { 0.0 };
                assert!((dot - expected).abs() < 1e-5, "rows {a},{b}: {dot}");
            }
        }
        // The mean projects to zero; mean + scale·c₀ (one standard deviation along the first
        // component, in standardised units) projects to (1, 0, 0, 0, 0).
        assert!(pca.project(&pca.mean).iter().all(|v| v.abs() < 1e-4));
        let x: Vec<f32> = (0..5).map(|j| pca.mean[j] + pca.scale[j] * pca.components[j]).collect();
        let projected = pca.project(&x);
        assert!((projected[0] - 1.0).abs() < 1e-4, "{projected:?}");
        assert!(projected[1..].iter().all(|v| v.abs() < 1e-4), "{projected:?}");
    }

    #[test]
    fn feature_maps_are_read_one_sample_per_position_and_bad_input_is_refused() {
        // [1,2,2,2]: channel 0 = 0..4, channel 1 = 2× channel 0 → one component holds it all.
        let maps =
            Tensor::from_slice(&[0.0f32, 1.0, 2.0, 3.0, 0.0, 2.0, 4.0, 6.0]).reshape([1, 2, 2, 2]);
        let mut accumulator = PcaAccumulator::new(2, Device::Cpu);
        accumulator.add_maps(&maps).unwrap();
        let fitted = accumulator.finish(0.95, 200).unwrap();
        assert_eq!((fitted.samples, fitted.pca.k), (4, 1));
        assert!((fitted.variance_kept - 1.0).abs() < 1e-9);

        let mut wrong = PcaAccumulator::new(3, Device::Cpu);
        assert!(wrong.add_maps(&maps).unwrap_err().to_string().contains("expected [N,3,h,w]"));
        let empty = PcaAccumulator::new(2, Device::Cpu);
        assert!(empty.finish(0.95, 10).unwrap_err().to_string().contains("too few"));
        let constant = Tensor::ones([1, 2, 2, 2], (Kind::Float, Device::Cpu));
        let mut flat = PcaAccumulator::new(2, Device::Cpu);
        flat.add_maps(&constant).unwrap();
        assert!(flat.finish(0.95, 10).unwrap_err().to_string().contains("no variance"));
    }
}
