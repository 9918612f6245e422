//! Property tests (bounded, they run in CI): the input readers, the template/gating step and the whole
//! CLI never panic on structured rows of random shapes, and whatever they accept satisfies the gating
//! invariants.

use std::io::Cursor;
use std::sync::LazyLock;

use armorm::chat::Message;
use armorm::encoder::Encoder;
use armorm::input::{conversation_from_json, ChunkSource, ColumnNames, JsonlSource};
use proptest::prelude::*;
use serde_json::{json, Value};

use crate::common::{armorm_stdin, model_dir, TINY};

static ENCODER: LazyLock<Encoder> =
    LazyLock::new(|| Encoder::from_dir(&model_dir(TINY), 128256).unwrap());

/// Text mixing plain words, whitespace, unicode, and the special-token strings that can confuse a
/// tokenizer or a gate search.
fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-zA-Z0-9 .,?!]{0,12}",
        Just("<|eot_id|>".to_string()),
        Just("<|start_header_id|>assistant<|end_header_id|>\n\n".to_string()),
        Just("<|begin_of_text|>".to_string()),
        Just("[PAD]".to_string()),
        Just(" \t\n\u{1f}\u{a0}".to_string()),
        "\\PC{0,4}",
    ];
    proptest::collection::vec(piece, 0..6).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn gate_is_the_templates_last_header(prompt in text(), response in text(), system in proptest::option::of(text())) {
        let mut msgs = Vec::new();
        if let Some(s) = system {
            msgs.push(Message::new("system", &s));
        }
        msgs.push(Message::new("user", &prompt));
        msgs.push(Message::new("assistant", &response));
        // An error (e.g. a [PAD] with no embedding) is fine; a panic or a gate past the header is not.
        if let Ok(enc) = ENCODER.encode(&msgs) {
            // The length bound that refuses huge rows before tokenizing never exceeds the real count.
            prop_assert!(ENCODER.min_tokens(&msgs) <= enc.ids.len());
            let p = ENCODER.gating_pattern();
            prop_assert!(enc.gate + p.len() <= enc.ids.len());
            prop_assert_eq!(&enc.ids[enc.gate..enc.gate + p.len()], p);
            // Same gate with a harmless response: the response cannot move it.
            msgs.last_mut().unwrap().content = "ok".into();
            let plain = ENCODER.encode(&msgs).unwrap();
            prop_assert_eq!(plain.gate, enc.gate);
        }
    }

    /// Text made of whole vocabulary tokens, the densest there is, never has fewer tokens than the
    /// length bound says.
    #[test]
    fn length_bound_is_a_lower_bound(ids in proptest::collection::vec(0u32..128000, 1..64), copies in 1usize..40) {
        static TOKENIZER: LazyLock<tokenizers::Tokenizer> = LazyLock::new(|| {
            tokenizers::Tokenizer::from_file(model_dir(TINY).join("tokenizer.json")).unwrap()
        });
        let piece = TOKENIZER.decode(&ids, false).unwrap();
        let msgs = [Message::new("user", "q"), Message::new("assistant", &piece.repeat(copies))];
        if let Ok(enc) = ENCODER.encode(&msgs) {
            let bound = ENCODER.min_tokens(&msgs);
            prop_assert!(bound <= enc.ids.len(), "bound {} > {} tokens", bound, enc.ids.len());
        }
    }

    #[test]
    fn json_rows_never_panic(row in row()) {
        let _ = conversation_from_json(&row, &ColumnNames::default());
    }

    #[test]
    fn jsonl_reader_names_a_line_or_reads(lines in proptest::collection::vec(line(), 0..8)) {
        let data = lines.join("\n");
        let mut src = JsonlSource::new(Cursor::new(data.into_bytes()), "f.jsonl", &ColumnNames::default(), 3);
        loop {
            match src.next_chunk() {
                Ok(Some(chunk)) => prop_assert_eq!(chunk.frame.height(), chunk.conversations.len()),
                Ok(None) => break,
                Err(e) => {
                    prop_assert!(e.to_string().starts_with("f.jsonl: line"), "{}", e);
                    break;
                }
            }
        }
    }
}

