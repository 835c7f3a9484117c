//! Watch history and leases through [`StateMachine::apply_with_events`]: the events a batch
//! hands out are exactly what the history keeps; history is bounded, survives reopen and
//! travels with snapshots; leases attach, detach and revoke their keys atomically.

use super::history::KeyFilter;
use super::txn_tests::{del, del_prefix, entry, op_del, op_put, put, reopen_at, txn, Driver};
use super::*;
use crate::command::{Command, CommandOutcome, Refusal, LEASE_KEYS_MAX};
use crate::txn::TxnOp;

fn grant(ttl_ms: u64) -> Command {
    Command::LeaseGrant {
        ttl_ms,
        leases_max: 3,
    }
}

fn put_leased(key: &[u8], value: &[u8], lease: u64) -> Command {
    Command::PutLeased {
        key: key.to_vec(),
        value: value.to_vec(),
        lease,
    }
}

/// (revision, key, value or None for a delete) of every event.
fn summary(events: &[ChangeEvent]) -> Vec<(u64, String, Option<String>)> {
    events
        .iter()
        .map(|e| {
            let value = e
                .put_record()
                .unwrap()
                .map(|(_, v)| String::from_utf8(v.to_vec()).unwrap());
            (e.revision, String::from_utf8(e.key.clone()).unwrap(), value)
        })
        .collect()
}

fn all_history(sm: &StateMachine, filter: &KeyFilter, from: u64) -> Vec<ChangeEvent> {
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let page = sm.read_history(next, u64::MAX, filter, 2).unwrap().unwrap();
        out.extend(page.events);
        if page.next_revision > sm.applied_index() {
            return out;
        }
        assert!(page.next_revision > next, "a page progresses");
        next = page.next_revision;
    }
}

fn apply_events(d: &mut Driver, cmds: &[Command]) -> Vec<ChangeEvent> {
    let entries: Vec<Entry> = cmds
        .iter()
        .enumerate()
        .map(|(i, c)| entry(d.next + i as u64, None, c))
        .collect();
    d.next += cmds.len() as u64;
    d.sm().apply_with_events(&entries).unwrap().events
}

#[test]
fn every_change_is_an_event_and_the_history_keeps_exactly_those() {
    let mut d = Driver::new();
    let mut events = apply_events(
        &mut d,
        &[put(b"a/1", b"x"), put(b"a/2", b"y"), put(b"b", b"z")],
    );
    events.extend(apply_events(
        &mut d,
        &[
            del(b"missing"),
            txn(
                vec![],
                vec![op_put(b"a/1", b"x2"), op_del(b"b"), op_del(b"nope")],
                vec![],
            ),
            del_prefix(b"a/"),
        ],
    ));
    assert_eq!(
        summary(&events),
        vec![
            (1, "a/1".into(), Some("x".into())),
            (2, "a/2".into(), Some("y".into())),
            (3, "b".into(), Some("z".into())),
            (5, "a/1".into(), Some("x2".into())),
            (5, "b".into(), None),
            (6, "a/1".into(), None),
            (6, "a/2".into(), None),
        ],
        "deletes of absent keys are no events; a txn's changes share its revision"
    );
    let (meta, _) = events[3].put_record().unwrap().unwrap();
    assert_eq!(
        (meta.create_revision, meta.mod_revision, meta.version),
        (1, 5, 2)
    );
    assert_eq!(
        all_history(d.sm(), &KeyFilter::Prefix(Vec::new()), 1),
        events
    );
    let only_b: Vec<_> = events.iter().filter(|e| e.key == b"b").cloned().collect();
    assert_eq!(
        all_history(d.sm(), &KeyFilter::Key(b"b".to_vec()), 1),
        only_b
    );
    let from_5: Vec<_> = events.iter().filter(|e| e.revision >= 5).cloned().collect();
    assert_eq!(
        all_history(d.sm(), &KeyFilter::Prefix(Vec::new()), 5),
        from_5
    );
    d.reopen();
    assert_eq!(
        all_history(d.sm(), &KeyFilter::Prefix(Vec::new()), 1),
        events
    );
    assert_eq!(d.sm().history_compact_revision(), 0);
}

