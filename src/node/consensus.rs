//! The consensus step: owns the core and turns each [`Input`] into [`Outputs`], with no thread,
//! socket or clock of its own. The node's consensus task ([`super::driver`]) and the simulator
//! (`tests/simulation`) both drive this exact code.
//!
//! Invariants kept here:
//! - Every message from a peer passes `peer::validate` (sender = the connection's peer,
//!   recipient = this node, terms, indexes and sizes in range) before the core or the storage
//!   worker sees it; refusals are counted per peer and logged at most once per interval
//!   (measured in ticks: this code never reads a clock).
//! - A snapshot is streamed to a peer at most once at a time; the core asks for it again only
//!   after the previous stream ended ([`Input::SnapshotSent`]).
//! - `messages_after_persist` ride with their storage job and leave only after the storage
//!   worker's fsync that covers them.
//! - A proposal is registered in [`Pending`] under its index and term and answered by the
//!   apply worker; "outcome unknown" (504) comes from the waiting handler if neither happens
//!   in time, or from [`Consensus::fail_all`] when the node stops.
//! - Committed entries go straight to the apply worker, in order; a snapshot install is a
//!   point in that same queue, queued before anything committed after it.
//! - A read is answered only from a `ReadState` (leadership confirmed after it arrived) and
//!   only once the state machine has applied its index; or dropped with "retry".

use super::apply::{Pending, PENDING_PROPOSALS_MAX};
use super::messages::{
    ApplyJob, Input, MembershipReply, Outputs, PeerMessage, ReadReply, Request, StorageEvent,
    StorageJob, WorkerError,
};
use super::peer::{self, RefusalLog};
use crate::api::{
    ClusterStatus, LeaderHint, LeaderInfo, MemberStatus, MembershipStatus, ServiceError,
};
use crate::metrics::Metrics;
use crate::raft::{self, MembershipProposal, Message, MessageBody, Raft, RaftError, Ready, Role};
use raftkv_storage::node_storage::NodeStorage;
use raftkv_storage::sm::StateMachine;
use raftkv_storage::{MemberAddrs, Membership, NodeId, SnapshotMeta};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// What the node tells about itself and its peers (status, leader hints).
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    pub id: NodeId,
    pub cluster_id: String,
    pub client_url: String,
    /// The address the peer transport listens on.
    pub peer_addr: String,
    /// The other members' peer addresses.
    pub peers: BTreeMap<NodeId, String>,
    /// The other members' client URLs, from configuration.
    pub peer_client_urls: BTreeMap<NodeId, String>,
    /// The tick interval (for rate-limiting log lines by tick count).
    pub tick_ms: u64,
}

/// Why the consensus step stopped the node.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("storage worker: {0}")]
    Storage(WorkerError),
    #[error("apply worker: {0}")]
    Apply(WorkerError),
}

/// What the consensus step last logged about leadership, to log each change once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    role: Role,
    term: u64,
    leader: Option<NodeId>,
}

/// The consensus step's state.
pub struct Consensus {
    info: NodeInfo,
    raft: Raft,
    sm: Arc<StateMachine>,
    pending: Arc<Pending>,
    metrics: Arc<Metrics>,
    /// Reads waiting for the core to confirm leadership, by read id.
    reads: BTreeMap<u64, ReadReply>,
    /// Confirmed reads waiting for the state machine to apply their index: index → replies.
    confirmed_reads: BTreeMap<u64, Vec<(NodeId, ReadReply)>>,
    next_read_id: u64,
    /// The state machine's applied index as the apply worker last reported it (reading it
    /// from the state machine would wait on its lock while a batch applies).
    applied_index: u64,
    snapshot_index: u64,
    /// Peers a snapshot is being streamed to.
    sending_snapshots: BTreeSet<NodeId>,
    /// Messages from peers refused by `peer::validate`, counted per peer.
    refusals: RefusalLog,
    /// Ticks since start (the clock of `refusals`).
    /// `Raft::lease_reads_served` already added to the metric.
    lease_reads_counted: u64,
    ticks: u64,
    /// Leadership as last logged.
    seen: Seen,
    /// The membership change this leader proposed and has not answered. One at a time: the
    /// core refuses a second while one is in flight.
    membership_waiter: Option<MembershipWaiter>,
    /// What the transport's peer set was last derived from: (configuration index, peers the
    /// core replicates to, role, leader) — recomputed only when it changes.
    peers_key: Option<(u64, usize, Role, Option<NodeId>)>,
    /// Every member address seen in a configuration, by id: a member that left the latest
    /// configuration may still lead it until it commits (or linger as a removed follower), and
    /// must stay reachable. Bounded by `MEMBERS_MAX` ids.
    seen_addrs: BTreeMap<NodeId, MemberAddrs>,
    /// The replication floor last sent to the storage worker.
    floor_sent: Option<u64>,
    /// The peer set last handed to the shell (`None`: none yet).
    peers: Option<BTreeMap<NodeId, String>>,
}

