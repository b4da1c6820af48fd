//! The MQTT publisher: one connection to the broker, shared by every stream.
//!
//! Three pieces run concurrently. The rumqttc event loop runs in its own task (the *driver*):
//! it reconnects with [`Backoff`] after a failure, feeds packet ids and acknowledgements to the
//! [`AckTracker`], and announces every accepted connection. The *outbox* task is the only
//! writer of publishes: it turns [`Message`]s from a bounded channel into publishes and, after
//! each announced connection, publishes the retained `online` status first. Having one writer
//! keeps `online` from ever overtaking `offline`, and keeps each stream's messages in order.
//! [`Publisher::finish`] drains the outbox, publishes `offline`, waits for the acknowledgements
//! and disconnects cleanly (so the broker does not send the last will, which says the same).
//!
//! Back-pressure: while the broker is unreachable the client stops taking requests, the outbox
//! waits, and the engine's sends wait once the channel is full. Messages are not dropped here,
//! but a broker that comes back with a fresh session (it restarted without persistence) makes
//! rumqttc discard what was in flight; those are counted as unacknowledged at shutdown.
//!
//! SPOOL: the bounded on-disk spool (DESIGN.md "Topics and payloads") goes between the outbox
//! and the client: while the driver reports no connection, the outbox appends QoS ≥ 1 messages
//! to the spool instead of waiting, and after each connection it replays the spool in order
//! before taking new messages, counting what overflowed the bound in the `stats` topic. The
//! tracker's `lost_with_session` count is what the spool retires. Not built yet.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
    Outgoing, Packet, QoS,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::acks::AckTracker;
use super::backoff::Backoff;
use super::topics::Topics;
use super::{Message, PublishError};
use crate::config::Settings;

/// Messages the engine may queue ahead of the publisher before its sends wait.
pub const MESSAGE_QUEUE: usize = 256;

/// Requests rumqttc buffers between the outbox and the network. Small, because what sits here
/// when the connection drops is discarded if the broker comes back with a fresh session.
const CLIENT_QUEUE: usize = 16;

/// Largest packet sent or accepted; a classification with a 200-float embedding is ~3 KiB.
const MAX_PACKET: usize = 256 * 1024;

/// How long `finish` waits for the DISCONNECT to be written after the flush.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What [`Publisher::finish`] achieved. `unacknowledged` and `dropped` are messages lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushReport {
    /// Publishes handed to the MQTT client over the publisher's life, any QoS, status included.
    pub published: u64,
    /// QoS ≥ 1 publishes the broker acknowledged.
    pub acknowledged: u64,
    /// QoS ≥ 1 publishes the broker never acknowledged: still in flight at the deadline, or
    /// discarded when the broker came back with a fresh session.
    pub unacknowledged: u64,
    /// Messages still queued for the publisher when the deadline passed; never sent.
    pub dropped: u64,
    /// Whether the retained `offline` status was handed to the client.
    pub offline_sent: bool,
    /// Whether a clean DISCONNECT reached the network.
    pub disconnected: bool,
    /// Time `finish` took.
    pub elapsed: Duration,
}

impl FlushReport {
    /// True when nothing was lost: everything sent was acknowledged and nothing was dropped.
    pub fn is_complete(&self) -> bool {
        self.unacknowledged == 0 && self.dropped == 0
    }
}

/// A connected (or reconnecting) MQTT publisher. Create with [`Publisher::start`], hand
/// [`Publisher::sender`] to the engine, and call [`Publisher::finish`] at shutdown. Dropping a
/// publisher without `finish` closes the connection abruptly, and the broker then publishes the
/// last will (`offline`).
pub struct Publisher {
    sender: mpsc::Sender<Message>,
    client: AsyncClient,
    topics: Topics,
    endpoint: Endpoint,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    outbox: JoinHandle<OutboxEnd>,
    driver: AbortOnDrop,
    flush_timeout: Duration,
}

/// Host and port, for log fields and errors.
#[derive(Debug, Clone)]
struct Endpoint {
    host: String,
    port: u16,
}

/// State the driver, the outbox and `finish` share.
struct Shared {
    acks: Mutex<AckTracker>,
    /// Woken on every acknowledgement; `finish` is the only waiter.
    acked: Notify,
    /// True between an accepted connection and the next connection error.
    connected: AtomicBool,
    echo: bool,
}

