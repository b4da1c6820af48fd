//! GStreamer sources: one pipeline per stream, frames handed off through a bounded channel.
//!
//! [`spawn`] builds the pipeline for one `[[streams]]` entry and runs it on a thread of its
//! own. That thread pulls decoded RGB frames from an `appsink`, lets the stream's [`Sampler`]
//! pick the ones the fps cap allows (before any pixel is copied), packs their rows tightly and
//! sends them to the engine as [`SourceEvent::Frame`]. Because the channel is bounded, a slow
//! engine holds a file source back (no frame is lost), while a live source's `appsink` drops
//! its stale frames. Every stream ends with exactly one [`SourceEvent::Ended`] or
//! [`SourceEvent::Failed`], so the engine can count streams down without guessing.
//!
//! Live sources (`v4l2`, `rtsp`, `test`, `pipeline`, live `uri`) are supervised: when one
//! fails, ends or stalls it is rebuilt with backoff, and its state travels to the engine as
//! [`SourceEvent::Status`] (published, retained, on the stream's `status` topic).
//!
//! The pieces: `pipeline` builds the `file` and `test` graphs and `kinds` the live ones,
//! `runner` runs one attempt (pull, sample, copy, send, watch the bus), `supervisor` decides
//! what follows an attempt, `backoff` the delays, `redact` keeps credentials out of texts,
//! `sampler` is the pure fps logic, and `video` offers the same machinery as a plain iterator
//! for the one-shot `classify` command.

mod backoff;
mod kinds;
mod pipeline;
mod redact;
mod runner;
mod sampler;
mod status;
mod supervisor;
mod video;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crate::config::{SourcesSettings, StreamSettings};
use crate::metrics::{Metrics, StreamMetrics};
use crate::preprocess::Frame;

pub use backoff::ReconnectBackoff;
pub use redact::{Redactor, redact_url, split_credentials};
pub use sampler::Sampler;
pub use status::SourceStatus;
pub use video::{VideoFrames, read_video};

/// A sampled frame from a stream.
#[derive(Debug)]
pub struct SourceFrame {
    pub stream: Arc<str>,
    /// 0-based count of sampled frames of this stream.
    pub index: u64,
    /// Stream position in milliseconds (the buffer's PTS in stream time, so an MP4 edit list
    /// or a loop starts again at 0), when known.
    pub position_ms: Option<u64>,
    /// Wall-clock time the frame left the decoder.
    pub captured: SystemTime,
    pub frame: Frame,
    /// Counts the frame in its stream's `queued` gauge until [`SourceFrame::taken`] or drop.
    pub(crate) ticket: Option<Ticket>,
}

impl SourceFrame {
    /// A frame that counts against no stream's share of the queue (for tools and benchmarks
    /// that feed the engine themselves).
    pub fn new(
        stream: Arc<str>,
        index: u64,
        position_ms: Option<u64>,
        captured: SystemTime,
        frame: Frame,
    ) -> SourceFrame {
        SourceFrame { stream, index, position_ms, captured, frame, ticket: None }
    }

    /// The consumer took the frame out of the queue: it no longer counts against its stream's
    /// share of the queue (see `StreamMetrics::queued`), so the source may hand over the next
    /// one. Whoever takes frames from the channel calls this, or drops the frame; a frame kept
    /// without either holds its stream back.
    pub fn taken(&mut self) {
        self.ticket = None;
    }
}

/// A frame's place in its stream's `queued` count: counted when made, uncounted when dropped.
#[derive(Debug)]
pub(crate) struct Ticket(Arc<StreamMetrics>);

impl Ticket {
    pub(crate) fn new(metrics: Arc<StreamMetrics>) -> Ticket {
        metrics.enqueue();
        Ticket(metrics)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.dequeue();
    }
}

/// What sources tell the engine.
#[derive(Debug)]
pub enum SourceEvent {
    Frame(SourceFrame),
    /// The source's state changed (`online`, `reconnecting`, `failed`, `ended`); the last
    /// status comes right before [`SourceEvent::Ended`] or [`SourceEvent::Failed`].
    Status {
        stream: Arc<str>,
        status: SourceStatus,
    },
    /// The stream ended normally (end of file, or `frames` reached).
    Ended {
        stream: Arc<str>,
    },
    /// The stream stopped on an error; other streams go on.
    Failed {
        stream: Arc<str>,
        error: SourceError,
    },
}

/// Why a stream could not start or stopped. Every message names the stream, and the file when
/// there is one.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    /// Anything else: a decoder or demuxer error, a lost camera or connection. A live source
    /// is rebuilt after it.
    #[error("stream {stream}: {reason}")]
    Pipeline { stream: String, reason: String },
    /// A problem that retrying cannot fix: bad settings, a missing GStreamer plugin or
    /// decoder, refused credentials, a source without video.
    #[error("stream {stream}: {reason}")]
    Setup { stream: String, reason: String },
    /// The file stream's path does not exist (or is not a regular file).
    #[error("stream {stream}: {}: no such file", path.display())]
    NoSuchFile { stream: String, path: PathBuf },
    /// The file has no video track (audio only, or only tracks nothing can decode).
    #[error(
        "stream {stream}: {}: no video stream in this file (audio or other tracks only)",
        path.display()
    )]
    NoVideo { stream: String, path: PathBuf },
}

