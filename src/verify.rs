//! `armorm verify`'s arithmetic: a reproducible sample of a scored file's rows, their recorded outputs,
//! and the comparison with a fresh scoring (largest difference per column, rank correlation of the
//! scores, rows whose tokens changed).

use polars::prelude::*;
use serde::Serialize;

use crate::rescore::{ORIGINAL_COEFFICIENTS, ORIGINAL_SCORE};

/// The default `--tolerance` for a file scored in `dtype` (its `armorm.dtype`), `None` when unknown.
/// f32: 1e-4, the bound the tests hold armorm's f32 scores to against transformers (summation order
/// alone moves them by ~1e-6). bf16/f16: 5e-2, above the largest bf16-against-f32 score difference
/// measured on the benchmark model (0.033 over 128 rows, scripts/perf-notes.md note 2): 8 bits of
/// mantissa carried through every layer move the outputs by percents, not by rounding in the last digit.
pub fn default_tolerance(dtype: &str) -> Option<f64> {
    match dtype {
        "f32" => Some(1e-4),
        "bf16" | "f16" => Some(5e-2),
        _ => None,
    }
}

/// A uniform random sample of up to `n` items from a stream of unknown length (reservoir sampling,
/// Algorithm R): the same seed over the same stream keeps the same items.
pub struct Sample<T> {
    n: usize,
    seen: usize,
    rng: fastrand::Rng,
    items: Vec<T>,
}

impl<T> Sample<T> {
    pub fn new(n: usize, seed: u64) -> Self {
        Self {
            n,
            seen: 0,
            rng: fastrand::Rng::with_seed(seed),
            items: Vec::new(),
        }
    }

    /// Offers the next item of the stream; `make` builds it only if it is kept.
    pub fn offer<E>(&mut self, make: impl FnOnce() -> Result<T, E>) -> Result<(), E> {
        let k = self.seen;
        self.seen += 1;
        if k < self.n {
            self.items.push(make()?);
            return Ok(());
        }
        // Item k replaces a kept one with probability n / (k + 1).
        let j = self.rng.usize(0..=k);
        if j < self.n {
            self.items[j] = make()?;
        }
        Ok(())
    }

    /// How many items were offered.
    pub fn seen(&self) -> usize {
        self.seen
    }

    pub fn into_items(self) -> Vec<T> {
        self.items
    }
}

/// A row's model outputs, as a scored file holds them.
#[derive(Debug, Clone, PartialEq)]
pub struct Outputs {
    pub score: f32,
    pub rewards: Vec<f32>,
    pub gating: Vec<f32>,
    pub coefficients: Vec<f32>,
    pub num_tokens: Option<i64>,
    pub input_hash: Option<String>,
}

/// The output columns of a scored frame, typed once per frame.
pub struct Columns {
    score: Float32Chunked,
    rewards: ListChunked,
    gating: ListChunked,
    coefficients: ListChunked,
    num_tokens: Option<Int64Chunked>,
    input_hash: Option<StringChunked>,
    status: Option<StringChunked>,
    error: Option<StringChunked>,
}

impl Columns {
    /// `frame`'s score columns (whatever numeric types a JSONL reader gave them); an error names the
    /// missing or mistyped column. `num_tokens`, `input_hash`, `status` and `error` may be absent.
    pub fn of(frame: &DataFrame) -> Result<Self, String> {
        let cast = |name: &str, to: &DataType| -> Result<Option<Series>, String> {
            let Ok(col) = frame.column(name) else {
                return Ok(None);
            };
            let s = col.as_materialized_series();
            s.cast(to).map(Some).map_err(|e| {
                format!(
                    "column `{name}` is {}, where armorm writes {to}: {e}",
                    s.dtype()
                )
            })
        };
        let required = |name: &str, to: &DataType| -> Result<Series, String> {
            cast(name, to)?
                .ok_or_else(|| format!("no `{name}` column: not a file written by armorm score"))
        };
        let list = DataType::List(Box::new(DataType::Float32));
        let list_of = |name: &str| -> Result<ListChunked, String> {
            Ok(required(name, &list)?
                .list()
                .map_err(|e| e.to_string())?
                .clone())
        };
        let text = |name: &str| -> Result<Option<StringChunked>, String> {
            cast(name, &DataType::String)?
                .map(|s| s.str().cloned().map_err(|e| e.to_string()))
                .transpose()
        };
        // A rescored file (`armorm rescore`) keeps the model's own score and coefficients beside the
        // new ones: those are what re-scoring reproduces.
        let (score, coefficients) = match frame.column(ORIGINAL_SCORE) {
            Ok(_) => (ORIGINAL_SCORE, ORIGINAL_COEFFICIENTS),
            Err(_) => ("score", "coefficients"),
        };
        Ok(Self {
            score: required(score, &DataType::Float32)?
                .f32()
                .map_err(|e| e.to_string())?
                .clone(),
            rewards: list_of("rewards")?,
            gating: list_of("gating")?,
            coefficients: list_of(coefficients)?,
            num_tokens: cast("num_tokens", &DataType::Int64)?
                .map(|s| s.i64().cloned().map_err(|e| e.to_string()))
                .transpose()?,
            input_hash: text("input_hash")?,
            status: text("status")?,
            error: text("error")?,
        })
    }

