//! `armorm best-of-n --pairs` with reasons (issue 14): per-objective margins, the objectives that won,
//! and the filters, on a scored-looking file whose margins are known by hand, then on the fixture
//! model's own scores.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use crate::common::*;

use armorm::ATTRIBUTES as ATTRS;

fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

fn at(name: &str) -> usize {
    ATTRS.iter().position(|a| *a == name).unwrap()
}

/// Rewards 0 except the named ones.
fn rewards(named: &[(&str, f64)]) -> Vec<f64> {
    let mut r = vec![0.0; 19];
    for (n, v) in named {
        r[at(n)] = *v;
    }
    r
}

/// Four prompts; each row's score is Σ rewards · coefficients of its prompt's coefficients.
/// - p1 (coefficients 0.5): A = correctness 1 + is_safe 1 (score 1, "aaaa"), B = verbosity 1
///   (0.5, "bb"): margin 0.5, terms correctness 0.5, is_safe 0.5, verbosity −0.5; lengths 4:2.
/// - p2 (0.1): C = helpfulness 1 (0.1, 3 chars), D = nothing (0, 30 chars): margin 0.1, length 10:1,
///   the chosen side not safe.
/// - p3 (1): E = is_safe 1 + code-style 2 (3), F = is_safe 1 + code-style 1 (2), H = is_safe 1 +
///   code-style 1.5 (2.5): E against F, margin 1 all from code-style; lengths 5:6.
/// - p4: one row, no pair.
fn known(path: &Path) {
    let rows = [
        (
            "p1",
            0.5,
            "aaaa",
            rewards(&[("helpsteer-correctness", 1.0), ("beavertails-is_safe", 1.0)]),
        ),
        ("p1", 0.5, "bb", rewards(&[("helpsteer-verbosity", 1.0)])),
        ("p2", 0.1, "ccc", rewards(&[("helpsteer-helpfulness", 1.0)])),
        ("p2", 0.1, &"d".repeat(30), rewards(&[])),
        (
            "p3",
            1.0,
            "eeeee",
            rewards(&[("beavertails-is_safe", 1.0), ("code-style", 2.0)]),
        ),
        (
            "p3",
            1.0,
            "ffffff",
            rewards(&[("beavertails-is_safe", 1.0), ("code-style", 1.0)]),
        ),
        (
            "p3",
            1.0,
            "hhh",
            rewards(&[("beavertails-is_safe", 1.0), ("code-style", 1.5)]),
        ),
        ("p4", 1.0, "only", rewards(&[("code-style", 1.0)])),
    ];
    let mut f = File::create(path).unwrap();
    for (prompt, c, response, r) in rows {
        let score: f64 = r.iter().map(|x| x * c).sum();
        let row = json!({"prompt": prompt, "response": response, "score": score, "rewards": r,
                         "gating": vec![0.0; 19], "coefficients": vec![c; 19], "num_tokens": 9});
        writeln!(f, "{row}").unwrap();
    }
}

/// `armorm best-of-n INPUT --pairs ARGS... -o -`: the pairs by prompt, and stderr.
fn pairs(input: &Path, args: &[&str]) -> (HashMap<String, Value>, Vec<String>, String) {
    let mut all = vec!["best-of-n", input.to_str().unwrap(), "--pairs"];
    all.extend_from_slice(args);
    all.extend(["-o", "-"]);
    let out = armorm(&all);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{args:?}: {err}");
    let rows = json_lines(&out.stdout);
    let order = rows
        .iter()
        .map(|r| r["prompt"].as_str().unwrap().to_string())
        .collect();
    let by_prompt = rows
        .into_iter()
        .map(|r| (r["prompt"].as_str().unwrap().to_string(), r))
        .collect();
    (by_prompt, order, err)
}

#[test]
fn margins_by_objective_match_the_hand_computed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("known.jsonl");
    known(&input);
    let (rows, order, err) = pairs(&input, &[]);
    assert_eq!(order, ["p1", "p2", "p3"]);
    assert!(err.is_empty(), "no summary without filters: {err}");

    let p1 = &rows["p1"];
    assert_eq!(
        (p1["chosen"].as_str(), p1["rejected"].as_str()),
        (Some("aaaa"), Some("bb"))
    );
    let mut want = vec![0.0; 19];
    want[at("helpsteer-correctness")] = 0.5;
    want[at("beavertails-is_safe")] = 0.5;
    want[at("helpsteer-verbosity")] = -0.5;
    assert_eq!(floats(&p1["margin_by_objective"]), want);
    // Only positive shares, largest first, equal ones in model order.
    assert_eq!(
        names(&p1["top_margin_attributes"]),
        ["helpsteer-correctness", "beavertails-is_safe"]
    );

    let p3 = &rows["p3"];
    assert_eq!(
        (p3["chosen"].as_str(), p3["rejected"].as_str()),
        (Some("eeeee"), Some("ffffff"))
    );
    let mut want = vec![0.0; 19];
    want[at("code-style")] = 1.0;
    assert_eq!(floats(&p3["margin_by_objective"]), want);
    assert_eq!(names(&p3["top_margin_attributes"]), ["code-style"]);
    assert!((p3["margin"].as_f64().unwrap() - 1.0).abs() < 1e-6);

    let (rows, _, _) = pairs(&input, &["--top-k", "1"]);
    assert_eq!(
        names(&rows["p1"]["top_margin_attributes"]),
        ["helpsteer-correctness"]
    );
}

