//! The `raftkv` command line: the subcommand tree and its dispatch.
//!
//! Each subcommand is an argument struct plus a `run` that calls into the library and prints;
//! nothing here measures, stores or decides anything.

mod bench;
mod check_disk;
mod cluster;
mod kv;
mod local;
mod ready;
mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// raftkv: a durable, Raft-replicated key-value store.
#[derive(Debug, Parser)]
#[command(name = "raftkv", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one node.
    Serve(Box<serve::ServeArgs>),
    /// Write a key.
    Put(kv::PutArgs),
    /// Read a key (exit 1 if it does not exist).
    Get(kv::GetArgs),
    /// Delete a key.
    Del(kv::DelArgs),
    /// List keys in order, optionally under a prefix.
    List(kv::ListArgs),
    /// Every member's view of the cluster.
    Status(kv::StatusArgs),
    /// Probe `/ready` on every endpoint (exit 0 all ready, 1 one not ready, 3 one unreachable).
    Ready(ready::ReadyArgs),
    /// Move leadership to another node.
    TransferLeader(kv::TransferArgs),
    /// Run a local cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Load generator against a running cluster; `bench recovery`, `bench failover`.
    Bench(bench::BenchArgs),
    /// Check that this machine is fit to run a node.
    #[command(subcommand)]
    Check(CheckCommand),
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Start a local cluster as child processes (client ports 8001..., peer ports 9001...).
    Up(cluster::UpArgs),
}

#[derive(Debug, Subcommand)]
pub enum CheckCommand {
    /// Measure WAL appends (write + fdatasync per batch) against raw writes on the same disk.
    Disk(check_disk::DiskArgs),
}

/// Exit code of a usage error (as clap's own).
pub const EXIT_USAGE: u8 = 2;

/// A usage error found after argument parsing (a bad value, an unreadable file named by a
/// flag): exits 2 like clap's own.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs the parsed command; a [`UsageError`] is printed and exits 2.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // reqwest's rustls needs a process-wide crypto provider before any client is built.
    raftkv::tls::ensure_provider();
    match dispatch(cli) {
        Err(e) if e.is::<UsageError>() => {
            eprintln!("raftkv: error: {e:#}");
            Ok(ExitCode::from(EXIT_USAGE))
        }
        other => other,
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => serve::run(&args),
        Command::Put(args) => kv::put(&args),
        Command::Get(args) => kv::get(&args),
        Command::Del(args) => kv::del(&args),
        Command::List(args) => kv::list(&args),
        Command::Status(args) => kv::status(&args),
        Command::Ready(args) => ready::run(&args),
        Command::TransferLeader(args) => kv::transfer(&args),
        Command::Cluster(ClusterCommand::Up(args)) => cluster::up(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Check(CheckCommand::Disk(args)) => check_disk::run(&args),
    }
}
