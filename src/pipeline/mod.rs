//! The streaming engine: read and tokenize ahead on worker threads, score length-sorted windows in
//! token-budget batches, and write each window as soon as it is scored, in input order.
//!
//! Stages run concurrently and talk through bounded channels, so memory holds at most a few windows
//! whatever the input size:
//!
//! ```text
//! reader + tokenizers ──(encoded window)──▶ model ──(scored window)──▶ writer
//! ```
//!
//! One file per stage: `read` (inputs in windows, shards, resume), `encode` (conversations to token ids
//! under --max-length), `score` (windows through the model), `write` (windows out in input order).

mod encode;
mod read;
mod score;
mod write;

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Instant;

use polars::prelude::DataFrame;

use crate::encoder::Encoded;
use crate::input::{Chunk, ChunkSource, InputError, Location};
use crate::model::RowScore;
use crate::output::{self, OutputError, RowStatus, Sink, TopK};
use crate::scorer::Scorer;
use crate::shard::Shard;
use crate::signal::Interrupted;

pub use encode::EncodeStage;
use read::{read_and_encode, Reserved, Selection};
use score::score_windows;
use write::{write, WindowWriter};

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

/// How rows that cannot be scored as they are are handled.
#[derive(Debug, Clone, Copy, Default)]
pub struct Policy {
    /// Keep bad rows (null scores, `status` and `error` columns) instead of stopping at the first.
    pub skip_bad: bool,
    /// Drop the oldest prompt tokens of rows over the length limit instead of refusing them.
    pub truncate: bool,
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
