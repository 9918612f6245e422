//! Input that used to be read wrongly without a word: keys seen late, duplicate keys, a byte-order mark,
//! columns named like armorm's, lines of any size, and null `messages` cells in Parquet.

use std::fs::File;
use std::path::Path;

use polars::prelude::*;
use serde_json::Value;

use crate::common::*;

/// `armorm score INPUT -o - ARGS` on the tiny model: (exit code, output rows, stderr).
fn score(input: &Path, args: &[&str]) -> (Option<i32>, Vec<Value>, String) {
    score_stdin(input.to_str().unwrap(), args, None)
}

fn score_stdin(
    input: &str,
    args: &[&str],
    stdin: Option<&[u8]>,
) -> (Option<i32>, Vec<Value>, String) {
    let model = model_dir(TINY);
    let mut all = vec![
        "score",
        input,
        "--model",
        model.to_str().unwrap(),
        "-o",
        "-",
    ];
    all.extend_from_slice(args);
    let out = armorm_stdin(&all, stdin);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    let rows = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (out.status.code(), rows, stderr)
}

fn write_lines(dir: &Path, name: &str, lines: &[&str]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn scores(rows: &[Value]) -> Vec<f64> {
    rows.iter().map(|r| r["score"].as_f64().unwrap()).collect()
}

#[test]
fn a_key_first_seen_after_the_first_window_is_carried_from_a_file_and_refused_on_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        r#"{"id": "a", "prompt": "Hi", "response": "Hello!"}"#,
        r#"{"id": "b", "prompt": "Hi", "response": "Hello!"}"#,
        r#"{"id": "c", "prompt": "Hi", "response": "Hello!", "source": "web"}"#,
        r#"{"id": "d", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#,
    ];
    let input = write_lines(dir.path(), "late.jsonl", &lines);
    // A file is read ahead for its columns: every key is carried, whatever the window.
    let (code, rows, err) = score(&input, &["--window-rows", "2"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[2]["source"], "web");
    assert!(rows[0]["source"].is_null() && rows[3]["source"].is_null());
    assert_eq!(rows[3]["messages"][1]["content"], "Hello!");
    assert!(rows[0]["messages"].is_null());
    assert_eq!(scores(&rows)[0], scores(&rows)[3]);
    let (_, whole, _) = score(&input, &["--window-rows", "4"]);
    let carried = |rows: &[Value]| -> Vec<Vec<Value>> {
        let keys = ["id", "prompt", "response", "source", "messages"];
        rows.iter()
            .map(|r| keys.iter().map(|k| r[*k].clone()).collect())
            .collect()
    };
    assert_eq!(
        carried(&rows),
        carried(&whole),
        "the window size changes no column"
    );

    // stdin cannot be read ahead: a key the first window lacks is refused, naming line and key.
    let data = lines.join("\n") + "\n";
    let (code, _, err) = score_stdin("-", &["--window-rows", "2"], Some(data.as_bytes()));
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("<stdin>: line 3: field `source`: a key that is not among the columns")
            && err.contains("the first window (lines 1-2)"),
        "{err}"
    );
    // Under skip the row stays, unscored, with the reason; the others are scored.
    let (code, rows, err) = score_stdin(
        "-",
        &["--window-rows", "2", "--on-error", "skip"],
        Some(data.as_bytes()),
    );
    assert_eq!(code, Some(3), "{err}");
    let status: Vec<&str> = rows.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(status, ["ok", "ok", "error", "error"]);
    assert!(rows[2]["error"]
        .as_str()
        .unwrap()
        .contains("line 3: field `source`"));
    assert!(rows[3]["error"]
        .as_str()
        .unwrap()
        .contains("line 4: field `messages`"));
}

