//! `armorm score`: a dataset in, the same rows with every model output appended out.

use anyhow::{anyhow, Context, Result};
use clap::{Args, ValueEnum};

use armorm::checkpoint::{self, file_fingerprint, Checkpoint, Earlier};
use armorm::input::{self, InputFile, MemoryRow, MemorySource};
use armorm::output::{self, MemorySink, Sink, Target, TopK};
use armorm::pipeline::{self, InputSource, Opener, Options, PipelineError, Policy};
use armorm::provenance::Provenance;
use armorm::shard::Shard;
use polars::prelude::DataFrame;

use super::inputs;
use super::progress::Progress;
use super::{ColumnArgs, Loaded, ModelArgs, Reading, RunArgs};

/// `--window-rows`, also the window of the commands that score before their own work.
const DEFAULT_WINDOW_ROWS: usize = 4096;

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
    /// JSONL (.jsonl, .ndjson) or Parquet files, scored in order as one dataset; - reads JSONL from stdin;
    /// hf://datasets/OWNER/NAME[@REVISION][/PATH_OR_GLOB] reads a dataset from the Hugging Face hub.
    #[arg(required = true)]
    inputs: Vec<String>,
    /// .parquet or .jsonl, or - for JSONL on stdout [default: FIRST_INPUT's stem + .scores.parquet;
    /// for a hub dataset, NAME.scores.parquet in the current directory]
    #[arg(short, long)]
    output: Option<String>,
    /// Rows read, tokenized, sorted by length and written together (one Parquet row group each):
    /// larger windows pad less, smaller ones hold less memory.
    #[arg(long, default_value_t = DEFAULT_WINDOW_ROWS as u64, value_parser = clap::value_parser!(u64).range(1..))]
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
    /// scored. Refused when the inputs or the settings differ, and for stdin.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Discard the scored windows that an interrupted run of the same output left (without it or
    /// --resume, such a run is refused).
    #[arg(long)]
    overwrite: bool,
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
    // A bad -o is refused before any download; the shard folder is created after, so that a dataset
    // that cannot be found leaves nothing behind.
    let single = match &args.output {
        Some(o) if shard.is_none() => Some(Target::parse(o)?),
        _ => None,
    };
    let files = inputs::resolve(&args.inputs, args.run.quiet)?;
    let target = match (single, shard) {
        (Some(t), _) => t,
        (None, None) => Target::default_for(&args.inputs[0]),
        (None, Some(s)) => shard_target(args.output.as_deref(), &args.inputs[0], s)?,
    };
    refuse_input_as_output(&target, &files)?;
    let job = Job {
        window_rows: args.window_rows as usize,
        top_k: args.top_k,
        shard,
        policy: Policy {
            skip_bad: args.on_error == OnError::Skip,
            truncate: args.truncate == Truncate::PromptLeft,
        },
        earlier: match (args.resume, args.overwrite) {
            (true, _) => Earlier::Resume,
            (false, true) => Earlier::Overwrite,
            (false, false) => Earlier::Keep,
        },
        ..Job::new(&args.model, args.columns.reading(), &args.run)
    };
    job.score_files(&files, &target)
        .map_err(|e| resumable(e, &target))
}

/// A run that stopped while scoring, after committing windows, says how to keep them.
fn resumable(e: anyhow::Error, target: &Target) -> anyhow::Error {
    let saved = target.path.as_deref().map_or(0, checkpoint::saved_windows);
    if saved == 0 || !e.is::<PipelineError>() {
        return e;
    }
    anyhow!("{e}; {saved} scored windows are kept: run the same command again with --resume to continue")
}

/// Writing over an input would destroy it while it is read (and before `--resume` can re-read it).
fn refuse_input_as_output(target: &Target, inputs: &[InputFile]) -> Result<()> {
    let Some(out) = target.path.as_deref().and_then(canonical) else {
        return Ok(());
    };
    match inputs
        .iter()
        .find(|i| i.path != "-" && canonical(std::path::Path::new(&i.path)).as_ref() == Some(&out))
    {
        Some(input) => Err(anyhow!(
            "{}: the output is the input {}; choose another -o",
            out.display(),
            input.label
        )),
        None => Ok(()),
    }
}

/// `path` with links and `..` resolved; for a file not created yet, its folder's canonical path and
/// its name.
fn canonical(path: &std::path::Path) -> Option<std::path::PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Some(p);
    }
    let parent = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    Some(parent.canonicalize().ok()?.join(path.file_name()?))
}