impl Shared {
    fn acks(&self) -> MutexGuard<'_, AckTracker> {
        // The tracker holds plain counters that stay consistent even if a holder panicked.
        self.acks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The driver task, aborted when the publisher is dropped so the connection closes.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How the outbox task ended: normally when every sender is gone, or stopped at the deadline.
#[derive(Debug, Default)]
struct OutboxEnd {
    dropped: u64,
}

impl Publisher {
    /// Connects to `settings.mqtt.host:port` and starts publishing.
    ///
    /// The first connection attempt is made here (bounded by rumqttc's 5 s connect timeout).
    /// A broker that refuses the login is an error, since retrying cannot help. A broker that
    /// cannot be reached is not: the publisher starts, logs a warning, and keeps retrying in
    /// the background with backoff, while messages wait in the bounded queue.
    pub async fn start(settings: &Settings) -> Result<Publisher, PublishError> {
        let mqtt = &settings.mqtt;
        let qos = qos_from(mqtt.qos)?;
        let topics = Topics::new(&mqtt.prefix, &settings.device_id);
        let endpoint = Endpoint { host: mqtt.host.clone(), port: mqtt.port };
        let (client, mut eventloop) =
            AsyncClient::new(mqtt_options(settings, &topics), CLIENT_QUEUE);
        let shared = Arc::new(Shared {
            acks: Mutex::new(AckTracker::new()),
            acked: Notify::new(),
            connected: AtomicBool::new(false),
            echo: mqtt.echo,
        });
        let (connected_tx, connected_rx) = watch::channel(0u64);
        let mut backoff = Backoff::mqtt();
        let mut first_delay = Duration::ZERO;

        // One attempt here so that a refused login fails the start instead of being retried.
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                info!(host = %endpoint.host, port = endpoint.port, "connected to the MQTT broker");
                shared.acks().connected(ack.session_present);
                shared.connected.store(true, Ordering::SeqCst);
                connected_tx.send_modify(|count| *count += 1);
            }
            Err(ConnectionError::ConnectionRefused(code)) => {
                return Err(PublishError::Refused {
                    host: endpoint.host,
                    port: endpoint.port,
                    reason: refusal_reason(code).into(),
                });
            }
            Err(error) => {
                let delay = backoff.failed();
                warn!(
                    host = %endpoint.host,
                    port = endpoint.port,
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "MQTT broker unreachable at start; publishing will wait for it"
                );
                first_delay = delay;
            }
            Ok(other) => {
                debug!(event = ?other, "unexpected first MQTT event");
            }
        }

