//! Prefix sharing (`--prefix-sharing auto`, the default) gives the results of running every row whole
//! (`off`): on the golden fixtures, on generated best-of-N sets, under small budgets and out of memory.

use std::path::Path;

use serde_json::{json, Value};

use crate::common::*;

const WORDS: [&str; 24] = [
    "reward", "model", "prompt", "the", "answer", "is", "a", "batch", "of", "tokens", "gating",
    "cache", "keys", "values", "prefix", "shared", "with", "every", "response", "to", "it", "and",
    "so", "on",
];

/// `n` words, a different sequence for each seed.
fn words(seed: usize, n: usize) -> String {
    (0..n)
        .map(|i| WORDS[(seed * 31 + i * 7 + i * i * 3) % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Rows in a fixed shuffled order (a stride coprime with the length).
fn shuffled<T: Clone>(rows: &[T]) -> Vec<T> {
    let n = rows.len();
    let stride = (1..n)
        .rev()
        .find(|s| gcd(*s, n) == 1 && *s * 3 > n)
        .unwrap_or(1);
    (0..n).map(|i| rows[(i * stride) % n].clone()).collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// `armorm score INPUT -o -` in f32 on the CPU with `extra` flags and environment; stdout's rows and
/// stderr.
pub fn score(
    input: &Path,
    model: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Vec<Scored>, String) {
    score_jsonl_with(input, model, &[&["--dtype", "f32"], extra].concat(), env)
}

/// The tokens the summary line says sharing saved; `None` when it says nothing of sharing.
pub fn saved_tokens(stderr: &str) -> Option<usize> {
    let rest = stderr.split("prefix sharing saved ").nth(1)?;
    rest.split(' ').next()?.parse().ok()
}

/// Row by row in the same order, every output column within 1e-5.
pub fn assert_same(shared: &[Scored], whole: &[Scored]) {
    assert_eq!(shared.len(), whole.len());
    for (a, b) in shared.iter().zip(whole) {
        assert_eq!(a.id, b.id, "row order changed");
        assert_close(a, b, 1e-5);
    }
}

/// The golden conversations, each three times (twice with its own response, once with another row's),
/// shuffled: the responses to one prompt sit apart in the window.
pub fn repeated_goldens(dir: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(fixtures().join("conversations.jsonl")).unwrap();
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        out.push(row.clone());
        out.push(row.clone());
        let mut other = row.clone();
        other["id"] = json!(format!("{}~other", row["id"].as_str().unwrap()));
        let donor = &rows[(i + 5) % rows.len()];
        match (other.get_mut("messages"), donor.get("response")) {
            (Some(Value::Array(turns)), Some(response)) => {
                turns.last_mut().unwrap()["content"] = response.clone();
            }
            (None, Some(response)) => other["response"] = response.clone(),
            _ => other["response"] = json!("A different answer."),
        }
        out.push(other);
    }
    let path = dir.join("repeated.jsonl");
    write_jsonl(&path, &shuffled(&out));
    path
}

#[test]
fn golden_rows_shared_equal_transformers_and_the_unshared_path() {
    let dir = tempfile::tempdir().unwrap();
    let input = repeated_goldens(dir.path());
    for model in [TINY, ALT] {
        let goldens = goldens(model);
        let (shared, log) = score(&input, model, &[], &[]);
        let (whole, log_off) = score(&input, model, &["--prefix-sharing", "off"], &[]);
        assert!(saved_tokens(&log).unwrap() > 1000, "{log}");
        assert_eq!(saved_tokens(&log_off), None, "{log_off}");
        assert_same(&shared, &whole);
        for row in shared.iter().filter(|r| !r.id.ends_with("~other")) {
            assert_close(row, &golden_as_scored(&row.id, &goldens[&row.id]), 1e-4);
        }
    }
}

/// Prompts with a system message and earlier turns, 2 to 7 responses each of various lengths, shuffled.
pub fn best_of_n(dir: &Path) -> std::path::PathBuf {
    let mut rows = Vec::new();
    for p in 0..6 {
        let mut turns = vec![
            json!({"role": "system", "content": format!("You are assistant {p}. {}", words(p, 5 + 3 * p))}),
        ];
        for t in 0..p % 3 + 1 {
            turns.push(json!({"role": "user", "content": words(p * 10 + t, 20 + 15 * p)}));
            turns.push(json!({"role": "assistant", "content": words(p * 20 + t, 10 + 4 * t)}));
        }
        turns.push(json!({"role": "user", "content": words(p * 30, 40 + 10 * p)}));
        for r in 0..2 + p {
            let mut conversation = turns.clone();
            conversation
                .push(json!({"role": "assistant", "content": words(p * 40 + r, 3 + 13 * r)}));
            rows.push(json!({"id": format!("p{p}-r{r}"), "messages": conversation}));
        }
    }
    let path = dir.join("best_of_n.jsonl");
    write_jsonl(&path, &shuffled(&rows));
    path
}

#[test]
fn best_of_n_sets_with_multi_turn_prompts_equal_the_unshared_path() {
    let dir = tempfile::tempdir().unwrap();
    let input = best_of_n(dir.path());
    for model in [TINY, ALT] {
        let (whole, _) = score(&input, model, &["--prefix-sharing", "off"], &[]);
        let (shared, log) = score(&input, model, &[], &[]);
        let saved = saved_tokens(&log).unwrap();
        let total: usize = whole.iter().map(|r| r.num_tokens).sum();
        // Six prompts of ~100-400 tokens shared by 2-7 rows: most of the tokens.
        assert!(
            saved > total / 3 && saved < total,
            "saved {saved} of {total}"
        );
        assert_same(&shared, &whole);
    }
}

/// A budget smaller than one group: the group's responses run in several batches against one cache;
/// and a budget that puts every prompt in a unit of its own.
#[test]
fn groups_larger_than_the_budget_are_split_without_changing_results() {
    let dir = tempfile::tempdir().unwrap();
    let input = best_of_n(dir.path());
    let (whole, _) = score(&input, TINY, &["--prefix-sharing", "off"], &[]);
    for budget in ["1", "300", "700"] {
        let args = ["--max-batch-tokens", budget, "--lanes", "1"];
        let (shared, log) = score(&input, TINY, &args, &[]);
        assert!(saved_tokens(&log).unwrap() > 0, "{log}");
        assert_same(&shared, &whole);
    }
}

/// Out of memory on the shared passes (the prefixes' pass, or a continuation batch with its cache): the
/// rows not scored yet fall back to running whole, with the same results. The simulated device holds
/// the longest row alone, no more.
#[test]
fn out_of_memory_while_sharing_falls_back_to_whole_rows() {
    let dir = tempfile::tempdir().unwrap();
    let input = best_of_n(dir.path());
    let (whole, _) = score(&input, TINY, &["--prefix-sharing", "off"], &[]);
    let longest = whole
        .iter()
        .map(|r| r.num_tokens)
        .max()
        .unwrap()
        .to_string();
    let env = [("ARMORM_SIMULATE_OOM_ABOVE_TOKENS", longest.as_str())];
    for budget in ["16384", "1200"] {
        let args = ["--max-batch-tokens", budget, "--lanes", "1"];
        let (shared, log) = score(&input, TINY, &args, &env);
        assert!(log.contains("out of memory"), "{log}");
        assert_same(&shared, &whole);
    }
}

/// Every prompt once: nothing is shared, and the work is what it is without sharing.
#[test]
fn prompts_seen_once_run_as_without_sharing() {
    let input = fixtures().join("conversations.jsonl");
    let (shared, log) = score(&input, TINY, &[], &[]);
    let (whole, log_off) = score(&input, TINY, &["--prefix-sharing", "off"], &[]);
    assert_eq!(saved_tokens(&log), Some(0), "{log}");
    let padding = |log: &str| {
        log.split("padding overhead ")
            .nth(1)
            .map(|s| s[..4].to_string())
    };
    assert_eq!(padding(&log), padding(&log_off));
    assert_eq!(shared, whole);
}

/// eval scores the chosen and rejected answers to each prompt against one pass over the prompt.
#[test]
fn eval_shares_each_pair_prompt() {
    let pairs = fixtures().join("pairs.jsonl");
    let model = model_dir(TINY);
    let run = |sharing: &str| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pairs.jsonl");
        let args = [
            "eval",
            pairs.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--prefix-sharing",
            sharing,
            "-o",
            out.to_str().unwrap(),
        ];
        let result = armorm(&args);
        let log = String::from_utf8_lossy(&result.stderr).to_string();
        assert!(result.status.success(), "{log}");
        (std::fs::read_to_string(out).unwrap(), log)
    };
    let (shared, log) = run("auto");
    let (whole, _) = run("off");
    assert!(saved_tokens(&log).unwrap() > 0, "{log}");
    let rows = |text: &str| -> Vec<Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (shared, whole) = (rows(&shared), rows(&whole));
    assert_eq!(shared.len(), whole.len());
    for (a, b) in shared.iter().zip(&whole) {
        for key in ["score_chosen", "score_rejected"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-5, "{key}: {x} vs {y}");
        }
    }
}
