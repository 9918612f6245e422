//! Input datasets: JSONL (files or stdin) and Parquet, read in chunks of rows with their locations.

use std::cell::RefCell;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Read};

use polars::prelude::*;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::chat::{check_conversation, Message};
use crate::format::Format;

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

/// The default `--max-line-bytes`: far above any line the model could score (a conversation at its
/// longest is a few MB of text), yet one runaway line cannot take the machine's memory.
pub const DEFAULT_MAX_LINE_BYTES: usize = 256 << 20;

/// Opens `path` by its extension; `-` is JSONL on stdin.
/// `skip_bad`: a bad row becomes an `Err` entry of its chunk (its columns null) instead of an error.
/// `max_line_bytes`: a longer JSONL line is a bad row, read past without being held in memory.
pub fn open(
    path: &str,
    names: &ColumnNames,
    chunk_rows: usize,
    skip_bad: bool,
    max_line_bytes: usize,
) -> Result<Box<dyn ChunkSource + Send>, InputError> {
    if path == "-" {
        let stdin = BufReader::new(std::io::stdin());
        let mut source = JsonlSource::new(stdin, "<stdin>", names, chunk_rows);
        source.skip_bad = skip_bad;
        source.max_line_bytes = max_line_bytes;
        return Ok(Box::new(source));
    }
    let file =
        File::open(path).map_err(|e| InputError::new(path, None, format!("cannot open: {e}")))?;
    match Format::of(path) {
        Some(Format::Jsonl) => {
            let size = file.metadata().map(|m| m.len()).ok();
            let mut source = JsonlSource::new(BufReader::new(file), path, names, chunk_rows);
            if let Some(schema) = read_ahead_schema(path, chunk_rows, max_line_bytes)? {
                source.schema = Some(Arc::new(schema));
                source.schema_from = format!(
                    "reading the file ahead (its first window, widened by up to {MAX_WIDENINGS} later \
                     lines with new keys or types)"
                );
            }
            source.total_bytes = size;
            source.skip_bad = skip_bad;
            source.max_line_bytes = max_line_bytes;
            Ok(Box::new(source))
        }
        Some(Format::Parquet) => {
            let mut source = ParquetSource::new(file, path, names, chunk_rows)?;
            source.skip_bad = skip_bad;
            Ok(Box::new(source))
        }
        None => Err(InputError::new(
            path,
            None,
            "unknown input format: expected .jsonl, .ndjson or .parquet (or - for JSONL on stdin)",
        )),
    }
}

/// Checks a chunk's columns against `written`, the columns armorm adds: a clash is refused, naming the
/// column, or with `rename` the input's column is kept as `input_NAME`.
pub fn reserve_columns(
    frame: &mut DataFrame,
    written: &[&str],
    rename: bool,
    file: &str,
) -> Result<(), InputError> {
    for &name in written {
        if frame.column(name).is_err() {
            continue;
        }
        let kept = format!("input_{name}");
        if !rename {
            return Err(InputError::new(
                file,
                Some(name),
                format!(
                    "armorm writes a column of this name: rename or drop it in the input, or pass \
                     --rename-input-columns to keep it as `{kept}`"
                ),
            ));
        }
        if frame.column(&kept).is_ok() {
            return Err(InputError::new(
                file,
                Some(name),
                format!("armorm writes a column of this name, and `{kept}` is taken too"),
            ));
        }
        frame
            .rename(name, kept.into())
            .map_err(|e| InputError::new(file, Some(name), e))?;
    }
    Ok(())
}

/// JSONL, a chunk of lines at a time. Each line is checked with serde_json (for exact errors), and the
/// chunk's columns are then read by polars under one schema: a file's read ahead (`open`), or stdin's
/// first chunk. A line that does not fit it is bad input, since polars would drop or rewrite what does
/// not fit.
pub struct JsonlSource<R> {
    reader: R,
    file: String,
    line: usize,
    names: ColumnNames,
    chunk_rows: usize,
    schema: Option<SchemaRef>,
    /// Where `schema` came from, for messages.
    schema_from: String,
    done: bool,
    bytes_read: u64,
    total_bytes: Option<u64>,
    skip_bad: bool,
    max_line_bytes: usize,
}

