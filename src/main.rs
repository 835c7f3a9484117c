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
    if let Err(e) = init_logging(&args) {
        eprintln!("raftkv: error: {e}");
        return ExitCode::from(cli::EXIT_USAGE);
    }
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("raftkv: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr in the chosen format, filtered by `--log-level`, else `RUST_LOG`, else the
/// command's default (a node logs its life at info; one-shot commands only warn).
fn init_logging(args: &cli::Cli) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let default_level = match args.command {
        cli::Command::Serve(_) => "info",
        _ => "warn",
    };
    let filter = match &args.log_level {
        Some(level) => EnvFilter::try_new(level)
            .map_err(|e| format!("--log-level {level:?} is not a level or filter: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match args.log_format {
        cli::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One object per line with the event's fields at the top level: `jq 'select(.term)'`.
        cli::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    Ok(())
}
