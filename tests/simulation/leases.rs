//! Leases in the simulator (issue 12): the production lessor on every node, the clients'
//! grants, leased puts, keepalives and revokes, and the checks that a lease expires only after
//! its TTL, that its revoke deletes exactly its keys at one revision, and that an abandoned
//! lease is revoked eventually.
//!
//! Why a module of its own: leases add a clock-driven actor (each node's upkeep), a request
//! that is neither a read nor a write (the keepalive: a ReadIndex round, then the lessor), and
//! checks that the key-value checkers know nothing of.
//!
//! - **The lessor.** Each running node has its own production [`Lessor`] (lost with the
//!   process), fed by the same calls the node's service makes: [`Lessor::upkeep`] every
//!   [`LEASE_TICK_MS`] of simulated time (leadership from the consensus core, the lease table
//!   from the node's state machine), proposing a `LeaseRevoke` (sessionless, as
//!   `NodeService::revoke_expired` does) for each lease it returns; and for a keepalive, a
//!   ReadIndex round through the node's read path with the clock read before it, then
//!   [`Lessor::keepalive_confirmed`] if the node still leads (as `NodeService::lease_keepalive`).
//! - **Clients** (`client.rs`) grant leases of 1–4 s (sessioned writes, so a grant whose answer
//!   was lost is still identified in the log), put keys `l/c<client>/<n>` under them, keep
//!   two thirds of them alive (a keepalive every third of the TTL, interleaved with their other
//!   operations), let the others lapse, and revoke some (sessioned too: the log tells a
//!   client's revoke from the upkeep's).
//! - **Leased keys stay out of the linearizability check**: they live in their own key space
//!   (`l/`) that no other operation touches, and a revoke deletes them behind any client's
//!   back. Modelling that in the linearizability checker would need the lessor's clock in the
//!   model; instead they are checked by the watchers (every event of `l/` keys against the
//!   log), by the revoke check below, and by the final comparison of every node's `l/` records
//!   and lease table with the reference state machine's.
//!
//! Checked:
//! - **Time safety**: every `LeaseRevoke` that an upkeep proposed and that revoked a lease was
//!   proposed at a simulated time ≥ (the send time of the last keepalive attempt its client
//!   saw acknowledged, or the grant request's first send time if none) + the TTL. The entry
//!   is told apart from others by its (index, term), recorded when the upkeep proposed it.
//! - **Atomicity**: a revoke's revision holds exactly one delete per key attached to the lease
//!   (attachments modelled from the log's events), and nothing else.
//! - **Liveness**: after healing the run is done only when the leader's lease table is empty
//!   (clients stop keeping leases alive at the heal, so every lease must expire).

use super::client::Response;
use super::{Event, Sim};
use raftkv::api::ServiceError;
use raftkv::node::lessor::KeepaliveError;
use raftkv::node::messages::{Input, Request as NodeRequest};
use raftkv::node::LEASE_TICK_MS;
use raftkv::raft::Role;
use raftkv::storage::command::{CommandOutcome, CommandRef, CommandResult, Proposal};
use raftkv::storage::sm::history::ChangeEvent;
use raftkv::storage::{Entry, NodeId};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tokio::sync::oneshot;

/// The key space of leased keys (kept out of the linearizability check).
pub const LEASED_PREFIX: &str = "l/";

/// Lease TTLs clients ask for, in ms: short, so that many expire within a run and the wait
/// for the last ones after healing stays short.
pub const TTL_MS_MIN: u64 = 1_000;
pub const TTL_MS_MAX: u64 = 4_000;

/// The lease bound the clients' grants carry: small in a few seeds (`LeasesFull`).
pub fn leases_max(seed: u64) -> u64 {
    if seed.is_multiple_of(5) {
        3
    } else {
        1_000
    }
}

/// A keepalive waiting for its ReadIndex round on a node.
pub struct WaitingKeepalive {
    pub client: u64,
    pub attempt: u64,
    pub lease: u64,
    /// The node's clock when the request arrived, before the round.
    pub before_ms: u64,
    pub rx: oneshot::Receiver<Result<(u64, NodeId), ServiceError>>,
}

/// What the run saw of leases outside the log: request send times and upkeep proposals.
#[derive(Debug, Default)]
pub struct LeaseBook {
    /// First send time of each grant request, by its (session, seq).
    pub grant_sent_ms: HashMap<(String, u64), u64>,
    /// Per lease: the latest send time of a keepalive attempt its client saw acknowledged.
    pub kept_alive_ms: BTreeMap<u64, u64>,
    /// Revokes the upkeep proposed: (index, term) of the entry → (lease, node, time).
    pub upkeep_proposed: HashMap<(u64, u64), (u64, NodeId, u64)>,
}

