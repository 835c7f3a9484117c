//! Revisions, conditional writes, transactions and prefix deletes, applied through
//! [`StateMachine::apply`] as the node applies committed entries.
//!
//! The targeted tests pin one rule each (see `crate::txn` and `sm::exec` for the rules); the
//! last test replays seeded random histories — plain writes, prefix deletes, transactions,
//! sessioned writes and session expiry, cut into random apply batches, with reopens — against
//! a small in-memory model and compares every outcome and the whole state.

use super::tests::Rng;
use super::*;
use crate::command::{
    Command, CommandOutcome, KeyRecord, OpResult, Refusal, Session, DELETE_PREFIX_KEYS_MAX,
    TXN_RESULT_BYTES_MAX,
};
use crate::txn::{Compare, CompareOp, Target, Txn, TxnOp};
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// A `Normal` entry carrying `cmd`, within `session` if given.
pub(super) fn entry(index: u64, session: Option<&Session>, cmd: &Command) -> Entry {
    Entry {
        index,
        term: 1,
        kind: EntryKind::Normal,
        payload: cmd.encode_with(session).unwrap().into(),
    }
}

/// A state machine in a temp dir and the index of the next entry to apply.
pub(super) struct Driver {
    pub(super) dir: tempfile::TempDir,
    pub(super) sm: Option<StateMachine>,
    pub(super) next: u64,
}

impl Driver {
    pub(super) fn new() -> Driver {
        let dir = tempfile::tempdir().unwrap();
        let sm = reopen_at(dir.path());
        Driver {
            dir,
            sm: Some(sm),
            next: 1,
        }
    }

    pub(super) fn sm(&self) -> &StateMachine {
        self.sm.as_ref().expect("the state machine is open")
    }

    /// Applies `cmds` (each with its optional session) as one batch; their results in order.
    pub(super) fn batch(&mut self, cmds: &[(Option<Session>, Command)]) -> Vec<CommandResult> {
        let entries: Vec<Entry> = cmds
            .iter()
            .enumerate()
            .map(|(i, (s, c))| entry(self.next + i as u64, s.as_ref(), c))
            .collect();
        let out = self.sm().apply(&entries).unwrap();
        assert_eq!(out.len(), cmds.len());
        self.next += cmds.len() as u64;
        out.into_iter().map(command_result).collect()
    }

    /// Applies plain commands as one batch.
    pub(super) fn plain(&mut self, cmds: &[Command]) -> Vec<CommandResult> {
        let with: Vec<_> = cmds.iter().map(|c| (None, c.clone())).collect();
        self.batch(&with)
    }

    /// Applies one plain command alone.
    pub(super) fn one(&mut self, cmd: Command) -> CommandResult {
        self.plain(&[cmd]).pop().unwrap()
    }

    /// Drops the state machine (after a flush) and opens it again.
    pub(super) fn reopen(&mut self) {
        if let Some(sm) = self.sm.take() {
            sm.flush().unwrap();
        }
        self.sm = Some(reopen_at(self.dir.path()));
    }

    /// `key`'s record, if present.
    pub(super) fn record(&self, key: &[u8]) -> Option<KeyRecord> {
        self.sm().get_record(key).unwrap().value
    }

    /// Every user key's record, in key order.
    pub(super) fn all_records(&self) -> Vec<KeyRecord> {
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let lower = match &after {
                Some(k) => Bound::Excluded(k.as_slice()),
                None => Bound::Unbounded,
            };
            let (records, more) = self
                .sm()
                .scan_records(lower, Bound::Unbounded, usize::MAX, usize::MAX)
                .unwrap()
                .value;
            after = records.last().map(|r| r.key.clone());
            out.extend(records);
            if !more {
                return out;
            }
        }
    }

    /// How many user keys start with `prefix` (paging through scans).
    pub(super) fn count_prefix(&self, prefix: &[u8]) -> usize {
        let mut n = 0;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .sm()
                .scan_prefix_page(prefix, after.as_deref(), usize::MAX, usize::MAX)
                .unwrap()
                .value;
            n += page.pairs.len();
            after = page.pairs.last().map(|(k, _)| k.clone());
            if !page.more {
                return n;
            }
        }
    }
}

pub(super) fn reopen_at(dir: &Path) -> StateMachine {
    crate::test_util::retry_sled_lock(|| StateMachine::open(dir, StateMachineOptions::default()))
        .unwrap()
}

pub(super) fn command_result(applied: AppliedEntry) -> CommandResult {
    match applied.outcome {
        EntryOutcome::Command(r) => r,
        other => panic!("entry {} is not a command: {other:?}", applied.index),
    }
}

pub(super) fn put(key: &[u8], value: &[u8]) -> Command {
    Command::Put {
        key: key.to_vec(),
        value: value.to_vec(),
    }
}

pub(super) fn del(key: &[u8]) -> Command {
    Command::Delete { key: key.to_vec() }
}

pub(super) fn del_prefix(prefix: &[u8]) -> Command {
    Command::DeletePrefix {
        prefix: prefix.to_vec(),
    }
}

pub(super) fn txn(compares: Vec<Compare>, success: Vec<TxnOp>, failure: Vec<TxnOp>) -> Command {
    Command::Txn(Txn {
        compares,
        success,
        failure,
    })
}

pub(super) fn cmp(key: &[u8], op: CompareOp, target: Target) -> Compare {
    Compare {
        key: key.to_vec(),
        op,
        target,
    }
}

pub(super) fn op_put(key: &[u8], value: &[u8]) -> TxnOp {
    TxnOp::Put {
        key: key.to_vec(),
        value: value.to_vec(),
        lease: 0,
    }
}

pub(super) fn op_del(key: &[u8]) -> TxnOp {
    TxnOp::Delete { key: key.to_vec() }
}

pub(super) fn op_del_prefix(prefix: &[u8]) -> TxnOp {
    TxnOp::DeletePrefix {
        prefix: prefix.to_vec(),
    }
}

pub(super) fn op_get(key: &[u8]) -> TxnOp {
    TxnOp::Get { key: key.to_vec() }
}

pub(super) fn rec(key: &[u8], value: &[u8], create: u64, modr: u64, version: u64) -> KeyRecord {
    KeyRecord {
        key: key.to_vec(),
        value: value.to_vec(),
        create_revision: create,
        mod_revision: modr,
        version,
        lease: 0,
    }
}

fn plain_result(revision: u64, outcome: CommandOutcome) -> CommandResult {
    CommandResult {
        revision,
        outcome,
        duplicate: false,
    }
}

