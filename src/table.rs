//! Whole scored tables for the commands that work after scoring: read one (Parquet, JSONL or stdin),
//! find its attribute names, and write one out.

use std::fs::File;
use std::io::{Cursor, Read};

use polars::prelude::*;

use crate::format::Format;
use crate::input::{InputError, InputFile};
use crate::output::{self, OutputError, Target};

/// A table and the names of the objectives in its `rewards`/`coefficients` lists.
pub struct Table {
    pub frame: DataFrame,
    pub attributes: Vec<String>,
}

/// All the bytes of a JSONL input (`-` is stdin).
pub fn read_bytes(path: &str) -> Result<Vec<u8>, InputError> {
    read_bytes_of(&InputFile::local(path))
}

/// `read_bytes`, errors naming the file by its label.
pub fn read_bytes_of(input: &InputFile) -> Result<Vec<u8>, InputError> {
    let mut bytes = Vec::new();
    let read = if input.path == "-" {
        std::io::stdin().read_to_end(&mut bytes)
    } else {
        File::open(&input.path).and_then(|mut f| f.read_to_end(&mut bytes))
    };
    read.map_err(|e| InputError::new(&input.label, None, format!("cannot read: {e}")))?;
    Ok(bytes)
}

/// A JSONL input's columns, by polars.
pub fn jsonl_frame(path: &str, mut bytes: Vec<u8>) -> Result<DataFrame, InputError> {
    // A UTF-8 byte-order mark (Windows editors write one) is not part of the first line's JSON.
    if bytes.starts_with("\u{feff}".as_bytes()) {
        bytes.drain(..3);
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(DataFrame::empty());
    }
    JsonReader::new(Cursor::new(bytes))
        .with_json_format(JsonFormat::JsonLines)
        .finish()
        .map_err(|e| InputError::new(path, None, format!("not valid JSONL: {e}")))
}

/// Reads all of `path` (`-` is JSONL on stdin).
pub fn read(path: &str) -> Result<Table, InputError> {
    read_files(&[InputFile::local(path)])
}

/// Reads all of `files` into one table, in order; their columns must agree. The attribute names are
/// the first file's.
pub fn read_files(files: &[InputFile]) -> Result<Table, InputError> {
    let mut frames = Vec::with_capacity(files.len());
    let mut attributes = None;
    for (i, file) in files.iter().enumerate() {
        let (frame, attrs) = read_one(file)?;
        if i == 0 {
            attributes = attrs;
        }
        frames.push((frame, file.label.as_str()));
    }
    Ok(Table::new(stack(frames)?, attributes))
}

/// Frames stacked in order; a frame whose columns differ from the first's is an error naming its file.
pub fn stack(frames: Vec<(DataFrame, &str)>) -> Result<DataFrame, InputError> {
    let mut frames = frames.into_iter();
    let Some((mut all, mut first)) = frames.next() else {
        return Ok(DataFrame::empty());
    };
    for (frame, label) in frames {
        // An empty JSONL file has no columns: it adds no rows, and no columns to agree with.
        if frame.width() == 0 {
            continue;
        }
        if all.width() == 0 {
            (all, first) = (frame, label);
            continue;
        }
        all.vstack_mut(&frame).map_err(|e| {
            InputError::new(
                label,
                None,
                format!("its columns differ from {first}'s: {e}"),
            )
        })?;
    }
    Ok(all)
}

/// One file's frame and the attribute names its Parquet metadata holds.
fn read_one(input: &InputFile) -> Result<(DataFrame, Option<Vec<String>>), InputError> {
    let (path, label) = (input.path.as_str(), input.label.as_str());
    let err = |m: String| InputError::new(label, None, m);
    Ok(match Format::of(path) {
        Some(Format::Parquet) => {
            let file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
            let mut reader = ParquetReader::new(file);
            let attrs = reader
                .get_metadata()
                .ok()
                .and_then(|m| m.key_value_metadata().clone())
                .and_then(|kv| kv.into_iter().find(|k| k.key == "armorm.attributes"))
                .and_then(|k| k.value)
                .and_then(|v| serde_json::from_str::<Vec<String>>(&v).ok());
            let frame = reader
                .finish()
                .map_err(|e| err(format!("not a readable Parquet file: {e}")))?;
            (frame, attrs)
        }
        Some(Format::Jsonl) => (jsonl_frame(label, read_bytes_of(input)?)?, None),
        None => {
            return Err(err(
                "unknown input format: expected .parquet, .jsonl or - (JSONL on stdin)".into(),
            ))
        }
    })
}