/// What reading a line gave.
enum LineRead {
    End,
    Line,
    /// Over `max_line_bytes`: this many bytes (without the newline), read past.
    TooLong(u64),
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
            schema_from: String::new(),
            done: false,
            bytes_read: 0,
            total_bytes: None,
            skip_bad: false,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
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
            let row = match self.read_line(&mut buf)? {
                LineRead::End => {
                    self.done = true;
                    break;
                }
                LineRead::TooLong(n) => {
                    buf = Vec::new();
                    Err(InputError::new(
                        self.here(),
                        None,
                        format!(
                            "the line is {n} bytes, over --max-line-bytes {}",
                            self.max_line_bytes
                        ),
                    ))
                }
                LineRead::Line => self.parse_line(&buf),
            };
            match row {
                Ok(None) => {}
                Ok(Some((text, messages))) => {
                    conversations.push(Ok(messages));
                    locations.push(self.here());
                    bytes.extend_from_slice(text.trim_end().as_bytes());
                    bytes.push(b'\n');
                }
                Err(e) => self.bad(e, &mut bytes, &mut conversations, &mut locations)?,
            }
            // After a long line, its copy in the chunk is enough: not a second one until the chunk ends.
            if buf.capacity() > 1 << 20 {
                buf = Vec::new();
            }
        }
        if conversations.is_empty() {
            return Ok(None);
        }
        let frame = self.frame(&bytes, &mut conversations, &locations)?;
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
    /// Reads the next line into `buf`, holding at most `max_line_bytes` of it: the rest of a longer line
    /// is read past, not kept.
    fn read_line(&mut self, buf: &mut Vec<u8>) -> Result<LineRead, InputError> {
        let read_error =
            |e: std::io::Error| InputError::new(&self.file, None, format!("read error: {e}"));
        // One byte more than the limit: the newline of a line that is exactly at it.
        let room = self.max_line_bytes as u64 + 1;
        let n = (&mut self.reader)
            .take(room)
            .read_until(b'\n', buf)
            .map_err(read_error)?;
        if n == 0 {
            return Ok(LineRead::End);
        }
        self.line += 1;
        self.bytes_read += n as u64;
        if buf.last() == Some(&b'\n') || buf.len() <= self.max_line_bytes {
            return Ok(LineRead::Line);
        }
        let (rest, newline) = skip_line(&mut self.reader).map_err(read_error)?;
        self.bytes_read += rest;
        Ok(LineRead::TooLong(n as u64 + rest - u64::from(newline)))
    }

    /// A line's text (without a byte-order mark) and conversation; `None` for a blank line.
    fn parse_line<'b>(&self, buf: &'b [u8]) -> Result<Option<(&'b str, Vec<Message>)>, InputError> {
        let here = |(field, msg): (Option<String>, String)| {
            InputError::new(self.here(), field.as_deref(), msg)
        };
        let text =
            std::str::from_utf8(buf).map_err(|e| here((None, format!("not valid UTF-8: {e}"))))?;
        // Editors on Windows start a UTF-8 file with a byte-order mark; it is not part of the JSON.
        let text = match self.line {
            1 => text.strip_prefix('\u{feff}').unwrap_or(text),
            _ => text,
        };
        if text.trim().is_empty() {
            return Ok(None);
        }
        let value = parse_json(text).map_err(here)?;
        let messages = conversation_from_json(&value, &self.names).map_err(here)?;
        if let Some(schema) = &self.schema {
            self.check_fits(&value, schema)?;
        }
        Ok(Some((text, messages)))
    }

    /// A line must fit the columns and types fixed before it: polars would drop a key it has not seen
    /// (at any depth) and write a list or object as text.
    fn check_fits(&self, value: &Value, schema: &Schema) -> Result<(), InputError> {
        fits_row(value, schema).map_err(|(field, why)| {
            InputError::new(
                self.here(),
                Some(&field),
                format!(
                    "{why}; the output's columns and their types come from {}, and this does not fit \
                     them (raise --window-rows, or read a file rather than stdin: armorm reads a file \
                     ahead for its columns)",
                    self.schema_from
                ),
            )
        })
    }

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

    fn frame(
        &mut self,
        bytes: &[u8],
        conversations: &mut [RowInput],
        locations: &[Location],
    ) -> Result<DataFrame, InputError> {
        let span = match (locations.first(), locations.last()) {
            (Some(Location::Line { line: a, .. }), Some(Location::Line { line: b, .. })) => {
                format!("{}: lines {a}-{b}", self.file)
            }
            _ => self.file.clone(),
        };
        let schema = match &self.schema {
            Some(s) => s.clone(),
            None => {
                self.schema_from = format!(
                    "the first window ({})",
                    span.replace(&format!("{}: ", self.file), "")
                );
                let s = polars::io::ndjson::infer_schema(&mut Cursor::new(bytes), None).map_err(
                    |e| InputError::new(&span, None, format!("cannot infer columns: {e}")),
                )?;
                let s: SchemaRef = Arc::new(s);
                self.schema = Some(s.clone());
                s
            }
        };
        let parse = |bytes: &[u8], rows| {
            let frame = polars::io::ndjson::core::parse_ndjson(bytes, Some(rows), &schema, false)?;
            // No columns (every row so far was bad input): the rows are still there.
            Ok::<_, PolarsError>(match frame.width() {
                0 => DataFrame::empty_with_height(rows),
                _ => frame,
            })
        };
        let refused = match parse(bytes, locations.len()) {
            Ok(frame) => return Ok(frame),
            Err(e) => e,
        };
        // Rare (the lines were checked against the schema): find the lines polars refuses on their own.
        let mut kept = Vec::with_capacity(bytes.len());
        for (i, line) in bytes
            .split(|&b| b == b'\n')
            .take(locations.len())
            .enumerate()
        {
            match parse(line, 1) {
                Ok(_) => kept.extend_from_slice(line),
                Err(e) => {
                    let err = InputError::new(
                        &locations[i],
                        misfit_field(line, &schema).as_deref(),
                        format!(
                            "does not fit the column types that come from {}: {e}",
                            self.schema_from
                        ),
                    );
                    if !self.skip_bad {
                        return Err(err);
                    }
                    conversations[i] = Err(err);
                    kept.extend_from_slice(b"{}");
                }
            }
            kept.push(b'\n');
        }
        parse(&kept, locations.len()).map_err(|e| {
            InputError::new(
                &span,
                None,
                format!("values do not fit the column types of the first rows: {refused}; {e}"),
            )
        })
    }
}

