//! A deterministic, fault-injecting simulator of a raftkv cluster that runs the **production
//! node runtime** — the consensus step (`node::consensus`), the storage worker (group commit,
//! hard-state planning, compaction, snapshot receive and install over `NodeStorage`) and the
//! apply worker (batch merging, answering writes, the install rendezvous) — with the simulator
//! as their shell: a simulated clock, network and disk (`SimFs` for the WAL and snapshot
//! files; sled on a real temp dir), with safety checks after every step, a liveness check
//! after healing, and a linearizability check of the client history.
//!
//! Everything is driven by one seeded generator and one event queue ordered by (simulated
//! millisecond, sequence number), so a seed replays exactly. What the simulator decides:
//! - when each worker runs: a node's storage worker takes everything queued as one group after
//!   a seeded fsync delay (a slow disk); its apply worker runs shortly after entries arrive;
//! - crashes: a process dies with everything in its queues; the disk loses what was not
//!   synced. With storage work queued, the crash is a power cut at one of the next group's
//!   syncs (`SimFs::cut_power_at_sync`): a torn prefix of that group survives. sled is not on
//!   the simulated disk and survives a crash whole (as if it had flushed). Restarts run the
//!   real recovery (`NodeStorage::open_with`, `consensus::open_core`). Pauses freeze a node's
//!   events (including its workers) longer than an election timeout;
//! - the network: seeded loss (0–30 %), duplication, random delay (hence reordering) for Raft
//!   messages; snapshot chunks ride an ordered stream per link (as on TCP) that a partition
//!   or a dropped connection breaks as a whole (the sender is told); symmetric and one-way
//!   partitions, an isolated leader. Each node's transport follows its `Outputs::peers`, as
//!   the driver's `set_peers` does: a message leaves only to a peer in the sender's set and is
//!   accepted only from a peer in the receiver's (the listener refuses non-members);
//! - membership changes (three quarters of the seeds; `membership.rs`): ids beyond the
//!   initial voters start not running; an operator adds learners and voters, promotes,
//!   removes voters (the leader too) and learners, several at once in one joint change, now
//!   and then with `force` or crashing the leader in the middle, through
//!   `Request::ChangeMembership`; new members start with an empty data dir
//!   (`Start::Join`), removed ones are stopped some time after their removal or left running;
//!   faults and clients drawn for ids 1..=nodes fall on whoever is in service then;
//! - byzantine-lite (a quarter of the seeds, for a window that ends before healing): more
//!   duplicates, and corrupted-but-well-formed frames on real links: fields set out of range
//!   and random byte mutations with the frame checksum recomputed. They go through the real
//!   frame decoder and then into the node's consensus step, which validates before anything
//!   else. A mutation that validates as a plausible message is not injected (a peer that
//!   sends plausible lies is a real Byzantine peer, which peer authentication keeps out);
//! - clients (`client.rs`): plain reads, puts and deletes, conditional puts, multi-key
//!   transactions and prefix deletes through any node, following leader hints; most writes
//!   ride a client session and are retried with the same (client, seq) until a definite
//!   answer; a plain write that got no answer, or a 504, has an unknown outcome and is not
//!   retried; a 503 or a redirect is retried. Now and then the leader gets an
//!   `ExpireSessions` entry (a small table bound in a quarter of the seeds);
//! - leases (`leases.rs`): clients also grant leases of 1–4 s, put keys `l/…` under them,
//!   keep most alive through the leader (a ReadIndex round through the node's read path, then
//!   the node's production `Lessor`), let others lapse and revoke some; every node runs the
//!   production lessor's upkeep every `LEASE_TICK_MS` of simulated time, fed with its
//!   leadership and lease table, and proposes the revokes it says are due;
//! - watchers (`watchers.rs`): a few per seed, on a key or a prefix, each following the
//!   production `WatchStream` on a random node, stepped at seeded moments, resuming on
//!   another node (mid-revision too) when its node stops, its stream is cancelled as too slow
//!   (a small buffer bound in a quarter of the seeds), or at random; a quarter of the seeds
//!   keep a short watch history, so late resumes are refused as compacted;
//!
//! Checked after every step: at most one leader per term, whatever the configuration (nodes
//! added later included); log matching (every (index, term) ever written names one entry with
//! one predecessor term); leader completeness; commit index never decreases per incarnation
//! and never contradicts what was committed; an entry, when first seen committed, is durable
//! on a quorum of the configuration its committer had in effect (a majority of each half of a
//! joint one) — and still is when any node applies it or acknowledges it as a write; every
//! node applies the same entry at an index; a read is answered only once its index is
//! applied; a node campaigns only as a voter of its newest or its committed configuration,
//! never leads as a learner, stops leading once its log commits its removal, and a node
//! removed by a committed configuration never wins an election. After the run: heal, require
//! liveness (every member of the final leader's configuration up, caught up, with the same
//! state machine — but for members the transport strands, see `MemberStats::stranded`),
//! compare all logs, check every member's final records and session table against a
//! reference state machine that applied the committed log once, check exactly-once (no
//! client write took effect twice, every answer is its one effect's) and linearizability of
//! the client history with compare-and-swap and transactions (see `client.rs`; leased keys
//! are a key space of their own, kept out of it). Watches and leases (issue 12): every event
//! a stream sends is of a revision its node applied and progress never goes back; after a
//! final catch-up, each watcher's event sequence equals the committed history for its filter
//! from its start to where it stopped — same values, revisions and versions, no gap,
//! duplicate or reorder — across crashes, leader changes and snapshot installs, and a start
//! refused as compacted was really older than the node's retained history (`watchers.rs`);
//! every expiry revoke an upkeep proposed that took effect was proposed a full TTL after the
//! lease was last known alive (the grant's or the last acknowledged keepalive's send time), a
//! revoke deletes exactly its lease's keys at one revision, every node ends with the log's
//! lease table and leased keys, and liveness after healing includes every lease expiring
//! (`leases.rs`).

use super::linearizability;
use client::{Client, ClientOp, Effects, Request, Response};
use leases::{LeaseBook, WaitingKeepalive};
pub use membership::MemberStats;
use membership::{MemberAction, WaitingChange};
use raftkv::api::ServiceError;
use raftkv::metrics::Metrics;
use raftkv::node::apply::{ApplyWork, ApplyWorker, Pending};
use raftkv::node::consensus::{self, Consensus, NodeInfo};
use raftkv::node::lessor::Lessor;
use raftkv::node::messages::{
    ApplyJob, Input, Outputs, ProposalOutcome, Request as NodeRequest, StorageEvent, StorageJob,
};
use raftkv::node::peer::{self, PeerMessage};
use raftkv::node::storage_worker::{Progress, StorageOutput, StorageWorker, GROUP_JOBS_MAX};
use raftkv::raft::limits::{INDEX_MAX, TERM_MAX};
use raftkv::raft::rng::Rng;
use raftkv::raft::{Config, Message, MessageBody, Role};
use raftkv::storage::command::CommandResult;
use raftkv::storage::node_storage::{NodeStorage, NodeStorageOptions};
use raftkv::storage::sm::{StateMachine, StateMachineOptions};
use raftkv::storage::snapshot::transfer::ChunkSource;
use raftkv::storage::snapshot::SnapshotStore;
use raftkv::storage::vfs::{SimFs, Vfs};
use raftkv::storage::wal::WalOptions;
use raftkv::storage::{Entry, EntryKind, Membership, NodeId};
use raftkv::transport::frame;
use raftkv::watch::{WatchHub, WatchSettings};
use std::cmp::Reverse;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::oneshot;
use watchers::Watcher;

const TICK_MS: u64 = 10;

/// On lease seeds each node's clock (and so its ticks) runs up to this far from the true rate,
/// either way: two nodes' rates then differ by at most 1.04 / 0.96 ≈ 8.3 %, inside the 10 %
/// lease reads allow (`raft::config::CLOCK_DRIFT_PERCENT_MAX`), leaving a margin for the
/// clocks' whole-millisecond readings.
const CLOCK_DRIFT_PPM_MAX: i64 = 40_000;
const CLIENT_TIMEOUT_MS: u64 = 600;
const KEYS: u64 = 5;
const MAX_DEFERRED_EVENTS: usize = 100_000;
/// The peer transport's default frame limit.
const FRAME_BYTES_MAX: u32 = 16 << 20;

#[path = "client.rs"]
mod client;
#[path = "leases.rs"]
mod leases;
#[path = "membership.rs"]
mod membership;
#[path = "watchers.rs"]
mod watchers;

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
    /// Freeze whoever leads at that moment for `ms` (lease seeds: the others elect a leader
    /// and write meanwhile, and reads wait at the frozen one for it to wake).
    PauseLeader { ms: u64 },
    /// Ask whoever leads at that moment to hand leadership to `to`.
    TransferLeader { to: NodeId },
    /// Crash whoever leads at that moment (at its next unsynced write), for `down_ms`.
    CrashLeader { down_ms: u64 },
    /// An operator's membership change, resolved against the leader's configuration then.
    Member(MemberAction),
}