fn txn_outcome(succeeded: bool, results: Vec<OpResult>) -> CommandOutcome {
    CommandOutcome::Txn { succeeded, results }
}

/// Whether a one-compare transaction on `key` takes its success branch.
fn holds(d: &mut Driver, key: &[u8], op: CompareOp, target: Target) -> bool {
    let r = d.one(txn(vec![cmp(key, op, target)], vec![], vec![]));
    match r.outcome {
        CommandOutcome::Txn { succeeded, results } => {
            assert!(results.is_empty());
            succeeded
        }
        other => panic!("a transaction answered {other:?}"),
    }
}

#[test]
fn revisions_follow_puts_deletes_and_recreation_and_survive_reopen() {
    let mut d = Driver::new();
    let put_outcome = |create_revision, version| CommandOutcome::Put {
        create_revision,
        version,
    };
    assert_eq!(d.one(put(b"a", b"1")), plain_result(1, put_outcome(1, 1)));
    assert_eq!(d.record(b"a"), Some(rec(b"a", b"1", 1, 1, 1)));
    assert_eq!(d.one(put(b"b", b"x")), plain_result(2, put_outcome(2, 1)));
    // A re-put keeps create_revision, moves mod_revision, counts the version.
    assert_eq!(d.one(put(b"a", b"2")), plain_result(3, put_outcome(1, 2)));
    assert_eq!(d.one(put(b"a", b"2")), plain_result(4, put_outcome(1, 3)));
    assert_eq!(d.record(b"a"), Some(rec(b"a", b"2", 1, 4, 3)));
    // Other keys are untouched by a's writes.
    assert_eq!(d.record(b"b"), Some(rec(b"b", b"x", 2, 2, 1)));
    assert_eq!(
        d.one(del(b"a")),
        plain_result(5, CommandOutcome::Delete { existed: true })
    );
    assert_eq!(d.record(b"a"), None);
    // Re-created: a new life, revisions start again at the creating entry.
    assert_eq!(d.one(put(b"a", b"3")), plain_result(6, put_outcome(6, 1)));
    assert_eq!(d.record(b"a"), Some(rec(b"a", b"3", 6, 6, 1)));
    let before = d.all_records();
    assert_eq!(
        before,
        vec![rec(b"a", b"3", 6, 6, 1), rec(b"b", b"x", 2, 2, 1)]
    );
    // Reads say the revision they were served at.
    assert_eq!(d.sm().get_record(b"b").unwrap().applied_index, 6);
    d.reopen();
    assert_eq!(d.all_records(), before);
    assert_eq!(d.sm().applied_index(), 6);
    // The history continues where it stopped.
    assert_eq!(d.one(put(b"a", b"4")), plain_result(7, put_outcome(6, 2)));
    let (page, more) = d
        .sm()
        .scan_prefix_records(b"a", None, 10, usize::MAX)
        .unwrap()
        .value;
    assert_eq!((page, more), (vec![rec(b"a", b"4", 6, 7, 2)], false));
}

#[test]
fn an_absent_key_has_zero_revisions_and_no_value_to_compare() {
    let mut d = Driver::new();
    d.one(put(b"other", b"v"));
    for target in [
        Target::ModRevision(0),
        Target::CreateRevision(0),
        Target::Version(0),
    ] {
        assert!(holds(&mut d, b"k", CompareOp::Equal, target.clone()));
        assert!(!holds(&mut d, b"k", CompareOp::Greater, target.clone()));
        assert!(!holds(&mut d, b"k", CompareOp::NotEqual, target));
    }
    assert!(holds(&mut d, b"k", CompareOp::Less, Target::ModRevision(1)));
    // A value compare on an absent key is false whatever the operator and operand.
    for op in [
        CompareOp::Equal,
        CompareOp::NotEqual,
        CompareOp::Less,
        CompareOp::Greater,
    ] {
        for given in [&b""[..], b"v", b"\xff\xff"] {
            assert!(
                !holds(&mut d, b"k", op, Target::Value(given.to_vec())),
                "{op:?} {given:?}"
            );
        }
    }
    // mod_revision == 0 as "create only if absent".
    let create = |value: &[u8]| {
        txn(
            vec![cmp(b"k", CompareOp::Equal, Target::ModRevision(0))],
            vec![op_put(b"k", value)],
            vec![op_get(b"k")],
        )
    };
    let first = d.one(create(b"first"));
    let rev = first.revision;
    assert_eq!(
        first.outcome,
        txn_outcome(
            true,
            vec![OpResult::Put {
                create_revision: rev,
                version: 1
            }]
        )
    );
    let second = d.one(create(b"second"));
    assert_eq!(
        second.outcome,
        txn_outcome(
            false,
            vec![OpResult::Get(Some(rec(b"k", b"first", rev, rev, 1)))]
        )
    );
    assert_eq!(d.record(b"k").unwrap().value, b"first");
    // An empty value is a value: it compares, unlike an absent key.
    d.one(put(b"empty", b""));
    assert!(holds(
        &mut d,
        b"empty",
        CompareOp::Equal,
        Target::Value(Vec::new())
    ));
    assert!(holds(
        &mut d,
        b"empty",
        CompareOp::Less,
        Target::Value(b"a".to_vec())
    ));
}

