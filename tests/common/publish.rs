//! What the publisher tests feed the publisher: settings for a private broker and
//! classification payloads that vary with their sequence number.

use std::path::Path;
use std::time::SystemTime;

use edgesight::config::Settings;
use edgesight::publish::payload::{
    Classification, LabelScore, Latency, ModelRef, SCHEMA_VERSION, rfc3339_ms,
};

/// Settings for a private broker on 127.0.0.1:`port`; each test's spool lives in its own
/// temporary directory.
pub fn publisher_settings(port: u16, device: &str, spool: &Path) -> Settings {
    let mut settings = Settings { device_id: device.into(), ..Settings::default() };
    settings.mqtt.spool_dir = Some(spool.to_path_buf());
    settings.mqtt.host = "127.0.0.1".into();
    settings.mqtt.port = port;
    settings.mqtt.prefix = "edgesight-test".into();
    settings.mqtt.flush_timeout_s = 3;
    settings.mqtt.keep_alive_s = 5;
    settings
}

/// A classification of frame `seq` of `stream`.
pub fn classification(device: &str, stream: &str, seq: u64) -> Classification {
    let score = 0.5 + (seq % 5) as f32 / 10.0;
    Classification {
        schema: SCHEMA_VERSION,
        device: device.into(),
        stream: stream.into(),
        run_id: "run-1".into(),
        seq,
        captured_at: rfc3339_ms(SystemTime::now()),
        position_ms: Some(seq * 500),
        label: "person".into(),
        score,
        top_k: vec![
            LabelScore { label: "person".into(), score },
            LabelScore { label: "cat".into(), score: 1.0 - score },
        ],
        latency_ms: Latency { queue: 0.5, preprocess: 1.0, backbone: 30.0, head: 2.0, total: 34.0 },
        model: ModelRef { name: "synth".into(), version: "1".into(), checksum: "00ff".into() },
        embedding: None,
        replayed: false,
    }
}
