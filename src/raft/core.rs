//! The Raft consensus state machine: elections, replication, commitment, compaction,
//! leadership transfer and ReadIndex, with no I/O.
//!
//! Inputs: [`Raft::tick`], [`Raft::step`] (in `core/step.rs`: term rules, then one handler
//! per role), [`Raft::propose`], [`Raft::read_index`],
//! [`Raft::transfer_leadership`] and the reports [`Raft::persisted`], [`Raft::applied`],
//! [`Raft::snapshot_sent`], [`Raft::peer_unreachable`], [`Raft::compact`]. Output: [`Raft::ready`].
//! The same inputs always give the same outputs: randomness comes from the seeded [`Rng`] and
//! peers are iterated in `BTreeMap` order.
//!
//! Safety invariants kept here (checked by the simulator after every step):
//! - `commit` never decreases and never exceeds `log.last_index()`;
//! - a leader counts itself toward a quorum only up to `persisted` (Raft thesis §10.2.1);
//! - a leader commits only an entry of its own term by counting (Raft paper, Figure 8);
//! - a vote is granted at most once per term and only to an up-to-date log, and the vote
//!   response leaves only after the vote is durable;
//! - entries at or below `commit` are never truncated.

mod membership;
mod step;

use super::config::Config;
use super::limits::{pred, succ, INDEX_MAX, TERM_MAX};
use super::log::RaftLog;
use super::membership::ConfigHistory;
use super::message::{Message, MessageBody};
use super::progress::{Progress, ProgressState};
use super::read_index::{ReadIndexQueue, ReadLevel};
use super::ready::{LogRead, RaftError, ReadId, Ready, SnapshotSend};
use super::rng::Rng;
use raftkv_types::{
    Bytes, Entry, EntryKind, HardState, LogPrefix, Membership, NodeId, SnapshotMeta,
};
use std::collections::{BTreeMap, VecDeque};

/// Heartbeat rounds remembered for lease reads (older ones are too old to grant a lease).
const LEASE_ROUNDS_MAX: usize = 64;

/// A node's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
        }
    }
}

/// Durable state a node restarts from.
#[derive(Clone, Debug, Default)]
pub struct RestartState {
    pub hard_state: HardState,
    /// The newest snapshot (default: none, index 0).
    pub snapshot: SnapshotMeta,
    /// The durable log entries after the WAL's purge point whose payloads the node left on
    /// disk (they are applied): their terms, sizes and configurations. They may start at or
    /// before `snapshot.index + 1` (the WAL keeps a catch-up margin).
    pub prefix: LogPrefix,
    /// The durable log entries after the prefix (or after the WAL's purge point, when the
    /// prefix is empty), contiguous, with their payloads.
    pub entries: Vec<Entry>,
    /// The state machine's durable applied index (at least `snapshot.index`).
    pub applied: u64,
}

/// The consensus core of one node.
pub struct Raft {
    config: Config,
    rng: Rng,
    // Durable state.
    term: u64,
    vote: Option<NodeId>,
    log: RaftLog,
    commit: u64,
    /// The configurations the log holds; the latest is in effect (from its append on).
    configs: ConfigHistory,
    // Volatile state.
    role: Role,
    leader: Option<NodeId>,
    election_elapsed: u32,
    /// Follower: the leader was reported unreachable and an early campaign is scheduled.
    leader_lost: bool,
    heartbeat_elapsed: u32,
    election_timeout: u32,
    /// Local log durable up to here.
    persisted: u64,
    /// Reported applied by the node.
    applied: u64,
    /// Handed out to apply up to here.
    applying: u64,
    /// Candidate: votes received.
    votes: BTreeMap<NodeId, bool>,
    /// Leader: per-follower progress.
    progress: BTreeMap<NodeId, Progress>,
    transfer: Option<(NodeId, u32)>,
    reads: ReadIndexQueue,
    /// Leader: bytes appended and not yet committed.
    uncommitted_bytes: u64,
    /// Ticks since this core was created (the lease clock).
    ticks: u64,
    /// The newest clock reading the node passed in ([`Raft::advance_clock`]), in ms.
    clock_ms: u64,
    /// Leader with lease reads: (heartbeat round, clock reading when it was made), newest
    /// last, bounded by `LEASE_ROUNDS_MAX`. The heartbeat leaves after that reading, so a
    /// lease measured from it ends early, never late.
    heartbeat_rounds: VecDeque<(u64, u64)>,
    /// Reads this core released from its lease, without a round (a count for checks).
    lease_reads_served: u64,
    /// Until this clock reading this node votes for no one, itself included: it acknowledged
    /// a heartbeat that asked for a lease (0: no promise).
    promised_until_ms: u64,
    /// Created by `restart`: until an election timeout passes, behave as if a leader was
    /// heard from just before the crash (it may have been; see the lease check in `step`).
    restarted: bool,
    /// Leader: sent TimeoutNow this term. The target's election bypasses followers' lease, so
    /// this leader's lease can no longer be trusted.
    lease_revoked: bool,
    // Output not yet handed out.
    hard_state_handed: HardState,
    unstable_from: u64,
    snapshot_to_install: Option<SnapshotMeta>,
    messages_now: Vec<Message>,
    messages_after_persist: Vec<Message>,
    snapshot_sends: Vec<SnapshotSend>,
    log_reads: Vec<LogRead>,
    reads_dropped: Vec<ReadId>,
}

/// The entries of one append (see [`Raft::next_batch`]).
#[derive(Default)]
struct Batch {
    /// Held entries (empty when they are to be read from the WAL, or there are none).
    entries: Vec<Entry>,
    /// (first index, last index, bytes) carried, if any.
    range: Option<(u64, u64, u64)>,
    /// The node reads `range` from its WAL.
    from_wal: bool,
}

