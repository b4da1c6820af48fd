//! The `edgesight` command line: the daemon, one-shot classification and the bundle tools.
//!
//! This is the binary's edge, so errors become `anyhow` reports here and exit codes are
//! decided here: 0 when everything asked for worked, 1 when something failed, 2 for a usage
//! or configuration error.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgesight::classify::{Classifier, TABLE_HEADER};
use edgesight::config::{self, Settings};
use edgesight::model::{self, BackendKind, BackendOptions, Bundle, Precision, SynthOptions};
use edgesight::service;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "edgesight",
    version,
    about = "Camera and file streams → image classifications on MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon. Without --config it reads /etc/edgesight/edgesight.toml when present,
    /// and otherwise runs the built-in demo (synthetic model, test pattern, embedded broker).
    Run {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Classify images and videos once; a table, or one JSON object per line with --json.
    Classify {
        /// Model bundle directory.
        #[arg(long, default_value = "models/default")]
        model: PathBuf,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Video frames to classify per second of video.
        #[arg(long, default_value_t = 1.0)]
        fps: f64,
        /// Inference threads; 0 means one per core.
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// `tract` (CPU) or `torch` (builds with the `torch` feature).
        #[arg(long, value_enum, default_value = "tract")]
        backend: BackendKind,
        /// torch: `auto`, `cpu`, `cuda` or `cuda:N`.
        #[arg(long, default_value = "auto")]
        device: String,
        /// torch: `f32`, `bf16` or `f16` (CUDA).
        #[arg(long, value_enum, default_value = "f32")]
        precision: Precision,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Model bundle tools.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Dataset tools for the training mode.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Train a bundle from a folder of labelled images (one subfolder per class); builds with
    /// the `torch` feature.
    Train(TrainArgs),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// The ImageFolder: one subfolder per class, images inside.
    #[arg(long)]
    data: PathBuf,
    /// The bundle directory to write (replaced only if it is a bundle).
    #[arg(long)]
    out: PathBuf,
    /// A ResNet-50 ONNX file for the trunk (default: the synthetic one, seed 0).
    #[arg(long)]
    backbone: Option<PathBuf>,
    /// Square input side in pixels; a multiple of 32.
    #[arg(long, default_value_t = 224)]
    input_size: u32,
    /// Fraction of each class held out for validation (stratified, seeded).
    #[arg(long, default_value_t = 0.2, allow_negative_numbers = true)]
    val_split: f64,
    /// A separate ImageFolder with the same classes, scored in the report.
    #[arg(long)]
    test: Option<PathBuf>,
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Peak learning rate of AdamW (cosine schedule).
    #[arg(long, default_value_t = 1e-3, allow_negative_numbers = true)]
    lr: f64,
    #[arg(long, default_value_t = 1e-2, allow_negative_numbers = true)]
    weight_decay: f64,
    /// Epochs without a better validation loss before training stops.
    #[arg(long, default_value_t = 5)]
    patience: usize,
    /// Fraction of the feature variance the PCA keeps.
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pca_variance: f64,
    /// Most PCA components.
    #[arg(long, default_value_t = 200)]
    max_components: usize,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Conditions for augmentation and evaluation (clean is always evaluated): clean,
    /// low-light, motion-blur, haze, overexposure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "clean,low-light,motion-blur,haze,overexposure"
    )]
    conditions: Vec<String>,
    /// Train the trunk before fitting the PCA and the head: `none` (keep it frozen),
    /// `last-stage` (layer4) or `all`. The trained trunk is written as the bundle's
    /// backbone.onnx.
    #[arg(long, default_value = "none")]
    train_backbone: String,
    /// Epochs of trunk training.
    #[arg(long, default_value_t = 5)]
    backbone_epochs: usize,
    /// Peak learning rate of trunk training (AdamW, cosine schedule).
    #[arg(long, default_value_t = 1e-3, allow_negative_numbers = true)]
    backbone_lr: f64,
    /// Arithmetic of trunk training: `f32`, or `bf16` (1.25-1.5 times as fast on a CPU with
    /// AVX-512 BF16 or AMX, slower where it is emulated; the weights stay f32). Only with
    /// --train-backbone.
    #[arg(long, value_enum, default_value = "f32")]
    backbone_precision: TrunkPrecision,
    /// Feature cache directory (default: ~/.cache/edgesight/features).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// CPU threads; 0 means one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Do not run the clean validation images through tract to compare with tch.
    #[arg(long)]
    skip_agreement: bool,
}