proptest! {
    // Each case runs the binary twice: few cases, so that CI time hardly grows.
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    /// The whole CLI on structured rows: no panic; under fail, exit 0 with every row or exit 1 naming a
    /// line; under skip, exit 0 or 3 with every row, scored or with the reason why not.
    #[test]
    fn score_never_panics_and_keeps_every_row_under_skip(
        lines in proptest::collection::vec(line(), 1..10),
        from_file in any::<bool>(),
    ) {
        let data = lines.join("\n") + "\n";
        let rows = lines.iter().filter(|l| !l.trim().is_empty()).count();
        let model = model_dir(TINY);
        // A file is read ahead for its columns, stdin is not: both paths.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.jsonl");
        std::fs::write(&file, &data).unwrap();
        let (input, place) = if from_file {
            (file.to_str().unwrap(), "f.jsonl: line ")
        } else {
            ("-", "<stdin>: line ")
        };
        let run = |extra: &[&str]| {
            let mut args = vec!["score", input, "--model", model.to_str().unwrap(), "-o", "-", "--device", "cpu", "--window-rows", "3"];
            args.extend_from_slice(extra);
            armorm_stdin(&args, (!from_file).then_some(data.as_bytes()))
        };
        let out = run(&[]);
        let err = String::from_utf8_lossy(&out.stderr);
        prop_assert!(!err.contains("panicked"), "{}", err);
        match out.status.code() {
            Some(0) => prop_assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), rows),
            Some(1) => prop_assert!(err.contains(place), "{}", err),
            code => prop_assert!(false, "exit {:?}: {}", code, err),
        }
        let out = run(&["--on-error", "skip"]);
        let err = String::from_utf8_lossy(&out.stderr);
        prop_assert!(matches!(out.status.code(), Some(0 | 3)), "exit {:?}: {}", out.status.code(), err);
        let text = String::from_utf8_lossy(&out.stdout);
        let written: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        prop_assert_eq!(written.len(), rows, "{}", err);
        for w in &written {
            let status = w["status"].as_str().unwrap_or("?");
            let scored = w["score"].is_f64();
            prop_assert!(
                (status == "ok") == scored && (scored || w["error"].as_str().is_some_and(|e| !e.is_empty())),
                "{}", w
            );
        }
    }
}

/// Text, sometimes of the wrong type, for a prompt, a response or a message's content.
fn content() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => text().prop_map(Value::String),
        1 => Just(Value::String(String::new())),
        1 => Just(Value::Null),
        1 => any::<i64>().prop_map(Value::from),
        1 => Just(json!([["nested", ["list"]]])),
        1 => Just(json!({"text": "an object"})),
    ]
}

fn message() -> impl Strategy<Value = Value> {
    let role = prop_oneof![
        4 => Just(json!("user")),
        4 => Just(json!("assistant")),
        1 => Just(json!("system")),
        1 => Just(json!("robot")),
        1 => Just(json!(3)),
    ];
    prop_oneof![
        8 => (role, content()).prop_map(|(r, c)| json!({"role": r, "content": c})),
        1 => content().prop_map(|c| json!({"content": c})),
        1 => (content(), "[a-z]{1,6}").prop_map(|(c, k)| json!({"role": "user", "content": c, k: "extra"})),
        1 => text().prop_map(Value::String),
    ]
}

/// A list of messages that usually makes a conversation, or something else in its place.
fn messages() -> impl Strategy<Value = Value> {
    let turn = (text(), text()).prop_map(|(q, a)| {
        vec![
            json!({"role": "user", "content": q}),
            json!({"role": "assistant", "content": a}),
        ]
    });
    prop_oneof![
        4 => proptest::collection::vec(turn, 1..3).prop_map(|t| Value::Array(t.concat())),
        3 => proptest::collection::vec(message(), 0..4).prop_map(Value::Array),
        1 => Just(json!([[{"role": "user", "content": "q"}]])),
        1 => content(),
    ]
}

/// An object with prompt/response/messages of random shapes (any may be missing) and extra keys.
fn row() -> impl Strategy<Value = Value> {
    let extra = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i32>().prop_map(Value::from),
        text().prop_map(Value::String),
        Just(json!([1, 2])),
        Just(json!({"k": "v"})),
    ];
    (
        proptest::option::weighted(0.8, content()),
        proptest::option::weighted(0.8, content()),
        proptest::option::weighted(0.3, messages()),
        proptest::option::of((prop_oneof![Just("id"), Just("meta"), Just("tags")], extra)),
    )
        .prop_map(|(p, r, m, x)| {
            let mut obj = serde_json::Map::new();
            for (k, v) in [("prompt", p), ("response", r), ("messages", m)] {
                if let Some(v) = v {
                    obj.insert(k.to_string(), v);
                }
            }
            if let Some((k, v)) = x {
                obj.insert(k.to_string(), v);
            }
            Value::Object(obj)
        })
}

/// A JSONL line: mostly a structured row, sometimes not an object, a duplicate key, blank or cut short.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => row().prop_map(|v| v.to_string()),
        1 => Just(r#"[{"prompt": "a", "response": "b"}]"#.to_string()),
        1 => Just("42".to_string()),
        1 => Just(r#"{"prompt": "a", "prompt": "b", "response": "c"}"#.to_string()),
        1 => Just(String::new()),
        1 => row().prop_map(|v| {
            let s = v.to_string();
            s.chars().take(s.chars().count() / 2).collect()
        }),
    ]
}
