//! `uri`: anything `uridecodebin` plays (`file://`, `http(s)://`, `rtsp://`, `udp://`, HLS …).
//!
//! `uridecodebin ! videoconvert ! appsink`; the first decoded video pad is linked and the
//! others (audio, a second video) stay unlinked, as for files. Whether the stream is live is
//! decided by the scheme ([`is_live_uri`]): `file`, `http` and `https` are played once and end
//! cleanly; every other scheme is treated as a live feed and is rebuilt when it fails or ends.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use gstreamer::prelude::*;

use super::super::SourceError;
use super::super::pipeline::{Built, Input, link_first_video_pad, make, rgb_sink};
use super::assemble;
use crate::config::StreamSettings;

/// A URI whose scheme names a live feed rather than a finite file.
///
/// An HTTP live stream (HLS, an MJPEG camera over HTTP) counts as finite here: it is not
/// rebuilt when it ends. Probing the source for liveness at start-up would retire this.
pub(in crate::source) fn is_live_uri(uri: &str) -> bool {
    let scheme = uri.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
    !matches!(scheme.as_deref(), Some("file" | "http" | "https") | None)
}

pub(in crate::source) fn build(
    settings: &StreamSettings,
    stream: &str,
) -> Result<Built, SourceError> {
    let Some(uri) = settings.url.as_deref() else {
        return Err(SourceError::Pipeline {
            stream: stream.to_string(),
            reason: "a uri stream needs a url".into(),
        });
    };
    let live = is_live_uri(uri);
    let decode = make("uridecodebin", stream)?;
    decode.set_property("uri", uri);
    let convert = make("videoconvert", stream)?;
    let sink = rgb_sink(live, live);
    let pipeline = assemble(stream, &[&decode, &convert], &sink, &[&[&convert, sink.as_ref()]])?;
    let video_linked = Arc::new(AtomicBool::new(false));
    link_first_video_pad(&decode, &convert, Arc::clone(&video_linked), stream);
    Ok(Built { pipeline, sink, input: Input::Dynamic { video_linked }, live, ends: !live })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_http_are_finite_the_rest_live() {
        assert!(!is_live_uri("file:///srv/a.mp4"));
        assert!(!is_live_uri("HTTPS://cdn/a.mp4"));
        assert!(is_live_uri("rtsp://cam/live"));
        assert!(is_live_uri("udp://0.0.0.0:5000"));
        assert!(!is_live_uri("a.mp4"));
    }
}
