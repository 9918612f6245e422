//! DPO pairs with their reasons (`armorm best-of-n --pairs`): each objective's share of the margin, the
//! objectives that made the chosen side win, and the filters that keep only trustworthy pairs (a
//! minimum margin, an SQL condition over both sides' rewards, a length-ratio cap).
//!
//! For a pair of one prompt the gating, and so the coefficients, depend on the prompt alone, so
//! margin = Σ coefficients · (rewards_chosen − rewards_rejected) exactly (up to float rounding), and
//! each term is that objective's share.

use polars::prelude::*;
use polars::sql::SQLContext;

use crate::lists::{check_lists, objective, to_list, ListError, TopK};

/// Temporary columns of the pairs frame, dropped by `mine`: the two sides' rewards and the chosen
/// side's coefficients.
pub const REWARDS_CHOSEN: &str = "__armorm_rewards_chosen";
pub const REWARDS_REJECTED: &str = "__armorm_rewards_rejected";
pub const COEFFICIENTS_CHOSEN: &str = "__armorm_coefficients_chosen";

/// What `--min-margin`, `--max-length-ratio` and `--require` ask of a pair.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub min_margin: Option<f64>,
    pub max_length_ratio: Option<f64>,
    pub require: Option<String>,
}

impl Filters {
    pub fn any(&self) -> bool {
        self.min_margin.is_some() || self.max_length_ratio.is_some() || self.require.is_some()
    }
}

