//! The [`Metrics`] counters in Prometheus' text exposition format (version 0.0.4).
//!
//! [`render`] writes one `# HELP` and `# TYPE` line per metric family, then its samples;
//! per-stream families carry a `stream` label. Latencies are histograms in seconds (the
//! Prometheus convention) with the buckets of [`LATENCY_BUCKETS_MS`]. Rendering reads the
//! atomics without locking the streams, so a scrape never holds up inference.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{LATENCY_BUCKETS_MS, Latencies, Metrics, StreamMetrics};

/// Picks one latency record of a stream.
type Pick = fn(&StreamMetrics) -> &Latencies;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric, as the body of a `GET /metrics` answer.
pub fn render(metrics: &Metrics) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let streams = metrics.streams();
    let per_stream = |out: &mut String,
                      name: &str,
                      kind: &str,
                      help: &str,
                      value: &dyn Fn(&StreamMetrics) -> u64| {
        family(out, name, kind, help);
        for (stream, counters) in &streams {
            let _ = writeln!(out, "{name}{{stream=\"{}\"}} {}", escape(stream), value(counters));
        }
    };
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    per_stream(
        &mut out,
        "edgesight_frames_decoded_total",
        "counter",
        "Frames that left the decoder.",
        &|s| load(&s.decoded),
    );
    per_stream(
        &mut out,
        "edgesight_frames_sampled_total",
        "counter",
        "Frames the fps cap let through to the engine.",
        &|s| load(&s.sampled),
    );
    per_stream(
        &mut out,
        "edgesight_frames_classified_total",
        "counter",
        "Frames classified.",
        &|s| load(&s.classified),
    );
    per_stream(
        &mut out,
        "edgesight_frames_dropped_total",
        "counter",
        "Frames lost before inference (stale live frames, full engine queue).",
        &|s| load(&s.dropped),
    );
    per_stream(
        &mut out,
        "edgesight_reconnects_total",
        "counter",
        "Times a live source was torn down and started again.",
        &|s| load(&s.reconnects),
    );
    per_stream(
        &mut out,
        "edgesight_stream_queued",
        "gauge",
        "Frames of the stream waiting in the engine's queue.",
        &|s| load(&s.queued),
    );
    family(&mut out, "edgesight_stream_status", "gauge", "1 for the stream's current status.");
    for (stream, counters) in &streams {
        let status = counters.status();
        let status = if status.is_empty() { "unknown".to_string() } else { status };
        let (stream, status) = (escape(stream), escape(&status));
        let _ =
            writeln!(out, "edgesight_stream_status{{stream=\"{stream}\",status=\"{status}\"}} 1");
    }
    let histograms: [(&str, &str, Pick); 2] = [
        (
            "edgesight_inference_seconds",
            "Preprocessing and model time of each frame (its batch's model time).",
            |s| &s.inference_ms,
        ),
        (
            "edgesight_capture_to_publish_seconds",
            "From the frame leaving the decoder to its classification reaching the publisher.",
            |s| &s.capture_to_publish_ms,
        ),
    ];
    for (name, help, latencies) in histograms {
        family(&mut out, name, "histogram", help);
        for (stream, counters) in &streams {
            histogram(&mut out, name, &escape(stream), latencies(counters));
        }
    }
    let engine = &metrics.engine;
    let publish = &metrics.publish;
    let globals: [(&str, &str, &str, u64); 9] = [
        (
            "edgesight_engine_queue_depth",
            "gauge",
            "Frames waiting for inference.",
            load(&engine.queue_depth),
        ),
        ("edgesight_engine_batches_total", "counter", "Backend calls.", load(&engine.batches)),
        (
            "edgesight_engine_batched_frames_total",
            "counter",
            "Frames run in those calls.",
            load(&engine.batched_frames),
        ),
        (
            "edgesight_spool_depth",
            "gauge",
            "Messages in the on-disk spool.",
            load(&publish.spool_depth),
        ),
        ("edgesight_spool_bytes", "gauge", "Size of the spool.", load(&publish.spool_bytes)),
        (
            "edgesight_spool_overflow_total",
            "counter",
            "Spooled messages dropped because the spool was full.",
            load(&publish.spool_overflow),
        ),
        (
            "edgesight_publish_failures_total",
            "counter",
            "Publishes the MQTT client did not take, or payloads that could not be encoded.",
            load(&publish.failures),
        ),
        (
            "edgesight_mqtt_connections_total",
            "counter",
            "Connections the broker accepted.",
            load(&publish.connections),
        ),
        (
            "edgesight_mqtt_connected",
            "gauge",
            "1 while connected to the broker.",
            load(&publish.connected),
        ),
    ];
    for (name, kind, help, value) in globals {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(&mut out, "edgesight_uptime_seconds", "gauge", "Seconds since the daemon started.");
    let _ = writeln!(out, "edgesight_uptime_seconds {:.3}", metrics.uptime_s());
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, stream: &str, latencies: &Latencies) {
    let snapshot = latencies.snapshot();
    for (bound, count) in LATENCY_BUCKETS_MS.iter().zip(&snapshot.buckets) {
        let le = bound / 1000.0;
        let _ = writeln!(out, "{name}_bucket{{stream=\"{stream}\",le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{stream=\"{stream}\",le=\"+Inf\"}} {}", snapshot.count);
    let _ = writeln!(out, "{name}_sum{{stream=\"{stream}\"}} {}", snapshot.sum_ms / 1000.0);
    let _ = writeln!(out, "{name}_count{{stream=\"{stream}\"}} {}", snapshot.count);
}

/// A label value with `\`, `"` and newlines escaped as the format requires.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_cumulative_histograms() {
        let metrics = Metrics::new();
        let door = metrics.stream("door");
        door.classified.fetch_add(3, Ordering::Relaxed);
        door.set_status("online");
        door.inference_ms.record(7.0);
        door.inference_ms.record(300.0);
        metrics.publish.connected.store(1, Ordering::Relaxed);
        let text = render(&metrics);
        let has = |line: &str| text.lines().any(|l| l == line);
        assert!(has("edgesight_frames_classified_total{stream=\"door\"} 3"), "{text}");
        assert!(has("edgesight_stream_status{stream=\"door\",status=\"online\"} 1"));
        assert!(has("edgesight_inference_seconds_bucket{stream=\"door\",le=\"0.005\"} 0"));
        assert!(has("edgesight_inference_seconds_bucket{stream=\"door\",le=\"0.01\"} 1"));
        assert!(has("edgesight_inference_seconds_bucket{stream=\"door\",le=\"0.4\"} 2"));
        assert!(has("edgesight_inference_seconds_bucket{stream=\"door\",le=\"+Inf\"} 2"));
        assert!(has("edgesight_inference_seconds_count{stream=\"door\"} 2"));
        assert!(has("edgesight_inference_seconds_sum{stream=\"door\"} 0.307"));
        assert!(has("edgesight_mqtt_connected 1"));
        assert!(has("# TYPE edgesight_capture_to_publish_seconds histogram"));
        // Every family is declared once.
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, helps);
    }

    #[test]
    fn escapes_label_values() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
