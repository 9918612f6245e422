//! Bad input: non-zero exit, an error naming file, line or row, and field, and no output left behind.

use crate::common::*;

/// Runs `armorm score` on `content` written to a .jsonl file; returns (stderr, output dir listing).
fn fail_jsonl(content: &str) -> (String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.jsonl");
    std::fs::write(&input, content).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let target = out_dir.join("scores.parquet");
    let model = model_dir(TINY);
    let out = armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        target.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "bad input must fail");
    assert_eq!(out.status.code(), Some(1));
    let left: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    (String::from_utf8(out.stderr).unwrap(), left)
}

const GOOD: &str = "{\"prompt\": \"Hi\", \"response\": \"Hello\"}\n";

fn check(content: &str, line: usize, field: Option<&str>, reason: &str) {
    let (err, left) = fail_jsonl(content);
    assert!(left.is_empty(), "output left behind: {left:?}");
    assert!(
        err.contains(&format!("bad.jsonl: line {line}")),
        "no file/line in: {err}"
    );
    if let Some(f) = field {
        assert!(
            err.contains(&format!("field `{f}`")),
            "no field {f} in: {err}"
        );
    }
    assert!(err.contains(reason), "no reason {reason:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn malformed_json_line() {
    check(
        &format!("{GOOD}{{\"prompt\": \"Hi\", \n"),
        2,
        None,
        "malformed JSON",
    );
}

#[test]
fn row_with_neither_prompt_nor_messages() {
    check(
        &format!("{GOOD}{GOOD}{{\"text\": \"Hi\"}}\n"),
        3,
        None,
        "neither `prompt` + `response` nor `messages`",
    );
}

#[test]
fn messages_not_ending_with_assistant() {
    let row = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "?"}]}"#;
    check(
        &format!("{GOOD}{row}\n"),
        2,
        Some("messages"),
        "last message must be the assistant",
    );
}

#[test]
fn wrong_types() {
    check(
        "{\"prompt\": 5, \"response\": \"x\"}\n",
        1,
        Some("prompt"),
        "expected a string, got a number",
    );
    check(
        &format!("{GOOD}{{\"messages\": [{{\"role\": \"user\", \"content\": [1]}}]}}\n"),
        2,
        Some("messages[0].content"),
        "expected a string, got an array",
    );
    check(
        &format!("{GOOD}{{\"messages\": \"hello\"}}\n"),
        2,
        Some("messages"),
        "expected a list of messages",
    );
}

#[test]
fn unknown_format_and_missing_file() {
    let model = model_dir(TINY);
    let out = armorm(&[
        "score",
        "/nonexistent/x.jsonl",
        "--model",
        model.to_str().unwrap(),
        "-o",
        "-",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/x.jsonl") && err.contains("cannot open"),
        "{err}"
    );

    let out = armorm(&["score", "-", "--model", "/no/such/model", "-o", "-"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/model"));
}

#[test]
fn parquet_without_the_columns_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(TINY);
    // A scored file has prompt/response, so drop them: score the goldens' own Parquet by other names.
    let input = fixtures().join("conversations.parquet");
    let out = armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--prompt-column",
        "question",
        "-o",
        dir.path().join("o.parquet").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("conversations.parquet") && err.contains("field `question`"),
        "{err}"
    );
    assert!(!dir.path().join("o.parquet").exists());
}

#[test]
fn offline_hub_model_not_cached_says_how_to_point_at_a_directory() {
    let cache = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args(["score", "-", "-o", "-"])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", cache.path())
        .env_remove("HF_HUB_CACHE")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("RLHFlow/ArmoRM-Llama3-8B-v0.1") && err.contains("--model DIR"),
        "{err}"
    );
}

/// An error in a later window, after earlier windows were already written: still no output at the
/// target; the committed windows stay in the hidden parts folder for `--resume` (issue 9).
#[test]
fn late_error_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("late.jsonl");
    let mut text = GOOD.repeat(12);
    text.push_str("{\"prompt\": \"Hi\"}\n");
    std::fs::write(&input, text).unwrap();
    let model = model_dir(TINY);
    for target in ["o.parquet", "o.jsonl"] {
        let target = dir.path().join(target);
        let out = armorm(&[
            "score",
            input.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--window-rows",
            "5",
            "-o",
            target.to_str().unwrap(),
        ]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("late.jsonl: line 13: field `response`: missing"),
            "{err}"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".armorm-parts"))
            .collect();
        assert_eq!(left.len(), 1, "only the input may remain: {left:?}");
    }
}

