//! The in-flight window: QoS ≥ 1 publishes handed to the MQTT client and not yet acknowledged,
//! oldest first, so that a lost connection can put each one back where it belongs.
//!
//! MQTT 3.1.1 (4.6) has the broker acknowledge QoS 1 publishes in the order it received them
//! (and complete QoS 2 ones in order too), and the publisher hands publishes over on one
//! connection in one order, so every acknowledgement the driver forwards (one whose packet id
//! was written on this connection) retires the oldest flight. When the connection is lost the
//! window is emptied at once: spooled records go back to the spool (which rewinds), live
//! messages are written to the spool, and a status publish is simply dropped (the next
//! connection announces `online` anew). The window is bounded so that the client's request
//! channel can never fill. The struct does no I/O.

use std::collections::VecDeque;

/// One publish in flight.
#[derive(Debug, Clone, PartialEq)]
pub enum Flight<M> {
    /// The retained `online`/`offline` status.
    Status,
    /// A message handed over straight from the engine.
    Live(M),
    /// A record replayed from the spool, by its spool number.
    Spooled(u64),
}

/// What was in flight when the connection was lost, oldest first.
#[derive(Debug, Default, PartialEq)]
pub struct Lost<M> {
    /// Live messages: they must go to the spool to be sent again.
    pub live: Vec<M>,
    /// Spooled records: still in the spool, which rewinds to them.
    pub spooled: u64,
    /// Status publishes, not worth repeating.
    pub status: u64,
}

/// Publishes handed over and not yet acknowledged, with life-long counts.
#[derive(Debug)]
pub struct InFlight<M> {
    flights: VecDeque<Flight<M>>,
    capacity: usize,
    handed: u64,
    acknowledged: u64,
}

impl<M> InFlight<M> {
    /// A window of at most `capacity` flights (at least 1).
    pub fn new(capacity: usize) -> InFlight<M> {
        InFlight { flights: VecDeque::new(), capacity: capacity.max(1), handed: 0, acknowledged: 0 }
    }

    /// True while another publish may be handed over.
    pub fn has_room(&self) -> bool {
        self.flights.len() < self.capacity
    }

    /// A QoS ≥ 1 publish was handed to the client.
    pub fn handed(&mut self, flight: Flight<M>) {
        self.handed += 1;
        self.flights.push_back(flight);
    }

    /// The broker acknowledged the oldest flight; returns it (None for a stray ack).
    pub fn acknowledged(&mut self) -> Option<Flight<M>> {
        let flight = self.flights.pop_front()?;
        self.acknowledged += 1;
        Some(flight)
    }

    /// The connection was lost: empties the window.
    pub fn lost_connection(&mut self) -> Lost<M> {
        let mut lost = Lost { live: Vec::new(), spooled: 0, status: 0 };
        for flight in self.flights.drain(..) {
            match flight {
                Flight::Status => lost.status += 1,
                Flight::Live(message) => lost.live.push(message),
                Flight::Spooled(_) => lost.spooled += 1,
            }
        }
        lost
    }

    pub fn is_empty(&self) -> bool {
        self.flights.is_empty()
    }

    pub fn len(&self) -> usize {
        self.flights.len()
    }

    /// QoS ≥ 1 publishes handed over in the publisher's life, repeats included.
    pub fn handed_count(&self) -> u64 {
        self.handed
    }

    /// Acknowledgements received in the publisher's life.
    pub fn acknowledged_count(&self) -> u64 {
        self.acknowledged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_retire_flights_oldest_first() {
        let mut window = InFlight::new(4);
        window.handed(Flight::Status);
        window.handed(Flight::Spooled(7));
        window.handed(Flight::Live("a"));
        assert_eq!(window.acknowledged(), Some(Flight::Status));
        assert_eq!(window.acknowledged(), Some(Flight::Spooled(7)));
        assert_eq!(window.len(), 1);
        assert_eq!(window.acknowledged(), Some(Flight::Live("a")));
        assert_eq!(window.acknowledged(), None);
        assert_eq!((window.handed_count(), window.acknowledged_count()), (3, 3));
    }

    #[test]
    fn is_bounded() {
        let mut window = InFlight::new(2);
        window.handed(Flight::Live(1));
        assert!(window.has_room());
        window.handed(Flight::Live(2));
        assert!(!window.has_room());
        window.acknowledged();
        assert!(window.has_room());
    }

    #[test]
    fn a_lost_connection_returns_live_messages_in_order_and_counts_the_rest() {
        let mut window = InFlight::new(8);
        window.handed(Flight::Spooled(1));
        window.handed(Flight::Spooled(2));
        window.handed(Flight::Status);
        window.handed(Flight::Live("x"));
        window.handed(Flight::Live("y"));
        window.acknowledged();
        let lost = window.lost_connection();
        assert_eq!(lost, Lost { live: vec!["x", "y"], spooled: 1, status: 1 });
        assert!(window.is_empty());
    }
}
