//! ArmoRM in candle: the Llama backbone, the gated multi-objective head, and the flat batch they take.

pub mod config;
pub mod head;
pub mod llama;
pub mod profile;
pub mod rope;

use std::sync::Arc;

use candle_core::{DType, Result};
use candle_nn::VarBuilder;

pub use config::ArmoRMConfig;
pub use head::{ArmoRMHead, HeadOutput, RowScore};
pub use llama::Llama;
pub use profile::{Profile, Section};

use profile::Timer;

/// Rows laid end to end: row i is `ids[cu_lens[i]..cu_lens[i + 1]]`, its gating token at `gates[i]`
/// (relative to the row). Stays flat until the model pads it.
#[derive(Debug, Clone, Default)]
pub struct FlatBatch {
    pub ids: Vec<u32>,
    pub cu_lens: Vec<usize>,
    pub gates: Vec<usize>,
}

impl FlatBatch {
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            cu_lens: vec![0],
            gates: Vec::new(),
        }
    }

    pub fn push(&mut self, ids: &[u32], gate: usize) {
        self.ids.extend_from_slice(ids);
        self.cu_lens.push(self.ids.len());
        self.gates.push(gate);
    }

    pub fn rows(&self) -> usize {
        self.gates.len()
    }

    pub fn lens(&self) -> Vec<usize> {
        self.cu_lens.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Tokens the padded batch costs: rows × longest row.
    pub fn padded_tokens(&self) -> usize {
        self.rows() * self.lens().into_iter().max().unwrap_or(0)
    }
}

/// The published checkpoint's root: `model.*`, `regression_layer`, `gating.*`, `reward_transform_matrix`.
#[derive(Debug, Clone)]
pub struct ArmoRM {
    model: Llama,
    head: ArmoRMHead,
    timer: Timer,
}

impl ArmoRM {
    /// `vb` in the backbone's compute dtype; the head is read from the same tensors in f32.
    pub fn load(vb: VarBuilder, cfg: &ArmoRMConfig) -> Result<Self> {
        Ok(Self {
            model: Llama::load(vb.pp("model"), cfg)?,
            head: ArmoRMHead::load(vb.set_dtype(DType::F32), cfg)?,
            timer: Timer::default(),
        })
    }

    /// Adds the time of each section of every forward pass to `profile` (see `profile`). Slows the
    /// passes down: the device is synchronized around each section.
    pub fn with_profile(mut self, profile: Arc<Profile>) -> Self {
        self.timer = Timer::new(profile, self.model.device().clone());
        self.model = self.model.with_timer(self.timer.clone());
        self
    }

    pub fn forward(&self, batch: &FlatBatch) -> Result<HeadOutput> {
        let b = batch.rows();
        // Only two tokens per row are read: the last (rewards) and the gating token. Grouped by kind.
        let mut picks: Vec<usize> = batch.cu_lens[1..].iter().map(|&end| end - 1).collect();
        picks.extend(
            batch
                .cu_lens
                .iter()
                .zip(&batch.gates)
                .map(|(&start, &g)| start + g),
        );
        let rows = self.model.forward(&batch.ids, &batch.cu_lens, &picks)?; // (2b, h)
        let tm = &self.timer;
        let rows = tm.time(Section::Cast, move || rows.to_dtype(DType::F32))?;
        tm.time(Section::Head, || {
            self.head
                .forward(&rows.narrow(0, 0, b)?, &rows.narrow(0, b, b)?)
        })
    }

    pub fn dtype(&self) -> DType {
        self.model.dtype()
    }
}
