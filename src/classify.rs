//! `edgesight classify`: images and videos through the model once, results to stdout.
//!
//! Each input is classified on its own and a failure is a row of its own, so one bad file in
//! a batch of thousands costs one line, not the run. An input is treated as an image when its
//! first bytes are a format the `image` crate knows, and as a video otherwise; videos are
//! sampled at `fps` by stream time through the same GStreamer pipeline the daemon uses.

use std::io::Read;
use std::path::Path;

use serde::Serialize;

use crate::engine::{FrameModel, top_k};
use crate::model::{Backend, Bundle};
use crate::preprocess::{self, Frame};
use crate::source;

/// One line of output: a classified frame, or the error that stopped an input.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub file: String,
    /// 0-based sampled frame; images are frame 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame: Option<u64>,
    /// Stream position in milliseconds, for video frames.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Row {
    fn failed(file: &str, error: String) -> Row {
        Row {
            file: file.into(),
            frame: None,
            time_ms: None,
            label: None,
            score: None,
            error: Some(error),
        }
    }

    /// The table line for this row (see [`TABLE_HEADER`]).
    pub fn table_line(&self) -> String {
        match &self.error {
            Some(error) => format!("{:<40} {:>6} {:>10}  error: {error}", self.file, "-", "-"),
            None => format!(
                "{:<40} {:>6} {:>10}  {:<20} {:.4}",
                self.file,
                self.frame.map_or("-".into(), |frame| frame.to_string()),
                self.time_ms.map_or("-".into(), format_time),
                self.label.as_deref().unwrap_or("-"),
                self.score.unwrap_or(0.0),
            ),
        }
    }
}

/// Column titles matching [`Row::table_line`].
pub const TABLE_HEADER: &str =
    "file                                      frame       time  label                score";

fn format_time(ms: u64) -> String {
    format!("{}:{:02}.{:03}", ms / 60_000, (ms / 1000) % 60, ms % 1000)
}

/// The model and settings shared by every input.
pub struct Classifier {
    model: FrameModel,
    /// Frames per second of video time to classify.
    pub fps: f64,
}

impl Classifier {
    pub fn new(backend: Box<dyn Backend>, bundle: &Bundle, fps: f64) -> Classifier {
        Classifier { model: FrameModel::new(backend, bundle), fps }
    }

    /// Classifies one input, calling `emit` for each row. Returns false when the input failed
    /// (its error row has been emitted).
    pub fn classify_path(&mut self, path: &Path, emit: &mut dyn FnMut(Row)) -> bool {
        let file = path.display().to_string();
        let refusal = match std::fs::metadata(path) {
            Err(_) => Some("no such file"),
            Ok(metadata) if metadata.is_dir() => Some("is a directory"),
            // A FIFO or device would block the decoder forever waiting for data.
            Ok(metadata) if !metadata.is_file() => Some("not a regular file"),
            Ok(_) => None,
        };
        if let Some(reason) = refusal {
            emit(Row::failed(&file, reason.into()));
            return false;
        }
        if looks_like_image(path) {
            return match preprocess::load_image(path) {
                Ok(frame) => match self.classify_frame(&file, &frame, Some(0), None) {
                    Ok(row) => {
                        emit(row);
                        true
                    }
                    Err(error) => {
                        emit(Row::failed(&file, error));
                        false
                    }
                },
                Err(error) => {
                    emit(Row::failed(&file, error.to_string()));
                    false
                }
            };
        }
        let mut frames = 0;
        for item in source::read_video(path, self.fps) {
            let result = item.map_err(|error| error.to_string()).and_then(|frame| {
                self.classify_frame(&file, &frame.frame, Some(frame.index), frame.position_ms)
            });
            match result {
                Ok(row) => {
                    frames += 1;
                    emit(row);
                }
                Err(error) => {
                    // Frames classified before a decoding error stay valid; the error row says
                    // where the file stopped being readable.
                    let error =
                        if frames > 0 { format!("after {frames} frames: {error}") } else { error };
                    emit(Row::failed(&file, error));
                    return false;
                }
            }
        }
        if frames == 0 {
            emit(Row::failed(&file, "no frame could be decoded".into()));
            return false;
        }
        true
    }

    fn classify_frame(
        &mut self,
        file: &str,
        frame: &Frame,
        index: Option<u64>,
        time_ms: Option<u64>,
    ) -> Result<Row, String> {
        let prediction = self.model.run(frame)?.prediction;
        let best = top_k(&prediction.scores, 1)[0];
        Ok(Row {
            file: file.into(),
            frame: index,
            time_ms,
            label: Some(self.model.label(best)),
            score: Some(prediction.scores[best]),
            error: None,
        })
    }
}

/// True when the file starts with the signature of an image format the `image` crate reads.
fn looks_like_image(path: &Path) -> bool {
    let mut header = [0u8; 32];
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let Ok(read) = file.read(&mut header) else {
        return false;
    };
    image::guess_format(&header[..read]).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times_as_minutes_seconds_millis() {
        assert_eq!(format_time(0), "0:00.000");
        assert_eq!(format_time(61_005), "1:01.005");
    }

    #[test]
    fn error_rows_serialise_without_result_fields() {
        let row = Row::failed("a.mp4", "no video stream".into());
        let json = serde_json::to_string(&row).unwrap_or_default();
        assert_eq!(json, r#"{"file":"a.mp4","error":"no video stream"}"#);
    }
}
