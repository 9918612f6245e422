//! Helpers: run the binary, read goldens and outputs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

pub const TINY: &str = "tiny-armorm";
pub const ALT: &str = "tiny-armorm-alt";

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// The reference outputs that fixtures/generate.py computed with transformers.
#[derive(Debug, Clone)]
pub struct Golden {
    pub input_ids: Vec<u32>,
    pub gate_index: usize,
    pub num_tokens: usize,
    pub score: f32,
    pub rewards: Vec<f32>,
    pub gating: Vec<f32>,
    pub coefficients: Vec<f32>,
}

pub fn goldens(model: &str) -> HashMap<String, Golden> {
    let text =
        std::fs::read_to_string(fixtures().join("goldens").join(format!("{model}.jsonl"))).unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let floats = |k: &str| -> Vec<f32> {
                v[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            };
            let g = Golden {
                input_ids: v["input_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect(),
                gate_index: v["gate_index"].as_u64().unwrap() as usize,
                num_tokens: v["num_tokens"].as_u64().unwrap() as usize,
                score: v["score"].as_f64().unwrap() as f32,
                rewards: floats("rewards"),
                gating: floats("gating"),
                coefficients: floats("coefficients"),
            };
            (v["id"].as_str().unwrap().to_string(), g)
        })
        .collect()
}

/// One scored output row.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub id: String,
    pub score: f32,
    pub rewards: Vec<f32>,
    pub gating: Vec<f32>,
    pub coefficients: Vec<f32>,
    pub num_tokens: usize,
}

pub fn parse_jsonl(text: &str) -> Vec<Scored> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let floats = |k: &str| -> Vec<f32> {
                v[k].as_array()
                    .unwrap_or_else(|| panic!("no {k} in {l}"))
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect()
            };
            Scored {
                id: v["id"].as_str().unwrap_or_default().to_string(),
                score: v["score"].as_f64().unwrap() as f32,
                rewards: floats("rewards"),
                gating: floats("gating"),
                coefficients: floats("coefficients"),
                num_tokens: v["num_tokens"].as_u64().unwrap() as usize,
            }
        })
        .collect()
}

pub fn armorm(args: &[&str]) -> Output {
    armorm_stdin(args, None)
}

pub fn armorm_stdin(args: &[&str], stdin: Option<&[u8]>) -> Output {
    armorm_with(args, stdin, &[])
}

/// `armorm ARGS` with `env` set, fed `stdin` (else nothing).
pub fn armorm_with(args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_armorm"));
    cmd.args(args)
        .envs(env.iter().copied())
        .env("HF_HUB_OFFLINE", "1")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn armorm");
    if let Some(data) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().unwrap();
        // armorm may stop before reading everything (e.g. a model error): not the test's failure.
        let _ = pipe.write_all(data);
    }
    child.wait_with_output().unwrap()
}

/// `armorm score INPUT --model MODEL -o OUT` (a fixture model; on the CPU unless `extra` names a
/// device) with `extra` and `env`: the process's output, for runs that may fail.
pub fn score_to(
    input: &Path,
    model: &str,
    out: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let model = model_dir(model);
    let mut args = vec![
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        out,
    ];
    if !extra.contains(&"--device") {
        args.extend(["--device", "cpu"]);
    }
    args.extend_from_slice(extra);
    armorm_with(&args, None, env)
}

/// Runs `armorm score` and returns stdout's JSONL rows; panics with stderr on failure.
pub fn score_jsonl(input: &Path, model: &str, extra: &[&str]) -> Vec<Scored> {
    score_jsonl_with(input, model, extra, &[]).0
}

/// `score_jsonl` with `env` set; the rows and stderr.
pub fn score_jsonl_with(
    input: &Path,
    model: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Vec<Scored>, String) {
    let out = score_to(input, model, "-", extra, env);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "armorm failed: {stderr}");
    (parse_jsonl(&String::from_utf8(out.stdout).unwrap()), stderr)
}

/// The largest |a - b|; NaN when any difference is NaN, so that `d <= tol` fails on it (`f32::max`
/// would skip a NaN and report the other differences).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m: f32, d| {
            if m.is_nan() || d.is_nan() {
                f32::NAN
            } else {
                m.max(d)
            }
        })
}

/// Every output of `got` within `tol` of `want`, row by row; the message names the row and field.
pub fn assert_close(got: &Scored, want: &Scored, tol: f32) {
    let id = &got.id;
    assert_eq!(got.num_tokens, want.num_tokens, "{id}: num_tokens");
    assert!(
        (got.score - want.score).abs() <= tol,
        "{id}: score {} vs {}",
        got.score,
        want.score
    );
    for (name, a, b) in [
        ("rewards", &got.rewards, &want.rewards),
        ("gating", &got.gating, &want.gating),
        ("coefficients", &got.coefficients, &want.coefficients),
    ] {
        let d = max_abs_diff(a, b);
        assert!(d <= tol, "{id}: {name} differ by {d} > {tol}");
    }
}

pub fn golden_as_scored(id: &str, g: &Golden) -> Scored {
    Scored {
        id: id.to_string(),
        score: g.score,
        rewards: g.rewards.clone(),
        gating: g.gating.clone(),
        coefficients: g.coefficients.clone(),
        num_tokens: g.num_tokens,
    }
}

/// A Parquet file read whole.
pub fn read_parquet(path: &Path) -> polars::prelude::DataFrame {
    use polars::prelude::*;
    ParquetReader::new(std::fs::File::open(path).unwrap())
        .finish()
        .unwrap()
}

/// A Parquet file's key-value metadata.
pub fn parquet_metadata(path: &Path) -> HashMap<String, String> {
    use polars::prelude::*;
    let mut reader = ParquetReader::new(std::fs::File::open(path).unwrap());
    let meta = reader.get_metadata().unwrap().clone();
    meta.key_value_metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|kv| (kv.key, kv.value.unwrap_or_default()))
        .collect()
}
