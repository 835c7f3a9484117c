//! Golden scenario tests for the consensus core: one file per named scenario in
//! tests/scenarios/*.txt, each a script of commands with the expected output under each
//! command. Run `UPDATE_GOLDEN=1 cargo test --test scenarios` to rewrite the expected output
//! (then review the diff: every golden must be correct Raft behaviour, not just recorded).
//!
//! Format: lines starting with `#` are comments; `> command args` runs a command; the lines
//! after it, up to the next command or comment, are its expected output.
//!
//! The cluster is `raftkv::raft::harness`: cores whose durable writes complete synchronously;
//! messages queue in a network and move only when a command delivers them, so each scenario
//! controls the interleaving exactly. Commands:
//! - `cluster nodes=N [prevote=B] [checkquorum=B] [lease=B] [maxappend=BYTES]`: bootstrap.
//! - `campaign ID`: tick ID until its election timeout fires and it starts a (pre-)election.
//! - `tick IDS [N]`: tick nodes N times (a leader sends heartbeats every tick); each tick
//!   moves the node's clock on by 100 ms first.
//! - `clock ID MS`: move ID's clock on by MS without a tick (a process that was paused).
//! - `deliver [FROM->TO ...]`: deliver the queued messages (only the matching ones if given).
//! - `stabilize`: deliver until no message is left.
//! - `partition A,B|C,...` / `heal`: drop messages between groups / stop dropping.
//! - `drop [FROM->TO ...]`: discard queued messages.
//! - `propose ID TEXT`, `read ID CTX [lease]`, `transfer ID TO`, `compact ID INDEX`.
//! - `crash ID` (keeps only what was persisted), `restart ID`.
//! - `status [IDS]`, `applied IDS`, `append ID TERM TEXT...` (force entries into a crashed
//!   node's durable log, to build divergent logs).
//! - `member ID CHANGE... [force]`: node ID proposes one membership change made of `+N` (add
//!   learner N), `^N` (promote N), `-N` (remove N).
//! - `join ID`: a new node ID starts with an empty log and the configuration of the member
//!   holding the latest one (as `raftkv serve --join` does).
//! - `config [IDS]`: each node's configuration in effect, its index, and whether a change is
//!   in flight.

use raftkv::raft::harness::{self, Envelope, Observer};
use raftkv::raft::{
    Config, MemberChange, MembershipProposal, Message, MessageBody, Raft, ReadLevel, Ready, Role,
};
use raftkv::storage::{Entry, EntryKind, MemberAddrs, NodeId, SnapshotMeta};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// The scenario's view of what the harness does: the command output, and each node's
/// in-memory state machine (the payloads applied since it last started).
#[derive(Default)]
struct Transcript {
    out: String,
    /// The configuration every node is built with (its id replaced).
    config: Option<Config>,
    applied: BTreeMap<NodeId, Vec<String>>,
}

impl Observer for Transcript {
    fn ready(&mut self, id: NodeId, rd: &Ready) {
        let applied = self.applied.entry(id).or_default();
        if let Some(meta) = &rd.snapshot {
            applied.push(format!("snapshot {}@{}", meta.index, meta.term));
        }
        applied.extend(rd.committed.iter().map(entry_text));
        let out = &mut self.out;
        for rs in &rd.read_states {
            let _ = writeln!(out, "n{id} read ctx={} ready at index {}", rs.id, rs.index);
        }
        for r in &rd.reads_dropped {
            let _ = writeln!(out, "n{id} read ctx={r} dropped");
        }
        for m in &rd.messages_now {
            let _ = writeln!(out, "{m}");
        }
        for m in &rd.messages_after_persist {
            let _ = writeln!(out, "{m} [after fsync]");
        }
        for s in &rd.snapshot_sends {
            let _ = writeln!(out, "{id}->{} send snapshot (term {})", s.to, s.term);
        }
    }

    fn snapshot_streamed(&mut self, from: NodeId, to: NodeId, meta: &SnapshotMeta) {
        let _ = writeln!(
            self.out,
            "{from}->{to} snapshot {}@{} streamed",
            meta.index, meta.term
        );
    }
}

/// What one `tick` stands for on a node's clock (leases are measured on it).
const TICK_MS: u64 = 100;

