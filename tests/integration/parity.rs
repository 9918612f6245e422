//! Scores equal transformers' (goldens) and do not depend on how rows are batched.

use std::path::Path;

use crate::common::*;

fn check_goldens(model: &str) {
    let goldens = goldens(model);
    let rows = score_jsonl(
        &fixtures().join("conversations.jsonl"),
        model,
        &["--dtype", "f32"],
    );
    assert_eq!(rows.len(), goldens.len());
    for row in &rows {
        let want = golden_as_scored(&row.id, &goldens[&row.id]);
        assert_close(row, &want, 1e-4);
    }
}

#[test]
fn tiny_model_matches_transformers() {
    check_goldens(TINY);
}

/// Other objective count, gating depth, width and temperature, llama3 rope scaling, 3 query heads per kv
/// head, and a pad token that has an embedding row.
#[test]
fn alt_model_matches_transformers() {
    check_goldens(ALT);
}

/// The same rows alone (a budget of 1 token puts every row in its own batch) and in mixed-length batches.
#[test]
fn batching_does_not_change_results() {
    let input = fixtures().join("conversations.jsonl");
    for model in [TINY, ALT] {
        let alone = score_jsonl(
            &input,
            model,
            &["--dtype", "f32", "--max-batch-tokens", "1"],
        );
        // Lanes (batches scored at once on CPU) split the budget among themselves.
        let runs: [&[&str]; 6] = [
            &["--max-batch-tokens", "40"],
            &["--max-batch-tokens", "300"],
            &["--max-batch-tokens", "2500"],
            &["--max-batch-tokens", "1000000"],
            &[
                "--max-batch-tokens",
                "300",
                "--threads",
                "3",
                "--lanes",
                "3",
            ],
            &["--lanes", "1"],
        ];
        for run in runs {
            let batched = score_jsonl(&input, model, &[&["--dtype", "f32"], run].concat());
            assert_eq!(alone.len(), batched.len());
            for (a, b) in alone.iter().zip(&batched) {
                assert_eq!(a.id, b.id, "output order must be input order");
                assert_close(b, a, 1e-5);
            }
        }
    }
}

/// The gate is far from uniform, so a gating position off by one would fail the goldens above.
#[test]
fn fixture_gating_is_observable() {
    for model in [TINY, ALT] {
        for (id, g) in goldens(model) {
            let n = g.gating.len() as f32;
            let scale: f32 = g.gating.iter().sum();
            let uniform = scale / n;
            let spread = max_abs_diff(&g.gating, &vec![uniform; g.gating.len()]);
            assert!(spread > 0.01, "{model}/{id}: gating nearly uniform");
        }
    }
}

/// bf16 against f32 on every output. The tolerances are twice the largest difference measured on
/// the fixtures (CPU, this commit): tiny-armorm 0.0145 / 0.0103 / 0.0122 / 0.0114 and tiny-armorm-alt
/// 0.0083 / 0.0214 / 0.0064 / 0.0061 for score / rewards / gating / coefficients.
#[test]
fn bf16_stays_close_to_f32() {
    for (model, tol) in BF16_TOLERANCES {
        let f32s = score_jsonl(
            &fixtures().join("conversations.jsonl"),
            model,
            &["--dtype", "f32"],
        );
        let (bf16s, _) = bf16_rows(model, &[]);
        assert_within(model, "bf16", &f32s, &bf16s, tol);
    }
}

/// `ARMORM_BF16_RESIDUAL=1` (the residual stream in bf16, as transformers keeps it) against f32 (and
/// so the transformers goldens). Tolerances twice the largest difference measured on the fixtures
/// (CPU, this commit): tiny-armorm 0.0128 / 0.0125 / 0.0091 / 0.0101 and tiny-armorm-alt 0.0146 /
/// 0.0343 / 0.0087 / 0.0138: on tiny-armorm-alt up to twice the f32 stream's differences, the rounding
/// the f32 stream exists to avoid. It is not the default path under another name: scores differ.
#[test]
fn a_bf16_residual_stays_close_to_f32() {
    let tolerances = [
        (TINY, [0.026, 0.025, 0.019, 0.021]),
        (ALT, [0.030, 0.069, 0.018, 0.028]),
    ];
    for (model, tol) in tolerances {
        let f32s = score_jsonl(
            &fixtures().join("conversations.jsonl"),
            model,
            &["--dtype", "f32"],
        );
        let (rows, log) = bf16_rows(model, &[("ARMORM_BF16_RESIDUAL", "1")]);
        assert!(log.contains("attention, bf16 residual, batches"), "{log}");
        assert_within(model, "bf16-residual", &f32s, &rows, tol);
        let (plain, _) = bf16_rows(model, &[]);
        let moved = rows
            .iter()
            .zip(&plain)
            .map(|(a, b)| max_abs_diff(&[a.score], &[b.score]))
            .fold(0.0, f32::max);
        assert!(
            moved > 1e-4,
            "{model}: the bf16 residual changed no score ({moved})"
        );
    }
}

