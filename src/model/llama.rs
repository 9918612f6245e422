//! The Llama-3 backbone (transformers' `LlamaModel`) over a flat batch: rows laid end to end, padded
//! only inside attention, and hidden states returned at the picked tokens alone (last token, gate).
//! Rows may continue prefixes run before (`KvCache`): their keys and values are reused, not recomputed.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::attention::Attention;
use super::config::ArmoRMConfig;
use super::fused;
use super::layout::Layout;
use super::profile::{Section, Timer};
use super::rope::{self, RopeTables};
use super::varlen::AttentionKind;

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    /// `weight` in the compute dtype, for a residual stream kept in it (`with_compute_dtype_residual`).
    weight_compute: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Weights in f32: norms run on the f32 residual stream whatever the compute dtype (unless the
    /// stream is kept in the compute dtype).
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints_dtype(size, "weight", Default::default(), DType::F32)?;
        Ok(Self {
            weight_compute: weight.to_dtype(vb.dtype())?,
            weight,
            eps: eps as f32,
        })
    }

    /// The norm in the dtype of `xs` (candle's kernel accumulates in f32 either way).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let weight = if xs.dtype() == self.weight.dtype() {
            &self.weight
        } else {
            &self.weight_compute
        };
        candle_nn::ops::rms_norm(xs, weight, self.eps)
    }
}

pub(super) fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb)
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    /// gate and up's weights as one (2·i, h) matrix, of which the two projections' weights are views
    /// (`fuse_gate_up`): one GEMM for the two under `ARMORM_FUSED_OPS=gateup`.
    gate_up: Option<Linear>,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &ArmoRMConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(vb.pp("gate_proj"), h, i)?,
            up_proj: linear(vb.pp("up_proj"), h, i)?,
            down_proj: linear(vb.pp("down_proj"), i, h)?,
            gate_up: None,
        })
    }

    /// Puts the gate and up weights into one matrix (the two projections keep views of it: no more
    /// memory), so that the fused ops run them as one GEMM.
    fn fuse_gate_up(&mut self) -> Result<()> {
        let i = self.gate_proj.weight().dim(0)?;
        let weight = Tensor::cat(&[self.gate_proj.weight(), self.up_proj.weight()], 0)?; // (2·i, h)
        self.gate_proj = Linear::new(weight.narrow(0, 0, i)?, None);
        self.up_proj = Linear::new(weight.narrow(0, i, i)?, None);
        self.gate_up = Some(Linear::new(weight, None));
        Ok(())
    }

    /// silu(gate_proj(xs)) · up_proj(xs): (n, h) -> (n, i), before `down_proj` (the layer applies
    /// it, adding into the residual stream).
    fn activation(&self, xs: &Tensor, lay: &Layout) -> Result<Tensor> {
        let tm = &lay.timer;
        if let (Some(gate_up), true) = (&self.gate_up, lay.fused) {
            let both = tm.time(Section::MlpMatmul, || gate_up.forward(xs))?; // (n, 2·i)
            return tm.time(Section::SiluMul, move || fused::silu_mul_joined(&both));
        }
        // `move` closures drop each input as soon as it is used, as the unprofiled expression did.
        let gate = tm.time(Section::MlpMatmul, || self.gate_proj.forward(xs))?;
        let up = tm.time(Section::MlpMatmul, || self.up_proj.forward(xs))?;
        tm.time(Section::SiluMul, move || {
            if lay.fused {
                fused::silu_mul(&gate, &up, lay.vector)
            } else {
                candle_nn::ops::silu(&gate)? * up
            }
        })
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &ArmoRMConfig) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
        })
    }

    /// (n, h) -> (n, h), and the layer's keys and values of the new tokens. The residual stream `xs`
    /// stays f32 (unless `with_compute_dtype_residual`); each block computes in `lay.dtype`. In bf16
    /// this keeps the sum of 2 × layers block outputs from rounding to 8 bits at every step.
    ///
    /// Under `accumulate` the stream `xs` is updated in place on CUDA: the caller replaces it with the
    /// result and reads it no more.
    fn forward(&self, xs: &Tensor, lay: &Layout, past: Option<&Kv>) -> Result<(Tensor, Kv)> {
        let normed = norm_to(&self.input_layernorm, xs, lay)?;
        let (attn, kv) = self.self_attn.forward(&normed, lay, past)?; // (n, nh·d)
        let o_proj = self.self_attn.o_proj();
        let xs = project_residual(xs, o_proj, attn, lay, Section::OProj)?;
        Ok((self.mlp_residual(&xs, lay)?, kv))
    }

    fn mlp_residual(&self, xs: &Tensor, lay: &Layout) -> Result<Tensor> {
        let normed = norm_to(&self.post_attention_layernorm, xs, lay)?;
        let act = self.mlp.activation(&normed, lay)?; // (n, i)
        project_residual(xs, &self.mlp.down_proj, act, lay, Section::MlpMatmul)
    }

    /// The last layer, computed only at the picked tokens: (n, h) -> (p, h).
    fn forward_picked(&self, xs: &Tensor, lay: &Layout, past: Option<&Kv>) -> Result<(Tensor, Kv)> {
        let tm = &lay.timer;
        let normed = norm_to(&self.input_layernorm, xs, lay)?;
        let (attn, kv) = self.self_attn.forward_picked(&normed, lay, past)?; // (p, nh·d)
        let residual = tm.time(Section::Gather, || xs.index_select(&lay.pick_index, 0))?;
        let o_proj = self.self_attn.o_proj();
        let xs = project_residual(&residual, o_proj, attn, lay, Section::OProj)?;
        Ok((self.mlp_residual(&xs, lay)?, kv))
    }
}

