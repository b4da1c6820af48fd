//! MQTT publishing: topics, payloads, availability and the embedded broker.
//!
//! SKELETON: the payloads are fixed in [`payload`]; the client and broker are filled in by the
//! publish work.

pub mod payload;

/// What the engine hands the publisher.
#[derive(Debug, Clone)]
pub enum Message {
    Classification(payload::Classification),
    State(payload::StreamState),
}
