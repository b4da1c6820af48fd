//! The batched engine end to end: several streams through the daemon with the real (synthetic)
//! model, a real Mosquitto and the Prometheus endpoint, checked from the outside; plus the tract
//! backend's answers for odd batch sizes against frame-by-frame runs.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::bundle::{TEST_INPUT, corpus, test_bundle};
use common::mosquitto::{Mosquitto, free_port};
use common::watch::{scrape, validator};
use common::{relative_error, test_input};
use edgesight::model::{self, BackendOptions, Bundle};
use rumqttc::Client;
use serde_json::Value;

/// Subscribes to `filter`; every publish arrives as (topic, payload).
fn subscribe(
    port: u16,
    filter: &str,
    client_id: &str,
) -> (Client, mpsc::Receiver<(String, String)>) {
    let (client, heard) = common::watch::watch(port, filter, client_id);
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for message in heard {
            if tx.send((message.topic, message.payload)).is_err() {
                return;
            }
        }
    });
    (client, rx)
}

fn start_daemon(dir: &Path, text: &str) -> Child {
    let config = dir.join("edgesight.toml");
    std::fs::write(&config, text).expect("config written");
    Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("daemon starts")
}

/// Parses exposition text strictly: comments are `# HELP name text` or `# TYPE name kind`, and
/// every sample line is `name{labels} value` with a declared family. Returns the samples.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut families = Vec::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let (kind, name, rest) = (parts.next(), parts.next(), parts.next());
            match (kind, name, rest) {
                (Some("HELP"), Some(_), Some(_)) => {}
                (Some("TYPE"), Some(name), Some("counter" | "gauge" | "histogram")) => {
                    families.push(name.to_string())
                }
                _ => panic!("bad comment line: {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap_or_default();
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name in {line:?}"
        );
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            let inner = labels.strip_prefix('{').and_then(|l| l.strip_suffix('}'));
            let inner = inner.unwrap_or_else(|| panic!("bad labels in {line:?}"));
            for pair in inner.split("\",") {
                let (key, value) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line:?}"));
                assert!(key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line:?}");
                assert!(!value.trim_end_matches('"').contains('"'), "{line:?}");
            }
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix).filter(|f| families.iter().any(|x| x == f))
            })
            .unwrap_or(name);
        assert!(families.iter().any(|f| f == family), "undeclared family in {line:?}");
        samples.insert(series.to_string(), value);
    }
    samples
}

