//! Output: score columns appended to the input's own, written as Parquet or JSONL, never half-finished.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use polars::prelude::*;
use tempfile::NamedTempFile;

pub use crate::format::Format;
use crate::model::RowScore;
use crate::parquet_out::ClassicWriter;

/// The columns armorm adds, in order. `input_hash` identifies the token ids each row was scored from
/// (see `provenance::input_hash`): `armorm verify` tells a changed template or tokenizer by it.
pub const SCORE_COLUMNS: [&str; 6] = [
    "score",
    "rewards",
    "gating",
    "coefficients",
    "num_tokens",
    "input_hash",
];
/// Added under `--on-error skip` or `--truncate prompt-left`.
pub const STATUS_COLUMNS: [&str; 2] = ["status", "error"];
/// Added by `--top-k`.
pub const TOP_COLUMNS: [&str; 2] = ["top_attributes", "top_coefficients"];

/// Every column a run adds to the input's.
pub fn written_columns(status: bool, top: bool) -> Vec<&'static str> {
    let mut names = SCORE_COLUMNS.to_vec();
    if status {
        names.extend(STATUS_COLUMNS);
    }
    if top {
        names.extend(TOP_COLUMNS);
    }
    names
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{path}: {message}")]
    Path { path: String, message: String },
    #[error("{0}")]
    Polars(#[from] PolarsError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where results go: a file (written beside the target, renamed into place at the end) or stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub path: Option<PathBuf>,
    pub format: Format,
}

impl Target {
    /// `-` is JSONL on stdout; otherwise the extension decides.
    pub fn parse(spec: &str) -> Result<Self, OutputError> {
        let format = Format::of(spec).ok_or_else(|| OutputError::Path {
            path: spec.to_string(),
            message: "unknown output format: expected .parquet, .jsonl or - (JSONL on stdout)"
                .into(),
        })?;
        Ok(Self {
            path: (spec != "-").then(|| PathBuf::from(spec)),
            format,
        })
    }

    /// Without `-o`: INPUT's stem + `.scores.parquet` beside it (a hub dataset's NAME in the current
    /// directory, see `input::output_stem`); stdin goes to stdout.
    pub fn default_for(input: &str) -> Self {
        if input == "-" {
            return Self {
                path: None,
                format: Format::Jsonl,
            };
        }
        Self {
            path: Some(with_suffix(
                &crate::input::output_stem(input),
                ".scores.parquet",
            )),
            format: Format::Parquet,
        }
    }
}

/// `stem` + `suffix`, as one file name (a stem may hold dots: `v1.2` + `.scores.parquet`).
pub fn with_suffix(stem: &Path, suffix: &str) -> PathBuf {
    let mut name = stem.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// `armorm score --top-k`: also write each row's K attributes of largest |coefficient|.
#[derive(Debug, Clone)]
pub struct TopK {
    pub k: usize,
    pub attributes: Vec<String>,
}

/// What became of a row, as its `status` column says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Bad input: the reader or the tokenizer refused the row.
    Error,
    TooLong,
    /// Scored after dropping the oldest prompt tokens (`--truncate prompt-left`).
    Truncated,
    /// The row alone did not fit in the device's memory.
    Oom,
    /// The model gave NaN or infinity for the row.
    NonFinite,
}

impl Status {
    /// The text of the `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
            Status::TooLong => "too_long",
            Status::Truncated => "truncated",
            Status::Oom => "oom",
            Status::NonFinite => "non_finite",
        }
    }
}

/// A row's status, with the reason when it has no scores.
#[derive(Debug, Clone, PartialEq)]
pub struct RowStatus {
    pub status: Status,
    pub error: Option<String>,
}

impl RowStatus {
    pub fn ok() -> Self {
        Self {
            status: Status::Ok,
            error: None,
        }
    }

    /// Kept in the output without scores.
    pub fn skipped(&self) -> bool {
        self.error.is_some()
    }
}

