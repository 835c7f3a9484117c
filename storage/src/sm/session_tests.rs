//! The session table through [`StateMachine::apply`]: exactly-once retries, stale and expired
//! sequence numbers, expiry by the log's clock, the bound on the table, persistence across
//! reopen and snapshots, and the figures [`StateMachine::sessions_summary`] gives.

use super::record::{SessionParams, SESSIONS_MAX_DEFAULT, SESSION_TTL_MS_DEFAULT};
use super::txn_tests::{cmp, del_prefix, entry, op_get, op_put, put, rec, reopen_at, txn, Driver};
use super::*;
use crate::command::{Command, CommandOutcome, OpResult, Refusal, Session};
use crate::snapshot::{SnapshotOptions, SnapshotStore};
use crate::txn::{CompareOp, Target};
use crate::vfs::SimFs;
use std::sync::Arc;

fn session(client: &str, seq: u64, now_ms: u64) -> Option<Session> {
    Some(Session {
        client: client.as_bytes().to_vec(),
        seq,
        now_ms,
    })
}

fn expire(now_ms: u64, ttl_ms: u64, sessions_max: u64) -> Command {
    Command::ExpireSessions {
        now_ms,
        ttl_ms,
        sessions_max,
    }
}

fn fresh(revision: u64, outcome: CommandOutcome) -> CommandResult {
    CommandResult {
        revision,
        outcome,
        duplicate: false,
    }
}

fn duplicate_of(original: &CommandResult) -> CommandResult {
    CommandResult {
        duplicate: true,
        ..original.clone()
    }
}

fn put_outcome(create_revision: u64, version: u64) -> CommandOutcome {
    CommandOutcome::Put {
        create_revision,
        version,
    }
}

/// One sessioned command alone in its batch.
fn sessioned(d: &mut Driver, s: Option<Session>, cmd: Command) -> CommandResult {
    d.batch(&[(s, cmd)]).pop().unwrap()
}

/// The sequence number the table remembers for `client`, if it has a session. Probes with
/// sequence number 0, which is below every remembered one (`SessionStale` names it) and is
/// not 1 for an unknown client (`SessionExpired`): never applied, and a refusal changes
/// nothing, not even the clock. (Validation refuses 0 before proposing; apply does not
/// recheck, as for every limit.)
fn last_seq(d: &mut Driver, client: &str) -> Option<u64> {
    let r = sessioned(d, session(client, 0, 0), put(b"probe", b"never applied"));
    assert!(d.record(b"probe").is_none(), "a probe applied: {r:?}");
    match r.outcome {
        CommandOutcome::Refused(Refusal::SessionStale { seq: 0, last_seq }) => Some(last_seq),
        CommandOutcome::Refused(Refusal::SessionExpired { seq: 0 }) => None,
        other => panic!("a probe answered {other:?}"),
    }
}

fn has_session(d: &mut Driver, client: &str, seq: u64) -> bool {
    match last_seq(d, client) {
        Some(last) => {
            assert_eq!(last, seq, "{client}");
            true
        }
        None => false,
    }
}

#[test]
fn a_retry_answers_the_original_result_without_applying_again() {
    let mut d = Driver::new();
    let first = d.batch(&[
        (session("cli", 1, 1_000), put(b"k", b"v")),
        // The retry in the same batch: the session table's overlay already knows it.
        (session("cli", 1, 1_001), put(b"k", b"v")),
    ]);
    assert_eq!(first[0], fresh(1, put_outcome(1, 1)));
    assert_eq!(first[1], duplicate_of(&first[0]));
    assert_eq!(d.record(b"k"), Some(rec(b"k", b"v", 1, 1, 1)));
    // In a later batch, and with a different command under the same number: still the
    // original answer (a sequence number names one write), nothing runs.
    let later = d.batch(&[
        (session("cli", 1, 2_000), put(b"k", b"v")),
        (session("cli", 1, 2_000), put(b"k", b"other")),
        (session("cli", 1, 2_000), del_prefix(b"k")),
    ]);
    assert!(later.iter().all(|r| *r == duplicate_of(&first[0])));
    assert_eq!(d.record(b"k"), Some(rec(b"k", b"v", 1, 1, 1)));
    // After a reopen the table comes back from sled.
    d.reopen();
    let r = sessioned(&mut d, session("cli", 1, 3_000), put(b"k", b"v"));
    assert_eq!(r, duplicate_of(&first[0]));
    assert_eq!(d.record(b"k").unwrap().version, 1);
    // The entries the retries occupied are applied (the index moves on) but changed nothing.
    assert_eq!(d.sm().applied_index(), 6);
    // The next number applies, at its own revision.
    let second = sessioned(&mut d, session("cli", 2, 3_000), put(b"k", b"v2"));
    assert_eq!(second, fresh(7, put_outcome(1, 2)));
    assert_eq!(d.record(b"k"), Some(rec(b"k", b"v2", 1, 7, 2)));
    // Only the latest write is remembered: a retry of it answers, one of 1 is stale.
    assert_eq!(
        sessioned(&mut d, session("cli", 2, 3_000), put(b"k", b"v2")),
        duplicate_of(&second)
    );
    assert_eq!(
        sessioned(&mut d, session("cli", 1, 3_000), put(b"k", b"v")).outcome,
        CommandOutcome::Refused(Refusal::SessionStale {
            seq: 1,
            last_seq: 2
        })
    );
    // Sequence numbers may skip: "increasing", not "consecutive".
    let r = sessioned(&mut d, session("cli", 10, 3_000), put(b"k", b"v10"));
    assert_eq!(r, fresh(10, put_outcome(1, 3)));
}

