//! The outbox task: the only writer of publishes, and the owner of the spool.
//!
//! It hears from the driver (connected, one more acknowledgement, disconnected) and from the
//! engine (messages), and keeps one order per connection: `online` first, then what the spool
//! holds, then new messages. A QoS ≥ 1 message goes straight to the client only while the
//! connection is up, nothing waits in the spool and the in-flight window has room; otherwise it
//! is appended to the spool (flagged `replayed`), which keeps every message behind the ones
//! before it. Spooled records are handed over as the window allows and leave the spool only
//! when the broker acknowledged them. When the connection is lost the driver waits until the
//! outbox has put the window back (spooled records rewound, live messages spooled) before it
//! empties rumqttc's own queues, so nothing reaches the next session ahead of its `online`, and
//! nothing depends on the broker keeping a session. QoS 0 messages are never spooled: while
//! disconnected they are skipped (counted in the report).
//!
//! When the engine's channel closes (shutdown) the outbox keeps replaying until the spool and
//! the window are empty, then publishes `offline` and ends once the broker acknowledged it;
//! without a connection it ends at once and the spool keeps what it holds for the next run.
//! At the flush deadline it stops: live messages in flight or still queued go to the spool.
//!
//! A full spool drops its oldest records; those drops are counted exactly in
//! `metrics.publish.spool_overflow` but logged through [`OverflowLog`], one ERROR line at the
//! first drop and then at most one per 10 s, so a long outage does not flood the log.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, QoS};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use super::acks::{Flight, InFlight};
use super::spool::{Record, Spool};
use super::topics::Topics;
use super::{Message, PublishError};
use crate::metrics::Metrics;

/// Publishes in flight at most; well below the client's request queue, so that handing over a
/// publish never waits.
pub const WINDOW: usize = 32;

/// How often the spool is made durable while it changes, and the gauges refreshed.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// Least time between two ERROR lines about spool overflow.
const OVERFLOW_LOG_EVERY: Duration = Duration::from_secs(10);

/// One ERROR line's figures: records dropped since the previous line, and since the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverflowLine {
    pub dropped: u64,
    pub total: u64,
}

/// Rate limit of the overflow log: a full spool drops a record per new message, which would
/// be one ERROR line per message (thousands in a long outage). The first overflow is logged
/// at once, then at most one line per [`OVERFLOW_LOG_EVERY`] with the count since the last
/// line; a count still pending is logged once the interval has passed (the outbox checks on
/// its sync tick) or at the end. Counting in metrics stays exact; only the lines are merged.
/// No I/O: the caller passes the clock.
#[derive(Debug, Default)]
pub struct OverflowLog {
    last: Option<Instant>,
    pending: u64,
    total: u64,
}

impl OverflowLog {
    /// `count` records were just dropped at `now`; a line to log, if one is due.
    pub fn dropped(&mut self, count: u64, now: Instant) -> Option<OverflowLine> {
        self.pending += count;
        self.total += count;
        self.due(now)
    }

    /// A line for what is pending if the interval since the last line has passed.
    pub fn due(&mut self, now: Instant) -> Option<OverflowLine> {
        let ready = self.last.is_none_or(|last| now.duration_since(last) >= OVERFLOW_LOG_EVERY);
        if self.pending == 0 || !ready {
            return None;
        }
        self.last = Some(now);
        self.flush()
    }

    /// A line for whatever is pending, regardless of time (at the end).
    pub fn flush(&mut self) -> Option<OverflowLine> {
        if self.pending == 0 {
            return None;
        }
        let line = OverflowLine { dropped: self.pending, total: self.total };
        self.pending = 0;
        Some(line)
    }
}

/// What the driver tells the outbox, in the order it happened.
#[derive(Debug)]
pub enum DriverEvent {
    /// The broker accepted a connection.
    Connected,
    /// The broker acknowledged a publish written on this connection.
    Acked,
    /// The connection was lost; the driver waits for the reply before it clears the client.
    Disconnected(oneshot::Sender<()>),
}

/// How the outbox ended.
#[derive(Debug, Default)]
pub struct OutboxEnd {
    /// Publishes handed to the client, any QoS, status and repeats included.
    pub published: u64,
    /// QoS ≥ 1 publishes the broker acknowledged.
    pub acknowledged: u64,
    /// Messages lost: not spooled because the spool failed.
    pub dropped: u64,
    /// QoS 0 messages skipped while disconnected.
    pub skipped: u64,
    /// Messages left in the spool for the next run.
    pub spooled: u64,
    pub offline_sent: bool,
}

