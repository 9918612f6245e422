//! explain, eval, filter and best-of-n on the fixture model, checked against the transformers goldens.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::common::*;

use armorm::ATTRIBUTES as ATTRS;

fn json_lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ok(out: &std::process::Output) -> &[u8] {
    assert!(
        out.status.success(),
        "armorm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    &out.stdout
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect()
}

/// Top-K by |coefficient| from the goldens, or None when two candidates are too close to order.
fn golden_top(coefs: &[f32], k: usize) -> Option<Vec<String>> {
    let mut idx: Vec<usize> = (0..coefs.len()).collect();
    idx.sort_by(|&a, &b| coefs[b].abs().total_cmp(&coefs[a].abs()));
    let mags: Vec<f32> = idx.iter().map(|&i| coefs[i].abs()).collect();
    if (0..k).any(|j| mags[j] - mags[j + 1] < 1e-4) {
        return None;
    }
    Some(idx[..k].iter().map(|&i| ATTRS[i].to_string()).collect())
}

fn scored_parquet(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("scored.parquet");
    let (input, model) = (fixtures().join("conversations.jsonl"), model_dir(TINY));
    ok(&armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        path.to_str().unwrap(),
        "-q",
    ]));
    path
}

#[test]
fn explain_top_k_equals_goldens_top_k() {
    let g = goldens(TINY);
    let (input, model) = (fixtures().join("conversations.jsonl"), model_dir(TINY));
    let out = armorm(&[
        "explain",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--top-k",
        "3",
        "--format",
        "jsonl",
        "-q",
    ]);
    let rows = json_lines(ok(&out));
    assert_eq!(rows.len(), g.len());
    let mut checked = 0;
    for r in rows {
        let want = &g[r["id"].as_str().unwrap()];
        if let Some(top) = golden_top(&want.coefficients, 3) {
            assert_eq!(strings(&r["top_attributes"]), top);
            checked += 1;
        }
        let coefs = floats(&r["top_coefficients"]);
        for (name, c) in strings(&r["top_attributes"]).iter().zip(coefs) {
            let i = ATTRS.iter().position(|a| a == name).unwrap();
            assert!((want.coefficients[i] - c).abs() < 1e-4);
        }
        assert!((r["score"].as_f64().unwrap() as f32 - want.score).abs() < 1e-4);
    }
    assert!(checked >= 18, "too few rows with a clear top 3: {checked}");
}

#[test]
fn explain_of_a_scored_file_loads_no_model_and_reads_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let scored = scored_parquet(dir.path());
    let out = armorm(&[
        "explain",
        scored.to_str().unwrap(),
        "--model",
        "/no/model/here",
        "--format",
        "jsonl",
        "--top-k",
        "2",
    ]);
    let from_file = json_lines(ok(&out));
    assert_eq!(from_file.len(), 22);

    // armorm score ... -o - | armorm explain --top-k 2
    let (input, model) = (fixtures().join("conversations.jsonl"), model_dir(TINY));
    let mut score = Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args([
            "score",
            input.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "-o",
            "-",
            "-q",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let explain = Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args([
            "explain",
            "--top-k",
            "2",
            "--format",
            "jsonl",
            "--model",
            "/no/model/here",
        ])
        .stdin(score.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(score.wait().unwrap().success());
    let piped = json_lines(ok(&explain));
    assert_eq!(piped.len(), 22);
    for (a, b) in from_file.iter().zip(&piped) {
        assert_eq!(a["top_attributes"], b["top_attributes"]);
    }
}

#[test]
fn explain_table_is_aligned_and_helpsteer_scale_applies() {
    let dir = tempfile::tempdir().unwrap();
    let scored = scored_parquet(dir.path());
    let out = armorm(&["explain", scored.to_str().unwrap(), "--top-k", "3"]);
    let text = String::from_utf8(ok(&out).to_vec()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 23, "{text}");
    assert!(lines[0].starts_with("row") && lines[0].contains("#1 attribute: coefficient (reward)"));
    let col = lines[0].find("score").unwrap();
    assert!(
        lines[1..]
            .iter()
            .all(|l| l[col..].starts_with(|c: char| c == '-' || c.is_ascii_digit())),
        "{text}"
    );
    let g = goldens(TINY);
    let plain = lines
        .iter()
        .find(|l| l.split_whitespace().nth(1) == Some("plain"))
        .unwrap();
    let top = golden_top(&g["plain"].coefficients, 1).unwrap();
    assert!(plain.contains(&format!("{}: ", top[0])), "{plain}");

    // HelpSteer rewards on the 0-4 scale: reward × 5 − 0.5.
    let out = armorm(&[
        "explain",
        scored.to_str().unwrap(),
        "--top-k",
        "19",
        "--format",
        "jsonl",
        "--helpsteer-scale",
    ]);
    for r in json_lines(ok(&out)) {
        let want = &g[r["id"].as_str().unwrap()];
        for (name, shown) in strings(&r["top_attributes"])
            .iter()
            .zip(floats(&r["top_rewards"]))
        {
            let i = ATTRS.iter().position(|a| a == name).unwrap();
            let expect = if i < 5 {
                want.rewards[i] * 5.0 - 0.5
            } else {
                want.rewards[i]
            };
            assert!((shown - expect).abs() < 1e-3, "{name}: {shown} vs {expect}");
        }
    }
}

#[test]
fn score_top_k_adds_columns() {
    let (input, model) = (fixtures().join("conversations.jsonl"), model_dir(TINY));
    let out = armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        "-",
        "--top-k",
        "2",
        "-q",
    ]);
    let g = goldens(TINY);
    for r in json_lines(ok(&out)) {
        if let Some(top) = golden_top(&g[r["id"].as_str().unwrap()].coefficients, 2) {
            assert_eq!(strings(&r["top_attributes"]), top);
        }
        assert_eq!(floats(&r["top_coefficients"]).len(), 2);
    }
}