#[test]
fn streams_share_batches_keep_their_order_and_report_stats_and_metrics() {
    let broker = Mosquitto::start();
    let metrics_port = free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let video = corpus("vid_h264_aac_160x90.mp4");
    let mut streams = String::new();
    for (name, fps, frames) in
        [("t5", 5.0, 90), ("t10", 10.0, 90), ("t15", 15.0, 120), ("t30", 30.0, 150)]
    {
        streams.push_str(&format!(
            "[[streams]]\nname = \"{name}\"\nkind = \"test\"\npattern = \"ball\"\nfps = {fps}\n\
             frames = {frames}\nwidth = 64\nheight = 48\n\n"
        ));
    }
    streams.push_str(&format!(
        "[[streams]]\nname = \"file\"\nkind = \"file\"\npath = \"{}\"\nfps = 10.0\n",
        video.display()
    ));
    let text = format!(
        "device_id = \"batch\"\n[model]\npath = \"{model}\"\nthreads = 1\n\
         [engine]\nmax_batch = 4\nmax_wait_ms = 50\nqueue = 16\n\
         [metrics]\nstats_interval_s = 1\nlisten = \"127.0.0.1:{metrics_port}\"\n\
         [mqtt]\nport = {port}\nprefix = \"test\"\n{streams}",
        model = test_bundle().display(),
        port = broker.port,
    );
    let file_frames = edgesight::source::read_video(&video, 10.0).filter(Result::is_ok).count();
    let (_client, rx) = subscribe(broker.port, "test/batch/#", "batch-watcher");

    let mut child = start_daemon(dir.path(), &text);
    let stderr = child.stderr.take().expect("stderr piped");
    let log = thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let mut scrapes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(status) = child.try_wait().expect("daemon status") {
            break status;
        }
        assert!(Instant::now() < deadline, "daemon did not finish");
        scrapes.extend(scrape(metrics_port));
        thread::sleep(Duration::from_millis(250));
    };
    let log = log.join().unwrap_or_default();
    assert!(status.success(), "daemon exited with {status}:\n{log}");
    let mut seen = Vec::new();
    while let Ok(message) = rx.recv_timeout(Duration::from_secs(2)) {
        seen.push(message);
    }

    // Per stream: seq from 0 without gaps, in capture order, and the final state agrees.
    let classification_schema = validator("classification.schema.json");
    let mut classified = BTreeMap::new();
    for stream in ["t5", "t10", "t15", "t30", "file"] {
        let topic = format!("test/batch/{stream}/classification");
        let payloads: Vec<Value> = seen
            .iter()
            .filter(|(t, _)| *t == topic)
            .map(|(_, payload)| serde_json::from_str(payload).expect("JSON"))
            .collect();
        assert!(payloads.len() >= 3, "{stream}: {} classifications\n{log}", payloads.len());
        for (index, payload) in payloads.iter().enumerate() {
            assert_eq!(payload["seq"], index as u64, "{stream}: sequence");
            assert!(classification_schema.is_valid(payload), "{payload}");
        }
        let captured: Vec<&str> =
            payloads.iter().filter_map(|p| p["captured_at"].as_str()).collect();
        assert!(captured.windows(2).all(|w| w[0] <= w[1]), "{stream}: capture order");
        let state_topic = format!("test/batch/{stream}/state");
        let (_, last) = seen.iter().rev().find(|(t, _)| *t == state_topic).expect("state");
        let state: Value = serde_json::from_str(last).expect("state JSON");
        assert_eq!(state["status"], "ended", "{state}");
        assert_eq!(state["seq"], payloads.len() as u64 - 1, "{state}");
        assert!(state["raw_label"].is_string(), "{state}");
        classified.insert(stream, payloads.len() as u64);
    }
    assert_eq!(classified["file"], file_frames as u64, "a file stream loses nothing");

    // Stats: valid against the schema, and their totals match what was published.
    let stats_schema = validator("stats.schema.json");
    let stats: Vec<Value> = seen
        .iter()
        .filter(|(t, _)| t == "test/batch/stats")
        .map(|(_, payload)| serde_json::from_str(payload).expect("stats JSON"))
        .collect();
    assert!(stats.len() >= 2, "{} stats messages\n{log}", stats.len());
    for message in &stats {
        let errors: Vec<String> =
            stats_schema.iter_errors(message).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{errors:?}\n{message}");
    }
    let last = stats.last().expect("a last stats message");
    for (stream, count) in &classified {
        assert_eq!(last["streams"][stream]["classified"], *count, "{stream}: {last}");
    }
    let batches = last["engine"]["batches"].as_u64().unwrap_or(0);
    let frames = last["engine"]["batched_frames"].as_u64().unwrap_or(0);
    assert_eq!(frames, classified.values().sum::<u64>(), "every frame went through a batch");
    let mean = frames as f64 / batches.max(1) as f64;
    assert!(mean > 1.0, "frames of different streams shared batches: {frames} in {batches}");
    assert!(
        stats.iter().any(|s| s["engine"]["batch_mean"].as_f64().is_some_and(|m| m > 1.0)),
        "some interval reported a mean batch above 1"
    );

    // Prometheus: every scrape parses, and the counters moved while the daemon ran.
    assert!(scrapes.len() >= 2, "{} scrapes succeeded\n{log}", scrapes.len());
    let parsed: Vec<BTreeMap<String, f64>> = scrapes.iter().map(|s| parse_exposition(s)).collect();
    let total = |samples: &BTreeMap<String, f64>, name: &str| -> f64 {
        samples.iter().filter(|(series, _)| series.starts_with(name)).map(|(_, v)| v).sum()
    };
    let (first, last) = (&parsed[0], &parsed[parsed.len() - 1]);
    let classified_metric = "edgesight_frames_classified_total{";
    assert!(total(last, classified_metric) > total(first, classified_metric), "counters move");
    let batches_metric = total(last, "edgesight_engine_batches_total");
    let frames_metric = total(last, "edgesight_engine_batched_frames_total");
    assert!(frames_metric > batches_metric && batches_metric > 0.0, "mean batch above 1");
    for stream in ["t5", "file"] {
        let count = format!("edgesight_inference_seconds_count{{stream=\"{stream}\"}}");
        let inf = format!("edgesight_inference_seconds_bucket{{stream=\"{stream}\",le=\"+Inf\"}}");
        assert_eq!(last.get(&count), last.get(&inf), "{stream}: +Inf bucket holds every sample");
    }
    assert!(last.contains_key("edgesight_uptime_seconds"));
}

