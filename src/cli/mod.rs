//! Command-line definitions shared by the subcommands, and the dispatch to them.

mod best_of_n;
mod eval;
mod explain;
mod filter;
mod inputs;
mod kernels;
mod progress;
mod rescore;
pub mod score;
pub mod verify;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use armorm::budget::{self, BatchTokens};
use armorm::input::{
    ColumnNames, DEFAULT_MAX_LINE_BYTES, MESSAGES_COLUMN, PROMPT_COLUMN, RESPONSE_COLUMN,
};
use armorm::loader::{self, ModelFiles, DEFAULT_MODEL};
use armorm::model::{ArmoRMConfig, AttentionKind, Profile};
use armorm::pipeline::EncodeStage;
use armorm::provenance::{self, Provenance};
use armorm::scorer::Scorer;

#[derive(Parser)]
#[command(
    name = "armorm",
    version,
    about = "Score prompt/response pairs with the ArmoRM reward model"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score a dataset: every row gets score, rewards, gating, coefficients, num_tokens and input_hash.
    Score(score::ScoreArgs),
    /// Show the objectives that drive each row's score (top K by |coefficient|).
    Explain(explain::ExplainArgs),
    /// Pairwise accuracy on chosen/rejected rows, overall, per subset and per RewardBench section.
    Eval(eval::EvalArgs),
    /// Keep the rows of a scored file that meet an SQL condition, or the best fraction by score.
    Filter(filter::FilterArgs),
    /// Per prompt, keep the best-scored response, or emit DPO pairs (best vs worst).
    #[command(name = "best-of-n")]
    BestOfN(best_of_n::BestOfNArgs),
    /// Re-score a random sample of a scored file's rows and compare (f32 on the CPU by default): exit
    /// code 4 when outputs differ past the tolerance or rows' tokens changed.
    Verify(verify::VerifyArgs),
    /// A new score from a scored file's stored rewards and coefficients, without the model: objectives
    /// re-weighted (--weights), fixed coefficients (--coefficients fixed:...) or a subset (--objectives).
    Rescore(rescore::RescoreArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score(args) => score::run(args),
        Command::Explain(args) => explain::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Filter(args) => filter::run(args),
        Command::BestOfN(args) => best_of_n::run(args),
        Command::Verify(args) => verify::run(args),
        Command::Rescore(args) => rescore::run(args),
    }
}

/// Which model, where it runs, and how rows are batched.
#[derive(Args)]
pub struct ModelArgs {
    /// A model directory, or a Hugging Face repo id (read from the standard HF cache, else downloaded).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Hub revision (branch, tag or commit) when --model is a repo id.
    #[arg(long)]
    revision: Option<String>,
    /// cpu, cuda, cuda:N or metal, or a list (cuda:0,cuda:1) for one model per device
    /// [default: the first CUDA device if there is one, else cpu]
    #[arg(long)]
    device: Option<String>,
    /// Compute dtype of the backbone: auto is bf16 on GPU and f32 on CPU.
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "bf16", "f16"])]
    dtype: String,
    /// Padded tokens per forward pass (rows × longest row), cached prompts included; auto: 16384 on
    /// the CPU, from the free memory on a GPU (at most 65536). Results do not depend on it.
    #[arg(long, default_value = "auto")]
    max_batch_tokens: BatchTokens,
    /// auto: rows of a window with the same prompt (up to the assistant header) run it once and
    /// reuse its keys and values; off: every row runs whole. Results do not depend on it.
    #[arg(long, default_value = "auto", value_parser = ["auto", "off"])]
    prefix_sharing: String,
    /// auto: flash attention where it can run (a flash-attn build, CUDA, bf16/f16, head dim 128), else
    /// blocked; flash: refused where it cannot run; flash3: FlashAttention-3 (experimental; a
    /// flash-attn-v3 build on an H100/H200), refused elsewhere; blocked: padded causal attention in
    /// query blocks.
    #[arg(long, default_value = "auto", value_parser = attention_values())]
    attention: String,
    /// Longest conversation accepted, in tokens [default: the model's max_position_embeddings].
    #[arg(long)]
    max_length: Option<usize>,
    /// Accept a --max-length above the model's max_position_embeddings: positions the model was not
    /// trained for, whose scores are not to be trusted.
    #[arg(long)]
    allow_beyond_max_positions: bool,
}

/// A loaded encoder and scorer, and what output metadata needs to say about it.
pub struct Loaded {
    pub encode: EncodeStage,
    pub scorer: Scorer,
    pub config: ArmoRMConfig,
    pub files: ModelFiles,
    pub dtype: candle_core::DType,
    pub provenance: Provenance,
}