/// Score, rewards, gating, coefficients.
const BF16_TOLERANCES: [(&str, [f32; 4]); 2] = [
    (TINY, [0.029, 0.021, 0.025, 0.023]),
    (ALT, [0.017, 0.043, 0.013, 0.013]),
];

fn bf16_rows(model: &str, env: &[(&str, &str)]) -> (Vec<Scored>, String) {
    let input = fixtures().join("conversations.jsonl");
    score_jsonl_with(&input, model, &["--dtype", "bf16"], env)
}

fn assert_within(model: &str, what: &str, want: &[Scored], got: &[Scored], tol: [f32; 4]) {
    assert_eq!(want.len(), got.len());
    for (a, b) in want.iter().zip(got) {
        assert_eq!(a.id, b.id);
        let diffs = [
            max_abs_diff(&[a.score], &[b.score]),
            max_abs_diff(&a.rewards, &b.rewards),
            max_abs_diff(&a.gating, &b.gating),
            max_abs_diff(&a.coefficients, &b.coefficients),
        ];
        for ((name, d), t) in ["score", "rewards", "gating", "coefficients"]
            .iter()
            .zip(diffs)
            .zip(tol)
        {
            assert!(
                d <= t,
                "{model}/{}: {what} {name} differ by {d} > {t}",
                a.id
            );
        }
    }
}

/// Windows of 5 rows: several row groups, batches cut differently, the same rows in the same order.
#[test]
fn small_windows_change_nothing() {
    let input = fixtures().join("conversations.jsonl");
    let whole = score_jsonl(&input, TINY, &[]);
    let windowed = score_jsonl(
        &input,
        TINY,
        &["--window-rows", "5", "--threads", "1", "--quiet"],
    );
    assert_eq!(whole.len(), windowed.len());
    for (a, b) in whole.iter().zip(&windowed) {
        assert_eq!(a.id, b.id);
        assert_close(b, a, 1e-5);
    }
}

/// `--device cpu,cpu`: two model copies score windows concurrently; the output keeps input order.
#[test]
fn several_devices_keep_input_order() {
    let input = fixtures().join("conversations.jsonl");
    let one = score_jsonl(&input, TINY, &["--window-rows", "3", "-q"]);
    let two = score_jsonl(
        &input,
        TINY,
        &["--window-rows", "3", "--device", "cpu,cpu", "-q"],
    );
    assert_eq!(one.len(), two.len());
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(a.id, b.id);
        assert_close(b, a, 1e-5);
    }
}

/// armorm on `input` with simulated out-of-memory above `limit` padded tokens.
fn score_with_oom_above(input: &Path, limit: &str, extra: &[&str]) -> std::process::Output {
    let model = model_dir(TINY);
    let mut args = vec![
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        "-",
        "-q",
    ];
    args.extend_from_slice(extra);
    std::process::Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args(args)
        .env("ARMORM_SIMULATE_OOM_ABOVE_TOKENS", limit)
        .output()
        .unwrap()
}

/// Out of memory (simulated for batches over 300 padded tokens, on the 20 conversations that fit that
/// alone): batches are split and retried, the budget lowered, logged once; every row is still scored,
/// equal to the unsplit run.
#[test]
fn out_of_memory_splits_batches() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("short.jsonl");
    let g = goldens(TINY);
    let text = std::fs::read_to_string(fixtures().join("conversations.jsonl")).unwrap();
    let short: Vec<&str> = text
        .lines()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            g[v["id"].as_str().unwrap()].num_tokens <= 300
        })
        .collect();
    assert_eq!(short.len(), 20);
    std::fs::write(&input, short.join("\n") + "\n").unwrap();

    let out = score_with_oom_above(&input, "300", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("out of memory").count(), 1, "{err}");
    let split = parse_jsonl(&String::from_utf8(out.stdout).unwrap());
    let whole = score_jsonl(&input, TINY, &[]);
    assert_eq!(split.len(), 20);
    assert_eq!(whole.len(), 20);
    for (a, b) in split.iter().zip(&whole) {
        assert_eq!(a.id, b.id);
        assert_close(a, b, 1e-5);
    }
}

/// A row too large for the device on its own: an error naming the row and its length, or under
/// `--on-error skip` status `oom` for that row while every other row is scored.
#[test]
fn a_row_out_of_memory_alone_is_named_or_skipped() {
    let input = fixtures().join("conversations.jsonl");
    let out = score_with_oom_above(&input, "1000", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("line 19") && err.contains("1227 tokens") && err.contains("out of memory"),
        "{err}"
    );

    let out = score_with_oom_above(&input, "1000", &["--on-error", "skip"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 22);
    let g = goldens(TINY);
    for r in &rows {
        let id = r["id"].as_str().unwrap();
        if id == "long-response" {
            assert_eq!(r["status"], "oom", "{r}");
            assert!(r["score"].is_null(), "{r}");
            assert!(r["error"].as_str().unwrap().contains("1227 tokens"), "{r}");
        } else {
            assert_eq!(r["status"], "ok", "{r}");
            let got = (r["score"].as_f64().unwrap() as f32 - g[id].score).abs();
            assert!(got <= 1e-4, "{id}: {got}");
        }
    }
}
