//! What armorm takes from a model's files: config.json in the transformers-5 layout (against goldens),
//! refused configs, --max-length against max_position_embeddings, a tokenizer that cannot produce the
//! gating tokens, and models found in a Hugging Face cache folder.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::common::*;

/// config.json written by transformers 5.17's `save_pretrained`: RoPE under `rope_parameters` (llama3
/// scaling), no top-level `rope_theta`, and a `head_dim` twice hidden_size / num_attention_heads.
const TF5: &str = "tiny-armorm-tf5";

const ONE_ROW: &str = "{\"prompt\": \"What is 12 * 13?\", \"response\": \"12 * 13 = 156.\"}\n";

#[test]
fn transformers5_layout_matches_transformers() {
    let goldens = goldens(TF5);
    let rows = score_jsonl(
        &fixtures().join("conversations.jsonl"),
        TF5,
        &["--dtype", "f32"],
    );
    assert_eq!(rows.len(), goldens.len());
    for row in &rows {
        assert_close(row, &golden_as_scored(&row.id, &goldens[&row.id]), 1e-4);
    }
}

/// The gate is far from uniform, so a gating position off by one would fail the goldens above.
#[test]
fn transformers5_fixture_gating_is_observable() {
    for (id, g) in goldens(TF5) {
        let uniform = g.gating.iter().sum::<f32>() / g.gating.len() as f32;
        let spread = g.gating.iter().map(|x| (x - uniform).abs());
        assert!(
            spread.clone().all(f32::is_finite) && spread.fold(0.0, f32::max) > 0.01,
            "{id}: gating nearly uniform"
        );
    }
}

/// A copy of a fixture model in a temporary folder, for damaging.
fn model_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join(name);
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    (dir, model)
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// One row scored under `--on-error skip`, so that a row error would exit 3, not 1.
fn score_one(model: &Path, extra: &[&str]) -> Output {
    let model = model.to_str().unwrap();
    let mut args = vec!["score", "-", "--model", model, "-o", "-", "--device", "cpu"];
    args.extend(["--on-error", "skip", "-q"]);
    args.extend_from_slice(extra);
    armorm_stdin(&args, Some(ONE_ROW.as_bytes()))
}

fn refused_config(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let (_dir, model) = model_copy(TF5);
    edit_json(&model.join("config.json"), edit);
    let out = score_one(&model, &[]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("config.json"), "{err}");
    err
}

#[test]
fn config_giving_both_rope_layouts_with_different_values_is_refused() {
    let err = refused_config(|c| c["rope_theta"] = 10_000.0.into());
    assert!(
        err.contains("field `rope_parameters.rope_theta`") && err.contains("10000"),
        "{err}"
    );
    let err = refused_config(|c| {
        c["rope_scaling"] = serde_json::json!({"rope_type": "default"});
    });
    assert!(err.contains("field `rope_parameters`"), "{err}");
}

#[test]
fn config_fields_that_change_the_math_are_refused() {
    let err = refused_config(|c| c["rope_parameters"]["rope_type"] = "yarn".into());
    assert!(
        err.contains("field `rope_parameters.rope_type`") && err.contains("\"yarn\""),
        "{err}"
    );
    for (field, value) in [
        ("hidden_act", serde_json::json!("gelu")),
        ("attention_bias", true.into()),
        ("mlp_bias", true.into()),
        ("model_type", "mistral".into()),
        ("sliding_window", 4096.into()),
        ("partial_rotary_factor", 0.5.into()),
        ("attn_logit_softcapping", 50.0.into()),
    ] {
        let err = refused_config(|c| c[field] = value);
        assert!(err.contains(&format!("field `{field}`")), "{field}: {err}");
    }
}