#[test]
fn on_change_publishes_a_classification_only_when_the_smoothed_label_changes() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let video = corpus("vid_h264_aac_160x90.mp4");
    let text = format!(
        "device_id = \"change\"\n[model]\npath = \"{model}\"\nthreads = 1\n\
         [engine]\nclassifications = \"on_change\"\n\
         [smoothing]\nmethod = \"majority\"\nwindow = 3\n\
         [metrics]\nstats_interval_s = 0\n\
         [mqtt]\nport = {port}\nprefix = \"test\"\n\
         [[streams]]\nname = \"clip\"\nkind = \"file\"\npath = \"{video}\"\nfps = 30.0\n",
        model = test_bundle().display(),
        port = broker.port,
        video = video.display(),
    );
    let sampled = edgesight::source::read_video(&video, 30.0).filter(Result::is_ok).count();
    let (_client, rx) = subscribe(broker.port, "test/change/#", "change-watcher");
    let mut child = start_daemon(dir.path(), &text);
    let status = child.wait().expect("daemon exits");
    assert!(status.success(), "daemon exited with {status}");
    let mut seen = Vec::new();
    while let Ok(message) = rx.recv_timeout(Duration::from_secs(2)) {
        seen.push(message);
    }
    assert!(!seen.iter().any(|(t, _)| t.ends_with("/stats")), "stats_interval_s = 0 is off");
    let classifications: Vec<Value> = seen
        .iter()
        .filter(|(t, _)| t == "test/change/clip/classification")
        .map(|(_, p)| serde_json::from_str(p).expect("JSON"))
        .collect();
    let states: Vec<Value> = seen
        .iter()
        .filter(|(t, _)| t == "test/change/clip/state")
        .map(|(_, p)| serde_json::from_str(p).expect("JSON"))
        .collect();
    assert!(!classifications.is_empty());
    let seqs: Vec<u64> = classifications.iter().filter_map(|c| c["seq"].as_u64()).collect();
    assert_eq!(seqs[0], 0, "the first label is a change");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq increases: {seqs:?}");
    // One running state per published classification (the changes), then `ended`.
    let running: Vec<&Value> = states.iter().filter(|s| s["status"] == "running").collect();
    assert_eq!(running.len(), classifications.len(), "{states:?}");
    for (state, classification) in running.iter().zip(&classifications) {
        assert_eq!(state["seq"], classification["seq"]);
    }
    let last = states.last().expect("final state");
    assert_eq!(
        (last["status"].as_str(), last["seq"].as_u64()),
        (Some("ended"), Some(sampled as u64 - 1))
    );
    assert!(
        classifications.len() < sampled,
        "{} of {sampled} frames published",
        classifications.len()
    );
}

#[test]
fn odd_batch_sizes_give_the_same_answers_as_single_frames() {
    let bundle = Bundle::open(&test_bundle()).expect("bundle");
    let mut backend = model::open_backend(&bundle, &BackendOptions::tract(1)).expect("backend");
    let size = 3 * (TEST_INPUT as usize).pow(2);
    let input = test_input(TEST_INPUT, 3);
    let singles: Vec<Vec<f32>> = input
        .chunks_exact(size)
        .map(|frame| backend.infer(frame, 1).expect("one frame").0.remove(0).scores)
        .collect();
    for round in 0..2 {
        let (batch, _) = backend.infer(&input, 3).expect("batch of 3");
        assert_eq!(batch.len(), 3);
        for (index, (batched, single)) in batch.iter().zip(&singles).enumerate() {
            let error = relative_error(&batched.scores, single);
            assert!(error < 1e-4, "round {round}, frame {index}: relative error {error}");
        }
    }
    // Different frames give different answers, so the comparison above means something.
    assert!(relative_error(&singles[0], &singles[1]) > 1e-6);
}

#[test]
fn a_steady_stream_repeats_its_state_as_a_heartbeat() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("temp dir");
    // A solid colour: every frame gets the same label, so only the heartbeat repeats the state.
    let text = format!(
        "device_id = \"beat\"\n[model]\npath = \"{model}\"\nthreads = 1\n\
         [engine]\nstate_heartbeat_s = 1\n[metrics]\nstats_interval_s = 0\n\
         [mqtt]\nport = {port}\nprefix = \"test\"\n\
         [[streams]]\nname = \"wall\"\nkind = \"test\"\npattern = \"red\"\nfps = 2.0\n\
         frames = 120\nwidth = 64\nheight = 48\n",
        model = test_bundle().display(),
        port = broker.port,
    );
    let (_client, rx) = subscribe(broker.port, "test/beat/#", "beat-watcher");
    let mut child = start_daemon(dir.path(), &text);
    let status = child.wait().expect("daemon exits");
    assert!(status.success(), "daemon exited with {status}");
    let mut seen = Vec::new();
    while let Ok(message) = rx.recv_timeout(Duration::from_secs(2)) {
        seen.push(message);
    }
    let states: Vec<Value> = seen
        .iter()
        .filter(|(t, _)| t == "test/beat/wall/state")
        .map(|(_, p)| serde_json::from_str(p).expect("JSON"))
        .collect();
    let running: Vec<&Value> = states.iter().filter(|s| s["status"] == "running").collect();
    let labels: std::collections::BTreeSet<&str> =
        running.iter().filter_map(|s| s["label"].as_str()).collect();
    assert_eq!(labels.len(), 1, "one label all along: {states:?}");
    // 4 s of stream: the change at the first frame, then about one heartbeat a second.
    assert!(running.len() >= 3, "{} running states: {states:?}", running.len());
    assert!(running.iter().all(|s| s["since"] == running[0]["since"]), "{states:?}");
    assert_eq!(states.last().map(|s| s["status"].clone()), Some(Value::from("ended")));
    // The source's retained status repeats with it, so a broker that lost it gets it back.
    let online = seen
        .iter()
        .filter(|(t, p)| t == "test/beat/wall/status" && p.contains("\"online\""))
        .count();
    assert!(online >= 3, "{online} online statuses in 4 s with a 1 s heartbeat");
}
