//! Tests of loading, validation and key reporting.

use super::*;

const GOOD: &str = r#"
    device_id = "box-1"
    [mqtt]
    port = 1884
    [[streams]]
    name = "door"
    kind = "file"
    path = "door.mp4"
    fps = 2.0
"#;

#[test]
fn reads_a_minimal_file() {
    let settings = Settings::from_toml_str(GOOD, "good.toml").unwrap();
    assert_eq!(settings.device_id, "box-1");
    assert_eq!(settings.mqtt.port, 1884);
    assert_eq!(settings.mqtt.host, "127.0.0.1");
    assert_eq!(settings.streams[0].fps(), 2.0);
    assert_eq!(settings.client_id(), "edgesight-box-1");
}

#[test]
fn reads_and_checks_the_spool_and_tls_keys() {
    let text = GOOD.replace(
        "port = 1884",
        "port = 1884\nspool_dir = \"/var/spool/es\"\nspool_max_mb = 8\n\
         [mqtt.tls]\nca_file = \"ca.pem\"\nserver_name = \"broker.lan\"",
    );
    let settings = Settings::from_toml_str(&text, "tls.toml").unwrap();
    assert_eq!(settings.mqtt.spool_max_mb, 8);
    let tls = settings.mqtt.tls.clone().unwrap();
    assert_eq!(tls.ca_file, Some(PathBuf::from("ca.pem")));
    assert_eq!(settings.spool_dir(Path::new("/cache")), PathBuf::from("/var/spool/es"));

    let text = GOOD.replace(
        "port = 1884",
        "port = 1884\nspool_max_mb = 0\n[mqtt.tls]\ncert_file = \"c.pem\"\ncolour = 1",
    );
    let error = Settings::from_toml_str(&text, "bad.toml").unwrap_err();
    let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
    for key in ["mqtt.spool_max_mb", "mqtt.tls.ca_file", "mqtt.tls.key_file", "mqtt.tls.colour"] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
}

#[test]
fn the_default_spool_dir_follows_the_client_id() {
    let settings = Settings { device_id: "box-7".into(), ..Settings::default() };
    // STATE_DIRECTORY is unset under `cargo test` unless systemd runs it.
    if std::env::var_os("STATE_DIRECTORY").is_none() {
        let dir = settings.spool_dir(Path::new("/cache"));
        assert_eq!(dir, PathBuf::from("/cache/spool/edgesight-box-7"));
    }
}

#[test]
fn reports_every_unknown_key_with_its_path() {
    let text = format!("colour = 1\n{GOOD}\n[model]\nbakend = \"tract\"\n");
    let text = text.replace("fps = 2.0", "fps = 2.0\nfsp = 3");
    let error = Settings::from_toml_str(&text, "bad.toml").unwrap_err();
    let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"colour"), "{keys:?}");
    assert!(keys.contains(&"model.bakend"), "{keys:?}");
    assert!(keys.contains(&"streams[0].fsp"), "{keys:?}");
}

#[test]
fn reports_every_semantic_problem_at_once() {
    let text = r#"
        [mqtt]
        qos = 3
        username = "a"
        [[streams]]
        name = "a/b"
        kind = "file"
        pattern = "ball"
        [[streams]]
        name = "x"
        kind = "camera"
    "#;
    let error = Settings::from_toml_str(text, "bad.toml").unwrap_err();
    let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "mqtt.qos",
        "mqtt.password",
        "streams[0].name",
        "streams[0].path",
        "streams[0].pattern",
        "streams[1].kind",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
}

#[test]
fn names_the_key_of_a_type_error() {
    let text = GOOD.replace("port = 1884", "port = \"many\"");
    let error = Settings::from_toml_str(&text, "bad.toml").unwrap_err();
    assert_eq!(error.problems[0].key, "mqtt.port", "{error}");
}

#[test]
fn reports_type_errors_in_several_sections_and_the_other_problems() {
    let text = r#"
        [engine]
        queue = "many"
        [mqtt]
        port = "abc"
        qos = 7
        [[streams]]
        name = "a"
        kind = "test"
        frames = "lots"
    "#;
    let error = Settings::from_toml_str(text, "types.toml").unwrap_err();
    let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
    for section in ["engine", "mqtt", "streams"] {
        let found = keys.iter().filter(|key| key.starts_with(section)).count();
        assert_eq!(found, 1, "{section} once in {keys:?}");
    }
    assert!(!keys.contains(&"mqtt.qos"), "a section that failed to parse is not validated");
}

#[test]
fn tidies_both_styles_of_index() {
    assert_eq!(tidy_key("streams.1.fsp"), "streams[1].fsp");
    assert_eq!(tidy_key("streams[2]frames"), "streams[2].frames");
    assert_eq!(tidy_key("mqtt.port"), "mqtt.port");
}