#[test]
fn history_is_bounded_by_revisions_and_says_where_it_was_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StateMachineOptions {
        watch_history_revisions: 10,
        ..StateMachineOptions::default()
    };
    let sm = StateMachine::open(dir.path(), opts.clone()).unwrap();
    for i in 1..=25u64 {
        sm.apply(&[entry(i, None, &put(b"k", &i.to_be_bytes()))])
            .unwrap();
    }
    assert_eq!(sm.history_compact_revision(), 15);
    let all = KeyFilter::Prefix(Vec::new());
    assert_eq!(
        sm.read_history(15, 25, &all, 100).unwrap(),
        Err(Compacted {
            compact_revision: 15
        })
    );
    let page = sm.read_history(16, 25, &all, 100).unwrap().unwrap();
    let revisions: Vec<u64> = page.events.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, (16..=25).collect::<Vec<_>>());
    sm.flush().unwrap();
    drop(sm);
    let sm =
        crate::test_util::retry_sled_lock(|| StateMachine::open(dir.path(), opts.clone())).unwrap();
    assert_eq!(
        sm.history_compact_revision(),
        15,
        "the compact revision is durable"
    );
    assert_eq!(
        sm.read_history(16, 25, &all, 100)
            .unwrap()
            .unwrap()
            .events
            .len(),
        10
    );
}

#[test]
fn a_lease_holds_keys_until_revoked_and_its_revoke_deletes_them_in_one_revision() {
    let mut d = Driver::new();
    let granted = d.one(grant(5_000));
    assert_eq!(
        granted.outcome,
        CommandOutcome::LeaseGranted {
            id: 1,
            ttl_ms: 5_000
        }
    );
    assert_eq!(
        d.one(put_leased(b"svc/x", b"1", 99)).outcome,
        CommandOutcome::Refused(Refusal::LeaseNotFound { id: 99 })
    );
    assert!(d.record(b"svc/x").is_none(), "a refused put writes nothing");
    d.plain(&[
        put_leased(b"svc/a", b"1", 1),
        put_leased(b"svc/b", b"2", 1),
        put_leased(b"svc/c", b"3", 1),
    ]);
    assert_eq!(d.record(b"svc/a").unwrap().lease, 1);
    d.one(put(b"svc/c", b"plain")); // a put without a lease detaches the key
    d.one(del(b"svc/b"));
    let (info, keys, more) = d.sm().lease(1, 10).unwrap().value.unwrap();
    assert_eq!((info.keys, keys, more), (1, vec![b"svc/a".to_vec()], false));
    d.reopen();
    assert_eq!(
        d.sm().leases().0[0].keys,
        1,
        "the key count is rebuilt on open"
    );
    let events = apply_events(&mut d, &[Command::LeaseRevoke { id: 1 }]);
    assert_eq!(summary(&events), vec![(8, "svc/a".into(), None)]);
    assert!(d.record(b"svc/a").is_none());
    assert_eq!(d.record(b"svc/c").unwrap().value, b"plain");
    assert!(d.sm().leases().0.is_empty());
    assert_eq!(
        d.one(Command::LeaseRevoke { id: 1 }).outcome,
        CommandOutcome::Refused(Refusal::LeaseNotFound { id: 1 })
    );
}

#[test]
fn leases_are_bounded_in_number_and_moves_between_leases_keep_counts() {
    let mut d = Driver::new();
    let ids: Vec<u64> = (0..4)
        .map(|_| match d.one(grant(1_000)).outcome {
            CommandOutcome::LeaseGranted { id, .. } => id,
            other => panic!("{other:?}"),
        })
        .take(3)
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    assert_eq!(
        d.one(grant(1_000)).outcome,
        CommandOutcome::Refused(Refusal::LeasesFull { leases_max: 3 })
    );
    d.one(put_leased(b"k", b"v", 1));
    d.one(put_leased(b"k", b"v", 2)); // moves to lease 2
    let leases = d.sm().leases().0;
    let keys: Vec<u64> = leases.iter().map(|l| l.keys).collect();
    assert_eq!(keys, vec![0, 1, 0]);
    const { assert!(LEASE_KEYS_MAX >= 100_000) };
    let before = d.sm().lease_epoch();
    d.one(Command::LeaseRevoke { id: 2 });
    assert!(d.sm().lease_epoch() > before);
    assert!(d.record(b"k").is_none());
}