/// The precisions trunk training takes: [`Precision`] less f16, which would need loss scaling.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum TrunkPrecision {
    F32,
    Bf16,
}

#[derive(Subcommand)]
enum DatasetCommand {
    /// Turn MNIST-family IDX files (gzip or not) into an ImageFolder: OUT/<class>/<n>.png.
    ImportIdx {
        /// The images file (e.g. train-images-idx3-ubyte.gz).
        #[arg(long)]
        images: PathBuf,
        /// The labels file (e.g. train-labels-idx1-ubyte.gz).
        #[arg(long)]
        labels: PathBuf,
        /// The folder to create (it must not exist, or be empty).
        #[arg(long)]
        out: PathBuf,
        /// Comma-separated class names in label order (default: Fashion-MNIST's when the files
        /// are recognised, else 0…9).
        #[arg(long, value_delimiter = ',')]
        names: Option<Vec<String>>,
        /// Import only the first N images.
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write a bundle with an architecture-exact ResNet-50 and seeded weights.
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Comma-separated class names.
        #[arg(long, value_delimiter = ',')]
        labels: Option<Vec<String>>,
        /// Square input side in pixels; a multiple of 32.
        #[arg(long, default_value_t = 224)]
        input_size: u32,
    },
    /// Print the stages, shapes, parameter counts, GFLOPs, k and labels of a bundle.
    Inspect { dir: PathBuf },
    /// Check a bundle's checksums and shapes and run one forward pass.
    Verify { dir: PathBuf },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration, or every problem with its key.
    Check { file: Option<PathBuf> },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => run(config.as_deref()),
        Command::Classify { model, json, fps, threads, backend, device, precision, files } => {
            init_logging("warn");
            let options = BackendOptions { kind: backend, device, precision, threads };
            if let Some((flag, message)) = options.problems().into_iter().next() {
                anyhow::bail!("--{flag}: {message}");
            }
            classify(&model, json, fps, &options, &files)
        }
        Command::Model(command) => {
            init_logging("info");
            model_command(command)
        }
        Command::Dataset(DatasetCommand::ImportIdx { images, labels, out, names, limit }) => {
            let options = edgesight::dataset::ImportOptions { images, labels, out, names, limit };
            let summary = edgesight::dataset::import_idx(&options)?;
            let kind = if summary.fashion_mnist { " (Fashion-MNIST)" } else { "" };
            println!("wrote {} images{kind} to {}", summary.images, options.out.display());
            for (name, count) in &summary.per_class {
                println!("  {name:<12} {count}");
            }
            let empty: Vec<&str> = summary
                .per_class
                .iter()
                .filter(|(_, n)| *n == 0)
                .map(|(c, _)| c.as_str())
                .collect();
            if !empty.is_empty() {
                eprintln!(
                    "warning: no images for {}: `edgesight train` refuses an empty class; raise \
                     --limit or remove those folders",
                    empty.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(args) => {
            init_logging("info");
            train(args)
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let file = file.or_else(system_config);
            match Settings::load(file.as_deref()) {
                Ok(settings) => {
                    print!("{}", settings.to_toml());
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => {
                    eprintln!("{error}");
                    Ok(ExitCode::from(2))
                }
            }
        }
    }
}

fn system_config() -> Option<PathBuf> {
    let path = PathBuf::from(config::SYSTEM_CONFIG);
    path.is_file().then_some(path)
}

fn run(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let file = config.map(Path::to_path_buf).or_else(system_config);
    let settings = match &file {
        Some(file) => match Settings::load(Some(file)) {
            Ok(settings) => settings,
            Err(error) => {
                eprintln!("{error}");
                return Ok(ExitCode::from(2));
            }
        },
        None => Settings::demo(&service::cache_dir()),
    };
    init_logging(&settings.log);
    if file.is_none() {
        tracing::info!(
            cache = %service::cache_dir().display(),
            "no config file: running the demo (synthetic model, test pattern); Ctrl-C stops it"
        );
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let outcome = match runtime.block_on(service::run(settings, file)) {
        Ok(outcome) => outcome,
        Err(error @ service::ServiceError::Model { .. }) => {
            eprintln!("error: {error}");
            return Ok(ExitCode::from(2));
        }
        Err(error) => return Err(error.into()),
    };
    Ok(if outcome.all_failed() || outcome.unacknowledged > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn classify(
    model_dir: &Path,
    json: bool,
    fps: f64,
    options: &BackendOptions,
    files: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    if !fps.is_finite() || fps <= 0.0 {
        anyhow::bail!("--fps must be above 0, not {fps}");
    }
    let bundle = Bundle::open(model_dir).with_context(|| {
        if model_dir.exists() {
            "cannot open the model bundle".to_string()
        } else {
            format!(
                "no model bundle at {} (make one with `edgesight model synth --out {0}`, or \
                 pass --model DIR)",
                model_dir.display()
            )
        }
    })?;
    let backend = model::open_backend(&bundle, options)?;
    let mut classifier = Classifier::new(backend, &bundle, fps);
    // A reader that went away (`| head`) ends the run quietly instead of a panic in println!.
    let mut stdout = std::io::stdout().lock();
    let mut closed = false;
    if !json {
        closed = writeln!(stdout, "{TABLE_HEADER}").is_err();
    }
    let mut failed = 0;
    for file in files {
        if closed {
            break;
        }
        let ok = classifier.classify_path(file, &mut |row| {
            let line = if json {
                serde_json::to_string(&row).unwrap_or_default()
            } else {
                row.table_line()
            };
            closed = closed || writeln!(stdout, "{line}").is_err();
        });
        if !ok {
            failed += 1;
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} inputs failed", files.len());
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(feature = "torch")]
fn train(args: TrainArgs) -> anyhow::Result<ExitCode> {
    use edgesight::train::TrainError;
    use edgesight::train::conditions::Condition;
    use edgesight::train::run::{self, TrainOptions};
    use edgesight::train::trunk_fit::TrainBackbone;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let mut conditions = Vec::new();
    for name in &args.conditions {
        match Condition::parse(name.trim()) {
            Some(condition) => conditions.push(condition),
            None => {
                eprintln!(
                    "error: --conditions: unknown condition {name:?} (clean, low-light, \
                     motion-blur, haze, overexposure)"
                );
                return Ok(ExitCode::from(2));
            }
        }
    }
    let Some(train_backbone) = TrainBackbone::parse(&args.train_backbone) else {
        eprintln!(
            "error: --train-backbone: {:?} is not none, last-stage or all",
            args.train_backbone
        );
        return Ok(ExitCode::from(2));
    };
    let options = TrainOptions {
        data: args.data,
        out: args.out,
        backbone: args.backbone,
        input_size: args.input_size,
        val_split: args.val_split,
        test: args.test,
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        weight_decay: args.weight_decay,
        patience: args.patience,
        pca_variance: args.pca_variance,
        max_components: args.max_components,
        device: args.device,
        seed: args.seed,
        conditions,
        train_backbone,
        backbone_epochs: args.backbone_epochs,
        backbone_lr: args.backbone_lr,
        backbone_precision: match args.backbone_precision {
            TrunkPrecision::F32 => Precision::F32,
            TrunkPrecision::Bf16 => Precision::Bf16,
        },
        cache: args.cache.unwrap_or_else(|| service::cache_dir().join("features")),
        threads: args.threads,
        skip_agreement: args.skip_agreement,
        progress: std::io::stderr().is_terminal(),
    };
    // Ctrl-C or SIGTERM: the run stops at the next batch and removes its staging directory. A
    // second one ends the process at once (a step such as the PCA's eigen-decomposition cannot
    // be cut short); the next run sweeps what that leaves beside --out.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        runtime.block_on(async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            for round in 0..2 {
                let terminated = async {
                    match term.as_mut() {
                        Some(term) => term.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminated => {}
                }
                if round == 0 {
                    tracing::warn!(
                        "stopping: the run ends at the next batch and writes nothing (again to \
                         quit at once)"
                    );
                    flag.store(true, Ordering::Relaxed);
                }
            }
        });
        tracing::warn!("second stop request: quitting now");
        // `_exit`, not `exit`: exit-time destructors would tear libtorch down under the threads
        // still running in it (a segmentation fault instead of status 130).
        // SAFETY: `_exit` ends the process at once; nothing runs after it.
        unsafe { libc::_exit(130) };
    });
    let outcome = match run::train(&options, &stop) {
        Ok(outcome) => outcome,
        Err(error @ (TrainError::Usage(_) | TrainError::Interrupted)) => {
            eprintln!("error: {error}");
            let code = if matches!(error, TrainError::Interrupted) { 130 } else { 2 };
            return Ok(ExitCode::from(code));
        }
        Err(error) => {
            return Err(anyhow::Error::new(error)
                .context(format!("training from {} failed", options.data.display())));
        }
    };
    let report = &outcome.report;
    println!("wrote {}", outcome.out.display());
    println!(
        "  k = {} (variance kept {:.3}), best epoch {} of {}",
        report.k,
        report.variance_kept,
        report.best_epoch,
        report.history.len()
    );
    for (name, set) in [("validation", Some(&report.validation)), ("test", report.test.as_ref())] {
        let Some(set) = set else { continue };
        println!(
            "  {name}: accuracy {:.4}, loss {:.4} (clean, {} images)",
            set.clean.accuracy, set.clean.loss, set.clean.images
        );
        for score in &set.conditions {
            println!("    {:<13} {:.4}", score.condition, score.accuracy);
        }
    }
    if let Some(agreement) = &report.agreement {
        println!(
            "  tract and tch agree on {} of {} clean validation images",
            agreement.same_top1, agreement.images
        );
    }
    if !report.unreadable.is_empty() {
        println!("  {} unreadable image(s) skipped (see report.json)", report.unreadable.len());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "torch"))]
fn train(_args: TrainArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!(
        "this build has no training mode: build with `--features torch` (README, \"Training\")"
    )
}

fn model_command(command: ModelCommand) -> anyhow::Result<ExitCode> {
    match command {
        ModelCommand::Synth { out, seed, labels, input_size } => {
            if input_size < 32 || input_size % 32 != 0 {
                anyhow::bail!("--input-size must be a positive multiple of 32, not {input_size}");
            }
            let mut options = SynthOptions { seed, input_size, ..SynthOptions::default() };
            if let Some(labels) = labels {
                options.labels = labels;
            }
            model::synth::write_bundle(&out, &options)
                .with_context(|| format!("cannot write a bundle to {}", out.display()))?;
            println!("wrote {}", out.display());
        }
        ModelCommand::Inspect { dir } => {
            let bundle = Bundle::open(&dir)?;
            print!("{}", model::inspect(&bundle)?);
        }
        ModelCommand::Verify { dir } => {
            println!("{}", model::verify(&dir)?);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Logs go to stderr (stdout carries results). The embedded broker logs every client
/// connection at INFO and a port probe as an ERROR; the daemon reports the broker's health
/// itself, so that target is off unless the filter names it.
fn init_logging(default: &str) {
    let default = if default.contains("rumqttd") {
        default.to_string()
    } else {
        format!("{default},rumqttd=off")
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&default))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
