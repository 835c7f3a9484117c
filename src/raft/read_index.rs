//! ReadIndex bookkeeping on the leader (Raft thesis §6.4).
//!
//! A read arrives; it takes the current commit index as its read index and waits for a
//! heartbeat round started after it arrived to be acknowledged by a quorum (which proves no
//! newer leader existed at that moment). Then it waits until the state machine has applied the
//! read index, and is released to the node. Rounds batch reads: every read that arrived before
//! a round's heartbeats went out is confirmed by that round.
//!
//! A new leader does not know the commit index of its predecessor until its own no-op commits,
//! so reads arriving before that wait in `before_noop` (bounded like the rest).
//!
//! Invariants: rounds increase; `pending` is ordered by round; every queue together holds at
//! most `pending_reads_max` reads.

use super::ready::{ReadId, ReadState};
use raftkv_types::{Membership, NodeId};
use std::collections::{BTreeMap, VecDeque};

/// How a read is confirmed (see [`super::Raft::read_index_at`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReadLevel {
    /// A quorum acknowledges a heartbeat round started after the read arrived (ReadIndex):
    /// no newer leader existed when the read was served, whatever the clocks do.
    Linearizable,
    /// The leader's lease stands in for the round when the cluster allows lease reads: safe
    /// while clocks run at the same rate within the lease's margin and the leader does not
    /// pause; otherwise served like [`ReadLevel::Linearizable`].
    Lease,
}

#[derive(Clone, Debug)]
struct PendingRead {
    id: ReadId,
    index: u64,
    /// 0 until a heartbeat round is started for it.
    round: u64,
}

/// The leader's queues of reads.
#[derive(Clone, Debug, Default)]
pub struct ReadIndexQueue {
    /// Last round started.
    round: u64,
    /// Reads waiting for their own no-op (new leader).
    before_noop: VecDeque<ReadId>,
    /// Reads waiting for a quorum to acknowledge their round.
    pending: VecDeque<PendingRead>,
    /// Highest round acknowledged by each peer.
    acks: BTreeMap<NodeId, u64>,
    /// Confirmed reads waiting for their index to be applied.
    confirmed: VecDeque<ReadState>,
}

impl ReadIndexQueue {
    /// Reads held in all queues together.
    pub fn len(&self) -> usize {
        self.before_noop.len() + self.pending.len() + self.confirmed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The last round started (what periodic heartbeats carry).
    pub fn round(&self) -> u64 {
        self.round
    }

    pub fn push_before_noop(&mut self, id: ReadId) {
        self.before_noop.push_back(id);
    }

    /// Moves reads that waited for the no-op on with read index `commit`: straight to
    /// `confirmed` if `confirm` (single voter, lease), else to `pending` for a round.
    pub fn noop_committed(&mut self, commit: u64, confirm: bool) {
        while let Some(id) = self.before_noop.pop_front() {
            if confirm {
                self.confirmed.push_back(ReadState { id, index: commit });
            } else {
                self.pending.push_back(PendingRead {
                    id,
                    index: commit,
                    round: 0,
                });
            }
        }
    }

    /// Adds a read with read index `index` awaiting a round.
    pub fn push(&mut self, id: ReadId, index: u64) {
        self.pending.push_back(PendingRead {
            id,
            index,
            round: 0,
        });
    }

    /// Adds a read that needs no round (single voter or lease).
    pub fn push_confirmed(&mut self, id: ReadId, index: u64) {
        self.confirmed.push_back(ReadState { id, index });
    }

    /// If reads wait for a round, starts one and returns its number (heartbeats must carry it).
    pub fn start_round_if_due(&mut self) -> Option<u64> {
        if !self.pending.iter().any(|r| r.round == 0) {
            return None;
        }
        Some(self.start_round())
    }

    /// Starts a round unconditionally (its heartbeats confirm every read that arrived before).
    pub fn start_round(&mut self) -> u64 {
        self.round = super::limits::succ(self.round);
        for r in self.pending.iter_mut().filter(|r| r.round == 0) {
            r.round = self.round;
        }
        debug_assert!(
            self.pending
                .iter()
                .zip(self.pending.iter().skip(1))
                .all(|(a, b)| a.round <= b.round),
            "pending reads out of round order"
        );
        self.round
    }

    /// The highest round a quorum of `membership` (counting the leader, `leader`, wherever
    /// it votes) has acknowledged: in a joint configuration, a quorum of each half.
    pub fn quorum_round(&self, membership: &Membership, leader: NodeId) -> u64 {
        membership.quorum_value(|p| {
            if p == leader {
                u64::MAX
            } else {
                self.acks.get(&p).copied().unwrap_or(0)
            }
        })
    }

    /// Records `peer`'s acknowledgement of `round`; confirms reads whose round a quorum of
    /// `membership` (counting the leader itself) acknowledged.
    pub fn ack(&mut self, peer: NodeId, round: u64, membership: &Membership, leader: NodeId) {
        if round > self.round {
            // No such round was started: a confused or forged acknowledgement must not
            // confirm future rounds in advance.
            return;
        }
        let entry = self.acks.entry(peer).or_insert(0);
        *entry = (*entry).max(round);
        let confirmed_round = self.quorum_round(membership, leader);
        while let Some(r) = self.pending.front() {
            if r.round == 0 || r.round > confirmed_round {
                break;
            }
            if let Some(r) = self.pending.pop_front() {
                self.confirmed.push_back(ReadState {
                    id: r.id,
                    index: r.index,
                });
            }
        }
    }

    /// Releases confirmed reads whose index is applied.
    pub fn take_applied(&mut self, applied: u64, out: &mut Vec<ReadState>) {
        // Read indexes are non-decreasing in arrival order, so stop at the first unapplied.
        while let Some(r) = self.confirmed.front() {
            if r.index > applied {
                break;
            }
            if let Some(r) = self.confirmed.pop_front() {
                out.push(r);
            }
        }
    }

    /// Leadership lost: unconfirmed reads are dropped (returned); confirmed ones stay valid.
    pub fn step_down(&mut self, dropped: &mut Vec<ReadId>) {
        dropped.extend(self.before_noop.drain(..));
        dropped.extend(self.pending.drain(..).map(|r| r.id));
        self.acks.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ack_of_a_round_not_started_confirms_nothing() {
        let mut q = ReadIndexQueue::default();
        q.push(1, 5);
        // A peer "acknowledges" a far-future round before the read's round exists.
        q.ack(2, 1 << 40, &Membership::with_voters([1, 2, 3]), 1);
        let round = q.start_round_if_due().expect("a round for the read");
        q.ack(3, round - 1, &Membership::with_voters([1, 2, 3]), 1);
        let mut out = Vec::new();
        q.take_applied(u64::MAX, &mut out);
        assert!(out.is_empty(), "confirmed by a forged ack: {out:?}");
        q.ack(2, round, &Membership::with_voters([1, 2, 3]), 1);
        q.take_applied(u64::MAX, &mut out);
        assert_eq!(out, vec![ReadState { id: 1, index: 5 }]);
    }
}
