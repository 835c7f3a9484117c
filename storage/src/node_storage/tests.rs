use super::*;
use crate::command::Command;
use crate::crash_point::CrashPointFs;
use crate::types::EntryKind;
use crate::vfs::SimFs;
use std::collections::BTreeMap;
use std::ops::Bound;

/// The command at `index` in every test log: a pure function of the index.
fn command_at(index: u64) -> Command {
    let key = format!("k{:02}", (index * 7) % 50).into_bytes();
    if index.is_multiple_of(5) {
        Command::Delete { key }
    } else {
        Command::Put {
            key,
            value: format!("v{index}").into_bytes(),
        }
    }
}

fn entry_at(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        kind: EntryKind::Normal,
        payload: command_at(index).encode().unwrap().into(),
    }
}

fn model_upto(applied: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut m = BTreeMap::new();
    for i in 1..=applied {
        match command_at(i) {
            Command::Put { key, value } => {
                m.insert(key, value);
            }
            Command::Delete { key } => {
                m.remove(&key);
            }
            other => unreachable!("the workload writes only puts and deletes: {other:?}"),
        }
    }
    m
}

fn state(sm: &StateMachine) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let page = sm.scan(Bound::Unbounded, Bound::Unbounded, 10_000).unwrap();
    assert!(!page.value.more);
    page.value.pairs.into_iter().collect()
}

fn small_opts() -> NodeStorageOptions {
    NodeStorageOptions {
        wal: WalOptions {
            segment_bytes_max: 2048,
            record_bytes_max: 1 << 20,
            preallocate: true,
            prepare_ahead: false,
        },
        snapshot: SnapshotOptions {
            keep: 2,
            chunk_target_bytes: 256,
        },
        snapshot_every: 20,
        catchup_margin: 10,
        ..NodeStorageOptions::default()
    }
}

fn data() -> &'static Path {
    Path::new("/node")
}

/// Opens the storage, retrying sled's in-process lock briefly (see
/// [`crate::test_util::retry_sled_lock`]): these tests reopen right after a drop.
fn open(vfs: Arc<dyn Vfs>, sm_dir: &Path) -> Result<NodeStorage, NodeStorageError> {
    crate::test_util::retry_sled_lock(|| {
        NodeStorage::open_with(vfs.clone(), data(), sm_dir, small_opts())
    })
}

/// Appends `n` entries at term 1 with commit = last, applies them, compacts when due.
fn write(s: &mut NodeStorage, n: u64) -> Result<u64, NodeStorageError> {
    let first = s.wal().last_index() + 1;
    let entries: Vec<Entry> = (first..first + n).map(|i| entry_at(i, 1)).collect();
    let last = first + n - 1;
    s.append(
        &entries,
        Some(&HardState {
            term: 1,
            vote: Some(1),
            commit: last,
        }),
    )?;
    s.apply_committed(last)?;
    if s.compaction_due() {
        s.compact(None)?;
    }
    Ok(last)
}

fn check_consistent(s: &NodeStorage, context: &str) {
    let applied = s.sm().applied_index();
    assert_eq!(applied, s.wal().last_index(), "{context}: applied vs WAL");
    assert_eq!(
        applied,
        s.wal().hard_state().commit,
        "{context}: applied vs commit"
    );
    assert_eq!(state(s.sm()), model_upto(applied), "{context}: state");
}

#[test]
fn fresh_open_write_reopen_replays_nothing() {
    let sim = SimFs::new();
    let sm_dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(Arc::new(sim.clone()), sm_dir.path()).unwrap();
        assert_eq!(s.recovery().replayed_entries, 0);
        write(&mut s, 15).unwrap();
        check_consistent(&s, "before reopen");
    }
    let s = open(Arc::new(sim), sm_dir.path()).unwrap();
    check_consistent(&s, "after reopen");
    assert_eq!(s.recovery().replayed_entries, 0);
    assert_eq!(s.recovery().sm_applied_at_open, 15);
}

