//! Membership changes in the simulator: the operator's side and the checks configurations add.
//!
//! Why a module of its own: `sim.rs` is the node runtime's shell and the fault injector; what
//! an operator does to the configuration (issue 10) is a separate concern with its own
//! bookkeeping (spare ids, waiting requests, nodes joining and retiring) and its own safety
//! properties.
//!
//! What an operator does, on a seeded schedule drawn from its own generator (so the other
//! faults of a seed keep their schedule): about every 2–6 simulated seconds, one of: add a
//! learner or (rarely) a voter under a spare id, promote a learner, remove a voter, the leader
//! itself or a learner, or several at once in one joint change (promote one and remove
//! another, replace a voter by a new one, remove two) — one in eight with `force`, one in
//! eight sent to a random node (which answers NotLeader) instead of the leader, one in five
//! followed by a crash of the node it went to (a leader killed in the middle of its change).
//! The request is resolved against the leader's configuration when it fires and goes in as
//! `Request::ChangeMembership`; guard refusals (409, 404) are expected and counted. A node
//! added starts with an empty data dir through `Start::Join` with the cluster's configuration
//! (the leader's, else the newest a running member has) as soon as the operator, who looks
//! every half second, sees it there: a new voter may be needed for its own change to
//! complete. A removed node is stopped for good some time after its removal completed, or
//! left running (it must stay harmless). Ids are never reused.
//!
//! Checked (with the other safety checks, after every step):
//! - a committed entry is durable on a quorum of the configuration its committer had in
//!   effect (a majority of each half of a joint one) when first seen committed, and again
//!   when applied or acknowledged;
//! - a node campaigns only while its newest configuration, or the committed one, makes it a
//!   voter (one removed by a configuration still in flight may be needed to elect the leader
//!   that commits it: Raft thesis §4.2.2), and never leads while its own names it a learner;
//! - a node removed by a committed configuration never wins an election afterwards, and a
//!   leader steps down as soon as its log commits the configuration removing it.

use super::{Checker, Event, Fault, Sim};
use raftkv::api::{ClusterStatus, ServiceError};
use raftkv::node::messages::{Input, Request as NodeRequest};
use raftkv::raft::rng::Rng;
use raftkv::raft::{MemberChange, MembershipProposal, Raft, Role};
use raftkv::storage::{Entry, EntryKind, MemberAddrs, Membership, NodeId};
use std::collections::BTreeMap;
use tokio::sync::oneshot;

/// Spare ids of a seed with membership changes (nodes beyond the initial voters).
const SPARES: u64 = 4;
/// The most voters a change may leave (the cluster starts with 3 or 5).
const VOTERS_MAX: usize = 5;
/// How often the operator starts the members the cluster's configuration names that never
/// ran.
pub(super) const OPERATOR_EVERY_MS: u64 = 500;
/// Percent of completed removals after which the removed node is stopped for good.
const RETIRE_PCT: u64 = 60;

/// What an operator asks for; the ids are chosen when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberKind {
    AddLearner,
    AddVoter,
    Promote,
    /// A voter other than the leader.
    RemoveVoter,
    /// The leader the request goes to.
    RemoveLeader,
    RemoveLearner,
    /// One joint change: a learner promoted, a voter removed.
    PromoteAndRemove,
    /// One joint change: a new voter added, a voter removed.
    ReplaceVoter,
    /// One joint change: two voters removed.
    RemoveTwo,
}

/// Kinds with their weights out of 20.
const KINDS: [(MemberKind, u64); 9] = [
    (MemberKind::AddLearner, 5),
    (MemberKind::AddVoter, 1),
    (MemberKind::Promote, 5),
    (MemberKind::RemoveVoter, 2),
    (MemberKind::RemoveLeader, 2),
    (MemberKind::RemoveLearner, 1),
    (MemberKind::PromoteAndRemove, 2),
    (MemberKind::ReplaceVoter, 1),
    (MemberKind::RemoveTwo, 1),
];