impl ModelArgs {
    /// The devices named by `--device` (or the default one), before anything is loaded on them.
    pub fn devices(&self) -> Result<Vec<candle_core::Device>> {
        // `cuda:0,cuda:1`: one model per device, all fed from the same queue of windows.
        Ok(match self.device.as_deref() {
            Some(list) => list
                .split(',')
                .map(|d| open_device(Some(d.trim())))
                .collect::<Result<Vec<_>>>()?,
            None => vec![open_device(None)?],
        })
    }

    /// One model per device; `lanes` batches at once on each (see `Scorer::with_lanes`).
    pub fn load(&self, devices: &[candle_core::Device], lanes: usize) -> Result<Loaded> {
        let files = loader::resolve(&self.model, self.revision.as_deref())?;
        // Before the weights are read, which takes a while for the real model.
        let config = loader::read_config(&files.dir)
            .with_context(|| format!("loading model {}", files.name))?;
        let max_length = self.max_length(&config, &files.dir.join("config.json"))?;
        let dtype = loader::dtype(&self.dtype, &devices[0])?;
        let mut models = Vec::with_capacity(devices.len());
        let mut loaded = None;
        let mut attention = AttentionKind::Blocked;
        for device in devices {
            let (model, config, encoder) = loader::load(&files, device, dtype)
                .with_context(|| format!("loading model {}", files.name))?;
            let asked = loader::attention(&self.attention, device, dtype, config.head_dim())?;
            let model =
                kernels::with_kernels(model, asked, self.attention == "auto", device, &config)?;
            // Devices that fell back to blocked attention set the budget and the metadata.
            if models.is_empty() || model.attention() == AttentionKind::Blocked {
                attention = model.attention();
            }
            models.push(model);
            loaded.get_or_insert((config, encoder));
        }
        let (config, encoder) = loaded.ok_or_else(|| anyhow::anyhow!("no device"))?;
        let budget = match self.max_batch_tokens {
            BatchTokens::Fixed(n) => n,
            BatchTokens::Auto => budget::auto(
                devices.iter().filter_map(budget::free_memory).min(),
                budget::bytes_per_token(&config, dtype, attention),
            ),
        };
        let mut scorer = Scorer::new(models, budget).with_lanes(lanes);
        if self.prefix_sharing == "auto" {
            scorer = scorer.with_prefix_sharing(encoder.gating_pattern().len());
        }
        if profile_requested() {
            scorer = scorer.with_profile(std::sync::Arc::new(Profile::default()));
        }
        let provenance = Provenance {
            model: files.name.clone(),
            revision: files.revision.clone().unwrap_or_default(),
            commit: files.commit.clone().unwrap_or_default(),
            model_hash: provenance::model_hash(&files)
                .with_context(|| format!("loading model {}", files.name))?,
            template_hash: encoder.template_hash().to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
            device: devices
                .iter()
                .map(device_name)
                .collect::<Vec<_>>()
                .join(","),
            dtype: format!("{dtype:?}").to_lowercase(),
            max_length: max_length.to_string(),
            attention: attention.name().into(),
        };
        Ok(Loaded {
            encode: EncodeStage {
                encoder,
                max_length,
            },
            scorer,
            config,
            files,
            dtype,
            provenance,
        })
    }

    /// `--max-length`, refused above `max_position_embeddings` unless the user said so explicitly.
    fn max_length(&self, config: &ArmoRMConfig, path: &std::path::Path) -> Result<usize> {
        let max_positions = config.max_position_embeddings;
        match self.max_length {
            None => Ok(max_positions),
            Some(n) if n > max_positions && !self.allow_beyond_max_positions => anyhow::bail!(
                "--max-length {n} is above the model's max_position_embeddings ({max_positions}, \
                 {}): scores at positions it was not trained for cannot be trusted; pass \
                 --allow-beyond-max-positions to score such rows anyway",
                path.display()
            ),
            Some(n) => Ok(n),
        }
    }
}

/// `--attention`'s values; `varlen-reference` (flash attention's flat layout computed with matmuls,
/// slow, on any device) is for tests and not listed.
fn attention_values() -> clap::builder::PossibleValuesParser {
    use clap::builder::PossibleValue;
    clap::builder::PossibleValuesParser::new([
        PossibleValue::new("auto"),
        PossibleValue::new("flash"),
        PossibleValue::new("flash3"),
        PossibleValue::new("blocked"),
        PossibleValue::new("varlen-reference").hide(true),
    ])
}

/// `cpu`, `cuda:N` or `metal:N`, as `--device` names it.
fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// `ARMORM_PROFILE=1` (any value but empty or 0): time each section of the forward pass and print
/// the breakdown at the end. An environment variable, not a flag: it is a diagnostic that slows the
/// run down, and a job script can switch it on without changing the command.
fn profile_requested() -> bool {
    env_flag("ARMORM_PROFILE")
}

