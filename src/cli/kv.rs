//! The client subcommands: `put`, `get`, `del`, `list`, `status`, `transfer-leader`.
//!
//! Exit codes (public interface): 0 success; 1 a missing key (`get`) or a rejected request;
//! 3 the cluster was unavailable within the retry budget (safe to retry); 4 a write's outcome
//! is unknown (it may or may not have been applied). Usage errors exit 2 (clap).

use anyhow::Context;
use raftkv::api::{ClusterStatus, Consistency};
use raftkv::client::{Client, ClientConfig, ClientError, DEFAULT_ENDPOINTS};
use std::io::Write;
use std::process::ExitCode;

/// Exit code: the cluster was unavailable.
pub const EXIT_UNAVAILABLE: u8 = 3;
/// Exit code: a write's outcome is unknown.
pub const EXIT_OUTCOME_UNKNOWN: u8 = 4;

#[derive(Debug, clap::Args)]
pub struct EndpointArgs {
    /// The nodes' client URLs, comma-separated.
    #[arg(long, env = "RAFTKV_ENDPOINTS", default_value = DEFAULT_ENDPOINTS, value_name = "URL,...")]
    pub endpoints: String,
}

#[derive(Debug, clap::Args)]
pub struct PutArgs {
    pub key: String,
    pub value: String,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    pub key: String,
    /// linearizable (default), lease or stale.
    #[arg(long, default_value = "linearizable", value_parser = parse_consistency)]
    pub consistency: Consistency,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, clap::Args)]
pub struct DelArgs {
    pub key: String,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only keys starting with this prefix.
    #[arg(default_value = "")]
    pub prefix: String,
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    #[arg(long, default_value = "linearizable", value_parser = parse_consistency)]
    pub consistency: Consistency,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Output format.
    #[arg(short = 'w', long = "write-out", value_enum, default_value = "table")]
    pub format: OutputFormat,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, clap::Args)]
pub struct TransferArgs {
    /// The node that should lead.
    pub id: u64,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

fn parse_consistency(s: &str) -> Result<Consistency, String> {
    Consistency::parse(s)
        .ok_or_else(|| format!("unknown consistency {s:?}: use linearizable, lease or stale"))
}

fn client(args: &EndpointArgs) -> anyhow::Result<Client> {
    let endpoints = ClientConfig::parse_endpoints(&args.endpoints)?;
    Ok(Client::new(ClientConfig::new(endpoints))?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Prints a client error and picks the exit code.
fn failure(e: ClientError) -> ExitCode {
    eprintln!("raftkv: {e}");
    match e {
        ClientError::Unavailable(_) => ExitCode::from(EXIT_UNAVAILABLE),
        ClientError::OutcomeUnknown(_) => ExitCode::from(EXIT_OUTCOME_UNKNOWN),
        _ => ExitCode::FAILURE,
    }
}

pub fn put(args: &PutArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    match runtime()?.block_on(c.put(&args.key, &args.value)) {
        Ok(r) => {
            println!("OK (index {})", r.index);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(failure(e)),
    }
}

pub fn get(args: &GetArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    match runtime()?.block_on(c.get(&args.key, args.consistency)) {
        Ok(Some(r)) => {
            println!("{}", r.value);
            Ok(ExitCode::SUCCESS)
        }
        Ok(None) => {
            eprintln!("raftkv: key not found: {}", args.key);
            Ok(ExitCode::FAILURE)
        }
        Err(e) => Ok(failure(e)),
    }
}

pub fn del(args: &DelArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    match runtime()?.block_on(c.delete(&args.key)) {
        Ok(r) => {
            println!(
                "{} (index {})",
                if r.deleted { "deleted" } else { "not found" },
                r.index
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(failure(e)),
    }
}

pub fn list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    match runtime()?.block_on(c.list(&args.prefix, args.limit, args.consistency)) {
        Ok(r) => {
            let mut out = std::io::stdout().lock();
            for kv in r.items {
                writeln!(out, "{}\t{}", kv.key, kv.value)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(failure(e)),
    }
}

pub fn transfer(args: &TransferArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    match runtime()?.block_on(c.transfer_leader(args.id)) {
        Ok(()) => {
            println!("leadership transfer to node {} started", args.id);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(failure(e)),
    }
}

pub fn status(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    let all = runtime()?.block_on(c.status_all());
    let mut out = std::io::stdout().lock();
    match args.format {
        OutputFormat::Json => {
            let rows: Vec<serde_json::Value> = all
                .iter()
                .map(|(endpoint, s)| match s {
                    Ok(s) => serde_json::json!({ "endpoint": endpoint, "status": s }),
                    Err(e) => serde_json::json!({ "endpoint": endpoint, "error": e.to_string() }),
                })
                .collect();
            serde_json::to_writer_pretty(&mut out, &rows)?;
            writeln!(out)?;
        }
        OutputFormat::Table => out.write_all(render_table(&all).as_bytes())?,
    }
    let reachable = all.iter().filter(|(_, s)| s.is_ok()).count();
    Ok(if reachable == 0 {
        ExitCode::from(EXIT_UNAVAILABLE)
    } else {
        ExitCode::SUCCESS
    })
}

/// The members table: one row per endpoint.
pub fn render_table(all: &[(String, Result<ClusterStatus, ClientError>)]) -> String {
    let mut s = format!(
        "{:<26} {:>4} {:<13} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10}\n",
        "ENDPOINT", "ID", "ROLE", "TERM", "LEADER", "LAST", "COMMIT", "APPLIED", "SNAPSHOT"
    );
    for (endpoint, st) in all {
        match st {
            Ok(st) => s.push_str(&format!(
                "{:<26} {:>4} {:<13} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10}\n",
                endpoint,
                st.id,
                st.role,
                st.term,
                st.leader
                    .as_ref()
                    .map_or("-".to_string(), |l| l.id.to_string()),
                st.last_index,
                st.commit_index,
                st.applied_index,
                st.snapshot_index
            )),
            Err(e) => s.push_str(&format!("{endpoint:<26} unreachable: {e}\n")),
        }
    }
    s
}
