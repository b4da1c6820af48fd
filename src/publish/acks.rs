//! Bookkeeping of QoS ≥ 1 publishes, so that shutdown can wait until the broker has every
//! message, and report how many it never acknowledged.
//!
//! The MQTT client reports three things, in its own order: a publish handed to it, a publish
//! written to the network with its packet id, and a PubAck (QoS 1) or PubComp (QoS 2) for a
//! packet id. Counting hand-overs against acknowledgements (not network writes) keeps the count
//! right when the client retransmits after a reconnect, and when it silently drops requests
//! because the broker started a fresh session. Packet ids are only used to ignore duplicate or
//! stray acknowledgements and to see what a fresh session threw away. The struct does no I/O.

use std::collections::HashSet;

/// Counts of what was handed to the MQTT client and what the broker acknowledged.
#[derive(Debug, Default, Clone)]
pub struct AckTracker {
    published: u64,
    expected: u64,
    acknowledged: u64,
    in_flight: HashSet<u16>,
    lost_with_session: u64,
}

impl AckTracker {
    pub fn new() -> AckTracker {
        AckTracker::default()
    }

    /// A publish was handed to the client; `needs_ack` is true for QoS 1 and 2.
    pub fn handed(&mut self, needs_ack: bool) {
        self.published += 1;
        if needs_ack {
            self.expected += 1;
        }
    }

    /// The client wrote a publish with packet id `pkid` (0 for QoS 0, which is ignored). A
    /// retransmission of a packet id still in flight changes nothing.
    pub fn sent(&mut self, pkid: u16) {
        if pkid != 0 {
            self.in_flight.insert(pkid);
        }
    }

    /// The broker acknowledged `pkid` (PubAck or PubComp). Returns false for an id that was not
    /// in flight (a duplicate or stray acknowledgement), which is not counted.
    pub fn acknowledged(&mut self, pkid: u16) -> bool {
        let known = self.in_flight.remove(&pkid);
        if known {
            self.acknowledged += 1;
        }
        known
    }

    /// A connection was accepted. Without a session present the client discards what was in
    /// flight, so those publishes will never be acknowledged; returns how many that was.
    pub fn connected(&mut self, session_present: bool) -> u64 {
        if session_present {
            return 0;
        }
        let lost = self.in_flight.len() as u64;
        self.in_flight.clear();
        self.lost_with_session += lost;
        lost
    }

    /// Every publish handed to the client, any QoS.
    pub fn published(&self) -> u64 {
        self.published
    }

    /// QoS ≥ 1 publishes the broker acknowledged.
    pub fn acknowledged_count(&self) -> u64 {
        self.acknowledged
    }

    /// QoS ≥ 1 publishes handed over and not (yet) acknowledged.
    pub fn unacknowledged(&self) -> u64 {
        self.expected.saturating_sub(self.acknowledged)
    }

    /// Publishes in flight when the broker started a fresh session (they are in
    /// [`Self::unacknowledged`] too).
    pub fn lost_with_session(&self) -> u64 {
        self.lost_with_session
    }

    /// True when nothing handed over is waiting for an acknowledgement.
    pub fn settled(&self) -> bool {
        self.unacknowledged() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settles_when_every_qos1_publish_is_acknowledged() {
        let mut tracker = AckTracker::new();
        tracker.handed(true);
        tracker.handed(true);
        tracker.handed(false);
        tracker.sent(1);
        tracker.sent(2);
        tracker.sent(0);
        assert!(!tracker.settled());
        assert!(tracker.acknowledged(1));
        assert_eq!(tracker.unacknowledged(), 1);
        assert!(tracker.acknowledged(2));
        assert!(tracker.settled());
        assert_eq!(tracker.published(), 3);
        assert_eq!(tracker.acknowledged_count(), 2);
    }

    #[test]
    fn ignores_duplicate_and_stray_acknowledgements() {
        let mut tracker = AckTracker::new();
        tracker.handed(true);
        tracker.handed(true);
        tracker.sent(7);
        assert!(tracker.acknowledged(7));
        assert!(!tracker.acknowledged(7));
        assert!(!tracker.acknowledged(9));
        assert_eq!(tracker.unacknowledged(), 1);
    }

    #[test]
    fn retransmission_after_a_resumed_session_is_counted_once() {
        let mut tracker = AckTracker::new();
        tracker.handed(true);
        tracker.sent(3);
        assert_eq!(tracker.connected(true), 0);
        tracker.sent(3);
        assert!(tracker.acknowledged(3));
        assert!(tracker.settled());
    }

    #[test]
    fn a_fresh_session_loses_what_was_in_flight() {
        let mut tracker = AckTracker::new();
        for pkid in 1..=3 {
            tracker.handed(true);
            tracker.sent(pkid);
        }
        assert!(tracker.acknowledged(1));
        assert_eq!(tracker.connected(false), 2);
        assert_eq!(tracker.lost_with_session(), 2);
        assert_eq!(tracker.unacknowledged(), 2);
        // The client reuses packet ids in the new session; a new publish is tracked normally.
        tracker.handed(true);
        tracker.sent(2);
        assert!(tracker.acknowledged(2));
        assert_eq!(tracker.unacknowledged(), 2);
    }

    #[test]
    fn a_publish_dropped_before_reaching_the_network_stays_unacknowledged() {
        let mut tracker = AckTracker::new();
        tracker.handed(true);
        assert_eq!(tracker.connected(false), 0);
        assert_eq!(tracker.unacknowledged(), 1);
    }
}
