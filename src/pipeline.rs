//! The streaming engine: read and tokenize ahead on worker threads, score length-sorted windows in
//! token-budget batches, and write each window as soon as it is scored, in input order.
//!
//! Stages run concurrently and talk through bounded channels, so memory holds at most a few windows
//! whatever the input size:
//!
//! ```text
//! reader + tokenizers ──(encoded window)──▶ model ──(scored window)──▶ writer
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Instant;

use polars::prelude::{DataFrame, Schema};
use rayon::prelude::*;

use crate::chat::Message;
use crate::encoder::{Encoded, Encoder};
use crate::input::{self, Chunk, ChunkSource, InputError, Location};
use crate::model::RowScore;
use crate::output::{self, OutputError, RowStatus, Sink, Status, TopK};
use crate::provenance;
use crate::scorer::{RowFailure, Scorer};
use crate::shard::Shard;
use crate::signal::{self, Interrupted};

/// Windows in flight between two stages; two keep every stage busy while bounding memory.
const QUEUE: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Input(#[from] InputError),
    #[error("{location}: {message}")]
    Row { location: Location, message: String },
    #[error("running the model: {0}")]
    Model(candle_core::Error),
    #[error("{input}: {message}")]
    Schema { input: String, message: String },
    #[error("writing the output: {0}")]
    Output(#[from] OutputError),
    /// SIGINT or SIGTERM: the run stopped at a window boundary.
    #[error("{0}")]
    Interrupted(Interrupted),
}

/// An input to open when the reader reaches it.
pub type Opener = Box<dyn FnOnce() -> Result<Box<dyn ChunkSource + Send>, InputError> + Send>;

/// One input of a run.
pub struct InputSource {
    /// For errors.
    pub name: String,
    /// Its part of the total input size, from 0 to 1, for progress.
    pub share: f64,
    pub open: Opener,
}

/// Counts for progress and the final summary.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub rows: usize,
    /// Rows kept without scores (`--on-error skip`).
    pub skipped: usize,
    /// How far into the inputs the last written window was, when known.
    pub fraction: Option<f64>,
    pub tokens: usize,
    /// Tokens the model computed, padding included (rows × longest row, per batch).
    pub padded_tokens: usize,
    /// Tokens prefix sharing did not compute: a shared prompt once instead of once per row; `None`
    /// when sharing is off.
    pub shared_tokens: Option<usize>,
    pub seconds: f64,
}

impl Stats {
    pub fn tokens_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.tokens as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Padding as a share of the real tokens computed (those prefix sharing saved not counted), in
    /// percent.
    pub fn padding_overhead(&self) -> f64 {
        let computed = self.tokens.saturating_sub(self.shared_tokens.unwrap_or(0));
        if computed == 0 {
            0.0
        } else {
            100.0 * (self.padded_tokens as f64 - computed as f64) / computed as f64
        }
    }
}

/// Told about progress from the writer's thread.
pub trait Observer {
    /// A window was written; `input_fraction` is how far into the inputs the reader was, if known.
    fn written(&self, stats: &Stats, input_fraction: Option<f64>);
}

/// A window read and tokenized, on its way to the model.
struct EncodedWindow {
    /// The window's place in the output.
    seq: usize,
    chunk: Chunk,
    input: String,
    encoded: Vec<Option<Encoded>>,
    /// Each encoded row's `input_hash`, computed here on the tokenizing threads.
    hashes: Vec<Option<String>>,
    statuses: Vec<RowStatus>,
    fraction: Option<f64>,
}

/// A window scored, on its way to the writer.
struct Scored {
    seq: usize,
    frame: DataFrame,
    input: String,
    scores: Vec<Option<RowScore>>,
    hashes: Vec<Option<String>>,
    statuses: Vec<RowStatus>,
    tokens: usize,
    padded: usize,
    saved: Option<usize>,
    fraction: Option<f64>,
}

