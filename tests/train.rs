//! The training mode end to end on real data: Fashion-MNIST (Debian's `dataset-fashion-mnist`)
//! imported with `edgesight dataset import-idx`, a bundle trained with `edgesight train`, then
//! `model verify` and `classify` on held-out images with both backends; a second run reads every
//! feature map from the cache. Bad input: an empty folder, a class with one image, unreadable
//! images among good ones, a backbone that is not a ResNet-50, a run stopped with Ctrl-C — each
//! with a clear error and no half-written bundle. Needs the `torch` feature.
#![cfg(feature = "torch")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

fn edgesight() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edgesight"));
    command.env("RUST_LOG", "info").env_remove("RUST_BACKTRACE");
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("edgesight runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Imports the first `limit` images of a Fashion-MNIST split into `out`.
fn import(split: &str, limit: usize, out: &Path) {
    let images = Path::new(FASHION).join(format!("{split}-images-idx3-ubyte.gz"));
    assert!(
        images.is_file(),
        "{} is missing: install Debian's dataset-fashion-mnist (scripts/test.sh does)",
        images.display()
    );
    let labels = Path::new(FASHION).join(format!("{split}-labels-idx1-ubyte.gz"));
    let output = run(edgesight()
        .args(["dataset", "import-idx", "--limit", &limit.to_string()])
        .arg("--images")
        .arg(&images)
        .arg("--labels")
        .arg(&labels)
        .arg("--out")
        .arg(out));
    assert!(output.status.success(), "import: {}", text(&output.stderr));
}

/// `edgesight train` at input 32 with a private cache.
fn train(data: &Path, out: &Path, cache: &Path, extra: &[&str]) -> Command {
    let mut command = edgesight();
    command
        .args(["train", "--input-size", "32", "--threads", "2", "--seed", "3"])
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .arg("--cache")
        .arg(cache)
        .args(extra);
    command
}

fn read_json(path: &Path) -> Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).expect("JSON")
}

/// Nothing but `expected` in `dir`: no staging or leftover directories.
fn assert_only(dir: &Path, expected: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, expected, "contents of {}", dir.display());
}

