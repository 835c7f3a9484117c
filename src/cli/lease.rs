//! `raftkv lease grant|keepalive|revoke|get|list`: leases from the command line.
//!
//! A lease is a TTL the leader counts down; keys written with `raftkv put KEY VALUE --lease
//! ID` are deleted when it expires or is revoked. `grant TTL` prints the new id;
//! `keepalive ID` renews it (every TTL/3, see the client's lease keeper) until Ctrl-C,
//! printing the time left after each renewal; stopping it does not revoke the lease, which
//! then expires after its TTL. `-w json` prints the server's answers (for `keepalive`, one
//! JSON line per renewal).
//!
//! Exit codes are the client commands' (see `kv.rs`): 0 done (`keepalive`: stopped with
//! Ctrl-C); 1 the lease does not exist (or was lost while kept alive) or the request was
//! refused (a TTL out of range, too many leases); 3 unavailable; 4 a grant's or revoke's
//! outcome is unknown; 2 usage.

use super::kv::{client, failure, runtime, EndpointArgs, ValueFormat};
use raftkv::api::{LeaseListResponse, LeaseResponse};
use raftkv::client::KeeperStatus;
use std::io::Write;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum LeaseCommand {
    /// Grant a lease of TTL seconds and print its id.
    Grant(GrantArgs),
    /// Keep a lease alive until Ctrl-C, printing the time left after each renewal (exit 1 if
    /// the lease is lost).
    Keepalive(IdArgs),
    /// Revoke a lease now: its keys are deleted with it.
    Revoke(IdArgs),
    /// Show a lease: its TTL, the time left and its keys.
    Get(IdArgs),
    /// List every lease.
    List(ListArgs),
}

#[derive(Debug, clap::Args)]
pub struct GrantArgs {
    /// The time to live, in seconds, renewed by each keepalive.
    #[arg(value_parser = clap::value_parser!(u64).range(1..))]
    pub ttl: u64,
    /// simple: a sentence; json: the server's answer.
    #[arg(short = 'w', long = "write-out", value_enum, default_value = "simple")]
    pub format: ValueFormat,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, clap::Args)]
