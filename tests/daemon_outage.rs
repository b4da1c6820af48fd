//! The daemon through broker outages: the `edgesight` binary with live test-pattern streams,
//! a real Mosquitto on 127.0.0.1 stopped for 30 s mid-run (and restarted without any session
//! or retained message, the "fresh session" case), and a subscriber of our own that reconnects
//! to the restarted broker. Every sequence number produced must arrive, in order per stream;
//! a daemon killed with SIGKILL during an outage must have its spooled messages delivered by
//! the next run. Also: a password never reaches the daemon's output, even at debug level.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::bundle::test_bundle;
use common::mosquitto::Mosquitto;
use common::watch::take_until;
use edgesight::publish::spool::Spool;
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

/// One classification as the subscriber saw it.
#[derive(Debug, Clone)]
struct Seen {
    stream: String,
    run_id: String,
    seq: u64,
    replayed: bool,
}

/// Everything the subscriber saw: classifications and the status payloads, in arrival order.
#[derive(Debug)]
enum Arrival {
    Classification(Seen),
    Status(String),
}

/// A QoS 1 subscriber that reconnects (clean session) and subscribes again after every
/// connection, since the broker it talks to forgets everything when it restarts.
fn subscriber(port: u16, filter: &str) -> (Client, mpsc::Receiver<Arrival>) {
    let mut options = MqttOptions::new(format!("outage-watcher-{port}"), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut connection) = Client::new(options, 100);
    let (tx, rx) = mpsc::channel();
    let filter = filter.to_string();
    let subscriber = client.clone();
    thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = subscriber.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let arrival = if publish.topic.ends_with("/status") {
                        Arrival::Status(String::from_utf8_lossy(&publish.payload).into_owned())
                    } else if publish.topic.ends_with("/classification") {
                        let value: Value =
                            serde_json::from_slice(&publish.payload).expect("JSON payload");
                        Arrival::Classification(Seen {
                            stream: value["stream"].as_str().unwrap_or_default().into(),
                            run_id: value["run_id"].as_str().unwrap_or_default().into(),
                            seq: value["seq"].as_u64().expect("seq"),
                            replayed: value["replayed"] == Value::Bool(true),
                        })
                    } else {
                        continue;
                    };
                    if tx.send(arrival).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    });
    (client, rx)
}

fn write_config(dir: &Path, port: u16, spool: &Path) -> PathBuf {
    let stream = |name: &str, pattern: &str| {
        format!(
            "[[streams]]\nname = \"{name}\"\nkind = \"test\"\npattern = \"{pattern}\"\n\
             width = 160\nheight = 120\nfps = 4.0\n"
        )
    };
    let text = format!(
        "device_id = \"outage\"\nlog = \"info,edgesight=debug\"\n[model]\npath = \"{model}\"\n\
         threads = 1\n[mqtt]\nport = {port}\nprefix = \"test\"\nflush_timeout_s = 5\n\
         spool_dir = \"{spool}\"\n{a}\n{b}",
        model = test_bundle().display(),
        spool = spool.display(),
        a = stream("ball", "ball"),
        b = stream("snow", "snow"),
    );
    let path = dir.join("edgesight.toml");
    std::fs::write(&path, text).expect("config written");
    path
}

fn spawn_daemon(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("daemon starts")
}

/// Sends SIGTERM and waits for a clean exit.
fn stop(mut child: Child, log: &Path) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(status.is_ok_and(|status| status.success()));
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().expect("daemon status") {
            break exit;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("daemon did not stop");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(exit.success(), "daemon exit {exit}:\n{text}");
}

fn classifications(arrivals: &[Arrival]) -> impl Iterator<Item = &Seen> {
    arrivals.iter().filter_map(|arrival| match arrival {
        Arrival::Classification(seen) => Some(seen),
        Arrival::Status(_) => None,
    })
}

