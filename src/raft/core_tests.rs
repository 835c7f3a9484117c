//! Unit tests of the core's edges that the scenarios and the simulator do not pin down
//! directly: errors, restart validation, the durability split of messages, single-voter and
//! lease reads, and bounds.

use super::*;
use raftkv_types::{Entry, EntryKind, HardState, Membership, NodeId, SnapshotMeta};

fn config(id: u64) -> Config {
    let mut c = Config::new(id);
    c.election_timeout_min_ticks = 5;
    c.election_timeout_max_ticks = 6;
    c
}

/// Ticks `raft` until it leads (single voter) and persists everything it hands out.
fn single_leader(mut c: Config) -> Raft {
    c.id = 1;
    let mut r = Raft::bootstrap(c, Membership::with_voters([1]), 1).unwrap();
    for _ in 0..20 {
        r.tick();
        drain(&mut r);
    }
    assert_eq!(r.role(), Role::Leader);
    r
}

/// Records every `Ready` the harness handles.
#[derive(Default)]
struct Handed(Vec<Ready>);

impl harness::Observer for Handed {
    fn ready(&mut self, _id: NodeId, rd: &Ready) {
        self.0.push(rd.clone());
    }
}

/// Handles everything `r` has ready (persisted, applied; messages go nowhere) and returns the
/// batches. These tests look at what the core hands out, not at what is durable.
fn drain(r: &mut Raft) -> Vec<Ready> {
    let mut handed = Handed::default();
    let mut sent = std::collections::VecDeque::new();
    harness::process(r, &mut harness::Durable::default(), &mut sent, &mut handed);
    handed.0
}

#[test]
fn follower_refuses_proposals_and_reads_with_leader_hint() {
    let mut r = Raft::bootstrap(config(2), Membership::with_voters([1, 2, 3]), 1).unwrap();
    drain(&mut r);
    assert_eq!(
        r.propose(b"x".to_vec()),
        Err(RaftError::NotLeader { leader: None })
    );
    r.step(Message {
        from: 1,
        to: 2,
        term: 2,
        body: MessageBody::Heartbeat {
            commit: 1,
            read_round: 0,
            lease_ms: 0,
        },
    })
    .unwrap();
    assert_eq!(
        r.propose(b"x".to_vec()),
        Err(RaftError::NotLeader { leader: Some(1) })
    );
    assert_eq!(
        r.read_index(9),
        Err(RaftError::NotLeader { leader: Some(1) })
    );
    assert_eq!(
        r.transfer_leadership(3),
        Err(RaftError::NotLeader { leader: Some(1) })
    );
}

#[test]
fn bad_messages_are_typed_errors() {
    let mut r = Raft::bootstrap(config(2), Membership::with_voters([1, 2, 3]), 1).unwrap();
    let hb = MessageBody::Heartbeat {
        commit: 0,
        read_round: 0,
        lease_ms: 0,
    };
    let wrong_to = Message {
        from: 1,
        to: 3,
        term: 1,
        body: hb.clone(),
    };
    assert!(matches!(
        r.step(wrong_to),
        Err(RaftError::WrongRecipient { .. })
    ));
    // A sender outside our configuration may lead one we have not seen yet, or be a member
    // whose promotion we have not seen: its vote request is answered on its merits (here a
    // later term and a fresher log: granted), as etcd's raft does; the candidate counts
    // votes by its own configuration.
    let stranger = Message {
        from: 9,
        to: 2,
        term: 5,
        body: MessageBody::Vote {
            pre: false,
            last_index: 100,
            last_term: 4,
            transfer: true,
        },
    };
    assert_eq!(r.step(stranger), Ok(()));
    assert_eq!(r.term(), 5);
    let answers: Vec<(u64, MessageBody)> = r
        .ready()
        .messages_after_persist
        .into_iter()
        .map(|m| (m.to, m.body))
        .collect();
    assert_eq!(
        answers,
        vec![(
            9,
            MessageBody::VoteResponse {
                pre: false,
                granted: true
            }
        )]
    );
    drop(hb);
    let gap = Message {
        from: 1,
        to: 2,
        term: 2,
        body: MessageBody::Append {
            prev_index: 1,
            prev_term: 1,
            entries: vec![Entry {
                index: 5,
                term: 2,
                kind: EntryKind::Normal,
                payload: vec![].into(),
            }],
            commit: 1,
        },
    };
    assert!(matches!(
        r.step(gap),
        Err(RaftError::InvalidMessage { from: 1, .. })
    ));
}

