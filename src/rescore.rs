//! A new score from a scored table's stored rewards and coefficients, without the model: objectives
//! re-weighted, fixed in place of the gating, or kept to a subset (`armorm rescore`).
//!
//! Everything is a polars expression over the list columns (one `list.get` per objective), so a million
//! rows take a fraction of a second; no row is visited in Rust.

use std::str::FromStr;

use polars::prelude::*;
use serde_json::{json, Map, Value};

use crate::lists::{check_lists, objective, to_list, ListError, TopK};

/// The original score and coefficients, kept beside the new ones by the first rescore.
pub const ORIGINAL_SCORE: &str = "score_original";
pub const ORIGINAL_COEFFICIENTS: &str = "coefficients_original";
/// Parquet metadata key: the JSON list of rescore steps applied to the file, oldest first.
pub const METADATA_KEY: &str = "armorm.rescore";

/// `NAME=W,NAME=W`: objectives and numbers, as `--weights` and `fixed:` take them.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignments(pub Vec<(String, f64)>);

impl FromStr for Assignments {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: expected NAME=WEIGHT"))?;
            let name = name.trim();
            if name.is_empty() {
                return Err(format!("`{part}`: no objective name before `=`"));
            }
            let w: f64 = value
                .trim()
                .parse()
                .ok()
                .filter(|w: &f64| w.is_finite())
                .ok_or_else(|| format!("`{part}`: `{}` is not a finite number", value.trim()))?;
            out.push((name.to_string(), w));
        }
        if out.is_empty() {
            return Err("expected NAME=WEIGHT[,NAME=WEIGHT...]".into());
        }
        Ok(Self(out))
    }
}

/// `--coefficients fixed:NAME=W,...`: one set of coefficients for every row.
#[derive(Debug, Clone, PartialEq)]
pub struct FixedCoefficients(pub Assignments);

impl FromStr for FixedCoefficients {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("fixed:").ok_or_else(|| {
            format!("`{s}`: expected fixed:NAME=WEIGHT,... (e.g. fixed:helpsteer-correctness=1)")
        })?;
        Ok(Self(rest.parse()?))
    }
}

/// How the new coefficients are made: coefficients' = base ⊙ weights ⊙ kept, where base is the stored
/// coefficients (or the fixed ones), weights are 1 unless named, and kept is 1 for the objectives kept
/// (all, without `objectives`) and 0 for the others.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rule {
    pub fixed: Option<Assignments>,
    pub weights: Vec<(String, f64)>,
    pub objectives: Option<Vec<String>>,
}