/// One membership request of the schedule (what it asks is chosen when it fires, among the
/// kinds the configuration then allows).
#[derive(Clone, Copy, Debug)]
pub struct MemberAction {
    /// Skip the reachable-quorum guard.
    pub force: bool,
    /// Sent to the leader (else to a random node).
    pub to_leader: bool,
    /// Crash the node it was sent to this many ms later (a leader killed in the middle of
    /// its change, as in `kill -9` during a joint change).
    pub crash_after_ms: Option<u64>,
}

/// Counters of membership changes per run.
#[derive(Clone, Debug, Default)]
pub struct MemberStats {
    /// Requests sent.
    pub proposed: u64,
    /// Requests answered as complete, and what they did.
    pub completed: u64,
    pub add_learner: u64,
    pub add_voter: u64,
    pub promote: u64,
    pub remove_voter: u64,
    /// Removals of the leader the request went to (counted in `remove_voter` too).
    pub remove_leader: u64,
    pub remove_learner: u64,
    /// Completed requests of several changes (one joint configuration).
    pub joint_multi: u64,
    pub forced: u64,
    /// Refusals: 409 (a guard), 404, 400, NotLeader, 503.
    pub refused_conflict: u64,
    pub refused_not_found: u64,
    pub refused_invalid: u64,
    pub not_leader: u64,
    pub unavailable: u64,
    /// Answered with an unknown outcome (504).
    pub unknown: u64,
    /// Actions that found nothing to do (no leader, no spare id, no learner, voter bounds).
    pub skipped: u64,
    /// Nodes a change went to that were then crashed in its middle.
    pub crashed_mid_change: u64,
    /// Nodes started by a join, and removed nodes stopped for good.
    pub joined: u64,
    pub retired: u64,
    /// Peer messages the transports' peer sets kept from leaving or arriving.
    pub unlinked_drops: u64,
    /// Members of the final configuration cut off from the final leader for good by the
    /// transports' peer sets: a member whose own configuration predates the leader's
    /// membership (it was away while the cluster changed around it) has no address for the
    /// leader and its listener refuses it. A known limitation of the transport (the listener
    /// accepts only the node's current peers); liveness does not wait for such members.
    pub stranded: u64,
}

impl MemberStats {
    pub fn add(&mut self, o: &MemberStats) {
        let pairs = [
            (&mut self.proposed, o.proposed),
            (&mut self.completed, o.completed),
            (&mut self.add_learner, o.add_learner),
            (&mut self.add_voter, o.add_voter),
            (&mut self.promote, o.promote),
            (&mut self.remove_voter, o.remove_voter),
            (&mut self.remove_leader, o.remove_leader),
            (&mut self.remove_learner, o.remove_learner),
            (&mut self.joint_multi, o.joint_multi),
            (&mut self.forced, o.forced),
            (&mut self.refused_conflict, o.refused_conflict),
            (&mut self.refused_not_found, o.refused_not_found),
            (&mut self.refused_invalid, o.refused_invalid),
            (&mut self.not_leader, o.not_leader),
            (&mut self.unavailable, o.unavailable),
            (&mut self.unknown, o.unknown),
            (&mut self.skipped, o.skipped),
            (&mut self.crashed_mid_change, o.crashed_mid_change),
            (&mut self.joined, o.joined),
            (&mut self.retired, o.retired),
            (&mut self.unlinked_drops, o.unlinked_drops),
            (&mut self.stranded, o.stranded),
        ];
        for (mine, theirs) in pairs {
            *mine += theirs;
        }
    }
}

/// A membership request waiting for its answer from the node it went to.
pub(super) struct WaitingChange {
    kind: MemberKind,
    changes: Vec<MemberChange>,
    force: bool,
    /// It removes the node it went to, which led then.
    removes_leader: bool,
    rx: oneshot::Receiver<Result<ClusterStatus, ServiceError>>,
}

