//! Typed settings: a TOML file plus `EDGESIGHT__SECTION__KEY` environment overrides.
//!
//! Loading goes through the `config` crate so that the file and the environment merge in one
//! place. Deserialisation is wrapped in `serde_ignored`, so every unknown key is collected
//! (with its full path) instead of stopping at the first one, and [`Settings::validate`] then
//! reports every semantic problem at once, each naming its key. An operator fixing a config
//! file sees the whole list in one run of `edgesight config check`.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod engine;
mod mqtt;
mod sources;

pub(crate) use sources::check_launch;
use sources::{live_kind_problems, stall_problem};

/// The environment prefix; `EDGESIGHT__MQTT__PORT=1884` overrides `mqtt.port`.
pub const ENV_PREFIX: &str = "EDGESIGHT";

/// The config file the daemon reads when `--config` is not given, if it exists.
pub const SYSTEM_CONFIG: &str = "/etc/edgesight/edgesight.toml";

/// Everything edgesight reads from its configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Identifies this box in topics and payloads. Default: the host name.
    pub device_id: String,
    /// Log filter in `tracing` syntax, e.g. `info` or `edgesight=debug`. Default `info`.
    /// `RUST_LOG` wins when set.
    pub log: String,
    pub model: ModelSettings,
    pub engine: EngineSettings,
    pub mqtt: MqttSettings,
    /// Defaults for every stream's label smoothing; a stream's `smoothing` table overrides.
    pub smoothing: SmoothingSettings,
    pub metrics: MetricsSettings,
    /// How live sources are watched and restarted.
    pub sources: SourcesSettings,
    pub streams: Vec<StreamSettings>,
}

/// `[sources]`: supervision of live sources (`v4l2`, `rtsp`, `test`, `pipeline`, and `uri`
/// with a live scheme). A live source that errors, ends, or delivers no frame for
/// `stall_timeout_s` is torn down and rebuilt after a delay that grows exponentially from
/// `backoff_initial_ms` by `backoff_multiplier` up to `backoff_max_ms`, each delay spread by
/// ± `backoff_jitter` (a fraction) so that many cameras behind one switch do not reconnect in
/// lock step. The delay starts over once a source has delivered frames again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SourcesSettings {
    /// Seconds without a decoded frame after which a live source counts as stalled and is
    /// rebuilt. Default 10. Streams may override it with their own `stall_timeout_s`.
    pub stall_timeout_s: f64,
    /// First delay before rebuilding a failed live source, milliseconds. Default 500.
    pub backoff_initial_ms: u64,
    /// Longest delay between rebuilds, milliseconds. Default 30000.
    pub backoff_max_ms: u64,
    /// Factor applied to the delay after each failed attempt; at least 1. Default 2.0.
    pub backoff_multiplier: f64,
    /// Random spread of each delay, as a fraction in [0, 1): 0.2 means ± 20 %. Default 0.2.
    pub backoff_jitter: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelSettings {
    /// A bundle directory (see `models/README.md`). Default `models/default`.
    pub path: PathBuf,
    /// Inference backend: `tract` (CPU, default) or `torch` (needs the `torch` build feature).
    pub backend: Backend,
    /// torch only: `auto`, `cpu`, `cuda` or `cuda:N`. Default `auto` (CUDA device 0 when
    /// libtorch sees one, else the CPU).
    pub device: String,
    /// torch only: `f32`, `bf16` (CPUs with AVX-512 BF16 or AMX, recent GPUs) or `f16` (CUDA).
    /// Default `f32`; tract always runs f32.
    pub precision: Precision,
    /// Inference threads; 0 means one per CPU core. Default 0.
    pub threads: usize,
    /// Write a seeded synthetic bundle to `path` when it does not exist. Default false; the
    /// built-in demo turns it on.
    pub synth_if_missing: bool,
}

pub use crate::model::{BackendKind as Backend, Precision};

