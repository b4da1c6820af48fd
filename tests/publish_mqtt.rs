//! The publisher against real brokers: a private Mosquitto per test, and the embedded rumqttd.
//! Each test checks what a downstream subscriber sees — topics, payloads valid under the
//! shipped JSON Schemas, the retained status — and how the publisher survives a broker that
//! dies, refuses the login, or is embedded. Everything stays on 127.0.0.1 on ports the tests
//! pick and brokers the tests start.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::Subscriber;
use common::mosquitto::{Mosquitto, free_port};
use common::publish::{classification, publisher_settings};
use edgesight::metrics::Metrics;
use edgesight::publish::payload::{SCHEMA_VERSION, StreamState, rfc3339_ms};
use edgesight::publish::{Message, PublishError, Publisher, Topics, schema, start_embedded};
use rumqttc::QoS;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(5);

fn state(device: &str, stream: &str) -> StreamState {
    StreamState {
        schema: SCHEMA_VERSION,
        device: device.into(),
        stream: stream.into(),
        run_id: "run-1".into(),
        status: "running".into(),
        label: Some("person".into()),
        score: Some(0.75),
        since: Some(rfc3339_ms(SystemTime::now())),
        seq: Some(49),
        raw_label: None,
        raw_score: None,
        error: None,
        updated_at: rfc3339_ms(SystemTime::now()),
        replayed: false,
    }
}

fn validator(schema: &str) -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(schema).expect("schema is JSON");
    jsonschema::options().should_validate_formats(true).build(&schema).expect("schema compiles")
}

