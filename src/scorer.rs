//! Scores conversations: encode, bucket by length, run the model, and return rows in input order.

use std::cmp::Reverse;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;

use crate::batch;
use crate::chat::Message;
use crate::encoder::{Encoded, Encoder};
use crate::model::{ArmoRM, FlatBatch, HeadOutput, Profile, Section};

/// Every output of the model for one row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowScore {
    pub score: f32,
    pub rewards: Vec<f32>,
    pub gating: Vec<f32>,
    pub coefficients: Vec<f32>,
    pub num_tokens: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ScoreError {
    /// A row that cannot be scored; `row` indexes the slice given to `score`.
    #[error("{message}")]
    Row { row: usize, message: String },
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
}

pub struct Scorer {
    /// One copy of the model per device; windows are shared among them.
    models: Vec<ArmoRM>,
    /// Batches of one window scored at once on one model, each on its own thread (CPU: see
    /// `with_lanes`).
    lanes: usize,
    encoder: Encoder,
    max_length: usize,
    /// The token budget in force: `max_batch_tokens`, lowered after an out-of-memory error.
    budget: AtomicUsize,
    oom_logged: AtomicBool,
    /// Fault injection for tests (`ARMORM_SIMULATE_OOM_ABOVE_TOKENS`): batches of several rows above
    /// this many padded tokens fail as if the GPU were out of memory.
    simulate_oom_above: Option<usize>,
    /// Where the time of each forward pass goes, when asked for (`with_profile`).
    profile: Option<Arc<Profile>>,
}

impl Scorer {
    /// `models`: one or more copies of the model (one per device); at least one.
    pub fn new(
        models: Vec<ArmoRM>,
        encoder: Encoder,
        max_batch_tokens: usize,
        max_length: usize,
    ) -> Self {
        Self {
            models,
            lanes: 1,
            encoder,
            max_length,
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

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    pub fn encode(&self, messages: &[Message]) -> Result<Encoded, String> {
        let enc = self.encoder.encode(messages)?;
        if enc.ids.len() > self.max_length {
            return Err(format!(
                "the conversation is {} tokens, over --max-length {}; armorm never truncates silently",
                enc.ids.len(),
                self.max_length
            ));
        }
        Ok(enc)
    }

    /// Scores `conversations`, returned in the same order.
    pub fn score(&self, conversations: &[Vec<Message>]) -> Result<Vec<RowScore>, ScoreError> {
        let encoded = conversations
            .iter()
            .enumerate()
            .map(|(row, m)| {
                self.encode(m)
                    .map_err(|message| ScoreError::Row { row, message })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.score_encoded(&encoded)?.0)
    }

    /// Scores a window of encoded rows in length-sorted batches; returns the scores in the window's
    /// order and the padded tokens computed.
    pub fn score_encoded(&self, encoded: &[Encoded]) -> Result<(Vec<RowScore>, usize), ScoreError> {
        self.score_encoded_on(0, encoded)
    }

    /// The same on model copy `model`.
    pub fn score_encoded_on(
        &self,
        model: usize,
        encoded: &[Encoded],
    ) -> Result<(Vec<RowScore>, usize), ScoreError> {
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
        let lane = || self.lane(model, encoded, &batches, &next);
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
        let mut out: Vec<Option<RowScore>> = vec![None; encoded.len()];
        let mut padded = 0;
        for result in results {
            let (scored, tokens) = result?;
            padded += tokens;
            // Back to window order: the reorder step after length sorting.
            for (i, s) in scored {
                out[i] = Some(s);
            }
        }
        Ok((out.into_iter().flatten().collect(), padded))
    }

    /// Takes batches from the shared queue until it is empty; on an error, empties it for the other
    /// lanes too.
    fn lane(
        &self,
        model: &ArmoRM,
        encoded: &[Encoded],
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
        encoded: &[Encoded],
        rows: &[usize],
        out: &mut Vec<(usize, RowScore)>,
    ) -> Result<usize, ScoreError> {
        let mut flat = FlatBatch::new();
        for &i in rows {
            flat.push(&encoded[i].ids, encoded[i].gate);
        }
        let tokens = flat.padded_tokens();
        let started = self.profile.as_ref().map(|_| Instant::now());
        match self.forward(model, &flat) {
            Ok(head) => {
                out.extend(rows.iter().copied().zip(self.unpack(&head, &flat.lens())?));
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
            Err(e) => Err(e.into()),
        }
    }

    fn forward(&self, model: &ArmoRM, flat: &FlatBatch) -> candle_core::Result<HeadOutput> {
        if flat.rows() > 1
            && self
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
            return unpack(out, lens);
        };
        let started = Instant::now();
        let rows = unpack(out, lens)?;
        profile.add(Section::Readback, started.elapsed());
        Ok(rows)
    }
}

/// What one lane scored: (row in the window, its scores), and the padded tokens computed.
type Lane = Result<(Vec<(usize, RowScore)>, usize), ScoreError>;

/// candle passes the CUDA driver's error through as text.
fn is_out_of_memory(e: &candle_core::Error) -> bool {
    let text = e.to_string();
    text.contains("OUT_OF_MEMORY") || text.contains("out of memory")
}

fn unpack(out: &HeadOutput, lens: &[usize]) -> candle_core::Result<Vec<RowScore>> {
    let rows = |t: &Tensor| t.to_vec2::<f32>();
    let (rewards, gating, coefficients) = (
        rows(&out.rewards)?,
        rows(&out.gating)?,
        rows(&out.coefficients)?,
    );
    let score = out.score.to_vec1::<f32>()?;
    Ok(score
        .into_iter()
        .zip(rewards)
        .zip(gating)
        .zip(coefficients)
        .zip(lens)
        .map(
            |((((score, rewards), gating), coefficients), &num_tokens)| RowScore {
                score,
                rewards,
                gating,
                coefficients,
                num_tokens,
            },
        )
        .collect())
}
