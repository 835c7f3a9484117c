//! WAL behaviour: round trips, reopen after every operation, rotation, purge, truncation,
//! snapshot reset, and failures injected through [`SimFs`].
//!
//! The exhaustive damage tests (every byte offset, every bit) live in `storage/tests/`.

use super::*;
use crate::types::{EntryKind, Membership};
use crate::vfs::{Fault, SimFs};

pub(crate) fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::Normal,
        payload: format!("command-{index}-{term}").into_bytes().into(),
    }
}

fn entries(lo: u64, hi: u64, term: u64) -> Vec<Entry> {
    (lo..hi).map(|i| entry(i, term)).collect()
}

fn small() -> WalOptions {
    WalOptions {
        segment_bytes_max: 1024,
        record_bytes_max: 4096,
        preallocate: true,
        prepare_ahead: false,
    }
}

fn dir() -> PathBuf {
    PathBuf::from("/node/wal")
}

fn open(fs: &SimFs) -> Wal {
    Wal::open_with(Arc::new(fs.clone()), &dir(), small()).unwrap()
}

fn all(wal: &Wal) -> Vec<Entry> {
    if wal.last_index() < wal.first_index() {
        return Vec::new();
    }
    wal.entries(wal.first_index(), wal.last_index() + 1, usize::MAX)
        .unwrap()
}

fn meta(index: u64, term: u64) -> SnapshotMeta {
    SnapshotMeta {
        index,
        term,
        membership: Membership::with_voters([1, 2, 3]),
    }
}

#[test]
fn new_wal_is_empty_and_reopens_empty() {
    let fs = SimFs::new();
    let wal = open(&fs);
    assert_eq!((wal.first_index(), wal.last_index()), (1, 0));
    assert_eq!(wal.term(0), Some(0));
    assert_eq!(wal.hard_state(), HardState::default());
    drop(wal);
    fs.crash();
    let wal = open(&fs);
    assert_eq!((wal.first_index(), wal.last_index()), (1, 0));
}

#[test]
fn append_round_trips_and_survives_crash() {
    let fs = SimFs::new();
    let mut wal = open(&fs);
    let hs = HardState {
        term: 2,
        vote: Some(3),
        commit: 4,
    };
    wal.append(&entries(1, 6, 2), Some(&hs)).unwrap();
    assert_eq!(all(&wal), entries(1, 6, 2));
    assert_eq!(wal.hard_state(), hs);
    drop(wal);
    fs.crash();
    let wal = open(&fs);
    assert_eq!(all(&wal), entries(1, 6, 2));
    assert_eq!(wal.hard_state(), hs);
    assert_eq!(wal.term(5), Some(2));
    assert_eq!(wal.term(6), None);
}

#[test]
fn one_write_and_one_sync_per_append() {
    let fs = SimFs::new();
    let mut wal = open(&fs);
    let (w0, s0) = (fs.write_count(), fs.sync_count());
    let hs = HardState {
        term: 1,
        vote: None,
        commit: 0,
    };
    wal.append(&entries(1, 20, 1), Some(&hs)).unwrap();
    assert_eq!(fs.write_count() - w0, 1);
    assert_eq!(fs.sync_count() - s0, 1);
}

#[test]
fn rotation_keeps_every_segment_readable_on_its_own() {
    let fs = SimFs::new();
    let mut wal = open(&fs);
    let hs = HardState {
        term: 1,
        vote: Some(1),
        commit: 0,
    };
    wal.append(&[], Some(&hs)).unwrap();
    for i in 1..=100 {
        wal.append(&[entry(i, 1)], None).unwrap();
    }
    let segs = wal.segments();
    assert!(segs.len() > 3, "1 KiB segments must rotate: {segs:?}");
    for pair in segs.windows(2) {
        assert_eq!(pair[1].seq, pair[0].seq + 1);
        assert!(pair[1].first_index > pair[0].first_index);
    }
    drop(wal);
    fs.crash();
    let wal = open(&fs);
    assert_eq!(all(&wal), entries(1, 101, 1));
    assert_eq!(wal.hard_state(), hs);
    assert_eq!(wal.segments().len(), segs.len());
}

#[test]
fn conflicting_append_replaces_the_suffix_and_reopens_the_same() {
    let fs = SimFs::new();
    let mut wal = open(&fs);
    wal.append(&entries(1, 40, 1), None).unwrap();
    // A new leader at term 3 overwrites from index 10, across segment boundaries.
    wal.append(&entries(10, 15, 3), None).unwrap();
    let mut want = entries(1, 10, 1);
    want.extend(entries(10, 15, 3));
    assert_eq!(all(&wal), want);
    assert_eq!(wal.last_index(), 14);
    wal.truncate_suffix(12).unwrap();
    want.truncate(11);
    assert_eq!(all(&wal), want);
    drop(wal);
    fs.crash();
    let wal = open(&fs);
    assert_eq!(all(&wal), want);
}

