//! Scores a window of encoded rows: bucket by length, run the model, and return the outputs in window
//! order.

use std::cmp::Reverse;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;

use crate::batch;
use crate::encoder::Encoded;
use crate::model::{ArmoRM, Continuations, FlatBatch, HeadOutput, Profile, RowScore, Section};
use crate::sharing::{self, Unit};

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

/// A window's outputs, in the window's order (`None`: a row not scored), and what computing them took.
#[derive(Debug, Clone, Default)]
pub struct WindowScores {
    pub rows: Vec<Option<RowResult>>,
    /// Tokens the model computed, padding included (rows × longest row, per pass).
    pub padded: usize,
    /// Tokens that prefix sharing did not compute (each shared prompt once instead of once per row);
    /// `None` when sharing is off.
    pub saved: Option<usize>,
}

/// One lane's piece of a window: a batch of rows run whole, or a unit of rows sharing prompts.
enum Work {
    Plain(Vec<usize>),
    Shared(Unit),
}

impl Work {
    /// Padded tokens, to hand out the longest work first.
    fn cost(&self, lens: &[usize]) -> usize {
        match self {
            Work::Plain(rows) => rows.len() * rows.iter().map(|&i| lens[i]).max().unwrap_or(0),
            Work::Shared(unit) => {
                let suffix = |&(r, g): &(usize, usize)| lens[r] - unit.groups[g].prefix;
                let continuations: usize = unit
                    .batches
                    .iter()
                    .map(|b| b.len() * b.iter().map(suffix).max().unwrap_or(0))
                    .sum();
                unit.prefix_tokens() + continuations
            }
        }
    }
}

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
    /// Prefix sharing (`with_prefix_sharing`): the length of the gating pattern, which ends a prefix.
    sharing: Option<usize>,
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
            sharing: None,
        }
    }

    /// Runs the prompt of rows that share it once per window (see `sharing`); `pattern_len`: the
    /// gating pattern's length in tokens (a prefix ends with it).
    pub fn with_prefix_sharing(mut self, pattern_len: usize) -> Self {
        self.sharing = Some(pattern_len);
        self
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
    /// in length-sorted batches; returns each row's outputs in the window's order.
    pub fn score_window(
        &self,
        model: usize,
        window: &[Option<Encoded>],
    ) -> candle_core::Result<WindowScores> {
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
        let mut work = self.plan(&encoded, &lens, budget);
        // Longest work first, so that the lanes run out of work at about the same time.
        work.sort_by_key(|w| Reverse(w.cost(&lens)));
        let next = AtomicUsize::new(0);
        let lane = || self.lane(model, &encoded, &work, &next);
        // No thread for a lane that would find the queue empty.
        let lanes = lanes.min(work.len()).max(1);
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
        let mut out = WindowScores {
            rows: vec![None; window.len()],
            padded: 0,
            saved: None,
        };
        let mut saved = 0;
        for result in results {
            let (scored, cost) = result?;
            out.padded += cost.padded;
            saved += cost.saved;
            // Back to window order: the reorder step after length sorting.
            for (i, s) in scored {
                out.rows[rows[i]] = Some(s);
            }
        }
        out.saved = self.sharing.map(|_| saved);
        Ok(out)
    }

    /// The window's work: batches of rows run whole, and units of rows sharing a prompt when sharing
    /// is on.
    fn plan(&self, encoded: &[&Encoded], lens: &[usize], budget: usize) -> Vec<Work> {
        let cost = self.cost();
        let plan = match self.sharing {
            Some(pattern_len) => sharing::plan(encoded, pattern_len, budget, cost),
            None => sharing::Plan {
                plain: (0..encoded.len()).collect(),
                units: Vec::new(),
            },
        };
        let plain_lens: Vec<usize> = plan.plain.iter().map(|&i| lens[i]).collect();
        let mut work: Vec<Work> = batch::plan(&plain_lens, budget, cost)
            .into_iter()
            .map(|b| Work::Plain(b.into_iter().map(|i| plan.plain[i]).collect()))
            .collect();
        work.extend(plan.units.into_iter().map(Work::Shared));
        work
    }

    /// Takes work from the shared queue until it is empty; on an error, empties it for the other
    /// lanes too.
    fn lane(
        &self,
        model: &ArmoRM,
        encoded: &[&Encoded],
        work: &[Work],
        next: &AtomicUsize,
    ) -> Lane {
        let mut scored = Vec::new();
        let mut total = Cost::default();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = work.get(i) else {
                return Ok((scored, total));
            };
            let result = match item {
                Work::Plain(rows) => self
                    .score_rows(model, encoded, rows, &mut scored)
                    .map(Cost::padded),
                Work::Shared(unit) => self.score_unit(model, encoded, unit, &mut scored),
            };
            match result {
                Ok(cost) => {
                    total.padded += cost.padded;
                    total.saved += cost.saved;
                }
                Err(e) => {
                    next.store(work.len(), Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }

    /// A unit of rows sharing prompts: the prefixes once, then the continuations against their cached
    /// keys and values. Out of memory, the rows not scored yet run whole instead (and are split as
    /// there). Returns what it cost, and the tokens sharing saved: the prefixes of the rows continued
    /// less the prefixes computed.
    fn score_unit(
        &self,
        model: &ArmoRM,
        encoded: &[&Encoded],
        unit: &Unit,
        out: &mut Vec<(usize, RowResult)>,
    ) -> candle_core::Result<Cost> {
        let mut heads = FlatBatch::new();
        for g in &unit.groups {
            let first = encoded[g.rows[0]];
            heads.push(&first.ids[..g.prefix], first.gate);
        }
        let started = self.profile.as_ref().map(|_| Instant::now());
        let mut padded = self.computed(heads.padded_tokens(), heads.ids.len());
        let prefixes = match self
            .simulate_oom(padded)
            .and_then(|()| model.forward_prefixes(&heads))
        {
            Ok(prefixes) => prefixes,
            Err(e) if is_out_of_memory(&e) => {
                self.lower_budget(padded);
                let whole = self.score_whole(model, encoded, &unit.batches, out)?;
                return Ok(Cost::padded(whole));
            }
            Err(e) => return Err(e),
        };
        let mut reused = 0;
        for (k, batch) in unit.batches.iter().enumerate() {
            let mut rows = Continuations::new();
            for &(r, g) in batch {
                rows.push(&encoded[r].ids[unit.groups[g].prefix..], g);
            }
            let rows_tokens = self.computed(rows.padded_tokens(), rows.ids.len());
            let tokens = rows_tokens + prefixes.tokens();
            let head = match self
                .simulate_oom(tokens)
                .and_then(|()| model.forward_continued(&prefixes, &rows))
            {
                Ok(head) => head,
                Err(e) if is_out_of_memory(&e) => {
                    self.lower_budget(tokens);
                    drop(prefixes);
                    padded += self.score_whole(model, encoded, &unit.batches[k..], out)?;
                    break;
                }
                Err(e) => return Err(e),
            };
            let lens: Vec<usize> = batch.iter().map(|&(r, _)| encoded[r].ids.len()).collect();
            let scored = self.unpack(&head, &lens)?.into_iter().map(finite);
            out.extend(batch.iter().map(|&(r, _)| r).zip(scored));
            padded += rows_tokens;
            reused += batch
                .iter()
                .map(|&(_, g)| unit.groups[g].prefix)
                .sum::<usize>();
        }
        if let (Some(profile), Some(started)) = (&self.profile, started) {
            profile.add_batch(started.elapsed());
        }
        Ok(Cost {
            padded,
            saved: reused.saturating_sub(unit.cached_tokens()),
        })
    }

    /// The rows of continuation batches, run whole: the way out when sharing ran out of memory. Each
    /// row carries its prompt again, so they are batched afresh under the lowered budget; one pass of
    /// them all would be several budgets long, and would only run out of memory again.
    fn score_whole(
        &self,
        model: &ArmoRM,
        encoded: &[&Encoded],
        batches: &[Vec<(usize, usize)>],
        out: &mut Vec<(usize, RowResult)>,
    ) -> candle_core::Result<usize> {
        release_pool(model)?;
        let rows: Vec<usize> = batches.iter().flatten().map(|&(r, _)| r).collect();
        let lens: Vec<usize> = rows.iter().map(|&r| encoded[r].ids.len()).collect();
        let budget = self.budget.load(Ordering::Relaxed);
        let mut padded = 0;
        for batch in batch::plan(&lens, budget, self.cost()) {
            let batch: Vec<usize> = batch.iter().map(|&i| rows[i]).collect();
            padded += self.score_rows(model, encoded, &batch, out)?;
        }
        Ok(padded)
    }

    /// After an out-of-memory error on a pass of `tokens` padded tokens: later batches get half that.
    fn lower_budget(&self, tokens: usize) {
        let lowered = (tokens / 2).max(1);
        self.budget.fetch_min(lowered, Ordering::Relaxed);
        if !self.oom_logged.swap(true, Ordering::Relaxed) {
            eprintln!(
                "armorm: out of memory on a batch of {tokens} padded tokens; splitting it and lowering \
                 --max-batch-tokens to {lowered}"
            );
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
        let tokens = self.computed(flat.padded_tokens(), flat.ids.len());
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
                self.lower_budget(tokens);
                release_pool(model)?;
                let (a, b) = rows.split_at(rows.len() / 2);
                Ok(self.score_rows(model, encoded, a, out)?
                    + self.score_rows(model, encoded, b, out)?)
            }
            // Nothing left to split: this row alone is too large for the device.
            Err(e) if is_out_of_memory(&e) => {
                release_pool(model)?;
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
        self.simulate_oom(self.computed(flat.padded_tokens(), flat.ids.len()))?;
        model.forward(flat)
    }

    /// Whether the models run the fused elementwise ops (`ARMORM_FUSED_OPS`).
    pub fn fused_ops(&self) -> bool {
        self.models.first().is_some_and(|m| m.fused_ops())
    }

    /// Whether the fused ops run their vector kernels (`ARMORM_FUSED_OPS=vector`).
    pub fn vector_ops(&self) -> bool {
        self.models.first().is_some_and(|m| m.vector_ops())
    }

    /// Whether gate/up run as one GEMM (`ARMORM_FUSED_OPS=gateup`).
    pub fn fused_gate_up(&self) -> bool {
        self.models.first().is_some_and(|m| m.fused_gate_up())
    }

    /// Whether the output projections add into the f32 stream (`ARMORM_FUSED_OPS=accumulate`).
    pub fn accumulate(&self) -> bool {
        self.models.first().is_some_and(|m| m.accumulate())
    }

    /// Whether q/k/v run as one GEMM with RoPE in place (`ARMORM_FUSED_OPS=qkv`).
    pub fn fused_qkv(&self) -> bool {
        self.models.first().is_some_and(|m| m.fused_qkv())
    }

    /// The backbone's residual stream dtype (f32 unless `ARMORM_BF16_RESIDUAL` in bf16 or f16).
    pub fn residual_dtype(&self) -> DType {
        self.models
            .first()
            .map_or(DType::F32, |m| m.residual_dtype())
    }

    /// How batches run, for the summary line: the attention and the token budget (after any lowering).
    pub fn setup(&self) -> String {
        let attention = self.models.first().map_or("no", |m| m.attention().name());
        let kernels: Vec<&str> = [
            (self.vector_ops(), "vector"),
            (self.fused_qkv(), "qkv"),
            (self.fused_gate_up(), "gateup"),
            (self.accumulate(), "accumulate"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        let fused = match (self.fused_ops(), kernels.is_empty()) {
            (false, _) => String::new(),
            (true, true) => ", fused ops".to_string(),
            (true, false) => format!(", fused ops ({})", kernels.join(", ")),
        };
        let residual = match self.residual_dtype() {
            DType::F32 => String::new(),
            dtype => format!(", {} residual", dtype.as_str()),
        };
        format!(
            "{attention} attention{fused}{residual}, batches of up to {} tokens",
            self.budget.load(Ordering::Relaxed)
        )
    }

    /// How the models' passes count tokens: flat rows under variable-length attention, which pads
    /// nothing; padded rows otherwise.
    fn cost(&self) -> batch::Cost {
        let flat = self
            .models
            .first()
            .is_some_and(|m| m.attention().is_varlen());
        if flat {
            batch::Cost::Flat
        } else {
            batch::Cost::Padded
        }
    }

    /// Tokens a pass computes: padded ones under blocked attention, the rows' own under flat
    /// (variable-length) attention.
    fn computed(&self, padded: usize, tokens: usize) -> usize {
        match self.cost() {
            batch::Cost::Flat => tokens,
            batch::Cost::Padded => padded,
        }
    }

    fn simulate_oom(&self, tokens: usize) -> candle_core::Result<()> {
        if self.simulate_oom_above.is_some_and(|limit| tokens > limit) {
            return Err(candle_core::Error::Msg(
                "simulated CUDA_ERROR_OUT_OF_MEMORY: out of memory".into(),
            ));
        }
        Ok(())
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

/// What one lane scored: (row in the window, its outputs), and what that cost.
type Lane = candle_core::Result<(Vec<(usize, RowResult)>, Cost)>;

/// What a piece of work cost: padded tokens computed, and tokens prefix sharing saved.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    padded: usize,
    saved: usize,
}

impl Cost {
    fn padded(padded: usize) -> Self {
        Self { padded, saved: 0 }
    }
}

/// Before a retry after running out of memory: the device finishes its work and its pool hands its
/// free memory back to the driver (`loader::release_freed_memory`). An error the device reports on
/// finishing belongs to the work before, and is returned rather than lost to the retry.
fn release_pool(model: &ArmoRM) -> candle_core::Result<()> {
    crate::loader::release_freed_memory(model.device())
}

/// candle passes CUDA's errors through as text: the driver's out-of-memory, and cuBLAS failing to
/// allocate its workspace.
fn is_out_of_memory(e: &candle_core::Error) -> bool {
    let text = e.to_string();
    text.contains("OUT_OF_MEMORY")
        || text.contains("out of memory")
        || text.contains("ALLOC_FAILED")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_recognized_from_the_driver_and_from_cublas() {
        let oom = |text: &str| is_out_of_memory(&candle_core::Error::Msg(text.into()));
        // As candle renders cudarc's errors.
        assert!(oom(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")"
        ));
        assert!(oom("CublasError(CUBLAS_STATUS_ALLOC_FAILED)"));
        assert!(oom(
            "fused accumulate: cuBLAS: CublasError(CUBLAS_STATUS_ALLOC_FAILED)"
        ));
        // A fault is not retried as if a smaller batch could fix it.
        assert!(!oom(
            "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")"
        ));
        assert!(!oom("CublasError(CUBLAS_STATUS_EXECUTION_FAILED)"));
    }
}
