//! A broken checkpoint whose outputs are not finite numbers: never written as `ok`.

use serde_json::Value;

use crate::common::*;

/// bf16 +inf, little-endian.
const BF16_INF: [u8; 2] = [0x80, 0x7f];

/// Overwrites every element of `tensor` row `row` (of a 2-D bf16 tensor) in the shard that holds it.
fn poison_row(model: &std::path::Path, tensor: &str, row: usize) {
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shard = model.join(index["weight_map"][tensor].as_str().unwrap());
    let mut bytes = std::fs::read(&shard).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let info = &header[tensor];
    assert_eq!(info["dtype"], "BF16");
    let cols = info["shape"][1].as_u64().unwrap() as usize;
    let begin = info["data_offsets"][0].as_u64().unwrap() as usize;
    let start = 8 + header_len + begin + row * cols * 2;
    for c in 0..cols {
        bytes[start + 2 * c..start + 2 * c + 2].copy_from_slice(&BF16_INF);
    }
    std::fs::write(&shard, bytes).unwrap();
}

/// A token of the `plain` conversation that no other fixture conversation contains.
fn token_only_in_plain() -> u32 {
    let g = goldens(TINY);
    let others: std::collections::HashSet<u32> = g
        .iter()
        .filter(|(id, _)| id.as_str() != "plain")
        .flat_map(|(_, g)| g.input_ids.iter().copied())
        .collect();
    *g["plain"]
        .input_ids
        .iter()
        .find(|t| !others.contains(t))
        .expect("plain has a token of its own")
}

/// The tiny model whose embedding of one token of `plain` is +inf: that row's outputs are NaN.
fn poisoned_model(dir: &std::path::Path) -> std::path::PathBuf {
    let model = dir.join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(model_dir(TINY)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    poison_row(
        &model,
        "model.embed_tokens.weight",
        token_only_in_plain() as usize,
    );
    model
}

#[test]
fn non_finite_outputs_fail_or_get_their_own_status() {
    let dir = tempfile::tempdir().unwrap();
    let model = poisoned_model(dir.path());
    let input = fixtures().join("conversations.jsonl");
    let target = dir.path().join("out.parquet");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "score",
            input.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "-q",
        ];
        args.extend_from_slice(extra);
        armorm(&args)
    };

    let out = run(&["-o", target.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("conversations.jsonl: line 1") && err.contains("not finite"),
        "{err}"
    );
    assert!(!target.exists(), "no output may look complete");

    let out = run(&["-o", "-", "--on-error", "skip"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let rows: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 22);
    let g = goldens(TINY);
    for r in &rows {
        let id = r["id"].as_str().unwrap();
        if id == "plain" {
            assert_eq!(r["status"], "non_finite", "{r}");
            assert!(r["score"].is_null() && r["rewards"].is_null(), "{r}");
            assert!(r["error"].as_str().unwrap().contains("not finite"), "{r}");
        } else {
            assert_eq!(r["status"], "ok", "{r}");
            assert!((r["score"].as_f64().unwrap() as f32 - g[id].score).abs() <= 1e-4);
        }
    }
}