#[test]
fn recovery_replays_committed_entries_after_the_applied_index() {
    let sim = SimFs::new();
    let sm_dir = tempfile::tempdir().unwrap();
    {
        let mut s = open(Arc::new(sim.clone()), sm_dir.path()).unwrap();
        write(&mut s, 10).unwrap();
        // 8 more entries, committed but only 3 applied before the "crash".
        let entries: Vec<Entry> = (11..=18).map(|i| entry_at(i, 1)).collect();
        s.append(
            &entries,
            Some(&HardState {
                term: 1,
                vote: Some(1),
                commit: 18,
            }),
        )
        .unwrap();
        s.apply_committed(13).unwrap();
        // And 2 appended but never committed: they must not be applied.
        let tail: Vec<Entry> = (19..=20).map(|i| entry_at(i, 1)).collect();
        s.append(&tail, None).unwrap();
    }
    let s = open(Arc::new(sim), sm_dir.path()).unwrap();
    assert_eq!(s.recovery().sm_applied_at_open, 13);
    assert_eq!(s.recovery().replayed_entries, 5);
    assert_eq!(s.sm().applied_index(), 18);
    assert_eq!(state(s.sm()), model_upto(18));
    // The core restarts with the applied entries described (terms, sizes), not loaded.
    let restart = s.restart_state().unwrap();
    assert_eq!(restart.applied, 18);
    assert_eq!(
        (restart.prefix.first_index, restart.prefix.last_index()),
        (1, Some(18))
    );
    assert_eq!(restart.prefix.term_runs, vec![(1, 1)]);
    assert_eq!(
        restart.prefix.sizes[12] as usize,
        entry_at(13, 1).size_bytes()
    );
    assert!(restart.prefix.configs.is_empty());
    let held: Vec<u64> = restart.entries.iter().map(|e| e.index).collect();
    assert_eq!(held, vec![19, 20]);
    assert_eq!(
        s.read_entries(12, 14).unwrap(),
        (12..=14).map(|i| entry_at(i, 1)).collect::<Vec<_>>()
    );
}

#[test]
fn wal_stays_bounded_after_many_compactions() {
    let sim = SimFs::new();
    let sm_dir = tempfile::tempdir().unwrap();
    let mut s = open(Arc::new(sim), sm_dir.path()).unwrap();
    let opts = small_opts();
    // 20 × snapshot_every entries, in batches of 4.
    for _ in 0..(20 * opts.snapshot_every / 4) {
        write(&mut s, 4).unwrap();
    }
    let applied = s.sm().applied_index();
    assert_eq!(applied, 20 * opts.snapshot_every);
    let marker = s.wal().snapshot().unwrap().index;
    assert!(marker + opts.snapshot_every > applied);
    // Entries held: at most the margin, what was written since the marker, and two
    // segments' worth (the one the purge point falls in, and the active one).
    let segments = s.wal().segments();
    let per_segment = segments
        .windows(2)
        .map(|w| w[1].first_index - w[0].first_index)
        .max()
        .unwrap();
    let held = s.wal().last_index() + 1 - s.wal().first_index();
    assert!(
        held <= opts.catchup_margin + (applied - marker) + 2 * per_segment,
        "WAL holds {held} entries in {} segments of up to {per_segment}",
        segments.len()
    );
    check_consistent(&s, "after compactions");
}

#[test]
fn compaction_keeps_what_a_follower_still_needs_within_the_hold_bound() {
    let run = |hold_max: u64, floor: u64| {
        let mut opts = small_opts();
        opts.snapshot_every = 1_000; // only the explicit compaction below
        opts.catchup_hold_entries_max = hold_max;
        let sim = SimFs::new();
        let sm_dir = tempfile::tempdir().unwrap();
        let mut s = crate::test_util::retry_sled_lock(|| {
            NodeStorage::open_with(Arc::new(sim.clone()), data(), sm_dir.path(), opts.clone())
        })
        .unwrap();
        for _ in 0..10 {
            write(&mut s, 4).unwrap();
        }
        let report = s.compact(Some(floor)).unwrap();
        (
            report.purged_upto,
            s.wal().first_index(),
            opts.catchup_margin,
        )
    };
    // A follower needs the entries after 5: the purge stops there, not at S − margin = 30.
    let (purged_upto, first, _) = run(1_000, 5);
    assert_eq!(purged_upto, 5);
    assert!(first <= 6, "entry 6 is still in the WAL (first {first})");
    // A floor further below S than the hold bound is ignored: that follower gets a snapshot.
    let (purged_upto, _, margin) = run(3, 5);
    assert_eq!(purged_upto, 40 - margin);
}

