use super::*;
use crate::command::{Command, CommandOutcome};
use std::collections::BTreeMap;

pub(crate) fn put(index: u64, term: u64, key: &[u8], value: &[u8]) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::Normal,
        payload: Command::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        }
        .encode()
        .unwrap()
        .into(),
    }
}

pub(crate) fn del(index: u64, term: u64, key: &[u8]) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::Normal,
        payload: Command::Delete { key: key.to_vec() }
            .encode()
            .unwrap()
            .into(),
    }
}

fn noop(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::Noop,
        payload: Default::default(),
    }
}

fn config(index: u64, term: u64, voters: &[u64]) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::Config,
        payload: Membership::with_voters(voters.iter().copied())
            .encode()
            .unwrap()
            .into(),
    }
}

/// Opens the state machine, retrying sled's in-process lock briefly (see
/// [`crate::test_util::retry_sled_lock`]): several tests reopen right after a drop.
fn open_with(dir: &Path, opts: StateMachineOptions) -> Result<StateMachine, SmError> {
    crate::test_util::retry_sled_lock(|| StateMachine::open(dir, opts.clone()))
}

fn open(dir: &Path) -> StateMachine {
    open_with(dir, StateMachineOptions::default()).unwrap()
}

/// A tiny seeded generator: tests print the seed on failure.
pub(crate) struct Rng(pub u64);
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn applies_puts_deletes_noops_and_configs() {
    let dir = tempfile::tempdir().unwrap();
    let sm = open(dir.path());
    assert!(sm.was_created());
    assert_eq!(sm.applied(), SnapshotMeta::default());
    let out = sm
        .apply(&[
            noop(1, 1),
            config(2, 1, &[1, 2, 3]),
            put(3, 1, b"a", b"1"),
            del(4, 1, b"a"),
            del(5, 1, b"a"),
            put(6, 2, b"b", b"2"),
        ])
        .unwrap();
    let outcomes: Vec<_> = out.iter().map(|a| a.outcome.clone()).collect();
    assert_eq!(
        outcomes,
        vec![
            EntryOutcome::Noop,
            EntryOutcome::Config(Membership::with_voters([1, 2, 3])),
            command_outcome(
                3,
                CommandOutcome::Put {
                    create_revision: 3,
                    version: 1
                }
            ),
            command_outcome(4, CommandOutcome::Delete { existed: true }),
            command_outcome(5, CommandOutcome::Delete { existed: false }),
            command_outcome(
                6,
                CommandOutcome::Put {
                    create_revision: 6,
                    version: 1
                }
            ),
        ]
    );
    let applied = sm.applied();
    assert_eq!((applied.index, applied.term), (6, 2));
    assert_eq!(applied.membership, Membership::with_voters([1, 2, 3]));
    assert_eq!(
        sm.get(b"b").unwrap(),
        ReadAt {
            value: Some(b"2".to_vec()),
            applied_index: 6
        }
    );
    assert_eq!(sm.get(b"a").unwrap().value, None);
    // A delete sees a key put by an earlier batch.
    let out = sm.apply(&[del(7, 2, b"b")]).unwrap();
    assert_eq!(
        out[0].outcome,
        command_outcome(7, CommandOutcome::Delete { existed: true })
    );
}

fn command_outcome(revision: u64, outcome: CommandOutcome) -> EntryOutcome {
    EntryOutcome::Command(CommandResult {
        revision,
        outcome,
        duplicate: false,
    })
}

#[test]
fn entries_at_or_below_the_applied_index_are_no_ops() {
    let dir = tempfile::tempdir().unwrap();
    let sm = open(dir.path());
    sm.apply(&[put(1, 1, b"k", b"v1"), put(2, 1, b"k", b"v2")])
        .unwrap();
    // A replay of old entries (with different contents, to prove they are not applied).
    assert!(sm.apply(&[put(1, 1, b"k", b"old")]).unwrap().is_empty());
    assert!(sm.apply(&[put(2, 1, b"k", b"old")]).unwrap().is_empty());
    assert_eq!(sm.get(b"k").unwrap().value, Some(b"v2".to_vec()));
    // An overlapping batch applies only its new tail.
    let out = sm
        .apply(&[put(2, 1, b"k", b"old"), put(3, 1, b"k", b"v3")])
        .unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].index, 3);
    assert_eq!(sm.get(b"k").unwrap().value, Some(b"v3".to_vec()));
}