/// A subscriber that connects after the fact sees the retained value of `topic`, if any.
async fn retained(port: u16, topic: &str) -> Option<(String, bool)> {
    let mut fresh = Subscriber::connect(port, &format!("probe-{}", free_port()), topic).await;
    let found = fresh
        .next(Duration::from_secs(2))
        .await
        .map(|publish| (String::from_utf8_lossy(&publish.payload).into_owned(), publish.retain));
    fresh.close().await;
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_status_classifications_and_state_then_offline() {
    let spool = tempfile::tempdir().expect("spool dir");
    let broker = Mosquitto::start();
    let topics = Topics::new("edgesight-test", "box-1");
    let mut watcher = Subscriber::connect(broker.port, "watcher", &topics.all()).await;

    let publisher =
        Publisher::start(&publisher_settings(broker.port, "box-1", spool.path()), Metrics::new())
            .await
            .expect("start");
    let online = watcher.expect(&topics.status(), WAIT).await;
    assert_eq!(&online.payload[..], b"online");
    assert_eq!(retained(broker.port, &topics.status()).await, Some(("online".into(), true)));

    let sender = publisher.sender();
    let started = Instant::now();
    for seq in 0..50 {
        let message = Message::Classification(classification("box-1", "door", seq));
        sender.send(message).await.expect("queue classification");
    }
    sender.send(Message::State(state("box-1", "door"))).await.expect("queue state");

    let classifications = validator(schema::CLASSIFICATION);
    for seq in 0..50 {
        let publish = watcher.expect(&topics.classification("door"), WAIT).await;
        assert_eq!(publish.qos, QoS::AtLeastOnce);
        let value: Value = serde_json::from_slice(&publish.payload).expect("JSON payload");
        let errors: Vec<String> =
            classifications.iter_errors(&value).map(|error| error.to_string()).collect();
        assert!(errors.is_empty(), "seq {seq}: {errors:?}");
        assert_eq!(value["seq"], seq, "out of order");
    }
    let fifty_ms = started.elapsed().as_millis();
    let publish = watcher.expect(&topics.state("door"), WAIT).await;
    let value: Value = serde_json::from_slice(&publish.payload).expect("JSON state");
    assert!(validator(schema::STATE).is_valid(&value), "{value}");
    let (payload, was_retained) =
        retained(broker.port, &topics.state("door")).await.expect("retained state");
    assert!(was_retained && payload.contains("\"status\":\"running\""), "{payload}");

    drop(sender);
    let report = publisher.finish().await.expect("finish");
    eprintln!("50 classifications end to end in {fifty_ms} ms; finish: {report:?}");
    assert!(report.is_complete(), "{report:?}");
    assert!(report.offline_sent && report.disconnected, "{report:?}");
    // online + 50 classifications + state + offline, all QoS 1.
    assert_eq!((report.published, report.acknowledged), (53, 53), "{report:?}");
    let offline = watcher.expect(&topics.status(), WAIT).await;
    assert_eq!(&offline.payload[..], b"offline");
    assert_eq!(retained(broker.port, &topics.status()).await, Some(("offline".into(), true)));
    watcher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_a_broker_restart_and_republishes_online() {
    let spool = tempfile::tempdir().expect("spool dir");
    let mut broker = Mosquitto::start();
    let topics = Topics::new("edgesight-test", "box-2");
    let publisher =
        Publisher::start(&publisher_settings(broker.port, "box-2", spool.path()), Metrics::new())
            .await
            .expect("start");
    let sender = publisher.sender();
    sender.send(Message::Classification(classification("box-2", "yard", 0))).await.expect("send");
    let mut watcher = Subscriber::connect(broker.port, "watcher", &topics.all()).await;
    assert!(watcher.next(WAIT).await.is_some(), "retained online before the restart");
    drop(watcher);

    broker.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = Instant::now();
    broker.restart();
    // The restarted broker has no retained messages; `online` there proves the publisher
    // reconnected and announced itself again.
    let mut watcher = Subscriber::connect(broker.port, "watcher-2", &topics.status()).await;
    let mut online = None;
    while restarted.elapsed() < Duration::from_secs(15) {
        if let Some(publish) = watcher.next(Duration::from_secs(1)).await {
            online = Some(String::from_utf8_lossy(&publish.payload).into_owned());
            break;
        }
    }
    assert_eq!(online.as_deref(), Some("online"), "no online after the broker came back");
    eprintln!("online again {} ms after the broker restarted", restarted.elapsed().as_millis());

    let mut classifications = Subscriber::connect(broker.port, "watcher-3", &topics.all()).await;
    sender.send(Message::Classification(classification("box-2", "yard", 1))).await.expect("send");
    let publish = classifications.expect(&topics.classification("yard"), WAIT).await;
    let value: Value = serde_json::from_slice(&publish.payload).expect("JSON");
    assert_eq!(value["seq"], 1);
    drop(sender);
    let report = publisher.finish().await.expect("finish");
    assert!(report.disconnected, "{report:?}");
    watcher.close().await;
    classifications.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_broker_at_shutdown_leaves_the_messages_spooled_for_the_next_run() {
    let spool = tempfile::tempdir().expect("spool dir");
    let mut broker = Mosquitto::start();
    let mut settings = publisher_settings(broker.port, "box-3", spool.path());
    settings.mqtt.flush_timeout_s = 2;
    let metrics = Metrics::new();
    let publisher = Publisher::start(&settings, metrics.clone()).await.expect("start");
    broker.kill();
    let sender = publisher.sender();
    for seq in 0..5 {
        sender
            .send(Message::Classification(classification("box-3", "gate", seq)))
            .await
            .expect("send");
    }
    drop(sender);
    let started = Instant::now();
    let report = publisher.finish().await.expect("finish");
    let elapsed = started.elapsed();
    eprintln!("finish with the broker gone: {report:?} in {} ms", elapsed.as_millis());
    assert!(elapsed < Duration::from_secs(6), "finish took {elapsed:?}");
    assert!(report.is_complete(), "spooled is not lost: {report:?}");
    assert_eq!(report.spooled, 5, "{report:?}");
    assert_eq!(metrics.publish.spool_depth.load(std::sync::atomic::Ordering::Relaxed), 5);

    // The next run, with the broker back, publishes them first, flagged and in order.
    broker.restart();
    let topics = Topics::new("edgesight-test", "box-3");
    let mut watcher = Subscriber::connect(broker.port, "watcher", &topics.all()).await;
    let metrics = Metrics::new();
    let publisher = Publisher::start(&settings, metrics.clone()).await.expect("restart");
    let sender = publisher.sender();
    sender.send(Message::Classification(classification("box-3", "gate", 5))).await.expect("send");
    let validator = validator(schema::CLASSIFICATION);
    for seq in 0..6 {
        let publish = watcher.expect(&topics.classification("gate"), WAIT).await;
        let value: Value = serde_json::from_slice(&publish.payload).expect("JSON");
        assert_eq!(value["seq"], seq, "{value}");
        assert_eq!(value.get("replayed").and_then(Value::as_bool), (seq < 5).then_some(true));
        assert!(validator.is_valid(&value), "{value}");
    }
    drop(sender);
    let report = publisher.finish().await.expect("finish");
    assert_eq!((report.spooled, report.offline_sent), (0, true), "{report:?}");
    assert_eq!(metrics.publish.replayed.load(std::sync::atomic::Ordering::Relaxed), 5);
    watcher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_start_with_a_clear_error() {
    let spool = tempfile::tempdir().expect("spool dir");
    let broker = Mosquitto::start_with_password("edge", "right-password");
    let mut settings = publisher_settings(broker.port, "box-4", spool.path());
    settings.mqtt.username = Some("edge".into());
    settings.mqtt.password = Some("wrong-password".into());
    let started = Instant::now();
    let result = Publisher::start(&settings, Metrics::new()).await;
    let elapsed = started.elapsed();
    let error = match result {
        Ok(_) => panic!("start succeeded with a wrong password"),
        Err(error) => error,
    };
    assert!(matches!(error, PublishError::Refused { .. }), "{error:?}");
    let text = error.to_string();
    eprintln!("wrong password: {text:?} after {} ms", elapsed.as_millis());
    assert!(text.contains(&format!("127.0.0.1:{}", broker.port)), "{text}");
    assert!(text.contains("mqtt.password") && !text.contains("wrong-password"), "{text}");
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");

    settings.mqtt.password = Some("right-password".into());
    let publisher =
        Publisher::start(&settings, Metrics::new()).await.expect("start with the right password");
    assert!(publisher.finish().await.expect("finish").is_complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_carries_publisher_and_subscriber() {
    let spool = tempfile::tempdir().expect("spool dir");
    let port = free_port();
    let broker = tokio::task::spawn_blocking(move || start_embedded(port))
        .await
        .expect("join")
        .expect("embedded broker");
    assert!(broker.is_running());
    let topics = Topics::new("edgesight-test", "box-5");
    let mut watcher = Subscriber::connect(port, "watcher", &topics.all()).await;
    let publisher =
        Publisher::start(&publisher_settings(port, "box-5", spool.path()), Metrics::new())
            .await
            .expect("start");
    let online = watcher.expect(&topics.status(), WAIT).await;
    assert_eq!(&online.payload[..], b"online");

    let sender = publisher.sender();
    for seq in 0..10 {
        sender
            .send(Message::Classification(classification("box-5", "lab", seq)))
            .await
            .expect("send");
    }
    for seq in 0..10 {
        let publish = watcher.expect(&topics.classification("lab"), WAIT).await;
        let value: Value = serde_json::from_slice(&publish.payload).expect("JSON");
        assert_eq!(value["seq"], seq);
    }
    drop(sender);
    let report = publisher.finish().await.expect("finish");
    assert!(report.is_complete(), "{report:?}");
    let offline = watcher.expect(&topics.status(), WAIT).await;
    assert_eq!(&offline.payload[..], b"offline");
    watcher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_names_a_port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").port();
    let error = start_embedded(port).err().map(|error| error.to_string());
    let error = error.expect("start_embedded on a taken port must fail");
    assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
}
