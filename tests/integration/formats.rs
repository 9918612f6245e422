//! Inputs and outputs: JSONL and Parquet, files and pipes, metadata, column names.

use std::fs::File;

use polars::prelude::*;

use crate::common::*;

fn scored_from_frame(df: &DataFrame) -> Vec<Scored> {
    let list = |name: &str, i: usize| -> Vec<f32> {
        let s = df
            .column(name)
            .unwrap()
            .list()
            .unwrap()
            .get_as_series(i)
            .unwrap();
        s.f32().unwrap().into_no_null_iter().collect()
    };
    (0..df.height())
        .map(|i| Scored {
            id: df
                .column("id")
                .unwrap()
                .str()
                .unwrap()
                .get(i)
                .unwrap()
                .to_string(),
            score: df.column("score").unwrap().f32().unwrap().get(i).unwrap(),
            rewards: list("rewards", i),
            gating: list("gating", i),
            coefficients: list("coefficients", i),
            num_tokens: df
                .column("num_tokens")
                .unwrap()
                .i64()
                .unwrap()
                .get(i)
                .unwrap() as usize,
        })
        .collect()
}

#[test]
fn parquet_and_jsonl_outputs_carry_the_same_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(TINY);
    let input = fixtures().join("conversations.jsonl");
    let pq = dir.path().join("out.parquet");
    let out = armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        pq.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_parquet = scored_from_frame(&read_parquet(&pq));
    let from_jsonl = score_jsonl(&input, TINY, &[]);
    assert_eq!(from_parquet, from_jsonl);

    // Input columns come first and survive; the score columns have the documented types.
    let df = read_parquet(&pq);
    let schema = df.schema();
    assert_eq!(schema.get("id"), Some(&DataType::String));
    assert_eq!(schema.get("score"), Some(&DataType::Float32));
    assert_eq!(
        schema.get("rewards"),
        Some(&DataType::List(Box::new(DataType::Float32)))
    );
    assert_eq!(schema.get("num_tokens"), Some(&DataType::Int64));
    assert_eq!(df.get_column_names()[0].as_str(), "id");
}

#[test]
fn parquet_metadata_names_attributes_model_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(TINY);
    let pq = dir.path().join("out.parquet");
    let input = fixtures().join("conversations.parquet");
    let out = armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        pq.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut reader = ParquetReader::new(File::open(&pq).unwrap());
    let meta = reader.get_metadata().unwrap().clone();
    let kv: std::collections::HashMap<String, String> = meta
        .key_value_metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|kv| (kv.key, kv.value.unwrap_or_default()))
        .collect();
    let attrs: Vec<String> = serde_json::from_str(&kv["armorm.attributes"]).unwrap();
    assert_eq!(attrs.len(), 19);
    assert_eq!(attrs[0], "helpsteer-helpfulness");
    assert_eq!(attrs[10], "beavertails-is_safe");
    assert_eq!(attrs[18], "code-readability");
    assert!(kv["armorm.model"].ends_with("tiny-armorm"));
    assert_eq!(kv["armorm.version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn parquet_input_matches_goldens() {
    let goldens = goldens(TINY);
    let rows = score_jsonl(&fixtures().join("conversations.parquet"), TINY, &[]);
    assert_eq!(
        rows.len(),
        18,
        "the prompt/response rows of conversations.jsonl"
    );
    for r in &rows {
        assert_close(r, &golden_as_scored(&r.id, &goldens[&r.id]), 1e-4);
    }
}

#[test]
fn default_output_is_input_stem_scores_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("data.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"a\", \"prompt\": \"Hi\", \"response\": \"Hello!\"}\n",
    )
    .unwrap();
    let model = model_dir(TINY);
    let out = armorm(&[
        "score",
        input.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let df = read_parquet(&dir.path().join("data.scores.parquet"));
    assert_eq!(df.height(), 1);
}

#[test]
fn stdin_to_stdout_and_several_inputs_in_order() {
    let model = model_dir(TINY);
    let data = b"{\"id\": \"s1\", \"prompt\": \"Hi\", \"response\": \"Hello!\"}\n{\"id\": \"s2\", \"prompt\": \"?\", \"response\": \"!\"}\n";
    let out = armorm_stdin(
        &["score", "-", "--model", model.to_str().unwrap()],
        Some(data),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = parse_jsonl(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(
        rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["s1", "s2"]
    );
    let g = goldens(TINY);
    assert_close(&rows[0], &golden_as_scored("s1", &g["short"]), 1e-4);

    // A JSONL file then a Parquet file: one dataset, in order.
    let parquet = fixtures().join("conversations.parquet");
    let dir = tempfile::tempdir().unwrap();
    let both = dir.path().join("both.jsonl");
    let dir_input = dir.path().join("one.jsonl");
    std::fs::write(
        &dir_input,
        "{\"id\": \"first\", \"prompt\": \"Hi\", \"response\": \"Hello!\"}\n",
    )
    .unwrap();
    let out = armorm(&[
        "score",
        dir_input.to_str().unwrap(),
        parquet.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "-o",
        both.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = parse_jsonl(&std::fs::read_to_string(&both).unwrap());
    assert_eq!(rows.len(), 19);
    assert_eq!(rows[0].id, "first");
    assert_eq!(rows[1].id, "plain");
}

#[test]
fn custom_column_names() {
    let model = model_dir(TINY);
    let data = b"{\"q\": \"Hi\", \"a\": \"Hello!\", \"id\": \"x\"}\n";
    let out = armorm_stdin(
        &[
            "score",
            "-",
            "--model",
            model.to_str().unwrap(),
            "--prompt-column",
            "q",
            "--response-column",
            "a",
        ],
        Some(data),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows = parse_jsonl(&String::from_utf8(out.stdout).unwrap());
    assert_close(
        &rows[0],
        &golden_as_scored("x", &goldens(TINY)["short"]),
        1e-4,
    );
}

/// The reader closes the pipe after one byte while armorm still has megabytes to write (far more than
/// a pipe buffer), so armorm's writes really fail with EPIPE: it must stop early and exit 0.
#[test]
fn broken_pipe_exits_zero() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("many.jsonl");
    let line = "{\"prompt\": \"Hi\", \"response\": \"Hello!\"}\n";
    std::fs::write(&input, line.repeat(3000)).unwrap();
    let model = model_dir(TINY);
    let mut child = Command::new(env!("CARGO_BIN_EXE_armorm"))
        .args([
            "score",
            input.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "-o",
            "-",
            "--window-rows",
            "100",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(stdout.read(&mut byte).unwrap(), 1);
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // ~3 MB of JSONL cannot fit a 64 KiB pipe: the run was cut short by EPIPE, so it never reached
    // its summary line, and said nothing about it.
    assert!(!err.contains("armorm: scored"), "{err}");
    assert!(!err.contains("error"), "{err}");
}

#[test]
fn summary_line_on_stderr_unless_quiet() {
    let model = model_dir(TINY);
    let data = b"{\"prompt\": \"Hi\", \"response\": \"Hello!\"}\n";
    let out = armorm_stdin(
        &["score", "-", "--model", model.to_str().unwrap()],
        Some(data),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("scored 1 rows, 14 tokens")
            && err.contains("tokens/s")
            && err.contains("padding overhead"),
        "{err}"
    );
    let out = armorm_stdin(
        &["score", "-", "--model", model.to_str().unwrap(), "--quiet"],
        Some(data),
    );
    assert!(out.status.success());
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
