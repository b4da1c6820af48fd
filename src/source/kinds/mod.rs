//! Element graphs of the live source kinds: `v4l2` (USB and CSI cameras), `rtsp` (IP
//! cameras), `uri` (anything `uridecodebin` plays) and `pipeline` (an operator's own launch
//! description). Each ends in the same RGB `appsink` as `file` and `test`, so the runner does
//! not care where frames come from; each is built afresh on every (re)start by the supervisor.

pub(super) mod launch;
pub(super) mod rtsp;
pub(super) mod uri;
pub(super) mod v4l2;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::SourceError;

/// A pipeline named after the stream holding `elements` and `sink`, with the given chains
/// linked (each a run of elements linked in order; dynamic links are made by the caller).
pub(super) fn assemble(
    stream: &str,
    elements: &[&gst::Element],
    sink: &gst_app::AppSink,
    chains: &[&[&gst::Element]],
) -> Result<gst::Pipeline, SourceError> {
    let error = |reason: String| SourceError::Pipeline { stream: stream.to_string(), reason };
    let pipeline = gst::Pipeline::with_name(&format!("edgesight-{stream}"));
    pipeline
        .add_many(elements.iter().copied().chain([sink.upcast_ref()]))
        .map_err(|failure| error(format!("cannot assemble the pipeline: {failure}")))?;
    for chain in chains {
        gst::Element::link_many(chain.iter().copied())
            .map_err(|failure| error(format!("cannot link the pipeline: {failure}")))?;
    }
    Ok(pipeline)
}