/// A Parquet file's key-value metadata (`armorm.*` and the like), without the Arrow schema that every
/// writer adds; none for JSONL and stdin, which have no place for it.
pub fn file_metadata(path: &str) -> Result<Vec<(String, String)>, InputError> {
    if Format::of(path) != Some(Format::Parquet) {
        return Ok(Vec::new());
    }
    let err = |m: String| InputError::new(path, None, m);
    let file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let mut reader = ParquetReader::new(file);
    let meta = reader
        .get_metadata()
        .map_err(|e| err(format!("not a readable Parquet file: {e}")))?;
    Ok(meta
        .key_value_metadata()
        .iter()
        .flatten()
        .filter(|kv| kv.key != "ARROW:schema")
        .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?)))
        .collect())
}

/// The `armorm.*` metadata (other than `armorm.attributes`, which a writer sets) that every Parquet file
/// among `files` has with the same value: the provenance that still describes rows selected from them
/// (filter, best-of-n). JSONL and stdin have none.
pub fn carried_metadata(files: &[InputFile]) -> Result<Vec<(String, String)>, InputError> {
    let mut kept: Option<Vec<(String, String)>> = None;
    for file in files {
        if Format::of(&file.path) != Some(Format::Parquet) {
            continue;
        }
        let meta: Vec<(String, String)> = file_metadata(&file.path)?
            .into_iter()
            .filter(|(k, _)| k.starts_with("armorm.") && k != "armorm.attributes")
            .collect();
        kept = Some(match kept {
            None => meta,
            Some(kept) => kept.into_iter().filter(|kv| meta.contains(kv)).collect(),
        });
    }
    Ok(kept.unwrap_or_default())
}

impl Table {
    /// `frame` with the names its files say (`armorm.attributes`), when they match its lists.
    pub fn new(frame: DataFrame, meta_attrs: Option<Vec<String>>) -> Table {
        let width = list_width(&frame, "coefficients").or_else(|| list_width(&frame, "rewards"));
        let attributes = match (meta_attrs, width) {
            (Some(a), Some(w)) if a.len() == w => a,
            (_, Some(w)) => crate::attribute_names(w),
            (a, None) => a.unwrap_or_default(),
        };
        Table { frame, attributes }
    }
}

fn list_width(frame: &DataFrame, name: &str) -> Option<usize> {
    let list = frame.column(name).ok()?.list().ok()?.clone();
    (0..list.len()).find_map(|i| list.get_as_series(i).map(|s| s.len()))
}

/// The f32 values of a list column (e.g. `coefficients`), row by row; an error names the column.
pub fn f32_lists(frame: &DataFrame, name: &str) -> Result<Vec<Vec<f32>>, String> {
    let col = frame
        .column(name)
        .map_err(|_| format!("no `{name}` column: run armorm score first"))?;
    let list = col
        .list()
        .map_err(|_| format!("`{name}` must be a list of floats, got {}", col.dtype()))?;
    (0..list.len())
        .map(|i| {
            let s = list
                .get_as_series(i)
                .ok_or_else(|| format!("row {}: `{name}` is null", i + 1))?;
            let s = s.cast(&DataType::Float32).map_err(|e| e.to_string())?;
            Ok(values(s.f32().map_err(|e| e.to_string())?))
        })
        .collect()
}

/// The f32 values of a numeric column (e.g. `score`).
pub fn f32_column(frame: &DataFrame, name: &str) -> Result<Vec<f32>, String> {
    let col = frame
        .column(name)
        .map_err(|_| format!("no `{name}` column: run armorm score first"))?;
    let col = col
        .cast(&DataType::Float32)
        .map_err(|e| format!("`{name}`: {e}"))?;
    Ok(values(col.f32().map_err(|e| e.to_string())?))
}

/// Nulls read as NaN: they compare false in every condition and sort last.
fn values(ca: &Float32Chunked) -> Vec<f32> {
    (0..ca.len())
        .map(|i| ca.get(i).unwrap_or(f32::NAN))
        .collect()
}

/// Writes a whole table to `target` through the same never-half-written sinks as `armorm score`.
pub fn write(
    mut frame: DataFrame,
    target: &Target,
    metadata: Vec<(String, String)>,
) -> Result<(), OutputError> {
    let mut sink = output::open(target, metadata)?;
    sink.write(&mut frame)?;
    sink.finish()
}
