//! The publisher's TLS and its spool across a broker outage, against a private Mosquitto on
//! 127.0.0.1: certificates the test makes with openssl (a CA, a server and a client
//! certificate), an untrusted or misnamed server certificate failing the start with a clear
//! error, and an outage after which `online` comes first and every message follows in order.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Subscriber;
use common::mosquitto::{Mosquitto, TestPki};
use common::publish::{classification, publisher_settings};
use edgesight::config::{Settings, TlsSettings};
use edgesight::metrics::Metrics;
use edgesight::publish::{Message, PublishError, Publisher, Topics};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(5);

fn tls(pki: &TestPki, client_cert: bool, server_name: Option<&str>) -> TlsSettings {
    TlsSettings {
        ca_file: Some(pki.ca.clone()),
        cert_file: client_cert.then(|| pki.client_cert.clone()),
        key_file: client_cert.then(|| pki.client_key.clone()),
        server_name: server_name.map(str::to_string),
    }
}

async fn start_error(settings: &Settings) -> PublishError {
    match Publisher::start(settings, Metrics::new()).await {
        Ok(_) => panic!("start succeeded"),
        Err(error) => error,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_and_a_server_name_carries_messages() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    // The certificate names broker.test only; the publisher reaches it as 127.0.0.1.
    let pki = TestPki::new("DNS:broker.test");
    let broker = Mosquitto::start_tls(&pki, true);
    let spool = tempfile::tempdir().expect("spool dir");
    let mut settings =
        publisher_settings(broker.tls_port.expect("TLS port"), "tls-1", spool.path());
    settings.mqtt.tls = Some(tls(&pki, true, Some("broker.test")));
    let topics = Topics::new("edgesight-test", "tls-1");
    let mut watcher = Subscriber::connect(broker.port, "watcher", &topics.all()).await;
    let publisher = Publisher::start(&settings, Metrics::new()).await.expect("TLS start");
    let online = watcher.expect(&topics.status(), WAIT).await;
    assert_eq!(&online.payload[..], b"online");
    let sender = publisher.sender();
    for seq in 0..3 {
        sender
            .send(Message::Classification(classification("tls-1", "door", seq)))
            .await
            .expect("send");
    }
    for seq in 0..3 {
        let publish = watcher.expect(&topics.classification("door"), WAIT).await;
        let value: Value = serde_json::from_slice(&publish.payload).expect("JSON");
        assert_eq!(value["seq"], seq);
    }
    drop(sender);
    let report = publisher.finish().await.expect("finish");
    assert!(report.is_complete() && report.offline_sent && report.disconnected, "{report:?}");
    watcher.close().await;

    // The same broker without a client certificate: the broker ends the handshake.
    settings.mqtt.tls = Some(tls(&pki, false, Some("broker.test")));
    let error = start_error(&settings).await;
    eprintln!("no client certificate: {error}");
    assert!(matches!(error, PublishError::TlsRefused { .. }), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_or_misnamed_server_certificate_fails_the_start_clearly() {
    let pki = TestPki::new("DNS:broker.test");
    let stranger = TestPki::new("DNS:broker.test");
    let broker = Mosquitto::start_tls(&pki, false);
    let spool = tempfile::tempdir().expect("spool dir");
    let port = broker.tls_port.expect("TLS port");
    let mut settings = publisher_settings(port, "tls-2", spool.path());

    // Signed by a CA we do not trust.
    settings.mqtt.tls = Some(tls(&stranger, false, Some("broker.test")));
    let started = Instant::now();
    let error = start_error(&settings).await;
    let text = error.to_string();
    eprintln!("untrusted: {text} after {} ms", started.elapsed().as_millis());
    assert!(matches!(error, PublishError::TlsRefused { .. }), "{error:?}");
    assert!(text.contains(&format!("127.0.0.1:{port}")) && text.contains("mqtt.tls"), "{text}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Trusted, but the certificate does not name 127.0.0.1.
    settings.mqtt.tls = Some(tls(&pki, false, None));
    let error = start_error(&settings).await;
    eprintln!("misnamed: {error}");
    assert!(matches!(error, PublishError::TlsRefused { .. }), "{error:?}");

    // Right CA and name: it connects (and the default client needs no certificate here).
    settings.mqtt.tls = Some(tls(&pki, false, Some("broker.test")));
    let publisher = Publisher::start(&settings, Metrics::new()).await.expect("start");
    assert!(publisher.finish().await.expect("finish").offline_sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tls_file_is_named_before_any_connection() {
    let spool = tempfile::tempdir().expect("spool dir");
    let mut settings = publisher_settings(1, "tls-3", spool.path());
    let pki = TestPki::new("IP:127.0.0.1");
    let missing = spool.path().join("no-such-key.pem");
    settings.mqtt.tls = Some(TlsSettings {
        ca_file: Some(pki.ca.clone()),
        cert_file: Some(pki.client_cert.clone()),
        key_file: Some(missing.clone()),
        server_name: None,
    });
    let error = start_error(&settings).await;
    let text = error.to_string();
    assert!(text.contains("mqtt.tls.key_file") && text.contains("no-such-key.pem"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_online_comes_first_then_every_message_in_order() {
    let mut broker = Mosquitto::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let settings = publisher_settings(broker.port, "out-1", spool.path());
    let topics = Topics::new("edgesight-test", "out-1");
    let metrics = Metrics::new();
    let publisher = Publisher::start(&settings, metrics.clone()).await.expect("start");
    let sender = publisher.sender();
    let mut watcher = Subscriber::connect(broker.port, "watcher", &topics.all()).await;
    for seq in 0..10 {
        sender
            .send(Message::Classification(classification("out-1", "yard", seq)))
            .await
            .expect("send");
    }
    for seq in 0..10 {
        let publish = watcher.expect(&topics.classification("yard"), WAIT).await;
        let value: Value = serde_json::from_slice(&publish.payload).expect("JSON");
        assert_eq!(value["seq"], seq);
    }
    drop(watcher);
    // Let the last acknowledgements arrive, so that nothing is legitimately sent twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.kill();
    // Messages produced during the outage, at a camera's pace.
    for seq in 10..40 {
        sender
            .send(Message::Classification(classification("out-1", "yard", seq)))
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The publisher retries 0.5, 1.5, 3.5 and 7.5 s after the loss: restart in between, and
    // subscribe before it comes back, to see what it sends first.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    broker.restart();
    let mut watcher = Subscriber::connect(broker.port, "watcher-2", &topics.all()).await;
    let first = watcher.next(Duration::from_secs(15)).await.expect("something after restart");
    assert_eq!(
        (first.topic.as_str(), &first.payload[..], first.retain),
        (topics.status().as_str(), &b"online"[..], false),
        "online must come before any replayed message"
    );
    for seq in 40..45 {
        sender
            .send(Message::Classification(classification("out-1", "yard", seq)))
            .await
            .expect("send");
    }
    let mut seen = Vec::new();
    while seen.last() != Some(&44) {
        let publish = watcher.expect(&topics.classification("yard"), WAIT).await;
        let value: Value = serde_json::from_slice(&publish.payload).expect("JSON");
        let seq = value["seq"].as_u64().expect("seq");
        let replayed = value.get("replayed").and_then(Value::as_bool) == Some(true);
        assert_eq!(replayed, seq < 40, "seq {seq}: {value}");
        seen.push(seq);
    }
    assert_eq!(seen, (10..45).collect::<Vec<_>>(), "every message once, in order");
    drop(sender);
    let report = publisher.finish().await.expect("finish");
    assert!(report.is_complete() && report.spooled == 0, "{report:?}");
    let replayed = metrics.publish.replayed.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(replayed, 30);
    assert_eq!(metrics.publish.connections.load(std::sync::atomic::Ordering::Relaxed), 2);
    watcher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_refused_on_reconnect_is_retried_slowly_while_messages_are_spooled() {
    let mut broker = Mosquitto::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let settings = publisher_settings(broker.port, "auth-1", spool.path());
    let metrics = Metrics::new();
    let publisher = Publisher::start(&settings, metrics.clone()).await.expect("start");
    // The broker comes back wanting a password the publisher does not have.
    broker.restart_with_password("edge", "only-for-others");
    let sender = publisher.sender();
    for seq in 0..5 {
        sender
            .send(Message::Classification(classification("auth-1", "door", seq)))
            .await
            .expect("send");
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let attempts = broker.log().matches("New connection from 127.0.0.1").count();
    eprintln!("connection attempts in 5 s after the refusal: {attempts}");
    assert!((1..=2).contains(&attempts), "a retry storm: {attempts} attempts\n{}", broker.log());
    let connected = metrics.publish.connected.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(connected, 0);
    drop(sender);
    let report = publisher.finish().await.expect("finish");
    assert!(report.is_complete() && report.spooled == 5, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_publisher_on_the_same_spool_fails_the_start_until_the_first_finished() {
    let broker = Mosquitto::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let first =
        Publisher::start(&publisher_settings(broker.port, "lock-1", spool.path()), Metrics::new())
            .await
            .expect("first start");
    let error = start_error(&publisher_settings(broker.port, "lock-2", spool.path())).await;
    let text = error.to_string();
    assert!(text.contains("mqtt.spool_dir"), "{text}");
    assert!(text.contains(&spool.path().display().to_string()), "{text}");
    assert!(text.contains("another edgesight process"), "{text}");
    first.finish().await.expect("finish");
    let again =
        Publisher::start(&publisher_settings(broker.port, "lock-2", spool.path()), Metrics::new())
            .await
            .expect("start once the first is gone");
    again.finish().await.expect("finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_spool_directory_fails_the_start() {
    // Not a mode 0555 directory: tests may run as root, who can write there. Nobody can
    // create files in procfs, and nobody can make a directory below a regular file.
    let holder = tempfile::tempdir().expect("temp dir");
    let file = holder.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    for dir in [Path::new("/proc/self").to_path_buf(), file.join("spool")] {
        let text = start_error(&publisher_settings(1, "ro-1", &dir)).await.to_string();
        assert!(text.starts_with(&format!("mqtt.spool_dir {}: ", dir.display())), "{text}");
        assert_eq!(text.matches("os error").count(), 1, "{text}");
    }
}
