//! What a SIGHUP reload changes: a plan computed from the running and the new settings.
//!
//! A reload re-reads the config file and applies what can change while the daemon runs: streams
//! are added, removed or restarted one by one (a stream whose settings did not change keeps
//! running, with its sequence numbers), and the model bundle is swapped between two batches when
//! its settings or its files changed. Everything else (the device id, the broker connection, the
//! engine's queue and batching, the metrics listener) is wired into running tasks; a change there
//! is reported as needing a restart and the running value stays. [`ReloadPlan::new`] decides
//! all of that without I/O.

use serde::Serialize;

use crate::config::{Settings, StreamSettings};

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
        let fixed: [(&'static str, bool); 4] = [
            ("device_id", running.device_id == new.device_id),
            ("log", running.log == new.log),
            ("engine", same(&running.engine, &new.engine)),
            ("mqtt", same(&running.mqtt, &new.mqtt)),
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