        let driver = tokio::spawn(drive(
            eventloop,
            first_delay,
            backoff,
            Arc::clone(&shared),
            connected_tx,
            endpoint.clone(),
        ));
        let (sender, messages) = mpsc::channel(MESSAGE_QUEUE);
        let (stop, stop_rx) = watch::channel(false);
        let outlet = Outlet {
            client: client.clone(),
            shared: Arc::clone(&shared),
            endpoint: endpoint.clone(),
        };
        let outbox =
            tokio::spawn(run_outbox(outlet, topics.clone(), qos, messages, connected_rx, stop_rx));
        Ok(Publisher {
            sender,
            client,
            topics,
            endpoint,
            shared,
            stop,
            outbox,
            driver: AbortOnDrop(driver),
            flush_timeout: Duration::from_secs(mqtt.flush_timeout_s),
        })
    }

    /// A handle for queueing messages (bounded: sends wait when [`MESSAGE_QUEUE`] are queued).
    /// [`Publisher::finish`] waits until every clone of it has been dropped.
    pub fn sender(&self) -> mpsc::Sender<Message> {
        self.sender.clone()
    }

    /// The topics this publisher uses.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Shuts down within `mqtt.flush_timeout_s`: publishes what is queued once every sender is
    /// dropped, publishes the retained `offline` status, waits until the broker acknowledged
    /// every QoS ≥ 1 publish, and disconnects cleanly. What could not be delivered by the
    /// deadline is counted in the report and logged at ERROR; that is not an `Err`.
    pub async fn finish(self) -> Result<FlushReport, PublishError> {
        let Publisher {
            sender,
            client,
            topics,
            endpoint,
            shared,
            stop,
            mut outbox,
            driver,
            flush_timeout,
        } = self;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + flush_timeout;
        drop(sender);

        // Drain the queue; at the deadline, stop the outbox and count what it still held.
        let drained = match tokio::time::timeout_at(deadline, &mut outbox).await {
            Ok(end) => end,
            Err(_) => {
                let _ = stop.send(true);
                outbox.await
            }
        };
        let dropped =
            drained.map_err(|source| PublishError::Task { task: "outbox", source })?.dropped;

        // `offline` goes last, after everything the outbox published.
        let outlet = Outlet { client: client.clone(), shared: Arc::clone(&shared), endpoint };
        let status = topics.status();
        let offline = outlet.publish(&status, QoS::AtLeastOnce, true, b"offline".to_vec(), None);
        let offline_sent = matches!(tokio::time::timeout_at(deadline, offline).await, Ok(Ok(())));

        // Wait for the acknowledgements. `notify_one` keeps a permit, so none is missed.
        loop {
            if shared.acks().settled() {
                break;
            }
            if tokio::time::timeout_at(deadline, shared.acked.notified()).await.is_err() {
                break;
            }
        }

        // A clean DISCONNECT: the driver ends once it has written it. Without a connection there
        // is nobody to say goodbye to; the broker sends the will when it notices.
        let mut driver = driver;
        let disconnected =
            shared.connected.load(Ordering::SeqCst) && disconnect(&client, &mut driver.0).await;

        let acks = shared.acks().clone();
        let report = FlushReport {
            published: acks.published(),
            acknowledged: acks.acknowledged_count(),
            unacknowledged: acks.unacknowledged(),
            dropped,
            offline_sent,
            disconnected,
            elapsed: started.elapsed(),
        };
        let host = &outlet.endpoint.host;
        let port = outlet.endpoint.port;
        if report.is_complete() {
            info!(
                host = %host,
                port,
                published = report.published,
                elapsed_ms = report.elapsed.as_millis() as u64,
                "MQTT publisher flushed and disconnected"
            );
        } else {
            error!(
                host = %host,
                port,
                unacknowledged = report.unacknowledged,
                dropped = report.dropped,
                lost_with_session = acks.lost_with_session(),
                flush_timeout_s = flush_timeout.as_secs(),
                "MQTT messages were not delivered before shutdown"
            );
        }
        Ok(report)
    }
}

/// Sends DISCONNECT and waits until the driver wrote it; false when either step timed out.
async fn disconnect(client: &AsyncClient, driver: &mut JoinHandle<()>) -> bool {
    let queued = tokio::time::timeout(DISCONNECT_TIMEOUT, client.disconnect()).await;
    matches!(queued, Ok(Ok(())))
        && matches!(tokio::time::timeout(DISCONNECT_TIMEOUT, driver).await, Ok(Ok(())))
}

/// Builds the client options; the only place they are built.
fn mqtt_options(settings: &Settings, topics: &Topics) -> MqttOptions {
    let mqtt = &settings.mqtt;
    let mut options = MqttOptions::new(settings.client_id(), mqtt.host.clone(), mqtt.port);
    options.set_keep_alive(Duration::from_secs(mqtt.keep_alive_s));
    // A persistent session lets rumqttc retransmit unacknowledged publishes after a dropped
    // connection to a broker that kept the session; we subscribe to nothing, so the broker
    // keeps no queue for us.
    options.set_clean_session(false);
    options.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    options.set_last_will(LastWill::new(topics.status(), "offline", QoS::AtLeastOnce, true));
    if let (Some(username), Some(password)) = (&mqtt.username, &mqtt.password) {
        options.set_credentials(username.clone(), password.clone());
    }
    options
}

fn qos_from(qos: u8) -> Result<QoS, PublishError> {
    match qos {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        other => Err(PublishError::Setting {
            key: "mqtt.qos",
            message: format!("{other} is not 0, 1 or 2"),
        }),
    }
}

/// What an operator should check for each CONNACK refusal.
fn refusal_reason(code: ConnectReturnCode) -> &'static str {
    match code {
        ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
            "not authorised; check mqtt.username and mqtt.password"
        }
        ConnectReturnCode::BadClientId => "client id rejected; check mqtt.client_id",
        ConnectReturnCode::RefusedProtocolVersion => "the broker does not accept MQTT 3.1.1",
        ConnectReturnCode::ServiceUnavailable => "the broker is unavailable",
        ConnectReturnCode::Success => "refused with a success code",
    }
}

