//! `edgesight run`: starts the stages in order, and shuts them down in the reverse order.
//!
//! Start-up: model (generated first when the settings ask for it), broker (embedded when the
//! settings ask for it), publisher, engine thread, then one source per stream. A stream that
//! cannot start is reported on its retained state topic and the others go on. Shutdown, on the
//! end of every stream or on SIGINT/SIGTERM: sources stop and send their last event, the
//! engine drains its queue, the stats task sends its last message and the metrics endpoint
//! closes, the publisher flushes QoS ≥ 1 messages, publishes `offline` and disconnects. SIGHUP
//! re-reads the config file and applies it without a restart ([`reload`]). Under systemd,
//! [`notify`] tells the manager about each step and [`health`] feeds the watchdog while the
//! engine makes progress.

pub mod health;
pub mod notify;
pub mod reload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::engine::{Engine, EngineOptions, EngineSummary};
use crate::metrics::server::MetricsServer;
use crate::metrics::{Metrics, stats};
use crate::model::{self, Bundle, ModelError, SynthOptions};
use crate::publish::{Publisher, broker};
use notify::Notifier;
use reload::Running;

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The bundle is missing or does not load; a restart cannot fix it, so `edgesight run`
    /// exits 2, like a configuration error.
    #[error("model {path}: {error}")]
    Model { path: PathBuf, error: ModelError },
    #[error(transparent)]
    Publish(#[from] crate::publish::PublishError),
    #[error("cannot start the engine thread: {0}")]
    Thread(std::io::Error),
    #[error("metrics.listen = {listen:?}: cannot listen: {error}")]
    MetricsListen { listen: String, error: std::io::Error },
}

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub summary: EngineSummary,
    /// A signal asked for the stop (as opposed to every stream ending).
    pub interrupted: bool,
    /// QoS ≥ 1 messages lost at shutdown (neither acknowledged nor kept in the spool).
    pub unacknowledged: u64,
}

impl RunOutcome {
    /// True when nothing worked: every stream failed and no signal interrupted the run.
    pub fn all_failed(&self) -> bool {
        !self.interrupted && self.summary.ended.is_empty() && !self.summary.failed.is_empty()
    }
}

/// Where the demo keeps its generated model: `$XDG_CACHE_HOME/edgesight`, else
/// `~/.cache/edgesight`, else the system temporary directory.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|dir| !dir.is_empty()) {
        return PathBuf::from(dir).join("edgesight");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|home| !home.is_empty()) {
        return PathBuf::from(home).join(".cache").join("edgesight");
    }
    std::env::temp_dir().join("edgesight")
}

/// Opens the bundle at `path`, writing a synthetic one first when `synth_if_missing` is set
/// and nothing is there.
pub fn prepare_bundle(path: &Path, synth_if_missing: bool) -> Result<Bundle, ServiceError> {
    let wrap = |error| ServiceError::Model { path: path.to_path_buf(), error };
    if synth_if_missing && !path.join("manifest.toml").exists() {
        info!(model = %path.display(), "no bundle yet; writing a synthetic ResNet-50 bundle");
        model::synth::write_bundle(path, &SynthOptions::default()).map_err(wrap)?;
    }
    Bundle::open(path).map_err(wrap)
}

/// How often start-up asks systemd for more time while the model loads.
const START_EXTEND_EVERY: Duration = Duration::from_secs(10);

