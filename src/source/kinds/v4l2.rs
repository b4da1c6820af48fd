//! `v4l2`: a camera through Video4Linux2.
//!
//! `v4l2src device=… ! capsfilter ! [decoder] ! videoconvert ! appsink`. The caps ask the
//! camera for a size, a rate and an encoding: `mjpeg` asks for `image/jpeg` and decodes it
//! with `jpegdec` (most USB cameras reach 720p30 or more only this way), `yuyv` asks for raw
//! `YUY2`, and `auto` allows both and lets `decodebin` take whatever the camera negotiates.
//! [`camera_caps`] and [`decoder`] are pure so that tests check them without a camera.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use gstreamer as gst;
use gstreamer::prelude::*;

use super::super::SourceError;
use super::super::pipeline::{Built, Input, link_first_video_pad, make, rgb_sink};
use super::assemble;
use crate::config::StreamSettings;

/// The device when none is configured.
pub(in crate::source) const DEFAULT_DEVICE: &str = "/dev/video0";

/// The camera's encoding, from the `format` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::source) enum CameraFormat {
    Auto,
    Mjpeg,
    Yuyv,
}

impl CameraFormat {
    pub(in crate::source) fn parse(format: Option<&str>) -> Option<CameraFormat> {
        match format.unwrap_or("auto") {
            "auto" => Some(CameraFormat::Auto),
            "mjpeg" => Some(CameraFormat::Mjpeg),
            "yuyv" => Some(CameraFormat::Yuyv),
            _ => None,
        }
    }
}

/// The caps asked of the camera: one structure per allowed encoding, each with the
/// configured size and rate.
pub(in crate::source) fn camera_caps(
    format: CameraFormat,
    width: Option<u32>,
    height: Option<u32>,
    framerate: Option<f64>,
) -> gst::Caps {
    let structure = |name: &str, raw_format: Option<&str>| {
        let mut builder = gst::Structure::builder(name);
        if let Some(raw_format) = raw_format {
            builder = builder.field("format", raw_format);
        }
        if let Some(width) = width {
            builder = builder.field("width", width as i32);
        }
        if let Some(height) = height {
            builder = builder.field("height", height as i32);
        }
        if let Some(rate) = framerate.and_then(gst::Fraction::approximate_f64) {
            builder = builder.field("framerate", rate);
        }
        builder.build()
    };
    let mut caps = gst::Caps::new_empty();
    let caps_mut = caps.make_mut();
    match format {
        CameraFormat::Mjpeg => caps_mut.append_structure(structure("image/jpeg", None)),
        CameraFormat::Yuyv => caps_mut.append_structure(structure("video/x-raw", Some("YUY2"))),
        CameraFormat::Auto => {
            caps_mut.append_structure(structure("video/x-raw", None));
            caps_mut.append_structure(structure("image/jpeg", None));
        }
    }
    caps
}

/// The element between the caps filter and `videoconvert`, if any.
pub(in crate::source) fn decoder(format: CameraFormat) -> Option<&'static str> {
    match format {
        CameraFormat::Auto => Some("decodebin"),
        CameraFormat::Mjpeg => Some("jpegdec"),
        CameraFormat::Yuyv => None,
    }
}

pub(in crate::source) fn build(
    settings: &StreamSettings,
    stream: &str,
) -> Result<Built, SourceError> {
    let error = |reason: String| SourceError::Pipeline { stream: stream.to_string(), reason };
    let format = CameraFormat::parse(settings.format.as_deref())
        .ok_or_else(|| error(format!("format {:?} is not auto, mjpeg or yuyv", settings.format)))?;
    let device = settings.device.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_DEVICE));
    let source = make("v4l2src", stream)?;
    source.set_property("device", device.to_string_lossy().as_ref());
    let filter = make("capsfilter", stream)?;
    filter.set_property(
        "caps",
        camera_caps(format, settings.width, settings.height, settings.framerate),
    );
    let convert = make("videoconvert", stream)?;
    let sink = rgb_sink(true, true);
    let (pipeline, input) = match decoder(format) {
        Some("decodebin") => {
            let decode = make("decodebin", stream)?;
            let elements = [&source, &filter, &decode, &convert];
            let pipeline = assemble(
                stream,
                &elements,
                &sink,
                &[&[&source, &filter, &decode], &[&convert, sink.as_ref()]],
            )?;
            let video_linked = Arc::new(AtomicBool::new(false));
            link_first_video_pad(&decode, &convert, Arc::clone(&video_linked), stream);
            (pipeline, Input::Dynamic { video_linked })
        }
        Some(factory) => {
            let decode = make(factory, stream)?;
            let elements = [&source, &filter, &decode, &convert];
            let chain = [&source, &filter, &decode, &convert, sink.as_ref()];
            (assemble(stream, &elements, &sink, &[&chain])?, Input::Fixed)
        }
        None => {
            let elements = [&source, &filter, &convert];
            let chain = [&source, &filter, &convert, sink.as_ref()];
            (assemble(stream, &elements, &sink, &[&chain])?, Input::Fixed)
        }
    };
    Ok(Built { pipeline, sink, input, live: true, ends: false })
}