#[test]
fn gaps_and_bad_payloads_are_typed_errors_that_apply_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sm = open(dir.path());
    sm.apply(&[put(1, 1, b"k", b"v")]).unwrap();
    assert!(matches!(
        sm.apply(&[put(3, 1, b"x", b"y")]),
        Err(SmError::Gap {
            applied: 1,
            next: 3
        })
    ));
    assert!(matches!(
        sm.apply(&[put(2, 1, b"x", b"y"), put(4, 1, b"x", b"y")]),
        Err(SmError::Gap {
            applied: 2,
            next: 4
        })
    ));
    let mut bad = put(3, 1, b"z", b"z");
    bad.payload = vec![9, 0, 1].into();
    assert!(matches!(
        sm.apply(&[put(2, 1, b"x", b"y"), bad]),
        Err(SmError::Command { index: 3, .. })
    ));
    let mut bad_config = config(2, 1, &[1]);
    bad_config.payload.truncate(3);
    assert!(matches!(
        sm.apply(&[bad_config]),
        Err(SmError::Membership { index: 2, .. })
    ));
    assert_eq!(sm.applied_index(), 1);
    assert_eq!(sm.get(b"x").unwrap().value, None);
}

#[test]
fn state_and_applied_position_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let sm = open(dir.path());
        sm.apply(&[config(1, 3, &[1, 2]), put(2, 3, b"k", b"v")])
            .unwrap();
        let durable = sm.flush().unwrap();
        assert_eq!((durable.index, durable.term), (2, 3));
    }
    let sm = open(dir.path());
    assert!(!sm.was_created());
    let applied = sm.applied();
    assert_eq!((applied.index, applied.term), (2, 3));
    assert_eq!(applied.membership, Membership::with_voters([1, 2]));
    assert_eq!(sm.get(b"k").unwrap().value, Some(b"v".to_vec()));
}

#[test]
fn scans_are_ordered_limited_and_say_their_index() {
    let dir = tempfile::tempdir().unwrap();
    let sm = open_with(
        dir.path(),
        StateMachineOptions {
            scan_limit_max: 3,
            ..StateMachineOptions::default()
        },
    )
    .unwrap();
    let keys: [&[u8]; 7] = [b"a", b"ab", b"abc", b"ac", b"b", b"\xff", b"\xff\xff"];
    let entries: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| put(i as u64 + 1, 1, k, k))
        .collect();
    sm.apply(&entries).unwrap();
    let page = sm.scan_prefix(b"a", 10).unwrap();
    assert_eq!(page.applied_index, 7);
    let got: Vec<_> = page.value.pairs.iter().map(|(k, _)| k.clone()).collect();
    // Clamped to scan_limit_max = 3, with more to come.
    assert_eq!(got, vec![b"a".to_vec(), b"ab".to_vec(), b"abc".to_vec()]);
    assert!(page.value.more);
    let page = sm.scan_prefix(b"ab", 10).unwrap().value;
    assert_eq!(page.pairs.len(), 2);
    assert!(!page.more);
    let page = sm.scan_prefix(b"\xff", 10).unwrap().value;
    assert_eq!(page.pairs.len(), 2);
    assert!(!page.more);
    let page = sm
        .scan(Bound::Excluded(b"ab"), Bound::Included(b"b"), 2)
        .unwrap()
        .value;
    let got: Vec<_> = page.pairs.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(got, vec![b"abc".to_vec(), b"ac".to_vec()]);
    assert!(page.more);
    let page = sm
        .scan(Bound::Included(b"b"), Bound::Excluded(b"a"), 2)
        .unwrap()
        .value;
    assert!(page.pairs.is_empty() && !page.more);
    let page = sm
        .scan(Bound::Unbounded, Bound::Unbounded, 0)
        .unwrap()
        .value;
    assert!(page.pairs.is_empty() && page.more);
}

