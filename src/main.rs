//! The `raftkv` binary: one command line for operators, one subcommand per job.
//!
//! `main` only parses arguments, sets up logging and dispatches; each subcommand lives in its
//! own module under `cli/` (argument struct + printing), with the work itself in the library.
//! Later subcommands (`serve`, `put`, `get`, `del`, `list`, `status`, `transfer-leader`,
//! `cluster up`, `bench`) slot into [`cli::Command`] the same way.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("raftkv: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
