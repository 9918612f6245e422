//! armorm: batch scoring with the ArmoRM multi-objective reward model on candle.
//!
//! The library holds the model (pure tensor math), the chat template and tokenizer step, batching,
//! and the dataset readers and writers; the `armorm` binary wires them into subcommands.

// Links MKL's static libraries into whatever uses the library, as candle's examples do.
#[cfg(feature = "mkl")]
extern crate intel_mkl_src;

pub mod batch;
pub mod chat;
pub mod checkpoint;
pub mod encoder;
pub mod explain;
pub mod format;
pub mod input;
pub mod loader;
pub mod model;
pub mod output;
pub mod pairwise;
pub mod parquet_out;
pub mod pipeline;
pub mod scorer;
pub mod select;
pub mod shard;
pub mod signal;
pub mod table;

/// ArmoRM's 19 objectives, in the order of the regression layer's rows.
pub const ATTRIBUTES: [&str; 19] = [
    "helpsteer-helpfulness",
    "helpsteer-correctness",
    "helpsteer-coherence",
    "helpsteer-complexity",
    "helpsteer-verbosity",
    "ultrafeedback-overall_score",
    "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness",
    "ultrafeedback-honesty",
    "ultrafeedback-helpfulness",
    "beavertails-is_safe",
    "prometheus-score",
    "argilla-overall_quality",
    "argilla-judge_lm",
    "code-complexity",
    "code-style",
    "code-explanation",
    "code-instruction-following",
    "code-readability",
];

/// Names for `n` objectives: ArmoRM's own when there are 19, else `objective_0..`.
pub fn attribute_names(n: usize) -> Vec<String> {
    if n == ATTRIBUTES.len() {
        ATTRIBUTES.iter().map(|s| s.to_string()).collect()
    } else {
        (0..n).map(|i| format!("objective_{i}")).collect()
    }
}