#[test]
fn prefix_pages_stop_at_the_byte_cap_and_continue_after_the_last_key() {
    let dir = tempfile::tempdir().unwrap();
    let sm = open(dir.path());
    // p/00..p/19 with 100-byte values (104 bytes a pair), and keys around the prefix.
    let mut entries = vec![put(1, 1, b"o", b"x"), put(2, 1, b"q", b"x")];
    for i in 0..20u64 {
        let key = format!("p/{i:02}");
        entries.push(put(i + 3, 1, key.as_bytes(), &[b'v'; 100]));
    }
    sm.apply(&entries).unwrap();
    let mut after: Option<Vec<u8>> = None;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = sm
            .scan_prefix_page(b"p/", after.as_deref(), 100, 350)
            .unwrap()
            .value;
        pages += 1;
        // 350 bytes hold three 104-byte pairs; never an empty page.
        assert!((1..=3).contains(&page.pairs.len()), "{}", page.pairs.len());
        seen.extend(page.pairs.iter().map(|(k, _)| k.clone()));
        if !page.more {
            break;
        }
        after = page.pairs.last().map(|(k, _)| k.clone());
    }
    let want: Vec<Vec<u8>> = (0..20).map(|i| format!("p/{i:02}").into_bytes()).collect();
    assert_eq!(seen, want, "every key once, in order");
    assert_eq!(pages, 7);
    // A cap below one pair still returns one pair, so paging always progresses.
    let page = sm.scan_prefix_page(b"p/", None, 100, 1).unwrap().value;
    assert_eq!((page.pairs.len(), page.more), (1, true));
    // A continuation key outside the prefix: below starts at the prefix, above is empty.
    let page = sm
        .scan_prefix_page(b"p/", Some(b"a"), 2, usize::MAX)
        .unwrap()
        .value;
    assert_eq!(page.pairs[0].0, b"p/00".to_vec());
    let page = sm
        .scan_prefix_page(b"p/", Some(b"z"), 2, usize::MAX)
        .unwrap()
        .value;
    assert!(page.pairs.is_empty() && !page.more);
}

/// Interleaves a snapshot walk with random applies; the walk must yield exactly the state at
/// the applied index where it began.
#[test]
fn snapshot_view_is_consistent_while_applies_go_on() {
    for seed in 0..12u64 {
        let dir = tempfile::tempdir().unwrap();
        let sm = open_with(
            dir.path(),
            StateMachineOptions {
                snapshot_block_pairs: 1 + seed as usize % 4,
                ..StateMachineOptions::default()
            },
        )
        .unwrap();
        let mut rng = Rng(seed);
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut index = 0;
        let mut batch = Vec::new();
        for _ in 0..400 {
            index += 1;
            let key = format!("k{:03}", rng.below(300)).into_bytes();
            if rng.below(4) == 0 {
                model.remove(&key);
                batch.push(del(index, 1, &key));
            } else {
                let value = format!("v{index}").into_bytes();
                model.insert(key.clone(), value.clone());
                batch.push(put(index, 1, &key, &value));
            }
        }
        sm.apply(&batch).unwrap();
        let view = sm.begin_snapshot().unwrap();
        assert_eq!(view.meta().index, index);
        assert!(matches!(
            sm.begin_snapshot(),
            Err(SmError::SnapshotInProgress)
        ));
        let mut pairs = view.pairs();
        let mut got = Vec::new();
        loop {
            // Between steps, change keys behind, at and ahead of the cursor.
            if rng.below(3) == 0 {
                let mut batch = Vec::new();
                for _ in 0..rng.below(5) + 1 {
                    index += 1;
                    let key = format!("k{:03}", rng.below(320)).into_bytes();
                    if rng.below(2) == 0 {
                        batch.push(del(index, 2, &key));
                    } else {
                        batch.push(put(index, 2, &key, b"after"));
                    }
                }
                sm.apply(&batch).unwrap();
            }
            match pairs.next() {
                Some(item) => {
                    let (k, v) = item.unwrap();
                    got.extend(user_pair(&k, &v));
                }
                None => break,
            }
        }
        let want: Vec<_> = model.into_iter().collect();
        assert_eq!(
            got, want,
            "seed {seed}: replay with `cargo test -p raftkv-storage --lib sm::tests::snapshot_view`"
        );
        drop(pairs);
        drop(view);
        sm.begin_snapshot().unwrap();
    }
}

#[test]
fn applies_wait_when_the_side_table_is_full_and_resume_after_the_view_closes() {
    let dir = tempfile::tempdir().unwrap();
    let sm = open_with(
        dir.path(),
        StateMachineOptions {
            cow_bytes_max: 4,
            ..StateMachineOptions::default()
        },
    )
    .unwrap();
    sm.apply(&[put(1, 1, b"key1", b"value1")]).unwrap();
    let view = sm.begin_snapshot().unwrap();
    // Saves key1's old value (10 bytes): now over budget.
    sm.apply(&[put(2, 1, b"key1", b"value2")]).unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            sm.apply(&[put(3, 1, b"key2", b"v")]).unwrap();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "an apply went past a full side table"
        );
        let got: Vec<_> = view
            .pairs()
            .filter_map(|p| {
                let (k, v) = p.unwrap();
                user_pair(&k, &v)
            })
            .collect();
        assert_eq!(got, vec![(b"key1".to_vec(), b"value1".to_vec())]);
        drop(view);
        handle.join().unwrap();
    });
    assert_eq!(sm.applied_index(), 3);
}