/// Everything a seed decides before the run.
#[derive(Clone, Debug)]
pub struct Params {
    pub seed: u64,
    /// The initial voters, ids 1..=nodes.
    pub nodes: u64,
    /// Ids nodes+1..=nodes+spares start not running; a membership change adds them.
    pub spares: u64,
    pub clients: u64,
    pub loss_pct: u64,
    pub dup_pct: u64,
    pub delay_max_ms: u64,
    pub fsync_max_ms: u64,
    pub snapshot_every: u64,
    pub catchup_margin: u64,
    /// WAL segment size (small: rotation and purging happen often).
    pub segment_bytes: u64,
    /// Snapshot chunk size on the wire.
    pub chunk_bytes: usize,
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub append_bytes_max: u64,
    pub inflight_msgs_max: usize,
    /// Lease reads (only with check-quorum). Their seeds keep their pauses, and every node's
    /// clock and ticks run at its own rate, within `CLOCK_DRIFT_PPM_MAX` of the true one.
    pub lease_reads: bool,
    pub run_ms: u64,
    pub faults: Vec<(u64, Fault)>,
    /// The byzantine-lite window, if this seed has one.
    pub byzantine: Option<Byzantine>,
    /// The session table bound the sim's `ExpireSessions` entries set: a few sessions in a
    /// quarter of the seeds (evictions), else plenty.
    pub sessions_max: u64,
    /// Watch history kept by every node: short in a quarter of the seeds (watchers that
    /// resume late are refused as compacted), else the default.
    pub watch_history_revisions: u64,
    /// A watcher's queue bound on a node: small in a quarter of the seeds (watchers that
    /// fall behind are cancelled and resume), else the default.
    pub watcher_buffer_bytes: usize,
    /// Applied log payloads each core keeps in memory: tiny in half the seeds (followers that
    /// fall a few entries behind are sent entries read back from the WAL), else the default.
    pub log_cache_bytes: u64,
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
        let append_bytes_max = [1, 64, 512, 4096][rng.range(0, 4) as usize];
        let inflight_msgs_max = rng.range(1, 9) as usize;
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
            // Half the pauses freeze the leader, a lease's hardest case, for 700–1049 ms: long
            // enough for its clients to give up on it (`CLIENT_TIMEOUT_MS`) and write through
            // the leader the others elect, short enough that reads sent to the frozen node
            // after those writes are still awaited when it wakes. Chosen by the pause's
            // length, so no draw moves the rest of the schedule.
            for (_, f) in faults.iter_mut() {
                if let Fault::Pause { ms, .. } = *f {
                    if ms.is_multiple_of(2) {
                        *f = Fault::PauseLeader { ms: 700 + ms % 350 };
                    }
                }
            }
        }
        let byzantine = Byzantine::from_seed(seed, run_ms);
        let (spares, member_faults) = membership::schedule(seed, run_ms);
        faults.extend(member_faults);
        // Drawn from their own generator, so the rest of a seed's schedule does not move.
        let mut sizes = Rng::new(seed ^ 0x5EC5_10E5);
        let segment_bytes = [16 << 10, 64 << 10, 1 << 20][sizes.range(0, 3) as usize];
        let chunk_bytes = [97, 512, 4096][sizes.range(0, 3) as usize];
        let mut sessions = Rng::new(seed ^ 0x5E55_1095);
        let sessions_max = match sessions.range(0, 4) {
            0 => sessions.range(2, 6),
            _ => 1000,
        };
        let mut watch = Rng::new(seed ^ 0x3A7C_4E11);
        let watch_history_revisions = match watch.range(0, 4) {
            0 => watch.range(20, 400),
            _ => raftkv::storage::sm::history::HISTORY_REVISIONS_DEFAULT,
        };
        let watcher_buffer_bytes = match watch.range(0, 4) {
            0 => watch.range(300, 3000) as usize,
            _ => WatchSettings::default().watcher_buffer_bytes_max,
        };
        let mut cache = Rng::new(seed ^ 0x10C4_CAC8);
        let log_cache_bytes = match cache.range(0, 2) {
            0 => cache.range(1, 2048),
            _ => Config::new(1).log_cache_bytes_max,
        };
        faults.sort_by_key(|(at, _)| *at);
        Params {
            seed,
            nodes,
            spares,
            clients: 3,
            loss_pct,
            dup_pct,
            delay_max_ms,
            fsync_max_ms,
            snapshot_every,
            catchup_margin,
            segment_bytes,
            chunk_bytes,
            pre_vote,
            check_quorum,
            append_bytes_max,
            inflight_msgs_max,
            lease_reads,
            run_ms,
            faults,
            byzantine,
            sessions_max,
            watch_history_revisions,
            watcher_buffer_bytes,
            log_cache_bytes,
        }
    }
}

impl fmt::Display for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {}: {} nodes (+{} spare), {} clients, loss {}%, dup {}%, delay 1..={} ms, fsync 0..={} ms, \
             snapshot every {} (margin {}), segment {} B, chunk {} B, pre_vote {}, check_quorum {}, append_bytes_max {}, \
             inflight_msgs_max {}, lease_reads {}, sessions_max {}, watch history {} revisions, \
             watcher buffer {} B, log cache {} B, run {} ms",
            self.seed,
            self.nodes,
            self.spares,
            self.clients,
            self.loss_pct,
            self.dup_pct,
            self.delay_max_ms,
            self.fsync_max_ms,
            self.snapshot_every,
            self.catchup_margin,
            self.segment_bytes,
            self.chunk_bytes,
            self.pre_vote,
            self.check_quorum,
            self.append_bytes_max,
            self.inflight_msgs_max,
            self.lease_reads,
            self.sessions_max,
            self.watch_history_revisions,
            self.watcher_buffer_bytes,
            self.log_cache_bytes,
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
enum NetMsg {
    /// A peer message on the link `from` → `to` (Raft or a snapshot chunk).
    Peer {
        from: NodeId,
        to: NodeId,
        message: PeerMessage,
    },
    /// An encoded frame on the link `from` → `to` (byzantine-lite injections).
    Frame {
        from: NodeId,
        to: NodeId,
        bytes: Vec<u8>,
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

/// A node's three workers, as separately scheduled simulated activities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Worker {
    Storage,
    Apply,
}

#[derive(Clone, Debug)]
enum Event {
    Tick(NodeId),
    Deliver(NetMsg),
    /// A node's storage or apply worker takes what is queued.
    Run {
        node: NodeId,
        incarnation: u64,
        worker: Worker,
    },
    /// The next chunk of a snapshot stream from `node` to `peer`.
    Chunk {
        node: NodeId,
        incarnation: u64,
        peer: NodeId,
    },
    Fault(usize),
    Unblock(Vec<(NodeId, NodeId)>),
    Restart(NodeId),
    /// An armed crash that found no storage work in time: crash now.
    ArmedCrash {
        node: NodeId,
        incarnation: u64,
    },
    Heal,
    /// A removed node is stopped for good.
    Retire(NodeId),
    /// The node a membership change went to crashes (if still that incarnation).
    CrashMidChange {
        node: NodeId,
        incarnation: u64,
        down_ms: u64,
    },
    /// The operator's periodic look: members of the cluster's configuration that never ran
    /// start with an empty data dir (`Start::Join`).
    Operator,
    ClientNext(u64),
    /// The leader's session upkeep: an `ExpireSessions` entry.
    ExpireSessions,
    ClientTimeout {
        client: u64,
        attempt: u64,
    },
    /// Re-send the current attempt's request to the client's (new) target.
    ClientRetry {
        client: u64,
        attempt: u64,
    },
    /// A watcher reads its stream (or opens one).
    WatchStep(usize),
    /// A node's lease upkeep (every `LEASE_TICK_MS` while that incarnation runs).
    LeaseUpkeep {
        node: NodeId,
        incarnation: u64,
    },
}

impl Event {
    /// The node this event happens on, if any (used to defer events of paused nodes).
    fn node(&self) -> Option<NodeId> {
        match self {
            Event::Deliver(NetMsg::Peer { to, .. }) => Some(*to),
            Event::Deliver(NetMsg::Frame { to, .. }) => Some(*to),
            Event::Deliver(NetMsg::Request { node, .. }) => Some(*node),
            Event::Run { node, .. } | Event::Chunk { node, .. } => Some(*node),
            Event::LeaseUpkeep { node, .. } => Some(*node),
            _ => None,
        }
    }
}

/// A write waiting for its answer from a node.
struct WaitingWrite {
    client: u64,
    attempt: u64,
    hash: u64,
    session: Option<(String, u64)>,
    rx: oneshot::Receiver<Result<ProposalOutcome, ServiceError>>,
}

/// A read waiting for its barrier from a node.
struct WaitingRead {
    client: u64,
    attempt: u64,
    key: String,
    rx: oneshot::Receiver<Result<(u64, NodeId), ServiceError>>,
}

/// The entry at `index` of a node's log: from the core's memory, or, when the core evicted
/// its payload (it is applied, so durable and final), read back from the node's WAL as the
/// node does for a follower.
fn log_entry(live: &Live, index: u64) -> Option<Entry> {
    let log = live.consensus.raft().log();
    if let Some(e) = log.entry(index) {
        return Some(e.clone());
    }
    if index > log.base_index() && index < log.held_from() {
        return live.storage.storage().wal().entry(index).ok();
    }
    None
}

/// A running incarnation of a node: the production runtime's three parts and the queues
/// between them (the simulator is the shell).
struct Live {
    consensus: Consensus,
    storage: StorageWorker,
    apply: ApplyWorker,
    /// The node's watchers, fed by its apply worker.
    hub: Arc<WatchHub>,
    sm: Arc<StateMachine>,
    snapshots: Arc<SnapshotStore>,
    storage_jobs: VecDeque<StorageJob>,
    storage_scheduled: bool,
    /// The storage worker stopped at an install and waits for the apply worker.
    storage_at_install: bool,
    /// Entries of the group being written (durable once the run returns).
    apply_jobs: VecDeque<ApplyJob>,
    apply_scheduled: bool,
    /// The apply worker is at the install of this index and waits for the storage worker.
    apply_at_install: Option<u64>,
    streams: BTreeMap<NodeId, ChunkSource>,
    writes: Vec<WaitingWrite>,
    reads: Vec<WaitingRead>,
    changes: Vec<WaitingChange>,
    /// The node's lessor (its service's: lost with the process).
    lessor: Lessor,
    keepalives: Vec<WaitingKeepalive>,
}

struct Node {
    id: NodeId,
    incarnation: u64,
    fs: SimFs,
    /// sled's directory (real disk; sled is not on the `Vfs`). It survives crashes whole.
    sm_dir: tempfile::TempDir,
    live: Option<Live>,
    paused_until: Option<u64>,
    commit_seen: u64,
    /// A crash waiting for the node to have storage work (its down time in ms).
    crash_armed: Option<u64>,
    /// A power cut is armed in `fs` for the next group; restart after this many ms.
    power_cut_down_ms: Option<u64>,
    /// `None` for an initial voter (it bootstraps); else the configuration it joined with (a
    /// restart while its data dir is still fresh joins again, never bootstraps).
    joined: Option<Membership>,
    /// Started at least once (spare ids start unstarted).
    started: bool,
    /// Stopped for good after its removal completed.
    retired: bool,
    /// The peers its transport connects to and accepts connections from: the flags at start,
    /// then each `Outputs::peers`. A message leaves only to, and arrives only from, these.
    peers: BTreeSet<NodeId>,
    /// Role, term and configuration index last traced (`RAFTKV_SIM_TRACE`).
    traced: Option<(Role, u64, u64)>,
    /// How far this node's clock runs from the simulation's, in parts per million.
    clock_ppm: i64,
    /// `lease_reads_served` of the running core when last looked at.
    lease_reads_seen: u64,
    /// Ticks scheduled so far, and the simulated time of tick 0: tick k comes when the node's
    /// clock has moved on `k × TICK_MS` (so a fast clock ticks more often).
    ticks_scheduled: u64,
    tick_origin_ms: u64,
}

impl Node {
    /// A node that never ran, with an empty disk.
    fn new(id: NodeId) -> Node {
        Node {
            id,
            incarnation: 0,
            fs: SimFs::new(),
            sm_dir: tempfile::tempdir().expect("a temp dir for sled"),
            live: None,
            paused_until: None,
            commit_seen: 0,
            crash_armed: None,
            power_cut_down_ms: None,
            joined: None,
            started: false,
            retired: false,
            peers: BTreeSet::new(),
            traced: None,
            clock_ppm: 0,
            lease_reads_seen: 0,
            ticks_scheduled: 0,
            tick_origin_ms: 0,
        }
    }