impl Raft {
    /// A brand-new member of a brand-new cluster. Every initial member bootstraps with the same
    /// `membership`: the log starts with the same committed Config entry (index 1, term 1) on
    /// all of them, so the configuration lives in the log from the start.
    pub fn bootstrap(config: Config, membership: Membership, seed: u64) -> Result<Raft, RaftError> {
        if !membership.voters.contains(&config.id) || membership.is_joint() {
            return Err(RaftError::InvalidConfig(format!(
                "node {} is not among the voters {:?}",
                config.id, membership.voters
            )));
        }
        membership
            .validate()
            .map_err(|e| RaftError::InvalidConfig(format!("membership: {e}")))?;
        let payload = membership
            .encode()
            .map_err(|e| RaftError::InvalidConfig(format!("membership: {e}")))?;
        let mut configs = ConfigHistory::new(0, membership.clone());
        configs.push(1, membership);
        let mut raft = Raft::empty(config, configs, seed)?;
        raft.term = 1;
        raft.log.append(Entry {
            index: 1,
            term: 1,
            kind: EntryKind::Config,
            payload: payload.into(),
        });
        raft.commit = 1;
        raft.unstable_from = 1;
        Ok(raft)
    }

    /// A new member joining a running cluster with an empty log: it knows the cluster's
    /// configuration (which must name it) only to accept the leader's messages, and takes
    /// everything else — the log or a snapshot, and the configurations in them — from the
    /// leader. A learner never campaigns; a member added as a voter may, but with an empty log
    /// it wins no vote (nor pre-vote) until it holds the committed log.
    pub fn join(config: Config, membership: Membership, seed: u64) -> Result<Raft, RaftError> {
        membership
            .validate()
            .map_err(|e| RaftError::InvalidConfig(format!("membership: {e}")))?;
        if !membership.contains(config.id) {
            return Err(RaftError::InvalidConfig(format!(
                "node {} is not in the cluster's configuration (voters {:?}, learners {:?}): \
                 add it first (`raftkv member add`)",
                config.id, membership.voters, membership.learners
            )));
        }
        let raft = Raft::empty(config, ConfigHistory::new(0, membership), seed)?;
        debug_assert!(raft.log.last_index() == 0 && raft.term == 0);
        Ok(raft)
    }

    /// A node restarting from its durable state.
    pub fn restart(config: Config, state: RestartState, seed: u64) -> Result<Raft, RaftError> {
        let RestartState {
            hard_state,
            snapshot,
            prefix,
            entries,
            applied,
        } = state;
        check_restart_ranges(&hard_state, &snapshot, &prefix, &entries)?;
        let (log, configs) = restart_log(&snapshot, &prefix, entries)?;
        let membership = configs.current().1;
        if membership.voters.is_empty() {
            return Err(RaftError::InvalidRestart(
                "no configuration: neither the snapshot nor the log holds one".into(),
            ));
        }
        if !membership.contains(config.id) {
            tracing::warn!(
                id = config.id,
                voters = ?membership.voters,
                "this node was removed from the cluster: it will not take part"
            );
        }
        let applied = applied.max(snapshot.index);
        if applied > log.last_index() {
            return Err(RaftError::InvalidRestart(format!(
                "applied index {applied} is beyond the log's last index {}",
                log.last_index()
            )));
        }
        let mut raft = Raft::empty(config, configs, seed)?;
        raft.term = hard_state.term;
        raft.vote = hard_state.vote;
        if log.last_term() > hard_state.term {
            // A torn write kept entries of a newer term but not the hard state written after
            // them. We were in that term; no vote of ours in it was sent (votes wait for the
            // hard state to be durable), so we are free to vote in it.
            raft.term = log.last_term();
            raft.vote = None;
        }
        // Entries are written before the hard state, so its commit index is covered by the
        // log; the clamp only guards against a WAL that breaks that order.
        raft.commit = hard_state
            .commit
            .max(snapshot.index)
            .max(applied)
            .min(log.last_index());
        raft.persisted = log.last_index();
        raft.applied = applied;
        raft.applying = applied;
        raft.unstable_from = succ(log.last_index());
        raft.log = log;
        raft.hard_state_handed = hard_state;
        raft.restarted = true;
        Ok(raft)
    }

