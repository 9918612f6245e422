//! Scores a window of encoded rows: bucket by length, run the model, and return the outputs in window
//! order.

use std::cmp::Reverse;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::batch;
use crate::encoder::Encoded;
use crate::model::{ArmoRM, FlatBatch, HeadOutput, Profile, RowScore, Section};

/// Why one row has no scores although the model ran: the rest of its window is unaffected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RowFailure {
    /// The row alone does not fit in the device's memory.
    #[error("out of memory scoring this row alone ({tokens} tokens): {message}")]
    OutOfMemory { tokens: usize, message: String },
    /// A broken or overflowing checkpoint: a number that is not a number must never be written as `ok`.
    #[error("the model's {field} is not finite (NaN or infinite) for this row")]
    NonFinite { field: &'static str },
}

/// A row's outputs, or why it has none.
pub type RowResult = Result<RowScore, RowFailure>;

pub struct Scorer {
    /// One copy of the model per device; windows are shared among them.
    models: Vec<ArmoRM>,
    /// Batches of one window scored at once on one model, each on its own thread (CPU: see
    /// `with_lanes`).
    lanes: usize,
    /// The token budget in force: `max_batch_tokens`, lowered after an out-of-memory error.
    budget: AtomicUsize,
    oom_logged: AtomicBool,
    /// Fault injection for tests (`ARMORM_SIMULATE_OOM_ABOVE_TOKENS`): batches (single rows included)
    /// above this many padded tokens fail as if the GPU were out of memory.
    simulate_oom_above: Option<usize>,
    /// Where the time of each forward pass goes, when asked for (`with_profile`).
    profile: Option<Arc<Profile>>,
}

impl Scorer {
    /// `models`: one or more copies of the model (one per device); at least one.
    pub fn new(models: Vec<ArmoRM>, max_batch_tokens: usize) -> Self {
        Self {
            models,
            lanes: 1,
            budget: AtomicUsize::new(max_batch_tokens.max(1)),
            oom_logged: AtomicBool::new(false),
            simulate_oom_above: std::env::var("ARMORM_SIMULATE_OOM_ABOVE_TOKENS")
                .ok()
                .and_then(|v| v.parse().ok()),
            profile: None,
        }
    }

    /// Times every section of every forward pass, and each batch end to end, into `profile`: a
    /// breakdown of where the device's time goes, at the cost of synchronizing it around each
    /// section (see `model::profile`).
    pub fn with_profile(mut self, profile: Arc<Profile>) -> Self {
        self.models = std::mem::take(&mut self.models)
            .into_iter()
            .map(|m| m.with_profile(profile.clone()))
            .collect();
        self.profile = Some(profile);
        self
    }

    pub fn profile(&self) -> Option<&Profile> {
        self.profile.as_deref()
    }

    /// Scores `lanes` batches of a window at once, each on its own thread, and splits the token budget
    /// among them so that activations take no more memory than one batch at the full budget. On a CPU
    /// whose matmuls run single-threaded this beats one batch at a time with threaded matmuls: no
    /// synchronization inside every GEMM, and the elementwise work runs in parallel too
    /// (scripts/perf-notes.md, note 7).
    pub fn with_lanes(mut self, lanes: usize) -> Self {
        self.lanes = lanes.max(1);
        self
    }

    /// How many model copies (devices) score in parallel.
    pub fn models(&self) -> usize {
        self.models.len()
    }