#[test]
fn lost_sled_is_restored_from_the_newest_snapshot_then_replayed() {
    let sim = SimFs::new();
    let sm_dir = tempfile::tempdir().unwrap();
    let snap_index;
    {
        let mut s = open(Arc::new(sim.clone()), sm_dir.path()).unwrap();
        write(&mut s, 30).unwrap();
        snap_index = s.create_snapshot_file().unwrap().meta.index;
        write(&mut s, 8).unwrap();
    }
    assert_eq!(snap_index, 30);
    std::fs::remove_dir_all(sm_dir.path()).unwrap();
    let s = open(Arc::new(sim), sm_dir.path()).unwrap();
    assert_eq!(
        s.recovery().restored_snapshot.as_ref().map(|m| m.index),
        Some(30)
    );
    assert_eq!(s.recovery().replayed_entries, 8);
    check_consistent(&s, "restored");
}

#[test]
fn corrupt_sled_is_moved_aside_and_rebuilt() {
    let sim = SimFs::new();
    let sm_dir = tempfile::tempdir().unwrap();
    let sm_path = sm_dir.path().join("sm");
    {
        let mut s = open(Arc::new(sim.clone()), &sm_path).unwrap();
        write(&mut s, 12).unwrap();
        s.create_snapshot_file().unwrap();
        write(&mut s, 3).unwrap();
    }
    // Garbage where sled keeps its config: it will not open.
    std::fs::write(sm_path.join("conf"), b"not a sled config").unwrap();
    let s = open(Arc::new(sim), &sm_path).unwrap();
    assert_eq!(
        s.recovery().sm_moved_aside_to.as_deref(),
        Some(sm_dir.path().join("sm.broken").as_path())
    );
    check_consistent(&s, "rebuilt");
}

/// A node whose state machine is lost while its WAL (votes, log) survives: the open says a
/// snapshot is needed, and once one from the cluster is received into `snap/` the node
/// opens with the whole state and its log intact.
#[test]
fn a_lost_state_machine_needs_a_snapshot_and_rejoins_with_one() {
    let sim = SimFs::new();
    let sm_dir = tempfile::tempdir().unwrap();
    let (snapshot_bytes, hard_state, last_index) = {
        let mut s = open(Arc::new(sim.clone()), sm_dir.path()).unwrap();
        // No snapshot file, and compactions purge the WAL's head.
        for _ in 0..30 {
            write(&mut s, 4).unwrap();
        }
        assert!(s.wal().first_index() > 1);
        // What the leader would stream: a snapshot of the same committed state.
        let created = s.shared_snapshots().create(s.sm()).unwrap();
        let bytes = sim.read(&created.file.path).unwrap();
        crate::vfs::Vfs::remove_file(&sim, &created.file.path).unwrap();
        (bytes, s.wal().hard_state(), s.wal().last_index())
    };
    std::fs::remove_dir_all(sm_dir.path()).unwrap();
    let err = open(Arc::new(sim.clone()), sm_dir.path()).unwrap_err();
    let NodeStorageError::NeedsSnapshot { needed_index, .. } = err else {
        panic!("{err}");
    };
    assert!(needed_index > 0);

    let store = SnapshotStore::open(Arc::new(sim.clone()), data(), small_opts().snapshot).unwrap();
    // A truncated stream is refused and leaves nothing behind.
    let half = &snapshot_bytes[..snapshot_bytes.len() / 2];
    assert!(store.receive(&mut &half[..], 1 << 30).is_err());
    assert!(store.list().unwrap().is_empty());
    let got = store
        .receive(&mut snapshot_bytes.as_slice(), 1 << 30)
        .unwrap();
    assert!(got.meta.index >= needed_index);

    let s = open(Arc::new(sim), sm_dir.path()).unwrap();
    assert_eq!(s.wal().hard_state().term, hard_state.term, "votes kept");
    assert_eq!(s.wal().hard_state().vote, hard_state.vote, "votes kept");
    assert_eq!(s.wal().last_index(), last_index, "the log is kept");
    assert_eq!(state(s.sm()), model_upto(s.sm().applied_index()));
}

