//! A deterministic, fault-injecting simulator of a raftkv cluster, with safety checks after
//! every step, a liveness check after healing, and a linearizability check of client history.
//!
//! Everything is driven by one seeded generator and one event queue ordered by (simulated
//! millisecond, sequence number), so a seed replays exactly. What is modelled:
//! - nodes: the consensus core plus the node's duties from the `Ready` contract: a write queue
//!   whose batches become durable only when their simulated fsync completes (messages that
//!   depend on them wait), a KV state machine applying committed entries, snapshots every few
//!   entries with log compaction behind a catch-up margin, snapshot streaming;
//! - crashes: everything not fsynced is lost except a random prefix of the unsynced records
//!   (a torn tail); restarts from the durable state only; pauses longer than an election
//!   timeout (events for a paused node wait until it resumes);
//! - the network: seeded loss (0–30 %), duplication, random delay (hence reordering),
//!   symmetric and one-way partitions, an isolated leader;
//! - byzantine-lite (a quarter of the seeds, for a window that ends before healing): more
//!   duplicates, and corrupted-but-well-formed frames on real links: fields set out of range
//!   (terms and indexes at or beyond `raft::limits`, a wrong `to`, a `from` that is not the
//!   link's peer) and random byte mutations of the encoded message with the frame checksum
//!   recomputed. They travel as frames and are received as a node receives them: the real
//!   frame decoder, then the real `node::peer::validate`, and only then the core. A mutation
//!   that decodes and validates as a plausible message is not injected: a peer that sends
//!   plausible lies is a real Byzantine peer, which Raft does not tolerate and which peer
//!   authentication keeps out (out of scope here);
//! - clients: put/get/delete through any node, following leader hints, with timeouts and
//!   retries (same sequence number, deduplicated by the state machine), sometimes giving up
//!   (outcome unknown).
//!
//! Checked after every event: at most one leader per term; log matching (every (index, term)
//! ever written names one entry with one predecessor term); leader completeness (a new leader
//! holds every entry committed so far); state machine safety (every node applies the same
//! entry at an index); commit index never decreases (per node incarnation) and never
//! contradicts what was committed; an acknowledged write is committed at the index it was
//! acknowledged at (with leader completeness, it survives). After the run: heal, require
//! liveness, compare all logs and state machines, and check linearizability.

use super::kv::{Command, Kv};
use super::linearizability::{self, Op, OpKind, OpResult};
use raftkv::node::peer::{self, PeerMessage};
use raftkv::raft::limits::{INDEX_MAX, TERM_MAX};
use raftkv::raft::rng::Rng;
use raftkv::raft::{Config, Message, MessageBody, Raft, RaftError, RestartState, Role};
use raftkv::storage::{codec, Entry, EntryKind, HardState, Membership, NodeId, SnapshotMeta};
use raftkv::transport::frame;
use std::cmp::Reverse;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};

const TICK_MS: u64 = 10;
const CLIENT_TIMEOUT_MS: u64 = 400;
const KEYS: u64 = 5;
const MAX_DEFERRED_EVENTS: usize = 100_000;
/// The peer transport's default frame limit.
const FRAME_BYTES_MAX: u32 = 16 << 20;

/// A fault in the schedule.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Cut `side` off from the other nodes in both directions for `ms`.
    Partition { side: BTreeSet<NodeId>, ms: u64 },
    /// Drop messages from `from` to `to` (only that direction) for `ms`.
    OneWay { from: NodeId, to: NodeId, ms: u64 },
    /// Cut whoever leads at that moment off from everyone for `ms`.
    IsolateLeader { ms: u64 },
    /// Crash `node` (losing unsynced writes) and restart it after `down_ms`.
    Crash { node: NodeId, down_ms: u64 },
    /// Crash several nodes at once (e.g. a power loss of a majority) for `down_ms`.
    CrashMany {
        nodes: BTreeSet<NodeId>,
        down_ms: u64,
    },
    /// Freeze `node` for `ms` (longer than an election timeout).
    Pause { node: NodeId, ms: u64 },
    /// Ask whoever leads at that moment to hand leadership to `to`.
    TransferLeader { to: NodeId },
    /// Crash whoever leads at that moment (at its next unsynced write), for `down_ms`.
    CrashLeader { down_ms: u64 },
}

/// Everything a seed decides before the run.
#[derive(Clone, Debug)]
pub struct Params {
    pub seed: u64,
    pub nodes: u64,
    pub clients: u64,
    pub loss_pct: u64,
    pub dup_pct: u64,
    pub delay_max_ms: u64,
    pub fsync_max_ms: u64,
    pub snapshot_every: u64,
    pub catchup_margin: u64,
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub max_append_bytes: u64,
    pub max_inflight_msgs: usize,
    /// Lease reads (only with check-quorum, and then without pauses: a paused leader's lease
    /// is exactly the clock-drift caveat lease reads carry).
    pub lease_reads: bool,
    pub run_ms: u64,
    pub faults: Vec<(u64, Fault)>,
    /// The byzantine-lite window, if this seed has one.
    pub byzantine: Option<Byzantine>,
}

/// Byzantine-lite network mode: between `from_ms` and `until_ms`, each Raft message sent on
/// a link comes with a corrupted frame with probability `corrupt_pct` and an extra duplicate
/// with probability `dup_pct`.
#[derive(Clone, Copy, Debug)]
pub struct Byzantine {
    pub from_ms: u64,
    pub until_ms: u64,
    pub corrupt_pct: u64,
    pub dup_pct: u64,
}

impl Byzantine {
    /// Drawn from its own generator, so seeds without the mode keep their old schedules.
    fn from_seed(seed: u64, run_ms: u64) -> Option<Byzantine> {
        let mut rng = Rng::new(seed.wrapping_mul(0x9FB2_1C65_1E98_DF25) ^ 0xB12A);
        if rng.range(0, 4) != 0 {
            return None;
        }
        let from_ms = rng.range(0, run_ms / 2);
        // Ends at least 2 s before healing: liveness is then required of the healed cluster.
        let until_ms = rng.range(from_ms + 1, run_ms.saturating_sub(2000).max(from_ms + 2));
        Some(Byzantine {
            from_ms,
            until_ms,
            corrupt_pct: rng.range(5, 51),
            dup_pct: rng.range(5, 31),
        })
    }
}