/// The membership part of a seed's schedule: (spare ids, requests). A quarter of the seeds
/// have none (and no spares), so the fixed-membership schedules keep their share.
pub(super) fn schedule(seed: u64, run_ms: u64) -> (u64, Vec<(u64, Fault)>) {
    let mut rng = Rng::new(seed.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ 0x3E3B);
    if rng.range(0, 4) == 0 || std::env::var("RAFTKV_SIM_NO_MEMBERSHIP").is_ok() {
        return (0, Vec::new());
    }
    let gap_ms = rng.range(2000, 6001);
    let mut out = Vec::new();
    for _ in 0..run_ms / gap_ms {
        // Not in the last seconds: a change then would still be settling at healing.
        let at = rng.range(0, run_ms.saturating_sub(1500).max(1));
        let force = rng.range(0, 8) == 0;
        let to_leader = rng.range(0, 8) != 0;
        let crash_after_ms = (rng.range(0, 5) == 0).then(|| rng.range(0, 400));
        let action = MemberAction {
            force,
            to_leader,
            crash_after_ms,
        };
        out.push((at, Fault::Member(action)));
    }
    debug_assert!(out.len() as u64 <= run_ms / 2000);
    (SPARES, out)
}

fn addrs(id: NodeId) -> MemberAddrs {
    MemberAddrs {
        peer_addr: format!("sim-{id}"),
        client_url: format!("sim://{id}"),
    }
}

impl Sim {
    /// The operator's events: a removed node stopped for good, a crash in the middle of a
    /// change, the periodic look for members that never ran.
    pub(super) fn member_event(&mut self, ev: Event) -> Result<(), String> {
        match ev {
            Event::Retire(id) => self.retire(id)?,
            Event::CrashMidChange {
                node,
                incarnation,
                down_ms,
            } => {
                if self.incarnation(node) == incarnation && !self.healed {
                    self.stats.member.crashed_mid_change += 1;
                    self.arm_crash(node, down_ms);
                }
            }
            Event::Operator => {
                self.start_pending_joiners()?;
                self.schedule(OPERATOR_EVERY_MS, Event::Operator);
            }
            other => unreachable!("not an operator's event: {other:?}"),
        }
        Ok(())
    }

    /// Sends the request `action` describes, resolved against the leader's configuration.
    pub(super) fn member_action(&mut self, action: MemberAction) -> Result<(), String> {
        self.start_pending_joiners()?;
        let Some(leader) = self.current_leader() else {
            self.stats.member.skipped += 1;
            return Ok(());
        };
        let target = if action.to_leader {
            leader
        } else {
            self.random_node()
        };
        let n = &self.nodes[&target];
        if n.live.is_none() || n.paused_until.is_some_and(|u| u > self.now) {
            self.stats.member.skipped += 1;
            return Ok(());
        }
        let config = self.live_ref(leader).consensus.raft().membership().clone();
        let Some(kind) = self.choose_kind(&config, leader) else {
            self.stats.member.skipped += 1;
            return Ok(());
        };
        let changes = self.plan_changes(kind, &config, leader);
        debug_assert!(!changes.is_empty());
        let removes_leader =
            target == leader && changes.contains(&MemberChange::Remove { id: target });
        let proposal = MembershipProposal {
            changes: changes.clone(),
            known_addrs: BTreeMap::new(),
            force: action.force,
        };
        let (reply, rx) = oneshot::channel();
        let waiting = WaitingChange {
            kind,
            changes,
            force: action.force,
            removes_leader,
            rx,
        };
        if self.trace {
            eprintln!(
                "[{:>6}] membership {kind:?} {:?} (force {}) sent to node {target}",
                self.now, waiting.changes, waiting.force
            );
        }
        self.live(target).expect("up").changes.push(waiting);
        self.stats.member.proposed += 1;
        let request = NodeRequest::ChangeMembership { proposal, reply };
        self.step(target, Input::Request(request))?;
        if let Some(ms) = action.crash_after_ms {
            let down_ms = self.rng.range(0, 1500);
            let incarnation = self.incarnation(target);
            self.schedule(
                ms,
                Event::CrashMidChange {
                    node: target,
                    incarnation,
                    down_ms,
                },
            );
        }
        Ok(())
    }

