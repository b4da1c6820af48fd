//! The GStreamer element graphs, one per source kind, all ending in the same RGB `appsink`.
//!
//! `file`: `filesrc ! decodebin`, whose first video pad is linked (when decodebin exposes it)
//! to `videoconvert ! videoflip video-direction=auto ! video/x-raw,format=RGB ! appsink`.
//! Other pads (audio, subtitles) stay unlinked, which GStreamer allows as long as one pad of
//! the demuxer is linked; when decodebin has exposed all its pads and none is video, the graph
//! posts an `edgesight-no-video` application message so the runner can say so in words.
//! `videoflip` applies rotation tags (a phone's display matrix) so frames arrive upright.
//!
//! `test`: `videotestsrc is-live=true` at 30 fps and the configured size, for demos and tests.
//!
//! The live kinds (`v4l2`, `rtsp`, `uri`, `pipeline`) are built in [`super::kinds`] from the
//! helpers here.
//!
//! The graph is built in [`build`] on the caller's thread, so a missing plugin or a bad pattern
//! fails `spawn` at once; it is started by the runner.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gstreamer as gst;
use gstreamer::glib;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::SourceError;
use crate::config::StreamSettings;

/// The name of the application message posted when a file has no video stream.
pub(super) const NO_VIDEO_MESSAGE: &str = "edgesight-no-video";

/// Default test-source size, pixels.
const TEST_WIDTH: u32 = 320;
const TEST_HEIGHT: u32 = 240;
/// The test source's frame rate, frames per second.
const TEST_RATE: i32 = 30;

/// A built, not yet started pipeline.
pub(super) struct Built {
    pub pipeline: gst::Pipeline,
    pub sink: gst_app::AppSink,
    pub input: Input,
    /// A live source: stale frames are dropped rather than queued, and the source is rebuilt
    /// when it fails, stalls or ends (unless `ends`).
    pub live: bool,
    /// The end of the input ends the stream (a file, a `test` with `frames`, a non-live
    /// `uri`); otherwise a live source's end is a reason to rebuild it.
    pub ends: bool,
}

pub(super) enum Input {
    File {
        path: PathBuf,
        looping: bool,
        /// Set once decodebin's video pad is linked.
        video_linked: Arc<AtomicBool>,
    },
    /// A graph whose video path is fixed when it is built (`test`, `pipeline`, `v4l2` with a
    /// set format).
    Fixed,
    /// A graph that finds its video pad at run time (`rtsp`, `uri`, `v4l2` with `auto`).
    Dynamic {
        /// Set once the video pad is linked.
        video_linked: Arc<AtomicBool>,
    },
}

pub(super) fn build(settings: &StreamSettings, stream: &str) -> Result<Built, SourceError> {
    match settings.kind.as_str() {
        "file" => build_file(settings, stream),
        "test" => build_test(settings, stream),
        "v4l2" => super::kinds::v4l2::build(settings, stream),
        "rtsp" => super::kinds::rtsp::build(settings, stream),
        "uri" => super::kinds::uri::build(settings, stream),
        "pipeline" => super::kinds::launch::build(settings, stream),
        other => Err(SourceError::Pipeline {
            stream: stream.to_string(),
            reason: format!("source kind {other:?} is not supported by this version"),
        }),
    }
}

fn build_file(settings: &StreamSettings, stream: &str) -> Result<Built, SourceError> {
    let error = |reason: String| SourceError::Pipeline { stream: stream.to_string(), reason };
    let Some(path) = settings.path.clone() else {
        return Err(error("a file stream needs a path".into()));
    };
    let realtime = settings.realtime.unwrap_or(false);
    let looping = settings.looping.unwrap_or(false);

    let source = make("filesrc", stream)?;
    source.set_property("location", path.to_string_lossy().as_ref());
    let decode = make("decodebin", stream)?;
    // TODO: interlaced video (DVB, DVD, analogue capture) arrives with combing, because no
    // deinterlacer sits in the graph; a `deinterlace` element before `videoconvert` (it passes
    // progressive video through) would retire this once its CPU cost is measured on ARM.
    let convert = make("videoconvert", stream)?;
    let flip = gst::ElementFactory::make("videoflip")
        .property_from_str("video-direction", "auto")
        .build()
        .map_err(|_| missing("videoflip", stream))?;
    // A file is not live: without pacing it waits for the engine (no drops); with pacing it
    // plays at its own speed.
    let sink = rgb_sink(realtime, false);

    let pipeline = gst::Pipeline::with_name(&format!("edgesight-{stream}"));
    pipeline
        .add_many([&source, &decode, &convert, &flip, sink.upcast_ref()])
        .map_err(|failure| error(format!("cannot assemble the pipeline: {failure}")))?;
    gst::Element::link(&source, &decode)
        .and_then(|()| gst::Element::link_many([&convert, &flip, sink.upcast_ref()]))
        .map_err(|failure| error(format!("cannot link the pipeline: {failure}")))?;

    let video_linked = Arc::new(AtomicBool::new(false));
    link_first_video_pad(&decode, &convert, Arc::clone(&video_linked), stream);
    let input = Input::File { path, looping, video_linked };
    Ok(Built { pipeline, sink, input, live: false, ends: true })
}

