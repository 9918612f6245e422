//! armorm: batch scoring with the ArmoRM multi-objective reward model on candle.
//!
//! The layers, from the tensors up:
//! - Model: `model` (`llama` backbone over a flat batch, `head` gating and regression, `config`,
//!   `rope`, `attention` over `layout`'s padded grids or `varlen`'s flat rows), built from a
//!   checkpoint by `loader`; `budget` (the default token budget per forward pass).
//! - Engine: `chat` (template) and `encoder` (conversation -> token ids + gate position), `batch`
//!   (length-bucketed batches under a token budget), `sharing` (rows of a window that share a
//!   prompt: the prefix run once, its keys and values cached), `scorer` (runs a window of encoded rows
//!   in batches on the model: lanes, prefix sharing, out-of-memory split), `pipeline` (read, encode
//!   under --max-length in its `EncodeStage`, score and write windows on threads), with `shard` and
//!   `signal` (stop at a window boundary).
//! - Input/output: `format` (a path's format), `input` (JSONL and Parquet readers, rows held in
//!   memory, rows to conversations), `hub` (the Hugging Face cache, shared with `loader`, and
//!   `hf://datasets/...` names resolved to files in it), `output` (score columns, sinks: file,
//!   stdout, memory),
//!   `checkpoint` (resumable part files), `parquet_out` (Parquet with classic Arrow types), `table`
//!   (whole scored tables for the commands after scoring), `provenance` (what a scored file records
//!   about its model, template and rows).
//! - Commands: the binary's `src/cli/` (one file per subcommand), over `pairwise` (eval), `explain`,
//!   `select` (filter, best-of-n), `mining` (best-of-n's pairs with per-objective margins and
//!   filters), `rescore` (new scores from stored outputs), the last two on `lists` (polars
//!   expressions over the per-objective list columns), and `verify` (sampling and comparing re-scored
//!   rows).
//!
//! To add an input format: `format.rs` (its extensions), a reader in `input/` and its arm in
//! `input::open`; `table::read` if the commands after scoring should read it too. To add an output
//! column: `output.rs` (`SCORE_COLUMNS` and `with_scores`), from a row's outputs (`model::RowScore`,
//! beside the head). To add a command: a file in `src/cli/`
//! and its variant in `cli/mod.rs`'s `Command`; one that scores builds a `Job` (`cli/score.rs`) and
//! calls `score_files`, or `score_rows` for conversations it built (scored in memory, as eval does).

// Links MKL's static libraries into whatever uses the library, as candle's examples do.
#[cfg(feature = "mkl")]
extern crate intel_mkl_src;

pub mod batch;
pub mod budget;
pub mod chat;
pub mod checkpoint;
pub mod encoder;
pub mod explain;
pub mod format;
pub mod hub;
pub mod input;
pub mod lists;
pub mod loader;
pub mod mining;
pub mod model;
pub mod output;
pub mod pairwise;
pub mod parquet_out;
pub mod pipeline;
pub mod provenance;
pub mod rescore;
pub mod scorer;
pub mod select;
pub mod shard;
pub mod sharing;
pub mod signal;
pub mod table;
pub mod verify;

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
