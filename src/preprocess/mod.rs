//! Frames and the preprocessing that turns them into the model's input tensor.
//!
//! Every picture that reaches the model, from a camera, a video file or an image file, becomes
//! a [`Frame`] (RGB8, tight rows) and then goes through exactly one function,
//! [`Preprocess::write_tensor`]: resize the shorter side to `round(S·256/224)`, centre-crop
//! `S×S`, normalise with the bundle's mean and std, write CHW `f32`. Keeping one code path
//! means training and serving see the same pixels. The resize and the crop are done as a
//! single bilinear resample of the crop window straight from the source frame, so a 4K frame
//! never costs a full-size intermediate image; [`crop_window`](Preprocess::crop_window) holds
//! the geometry and is public so that its numbers can be checked by hand.
//!
//! Image files are decoded in [`load_image`] (the `image_file` module) with decoder limits, so
//! a hostile file gives an error instead of exhausting memory.

mod image_file;

use std::path::PathBuf;

pub use image_file::{MAX_DECODE_BYTES, MAX_IMAGE_SIDE, load_image};

/// One decoded picture: RGB8, rows packed tightly (`data.len() == width * height * 3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// How a bundle wants its input: square side `size`, per-channel mean and std (0–1 scale).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preprocess {
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// An image file could not be turned into a [`Frame`]; `reason` is meant for an operator.
    #[error("{path}: {reason}")]
    Decode { path: PathBuf, reason: String },
    /// A frame or an output buffer does not have the size it claims (a caller's bug).
    #[error("cannot preprocess: {reason}")]
    Shape { reason: String },
}

/// Where the `S×S` crop sits in the resized picture, in resized-picture pixels.
///
/// The resized picture is `resized_width × resized_height`; the crop covers columns
/// `left..left + S` and rows `top..top + S` of it. The resized picture itself is never built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropWindow {
    pub resized_width: u64,
    pub resized_height: u64,
    pub left: u64,
    pub top: u64,
}

impl Preprocess {
    /// The side the shorter edge is resized to before cropping: `round(size · 256 / 224)`
    /// (256 for the usual 224).
    pub fn resize_side(&self) -> u64 {
        (f64::from(self.size) * 256.0 / 224.0).round() as u64
    }

    /// The resize and crop geometry for a `width × height` frame, following torchvision's
    /// `Resize(resize_side)` then `CenterCrop(size)`:
    ///
    /// - the shorter side becomes [`resize_side`](Self::resize_side) and the longer side
    ///   `floor(resize_side · long / short)` (torchvision truncates);
    /// - the crop offset is `(resized − size) / 2` rounded half to even (Python's `round`).
    ///
    /// `width` and `height` must be at least 1.
    pub fn crop_window(&self, width: u32, height: u32) -> CropWindow {
        let side = self.resize_side().max(u64::from(self.size));
        let (width, height) = (u64::from(width.max(1)), u64::from(height.max(1)));
        let (resized_width, resized_height) = if width <= height {
            (side, side * height / width)
        } else {
            (side * width / height, side)
        };
        let size = u64::from(self.size);
        CropWindow {
            resized_width,
            resized_height,
            left: half_to_even(resized_width - size),
            top: half_to_even(resized_height - size),
        }
    }

    /// Writes one frame as CHW f32 (`3 * size * size` values) into `out`.
    ///
    /// Value at channel `c`, row `y`, column `x`: `(v / 255 − mean[c]) / std[c]`, where `v` is
    /// the bilinear sample of the frame at the centre of crop pixel `(x, y)`; see
    /// [`crop_window`](Self::crop_window) for the geometry and the module source for the
    /// sampling convention (that of `torch.nn.functional.interpolate(mode="bilinear",
    /// align_corners=False, antialias=False)`).
    ///
    /// Caveat: there is no antialiasing. When the frame is much larger than the resize side
    /// (e.g. 1920×1080 → 256), each output pixel reads only its 2×2 nearest source pixels, so
    /// fine detail aliases where PIL's or torchvision's antialiased resize would blur it.
    ///
    /// # Panics
    ///
    /// When `out` is not `3 * size * size` long, `size` is 0, or the frame's data does not
    /// match its size. Frames from [`load_image`] and the sources always match; use
    /// [`try_write_tensor`](Self::try_write_tensor) for frames built elsewhere.
    pub fn write_tensor(&self, frame: &Frame, out: &mut [f32]) {
        if let Err(error) = self.try_write_tensor(frame, out) {
            panic!("{error}");
        }
    }

