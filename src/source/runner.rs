//! The source thread: runs one pipeline, turns its samples into events, reports how it ended.
//!
//! The thread pulls samples from the `appsink` with a short timeout instead of using the
//! `new-sample` callback, so the only code on GStreamer's streaming threads is pad linking, and
//! a blocked hand-off (a full channel) never stalls a streaming thread in an unknown state.
//! Between pulls it reads the pipeline's bus, which carries errors, warnings and the graph's
//! own "no video" message, and it checks the stop flag. Whatever happens, [`Runner::run`] sets
//! the pipeline to `Null` and says how the attempt ended; the supervisor decides what follows
//! (the final event, or a rebuild) and sends it.
//!
//! A file source waits for the engine instead (no frame is lost), but keeps at most
//! `FILE_SHARE` frames in the engine's shared queue, so a file read faster than real time
//! cannot crowd the live streams out of it.
//!
//! A live source never queues stale frames: its `appsink` keeps only the newest frame (a pad
//! probe counts what arrives, so frames the sink replaced are counted as dropped), and a
//! sampled frame waits in a one-frame slot, which a newer frame replaces (the replaced one
//! counted as dropped), until none of the stream's frames is in the engine's queue and the
//! queue has room. So at most one frame per live stream waits for the engine, and it is the
//! newest but one at worst. A live source that delivers no frame for its stall timeout ends
//! the attempt, to be rebuilt.
//!
//! Known shortcoming: the appsink drop count can lag by one frame while a frame waits in the
//! sink; the final count at teardown is exact.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{SendTimeoutError, Sender, TrySendError};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;

use super::pipeline::{Built, Input, NO_VIDEO_MESSAGE};
use super::redact::Redactor;
use super::{Sampler, SourceError, SourceEvent, SourceFrame, SourceStatus, Ticket};
use crate::metrics::StreamMetrics;

mod errors;
use crate::preprocess::{Frame, pack_rows};

/// How long one wait (for a sample, for room in the channel) lasts before the stop flag and the
/// bus are looked at again.
const POLL: Duration = Duration::from_millis(100);

/// Frames a file stream may have in the engine's queue at once: enough to keep the engine
/// busy, few enough that a file read as fast as it decodes never fills the shared queue and
/// live streams always find room in it.
const FILE_SHARE: u64 = 2;

/// How often a file stream looks whether the engine took one of its frames.
const SHARE_POLL: Duration = Duration::from_millis(5);

/// GStreamer warnings logged at WARN per stream; later ones go to DEBUG.
const LOUD_WARNINGS: u64 = 3;

/// A file that ends this long before its declared duration, and before half of it, is reported
/// as truncated.
const TRUNCATION_SLACK_NS: u64 = 2_000_000_000;

pub(super) struct Runner {
    pipeline: gst::Pipeline,
    sink: gst_app::AppSink,
    input: Input,
    live: bool,
    ends: bool,
    stream: Arc<str>,
    sampler: Sampler,
    stop: Arc<AtomicBool>,
    events: Sender<SourceEvent>,
    /// The caps of the last mapped frame and their layout, reused while the caps stay.
    layout: Option<(gst::Caps, gst_video::VideoInfo)>,
    started: Instant,
    /// Frames decoded (sampled or not) and sampled, since the start.
    decoded: u64,
    sampled: u64,
    /// Frames decoded since the last (re)start of a looping file.
    decoded_this_pass: u64,
    /// Stream time of the last decoded frame, nanoseconds.
    last_position_ns: Option<u64>,
    /// GStreamer warnings seen so far.
    warnings: u64,
    metrics: Arc<StreamMetrics>,
    /// Live sources: how long without a frame counts as a stall.
    stall: Option<Duration>,
    redactor: Redactor,
    /// Buffers that reached the appsink (counted by a pad probe), and how many of them were
    /// already added to the metrics as decoded and as dropped.
    arrived: Arc<AtomicU64>,
    counted_arrived: u64,
    counted_dropped: u64,
    /// Live sources: a sampled frame waiting for room in the engine's queue.
    pending: Option<SourceFrame>,
    /// When the last frame (or the start) was seen.
    last_frame: Instant,
    /// `online` was reported in this attempt.
    online: bool,
}

