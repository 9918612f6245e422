//! The Llama-3 backbone (transformers' `LlamaModel`): hidden states of a right-padded batch.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::config::ArmoRMConfig;
use super::rope;

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
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

    /// `xs` (b, t, h); `mask` additive (b, 1, t, t); `cos`/`sin` (t, d/2).
    fn forward(&self, xs: &Tensor, mask: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, t, _) = xs.dims3()?;
        let heads = |x: Tensor, n: usize| {
            x.reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(self.q_proj.forward(xs)?, self.num_heads)?; // (b, nh, t, d)
        let k = heads(self.k_proj.forward(xs)?, self.num_kv_heads)?; // (b, nkv, t, d)
        let v = heads(self.v_proj.forward(xs)?, self.num_kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let k = repeat_kv(k, self.num_heads / self.num_kv_heads)?; // (b, nh, t, d)
        let v = repeat_kv(v, self.num_heads / self.num_kv_heads)?;

        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?; // (b, nh, t, t)
                                                    // Softmax in f32 whatever the compute dtype, as transformers' eager attention does.
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs.matmul(&v)?; // (b, nh, t, d)
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.num_heads * self.head_dim))?; // (b, t, h)
        self.o_proj.forward(&out)
    }
}

/// (b, nkv, t, d) -> (b, nkv * n_rep, t, d), each kv head serving `n_rep` query heads in turn.
fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, nkv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, nkv, n_rep, t, d))?
        .reshape((b, nkv * n_rep, t, d))
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

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(xs)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)?)?)
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

    fn forward(&self, xs: &Tensor, mask: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(xs)?, mask, cos, sin)?;
        let xs = (xs + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&xs)?)?;
        xs + mlp
    }
}

/// `model.*` of the checkpoint. `forward` stops before the final norm: callers normalize only the rows
/// they read, which for a reward model is two positions per sequence, not every token.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
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
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `ids` (b, t) right-padded with any in-vocabulary id; `lens` the real length of each row.
    /// Returns the last layer's output before the final norm, (b, t, h).
    pub fn forward(&self, ids: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mask = padding_mask(lens, t, &self.device)?; // (b, 1, t, t)
        let (cos, sin) = rope::tables(&self.inv_freq, t, self.dtype, &self.device)?;
        let mut xs = self.embed_tokens.forward(ids)?; // (b, t, h)
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask, &cos, &sin)?;
        }
        debug_assert_eq!(xs.dim(0)?, b);
        Ok(xs)
    }

    /// The final norm, for the few rows that are read: (n, h) -> (n, h).
    pub fn norm(&self, xs: &Tensor) -> Result<Tensor> {
        self.norm.forward(xs)
    }
}

/// Additive f32 mask (b, 1, t, t): query i sees key j when j <= i (causal) and j < len (padding).
/// With right padding the causal part already hides padding from every real token; the padding part
/// keeps padded query rows well defined too.
fn padding_mask(lens: &[usize], t: usize, device: &Device) -> Result<Tensor> {
    let mut mask = vec![0f32; lens.len() * t * t];
    for (row, &len) in lens.iter().enumerate() {
        let block = &mut mask[row * t * t..(row + 1) * t * t];
        for i in 0..t {
            for j in 0..t {
                if j > i || j >= len.max(1) {
                    block[i * t + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(mask, (lens.len(), 1, t, t), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_is_causal_and_hides_padding() {
        let m = padding_mask(&[2, 3], 3, &Device::Cpu).unwrap();
        let m: Vec<Vec<Vec<f32>>> = m.squeeze(1).unwrap().to_vec3().unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(
            m[0],
            vec![vec![0., inf, inf], vec![0., 0., inf], vec![0., 0., inf]]
        );
        assert_eq!(
            m[1],
            vec![vec![0., inf, inf], vec![0., 0., inf], vec![0., 0., 0.]]
        );
    }

    #[test]
    fn repeat_kv_interleaves_like_transformers() {
        // transformers' repeat_kv maps query head h to kv head h / n_rep.
        let x = Tensor::arange(0f32, 2., &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 1, 1))
            .unwrap();
        let r: Vec<f32> = repeat_kv(x, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(r, vec![0., 0., 0., 1., 1., 1.]);
    }
}