fn pair_goldens() -> HashMap<String, (f32, f32, String)> {
    let text = std::fs::read_to_string(fixtures().join("goldens").join("tiny-armorm-pairs.jsonl"))
        .unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let c = v["score_chosen"].as_f64().unwrap() as f32;
            let r = v["score_rejected"].as_f64().unwrap() as f32;
            (
                v["id"].as_str().unwrap().to_string(),
                (c, r, v["subset"].as_str().unwrap().to_string()),
            )
        })
        .collect()
}

#[test]
fn eval_accuracy_subsets_and_tie() {
    let dir = tempfile::tempdir().unwrap();
    let (input, model) = (fixtures().join("pairs.jsonl"), model_dir(TINY));
    let (rows_out, summary) = (
        dir.path().join("pairs.jsonl"),
        dir.path().join("summary.json"),
    );
    let out = armorm(&[
        "eval",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        rows_out.to_str().unwrap(),
        "--summary",
        summary.to_str().unwrap(),
        "-q",
    ]);
    let table = String::from_utf8(ok(&out).to_vec()).unwrap();
    let g = pair_goldens();
    let rows = json_lines(&std::fs::read(&rows_out).unwrap());
    assert_eq!(rows.len(), g.len());
    let mut correct = 0;
    for r in &rows {
        let (c, rej, _) = &g[r["id"].as_str().unwrap()];
        let (sc, sr) = (
            r["score_chosen"].as_f64().unwrap() as f32,
            r["score_rejected"].as_f64().unwrap() as f32,
        );
        assert!((sc - c).abs() < 1e-4 && (sr - rej).abs() < 1e-4, "{r}");
        assert_eq!(r["correct"].as_bool().unwrap(), c > rej, "{r}");
        correct += (c > rej) as usize;
        assert_eq!(floats(&r["rewards_chosen"]).len(), 19);
    }
    let tie = rows.iter().find(|r| r["id"] == "p3").unwrap();
    assert_eq!(
        tie["margin"].as_f64().unwrap(),
        0.0,
        "identical answers tie exactly"
    );
    assert!(
        !tie["correct"].as_bool().unwrap(),
        "a tie counts as wrong, as in RewardBench"
    );

    let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!(s["overall"]["pairs"], 8);
    assert_eq!(s["overall"]["correct"], correct);
    assert_eq!(s["overall"]["ties"], 1);
    let sub_correct = |name: &str| g.iter().filter(|(_, v)| v.2 == name && v.0 > v.1).count();
    assert_eq!(
        s["subsets"]["alpacaeval-easy"]["correct"],
        sub_correct("alpacaeval-easy")
    );
    assert_eq!(s["subsets"]["custom"]["correct"], sub_correct("custom"));
    // Chat weights its subsets by RewardBench's example counts (alpacaeval-easy 100, mt-bench-easy 28).
    let acc = |name: &str| s["subsets"][name]["accuracy"].as_f64().unwrap();
    let chat = 100.0 * (acc("alpacaeval-easy") * 100.0 + acc("mt-bench-easy") * 28.0) / 128.0;
    assert!((s["rewardbench"]["sections"]["Chat"].as_f64().unwrap() - chat).abs() < 1e-9);
    // The leaderboard's average over the sections present (Chat and Reasoning here), weight 2 each.
    let reasoning = s["rewardbench"]["sections"]["Reasoning"].as_f64().unwrap();
    let score = s["rewardbench"]["score"].as_f64().unwrap();
    assert!((score - (chat + reasoning) / 2.0).abs() < 1e-9);
    assert!(
        table.contains("accuracy") && table.contains("alpacaeval-easy") && table.contains("Chat"),
        "{table}"
    );
}