struct Cluster {
    h: harness::Cluster<Transcript>,
    /// Each node's clock: `TICK_MS` more at each of its ticks.
    clocks_ms: BTreeMap<NodeId, u64>,
}

fn parse_ids(arg: &str, cluster: &Cluster) -> Vec<NodeId> {
    if arg == "all" {
        return cluster.h.ids();
    }
    arg.split(',')
        .map(|s| s.parse().expect("node id"))
        .collect()
}

fn parse_routes(args: &[&str]) -> Vec<(NodeId, NodeId)> {
    args.iter()
        .map(|a| {
            let (f, t) = a.split_once("->").expect("FROM->TO");
            (f.parse().expect("id"), t.parse().expect("id"))
        })
        .collect()
}

fn entry_text(e: &Entry) -> String {
    match e.kind {
        EntryKind::Normal => format!(
            "{}@{}:{}",
            e.index,
            e.term,
            String::from_utf8_lossy(&e.payload)
        ),
        EntryKind::Noop => format!("{}@{}:noop", e.index, e.term),
        EntryKind::Config => format!("{}@{}:config", e.index, e.term),
    }
}

impl Cluster {
    fn new(args: &[&str]) -> Cluster {
        let mut n = 3;
        let mut config = Config::new(1);
        config.heartbeat_ticks = 1;
        config.election_timeout_min_ticks = 10;
        config.election_timeout_max_ticks = 20;
        for a in args {
            let (k, v) = a.split_once('=').expect("key=value");
            match k {
                "nodes" => n = v.parse().expect("count"),
                "prevote" => config.pre_vote = v.parse().expect("bool"),
                "checkquorum" => config.check_quorum = v.parse().expect("bool"),
                "lease" => {
                    config.lease_reads = v.parse().expect("bool");
                    config.lease_ms =
                        Config::lease_ms_for(TICK_MS, config.election_timeout_min_ticks);
                }
                "maxappend" => config.append_bytes_max = v.parse().expect("bytes"),
                _ => panic!("unknown cluster option {k}"),
            }
        }
        let template = config.clone();
        let configs = (1..=n)
            .map(|id| {
                let mut c = config.clone();
                c.id = id;
                c
            })
            .collect();
        let h = harness::Cluster::bootstrap(configs, 42, Transcript::default()).expect("bootstrap");
        let mut cluster = Cluster {
            h,
            clocks_ms: BTreeMap::new(),
        };
        cluster.h.observer_mut().config = Some(template);
        for id in 1..=n {
            cluster.h.process(id);
        }
        cluster.out().clear();
        cluster
    }

    fn out(&mut self) -> &mut String {
        &mut self.h.observer_mut().out
    }

    fn raft(&mut self, id: NodeId) -> &mut Raft {
        self.h.raft_mut(id)
    }

    fn announce_roles<F: FnOnce(&mut Cluster)>(&mut self, f: F) {
        let roles = |c: &Cluster| -> BTreeMap<NodeId, Option<(Role, u64)>> {
            c.h.ids()
                .into_iter()
                .map(|id| (id, c.h.raft(id).map(|r| (r.role(), r.term()))))
                .collect()
        };
        let before = roles(self);
        f(self);
        for (id, now) in roles(self) {
            if let (Some(Some(b)), Some(a)) = (before.get(&id), now) {
                if b.0 != a.0 {
                    let _ = writeln!(self.out(), "n{id} became {} at term {}", a.0.name(), a.1);
                }
            }
        }
    }

    fn deliver(&mut self, filter: &[(NodeId, NodeId)]) {
        let pending = std::mem::take(self.h.network_mut());
        let mut keep = std::collections::VecDeque::new();
        for q in pending {
            if filter.is_empty() || filter.contains(&q.route()) {
                self.announce_roles(|c| c.h.deliver(q));
            } else {
                keep.push_back(q);
            }
        }
        keep.extend(self.h.network_mut().drain(..));
        *self.h.network_mut() = keep;
    }

