//! The model's `config.json`, mirrored field by field, with ArmoRM's head defaults.

use serde::Deserialize;

/// `config.json` of an ArmoRM checkpoint: a Llama config plus the gating head's four fields.
#[derive(Debug, Clone, Deserialize)]
pub struct ArmoRMConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Absent in pre-GQA configs, where it equals `num_attention_heads`.
    pub num_key_value_heads: Option<usize>,
    /// Absent in most Llama configs, where it is `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_num_objectives")]
    pub num_objectives: usize,
    #[serde(default = "default_gating_temperature")]
    pub gating_temperature: f64,
    #[serde(default = "default_gating_hidden_dim")]
    pub gating_hidden_dim: usize,
    #[serde(default = "default_gating_n_hidden")]
    pub gating_n_hidden: usize,
}

/// `rope_scaling` as transformers writes it (`type` in older configs, `rope_type` in newer ones).
#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_hidden_act() -> String {
    "silu".to_string()
}
fn default_num_objectives() -> usize {
    19
}
fn default_gating_temperature() -> f64 {
    10.0
}
fn default_gating_hidden_dim() -> usize {
    1024
}
fn default_gating_n_hidden() -> usize {
    3
}

impl ArmoRMConfig {
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Refuses what this implementation does not compute, rather than computing something else.
    pub fn validate(&self) -> Result<(), String> {
        if self.hidden_act != "silu" {
            return Err(format!(
                "hidden_act {:?} is not supported (only \"silu\")",
                self.hidden_act
            ));
        }
        if self.attention_bias || self.mlp_bias {
            return Err("attention_bias / mlp_bias are not supported".to_string());
        }
        if self.num_attention_heads == 0 || self.num_kv_heads() == 0 {
            return Err("num_attention_heads and num_key_value_heads must be positive".to_string());
        }
        if self.num_attention_heads % self.num_kv_heads() != 0 {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_kv_heads()
            ));
        }
        if self.head_dim() % 2 != 0 {
            return Err(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        if self.num_objectives == 0 || self.gating_temperature <= 0.0 {
            return Err("num_objectives must be positive and gating_temperature > 0".to_string());
        }
        if let Some(s) = &self.rope_scaling {
            crate::model::rope::check_scaling(s)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_fields_default_to_armorm_values() {
        let cfg: ArmoRMConfig = serde_json::from_str(
            r#"{"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 32,
                "vocab_size": 10}"#,
        )
        .unwrap();
        assert_eq!(cfg.num_objectives, 19);
        assert_eq!(cfg.gating_temperature, 10.0);
        assert_eq!(cfg.gating_hidden_dim, 1024);
        assert_eq!(cfg.gating_n_hidden, 3);
        assert_eq!(cfg.num_kv_heads(), 2);
        assert_eq!(cfg.head_dim(), 4);
        assert_eq!(cfg.rope_theta, 10_000.0);
        cfg.validate().unwrap();
    }

    #[test]
    fn rope_scaling_accepts_legacy_type_key() {
        let s: RopeScaling = serde_json::from_str(
            r#"{"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}"#,
        )
        .unwrap();
        assert_eq!(s.rope_type, "llama3");
    }
}
