//! Rotary position embeddings as transformers computes them for Llama, with `llama3` scaling.

use candle_core::{DType, Device, Result, Tensor};

use super::config::{ArmoRMConfig, RopeScaling};

/// Inverse frequencies, in f32 arithmetic like transformers so that long rows match it to rounding.
pub fn inv_freq(cfg: &ArmoRMConfig) -> Vec<f32> {
    let dim = cfg.head_dim();
    let base = cfg.rope.theta as f32;
    let freqs: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    match cfg.rope.scaling {
        RopeScaling::Default => freqs,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => llama3_scale(
            &freqs,
            factor as f32,
            low_freq_factor as f32,
            high_freq_factor as f32,
            original_max_position_embeddings as f32,
        ),
    }
}

/// transformers' `_compute_llama3_parameters`: low frequencies divided by `factor`, high ones kept,
/// a smooth blend in between.
fn llama3_scale(freqs: &[f32], factor: f32, low: f32, high: f32, old_ctx: f32) -> Vec<f32> {
    let low_freq_wavelen = old_ctx / low;
    let high_freq_wavelen = old_ctx / high;
    freqs
        .iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            let scaled = if wavelen > low_freq_wavelen {
                f / factor
            } else {
                f
            };
            let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
            if is_medium {
                let smooth = (old_ctx / wavelen - low) / (high - low);
                (1.0 - smooth) * scaled / factor + smooth * scaled
            } else {
                scaled
            }
        })
        .collect()
}

/// cos and sin of every position up to the model's `max_position_embeddings`, built once on the
/// device at load: a batch gathers its positions from them instead of computing and copying tables of
/// its own (host work between the GPU's batches).
#[derive(Debug, Clone)]
pub struct RopeTables {
    inv_freq: Vec<f32>,
    cos: Tensor, // (len, d/2)
    sin: Tensor,
}

impl RopeTables {
    pub fn new(inv_freq: Vec<f32>, len: usize, dtype: DType, device: &Device) -> Result<Self> {
        let (cos, sin) = tables(&inv_freq, len, dtype, device)?;
        Ok(Self { inv_freq, cos, sin })
    }

    /// Tables covering positions `0..len`: the cached ones, or new ones for rows past them (scored
    /// under --allow-beyond-max-positions).
    pub fn upto(&self, len: usize) -> Result<(Tensor, Tensor)> {
        if len <= self.cos.dim(0)? {
            return Ok((self.cos.clone(), self.sin.clone()));
        }
        tables(&self.inv_freq, len, self.cos.dtype(), self.cos.device())
    }
}

/// cos and sin tables for positions `0..len`, each (len, head_dim / 2).
pub fn tables(
    inv_freq: &[f32],
    len: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(len * half);
    let mut sin = Vec::with_capacity(len * half);
    for pos in 0..len {
        for &f in inv_freq {
            let angle = pos as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(scaling: RopeScaling) -> ArmoRMConfig {
        let mut c: ArmoRMConfig = serde_json::from_str(
            r#"{"hidden_size": 128, "intermediate_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 1, "rms_norm_eps": 1e-5, "max_position_embeddings": 32,
                "vocab_size": 10, "rope_theta": 500000.0}"#,
        )
        .unwrap();
        c.rope.scaling = scaling;
        c
    }

    #[test]
    fn cached_tables_equal_tables_built_per_batch() {
        let inv_freq = inv_freq(&cfg(RopeScaling::Default));
        let cached = RopeTables::new(inv_freq.clone(), 32, DType::F32, &Device::Cpu).unwrap();
        for len in [5, 32, 40] {
            let (cos, sin) = cached.upto(len).unwrap();
            let (want_cos, want_sin) = tables(&inv_freq, len, DType::F32, &Device::Cpu).unwrap();
            let rows = |t: &Tensor| t.narrow(0, 0, len).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(rows(&cos), rows(&want_cos), "cos, {len} positions");
            assert_eq!(rows(&sin), rows(&want_sin), "sin, {len} positions");
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = inv_freq(&cfg(RopeScaling::Default));
        let scaled = inv_freq(&cfg(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }));
        assert_eq!(plain.len(), 64);
        // The highest frequency (wavelength 2π) is untouched; the lowest is divided by the factor.
        assert_eq!(plain[0], scaled[0]);
        assert!((plain[63] / scaled[63] - 8.0).abs() < 1e-5);
        // In between, the blend stays within [f / factor, f].
        for (p, s) in plain.iter().zip(&scaled) {
            assert!(*s <= *p && *s >= p / 8.0 * (1.0 - 1e-6));
        }
        assert!(plain
            .iter()
            .zip(&scaled)
            .any(|(p, s)| s < p && *s > p / 8.0));
    }
}