    /// A kind of change configuration `m` (led by `leader`) allows, by weight; `None` if none
    /// does. Voters stay within 1..=`VOTERS_MAX`, and the cluster shrinks to one or two
    /// voters only now and then (a cluster of one sees little).
    fn choose_kind(&mut self, m: &Membership, leader: NodeId) -> Option<MemberKind> {
        let (voters, learners) = (m.voters.len(), m.learners.len());
        let spare = !self.spares_unused.is_empty();
        let room = voters < VOTERS_MAX;
        let shrink = voters > 3 || (voters > 1 && self.chance(25));
        let others = m.voters.iter().any(|&v| v != leader);
        let allowed = |k: MemberKind| match k {
            MemberKind::AddLearner => spare,
            MemberKind::AddVoter => spare && room,
            MemberKind::Promote => learners > 0 && room,
            MemberKind::RemoveVoter => shrink && others,
            MemberKind::RemoveLeader => shrink,
            MemberKind::RemoveLearner => learners > 0,
            MemberKind::PromoteAndRemove => learners > 0 && voters > 1,
            MemberKind::ReplaceVoter => spare && voters > 1,
            MemberKind::RemoveTwo => voters >= 4,
        };
        let feasible: Vec<(MemberKind, u64)> =
            KINDS.iter().copied().filter(|&(k, _)| allowed(k)).collect();
        let total: u64 = feasible.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return None;
        }
        let mut pick = self.rng.range(0, total);
        for (k, w) in feasible {
            if pick < w {
                return Some(k);
            }
            pick -= w;
        }
        unreachable!("a pick below the total weight")
    }

    /// The changes of a request of `kind` (which `choose_kind` allowed) against
    /// configuration `m` led by `leader`.
    fn plan_changes(
        &mut self,
        kind: MemberKind,
        m: &Membership,
        leader: NodeId,
    ) -> Vec<MemberChange> {
        let voters: Vec<NodeId> = m.voters.iter().copied().collect();
        let learners: Vec<NodeId> = m.learners.iter().copied().collect();
        let others: Vec<NodeId> = voters.iter().copied().filter(|&v| v != leader).collect();
        use MemberChange::{AddLearner, AddVoter, Promote, Remove};
        match kind {
            MemberKind::AddLearner | MemberKind::AddVoter => {
                let id = self.spares_unused.pop_first().expect("allowed: a spare");
                let addrs = addrs(id);
                if kind == MemberKind::AddVoter {
                    vec![AddVoter { id, addrs }]
                } else {
                    vec![AddLearner { id, addrs }]
                }
            }
            MemberKind::Promote => vec![Promote {
                id: self.pick(&learners),
            }],
            MemberKind::RemoveVoter => vec![Remove {
                id: self.pick(&others),
            }],
            MemberKind::RemoveLeader => vec![Remove { id: leader }],
            MemberKind::RemoveLearner => vec![Remove {
                id: self.pick(&learners),
            }],
            MemberKind::PromoteAndRemove => {
                let (p, r) = (self.pick(&learners), self.pick(&voters));
                vec![Promote { id: p }, Remove { id: r }]
            }
            MemberKind::ReplaceVoter => {
                let r = self.pick(&voters);
                let id = self.spares_unused.pop_first().expect("allowed: a spare");
                vec![
                    AddVoter {
                        id,
                        addrs: addrs(id),
                    },
                    Remove { id: r },
                ]
            }
            MemberKind::RemoveTwo => {
                let a = self.pick(&voters);
                let rest: Vec<NodeId> = voters.iter().copied().filter(|&v| v != a).collect();
                vec![
                    Remove { id: a },
                    Remove {
                        id: self.pick(&rest),
                    },
                ]
            }
        }
    }

    /// One of `ids` (not empty), uniformly.
    fn pick(&mut self, ids: &[NodeId]) -> NodeId {
        assert!(!ids.is_empty(), "picking from no ids");
        ids[self.rng.range(0, ids.len() as u64) as usize]
    }

    /// Takes the answers node `id` gave to membership requests.
    pub(super) fn poll_changes(&mut self, id: NodeId) -> Result<(), String> {
        let Some(live) = self.live(id) else {
            return Ok(());
        };
        if live.changes.is_empty() {
            return Ok(());
        }
        let mut answered = Vec::new();
        for mut w in std::mem::take(&mut live.changes) {
            match w.rx.try_recv() {
                Ok(result) => answered.push((w, result)),
                Err(oneshot::error::TryRecvError::Empty) => live.changes.push(w),
                Err(oneshot::error::TryRecvError::Closed) => {}
            }
        }
        for (w, result) in answered {
            if self.trace {
                eprintln!(
                    "[{:>6}] membership {:?} {:?} (force {}) at node {id}: {:?}",
                    self.now,
                    w.kind,
                    w.changes,
                    w.force,
                    result.as_ref().map(|s| &s.membership)
                );
            }
            match result {
                Ok(_) => self.change_completed(&w),
                Err(e) => self.change_refused(&w, e),
            }
        }
        Ok(())
    }

    /// A refusal means the change had no effect (refused before its entry was appended, or
    /// its entry was overwritten): spare ids it named may be added again. A 504 says the
    /// outcome is unknown: they may not.
    fn change_refused(&mut self, w: &WaitingChange, e: ServiceError) {
        let m = &mut self.stats.member;
        if let ServiceError::Timeout(_) = e {
            m.unknown += 1;
            return;
        }
        match e {
            ServiceError::Conflict(_) => m.refused_conflict += 1,
            ServiceError::NotFound(_) => m.refused_not_found += 1,
            ServiceError::InvalidInput(_) => m.refused_invalid += 1,
            ServiceError::NotLeader { .. } => m.not_leader += 1,
            _ => m.unavailable += 1,
        }
        for c in &w.changes {
            if let MemberChange::AddLearner { id, .. } | MemberChange::AddVoter { id, .. } = c {
                if !self.nodes[id].started {
                    self.spares_unused.insert(*id);
                }
            }
        }
    }

    /// A change completed: removed nodes may be stopped for good (after an operator's delay).
    fn change_completed(&mut self, w: &WaitingChange) {
        let m = &mut self.stats.member;
        m.completed += 1;
        m.forced += u64::from(w.force);
        m.joint_multi += u64::from(w.changes.len() > 1);
        m.remove_leader += u64::from(w.removes_leader);
        let mut removed = Vec::new();
        for c in &w.changes {
            match c {
                MemberChange::AddLearner { .. } => m.add_learner += 1,
                MemberChange::AddVoter { .. } => m.add_voter += 1,
                MemberChange::Promote { .. } => m.promote += 1,
                MemberChange::Remove { id } => {
                    if w.kind == MemberKind::RemoveLearner {
                        m.remove_learner += 1;
                    } else {
                        m.remove_voter += 1;
                    }
                    removed.push(*id);
                }
            }
        }
        for id in removed {
            if self.chance(RETIRE_PCT) {
                let delay = self.rng.range(0, 3000);
                self.schedule(delay, Event::Retire(id));
            }
        }
    }

    /// The configuration `serve --join` would be told: the leader's, committed or not (an
    /// operator starts a new member once its `member add` is accepted, and a new voter may be
    /// needed for the change to complete at all); without a leader (which may be exactly
    /// because the new voter is missing), the newest any running member has.
    fn join_membership(&self) -> Option<Membership> {
        let raft = match self.current_leader() {
            Some(leader) => self.live_ref(leader).consensus.raft(),
            None => self
                .nodes
                .values()
                .filter_map(|n| n.live.as_ref())
                .map(|l| l.consensus.raft())
                .max_by_key(|r| (r.membership_index(), r.id()))?,
        };
        Some(raft.membership().clone())
    }

    /// Starts `id` with an empty data dir if the configuration `join_membership` finds names
    /// it (a change that never commits then leaves a stray node running: it must stay
    /// harmless).
    fn join(&mut self, id: NodeId) -> Result<(), String> {
        let n = &self.nodes[&id];
        if n.started || n.retired {
            return Ok(());
        }
        let Some(m) = self.join_membership().filter(|m| m.contains(id)) else {
            // Not yet (or no longer): the operator looks again.
            return Ok(());
        };
        self.nodes.get_mut(&id).expect("node").joined = Some(m);
        self.stats.member.joined += 1;
        self.first_start(id)
    }

    /// Starts the members the configuration `join_membership` finds names that never ran.
    pub(super) fn start_pending_joiners(&mut self) -> Result<(), String> {
        let Some(m) = self.join_membership() else {
            return Ok(());
        };
        for id in m.members() {
            if self.nodes.get(&id).is_some_and(|n| !n.started) {
                self.join(id)?;
            }
        }
        Ok(())
    }

    /// Stops a removed node for good (its removal completed: the latest committed
    /// configuration does not name it, and ids are never reused).
    fn retire(&mut self, id: NodeId) -> Result<(), String> {
        if let Some((at, m)) = self.checker.configs.last_key_value() {
            assert!(
                !m.contains(id),
                "retiring {id}, a member of the configuration committed at {at}: {m:?}"
            );
        }
        let n = self.nodes.get_mut(&id).expect("node");
        if n.retired {
            return Ok(());
        }
        n.retired = true;
        if let Some(live) = n.live.take() {
            // Its watch streams end, as a stopped node's do.
            live.hub.close();
        }
        n.incarnation += 1;
        n.paused_until = None;
        n.crash_armed = None;
        if n.power_cut_down_ms.take().is_some() {
            n.fs.cancel_power_cut();
        }
        self.chunk_link_free_at
            .retain(|(a, b), _| *a != id && *b != id);
        self.stats.member.retired += 1;
        self.end_watch_streams(id)
    }
}

