//! What a leader knows about each follower's log, and how much it may send it.
//!
//! A follower is in one of three states (as in etcd-io/raft):
//! - `Probe`: the leader does not know where the logs match; it sends one AppendEntries and
//!   waits for the answer (or a heartbeat response) before sending another.
//! - `Replicate`: the logs match up to `match_index`; the leader streams entries optimistically
//!   (advancing `next_index` on send), bounded by [`Inflights`] in messages and bytes.
//! - `Snapshot`: the follower needs entries that were compacted; the node streams a snapshot
//!   and nothing else is sent until it reports the outcome. After a successful transfer the
//!   follower installs it, which can take long for a large one: the state holds until the
//!   follower acknowledges an index at or past the snapshot's, or until
//!   `Config::snapshot_install_wait_ticks` pass (`Progress::snapshot_delivered_ticks`), so a
//!   second transfer of the same snapshot never starts while the first is in flight or being
//!   installed.
//!
//! Invariants: `match_index < next_index`; in `Probe`, at most one append is unanswered.

use super::limits::succ;
use std::collections::VecDeque;

/// Replication state of one follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    Probe,
    Replicate,
    /// Waiting for a snapshot that covers at least `pending_index` to be delivered.
    Snapshot {
        pending_index: u64,
    },
}

/// AppendEntries messages sent in replicate state and not yet acknowledged, bounded both in
/// count and in bytes so a slow follower cannot make the leader buffer without limit.
#[derive(Clone, Debug)]
pub struct Inflights {
    /// (last index carried, bytes carried) per message, oldest first.
    messages: VecDeque<(u64, u64)>,
    bytes: u64,
    msgs_max: usize,
    bytes_max: u64,
}

impl Inflights {
    pub fn new(msgs_max: usize, bytes_max: u64) -> Inflights {
        Inflights {
            messages: VecDeque::new(),
            bytes: 0,
            msgs_max,
            bytes_max,
        }
    }

    /// Whether another message may be sent.
    pub fn full(&self) -> bool {
        self.messages.len() >= self.msgs_max || self.bytes >= self.bytes_max
    }

    pub fn add(&mut self, last_index: u64, bytes: u64) {
        debug_assert!(!self.full(), "an append sent past the inflight window");
        self.messages.push_back((last_index, bytes));
        self.bytes += bytes;
    }

    /// Frees every message whose entries are all acknowledged (last index `<= index`).
    pub fn free_to(&mut self, index: u64) {
        while let Some(&(last, bytes)) = self.messages.front() {
            if last > index {
                break;
            }
            self.messages.pop_front();
            self.bytes -= bytes;
        }
    }

    /// Frees the oldest message (used when a heartbeat response shows the follower alive but
    /// the window is full, e.g. because an append was lost).
    pub fn free_first(&mut self) {
        if let Some((_, bytes)) = self.messages.pop_front() {
            self.bytes -= bytes;
        }
    }

    pub fn count(&self) -> usize {
        self.messages.len()
    }

    pub fn reset(&mut self) {
        self.messages.clear();
        self.bytes = 0;
    }
}

/// The leader's view of one follower.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known to match the leader's log.
    pub match_index: u64,
    /// Next index to send.
    pub next_index: u64,
    pub state: ProgressState,
    /// In `Probe`: an append was sent and is not answered yet.
    pub probe_sent: bool,
    pub inflights: Inflights,
    /// Heard from since the last check-quorum round.
    pub recent_active: bool,
    /// The leader's tick count when this follower last answered (`None`: never). Decides
    /// whether it counts as reachable for the membership guards.
    pub heard_at_tick: Option<u64>,
    /// Set when a membership change removed this follower: ticks since. It is still sent
    /// the log (so it learns of its removal) until it holds the change or the linger ends.
    pub removed_ticks: Option<u32>,
    /// Highest commit index sent to this follower.
    pub commit_sent: u64,
    /// A heartbeat response showed the follower lagging: send an append even if empty.
    pub append_due: bool,
    /// In `Snapshot`: ticks since the node reported the transfer complete (`None` while it
    /// is still streaming).
    pub snapshot_delivered_ticks: Option<u32>,
    /// The last index carried by an append routed through the node's WAL reads
    /// ([`super::LogRead`]). While the follower has not acknowledged it, every append to it
    /// takes the same route, so they arrive in order.
    pub log_read_through: u64,
}