#[test]
fn install_swaps_the_whole_state_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let sm = open(dir.path());
        sm.apply(&[put(1, 1, b"old", b"x"), put(2, 1, b"both", b"old")])
            .unwrap();
        let mut builder = sm.begin_install().unwrap();
        for i in 0..3000u32 {
            builder
                .insert_v1(format!("n{i:05}").as_bytes(), &i.to_le_bytes(), 5000)
                .unwrap();
        }
        builder.insert_v1(b"both", b"new", 5000).unwrap();
        assert_eq!(builder.key_count(), 3001);
        // Until finish, the old state is what reads see.
        assert_eq!(sm.get(b"old").unwrap().value, Some(b"x".to_vec()));
        let meta = SnapshotMeta {
            index: 5000,
            term: 4,
            membership: Membership::with_voters([1, 2, 3]),
        };
        builder.finish(&meta).unwrap();
        assert_eq!(sm.applied(), meta);
        assert_eq!(sm.get(b"old").unwrap().value, None);
        assert_eq!(sm.get(b"both").unwrap().value, Some(b"new".to_vec()));
        assert_eq!(
            sm.get(b"n02999").unwrap(),
            ReadAt {
                value: Some(2999u32.to_le_bytes().to_vec()),
                applied_index: 5000
            }
        );
        // Replays at or below the snapshot are no-ops; the log continues after it.
        assert!(sm.apply(&[put(5000, 4, b"old", b"y")]).unwrap().is_empty());
        sm.apply(&[put(5001, 4, b"after", b"1")]).unwrap();
        // A snapshot behind the applied index is refused.
        let behind = sm.begin_install().unwrap();
        assert!(matches!(
            behind.finish(&SnapshotMeta {
                index: 4999,
                ..SnapshotMeta::default()
            }),
            Err(SmError::InstallBehind {
                snapshot_index: 4999,
                applied_index: 5001
            })
        ));
        // An unfinished install leaves nothing behind.
        let mut abandoned = sm.begin_install().unwrap();
        abandoned.insert(b"junk", b"junk").unwrap();
        drop(abandoned);
        sm.flush().unwrap();
    }
    let sm = open(dir.path());
    assert_eq!(sm.applied_index(), 5001);
    assert_eq!(sm.get(b"junk").unwrap().value, None);
    assert_eq!(sm.get(b"old").unwrap().value, None);
    assert_eq!(
        sm.scan(Bound::Unbounded, Bound::Unbounded, 10_000)
            .unwrap()
            .value
            .pairs
            .len(),
        3002
    );
}

#[test]
fn corrupt_bookkeeping_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let sm = open(dir.path());
        let cur = sm.read_current();
        cur.tree.insert(META_APPLIED, &b"short"[..]).unwrap();
        drop(cur);
        sm.flush().unwrap();
    }
    let err = open_with(dir.path(), StateMachineOptions::default()).unwrap_err();
    assert!(
        matches!(&err, SmError::Corrupt { what, .. } if what.contains("m/applied")),
        "{err}"
    );
}

#[test]
fn prefix_end_handles_trailing_ff() {
    assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
    assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
    assert_eq!(prefix_end(b"\xff\xff"), None);
    assert_eq!(prefix_end(b""), None);
}

/// A snapshot pair as the user sees it: a data key without its prefix and the value of its
/// record; `None` for session bookkeeping.
fn user_pair(key: &[u8], raw: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    if key.first() != Some(&b'd') {
        return None;
    }
    let (_, value) = record::decode_key(raw).unwrap();
    Some((key[1..].to_vec(), value.to_vec()))
}

/// Writes round 1's layout (format 1: raw values, no revisions) into `dir` with sled directly.
fn write_format_1(
    dir: &Path,
    applied: (u64, u64),
    membership: &Membership,
    pairs: &[(&[u8], &[u8])],
) {
    let db = sled::Config::new().path(dir).open().unwrap();
    let name = b"kv.0000000000000001";
    db.insert(CURRENT_TREE_KEY, &name[..]).unwrap();
    let tree = db.open_tree(name).unwrap();
    tree.insert(META_FORMAT, &1u32.to_be_bytes()[..]).unwrap();
    tree.insert(META_APPLIED, &encode_applied(applied.0, applied.1)[..])
        .unwrap();
    tree.insert(META_MEMBERSHIP, membership.encode().unwrap())
        .unwrap();
    for (k, v) in pairs {
        tree.insert(data_key(k), *v).unwrap();
    }
    db.flush().unwrap();
}

