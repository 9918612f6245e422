//! A run killed with SIGKILL leaves no finished-looking output, and `--resume` completes it into a
//! file identical to an uninterrupted run's; resuming over different input is refused.

use std::fs::File;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use polars::prelude::*;

use crate::common::*;

fn frame(path: &std::path::Path) -> DataFrame {
    ParquetReader::new(File::open(path).unwrap())
        .finish()
        .unwrap()
}

#[test]
fn killed_run_resumes_to_an_identical_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("big.jsonl");
    let mut f = File::create(&input).unwrap();
    for i in 0..20_000 {
        writeln!(
            f,
            r#"{{"id": {i}, "prompt": "Question {}: what is {} + {}?", "response": "It is {}."}}"#,
            i % 977,
            i % 13,
            i % 7,
            i % 13 + i % 7
        )
        .unwrap();
    }
    drop(f);
    let model = model_dir(TINY);
    let args = |out: &std::path::Path| -> Vec<String> {
        [
            "score",
            input.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(
            ["--window-rows", "400", "--threads", "1", "-q"]
                .iter()
                .map(|s| s.to_string()),
        )
        .collect()
    };
    let reference = dir.path().join("reference.parquet");
    let out = Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args(args(&reference))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let target = dir.path().join("out.parquet");
    let parts = dir.path().join(".out.parquet.armorm-parts");
    let mut child = Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args(args(&target))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let count = || {
        std::fs::read_dir(&parts)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with("part-")
                })
                .count()
            })
            .unwrap_or(0)
    };
    while count() < 3 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    let done = count();
    assert!(
        !status.success(),
        "the run finished before it could be killed"
    );
    assert!((3..50).contains(&done), "{done} parts");
    assert!(
        !target.exists(),
        "a killed run must not leave a file at the target path"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args(args(&target))
        .arg("--resume")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!parts.exists(), "parts are removed once joined");
    let (a, b) = (frame(&reference), frame(&target));
    assert_eq!(a.height(), 20_000);
    assert!(
        a.equals_missing(&b),
        "resumed output differs from the uninterrupted run"
    );

    // Resuming over different input is refused.
    let mut child = Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args(args(&target))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while count() < 2 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .unwrap()
        .write_all(b"{\"id\": -1, \"prompt\": \"a\", \"response\": \"b\"}\n")
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args(args(&target))
        .arg("--resume")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot resume") && err.contains("inputs"),
        "{err}"
    );
}
