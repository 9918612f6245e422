//! Property tests (bounded, they run in CI): the input readers and the template/gating step never
//! panic, and whatever they accept satisfies the gating invariants.

use std::io::Cursor;
use std::sync::LazyLock;

use armorm::chat::Message;
use armorm::encoder::Encoder;
use armorm::input::{conversation_from_json, ChunkSource, ColumnNames, JsonlSource};
use proptest::prelude::*;

use crate::common::{model_dir, TINY};

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
            let p = ENCODER.gating_pattern();
            prop_assert!(enc.gate + p.len() <= enc.ids.len());
            prop_assert_eq!(&enc.ids[enc.gate..enc.gate + p.len()], p);
            // Same gate with a harmless response: the response cannot move it.
            msgs.last_mut().unwrap().content = "ok".into();
            let plain = ENCODER.encode(&msgs).unwrap();
            prop_assert_eq!(plain.gate, enc.gate);
        }
    }

    #[test]
    fn json_rows_never_panic(line in "\\PC{0,60}") {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            let _ = conversation_from_json(&v, &ColumnNames::default());
        }
    }

    #[test]
    fn jsonl_reader_names_a_line_or_reads(lines in proptest::collection::vec(prop_oneof![
        Just(r#"{"prompt": "a", "response": "b"}"#.to_string()),
        Just(r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}"#.to_string()),
        Just(r#"{"prompt": 1}"#.to_string()),
        Just("".to_string()),
        "\\PC{0,20}",
    ], 0..8)) {
        let data = lines.join("\n");
        let mut src = JsonlSource::new(Cursor::new(data.into_bytes()), "f.jsonl", &ColumnNames::default(), 3);
        loop {
            match src.next_chunk() {
                Ok(Some(chunk)) => prop_assert_eq!(chunk.frame.height(), chunk.conversations.len()),
                Ok(None) => break,
                Err(e) => {
                    prop_assert!(e.to_string().starts_with("f.jsonl"), "{}", e);
                    break;
                }
            }
        }
    }
}