#[test]
fn a_format_1_state_machine_is_upgraded_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let membership = Membership::with_voters([1, 2, 3]);
    // Enough keys to span several upgrade batches; values that would not parse as records.
    let keys: Vec<Vec<u8>> = (0..2500u32)
        .map(|i| format!("k{i:05}").into_bytes())
        .collect();
    let mut pairs: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), &b"v"[..])).collect();
    pairs.push((b"empty", b""));
    pairs.push((b"\xff", b"\x00\x01"));
    write_format_1(dir.path(), (4321, 7), &membership, &pairs);
    {
        let sm = open(dir.path());
        assert!(!sm.was_created());
        let applied = sm.applied();
        assert_eq!((applied.index, applied.term), (4321, 7));
        assert_eq!(applied.membership, membership);
        // Every key: its value, revisions = the applied index, version 1.
        let want = |key: &[u8], value: &[u8]| KeyRecord {
            key: key.to_vec(),
            value: value.to_vec(),
            create_revision: 4321,
            mod_revision: 4321,
            version: 1,
            lease: 0,
        };
        assert_eq!(
            sm.get_record(b"k00000").unwrap().value,
            Some(want(b"k00000", b"v"))
        );
        assert_eq!(
            sm.get_record(b"empty").unwrap().value,
            Some(want(b"empty", b""))
        );
        assert_eq!(
            sm.get_record(b"\xff").unwrap().value,
            Some(want(b"\xff", b"\x00\x01"))
        );
        let (records, more) = sm
            .scan_records(Bound::Unbounded, Bound::Unbounded, usize::MAX, usize::MAX)
            .unwrap()
            .value;
        assert_eq!((records.len(), more), (2502, false));
        assert!(records
            .iter()
            .all(|r| (r.create_revision, r.mod_revision, r.version) == (4321, 4321, 1)));
        assert_eq!(sm.sessions_summary().count, 0);
        // The upgraded tree is format 2, the only state tree left.
        let cur = sm.read_current();
        assert_eq!(read_meta(&cur.tree).unwrap().1, SM_FORMAT_VERSION);
        assert_eq!(cur.tree_name, b"kv.0000000000000002".to_vec());
        drop(cur);
        let trees: Vec<_> = sm
            .db
            .tree_names()
            .into_iter()
            .filter(|n| n.starts_with(TREE_NAME_PREFIX))
            .collect();
        assert_eq!(trees, vec![IVec::from(&b"kv.0000000000000002"[..])]);
        // The log continues after the applied index, with the revisions carried on.
        let out = sm.apply(&[put(4322, 7, b"k00001", b"w")]).unwrap();
        assert_eq!(
            out[0].outcome,
            command_outcome(
                4322,
                CommandOutcome::Put {
                    create_revision: 4321,
                    version: 2
                }
            )
        );
        sm.flush().unwrap();
    }
    // A second open finds format 2 and changes nothing.
    let sm = open(dir.path());
    assert_eq!(sm.applied_index(), 4322);
    let r = sm.get_record(b"k00001").unwrap().value.unwrap();
    assert_eq!(
        (r.value, r.create_revision, r.mod_revision, r.version),
        (b"w".to_vec(), 4321, 4322, 2)
    );
    assert_eq!(sm.read_current().tree_name, b"kv.0000000000000002".to_vec());
}

/// An upgrade that died before flipping the pointer left a half-built next tree: the next
/// open rebuilds it from the format-1 tree, which is still the state.
#[test]
fn an_upgrade_interrupted_before_the_pointer_flip_reruns() {
    let dir = tempfile::tempdir().unwrap();
    let membership = Membership::with_voters([1]);
    write_format_1(
        dir.path(),
        (9, 2),
        &membership,
        &[(b"a", b"1"), (b"b", b"2")],
    );
    {
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let half = db.open_tree(b"kv.0000000000000002").unwrap();
        let junk = record::KeyMeta {
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            lease: 0,
        };
        half.insert(data_key(b"a"), record::encode_key(&junk, b"half-written"))
            .unwrap();
        half.insert(data_key(b"junk"), record::encode_key(&junk, b"x"))
            .unwrap();
        db.flush().unwrap();
    }
    let sm = open(dir.path());
    let got: Vec<_> = sm
        .scan_records(Bound::Unbounded, Bound::Unbounded, 10, usize::MAX)
        .unwrap()
        .value
        .0
        .into_iter()
        .map(|r| (r.key, r.value, r.create_revision, r.mod_revision, r.version))
        .collect();
    assert_eq!(
        got,
        vec![
            (b"a".to_vec(), b"1".to_vec(), 9, 9, 1),
            (b"b".to_vec(), b"2".to_vec(), 9, 9, 1)
        ]
    );
    assert_eq!(sm.applied().membership, membership);
}