impl Checker {
    /// Entry `e` is seen committed for the first time, by `id` with `config` in effect (the
    /// committer: the leader, which counts with its current configuration): records that
    /// configuration for `e` (and `e`'s own if it is a Config entry), and checks that `e` is
    /// durable on a quorum of it.
    pub(super) fn first_commit(
        &mut self,
        id: NodeId,
        e: &Entry,
        config: &Membership,
    ) -> Result<(), String> {
        if self.quorum_configs.last() != Some(config) {
            self.quorum_configs.push(config.clone());
        }
        self.commit_config
            .insert(e.index, self.quorum_configs.len() - 1);
        if e.kind == EntryKind::Config {
            let m = Membership::decode(&e.payload)
                .map_err(|err| format!("committed Config entry {}: {err}", e.index))?;
            self.config_committed(e.index, m);
        }
        self.check_durable_quorum(e.index, e.term, &format!("node {id} commits"))
    }

    /// A Config entry at `index` committed: members of the configuration before it that it
    /// does not name are removed from here on.
    fn config_committed(&mut self, index: u64, m: Membership) {
        if let Some((_, prev)) = self.configs.range(..index).next_back() {
            let gone: Vec<NodeId> = prev.members().difference(&m.members()).copied().collect();
            for id in gone {
                self.removed_at.entry(id).or_insert(index);
            }
        }
        debug_assert!(
            self.configs.range(index..).next().is_none(),
            "configs commit in order"
        );
        self.configs.insert(index, m);
    }

