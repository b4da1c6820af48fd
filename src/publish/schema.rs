//! The JSON Schemas of the published payloads, compiled into the binary.
//!
//! The files under `schema/` are the contract downstream systems code against; embedding them
//! lets a tool print them and lets the tests check every payload the publisher sends against
//! the very text that ships. The tests below pin both directions: what [`payload`] serialises is
//! valid, and a payload with a field missing or out of range is not, so a schema too loose to
//! catch anything fails here.
//!
//! [`payload`]: super::payload

/// `schema/classification.schema.json` (JSON Schema draft 2020-12).
pub const CLASSIFICATION: &str = include_str!("../../schema/classification.schema.json");

/// `schema/state.schema.json` (JSON Schema draft 2020-12).
pub const STATE: &str = include_str!("../../schema/state.schema.json");

/// `schema/stats.schema.json` (JSON Schema draft 2020-12).
pub const STATS: &str = include_str!("../../schema/stats.schema.json");
/// `schema/status.schema.json` (JSON Schema draft 2020-12).
pub const STATUS: &str = include_str!("../../schema/status.schema.json");

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::{Value, json};

    use super::*;
    use crate::publish::payload::{
        Classification, EngineStats, LabelScore, Latency, ModelRef, Percentiles, PublishStats,
        SCHEMA_VERSION, Stats, StreamState, StreamStats, rfc3339_ms,
    };

    fn validator(schema: &str) -> jsonschema::Validator {
        let schema: Value = serde_json::from_str(schema).unwrap();
        jsonschema::options().should_validate_formats(true).build(&schema).unwrap()
    }

    fn errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
        validator.iter_errors(instance).map(|error| error.to_string()).collect()
    }

    fn classification() -> Classification {
        let time = UNIX_EPOCH + Duration::from_millis(1_780_000_000_123);
        Classification {
            schema: SCHEMA_VERSION,
            device: "box-1".into(),
            stream: "door".into(),
            run_id: "4f1c2d3e-0000-4000-8000-000000000001".into(),
            seq: 42,
            captured_at: rfc3339_ms(time),
            position_ms: Some(84_000),
            label: "person".into(),
            score: 0.91,
            top_k: vec![
                LabelScore { label: "person".into(), score: 0.91 },
                LabelScore { label: "cat".into(), score: 0.06 },
            ],
            latency_ms: Latency {
                queue: 1.5,
                preprocess: 2.0,
                backbone: 40.25,
                head: 3.0,
                total: 47.0,
            },
            model: ModelRef { name: "demo".into(), version: "1".into(), checksum: "ab12".into() },
            embedding: Some(vec![0.5, -1.25, 3.0]),
            replayed: false,
        }
    }

    fn state() -> StreamState {
        StreamState {
            schema: SCHEMA_VERSION,
            device: "box-1".into(),
            stream: "door".into(),
            run_id: "run".into(),
            status: "running".into(),
            label: Some("person".into()),
            score: Some(0.8),
            since: Some(rfc3339_ms(UNIX_EPOCH)),
            seq: Some(3),
            raw_label: Some("cat".into()),
            raw_score: Some(0.55),
            error: None,
            updated_at: rfc3339_ms(UNIX_EPOCH + Duration::from_secs(5)),
            replayed: false,
        }
    }

    #[test]
    fn a_classification_is_valid_with_and_without_optional_fields() {
        let validator = validator(CLASSIFICATION);
        let full = serde_json::to_value(classification()).unwrap();
        assert_eq!(errors(&validator, &full), Vec::<String>::new());
        let bare = Classification { position_ms: None, embedding: None, ..classification() };
        let bare = serde_json::to_value(bare).unwrap();
        assert_eq!(errors(&validator, &bare), Vec::<String>::new());
    }

    #[test]
    fn replayed_is_absent_when_false_and_true_when_spooled() {
        let live = serde_json::to_value(classification()).unwrap();
        assert!(live.get("replayed").is_none(), "{live}");
        let late = serde_json::to_value(Classification { replayed: true, ..classification() });
        let late = late.unwrap();
        assert_eq!(late["replayed"], json!(true));
        assert_eq!(errors(&validator(CLASSIFICATION), &late), Vec::<String>::new());
        let state = serde_json::to_value(StreamState { replayed: true, ..state() }).unwrap();
        assert_eq!(errors(&validator(STATE), &state), Vec::<String>::new());
        let mut false_flag = live;
        false_flag["replayed"] = json!(false);
        assert!(!validator(CLASSIFICATION).is_valid(&false_flag), "only true is sent");
    }

    #[test]
    fn rejects_a_classification_missing_a_field() {
        let validator = validator(CLASSIFICATION);
        for field in ["run_id", "seq", "captured_at", "top_k", "model"] {
            let mut value = serde_json::to_value(classification()).unwrap();
            value.as_object_mut().unwrap().remove(field);
            assert!(!validator.is_valid(&value), "{field} missing was accepted");
        }
    }

    #[test]
    fn rejects_scores_outside_zero_to_one() {
        let validator = validator(CLASSIFICATION);
        let value =
            serde_json::to_value(Classification { score: 1.5, ..classification() }).unwrap();
        assert!(!validator.is_valid(&value));
        let mut value = serde_json::to_value(classification()).unwrap();
        value["top_k"][1]["score"] = json!(-0.1);
        assert!(!validator.is_valid(&value));
    }

    #[test]
    fn rejects_unknown_fields_bad_times_and_other_versions() {
        let validator = validator(CLASSIFICATION);
        let base = serde_json::to_value(classification()).unwrap();
        let mut extra = base.clone();
        extra["colour"] = json!("red");
        let mut time = base.clone();
        time["captured_at"] = json!("yesterday at noon");
        let mut version = base.clone();
        version["schema"] = json!(2);
        let mut latency = base;
        latency["latency_ms"]["gpu"] = json!(1.0);
        for value in [extra, time, version, latency] {
            assert!(!validator.is_valid(&value), "accepted {value}");
        }
    }

    #[test]
    fn a_stream_state_is_valid_and_its_status_is_checked() {
        let validator = validator(STATE);
        let value = serde_json::to_value(state()).unwrap();
        assert_eq!(errors(&validator, &value), Vec::<String>::new());
        let before_first =
            StreamState { label: None, score: None, since: None, seq: None, ..state() };
        assert!(validator.is_valid(&serde_json::to_value(before_first).unwrap()));
        let bad = StreamState { status: "sleeping".into(), ..state() };
        assert!(!validator.is_valid(&serde_json::to_value(bad).unwrap()));
        let mut missing = serde_json::to_value(state()).unwrap();
        missing.as_object_mut().unwrap().remove("updated_at");
        assert!(!validator.is_valid(&missing));
    }

    fn stats() -> Stats {
        let stream = StreamStats {
            status: "online".into(),
            fps_in: 2.0,
            fps_out: 1.9,
            decoded: 300,
            sampled: 20,
            classified: 19,
            dropped: 1,
            reconnects: 0,
            queued: 1,
            inference_ms: Percentiles { p50: Some(40.0), p90: Some(55.5), p99: Some(80.0) },
            capture_to_publish_ms: Percentiles::default(),
        };
        Stats {
            schema: SCHEMA_VERSION,
            device: "box-1".into(),
            run_id: "run".into(),
            at: rfc3339_ms(UNIX_EPOCH),
            interval_s: 10.0,
            uptime_s: 31.5,
            streams: [("door".to_string(), stream)].into(),
            engine: EngineStats {
                backend: Some("torch".into()),
                device: Some("cuda:0".into()),
                precision: Some("bf16".into()),
                queue_depth: 2,
                batches: 7,
                batched_frames: 19,
                batch_mean: Some(2.7),
            },
            publish: PublishStats {
                connected: true,
                spool_depth: 0,
                spool_bytes: 0,
                spool_overflow: 0,
                replayed: 0,
                failures: 0,
            },
        }
    }

    #[test]
    fn stats_are_valid_and_checked() {
        let validator = validator(STATS);
        let value = serde_json::to_value(stats()).unwrap();
        assert_eq!(errors(&validator, &value), Vec::<String>::new());
        let mut bad_rate = value.clone();
        bad_rate["streams"]["door"]["fps_in"] = json!(-1.0);
        let mut missing = value.clone();
        missing["engine"].as_object_mut().unwrap().remove("queue_depth");
        let mut extra = value;
        extra["publish"]["colour"] = json!(1);
        for value in [bad_rate, missing, extra] {
            assert!(!validator.is_valid(&value), "accepted {value}");
        }
    }

    #[test]
    fn every_source_status_is_valid_and_the_schema_is_strict() {
        use crate::source::SourceStatus;
        let validator = validator(STATUS);
        let all = [
            SourceStatus::Online,
            SourceStatus::Reconnecting { attempt: 2, next_delay_ms: 1000, reason: "gone".into() },
            SourceStatus::Failed { reason: "no such device".into() },
            SourceStatus::Ended,
        ];
        for status in &all {
            let value = serde_json::to_value(status.payload("door", "box-1", "run")).unwrap();
            assert_eq!(errors(&validator, &value), Vec::<String>::new(), "{status:?}");
        }
        let reconnecting = serde_json::to_value(all[1].payload("door", "box-1", "run")).unwrap();
        for field in ["attempt", "next_delay_ms", "reason", "updated_at"] {
            let mut value = reconnecting.clone();
            value.as_object_mut().unwrap().remove(field);
            assert!(!validator.is_valid(&value), "reconnecting without {field} was accepted");
        }
        let mut online = serde_json::to_value(all[0].payload("door", "box-1", "run")).unwrap();
        online["reason"] = json!("x");
        assert!(!validator.is_valid(&online), "online with a reason was accepted");
        let mut unknown = serde_json::to_value(all[3].payload("door", "box-1", "run")).unwrap();
        unknown["status"] = json!("running");
        assert!(!validator.is_valid(&unknown));
    }
}
