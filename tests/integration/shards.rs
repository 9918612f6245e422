//! `--shard K/N`: N processes cover the dataset exactly once, and their union equals one run.

use std::fs::File;

use polars::prelude::*;

use crate::common::*;

fn ids_and_scores(path: &std::path::Path) -> Vec<(String, f32)> {
    let df = ParquetReader::new(File::open(path).unwrap())
        .finish()
        .unwrap();
    let ids = df.column("id").unwrap().str().unwrap().clone();
    let scores = df.column("score").unwrap().f32().unwrap().clone();
    (0..df.height())
        .map(|i| (ids.get(i).unwrap().to_string(), scores.get(i).unwrap()))
        .collect()
}

#[test]
fn three_shards_union_equals_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let (input, model) = (fixtures().join("conversations.jsonl"), model_dir(TINY));
    let whole = score_jsonl(&input, TINY, &["-q"]);
    let out_dir = dir.path().join("scores");
    let mut union = Vec::new();
    for k in 0..3 {
        let shard = format!("{k}/3");
        let out = armorm(&[
            "score",
            input.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--shard",
            &shard,
            "-o",
            out_dir.to_str().unwrap(),
            "-q",
            "--window-rows",
            "4",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let part = ids_and_scores(&out_dir.join(format!("part-{k}-of-3.parquet")));
        // Shard k holds rows k, k + 3, ... in input order.
        let want: Vec<&str> = whole
            .iter()
            .skip(k)
            .step_by(3)
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(part.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), want);
        union.extend(part);
    }
    assert_eq!(union.len(), whole.len());
    for row in &whole {
        let hits: Vec<_> = union.iter().filter(|(id, _)| *id == row.id).collect();
        assert_eq!(hits.len(), 1, "{} must be in exactly one shard", row.id);
        assert!((hits[0].1 - row.score).abs() < 1e-5);
    }
}

#[test]
fn shard_from_slurm_array_environment() {
    let dir = tempfile::tempdir().unwrap();
    let (input, model) = (fixtures().join("conversations.jsonl"), model_dir(TINY));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args([
            "score",
            input.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--shard",
            "auto",
            "-q",
        ])
        .args(["-o", dir.path().to_str().unwrap()])
        .env("SLURM_ARRAY_TASK_ID", "2")
        .env("SLURM_ARRAY_TASK_MIN", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "4")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let part = ids_and_scores(&dir.path().join("part-1-of-4.parquet"));
    assert_eq!(part.len(), 6, "rows 1, 5, 9, 13, 17, 21 of 22");

    let out = armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--shard",
        "auto",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SLURM_ARRAY_TASK_ID"));
}
