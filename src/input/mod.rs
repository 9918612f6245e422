//! Input datasets: JSONL (files or stdin) and Parquet, read in chunks of rows with their locations.
//!
//! Here: the shared types and `open`, which picks a reader by `Format`. Beside it: `jsonl.rs` (the
//! JSONL reader), `json.rs` (a JSON row to a conversation), `parquet.rs` (the Parquet reader),
//! `frame.rs` (a Parquet chunk's columns to conversations) and `memory.rs` (rows a command built).

mod frame;
mod json;
mod jsonl;
mod memory;
mod parquet;

use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use crate::chat::Message;
use crate::format::Format;

pub use frame::{conversations_from_frame, messages_from_series};
pub use json::{conversation_from_json, messages_from_json, parse_json, FieldError, FieldResult};
pub use jsonl::JsonlSource;
pub use memory::{MemoryRow, MemorySource};
pub use parquet::ParquetSource;

/// How errors and messages name stdin (`-`).
pub const STDIN: &str = "<stdin>";

/// `path` as errors name it: `-` is stdin.
pub fn label(path: &str) -> &str {
    if path == "-" {
        STDIN
    } else {
        path
    }
}

/// One input file as a run reads it: where its bytes are, and how errors and checkpoints name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// A local path, or `-` for stdin.
    pub path: String,
    /// How errors name it: the path, `<stdin>`, or a hub file's name with its revision and commit.
    pub label: String,
    /// A hub file's name at its resolved commit (`hf://datasets/OWNER/NAME@SHA/PATH`): what a resumed
    /// run must match, wherever the cache is.
    pub pinned: Option<String>,
}

impl InputFile {
    /// A local path (or `-`), named as given.
    pub fn local(path: &str) -> Self {
        Self {
            path: path.to_string(),
            label: label(path).to_string(),
            pinned: None,
        }
    }
}

/// What outputs named after `input` start from: a local file's path without its extension, beside it
/// (`data/x` for `data/x.jsonl`); a hub dataset's NAME, in the current directory.
pub fn output_stem(input: &str) -> PathBuf {
    if let Ok(url) = crate::hub::DatasetUrl::parse(input) {
        return PathBuf::from(url.name());
    }
    let p = Path::new(input);
    let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    p.with_file_name(stem)
}

/// The default columns of a conversation: `--prompt-column`, `--response-column`, `--messages-column`.
pub const PROMPT_COLUMN: &str = "prompt";
pub const RESPONSE_COLUMN: &str = "response";
pub const MESSAGES_COLUMN: &str = "messages";

/// Which columns hold the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnNames {
    pub prompt: String,
    pub response: String,
    pub messages: String,
}

impl Default for ColumnNames {
    fn default() -> Self {
        Self {
            prompt: PROMPT_COLUMN.into(),
            response: RESPONSE_COLUMN.into(),
            messages: MESSAGES_COLUMN.into(),
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
    open_as(
        &InputFile::local(path),
        names,
        chunk_rows,
        skip_bad,
        max_line_bytes,
    )
}

/// `open`, for a file named in errors by its label (a hub file by its hub name).
pub fn open_as(
    input: &InputFile,
    names: &ColumnNames,
    chunk_rows: usize,
    skip_bad: bool,
    max_line_bytes: usize,
) -> Result<Box<dyn ChunkSource + Send>, InputError> {
    let (path, label) = (input.path.as_str(), input.label.as_str());
    if path == "-" {
        let stdin = BufReader::new(std::io::stdin());
        let mut source = JsonlSource::new(stdin, STDIN, names, chunk_rows);
        source.skip_bad = skip_bad;
        source.max_line_bytes = max_line_bytes;
        return Ok(Box::new(source));
    }
    let file =
        File::open(path).map_err(|e| InputError::new(label, None, format!("cannot open: {e}")))?;
    match Format::of(path) {
        Some(Format::Jsonl) => {
            let mut source =
                JsonlSource::open_file(file, (path, label), names, chunk_rows, max_line_bytes)?;
            source.skip_bad = skip_bad;
            Ok(Box::new(source))
        }
        Some(Format::Parquet) => {
            let mut source = ParquetSource::new(file, label, names, chunk_rows)?;
            source.skip_bad = skip_bad;
            Ok(Box::new(source))
        }
        None => Err(InputError::new(
            label,
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
