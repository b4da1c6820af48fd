//! `pipeline`: an operator's own `gst-launch-1.0` description ending in `appsink name=sink`.
//!
//! For what the other kinds do not cover: a camera that needs a vendor element, a hardware
//! decoder, a test rig (`videotestsrc ! jpegenc ! jpegdec` emulates an MJPEG camera). The
//! description is parsed as it is; edgesight then finds the element named `sink`, checks that
//! it is an `appsink`, makes it keep only the newest RGB frame, and puts a `videoconvert` in
//! front of it (when it is statically linked) so the operator need not care about the format.
//! The stream is treated as live: when it ends or fails it is rebuilt.

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::super::SourceError;
use super::super::pipeline::{Built, Input, make};
use crate::config::StreamSettings;
use crate::config::check_launch;

pub(in crate::source) fn build(
    settings: &StreamSettings,
    stream: &str,
) -> Result<Built, SourceError> {
    let error = |reason: String| SourceError::Pipeline { stream: stream.to_string(), reason };
    let Some(launch) = settings.pipeline.as_deref() else {
        return Err(error("a pipeline stream needs a pipeline".into()));
    };
    check_launch(launch).map_err(|reason| error(format!("pipeline {reason}")))?;
    let parsed = gst::parse::launch(launch)
        .map_err(|failure| error(format!("pipeline cannot be parsed: {failure}")))?;
    let pipeline = parsed.downcast::<gst::Pipeline>().map_err(|element| {
        error(format!("pipeline is a single element ({}), not a graph", element.name()))
    })?;
    pipeline.set_property("name", format!("edgesight-{stream}"));
    let named = pipeline
        .by_name("sink")
        .ok_or_else(|| error("pipeline has no element named `sink`".into()))?;
    let factory = named.factory().map(|factory| factory.name().to_string()).unwrap_or_default();
    let sink = named.downcast::<gst_app::AppSink>().map_err(|_| {
        error(format!("pipeline: the element named `sink` is a {factory}, not an appsink"))
    })?;
    let caps = gst::Caps::builder("video/x-raw").field("format", "RGB").build();
    sink.set_caps(Some(&caps));
    sink.set_max_buffers(1);
    sink.set_drop(true);
    sink.set_property("enable-last-sample", false);
    insert_converter(&pipeline, &sink, stream)?;
    Ok(Built { pipeline, sink, input: Input::Fixed, live: true, ends: false })
}

/// Puts a `videoconvert` between the sink and what feeds it, when that link already exists.
/// (A sink fed from a dynamic pad gets its input later; then the description must deliver
/// something the RGB caps accept, e.g. by ending in `videoconvert ! appsink name=sink`.)
fn insert_converter(
    pipeline: &gst::Pipeline,
    sink: &gst_app::AppSink,
    stream: &str,
) -> Result<(), SourceError> {
    let error = |reason: String| SourceError::Pipeline { stream: stream.to_string(), reason };
    let Some(sink_pad) = sink.static_pad("sink") else {
        return Ok(());
    };
    let Some(peer) = sink_pad.peer() else {
        return Ok(());
    };
    let convert = make("videoconvert", stream)?;
    peer.unlink(&sink_pad)
        .map_err(|failure| error(format!("cannot relink the sink: {failure}")))?;
    pipeline
        .add(&convert)
        .map_err(|failure| error(format!("cannot add a converter: {failure}")))?;
    let convert_sink =
        convert.static_pad("sink").ok_or_else(|| error("no converter pad".into()))?;
    peer.link(&convert_sink)
        .map_err(|failure| error(format!("cannot link the converter: {failure:?}")))?;
    convert.link(sink).map_err(|failure| error(format!("cannot link the converter: {failure}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(launch: &str) -> StreamSettings {
        StreamSettings {
            name: "rig".into(),
            kind: "pipeline".into(),
            pipeline: Some(launch.into()),
            ..StreamSettings::default()
        }
    }

    fn error(launch: &str) -> String {
        gst::init().unwrap();
        match build(&settings(launch), "rig") {
            Ok(_) => panic!("{launch} was accepted"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn refuses_descriptions_without_an_appsink_named_sink() {
        assert!(error("videotestsrc ! fakesink").contains("appsink name=sink"));
        assert!(error("videotestsrc ! nosuchelement ! appsink name=sink").contains("parsed"));
        let not_appsink = error("videotestsrc ! fakesink name=sink ! appsink name=sink");
        assert!(not_appsink.starts_with("stream rig: pipeline"), "{not_appsink}");
    }

    #[test]
    fn puts_a_converter_in_front_of_the_sink() {
        gst::init().unwrap();
        let built = build(&settings("videotestsrc ! appsink name=sink"), "rig").unwrap();
        let feeding = built.sink.static_pad("sink").and_then(|pad| pad.peer()).unwrap();
        let parent = feeding.parent_element().unwrap();
        assert_eq!(parent.factory().unwrap().name(), "videoconvert");
        assert!(built.live && !built.ends);
    }
}
