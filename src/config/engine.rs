//! Validation of the engine's batching and smoothing keys and of `[metrics]`.

use super::{Problem, Settings, SmoothingOverride, SmoothingSettings};

impl SmoothingSettings {
    /// These defaults with a stream's overrides applied.
    pub fn with(&self, stream: Option<&SmoothingOverride>) -> SmoothingSettings {
        let Some(over) = stream else { return self.clone() };
        SmoothingSettings {
            method: over.method.unwrap_or(self.method),
            window: over.window.unwrap_or(self.window),
            alpha: over.alpha.unwrap_or(self.alpha),
            enter: over.enter.unwrap_or(self.enter),
            leave: over.leave.unwrap_or(self.leave),
            min_dwell_s: over.min_dwell_s.unwrap_or(self.min_dwell_s),
        }
    }

    /// Every problem, as (key below the section, message).
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !(1..=1000).contains(&self.window) {
            problems.push(("window", format!("{} is not in 1–1000", self.window)));
        }
        let unit = |value: f64| value.is_finite() && value > 0.0 && value <= 1.0;
        if !unit(self.alpha) {
            problems.push(("alpha", format!("{} is not in (0, 1]", self.alpha)));
        }
        if !unit(self.enter) {
            problems.push(("enter", format!("{} is not in (0, 1]", self.enter)));
        }
        if !(self.leave.is_finite() && self.leave >= 0.0 && self.leave <= self.enter) {
            problems
                .push(("leave", format!("{} is not in [0, enter = {}]", self.leave, self.enter)));
        }
        if !(self.min_dwell_s.is_finite() && (0.0..=86_400.0).contains(&self.min_dwell_s)) {
            problems.push(("min_dwell_s", format!("{} is not in 0–86400", self.min_dwell_s)));
        }
        problems
    }
}

impl Settings {
    /// Batching, smoothing and metrics keys (engine issue 5): `engine.max_batch`,
    /// `engine.max_wait_ms`, `[smoothing]`, each stream's `smoothing` table and `[metrics]`.
    pub(super) fn engine_problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(Problem { key, message });
        if !(1..=64).contains(&self.engine.max_batch) {
            problem("engine.max_batch".into(), format!("{} is not in 1–64", self.engine.max_batch));
        }
        if self.engine.max_wait_ms > 10_000 {
            let message = format!("{} ms is more than 10000", self.engine.max_wait_ms);
            problem("engine.max_wait_ms".into(), message);
        }
        for (key, message) in self.smoothing.problems() {
            problem(format!("smoothing.{key}"), message);
        }
        for (index, stream) in self.streams.iter().enumerate() {
            if let Some(over) = &stream.smoothing {
                let merged = self.smoothing.with(Some(over));
                // Only what this table sets: a bad default is reported once, under `smoothing`.
                let set = |key: &str| match key {
                    "window" => over.window.is_some(),
                    "alpha" => over.alpha.is_some(),
                    "enter" => over.enter.is_some(),
                    "leave" => over.leave.is_some() || over.enter.is_some(),
                    _ => over.min_dwell_s.is_some(),
                };
                for (key, message) in merged.problems().into_iter().filter(|(key, _)| set(key)) {
                    problem(format!("streams[{index}].smoothing.{key}"), message);
                }
            }
        }
        if let Some(listen) = &self.metrics.listen
            && listen.parse::<std::net::SocketAddr>().is_err()
        {
            let message = format!("{listen:?} is not an address:port such as 127.0.0.1:9464");
            problem("metrics.listen".into(), message);
        }
        if self.metrics.stats_interval_s > 86_400 {
            let message = format!("{} is more than 86400", self.metrics.stats_interval_s);
            problem("metrics.stats_interval_s".into(), message);
        }
        problems
    }
}