/// `xs` + `proj`(`block`): a block's output projection added to the residual stream. Under the fused
/// ops with `accumulate` and an f32 stream, one GEMM that adds into the stream (in place on CUDA: `xs`
/// must not be read afterwards); otherwise the projection in the compute dtype, then the add.
fn project_residual(
    xs: &Tensor,
    proj: &Linear,
    block: Tensor,
    lay: &Layout,
    section: Section,
) -> Result<Tensor> {
    let tm = &lay.timer;
    if lay.accumulate {
        return tm.time(section, move || {
            fused::accumulate(xs, &block, proj.weight())
        });
    }
    let out = tm.time(section, move || proj.forward(&block))?;
    add_residual(xs, out, lay)
}

/// The residual stream normed, in the blocks' compute dtype.
fn norm_to(norm: &RmsNorm, xs: &Tensor, lay: &Layout) -> Result<Tensor> {
    let tm = &lay.timer;
    if xs.dtype() != DType::F32 {
        // The stream is in the compute dtype already: nothing to cast.
        return tm.time(Section::Norm, || norm.forward(xs));
    }
    if lay.fused {
        return tm.time(Section::Norm, || {
            fused::rms_norm_to(xs, &norm.weight, norm.eps, lay.dtype, lay.vector)
        });
    }
    let normed = tm.time(Section::Norm, || norm.forward(xs))?;
    tm.time(Section::Cast, move || normed.to_dtype(lay.dtype))
}

/// `xs` + a block's output, in the residual stream's dtype.
fn add_residual(xs: &Tensor, block: Tensor, lay: &Layout) -> Result<Tensor> {
    let tm = &lay.timer;
    if xs.dtype() != DType::F32 {
        return tm.time(Section::Residual, move || xs + block);
    }
    if lay.fused {
        return tm.time(Section::Residual, move || {
            fused::add_f32(xs, &block, lay.vector)
        });
    }
    let block = tm.time(Section::Cast, move || block.to_dtype(DType::F32))?;
    tm.time(Section::Residual, move || xs + block)
}

/// `model.*` of the checkpoint: embeddings, decoder layers and the final norm.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    rope: RopeTables,
    dtype: DType,
    device: Device,
    attention: AttentionKind,
    fused: bool,
    /// The fused ops' vector kernels (`with_vector_ops`).
    vector: bool,
    /// q/k/v as one GEMM with RoPE in place under flat attention (`with_fused_qkv`).
    qkv: bool,
    /// gate/up as one GEMM (`with_fused_gate_up`).
    gate_up: bool,
    /// Output projections accumulating into the f32 residual stream (`with_accumulate`).
    accumulate: bool,
    /// The residual stream's dtype: f32, or the compute dtype (`with_compute_dtype_residual`).
    residual: DType,
    timer: Timer,
}

impl Llama {
    pub fn load(vb: VarBuilder, cfg: &ArmoRMConfig) -> Result<Self> {
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(vb.pp(format!("layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(vb.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            rope: RopeTables::new(
                rope::inv_freq(cfg),
                cfg.max_position_embeddings,
                vb.dtype(),
                vb.device(),
            )?,
            attention: AttentionKind::auto(vb.device(), vb.dtype(), cfg.head_dim()),
            fused: false,
            vector: false,
            qkv: false,
            gate_up: false,
            accumulate: false,
            residual: DType::F32,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            timer: Timer::default(),
        })
    }

    /// Computes attention this way instead of the one `load` chose (`AttentionKind::auto`).
    pub fn with_attention(mut self, attention: AttentionKind) -> Self {
        self.attention = attention;
        self
    }

    pub fn attention(&self) -> AttentionKind {
        self.attention
    }

    /// Runs the fused elementwise ops of `fused` (or not).
    pub fn with_fused_ops(mut self, fused: bool) -> Self {
        self.fused = fused;
        self
    }