pub struct IdArgs {
    /// The lease's id (as `lease grant` printed it).
    pub id: u64,
    /// simple: a sentence; json: the server's answer.
    #[arg(short = 'w', long = "write-out", value_enum, default_value = "simple")]
    pub format: ValueFormat,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// simple: a table; json: the server's answer.
    #[arg(short = 'w', long = "write-out", value_enum, default_value = "simple")]
    pub format: ValueFormat,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

pub fn run(command: &LeaseCommand) -> anyhow::Result<ExitCode> {
    match command {
        LeaseCommand::Grant(args) => grant(args),
        LeaseCommand::Keepalive(args) => keepalive(args),
        LeaseCommand::Revoke(args) => revoke(args),
        LeaseCommand::Get(args) => get(args),
        LeaseCommand::List(args) => list(args),
    }
}

fn grant(args: &GrantArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    match runtime()?.block_on(c.lease_grant(args.ttl)) {
        Ok(r) => {
            match args.format {
                ValueFormat::Json => println!("{}", serde_json::to_string(&r)?),
                ValueFormat::Simple => println!("lease {} granted with TTL {}s", r.id, r.ttl_s),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(failure(e)),
    }
}

fn revoke(args: &IdArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    match runtime()?.block_on(c.lease_revoke(args.id)) {
        Ok(r) => {
            match args.format {
                ValueFormat::Json => println!("{}", serde_json::to_string(&r)?),
                ValueFormat::Simple => println!(
                    "lease {} revoked, {} keys deleted (revision {})",
                    r.id, r.deleted, r.revision
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(failure(e)),
    }
}

fn get(args: &IdArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    match runtime()?.block_on(c.lease_get(args.id)) {
        Ok(r) => {
            match args.format {
                ValueFormat::Json => println!("{}", serde_json::to_string(&r)?),
                ValueFormat::Simple => print!("{}", render_lease(&r)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(failure(e)),
    }
}

fn list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    match runtime()?.block_on(c.lease_list()) {
        Ok(r) => {
            match args.format {
                ValueFormat::Json => println!("{}", serde_json::to_string(&r)?),
                ValueFormat::Simple => print!("{}", render_list(&r)),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => Ok(failure(e)),
    }
}

fn keepalive(args: &IdArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    runtime()?.block_on(async {
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut keeper = tokio::select! {
            kept = c.keep_alive(args.id) => match kept {
                Ok(keeper) => keeper,
                Err(e) => return Ok(failure(e)),
            },
            _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
        };
        let mut status = Some(keeper.status());
        loop {
            match status {
                Some(KeeperStatus::Lost(why)) => {
                    eprintln!("raftkv: lease {} lost: {why}", args.id);
                    return Ok(ExitCode::FAILURE);
                }
                Some(s) => {
                    if let Some(line) = render_keeper(args.id, &s, args.format)? {
                        let mut out = std::io::stdout().lock();
                        // A closed stdout (`| head`) stops the keeper quietly.
                        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                            return Ok(ExitCode::SUCCESS);
                        }
                    }
                }
                None => {
                    eprintln!("raftkv: lease {}: the keeper stopped", args.id);
                    return Ok(ExitCode::FAILURE);
                }
            }
            status = tokio::select! {
                s = keeper.changed() => s,
                _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
            };
        }
    })
}

/// The stdout line for a keeper's status (`None`: nothing on stdout; a failing renewal is
/// reported on stderr).
pub fn render_keeper(
    id: u64,
    status: &KeeperStatus,
    format: ValueFormat,
) -> serde_json::Result<Option<String>> {
    match status {
        KeeperStatus::Alive {
            ttl_s,
            remaining_ms,
            ..
        } => Ok(Some(match format {
            ValueFormat::Json => serde_json::to_string(&serde_json::json!({
                "id": id, "ttl_s": ttl_s, "remaining_ms": remaining_ms
            }))?,
            ValueFormat::Simple => format!(
                "lease {id} kept alive, TTL {}s remaining",
                remaining_ms.div_ceil(1000)
            ),
        })),
        KeeperStatus::Failing { error, .. } => {
            eprintln!("raftkv: lease {id}: keepalive failed, retrying: {error}");
            Ok(None)
        }
        KeeperStatus::Lost(_) => Ok(None),
    }
}

/// `lease get`: a summary line, then the keys, one a line.
pub fn render_lease(r: &LeaseResponse) -> String {
    let mut s = format!(
        "lease {}: TTL {}s, {}s remaining, {} keys\n",
        r.id, r.ttl_s, r.remaining_s, r.keys_count
    );
    for key in &r.keys {
        s.push_str(key);
        s.push('\n');
    }
    if r.keys_more {
        let more = r.keys_count.saturating_sub(r.keys.len() as u64);
        s.push_str(&format!("... and {more} more\n"));
    }
    s
}

/// `lease list`: a table, one row per lease.
pub fn render_list(r: &LeaseListResponse) -> String {
    let mut s = format!(
        "{:>20} {:>8} {:>8} {:>10}\n",
        "ID", "TTL", "KEYS", "REMAINING"
    );
    for l in &r.leases {
        let remaining = l
            .remaining_ms
            .map_or("-".to_string(), |ms| format!("{}s", ms.div_ceil(1000)));
        s.push_str(&format!(
            "{:>20} {:>8} {:>8} {:>10}\n",
            l.id,
            format!("{}s", l.ttl_s),
            l.keys_count,
            remaining
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::{Cli, Command};
    use super::*;
    use clap::Parser;
    use raftkv::api::LeaseSummary;
    use raftkv::client::LeaseLost;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        let mut argv = vec!["raftkv"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|c| c.command)
    }

    fn lease(args: &[&str]) -> LeaseCommand {
        let mut argv = vec!["lease"];
        argv.extend_from_slice(args);
        match parse(&argv).unwrap() {
            Command::Lease(l) => l,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_lease_commands_use_the_public_names() {
        let LeaseCommand::Grant(g) = lease(&["grant", "10"]) else {
            panic!()
        };
        assert_eq!((g.ttl, g.format), (10, ValueFormat::Simple));
        let LeaseCommand::Keepalive(k) = lease(&["keepalive", "7", "-w", "json"]) else {
            panic!()
        };
        assert_eq!((k.id, k.format), (7, ValueFormat::Json));
        assert!(matches!(lease(&["revoke", "7"]), LeaseCommand::Revoke(r) if r.id == 7));
        assert!(matches!(lease(&["get", "7"]), LeaseCommand::Get(r) if r.id == 7));
        assert!(matches!(lease(&["list"]), LeaseCommand::List(_)));
        let Command::Put(p) = parse(&["put", "svc/a", "10.0.0.1", "--lease", "7"]).unwrap() else {
            panic!()
        };
        assert_eq!((p.lease, p.if_revision), (Some(7), None));
        let Command::Put(p) =
            parse(&["put", "k", "v", "--lease", "7", "--if-revision", "3"]).unwrap()
        else {
            panic!()
        };
        assert_eq!((p.lease, p.if_revision), (Some(7), Some(3)));
        for bad in [
            &["lease", "grant"][..],
            &["lease", "grant", "0"],
            &["lease", "grant", "-5"],
            &["lease", "keepalive"],
            &["lease", "revoke", "x"],
            &["lease", "renew", "7"],
            &["put", "k", "v", "--lease"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn leases_and_renewals_print_as_lines() {
        let alive = KeeperStatus::Alive {
            renewals: 3,
            ttl_s: 10,
            remaining_ms: 9_001,
        };
        assert_eq!(
            render_keeper(7, &alive, ValueFormat::Simple).unwrap(),
            Some("lease 7 kept alive, TTL 10s remaining".into())
        );
        assert_eq!(
            render_keeper(7, &alive, ValueFormat::Json).unwrap(),
            Some(r#"{"id":7,"remaining_ms":9001,"ttl_s":10}"#.into())
        );
        let lost = KeeperStatus::Lost(LeaseLost::NotFound);
        assert_eq!(render_keeper(7, &lost, ValueFormat::Simple).unwrap(), None);
        let r = LeaseResponse {
            id: 7,
            ttl_s: 10,
            remaining_s: 8,
            remaining_ms: 7_500,
            keys: vec!["svc/a".into(), "svc/b".into()],
            keys_count: 5,
            keys_more: true,
            leader: 1,
        };
        assert_eq!(
            render_lease(&r),
            "lease 7: TTL 10s, 8s remaining, 5 keys\nsvc/a\nsvc/b\n... and 3 more\n"
        );
        let list = LeaseListResponse {
            leases: vec![
                LeaseSummary {
                    id: 7,
                    ttl_s: 10,
                    keys_count: 2,
                    remaining_ms: Some(7_500),
                },
                LeaseSummary {
                    id: 12,
                    ttl_s: 60,
                    keys_count: 0,
                    remaining_ms: None,
                },
            ],
            revision: 20,
            leader: 1,
        };
        let table = render_list(&list);
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec!["ID", "TTL", "KEYS", "REMAINING"],
                vec!["7", "10s", "2", "8s"],
                vec!["12", "60s", "0", "-"],
            ]
        );
    }
}
