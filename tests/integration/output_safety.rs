//! Output and resume (issue 9): parts joined with the run's own schema, parts kept after an error or a
//! signal, refusals that protect earlier work (parts, locks, inputs, stdin), empty shards with the
//! full schema, and Parquet in the classic Arrow types for every command.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use polars::prelude::*;
use polars_arrow::datatypes::ArrowDataType;

use crate::common::*;

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn score(input: &Path, output: &Path, extra: &[&str]) -> Output {
    let model = model_dir(TINY);
    let mut args = vec![
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
        "--device",
        "cpu",
        "-q",
    ];
    args.extend_from_slice(extra);
    armorm(&args)
}

/// `n` good rows, `id` r0.., with `bad` (0-based) a row that cannot be scored.
fn rows_with_a_bad_one(path: &Path, n: usize, bad: Option<usize>) {
    let mut f = File::create(path).unwrap();
    for i in 0..n {
        if Some(i) == bad {
            writeln!(f, r#"{{"id": "r{i}", "prompt": 5, "response": "x"}}"#).unwrap();
        } else {
            writeln!(
                f,
                r#"{{"id": "r{i}", "prompt": "What is {i} + {i}?", "response": "{}."}}"#,
                2 * i
            )
            .unwrap();
        }
    }
}

fn parts_dir(target: &Path) -> PathBuf {
    let name = target.file_name().unwrap().to_str().unwrap();
    target.with_file_name(format!(".{name}.armorm-parts"))
}

fn part_count(target: &Path) -> usize {
    std::fs::read_dir(parts_dir(target))
        .map(|d| {
            d.filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                let name = name.to_string_lossy();
                name.starts_with("part-") && name.ends_with(".parquet")
            })
            .count()
        })
        .unwrap_or(0)
}

fn parquet(path: &Path) -> DataFrame {
    ParquetReader::new(File::open(path).unwrap())
        .finish()
        .unwrap()
}

/// Hidden files that a run leaves beside `target` (temporary outputs, locks), parts folder excluded.
fn leftovers(target: &Path) -> Vec<String> {
    let name = target.file_name().unwrap().to_str().unwrap();
    std::fs::read_dir(target.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")) && !n.ends_with(".armorm-parts"))
        .collect()
}

/// The bad row sits in the second window, past the first 100 rows of it: reading that part back
/// with an inferred schema (as the join once did) typed `error` as null from those rows and failed on
/// the bad one, after all the scoring. The parts are now joined with the run's own schema.
#[test]
fn jsonl_output_joins_parts_with_the_runs_schema() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    rows_with_a_bad_one(&input, 300, Some(280));
    let args = ["--window-rows", "150", "--on-error", "skip"];
    let out = score(&input, &output, &args);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 300);
    for (i, r) in rows.iter().enumerate() {
        // The reader keeps no input column of a row it could not take.
        if i != 280 {
            assert_eq!(r["id"], format!("r{i}"));
        }
        let want = if i == 280 { "error" } else { "ok" };
        assert_eq!(r["status"], want, "{r}");
        assert_eq!(r["error"].is_null(), i != 280, "{r}");
    }
    assert!(rows[280]["error"].as_str().unwrap().contains("line 281"));
    assert!(!parts_dir(&output).exists());

    // The same through a Parquet target: `error` is a string column, not null-typed.
    let pq = dir.path().join("out.parquet");
    let out = score(&input, &pq, &args);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let df = parquet(&pq);
    assert_eq!(df.column("error").unwrap().dtype(), &DataType::String);
    assert_eq!(df.height(), 300);
}

/// An error in window 3 keeps windows 1-2 and names --resume; resuming over the same input continues
/// after them (and meets the same bad row); a changed input cannot be resumed and needs --overwrite.
#[test]
fn error_after_committed_windows_keeps_them_for_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.parquet"));
    rows_with_a_bad_one(&input, 8, Some(5));
    let args = ["--window-rows", "2"];
    let out = score(&input, &output, &args);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out);
    assert!(err.contains("line 6"), "{err}");
    assert!(
        err.contains("2 scored windows are kept") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(part_count(&output), 2);
    assert!(!output.exists());
    assert!(leftovers(&output).is_empty(), "{:?}", leftovers(&output));

    let out = score(&input, &output, &[&args[..], &["--resume"]].concat());
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("line 6"), "{}", text(&out));
    assert_eq!(part_count(&output), 2);

    // Fixing the input changes it: its rows might differ from the ones scored.
    rows_with_a_bad_one(&input, 8, None);
    let out = score(&input, &output, &[&args[..], &["--resume"]].concat());
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out);
    assert!(
        err.contains("cannot resume: `inputs` differs") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(part_count(&output), 2);
    let out = score(&input, &output, &[&args[..], &["--overwrite"]].concat());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(parquet(&output).height(), 8);
    assert!(!parts_dir(&output).exists());
}