/// RewardBench's arithmetic on a file whose per-subset accuracies do not depend on the model: a pair
/// and its swap give 0.5 (the two margins are opposite), identical answers tie and give 0.
#[test]
fn eval_rewardbench_sections_follow_upstream_constants() {
    let dir = tempfile::tempdir().unwrap();
    let (input, model) = (
        fixtures().join("rewardbench-arithmetic.jsonl"),
        model_dir(TINY),
    );
    let summary = dir.path().join("summary.json");
    let out = armorm(&[
        "eval",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        dir.path().join("rows.jsonl").to_str().unwrap(),
        "--summary",
        summary.to_str().unwrap(),
        "-q",
    ]);
    ok(&out);
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    let acc = |name: &str| s["subsets"][name]["accuracy"].as_f64().unwrap();
    for (name, want) in [
        ("refusals-dangerous", 0.5),
        ("xstest-should-refuse", 0.5),
        ("xstest-should-respond", 0.0),
        ("anthropic_helpful", 0.5),
        ("anthropic_harmless", 0.0),
        ("shp", 0.0),
    ] {
        assert_eq!(acc(name), want, "{name}");
    }
    // rewardbench/constants.py: refusals-dangerous 100, xstest-should-refuse 154, -respond 250.
    let safety = 100.0 * (0.5 * 100.0 + 0.5 * 154.0 + 0.0 * 250.0) / 504.0;
    let rb = &s["rewardbench"];
    assert!(
        (rb["sections"]["Safety"].as_f64().unwrap() - safety).abs() < 1e-9,
        "{rb}"
    );
    // The leaderboard's prior sets: anthropic_helpful, anthropic_hhh, shp, summarize (those present);
    // anthropic_harmless is not among them.
    let prior = 100.0 * (0.5 + 0.0) / 2.0;
    assert!(
        (rb["prior_sets"].as_f64().unwrap() - prior).abs() < 1e-9,
        "{rb}"
    );
    let score = (2.0 * safety + prior) / 3.0;
    assert!((rb["score"].as_f64().unwrap() - score).abs() < 1e-9, "{rb}");
}