#[test]
fn snapshots_carry_leases_and_history() {
    let mut d = Driver::new();
    d.plain(&[grant(2_000), put_leased(b"a", b"1", 1), put(b"b", b"2")]);
    let sm = d.sm();
    let view = sm.begin_snapshot().unwrap();
    let meta = view.meta().clone();
    let pairs: Vec<_> = view.pairs().map(Result::unwrap).collect();
    drop(view);
    let dst_dir = tempfile::tempdir().unwrap();
    let dst = reopen_at(dst_dir.path());
    let mut builder = dst.begin_install().unwrap();
    for (k, v) in &pairs {
        builder.insert(k, v).unwrap();
    }
    builder.finish(&meta).unwrap();
    assert_eq!(dst.leases().0, sm.leases().0);
    let all = KeyFilter::Prefix(Vec::new());
    assert_eq!(
        dst.read_history(1, 3, &all, 100).unwrap(),
        sm.read_history(1, 3, &all, 100).unwrap()
    );
    assert_eq!(dst.history_compact_revision(), 0);
}

#[test]
fn a_history_page_is_cut_by_bytes_at_a_revision_boundary_and_skips_other_keys_cheaply() {
    let mut d = Driver::new();
    let big = vec![b'v'; 300 << 10];
    // Revisions 1..=6 put 300 KiB values; revision 7 is a small one under another key.
    let cmds: Vec<Command> = (0..6u8)
        .map(|i| put(&[b'k', b'0' + i], &big))
        .chain([put(b"other", b"x")])
        .collect();
    apply_events(&mut d, &cmds);
    let all = KeyFilter::Prefix(Vec::new());
    let page = d.sm().read_history(1, 7, &all, 1000).unwrap().unwrap();
    let revisions: Vec<u64> = page.events.iter().map(|e| e.revision).collect();
    // 1 MiB is passed by the 4th value: the page ends there, the next starts at 5.
    assert_eq!((revisions, page.next_revision), (vec![1, 2, 3, 4], 5));
    let rest = d.sm().read_history(5, 7, &all, 1000).unwrap().unwrap();
    assert_eq!(rest.events.len(), 3);
    assert_eq!(rest.next_revision, 8);
    // A key filter matching nothing big reads through every record without holding any.
    let other = KeyFilter::Key(b"other".to_vec());
    let page = d.sm().read_history(1, 7, &other, 1000).unwrap().unwrap();
    assert_eq!(
        summary(&page.events),
        vec![(7, "other".into(), Some("x".into()))]
    );
    assert_eq!(page.next_revision, 8);
}

#[test]
fn pruning_keeps_up_with_batches_wider_than_its_allowance() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StateMachineOptions {
        watch_history_revisions: 10,
        ..StateMachineOptions::default()
    };
    let sm = StateMachine::open(dir.path(), opts).unwrap();
    // Each entry is a transaction of 64 puts; each batch is 100 entries: 6,400 changes per
    // batch, more than the 4,096 a batch may prune beyond what it wrote.
    let wide = |n: u64| {
        let ops = (0..64u64)
            .map(|k| op_put(format!("k{k}").as_bytes(), &n.to_be_bytes()))
            .collect();
        txn(vec![], ops, vec![])
    };
    let mut next = 1u64;
    for _batch in 0..5 {
        let entries: Vec<Entry> = (next..next + 100)
            .map(|i| entry(i, None, &wide(i)))
            .collect();
        sm.apply(&entries).unwrap();
        next += 100;
    }
    let applied = next - 1;
    // Every batch pruned what it wrote and more: the history is back within its bound.
    assert_eq!(sm.history_compact_revision(), applied - 10);
    let all = KeyFilter::Prefix(Vec::new());
    let kept = all_history(&sm, &all, applied - 9);
    assert_eq!(kept.len(), 10 * 64);
}

