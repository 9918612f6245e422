//! `--attention`: flash attention's flat layout (cumulative lengths, [prefix; new] key sequences)
//! gives transformers' results, checked through the hidden `varlen-reference` kernel (the same
//! contract computed with matmuls, on the CPU); flash itself is refused where it cannot run. And the
//! fused elementwise ops (`ARMORM_FUSED_OPS`, on by default on CUDA) give the same results.

use crate::common::*;
use crate::sharing::{assert_same, best_of_n, repeated_goldens, saved_tokens, score};

const FLAT: &[&str] = &["--attention", "varlen-reference"];

#[test]
fn flat_rows_match_transformers_and_blocked_attention() {
    let input = fixtures().join("conversations.jsonl");
    for model in [TINY, ALT] {
        let goldens = goldens(model);
        let blocked = score_jsonl(&input, model, &["--dtype", "f32", "--attention", "blocked"]);
        for budget in ["300", "1000000"] {
            let extra = [&["--dtype", "f32", "--max-batch-tokens", budget][..], FLAT].concat();
            let flat = score_jsonl(&input, model, &extra);
            assert_eq!(flat.len(), goldens.len());
            for row in &flat {
                assert_close(row, &golden_as_scored(&row.id, &goldens[&row.id]), 1e-4);
            }
            assert_same(&flat, &blocked);
        }
    }
}

/// Flat rows are batched by their own tokens, nothing being padded: under one budget they take the
/// fewest passes that fit it (here one: the fixtures' 2,865 tokens within 4,096), where padded rows are
/// cut wherever padding would cost more than a pass (6 passes); the results are the same.
#[test]
fn flat_rows_fill_the_budget_in_fewer_passes() {
    let input = fixtures().join("conversations.jsonl");
    let profile = [("ARMORM_PROFILE", "1")];
    // One lane: the whole budget goes to one pass at a time.
    let common = [
        "--max-batch-tokens",
        "4096",
        "--prefix-sharing",
        "off",
        "--threads",
        "1",
    ];
    let (blocked, blocked_log) = score(
        &input,
        TINY,
        &[&common[..], &["--attention", "blocked"]].concat(),
        &profile,
    );
    let (flat, flat_log) = score(&input, TINY, &[&common[..], FLAT].concat(), &profile);
    let tokens: usize = flat.iter().map(|r| r.num_tokens).sum();
    assert_eq!(passes(&flat_log), tokens.div_ceil(4096), "{flat_log}");
    assert!(
        passes(&blocked_log) >= 3 * passes(&flat_log),
        "{blocked_log}"
    );
    assert_same(&flat, &blocked);
}

/// Forward passes, as ARMORM_PROFILE's `head` line counts them.
fn passes(log: &str) -> usize {
    let line = log
        .lines()
        .find(|l| l.starts_with("armorm: profile: head "))
        .unwrap_or_else(|| panic!("no head line in {log}"));
    let calls = line.split_whitespace().rev().nth(1).unwrap();
    calls.parse().unwrap()
}

/// Rows continuing cached prompts take [prefix; new] key sequences: the same results as rows run
/// whole, with most of the prompts' tokens saved; nothing is padded.
#[test]
fn flat_rows_share_prefixes_with_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    for input in [repeated_goldens(dir.path()), best_of_n(dir.path())] {
        for model in [TINY, ALT] {
            let (whole, _) = score(&input, model, &["--prefix-sharing", "off"], &[]);
            let (shared, log) = score(&input, model, FLAT, &[]);
            assert!(saved_tokens(&log).unwrap() > 1000, "{log}");
            assert!(log.contains("padding overhead 0.0%"), "{log}");
            assert_same(&shared, &whole);
        }
    }
}

/// Each flash kernel is refused on the CPU with the reason and a way out: this build lacks its
/// feature, or (with it) the CPU is no CUDA device.
#[test]
fn flash_kernels_are_refused_with_the_reason_where_they_cannot_run() {
    let input = fixtures().join("conversations.jsonl");
    for (attention, feature, instead) in [
        ("flash", "flash-attn", "--attention blocked"),
        ("flash3", "flash-attn-v3", "--attention auto"),
    ] {
        let out = score_to(&input, TINY, "-", &["--attention", attention], &[]);
        assert_eq!(out.status.code(), Some(1), "{attention}");
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("--attention {attention}:")),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("built without the {feature} feature"))
                || stderr.contains("CUDA"),
            "{stderr}"
        );
        assert!(stderr.contains(instead), "{stderr}");
    }
}

/// The output and the summary line say which attention ran and the token budget; the defaults on the
/// CPU are blocked attention and 16384 tokens.
#[test]
fn the_output_records_the_attention() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixtures().join("conversations.jsonl");
    let flat_300 = [FLAT, &["--max-batch-tokens", "300"]].concat();
    for (extra, want, budget) in [
        (&[][..], "blocked", 16384),
        (&flat_300[..], "varlen-reference", 300),
    ] {
        let out = dir.path().join(format!("{want}.parquet"));
        let run = score_to(&input, TINY, out.to_str().unwrap(), extra, &[]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert_eq!(parquet_metadata(&out)["armorm.attention"], want);
        let stderr = String::from_utf8_lossy(&run.stderr);
        let setup = format!("{want} attention, batches of up to {budget} tokens\n");
        assert!(stderr.ends_with(&setup), "{stderr}");
    }
}

