//! The Llama-3 backbone (transformers' `LlamaModel`) over a flat batch: rows laid end to end, padded
//! only inside attention, and hidden states returned at the picked tokens alone (last token, gate).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::config::ArmoRMConfig;
use super::profile::{Section, Timer};
use super::rope;

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Weights in f32: norms run on the f32 residual stream whatever the compute dtype.
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints_dtype(size, "weight", Default::default(), DType::F32)?,
            eps: eps as f32,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(xs, &self.weight, self.eps)
    }
}

fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    candle_nn::linear_no_bias(in_dim, out_dim, vb)
}

/// Queries per block of causal attention: small enough that skipping the keys after a block saves
/// most of the masked half, large enough to keep the GEMMs efficient.
const QUERY_BLOCK: usize = 256;

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &ArmoRMConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        Ok(Self {
            q_proj: linear(vb.pp("q_proj"), h, nh * d)?,
            k_proj: linear(vb.pp("k_proj"), h, nkv * d)?,
            v_proj: linear(vb.pp("v_proj"), h, nkv * d)?,
            o_proj: linear(vb.pp("o_proj"), nh * d, h)?,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
        })
    }

    /// Queries at every token. `xs` (n, h) flat -> (n, h).
    fn forward(&self, xs: &Tensor, lay: &Layout) -> Result<Tensor> {
        let tm = &lay.timer;
        let q = tm.time(Section::Qkv, || self.q_proj.forward(xs))?;
        let q = tm.time(Section::Rope, move || {
            self.rope(&q, self.num_heads, &lay.cos, &lay.sin)
        })?; // (n, nh·d)
        let (k, v) = self.keys_values(xs, lay)?; // (b, nkv, t, d)
        let q = tm.time(Section::Gather, move || {
            lay.pad(&q, self.num_heads, self.head_dim)
        })?; // (b, nh, t, d)
        let out = self.attend_causal(&q, &k, &v, &lay.causal, tm)?; // (b, nh, t, d)
        let out = tm.time(Section::Gather, move || lay.unpad(&out))?; // (n, nh·d)
        tm.time(Section::OProj, move || self.o_proj.forward(&out))
    }

    /// Queries only at `lay.picks`, the tokens a reward model reads; keys and values at every token.
    /// `xs` (n, h) flat -> (p, h), p = 2b.
    fn forward_picked(&self, xs: &Tensor, picked: &Tensor, lay: &Layout) -> Result<Tensor> {
        let tm = &lay.timer;
        let q = tm.time(Section::Qkv, || self.q_proj.forward(picked))?;
        let q = tm.time(Section::Rope, move || {
            self.rope(&q, self.num_heads, &lay.pick_cos, &lay.pick_sin)
        })?; // (p, nh·d)
        let (k, v) = self.keys_values(xs, lay)?; // (b, nkv, t, d)
        let per_row = lay.picks.len() / lay.b;
        // Picks are grouped by kind (all last tokens, then all gates): (per_row, b, nh, d) -> (b, nh, per_row, d).
        let q = tm.time(Section::Gather, move || {
            q.reshape((per_row, lay.b, self.num_heads, self.head_dim))?
                .permute((1, 2, 0, 3))?
                .contiguous()
        })?;
        let out = self.attend(&q, &k, &v, &lay.pick_mask, tm)?; // (b, nh, per_row, d)
        let out = tm.time(Section::Gather, move || {
            out.permute((2, 0, 1, 3))?
                .reshape((per_row * lay.b, self.num_heads * self.head_dim))
        })?; // (p, nh·d)
        tm.time(Section::OProj, move || self.o_proj.forward(&out))
    }

    fn keys_values(&self, xs: &Tensor, lay: &Layout) -> Result<(Tensor, Tensor)> {
        let tm = &lay.timer;
        let k = tm.time(Section::Qkv, || self.k_proj.forward(xs))?;
        let k = tm.time(Section::Rope, move || {
            self.rope(&k, self.num_kv_heads, &lay.cos, &lay.sin)
        })?;
        let v = tm.time(Section::Qkv, || self.v_proj.forward(xs))?;
        tm.time(Section::Gather, move || {
            Ok((
                lay.pad(&k, self.num_kv_heads, self.head_dim)?,
                lay.pad(&v, self.num_kv_heads, self.head_dim)?,
            ))
        })
    }

    /// Rotary embedding of flat projections (n, heads·d) with per-token cos/sin (n, d/2).
    fn rope(&self, x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let x = x.reshape((1, n, heads, self.head_dim))?; // (1, n, heads, d)
        candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.reshape((n, heads * self.head_dim))
    }

    /// Causal attention in blocks of `QUERY_BLOCK` queries, each against the keys up to its own end:
    /// on long rows this skips about half of the scores and their softmax, and keeps the score
    /// tensor small. `q` (b, nh, t, d), `k`/`v` (b, nkv, t, d), `causal` (1, 1, 1, t, t).
    fn attend_causal(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: &Tensor,
        tm: &Timer,
    ) -> Result<Tensor> {
        let t = q.dim(2)?;
        if t <= QUERY_BLOCK {
            return self.attend(q, k, v, causal, tm);
        }
        let mut blocks = Vec::with_capacity(t.div_ceil(QUERY_BLOCK));
        for start in (0..t).step_by(QUERY_BLOCK) {
            let len = QUERY_BLOCK.min(t - start);
            let end = start + len;
            let mask = causal.narrow(3, start, len)?.narrow(4, 0, end)?; // (1, 1, 1, len, end)
            let q_block = tm.time(Section::Gather, || q.narrow(2, start, len)?.contiguous())?;
            blocks.push(self.attend(
                &q_block,
                &k.narrow(2, 0, end)?,
                &v.narrow(2, 0, end)?,
                &mask,
                tm,
            )?); // (b, nh, len, d)
        }
        tm.time(Section::Gather, || Tensor::cat(&blocks, 2))
    }

    /// Grouped-query attention without copying kv heads: the n_rep query heads of one kv head are
    /// stacked along the query axis. `q` (b, nh, tq, d), `k`/`v` (b, nkv, t, d), `mask` additive f32
    /// broadcastable to (b, nkv, n_rep, tq, t). Returns (b, nh, tq, d).
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        tm: &Timer,
    ) -> Result<Tensor> {
        let (b, _, tq, d) = q.dims4()?;
        let (nkv, t) = (self.num_kv_heads, k.dim(2)?);
        let n_rep = self.num_heads / nkv;
        let q = q.reshape((b, nkv, n_rep * tq, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = tm.time(Section::AttnMatmul, || q.matmul(&k.t()?))?;
        // Scores (b, nkv, n_rep·tq, t); softmax in f32 whatever the compute dtype, as transformers'
        // eager attention does.
        let probs = tm.time(Section::Softmax, move || {
            let scores = (scores * scale)?
                .to_dtype(DType::F32)?
                .reshape((b, nkv, n_rep, tq, t))?
                .broadcast_add(mask)?
                .reshape((b, nkv, n_rep * tq, t))?;
            candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())
        })?;
        tm.time(Section::AttnMatmul, move || {
            probs.matmul(v)?.reshape((b, self.num_heads, tq, d))
        })
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &ArmoRMConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear(vb.pp("gate_proj"), h, i)?,
            up_proj: linear(vb.pp("up_proj"), h, i)?,
            down_proj: linear(vb.pp("down_proj"), i, h)?,
        })
    }

    fn forward(&self, xs: &Tensor, tm: &Timer) -> Result<Tensor> {
        // `move` closures drop each input as soon as it is used, as the unprofiled expression did.
        let gate = tm.time(Section::MlpMatmul, || self.gate_proj.forward(xs))?;
        let gate = tm.time(Section::SiluMul, move || candle_nn::ops::silu(&gate))?;
        let up = tm.time(Section::MlpMatmul, || self.up_proj.forward(xs))?;
        let act = tm.time(Section::SiluMul, move || gate * up)?;
        tm.time(Section::MlpMatmul, move || self.down_proj.forward(&act))
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

    /// (n, h) -> (n, h). The residual stream `xs` stays f32; each block computes in `lay.dtype`.
    /// In bf16 this keeps the sum of 2 × layers block outputs from rounding to 8 bits at every step.
    fn forward(&self, xs: &Tensor, lay: &Layout) -> Result<Tensor> {
        let normed = norm_to(&self.input_layernorm, xs, lay)?;
        let attn = self.self_attn.forward(&normed, lay)?;
        let xs = add_f32(xs, attn, lay)?;
        self.mlp_residual(&xs, lay)
    }

    fn mlp_residual(&self, xs: &Tensor, lay: &Layout) -> Result<Tensor> {
        let normed = norm_to(&self.post_attention_layernorm, xs, lay)?;
        let mlp = self.mlp.forward(&normed, &lay.timer)?;
        add_f32(xs, mlp, lay)
    }

    /// The last layer, computed only at the picked tokens: (n, h) -> (p, h).
    fn forward_picked(&self, xs: &Tensor, lay: &Layout) -> Result<Tensor> {
        let tm = &lay.timer;
        let normed = norm_to(&self.input_layernorm, xs, lay)?;
        let picked = tm.time(Section::Gather, || normed.index_select(&lay.pick_index, 0))?; // (p, h)
        let attn = self.self_attn.forward_picked(&normed, &picked, lay)?;
        let residual = tm.time(Section::Gather, || xs.index_select(&lay.pick_index, 0))?;
        let xs = add_f32(&residual, attn, lay)?;
        self.mlp_residual(&xs, lay)
    }
}

