//! JSON to conversation: one JSONL line parsed (a repeated key refused) and its `messages`, or
//! `prompt` + `response`, read as messages.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::ColumnNames;
use crate::chat::{check_conversation, Message};

/// How a JSON value is named in messages: "a string", "an array", ...
pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses one JSON line, refusing an object that has a key twice (at any depth): serde_json keeps the
/// last and polars may keep another, so the scored text and the carried text could differ.
pub fn parse_json(text: &str) -> FieldResult<Value> {
    let duplicate = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = NoDuplicates(&duplicate)
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
    match (parsed, duplicate.into_inner()) {
        (_, Some(key)) => Err(FieldError::at(
            key,
            "appears twice in one object (JSON readers differ on which one they keep)",
        )),
        (Ok(v), None) => Ok(v),
        (Err(e), None) => Err(FieldError::whole(format!("malformed JSON: {e}"))),
    }
}

/// serde_json's `Value`, built the same way, except that a repeated key is an error (and noted).
struct NoDuplicates<'a>(&'a RefCell<Option<String>>);

impl<'de> DeserializeSeed<'de> for NoDuplicates<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoDuplicates<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(NoDuplicates(self.0))? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(NoDuplicates(self.0))?;
            match obj.entry(key) {
                serde_json::map::Entry::Vacant(slot) => {
                    slot.insert(value);
                }
                serde_json::map::Entry::Occupied(slot) => {
                    *self.0.borrow_mut() = Some(slot.key().clone());
                    return Err(de::Error::custom("duplicate key"));
                }
            }
        }
        Ok(Value::Object(obj))
    }
}

/// Why a value cannot be read: the field at fault, when one is, and the reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{message}", .field.as_ref().map(|f| format!("field `{f}`: ")).unwrap_or_default())]
pub struct FieldError {
    pub field: Option<String>,
    pub message: String,
}

impl FieldError {
    pub fn at(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// About the value as a whole.
    pub fn whole(message: impl Into<String>) -> Self {
        Self {
            field: None,
            message: message.into(),
        }
    }
}

/// A value or why it cannot be read.
pub type FieldResult<T> = Result<T, FieldError>;

/// A JSON row's conversation: `messages`, or `prompt` + `response`.
pub fn conversation_from_json(value: &Value, names: &ColumnNames) -> FieldResult<Vec<Message>> {
    let Value::Object(obj) = value else {
        return Err(FieldError::whole(format!(
            "expected a JSON object, got {}",
            kind(value)
        )));
    };
    if let Some(messages) = obj.get(&names.messages).filter(|v| !v.is_null()) {
        let messages = messages_from_json(messages, &names.messages)?;
        check_conversation(&messages).map_err(|m| FieldError::at(&names.messages, m))?;
        return Ok(messages);
    }
    if !obj.contains_key(&names.prompt) && !obj.contains_key(&names.response) {
        return Err(FieldError::whole(format!(
            "the row has neither `{}` + `{}` nor `{}`",
            names.prompt, names.response, names.messages
        )));
    }
    let text = |name: &str| -> FieldResult<String> {
        match obj.get(name) {
            Some(Value::String(s)) if s.trim().is_empty() => {
                Err(FieldError::at(name, "empty (nothing to score)"))
            }
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(FieldError::at(
                name,
                format!("expected a string, got {}", kind(v)),
            )),
            None => Err(FieldError::at(name, "missing")),
        }
    };
    Ok(vec![
        Message::new("user", &text(&names.prompt)?),
        Message::new("assistant", &text(&names.response)?),
    ])
}

pub fn messages_from_json(value: &Value, field: &str) -> FieldResult<Vec<Message>> {
    let Value::Array(items) = value else {
        return Err(FieldError::at(
            field,
            format!("expected a list of messages, got {}", kind(value)),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let get = |key: &str| -> FieldResult<String> {
            let here = format!("{field}[{i}].{key}");
            match item.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(v) => Err(FieldError::at(
                    here,
                    format!("expected a string, got {}", kind(v)),
                )),
                None if item.is_object() => Err(FieldError::at(here, "missing")),
                None => Err(FieldError::at(
                    format!("{field}[{i}]"),
                    format!("expected a {{role, content}} object, got {}", kind(item)),
                )),
            }
        };
        out.push(Message {
            role: get("role")?,
            content: get("content")?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error as (field, reason), as the assertions read it.
    fn conv(json: &str) -> Result<Vec<Message>, (Option<String>, String)> {
        conversation_from_json(
            &serde_json::from_str(json).unwrap(),
            &ColumnNames::default(),
        )
        .map_err(|e| (e.field, e.message))
    }

    fn parse_json(text: &str) -> Result<Value, (Option<String>, String)> {
        super::parse_json(text).map_err(|e| (e.field, e.message))
    }

    #[test]
    fn json_rows() {
        assert_eq!(
            conv(r#"{"prompt": "q", "response": "r", "id": 3}"#).unwrap(),
            vec![Message::new("user", "q"), Message::new("assistant", "r")]
        );
        let m = conv(
            r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}"#,
        );
        assert_eq!(m.unwrap().len(), 2);
        let e = conv(
            r#"{"messages": [{"role": "assistant", "content": "r"}, {"role": "user", "content": "q"}]}"#,
        );
        assert_eq!(e.unwrap_err().0.as_deref(), Some("messages"));
        assert_eq!(
            conv(r#"[1]"#).unwrap_err().1,
            "expected a JSON object, got an array"
        );
        assert_eq!(
            conv(r#"{"prompt": 1, "response": "r"}"#).unwrap_err(),
            (
                Some("prompt".into()),
                "expected a string, got a number".into()
            )
        );
        assert_eq!(
            conv(r#"{"prompt": "q"}"#).unwrap_err().0.as_deref(),
            Some("response")
        );
        assert!(conv(r#"{"id": 1}"#).unwrap_err().1.contains("neither"));
        let e = conv(r#"{"messages": [{"role": "user", "content": null}]}"#).unwrap_err();
        assert_eq!(e.0.as_deref(), Some("messages[0].content"));
        let e = conv(r#"{"messages": ["hi"]}"#).unwrap_err();
        assert_eq!(e.0.as_deref(), Some("messages[0]"));
    }

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        assert_eq!(
            parse_json(r#"{"a": 1, "b": {"c": [1, {"d": 2}]}}"#).unwrap(),
            serde_json::json!({"a": 1, "b": {"c": [1, {"d": 2}]}})
        );
        for (text, key) in [
            (r#"{"a": 1, "a": 1}"#, "a"),
            (r#"{"a": [{"b": 1, "b": 2}]}"#, "b"),
        ] {
            assert_eq!(parse_json(text).unwrap_err().0.as_deref(), Some(key));
        }
        assert!(parse_json(r#"{"a": 1} x"#)
            .unwrap_err()
            .1
            .starts_with("malformed JSON"));
    }
}
