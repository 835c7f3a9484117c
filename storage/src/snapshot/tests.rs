use super::*;
use crate::crash_point::CrashPointFs;
use crate::sm::StateMachineOptions;
use crate::types::{Entry, EntryKind, Membership};
use crate::vfs::SimFs;
use std::collections::BTreeMap;
use std::ops::Bound;

fn put(index: u64, key: &[u8], value: &[u8]) -> Entry {
    Entry {
        index,
        term: 2,
        kind: EntryKind::Normal,
        payload: crate::command::Command::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        }
        .encode()
        .unwrap()
        .into(),
    }
}

fn config(index: u64) -> Entry {
    Entry {
        index,
        term: 2,
        kind: EntryKind::Config,
        payload: crate::codec::encode(&Membership::with_voters([1, 2, 3]))
            .unwrap()
            .into(),
    }
}

fn sm_in(dir: &Path) -> StateMachine {
    StateMachine::open(dir, StateMachineOptions::default()).unwrap()
}

fn all_pairs(sm: &StateMachine) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut start: Option<Vec<u8>> = None;
    loop {
        let lower = match &start {
            Some(k) => Bound::Excluded(k.as_slice()),
            None => Bound::Unbounded,
        };
        let page = sm.scan(lower, Bound::Unbounded, 10_000).unwrap().value;
        start = page.pairs.last().map(|(k, _)| k.clone());
        out.extend(page.pairs);
        if !page.more {
            return out;
        }
    }
}

/// A state machine with `n` keys (one of them with a value larger than a chunk) at index n+1.
fn filled(dir: &Path, n: u64) -> StateMachine {
    let sm = sm_in(dir);
    let mut entries = vec![config(1)];
    for i in 0..n {
        let value = if i == 3 {
            vec![0xab; 5000]
        } else {
            format!("value-{i}").into_bytes()
        };
        entries.push(put(i + 2, format!("key-{i:04}").as_bytes(), &value));
    }
    sm.apply(&entries).unwrap();
    sm
}

fn store(vfs: Arc<dyn Vfs>) -> SnapshotStore {
    SnapshotStore::open(
        vfs,
        Path::new("/data"),
        SnapshotOptions {
            keep: 2,
            chunk_target_bytes: 1024,
        },
    )
    .unwrap()
}

#[test]
fn names_round_trip_and_reject_strangers() {
    assert_eq!(file_name(0x10, 3), "0000000000000003-0000000000000010.snap");
    assert_eq!(
        parse_file_name("0000000000000003-0000000000000010.snap"),
        Some((0x10, 3))
    );
    for bad in [
        "0000000000000003-0000000000000010.snap.tmp",
        "0000000000000003-000000000000010.snap",
        "000000000000000G-0000000000000010.snap",
        "000000000000000A-0000000000000010.snap",
        "0000000000000003-0000000000000010.snap.broken",
        "x.snap",
    ] {
        assert_eq!(parse_file_name(bad), None, "{bad}");
    }
}

#[test]
fn create_verify_install_round_trip() {
    let sim = SimFs::new();
    let store = store(Arc::new(sim.clone()));
    let src_dir = tempfile::tempdir().unwrap();
    let src = filled(src_dir.path(), 300);
    let created = store.create(&src).unwrap();
    assert_eq!(created.meta.index, 301);
    assert_eq!(created.meta.membership, Membership::with_voters([1, 2, 3]));
    assert_eq!(created.file.name, file_name(301, 2));
    // 300 keys, 300 watch-history records of their puts and the compact revision.
    assert_eq!(created.header.key_count, 300 + 300 + 1);
    // Small chunks: the data spans many of them, the 5000-byte value alone in one.
    assert!(created.header.chunk_count > 10);
    let want = all_pairs(&src);
    // Pairs are internal keys (`d` ‖ key) and records (32 bytes of revisions ‖ value), each
    // key's history record (13-byte key; kind, key length, key, record) and the 25 bytes of
    // the history state (`c/history` → compact revision and bytes).
    let kv_bytes: usize = want
        .iter()
        .map(|(k, v)| (1 + k.len() + 32 + v.len()) + (13 + 5 + k.len() + 32 + v.len()))
        .sum::<usize>()
        + 9
        + 16;
    assert_eq!(created.header.kv_bytes, kv_bytes as u64);
    assert_eq!(
        created.header.file_bytes,
        sim.read(&created.file.path).unwrap().len() as u64
    );

    let listed = store.list().unwrap();
    assert_eq!(listed, vec![created.file.clone()]);
    let verified = store.verify(&listed[0]).unwrap();
    assert_eq!(verified.meta, created.meta);

    let dst_dir = tempfile::tempdir().unwrap();
    let dst = sm_in(dst_dir.path());
    dst.apply(&[put(1, b"stale", b"x")]).unwrap();
    let meta = store.install(&listed[0], &dst).unwrap();
    assert_eq!(meta, created.meta);
    assert_eq!(dst.applied(), created.meta);
    assert_eq!(all_pairs(&dst), want);
}