    /// This node's clock reading at simulated time `now_ms`: monotonic, drifting by
    /// `clock_ppm`.
    fn clock_ms(&self, now_ms: u64) -> u64 {
        let drift = i128::from(now_ms) * i128::from(self.clock_ppm) / 1_000_000;
        let clock_ms = i128::from(now_ms) + drift;
        debug_assert!(clock_ms >= 0 && self.clock_ppm.abs() < 1_000_000);
        u64::try_from(clock_ms).expect("a clock reading")
    }

    /// The simulated time of this node's next tick (the first at or after `now_ms`).
    fn next_tick_ms(&mut self, now_ms: u64) -> u64 {
        loop {
            self.ticks_scheduled += 1;
            // Tick k when the node's clock has moved k × TICK_MS: rounded up, never early.
            let clock_ms = i128::from(self.ticks_scheduled * TICK_MS) * 1_000_000;
            let rate = 1_000_000 + i128::from(self.clock_ppm);
            let after_ms = u64::try_from((clock_ms + rate - 1) / rate).expect("tick time");
            let at_ms = self.tick_origin_ms + after_ms;
            if at_ms >= now_ms {
                return at_ms;
            }
        }
    }

    /// Started and not retired: faults, clients and healing deal with it.
    fn in_service(&self) -> bool {
        self.started && !self.retired
    }
}

/// Safety bookkeeping across the whole run.
#[derive(Default)]
struct Checker {
    leaders: BTreeMap<u64, NodeId>,
    /// (index, term) → (predecessor's term, content hash).
    entries: HashMap<(u64, u64), (u64, u64)>,
    /// index → (term, content hash) of committed entries, as learnt from any node.
    committed: BTreeMap<u64, (u64, u64)>,
    /// index → the lowest term in which any node saw it committed.
    commit_term: BTreeMap<u64, u64>,
    /// index → (term, content hash) of applied entries.
    applied: BTreeMap<u64, (u64, u64)>,
    /// Per node: the entries its disk holds durably (index → term), and the snapshot index
    /// below which everything it holds is committed state.
    durable: BTreeMap<NodeId, (u64, BTreeMap<u64, u64>)>,
    /// Committed configurations, by the index of their Config entry.
    configs: BTreeMap<u64, Membership>,
    /// Members a committed configuration removed → the index of that configuration.
    removed_at: BTreeMap<NodeId, u64>,
    /// The configurations committing nodes had in effect (consecutive duplicates merged), and
    /// per committed index the one it was committed under.
    quorum_configs: Vec<Membership>,
    commit_config: BTreeMap<u64, usize>,
}

impl Checker {
    /// Whether `id` holds (index, term) durably (in its WAL, or under a snapshot).
    fn holds_durably(&self, id: NodeId, index: u64, term: u64) -> bool {
        self.durable
            .get(&id)
            .is_some_and(|(base, log)| index <= *base || log.get(&index) == Some(&term))
    }

    /// Nodes holding (index, term) durably, sorted (for messages).
    fn durable_holders(&self, index: u64, term: u64) -> Vec<NodeId> {
        let ids = self.durable.keys().copied();
        ids.filter(|&id| self.holds_durably(id, index, term))
            .collect()
    }

