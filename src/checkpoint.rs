//! Crash-safe, resumable file output: each scored window is committed as a part file in a hidden folder
//! beside the target, and the target appears (renamed into place) only once every part is joined. A run
//! killed at any moment leaves complete parts; `--resume` continues after the last one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use crate::output::{self, Format, OutputError, Sink, Target};

const MANIFEST: &str = "manifest.json";

/// The parts of one output, and what they were made from.
pub struct Checkpoint {
    dir: PathBuf,
    target: Target,
    metadata: Vec<(String, String)>,
    next: usize,
    joined: bool,
}

/// A run that stops on an error (not a kill) cleans up after itself: its parts could not be resumed
/// into the same output anyway. A killed process runs no destructor, so its parts stay for `--resume`.
impl Drop for Checkpoint {
    fn drop(&mut self) {
        if !self.joined {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn path_err(path: &Path, message: impl ToString) -> OutputError {
    OutputError::Path {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

impl Checkpoint {
    /// The parts folder of `target` (a file). Without `resume`, any earlier parts are discarded; with it,
    /// the earlier run's `fingerprint` must equal this one's. Returns the checkpoint and how many windows
    /// are already done.
    pub fn open(
        target: &Target,
        fingerprint: &serde_json::Value,
        resume: bool,
        metadata: Vec<(String, String)>,
    ) -> Result<(Self, usize), OutputError> {
        let path = target
            .path
            .clone()
            .ok_or_else(|| path_err(Path::new("-"), "stdout cannot be resumed"))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let dir = path.with_file_name(format!(".{name}.armorm-parts"));
        let manifest = dir.join(MANIFEST);
        let done = if resume && manifest.is_file() {
            let earlier: serde_json::Value = fs::read_to_string(&manifest)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .ok_or_else(|| path_err(&manifest, "unreadable checkpoint manifest"))?;
            if let Some(key) = differing_key(&earlier, fingerprint) {
                return Err(path_err(
                    &path,
                    format!("cannot resume: `{key}` differs from the interrupted run's (start again without --resume)"),
                ));
            }
            complete_parts(&dir, target.format)?
        } else {
            if dir.exists() {
                fs::remove_dir_all(&dir).map_err(|e| path_err(&dir, e))?;
            }
            fs::create_dir(&dir)
                .map_err(|e| path_err(&path, format!("cannot create the output file: {e}")))?;
            let text = serde_json::to_string_pretty(fingerprint).unwrap_or_default();
            write_atomically(&manifest, text.as_bytes())?;
            0
        };
        Ok((
            Self {
                dir,
                target: target.clone(),
                metadata,
                next: done,
                joined: false,
            },
            done,
        ))
    }

    fn part(&self, i: usize) -> PathBuf {
        let ext = match self.target.format {
            Format::Parquet => "parquet",
            Format::Jsonl => "jsonl",
        };
        self.dir.join(format!("part-{i:08}.{ext}"))
    }
}

/// The first top-level key whose value differs, if any.
fn differing_key(a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
        return (a != b).then(|| "manifest".to_string());
    };
    a.keys()
        .chain(b.keys())
        .find(|k| a.get(*k) != b.get(*k))
        .cloned()
}

/// Parts 0.. that exist without a gap; anything after a gap or half-written is removed.
fn complete_parts(dir: &Path, format: Format) -> Result<usize, OutputError> {
    let ext = if format == Format::Parquet {
        "parquet"
    } else {
        "jsonl"
    };
    let mut n = 0;
    while dir.join(format!("part-{n:08}.{ext}")).is_file() {
        n += 1;
    }
    for entry in fs::read_dir(dir).map_err(|e| path_err(dir, e))? {
        let entry = entry.map_err(|e| path_err(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let index = name
            .strip_prefix("part-")
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let keep = name == MANIFEST || index.is_some_and(|i| i < n) && name.ends_with(ext);
        if !keep {
            fs::remove_file(entry.path()).map_err(|e| path_err(&entry.path(), e))?;
        }
    }
    Ok(n)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| path_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| path_err(&tmp, e))?;
    f.sync_all().map_err(|e| path_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| path_err(path, e))
}

impl Sink for Checkpoint {
    fn write(&mut self, frame: &mut DataFrame) -> Result<(), OutputError> {
        let mut bytes = Vec::new();
        match self.target.format {
            Format::Parquet => {
                ParquetWriter::new(&mut bytes).finish(frame)?;
            }
            Format::Jsonl => JsonWriter::new(&mut bytes)
                .with_json_format(JsonFormat::JsonLines)
                .finish(frame)?,
        }
        write_atomically(&self.part(self.next), &bytes)?;
        self.next += 1;
        Ok(())
    }

    /// Joins the parts into the target (through the usual hidden temporary file), then removes them.
    fn finish(mut self: Box<Self>) -> Result<(), OutputError> {
        self.joined = true;
        let mut sink = output::open(&self.target, self.metadata.clone())?;
        for i in 0..self.next {
            let part = self.part(i);
            let file = File::open(&part).map_err(|e| path_err(&part, e))?;
            let mut frame = match self.target.format {
                Format::Parquet => ParquetReader::new(file).finish()?,
                Format::Jsonl => JsonReader::new(std::io::BufReader::new(file))
                    .with_json_format(JsonFormat::JsonLines)
                    .finish()?,
            };
            sink.write(&mut frame)?;
        }
        sink.finish()?;
        fs::remove_dir_all(&self.dir).map_err(|e| path_err(&self.dir, e))
    }
}

/// Size, modification time and a hash of the first MiB of each input: enough to refuse resuming over
/// different data.
pub fn input_fingerprint(path: &str) -> serde_json::Value {
    if path == "-" {
        return serde_json::json!({ "path": "-" });
    }
    let meta = fs::metadata(path).ok();
    let mtime = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64);
    let head = File::open(path).ok().map(|f| {
        let mut buf = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::Read::take(f, 1 << 20), &mut buf);
        fnv1a(&buf)
    });
    serde_json::json!({ "path": path, "size": meta.map(|m| m.len()), "mtime_ns": mtime, "head_fnv1a": head })
}

fn fnv1a(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}