fn number_after(haystack: &str, key: &str) -> Option<u64> {
    let at = haystack.rfind(key)? + key.len();
    let digits: String = haystack[at..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[test]
fn fashion_mnist_subset_trains_a_bundle_that_both_backends_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (data, test, out, cache) = (
        dir.path().join("train"),
        dir.path().join("test"),
        dir.path().join("bundle"),
        dir.path().join("cache"),
    );
    import("train", 600, &data);
    import("t10k", 200, &test);

    let started = Instant::now();
    let mut first = train(&data, &out, &cache, &["--epochs", "8"]);
    let output = run(first.arg("--test").arg(&test));
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "train: {stderr}");
    eprintln!("trained in {:.1} s\n{}", started.elapsed().as_secs_f64(), text(&output.stdout));

    // The bundle and its report.
    for file in ["manifest.toml", "backbone.onnx", "pca.safetensors", "head.onnx"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    for file in ["head.safetensors", "report.json", "confusion.png", "training.png"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let manifest = std::fs::read_to_string(out.join("manifest.toml")).expect("manifest");
    assert!(manifest.contains("\"report.json\" = "), "the report is checksummed:\n{manifest}");
    let report = read_json(&out.join("report.json"));
    let k = report["k"].as_u64().expect("k");
    assert!((1..=200).contains(&k), "k = {k}");
    assert!(report["variance_kept"].as_f64().expect("variance") >= 0.95);
    assert_eq!(report["classes"].as_array().map(Vec::len), Some(10));
    assert_eq!(report["images"]["validation"], 120);
    assert_eq!(report["images"]["test"], 200);
    for set in ["validation", "test"] {
        let clean = &report[set]["clean"];
        let accuracy = clean["accuracy"].as_f64().expect("accuracy");
        assert!(accuracy > 0.5, "{set} accuracy {accuracy} (chance is 0.1)");
        let confusion = clean["confusion"].as_array().expect("confusion");
        let total: u64 =
            confusion.iter().flat_map(|r| r.as_array().unwrap()).map(|v| v.as_u64().unwrap()).sum();
        assert_eq!(
            total,
            clean["images"].as_u64().unwrap(),
            "{set}: the matrix counts every image"
        );
        let conditions: Vec<&str> = report[set]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .map(|c| c["condition"].as_str().unwrap())
            .collect();
        assert_eq!(conditions, ["clean", "low-light", "motion-blur", "haze", "overexposure"]);
        assert_eq!(clean["per_class"].as_array().map(Vec::len), Some(10));
    }
    let agreement = &report["agreement"];
    assert_eq!(agreement["images"], 120);
    assert!(agreement["fraction"].as_f64().unwrap() >= 0.995, "tract vs tch: {agreement}");
    let png = image::open(out.join("confusion.png")).expect("a PNG");
    assert!(png.width() > 300 && png.height() > 300);

    // The daemon's loader accepts it; classify on held-out images with both backends.
    let verify = run(edgesight().args(["model", "verify"]).arg(&out));
    assert!(verify.status.success(), "verify: {}", text(&verify.stderr));
    let inspect = run(edgesight().args(["model", "inspect"]).arg(&out));
    assert!(inspect.status.success(), "inspect: {}", text(&inspect.stderr));
    let metrics = text(&inspect.stdout);
    let metrics = metrics.lines().find(|l| l.starts_with("metrics")).expect("a metrics line");
    let accuracy = report["validation"]["clean"]["accuracy"].as_f64().expect("accuracy");
    let accuracy = format!("val_accuracy {accuracy:.4}");
    assert!(metrics.contains(&accuracy), "{metrics} lacks {accuracy}");
    let held_out: Vec<(String, PathBuf)> = ["bag", "trouser", "sneaker", "sandal", "dress"]
        .iter()
        .flat_map(|class| {
            let mut files: Vec<PathBuf> =
                std::fs::read_dir(test.join(class)).unwrap().map(|e| e.unwrap().path()).collect();
            files.sort();
            files.into_iter().take(10).map(move |f| (class.to_string(), f))
        })
        .collect();
    let mut labels = Vec::new();
    for backend in ["tract", "torch"] {
        let output = run(edgesight()
            .args(["classify", "--json", "--backend", backend, "--model"])
            .arg(&out)
            .args(held_out.iter().map(|(_, f)| f)));
        assert!(output.status.success(), "classify {backend}: {}", text(&output.stderr));
        let rows: Vec<String> = text(&output.stdout)
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).expect("a JSON row"))
            .map(|row| row["label"].as_str().expect("label").to_string())
            .collect();
        assert_eq!(rows.len(), held_out.len());
        let right =
            held_out.iter().zip(&rows).filter(|((class, _), label)| class == *label).count();
        eprintln!("{backend}: {right} of {} held-out images right", rows.len());
        assert!(right * 2 > rows.len(), "{backend}: {right} of {} right", rows.len());
        labels.push(rows);
    }
    let same = labels[0].iter().zip(&labels[1]).filter(|(a, b)| a == b).count();
    assert_eq!(same, held_out.len(), "tract and torch top-1 on the held-out images");

    // A second run reads every map from the cache and replaces the bundle.
    let output = run(&mut train(&data, &out, &cache, &["--epochs", "2", "--skip-agreement"]));
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "second run: {stderr}");
    let maps = number_after(&stderr, "maps=").expect("maps logged");
    assert_eq!(number_after(&stderr, "from_cache="), Some(maps), "{stderr}");
    assert_only(dir.path(), &["bundle", "cache", "test", "train"]);
}

/// Two small classes of real images, for the error cases.
fn small_folder(root: &Path, per_class: usize) {
    let source = root.join("source");
    import("train", 200, &source);
    for class in ["bag", "trouser"] {
        let dir = root.join("data").join(class);
        std::fs::create_dir_all(&dir).unwrap();
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(source.join(class)).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        for file in files.iter().take(per_class) {
            std::fs::copy(file, dir.join(file.file_name().unwrap())).unwrap();
        }
    }
    std::fs::remove_dir_all(source).unwrap();
}