/// A copy of the tiny model with `damage` applied; returns armorm's stderr for one row.
fn broken_model(damage: impl Fn(&std::path::Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(model_dir(TINY)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    damage(&model);
    let out = armorm_stdin(
        &["score", "-", "--model", model.to_str().unwrap(), "-o", "-"],
        Some(GOOD.as_bytes()),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn edit_config(
    dir: &std::path::Path,
    edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>),
) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(path, cfg.to_string()).unwrap();
}

#[test]
fn broken_model_files_are_named() {
    let err = broken_model(|d| edit_config(d, |c| drop(c.remove("hidden_size"))));
    assert!(
        err.contains("config.json") && err.contains("missing field `hidden_size`"),
        "{err}"
    );

    let err =
        broken_model(|d| edit_config(d, |c| drop(c.insert("num_hidden_layers".into(), 3.into()))));
    assert!(err.contains("cannot find tensor model.layers.2"), "{err}");

    let err = broken_model(|d| {
        edit_config(d, |c| {
            drop(c.insert("intermediate_size".into(), 100.into()))
        })
    });
    assert!(
        err.contains("shape mismatch for model.layers.0.mlp.gate_proj.weight"),
        "{err}"
    );

    let err = broken_model(|d| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("model-00002-of-00002.safetensors"))
            .unwrap();
        f.set_len(1_000_000).unwrap();
    });
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");

    let err = broken_model(|d| {
        edit_config(d, |c| {
            drop(c.insert(
                "rope_scaling".into(),
                serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            ))
        })
    });
    assert!(
        err.contains("rope_scaling type \"yarn\" is not supported"),
        "{err}"
    );
}

/// `--on-error skip`: every row stays, in order; bad ones have null scores, a status and an error that
/// says where and why; the exit code is 3.
#[test]
fn skip_keeps_bad_rows_with_status_and_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("mixed.jsonl");
    let lines = [
        r#"{"id": "a", "prompt": "Hi", "response": "Hello!"}"#,
        r#"{"id": "b", "prompt": "Hi""#,
        r#"[1, 2]"#,
        r#"{"id": "d", "prompt": 5, "response": "x"}"#,
        r#"{"id": "e", "messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}"#,
        r#"{"id": "f", "prompt": "?", "response": "!"}"#,
    ];
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let model = model_dir(TINY);
    let out = armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        "-",
        "--on-error",
        "skip",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 6);
    let status: Vec<&str> = rows.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(status, ["ok", "error", "error", "error", "error", "ok"]);
    let errors: Vec<&str> = rows
        .iter()
        .map(|r| r["error"].as_str().unwrap_or(""))
        .collect();
    assert!(errors[1].contains("mixed.jsonl: line 2") && errors[1].contains("malformed JSON"));
    assert!(
        errors[2].contains("line 3: expected a JSON object"),
        "{}",
        errors[2]
    );
    assert!(
        errors[3].contains("line 4: field `prompt`"),
        "{}",
        errors[3]
    );
    assert!(errors[4].contains("line 5: field `messages`") && errors[4].contains("robot"));
    assert!(rows[1]["score"].is_null() && rows[1]["rewards"].is_null());
    let g = goldens(TINY);
    assert!((rows[0]["score"].as_f64().unwrap() as f32 - g["short"].score).abs() < 1e-4);
    assert!((rows[5]["score"].as_f64().unwrap() as f32 - g["single-char"].score).abs() < 1e-4);
    assert!(String::from_utf8_lossy(&out.stderr).contains("4 rows could not be scored"));
}