/// Polls the rumqttc event loop until the publisher disconnects or is dropped.
async fn drive(
    mut eventloop: EventLoop,
    first_delay: Duration,
    mut backoff: Backoff,
    shared: Arc<Shared>,
    connected: watch::Sender<u64>,
    endpoint: Endpoint,
) {
    let Endpoint { host, port } = endpoint;
    tokio::time::sleep(first_delay).await;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if backoff.failures() > 0 {
                    let failures = backoff.failures();
                    info!(host = %host, port, failures, "reconnected to the MQTT broker");
                }
                backoff.reset();
                let lost = shared.acks().connected(ack.session_present);
                if lost > 0 {
                    error!(
                        host = %host,
                        port,
                        lost,
                        "broker started a fresh session; in-flight messages were lost"
                    );
                }
                shared.connected.store(true, Ordering::SeqCst);
                connected.send_modify(|count| *count += 1);
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => shared.acks().sent(pkid),
            Ok(Event::Incoming(Packet::PubAck(ack))) => acknowledge(&shared, ack.pkid),
            Ok(Event::Incoming(Packet::PubComp(comp))) => acknowledge(&shared, comp.pkid),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                debug!(host = %host, port, "DISCONNECT sent");
                return;
            }
            Ok(_) => {}
            Err(ConnectionError::RequestsDone) => return,
            Err(ConnectionError::ConnectionRefused(code)) => {
                shared.connected.store(false, Ordering::SeqCst);
                let delay = backoff.max();
                error!(
                    host = %host,
                    port,
                    reason = refusal_reason(code),
                    retry_in_ms = delay.as_millis() as u64,
                    "MQTT broker refused the connection"
                );
                tokio::time::sleep(delay).await;
            }
            Err(error) => {
                shared.connected.store(false, Ordering::SeqCst);
                let delay = backoff.failed();
                warn!(
                    host = %host,
                    port,
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "MQTT connection failed; reconnecting"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn acknowledge(shared: &Shared, pkid: u16) {
    if shared.acks().acknowledged(pkid) {
        shared.acked.notify_one();
    }
}

/// Hands publishes to the client and keeps the books; used by the outbox and by `finish`.
struct Outlet {
    client: AsyncClient,
    shared: Arc<Shared>,
    endpoint: Endpoint,
}

impl Outlet {
    async fn publish(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Vec<u8>,
        stream: Option<&str>,
    ) -> Result<(), PublishError> {
        let echo = self.shared.echo.then(|| echo_line(topic, &payload));
        self.client.publish(topic, qos, retain, payload).await.map_err(|source| {
            PublishError::Client {
                host: self.endpoint.host.clone(),
                port: self.endpoint.port,
                topic: topic.to_string(),
                source: Box::new(source),
            }
        })?;
        // Counted only once handed over, so a cancelled hand-over is not awaited at shutdown.
        self.shared.acks().handed(qos != QoS::AtMostOnce);
        debug!(topic, stream = stream.unwrap_or(""), ?qos, retain, "published");
        if let Some(line) = echo {
            let mut stdout = std::io::stdout().lock();
            if let Err(error) = writeln!(stdout, "{line}") {
                debug!(topic, error = %error, "cannot echo to standard output");
            }
        }
        Ok(())
    }
}

/// `mqtt.echo`'s line: the topic, a space, the payload (JSON is compact, so one line).
fn echo_line(topic: &str, payload: &[u8]) -> String {
    format!("{topic} {}", String::from_utf8_lossy(payload))
}

/// The single writer: `online` after each connection, then messages in arrival order.
///
/// Known gap: after a reconnect, rumqttc first resends what was in flight and what already sat
/// in its request queue, so those classifications reach subscribers before the new `online`
/// (seen in review: seq 18–29 arrived ahead of it after a 10 s broker outage). The on-disk spool
/// of the live-sources issue retires this: messages wait there, not in rumqttc's queue, until
/// `online` is acknowledged.
async fn run_outbox(
    outlet: Outlet,
    topics: Topics,
    qos: QoS,
    mut messages: mpsc::Receiver<Message>,
    mut connected: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) -> OutboxEnd {
    let status = topics.status();
    let mut connections_open = true;
    loop {
        let step = tokio::select! {
            biased;
            () = stopped(&mut stop) => break,
            changed = connected.changed(), if connections_open => {
                if changed.is_err() {
                    // The driver has ended; no more connections will be announced.
                    connections_open = false;
                    continue;
                }
                let online = b"online".to_vec();
                let publish = outlet.publish(&status, QoS::AtLeastOnce, true, online, None);
                until_stopped(&mut stop, publish).await
            }
            message = messages.recv() => match message {
                None => return OutboxEnd::default(),
                Some(message) => {
                    until_stopped(&mut stop, send(&outlet, &topics, qos, message)).await
                }
            },
        };
        match step {
            Some(Ok(())) => {}
            Some(Err(error)) => error!(error = %error, "message not published"),
            None => {
                // Stopped while waiting for the client: that message is lost too.
                return OutboxEnd { dropped: 1 + drain(&mut messages) };
            }
        }
    }
    OutboxEnd { dropped: drain(&mut messages) }
}

/// Runs `work` unless the stop flag is raised first; None when stopped.
async fn until_stopped<T>(
    stop: &mut watch::Receiver<bool>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        () = stopped(stop) => None,
        result = work => Some(result),
    }
}

/// Resolves once the stop flag is raised, or its sender (the publisher) is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the publisher was dropped without `finish`: stop as well.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Closes the queue and counts what was left in it.
fn drain(messages: &mut mpsc::Receiver<Message>) -> u64 {
    messages.close();
    let mut count = 0;
    while messages.try_recv().is_ok() {
        count += 1;
    }
    count
}

/// One message → one publish on its stream's topic.
async fn send(
    outlet: &Outlet,
    topics: &Topics,
    qos: QoS,
    message: Message,
) -> Result<(), PublishError> {
    let (topic, qos, retain, stream, payload) = match &message {
        Message::Classification(classification) => {
            let topic = topics.classification(&classification.stream);
            let payload = serde_json::to_vec(classification);
            (topic, qos, false, classification.stream.as_str(), payload)
        }
        Message::State(state) => {
            let topic = topics.state(&state.stream);
            (topic, QoS::AtLeastOnce, true, state.stream.as_str(), serde_json::to_vec(state))
        }
        Message::StreamStatus(status) => {
            let topic = topics.stream_status(&status.stream);
            (topic, QoS::AtLeastOnce, true, status.stream.as_str(), serde_json::to_vec(status))
        }
    };
    let payload =
        payload.map_err(|source| PublishError::Encode { topic: topic.clone(), source })?;
    outlet.publish(&topic, qos, retain, payload, Some(stream)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_each_qos_setting() {
        assert_eq!(qos_from(0).ok(), Some(QoS::AtMostOnce));
        assert_eq!(qos_from(1).ok(), Some(QoS::AtLeastOnce));
        assert_eq!(qos_from(2).ok(), Some(QoS::ExactlyOnce));
        let error = qos_from(3).err().map(|error| error.to_string());
        assert_eq!(error.as_deref(), Some("mqtt.qos: 3 is not 0, 1 or 2"));
    }

    #[test]
    fn options_carry_the_retained_offline_will_and_no_clean_session() {
        let mut settings = Settings { device_id: "box-1".into(), ..Settings::default() };
        settings.mqtt.username = Some("user".into());
        settings.mqtt.password = Some("secret".into());
        let topics = Topics::new(&settings.mqtt.prefix, &settings.device_id);
        let options = mqtt_options(&settings, &topics);
        let will = options.last_will();
        assert_eq!(will.as_ref().map(|will| will.topic.as_str()), Some("edgesight/box-1/status"));
        assert_eq!(will.as_ref().map(|will| &will.message[..]), Some(&b"offline"[..]));
        assert_eq!(
            will.as_ref().map(|will| (will.qos, will.retain)),
            Some((QoS::AtLeastOnce, true))
        );
        assert!(!options.clean_session());
        assert_eq!(options.client_id(), "edgesight-box-1");
        assert!(options.credentials().is_some());
    }

    #[test]
    fn echo_prints_topic_then_payload_on_one_line() {
        let line = echo_line("edgesight/b/door/state", br#"{"label":"cat"}"#);
        assert_eq!(line, r#"edgesight/b/door/state {"label":"cat"}"#);
    }

    #[test]
    fn a_refused_login_names_the_settings_to_check() {
        assert!(refusal_reason(ConnectReturnCode::NotAuthorized).contains("mqtt.password"));
        assert!(refusal_reason(ConnectReturnCode::BadUserNamePassword).contains("mqtt.username"));
    }
}
