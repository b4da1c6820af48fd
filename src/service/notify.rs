//! The systemd notification protocol: readiness, watchdog pings and human-readable status.
//!
//! Under a `Type=notify` unit systemd passes a datagram socket in `NOTIFY_SOCKET` (a path, or an
//! abstract name written with a leading `@`) and, with `WatchdogSec=`, the ping interval in
//! `WATCHDOG_USEC`. The daemon writes `KEY=value` lines to that socket: `READY=1` once streams run
//! and the publisher is up, `STATUS=…` lines an operator reads in `systemctl status`,
//! `WATCHDOG=1` pings, `RELOADING=1` around a SIGHUP reload and `STOPPING=1` at shutdown.
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing, so the daemon runs the same from
//! a terminal. The protocol is small enough that a crate would add nothing but a dependency.
//!
//! The watchdog must only be fed while the daemon is doing its job: [`WatchdogGate`] decides from
//! the engine's progress counter and queue depth, so a wedged engine (frames waiting, none
//! classified) stops the pings and systemd restarts the service, while an idle engine (every
//! camera offline) keeps them going, since a restart would not bring a camera back.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tracing::{debug, warn};

/// A connection to systemd's notification socket, or nothing when not run by systemd.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        let Some(socket) = socket.filter(|socket| !socket.is_empty()) else {
            return Notifier { target: None, watchdog: None };
        };
        let socket = socket.to_string_lossy().into_owned();
        match connect(&socket) {
            Ok(target) => {
                debug!(socket, ?watchdog, "systemd notification socket");
                Notifier { target: Some(target), watchdog }
            }
            Err(error) => {
                warn!(socket, %error, "NOTIFY_SOCKET is set but unusable; systemd is not told");
                Notifier { target: None, watchdog: None }
            }
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None, watchdog: None }
    }

    /// Whether systemd listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to ping the watchdog (half of `WatchdogSec=`), when it is on.
    pub fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog.map(|interval| interval / 2)
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// Start-up takes longer than `TimeoutStartSec=` allows (a model being generated): asks for
    /// `extra` more from now.
    pub fn extend_timeout(&self, extra: Duration) {
        self.send(&format!("EXTEND_TIMEOUT_USEC={}", extra.as_micros()));
    }

    pub fn reloading(&self, status: &str) {
        self.send(&format!("RELOADING=1\nSTATUS={}", one_line(status)));
    }

    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    fn send(&self, text: &str) {
        let Some((socket, address)) = &self.target else {
            return;
        };
        if let Err(error) = socket.send_to_addr(text.as_bytes(), address) {
            debug!(%error, text, "cannot notify systemd");
        }
    }
}

/// Opens an unbound datagram socket aimed at `path` (`@name` is an abstract address).
fn connect(path: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
    let address = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
        None if path.starts_with('/') => SocketAddr::from_pathname(path)?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither an absolute path nor an @abstract name",
            ));
        }
    };
    Ok((UnixDatagram::unbound()?, address))
}

/// The watchdog interval systemd asked for: `WATCHDOG_USEC`, when `WATCHDOG_PID` is unset or
/// names this process (a child that inherited the variables must not ping for its parent).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&usec| usec > 0)?;
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own_pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec))
}

/// Status text is one line in the protocol; newlines would start new assignments.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// Decides whether the engine deserves a watchdog ping.
///
/// The engine is healthy when its progress counter moved since the last look, or when nothing
/// waits for it. It is wedged when frames wait and the counter stands still.
#[derive(Debug, Default)]
pub struct WatchdogGate {
    last_progress: Option<u64>,
}

impl WatchdogGate {
    /// `progress`: the engine's batch counter now; `waiting`: frames queued for it now.
    pub fn healthy(&mut self, progress: u64, waiting: u64) -> bool {
        let moved = self.last_progress != Some(progress);
        self.last_progress = Some(progress);
        moved || waiting == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_interval_is_for_this_process_only() {
        assert_eq!(watchdog_interval(Some("2000000"), None, 7), Some(Duration::from_secs(2)));
        assert_eq!(watchdog_interval(Some("2000000"), Some("7"), 7), Some(Duration::from_secs(2)));
        assert_eq!(watchdog_interval(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    #[test]
    fn pings_while_progressing_or_idle_but_not_when_wedged() {
        let mut gate = WatchdogGate::default();
        assert!(gate.healthy(0, 3), "first look");
        assert!(gate.healthy(1, 3), "progress");
        assert!(!gate.healthy(1, 3), "frames wait, nothing moved");
        assert!(gate.healthy(1, 0), "idle: nothing to do");
        assert!(gate.healthy(2, 5));
    }

    #[test]
    fn status_text_stays_on_one_line() {
        assert_eq!(one_line("a\nb\r"), "a b ");
    }

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier =
            Notifier { target: Some(connect(path.to_str().unwrap()).unwrap()), watchdog: None };
        notifier.ready("running\n2 streams");
        let mut buffer = [0u8; 256];
        let length = listener.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"READY=1\nSTATUS=running 2 streams");
    }

    #[test]
    fn refuses_a_relative_socket_path() {
        assert!(connect("notify").is_err());
    }
}
