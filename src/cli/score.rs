//! `armorm score`: a dataset in, the same rows with every model output appended out.

use anyhow::{anyhow, Context, Result};
use clap::{Args, ValueEnum};

use armorm::checkpoint::{input_fingerprint, Checkpoint};
use armorm::input;
use armorm::output::{self, Target, TopK};
use armorm::pipeline::{self, Opener, Options};
use armorm::shard::Shard;

use super::progress::Progress;
use super::{ColumnArgs, Loaded, ModelArgs, RunArgs};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnError {
    Fail,
    Skip,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Truncate {
    None,
    PromptLeft,
}

/// Some rows were kept without scores: the run finished, but not every row is scored (exit code 3).
#[derive(Debug, thiserror::Error)]
#[error("{0} rows could not be scored; they are in the output with status and error columns")]
pub struct RowsSkipped(pub usize);

#[derive(Args)]
pub struct ScoreArgs {
    /// JSONL (.jsonl, .ndjson) or Parquet files, scored in order as one dataset; - reads JSONL from stdin.
    #[arg(required = true)]
    inputs: Vec<String>,
    /// .parquet or .jsonl, or - for JSONL on stdout [default: FIRST_INPUT's stem + .scores.parquet]
    #[arg(short, long)]
    output: Option<String>,
    /// Rows read, tokenized, sorted by length and written together (one Parquet row group each):
    /// larger windows pad less, smaller ones hold less memory.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    window_rows: u64,
    /// Score only shard K of N (K from 0): rows i with i mod N = K, counted over all inputs. OUTPUT is
    /// then a directory that receives part-K-of-N.parquet. `auto` takes K and N from a Slurm job array
    /// or a Kubernetes Indexed Job (with --shard-count).
    #[arg(long, value_name = "K/N|auto")]
    shard: Option<String>,
    /// N for `--shard auto` under a Kubernetes Indexed Job (its completions).
    #[arg(long, value_name = "N")]
    shard_count: Option<usize>,
    /// fail: the first bad row stops the run (nothing is written). skip: bad rows are kept with null
    /// scores and `status`/`error` columns, and the exit code is 3.
    #[arg(long, value_enum, default_value = "fail")]
    on_error: OnError,
    /// none: a row over --max-length is an error (status `too_long` under --on-error skip).
    /// prompt-left: drop its oldest prompt tokens, keeping BOS, the first header and the gating tokens
    /// (status `truncated`).
    #[arg(long, value_enum, default_value = "none")]
    truncate: Truncate,
    /// Continue an interrupted run of the same command: the windows it completed are kept, the rest
    /// scored. Refused when the inputs or the settings differ.
    #[arg(long)]
    resume: bool,
    /// Also write `top_attributes` and `top_coefficients`: the K objectives of largest |coefficient|.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    columns: ColumnArgs,
    #[command(flatten)]
    run: RunArgs,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let shard = match args.shard.as_deref() {
        None => None,
        Some("auto") => Some(
            Shard::from_env(|k| std::env::var(k).ok(), args.shard_count).map_err(|m| anyhow!(m))?,
        ),
        Some(spec) => Some(Shard::parse(spec).map_err(|m| anyhow!(m))?),
    };
    let target = match (&args.output, shard) {
        (Some(o), None) => Target::parse(o)?,
        (None, None) => Target::default_for(&args.inputs[0]),
        (o, Some(s)) => shard_target(o.as_deref(), &args.inputs[0], s)?,
    };
    let job = Job {
        inputs: &args.inputs,
        window_rows: args.window_rows as usize,
        top_k: args.top_k,
        shard,
        skip_bad: args.on_error == OnError::Skip,
        truncate: args.truncate == Truncate::PromptLeft,
        resume: args.resume,
        model: &args.model,
        columns: &args.columns,
        run: &args.run,
    };
    job.score_into(&target)?;
    Ok(())
}

/// OUTPUT/part-K-of-N.parquet, OUTPUT defaulting to the first input's stem + `.scores`; the directory is
/// created, since N processes on N machines share it.
fn shard_target(dir: Option<&str>, first_input: &str, shard: Shard) -> Result<Target> {
    let dir = match dir {
        Some("-") => return Err(anyhow!("--shard writes files: give -o DIRECTORY")),
        Some(d) => std::path::PathBuf::from(d),
        None => {
            let p = std::path::Path::new(first_input);
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
            p.with_file_name(format!("{stem}.scores"))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(Target::parse(
        &dir.join(shard.file_name("parquet")).display().to_string(),
    )?)
}

/// A scoring run, also used by the commands that score raw data before their own work.
pub struct Job<'a> {
    pub inputs: &'a [String],
    pub window_rows: usize,
    pub top_k: Option<usize>,
    pub shard: Option<Shard>,
    pub skip_bad: bool,
    pub truncate: bool,
    pub resume: bool,
    pub model: &'a ModelArgs,
    pub columns: &'a ColumnArgs,
    pub run: &'a RunArgs,
}

impl Job<'_> {
    pub fn score_into(&self, target: &Target) -> Result<()> {
        let devices = self.model.devices()?;
        let lanes = self.run.apply_threads(devices.iter().all(|d| d.is_cpu()));
        let loaded = self.model.load(&devices, lanes)?;
        // Files go through a checkpoint (parts beside the target, joined at the end) so that a killed
        // run can be resumed; stdout streams directly.
        let (sink, skip_windows): (Box<dyn output::Sink + Send>, usize) = match &target.path {
            Some(_) => {
                let (c, done) = Checkpoint::open(
                    target,
                    &self.fingerprint(&loaded),
                    self.resume,
                    metadata(&loaded),
                )?;
                if done > 0 && !self.run.quiet {
                    eprintln!("armorm: resuming after {done} complete windows");
                }
                (Box::new(c), done)
            }
            None if self.resume => {
                return Err(anyhow!(
                    "--resume needs an output file (-o FILE), not stdout"
                ))
            }
            None => (output::open(target, metadata(&loaded))?, 0),
        };
        let progress = Progress::new(self.run.quiet, total_size(self.inputs));
        let top = self.top_k.map(|k| TopK {
            k,
            attributes: armorm::attribute_names(loaded.config.num_objectives),
        });
        let options = Options {
            top,
            shard: self.shard,
            skip_bad: self.skip_bad,
            truncate_prompt_left: self.truncate,
            skip_windows,
        };
        let stats = pipeline::run(self.openers(), &loaded.scorer, sink, options, &progress)?;
        progress.finish(&stats);
        if let Some(profile) = loaded.scorer.profile() {
            eprint!("{}", super::progress::profile(&profile.report()));
        }
        if stats.skipped > 0 {
            return Err(RowsSkipped(stats.skipped).into());
        }
        Ok(())
    }

    /// Everything that decides which rows go into which window and how they are scored: a resumed run
    /// must match the interrupted one on all of it.
    fn fingerprint(&self, loaded: &Loaded) -> serde_json::Value {
        serde_json::json!({
            "armorm": env!("CARGO_PKG_VERSION"),
            "model": loaded.files.name,
            "revision": loaded.files.revision,
            "dtype": format!("{:?}", loaded.dtype),
            "inputs": self.inputs.iter().map(|p| input_fingerprint(p)).collect::<Vec<_>>(),
            "columns": [&self.columns.prompt_column, &self.columns.response_column, &self.columns.messages_column],
            "window_rows": self.window_rows,
            "max_batch_tokens": self.model.max_batch_tokens,
            "max_length": loaded.scorer.max_length(),
            "shard": self.shard.map(|s| format!("{}/{}", s.index, s.count)),
            "top_k": self.top_k,
            "skip_bad": self.skip_bad,
            "truncate": self.truncate,
        })
    }

    /// Each input's opener, with its share of the total size for progress.
    fn openers(&self) -> Vec<(String, f64, Opener)> {
        let sizes: Vec<Option<u64>> = self.inputs.iter().map(|p| file_size(p)).collect();
        let total: u64 = sizes.iter().flatten().sum();
        self.inputs
            .iter()
            .zip(sizes)
            .map(|(path, size)| {
                let share = match (size, total) {
                    (Some(s), t) if t > 0 => s as f64 / t as f64,
                    _ => 0.0,
                };
                let (p, names, window) = (path.clone(), self.columns.names(), self.window_rows);
                let skip = self.skip_bad;
                let open: Opener = Box::new(move || input::open(&p, &names, window, skip));
                (path.clone(), share, open)
            })
            .collect()
    }
}

fn file_size(path: &str) -> Option<u64> {
    (path != "-")
        .then(|| std::fs::metadata(path).ok().map(|m| m.len()))
        .flatten()
}

/// Known only when no input is stdin.
fn total_size(inputs: &[String]) -> bool {
    inputs.iter().all(|p| file_size(p).is_some())
}

/// Parquet key-value metadata: what the numbers mean and where they came from.
pub fn metadata(loaded: &Loaded) -> Vec<(String, String)> {
    let names = armorm::attribute_names(loaded.config.num_objectives);
    vec![
        (
            "armorm.attributes".into(),
            serde_json::to_string(&names).unwrap_or_default(),
        ),
        ("armorm.model".into(), loaded.files.name.clone()),
        (
            "armorm.revision".into(),
            loaded.files.revision.clone().unwrap_or_default(),
        ),
        ("armorm.version".into(), env!("CARGO_PKG_VERSION").into()),
        (
            "armorm.dtype".into(),
            format!("{:?}", loaded.dtype).to_lowercase(),
        ),
    ]
}