#[test]
fn history_is_bounded_in_bytes_too_and_counts_them_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StateMachineOptions {
        watch_history_revisions: 1_000,
        watch_history_bytes_max: 64 << 10,
        ..StateMachineOptions::default()
    };
    let sm = StateMachine::open(dir.path(), opts.clone()).unwrap();
    let value = vec![b'v'; 4 << 10];
    // 40 puts of 4 KiB to one key: 160 KiB of history, far within 1,000 revisions.
    for i in 1..=40u64 {
        sm.apply(&[entry(i, None, &put(b"k", &value))]).unwrap();
    }
    let compact = sm.history_compact_revision();
    let all = KeyFilter::Prefix(Vec::new());
    let kept = all_history(&sm, &all, compact + 1);
    let kept_bytes: usize = kept
        .iter()
        .map(|e| 13 + 5 + e.key.len() + e.record.as_ref().unwrap().len())
        .sum();
    assert!(
        compact > 20,
        "the oldest revisions went for bytes: compacted through {compact}"
    );
    assert!(kept_bytes <= 64 << 10, "{kept_bytes}");
    assert_eq!(
        kept.len() as u64,
        40 - compact,
        "whole revisions, the newest kept"
    );
    assert!(matches!(
        sm.read_history(compact, 40, &all, 10).unwrap(),
        Err(Compacted { .. })
    ));
    sm.flush().unwrap();
    drop(sm);
    let sm =
        crate::test_util::retry_sled_lock(|| StateMachine::open(dir.path(), opts.clone())).unwrap();
    assert_eq!(
        sm.history_compact_revision(),
        compact,
        "the state is durable"
    );
    // The count survived the reopen: more puts keep the history within its bound.
    for i in 41..=80u64 {
        sm.apply(&[entry(i, None, &put(b"k", &value))]).unwrap();
    }
    let compact = sm.history_compact_revision();
    let kept = all_history(&sm, &all, compact + 1);
    assert!(
        kept.len() * (4 << 10) <= 64 << 10 && kept.len() >= 12,
        "{}",
        kept.len()
    );
}

/// A snapshot's pairs: internal keys and their records.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// A named way to damage a snapshot's pairs.
type Damage<'a> = (&'static str, Box<dyn Fn(&mut Pairs) + 'a>);

/// The pairs of `d`'s state as a snapshot carries them, and its position.
fn snapshot_of(d: &Driver) -> (SnapshotMeta, Pairs) {
    let view = d.sm().begin_snapshot().unwrap();
    let meta = view.meta().clone();
    let pairs = view
        .pairs()
        .map(|p| p.map(|(k, v)| (k, v.to_vec())).unwrap())
        .collect();
    (meta, pairs)
}

#[test]
fn an_install_whose_lease_records_are_damaged_is_refused_and_the_old_state_stays() {
    let mut src = Driver::new();
    src.plain(&[grant(2_000), put_leased(b"a", b"1", 1), put(b"b", b"2")]);
    src.plain(&[put(b"c", b"3")]);
    let (meta, pairs) = snapshot_of(&src);
    let lease_1 = leases::lease_key(1);
    let damages: [Damage<'_>; 2] = [
        (
            "an attachment whose lease record is missing",
            Box::new(|p| p.retain(|(k, _)| *k != lease_1)),
        ),
        (
            "a lease record of the wrong length",
            Box::new(|p| {
                let l = p.iter_mut().find(|(k, _)| *k == lease_1).unwrap();
                l.1.pop();
            }),
        ),
    ];
    for (what, damage) in &damages {
        let mut dst = Driver::new();
        dst.plain(&[
            grant(7_000),
            put_leased(b"mine", b"m", 1),
            put(b"old", b"o"),
        ]);
        let before = (dst.all_records(), dst.sm().leases(), dst.sm().applied());
        let mut damaged = pairs.clone();
        damage(&mut damaged);
        let mut builder = dst.sm().begin_install().unwrap();
        for (k, v) in &damaged {
            builder.insert(k, v).unwrap();
        }
        let err = builder.finish(&meta).expect_err(what);
        let after = (dst.all_records(), dst.sm().leases(), dst.sm().applied());
        assert_eq!(after, before, "{what}: the old state is whole in memory");
        assert!(
            matches!(err, SmError::Record(_)),
            "{what}: a damaged snapshot, not a damaged node: {err}"
        );
        dst.one(put(b"later", b"l"));
        dst.reopen();
        assert_eq!(
            dst.record(b"old").unwrap().value,
            b"o",
            "{what}: and on disk"
        );
        assert_eq!(dst.record(b"later").unwrap().value, b"l", "{what}");
        assert_eq!(dst.sm().leases().0, before.1 .0, "{what}");
    }
}