/// A membership change waiting for its answer.
#[derive(Debug)]
struct MembershipWaiter {
    /// Its Config entry.
    index: u64,
    term: u64,
    /// That entry was seen committed here (with its term): the change took effect.
    committed: bool,
    reply: MembershipReply,
}

/// How a node with a brand-new data dir starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// A member of a new cluster: every initial member bootstraps the same voters.
    Bootstrap(Membership),
    /// A member added to a running cluster (`serve --join`): the cluster's configuration,
    /// which names this node a learner. Everything else comes from the leader.
    Join(Membership),
}

impl Start {
    fn membership(&self) -> &Membership {
        match self {
            Start::Bootstrap(m) | Start::Join(m) => m,
        }
    }
}

/// A brand-new data dir bootstraps or joins as `start` says; otherwise the core restarts from
/// what storage recovered (its own configuration wins over `start`'s: it is what the cluster
/// agreed, and the flags only ever start a new member).
pub fn open_core(
    config: raft::Config,
    start: Start,
    storage: &NodeStorage,
    seed: u64,
) -> Result<Raft, super::NodeError> {
    if storage.is_fresh() {
        return Ok(match start {
            Start::Bootstrap(membership) => {
                tracing::info!(id = config.id, voters = ?membership.voters, "bootstrapping a new member");
                Raft::bootstrap(config, membership, seed)?
            }
            Start::Join(membership) => {
                tracing::info!(id = config.id, voters = ?membership.voters, learners = ?membership.learners, "joining a running cluster as a learner");
                Raft::join(config, membership, seed)?
            }
        });
    }
    let membership = start.membership().clone();
    let state = storage.restart_state()?;
    let snapshot = state.snapshot.unwrap_or(SnapshotMeta {
        index: 0,
        term: 0,
        membership,
    });
    let state = raft::RestartState {
        hard_state: state.hard_state,
        snapshot,
        prefix: state.prefix,
        entries: state.entries,
        applied: state.applied,
    };
    Ok(Raft::restart(config, state, seed)?)
}

impl Consensus {
    /// The step for `raft`, whose state machine is `sm` and whose waiting writes are `pending`
    /// (shared with the apply worker, which answers them).
    pub fn new(
        info: NodeInfo,
        raft: Raft,
        sm: Arc<StateMachine>,
        pending: Arc<Pending>,
        metrics: Arc<Metrics>,
    ) -> Consensus {
        assert_eq!(info.id, raft.id(), "the info describes this node");
        assert!(info.tick_ms > 0, "ticks take time");
        let seen = Seen {
            role: raft.role(),
            term: raft.term(),
            leader: raft.leader(),
        };
        Consensus {
            applied_index: sm.applied_index(),
            snapshot_index: raft.log().base_index(),
            info,
            raft,
            sm,
            pending,
            metrics,
            reads: BTreeMap::new(),
            confirmed_reads: BTreeMap::new(),
            next_read_id: 1,
            sending_snapshots: BTreeSet::new(),
            refusals: RefusalLog::default(),
            lease_reads_counted: 0,
            ticks: 0,
            seen,
            membership_waiter: None,
            peers_key: None,
            seen_addrs: BTreeMap::new(),
            peers: None,
            floor_sent: None,
        }
    }

    /// Adds the reads the core served from its lease since the last step to the metric.
    fn count_lease_reads(&mut self) {
        let served = self.raft.lease_reads_served();
        // A new core (a restart) starts again from 0; this step's count is never behind.
        debug_assert!(served >= self.lease_reads_counted);
        self.metrics
            .lease_reads
            .inc_by(served.saturating_sub(self.lease_reads_counted));
        self.lease_reads_counted = served;
    }

