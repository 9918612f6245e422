//! Llama-3 self-attention over a flat batch: GQA with RoPE, computed either on padded rows in causal
//! query blocks (any device and dtype) or on the flat rows by a variable-length kernel (`varlen`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::config::ArmoRMConfig;
use super::layout::{Grid, Layout, Padded};
use super::llama::{linear, Kv};
use super::profile::{Section, Timer};
use super::varlen::Varlen;

/// Queries per block of causal attention: small enough that skipping the keys after a block saves
/// most of the masked half, large enough to keep the GEMMs efficient.
pub const QUERY_BLOCK: usize = 256;

#[derive(Debug, Clone)]
pub(super) struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// q, k and v's weights as one ((nh + 2·nkv)·d, h) matrix, of which the three projections' weights
    /// are views (`fuse_qkv`): one GEMM for the three under `ARMORM_FUSED_OPS=qkv`.
    qkv: Option<Linear>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub(super) fn load(vb: VarBuilder, cfg: &ArmoRMConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        Ok(Self {
            q_proj: linear(vb.pp("q_proj"), h, nh * d)?,
            k_proj: linear(vb.pp("k_proj"), h, nkv * d)?,
            v_proj: linear(vb.pp("v_proj"), h, nkv * d)?,
            o_proj: linear(vb.pp("o_proj"), nh * d, h)?,
            qkv: None,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: d,
        })
    }

    /// Queries at every token. `xs` (n, h) flat -> (n, nh·d), the heads' outputs before `o_proj`
    /// (the layer applies it, adding into the residual stream), and this layer's keys and values of
    /// the new tokens (flat) for a cache.
    pub(super) fn forward(
        &self,
        xs: &Tensor,
        lay: &Layout,
        past: Option<&Kv>,
    ) -> Result<(Tensor, Kv)> {
        match &lay.grid {
            Grid::Padded(grid) => self.attend_padded(xs, lay, grid, past),
            Grid::Varlen(grid) => self.attend_flat(xs, lay, grid, past),
        }
    }

    /// The output projection, (nh·d) -> h.
    pub(super) fn o_proj(&self) -> &Linear {
        &self.o_proj
    }

    /// Queries only at `lay.picks`, the tokens a reward model reads; keys and values at every token.
    /// `xs` (n, h) flat -> (p, nh·d), p = b × picks per row, before `o_proj`, and the new keys and
    /// values.
    pub(super) fn forward_picked(
        &self,
        xs: &Tensor,
        lay: &Layout,
        past: Option<&Kv>,
    ) -> Result<(Tensor, Kv)> {
        let tm = &lay.timer;
        let (out, kv) = match &lay.grid {
            Grid::Padded(grid) => self.attend_picked(xs, lay, grid, past)?,
            // A pick that is not a row's last token (the gate) is no query suffix a varlen kernel
            // can take alone: attend at every token, keep the picks (one layer of 32: < 1% more work).
            Grid::Varlen(grid) => {
                let (out, kv) = self.attend_flat(xs, lay, grid, past)?;
                let out = tm.time(Section::Gather, move || {
                    out.index_select(&lay.pick_index, 0)
                })?;
                (out, kv)
            }
        }; // (p, nh·d)
        Ok((out, kv))
    }

    /// Puts the q, k and v weights into one matrix (the three projections keep views of it: no more
    /// memory), so that flat attention under the fused ops runs them as one GEMM.
    pub(super) fn fuse_qkv(&mut self) -> Result<()> {
        let (q, k) = (self.q_proj.weight().dim(0)?, self.k_proj.weight().dim(0)?);
        let weight = Tensor::cat(
            &[
                self.q_proj.weight(),
                self.k_proj.weight(),
                self.v_proj.weight(),
            ],
            0,
        )?; // ((nh + 2·nkv)·d, h)
        let view = |start, len| {
            Ok::<_, candle_core::Error>(Linear::new(weight.narrow(0, start, len)?, None))
        };
        self.q_proj = view(0, q)?;
        self.k_proj = view(q, k)?;
        self.v_proj = view(q + k, k)?;
        self.qkv = Some(Linear::new(weight, None));
        Ok(())
    }

    /// Query heads and key/value heads.
    pub(super) fn heads(&self) -> (usize, usize) {
        (self.num_heads, self.num_kv_heads)
    }

    /// Attention of padded queries at every token: (n, h) -> (n, nh·d), and the new keys and values.
    fn attend_padded(
        &self,
        xs: &Tensor,
        lay: &Layout,
        grid: &Padded,
        past: Option<&Kv>,
    ) -> Result<(Tensor, Kv)> {
        let tm = &lay.timer;
        let q = tm.time(Section::Qkv, || self.q_proj.forward(xs))?;
        let q = tm.time(Section::Rope, move || {
            self.rope(&q, self.num_heads, &lay.cos, &lay.sin)
        })?; // (n, nh·d)
        let kv = self.keys_values(xs, lay)?;
        let (k, v) = self.padded_keys_values(&kv, grid, past, tm)?; // (b, nkv, t, d)
        let q = tm.time(Section::Gather, move || {
            grid.pad_queries(&q, self.num_heads, self.head_dim)
        })?; // (b, nh, tq, d)
        let out = self.attend_causal(&q, &k, &v, grid, tm)?; // (b, nh, tq, d)
        Ok((tm.time(Section::Gather, move || grid.unpad(&out))?, kv))
    }

    /// Attention of the picked queries alone: (n, h) -> (p, nh·d), and the new keys and values.
    fn attend_picked(
        &self,
        xs: &Tensor,
        lay: &Layout,
        grid: &Padded,
        past: Option<&Kv>,
    ) -> Result<(Tensor, Kv)> {
        let tm = &lay.timer;
        let picked = tm.time(Section::Gather, || xs.index_select(&lay.pick_index, 0))?; // (p, h)
        let q = tm.time(Section::Qkv, move || self.q_proj.forward(&picked))?;
        let q = tm.time(Section::Rope, move || {
            self.rope(&q, self.num_heads, &lay.pick_cos, &lay.pick_sin)
        })?; // (p, nh·d)
        let kv = self.keys_values(xs, lay)?;
        let (k, v) = self.padded_keys_values(&kv, grid, past, tm)?; // (b, nkv, t, d)
        let per_row = lay.picks.len() / lay.b;
        // Picks are grouped by kind (all last tokens, then all gates): (per_row, b, nh, d) -> (b, nh, per_row, d).
        let q = tm.time(Section::Gather, move || {
            q.reshape((per_row, lay.b, self.num_heads, self.head_dim))?
                .permute((1, 2, 0, 3))?
                .contiguous()
        })?;
        let out = self.attend(&q, &k, &v, &grid.pick_mask, tm)?; // (b, nh, per_row, d)
        let out = tm.time(Section::Gather, move || {
            out.permute((2, 0, 1, 3))?
                .reshape((per_row * lay.b, self.num_heads * self.head_dim))
        })?; // (p, nh·d)
        Ok((out, kv))
    }

    /// Variable-length attention over the flat rows, queries at every token: (n, h) -> (n, nh·d), and
    /// the new keys and values.
    fn attend_flat(
        &self,
        xs: &Tensor,
        lay: &Layout,
        grid: &Varlen,
        past: Option<&Kv>,
    ) -> Result<(Tensor, Kv)> {
        if let (Some(qkv), true, None) = (&self.qkv, lay.fused, past) {
            return self.attend_flat_fused(xs, lay, grid, qkv);
        }
        let tm = &lay.timer;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let n = xs.dim(0)?;
        let q = tm.time(Section::Qkv, || self.q_proj.forward(xs))?;
        let q = tm.time(Section::Rope, move || self.rope(&q, nh, &lay.cos, &lay.sin))?;
        let kv = self.keys_values(xs, lay)?;
        let (k, v) = tm.time(Section::Gather, || {
            let k = grid.keys(&kv.k, past.map(|p| &p.k))?; // (total_k, nkv·d)
            let v = grid.keys(&kv.v, past.map(|p| &p.v))?;
            Ok((k.reshape(((), nkv, d))?, v.reshape(((), nkv, d))?))
        })?;
        let out = tm.time(Section::VarlenAttention, || {
            grid.attend(lay.attention, &q.reshape((n, nh, d))?, &k, &v)
        })?; // (n, nh, d)
        Ok((out.reshape((n, nh * d))?, kv))
    }

    /// `attend_flat` without a cache, through one q/k/v GEMM and RoPE in place on its output: queries,
    /// keys and values stay views of that one buffer, as the varlen kernel takes them (only the last
    /// dim contiguous), so nothing is copied. The keys and values returned are views of it too.
    fn attend_flat_fused(
        &self,
        xs: &Tensor,
        lay: &Layout,
        grid: &Varlen,
        qkv: &Linear,
    ) -> Result<(Tensor, Kv)> {
        let tm = &lay.timer;
        let (nh, nkv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let n = xs.dim(0)?;
        let all = tm.time(Section::Qkv, || qkv.forward(xs))?; // (n, (nh + 2·nkv)·d)
        tm.time(Section::Rope, || {
            super::fused::rope_qk(&all, &lay.cos, &lay.sin, nh + nkv, d)
        })?;
        let heads = all.reshape((n, nh + 2 * nkv, d))?;
        let out = tm.time(Section::VarlenAttention, || {
            grid.attend(
                lay.attention,
                &heads.narrow(1, 0, nh)?,
                &heads.narrow(1, nh, nkv)?,
                &heads.narrow(1, nh + nkv, nkv)?,
            )
        })?; // (n, nh, d)
        let kv = Kv {
            k: all.narrow(1, nh * d, nkv * d)?,
            v: all.narrow(1, (nh + nkv) * d, nkv * d)?,
        };
        Ok((out.reshape((n, nh * d))?, kv))
    }

    /// Keys (after RoPE) and values of the new tokens, flat (n, nkv·d).
    fn keys_values(&self, xs: &Tensor, lay: &Layout) -> Result<Kv> {
        let tm = &lay.timer;
        let k = tm.time(Section::Qkv, || self.k_proj.forward(xs))?;
        let k = tm.time(Section::Rope, move || {
            self.rope(&k, self.num_kv_heads, &lay.cos, &lay.sin)
        })?;
        let v = tm.time(Section::Qkv, || self.v_proj.forward(xs))?;
        Ok(Kv { k, v })
    }

    /// Keys and values of every row padded (b, nkv, t, d): the cached prefix (`past`, flat over the
    /// cache's rows) followed by the row's new tokens (`new`).
    fn padded_keys_values(
        &self,
        new: &Kv,
        grid: &Padded,
        past: Option<&Kv>,
        tm: &Timer,
    ) -> Result<(Tensor, Tensor)> {
        tm.time(Section::Gather, || {
            let with_past = |new: &Tensor, old: Option<&Tensor>| match old {
                Some(old) => Tensor::cat(&[old, new], 0), // (cached + n, nkv·d)
                None => Ok(new.clone()),
            };
            let k_all = with_past(&new.k, past.map(|p| &p.k))?;
            let v_all = with_past(&new.v, past.map(|p| &p.v))?;
            Ok((
                grid.pad_keys(&k_all, self.num_kv_heads, self.head_dim)?,
                grid.pad_keys(&v_all, self.num_kv_heads, self.head_dim)?,
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
    /// tensor small. `q` (b, nh, tq, d), `k`/`v` (b, nkv, t, d); the mask is `grid.causal`.
    fn attend_causal(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grid: &Padded,
        tm: &Timer,
    ) -> Result<Tensor> {
        let causal = &grid.causal;
        let tq = q.dim(2)?;
        if tq <= QUERY_BLOCK {
            return self.attend(q, k, v, causal, tm);
        }
        let t = k.dim(2)?;
        let mut blocks = Vec::with_capacity(tq.div_ceil(QUERY_BLOCK));
        for start in (0..tq).step_by(QUERY_BLOCK) {
            let len = QUERY_BLOCK.min(tq - start);
            // A query of the block sits at most at position `max_past + start + len - 1`.
            let end = (grid.max_past + start + len).min(t);
            let mask = causal.narrow(3, start, len)?.narrow(4, 0, end)?; // (1|b, 1, 1, len, end)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rope::RopeTables;
    use crate::model::testing::{max_diff, seeded_randn};
    use crate::model::varlen::AttentionKind;
    use candle_core::Device;

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
            qkv: None,
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
        let q = seeded_randn(0.0, 1.0, (b, nh, t, d), 1);
        let k = seeded_randn(0.0, 1.0, (b, nkv, t, d), 2);
        let v = seeded_randn(0.0, 1.0, (b, nkv, t, d), 3);
        let lay = Layout::new(
            &[0, t, 2 * t],
            &[t - 1, 2 * t - 1],
            None,
            &RopeTables::new(vec![1.0; 4], 16, DType::F32, dev).unwrap(),
            (DType::F32, AttentionKind::Blocked),
            dev,
        )
        .unwrap();
        let Grid::Padded(grid) = &lay.grid else {
            panic!("blocked attention pads")
        };
        let full = attn.attend(&q, &k, &v, &grid.causal, &lay.timer).unwrap();
        let blocked = attn.attend_causal(&q, &k, &v, grid, &lay.timer).unwrap();
        assert_eq!(blocked.dims(), full.dims());
        let diff = max_diff(&blocked, &full);
        assert!(diff < 1e-5, "blocked attention differs by {diff}");
    }
}
