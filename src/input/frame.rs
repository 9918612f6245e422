//! Polars frame to conversation: a Parquet chunk's `messages` list column, or its `prompt` and
//! `response` string columns, row by row.

use polars::prelude::*;

use super::{ColumnNames, FieldError, FieldResult, InputError, Location, RowInput};
use crate::chat::{check_conversation, Message};

/// The conversations of a Parquet chunk: a `messages` list<struct{role, content}> column, or string
/// `prompt` and `response` columns. A row whose `messages` cell is null falls back on `prompt` and
/// `response`, as a JSONL row whose `messages` is null or absent does.
pub fn conversations_from_frame(
    frame: &DataFrame,
    names: &ColumnNames,
    file: &str,
    locations: &[Location],
) -> Result<Vec<RowInput>, InputError> {
    let col_err = |name: &str, msg: String| InputError::new(file, Some(name), msg);
    let messages = match frame.column(&names.messages) {
        // A column of nulls only (as Parquet writers type one): no row has messages.
        Ok(col) if col.dtype() == &DataType::Null => None,
        Ok(col) => Some(col.list().map_err(|_| {
            col_err(
                &names.messages,
                format!(
                    "expected list<struct{{role, content}}>, got {}",
                    col.dtype()
                ),
            )
        })?),
        Err(_) => None,
    };
    let text_col = |name: &str| -> Result<&StringChunked, InputError> {
        let col = frame.column(name).map_err(|_| {
            col_err(
                name,
                format!(
                    "no such column: the file needs `{}` + `{}` or `{}` (see --prompt-column etc.)",
                    names.prompt, names.response, names.messages
                ),
            )
        })?;
        col.str().map_err(|_| {
            col_err(
                name,
                format!("expected a string column, got {}", col.dtype()),
            )
        })
    };
    let texts = text_col(&names.prompt).and_then(|p| Ok((p, text_col(&names.response)?)));
    if messages.is_none() {
        texts.clone()?;
    }
    Ok((0..frame.height())
        .map(|i| -> RowInput {
            let here = &locations[i];
            if let Some(series) = messages.and_then(|list| list.get_as_series(i)) {
                let messages = messages_from_series(&series, &names.messages)
                    .map_err(|e| InputError::new(here, e.field.as_deref(), e.message))?;
                check_conversation(&messages)
                    .map_err(|m| InputError::new(here, Some(&names.messages), m))?;
                return Ok(messages);
            }
            let (prompts, responses) = texts.clone().map_err(|e| {
                InputError::new(
                    here,
                    Some(&names.messages),
                    format!(
                        "null, and the row cannot fall back on `{}` + `{}`: `{}`: {}",
                        names.prompt,
                        names.response,
                        e.field.unwrap_or_default(),
                        e.message
                    ),
                )
            })?;
            let get = |ca: &StringChunked, name: &str| match ca.get(i) {
                None => Err(InputError::new(here, Some(name), "null")),
                Some(t) if t.trim().is_empty() => Err(InputError::new(
                    here,
                    Some(name),
                    "empty (nothing to score)",
                )),
                Some(t) => Ok(t.to_string()),
            };
            Ok(vec![
                Message::new("user", &get(prompts, &names.prompt)?),
                Message::new("assistant", &get(responses, &names.response)?),
            ])
        })
        .collect())
}

pub fn messages_from_series(series: &Series, field: &str) -> FieldResult<Vec<Message>> {
    let bad = |msg: String| FieldError::at(field, msg);
    let st = series.struct_().map_err(|_| {
        bad(format!(
            "expected list<struct{{role, content}}>, got list<{}>",
            series.dtype()
        ))
    })?;
    let part = |key: &str| -> FieldResult<StringChunked> {
        let s = st
            .field_by_name(key)
            .map_err(|_| bad(format!("messages have no `{key}` field")))?;
        s.str()
            .cloned()
            .map_err(|_| bad(format!("`{key}` must be a string, got {}", s.dtype())))
    };
    let (roles, contents) = (part("role")?, part("content")?);
    (0..series.len())
        .map(|i| {
            let get = |ca: &StringChunked, key: &str| {
                ca.get(i)
                    .map(str::to_string)
                    .ok_or_else(|| FieldError::at(format!("{field}[{i}].{key}"), "null"))
            };
            Ok(Message {
                role: get(&roles, "role")?,
                content: get(&contents, "content")?,
            })
        })
        .collect()
}