impl ModelSettings {
    /// The options [`crate::model::open_backend`] takes.
    pub fn backend_options(&self) -> crate::model::BackendOptions {
        crate::model::BackendOptions {
            kind: self.backend,
            device: self.device.clone(),
            precision: self.precision,
            threads: self.threads,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineSettings {
    /// Frames waiting for inference, all streams together. When full, file sources wait and
    /// live sources drop their oldest frame. Default 8.
    pub queue: usize,
    /// Labels listed in each payload's `top_k`. Default 3.
    pub top_k: usize,
    /// Publish the k-dimensional PCA embedding with each classification. Default false.
    pub embeddings: bool,
    /// Most frames, from any streams, run through the model in one call. Default 1 (no
    /// batching): on CPUs tract runs a batch slower per frame than single frames
    /// (`benches/results.md`); batching pays off on the libtorch backend and on GPUs.
    pub max_batch: usize,
    /// Longest a batch waits for more frames after its first frame arrived, milliseconds.
    /// Default 20; 0 runs whatever is queued at once.
    pub max_wait_ms: u64,
    /// Republish each running stream's retained `state`, and each stream's source `status`
    /// (but `ended`), this often even when nothing changed, seconds. Default 60; 0 = only on
    /// change.
    pub state_heartbeat_s: u64,
    /// `every`: one `classification` message per classified frame (default). `on_change`: only
    /// when the stream's smoothed label changes (`seq` still counts every classified frame).
    pub classifications: Classifications,
}

/// Which classified frames get a `classification` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classifications {
    Every,
    OnChange,
}

/// How a stream's retained label follows the per-frame labels. Every key is optional in a
/// stream's `smoothing` table; what is absent comes from the `[smoothing]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SmoothingSettings {
    /// `none` (the label of the latest frame), `majority` (the most frequent label of the last
    /// `window` frames) or `ema` (exponential moving average of each label's score, with
    /// hysteresis). Default `none`.
    pub method: SmoothingMethod,
    /// majority: frames voting, 1–1000. Default 5.
    pub window: usize,
    /// ema: weight of the newest frame, in (0, 1]. Default 0.3.
    pub alpha: f64,
    /// ema: a label takes over once its average reaches this score, in (0, 1]. Default 0.6.
    pub enter: f64,
    /// ema: the current label is given up when its average falls below this score, in
    /// [0, `enter`]. Default 0.4.
    pub leave: f64,
    /// A new label must hold this long (capture time) before the state changes, seconds.
    /// Default 0.
    pub min_dwell_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmoothingMethod {
    None,
    Majority,
    Ema,
}

/// A stream's `smoothing` table: any subset of the `[smoothing]` keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SmoothingOverride {
    pub method: Option<SmoothingMethod>,
    pub window: Option<usize>,
    pub alpha: Option<f64>,
    pub enter: Option<f64>,
    pub leave: Option<f64>,
    pub min_dwell_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsSettings {
    /// Seconds between messages on the `<prefix>/<device>/stats` topic. Default 10; 0 = off.
    pub stats_interval_s: u64,
    /// Address of the Prometheus endpoint (`GET /metrics`), e.g. `127.0.0.1:9464`. Default:
    /// none (off).
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MqttSettings {
    /// Broker host name or address. Default `127.0.0.1`.
    pub host: String,
    /// Broker TCP port. Default 1883.
    pub port: u16,
    /// Topic prefix; topics are `<prefix>/<device_id>/…`. Default `edgesight`.
    pub prefix: String,
    /// QoS of `classification` messages: 0, 1 or 2. Default 1.
    pub qos: u8,
    /// MQTT client id. Default `edgesight-<device_id>`.
    pub client_id: Option<String>,
    /// Credentials; both or neither. Default none.
    pub username: Option<String>,
    pub password: Option<String>,
    /// MQTT keep-alive, seconds. Default 30.
    pub keep_alive_s: u64,
    /// Seconds to wait at shutdown for the broker to acknowledge QoS ≥ 1 messages. Default 10.
    pub flush_timeout_s: u64,
    /// `never`: only use the configured broker. `auto`: when `host` is a loopback address and
    /// nothing listens on `port` at start, run an embedded broker there. `always`: run the
    /// embedded broker on 127.0.0.1:`port`. Default `never`; the built-in demo uses `auto`.
    pub embedded: Embedded,
    /// Print every message published to standard output. Default false; the demo turns it on.
    pub echo: bool,
    /// Directory of the on-disk spool, where QoS ≥ 1 messages wait while the broker is
    /// unreachable. Default: `$STATE_DIRECTORY/spool` when that variable is set (systemd's
    /// `StateDirectory=`), else `<cache dir>/spool/<client_id>`.
    pub spool_dir: Option<PathBuf>,
    /// Bound of the spool, MiB of messages; beyond it the oldest are dropped (counted and
    /// logged at ERROR). Default 64, minimum 1.
    pub spool_max_mb: u64,
    /// TLS to the broker; absent means plain TCP.
    pub tls: Option<TlsSettings>,
}

/// `[mqtt.tls]`: TLS to the broker, verified against a CA of the operator's choice.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct TlsSettings {
    /// PEM file of the CA certificate(s) that signed the broker's certificate. Required.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) and its private key, for brokers that ask for one; both
    /// or neither. Default none.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Name checked in the broker's certificate instead of `mqtt.host`. Default: `mqtt.host`.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Embedded {
    Never,
    Auto,
    Always,
}

/// One `[[streams]]` entry. The keys that apply depend on `kind`; a key set for a kind that
/// does not use it is an error, so a typo never silently falls back to a default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamSettings {
    /// Unique name; used in topics, so letters, digits, `-` and `_` only.
    pub name: String,
    /// `file`, `test`, `v4l2`, `rtsp`, `uri` or `pipeline`.
    pub kind: String,
    /// Cap on frames classified per second of stream time. Default 1.0.
    pub fps: Option<f64>,
    /// file: the video file.
    pub path: Option<PathBuf>,
    /// file: pace frames by their timestamps, as a camera would. Default false.
    pub realtime: Option<bool>,
    /// file: start again at the end instead of ending the stream. Default false.
    #[serde(rename = "loop")]
    pub looping: Option<bool>,
    /// test: a `videotestsrc` pattern name, e.g. `smpte`, `ball`. Default `smpte`.
    pub pattern: Option<String>,
    /// test: frame size in pixels. Default 320×240. v4l2: the size asked of the camera;
    /// absent means whatever the camera offers first.
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// test: frames to produce before the stream ends; absent means endless.
    pub frames: Option<u64>,
    /// Label smoothing of this stream; keys absent here come from `[smoothing]`.
    pub smoothing: Option<SmoothingOverride>,
    /// v4l2: the capture device. Default `/dev/video0`.
    pub device: Option<PathBuf>,
    /// v4l2: frames per second asked of the camera (not the classification cap, which is
    /// `fps`). Absent means the camera's default.
    pub framerate: Option<f64>,
    /// v4l2: `auto` (whatever the camera offers, decoded as needed), `mjpeg` (compressed
    /// frames through a JPEG decoder; most USB cameras reach their full size and rate only
    /// this way) or `yuyv` (raw YUY2). Default `auto`.
    pub format: Option<String>,
    /// rtsp: `rtsp://` or `rtsps://` address; uri: anything `uridecodebin` takes. Credentials
    /// inside the address are allowed and never logged.
    pub url: Option<String>,
    /// rtsp: `tcp` (interleaved in the RTSP connection; works through NAT and firewalls),
    /// `udp`, or `auto` (UDP, then TCP). Default `tcp`.
    pub transport: Option<String>,
    /// rtsp: jitter buffer, milliseconds. Default 200.
    pub latency_ms: Option<u32>,
    /// rtsp: credentials, both or neither; never logged. Default none.
    pub username: Option<String>,
    pub password: Option<String>,
    /// pipeline: a `gst-launch-1.0` description ending in `appsink name=sink`, e.g.
    /// `v4l2src ! jpegdec ! videoconvert ! appsink name=sink`. edgesight converts to RGB in
    /// front of the sink itself.
    pub pipeline: Option<String>,
    /// Live kinds: overrides `sources.stall_timeout_s` for this stream, seconds.
    pub stall_timeout_s: Option<f64>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            device_id: default_device_id(),
            log: "info".into(),
            model: ModelSettings::default(),
            engine: EngineSettings::default(),
            mqtt: MqttSettings::default(),
            smoothing: SmoothingSettings::default(),
            metrics: MetricsSettings::default(),
            sources: SourcesSettings::default(),
            streams: Vec::new(),
        }
    }
}