#[test]
fn empty_state_round_trips() {
    let sim = SimFs::new();
    let store = store(Arc::new(sim));
    let dir = tempfile::tempdir().unwrap();
    let sm = sm_in(dir.path());
    let created = store.create(&sm).unwrap();
    assert_eq!(
        created.header.key_count, 1,
        "the history's compact revision alone"
    );
    assert_eq!(created.header.chunk_count, 3);
    let dst_dir = tempfile::tempdir().unwrap();
    let dst = sm_in(dst_dir.path());
    store.install(&created.file, &dst).unwrap();
    assert!(all_pairs(&dst).is_empty());
}

#[test]
fn keeps_the_two_newest() {
    let sim = SimFs::new();
    let store = store(Arc::new(sim));
    let dir = tempfile::tempdir().unwrap();
    let sm = filled(dir.path(), 5);
    let mut names = Vec::new();
    for i in 0..4u64 {
        sm.apply(&[put(7 + i, b"k", &i.to_le_bytes())]).unwrap();
        names.push(store.create(&sm).unwrap().file.name);
    }
    let listed: Vec<_> = store.list().unwrap().into_iter().map(|f| f.name).collect();
    assert_eq!(listed, names[2..].to_vec());
}

/// A crash after publishing a new file but before deleting the oldest leaves three files;
/// opening the store finishes the retain step (found by the kill -9 test).
#[test]
fn open_removes_snapshots_beyond_keep() {
    let sim = SimFs::new();
    let keep_all = SnapshotStore::open(
        Arc::new(sim.clone()),
        Path::new("/data"),
        SnapshotOptions {
            keep: 10,
            chunk_target_bytes: 1024,
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sm = filled(dir.path(), 5);
    let mut names = Vec::new();
    for i in 0..3u64 {
        sm.apply(&[put(7 + i, b"k", &i.to_le_bytes())]).unwrap();
        names.push(keep_all.create(&sm).unwrap().file.name);
    }
    assert_eq!(keep_all.list().unwrap().len(), 3);
    let reopened = store(Arc::new(sim));
    let listed: Vec<_> = reopened
        .list()
        .unwrap()
        .into_iter()
        .map(|f| f.name)
        .collect();
    assert_eq!(listed, names[1..].to_vec());
}

/// Every single-byte change and every truncation of a snapshot file is detected by `verify`,
/// and installing a damaged file leaves the state machine untouched.
#[test]
fn every_flipped_byte_and_every_truncation_is_detected() {
    let sim = SimFs::new();
    let store = store(Arc::new(sim.clone()));
    let dir = tempfile::tempdir().unwrap();
    let sm = filled(dir.path(), 20);
    let created = store.create(&sm).unwrap();
    let path = created.file.path.clone();
    let good = sim.read(&path).unwrap();
    assert!(good.len() > 5000);
    let dst_dir = tempfile::tempdir().unwrap();
    let dst = sm_in(dst_dir.path());
    dst.apply(&[put(1, b"mine", b"1")]).unwrap();
    // Every byte outside the 5000-byte value, and every 97th inside it.
    let value_at = good.windows(8).position(|w| w == [0xab; 8]).unwrap();
    for at in (0..good.len()).filter(|&i| !(value_at..value_at + 5000).contains(&i) || i % 97 == 0)
    {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        sim.overwrite(&path, bad).unwrap();
        assert!(
            matches!(
                store.verify(&created.file),
                Err(SnapshotError::Format { .. })
            ),
            "flipped byte {at} went unnoticed"
        );
        if at % 211 == 0 {
            assert!(store.install(&created.file, &dst).is_err());
            assert_eq!(dst.applied_index(), 1, "byte {at}");
            assert_eq!(all_pairs(&dst), vec![(b"mine".to_vec(), b"1".to_vec())]);
        }
    }
    for len in 0..good.len() {
        sim.overwrite(&path, good[..len].to_vec()).unwrap();
        assert!(
            store.verify(&created.file).is_err(),
            "truncation to {len} went unnoticed"
        );
    }
    sim.overwrite(&path, good).unwrap();
    store.verify(&created.file).unwrap();
}

#[test]
fn restore_skips_broken_snapshots_and_renames_them() {
    let sim = SimFs::new();
    let store = store(Arc::new(sim.clone()));
    let dir = tempfile::tempdir().unwrap();
    let sm = filled(dir.path(), 10);
    let older = store.create(&sm).unwrap();
    sm.apply(&[put(12, b"newer", b"1")]).unwrap();
    let newer = store.create(&sm).unwrap();
    let mut bytes = sim.read(&newer.file.path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    sim.overwrite(&newer.file.path, bytes).unwrap();

    let dst_dir = tempfile::tempdir().unwrap();
    let dst = sm_in(dst_dir.path());
    let meta = store.restore_newest(&dst, 0).unwrap().unwrap();
    assert_eq!(meta, older.meta);
    assert_eq!(dst.get(b"newer").unwrap().value, None);
    assert_eq!(store.list().unwrap(), vec![older.file.clone()]);
    let names = sim.list_dir(store.dir()).unwrap();
    assert!(names.contains(&format!("{}.broken", newer.file.name)));

    // With nothing valid left, restore says so rather than inventing a state.
    let mut bytes = sim.read(&older.file.path).unwrap();
    bytes[70] ^= 1;
    sim.overwrite(&older.file.path, bytes).unwrap();
    let empty_dir = tempfile::tempdir().unwrap();
    let empty = sm_in(empty_dir.path());
    assert_eq!(store.restore_newest(&empty, 0).unwrap(), None);
    assert_eq!(empty.applied_index(), 0);
}

/// A crash at every mutating step of creating a snapshot leaves the previous snapshots intact
/// and never a partial `.snap`; a temp file left behind is removed on open.
#[test]
fn crash_at_every_step_of_create_keeps_a_valid_set() {
    let dir = tempfile::tempdir().unwrap();
    let sm = filled(dir.path(), 40);
    let base = SimFs::new();
    let first = store(Arc::new(base.clone())).create(&sm).unwrap();
    sm.apply(&[put(42, b"second", b"2")]).unwrap();
    // Count the steps of a clean run on a copy of the disk.
    let steps = {
        let sim = SimFs::new();
        sim.create_dir_all(Path::new("/data/snap")).unwrap();
        let counting = CrashPointFs::new(Arc::new(sim), u64::MAX);
        store(Arc::new(counting.clone())).create(&sm).unwrap();
        counting.mutations_used()
    };
    assert!(
        steps >= 5,
        "a create has at least 5 durable steps, saw {steps}"
    );
    for budget in 0..=steps {
        let sim = SimFs::new();
        // The disk as it was before the second snapshot: the first, durable.
        let first_bytes = base.read(&first.file.path).unwrap();
        sim.create_dir_all(Path::new("/data/snap")).unwrap();
        let f = sim.open(&first.file.path, true).unwrap();
        f.write_all_at(&first_bytes, 0).unwrap();
        f.sync_data().unwrap();
        sim.sync_dir(Path::new("/data/snap")).unwrap();

        let dying = CrashPointFs::new(Arc::new(sim.clone()), budget);
        let result = store(Arc::new(dying)).create(&sm);
        assert_eq!(result.is_ok(), budget == steps, "budget {budget}");
        sim.crash();
        let reopened = store(Arc::new(sim.clone()));
        let names = sim.list_dir(reopened.dir()).unwrap();
        assert!(
            names.iter().all(|n| !n.ends_with(".tmp")),
            "budget {budget}: {names:?}"
        );
        let files = reopened.list().unwrap();
        assert!(!files.is_empty(), "budget {budget}: every snapshot lost");
        for file in &files {
            reopened
                .verify(file)
                .unwrap_or_else(|e| panic!("budget {budget}: {e}"));
        }
        assert_eq!(files[0], first.file, "budget {budget}");
    }
}

#[test]
fn a_snapshot_taken_under_load_matches_the_state_at_its_index() {
    let sim = SimFs::new();
    let store = store(Arc::new(sim));
    let dir = tempfile::tempdir().unwrap();
    let sm = filled(dir.path(), 2000);
    let model_at_s: BTreeMap<Vec<u8>, Vec<u8>> = all_pairs(&sm).into_iter().collect();
    let s = sm.applied_index();
    let created = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            // Overwrite and delete keys while the snapshot copies.
            let mut index = s;
            for round in 0..50u64 {
                let mut batch = Vec::new();
                for j in 0..20u64 {
                    index += 1;
                    let key = format!("key-{:04}", (round * 37 + j * 101) % 2100);
                    if j % 3 == 0 {
                        batch.push(Entry {
                            index,
                            term: 3,
                            kind: EntryKind::Normal,
                            payload: crate::command::Command::Delete {
                                key: key.into_bytes(),
                            }
                            .encode()
                            .unwrap()
                            .into(),
                        });
                    } else {
                        batch.push(put(index, key.as_bytes(), b"changed"));
                    }
                }
                sm.apply(&batch).unwrap();
            }
        });
        let created = store.create(&sm);
        writer.join().unwrap();
        created.unwrap()
    });
    // The snapshot's index is whatever was applied when it began; rebuild that state.
    assert!(created.meta.index >= s);
    let dst_dir = tempfile::tempdir().unwrap();
    let dst = sm_in(dst_dir.path());
    store.install(&created.file, &dst).unwrap();
    let mut model = model_at_s;
    let mut index = s;
    'rounds: for round in 0..50u64 {
        for j in 0..20u64 {
            index += 1;
            if index > created.meta.index {
                break 'rounds;
            }
            let key = format!("key-{:04}", (round * 37 + j * 101) % 2100).into_bytes();
            if j % 3 == 0 {
                model.remove(&key);
            } else {
                model.insert(key, b"changed".to_vec());
            }
        }
    }
    assert_eq!(all_pairs(&dst), model.into_iter().collect::<Vec<_>>());
}

