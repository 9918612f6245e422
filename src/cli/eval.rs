//! `armorm eval`: pairwise accuracy on chosen/rejected data, RewardBench's way.

use std::collections::HashMap;
use std::io::Write;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use polars::prelude::*;

use armorm::chat::Message;
use armorm::format::Format;
use armorm::input::{self, InputError, InputFile, Location, MemoryRow, PROMPT_COLUMN};
use armorm::output::{self, Target};
use armorm::pairwise::{self, Summary};
use armorm::table;

use super::inputs;
use super::score::Job;
use super::{ModelArgs, Reading, RunArgs};

/// RewardBench's filtered split, which rewardbench's CLI evaluates by default.
pub const DEFAULT_INPUT: &str =
    "hf://datasets/allenai/reward-bench@~parquet/default/filtered/*.parquet";

#[derive(Args)]
pub struct EvalArgs {
    /// Rows with prompt, chosen and rejected (strings or message lists), and optionally subset and id:
    /// .jsonl, .parquet, - for JSONL on stdin, or hf://datasets/OWNER/NAME[@REVISION][/PATH_OR_GLOB];
    /// by default RewardBench's filtered split.
    #[arg(default_value = DEFAULT_INPUT)]
    input: String,
    /// Per-pair results: .parquet or .jsonl [default: INPUT's stem + .eval.parquet, for a hub dataset
    /// NAME.eval.parquet in the current directory; none for stdin]
    #[arg(short, long)]
    output: Option<String>,
    /// Also write the summary as JSON here.
    #[arg(long)]
    summary: Option<String>,
    #[arg(long, default_value = PROMPT_COLUMN)]
    prompt_column: String,
    #[arg(long, default_value = "chosen")]
    chosen_column: String,
    #[arg(long, default_value = "rejected")]
    rejected_column: String,
    #[arg(long, default_value = "subset")]
    subset_column: String,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    run: RunArgs,
}

/// The chosen and the rejected conversation of a pair.
type Pair = (Vec<Message>, Vec<Message>);

/// A file's rows, each row's pair, and where each pair is (for errors about its conversations).
struct Pairs {
    frame: DataFrame,
    pairs: Vec<Pair>,
    places: Vec<Location>,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let label = input::label(&args.input);
    let files = inputs::resolve_one(&args.input, args.run.quiet)?;
    let (mut frames, mut pairs, mut places) = (Vec::new(), Vec::new(), Vec::new());
    for file in &files {
        let read = read_pairs(file, &args)?;
        frames.push((read.frame, file.label.as_str()));
        pairs.extend(read.pairs);
        places.extend(read.places);
    }
    let frame = table::stack(frames)?;
    // Each distinct conversation is scored once: shared prompts and identical answers cost nothing twice.
    // Each is named in errors by the first pair that has it.
    let mut unique: Vec<MemoryRow> = Vec::new();
    let mut index: HashMap<&Vec<Message>, usize> = HashMap::new();
    let mut sides = Vec::with_capacity(pairs.len());
    for ((c, r), place) in pairs.iter().zip(&places) {
        let mut ids = [0usize; 2];
        for (slot, conv) in [c, r].into_iter().enumerate() {
            ids[slot] = *index.entry(conv).or_insert_with(|| {
                unique.push(MemoryRow {
                    id: unique.len() as u64,
                    location: place.clone(),
                    messages: conv.clone(),
                });
                unique.len() - 1
            });
        }
        sides.push((ids[0], ids[1]));
    }
    let (rewards, coefficients) = score_unique(label, unique, &args)?;

    let mut score_c = Vec::with_capacity(pairs.len());
    let mut score_r = Vec::with_capacity(pairs.len());
    for ((c, r), (conv_c, conv_r)) in sides.iter().zip(&pairs) {
        // The gating depends on the prompt alone: when both sides share it, both use the chosen side's
        // coefficients, so that only the responses' rewards differ.
        let same_prompt = conv_c[..conv_c.len() - 1] == conv_r[..conv_r.len() - 1];
        let coef_r = if same_prompt {
            &coefficients[*c]
        } else {
            &coefficients[*r]
        };
        score_c.push(dot(&rewards[*c], &coefficients[*c]));
        score_r.push(dot(&rewards[*r], coef_r));
    }
    let subsets: Vec<Option<String>> = match frame.column(&args.subset_column) {
        Ok(col) => {
            let col = col.cast(&DataType::String)?;
            let ca = col.str()?;
            (0..ca.len())
                .map(|i| ca.get(i).map(str::to_string))
                .collect()
        }
        Err(_) => vec![None; frame.height()],
    };
    let summary = pairwise::summarize(&subsets, &score_c, &score_r);

    if let Some(target) = output_target(&args)? {
        let out = per_pair(&frame, &score_c, &score_r, &sides, &rewards)?;
        table::write(out, &target, vec![]).context("writing the per-pair results")?;
    }
    if let Some(path) = &args.summary {
        let json = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {path}"))?;
    }
    let to_stdout = !matches!(output_target(&args)?, Some(Target { path: None, .. }));
    if to_stdout {
        print_summary(&summary, &mut std::io::stdout().lock())
    } else {
        // `-o -` gives stdout to the per-pair rows.
        print_summary(&summary, &mut std::io::stderr().lock())
    }
}

