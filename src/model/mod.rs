//! ArmoRM in candle: the Llama backbone, the gated multi-objective head, and the flat batch they take.

pub mod config;
pub mod head;
pub mod llama;
pub mod rope;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

pub use config::ArmoRMConfig;
pub use head::{ArmoRMHead, HeadOutput};
pub use llama::Llama;

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
}

impl ArmoRM {
    /// `vb` in the backbone's compute dtype; the head is read from the same tensors in f32.
    pub fn load(vb: VarBuilder, cfg: &ArmoRMConfig) -> Result<Self> {
        Ok(Self {
            model: Llama::load(vb.pp("model"), cfg)?,
            head: ArmoRMHead::load(vb.set_dtype(DType::F32), cfg)?,
        })
    }

    pub fn forward(&self, batch: &FlatBatch) -> Result<HeadOutput> {
        let lens = batch.lens();
        let (b, t) = (lens.len(), lens.iter().copied().max().unwrap_or(0));
        // Padding slots hold id 0, a real embedding row: the pad id may lie past the embedding.
        let mut padded = vec![0u32; b * t];
        for (row, w) in batch.cu_lens.windows(2).enumerate() {
            padded[row * t..row * t + (w[1] - w[0])].copy_from_slice(&batch.ids[w[0]..w[1]]);
        }
        let ids = Tensor::from_vec(padded, (b, t), self.model.device())?; // (b, t)
        let hidden = self.model.forward(&ids, &lens)?; // (b, t, h)
        let h = hidden.dim(2)?;

        // Only two positions per row are read: the last token (rewards) and the gating token.
        let mut picks: Vec<u32> = (0..b).map(|r| (r * t + lens[r] - 1) as u32).collect();
        picks.extend((0..b).map(|r| (r * t + batch.gates[r]) as u32));
        let picks = Tensor::from_vec(picks, 2 * b, self.model.device())?;
        let rows = hidden.reshape((b * t, h))?.index_select(&picks, 0)?; // (2b, h)
        let rows = self.model.norm(&rows)?.to_dtype(DType::F32)?;
        self.head
            .forward(&rows.narrow(0, 0, b)?, &rows.narrow(0, b, b)?)
    }

    pub fn dtype(&self) -> DType {
        self.model.dtype()
    }
}