/// `top_attributes` (list<string>) and `top_coefficients` (list<float32>); null for unscored rows.
pub fn top_columns(coefficients: &[Option<&[f32]>], top: &TopK) -> [Column; 2] {
    let n = coefficients.len();
    let mut names = ListStringChunkedBuilder::new("top_attributes".into(), n, n * top.k);
    let mut values = ListPrimitiveChunkedBuilder::<Float32Type>::new(
        "top_coefficients".into(),
        n,
        n * top.k,
        DataType::Float32,
    );
    for c in coefficients {
        let Some(c) = c else {
            names.append_null();
            values.append_null();
            continue;
        };
        let idx = crate::explain::top_k(c, top.k);
        names.append_values_iter(
            idx.iter()
                .map(|&i| top.attributes.get(i).map_or("?", |s| s.as_str())),
        );
        values.append_slice(&idx.iter().map(|&i| c[i]).collect::<Vec<f32>>());
    }
    [
        names.finish().into_series().into_column(),
        values.finish().into_series().into_column(),
    ]
}

/// The input's columns followed by `SCORE_COLUMNS` (null for rows without scores; `input_hash` null
/// for rows never encoded), then `status` and `error` when given, then the top-K columns when asked.
pub fn with_scores(
    frame: &DataFrame,
    scores: &[Option<RowScore>],
    hashes: &[Option<String>],
    statuses: Option<&[RowStatus]>,
    top: Option<&TopK>,
) -> Result<DataFrame, OutputError> {
    if let Some(name) = SCORE_COLUMNS.iter().find(|c| frame.column(c).is_ok()) {
        return Err(OutputError::Path {
            path: "input".into(),
            message: format!(
                "the input already has a column `{name}`, which armorm writes; rename or drop it"
            ),
        });
    }
    let n = scores.len();
    let list = |name: &str, get: fn(&RowScore) -> &[f32]| -> Column {
        let width = scores.iter().flatten().next().map_or(0, |s| get(s).len());
        let mut b = ListPrimitiveChunkedBuilder::<Float32Type>::new(
            name.into(),
            n,
            n * width,
            DataType::Float32,
        );
        for s in scores {
            match s {
                Some(s) => b.append_slice(get(s)),
                None => b.append_null(),
            }
        }
        b.finish().into_series().into_column()
    };
    let mut columns = vec![
        Column::new(
            "score".into(),
            scores
                .iter()
                .map(|s| s.as_ref().map(|s| s.score))
                .collect::<Vec<_>>(),
        ),
        list("rewards", |s| &s.rewards),
        list("gating", |s| &s.gating),
        list("coefficients", |s| &s.coefficients),
        Column::new(
            "num_tokens".into(),
            scores
                .iter()
                .map(|s| s.as_ref().map(|s| s.num_tokens as i64))
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "input_hash".into(),
            hashes.iter().map(Option::as_deref).collect::<Vec<_>>(),
        ),
    ];
    if let Some(statuses) = statuses {
        columns.push(Column::new(
            "status".into(),
            statuses
                .iter()
                .map(|s| s.status.as_str())
                .collect::<Vec<_>>(),
        ));
        columns.push(Column::new(
            "error".into(),
            statuses
                .iter()
                .map(|s| s.error.as_deref())
                .collect::<Vec<_>>(),
        ));
    }
    if let Some(top) = top {
        let coefficients: Vec<Option<&[f32]>> = scores
            .iter()
            .map(|s| s.as_ref().map(|s| s.coefficients.as_slice()))
            .collect();
        columns.extend(top_columns(&coefficients, top));
    }
    Ok(frame.hstack(&columns)?)
}