/// Links decodebin's first video pad to `convert`, and posts [`NO_VIDEO_MESSAGE`] when
/// decodebin has exposed all its pads without a video one. Both callbacks run on GStreamer's
/// streaming threads and only check caps and link.
pub(super) fn link_first_video_pad(
    decode: &gst::Element,
    convert: &gst::Element,
    video_linked: Arc<AtomicBool>,
    stream: &str,
) {
    let Some(convert_sink) = convert.static_pad("sink") else {
        return;
    };
    let stream_name: Arc<str> = Arc::from(stream);
    let linked = Arc::clone(&video_linked);
    decode.connect_pad_added(move |_, pad| {
        let caps = pad.current_caps().unwrap_or_else(|| pad.query_caps(None));
        let media = caps.structure(0).map(|structure| structure.name().to_string());
        let is_video = media.as_deref().is_some_and(|name| name.starts_with("video/"));
        if !is_video {
            tracing::debug!(stream = %stream_name, ?media, "leaving a non-video pad unlinked");
            return;
        }
        if convert_sink.is_linked() {
            tracing::debug!(stream = %stream_name, "ignoring a second video stream");
            return;
        }
        match pad.link(&convert_sink) {
            Ok(_) => linked.store(true, Ordering::SeqCst),
            Err(failure) => {
                tracing::warn!(stream = %stream_name, ?failure, "cannot link the video stream");
            }
        }
    });
    decode.connect_no_more_pads(move |decode| {
        if !video_linked.load(Ordering::SeqCst) {
            let structure = gst::Structure::new_empty(NO_VIDEO_MESSAGE);
            let message = gst::message::Application::builder(structure).src(decode).build();
            let _ = decode.post_message(message);
        }
    });
}

fn build_test(settings: &StreamSettings, stream: &str) -> Result<Built, SourceError> {
    let error = |reason: String| SourceError::Pipeline { stream: stream.to_string(), reason };
    let source = make("videotestsrc", stream)?;
    source.set_property("is-live", true);
    let pattern = settings.pattern.as_deref().unwrap_or("smpte");
    set_enum_by_nick(&source, "pattern", pattern).map_err(error)?;
    if let Some(frames) = settings.frames {
        source.set_property("num-buffers", i32::try_from(frames).unwrap_or(i32::MAX));
    }
    let size = gst::Caps::builder("video/x-raw")
        .field("width", settings.width.unwrap_or(TEST_WIDTH) as i32)
        .field("height", settings.height.unwrap_or(TEST_HEIGHT) as i32)
        .field("framerate", gst::Fraction::new(TEST_RATE, 1))
        .build();
    let filter = make("capsfilter", stream)?;
    filter.set_property("caps", &size);
    let convert = make("videoconvert", stream)?;
    let sink = rgb_sink(true, true);

    let pipeline = gst::Pipeline::with_name(&format!("edgesight-{stream}"));
    pipeline
        .add_many([&source, &filter, &convert, sink.upcast_ref()])
        .map_err(|failure| error(format!("cannot assemble the pipeline: {failure}")))?;
    gst::Element::link_many([&source, &filter, &convert, sink.upcast_ref()])
        .map_err(|failure| error(format!("cannot link the pipeline: {failure}")))?;
    Ok(Built { pipeline, sink, input: Input::Fixed, live: true, ends: settings.frames.is_some() })
}

/// The RGB sink every graph ends in. `sync`: pace by timestamps. `live`: keep only the newest
/// frame (older ones are dropped while the engine is busy); otherwise hold two and make the
/// pipeline wait, so a file loses nothing.
pub(super) fn rgb_sink(sync: bool, live: bool) -> gst_app::AppSink {
    let caps = gst::Caps::builder("video/x-raw").field("format", "RGB").build();
    gst_app::AppSink::builder()
        .caps(&caps)
        .sync(sync)
        .max_buffers(if live { 1 } else { 2 })
        .drop(live)
        .enable_last_sample(false)
        .build()
}

pub(super) fn make(factory: &str, stream: &str) -> Result<gst::Element, SourceError> {
    gst::ElementFactory::make(factory).build().map_err(|_| missing(factory, stream))
}

fn missing(factory: &str, stream: &str) -> SourceError {
    SourceError::Pipeline {
        stream: stream.to_string(),
        reason: format!(
            "the GStreamer element {factory:?} is not installed (GStreamer plugins base and \
             good are needed)"
        ),
    }
}

/// Sets an enum property from its nick (`ball`) or number (`18`), listing the known nicks
/// when the value is not one of them.
pub(super) fn set_enum_by_nick(
    element: &gst::Element,
    property: &str,
    nick: &str,
) -> Result<(), String> {
    let spec = element
        .find_property(property)
        .ok_or_else(|| format!("{} has no property {property:?}", element.name()))?;
    let class = glib::EnumClass::with_type(spec.value_type())
        .ok_or_else(|| format!("{property:?} is not an enumeration"))?;
    let by_number = nick.parse::<i32>().ok().and_then(|number| class.to_value(number));
    let value = class.to_value_by_nick(nick).or(by_number).ok_or_else(|| {
        let known: Vec<&str> = class.values().iter().map(|value| value.nick()).collect();
        format!("unknown {property} {nick:?}; known: {}", known.join(", "))
    })?;
    element.set_property_from_value(property, &value);
    Ok(())
}
