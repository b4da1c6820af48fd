//! Image files → [`Frame`]: decode whatever the `image` crate reads, upright and as RGB8.
//!
//! `edgesight classify` and the training mode read image files that users hand over, so this
//! is where untrusted bytes are parsed. The decoder runs with explicit limits: a file that
//! declares huge dimensions (a decompression bomb) is refused from its header with an error
//! that says so, before anything is allocated. Every decoded layout (grayscale, 16-bit, alpha,
//! palette, CMYK JPEG, the first frame of an animated GIF) is converted to RGB8, and the EXIF
//! orientation is applied so the model sees the picture the way a person does. The `image`
//! crate (0.25) reads the orientation itself, so `kamadak-exif` is not needed here.

use std::io;
use std::path::Path;

use image::error::{ImageError, LimitErrorKind};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use super::{Frame, PreprocessError};

/// The longest side, in pixels, an image file may declare: 32768. Larger files are refused
/// from their header.
pub const MAX_IMAGE_SIDE: u32 = 32_768;

/// The most memory, in bytes, a decoder may ask for: 512 MiB (the `image` crate's default,
/// made explicit). A 16-bit RGBA image of 8192×8192 just fits.
pub const MAX_DECODE_BYTES: u64 = 512 * 1024 * 1024;

/// Decodes an image file to RGB, applying EXIF orientation.
///
/// Alpha is dropped, not blended (as PIL's `convert("RGB")` does); 16-bit samples are scaled
/// to 8 bits; an animated image gives its first frame. Errors name the file and say what went
/// wrong: it cannot be read, it is not a known image format, it is too large, or it is corrupt.
/// A JPEG cut short after its first scan decodes without error (the decoder fills the rest),
/// so a truncated JPEG may come back partly grey.
pub fn load_image(path: &Path) -> Result<Frame, PreprocessError> {
    let fail = |reason: String| PreprocessError::Decode { path: path.to_path_buf(), reason };
    let mut reader = ImageReader::open(path)
        .and_then(|reader| reader.with_guessed_format())
        .map_err(|error| fail(describe_io(&error)))?;
    reader.limits(limits());
    let mut decoder = reader.into_decoder().map_err(|error| fail(describe(&error)))?;

    // A broken EXIF block should not cost the picture: decode it as stored.
    let orientation = decoder.orientation().unwrap_or_else(|error| {
        tracing::debug!(path = %path.display(), %error, "cannot read the EXIF orientation");
        Orientation::NoTransforms
    });
    let mut image = DynamicImage::from_decoder(decoder).map_err(|error| fail(describe(&error)))?;
    image.apply_orientation(orientation);

    let rgb = image.into_rgb8();
    let (width, height) = rgb.dimensions();
    if width == 0 || height == 0 {
        return Err(fail(format!("the image is empty ({width}×{height} pixels)")));
    }
    Ok(Frame { width, height, data: rgb.into_raw() })
}

fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    limits
}

fn describe_io(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::NotFound => "no such file".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => format!("cannot read the file: {error}"),
    }
}

fn describe(error: &ImageError) -> String {
    match error {
        ImageError::Limits(limit) => match limit.kind() {
            LimitErrorKind::DimensionError => format!(
                "the image declares dimensions over the limit of {MAX_IMAGE_SIDE} pixels a \
                 side; refused as a possible decompression bomb ({error})"
            ),
            LimitErrorKind::InsufficientMemory => format!(
                "decoding would need more than {} MiB; refused as a possible decompression \
                 bomb ({error})",
                MAX_DECODE_BYTES / (1024 * 1024)
            ),
            _ => format!("refused by the decoder limits: {error}"),
        },
        ImageError::Unsupported(_) => format!("not an image format this build can decode: {error}"),
        // Some decoders (BMP) report an oversized header as a decoding error.
        ImageError::Decoding(_) if error.to_string().contains("too large") => format!(
            "the image declares dimensions too large to decode; refused as a possible \
             decompression bomb ({error})"
        ),
        ImageError::Decoding(_) => format!("corrupt or truncated image: {error}"),
        ImageError::IoError(io_error) if io_error.kind() == io::ErrorKind::UnexpectedEof => {
            format!("truncated image: {error}")
        }
        ImageError::IoError(io_error) => describe_io(io_error),
        ImageError::Parameter(_) | ImageError::Encoding(_) => format!("cannot decode: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_file_when_it_is_missing() {
        let error = load_image(Path::new("/nonexistent/cat.png")).unwrap_err();
        assert_eq!(error.to_string(), "/nonexistent/cat.png: no such file");
    }

    #[test]
    fn refuses_a_file_that_is_not_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.png");
        std::fs::write(&path, b"these are not the pixels you are looking for").unwrap();
        let error = load_image(&path).unwrap_err().to_string();
        assert!(error.starts_with(&path.display().to_string()), "{error}");
        assert!(error.contains("corrupt") || error.contains("not an image"), "{error}");
    }

    #[test]
    fn expands_grayscale_to_rgb() {
        // EXIF orientation is checked against real photos in tests/source_frames.rs.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gray.png");
        let gray = image::GrayImage::from_fn(3, 2, |x, y| image::Luma([(x * 10 + y) as u8]));
        gray.save(&path).unwrap();
        let frame = load_image(&path).unwrap();
        assert_eq!((frame.width, frame.height), (3, 2));
        assert_eq!(&frame.data[..6], &[0, 0, 0, 10, 10, 10]);
        assert_eq!(&frame.data[9..12], &[1, 1, 1]);
    }
}