#[test]
fn votes_and_acks_wait_for_persistence_leader_appends_do_not() {
    let mut r = Raft::bootstrap(config(2), Membership::with_voters([1, 2, 3]), 1).unwrap();
    drain(&mut r);
    r.step(Message {
        from: 1,
        to: 2,
        term: 2,
        body: MessageBody::Vote {
            pre: false,
            last_index: 1,
            last_term: 1,
            transfer: false,
        },
    })
    .unwrap();
    let rd = r.ready();
    assert_eq!(rd.hard_state.map(|h| (h.term, h.vote)), Some((2, Some(1))));
    assert!(rd.messages_now.is_empty());
    assert_eq!(rd.messages_after_persist.len(), 1);
    // A second candidate in the same term is refused.
    r.step(Message {
        from: 3,
        to: 2,
        term: 2,
        body: MessageBody::Vote {
            pre: false,
            last_index: 9,
            last_term: 2,
            transfer: false,
        },
    })
    .unwrap();
    let rd = r.ready();
    assert_eq!(
        rd.messages_after_persist[0].body,
        MessageBody::VoteResponse {
            pre: false,
            granted: false
        }
    );
}

#[test]
fn leader_counts_itself_only_once_persisted() {
    let mut c = config(1);
    c.election_timeout_min_ticks = 5;
    let mut r = single_leader(c);
    let (index, term) = r.propose(b"a".to_vec()).unwrap();
    let rd = r.ready();
    assert_eq!(rd.entries.last().map(|e| e.index), Some(index));
    assert!(rd.committed.is_empty());
    assert!(r.commit_index() < index, "not durable yet: not committed");
    r.persisted(index, term);
    assert_eq!(r.commit_index(), index);
    let rd = r.ready();
    assert_eq!(rd.committed.last().map(|e| e.index), Some(index));
}

#[test]
fn single_voter_and_lease_reads_need_no_round() {
    let mut r = single_leader(config(1));
    r.read_index(5).unwrap();
    let rds = drain(&mut r);
    let reads: Vec<ReadState> = rds.iter().flat_map(|rd| rd.read_states.clone()).collect();
    assert_eq!(
        reads,
        vec![ReadState {
            id: 5,
            index: r.commit_index()
        }]
    );
    let mut c = config(1);
    c.lease_reads = true;
    assert!(c.validate().is_err(), "lease reads need a lease");
    c.lease_ms = Config::lease_ms_for(100, c.election_timeout_min_ticks);
    assert_eq!(
        c.lease_ms, 400,
        "the promise: one tick short of the minimum timeout"
    );
    assert_eq!(
        c.lease_trusted_ms(),
        360,
        "less the 10 % clock drift allowed"
    );
    assert!(c.validate().is_ok());
    c.lease_ms = crate::raft::config::LEASE_MS_MAX + 1;
    assert!(
        c.validate().is_err(),
        "a lease longer than followers accept"
    );
    c.lease_ms = 400;
    c.check_quorum = false;
    assert!(c.validate().is_err(), "lease reads require check-quorum");
}

#[test]
fn proposals_and_reads_are_bounded() {
    let mut c = config(1);
    c.uncommitted_bytes_max = 100;
    c.pending_reads_max = 1;
    let mut r = single_leader(c);
    let mut refused = None;
    for _ in 0..10 {
        if let Err(e) = r.propose(vec![0; 40]) {
            refused = Some(e);
            break;
        }
    }
    assert!(matches!(
        refused,
        Some(RaftError::ProposalBacklogFull { .. })
    ));
    drain(&mut r);
    assert!(
        r.propose(vec![0; 40]).is_ok(),
        "committing frees the budget"
    );
    // Reads: one pending (not yet released because its index is not applied) fills the queue.
    r.read_index(1).unwrap();
    assert_eq!(
        r.read_index(2),
        Err(RaftError::ReadBacklogFull {
            pending_reads_max: 1
        })
    );
}