#[test]
fn a_retried_transaction_answers_its_original_results_even_after_the_key_changed() {
    let mut d = Driver::new();
    d.one(put(b"k", b"before")); // 1
    let t = txn(
        vec![cmp(
            b"k",
            CompareOp::Equal,
            Target::Value(b"before".to_vec()),
        )],
        vec![op_get(b"k"), op_put(b"k", b"after")],
        vec![op_get(b"k")],
    );
    let original = sessioned(&mut d, session("t", 1, 10), t.clone());
    assert_eq!(
        original,
        fresh(
            2,
            CommandOutcome::Txn {
                succeeded: true,
                results: vec![
                    OpResult::Get(Some(rec(b"k", b"before", 1, 1, 1))),
                    OpResult::Put {
                        create_revision: 1,
                        version: 2
                    },
                ],
            }
        )
    );
    d.one(put(b"k", b"someone else")); // 3
                                       // Re-run, the compare would now fail; the retry gets the original results instead.
    assert_eq!(
        sessioned(&mut d, session("t", 1, 20), t),
        duplicate_of(&original)
    );
    assert_eq!(d.record(b"k"), Some(rec(b"k", b"someone else", 1, 3, 3)));
}

#[test]
fn stale_and_expired_sequence_numbers_are_refused_and_change_nothing() {
    let mut d = Driver::new();
    let third = d.batch(&[
        (session("a", 1, 100), put(b"k", b"1")),
        (session("a", 3, 100), put(b"k", b"3")),
    ]);
    assert_eq!(third[1], fresh(2, put_outcome(1, 2)));
    let r = sessioned(&mut d, session("a", 2, 200), put(b"k", b"2"));
    assert_eq!(
        r,
        fresh(
            3,
            CommandOutcome::Refused(Refusal::SessionStale {
                seq: 2,
                last_seq: 3
            })
        )
    );
    assert_eq!(d.record(b"k"), Some(rec(b"k", b"3", 1, 2, 2)));
    // The refusal did not touch the session: its latest write still answers.
    assert_eq!(
        sessioned(&mut d, session("a", 3, 200), put(b"k", b"3")),
        duplicate_of(&third[1])
    );
    // An unknown client must start at 1.
    let r = sessioned(&mut d, session("b", 5, 200), put(b"b", b"5"));
    assert_eq!(
        r,
        fresh(
            5,
            CommandOutcome::Refused(Refusal::SessionExpired { seq: 5 })
        )
    );
    assert_eq!(d.record(b"b"), None);
    // ... and the refusal creates no session: 5 again is refused again, 1 applies.
    assert_eq!(
        sessioned(&mut d, session("b", 5, 200), put(b"b", b"5")).outcome,
        CommandOutcome::Refused(Refusal::SessionExpired { seq: 5 })
    );
    assert_eq!(d.sm().sessions_summary().count, 1);
    assert_eq!(
        sessioned(&mut d, session("b", 1, 200), put(b"b", b"1")),
        fresh(7, put_outcome(7, 1))
    );
    assert_eq!(d.sm().sessions_summary().count, 2);
    // Refused entries leave the clock alone (only applied writes carry it forward).
    sessioned(&mut d, session("nobody", 9, 900_000), put(b"b", b"x"));
    sessioned(&mut d, session("b", 1, 800_000), put(b"b", b"x"));
    assert_eq!(d.sm().sessions_summary().params.clock_ms, 200);
    assert_eq!(d.record(b"b").unwrap().value, b"1");
}

