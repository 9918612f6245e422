//! `armorm best-of-n`: per prompt, the best-scored response, or DPO pairs of the best and the worst.

use anyhow::{anyhow, Result};
use clap::Args;
use polars::prelude::*;

use armorm::input::{PROMPT_COLUMN, RESPONSE_COLUMN};
use armorm::output::Target;
use armorm::{select, table};

use super::inputs;

#[derive(Args)]
pub struct BestOfNArgs {
    /// A file written by `armorm score` (.parquet or .jsonl), or such files on the hub
    /// (hf://datasets/OWNER/NAME[@REVISION][/PATH_OR_GLOB]); - reads JSONL from stdin.
    #[arg(default_value = "-")]
    input: String,
    /// The column whose equal values make a group (the prompt).
    #[arg(long, default_value = PROMPT_COLUMN)]
    group: String,
    /// The column holding each candidate (used for `chosen`/`rejected` with --pairs).
    #[arg(long, default_value = RESPONSE_COLUMN)]
    response_column: String,
    /// Emit one DPO pair per group: chosen = best, rejected = worst, with their scores and margin.
    /// Groups of a single row have no pair and are left out.
    #[arg(long)]
    pairs: bool,
    /// .parquet or .jsonl, or - for JSONL on stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

pub fn run(args: BestOfNArgs) -> Result<()> {
    let target = Target::parse(&args.output)?;
    let t = table::read_files(&inputs::resolve_one(&args.input, false)?)?;
    let label = armorm::input::label(&args.input);
    let frame = t.frame;
    let scores = table::f32_column(&frame, "score").map_err(|m| anyhow!("{label}: {m}"))?;
    let key_col = frame.column(&args.group).map_err(|_| {
        anyhow!(
            "{label}: no column `{}` to group by (see --group)",
            args.group
        )
    })?;
    // Any type groups by its text form, so message lists and numbers work as keys too.
    let keys: Vec<String> = (0..frame.height())
        .map(|i| key_col.get(i).map(|v| v.to_string()).unwrap_or_default())
        .collect();
    let groups = select::best_and_worst(&keys, &scores);
    let out = if args.pairs {
        pairs(&frame, &args, &groups, &scores, label)?
    } else {
        select::take(&frame, &groups.iter().map(|g| g.best).collect::<Vec<_>>())?
    };
    let meta = vec![(
        "armorm.attributes".to_string(),
        serde_json::to_string(&t.attributes)?,
    )];
    Ok(table::write(out, &target, meta)?)
}

fn pairs(
    frame: &DataFrame,
    args: &BestOfNArgs,
    groups: &[select::Group],
    scores: &[f32],
    label: &str,
) -> Result<DataFrame> {
    let response = frame.column(&args.response_column).map_err(|_| {
        anyhow!(
            "{label}: no column `{}` (see --response-column)",
            args.response_column
        )
    })?;
    let groups: Vec<_> = groups.iter().filter(|g| g.size > 1).collect();
    let best: Vec<usize> = groups.iter().map(|g| g.best).collect();
    let worst: Vec<usize> = groups.iter().map(|g| g.worst).collect();
    let pick = |col: &Column, idx: &[usize], name: &str| -> Result<Column> {
        let idx = IdxCa::from_vec("idx".into(), idx.iter().map(|&i| i as IdxSize).collect());
        Ok(col.take(&idx)?.with_name(name.into()))
    };
    let score_c: Vec<f32> = best.iter().map(|&i| scores[i]).collect();
    let score_r: Vec<f32> = worst.iter().map(|&i| scores[i]).collect();
    let margin: Vec<f32> = score_c.iter().zip(&score_r).map(|(a, b)| a - b).collect();
    Ok(DataFrame::new_infer_height(vec![
        pick(frame.column(&args.group)?, &best, &args.group)?,
        pick(response, &best, "chosen")?,
        pick(response, &worst, "rejected")?,
        Column::new("score_chosen".into(), score_c),
        Column::new("score_rejected".into(), score_r),
        Column::new("margin".into(), margin),
    ])?)
}