    /// Whether row `i` has a score (rows kept without one under `--on-error skip` have none).
    pub fn scored(&self, i: usize) -> bool {
        self.score.get(i).is_some()
    }

    /// Row `i`'s outputs, or why it has none (its status and error).
    pub fn outputs(&self, i: usize) -> Result<Outputs, String> {
        let Some(score) = self.score.get(i) else {
            fn get(c: &Option<StringChunked>, i: usize) -> Option<&str> {
                c.as_ref().and_then(|c| c.get(i))
            }
            return Err(match (get(&self.status, i), get(&self.error, i)) {
                (Some(status), Some(error)) => format!("status {status}: {error}"),
                (Some(status), None) => format!("status {status}"),
                _ => "no score".to_string(),
            });
        };
        let values = |list: &ListChunked, name: &str| -> Result<Vec<f32>, String> {
            let s = list.get_as_series(i).ok_or(format!("`{name}` is null"))?;
            let ca = s.f32().map_err(|e| e.to_string())?;
            Ok(ca.iter().map(|v| v.unwrap_or(f32::NAN)).collect())
        };
        Ok(Outputs {
            score,
            rewards: values(&self.rewards, "rewards")?,
            gating: values(&self.gating, "gating")?,
            coefficients: values(&self.coefficients, "coefficients")?,
            num_tokens: self.num_tokens.as_ref().and_then(|c| c.get(i)),
            input_hash: self
                .input_hash
                .as_ref()
                .and_then(|c| c.get(i))
                .map(str::to_string),
        })
    }
}

/// One sampled row: what the file says, and what the model says now.
#[derive(Debug, Clone)]
pub struct Row {
    /// Counted from 0 over the file's rows.
    pub index: usize,
    pub recorded: Outputs,
    /// The outputs now, or why the row could not be read or scored now.
    pub now: Result<Outputs, String>,
}

/// The largest difference in one output column over the compared rows.
#[derive(Debug, Clone, Serialize)]
pub struct ColumnDiff {
    pub column: &'static str,
    /// NaN when a value is not a number on one side; `None` when no row had the column on both sides.
    pub max_abs_diff: Option<f64>,
    /// Where it is, counted from 1; `None` when no row differs at all.
    pub row: Option<usize>,
    pub within_tolerance: bool,
}

/// A sampled row whose inputs changed or that could not be scored now, counted from 1.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Changed {
    pub row: usize,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Rows scored from the same tokens on both sides, whose outputs are compared.
    pub compared: usize,
    pub columns: Vec<ColumnDiff>,
    /// Spearman's rank correlation of the compared rows' scores, file against now; `None` under two
    /// rows or when one side is constant.
    pub spearman: Option<f64>,
    #[serde(rename = "changed_rows")]
    pub changed: Vec<Changed>,
    /// Compared rows that had no `input_hash` in the file (an older armorm, or JSONL edited by
    /// hand): for them only `num_tokens` tells changed tokens.
    pub without_input_hash: usize,
}

impl Comparison {
    pub fn passed(&self) -> bool {
        self.compared > 0
            && self.changed.is_empty()
            && self.columns.iter().all(|c| c.within_tolerance)
    }
}

