//! Sources against real GStreamer and the real media files of the shared corpus.
//!
//! These tests check what a unit test cannot: that frames come out of actual decoders with the
//! right bytes (row padding removed, rotation applied), that the fps cap counts the way the
//! file's timestamps say, and that broken, audio-only and missing files end in a clear error
//! instead of a panic or a hang. Every wait has a timeout, so a hang fails the test.

mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use edgesight::config::{SourcesSettings, StreamSettings};
use edgesight::metrics::Metrics;
use edgesight::preprocess::{Preprocess, load_image};
use edgesight::source::{SourceError, SourceEvent, SourceFrame, read_video, spawn};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;

use common::bundle::{corpus, corpus_dir};

fn file_stream(name: &str, fps: f64) -> StreamSettings {
    StreamSettings {
        name: "cam".into(),
        kind: "file".into(),
        fps: Some(fps),
        // Not `corpus(name)`, which insists the file exists: some tests want a missing one.
        path: Some(corpus_dir().join(name)),
        ..StreamSettings::default()
    }
}

/// How a stream ended.
#[derive(Debug)]
enum End {
    Ended,
    Failed(SourceError),
}

/// Runs a stream to its end (or until `limit` frames, then stops it) and returns its frames.
fn run(settings: &StreamSettings, limit: usize, timeout: Duration) -> (Vec<SourceFrame>, End) {
    let (sender, events) = crossbeam_channel::bounded(2);
    let handle = spawn(settings, &SourcesSettings::default(), Metrics::new(), sender).unwrap();
    let deadline = Instant::now() + timeout;
    let mut frames = Vec::new();
    let end = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = events.recv_timeout(left).unwrap_or_else(|_| {
            panic!("{}: no final event within {timeout:?}", settings.name);
        });
        match event {
            SourceEvent::Frame(mut frame) => {
                frame.taken();
                assert_eq!(&*frame.stream, settings.name);
                frames.push(frame);
                if frames.len() == limit {
                    handle.stop();
                }
            }
            SourceEvent::Status { .. } => {}
            SourceEvent::Ended { .. } => break End::Ended,
            SourceEvent::Failed { error, .. } => break End::Failed(error),
        }
    };
    assert!(events.recv_timeout(Duration::from_millis(200)).is_err(), "events after the end");
    handle.join();
    (frames, end)
}

/// The first frame of `path` decoded another way: `uridecodebin` to RGBx (4 bytes a pixel,
/// never padded), with the x dropped.
fn reference_first_frame(path: &Path) -> (u32, u32, Vec<u8>) {
    gst::init().unwrap();
    let uri = gst::glib::filename_to_uri(path, None).unwrap();
    let description = format!(
        "uridecodebin uri={uri} ! videoconvert ! video/x-raw,format=RGBx ! \
         appsink name=sink sync=false max-buffers=1"
    );
    let pipeline = gst::parse::launch(&description).unwrap().downcast::<gst::Pipeline>().unwrap();
    let sink = pipeline.by_name("sink").unwrap().downcast::<gst_app::AppSink>().unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let sample = sink.try_pull_sample(gst::ClockTime::from_seconds(30)).unwrap();
    let info = gst_video::VideoInfo::from_caps(sample.caps().unwrap()).unwrap();
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(sample.buffer().unwrap(), &info)
        .unwrap();
    let (width, height) = (frame.width(), frame.height());
    let stride = frame.plane_stride()[0] as usize;
    let data = frame.plane_data(0).unwrap();
    let mut rgb = Vec::new();
    for row in 0..height as usize {
        for pixel in data[row * stride..][..width as usize * 4].chunks(4) {
            rgb.extend_from_slice(&pixel[..3]);
        }
    }
    drop(frame);
    pipeline.set_state(gst::State::Null).unwrap();
    (width, height, rgb)
}

fn assert_same_first_frame(name: &str, width: u32, height: u32) {
    let (frames, _) = run(&file_stream(name, 1.0), 1, Duration::from_secs(60));
    let frame = &frames[0].frame;
    assert_eq!((frame.width, frame.height), (width, height), "{name}");
    assert_eq!(frame.data.len(), (width * height * 3) as usize, "{name}: rows not packed");
    let (ref_width, ref_height, reference) = reference_first_frame(&corpus(name));
    assert_eq!((ref_width, ref_height), (width, height));
    let first_difference = frame.data.iter().zip(&reference).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "{name}: first differing byte");
}

#[test]
fn odd_width_854_frames_come_out_with_tight_rows() {
    assert_same_first_frame("vid_oddwidth_854x480_editlist.mp4", 854, 480);
}

#[test]
fn odd_width_3026_vfr_frames_come_out_with_tight_rows() {
    assert_same_first_frame("vid_vfr_oddwidth_3026x1386.mp4", 3026, 1386);
}

