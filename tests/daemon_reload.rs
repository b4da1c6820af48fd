//! SIGHUP through the real daemon: streams are added and removed without touching the others,
//! a new model bundle is swapped in while sequence numbers go on, and a broken config file or
//! bundle is refused with a clear log line while everything keeps running.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::bundle::test_bundle;
use common::mosquitto::Mosquitto;
use common::synth_bundle;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

/// Every classification seen: stream → (seq, model checksum, run id), in arrival order.
type Seen = Arc<Mutex<BTreeMap<String, Vec<(u64, String, String)>>>>;

fn subscribe(port: u16) -> Seen {
    let seen: Seen = Arc::default();
    let mut options = MqttOptions::new("reload-watcher", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = Client::new(options, 100);
    client.subscribe("test/reload/+/classification", QoS::AtLeastOnce).expect("subscribe");
    let sink = Arc::clone(&seen);
    std::thread::spawn(move || {
        let _client = client;
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let Ok(payload) = serde_json::from_slice::<Value>(&publish.payload) else {
                        continue;
                    };
                    let stream = payload["stream"].as_str().unwrap_or_default().to_string();
                    let entry = (
                        payload["seq"].as_u64().unwrap_or(u64::MAX),
                        payload["model"]["checksum"].as_str().unwrap_or_default().to_string(),
                        payload["run_id"].as_str().unwrap_or_default().to_string(),
                    );
                    sink.lock().unwrap().entry(stream).or_default().push(entry);
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    seen
}

fn write_config(path: &Path, port: u16, model: &Path, streams: &[&str], extra: &str) {
    let mut text = format!(
        "device_id = \"reload\"\n{extra}\n[model]\npath = \"{}\"\nthreads = 1\n\
         [mqtt]\nport = {port}\nprefix = \"test\"\nspool_dir = \"{}\"\n",
        model.display(),
        path.with_extension("spool").display()
    );
    for name in streams {
        text.push_str(&format!(
            "[[streams]]\nname = \"{name}\"\nkind = \"test\"\npattern = \"ball\"\nfps = 4.0\n"
        ));
    }
    std::fs::write(path, text).expect("config written");
}

fn count(seen: &Seen, stream: &str) -> usize {
    seen.lock().unwrap().get(stream).map_or(0, Vec::len)
}

/// Waits until `check` holds, polling; panics with `what` after `timeout`.
fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn hangup(child: &Child) {
    let status = Command::new("kill").args(["-HUP", &child.id().to_string()]).status();
    assert!(status.is_ok_and(|status| status.success()), "SIGHUP sent");
}

#[test]
fn sighup_adds_streams_swaps_the_model_and_refuses_what_is_broken() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("edgesight.toml");
    let first_model = test_bundle();
    let second_model = synth_bundle(7, 64);
    write_config(&config, broker.port, &first_model, &["a"], "");
    let seen = subscribe(broker.port);

    let mut child = Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon starts");
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let lines = BufReader::new(child.stderr.take().expect("stderr piped"));
    let log_sink = Arc::clone(&log);
    std::thread::spawn(move || {
        for line in lines.lines().map_while(Result::ok) {
            log_sink.lock().unwrap().push(line);
        }
    });
    let logged = |needle: &str| log.lock().unwrap().iter().any(|line| line.contains(needle));

    wait_until("stream a", Duration::from_secs(60), || count(&seen, "a") >= 3);

    // 1. A second stream and a new model.
    write_config(&config, broker.port, &second_model, &["a", "b"], "");
    hangup(&child);
    wait_until("stream b after the reload", Duration::from_secs(60), || count(&seen, "b") >= 3);
    wait_until("the new model on stream a", Duration::from_secs(30), || {
        let seen = seen.lock().unwrap();
        let checksums: Vec<&str> = seen["a"].iter().map(|(_, sum, _)| sum.as_str()).collect();
        checksums.first() != checksums.last()
    });
    assert!(logged("configuration reloaded"), "the reload is logged");

    // 2. A config file with a typo: refused, nothing changes (b keeps running).
    write_config(&config, broker.port, &second_model, &["a"], "colour = \"blue\"");
    hangup(&child);
    wait_until("the refusal in the log", Duration::from_secs(20), || {
        logged("reload refused") && logged("colour")
    });
    let b_before = count(&seen, "b");
    wait_until("stream b still running", Duration::from_secs(20), || {
        count(&seen, "b") >= b_before + 3
    });

    // 3. A bundle that does not exist: refused, the running model stays.
    let missing = dir.path().join("no-such-bundle");
    write_config(&config, broker.port, &missing, &["a"], "");
    hangup(&child);
    wait_until("the refused bundle in the log", Duration::from_secs(20), || {
        logged("no-such-bundle")
    });
    let b_before = count(&seen, "b");
    wait_until("stream b after the bad bundle", Duration::from_secs(20), || {
        count(&seen, "b") >= b_before + 2
    });

    // 4. Stream b removed for real.
    write_config(&config, broker.port, &second_model, &["a"], "");
    hangup(&child);
    wait_until("b stopped", Duration::from_secs(20), || logged("stopping for the reload"));
    std::thread::sleep(Duration::from_secs(2));
    let b_after = count(&seen, "b");
    let a_after = count(&seen, "a");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&seen, "b"), b_after, "no classifications from a removed stream");
    assert!(count(&seen, "a") > a_after, "stream a goes on");

    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().is_ok());
    let status = child.wait().expect("daemon exits");
    assert!(status.success(), "exit after SIGTERM: {status}");

    // Stream a never restarted: one run id, sequence numbers without a gap or a repeat.
    let seen = seen.lock().unwrap();
    let a = &seen["a"];
    let seqs: Vec<u64> = a.iter().map(|(seq, _, _)| *seq).collect();
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "a's seq goes on");
    let runs: std::collections::BTreeSet<&str> = a.iter().map(|(_, _, run)| run.as_str()).collect();
    assert_eq!(runs.len(), 1, "one run id");
    let models: std::collections::BTreeSet<&str> =
        a.iter().map(|(_, sum, _)| sum.as_str()).collect();
    assert_eq!(models.len(), 2, "two models over the run: {models:?}");
}