/// The f32 residual stream normed, in the blocks' compute dtype.
fn norm_to(norm: &RmsNorm, xs: &Tensor, lay: &Layout) -> Result<Tensor> {
    let normed = lay.timer.time(Section::Norm, || norm.forward(xs))?;
    lay.timer
        .time(Section::Cast, move || normed.to_dtype(lay.dtype))
}

/// `xs` + a block's output, back in f32.
fn add_f32(xs: &Tensor, block: Tensor, lay: &Layout) -> Result<Tensor> {
    let block = lay
        .timer
        .time(Section::Cast, move || block.to_dtype(DType::F32))?;
    lay.timer.time(Section::Residual, move || xs + block)
}

/// `model.*` of the checkpoint: embeddings, decoder layers and the final norm.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
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
            inv_freq: rope::inv_freq(cfg),
            dtype: vb.dtype(),
            device: vb.device().clone(),
            timer: Timer::default(),
        })
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
        let tm = &self.timer;
        let (mut lay, ids) = tm.time(Section::Layout, || {
            let lay = Layout::new(cu_lens, picks, &self.inv_freq, self.dtype, &self.device)?;
            Ok((lay, Tensor::from_slice(ids, ids.len(), &self.device)?))
        })?;
        lay.timer = tm.clone();
        let xs = tm.time(Section::Embedding, || self.embed_tokens.forward(&ids))?;
        let mut xs = tm.time(Section::Cast, move || xs.to_dtype(DType::F32))?; // (n, h)
        let Some((last, rest)) = self.layers.split_last() else {
            let picked = tm.time(Section::Gather, || xs.index_select(&lay.pick_index, 0))?;
            return tm.time(Section::Norm, || self.norm.forward(&picked));
        };
        for layer in rest {
            xs = layer.forward(&xs, &lay)?;
        }
        let picked = last.forward_picked(&xs, &lay)?; // (p, h)
        tm.time(Section::Norm, || self.norm.forward(&picked))
    }
}

