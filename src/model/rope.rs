//! Rotary position embeddings as transformers computes them for Llama, with `llama3` scaling.

use candle_core::{DType, Device, Result, Tensor};

use super::config::{ArmoRMConfig, RopeScaling};

/// Checks `rope_scaling` before any weight is read: an unknown type must not be silently ignored.
pub fn check_scaling(s: &RopeScaling) -> std::result::Result<(), String> {
    match s.rope_type.as_str() {
        "default" => Ok(()),
        "llama3" => {
            let ok = s.factor.is_some()
                && s.low_freq_factor.is_some()
                && s.high_freq_factor.is_some()
                && s.original_max_position_embeddings.is_some();
            if ok && s.high_freq_factor != s.low_freq_factor {
                Ok(())
            } else {
                Err(
                    "rope_scaling of type llama3 needs factor, low_freq_factor, high_freq_factor \
                     (different from low_freq_factor) and original_max_position_embeddings"
                        .to_string(),
                )
            }
        }
        other => Err(format!(
            "rope_scaling type {other:?} is not supported (supported: default, llama3)"
        )),
    }
}

/// Inverse frequencies, in f32 arithmetic like transformers so that long rows match it to rounding.
pub fn inv_freq(cfg: &ArmoRMConfig) -> Vec<f32> {
    let dim = cfg.head_dim();
    let base = cfg.rope_theta as f32;
    let freqs: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    match &cfg.rope_scaling {
        Some(s) if s.rope_type == "llama3" => llama3_scale(&freqs, s),
        _ => freqs,
    }
}

/// transformers' `_compute_llama3_parameters`: low frequencies divided by `factor`, high ones kept,
/// a smooth blend in between.
fn llama3_scale(freqs: &[f32], s: &RopeScaling) -> Vec<f32> {
    // check_scaling has run: these are present.
    let factor = s.factor.unwrap_or(1.0) as f32;
    let low = s.low_freq_factor.unwrap_or(1.0) as f32;
    let high = s.high_freq_factor.unwrap_or(4.0) as f32;
    let old_ctx = s.original_max_position_embeddings.unwrap_or(8192) as f32;
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

    fn cfg(scaling: Option<RopeScaling>) -> ArmoRMConfig {
        let mut c: ArmoRMConfig = serde_json::from_str(
            r#"{"hidden_size": 128, "intermediate_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 1, "rms_norm_eps": 1e-5, "max_position_embeddings": 32,
                "vocab_size": 10, "rope_theta": 500000.0}"#,
        )
        .unwrap();
        c.rope_scaling = scaling;
        c
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = inv_freq(&cfg(None));
        let scaled = inv_freq(&cfg(Some(RopeScaling {
            rope_type: "llama3".into(),
            factor: Some(8.0),
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(8192),
        })));
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

    #[test]
    fn unknown_scaling_is_refused() {
        let s = RopeScaling {
            rope_type: "yarn".into(),
            factor: Some(2.0),
            low_freq_factor: None,
            high_freq_factor: None,
            original_max_position_embeddings: None,
        };
        assert!(check_scaling(&s).unwrap_err().contains("yarn"));
    }
}
