//! `armorm filter`: keep the rows of a scored file that meet a condition, or the best fraction by score.

use anyhow::{anyhow, Context, Result};
use clap::Args;

use armorm::output::Target;
use armorm::{select, table};

use super::inputs;

#[derive(Args)]
pub struct FilterArgs {
    /// A file written by `armorm score` (.parquet or .jsonl), or such files on the hub
    /// (hf://datasets/OWNER/NAME[@REVISION][/PATH_OR_GLOB]); - reads JSONL from stdin.
    #[arg(default_value = "-")]
    input: String,
    /// An SQL condition over the columns and the objectives by name, e.g.
    /// `score > 0.1 AND "helpsteer-correctness" > 0.7` (polars SQL).
    #[arg(long = "where", value_name = "CONDITION")]
    condition: Option<String>,
    /// Keep the best FRACTION of the rows (after --where) by score, in input order.
    #[arg(long, value_name = "FRACTION", value_parser = fraction)]
    top_fraction: Option<f64>,
    /// .parquet or .jsonl, or - for JSONL on stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("{s:?} is not a fraction in (0, 1]")),
    }
}

pub fn run(args: FilterArgs) -> Result<()> {
    if args.condition.is_none() && args.top_fraction.is_none() {
        return Err(anyhow!(
            "nothing to do: give --where CONDITION and/or --top-fraction FRACTION"
        ));
    }
    let target = Target::parse(&args.output)?;
    let files = inputs::resolve_one(&args.input, false)?;
    let t = table::read_files(&files)?;
    let label = armorm::input::label(&args.input);
    let mut frame = t.frame;
    if let Some(cond) = &args.condition {
        let rewards = table::f32_lists(&frame, "rewards").map_err(|m| anyhow!("{label}: {m}"))?;
        frame = select::filter_sql(frame, &t.attributes, &rewards, cond)
            .with_context(|| format!("{label}: --where {cond}"))?;
    }
    if let Some(f) = args.top_fraction {
        let scores = table::f32_column(&frame, "score").map_err(|m| anyhow!("{label}: {m}"))?;
        frame = select::take(&frame, &select::top_fraction_indices(&scores, f))?;
    }
    let mut meta = vec![(
        "armorm.attributes".to_string(),
        serde_json::to_string(&t.attributes)?,
    )];
    // The rows kept are rows the model scored: what their file says of the model still holds.
    meta.extend(table::carried_metadata(&files)?);
    Ok(table::write(frame, &target, meta)?)
}