#[test]
fn a_late_key_inside_a_message_or_a_value_of_another_type_is_carried_or_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = |extra: &str| {
        format!(
            r#"{{"tag": {extra}, "messages": [{{"role": "user", "content": "Hi"}}, {{"role": "assistant", "content": "Hello!"}}]}}"#
        )
    };
    let nested = m("null").replace(r#""content": "Hi""#, r#""content": "Hi", "name": "ann""#);
    for (line2, field, why, carried) in [
        (
            nested.as_str(),
            "messages[0].name",
            "a key that is not among the columns",
            "ann",
        ),
        (
            &m("\"x\""),
            "tag",
            "a string where the column holds only nulls",
            "x",
        ),
        (
            &m("[\"y\"]"),
            "tag",
            "an array where the column holds only nulls",
            "y",
        ),
    ] {
        let lines = [m("null"), line2.to_string()];
        let input = write_lines(dir.path(), "nested.jsonl", &[&lines[0], &lines[1]]);
        let (code, rows, err) = score(&input, &["--window-rows", "1"]);
        assert_eq!(code, Some(0), "{err}");
        let text = rows[1].to_string();
        assert!(
            text.contains(&format!("\"{carried}\"")),
            "{field} not carried: {text}"
        );
        let data = lines.join("\n") + "\n";
        let (code, _, err) = score_stdin("-", &["--window-rows", "1"], Some(data.as_bytes()));
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains(&format!("<stdin>: line 2: field `{field}`: {why}")),
            "{err}"
        );
    }
    // Types no column can hold together (a number, then a list): the line that does not fit is named.
    let input = write_lines(dir.path(), "clash.jsonl", &[&m("5"), &m("[1]")]);
    let (code, _, err) = score(&input, &["--window-rows", "1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("clash.jsonl: line 2: field `tag`: an array where the column holds i64"),
        "{err}"
    );
}

#[test]
fn duplicate_keys_are_bad_input_naming_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"prompt": "Hi", "response": "Hello!"}"#;
    for (line, key) in [
        (
            r#"{"prompt": "a", "prompt": "b", "response": "c"}"#,
            "prompt",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "content": "c"}]}"#,
            "content",
        ),
        (
            r#"{"prompt": "a", "response": "c", "meta": {"k": 1, "k": 2}}"#,
            "k",
        ),
    ] {
        let input = write_lines(dir.path(), "dup.jsonl", &[good, line]);
        let (code, _, err) = score(&input, &[]);
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains(&format!("dup.jsonl: line 2: field `{key}`: appears twice")),
            "{err}"
        );
        let (code, rows, err) = score(&input, &["--on-error", "skip"]);
        assert_eq!(code, Some(3), "{err}");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["status"], "error");
    }
}

#[test]
fn a_byte_order_mark_starts_a_file_or_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let body = "{\"id\": \"a\", \"prompt\": \"Hi\", \"response\": \"Hello!\"}\n{\"id\": \"b\", \"prompt\": \"?\", \"response\": \"!\"}\n";
    let plain = dir.path().join("plain.jsonl");
    std::fs::write(&plain, body).unwrap();
    let bom = dir.path().join("bom.jsonl");
    std::fs::write(&bom, format!("\u{feff}{body}")).unwrap();
    let (code, want, err) = score(&plain, &[]);
    assert_eq!(code, Some(0), "{err}");
    let (code, got, err) = score(&bom, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(got, want);
    assert_eq!(got[0]["id"], "a", "the first key is `id`, not BOM + `id`");
    let stdin = format!("\u{feff}{body}");
    let (code, got, err) = score_stdin("-", &[], Some(stdin.as_bytes()));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(got, want);
    // Only at the start: elsewhere it is not JSON.
    let late = dir.path().join("late-bom.jsonl");
    std::fs::write(
        &late,
        body.replace("\n{\"id\": \"b\"", "\n\u{feff}{\"id\": \"b\""),
    )
    .unwrap();
    let (code, _, err) = score(&late, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("late-bom.jsonl: line 2: malformed JSON"),
        "{err}"
    );
}