    fn empty(config: Config, configs: ConfigHistory, seed: u64) -> Result<Raft, RaftError> {
        config.validate().map_err(RaftError::InvalidConfig)?;
        let mut raft = Raft {
            rng: Rng::new(seed ^ config.id.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            config,
            term: 0,
            vote: None,
            log: RaftLog::new(0, 0),
            commit: 0,
            configs,
            role: Role::Follower,
            leader: None,
            election_elapsed: 0,
            leader_lost: false,
            heartbeat_elapsed: 0,
            election_timeout: 0,
            persisted: 0,
            applied: 0,
            applying: 0,
            votes: BTreeMap::new(),
            progress: BTreeMap::new(),
            transfer: None,
            reads: ReadIndexQueue::default(),
            uncommitted_bytes: 0,
            ticks: 0,
            clock_ms: 0,
            heartbeat_rounds: VecDeque::new(),
            promised_until_ms: 0,
            lease_reads_served: 0,
            lease_revoked: false,
            restarted: false,
            hard_state_handed: HardState::default(),
            unstable_from: 1,
            snapshot_to_install: None,
            messages_now: Vec::new(),
            messages_after_persist: Vec::new(),
            snapshot_sends: Vec::new(),
            log_reads: Vec::new(),
            reads_dropped: Vec::new(),
        };
        raft.reset_election_timeout();
        Ok(raft)
    }

    // ----- accessors -----

    pub fn id(&self) -> NodeId {
        self.config.id
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn term(&self) -> u64 {
        self.term
    }
    pub fn vote(&self) -> Option<NodeId> {
        self.vote
    }
    pub fn role(&self) -> Role {
        self.role
    }
    /// The leader this node currently follows (itself if leader).
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    pub fn commit_index(&self) -> u64 {
        self.commit
    }
    pub fn applied_index(&self) -> u64 {
        self.applied
    }
    pub fn persisted_index(&self) -> u64 {
        self.persisted
    }
    pub fn log(&self) -> &RaftLog {
        &self.log
    }
    /// The configuration in effect: the latest one the log holds, committed or not.
    pub fn membership(&self) -> &Membership {
        self.configs.current().1
    }
    /// The index of the Config entry (or snapshot) that set [`Raft::membership`].
    pub fn membership_index(&self) -> u64 {
        self.configs.current().0
    }
    /// Whether a membership change is under way: a joint configuration, or a configuration
    /// not committed yet. A new change is refused until it completes.
    pub fn membership_in_flight(&self) -> bool {
        self.membership().is_joint() || self.membership_index() > self.commit
    }
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.commit,
        }
    }
    /// Leader only: a follower's progress.
    pub fn progress(&self, peer: NodeId) -> Option<&Progress> {
        self.progress.get(&peer)
    }
    /// Leader: how many peers it replicates to (members and lingering removed members).
    pub fn replica_count(&self) -> usize {
        self.progress.len()
    }
    /// Leader: the peers it replicates to (members and lingering removed members), sorted.
    pub fn replica_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.progress.keys().copied()
    }
    /// The leadership transfer in progress, if any.
    pub fn transfer_target(&self) -> Option<NodeId> {
        self.transfer.map(|(to, _)| to)
    }

    /// The configuration in effect at the commit index: the newest one known committed.
    pub fn committed_membership(&self) -> &Membership {
        self.configs.at(self.commit.max(self.log.base_index()))
    }

    /// Whether this node may campaign: it votes in its newest configuration, or in the
    /// committed one while a newer one that removes it is not committed yet. A server removed
    /// by a configuration still in flight may be needed to elect the leader that commits it
    /// (Raft thesis §4.2.2): if the leader that appended `C_new` lost leadership before
    /// `C_new` spread, the joint configuration's outgoing half may need it, and its log may be
    /// the only one up to date enough to win.
    pub fn may_campaign(&self) -> bool {
        let id = self.config.id;
        self.membership().is_voter(id) || self.committed_membership().is_voter(id)
    }

    /// Whether this node is the configuration's only voter (it needs nobody's agreement).
    fn single_voter(&self) -> bool {
        let m = self.membership();
        !m.is_joint() && m.voters.len() == 1 && m.voters.contains(&self.config.id)
    }

    /// The other voters of either half: whom a candidate asks for votes.
    fn voter_peers(&self) -> Vec<NodeId> {
        let id = self.config.id;
        self.membership()
            .all_voters()
            .into_iter()
            .filter(|&v| v != id)
            .collect()
    }

    /// Leader: everyone it replicates to (members, and removed members lingering until they
    /// learn of their removal), sorted.
    fn replica_peers(&self) -> Vec<NodeId> {
        self.progress.keys().copied().collect()
    }

    /// Moves `commit` forward to `commit`, which the log holds.
    fn set_commit(&mut self, commit: u64) {
        assert!(
            commit >= self.commit && commit <= self.log.last_index(),
            "commit {commit} outside {}..={}",
            self.commit,
            self.log.last_index()
        );
        self.commit = commit;
    }

    fn reset_election_timeout(&mut self) {
        self.leader_lost = false;
        self.election_elapsed = 0;
        self.election_timeout = self.rng.range(
            u64::from(self.config.election_timeout_min_ticks),
            u64::from(self.config.election_timeout_max_ticks),
        ) as u32;
    }

    // ----- output helpers -----

    fn send_with_term(&mut self, to: NodeId, term: u64, body: MessageBody) {
        let now = matches!(
            body,
            MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::TimeoutNow
                | MessageBody::Vote { pre: true, .. }
                | MessageBody::VoteResponse { pre: true, .. }
        );
        let outbox_len = self.messages_now.len() + self.messages_after_persist.len();
        if outbox_len >= self.config.outbox_msgs_max {
            tracing::warn!(
                to,
                "outbox full ({outbox_len} messages): dropping a message"
            );
            return;
        }
        let msg = Message {
            from: self.config.id,
            to,
            term,
            body,
        };
        if now {
            self.messages_now.push(msg);
        } else {
            self.messages_after_persist.push(msg);
        }
    }

    fn send(&mut self, to: NodeId, body: MessageBody) {
        self.send_with_term(to, self.term, body);
    }

    // ----- role changes -----

    fn become_follower(&mut self, term: u64, leader: Option<NodeId>) {
        if term > self.term {
            self.term = term;
            self.vote = None;
        }
        if self.role == Role::Leader {
            self.reads.step_down(&mut self.reads_dropped);
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.progress.clear();
        self.votes.clear();
        self.transfer = None;
        self.uncommitted_bytes = 0;
        self.reset_election_timeout();
    }

    fn campaign(&mut self, kind: Campaign) {
        if !self.may_campaign() {
            return;
        }
        let pre = kind == Campaign::PreVote;
        let transfer = kind == Campaign::Transfer;
        // The core never adopts a term at or above `TERM_MAX`, so this is unreachable short of
        // 2^62 elections; refusing to campaign is still better than wrapping.
        let Some(next_term) = self.term.checked_add(1).filter(|&t| t < TERM_MAX) else {
            tracing::error!(
                id = self.config.id,
                term = self.term,
                "term space exhausted"
            );
            return;
        };
        if self.role == Role::Leader {
            self.reads.step_down(&mut self.reads_dropped);
            self.progress.clear();
        }
        self.leader = None;
        self.votes.clear();
        self.votes.insert(self.config.id, true);
        self.reset_election_timeout();
        let vote_term = if pre {
            self.role = Role::PreCandidate;
            next_term
        } else {
            self.role = Role::Candidate;
            self.term = next_term;
            self.vote = Some(self.config.id);
            self.term
        };
        tracing::debug!(id = self.config.id, term = vote_term, pre, "campaign");
        if self.votes_won() {
            self.election_won();
            return;
        }
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        for peer in self.voter_peers() {
            self.send_with_term(
                peer,
                vote_term,
                MessageBody::Vote {
                    pre,
                    last_index,
                    last_term,
                    transfer,
                },
            );
        }
    }

    fn votes_won(&self) -> bool {
        self.membership()
            .is_quorum(|id| self.votes.get(&id) == Some(&true))
    }

    fn votes_lost(&self) -> bool {
        self.membership()
            .is_blocked(|id| self.votes.get(&id) == Some(&false))
    }

    fn election_won(&mut self) {
        if self.role == Role::PreCandidate {
            // A won pre-vote leads to a real election.
            self.campaign(Campaign::Election);
            return;
        }
        self.become_leader();
    }

    fn become_leader(&mut self) {
        tracing::debug!(id = self.config.id, term = self.term, "became leader");
        self.role = Role::Leader;
        self.leader = Some(self.config.id);
        self.votes.clear();
        self.transfer = None;
        self.heartbeat_elapsed = 0;
        self.election_elapsed = 0;
        self.heartbeat_rounds.clear();
        self.lease_revoked = false;
        let next = succ(self.log.last_index());
        let (id, ticks) = (self.config.id, self.ticks);
        self.progress = self
            .membership()
            .members()
            .into_iter()
            .filter(|&p| p != id)
            .map(|p| {
                let mut pr = Progress::new(
                    next,
                    self.config.inflight_msgs_max,
                    self.config.inflight_bytes_max,
                );
                pr.recent_active = true;
                pr.heard_at_tick = Some(ticks);
                (p, pr)
            })
            .collect();
        self.uncommitted_bytes = 0;
        let noop = Entry {
            index: next,
            term: self.term,
            kind: EntryKind::Noop,
            payload: Bytes::new(),
        };
        self.append_local(noop);
        self.maybe_commit();
    }

    fn append_local(&mut self, entry: Entry) {
        self.uncommitted_bytes += entry.size_bytes() as u64;
        self.log.append(entry);
    }

    // ----- inputs -----

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.ticks += 1;
        self.election_elapsed = self.election_elapsed.saturating_add(1);
        if self.role != Role::Leader {
            if !self.may_campaign() {
                // A learner never campaigns, nor a member removed by a committed configuration.
                return;
            }
            // The only voter needs nobody's vote and can compete with no one: waiting out an
            // election timeout would only delay a restarted single-node cluster.
            let alone = self.single_voter();
            if self.lease_promised() && !alone {
                // Promised a leader's lease: no vote for anyone yet, our own included.
                return;
            }
            if alone || self.election_elapsed >= self.election_timeout {
                let kind = if self.config.pre_vote {
                    Campaign::PreVote
                } else {
                    Campaign::Election
                };
                self.campaign(kind);
            }
            return;
        }
        self.heartbeat_elapsed += 1;
        self.tick_snapshot_waits();
        self.tick_removed_peers();
        if let Some((to, elapsed)) = self.transfer {
            if elapsed + 1 >= self.config.election_timeout_min_ticks {
                tracing::debug!(to, "leadership transfer timed out");
                self.transfer = None;
            } else {
                self.transfer = Some((to, elapsed + 1));
            }
        }
        if self.election_elapsed >= self.config.election_timeout_min_ticks {
            self.election_elapsed = 0;
            if self.config.check_quorum {
                let id = self.config.id;
                let active =
                    |p: NodeId| p == id || self.progress.get(&p).is_some_and(|pr| pr.recent_active);
                if !self.membership().is_quorum(active) {
                    tracing::debug!(id = self.config.id, "check-quorum failed: stepping down");
                    self.become_follower(self.term, None);
                    return;
                }
            }
            for pr in self.progress.values_mut() {
                pr.recent_active = false;
            }
        }
        if self.heartbeat_elapsed >= self.config.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            let round = if self.config.lease_reads {
                // Each heartbeat gets its own round so its send time can anchor a lease.
                let round = self.reads.start_round();
                self.record_round(round);
                round
            } else {
                self.reads.round()
            };
            self.broadcast_heartbeat(round);
        }
    }

    /// Leader: a delivered snapshot whose install was not acknowledged within
    /// `snapshot_install_wait_ticks` is given up on; the follower is probed again (and gets a
    /// new snapshot only if it still needs one).
    fn tick_snapshot_waits(&mut self) {
        let wait_ticks = self.config.snapshot_install_wait_ticks;
        for (&id, pr) in self.progress.iter_mut() {
            let Some(ticks) = pr.snapshot_delivered_ticks.as_mut() else {
                continue;
            };
            *ticks = ticks.saturating_add(1);
            if *ticks >= wait_ticks {
                tracing::info!(
                    peer = id,
                    wait_ticks,
                    "snapshot install not acknowledged; probing again"
                );
                pr.become_probe();
            }
        }
    }

    fn record_round(&mut self, round: u64) {
        if self.config.lease_reads {
            self.heartbeat_rounds.push_back((round, self.clock_ms));
            if self.heartbeat_rounds.len() > LEASE_ROUNDS_MAX {
                self.heartbeat_rounds.pop_front();
            }
        }
    }

    /// Lease reads: whether a quorum acknowledged a heartbeat made less than
    /// `Config::lease_trusted_ms` ago by the clock. Followers that acknowledged it will not
    /// vote for anyone until `lease_ms` of their clocks after receiving it, so no other leader
    /// can exist yet — provided no clock runs more than the drift allowed faster than ours.
    fn lease_valid(&self) -> bool {
        if self.lease_revoked {
            return false;
        }
        let round = self.reads.quorum_round(self.membership(), self.config.id);
        let trusted_ms = self.config.lease_trusted_ms();
        self.heartbeat_rounds
            .iter()
            .find(|&&(r, _)| r == round)
            .is_some_and(|&(_, made_ms)| {
                debug_assert!(made_ms <= self.clock_ms, "the clock went backwards");
                self.clock_ms < made_ms.saturating_add(trusted_ms)
            })
    }

    /// Whether this node promised a leader's lease not to vote yet (see `promised_until_ms`).
    fn lease_promised(&self) -> bool {
        self.clock_ms < self.promised_until_ms
    }

    /// The node's clock, in ms from any fixed origin: the shell passes a monotonic reading
    /// taken after the input it is about to step arrived, so a leader that was paused sees
    /// its lease lapsed before it serves a read that came in after the pause. Readings that go
    /// backwards are ignored.
    pub fn advance_clock(&mut self, now_ms: u64) {
        self.clock_ms = self.clock_ms.max(now_ms);
    }

    fn broadcast_heartbeat(&mut self, read_round: u64) {
        let lease_ms = if self.config.lease_reads {
            self.config.lease_ms
        } else {
            0
        };
        let targets: Vec<(NodeId, u64)> = self
            .progress
            .iter()
            .map(|(&id, pr)| (id, pr.match_index.min(self.commit)))
            .collect();
        for (to, commit) in targets {
            self.send(
                to,
                MessageBody::Heartbeat {
                    commit,
                    read_round,
                    lease_ms,
                },
            );
        }
    }

    /// Proposes a command. On the leader returns the (index, term) it will have if committed.
    /// The payload is taken as a shared buffer (a `Vec<u8>` converts without a copy); the log,
    /// every `Ready` and every `Append` share it from here on.
    pub fn propose(&mut self, payload: impl Into<Bytes>) -> Result<(u64, u64), RaftError> {
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        if let Some((to, _)) = self.transfer {
            return Err(RaftError::TransferInProgress { to });
        }
        if self.uncommitted_bytes >= self.config.uncommitted_bytes_max {
            return Err(RaftError::ProposalBacklogFull {
                uncommitted_bytes: self.uncommitted_bytes,
                uncommitted_bytes_max: self.config.uncommitted_bytes_max,
            });
        }
        if self.log.held_bytes() >= self.config.log_bytes_max {
            return Err(RaftError::LogFull {
                log_bytes: self.log.held_bytes(),
                log_bytes_max: self.config.log_bytes_max,
            });
        }
        let index = self.append_next(EntryKind::Normal, payload.into())?;
        self.maybe_commit();
        Ok((index, self.term))
    }

    /// Leader: appends an entry of this term at the next index (proposals and configurations
    /// alike), refusing past the index space; returns its index.
    fn append_next(&mut self, kind: EntryKind, payload: Bytes) -> Result<u64, RaftError> {
        debug_assert_eq!(self.role, Role::Leader);
        let index = succ(self.log.last_index());
        if index >= INDEX_MAX {
            return Err(RaftError::IndexSpaceExhausted { index });
        }
        self.append_local(Entry {
            index,
            term: self.term,
            kind,
            payload,
        });
        Ok(index)
    }

    /// Asks for a linearizable read: [`Self::read_index_at`] at [`ReadLevel::Linearizable`].
    pub fn read_index(&mut self, id: ReadId) -> Result<(), RaftError> {
        self.read_index_at(id, ReadLevel::Linearizable)
    }

    /// Asks for a read at `level`. The read comes back in `Ready::read_states` once safe, or
    /// in `Ready::reads_dropped` if leadership is lost first. A linearizable read always waits
    /// for a heartbeat round started after it arrived (or needs none with a single voter); a
    /// lease read is released at once while the lease holds (`Config::lease_reads` on), and
    /// otherwise waits for a round like a linearizable one.
    pub fn read_index_at(&mut self, id: ReadId, level: ReadLevel) -> Result<(), RaftError> {
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        if self.reads.len() >= self.config.pending_reads_max {
            return Err(RaftError::ReadBacklogFull {
                pending_reads_max: self.config.pending_reads_max,
            });
        }
        if self.log.term(self.commit) != Some(self.term) {
            self.reads.push_before_noop(id);
        } else if self.single_voter() {
            self.reads.push_confirmed(id, self.commit);
        } else if level == ReadLevel::Lease && self.config.lease_reads && self.lease_valid() {
            debug_assert!(self.config.check_quorum && !self.lease_revoked);
            self.lease_reads_served += 1;
            self.reads.push_confirmed(id, self.commit);
        } else {
            self.reads.push(id, self.commit);
        }
        debug_assert!(self.reads.len() <= self.config.pending_reads_max);
        Ok(())
    }

    /// Starts handing leadership to `to`: catch it up, then tell it to campaign at once.
    /// Proposals are refused until it succeeds or an election timeout passes.
    pub fn transfer_leadership(&mut self, to: NodeId) -> Result<(), RaftError> {
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        if to == self.config.id {
            return Ok(());
        }
        if !self.membership().voters.contains(&to) {
            return Err(RaftError::NotAVoter(to));
        }
        let Some(pr) = self.progress.get(&to) else {
            return Err(RaftError::UnknownPeer(to));
        };
        let caught_up = pr.match_index == self.log.last_index();
        self.transfer = Some((to, 0));
        if caught_up {
            self.lease_revoked = true;
            self.send(to, MessageBody::TimeoutNow);
        }
        Ok(())
    }

    /// The log is durable up to (`index`, `term`).
    pub fn persisted(&mut self, index: u64, term: u64) {
        if index > self.persisted && self.log.term(index) == Some(term) {
            self.persisted = index;
            if self.role == Role::Leader {
                self.maybe_commit();
            }
        }
    }

    /// The state machine applied everything up to `index`.
    pub fn applied(&mut self, index: u64) {
        self.applied = self.applied.max(index.min(self.applying));
        let cache_max = self.config.log_cache_bytes_max;
        if self.log.held_bytes() > cache_max {
            // Down to half, so eviction runs once per half cache of applies, not per apply.
            let held_from = self.log.evict_to_bytes(self.applied, cache_max / 2);
            debug_assert!(held_from > self.applied || self.log.held_bytes() <= cache_max / 2);
        }
    }

    /// The node finished (or failed) streaming a snapshot to `peer`. After a success nothing
    /// is sent to `peer` until it acknowledges the install (or `snapshot_install_wait_ticks`
    /// pass); after a failure it is probed again.
    pub fn snapshot_sent(&mut self, peer: NodeId, ok: bool) {
        let Some(pr) = self.progress.get_mut(&peer) else {
            return;
        };
        if let ProgressState::Snapshot { .. } = pr.state {
            if ok {
                // Delivered: the follower installs it and then acknowledges its index. Until
                // then (or `snapshot_install_wait_ticks`) send nothing, above all no second
                // copy (issue 13: a follower received the same 328 MB snapshot twice).
                if pr.snapshot_delivered_ticks.is_none() {
                    pr.snapshot_delivered_ticks = Some(0);
                }
                return;
            }
            pr.state = ProgressState::Snapshot { pending_index: 0 };
            pr.become_probe();
            // Wait for the follower's answer (or the next heartbeat response) before probing.
            pr.probe_sent = true;
        }
    }

    /// An append to `peer` was lost before it left (the node could not read its entries
    /// back from the WAL): stop streaming to it optimistically and probe where it is.
    pub fn append_lost(&mut self, peer: NodeId) {
        if let Some(pr) = self.progress.get_mut(&peer) {
            if pr.state == ProgressState::Replicate {
                pr.become_probe();
            }
        }
    }

    /// The node could not reach `peer`: stop streaming to it optimistically.
    pub fn peer_unreachable(&mut self, peer: NodeId) {
        self.append_lost(peer);
        if self.role == Role::Follower && self.leader == Some(peer) && self.config.fast_failover {
            let rank = self
                .voter_peers()
                .into_iter()
                .filter(|&id| id != peer && id < self.config.id)
                .count() as u32;
            let mut first = self.election_elapsed.saturating_add(1);
            if self.lease_promised() {
                // The leader may still serve reads from its lease (it may be alive, only cut
                // off from us): wait the promise out, which the ticks below cover when every
                // node runs the same timeouts (`tick` checks the promise anyway).
                first = first.max(self.config.election_timeout_min_ticks);
            }
            let soon = first.saturating_add(2 * rank);
            tracing::debug!(
                id = self.config.id,
                leader = peer,
                in_ticks = soon.saturating_sub(self.election_elapsed),
                "leader unreachable: campaigning early"
            );
            self.leader = None;
            self.leader_lost = true;
            self.election_timeout = self.election_timeout.min(soon);
            debug_assert!(soon > self.election_elapsed);
        }
    }

    /// The node took a snapshot covering at least `index` (whose entry has `term`): drop the
    /// log up to `index`. `index` must be applied.
    pub fn compact(&mut self, index: u64, term: u64) -> Result<(), RaftError> {
        if index <= self.log.base_index() {
            return Ok(());
        }
        if index > self.applied {
            return Err(RaftError::InvalidCompaction {
                index,
                reason: format!("not applied yet (applied {})", self.applied),
            });
        }
        if self.log.term(index) != Some(term) {
            return Err(RaftError::InvalidCompaction {
                index,
                reason: format!("term {term} does not match {:?}", self.log.term(index)),
            });
        }
        self.log.compact(index);
        self.configs.compact(index);
        Ok(())
    }

    /// Leader: advances `commit` to the highest index a quorum holds, if it is of this term.
    fn maybe_commit(&mut self) {
        debug_assert_eq!(self.role, Role::Leader);
        // Thesis §10.2.1: the leader counts itself only up to what it has persisted.
        let own = self.persisted.min(self.log.last_index());
        let id = self.config.id;
        let matched = |p: NodeId| {
            if p == id {
                own
            } else {
                self.progress.get(&p).map_or(0, |pr| pr.match_index)
            }
        };
        let candidate = self.membership().quorum_value(matched);
        // Figure 8: only an entry of this leader's term is committed by counting replicas.
        if candidate > self.commit && self.log.term(candidate) == Some(self.term) {
            debug_assert!(
                self.membership().is_quorum(|p| matched(p) >= candidate),
                "committing {candidate} without a durable quorum"
            );
            let first_of_term = self.log.term(self.commit) != Some(self.term);
            for index in succ(self.commit)..=candidate {
                if let Some(e) = self.log.entry(index) {
                    if e.term == self.term {
                        self.uncommitted_bytes =
                            self.uncommitted_bytes.saturating_sub(e.size_bytes() as u64);
                    }
                }
            }
            self.set_commit(candidate);
            if first_of_term {
                // Our no-op committed: we now know the commit index; reads may proceed.
                let confirm = self.single_voter();
                self.reads.noop_committed(self.commit, confirm);
            }
            self.advance_membership();
        }
    }

    /// Leader: sends appends (or a snapshot request) to `peer` as its progress allows.
    fn send_appends(&mut self, peer: NodeId) {
        loop {
            let last_index = self.log.last_index();
            let commit = self.commit;
            let base_index = self.log.base_index();
            let Some(pr) = self.progress.get_mut(&peer) else {
                return;
            };
            let has_entries = pr.next_index <= last_index;
            let commit_due = commit > pr.commit_sent;
            let append_due = pr.append_due;
            if !(has_entries || commit_due || append_due) || pr.is_paused() {
                return;
            }
            pr.append_due = false;
            let prev_index = pred(pr.next_index);
            if prev_index < base_index {
                pr.become_snapshot(base_index);
                self.snapshot_sends.push(SnapshotSend {
                    to: peer,
                    term: self.term,
                });
                return;
            }
            let Some(prev_term) = self.log.term(prev_index) else {
                return;
            };
            let Some(batch) = self.next_batch(peer) else {
                return;
            };
            let Some(via_log) = self.record_sent(peer, &batch, prev_index, commit) else {
                return;
            };
            let stop = batch.range.is_none();
            let body = MessageBody::Append {
                prev_index,
                prev_term,
                entries: batch.entries,
                commit,
            };
            if via_log {
                let (lo, hi) = match (batch.from_wal, batch.range) {
                    (true, Some((lo, hi, _))) => (lo, hi),
                    _ => (1, 0),
                };
                self.push_log_read(peer, body, lo, hi);
            } else {
                self.send(peer, body);
            }
            if stop {
                return;
            }
        }
    }

    /// Updates `peer`'s progress for an append of `batch` after `prev_index`, and says
    /// whether it must go through the node's WAL reads (to stay in order behind earlier ones).
    fn record_sent(
        &mut self,
        peer: NodeId,
        batch: &Batch,
        prev_index: u64,
        commit: u64,
    ) -> Option<bool> {
        let pr = self.progress.get_mut(&peer)?;
        match pr.state {
            ProgressState::Replicate => {
                if let Some((_, hi, bytes)) = batch.range {
                    pr.next_index = succ(hi);
                    pr.inflights.add(hi, bytes);
                    pr.debug_check();
                }
            }
            _ => {
                // Probe (a snapshot wait is paused): the one append left unanswered.
                debug_assert!(!pr.probe_sent, "a second unanswered probe");
                pr.probe_sent = true;
            }
        }
        let sent_last = batch.range.map_or(prev_index, |(_, hi, _)| hi);
        debug_assert!(sent_last >= prev_index);
        // The follower may commit only what it is known (or about to be known) to hold.
        pr.commit_sent = pr.commit_sent.max(commit.min(sent_last));
        let via_log = batch.from_wal || pr.log_read_through > pr.match_index;
        if via_log {
            pr.log_read_through = pr.log_read_through.max(sent_last);
        }
        Some(via_log)
    }

    /// The entries of `peer`'s next append: held ones from memory, or (when its next index
    /// was evicted) a range for the node to read from the WAL, up to the first held entry.
    fn next_batch(&self, peer: NodeId) -> Option<Batch> {
        let pr = self.progress.get(&peer)?;
        let (lo, last) = (pr.next_index, self.log.last_index());
        if lo > last {
            return Some(Batch::default());
        }
        let held_from = self.log.held_from();
        if lo >= held_from {
            let entries = self.log.slice(lo, last, self.config.append_bytes_max);
            let hi = entries.last().map(|e| e.index)?;
            let bytes = entries.iter().map(|e| e.size_bytes() as u64).sum();
            debug_assert_eq!(entries[0].index, lo, "a held slice starts where asked");
            return Some(Batch {
                entries,
                range: Some((lo, hi, bytes)),
                from_wal: false,
            });
        }
        // Evicted entries are applied: durable in the WAL (unless compaction purged them
        // since, and then the read fails and the follower is probed again).
        let (hi, bytes) = self
            .log
            .span_end(lo, pred(held_from), self.config.append_bytes_max)?;
        debug_assert!(hi <= self.applied, "only applied entries are evicted");
        Some(Batch {
            entries: Vec::new(),
            range: Some((lo, hi, bytes)),
            from_wal: true,
        })
    }

    fn push_log_read(&mut self, to: NodeId, body: MessageBody, lo: u64, hi: u64) {
        if self.log_reads.len() >= self.config.outbox_msgs_max {
            tracing::warn!(to, "log read queue full: dropping an append");
            return;
        }
        self.log_reads.push(LogRead {
            message: Message {
                from: self.config.id,
                to,
                term: self.term,
                body,
            },
            lo,
            hi,
        });
    }

    /// Takes everything the node has to do now. Never blocks; cheap when there is nothing.
    pub fn ready(&mut self) -> Ready {
        if self.role == Role::Leader {
            if let Some(round) = self.reads.start_round_if_due() {
                self.record_round(round);
                self.broadcast_heartbeat(round);
            }
            for peer in self.replica_peers() {
                self.send_appends(peer);
            }
        }
        let mut ready = Ready::default();
        let hs = self.hard_state();
        if hs != self.hard_state_handed {
            self.hard_state_handed = hs;
            ready.hard_state = Some(hs);
        }
        ready.snapshot = self.snapshot_to_install.take();
        if self.unstable_from <= self.log.last_index() {
            ready.entries = self
                .log
                .slice(self.unstable_from, self.log.last_index(), u64::MAX);
            self.unstable_from = succ(self.log.last_index());
        }
        let apply_to = self.commit.min(self.persisted);
        if apply_to > self.applying {
            ready.committed =
                self.log
                    .slice(succ(self.applying), apply_to, self.config.apply_bytes_max);
            if let Some(last) = ready.committed.last() {
                self.applying = last.index;
            }
        }
        self.reads
            .take_applied(self.applied, &mut ready.read_states);
        ready.messages_now = std::mem::take(&mut self.messages_now);
        ready.messages_after_persist = std::mem::take(&mut self.messages_after_persist);
        ready.snapshot_sends = std::mem::take(&mut self.snapshot_sends);
        ready.log_reads = std::mem::take(&mut self.log_reads);
        ready.reads_dropped = std::mem::take(&mut self.reads_dropped);
        ready
    }

    /// Reads released from the leader's lease, without a heartbeat round, by this core.
    pub fn lease_reads_served(&self) -> u64 {
        self.lease_reads_served
    }

    /// Reads held by the leader's queues: waiting for the no-op, for a heartbeat round, or
    /// (confirmed) for their index to be applied.
    pub fn pending_reads(&self) -> usize {
        self.reads.len()
    }
}