/// What to add to the rows and which rows to take.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub top: Option<TopK>,
    pub shard: Option<Shard>,
    pub policy: Policy,
    /// Windows already written by an interrupted run (`--resume`): read again, not scored.
    pub skip_windows: usize,
    /// Keep an input column named like one armorm writes as `input_NAME` instead of refusing the input.
    pub rename_input_columns: bool,
}

impl Policy {
    /// Whether the output gets `status` and `error` columns.
    pub fn status_columns(&self) -> bool {
        self.skip_bad || self.truncate
    }
}

/// Runs the whole dataset, input after input, through `encode` and `scorer` into `sink`.
pub fn run(
    inputs: Vec<InputSource>,
    encode: &EncodeStage,
    scorer: &Scorer,
    sink: Box<dyn Sink + Send>,
    options: Options,
    observer: &(dyn Observer + Sync),
) -> Result<Stats, PipelineError> {
    let status_columns = options.policy.status_columns();
    let reserved = Reserved {
        names: output::written_columns(status_columns, options.top.is_some()),
        rename: options.rename_input_columns,
    };
    let Options {
        top,
        shard,
        policy,
        skip_windows,
        ..
    } = options;
    let start = Instant::now();
    let (enc_tx, enc_rx) = sync_channel::<Result<EncodedWindow, PipelineError>>(QUEUE);
    let (out_tx, out_rx) = sync_channel::<Option<Scored>>(QUEUE);
    let stop = AtomicBool::new(false);
    // The input's columns, known from its first window even when no row of it is kept (a shard).
    let input_schema = OnceLock::new();
    thread::scope(|s| {
        let schema = &input_schema;
        let reader = s.spawn(move || {
            read_and_encode(
                inputs,
                encode,
                Selection {
                    shard,
                    skip_windows,
                },
                policy,
                reserved,
                schema,
                enc_tx,
            )
        });
        let writer = s.spawn(move || {
            let mut writer = WindowWriter {
                schema: None,
                input_schema: schema,
                stats: Stats::default(),
                top,
                status_columns,
            };
            write(&mut writer, out_rx, sink, skip_windows + 1, start, observer)
        });
        // One scoring thread per model (`--device cuda:0,cuda:1`), all fed from the same queue.
        let enc_rx = Arc::new(Mutex::new(enc_rx));
        let stop = &stop;
        let workers: Vec<_> = (0..scorer.models())
            .map(|m| {
                let (tx, rx) = (out_tx.clone(), Arc::clone(&enc_rx));
                s.spawn(move || score_windows(&rx, scorer, m, tx, stop, policy.skip_bad))
            })
            .collect();
        let mut scored = Ok(());
        for w in workers {
            let r = w.join().unwrap_or(Ok(()));
            if scored.is_ok() {
                scored = r;
            }
        }
        // Only now may the writer finish the output: after any error it is dropped, unfinished.
        if scored.is_ok() {
            let _ = out_tx.send(None);
        }
        drop(out_tx);
        // The reader may wait on a full queue that nobody reads any more.
        drop(enc_rx);
        // The first error in pipeline order wins: a reader error explains why the model stopped.
        let read = reader.join().unwrap_or(Ok(()));
        let written = writer.join().unwrap_or(Ok(None));
        read?;
        scored?;
        // Without an error upstream the writer saw the end marker and finished the output.
        written?.ok_or_else(|| PipelineError::Schema {
            input: "output".into(),
            message: "the writer stopped before the end of the input".into(),
        })
    })
}