impl SourceError {
    /// Whether rebuilding the source cannot help.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, SourceError::Pipeline { .. })
    }
}

/// Controls one running source thread.
///
/// Dropping the handle asks the thread to stop but does not wait for it; call
/// [`join`](Self::join) to wait.
#[derive(Debug)]
pub struct SourceHandle {
    stream: Arc<str>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SourceHandle {
    /// The stream's name.
    pub fn stream(&self) -> &Arc<str> {
        &self.stream
    }

    /// Asks the source to stop. Within about 100 ms the thread tears the pipeline down and
    /// sends [`SourceEvent::Ended`]. The receiver must keep taking events until then: the final
    /// event is always delivered, so a full channel holds the thread until there is room (or
    /// the receiver is dropped).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Whether the thread has finished (its final event is sent).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|thread| thread.is_finished())
    }

    /// Waits for the thread to finish.
    pub fn join(mut self) {
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!(stream = %self.stream, "source thread panicked");
        }
    }
}

impl Drop for SourceHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the source for one stream on its own thread; frames, status changes and the final
/// event go to `events`, counters to `metrics.stream(name)`. `policy` says how a live source
/// is watched and rebuilt (the stream's own `stall_timeout_s` wins over the policy's).
///
/// Fails at once for settings no pipeline can run (an unknown kind, a `test` pattern
/// GStreamer does not know, a `pipeline` that does not parse, an fps that is not positive) or
/// a missing GStreamer plugin. Problems with the input itself (a missing file, a file without
/// video, a decoder error, a camera that does not answer) arrive later: for a live source as
/// `reconnecting` statuses, for the others (and for what retrying cannot fix) as
/// [`SourceEvent::Failed`].
pub fn spawn(
    settings: &StreamSettings,
    policy: &SourcesSettings,
    metrics: Arc<Metrics>,
    events: crossbeam_channel::Sender<SourceEvent>,
) -> Result<SourceHandle, SourceError> {
    let stream: Arc<str> = Arc::from(settings.name.as_str());
    init_gstreamer(&stream)?;
    let setup = |reason: String| SourceError::Setup { stream: stream.to_string(), reason };
    if Sampler::new(settings.fps()).is_none() {
        return Err(setup(format!("fps {} must be a positive number", settings.fps())));
    }
    let first = pipeline::build(settings, &stream).map_err(|error| match error {
        SourceError::Pipeline { stream, reason } => SourceError::Setup { stream, reason },
        other => other,
    })?;
    let stall_s = settings.stall_timeout_s.unwrap_or(policy.stall_timeout_s);
    let stall = (stall_s.is_finite() && stall_s > 0.0).then(|| Duration::from_secs_f64(stall_s));
    let stop = Arc::new(AtomicBool::new(false));
    let stream_metrics = metrics.stream(&stream);
    stream_metrics.set_status("starting");
    // Kept apart from the supervisor so that a panic (a bug) still ends the stream with an
    // event.
    let last_word = (Arc::clone(&stream), events.clone(), Arc::clone(&stream_metrics));
    let context = runner::Context {
        stream: Arc::clone(&stream),
        stop: Arc::clone(&stop),
        events,
        metrics: stream_metrics,
        stall,
        redactor: Redactor::for_stream(settings),
    };
    let supervisor = supervisor::Supervisor {
        settings: settings.clone(),
        policy: policy.clone(),
        context,
        first: Some(first),
    };
    let thread = std::thread::Builder::new()
        .name(format!("source-{stream}"))
        .spawn(move || {
            if std::panic::catch_unwind(AssertUnwindSafe(move || supervisor.run())).is_err() {
                let (stream, events, metrics) = last_word;
                tracing::error!(stream = %stream, "source thread panicked; the stream is lost");
                let reason = "the source thread crashed (a bug in edgesight; see the log)";
                metrics.set_status("failed");
                let status = SourceStatus::Failed { reason: reason.into() };
                let _ = events.send(SourceEvent::Status { stream: Arc::clone(&stream), status });
                let error =
                    SourceError::Pipeline { stream: stream.to_string(), reason: reason.into() };
                let _ = events.send(SourceEvent::Failed { stream, error });
            }
        })
        .map_err(|error| setup(format!("cannot start the source thread: {error}")))?;
    Ok(SourceHandle { stream, stop, thread: Some(thread) })
}

/// Initialises GStreamer once per process; later calls return the first outcome.
fn init_gstreamer(stream: &str) -> Result<(), SourceError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    let outcome = INIT.get_or_init(|| gstreamer::init().map_err(|error| error.to_string()));
    outcome.clone().map_err(|reason| SourceError::Pipeline {
        stream: stream.to_string(),
        reason: format!("GStreamer cannot start: {reason}"),
    })
}
