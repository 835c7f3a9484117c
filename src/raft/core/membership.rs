//! Membership changes on the leader: proposing one (with the guards that depend on
//! replication), keeping the followers' progress in step with the configuration, leaving a
//! joint configuration once it commits, and stepping down when the committed configuration no
//! longer has this leader among its voters.
//!
//! The rules (Raft paper §6, thesis §4): a configuration is in effect from its append; one
//! change at a time (a new one only once the last is committed and not joint); a joint
//! configuration decides with a majority of both halves (`Membership::is_quorum`). See
//! `raft::membership` for how a request becomes an entry.

use super::{Raft, Role};
use crate::raft::limits::succ;
use crate::raft::membership::{self, MemberChange, MembershipProposal};
use crate::raft::message::MessageBody;
use crate::raft::progress::Progress;
use crate::raft::ready::RaftError;
use raftkv_types::{EntryKind, Membership, NodeId};

impl Raft {
    /// Leader: proposes a membership change. Returns the (index, term) of its Config entry;
    /// the change is complete once [`Raft::membership_in_flight`] is false with
    /// [`Raft::membership_index`] at or past that index.
    pub fn propose_membership(
        &mut self,
        proposal: &MembershipProposal,
    ) -> Result<(u64, u64), RaftError> {
        if self.role != Role::Leader {
            return Err(RaftError::NotLeader {
                leader: self.leader,
            });
        }
        if let Some((to, _)) = self.transfer {
            return Err(RaftError::TransferInProgress { to });
        }
        if self.membership_in_flight() {
            return Err(RaftError::MembershipChangeInFlight);
        }
        let next = membership::plan(self.membership(), proposal)?;
        self.check_promotions(&proposal.changes)?;
        if next.is_joint() && !proposal.force {
            self.check_reachable_quorum(&next)?;
        }
        self.append_config(next)
    }

    /// A promoted learner must be reachable and caught up within `promote_lag_entries_max`.
    fn check_promotions(&self, changes: &[MemberChange]) -> Result<(), RaftError> {
        let last_index = self.log.last_index();
        let lag_max = self.config.promote_lag_entries_max;
        for change in changes {
            let MemberChange::Promote { id } = change else {
                continue;
            };
            let match_index = self.progress.get(id).map_or(0, |pr| pr.match_index);
            let reachable = self.reachable(*id);
            if !reachable || last_index.saturating_sub(match_index) > lag_max {
                return Err(RaftError::LearnerBehind {
                    id: *id,
                    match_index,
                    last_index,
                    lag_max,
                    reachable,
                });
            }
        }
        Ok(())
    }

    /// The configuration a change enters must have a quorum of members that answered within
    /// an election timeout, or the cluster would stall in it.
    fn check_reachable_quorum(&self, next: &Membership) -> Result<(), RaftError> {
        if next.is_quorum(|id| self.reachable(id)) {
            return Ok(());
        }
        let unreachable = next
            .all_voters()
            .into_iter()
            .filter(|&id| !self.reachable(id))
            .collect();
        Err(RaftError::QuorumUnreachable { unreachable })
    }

    /// Leader: whether `id` answered within an election timeout (itself always).
    pub fn reachable(&self, id: NodeId) -> bool {
        if id == self.config.id {
            return true;
        }
        let window = u64::from(self.config.election_timeout_min_ticks);
        self.progress
            .get(&id)
            .and_then(|pr| pr.heard_at_tick)
            .is_some_and(|at| self.ticks.saturating_sub(at) <= window)
    }

    /// Leader: the lowest log index a reachable follower still needs the entries after (its
    /// match index, or the log base it is getting a snapshot of). The node keeps the WAL from
    /// there on at compaction, within a bound, so that a follower (a new learner above all)
    /// that spent a while installing a snapshot is not handed another one because the log it
    /// needs next was purged meanwhile. `None` when not leading or without reachable followers.
    pub fn replication_floor(&self) -> Option<u64> {
        if self.role != Role::Leader {
            return None;
        }
        let floor = self
            .progress
            .iter()
            .filter(|(&id, _)| self.reachable(id))
            .map(|(_, pr)| match pr.state {
                crate::raft::progress::ProgressState::Snapshot { pending_index } => {
                    pending_index.max(pr.match_index)
                }
                _ => pr.match_index,
            })
            .min()?;
        debug_assert!(floor <= self.log.last_index());
        Some(floor)
    }