/// Writes `keys` straight into `d`'s tree as user keys attached to `lease` (the record and,
/// if `row`, the `k` row), then reopens so the lease index counts them: state an old bug or
/// damage could have left, or too many keys to put one by one.
fn plant_attached(d: &mut Driver, lease: u64, keys: &[Vec<u8>], row: bool) {
    let tree = d.sm().read_current().tree.clone();
    let meta = record::KeyMeta {
        create_revision: 1,
        mod_revision: 1,
        version: 1,
        lease,
    };
    let mut batch = sled::Batch::default();
    for k in keys {
        batch.insert(data_key(k), record::encode_key(&meta, b"v"));
        if row {
            batch.insert(leases::attach_key(lease, k), &b""[..]);
        }
    }
    tree.apply_batch(batch).unwrap();
    drop(tree); // a tree holds sled's lock
    d.reopen();
}

fn numbered_keys(n: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("held/{i:08}").into_bytes())
        .collect()
}

fn op_put_leased(key: &[u8], lease: u64) -> TxnOp {
    TxnOp::Put {
        key: key.to_vec(),
        value: b"t".to_vec(),
        lease,
    }
}

#[test]
fn a_txn_cannot_attach_past_the_key_bound_and_a_revoke_over_it_still_applies() {
    let mut d = Driver::new();
    d.one(grant(5_000));
    plant_attached(&mut d, 1, &numbered_keys(LEASE_KEYS_MAX - 1), true);
    assert_eq!(
        d.sm().lease(1, 0).unwrap().value.unwrap().0.keys,
        LEASE_KEYS_MAX - 1
    );
    let two_new = txn(
        vec![],
        vec![op_put_leased(b"new/1", 1), op_put_leased(b"new/2", 1)],
        vec![],
    );
    assert_eq!(
        d.one(two_new).outcome,
        CommandOutcome::Refused(Refusal::LeaseKeysFull {
            keys_max: LEASE_KEYS_MAX
        }),
        "the second put counts the first, staged in the same txn"
    );
    assert!(d.record(b"new/1").is_none(), "a refused txn writes nothing");
    let again = txn(
        vec![],
        vec![
            op_put_leased(b"held/00000000", 1),
            op_put_leased(b"new/1", 1),
        ],
        vec![],
    );
    assert!(
        matches!(
            d.one(again).outcome,
            CommandOutcome::Txn {
                succeeded: true,
                ..
            }
        ),
        "re-putting an attached key takes no slot"
    );
    assert_eq!(
        d.sm().lease(1, 0).unwrap().value.unwrap().0.keys,
        LEASE_KEYS_MAX
    );
    // Past the bound (as a build without the staged count let through): it still revokes.
    plant_attached(&mut d, 1, &[b"over/1".to_vec(), b"over/2".to_vec()], true);
    let revoked = d.one(Command::LeaseRevoke { id: 1 }).outcome;
    assert_eq!(
        revoked,
        CommandOutcome::LeaseRevoked {
            deleted: LEASE_KEYS_MAX + 2
        }
    );
    assert_eq!(d.count_prefix(b""), 0);
    d.reopen();
    assert!(d.sm().leases().0.is_empty());
}

#[test]
fn a_revoke_drops_stray_attachment_rows_and_deletes_only_keys_that_name_its_lease() {
    let mut d = Driver::new();
    d.plain(&[
        grant(5_000),
        grant(5_000),
        put_leased(b"mine", b"1", 1),
        put_leased(b"other", b"2", 2),
    ]);
    let tree = d.sm().read_current().tree.clone();
    // Rows naming lease 1 for a key of lease 2 and for a key that does not exist.
    tree.insert(leases::attach_key(1, b"other"), &b""[..])
        .unwrap();
    tree.insert(leases::attach_key(1, b"gone"), &b""[..])
        .unwrap();
    drop(tree); // a tree holds sled's lock
    d.reopen();
    assert_eq!(d.sm().lease(1, 0).unwrap().value.unwrap().0.keys, 3);
    let events = apply_events(&mut d, &[Command::LeaseRevoke { id: 1 }]);
    assert_eq!(summary(&events), vec![(5, "mine".into(), None)]);
    assert!(d.record(b"mine").is_none());
    assert_eq!(
        d.record(b"other").unwrap().lease,
        2,
        "another lease's key stays"
    );
    d.reopen();
    let (info, keys, _) = d.sm().lease(2, 10).unwrap().value.unwrap();
    assert_eq!((info.keys, keys), (1, vec![b"other".to_vec()]));
    assert_eq!(
        d.sm().leases().0.len(),
        1,
        "no row of lease 1 is left behind"
    );
}