/// The first key of a JSONL line whose value polars refuses under `schema`, for the message.
fn misfit_field(line: &[u8], schema: &Schema) -> Option<String> {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(line) else {
        return None;
    };
    obj.into_iter()
        .find(|(k, v)| {
            let one = serde_json::json!({ k: v }).to_string();
            polars::io::ndjson::core::parse_ndjson(one.as_bytes(), Some(1), schema, false).is_err()
        })
        .map(|(k, _)| k)
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

/// Consumes the rest of a line without keeping it; returns how many bytes that was, and whether it
/// ended with a newline (counted) rather than the end of the input.
fn skip_line(reader: &mut impl BufRead) -> std::io::Result<(u64, bool)> {
    let mut skipped = 0u64;
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok((skipped, false));
        }
        let (used, end) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        reader.consume(used);
        skipped += used as u64;
        if end {
            return Ok((skipped, true));
        }
    }
}

const NEW_KEY: &str = "a key that is not among the columns";

/// A JSON row against the columns: Err((the field at fault, why)).
fn fits_row(value: &Value, schema: &Schema) -> Result<(), (String, String)> {
    let Value::Object(obj) = value else {
        return Ok(());
    };
    for (key, v) in obj {
        match schema.get(key) {
            Some(dtype) => fits(v, dtype).map_err(|(path, why)| (format!("{key}{path}"), why))?,
            None => return Err((key.clone(), NEW_KEY.to_string())),
        }
    }
    Ok(())
}

/// Lines with new keys or types that a read-ahead widens the columns for, at most.
const MAX_WIDENINGS: usize = 256;

