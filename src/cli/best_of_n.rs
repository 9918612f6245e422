//! `armorm best-of-n`: per prompt, the best-scored response, or DPO pairs of the best and the worst.

use anyhow::{anyhow, Context, Result};
use clap::Args;
use polars::prelude::*;

use armorm::input::{PROMPT_COLUMN, RESPONSE_COLUMN};
use armorm::output::Target;
use armorm::{mining, select, table};

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
    /// Emit one DPO pair per group: chosen = best, rejected = worst, with their scores, margin,
    /// margin_by_objective and top_margin_attributes. Groups of a single row have no pair and are left
    /// out.
    #[arg(long)]
    pairs: bool,
    /// With --pairs: keep only the pairs whose margin (score_chosen − score_rejected) is at least X.
    #[arg(long, value_name = "X", requires = "pairs", allow_hyphen_values = true)]
    min_margin: Option<f64>,
    /// With --pairs: keep only the pairs that meet an SQL condition (polars SQL) over the pair's
    /// columns and, per objective, `chosen_NAME` and `rejected_NAME` (the two rewards) and
    /// `margin_NAME` (its term of margin_by_objective), e.g. `"chosen_beavertails-is_safe" > 0.5`.
    #[arg(long, value_name = "CONDITION", requires = "pairs")]
    require: Option<String>,
    /// With --pairs: leave out the pairs whose longer response has more than R times the characters
    /// of the shorter (a control for length bias).
    #[arg(long, value_name = "R", requires = "pairs", value_parser = ratio)]
    max_length_ratio: Option<f64>,
    /// With --pairs: how many objectives top_margin_attributes names at most (those of largest
    /// positive share of the margin).
    #[arg(long, value_name = "K", default_value_t = 3, requires = "pairs")]
    top_k: usize,
    /// .parquet or .jsonl, or - for JSONL on stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

fn ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r >= 1.0 && r.is_finite() => Ok(r),
        _ => Err(format!("{s:?} is not a ratio of at least 1")),
    }
}

pub fn run(args: BestOfNArgs) -> Result<()> {
    let target = Target::parse(&args.output)?;
    let files = inputs::resolve_one(&args.input, false)?;
    let t = table::read_files(&files)?;
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
        let pairs = pairs(&frame, &args, &groups, &scores, label)?;
        mine(pairs, &args, &t.attributes, label)?
    } else {
        select::take(&frame, &groups.iter().map(|g| g.best).collect::<Vec<_>>())?
    };
    let mut meta = vec![(
        "armorm.attributes".to_string(),
        serde_json::to_string(&t.attributes)?,
    )];
    // The rows kept are rows the model scored: what their file says of the model still holds.
    meta.extend(table::carried_metadata(&files)?);
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
    let list = |name: &str| {
        frame
            .column(name)
            .map_err(|_| anyhow!("{label}: no `{name}` column: run armorm score first"))
    };
    Ok(DataFrame::new_infer_height(vec![
        pick(frame.column(&args.group)?, &best, &args.group)?,
        pick(response, &best, "chosen")?,
        pick(response, &worst, "rejected")?,
        Column::new("score_chosen".into(), score_c),
        Column::new("score_rejected".into(), score_r),
        Column::new("margin".into(), margin),
        pick(list("rewards")?, &best, mining::REWARDS_CHOSEN)?,
        pick(list("rewards")?, &worst, mining::REWARDS_REJECTED)?,
        pick(list("coefficients")?, &best, mining::COEFFICIENTS_CHOSEN)?,
    ])?)
}

/// The per-objective margins, then the filters; says on stderr how many pairs each filter left out.
fn mine(
    pairs: DataFrame,
    args: &BestOfNArgs,
    attributes: &[String],
    label: &str,
) -> Result<DataFrame> {
    let filters = mining::Filters {
        min_margin: args.min_margin,
        max_length_ratio: args.max_length_ratio,
        require: args.require.clone(),
    };
    let total = pairs.height();
    let mined =
        mining::mine(pairs, attributes, args.top_k, &filters).with_context(|| label.to_string())?;
    if filters.any() {
        let reasons: Vec<String> = mined
            .dropped
            .iter()
            .map(|(flag, n)| format!("{n} by {flag}"))
            .collect();
        eprintln!(
            "armorm: {} of {total} pairs kept; left out: {}",
            mined.frame.height(),
            reasons.join(", ")
        );
    }
    Ok(mined.frame)
}
