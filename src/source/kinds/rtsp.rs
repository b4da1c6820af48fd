//! `rtsp`: an IP camera.
//!
//! `rtspsrc ! decodebin ! videoconvert ! appsink`. `rtspsrc` is told, through its
//! `select-stream` signal, to set up only the first video stream the camera announces, so a
//! camera whose SDP lists audio first (many do) still delivers its video and no bandwidth is
//! spent on audio. Credentials, from the `username`/`password` keys or from the URL, go to
//! `rtspsrc`'s `user-id`/`user-pw` properties and are cut out of the address it is given, so
//! GStreamer's own messages never carry them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gstreamer as gst;
use gstreamer::prelude::*;

use super::super::SourceError;
use super::super::pipeline::{Built, Input, link_first_video_pad, make, rgb_sink};
use super::super::redact::split_credentials;
use super::assemble;
use crate::config::StreamSettings;

/// Jitter buffer when `latency_ms` is not set, milliseconds (rtspsrc's own default is 2000,
/// far too long for a classifier that wants the newest frame).
pub(in crate::source) const DEFAULT_LATENCY_MS: u32 = 200;

/// `rtspsrc`'s `protocols` flags for a `transport` value.
pub(in crate::source) fn protocols(transport: Option<&str>) -> Option<&'static str> {
    match transport.unwrap_or("tcp") {
        "tcp" => Some("tcp"),
        "udp" => Some("udp+udp-mcast"),
        "auto" => Some("udp+udp-mcast+tcp"),
        _ => None,
    }
}

pub(in crate::source) fn build(
    settings: &StreamSettings,
    stream: &str,
) -> Result<Built, SourceError> {
    let error = |reason: String| SourceError::Pipeline { stream: stream.to_string(), reason };
    let Some(url) = settings.url.as_deref() else {
        return Err(error("an rtsp stream needs a url".into()));
    };
    let (location, in_url) = split_credentials(url);
    let credentials = match (&settings.username, &settings.password) {
        (Some(user), Some(password)) => Some((user.clone(), password.clone())),
        _ => in_url,
    };
    let transport = settings.transport.as_deref();
    let protocols = protocols(transport)
        .ok_or_else(|| error(format!("transport {transport:?} is not tcp, udp or auto")))?;

    let source = make("rtspsrc", stream)?;
    source.set_property("location", location.as_str());
    source.set_property("latency", settings.latency_ms.unwrap_or(DEFAULT_LATENCY_MS));
    source.set_property_from_str("protocols", protocols);
    if let Some((user, password)) = &credentials {
        source.set_property("user-id", user.as_str());
        source.set_property("user-pw", password.as_str());
    }
    let decode = make("decodebin", stream)?;
    let convert = make("videoconvert", stream)?;
    let sink = rgb_sink(true, true);
    let elements = [&source, &decode, &convert];
    let pipeline = assemble(stream, &elements, &sink, &[&[&convert, sink.as_ref()]])?;

    select_first_video(&source, stream);
    link_to_decoder(&source, &decode, stream);
    let video_linked = Arc::new(AtomicBool::new(false));
    link_first_video_pad(&decode, &convert, Arc::clone(&video_linked), stream);
    Ok(Built { pipeline, sink, input: Input::Dynamic { video_linked }, live: true, ends: false })
}

/// Sets up only the first stream whose SDP media is video.
fn select_first_video(source: &gst::Element, stream: &str) {
    let chosen = AtomicBool::new(false);
    let stream: Arc<str> = Arc::from(stream);
    source.connect("select-stream", false, move |values| {
        let caps = values.get(2).and_then(|value| value.get::<gst::Caps>().ok());
        let media = caps
            .as_ref()
            .and_then(|caps| caps.structure(0).and_then(|s| s.get::<String>("media").ok()));
        let take = media.as_deref() == Some("video") && !chosen.swap(true, Ordering::SeqCst);
        tracing::debug!(stream = %stream, ?media, take, "RTSP stream offered");
        Some(take.to_value())
    });
}

/// Links `rtspsrc`'s RTP pad (only the video one is set up) to the decoder.
fn link_to_decoder(source: &gst::Element, decode: &gst::Element, stream: &str) {
    let Some(decode_sink) = decode.static_pad("sink") else {
        return;
    };
    let stream: Arc<str> = Arc::from(stream);
    source.connect_pad_added(move |_, pad| {
        if decode_sink.is_linked() {
            tracing::debug!(stream = %stream, pad = %pad.name(), "ignoring a second RTP stream");
            return;
        }
        if let Err(failure) = pad.link(&decode_sink) {
            tracing::warn!(stream = %stream, ?failure, "cannot link the RTP stream");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_each_transport_and_refuses_others() {
        assert_eq!(protocols(None), Some("tcp"));
        assert_eq!(protocols(Some("udp")), Some("udp+udp-mcast"));
        assert_eq!(protocols(Some("auto")), Some("udp+udp-mcast+tcp"));
        assert_eq!(protocols(Some("quic")), None);
    }

    #[test]
    fn credentials_leave_the_address_for_the_properties() {
        gstreamer::init().unwrap();
        let settings = StreamSettings {
            name: "cam".into(),
            kind: "rtsp".into(),
            url: Some("rtsp://admin:hunter2@127.0.0.1:9/live".into()),
            transport: Some("udp".into()),
            latency_ms: Some(50),
            ..StreamSettings::default()
        };
        let built = build(&settings, "cam").unwrap();
        let source = built
            .pipeline
            .by_name("rtspsrc0")
            .or_else(|| built.pipeline.iterate_sources().into_iter().find_map(Result::ok));
        let source = source.expect("rtspsrc");
        assert_eq!(source.property::<String>("location"), "rtsp://127.0.0.1:9/live");
        assert_eq!(source.property::<String>("user-id"), "admin");
        assert_eq!(source.property::<String>("user-pw"), "hunter2");
        assert_eq!(source.property::<u32>("latency"), 50);
        assert!(built.live && !built.ends);
    }
}