const COLUMNS: [&str; 5] = ["score", "rewards", "gating", "coefficients", "num_tokens"];

/// Why `a` and `b` cannot be compared value by value: the tokens differ, or the lists have
/// other lengths (another model).
fn changed(a: &Outputs, b: &Outputs) -> Option<String> {
    let tokens = match (a.num_tokens, b.num_tokens) {
        (Some(x), Some(y)) if x != y => format!(" ({x} tokens in the file, {y} now)"),
        _ => String::new(),
    };
    match (&a.input_hash, &b.input_hash) {
        (Some(x), Some(y)) if x != y => {
            return Some(format!(
                "tokens changed: input_hash {x} in the file, {y} now{tokens}"
            ))
        }
        (None, _) if !tokens.is_empty() => {
            return Some(format!(
                "tokens changed{tokens}; the file has no input_hash"
            ))
        }
        _ => {}
    }
    for (name, x, y) in [
        ("rewards", &a.rewards, &b.rewards),
        ("gating", &a.gating, &b.gating),
        ("coefficients", &a.coefficients, &b.coefficients),
    ] {
        if x.len() != y.len() {
            return Some(format!(
                "`{name}` has {} values in the file, {} now: another model",
                x.len(),
                y.len()
            ));
        }
    }
    None
}

/// |a - b| for each column of `COLUMNS`; NaN when a value is NaN on either side, `None` when a side
/// lacks the column.
fn differences(a: &Outputs, b: &Outputs) -> [Option<f64>; 5] {
    let list = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| (*p as f64 - *q as f64).abs())
            .fold(0.0, nan_max)
    };
    [
        Some((a.score as f64 - b.score as f64).abs()),
        Some(list(&a.rewards, &b.rewards)),
        Some(list(&a.gating, &b.gating)),
        Some(list(&a.coefficients, &b.coefficients)),
        a.num_tokens
            .zip(b.num_tokens)
            .map(|(x, y)| (x - y).abs() as f64),
    ]
}

/// The larger of two differences, NaN once either is NaN (`f64::max` would drop it).
fn nan_max(m: f64, d: f64) -> f64 {
    if m.is_nan() || d.is_nan() {
        f64::NAN
    } else {
        m.max(d)
    }
}

/// Compares each sampled row's recorded outputs with its outputs now: rows whose tokens changed (or
/// that cannot be scored now) are listed, the others compared column by column against `tolerance`.
pub fn compare(rows: &[Row], tolerance: f64) -> Comparison {
    let mut worst: [Option<(f64, usize)>; 5] = [None; 5];
    let mut changed_rows = Vec::new();
    let (mut file_scores, mut now_scores) = (Vec::new(), Vec::new());
    let mut without_input_hash = 0;
    for row in rows {
        let number = row.index + 1;
        let now = match &row.now {
            Ok(now) => now,
            Err(reason) => {
                changed_rows.push(Changed {
                    row: number,
                    reason: format!("not scored now: {reason}"),
                });
                continue;
            }
        };
        if let Some(reason) = changed(&row.recorded, now) {
            changed_rows.push(Changed {
                row: number,
                reason,
            });
            continue;
        }
        without_input_hash += usize::from(row.recorded.input_hash.is_none());
        for (w, d) in worst.iter_mut().zip(differences(&row.recorded, now)) {
            let Some(d) = d else { continue };
            let larger = match w {
                None => true,
                Some((m, _)) => !m.is_nan() && (d.is_nan() || d > *m),
            };
            if larger {
                *w = Some((d, number));
            }
        }
        file_scores.push(row.recorded.score as f64);
        now_scores.push(now.score as f64);
    }
    let columns = COLUMNS
        .iter()
        .zip(worst)
        .map(|(&column, w)| ColumnDiff {
            column,
            max_abs_diff: w.map(|(d, _)| d),
            row: w.filter(|(d, _)| *d != 0.0).map(|(_, r)| r),
            // NaN compares false: a value that is not a number is never within tolerance.
            within_tolerance: w.is_none_or(|(d, _)| d <= tolerance),
        })
        .collect();
    Comparison {
        compared: file_scores.len(),
        columns,
        spearman: spearman(&file_scores, &now_scores),
        changed: changed_rows,
        without_input_hash,
    }
}