    /// Scores the rows of a window that are there (`None`: a row not to score) on model copy `model`,
    /// in length-sorted batches; returns each row's outputs in the window's order and the padded tokens
    /// computed.
    pub fn score_window(
        &self,
        model: usize,
        window: &[Option<Encoded>],
    ) -> candle_core::Result<(Vec<Option<RowResult>>, usize)> {
        let (rows, encoded): (Vec<usize>, Vec<&Encoded>) = window
            .iter()
            .enumerate()
            .filter_map(|(i, e)| Some((i, e.as_ref()?)))
            .unzip();
        let model = &self.models[model.min(self.models.len() - 1)];
        let lens: Vec<usize> = encoded.iter().map(|e| e.ids.len()).collect();
        let lanes = self.lanes.min(encoded.len()).max(1);
        // Each lane's batches get a share of the budget, so activations stay within one full batch.
        let budget = (self.budget.load(Ordering::Relaxed) / lanes).max(1);
        let mut batches = batch::plan(&lens, budget);
        // Longest work first, so that the lanes run out of work at about the same time.
        batches.sort_by_key(|rows| {
            Reverse(rows.len() * rows.iter().map(|&i| lens[i]).max().unwrap_or(0))
        });
        let next = AtomicUsize::new(0);
        let lane = || self.lane(model, &encoded, &batches, &next);
        // No thread for a lane that would find the queue empty.
        let lanes = lanes.min(batches.len()).max(1);
        let results: Vec<Lane> = std::thread::scope(|s| {
            let others: Vec<_> = (1..lanes).map(|_| s.spawn(lane)).collect();
            let mut results = vec![lane()];
            for handle in others {
                results.push(
                    handle
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p)),
                );
            }
            results
        });
        let mut out: Vec<Option<RowResult>> = vec![None; window.len()];
        let mut padded = 0;
        for result in results {
            let (scored, tokens) = result?;
            padded += tokens;
            // Back to window order: the reorder step after length sorting.
            for (i, s) in scored {
                out[rows[i]] = Some(s);
            }
        }
        Ok((out, padded))
    }

    /// Takes batches from the shared queue until it is empty; on an error, empties it for the other
    /// lanes too.
    fn lane(
        &self,
        model: &ArmoRM,
        encoded: &[&Encoded],
        batches: &[Vec<usize>],
        next: &AtomicUsize,
    ) -> Lane {
        let mut scored = Vec::new();
        let mut padded = 0;
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(rows) = batches.get(i) else {
                return Ok((scored, padded));
            };
            match self.score_rows(model, encoded, rows, &mut scored) {
                Ok(tokens) => padded += tokens,
                Err(e) => {
                    next.store(batches.len(), Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }

    /// One batch; on an out-of-memory error it is split in two and retried, and the budget lowered for
    /// the batches after it. Returns the padded tokens computed.
    fn score_rows(
        &self,
        model: &ArmoRM,
        encoded: &[&Encoded],
        rows: &[usize],
        out: &mut Vec<(usize, RowResult)>,
    ) -> candle_core::Result<usize> {
        let mut flat = FlatBatch::new();
        for &i in rows {
            flat.push(&encoded[i].ids, encoded[i].gate);
        }
        let tokens = flat.padded_tokens();
        let started = self.profile.as_ref().map(|_| Instant::now());
        match self.forward(model, &flat) {
            Ok(head) => {
                let scored = self.unpack(&head, &flat.lens())?.into_iter().map(finite);
                out.extend(rows.iter().copied().zip(scored));
                if let (Some(profile), Some(started)) = (&self.profile, started) {
                    profile.add_batch(started.elapsed());
                }
                Ok(tokens)
            }
            Err(e) if rows.len() > 1 && is_out_of_memory(&e) => {
                let lowered = (tokens / 2).max(1);
                self.budget.fetch_min(lowered, Ordering::Relaxed);
                if !self.oom_logged.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "armorm: out of memory on a batch of {tokens} padded tokens; splitting it and \
                         lowering --max-batch-tokens to {lowered}"
                    );
                }
                let (a, b) = rows.split_at(rows.len() / 2);
                Ok(self.score_rows(model, encoded, a, out)?
                    + self.score_rows(model, encoded, b, out)?)
            }
            // Nothing left to split: this row alone is too large for the device.
            Err(e) if is_out_of_memory(&e) => {
                let failure = RowFailure::OutOfMemory {
                    tokens,
                    message: e.to_string(),
                };
                out.push((rows[0], Err(failure)));
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    fn forward(&self, model: &ArmoRM, flat: &FlatBatch) -> candle_core::Result<HeadOutput> {
        if self
            .simulate_oom_above
            .is_some_and(|limit| flat.padded_tokens() > limit)
        {
            return Err(candle_core::Error::Msg(
                "simulated CUDA_ERROR_OUT_OF_MEMORY: out of memory".into(),
            ));
        }
        model.forward(flat)
    }

    /// The copy to the host waits for the device, so it needs no synchronization of its own.
    fn unpack(&self, out: &HeadOutput, lens: &[usize]) -> candle_core::Result<Vec<RowScore>> {
        let Some(profile) = &self.profile else {
            return out.rows(lens);
        };
        let started = Instant::now();
        let rows = out.rows(lens)?;
        profile.add(Section::Readback, started.elapsed());
        Ok(rows)
    }
}

/// What one lane scored: (row in the window, its outputs), and the padded tokens computed.
type Lane = candle_core::Result<(Vec<(usize, RowResult)>, usize)>;

/// candle passes the CUDA driver's error through as text.
fn is_out_of_memory(e: &candle_core::Error) -> bool {
    let text = e.to_string();
    text.contains("OUT_OF_MEMORY") || text.contains("out of memory")
}

/// The row's outputs if every one is a finite number.
fn finite(row: RowScore) -> RowResult {
    let fields: [(&'static str, &[f32]); 4] = [
        ("score", std::slice::from_ref(&row.score)),
        ("rewards", &row.rewards),
        ("gating", &row.gating),
        ("coefficients", &row.coefficients),
    ];
    match fields
        .iter()
        .find(|(_, v)| v.iter().any(|x| !x.is_finite()))
    {
        Some((field, _)) => Err(RowFailure::NonFinite { field }),
        None => Ok(row),
    }
}