#[test]
fn less_and_greater_order_integers_numerically_and_values_bytewise() {
    let mut d = Driver::new();
    // Revisions into two digits, so a textual compare would get them wrong.
    for i in 0..11u64 {
        d.one(put(b"filler", &i.to_be_bytes()));
    }
    for _ in 0..3 {
        d.one(put(b"k", b"9"));
    }
    let r = d.record(b"k").unwrap();
    assert_eq!((r.create_revision, r.mod_revision, r.version), (12, 14, 3));
    let cases: [(CompareOp, Target, bool); 14] = [
        (CompareOp::Less, Target::Version(10), true),
        (CompareOp::Greater, Target::Version(2), true),
        (CompareOp::Greater, Target::Version(3), false),
        (CompareOp::Less, Target::Version(3), false),
        (CompareOp::Equal, Target::Version(3), true),
        (CompareOp::NotEqual, Target::Version(3), false),
        (CompareOp::Greater, Target::CreateRevision(9), true),
        (CompareOp::Less, Target::CreateRevision(13), true),
        (CompareOp::Equal, Target::ModRevision(14), true),
        (CompareOp::Less, Target::ModRevision(100), true),
        // Bytewise: "9" > "10" and "9" < "90"; a prefix sorts first.
        (CompareOp::Greater, Target::Value(b"10".to_vec()), true),
        (CompareOp::Less, Target::Value(b"90".to_vec()), true),
        (CompareOp::Greater, Target::Value(b"9".to_vec()), false),
        (CompareOp::NotEqual, Target::Value(b"9\0".to_vec()), true),
    ];
    for (op, target, want) in cases {
        assert_eq!(
            holds(&mut d, b"k", op, target.clone()),
            want,
            "{op:?} {target:?}"
        );
    }
    // Bytes above 0x7f are not signed.
    d.one(put(b"hi", b"\x80"));
    assert!(holds(
        &mut d,
        b"hi",
        CompareOp::Greater,
        Target::Value(b"\x7f\xff".to_vec())
    ));
    // Every compare must hold: one false one sends the failure branch.
    let mixed = d.one(txn(
        vec![
            cmp(b"k", CompareOp::Equal, Target::Version(3)),
            cmp(b"k", CompareOp::Equal, Target::Value(b"8".to_vec())),
        ],
        vec![op_put(b"won", b"1")],
        vec![op_put(b"lost", b"1")],
    ));
    assert_eq!(
        mixed.outcome,
        txn_outcome(
            false,
            vec![OpResult::Put {
                create_revision: mixed.revision,
                version: 1
            }]
        )
    );
    assert!(d.record(b"won").is_none() && d.record(b"lost").is_some());
    // No compares at all: the success branch.
    let bare = d.one(txn(vec![], vec![op_get(b"won")], vec![op_get(b"lost")]));
    assert_eq!(bare.outcome, txn_outcome(true, vec![OpResult::Get(None)]));
}

#[test]
fn ops_run_in_order_and_each_sees_the_ones_before_it() {
    let mut d = Driver::new();
    d.one(put(b"k", b"old")); // 1
    d.one(put(b"k", b"old2")); // 2
    let r = d.one(txn(
        vec![cmp(b"k", CompareOp::Equal, Target::Value(b"old2".to_vec()))],
        vec![
            op_get(b"k"),
            op_put(b"k", b"new"),
            op_get(b"k"),
            op_del(b"k"),
            op_get(b"k"),
            op_del(b"k"),
            op_put(b"k", b"reborn"),
            op_get(b"k"),
            op_put(b"other", b"o"),
            op_get(b"other"),
        ],
        vec![],
    ));
    assert_eq!(r.revision, 3);
    assert_eq!(
        r.outcome,
        txn_outcome(
            true,
            vec![
                OpResult::Get(Some(rec(b"k", b"old2", 1, 2, 2))),
                OpResult::Put {
                    create_revision: 1,
                    version: 3
                },
                OpResult::Get(Some(rec(b"k", b"new", 1, 3, 3))),
                OpResult::Delete { existed: true },
                OpResult::Get(None),
                OpResult::Delete { existed: false },
                // Deleted and put again in one transaction: a new key, created here.
                OpResult::Put {
                    create_revision: 3,
                    version: 1
                },
                OpResult::Get(Some(rec(b"k", b"reborn", 3, 3, 1))),
                OpResult::Put {
                    create_revision: 3,
                    version: 1
                },
                OpResult::Get(Some(rec(b"other", b"o", 3, 3, 1))),
            ]
        )
    );
    assert_eq!(d.record(b"k"), Some(rec(b"k", b"reborn", 3, 3, 1)));
    assert_eq!(d.record(b"other"), Some(rec(b"other", b"o", 3, 3, 1)));
    // The compares see the state before the transaction, not its own writes.
    let r = d.one(txn(
        vec![cmp(
            b"k",
            CompareOp::Equal,
            Target::Value(b"reborn".to_vec()),
        )],
        vec![op_put(b"k", b"changed")],
        vec![],
    ));
    assert!(matches!(
        r.outcome,
        CommandOutcome::Txn {
            succeeded: true,
            ..
        }
    ));
}

#[test]
fn two_puts_of_one_key_in_one_txn_count_two_versions_at_one_revision() {
    let mut d = Driver::new();
    let r = d.one(txn(
        vec![],
        vec![op_put(b"k", b"first"), op_put(b"k", b"second")],
        vec![],
    ));
    assert_eq!(
        r.outcome,
        txn_outcome(
            true,
            vec![
                OpResult::Put {
                    create_revision: 1,
                    version: 1
                },
                OpResult::Put {
                    create_revision: 1,
                    version: 2
                }
            ]
        )
    );
    assert_eq!(d.record(b"k"), Some(rec(b"k", b"second", 1, 1, 2)));
    let r = d.one(txn(
        vec![],
        vec![op_put(b"k", b"third"), op_put(b"k", b"fourth")],
        vec![],
    ));
    assert_eq!(
        r.outcome,
        txn_outcome(
            true,
            vec![
                OpResult::Put {
                    create_revision: 1,
                    version: 3
                },
                OpResult::Put {
                    create_revision: 1,
                    version: 4
                }
            ]
        )
    );
    assert_eq!(d.record(b"k"), Some(rec(b"k", b"fourth", 1, 2, 4)));
}

#[test]
fn the_failure_branch_runs_when_a_compare_fails() {
    let mut d = Driver::new();
    d.one(put(b"lock", b"alice")); // 1
    d.one(put(b"gone", b"x")); // 2
    let r = d.one(txn(
        vec![cmp(b"lock", CompareOp::Equal, Target::ModRevision(0))],
        vec![op_put(b"lock", b"bob"), op_del(b"gone")],
        vec![
            op_get(b"lock"),
            op_put(b"waiters/bob", b"1"),
            op_del(b"gone"),
            op_get(b"gone"),
        ],
    ));
    assert_eq!(
        r,
        plain_result(
            3,
            txn_outcome(
                false,
                vec![
                    OpResult::Get(Some(rec(b"lock", b"alice", 1, 1, 1))),
                    OpResult::Put {
                        create_revision: 3,
                        version: 1
                    },
                    OpResult::Delete { existed: true },
                    OpResult::Get(None),
                ]
            )
        )
    );
    assert_eq!(d.record(b"lock").unwrap().value, b"alice");
    assert_eq!(
        d.record(b"waiters/bob"),
        Some(rec(b"waiters/bob", b"1", 3, 3, 1))
    );
    assert_eq!(d.record(b"gone"), None);
    // An empty failure branch: nothing happens, and the entry still takes its revision.
    let r = d.one(txn(
        vec![cmp(
            b"lock",
            CompareOp::Equal,
            Target::Value(b"carol".to_vec()),
        )],
        vec![op_put(b"lock", b"carol")],
        vec![],
    ));
    assert_eq!(r, plain_result(4, txn_outcome(false, vec![])));
    assert_eq!(d.record(b"lock").unwrap().mod_revision, 1);
    assert_eq!(d.sm().applied_index(), 4);
}

