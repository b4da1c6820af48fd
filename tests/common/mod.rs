//! Helpers shared by the integration tests: a private Mosquitto ([`mosquitto`]), an MQTT
//! subscriber that records what arrives (so a test can assert on topics, payloads and the
//! retain flag), and synthetic model bundles.
//!
//! A ResNet-50 bundle is about 100 MB and takes a few seconds to write, so each test binary
//! writes it once (into a directory under the system temp dir keyed by seed and size; the
//! writer replaces it atomically) and the tests share it read-only. Tests that damage a bundle
//! work on a copy made of hard links, except for the file they damage.

#![allow(dead_code)]

pub mod bundle;
pub mod model;
pub mod mosquitto;
pub mod publish;
pub mod watch;

#[allow(unused_imports)]
pub use model::*;

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A subscriber on 127.0.0.1:`port`; collects every publish it receives.
pub struct Subscriber {
    client: AsyncClient,
    received: mpsc::UnboundedReceiver<Publish>,
    task: JoinHandle<()>,
}

impl Subscriber {
    /// Connects with a fresh clean session, subscribes to `filter` at QoS 1 and returns once
    /// the broker confirmed the subscription (retained messages follow right after).
    pub async fn connect(port: u16, client_id: &str, filter: &str) -> Subscriber {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_max_packet_size(1024 * 1024, 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        client.subscribe(filter, QoS::AtLeastOnce).await.expect("queue SUBSCRIBE");
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let (sender, received) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut subscribed_tx = Some(subscribed_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let _ = sender.send(publish);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), subscribed_rx)
            .await
            .expect("SUBACK within 5 s")
            .expect("subscriber task alive");
        Subscriber { client, received, task }
    }

    /// The next publish, or None when none arrives `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Publish> {
        tokio::time::timeout(within, self.received.recv()).await.ok().flatten()
    }

    /// The next publish on `topic` (others are skipped), or a panic naming the topic.
    pub async fn expect(&mut self, topic: &str, within: Duration) -> Publish {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(publish) if publish.topic == topic => return publish,
                Some(_) => continue,
                None => panic!("nothing on {topic} within {within:?}"),
            }
        }
    }

    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}
