//! Input datasets: JSONL (files or stdin) and Parquet, read in chunks of rows with their locations.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Cursor};
use std::path::Path;

use polars::prelude::*;
use serde_json::Value;

use crate::chat::{check_conversation, Message};

/// Which columns hold the conversation.
#[derive(Debug, Clone)]
pub struct ColumnNames {
    pub prompt: String,
    pub response: String,
    pub messages: String,
}

impl Default for ColumnNames {
    fn default() -> Self {
        Self {
            prompt: "prompt".into(),
            response: "response".into(),
            messages: "messages".into(),
        }
    }
}

/// Where a row came from: a JSONL line or a Parquet row, both counted from 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Line { file: String, line: usize },
    Row { file: String, row: usize },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line { file, line } => write!(f, "{file}: line {line}"),
            Location::Row { file, row } => write!(f, "{file}: row {row}"),
        }
    }
}

/// Bad input: where, which field, and why.
#[derive(Debug, Clone, thiserror::Error)]
pub struct InputError {
    pub location: String,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: field `{field}`: {}", self.location, self.message),
            None => write!(f, "{}: {}", self.location, self.message),
        }
    }
}

impl InputError {
    pub fn new(location: impl ToString, field: Option<&str>, message: impl ToString) -> Self {
        Self {
            location: location.to_string(),
            field: field.map(str::to_string),
            message: message.to_string(),
        }
    }
}

/// A row's conversation, or why it has none (kept only when bad rows are skipped).
pub type RowInput = Result<Vec<Message>, InputError>;

/// A slice of the dataset: the input's own columns and the conversation of each row.
pub struct Chunk {
    pub frame: DataFrame,
    pub conversations: Vec<RowInput>,
    pub locations: Vec<Location>,
}

impl Chunk {
    /// The rows for which `keep` holds, by position in the chunk.
    pub fn retain(self, keep: impl Fn(usize) -> bool) -> Result<Chunk, InputError> {
        let mask: Vec<bool> = (0..self.conversations.len()).map(&keep).collect();
        if mask.iter().all(|&k| k) {
            return Ok(self);
        }
        let frame = self
            .frame
            .filter(&BooleanChunked::from_slice("keep".into(), &mask))
            .map_err(|e| InputError::new("input", None, e))?;
        let pick = |i: &usize| mask[*i];
        let conversations = self
            .conversations
            .into_iter()
            .enumerate()
            .filter(|(i, _)| pick(i))
            .map(|(_, c)| c)
            .collect();
        let locations = self
            .locations
            .into_iter()
            .enumerate()
            .filter(|(i, _)| pick(i))
            .map(|(_, l)| l)
            .collect();
        Ok(Chunk {
            frame,
            conversations,
            locations,
        })
    }
}

pub trait ChunkSource {
    fn next_chunk(&mut self) -> Result<Option<Chunk>, InputError>;

    /// How much of the input has been read, from 0 to 1, when its size is known.
    fn fraction_read(&self) -> Option<f64> {
        None
    }
}

/// Opens `path` by its extension; `-` is JSONL on stdin.
/// `skip_bad`: a bad row becomes an `Err` entry of its chunk (its columns null) instead of an error.
pub fn open(
    path: &str,
    names: &ColumnNames,
    chunk_rows: usize,
    skip_bad: bool,
) -> Result<Box<dyn ChunkSource + Send>, InputError> {
    if path == "-" {
        let stdin = BufReader::new(std::io::stdin());
        let mut source = JsonlSource::new(stdin, "<stdin>", names, chunk_rows);
        source.skip_bad = skip_bad;
        return Ok(Box::new(source));
    }
    let ext = Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let file =
        File::open(path).map_err(|e| InputError::new(path, None, format!("cannot open: {e}")))?;
    match ext.as_str() {
        "jsonl" | "ndjson" | "json" => {
            let size = file.metadata().map(|m| m.len()).ok();
            let mut source = JsonlSource::new(BufReader::new(file), path, names, chunk_rows);
            source.total_bytes = size;
            source.skip_bad = skip_bad;
            Ok(Box::new(source))
        }
        "parquet" | "pq" => {
            let mut source = ParquetSource::new(file, path, names, chunk_rows)?;
            source.skip_bad = skip_bad;
            Ok(Box::new(source))
        }
        _ => Err(InputError::new(
            path,
            None,
            "unknown input format: expected .jsonl, .ndjson or .parquet (or - for JSONL on stdin)",
        )),
    }
}