    fn status(&mut self, ids: &[NodeId]) {
        let mut out = std::mem::take(self.out());
        for &id in ids {
            match self.h.raft(id) {
                None => {
                    let _ = writeln!(out, "n{id}: down");
                }
                Some(r) => {
                    let _ = write!(
                        out,
                        "n{id}: {} term={} vote={} leader={} commit={} applied={} log=",
                        r.role().name(),
                        r.term(),
                        r.vote().map_or("-".into(), |v| v.to_string()),
                        r.leader().map_or("-".into(), |v| v.to_string()),
                        r.commit_index(),
                        r.applied_index(),
                    );
                    let log = r.log();
                    if log.base_index() > 0 {
                        let _ = write!(
                            out,
                            "(compacted to {}@{}) ",
                            log.base_index(),
                            log.base_term()
                        );
                    }
                    let entries: Vec<String> = (log.first_index()..=log.last_index())
                        .filter_map(|i| log.entry(i).map(entry_text))
                        .collect();
                    let _ = writeln!(out, "[{}]", entries.join(" "));
                }
            }
        }
        *self.out() = out;
    }

    /// `member ID CHANGE... [force]` (see the module doc).
    fn member(&mut self, args: &[&str]) {
        let id: NodeId = args[0].parse().expect("id");
        let mut proposal = MembershipProposal::default();
        for a in &args[1..] {
            let (op, n) = a.split_at(1);
            let n: NodeId = if *a == "force" {
                0
            } else {
                n.parse().expect("id")
            };
            match op {
                "+" => proposal.changes.push(MemberChange::AddLearner {
                    id: n,
                    addrs: MemberAddrs {
                        peer_addr: format!("n{n}:7000"),
                        client_url: format!("http://n{n}:8000"),
                    },
                }),
                "^" => proposal.changes.push(MemberChange::Promote { id: n }),
                "-" => proposal.changes.push(MemberChange::Remove { id: n }),
                "f" => proposal.force = true,
                _ => panic!("unknown change {a}"),
            }
        }
        let r = self.raft(id).propose_membership(&proposal);
        let _ = match r {
            Ok((i, t)) => writeln!(self.out(), "n{id} proposed the change at {i}@{t}"),
            Err(e) => writeln!(self.out(), "n{id} refused: {e}"),
        };
        self.h.process(id);
    }