/// Per (stream, run_id): the order in which sequence numbers first arrived, and how many
/// arrived again.
fn by_stream(arrivals: &[Arrival]) -> BTreeMap<(String, String), (Vec<u64>, usize)> {
    let mut streams: BTreeMap<(String, String), (Vec<u64>, usize)> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for message in classifications(arrivals) {
        let key = (message.stream.clone(), message.run_id.clone());
        let entry = streams.entry(key.clone()).or_default();
        if seen.insert((key, message.seq)) {
            entry.0.push(message.seq);
        } else {
            entry.1 += 1;
        }
    }
    streams
}

#[test]
fn a_thirty_second_outage_loses_nothing_and_a_killed_daemon_replays_its_spool() {
    let mut broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let spool = dir.path().join("spool");
    let config = write_config(dir.path(), broker.port, &spool);
    let log = dir.path().join("daemon.log");
    let (_client, rx) = subscriber(broker.port, "test/outage/#");
    thread::sleep(Duration::from_millis(500));
    let mut arrivals = Vec::new();

    // Part 1: a 30 s outage in the middle of a run.
    let daemon = spawn_daemon(&config, &log);
    take_until(&rx, &mut arrivals, Duration::from_secs(60), "first messages", |a| {
        classifications(a).count() >= 12
    });
    broker.kill();
    let outage = Instant::now();
    thread::sleep(Duration::from_secs(30));
    broker.restart();
    let before_restart = arrivals.len();
    // Caught up once live messages (not replayed) arrive again on both streams.
    take_until(&rx, &mut arrivals, Duration::from_secs(60), "catching up", |a| {
        let late: BTreeSet<&str> = classifications(&a[before_restart.min(a.len())..])
            .filter(|seen| !seen.replayed)
            .map(|seen| seen.stream.as_str())
            .collect();
        late.len() == 2
    });
    eprintln!("caught up {} s after the outage began", outage.elapsed().as_secs());
    stop(daemon, &log);
    while let Ok(arrival) = rx.recv_timeout(Duration::from_secs(2)) {
        arrivals.push(arrival);
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let streams = by_stream(&arrivals);
    assert_eq!(streams.len(), 2, "two streams, one run: {:?}", streams.keys());
    for ((stream, _), (order, repeats)) in &streams {
        let expected: Vec<u64> = (0..order.len() as u64).collect();
        assert_eq!(order, &expected, "{stream}: every seq from 0, in order\n{text}");
        assert!(order.len() > 100, "{stream}: only {} messages", order.len());
        assert!(*repeats <= 32, "{stream}: {repeats} duplicates");
        eprintln!("{stream}: {} messages, {repeats} duplicates", order.len());
    }
    let replayed = classifications(&arrivals).filter(|seen| seen.replayed).count();
    assert!(replayed >= 150, "only {replayed} replayed");
    // After the restart, the daemon's `online` came before the first replayed message.
    let after = &arrivals[before_restart..];
    let online = after.iter().position(|a| matches!(a, Arrival::Status(s) if s == "online"));
    let first_replayed =
        after.iter().position(|a| matches!(a, Arrival::Classification(seen) if seen.replayed));
    assert!(online.is_some() && online < first_replayed, "{online:?} vs {first_replayed:?}");
    assert!(matches!(arrivals.last(), Some(Arrival::Status(s)) if s == "offline"), "offline last");

    // Part 2: the daemon is killed during an outage; the next run replays its spool.
    let run_ids: BTreeSet<String> = streams.keys().map(|(_, run)| run.clone()).collect();
    arrivals.clear();
    let daemon = spawn_daemon(&config, &log);
    take_until(&rx, &mut arrivals, Duration::from_secs(60), "second run", |a| {
        classifications(a).count() >= 8
    });
    broker.kill();
    thread::sleep(Duration::from_secs(5));
    let mut daemon = daemon;
    daemon.kill().expect("SIGKILL");
    let _ = daemon.wait();
    let spooled = spooled_messages(&spool);
    assert!(spooled.len() >= 2 * 5 * 2, "only {} spooled before the kill", spooled.len());
    broker.restart();
    let killed_run = spooled.first().map(|(_, run, _)| run.clone()).expect("a run id");
    assert!(!run_ids.contains(&killed_run), "the spool holds the second run's messages");
    let daemon = spawn_daemon(&config, &log);
    let want = spooled.len();
    // Done once the whole spool is replayed and the new run has published something of its own
    // (on a loaded machine its first frame can come after the replay).
    take_until(&rx, &mut arrivals, Duration::from_secs(90), "spool of the killed run", |a| {
        let replayed =
            classifications(a).filter(|seen| seen.run_id == killed_run && seen.replayed).count();
        replayed >= want && classifications(a).any(|seen| seen.run_id != killed_run)
    });
    stop(daemon, &log);
    while let Ok(arrival) = rx.recv_timeout(Duration::from_secs(2)) {
        arrivals.push(arrival);
    }
    let streams = by_stream(&arrivals);
    for ((stream, run), (order, _)) in &streams {
        if *run != killed_run {
            continue;
        }
        // Everything the killed run produced before the kill arrived: what reached the broker
        // before the outage, then the spool, without a gap.
        let expected: Vec<u64> = (0..order.len() as u64).collect();
        assert_eq!(order, &expected, "{stream} of the killed run");
        let last_spooled = spooled.iter().filter(|(s, _, _)| s == stream).map(|m| m.2).max();
        assert_eq!(order.last().copied(), last_spooled, "{stream}: up to the last spooled");
    }
    let runs: BTreeSet<&String> = streams.keys().map(|(_, run)| run).collect();
    assert_eq!(runs.len(), 2, "the killed run and the new one: {runs:?}");
}

/// (stream, run_id, seq) of every message in the spool, oldest first, read with the
/// publisher's own spool code (which also cuts a torn tail, as the daemon would).
fn spooled_messages(dir: &Path) -> Vec<(String, String, u64)> {
    let (mut spool, recovered) = Spool::open(dir, 64 << 20).expect("open the spool");
    eprintln!("spool after SIGKILL: {recovered:?}");
    let mut out = Vec::new();
    while let Some((_, record)) = spool.next_unread().expect("read the spool") {
        let value: Value = serde_json::from_slice(&record.payload).expect("JSON");
        if record.topic.ends_with("/classification") {
            assert_eq!(value["replayed"], Value::Bool(true), "spooled messages are flagged");
            out.push((
                value["stream"].as_str().unwrap_or_default().to_string(),
                value["run_id"].as_str().unwrap_or_default().to_string(),
                value["seq"].as_u64().expect("seq"),
            ));
        }
    }
    out
}

#[test]
fn a_password_never_reaches_the_log_even_at_debug_level() {
    let password = "pw-Zq8-never-logged";
    let broker = Mosquitto::start_with_password("edge", password);
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!(
        "device_id = \"secret\"\nlog = \"debug\"\n[model]\npath = \"{model}\"\nthreads = 1\n\
         [mqtt]\nport = {port}\nprefix = \"test\"\nusername = \"edge\"\npassword = \"{password}\"\n\
         spool_dir = \"{spool}\"\necho = true\n\
         [[streams]]\nname = \"few\"\nkind = \"test\"\nframes = 20\nwidth = 64\nheight = 48\n",
        model = test_bundle().display(),
        port = broker.port,
        spool = dir.path().join("spool").display(),
    );
    let config = dir.path().join("edgesight.toml");
    std::fs::write(&config, text).expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("daemon runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{}\n{stderr}", output.status);
    assert!(stderr.contains("connected to the MQTT broker"), "{stderr}");
    assert!(stderr.contains("DEBUG"), "debug logging was on");
    assert!(stdout.contains("/classification "), "messages were echoed");
    assert!(!stderr.contains(password) && !stdout.contains(password), "password leaked");

    // `config check` masks it too.
    let check = Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .args(["config", "check"])
        .arg(&config)
        .output()
        .expect("config check runs");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(!all.contains(password), "config check printed the password:\n{all}");
}
