//! ArmoRM in candle: the Llama backbone, the gated multi-objective head, and the flat batch they take.

mod attention;
mod check;
pub mod config;
mod fused;
pub mod head;
mod layout;
pub mod llama;
pub mod profile;
pub mod rope;
#[cfg(test)]
mod testing;
pub mod varlen;

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

pub use attention::QUERY_BLOCK;
pub use config::ArmoRMConfig;
pub use head::{ArmoRMHead, HeadOutput, RowScore};
pub use llama::{KvCache, Llama, Past};
pub use profile::{Profile, Section};
pub use varlen::{flash3_unsupported, flash_unsupported, AttentionKind};

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

/// Rows that continue prefixes run before (`ArmoRM::forward_prefixes`): row i is
/// `ids[cu_lens[i]..cu_lens[i + 1]]`, the tokens after prefix `of[i]`; at least one per row.
#[derive(Debug, Clone, Default)]
pub struct Continuations {
    pub ids: Vec<u32>,
    pub cu_lens: Vec<usize>,
    pub of: Vec<usize>,
}

impl Continuations {
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            cu_lens: vec![0],
            of: Vec::new(),
        }
    }

    pub fn push(&mut self, ids: &[u32], prefix: usize) {
        self.ids.extend_from_slice(ids);
        self.cu_lens.push(self.ids.len());
        self.of.push(prefix);
    }

    pub fn rows(&self) -> usize {
        self.of.len()
    }

    /// Tokens the padded batch costs: rows × longest row (the prefixes not counted: they are cached).
    pub fn padded_tokens(&self) -> usize {
        let longest = self.cu_lens.windows(2).map(|w| w[1] - w[0]).max();
        self.rows() * longest.unwrap_or(0)
    }
}

/// Prefixes run once for all the rows that share them: the hidden state at each one's gating token
/// (the gating depends on the prefix alone) and every layer's keys and values.
#[derive(Debug, Clone)]
pub struct Prefixes {
    gate_hidden: Tensor, // (m, h) f32
    cache: KvCache,
}