#[test]
fn delete_prefix_removes_exactly_the_keys_under_the_prefix() {
    let mut d = Driver::new();
    let keys: [&[u8]; 9] = [
        b"p",
        b"p/",
        b"p/a",
        b"p/b/c",
        b"p0",
        b"pa",
        b"q",
        b"\xff\x01",
        b"\xff\xff",
    ];
    d.plain(&keys.iter().map(|k| put(k, k)).collect::<Vec<_>>());
    let r = d.one(del_prefix(b"p/"));
    assert_eq!(r.outcome, CommandOutcome::DeletePrefix { deleted: 3 });
    let left: Vec<_> = d.all_records().into_iter().map(|r| r.key).collect();
    let want: Vec<Vec<u8>> = [&b"p"[..], b"p0", b"pa", b"q", b"\xff\x01", b"\xff\xff"]
        .iter()
        .map(|k| k.to_vec())
        .collect();
    assert_eq!(left, want);
    // Nothing under the prefix: zero, and nothing else changes.
    assert_eq!(
        d.one(del_prefix(b"p/")).outcome,
        CommandOutcome::DeletePrefix { deleted: 0 }
    );
    // A prefix of 0xff bytes (no upper bound key) still stops at its own keys.
    assert_eq!(
        d.one(del_prefix(b"\xff")).outcome,
        CommandOutcome::DeletePrefix { deleted: 2 }
    );
    assert_eq!(
        d.one(del_prefix(b"p")).outcome,
        CommandOutcome::DeletePrefix { deleted: 3 }
    );
    let left: Vec<_> = d.all_records().into_iter().map(|r| r.key).collect();
    assert_eq!(left, vec![b"q".to_vec()]);
    // Inside a transaction, with a get after it.
    d.plain(&[put(b"t/1", b"1"), put(b"t/2", b"2")]);
    let r = d.one(txn(
        vec![cmp(b"t/1", CompareOp::Equal, Target::Version(1))],
        vec![op_del_prefix(b"t/"), op_get(b"t/1"), op_put(b"t/3", b"3")],
        vec![],
    ));
    assert_eq!(
        r.outcome,
        txn_outcome(
            true,
            vec![
                OpResult::DeletePrefix { deleted: 2 },
                OpResult::Get(None),
                OpResult::Put {
                    create_revision: r.revision,
                    version: 1
                },
            ]
        )
    );
    assert_eq!(d.count_prefix(b"t/"), 1);
}

/// A prefix delete counts and removes what the earlier entries of its own apply batch (and
/// the earlier operations of its own transaction) left, not just what sled holds.
#[test]
fn delete_prefix_sees_writes_and_deletes_earlier_in_the_same_batch() {
    let mut d = Driver::new();
    d.plain(&[put(b"p/1", b"x"), put(b"p/2", b"x"), put(b"z", b"after")]);
    let r = d.plain(&[
        put(b"p/3", b"new"),
        del(b"p/1"),
        put(b"p/4", b"new"),
        del(b"p/4"),
        put(b"zz", b"beyond the prefix, in the overlay"),
        del_prefix(b"p/"),
    ]);
    // p/2 (in sled) and p/3 (written in the batch); not p/1 nor p/4 (deleted in it).
    assert_eq!(r[5].outcome, CommandOutcome::DeletePrefix { deleted: 2 });
    assert_eq!(d.count_prefix(b"p/"), 0);
    assert_eq!(d.count_prefix(b"z"), 2);

    // Inside a transaction: keys from the batch, keys from the transaction's own stage, and
    // keys the transaction deleted before the prefix delete.
    d.plain(&[put(b"p/a", b"x"), put(b"p/b", b"x")]);
    let r = d.plain(&[
        put(b"p/c", b"batch"),
        put(b"q", b"a key past the prefix written earlier in the batch"),
        txn(
            vec![],
            vec![
                op_put(b"p/d", b"stage"),
                op_del(b"p/a"),
                op_put(b"p/e", b"stage"),
                op_del_prefix(b"p/"),
                op_get(b"p/d"),
            ],
            vec![],
        ),
    ]);
    assert_eq!(
        r[2].outcome,
        txn_outcome(
            true,
            vec![
                OpResult::Put {
                    create_revision: r[2].revision,
                    version: 1
                },
                OpResult::Delete { existed: true },
                OpResult::Put {
                    create_revision: r[2].revision,
                    version: 1
                },
                // p/b (sled), p/c (batch), p/d and p/e (stage); p/a was deleted before.
                OpResult::DeletePrefix { deleted: 4 },
                OpResult::Get(None),
            ]
        )
    );
    assert_eq!(d.count_prefix(b"p/"), 0, "{:?}", d.all_records());
    assert!(d.record(b"q").is_some());

    // The same after a reopen, and with the batch's overlay holding only keys past it.
    d.reopen();
    let r = d.plain(&[
        put(b"zzz", b"overlay key past the prefix"),
        txn(
            vec![],
            vec![op_put(b"p/x", b"1"), op_del_prefix(b"p/")],
            vec![],
        ),
    ]);
    assert_eq!(
        r[1].outcome,
        txn_outcome(
            true,
            vec![
                OpResult::Put {
                    create_revision: r[1].revision,
                    version: 1
                },
                OpResult::DeletePrefix { deleted: 1 }
            ]
        )
    );
    assert_eq!(d.record(b"p/x"), None);
}

