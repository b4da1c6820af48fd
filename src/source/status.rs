//! What a source says about itself: the per-stream status published, retained, on
//! `<prefix>/<device>/<stream>/status`.
//!
//! The supervisor sends [`SourceStatus`] through the source's event channel, ordered with the
//! frames; the engine turns it into a [`StreamStatus`] payload with [`SourceStatus::payload`],
//! so the engine needs one match arm and no knowledge of sources.

use std::time::SystemTime;

use crate::publish::payload::{SCHEMA_VERSION, StreamStatus, rfc3339_ms};

/// The state of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceStatus {
    /// Frames are arriving.
    Online,
    /// The source failed, ended or stalled and is rebuilt after `next_delay_ms`.
    Reconnecting { attempt: u32, next_delay_ms: u64, reason: String },
    /// The source stopped for good.
    Failed { reason: String },
    /// The source ended (end of file, `frames` reached, or the daemon stopping).
    Ended,
}

impl SourceStatus {
    /// The word published in `status`, also what the metrics show.
    pub fn word(&self) -> &'static str {
        match self {
            SourceStatus::Online => "online",
            SourceStatus::Reconnecting { .. } => "reconnecting",
            SourceStatus::Failed { .. } => "failed",
            SourceStatus::Ended => "ended",
        }
    }

    /// The retained payload for this status.
    pub fn payload(&self, stream: &str, device: &str, run_id: &str) -> StreamStatus {
        let mut payload = StreamStatus {
            schema: SCHEMA_VERSION,
            device: device.to_string(),
            stream: stream.to_string(),
            run_id: run_id.to_string(),
            status: self.word().to_string(),
            attempt: None,
            next_delay_ms: None,
            reason: None,
            updated_at: rfc3339_ms(SystemTime::now()),
        };
        match self {
            SourceStatus::Reconnecting { attempt, next_delay_ms, reason } => {
                payload.attempt = Some(*attempt);
                payload.next_delay_ms = Some(*next_delay_ms);
                payload.reason = Some(reason.clone());
            }
            SourceStatus::Failed { reason } => payload.reason = Some(reason.clone()),
            SourceStatus::Online | SourceStatus::Ended => {}
        }
        payload
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_the_fields_of_each_status() {
        let reconnecting =
            SourceStatus::Reconnecting { attempt: 3, next_delay_ms: 2000, reason: "gone".into() };
        let payload = reconnecting.payload("door", "box-1", "run");
        assert_eq!(payload.status, "reconnecting");
        assert_eq!((payload.attempt, payload.next_delay_ms), (Some(3), Some(2000)));
        assert_eq!(payload.reason.as_deref(), Some("gone"));
        let online = SourceStatus::Online.payload("door", "box-1", "run");
        assert_eq!((online.status.as_str(), online.attempt, online.reason), ("online", None, None));
        let failed = SourceStatus::Failed { reason: "no".into() }.payload("d", "b", "r");
        assert_eq!((failed.status.as_str(), failed.reason.as_deref()), ("failed", Some("no")));
        assert_eq!(SourceStatus::Ended.word(), "ended");
    }
}
