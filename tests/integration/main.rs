//! armorm's integration tests: one binary (one link of polars and candle), driving the real `armorm`
//! against the committed fixtures and their transformers goldens.

mod commands;
mod common;
mod errors;
mod formats;
mod fuzz;
mod parity;
mod profile;
mod resume;
mod shards;
mod tokens;
