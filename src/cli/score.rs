//! `armorm score`: a dataset in, the same rows with every model output appended out.

use anyhow::{anyhow, Context, Result};
use clap::Args;
use polars::prelude::Schema;

use armorm::input;
use armorm::output::{self, Target};
use armorm::scorer::ScoreError;

use super::{ColumnArgs, Loaded, ModelArgs};

/// Rows read, scored and written together; the window within which rows are sorted by length.
const CHUNK_ROWS: usize = 4096;

#[derive(Args)]
pub struct ScoreArgs {
    /// JSONL (.jsonl, .ndjson) or Parquet files, scored in order as one dataset; - reads JSONL from stdin.
    #[arg(required = true)]
    inputs: Vec<String>,
    /// .parquet or .jsonl, or - for JSONL on stdout [default: FIRST_INPUT's stem + .scores.parquet]
    #[arg(short, long)]
    output: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    columns: ColumnArgs,
}

pub fn run(args: ScoreArgs) -> Result<()> {
    let target = match &args.output {
        Some(o) => Target::parse(o)?,
        None => Target::default_for(&args.inputs[0]),
    };
    let loaded = args.model.load()?;
    let names = args.columns.names();
    let mut sink = output::open(&target, metadata(&loaded))?;
    let mut schema: Option<Schema> = None;
    for path in &args.inputs {
        let mut source = input::open(path, &names, CHUNK_ROWS)?;
        while let Some(chunk) = source.next_chunk()? {
            let scores = loaded
                .scorer
                .score(&chunk.conversations)
                .map_err(|e| match e {
                    ScoreError::Row { row, message } => {
                        anyhow!("{}: {message}", chunk.locations[row])
                    }
                    ScoreError::Model(e) => anyhow!(e).context("running the model"),
                })?;
            let frame = match &schema {
                None => {
                    schema = Some(chunk.frame.schema().as_ref().clone());
                    chunk.frame
                }
                Some(s) => output::conform(chunk.frame, s).map_err(|m| anyhow!("{path}: {m}"))?,
            };
            let mut scored = output::with_scores(&frame, &scores).with_context(|| path.clone())?;
            sink.write(&mut scored).context("writing the output")?;
        }
    }
    sink.finish().context("finishing the output")?;
    Ok(())
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