/// Over [`DELETE_PREFIX_KEYS_MAX`] keys a prefix delete is refused whole, alone or inside a
/// transaction, counting keys written and deleted earlier in the same batch and transaction;
/// at the bound it deletes them all.
#[test]
fn delete_prefix_over_the_bound_is_refused_whole_with_nothing_changed() {
    let max = DELETE_PREFIX_KEYS_MAX;
    assert_eq!(max, 100_000);
    let mut d = Driver::new();
    let key = |i: u64| format!("big/{i:06}").into_bytes();
    const BATCH: u64 = 25_000;
    for start in (0..max).step_by(BATCH as usize) {
        let cmds: Vec<_> = (start..start + BATCH).map(|i| put(&key(i), b"v")).collect();
        d.plain(&cmds);
    }
    d.plain(&[put(b"bif", b"before"), put(b"bih", b"after")]);
    assert_eq!(d.count_prefix(b"big/"), max as usize);
    let applied = d.sm().applied_index();

    // The 100,001st key arrives in the same batch as the prefix delete.
    let r = d.plain(&[put(&key(max), b"v"), del_prefix(b"big/")]);
    assert_eq!(
        r[1],
        plain_result(
            applied + 2,
            CommandOutcome::Refused(Refusal::RangeTooLarge { keys_max: max })
        )
    );
    assert_eq!(d.sm().applied_index(), applied + 2);

    // Inside a transaction: the whole transaction is refused, its earlier put included.
    let r = d.one(txn(
        vec![],
        vec![
            op_put(b"marker", b"1"),
            op_put(&key(7), b"changed"),
            op_del_prefix(b"big/"),
            op_put(b"marker2", b"1"),
        ],
        vec![],
    ));
    assert_eq!(
        r.outcome,
        CommandOutcome::Refused(Refusal::RangeTooLarge { keys_max: max })
    );
    assert_eq!(d.record(b"marker"), None);
    assert_eq!(d.record(b"marker2"), None);
    assert_eq!(d.record(&key(7)).unwrap().version, 1);
    assert!(d.record(&key(0)).is_some() && d.record(&key(max)).is_some());

    // Exactly at the bound it deletes them all: 100,001 in sled, one more put and one delete
    // earlier in the batch, one delete earlier in the transaction.
    let r = d.plain(&[
        put(&key(max + 1), b"v"),
        del(&key(5)),
        txn(
            vec![],
            vec![op_del(&key(6)), op_del_prefix(b"big/"), op_get(&key(8))],
            vec![],
        ),
    ]);
    assert_eq!(
        r[2].outcome,
        txn_outcome(
            true,
            vec![
                OpResult::Delete { existed: true },
                OpResult::DeletePrefix { deleted: max },
                OpResult::Get(None),
            ]
        )
    );
    assert_eq!(d.count_prefix(b"big/"), 0);
    assert_eq!(d.record(b"bif").unwrap().value, b"before");
    assert_eq!(d.record(b"bih").unwrap().value, b"after");
    d.reopen();
    assert_eq!(d.count_prefix(b"bi"), 2);
}

/// A transaction whose `get` results would exceed [`TXN_RESULT_BYTES_MAX`] is refused after
/// it has already staged writes: none of them lands.
#[test]
fn a_txn_refused_midway_changes_nothing() {
    let mut d = Driver::new();
    // Limits are checked before proposing, not on apply: a 1 MiB value is enough here.
    let big = vec![0x5a; 1 << 20];
    d.plain(&[put(b"big", &big), put(b"keep", b"k"), put(b"t/1", b"x")]);
    let gets_over = (TXN_RESULT_BYTES_MAX / (big.len() as u64 + 3)) as usize + 1;
    let mut ops = vec![
        op_put(b"new", b"1"),
        op_put(b"keep", b"changed"),
        op_del(b"t/1"),
        op_del_prefix(b"t/"),
    ];
    ops.extend(std::iter::repeat_with(|| op_get(b"big")).take(gets_over));
    ops.push(op_put(b"after", b"1"));
    let r = d.one(txn(
        vec![cmp(b"keep", CompareOp::Equal, Target::Version(1))],
        ops.clone(),
        vec![],
    ));
    assert_eq!(
        r,
        plain_result(
            4,
            CommandOutcome::Refused(Refusal::ResultTooLarge {
                bytes_max: TXN_RESULT_BYTES_MAX
            })
        )
    );
    assert_eq!(d.record(b"new"), None);
    assert_eq!(d.record(b"after"), None);
    assert_eq!(d.record(b"keep"), Some(rec(b"keep", b"k", 2, 2, 1)));
    assert_eq!(d.record(b"t/1"), Some(rec(b"t/1", b"x", 3, 3, 1)));
    assert_eq!(d.sm().applied_index(), 4);
    // One get fewer fits (the bound is on the total, inclusive).
    ops.remove(4);
    let r = d.one(txn(vec![], ops, vec![]));
    let CommandOutcome::Txn { succeeded, results } = r.outcome else {
        panic!("{:?}", r.outcome);
    };
    assert!(succeeded);
    assert_eq!(results.len(), 4 + gets_over - 1 + 1);
    assert_eq!(d.record(b"keep").unwrap().value, b"changed");
}

/// Entries of one apply batch see each other: a compare-and-swap right after a put, a
/// create-if-absent right after a delete, a second CAS that lost to the first.
#[test]
fn entries_in_one_batch_see_each_other() {
    let mut d = Driver::new();
    d.one(put(b"gone", b"x")); // 1
    let cas = |key: &[u8], expect: u64, value: &[u8]| {
        txn(
            vec![cmp(key, CompareOp::Equal, Target::ModRevision(expect))],
            vec![op_put(key, value)],
            vec![op_get(key)],
        )
    };
    let r = d.plain(&[
        put(b"k", b"v2"),       // 2
        cas(b"k", 2, b"v3"),    // 3: sees the put of entry 2
        cas(b"k", 2, b"lost"),  // 4: entry 3 moved mod_revision on
        cas(b"k", 3, b"v5"),    // 5
        del(b"gone"),           // 6
        cas(b"gone", 0, b"re"), // 7: absent since entry 6
        cas(b"new", 0, b"n"),   // 8
        cas(b"new", 0, b"dup"), // 9
    ]);
    let outcomes: Vec<_> = r.iter().map(|r| r.outcome.clone()).collect();
    assert_eq!(
        outcomes,
        vec![
            CommandOutcome::Put {
                create_revision: 2,
                version: 1
            },
            txn_outcome(
                true,
                vec![OpResult::Put {
                    create_revision: 2,
                    version: 2
                }]
            ),
            txn_outcome(false, vec![OpResult::Get(Some(rec(b"k", b"v3", 2, 3, 2)))]),
            txn_outcome(
                true,
                vec![OpResult::Put {
                    create_revision: 2,
                    version: 3
                }]
            ),
            CommandOutcome::Delete { existed: true },
            txn_outcome(
                true,
                vec![OpResult::Put {
                    create_revision: 7,
                    version: 1
                }]
            ),
            txn_outcome(
                true,
                vec![OpResult::Put {
                    create_revision: 8,
                    version: 1
                }]
            ),
            txn_outcome(false, vec![OpResult::Get(Some(rec(b"new", b"n", 8, 8, 1)))]),
        ]
    );
    let revisions: Vec<_> = r.iter().map(|r| r.revision).collect();
    assert_eq!(revisions, (2..=9).collect::<Vec<_>>());
    assert_eq!(d.record(b"k"), Some(rec(b"k", b"v5", 2, 5, 3)));
    assert_eq!(d.record(b"gone"), Some(rec(b"gone", b"re", 7, 7, 1)));
    d.reopen();
    assert_eq!(d.record(b"new"), Some(rec(b"new", b"n", 8, 8, 1)));
}

