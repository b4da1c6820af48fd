//! The embedded MQTT broker, for boxes (and demos) that have no broker of their own.
//!
//! rumqttd runs in-process: its router and its server each get their own thread with their own
//! single-threaded tokio runtime, apart from the daemon's runtime. It listens on 127.0.0.1 only,
//! so an embedded broker is never reachable from the network. rumqttd reports a failed bind
//! only in its log, so [`start_embedded`] binds the port itself first (turning "address in use"
//! into an error that names the port) and then waits until the port accepts connections.
//! rumqttd logs through `tracing` (target `rumqttd`), so its output follows the daemon's log
//! filter; it logs every accepted connection at INFO.
//!
//! Which broker to use is decided by [`should_start`] from `mqtt.embedded`, the host and a
//! probe of the port; [`resolve_broker`] wires that to the I/O.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use tracing::{error, info, warn};

use super::PublishError;
use crate::config::{Embedded, MqttSettings};

/// How long [`start_embedded`] waits for the broker to accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`resolve_broker`] waits for a TCP answer when probing for an existing broker.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// A running embedded broker.
///
/// rumqttd 0.20 has no way to stop a broker, so its threads run until the process exits;
/// dropping this handle does not free the port. One embedded broker per process is the
/// intended use.
#[derive(Debug)]
pub struct EmbeddedBroker {
    port: u16,
    thread: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// False once the broker thread has ended (it only ends on an error, which it logged).
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }
}

/// Starts an MQTT 3.1.1 broker on 127.0.0.1:`port` and returns once it accepts connections,
/// or within 5 s with an error naming the port. Blocks; call it from `spawn_blocking` in async
/// code. Anonymous clients are accepted, which is why it listens on loopback only.
pub fn start_embedded(port: u16) -> Result<EmbeddedBroker, PublishError> {
    if port == 0 {
        return Err(PublishError::BrokerStart {
            port,
            reason: "port 0 is not a fixed port".into(),
        });
    }
    let address = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    // Our own bind makes "in use" an error here; rumqttd would only log it on its thread.
    drop(TcpListener::bind(address).map_err(|source| PublishError::BrokerPort { port, source })?);

    let config = broker_config(address);
    let thread = std::thread::Builder::new()
        .name("edgesight-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(error) = broker.start() {
                error!(port, error = %error, "embedded MQTT broker stopped");
            }
        })
        .map_err(|error| PublishError::BrokerStart { port, reason: error.to_string() })?;

    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if thread.is_finished() {
            // rumqttd's server thread ends at once when its bind fails (another process took
            // the port between our check and its bind); its own log says why.
            return Err(PublishError::BrokerStart {
                port,
                reason: "the broker thread ended; see the rumqttd log lines".into(),
            });
        }
        if port_open("127.0.0.1", port, Duration::from_millis(200)) {
            info!(port, "embedded MQTT broker listening on 127.0.0.1");
            return Ok(EmbeddedBroker { port, thread });
        }
        if Instant::now() >= deadline {
            return Err(PublishError::BrokerStart {
                port,
                reason: format!("no connection accepted within {} s", STARTUP_TIMEOUT.as_secs()),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// rumqttd's settings: one MQTT 3.1.1 server on `address`, no console, no metrics, no TLS,
/// and in-memory logs sized for an edge box (at most 4 × 1 MiB per topic).
fn broker_config(address: SocketAddr) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: 256 * 1024,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "edgesight-v4".into(),
        listen: address,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let router = RouterConfig {
        max_connections: 1000,
        max_outgoing_packet_count: 200,
        max_segment_size: 1024 * 1024,
        max_segment_count: 4,
        ..RouterConfig::default()
    };
    Config { router, v4: Some(HashMap::from([("1".to_string(), server)])), ..Config::default() }
}

/// True when something at `host:port` accepts a TCP connection within `timeout` (per
/// address the host resolves to). A host that does not resolve gives false. Blocks.
pub fn port_open(host: &str, port: u16, timeout: Duration) -> bool {
    let Ok(addresses) = (host, port).to_socket_addrs() else {
        return false;
    };
    addresses.into_iter().any(|address| TcpStream::connect_timeout(&address, timeout).is_ok())
}

/// True for `localhost` and IPv4 loopback addresses: the hosts an embedded broker on
/// 127.0.0.1 can stand in for. IPv6 `::1` is not, since the broker does not listen there.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim();
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    matches!(host.parse::<IpAddr>(), Ok(IpAddr::V4(address)) if address.is_loopback())
}

/// The `mqtt.embedded` decision: `never` → no; `always` → yes; `auto` → only for a loopback
/// host where nothing listens yet. `listening` is only asked for `auto` with a loopback host.
pub fn should_start(mode: Embedded, host: &str, listening: impl FnOnce() -> bool) -> bool {
    match mode {
        Embedded::Never => false,
        Embedded::Always => true,
        Embedded::Auto => is_loopback_host(host) && !listening(),
    }
}

/// Starts the embedded broker when `settings.embedded` asks for it (see [`should_start`]);
/// None means the configured broker is used as it is.
pub async fn resolve_broker(
    settings: &MqttSettings,
) -> Result<Option<EmbeddedBroker>, PublishError> {
    let host = settings.host.clone();
    let port = settings.port;
    let mode = settings.embedded;
    let start = tokio::task::spawn_blocking(move || {
        if !should_start(mode, &host, || port_open(&host, port, PROBE_TIMEOUT)) {
            return Ok(None);
        }
        if mode == Embedded::Always && !is_loopback_host(&host) {
            warn!(
                host = %host,
                port,
                "mqtt.embedded = always starts a broker on 127.0.0.1, but mqtt.host is elsewhere"
            );
        }
        start_embedded(port).map(Some)
    });
    start.await.map_err(|source| PublishError::Task { task: "embedded broker start", source })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_loopback_hosts() {
        for host in ["localhost", "LOCALHOST", "127.0.0.1", "127.0.1.1"] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["::1", "10.0.0.1", "broker.local", ""] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn never_and_always_ignore_the_probe() {
        let probe = || panic!("must not probe");
        assert!(!should_start(Embedded::Never, "127.0.0.1", probe));
        assert!(should_start(Embedded::Always, "broker.local", probe));
    }

    #[test]
    fn auto_starts_only_for_a_silent_loopback_port() {
        assert!(should_start(Embedded::Auto, "localhost", || false));
        assert!(!should_start(Embedded::Auto, "localhost", || true));
        assert!(!should_start(Embedded::Auto, "10.1.2.3", || panic!("must not probe")));
    }

    #[test]
    fn refuses_port_zero() {
        let error = start_embedded(0).err().map(|error| error.to_string());
        assert!(error.is_some_and(|error| error.contains("127.0.0.1:0")));
    }

    #[test]
    fn config_listens_on_loopback_only() {
        let config = broker_config(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 18830));
        let listen: Vec<SocketAddr> =
            config.v4.iter().flat_map(|servers| servers.values().map(|s| s.listen)).collect();
        assert_eq!(listen, [SocketAddr::from(([127, 0, 0, 1], 18830))]);
        assert!(config.v5.is_none() && config.ws.is_none() && config.console.is_none());
        assert!(config.prometheus.is_none());
    }
}