    /// After every step of node `id`: it campaigns only as a voter of its newest
    /// configuration or of the committed one (a member removed by a configuration still in
    /// flight may be needed to elect the leader that commits it), never leads as a learner,
    /// and stops leading once its log commits its removal.
    pub(super) fn check_member_role(&self, id: NodeId, raft: &Raft) -> Result<(), String> {
        let m = raft.membership();
        let role = raft.role();
        let committed = self.configs.range(..=raft.commit_index()).next_back();
        let committed_voter = committed.is_some_and(|(_, c)| c.is_voter(id));
        let why = match role {
            Role::PreCandidate | Role::Candidate if !m.is_voter(id) && !committed_voter => {
                "campaigns, though neither its newest nor its committed configuration makes it \
                 a voter"
            }
            Role::Leader if m.learners.contains(&id) => "leads as a learner",
            Role::Leader
                if self
                    .removed_at
                    .get(&id)
                    .is_some_and(|&at| raft.commit_index() >= at) =>
            {
                "still leads with the configuration removing it committed in its log"
            }
            _ => return Ok(()),
        };
        Err(format!(
            "node {id} ({} in term {}) {why}: configuration at {}: voters {:?} outgoing {:?} \
             learners {:?}; removed at {:?}",
            role.name(),
            raft.term(),
            raft.membership_index(),
            m.voters,
            m.voters_outgoing,
            m.learners,
            self.removed_at.get(&id)
        ))
    }
}