#[test]
fn one_pixel_video_comes_out_as_three_bytes() {
    let (frames, end) = run(&file_stream("vid_1x1_h264_yuv444.mp4", 30.0), 0, secs(30));
    assert!(matches!(end, End::Ended), "{end:?}");
    assert!(!frames.is_empty());
    assert!(frames.iter().all(|f| f.frame.data.len() == 3 && f.frame.width == 1));
}

#[test]
fn rotation_metadata_turns_frames_upright() {
    let (frames, _) =
        run(&file_stream("vid_rotate90_displaymatrix_1920x1080.mp4", 1.0), 1, secs(60));
    assert_eq!((frames[0].frame.width, frames[0].frame.height), (1080, 1920));
}

/// The container's duration and the video's frame rate, from a paused pipeline.
fn duration_and_rate(path: &Path) -> (f64, f64) {
    gst::init().unwrap();
    let uri = gst::glib::filename_to_uri(path, None).unwrap();
    let description = format!("uridecodebin uri={uri} ! appsink name=sink caps=video/x-raw");
    let pipeline = gst::parse::launch(&description).unwrap().downcast::<gst::Pipeline>().unwrap();
    let sink = pipeline.by_name("sink").unwrap().downcast::<gst_app::AppSink>().unwrap();
    pipeline.set_state(gst::State::Paused).unwrap();
    let (result, _, _) = pipeline.state(gst::ClockTime::from_seconds(30));
    result.unwrap();
    let duration = pipeline.query_duration::<gst::ClockTime>().unwrap().nseconds() as f64 / 1e9;
    let caps = sink.static_pad("sink").unwrap().current_caps().unwrap();
    let rate = caps.structure(0).unwrap().get::<gst::Fraction>("framerate").unwrap();
    pipeline.set_state(gst::State::Null).unwrap();
    (duration, f64::from(rate.numer()) / f64::from(rate.denom()))
}

#[test]
fn fps_cap_samples_the_count_the_duration_gives() {
    let name = "vid_h264_aac_160x90.mp4";
    let fps = 2.0;
    let (duration, rate) = duration_and_rate(&corpus(name));
    // Frames start at 0 and the last one starts one frame before the end; the sampler takes
    // one frame in each 1/fps cell that holds a frame.
    let last = duration - 1.0 / rate;
    let expected = (last * fps).floor() as usize + 1;
    let (frames, end) = run(&file_stream(name, fps), 0, secs(30));
    assert!(matches!(end, End::Ended), "{end:?}");
    assert_eq!(frames.len(), expected, "duration {duration} s at {rate} fps");
    for (index, frame) in frames.iter().enumerate() {
        assert_eq!(frame.index, index as u64);
        assert_eq!((frame.frame.width, frame.frame.height), (160, 90));
    }
    let positions: Vec<u64> = frames.iter().map(|f| f.position_ms.unwrap()).collect();
    assert!(positions.windows(2).all(|pair| pair[0] < pair[1]), "{positions:?}");
    assert_eq!(positions[0], 0);
}

#[test]
fn looping_file_starts_again_at_the_end() {
    let mut settings = file_stream("vid_h264_aac_160x90.mp4", 2.0);
    settings.looping = Some(true);
    let (frames, end) = run(&settings, 7, secs(30));
    assert!(matches!(end, End::Ended), "{end:?}");
    assert!(frames.len() >= 7);
    let restarts = frames.windows(2).filter(|pair| pair[1].position_ms < pair[0].position_ms);
    assert!(restarts.count() >= 2);
    assert!(frames.iter().enumerate().all(|(index, f)| f.index == index as u64));
}

#[test]
fn realtime_file_is_paced_by_its_timestamps() {
    let mut settings = file_stream("vid_h264_aac_160x90.mp4", 30.0);
    settings.realtime = Some(true);
    let started = Instant::now();
    let (frames, end) = run(&settings, 0, secs(30));
    assert!(matches!(end, End::Ended), "{end:?}");
    assert_eq!(frames.len(), 15);
    // 15 frames at 15 fps: the last one is due at 0.93 s.
    assert!(started.elapsed() >= Duration::from_millis(850), "{:?}", started.elapsed());
}

fn assert_failed(end: &End, words: &str, name: &str) {
    let End::Failed(error) = end else {
        panic!("{name}: expected a failure, got {end:?}");
    };
    let message = error.to_string();
    assert!(message.contains(words), "{name}: {message}");
    assert!(message.contains("stream cam"), "{message}");
}