    /// The core (read-only: for status and checks).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Handles `input`, then takes every `Ready` the core has into `out`. `now_ms` is a
    /// monotonic clock reading (any fixed origin) taken after `input` arrived: leases are
    /// measured on it (see `raft::Config::lease_reads`).
    pub fn step(&mut self, input: Input, now_ms: u64, out: &mut Outputs) -> Result<(), StepError> {
        self.raft.advance_clock(now_ms);
        match input {
            Input::Tick => {
                self.raft.tick();
                self.ticks += 1;
                self.send_replication_floor(out);
            }
            Input::Peer { from, message } => self.on_peer(from, message, out),
            Input::Unreachable { peer } => self.raft.peer_unreachable(peer),
            Input::Request(req) => self.on_request(req),
            Input::Storage(ev) => self.on_storage(ev)?,
            Input::Applied { index } => {
                // Reports may arrive late, never out of order: the index only grows.
                self.applied_index = self.applied_index.max(index);
                self.raft.applied(self.applied_index);
            }
            Input::ApplyFailed(e) => return Err(StepError::Apply(e)),
            Input::SnapshotSent { peer, ok } => {
                self.sending_snapshots.remove(&peer);
                self.raft.snapshot_sent(peer, ok);
            }
        }
        self.drain_ready(out);
        self.count_lease_reads();
        self.release_reads();
        self.observe_leadership();
        self.answer_membership_change();
        self.update_peers(out);
        Ok(())
    }

    fn on_storage(&mut self, ev: StorageEvent) -> Result<(), StepError> {
        match ev {
            StorageEvent::Persisted {
                last: (index, term),
            } => self.raft.persisted(index, term),
            StorageEvent::Compacted {
                index,
                term,
                snapshot_index,
            } => {
                self.snapshot_index = snapshot_index;
                // The apply worker's report of this index may still be in flight.
                self.applied_index = self.applied_index.max(self.sm.applied_index());
                self.raft.applied(self.applied_index);
                if let Err(e) = self.raft.compact(index, term) {
                    tracing::warn!(index, term, error = %e, "core compaction refused");
                }
            }
            StorageEvent::LogReadFailed { peer } => self.raft.append_lost(peer),
            StorageEvent::SnapshotReceived { from, term, meta } => {
                let m = Message {
                    from,
                    to: self.info.id,
                    term,
                    body: MessageBody::InstallSnapshot { meta },
                };
                if let Err(e) = self.raft.step(m) {
                    tracing::warn!(from, error = %e, "snapshot install refused by the core");
                }
            }
            StorageEvent::Failed(e) => return Err(StepError::Storage(e)),
        }
        Ok(())
    }

    fn on_peer(&mut self, from: NodeId, message: PeerMessage, out: &mut Outputs) {
        if let Err(e) = peer::validate(from, self.info.id, &message) {
            self.refused(from, &e);
            return;
        }
        match message {
            PeerMessage::Raft(m) => match self.raft.step(m) {
                Ok(()) => {}
                Err(RaftError::UnknownPeer(p)) => {
                    tracing::warn!(peer = p, "message from an unknown peer")
                }
                Err(e @ RaftError::InvalidMessage { .. }) => self.refused(from, &e),
                Err(e) => tracing::debug!(from, error = %e, "message refused"),
            },
            PeerMessage::SnapshotChunk(chunk) => {
                out.storage.push(StorageJob::Chunk { from, chunk });
            }
        }
    }

    /// Counts a refused message from `peer`; logs it at most once per peer per interval.
    fn refused(&mut self, peer: NodeId, error: &dyn std::error::Error) {
        let now_ms = self.ticks.saturating_mul(self.info.tick_ms);
        if let Some(count) = self.refusals.refused(peer, now_ms) {
            tracing::warn!(
                peer,
                refused = count,
                refused_total = self.refusals.total(peer),
                error = %error,
                "invalid message from a peer; dropped"
            );
        }
    }