#[test]
fn refuses_a_conflicting_term_and_an_empty_wal() {
    let sm_dir = tempfile::tempdir().unwrap();
    let term1 = SimFs::new();
    {
        let mut s = open(Arc::new(term1.clone()), sm_dir.path()).unwrap();
        write(&mut s, 10).unwrap();
    }
    // Another log with term 2 at the same indexes.
    let term2 = SimFs::new();
    {
        let other_sm = tempfile::tempdir().unwrap();
        let mut s = open(Arc::new(term2.clone()), other_sm.path()).unwrap();
        let entries: Vec<Entry> = (1..=12).map(|i| entry_at(i, 2)).collect();
        s.append(&entries, None).unwrap();
    }
    let err = open(Arc::new(term2), sm_dir.path()).unwrap_err();
    assert!(
        matches!(&err, NodeStorageError::Refused { why, .. } if why.contains("term")),
        "{err}"
    );
    let err = open(Arc::new(SimFs::new()), sm_dir.path()).unwrap_err();
    assert!(
        matches!(&err, NodeStorageError::Refused { why, .. } if why.contains("WAL is empty")),
        "{err}"
    );
}

/// Runs a fixed workload (appends, applies, compactions, snapshot files) until the file
/// system dies; returns the last index whose append returned Ok.
fn workload(vfs: Arc<dyn Vfs>, sm_dir: &Path, acked: &mut u64) -> Result<(), NodeStorageError> {
    let mut s = open(vfs, sm_dir)?;
    for round in 0..24u64 {
        *acked = write(&mut s, 1 + round % 4)?;
        if round % 8 == 5 {
            s.create_snapshot_file()?;
        }
    }
    Ok(())
}

/// A crash at every mutating step of the workload: reopening always yields exactly the state
/// after the durable committed prefix — every acknowledged entry, nothing applied twice. On
/// every third crash sled is lost as well: then recovery goes through a snapshot file, or
/// refuses with a clear error when the WAL was already purged past the newest one.
#[test]
fn crash_at_every_step_recovers_the_durable_committed_prefix() {
    let steps = {
        let sm_dir = tempfile::tempdir().unwrap();
        let counting = CrashPointFs::new(Arc::new(SimFs::new()), u64::MAX);
        let mut acked = 0;
        workload(Arc::new(counting.clone()), sm_dir.path(), &mut acked).unwrap();
        assert_eq!(acked, 60);
        counting.mutations_used()
    };
    assert!(steps > 50, "only {steps} steps");
    let mut refused_count = 0;
    let mut restored_count = 0;
    for budget in 0..steps {
        let context = format!(
            "crash after {budget} of {steps} steps (replay: cargo test -p raftkv-storage --lib node_storage::tests::crash_at_every_step)"
        );
        let sim = SimFs::new();
        let sm_dir = tempfile::tempdir().unwrap();
        let mut acked = 0;
        let dying = CrashPointFs::new(Arc::new(sim.clone()), budget);
        assert!(
            workload(Arc::new(dying), sm_dir.path(), &mut acked).is_err(),
            "{context}: the workload survived"
        );
        sim.crash();
        let lose_sled = budget % 3 == 2;
        if lose_sled {
            std::fs::remove_dir_all(sm_dir.path()).unwrap();
        }
        match open(Arc::new(sim.clone()), sm_dir.path()) {
            Ok(s) => {
                check_consistent(&s, &context);
                if s.recovery().restored_snapshot.is_some() {
                    restored_count += 1;
                }
                assert!(
                    s.sm().applied_index() >= acked,
                    "{context}: acknowledged {acked}, recovered {}",
                    s.sm().applied_index()
                );
                // Everything keeps working after recovery.
                let mut s = s;
                write(&mut s, 3).unwrap();
                check_consistent(&s, &context);
            }
            Err(NodeStorageError::NeedsSnapshot { needed_index, .. }) => {
                assert!(lose_sled, "{context}: needs a snapshot with sled intact");
                assert!(needed_index > 0, "{context}");
                refused_count += 1;
            }
            Err(e) => panic!("{context}: {e}"),
        }
    }
    assert!(
        restored_count > 0,
        "recovery through a snapshot file never happened"
    );
    eprintln!("{steps} crash points: {restored_count} recovered through a snapshot file, {refused_count} refused (WAL purged past the newest snapshot file)");
}