#[test]
fn audio_only_files_fail_with_no_video_stream() {
    for name in ["vid_audio_only_vorbis.mkv", "vid_audio_only_two_aac_tracks.mp4"] {
        let (frames, end) = run(&file_stream(name, 1.0), 0, secs(30));
        assert!(frames.is_empty());
        assert!(matches!(end, End::Failed(SourceError::NoVideo { .. })), "{name}: {end:?}");
        assert_failed(&end, "no video stream", name);
        assert_failed(&end, name, name);
    }
}

#[test]
fn missing_file_fails_with_no_such_file() {
    let (frames, end) = run(&file_stream("not_there.mp4", 1.0), 0, secs(10));
    assert!(frames.is_empty());
    assert!(matches!(end, End::Failed(SourceError::NoSuchFile { .. })), "{end:?}");
    assert_failed(&end, "not_there.mp4: no such file", "missing");
}

#[test]
fn truncated_files_end_with_a_clear_error_after_their_frames() {
    // A 4 kB cut of an AVCHD file: no frame decodes.
    let name = "vid_truncated_avchd_4000B.mts";
    let (frames, end) = run(&file_stream(name, 30.0), 0, secs(30));
    assert!(frames.is_empty());
    assert_failed(&end, name, name);
    // An MP4 cut at 100 kB: a few frames, then the demuxer stops without an error; the source
    // compares with the declared 35 s.
    let name = "vid_truncated_h264_100000B.mp4";
    let (frames, end) = run(&file_stream(name, 30.0), 0, secs(30));
    assert!(!frames.is_empty());
    assert_failed(&end, "truncated", name);
}

#[test]
fn test_source_ends_after_its_frames() {
    let settings = StreamSettings {
        name: "pattern".into(),
        kind: "test".into(),
        fps: Some(10.0),
        pattern: Some("ball".into()),
        width: Some(64),
        height: Some(48),
        frames: Some(15),
        ..StreamSettings::default()
    };
    let (frames, end) = run(&settings, 0, secs(20));
    assert!(matches!(end, End::Ended), "{end:?}");
    // 15 frames at 30 fps span 0.5 s: cells of 100 ms starting at frames 0, 3, 6, 9, 12.
    assert_eq!(frames.len(), 5);
    assert!(frames.iter().all(|f| f.frame.width == 64 && f.frame.data.len() == 64 * 48 * 3));
}