/// A rule against a table's objectives, one number per objective.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The coefficients that replace the stored ones (0 for unnamed objectives), when fixed.
    pub fixed: Option<Vec<f64>>,
    /// Each objective's multiplier: its weight, or 0 when it is not kept.
    pub factors: Vec<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RescoreError {
    #[error("{flag}: unknown objective `{name}`; the objectives are: {}", valid.join(", "))]
    UnknownObjective {
        flag: &'static str,
        name: String,
        valid: Vec<String>,
    },
    #[error("{flag}: objective `{name}` is named twice")]
    Repeated { flag: &'static str, name: String },
    #[error("{0}")]
    Table(String),
    #[error(transparent)]
    List(#[from] ListError),
    #[error("{0}")]
    Polars(#[from] PolarsError),
}

impl Rule {
    /// No fixed coefficients, no weights and no subset: the stored score again.
    pub fn is_identity(&self) -> bool {
        self.fixed.is_none() && self.weights.is_empty() && self.objectives.is_none()
    }

    /// One fixed coefficient (or none) and one factor per objective of `attributes`.
    pub fn resolve(&self, attributes: &[String]) -> Result<Resolved, RescoreError> {
        let n = attributes.len();
        let fixed = match &self.fixed {
            Some(a) => Some(per_objective(&a.0, attributes, "--coefficients", 0.0)?),
            None => None,
        };
        let mut factors = per_objective(&self.weights, attributes, "--weights", 1.0)?;
        if let Some(names) = &self.objectives {
            let keep: Vec<(String, f64)> = names.iter().map(|s| (s.clone(), 1.0)).collect();
            let keep = per_objective(&keep, attributes, "--objectives", 0.0)?;
            for (f, k) in factors.iter_mut().zip(keep) {
                *f *= k;
            }
        }
        debug_assert_eq!(factors.len(), n);
        Ok(Resolved { fixed, factors })
    }

    /// The rule as recorded in `armorm.rescore`: what was asked, by objective name.
    pub fn record(&self) -> Value {
        let map = |a: &[(String, f64)]| -> Value {
            Value::Object(
                a.iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect::<Map<_, _>>(),
            )
        };
        json!({
            "formula": "coefficients' = base * weights * kept; score = sum(rewards * coefficients')",
            "base": match &self.fixed {
                Some(a) => json!({ "fixed": map(&a.0) }),
                None => json!("stored coefficients"),
            },
            "weights": map(&self.weights),
            "objectives": match &self.objectives {
                Some(o) => json!(o),
                None => json!("all"),
            },
            "armorm_version": env!("CARGO_PKG_VERSION"),
        })
    }
}

/// `named` as one value per objective of `attributes` (`default` for the unnamed), refusing unknown or
/// repeated names.
fn per_objective(
    named: &[(String, f64)],
    attributes: &[String],
    flag: &'static str,
    default: f64,
) -> Result<Vec<f64>, RescoreError> {
    let mut out = vec![default; attributes.len()];
    let mut seen = vec![false; attributes.len()];
    for (name, value) in named {
        let i = attributes.iter().position(|a| a == name).ok_or_else(|| {
            RescoreError::UnknownObjective {
                flag,
                name: name.clone(),
                valid: attributes.to_vec(),
            }
        })?;
        if std::mem::replace(&mut seen[i], true) {
            return Err(RescoreError::Repeated {
                flag,
                name: name.clone(),
            });
        }
        out[i] = *value;
    }
    Ok(out)
}

/// `armorm.rescore` after one more step: the earlier steps (a JSON list, when the input had one) and
/// `rule`'s record.
pub fn history(earlier: Option<&str>, rule: &Rule) -> Result<String, String> {
    let mut steps = match earlier {
        None => Vec::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Array(steps)) => steps,
            _ => return Err(format!("{METADATA_KEY} is not a JSON list: {text}")),
        },
    };
    steps.push(rule.record());
    serde_json::to_string(&Value::Array(steps)).map_err(|e| e.to_string())
}

/// `frame` with `score` and `coefficients` replaced by the rescored ones. The first rescore keeps the
/// originals as `score_original` and `coefficients_original`; a later one leaves those as they are and
/// starts from the current `coefficients`, so rescores compose. `top_attributes`/`top_coefficients`,
/// when present, are recomputed from the new coefficients. Rows without rewards stay without scores.
pub fn rescore(
    frame: DataFrame,
    attributes: &[String],
    rule: &Resolved,
) -> Result<DataFrame, RescoreError> {
    let n = attributes.len();
    check_lists(&frame, "rewards", n)?;
    check_lists(&frame, "coefficients", n)?;
    if frame.column("score").is_err() {
        return Err(RescoreError::Table(
            "no `score` column: run armorm score first".into(),
        ));
    }
    let rescored = frame.column(ORIGINAL_SCORE).is_ok();
    if rescored != frame.column(ORIGINAL_COEFFICIENTS).is_ok() {
        return Err(RescoreError::Table(format!(
            "has one of `{ORIGINAL_SCORE}` and `{ORIGINAL_COEFFICIENTS}` without the other: not a \
             file armorm rescore wrote"
        )));
    }
    let scored = col("rewards")
        .is_not_null()
        .and(col("coefficients").is_not_null());
    // Each new coefficient is rounded to f32 (its stored type) before the sum, so that the file's score is
    // Σ rewards · coefficients of the file itself; the sum is in f64.
    let coefficients: Vec<Expr> = (0..n)
        .map(|i| {
            let base = match &rule.fixed {
                Some(w) => lit(w[i]),
                None => objective(col("coefficients"), i),
            };
            // A dropped objective is 0, not −0 for the negative coefficients.
            let c = match rule.factors[i] {
                0.0 => lit(0.0),
                f => base * lit(f),
            };
            c.cast(DataType::Float32).cast(DataType::Float64)
        })
        .collect();
    let terms: Vec<Expr> = coefficients
        .iter()
        .enumerate()
        .map(|(i, c)| objective(col("rewards"), i) * c.clone())
        .collect();
    let score = terms
        .into_iter()
        .reduce(|a, b| a + b)
        .unwrap_or_else(|| lit(0.0));
    let list = to_list(coefficients, DataType::Float32)?;
    let mut lf = frame.lazy();
    if !rescored {
        lf = lf.with_columns([
            col("score").alias(ORIGINAL_SCORE),
            col("coefficients").alias(ORIGINAL_COEFFICIENTS),
        ]);
    }
    let mut out = lf
        .with_columns([
            when(scored.clone())
                .then(score.cast(DataType::Float32))
                .otherwise(lit(NULL).cast(DataType::Float32))
                .alias("score"),
            when(scored)
                .then(list)
                .otherwise(lit(NULL).cast(DataType::List(Box::new(DataType::Float32))))
                .alias("coefficients"),
        ])
        .collect()?;
    if out.column("top_attributes").is_ok() && out.column("top_coefficients").is_ok() {
        out = top_columns(out, attributes)?;
    }
    Ok(out)
}

/// `top_attributes`/`top_coefficients` again, from the current `coefficients`: the K largest
/// |coefficient| (K as the file had it), largest first, equal magnitudes in model order, as
/// `armorm score --top-k` writes them.
fn top_columns(frame: DataFrame, attributes: &[String]) -> Result<DataFrame, RescoreError> {
    let k = frame
        .column("top_attributes")?
        .list()?
        .lst_lengths()
        .max()
        .unwrap_or(0) as usize;
    let magnitudes = (0..attributes.len())
        .map(|i| objective(col("coefficients"), i).abs())
        .collect();
    let (lf, top) = TopK::add(frame.lazy(), magnitudes, k, "__armorm_top_");
    let names = Series::new(
        "".into(),
        attributes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    );
    let scored = col("coefficients").is_not_null();
    let or_null = |list: Expr, dtype: DataType| {
        when(scored.clone())
            .then(list)
            .otherwise(lit(NULL).cast(DataType::List(Box::new(dtype))))
    };
    let top_names = top.list(
        |i| lit(names.clone()).gather(i, true),
        DataType::String,
        false,
    )?;
    let top_values = top.list(
        |i| col("coefficients").list().get(i, true),
        DataType::Float32,
        false,
    )?;
    let lf = lf.with_columns([
        or_null(top_names, DataType::String).alias("top_attributes"),
        or_null(top_values, DataType::Float32).alias("top_coefficients"),
    ]);
    Ok(top.drop(lf).collect()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn list(name: &str, rows: &[Option<Vec<f32>>]) -> Column {
        let mut b =
            ListPrimitiveChunkedBuilder::<Float32Type>::new(name.into(), 4, 12, DataType::Float32);
        for r in rows {
            match r {
                Some(v) => b.append_slice(v),
                None => b.append_null(),
            }
        }
        b.finish().into_series().into_column()
    }

    /// Two rows over three objectives a, b, c: rewards (1, 2, 3) and (4, 5, 6), coefficients
    /// (0.5, 0.25, 0.25) and (1, 0, -1); stored scores 1.75 and -2.
    fn table() -> DataFrame {
        DataFrame::new_infer_height(vec![
            Column::new("id".into(), ["x", "y"]),
            Column::new("score".into(), [1.75f32, -2.0]),
            list(
                "rewards",
                &[Some(vec![1.0, 2.0, 3.0]), Some(vec![4.0, 5.0, 6.0])],
            ),
            list(
                "coefficients",
                &[Some(vec![0.5, 0.25, 0.25]), Some(vec![1.0, 0.0, -1.0])],
            ),
        ])
        .unwrap()
    }

    fn floats(df: &DataFrame, name: &str) -> Vec<Option<f32>> {
        f32s(df.column(name).unwrap().as_materialized_series())
    }

    fn f32s(s: &Series) -> Vec<Option<f32>> {
        let s = s.cast(&DataType::Float32).unwrap();
        let ca = s.f32().unwrap();
        (0..ca.len()).map(|i| ca.get(i)).collect()
    }

    fn run(rule: Rule) -> DataFrame {
        let attrs = names(&["a", "b", "c"]);
        rescore(table(), &attrs, &rule.resolve(&attrs).unwrap()).unwrap()
    }

    #[test]
    fn weights_multiply_coefficients() {
        // x: 1·0.5 + 2·0.25·2 + 3·0.25·(-1) = 0.75; y: 4·1 + 0 + 6·(-1)·(-1) = 10.
        let out = run(Rule {
            weights: vec![("b".into(), 2.0), ("c".into(), -1.0)],
            ..Rule::default()
        });
        assert_eq!(floats(&out, "score"), [Some(0.75), Some(10.0)]);
        assert_eq!(floats(&out, ORIGINAL_SCORE), [Some(1.75), Some(-2.0)]);
        let c = out.column("coefficients").unwrap().list().unwrap().clone();
        let c0 = f32s(&c.get_as_series(0).unwrap());
        assert_eq!(c0, [Some(0.5), Some(0.5), Some(-0.25)]);
        let names: Vec<String> = out
            .get_column_names()
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "id",
                "score",
                "rewards",
                "coefficients",
                ORIGINAL_SCORE,
                ORIGINAL_COEFFICIENTS
            ]
        );
    }

    #[test]
    fn fixed_coefficients_replace_the_stored_ones() {
        // a=1, c=2, b=0: x 1 + 6 = 7; y 4 + 12 = 16.
        let out = run(Rule {
            fixed: Some("a=1,c=2".parse().unwrap()),
            ..Rule::default()
        });
        assert_eq!(floats(&out, "score"), [Some(7.0), Some(16.0)]);
    }

    #[test]
    fn objectives_keep_a_subset() {
        // Only b: x 2·0.25 = 0.5; y 5·0 = 0.
        let out = run(Rule {
            objectives: Some(names(&["b"])),
            ..Rule::default()
        });
        assert_eq!(floats(&out, "score"), [Some(0.5), Some(0.0)]);
    }

    #[test]
    fn all_weights_one_is_the_stored_score_and_a_rescore_composes() {
        let attrs = names(&["a", "b", "c"]);
        let ones = Rule {
            weights: vec![("a".into(), 1.0), ("b".into(), 1.0), ("c".into(), 1.0)],
            ..Rule::default()
        };
        let out = rescore(table(), &attrs, &ones.resolve(&attrs).unwrap()).unwrap();
        assert_eq!(floats(&out, "score"), [Some(1.75), Some(-2.0)]);
        // b doubled twice is b × 4, and the originals stay the model's.
        let double = Rule {
            weights: vec![("b".into(), 2.0)],
            ..Rule::default()
        };
        let r = double.resolve(&attrs).unwrap();
        let twice = rescore(rescore(table(), &attrs, &r).unwrap(), &attrs, &r).unwrap();
        // x: 0.5 + 2·1 + 0.75 = 3.25; y: 4 + 0 − 6 = −2.
        assert_eq!(floats(&twice, "score"), [Some(3.25), Some(-2.0)]);
        assert_eq!(floats(&twice, ORIGINAL_SCORE), [Some(1.75), Some(-2.0)]);
    }

    #[test]
    fn unscored_rows_stay_unscored() {
        let df = DataFrame::new_infer_height(vec![
            Column::new("score".into(), [Some(1.0f32), None]),
            list("rewards", &[Some(vec![1.0, 1.0]), None]),
            list("coefficients", &[Some(vec![0.5, 0.5]), None]),
        ])
        .unwrap();
        let attrs = names(&["a", "b"]);
        let rule = Rule {
            fixed: Some("a=3".parse().unwrap()),
            ..Rule::default()
        };
        let out = rescore(df, &attrs, &rule.resolve(&attrs).unwrap()).unwrap();
        assert_eq!(floats(&out, "score"), [Some(3.0), None]);
        assert_eq!(out.column("coefficients").unwrap().null_count(), 1);
    }

    #[test]
    fn unknown_and_repeated_names_are_refused() {
        let attrs = names(&["a", "b"]);
        let e = Rule {
            weights: vec![("z".into(), 2.0)],
            ..Rule::default()
        }
        .resolve(&attrs)
        .unwrap_err()
        .to_string();
        assert!(e.contains("`z`") && e.contains("a, b"), "{e}");
        let e = Rule {
            objectives: Some(names(&["a", "a"])),
            ..Rule::default()
        }
        .resolve(&attrs)
        .unwrap_err();
        assert!(e.to_string().contains("named twice"));
    }

    #[test]
    fn assignments_parse() {
        let a: Assignments = "a=2, b=-1.5".parse().unwrap();
        assert_eq!(a.0, [("a".to_string(), 2.0), ("b".to_string(), -1.5)]);
        assert!("a".parse::<Assignments>().is_err());
        assert!("a=x".parse::<Assignments>().is_err());
        assert!("a=inf".parse::<Assignments>().is_err());
        assert!("=1".parse::<Assignments>().is_err());
        assert!("a=1".parse::<FixedCoefficients>().is_err());
        assert!("fixed:a=1".parse::<FixedCoefficients>().is_ok());
    }

    #[test]
    fn a_wrong_list_length_names_the_row() {
        let df = DataFrame::new_infer_height(vec![
            Column::new("score".into(), [1.0f32, 1.0]),
            list("rewards", &[Some(vec![1.0, 1.0]), Some(vec![1.0])]),
            list(
                "coefficients",
                &[Some(vec![0.5, 0.5]), Some(vec![1.0, 1.0])],
            ),
        ])
        .unwrap();
        let attrs = names(&["a", "b"]);
        let e = rescore(df, &attrs, &Rule::default().resolve(&attrs).unwrap()).unwrap_err();
        assert!(
            e.to_string().contains("row 2: `rewards` has 1 values"),
            "{e}"
        );
    }

    #[test]
    fn top_columns_follow_the_new_coefficients() {
        let mut df = table();
        let top = |name: &str| {
            let mut b = ListStringChunkedBuilder::new(name.into(), 2, 4);
            b.append_values_iter(["a", "b"].into_iter());
            b.append_values_iter(["a", "c"].into_iter());
            b.finish().into_series().into_column()
        };
        df.with_column(top("top_attributes")).unwrap();
        df.with_column(list(
            "top_coefficients",
            &[Some(vec![0.5, 0.25]), Some(vec![1.0, -1.0])],
        ))
        .unwrap();
        let attrs = names(&["a", "b", "c"]);
        let rule = Rule {
            weights: vec![("c".into(), 3.0)],
            ..Rule::default()
        };
        let out = rescore(df, &attrs, &rule.resolve(&attrs).unwrap()).unwrap();
        // x: (0.5, 0.25, 0.75) -> c, a; y: (1, 0, -3) -> c, a.
        let t = out
            .column("top_attributes")
            .unwrap()
            .list()
            .unwrap()
            .clone();
        for row in 0..2 {
            let s = t.get_as_series(row).unwrap();
            let ca = s.str().unwrap();
            let got: Vec<&str> = (0..ca.len()).filter_map(|i| ca.get(i)).collect();
            assert_eq!(got, ["c", "a"], "row {row}");
        }
        let v = out
            .column("top_coefficients")
            .unwrap()
            .list()
            .unwrap()
            .clone();
        let y = f32s(&v.get_as_series(1).unwrap());
        assert_eq!(y, [Some(-3.0), Some(1.0)]);
    }
}
