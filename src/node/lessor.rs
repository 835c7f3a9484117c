//! The lessor: the leader's clock for leases — when each lease expires, and which expired
//! leases to revoke through the log.
//!
//! Deterministic: it keeps no clock of its own. The shell ([`super::lease_upkeep`]) feeds it
//! the node's monotonic time, its leadership and the state machine's lease table; the
//! simulator feeds it simulated time. Both go through the same calls: [`Lessor::upkeep`] for
//! the periodic expiry and [`Lessor::keepalive_confirmed`] after a keepalive's ReadIndex
//! round (and [`Lessor::sync_with`] to read a lease's time left). Only the leader keeps deadlines: keepalives go to the
//! leader, and expiry is decided there and applied by every replica as a `LeaseRevoke` entry.
//!
//! Time safety across leader changes (etcd's rule): when a node becomes leader, every lease
//! gets a full TTL from that moment, and a lease it learns of later (granted, or applied
//! late) gets a full TTL from when it learns of it. A keepalive is answered only after a
//! ReadIndex round confirmed this node still leads, with the deadline counted from *before*
//! that round: any later leader was elected after the confirmation, so its own full TTL ends
//! after the deadline the client was promised. A lease is therefore never revoked sooner than
//! its TTL after the last keepalive a client saw answered, as long as the nodes' clocks run
//! at the same rate (drift within the TTL's slack, as etcd assumes).
//!
//! Invariant: deadlines exist only while `term` is `Some` (this node leads).

use raftkv_storage::sm::leases::LeaseInfo;
use raftkv_storage::sm::StateMachine;
use std::collections::BTreeMap;

/// An expired lease's revoke is proposed again after this long if it has not applied.
pub const REVOKE_RETRY_MS: u64 = 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tracked {
    ttl_ms: u64,
    deadline_ms: u64,
    revoke_sent_ms: Option<u64>,
}

/// Why a keepalive was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeepaliveError {
    #[error("lease {0} does not exist")]
    NotFound(u64),
    #[error("this node does not lead")]
    NotLeader,
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct Lessor {
    /// The term this node leads in, if it leads.
    term: Option<u64>,
    /// The lease table's epoch last synced (`None`: never).
    epoch: Option<u64>,
    leases: BTreeMap<u64, Tracked>,
}

impl Lessor {
    pub fn new() -> Lessor {
        Lessor::default()
    }

    /// Whether this node leads (as last told).
    pub fn leads(&self) -> bool {
        self.term.is_some()
    }

    /// Tells the lessor whether this node leads now (`Some(term)`). Becoming leader (or a new
    /// term) restarts every lease's full TTL from `now_ms`; losing leadership forgets all.
    pub fn set_leadership(&mut self, term: Option<u64>, now_ms: u64) {
        if term == self.term {
            return;
        }
        self.term = term;
        if term.is_none() {
            self.leases.clear();
            self.epoch = None;
            return;
        }
        for t in self.leases.values_mut() {
            t.deadline_ms = now_ms.saturating_add(t.ttl_ms);
            t.revoke_sent_ms = None;
        }
        debug_assert!(self.leases.values().all(|t| t.deadline_ms > now_ms));
    }

    /// Whether the lease table moved since the last [`sync`](Self::sync).
    pub fn needs_sync(&self, epoch: u64) -> bool {
        self.leads() && self.epoch != Some(epoch)
    }

    /// Takes the state machine's lease table (at `epoch`): a lease not tracked yet gets a
    /// full TTL from `now_ms`; a lease gone from the table is forgotten.
    pub fn sync(&mut self, leases: &[LeaseInfo], epoch: u64, now_ms: u64) {
        if !self.leads() {
            return;
        }
        let live: BTreeMap<u64, u64> = leases.iter().map(|l| (l.id, l.ttl_ms)).collect();
        self.leases.retain(|id, _| live.contains_key(id));
        for (id, ttl_ms) in live {
            self.leases.entry(id).or_insert(Tracked {
                ttl_ms,
                deadline_ms: now_ms.saturating_add(ttl_ms),
                revoke_sent_ms: None,
            });
        }
        self.epoch = Some(epoch);
    }

