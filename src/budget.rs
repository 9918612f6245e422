//! The default token budget per forward pass (`--max-batch-tokens auto`): fixed on the CPU, from the
//! free memory on a GPU, so that long rows batch as far as the card allows without tuning by hand.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::model::{ArmoRMConfig, AttentionKind, QUERY_BLOCK};

/// The budget on the CPU, where memory is rarely what limits a batch (perf-notes 9).
pub const CPU_BATCH_TOKENS: usize = 16384;
/// The most `auto` gives a GPU: throughput was flat from 8K to 131K tokens on an H200 (issue 10);
/// beyond this a batch only delays the first results and needs longer windows to fill.
pub const MAX_AUTO_BATCH_TOKENS: usize = 65536;
/// Share of the free memory activations may take: the rest absorbs the allocator's fragmentation.
const FREE_MEMORY_SHARE: f64 = 0.8;

/// `--max-batch-tokens`: a number, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchTokens {
    Auto,
    Fixed(usize),
}

impl FromStr for BatchTokens {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BatchTokens::Auto),
            n => match n.parse::<usize>() {
                Ok(n) if n > 0 => Ok(BatchTokens::Fixed(n)),
                _ => Err(format!(
                    "expected auto or a positive number of tokens, not {n:?}"
                )),
            },
        }
    }
}

impl fmt::Display for BatchTokens {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            BatchTokens::Auto => f.write_str("auto"),
            BatchTokens::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// Bytes of device memory one budget token may need at the peak of a layer: the f32 residual stream
/// (old and new), the normed copy, q/k/v, the attention output, the MLP's three live intermediates,
/// blocked attention's scores (a query block's scores in the compute dtype and f32, and the
/// probabilities) and the keys and values of every layer that a shared prefix keeps. An upper bound:
/// not all of it is live at once.
pub fn bytes_per_token(cfg: &ArmoRMConfig, dtype: DType, attention: AttentionKind) -> usize {
    let e = dtype.size_in_bytes();
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let stream = 2 * 4 * h + e * h;
    let attn = e * (h + 2 * kv) + e * h;
    let mlp = 3 * e * i;
    let scores = match attention {
        AttentionKind::Blocked => cfg.num_attention_heads * QUERY_BLOCK * (2 * e + 4),
        _ => 0,
    };
    let cache = 2 * cfg.num_hidden_layers * kv * e;
    stream + attn + mlp + scores + cache
}

/// The budget `auto` gives: `free` bytes (the least of the devices'; `None` on the CPU) shared out at
/// `per_token` bytes, between 1,024 tokens and `MAX_AUTO_BATCH_TOKENS`.
pub fn auto(free: Option<usize>, per_token: usize) -> usize {
    match free {
        None => CPU_BATCH_TOKENS,
        Some(free) => {
            let tokens = (free as f64 * FREE_MEMORY_SHARE) / per_token.max(1) as f64;
            (tokens as usize).clamp(1024, MAX_AUTO_BATCH_TOKENS)
        }
    }
}

/// Free memory on `device` in bytes, after the weights were loaded; `None` on the CPU (and where the
/// device cannot tell).
pub fn free_memory(device: &Device) -> Option<usize> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => dev.cuda_stream().context().mem_get_info().ok().map(|m| m.0),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama3_8b() -> ArmoRMConfig {
        ArmoRMConfig::from_json(
            r#"{"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192}"#,
        )
        .unwrap()
    }

    #[test]
    fn parses_auto_and_positive_counts_only() {
        assert_eq!("auto".parse(), Ok(BatchTokens::Auto));
        assert_eq!("300".parse(), Ok(BatchTokens::Fixed(300)));
        assert!("0".parse::<BatchTokens>().is_err());
        assert!("lots".parse::<BatchTokens>().is_err());
        assert_eq!(BatchTokens::Fixed(300).to_string(), "300");
    }

    #[test]
    fn the_8b_model_costs_what_its_tensors_add_up_to() {
        let cfg = llama3_8b();
        // By hand, bf16: stream 2·4·4096 + 2·4096; attention 2·(4096 + 2048) + 2·4096; MLP
        // 3·2·14336; scores 32·256·(2·2 + 4); cache 2·32·1024·2.
        let want = 40960 + 20480 + 86016 + 65536 + 131072;
        assert_eq!(
            bytes_per_token(&cfg, DType::BF16, AttentionKind::Blocked),
            want
        );
        assert_eq!(
            bytes_per_token(&cfg, DType::BF16, AttentionKind::Flash),
            want - 65536
        );
    }

    #[test]
    fn auto_is_fixed_on_the_cpu_and_follows_free_memory_on_a_gpu() {
        let per_token = bytes_per_token(&llama3_8b(), DType::BF16, AttentionKind::Flash);
        assert_eq!(auto(None, per_token), CPU_BATCH_TOKENS);
        // An H200 after 16 GB of weights: capped.
        assert_eq!(auto(Some(125 << 30), per_token), MAX_AUTO_BATCH_TOKENS);
        // A 24 GB card after the weights: ~7 GB free, about 20K tokens.
        let small = auto(Some(7 << 30), per_token);
        assert!((18_000..25_000).contains(&small), "{small}");
        // Nearly full: still a batch.
        assert_eq!(auto(Some(1 << 20), per_token), 1024);
    }
}