/// How one attempt ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Asked to stop, or the receiver went away.
    Stopped,
    /// The input ended and that ends the stream.
    Finished,
    /// The input failed.
    Failed(SourceError),
    /// A live input ended or stalled; it should be rebuilt.
    Ended(String),
}

/// What the supervisor learns from one attempt.
#[derive(Debug)]
pub(super) struct Report {
    pub outcome: Outcome,
    /// The attempt delivered frames (the source was online).
    pub online: bool,
}

/// What the runner needs besides the graph.
pub(super) struct Context {
    pub stream: Arc<str>,
    pub stop: Arc<AtomicBool>,
    pub events: Sender<SourceEvent>,
    pub metrics: Arc<StreamMetrics>,
    pub stall: Option<Duration>,
    pub redactor: Redactor,
}

/// Why the loop ended without an error.
enum Halt {
    /// Asked to stop, or the receiver went away.
    Stopped,
    /// The input ended.
    Finished,
    /// A live input ended or stalled.
    Interrupted(String),
}

impl Runner {
    pub(super) fn new(built: Built, sampler: Sampler, context: &Context) -> Runner {
        let arrived = Arc::new(AtomicU64::new(0));
        if let Some(pad) = built.sink.static_pad("sink") {
            let counter = Arc::clone(&arrived);
            pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                counter.fetch_add(1, Ordering::Relaxed);
                gst::PadProbeReturn::Ok
            });
        }
        Runner {
            pipeline: built.pipeline,
            sink: built.sink,
            input: built.input,
            live: built.live,
            ends: built.ends,
            stream: Arc::clone(&context.stream),
            sampler,
            stop: Arc::clone(&context.stop),
            events: context.events.clone(),
            layout: None,
            started: Instant::now(),
            decoded: 0,
            sampled: 0,
            decoded_this_pass: 0,
            last_position_ns: None,
            warnings: 0,
            metrics: Arc::clone(&context.metrics),
            stall: context.stall.filter(|_| built.live),
            redactor: context.redactor.clone(),
            arrived,
            counted_arrived: 0,
            counted_dropped: 0,
            pending: None,
            last_frame: Instant::now(),
            online: false,
        }
    }

    /// Runs the pipeline until it ends, fails, stalls or is stopped.
    pub(super) fn run(mut self) -> Report {
        let path = self.path().map(|path| path.display().to_string());
        tracing::info!(stream = %self.stream, path = ?path, live = self.live, "source starting");
        let outcome = self.play();
        if let Err(failure) = self.pipeline.set_state(gst::State::Null) {
            tracing::warn!(stream = %self.stream, %failure, "cannot stop the pipeline cleanly");
        }
        if self.pending.take().is_some() {
            self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.count_arrivals(self.decoded, 0);
        let (decoded, sampled) = (self.decoded, self.sampled);
        let outcome = match outcome {
            Ok(Halt::Stopped) => Outcome::Stopped,
            Ok(Halt::Finished) => Outcome::Finished,
            Ok(Halt::Interrupted(reason)) => Outcome::Ended(reason),
            Err(error) => Outcome::Failed(error),
        };
        tracing::debug!(stream = %self.stream, decoded, sampled, ?outcome, "source attempt over");
        Report { outcome, online: self.online }
    }

    fn path(&self) -> Option<&Path> {
        match &self.input {
            Input::File { path, .. } => Some(path),
            Input::Fixed | Input::Dynamic { .. } => None,
        }
    }

    fn play(&mut self) -> Result<Halt, SourceError> {
        if let Some(path) = self.path()
            && !path.is_file()
        {
            return Err(SourceError::NoSuchFile {
                stream: self.stream.to_string(),
                path: path.to_path_buf(),
            });
        }
        let bus =
            self.pipeline.bus().ok_or_else(|| self.failure("the pipeline has no bus".into()))?;
        if self.pipeline.set_state(gst::State::Playing).is_err() {
            // The reason is on the bus; without one, say what is known.
            return Err(self.drain_bus(&bus).err().unwrap_or_else(|| {
                self.failure("GStreamer refused to start the pipeline".into())
            }));
        }
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(Halt::Stopped);
            }
            if let Some(halt) = self.flush_pending() {
                return Ok(halt);
            }
            if let Some(stall) = self.stall
                && self.last_frame.elapsed() >= stall
            {
                let what = if self.online { "no frame" } else { "no first frame" };
                return Ok(Halt::Interrupted(format!(
                    "{what} for {:.1} s; the source stalled",
                    stall.as_secs_f64()
                )));
            }
            if let Err(error) = self.drain_bus(&bus) {
                // Hand over what was decoded before the error, then report it.
                while let Some(sample) = self.sink.try_pull_sample(gst::ClockTime::ZERO) {
                    if let Some(halt) = self.handle(&sample)? {
                        return Ok(halt);
                    }
                }
                return Err(error);
            }
            match self.sink.try_pull_sample(gst::ClockTime::from_nseconds(POLL.as_nanos() as u64)) {
                Some(sample) => {
                    if let Some(halt) = self.handle(&sample)? {
                        return Ok(halt);
                    }
                }
                None if self.sink.is_eos() => {
                    self.drain_bus(&bus)?;
                    if self.restart_at_end()? {
                        continue;
                    }
                    if self.live && !self.ends {
                        return Ok(Halt::Interrupted("the source ended".into()));
                    }
                    return self.finish();
                }
                None => {}
            }
        }
    }

    /// Reads every pending bus message; an error (or the no-video message) becomes the stream's
    /// error. The first few warnings are logged at WARN, the rest at DEBUG: a damaged stream
    /// can warn on every frame.
    fn drain_bus(&mut self, bus: &gst::Bus) -> Result<(), SourceError> {
        while let Some(message) = bus.pop() {
            match message.view() {
                gst::MessageView::Error(error) => return Err(self.describe_error(error)),
                gst::MessageView::Warning(warning) => {
                    let source = warning.src().map(|source| source.name().to_string());
                    let error = self.redactor.scrub(&warning.error().to_string());
                    let details = warning.debug().map(|debug| self.redactor.scrub(&debug));
                    self.warnings += 1;
                    if self.warnings <= LOUD_WARNINGS {
                        tracing::warn!(
                            stream = %self.stream, element = ?source, warning = %error,
                            ?details, count = self.warnings, "GStreamer warning"
                        );
                    } else {
                        tracing::debug!(
                            stream = %self.stream, element = ?source, warning = %error,
                            ?details, count = self.warnings, "GStreamer warning"
                        );
                    }
                }
                gst::MessageView::Application(application)
                    if application.structure().is_some_and(|s| s.name() == NO_VIDEO_MESSAGE) =>
                {
                    return Err(self.no_video());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// At the end of a looping file that produced frames, seeks back to the start.
    fn restart_at_end(&mut self) -> Result<bool, SourceError> {
        let Input::File { looping: true, .. } = self.input else {
            return Ok(false);
        };
        if self.decoded_this_pass == 0 {
            return Ok(false);
        }
        let flags = gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT;
        self.pipeline
            .seek_simple(flags, gst::ClockTime::ZERO)
            .map_err(|_| self.failure("cannot seek back to the start to loop".into()))?;
        tracing::debug!(stream = %self.stream, "looping to the start");
        self.sampler.reset();
        self.decoded_this_pass = 0;
        Ok(true)
    }

    /// The end of the input: fine, unless nothing was decoded or a file stopped far short of
    /// the duration its header declares.
    fn finish(&self) -> Result<Halt, SourceError> {
        let Input::File { path, .. } = &self.input else {
            return Ok(Halt::Finished);
        };
        if self.decoded == 0 {
            return Err(self.failure(format!(
                "{}: the file ended before a single video frame could be decoded",
                path.display()
            )));
        }
        let duration = self.pipeline.query_duration::<gst::ClockTime>().map(|d| d.nseconds());
        if let (Some(duration), Some(reached)) = (duration, self.last_position_ns)
            && reached.saturating_add(TRUNCATION_SLACK_NS) < duration
            && reached < duration / 2
        {
            return Err(self.failure(format!(
                "{}: the video stops at {:.1} s of the {:.1} s the file declares; the file is \
                 probably truncated ({} frames decoded)",
                path.display(),
                reached as f64 / 1e9,
                duration as f64 / 1e9,
                self.decoded
            )));
        }
        Ok(Halt::Finished)
    }

    /// Samples one decoded frame; when it is taken, copies it out and sends it.
    fn handle(&mut self, sample: &gst::Sample) -> Result<Option<Halt>, SourceError> {
        let arrival_ns = self.started.elapsed().as_nanos() as u64;
        let Some(buffer) = sample.buffer() else {
            return Ok(None);
        };
        self.last_frame = Instant::now();
        self.count_arrivals(self.decoded + 1, 1);
        if !self.online {
            self.online = true;
            self.metrics.set_status("online");
            let status = SourceEvent::Status {
                stream: Arc::clone(&self.stream),
                status: SourceStatus::Online,
            };
            if let Some(halt) = self.send(status) {
                return Ok(Some(halt));
            }
        }
        self.decoded += 1;
        self.decoded_this_pass += 1;
        let position_ns = stream_time(sample, buffer);
        if position_ns.is_some() {
            self.last_position_ns = position_ns;
        }
        if !self.sampler.admit(position_ns, arrival_ns) {
            return Ok(None);
        }
        let captured = SystemTime::now();
        let frame = self.copy_frame(sample, buffer)?;
        tracing::trace!(stream = %self.stream, index = self.sampled, ?position_ns, "frame sampled");
        let frame = SourceFrame {
            stream: Arc::clone(&self.stream),
            index: self.sampled,
            position_ms: position_ns.map(|ns| ns / 1_000_000),
            captured,
            frame,
            ticket: None,
        };
        self.sampled += 1;
        Ok(self.deliver(frame))
    }

    /// Adds the buffers that reached the sink since the last call to `decoded`, and those the
    /// sink dropped (arrived but not among the `pulled` ones, less the `waiting` one that may
    /// still sit in the sink) to `dropped`.
    fn count_arrivals(&mut self, pulled: u64, waiting: u64) {
        let arrived = self.arrived.load(Ordering::Relaxed);
        let new = arrived.saturating_sub(self.counted_arrived);
        self.metrics.decoded.fetch_add(new, Ordering::Relaxed);
        self.counted_arrived = arrived;
        let dropped = arrived.saturating_sub(pulled).saturating_sub(waiting);
        if self.live && dropped > self.counted_dropped {
            let more = dropped - self.counted_dropped;
            self.metrics.dropped.fetch_add(more, Ordering::Relaxed);
            self.counted_dropped = dropped;
        }
    }

    /// Hands a frame to the engine. A file source waits for room; a live source puts it in the
    /// one-frame slot when the queue is full, replacing (and counting as dropped) an older one.
    fn deliver(&mut self, mut frame: SourceFrame) -> Option<Halt> {
        if !self.live {
            while self.metrics.queued.load(Ordering::Acquire) >= FILE_SHARE {
                if self.stop.load(Ordering::Relaxed) {
                    return Some(Halt::Stopped);
                }
                std::thread::sleep(SHARE_POLL);
            }
            // Counted before the hand-over, so the engine never takes a frame not yet counted;
            // a frame that is not delivered takes its count with it when dropped.
            frame.ticket = Some(Ticket::new(Arc::clone(&self.metrics)));
            let halt = self.send(SourceEvent::Frame(frame));
            if halt.is_none() {
                self.metrics.sampled.fetch_add(1, Ordering::Relaxed);
            }
            return halt;
        }
        if self.pending.replace(frame).is_some() {
            self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.flush_pending()
    }

    /// Tries once to move the waiting live frame into the engine's queue, unless a frame of
    /// this stream still waits there.
    fn flush_pending(&mut self) -> Option<Halt> {
        if self.pending.is_none() || self.metrics.queued.load(Ordering::Acquire) > 0 {
            return None;
        }
        let mut frame = self.pending.take()?;
        frame.ticket = Some(Ticket::new(Arc::clone(&self.metrics)));
        match self.events.try_send(SourceEvent::Frame(frame)) {
            Ok(()) => {
                self.metrics.sampled.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(TrySendError::Full(SourceEvent::Frame(mut frame))) => {
                frame.ticket = None;
                self.pending = Some(frame);
                None
            }
            Err(TrySendError::Full(_)) => None,
            Err(TrySendError::Disconnected(_)) => Some(Halt::Stopped),
        }
    }

    /// Copies the RGB picture out of `buffer` with tight rows. GStreamer pads each RGB row to
    /// a multiple of 4 bytes; the mapped frame's stride says by how much.
    ///
    /// The pixel aspect ratio is not applied: a frame with non-square pixels (PAR 2:1, or
    /// anamorphic DVD video at 32:27) comes out at its stored size, so the picture is
    /// stretched or squeezed. Resampling it here would cost a full-frame resize per frame.
    fn copy_frame(
        &mut self,
        sample: &gst::Sample,
        buffer: &gst::BufferRef,
    ) -> Result<Frame, SourceError> {
        let caps =
            sample.caps_owned().ok_or_else(|| self.failure("a frame came without caps".into()))?;
        let cached = self.layout.as_ref().is_some_and(|(known, _)| *known == caps);
        if !cached {
            let info = gst_video::VideoInfo::from_caps(&caps).map_err(|error| {
                self.failure(format!("unreadable frame format {caps}: {error}"))
            })?;
            let par = info.par();
            if par.numer() != par.denom() {
                tracing::debug!(stream = %self.stream, %par, "non-square pixels are not corrected");
            }
            self.layout = Some((caps, info));
        }
        let Some((_, info)) = &self.layout else {
            return Err(self.failure("no frame layout".into()));
        };
        let mapped = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, info)
            .map_err(|error| self.failure(format!("cannot map a frame: {error}")))?;
        let (width, height) = (mapped.width(), mapped.height());
        let stride = usize::try_from(mapped.plane_stride()[0]).unwrap_or(0);
        let data = mapped
            .plane_data(0)
            .map_err(|error| self.failure(format!("cannot read a frame: {error}")))?;
        let packed = pack_rows(data, width, height, stride).ok_or_else(|| {
            self.failure(format!(
                "a {width}×{height} frame has {} bytes with stride {stride}",
                data.len()
            ))
        })?;
        Ok(Frame { width, height, data: packed })
    }

    /// Sends an event, waiting while the channel is full; `Some` when the stream should halt.
    fn send(&self, mut event: SourceEvent) -> Option<Halt> {
        loop {
            match self.events.send_timeout(event, POLL) {
                Ok(()) => return None,
                Err(SendTimeoutError::Timeout(returned)) => {
                    if self.stop.load(Ordering::Relaxed) {
                        return Some(Halt::Stopped);
                    }
                    event = returned;
                }
                Err(SendTimeoutError::Disconnected(_)) => {
                    tracing::debug!(stream = %self.stream, "nobody takes frames any more");
                    return Some(Halt::Stopped);
                }
            }
        }
    }
}

/// The buffer's position in stream time, nanoseconds: its PTS mapped through the sample's
/// segment (so an MP4 edit list or a seek does not shift it), or the raw PTS.
fn stream_time(sample: &gst::Sample, buffer: &gst::BufferRef) -> Option<u64> {
    let pts = buffer.pts()?;
    let segment = sample.segment().and_then(|segment| segment.downcast_ref::<gst::ClockTime>());
    let mapped = segment.and_then(|segment| segment.to_stream_time(pts));
    Some(mapped.unwrap_or(pts).nseconds())
}
