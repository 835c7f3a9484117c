//! `raftkv member list|add|promote|remove`: the cluster's configuration from the command line.
//!
//! A thin layer over the client's membership calls ([`raftkv::client::Client::add_member`]
//! and its siblings), which go to the leader like writes. Exit codes are the client
//! commands' (see `kv.rs`): 0 done; 1 refused (400 bad input, 404 unknown member, 409 a guard:
//! the server's message on stderr); 3 unavailable (nothing changed, safe to retry); 4 the
//! outcome is unknown (the change may still complete: look with `member list`); 2 usage,
//! including an address that is not `host:port` or a URL that is not http(s), caught here
//! before anything is sent.

use super::kv::{client, failure, runtime, EndpointArgs, OutputFormat};
use super::UsageError;
use raftkv::api::{ClusterStatus, LeaderInfo, MemberStatus, MembershipStatus};
use raftkv::storage::NodeId;
use std::io::Write;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum MemberCommand {
    /// List the members: role, addresses, and on the leader each one's match index.
    List(ListArgs),
    /// Add a member (a voter; with --learner a learner, to promote once caught up). Start the
    /// new node afterwards with `raftkv serve --join`.
    Add(AddArgs),
    /// Make a caught-up learner a voter.
    Promote(ChangeArgs),
    /// Remove a member (a voter or a learner; the leader too, which then steps down).
    Remove(ChangeArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Output format.
    #[arg(short = 'w', long = "write-out", value_enum, default_value = "table")]
    pub format: OutputFormat,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// The new member's node id (positive, unused).
    #[arg(value_parser = clap::value_parser!(u64).range(1..))]
    pub id: NodeId,
    /// The new member's peer address, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub peer_addr: String,
    /// The new member's client URL, http(s)://HOST:PORT.
    #[arg(long, value_name = "URL")]
    pub client_url: String,
    /// Add a learner (receives the log, never votes) instead of a voter.
    #[arg(long)]
    pub learner: bool,
    /// Skip the reachable-quorum guard (never the other guards).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

#[derive(Debug, clap::Args)]
pub struct ChangeArgs {
    /// The member's node id.
    #[arg(value_parser = clap::value_parser!(u64).range(1..))]
    pub id: NodeId,
    /// Skip the reachable-quorum guard (never the other guards).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

pub fn run(command: &MemberCommand) -> anyhow::Result<ExitCode> {
    match command {
        MemberCommand::List(args) => list(args),
        MemberCommand::Add(args) => add(args),
        MemberCommand::Promote(args) => change(args, Change::Promote),
        MemberCommand::Remove(args) => change(args, Change::Remove),
    }
}

fn list(args: &ListArgs) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    let view = match runtime()?.block_on(c.members()) {
        Ok(view) => view,
        Err(e) => return Ok(failure(e)),
    };
    let mut out = std::io::stdout().lock();
    match args.format {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &view)?;
            writeln!(out)?;
        }
        OutputFormat::Table => {
            let text = render_members(
                &view.members,
                &view.membership,
                view.leader.as_ref(),
                view.id,
            );
            out.write_all(text.as_bytes())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn add(args: &AddArgs) -> anyhow::Result<ExitCode> {
    raftkv::api::http::check_peer_addr(&args.peer_addr)
        .map_err(|e| UsageError(format!("--peer-addr {e}")))?;
    raftkv::node::check_client_url(&args.client_url)
        .map_err(|e| UsageError(format!("--client-url {:?}: {e}", args.client_url)))?;
    let c = client(&args.endpoints)?;
    let result = runtime()?.block_on(c.add_member(
        args.id,
        &args.peer_addr,
        &args.client_url,
        args.learner,
        args.force,
    ));
    let role = if args.learner { "a learner" } else { "a voter" };
    done(result, &format!("added node {} as {role}", args.id))
}

#[derive(Clone, Copy)]
enum Change {
    Promote,
    Remove,
}

fn change(args: &ChangeArgs, what: Change) -> anyhow::Result<ExitCode> {
    let c = client(&args.endpoints)?;
    let rt = runtime()?;
    let (result, said) = match what {
        Change::Promote => (
            rt.block_on(c.promote_member(args.id, args.force)),
            format!("promoted node {} to a voter", args.id),
        ),
        Change::Remove => (
            rt.block_on(c.remove_member(args.id, args.force)),
            format!("removed node {}", args.id),
        ),
    };
    done(result, &said)
}

/// Prints what a completed change did and the configuration it left, or the failure.
fn done(
    result: Result<ClusterStatus, raftkv::client::ClientError>,
    said: &str,
) -> anyhow::Result<ExitCode> {
    let status = match result {
        Ok(status) => status,
        Err(e) => return Ok(failure(e)),
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{said} (configuration index {})\n",
        status.membership.index
    )?;
    let text = render_members(
        &status.members,
        &status.membership,
        status.leader.as_ref(),
        status.id,
    );
    out.write_all(text.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

/// A member's role as the table shows it: `voter`, `learner`, or with the half of a joint
/// configuration it votes in, `voter (joint: outgoing)`.
pub fn role_label(m: &MemberStatus) -> String {
    match m.joint.as_deref() {
        Some(half) if m.role == "voter" => format!("{} (joint: {half})", m.role),
        _ => m.role.clone(),
    }
}

/// The members table (one row per member), then the leader, whether a change is in flight,
/// and the configuration's index. `answered_by` is the node whose view this is: match
/// indexes and reachability are known only when it leads.
pub fn render_members(
    members: &[MemberStatus],
    membership: &MembershipStatus,
    leader: Option<&LeaderInfo>,
    answered_by: NodeId,
) -> String {
    debug_assert!(
        members.windows(2).all(|w| w[0].id < w[1].id),
        "sorted by id"
    );
    let dash = || "-".to_string();
    let mut rows = vec![[
        "ID",
        "ROLE",
        "PEER ADDR",
        "CLIENT URL",
        "MATCH",
        "REACHABLE",
    ]
    .map(String::from)];
    rows.extend(members.iter().map(|m| {
        [
            m.id.to_string(),
            role_label(m),
            Some(m.peer_addr.clone())
                .filter(|a| !a.is_empty())
                .unwrap_or_else(dash),
            m.client_url.clone().unwrap_or_else(dash),
            m.match_index.map_or_else(dash, |i| i.to_string()),
            m.reachable
                .map_or_else(dash, |r| if r { "yes" } else { "no" }.to_string()),
        ]
    }));
    let mut s = columns(&rows);
    let leads = leader.is_some_and(|l| l.id == answered_by);
    s.push_str(&match leader {
        Some(l) if leads => format!("leader: {} (this view)\n", l.id),
        Some(l) => format!(
            "leader: {} (this is node {answered_by}'s view: no match indexes)\n",
            l.id
        ),
        None => format!("leader: none known (this is node {answered_by}'s view)\n"),
    });
    if !membership.voters_outgoing.is_empty() {
        s.push_str(&format!(
            "joint configuration: voters {} -> {}\n",
            ids(&membership.voters_outgoing),
            ids(&membership.voters)
        ));
    }
    if membership.removed {
        s.push_str(&format!(
            "node {answered_by} was removed from the cluster and takes no part\n"
        ));
    }
    let in_flight = if membership.change_in_flight {
        "yes"
    } else {
        "no"
    };
    s.push_str(&format!("change in flight: {in_flight}\n"));
    s.push_str(&format!("config index: {}\n", membership.index));
    s
}

/// `1, 2, 3`, or `-` for none.
pub fn ids(ids: &[NodeId]) -> String {
    if ids.is_empty() {
        return "-".into();
    }
    ids.iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Left-aligned columns, two spaces apart, each as wide as its widest cell.
fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut s = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn member(id: NodeId, role: &str, joint: Option<&str>, leader_view: bool) -> MemberStatus {
        MemberStatus {
            id,
            role: role.into(),
            joint: joint.map(String::from),
            peer_addr: format!("n{id}:900{id}"),
            client_url: Some(format!("http://n{id}:800{id}")),
            reachable: leader_view.then_some(id != 3),
            match_index: leader_view.then_some(40 + id),
        }
    }

    #[test]
    fn the_table_shows_roles_progress_and_the_change_in_flight() {
        let members = [
            member(1, "voter", Some("both"), true),
            member(2, "voter", Some("outgoing"), true),
            member(3, "voter", Some("incoming"), true),
            member(4, "learner", Some("learner"), true),
        ];
        let membership = MembershipStatus {
            voters: vec![1, 3],
            learners: vec![4],
            voters_outgoing: vec![1, 2],
            index: 57,
            change_in_flight: true,
            removed: false,
        };
        let leader = LeaderInfo {
            id: 1,
            client_url: None,
        };
        let text = render_members(&members, &membership, Some(&leader), 1);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "ID  ROLE                     PEER ADDR  CLIENT URL      MATCH  REACHABLE"
        );
        assert_eq!(
            lines[1],
            "1   voter (joint: both)      n1:9001    http://n1:8001  41     yes"
        );
        assert_eq!(
            lines[2],
            "2   voter (joint: outgoing)  n2:9002    http://n2:8002  42     yes"
        );
        assert_eq!(
            lines[3],
            "3   voter (joint: incoming)  n3:9003    http://n3:8003  43     no"
        );
        assert_eq!(
            lines[4],
            "4   learner                  n4:9004    http://n4:8004  44     yes"
        );
        assert_eq!(
            &lines[5..],
            [
                "leader: 1 (this view)",
                "joint configuration: voters 1, 2 -> 1, 3",
                "change in flight: yes",
                "config index: 57",
            ]
        );
    }

    #[test]
    fn a_follower_view_has_no_progress() {
        let members = [
            member(1, "voter", None, false),
            member(2, "voter", None, false),
        ];
        let membership = MembershipStatus {
            voters: vec![1, 2],
            index: 3,
            ..MembershipStatus::default()
        };
        let leader = LeaderInfo {
            id: 1,
            client_url: None,
        };
        let text = render_members(&members, &membership, Some(&leader), 2);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "1   voter  n1:9001    http://n1:8001  -      -");
        assert_eq!(
            lines[3],
            "leader: 1 (this is node 2's view: no match indexes)"
        );
        assert_eq!(&lines[4..], ["change in flight: no", "config index: 3"]);
    }

    /// The CLI's own parse of `raftkv member ...`.
    fn parse(args: &[&str]) -> Result<MemberCommand, clap::Error> {
        let cli =
            super::super::Cli::try_parse_from(["raftkv", "member"].iter().chain(args).copied())?;
        match cli.command {
            super::super::Command::Member(m) => Ok(m),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn member_commands_parse() {
        let add = parse(&[
            "add",
            "4",
            "--peer-addr",
            "n4:9004",
            "--client-url",
            "http://n4:8004",
            "--learner",
            "--endpoints",
            "http://a:1",
        ])
        .unwrap();
        let MemberCommand::Add(a) = add else {
            panic!("{add:?}")
        };
        assert_eq!(
            (
                a.id,
                a.peer_addr.as_str(),
                a.client_url.as_str(),
                a.learner,
                a.force
            ),
            (4, "n4:9004", "http://n4:8004", true, false)
        );
        assert_eq!(a.endpoints.endpoints, "http://a:1");
        let MemberCommand::Remove(r) = parse(&["remove", "2", "--force"]).unwrap() else {
            panic!()
        };
        assert_eq!((r.id, r.force), (2, true));
        let MemberCommand::Promote(p) = parse(&["promote", "4"]).unwrap() else {
            panic!()
        };
        assert_eq!((p.id, p.force), (4, false));
        let MemberCommand::List(l) = parse(&["list", "-w", "json"]).unwrap() else {
            panic!()
        };
        assert_eq!(l.format, OutputFormat::Json);
        for bad in [
            &[
                "add",
                "0",
                "--peer-addr",
                "n:1",
                "--client-url",
                "http://n:2",
            ][..],
            &["add", "4", "--client-url", "http://n:2"],
            &["promote", "x"],
            &["remove"],
            &["list", "-w", "yaml"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