#[cfg(test)]
mod tests {
    //! There is no camera (no /dev/video*) on the build machines, so these tests check the
    //! caps and the element graph that would be started, not frames from a device.

    use gstreamer::prelude::*;

    use super::*;

    fn settings(format: &str) -> StreamSettings {
        StreamSettings {
            name: "cam".into(),
            kind: "v4l2".into(),
            device: Some("/dev/video7".into()),
            width: Some(1280),
            height: Some(720),
            framerate: Some(29.97),
            format: Some(format.into()),
            ..StreamSettings::default()
        }
    }

    /// The factories of the pipeline's elements, sorted.
    fn factories(built: &Built) -> Vec<String> {
        let mut names: Vec<String> = built
            .pipeline
            .children()
            .iter()
            .map(|element| match element.factory() {
                Some(factory) => factory.name().to_string(),
                // An appsink made through its builder has a factory only once the app plugin
                // was loaded, which depends on what else ran in this process.
                None if element.is::<gstreamer_app::AppSink>() => "appsink".to_string(),
                None => element.type_().name().to_string(),
            })
            .collect();
        names.sort();
        names
    }

    fn filter_caps(built: &Built) -> gst::Caps {
        let filter =
            built.pipeline.iterate_elements().into_iter().filter_map(Result::ok).find(|element| {
                element.factory().is_some_and(|factory| factory.name() == "capsfilter")
            });
        filter.expect("a capsfilter").property::<gst::Caps>("caps")
    }

    #[test]
    fn mjpeg_asks_for_jpeg_and_decodes_it() {
        let caps = camera_caps(CameraFormat::Mjpeg, Some(1280), Some(720), Some(30.0));
        assert_eq!(
            caps.to_string(),
            "image/jpeg, width=(int)1280, height=(int)720, framerate=(fraction)30/1"
        );
        assert_eq!(decoder(CameraFormat::Mjpeg), Some("jpegdec"));
    }

    #[test]
    fn yuyv_asks_for_raw_yuy2_without_a_decoder() {
        let caps = camera_caps(CameraFormat::Yuyv, None, None, Some(15.0));
        assert_eq!(caps.to_string(), "video/x-raw, format=(string)YUY2, framerate=(fraction)15/1");
        assert_eq!(decoder(CameraFormat::Yuyv), None);
    }

    #[test]
    fn auto_allows_raw_and_jpeg_and_an_ntsc_rate_stays_exact() {
        let caps = camera_caps(CameraFormat::Auto, Some(640), None, Some(29.97));
        assert_eq!(caps.size(), 2);
        let names: Vec<&str> = caps.iter().map(|structure| structure.name().as_str()).collect();
        assert_eq!(names, ["video/x-raw", "image/jpeg"]);
        let rate = caps.structure(0).unwrap().get::<gst::Fraction>("framerate").unwrap();
        assert_eq!((rate.numer(), rate.denom()), (2997, 100));
        assert_eq!(CameraFormat::parse(None), Some(CameraFormat::Auto));
        assert_eq!(CameraFormat::parse(Some("h264")), None);
    }

    #[test]
    fn builds_each_graph_for_the_configured_device() {
        gstreamer::init().unwrap();
        let mjpeg = build(&settings("mjpeg"), "cam").unwrap();
        assert_eq!(
            factories(&mjpeg),
            ["appsink", "capsfilter", "jpegdec", "v4l2src", "videoconvert"]
        );
        assert!(mjpeg.live && !mjpeg.ends);
        let source = mjpeg.pipeline.iterate_sources().into_iter().next().unwrap().unwrap();
        assert_eq!(source.property::<String>("device"), "/dev/video7");
        assert!(filter_caps(&mjpeg).structure(0).unwrap().name() == "image/jpeg");

        let yuyv = build(&settings("yuyv"), "cam").unwrap();
        assert_eq!(factories(&yuyv), ["appsink", "capsfilter", "v4l2src", "videoconvert"]);

        let auto = build(&StreamSettings { format: None, device: None, ..settings("auto") }, "cam")
            .unwrap();
        assert!(factories(&auto).contains(&"decodebin".to_string()));
        assert!(matches!(auto.input, Input::Dynamic { .. }));
        let source = auto.pipeline.iterate_sources().into_iter().next().unwrap().unwrap();
        assert_eq!(source.property::<String>("device"), DEFAULT_DEVICE);
    }
}
