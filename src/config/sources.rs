//! Validation of the live source kinds (`v4l2`, `rtsp`, `uri`, `pipeline`) and of the
//! `[sources]` supervision policy.
//!
//! Kept apart from `config.rs` so the keys of each kind are checked in one place: which keys a
//! kind uses (any other set key is an error, as for `file` and `test`), and the ranges and
//! spellings of their values. Every message names the key through the caller, which prefixes
//! `streams[i].`.

use super::{Problem, Settings, StreamSettings};
use crate::source::redact_url;

/// Keys each live kind uses besides `name`, `kind` and `fps`.
const V4L2_KEYS: &[&str] = &["device", "width", "height", "framerate", "format", "stall_timeout_s"];
const RTSP_KEYS: &[&str] =
    &["url", "transport", "latency_ms", "username", "password", "stall_timeout_s"];
const URI_KEYS: &[&str] = &["url", "stall_timeout_s"];
const PIPELINE_KEYS: &[&str] = &["pipeline", "stall_timeout_s"];

impl Settings {
    /// Problems of the `[sources]` section.
    pub(super) fn sources_problems(&self) -> Vec<Problem> {
        let sources = &self.sources;
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(Problem { key: format!("sources.{key}"), message });
        };
        if !(sources.stall_timeout_s.is_finite()
            && (0.5..=3600.0).contains(&sources.stall_timeout_s))
        {
            problem(
                "stall_timeout_s",
                format!("{} is not in [0.5, 3600]", sources.stall_timeout_s),
            );
        }
        if sources.backoff_initial_ms == 0 {
            problem("backoff_initial_ms", "must be at least 1".into());
        }
        if sources.backoff_max_ms < sources.backoff_initial_ms {
            problem(
                "backoff_max_ms",
                format!(
                    "{} is below backoff_initial_ms ({})",
                    sources.backoff_max_ms, sources.backoff_initial_ms
                ),
            );
        }
        if !(sources.backoff_multiplier.is_finite()
            && (1.0..=100.0).contains(&sources.backoff_multiplier))
        {
            problem(
                "backoff_multiplier",
                format!("{} is not in [1, 100]", sources.backoff_multiplier),
            );
        }
        if !(sources.backoff_jitter.is_finite() && (0.0..1.0).contains(&sources.backoff_jitter)) {
            problem("backoff_jitter", format!("{} is not in [0, 1)", sources.backoff_jitter));
        }
        problems
    }
}

/// Checks the keys of a live kind and returns the keys it uses.
pub(super) fn live_kind_problems(
    stream: &StreamSettings,
    problems: &mut Vec<(&'static str, String)>,
) -> &'static [&'static str] {
    stall_problem(stream.stall_timeout_s, problems);
    match stream.kind.as_str() {
        "v4l2" => {
            v4l2_problems(stream, problems);
            V4L2_KEYS
        }
        "rtsp" => {
            rtsp_problems(stream, problems);
            RTSP_KEYS
        }
        "uri" => {
            match stream.url.as_deref().map(str::trim) {
                None => problems.push(("url", "a uri stream needs a url".into())),
                Some(url) if !url.contains("://") => problems
                    .push(("url", format!("{:?} is not a URI (scheme://…)", redact_url(url)))),
                Some(_) => {}
            }
            URI_KEYS
        }
        _ => {
            match stream.pipeline.as_deref() {
                None => problems.push(("pipeline", "a pipeline stream needs a pipeline".into())),
                Some(launch) => {
                    if let Err(message) = check_launch(launch) {
                        problems.push(("pipeline", message));
                    }
                }
            }
            PIPELINE_KEYS
        }
    }
}