/// Durable state written before terms and indexes were bounded (or damaged) can hold values
/// the core must never act on: refuse to start rather than wrap later.
fn check_restart_ranges(
    hard_state: &HardState,
    snapshot: &SnapshotMeta,
    prefix: &LogPrefix,
    entries: &[Entry],
) -> Result<(), RaftError> {
    let prefix_last = prefix
        .last_index()
        .map(|i| (i, prefix.term_runs.last().map_or(0, |&(_, t)| t)));
    let last = entries
        .last()
        .map(|e| (e.index, e.term))
        .or(prefix_last)
        .unwrap_or((0, 0));
    let terms = [hard_state.term, snapshot.term, last.1];
    let indexes = [hard_state.commit, snapshot.index, last.0];
    if terms.iter().any(|&t| t >= TERM_MAX) || indexes.iter().any(|&i| i >= INDEX_MAX) {
        return Err(RaftError::InvalidRestart(format!(
            "durable terms {terms:?} or indexes {indexes:?} out of range (terms below \
             {TERM_MAX}, indexes below {INDEX_MAX})"
        )));
    }
    Ok(())
}

/// The restarted log and configuration history: the prefix (terms and sizes only), then the
/// entries, checked contiguous, with terms that never decrease and agree with the snapshot.
fn restart_log(
    snapshot: &SnapshotMeta,
    prefix: &LogPrefix,
    entries: Vec<Entry>,
) -> Result<(RaftLog, ConfigHistory), RaftError> {
    let invalid = |why: String| RaftError::InvalidRestart(why);
    let runs = &prefix.term_runs;
    let runs_ok = prefix.sizes.is_empty() == runs.is_empty()
        && runs.first().is_none_or(|&(i, _)| i == prefix.first_index)
        && runs.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 > w[0].1)
        && runs
            .last()
            .is_none_or(|&(i, _)| Some(i) <= prefix.last_index());
    if !runs_ok {
        return Err(invalid(
            "the log prefix's term runs are not ascending".into(),
        ));
    }
    for pair in entries.windows(2) {
        if pair[1].index != succ(pair[0].index) || pair[1].term < pair[0].term {
            return Err(invalid(format!(
                "log not contiguous at index {}",
                pair[1].index
            )));
        }
    }
    if let (Some(last), Some(first)) = (prefix.last_index(), entries.first()) {
        let prefix_term = runs.last().map_or(0, |&(_, t)| t);
        if first.index != succ(last) || first.term < prefix_term {
            return Err(invalid(format!(
                "log not contiguous at index {}",
                first.index
            )));
        }
    }
    // (index, term) of the first entry of the whole restarted log.
    let first = match runs.first() {
        Some(&(_, t)) => Some((prefix.first_index, t)),
        None => entries.first().map(|e| (e.index, e.term)),
    };
    let mut base = (snapshot.index, snapshot.term);
    let mut skip = 0u64;
    if let Some((first_index, first_term)) = first {
        if first_index > succ(snapshot.index) {
            return Err(invalid(format!(
                "gap between snapshot {} and first entry {first_index}",
                snapshot.index
            )));
        }
        if first_index <= snapshot.index {
            // The WAL kept a margin before the snapshot: the first entry becomes the base.
            let log_term = term_in(prefix, &entries, snapshot.index);
            if log_term.is_some_and(|t| t != snapshot.term) {
                return Err(invalid(format!(
                    "entry {} has term {log_term:?} but the snapshot says {}",
                    snapshot.index, snapshot.term
                )));
            }
            base = (first_index, first_term);
            skip = 1;
        }
    }
    let mut trimmed = prefix.clone();
    let mut entries = entries;
    if skip == 1 {
        if trimmed.sizes.is_empty() {
            entries.remove(0);
        } else {
            trim_front(&mut trimmed);
        }
    }
    let mut log = RaftLog::restarted(base.0, base.1, &trimmed);
    // Config entries in the WAL's margin before the snapshot are in its membership.
    let mut configs = ConfigHistory::new(snapshot.index, snapshot.membership.clone());
    let all_configs = prefix.configs.iter().chain(entries.iter());
    for e in all_configs.filter(|e| e.kind == EntryKind::Config && e.index > snapshot.index) {
        let m =
            decode_config(e).map_err(|why| invalid(format!("config entry {}: {why}", e.index)))?;
        configs.push(e.index, m);
    }
    // Moved, not cloned: the held suffix can be large.
    for e in entries {
        log.append(e);
    }
    Ok((log, configs))
}

