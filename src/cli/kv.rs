//! The client subcommands: `put`, `get`, `del`, `list`, `status`, `transfer-leader` (and the
//! helpers `snapshot save`, `member` and `txn` share).
//!
//! `put --if-revision N` and `del --if-revision N` write only if the key's `mod_revision` is N
//! (0: only if absent); when it is not, they print the key as it is and exit 1. `put --lease
//! ID` attaches the key to a lease (exit 1, nothing written, if the lease does not exist). `get -w json`
//! prints the key with its revisions. Writes go out under exactly-once sessions, so the
//! client's resends after a timeout or a dropped connection never apply a write twice.
//!
//! `status` shows one row per endpoint, then the configuration as the leader sees it
//! (voters, learners, outgoing voters while a change is joint, each member's match index and
//! whether a change is in flight); `-w json` prints every endpoint's whole status.
//!
//! Exit codes (public interface): 0 success; 1 a missing key (`get`), a failed condition
//! (`--if-revision`, a `txn` whose failure branch ran) or a rejected request;
//! 3 the cluster was unavailable within the retry budget (safe to retry); 4 a write's outcome
//! is unknown (it may or may not have been applied; or a resend learned it applied but not its
//! result, too large for the server to keep). Usage errors exit 2: clap's, and the
//! ones found after parsing (bad endpoints, an unreadable CA or token file) as [`UsageError`].
//!
//! When no endpoint answers at all, the command says so within about 2 s (1 s to connect to
//! each endpoint), not after the whole retry budget.

use anyhow::Context;
use raftkv::api::{ClusterStatus, Consistency};
use raftkv::client::{Client, ClientConfig, ClientError, ConditionFailed, DEFAULT_ENDPOINTS};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use super::UsageError;

/// Exit code: the cluster was unavailable.
pub const EXIT_UNAVAILABLE: u8 = 3;
/// Exit code: a write's outcome is unknown.
pub const EXIT_OUTCOME_UNKNOWN: u8 = 4;

#[derive(Debug, clap::Args)]
pub struct EndpointArgs {
    /// The nodes' client URLs, comma-separated.
    #[arg(long, env = "RAFTKV_ENDPOINTS", default_value = DEFAULT_ENDPOINTS, value_name = "URL,...")]
    pub endpoints: String,
    /// Trust this CA (PEM) for https:// endpoints (default: the system's roots).
    #[arg(long, env = "RAFTKV_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// Send the bearer token in this file (see `serve --auth-token-file`).
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// The bearer token itself (prefer --token-file: a flag shows in `ps`).
    #[arg(long, env = "RAFTKV_TOKEN", hide_env_values = true, hide = true)]
    pub token: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct PutArgs {
    pub key: String,
    pub value: String,
    /// Write only if the key's mod_revision is N (0: only if the key does not exist);
    /// otherwise print the key as it is and exit 1.
    #[arg(long, value_name = "N")]
    pub if_revision: Option<u64>,
    /// Attach the key to lease ID (see `raftkv lease grant`): it is deleted when the lease
    /// expires or is revoked. With --if-revision, both apply to the one write.
    #[arg(long, value_name = "ID")]
    pub lease: Option<u64>,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    pub key: String,
    /// linearizable (default), lease or stale.
    #[arg(long, default_value = "linearizable", value_parser = parse_consistency)]
    pub consistency: Consistency,
    /// simple: the value alone; json: the key, value and revisions.
    #[arg(short = 'w', long = "write-out", value_enum, default_value = "simple")]
    pub format: ValueFormat,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, clap::Args)]