#[test]
fn restart_validates_and_adopts_a_torn_newer_term() {
    let membership = Membership::with_voters([1, 2, 3]);
    let snapshot = SnapshotMeta {
        index: 4,
        term: 2,
        membership: membership.clone(),
    };
    let entry = |index, term| Entry {
        index,
        term,
        kind: EntryKind::Normal,
        payload: vec![].into(),
    };
    // A gap between the snapshot and the log.
    let gap = RestartState {
        hard_state: HardState {
            term: 2,
            vote: None,
            commit: 4,
        },
        snapshot: snapshot.clone(),
        prefix: Default::default(),
        entries: vec![entry(7, 2)],
        applied: 4,
    };
    assert!(matches!(
        Raft::restart(config(1), gap, 1),
        Err(RaftError::InvalidRestart(_))
    ));
    // Entries of term 3 survived a torn write but the hard state (term 2, vote 2) did not
    // get updated: the node adopts term 3 with no vote; commit is clamped to the log.
    let torn = RestartState {
        hard_state: HardState {
            term: 2,
            vote: Some(2),
            commit: 9,
        },
        snapshot,
        prefix: Default::default(),
        entries: vec![entry(3, 2), entry(4, 2), entry(5, 3)],
        applied: 4,
    };
    let r = Raft::restart(config(1), torn, 1).unwrap();
    assert_eq!((r.term(), r.vote()), (3, None));
    assert_eq!(r.commit_index(), 5);
    assert_eq!(
        r.log().base_index(),
        3,
        "the margin before the snapshot is kept"
    );
    assert_eq!(r.applied_index(), 4);
}

#[test]
fn compaction_requires_applied_and_matching_term() {
    let mut r = single_leader(config(1));
    let (index, term) = r.propose(b"a".to_vec()).unwrap();
    drain(&mut r);
    assert!(matches!(
        r.compact(index + 1, term),
        Err(RaftError::InvalidCompaction { .. })
    ));
    assert!(matches!(
        r.compact(index, term + 1),
        Err(RaftError::InvalidCompaction { .. })
    ));
    r.compact(index, term).unwrap();
    assert_eq!(r.log().first_index(), index + 1);
}

#[test]
fn same_inputs_same_outputs() {
    let run = || {
        let mut r = Raft::bootstrap(config(1), Membership::with_voters([1, 2, 3]), 99).unwrap();
        let mut out = Vec::new();
        for _ in 0..30 {
            r.tick();
            out.extend(drain(&mut r));
        }
        format!("{out:?}")
    };
    assert_eq!(run(), run());
}

#[test]
fn lease_reads_are_served_only_within_the_lease() {
    let mut c = config(1);
    c.lease_reads = true;
    c.lease_ms = 500; // trusted for 450 ms (10 % clock drift allowed)
    c.heartbeat_ticks = 1;
    let membership = Membership::with_voters([1, 2, 3]);
    let mut r = Raft::bootstrap(c, membership, 1).unwrap();
    // Elect n1 by hand: pre-vote, vote, then acknowledge its no-op.
    let reply = |r: &mut Raft, from: u64, term: u64, body: MessageBody| {
        r.step(Message {
            from,
            to: 1,
            term,
            body,
        })
        .unwrap();
    };
    while r.role() == Role::Follower {
        r.tick();
    }
    drain(&mut r);
    for p in [2, 3] {
        reply(
            &mut r,
            p,
            2,
            MessageBody::VoteResponse {
                pre: true,
                granted: true,
            },
        );
    }
    drain(&mut r);
    for p in [2, 3] {
        reply(
            &mut r,
            p,
            2,
            MessageBody::VoteResponse {
                pre: false,
                granted: true,
            },
        );
    }
    drain(&mut r);
    assert_eq!(r.role(), Role::Leader);
    for p in [2, 3] {
        reply(
            &mut r,
            p,
            2,
            MessageBody::AppendResponse {
                reject: false,
                index: 2,
                hint: None,
            },
        );
    }
    drain(&mut r);
    assert_eq!(r.commit_index(), 2);
    // No heartbeat acknowledged yet: the read takes the round path (not released at once).
    r.read_index_at(1, ReadLevel::Lease).unwrap();
    assert!(drain(&mut r).iter().all(|rd| rd.read_states.is_empty()));
    // A heartbeat round made at 100 ms and acknowledged by n2: the lease holds, reads are
    // released at once.
    r.advance_clock(100);
    r.tick();
    let round = r.ready().messages_now.iter().find_map(|m| match m.body {
        MessageBody::Heartbeat {
            read_round,
            lease_ms,
            ..
        } => Some((read_round, lease_ms)),
        _ => None,
    });
    let (round, lease_ms) = round.unwrap();
    assert_eq!(
        lease_ms, 500,
        "the heartbeat asks followers for the whole lease"
    );
    reply(
        &mut r,
        2,
        2,
        MessageBody::HeartbeatResponse { read_round: round },
    );
    r.read_index_at(2, ReadLevel::Lease).unwrap();
    let released: Vec<u64> = drain(&mut r)
        .iter()
        .flat_map(|rd| rd.read_states.iter().map(|s| s.id))
        .collect();
    assert_eq!(released, vec![1, 2]);
    // A linearizable read never uses the lease: it waits for a round of its own.
    r.read_index(4).unwrap();
    assert!(drain(&mut r).iter().all(|rd| rd.read_states.is_empty()));
    // Without a tick (a paused process) the clock alone decides: still trusted at 549 ms,
    // lapsed at 550 ms.
    r.advance_clock(549);
    r.read_index_at(5, ReadLevel::Lease).unwrap();
    let released: Vec<u64> = drain(&mut r)
        .iter()
        .flat_map(|rd| rd.read_states.iter().map(|s| s.id))
        .collect();
    assert_eq!(released, vec![5]);
    r.advance_clock(550);
    r.read_index_at(3, ReadLevel::Lease).unwrap();
    assert!(drain(&mut r).iter().all(|rd| rd.read_states.is_empty()));
}

