//! The MQTT publisher: one connection to the broker, shared by every stream.
//!
//! Two tasks run concurrently. The rumqttc event loop runs in the *driver* task: it reconnects
//! with [`Backoff`] after a failure, forwards acknowledgements and every accepted connection
//! to the outbox, and after a lost connection waits until the outbox has taken back what was in
//! flight before it empties rumqttc's own queues, so rumqttc never resends anything by itself
//! and nothing reaches a new session ahead of its `online`. The *outbox* task
//! ([`super::outbox`]) is the only writer of publishes and owns the on-disk spool
//! ([`super::spool`]): QoS ≥ 1 messages wait there while the broker is unreachable (and across
//! restarts), and are replayed in order before new ones. [`Publisher::finish`] lets the outbox
//! replay and publish `offline`, then disconnects cleanly (so the broker does not send the last
//! will, which says the same); without a broker the spool keeps what it holds.
//!
//! Failures: a refused login or a failed TLS handshake (untrusted certificate) fails the start;
//! on a later reconnect they are logged at ERROR and retried at the longest backoff. A broker
//! that cannot be reached is retried with the normal backoff, quietly doubling.
//!
//! Sessions: the client connects with a clean session, since nothing depends on the broker
//! keeping one; QoS 2 publishes interrupted by a lost connection are sent again as new ones,
//! so across a reconnect QoS 2 gives at-least-once like QoS 1.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions,
    Outgoing, Packet, QoS,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use super::backoff::Backoff;
use super::outbox::{DriverEvent, Outbox, OutboxEnd, WINDOW};
use super::spool::Spool;
use super::topics::Topics;
use super::{Message, PublishError, tls};
use crate::config::Settings;
use crate::metrics::Metrics;

/// Messages the engine may queue ahead of the publisher before its sends wait.
pub const MESSAGE_QUEUE: usize = 256;

/// Requests rumqttc buffers between the outbox and the network: more than the outbox ever has
/// in flight (plus a DISCONNECT), so handing a publish over never waits.
const CLIENT_QUEUE: usize = WINDOW * 2;

/// Largest packet sent or accepted; a classification with a 200-float embedding is ~3 KiB.
const MAX_PACKET: usize = 256 * 1024;

/// How long `finish` waits for the DISCONNECT to be written after the flush.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What [`Publisher::finish`] achieved. `unacknowledged` and `dropped` are messages lost;
/// `spooled` ones are not (the next run replays them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushReport {
    /// Publishes handed to the MQTT client over the publisher's life, any QoS, status and
    /// replays included.
    pub published: u64,
    /// QoS ≥ 1 publishes the broker acknowledged.
    pub acknowledged: u64,
    /// QoS ≥ 1 messages neither acknowledged nor kept in the spool. Always 0 since the spool
    /// keeps every unacknowledged message; kept for callers that check it.
    pub unacknowledged: u64,
    /// Messages lost: the spool could not take them, or they could not be encoded.
    pub dropped: u64,
    /// QoS 0 messages skipped while the broker was unreachable (QoS 0 promises nothing).
    pub skipped: u64,
    /// Messages left in the on-disk spool; the next run replays them.
    pub spooled: u64,
    /// Whether the broker acknowledged the retained `offline` status.
    pub offline_sent: bool,
    /// Whether a clean DISCONNECT reached the network.
    pub disconnected: bool,
    /// Time `finish` took.
    pub elapsed: Duration,
}

impl FlushReport {
    /// True when nothing was lost (messages still spooled are not lost).
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
    connected: Arc<AtomicBool>,
    stop: watch::Sender<bool>,
    outbox: JoinHandle<OutboxEnd>,
    driver: AbortOnDrop,
    flush_timeout: Duration,
    spool_dir: std::path::PathBuf,
}

/// Host and port, for log fields and errors.
#[derive(Debug, Clone)]
struct Endpoint {
    host: String,
    port: u16,
}

