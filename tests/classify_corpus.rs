//! `edgesight classify` on every image and video of the shared corpus: each input gives
//! results or one clear error naming it, and the process never panics.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::bundle::{corpus, media_files, test_bundle};
use serde_json::Value;

fn classify(args: &[&str], files: &[PathBuf]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_edgesight"))
        .arg("classify")
        .arg("--model")
        .arg(test_bundle())
        .args(args)
        .args(files)
        .output()
        .expect("classify runs")
}

#[test]
fn every_corpus_file_gives_results_or_a_clear_error() {
    let files = media_files();
    assert!(files.len() > 40, "corpus has {} media files", files.len());
    let output = classify(&["--json", "--fps", "0.5", "--threads", "1"], &files);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Some corpus files are broken on purpose, so the exit code says that something failed.
    assert_eq!(output.status.code(), Some(1), "{stderr}");

    let rows: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    for file in &files {
        let name = file.display().to_string();
        let own: Vec<&Value> = rows.iter().filter(|row| row["file"] == name.as_str()).collect();
        assert!(!own.is_empty(), "no row for {name}");
        for row in own {
            match (row.get("error"), row.get("label"), row.get("score")) {
                (Some(Value::String(error)), None, None) => {
                    assert!(!error.trim().is_empty(), "{name}: empty error")
                }
                (None, Some(Value::String(_)), Some(Value::Number(score))) => {
                    let score = score.as_f64().unwrap_or(-1.0);
                    assert!((0.0..=1.0).contains(&score), "{name}: score {score}");
                }
                _ => panic!("{name}: neither a result nor an error: {row}"),
            }
        }
    }

    // Files that must decode: a plain image, a CMYK JPEG, a 16-bit PNG, and a video.
    for good in [
        "img_progressive_cat.jpg",
        "img_jpeg_cmyk_1.jpg",
        "img_png16_rgba_basn6a16.png",
        "vid_h264_aac_160x90.mp4",
    ] {
        let name = corpus(good).display().to_string();
        assert!(
            rows.iter().any(|row| row["file"] == name.as_str() && row.get("label").is_some()),
            "{good} was not classified"
        );
    }
    // Files that cannot: each error names why.
    for (bad, why) in [
        ("img_png_truncated.png", "truncated"),
        ("img_bmp_bad_reallybig.bmp", "bomb"),
        ("vid_audio_only_vorbis.mkv", "video"),
    ] {
        let name = corpus(bad).display().to_string();
        let row =
            rows.iter().find(|row| row["file"] == name.as_str() && row.get("error").is_some());
        let error = row.and_then(|row| row["error"].as_str()).unwrap_or_default();
        assert!(row.is_some() && error.contains(why), "{bad}: {error:?}");
    }
}

#[test]
fn table_output_and_exit_code_for_good_and_missing_inputs() {
    let good = corpus("img_webp_hopper.webp");
    let output = classify(&[], std::slice::from_ref(&good));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("file"), "{stdout}");
    assert!(stdout.contains("img_webp_hopper.webp"), "{stdout}");

    let missing = PathBuf::from("/nonexistent/picture.jpg");
    let output = classify(&["--json"], &[good, missing]);
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(r#""file":"/nonexistent/picture.jpg","error":"no such file""#),
        "{stdout}"
    );
}