// ---------------------------------------------------------------------------------------
// The model: a BTreeMap with revisions and a session table, written from the rules in the
// docs of `crate::txn`, `sm::exec` and `sm::sessions`, not from their code.

#[derive(Clone, Debug, PartialEq, Eq)]
struct ModelKey {
    value: Vec<u8>,
    create: u64,
    modr: u64,
    version: u64,
}

#[derive(Clone, Debug)]
struct ModelSession {
    seq: u64,
    revision: u64,
    active_ms: u64,
    outcome: CommandOutcome,
}

#[derive(Debug)]
struct Model {
    kv: BTreeMap<Vec<u8>, ModelKey>,
    sessions: BTreeMap<Vec<u8>, ModelSession>,
    clock_ms: u64,
    ttl_ms: u64,
    sessions_max: u64,
    /// Sessions evicted by a new session finding the table full (coverage figure).
    arrival_evictions: u64,
}

fn relation(op: CompareOp, ord: Ordering) -> bool {
    match op {
        CompareOp::Equal => ord == Ordering::Equal,
        CompareOp::NotEqual => ord != Ordering::Equal,
        CompareOp::Less => ord == Ordering::Less,
        CompareOp::Greater => ord == Ordering::Greater,
    }
}

fn model_put(
    kv: &mut BTreeMap<Vec<u8>, ModelKey>,
    rev: u64,
    key: &[u8],
    value: &[u8],
) -> (u64, u64) {
    let next = match kv.get(key) {
        Some(old) => ModelKey {
            value: value.to_vec(),
            create: old.create,
            modr: rev,
            version: old.version + 1,
        },
        None => ModelKey {
            value: value.to_vec(),
            create: rev,
            modr: rev,
            version: 1,
        },
    };
    let revisions = (next.create, next.version);
    kv.insert(key.to_vec(), next);
    revisions
}

fn model_record(kv: &BTreeMap<Vec<u8>, ModelKey>, key: &[u8]) -> Option<KeyRecord> {
    kv.get(key)
        .map(|m| rec(key, &m.value, m.create, m.modr, m.version))
}

fn model_delete_prefix(kv: &mut BTreeMap<Vec<u8>, ModelKey>, prefix: &[u8]) -> Option<u64> {
    let keys: Vec<_> = kv
        .keys()
        .filter(|k| k.starts_with(prefix))
        .cloned()
        .collect();
    if keys.len() as u64 > DELETE_PREFIX_KEYS_MAX {
        return None;
    }
    for k in &keys {
        kv.remove(k);
    }
    Some(keys.len() as u64)
}

impl Model {
    fn new() -> Model {
        let defaults = record::SessionParams::default();
        Model {
            kv: BTreeMap::new(),
            sessions: BTreeMap::new(),
            clock_ms: defaults.clock_ms,
            ttl_ms: defaults.ttl_ms,
            sessions_max: defaults.sessions_max,
            arrival_evictions: 0,
        }
    }

    fn compare_holds(&self, c: &Compare) -> bool {
        let k = self.kv.get(&c.key);
        let field = |f: fn(&ModelKey) -> u64| k.map_or(0, f);
        match &c.target {
            Target::Value(v) => k.is_some_and(|k| relation(c.op, k.value.as_slice().cmp(v))),
            Target::Version(n) => relation(c.op, field(|k| k.version).cmp(n)),
            Target::CreateRevision(n) => relation(c.op, field(|k| k.create).cmp(n)),
            Target::ModRevision(n) => relation(c.op, field(|k| k.modr).cmp(n)),
        }
    }

    fn run_txn(&mut self, rev: u64, t: &Txn) -> CommandOutcome {
        let succeeded = t.compares.iter().all(|c| self.compare_holds(c));
        let ops = if succeeded { &t.success } else { &t.failure };
        let mut stage = self.kv.clone();
        let mut results = Vec::new();
        for op in ops {
            results.push(match op {
                TxnOp::Put { key, value, .. } => {
                    let (create_revision, version) = model_put(&mut stage, rev, key, value);
                    OpResult::Put {
                        create_revision,
                        version,
                    }
                }
                TxnOp::Delete { key } => OpResult::Delete {
                    existed: stage.remove(key).is_some(),
                },
                TxnOp::DeletePrefix { prefix } => match model_delete_prefix(&mut stage, prefix) {
                    Some(deleted) => OpResult::DeletePrefix { deleted },
                    None => {
                        return CommandOutcome::Refused(Refusal::RangeTooLarge {
                            keys_max: DELETE_PREFIX_KEYS_MAX,
                        })
                    }
                },
                TxnOp::Get { key } => OpResult::Get(model_record(&stage, key)),
            });
        }
        self.kv = stage;
        CommandOutcome::Txn { succeeded, results }
    }

    fn run(&mut self, rev: u64, cmd: &Command) -> CommandOutcome {
        match cmd {
            Command::Put { key, value } => {
                let (create_revision, version) = model_put(&mut self.kv, rev, key, value);
                CommandOutcome::Put {
                    create_revision,
                    version,
                }
            }
            Command::Delete { key } => CommandOutcome::Delete {
                existed: self.kv.remove(key).is_some(),
            },
            Command::DeletePrefix { prefix } => match model_delete_prefix(&mut self.kv, prefix) {
                Some(deleted) => CommandOutcome::DeletePrefix { deleted },
                None => CommandOutcome::Refused(Refusal::RangeTooLarge {
                    keys_max: DELETE_PREFIX_KEYS_MAX,
                }),
            },
            Command::Txn(t) => self.run_txn(rev, t),
            Command::ExpireSessions { .. } => unreachable!("handled by apply"),
            Command::PutLeased { .. }
            | Command::LeaseGrant { .. }
            | Command::LeaseRevoke { .. } => {
                unreachable!("the model runs no lease commands")
            }
        }
    }

