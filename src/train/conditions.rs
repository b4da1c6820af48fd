//! The five visual conditions edge cameras see, as seeded image transforms: training
//! augmentation and an evaluation axis (the report gives accuracy and loss per condition).
//!
//! - `clean`: the image as it is.
//! - `low-light`: exposure cut to 15–35 % with a gamma lift (what auto-exposure gives), then
//!   sensor noise: shot noise growing with the square root of the signal plus read noise, the
//!   way a small sensor at high gain looks.
//! - `motion-blur`: a straight blur of 3–8 % of the image width at a random angle, what a moving
//!   object or a vibrating mount gives at a long exposure.
//! - `haze`: the atmospheric model `x·t + A·(1 − t)` with transmission t 0.35–0.65 and a bright
//!   airlight A: fog, smoke, a dirty or fogged lens, glare — low contrast.
//! - `overexposure`: gain ×1.6–2.5 with clipping, then JPEG at quality 8–25: a camera facing
//!   the light whose stream is squeezed through a thin link.
//!
//! Each transform draws its parameters from `(seed, image id)`, so the same image gets the same
//! version in every run and every epoch can use another id to see new draws.

use image::RgbImage;

use crate::model::prng::Rng;

/// One of the five conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    Clean,
    LowLight,
    MotionBlur,
    Haze,
    Overexposure,
}

impl Condition {
    pub const ALL: [Condition; 5] = [
        Condition::Clean,
        Condition::LowLight,
        Condition::MotionBlur,
        Condition::Haze,
        Condition::Overexposure,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Condition::Clean => "clean",
            Condition::LowLight => "low-light",
            Condition::MotionBlur => "motion-blur",
            Condition::Haze => "haze",
            Condition::Overexposure => "overexposure",
        }
    }

    /// Parses a name as [`Condition::name`] writes it.
    pub fn parse(name: &str) -> Option<Condition> {
        Condition::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The transformed image; `seed` and `id` fix every random draw.
    pub fn apply(self, image: &RgbImage, seed: u64, id: u64) -> RgbImage {
        let mut rng = Rng::derive(seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15), self.name());
        match self {
            Condition::Clean => image.clone(),
            Condition::LowLight => low_light(image, &mut rng),
            Condition::MotionBlur => motion_blur(image, &mut rng),
            Condition::Haze => haze(image, &mut rng),
            Condition::Overexposure => overexposure(image, &mut rng),
        }
    }
}

fn between(rng: &mut Rng, low: f64, high: f64) -> f64 {
    low + (high - low) * rng.uniform()
}

fn to_u8(value: f64) -> u8 {
    (value * 255.0).round().clamp(0.0, 255.0) as u8
}

fn map_pixels(image: &RgbImage, mut f: impl FnMut(f64) -> f64) -> RgbImage {
    let mut out = image.clone();
    for value in out.iter_mut() {
        *value = to_u8(f(f64::from(*value) / 255.0));
    }
    out
}

fn low_light(image: &RgbImage, rng: &mut Rng) -> RgbImage {
    let exposure = between(rng, 0.15, 0.35);
    let gamma = between(rng, 0.8, 1.0);
    let shot = between(rng, 0.0004, 0.0012);
    let read = between(rng, 0.01, 0.025);
    let mut noise = Rng::new(rng.next_u64());
    map_pixels(image, |x| {
        let signal = (x * exposure).powf(gamma);
        signal + (shot * signal + read * read).sqrt() * noise.normal()
    })
}

fn motion_blur(image: &RgbImage, rng: &mut Rng) -> RgbImage {
    let (width, height) = image.dimensions();
    let length = (f64::from(width) * between(rng, 0.03, 0.08)).max(2.0);
    let angle = between(rng, 0.0, std::f64::consts::PI);
    let taps = length.ceil() as i64 + 1;
    let (dx, dy) = (angle.cos(), angle.sin());
    let offsets: Vec<(i64, i64)> = (0..taps)
        .map(|i| {
            let t = i as f64 / (taps - 1) as f64 * length - length / 2.0;
            ((t * dx).round() as i64, (t * dy).round() as i64)
        })
        .collect();
    let mut out = image.clone();
    for (x, y, pixel) in out.enumerate_pixels_mut() {
        let mut sum = [0.0f64; 3];
        for (ox, oy) in &offsets {
            let sx = (i64::from(x) + ox).clamp(0, i64::from(width) - 1) as u32;
            let sy = (i64::from(y) + oy).clamp(0, i64::from(height) - 1) as u32;
            for (total, value) in sum.iter_mut().zip(image.get_pixel(sx, sy).0) {
                *total += f64::from(value);
            }
        }
        for (value, total) in pixel.0.iter_mut().zip(sum) {
            *value = (total / offsets.len() as f64).round() as u8;
        }
    }
    out
}