#[test]
fn rejects_duplicate_stream_names() {
    let text = format!("{GOOD}\n[[streams]]\nname = \"door\"\nkind = \"test\"\n");
    let error = Settings::from_toml_str(&text, "dup.toml").unwrap_err();
    assert_eq!(error.problems[0].key, "streams[1].name");
}

#[test]
fn masks_the_password_when_printed() {
    let text = GOOD.replace("port = 1884", "username = \"u\"\npassword = \"hunter2\"");
    let settings = Settings::from_toml_str(&text, "p.toml").unwrap();
    assert!(!settings.to_toml().contains("hunter2"));
}

#[test]
fn demo_settings_are_valid() {
    let settings = Settings::demo(Path::new("/tmp/edgesight-test"));
    assert!(settings.validate().is_empty(), "{:?}", settings.validate());
}

#[test]
fn batching_smoothing_and_metrics_keys_are_read_and_checked() {
    let text = format!(
        "{GOOD}\nsmoothing = {{ window = 9 }}\n\
         [engine]\nmax_batch = 8\nclassifications = \"on_change\"\n\
         [smoothing]\nmethod = \"ema\"\nalpha = 0.5\n\
         [metrics]\nlisten = \"127.0.0.1:9464\"\n"
    );
    let settings = Settings::from_toml_str(&text, "ok.toml").unwrap();
    assert_eq!(settings.engine.max_batch, 8);
    assert_eq!(settings.engine.classifications, Classifications::OnChange);
    let door = settings.smoothing.with(settings.streams[0].smoothing.as_ref());
    assert_eq!((door.method, door.alpha, door.window), (SmoothingMethod::Ema, 0.5, 9));

    let text = format!(
        "{GOOD}\nsmoothing = {{ method = \"majority\", window = 0 }}\n\
         [engine]\nmax_batch = 0\n[smoothing]\nalpha = 0\nleave = 0.9\n\
         [metrics]\nlisten = \"everywhere\"\n"
    );
    let error = Settings::from_toml_str(&text, "bad.toml").unwrap_err();
    let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "engine.max_batch",
        "smoothing.alpha",
        "smoothing.leave",
        "metrics.listen",
        "streams[0].smoothing.window",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
    assert!(!keys.contains(&"streams[0].smoothing.alpha"), "a bad default is named once");
}

#[test]
fn an_unknown_smoothing_method_is_named() {
    let text = format!("{GOOD}\nsmoothing = {{ method = \"median\" }}\n");
    let error = Settings::from_toml_str(&text, "bad.toml").unwrap_err();
    assert!(error.problems[0].key.starts_with("streams"), "{error}");
    assert!(error.to_string().contains("median"), "{error}");
}

#[test]
fn backend_device_and_precision_are_checked_together() {
    let with_model = |model: &str| {
        GOOD.replace("device_id = \"box-1\"", &format!("device_id = \"box-1\"\n[model]\n{model}"))
    };
    let keys = |model: &str| -> Vec<String> {
        match Settings::from_toml_str(&with_model(model), "model.toml") {
            Ok(_) => Vec::new(),
            Err(error) => error.problems.iter().map(|p| p.key.clone()).collect(),
        }
    };
    assert!(
        keys("precision = \"bf16\"").contains(&"model.precision".to_string()),
        "tract is f32 only"
    );
    assert!(keys("backend = \"torch\"\ndevice = \"cuda:x\"").contains(&"model.device".to_string()));
    assert!(keys("precision = \"f64\"").contains(&"model.precision".to_string()));
    assert!(keys("device = \"cuda:1\"").contains(&"model.device".to_string()), "tract is CPU");
    let overflow = "backend = \"torch\"\ndevice = \"cuda:99999999999999999999999\"";
    assert!(keys(overflow).contains(&"model.device".to_string()));
    let torch_bf16 = keys("backend = \"torch\"\nprecision = \"bf16\"\ndevice = \"cpu\"");
    let torch_f16_cpu = keys("backend = \"torch\"\nprecision = \"f16\"\ndevice = \"cpu\"");
    assert!(torch_f16_cpu.contains(&"model.precision".to_string()), "{torch_f16_cpu:?}");
    if cfg!(feature = "torch") {
        assert!(torch_bf16.is_empty(), "{torch_bf16:?}");
        let settings = Settings::from_toml_str(
            &with_model("backend = \"torch\"\nprecision = \"f16\"\ndevice = \"cuda:1\""),
            "m.toml",
        )
        .unwrap();
        let options = settings.model.backend_options();
        assert_eq!((options.device.as_str(), options.precision), ("cuda:1", Precision::F16));
    } else {
        // Without the feature, asking for torch is a config error naming the key.
        assert_eq!(torch_bf16, ["model.backend"]);
    }
}