/// A damaged snapshot file is found when the store opens (the node starts), set aside as
/// `.broken` with an error, and never listed for a restore or a send again.
#[test]
fn open_sets_aside_corrupt_snapshots_at_once() {
    let sim = SimFs::new();
    let first = store(Arc::new(sim.clone()));
    let dir = tempfile::tempdir().unwrap();
    let sm = filled(dir.path(), 10);
    let older = first.create(&sm).unwrap();
    sm.apply(&[put(12, b"newer", b"1")]).unwrap();
    let newer = first.create(&sm).unwrap();
    let mut bytes = sim.read(&newer.file.path).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x01;
    sim.overwrite(&newer.file.path, bytes).unwrap();

    let reopened = store(Arc::new(sim.clone()));
    assert_eq!(reopened.list().unwrap(), vec![older.file.clone()]);
    let names = sim.list_dir(reopened.dir()).unwrap();
    assert!(
        names.contains(&format!("{}.broken", newer.file.name)),
        "{names:?}"
    );
    // Nothing else to set aside on the next open.
    assert!(reopened.set_aside_corrupt().unwrap().is_empty());
}

/// Writes a round-1 snapshot file (format 1: user keys and raw values) into `store`'s
/// directory. The writer only writes the current format, so this streams the pairs through it
/// and then patches the header's version field to 1 and recomputes the header CRC (the body
/// CRC does not cover the header, so it stays valid). Test-only: no production code learns to
/// write an old format.
fn write_format_1_file(
    sim: &SimFs,
    store: &SnapshotStore,
    meta: &SnapshotMeta,
    pairs: &[(Vec<u8>, Vec<u8>)],
) -> SnapshotFile {
    let name = file_name(meta.index, meta.term);
    let path = store.dir().join(&name);
    let handle = sim.open(&path, true).unwrap();
    let mut writer = SnapshotFileWriter::new(handle, meta.clone(), 1024).unwrap();
    for (k, v) in pairs {
        writer.push(k, v).unwrap();
    }
    assert_eq!(writer.finish().unwrap().version, format::FORMAT_VERSION);
    let mut bytes = sim.read(&path).unwrap();
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32fast::hash(&bytes[0..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    sim.overwrite(&path, bytes).unwrap();
    SnapshotFile {
        name,
        path,
        index: meta.index,
        term: meta.term,
    }
}

#[test]
fn a_format_1_snapshot_file_still_installs() {
    let sim = SimFs::new();
    let store = store(Arc::new(sim.clone()));
    let meta = SnapshotMeta {
        index: 777,
        term: 5,
        membership: Membership::with_voters([1, 2, 3]),
    };
    // Raw values, including ones shorter than a record header and a 5000-byte one, and a
    // user key that looks like bookkeeping (in format 1 every pair is user data).
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..300u32)
        .map(|i| {
            let value = match i {
                3 => vec![0xab; 5000],
                7 => Vec::new(),
                _ => format!("v{i}").into_bytes(),
            };
            (format!("key-{i:04}").into_bytes(), value)
        })
        .collect();
    pairs.push((b"m/applied".to_vec(), b"user data".to_vec()));
    let file = write_format_1_file(&sim, &store, &meta, &pairs);
    assert_eq!(store.list().unwrap(), vec![file.clone()]);
    let verified = store.verify(&file).unwrap();
    assert_eq!(verified.header.version, 1);
    assert_eq!(verified.header.key_count, 301);
    assert_eq!(verified.meta, meta);

    let dir = tempfile::tempdir().unwrap();
    let sm = sm_in(dir.path());
    sm.apply(&[put(1, b"stale", b"x")]).unwrap();
    assert_eq!(store.install(&file, &sm).unwrap(), meta);
    assert_eq!(sm.applied(), meta);
    assert_eq!(all_pairs(&sm), pairs);
    let (records, _) = sm
        .scan_records(Bound::Unbounded, Bound::Unbounded, 10_000, usize::MAX)
        .unwrap()
        .value;
    assert_eq!(records.len(), 301);
    assert!(records
        .iter()
        .all(|r| (r.create_revision, r.mod_revision, r.version) == (777, 777, 1)));
    assert_eq!(sm.sessions_summary().count, 0);
    // The log continues after it, carrying the revisions on.
    sm.apply(&[put(778, b"key-0003", b"new")]).unwrap();
    let r = sm.get_record(b"key-0003").unwrap().value.unwrap();
    assert_eq!(
        (r.create_revision, r.mod_revision, r.version),
        (777, 778, 2)
    );
    // A snapshot taken from it is format 2 and carries those revisions on.
    let again = store.create(&sm).unwrap();
    assert_eq!(again.header.version, format::FORMAT_VERSION);
    let dst_dir = tempfile::tempdir().unwrap();
    let dst = sm_in(dst_dir.path());
    store.install(&again.file, &dst).unwrap();
    assert_eq!(dst.get_record(b"key-0003").unwrap().value.unwrap(), r);
    assert_eq!(
        dst.get_record(b"key-0100")
            .unwrap()
            .value
            .unwrap()
            .mod_revision,
        777
    );
}

/// A format-2 file may only hold state keys: a pair under `m/` (bookkeeping, which snapshots
/// leave out) is refused and the install changes nothing.
#[test]
fn a_format_2_file_with_a_bookkeeping_key_is_refused() {
    let sim = SimFs::new();
    let store = store(Arc::new(sim.clone()));
    let meta = SnapshotMeta {
        index: 50,
        term: 1,
        membership: Membership::with_voters([1]),
    };
    let path = store.dir().join(file_name(meta.index, meta.term));
    let mut writer =
        SnapshotFileWriter::new(sim.open(&path, true).unwrap(), meta.clone(), 1024).unwrap();
    writer.push(b"m/applied", &[0u8; 16]).unwrap();
    writer.finish().unwrap();
    let file = store.list().unwrap().pop().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sm = sm_in(dir.path());
    sm.apply(&[put(1, b"mine", b"1")]).unwrap();
    assert!(store.install(&file, &sm).is_err());
    assert_eq!(sm.applied_index(), 1);
    assert_eq!(all_pairs(&sm), vec![(b"mine".to_vec(), b"1".to_vec())]);
}
