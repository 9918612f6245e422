//! armorm's integration tests: one binary (one link of polars and candle), driving the real `armorm`
//! against the committed fixtures and their transformers goldens.

mod attention;
mod commands;
mod common;
mod errors;
mod formats;
mod fuzz;
mod hub;
mod in_process;
mod input_checks;
mod memory;
mod mining;
mod model_config;
mod non_finite;
mod output_safety;
mod parity;
mod profile;
mod rescore;
mod resume;
mod shards;
mod sharing;
mod tokens;
mod verify;
