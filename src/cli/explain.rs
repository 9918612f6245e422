//! `armorm explain`: the K objectives that drive each row's score, as a table or for machines.

use std::io::Write;

use anyhow::{anyhow, Context, Result};
use clap::{Args, ValueEnum};
use polars::prelude::*;

use armorm::explain::{display_reward, top_k};
use armorm::input::{ChunkSource, JsonlSource, STDIN};
use armorm::output::Target;
use armorm::pipeline::{InputSource, Opener};
use armorm::table::{self, Table};

use super::inputs;
use super::score::Job;
use super::{ColumnArgs, ModelArgs, RunArgs};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Jsonl,
    Parquet,
}

#[derive(Args)]
pub struct ExplainArgs {
    /// A file scored by `armorm score` (no model is loaded), or raw prompt/response data (scored first);
    /// - reads JSONL from stdin; hf://datasets/OWNER/NAME[@REVISION][/PATH_OR_GLOB] reads from the hub.
    #[arg(default_value = "-")]
    input: String,
    /// How many objectives to show per row.
    #[arg(long, default_value_t = 3)]
    top_k: usize,
    /// table: aligned text for people; jsonl or parquet: for machines.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Where to write (required for parquet) [default: stdout]
    #[arg(short, long)]
    output: Option<String>,
    /// Show the HelpSteer objectives' rewards on HelpSteer's 0-4 scale (reward × 5 − 0.5).
    #[arg(long)]
    helpsteer_scale: bool,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    columns: ColumnArgs,
    #[command(flatten)]
    run: RunArgs,
}

pub fn run(args: ExplainArgs) -> Result<()> {
    let table = scored_table(&args)?;
    let frame = explained(&table, &args).with_context(|| args.input.clone())?;
    match (args.format, &args.output) {
        (Format::Table, None) => print_table(&frame, args.top_k),
        (Format::Table, Some(o)) => Err(anyhow!(
            "--format table writes to stdout; for {o} use --format jsonl or parquet"
        )),
        (Format::Jsonl, o) => {
            let target = Target::parse(o.as_deref().unwrap_or("-"))?;
            Ok(table::write(frame, &target, vec![])?)
        }
        (Format::Parquet, Some(o)) => {
            let target = Target::parse(o)?;
            if target.format != armorm::output::Format::Parquet {
                return Err(anyhow!(
                    "--format parquet needs an -o path ending in .parquet"
                ));
            }
            Ok(table::write(frame, &target, vec![])?)
        }
        (Format::Parquet, None) => Err(anyhow!("--format parquet needs -o FILE.parquet")),
    }
}

/// The input as a scored table: read as is when it has `coefficients`, else scored with the model.
fn scored_table(args: &ExplainArgs) -> Result<Table> {
    let job = Job::new(&args.model, args.columns.reading(), &args.run);
    // stdin can be read once: keep its bytes so that raw data can be scored after the look.
    let (table, input) = if args.input == "-" {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).context("reading stdin")?;
        let table = Table::new(table::jsonl_frame(STDIN, bytes.clone())?, None);
        (table, vec![stdin_source(bytes.into(), &job)])
    } else {
        let files = inputs::resolve_one(&args.input, args.run.quiet)?;
        (table::read_files(&files)?, job.openers(&files))
    };
    if table.frame.column("coefficients").is_err() && table.frame.height() > 0 {
        return Ok(Table::new(job.score_to_memory(input)?, None));
    }
    Ok(table)
}

/// stdin's bytes, read as a JSONL file is (columns read ahead), as `armorm score FILE` reads it.
fn stdin_source(bytes: std::sync::Arc<[u8]>, job: &Job) -> InputSource {
    let (names, window, max_line) = (
        job.reading.names.clone(),
        job.window_rows,
        job.reading.max_line_bytes,
    );
    let open: Opener = Box::new(move || {
        let source = JsonlSource::from_bytes(bytes, STDIN, &names, window, max_line)?;
        Ok(Box::new(source) as Box<dyn ChunkSource + Send>)
    });
    InputSource {
        name: STDIN.into(),
        share: 1.0,
        open,
    }
}