impl Params {
    pub fn from_seed(seed: u64, run_ms: u64) -> Params {
        let mut rng = Rng::new(seed.wrapping_mul(0xA24B_AED4_963E_E407) ^ 0x5151);
        let nodes = if rng.range(0, 2) == 0 { 3 } else { 5 };
        let loss_pct = rng.range(0, 31);
        let dup_pct = rng.range(0, 11);
        let delay_max_ms = rng.range(2, 41);
        let fsync_max_ms = if rng.range(0, 3) == 0 {
            rng.range(5, 30)
        } else {
            rng.range(0, 6)
        };
        let snapshot_every = rng.range(8, 65);
        let catchup_margin = rng.range(0, 12);
        let protocol = rng.range(0, 8);
        let pre_vote = protocol != 1 && protocol != 3;
        let check_quorum = protocol != 2 && protocol != 3;
        // From one entry per message to a few dozen.
        let max_append_bytes = [1, 64, 512, 4096][rng.range(0, 4) as usize];
        let max_inflight_msgs = rng.range(1, 9) as usize;
        let lease_reads = check_quorum && rng.range(0, 3) == 0;
        let mut faults = Vec::new();
        // Mean gap between faults: from a fault every 0.3 s (chaos) to one every 3 s.
        let count = run_ms / rng.range(300, 3000);
        for _ in 0..count {
            let at = rng.range(0, run_ms.saturating_sub(500).max(1));
            let node = rng.range(1, nodes + 1);
            let fault = match rng.range(0, 13) {
                11 => Fault::TransferLeader { to: node },
                12 => Fault::CrashLeader {
                    down_ms: rng.range(0, 1000),
                },
                10 => {
                    let mut nodes_down = BTreeSet::new();
                    for id in 1..=nodes {
                        if rng.range(0, 3) > 0 {
                            nodes_down.insert(id);
                        }
                    }
                    Fault::CrashMany {
                        nodes: nodes_down,
                        down_ms: rng.range(0, 1500),
                    }
                }
                0 | 1 => {
                    let mut side = BTreeSet::new();
                    for id in 1..=nodes {
                        if rng.range(0, 2) == 0 {
                            side.insert(id);
                        }
                    }
                    if side.is_empty() {
                        side.insert(node);
                    }
                    Fault::Partition {
                        side,
                        ms: rng.range(200, 3000),
                    }
                }
                2 => {
                    let mut to = rng.range(1, nodes + 1);
                    if to == node {
                        to = to % nodes + 1;
                    }
                    Fault::OneWay {
                        from: node,
                        to,
                        ms: rng.range(200, 3000),
                    }
                }
                3 | 4 => Fault::IsolateLeader {
                    ms: rng.range(300, 3000),
                },
                5..=7 => Fault::Crash {
                    node,
                    down_ms: rng.range(0, 2000),
                },
                _ => Fault::Pause {
                    node,
                    ms: rng.range(250, 1500),
                },
            };
            faults.push((at, fault));
        }
        if lease_reads {
            faults.retain(|(_, f)| !matches!(f, Fault::Pause { .. }));
        }
        let byzantine = Byzantine::from_seed(seed, run_ms);
        faults.sort_by_key(|(at, _)| *at);
        Params {
            seed,
            nodes,
            clients: 3,
            loss_pct,
            dup_pct,
            delay_max_ms,
            fsync_max_ms,
            snapshot_every,
            catchup_margin,
            pre_vote,
            check_quorum,
            max_append_bytes,
            max_inflight_msgs,
            lease_reads,
            run_ms,
            faults,
            byzantine,
        }
    }
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {}: {} nodes, {} clients, loss {}%, dup {}%, delay 1..={} ms, fsync 0..={} ms, \
             snapshot every {} (margin {}), pre_vote {}, check_quorum {}, max_append_bytes {}, \
             max_inflight_msgs {}, lease_reads {}, run {} ms",
            self.seed,
            self.nodes,
            self.clients,
            self.loss_pct,
            self.dup_pct,
            self.delay_max_ms,
            self.fsync_max_ms,
            self.snapshot_every,
            self.catchup_margin,
            self.pre_vote,
            self.check_quorum,
            self.max_append_bytes,
            self.max_inflight_msgs,
            self.lease_reads,
            self.run_ms
        )?;
        if let Some(b) = self.byzantine {
            writeln!(f, "byzantine-lite: {b:?}")?;
        }
        writeln!(f, "fault schedule:")?;
        for (at, fault) in &self.faults {
            writeln!(f, "  t={at:>6} ms  {fault:?}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Request {
    Write {
        seq: u64,
        key: String,
        value: Option<String>,
    },
    Read {
        key: String,
    },
}

#[derive(Clone, Debug)]
enum Response {
    Done(OpResult),
    Redirect(Option<NodeId>),
    Retry,
}

#[derive(Clone, Debug)]
enum NetMsg {
    Raft(Message),
    /// An encoded frame on the link `from` → `to` (byzantine-lite injections).
    Frame {
        from: NodeId,
        to: NodeId,
        bytes: Vec<u8>,
    },
    Snapshot {
        from: NodeId,
        from_incarnation: u64,
        to: NodeId,
        term: u64,
        meta: SnapshotMeta,
        kv: Kv,
    },
    Request {
        client: u64,
        attempt: u64,
        node: NodeId,
        req: Request,
    },
    Response {
        client: u64,
        attempt: u64,
        resp: Response,
    },
}

#[derive(Clone, Debug)]
enum Event {
    Tick(NodeId),
    Deliver(NetMsg),
    FsyncDone {
        node: NodeId,
        incarnation: u64,
    },
    SnapshotDone {
        node: NodeId,
        incarnation: u64,
        peer: NodeId,
        ok: bool,
    },
    Fault(usize),
    Unblock(Vec<(NodeId, NodeId)>),
    Restart(NodeId),
    /// An armed crash that found no unsynced write in time: crash now.
    ArmedCrash {
        node: NodeId,
        incarnation: u64,
    },
    Heal,
    ClientNext(u64),
    ClientTimeout {
        client: u64,
        attempt: u64,
    },
    /// Re-send the current attempt's request to the client's (new) target.
    ClientRetry {
        client: u64,
        attempt: u64,
    },
}

impl Event {
    /// The node this event happens on, if any (used to defer events of paused nodes).
    fn node(&self) -> Option<NodeId> {
        match self {
            Event::Deliver(NetMsg::Raft(m)) => Some(m.to),
            Event::Deliver(NetMsg::Frame { to, .. }) => Some(*to),
            Event::Deliver(NetMsg::Snapshot { to, .. }) => Some(*to),
            Event::Deliver(NetMsg::Request { node, .. }) => Some(*node),
            Event::FsyncDone { node, .. } | Event::SnapshotDone { node, .. } => Some(*node),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
enum Record {
    Snapshot(SnapshotMeta, Kv),
    HardState(HardState),
    Entry(Entry),
}

#[derive(Debug)]
struct Batch {
    records: Vec<Record>,
    after_persist: Vec<Message>,
    persisted: Option<(u64, u64)>,
    done_at: u64,
}

/// What survives a crash.
#[derive(Clone, Debug, Default)]
struct Durable {
    hard_state: HardState,
    snapshot: Option<(SnapshotMeta, Kv)>,
    log: Vec<Entry>,
}

impl Durable {
    fn write(&mut self, record: Record) {
        match record {
            Record::Snapshot(meta, kv) => {
                self.snapshot = Some((meta, kv));
                self.log.clear();
            }
            Record::HardState(hs) => self.hard_state = hs,
            Record::Entry(e) => {
                let snap_index = self.snapshot.as_ref().map_or(0, |(m, _)| m.index);
                let expected_max = self.log.last().map_or(snap_index + 1, |l| l.index + 1);
                assert!(
                    e.index <= expected_max,
                    "Ready entries must continue the log: entry {} after log ending {}",
                    e.index,
                    expected_max - 1
                );
                while self.log.last().is_some_and(|l| l.index >= e.index) {
                    self.log.pop();
                }
                self.log.push(e);
            }
        }
    }
}

struct Node {
    id: NodeId,
    incarnation: u64,
    raft: Option<Raft>,
    paused_until: Option<u64>,
    durable: Durable,
    pending: VecDeque<Batch>,
    kv: Kv,
    applied: u64,
    proposals: BTreeMap<u64, (u64, u64, u64)>,
    reads: BTreeMap<u64, (u64, u64, String)>,
    next_read_id: u64,
    received_snapshot: Option<(SnapshotMeta, Kv)>,
    commit_seen: u64,
    /// A crash waiting for the node to have unsynced writes (its down time in ms).
    crash_armed: Option<u64>,
}

struct Client {
    id: u64,
    seq: u64,
    target: NodeId,
    attempt: u64,
    /// (history index, request) of the op in progress.
    current: Option<(usize, Request)>,
}

/// Safety bookkeeping across the whole run.
#[derive(Default)]
struct Checker {
    leaders: BTreeMap<u64, NodeId>,
    /// (index, term) → (predecessor's term, content hash).
    entries: HashMap<(u64, u64), (u64, u64)>,
    /// index → (term, content hash) of committed entries, as learnt from any node.
    committed: BTreeMap<u64, (u64, u64)>,
    /// index → the lowest term in which any node saw it committed: the term of the leader that
    /// committed it (that leader sees it first, at its own term).
    commit_term: BTreeMap<u64, u64>,
    /// index → (term, content hash) of applied entries.
    applied: BTreeMap<u64, (u64, u64)>,
}

/// An abandoned write of a client can take effect only before the client's next write with a
/// known outcome returned: that write was applied by then, and the state machine's session
/// rejects older sequence numbers afterwards.
fn bound_unknown_writes(history: &mut [Op]) {
    let mut next_known_write: BTreeMap<u64, u64> = BTreeMap::new();
    for op in history.iter_mut().rev() {
        if op.kind == OpKind::Get {
            continue;
        }
        match &op.ret {
            Some((t, _)) => {
                next_known_write.insert(op.client, *t);
            }
            None => op.effect_deadline = next_known_write.get(&op.client).copied(),
        }
    }
}

fn entry_hash(e: &Entry) -> u64 {
    let mut h = DefaultHasher::new();
    (e.kind as u8).hash(&mut h);
    e.payload.hash(&mut h);
    h.finish()
}

/// The simulated cluster.
pub struct Sim {
    params: Params,
    rng: Rng,
    now: u64,
    seq: u64,
    clock: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: HashMap<usize, Event>,
    next_event_id: usize,
    nodes: BTreeMap<NodeId, Node>,
    clients: Vec<Client>,
    blocked: BTreeMap<(NodeId, NodeId), u32>,
    loss_pct: u64,
    dup_pct: u64,
    healed: bool,
    history: Vec<Op>,
    checker: Checker,
    membership: Membership,
    deferred: usize,
    trace: bool,
    /// Runs the transport's (async) frame decoder on byzantine-lite frames.
    runtime: tokio::runtime::Runtime,
    pub stats: Stats,
}

fn describe_event(ev: &Event) -> String {
    match ev {
        Event::Deliver(NetMsg::Raft(m)) => format!("deliver {m}"),
        Event::Deliver(NetMsg::Frame { from, to, bytes }) => {
            format!(
                "deliver corrupted frame {from}->{to} ({} bytes)",
                bytes.len()
            )
        }
        Event::Deliver(NetMsg::Snapshot { from, to, meta, .. }) => {
            format!(
                "deliver snapshot {from}->{to} at {}@{}",
                meta.index, meta.term
            )
        }
        other => format!("{other:?}"),
    }
}

/// Counters reported per run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub events: u64,
    pub ops_ok: u64,
    pub ops_unknown: u64,
    pub elections: u64,
    pub crashes: u64,
    pub snapshots_installed: u64,
    pub max_commit: u64,
    /// Byzantine-lite: corrupted frames delivered and refused by the real decoder.
    pub frames_undecodable: u64,
    /// ... and delivered, decoded and refused by `node::peer::validate`.
    pub frames_refused: u64,
    /// ... and not injected because they validated as plausible messages.
    pub frames_plausible_skipped: u64,
}

impl Sim {
    pub fn new(params: Params) -> Sim {
        let membership = Membership::with_voters(1..=params.nodes);
        let mut sim = Sim {
            rng: Rng::new(params.seed),
            loss_pct: params.loss_pct,
            dup_pct: params.dup_pct,
            params,
            now: 0,
            seq: 0,
            clock: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            next_event_id: 0,
            nodes: BTreeMap::new(),
            clients: Vec::new(),
            blocked: BTreeMap::new(),
            healed: false,
            history: Vec::new(),
            checker: Checker::default(),
            membership,
            deferred: 0,
            trace: std::env::var("RAFTKV_SIM_TRACE").is_ok(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a current-thread runtime"),
            stats: Stats::default(),
        };
        for id in 1..=sim.params.nodes {
            sim.nodes.insert(
                id,
                Node {
                    id,
                    incarnation: 0,
                    raft: None,
                    paused_until: None,
                    durable: Durable::default(),
                    pending: VecDeque::new(),
                    kv: Kv::default(),
                    applied: 0,
                    proposals: BTreeMap::new(),
                    reads: BTreeMap::new(),
                    next_read_id: 1,
                    received_snapshot: None,
                    commit_seen: 0,
                    crash_armed: None,
                },
            );
            sim.start_node(id);
            let phase = sim.rng.range(0, TICK_MS);
            sim.schedule(phase + 1, Event::Tick(id));
        }
        for c in 0..sim.params.clients {
            let target = sim.rng.range(1, sim.params.nodes + 1);
            sim.clients.push(Client {
                id: c,
                seq: 0,
                target,
                attempt: 0,
                current: None,
            });
            let at = sim.rng.range(0, 300);
            sim.schedule(at, Event::ClientNext(c));
        }
        for k in 0..sim.params.faults.len() {
            let at = sim.params.faults[k].0;
            sim.schedule(at, Event::Fault(k));
        }
        let run_ms = sim.params.run_ms;
        sim.schedule(run_ms, Event::Heal);
        sim
    }

    fn config(&self, id: NodeId) -> Config {
        let mut c = Config::new(id);
        c.heartbeat_ticks = 2;
        c.election_timeout_min_ticks = 10;
        c.election_timeout_max_ticks = 20;
        c.pre_vote = self.params.pre_vote;
        c.check_quorum = self.params.check_quorum;
        c.max_append_bytes = self.params.max_append_bytes;
        c.max_inflight_msgs = self.params.max_inflight_msgs;
        c.lease_reads = self.params.lease_reads;
        c.max_inflight_bytes = 4096;
        c.max_uncommitted_bytes = 64 << 10;
        c.max_apply_bytes = 1024;
        c.max_pending_reads = 64;
        c
    }

    fn schedule(&mut self, delay_ms: u64, ev: Event) {
        let at = self.now + delay_ms;
        self.schedule_at(at, ev);
    }

    fn schedule_at(&mut self, at: u64, ev: Event) {
        let id = self.next_event_id;
        self.next_event_id += 1;
        self.seq += 1;
        self.events.insert(id, ev);
        self.queue.push(Reverse((at, self.seq, id)));
    }

    fn chance(&mut self, pct: u64) -> bool {
        pct > 0 && self.rng.range(0, 100) < pct
    }

    /// Runs the whole scenario; `Err` describes the first violated property.
    pub fn run(mut self) -> Result<Stats, String> {
        let deadline = self.params.run_ms + 60_000;
        while let Some(Reverse((at, _, id))) = self.queue.pop() {
            let Some(ev) = self.events.remove(&id) else {
                continue;
            };
            self.now = at;
            self.clock += 1;
            self.stats.events += 1;
            if self.now > deadline {
                return Err(format!(
                    "liveness: not done {} ms after healing\n{}",
                    deadline - self.params.run_ms,
                    self.describe()
                ));
            }
            if let Some(node) = ev.node() {
                if let Some(until) = self.nodes[&node].paused_until {
                    if until > self.now {
                        self.deferred += 1;
                        if self.deferred < MAX_DEFERRED_EVENTS {
                            self.schedule_at(until, ev);
                        }
                        continue;
                    }
                }
            }
            if self.trace {
                eprintln!("[{:>6}] {}", self.now, describe_event(&ev));
            }
            self.handle(ev)?;
            if self.healed && self.all_done() {
                return self.finish();
            }
        }
        Err("event queue ran dry".into())
    }

    fn handle(&mut self, ev: Event) -> Result<(), String> {
        match ev {
            Event::Tick(id) => {
                self.schedule(TICK_MS, Event::Tick(id));
                let node = self.nodes.get_mut(&id).expect("node");
                if node.paused_until.is_some_and(|u| u > self.now) {
                    return Ok(());
                }
                node.paused_until = None;
                if let Some(raft) = node.raft.as_mut() {
                    raft.tick();
                    self.process(id)?;
                }
            }
            Event::Deliver(msg) => self.deliver(msg)?,
            Event::FsyncDone { node, incarnation } => {
                if self.nodes[&node].incarnation != incarnation {
                    return Ok(());
                }
                let n = self.nodes.get_mut(&node).expect("node");
                let Some(batch) = n.pending.pop_front() else {
                    return Err(format!("fsync completion with no batch on node {node}"));
                };
                for r in batch.records {
                    n.durable.write(r);
                }
                if let (Some((i, t)), Some(raft)) = (batch.persisted, n.raft.as_mut()) {
                    raft.persisted(i, t);
                }
                for m in batch.after_persist {
                    self.send_raft(m);
                }
                self.process(node)?;
            }
            Event::SnapshotDone {
                node,
                incarnation,
                peer,
                ok,
            } => {
                let n = self.nodes.get_mut(&node).expect("node");
                if n.incarnation == incarnation {
                    if let Some(raft) = n.raft.as_mut() {
                        raft.snapshot_sent(peer, ok);
                        self.process(node)?;
                    }
                }
            }
            Event::Fault(k) => {
                let fault = self.params.faults[k].1.clone();
                self.apply_fault(fault)?;
            }
            Event::Unblock(links) => {
                for l in links {
                    if let Some(c) = self.blocked.get_mut(&l) {
                        *c -= 1;
                        if *c == 0 {
                            self.blocked.remove(&l);
                        }
                    }
                }
            }
            Event::Restart(id) => self.restart(id)?,
            Event::ArmedCrash { node, incarnation } => {
                if self.nodes[&node].incarnation == incarnation {
                    self.fire_armed_crash(node);
                }
            }
            Event::Heal => {
                self.healed = true;
                self.blocked.clear();
                self.loss_pct = 0;
                self.dup_pct = 0;
                let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
                for id in ids {
                    let n = self.nodes.get_mut(&id).expect("node");
                    n.paused_until = None;
                    n.crash_armed = None;
                    if n.raft.is_none() {
                        self.restart(id)?;
                    }
                }
            }
            Event::ClientNext(c) => self.client_next(c),
            Event::ClientRetry { client, attempt } => {
                let cl = &self.clients[client as usize];
                if cl.attempt == attempt && cl.current.is_some() {
                    self.client_send(client);
                }
            }
            Event::ClientTimeout { client, attempt } => {
                let cl = &self.clients[client as usize];
                if cl.attempt != attempt || cl.current.is_none() {
                    return Ok(());
                }
                let is_write = matches!(cl.current, Some((_, Request::Write { .. })));
                if !self.healed && is_write && self.chance(10) {
                    // Give up: the write's outcome stays unknown.
                    self.clients[client as usize].current = None;
                    self.stats.ops_unknown += 1;
                    let delay = self.rng.range(0, 20);
                    self.schedule(delay, Event::ClientNext(client));
                } else {
                    let target = self.rng.range(1, self.params.nodes + 1);
                    self.clients[client as usize].target = target;
                    self.client_send(client);
                }
            }
        }
        Ok(())
    }

    // ----- network -----

    fn is_blocked(&self, from: NodeId, to: NodeId) -> bool {
        self.blocked.contains_key(&(from, to))
    }

    fn send_raft(&mut self, m: Message) {
        if self.is_blocked(m.from, m.to) {
            // A transport notices a broken connection now and then and says so.
            if self.chance(20) {
                if let Some(raft) = self.nodes.get_mut(&m.from).and_then(|n| n.raft.as_mut()) {
                    raft.peer_unreachable(m.to);
                }
            }
            return;
        }
        if self.chance(self.loss_pct) {
            return;
        }
        let delay = self.rng.range(1, self.params.delay_max_ms + 1);
        if self.chance(self.dup_pct) {
            let delay2 = self.rng.range(1, 2 * self.params.delay_max_ms + 1);
            self.schedule(delay2, Event::Deliver(NetMsg::Raft(m.clone())));
        }
        if let Some(b) = self.params.byzantine {
            if (b.from_ms..b.until_ms).contains(&self.now) {
                if self.chance(b.dup_pct) {
                    let delay3 = self.rng.range(1, 3 * self.params.delay_max_ms + 1);
                    self.schedule(delay3, Event::Deliver(NetMsg::Raft(m.clone())));
                }
                if self.chance(b.corrupt_pct) {
                    self.inject_corrupted(&m);
                }
            }
        }
        self.schedule(delay, Event::Deliver(NetMsg::Raft(m)));
    }

    // ----- byzantine-lite -----

    /// A value at or beyond the wire limits.
    fn absurd(&mut self, limit: u64) -> u64 {
        match self.rng.range(0, 3) {
            0 => u64::MAX,
            1 => limit,
            _ => limit + self.rng.range(0, 1 << 20),
        }
    }

    /// Sets one field of `m` out of range (or its addressing wrong).
    fn falsify(&mut self, m: &mut Message) {
        let nodes = self.params.nodes;
        match self.rng.range(0, 4) {
            0 => m.term = self.absurd(TERM_MAX),
            1 => {
                // Another member, a stranger, or 0.
                let to = [m.from, self.rng.range(1, nodes + 1), 0, nodes + 7];
                m.to = to[self.rng.range(0, 4) as usize];
            }
            2 => {
                let from = [m.to, self.rng.range(1, nodes + 1), 0];
                m.from = from[self.rng.range(0, 3) as usize];
            }
            _ => {
                let big = self.absurd(INDEX_MAX);
                match &mut m.body {
                    MessageBody::Append {
                        prev_index,
                        commit,
                        entries,
                        ..
                    } => match (self.rng.range(0, 3), entries.first_mut()) {
                        (0, _) => *prev_index = big,
                        (1, Some(e)) => e.index = big,
                        _ => *commit = big,
                    },
                    MessageBody::AppendResponse { index, .. } => *index = big,
                    MessageBody::Heartbeat { commit, .. } => *commit = big,
                    MessageBody::HeartbeatResponse { read_round } => *read_round = big,
                    MessageBody::Vote { last_index, .. } => *last_index = big,
                    _ => m.term = self.absurd(TERM_MAX),
                }
            }
        }
    }

    /// Injects a corrupted copy of `m` on its link, unless it would pass as plausible.
    fn inject_corrupted(&mut self, m: &Message) {
        let (from, to) = (m.from, m.to);
        let mut bad = m.clone();
        let mutate_bytes = self.rng.range(0, 2) == 0;
        if !mutate_bytes {
            self.falsify(&mut bad);
        }
        let mut bytes = Vec::new();
        frame::encode_frame(&mut bytes, &PeerMessage::Raft(bad), FRAME_BYTES_MAX)
            .expect("a message encodes");
        if mutate_bytes {
            let header = frame::FRAME_HEADER_BYTES;
            for _ in 0..self.rng.range(1, 5) {
                let at = self.rng.range(header as u64, bytes.len() as u64) as usize;
                bytes[at] = self.rng.range(0, 256) as u8;
            }
            // A valid checksum: the corruption is in what the sender meant, not on the wire.
            let crc = crc32fast::hash(&bytes[header..]);
            bytes[4..8].copy_from_slice(&crc.to_le_bytes());
        }
        if let Some(Ok(_)) = self.receive_frame(from, to, &bytes) {
            self.stats.frames_plausible_skipped += 1;
            return;
        }
        let delay = self.rng.range(1, self.params.delay_max_ms + 1);
        self.schedule(delay, Event::Deliver(NetMsg::Frame { from, to, bytes }));
    }

    /// What node `to` makes of `bytes` received from `from`: `None` if the frame decoder
    /// refuses it, else the verdict of `node::peer::validate`.
    fn receive_frame(
        &self,
        from: NodeId,
        to: NodeId,
        bytes: &[u8],
    ) -> Option<Result<PeerMessage, String>> {
        let decoded: Result<PeerMessage, _> = self
            .runtime
            .block_on(frame::read_frame(&mut &bytes[..], FRAME_BYTES_MAX));
        let message = decoded.ok()?;
        Some(
            peer::validate(from, to, &message)
                .map(|()| message)
                .map_err(|e| e.to_string()),
        )
    }

    /// Delivers a byzantine-lite frame the way a node receives one.
    fn deliver_frame(&mut self, from: NodeId, to: NodeId, bytes: Vec<u8>) -> Result<(), String> {
        if self.is_blocked(from, to) || self.nodes[&to].raft.is_none() {
            return Ok(());
        }
        match self.receive_frame(from, to, &bytes) {
            None => self.stats.frames_undecodable += 1,
            Some(Err(_)) => self.stats.frames_refused += 1,
            Some(Ok(m)) => {
                return Err(format!(
                    "byzantine-lite: a plausible frame was injected on {from}->{to}: {m:?}"
                ))
            }
        }
        Ok(())
    }

    fn send_client_msg(&mut self, msg: NetMsg) {
        if self.chance(self.loss_pct / 2) {
            return;
        }
        let delay = self.rng.range(1, self.params.delay_max_ms + 1);
        self.schedule(delay, Event::Deliver(msg));
    }

    fn respond(&mut self, client: u64, attempt: u64, resp: Response) {
        self.send_client_msg(NetMsg::Response {
            client,
            attempt,
            resp,
        });
    }

    fn deliver(&mut self, msg: NetMsg) -> Result<(), String> {
        match msg {
            NetMsg::Frame { from, to, bytes } => self.deliver_frame(from, to, bytes)?,
            NetMsg::Raft(m) => {
                if self.is_blocked(m.from, m.to) {
                    return Ok(());
                }
                let to = m.to;
                let n = self.nodes.get_mut(&to).expect("node");
                let Some(raft) = n.raft.as_mut() else {
                    return Ok(());
                };
                let desc = m.to_string();
                raft.step(m)
                    .map_err(|e| format!("node {to} rejected {desc}: {e}"))?;
                self.process(to)?;
            }
            NetMsg::Snapshot {
                from,
                from_incarnation,
                to,
                term,
                meta,
                kv,
            } => {
                let n = self.nodes.get_mut(&to).expect("node");
                let ok = n.raft.is_some() && !self.blocked.contains_key(&(from, to));
                self.schedule(
                    0,
                    Event::SnapshotDone {
                        node: from,
                        incarnation: from_incarnation,
                        peer: to,
                        ok,
                    },
                );
                if !ok {
                    return Ok(());
                }
                let n = self.nodes.get_mut(&to).expect("node");
                n.received_snapshot = Some((meta.clone(), kv));
                let raft = n.raft.as_mut().expect("checked above");
                raft.step(Message {
                    from,
                    to,
                    term,
                    body: MessageBody::InstallSnapshot { meta },
                })
                .map_err(|e| format!("node {to} rejected a snapshot: {e}"))?;
                self.process(to)?;
            }
            NetMsg::Request {
                client,
                attempt,
                node,
                req,
            } => self.handle_request(client, attempt, node, req)?,
            NetMsg::Response {
                client,
                attempt,
                resp,
            } => self.client_response(client, attempt, resp)?,
        }
        Ok(())
    }

    // ----- faults -----

    fn block(&mut self, links: Vec<(NodeId, NodeId)>, ms: u64) {
        for &l in &links {
            *self.blocked.entry(l).or_insert(0) += 1;
        }
        self.schedule(ms, Event::Unblock(links));
    }

    fn current_leader(&self) -> Option<NodeId> {
        self.nodes
            .values()
            .filter_map(|n| n.raft.as_ref())
            .filter(|r| r.role() == Role::Leader)
            .max_by_key(|r| r.term())
            .map(|r| r.id())
    }

    fn apply_fault(&mut self, fault: Fault) -> Result<(), String> {
        let all: Vec<NodeId> = self.nodes.keys().copied().collect();
        match fault {
            Fault::Partition { side, ms } => {
                let mut links = Vec::new();
                for &a in &side {
                    for &b in all.iter().filter(|b| !side.contains(b)) {
                        links.push((a, b));
                        links.push((b, a));
                    }
                }
                self.block(links, ms);
            }
            Fault::OneWay { from, to, ms } => self.block(vec![(from, to)], ms),
            Fault::IsolateLeader { ms } => {
                if let Some(l) = self.current_leader() {
                    let mut links = Vec::new();
                    for &b in all.iter().filter(|&&b| b != l) {
                        links.push((l, b));
                        links.push((b, l));
                    }
                    self.block(links, ms);
                }
            }
            Fault::Crash { node, down_ms } => self.arm_crash(node, down_ms),
            Fault::CrashMany { nodes, down_ms } => {
                for node in nodes {
                    self.arm_crash(node, down_ms);
                }
            }
            Fault::Pause { node, ms } => {
                let n = self.nodes.get_mut(&node).expect("node");
                n.paused_until = Some(self.now + ms);
            }
            Fault::CrashLeader { down_ms } => {
                if let Some(l) = self.current_leader() {
                    self.arm_crash(l, down_ms);
                }
            }
            Fault::TransferLeader { to } => {
                if let Some(l) = self.current_leader() {
                    let n = self.nodes.get_mut(&l).expect("node");
                    if n.paused_until.is_none_or(|u| u <= self.now) {
                        let raft = n.raft.as_mut().expect("leader is up");
                        // Refused when `to` is the leader itself: nothing to do then.
                        let _ = raft.transfer_leadership(to);
                        self.process(l)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Crashes `node` at a moment it has unsynced writes (within 100 ms), which is where
    /// durability bugs hide: each time it handles an event with writes in flight it crashes
    /// with some probability, so crashes land anywhere in the unsynced window.
    fn arm_crash(&mut self, node: NodeId, down_ms: u64) {
        let n = self.nodes.get_mut(&node).expect("node");
        if n.raft.is_none() || n.crash_armed.is_some() {
            return;
        }
        let in_flight = !n.pending.is_empty();
        if in_flight && self.chance(50) {
            self.crash(node);
            self.schedule(down_ms, Event::Restart(node));
            return;
        }
        let n = self.nodes.get_mut(&node).expect("node");
        n.crash_armed = Some(down_ms);
        let incarnation = n.incarnation;
        self.schedule(100, Event::ArmedCrash { node, incarnation });
    }

    fn fire_armed_crash(&mut self, node: NodeId) {
        let n = self.nodes.get_mut(&node).expect("node");
        if let Some(down_ms) = n.crash_armed.take() {
            if n.raft.is_some() {
                self.crash(node);
                self.schedule(down_ms, Event::Restart(node));
            }
        }
    }

    fn crash(&mut self, id: NodeId) {
        self.stats.crashes += 1;
        let keep_seed = self.rng.next_u64();
        let n = self.nodes.get_mut(&id).expect("node");
        let records: Vec<Record> = n.pending.drain(..).flat_map(|b| b.records).collect();
        let keep = (keep_seed % (records.len() as u64 + 1)) as usize;
        for r in records.into_iter().take(keep) {
            n.durable.write(r);
        }
        n.raft = None;
        n.incarnation += 1;
        n.kv = Kv::default();
        n.applied = 0;
        n.proposals.clear();
        n.reads.clear();
        n.received_snapshot = None;
        n.paused_until = None;
        n.crash_armed = None;
    }

    fn start_node(&mut self, id: NodeId) {
        let config = self.config(id);
        let membership = self.membership.clone();
        let seed = self.params.seed ^ (self.nodes[&id].incarnation << 32);
        let n = self.nodes.get_mut(&id).expect("node");
        let d = &n.durable;
        let raft = if d.log.is_empty() && d.snapshot.is_none() {
            // No entry and no snapshot: the bootstrap batch (the Config entry, then the hard
            // state) never reached disk, and nothing was sent that depends on it (it precedes
            // every vote), so bootstrapping again is safe.
            assert!(
                d.hard_state == HardState::default(),
                "node {id}: durable vote without a durable log: {:?}",
                d.hard_state
            );
            Raft::bootstrap(config, membership, seed).expect("bootstrap")
        } else {
            let (snapshot, kv) = d.snapshot.clone().unwrap_or_default();
            let state = RestartState {
                hard_state: d.hard_state,
                applied: snapshot.index,
                snapshot,
                entries: d.log.clone(),
            };
            n.kv = kv;
            Raft::restart(config, state, seed).expect("restart from durable state")
        };
        n.applied = raft.applied_index();
        n.commit_seen = raft.commit_index();
        n.raft = Some(raft);
    }

    fn restart(&mut self, id: NodeId) -> Result<(), String> {
        if self.nodes[&id].raft.is_some() {
            return Ok(());
        }
        self.start_node(id);
        // A restarted node's committed entries must agree with what was committed.
        let n = &self.nodes[&id];
        let raft = n.raft.as_ref().expect("started");
        for i in raft.log().first_index()..=raft.commit_index() {
            if let (Some(e), Some(&(t, h))) = (raft.log().entry(i), self.checker.committed.get(&i))
            {
                if e.term != t || entry_hash(e) != h {
                    return Err(format!(
                        "node {id} restarted with committed entry {i} differing from the committed one"
                    ));
                }
            }
        }
        self.process(id)
    }

    // ----- the node's Ready loop -----

    fn process(&mut self, id: NodeId) -> Result<(), String> {
        loop {
            let n = self.nodes.get_mut(&id).expect("node");
            let Some(raft) = n.raft.as_mut() else {
                return Ok(());
            };
            let rd = raft.ready();
            if rd.is_empty() {
                break;
            }
            if self.trace {
                let r = self.nodes[&id].raft.as_ref().expect("up");
                eprintln!(
                    "    node {id} {} t{} commit {} ready: hs {:?} snap {:?} entries {:?} now {:?} after {:?} committed {:?}",
                    r.role().name(),
                    r.term(),
                    r.commit_index(),
                    rd.hard_state,
                    rd.snapshot.as_ref().map(|m| m.index),
                    rd.entries.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
                    rd.messages_now.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
                    rd.messages_after_persist.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
                    rd.committed.iter().map(|e| e.index).collect::<Vec<_>>()
                );
            }
            self.record_commits(id)?;
            let raft = self.nodes[&id].raft.as_ref().expect("up");
            // Log matching bookkeeping for every entry written.
            for e in &rd.entries {
                let prev_term = raft.log().term(e.index - 1).ok_or_else(|| {
                    format!("node {id}: no term for the entry before {}", e.index)
                })?;
                let content = (prev_term, entry_hash(e));
                match self.checker.entries.get(&(e.index, e.term)) {
                    Some(&known) if known != content => {
                        return Err(format!(
                            "log matching: node {id} wrote a different entry {}@{}",
                            e.index, e.term
                        ));
                    }
                    Some(_) => {}
                    None => {
                        self.checker.entries.insert((e.index, e.term), content);
                    }
                }
            }
            for m in rd.messages_now {
                self.send_raft(m);
            }
            let n = self.nodes.get_mut(&id).expect("node");
            let mut records = Vec::new();
            let mut persisted = None;
            if let Some(meta) = &rd.snapshot {
                let Some((rmeta, kv)) = n.received_snapshot.take() else {
                    return Err(format!("node {id}: snapshot to install was never received"));
                };
                if &rmeta != meta {
                    return Err(format!(
                        "node {id}: installing {meta:?} but received {rmeta:?}"
                    ));
                }
                n.kv = kv.clone();
                n.applied = meta.index;
                persisted = Some((meta.index, meta.term));
                records.push(Record::Snapshot(meta.clone(), kv));
                self.stats.snapshots_installed += 1;
            }
            if let Some(last) = rd.entries.last() {
                persisted = Some((last.index, last.term));
            }
            records.extend(rd.entries.into_iter().map(Record::Entry));
            if let Some(hs) = rd.hard_state {
                records.push(Record::HardState(hs));
            }
            if records.is_empty() && n.pending.is_empty() {
                for m in rd.messages_after_persist {
                    self.send_raft(m);
                }
            } else {
                let fsync_ms = self.rng.range(0, self.params.fsync_max_ms + 1);
                let n = self.nodes.get_mut(&id).expect("node");
                let done_at = n
                    .pending
                    .back()
                    .map_or(0, |b| b.done_at)
                    .max(self.now + fsync_ms);
                n.pending.push_back(Batch {
                    records,
                    after_persist: rd.messages_after_persist,
                    persisted,
                    done_at,
                });
                let incarnation = n.incarnation;
                self.schedule_at(
                    done_at,
                    Event::FsyncDone {
                        node: id,
                        incarnation,
                    },
                );
            }
            if !rd.committed.is_empty() {
                self.apply(id, rd.committed)?;
            }
            for rs in rd.read_states {
                let n = self.nodes.get_mut(&id).expect("node");
                if n.applied < rs.index {
                    return Err(format!(
                        "node {id}: read released at index {} before applying it ({})",
                        rs.index, n.applied
                    ));
                }
                if let Some((client, attempt, key)) = n.reads.remove(&rs.id) {
                    let value = n.kv.get(&key);
                    self.respond(client, attempt, Response::Done(OpResult::Get(value)));
                }
            }
            for rid in rd.reads_dropped {
                let n = self.nodes.get_mut(&id).expect("node");
                if let Some((client, attempt, _)) = n.reads.remove(&rid) {
                    self.respond(client, attempt, Response::Retry);
                }
            }
            for s in rd.snapshot_sends {
                let n = &self.nodes[&id];
                let incarnation = n.incarnation;
                match n.durable.snapshot.clone() {
                    Some((meta, kv)) => {
                        let msg = NetMsg::Snapshot {
                            from: id,
                            from_incarnation: incarnation,
                            to: s.to,
                            term: s.term,
                            meta,
                            kv,
                        };
                        if self.is_blocked(id, s.to) || self.chance(self.loss_pct) {
                            self.schedule(
                                50,
                                Event::SnapshotDone {
                                    node: id,
                                    incarnation,
                                    peer: s.to,
                                    ok: false,
                                },
                            );
                        } else {
                            let delay = self.rng.range(5, 5 + 2 * self.params.delay_max_ms);
                            self.schedule(delay, Event::Deliver(msg));
                        }
                    }
                    None => {
                        return Err(format!(
                            "node {id}: asked to send a snapshot it does not have"
                        ))
                    }
                }
            }
        }
        self.check_node(id)
    }

    fn apply(&mut self, id: NodeId, committed: Vec<Entry>) -> Result<(), String> {
        let mut last = 0;
        for e in committed {
            let n = self.nodes.get_mut(&id).expect("node");
            if e.index <= n.applied {
                continue;
            }
            if e.index != n.applied + 1 {
                return Err(format!(
                    "node {id}: applying {} after {} (gap)",
                    e.index, n.applied
                ));
            }
            let content = (e.term, entry_hash(&e));
            match self.checker.applied.get(&e.index) {
                Some(&known) if known != content => {
                    return Err(format!(
                        "state machine safety: node {id} applied a different entry at {}",
                        e.index
                    ))
                }
                Some(_) => {}
                None => {
                    self.checker.applied.insert(e.index, content);
                }
            }
            let n = self.nodes.get_mut(&id).expect("node");
            n.applied = e.index;
            last = e.index;
            if e.kind != EntryKind::Normal {
                continue;
            }
            let cmd: Command = codec::decode(&e.payload).map_err(|err| err.to_string())?;
            let result = n.kv.apply(&cmd);
            if let Some((term, client, attempt)) = n.proposals.remove(&e.index) {
                match result {
                    Some(r) if term == e.term => {
                        // Acknowledged: it must be committed exactly here.
                        match self.checker.committed.get(&e.index) {
                            Some(&c) if c == content => {}
                            other => {
                                return Err(format!(
                                    "acknowledging write at {} which is not committed there ({other:?})",
                                    e.index
                                ))
                            }
                        }
                        self.respond(client, attempt, Response::Done(r));
                    }
                    _ => self.respond(client, attempt, Response::Retry),
                }
            }
        }
        let n = self.nodes.get_mut(&id).expect("node");
        let raft = n.raft.as_mut().expect("applying on a live node");
        raft.applied(last);
        // Snapshot + compaction every `snapshot_every` entries, behind the catch-up margin.
        let snap_index = n.durable.snapshot.as_ref().map_or(0, |(m, _)| m.index);
        if last > 0 && last >= snap_index + self.params.snapshot_every {
            let term = raft
                .log()
                .term(last)
                .ok_or("applied entry without a term")?;
            let meta = SnapshotMeta {
                index: last,
                term,
                membership: raft.membership().clone(),
            };
            n.durable.snapshot = Some((meta, n.kv.clone()));
            let upto = last.saturating_sub(self.params.catchup_margin);
            if upto > raft.log().base_index() {
                let t = raft
                    .log()
                    .term(upto)
                    .ok_or("compaction point without a term")?;
                raft.compact(upto, t).map_err(|e| e.to_string())?;
                n.durable.log.retain(|e| e.index > upto);
            }
        }
        Ok(())
    }

    /// Records newly committed entries of node `id` (and checks them against what others
    /// committed) before any of them is applied or acknowledged.
    fn record_commits(&mut self, id: NodeId) -> Result<(), String> {
        let n = self.nodes.get_mut(&id).expect("node");
        let Some(raft) = n.raft.as_ref() else {
            return Ok(());
        };
        let commit = raft.commit_index();
        let observed_term = raft.term();
        if commit < n.commit_seen {
            return Err(format!(
                "node {id}: commit index went back from {} to {commit}",
                n.commit_seen
            ));
        }
        for i in n.commit_seen + 1..=commit {
            let content = if let Some(e) = raft.log().entry(i) {
                (e.term, entry_hash(e))
            } else if i == raft.log().base_index() {
                // Learnt through a snapshot: compare the term only.
                let t = raft.log().base_term();
                match self.checker.committed.get(&i) {
                    Some(&(ct, _)) if ct != t => {
                        return Err(format!(
                            "node {id}: snapshot at {i} has term {t}, committed {ct}"
                        ))
                    }
                    _ => continue,
                }
            } else {
                continue;
            };
            match self.checker.committed.get(&i) {
                Some(&known) if known != content => {
                    return Err(format!(
                        "node {id} committed a different entry at {i} than another node"
                    ))
                }
                Some(_) => {}
                None => {
                    self.checker.committed.insert(i, content);
                }
            }
            let ct = self.checker.commit_term.entry(i).or_insert(observed_term);
            *ct = (*ct).min(observed_term);
        }
        n.commit_seen = commit;
        self.stats.max_commit = self.stats.max_commit.max(commit);
        Ok(())
    }

    fn check_node(&mut self, id: NodeId) -> Result<(), String> {
        self.record_commits(id)?;
        self.check_roles(id)?;
        let n = &self.nodes[&id];
        if n.crash_armed.is_some() && !n.pending.is_empty() && !self.healed && self.chance(35) {
            // Crash somewhere inside the unsynced window: with writes (and the messages sent
            // ahead of them) in flight, possibly after other nodes already acted on them.
            self.fire_armed_crash(id);
        }
        Ok(())
    }

    fn check_roles(&mut self, id: NodeId) -> Result<(), String> {
        let n = self.nodes.get_mut(&id).expect("node");
        let Some(raft) = n.raft.as_ref() else {
            return Ok(());
        };
        if raft.role() == Role::Leader {
            let term = raft.term();
            match self.checker.leaders.get(&term) {
                Some(&other) if other != id => {
                    return Err(format!("two leaders in term {term}: {other} and {id}"));
                }
                Some(_) => {}
                None => {
                    self.checker.leaders.insert(term, id);
                    self.stats.elections += 1;
                    // Leader completeness: it must hold every entry committed in an earlier
                    // term (a leader of an older term may be elected late, after newer
                    // leaders committed more: it need not hold those).
                    let log = raft.log();
                    for (&i, &(t, h)) in self.checker.committed.range(log.first_index()..) {
                        if self
                            .checker
                            .commit_term
                            .get(&i)
                            .is_some_and(|&ct| ct >= term)
                        {
                            continue;
                        }
                        let ok = log
                            .entry(i)
                            .is_some_and(|e| e.term == t && entry_hash(e) == h);
                        if !ok {
                            return Err(format!(
                                "leader completeness: new leader {id} (term {term}) lacks committed entry {i}"
                            ));
                        }
                    }
                }
            }
        } else if !n.proposals.is_empty() {
            // No longer leader: tell waiting clients to retry (their write may still commit;
            // the retry is deduplicated).
            let waiting: Vec<(u64, u64)> = n.proposals.values().map(|&(_, c, a)| (c, a)).collect();
            n.proposals.clear();
            for (c, a) in waiting {
                self.respond(c, a, Response::Retry);
            }
        }
        Ok(())
    }

    // ----- clients -----

    fn handle_request(
        &mut self,
        client: u64,
        attempt: u64,
        node: NodeId,
        req: Request,
    ) -> Result<(), String> {
        let n = self.nodes.get_mut(&node).expect("node");
        let Some(raft) = n.raft.as_mut() else {
            return Ok(());
        };
        let outcome = match req {
            Request::Write { seq, key, value } => {
                let cmd = Command {
                    client,
                    seq,
                    key,
                    value,
                };
                let payload = codec::encode(&cmd).map_err(|e| e.to_string())?;
                match raft.propose(payload) {
                    Ok((index, term)) => {
                        if let Some((_, c, a)) = n.proposals.insert(index, (term, client, attempt))
                        {
                            self.respond(c, a, Response::Retry);
                        }
                        None
                    }
                    Err(e) => Some(e),
                }
            }
            Request::Read { key } => {
                let rid = n.next_read_id;
                n.next_read_id += 1;
                match raft.read_index(rid) {
                    Ok(()) => {
                        n.reads.insert(rid, (client, attempt, key));
                        None
                    }
                    Err(e) => Some(e),
                }
            }
        };
        match outcome {
            Some(RaftError::NotLeader { leader }) => {
                self.respond(client, attempt, Response::Redirect(leader))
            }
            Some(_) => self.respond(client, attempt, Response::Retry),
            None => {}
        }
        self.process(node)
    }

    fn client_next(&mut self, c: u64) {
        if self.healed || self.clients[c as usize].current.is_some() {
            return;
        }
        let key = format!("k{}", self.rng.range(0, KEYS));
        let cl_seq = self.clients[c as usize].seq + 1;
        let (kind, req) = match self.rng.range(0, 10) {
            0..=3 => {
                let v = format!("c{c}-{cl_seq}");
                (
                    OpKind::Put(v.clone()),
                    Request::Write {
                        seq: cl_seq,
                        key: key.clone(),
                        value: Some(v),
                    },
                )
            }
            4 => (
                OpKind::Delete,
                Request::Write {
                    seq: cl_seq,
                    key: key.clone(),
                    value: None,
                },
            ),
            _ => (OpKind::Get, Request::Read { key: key.clone() }),
        };
        if matches!(req, Request::Write { .. }) {
            self.clients[c as usize].seq = cl_seq;
        }
        self.history.push(Op {
            client: c,
            key,
            kind,
            call: self.clock,
            ret: None,
            effect_deadline: None,
        });
        let idx = self.history.len() - 1;
        self.clients[c as usize].current = Some((idx, req));
        self.client_send(c);
    }

    fn client_send(&mut self, c: u64) {
        let cl = &mut self.clients[c as usize];
        cl.attempt += 1;
        let (attempt, node) = (cl.attempt, cl.target);
        let Some((_, req)) = cl.current.clone() else {
            return;
        };
        self.send_client_msg(NetMsg::Request {
            client: c,
            attempt,
            node,
            req,
        });
        self.schedule(
            CLIENT_TIMEOUT_MS,
            Event::ClientTimeout { client: c, attempt },
        );
    }

    fn client_response(&mut self, c: u64, attempt: u64, resp: Response) -> Result<(), String> {
        let cl = &self.clients[c as usize];
        if cl.attempt != attempt || cl.current.is_none() {
            return Ok(());
        }
        match resp {
            Response::Done(result) => {
                let (idx, _) = self.clients[c as usize].current.take().expect("checked");
                self.history[idx].ret = Some((self.clock, result));
                self.stats.ops_ok += 1;
                let delay = self.rng.range(0, 20);
                self.schedule(delay, Event::ClientNext(c));
            }
            Response::Redirect(Some(leader)) => {
                // Follow the hint after a short pause.
                self.clients[c as usize].target = leader;
                let delay = self.rng.range(1, 10);
                self.schedule(delay, Event::ClientRetry { client: c, attempt });
            }
            Response::Redirect(None) | Response::Retry => {
                // No leader known: back off, then try a random node.
                let delay = self.rng.range(20, 60);
                self.schedule(delay, Event::ClientTimeout { client: c, attempt });
            }
        }
        Ok(())
    }

    // ----- the end -----

    fn all_done(&self) -> bool {
        if self.clients.iter().any(|c| c.current.is_some()) {
            return false;
        }
        let mut applied = None;
        let mut kv: Option<&Kv> = None;
        for n in self.nodes.values() {
            let Some(raft) = n.raft.as_ref() else {
                return false;
            };
            if n.applied != raft.commit_index() || !n.pending.is_empty() {
                return false;
            }
            match applied {
                None => applied = Some(n.applied),
                Some(a) if a != n.applied => return false,
                _ => {}
            }
            match kv {
                None => kv = Some(&n.kv),
                Some(k) if k != &n.kv => return false,
                _ => {}
            }
        }
        // Everyone applied the same index and a leader's no-op of the latest term is in it.
        self.current_leader().is_some_and(|l| {
            let r = self.nodes[&l].raft.as_ref().expect("leader is up");
            r.log().term(r.commit_index()) == Some(r.term())
        })
    }

    fn finish(self) -> Result<Stats, String> {
        // Full log matching across all nodes.
        let nodes: Vec<&Node> = self.nodes.values().collect();
        for a in &nodes {
            for b in &nodes {
                let (la, lb) = (
                    a.raft.as_ref().expect("up").log(),
                    b.raft.as_ref().expect("up").log(),
                );
                let lo = la.first_index().max(lb.first_index());
                let hi = la.last_index().min(lb.last_index());
                let mut matched = false;
                for i in (lo..=hi).rev() {
                    let (ea, eb) = (la.entry(i).expect("held"), lb.entry(i).expect("held"));
                    if matched && ea != eb {
                        return Err(format!(
                            "log matching: nodes {} and {} differ at {i}",
                            a.id, b.id
                        ));
                    }
                    if ea.term == eb.term {
                        if ea != eb {
                            return Err(format!(
                                "log matching: nodes {} and {} differ at {i}",
                                a.id, b.id
                            ));
                        }
                        matched = true;
                    }
                }
            }
        }
        let mut history = self.history;
        bound_unknown_writes(&mut history);
        linearizability::check(&history)?;
        Ok(self.stats)
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        for n in self.nodes.values() {
            match n.raft.as_ref() {
                Some(r) => s.push_str(&format!(
                    "node {}: {} term {} leader {:?} commit {} applied {} persisted {} log {}..={} pending batches {}\n",
                    n.id,
                    r.role().name(),
                    r.term(),
                    r.leader(),
                    r.commit_index(),
                    n.applied,
                    r.persisted_index(),
                    r.log().first_index(),
                    r.log().last_index(),
                    n.pending.len()
                )),
                None => s.push_str(&format!("node {}: down\n", n.id)),
            }
        }
        for c in &self.clients {
            s.push_str(&format!(
                "client {}: target {} attempt {} current {:?}\n",
                c.id, c.target, c.attempt, c.current
            ));
        }
        s
    }
}