fn read_and_encode(
    inputs: Vec<InputSource>,
    encode: &EncodeStage,
    select: Selection,
    policy: Policy,
    reserved: Reserved,
    input_schema: &OnceLock<Schema>,
    tx: SyncSender<Result<EncodedWindow, PipelineError>>,
) -> Result<(), PipelineError> {
    let mut window = 0usize;
    let mut done_share = 0.0;
    // Rows counted from 0 across all inputs: the key of the shard assignment.
    let mut next_row = 0usize;
    for InputSource { name, share, open } in inputs {
        let mut source = match open() {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Err(e.into()));
                return Ok(());
            }
        };
        loop {
            if let Err(e) = signal::check() {
                let _ = tx.send(Err(PipelineError::Interrupted(e)));
                return Ok(());
            }
            // Checked as each window is read, so a clash stops the run before that window is scored.
            let chunk = match source.next_chunk().and_then(|c| reserved.check(c, &name)) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e.into()));
                    return Ok(());
                }
            };
            let fraction = source.fraction_read().map(|f| done_share + f * share);
            let first = next_row;
            next_row += chunk.conversations.len();
            let chunk = match select.shard {
                Some(s) => match chunk.retain(|i| s.keeps(first + i)) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return Ok(());
                    }
                },
                None => chunk,
            };
            if input_schema.get().is_none() {
                let _ = input_schema.set(chunk.frame.schema().as_ref().clone());
            }
            if chunk.conversations.is_empty() {
                continue;
            }
            window += 1;
            if window <= select.skip_windows {
                continue;
            }
            let item = encode_chunk(&chunk, encode, policy).map(|(encoded, statuses)| {
                let hashes = encoded
                    .par_iter()
                    .map(|e| e.as_ref().map(|e| provenance::input_hash(&e.ids)))
                    .collect();
                EncodedWindow {
                    seq: window,
                    chunk,
                    input: name.clone(),
                    encoded,
                    hashes,
                    statuses,
                    fraction,
                }
            });
            let failed = item.is_err();
            // A closed channel means the model stage stopped: its error is reported there.
            if tx.send(item).is_err() || failed {
                return Ok(());
            }
        }
        done_share += share;
    }
    Ok(())
}

/// Which rows the reader passes on: this shard's, after the windows an interrupted run completed.
struct Selection {
    shard: Option<Shard>,
    skip_windows: usize,
}

/// The columns armorm adds, which an input column must not be named like.
struct Reserved {
    names: Vec<&'static str>,
    rename: bool,
}

impl Reserved {
    fn check(&self, chunk: Option<Chunk>, input: &str) -> Result<Option<Chunk>, InputError> {
        let Some(mut chunk) = chunk else {
            return Ok(None);
        };
        input::reserve_columns(&mut chunk.frame, &self.names, self.rename, input)?;
        Ok(Some(chunk))
    }
}

/// How rows that cannot be scored as they are are handled.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Keep bad rows (null scores, `status` and `error` columns) instead of stopping at the first.
    pub skip_bad: bool,
    /// Drop the oldest prompt tokens of rows over the length limit instead of refusing them.
    pub truncate: bool,
}

/// The encode stage: a conversation to token ids, a gate position and a status, under --max-length.
pub struct EncodeStage {
    pub encoder: Encoder,
    pub max_length: usize,
}

impl EncodeStage {
    /// One row: its encoding and status, or the status saying why it has none.
    fn row(&self, messages: &[Message], truncate: bool) -> Result<(Encoded, RowStatus), RowStatus> {
        let error = |status, e: String| RowStatus {
            status,
            error: Some(e),
        };
        if let Some(e) = self.certainly_too_long(messages, truncate) {
            return Err(error(Status::TooLong, e));
        }
        let enc = self
            .encoder
            .encode(messages)
            .map_err(|e| error(Status::Error, e))?;
        let max = self.max_length;
        if enc.ids.len() <= max {
            return Ok((enc, RowStatus::ok()));
        }
        let truncated = truncate
            .then(|| self.encoder.truncate_prompt_left(&enc, max))
            .flatten();
        match truncated {
            Some(t) => Ok((
                t,
                RowStatus {
                    status: Status::Truncated,
                    error: None,
                },
            )),
            None => {
                let tokens = format!("{} tokens", enc.ids.len());
                Err(error(
                    Status::TooLong,
                    self.too_long("the conversation", &tokens),
                ))
            }
        }
    }