/// Regression for the bug the simulator found (seed 276 at the time): a follower replaces a
/// suffix and learns a commit index covering the new entry in the same `Ready`. If a torn
/// write keeps a prefix of that batch, the restarted node must never treat the replaced (old)
/// entry as committed. With the contract's order (entries, then hard state) every prefix is
/// safe; with hard state first, one prefix is not — the test checks both, so the order is
/// pinned down by the test.
#[test]
fn regression_torn_write_never_commits_a_replaced_entry() {
    let membership = Membership::with_voters([1, 2, 3]);
    let entry = |index, term, payload: &[u8]| Entry {
        index,
        term,
        kind: EntryKind::Normal,
        payload: payload.to_vec().into(),
    };
    // Durable before: entries 1..=3, index 3 from an old leader of term 2; commit 2.
    let config_entry = Entry {
        index: 1,
        term: 1,
        kind: EntryKind::Config,
        payload: raftkv_types::codec::encode(&membership).unwrap().into(),
    };
    let durable_log = vec![config_entry, entry(2, 2, b"a"), entry(3, 2, b"stale")];
    let durable_hs = HardState {
        term: 3,
        vote: None,
        commit: 2,
    };
    let mut r = Raft::restart(
        config(2),
        RestartState {
            hard_state: durable_hs,
            snapshot: SnapshotMeta::default(),
            prefix: Default::default(),
            entries: durable_log.clone(),
            applied: 2,
        },
        1,
    )
    .unwrap();
    // The leader of term 3 replaces index 3 and says 3 is committed.
    r.step(Message {
        from: 1,
        to: 2,
        term: 3,
        body: MessageBody::Append {
            prev_index: 2,
            prev_term: 2,
            entries: vec![entry(3, 3, b"new")],
            commit: 3,
        },
    })
    .unwrap();
    let rd = r.ready();
    let hs = rd.hard_state.expect("commit changed");
    assert_eq!(hs.commit, 3);
    assert_eq!(rd.entries, vec![entry(3, 3, b"new")]);

    // Records of the batch in a given order; restart from every prefix of it.
    enum Rec {
        Hs(HardState),
        E(Entry),
    }
    let restart_from = |records: &[Rec]| {
        let mut log = durable_log.clone();
        let mut hard_state = durable_hs;
        for rec in records {
            match rec {
                Rec::Hs(h) => hard_state = *h,
                Rec::E(e) => {
                    log.retain(|x| x.index < e.index);
                    log.push(e.clone());
                }
            }
        }
        let r = Raft::restart(
            config(2),
            RestartState {
                hard_state,
                snapshot: SnapshotMeta::default(),
                prefix: Default::default(),
                entries: log,
                applied: 2,
            },
            1,
        )
        .unwrap();
        // Is a stale entry considered committed?
        r.commit_index() >= 3 && r.log().entry(3).map(|e| e.term) == Some(2)
    };
    let contract = [Rec::E(rd.entries[0].clone()), Rec::Hs(hs)];
    for keep in 0..=contract.len() {
        assert!(
            !restart_from(&contract[..keep]),
            "entries-then-hard-state: prefix {keep} commits a stale entry"
        );
    }
    let hard_state_first = [Rec::Hs(hs), Rec::E(rd.entries[0].clone())];
    assert!(
        (0..=2).any(|keep| restart_from(&hard_state_first[..keep])),
        "hard-state-first must be the unsafe order this test guards against"
    );
}

