//! Scores equal transformers' (goldens) and do not depend on how rows are batched.

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
            let spread = g
                .gating
                .iter()
                .map(|x| (x - uniform).abs())
                .fold(0.0, f32::max);
            assert!(spread > 0.01, "{model}/{id}: gating nearly uniform");
        }
    }
}

#[test]
fn bf16_stays_close_to_f32() {
    let input = fixtures().join("conversations.jsonl");
    let f32s = score_jsonl(&input, TINY, &["--dtype", "f32"]);
    let bf16s = score_jsonl(&input, TINY, &["--dtype", "bf16"]);
    for (a, b) in f32s.iter().zip(&bf16s) {
        assert!(
            (a.score - b.score).abs() < 0.1,
            "{}: {} vs {}",
            a.id,
            a.score,
            b.score
        );
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

/// Out of memory (simulated for batches over 300 padded tokens): batches are split and retried, the
/// budget lowered, logged once; the results are unchanged.
#[test]
fn out_of_memory_splits_batches() {
    let (input, model) = (fixtures().join("conversations.jsonl"), model_dir(TINY));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args([
            "score",
            input.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "-o",
            "-",
            "-q",
        ])
        .env("ARMORM_SIMULATE_OOM_ABOVE_TOKENS", "300")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("out of memory").count(), 1, "{err}");
    let g = goldens(TINY);
    for r in parse_jsonl(&String::from_utf8(out.stdout).unwrap()) {
        assert_close(&r, &golden_as_scored(&r.id, &g[&r.id]), 1e-4);
    }
}