    /// [`write_tensor`](Self::write_tensor), returning an error instead of panicking when the
    /// frame or `out` has the wrong size.
    pub fn try_write_tensor(&self, frame: &Frame, out: &mut [f32]) -> Result<(), PreprocessError> {
        let size = self.size as usize;
        let shape = |reason: String| Err(PreprocessError::Shape { reason });
        if size == 0 {
            return shape("the model input size is 0".into());
        }
        if out.len() != 3 * size * size {
            return shape(format!("output holds {} values, not 3×{size}×{size}", out.len()));
        }
        let expected = frame.width as usize * frame.height as usize * 3;
        if frame.width == 0 || frame.height == 0 || frame.data.len() != expected {
            return shape(format!(
                "frame {}×{} carries {} bytes, not {expected}",
                frame.width,
                frame.height,
                frame.data.len()
            ));
        }
        let window = self.crop_window(frame.width, frame.height);
        let mut scale = [0.0; 3];
        let mut bias = [0.0; 3];
        for channel in 0..3 {
            scale[channel] = 1.0 / (255.0 * self.std[channel]);
            bias[channel] = -self.mean[channel] / self.std[channel];
        }
        resample_normalise(frame, &window, size, scale, bias, out);
        Ok(())
    }
}

/// `value / 2` rounded half to even, as Python's `round(value / 2.0)`.
fn half_to_even(value: u64) -> u64 {
    let half = value / 2;
    if value % 2 == 1 && half % 2 == 1 { half + 1 } else { half }
}

/// One output coordinate's bilinear taps along one axis: the two source indices and the weight
/// of the second.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Tap {
    first: usize,
    second: usize,
    weight: f32,
}

/// The taps for output pixels `offset..offset + count` of an axis resized from `source` to
/// `resized` pixels.
///
/// The sampling convention is that of PyTorch's bilinear interpolation with
/// `align_corners=False` (also OpenCV's `INTER_LINEAR` and PIL's bilinear when enlarging):
/// pixel `i` has its centre at `i + 0.5`, so resized pixel `d` reads the source at
/// `(d + 0.5) · source / resized − 0.5`. A negative position is clamped to 0, and the right
/// neighbour is clamped to the last pixel, so the edges repeat the border pixel.
fn taps(source: u32, resized: u64, offset: u64, count: usize) -> Vec<Tap> {
    let last = source as usize - 1;
    let scale = f64::from(source) / resized as f64;
    (0..count as u64)
        .map(|index| {
            let position = (scale * ((offset + index) as f64 + 0.5) - 0.5).max(0.0);
            let first = (position.floor() as usize).min(last);
            let weight = (position - first as f64).clamp(0.0, 1.0) as f32;
            Tap { first, second: (first + 1).min(last), weight }
        })
        .collect()
}

/// Samples the crop window out of `frame` and writes normalised CHW values: `v · scale[c] +
/// bias[c]` for the interpolated byte value `v` of channel `c`.
fn resample_normalise(
    frame: &Frame,
    window: &CropWindow,
    size: usize,
    scale: [f32; 3],
    bias: [f32; 3],
    out: &mut [f32],
) {
    let columns = taps(frame.width, window.resized_width, window.left, size);
    let rows = taps(frame.height, window.resized_height, window.top, size);
    let row_bytes = frame.width as usize * 3;
    let plane = size * size;
    let (red, rest) = out.split_at_mut(plane);
    let (green, blue) = rest.split_at_mut(plane);
    let rows_out = red.chunks_exact_mut(size).zip(green.chunks_exact_mut(size));
    let rows_out = rows_out.zip(blue.chunks_exact_mut(size));

    for (row, ((red, green), blue)) in rows.iter().zip(rows_out) {
        let upper = &frame.data[row.first * row_bytes..][..row_bytes];
        let lower = &frame.data[row.second * row_bytes..][..row_bytes];
        let outputs = red.iter_mut().zip(green.iter_mut()).zip(blue.iter_mut());
        for (column, ((red, green), blue)) in columns.iter().zip(outputs) {
            let (left, right) = (column.first * 3, column.second * 3);
            let (top_left, top_right) = (&upper[left..left + 3], &upper[right..right + 3]);
            let (bottom_left, bottom_right) = (&lower[left..left + 3], &lower[right..right + 3]);
            let mut value = [0.0f32; 3];
            for channel in 0..3 {
                let top_left = f32::from(top_left[channel]);
                let bottom_left = f32::from(bottom_left[channel]);
                let top = top_left + (f32::from(top_right[channel]) - top_left) * column.weight;
                let bottom =
                    bottom_left + (f32::from(bottom_right[channel]) - bottom_left) * column.weight;
                value[channel] = top + (bottom - top) * row.weight;
            }
            *red = value[0] * scale[0] + bias[0];
            *green = value[1] * scale[1] + bias[1];
            *blue = value[2] * scale[2] + bias[2];
        }
    }
}