/// Gives a later chunk the columns and types of the first one (several inputs make one dataset).
pub fn conform(frame: DataFrame, schema: &Schema) -> Result<DataFrame, String> {
    if frame.schema().as_ref() == schema {
        return Ok(frame);
    }
    let mut columns = Vec::with_capacity(schema.len());
    for (name, dtype) in schema.iter() {
        let col = frame
            .column(name)
            .map_err(|_| format!("has no column `{name}`, which the first input has"))?;
        let col = col.cast(dtype).map_err(|e| {
            format!(
                "column `{name}` is {} where the first input has {dtype}: {e}",
                col.dtype()
            )
        })?;
        columns.push(col);
    }
    if let Some(extra) = frame
        .get_column_names()
        .into_iter()
        .find(|n| schema.get(n).is_none())
    {
        return Err(format!("has a column `{extra}` that the first input lacks"));
    }
    DataFrame::new_infer_height(columns).map_err(|e| e.to_string())
}

/// A streaming writer of scored chunks.
pub trait Sink {
    fn write(&mut self, frame: &mut DataFrame) -> Result<(), OutputError>;
    /// Makes the output complete and visible; without it nothing appears at the target path.
    fn finish(self: Box<Self>) -> Result<(), OutputError>;
}

pub fn open(
    target: &Target,
    metadata: Vec<(String, String)>,
) -> Result<Box<dyn Sink + Send>, OutputError> {
    match (&target.path, target.format) {
        (None, _) => Ok(Box::new(JsonlSink {
            out: BufWriter::new(Box::new(std::io::stdout()) as Box<dyn Write + Send>),
            tmp: None,
        })),
        (Some(path), Format::Jsonl) => {
            let (tmp, file) = staging(path)?;
            Ok(Box::new(JsonlSink {
                out: BufWriter::new(Box::new(file) as Box<dyn Write + Send>),
                tmp: Some((tmp, path.clone())),
            }))
        }
        (Some(path), Format::Parquet) => {
            let (tmp, file) = staging(path)?;
            Ok(Box::new(ParquetSink {
                tmp,
                file: Some(file),
                writer: None,
                target: path.clone(),
                metadata,
            }))
        }
    }
}

/// Scored frames kept in memory, for the commands that use the scores themselves (eval, explain).
/// A clone reads what the pipeline's copy wrote.
#[derive(Clone, Default)]
pub struct MemorySink(std::sync::Arc<std::sync::Mutex<Vec<DataFrame>>>);

impl MemorySink {
    /// Every frame written, one after another (empty when none was).
    pub fn frame(&self) -> Result<DataFrame, OutputError> {
        let frames = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = DataFrame::empty();
        for f in frames.iter() {
            if all.width() == 0 {
                all = f.clone();
            } else {
                all.vstack_mut(f)?;
            }
        }
        Ok(all)
    }
}

impl Sink for MemorySink {
    fn write(&mut self, frame: &mut DataFrame) -> Result<(), OutputError> {
        let mut frames = self.0.lock().unwrap_or_else(|p| p.into_inner());
        frames.push(frame.clone());
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), OutputError> {
        Ok(())
    }
}

/// A hidden temporary file beside `path`: deleted if the run fails, renamed over `path` when it ends well.
fn staging(path: &Path) -> Result<(NamedTempFile, File), OutputError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".partial");
    // tempfile's default 0600 would outlive the rename; ask for what any new file gets (umask applies).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = builder.tempfile_in(dir).map_err(|e| OutputError::Path {
        path: path.display().to_string(),
        message: format!("cannot create the output file: {e}"),
    })?;
    let file = tmp.reopen()?;
    Ok((tmp, file))
}

fn publish(tmp: NamedTempFile, target: &Path) -> Result<(), OutputError> {
    tmp.as_file().sync_all()?;
    tmp.persist(target).map_err(|e| OutputError::Path {
        path: target.display().to_string(),
        message: format!("cannot move the finished output into place: {}", e.error),
    })?;
    Ok(())
}

struct JsonlSink {
    out: BufWriter<Box<dyn Write + Send>>,
    tmp: Option<(NamedTempFile, PathBuf)>,
}