    /// Renews lease `id` for a full TTL from `now_ms` (the time *before* leadership was
    /// confirmed for this keepalive). Returns its TTL.
    ///
    /// A lease that had expired by `now_ms`, or whose revoke this leader has proposed, is not
    /// renewed ([`KeepaliveError::NotFound`]: it is as good as revoked): the revoke may still
    /// commit, and it would take the keys of a lease the client was just told lives on.
    pub fn keepalive(&mut self, id: u64, now_ms: u64) -> Result<u64, KeepaliveError> {
        if !self.leads() {
            return Err(KeepaliveError::NotLeader);
        }
        let t = self
            .leases
            .get_mut(&id)
            .ok_or(KeepaliveError::NotFound(id))?;
        if t.deadline_ms <= now_ms || t.revoke_sent_ms.is_some() {
            return Err(KeepaliveError::NotFound(id));
        }
        // Never shortens a deadline (a leader takeover may have set a later one).
        t.deadline_ms = t.deadline_ms.max(now_ms.saturating_add(t.ttl_ms));
        Ok(t.ttl_ms)
    }

    /// Brings the lessor up to date with this node's leadership (`Some(term)` when it leads)
    /// and `sm`'s lease table as of `now_ms` (the table is read only when its epoch moved).
    /// The one way every shell feeds the lessor: the node's upkeep and keepalives, and the
    /// simulator.
    pub fn sync_with(&mut self, sm: &StateMachine, leader_term: Option<u64>, now_ms: u64) {
        self.set_leadership(leader_term, now_ms);
        if self.needs_sync(sm.lease_epoch()) {
            let (leases, epoch) = sm.leases();
            self.sync(&leases, epoch, now_ms);
        }
    }

    /// The lease upkeep (every `LEASE_TICK_MS`): syncs with leadership and the lease table,
    /// then returns the expired leases whose revoke to propose now (see [`due`](Self::due)).
    pub fn upkeep(&mut self, sm: &StateMachine, leader_term: Option<u64>, now_ms: u64) -> Vec<u64> {
        self.sync_with(sm, leader_term, now_ms);
        self.due(now_ms)
    }

    /// A keepalive of lease `id` once a ReadIndex round confirmed this node leads in `term`:
    /// what the lessor learns now (leadership, leases granted during the round) counts from
    /// `now_ms`; only the renewal counts from `before_ms`, the clock read *before* the round
    /// (see the module doc). Returns the time left on the lease as of `now_ms`.
    pub fn keepalive_confirmed(
        &mut self,
        sm: &StateMachine,
        term: u64,
        id: u64,
        before_ms: u64,
        now_ms: u64,
    ) -> Result<u64, KeepaliveError> {
        debug_assert!(before_ms <= now_ms, "the round ends after it starts");
        self.sync_with(sm, Some(term), now_ms);
        self.keepalive(id, before_ms)?;
        Ok(self.remaining_ms(id, now_ms).unwrap_or(0))
    }

    /// Time left before lease `id` expires, on the leader.
    pub fn remaining_ms(&self, id: u64, now_ms: u64) -> Option<u64> {
        self.leases
            .get(&id)
            .map(|t| t.deadline_ms.saturating_sub(now_ms))
    }