#[test]
fn filter_by_sql_attribute_and_top_fraction() {
    let dir = tempfile::tempdir().unwrap();
    let scored = scored_parquet(dir.path());
    let g = goldens(TINY);
    let ids = |out: &std::process::Output| -> Vec<String> {
        json_lines(ok(out))
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    let order: Vec<String> = json_lines(ok(&armorm(&[
        "filter",
        scored.to_str().unwrap(),
        "--top-fraction",
        "1",
    ])))
    .iter()
    .map(|r| r["id"].as_str().unwrap().to_string())
    .collect();
    assert_eq!(order.len(), 22);

    let got = ids(&armorm(&[
        "filter",
        scored.to_str().unwrap(),
        "--where",
        "score > 0",
    ]));
    let want: Vec<String> = order
        .iter()
        .filter(|id| g[*id].score > 0.0)
        .cloned()
        .collect();
    assert_eq!(got, want);

    let got = ids(&armorm(&[
        "filter",
        scored.to_str().unwrap(),
        "--where",
        r#""helpsteer-correctness" > 0 AND num_tokens < 100"#,
    ]));
    let want: Vec<String> = order
        .iter()
        .filter(|id| g[*id].rewards[1] > 0.0 && g[*id].num_tokens < 100)
        .cloned()
        .collect();
    assert!(!want.is_empty());
    assert_eq!(got, want);

    // ceil(0.3 × 22) = 7 best scores, kept in input order.
    let got = ids(&armorm(&[
        "filter",
        scored.to_str().unwrap(),
        "--top-fraction",
        "0.3",
    ]));
    let mut by_score = order.clone();
    by_score.sort_by(|a, b| g[b].score.total_cmp(&g[a].score));
    let best: Vec<&String> = by_score[..7].iter().collect();
    let want: Vec<String> = order
        .iter()
        .filter(|id| best.contains(id))
        .cloned()
        .collect();
    assert_eq!(got, want);

    let out = armorm(&[
        "filter",
        scored.to_str().unwrap(),
        "--where",
        "no_such_column > 1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_column"));
}

#[test]
fn best_of_n_keeps_the_best_and_builds_dpo_pairs() {
    // Each pair's two answers become two candidate rows for one prompt.
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("candidates.jsonl");
    let mut f = std::fs::File::create(&flat).unwrap();
    let text = std::fs::read_to_string(fixtures().join("pairs.jsonl")).unwrap();
    for l in text.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        if !v["chosen"].is_string() {
            continue;
        }
        for side in ["chosen", "rejected"] {
            let row = serde_json::json!({"id": format!("{}-{side}", v["id"].as_str().unwrap()), "prompt": v["prompt"], "response": v[side]});
            writeln!(f, "{row}").unwrap();
        }
    }
    drop(f);
    let scored = dir.path().join("scored.parquet");
    let model = model_dir(TINY);
    ok(&armorm(&[
        "score",
        flat.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        scored.to_str().unwrap(),
        "-q",
    ]));
    let g = pair_goldens();

    let best = json_lines(ok(&armorm(&[
        "best-of-n",
        scored.to_str().unwrap(),
        "--group",
        "prompt",
    ])));
    assert_eq!(best.len(), 7);
    for r in &best {
        let id = r["id"].as_str().unwrap();
        let (pair, side) = id.split_once('-').unwrap();
        let (c, rej, _) = g[pair];
        // Ties keep the earlier row (the chosen one).
        let want = if c >= rej { "chosen" } else { "rejected" };
        assert_eq!(side, want, "{id}");
    }

    let pairs = json_lines(ok(&armorm(&[
        "best-of-n",
        scored.to_str().unwrap(),
        "--group",
        "prompt",
        "--pairs",
    ])));
    assert_eq!(pairs.len(), 7);
    for p in &pairs {
        let margin = p["margin"].as_f64().unwrap() as f32;
        assert!(margin >= 0.0);
        let sc = p["score_chosen"].as_f64().unwrap() as f32;
        assert!(
            g.values().any(|(c, r, _)| (c.max(*r) - sc).abs() < 1e-4),
            "{p}"
        );
        assert!(p["chosen"].is_string() && p["rejected"].is_string());
    }
}

#[test]
fn commands_chain_through_pipes() {
    // armorm score - -o - | armorm filter --top-fraction 0.5 | armorm best-of-n --group prompt
    let model = model_dir(TINY);
    let data = std::fs::read(fixtures().join("conversations.jsonl")).unwrap();
    let scored = armorm_stdin(
        &["score", "-", "--model", model.to_str().unwrap(), "-q"],
        Some(&data),
    );
    let filtered = armorm_stdin(&["filter", "--top-fraction", "0.5"], Some(ok(&scored)));
    let best = armorm_stdin(&["best-of-n", "--group", "prompt"], Some(ok(&filtered)));
    let rows = json_lines(ok(&best));
    // The 11 best rows by golden score; the message rows have no prompt and form one group.
    let g = goldens(TINY);
    let mut ids: Vec<&String> = g.keys().collect();
    ids.sort_by(|a, b| g[*b].score.total_cmp(&g[*a].score));
    let message_rows = ["messages-simple", "system", "multi-turn", "multi-turn-long"];
    let top = &ids[..11];
    let plain = top
        .iter()
        .filter(|id| !message_rows.contains(&id.as_str()))
        .count();
    let with_messages = top.iter().any(|id| message_rows.contains(&id.as_str())) as usize;
    assert_eq!(rows.len(), plain + with_messages);
    let eval_rows = armorm_stdin(
        &[
            "eval",
            "-",
            "--model",
            model.to_str().unwrap(),
            "-o",
            "-",
            "-q",
        ],
        Some(&std::fs::read(fixtures().join("pairs.jsonl")).unwrap()),
    );
    assert_eq!(
        json_lines(ok(&eval_rows)).len(),
        8,
        "per-pair rows alone on stdout"
    );
    assert!(String::from_utf8_lossy(&eval_rows.stderr).contains("accuracy"));
}
