//! What a SIGHUP reload changes: a plan computed from the running and the new settings.
//!
//! A reload re-reads the config file and applies what can change while the daemon runs: streams
//! are added, removed or restarted one by one (a stream whose settings did not change keeps
//! running, with its sequence numbers), and the model bundle is swapped between two batches when
//! its settings or its files changed. Everything else (the device id, the broker connection, the
//! engine's queue and batching, the metrics listener) is wired into running tasks; a change there
//! is reported as needing a restart and the running value stays. [`ReloadPlan::new`] decides
//! all of that without I/O; [`Running::reload`] carries it out. A reload is all or nothing: a
//! config file with a problem, or a bundle that does not load, is refused with an ERROR line
//! naming the file, and the daemon goes on exactly as before.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crossbeam_channel::Sender;
use serde::Serialize;
use tracing::{error, info, warn};

use super::prepare_bundle;
use crate::config::{Settings, SourcesSettings, StreamSettings};
use crate::engine::{FrameModel, ModelSlot};
use crate::metrics::Metrics;
use crate::model;
use crate::source::{self, SourceEvent, SourceHandle, SourceStatus};

/// What to do with the running daemon to match new settings.
#[derive(Debug, Default)]
pub struct ReloadPlan {
    /// Streams that are gone from the new settings: stop them.
    pub stop: Vec<String>,
    /// Streams whose settings changed: stop them, then start them with the new settings.
    pub restart: Vec<StreamSettings>,
    /// New streams: start them.
    pub start: Vec<StreamSettings>,
    /// Streams that did not change and keep running.
    pub keep: Vec<String>,
    /// The `[model]` section changed: load the new bundle and swap it in.
    pub model_changed: bool,
    /// Keys whose change only takes effect at the next restart.
    pub needs_restart: Vec<&'static str>,
}

impl ReloadPlan {
    pub fn new(running: &Settings, new: &Settings) -> ReloadPlan {
        let mut plan = ReloadPlan::default();
        for stream in &running.streams {
            match new.streams.iter().find(|candidate| candidate.name == stream.name) {
                None => plan.stop.push(stream.name.clone()),
                Some(candidate) if same(stream, candidate) => plan.keep.push(stream.name.clone()),
                Some(candidate) => plan.restart.push(candidate.clone()),
            }
        }
        for stream in &new.streams {
            if !running.streams.iter().any(|old| old.name == stream.name) {
                plan.start.push(stream.clone());
            }
        }
        plan.model_changed = !same(&running.model, &new.model);
        let fixed: [(&'static str, bool); 6] = [
            ("device_id", running.device_id == new.device_id),
            ("log", running.log == new.log),
            ("engine", same(&running.engine, &new.engine)),
            ("mqtt", same(&running.mqtt, &new.mqtt)),
            ("smoothing", same(&running.smoothing, &new.smoothing)),
            ("metrics", same(&running.metrics, &new.metrics)),
        ];
        plan.needs_restart =
            fixed.into_iter().filter(|(_, unchanged)| !unchanged).map(|(key, _)| key).collect();
        plan
    }

    /// Nothing to do beyond re-checking the model files.
    pub fn is_empty(&self) -> bool {
        self.stop.is_empty() && self.restart.is_empty() && self.start.is_empty()
    }
}

/// The running streams and what a reload needs to change them.
pub struct Running {
    /// The settings in force: the file's, except the sections that need a restart.
    pub settings: Settings,
    handles: HashMap<String, SourceHandle>,
    /// Kept while any stream runs; dropped once every stream has ended, so the engine drains.
    events: Option<Sender<SourceEvent>>,
    metrics: Arc<Metrics>,
    /// Checksum of the bundle the engine runs.
    checksum: String,
}

/// What a successful reload did, for the log.
#[derive(Debug, Default)]
pub struct Reloaded {
    pub started: usize,
    pub stopped: usize,
    pub restarted: usize,
    pub model_swapped: bool,
}

impl Running {
    pub fn new(
        settings: Settings,
        events: Sender<SourceEvent>,
        metrics: Arc<Metrics>,
        checksum: String,
    ) -> Running {
        Running { settings, handles: HashMap::new(), events: Some(events), metrics, checksum }
    }

    /// Starts every configured stream; one that cannot start is reported and the others go on.
    pub fn start_all(&mut self) {
        let (streams, policy) = (self.settings.streams.clone(), self.settings.sources.clone());
        for stream in &streams {
            self.start(stream, &policy);
        }
    }

    /// Streams with a running source thread.
    pub fn running(&self) -> usize {
        self.handles.values().filter(|handle| !handle.is_finished()).count()
    }

    /// Once every source has finished, lets go of the engine's input so that it drains and
    /// ends.
    pub fn release_when_all_ended(&mut self) {
        if self.handles.values().all(SourceHandle::is_finished) {
            self.events = None;
        }
    }

    /// Asks every source to stop and lets go of the engine's input; returns the handles to
    /// join.
    pub fn stop_all(&mut self) -> Vec<SourceHandle> {
        self.events = None;
        let handles: Vec<SourceHandle> = self.handles.drain().map(|(_, handle)| handle).collect();
        for handle in &handles {
            handle.stop();
        }
        handles
    }

    fn start(&mut self, stream: &StreamSettings, policy: &SourcesSettings) {
        let Some(events) = &self.events else { return };
        match source::spawn(stream, policy, Arc::clone(&self.metrics), events.clone()) {
            Ok(handle) => {
                self.handles.insert(stream.name.clone(), handle);
            }
            Err(error) => {
                error!(stream = %stream.name, %error, "stream cannot start");
                let name: Arc<str> = stream.name.as_str().into();
                self.metrics.stream(&stream.name).set_status("failed");
                let status = SourceStatus::Failed { reason: error.to_string() };
                let _ = events.send(SourceEvent::Status { stream: name.clone(), status });
                let _ = events.send(SourceEvent::Failed { stream: name, error });
            }
        }
    }