#[test]
fn restarted_follower_keeps_the_lease_promise_for_an_election_timeout() {
    let membership = Membership::with_voters([1, 2, 3]);
    let state = || RestartState {
        hard_state: HardState {
            term: 2,
            vote: Some(1),
            commit: 1,
        },
        snapshot: SnapshotMeta::default(),
        prefix: Default::default(),
        entries: vec![Entry {
            index: 1,
            term: 1,
            kind: EntryKind::Config,
            payload: raftkv_types::codec::encode(&membership).unwrap().into(),
        }],
        applied: 1,
    };
    let vote = |r: &mut Raft| {
        r.step(Message {
            from: 3,
            to: 2,
            term: 3,
            body: MessageBody::Vote {
                pre: false,
                last_index: 1,
                last_term: 1,
                transfer: false,
            },
        })
        .unwrap();
        r.ready().messages_after_persist
    };
    let mut r = Raft::restart(config(2), state(), 1).unwrap();
    assert!(vote(&mut r).is_empty(), "ignored right after a restart");
    assert_eq!(r.term(), 2);
    let mut r2 = Raft::restart(config(2), state(), 1).unwrap();
    for _ in 0..5 {
        r2.tick();
    }
    r2.ready();
    let granted = vote(&mut r2);
    assert_eq!(granted.len(), 1, "answered after an election timeout");
}

/// A follower of leader 1 in a 3-voter cluster, having just heard a heartbeat asking for
/// `lease_ms` (0: none) at clock 0.
fn following(id: u64, lease_ms: u64) -> Raft {
    let mut c = config(id);
    c.election_timeout_min_ticks = 10;
    c.election_timeout_max_ticks = 20;
    let mut r = Raft::bootstrap(c, Membership::with_voters([1, 2, 3]), 7).unwrap();
    drain(&mut r);
    r.step(Message {
        from: 1,
        to: id,
        term: 2,
        body: MessageBody::Heartbeat {
            commit: 1,
            read_round: 0,
            lease_ms,
        },
    })
    .unwrap();
    drain(&mut r);
    r
}

/// Ticks until `r` sends a (pre-)vote request; returns the ticks it took.
fn ticks_to_campaign(r: &mut Raft, max: u32) -> Option<u32> {
    for t in 1..=max {
        r.tick();
        let asked = drain(r).iter().any(|rd| {
            rd.messages_now
                .iter()
                .chain(&rd.messages_after_persist)
                .any(|m| matches!(m.body, MessageBody::Vote { .. }))
        });
        if asked {
            return Some(t);
        }
    }
    None
}

#[test]
fn a_follower_that_loses_its_leader_campaigns_early_staggered_by_rank() {
    // Node 2 has no lower-id survivor: one tick. Node 3 ranks behind node 2: three ticks.
    for (id, want) in [(2, 1), (3, 3)] {
        let mut r = following(id, 0);
        r.peer_unreachable(1);
        assert_eq!(r.leader(), None, "node {id} forgets the lost leader");
        assert_eq!(ticks_to_campaign(&mut r, 30), Some(want), "node {id}");
    }
    // Losing a connection to a peer that is not the leader changes nothing.
    let mut r = following(2, 0);
    r.peer_unreachable(3);
    assert_eq!(r.leader(), Some(1));
    assert!(ticks_to_campaign(&mut r, 9).is_none());
}

