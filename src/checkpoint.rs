//! Crash-safe, resumable file output: each scored window is committed as a part file in a hidden folder
//! beside the target, and the target appears (renamed into place) only once every part is joined. A run
//! that stops early (an error, SIGINT/SIGTERM, a kill) leaves complete parts; `--resume` continues after
//! the last one. A lock file beside the target keeps two runs from writing it at once.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use polars::prelude::*;

use crate::output::{self, OutputError, Sink, Target};
use crate::parquet_out;
use crate::signal;

const MANIFEST: &str = "manifest.json";

/// The parts of one output, and what they were made from.
pub struct Checkpoint {
    dir: PathBuf,
    target: Target,
    metadata: Vec<(String, String)>,
    /// The columns and types of the run's first window: every part, and the output, has exactly these.
    schema: Option<Schema>,
    next: usize,
    joined: bool,
    _lock: Lock,
}

/// A run that stopped before committing any window leaves nothing behind; committed parts stay for
/// `--resume` (see `saved_windows`).
impl Drop for Checkpoint {
    fn drop(&mut self) {
        if !self.joined && self.next == 0 {
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

/// A hidden name beside `target`: `.NAME.SUFFIX`.
fn beside(target: &Path, suffix: &str) -> PathBuf {
    let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    target.with_file_name(format!(".{name}.{suffix}"))
}

/// The parts folder of `target`.
pub fn parts_dir(target: &Path) -> PathBuf {
    beside(target, "armorm-parts")
}

/// How many committed windows an earlier run of `target` left for `--resume`.
pub fn saved_windows(target: &Path) -> usize {
    count_parts(&parts_dir(target))
}

fn part_name(i: usize) -> String {
    format!("part-{i:08}.parquet")
}

fn count_parts(dir: &Path) -> usize {
    let mut n = 0;
    while dir.join(part_name(n)).is_file() {
        n += 1;
    }
    n
}

/// What to do with the parts of an earlier run of the same target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Earlier {
    /// Refuse to touch them (the default: they may hold hours of work).
    Keep,
    /// Continue them, if they were made from the same fingerprint.
    Resume,
    /// Discard them.
    Overwrite,
}

impl Checkpoint {
    /// The parts folder of `target` (a file), locked for this process. Earlier parts are resumed,
    /// discarded or refused as `earlier` says; a resumed run's `fingerprint` must equal the earlier
    /// one's. Returns the checkpoint and how many windows are already done.
    pub fn open(
        target: &Target,
        fingerprint: &serde_json::Value,
        earlier: Earlier,
        metadata: Vec<(String, String)>,
    ) -> Result<(Self, usize), OutputError> {
        let path = target
            .path
            .clone()
            .ok_or_else(|| path_err(Path::new("-"), "stdout cannot be resumed"))?;
        let lock = Lock::acquire(&path)?;
        remove_stale_staging(&path);
        let dir = parts_dir(&path);
        let manifest = dir.join(MANIFEST);
        let (done, schema) = if earlier == Earlier::Resume && manifest.is_file() {
            resume(&dir, &manifest, fingerprint)?
        } else {
            let saved = count_parts(&dir);
            if saved > 0 && earlier != Earlier::Overwrite {
                return Err(path_err(
                    &path,
                    format!(
                        "{} holds {saved} scored windows of an earlier run: add --resume to continue \
                         it, or --overwrite to discard them and start again",
                        dir.display()
                    ),
                ));
            }
            if dir.exists() {
                fs::remove_dir_all(&dir).map_err(|e| path_err(&dir, e))?;
            }
            fs::create_dir(&dir)
                .map_err(|e| path_err(&path, format!("cannot create the output file: {e}")))?;
            let text = serde_json::to_string_pretty(fingerprint).unwrap_or_default();
            write_atomically(&manifest, text.as_bytes())?;
            (0, None)
        };
        Ok((
            Self {
                dir,
                target: target.clone(),
                metadata,
                schema,
                next: done,
                joined: false,
                _lock: lock,
            },
            done,
        ))
    }

    fn part(&self, i: usize) -> PathBuf {
        self.dir.join(part_name(i))
    }
}

/// The earlier run's complete parts, and its schema (that of its first part).
fn resume(
    dir: &Path,
    manifest: &Path,
    fingerprint: &serde_json::Value,
) -> Result<(usize, Option<Schema>), OutputError> {
    let earlier: serde_json::Value = fs::read_to_string(manifest)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .ok_or_else(|| path_err(manifest, "unreadable checkpoint manifest"))?;
    if let Some(key) = differing_key(&earlier, fingerprint) {
        // A key the manifest lacks was added to armorm since: its parts may lack a column (input_hash).
        let what = match earlier.get(&key) {
            None => format!("the interrupted run was made by an older armorm, without `{key}`"),
            Some(_) => format!("`{key}` differs from the interrupted run's"),
        };
        return Err(path_err(
            dir,
            format!(
                "cannot resume: {what}; add --overwrite (instead of --resume) to discard its {} \
                 scored windows and start again",
                count_parts(dir)
            ),
        ));
    }
    let done = complete_parts(dir)?;
    let schema = match done {
        0 => None,
        _ => Some(
            read_part(&dir.join(part_name(0)))?
                .schema()
                .as_ref()
                .clone(),
        ),
    };
    Ok((done, schema))
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
fn complete_parts(dir: &Path) -> Result<usize, OutputError> {
    let n = count_parts(dir);
    for entry in fs::read_dir(dir).map_err(|e| path_err(dir, e))? {
        let entry = entry.map_err(|e| path_err(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let index = name
            .strip_prefix("part-")
            .and_then(|r| r.strip_suffix(".parquet"))
            .and_then(|i| i.parse::<usize>().ok());
        let keep = name == MANIFEST || index.is_some_and(|i| i < n);
        if !keep {
            fs::remove_file(entry.path()).map_err(|e| path_err(&entry.path(), e))?;
        }
    }
    Ok(n)
}

/// The hidden `.NAME.*.partial` files of a run of the same target that was killed while joining:
/// under the lock, no live run owns them. Best effort: a leftover only costs disk space.
fn remove_stale_staging(target: &Path) {
    let Some(name) = target.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = format!(".{name}.");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        if file.starts_with(&prefix) && file.ends_with(".partial") {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| path_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| path_err(&tmp, e))?;
    f.sync_all().map_err(|e| path_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| path_err(path, e))
}

fn read_part(part: &Path) -> Result<DataFrame, OutputError> {
    let file = File::open(part).map_err(|e| path_err(part, e))?;
    ParquetReader::new(file)
        .finish()
        .map_err(|e| path_err(part, format!("unreadable part: {e}")))
}

impl Checkpoint {
    /// `frame` with the run's schema (set by the first window).
    fn conformed(&mut self, frame: &mut DataFrame) -> Result<DataFrame, OutputError> {
        match &self.schema {
            None => {
                self.schema = Some(frame.schema().as_ref().clone());
                Ok(std::mem::take(frame))
            }
            Some(s) => output::conform(std::mem::take(frame), s)
                .map_err(|m| path_err(&self.dir, format!("a window {m}"))),
        }
    }
}

impl Sink for Checkpoint {
    /// Parts are Parquet whatever the target's format: they keep the exact types, so that joining
    /// them infers nothing.
    fn write(&mut self, frame: &mut DataFrame) -> Result<(), OutputError> {
        let mut frame = self.conformed(frame)?;
        let bytes = parquet_out::to_bytes(&mut frame)?;
        write_atomically(&self.part(self.next), &bytes)?;
        self.next += 1;
        Ok(())
    }

    /// Joins the parts into the target (through the usual hidden temporary file), then removes them.
    fn finish(mut self: Box<Self>) -> Result<(), OutputError> {
        let mut sink = output::open(&self.target, self.metadata.clone())?;
        for i in 0..self.next {
            // Dropping the unfinished sink removes its temporary file; the parts stay.
            signal::check().map_err(|e| path_err(&self.dir, e))?;
            let mut frame = read_part(&self.part(i))?;
            let mut frame = self.conformed(&mut frame)?;
            sink.write(&mut frame)?;
        }
        sink.finish()?;
        self.joined = true;
        fs::remove_dir_all(&self.dir).map_err(|e| path_err(&self.dir, e))
    }
}

/// A lock file beside the target, holding the owner's pid and host: a second run on the same target
/// is refused while the owner lives; a lock whose process is gone (a killed run) is taken over.
struct Lock {
    path: PathBuf,
}

impl Lock {
    fn acquire(target: &Path) -> Result<Self, OutputError> {
        let path = beside(target, "armorm-lock");
        let me = format!("{} {}\n", std::process::id(), hostname());
        for _ in 0..3 {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(me.as_bytes()).map_err(|e| path_err(&path, e))?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let held = fs::read_to_string(&path).unwrap_or_default();
                    if let Some(owner) = live_owner(&held) {
                        return Err(path_err(
                            target,
                            format!(
                                "another armorm run ({owner}) is writing this output; if it is gone, \
                                 delete {}",
                                path.display()
                            ),
                        ));
                    }
                    // Stale: its process is gone.
                    let _ = fs::remove_file(&path);
                }
                // Typically a folder that does not exist: the output cannot be created either.
                Err(e) => {
                    return Err(path_err(
                        target,
                        format!("cannot create the output file: {e}"),
                    ))
                }
            }
        }
        Err(path_err(&path, "cannot take the lock file"))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// "pid N on host H" when the lock's owner may still run: its pid is alive here, or it ran on another
/// host (which cannot be checked from here).
fn live_owner(lock: &str) -> Option<String> {
    let mut words = lock.split_whitespace();
    let pid: i32 = words.next()?.parse().ok()?;
    // A lock without a host was written by hand on this one.
    let host = words.next().map_or_else(hostname, str::to_string);
    let owner = format!("pid {pid} on host {host}");
    if host != hostname() {
        return Some(owner);
    }
    if pid <= 0 || pid as u32 == std::process::id() {
        return None;
    }
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let alive = unsafe { libc::kill(pid, 0) } == 0
        || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    alive.then_some(owner)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; the name is NUL-terminated when it fits.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A hub file by its name at the resolved commit and its size: the commit fixes its bytes, so a run
/// resumes whatever cache holds them, and is refused once the revision names another commit. Any other
/// file by `input_fingerprint`.
pub fn file_fingerprint(file: &crate::input::InputFile) -> serde_json::Value {
    match &file.pinned {
        Some(name) => {
            let size = fs::metadata(&file.path).ok().map(|m| m.len());
            serde_json::json!({ "path": name, "size": size })
        }
        None => input_fingerprint(&file.path),
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