/// JSONL, a chunk of lines at a time. Each line is checked with serde_json (for exact errors), and the
/// chunk's columns are then read by polars under the schema of the first chunk.
pub struct JsonlSource<R> {
    reader: R,
    file: String,
    line: usize,
    names: ColumnNames,
    chunk_rows: usize,
    schema: Option<SchemaRef>,
    done: bool,
    bytes_read: u64,
    total_bytes: Option<u64>,
    skip_bad: bool,
}

impl<R: BufRead> JsonlSource<R> {
    pub fn new(reader: R, file: &str, names: &ColumnNames, chunk_rows: usize) -> Self {
        Self {
            reader,
            file: file.to_string(),
            line: 0,
            names: names.clone(),
            chunk_rows: chunk_rows.max(1),
            schema: None,
            done: false,
            bytes_read: 0,
            total_bytes: None,
            skip_bad: false,
        }
    }

    fn here(&self) -> Location {
        Location::Line {
            file: self.file.clone(),
            line: self.line,
        }
    }
}

impl<R: BufRead> ChunkSource for JsonlSource<R> {
    fn next_chunk(&mut self) -> Result<Option<Chunk>, InputError> {
        let mut bytes = Vec::new();
        let mut conversations = Vec::new();
        let mut locations = Vec::new();
        let mut buf = Vec::new();
        while !self.done && conversations.len() < self.chunk_rows {
            buf.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| InputError::new(&self.file, None, format!("read error: {e}")))?;
            if n == 0 {
                self.done = true;
                break;
            }
            self.line += 1;
            self.bytes_read += n as u64;
            let text = match std::str::from_utf8(&buf) {
                Ok(t) => t,
                Err(e) => {
                    self.bad(
                        InputError::new(self.here(), None, format!("not valid UTF-8: {e}")),
                        &mut bytes,
                        &mut conversations,
                        &mut locations,
                    )?;
                    continue;
                }
            };
            if text.trim().is_empty() {
                continue;
            }
            let row = serde_json::from_str::<Value>(text)
                .map_err(|e| InputError::new(self.here(), None, format!("malformed JSON: {e}")))
                .and_then(|value| {
                    conversation_from_json(&value, &self.names)
                        .map_err(|(field, msg)| InputError::new(self.here(), field.as_deref(), msg))
                });
            match row {
                Ok(messages) => {
                    conversations.push(Ok(messages));
                    locations.push(self.here());
                    bytes.extend_from_slice(text.trim_end().as_bytes());
                    bytes.push(b'\n');
                }
                Err(e) => self.bad(e, &mut bytes, &mut conversations, &mut locations)?,
            }
        }
        if conversations.is_empty() {
            return Ok(None);
        }
        let frame = self.frame(&bytes, &locations)?;
        Ok(Some(Chunk {
            frame,
            conversations,
            locations,
        }))
    }

    fn fraction_read(&self) -> Option<f64> {
        self.total_bytes
            .filter(|&t| t > 0)
            .map(|t| (self.bytes_read as f64 / t as f64).min(1.0))
    }
}

impl<R: BufRead> JsonlSource<R> {
    /// A bad line: the error, or with `skip_bad` a row of nulls that carries it.
    fn bad(
        &self,
        e: InputError,
        bytes: &mut Vec<u8>,
        conversations: &mut Vec<RowInput>,
        locations: &mut Vec<Location>,
    ) -> Result<(), InputError> {
        if !self.skip_bad {
            return Err(e);
        }
        conversations.push(Err(e));
        locations.push(self.here());
        bytes.extend_from_slice(b"{}\n");
        Ok(())
    }