/// Runs the daemon until every stream has ended or a signal arrives.
///
/// `config_file` is the file the settings came from; SIGHUP re-reads it (see [`reload`]).
pub async fn run(
    settings: Settings,
    config_file: Option<PathBuf>,
) -> Result<RunOutcome, ServiceError> {
    // Installed first, so that a signal during start-up (the model takes seconds to load) is
    // a clean stop rather than the default action that kills the process.
    let mut signals = Signals::install();
    let notifier = Arc::new(Notifier::from_env());
    let metrics = Metrics::new();
    let run_id = uuid::Uuid::new_v4().to_string();
    info!(device = %settings.device_id, %run_id, streams = settings.streams.len(), "starting");
    notifier.status("starting: loading the model");

    // Loading (or first generating) a model can outlast TimeoutStartSec= on a small board; ask
    // systemd for more time while it goes on.
    let mut extend = tokio::time::interval(START_EXTEND_EVERY);
    let starting = start(&settings, &metrics);
    tokio::pin!(starting);
    let mut reload_pending = false;
    let started = loop {
        tokio::select! {
            started = &mut starting => break started?,
            _ = extend.tick() => notifier.extend_timeout(START_EXTEND_EVERY * 3),
            received = signals.recv() => match received {
                Received::Stop(signal) => {
                    info!(%signal, "stopping during start-up");
                    notifier.stopping("stopping during start-up");
                    let summary = EngineSummary::default();
                    return Ok(RunOutcome { summary, interrupted: true, unacknowledged: 0 });
                }
                Received::Reload => {
                    info!("SIGHUP during start-up; the file is read again once start-up is done");
                    reload_pending = true;
                }
            }
        }
    };
    let Started { bundle, backend, broker: _broker, publisher } = started;
    let out = publisher.sender();
    let metrics_server = match &settings.metrics.listen {
        None => None,
        Some(listen) => Some(
            MetricsServer::start(listen, Arc::clone(&metrics))
                .await
                .map_err(|error| ServiceError::MetricsListen { listen: listen.clone(), error })?,
        ),
    };
    let stats_task = (settings.metrics.stats_interval_s > 0).then(|| {
        let every = std::time::Duration::from_secs(settings.metrics.stats_interval_s);
        stats::spawn(Arc::clone(&metrics), every, &settings.device_id, &run_id, out.clone())
    });

    let (events_tx, events_rx) = crossbeam_channel::bounded(settings.engine.queue);
    let options = EngineOptions::from_settings(&settings, &run_id);
    let engine = Engine::new(backend, &bundle, options, Arc::clone(&metrics));
    let slot = engine.model_slot();
    let checksum = bundle.identity.checksum.clone();
    let engine_out = out.clone();
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("edgesight-engine".into())
        .spawn(move || {
            let summary = engine.run(events_rx, engine_out);
            let _ = done_tx.send(summary);
        })
        .map_err(ServiceError::Thread)?;

    let mut running = Running::new(settings.clone(), events_tx, Arc::clone(&metrics), checksum);
    running.start_all();
    info!(streams = running.running(), "running");
    notifier.ready(&format!("running: {} streams started", running.running()));
    let pulse = health::spawn(Arc::clone(&notifier), Arc::clone(&metrics));
    if reload_pending {
        reload(&mut running, config_file.as_deref(), &slot, &notifier).await;
    }

    // Until every stream has ended or a stop signal: SIGHUP reloads, and a look every
    // quarter second lets the engine drain once the last source has finished.
    let mut interrupted = false;
    let mut look = tokio::time::interval(Duration::from_millis(250));
    let summary = loop {
        tokio::select! {
            summary = &mut done_rx => break summary.ok(),
            received = signals.recv() => match received {
                Received::Stop(signal) => {
                    info!(%signal, "stopping");
                    interrupted = true;
                    break None;
                }
                Received::Reload => {
                    reload(&mut running, config_file.as_deref(), &slot, &notifier).await;
                }
            },
            _ = look.tick() => {
                running.release_when_all_ended();
            }
        }
    };
    pulse.abort();
    notifier.stopping("stopping: draining the engine and flushing MQTT");
    let handles = running.stop_all();
    let summary = match summary {
        Some(summary) => summary,
        None => done_rx.await.unwrap_or_default(),
    };
    let handles_done = tokio::task::spawn_blocking(move || {
        for handle in handles {
            handle.join();
        }
    });
    if handles_done.await.is_err() {
        warn!("a source thread panicked while stopping");
    }

    // The last stats message carries the run's totals; then nothing but `finish` publishes.
    if let Some(stats_task) = stats_task {
        stats_task.stop().await;
    }
    if let Some(server) = metrics_server {
        server.stop();
    }
    drop(out);
    let report = publisher.finish().await?;
    info!(
        ended = summary.ended.len(),
        failed = summary.failed.len(),
        lost = report.unacknowledged + report.dropped,
        spooled = report.spooled,
        "stopped"
    );
    let unacknowledged = report.unacknowledged + report.dropped;
    Ok(RunOutcome { summary, interrupted, unacknowledged })
}