    /// Leader: appends a Config entry and puts it in effect.
    fn append_config(&mut self, next: Membership) -> Result<(u64, u64), RaftError> {
        debug_assert_eq!(self.role, Role::Leader);
        let payload = next
            .encode()
            .map_err(|e| RaftError::MembershipInvalid(e.to_string()))?;
        let index = self.append_next(EntryKind::Config, payload.into())?;
        tracing::info!(
            id = self.config.id,
            index,
            voters = ?next.voters,
            voters_outgoing = ?next.voters_outgoing,
            learners = ?next.learners,
            "configuration appended"
        );
        self.configs.push(index, next);
        self.membership_changed();
        self.maybe_commit();
        Ok((index, self.term))
    }

    /// The configuration in effect changed (appended, truncated away, installed). A leader
    /// starts replicating to new members and lets removed ones linger; a node that is no
    /// longer a voter stops campaigning.
    pub(super) fn membership_changed(&mut self) {
        let id = self.config.id;
        let members = self.membership().members();
        if !self.may_campaign() && matches!(self.role, Role::PreCandidate | Role::Candidate) {
            self.become_follower(self.term, None);
        }
        if !members.contains(&id) {
            tracing::warn!(id, "this node is not in the configuration: it was removed");
        }
        if self.role != Role::Leader {
            return;
        }
        let next = succ(self.log.last_index());
        for &peer in members.iter().filter(|&&p| p != id) {
            let (msgs, bytes) = (
                self.config.inflight_msgs_max,
                self.config.inflight_bytes_max,
            );
            let pr = self
                .progress
                .entry(peer)
                .or_insert_with(|| Progress::new(next, msgs, bytes));
            pr.removed_ticks = None;
        }
        for (peer, pr) in self.progress.iter_mut() {
            if !members.contains(peer) && pr.removed_ticks.is_none() {
                pr.removed_ticks = Some(0);
            }
        }
        if let Some((to, _)) = self.transfer {
            if !self.membership().voters.contains(&to) {
                self.transfer = None;
            }
        }
    }

    /// Leader, after the commit index moved: a committed joint configuration is left
    /// (`C_new` appended); a committed configuration without this leader among its voters
    /// makes it hand over to the most caught-up voter and step down.
    pub(super) fn advance_membership(&mut self) {
        debug_assert_eq!(self.role, Role::Leader);
        if self.membership_index() > self.commit {
            return;
        }
        if self.membership().is_joint() {
            let next = membership::leave_joint(self.membership());
            if let Err(e) = self.append_config(next) {
                // Only the index space can refuse; the next commit retries.
                tracing::error!(error = %e, "cannot leave the joint configuration");
            }
            return;
        }
        let id = self.config.id;
        if self.membership().voters.contains(&id) {
            return;
        }
        let last_index = self.log.last_index();
        let successor = self
            .membership()
            .voters
            .iter()
            .filter_map(|&v| self.progress.get(&v).map(|pr| (pr.match_index, v)))
            .max();
        tracing::info!(
            id,
            ?successor,
            "removed from the configuration: stepping down"
        );
        if let Some((match_index, to)) = successor {
            if match_index == last_index {
                self.send(to, MessageBody::TimeoutNow);
            }
        }
        self.become_follower(self.term, None);
    }

    /// Leader: a removed follower is replicated to until it holds the configuration that
    /// removed it, or for two election timeouts, then forgotten.
    pub(super) fn tick_removed_peers(&mut self) {
        let linger_ticks = 2 * self.config.election_timeout_min_ticks;
        let index = self.membership_index();
        self.progress
            .retain(|_, pr| match pr.removed_ticks.as_mut() {
                None => true,
                Some(ticks) => {
                    *ticks = ticks.saturating_add(1);
                    *ticks < linger_ticks && pr.match_index < index
                }
            });
    }
}