pub struct DelArgs {
    /// The key to delete (or --prefix).
    #[arg(required_unless_present = "prefix")]
    pub key: Option<String>,
    /// Delete every key starting with P (not empty), atomically, and print how many.
    #[arg(long, value_name = "P", conflicts_with_all = ["key", "if_revision"],
          value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub prefix: Option<String>,
    /// Delete only if the key's mod_revision is N; otherwise print the key as it is and
    /// exit 1.
    #[arg(long, value_name = "N")]
    pub if_revision: Option<u64>,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

/// How `get` and `txn` print their answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ValueFormat {
    Simple,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only keys starting with this prefix.
    #[arg(default_value = "")]
    pub prefix: String,
    /// The most keys printed; pages are followed until then.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub limit: u64,
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

/// The client the flags describe; anything wrong with them is a usage error (exit 2).
pub(super) fn client(args: &EndpointArgs) -> anyhow::Result<Client> {
    let config = client_config(args)?;
    Client::new(config).map_err(|e| UsageError(e.to_string()).into())
}

/// The client settings the flags describe, default timeouts; anything wrong with them is a
/// usage error (exit 2).
pub fn client_config(args: &EndpointArgs) -> anyhow::Result<ClientConfig> {
    let usage = |e: String| anyhow::Error::new(UsageError(e));
    let endpoints =
        ClientConfig::parse_endpoints(&args.endpoints).map_err(|e| usage(e.to_string()))?;
    let mut config = ClientConfig::new(endpoints);
    config.ca_file = args.cacert.clone();
    config.token = match (&args.token_file, &args.token) {
        (Some(path), _) => Some(
            raftkv::api::auth::AuthToken::from_file(path)
                .map_err(|e| usage(e.to_string()))?
                .expose()
                .to_string(),
        ),
        (None, Some(t)) => Some(t.trim().to_string()),
        (None, None) => None,
    };
    Ok(config)
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Prints a client error and picks the exit code.
pub(super) fn failure(e: ClientError) -> ExitCode {
    eprintln!("raftkv: {e}");
    match e {
        ClientError::Unavailable(_) => ExitCode::from(EXIT_UNAVAILABLE),
        // A resent write that applied with a result too large to keep: whether its condition
        // held (or which branch ran) is as unknown as the outcome of an unanswered write.
        ClientError::OutcomeUnknown(_) | ClientError::ResultNotKept { .. } => {
            ExitCode::from(EXIT_OUTCOME_UNKNOWN)
        }
        _ => ExitCode::FAILURE,
    }
}

pub fn put(args: &PutArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    let rt = runtime()?;
    let written = match (args.if_revision, args.lease) {
        (Some(rev), Some(lease)) => {
            rt.block_on(c.put_if_with_lease(&args.key, &args.value, rev, lease))
        }
        (Some(rev), None) => rt.block_on(c.put_if(&args.key, &args.value, rev)),
        (None, Some(lease)) => rt
            .block_on(c.put_with_lease(&args.key, &args.value, lease))
            .map(Ok),
        (None, None) => rt.block_on(c.put(&args.key, &args.value)).map(Ok),
    };
    match written {
        Ok(Ok(r)) => {
            println!("OK (index {})", r.index);
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(failed)) => Ok(condition_failed(&args.key, &failed)),
        Err(e) => Ok(failure(e)),
    }
}

/// Prints a failed `--if-revision` condition with the key as it is now; exit 1.
pub(super) fn condition_failed(key: &str, failed: &ConditionFailed) -> ExitCode {
    match &failed.current {
        Some(kv) => eprintln!(
            "raftkv: condition failed (revision {}): {key} is at mod_revision {}, version {}, \
             value {:?}",
            failed.revision, kv.mod_revision, kv.version, kv.value
        ),
        None => eprintln!(
            "raftkv: condition failed (revision {}): {key} does not exist",
            failed.revision
        ),
    }
    ExitCode::FAILURE
}

pub fn get(args: &GetArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    match runtime()?.block_on(c.get(&args.key, args.consistency)) {
        Ok(Some(r)) => {
            match args.format {
                ValueFormat::Simple => println!("{}", r.value),
                ValueFormat::Json => println!("{}", serde_json::to_string(&r)?),
            }
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
    let rt = runtime()?;
    if let Some(prefix) = &args.prefix {
        return match rt.block_on(c.delete_prefix(prefix)) {
            Ok(r) => {
                println!("deleted {} (revision {})", r.deleted, r.revision);
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Ok(failure(e)),
        };
    }
    let key = args
        .key
        .as_deref()
        .context("a key or --prefix is required")?;
    let deleted = match args.if_revision {
        None => rt.block_on(c.delete(key)).map(Ok),
        Some(rev) => rt.block_on(c.delete_if(key, rev)),
    };
    match deleted {
        Ok(Ok(r)) => {
            println!(
                "{} (index {})",
                if r.deleted { "deleted" } else { "not found" },
                r.index
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(Err(failed)) => Ok(condition_failed(key, &failed)),
        Err(e) => Ok(failure(e)),
    }
}

pub fn list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
    match runtime()?.block_on(c.list(&args.prefix, limit, args.consistency)) {
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
    let rt = runtime()?;
    let all = rt.block_on(c.status_all());
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
        OutputFormat::Table => {
            out.write_all(render_table(&all).as_bytes())?;
            if let Some(view) = rt.block_on(membership_view(&c, &all)) {
                writeln!(out)?;
                out.write_all(render_membership(&view).as_bytes())?;
            }
        }
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

/// The status whose view of the configuration the table shows: the leader's (which alone
/// knows each member's match index), asked directly when no endpoint leads but one names
/// the leader's client URL; failing that, the most recent configuration any endpoint has.
async fn membership_view(
    c: &Client,
    all: &[(String, Result<ClusterStatus, ClientError>)],
) -> Option<ClusterStatus> {
    let answered = || all.iter().filter_map(|(_, s)| s.as_ref().ok());
    // Two nodes may both think they lead for a moment: the higher term is the real one.
    if let Some(leader) = answered()
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term)
    {
        return Some(leader.clone());
    }
    let leader_url = answered().find_map(|s| s.leader.as_ref()?.client_url.clone());
    if let Some(url) = leader_url {
        if let Ok(s) = c.status_of(&url).await {
            if s.role == "leader" {
                return Some(s);
            }
        }
    }
    answered().max_by_key(|s| s.membership.index).cloned()
}

/// The configuration section of `status`: voters, learners, then the members table.
pub fn render_membership(view: &ClusterStatus) -> String {
    let m = &view.membership;
    let who = if view.role == "leader" {
        format!("node {}, the leader,", view.id)
    } else {
        format!("node {}", view.id)
    };
    let mut s = format!("membership (as {who} sees it):\n");
    s.push_str(&format!("voters: {}\n", super::member::ids(&m.voters)));
    if !m.voters_outgoing.is_empty() {
        s.push_str(&format!(
            "outgoing voters: {}\n",
            super::member::ids(&m.voters_outgoing)
        ));
    }
    s.push_str(&format!(
        "learners: {}\n\n",
        super::member::ids(&m.learners)
    ));
    s.push_str(&super::member::render_members(
        &view.members,
        m,
        view.leader.as_ref(),
        view.id,
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        let mut argv = vec!["raftkv"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|c| c.command)
    }

    #[test]
    fn the_conditional_and_prefix_flags_use_the_public_names() {
        let Command::Put(p) = parse(&["put", "k", "v", "--if-revision", "7"]).unwrap() else {
            panic!()
        };
        assert_eq!((p.key.as_str(), p.if_revision), ("k", Some(7)));
        let Command::Del(d) = parse(&["del", "k", "--if-revision", "0"]).unwrap() else {
            panic!()
        };
        assert_eq!(
            (d.key.as_deref(), d.if_revision, d.prefix),
            (Some("k"), Some(0), None)
        );
        let Command::Del(d) = parse(&["del", "--prefix", "user/"]).unwrap() else {
            panic!()
        };
        assert_eq!((d.key, d.prefix.as_deref()), (None, Some("user/")));
        let Command::Get(g) = parse(&["get", "k", "-w", "json"]).unwrap() else {
            panic!()
        };
        assert_eq!(g.format, ValueFormat::Json);
        let Command::Get(g) = parse(&["get", "k"]).unwrap() else {
            panic!()
        };
        assert_eq!(g.format, ValueFormat::Simple);
        let Command::Txn(t) = parse(&["txn", "--file", "-"]).unwrap() else {
            panic!()
        };
        assert_eq!(t.file, std::path::PathBuf::from("-"));
        for bad in [
            &["del"][..],
            &["del", "k", "--prefix", "p"],
            &["del", "--prefix", ""],
            &["del", "--prefix", "p", "--if-revision", "3"],
            &["put", "k", "v", "--if-revision", "-1"],
            &["get", "k", "-w", "yaml"],
            &["txn"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