#[test]
fn expiry_follows_the_log_clock_and_keeps_recent_sessions() {
    let mut d = Driver::new();
    d.batch(&[
        (session("a", 1, 1_000), put(b"a", b"1")),
        (session("b", 1, 5_000), put(b"b", b"1")),
        (session("c", 1, 9_000), put(b"c", b"1")),
    ]);
    let s = d.sm().sessions_summary();
    assert_eq!((s.count, s.oldest_active_ms), (3, Some(1_000)));
    assert_eq!(s.params.clock_ms, 9_000);
    // Idle for the TTL or more expires: a (9 s idle) and b (exactly 5 s); c (1 s) stays.
    let r = d.one(expire(10_000, 5_000, 100));
    assert_eq!(r, fresh(4, CommandOutcome::SessionsExpired { expired: 2 }));
    let s = d.sm().sessions_summary();
    assert_eq!((s.count, s.oldest_active_ms), (1, Some(9_000)));
    assert_eq!(
        s.params,
        SessionParams {
            clock_ms: 10_000,
            ttl_ms: 5_000,
            sessions_max: 100
        }
    );
    assert_eq!(
        sessioned(&mut d, session("a", 2, 10_000), put(b"a", b"2")).outcome,
        CommandOutcome::Refused(Refusal::SessionExpired { seq: 2 })
    );
    assert!(has_session(&mut d, "c", 1));
    // A write whose leader's clock lags still counts as active at the log's clock.
    sessioned(&mut d, session("d", 1, 3_000), put(b"d", b"1"));
    assert_eq!(d.sm().sessions_summary().oldest_active_ms, Some(9_000));
    // c writes again with a clock ahead: the log's clock moves to 20 s.
    sessioned(&mut d, session("c", 2, 20_000), put(b"c", b"2"));
    // An expiry proposed by a leader whose clock lags (1 ms) does not move the clock back:
    // d (active at 10 s, idle 10 s) expires, c (active at 20 s) stays.
    let r = d.one(expire(1, 5_000, 100));
    assert_eq!(r.outcome, CommandOutcome::SessionsExpired { expired: 1 });
    let s = d.sm().sessions_summary();
    assert_eq!((s.count, s.oldest_active_ms), (1, Some(20_000)));
    assert_eq!(s.params.clock_ms, 20_000);
    assert!(has_session(&mut d, "c", 2));
    // Nothing idle long enough: nothing expires.
    assert_eq!(
        d.one(expire(24_999, 5_000, 100)).outcome,
        CommandOutcome::SessionsExpired { expired: 0 }
    );
    assert_eq!(
        d.one(expire(25_000, 5_000, 100)).outcome,
        CommandOutcome::SessionsExpired { expired: 1 }
    );
    let s = d.sm().sessions_summary();
    assert_eq!((s.count, s.oldest_active_ms), (0, None));
}

#[test]
fn a_full_table_evicts_the_least_recently_active_session() {
    let mut d = Driver::new();
    d.one(expire(0, 1_000_000, 3));
    let writes: Vec<_> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, c)| (session(c, 1, 100 * (i as u64 + 1)), put(c.as_bytes(), b"1")))
        .collect();
    d.batch(&writes);
    assert_eq!(d.sm().sessions_summary().count, 3);
    // a writes again: now b is the oldest.
    sessioned(&mut d, session("a", 2, 400), put(b"a", b"2"));
    // A fourth session arrives: b goes.
    sessioned(&mut d, session("d", 1, 500), put(b"d", b"1"));
    let s = d.sm().sessions_summary();
    assert_eq!((s.count, s.oldest_active_ms), (3, Some(300)));
    assert!(!has_session(&mut d, "b", 1));
    assert!(has_session(&mut d, "a", 2));
    assert!(has_session(&mut d, "c", 1));
    assert!(has_session(&mut d, "d", 1));
    // Several new sessions in one batch: each evicts the oldest as it arrives.
    d.batch(&[
        (session("e", 1, 600), put(b"e", b"1")),
        (session("f", 1, 600), put(b"f", b"1")),
        // A retry in the same batch of a session the batch just evicted is unknown now.
        (session("c", 1, 600), put(b"c", b"again")),
    ]);
    // e evicted c, f evicted a; c re-applied as a new session at 1 (the price of its
    // eviction), evicting d.
    assert_eq!(d.record(b"c").unwrap().version, 2);
    assert_eq!(d.sm().sessions_summary().count, 3);
    assert!(!has_session(&mut d, "a", 2));
    assert!(!has_session(&mut d, "d", 1));
    for c in ["e", "f", "c"] {
        assert!(has_session(&mut d, c, 1), "{c}");
    }
    // A known session writing again never evicts anyone.
    sessioned(&mut d, session("e", 2, 700), put(b"e", b"2"));
    assert_eq!(d.sm().sessions_summary().count, 3);
    assert!(has_session(&mut d, "f", 1));
}