/// Copies `height` rows of `width` RGB8 pixels that lie `stride` bytes apart (a GStreamer
/// buffer pads RGB rows to a multiple of 4 bytes) into a tightly packed vector.
///
/// Returns `None` when `stride` is shorter than a row or `data` is too short to hold the last
/// row; the padding after the last row may be missing.
pub fn pack_rows(data: &[u8], width: u32, height: u32, stride: usize) -> Option<Vec<u8>> {
    let row_bytes = width as usize * 3;
    let height = height as usize;
    if stride < row_bytes {
        return None;
    }
    if height > 0 && data.len() < (height - 1) * stride + row_bytes {
        return None;
    }
    if stride == row_bytes {
        return Some(data[..row_bytes * height].to_vec());
    }
    let mut packed = Vec::with_capacity(row_bytes * height);
    for row in data.chunks(stride).take(height) {
        packed.extend_from_slice(&row[..row_bytes]);
    }
    Some(packed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IMAGENET: Preprocess =
        Preprocess { size: 224, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };

    /// Mean 0 and std 1/255 make the tensor hold the interpolated byte values themselves.
    fn raw(size: u32) -> Preprocess {
        Preprocess { size, mean: [0.0; 3], std: [1.0 / 255.0; 3] }
    }

    fn gray(width: u32, height: u32, value: impl Fn(u32, u32) -> u8) -> Frame {
        let mut data = Vec::new();
        for y in 0..height {
            for x in 0..width {
                data.extend_from_slice(&[value(x, y); 3]);
            }
        }
        Frame { width, height, data }
    }

    #[test]
    fn crop_window_of_640x480_at_224() {
        // Short side 480 → 256, long side floor(256·640/480) = floor(341.33) = 341.
        // Left: (341 − 224) / 2 = 58.5, rounded half to even = 58. Top: (256 − 224) / 2 = 16.
        let window = IMAGENET.crop_window(640, 480);
        assert_eq!(
            window,
            CropWindow { resized_width: 341, resized_height: 256, left: 58, top: 16 }
        );
        let portrait = IMAGENET.crop_window(480, 640);
        assert_eq!((portrait.resized_width, portrait.resized_height), (256, 341));
        assert_eq!((portrait.left, portrait.top), (16, 58));
    }

    #[test]
    fn resize_side_rounds_like_torchvision() {
        assert_eq!(IMAGENET.resize_side(), 256);
        assert_eq!(Preprocess { size: 32, ..IMAGENET }.resize_side(), 37); // 36.57
        assert_eq!(Preprocess { size: 1, ..IMAGENET }.resize_side(), 1);
    }

    #[test]
    fn upsamples_2x2_to_4x4_with_half_pixel_centres() {
        // Source [[0, 100], [200, 40]]. Along each axis the 4 output pixels read the source at
        // 0 (clamped from −0.25), 0.25, 0.75 and 1 (1.25, right neighbour clamped), so output
        // (1, 1) = 0.75·(0.75·0 + 0.25·100) + 0.25·(0.75·200 + 0.25·40) = 58.75, as
        // torch.nn.functional.interpolate(bilinear, align_corners=False) gives.
        let frame = gray(2, 2, |x, y| [[0, 100], [200, 40]][y as usize][x as usize]);
        let window = CropWindow { resized_width: 4, resized_height: 4, left: 0, top: 0 };
        let mut out = vec![0.0; 3 * 16];
        resample_normalise(&frame, &window, 4, [1.0; 3], [0.0; 3], &mut out);
        let expected = [
            [0.0, 25.0, 75.0, 100.0],
            [50.0, 58.75, 76.25, 85.0],
            [150.0, 126.25, 78.75, 55.0],
            [200.0, 160.0, 80.0, 40.0],
        ];
        for channel in 0..3 {
            for y in 0..4 {
                for x in 0..4 {
                    let got = out[channel * 16 + y * 4 + x];
                    assert!((got - expected[y][x]).abs() < 1e-4, "({x}, {y}): {got}");
                }
            }
        }
    }

    #[test]
    fn normalises_a_constant_image_with_mean_and_std() {
        let frame = gray(640, 480, |_, _| 128);
        let mut out = vec![0.0; 3 * 224 * 224];
        IMAGENET.write_tensor(&frame, &mut out);
        for channel in 0..3 {
            let expected = (128.0 / 255.0 - f64::from(IMAGENET.mean[channel]))
                / f64::from(IMAGENET.std[channel]);
            let plane = &out[channel * 224 * 224..][..224 * 224];
            assert!(plane.iter().all(|v| (f64::from(*v) - expected).abs() < 1e-5), "{channel}");
        }
        // (128/255 − 0.485) / 0.229, worked out by hand.
        assert!((out[0] - 0.074_065).abs() < 1e-5, "{}", out[0]);
    }

    #[test]
    fn one_pixel_image_fills_the_tensor() {
        let frame = Frame { width: 1, height: 1, data: vec![255, 0, 51] };
        let mut out = vec![0.0; 3 * 224 * 224];
        raw(224).write_tensor(&frame, &mut out);
        let plane = 224 * 224;
        assert!(out[..plane].iter().all(|v| (v - 255.0).abs() < 1e-3));
        assert!(out[plane..2 * plane].iter().all(|v| v.abs() < 1e-3));
        assert!(out[2 * plane..].iter().all(|v| (v - 51.0).abs() < 1e-3));
    }

    #[test]
    fn extreme_aspect_1x1000_samples_the_middle() {
        // Width 1 → 256, height floor(256·1000) = 256000; top = (256000 − 224) / 2 = 127888.
        // Row 0 reads the source at (1000/256000)·(127888.5) − 0.5 = 499.064453125, between
        // rows 499 and 500 (values 124 and 125 with value = row / 4).
        let frame = gray(1, 1000, |_, y| (y / 4) as u8);
        let window = IMAGENET.crop_window(1, 1000);
        assert_eq!(
            window,
            CropWindow { resized_width: 256, resized_height: 256_000, left: 16, top: 127_888 }
        );
        let mut out = vec![0.0; 3 * 224 * 224];
        raw(224).write_tensor(&frame, &mut out);
        assert!((out[0] - 124.064_45).abs() < 1e-3, "{}", out[0]);
        // Row 223 reads at 499.935546875.
        assert!((out[223 * 224 + 100] - 124.935_55).abs() < 1e-3);
        assert!(out.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn reports_a_frame_whose_data_does_not_match_its_size() {
        let frame = Frame { width: 4, height: 4, data: vec![0; 10] };
        let mut out = vec![0.0; 3 * 224 * 224];
        let error = IMAGENET.try_write_tensor(&frame, &mut out).unwrap_err();
        assert!(error.to_string().contains("4×4 carries 10 bytes"), "{error}");
        let mut short = vec![0.0; 5];
        assert!(IMAGENET.try_write_tensor(&gray(2, 2, |_, _| 0), &mut short).is_err());
    }

    #[test]
    fn pack_rows_drops_row_padding() {
        // Two RGB pixels per row: 6 bytes of pixels, padded to a stride of 8.
        let data = [1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12, 0, 0];
        let packed = pack_rows(&data, 2, 2, 8);
        assert_eq!(packed, Some(vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]));
        // The padding after the last row may be missing.
        assert_eq!(pack_rows(&data[..14], 2, 2, 8).map(|rows| rows.len()), Some(12));
        assert_eq!(pack_rows(&data[..13], 2, 2, 8), None);
        assert_eq!(pack_rows(&data, 3, 2, 8), None);
        assert_eq!(pack_rows(&data[..12], 2, 2, 6), Some(data[..12].to_vec()));
    }
}