#[test]
fn invalid_appends_are_rejected_without_writing() {
    let fs = SimFs::new();
    let mut wal = open(&fs);
    wal.append(&entries(1, 5, 2), None).unwrap();
    let syncs = fs.sync_count();
    assert!(matches!(
        wal.append(&[entry(7, 2)], None),
        Err(WalError::Invalid(_))
    ));
    assert!(matches!(
        wal.append(&[entry(5, 1)], None),
        Err(WalError::Invalid(_))
    ));
    assert!(matches!(
        wal.append(&[entry(5, 2), entry(7, 2)], None),
        Err(WalError::Invalid(_))
    ));
    let old_term = HardState {
        term: 1,
        vote: None,
        commit: 0,
    };
    wal.append(
        &[],
        Some(&HardState {
            term: 2,
            ..old_term
        }),
    )
    .unwrap();
    assert!(matches!(
        wal.append(&[], Some(&old_term)),
        Err(WalError::Invalid(_))
    ));
    let huge = Entry {
        payload: vec![0; 5000].into(),
        ..entry(5, 2)
    };
    assert!(matches!(
        wal.append(&[huge], None),
        Err(WalError::TooLarge { .. })
    ));
    assert_eq!(fs.sync_count(), syncs + 1);
    assert_eq!(wal.last_index(), 4);
}

#[test]
fn snapshot_marker_purge_and_reopen() {
    let fs = SimFs::new();
    let mut wal = open(&fs);
    for i in 1..=200 {
        wal.append(&[entry(i, 1)], None).unwrap();
    }
    let before = wal.segments().len();
    assert!(
        matches!(wal.purge(50), Err(WalError::Invalid(_))),
        "no snapshot yet"
    );
    wal.record_snapshot(&meta(150, 1)).unwrap();
    let report = wal.purge(100).unwrap();
    assert!(report.segments_removed > 0);
    let first = wal.first_index();
    assert!(first > 1 && first <= 101, "first index {first}");
    assert_eq!(wal.term(first - 1), Some(1));
    assert!(matches!(
        wal.entries(1, 2, 100),
        Err(WalError::Compacted { .. })
    ));
    assert_eq!(wal.segments().len(), before - report.segments_removed);
    assert!(matches!(wal.purge(151), Err(WalError::Invalid(_))));
    drop(wal);
    fs.crash();
    let wal = open(&fs);
    assert_eq!(wal.first_index(), first);
    assert_eq!(all(&wal), entries(first, 201, 1));
    assert_eq!(wal.snapshot(), Some(&meta(150, 1)));
}

#[test]
fn truncation_across_a_purged_boundary_replays() {
    // A truncate record pointing below the first remaining segment's first index (its
    // entries were purged later) must replay to the same log.
    let fs = SimFs::new();
    let mut wal = open(&fs);
    for i in 1..=60 {
        wal.append(&[entry(i, 1)], None).unwrap();
    }
    let active_first = wal.segments().last().unwrap().first_index;
    let from = active_first - 2;
    wal.append(&entries(from, from + 3, 2), None).unwrap();
    for i in from + 3..=from + 40 {
        wal.append(&[entry(i, 2)], None).unwrap();
    }
    wal.record_snapshot(&meta(from + 1, 2)).unwrap();
    wal.purge(from + 1).unwrap();
    let want = all(&wal);
    let first = wal.first_index();
    drop(wal);
    fs.crash();
    let wal = open(&fs);
    assert_eq!(wal.first_index(), first);
    assert_eq!(all(&wal), want);
}

#[test]
fn reset_to_snapshot_restarts_the_log() {
    let fs = SimFs::new();
    let mut wal = open(&fs);
    wal.append(&entries(1, 50, 1), None).unwrap();
    // The installed snapshot is ahead of our log and disagrees with its tail.
    wal.reset_to_snapshot(&meta(80, 4)).unwrap();
    assert_eq!((wal.first_index(), wal.last_index()), (81, 80));
    assert_eq!(wal.term(80), Some(4));
    assert_eq!(wal.segments().len(), 1, "older segments are gone");
    wal.append(&entries(81, 90, 4), None).unwrap();
    drop(wal);
    fs.crash();
    let wal = open(&fs);
    assert_eq!(wal.first_index(), 81);
    assert_eq!(all(&wal), entries(81, 90, 4));
    assert_eq!(wal.snapshot(), Some(&meta(80, 4)));
}

