//! Membership changes in the consensus core: what a change request may ask, how it becomes
//! the next configuration, and the history of configurations the log holds.
//!
//! Why a module of its own: a configuration takes effect when its Config entry is *appended*
//! (Raft thesis §4.1), not when it commits, so a follower whose log is truncated must fall back
//! to the configuration of the entries that remain, and a compaction must not forget the
//! configuration in effect at the new log base. [`ConfigHistory`] keeps exactly that: the
//! configuration at the log's base plus one per Config entry above it.
//!
//! A change of voters always goes through a joint configuration (Raft paper §6): the leader
//! appends `C_old,new` (voters = new, voters_outgoing = old), and once that commits appends
//! `C_new`. Learner-only changes (add or remove a learner) do not change any quorum and are
//! one entry. [`plan`] turns a request into the entry to append and checks every guard that
//! depends only on the configurations; the guards that depend on replication (caught-up
//! learners, reachable quorum) live with the leader's progress in `core/membership.rs`.

use super::ready::RaftError;
use raftkv_types::{MemberAddrs, Membership, NodeId};
use std::collections::BTreeMap;

/// One change a membership request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// A new member that receives the log and never votes.
    AddLearner { id: NodeId, addrs: MemberAddrs },
    /// A new member that votes at once (etcd's `member add` without `--learner`): it counts
    /// toward the quorum while its log is still empty, so the reachable-quorum guard applies.
    AddVoter { id: NodeId, addrs: MemberAddrs },
    /// A caught-up learner becomes a voter.
    Promote { id: NodeId },
    /// A voter or learner leaves.
    Remove { id: NodeId },
}

impl MemberChange {
    pub fn id(&self) -> NodeId {
        match self {
            MemberChange::AddLearner { id, .. }
            | MemberChange::AddVoter { id, .. }
            | MemberChange::Promote { id }
            | MemberChange::Remove { id } => *id,
        }
    }
}

/// A membership request as the leader receives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembershipProposal {
    /// Applied in order to the current configuration; together they make one change.
    pub changes: Vec<MemberChange>,
    /// Addresses the node knows for current members (from its flags): recorded in the new
    /// configuration for members that have none yet, so that from the first change on every
    /// member's address is in the log.
    pub known_addrs: BTreeMap<NodeId, MemberAddrs>,
    /// Skip the reachable-quorum guard (never the others).
    pub force: bool,
}

/// Most changes one request may carry.
pub const CHANGES_MAX: usize = 16;

/// The entry a request becomes: `C_old,new` when voters change, else the new configuration.
/// Checks the guards that depend only on configurations.
pub fn plan(current: &Membership, proposal: &MembershipProposal) -> Result<Membership, RaftError> {
    let invalid = |why: String| Err(RaftError::MembershipInvalid(why));
    if current.is_joint() {
        return Err(RaftError::MembershipChangeInFlight);
    }
    if proposal.changes.is_empty() || proposal.changes.len() > CHANGES_MAX {
        return invalid(format!(
            "a request carries 1 to {CHANGES_MAX} changes, not {}",
            proposal.changes.len()
        ));
    }
    let mut next = current.clone();
    for change in &proposal.changes {
        apply_change(&mut next, change)?;
    }
    if next.voters.is_empty() {
        return Err(RaftError::LastVoter);
    }
    for (&id, addrs) in &proposal.known_addrs {
        if next.contains(id) && !next.addrs.contains_key(&id) {
            next.addrs.insert(id, addrs.clone());
        }
    }
    if next.voters != current.voters {
        next.voters_outgoing = current.voters.clone();
    }
    // A removed voter still votes in the joint configuration's outgoing half, so its address
    // stays until `leave_joint`: members reach each other by the addresses it records.
    let members = next.members();
    next.addrs.retain(|id, _| members.contains(id));
    next.validate()
        .map_err(|e| RaftError::MembershipInvalid(format!("the resulting configuration: {e}")))?;
    debug_assert!(
        !current.is_joint()
            && next
                .voters_outgoing
                .iter()
                .all(|id| current.voters.contains(id))
    );
    Ok(next)
}

