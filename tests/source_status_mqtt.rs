//! The status plumbing end to end: a real source's status events, turned into payloads the
//! way the engine does, published by the real publisher to a private Mosquitto on 127.0.0.1.
//! A subscriber sees the retained `<prefix>/<device>/<stream>/status` go `online` →
//! `reconnecting` (a stalled pipeline) → `online` → `ended`, each valid under
//! `schema/status.schema.json`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::Subscriber;
use common::mosquitto::{Mosquitto, free_port};
use edgesight::config::{Settings, SourcesSettings, StreamSettings};
use edgesight::metrics::Metrics;
use edgesight::publish::{Message, Publisher, Topics, schema};
use edgesight::source::{SourceEvent, spawn};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalling_source_shows_its_state_on_the_retained_status_topic() {
    let broker = Mosquitto::start();
    let mut settings = Settings { device_id: "box-9".into(), ..Settings::default() };
    settings.mqtt.port = broker.port;
    settings.mqtt.prefix = "edgesight-test".into();
    settings.mqtt.flush_timeout_s = 3;
    settings.mqtt.keep_alive_s = 5;
    let spool = tempfile::tempdir().expect("spool dir");
    settings.mqtt.spool_dir = Some(spool.path().to_path_buf());
    let topics = Topics::new("edgesight-test", "box-9");
    let topic = topics.stream_status("still");
    let mut watcher = Subscriber::connect(broker.port, "watcher", &topic).await;
    let publisher = Publisher::start(&settings, Metrics::new()).await.expect("publisher");

    // Five frames, then silence without end-of-stream: a stall after 1 s, then a rebuild.
    let launch = "videotestsrc is-live=true num-buffers=5 \
                  ! video/x-raw,format=RGB,width=64,height=48,framerate=30/1 ! f. \
                  udpsrc address=127.0.0.1 port=0 \
                  caps=\"video/x-raw,format=RGB,width=64,height=48,framerate=30/1\" ! f. \
                  funnel name=f ! videoconvert ! appsink name=sink";
    let stream = StreamSettings {
        name: "still".into(),
        kind: "pipeline".into(),
        pipeline: Some(launch.into()),
        stall_timeout_s: Some(1.0),
        ..StreamSettings::default()
    };
    let policy = SourcesSettings { backoff_initial_ms: 100, ..SourcesSettings::default() };
    let (sender, events) = crossbeam_channel::bounded(8);
    let handle = spawn(&stream, &policy, Metrics::new(), sender).expect("spawn");
    let handle = Arc::new(handle);

    // What the engine's match arm does with status events; frames are just taken.
    let out = publisher.sender();
    let forward = std::thread::spawn(move || {
        for event in events {
            if let SourceEvent::Status { stream, status } = event {
                let message = Message::StreamStatus(status.payload(&stream, "box-9", "run-1"));
                if out.blocking_send(message).is_err() {
                    break;
                }
            }
        }
    });

    let validator = {
        let schema: Value = serde_json::from_str(schema::STATUS).unwrap();
        jsonschema::options().should_validate_formats(true).build(&schema).unwrap()
    };
    let mut seen = Vec::new();
    for expected in ["online", "reconnecting", "online"] {
        let publish = watcher.expect(&topic, WAIT).await;
        let value: Value = serde_json::from_slice(&publish.payload).expect("JSON status");
        let errors: Vec<String> = validator.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{value}: {errors:?}");
        assert_eq!(value["status"], expected, "{value}");
        assert_eq!(publish.qos, rumqttc::QoS::AtLeastOnce);
        seen.push(value);
    }
    assert_eq!(seen[1]["attempt"], 1);
    assert!(seen[1]["reason"].as_str().unwrap().contains("stalled"));

    handle.stop();
    let ended = watcher.expect(&topic, WAIT).await;
    let value: Value = serde_json::from_slice(&ended.payload).unwrap();
    assert_eq!(value["status"], "ended");
    forward.join().unwrap();
    if let Ok(handle) = Arc::try_unwrap(handle) {
        handle.join();
    }

    // A late subscriber gets the last status, retained.
    let mut late = Subscriber::connect(broker.port, &format!("late-{}", free_port()), &topic).await;
    let retained = late.expect(&topic, WAIT).await;
    assert!(retained.retain);
    let value: Value = serde_json::from_slice(&retained.payload).unwrap();
    assert_eq!(value["status"], "ended");
    late.close().await;
    watcher.close().await;
    drop(publisher.sender());
    publisher.finish().await.expect("finish");
}