    fn on_request(&mut self, req: Request) {
        match req {
            Request::Propose { payload, reply } => {
                if self.pending.len() >= PENDING_PROPOSALS_MAX {
                    let _ = reply.send(Err(ServiceError::Unavailable(
                        "too many writes in flight".into(),
                    )));
                    return;
                }
                match self.raft.propose(payload) {
                    Ok((index, term)) => {
                        // Only this step inserts, after the check above: this cannot be full.
                        // The entry is in the log now: whatever happens next, a refusal here
                        // could only say "outcome unknown".
                        if let Err(reply) = self.pending.insert(index, term, reply) {
                            let _ = reply.send(Err(ServiceError::Timeout(format!(
                                "too many writes in flight to watch the one at index {index}"
                            ))));
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(self.map_raft_error(e)));
                    }
                }
            }
            Request::Read { level, reply } => {
                let id = self.next_read_id;
                self.next_read_id += 1;
                match self.raft.read_index_at(id, level) {
                    Ok(()) => {
                        self.reads.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(self.map_raft_error(e)));
                    }
                }
            }
            Request::Transfer { to, reply } => {
                let result = self
                    .raft
                    .transfer_leadership(to)
                    .map_err(|e| self.map_raft_error(e));
                let _ = reply.send(result);
            }
            Request::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Request::ChangeMembership { proposal, reply } => {
                self.change_membership(proposal, reply);
            }
            Request::Ready { reply } => {
                let _ = reply.send(self.readiness());
            }
        }
    }

    /// Takes every `Ready` the core has into `out`.
    fn drain_ready(&mut self, out: &mut Outputs) {
        loop {
            let rd: Ready = self.raft.ready();
            if rd.is_empty() {
                return;
            }
            // The install's point in the apply queue comes before anything committed after it.
            if let Some(meta) = &rd.snapshot {
                out.apply.push(ApplyJob::Install { index: meta.index });
            }
            // Committed entries are durable here already (the core hands out only entries at
            // or below what was reported persisted): they need not wait for the storage worker.
            if !rd.committed.is_empty() {
                let committed = rd.committed.len() as u64;
                out.apply.push(ApplyJob::Entries(rd.committed));
                self.metrics.proposals_committed.inc_by(committed);
            }
            out.messages.extend(rd.messages_now);
            let leader = self.raft.leader().unwrap_or(self.info.id);
            for rs in rd.read_states {
                if let Some(reply) = self.reads.remove(&rs.id) {
                    let waiting = self.confirmed_reads.entry(rs.index).or_default();
                    waiting.push((leader, reply));
                }
            }
            for id in rd.reads_dropped {
                if let Some(reply) = self.reads.remove(&id) {
                    let _ = reply.send(Err(ServiceError::Unavailable(
                        "leadership changed before the read was confirmed; retry".into(),
                    )));
                }
            }
            for send in rd.snapshot_sends {
                if self.sending_snapshots.insert(send.to) {
                    out.snapshot_sends.push((send.to, send.term));
                }
            }
            let durable = rd.hard_state.is_some()
                || rd.snapshot.is_some()
                || !rd.entries.is_empty()
                || !rd.messages_after_persist.is_empty();
            if durable {
                out.storage.push(StorageJob::Ready {
                    hard_state: rd.hard_state,
                    install: rd.snapshot,
                    entries: rd.entries,
                    after_persist: rd.messages_after_persist,
                });
            }
            self.metrics.log_reads.inc_by(rd.log_reads.len() as u64);
            let held_bytes = self.raft.log().held_bytes();
            self.metrics
                .log_held_bytes
                .set(i64::try_from(held_bytes).unwrap_or(i64::MAX));
            out.storage
                .extend(rd.log_reads.into_iter().map(|r| StorageJob::SendFromLog {
                    message: r.message,
                    lo: r.lo,
                    hi: r.hi,
                }));
        }
    }

    /// Tells the storage worker, once per tick when it changed, which entries a reachable
    /// follower still needs (the WAL keeps them at compaction, within a bound).
    fn send_replication_floor(&mut self, out: &mut Outputs) {
        let floor = self.raft.replication_floor();
        if floor != self.floor_sent {
            self.floor_sent = floor;
            out.storage.push(StorageJob::RetainAfter(floor));
        }
    }

    /// Answers the confirmed reads whose index the state machine has applied.
    fn release_reads(&mut self) {
        if self.confirmed_reads.is_empty() {
            return;
        }
        let applied = self.applied_index;
        while let Some(entry) = self.confirmed_reads.first_entry() {
            if *entry.key() > applied {
                break;
            }
            let index = *entry.key();
            for (leader, reply) in entry.remove() {
                let _ = reply.send(Ok((index, leader)));
            }
        }
        debug_assert!(
            self.confirmed_reads.keys().all(|&i| i > applied),
            "a read whose index is applied never waits"
        );
    }

    /// Answers what is in flight as the node stops: proposals in the log get "outcome
    /// unknown", reads get "retry".
    pub fn fail_all(&mut self, why: &str) {
        self.pending.fail_all(why);
        let confirmed = std::mem::take(&mut self.confirmed_reads);
        let replies = confirmed.into_values().flatten().map(|(_, reply)| reply);
        for reply in std::mem::take(&mut self.reads).into_values().chain(replies) {
            let _ = reply.send(Err(ServiceError::Unavailable(why.into())));
        }
        if let Some(MembershipWaiter { index, reply, .. }) = self.membership_waiter.take() {
            let _ = reply.send(Err(ServiceError::Timeout(format!(
                "outcome unknown: the membership change at index {index} is in the log but \
                 not known complete ({why})"
            ))));
        }
    }

    fn leader_hint(&self) -> Option<LeaderHint> {
        self.raft.leader().map(|id| LeaderHint {
            id,
            client_url: self.client_url_of(id),
        })
    }

    fn map_raft_error(&self, e: RaftError) -> ServiceError {
        match e {
            RaftError::NotLeader { .. } => ServiceError::NotLeader {
                leader: self.leader_hint(),
            },
            RaftError::UnknownPeer(p) => {
                ServiceError::InvalidInput(format!("node {p} is not a member"))
            }
            RaftError::TransferInProgress { to } => {
                ServiceError::Unavailable(format!("leadership is moving to node {to}"))
            }
            e @ (RaftError::MembershipChangeInFlight
            | RaftError::LastVoter
            | RaftError::AlreadyMember(_)
            | RaftError::LearnerBehind { .. }
            | RaftError::QuorumUnreachable { .. }) => ServiceError::Conflict(e.to_string()),
            e @ RaftError::UnknownMember(_) => ServiceError::NotFound(e.to_string()),
            e @ (RaftError::MembershipInvalid(_) | RaftError::NotAVoter(_)) => {
                ServiceError::InvalidInput(e.to_string())
            }
            other => ServiceError::Unavailable(other.to_string()),
        }
    }

    fn readiness(&self) -> Result<(), ServiceError> {
        let Some(_) = self.raft.leader() else {
            return Err(ServiceError::Unavailable("no leader is known".into()));
        };
        let commit = self.raft.commit_index();
        if self.raft.log().term(commit) != Some(self.raft.term()) {
            return Err(ServiceError::Unavailable(
                "the leader's first entry of this term is not committed here yet".into(),
            ));
        }
        // The state machine, not the core, says what is applied: the core counts an
        // accepted snapshot as applied before the storage worker has installed it.
        let applied = self.sm.applied_index();
        if applied < commit {
            return Err(ServiceError::Unavailable(format!(
                "applied {applied} of {commit} committed entries"
            )));
        }
        Ok(())
    }

    /// The node's view of the cluster.
    pub fn status(&self) -> ClusterStatus {
        let leader = self.raft.leader().map(|id| LeaderInfo {
            id,
            client_url: self.leader_hint().and_then(|h| h.client_url),
        });
        let members = self.member_statuses();
        debug_assert!(
            members.windows(2).all(|w| w[0].id < w[1].id),
            "members sorted by id"
        );
        ClusterStatus {
            id: self.info.id,
            cluster_id: self.info.cluster_id.clone(),
            role: self.raft.role().name().to_string(),
            term: self.raft.term(),
            leader,
            first_index: self.raft.log().first_index(),
            last_index: self.raft.log().last_index(),
            commit_index: self.raft.commit_index(),
            applied_index: self.sm.applied_index(),
            snapshot_index: self.snapshot_index.max(self.raft.log().base_index()),
            members,
            membership: self.membership_status(),
        }
    }

    /// Every member of the configuration in effect, sorted by id, with its address and (on
    /// the leader) its progress.
    fn member_statuses(&self) -> Vec<MemberStatus> {
        let m = self.raft.membership();
        let is_leader = self.raft.role() == Role::Leader;
        m.members()
            .into_iter()
            .map(|id| {
                let me = id == self.info.id;
                let joint = m.is_joint().then(|| {
                    match (m.voters.contains(&id), m.voters_outgoing.contains(&id)) {
                        (true, true) => "both",
                        (true, false) => "incoming",
                        (false, true) => "outgoing",
                        (false, false) => "learner",
                    }
                    .to_string()
                });
                MemberStatus {
                    id,
                    role: if m.is_voter(id) { "voter" } else { "learner" }.into(),
                    joint,
                    peer_addr: self.addrs_of(id).map(|a| a.peer_addr).unwrap_or_default(),
                    client_url: self.client_url_of(id),
                    reachable: is_leader.then(|| self.raft.reachable(id)),
                    match_index: match (is_leader, me) {
                        (false, _) => None,
                        (true, true) => Some(self.raft.persisted_index()),
                        (true, false) => self.raft.progress(id).map(|p| p.match_index),
                    },
                }
            })
            .collect()
    }

    fn membership_status(&self) -> MembershipStatus {
        let m = self.raft.membership();
        MembershipStatus {
            voters: m.voters.iter().copied().collect(),
            learners: m.learners.iter().copied().collect(),
            voters_outgoing: m.voters_outgoing.iter().copied().collect(),
            index: self.raft.membership_index(),
            change_in_flight: self.raft.membership_in_flight(),
            removed: !m.contains(self.info.id),
        }
    }

    /// Where member `id` is reached: the configuration's record (agreed through the log)
    /// wins over this node's flags, which only bootstrap; this node's own from its settings.
    pub fn addrs_of(&self, id: NodeId) -> Option<MemberAddrs> {
        if id == self.info.id {
            return Some(MemberAddrs {
                peer_addr: self.info.peer_addr.clone(),
                client_url: self.info.client_url.clone(),
            });
        }
        if let Some(a) = self.raft.membership().addrs.get(&id) {
            return Some(a.clone());
        }
        if let Some(a) = self.seen_addrs.get(&id) {
            return Some(a.clone());
        }
        let peer_addr = self.info.peers.get(&id)?.clone();
        let client_url = self
            .info
            .peer_client_urls
            .get(&id)
            .cloned()
            .unwrap_or_default();
        Some(MemberAddrs {
            peer_addr,
            client_url,
        })
    }

    fn client_url_of(&self, id: NodeId) -> Option<String> {
        self.addrs_of(id)
            .map(|a| a.client_url)
            .filter(|url| !url.is_empty())
    }

    /// Leader: proposes a membership change, recording the addresses this node knows for
    /// members that have none in the log yet; the reply waits for the change to complete.
    fn change_membership(&mut self, mut proposal: MembershipProposal, reply: MembershipReply) {
        if self.membership_waiter.is_some() {
            let _ = reply.send(Err(self.map_raft_error(RaftError::MembershipChangeInFlight)));
            return;
        }
        for id in self.raft.membership().members() {
            if let Some(a) = self.addrs_of(id).filter(|a| !a.peer_addr.is_empty()) {
                proposal.known_addrs.insert(id, a);
            }
        }
        match self.raft.propose_membership(&proposal) {
            Ok((index, term)) => {
                tracing::info!(index, term, changes = ?proposal.changes, force = proposal.force, "membership change proposed");
                self.membership_waiter = Some(MembershipWaiter {
                    index,
                    term,
                    committed: false,
                    reply,
                });
            }
            Err(e) => {
                let _ = reply.send(Err(self.map_raft_error(e)));
            }
        }
    }

    /// Answers the waiting membership change once it completed (its own entry seen committed
    /// and no change in flight), once a new leader overwrote its entry (it never took effect),
    /// or once its entry left the log before it was seen committed (replaced by a snapshot or
    /// truncated: the outcome is unknown — a later configuration is no proof of this one).
    fn answer_membership_change(&mut self) {
        let Some(w) = self.membership_waiter.as_mut() else {
            return;
        };
        let (index, term) = (w.index, w.term);
        let here = self.raft.log().term(index);
        if here == Some(term) && self.raft.commit_index() >= index {
            w.committed = true;
        }
        let overwritten = !w.committed && here.is_some_and(|t| t != term);
        let lost = !w.committed && here.is_none();
        let done = w.committed
            && self.raft.membership_index() >= index
            && !self.raft.membership_in_flight();
        if !(overwritten || lost || done) {
            return;
        }
        let Some(MembershipWaiter { reply, .. }) = self.membership_waiter.take() else {
            return;
        };
        let result = if overwritten {
            Err(ServiceError::Unavailable(format!(
                "a new leader replaced the change at index {index} before it committed; it \
                 had no effect: retry"
            )))
        } else if lost {
            Err(ServiceError::Timeout(format!(
                "outcome unknown: the change at index {index} left this node's log (replaced by \
                 a snapshot or a new leader's entries) before it was seen committed; check the \
                 configuration"
            )))
        } else {
            tracing::info!(index, voters = ?self.raft.membership().voters, learners = ?self.raft.membership().learners, "membership change complete");
            Ok(self.status())
        };
        let _ = reply.send(result);
    }

    /// Tells the shell the peers to keep connections to when the configuration (or the set
    /// of lingering removed members, or the leader) changed: members, lingering members and
    /// the leader this node follows, but this node, by the address the configuration (or an
    /// earlier one, or the flags) gives.
    ///
    /// The leader stays a peer even once the newest configuration here removes it: it still
    /// leads until that configuration commits, and must hear this node's acknowledgements to
    /// commit it (then it steps down). Its address is then the one it was reached by so far.
    fn update_peers(&mut self, out: &mut Outputs) {
        let replicas = self.raft.replica_count();
        let leader = self.raft.leader().filter(|&l| l != self.info.id);
        let key = (
            self.raft.membership_index(),
            replicas,
            self.raft.role(),
            leader,
        );
        if self.peers_key == Some(key) {
            return;
        }
        self.peers_key = Some(key);
        for (&id, a) in &self.raft.membership().addrs {
            if self.seen_addrs.len() < raftkv_types::MEMBERS_MAX
                || self.seen_addrs.contains_key(&id)
            {
                self.seen_addrs.insert(id, a.clone());
            }
        }
        let mut ids = self.raft.membership().members();
        ids.extend(self.raft.replica_ids());
        ids.extend(leader);
        ids.remove(&self.info.id);
        let peers: BTreeMap<NodeId, String> = ids
            .into_iter()
            .filter_map(|id| {
                let configured = self.addrs_of(id).map(|a| a.peer_addr);
                let addr = configured
                    .filter(|a| !a.is_empty())
                    .or_else(|| self.peers.as_ref().and_then(|p| p.get(&id).cloned()))?;
                Some((id, addr))
            })
            .collect();
        debug_assert!(!peers.contains_key(&self.info.id), "never a peer of itself");
        if self.peers.as_ref() != Some(&peers) {
            self.peers = Some(peers.clone());
            out.peers = Some(peers);
        }
    }

    /// Logs each change of role, term or leader once, and counts new leaders.
    fn observe_leadership(&mut self) {
        let now = Seen {
            role: self.raft.role(),
            term: self.raft.term(),
            leader: self.raft.leader(),
        };
        if now == self.seen {
            return;
        }
        let before = std::mem::replace(&mut self.seen, now);
        assert!(now.term >= before.term, "the term never decreases");
        if now.role != before.role || now.term != before.term {
            self.log_role_change(before, now);
        }
        if now.leader != before.leader {
            match now.leader {
                Some(leader) => {
                    self.metrics.leader_changes_seen.inc();
                    tracing::info!(
                        term = now.term,
                        leader,
                        previous_leader = before.leader.unwrap_or(0),
                        "leader changed"
                    );
                }
                None => tracing::info!(
                    term = now.term,
                    previous_leader = before.leader.unwrap_or(0),
                    "leader lost"
                ),
            }
        }
    }

    fn log_role_change(&self, before: Seen, now: Seen) {
        match now.role {
            Role::PreCandidate | Role::Candidate => tracing::info!(
                term = now.term,
                pre_vote = now.role == Role::PreCandidate,
                last_index = self.raft.log().last_index(),
                "election started"
            ),
            Role::Leader => tracing::info!(
                term = now.term,
                last_index = self.raft.log().last_index(),
                commit_index = self.raft.commit_index(),
                "became leader"
            ),
            Role::Follower if before.role == Role::Leader => {
                tracing::info!(term = now.term, previous_term = before.term, "stepped down")
            }
            Role::Follower => {}
        }
    }
}
