//! Watching the daemon from outside, for tests that run it as a separate process: a blocking
//! MQTT subscriber (every publish arrives on a std channel with its arrival time and retain
//! flag), the payload schemas, and a scrape of the Prometheus endpoint.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

/// One publish as the subscriber saw it.
#[derive(Debug, Clone)]
pub struct Heard {
    pub at: Instant,
    pub topic: String,
    pub payload: String,
    pub retained: bool,
}

/// Takes items from `rx` into `into` until `done` holds; panics naming `what` when `within`
/// passes first.
pub fn take_until<T>(
    rx: &mpsc::Receiver<T>,
    into: &mut Vec<T>,
    within: Duration,
    what: &str,
    done: impl Fn(&[T]) -> bool,
) {
    let deadline = Instant::now() + within;
    while !done(into) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(item) => into.push(item),
            Err(_) => panic!("{what}: not within {within:?}; {} messages so far", into.len()),
        }
    }
}

/// Subscribes to `filter` at QoS 1 on 127.0.0.1:`port` and returns once the broker confirmed
/// the subscription; publishes arrive until the connection drops. Keep the client alive for
/// as long as messages are wanted.
pub fn watch(port: u16, filter: &str, client_id: &str) -> (Client, mpsc::Receiver<Heard>) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = Client::new(options, 100);
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let (filter, subscriber) = (filter.to_string(), client.clone());
    thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = subscriber.subscribe(filter.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let heard = Heard {
                        at: Instant::now(),
                        topic: publish.topic.clone(),
                        payload: String::from_utf8_lossy(&publish.payload).into_owned(),
                        retained: publish.retain,
                    };
                    if tx.send(heard).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).expect("subscription acknowledged");
    (client, rx)
}

/// The JSON Schema `schema/<file>`, with formats (date-time) checked.
pub fn validator(file: &str) -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema").join(file);
    let text = std::fs::read_to_string(path).expect("schema file");
    let schema: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    jsonschema::options().should_validate_formats(true).build(&schema).expect("schema compiles")
}

/// `GET /metrics` on 127.0.0.1:`port`; the body of a 200 answer.
pub fn scrape(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200 ").then(|| body.to_string())
}