    /// A row over --max-length by its length alone, refused before rendering and tokenizing it (which
    /// take time and memory in proportion to the text). Under truncation only the response must fit.
    fn certainly_too_long(&self, messages: &[Message], truncate: bool) -> Option<String> {
        let (counted, what) = if truncate {
            (
                &messages[messages.len().saturating_sub(1)..],
                "the response alone",
            )
        } else {
            (messages, "the conversation")
        };
        let at_least = self.encoder.min_tokens(counted);
        (at_least > self.max_length)
            .then(|| self.too_long(what, &format!("at least {at_least} tokens by its length")))
    }

    fn too_long(&self, what: &str, tokens: &str) -> String {
        format!(
            "{what} is {tokens}, over --max-length {}; armorm never truncates silently (see \
             --truncate prompt-left)",
            self.max_length
        )
    }
}

/// Tokenizes a window on all worker threads; under `skip_bad` a row that cannot be scored gets a status,
/// otherwise the first one stops the run.
fn encode_chunk(
    chunk: &Chunk,
    encode: &EncodeStage,
    policy: Policy,
) -> Result<(Vec<Option<Encoded>>, Vec<RowStatus>), PipelineError> {
    let rows: Vec<Result<(Encoded, RowStatus), RowStatus>> = chunk
        .conversations
        .par_iter()
        .map(|row| match row {
            Ok(messages) => encode.row(messages, policy.truncate),
            // A row the reader could not take has null input columns: the error says where it was.
            Err(e) => Err(RowStatus {
                status: Status::Error,
                error: Some(e.to_string()),
            }),
        })
        .collect();
    let mut encoded = Vec::with_capacity(rows.len());
    let mut statuses = Vec::with_capacity(rows.len());
    for (i, row) in rows.into_iter().enumerate() {
        match row {
            Ok((e, st)) => {
                encoded.push(Some(e));
                statuses.push(st);
            }
            Err(st) if policy.skip_bad => {
                encoded.push(None);
                statuses.push(st);
            }
            Err(st) => {
                return Err(match &chunk.conversations[i] {
                    Err(e) => PipelineError::Input(e.clone()),
                    Ok(_) => PipelineError::Row {
                        location: chunk.locations[i].clone(),
                        message: st.error.unwrap_or_default(),
                    },
                })
            }
        }
    }
    Ok((encoded, statuses))
}

fn score_windows(
    rx: &Mutex<Receiver<Result<EncodedWindow, PipelineError>>>,
    scorer: &Scorer,
    model: usize,
    tx: SyncSender<Option<Scored>>,
    stop: &AtomicBool,
    skip_bad: bool,
) -> Result<(), PipelineError> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Between windows: the one just scored is on its way to the writer, which commits it.
        if let Err(e) = signal::check() {
            stop.store(true, Ordering::Relaxed);
            return Err(PipelineError::Interrupted(e));
        }
        // The lock is held only while taking the next window, not while scoring it.
        let next = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return Ok(()),
        };
        let Ok(item) = next else {
            return Ok(());
        };
        let result = score_window(item, scorer, model, skip_bad);
        match result {
            Ok(scored) => {
                if tx.send(Some(scored)).is_err() {
                    // The writer stopped on an error, which it returns.
                    return Ok(());
                }
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
    }
}

/// Scores one window; a row the model could not score (out of memory alone, not finite) stops the run,
/// or under `skip_bad` gets its status.
fn score_window(
    item: Result<EncodedWindow, PipelineError>,
    scorer: &Scorer,
    model: usize,
    skip_bad: bool,
) -> Result<Scored, PipelineError> {
    let EncodedWindow {
        seq,
        chunk,
        input,
        encoded,
        hashes,
        statuses,
        fraction,
    } = item?;
    let mut statuses = statuses;
    let scored = scorer
        .score_window(model, &encoded)
        .map_err(PipelineError::Model)?;
    let (results, padded, saved) = (scored.rows, scored.padded, scored.saved);
    let mut scores: Vec<Option<RowScore>> = vec![None; encoded.len()];
    for (i, result) in results.into_iter().enumerate() {
        match result {
            None => {}
            Some(Ok(s)) => scores[i] = Some(s),
            Some(Err(failure)) if skip_bad => {
                statuses[i] = RowStatus {
                    status: match failure {
                        RowFailure::OutOfMemory { .. } => Status::Oom,
                        RowFailure::NonFinite { .. } => Status::NonFinite,
                    },
                    error: Some(failure.to_string()),
                }
            }
            Some(Err(failure)) => {
                return Err(PipelineError::Row {
                    location: chunk.locations[i].clone(),
                    message: failure.to_string(),
                })
            }
        }
    }
    let tokens = encoded.iter().flatten().map(|e| e.ids.len()).sum();
    Ok(Scored {
        seq,
        frame: chunk.frame,
        input,
        scores,
        hashes,
        statuses,
        tokens,
        padded,
        saved,
        fraction,
    })
}

