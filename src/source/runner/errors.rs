//! Words for what went wrong in a source: GStreamer's error messages turned into
//! [`SourceError`]s that name the stream (and the file), say whether retrying can help
//! (`Setup` for a missing decoder or refused credentials), and never carry a credential.

use std::sync::atomic::Ordering;

use gstreamer as gst;
use gstreamer::prelude::*;

use super::Runner;
use crate::source::SourceError;
use crate::source::pipeline::Input;

impl Runner {
    pub(super) fn failure(&self, reason: String) -> SourceError {
        SourceError::Pipeline {
            stream: self.stream.to_string(),
            reason: self.redactor.scrub(&reason),
        }
    }

    pub(super) fn setup_failure(&self, reason: String) -> SourceError {
        SourceError::Setup { stream: self.stream.to_string(), reason: self.redactor.scrub(&reason) }
    }

    pub(super) fn no_video(&self) -> SourceError {
        match self.path() {
            Some(path) => {
                SourceError::NoVideo { stream: self.stream.to_string(), path: path.to_path_buf() }
            }
            None => self.setup_failure("the source offers no video stream".into()),
        }
    }

    /// Words for a GStreamer error message: what failed, in which element, for which file.
    pub(super) fn describe_error(&self, message: &gst::message::Error) -> SourceError {
        let error = message.error();
        let details = message.debug().map(|debug| debug.to_string()).unwrap_or_default();
        let element = message.src().map(|source| source.name().to_string()).unwrap_or_default();
        tracing::debug!(stream = %self.stream, %element, %error, %details, "GStreamer error");
        let video_linked = match &self.input {
            Input::File { video_linked, .. } | Input::Dynamic { video_linked } => {
                video_linked.load(Ordering::SeqCst)
            }
            Input::Fixed => true,
        };
        if !video_linked && details.contains("not-linked") {
            return self.no_video();
        }
        let place = self.path().map_or_else(String::new, |path| format!("{}: ", path.display()));
        if error.matches(gst::ResourceError::NotFound)
            && let Some(path) = self.path()
        {
            return SourceError::NoSuchFile {
                stream: self.stream.to_string(),
                path: path.to_path_buf(),
            };
        }
        let what = if error.matches(gst::StreamError::TypeNotFound)
            || error.matches(gst::StreamError::WrongType)
        {
            "not a media file GStreamer recognises"
        } else if error.matches(gst::CoreError::MissingPlugin)
            || error.matches(gst::StreamError::CodecNotFound)
        {
            "no decoder is installed for this format"
        } else if error.matches(gst::StreamError::Decode) || error.matches(gst::StreamError::Demux)
        {
            "the file is corrupt or truncated"
        } else if error.matches(gst::ResourceError::Read) && self.path().is_some() {
            "the file cannot be read"
        } else if self.path().is_some() {
            "decoding failed"
        } else {
            "the source failed"
        };
        let reason =
            format!("{place}{what} after {} decoded frames ({element}: {error})", self.decoded);
        // What retrying cannot fix: a missing decoder, refused credentials.
        if error.matches(gst::CoreError::MissingPlugin)
            || error.matches(gst::StreamError::CodecNotFound)
            || error.matches(gst::ResourceError::NotAuthorized)
        {
            return self.setup_failure(reason);
        }
        self.failure(reason)
    }
}
