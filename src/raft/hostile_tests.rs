//! Regression tests for issue 13: messages that are well-formed but absurd (a term of 2^64−1,
//! a huge commit or prev index) must never reach the core's state, and a cluster that was sent
//! them must still elect a leader and commit writes. The node refuses them on receipt already
//! (`node::peer::validate`); these tests step them straight into `Raft::step`, the worst case.
//! Also from issue 13: a follower must not receive the same snapshot twice.

use super::limits::{INDEX_MAX, TERM_JUMP_MAX, TERM_MAX};
use super::*;
use raftkv_types::{Entry, EntryKind, NodeId, SnapshotMeta};
use std::collections::{BTreeMap, BTreeSet};

/// What the tests read back: the Normal payloads each node applied, and the snapshot
/// transfers the cores asked for, (from, to). The transfers are not delivered: the tests
/// stand in for the node's streaming.
#[derive(Default)]
struct Record {
    committed: BTreeMap<NodeId, Vec<Vec<u8>>>,
    snapshot_sends: Vec<(NodeId, NodeId)>,
    /// Appends the cores asked the node to fill from the WAL (with entries to read).
    log_reads: usize,
}

impl harness::Observer for Record {
    fn ready(&mut self, id: NodeId, rd: &Ready) {
        let log = self.committed.entry(id).or_default();
        log.extend(
            rd.committed
                .iter()
                .filter(|e| e.kind == EntryKind::Normal)
                .map(|e| e.payload.to_vec()),
        );
        self.snapshot_sends
            .extend(rd.snapshot_sends.iter().map(|s| (id, s.to)));
        self.log_reads += rd.log_reads.iter().filter(|r| r.lo <= r.hi).count();
    }
}

/// Three cores whose writes are durable at once and whose messages are delivered in order.
struct Cluster {
    h: harness::Cluster<Record>,
}

impl Cluster {
    fn new(seed: u64) -> Cluster {
        Cluster::with_log_cache(seed, Config::new(1).log_cache_bytes_max)
    }

    /// A cluster whose cores keep `log_cache_bytes_max` of applied payloads in memory.
    fn with_log_cache(seed: u64, log_cache_bytes_max: u64) -> Cluster {
        println!("cluster seed {seed}");
        let configs = (1..=3)
            .map(|id| {
                let mut c = Config::new(id);
                c.election_timeout_min_ticks = 10;
                c.election_timeout_max_ticks = 20;
                c.snapshot_install_wait_ticks = 200;
                c.log_cache_bytes_max = log_cache_bytes_max;
                c.append_bytes_max = c.append_bytes_max.min(log_cache_bytes_max);
                c
            })
            .collect();
        let h = harness::Cluster::bootstrap(configs, seed, Record::default()).unwrap();
        let mut cluster = Cluster { h };
        for id in 1..=3 {
            cluster.process(id);
        }
        cluster
    }

    fn process(&mut self, id: NodeId) {
        self.h.process(id);
    }