    fn frame(&mut self, bytes: &[u8], locations: &[Location]) -> Result<DataFrame, InputError> {
        let span = match (locations.first(), locations.last()) {
            (Some(Location::Line { line: a, .. }), Some(Location::Line { line: b, .. })) => {
                format!("{}: lines {a}-{b}", self.file)
            }
            _ => self.file.clone(),
        };
        let schema = match &self.schema {
            Some(s) => s.clone(),
            None => {
                let s = polars::io::ndjson::infer_schema(&mut Cursor::new(bytes), None).map_err(
                    |e| InputError::new(&span, None, format!("cannot infer columns: {e}")),
                )?;
                let s: SchemaRef = Arc::new(s);
                self.schema = Some(s.clone());
                s
            }
        };
        polars::io::ndjson::core::parse_ndjson(bytes, Some(locations.len()), &schema, false)
            .map_err(|e| {
                InputError::new(
                    &span,
                    None,
                    format!("values do not fit the column types of the first rows: {e}"),
                )
            })
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A value or (the field at fault, the reason).
pub type FieldResult<T> = Result<T, (Option<String>, String)>;

/// A JSON row's conversation: `messages`, or `prompt` + `response`.
pub fn conversation_from_json(value: &Value, names: &ColumnNames) -> FieldResult<Vec<Message>> {
    let Value::Object(obj) = value else {
        return Err((None, format!("expected a JSON object, got {}", kind(value))));
    };
    if let Some(messages) = obj.get(&names.messages).filter(|v| !v.is_null()) {
        let messages = messages_from_json(messages, &names.messages)?;
        check_conversation(&messages).map_err(|m| (Some(names.messages.clone()), m))?;
        return Ok(messages);
    }
    if !obj.contains_key(&names.prompt) && !obj.contains_key(&names.response) {
        return Err((
            None,
            format!(
                "the row has neither `{}` + `{}` nor `{}`",
                names.prompt, names.response, names.messages
            ),
        ));
    }
    let text = |name: &str| -> FieldResult<String> {
        match obj.get(name) {
            Some(Value::String(s)) if s.trim().is_empty() => Err((
                Some(name.to_string()),
                "empty (nothing to score)".to_string(),
            )),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err((
                Some(name.to_string()),
                format!("expected a string, got {}", kind(v)),
            )),
            None => Err((Some(name.to_string()), "missing".to_string())),
        }
    };
    Ok(vec![
        Message::new("user", &text(&names.prompt)?),
        Message::new("assistant", &text(&names.response)?),
    ])
}

pub fn messages_from_json(value: &Value, field: &str) -> FieldResult<Vec<Message>> {
    let Value::Array(items) = value else {
        return Err((
            Some(field.to_string()),
            format!("expected a list of messages, got {}", kind(value)),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let get = |key: &str| -> FieldResult<String> {
            let here = Some(format!("{field}[{i}].{key}"));
            match item.get(key) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(v) => Err((here, format!("expected a string, got {}", kind(v)))),
                None if item.is_object() => Err((here, "missing".to_string())),
                None => Err((
                    Some(format!("{field}[{i}]")),
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

/// Parquet, a slice of rows at a time.
pub struct ParquetSource {
    skip_bad: bool,
    file: File,
    path: String,
    names: ColumnNames,
    chunk_rows: usize,
    offset: usize,
    total: usize,
}

impl ParquetSource {
    fn new(
        file: File,
        path: &str,
        names: &ColumnNames,
        chunk_rows: usize,
    ) -> Result<Self, InputError> {
        let total = ParquetReader::new(
            file.try_clone()
                .map_err(|e| InputError::new(path, None, e))?,
        )
        .num_rows()
        .map_err(|e| InputError::new(path, None, format!("not a readable Parquet file: {e}")))?;
        Ok(Self {
            skip_bad: false,
            file,
            path: path.to_string(),
            names: names.clone(),
            chunk_rows: chunk_rows.max(1),
            offset: 0,
            total,
        })
    }
}

impl ChunkSource for ParquetSource {
    fn next_chunk(&mut self) -> Result<Option<Chunk>, InputError> {
        if self.offset >= self.total {
            return Ok(None);
        }
        let len = self.chunk_rows.min(self.total - self.offset);
        let file = self
            .file
            .try_clone()
            .map_err(|e| InputError::new(&self.path, None, e))?;
        let frame = ParquetReader::new(file)
            .with_slice(Some((self.offset, len)))
            .finish()
            .map_err(|e| {
                InputError::new(&self.path, None, format!("cannot read Parquet rows: {e}"))
            })?;
        let locations: Vec<Location> = (0..frame.height())
            .map(|i| Location::Row {
                file: self.path.clone(),
                row: self.offset + i + 1,
            })
            .collect();
        let conversations = conversations_from_frame(&frame, &self.names, &self.path, &locations)?;
        if !self.skip_bad {
            if let Some(Err(e)) = conversations.iter().find(|c| c.is_err()) {
                return Err(e.clone());
            }
        }
        self.offset += len;
        Ok(Some(Chunk {
            frame,
            conversations,
            locations,
        }))
    }

    fn fraction_read(&self) -> Option<f64> {
        (self.total > 0).then(|| self.offset as f64 / self.total as f64)
    }
}

impl ParquetSource {
    /// Rows in the file, from its metadata.
    pub fn rows(&self) -> usize {
        self.total
    }
}

/// The conversations of a Parquet chunk: a `messages` list<struct{role, content}> column, or string
/// `prompt` and `response` columns.
pub fn conversations_from_frame(
    frame: &DataFrame,
    names: &ColumnNames,
    file: &str,
    locations: &[Location],
) -> Result<Vec<RowInput>, InputError> {
    let col_err = |name: &str, msg: String| InputError::new(file, Some(name), msg);
    if let Ok(col) = frame.column(&names.messages) {
        let list = col.list().map_err(|_| {
            col_err(
                &names.messages,
                format!(
                    "expected list<struct{{role, content}}>, got {}",
                    col.dtype()
                ),
            )
        })?;
        return Ok((0..frame.height())
            .map(|i| -> RowInput {
                let series = list
                    .get_as_series(i)
                    .ok_or_else(|| InputError::new(&locations[i], Some(&names.messages), "null"))?;
                let messages = messages_from_series(&series, &names.messages)
                    .map_err(|(f, m)| InputError::new(&locations[i], f.as_deref(), m))?;
                check_conversation(&messages)
                    .map_err(|m| InputError::new(&locations[i], Some(&names.messages), m))?;
                Ok(messages)
            })
            .collect());
    }
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
    let prompts = text_col(&names.prompt)?;
    let responses = text_col(&names.response)?;
    Ok((0..frame.height())
        .map(|i| -> RowInput {
            let get = |ca: &StringChunked, name: &str| match ca.get(i) {
                None => Err(InputError::new(&locations[i], Some(name), "null")),
                Some(t) if t.trim().is_empty() => Err(InputError::new(
                    &locations[i],
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
    let bad = |msg: String| (Some(field.to_string()), msg);
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
                    .ok_or_else(|| (Some(format!("{field}[{i}].{key}")), "null".to_string()))
            };
            Ok(Message {
                role: get(&roles, "role")?,
                content: get(&contents, "content")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv(json: &str) -> FieldResult<Vec<Message>> {
        conversation_from_json(
            &serde_json::from_str(json).unwrap(),
            &ColumnNames::default(),
        )
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
    fn jsonl_chunks_keep_columns_and_line_numbers() {
        let data = "{\"id\": 1, \"prompt\": \"a\", \"response\": \"b\"}\n\n{\"id\": 2, \"prompt\": \"c\", \"response\": \"d\"}\n";
        let mut src = JsonlSource::new(Cursor::new(data), "x.jsonl", &ColumnNames::default(), 1);
        let c1 = src.next_chunk().unwrap().unwrap();
        let c2 = src.next_chunk().unwrap().unwrap();
        assert!(src.next_chunk().unwrap().is_none());
        assert_eq!(c1.frame.height(), 1);
        assert_eq!(c2.locations[0].to_string(), "x.jsonl: line 3");
        assert_eq!(
            c2.frame.column("id").unwrap().i64().unwrap().get(0),
            Some(2)
        );
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let data = "{\"prompt\": \"a\", \"response\": \"b\"}\n{\"prompt\": \"a\", \"response\": \n";
        let mut src = JsonlSource::new(Cursor::new(data), "x.jsonl", &ColumnNames::default(), 10);
        let e = src.next_chunk().err().unwrap();
        assert!(
            e.to_string().starts_with("x.jsonl: line 2: malformed JSON"),
            "{e}"
        );
    }
}
