//! `armorm score`: a dataset in, the same rows with every model output appended out.

use anyhow::Result;
use clap::Args;

use armorm::input;
use armorm::output::{self, Target};
use armorm::pipeline::{self, Opener};

use super::progress::Progress;
use super::{ColumnArgs, Loaded, ModelArgs, RunArgs};

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
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    columns: ColumnArgs,
    #[command(flatten)]
    run: RunArgs,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    args.run.apply_threads();
    let target = match &args.output {
        Some(o) => Target::parse(o)?,
        None => Target::default_for(&args.inputs[0]),
    };
    let loaded = args.model.load()?;
    let sink = output::open(&target, metadata(&loaded))?;
    let progress = Progress::new(args.run.quiet, total_size(&args.inputs));
    let stats = pipeline::run(openers(&args), &loaded.scorer, sink, &progress)?;
    progress.finish(&stats);
    Ok(())
}

/// Each input's opener, with its share of the total size for progress.
fn openers(args: &ScoreArgs) -> Vec<(String, f64, Opener)> {
    let sizes: Vec<Option<u64>> = args.inputs.iter().map(|p| file_size(p)).collect();
    let total: u64 = sizes.iter().flatten().sum();
    args.inputs
        .iter()
        .zip(sizes)
        .map(|(path, size)| {
            let share = match (size, total) {
                (Some(s), t) if t > 0 => s as f64 / t as f64,
                _ => 0.0,
            };
            let (p, names, window) = (
                path.clone(),
                args.columns.names(),
                args.window_rows as usize,
            );
            let open: Opener = Box::new(move || input::open(&p, &names, window));
            (path.clone(), share, open)
        })
        .collect()
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
fn metadata(loaded: &Loaded) -> Vec<(String, String)> {
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