    /// The least recently active session (ties: the earlier write).
    fn oldest_session(&self) -> Option<Vec<u8>> {
        self.sessions
            .iter()
            .min_by_key(|(_, s)| (s.active_ms, s.revision))
            .map(|(c, _)| c.clone())
    }

    fn expire(&mut self, now_ms: u64, ttl_ms: u64, sessions_max: u64) -> CommandOutcome {
        self.clock_ms = self.clock_ms.max(now_ms);
        self.ttl_ms = ttl_ms.max(1);
        self.sessions_max = sessions_max.max(1);
        let before = self.sessions.len();
        let (clock, ttl) = (self.clock_ms, self.ttl_ms);
        self.sessions.retain(|_, s| clock - s.active_ms < ttl);
        while self.sessions.len() as u64 > self.sessions_max {
            let oldest = self.oldest_session().unwrap();
            self.sessions.remove(&oldest);
        }
        CommandOutcome::SessionsExpired {
            expired: (before - self.sessions.len()) as u64,
        }
    }

    fn apply(&mut self, rev: u64, session: Option<&Session>, cmd: &Command) -> CommandResult {
        let fresh = |outcome| CommandResult {
            revision: rev,
            outcome,
            duplicate: false,
        };
        if let Command::ExpireSessions {
            now_ms,
            ttl_ms,
            sessions_max,
        } = cmd
        {
            return fresh(self.expire(*now_ms, *ttl_ms, *sessions_max));
        }
        let Some(s) = session else {
            return fresh(self.run(rev, cmd));
        };
        match self.sessions.get(&s.client) {
            Some(known) if known.seq == s.seq => {
                return CommandResult {
                    revision: known.revision,
                    outcome: known.outcome.clone(),
                    duplicate: true,
                }
            }
            Some(known) if s.seq < known.seq => {
                return fresh(CommandOutcome::Refused(Refusal::SessionStale {
                    seq: s.seq,
                    last_seq: known.seq,
                }))
            }
            None if s.seq != 1 => {
                return fresh(CommandOutcome::Refused(Refusal::SessionExpired {
                    seq: s.seq,
                }))
            }
            _ => {}
        }
        self.clock_ms = self.clock_ms.max(s.now_ms);
        if !self.sessions.contains_key(&s.client) {
            while self.sessions.len() as u64 >= self.sessions_max {
                let oldest = self.oldest_session().unwrap();
                self.sessions.remove(&oldest);
                self.arrival_evictions += 1;
            }
        }
        let outcome = self.run(rev, cmd);
        self.sessions.insert(
            s.client.clone(),
            ModelSession {
                seq: s.seq,
                revision: rev,
                active_ms: self.clock_ms,
                outcome: outcome.clone(),
            },
        );
        fresh(outcome)
    }

    fn records(&self) -> Vec<KeyRecord> {
        self.kv
            .keys()
            .map(|k| model_record(&self.kv, k).unwrap())
            .collect()
    }