/// Parts of an earlier run are never deleted silently.
#[test]
fn existing_parts_without_resume_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    rows_with_a_bad_one(&input, 6, Some(4));
    let out = score(&input, &output, &["--window-rows", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(part_count(&output), 2);
    let out = score(&input, &output, &["--window-rows", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out);
    assert!(
        err.contains("2 scored windows of an earlier run")
            && err.contains("--resume")
            && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(part_count(&output), 2);
    assert!(!output.exists());
}

fn big_input(path: &Path, rows: usize) {
    let mut f = std::io::BufWriter::new(File::create(path).unwrap());
    for i in 0..rows {
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
}

/// Starts a run, waits for `parts` committed windows, sends `signal`, and returns the exit code and
/// stderr.
fn interrupt(args: &[String], target: &Path, parts: usize, signal: i32) -> (Option<i32>, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while part_count(target) < parts && start.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: signals the child this test started, by its pid.
    unsafe { libc::kill(child.id() as i32, signal) };
    let out = child.wait_with_output().unwrap();
    (out.status.code(), text(&out))
}

/// SIGINT and SIGTERM stop at a window boundary with 130 / 143 and the --resume hint, leave no
/// temporary file or lock, and `--resume` completes an output identical to an uninterrupted run's.
#[test]
fn signals_keep_committed_windows_and_resume_identically() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("big.jsonl");
    big_input(&input, 20_000);
    let model = model_dir(TINY);
    let args = |out: &Path| -> Vec<String> {
        [
            "score",
            input.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--window-rows",
            "400",
            "--threads",
            "1",
            "-q",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let reference = dir.path().join("reference.parquet");
    let out = Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args(args(&reference))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    let target = dir.path().join("out.parquet");
    let mut resume = args(&target);
    resume.push("--resume".into());
    let mut committed = 0;
    for (signal, code, run) in [
        (libc::SIGINT, 130, args(&target)),
        (libc::SIGTERM, 143, resume.clone()),
    ] {
        let (status, err) = interrupt(&run, &target, committed + 2, signal);
        assert_eq!(status, Some(code), "{err}");
        assert!(
            err.contains("interrupted by SIG") && err.contains("--resume"),
            "{err}"
        );
        assert!(!target.exists());
        assert!(leftovers(&target).is_empty(), "{:?}", leftovers(&target));
        let now = part_count(&target);
        assert!(now >= committed + 2 && now < 50, "{now} parts");
        committed = now;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args(&resume)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(!parts_dir(&target).exists());
    let (a, b) = (parquet(&reference), parquet(&target));
    assert_eq!(a.height(), 20_000);
    assert!(a.equals_missing(&b), "resumed output differs");
}

/// A live lock (here: the pid of a `sleep` this test runs) refuses a second writer; a lock whose
/// process is gone is taken over, and the lock is released at the end.
#[test]
fn a_live_lock_refuses_and_a_stale_one_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (
        fixtures().join("conversations.jsonl"),
        dir.path().join("out.parquet"),
    );
    let lock = dir.path().join(".out.parquet.armorm-lock");
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    std::fs::write(&lock, format!("{}\n", sleeper.id())).unwrap();
    let out = score(&input, &output, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out);
    assert!(
        err.contains("another armorm run") && err.contains(&format!("pid {}", sleeper.id())),
        "{err}"
    );
    assert!(!output.exists() && lock.exists());

    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let out = score(&input, &output, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(parquet(&output).height(), 22);
    assert!(!lock.exists(), "the lock is released on exit");
}

/// A temporary output left by a run killed while joining (SIGKILL, a second Ctrl-C) is removed by the
/// next run of the same target, which holds the lock.
#[test]
fn a_dead_runs_temporary_output_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (
        fixtures().join("conversations.jsonl"),
        dir.path().join("out.parquet"),
    );
    let stale = dir.path().join(".out.parquet.Xa81Qz.partial");
    let other = dir.path().join(".other.parquet.Xa81Qz.partial");
    std::fs::write(&stale, b"half a file").unwrap();
    std::fs::write(&other, b"another target's").unwrap();
    let out = score(&input, &output, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!stale.exists());
    assert!(other.exists(), "only this target's leftovers are removed");
    assert!(leftovers(&output).is_empty(), "{:?}", leftovers(&output));
}

/// Rows read from stdin cannot be compared with an interrupted run's.
#[test]
fn resume_from_stdin_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.parquet");
    let model = model_dir(TINY);
    let data = std::fs::read(fixtures().join("conversations.jsonl")).unwrap();
    let out = armorm_stdin(
        &[
            "score",
            "-",
            "--model",
            model.to_str().unwrap(),
            "-o",
            output.to_str().unwrap(),
            "--resume",
        ],
        Some(&data),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out);
    assert!(err.contains("--resume") && err.contains("stdin"), "{err}");
    assert!(!output.exists());
}

/// The device is part of what a resumed run must match.
#[test]
fn resume_on_another_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.parquet"));
    rows_with_a_bad_one(&input, 6, Some(4));
    let out = score(&input, &output, &["--window-rows", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let manifest = parts_dir(&output).join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert_eq!(m["device"], serde_json::json!(["cpu"]));
    assert_eq!(m["dtype"], "F32");
    // As if the interrupted run had been on a GPU.
    m["device"] = serde_json::json!(["cuda"]);
    std::fs::write(&manifest, m.to_string()).unwrap();
    let out = score(&input, &output, &["--window-rows", "2", "--resume"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("cannot resume: `device` differs"),
        "{}",
        text(&out)
    );
}

/// Parts written by an armorm before `input_hash` (and the hashes of the model and template) cannot be
/// joined with parts that have them: resuming them is refused, naming --overwrite.
#[test]
fn resume_of_parts_from_before_input_hash_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.parquet"));
    rows_with_a_bad_one(&input, 6, Some(4));
    let out = score(&input, &output, &["--window-rows", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let part = parquet(&parts_dir(&output).join("part-00000000.parquet"));
    assert!(part.column("input_hash").is_ok());
    let manifest = parts_dir(&output).join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let columns = m["output_columns"].as_array().unwrap();
    assert!(columns.contains(&"input_hash".into()), "{m}");
    // The manifest such an armorm wrote.
    for key in ["output_columns", "commit", "model_hash", "template_hash"] {
        m.as_object_mut().unwrap().remove(key).unwrap();
    }
    std::fs::write(&manifest, m.to_string()).unwrap();
    let out = score(&input, &output, &["--window-rows", "2", "--resume"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out);
    assert!(
        err.contains("cannot resume: the interrupted run was made by an older armorm")
            && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(part_count(&output), 2);
}

/// `-o` naming an input, however spelled, is refused and the input stays as it was.
#[test]
fn output_over_an_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let input = dir.path().join("in.jsonl");
    rows_with_a_bad_one(&input, 3, None);
    let before = std::fs::read(&input).unwrap();
    for spelling in [
        input.clone(),
        dir.path().join("sub").join("..").join("in.jsonl"),
    ] {
        let out = score(&input, &spelling, &[]);
        assert_eq!(out.status.code(), Some(1));
        assert!(
            text(&out).contains("the output is the input"),
            "{}",
            text(&out)
        );
        assert_eq!(std::fs::read(&input).unwrap(), before);
    }
    // The second of several inputs too.
    let other = dir.path().join("other.jsonl");
    rows_with_a_bad_one(&other, 2, None);
    let model = model_dir(TINY);
    let out = armorm(&[
        "score",
        other.to_str().unwrap(),
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        input.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

/// Shard 5 of 6 over 3 rows holds no row, yet has every column of shard 0, with the same types.
#[test]
fn an_empty_shard_has_the_schema_of_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    rows_with_a_bad_one(&input, 3, None);
    let shards = dir.path().join("shards");
    let part = |k: usize| {
        let spec = format!("{k}/6");
        let out = score(
            &input,
            &shards,
            &["--shard", &spec, "--on-error", "skip", "--top-k", "2"],
        );
        assert!(out.status.success(), "{}", text(&out));
        shards.join(format!("part-{k}-of-6.parquet"))
    };
    let (first, last) = (part(0), part(5));
    let (a, b) = (parquet(&first), parquet(&last));
    assert_eq!((a.height(), b.height()), (1, 0));
    assert_eq!(a.schema(), b.schema());
    assert!(b.column("id").is_ok() && b.column("error").is_ok());
    assert_eq!(arrow_schema(&first), arrow_schema(&last));
}

/// The Arrow schema a Parquet footer stores (`ARROW:schema`), decoded as written.
fn arrow_schema(path: &Path) -> Vec<(String, ArrowDataType)> {
    let mut reader = ParquetReader::new(File::open(path).unwrap());
    let meta = reader.get_metadata().unwrap().clone();
    let kv = meta.key_value_metadata().clone().unwrap_or_default();
    let encoded = kv
        .iter()
        .find(|k| k.key == "ARROW:schema")
        .and_then(|k| k.value.clone())
        .unwrap_or_else(|| panic!("{}: no ARROW:schema", path.display()));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    // An IPC message: 0xFFFFFFFF and its length before the flatbuffer (older writers omit both).
    let body = if bytes[..4] == [0xff; 4] {
        &bytes[8..]
    } else {
        &bytes[..]
    };
    let (schema, ..) = polars_arrow::io::ipc::read::deserialize_schema(body).unwrap();
    schema
        .iter_values()
        .map(|f| (f.name.to_string(), f.dtype.clone()))
        .collect()
}

/// Any view or 64-bit-offset type at any depth (what pyarrow cannot filter or write back).
fn modern(dtype: &ArrowDataType) -> bool {
    match dtype {
        ArrowDataType::Utf8View
        | ArrowDataType::BinaryView
        | ArrowDataType::LargeUtf8
        | ArrowDataType::LargeBinary
        | ArrowDataType::LargeList(_) => true,
        ArrowDataType::List(f) | ArrowDataType::FixedSizeList(f, _) => modern(&f.dtype),
        ArrowDataType::Struct(fields) => fields.iter().any(|f| modern(&f.dtype)),
        _ => false,
    }
}

fn assert_classic(path: &Path) {
    let schema = arrow_schema(path);
    let bad: Vec<_> = schema.iter().filter(|(_, t)| modern(t)).collect();
    assert!(bad.is_empty(), "{}: {bad:?}", path.display());
    // Not vacuous: the file has strings and lists, in their plain types.
    assert!(
        schema.iter().any(|(_, t)| *t == ArrowDataType::Utf8),
        "{}: {schema:?}",
        path.display()
    );
    assert!(
        schema
            .iter()
            .any(|(_, t)| matches!(t, ArrowDataType::List(_))),
        "{}: {schema:?}",
        path.display()
    );
}

/// score, its parts, explain, eval, filter, best-of-n (pairs too) and rescore all write `string` and
/// `list`.
#[test]
fn every_parquet_output_stores_classic_arrow_types() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    let model = model_dir(TINY);
    let m = model.to_str().unwrap();
    let conversations = fixtures().join("conversations.jsonl");
    let scored = d("scored.parquet");
    let out = score(&conversations, &scored, &["--top-k", "2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_classic(&scored);

    // Parts, left by a run that stopped in its third window.
    let input = d("in.jsonl");
    rows_with_a_bad_one(&input, 6, Some(4));
    let stopped = d("stopped.jsonl");
    let out = score(&input, &stopped, &["--window-rows", "2"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_classic(&parts_dir(&stopped).join("part-00000000.parquet"));

    let s = scored.to_str().unwrap();
    let runs: Vec<(PathBuf, Vec<String>)> = vec![
        (
            d("explain.parquet"),
            vec![
                "explain".into(),
                s.into(),
                "--format".into(),
                "parquet".into(),
            ],
        ),
        (
            d("eval.parquet"),
            vec![
                "eval".into(),
                fixtures().join("pairs.jsonl").display().to_string(),
                "--model".into(),
                m.into(),
                "-q".into(),
            ],
        ),
        (
            d("filter.parquet"),
            vec![
                "filter".into(),
                s.into(),
                "--where".into(),
                "score > -100".into(),
            ],
        ),
        (
            d("best.parquet"),
            vec!["best-of-n".into(), s.into(), "--group".into(), "id".into()],
        ),
        (
            d("rescored.parquet"),
            vec![
                "rescore".into(),
                s.into(),
                "--weights".into(),
                "helpsteer-correctness=2".into(),
            ],
        ),
        (
            d("pairs.parquet"),
            vec![
                "best-of-n".into(),
                s.into(),
                "--group".into(),
                "id".into(),
                "--pairs".into(),
            ],
        ),
    ];
    for (path, mut args) in runs {
        args.extend(["-o".into(), path.display().to_string()]);
        let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        let out = armorm(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        assert_classic(&path);
    }
}
