//! `armorm verify`: re-score a random sample of a scored file's rows and report how far the file's
//! outputs are from the model's now, which rows' tokens changed, and whether the template did.

use std::collections::HashMap;
use std::io::Write;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use serde::Serialize;

use armorm::input::{self, InputFile, Location, MemoryRow, RowInput};
use armorm::pipeline::Policy;
use armorm::provenance::Provenance;
use armorm::rescore::METADATA_KEY as RESCORE_KEY;
use armorm::table;
use armorm::verify::{self, Columns, Comparison, Outputs, Sample};

use super::score::Job;
use super::{ColumnArgs, ModelArgs, Reading, RunArgs};

/// Rows read at a time while sampling.
const WINDOW: usize = 4096;

/// The sample's outputs are off the file's past the tolerance, or its rows' tokens changed: exit code 4.
#[derive(Debug, thiserror::Error)]
#[error("verify failed: {0}")]
pub struct Mismatch(pub String);

#[derive(Args)]
pub struct VerifyArgs {
    /// A file written by `armorm score` (.parquet or .jsonl, with its input columns), or one file on the
    /// hub (hf://datasets/OWNER/NAME[@REVISION]/PATH); - reads JSONL from stdin.
    scored: String,
    /// Rows re-scored, drawn at random among the rows with a score (all of them when fewer).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    sample: u64,
    /// Seed of the draw: the same file, --sample and --seed re-score the same rows.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest difference accepted in any output column (score, num_tokens, and each value of rewards,
    /// gating and coefficients) [default: 1e-4 for a file scored in f32, 5e-2 in bf16 or f16]
    #[arg(long, value_parser = tolerance)]
    tolerance: Option<f64>,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// A model directory or a Hugging Face repo id [default: the file's armorm.model]
    #[arg(long)]
    model: Option<String>,
    /// Hub revision [default: the commit the file records, when --model is the file's]
    #[arg(long)]
    revision: Option<String>,
    /// cpu, cuda, cuda:N or metal: where the sample is re-scored.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype of the re-scoring.
    #[arg(long, default_value = "f32", value_parser = ["auto", "f32", "bf16", "f16"])]
    dtype: String,
    /// Padded tokens per forward pass (auto: as for score). Results do not depend on it.
    #[arg(long, default_value = "auto")]
    max_batch_tokens: armorm::budget::BatchTokens,
    /// Longest conversation, in tokens; rows are truncated as the file's were
    /// [default: the file's armorm.max_length, else the model's max_position_embeddings]
    #[arg(long)]
    max_length: Option<usize>,
    /// Accept a --max-length above the model's max_position_embeddings (implied when the file
    /// records one).
    #[arg(long)]
    allow_beyond_max_positions: bool,
    #[command(flatten)]
    columns: ColumnArgs,
    #[command(flatten)]
    run: RunArgs,
}

fn tolerance(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("{s:?} is not a number >= 0")),
    }
}

/// A sampled row as the file holds it.
struct Drawn {
    index: usize,
    location: Location,
    conversation: RowInput,
    recorded: Outputs,
}

/// What the file holds, and how much of it was drawn.
struct Drawing {
    rows: usize,
    scored: usize,
    drawn: Vec<Drawn>,
}

/// Everything `verify` found, as printed.
#[derive(Serialize)]
struct Report {
    file: String,
    /// Rows in the file, and those of them with a score (the ones that can be drawn).
    rows: usize,
    scored_rows: usize,
    /// The rows drawn, counted from 1.
    sampled_rows: Vec<usize>,
    seed: u64,
    tolerance: f64,
    tolerance_from: String,
    /// The file went through `armorm rescore`: the model's own `score_original` and
    /// `coefficients_original` are compared, not its new score.
    rescored: bool,
    recorded: Provenance,
    now: Provenance,
    /// `None` when the file does not record it.
    template_changed: Option<bool>,
    model_hash_changed: Option<bool>,
    #[serde(flatten)]
    comparison: Comparison,
    passed: bool,
}

pub fn run(args: VerifyArgs) -> Result<()> {
    let file = one_file(&args.scored, args.run.quiet)?;
    let label = file.label.clone();
    let metadata: HashMap<String, String> = table::file_metadata(&file.path)?.into_iter().collect();
    let rescored = metadata.contains_key(RESCORE_KEY);
    let recorded = Provenance::from_metadata(&metadata);
    let model = model_args(&args, &recorded, &label)?;
    let reading = args.columns.reading();
    let drawing = draw(&args, &file, &reading)?;
    if drawing.drawn.is_empty() {
        return Err(anyhow!(
            "{label}: no row with a score to verify ({} rows)",
            drawing.rows
        ));
    }
    let (tolerance, tolerance_from) = match (args.tolerance, &recorded.dtype) {
        (Some(t), _) => (t, "--tolerance".to_string()),
        (None, dtype) => match verify::default_tolerance(dtype) {
            Some(t) => (t, format!("the file's dtype {dtype}")),
            None => (
                1e-4,
                "the f32 default: the file records no dtype".to_string(),
            ),
        },
    };
    let (rows, now) = rescore(&args, &model, reading, &label, &drawing.drawn)?;
    let comparison = verify::compare(&rows, tolerance);
    let report = Report {
        file: label,
        rows: drawing.rows,
        scored_rows: drawing.scored,
        sampled_rows: drawing.drawn.iter().map(|d| d.index + 1).collect(),
        seed: args.seed,
        tolerance,
        tolerance_from,
        rescored,
        template_changed: changed(&recorded.template_hash, &now.template_hash),
        model_hash_changed: changed(&recorded.model_hash, &now.model_hash),
        recorded,
        now,
        passed: comparison.passed(),
        comparison,
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_report(&report, &mut out)?;
    }
    out.flush()?;
    match report.passed {
        true => Ok(()),
        false => Err(Mismatch(failures(&report)).into()),
    }
}