    /// Re-reads `file` and applies it; see the module documentation.
    pub async fn reload(&mut self, file: &Path, slot: &ModelSlot) -> Result<Reloaded, String> {
        if self.events.is_none() {
            return Err("every stream has ended; the daemon is shutting down".into());
        }
        let path = file.to_path_buf();
        let loaded = tokio::task::spawn_blocking(move || Settings::load(Some(&path)))
            .await
            .map_err(|error| format!("the reload task failed: {error}"))?;
        let new = loaded.map_err(|error| error.to_string())?;
        let plan = ReloadPlan::new(&self.settings, &new);

        // The model first: if it does not load, nothing else changes.
        let model_settings = new.model.clone();
        let running_checksum = self.checksum.clone();
        let model_changed = plan.model_changed;
        // The running engine keeps the batch limit it started with.
        let max_batch = self.settings.engine.max_batch;
        let swapped = tokio::task::spawn_blocking(move || {
            let bundle = prepare_bundle(&model_settings.path, model_settings.synth_if_missing)
                .map_err(|error| error.to_string())?;
            if !model_changed && bundle.identity.checksum == running_checksum {
                return Ok(None);
            }
            let model_error = |error| format!("model {}: {error}", bundle.dir.display());
            let options = model_settings.backend_options();
            let mut backend = model::open_backend(&bundle, &options).map_err(model_error)?;
            // Off the engine thread, so the swap does not stall the streams.
            model::warm_up(backend.as_mut(), bundle.input_size, max_batch).map_err(model_error)?;
            let checksum = bundle.identity.checksum.clone();
            Ok::<_, String>(Some((FrameModel::new(backend, &bundle), bundle, checksum)))
        })
        .await
        .map_err(|error| format!("the model loading task failed: {error}"))??;
        let mut done = Reloaded::default();
        if let Some((model, bundle, checksum)) = swapped {
            let backend = model.backend_info();
            info!(model = %bundle.identity.name, version = %bundle.identity.version, %checksum,
                backend = backend.backend, device = %backend.device,
                precision = backend.precision.as_str(),
                "new model loaded; the engine swaps it in before its next batch");
            self.metrics.engine.set_backend(&backend);
            slot.put(model, &bundle);
            self.checksum = checksum;
            done.model_swapped = true;
        }

        for key in &plan.needs_restart {
            warn!(key, file = %file.display(), "changed; takes effect at the next restart");
        }
        if !same(&self.settings.sources, &new.sources) {
            warn!(
                file = %file.display(),
                "[sources] changed: streams this reload starts or restarts use it; streams that \
                 keep running keep the policy they started with"
            );
        }
        let restarting: Vec<String> = plan.restart.iter().map(|s| s.name.clone()).collect();
        let leaving: Vec<SourceHandle> = plan
            .stop
            .iter()
            .chain(&restarting)
            .filter_map(|name| self.handles.remove(name))
            .collect();
        for handle in &leaving {
            info!(stream = %handle.stream(), "stopping for the reload");
            handle.stop();
        }
        // A restarted stream's old source must be gone before its new one starts.
        tokio::task::spawn_blocking(move || leaving.into_iter().for_each(SourceHandle::join))
            .await
            .map_err(|error| format!("stopping streams failed: {error}"))?;
        for stream in plan.start.iter().chain(&plan.restart) {
            info!(stream = %stream.name, "starting for the reload");
            self.start(stream, &new.sources);
        }
        done.started = plan.start.len();
        done.stopped = plan.stop.len();
        done.restarted = plan.restart.len();

        let old = std::mem::replace(&mut self.settings, new);
        self.settings.device_id = old.device_id;
        self.settings.log = old.log;
        self.settings.engine = old.engine;
        self.settings.mqtt = old.mqtt;
        self.settings.smoothing = old.smoothing;
        self.settings.metrics = old.metrics;
        Ok(done)
    }
}

/// Equal as configured; compared through their serialised form so that a field added to a
/// settings struct is compared without touching this file.
fn same<T: Serialize>(a: &T, b: &T) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(name: &str, fps: f64) -> StreamSettings {
        StreamSettings {
            name: name.into(),
            kind: "test".into(),
            fps: Some(fps),
            ..StreamSettings::default()
        }
    }

    fn settings(streams: Vec<StreamSettings>) -> Settings {
        Settings { device_id: "box".into(), streams, ..Settings::default() }
    }

    #[test]
    fn keeps_unchanged_streams_and_sorts_the_rest() {
        let running = settings(vec![stream("a", 1.0), stream("b", 1.0), stream("c", 1.0)]);
        let new = settings(vec![stream("a", 1.0), stream("b", 2.0), stream("d", 1.0)]);
        let plan = ReloadPlan::new(&running, &new);
        assert_eq!(plan.keep, ["a"]);
        assert_eq!(plan.stop, ["c"]);
        assert_eq!(plan.restart.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["b"]);
        assert_eq!(plan.start.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["d"]);
        assert!(!plan.model_changed);
        assert!(plan.needs_restart.is_empty());
    }

    #[test]
    fn notices_a_new_model_and_settings_that_need_a_restart() {
        let running = settings(vec![stream("a", 1.0)]);
        let mut new = settings(vec![stream("a", 1.0)]);
        new.model.path = "models/other".into();
        new.mqtt.port = 1884;
        new.device_id = "box-2".into();
        let plan = ReloadPlan::new(&running, &new);
        assert!(plan.model_changed);
        assert!(plan.is_empty());
        assert_eq!(plan.needs_restart, ["device_id", "mqtt"]);
    }
}
