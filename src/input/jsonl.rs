//! The JSONL reader: a file or stdin, a chunk of lines at a time, each line checked before polars reads
//! the chunk's columns under one schema.

use std::fs::File;
use std::io::{BufRead, BufReader, Cursor, Read};

use polars::prelude::*;
use serde_json::Value;

use super::json::{conversation_from_json, kind, parse_json, FieldError};
use super::{
    Chunk, ChunkSource, ColumnNames, InputError, Location, RowInput, DEFAULT_MAX_LINE_BYTES,
};
use crate::chat::Message;

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
    pub(super) skip_bad: bool,
    pub(super) max_line_bytes: usize,
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

impl JsonlSource<BufReader<File>> {
    /// A JSONL file (at `path`, named `label` in errors), with its columns read ahead and its size
    /// known for progress.
    pub(super) fn open_file(
        file: File,
        (path, label): (&str, &str),
        names: &ColumnNames,
        chunk_rows: usize,
        max_line_bytes: usize,
    ) -> Result<Self, InputError> {
        let size = file.metadata().map(|m| m.len()).ok();
        let probe = File::open(path)
            .map_err(|e| InputError::new(label, None, format!("cannot open: {e}")))?;
        Self::new(BufReader::new(file), label, names, chunk_rows).read_ahead(
            BufReader::new(probe),
            size,
            max_line_bytes,
        )
    }
}

impl JsonlSource<Cursor<Arc<[u8]>>> {
    /// JSONL held in memory (stdin read whole), read as a file is: its columns read ahead.
    pub fn from_bytes(
        bytes: Arc<[u8]>,
        name: &str,
        names: &ColumnNames,
        chunk_rows: usize,
        max_line_bytes: usize,
    ) -> Result<Self, InputError> {
        let size = Some(bytes.len() as u64);
        let probe = Cursor::new(Arc::clone(&bytes));
        Self::new(Cursor::new(bytes), name, names, chunk_rows).read_ahead(
            probe,
            size,
            max_line_bytes,
        )
    }
}

impl<R: BufRead> JsonlSource<R> {
    /// The columns of the whole input, from `probe` (a second reader of the same bytes).
    fn read_ahead(
        mut self,
        probe: impl BufRead,
        size: Option<u64>,
        max_line_bytes: usize,
    ) -> Result<Self, InputError> {
        let schema = read_ahead_schema(probe, &self.file, self.chunk_rows, max_line_bytes)?;
        if let Some(schema) = schema {
            self.schema = Some(Arc::new(schema));
            self.schema_from = format!(
                "reading the file ahead (its first window, widened by up to {MAX_WIDENINGS} later \
                 lines with new keys or types)"
            );
        }
        self.total_bytes = size;
        self.max_line_bytes = max_line_bytes;
        Ok(self)
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
        let here = |e: FieldError| InputError::new(self.here(), e.field.as_deref(), e.message);
        let text = std::str::from_utf8(buf)
            .map_err(|e| here(FieldError::whole(format!("not valid UTF-8: {e}"))))?;
        let text = without_bom(self.line, text);
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

/// Line `line`'s text without the byte-order mark that editors on Windows start a UTF-8 file with: it
/// is not part of the JSON.
fn without_bom(line: usize, text: &str) -> &str {
    match line {
        1 => text.strip_prefix('\u{feff}').unwrap_or(text),
        _ => text,
    }
}

/// Lines with new keys or types that a read-ahead widens the columns for, at most.
const MAX_WIDENINGS: usize = 256;

/// The columns of a JSONL file, read ahead: those of its first window, widened by each later line that
/// does not fit them (a key first seen late, a value of another type), so that such keys are carried
/// rather than refused. Lines that are not objects are left to the real pass to report. `None` when
/// the file has no object lines or polars cannot infer their columns (the real pass says why).
fn read_ahead_schema(
    reader: impl BufRead,
    path: &str,
    chunk_rows: usize,
    max_line_bytes: usize,
) -> Result<Option<Schema>, InputError> {
    let mut probe = JsonlSource::new(reader, path, &ColumnNames::default(), 1);
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
            Ok(t) => without_bom(probe.line, t),
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

#[cfg(test)]
mod tests {
    use super::*;

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