/// The scored file: a local path, stdin, or a hub name of exactly one file.
fn one_file(scored: &str, quiet: bool) -> Result<InputFile> {
    let mut files = super::inputs::resolve_one(scored, quiet)?;
    match files.len() {
        1 => Ok(files.remove(0)),
        n => Err(anyhow!(
            "{scored}: names {n} files; verify reads one scored file"
        )),
    }
}

/// Whether a recorded hash differs from the one now; `None` when the file has none.
fn changed(recorded: &str, now: &str) -> Option<bool> {
    (!recorded.is_empty()).then(|| recorded != now)
}

/// The re-scoring's model settings: the file's model, commit and --max-length unless told otherwise.
fn model_args(args: &VerifyArgs, recorded: &Provenance, label: &str) -> Result<ModelArgs> {
    let from_file = |v: &str| (!v.is_empty()).then(|| v.to_string());
    let (model, revision) = match &args.model {
        Some(m) => (m.clone(), args.revision.clone()),
        None => (
            from_file(&recorded.model).ok_or_else(|| {
                anyhow!("{label}: the file does not record its model (armorm.model): give --model")
            })?,
            args.revision
                .clone()
                .or_else(|| from_file(&recorded.commit))
                .or_else(|| from_file(&recorded.revision)),
        ),
    };
    let recorded_length = recorded.max_length.parse::<usize>().ok();
    Ok(ModelArgs {
        model,
        revision,
        device: Some(args.device.clone()),
        dtype: args.dtype.clone(),
        max_batch_tokens: args.max_batch_tokens,
        // Results do not depend on it (tests/integration/sharing.rs).
        prefix_sharing: "auto".into(),
        // Blocked on the CPU in f32 (the default --device and --dtype); flash where the user asked
        // for a GPU in bf16/f16.
        attention: "auto".into(),
        max_length: args.max_length.or(recorded_length),
        // The file was scored at that length already: re-scoring it reproduces, not extends, it.
        allow_beyond_max_positions: args.allow_beyond_max_positions
            || (args.max_length.is_none() && recorded_length.is_some()),
    })
}

/// Reads the file as `armorm score` reads an input (so each row's conversation is the one it scored)
/// and draws `--sample` of its rows with a score.
fn draw(args: &VerifyArgs, file: &InputFile, reading: &Reading) -> Result<Drawing> {
    let label = &file.label;
    let mut source = input::open_as(file, &reading.names, WINDOW, true, reading.max_line_bytes)?;
    let mut sample = Sample::new(args.sample as usize, args.seed);
    let mut rows = 0;
    while let Some(chunk) = source.next_chunk()? {
        let columns = Columns::of(&chunk.frame).map_err(|m| anyhow!("{label}: {m}"))?;
        for i in 0..chunk.conversations.len() {
            if !columns.scored(i) {
                continue;
            }
            sample.offer(|| -> Result<Drawn> {
                let location = chunk.locations[i].clone();
                Ok(Drawn {
                    index: rows + i,
                    recorded: columns.outputs(i).map_err(|m| anyhow!("{location}: {m}"))?,
                    location,
                    conversation: chunk.conversations[i].clone(),
                })
            })?;
        }
        rows += chunk.conversations.len();
    }
    let scored = sample.seen();
    let mut drawn = sample.into_items();
    drawn.sort_by_key(|d| d.index);
    Ok(Drawing {
        rows,
        scored,
        drawn,
    })
}