fn apply_change(next: &mut Membership, change: &MemberChange) -> Result<(), RaftError> {
    match change {
        MemberChange::AddLearner { id, addrs } | MemberChange::AddVoter { id, addrs } => {
            if *id == 0 {
                return Err(RaftError::MembershipInvalid("node id 0 is reserved".into()));
            }
            if next.contains(*id) {
                return Err(RaftError::AlreadyMember(*id));
            }
            if addrs.peer_addr.is_empty() {
                return Err(RaftError::MembershipInvalid(format!(
                    "node {id} needs a peer address"
                )));
            }
            if matches!(change, MemberChange::AddVoter { .. }) {
                next.voters.insert(*id);
            } else {
                next.learners.insert(*id);
            }
            next.addrs.insert(*id, addrs.clone());
        }
        MemberChange::Promote { id } => {
            if next.voters.contains(id) {
                return Err(RaftError::MembershipInvalid(format!(
                    "node {id} is already a voter"
                )));
            }
            if !next.learners.remove(id) {
                return Err(RaftError::UnknownMember(*id));
            }
            next.voters.insert(*id);
        }
        MemberChange::Remove { id } => {
            if !next.voters.remove(id) && !next.learners.remove(id) {
                return Err(RaftError::UnknownMember(*id));
            }
        }
    }
    Ok(())
}

/// `C_new` for a joint configuration: the incoming voters alone.
pub fn leave_joint(joint: &Membership) -> Membership {
    debug_assert!(
        joint.is_joint(),
        "leaving a configuration that is not joint"
    );
    let mut next = joint.clone();
    next.voters_outgoing.clear();
    let members = next.members();
    next.addrs.retain(|id, _| members.contains(id));
    debug_assert!(
        next.validate().is_ok(),
        "C_new of a valid joint configuration"
    );
    next
}

/// The configurations the log holds: the one in effect at the log's base (from a snapshot or
/// the bootstrap) and one per Config entry above it, by index.
#[derive(Clone, Debug, Default)]
pub struct ConfigHistory {
    base_index: u64,
    base: Membership,
    entries: BTreeMap<u64, Membership>,
}

impl ConfigHistory {
    /// The configuration in effect at `index` (a snapshot's or the log's base).
    pub fn new(index: u64, membership: Membership) -> ConfigHistory {
        ConfigHistory {
            base_index: index,
            base: membership,
            entries: BTreeMap::new(),
        }
    }

    /// The latest configuration and the index of the entry that set it (the base index if
    /// none is in the log).
    pub fn current(&self) -> (u64, &Membership) {
        match self.entries.last_key_value() {
            Some((&index, m)) => (index, m),
            None => (self.base_index, &self.base),
        }
    }

    /// The configuration in effect at `index` (at or above the base index): the latest one set
    /// at or below it.
    pub fn at(&self, index: u64) -> &Membership {
        debug_assert!(index >= self.base_index, "below the log's base");
        self.entries
            .range(..=index)
            .next_back()
            .map_or(&self.base, |(_, m)| m)
    }

    /// A Config entry at `index` was appended.
    pub fn push(&mut self, index: u64, membership: Membership) {
        assert!(
            index > self.current().0,
            "config entry {index} appended at or below {}",
            self.current().0
        );
        self.entries.insert(index, membership);
    }

    /// The log was truncated from `index` on: forget the configurations of those entries.
    pub fn truncate_from(&mut self, index: u64) {
        debug_assert!(index > self.base_index, "truncating below the log's base");
        self.entries.split_off(&index);
    }