#[test]
fn filters_leave_out_the_known_pairs_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("known.jsonl");
    known(&input);
    let kept = |args: &[&str]| {
        let (_, order, err) = pairs(&input, args);
        (order, err)
    };
    // Margins 0.5, 0.1, 1.
    let (order, err) = kept(&["--min-margin", "0.4"]);
    assert_eq!(order, ["p1", "p3"]);
    assert!(
        err.contains("2 of 3 pairs kept") && err.contains("1 by --min-margin"),
        "{err}"
    );
    assert_eq!(kept(&["--min-margin", "0.5"]).0, ["p1", "p3"], "at least X");
    assert_eq!(kept(&["--min-margin", "-1"]).0, ["p1", "p2", "p3"]);
    // Length ratios 2, 10, 1.2.
    assert_eq!(kept(&["--max-length-ratio", "3"]).0, ["p1", "p3"]);
    assert_eq!(kept(&["--max-length-ratio", "1.5"]).0, ["p3"]);
    assert_eq!(kept(&["--max-length-ratio", "2"]).0, ["p1", "p3"]);
    // The chosen side is safe in p1 and p3; code-style wins p3 alone.
    assert_eq!(
        kept(&["--require", r#""chosen_beavertails-is_safe" > 0.5"#]).0,
        ["p1", "p3"]
    );
    assert_eq!(
        kept(&["--require", r#""margin_code-style" > 0.5"#]).0,
        ["p3"]
    );
    assert_eq!(
        kept(&[
            "--require",
            r#""rejected_helpsteer-verbosity" = 1 AND score_chosen > 0.9"#
        ])
        .0,
        ["p1"]
    );
    // All three together.
    let (order, err) = kept(&[
        "--min-margin",
        "0.05",
        "--max-length-ratio",
        "3",
        "--require",
        r#""margin_code-style" <= 0"#,
    ]);
    assert_eq!(order, ["p1"]);
    assert!(
        err.contains("1 of 3 pairs kept; left out: 0 by --min-margin, 1 by --max-length-ratio, 1 by --require"),
        "{err}"
    );
}

#[test]
fn mining_flags_are_refused_without_pairs_or_when_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("known.jsonl");
    known(&input);
    let i = input.to_str().unwrap();
    let out = armorm(&["best-of-n", i, "--min-margin", "0.1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--pairs"));
    let out = armorm(&["best-of-n", i, "--pairs", "--max-length-ratio", "0.5"]);
    assert_eq!(out.status.code(), Some(2));

    let target = dir.path().join("pairs.parquet");
    let t = target.to_str().unwrap();
    let out = armorm(&[
        "best-of-n",
        i,
        "--pairs",
        "--require",
        r#""chosen_nope" > 1"#,
        "-o",
        t,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("known.jsonl") && err.contains("chosen_nope"),
        "{err}"
    );
    assert!(!target.exists());

    // Responses that are not text have no character length.
    let out = armorm(&[
        "best-of-n",
        i,
        "--pairs",
        "--response-column",
        "num_tokens",
        "--max-length-ratio",
        "2",
        "-o",
        t,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--max-length-ratio") && err.contains("`chosen`"),
        "{err}"
    );
    assert!(!target.exists());
}

#[test]
fn on_the_fixture_model_the_shares_add_up_to_the_margin() {
    // Each pair's two answers become two candidates of one prompt, scored by the tiny model: the
    // gating sees the prompt alone, so both sides have the same coefficients.
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("candidates.jsonl");
    let mut f = File::create(&flat).unwrap();
    let text = std::fs::read_to_string(fixtures().join("pairs.jsonl")).unwrap();
    for l in text.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        if !v["chosen"].is_string() {
            continue;
        }
        for side in ["chosen", "rejected"] {
            let row = json!({"prompt": v["prompt"], "response": v[side]});
            writeln!(f, "{row}").unwrap();
        }
    }
    drop(f);
    let scored = dir.path().join("scored.parquet");
    let model = model_dir(TINY);
    let out = armorm(&[
        "score",
        flat.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        scored.to_str().unwrap(),
        "-q",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (rows, order, _) = pairs(&scored, &["--top-k", "19"]);
    assert_eq!(order.len(), 7);
    for (prompt, p) in &rows {
        let terms = floats(&p["margin_by_objective"]);
        let margin = p["margin"].as_f64().unwrap();
        let sum: f64 = terms.iter().sum();
        assert!(
            (sum - margin).abs() < 1e-5,
            "{prompt}: Σ {sum} vs margin {margin}"
        );
        // Every positive share, largest first.
        let mut positive: Vec<(usize, f64)> = terms
            .iter()
            .copied()
            .enumerate()
            .filter(|(_, t)| *t > 0.0)
            .collect();
        positive.sort_by(|a, b| b.1.total_cmp(&a.1));
        let want: Vec<&str> = positive.iter().map(|(i, _)| ATTRS[*i]).collect();
        assert_eq!(names(&p["top_margin_attributes"]), want, "{prompt}");
    }
}
