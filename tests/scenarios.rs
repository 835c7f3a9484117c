//! Golden scenario tests for the consensus core: one file per named scenario in
//! tests/scenarios/*.txt, each a script of commands with the expected output under each
//! command. Run `UPDATE_GOLDEN=1 cargo test --test scenarios` to rewrite the expected output
//! (then review the diff: every golden must be correct Raft behaviour, not just recorded).
//!
//! Format: lines starting with `#` are comments; `> command args` runs a command; the lines
//! after it, up to the next command or comment, are its expected output.
//!
//! The harness is a cluster of cores whose durable writes complete synchronously; messages
//! queue in a network and move only when a command delivers them, so each scenario controls
//! the interleaving exactly. Commands:
//! - `cluster nodes=N [prevote=B] [checkquorum=B] [lease=B] [maxappend=BYTES]`: bootstrap.
//! - `campaign ID`: tick ID until its election timeout fires and it starts a (pre-)election.
//! - `tick IDS [N]` / `heartbeat ID`: tick nodes N times / until the leader sends heartbeats.
//! - `deliver [FROM->TO ...]`: deliver the queued messages (only the matching ones if given).
//! - `stabilize`: deliver until no message is left.
//! - `partition A,B|C,...` / `heal`: drop messages between groups / stop dropping.
//! - `drop [FROM->TO ...]`: discard queued messages.
//! - `propose ID TEXT`, `read ID CTX`, `transfer ID TO`, `compact ID INDEX`.
//! - `crash ID` (keeps only what was persisted), `restart ID`.
//! - `status [IDS]`, `applied IDS`, `append ID TERM TEXT...` (force entries into a crashed
//!   node's durable log, to build divergent logs).

use raftkv::raft::{Config, Message, MessageBody, Raft, RestartState, Role};
use raftkv::storage::{Entry, EntryKind, HardState, Membership, NodeId, SnapshotMeta};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::Path;

#[derive(Default, Clone)]
struct Durable {
    hard_state: HardState,
    snapshot: SnapshotMeta,
    log: Vec<Entry>,
    applied: u64,
}

struct Node {
    raft: Option<Raft>,
    config: Config,
    durable: Durable,
    /// Payloads applied so far (for status).
    applied: Vec<String>,
}

enum Queued {
    Msg(Message),
    Snapshot { from: NodeId, to: NodeId, term: u64 },
}

impl Queued {
    fn route(&self) -> (NodeId, NodeId) {
        match self {
            Queued::Msg(m) => (m.from, m.to),
            Queued::Snapshot { from, to, .. } => (*from, *to),
        }
    }
}

struct Cluster {
    nodes: BTreeMap<NodeId, Node>,
    queue: VecDeque<Queued>,
    groups: Option<Vec<BTreeSet<NodeId>>>,
    out: String,
}

