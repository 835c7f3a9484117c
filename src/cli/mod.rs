//! The `raftkv` command line: the subcommand tree and its dispatch.
//!
//! Each subcommand is an argument struct plus a `run` that calls into the library and prints;
//! nothing here measures, stores or decides anything.

mod check_disk;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// raftkv: a durable, Raft-replicated key-value store.
#[derive(Debug, Parser)]
#[command(name = "raftkv", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check that this machine is fit to run a node.
    #[command(subcommand)]
    Check(CheckCommand),
}

#[derive(Debug, Subcommand)]
pub enum CheckCommand {
    /// Measure WAL appends (write + fdatasync per batch) against raw writes on the same disk.
    Disk(check_disk::DiskArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check(CheckCommand::Disk(args)) => check_disk::run(&args),
    }
}
