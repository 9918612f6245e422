//! eval and explain score in this process, through the same pipeline as `armorm score`: no temporary
//! file, and errors name the user's input rather than a file of armorm's own.

use std::process::{Command, Output, Stdio};

use crate::common::*;

/// `armorm ARGS`, with stdin, under a TMPDIR that does not exist: any temporary file fails.
fn without_tmpdir(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("TMPDIR", "/nonexistent/armorm-tmp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    let _ = std::io::Write::write_all(&mut pipe, stdin);
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn eval_and_explain_need_no_temporary_file() {
    let model = model_dir(TINY);
    let m = model.to_str().unwrap();
    let pairs = std::fs::read(fixtures().join("pairs.jsonl")).unwrap();
    let out = without_tmpdir(&["eval", "-", "--model", m, "-o", "-", "-q"], &pairs);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 8);
    // No pair at all: nothing to score, an empty summary.
    let out = without_tmpdir(&["eval", "-", "--model", m, "-q"], b"");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("(0 of 0 pairs;"));

    // Raw data on stdin, scored in memory, gives what the same file gives.
    let input = fixtures().join("conversations.jsonl");
    let args = ["explain", "--model", m, "--format", "jsonl", "-q"];
    let piped = without_tmpdir(&args, &std::fs::read(&input).unwrap());
    assert_eq!(piped.status.code(), Some(0), "{}", stderr(&piped));
    let from_file = armorm(&[&args[..], &[input.to_str().unwrap()]].concat());
    assert_eq!(from_file.status.code(), Some(0), "{}", stderr(&from_file));
    assert_eq!(piped.stdout, from_file.stdout);
    assert_eq!(String::from_utf8_lossy(&piped.stdout).lines().count(), 22);
}

#[test]
fn a_conversation_eval_cannot_score_is_named_by_its_pair() {
    let model = model_dir(TINY);
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("eval.parquet");
    let pairs = fixtures().join("pairs.jsonl");
    let out = armorm(&[
        "eval",
        pairs.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--max-length",
        "5",
        "-o",
        out_path.to_str().unwrap(),
        "-q",
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{}: line 1: ", pairs.display()))
            && err.contains("over --max-length 5"),
        "{err}"
    );
    assert!(!out_path.exists());
}

#[test]
fn raw_data_explain_cannot_score_from_stdin_is_named_stdin() {
    let model = model_dir(TINY);
    let data = std::fs::read(fixtures().join("conversations.jsonl")).unwrap();
    let out = armorm_stdin(
        &[
            "explain",
            "--model",
            model.to_str().unwrap(),
            "--max-length",
            "5",
            "-q",
        ],
        Some(&data),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("<stdin>: line 1: ") && err.contains("over --max-length 5"),
        "{err}"
    );
}