impl Default for SourcesSettings {
    fn default() -> Self {
        SourcesSettings {
            stall_timeout_s: 10.0,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
            backoff_multiplier: 2.0,
            backoff_jitter: 0.2,
        }
    }
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            path: PathBuf::from("models/default"),
            backend: Backend::Tract,
            device: "auto".into(),
            precision: Precision::F32,
            threads: 0,
            synth_if_missing: false,
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            queue: 8,
            top_k: 3,
            embeddings: false,
            max_batch: 1,
            max_wait_ms: 20,
            state_heartbeat_s: 60,
            classifications: Classifications::Every,
        }
    }
}

impl Default for SmoothingSettings {
    fn default() -> Self {
        SmoothingSettings {
            method: SmoothingMethod::None,
            window: 5,
            alpha: 0.3,
            enter: 0.6,
            leave: 0.4,
            min_dwell_s: 0.0,
        }
    }
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings { stats_interval_s: 10, listen: None }
    }
}

impl Default for MqttSettings {
    fn default() -> Self {
        MqttSettings {
            host: "127.0.0.1".into(),
            port: 1883,
            prefix: "edgesight".into(),
            qos: 1,
            client_id: None,
            username: None,
            password: None,
            keep_alive_s: 30,
            flush_timeout_s: 10,
            embedded: Embedded::Never,
            echo: false,
            spool_dir: None,
            spool_max_mb: 64,
            tls: None,
        }
    }
}

