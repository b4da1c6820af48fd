//! One video file as an iterator of sampled frames, for `edgesight classify`.
//!
//! The one-shot command needs no channels or threads of its own, but it must see exactly the
//! frames the daemon would: the same decoder graph, rotation, sampling and row packing. So
//! [`read_video`] runs an ordinary `file` source (not paced, not looping) and turns its events
//! into an iterator that ends after the stream's final event.

use std::path::Path;

use crossbeam_channel::Receiver;

use super::{SourceError, SourceEvent, SourceFrame, SourceHandle, spawn};
use crate::config::StreamSettings;

/// Frames waiting between the decoder thread and the iterator's consumer.
const QUEUE: usize = 4;

/// Decodes `path` and yields at most `fps` frames per second of video, as fast as they are
/// taken. The stream is named after the file name.
///
/// An error ends the iteration: it is the last item, after any frames decoded before it.
/// Dropping the iterator early stops the decoder and waits for its thread.
pub fn read_video(path: &Path, fps: f64) -> VideoFrames {
    let name = path
        .file_name()
        .map_or_else(|| path.display().to_string(), |name| name.to_string_lossy().into_owned());
    let settings = StreamSettings {
        name,
        kind: "file".into(),
        fps: Some(fps),
        path: Some(path.to_path_buf()),
        realtime: Some(false),
        looping: Some(false),
        ..StreamSettings::default()
    };
    let (sender, events) = crossbeam_channel::bounded(QUEUE);
    // A file is never rebuilt, so the policy does not matter; nobody reads these counters.
    let policy = crate::config::SourcesSettings::default();
    match spawn(&settings, &policy, crate::metrics::Metrics::new(), sender) {
        Ok(handle) => VideoFrames { handle: Some(handle), events, pending: None, done: false },
        Err(error) => VideoFrames { handle: None, events, pending: Some(error), done: false },
    }
}

/// The iterator [`read_video`] returns.
pub struct VideoFrames {
    handle: Option<SourceHandle>,
    events: Receiver<SourceEvent>,
    /// An error from starting the source, reported as the only item.
    pending: Option<SourceError>,
    done: bool,
}

impl Iterator for VideoFrames {
    type Item = Result<SourceFrame, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if let Some(error) = self.pending.take() {
            self.done = true;
            return Some(Err(error));
        }
        let mut event = self.events.recv();
        while let Ok(SourceEvent::Status { .. }) = event {
            event = self.events.recv();
        }
        match event {
            Ok(SourceEvent::Status { .. }) => None,
            Ok(SourceEvent::Frame(mut frame)) => {
                frame.taken();
                Some(Ok(frame))
            }
            Ok(SourceEvent::Ended { .. }) => {
                self.done = true;
                None
            }
            Ok(SourceEvent::Failed { error, .. }) => {
                self.done = true;
                Some(Err(error))
            }
            Err(_) => {
                self.done = true;
                let stream = self.handle.as_ref().map(|handle| handle.stream().to_string());
                Some(Err(SourceError::Pipeline {
                    stream: stream.unwrap_or_default(),
                    reason: "the decoder thread stopped without reporting why".into(),
                }))
            }
        }
    }
}

impl Drop for VideoFrames {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        handle.stop();
        // The thread's final event needs room in the channel: take events until it is sent.
        if !self.done {
            for event in self.events.iter() {
                if matches!(event, SourceEvent::Ended { .. } | SourceEvent::Failed { .. }) {
                    break;
                }
            }
        }
        handle.join();
    }
}
