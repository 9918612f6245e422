//! `ARMORM_PROFILE=1`: the per-section time breakdown on stderr, and scores unchanged by it.

use std::process::{Command, Output, Stdio};

use crate::common::*;

/// Every section the CPU path goes through on the fixture model (no picks-only path is skipped:
/// the last layer runs at the picks, the others at every token).
const SECTIONS: [&str; 15] = [
    "layout",
    "embedding",
    "norm",
    "cast",
    "qkv",
    "rope",
    "gather",
    "attn_matmul",
    "softmax",
    "o_proj",
    "mlp_matmul",
    "silu_mul",
    "residual",
    "head",
    "readback",
];

fn score(profile: Option<&str>) -> Output {
    let input = fixtures().join("conversations.jsonl");
    let model = model_dir(TINY);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_armorm"));
    cmd.args(["score", input.to_str().unwrap(), "--model"])
        .arg(&model)
        // Small batches: several forward passes, so the breakdown adds up over batches.
        .args(["-o", "-", "--device", "cpu", "--max-batch-tokens", "256"])
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("ARMORM_PROFILE")
        .stdin(Stdio::null());
    if let Some(value) = profile {
        cmd.env("ARMORM_PROFILE", value);
    }
    let out = cmd.output().expect("spawn armorm");
    assert!(
        out.status.success(),
        "armorm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn profile_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| l.strip_prefix("armorm: profile: ").map(str::to_string))
        .collect()
}

/// (name, seconds, share %) of each section line; the header line has no share.
fn sections(lines: &[String]) -> Vec<(String, f64, f64)> {
    lines
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let share = f.get(3)?.strip_suffix('%')?.parse().ok()?;
            Some((f[0].to_string(), f[1].parse().ok()?, share))
        })
        .collect()
}

#[test]
fn profile_prints_every_section_and_leaves_scores_unchanged() {
    let plain = score(None);
    let profiled = score(Some("1"));
    let rows = |o: &Output| parse_jsonl(&String::from_utf8_lossy(&o.stdout));
    let (want, got) = (rows(&plain), rows(&profiled));
    assert_eq!(got.len(), 22);
    assert_eq!(got, want, "ARMORM_PROFILE changed the scores");

    let lines = profile_lines(&profiled);
    let batches: usize = lines[0]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no batch count in {:?}", lines[0]));
    assert!(batches > 1, "expected several batches: {lines:?}");
    let found = sections(&lines);
    for name in SECTIONS.iter().chain(&["unattributed"]) {
        assert!(
            found.iter().any(|(n, _, _)| n == name),
            "no {name} in {lines:?}"
        );
    }
    let total: f64 = found.iter().map(|(_, _, share)| share).sum();
    assert!(
        (total - 100.0).abs() < 1.0,
        "shares sum to {total}: {lines:?}"
    );
    let rest = found.iter().find(|(n, _, _)| n == "unattributed").unwrap();
    assert!(
        rest.2 < 50.0,
        "most of the time is outside every section: {lines:?}"
    );
    assert!(found.iter().all(|(_, secs, _)| *secs >= 0.0));
}

#[test]
fn no_profile_unless_asked_for() {
    for value in [None, Some("0"), Some("")] {
        let out = score(value);
        assert!(
            profile_lines(&out).is_empty(),
            "ARMORM_PROFILE={value:?} printed a profile: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