/// The host name, or `edgesight` when it cannot be read.
pub fn default_device_id() -> String {
    hostname::get()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "edgesight".into())
}

/// One thing wrong with a configuration, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `mqtt.port` or `streams[1].path`.
    pub key: String,
    pub message: String,
}

impl Problem {
    /// Says so when the key's value came from an `EDGESIGHT__…` environment variable, which the
    /// operator would otherwise look for in the file.
    fn name_environment_override(&mut self) {
        let section_key = self.key.split('[').next().unwrap_or_default();
        let variable = format!(
            "{ENV_PREFIX}__{}",
            section_key.split('.').collect::<Vec<_>>().join("__").to_uppercase()
        );
        if !section_key.is_empty() && std::env::var_os(&variable).is_some() {
            self.message.push_str(&format!(" (set by the environment variable {variable})"));
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// A configuration that could not be used: where it came from and every problem found.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        let noun = if count == 1 { "problem" } else { "problems" };
        write!(f, "{}: {count} {noun}", self.source_name)?;
        for problem in &self.problems {
            write!(f, "\n  {problem}")?;
        }
        Ok(())
    }
}

impl Settings {
    /// The built-in demo: a synthetic model generated once under `cache_dir`, a test-pattern
    /// stream, and an embedded broker when none listens on 127.0.0.1:1883.
    pub fn demo(cache_dir: &Path) -> Settings {
        let mut settings = Settings::default();
        settings.model.path = cache_dir.join("models").join("demo");
        settings.model.synth_if_missing = true;
        settings.mqtt.embedded = Embedded::Auto;
        settings.mqtt.echo = true;
        settings.streams.push(StreamSettings {
            name: "demo".into(),
            kind: "test".into(),
            fps: Some(1.0),
            pattern: Some("ball".into()),
            ..StreamSettings::default()
        });
        settings
    }

