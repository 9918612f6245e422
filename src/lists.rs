//! Polars expressions over the per-objective list columns of a scored table (`rewards`,
//! `coefficients`): one objective's values, a list built back from per-objective values, and the top K
//! objectives of each row by a key. Everything stays columnar (one expression per objective), which
//! is what makes `rescore` and the pair margins take seconds for millions of rows.

use polars::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("{0}")]
    Table(String),
    #[error("{0}")]
    Polars(#[from] PolarsError),
}

/// Objective `i` of a list column, as f64 (null when the list is).
pub fn objective(list: Expr, i: usize) -> Expr {
    list.list().get(lit(i as i64), true).cast(DataType::Float64)
}

/// Per-objective values as one list<dtype> column.
pub fn to_list(values: Vec<Expr>, dtype: DataType) -> PolarsResult<Expr> {
    let values = values.into_iter().map(|v| v.cast(dtype.clone())).collect();
    // Built as a fixed-size array, then cast: polars' concat_list is ten times slower.
    Ok(concat_arr(values)?.cast(DataType::List(Box::new(dtype))))
}

/// `name` must be a list column of numbers whose non-null rows hold `n` values; the error names the
/// first row (from 1) that does not.
pub fn check_lists(frame: &DataFrame, name: &str, n: usize) -> Result<(), ListError> {
    let column = frame
        .column(name)
        .map_err(|_| ListError::Table(format!("no `{name}` column: run armorm score first")))?;
    let numeric = match column.dtype() {
        DataType::List(inner) => inner.is_primitive_numeric() || inner.is_null(),
        _ => false,
    };
    if !numeric {
        return Err(ListError::Table(format!(
            "`{name}` must be a list of floats, got {}",
            column.dtype()
        )));
    }
    let bad = frame
        .clone()
        .lazy()
        .select([col(name).list().len().alias("len")])
        .with_row_index("row", Some(1))
        .filter(col("len").neq(lit(n as IdxSize)))
        .limit(1)
        .collect()?;
    if bad.height() > 0 {
        let row = bad.column("row")?.get(0)?;
        let len = bad.column("len")?.get(0)?;
        return Err(ListError::Table(format!(
            "row {row}: `{name}` has {len} values where the file names {n} objectives"
        )));
    }
    Ok(())
}

/// Each key's place in its row when the keys are sorted largest first (0 is the largest), equal keys
/// in objective order: the number of keys that come before it.
fn ranks(keys: &[Expr]) -> Vec<Expr> {
    (0..keys.len())
        .map(|i| {
            let before = keys
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, k)| {
                    let ahead = if j < i {
                        k.clone().gt_eq(keys[i].clone())
                    } else {
                        k.clone().gt(keys[i].clone())
                    };
                    ahead.cast(DataType::UInt32)
                });
            before.reduce(|a, b| a + b).unwrap_or_else(|| lit(0u32))
        })
        .collect()
}

/// The top K objectives of each row by a key, as temporary columns of a lazy frame: for each of the K
/// places, the index of the objective there (largest key first, equal keys in objective order), and
/// how many keys are above 0. Lists are built from them with `list`, and `drop` removes them.
pub struct TopK {
    prefix: String,
    k: usize,
    n: usize,
}