/// A stream's own `stall_timeout_s`, when set.
pub(super) fn stall_problem(value: Option<f64>, problems: &mut Vec<(&'static str, String)>) {
    if let Some(value) = value
        && !(value.is_finite() && (0.5..=3600.0).contains(&value))
    {
        problems.push(("stall_timeout_s", format!("{value} is not in [0.5, 3600]")));
    }
}

fn v4l2_problems(stream: &StreamSettings, problems: &mut Vec<(&'static str, String)>) {
    if let Some(device) = &stream.device
        && device.as_os_str().is_empty()
    {
        problems.push(("device", "must not be empty".into()));
    }
    for (key, value) in [("width", stream.width), ("height", stream.height)] {
        if let Some(value) = value
            && !(16..=7680).contains(&value)
        {
            problems.push((key, format!("{value} is not in 16–7680")));
        }
    }
    if let Some(rate) = stream.framerate
        && !(rate.is_finite() && rate > 0.0 && rate <= 1000.0)
    {
        problems.push(("framerate", format!("{rate} is not in (0, 1000]")));
    }
    if let Some(format) = stream.format.as_deref()
        && !matches!(format, "auto" | "mjpeg" | "yuyv")
    {
        problems.push(("format", format!("{format:?} is not auto, mjpeg or yuyv")));
    }
}

fn rtsp_problems(stream: &StreamSettings, problems: &mut Vec<(&'static str, String)>) {
    match stream.url.as_deref() {
        None => problems.push(("url", "an rtsp stream needs a url".into())),
        Some(url) => {
            let scheme = url.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
            if !matches!(scheme.as_deref(), Some("rtsp" | "rtsps" | "rtspt" | "rtspu")) {
                problems.push((
                    "url",
                    format!("{:?} is not an rtsp:// or rtsps:// address", redact_url(url)),
                ));
            }
        }
    }
    if let Some(transport) = stream.transport.as_deref()
        && !matches!(transport, "tcp" | "udp" | "auto")
    {
        problems.push(("transport", format!("{transport:?} is not tcp, udp or auto")));
    }
    if let Some(latency) = stream.latency_ms
        && latency > 60_000
    {
        problems.push(("latency_ms", format!("{latency} is above 60000")));
    }
    if stream.username.is_some() != stream.password.is_some() {
        problems.push(("password", "username and password go together".into()));
    }
}

/// A launch description must end in an `appsink` named `sink`: that is where edgesight takes
/// the frames from.
pub(crate) fn check_launch(launch: &str) -> Result<(), String> {
    let last = launch.rsplit('!').next().unwrap_or_default().trim();
    let mut words = last.split_whitespace();
    let factory = words.next().unwrap_or_default();
    let named_sink = words.any(|word| word == "name=sink" || word == "name=\"sink\"");
    if launch.trim().is_empty() {
        Err("must not be empty".into())
    } else if factory != "appsink" || !named_sink {
        Err(format!(
            "must end in `appsink name=sink` (edgesight takes frames from there); it ends in \
             {last:?}"
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Settings;

    fn problems(stream: &str) -> Vec<String> {
        let text = format!("[[streams]]\nname = \"s\"\n{stream}\n");
        match Settings::from_toml_str(&text, "t.toml") {
            Ok(_) => Vec::new(),
            Err(error) => error.problems.iter().map(ToString::to_string).collect(),
        }
    }

    fn assert_clean(stream: &str) {
        assert_eq!(problems(stream), Vec::<String>::new(), "{stream}");
    }

    fn assert_problem(stream: &str, key: &str) {
        let found = problems(stream);
        assert!(
            found.iter().any(|problem| problem.starts_with(&format!("streams[0].{key}:"))),
            "{key} missing from {found:?} for {stream}"
        );
    }

    #[test]
    fn accepts_each_live_kind_with_its_keys() {
        assert_clean("kind = \"v4l2\"");
        assert_clean(
            "kind = \"v4l2\"\ndevice = \"/dev/video2\"\nwidth = 1280\nheight = 720\n\
             framerate = 30\nformat = \"mjpeg\"\nstall_timeout_s = 5",
        );
        assert_clean(
            "kind = \"rtsp\"\nurl = \"rtsp://10.0.0.5/stream1\"\ntransport = \"udp\"\n\
             latency_ms = 100\nusername = \"u\"\npassword = \"p\"",
        );
        assert_clean("kind = \"uri\"\nurl = \"https://example.invalid/a.m3u8\"");
        assert_clean(
            "kind = \"pipeline\"\npipeline = \"videotestsrc ! videoconvert ! appsink name=sink\"",
        );
        assert_clean("kind = \"test\"\nstall_timeout_s = 2");
    }

    #[test]
    fn rejects_keys_of_other_kinds() {
        assert_problem("kind = \"v4l2\"\nurl = \"rtsp://a/b\"", "url");
        assert_problem("kind = \"rtsp\"\nurl = \"rtsp://a/b\"\ndevice = \"/dev/video0\"", "device");
        assert_problem("kind = \"uri\"\nurl = \"file:///a.mp4\"\ntransport = \"tcp\"", "transport");
        assert_problem(
            "kind = \"pipeline\"\npipeline = \"x ! appsink name=sink\"\nwidth = 5",
            "width",
        );
        assert_problem("kind = \"file\"\npath = \"a.mp4\"\nstall_timeout_s = 3", "stall_timeout_s");
        assert_problem("kind = \"test\"\nformat = \"mjpeg\"", "format");
    }

    #[test]
    fn rejects_bad_values_naming_the_key() {
        assert_problem("kind = \"v4l2\"\nformat = \"h264\"", "format");
        assert_problem("kind = \"v4l2\"\nframerate = 0", "framerate");
        assert_problem("kind = \"v4l2\"\nwidth = 8", "width");
        assert_problem("kind = \"rtsp\"", "url");
        assert_problem("kind = \"rtsp\"\nurl = \"http://a/b\"", "url");
        assert_problem("kind = \"rtsp\"\nurl = \"rtsp://a/b\"\ntransport = \"quic\"", "transport");
        assert_problem("kind = \"rtsp\"\nurl = \"rtsp://a/b\"\nusername = \"u\"", "password");
        assert_problem("kind = \"uri\"\nurl = \"a.mp4\"", "url");
        assert_problem("kind = \"pipeline\"", "pipeline");
        assert_problem("kind = \"pipeline\"\npipeline = \"videotestsrc ! fakesink\"", "pipeline");
        assert_problem("kind = \"pipeline\"\npipeline = \"videotestsrc ! appsink\"", "pipeline");
        assert_problem("kind = \"test\"\nstall_timeout_s = 0", "stall_timeout_s");
    }

    #[test]
    fn an_rtsp_url_error_does_not_show_the_password() {
        let found = problems("kind = \"rtsp\"\nurl = \"http://admin:hunter2@cam/live\"");
        assert!(!found.is_empty());
        assert!(found.iter().all(|problem| !problem.contains("hunter2")), "{found:?}");
    }

    #[test]
    fn checks_the_sources_policy() {
        let text = "[sources]\nstall_timeout_s = 0.1\nbackoff_initial_ms = 0\n\
                    backoff_max_ms = 0\nbackoff_multiplier = 0.5\nbackoff_jitter = 1.0\n\
                    [[streams]]\nname = \"s\"\nkind = \"test\"\n";
        let error = Settings::from_toml_str(text, "t.toml").unwrap_err();
        let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "sources.stall_timeout_s",
            "sources.backoff_initial_ms",
            "sources.backoff_multiplier",
            "sources.backoff_jitter",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        let settings = Settings::default();
        assert_eq!(settings.sources.stall_timeout_s, 10.0);
        assert_eq!(settings.sources.backoff_initial_ms, 500);
        assert_eq!(settings.sources.backoff_max_ms, 30_000);
    }

    #[test]
    fn printed_settings_hide_stream_credentials() {
        let text = "[[streams]]\nname = \"s\"\nkind = \"rtsp\"\n\
                    url = \"rtsp://admin:hunter2@cam/live\"\n\
                    username = \"u\"\npassword = \"pw9\"\n";
        let printed = Settings::from_toml_str(text, "t.toml").unwrap().to_toml();
        assert!(!printed.contains("hunter2") && !printed.contains("pw9"), "{printed}");
    }

    #[test]
    fn the_examples_and_the_documented_config_are_valid_and_name_every_key() {
        let documented = include_str!("../../config/edgesight.toml");
        // The documented config (the package's conffile) asks for a stream before it runs...
        let error = Settings::from_toml_str(documented, "edgesight.toml").unwrap_err();
        assert!(error.to_string().contains("at least one [[streams]]"), "{error}");
        // ...and is valid once it has one; so are the examples.
        let with_stream = format!("{documented}\n[[streams]]\nname = \"door\"\nkind = \"test\"\n");
        for (name, text) in [
            ("rtsp.toml", include_str!("../../config/examples/rtsp.toml")),
            ("v4l2.toml", include_str!("../../config/examples/v4l2.toml")),
            ("edgesight.toml with a stream", with_stream.as_str()),
        ] {
            if let Err(error) = Settings::from_toml_str(text, name) {
                panic!("{error}");
            }
        }
        for key in [
            "stall_timeout_s",
            "backoff_initial_ms",
            "backoff_max_ms",
            "backoff_multiplier",
            "backoff_jitter",
            "device",
            "framerate",
            "format",
            "url",
            "transport",
            "latency_ms",
            "username, password",
            "pipeline",
        ] {
            assert!(documented.contains(key), "{key} is not documented in edgesight.toml");
        }
    }
}