/// The driver task, aborted when the publisher is dropped so the connection closes.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Publisher {
    /// Opens the spool, connects to `settings.mqtt.host:port` and starts publishing.
    ///
    /// The first connection attempt is made here (bounded by rumqttc's 5 s connect timeout).
    /// A broker that refuses the login, or whose certificate is not trusted, is an error, since
    /// retrying cannot help; so is a spool directory that cannot be used or a TLS file that
    /// cannot be read. A broker that cannot be reached is not: the publisher starts, logs a
    /// warning, spools and keeps retrying in the background with backoff.
    pub async fn start(
        settings: &Settings,
        metrics: Arc<Metrics>,
    ) -> Result<Publisher, PublishError> {
        let mqtt = &settings.mqtt;
        let qos = qos_from(mqtt.qos)?;
        let topics = Topics::new(&mqtt.prefix, &settings.device_id);
        let endpoint = Endpoint { host: mqtt.host.clone(), port: mqtt.port };
        let options = mqtt_options(settings, &topics)?;
        let spool_dir = settings.spool_dir(&crate::service::cache_dir());
        let max_bytes = mqtt.spool_max_mb.max(1) * 1024 * 1024;
        let (spool, recovered) = Spool::open(&spool_dir, max_bytes)?;
        if recovered.records > 0 {
            info!(
                spool = %spool_dir.display(),
                messages = recovered.records,
                "the spool holds messages from a previous run; they are published first"
            );
        }
        let (client, mut eventloop) = AsyncClient::new(options, CLIENT_QUEUE);
        let (events, events_rx) = mpsc::unbounded_channel();
        let connected = Arc::new(AtomicBool::new(false));
        let mut backoff = Backoff::mqtt();
        let mut first_delay = Duration::ZERO;

        // One attempt here so that a refused login fails the start instead of being retried.
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                info!(host = %endpoint.host, port = endpoint.port, "connected to the MQTT broker");
                announce(&connected, &metrics, &events);
            }
            Err(ConnectionError::ConnectionRefused(code)) => {
                return Err(PublishError::Refused {
                    host: endpoint.host,
                    port: endpoint.port,
                    reason: refusal_reason(code).into(),
                });
            }
            Err(error) => {
                if let Some(reason) = tls::tls_failure(&error) {
                    return Err(PublishError::TlsRefused {
                        host: endpoint.host,
                        port: endpoint.port,
                        reason,
                    });
                }
                let delay = backoff.failed();
                warn!(
                    host = %endpoint.host,
                    port = endpoint.port,
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "MQTT broker unreachable at start; messages are spooled until it answers"
                );
                first_delay = delay;
            }
            Ok(other) => {
                debug!(event = ?other, "unexpected first MQTT event");
            }
        }

        let driver = tokio::spawn(drive(
            Driver {
                eventloop,
                backoff,
                events,
                connected: Arc::clone(&connected),
                metrics: Arc::clone(&metrics),
                endpoint: endpoint.clone(),
            },
            first_delay,
        ));
        let (sender, messages) = mpsc::channel(MESSAGE_QUEUE);
        let (stop, stop_rx) = watch::channel(false);
        let outbox = Outbox::new(client.clone(), topics.clone(), qos, spool, metrics, mqtt.echo);
        let outbox = tokio::spawn(outbox.run(messages, events_rx, stop_rx));
        Ok(Publisher {
            sender,
            client,
            topics,
            endpoint,
            connected,
            stop,
            outbox,
            driver: AbortOnDrop(driver),
            flush_timeout: Duration::from_secs(mqtt.flush_timeout_s),
            spool_dir,
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

    /// Shuts down within `mqtt.flush_timeout_s`: once every sender is dropped, publishes what
    /// is queued and spooled, publishes the retained `offline` status, waits until the broker
    /// acknowledged everything, and disconnects cleanly. Without a connection (or at the
    /// deadline) what is left stays in the spool for the next run, which is reported, not an
    /// `Err`; only messages the spool could not take are lost (logged at ERROR).
    pub async fn finish(self) -> Result<FlushReport, PublishError> {
        let Publisher {
            sender,
            client,
            endpoint,
            connected,
            stop,
            mut outbox,
            driver,
            flush_timeout,
            spool_dir,
            ..
        } = self;
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + flush_timeout;
        drop(sender);
        let end = match tokio::time::timeout_at(deadline, &mut outbox).await {
            Ok(end) => end,
            Err(_) => {
                let _ = stop.send(true);
                outbox.await
            }
        };
        let end = end.map_err(|source| PublishError::Task { task: "outbox", source })?;

        // A clean DISCONNECT: the driver ends once it has written it. Without a connection there
        // is nobody to say goodbye to; the broker sends the will when it notices.
        let mut driver = driver;
        let disconnected =
            connected.load(Ordering::SeqCst) && disconnect(&client, &mut driver.0).await;
        let report = FlushReport {
            published: end.published,
            acknowledged: end.acknowledged,
            unacknowledged: 0,
            dropped: end.dropped,
            skipped: end.skipped,
            spooled: end.spooled,
            offline_sent: end.offline_sent,
            disconnected,
            elapsed: started.elapsed(),
        };
        let Endpoint { host, port } = endpoint;
        if !report.is_complete() {
            error!(
                host = %host,
                port,
                dropped = report.dropped,
                "MQTT messages were lost: the spool could not take them"
            );
        }
        if report.spooled > 0 {
            warn!(
                host = %host,
                port,
                spooled = report.spooled,
                spool = %spool_dir.display(),
                "broker not reachable at shutdown; messages stay spooled for the next run"
            );
        } else {
            info!(
                host = %host,
                port,
                published = report.published,
                skipped_qos0 = report.skipped,
                elapsed_ms = report.elapsed.as_millis() as u64,
                "MQTT publisher flushed and disconnected"
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

/// Builds the client options; the only place they are built. The last will is part of every
/// CONNECT rumqttc sends, reconnects included.
fn mqtt_options(settings: &Settings, topics: &Topics) -> Result<MqttOptions, PublishError> {
    let mqtt = &settings.mqtt;
    let mut options = MqttOptions::new(settings.client_id(), mqtt.host.clone(), mqtt.port);
    options.set_keep_alive(Duration::from_secs(mqtt.keep_alive_s));
    // The spool, not the broker's session, carries messages across a lost connection.
    options.set_clean_session(true);
    options.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    options.set_last_will(LastWill::new(topics.status(), "offline", QoS::AtLeastOnce, true));
    if let (Some(username), Some(password)) = (&mqtt.username, &mqtt.password) {
        options.set_credentials(username.clone(), password.clone());
    }
    if let Some(tls_settings) = &mqtt.tls {
        options.set_transport(tls::transport(tls_settings)?);
    }
    Ok(options)
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

/// A connection was accepted: flags, counters, and the outbox told.
fn announce(
    connected: &AtomicBool,
    metrics: &Metrics,
    events: &mpsc::UnboundedSender<DriverEvent>,
) {
    connected.store(true, Ordering::SeqCst);
    metrics.publish.connections.fetch_add(1, Ordering::Relaxed);
    metrics.publish.connected.store(1, Ordering::Relaxed);
    let _ = events.send(DriverEvent::Connected);
}

/// What the driver task owns.
struct Driver {
    eventloop: EventLoop,
    backoff: Backoff,
    events: mpsc::UnboundedSender<DriverEvent>,
    connected: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    endpoint: Endpoint,
}

/// Polls the rumqttc event loop until the publisher disconnects or is dropped.
async fn drive(driver: Driver, first_delay: Duration) {
    let Driver { mut eventloop, mut backoff, events, connected, metrics, endpoint } = driver;
    let Endpoint { host, port } = endpoint;
    // Packet ids written on this connection; only their acknowledgements are forwarded.
    let mut written = std::collections::HashSet::new();
    tokio::time::sleep(first_delay).await;
    loop {
        let error = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if backoff.failures() > 0 {
                    let failures = backoff.failures();
                    info!(host = %host, port, failures, "reconnected to the MQTT broker");
                }
                backoff.reset();
                written.clear();
                announce(&connected, &metrics, &events);
                continue;
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if pkid != 0 {
                    written.insert(pkid);
                }
                continue;
            }
            Ok(Event::Incoming(Packet::PubAck(rumqttc::PubAck { pkid, .. })))
            | Ok(Event::Incoming(Packet::PubComp(rumqttc::PubComp { pkid, .. }))) => {
                if written.remove(&pkid) {
                    let _ = events.send(DriverEvent::Acked);
                }
                continue;
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                debug!(host = %host, port, "DISCONNECT sent");
                return;
            }
            Ok(_) => continue,
            Err(ConnectionError::RequestsDone) => return,
            Err(error) => error,
        };
        metrics.publish.connected.store(0, Ordering::Relaxed);
        if connected.swap(false, Ordering::SeqCst) {
            // Let the outbox take back what was in flight before the client's queues are
            // emptied, so that nothing it hands over meanwhile slips into the next session.
            let (reply, replied) = oneshot::channel();
            if events.send(DriverEvent::Disconnected(reply)).is_ok() {
                let _ = replied.await;
            }
        }
        eventloop.clean();
        eventloop.pending.clear();
        written.clear();
        let fatal = match &error {
            ConnectionError::ConnectionRefused(code) => Some(refusal_reason(*code).to_string()),
            other => tls::tls_failure(other).map(|reason| format!("TLS: {reason}")),
        };
        let delay = match fatal {
            Some(reason) => {
                let delay = backoff.max();
                error!(
                    host = %host,
                    port,
                    reason,
                    retry_in_ms = delay.as_millis() as u64,
                    "MQTT broker refused the connection; retrying at the longest backoff"
                );
                delay
            }
            None => {
                let delay = backoff.failed();
                warn!(
                    host = %host,
                    port,
                    error = %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "MQTT connection failed; reconnecting"
                );
                delay
            }
        };
        tokio::time::sleep(delay).await;
    }
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
    fn options_carry_the_retained_offline_will_and_a_clean_session() {
        let mut settings = Settings { device_id: "box-1".into(), ..Settings::default() };
        settings.mqtt.username = Some("user".into());
        settings.mqtt.password = Some("secret".into());
        let topics = Topics::new(&settings.mqtt.prefix, &settings.device_id);
        let options = mqtt_options(&settings, &topics).expect("options");
        let will = options.last_will();
        assert_eq!(will.as_ref().map(|will| will.topic.as_str()), Some("edgesight/box-1/status"));
        assert_eq!(will.as_ref().map(|will| &will.message[..]), Some(&b"offline"[..]));
        assert_eq!(
            will.as_ref().map(|will| (will.qos, will.retain)),
            Some((QoS::AtLeastOnce, true))
        );
        assert!(options.clean_session());
        assert_eq!(options.client_id(), "edgesight-box-1");
        assert!(options.credentials().is_some());
    }

    #[test]
    fn echo_prints_topic_then_payload_on_one_line() {
        let line = super::super::outbox::echo_line("edgesight/b/door/state", br#"{"label":"cat"}"#);
        assert_eq!(line, r#"edgesight/b/door/state {"label":"cat"}"#);
    }

    #[test]
    fn a_refused_login_names_the_settings_to_check() {
        assert!(refusal_reason(ConnectReturnCode::NotAuthorized).contains("mqtt.password"));
        assert!(refusal_reason(ConnectReturnCode::BadUserNamePassword).contains("mqtt.username"));
    }
}
