//! The `armorm` command: parses arguments, runs a subcommand, maps errors to exit codes.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`armorm score ... -o - | head`) is the reader's choice, not a failure.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        // The output is complete, but some rows have no scores (`--on-error skip`).
        Err(e) if e.downcast_ref::<cli::score::RowsSkipped>().is_some() => {
            eprintln!("armorm: {e}");
            ExitCode::from(3)
        }
        // `armorm verify`: the file's outputs are not what the model gives now.
        Err(e) if e.downcast_ref::<cli::verify::Mismatch>().is_some() => {
            eprintln!("armorm: {e}");
            ExitCode::from(4)
        }
        Err(e) => {
            eprintln!("armorm: error: {}", one_line(&e));
            // SIGINT / SIGTERM stopped the run: 130 / 143, as if the signal had ended it.
            match armorm::signal::received() {
                Some(signal) => ExitCode::from(signal.exit_code()),
                None => ExitCode::from(1),
            }
        }
    }
}

/// The error and its causes on one line, each stated once: many errors already spell out their source
/// in their own text (`#[error("{path}: {0}")]`), which anyhow's `{:#}` would print again.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if text.contains(&line) {
            line = text;
            continue;
        }
        line.push_str(": ");
        line.push_str(&text);
    }
    line
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
