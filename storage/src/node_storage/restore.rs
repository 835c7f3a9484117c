//! Building a node's storage from a backup file, for a member of a new cluster.
//!
//! What a restored data dir holds is exactly what a member that installed the backup as a
//! leader's snapshot would hold, except that the membership is the new cluster's:
//! - `sm/`: the backup's pairs, applied position (index `S`, term `T`) and the new membership;
//! - `wal/`: a snapshot marker at (`S`, `T`, new membership), the log reset to start at `S + 1`,
//!   and the hard state (term `T`, no vote, commit `S`).
//!
//! A node started on it is not "fresh" (its WAL has a snapshot marker), so it restarts from
//! that marker as a member of the new cluster; every member restored from the same file
//! agrees on the log up to `S`, and the first election moves on to term `T + 1`. The backup's
//! pairs are verified as they stream in and the state is swapped in only once the whole file
//! verified; the caller builds into a directory of its own and publishes it (see
//! `raftkv::node::restore`).

use super::{NodeStorageError, NodeStorageOptions, SM_DIR_NAME, WAL_DIR_NAME};
use crate::sm::StateMachine;
use crate::snapshot::backup::{self, BackupError, BackupHeader, BackupReader};
use crate::types::{HardState, Membership, SnapshotMeta};
use crate::vfs::StdFs;
use crate::wal::Wal;
use std::path::Path;

/// What was restored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoredStorage {
    /// The backup's envelope (its cluster id is the *old* cluster's).
    pub backup: BackupHeader,
    /// The applied position and membership the data dir now starts from.
    pub meta: SnapshotMeta,
    pub key_count: u64,
    pub kv_bytes: u64,
}

fn refused(data_dir: &Path, why: String) -> NodeStorageError {
    NodeStorageError::Refused {
        data_dir: data_dir.to_path_buf(),
        why,
    }
}

/// Refuses a data dir whose `sm/` or `wal/` holds anything.
fn check_unused(data_dir: &Path) -> Result<(), NodeStorageError> {
    for name in [SM_DIR_NAME, WAL_DIR_NAME] {
        let dir = data_dir.join(name);
        let occupied = std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some());
        if occupied {
            return Err(refused(
                data_dir,
                format!(
                    "{} is not empty: a backup is restored only into a new data dir",
                    dir.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Streams the backup's pairs into a fresh tree of `sm` and swaps it in at `meta` once the
/// whole file verified; returns the number of pairs.
fn fill_state_machine(
    reader: &mut BackupReader,
    backup_path: &Path,
    sm: &StateMachine,
    meta: &SnapshotMeta,
) -> Result<u64, NodeStorageError> {
    assert!(
        sm.was_created() && sm.applied_index() == 0,
        "invariant: a restore starts from an empty state machine"
    );
    let mut builder = sm.begin_install()?;
    let damaged = |damage| BackupError::Damaged {
        path: backup_path.to_path_buf(),
        damage,
    };
    let version = reader.snapshot_header().version;
    while let Some((key, value)) = reader.next_pair().map_err(damaged)? {
        builder.insert_snapshot_pair(version, meta.index, key, value)?;
    }
    let key_count = builder.key_count();
    // The whole file verified (next_pair returned None): only now does the state change.
    builder.finish(meta)?;
    Ok(key_count)
}

/// A new WAL that starts right after `meta`: its snapshot marker, the log reset to
/// `meta.index + 1`, and the hard state (term `meta.term`, no vote, commit `meta.index`).
fn start_wal(
    data_dir: &Path,
    meta: &SnapshotMeta,
    opts: &NodeStorageOptions,
) -> Result<(), NodeStorageError> {
    let mut wal = Wal::open(&data_dir.join(WAL_DIR_NAME), opts.wal)?;
    if wal.last_index() != 0 || wal.snapshot().is_some() {
        return Err(refused(data_dir, "the WAL is not empty".into()));
    }
    wal.reset_to_snapshot(meta)?;
    let hard_state = HardState {
        term: meta.term,
        vote: None,
        commit: meta.index,
    };
    wal.append(&[], Some(&hard_state))?;
    Ok(())
}

/// Builds `sm/` and `wal/` in `data_dir` (neither may hold anything yet) from the backup at
/// `backup_path`, with `membership` as the new cluster's voters.
pub fn build_from_backup(
    backup_path: &Path,
    data_dir: &Path,
    membership: Membership,
    opts: &NodeStorageOptions,
) -> Result<RestoredStorage, NodeStorageError> {
    if membership.voters.is_empty() {
        return Err(refused(data_dir, "the new membership has no voters".into()));
    }
    check_unused(data_dir)?;
    let mut reader = backup::open(&StdFs, backup_path)?;
    let envelope = reader.header().clone();
    if envelope.index == 0 {
        return Err(refused(
            data_dir,
            "the backup is at index 0: it holds no committed state".into(),
        ));
    }
    let meta = SnapshotMeta {
        index: envelope.index,
        term: envelope.term,
        membership,
    };
    let sm = StateMachine::open(&data_dir.join(SM_DIR_NAME), opts.sm.clone())?;
    let key_count = fill_state_machine(&mut reader, backup_path, &sm, &meta)?;
    start_wal(data_dir, &meta, opts)?;
    sm.flush()?;
    tracing::info!(
        data_dir = %data_dir.display(),
        index = meta.index,
        term = meta.term,
        keys = key_count,
        voters = ?meta.membership.voters,
        "restored a backup"
    );
    Ok(RestoredStorage {
        backup: envelope,
        kv_bytes: reader.snapshot_header().kv_bytes,
        meta,
        key_count,
    })
}