/// The columns of a JSONL file, read ahead: those of its first window, widened by each later line that
/// does not fit them (a key first seen late, a value of another type), so that such keys are carried
/// rather than refused. Lines that are not objects are left to the real pass to report. `None` when
/// the file has no object lines or polars cannot infer their columns (the real pass says why).
fn read_ahead_schema(
    path: &str,
    chunk_rows: usize,
    max_line_bytes: usize,
) -> Result<Option<Schema>, InputError> {
    let file =
        File::open(path).map_err(|e| InputError::new(path, None, format!("cannot open: {e}")))?;
    let mut probe = JsonlSource::new(BufReader::new(file), path, &ColumnNames::default(), 1);
    probe.max_line_bytes = max_line_bytes;
    let infer =
        |sample: &[u8]| polars::io::ndjson::infer_schema(&mut Cursor::new(sample), None).ok();
    let (mut sample, mut taken, mut widened) = (Vec::new(), 0usize, 0usize);
    let mut schema = None;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match probe.read_line(&mut buf)? {
            LineRead::End => break,
            LineRead::TooLong(_) => continue,
            LineRead::Line => {}
        }
        let text = match std::str::from_utf8(&buf) {
            Ok(t) if probe.line == 1 => t.strip_prefix('\u{feff}').unwrap_or(t),
            Ok(t) => t,
            Err(_) => continue,
        };
        let Ok(value @ Value::Object(_)) = parse_json(text) else {
            continue;
        };
        if taken >= chunk_rows {
            let Some(s) = &schema else { break };
            if widened == MAX_WIDENINGS || fits_row(&value, s).is_ok() {
                continue;
            }
            widened += 1;
        }
        sample.extend_from_slice(text.trim_end().as_bytes());
        sample.push(b'\n');
        taken += 1;
        if taken >= chunk_rows {
            // A line polars cannot take with the others keeps the columns as they were.
            match infer(&sample) {
                Some(s) => schema = Some(s),
                None if schema.is_none() => return Ok(None),
                None => {}
            }
        }
    }
    Ok(schema.or_else(|| (!sample.is_empty()).then(|| infer(&sample)).flatten()))
}

/// Whether polars holds `value` in a column of `dtype` as it is; else (the path below the column, why).
fn fits(value: &Value, dtype: &DataType) -> Result<(), (String, String)> {
    let ok = match (value, dtype) {
        (Value::Null, _) => true,
        (_, DataType::Null) => {
            return Err((
                String::new(),
                format!("{} where the column holds only nulls", kind(value)),
            ))
        }
        // A scalar in a string column is written as its text, as polars does within one window.
        (Value::String(_) | Value::Bool(_) | Value::Number(_), DataType::String) => true,
        (Value::Bool(_), DataType::Boolean) => true,
        (Value::Number(n), DataType::Int64) => n.as_i64().is_some(),
        (Value::Number(n), DataType::UInt64) => n.as_u64().is_some(),
        (Value::Number(_), DataType::Float64 | DataType::Float32) => true,
        (Value::Array(items), DataType::List(inner)) => {
            for (i, item) in items.iter().enumerate() {
                fits(item, inner).map_err(|(p, why)| (format!("[{i}]{p}"), why))?;
            }
            true
        }
        (Value::Object(obj), DataType::Struct(fields)) => {
            for (key, v) in obj {
                match fields.iter().find(|f| f.name.as_str() == key) {
                    Some(f) => fits(v, &f.dtype).map_err(|(p, why)| (format!(".{key}{p}"), why))?,
                    None => return Err((format!(".{key}"), NEW_KEY.to_string())),
                }
            }
            true
        }
        (
            _,
            DataType::String
            | DataType::Boolean
            | DataType::Int64
            | DataType::UInt64
            | DataType::Float64
            | DataType::Float32
            | DataType::List(_)
            | DataType::Struct(_),
        ) => false,
        // Types that JSON inference does not produce are left to polars.
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err((
            String::new(),
            format!("{} where the column holds {dtype}", kind(value)),
        ))
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
        (_, Some(key)) => Err((
            Some(key),
            "appears twice in one object (JSON readers differ on which one they keep)".to_string(),
        )),
        (Ok(v), None) => Ok(v),
        (Err(e), None) => Err((None, format!("malformed JSON: {e}"))),
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
                    .map_err(|(f, m)| InputError::new(here, f.as_deref(), m))?;
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

    #[test]
    fn a_long_line_is_read_past_and_the_next_one_read_whole() {
        let data = format!(
            "{}\n{{\"prompt\": \"{}\", \"response\": \"b\"}}\n{}\n",
            r#"{"prompt": "a", "response": "b"}"#,
            "x".repeat(1000),
            r#"{"prompt": "c", "response": "d"}"#
        );
        let mut src = JsonlSource::new(Cursor::new(data), "x.jsonl", &ColumnNames::default(), 10);
        src.max_line_bytes = 100;
        src.skip_bad = true;
        let chunk = src.next_chunk().unwrap().unwrap();
        assert_eq!(chunk.conversations.len(), 3);
        let e = chunk.conversations[1].as_ref().unwrap_err().to_string();
        assert!(
            e.starts_with("x.jsonl: line 2: the line is 1031 bytes"),
            "{e}"
        );
        assert_eq!(chunk.conversations[2].as_ref().unwrap()[0].content, "c");
        assert_eq!(src.fraction_read(), None);
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
