//! A private Mosquitto for one test: a free port on 127.0.0.1, a config file in a temporary
//! directory, the process killed when the handle drops. Tests never touch a broker they did
//! not start (in particular not the system one on 1883).
//!
//! [`TestPki`] makes a throw-away CA with server and client certificates (with the `openssl`
//! command, into a temporary directory) for [`Mosquitto::start_tls`], whose TLS listener sits
//! next to a plain one for the test's own subscriber.
//!
//! Mosquitto must be installed (Debian: `mosquitto`, `mosquitto-clients`); without it the
//! tests fail with a message that says so, rather than skipping silently.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A port on 127.0.0.1 that nothing listened on a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local address").port()
}

/// True once 127.0.0.1:`port` accepts a TCP connection, polling until `within` passes.
pub fn wait_for_port(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let address = ([127, 0, 0, 1], port).into();
        if TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// A running Mosquitto on 127.0.0.1.
pub struct Mosquitto {
    pub port: u16,
    /// The TLS listener's port, for [`Mosquitto::start_tls`].
    pub tls_port: Option<u16>,
    dir: TempDir,
    config: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// Anonymous access allowed.
    pub fn start() -> Mosquitto {
        Mosquitto::launch(None, None)
    }

    /// Only `username` with `password` may connect.
    pub fn start_with_password(username: &str, password: &str) -> Mosquitto {
        Mosquitto::launch(Some((username, password)), None)
    }

    /// A plain listener on `port` plus a TLS one on `tls_port` with `pki`'s server certificate;
    /// `require_client_cert` makes the TLS listener ask for a client certificate of `pki`'s CA.
    pub fn start_tls(pki: &TestPki, require_client_cert: bool) -> Mosquitto {
        Mosquitto::launch(None, Some((pki, require_client_cert)))
    }

    fn launch(credentials: Option<(&str, &str)>, tls: Option<(&TestPki, bool)>) -> Mosquitto {
        let binary = find_binary("mosquitto").unwrap_or_else(|| {
            panic!(
                "the `mosquitto` binary was not found on PATH or in /usr/sbin; these tests need \
                 a real broker: apt-get install mosquitto mosquitto-clients"
            )
        });
        let dir = tempfile::tempdir().expect("temporary directory");
        // Mosquitto started as root drops to the `mosquitto` user; it must still read our files.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let port = free_port();
        let mut config = format!("listener {port} 127.0.0.1\npersistence false\nlog_dest stderr\n");
        match credentials {
            None => config.push_str("allow_anonymous true\n"),
            Some((username, password)) => {
                let file = dir.path().join("passwords");
                write_password_file(&file, username, password);
                config.push_str(&format!(
                    "allow_anonymous false\npassword_file {}\n",
                    file.display()
                ));
            }
        }
        let mut tls_port = None;
        if let Some((pki, require)) = tls {
            let port = free_port();
            tls_port = Some(port);
            config.push_str(&format!(
                "listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
                 require_certificate {require}\n",
                pki.ca.display(),
                pki.server_cert.display(),
                pki.server_key.display()
            ));
        }
        let config_path = dir.path().join("mosquitto.conf");
        fs::write(&config_path, config).expect("write mosquitto.conf");
        fs::set_permissions(&config_path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut broker = Mosquitto { port, tls_port, dir, config: config_path, child: None };
        broker.spawn(&binary);
        broker
    }

    fn spawn(&mut self, binary: &Path) {
        let log = fs::File::create(self.dir.path().join("mosquitto.log")).expect("log file");
        let child = Command::new(binary)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run {}: {error}", binary.display()));
        self.child = Some(child);
        let tls_ready =
            self.tls_port.is_none_or(|port| wait_for_port(port, Duration::from_secs(5)));
        if !wait_for_port(self.port, Duration::from_secs(5)) || !tls_ready {
            panic!(
                "mosquitto did not listen on 127.0.0.1:{} within 5 s; its log:\n{}",
                self.port,
                self.log()
            );
        }
    }

    /// Kills the broker (SIGKILL: no goodbye to clients) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same config (retained messages are gone).
    pub fn restart(&mut self) {
        self.kill();
        let binary = find_binary("mosquitto").expect("mosquitto binary");
        self.spawn(&binary);
    }

    /// Restarts it so that only `username` with `password` may connect from now on.
    pub fn restart_with_password(&mut self, username: &str, password: &str) {
        let file = self.dir.path().join("passwords");
        write_password_file(&file, username, password);
        let config = fs::read_to_string(&self.config).expect("read mosquitto.conf").replace(
            "allow_anonymous true\n",
            &format!("allow_anonymous false\npassword_file {}\n", file.display()),
        );
        fs::write(&self.config, config).expect("write mosquitto.conf");
        self.restart();
    }

    /// What Mosquitto wrote to its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn write_password_file(file: &Path, username: &str, password: &str) {
    let tool = find_binary("mosquitto_passwd")
        .unwrap_or_else(|| panic!("`mosquitto_passwd` was not found; apt-get install mosquitto"));
    let status = Command::new(&tool)
        .args(["-b", "-c"])
        .arg(file)
        .args([username, password])
        .stdout(Stdio::null())
        .status()
        .expect("run mosquitto_passwd");
    assert!(status.success(), "mosquitto_passwd failed: {status}");
    fs::set_permissions(file, fs::Permissions::from_mode(0o644)).expect("chmod");
}

/// `name` on PATH, or in /usr/sbin where Debian puts the broker (often not on a user's PATH).
fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A throw-away PKI: a CA, a server certificate for `server_name` signed by it, and a client
/// certificate signed by it. Files are PEM, keys unencrypted PKCS#8, in a temporary directory.
pub struct TestPki {
    _dir: TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// `server_name` goes into the server certificate's subjectAltName, e.g.
    /// `DNS:broker.test` or `IP:127.0.0.1`.
    pub fn new(server_name: &str) -> TestPki {
        let dir = tempfile::tempdir().expect("temporary directory");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let at = |name: &str| dir.path().join(name);
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-days",
                    "2",
                    "-subj",
                    "/CN=edgesight test CA",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
            ]
            .concat(),
            &[("-keyout", &at("ca.key")), ("-out", &at("ca.pem"))],
        );
        for (name, san, usage) in [
            ("server", server_name, "serverAuth"),
            ("client", "DNS:edgesight-client", "clientAuth"),
        ] {
            let ext = at(&format!("{name}.ext"));
            fs::write(
                &ext,
                format!(
                    "subjectAltName={san}\nbasicConstraints=CA:FALSE\n\
                         keyUsage=digitalSignature\nextendedKeyUsage={usage}\n"
                ),
            )
            .expect("write extensions");
            openssl(
                &[&["req"][..], &ec, &["-subj", &format!("/CN=edgesight {name}")]].concat(),
                &[("-keyout", &at(&format!("{name}.key"))), ("-out", &at(&format!("{name}.csr")))],
            );
            openssl(
                &["x509", "-req", "-days", "2", "-CAcreateserial"],
                &[
                    ("-in", &at(&format!("{name}.csr"))),
                    ("-CA", &at("ca.pem")),
                    ("-CAkey", &at("ca.key")),
                    ("-extfile", &ext),
                    ("-out", &at(&format!("{name}.pem"))),
                ],
            );
        }
        for entry in fs::read_dir(dir.path()).expect("list") {
            let path = entry.expect("entry").path();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        TestPki {
            ca: at("ca.pem"),
            server_cert: at("server.pem"),
            server_key: at("server.key"),
            client_cert: at("client.pem"),
            client_key: at("client.key"),
            _dir: dir,
        }
    }
}

fn openssl(args: &[&str], files: &[(&str, &Path)]) {
    let mut command = Command::new("openssl");
    command.args(args);
    for (flag, path) in files {
        command.arg(flag).arg(path);
    }
    let output = command.output().unwrap_or_else(|error| panic!("cannot run openssl: {error}"));
    assert!(
        output.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