/// One file's pairs: Parquet by columns, anything else as JSONL, line by line.
fn read_pairs(file: &InputFile, args: &EvalArgs) -> Result<Pairs> {
    // Anything but Parquet is read as JSONL here, whatever its extension.
    let parquet = Format::of(&file.path) == Some(Format::Parquet);
    let name = file.label.clone();
    let place = |i: usize| match parquet {
        true => Location::Row {
            file: name.clone(),
            row: i + 1,
        },
        false => Location::Line {
            file: name.clone(),
            line: i + 1,
        },
    };
    let locate =
        |i: usize, f: Option<String>, m: String| InputError::new(place(i), f.as_deref(), m);
    let columns = (
        args.prompt_column.as_str(),
        args.chosen_column.as_str(),
        args.rejected_column.as_str(),
    );
    if parquet {
        let frame = table::read_files(std::slice::from_ref(file))?.frame;
        let pairs = (0..frame.height())
            .map(|i| {
                pairwise::pair_conversations(&frame, i, columns.0, columns.1, columns.2)
                    .map_err(|e| locate(i, e.field, e.message))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let places = (0..frame.height()).map(place).collect();
        return Ok(Pairs {
            frame,
            pairs,
            places,
        });
    }
    // JSON rows one by one: a field may be a string on one line and a message list on the next.
    let bytes = table::read_bytes_of(file)?;
    let text =
        std::str::from_utf8(&bytes).map_err(|e| anyhow!("{}: not valid UTF-8: {e}", file.label))?;
    let (mut pairs, mut places) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| locate(i, None, format!("malformed JSON: {e}")))?;
        pairs.push(
            pairwise::pair_conversations_json(&v, columns.0, columns.1, columns.2)
                .map_err(|e| locate(i, e.field, e.message))?,
        );
        places.push(place(i));
    }
    Ok(Pairs {
        frame: table::jsonl_frame(&file.label, bytes)?,
        pairs,
        places,
    })
}

/// Σ rewards · coefficients, in f64: both sides of a pair go through the same arithmetic.
fn dot(r: &[f32], c: &[f32]) -> f32 {
    r.iter()
        .zip(c)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum::<f64>() as f32
}

type Lists = Vec<Vec<f32>>;

fn score_unique(label: &str, unique: Vec<MemoryRow>, args: &EvalArgs) -> Result<(Lists, Lists)> {
    let job = Job::new(&args.model, Reading::default(), &args.run);
    let scored = job.score_rows(label, unique)?;
    // No pair, no frame: nothing to read back.
    if scored.height() == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let rewards = table::f32_lists(&scored, "rewards").map_err(|m| anyhow!(m))?;
    let coefficients = table::f32_lists(&scored, "coefficients").map_err(|m| anyhow!(m))?;
    Ok((rewards, coefficients))
}

fn output_target(args: &EvalArgs) -> Result<Option<Target>> {
    Ok(match (&args.output, args.input.as_str()) {
        (Some(o), _) => Some(Target::parse(o)?),
        (None, "-") => None,
        (None, input) => {
            let path = output::with_suffix(&input::output_stem(input), ".eval.parquet");
            Some(Target::parse(&path.display().to_string())?)
        }
    })
}

fn per_pair(
    frame: &DataFrame,
    c: &[f32],
    r: &[f32],
    sides: &[(usize, usize)],
    rewards: &Lists,
) -> Result<DataFrame> {
    let list = |name: &str, pick: fn(&(usize, usize)) -> usize| -> Column {
        let n = sides.len();
        // Each side's rewards hold one value per objective of the model that scored them.
        let objectives = rewards.first().map_or(0, Vec::len);
        let mut b = ListPrimitiveChunkedBuilder::<Float32Type>::new(
            name.into(),
            n,
            n * objectives,
            DataType::Float32,
        );
        for s in sides {
            b.append_slice(&rewards[pick(s)]);
        }
        b.finish().into_series().into_column()
    };
    let margin: Vec<f32> = c.iter().zip(r).map(|(a, b)| a - b).collect();
    let correct: Vec<bool> = c
        .iter()
        .zip(r)
        .map(|(a, b)| pairwise::is_correct(*a, *b))
        .collect();
    Ok(frame.hstack(&[
        Column::new("score_chosen".into(), c.to_vec()),
        Column::new("score_rejected".into(), r.to_vec()),
        Column::new("margin".into(), margin),
        Column::new("correct".into(), correct),
        list("rewards_chosen", |s| s.0),
        list("rewards_rejected", |s| s.1),
    ])?)
}

fn print_summary(s: &Summary, w: &mut dyn Write) -> Result<()> {
    let mut out = std::io::BufWriter::new(w);
    let o = &s.overall;
    writeln!(
        out,
        "accuracy {:.4} ({} of {} pairs; {} ties, counted wrong as in RewardBench)",
        o.accuracy, o.correct, o.pairs, o.ties
    )?;
    if !s.subsets.is_empty() {
        let w = s.subsets.keys().map(|k| k.len()).max().unwrap_or(6).max(6);
        writeln!(
            out,
            "\n{:<w$}  {:>6}  {:>7}  {:>4}  {:>8}",
            "subset", "pairs", "correct", "ties", "accuracy"
        )?;
        for (name, st) in &s.subsets {
            writeln!(
                out,
                "{name:<w$}  {:>6}  {:>7}  {:>4}  {:>8.4}",
                st.pairs, st.correct, st.ties, st.accuracy
            )?;
        }
    }
    if let Some(rb) = &s.rewardbench {
        writeln!(out, "\nRewardBench (percent)")?;
        for (name, v) in &rb.sections {
            writeln!(out, "{name:<12} {v:6.2}")?;
        }
        if let Some(p) = rb.prior_sets {
            writeln!(out, "{:<12} {p:6.2}  (weight 0.5)", "Prior Sets")?;
        }
        writeln!(
            out,
            "{:<12} {:6.2}  (sections weight 2, prior sets 1, over those present)",
            "Score", rb.score
        )?;
    }
    out.flush()?;
    Ok(())
}