impl Sink for JsonlSink {
    fn write(&mut self, frame: &mut DataFrame) -> Result<(), OutputError> {
        // Serialized in memory first, so that a closed stdout surfaces as a plain io::Error.
        let mut buf = Vec::new();
        JsonWriter::new(&mut buf)
            .with_json_format(JsonFormat::JsonLines)
            .finish(frame)?;
        self.out.write_all(&buf)?;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(), OutputError> {
        self.out.flush()?;
        drop(self.out);
        match self.tmp {
            Some((tmp, target)) => publish(tmp, &target),
            None => Ok(()),
        }
    }
}

struct ParquetSink {
    tmp: NamedTempFile,
    file: Option<File>,
    writer: Option<ClassicWriter<BufWriter<File>>>,
    target: PathBuf,
    metadata: Vec<(String, String)>,
}

impl ParquetSink {
    fn writer(
        &mut self,
        schema: &Schema,
    ) -> Result<&mut ClassicWriter<BufWriter<File>>, OutputError> {
        if let Some(file) = self.file.take() {
            let writer = ClassicWriter::new(BufWriter::new(file), schema, &self.metadata)?;
            self.writer = Some(writer);
        }
        // The file becomes the writer on the first call: exactly one of the two is set.
        self.writer.as_mut().ok_or_else(|| OutputError::Path {
            path: self.target.display().to_string(),
            message: "the Parquet writer is gone".into(),
        })
    }
}

impl Sink for ParquetSink {
    fn write(&mut self, frame: &mut DataFrame) -> Result<(), OutputError> {
        let schema = frame.schema().clone();
        // One row group per chunk: rows become readable as soon as their chunk is scored.
        self.writer(&schema)?.write(frame)?;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(), OutputError> {
        if self.writer.is_none() {
            // No rows at all: still a valid file, with the score columns.
            let empty = with_scores(&DataFrame::empty(), &[], &[], None, None)?;
            self.writer(&empty.schema().clone())?;
        }
        if let Some(w) = self.writer.take() {
            w.finish()?
                .into_inner()
                .map_err(|e| OutputError::Io(e.into_error()))?;
        }
        publish(self.tmp, &self.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(Target::parse("-").unwrap().format, Format::Jsonl);
        assert_eq!(
            Target::parse("a/b.parquet").unwrap().format,
            Format::Parquet
        );
        assert_eq!(Target::parse("b.jsonl").unwrap().format, Format::Jsonl);
        assert!(Target::parse("b.csv").is_err());
        assert_eq!(
            Target::default_for("data/x.jsonl").path.unwrap(),
            PathBuf::from("data/x.scores.parquet")
        );
        assert_eq!(Target::default_for("-").path, None);
        assert_eq!(
            Target::default_for("hf://datasets/allenai/reward-bench@v1/data/*.parquet")
                .path
                .unwrap(),
            PathBuf::from("reward-bench.scores.parquet")
        );
    }

    #[test]
    fn score_columns_follow_input_columns() {
        let df =
            DataFrame::new_infer_height(vec![Column::new("id".into(), vec!["a", "b"])]).unwrap();
        let s = |x: f32| RowScore {
            score: x,
            rewards: vec![x, 1.0],
            gating: vec![0.5, 0.5],
            coefficients: vec![1.0, 0.0],
            num_tokens: 3,
        };
        let hashes = [Some("00ff".to_string()), None];
        let out = with_scores(&df, &[Some(s(1.0)), Some(s(2.0))], &hashes, None, None).unwrap();
        let names: Vec<String> = out
            .get_column_names()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "id",
                "score",
                "rewards",
                "gating",
                "coefficients",
                "num_tokens",
                "input_hash"
            ]
        );
        let hash = out.column("input_hash").unwrap().str().unwrap().clone();
        assert_eq!((hash.get(0), hash.get(1)), (Some("00ff"), None));
        assert_eq!(
            out.column("score").unwrap().f32().unwrap().get(1),
            Some(2.0)
        );
        assert!(with_scores(
            &out.select(["score"]).unwrap(),
            &[Some(s(1.0)), Some(s(2.0))],
            &hashes,
            None,
            None
        )
        .is_err());
    }
}