/// Applies `cmd`, a lease change, and checks that the epoch is none seen before.
fn change(d: &mut Driver, cmd: Command, seen: &mut Vec<u64>) {
    let outcome = d.one(cmd).outcome;
    assert!(
        !matches!(outcome, CommandOutcome::Refused(_)),
        "{outcome:?}"
    );
    let epoch = d.sm().lease_epoch();
    assert!(
        !seen.contains(&epoch),
        "epoch {epoch} after {outcome:?}, seen {seen:?}"
    );
    seen.push(epoch);
}

#[test]
fn the_lease_epoch_moves_past_every_epoch_seen_across_reopens_and_installs() {
    let mut d = Driver::new();
    let mut seen = vec![d.sm().lease_epoch()];
    change(&mut d, grant(1_000), &mut seen);
    change(&mut d, grant(1_000), &mut seen);
    d.reopen();
    seen.push(d.sm().lease_epoch());
    // As many changes after the reopen as before it: a restarted counter repeats itself.
    change(&mut d, Command::LeaseRevoke { id: 1 }, &mut seen);
    change(&mut d, grant(1_000), &mut seen);
    let mut src = Driver::new();
    src.plain(&[put(b"x", b"1"), put(b"y", b"2"), put(b"z", b"3")]);
    src.plain(&[put(b"x", b"1"), put(b"y", b"2"), grant(1_000)]);
    let (meta, pairs) = snapshot_of(&src);
    let mut builder = d.sm().begin_install().unwrap();
    for (k, v) in &pairs {
        builder.insert(k, v).unwrap();
    }
    builder.finish(&meta).unwrap();
    d.next = meta.index + 1;
    seen.push(d.sm().lease_epoch());
    change(&mut d, grant(1_000), &mut seen);
    change(&mut d, Command::LeaseRevoke { id: 6 }, &mut seen);
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
}

/// A lease record `l ‖ id` as a grant at revision `id` writes it.
fn lease_record(id: u64, ttl_ms: u64) -> (Vec<u8>, Vec<u8>) {
    let mut v = ttl_ms.to_be_bytes().to_vec();
    v.extend_from_slice(&id.to_be_bytes());
    (leases::lease_key(id), v)
}

#[test]
fn a_lease_granted_after_the_applied_index_is_damage_not_a_panic() {
    // On open: the node refuses its state as corrupt.
    let mut d = Driver::new();
    d.plain(&[grant(1_000), put(b"a", b"1")]);
    let tree = d.sm().read_current().tree.clone();
    let (k, v) = lease_record(3, 1_000);
    tree.insert(k, v).unwrap();
    drop(tree); // a tree holds sled's lock
    d.sm().flush().unwrap();
    drop(d.sm.take());
    let err = crate::test_util::retry_sled_lock(|| {
        StateMachine::open(d.dir.path(), StateMachineOptions::default())
    })
    .expect_err("a lease from the future");
    assert!(matches!(err, SmError::Corrupt { .. }), "{err}");
    // In a snapshot: the install is refused.
    let mut src = Driver::new();
    src.plain(&[grant(1_000), put(b"a", b"1")]);
    let (meta, mut pairs) = snapshot_of(&src);
    pairs.push(lease_record(meta.index + 1, 1_000));
    pairs.sort();
    let dst = Driver::new();
    let mut builder = dst.sm().begin_install().unwrap();
    for (k, v) in &pairs {
        builder.insert(k, v).unwrap();
    }
    let err = builder.finish(&meta).expect_err("a lease from the future");
    assert!(matches!(err, SmError::Record(_)), "{err}");
    // A grant meeting such a lease (were one loaded) is an error, not a panic.
    let tmp = sled::Config::new().temporary(true).open().unwrap();
    let tree = tmp.open_tree("t").unwrap();
    let (k, v) = lease_record(5, 1_000);
    tree.insert(k, v).unwrap();
    let mut index = LeaseIndex::load(&tree, 5).unwrap();
    let mut exec = Exec::new(&tree, None, &mut index);
    exec.begin_entry(5);
    let err = exec.lease_grant(5, 1_000, 10).expect_err("lease 5 exists");
    assert!(matches!(err, SmError::Record(_)), "{err}");
}