impl Progress {
    pub fn new(next_index: u64, msgs_max: usize, bytes_max: u64) -> Progress {
        Progress {
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            probe_sent: false,
            inflights: Inflights::new(msgs_max, bytes_max),
            recent_active: false,
            heard_at_tick: None,
            removed_ticks: None,
            commit_sent: 0,
            append_due: false,
            snapshot_delivered_ticks: None,
            log_read_through: 0,
        }
    }

    /// Whether sending must wait.
    pub fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.full(),
            ProgressState::Snapshot { .. } => true,
        }
    }

    /// An acknowledgement up to `index`; returns whether `match_index` advanced.
    pub fn maybe_update(&mut self, index: u64) -> bool {
        let updated = index > self.match_index;
        if updated {
            self.match_index = index;
            self.probe_sent = false;
        }
        self.next_index = self.next_index.max(succ(index));
        self.debug_check();
        updated
    }

    /// A rejection of the append with prev index `rejected`; `match_hint` is where the leader
    /// thinks the logs may match. Returns false for a stale rejection.
    pub fn maybe_decr_to(&mut self, rejected: u64, match_hint: u64) -> bool {
        if self.state == ProgressState::Replicate {
            if rejected <= self.match_index {
                return false;
            }
            self.next_index = succ(self.match_index);
            self.debug_check();
            return true;
        }
        if self.next_index.saturating_sub(1) != rejected {
            return false;
        }
        self.next_index = rejected
            .min(succ(match_hint))
            .max(succ(self.match_index))
            .max(1);
        self.probe_sent = false;
        self.debug_check();
        true
    }

    pub fn become_probe(&mut self) {
        let next = match self.state {
            ProgressState::Snapshot { pending_index } => {
                succ(self.match_index).max(succ(pending_index))
            }
            _ => succ(self.match_index),
        };
        self.state = ProgressState::Probe;
        self.next_index = next;
        self.probe_sent = false;
        self.snapshot_delivered_ticks = None;
        self.inflights.reset();
        self.debug_check();
    }

    pub fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next_index = succ(self.match_index);
        self.probe_sent = false;
        self.snapshot_delivered_ticks = None;
        self.inflights.reset();
        self.debug_check();
    }

    pub fn become_snapshot(&mut self, pending_index: u64) {
        self.state = ProgressState::Snapshot { pending_index };
        self.probe_sent = false;
        self.snapshot_delivered_ticks = None;
        self.inflights.reset();
    }

    /// The module's invariant: the leader never sends what it knows the follower holds.
    pub(super) fn debug_check(&self) {
        debug_assert!(
            self.match_index < self.next_index,
            "match_index {} not below next_index {}",
            self.match_index,
            self.next_index
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inflights_bound_by_count_and_bytes() {
        let mut f = Inflights::new(2, 100);
        f.add(5, 10);
        assert!(!f.full());
        f.add(9, 10);
        assert!(f.full());
        f.free_to(5);
        assert_eq!(f.count(), 1);
        assert!(!f.full());
        f.add(12, 200);
        assert!(f.full());
        f.free_first();
        f.free_to(12);
        assert_eq!(f.count(), 0);
    }

    #[test]
    fn probe_decrements_and_replicate_resets() {
        let mut p = Progress::new(11, 4, 1000);
        assert!(p.maybe_decr_to(10, 5));
        assert_eq!(p.next_index, 6);
        assert!(!p.maybe_decr_to(10, 5), "stale rejection ignored");
        assert!(p.maybe_update(5));
        p.become_replicate();
        assert_eq!(p.next_index, 6);
        p.next_index = 9;
        assert!(!p.maybe_decr_to(4, 0));
        assert!(p.maybe_decr_to(8, 0));
        assert_eq!(p.next_index, 6);
        p.become_snapshot(20);
        assert!(p.is_paused());
        p.become_probe();
        assert_eq!(p.next_index, 21);
    }
}