#[test]
fn test_source_stops_when_asked() {
    let settings = StreamSettings {
        name: "endless".into(),
        kind: "test".into(),
        fps: Some(30.0),
        ..StreamSettings::default()
    };
    let started = Instant::now();
    let (frames, end) = run(&settings, 3, secs(10));
    assert!(matches!(end, End::Ended), "{end:?}");
    assert!(frames.len() >= 3);
    assert_eq!((frames[0].frame.width, frames[0].frame.height), (320, 240));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_live_stream_keeps_one_frame_in_the_engine_queue_and_it_is_a_fresh_one() {
    let settings = StreamSettings {
        name: "live".into(),
        kind: "test".into(),
        fps: Some(30.0),
        ..StreamSettings::default()
    };
    // A queue with room for eight frames that nobody reads for a second: a busy engine.
    let (sender, events) = crossbeam_channel::bounded(8);
    let metrics = Metrics::new();
    let handle = spawn(&settings, &SourcesSettings::default(), metrics.clone(), sender).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let waiting: Vec<SourceEvent> = events.try_iter().collect();
    let frames: Vec<&SourceFrame> = waiting
        .iter()
        .filter_map(|event| match event {
            SourceEvent::Frame(frame) => Some(frame),
            _ => None,
        })
        .collect();
    assert_eq!(frames.len(), 1, "one frame of the live stream waited, not a backlog");
    drop(waiting);
    let stream = metrics.stream("live");
    assert!(stream.dropped.load(std::sync::atomic::Ordering::Relaxed) > 10, "stale frames dropped");

    // The next frame handed over is a current one, not one from the start of the wait.
    let next = loop {
        match events.recv_timeout(secs(5)).expect("another frame") {
            SourceEvent::Frame(frame) => break frame,
            _ => continue,
        }
    };
    let age = next.captured.elapsed().unwrap_or_default();
    assert!(age < Duration::from_millis(300), "the next frame is {age:?} old");
    handle.stop();
    while events.recv_timeout(secs(5)).is_ok() {}
    handle.join();
}

#[test]
fn unknown_test_pattern_is_refused_at_spawn() {
    let settings = StreamSettings {
        name: "bad".into(),
        kind: "test".into(),
        pattern: Some("plaid".into()),
        ..StreamSettings::default()
    };
    let (sender, _events) = crossbeam_channel::bounded(1);
    let error = spawn(&settings, &SourcesSettings::default(), Metrics::new(), sender)
        .unwrap_err()
        .to_string();
    assert!(error.contains("plaid") && error.contains("ball"), "{error}");
}

fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

fn corpus_files(prefix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .collect();
    files.sort();
    files
}

#[test]
fn every_corpus_video_gives_frames_or_a_clear_error() {
    let mut report = Vec::new();
    for path in corpus_files("vid_") {
        let (done, outcome) = mpsc::channel();
        let reading = path.clone();
        std::thread::spawn(move || {
            let mut frames = 0;
            let mut error = None;
            for item in read_video(&reading, 5.0) {
                match item {
                    Ok(frame) => {
                        assert_eq!(
                            frame.frame.data.len() as u32,
                            frame.frame.width * frame.frame.height * 3
                        );
                        frames += 1;
                    }
                    Err(failure) => error = Some(failure.to_string()),
                }
            }
            let _ = done.send((frames, error));
        });
        let (frames, error) = outcome
            .recv_timeout(secs(120))
            .unwrap_or_else(|_| panic!("{}: hung or panicked", path.display()));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if let Some(error) = &error {
            assert!(error.contains(&name), "{name}: error does not name the file: {error}");
        } else {
            assert!(frames > 0, "{name}: neither frames nor an error");
        }
        report.push(format!("{name}: {frames} frames, {error:?}"));
    }
    println!("{}", report.join("\n"));
}

#[test]
fn every_corpus_image_gives_a_finite_tensor_or_a_clear_error() {
    let preprocess =
        Preprocess { size: 224, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };
    let mut tensor = vec![0.0; 3 * 224 * 224];
    let mut report = Vec::new();
    for path in corpus_files("img_") {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match load_image(&path) {
            Ok(frame) => {
                preprocess.write_tensor(&frame, &mut tensor);
                assert!(tensor.iter().all(|v| v.is_finite()), "{name}");
                report.push(format!("{name}: {}×{}", frame.width, frame.height));
            }
            Err(error) => {
                let message = error.to_string();
                assert!(message.contains(&name), "{message}");
                report.push(format!("{name}: {message}"));
            }
        }
    }
    println!("{}", report.join("\n"));
    // The EXIF orientation is applied: stored 1200×1800, shown 1800×1200.
    let landscape = load_image(&corpus("img_exif_landscape_6.jpg")).unwrap();
    assert_eq!((landscape.width, landscape.height), (1800, 1200));
    // The bombs are refused from their headers.
    let bomb = load_image(&corpus("img_bmp_bad_reallybig.bmp")).unwrap_err().to_string();
    assert!(bomb.contains("decompression bomb") || bomb.contains("large"), "{bomb}");
}

/// Timings for the report; run with `cargo test --test source_frames -- --ignored --nocapture`.
/// The numbers depend on the build profile (the crate itself builds at opt-level 1 in `dev`).
#[test]
#[ignore = "prints timings, asserts nothing"]
fn reports_timings() {
    let preprocess =
        Preprocess { size: 224, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };
    let data: Vec<u8> = (0..1280 * 720 * 3).map(|index| (index % 251) as u8).collect();
    let frame = edgesight::preprocess::Frame { width: 1280, height: 720, data };
    let mut tensor = vec![0.0; 3 * 224 * 224];
    preprocess.write_tensor(&frame, &mut tensor);
    let rounds = 200;
    let started = Instant::now();
    for _ in 0..rounds {
        preprocess.write_tensor(&frame, &mut tensor);
    }
    let per_call = started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds);
    println!("write_tensor 1280×720 → 224: {per_call:.0} µs");

    let path = corpus("vid_vp8_vorbis_1280x720.webm");
    let started = Instant::now();
    let frames = read_video(&path, 1000.0).filter(|item| item.is_ok()).count();
    let elapsed = started.elapsed().as_secs_f64();
    println!("read_video 1280×720 VP8: {frames} frames in {elapsed:.3} s (with start-up)");

    let mut settings = file_stream("vid_vp8_vorbis_1280x720.webm", 1000.0);
    settings.looping = Some(true);
    let (sender, events) = crossbeam_channel::bounded(4);
    let handle = spawn(&settings, &SourcesSettings::default(), Metrics::new(), sender).unwrap();
    let mut first = None;
    let mut count = 0;
    for event in events.iter() {
        match event {
            SourceEvent::Frame(_) => {
                count += 1;
                first.get_or_insert_with(Instant::now);
                if count == 241 {
                    handle.stop();
                }
            }
            SourceEvent::Status { .. } => {}
            _ => break,
        }
    }
    let elapsed = first.map_or(0.0, |first| first.elapsed().as_secs_f64());
    println!(
        "looping 1280×720 VP8: {:.1} frames/s decoded and copied",
        (count - 1) as f64 / elapsed
    );
    handle.join();
}