#[test]
fn reset_is_durable_even_if_the_crash_comes_before_old_segments_go() {
    let fs = SimFs::new();
    let mut wal = open(&fs);
    wal.append(&entries(1, 50, 1), None).unwrap();
    // Make the reset's directory sync fail after the reset records are durable.
    fs.fail_after(Fault::SyncError, 2);
    let _ = wal.reset_to_snapshot(&meta(30, 2));
    drop(wal);
    fs.clear_faults();
    fs.crash();
    let wal = open(&fs);
    // Either the reset is durable (log restarts at 31) or it never happened.
    if wal.first_index() == 31 {
        assert_eq!(wal.last_index(), 30);
        assert_eq!(wal.term(30), Some(2));
    } else {
        assert_eq!(all(&wal), entries(1, 50, 1));
    }
}

#[test]
fn failed_write_or_sync_never_leaves_memory_ahead_of_disk() {
    for fault in [Fault::WriteError, Fault::ShortWrite, Fault::SyncError] {
        let fs = SimFs::new();
        let mut wal = open(&fs);
        wal.append(&entries(1, 10, 1), None).unwrap();
        fs.fail_after(fault, 1);
        let err = wal.append(&entries(10, 20, 1), None).unwrap_err();
        assert!(matches!(err, WalError::Io { .. }), "{fault:?}: {err}");
        assert_eq!(wal.last_index(), 9, "{fault:?}: index moved past the disk");
        // Poisoned: nothing more is accepted, reads still work.
        assert!(matches!(
            wal.append(&[entry(10, 1)], None),
            Err(WalError::Poisoned(_))
        ));
        assert_eq!(all(&wal), entries(1, 10, 1));
        drop(wal);
        fs.crash();
        let mut wal = open(&fs);
        assert_eq!(all(&wal), entries(1, 10, 1), "{fault:?}");
        wal.append(&entries(10, 12, 1), None).unwrap();
        assert_eq!(wal.last_index(), 11);
    }
}

#[test]
fn a_short_write_without_crash_is_cut_as_a_torn_tail_on_reopen() {
    let fs = SimFs::new();
    let mut wal = open(&fs);
    wal.append(&entries(1, 4, 1), None).unwrap();
    fs.fail_after(Fault::ShortWrite, 1);
    // Three equal records: half the write ends inside the second one.
    assert!(wal.append(&entries(4, 7, 1), None).is_err());
    drop(wal);
    // No crash: the half-written bytes are still in the file.
    let wal = open(&fs);
    assert_eq!(all(&wal), entries(1, 5, 1));
    let (torn, broken) = wal
        .recovery_report()
        .torn_tail
        .clone()
        .expect("the half record is a torn tail");
    assert!(torn.bytes > 0);
    assert_eq!(
        fs.read(&broken).unwrap().len() as u64,
        torn.bytes,
        "torn bytes are copied aside"
    );
}

#[test]
fn torn_crashes_recover_a_prefix_of_the_appends() {
    for seed in 0..200u64 {
        let fs = SimFs::new();
        let mut wal = open(&fs);
        wal.append(&entries(1, 5, 1), None).unwrap();
        let durable = 4;
        // Writes that were issued but whose fsync never completed: simulate by failing
        // the sync, which leaves the unsynced bytes for a torn crash to keep or drop.
        let mut model = entries(1, 5, 1);
        for i in 5..15 {
            wal.append(&[entry(i, 1)], None).unwrap();
            model.push(entry(i, 1));
        }
        fs.fail_after(Fault::SyncError, 1);
        let _ = wal.append(&entries(15, 30, 2), None);
        drop(wal);
        fs.crash_torn(seed);
        let wal = Wal::open_with(Arc::new(fs.clone()), &dir(), small())
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let got = all(&wal);
        assert!(got.len() >= durable, "seed {seed}: lost synced entries");
        assert!(got.len() >= model.len(), "seed {seed}: lost synced entries");
        assert_eq!(&got[..model.len()], &model[..], "seed {seed}");
    }
}