/// The device, with (on CUDA) freed memory kept in the allocator's pool unless
/// `ARMORM_KEEP_FREED=0` (see `loader::keep_freed_memory`; the variable is for measuring both).
fn open_device(spec: Option<&str>) -> Result<candle_core::Device> {
    let device = loader::device(spec)?;
    if std::env::var_os("ARMORM_KEEP_FREED").is_none_or(|v| v != "0") {
        // Speed only: a driver without memory pools scores the same, a little slower.
        if let Err(e) = loader::keep_freed_memory(&device) {
            eprintln!("armorm: {e}; freed memory goes back to the driver");
        }
    }
    Ok(device)
}

/// Whether the environment variable `name` is set to anything but empty or 0.
fn env_flag(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0")
}

/// How the run uses the machine and the terminal.
#[derive(Args)]
pub struct RunArgs {
    /// CPU threads for the model and tokenization [default: all cores]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    threads: Option<u64>,
    /// On CPU: batches scored at once, the threads shared among them; 1 runs one batch at a time
    /// with multi-threaded matmuls [default: --threads, one thread per batch]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    lanes: Option<u64>,
    /// No progress bar and no summary line on stderr.
    #[arg(short, long)]
    quiet: bool,
}

/// Every op allocates and frees its output; glibc hands large blocks back to the kernel on free, and
/// re-faulting and zeroing their pages took ~6% of a CPU run (perf, scripts/perf-notes.md). Keeping
/// blocks up to 32 MiB (glibc's ceiling for this setting) in the heap trades some resident memory for it.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before any worker thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

impl RunArgs {
    /// Before any worker thread exists, since candle's matmuls, MKL and rayon read these settings at
    /// their first use. On CPU the threads are split into lanes (batches scored at once), each
    /// running its matmuls on its share of the threads; returns the number of lanes.
    pub fn apply_threads(&self, cpu: bool) -> usize {
        keep_freed_memory();
        let threads = match self.threads {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let lanes = match (cpu, self.lanes) {
            (false, _) => 1,
            (true, Some(n)) => (n as usize).min(threads),
            (true, None) => threads,
        };
        // candle's CPU matmul and MKL read these. On a GPU they are left alone: nothing there needs
        // them, and the driver's threads already run, whose reads of the environment would race.
        if cpu {
            let per_lane = (threads / lanes).max(1).to_string();
            for var in ["RAYON_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"] {
                std::env::set_var(var, &per_lane);
            }
        }
        // Tokenization and candle's row-wise ops (softmax, norms) use the whole machine, whatever
        // RAYON_NUM_THREADS says to candle's matmul. An error means the pool already exists (a
        // second job in one process): it keeps its size.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
        lanes
    }
}

/// The columns that hold each row's conversation.
#[derive(Args)]
pub struct ColumnArgs {
    #[arg(long, default_value = PROMPT_COLUMN)]
    prompt_column: String,
    #[arg(long, default_value = RESPONSE_COLUMN)]
    response_column: String,
    /// A list of {role, content}; used instead of prompt/response when present.
    #[arg(long, default_value = MESSAGES_COLUMN)]
    messages_column: String,
    /// Longest JSONL line read, in bytes: a longer line is bad input (status `error` under
    /// --on-error skip), read past without being held in memory.
    #[arg(long, default_value_t = DEFAULT_MAX_LINE_BYTES as u64, value_parser = clap::value_parser!(u64).range(1..))]
    max_line_bytes: u64,
    /// Keep an input column named like one armorm writes (score, rewards, status, ...) as input_NAME
    /// instead of refusing the input.
    #[arg(long)]
    rename_input_columns: bool,
}

/// How a run reads its inputs, built from `ColumnArgs`; the default is the flags' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub names: ColumnNames,
    pub max_line_bytes: usize,
    pub rename_input_columns: bool,
}

impl Default for Reading {
    fn default() -> Self {
        Self {
            names: ColumnNames::default(),
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            rename_input_columns: false,
        }
    }
}

impl ColumnArgs {
    pub fn reading(&self) -> Reading {
        Reading {
            names: ColumnNames {
                prompt: self.prompt_column.clone(),
                response: self.response_column.clone(),
                messages: self.messages_column.clone(),
            },
            max_line_bytes: self.max_line_bytes as usize,
            rename_input_columns: self.rename_input_columns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser)]
    struct Columns {
        #[command(flatten)]
        columns: ColumnArgs,
    }

    #[test]
    fn the_column_flags_default_to_the_default_reading() {
        let parsed = Columns::try_parse_from(["armorm"]).unwrap();
        assert_eq!(parsed.columns.reading(), Reading::default());
    }
}