/// Rows over --max-length are never scored truncated silently: an error, `too_long`, or with
/// `--truncate prompt-left` the oldest prompt tokens dropped and the status `truncated`.
#[test]
fn over_length_rows() {
    let (input, model) = (fixtures().join("conversations.jsonl"), model_dir(TINY));
    let (input, model) = (input.to_str().unwrap(), model.to_str().unwrap());
    let g = goldens(TINY);

    let out = armorm(&[
        "score",
        input,
        "--model",
        model,
        "-o",
        "-",
        "--max-length",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("conversations.jsonl: line") && err.contains("over --max-length 100"),
        "{err}"
    );

    let out = armorm(&[
        "score",
        input,
        "--model",
        model,
        "-o",
        "-",
        "--max-length",
        "100",
        "--on-error",
        "skip",
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(3));
    for r in String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
    {
        let want = &g[r["id"].as_str().unwrap()];
        let status = r["status"].as_str().unwrap();
        assert_eq!(
            status,
            if want.num_tokens > 100 {
                "too_long"
            } else {
                "ok"
            },
            "{r}"
        );
    }

    // long-prompt (783 tokens, short answer) can lose prompt tokens; long-response (1227) cannot.
    let out = armorm(&[
        "score",
        input,
        "--model",
        model,
        "-o",
        "-",
        "--max-length",
        "100",
        "--truncate",
        "prompt-left",
        "--on-error",
        "skip",
        "-q",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let rows: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let row = |id: &str| rows.iter().find(|r| r["id"] == id).unwrap();
    assert_eq!(row("long-prompt")["status"], "truncated");
    assert_eq!(row("long-prompt")["num_tokens"], 100);
    assert!(row("long-prompt")["score"].is_number());
    assert_eq!(row("long-response")["status"], "too_long");
    assert_eq!(row("plain")["status"], "ok");
    assert!((row("plain")["score"].as_f64().unwrap() as f32 - g["plain"].score).abs() < 1e-4);
}

#[test]
fn empty_strings_and_non_utf8() {
    check(
        &format!("{GOOD}{{\"prompt\": \"  \", \"response\": \"x\"}}\n"),
        2,
        Some("prompt"),
        "empty",
    );
    let row =
        r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}"#;
    check(&format!("{GOOD}{row}\n"), 2, Some("messages"), "is empty");

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("latin1.jsonl");
    let mut bytes = GOOD.as_bytes().to_vec();
    bytes.extend_from_slice(b"{\"prompt\": \"caf\xe9\", \"response\": \"x\"}\n");
    std::fs::write(&input, bytes).unwrap();
    let model = model_dir(TINY);
    let out = armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        "-",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("latin1.jsonl: line 2: not valid UTF-8"),
        "{err}"
    );
}

/// An empty input is a valid, empty dataset: an output with no rows, so that pipelines compose.
#[test]
fn empty_file_gives_an_empty_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("empty.jsonl");
    std::fs::write(&input, "").unwrap();
    let target = dir.path().join("out.parquet");
    let model = model_dir(TINY);
    let out = armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        target.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("scored 0 rows"));
    let df = polars::prelude::ParquetReader::new(std::fs::File::open(&target).unwrap());
    use polars::prelude::SerReader;
    assert_eq!(df.finish().unwrap().height(), 0);
}

#[test]
fn unreadable_inputs_and_missing_output_directory() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(TINY);
    let model = model.to_str().unwrap();

    // A truncated Parquet file.
    let pq = std::fs::read(fixtures().join("conversations.parquet")).unwrap();
    let cut = dir.path().join("cut.parquet");
    std::fs::write(&cut, &pq[..pq.len() / 2]).unwrap();
    let out = armorm(&["score", cut.to_str().unwrap(), "--model", model, "-o", "-"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cut.parquet") && err.contains("not a readable Parquet file"),
        "{err}"
    );

    // A path that cannot be read as a file.
    let not_file = dir.path().join("folder.jsonl");
    std::fs::create_dir(&not_file).unwrap();
    let out = armorm(&[
        "score",
        not_file.to_str().unwrap(),
        "--model",
        model,
        "-o",
        "-",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("folder.jsonl"));

    // An output directory that does not exist.
    let input = fixtures().join("conversations.jsonl");
    let target = dir.path().join("no/such/dir/out.parquet");
    let out = armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model,
        "-o",
        target.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no/such/dir/out.parquet") && err.contains("cannot create the output file"),
        "{err}"
    );
}

/// The error line of `stderr`, checked to state each cause once: no segment of it (between ": ")
/// longer than a few characters may appear twice.
fn assert_each_cause_once(stderr: &str) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("armorm: error: "))
        .unwrap_or_else(|| panic!("no error line in: {stderr}"));
    for segment in line.split(": ").filter(|s| s.len() >= 8) {
        assert_eq!(
            line.matches(segment).count(),
            1,
            "{segment:?} is repeated in: {line}"
        );
    }
}

#[test]
fn each_cause_is_stated_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(TINY);
    let model = model.to_str().unwrap();

    let (err, _) = fail_jsonl("{\"prompt\": \"Hi\", \"response\": \n");
    assert_each_cause_once(&err);
    assert!(err.contains("bad.jsonl: line 1"), "{err}");

    let input = fixtures().join("conversations.jsonl");
    let target = dir.path().join("no/such/dir/out.parquet");
    let out = armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model,
        "-o",
        target.to_str().unwrap(),
    ]);
    assert_each_cause_once(&String::from_utf8_lossy(&out.stderr));

    let missing = dir.path().join("missing.jsonl");
    let out = armorm(&["score", missing.to_str().unwrap(), "--model", model]);
    assert_each_cause_once(&String::from_utf8_lossy(&out.stderr));

    let err = broken_model(|d| edit_config(d, |c| drop(c.remove("hidden_size"))));
    assert_each_cause_once(&err);
}
