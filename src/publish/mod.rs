//! MQTT publishing: topics, payloads, availability and the embedded broker.
//!
//! The engine hands [`Message`]s to a [`Publisher`] through a bounded channel; the publisher
//! turns them into MQTT publishes on the topics that [`topics::Topics`] builds, keeps the
//! retained `status` topic truthful (`online` on every connection, `offline` at shutdown and as
//! the last will), and at shutdown waits for the broker to acknowledge what was sent. The
//! pieces that decide things — topic names, acknowledgement bookkeeping, reconnect delays, when
//! to run the embedded broker — are plain structs and functions in their own files, tested
//! without a broker; [`mqtt`] and [`broker`] only do the I/O around them.

pub mod acks;
pub mod backoff;
pub mod broker;
pub mod mqtt;
pub mod outbox;
pub mod payload;
pub mod schema;
pub mod spool;
pub mod tls;
pub mod topics;

pub use broker::{EmbeddedBroker, port_open, resolve_broker, start_embedded};
pub use mqtt::{FlushReport, Publisher};
pub use topics::Topics;

/// What the engine hands the publisher.
#[derive(Debug, Clone)]
pub enum Message {
    Classification(payload::Classification),
    State(payload::StreamState),
    /// Periodic statistics, `<prefix>/<device>/stats`, QoS 0, not retained.
    Stats(payload::Stats),
    /// A source's retained status (`online`, `reconnecting`, `failed`, `ended`).
    StreamStatus(payload::StreamStatus),
}

/// Everything that can go wrong while publishing or running the embedded broker. Each variant
/// names the broker address, port or topic it concerns; none ever carries the password.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker answered CONNECT with a refusal; retrying with the same settings cannot help.
    #[error("MQTT broker {host}:{port} refused the connection: {reason}")]
    Refused { host: String, port: u16, reason: String },

    /// The TLS handshake failed: an untrusted or misnamed server certificate, or a client
    /// certificate the broker rejected. Retrying with the same settings cannot help.
    #[error("TLS to MQTT broker {host}:{port} failed: {reason}; check the [mqtt.tls] files")]
    TlsRefused { host: String, port: u16, reason: String },

    /// A CA, certificate or key file of `[mqtt.tls]` is missing, unreadable or not PEM.
    #[error("{key} {path}: {reason}")]
    TlsFile { key: &'static str, path: std::path::PathBuf, reason: String },

    /// The on-disk spool cannot be opened or written.
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),

    /// The MQTT client did not take a publish: its connection task has ended, or the topic is
    /// not a valid MQTT topic name.
    #[error("MQTT client for {host}:{port} did not take the publish to {topic}: {source}")]
    Client {
        host: String,
        port: u16,
        topic: String,
        #[source]
        source: Box<rumqttc::ClientError>,
    },

    /// A payload could not be serialised to JSON.
    #[error("cannot encode the payload for {topic}: {source}")]
    Encode {
        topic: String,
        #[source]
        source: serde_json::Error,
    },

    /// A setting the publisher needs is out of range (normally caught by config validation).
    #[error("{key}: {message}")]
    Setting { key: &'static str, message: String },

    /// The embedded broker cannot listen on its port (most often: something else already does).
    #[error("embedded MQTT broker cannot listen on 127.0.0.1:{port}: {source}")]
    BrokerPort {
        port: u16,
        #[source]
        source: std::io::Error,
    },

    /// The embedded broker was started but never accepted connections.
    #[error("embedded MQTT broker on 127.0.0.1:{port} did not start: {reason}")]
    BrokerStart { port: u16, reason: String },

    /// One of the publisher's own tasks panicked or was cancelled.
    #[error("publisher task `{task}` failed: {source}")]
    Task {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}