/// A follower installing a leader's snapshot file, crashed at every step of receiving it
/// and resetting its WAL: it reopens with either its old state or the snapshot's, never a
/// mix, and with a WAL that continues right after its applied index.
#[test]
fn crash_at_every_step_of_a_snapshot_install() {
    let leader_fs = SimFs::new();
    let leader_sm = tempfile::tempdir().unwrap();
    let snap = {
        let mut leader = open(Arc::new(leader_fs.clone()), leader_sm.path()).unwrap();
        write(&mut leader, 40).unwrap();
        leader.create_snapshot_file().unwrap()
    };
    let snap_bytes = leader_fs.read(&snap.file.path).unwrap();

    let receive_and_install = |vfs: Arc<dyn Vfs>, sm_dir: &Path| -> Result<(), NodeStorageError> {
        let mut f = open(vfs.clone(), sm_dir)?;
        let dir = f.snapshots().dir().to_path_buf();
        let tmp = dir.join(format!("{}.tmp", snap.file.name));
        let io = |source| NodeStorageError::Io {
            path: tmp.clone(),
            source,
        };
        let file = vfs.open(&tmp, true).map_err(io)?;
        file.write_all_at(&snap_bytes, 0).map_err(io)?;
        file.sync_data().map_err(io)?;
        drop(file);
        vfs.rename(&tmp, &dir.join(&snap.file.name)).map_err(io)?;
        vfs.sync_dir(&dir).map_err(io)?;
        let received = f
            .snapshots()
            .list()?
            .into_iter()
            .find(|x| x.name == snap.file.name)
            .expect("the received file is listed");
        f.install_snapshot(&received)?;
        write(&mut f, 2)?;
        Ok(())
    };

    let prepare = |sim: &SimFs, sm_dir: &Path| {
        let mut f = open(Arc::new(sim.clone()), sm_dir).unwrap();
        write(&mut f, 5).unwrap();
    };
    let steps = {
        let sim = SimFs::new();
        let sm_dir = tempfile::tempdir().unwrap();
        prepare(&sim, sm_dir.path());
        let counting = CrashPointFs::new(Arc::new(sim), u64::MAX);
        receive_and_install(Arc::new(counting.clone()), sm_dir.path()).unwrap();
        counting.mutations_used()
    };
    let mut finished_installs = 0;
    for budget in 0..steps {
        let context = format!("install crash after {budget} of {steps} steps");
        let sim = SimFs::new();
        let sm_dir = tempfile::tempdir().unwrap();
        prepare(&sim, sm_dir.path());
        let dying = CrashPointFs::new(Arc::new(sim.clone()), budget);
        assert!(receive_and_install(Arc::new(dying), sm_dir.path()).is_err());
        sim.crash();
        let f = open(Arc::new(sim), sm_dir.path()).unwrap();
        let applied = f.sm().applied_index();
        assert!(
            applied == 5 || applied >= 40,
            "{context}: applied {applied}"
        );
        assert_eq!(state(f.sm()), model_upto(applied), "{context}");
        assert_eq!(f.wal().last_index(), applied, "{context}");
        if applied >= 40 {
            assert_eq!(f.wal().first_index(), 41, "{context}");
        }
        if f.recovery().finished_install {
            finished_installs += 1;
        }
    }
    assert!(
        finished_installs > 0,
        "no crash fell between the state swap and the WAL reset"
    );
}

#[test]
fn a_second_open_of_a_live_data_dir_fails_without_touching_it() {
    let sim = SimFs::new();
    let sm_dir = tempfile::tempdir().unwrap();
    let sm_path = sm_dir.path().join("sm");
    let mut first = open(Arc::new(sim.clone()), &sm_path).unwrap();
    write(&mut first, 5).unwrap();
    let err = open(Arc::new(sim), &sm_path).unwrap_err();
    assert!(
        matches!(err, NodeStorageError::Sm(SmError::Sled(sled::Error::Io(_)))),
        "{err}"
    );
    assert!(!sm_dir.path().join("sm.broken").exists());
    check_consistent(&first, "the live node");
}