impl TopK {
    /// `lf` with the places of the `k` largest of `keys` (one per objective). `prefix` names the
    /// temporary columns and must not start any of `lf`'s own.
    pub fn add(lf: LazyFrame, keys: Vec<Expr>, k: usize, prefix: &str) -> (LazyFrame, TopK) {
        let n = keys.len();
        let top = TopK {
            prefix: prefix.to_string(),
            k: k.min(n),
            n,
        };
        // Keys, then ranks, then places, each stage a column: an expression tree that used the keys
        // directly would recompute them in every comparison.
        let lf = lf.with_columns(
            keys.into_iter()
                .enumerate()
                .map(|(i, key)| key.alias(top.name("key", i)))
                .collect::<Vec<_>>(),
        );
        let key_cols: Vec<Expr> = (0..n).map(|i| col(top.name("key", i))).collect();
        let positive = key_cols
            .iter()
            .map(|key| key.clone().gt(lit(0.0)).cast(DataType::UInt32))
            .reduce(|a, b| a + b)
            .unwrap_or_else(|| lit(0u32));
        let mut stage: Vec<Expr> = ranks(&key_cols)
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.alias(top.name("rank", i)))
            .collect();
        stage.push(positive.alias(top.name("positive", 0)));
        let lf = lf.with_columns(stage);
        let places: Vec<Expr> = (0..top.k)
            .map(|place| {
                (0..n)
                    .map(|i| {
                        col(top.name("rank", i))
                            .eq(lit(place as u32))
                            .cast(DataType::UInt32)
                            * lit(i as u32)
                    })
                    .reduce(|a, b| a + b)
                    .unwrap_or_else(|| lit(0u32))
                    .alias(top.name("place", place))
            })
            .collect();
        (lf.with_columns(places), top)
    }

    fn name(&self, what: &str, i: usize) -> String {
        format!("{}{what}{i}", self.prefix)
    }

    /// One list per row: `pick(index of the objective)` for each of the K places, or only for those
    /// whose key is above 0 with `only_positive`.
    pub fn list(
        &self,
        pick: impl Fn(Expr) -> Expr,
        dtype: DataType,
        only_positive: bool,
    ) -> PolarsResult<Expr> {
        // An array needs one value at least: for k = 0, objective 0, then none kept.
        let places: Vec<Expr> = match self.k {
            // (A per-row 0: a literal alone would be one row.)
            0 => vec![pick(col(self.name("positive", 0)) * lit(0u32))],
            k => (0..k).map(|p| pick(col(self.name("place", p)))).collect(),
        };
        let list = to_list(places, dtype)?;
        Ok(match (self.k, only_positive) {
            (0, _) => list.list().head(lit(0u32)),
            (_, true) => list.list().head(col(self.name("positive", 0))),
            (_, false) => list,
        })
    }

    /// `lf` without the temporary columns.
    pub fn drop(&self, lf: LazyFrame) -> LazyFrame {
        let mut names: Vec<String> = (0..self.n)
            .flat_map(|i| [self.name("key", i), self.name("rank", i)])
            .collect();
        names.extend((0..self.k).map(|p| self.name("place", p)));
        names.push(self.name("positive", 0));
        lf.drop(cols(names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> DataFrame {
        DataFrame::new_infer_height(vec![
            Column::new("a".into(), [0.5f64, -1.0, 0.0]),
            Column::new("b".into(), [-2.0f64, 3.0, 0.0]),
            Column::new("c".into(), [0.5f64, 2.0, 1.0]),
        ])
        .unwrap()
    }

    fn strings(df: &DataFrame, name: &str, row: usize) -> Vec<String> {
        let s = df.column(name).unwrap().list().unwrap().get_as_series(row);
        let s = s.unwrap();
        let ca = s.str().unwrap();
        (0..ca.len())
            .map(|i| ca.get(i).unwrap().to_string())
            .collect()
    }

    fn top(by_magnitude: bool, only_positive: bool, k: usize) -> DataFrame {
        let keys: Vec<Expr> = ["a", "b", "c"]
            .iter()
            .map(|n| if by_magnitude { col(*n).abs() } else { col(*n) })
            .collect();
        let names = Series::new("".into(), ["a", "b", "c"]);
        let (lf, top) = TopK::add(frame().lazy(), keys, k, "__t");
        let list = top
            .list(
                |i| lit(names.clone()).gather(i, false),
                DataType::String,
                only_positive,
            )
            .unwrap();
        let out = top
            .drop(lf.with_column(list.alias("top")))
            .collect()
            .unwrap();
        assert_eq!(out.width(), 4, "{out}");
        out
    }

    #[test]
    fn top_by_magnitude_keeps_objective_order_on_ties() {
        let out = top(true, false, 2);
        // |0.5|, |-2|, |0.5| -> b, then a before c (equal).
        assert_eq!(strings(&out, "top", 0), ["b", "a"]);
        assert_eq!(strings(&out, "top", 1), ["b", "c"]);
        assert_eq!(strings(&out, "top", 2), ["c", "a"]);
        assert_eq!(strings(&top(true, false, 5), "top", 0), ["b", "a", "c"]);
        assert!(strings(&top(true, false, 0), "top", 0).is_empty());
    }

    #[test]
    fn only_positive_keys_are_kept() {
        let out = top(false, true, 3);
        assert_eq!(strings(&out, "top", 0), ["a", "c"]);
        assert_eq!(strings(&out, "top", 1), ["b", "c"]);
        assert_eq!(strings(&out, "top", 2), ["c"]);
    }

    #[test]
    fn wrong_lengths_name_the_row() {
        let mut b = ListPrimitiveChunkedBuilder::<Float32Type>::new(
            "rewards".into(),
            2,
            3,
            DataType::Float32,
        );
        b.append_slice(&[1.0, 2.0]);
        b.append_slice(&[1.0]);
        let df = DataFrame::new_infer_height(vec![b.finish().into_series().into_column()]).unwrap();
        let e = check_lists(&df, "rewards", 2).unwrap_err().to_string();
        assert!(e.contains("row 2: `rewards` has 1 values"), "{e}");
        assert!(check_lists(&df, "coefficients", 2).is_err());
    }
}