    pub fn fused_ops(&self) -> bool {
        self.fused
    }

    /// Runs the fused ops' kernels on 16-byte loads and stores (CUDA; experimental, for the GPU
    /// check). No change on the CPU or without the fused ops.
    pub fn with_vector_ops(mut self, vector: bool) -> Self {
        self.vector = vector;
        self
    }

    /// Whether the fused ops run and use their vector kernels.
    pub fn vector_ops(&self) -> bool {
        self.fused && self.vector
    }

    /// Under the fused ops and flat attention, computes each layer's q, k and v as one GEMM and
    /// applies RoPE in place on its output (`fused::rope_qk`), handing the varlen kernel views of it
    /// (CUDA; experimental, for the GPU check). Joins each layer's three weights into one matrix, of
    /// which the projections keep views: no more memory.
    pub fn with_fused_qkv(mut self, on: bool) -> Result<Self> {
        if on && !self.qkv {
            for layer in &mut self.layers {
                layer.self_attn.fuse_qkv()?;
            }
        }
        self.qkv |= on;
        Ok(self)
    }

    /// Whether q/k/v run as one GEMM: asked for, with the fused ops, under flat attention.
    pub fn fused_qkv(&self) -> bool {
        self.qkv && self.fused && self.attention.is_varlen()
    }

    /// Under the fused ops, computes each MLP's gate and up projections as one GEMM, and SiLU·mul from
    /// its output's two halves (`fused::silu_mul_joined`; experimental, for the GPU check). Joins the
    /// two weights into one matrix, of which the projections keep views: no more memory.
    pub fn with_fused_gate_up(mut self, on: bool) -> Result<Self> {
        if on && !self.gate_up {
            for layer in &mut self.layers {
                layer.mlp.fuse_gate_up()?;
            }
        }
        self.gate_up |= on;
        Ok(self)
    }

    /// Whether gate/up run as one GEMM: asked for, with the fused ops.
    pub fn fused_gate_up(&self) -> bool {
        self.gate_up && self.fused
    }

    /// Under the fused ops and an f32 residual stream, runs o_proj and down_proj as GEMMs that add
    /// into the stream (`fused::accumulate`: in place and in f32 on CUDA, so a block's output is never
    /// rounded to the compute dtype; experimental, for the GPU check).
    pub fn with_accumulate(mut self, on: bool) -> Self {
        self.accumulate = on;
        self
    }

    /// Whether the output projections accumulate into the stream: asked for, with the fused ops and
    /// an f32 stream.
    pub fn accumulate(&self) -> bool {
        self.accumulate && self.fused && self.residual == DType::F32
    }

    /// The largest difference between the fused ops that run and candle's unfused ones on random rows
    /// of this model's shapes (`cfg`), on its device and in its dtype: `fused::self_check`, and with
    /// the joined GEMMs and accumulating projections their own checks too.
    pub fn fused_self_check(&self, cfg: &ArmoRMConfig) -> Result<f32> {
        let (dev, dtype) = (&self.device, self.dtype);
        let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let mut worst = fused::self_check(dev, dtype, h, self.vector_ops())?;
        if self.fused_qkv() {
            let heads = (cfg.num_attention_heads, cfg.num_kv_heads(), d);
            worst = worst.max(fused::rope_self_check(dev, dtype, heads)?);
        }
        if self.fused_gate_up() {
            worst = worst.max(fused::joined_self_check(dev, dtype, i)?);
        }
        if self.accumulate() {
            let widths = (h, cfg.num_attention_heads * d, i);
            worst = worst.max(fused::accumulate_self_check(dev, dtype, widths)?);
        }
        Ok(worst)
    }

    /// Keeps the residual stream in the compute dtype (as transformers does) instead of f32: no casts
    /// around each block and half the bytes in the adds and norms, at the cost of rounding the stream
    /// to the compute dtype after every block. No change in f32.
    pub fn with_compute_dtype_residual(mut self, on: bool) -> Self {
        self.residual = if on { self.dtype } else { DType::F32 };
        self
    }

    /// The residual stream's dtype.
    pub fn residual_dtype(&self) -> DType {
        self.residual
    }

    /// `varlen::flash_self_check` with this model's attention, heads, device and dtype; with one
    /// q/k/v GEMM, on views of one buffer too.
    pub fn flash_self_check(&self) -> Result<f32> {
        let (nh, nkv) = self.layers.first().map_or((1, 1), |l| l.self_attn.heads());
        super::varlen::flash_self_check(
            self.attention,
            &self.device,
            self.dtype,
            (nh, nkv),
            self.qkv,
        )
    }