impl Prefixes {
    /// Tokens cached (per layer).
    pub fn tokens(&self) -> usize {
        self.cache.tokens()
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

    /// Computes attention this way instead of the one `load` chose (`AttentionKind::auto`).
    pub fn with_attention(mut self, attention: AttentionKind) -> Self {
        self.model = self.model.with_attention(attention);
        self
    }

    pub fn attention(&self) -> AttentionKind {
        self.model.attention()
    }

    /// Runs the fused elementwise ops (`fused`; experimental, for the GPU) or not.
    pub fn with_fused_ops(mut self, fused: bool) -> Self {
        self.model = self.model.with_fused_ops(fused);
        self
    }

    pub fn fused_ops(&self) -> bool {
        self.model.fused_ops()
    }

    pub fn device(&self) -> &candle_core::Device {
        self.model.device()
    }

    /// The fused ops' 16-byte-access kernels (see `Llama::with_vector_ops`).
    pub fn with_vector_ops(mut self, vector: bool) -> Self {
        self.model = self.model.with_vector_ops(vector);
        self
    }

    pub fn vector_ops(&self) -> bool {
        self.model.vector_ops()
    }

    /// q/k/v as one GEMM with RoPE in place (see `Llama::with_fused_qkv`).
    pub fn with_fused_qkv(mut self, on: bool) -> Result<Self> {
        self.model = self.model.with_fused_qkv(on)?;
        Ok(self)
    }

    pub fn fused_qkv(&self) -> bool {
        self.model.fused_qkv()
    }

    /// Keeps the backbone's residual stream in the compute dtype instead of f32 (experimental, for
    /// measuring on the GPU; see `Llama::with_compute_dtype_residual`).
    pub fn with_compute_dtype_residual(mut self, on: bool) -> Self {
        self.model = self.model.with_compute_dtype_residual(on);
        self
    }

    /// The backbone's residual stream dtype.
    pub fn residual_dtype(&self) -> DType {
        self.model.residual_dtype()
    }

    /// The largest difference between the fused ops that run and the unfused ones on random rows of
    /// this model's shapes, on its device and in its dtype (see `Llama::fused_self_check`).
    pub fn fused_self_check(&self, cfg: &ArmoRMConfig) -> Result<f32> {
        self.model.fused_self_check(cfg)
    }

    /// gate/up as one GEMM (see `Llama::with_fused_gate_up`).
    pub fn with_fused_gate_up(mut self, on: bool) -> Result<Self> {
        self.model = self.model.with_fused_gate_up(on)?;
        Ok(self)
    }

    pub fn fused_gate_up(&self) -> bool {
        self.model.fused_gate_up()
    }

    /// Output projections accumulating into the f32 stream (see `Llama::with_accumulate`).
    pub fn with_accumulate(mut self, on: bool) -> Self {
        self.model = self.model.with_accumulate(on);
        self
    }

    pub fn accumulate(&self) -> bool {
        self.model.accumulate()
    }

    /// The largest difference between flash attention and the reference on random rows with this
    /// model's heads (see `varlen::flash_self_check`).
    pub fn flash_self_check(&self) -> Result<f32> {
        self.model.flash_self_check()
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

    /// Runs prefixes (rows of `batch`, each ending after its gating pattern) for rows to continue
    /// them with `forward_continued`.
    pub fn forward_prefixes(&self, batch: &FlatBatch) -> Result<Prefixes> {
        let picks: Vec<usize> = batch
            .cu_lens
            .iter()
            .zip(&batch.gates)
            .map(|(&start, &g)| start + g)
            .collect();
        let (hidden, cache) = self
            .model
            .forward_prefixes(&batch.ids, &batch.cu_lens, &picks)?; // (m, h)
        let gate_hidden = self
            .timer
            .time(Section::Cast, move || hidden.to_dtype(DType::F32))?;
        Ok(Prefixes { gate_hidden, cache })
    }

    /// Scores rows that continue `prefixes`: the same outputs as running each whole row with `forward`.
    pub fn forward_continued(
        &self,
        prefixes: &Prefixes,
        rows: &Continuations,
    ) -> Result<HeadOutput> {
        let picks: Vec<usize> = rows.cu_lens[1..].iter().map(|&end| end - 1).collect();
        let past = Past {
            cache: &prefixes.cache,
            of: &rows.of,
        };
        let last = self
            .model
            .forward_continued(&rows.ids, &rows.cu_lens, &picks, past)?; // (b, h)
        let tm = &self.timer;
        let last = tm.time(Section::Cast, move || last.to_dtype(DType::F32))?;
        tm.time(Section::Head, || {
            let of: Vec<u32> = rows.of.iter().map(|&p| p as u32).collect();
            let of = Tensor::from_vec(of, rows.rows(), prefixes.gate_hidden.device())?;
            let gate = prefixes.gate_hidden.index_select(&of, 0)?; // (b, h)
            self.head.forward(&last, &gate)
        })
    }

    pub fn dtype(&self) -> DType {
        self.model.dtype()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::max_diff;
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// A random model: 3 layers (so a middle layer sees the cache), GQA, head_dim 8, a small vocabulary.
    fn random_model() -> ArmoRM {
        let cfg = ArmoRMConfig::from_json(
            r#"{"vocab_size": 50, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
                "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "max_position_embeddings": 512,
                "num_objectives": 5, "gating_hidden_dim": 16, "gating_n_hidden": 1}"#,
        )
        .unwrap();
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
        let model = ArmoRM::load(vb, &cfg).unwrap();
        // VarMap's default init leaves some tensors at zero; give every weight random values (the
        // same on every run, in the order of the tensor names).
        let mut named: Vec<_> = vars.data().lock().unwrap().clone().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        for (seed, (_, var)) in named.iter().enumerate() {
            var.set(&testing::seeded_randn(0.0, 0.5, var.shape(), seed as u64))
                .unwrap();
        }
        model
    }

    fn ids(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| (seed * 7 + i * 13) % 50).collect()
    }

    fn assert_same_outputs(got: &HeadOutput, want: &HeadOutput, tolerance: f32) {
        for (name, a, b) in [
            ("rewards", &got.rewards, &want.rewards),
            ("gating", &got.gating, &want.gating),
            ("coefficients", &got.coefficients, &want.coefficients),
            ("score", &got.score, &want.score),
        ] {
            let d = max_diff(a, b);
            assert!(d < tolerance, "{name} differs by {d}");
        }
    }

    #[test]
    fn fused_ops_give_the_unfused_results() {
        let plain = random_model();
        let fused = plain.clone().with_fused_ops(true);
        let mut batch = FlatBatch::new();
        for (seed, len, gate) in [(1, 9, 4), (2, 60, 20), (3, 1, 0)] {
            batch.push(&ids(seed, len), gate);
        }
        let want = plain.forward(&batch).unwrap();
        assert_same_outputs(&fused.forward(&batch).unwrap(), &want, 1e-5);
        // And through the flat layout with cached prefixes.
        let flat = fused.with_attention(AttentionKind::VarlenReference);
        assert_same_outputs(&flat.forward(&batch).unwrap(), &want, 1e-5);
    }

    #[test]
    fn one_qkv_gemm_gives_the_unfused_results() {
        let plain = random_model();
        let flat = plain.clone().with_attention(AttentionKind::VarlenReference);
        let joined = flat
            .clone()
            .with_fused_ops(true)
            .with_fused_qkv(true)
            .unwrap();
        assert!(joined.fused_qkv());
        // Only under flat attention and the fused ops: elsewhere the projections run apart.
        assert!(!joined.clone().with_fused_ops(false).fused_qkv());
        assert!(!joined
            .clone()
            .with_attention(AttentionKind::Blocked)
            .fused_qkv());
        let mut batch = FlatBatch::new();
        for (seed, len, gate) in [(1, 9, 4), (2, 300, 120), (3, 1, 0), (4, 40, 39)] {
            batch.push(&ids(seed, len), gate);
        }
        let want = plain.forward(&batch).unwrap();
        assert_same_outputs(&joined.forward(&batch).unwrap(), &want, 1e-5);

        // Prefixes run through the one GEMM keep their keys and values, continuations read them.
        let mut heads = FlatBatch::new();
        heads.push(&ids(5, 12), 6);
        heads.push(&ids(6, 30), 29);
        let mut rows = Continuations::new();
        for (p, seed, len) in [(1, 7, 5), (0, 8, 1), (1, 9, 20), (0, 10, 3)] {
            rows.push(&ids(seed, len), p);
        }
        let want = flat
            .forward_continued(&flat.forward_prefixes(&heads).unwrap(), &rows)
            .unwrap();
        let cached = joined.forward_prefixes(&heads).unwrap();
        let got = joined.forward_continued(&cached, &rows).unwrap();
        assert_same_outputs(&got, &want, 1e-5);
        // The blocked path of the same model reads its weights through the views.
        let blocked = joined.with_attention(AttentionKind::Blocked);
        assert_same_outputs(
            &blocked.forward(&batch).unwrap(),
            &plain.forward(&batch).unwrap(),
            1e-5,
        );
    }

    #[test]
    fn one_gate_up_gemm_gives_the_unfused_results() {
        let plain = random_model();
        let joined = plain
            .clone()
            .with_fused_ops(true)
            .with_fused_gate_up(true)
            .unwrap();
        assert!(joined.fused_gate_up());
        assert!(!joined.clone().with_fused_ops(false).fused_gate_up());
        let mut batch = FlatBatch::new();
        for (seed, len, gate) in [(1, 9, 4), (2, 300, 120), (3, 1, 0)] {
            batch.push(&ids(seed, len), gate);
        }
        let want = plain.forward(&batch).unwrap();
        assert_same_outputs(&joined.forward(&batch).unwrap(), &want, 1e-5);
        // Without the fused ops the projections run apart through the views.
        let apart = joined.with_fused_ops(false);
        assert_same_outputs(&apart.forward(&batch).unwrap(), &want, 1e-5);
    }

    #[test]
    fn accumulating_projections_give_the_unfused_results() {
        let plain = random_model();
        let summed = plain.clone().with_fused_ops(true).with_accumulate(true);
        assert!(summed.accumulate());
        assert!(
            !plain.clone().with_accumulate(true).accumulate(),
            "needs the fused ops"
        );
        let mut batch = FlatBatch::new();
        for (seed, len, gate) in [(1, 9, 4), (2, 300, 120), (3, 1, 0)] {
            batch.push(&ids(seed, len), gate);
        }
        let want = plain.forward(&batch).unwrap();
        assert_same_outputs(&summed.forward(&batch).unwrap(), &want, 1e-5);
        // With the flat layout, one q/k/v GEMM, and cached prefixes.
        let all = summed
            .with_attention(AttentionKind::VarlenReference)
            .with_fused_qkv(true)
            .unwrap();
        assert_same_outputs(&all.forward(&batch).unwrap(), &want, 1e-5);
        let mut heads = FlatBatch::new();
        heads.push(&ids(5, 12), 6);
        let mut rows = Continuations::new();
        for (seed, len) in [(7, 5), (8, 1)] {
            rows.push(&ids(seed, len), 0);
        }
        let flat = plain.with_attention(AttentionKind::VarlenReference);
        let want = flat
            .forward_continued(&flat.forward_prefixes(&heads).unwrap(), &rows)
            .unwrap();
        let got = all
            .forward_continued(&all.forward_prefixes(&heads).unwrap(), &rows)
            .unwrap();
        assert_same_outputs(&got, &want, 1e-5);
    }

    #[test]
    fn a_compute_dtype_residual_is_f32_in_f32() {
        let plain = random_model();
        let same = plain.clone().with_compute_dtype_residual(true);
        assert_eq!(same.residual_dtype(), DType::F32);
        let mut batch = FlatBatch::new();
        for (seed, len, gate) in [(1, 9, 4), (2, 60, 20)] {
            batch.push(&ids(seed, len), gate);
        }
        let want = plain.forward(&batch).unwrap();
        assert_same_outputs(&same.forward(&batch).unwrap(), &want, 1e-12);
    }

    #[test]
    fn flat_varlen_attention_equals_blocked_attention() {
        let blocked = random_model();
        assert_eq!(blocked.attention(), AttentionKind::Blocked);
        let flat = blocked
            .clone()
            .with_attention(AttentionKind::VarlenReference);
        // Rows of very different lengths (one past a query block), gates anywhere, a one-token row.
        let mut batch = FlatBatch::new();
        for (seed, len, gate) in [(1, 9, 4), (2, 300, 120), (3, 1, 0), (4, 40, 39)] {
            batch.push(&ids(seed, len), gate);
        }
        let want = blocked.forward(&batch).unwrap();
        let got = flat.forward(&batch).unwrap();
        assert_same_outputs(&got, &want, 1e-5);

        // Prefixes and their continuations through the flat key sequence.
        let mut heads = FlatBatch::new();
        heads.push(&ids(5, 12), 6);
        heads.push(&ids(6, 30), 29);
        let mut rows = Continuations::new();
        for (p, seed, len) in [(1, 7, 5), (0, 8, 1), (1, 9, 20), (0, 10, 3)] {
            rows.push(&ids(seed, len), p);
        }
        let want = blocked
            .forward_continued(&blocked.forward_prefixes(&heads).unwrap(), &rows)
            .unwrap();
        let got = flat
            .forward_continued(&flat.forward_prefixes(&heads).unwrap(), &rows)
            .unwrap();
        assert_same_outputs(&got, &want, 1e-5);
        // Not trivially equal: another row's prefix changes the rewards.
        let mut swapped = Continuations::new();
        for (p, seed, len) in [(0, 7, 5), (1, 8, 1), (0, 9, 20), (1, 10, 3)] {
            swapped.push(&ids(seed, len), p);
        }
        let moved = flat
            .forward_continued(&flat.forward_prefixes(&heads).unwrap(), &swapped)
            .unwrap();
        assert!(max_diff(&moved.rewards, &want.rewards) > 1e-3);
    }

    #[test]
    fn rows_continuing_cached_prefixes_equal_rows_run_whole() {
        let model = random_model();
        // Two prefixes (the second longer than a query block's worth of keys would matter for), gates
        // inside them, and five continuations of different lengths in mixed order.
        let prefixes = [(ids(1, 9), 5), (ids(2, 300), 290)];
        let tails = [
            (1, ids(3, 4)),
            (0, ids(4, 1)),
            (0, ids(5, 7)),
            (1, ids(6, 270)),
            (0, ids(7, 3)),
        ];
        let mut whole = FlatBatch::new();
        for (p, tail) in &tails {
            let (prefix, gate) = &prefixes[*p];
            whole.push(&[prefix.as_slice(), tail].concat(), *gate);
        }
        let want = model.forward(&whole).unwrap();

        let mut heads = FlatBatch::new();
        for (prefix, gate) in &prefixes {
            heads.push(prefix, *gate);
        }
        let cached = model.forward_prefixes(&heads).unwrap();
        assert_eq!(cached.tokens(), 309);
        let mut rows = Continuations::new();
        for (p, tail) in &tails {
            rows.push(tail, *p);
        }
        let got = model.forward_continued(&cached, &rows).unwrap();
        assert_same_outputs(&got, &want, 1e-5);
        // Not trivially equal: a different prefix changes the rewards.
        let mut other = Continuations::new();
        for (_, tail) in &tails {
            other.push(tail, 0);
        }
        let moved = model.forward_continued(&cached, &other).unwrap();
        assert!(max_diff(&moved.rewards, &want.rewards) > 1e-3);
    }
}