/// The committed log's leases, as the reference state machine applied them.
#[derive(Debug, Default)]
pub struct LeaseLedger {
    /// Lease → the (session, seq) of its grant and its TTL.
    granted: BTreeMap<u64, (Option<(String, u64)>, u64)>,
    /// (index, term, lease) of sessionless revokes (the upkeep's) that revoked a lease.
    upkeep_revokes: Vec<(u64, u64, u64)>,
    /// Revokes by clients that revoked a lease.
    pub client_revokes: u64,
    /// Each leased key's lease now.
    attached: BTreeMap<Vec<u8>, u64>,
}

impl LeaseLedger {
    /// Leases granted in the log.
    pub fn granted(&self) -> u64 {
        self.granted.len() as u64
    }

    /// Lease `id`'s TTL, if the log granted it.
    pub fn ttl_ms(&self, id: u64) -> Option<u64> {
        self.granted.get(&id).map(|(_, ttl_ms)| *ttl_ms)
    }

    /// Leases revoked by the upkeep (expired).
    pub fn expired(&self) -> u64 {
        self.upkeep_revokes.len() as u64
    }

    /// Takes committed entry `e` (its decoded proposal, result and the changes at its
    /// revision): records grants and revokes, checks a revoke's atomicity, and follows the
    /// keys' attachments.
    pub fn observe(
        &mut self,
        e: &Entry,
        proposal: &Proposal<'_>,
        result: &CommandResult,
        events: &[ChangeEvent],
    ) -> Result<(), String> {
        let session = proposal
            .session
            .as_ref()
            .map(|s| (String::from_utf8_lossy(s.client).into_owned(), s.seq));
        match (&proposal.command, &result.outcome) {
            _ if result.duplicate => {}
            (CommandRef::LeaseGrant { .. }, CommandOutcome::LeaseGranted { id, ttl_ms }) => {
                if *id != e.index {
                    return Err(format!("lease granted at {} has the id {id}", e.index));
                }
                self.granted.insert(*id, (session.clone(), *ttl_ms));
            }
            (CommandRef::LeaseRevoke { id }, CommandOutcome::LeaseRevoked { deleted }) => {
                self.check_revoke(e.index, *id, *deleted, events)?;
                match session {
                    None => self.upkeep_revokes.push((e.index, e.term, *id)),
                    Some(_) => self.client_revokes += 1,
                }
            }
            _ => {}
        }
        self.follow(events)
    }

    /// A revoke of `id` at `revision` deleted exactly the keys attached to it, each once,
    /// and changed nothing else.
    fn check_revoke(
        &self,
        revision: u64,
        id: u64,
        deleted: u64,
        events: &[ChangeEvent],
    ) -> Result<(), String> {
        let want: BTreeSet<&[u8]> = self
            .attached
            .iter()
            .filter(|(_, l)| **l == id)
            .map(|(k, _)| k.as_slice())
            .collect();
        let got: BTreeSet<&[u8]> = events
            .iter()
            .filter(|c| c.record.is_none())
            .map(|c| c.key.as_slice())
            .collect();
        if got != want || events.len() != want.len() || deleted != want.len() as u64 {
            let show = |s: &BTreeSet<&[u8]>| {
                s.iter()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .collect::<Vec<_>>()
            };
            return Err(format!(
                "revoke atomicity: the revoke of lease {id} at {revision} says {deleted} keys \
                 deleted, with {} changes deleting {:?}; the keys attached were {:?}",
                events.len(),
                show(&got),
                show(&want)
            ));
        }
        Ok(())
    }

    /// Follows the attachments through one revision's changes.
    fn follow(&mut self, events: &[ChangeEvent]) -> Result<(), String> {
        for c in events {
            match c.put_record()? {
                Some((meta, _)) if meta.lease != 0 => {
                    self.attached.insert(c.key.clone(), meta.lease);
                }
                _ => {
                    self.attached.remove(&c.key);
                }
            }
        }
        Ok(())
    }