    /// Times every section of each forward pass into the timer's profile.
    pub fn with_timer(mut self, timer: Timer) -> Self {
        self.timer = timer;
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Hidden states after the final norm at the `picks` (indices into the flat `ids`), (p, h).
    ///
    /// Rows stay flat, `ids[cu_lens[i]..cu_lens[i + 1]]` for row i, through every matmul: padding exists
    /// only inside attention. The last layer runs its queries, MLP and the norm at the picks alone.
    pub fn forward(&self, ids: &[u32], cu_lens: &[usize], picks: &[usize]) -> Result<Tensor> {
        Ok(self.run(ids, cu_lens, picks, None, false)?.0)
    }

    /// As `forward`, and keeps every layer's keys and values of these rows for rows that continue them
    /// (`forward_continued`).
    pub fn forward_prefixes(
        &self,
        ids: &[u32],
        cu_lens: &[usize],
        picks: &[usize],
    ) -> Result<(Tensor, KvCache)> {
        let (hidden, layers) = self.run(ids, cu_lens, picks, None, true)?;
        let cache = KvCache {
            layers,
            cu_lens: cu_lens.to_vec(),
        };
        Ok((hidden, cache))
    }

    /// As `forward` for rows that continue cached ones: row i's tokens follow those of cached row
    /// `past.of[i]`, at the positions after them, attending to them as if the row were run whole.
    pub fn forward_continued(
        &self,
        ids: &[u32],
        cu_lens: &[usize],
        picks: &[usize],
        past: Past,
    ) -> Result<Tensor> {
        Ok(self.run(ids, cu_lens, picks, Some(past), false)?.0)
    }

    fn run(
        &self,
        ids: &[u32],
        cu_lens: &[usize],
        picks: &[usize],
        past: Option<Past>,
        keep: bool,
    ) -> Result<(Tensor, Vec<Kv>)> {
        let tm = &self.timer;
        let (mut lay, ids) = tm.time(Section::Layout, || {
            let lay = Layout::new(
                cu_lens,
                picks,
                past,
                &self.rope,
                (self.dtype, self.attention),
                &self.device,
            )?;
            Ok((lay, Tensor::from_slice(ids, ids.len(), &self.device)?))
        })?;
        lay.timer = tm.clone();
        lay.fused = self.fused;
        lay.vector = self.vector;
        lay.accumulate = self.accumulate();
        let xs = tm.time(Section::Embedding, || self.embed_tokens.forward(&ids))?;
        let mut xs = tm.time(Section::Cast, move || xs.to_dtype(self.residual))?; // (n, h)
        let Some((last, rest)) = self.layers.split_last() else {
            let picked = tm.time(Section::Gather, || xs.index_select(&lay.pick_index, 0))?;
            return Ok((
                tm.time(Section::Norm, || self.norm.forward(&picked))?,
                vec![],
            ));
        };
        let past_of = |i: usize| past.map(|p| &p.cache.layers[i]);
        let mut kept = Vec::with_capacity(if keep { self.layers.len() } else { 0 });
        for (i, layer) in rest.iter().enumerate() {
            let (next, kv) = layer.forward(&xs, &lay, past_of(i))?;
            xs = next;
            if keep {
                kept.push(kv.compact()?);
            }
        }
        let (picked, kv) = last.forward_picked(&xs, &lay, past_of(rest.len()))?; // (p, h)
        if keep {
            kept.push(kv.compact()?);
        }
        Ok((tm.time(Section::Norm, || self.norm.forward(&picked))?, kept))
    }
}

/// One layer's keys (after RoPE) and values, flat: (tokens, nkv·d) each, in the compute dtype.
#[derive(Debug, Clone)]
pub struct Kv {
    pub(super) k: Tensor,
    pub(super) v: Tensor,
}

impl Kv {
    /// Keys and values in buffers of their own: under one q/k/v GEMM they are views of it, which
    /// would keep the queries' memory alive in a cache.
    fn compact(self) -> Result<Self> {
        Ok(Self {
            k: self.k.contiguous()?,
            v: self.v.contiguous()?,
        })
    }
}

/// Every layer's keys and values of rows already run, rows end to end as `cu_lens` says: what rows
/// continuing them attend to, instead of running them again.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Kv>,
    pub(super) cu_lens: Vec<usize>,
}

impl KvCache {
    /// Tokens held (per layer).
    pub fn tokens(&self) -> usize {
        self.cu_lens.last().copied().unwrap_or(0)
    }

    pub(super) fn len_of(&self, row: usize) -> usize {
        self.cu_lens[row + 1] - self.cu_lens[row]
    }
}

/// Cached rows that a batch continues: row i of the batch continues cached row `of[i]`.
#[derive(Debug, Clone, Copy)]
pub struct Past<'a> {
    pub cache: &'a KvCache,
    pub of: &'a [usize],
}
