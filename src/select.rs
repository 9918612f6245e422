//! Keeping rows of a scored table: SQL conditions, the best fraction by score, the best of N per group.

use std::collections::HashMap;

use polars::prelude::*;
use polars::sql::SQLContext;

/// Rows for which the SQL condition `condition` holds. Each objective's reward is visible as a column named
/// after it (`"helpsteer-correctness" > 0.7`) unless the table already has a column of that name.
pub fn filter_sql(
    frame: DataFrame,
    attributes: &[String],
    rewards: &[Vec<f32>],
    condition: &str,
) -> PolarsResult<DataFrame> {
    let mut added = Vec::new();
    let mut df = frame;
    for (i, name) in attributes.iter().enumerate() {
        if df.column(name).is_ok() {
            continue;
        }
        let values: Vec<Option<f32>> = rewards.iter().map(|r| r.get(i).copied()).collect();
        df.with_column(Column::new(name.as_str().into(), values))?;
        added.push(name.clone());
    }
    let mut ctx = SQLContext::new();
    ctx.register("data", df.lazy());
    let out = ctx
        .execute(&format!("SELECT * FROM data WHERE {condition}"))?
        .collect()?;
    Ok(out.drop_many(added))
}

/// The best `fraction` of rows by score (at least one when there are rows), in input order.
pub fn top_fraction_indices(scores: &[f32], fraction: f64) -> Vec<usize> {
    if scores.is_empty() {
        return Vec::new();
    }
    let keep = ((scores.len() as f64 * fraction).ceil() as usize).clamp(1, scores.len());
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Best first; NaN scores last; ties keep input order.
    order.sort_by(|&a, &b| {
        let (x, y) = (scores[a], scores[b]);
        y.partial_cmp(&x)
            .unwrap_or_else(|| x.is_nan().cmp(&y.is_nan()))
            .then(a.cmp(&b))
    });
    let mut kept = order[..keep].to_vec();
    kept.sort_unstable();
    kept
}

/// One group's rows of highest and of lowest score, and how many rows it has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Group {
    pub best: usize,
    pub worst: usize,
    pub size: usize,
}

/// For each group (in order of first appearance): the row of highest and of lowest score. Equal scores
/// keep the earlier row.
pub fn best_and_worst(keys: &[String], scores: &[f32]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        match index.get(key.as_str()) {
            None => {
                index.insert(key, groups.len());
                groups.push(Group {
                    best: i,
                    worst: i,
                    size: 1,
                });
            }
            Some(&g) => {
                let group = &mut groups[g];
                if scores[i] > scores[group.best] {
                    group.best = i;
                }
                if scores[i] < scores[group.worst] {
                    group.worst = i;
                }
                group.size += 1;
            }
        }
    }
    groups
}

/// Rows `idx` of `frame`, in that order.
pub fn take(frame: &DataFrame, idx: &[usize]) -> PolarsResult<DataFrame> {
    let idx = IdxCa::from_vec("idx".into(), idx.iter().map(|&i| i as IdxSize).collect());
    frame.take(&idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_fraction_keeps_best_in_input_order() {
        assert_eq!(top_fraction_indices(&[0.1, 0.9, 0.5, 0.7], 0.5), vec![1, 3]);
        assert_eq!(top_fraction_indices(&[0.1, 0.9, 0.5], 0.01), vec![1]);
        assert_eq!(top_fraction_indices(&[f32::NAN, 0.2], 0.5), vec![1]);
        assert!(top_fraction_indices(&[], 0.5).is_empty());
    }

    #[test]
    fn best_and_worst_per_group() {
        let keys: Vec<String> = ["a", "b", "a", "a", "b"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let g: Vec<_> = best_and_worst(&keys, &[0.1, 0.5, 0.9, 0.1, 0.2])
            .iter()
            .map(|g| (g.best, g.worst, g.size))
            .collect();
        assert_eq!(g, vec![(2, 0, 3), (1, 4, 2)]);
    }

    #[test]
    fn sql_sees_attribute_columns() {
        let df = DataFrame::new_infer_height(vec![
            Column::new("id".into(), vec!["x", "y"]),
            Column::new("score".into(), vec![0.5f32, -0.5]),
        ])
        .unwrap();
        let attrs = vec!["helpsteer-correctness".to_string()];
        let out = filter_sql(
            df.clone(),
            &attrs,
            &[vec![0.9], vec![0.1]],
            r#""helpsteer-correctness" > 0.7"#,
        )
        .unwrap();
        assert_eq!(out.height(), 1);
        assert_eq!(
            out.get_column_names().len(),
            2,
            "expanded columns are dropped"
        );
        let out = filter_sql(df, &attrs, &[vec![0.9], vec![0.1]], "score < 0").unwrap();
        assert_eq!(out.column("id").unwrap().str().unwrap().get(0), Some("y"));
    }
}