/// Where each token of a flat batch sits, built once per batch and shared by every layer.
struct Layout {
    /// The compute dtype of the blocks' matmuls.
    dtype: DType,
    b: usize,
    t: usize,
    picks: Vec<usize>,
    /// For each slot of the padded (b, t) grid, the flat token it holds (padding repeats token 0).
    to_padded: Tensor,
    /// For each flat token, its slot in the padded grid.
    to_flat: Tensor,
    pick_index: Tensor,
    cos: Tensor, // (n, d/2)
    sin: Tensor,
    pick_cos: Tensor, // (p, d/2)
    pick_sin: Tensor,
    /// Additive causal mask (1, 1, 1, t, t). With right padding it is all that is needed: a real token
    /// never sees a later position, and every padding slot comes after the row's last real token.
    causal: Tensor,
    /// (b, 1, 1, per_row, t): each picked query sees the keys up to its own position.
    pick_mask: Tensor,
    /// The model's timer (off unless a profile is on).
    timer: Timer,
}

impl Layout {
    fn new(
        cu_lens: &[usize],
        picks: &[usize],
        inv_freq: &[f32],
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let b = cu_lens.len() - 1;
        let lens: Vec<usize> = cu_lens.windows(2).map(|w| w[1] - w[0]).collect();
        let t = lens.iter().copied().max().unwrap_or(0);
        let row_of = |i: usize| cu_lens.partition_point(|&c| c <= i) - 1;
        let pos_of = |i: usize| i - cu_lens[row_of(i)];

        let mut to_padded = vec![0u32; b * t];
        let mut to_flat = Vec::with_capacity(cu_lens[b]);
        for (r, w) in cu_lens.windows(2).enumerate() {
            for (p, i) in (w[0]..w[1]).enumerate() {
                to_padded[r * t + p] = i as u32;
                to_flat.push((r * t + p) as u32);
            }
        }
        let positions: Vec<u32> = (0..cu_lens[b]).map(|i| pos_of(i) as u32).collect();
        let pick_positions: Vec<u32> = picks.iter().map(|&i| positions[i]).collect();
        let (cos_t, sin_t) = rope::tables(inv_freq, t, dtype, dev)?; // (t, d/2)
        let gather = |table: &Tensor, idx: &[u32]| {
            table.index_select(&Tensor::from_slice(idx, idx.len(), dev)?, 0)
        };

        let per_row = picks.len() / b.max(1);
        let mut pick_mask = vec![f32::NEG_INFINITY; b * per_row * t];
        for (k, &i) in picks.iter().enumerate() {
            let (slot, r) = (k / b, k % b);
            debug_assert_eq!(row_of(i), r, "picks must be grouped by kind, rows in order");
            for j in 0..=pos_of(i) {
                pick_mask[(r * per_row + slot) * t + j] = 0.0;
            }
        }
        let causal: Vec<f32> = (0..t * t)
            .map(|k| {
                if k % t > k / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Self {
            dtype,
            b,
            t,
            picks: picks.to_vec(),
            to_padded: Tensor::from_vec(to_padded, b * t, dev)?,
            to_flat: Tensor::from_vec(to_flat, cu_lens[b], dev)?,
            pick_index: Tensor::from_vec(
                picks.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                picks.len(),
                dev,
            )?,
            cos: gather(&cos_t, &positions)?,
            sin: gather(&sin_t, &positions)?,
            pick_cos: gather(&cos_t, &pick_positions)?,
            pick_sin: gather(&sin_t, &pick_positions)?,
            causal: Tensor::from_vec(causal, (1, 1, 1, t, t), dev)?,
            pick_mask: Tensor::from_vec(pick_mask, (b, 1, 1, per_row, t), dev)?,
            timer: Timer::default(),
        })
    }

    /// Flat (n, heads·d) -> padded (b, heads, t, d).
    fn pad(&self, x: &Tensor, heads: usize, d: usize) -> Result<Tensor> {
        x.index_select(&self.to_padded, 0)?
            .reshape((self.b, self.t, heads, d))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Padded (b, heads, t, d) -> flat (n, heads·d).
    fn unpad(&self, x: &Tensor) -> Result<Tensor> {
        let (b, heads, t, d) = x.dims4()?;
        x.transpose(1, 2)?
            .contiguous()?
            .reshape((b * t, heads * d))?
            .index_select(&self.to_flat, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attention(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Attention {
        let proj = || {
            Linear::new(
                Tensor::zeros((1, 1), DType::F32, &Device::Cpu).unwrap(),
                None,
            )
        };
        Attention {
            q_proj: proj(),
            k_proj: proj(),
            v_proj: proj(),
            o_proj: proj(),
            num_heads,
            num_kv_heads,
            head_dim,
        }
    }

    #[test]
    fn blocked_causal_attention_equals_full_attention() {
        // 600 tokens: two full query blocks and a partial one; GQA with 2 query heads per kv head.
        let (b, nh, nkv, t, d) = (2, 4, 2, 600, 8);
        let attn = attention(nh, nkv, d);
        let dev = &Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (b, nh, t, d), dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (b, nkv, t, d), dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (b, nkv, t, d), dev).unwrap();
        let lay = Layout::new(
            &[0, t, 2 * t],
            &[t - 1, 2 * t - 1],
            &[1.0; 4],
            DType::F32,
            dev,
        )
        .unwrap();
        let full = attn.attend(&q, &k, &v, &lay.causal, &lay.timer).unwrap();
        let blocked = attn
            .attend_causal(&q, &k, &v, &lay.causal, &lay.timer)
            .unwrap();
        assert_eq!(blocked.dims(), full.dims());
        let diff = (blocked - full)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "blocked attention differs by {diff}");
    }

    #[test]
    fn layout_maps_flat_tokens_to_the_padded_grid_and_back() {
        // Rows of 2 and 3 tokens; picks: last tokens (1, 4), then gates (0, 2).
        let lay = Layout::new(&[0, 2, 5], &[1, 4, 0, 2], &[1.0], DType::F32, &Device::Cpu).unwrap();
        assert_eq!((lay.b, lay.t), (2, 3));
        assert_eq!(lay.to_padded.to_vec1::<u32>().unwrap(), [0, 1, 0, 2, 3, 4]);
        assert_eq!(lay.to_flat.to_vec1::<u32>().unwrap(), [0, 1, 3, 4, 5]);
        // Positions restart at 0 in each row: cos(pos · 1.0).
        let cos: Vec<f32> = lay.cos.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = [0., 1., 0., 1., 2.].iter().map(|p: &f32| p.cos()).collect();
        assert_eq!(cos, want);
        // Row 0's last token (position 1) sees keys 0..=1; row 1's gate (position 0) sees key 0 only.
        let m: Vec<f32> = lay.pick_mask.flatten_all().unwrap().to_vec1().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(&m[0..3], &[0., 0., inf]);
        assert_eq!(&m[9..12], &[0., inf, inf]);
    }
}