    /// The log was compacted up to `index`: fold the configurations at or below it into the
    /// base.
    pub fn compact(&mut self, index: u64) {
        let above = self.entries.split_off(&(index + 1));
        if let Some((_, m)) = std::mem::replace(&mut self.entries, above)
            .into_iter()
            .next_back()
        {
            self.base = m;
        }
        self.base_index = self.base_index.max(index);
        debug_assert!(self.entries.keys().all(|&i| i > self.base_index));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(id: NodeId) -> MemberChange {
        MemberChange::AddLearner {
            id,
            addrs: MemberAddrs {
                peer_addr: format!("h{id}:7000"),
                client_url: format!("http://h{id}:8000"),
            },
        }
    }

    fn proposal(changes: Vec<MemberChange>) -> MembershipProposal {
        MembershipProposal {
            changes,
            ..MembershipProposal::default()
        }
    }

    #[test]
    fn voter_changes_go_joint_and_learner_changes_do_not() {
        let c = Membership::with_voters([1, 2, 3]);
        let learner = plan(&c, &proposal(vec![add(4)])).unwrap();
        assert!(!learner.is_joint());
        assert!(learner.learners.contains(&4));
        let joint = plan(
            &learner,
            &proposal(vec![
                MemberChange::Promote { id: 4 },
                MemberChange::Remove { id: 1 },
            ]),
        )
        .unwrap();
        assert_eq!(joint.voters_outgoing, [1, 2, 3].into());
        assert_eq!(joint.voters, [2, 3, 4].into());
        assert_eq!(
            plan(&joint, &proposal(vec![add(5)])),
            Err(RaftError::MembershipChangeInFlight)
        );
        let new = leave_joint(&joint);
        assert_eq!(new.voters, [2, 3, 4].into());
        assert!(!new.is_joint() && !new.addrs.contains_key(&1));
    }

    /// Found by the simulator: the joint configuration dropped a removed voter's address
    /// while that voter still votes in the outgoing half, so a member that knew it only from
    /// the log (one that joined later) dropped it from its peer set, refused its messages, and
    /// the joint configuration could not commit when its vote was needed.
    #[test]
    fn a_removed_voter_keeps_its_address_until_the_joint_configuration_is_left() {
        let mut c = plan(&Membership::with_voters([1, 2]), &proposal(vec![add(3)])).unwrap();
        for id in [1, 2] {
            let a = MemberAddrs {
                peer_addr: format!("h{id}:7000"),
                client_url: String::new(),
            };
            c.addrs.insert(id, a);
        }
        let joint = plan(
            &c,
            &proposal(vec![
                MemberChange::Promote { id: 3 },
                MemberChange::Remove { id: 1 },
            ]),
        )
        .unwrap();
        assert!(joint.voters_outgoing.contains(&1));
        assert_eq!(joint.addrs.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert!(!leave_joint(&joint).addrs.contains_key(&1));
        // A learner leaves at once, address and all.
        let gone = plan(&c, &proposal(vec![MemberChange::Remove { id: 3 }])).unwrap();
        assert!(!gone.is_joint() && !gone.addrs.contains_key(&3));
    }

    #[test]
    fn guards_name_the_problem() {
        let c = Membership::with_voters([1]);
        assert_eq!(
            plan(&c, &proposal(vec![MemberChange::Remove { id: 1 }])),
            Err(RaftError::LastVoter)
        );
        assert_eq!(
            plan(&c, &proposal(vec![MemberChange::Promote { id: 7 }])),
            Err(RaftError::UnknownMember(7))
        );
        assert_eq!(
            plan(&c, &proposal(vec![add(1)])),
            Err(RaftError::AlreadyMember(1))
        );
        assert!(matches!(
            plan(&c, &proposal(vec![])),
            Err(RaftError::MembershipInvalid(_))
        ));
    }

    #[test]
    fn history_follows_truncation_and_compaction() {
        let mut h = ConfigHistory::new(5, Membership::with_voters([1]));
        h.push(7, Membership::with_voters([1, 2]));
        h.push(9, Membership::with_voters([1, 2, 3]));
        assert_eq!(h.current().0, 9);
        h.truncate_from(9);
        assert_eq!(h.current(), (7, &Membership::with_voters([1, 2])));
        assert_eq!(h.at(8), &Membership::with_voters([1, 2]));
        assert_eq!(h.at(6), &Membership::with_voters([1]));
        h.compact(8);
        assert_eq!(h.current(), (8, &Membership::with_voters([1, 2])));
        h.push(10, Membership::with_voters([2]));
        h.compact(12);
        assert_eq!(h.current(), (12, &Membership::with_voters([2])));
    }
}