/// The fused ops' arithmetic (their CPU version) equals transformers in f32, alone and with the flat
/// layout and prefix sharing, and the summary line says they ran.
#[test]
fn fused_ops_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let fused = [("ARMORM_FUSED_OPS", "1")];
    let input = repeated_goldens(dir.path());
    for model in [TINY, ALT] {
        let goldens = goldens(model);
        let (whole, _) = score(&input, model, &["--prefix-sharing", "off"], &[]);
        for extra in [&[][..], FLAT] {
            let (rows, log) = score(&input, model, extra, &fused);
            assert!(log.contains("attention, fused ops, batches"), "{log}");
            assert_same(&rows, &whole);
            for row in rows.iter().filter(|r| !r.id.ends_with("~other")) {
                assert_close(row, &golden_as_scored(&row.id, &goldens[&row.id]), 1e-4);
            }
        }
    }
}

/// `ARMORM_FUSED_OPS=vector` selects the fused ops' 16-byte-access CUDA kernels (checked against
/// candle on the device before use; the GPU check measures them). On the CPU both kernels are one loop,
/// so this checks the switch: the summary line says which ran, the scores are the fused ops', and `0`
/// turns the fused ops off.
#[test]
fn the_fused_ops_switch_names_what_ran() {
    let dir = tempfile::tempdir().unwrap();
    let input = repeated_goldens(dir.path());
    let (fused, _) = score(&input, TINY, &[], &[("ARMORM_FUSED_OPS", "1")]);
    let (vector, log) = score(&input, TINY, &[], &[("ARMORM_FUSED_OPS", "vector")]);
    assert!(
        log.contains("attention, fused ops (vector), batches"),
        "{log}"
    );
    assert_same(&vector, &fused);
    let (_, log) = score(&input, TINY, &[], &[("ARMORM_FUSED_OPS", "0")]);
    assert!(!log.contains("fused ops"), "{log}");
}

/// `ARMORM_FUSED_OPS=qkv` runs each layer's q/k/v as one GEMM with RoPE in place under flat attention
/// (and only there), `gateup` runs gate/up as one GEMM, `accumulate` adds o_proj's and down_proj's
/// outputs into the f32 stream in their GEMMs: the summary line says which ran, and the scores equal transformers' and the separate
/// projections', alone, with the vector kernels, and with prefix sharing. A misspelt kernel is refused.
#[test]
fn one_qkv_gemm_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let input = repeated_goldens(dir.path());
    for model in [TINY, ALT] {
        let goldens = goldens(model);
        let (apart, _) = score(&input, model, FLAT, &[("ARMORM_FUSED_OPS", "1")]);
        for (value, named) in [
            ("qkv", "(qkv)"),
            ("vector,qkv", "(vector, qkv)"),
            ("vector,qkv,accumulate", "(vector, qkv, accumulate)"),
            ("qkv,gateup,accumulate", "(qkv, gateup, accumulate)"),
        ] {
            for sharing in ["auto", "off"] {
                let args = [FLAT, &["--prefix-sharing", sharing]].concat();
                let (rows, log) = score(&input, model, &args, &[("ARMORM_FUSED_OPS", value)]);
                let want = format!("varlen-reference attention, fused ops {named}, batches");
                assert!(log.contains(&want), "{log}");
                if sharing == "auto" {
                    assert!(saved_tokens(&log).unwrap() > 0, "{log}");
                }
                assert_same(&rows, &apart);
                for row in rows.iter().filter(|r| !r.id.ends_with("~other")) {
                    assert_close(row, &golden_as_scored(&row.id, &goldens[&row.id]), 1e-4);
                }
            }
        }
    }
    // Blocked attention runs the projections apart: the summary line does not claim the one GEMM.
    let (_, log) = score(&input, TINY, &[], &[("ARMORM_FUSED_OPS", "qkv")]);
    assert!(log.contains("attention, fused ops, batches"), "{log}");
    // The joined gate/up and the accumulating output projections run under any attention.
    let (rows, log) = score(
        &input,
        TINY,
        &[],
        &[("ARMORM_FUSED_OPS", "gateup,accumulate")],
    );
    assert!(
        log.contains("attention, fused ops (gateup, accumulate), batches"),
        "{log}"
    );
    let goldens = goldens(TINY);
    for row in rows.iter().filter(|r| !r.id.ends_with("~other")) {
        assert_close(row, &golden_as_scored(&row.id, &goldens[&row.id]), 1e-4);
    }

    let out = dir.path().join("refused.parquet");
    let env = [("ARMORM_FUSED_OPS", "vector,qvk")];
    let run = score_to(&input, TINY, out.to_str().unwrap(), &[], &env);
    assert_eq!(run.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("ARMORM_FUSED_OPS") && stderr.contains("\"qvk\""),
        "{stderr}"
    );
    assert!(!out.exists());
}