/// OUTPUT/part-K-of-N.parquet, OUTPUT defaulting to the first input's stem + `.scores` (a hub
/// dataset's NAME.scores in the current directory); the directory is created, since N processes on N
/// machines share it.
fn shard_target(dir: Option<&str>, first_input: &str, shard: Shard) -> Result<Target> {
    let dir = match dir {
        Some("-") => return Err(anyhow!("--shard writes files: give -o DIRECTORY")),
        Some(d) => std::path::PathBuf::from(d),
        None => output::with_suffix(&input::output_stem(first_input), ".scores"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(Target::parse(
        &dir.join(shard.file_name("parquet")).display().to_string(),
    )?)
}

/// A scoring run as the command line built it (`armorm score`'s flags, or `Job::new`'s defaults for
/// the commands that score before their own work); from here on only built values.
pub struct Job<'a> {
    pub window_rows: usize,
    pub top_k: Option<usize>,
    pub shard: Option<Shard>,
    pub policy: Policy,
    /// What to do with the parts an interrupted run of the same output left.
    pub earlier: Earlier,
    pub reading: Reading,
    pub model: &'a ModelArgs,
    pub run: &'a RunArgs,
}

impl<'a> Job<'a> {
    /// Every row scored whole, in windows of the default size, stopping at the first bad one.
    pub fn new(model: &'a ModelArgs, reading: Reading, run: &'a RunArgs) -> Self {
        Self {
            window_rows: DEFAULT_WINDOW_ROWS,
            top_k: None,
            shard: None,
            policy: Policy::default(),
            earlier: Earlier::Keep,
            reading,
            model,
            run,
        }
    }

    /// `inputs` (files, or `-`) scored into `target`.
    pub fn score_files(&self, inputs: &[InputFile], target: &Target) -> Result<()> {
        let resume = self.earlier == Earlier::Resume;
        if resume && inputs.iter().any(|i| i.path == "-") {
            return Err(anyhow!(
                "--resume cannot check that stdin holds the same rows as the interrupted run: save \
                 the input to a file and score that"
            ));
        }
        let (_signals, devices, loaded) = self.load()?;
        // Files go through a checkpoint (parts beside the target, joined at the end) so that a killed
        // run can be resumed; stdout streams directly.
        let (sink, skip_windows): (Box<dyn Sink + Send>, usize) = match &target.path {
            Some(_) => {
                let (c, done) = Checkpoint::open(
                    target,
                    &self.fingerprint(inputs, &loaded, &devices),
                    self.earlier,
                    metadata(&loaded),
                )?;
                if done > 0 && !self.run.quiet {
                    eprintln!("armorm: resuming after {done} complete windows");
                }
                (Box::new(c), done)
            }
            None if resume => {
                return Err(anyhow!(
                    "--resume needs an output file (-o FILE), not stdout"
                ))
            }
            None => (output::open(target, metadata(&loaded))?, 0),
        };
        let progress = Progress::new(self.run.quiet, total_size(inputs));
        self.score(&loaded, self.openers(inputs), sink, skip_windows, &progress)
    }

    /// `rows` scored in this process: the input's frames with the score columns, in order.
    pub fn score_rows(&self, name: &str, rows: Vec<MemoryRow>) -> Result<DataFrame> {
        self.score_to_memory(vec![self.memory_input(name, rows)])
    }

    /// `rows` scored in this process under a policy that keeps bad rows (`skip_bad`): all of them, with
    /// `status` and `error`, even when some have no scores (for a command that judges them itself),
    /// and the provenance of the model and template that scored them.
    pub fn score_rows_keeping_skipped(
        &self,
        name: &str,
        rows: Vec<MemoryRow>,
    ) -> Result<(DataFrame, Provenance)> {
        let sink = MemorySink::default();
        let (loaded, scored) = self.score_into(vec![self.memory_input(name, rows)], &sink)?;
        match scored {
            Err(e) if !e.is::<RowsSkipped>() => Err(e),
            _ => Ok((sink.frame()?, loaded.provenance)),
        }
    }

    fn memory_input(&self, name: &str, rows: Vec<MemoryRow>) -> InputSource {
        let window = self.window_rows;
        let open: Opener = Box::new(move || Ok(Box::new(MemorySource::new(rows, window))));
        InputSource {
            name: name.to_string(),
            share: 1.0,
            open,
        }
    }

    /// Inputs scored in this process, their frames kept instead of written.
    pub fn score_to_memory(&self, inputs: Vec<InputSource>) -> Result<DataFrame> {
        let sink = MemorySink::default();
        self.score_into(inputs, &sink)?.1?;
        Ok(sink.frame()?)
    }

    /// Inputs scored into `sink`: the model loaded (an error if it could not be), and how the
    /// scoring ended.
    fn score_into(
        &self,
        inputs: Vec<InputSource>,
        sink: &MemorySink,
    ) -> Result<(Loaded, Result<()>)> {
        let (_signals, _, loaded) = self.load()?;
        let progress = Progress::new(self.run.quiet, true);
        let scored = self.score(&loaded, inputs, Box::new(sink.clone()), 0, &progress);
        Ok((loaded, scored))
    }

    /// The model on its devices, with signals caught from here on: a stop keeps the committed windows
    /// (see armorm::signal).
    fn load(&self) -> Result<(armorm::signal::Catch, Vec<candle_core::Device>, Loaded)> {
        let signals = armorm::signal::Catch::install();
        let devices = self.model.devices()?;
        let lanes = self.run.apply_threads(devices.iter().all(|d| d.is_cpu()));
        let loaded = self.model.load(&devices, lanes)?;
        Ok((signals, devices, loaded))
    }

    fn score(
        &self,
        loaded: &Loaded,
        inputs: Vec<InputSource>,
        sink: Box<dyn Sink + Send>,
        skip_windows: usize,
        progress: &Progress,
    ) -> Result<()> {
        let top = self.top_k.map(|k| TopK {
            k,
            attributes: armorm::attribute_names(loaded.config.num_objectives),
        });
        let options = Options {
            top,
            shard: self.shard,
            policy: self.policy,
            skip_windows,
            rename_input_columns: self.reading.rename_input_columns,
        };
        let stats = pipeline::run(
            inputs,
            &loaded.encode,
            &loaded.scorer,
            sink,
            options,
            progress,
        )?;
        progress.finish(&stats, &loaded.scorer.setup());
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
    fn fingerprint(
        &self,
        inputs: &[InputFile],
        loaded: &Loaded,
        devices: &[candle_core::Device],
    ) -> serde_json::Value {
        // The kind of device, not its number: cuda:0 and cuda:1 compute the same numbers.
        let mut kinds: Vec<&str> = devices
            .iter()
            .map(|d| match d.location() {
                candle_core::DeviceLocation::Cpu => "cpu",
                candle_core::DeviceLocation::Cuda { .. } => "cuda",
                candle_core::DeviceLocation::Metal { .. } => "metal",
            })
            .collect();
        kinds.dedup();
        serde_json::json!({
            "armorm": env!("CARGO_PKG_VERSION"),
            "parts": "parquet",
            "model": loaded.files.name,
            "revision": loaded.files.revision,
            "commit": loaded.files.commit,
            "model_hash": loaded.provenance.model_hash,
            "template_hash": loaded.provenance.template_hash,
            "dtype": format!("{:?}", loaded.dtype),
            "attention": loaded.provenance.attention,
            "fused_ops": loaded.scorer.fused_ops(),
            "vector_ops": loaded.scorer.vector_ops(),
            "fused_qkv": loaded.scorer.fused_qkv(),
            "gate_up": loaded.scorer.fused_gate_up(),
            "accumulate": loaded.scorer.accumulate(),
            "residual": loaded.scorer.residual_dtype().as_str(),
            "device": kinds,
            "inputs": inputs.iter().map(file_fingerprint).collect::<Vec<_>>(),
            "columns": [&self.reading.names.prompt, &self.reading.names.response, &self.reading.names.messages],
            "max_line_bytes": self.reading.max_line_bytes,
            "rename_input_columns": self.reading.rename_input_columns,
            "window_rows": self.window_rows,
            "max_batch_tokens": self.model.max_batch_tokens.to_string(),
            "prefix_sharing": self.model.prefix_sharing,
            "max_length": loaded.encode.max_length,
            "shard": self.shard.map(|s| format!("{}/{}", s.index, s.count)),
            "top_k": self.top_k,
            // Parts written before a column was added cannot be joined with parts that have it.
            "output_columns": output::written_columns(self.policy.status_columns(), self.top_k.is_some()),
            "skip_bad": self.policy.skip_bad,
            "truncate": self.policy.truncate,
        })
    }

    /// Each input's opener, with its share of the total size for progress.
    pub fn openers(&self, inputs: &[InputFile]) -> Vec<InputSource> {
        let sizes: Vec<Option<u64>> = inputs.iter().map(|f| file_size(&f.path)).collect();
        let total: u64 = sizes.iter().flatten().sum();
        inputs
            .iter()
            .zip(sizes)
            .map(|(file, size)| {
                let share = match (size, total) {
                    (Some(s), t) if t > 0 => s as f64 / t as f64,
                    _ => 0.0,
                };
                let (f, names, window) =
                    (file.clone(), self.reading.names.clone(), self.window_rows);
                let (skip, max_line) = (self.policy.skip_bad, self.reading.max_line_bytes);
                let open: Opener =
                    Box::new(move || input::open_as(&f, &names, window, skip, max_line));
                InputSource {
                    name: file.label.clone(),
                    share,
                    open,
                }
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
fn total_size(inputs: &[InputFile]) -> bool {
    inputs.iter().all(|f| file_size(&f.path).is_some())
}

/// Parquet key-value metadata: what the numbers mean and where they came from (see
/// `armorm::provenance`).
pub fn metadata(loaded: &Loaded) -> Vec<(String, String)> {
    let names = armorm::attribute_names(loaded.config.num_objectives);
    let mut kv = vec![(
        "armorm.attributes".into(),
        serde_json::to_string(&names).unwrap_or_default(),
    )];
    kv.extend(loaded.provenance.to_metadata());
    kv
}