#[test]
fn expiry_trims_the_table_to_its_bound_oldest_first() {
    let mut d = Driver::new();
    let writes: Vec<_> = (0..5u64)
        .map(|i| (session(&format!("c{i}"), 1, 1_000 + i), put(b"k", b"v")))
        .collect();
    d.batch(&writes);
    let r = d.one(expire(2_000, 1_000_000, 2));
    assert_eq!(r.outcome, CommandOutcome::SessionsExpired { expired: 3 });
    let s = d.sm().sessions_summary();
    assert_eq!((s.count, s.oldest_active_ms), (2, Some(1_003)));
    assert_eq!(s.params.sessions_max, 2);
    for (c, kept) in [("c0", false), ("c2", false), ("c3", true), ("c4", true)] {
        assert_eq!(has_session(&mut d, c, 1), kept, "{c}");
    }
    // TTL and bound together: the TTL first (c3 idle ≥ 1,000), then the bound (none left
    // over it).
    sessioned(&mut d, session("c4", 2, 2_500), put(b"k", b"v"));
    let r = d.one(expire(3_000, 1_000, 1));
    assert_eq!(r.outcome, CommandOutcome::SessionsExpired { expired: 1 });
    assert!(has_session(&mut d, "c4", 2));
    // A zero bound or TTL in a committed entry is taken as 1 (validation refuses it before
    // proposing; apply must not fail on it).
    let r = d.one(expire(3_000, 0, 0));
    assert_eq!(r.outcome, CommandOutcome::SessionsExpired { expired: 1 });
    let s = d.sm().sessions_summary();
    assert_eq!((s.params.ttl_ms, s.params.sessions_max, s.count), (1, 1, 0));
}

#[test]
fn parameters_and_sessions_persist_across_reopen() {
    let mut d = Driver::new();
    let s = d.sm().sessions_summary();
    assert_eq!(
        (s.count, s.oldest_active_ms, s.params),
        (0, None, SessionParams::default())
    );
    assert_eq!(
        SessionParams::default(),
        SessionParams {
            clock_ms: 0,
            ttl_ms: SESSION_TTL_MS_DEFAULT,
            sessions_max: SESSIONS_MAX_DEFAULT
        }
    );
    d.one(expire(7_000, 1_234, 2));
    let writes = [
        (session("x", 1, 7_100), put(b"x", b"1")),
        (session("y", 1, 7_200), put(b"y", b"1")),
    ];
    let originals = d.batch(&writes);
    let before = d.sm().sessions_summary();
    assert_eq!(
        before,
        SessionsSummary {
            count: 2,
            oldest_active_ms: Some(7_100),
            params: SessionParams {
                clock_ms: 7_200,
                ttl_ms: 1_234,
                sessions_max: 2
            }
        }
    );
    d.reopen();
    assert_eq!(d.sm().sessions_summary(), before);
    assert_eq!(
        sessioned(&mut d, session("x", 1, 0), put(b"x", b"1")),
        duplicate_of(&originals[0])
    );
    // The bound of 2 still holds after the reopen: a third session evicts x (the oldest).
    sessioned(&mut d, session("z", 1, 7_300), put(b"z", b"1"));
    assert!(!has_session(&mut d, "x", 1));
    // So does the TTL: y (active at 7.2 s) is idle 1,234 ms at 8,434 ms.
    d.reopen();
    let r = d.one(expire(8_434, 1_234, 2));
    assert_eq!(r.outcome, CommandOutcome::SessionsExpired { expired: 1 });
    assert!(!has_session(&mut d, "y", 1));
    assert!(has_session(&mut d, "z", 1));
}