#[test]
fn a_live_leaders_next_message_cancels_the_early_campaign() {
    let mut r = following(3, 0);
    r.peer_unreachable(1);
    r.step(Message {
        from: 1,
        to: 3,
        term: 2,
        body: MessageBody::Heartbeat {
            commit: 1,
            read_round: 0,
            lease_ms: 0,
        },
    })
    .unwrap();
    assert_eq!(r.leader(), Some(1));
    // A whole (fresh) election timeout again: at least the 10-tick minimum.
    assert!(ticks_to_campaign(&mut r, 9).is_none());
}

/// Ticks `r` with its clock `tick_ms` further each tick until it asks for votes; returns the
/// ticks it took.
fn ticks_to_campaign_timed(r: &mut Raft, tick_ms: u64, max: u32) -> Option<u32> {
    for t in 1..=max {
        r.advance_clock(u64::from(t) * tick_ms);
        if ticks_to_campaign(r, 1).is_some() {
            return Some(t);
        }
    }
    None
}

#[test]
fn a_follower_that_promised_a_lease_waits_it_out_before_campaigning() {
    // The leader asked for 900 ms: at 100 ms a tick the early campaign comes at the minimum
    // election timeout (10 ticks, 1000 ms), past the promise.
    let mut r = following(2, 900);
    r.peer_unreachable(1);
    assert_eq!(r.leader(), None, "forgets the leader");
    assert_eq!(ticks_to_campaign_timed(&mut r, 100, 30), Some(10));
    // With a clock that says less time passed than the ticks do, the promise still holds
    // the campaign back: 10 ms a tick, 900 ms promised, so not before tick 90.
    let mut r = following(2, 900);
    r.peer_unreachable(1);
    assert_eq!(ticks_to_campaign_timed(&mut r, 10, 200), Some(90));
}

#[test]
fn a_follower_ignores_vote_requests_while_it_keeps_a_lease_promise() {
    let vote = |r: &mut Raft, pre: bool| {
        r.step(Message {
            from: 3,
            to: 2,
            term: 3,
            body: MessageBody::Vote {
                pre,
                last_index: 10,
                last_term: 2,
                transfer: false,
            },
        })
        .unwrap();
        drain(r).iter().any(|rd| {
            rd.messages_now
                .iter()
                .chain(&rd.messages_after_persist)
                .any(|m| matches!(m.body, MessageBody::VoteResponse { granted: true, .. }))
        })
    };
    let mut r = following(2, 900);
    // Fast failover forgets the leader and the ticks pass the check-quorum stickiness...
    r.peer_unreachable(1);
    for t in 1..=20 {
        r.advance_clock(40 * t);
        r.tick();
    }
    drain(&mut r);
    // ...but at 800 ms the promise holds: neither a pre-vote nor a vote is granted.
    assert!(!vote(&mut r, true));
    assert!(!vote(&mut r, false));
    assert_eq!(r.term(), 2, "an ignored vote request changes no term");
    r.advance_clock(900);
    assert!(vote(&mut r, true), "granted once the promise ran out");
}

/// Found by the simulator (seed 345 of the issue-11 client mix): without pre-vote and
/// check-quorum, a node whose own configuration (a joint one adding it) makes it a voter,
/// while the leader's has demoted it to a learner, raised its term by campaigning; every
/// vote request was ignored as a non-voter's, and it ignored the leader's appends of the
/// older term, trusting its campaign to bring the cluster to its term: stuck for good. It
/// now tells the stale leader its term whether or not it may campaign.
#[test]
fn a_node_that_may_campaign_tells_a_stale_leader_its_term_too() {
    let mut c = config(4);
    c.pre_vote = false;
    c.check_quorum = false;
    let m = Membership::with_voters([1, 2, 3, 4]);
    let mut r = Raft::join(c, m, 1).unwrap();
    assert!(r.may_campaign());
    let vote = MessageBody::Vote {
        pre: false,
        transfer: false,
        last_index: 0,
        last_term: 0,
    };
    r.step(Message {
        from: 1,
        to: 4,
        term: 9,
        body: vote,
    })
    .unwrap();
    assert_eq!(r.term(), 9);
    drain(&mut r);
    r.step(Message {
        from: 2,
        to: 4,
        term: 5,
        body: MessageBody::Heartbeat {
            commit: 0,
            read_round: 0,
            lease_ms: 0,
        },
    })
    .unwrap();
    let sent: Vec<Message> = drain(&mut r)
        .into_iter()
        .flat_map(|rd| rd.messages_now.into_iter().chain(rd.messages_after_persist))
        .collect();
    assert!(
        sent.iter().any(|m| m.to == 2
            && m.term == 9
            && matches!(m.body, MessageBody::AppendResponse { reject: true, .. })),
        "{sent:?}"
    );
}