    /// Reads `file` (when given) and the environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let source_name =
            file.map_or_else(|| "environment".to_string(), |f| f.display().to_string());
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError {
                    source_name,
                    problems: vec![Problem {
                        key: "(file)".into(),
                        message: "no such file".into(),
                    }],
                });
            }
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        let raw = builder.build().map_err(|error| ConfigError {
            source_name: source_name.clone(),
            problems: vec![Problem { key: "(file)".into(), message: error.to_string() }],
        })?;
        Self::from_config(raw, source_name)
    }

    /// Parses TOML text (and the environment), for tests and `config check` on stdin.
    pub fn from_toml_str(text: &str, source_name: &str) -> Result<Settings, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .map_err(|error| ConfigError {
                source_name: source_name.into(),
                problems: vec![Problem { key: "(file)".into(), message: error.to_string() }],
            })?;
        Self::from_config(raw, source_name.into())
    }

    fn from_config(raw: config::Config, source_name: String) -> Result<Settings, ConfigError> {
        let mut unknown = Vec::new();
        let parsed: Result<Settings, _> =
            serde_ignored::deserialize(raw.clone(), |path| unknown.push(path.to_string()));
        // The config crate keeps tables in hash maps, so keys arrive in a different order on
        // each run; sorted, the report reads the same every time.
        unknown.sort();
        let mut problems: Vec<Problem> = unknown
            .into_iter()
            .map(|key| Problem { key: tidy_key(&key), message: "unknown key".into() })
            .collect();
        match parsed {
            Ok(settings) => problems.extend(settings.validate()),
            Err(error) => {
                // The whole-file error names the exact key; the per-section pass finds the
                // problems after it, naming their section.
                let first = type_problem(&error);
                let covered = |problem: &Problem| {
                    let rest = first.key.strip_prefix(problem.key.as_str());
                    rest.is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
                };
                let rest: Vec<Problem> = Self::section_problems(&raw);
                problems.push(first.clone());
                problems.extend(rest.into_iter().filter(|problem| !covered(problem)));
            }
        }
        for problem in &mut problems {
            problem.name_environment_override();
        }
        if problems.is_empty() {
            // Parsed without problems just above; parsing again cannot fail differently.
            serde_ignored::deserialize(raw, |_| {})
                .map_err(|error| ConfigError { source_name, problems: vec![type_problem(&error)] })
        } else {
            Err(ConfigError { source_name, problems })
        }
    }

    /// After a type error, which stops serde at its first one: each section on its own, so
    /// that type errors in other sections are reported too, and the semantic checks of the
    /// sections that did parse.
    fn section_problems(raw: &config::Config) -> Vec<Problem> {
        fn section<T: serde::de::DeserializeOwned>(
            raw: &config::Config,
            key: &str,
            failed: &mut Vec<String>,
            problems: &mut Vec<Problem>,
        ) -> Option<T> {
            match raw.get::<T>(key) {
                Ok(value) => Some(value),
                Err(config::ConfigError::NotFound(_)) => None,
                Err(error) => {
                    failed.push(key.to_string());
                    problems.push(type_problem(&error));
                    None
                }
            }
        }
        let (mut failed, mut problems) = (Vec::new(), Vec::new());
        let mut settings = Settings::default();
        if let Some(value) = section(raw, "device_id", &mut failed, &mut problems) {
            settings.device_id = value;
        }
        if let Some(value) = section(raw, "log", &mut failed, &mut problems) {
            settings.log = value;
        }
        if let Some(value) = section(raw, "model", &mut failed, &mut problems) {
            settings.model = value;
        }
        if let Some(value) = section(raw, "engine", &mut failed, &mut problems) {
            settings.engine = value;
        }
        if let Some(value) = section(raw, "mqtt", &mut failed, &mut problems) {
            settings.mqtt = value;
        }
        if let Some(value) = section(raw, "smoothing", &mut failed, &mut problems) {
            settings.smoothing = value;
        }
        if let Some(value) = section(raw, "metrics", &mut failed, &mut problems) {
            settings.metrics = value;
        }
        if let Some(value) = section(raw, "sources", &mut failed, &mut problems) {
            settings.sources = value;
        }
        if let Some(value) = section(raw, "streams", &mut failed, &mut problems) {
            settings.streams = value;
        } else if failed.iter().any(|key| key == "streams") {
            // Keep the "at least one stream" check from firing on streams that failed to parse.
            settings.streams.push(StreamSettings::default());
        }
        let in_failed = |key: &str| {
            failed.iter().any(|section| key == section || key.starts_with(section.as_str()))
        };
        problems.extend(settings.validate().into_iter().filter(|problem| !in_failed(&problem.key)));
        problems
    }

    /// Every semantic problem, each naming its key. Empty when the settings are usable.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(Problem { key: key.to_string(), message });
        };
        if !is_topic_word(&self.device_id) {
            problem(
                "device_id",
                format!("{:?} must be non-empty, without / + # or spaces", self.device_id),
            );
        }
        if self.model.backend == Backend::Torch && !cfg!(feature = "torch") {
            problem(
                "model.backend",
                "\"torch\" needs a build with the `torch` feature; this build has tract only"
                    .into(),
            );
        }
        for (key, message) in self.model.backend_options().problems() {
            problem(&format!("model.{key}"), message);
        }
        if self.engine.queue == 0 {
            problem("engine.queue", "must be at least 1".into());
        }
        if self.engine.top_k == 0 {
            problem("engine.top_k", "must be at least 1".into());
        }
        if self.mqtt.host.trim().is_empty() {
            problem("mqtt.host", "must not be empty".into());
        }
        if self.mqtt.port == 0 {
            problem("mqtt.port", "must be 1–65535".into());
        }
        if self.mqtt.qos > 2 {
            problem("mqtt.qos", format!("{} is not 0, 1 or 2", self.mqtt.qos));
        }
        if self.mqtt.prefix.is_empty() || self.mqtt.prefix.contains(['+', '#']) {
            problem(
                "mqtt.prefix",
                format!("{:?} must be non-empty, without + or #", self.mqtt.prefix),
            );
        }
        if self.mqtt.username.is_some() != self.mqtt.password.is_some() {
            problem("mqtt.password", "username and password go together".into());
        }
        if self.mqtt.keep_alive_s < 5 {
            problem("mqtt.keep_alive_s", "must be at least 5 seconds".into());
        }
        self.validate_publisher(&mut problem);
        if self.streams.is_empty() {
            problem("streams", "at least one [[streams]] entry is needed".into());
        }
        for found in self.engine_problems() {
            problem(&found.key, found.message);
        }
        for (index, stream) in self.streams.iter().enumerate() {
            for (key, message) in stream.problems() {
                problem(&format!("streams[{index}].{key}"), message);
            }
            let first = self.streams.iter().position(|other| other.name == stream.name);
            if !stream.name.is_empty() && first != Some(index) {
                problem(
                    &format!("streams[{index}].name"),
                    format!("{:?} is used twice", stream.name),
                );
            }
        }
        problems.extend(self.sources_problems());
        problems
    }

    /// The `client_id` to use: configured, or `edgesight-<device_id>`.
    pub fn client_id(&self) -> String {
        self.mqtt.client_id.clone().unwrap_or_else(|| format!("edgesight-{}", self.device_id))
    }

    /// The effective configuration as TOML, with the password masked.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.mqtt.password.is_some() {
            shown.mqtt.password = Some("********".into());
        }
        for stream in &mut shown.streams {
            if stream.password.is_some() {
                stream.password = Some("********".into());
            }
            if let Some(url) = &stream.url {
                stream.url = Some(crate::source::redact_url(url));
            }
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|error| format!("# cannot print: {error}"))
    }
}