    /// Time safety (see the module doc): every upkeep revoke in the log was proposed a full
    /// TTL after its lease was last known alive by its client.
    pub fn check_expiries(&self, book: &LeaseBook) -> Result<(), String> {
        for &(index, term, id) in &self.upkeep_revokes {
            let Some((session, ttl_ms)) = self.granted.get(&id) else {
                return Err(format!("lease {id} revoked at {index} was never granted"));
            };
            let Some(sent_ms) = session.as_ref().and_then(|s| book.grant_sent_ms.get(s)) else {
                return Err(format!(
                    "lease {id} was granted by {session:?}, which no client sent"
                ));
            };
            let alive_ms = book
                .kept_alive_ms
                .get(&id)
                .map_or(*sent_ms, |&k| k.max(*sent_ms));
            let Some(&(lease, node, proposed_ms)) = book.upkeep_proposed.get(&(index, term)) else {
                return Err(format!(
                    "the sessionless revoke of lease {id} at {index}@{term} was proposed by no \
                     node's upkeep"
                ));
            };
            assert_eq!(lease, id, "an entry's payload names one lease");
            if proposed_ms < alive_ms + ttl_ms {
                return Err(format!(
                    "lease time safety: node {node}'s upkeep proposed the revoke of lease {id} \
                     (TTL {ttl_ms} ms) at {proposed_ms} ms (entry {index}@{term}), but its \
                     client last knew it alive at {alive_ms} ms: expired {} ms early",
                    alive_ms + ttl_ms - proposed_ms
                ));
            }
        }
        Ok(())
    }
}

impl Sim {
    /// Node `id`'s lease upkeep, every [`LEASE_TICK_MS`] while this incarnation runs: the
    /// production lessor says which expired leases to revoke, and the node proposes each.
    pub(super) fn lease_upkeep(&mut self, id: NodeId, incarnation: u64) -> Result<(), String> {
        if self.incarnation(id) != incarnation {
            return Ok(());
        }
        let now_ms = self.now;
        let Some(live) = self.live(id) else {
            return Ok(());
        };
        let raft = live.consensus.raft();
        let term = (raft.role() == Role::Leader).then_some(raft.term());
        let due = live.lessor.upkeep(&live.sm, term, now_ms);
        self.schedule(
            LEASE_TICK_MS,
            Event::LeaseUpkeep {
                node: id,
                incarnation,
            },
        );
        for lease in due {
            self.propose_revoke(id, lease)?;
        }
        Ok(())
    }

    /// Proposes the revoke of an expired lease at node `id` (as `revoke_expired` does; nobody
    /// waits for the answer here) and records the entry it made, if any.
    fn propose_revoke(&mut self, id: NodeId, lease: u64) -> Result<(), String> {
        let payload = CommandRef::LeaseRevoke { id: lease }
            .encode_with(None)
            .map_err(|e| e.to_string())?;
        let Some(live) = self.live(id) else {
            return Ok(());
        };
        let before = live.consensus.raft().log().last_index();
        let (reply, _) = oneshot::channel();
        let request = NodeRequest::Propose {
            payload: payload.clone(),
            reply,
        };
        self.step(id, Input::Request(request))?;
        let Some(live) = self.live(id) else {
            return Ok(());
        };
        let log = live.consensus.raft().log();
        let made = (before + 1..=log.last_index())
            .filter_map(|i| log.entry(i))
            .find(|e| e.payload[..] == payload[..])
            .map(|e| (e.index, e.term));
        if let Some(at) = made {
            self.stats.lease_revokes_proposed += 1;
            self.leases
                .upkeep_proposed
                .insert(at, (lease, id, self.now));
        }
        Ok(())
    }

    /// Answers the keepalives whose ReadIndex round node `id` finished: if the node still
    /// leads, the lessor renews the lease from the clock read before the round.
    pub(super) fn poll_keepalives(&mut self, id: NodeId) {
        let now_ms = self.now;
        let Some(live) = self.live(id) else {
            return;
        };
        let mut rounds = Vec::new();
        live.keepalives.retain_mut(|k| match k.rx.try_recv() {
            Ok(r) => {
                rounds.push((k.client, k.attempt, k.lease, k.before_ms, r));
                false
            }
            Err(oneshot::error::TryRecvError::Empty) => true,
            Err(oneshot::error::TryRecvError::Closed) => false,
        });
        let mut answers = Vec::new();
        for (client, attempt, lease, before_ms, round) in rounds {
            let resp = match round {
                Err(e) => super::error_response(e),
                Ok(_) => {
                    let raft = live.consensus.raft();
                    if raft.role() != Role::Leader {
                        // "leadership moved during the request; retry".
                        Response::Retry
                    } else {
                        let term = raft.term();
                        match live
                            .lessor
                            .keepalive_confirmed(&live.sm, term, lease, before_ms, now_ms)
                        {
                            Ok(remaining_ms) => Response::KeptAlive { remaining_ms },
                            Err(KeepaliveError::NotFound(_)) => Response::LeaseGone,
                            Err(KeepaliveError::NotLeader) => Response::Retry,
                        }
                    }
                }
            };
            answers.push((client, attempt, resp));
        }
        for (client, attempt, resp) in answers {
            self.respond(client, attempt, resp);
        }
    }
}