/// The drawn rows scored again, bad ones kept (a row that cannot be scored now is a finding, not an
/// error); each paired with its recorded outputs. Also the provenance of the model used now.
fn rescore(
    args: &VerifyArgs,
    model: &ModelArgs,
    reading: Reading,
    label: &str,
    drawn: &[Drawn],
) -> Result<(Vec<verify::Row>, Provenance)> {
    let memory: Vec<MemoryRow> = drawn
        .iter()
        .filter_map(|d| {
            let messages = d.conversation.as_ref().ok()?.clone();
            Some(MemoryRow {
                id: d.index as u64,
                location: d.location.clone(),
                messages,
            })
        })
        .collect();
    let job = Job {
        // Truncated as the file's rows were, under the same --max-length; an `ok` row fits either way.
        policy: Policy {
            skip_bad: true,
            truncate: true,
        },
        ..Job::new(model, reading, &args.run)
    };
    let (frame, now) = job
        .score_rows_keeping_skipped(label, memory)
        .context("re-scoring the sample")?;
    let mut outputs: HashMap<u64, Result<Outputs, String>> = HashMap::new();
    if frame.height() > 0 {
        let columns = Columns::of(&frame).map_err(|m| anyhow!("re-scoring: {m}"))?;
        let ids = frame.column("id")?.u64()?.clone();
        for i in 0..frame.height() {
            if let Some(id) = ids.get(i) {
                outputs.insert(id, columns.outputs(i));
            }
        }
    }
    let rows = drawn
        .iter()
        .map(|d| verify::Row {
            index: d.index,
            recorded: d.recorded.clone(),
            now: match &d.conversation {
                Err(e) => Err(format!("cannot be read: {e}")),
                Ok(_) => outputs
                    .remove(&(d.index as u64))
                    .unwrap_or_else(|| Err("missing from the re-scoring".into())),
            },
        })
        .collect();
    Ok((rows, now))
}

/// One line for stderr: why the verification failed.
fn failures(r: &Report) -> String {
    let mut why = Vec::new();
    if !r.comparison.changed.is_empty() {
        why.push(format!(
            "{} of {} sampled rows changed or could not be scored",
            r.comparison.changed.len(),
            r.sampled_rows.len()
        ));
    }
    for c in r.comparison.columns.iter().filter(|c| !c.within_tolerance) {
        why.push(format!(
            "{} differs by {} (row {}) > {}",
            c.column,
            number(c.max_abs_diff),
            c.row.map_or("-".into(), |r| r.to_string()),
            r.tolerance
        ));
    }
    if why.is_empty() {
        why.push("no row could be compared".into());
    }
    why.join("; ")
}

fn number(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(0.0) => "0".into(),
        Some(v) => format!("{v:.3e}"),
    }
}

/// A hash shortened for people; the JSON report has it whole.
fn short(hash: &str) -> &str {
    match hash {
        "" => "-",
        h => &h[..h.len().min(16)],
    }
}

fn described(p: &Provenance) -> String {
    let or = |v: &str| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.to_string()
        }
    };
    format!(
        "model {}, commit {}, model_hash {}, template_hash {}, armorm {}, {}, {}",
        or(&p.model),
        short(&p.commit),
        short(&p.model_hash),
        short(&p.template_hash),
        or(&p.version),
        or(&p.device),
        or(&p.dtype)
    )
}

fn same(changed: Option<bool>) -> &'static str {
    match changed {
        None => "not recorded in the file",
        Some(false) => "same as the file's",
        Some(true) => "CHANGED since the file was scored",
    }
}

/// `key  value` lines, then one line per column and per changed row: readable, and easy to grep.
fn print_report(r: &Report, out: &mut dyn Write) -> Result<()> {
    let c = &r.comparison;
    writeln!(out, "file           {}", r.file)?;
    writeln!(
        out,
        "sample         {} of {} scored rows ({} rows in the file), seed {}",
        r.sampled_rows.len(),
        r.scored_rows,
        r.rows,
        r.seed
    )?;
    writeln!(out, "scored with    {}", described(&r.recorded))?;
    writeln!(out, "re-scored with {}", described(&r.now))?;
    writeln!(out, "template       {}", same(r.template_changed))?;
    writeln!(out, "model_hash     {}", same(r.model_hash_changed))?;
    writeln!(out, "tolerance      {} ({})", r.tolerance, r.tolerance_from)?;
    if r.rescored {
        writeln!(
            out,
            "rescored       yes (armorm.rescore): the model's score_original and coefficients_original \
             are compared"
        )?;
    }
    writeln!(
        out,
        "compared       {} rows with the same tokens",
        c.compared
    )?;
    if c.without_input_hash > 0 {
        writeln!(
            out,
            "               {} of them without input_hash in the file: only num_tokens was checked",
            c.without_input_hash
        )?;
    }
    writeln!(out, "column         max_abs_diff  row  within")?;
    for col in &c.columns {
        writeln!(
            out,
            "{:<14} {:<13} {:<4} {}",
            col.column,
            number(col.max_abs_diff),
            col.row.map_or("-".into(), |r| r.to_string()),
            if col.within_tolerance { "yes" } else { "NO" }
        )?;
    }
    match c.spearman {
        Some(s) => writeln!(out, "spearman       {s:.6} (scores, file against now)")?,
        None => writeln!(out, "spearman       - (under 2 rows, or constant scores)")?,
    }
    for ch in &c.changed {
        writeln!(out, "changed row    {}: {}", ch.row, ch.reason)?;
    }
    writeln!(
        out,
        "result         {}",
        if r.passed { "ok" } else { "FAILED" }
    )?;
    Ok(())
}
