//! The command line's inputs as files: local paths as given, `hf://datasets/...` names resolved through
//! the Hugging Face cache (downloaded into it when missing), before anything is opened.

use std::io::IsTerminal;

use anyhow::Result;

use armorm::hub::{self, DatasetUrl};
use armorm::input::InputFile;

/// Every input as the files it names, in order.
pub fn resolve(inputs: &[String], quiet: bool) -> Result<Vec<InputFile>> {
    let mut files = Vec::with_capacity(inputs.len());
    for input in inputs {
        files.extend(resolve_one(input, quiet)?);
    }
    Ok(files)
}

/// One input as its files: a local path is itself; a hub name is every file it names, with a progress
/// bar per download while stderr is a terminal (and not `quiet`).
pub fn resolve_one(input: &str, quiet: bool) -> Result<Vec<InputFile>> {
    if !DatasetUrl::is_hub(input) {
        return Ok(vec![InputFile::local(input)]);
    }
    let url = DatasetUrl::parse(input)?;
    let progress = !quiet && std::io::stderr().is_terminal();
    let dataset = hub::resolve_dataset(&url, progress)?;
    if let (Some(notice), false) = (&dataset.notice, quiet) {
        eprintln!("armorm: {notice}");
    }
    Ok(dataset.input_files())
}