/// Found by the simulator (seed 8 with membership changes): without pre-vote and
/// check-quorum a node silently ignores a leader of an older term, trusting its own campaign
/// to bring the cluster up to its term. A learner (or a member removed by a committed
/// configuration) never campaigns: once a vote request raised its term above the leader's,
/// it ignored that leader forever and never caught up. It now tells the stale leader.
#[test]
fn a_node_that_may_not_campaign_tells_a_stale_leader_its_term() {
    let mut c = config(4);
    c.pre_vote = false;
    c.check_quorum = false;
    let mut m = Membership::with_voters([1, 2, 3]);
    m.learners.insert(4);
    let mut r = Raft::join(c, m, 1).unwrap();
    // A vote request of term 9 (from a voter of this learner's configuration) raises its term.
    let vote = MessageBody::Vote {
        pre: false,
        transfer: false,
        last_index: 0,
        last_term: 0,
    };
    r.step(Message {
        from: 1,
        to: 4,
        term: 9,
        body: vote,
    })
    .unwrap();
    assert_eq!(r.term(), 9);
    drain(&mut r);
    // The leader of term 5 appends: the learner answers with its term.
    r.step(Message {
        from: 2,
        to: 4,
        term: 5,
        body: MessageBody::Heartbeat {
            commit: 0,
            read_round: 0,
            lease_ms: 0,
        },
    })
    .unwrap();
    let sent: Vec<Message> = drain(&mut r)
        .into_iter()
        .flat_map(|rd| rd.messages_now.into_iter().chain(rd.messages_after_persist))
        .collect();
    assert!(
        sent.iter().any(|m| m.to == 2
            && m.term == 9
            && matches!(m.body, MessageBody::AppendResponse { reject: true, .. })),
        "{sent:?}"
    );
    assert!(!r.may_campaign());
}

#[test]
fn restart_from_a_prefix_keeps_terms_and_configurations_without_payloads() {
    let membership = Membership::with_voters([1, 2, 3]);
    let entry = |index, term, kind, payload: Vec<u8>| Entry {
        index,
        term,
        kind,
        payload: payload.into(),
    };
    let mut prefix = raftkv_types::LogPrefix::default();
    prefix.push(&entry(
        1,
        1,
        EntryKind::Config,
        membership.encode().unwrap(),
    ));
    for i in 2..=5 {
        prefix.push(&entry(i, 2, EntryKind::Normal, vec![7; 10]));
    }
    let state = |prefix: raftkv_types::LogPrefix| RestartState {
        hard_state: HardState {
            term: 3,
            vote: None,
            commit: 6,
        },
        snapshot: SnapshotMeta::default(),
        prefix,
        entries: (6..=7)
            .map(|i| entry(i, 3, EntryKind::Normal, vec![8; 4]))
            .collect(),
        applied: 5,
    };
    let r = Raft::restart(config(1), state(prefix.clone()), 1).unwrap();
    assert_eq!(
        r.membership(),
        &membership,
        "the configuration came from the prefix"
    );
    let log = r.log();
    assert_eq!(
        (log.last_index(), log.last_term(), log.held_from()),
        (7, 3, 6)
    );
    assert_eq!(
        (log.term(1), log.term(3), log.term(6)),
        (Some(1), Some(2), Some(3))
    );
    assert!(log.entry(3).is_none(), "an applied payload stays on disk");
    assert_eq!(log.size_bytes(3), Some(27));
    assert_eq!(log.held_bytes(), 2 * 21);
    assert_eq!(r.commit_index(), 6);
    // A prefix whose terms go down, or that does not meet the entries, is refused.
    let mut down = prefix.clone();
    down.term_runs = vec![(1, 2), (3, 1)];
    assert!(matches!(
        Raft::restart(config(1), state(down), 1),
        Err(RaftError::InvalidRestart(_))
    ));
    let mut short = prefix;
    short.sizes.pop();
    assert!(matches!(
        Raft::restart(config(1), state(short), 1),
        Err(RaftError::InvalidRestart(_))
    ));
}