/// Writes windows in order until the end marker, then finishes the sink; returns `None` (leaving the
/// output unfinished: nothing appears at the target) when the stages before it stopped without one.
fn write(
    writer: &mut WindowWriter,
    rx: Receiver<Option<Scored>>,
    mut sink: Box<dyn Sink + Send>,
    first_seq: usize,
    start: Instant,
    observer: &(dyn Observer + Sync),
) -> Result<Option<Stats>, PipelineError> {
    // Several models finish windows out of order: each waits here until its turn.
    let mut pending: BTreeMap<usize, Scored> = BTreeMap::new();
    let mut next = first_seq;
    for w in rx {
        let Some(w) = w else {
            if !pending.is_empty() {
                return Ok(None);
            }
            // Not a row anywhere (a shard of a short input): the output still gets every column.
            if first_seq == 1 && writer.schema.is_none() {
                writer.write_empty(sink.as_mut())?;
            }
            sink.finish()?;
            writer.stats.seconds = start.elapsed().as_secs_f64();
            return Ok(Some(writer.stats));
        };
        pending.insert(w.seq, w);
        while let Some(w) = pending.remove(&next) {
            next += 1;
            writer.write(w, sink.as_mut())?;
            writer.stats.seconds = start.elapsed().as_secs_f64();
            observer.written(&writer.stats, writer.stats.fraction);
        }
    }
    Ok(None)
}

struct WindowWriter<'a> {
    schema: Option<Schema>,
    input_schema: &'a OnceLock<Schema>,
    stats: Stats,
    top: Option<TopK>,
    status_columns: bool,
}

impl WindowWriter<'_> {
    /// No rows, with the columns that rows would have had.
    fn write_empty(&mut self, sink: &mut (dyn Sink + Send)) -> Result<(), PipelineError> {
        let Some(schema) = self.input_schema.get() else {
            return Ok(());
        };
        let frame = DataFrame::empty_with_schema(schema);
        let statuses = self.status_columns.then_some(&[][..]);
        let mut scored = output::with_scores(&frame, &[], &[], statuses, self.top.as_ref())?;
        sink.write(&mut scored)?;
        Ok(())
    }

    fn write(&mut self, w: Scored, sink: &mut (dyn Sink + Send)) -> Result<(), PipelineError> {
        let frame = match &self.schema {
            None => {
                self.schema = Some(w.frame.schema().as_ref().clone());
                w.frame
            }
            Some(s) => output::conform(w.frame, s).map_err(|message| PipelineError::Schema {
                input: w.input.clone(),
                message,
            })?,
        };
        let statuses = self.status_columns.then_some(w.statuses.as_slice());
        let mut scored =
            output::with_scores(&frame, &w.scores, &w.hashes, statuses, self.top.as_ref())?;
        sink.write(&mut scored)?;
        self.stats.skipped += w.statuses.iter().filter(|s| s.skipped()).count();
        self.stats.rows += w.scores.len();
        self.stats.tokens += w.tokens;
        self.stats.padded_tokens += w.padded;
        if let Some(saved) = w.saved {
            self.stats.shared_tokens = Some(self.stats.shared_tokens.unwrap_or(0) + saved);
        }
        self.stats.fraction = w.fraction;
        Ok(())
    }
}