fn parse_ids(arg: &str, cluster: &Cluster) -> Vec<NodeId> {
    if arg == "all" {
        return cluster.nodes.keys().copied().collect();
    }
    arg.split(',')
        .map(|s| s.parse().expect("node id"))
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
                "lease" => config.lease_reads = v.parse().expect("bool"),
                "maxappend" => config.append_bytes_max = v.parse().expect("bytes"),
                _ => panic!("unknown cluster option {k}"),
            }
        }
        let membership = Membership::with_voters(1..=n);
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let mut c = config.clone();
            c.id = id;
            let raft = Raft::bootstrap(c.clone(), membership.clone(), 42).expect("bootstrap");
            nodes.insert(
                id,
                Node {
                    raft: Some(raft),
                    config: c,
                    durable: Durable::default(),
                    applied: Vec::new(),
                },
            );
        }
        let mut cluster = Cluster {
            nodes,
            queue: VecDeque::new(),
            groups: None,
            out: String::new(),
        };
        for id in 1..=n {
            cluster.process(id);
        }
        cluster.out.clear();
        cluster
    }

    fn raft(&mut self, id: NodeId) -> &mut Raft {
        self.nodes
            .get_mut(&id)
            .and_then(|n| n.raft.as_mut())
            .unwrap_or_else(|| panic!("node {id} is down"))
    }

    fn cut(&self, from: NodeId, to: NodeId) -> bool {
        match &self.groups {
            None => false,
            Some(groups) => !groups.iter().any(|g| g.contains(&from) && g.contains(&to)),
        }
    }

    /// Handles everything node `id` has ready: persist synchronously, queue messages, apply.
    fn process(&mut self, id: NodeId) {
        loop {
            let node = self.nodes.get_mut(&id).expect("node");
            let Some(raft) = node.raft.as_mut() else {
                return;
            };
            let rd = raft.ready();
            if rd.is_empty() {
                break;
            }
            let d = &mut node.durable;
            let mut persisted = None;
            if let Some(meta) = &rd.snapshot {
                d.snapshot = meta.clone();
                d.log.clear();
                d.applied = meta.index;
                node.applied
                    .push(format!("snapshot {}@{}", meta.index, meta.term));
                persisted = Some((meta.index, meta.term));
            }
            for e in &rd.entries {
                d.log.retain(|x| x.index < e.index);
                d.log.push(e.clone());
                persisted = Some((e.index, e.term));
            }
            if let Some(hs) = rd.hard_state {
                d.hard_state = hs;
            }
            if let Some((i, t)) = persisted {
                raft.persisted(i, t);
            }
            let mut last_applied = None;
            for e in &rd.committed {
                node.applied.push(entry_text(e));
                d.applied = e.index;
                last_applied = Some(e.index);
            }
            if let Some(i) = last_applied {
                raft.applied(i);
            }
            for rs in &rd.read_states {
                let _ = writeln!(
                    self.out,
                    "n{id} read ctx={} ready at index {}",
                    rs.id, rs.index
                );
            }
            for r in &rd.reads_dropped {
                let _ = writeln!(self.out, "n{id} read ctx={r} dropped");
            }
            for m in rd.messages_now {
                let _ = writeln!(self.out, "{m}");
                self.queue.push_back(Queued::Msg(m));
            }
            for m in rd.messages_after_persist {
                let _ = writeln!(self.out, "{m} [after fsync]");
                self.queue.push_back(Queued::Msg(m));
            }
            for s in rd.snapshot_sends {
                let _ = writeln!(self.out, "{id}->{} send snapshot (term {})", s.to, s.term);
                self.queue.push_back(Queued::Snapshot {
                    from: id,
                    to: s.to,
                    term: s.term,
                });
            }
        }
    }

    fn announce_roles<F: FnOnce(&mut Cluster)>(&mut self, f: F) {
        let before: BTreeMap<NodeId, Option<(Role, u64)>> = self
            .nodes
            .iter()
            .map(|(&id, n)| (id, n.raft.as_ref().map(|r| (r.role(), r.term()))))
            .collect();
        f(self);
        for (&id, n) in &self.nodes {
            let now = n.raft.as_ref().map(|r| (r.role(), r.term()));
            if let (Some(Some(b)), Some(a)) = (before.get(&id), now) {
                if b.0 != a.0 {
                    let _ = writeln!(self.out, "n{id} became {} at term {}", a.0.name(), a.1);
                }
            }
        }
    }

    fn deliver_one(&mut self, q: Queued) {
        let (from, to) = q.route();
        if self.cut(from, to) || self.nodes[&to].raft.is_none() {
            return;
        }
        match q {
            Queued::Msg(m) => {
                self.raft(to).step(m).expect("step");
            }
            Queued::Snapshot { from, to, term } => {
                let meta = self.nodes[&from].durable.snapshot.clone();
                let _ = writeln!(
                    self.out,
                    "{from}->{to} snapshot {}@{} streamed",
                    meta.index, meta.term
                );
                self.raft(to)
                    .step(Message {
                        from,
                        to,
                        term,
                        body: MessageBody::InstallSnapshot { meta },
                    })
                    .expect("step");
                if let Some(r) = self.nodes.get_mut(&from).and_then(|n| n.raft.as_mut()) {
                    r.snapshot_sent(to, true);
                }
                self.process(from);
            }
        }
        self.process(to);
    }

    fn deliver(&mut self, filter: &[(NodeId, NodeId)]) {
        let pending: Vec<Queued> = self.queue.drain(..).collect();
        let mut keep = VecDeque::new();
        for q in pending {
            if filter.is_empty() || filter.contains(&q.route()) {
                self.announce_roles(|c| c.deliver_one(q));
            } else {
                keep.push_back(q);
            }
        }
        keep.extend(self.queue.drain(..));
        self.queue = keep;
    }

    fn status(&mut self, ids: &[NodeId]) {
        let mut out = std::mem::take(&mut self.out);
        for id in ids {
            let n = &self.nodes[id];
            match &n.raft {
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
        self.out = out;
    }

    fn run(&mut self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (cmd, args) = (words[0], &words[1..]);
        self.out.clear();
        match cmd {
            "campaign" => {
                let id: NodeId = args[0].parse().expect("id");
                assert!(
                    self.raft(id).role() != Role::Leader,
                    "campaign: n{id} is the leader"
                );
                self.announce_roles(|c| {
                    for _ in 0..100 {
                        c.raft(id).tick();
                        let before = c.queue.len();
                        c.process(id);
                        let asked_votes = c.queue.iter().skip(before).any(|q| {
                            matches!(
                                q,
                                Queued::Msg(Message {
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
            "tick" => {
                let ids = parse_ids(args[0], self);
                let n: u32 = args.get(1).map_or(1, |s| s.parse().expect("count"));
                self.announce_roles(|c| {
                    for _ in 0..n {
                        for &id in &ids {
                            if c.nodes[&id].raft.is_some() {
                                c.raft(id).tick();
                                c.process(id);
                            }
                        }
                    }
                });
            }
            "deliver" => {
                let filter: Vec<(NodeId, NodeId)> = args
                    .iter()
                    .map(|a| {
                        let (f, t) = a.split_once("->").expect("FROM->TO");
                        (f.parse().expect("id"), t.parse().expect("id"))
                    })
                    .collect();
                self.deliver(&filter);
            }
            "stabilize" => {
                for _ in 0..100 {
                    if self.queue.is_empty() {
                        break;
                    }
                    self.deliver(&[]);
                }
            }
            "drop" => {
                let filter: Vec<(NodeId, NodeId)> = args
                    .iter()
                    .map(|a| {
                        let (f, t) = a.split_once("->").expect("FROM->TO");
                        (f.parse().expect("id"), t.parse().expect("id"))
                    })
                    .collect();
                let n = self.queue.len();
                self.queue
                    .retain(|q| !(filter.is_empty() || filter.contains(&q.route())));
                let _ = writeln!(self.out, "dropped {} messages", n - self.queue.len());
            }
            "partition" => {
                let groups = args[0]
                    .split('|')
                    .map(|g| g.split(',').map(|s| s.parse().expect("id")).collect())
                    .collect();
                self.groups = Some(groups);
            }
            "heal" => self.groups = None,
            "propose" => {
                let id: NodeId = args[0].parse().expect("id");
                let r = self.raft(id).propose(args[1].as_bytes().to_vec());
                let _ = match r {
                    Ok((i, t)) => writeln!(self.out, "n{id} proposed at {i}@{t}"),
                    Err(e) => writeln!(self.out, "n{id} refused: {e}"),
                };
                self.process(id);
            }
            "read" => {
                let id: NodeId = args[0].parse().expect("id");
                let ctx: u64 = args[1].parse().expect("ctx");
                if let Err(e) = self.raft(id).read_index(ctx) {
                    let _ = writeln!(self.out, "n{id} refused read: {e}");
                }
                self.process(id);
            }
            "transfer" => {
                let id: NodeId = args[0].parse().expect("id");
                let to: NodeId = args[1].parse().expect("id");
                if let Err(e) = self.raft(id).transfer_leadership(to) {
                    let _ = writeln!(self.out, "n{id} refused transfer: {e}");
                }
                self.process(id);
            }
            "compact" => {
                let id: NodeId = args[0].parse().expect("id");
                let index: u64 = args[1].parse().expect("index");
                let r = self.raft(id);
                let term = r.log().term(index).expect("term");
                let membership = r.membership().clone();
                r.compact(index, term).expect("compact");
                let n = self.nodes.get_mut(&id).expect("node");
                n.durable.snapshot = SnapshotMeta {
                    index,
                    term,
                    membership,
                };
                n.durable.log.retain(|e| e.index > index);
                let _ = writeln!(self.out, "n{id} snapshot at {index}@{term}, log compacted");
            }
            "crash" => {
                let id: NodeId = args[0].parse().expect("id");
                let n = self.nodes.get_mut(&id).expect("node");
                n.raft = None;
                n.applied.clear();
                self.queue.retain(|q| q.route().1 != id);
                let _ = writeln!(self.out, "n{id} crashed");
            }
            "append" => {
                // Force entries into a crashed node's durable log (to build divergent logs).
                let id: NodeId = args[0].parse().expect("id");
                let term: u64 = args[1].parse().expect("term");
                let n = self.nodes.get_mut(&id).expect("node");
                assert!(n.raft.is_none(), "append works on crashed nodes");
                for text in &args[2..] {
                    let index = n
                        .durable
                        .log
                        .last()
                        .map_or(n.durable.snapshot.index, |e| e.index)
                        + 1;
                    n.durable.log.push(Entry {
                        index,
                        term,
                        kind: EntryKind::Normal,
                        payload: text.as_bytes().to_vec().into(),
                    });
                }
                n.durable.hard_state.term = n.durable.hard_state.term.max(term);
            }
            "restart" => {
                let id: NodeId = args[0].parse().expect("id");
                let n = self.nodes.get_mut(&id).expect("node");
                let d = n.durable.clone();
                let state = RestartState {
                    hard_state: d.hard_state,
                    snapshot: d.snapshot.clone(),
                    entries: d.log.clone(),
                    applied: d.snapshot.index,
                };
                n.raft = Some(Raft::restart(n.config.clone(), state, 42).expect("restart"));
                let _ = writeln!(self.out, "n{id} restarted");
                self.process(id);
            }
            "applied" => {
                for id in parse_ids(args[0], self) {
                    let line = format!("n{id} applied: {}\n", self.nodes[&id].applied.join(" "));
                    self.out.push_str(&line);
                }
            }
            "status" => {
                let ids = if args.is_empty() {
                    self.nodes.keys().copied().collect()
                } else {
                    parse_ids(args[0], self)
                };
                self.status(&ids);
            }
            _ => panic!("unknown command {cmd}"),
        }
        std::mem::take(&mut self.out)
    }
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