/// The pairs kept, and how many each filter left out (in the order they apply).
pub struct Mined {
    pub frame: DataFrame,
    pub dropped: Vec<(&'static str, usize)>,
}

#[derive(Debug, thiserror::Error)]
pub enum MiningError {
    #[error("{0}")]
    Pairs(String),
    #[error(transparent)]
    List(#[from] ListError),
    #[error("--require {condition}: {error}")]
    Require {
        condition: String,
        error: PolarsError,
    },
    #[error("{0}")]
    Polars(#[from] PolarsError),
}

/// `pairs` (`chosen`, `rejected`, `margin` and the temporary columns) with `margin_by_objective` and
/// `top_margin_attributes` (the `top_k` largest positive terms), filtered by `filters`.
pub fn mine(
    pairs: DataFrame,
    attributes: &[String],
    top_k: usize,
    filters: &Filters,
) -> Result<Mined, MiningError> {
    let n = attributes.len();
    for name in [REWARDS_CHOSEN, REWARDS_REJECTED, COEFFICIENTS_CHOSEN] {
        check_lists(&pairs, name, n)?;
    }
    let terms: Vec<Expr> = (0..n)
        .map(|i| {
            objective(col(COEFFICIENTS_CHOSEN), i)
                * (objective(col(REWARDS_CHOSEN), i) - objective(col(REWARDS_REJECTED), i))
        })
        .collect();
    let (lf, top) = TopK::add(pairs.lazy(), terms.clone(), top_k, "__armorm_margin_top_");
    let names = Series::new(
        "".into(),
        attributes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    );
    let top_names = top.list(
        |i| lit(names.clone()).gather(i, true),
        DataType::String,
        true,
    )?;
    // A side without scores (kept under --on-error skip) has no shares either.
    let scored = col(REWARDS_CHOSEN)
        .is_not_null()
        .and(col(REWARDS_REJECTED).is_not_null())
        .and(col(COEFFICIENTS_CHOSEN).is_not_null());
    let or_null = |list: Expr, dtype: DataType| {
        when(scored.clone())
            .then(list)
            .otherwise(lit(NULL).cast(DataType::List(Box::new(dtype))))
    };
    let lf = lf.with_columns([
        or_null(to_list(terms, DataType::Float32)?, DataType::Float32).alias("margin_by_objective"),
        or_null(top_names, DataType::String).alias("top_margin_attributes"),
    ]);
    let mut frame = top.drop(lf).collect()?;
    let mut dropped = Vec::new();
    if let Some(x) = filters.min_margin {
        frame = keep(
            frame,
            col("margin").gt_eq(lit(x)),
            "--min-margin",
            &mut dropped,
        )?;
    }
    if let Some(r) = filters.max_length_ratio {
        let within = length_ratio_at_most(&frame, r)?;
        frame = keep(frame, within, "--max-length-ratio", &mut dropped)?;
    }
    if let Some(condition) = &filters.require {
        let before = frame.height();
        frame = require(frame, attributes, condition).map_err(|error| MiningError::Require {
            condition: condition.clone(),
            error,
        })?;
        dropped.push(("--require", before - frame.height()));
    }
    let frame = frame.drop_many([REWARDS_CHOSEN, REWARDS_REJECTED, COEFFICIENTS_CHOSEN]);
    Ok(Mined { frame, dropped })
}

/// The rows where `predicate` holds; counts the others under `flag`.
fn keep(
    frame: DataFrame,
    predicate: Expr,
    flag: &'static str,
    dropped: &mut Vec<(&'static str, usize)>,
) -> PolarsResult<DataFrame> {
    let before = frame.height();
    // A null (NaN score, missing text) is not a pass.
    let out = frame
        .lazy()
        .filter(predicate.fill_null(lit(false)))
        .collect()?;
    dropped.push((flag, before - out.height()));
    Ok(out)
}

/// The longer response has at most `r` times the characters of the shorter (two empty responses
/// pass; an empty one against a non-empty one does not).
fn length_ratio_at_most(frame: &DataFrame, r: f64) -> Result<Expr, MiningError> {
    for side in ["chosen", "rejected"] {
        let dtype = frame.column(side)?.dtype();
        if dtype != &DataType::String {
            return Err(MiningError::Pairs(format!(
                "--max-length-ratio compares the characters of text responses, and `{side}` is \
                 {dtype} (see --response-column)"
            )));
        }
    }
    let len = |side: &str| col(side).str().len_chars().cast(DataType::Float64);
    // Each side at most r times the other: the longer one at most r times the shorter (r ≥ 1).
    let (chosen, rejected) = (len("chosen"), len("rejected"));
    Ok(chosen
        .clone()
        .lt_eq(rejected.clone() * lit(r))
        .and(rejected.lt_eq(chosen * lit(r))))
}

/// The rows that meet the SQL `condition`, with each objective visible as `chosen_NAME`,
/// `rejected_NAME` (the two rewards) and `margin_NAME` (its term of margin_by_objective).
fn require(frame: DataFrame, attributes: &[String], condition: &str) -> PolarsResult<DataFrame> {
    let mut added = Vec::new();
    let mut exprs = Vec::new();
    for (i, name) in attributes.iter().enumerate() {
        for (prefix, list) in [
            ("chosen_", REWARDS_CHOSEN),
            ("rejected_", REWARDS_REJECTED),
            ("margin_", "margin_by_objective"),
        ] {
            let column = format!("{prefix}{name}");
            if frame.column(&column).is_ok() {
                continue;
            }
            exprs.push(objective(col(list), i).alias(column.as_str()));
            added.push(column);
        }
    }
    let mut ctx = SQLContext::new();
    ctx.register("pairs", frame.lazy().with_columns(exprs));
    let out = ctx
        .execute(&format!("SELECT * FROM pairs WHERE {condition}"))?
        .collect()?;
    Ok(out.drop_many(added))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(name: &str, rows: &[[f32; 3]]) -> Column {
        let mut b =
            ListPrimitiveChunkedBuilder::<Float32Type>::new(name.into(), 3, 9, DataType::Float32);
        for r in rows {
            b.append_slice(r);
        }
        b.finish().into_series().into_column()
    }

    /// Objectives a, b, c; coefficients (0.5, 1, 2) for both pairs.
    /// p: chosen rewards (1, 0, 1), rejected (0, 1, 0.5): terms (0.5, −1, 1), margin 0.5.
    /// q: chosen (0, 0, 3), rejected (0, 0, 1): terms (0, 0, 4), margin 4.
    fn pairs() -> DataFrame {
        DataFrame::new_infer_height(vec![
            Column::new("prompt".into(), ["p", "q"]),
            Column::new("chosen".into(), ["abcd", "a"]),
            Column::new("rejected".into(), ["ab", "abcdefgh"]),
            Column::new("margin".into(), [0.5f32, 4.0]),
            list(REWARDS_CHOSEN, &[[1.0, 0.0, 1.0], [0.0, 0.0, 3.0]]),
            list(REWARDS_REJECTED, &[[0.0, 1.0, 0.5], [0.0, 0.0, 1.0]]),
            list(COEFFICIENTS_CHOSEN, &[[0.5, 1.0, 2.0], [0.5, 1.0, 2.0]]),
        ])
        .unwrap()
    }

    fn attrs() -> Vec<String> {
        ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
    }

    fn prompts(df: &DataFrame) -> Vec<String> {
        let c = df.column("prompt").unwrap().str().unwrap().clone();
        (0..c.len())
            .map(|i| c.get(i).unwrap().to_string())
            .collect()
    }

    #[test]
    fn margins_by_objective_and_the_objectives_that_won() {
        let m = mine(pairs(), &attrs(), 3, &Filters::default()).unwrap();
        let df = m.frame;
        let terms = df
            .column("margin_by_objective")
            .unwrap()
            .list()
            .unwrap()
            .clone();
        let p = terms.get_as_series(0).unwrap();
        let p: Vec<f32> = (0..3).map(|i| p.f32().unwrap().get(i).unwrap()).collect();
        assert_eq!(p, [0.5, -1.0, 1.0]);
        assert!(
            (p.iter().sum::<f32>() - 0.5).abs() < 1e-6,
            "terms sum to the margin"
        );
        let top = df
            .column("top_margin_attributes")
            .unwrap()
            .list()
            .unwrap()
            .clone();
        let names = |row: usize| -> Vec<String> {
            let s = top.get_as_series(row).unwrap();
            let s = s.str().unwrap().clone();
            (0..s.len())
                .map(|i| s.get(i).unwrap().to_string())
                .collect()
        };
        // p: c (1) then a (0.5); b lost. q: c alone is positive.
        assert_eq!(names(0), ["c", "a"]);
        assert_eq!(names(1), ["c"]);
        assert!(
            df.column(REWARDS_CHOSEN).is_err(),
            "temporary columns are dropped"
        );
    }

    #[test]
    fn filters_keep_and_count() {
        let only = |f: Filters| {
            let m = mine(pairs(), &attrs(), 2, &f).unwrap();
            (prompts(&m.frame), m.dropped)
        };
        let (kept, dropped) = only(Filters {
            min_margin: Some(1.0),
            ..Filters::default()
        });
        assert_eq!(
            (kept, dropped),
            (vec!["q".to_string()], vec![("--min-margin", 1)])
        );
        // p: 4 against 2 characters (ratio 2); q: 8 against 1.
        let (kept, _) = only(Filters {
            max_length_ratio: Some(2.0),
            ..Filters::default()
        });
        assert_eq!(kept, ["p"]);
        let (kept, _) = only(Filters {
            require: Some(r#""rejected_b" < 0.5 AND "margin_c" > 3"#.into()),
            ..Filters::default()
        });
        assert_eq!(kept, ["q"]);
        let (kept, _) = only(Filters {
            require: Some(r#""chosen_a" >= 1"#.into()),
            ..Filters::default()
        });
        assert_eq!(kept, ["p"]);
    }

    #[test]
    fn a_side_without_scores_has_no_shares() {
        let mut df = pairs();
        let mut b = ListPrimitiveChunkedBuilder::<Float32Type>::new(
            REWARDS_REJECTED.into(),
            2,
            3,
            DataType::Float32,
        );
        b.append_null();
        b.append_slice(&[0.0, 0.0, 1.0]);
        df.with_column(b.finish().into_series().into_column())
            .unwrap();
        let out = mine(df, &attrs(), 2, &Filters::default()).unwrap().frame;
        for name in ["margin_by_objective", "top_margin_attributes"] {
            let c = out.column(name).unwrap();
            assert_eq!(
                (c.null_count(), c.get(1).unwrap().is_null()),
                (1, false),
                "{name}"
            );
        }
    }

    #[test]
    fn a_bad_condition_names_itself() {
        let e = mine(
            pairs(),
            &attrs(),
            2,
            &Filters {
                require: Some("\"chosen_zz\" > 1".into()),
                ..Filters::default()
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("--require") && e.contains("chosen_zz"), "{e}");
    }
}