    /// Checks that committed entry `index`@`term` is durable on a quorum of the configuration
    /// it was committed under (a majority of each half of a joint one). `what` says who relies
    /// on it. The bootstrap configuration (1@1) is committed by construction on every node.
    fn check_durable_quorum(&self, index: u64, term: u64, what: &str) -> Result<(), String> {
        if (index, term) == (1, 1) {
            return Ok(());
        }
        let Some(&k) = self.commit_config.get(&index) else {
            return Err(format!(
                "{what}: entry {index}@{term} has no committing configuration"
            ));
        };
        let config = &self.quorum_configs[k];
        if config.is_quorum(|id| self.holds_durably(id, index, term)) {
            return Ok(());
        }
        Err(format!(
            "{what}: entry {index}@{term} is durable on {:?}, not a quorum of the configuration it \
             was committed under (voters {:?}, outgoing {:?})",
            self.durable_holders(index, term),
            config.voters,
            config.voters_outgoing
        ))
    }
}

fn payload_hash(kind: EntryKind, payload: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    (kind as u8).hash(&mut h);
    payload.hash(&mut h);
    h.finish()
}

fn entry_hash(e: &Entry) -> u64 {
    payload_hash(e.kind, &e.payload)
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
    /// Per link: when the last snapshot chunk is delivered (chunks ride one ordered stream).
    chunk_link_free_at: BTreeMap<(NodeId, NodeId), u64>,
    loss_pct: u64,
    dup_pct: u64,
    healed: bool,
    history: Vec<ClientOp>,
    /// The committed log through a reference state machine, and what clients were told.
    effects: Effects,
    checker: Checker,
    membership: Membership,
    /// Spare ids no change has added yet (or only changes that certainly had no effect).
    spares_unused: BTreeSet<NodeId>,
    deferred: usize,
    trace: bool,
    /// Runs the transport's (async) frame decoder on byzantine-lite frames.
    runtime: tokio::runtime::Runtime,
    watchers: Vec<Watcher>,
    /// Lease request send times and upkeep proposals, for the lease checks.
    leases: LeaseBook,
    pub stats: Stats,
}

fn describe_event(ev: &Event) -> String {
    match ev {
        Event::Deliver(NetMsg::Peer {
            message: PeerMessage::Raft(m),
            ..
        }) => format!("deliver {m}"),
        Event::Deliver(NetMsg::Peer {
            from,
            to,
            message: PeerMessage::SnapshotChunk(c),
        }) => format!(
            "deliver snapshot chunk {from}->{to} {} at {}/{}",
            c.file_name, c.offset, c.total_bytes
        ),
        Event::Deliver(NetMsg::Frame { from, to, bytes }) => {
            format!(
                "deliver corrupted frame {from}->{to} ({} bytes)",
                bytes.len()
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
    /// Crashes inside a storage group (a power cut at one of its syncs).
    pub power_cuts: u64,
    pub snapshots_installed: u64,
    pub compactions: u64,
    pub max_commit: u64,
    /// Byzantine-lite: corrupted frames delivered and refused by the real decoder.
    pub frames_undecodable: u64,
    /// ... and delivered, decoded and refused by `node::peer::validate`.
    pub frames_refused: u64,
    /// ... and not injected because they validated as plausible messages.
    pub frames_plausible_skipped: u64,
    /// Membership changes asked for, and what came of them.
    pub member: MemberStats,
    /// Client writes carried in a session, and their retries after an unknown outcome.
    pub writes_sessioned: u64,
    pub sessioned_retries: u64,
    /// Answers to sessioned writes that came from the session table (a retry of a write
    /// that had applied).
    pub duplicates: u64,
    /// Entries of the committed log answered from the session table.
    pub duplicates_in_log: u64,
    /// Sessions evicted or expired, and client writes refused `SessionExpired`.
    pub evictions: u64,
    pub session_expired: u64,
    /// Conditional puts that succeeded and failed; multi-key transactions likewise.
    pub cas_ok: u64,
    pub cas_failed: u64,
    pub txns_ok: u64,
    pub txns_failed: u64,
    pub prefix_deletes: u64,
    /// Watch events taken by watchers (each checked against the log at the end), streams
    /// resumed on a node, starts refused as compacted, streams cancelled as too slow.
    pub watch_events: u64,
    pub watch_resumes: u64,
    pub watch_compacted: u64,
    pub watch_too_slow: u64,
    /// Leases granted, expired (revoked by an upkeep), revoked by a client, kept alive (at
    /// least one keepalive acknowledged); keepalives acknowledged; revokes an upkeep proposed;
    /// lease writes refused (`LeaseNotFound`, `LeasesFull`).
    pub leases_granted: u64,
    pub leases_expired: u64,
    pub leases_revoked: u64,
    pub leases_kept_alive: u64,
    pub keepalive_acks: u64,
    pub lease_revokes_proposed: u64,
    pub lease_refusals: u64,
    /// Reads served from a leader's lease (lease seeds), and pauses on lease seeds.
    pub lease_reads_served: u64,
    pub lease_seed_pauses: u64,
    /// Appends filled from the WAL (the core had evicted their entries), and those dropped
    /// because compaction had purged them meanwhile.
    pub log_reads: u64,
    pub log_reads_failed: u64,
}

impl Stats {
    /// Adds `other`'s counters to these (`max_commit` takes the larger).
    pub fn add(&mut self, other: &Stats) {
        self.events += other.events;
        self.ops_ok += other.ops_ok;
        self.ops_unknown += other.ops_unknown;
        self.elections += other.elections;
        self.crashes += other.crashes;
        self.power_cuts += other.power_cuts;
        self.snapshots_installed += other.snapshots_installed;
        self.compactions += other.compactions;
        self.max_commit = self.max_commit.max(other.max_commit);
        self.frames_undecodable += other.frames_undecodable;
        self.frames_refused += other.frames_refused;
        self.frames_plausible_skipped += other.frames_plausible_skipped;
        self.member.add(&other.member);
        self.writes_sessioned += other.writes_sessioned;
        self.sessioned_retries += other.sessioned_retries;
        self.duplicates += other.duplicates;
        self.duplicates_in_log += other.duplicates_in_log;
        self.evictions += other.evictions;
        self.session_expired += other.session_expired;
        self.cas_ok += other.cas_ok;
        self.cas_failed += other.cas_failed;
        self.txns_ok += other.txns_ok;
        self.txns_failed += other.txns_failed;
        self.prefix_deletes += other.prefix_deletes;
        self.watch_events += other.watch_events;
        self.watch_resumes += other.watch_resumes;
        self.watch_compacted += other.watch_compacted;
        self.watch_too_slow += other.watch_too_slow;
        self.leases_granted += other.leases_granted;
        self.leases_expired += other.leases_expired;
        self.leases_revoked += other.leases_revoked;
        self.leases_kept_alive += other.leases_kept_alive;
        self.keepalive_acks += other.keepalive_acks;
        self.lease_revokes_proposed += other.lease_revokes_proposed;
        self.lease_refusals += other.lease_refusals;
        self.lease_reads_served += other.lease_reads_served;
        self.log_reads += other.log_reads;
        self.log_reads_failed += other.log_reads_failed;
        self.lease_seed_pauses += other.lease_seed_pauses;
    }
}

impl Sim {
    pub fn new(params: Params) -> Sim {
        let membership = Membership::with_voters(1..=params.nodes);
        let spares_unused = (params.nodes + 1..=params.nodes + params.spares).collect();
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
            chunk_link_free_at: BTreeMap::new(),
            healed: false,
            history: Vec::new(),
            effects: Effects::new(),
            checker: Checker::default(),
            membership,
            spares_unused,
            deferred: 0,
            trace: std::env::var("RAFTKV_SIM_TRACE").is_ok(),
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a current-thread runtime"),
            watchers: Vec::new(),
            leases: LeaseBook::default(),
            stats: Stats::default(),
        };
        if sim.trace {
            eprint!("{}", sim.params);
        }
        for id in 1..=sim.params.nodes + sim.params.spares {
            let mut node = Node::new(id);
            if sim.params.lease_reads {
                // Drawn from their own generator, so the rest of the schedule does not move.
                let mut drift = Rng::new(sim.params.seed ^ 0xC10C_D41F ^ id);
                let span = drift.range(0, 2 * CLOCK_DRIFT_PPM_MAX as u64 + 1) as i64;
                node.clock_ppm = span - CLOCK_DRIFT_PPM_MAX;
            }
            sim.nodes.insert(id, node);
        }
        for id in 1..=sim.params.nodes {
            sim.first_start(id).expect("a fresh node starts");
        }
        if sim.params.spares > 0 {
            sim.schedule(membership::OPERATOR_EVERY_MS, Event::Operator);
        }
        for c in 0..sim.params.clients {
            let target = sim.rng.range(1, sim.params.nodes + 1);
            sim.clients.push(Client::new(c, target));
            let at = sim.rng.range(0, 300);
            sim.schedule(at, Event::ClientNext(c));
        }
        sim.add_watchers();
        for k in 0..sim.params.faults.len() {
            let at = sim.params.faults[k].0;
            sim.schedule(at, Event::Fault(k));
        }
        let run_ms = sim.params.run_ms;
        sim.schedule(run_ms, Event::Heal);
        let first_upkeep_ms = sim.rng.range(500, 3000);
        sim.schedule(first_upkeep_ms, Event::ExpireSessions);
        sim
    }

    fn config(&self, id: NodeId) -> Config {
        let mut c = Config::new(id);
        c.heartbeat_ticks = 2;
        c.election_timeout_min_ticks = 10;
        c.election_timeout_max_ticks = 20;
        c.pre_vote = self.params.pre_vote;
        c.check_quorum = self.params.check_quorum;
        c.append_bytes_max = self.params.append_bytes_max;
        c.inflight_msgs_max = self.params.inflight_msgs_max;
        c.lease_reads = self.params.lease_reads;
        c.lease_ms = Config::lease_ms_for(TICK_MS, c.election_timeout_min_ticks);
        c.inflight_bytes_max = 4096;
        c.uncommitted_bytes_max = 64 << 10;
        c.apply_bytes_max = 1024;
        c.pending_reads_max = 64;
        c.log_cache_bytes_max = self.params.log_cache_bytes;
        c
    }

    fn storage_options(&self) -> NodeStorageOptions {
        NodeStorageOptions {
            snapshot_every: self.params.snapshot_every,
            catchup_margin: self.params.catchup_margin,
            wal: WalOptions {
                segment_bytes_max: self.params.segment_bytes,
                preallocate: false,
                prepare_ahead: false,
                ..WalOptions::default()
            },
            sm: StateMachineOptions {
                flush_every_ms: None,
                cache_bytes: 1 << 20,
                watch_history_revisions: self.params.watch_history_revisions,
                ..StateMachineOptions::default()
            },
            ..NodeStorageOptions::default()
        }
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

    fn live(&mut self, id: NodeId) -> Option<&mut Live> {
        self.nodes.get_mut(&id).and_then(|n| n.live.as_mut())
    }

    /// The running incarnation of a node known to be up.
    fn live_ref(&self, id: NodeId) -> &Live {
        self.nodes[&id].live.as_ref().expect("the node is up")
    }

    fn incarnation(&self, id: NodeId) -> u64 {
        self.nodes[&id].incarnation
    }

    /// Starts a node for the first time (an initial voter, or a member that joins) and its
    /// clock.
    fn first_start(&mut self, id: NodeId) -> Result<(), String> {
        self.nodes.get_mut(&id).expect("node").started = true;
        self.start_node(id)?;
        let phase = self.rng.range(0, TICK_MS);
        let node = self.nodes.get_mut(&id).expect("node");
        node.tick_origin_ms = self.now + phase + 1;
        node.ticks_scheduled = 0;
        self.schedule_at(self.now + phase + 1, Event::Tick(id));
        Ok(())
    }

    /// A node in service, uniformly (there is always one: the last voter is never removed,
    /// and only removed nodes retire).
    fn random_node(&mut self) -> NodeId {
        let ids: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| n.in_service())
            .map(|n| n.id)
            .collect();
        assert!(!ids.is_empty(), "no node in service");
        ids[self.rng.range(0, ids.len() as u64) as usize]
    }

    /// `id` if it is in service, else a random node that is (faults drawn before the run
    /// name ids 1..=nodes; some may have left and spares joined since).
    fn resolve_node(&mut self, id: NodeId) -> NodeId {
        if self.nodes.get(&id).is_some_and(|n| n.in_service()) {
            id
        } else {
            self.random_node()
        }
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
                if self.nodes[&id].retired {
                    return Ok(());
                }
                let now = self.now;
                let next_ms = self.nodes.get_mut(&id).expect("node").next_tick_ms(now + 1);
                self.schedule_at(next_ms, Event::Tick(id));
                let node = self.nodes.get_mut(&id).expect("node");
                if node.paused_until.is_some_and(|u| u > self.now) {
                    return Ok(());
                }
                node.paused_until = None;
                self.step(id, Input::Tick)?;
            }
            Event::Deliver(msg) => self.deliver(msg)?,
            Event::Run {
                node,
                incarnation,
                worker,
            } => {
                if self.incarnation(node) == incarnation && self.nodes[&node].live.is_some() {
                    match worker {
                        Worker::Storage => self.run_storage(node)?,
                        Worker::Apply => self.run_apply(node)?,
                    }
                }
            }
            Event::Chunk {
                node,
                incarnation,
                peer,
            } => {
                if self.incarnation(node) == incarnation {
                    self.send_chunk(node, peer)?;
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
                if self.incarnation(node) == incarnation {
                    self.fire_armed_crash(node)?;
                }
            }
            Event::Heal => self.heal()?,
            ev @ (Event::Retire(_) | Event::CrashMidChange { .. } | Event::Operator) => {
                self.member_event(ev)?
            }
            Event::ClientNext(c) => self.client_next(c),
            Event::ExpireSessions => self.expire_sessions()?,
            Event::ClientRetry { client, attempt } => {
                let cl = &self.clients[client as usize];
                if cl.attempt == attempt && cl.current.is_some() {
                    self.client_send(client);
                }
            }
            Event::ClientTimeout { client, attempt } => self.client_timeout(client, attempt),
            Event::WatchStep(w) => self.watch_step(w)?,
            Event::LeaseUpkeep { node, incarnation } => self.lease_upkeep(node, incarnation)?,
        }
        Ok(())
    }

    fn heal(&mut self) -> Result<(), String> {
        self.healed = true;
        self.blocked.clear();
        self.loss_pct = 0;
        self.dup_pct = 0;
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let n = self.nodes.get_mut(&id).expect("node");
            if !n.in_service() {
                continue;
            }
            n.paused_until = None;
            n.crash_armed = None;
            if n.power_cut_down_ms.take().is_some() {
                n.fs.cancel_power_cut();
            }
            if n.live.is_none() {
                self.restart(id)?;
            }
        }
        self.start_pending_joiners()
    }

    // ----- the node runtime (production code), with the simulator as its shell -----

    /// Steps node `id`'s consensus with `input` and carries out what it asks for.
    fn step(&mut self, id: NodeId, input: Input) -> Result<(), String> {
        let mut out = Outputs::default();
        // The node's own clock, read as the driver does: after the input arrived.
        let now_ms = self.nodes[&id].clock_ms(self.now);
        let Some(live) = self.live(id) else {
            return Ok(());
        };
        live.consensus
            .step(input, now_ms, &mut out)
            .map_err(|e| format!("node {id}: the consensus step stopped the node: {e}"))?;
        let served = live.consensus.raft().lease_reads_served();
        let node = self.nodes.get_mut(&id).expect("node");
        self.stats.lease_reads_served += served.saturating_sub(node.lease_reads_seen);
        node.lease_reads_seen = served;
        self.dispatch(id, out)?;
        self.after_step(id)
    }

    fn dispatch(&mut self, id: NodeId, out: Outputs) -> Result<(), String> {
        self.record_commits(id)?;
        // The peer set first, as the driver does: messages of this step may go to a new member.
        if let Some(peers) = &out.peers {
            debug_assert!(!peers.contains_key(&id), "a node is never its own peer");
            self.nodes.get_mut(&id).expect("node").peers = peers.keys().copied().collect();
        }
        for job in &out.storage {
            if let StorageJob::Ready { entries, .. } = job {
                self.record_written(id, entries)?;
            }
        }
        let live = self.live(id).expect("dispatching for a live node");
        live.apply_jobs.extend(out.apply);
        live.storage_jobs.extend(out.storage);
        for m in out.messages {
            self.send_peer(m.from, m.to, PeerMessage::Raft(m));
        }
        for (peer, term) in out.snapshot_sends {
            self.start_stream(id, peer, term)?;
        }
        Ok(())
    }

    /// After any step of node `id`: answers to clients, checks, and the workers' schedules.
    fn after_step(&mut self, id: NodeId) -> Result<(), String> {
        self.poll_replies(id)?;
        self.poll_changes(id)?;
        self.check_roles(id)?;
        let fsync_ms = self.rng.range(0, self.params.fsync_max_ms + 1);
        let apply_ms = self.rng.range(0, 3);
        let incarnation = self.incarnation(id);
        let Some(live) = self.live(id) else {
            return Ok(());
        };
        let mut runs = Vec::new();
        if !live.storage_scheduled && !live.storage_at_install && !live.storage_jobs.is_empty() {
            live.storage_scheduled = true;
            runs.push((fsync_ms, Worker::Storage));
        }
        let apply_work = !live.apply_jobs.is_empty() || live.apply.holds_install();
        if !live.apply_scheduled && live.apply_at_install.is_none() && apply_work {
            live.apply_scheduled = true;
            runs.push((apply_ms, Worker::Apply));
        }
        for (delay, worker) in runs {
            let ev = Event::Run {
                node: id,
                incarnation,
                worker,
            };
            self.schedule(delay, ev);
        }
        let n = &self.nodes[&id];
        let busy = n.live.as_ref().is_some_and(|l| !l.storage_jobs.is_empty());
        if n.crash_armed.is_some() && busy && !self.healed && self.chance(35) {
            // Crash inside the unsynced window: at one of the next group's syncs.
            self.arm_power_cut(id);
        }
        Ok(())
    }

    /// The storage worker takes everything queued as one group (the storage thread's group
    /// commit), runs it, and the simulator carries out what it hands back.
    fn run_storage(&mut self, id: NodeId) -> Result<(), String> {
        let live = self.live(id).expect("live");
        live.storage_scheduled = false;
        let take = live.storage_jobs.len().min(GROUP_JOBS_MAX);
        let jobs: Vec<StorageJob> = live.storage_jobs.drain(..take).collect();
        let reads = jobs
            .iter()
            .filter(|j| matches!(j, StorageJob::SendFromLog { lo, hi, .. } if lo <= hi))
            .count();
        live.storage.submit(jobs);
        self.stats.log_reads += reads as u64;
        self.drive_storage(id)
    }

    fn drive_storage(&mut self, id: NodeId) -> Result<(), String> {
        let mut out = Vec::new();
        let live = self.live(id).expect("live");
        let result = live.storage.run(&mut out);
        let progress = match result {
            Ok(p) => p,
            Err(e) => {
                // As the storage thread does, what was handed out before the failure goes
                // out (messages reach the network); then the node stops.
                for o in out {
                    if let StorageOutput::Send(m) = o {
                        self.send_peer(m.from, m.to, PeerMessage::Raft(m));
                    }
                }
                return self.storage_failed(id, e.to_string());
            }
        };
        self.refresh_durable(id);
        self.storage_outputs(id, out)?;
        if self.nodes[&id].live.is_none() {
            return Ok(());
        }
        if progress == Progress::AwaitingApply {
            self.live(id).expect("live").storage_at_install = true;
            self.try_install(id)?;
        }
        self.after_step(id)
    }

    /// A storage failure: expected only from an armed power cut (then the node is down, like
    /// a real node that stops on a storage error); anything else is a bug.
    fn storage_failed(&mut self, id: NodeId, why: String) -> Result<(), String> {
        // What was synced before the failure stays on the disk (the WAL's index holds exactly
        // that after a failed call).
        self.refresh_durable(id);
        let n = self.nodes.get_mut(&id).expect("node");
        match n.power_cut_down_ms.take() {
            Some(down_ms) if n.fs.power_cuts() > 0 => {
                self.stats.power_cuts += 1;
                self.crash(id)?;
                self.schedule(down_ms, Event::Restart(id));
                Ok(())
            }
            _ => Err(format!("node {id}: storage failed without a fault: {why}")),
        }
    }

    fn storage_outputs(&mut self, id: NodeId, out: Vec<StorageOutput>) -> Result<(), String> {
        for o in out {
            match o {
                StorageOutput::Send(m) => self.send_peer(m.from, m.to, PeerMessage::Raft(m)),
                StorageOutput::Event(ev) => {
                    match ev {
                        StorageEvent::Compacted { .. } => self.stats.compactions += 1,
                        StorageEvent::LogReadFailed { .. } => self.stats.log_reads_failed += 1,
                        _ => {}
                    }
                    self.step(id, Input::Storage(ev))?;
                }
            }
            if self.nodes[&id].live.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// The apply worker takes its next unit of work (merged entries, or an install point).
    fn run_apply(&mut self, id: NodeId) -> Result<(), String> {
        let live = self.live(id).expect("live");
        live.apply_scheduled = false;
        let queue = &mut live.apply_jobs;
        let Some(work) = live.apply.next(None, || queue.pop_front()) else {
            return Ok(());
        };
        match work {
            ApplyWork::Entries(entries) => {
                self.check_apply(id, &entries)?;
                let live = self.live(id).expect("live");
                live.apply
                    .apply(&entries)
                    .map_err(|e| format!("node {id}: apply failed: {e}"))?;
                let index = live.apply.applied_index();
                self.step(id, Input::Applied { index })
            }
            ApplyWork::Install { index } => {
                self.live(id).expect("live").apply_at_install = Some(index);
                self.try_install(id)?;
                self.after_step(id)
            }
        }
    }

    /// The install rendezvous: once both workers are at the install, the storage worker
    /// swaps the state machine and both go on.
    fn try_install(&mut self, id: NodeId) -> Result<(), String> {
        let live = self.live(id).expect("live");
        let (true, Some(index)) = (live.storage_at_install, live.apply_at_install) else {
            return Ok(());
        };
        let mut out = Vec::new();
        if let Err(e) = live.storage.install(&mut out) {
            return self.storage_failed(id, e.to_string());
        }
        live.storage_at_install = false;
        live.apply_at_install = None;
        live.apply.installed(index);
        self.stats.snapshots_installed += 1;
        self.refresh_durable(id);
        self.storage_outputs(id, out)?;
        if self.nodes[&id].live.is_none() {
            return Ok(());
        }
        let index = self.live(id).expect("live").apply.applied_index();
        self.step(id, Input::Applied { index })?;
        // The storage worker goes on with what was queued behind the install.
        if self.live(id).is_some_and(|l| l.storage.has_work()) {
            self.drive_storage(id)?;
        }
        Ok(())
    }

    /// Creates a snapshot file on `id` and starts streaming it to `peer`.
    fn start_stream(&mut self, id: NodeId, peer: NodeId, term: u64) -> Result<(), String> {
        let chunk_bytes = self.params.chunk_bytes;
        let incarnation = self.incarnation(id);
        let live = self.live(id).expect("live");
        let opened = live.snapshots.create(&live.sm).and_then(|created| {
            live.snapshots
                .chunk_source(&created.file, &created.meta, term, chunk_bytes)
        });
        match opened {
            Ok(source) => live.streams.insert(peer, source),
            Err(e) => return self.storage_failed(id, format!("creating a snapshot: {e}")),
        };
        self.schedule(
            1,
            Event::Chunk {
                node: id,
                incarnation,
                peer,
            },
        );
        Ok(())
    }

    /// Sends the next chunk of the stream to `peer`; reports the stream's end to the node.
    fn send_chunk(&mut self, id: NodeId, peer: NodeId) -> Result<(), String> {
        let incarnation = self.incarnation(id);
        // A peer dropped from the set fails the stream, as the transport's `send_wait` does; so
        // does a connection that breaks (as likely per chunk as a quarter of a message's loss).
        let broken = self.is_blocked(id, peer)
            || !self.nodes[&id].peers.contains(&peer)
            || self.chance(self.loss_pct / 4);
        let Some(live) = self.live(id) else {
            return Ok(());
        };
        let Some(source) = live.streams.get_mut(&peer) else {
            return Ok(());
        };
        let next = if broken {
            None
        } else {
            match source.next_chunk() {
                Ok(next) => next,
                Err(e) => return self.storage_failed(id, format!("reading a snapshot: {e}")),
            }
        };
        match next {
            Some(chunk) => {
                let last = chunk.is_last();
                self.send_peer(id, peer, PeerMessage::SnapshotChunk(chunk));
                if !last {
                    let ev = Event::Chunk {
                        node: id,
                        incarnation,
                        peer,
                    };
                    self.schedule(1, ev);
                    return Ok(());
                }
                self.live(id).expect("live").streams.remove(&peer);
                self.step(id, Input::SnapshotSent { peer, ok: true })
            }
            None => {
                // The connection broke (a partition): the stream fails, as a transport would.
                live.streams.remove(&peer);
                self.step(id, Input::SnapshotSent { peer, ok: false })
            }
        }
    }

    /// Answers the clients whose requests node `id` has answered.
    fn poll_replies(&mut self, id: NodeId) -> Result<(), String> {
        self.poll_keepalives(id);
        let Some(live) = self.live(id) else {
            return Ok(());
        };
        let mut answered = Vec::new();
        live.writes.retain_mut(|w| match w.rx.try_recv() {
            Ok(r) => {
                let hash = (w.hash, w.session.take());
                answered.push((w.client, w.attempt, hash, Ok(r), None));
                false
            }
            Err(oneshot::error::TryRecvError::Empty) => true,
            Err(oneshot::error::TryRecvError::Closed) => false,
        });
        let sm = live.sm.clone();
        live.reads.retain_mut(|r| match r.rx.try_recv() {
            Ok(res) => {
                answered.push((
                    r.client,
                    r.attempt,
                    (0, None),
                    Err(res),
                    Some(r.key.clone()),
                ));
                false
            }
            Err(oneshot::error::TryRecvError::Empty) => true,
            Err(oneshot::error::TryRecvError::Closed) => false,
        });
        for (client, attempt, hash, result, key) in answered {
            let resp = match (result, key) {
                (Ok(write), _) => self.write_response(id, hash, write)?,
                (Err(Ok((index, _leader))), Some(key)) => {
                    let applied = sm.applied_index();
                    if applied < index {
                        return Err(format!(
                            "node {id}: read released at index {index} before applying it ({applied})"
                        ));
                    }
                    let rec = sm
                        .get_record(key.as_bytes())
                        .map_err(|e| format!("node {id}: read: {e}"))?
                        .value;
                    Response::Read(rec)
                }
                (Err(Err(e)), _) => error_response(e),
                (Err(Ok(_)), None) => unreachable!("reads carry their key"),
            };
            self.respond(client, attempt, resp);
        }
        Ok(())
    }

    /// A write's answer; an acknowledgement is checked against what is committed and durable.
    fn write_response(
        &mut self,
        id: NodeId,
        (hash, session): (u64, Option<(String, u64)>),
        result: Result<ProposalOutcome, ServiceError>,
    ) -> Result<Response, String> {
        let outcome = match result {
            Ok(o) => o,
            Err(e) => return Ok(error_response(e)),
        };
        let index = outcome.index;
        let Some(&(term, h)) = self.checker.committed.get(&index) else {
            return Err(format!(
                "node {id} acknowledged the write at {index}, which no node saw committed"
            ));
        };
        if h != hash {
            return Err(format!(
                "node {id} acknowledged a write at {index}, but another entry is committed there"
            ));
        }
        self.checker.check_durable_quorum(
            index,
            term,
            &format!("node {id} acknowledged a write"),
        )?;
        let result: CommandResult = outcome.result;
        Ok(Response::Written { session, result })
    }
}

/// Opens a node's storage. sled lets go of its directory lock a moment after the crashed
/// incarnation's handles are dropped (its I/O threads finish first): a restart that comes
/// sooner waits for it, in real time (it changes nothing simulated).
fn open_storage(
    vfs: Arc<dyn Vfs>,
    sm_dir: &Path,
    opts: NodeStorageOptions,
) -> Result<NodeStorage, raftkv::storage::node_storage::NodeStorageError> {
    let mut tries = 0;
    loop {
        match NodeStorage::open_with(vfs.clone(), Path::new("/data"), sm_dir, opts.clone()) {
            Err(e) if tries < 400 && e.to_string().contains("could not acquire lock") => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// What a client makes of an error answer (the HTTP status it would see).
fn error_response(e: ServiceError) -> Response {
    match e {
        ServiceError::NotLeader { leader } => Response::Redirect(leader.map(|l| l.id)),
        ServiceError::Timeout(_) => Response::Unknown,
        _ => Response::Retry,
    }
}

impl Sim {
    // ----- network -----

    fn is_blocked(&self, from: NodeId, to: NodeId) -> bool {
        self.blocked.contains_key(&(from, to))
    }

    /// Whether the transports let a message from `from` reach `to`: the sender has a link to
    /// `to`, and `to`'s listener accepts `from` (both follow their node's peer set).
    fn linked(&self, from: NodeId, to: NodeId) -> bool {
        self.nodes[&from].peers.contains(&to) && self.nodes[&to].peers.contains(&from)
    }

    fn send_peer(&mut self, from: NodeId, to: NodeId, message: PeerMessage) {
        if !self.nodes[&from].peers.contains(&to) {
            // No link to a peer outside the set: the transport refuses the send.
            self.stats.member.unlinked_drops += 1;
            return;
        }
        if self.is_blocked(from, to) {
            // A transport notices a broken connection now and then and says so.
            if self.chance(20) && self.nodes[&from].live.is_some() {
                let _ = self.step(from, Input::Unreachable { peer: to });
            }
            return;
        }
        let chunk = matches!(message, PeerMessage::SnapshotChunk(_));
        // Chunks ride a stream that breaks as a whole (`send_chunk`), never loses one inside.
        if !chunk && self.chance(self.loss_pct) {
            return;
        }
        let delay = self.rng.range(1, self.params.delay_max_ms + 1);
        if chunk {
            // Chunks ride one ordered stream per link, as on a TCP connection.
            let free_at = self.chunk_link_free_at.entry((from, to)).or_insert(0);
            let at = (*free_at).max(self.now + delay);
            *free_at = at;
            let ev = Event::Deliver(NetMsg::Peer { from, to, message });
            self.schedule_at(at, ev);
            return;
        }
        if self.chance(self.dup_pct) {
            let delay2 = self.rng.range(1, 2 * self.params.delay_max_ms + 1);
            let copy = NetMsg::Peer {
                from,
                to,
                message: message.clone(),
            };
            self.schedule(delay2, Event::Deliver(copy));
        }
        if let (Some(b), PeerMessage::Raft(m)) = (self.params.byzantine, &message) {
            if (b.from_ms..b.until_ms).contains(&self.now) {
                if self.chance(b.dup_pct) {
                    let delay3 = self.rng.range(1, 3 * self.params.delay_max_ms + 1);
                    let copy = NetMsg::Peer {
                        from,
                        to,
                        message: message.clone(),
                    };
                    self.schedule(delay3, Event::Deliver(copy));
                }
                if self.chance(b.corrupt_pct) {
                    let m = m.clone();
                    self.inject_corrupted(&m);
                }
            }
        }
        self.schedule(delay, Event::Deliver(NetMsg::Peer { from, to, message }));
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
    /// refuses it, else the message and the verdict of `node::peer::validate`.
    fn receive_frame(
        &self,
        from: NodeId,
        to: NodeId,
        bytes: &[u8],
    ) -> Option<Result<PeerMessage, PeerMessage>> {
        let decoded: Result<PeerMessage, _> = self
            .runtime
            .block_on(frame::read_frame(&mut &bytes[..], FRAME_BYTES_MAX));
        let message = decoded.ok()?;
        Some(match peer::validate(from, to, &message) {
            Ok(()) => Ok(message),
            Err(_) => Err(message),
        })
    }

    /// Delivers a byzantine-lite frame the way a node receives one: the real decoder, then
    /// the node's own consensus step (which validates before anything else).
    fn deliver_frame(&mut self, from: NodeId, to: NodeId, bytes: Vec<u8>) -> Result<(), String> {
        if self.is_blocked(from, to) || self.nodes[&to].live.is_none() || !self.linked(from, to) {
            return Ok(());
        }
        match self.receive_frame(from, to, &bytes) {
            None => self.stats.frames_undecodable += 1,
            Some(Err(message)) => {
                self.stats.frames_refused += 1;
                self.step(to, Input::Peer { from, message })?;
            }
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
            NetMsg::Peer { from, to, message } => {
                let refused = !self.linked(from, to);
                if refused {
                    // The receiver's listener no longer accepts the sender (or the sender
                    // dropped its link while the message was on the wire).
                    self.stats.member.unlinked_drops += 1;
                }
                if refused || self.is_blocked(from, to) {
                    if let PeerMessage::SnapshotChunk(_) = message {
                        self.chunk_link_free_at.remove(&(from, to));
                    }
                    return Ok(());
                }
                self.step(to, Input::Peer { from, message })?;
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
            .filter_map(|n| n.live.as_ref())
            .map(|l| l.consensus.raft())
            .filter(|r| r.role() == Role::Leader)
            .max_by_key(|r| r.term())
            .map(|r| r.id())
    }

    fn apply_fault(&mut self, fault: Fault) -> Result<(), String> {
        let all: Vec<NodeId> = self.nodes.keys().copied().collect();
        match fault {
            Fault::Partition { mut side, ms } => {
                // Nodes that joined since the schedule was drawn fall on either side.
                for id in self.params.nodes + 1..=self.params.nodes + self.params.spares {
                    if self.nodes[&id].in_service() && self.chance(50) {
                        side.insert(id);
                    }
                }
                let mut links = Vec::new();
                for &a in &side {
                    for &b in all.iter().filter(|b| !side.contains(b)) {
                        links.push((a, b));
                        links.push((b, a));
                    }
                }
                self.block(links, ms);
            }
            Fault::OneWay { from, to, ms } => {
                let (from, to) = (self.resolve_node(from), self.resolve_node(to));
                if from != to {
                    self.block(vec![(from, to)], ms);
                }
            }
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
            Fault::Crash { node, down_ms } => {
                let node = self.resolve_node(node);
                self.arm_crash(node, down_ms);
            }
            Fault::CrashMany { nodes, down_ms } => {
                for node in nodes {
                    let node = self.resolve_node(node);
                    self.arm_crash(node, down_ms);
                }
            }
            Fault::Pause { node, ms } => {
                let node = self.resolve_node(node);
                let n = self.nodes.get_mut(&node).expect("node");
                n.paused_until = Some(self.now + ms);
                if self.params.lease_reads {
                    self.stats.lease_seed_pauses += 1;
                }
            }
            Fault::PauseLeader { ms } => {
                if let Some(l) = self.current_leader() {
                    let n = self.nodes.get_mut(&l).expect("node");
                    n.paused_until = Some(self.now + ms);
                    self.stats.lease_seed_pauses += 1;
                    // Cut off from its peers a little longer than it sleeps: it wakes to the
                    // clients' reads without word of the new leader, and only its clock can
                    // tell it that its lease is over.
                    let mut links = Vec::new();
                    for &b in all.iter().filter(|&&b| b != l) {
                        links.push((l, b));
                        links.push((b, l));
                    }
                    self.block(links, ms + 5 * TICK_MS);
                }
            }
            Fault::CrashLeader { down_ms } => {
                if let Some(l) = self.current_leader() {
                    self.arm_crash(l, down_ms);
                }
            }
            Fault::Member(action) => self.member_action(action)?,
            Fault::TransferLeader { to } => {
                let to = self.resolve_node(to);
                if let Some(l) = self.current_leader() {
                    let n = &self.nodes[&l];
                    if n.paused_until.is_none_or(|u| u <= self.now) {
                        // Refused when `to` is the leader itself: nothing to do then.
                        let (reply, _) = oneshot::channel();
                        self.step(l, Input::Request(NodeRequest::Transfer { to, reply }))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Crashes `node`, preferably inside its unsynced window: with storage work queued, a
    /// power cut is armed for one of the next group's syncs (the disk keeps a torn prefix of
    /// what that group wrote); otherwise it crashes at the next step with work queued, or
    /// within 100 ms anyway.
    fn arm_crash(&mut self, node: NodeId, down_ms: u64) {
        let n = self.nodes.get_mut(&node).expect("node");
        if n.live.is_none() || n.crash_armed.is_some() || n.power_cut_down_ms.is_some() {
            return;
        }
        n.crash_armed = Some(down_ms);
        let busy = n.live.as_ref().is_some_and(|l| !l.storage_jobs.is_empty());
        let incarnation = n.incarnation;
        if busy && self.chance(50) {
            self.arm_power_cut(node);
            return;
        }
        self.schedule(100, Event::ArmedCrash { node, incarnation });
    }

    fn arm_power_cut(&mut self, node: NodeId) {
        let nth = self.rng.range(1, 3);
        let seed = self.rng.next_u64();
        let n = self.nodes.get_mut(&node).expect("node");
        if let Some(down_ms) = n.crash_armed.take() {
            n.fs.cut_power_at_sync(nth, seed);
            n.power_cut_down_ms = Some(down_ms);
        }
    }

    fn fire_armed_crash(&mut self, node: NodeId) -> Result<(), String> {
        let n = self.nodes.get_mut(&node).expect("node");
        if let Some(down_ms) = n.crash_armed.take() {
            if n.live.is_some() {
                self.crash(node)?;
                self.schedule(down_ms, Event::Restart(node));
            }
        }
        Ok(())
    }

    /// The process dies: its runtime is dropped with everything in its queues, the disk
    /// loses what was not synced (a torn prefix of it may survive).
    fn crash(&mut self, id: NodeId) -> Result<(), String> {
        self.stats.crashes += 1;
        let keep_seed = self.rng.next_u64();
        let n = self.nodes.get_mut(&id).expect("node");
        if let Some(live) = n.live.take() {
            // Its watch streams end, as a stopped node's do.
            live.hub.close();
        }
        n.fs.cancel_power_cut();
        n.fs.crash_torn(keep_seed);
        n.incarnation += 1;
        n.paused_until = None;
        n.crash_armed = None;
        n.power_cut_down_ms = None;
        self.chunk_link_free_at
            .retain(|(a, b), _| *a != id && *b != id);
        // Its watchers read their streams' last lines and let go of its state machine (sled
        // keeps its directory locked while a handle lives).
        self.end_watch_streams(id)
    }

    /// Opens node `id`'s storage (recovery), and starts its runtime.
    fn start_node(&mut self, id: NodeId) -> Result<(), String> {
        let config = self.config(id);
        let opts = self.storage_options();
        let seed = self.params.seed ^ (self.nodes[&id].incarnation << 32) ^ id;
        // The flags: an initial voter bootstraps the initial voters; a joining node (and its
        // restarts: a still-fresh data dir joins again) names the configuration it joined.
        let (start, flagged) = match &self.nodes[&id].joined {
            None => (
                consensus::Start::Bootstrap(self.membership.clone()),
                self.membership.members(),
            ),
            Some(m) => (consensus::Start::Join(m.clone()), m.members()),
        };
        let peers: BTreeMap<NodeId, String> = flagged
            .into_iter()
            .filter(|&p| p != id)
            .map(|p| (p, format!("sim-{p}")))
            .collect();
        let n = self.nodes.get_mut(&id).expect("node");
        // The transport starts with the flags' peers; the first step says which it wants.
        n.peers = peers.keys().copied().collect();
        let vfs: Arc<dyn Vfs> = Arc::new(n.fs.clone());
        let storage = open_storage(vfs, n.sm_dir.path(), opts)
            .map_err(|e| format!("node {id}: recovery failed: {e}"))?;
        let raft = consensus::open_core(config, start, &storage, seed)
            .map_err(|e| format!("node {id}: the core does not start: {e}"))?;
        let metrics = Arc::new(Metrics::standalone());
        let sm = storage.shared_sm();
        let snapshots = storage.shared_snapshots();
        let pending = Arc::new(Pending::default());
        let info = NodeInfo {
            id,
            cluster_id: "sim".into(),
            client_url: format!("sim://{id}"),
            peer_addr: format!("sim-{id}"),
            peers,
            peer_client_urls: BTreeMap::new(),
            tick_ms: TICK_MS,
        };
        let consensus = Consensus::new(info, raft, sm.clone(), pending.clone(), metrics.clone());
        let watch = WatchSettings {
            watcher_buffer_bytes_max: self.params.watcher_buffer_bytes,
            ..WatchSettings::default()
        };
        let hub = WatchHub::new(sm.applied_index(), watch);
        // Everything this incarnation starts out knowing committed is checked on its first step.
        n.commit_seen = 0;
        n.lease_reads_seen = 0;
        n.live = Some(Live {
            consensus,
            storage: StorageWorker::new(storage, metrics.clone()),
            apply: ApplyWorker::new(sm.clone(), pending, metrics, hub.clone()),
            hub,
            sm,
            snapshots,
            storage_jobs: VecDeque::new(),
            storage_scheduled: false,
            storage_at_install: false,
            apply_jobs: VecDeque::new(),
            apply_scheduled: false,
            apply_at_install: None,
            streams: BTreeMap::new(),
            writes: Vec::new(),
            reads: Vec::new(),
            changes: Vec::new(),
            lessor: Lessor::new(),
            keepalives: Vec::new(),
        });
        // What the disk holds is durable, whatever was believed before the crash.
        self.refresh_durable(id);
        let incarnation = self.incarnation(id);
        let phase_ms = self.rng.range(1, raftkv::node::LEASE_TICK_MS + 1);
        self.schedule(
            phase_ms,
            Event::LeaseUpkeep {
                node: id,
                incarnation,
            },
        );
        Ok(())
    }

    fn restart(&mut self, id: NodeId) -> Result<(), String> {
        let n = &self.nodes[&id];
        if n.live.is_some() || !n.in_service() {
            return Ok(());
        }
        self.start_node(id)?;
        // A restarted node's committed entries must agree with what was committed.
        let live = self.nodes[&id].live.as_ref().expect("started");
        let raft = live.consensus.raft();
        for i in raft.log().first_index()..=raft.commit_index() {
            if let (Some(e), Some(&(t, h))) = (log_entry(live, i), self.checker.committed.get(&i)) {
                if e.term != t || entry_hash(&e) != h {
                    return Err(format!(
                        "node {id} restarted with committed entry {i} differing from the committed one"
                    ));
                }
            }
        }
        let index = self.nodes[&id]
            .live
            .as_ref()
            .expect("started")
            .sm
            .applied_index();
        self.step(id, Input::Applied { index })
    }

    // ----- checks -----

    /// Log matching bookkeeping for every entry a node writes.
    fn record_written(&mut self, id: NodeId, entries: &[Entry]) -> Result<(), String> {
        // The field, not `live_ref`: the checker is written below while the log is read.
        let raft = self.nodes[&id]
            .live
            .as_ref()
            .expect("live")
            .consensus
            .raft();
        for e in entries {
            let prev_term = raft
                .log()
                .term(e.index - 1)
                .ok_or_else(|| format!("node {id}: no term for the entry before {}", e.index))?;
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
        Ok(())
    }

    /// What node `id`'s disk holds durably, as its WAL knows it (the WAL's index moves only
    /// after an fsync): the entries, and the snapshot marker below which all is durable
    /// committed state.
    fn refresh_durable(&mut self, id: NodeId) {
        let Some(live) = self.nodes[&id].live.as_ref() else {
            return;
        };
        let wal = live.storage.storage().wal();
        let base = wal.snapshot().map_or(0, |m| m.index);
        let log = (wal.first_index()..=wal.last_index())
            .filter_map(|i| wal.term(i).map(|t| (i, t)))
            .collect();
        self.checker.durable.insert(id, (base, log));
    }

    /// Entries reach the state machine only once committed and durable on a majority, in
    /// order, and every node applies the same entry at an index.
    fn check_apply(&mut self, id: NodeId, entries: &[Entry]) -> Result<(), String> {
        let applied = self.live_ref(id).sm.applied_index();
        let mut first_seen = None;
        for (k, e) in entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.index > applied)
        {
            let content = (e.term, entry_hash(e));
            if self.checker.committed.get(&e.index) != Some(&content) {
                return Err(format!(
                    "node {id} applies entry {}@{} which is not committed there",
                    e.index, e.term
                ));
            }
            self.checker
                .check_durable_quorum(e.index, e.term, &format!("node {id} applies"))?;
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
                    first_seen.get_or_insert(k);
                }
            }
        }
        // What no node applied before goes through the reference state machine.
        match first_seen {
            Some(k) => self.effects.apply(&entries[k..]),
            None => Ok(()),
        }
    }

    /// Records newly committed entries of node `id` (and checks them against what others
    /// committed) before any of them is applied or acknowledged.
    fn record_commits(&mut self, id: NodeId) -> Result<(), String> {
        let n = self.nodes.get_mut(&id).expect("node");
        let Some(live) = n.live.as_ref() else {
            return Ok(());
        };
        let raft = live.consensus.raft();
        let commit = raft.commit_index();
        let observed_term = raft.term();
        if commit < n.commit_seen {
            return Err(format!(
                "node {id}: commit index went back from {} to {commit}",
                n.commit_seen
            ));
        }
        for i in n.commit_seen + 1..=commit {
            let content = if let Some(e) = log_entry(live, i) {
                (e.term, entry_hash(&e))
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
                    // The snapshot case went on above: this content is an entry's.
                    let e = log_entry(live, i).expect("a committed entry in the log");
                    self.checker.first_commit(id, &e, raft.membership())?;
                }
            }
            let ct = self.checker.commit_term.entry(i).or_insert(observed_term);
            *ct = (*ct).min(observed_term);
        }
        n.commit_seen = commit;
        self.stats.max_commit = self.stats.max_commit.max(commit);
        Ok(())
    }

    /// With `RAFTKV_SIM_TRACE`: prints node `id`'s role, term and configuration when they
    /// change.
    fn trace_role(&mut self, id: NodeId) {
        let n = self.nodes.get_mut(&id).expect("node");
        let Some(raft) = n.live.as_ref().map(|l| l.consensus.raft()) else {
            return;
        };
        let now = (raft.role(), raft.term(), raft.membership_index());
        if n.traced == Some(now) {
            return;
        }
        let m = raft.membership();
        eprintln!(
            "[{:>6}] node {id}: {} term {} commit {} config@{} voters {:?} outgoing {:?} learners {:?}",
            self.now,
            now.0.name(),
            now.1,
            raft.commit_index(),
            now.2,
            m.voters,
            m.voters_outgoing,
            m.learners
        );
        n.traced = Some(now);
    }

    fn check_roles(&mut self, id: NodeId) -> Result<(), String> {
        self.record_commits(id)?;
        if self.trace {
            self.trace_role(id);
        }
        let n = &self.nodes[&id];
        let Some(live) = n.live.as_ref() else {
            return Ok(());
        };
        let raft = live.consensus.raft();
        self.checker.check_member_role(id, raft)?;
        if raft.role() != Role::Leader {
            return Ok(());
        }
        let term = raft.term();
        match self.checker.leaders.get(&term) {
            Some(&other) if other != id => {
                return Err(format!("two leaders in term {term}: {other} and {id}"));
            }
            Some(_) => {}
            None => {
                if let Some(at) = self.checker.removed_at.get(&id) {
                    return Err(format!(
                        "removed node {id} won the election of term {term} after the \
                         configuration removing it (index {at}) was committed"
                    ));
                }
                // Leader completeness: it must hold every entry committed in an earlier term
                // (a leader of an older term may be elected late, after newer leaders
                // committed more: it need not hold those).
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
                    let ok = log_entry(live, i).is_some_and(|e| e.term == t && entry_hash(&e) == h);
                    if !ok {
                        return Err(format!(
                            "leader completeness: new leader {id} (term {term}) lacks committed entry {i}"
                        ));
                    }
                }
                self.checker.leaders.insert(term, id);
                self.stats.elections += 1;
            }
        }
        Ok(())
    }

    // ----- clients -----

    // ----- the end -----

    /// Liveness after healing: every client op completed, a leader whose no-op of its term is
    /// committed and whose lease table is empty, and every member of its configuration up,
    /// idle, at the same applied index with the same state machine. Removed nodes left
    /// running are not waited for.
    fn all_done(&self) -> bool {
        if self.clients.iter().any(|c| c.current.is_some()) {
            return false;
        }
        let Some(leader) = self.current_leader() else {
            return false;
        };
        let r = self.live_ref(leader).consensus.raft();
        if r.log().term(r.commit_index()) != Some(r.term()) {
            return false;
        }
        // Clients stopped keeping leases alive at the heal: every lease must expire (checked
        // first: it is cheap, and the last thing to happen).
        if !self.live_ref(leader).sm.leases().0.is_empty() {
            return false;
        }
        let mut applied = None;
        let mut values: Option<Vec<Option<Vec<u8>>>> = None;
        for id in r.membership().members() {
            let Some(live) = self.nodes.get(&id).and_then(|n| n.live.as_ref()) else {
                return false;
            };
            if self.stranded(id, leader) {
                continue;
            }
            let at = live.sm.applied_index();
            let idle = live.storage_jobs.is_empty()
                && live.apply_jobs.is_empty()
                && !live.apply.holds_install()
                && !live.storage.has_work()
                && live.apply_at_install.is_none();
            // The leader's commit index, not only the member's own: a leader removing itself
            // is not in the configuration it leads, and its members may not have heard of its
            // last commit yet (seed 22 on lease-read clients).
            if at != live.consensus.raft().commit_index() || at != r.commit_index() || !idle {
                return false;
            }
            match applied {
                None => applied = Some(at),
                Some(a) if a != at => return false,
                _ => {}
            }
            let mine: Vec<Option<Vec<u8>>> = (0..KEYS)
                .map(|k| {
                    let key = format!("k{k}");
                    live.sm.get(key.as_bytes()).expect("read").value
                })
                .collect();
            match &values {
                None => values = Some(mine),
                Some(v) if v != &mine => return false,
                _ => {}
            }
        }
        true
    }

    /// A member the transports cut off from the leader for good, the known way (see
    /// `MemberStats::stranded`): its own configuration predates the leader's membership, so
    /// its peer set lacks the leader and its listener refuses it. Any other cut is a bug.
    fn stranded(&self, id: NodeId, leader: NodeId) -> bool {
        let Some(live) = self.nodes[&id].live.as_ref() else {
            return false;
        };
        let own = live.consensus.raft().membership();
        id != leader && !own.contains(leader) && !self.linked(leader, id)
    }

    fn finish(mut self) -> Result<Stats, String> {
        if let Some(leader) = self.current_leader() {
            let members = self
                .live_ref(leader)
                .consensus
                .raft()
                .membership()
                .members();
            let stranded = members.into_iter().filter(|&id| self.stranded(id, leader));
            self.stats.member.stranded = stranded.count() as u64;
        }
        // Full log matching across all running nodes (removed ones left running included).
        let logs: Vec<(NodeId, &Live)> = self
            .nodes
            .values()
            .filter_map(|n| Some((n.id, n.live.as_ref()?)))
            .collect();
        for (a, live_a) in &logs {
            for (b, live_b) in &logs {
                let (la, lb) = (live_a.consensus.raft().log(), live_b.consensus.raft().log());
                let lo = la.first_index().max(lb.first_index());
                let hi = la.last_index().min(lb.last_index());
                let mut matched = false;
                for i in (lo..=hi).rev() {
                    let (Some(ea), Some(eb)) = (log_entry(live_a, i), log_entry(live_b, i)) else {
                        return Err(format!("node {a} or {b} cannot read entry {i} of its log"));
                    };
                    if (matched || ea.term == eb.term) && ea != eb {
                        return Err(format!("log matching: nodes {a} and {b} differ at {i}"));
                    }
                    matched |= ea.term == eb.term;
                }
            }
        }
        self.check_reference()?;
        self.effects.check()?;
        let history = self.effects.history(&self.history)?;
        linearizability::check(&history)?;
        let leader = self.current_leader().expect("healed with a leader");
        self.check_watchers(leader)?;
        self.effects.ledger.check_expiries(&self.leases)?;
        self.stats.duplicates_in_log = self.effects.duplicates_in_log;
        self.stats.evictions = self.effects.evictions;
        self.stats.leases_granted = self.effects.ledger.granted();
        self.stats.leases_expired = self.effects.ledger.expired();
        self.stats.leases_revoked = self.effects.ledger.client_revokes;
        self.stats.leases_kept_alive = self.leases.kept_alive_ms.len() as u64;
        Ok(self.stats)
    }

    /// Every member the leader's configuration holds (but stranded ones) ends with the
    /// records and session table of the reference state machine (the committed log applied
    /// once, in order).
    fn check_reference(&self) -> Result<(), String> {
        let reference = self.effects.reference();
        let leader = self.current_leader().expect("healed with a leader");
        let members = self
            .live_ref(leader)
            .consensus
            .raft()
            .membership()
            .members();
        for id in members {
            if self.stranded(id, leader) {
                continue;
            }
            let sm = &self.live_ref(id).sm;
            if sm.applied_index() != reference.applied_index() {
                return Err(format!(
                    "node {id} applied {}, the reference {}",
                    sm.applied_index(),
                    reference.applied_index()
                ));
            }
            for k in 0..KEYS {
                let key = format!("k{k}");
                let mine = sm.get_record(key.as_bytes()).map_err(|e| e.to_string())?;
                let want = reference
                    .get_record(key.as_bytes())
                    .map_err(|e| e.to_string())?;
                if mine.value != want.value {
                    return Err(format!(
                        "node {id} ends with {key} = {:?}, the log says {:?}",
                        mine.value, want.value
                    ));
                }
            }
            let (mine, want) = (sm.sessions_summary(), reference.sessions_summary());
            if mine != want {
                return Err(format!(
                    "node {id} ends with the session table {mine:?}, the log says {want:?}"
                ));
            }
            let (mine, want) = (sm.leases().0, reference.leases().0);
            if mine != want {
                return Err(format!(
                    "node {id} ends with the leases {mine:?}, the log says {want:?}"
                ));
            }
            let leased = |sm: &StateMachine| {
                let prefix = leases::LEASED_PREFIX.as_bytes();
                sm.scan_prefix_records(prefix, None, usize::MAX, usize::MAX)
                    .map(|r| r.value)
                    .map_err(|e| e.to_string())
            };
            let (mine, want) = (leased(sm.as_ref())?, leased(reference)?);
            if mine != want {
                return Err(format!(
                    "node {id} ends with the leased keys {mine:?}, the log says {want:?}"
                ));
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let mut s = String::new();
        for n in self.nodes.values() {
            match n.live.as_ref() {
                Some(l) => {
                    let r = l.consensus.raft();
                    s.push_str(&format!(
                        "node {}: {} term {} leader {:?} commit {} applied {} persisted {} log {}..={} storage jobs {} apply jobs {} at install {}/{:?} \
                         config@{} voters {:?} outgoing {:?} learners {:?} peers {:?}\n",
                        n.id,
                        r.role().name(),
                        r.term(),
                        r.leader(),
                        r.commit_index(),
                        l.sm.applied_index(),
                        r.persisted_index(),
                        r.log().first_index(),
                        r.log().last_index(),
                        l.storage_jobs.len(),
                        l.apply_jobs.len(),
                        l.storage_at_install,
                        l.apply_at_install,
                        r.membership_index(),
                        r.membership().voters,
                        r.membership().voters_outgoing,
                        r.membership().learners,
                        n.peers,
                    ))
                }
                None if n.retired => s.push_str(&format!("node {}: retired\n", n.id)),
                None if !n.started => s.push_str(&format!("node {}: not started\n", n.id)),
                None => s.push_str(&format!("node {}: down\n", n.id)),
            }
        }
        for c in &self.clients {
            s.push_str(&format!(
                "client {}: target {} attempt {} current {:?}\n",
                c.id, c.target, c.attempt, c.current
            ));
        }
        if let Some(leader) = self.current_leader() {
            let live = self.live_ref(leader);
            let now_ms = self.now;
            let (table, _) = live.sm.leases();
            let leases: Vec<(u64, Option<u64>)> = table
                .iter()
                .map(|l| (l.id, live.lessor.remaining_ms(l.id, now_ms)))
                .collect();
            s.push_str(&format!(
                "leases on leader {leader} (id, ms left by its lessor): {leases:?}\n"
            ));
        }
        s
    }
}
