//! `armorm rescore`: a new score for scored files from their stored rewards and coefficients, without
//! the model.

use anyhow::{anyhow, Context, Result};
use clap::Args;
use polars::prelude::DataFrame;

use armorm::format::Format;
use armorm::input::InputFile;
use armorm::output::{self, Target};
use armorm::rescore::{self, Assignments, FixedCoefficients, Rule, METADATA_KEY};
use armorm::table;

#[derive(Args)]
pub struct RescoreArgs {
    /// Files written by `armorm score` (.parquet or .jsonl, or hf://datasets/OWNER/NAME[@REVISION]/PATH_OR_GLOB),
    /// read in order as one table; - reads JSONL from stdin.
    #[arg(required = true)]
    inputs: Vec<String>,
    /// Multiply objectives' coefficients, e.g. `helpsteer-correctness=2,helpsteer-verbosity=-1` (the
    /// others keep theirs); may be repeated.
    #[arg(long, value_name = "NAME=W,...")]
    weights: Vec<Assignments>,
    /// `fixed:NAME=W,...`: these coefficients for every row instead of the gating's (objectives not
    /// named get 0), e.g. `fixed:helpsteer-correctness=1,beavertails-is_safe=0.5`.
    #[arg(long, value_name = "fixed:NAME=W,...")]
    coefficients: Option<FixedCoefficients>,
    /// Keep only these objectives' coefficients; the others become 0.
    #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
    objectives: Option<Vec<String>>,
    /// .parquet or .jsonl, or - for JSONL on stdout.
    #[arg(short, long, default_value = "-")]
    output: String,
}

pub fn run(args: RescoreArgs) -> Result<()> {
    let rule = Rule {
        fixed: args.coefficients.map(|c| c.0),
        weights: args.weights.into_iter().flat_map(|a| a.0).collect(),
        objectives: args.objectives,
    };
    if rule.is_identity() {
        return Err(anyhow!(
            "nothing to do: give --weights, --coefficients fixed:... and/or --objectives"
        ));
    }
    if args.inputs.iter().filter(|i| *i == "-").count() > 1 {
        return Err(anyhow!("stdin (-) can be read only once"));
    }
    let target = Target::parse(&args.output)?;
    let inputs = read_inputs(&super::inputs::resolve(&args.inputs, false)?)?;
    let resolved = rule.resolve(&inputs.attributes)?;
    let frame = rescore::rescore(inputs.frame, &inputs.attributes, &resolved)
        .with_context(|| args.inputs.join(", "))?;
    let mut meta = vec![(
        "armorm.attributes".to_string(),
        serde_json::to_string(&inputs.attributes)?,
    )];
    meta.extend(
        inputs
            .metadata
            .into_iter()
            // Other tools' metadata (pandas, datasets) describes columns that have changed.
            .filter(|(k, _)| {
                k.starts_with("armorm.") && k != "armorm.attributes" && k != METADATA_KEY
            }),
    );
    let history = rescore::history(inputs.history.as_deref(), &rule)
        .map_err(|m| anyhow!("{}: {m}", args.inputs[0]))?;
    meta.push((METADATA_KEY.to_string(), history));
    Ok(table::write(frame, &target, meta)?)
}

/// The inputs as one table, with the metadata they agree on.
struct Inputs {
    frame: DataFrame,
    attributes: Vec<String>,
    /// Key-value metadata that every Parquet input has with the same value (all of it; only the
    /// `armorm.*` keys are written).
    metadata: Vec<(String, String)>,
    /// The inputs' `armorm.rescore`, when they were rescored before.
    history: Option<String>,
}

fn read_inputs(files: &[InputFile]) -> Result<Inputs> {
    let (first, rest) = files.split_first().ok_or_else(|| anyhow!("no input"))?;
    let first_label = first.label.as_str();
    let t = read_one(first)?;
    let mut inputs = Inputs {
        frame: t.frame,
        attributes: t.attributes,
        metadata: Vec::new(),
        history: None,
    };
    // Only Parquet carries metadata: the Parquet inputs must agree on their rescore history.
    let mut parquet: Option<(&str, Vec<(String, String)>)> = t.metadata.map(|m| (first_label, m));
    for file in rest {
        let label = file.label.as_str();
        let t = read_one(file)?;
        if t.attributes != inputs.attributes {
            return Err(anyhow!(
                "{label}: its objectives differ from {first_label}'s ({} against {})",
                t.attributes.join(","),
                inputs.attributes.join(",")
            ));
        }
        // Before the columns: a rescored file and a plain one differ in both, and the history says why.
        if let Some(meta) = t.metadata {
            parquet = Some(match parquet {
                None => (label, meta),
                Some((earlier, kept)) => {
                    if value(&kept, METADATA_KEY) != value(&meta, METADATA_KEY) {
                        return Err(anyhow!(
                            "{label}: rescored differently from {earlier} ({METADATA_KEY} \
                             differs); rescore them separately"
                        ));
                    }
                    (earlier, agreed(kept, &meta, label))
                }
            });
        }
        let frame = output::conform(t.frame, inputs.frame.schema().as_ref())
            .map_err(|m| anyhow!("{label}: {m}"))?;
        inputs.frame.vstack_mut(&frame)?;
    }
    if let Some((_, meta)) = parquet {
        inputs.history = value(&meta, METADATA_KEY).map(str::to_string);
        inputs.metadata = meta;
    }
    Ok(inputs)
}

/// One input, its lists checked against its objectives, and its metadata when it is Parquet.
struct One {
    frame: DataFrame,
    attributes: Vec<String>,
    metadata: Option<Vec<(String, String)>>,
}

fn read_one(file: &InputFile) -> Result<One> {
    let (path, label) = (file.path.as_str(), file.label.as_str());
    let t = table::read_files(std::slice::from_ref(file))?;
    let n = t.attributes.len();
    armorm::lists::check_lists(&t.frame, "rewards", n)
        .and_then(|()| armorm::lists::check_lists(&t.frame, "coefficients", n))
        .with_context(|| label.to_string())?;
    let parquet = Format::of(path) == Some(Format::Parquet);
    Ok(One {
        frame: t.frame,
        attributes: t.attributes,
        metadata: if parquet {
            Some(table::file_metadata(path)?)
        } else {
            None
        },
    })
}

fn value<'a>(meta: &'a [(String, String)], key: &str) -> Option<&'a str> {
    meta.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The entries of `kept` that `other` has with the same value; the others are left out of the output,
/// which says so, since they no longer describe every row.
fn agreed(
    kept: Vec<(String, String)>,
    other: &[(String, String)],
    label: &str,
) -> Vec<(String, String)> {
    kept.into_iter()
        .filter(|(k, v)| {
            let same = other.iter().any(|(k2, v2)| k2 == k && v2 == v);
            if !same && k.starts_with("armorm.") {
                eprintln!(
                    "armorm: {label} differs from the inputs before it in {k}; it is left out of \
                     the output's metadata"
                );
            }
            same
        })
        .collect()
}