#[test]
fn max_length_above_max_position_embeddings_needs_a_flag() {
    let model = model_dir(TINY);
    let out = score_one(&model, &["--max-length", "9000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    assert!(
        err.contains("--max-length 9000")
            && err.contains("max_position_embeddings (8192")
            && err.contains("--allow-beyond-max-positions"),
        "{err}"
    );

    let out = score_one(
        &model,
        &["--max-length", "9000", "--allow-beyond-max-positions"],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        parse_jsonl(&String::from_utf8(out.stdout).unwrap()).len(),
        1
    );
    // At or below the limit, no flag is needed.
    let out = score_one(&model, &["--max-length", "8192"]);
    assert_eq!(out.status.code(), Some(0));
}

/// Without `<|eot_id|>` as a token, the gating text is cut into ordinary pieces: a model error at load,
/// naming tokenizer.json, whatever the rows (here even under `--on-error skip`).
#[test]
fn tokenizer_that_cannot_produce_the_gating_tokens_is_a_model_error() {
    let (_dir, model) = model_copy(TINY);
    edit_json(&model.join("tokenizer.json"), |t| {
        let added = t["added_tokens"].as_array_mut().unwrap();
        let before = added.len();
        added.retain(|a| a["content"] != "<|eot_id|>");
        assert_eq!(added.len(), before - 1);
    });
    let out = score_one(&model, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "{err}");
    assert!(
        err.contains("tokenizer.json") && err.contains("<|eot_id|> is not a token"),
        "{err}"
    );
}

const REPO: &str = "armorm-fixtures/tiny-armorm";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A Hugging Face hub cache holding `fixtures/tiny-armorm` as huggingface_hub lays it out: the files in
/// blobs/, snapshots/COMMIT/ made of relative symlinks into them, refs/main and refs/v1 holding COMMIT.
fn hub_cache(root: &Path) {
    let repo = root.join("models--armorm-fixtures--tiny-armorm");
    let (blobs, snapshot) = (repo.join("blobs"), repo.join("snapshots").join(COMMIT));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    for (i, entry) in std::fs::read_dir(model_dir(TINY)).unwrap().enumerate() {
        let entry = entry.unwrap();
        let blob = format!("{i:064x}");
        std::fs::copy(entry.path(), blobs.join(&blob)).unwrap();
        std::os::unix::fs::symlink(
            Path::new("../../blobs").join(&blob),
            snapshot.join(entry.file_name()),
        )
        .unwrap();
    }
    std::fs::write(repo.join("refs").join("main"), COMMIT).unwrap();
    std::fs::write(repo.join("refs").join("v1"), COMMIT).unwrap();
}

/// `armorm score` of the conversations with `--model REPO`, offline, with only `env` pointing at caches.
fn score_from_cache(env: &[(&str, &Path)], extra: &[&str]) -> Output {
    let input = fixtures().join("conversations.jsonl");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_armorm"));
    cmd.args(["score", input.to_str().unwrap(), "--model", REPO])
        .args(["-o", "-", "--device", "cpu", "--dtype", "f32", "-q"])
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::null());
    for var in [
        "HF_HOME",
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "XDG_CACHE_HOME",
    ] {
        cmd.env_remove(var);
    }
    for (var, path) in env {
        cmd.env(var, path);
    }
    cmd.output().unwrap()
}

fn assert_scored_as_tiny(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let g = goldens(TINY);
    let rows = parse_jsonl(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(rows.len(), g.len());
    for r in &rows {
        assert_close(r, &golden_as_scored(&r.id, &g[&r.id]), 1e-4);
    }
}

#[test]
fn hub_cache_is_found_through_hf_hub_cache_and_hf_home() {
    let dir = tempfile::tempdir().unwrap();
    let (cache, home, empty) = (
        dir.path().join("cache"),
        dir.path().join("home"),
        dir.path().join("empty"),
    );
    hub_cache(&cache);
    hub_cache(&home.join("hub"));
    std::fs::create_dir(&empty).unwrap();
    // HF_HUB_CACHE wins over HF_HOME, as in huggingface_hub.
    assert_scored_as_tiny(&score_from_cache(
        &[("HF_HUB_CACHE", &cache), ("HF_HOME", &empty)],
        &[],
    ));
    assert_scored_as_tiny(&score_from_cache(&[("HF_HOME", &home)], &[]));
    assert_scored_as_tiny(&score_from_cache(
        &[("HF_HUB_CACHE", &cache)],
        &["--revision", "v1"],
    ));
}

#[test]
fn revision_commit_is_found_in_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    hub_cache(dir.path());
    assert_scored_as_tiny(&score_from_cache(
        &[("HF_HUB_CACHE", dir.path())],
        &["--revision", COMMIT],
    ));
}

#[test]
fn revision_missing_from_the_cache_offline_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    hub_cache(dir.path());
    let missing = "fedcba9876543210fedcba9876543210fedcba98";
    let out = score_from_cache(&[("HF_HUB_CACHE", dir.path())], &["--revision", missing]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty());
    assert!(
        err.contains(REPO)
            && err.contains(&format!("revision {missing} is not cached"))
            && err.contains("HF_HUB_OFFLINE")
            && err.contains(dir.path().to_str().unwrap()),
        "{err}"
    );
}
