//! The `raftkv` command line: the subcommand tree and its dispatch.
//!
//! Each subcommand is an argument struct plus a `run` that calls into the library and prints;
//! nothing here measures, stores or decides anything.

mod bench;
mod bench_membership;
mod bench_watch;
mod check_disk;
mod cluster;
mod kv;
mod lease;
mod local;
mod member;
mod ready;
mod serve;
mod snapshot;
mod txn;
mod watch;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// raftkv: a durable, Raft-replicated key-value store.
#[derive(Debug, Parser)]
#[command(name = "raftkv", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as human-readable text or as one JSON object per line (for a log shipper).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "RAFTKV_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// error, warn, info, debug or trace, or a filter such as `info,raftkv::transport=debug`
    /// (default: info for `serve`, warn for other commands; RUST_LOG when this is not given).
    #[arg(
        long,
        global = true,
        env = "RAFTKV_LOG_LEVEL",
        value_name = "LEVEL|FILTER"
    )]
    pub log_level: Option<String>,
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one node.
    Serve(Box<serve::ServeArgs>),
    /// Write a key (only at a revision with --if-revision; attached to a lease with --lease).
    Put(kv::PutArgs),
    /// Read a key (exit 1 if it does not exist).
    Get(kv::GetArgs),
    /// Delete a key (only at a revision with --if-revision), or every key under --prefix.
    Del(kv::DelArgs),
    /// Run a transaction from a JSON file (exit 0 when it succeeded, 1 when the failure
    /// branch ran).
    Txn(txn::TxnArgs),
    /// List keys in order, optionally under a prefix.
    List(kv::ListArgs),
    /// Print changes to a key (or every key under a prefix) as they are committed, until
    /// Ctrl-C.
    Watch(watch::WatchArgs),
    /// Grant, keep alive, revoke, show or list leases (keys that expire with their owner).
    #[command(subcommand)]
    Lease(lease::LeaseCommand),
    /// Every member's view of the cluster.
    Status(kv::StatusArgs),
    /// Probe `/ready` on every endpoint (exit 0 all ready, 1 one not ready, 3 one unreachable).
    Ready(ready::ReadyArgs),
    /// Move leadership to another node.
    TransferLeader(kv::TransferArgs),
    /// List, add, promote or remove members of the running cluster.
    #[command(subcommand)]
    Member(member::MemberCommand),
    /// Run a local cluster.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Load generator against a running cluster; `bench recovery`, `bench failover`.
    Bench(bench::BenchArgs),
    /// Check that this machine is fit to run a node.
    #[command(subcommand)]
    Check(CheckCommand),
    /// Back up the cluster's state to a file, or restore one into a new cluster.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a consistent copy of the cluster's state (taken on the leader at a linearizable
    /// read index) to FILE: streamed to FILE.part, verified, synced, renamed.
    Save(snapshot::SaveArgs),
    /// Build a new member's data dir from a backup, as a member of a new cluster (restore
    /// every member from the same file, then start each with `raftkv serve`).
    Restore(snapshot::RestoreArgs),
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
    // What `cluster up` hands on to its nodes.
    let mut log_args = vec!["--log-format".to_string(), cli.log_format.as_str().into()];
    if let Some(level) = &cli.log_level {
        log_args.extend(["--log-level".to_string(), level.clone()]);
    }
    match cli.command {
        Command::Serve(args) => serve::run(&args),
        Command::Put(args) => kv::put(&args),
        Command::Get(args) => kv::get(&args),
        Command::Del(args) => kv::del(&args),
        Command::Txn(args) => txn::run(&args),
        Command::List(args) => kv::list(&args),
        Command::Watch(args) => watch::run(&args),
        Command::Lease(command) => lease::run(&command),
        Command::Status(args) => kv::status(&args),
        Command::Ready(args) => ready::run(&args),
        Command::TransferLeader(args) => kv::transfer(&args),
        Command::Member(command) => member::run(&command),
        Command::Cluster(ClusterCommand::Up(args)) => cluster::up(&args, log_args),
        Command::Bench(args) => bench::run(&args),
        Command::Check(CheckCommand::Disk(args)) => check_disk::run(&args),
        Command::Snapshot(SnapshotCommand::Save(args)) => snapshot::save(&args),
        Command::Snapshot(SnapshotCommand::Restore(args)) => snapshot::restore(&args),
    }
}