/// The term of `index` in a restart state's prefix or entries.
fn term_in(prefix: &LogPrefix, entries: &[Entry], index: u64) -> Option<u64> {
    if prefix
        .last_index()
        .is_some_and(|last| index >= prefix.first_index && index <= last)
    {
        let run = prefix
            .term_runs
            .partition_point(|&(first, _)| first <= index);
        return run.checked_sub(1).map(|k| prefix.term_runs[k].1);
    }
    entries.iter().find(|e| e.index == index).map(|e| e.term)
}

/// Drops the first entry a prefix describes (it becomes the log's base).
fn trim_front(prefix: &mut LogPrefix) {
    debug_assert!(!prefix.sizes.is_empty());
    prefix.sizes.remove(0);
    prefix.first_index = succ(prefix.first_index);
    if prefix.term_runs.len() > 1 && prefix.term_runs[1].0 <= prefix.first_index {
        prefix.term_runs.remove(0);
    }
    if prefix.sizes.is_empty() {
        prefix.term_runs.clear();
    } else if let Some(run) = prefix.term_runs.first_mut() {
        run.0 = prefix.first_index;
    }
}

/// Which kind of election a node starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Campaign {
    /// A pre-vote round: asks whether peers would vote, without changing any term.
    PreVote,
    /// A real election (after a won pre-vote, or when pre-vote is off).
    Election,
    /// A real election asked for by the leader (TimeoutNow): passes followers' lease check.
    Transfer,
}

/// The configuration a Config entry carries, with at least one voter.
fn decode_config(e: &Entry) -> Result<Membership, String> {
    debug_assert_eq!(e.kind, EntryKind::Config);
    let m = Membership::decode(&e.payload).map_err(|err| err.to_string())?;
    if m.voters.is_empty() {
        return Err("a configuration without voters".into());
    }
    Ok(m)
}