/// Spearman's rank correlation: Pearson's correlation of the ranks, ties given their average rank.
/// `None` under two values, for lengths that differ, or when one side is constant.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    pearson(&ranks(a), &ranks(b))
}

/// Ranks from 1; equal values share the average of the ranks they span.
fn ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
    let mut r = vec![0.0; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        // Ranks start + 1 ..= end, averaged.
        let average = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            r[i] = average;
        }
        start = end;
    }
    r
}

fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        cov += (x - ma) * (y - mb);
        va += (x - ma) * (x - ma);
        vb += (y - mb) * (y - mb);
    }
    (va > 0.0 && vb > 0.0).then(|| cov / (va * vb).sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(score: f32, hash: &str) -> Outputs {
        Outputs {
            score,
            rewards: vec![score, 0.5],
            gating: vec![0.25, 0.75],
            coefficients: vec![1.0, 0.0],
            num_tokens: Some(10),
            input_hash: Some(hash.to_string()),
        }
    }

    fn row(index: usize, recorded: Outputs, now: Outputs) -> Row {
        Row {
            index,
            recorded,
            now: Ok(now),
        }
    }

    #[test]
    fn spearman_by_hand() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(spearman(&x, &x), Some(1.0));
        assert_eq!(spearman(&x, &[4.0, 3.0, 2.0, 1.0]), Some(-1.0));
        // One swap: 1 - 6·Σd² / (n(n²-1)) = 1 - 6·2 / 60 = 0.8.
        let r = spearman(&x, &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((r - 0.8).abs() < 1e-12, "{r}");
        // Ties share their average rank: [1, 2.5, 2.5, 4] against [1, 2, 3, 4]: Pearson = 4.5/√(4.5·5).
        let r = spearman(&[0.1, 0.2, 0.2, 0.3], &x).unwrap();
        assert!((r - 4.5 / (4.5f64 * 5.0).sqrt()).abs() < 1e-12, "{r}");
        assert_eq!(spearman(&[1.0], &[1.0]), None);
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
    }

    #[test]
    fn ranks_average_ties() {
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0]);
    }

    #[test]
    fn an_edited_score_is_the_largest_difference_and_fails_a_tight_tolerance() {
        let rows = [
            row(0, out(0.25, "a"), out(0.25, "a")),
            row(1, out(0.75, "b"), out(0.25, "b")),
            row(2, out(0.5, "c"), out(0.5, "c")),
        ];
        let c = compare(&rows, 1e-4);
        assert_eq!(c.compared, 3);
        let score = &c.columns[0];
        assert_eq!((score.max_abs_diff, score.row), (Some(0.5), Some(2)));
        assert!(!score.within_tolerance);
        // rewards[0] is the score here, so it moved by 0.5 too; gating did not move.
        assert_eq!(c.columns[1].max_abs_diff, Some(0.5));
        assert_eq!(c.columns[2].max_abs_diff, Some(0.0));
        assert_eq!(c.columns[2].row, None);
        assert!(c.columns[2].within_tolerance);
        assert!(c.changed.is_empty());
        assert!(!c.passed());
        assert!(compare(&rows, 0.5).passed());
        // Ranks [1, 3, 2] in the file, [1.5, 1.5, 3] now (rows 1 and 2 tie at 0.25): deviations
        // [-1, 1, 0] and [-0.5, -0.5, 1] have covariance 0.
        assert!(c.spearman.unwrap().abs() < 1e-12, "{:?}", c.spearman);
    }

    #[test]
    fn changed_tokens_are_listed_not_compared() {
        let mut edited = out(0.9, "new");
        edited.num_tokens = Some(12);
        let rows = [
            row(0, out(0.25, "a"), out(0.25, "a")),
            row(4, out(0.5, "old"), edited),
            Row {
                index: 6,
                recorded: out(0.5, "x"),
                now: Err("status too_long: over --max-length".into()),
            },
        ];
        let c = compare(&rows, 1e-4);
        assert_eq!(c.compared, 1);
        assert_eq!(c.columns[0].max_abs_diff, Some(0.0));
        assert_eq!(
            c.changed,
            [
                Changed {
                    row: 5,
                    reason:
                        "tokens changed: input_hash old in the file, new now (10 tokens in the \
                             file, 12 now)"
                            .into()
                },
                Changed {
                    row: 7,
                    reason: "not scored now: status too_long: over --max-length".into()
                },
            ]
        );
        assert!(!c.passed());
    }

    #[test]
    fn without_input_hash_num_tokens_tells_changed_tokens() {
        let mut recorded = out(0.5, "");
        recorded.input_hash = None;
        let mut same = recorded.clone();
        same.input_hash = Some("h".into());
        let mut longer = same.clone();
        longer.num_tokens = Some(11);
        let c = compare(
            &[row(0, recorded.clone(), same), row(1, recorded, longer)],
            1e-4,
        );
        assert_eq!(c.compared, 1);
        assert_eq!(c.without_input_hash, 1);
        assert_eq!(c.changed.len(), 1);
        assert!(c.changed[0].reason.contains("no input_hash"));
    }

    #[test]
    fn nan_is_never_within_tolerance() {
        let mut nan = out(0.5, "a");
        nan.gating[1] = f32::NAN;
        let c = compare(
            &[
                row(0, out(0.5, "a"), nan),
                row(1, out(0.5, "b"), out(0.5, "b")),
            ],
            1.0,
        );
        assert!(c.columns[2].max_abs_diff.unwrap().is_nan());
        assert_eq!(c.columns[2].row, Some(1));
        assert!(!c.columns[2].within_tolerance);
        assert!(!c.passed());
    }

    #[test]
    fn the_sample_is_reproducible_uniform_and_whole_when_small() {
        let draw = |n: usize, total: usize, seed: u64| {
            let mut s = Sample::new(n, seed);
            for i in 0..total {
                s.offer(|| Ok::<_, ()>(i)).unwrap();
            }
            assert_eq!(s.seen(), total);
            let mut items = s.into_items();
            items.sort();
            items
        };
        assert_eq!(draw(10, 4, 7), [0, 1, 2, 3]);
        assert_eq!(draw(3, 50, 7), draw(3, 50, 7));
        assert_ne!(draw(3, 50, 7), draw(3, 50, 8));
        // Each of 10 items is kept with probability 3/10: over 2,000 seeds, 600 times each on average
        // (binomial sd 20.5); every count within 5 sd.
        let mut counts = [0usize; 10];
        for seed in 0..2000 {
            let items = draw(3, 10, seed);
            assert_eq!(items.len(), 3);
            for i in items {
                counts[i] += 1;
            }
        }
        assert!(
            counts.iter().all(|&c| (500..=700).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn columns_read_a_jsonl_typed_frame_and_say_why_a_row_has_no_score() {
        let list = |name: &str| {
            let mut b = ListPrimitiveChunkedBuilder::<Float64Type>::new(
                name.into(),
                2,
                4,
                DataType::Float64,
            );
            b.append_slice(&[0.5, 0.25]);
            b.append_null();
            b.finish().into_series().into_column()
        };
        let frame = DataFrame::new_infer_height(vec![
            Column::new("score".into(), [Some(0.5f64), None]),
            list("rewards"),
            list("gating"),
            list("coefficients"),
            Column::new("num_tokens".into(), [Some(7i64), None]),
            Column::new("input_hash".into(), [Some("ab"), None]),
            Column::new("status".into(), ["ok", "too_long"]),
            Column::new("error".into(), [None, Some("over --max-length")]),
        ])
        .unwrap();
        let c = Columns::of(&frame).unwrap();
        assert!(c.scored(0) && !c.scored(1));
        let o = c.outputs(0).unwrap();
        assert_eq!(o.score, 0.5);
        assert_eq!(o.rewards, [0.5, 0.25]);
        assert_eq!(o.num_tokens, Some(7));
        assert_eq!(o.input_hash.as_deref(), Some("ab"));
        assert_eq!(
            c.outputs(1).unwrap_err(),
            "status too_long: over --max-length"
        );
        let e = Columns::of(&frame.drop("gating").unwrap()).err().unwrap();
        assert!(e.contains("`gating`"), "{e}");
    }
}
