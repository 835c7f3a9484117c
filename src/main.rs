//! The `raftkv` binary: one command line for operators, one subcommand per job.
//!
//! `main` only parses arguments, sets up logging and dispatches; each subcommand lives in its
//! own module under `cli/` (argument struct + printing), with the work itself in the library.
//! Later subcommands (`serve`, `put`, `get`, `del`, `list`, `status`, `transfer-leader`,
//! `cluster up`, `bench`) slot into [`cli::Command`] the same way.

mod cli;

use clap::Parser;

/// mimalloc instead of glibc's malloc: the request path allocates small buffers on several
/// threads, and glibc's arenas showed up as ~10 % of a node's CPU under load (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // A node logs its life at info; one-shot commands only warn.
    let default_level = match args.command {
        cli::Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
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