    /// Expired leases whose revoke is due (never proposed, or proposed more than
    /// [`REVOKE_RETRY_MS`] ago without applying), in id order; marks them proposed.
    pub fn due(&mut self, now_ms: u64) -> Vec<u64> {
        let mut out = Vec::new();
        for (id, t) in self.leases.iter_mut() {
            let expired = t.deadline_ms <= now_ms;
            let retry = t
                .revoke_sent_ms
                .is_none_or(|sent| now_ms.saturating_sub(sent) >= REVOKE_RETRY_MS);
            if expired && retry {
                t.revoke_sent_ms = Some(now_ms);
                out.push(*id);
            }
        }
        debug_assert!(out.windows(2).all(|w| w[0] < w[1]));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(id: u64, ttl_ms: u64) -> LeaseInfo {
        LeaseInfo {
            id,
            ttl_ms,
            granted_revision: id,
            keys: 0,
        }
    }

    #[test]
    fn a_lease_expires_a_full_ttl_after_its_last_keepalive_and_not_before() {
        let mut l = Lessor::new();
        l.set_leadership(Some(2), 0);
        l.sync(&[lease(5, 1_000)], 1, 100);
        assert_eq!(l.due(1_099), Vec::<u64>::new());
        assert_eq!(l.keepalive(5, 900), Ok(1_000));
        assert_eq!(
            l.keepalive(5, 1_900),
            Err(KeepaliveError::NotFound(5)),
            "expired"
        );
        assert_eq!(l.remaining_ms(5, 1_000), Some(900));
        assert!(l.due(1_899).is_empty());
        assert_eq!(l.due(1_900), vec![5]);
        assert!(l.due(2_000).is_empty(), "one proposal per retry period");
        assert_eq!(
            l.keepalive(5, 1_950),
            Err(KeepaliveError::NotFound(5)),
            "a lease whose revoke is in flight is not renewed"
        );
        assert_eq!(
            l.due(2_900),
            vec![5],
            "proposed again when it did not apply"
        );
        l.sync(&[], 2, 3_000);
        assert!(l.due(10_000).is_empty(), "a revoked lease is forgotten");
        assert_eq!(l.keepalive(5, 10_000), Err(KeepaliveError::NotFound(5)));
    }

    #[test]
    fn a_new_leader_gives_every_lease_a_full_ttl_from_its_takeover() {
        let mut l = Lessor::new();
        assert_eq!(l.keepalive(1, 0), Err(KeepaliveError::NotLeader));
        l.sync(&[lease(1, 1_000)], 1, 0);
        assert!(l.due(5_000).is_empty(), "a follower tracks nothing");
        l.set_leadership(Some(3), 5_000);
        assert!(l.needs_sync(1));
        l.sync(&[lease(1, 1_000)], 1, 5_000);
        assert!(!l.needs_sync(1));
        assert!(l.due(5_999).is_empty());
        l.set_leadership(None, 5_500);
        l.set_leadership(Some(4), 5_900);
        l.sync(&[lease(1, 1_000)], 1, 5_900);
        assert!(l.due(6_899).is_empty(), "re-elected: a full TTL again");
        assert_eq!(l.due(6_900), vec![1]);
    }

    /// The shells' path (`upkeep`, `keepalive_confirmed`) over a real state machine: leases
    /// are learnt from its table, and a confirmed keepalive renews from before its round.
    #[test]
    fn the_shells_path_learns_the_table_and_renews_from_before_the_round() {
        use raftkv_storage::command::Command;
        use raftkv_storage::sm::StateMachineOptions;
        use raftkv_storage::{Entry, EntryKind};
        let sm = StateMachine::open_temporary(StateMachineOptions::default()).unwrap();
        let grant = Command::LeaseGrant {
            ttl_ms: 1_000,
            leases_max: 10,
        };
        let payload = grant.encode().unwrap();
        let entry = Entry {
            index: 1,
            term: 1,
            kind: EntryKind::Normal,
            payload: payload.into(),
        };
        sm.apply(&[entry]).unwrap();
        let mut l = Lessor::new();
        assert!(
            l.upkeep(&sm, None, 0).is_empty(),
            "a follower proposes nothing"
        );
        assert!(l.upkeep(&sm, Some(2), 100).is_empty(), "learnt at 100");
        assert_eq!(l.keepalive_confirmed(&sm, 2, 1, 600, 650), Ok(950));
        assert_eq!(
            l.keepalive_confirmed(&sm, 2, 7, 600, 650),
            Err(KeepaliveError::NotFound(7))
        );
        assert!(l.upkeep(&sm, Some(2), 1_599).is_empty());
        assert_eq!(l.upkeep(&sm, Some(2), 1_600), vec![1]);
        assert_eq!(
            l.keepalive_confirmed(&sm, 3, 1, 1_700, 1_700),
            Ok(1_000),
            "a new term gives the lease a full TTL again"
        );
    }

    #[test]
    fn a_keepalive_never_shortens_a_deadline() {
        let mut l = Lessor::new();
        l.set_leadership(Some(1), 0);
        l.sync(&[lease(9, 2_000)], 1, 1_000);
        l.keepalive(9, 500).unwrap();
        assert_eq!(l.remaining_ms(9, 1_000), Some(2_000));
    }
}
