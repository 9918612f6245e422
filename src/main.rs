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
        Err(e) => {
            eprintln!("armorm: error: {e:#}");
            // SIGINT / SIGTERM stopped the run: 130 / 143, as if the signal had ended it.
            match armorm::signal::received() {
                Some(signal) => ExitCode::from(signal.exit_code()),
                None => ExitCode::from(1),
            }
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