/// What start-up builds: the model, the embedded broker when one runs (held for the whole run:
/// dropping it stops the broker), and the connected publisher.
struct Started {
    bundle: Bundle,
    backend: Box<dyn model::Backend>,
    broker: Option<broker::EmbeddedBroker>,
    publisher: Publisher,
}

async fn start(settings: &Settings, metrics: &Arc<Metrics>) -> Result<Started, ServiceError> {
    let path = settings.model.path.clone();
    let synth = settings.model.synth_if_missing;
    let options = settings.model.backend_options();
    let max_batch = settings.engine.max_batch;
    let loaded = tokio::task::spawn_blocking(move || {
        let bundle = prepare_bundle(&path, synth)?;
        let model_error = |error| ServiceError::Model { path: bundle.dir.clone(), error };
        let mut backend = model::open_backend(&bundle, &options).map_err(model_error)?;
        let warming = std::time::Instant::now();
        let sizes =
            model::warm_up(backend.as_mut(), bundle.input_size, max_batch).map_err(model_error)?;
        if !sizes.is_empty() {
            info!(max_batch, ms = warming.elapsed().as_millis() as u64, "batch sizes prepared");
        }
        Ok::<_, ServiceError>((bundle, backend))
    })
    .await
    .map_err(|error| ServiceError::Thread(std::io::Error::other(error.to_string())))?;
    let (bundle, backend) = loaded?;
    let info = backend.info();
    info!(model = %bundle.identity.name, version = %bundle.identity.version,
        backend = info.backend, device = %info.device, precision = info.precision.as_str(),
        "model loaded");
    metrics.engine.set_backend(&info);
    let broker = broker::resolve_broker(&settings.mqtt).await?;
    let publisher = Publisher::start(settings, Arc::clone(metrics)).await?;
    Ok(Started { bundle, backend, broker, publisher })
}

/// Re-reads the config file on SIGHUP and tells systemd about it.
async fn reload(
    running: &mut Running,
    file: Option<&Path>,
    slot: &crate::engine::ModelSlot,
    notifier: &Notifier,
) {
    let Some(file) = file else {
        warn!("SIGHUP: this run has no config file (the built-in demo); nothing to reload");
        return;
    };
    notifier.reloading(&format!("reloading {}", file.display()));
    match running.reload(file, slot).await {
        Ok(done) => info!(
            config = %file.display(),
            started = done.started,
            stopped = done.stopped,
            restarted = done.restarted,
            model_swapped = done.model_swapped,
            "configuration reloaded"
        ),
        Err(reason) => error!(
            config = %file.display(),
            %reason,
            "reload refused; the running configuration and model stay"
        ),
    }
    notifier.ready(&format!("running: {} streams", running.running()));
}

/// What [`Signals::recv`] caught.
enum Received {
    /// SIGINT or SIGTERM, by name.
    Stop(&'static str),
    /// SIGHUP.
    Reload,
}

/// SIGINT, SIGTERM and SIGHUP, caught from the moment [`Signals::install`] returns.
struct Signals {
    interrupt: Option<Signal>,
    terminate: Option<Signal>,
    hangup: Option<Signal>,
}

impl Signals {
    fn install() -> Signals {
        let interrupt = signal(SignalKind::interrupt()).ok();
        let terminate = signal(SignalKind::terminate()).ok();
        let hangup = signal(SignalKind::hangup()).ok();
        if interrupt.is_none() || terminate.is_none() || hangup.is_none() {
            warn!("cannot install signal handlers; only the end of every stream stops the daemon");
        }
        Signals { interrupt, terminate, hangup }
    }

    async fn recv(&mut self) -> Received {
        match (&mut self.interrupt, &mut self.terminate, &mut self.hangup) {
            (Some(interrupt), Some(terminate), Some(hangup)) => tokio::select! {
                _ = interrupt.recv() => Received::Stop("SIGINT"),
                _ = terminate.recv() => Received::Stop("SIGTERM"),
                _ = hangup.recv() => Received::Reload,
            },
            _ => std::future::pending().await,
        }
    }
}