    fn summary(&self) -> SessionsSummary {
        SessionsSummary {
            count: self.sessions.len() as u64,
            oldest_active_ms: self.sessions.values().map(|s| s.active_ms).min(),
            params: record::SessionParams {
                clock_ms: self.clock_ms,
                ttl_ms: self.ttl_ms,
                sessions_max: self.sessions_max,
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// The generator.

const KEYS: [&[u8]; 12] = [
    b"a", b"a/1", b"a/2", b"a/x", b"b", b"b/1", b"b/2", b"c", b"c/1", b"s", b"z", b"\xff",
];
const PREFIXES: [&[u8]; 7] = [b"a", b"a/", b"b/", b"c", b"q", b"z", b"\xff"];
const VALUES: [&[u8]; 5] = [b"", b"x", b"y", b"10", b"9"];
const CLIENTS: [&[u8]; 4] = [b"c0", b"c1", b"c2", b"c3"];

struct Gen {
    rng: Rng,
    /// The last sequence number each client sent.
    sent: [u64; 4],
    wall_ms: u64,
}

impl Gen {
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.below(from.len() as u64) as usize]
    }

    fn target(&mut self, model: &Model, key: &[u8], next_rev: u64) -> Target {
        let k = model.kv.get(key);
        // Half the time the key's actual field, so compares succeed often enough.
        let actual = self.rng.below(2) == 0;
        let n = |f: fn(&ModelKey) -> u64, rng: &mut Rng| {
            if actual {
                k.map_or(0, f)
            } else {
                rng.below(next_rev + 1)
            }
        };
        match self.rng.below(4) {
            0 => Target::Value(match (actual, k) {
                (true, Some(k)) => k.value.clone(),
                _ => self.pick(&VALUES).to_vec(),
            }),
            1 => Target::Version(n(|k| k.version, &mut self.rng) % 5),
            2 => Target::CreateRevision(n(|k| k.create, &mut self.rng)),
            _ => Target::ModRevision(n(|k| k.modr, &mut self.rng)),
        }
    }

    fn op(&mut self) -> TxnOp {
        let key = self.pick(&KEYS);
        match self.rng.below(10) {
            0..=3 => op_put(key, self.pick(&VALUES)),
            4..=5 => op_del(key),
            6 => op_del_prefix(self.pick(&PREFIXES)),
            _ => op_get(key),
        }
    }

    fn txn(&mut self, model: &Model, next_rev: u64) -> Command {
        let compares = (0..self.rng.below(3))
            .map(|_| {
                let key = self.pick(&KEYS);
                let op = self.pick(&[
                    CompareOp::Equal,
                    CompareOp::Equal,
                    CompareOp::NotEqual,
                    CompareOp::Less,
                    CompareOp::Greater,
                ]);
                cmp(key, op, self.target(model, key, next_rev))
            })
            .collect();
        let success = (0..self.rng.below(5)).map(|_| self.op()).collect();
        let failure = (0..self.rng.below(3)).map(|_| self.op()).collect();
        txn(compares, success, failure)
    }

    fn command(&mut self, model: &Model, next_rev: u64) -> Command {
        match self.rng.below(20) {
            0..=6 => put(self.pick(&KEYS), self.pick(&VALUES)),
            7..=9 => del(self.pick(&KEYS)),
            10 => del_prefix(self.pick(&PREFIXES)),
            11 => Command::ExpireSessions {
                now_ms: self.now_ms(),
                ttl_ms: self.pick(&[500, 3_000, 100_000]),
                sessions_max: self.pick(&[1, 2, 3, 100, 100]),
            },
            _ => self.txn(model, next_rev),
        }
    }

    /// The proposing leader's clock: mostly forward, sometimes a little behind (another
    /// leader whose clock lags).
    fn now_ms(&mut self) -> u64 {
        self.wall_ms += self.rng.below(400);
        if self.rng.below(8) == 0 {
            self.wall_ms.saturating_sub(self.rng.below(2_000))
        } else {
            self.wall_ms
        }
    }

    /// A session for the next write, or none: next sequence numbers mostly, and retries,
    /// stale numbers, restarts at 1 and unknown jumps. A client whose session is gone
    /// usually starts a new one, as a real client does after a `SessionExpired`.
    fn session(&mut self, model: &Model) -> Option<Session> {
        if self.rng.below(3) == 0 {
            return None;
        }
        let c = self.rng.below(CLIENTS.len() as u64) as usize;
        let sent = self.sent[c];
        let gone = !model.sessions.contains_key(CLIENTS[c]);
        let seq = match self.rng.below(20) {
            _ if gone && sent > 0 && self.rng.below(4) != 0 => 1,
            0..=11 => sent + 1,
            12..=15 if sent > 0 => sent,
            16 if sent > 1 => 1 + self.rng.below(sent - 1),
            17 => 1,
            18 => sent + 2 + self.rng.below(3),
            _ => sent + 1,
        };
        self.sent[c] = self.sent[c].max(seq);
        if seq == 1 {
            self.sent[c] = 1;
        }
        Some(Session {
            client: CLIENTS[c].to_vec(),
            seq,
            now_ms: self.now_ms(),
        })
    }
}

/// How often a history took each interesting path, so the test cannot pass vacuously.
#[derive(Debug, Default)]
struct Coverage {
    txn_succeeded: u64,
    txn_failed: u64,
    prefix_deleted: u64,
    duplicates: u64,
    stale: u64,
    expired_refusals: u64,
    sessions_expired: u64,
    arrival_evictions: u64,
    reopens: u64,
}

impl Coverage {
    fn count(&mut self, r: &CommandResult) {
        self.duplicates += r.duplicate as u64;
        match &r.outcome {
            CommandOutcome::Txn { succeeded, results } => {
                if *succeeded {
                    self.txn_succeeded += 1;
                } else {
                    self.txn_failed += 1;
                }
                let deleted =
                    |o: &OpResult| matches!(o, OpResult::DeletePrefix { deleted } if *deleted > 0);
                self.prefix_deleted += results.iter().filter(|o| deleted(o)).count() as u64;
            }
            CommandOutcome::DeletePrefix { deleted } => {
                self.prefix_deleted += (*deleted > 0) as u64
            }
            CommandOutcome::Refused(Refusal::SessionStale { .. }) => self.stale += 1,
            CommandOutcome::Refused(Refusal::SessionExpired { .. }) => self.expired_refusals += 1,
            CommandOutcome::SessionsExpired { expired } => self.sessions_expired += expired,
            _ => {}
        }
    }

    fn assert_every_path_taken(&self) {
        let figures = [
            self.txn_succeeded,
            self.txn_failed,
            self.prefix_deleted,
            self.duplicates,
            self.stale,
            self.expired_refusals,
            self.sessions_expired,
            self.arrival_evictions,
            self.reopens,
        ];
        assert!(
            figures.iter().all(|&n| n > 0),
            "a path was never taken: {self:?}"
        );
    }
}

/// Generates and applies one seeded history, checking every outcome and, after every batch,
/// the whole state and the session figures.
fn run_history(seed: u64, entries: u64) -> Coverage {
    let mut coverage = Coverage::default();
    let mut d = Driver::new();
    let mut model = Model::new();
    let mut gen = Gen {
        rng: Rng(seed),
        sent: [0; 4],
        wall_ms: 1_000_000,
    };
    let mut rev = 1;
    while rev <= entries {
        let batch_len = match gen.rng.below(10) {
            0 => 1 + gen.rng.below(40),
            _ => 1 + gen.rng.below(6),
        };
        let mut batch = Vec::new();
        let mut want = Vec::new();
        for _ in 0..batch_len {
            let cmd = gen.command(&model, rev);
            let session = match cmd {
                Command::ExpireSessions { .. } => None,
                _ => gen.session(&model),
            };
            want.push(model.apply(rev, session.as_ref(), &cmd));
            batch.push((session, cmd));
            rev += 1;
        }
        let got = d.batch(&batch);
        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                got,
                want,
                "entry {}: {:?}",
                d.next - batch.len() as u64 + i as u64,
                batch[i]
            );
            coverage.count(got);
        }
        assert_eq!(
            d.all_records(),
            model.records(),
            "state after entry {}",
            rev - 1
        );
        assert_eq!(
            d.sm().sessions_summary(),
            model.summary(),
            "sessions after entry {}",
            rev - 1
        );
        if gen.rng.below(25) == 0 {
            d.reopen();
            coverage.reopens += 1;
            assert_eq!(d.all_records(), model.records(), "state after a reopen");
            assert_eq!(d.sm().sessions_summary(), model.summary());
        }
    }
    coverage.arrival_evictions = model.arrival_evictions;
    coverage
}

/// Seeded random histories against the model. Replay one seed with
/// `RAFTKV_SEED=<seed> cargo test -p raftkv-storage --lib sm::txn_tests::random_histories`.
#[test]
fn random_histories_match_the_model() {
    let (seeds, all): (Vec<u64>, bool) = match std::env::var("RAFTKV_SEED") {
        Ok(s) => (vec![s.parse().expect("RAFTKV_SEED is a u64")], false),
        Err(_) => ((0..40).collect(), true),
    };
    let mut total = Coverage::default();
    for seed in seeds {
        let Ok(c) = std::panic::catch_unwind(|| run_history(seed, 300)) else {
            panic!(
                "seed {seed} failed; replay with `RAFTKV_SEED={seed} cargo test -p raftkv-storage --lib sm::txn_tests::random_histories`"
            );
        };
        total.txn_succeeded += c.txn_succeeded;
        total.txn_failed += c.txn_failed;
        total.prefix_deleted += c.prefix_deleted;
        total.duplicates += c.duplicates;
        total.stale += c.stale;
        total.expired_refusals += c.expired_refusals;
        total.sessions_expired += c.sessions_expired;
        total.arrival_evictions += c.arrival_evictions;
        total.reopens += c.reopens;
    }
    eprintln!("coverage over the seeds: {total:?}");
    if all {
        total.assert_every_path_taken();
    }
}