#[test]
fn commit_beyond_the_log_is_clamped() {
    // The WAL writes a batch's hard state after its entries, so this takes a hand-made file:
    // a hard state whose commit index points past the last entry.
    let fs = SimFs::new();
    drop(open(&fs));
    let hs = HardState {
        term: 1,
        vote: None,
        commit: 9,
    };
    let name = segment_file_name(0, 1);
    let mut b = Vec::new();
    record::encode_segment_header(
        &mut b,
        &SegmentHeader {
            seq: 0,
            first_index: 1,
            prev_term: 0,
        },
    );
    record::encode_hard_state(&mut b, 0, &HardState::default());
    for e in entries(1, 6, 1) {
        record::encode_entry(&mut b, 0, &e);
    }
    record::encode_hard_state(&mut b, 0, &hs);
    b.resize(b.len() + 64, 0);
    fs.overwrite(&dir().join(&name), b).unwrap();
    let wal = open(&fs);
    assert_eq!(wal.last_index(), 5);
    assert_eq!(wal.hard_state().commit, 5);
    assert_eq!(wal.recovery_report().commit_clamped_from, Some(9));
}

#[test]
fn missing_middle_segment_is_refused_with_location() {
    let fs = SimFs::new();
    let mut wal = open(&fs);
    for i in 1..=100 {
        wal.append(&[entry(i, 1)], None).unwrap();
    }
    let segs = wal.segments();
    drop(wal);
    fs.remove_file(&dir().join(&segs[1].name)).unwrap();
    fs.sync_dir(&dir()).unwrap();
    let err = Wal::open_with(Arc::new(fs.clone()), &dir(), small()).unwrap_err();
    let WalError::Corrupt(c) = err else {
        panic!("expected corruption, got {err}")
    };
    assert!(c.reason.contains("missing"), "{c}");
    assert_eq!(c.file, dir().join(&segs[2].name));
}

#[test]
fn stray_temp_files_are_removed_on_open() {
    let fs = SimFs::new();
    let wal = open(&fs);
    drop(wal);
    let tmp = dir().join("0000000000000001-0000000000000001.wal.tmp");
    let f = fs.open(&tmp, true).unwrap();
    f.write_all_at(b"half a rotation", 0).unwrap();
    f.sync_data().unwrap();
    fs.sync_dir(&dir()).unwrap();
    let wal = open(&fs);
    assert!(!fs.exists(&tmp));
    assert_eq!(wal.recovery_report().temp_files_removed.len(), 1);
}

#[test]
fn real_disk_round_trip_with_mmap_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = WalOptions {
        segment_bytes_max: 64 << 10,
        ..WalOptions::default()
    };
    let mut wal = Wal::open(tmp.path(), opts).unwrap();
    for chunk in 0..50u64 {
        let batch: Vec<Entry> = (chunk * 40 + 1..=chunk * 40 + 40)
            .map(|i| Entry {
                payload: vec![(i % 251) as u8; 256].into(),
                ..entry(i, 1 + chunk / 10)
            })
            .collect();
        wal.append(&batch, None).unwrap();
    }
    assert!(wal.segments().len() > 5);
    let want = all(&wal);
    assert_eq!(want.len(), 2000);
    drop(wal);
    let wal = Wal::open(tmp.path(), opts).unwrap();
    assert_eq!(all(&wal), want);
    assert_eq!(
        wal.entries(1, 2001, 10_000).unwrap().len(),
        10_000 / 273 + 1
    );
}

#[test]
fn a_torn_append_never_leaves_a_commit_index_over_the_suffix_it_replaced() {
    // A follower holds 1..=3 (3 from an old leader, term 2), commit 2, and receives entry 3 of
    // term 3 with commit 3 in one batch. Whatever prefix of that write survives a crash, the
    // stale entry 3 must never sit below the durable commit index.
    for seed in 0..300u64 {
        let fs = SimFs::new();
        let mut wal = open(&fs);
        let hs = |term, commit| HardState {
            term,
            vote: Some(2),
            commit,
        };
        wal.append(&[entry(1, 1), entry(2, 2), entry(3, 2)], Some(&hs(2, 2)))
            .unwrap();
        // A short write leaves the first half of the batch unsynced on disk; the torn crash
        // keeps a random prefix of that half.
        fs.fail_after(Fault::ShortWrite, 1);
        let _ = wal.append(
            &[Entry {
                payload: vec![7; 64].into(),
                ..entry(3, 3)
            }],
            Some(&hs(3, 3)),
        );
        drop(wal);
        fs.clear_faults();
        if seed > 0 {
            fs.crash_torn(seed);
        }
        let wal = open(&fs);
        let commit = wal.hard_state().commit;
        if wal.term(3) == Some(2) {
            assert!(
                commit < 3,
                "seed {seed}: stale entry 3 below commit {commit}"
            );
        }
        assert!(commit <= wal.last_index(), "seed {seed}");
    }
}