/// id (when the input has one), score, and the top-K attributes with coefficient and reward.
fn explained(table: &Table, args: &ExplainArgs) -> Result<DataFrame> {
    let f = &table.frame;
    let err = |m: String| anyhow!(m);
    let scores = table::f32_column(f, "score").map_err(err)?;
    let coefficients = table::f32_lists(f, "coefficients").map_err(err)?;
    let rewards = table::f32_lists(f, "rewards").map_err(err)?;
    let n = scores.len();
    let k = args.top_k;
    let mut names = ListStringChunkedBuilder::new("top_attributes".into(), n, n * k);
    let mut coefs = ListPrimitiveChunkedBuilder::<Float32Type>::new(
        "top_coefficients".into(),
        n,
        n * k,
        DataType::Float32,
    );
    let mut rews = ListPrimitiveChunkedBuilder::<Float32Type>::new(
        "top_rewards".into(),
        n,
        n * k,
        DataType::Float32,
    );
    for (c, r) in coefficients.iter().zip(&rewards) {
        let idx = top_k(c, k);
        names.append_values_iter(
            idx.iter()
                .map(|&i| table.attributes.get(i).map_or("?", |s| s.as_str())),
        );
        coefs.append_slice(&idx.iter().map(|&i| c[i]).collect::<Vec<_>>());
        rews.append_slice(
            &idx.iter()
                .map(|&i| {
                    display_reward(
                        i,
                        r.get(i).copied().unwrap_or(f32::NAN),
                        args.helpsteer_scale,
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    let mut columns = Vec::new();
    if let Ok(id) = f.column("id") {
        columns.push(id.clone());
    }
    columns.push(Column::new("score".into(), scores));
    columns.push(names.finish().into_series().into_column());
    columns.push(coefs.finish().into_series().into_column());
    columns.push(rews.finish().into_series().into_column());
    Ok(DataFrame::new_infer_height(columns)?)
}

/// An aligned table: one line per row, `attribute: coefficient (reward)` for each of the top K.
fn print_table(frame: &DataFrame, k: usize) -> Result<()> {
    let ids = frame.column("id").ok();
    let scores = table::f32_column(frame, "score").map_err(|m| anyhow!(m))?;
    let coefs = table::f32_lists(frame, "top_coefficients").map_err(|m| anyhow!(m))?;
    let rews = table::f32_lists(frame, "top_rewards").map_err(|m| anyhow!(m))?;
    let names = frame.column("top_attributes")?.list()?.clone();
    let mut rows: Vec<Vec<String>> = vec![{
        let mut h = vec!["row".to_string()];
        if ids.is_some() {
            h.push("id".into());
        }
        h.push("score".into());
        h.extend((1..=k).map(|i| format!("#{i} attribute: coefficient (reward)")));
        h
    }];
    for i in 0..frame.height() {
        let mut r = vec![(i + 1).to_string()];
        if let Some(ids) = ids {
            r.push(
                ids.get(i)
                    .map(|v| v.str_value().to_string())
                    .unwrap_or_default(),
            );
        }
        r.push(format!("{:.5}", scores[i]));
        let row_names: Vec<String> = names
            .get_as_series(i)
            .and_then(|s| {
                s.str().ok().map(|ca| {
                    (0..ca.len())
                        .map(|j| ca.get(j).unwrap_or("").to_string())
                        .collect()
                })
            })
            .unwrap_or_default();
        for (j, name) in row_names.iter().enumerate() {
            r.push(format!("{name}: {:.5} ({:.5})", coefs[i][j], rews[i][j]));
        }
        rows.push(r);
    }
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..width)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| format!("{s:<w$}", w = widths[c]))
            .collect();
        writeln!(out, "{}", line.join("  ").trim_end())?;
    }
    out.flush()?;
    Ok(())
}