fn write_parquet(path: &Path, jsonl: &str) {
    let mut df = JsonReader::new(std::io::Cursor::new(jsonl.as_bytes().to_vec()))
        .with_json_format(JsonFormat::JsonLines)
        .finish()
        .unwrap();
    ParquetWriter::new(File::create(path).unwrap())
        .finish(&mut df)
        .unwrap();
}

#[test]
fn an_input_column_named_like_an_output_column_is_refused_before_scoring() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        r#"{"id": "a", "prompt": "Hi", "response": "Hello!", "score": 7, "status": "new"}"#,
        r#"{"id": "b", "prompt": "?", "response": "!", "score": 8, "status": "old"}"#,
    ];
    let jsonl = write_lines(dir.path(), "clash.jsonl", &lines);
    let parquet = dir.path().join("clash.parquet");
    write_parquet(&parquet, &(lines.join("\n") + "\n"));
    for input in [&jsonl, &parquet] {
        let name = input.file_name().unwrap().to_str().unwrap();
        // --max-length 3 makes every row too long: the clash is found before any row is even encoded.
        let (code, _, err) = score(input, &["--max-length", "3"]);
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains(&format!(
                "{name}: field `score`: armorm writes a column of this name"
            )) && err.contains("--rename-input-columns"),
            "{err}"
        );
        // `status` is armorm's only when it writes status columns.
        let (code, _, err) = score(input, &["--on-error", "skip", "--rename-input-columns"]);
        assert_eq!(code, Some(0), "{err}");
        let (code, rows, err) = score(input, &["--rename-input-columns"]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(rows[1]["input_score"], 8);
        assert_eq!(rows[1]["status"], "old");
        assert!(rows[1]["score"].is_f64());
        let (code, rows, err) = score(
            input,
            &[
                "--rename-input-columns",
                "--on-error",
                "skip",
                "--top-k",
                "2",
            ],
        );
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(rows[0]["input_status"], "new");
        assert_eq!(rows[0]["status"], "ok");
        assert_eq!(rows[0]["top_attributes"].as_array().unwrap().len(), 2);
    }
    let top = write_lines(
        dir.path(),
        "top.jsonl",
        &[r#"{"prompt": "Hi", "response": "Hello!", "top_attributes": []}"#],
    );
    let (code, _, err) = score(&top, &["--top-k", "2"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("field `top_attributes`"), "{err}");
}

/// `peak memory N MiB` from the summary line (Linux).
fn peak_mib(stderr: &str) -> Option<u64> {
    let at = stderr.find("peak memory ")?;
    stderr[at + "peak memory ".len()..]
        .split(' ')
        .next()?
        .parse()
        .ok()
}

#[test]
fn a_huge_line_is_refused_by_its_length_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mb: u64 = 64;
    let huge = dir.path().join("huge.jsonl");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(File::create(&huge).unwrap());
        writeln!(f, r#"{{"id": "a", "prompt": "Hi", "response": "Hello!"}}"#).unwrap();
        write!(f, r#"{{"id": "b", "prompt": "Hi", "response": ""#).unwrap();
        let piece = "words and more words ".repeat(1 << 10);
        for _ in 0..((mb as usize) << 20) / piece.len() {
            f.write_all(piece.as_bytes()).unwrap();
        }
        writeln!(f, "\"}}").unwrap();
        writeln!(f, r#"{{"id": "c", "prompt": "?", "response": "!"}}"#).unwrap();
    }
    let start = std::time::Instant::now();
    let (code, _, err) = score(&huge, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("huge.jsonl: line 2: the conversation is at least")
            && err.contains("over --max-length 8192"),
        "{err}"
    );
    // Under skip the summary line reports the peak; compare it with a run of three small rows.
    let (code, rows, err) = score(&huge, &["--on-error", "skip"]);
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[1]["status"], "too_long");
    assert_eq!(rows[2]["status"], "ok");
    let small = write_lines(
        dir.path(),
        "small.jsonl",
        &[r#"{"prompt": "Hi", "response": "Hello!"}"#; 3],
    );
    let (_, _, small_err) = score(&small, &["--on-error", "skip"]);
    if let (Some(peak), Some(base)) = (peak_mib(&err), peak_mib(&small_err)) {
        // Reading, parsing and carrying the line take a few copies of it; tokenizing it took gigabytes.
        assert!(
            peak < base + 8 * mb,
            "peak {peak} MiB for a {mb} MiB line (small run: {base} MiB)"
        );
    }
    assert!(start.elapsed().as_secs() < 60, "{:?}", start.elapsed());
}

#[test]
fn a_line_over_max_line_bytes_is_read_past_not_held() {
    let dir = tempfile::tempdir().unwrap();
    let long = format!(
        r#"{{"id": "b", "prompt": "Hi", "response": "{}"}}"#,
        "x".repeat(300_000)
    );
    let lines = [
        r#"{"id": "a", "prompt": "Hi", "response": "Hello!"}"#,
        long.as_str(),
        r#"{"id": "c", "prompt": "?", "response": "!"}"#,
    ];
    let input = write_lines(dir.path(), "long.jsonl", &lines);
    let (code, _, err) = score(&input, &["--max-line-bytes", "100000"]);
    assert_eq!(code, Some(1), "{err}");
    let n = long.len();
    assert!(
        err.contains(&format!(
            "long.jsonl: line 2: the line is {n} bytes, over --max-line-bytes 100000"
        )),
        "{err}"
    );
    let (code, rows, err) = score(
        &input,
        &["--max-line-bytes", "100000", "--on-error", "skip"],
    );
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(rows.len(), 3);
    let status: Vec<&str> = rows.iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(status, ["ok", "error", "ok"]);
    assert_eq!(rows[2]["id"], "c", "the line after it is read whole");
    // A line exactly at the limit (its newline not counted) is read.
    let exact = lines[0].len();
    let (code, rows, err) = score(
        &input,
        &["--max-line-bytes", &exact.to_string(), "--on-error", "skip"],
    );
    assert_eq!(code, Some(3), "{err}");
    assert_eq!(rows[0]["status"], "ok");
}

#[test]
fn a_null_messages_cell_falls_back_on_prompt_and_response_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let text = [
        r#"{"id": "m", "prompt": null, "response": null, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#,
        r#"{"id": "p", "prompt": "Hi", "response": "Hello!", "messages": null}"#,
        r#"{"id": "q", "prompt": "?", "response": "!", "messages": null}"#,
    ];
    let jsonl = write_lines(dir.path(), "mixed.jsonl", &text);
    let parquet = dir.path().join("mixed.parquet");
    write_parquet(&parquet, &(text.join("\n") + "\n"));
    let (code, from_jsonl, err) = score(&jsonl, &[]);
    assert_eq!(code, Some(0), "{err}");
    let (code, from_parquet, err) = score(&parquet, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(scores(&from_parquet), scores(&from_jsonl));
    let g = goldens(TINY);
    for (row, golden) in [(0, "short"), (1, "short"), (2, "single-char")] {
        let got = from_parquet[row]["score"].as_f64().unwrap() as f32;
        assert!((got - g[golden].score).abs() < 1e-4, "row {row}: {got}");
    }
    // Nothing to fall back on: the same refusal in both formats, naming the row.
    let bare = [
        r#"{"id": "p", "prompt": "Hi", "response": "Hello!", "messages": null}"#,
        r#"{"id": "n", "prompt": null, "response": "x", "messages": null}"#,
    ];
    let jsonl = write_lines(dir.path(), "bare.jsonl", &bare);
    let parquet = dir.path().join("bare.parquet");
    write_parquet(&parquet, &(bare.join("\n") + "\n"));
    let (code, _, err) = score(&jsonl, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("bare.jsonl: line 2: field `prompt`"), "{err}");
    let (code, _, err) = score(&parquet, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("bare.parquet: row 2: field `prompt`: null"),
        "{err}"
    );
}