impl StreamSettings {
    /// The fps cap, default 1.0.
    pub fn fps(&self) -> f64 {
        self.fps.unwrap_or(1.0)
    }

    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut problems = Vec::new();
        if !is_topic_word(&self.name) || self.name.contains('.') {
            problems.push(("name", format!("{:?} must be letters, digits, - or _", self.name)));
        }
        if let Some(fps) = self.fps
            && !(fps.is_finite() && fps > 0.0 && fps <= 1000.0)
        {
            problems.push(("fps", format!("{fps} is not in (0, 1000]")));
        }
        let used: &[&'static str] = match self.kind.as_str() {
            "file" => {
                match &self.path {
                    None => problems.push(("path", "a file stream needs a path".into())),
                    Some(path) if path.as_os_str().is_empty() => {
                        problems.push(("path", "must not be empty".into()))
                    }
                    Some(_) => {}
                }
                &["path", "realtime", "loop"]
            }
            "test" => {
                for (key, value) in [("width", self.width), ("height", self.height)] {
                    if let Some(value) = value
                        && !(16..=7680).contains(&value)
                    {
                        problems.push((key, format!("{value} is not in 16–7680")));
                    }
                }
                stall_problem(self.stall_timeout_s, &mut problems);
                &["pattern", "width", "height", "frames", "stall_timeout_s"]
            }
            "v4l2" | "rtsp" | "uri" | "pipeline" => live_kind_problems(self, &mut problems),
            other => {
                problems.push((
                    "kind",
                    format!("{other:?} is not file, test, v4l2, rtsp, uri or pipeline"),
                ));
                return problems;
            }
        };
        let set = [
            ("path", self.path.is_some()),
            ("realtime", self.realtime.is_some()),
            ("loop", self.looping.is_some()),
            ("pattern", self.pattern.is_some()),
            ("width", self.width.is_some()),
            ("height", self.height.is_some()),
            ("frames", self.frames.is_some()),
            ("device", self.device.is_some()),
            ("framerate", self.framerate.is_some()),
            ("format", self.format.is_some()),
            ("url", self.url.is_some()),
            ("transport", self.transport.is_some()),
            ("latency_ms", self.latency_ms.is_some()),
            ("username", self.username.is_some()),
            ("password", self.password.is_some()),
            ("pipeline", self.pipeline.is_some()),
            ("stall_timeout_s", self.stall_timeout_s.is_some()),
        ];
        for (key, is_set) in set {
            if is_set && !used.contains(&key) {
                problems.push((key, format!("does not apply to kind {:?}", self.kind)));
            }
        }
        problems
    }
}

fn is_topic_word(word: &str) -> bool {
    !word.is_empty() && !word.contains(['/', '+', '#', ' ', '\0'])
}

/// `serde_ignored` writes sequence indices as `streams.1.foo` and the `config` crate as
/// `streams[1]foo`; operators read `streams[1].foo`.
fn tidy_key(key: &str) -> String {
    let key = key.replace("]", "].").replace("].[", "][").replace("]..", "].");
    let key = key.strip_suffix('.').unwrap_or(&key);
    let mut out = String::new();
    // serde_ignored writes `?` for the inside of an Option (e.g. `mqtt.tls.?.colour`).
    for part in key.split('.').filter(|part| *part != "?") {
        if !out.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

/// A type error from the `config` crate names its key as `… for key `mqtt.port``; lift the key
/// out so the problem reads like the others.
fn type_problem(error: &config::ConfigError) -> Problem {
    let text = error.to_string();
    if let Some(start) = text.find("for key `") {
        let rest = &text[start + "for key `".len()..];
        if let Some(end) = rest.find('`') {
            let message = text[..start].trim().to_string();
            return Problem { key: tidy_key(&rest[..end]), message };
        }
    }
    Problem { key: "(value)".into(), message: text }
}

#[cfg(test)]
mod tests;