    fn config(&mut self, ids: &[NodeId]) {
        let mut out = std::mem::take(self.out());
        let list = |set: &std::collections::BTreeSet<NodeId>| {
            set.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        for &id in ids {
            let Some(r) = self.h.raft(id) else {
                let _ = writeln!(out, "n{id}: down");
                continue;
            };
            let m = r.membership();
            let _ = write!(out, "n{id}: voters={}", list(&m.voters));
            if m.is_joint() {
                let _ = write!(out, " outgoing={}", list(&m.voters_outgoing));
            }
            let _ = writeln!(
                out,
                " learners={} at={} in_flight={}",
                list(&m.learners),
                r.membership_index(),
                r.membership_in_flight()
            );
        }
        *self.out() = out;
    }

    /// Moves `id`'s clock on by `ms` without a tick (a paused process sees this on waking).
    fn advance_clock(&mut self, id: NodeId, ms: u64) {
        let clock_ms = self.clocks_ms.entry(id).or_insert(0);
        *clock_ms += ms;
        let now_ms = *clock_ms;
        self.raft(id).advance_clock(now_ms);
    }

    /// One tick of `id`, its clock `TICK_MS` further first.
    fn tick_node(&mut self, id: NodeId) {
        self.advance_clock(id, TICK_MS);
        self.raft(id).tick();
    }

    /// Ticks `id` until it asks for (pre-)votes, at most 100 times.
    fn campaign(&mut self, id: NodeId) {
        assert!(
            self.raft(id).role() != Role::Leader,
            "campaign: n{id} is the leader"
        );
        self.announce_roles(|c| {
            for _ in 0..100 {
                c.tick_node(id);
                let before = c.h.network().len();
                c.h.process(id);
                let asked_votes = c.h.network().iter().skip(before).any(|q| {
                    matches!(
                        q,
                        Envelope::Message(Message {
                            body: MessageBody::Vote { .. },
                            ..
                        })
                    )
                });
                if asked_votes {
                    break;
                }
            }
        });
    }

    /// Forces entries of `term` into crashed node `id`'s durable log (to build divergent logs).
    fn append(&mut self, id: NodeId, term: u64, texts: &[&str]) {
        assert!(!self.h.is_up(id), "append works on crashed nodes");
        let d = self.h.durable_mut(id);
        for text in texts {
            let index = d.last_index() + 1;
            d.append(Entry {
                index,
                term,
                kind: EntryKind::Normal,
                payload: text.as_bytes().to_vec().into(),
            });
        }
        d.hard_state.term = d.hard_state.term.max(term);
    }

    fn run(&mut self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (cmd, args) = (words[0], &words[1..]);
        self.out().clear();
        match cmd {
            "campaign" => self.campaign(args[0].parse().expect("id")),
            "tick" => {
                let ids = parse_ids(args[0], self);
                let n: u32 = args.get(1).map_or(1, |s| s.parse().expect("count"));
                self.announce_roles(|c| {
                    for _ in 0..n {
                        for &id in &ids {
                            if c.h.is_up(id) {
                                c.tick_node(id);
                                c.h.process(id);
                            }
                        }
                    }
                });
            }
            "clock" => {
                let id = args[0].parse().expect("id");
                self.advance_clock(id, args[1].parse().expect("ms"));
            }
            "deliver" => self.deliver(&parse_routes(args)),
            "stabilize" => {
                for _ in 0..100 {
                    if self.h.network().is_empty() {
                        break;
                    }
                    self.deliver(&[]);
                }
            }
            "drop" => {
                let filter = parse_routes(args);
                let network = self.h.network_mut();
                let n = network.len();
                network.retain(|q| !(filter.is_empty() || filter.contains(&q.route())));
                let dropped = n - network.len();
                let _ = writeln!(self.out(), "dropped {dropped} messages");
            }
            "partition" => {
                let groups = args[0]
                    .split('|')
                    .map(|g| g.split(',').map(|s| s.parse().expect("id")).collect())
                    .collect();
                self.h.partition(groups);
            }
            "heal" => self.h.heal(),
            "applied" => {
                for id in parse_ids(args[0], self) {
                    let applied = self.h.observer().applied.get(&id);
                    let line = format!(
                        "n{id} applied: {}\n",
                        applied.map_or(String::new(), |a| a.join(" "))
                    );
                    self.out().push_str(&line);
                }
            }
            "config" => {
                let ids = if args.is_empty() {
                    self.h.ids()
                } else {
                    parse_ids(args[0], self)
                };
                self.config(&ids);
            }
            "status" => {
                let ids = if args.is_empty() {
                    self.h.ids()
                } else {
                    parse_ids(args[0], self)
                };
                self.status(&ids);
            }
            _ => self.run_on_node(cmd, args),
        }
        std::mem::take(self.out())
    }

    /// The commands aimed at one node.
    fn run_on_node(&mut self, cmd: &str, args: &[&str]) {
        match cmd {
            "propose" => {
                let id: NodeId = args[0].parse().expect("id");
                let r = self.raft(id).propose(args[1].as_bytes().to_vec());
                let _ = match r {
                    Ok((i, t)) => writeln!(self.out(), "n{id} proposed at {i}@{t}"),
                    Err(e) => writeln!(self.out(), "n{id} refused: {e}"),
                };
                self.h.process(id);
            }
            "read" => {
                let id: NodeId = args[0].parse().expect("id");
                let ctx: u64 = args[1].parse().expect("ctx");
                let level = match args.get(2).copied() {
                    None => ReadLevel::Linearizable,
                    Some("lease") => ReadLevel::Lease,
                    Some(other) => panic!("read level {other:?}: only `lease`"),
                };
                if let Err(e) = self.raft(id).read_index_at(ctx, level) {
                    let _ = writeln!(self.out(), "n{id} refused read: {e}");
                }
                self.h.process(id);
            }
            "transfer" => {
                let id: NodeId = args[0].parse().expect("id");
                let to: NodeId = args[1].parse().expect("id");
                if let Err(e) = self.raft(id).transfer_leadership(to) {
                    let _ = writeln!(self.out(), "n{id} refused transfer: {e}");
                }
                self.h.process(id);
            }
            "compact" => {
                let id: NodeId = args[0].parse().expect("id");
                let index: u64 = args[1].parse().expect("index");
                let meta = self.h.compact(id, index).expect("compact");
                let _ = writeln!(
                    self.out(),
                    "n{id} snapshot at {index}@{}, log compacted",
                    meta.term
                );
            }
            "crash" => {
                let id: NodeId = args[0].parse().expect("id");
                self.h.crash(id);
                self.h.observer_mut().applied.remove(&id);
                let _ = writeln!(self.out(), "n{id} crashed");
            }
            "append" => {
                let id: NodeId = args[0].parse().expect("id");
                let term: u64 = args[1].parse().expect("term");
                self.append(id, term, &args[2..]);
            }
            "member" => self.announce_roles(|c| c.member(args)),
            "join" => {
                let id: NodeId = args[0].parse().expect("id");
                let membership = c_latest_membership(self);
                let mut config = self.h.observer().config.clone().expect("template");
                config.id = id;
                match self.h.join(config, membership) {
                    Ok(()) => {
                        let _ = writeln!(self.out(), "n{id} joined with an empty log");
                    }
                    Err(e) => {
                        let _ = writeln!(self.out(), "n{id} cannot join: {e}");
                    }
                }
            }
            "restart" => {
                let id: NodeId = args[0].parse().expect("id");
                self.h.restart(id).expect("restart");
                let _ = writeln!(self.out(), "n{id} restarted");
                self.h.process(id);
            }
            _ => panic!("unknown command {cmd}"),
        }
    }
}

/// The configuration of the live member holding the latest one.
fn c_latest_membership(c: &Cluster) -> raftkv::storage::Membership {
    c.h.ids()
        .into_iter()
        .filter_map(|id| c.h.raft(id))
        .max_by_key(|r| r.membership_index())
        .map(|r| r.membership().clone())
        .expect("a live member")
}

fn run_file(path: &Path) {
    let text = std::fs::read_to_string(path).expect("read scenario");
    let update = std::env::var("UPDATE_GOLDEN").is_ok();
    let mut cluster: Option<Cluster> = None;
    let mut rewritten = String::new();
    let mut mismatches = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(cmd) = line.strip_prefix("> ") {
            let mut expected = String::new();
            while let Some(next) = lines.peek() {
                if next.starts_with("> ") || next.starts_with('#') {
                    break;
                }
                expected.push_str(next);
                expected.push('\n');
                lines.next();
            }
            let actual = if let Some(args) = cmd.strip_prefix("cluster") {
                let args: Vec<&str> = args.split_whitespace().collect();
                cluster = Some(Cluster::new(&args));
                String::new()
            } else {
                cluster.as_mut().expect("cluster first").run(cmd)
            };
            rewritten.push_str(line);
            rewritten.push('\n');
            rewritten.push_str(&actual);
            // Keep one blank line between blocks for readability.
            if expected.trim_end() != actual.trim_end() {
                mismatches.push(format!(
                    "{}: command `{cmd}`\n--- expected\n{expected}--- actual\n{actual}",
                    path.display()
                ));
            }
            if lines.peek().is_some() {
                rewritten.push('\n');
            }
        } else if !line.is_empty() {
            rewritten.push_str(line);
            rewritten.push('\n');
        }
    }
    if update {
        std::fs::write(path, rewritten).expect("write golden");
    } else if !mismatches.is_empty() {
        panic!(
            "{}\n(re-run with UPDATE_GOLDEN=1 to accept, then review the diff)",
            mismatches.join("\n")
        );
    }
}

macro_rules! scenario {
    ($name:ident) => {
        #[test]
        fn $name() {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/scenarios")
                .join(concat!(stringify!($name), ".txt"));
            run_file(&path);
        }
    };
}

scenario!(election_tie);
scenario!(prevote_rejoin);
scenario!(check_quorum_step_down);
scenario!(stale_log_loses_election);
scenario!(figure8);
scenario!(divergent_logs_repaired);
scenario!(snapshot_catch_up);
scenario!(leadership_transfer);
scenario!(read_index_leader_change);
scenario!(lease_read);
scenario!(membership_removed_leader_needed);
scenario!(membership_joint_change);
scenario!(membership_learner_never_votes);
scenario!(membership_unreachable_quorum);
scenario!(membership_joint_truncated);