/// Sessions, their parameters and key revisions are part of the state a snapshot carries:
/// a node that installs one answers a retry exactly as the node that took it would.
#[test]
fn sessions_and_revisions_travel_through_a_snapshot() {
    let mut d = Driver::new();
    d.one(expire(5_000, 60_000, 10));
    let originals = d.batch(&[
        (session("w", 1, 5_100), put(b"k", b"1")),
        (session("w", 2, 5_200), put(b"k", b"2")),
        (
            session("t", 1, 5_300),
            txn(vec![], vec![op_put(b"j", b"1"), op_get(b"k")], vec![]),
        ),
    ]);
    d.one(put(b"plain", b"p"));
    let summary = d.sm().sessions_summary();
    let records = d.all_records();

    let sim = SimFs::new();
    let store = SnapshotStore::open(
        Arc::new(sim),
        Path::new("/data"),
        SnapshotOptions {
            keep: 2,
            chunk_target_bytes: 256,
        },
    )
    .unwrap();
    let created = store.create(d.sm()).unwrap();
    assert_eq!(created.meta.index, 5);
    // Three data keys, two session records and the parameters; four history records of the
    // puts and the history's compact revision.
    assert_eq!(created.header.key_count, 3 + 2 + 1 + 4 + 1);

    let dst_dir = tempfile::tempdir().unwrap();
    let dst = reopen_at(dst_dir.path());
    dst.apply(&[entry(1, None, &put(b"stale", b"x"))]).unwrap();
    store.install(&created.file, &dst).unwrap();
    let mut installed = Driver {
        dir: dst_dir,
        sm: Some(dst),
        next: 6,
    };
    assert_eq!(installed.all_records(), records);
    assert_eq!(installed.sm().sessions_summary(), summary);
    // The retry a client sends to the new node answers the original result.
    assert_eq!(
        sessioned(&mut installed, session("w", 2, 6_000), put(b"k", b"2")),
        duplicate_of(&originals[1])
    );
    assert_eq!(
        sessioned(&mut installed, session("t", 1, 6_000), put(b"k", b"2")),
        duplicate_of(&originals[2])
    );
    assert_eq!(
        sessioned(&mut installed, session("w", 1, 6_000), put(b"k", b"1")).outcome,
        CommandOutcome::Refused(Refusal::SessionStale {
            seq: 1,
            last_seq: 2
        })
    );
    assert_eq!(installed.record(b"k"), Some(rec(b"k", b"2", 2, 3, 2)));
    // The revisions continue: the next write of k is version 3 at the new index.
    let r = sessioned(&mut installed, session("w", 3, 6_000), put(b"k", b"3"));
    assert_eq!(r, fresh(9, put_outcome(2, 3)));
    // And the installed table survives a reopen of the new node.
    installed.reopen();
    assert_eq!(
        sessioned(&mut installed, session("w", 3, 6_000), put(b"k", b"3")),
        duplicate_of(&r)
    );
    assert_eq!(installed.sm().sessions_summary().params.ttl_ms, 60_000);
}

/// A snapshot view shows the session table (records and parameters) as of its index while
/// sessioned writes, evictions and expiry go on: they are state keys like any other, saved
/// copy-on-write.
#[test]
fn a_snapshot_view_shows_the_session_table_at_its_index() {
    let mut d = Driver::new();
    d.one(expire(1_000, 10_000, 3)); // 1
    let originals = d.batch(&[
        (session("a", 1, 1_100), put(b"a", b"1")), // 2
        (session("b", 1, 1_200), put(b"b", b"1")), // 3
    ]);
    let summary = d.sm().sessions_summary();
    let records = d.all_records();
    let sm = d.sm();
    let view = sm.begin_snapshot().unwrap();
    let meta = view.meta().clone();
    assert_eq!(meta.index, 3);
    let e = |index, s: Option<Session>, cmd: Command| entry(index, s.as_ref(), &cmd);
    sm.apply(&[
        e(4, session("a", 2, 1_300), put(b"a", b"2")),
        e(5, session("c", 1, 1_400), put(b"c", b"1")),
        e(6, session("d", 1, 1_500), put(b"d", b"1")), // evicts b
    ])
    .unwrap();
    let mut pairs = Vec::new();
    let mut walk = view.pairs();
    pairs.push(walk.next().unwrap().unwrap());
    sm.apply(&[
        e(7, None, expire(50_000, 1_000, 2)), // expires a, c, d
        e(8, session("e", 1, 50_001), put(b"a", b"gone")),
    ])
    .unwrap();
    pairs.extend(walk.map(Result::unwrap));
    drop(view);
    assert_eq!(sm.sessions_summary().count, 1);

    let dst_dir = tempfile::tempdir().unwrap();
    let dst = reopen_at(dst_dir.path());
    let mut builder = dst.begin_install().unwrap();
    for (k, v) in &pairs {
        builder.insert(k, v).unwrap();
    }
    builder.finish(&meta).unwrap();
    let mut installed = Driver {
        dir: dst_dir,
        sm: Some(dst),
        next: 4,
    };
    assert_eq!(installed.sm().sessions_summary(), summary);
    assert_eq!(installed.all_records(), records);
    assert_eq!(
        sessioned(&mut installed, session("b", 1, 0), put(b"b", b"1")),
        duplicate_of(&originals[1])
    );
    assert_eq!(last_seq(&mut installed, "a"), Some(1));
}