/// The outbox's state; see the module documentation.
pub struct Outbox {
    pub client: AsyncClient,
    pub topics: Topics,
    pub qos: QoS,
    pub spool: Spool,
    pub metrics: Arc<Metrics>,
    pub echo: bool,
    window: InFlight<Message>,
    connected: bool,
    published: u64,
    dropped: u64,
    skipped: u64,
    offline: Offline,
    overflow: OverflowLog,
}

#[derive(Debug, PartialEq)]
enum Offline {
    NotYet,
    Handed,
    Acknowledged,
}

impl Outbox {
    pub fn new(
        client: AsyncClient,
        topics: Topics,
        qos: QoS,
        spool: Spool,
        metrics: Arc<Metrics>,
        echo: bool,
    ) -> Outbox {
        Outbox {
            client,
            topics,
            qos,
            spool,
            metrics,
            echo,
            window: InFlight::new(WINDOW),
            connected: false,
            published: 0,
            dropped: 0,
            skipped: 0,
            offline: Offline::NotYet,
            overflow: OverflowLog::default(),
        }
    }

    /// Runs until shutdown completes, or `stop` is raised at the flush deadline.
    pub async fn run(
        mut self,
        mut messages: mpsc::Receiver<Message>,
        mut events: mpsc::UnboundedReceiver<DriverEvent>,
        mut stop: watch::Receiver<bool>,
    ) -> OutboxEnd {
        let mut tick = tokio::time::interval(SYNC_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closed = false;
        let mut events_open = true;
        loop {
            self.replay();
            if closed && self.finished() {
                break;
            }
            let take = !closed && (!self.connected || self.window.has_room());
            tokio::select! {
                biased;
                () = stopped(&mut stop) => {
                    self.at_deadline(&mut messages);
                    break;
                }
                event = events.recv(), if events_open => match event {
                    Some(event) => self.on_event(event),
                    None => {
                        // The driver has ended: nothing more will be sent on this client.
                        events_open = false;
                        self.lost_connection();
                    }
                },
                _ = tick.tick() => self.sync(),
                message = messages.recv(), if take => match message {
                    Some(message) => self.accept(message),
                    None => closed = true,
                },
            }
        }
        self.sync();
        if let Some(line) = self.overflow.flush() {
            self.log_overflow(line);
        }
        OutboxEnd {
            published: self.published,
            acknowledged: self.window.acknowledged_count(),
            dropped: self.dropped,
            skipped: self.skipped,
            spooled: self.spool.depth(),
            offline_sent: self.offline == Offline::Acknowledged,
        }
    }

    /// After the engine's channel closed: true once there is nothing more to do. Hands over
    /// `offline` when everything before it was acknowledged.
    fn finished(&mut self) -> bool {
        if !self.connected {
            return true;
        }
        match self.offline {
            Offline::Acknowledged => true,
            Offline::Handed => false,
            Offline::NotYet => {
                if self.spool.depth() == 0 && self.window.is_empty() {
                    let status = self.topics.status();
                    if self.hand(&status, QoS::AtLeastOnce, true, b"offline".to_vec()) {
                        self.window.handed(Flight::Status);
                        self.offline = Offline::Handed;
                    }
                }
                false
            }
        }
    }

    fn on_event(&mut self, event: DriverEvent) {
        match event {
            DriverEvent::Connected => {
                self.connected = true;
                let status = self.topics.status();
                if self.hand(&status, QoS::AtLeastOnce, true, b"online".to_vec()) {
                    self.window.handed(Flight::Status);
                }
                if self.spool.has_unread() {
                    info!(
                        messages = self.spool.depth(),
                        "replaying spooled messages before new ones"
                    );
                }
            }
            DriverEvent::Acked => match self.window.acknowledged() {
                Some(Flight::Spooled(number)) => {
                    if let Err(error) = self.spool.ack(number) {
                        error!(%error, "cannot drop an acknowledged record from the spool");
                    }
                    self.metrics.publish.replayed.fetch_add(1, Ordering::Relaxed);
                }
                Some(Flight::Status) if self.offline == Offline::Handed => {
                    self.offline = Offline::Acknowledged;
                }
                Some(_) => {}
                None => debug!("acknowledgement with nothing in flight"),
            },
            DriverEvent::Disconnected(reply) => {
                self.lost_connection();
                let _ = reply.send(());
            }
        }
        self.gauges();
    }

    /// Puts the window back: spooled records become unread, live messages go to the spool.
    fn lost_connection(&mut self) {
        self.connected = false;
        if self.offline == Offline::Handed {
            self.offline = Offline::NotYet;
        }
        let lost = self.window.lost_connection();
        self.spool.rewind();
        let live = lost.live.len();
        for message in lost.live {
            self.spool_message(message);
        }
        if live > 0 || lost.spooled > 0 {
            warn!(
                live_spooled = live,
                replay_again = lost.spooled,
                "connection lost with publishes unacknowledged; they will be sent again"
            );
        }
        self.gauges();
    }

    /// A message from the engine: straight to the client, into the spool, or skipped (QoS 0
    /// while disconnected).
    fn accept(&mut self, message: Message) {
        let qos = self.qos_of(&message);
        if qos == QoS::AtMostOnce {
            if !self.connected {
                self.skipped += 1;
                return;
            }
            if let Some((topic, retain, payload)) = self.encode(&message) {
                self.hand(&topic, qos, retain, payload);
            }
            return;
        }
        if self.connected && !self.spool.has_unread() && self.window.has_room() {
            if let Some((topic, retain, payload)) = self.encode(&message) {
                if self.hand(&topic, qos, retain, payload) {
                    self.window.handed(Flight::Live(message));
                } else {
                    self.spool_message(message);
                }
            }
            return;
        }
        self.spool_message(message);
    }

    /// Hands spooled records over while the connection and the window allow.
    fn replay(&mut self) {
        while self.connected && self.window.has_room() && self.spool.has_unread() {
            match self.spool.next_unread() {
                Ok(Some((number, record))) => {
                    let qos = qos_from_u8(record.qos);
                    if self.hand(&record.topic, qos, record.retain, record.payload) {
                        self.window.handed(Flight::Spooled(number));
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    error!(%error, "a spooled message cannot be read; skipping it");
                    self.dropped += 1;
                }
            }
        }
    }

    /// Appends `message`, flagged as replayed, to the spool; counts what overflowed.
    fn spool_message(&mut self, mut message: Message) {
        match &mut message {
            Message::Classification(classification) => classification.replayed = true,
            Message::State(state) => state.replayed = true,
            // QoS 0: never spooled (see `qos_of`).
            Message::Stats(_) => {}
            // Retained and replaced by the next one; the order of the spool keeps the last
            // status last.
            Message::StreamStatus(_) => {}
        }
        let qos = self.qos_of(&message);
        let Some((topic, retain, payload)) = self.encode(&message) else { return };
        let record = Record { topic, qos: qos as u8, retain, payload };
        match self.spool.push(&record) {
            Ok(0) => {}
            Ok(overflow) => {
                self.metrics.publish.spool_overflow.fetch_add(overflow, Ordering::Relaxed);
                if let Some(line) = self.overflow.dropped(overflow, Instant::now()) {
                    self.log_overflow(line);
                }
            }
            Err(error) => {
                self.dropped += 1;
                self.metrics.publish.failures.fetch_add(1, Ordering::Relaxed);
                error!(%error, topic = %record.topic, "cannot spool a message; it is lost");
            }
        }
    }

    /// At the flush deadline: what is in flight or queued goes to the spool.
    fn at_deadline(&mut self, messages: &mut mpsc::Receiver<Message>) {
        self.lost_connection();
        messages.close();
        while let Ok(message) = messages.try_recv() {
            if self.qos_of(&message) == QoS::AtMostOnce {
                self.skipped += 1;
            } else {
                self.spool_message(message);
            }
        }
    }

    fn qos_of(&self, message: &Message) -> QoS {
        match message {
            Message::Classification(_) => self.qos,
            Message::State(_) => QoS::AtLeastOnce,
            Message::Stats(_) => QoS::AtMostOnce,
            Message::StreamStatus(_) => QoS::AtLeastOnce,
        }
    }

    /// Topic, retain flag and JSON payload; None (logged and counted) when it cannot encode.
    fn encode(&mut self, message: &Message) -> Option<(String, bool, Vec<u8>)> {
        let (topic, retain, payload) = match message {
            Message::Classification(classification) => (
                self.topics.classification(&classification.stream),
                false,
                serde_json::to_vec(classification),
            ),
            Message::State(state) => {
                (self.topics.state(&state.stream), true, serde_json::to_vec(state))
            }
            Message::Stats(stats) => (self.topics.stats(), false, serde_json::to_vec(stats)),
            Message::StreamStatus(status) => {
                (self.topics.stream_status(&status.stream), true, serde_json::to_vec(status))
            }
        };
        match payload {
            Ok(payload) => Some((topic, retain, payload)),
            Err(source) => {
                let error = PublishError::Encode { topic, source };
                error!(%error, "message not published");
                self.dropped += 1;
                self.metrics.publish.failures.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Hands one publish to the client; false (logged) when the client did not take it, which
    /// only happens when its event loop has ended; the connection then counts as lost.
    fn hand(&mut self, topic: &str, qos: QoS, retain: bool, payload: Vec<u8>) -> bool {
        let echo = self.echo.then(|| echo_line(topic, &payload));
        if let Err(error) = self.client.try_publish(topic, qos, retain, payload) {
            error!(topic, %error, "the MQTT client did not take a publish");
            self.metrics.publish.failures.fetch_add(1, Ordering::Relaxed);
            if self.connected {
                self.lost_connection();
            }
            return false;
        }
        self.published += 1;
        debug!(topic, ?qos, retain, "published");
        if let Some(line) = echo {
            let mut stdout = std::io::stdout().lock();
            if let Err(error) = writeln!(stdout, "{line}") {
                debug!(topic, error = %error, "cannot echo to standard output");
            }
        }
        true
    }

    /// One aggregated ERROR line about spool overflow; see [`OverflowLog`].
    fn log_overflow(&self, line: OverflowLine) {
        error!(
            dropped = line.dropped,
            dropped_total = line.total,
            spool = %self.spool.dir().display(),
            "spool full (mqtt.spool_max_mb); the oldest messages were dropped"
        );
    }

    /// Makes the spool durable and refreshes the gauges.
    fn sync(&mut self) {
        if let Some(line) = self.overflow.due(Instant::now()) {
            self.log_overflow(line);
        }
        if self.spool.is_dirty()
            && let Err(error) = self.spool.sync()
        {
            error!(%error, "cannot sync the spool");
        }
        self.gauges();
    }

    fn gauges(&self) {
        let publish = &self.metrics.publish;
        publish.spool_depth.store(self.spool.depth(), Ordering::Relaxed);
        publish.spool_bytes.store(self.spool.bytes(), Ordering::Relaxed);
    }
}

fn qos_from_u8(qos: u8) -> QoS {
    match qos {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// `mqtt.echo`'s line: the topic, a space, the payload (JSON is compact, so one line).
pub fn echo_line(topic: &str, payload: &[u8]) -> String {
    format!("{topic} {}", String::from_utf8_lossy(payload))
}

/// Resolves once the stop flag is raised, or its sender (the publisher) is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the publisher was dropped without `finish`: stop as well.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_lines_are_the_first_then_one_per_interval_with_exact_counts() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut log = OverflowLog::default();
        assert_eq!(log.due(at(0)), None, "nothing dropped yet");
        assert_eq!(log.dropped(1, at(0)), Some(OverflowLine { dropped: 1, total: 1 }));
        // 1889 more within the next 9.9 s: no line.
        for n in 0..1889 {
            assert_eq!(log.dropped(1, at(10 + n * 5)), None);
        }
        assert_eq!(log.due(at(9_999)), None);
        assert_eq!(log.dropped(2, at(10_000)), Some(OverflowLine { dropped: 1891, total: 1892 }));
        // Pending drops are reported by the tick once the interval has passed.
        assert_eq!(log.dropped(3, at(12_000)), None);
        assert_eq!(log.due(at(19_999)), None);
        assert_eq!(log.due(at(20_000)), Some(OverflowLine { dropped: 3, total: 1895 }));
        assert_eq!(log.due(at(40_000)), None, "nothing pending");
        // After a quiet spell the next overflow is logged at once.
        assert_eq!(log.dropped(4, at(40_001)), Some(OverflowLine { dropped: 4, total: 1899 }));
        assert_eq!(log.dropped(5, at(40_002)), None);
        assert_eq!(log.flush(), Some(OverflowLine { dropped: 5, total: 1904 }));
        assert_eq!(log.flush(), None);
    }
}