    fn node(&self, id: NodeId) -> &Raft {
        self.h.raft(id).unwrap()
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Raft {
        self.h.raft_mut(id)
    }

    fn snapshot_sends(&self) -> &[(NodeId, NodeId)] {
        &self.h.observer().snapshot_sends
    }

    /// Drops messages to and from `id` (None: none).
    fn cut(&mut self, id: Option<NodeId>) {
        match id {
            Some(id) => {
                let rest = (1..=3).filter(|&n| n != id).collect();
                self.h.partition(vec![BTreeSet::from([id]), rest]);
            }
            None => self.h.heal(),
        }
    }

    /// One tick everywhere, then every message (and every answer) delivered.
    fn round(&mut self) {
        for id in 1..=3 {
            self.node_mut(id).tick();
            self.process(id);
        }
        while let Some(envelope) = self.h.network_mut().pop_front() {
            if let harness::Envelope::Message(_) = envelope {
                self.h.deliver(envelope);
            }
        }
    }

    fn leader(&self) -> Option<NodeId> {
        self.h
            .ids()
            .into_iter()
            .find(|&id| self.node(id).role() == Role::Leader)
    }

    fn elect(&mut self) -> NodeId {
        for _ in 0..200 {
            self.round();
            if let Some(id) = self.leader() {
                return id;
            }
        }
        panic!("no leader elected");
    }

    /// Proposes `payload` on the leader and asserts every node applies it.
    fn write_commits(&mut self, payload: &[u8]) {
        let leader = self.elect();
        self.node_mut(leader).propose(payload.to_vec()).unwrap();
        self.process(leader);
        for _ in 0..50 {
            self.round();
        }
        for id in 1..=3 {
            let applied = &self.h.observer().committed[&id];
            assert_eq!(
                applied.last().map(Vec::as_slice),
                Some(payload),
                "node {id}"
            );
        }
    }

    /// `m` must be refused where the node receives it (`node::peer::validate`, on the link
    /// of its claimed sender) and again by the core.
    fn refused_on_receipt(&mut self, m: Message) {
        let message = crate::node::peer::PeerMessage::Raft(m.clone());
        assert!(
            crate::node::peer::validate(m.from, m.to, &message).is_err(),
            "validation let {m} through"
        );
        self.refused(m);
    }

    /// Steps `m` into its recipient: it must be refused and leave the term alone.
    fn refused(&mut self, m: Message) {
        let to = m.to;
        let r = self.node_mut(to);
        let (term, commit, last) = (r.term(), r.commit_index(), r.log().last_index());
        let desc = m.to_string();
        match r.step(m) {
            Err(RaftError::InvalidMessage { .. }) => {}
            other => panic!("{desc} was not refused: {other:?}"),
        }
        assert_eq!(
            (r.term(), r.commit_index(), r.log().last_index()),
            (term, commit, last),
            "{desc} changed node {to}"
        );
        self.process(to);
    }
}

fn forged(from: NodeId, to: NodeId, term: u64, body: MessageBody) -> Message {
    Message {
        from,
        to,
        term,
        body,
    }
}

#[test]
fn a_forged_vote_with_term_u64_max_is_refused_and_the_cluster_still_elects() {
    // Out of range; and in range but far ahead (it would use up the term space at once).
    for term in [u64::MAX, TERM_MAX, TERM_MAX - 1, 4 + TERM_JUMP_MAX] {
        let mut c = Cluster::new(11);
        c.write_commits(b"before");
        for to in 1..=3 {
            let from = if to == 1 { 2 } else { 1 };
            for pre in [false, true] {
                let m = forged(
                    from,
                    to,
                    term,
                    MessageBody::Vote {
                        pre,
                        last_index: 7,
                        last_term: 1,
                        transfer: true,
                    },
                );
                if term >= TERM_MAX {
                    c.refused_on_receipt(m);
                } else {
                    // In range: only the core, which knows its own term, can tell.
                    c.refused(m);
                }
                c.refused_on_receipt(forged(
                    from,
                    to,
                    term,
                    MessageBody::Vote {
                        pre,
                        last_index: u64::MAX,
                        last_term: 1,
                        transfer: true,
                    },
                ));
            }
        }
        c.write_commits(b"after");
        // No node adopted the forged term (the original bug persisted it, so it survived
        // restarts): terms are those of the few real elections.
        assert!(c.h.ids().into_iter().all(|id| c.node(id).term() < 100));
    }
}

#[test]
fn a_huge_commit_or_prev_index_is_refused_and_writes_still_commit() {
    let mut c = Cluster::new(12);
    c.write_commits(b"before");
    let leader = c.elect();
    let term = c.node(leader).term();
    let follower = if leader == 1 { 2 } else { 1 };
    let append = |prev_index, commit, entries: Vec<Entry>| MessageBody::Append {
        prev_index,
        prev_term: term,
        entries,
        commit,
    };
    let entry = |index| Entry {
        index,
        term,
        kind: EntryKind::Normal,
        payload: b"evil".to_vec().into(),
    };
    c.refused_on_receipt(forged(leader, follower, term, append(2, u64::MAX, vec![])));
    c.refused_on_receipt(forged(leader, follower, term, append(INDEX_MAX, 1, vec![])));
    c.refused_on_receipt(forged(leader, follower, term, append(u64::MAX, 1, vec![])));
    c.refused_on_receipt(forged(
        leader,
        follower,
        term,
        append(u64::MAX - 1, 1, vec![entry(u64::MAX)]),
    ));
    c.refused_on_receipt(forged(
        leader,
        follower,
        term,
        MessageBody::Heartbeat {
            commit: u64::MAX,
            read_round: 0,
            lease_ms: 0,
        },
    ));
    c.refused_on_receipt(forged(
        follower,
        leader,
        term,
        MessageBody::AppendResponse {
            reject: false,
            index: u64::MAX,
            hint: None,
        },
    ));
    c.write_commits(b"after");
}

#[test]
fn a_commit_beyond_the_append_is_clamped_to_its_last_entry() {
    // Legitimate: the leader sends its own commit index; the follower may commit only what it
    // holds. In range but beyond the log, it must not move the follower's commit past its log.
    let mut c = Cluster::new(13);
    c.write_commits(b"x");
    let leader = c.elect();
    let follower = if leader == 1 { 2 } else { 1 };
    let term = c.node(leader).term();
    let last = c.node(follower).log().last_index();
    let r = c.node_mut(follower);
    r.step(forged(
        leader,
        follower,
        term,
        MessageBody::Append {
            prev_index: last,
            prev_term: term,
            entries: vec![],
            commit: INDEX_MAX - 1,
        },
    ))
    .unwrap();
    assert_eq!(r.commit_index(), last);
}

#[test]
fn restart_refuses_a_durable_term_out_of_range() {
    let state = RestartState {
        hard_state: raftkv_types::HardState {
            term: u64::MAX,
            vote: Some(2),
            commit: 0,
        },
        ..RestartState::default()
    };
    let err = Raft::restart(Config::new(1), state, 1).err();
    assert!(
        matches!(err, Some(RaftError::InvalidRestart(ref why)) if why.contains("out of range")),
        "{err:?}"
    );
}

/// A cluster whose follower missed entries the leader compacted away: returns (leader,
/// follower) right after the leader asked for the first snapshot transfer.
fn follower_needing_a_snapshot(seed: u64) -> (Cluster, NodeId, NodeId) {
    let mut c = Cluster::new(seed);
    c.write_commits(b"a");
    let leader = c.elect();
    let follower = if leader == 1 { 2 } else { 1 };
    c.cut(Some(follower));
    for k in 0..5 {
        let r = c.node_mut(leader);
        r.propose(format!("w{k}").into_bytes()).unwrap();
        c.process(leader);
        c.round();
    }
    for _ in 0..5 {
        c.round();
    }
    let applied = c.node(leader).applied_index();
    c.h.compact(leader, applied).unwrap();
    c.cut(None);
    for _ in 0..20 {
        c.round();
        if !c.snapshot_sends().is_empty() {
            return (c, leader, follower);
        }
    }
    panic!("the leader never asked for a snapshot");
}

#[test]
fn a_delivered_snapshot_is_not_sent_again_while_the_follower_installs_it() {
    let (mut c, leader, follower) = follower_needing_a_snapshot(14);
    assert_eq!(c.snapshot_sends(), [(leader, follower)]);
    // The node streamed it; the follower is still installing (its core has not seen it).
    c.node_mut(leader).snapshot_sent(follower, true);
    for _ in 0..150 {
        c.round();
    }
    assert_eq!(c.snapshot_sends().len(), 1, "a second transfer started");
    // The install completes: the follower acknowledges and catches up from the log.
    let r = c.node(leader);
    let index = r.log().base_index();
    let meta = SnapshotMeta {
        index,
        term: r.log().base_term(),
        membership: r.membership().clone(),
    };
    let term = r.term();
    let f = c.node_mut(follower);
    f.step(forged(
        leader,
        follower,
        term,
        MessageBody::InstallSnapshot { meta },
    ))
    .unwrap();
    c.process(follower);
    c.write_commits(b"after");
    assert_eq!(c.snapshot_sends().len(), 1);
    assert!(c.node(follower).log().last_index() > index);
}

#[test]
fn an_install_never_acknowledged_is_given_up_after_the_wait() {
    let (mut c, leader, follower) = follower_needing_a_snapshot(15);
    c.node_mut(leader).snapshot_sent(follower, true);
    for _ in 0..199 {
        c.round();
    }
    assert_eq!(c.snapshot_sends().len(), 1);
    // The follower lost it (say it crashed before installing): after the wait it gets another.
    for _ in 0..20 {
        c.round();
    }
    assert_eq!(c.snapshot_sends().len(), 2);
}

/// A follower that fell behind what the leader keeps in memory is sent entries the node reads
/// back from its durable log, in order, and ends with the same log and the same applied
/// writes; the leader's memory holds at most its cache (plus what is not applied yet).
#[test]
fn a_follower_behind_the_log_cache_catches_up_from_the_durable_log() {
    let mut c = Cluster::with_log_cache(21, 600);
    let leader = c.elect();
    let behind = if leader == 3 { 2 } else { 3 };
    c.cut(Some(behind));
    for i in 0..200u32 {
        let payload = format!("write-{i:04}-{}", "x".repeat(20)).into_bytes();
        c.node_mut(leader).propose(payload).unwrap();
        c.process(leader);
        c.round();
    }
    let log = c.node(leader).log();
    assert!(log.held_bytes() <= 600, "held {} bytes", log.held_bytes());
    assert!(log.held_from() > 100, "evicted up to {}", log.held_from());
    assert_eq!(
        c.h.observer().log_reads,
        0,
        "nobody was behind the cache yet"
    );
    c.cut(None);
    for _ in 0..100 {
        c.round();
    }
    assert!(
        c.h.observer().log_reads >= 10,
        "{} log reads",
        c.h.observer().log_reads
    );
    let last = c.node(leader).log().last_index();
    assert_eq!(c.node(behind).log().last_index(), last);
    assert_eq!(c.node(behind).commit_index(), last);
    let applied = &c.h.observer().committed;
    assert_eq!(applied[&behind], applied[&leader]);
    assert_eq!(applied[&behind].len(), 200);
    assert_eq!(
        c.h.durable(behind)
            .log
            .iter()
            .map(|e| (e.index, e.term))
            .collect::<Vec<_>>(),
        c.h.durable(leader)
            .log
            .iter()
            .map(|e| (e.index, e.term))
            .collect::<Vec<_>>()
    );
}
