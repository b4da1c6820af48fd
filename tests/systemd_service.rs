//! The systemd integration: the unit and its sysusers/tmpfiles companions as systemd's own tools
//! read them, and the notification protocol as the daemon speaks it on a `NOTIFY_SOCKET` the
//! test listens on (systemd itself cannot run as the service manager here).

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::bundle::test_bundle;
use common::mosquitto::Mosquitto;

fn systemd_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd").join(name)
}

/// The unit with `ExecStart` pointing at the binary under test, since `verify` checks that the
/// executable exists.
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(systemd_file("edgesight.service")).expect("unit file");
    assert!(text.contains("ExecStart=/usr/bin/edgesight run"), "the packaged binary path");
    let text = text.replace("/usr/bin/edgesight", env!("CARGO_BIN_EXE_edgesight"));
    let path = dir.join("edgesight.service");
    std::fs::write(&path, text).expect("unit written");
    path
}

#[test]
fn systemd_analyze_verify_passes_without_a_single_warning() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = unit_for_this_build(dir.path());
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze is installed (package systemd)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "verify failed: {stderr}");
    // verify exits 0 on unknown keys and unparsable values; it only warns about them.
    let about_us: Vec<&str> = stderr.lines().filter(|line| line.contains("edgesight")).collect();
    assert!(about_us.is_empty(), "warnings about the unit: {about_us:#?}");
}

#[test]
fn the_verifier_would_catch_a_broken_unit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = unit_for_this_build(dir.path());
    let text = std::fs::read_to_string(&unit).unwrap().replace("Restart=on-failure", "Restart=x");
    std::fs::write(&unit, text).unwrap();
    let output = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&unit).output();
    let stderr = String::from_utf8_lossy(&output.expect("systemd-analyze runs").stderr).to_string();
    assert!(stderr.contains("edgesight.service"), "a bad value is reported: {stderr}");
}

#[test]
fn the_hardening_keeps_the_exposure_level_low() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = unit_for_this_build(dir.path());
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let level = text
        .lines()
        .find_map(|line| line.split("Overall exposure level for edgesight.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    assert!(level <= 2.5, "exposure level {level} (systemd calls ≤ 2.5 OK)\n{text}");
}

#[test]
fn sysusers_and_tmpfiles_make_the_account_and_the_state_directories() {
    let root = tempfile::tempdir().expect("temp root");
    let etc = root.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(etc.join("group"), "root:x:0:\nvideo:x:44:\n").unwrap();

    let sysusers = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(systemd_file("edgesight.sysusers"))
        .output()
        .expect("systemd-sysusers runs");
    assert!(sysusers.status.success(), "{}", String::from_utf8_lossy(&sysusers.stderr));
    let passwd = std::fs::read_to_string(etc.join("passwd")).unwrap();
    let user = passwd.lines().find(|line| line.starts_with("edgesight:")).expect("user made");
    let fields: Vec<&str> = user.split(':').collect();
    assert_eq!(fields[5], "/var/lib/edgesight", "home is the state directory");
    assert!(fields[6].ends_with("nologin"), "no login shell: {user}");
    let uid: u32 = fields[2].parse().unwrap();
    let group = std::fs::read_to_string(etc.join("group")).unwrap();
    assert!(group.lines().any(|line| line == "video:x:44:edgesight"), "in video: {group}");

    let tmpfiles = Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(systemd_file("edgesight.tmpfiles"))
        .output()
        .expect("systemd-tmpfiles runs");
    assert!(tmpfiles.status.success(), "{}", String::from_utf8_lossy(&tmpfiles.stderr));
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for dir in ["var/lib/edgesight", "var/lib/edgesight/models", "var/lib/edgesight/spool"] {
        let metadata = std::fs::metadata(root.path().join(dir)).expect(dir);
        assert!(metadata.is_dir());
        assert_eq!(metadata.uid(), uid, "{dir} belongs to edgesight");
        assert_eq!(metadata.permissions().mode() & 0o777, 0o750, "{dir}");
    }
}

/// Datagrams the daemon sent to our notification socket, in order.
struct NotifySocket {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        let socket = UnixDatagram::bind(path).expect("notify socket");
        socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        NotifySocket { socket, seen: Vec::new() }
    }

    /// Reads until a datagram contains `needle`, or fails after `timeout`.
    fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0u8; 4096];
        loop {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within {timeout:?}: {:#?}",
                self.seen
            );
            if let Ok(length) = self.socket.recv(&mut buffer) {
                let text = String::from_utf8_lossy(&buffer[..length]).into_owned();
                self.seen.push(text.clone());
                if text.contains(needle) {
                    return text;
                }
            }
        }
    }
}

#[test]
fn tells_systemd_ready_feeds_the_watchdog_and_says_stopping() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("edgesight.toml");
    std::fs::write(
        &config,
        format!(
            "device_id = \"notify\"\n[model]\npath = \"{}\"\nthreads = 1\n[mqtt]\nport = {}\n\
             [[streams]]\nname = \"live\"\nkind = \"test\"\npattern = \"ball\"\nfps = 2.0\n",
            test_bundle().display(),
            broker.port
        ),
    )
    .unwrap();
    let socket_path = dir.path().join("notify.sock");
    let mut notify = NotifySocket::bind(&socket_path);
    let child = Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon starts");
    let guard = KillOnDrop(Some(child));

    let first = notify.wait_for("STATUS=", Duration::from_secs(60));
    assert!(first.contains("starting"), "the first status says it is starting: {first}");
    let ready = notify.wait_for("READY=1", Duration::from_secs(120));
    assert!(ready.contains("STATUS=running"), "{ready}");
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5));
    notify.wait_for("WATCHDOG=1", Duration::from_secs(5));
    let status = notify.wait_for("STATUS=running:", Duration::from_secs(5));
    assert!(status.contains("streams online"), "{status}");

    let pid = guard.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let stopping = notify.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(stopping.contains("STATUS=stopping"), "{stopping}");
    let mut child = guard.disarm();
    let status = child.wait().expect("daemon exits");
    assert!(status.success(), "exit after SIGTERM: {status}");
    let ready_at = notify.seen.iter().position(|text| text.contains("READY=1"));
    let stopping_at = notify.seen.iter().position(|text| text.contains("STOPPING=1"));
    assert!(ready_at < stopping_at, "READY before STOPPING: {:#?}", notify.seen);
}

/// Kills the daemon when a test fails before it stopped it.
struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, std::process::Child::id)
    }

    fn disarm(mut self) -> std::process::Child {
        self.0.take().expect("armed")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