fn haze(image: &RgbImage, rng: &mut Rng) -> RgbImage {
    let transmission = between(rng, 0.35, 0.65);
    let airlight = between(rng, 0.7, 0.95);
    map_pixels(image, |x| x * transmission + airlight * (1.0 - transmission))
}

fn overexposure(image: &RgbImage, rng: &mut Rng) -> RgbImage {
    let gain = between(rng, 1.6, 2.5);
    let quality = between(rng, 8.0, 25.0).round() as u8;
    let bright = map_pixels(image, |x| x * gain);
    let mut jpeg = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, quality);
    let encoded = bright.write_with_encoder(encoder);
    let decoded = encoded
        .ok()
        .and_then(|()| image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg).ok());
    // Encoding an in-memory RGB image cannot fail short of running out of memory; the bright
    // image without artefacts is the fallback rather than a panic.
    decoded.map(|d| d.to_rgb8()).unwrap_or(bright)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64×48 test card: vertical bars in red, horizontal bars in green, a ramp in blue.
    fn card() -> RgbImage {
        RgbImage::from_fn(64, 48, |x, y| {
            let columns = if (x / 8) % 2 == 0 { 200 } else { 40 };
            let rows = if (y / 8) % 2 == 0 { 180 } else { 30 };
            image::Rgb([columns, rows, ((x + y) * 2) as u8])
        })
    }

    fn mean(image: &RgbImage) -> f64 {
        image.iter().map(|v| f64::from(*v)).sum::<f64>() / image.len() as f64
    }

    fn std(image: &RgbImage) -> f64 {
        let m = mean(image);
        (image.iter().map(|v| (f64::from(*v) - m).powi(2)).sum::<f64>() / image.len() as f64).sqrt()
    }

    /// Mean squared difference between horizontal and between vertical neighbours: edge energy
    /// in any direction (a blur spreads a step over several pixels, which lowers the squares).
    fn edges(image: &RgbImage) -> f64 {
        let (w, h) = image.dimensions();
        let mut sum = 0.0;
        for y in 1..h {
            for x in 1..w {
                let here = image.get_pixel(x, y).0;
                let (left, up) = (image.get_pixel(x - 1, y).0, image.get_pixel(x, y - 1).0);
                sum += here
                    .iter()
                    .zip(up)
                    .map(|(a, b)| (f64::from(*a) - f64::from(b)).powi(2))
                    .sum::<f64>();
                sum += here
                    .iter()
                    .zip(left)
                    .map(|(a, b)| (f64::from(*a) - f64::from(b)).powi(2))
                    .sum::<f64>();
            }
        }
        sum / f64::from((w - 1) * (h - 1) * 6)
    }

    #[test]
    fn each_condition_does_what_its_name_says() {
        let card = card();
        assert_eq!(Condition::Clean.apply(&card, 1, 2), card);
        let dark = Condition::LowLight.apply(&card, 1, 2);
        assert!(mean(&dark) < 0.45 * mean(&card), "{} vs {}", mean(&dark), mean(&card));
        // Noise: flat regions of the card are no longer flat.
        let row: Vec<u8> = (0..8).map(|x| dark.get_pixel(x, 10)[0]).collect();
        assert!(row.iter().any(|v| *v != row[0]), "{row:?}");
        let blurred = Condition::MotionBlur.apply(&card, 1, 2);
        assert!(edges(&blurred) < 0.8 * edges(&card), "{} vs {}", edges(&blurred), edges(&card));
        let hazy = Condition::Haze.apply(&card, 1, 2);
        assert!(std(&hazy) < 0.7 * std(&card) && mean(&hazy) > mean(&card));
        let bright = Condition::Overexposure.apply(&card, 1, 2);
        assert!(mean(&bright) > 1.3 * mean(&card));
        let clipped = bright.iter().filter(|v| **v >= 250).count();
        assert!(clipped > card.len() / 5, "{clipped} clipped values");
        assert_eq!(bright.dimensions(), card.dimensions());
    }

    #[test]
    fn draws_depend_on_seed_and_id_only() {
        let card = card();
        for condition in Condition::ALL {
            assert_eq!(condition.apply(&card, 3, 9), condition.apply(&card, 3, 9));
            if condition != Condition::Clean {
                assert_ne!(condition.apply(&card, 3, 9), condition.apply(&card, 3, 10));
                assert_ne!(condition.apply(&card, 3, 9), condition.apply(&card, 4, 9));
            }
            assert_eq!(Condition::parse(condition.name()), Some(condition));
        }
        assert_eq!(Condition::parse("rain"), None);
    }
}
