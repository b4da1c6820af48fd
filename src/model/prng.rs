//! A small, fully specified pseudo-random number generator for synthetic weights.
//!
//! Synthetic bundles are used by tests and benchmarks as if they were real models, so their
//! weights must be bit-for-bit the same on every machine and with every crate version. We
//! therefore do not use the `rand` family (whose algorithms and stream layouts may change) but a
//! fixed recipe: splitmix64 seeds a xoshiro256** state, and Box–Muller turns its uniforms into
//! normals. Each tensor draws from its own stream, derived from the bundle seed and the tensor's
//! canonical name, so that the weights do not depend on the order in which a writer emits them
//! (the ONNX-zoo-style and torchvision-style variants of the same seed share every weight).

/// splitmix64: a one-step mixer, used to expand a 64-bit seed into xoshiro's 256-bit state.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256** with a cached second Box–Muller normal.
#[derive(Debug, Clone)]
pub struct Rng {
    state: [u64; 4],
    spare_normal: Option<f64>,
}

impl Rng {
    /// A generator whose whole output is determined by `seed`.
    pub fn new(seed: u64) -> Rng {
        let mut mixer = seed;
        let state = [
            splitmix64(&mut mixer),
            splitmix64(&mut mixer),
            splitmix64(&mut mixer),
            splitmix64(&mut mixer),
        ];
        Rng { state, spare_normal: None }
    }

    /// An independent stream for the tensor called `stream` (FNV-1a of the name, mixed with
    /// the seed).
    pub fn derive(seed: u64, stream: &str) -> Rng {
        let mut hash: u64 = 0xCBF2_9CE4_8422_2325;
        for byte in stream.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01B3);
        }
        let mut mixer = seed ^ hash.rotate_left(17);
        Rng::new(splitmix64(&mut mixer) ^ hash)
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in the open interval (0, 1): never 0, so that `ln` in Box–Muller is finite.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal (Box–Muller; the second value of each pair is kept for the next call).
    pub fn normal(&mut self) -> f64 {
        if let Some(value) = self.spare_normal.take() {
            return value;
        }
        let radius = (-2.0 * self.uniform().ln()).sqrt();
        let angle = std::f64::consts::TAU * self.uniform();
        self.spare_normal = Some(radius * angle.sin());
        radius * angle.cos()
    }

    /// `count` normals with the given standard deviation, as f32.
    pub fn normals(&mut self, count: usize, std: f64) -> Vec<f32> {
        (0..count).map(|_| (self.normal() * std) as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_same_stream() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }

    #[test]
    fn stream_is_pinned_to_known_values() {
        // Pinned so that a change of recipe (which would silently change every synthetic model)
        // fails here first. Values computed by this implementation at the time it was written.
        let mut rng = Rng::new(0);
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        let mut again = Rng::new(0);
        assert_eq!(first, (0..3).map(|_| again.next_u64()).collect::<Vec<_>>());
        assert_eq!(first[0], PINNED_FIRST_OUTPUT_SEED_0);
    }

    /// First xoshiro256** output for seed 0 after splitmix64 seeding.
    const PINNED_FIRST_OUTPUT_SEED_0: u64 = 0x99EC_5F36_CB75_F2B4;

    #[test]
    fn derived_streams_differ_by_name() {
        let a = Rng::derive(7, "layer1.0.conv1").next_u64();
        let b = Rng::derive(7, "layer1.0.conv2").next_u64();
        let c = Rng::derive(7, "layer1.0.conv1").next_u64();
        assert_ne!(a, b);
        assert_eq!(a, c);
    }

    #[test]
    fn normals_have_unit_moments() {
        let mut rng = Rng::new(3);
        let n = 200_000;
        let values: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }
}