#[test]
fn bad_folders_and_backbones_are_refused_without_a_half_bundle() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out, cache) = (dir.path().join("bundle"), dir.path().join("cache"));

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    // An empty --out stays as it was when the run fails.
    std::fs::create_dir_all(&out).unwrap();
    let output = run(&mut train(&empty, &out, &cache, &[]));
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("empty") && stderr.contains("0 class folder(s)"), "{stderr}");
    assert!(out.is_dir(), "the empty --out is kept");
    std::fs::remove_dir(&out).unwrap();

    small_folder(dir.path(), 12);
    let data = dir.path().join("data");
    let lonely = data.join("zz-lonely");
    std::fs::create_dir_all(&lonely).unwrap();
    let one = std::fs::read_dir(data.join("bag")).unwrap().next().unwrap().unwrap().path();
    std::fs::copy(&one, lonely.join("only.png")).unwrap();
    let output = run(&mut train(&data, &out, &cache, &[]));
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("zz-lonely") && stderr.contains("one image"), "{stderr}");
    std::fs::remove_dir_all(&lonely).unwrap();

    // A file that is not a ResNet-50 (a bundle's head).
    let synth = dir.path().join("synth");
    let made = run(edgesight().args(["model", "synth", "--input-size", "32", "--out"]).arg(&synth));
    assert!(made.status.success(), "{}", text(&made.stderr));
    let head = synth.join("head.onnx");
    let output = run(train(&data, &out, &cache, &[]).arg("--backbone").arg(&head));
    let stderr = text(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains(&head.display().to_string()), "the file is named: {stderr}");

    // Bad options are usage errors naming the flag.
    let output = run(&mut train(&data, &out, &cache, &["--pca-variance", "1.5"]));
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("--pca-variance"));
    for (flag, value) in [
        ("--conditions", "fog"),
        ("--train-backbone", "some"),
        ("--backbone-precision", "f16"),
        ("--backbone-precision", "f64"),
        ("--weight-decay", "-1"),
        ("--threads", "100000"),
        ("--patience", "0"),
        ("--lr", "1e300"),
        ("--epochs", "18446744073709551615"),
        ("--input-size", "4294967264"),
        ("--batch-size", "100000000"),
    ] {
        let output = run(&mut train(&data, &out, &cache, &[&format!("{flag}={value}")]));
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {}", text(&output.stderr));
        assert!(text(&output.stderr).contains(flag), "{flag}: {}", text(&output.stderr));
    }
    // A bundle inside the data folder would become a class of the next run.
    // So would one below a folder that does not exist yet, or the feature cache.
    for (bundle, features) in [
        (data.join("model"), cache.clone()),
        (data.join("new").join("model"), cache.clone()),
        (out.clone(), data.join("cache")),
    ] {
        let output = run(&mut train(&data, &bundle, &features, &[]));
        assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
        assert!(text(&output.stderr).contains("inside --data"), "{}", text(&output.stderr));
    }

    assert!(!out.exists(), "no bundle from a failed run");
    assert_only(dir.path(), &["data", "empty", "synth"]);
}

#[test]
fn unreadable_images_are_skipped_counted_and_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    small_folder(dir.path(), 15);
    let data = dir.path().join("data");
    std::fs::write(data.join("bag").join("broken.png"), b"not a PNG at all").unwrap();
    std::fs::write(data.join("trouser").join("empty.jpg"), b"").unwrap();
    let (out, cache) = (dir.path().join("bundle"), dir.path().join("cache"));
    // An empty output directory is taken; what a killed run left beside it is swept.
    std::fs::create_dir_all(&out).unwrap();
    let leftover = dir.path().join(".bundle.tmp-999999999-1");
    std::fs::create_dir_all(leftover.join("inside")).unwrap();
    let args = ["--epochs", "2", "--conditions", "clean,haze", "--val-split", "0.3"];
    let output = run(&mut train(&data, &out, &cache, &args));
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("broken.png") && stderr.contains("empty.jpg"), "{stderr}");
    assert!(text(&output.stdout).contains("2 unreadable image(s) skipped"));
    let report = read_json(&out.join("report.json"));
    let named: Vec<&str> = report["unreadable"]
        .as_array()
        .expect("unreadable")
        .iter()
        .map(|u| u["path"].as_str().unwrap())
        .collect();
    assert_eq!(named.len(), 2, "{named:?}");
    assert!(named.iter().any(|p| p.ends_with("bag/broken.png")));
    let conditions = report["validation"]["conditions"].as_array().map(Vec::len);
    assert_eq!(conditions, Some(2), "clean and haze");
    assert!(!leftover.exists(), "the dead run's staging directory is swept");
}