/// A batch that fails midway applies nothing, and the in-memory session index (which
/// decides expiry and eviction) is rebuilt to match what sled still holds.
#[test]
fn a_batch_that_fails_midway_leaves_the_session_table_as_it_was() {
    let mut d = Driver::new();
    let originals = d.batch(&[
        (session("a", 1, 100), put(b"a", b"1")),
        (session("b", 1, 200), put(b"b", b"1")),
    ]);
    let before = d.sm().sessions_summary();
    // A damaged record: a put of `bad` fails with a typed error when it reads it.
    d.sm()
        .read_current()
        .tree
        .insert(exec::data_key(b"bad"), &b"short"[..])
        .unwrap();
    let e = |index, s: Option<Session>, cmd: Command| entry(index, s.as_ref(), &cmd);
    let err = d
        .sm()
        .apply(&[
            e(3, session("c", 1, 300), put(b"c", b"1")),
            e(4, None, expire(10_000, 1, 1)),
            e(5, session("a", 2, 10_001), put(b"a", b"2")),
            e(6, None, put(b"bad", b"x")),
        ])
        .unwrap_err();
    assert!(matches!(err, SmError::Record(_)), "{err}");
    assert_eq!(d.sm().applied_index(), 2);
    assert_eq!(d.sm().sessions_summary(), before);
    assert_eq!(d.record(b"c"), None);
    assert_eq!(d.record(b"a").unwrap().value, b"1");
    d.sm()
        .read_current()
        .tree
        .remove(exec::data_key(b"bad"))
        .unwrap();
    // The table answers as before the failed batch: a's and b's writes are still retries,
    // c is new. The index agrees with sled on the order too: a fourth session under a bound
    // of 3 evicts a, the oldest.
    assert_eq!(
        sessioned(&mut d, session("a", 1, 0), put(b"a", b"1")),
        duplicate_of(&originals[0])
    );
    assert_eq!(
        sessioned(&mut d, session("c", 1, 300), put(b"c", b"1")).outcome,
        put_outcome(4, 1)
    );
    d.one(expire(400, 1_000_000, 3));
    sessioned(&mut d, session("d", 1, 500), put(b"d", b"1"));
    assert_eq!(last_seq(&mut d, "a"), None);
    assert_eq!(last_seq(&mut d, "b"), Some(1));
}

#[test]
fn a_result_too_large_to_keep_is_answered_once_and_its_retry_learns_only_the_revision() {
    let mut d = Driver::new();
    let big = vec![b'x'; sessions::SESSION_RECORD_BYTES_MAX + 1];
    d.one(put(b"big", &big)); // 1
    let t = txn(vec![], vec![op_get(b"big")], vec![]);
    let original = sessioned(&mut d, session("reader", 1, 10), t.clone());
    assert_eq!(original.revision, 2);
    assert!(matches!(
        &original.outcome,
        CommandOutcome::Txn { results, .. } if matches!(&results[0], OpResult::Get(Some(r)) if r.value == big)
    ));
    let retry = sessioned(&mut d, session("reader", 1, 20), t);
    assert_eq!((retry.revision, retry.duplicate), (2, true));
    assert!(
        matches!(
            retry.outcome,
            CommandOutcome::Refused(Refusal::ResultNotKept { result_bytes, bytes_max })
                if result_bytes > bytes_max && bytes_max == sessions::SESSION_RECORD_BYTES_MAX as u64
        ),
        "{:?}",
        retry.outcome
    );
    // A small result is still answered in full.
    let small = sessioned(
        &mut d,
        session("reader", 2, 30),
        txn(vec![], vec![op_get(b"none")], vec![]),
    );
    let again = sessioned(
        &mut d,
        session("reader", 2, 40),
        txn(vec![], vec![op_get(b"none")], vec![]),
    );
    assert_eq!(again, duplicate_of(&small));
}