/// A long run (500 epochs) of `data`, logging to `log`, once its log shows `marker`; then
/// `signals` SIGINTs 20 ms apart. Returns the exit status and the log.
fn interrupt(
    data: &Path,
    out: &Path,
    cache: &Path,
    log: &Path,
    marker: &str,
    signals: usize,
) -> (std::process::ExitStatus, String) {
    let mut child = train(data, out, cache, &["--epochs", "500", "--patience", "500"])
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(log).unwrap_or_default().contains(marker) {
        assert!(Instant::now() < deadline, "{}", std::fs::read_to_string(log).unwrap_or_default());
        assert!(child.try_wait().unwrap().is_none(), "{}", std::fs::read_to_string(log).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = child.id().to_string();
    for _ in 0..signals {
        assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().unwrap();
    (status, std::fs::read_to_string(log).unwrap())
}

#[test]
fn ctrl_c_stops_the_run_and_leaves_no_bundle() {
    let dir = tempfile::tempdir().expect("temp dir");
    small_folder(dir.path(), 20);
    let (data, out, cache) =
        (dir.path().join("data"), dir.path().join("bundle"), dir.path().join("cache"));
    let log = dir.path().join("train.log");
    let (status, text) = interrupt(&data, &out, &cache, &log, "epoch=2", 1);
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(text.contains("stopped before the end"), "{text}");
    assert!(!out.exists());
    assert_only(dir.path(), &["cache", "data", "train.log"]);

    // A second Ctrl-C right after the first quits at once, still with 130 (libtorch is not torn
    // down under its running threads); the next run sweeps the staging directory it leaves.
    let (status, text) = interrupt(&data, &out, &cache, &log, "backbone ready", 2);
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(!out.exists());
}

#[test]
fn a_trained_trunk_goes_back_into_the_bundle_and_tract_runs_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    small_folder(dir.path(), 24);
    let (data, out, cache) =
        (dir.path().join("data"), dir.path().join("bundle"), dir.path().join("cache"));
    let args = [
        "--train-backbone",
        "last-stage",
        "--backbone-epochs",
        "2",
        "--backbone-precision",
        "bf16",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--conditions",
        "clean,low-light",
        "--val-split",
        "0.25",
    ];
    let output = run(&mut train(&data, &out, &cache, &args));
    let stderr = text(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("backbone epoch"), "{stderr}");
    assert!(stderr.contains("precision=\"bf16\""), "the trunk trained in bf16: {stderr}");

    let report = read_json(&out.join("report.json"));
    let trunk = &report["backbone_training"];
    assert_eq!(trunk["scope"], "last-stage");
    assert_eq!(report["options"]["backbone_precision"], "bf16");
    assert_eq!(trunk["history"].as_array().map(Vec::len), Some(2));
    assert!(report["agreement"]["fraction"].as_f64().unwrap() >= 0.995, "{}", report["agreement"]);
    assert!(out.join("backbone-training.png").is_file());

    // The written trunk is not the synthetic one it started from.
    let synth = dir.path().join("synth");
    let made = run(edgesight().args(["model", "synth", "--input-size", "32", "--out"]).arg(&synth));
    assert!(made.status.success());
    let trained = std::fs::read(out.join("backbone.onnx")).unwrap();
    assert_ne!(trained, std::fs::read(synth.join("backbone.onnx")).unwrap());
    let verify = run(edgesight().args(["model", "verify"]).arg(&out));
    assert!(verify.status.success(), "verify: {}", text(&verify.stderr));
    // Its maps went to a scratch cache, gone now; the shared cache was not touched.
    assert_only(dir.path(), &["bundle", "data", "synth"]);
}
