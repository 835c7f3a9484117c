//! [`NodeStorage`]: one node's whole durable state — the WAL, the sled state machine and the
//! snapshot files — opened together with crash recovery, and compacted together.
//!
//! Layout of a data dir: `wal/` (segments), `sm/` (sled), `snap/` (snapshot files).
//!
//! **Recovery** ([`NodeStorage::open`]), in order:
//! 1. open sled (first: its file lock keeps a second process off a live data dir); if its
//!    files are damaged (sled reports corruption or an unsupported/corrupt config, or our
//!    bookkeeping does not verify), move it aside to `sm.broken[-N]` and start an empty one;
//!    any other error (an I/O error, sled's lock held by another process) stops the open;
//! 2. open the WAL (it refuses to open on damage other than a torn tail);
//! 3. if sled was missing or moved aside, or is behind the WAL's first index, restore the
//!    newest snapshot file above its applied index that verifies (a bad one is renamed
//!    `.broken`, the next older one tried);
//! 4. refuse to start if a gap remains between the applied index and the WAL's first index,
//!    if the applied index's term disagrees with the WAL's, or if the WAL is empty while
//!    the state machine is not (a wiped or foreign WAL: its votes are lost);
//! 5. if the state machine is *ahead* of a non-empty WAL, a snapshot install crashed between
//!    swapping the state and resetting the WAL: finish it (reset the WAL to the applied
//!    position);
//! 6. replay the committed entries after the applied index (up to the durable commit index),
//!    logging entries replayed and entries/s.
//!
//! **Compaction** ([`NodeStorage::compact`]), costing what was written since the last one,
//! never the size of the state:
//! 1. `sled flush` → the applied position `S` is durable in sled;
//! 2. WAL snapshot marker `S` + fsync → the log knows entries ≤ `S` may go;
//! 3. purge WAL segments wholly at or below `S − catchup_margin` — or below the leader's
//!    replication floor (a reachable follower still needs the entries after it) if that is
//!    lower and at most `catchup_hold_entries_max` below `S`.
//!
//! A crash between any two steps is harmless: before 2, recovery replays from sled's
//! (durable, ≥ `S`) applied index; before 3, nothing was removed; during 3, segments go oldest
//! first with a directory sync each, so the log stays contiguous.
//!
//! **Installing a leader's snapshot** ([`NodeStorage::install_snapshot`]): build and swap the
//! sled tree (durable), then reset the WAL to start after it. A crash in between is step 5.
//!
//! **Restoring a backup** into a new data dir: [`restore::build_from_backup`].

use crate::sm::{AppliedEntry, SmError, StateMachine, StateMachineOptions};
use crate::snapshot::{
    CreatedSnapshot, SnapshotError, SnapshotFile, SnapshotOptions, SnapshotStore,
};
use crate::types::{Entry, HardState, LogPrefix, SnapshotMeta};
use crate::vfs::{StdFs, Vfs};
use crate::wal::{Wal, WalError, WalOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The WAL's directory under a data dir.
pub const WAL_DIR_NAME: &str = "wal";

/// Restart reads the applied part of the WAL in chunks of about this many bytes.
const RESTART_CHUNK_BYTES: usize = 16 << 20;
/// sled's directory under a data dir.
pub const SM_DIR_NAME: &str = "sm";

/// Tuning of a node's storage.
#[derive(Clone, Debug)]
pub struct NodeStorageOptions {
    pub wal: WalOptions,
    pub sm: StateMachineOptions,
    pub snapshot: SnapshotOptions,
    /// Compact after this many applied entries (default 10,000).
    pub snapshot_every: u64,
    /// Entries kept in the WAL below the compaction point for lagging followers (default
    /// 5,000).
    pub catchup_margin: u64,
    /// How far below the compaction point the WAL may be kept for a follower that still
    /// needs it (see [`NodeStorage::compact`]); a follower further behind gets a snapshot.
    pub catchup_hold_entries_max: u64,
    /// The most entry bytes read from the WAL per apply batch during replay.
    pub replay_batch_bytes: usize,
}

impl Default for NodeStorageOptions {
    fn default() -> Self {
        NodeStorageOptions {
            wal: WalOptions::default(),
            sm: StateMachineOptions::default(),
            snapshot: SnapshotOptions::default(),
            snapshot_every: 10_000,
            catchup_margin: 5_000,
            catchup_hold_entries_max: 200_000,
            replay_batch_bytes: 4 << 20,
        }
    }
}

/// A failure of a node's storage.
#[derive(Debug, thiserror::Error)]
pub enum NodeStorageError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Sm(#[from] SmError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Backup(#[from] crate::snapshot::backup::BackupError),
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state machine is gone or behind the WAL's first entry, and no local snapshot file
    /// covers the gap. The WAL (votes, log) is intact, so the node may rejoin once a snapshot
    /// at index `needed_index` or later, fetched from the cluster, is stored in `snap/`.
    #[error("the state machine of {data_dir} is at index {applied_index} but the WAL starts at index {wal_first_index}: entries up to {needed_index} must come from a snapshot of the cluster")]
    NeedsSnapshot {
        data_dir: PathBuf,
        applied_index: u64,
        wal_first_index: u64,
        needed_index: u64,
    },
    /// The data dir is inconsistent in a way recovery must not paper over.
    #[error("refusing to start from {data_dir}: {why}")]
    Refused { data_dir: PathBuf, why: String },
}

/// What recovery found and did.
#[derive(Clone, Debug, Default)]
pub struct RecoveryStats {
    /// sled's applied index when opened (0 if it was missing or moved aside).
    pub sm_applied_at_open: u64,
    /// sled failed to open or verify and was moved here.
    pub sm_moved_aside_to: Option<PathBuf>,
    /// The snapshot file installed because sled was behind the WAL.
    pub restored_snapshot: Option<SnapshotMeta>,
    /// A crashed snapshot install was finished by resetting the WAL.
    pub finished_install: bool,
    /// Committed entries applied from the WAL.
    pub replayed_entries: u64,
    pub replay_elapsed: Duration,
    /// From the call to `open` to ready.
    pub total_elapsed: Duration,
}

/// What a node's consensus core restarts from: everything durable about the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartState {
    pub hard_state: HardState,
    /// The newest snapshot marker (`None`: the log was never compacted).
    pub snapshot: Option<SnapshotMeta>,
    /// The entries the WAL holds up to the applied index, described without their payloads
    /// (they may start before the snapshot's index: the WAL keeps a catch-up margin). The
    /// core leaves their payloads on disk and has them read back when a follower needs them.
    pub prefix: LogPrefix,
    /// The entries the WAL holds after the applied index (after the prefix), contiguous.
    pub entries: Vec<Entry>,
    /// The state machine's applied index (at least the snapshot's).
    pub applied: u64,
}

/// What a compaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactionReport {
    /// The applied position made durable and marked in the WAL.
    pub snapshot: SnapshotMeta,
    /// Segments wholly at or below this index were removed.
    pub purged_upto: u64,
    pub segments_removed: usize,
    /// The term of the entry at `purged_upto`, if the log still knows it (the consensus core
    /// may let go of its memory of the entries up to there).
    pub purged_upto_term: Option<u64>,
    /// The WAL's first index afterwards.
    pub wal_first_index: u64,
}

/// One node's WAL, state machine and snapshot files. See the module doc.
#[derive(Debug)]
pub struct NodeStorage {
    data_dir: PathBuf,
    wal: Wal,
    sm: Arc<StateMachine>,
    snapshots: Arc<SnapshotStore>,
    opts: NodeStorageOptions,
    compacted_at: u64,
    recovery: RecoveryStats,
}

fn refused(data_dir: &Path, why: String) -> NodeStorageError {
    NodeStorageError::Refused {
        data_dir: data_dir.to_path_buf(),
        why,
    }
}

/// Whether an error opening the state machine means its files are damaged (as opposed to
/// unreachable).
fn state_is_damaged(e: &SmError) -> bool {
    matches!(
        e,
        SmError::Corrupt { .. }
            | SmError::Sled(sled::Error::Corruption { .. })
            | SmError::Sled(sled::Error::Unsupported(_))
            | SmError::Sled(sled::Error::ReportableBug(_))
    )
}

/// Opens sled in `sm_dir`; if its files are damaged, moves it aside and opens a new one.
fn open_sm_or_move_aside(
    sm_dir: &Path,
    opts: &StateMachineOptions,
) -> Result<(StateMachine, Option<PathBuf>), NodeStorageError> {
    match StateMachine::open(sm_dir, opts.clone()) {
        Ok(sm) => Ok((sm, None)),
        // Only damage is a reason to rebuild. An I/O error (sled's lock held by another
        // process on the same data dir, permissions, a full disk) must stop the node instead:
        // moving a live node's state aside would be a disaster.
        Err(e) if !state_is_damaged(&e) => Err(e.into()),
        Err(e) => {
            let mut aside = sm_dir.with_extension("broken");
            let mut n = 1;
            while aside.exists() {
                aside = sm_dir.with_extension(format!("broken-{n}"));
                n += 1;
            }
            tracing::warn!(
                dir = %sm_dir.display(),
                moved_to = %aside.display(),
                error = %e,
                "state machine does not open or verify; moving it aside and rebuilding"
            );
            std::fs::rename(sm_dir, &aside).map_err(|source| NodeStorageError::Io {
                path: sm_dir.to_path_buf(),
                source,
            })?;
            let sm = StateMachine::open(sm_dir, opts.clone())?;
            Ok((sm, Some(aside)))
        }
    }
}

impl NodeStorage {
    /// Opens a node's storage in `data_dir` on the real disk, recovering as the module doc says.
    pub fn open(
        data_dir: &Path,
        opts: NodeStorageOptions,
    ) -> Result<NodeStorage, NodeStorageError> {
        NodeStorage::open_with(Arc::new(StdFs), data_dir, &data_dir.join(SM_DIR_NAME), opts)
    }

    /// Opens with the WAL and snapshot files on `vfs` under `data_dir`, and sled (always the
    /// real disk) in `sm_dir`.
    pub fn open_with(
        vfs: Arc<dyn Vfs>,
        data_dir: &Path,
        sm_dir: &Path,
        opts: NodeStorageOptions,
    ) -> Result<NodeStorage, NodeStorageError> {
        let started = Instant::now();
        // sled first: its lock keeps a second process on the same data dir from touching
        // anything (the WAL open may cut a torn tail).
        let (sm, moved_aside) = open_sm_or_move_aside(sm_dir, &opts.sm)?;
        let mut wal = Wal::open_with(vfs.clone(), &data_dir.join(WAL_DIR_NAME), opts.wal)?;
        let snapshots = SnapshotStore::open(vfs, data_dir, opts.snapshot.clone())?;
        let mut recovery = RecoveryStats {
            sm_applied_at_open: sm.applied_index(),
            sm_moved_aside_to: moved_aside,
            ..RecoveryStats::default()
        };

        let first = wal.first_index();
        let sm_rebuilt = sm.was_created() || recovery.sm_moved_aside_to.is_some();
        if sm_rebuilt || sm.applied_index() + 1 < first {
            recovery.restored_snapshot = snapshots.restore_newest(&sm, sm.applied_index())?;
        }
        let applied = sm.applied();
        let last = wal.last_index();
        if applied.index + 1 < first {
            return Err(NodeStorageError::NeedsSnapshot {
                data_dir: data_dir.to_path_buf(),
                applied_index: applied.index,
                wal_first_index: first,
                needed_index: first - 1,
            });
        }
        let wal_pristine =
            last == 0 && wal.snapshot().is_none() && wal.hard_state() == HardState::default();
        if applied.index > last {
            if wal_pristine {
                return Err(refused(
                    data_dir,
                    format!(
                        "the state machine is at index {} but the WAL is empty: its dir was wiped or replaced, and with it this node's votes",
                        applied.index
                    ),
                ));
            }
            if let Some(marker) = wal.snapshot() {
                if marker.index == applied.index && marker.term != applied.term {
                    return Err(refused(
                        data_dir,
                        format!(
                            "the state machine is at index {} term {}, the WAL's snapshot marker there has term {}",
                            applied.index, applied.term, marker.term
                        ),
                    ));
                }
            }
            tracing::warn!(
                applied_index = applied.index,
                wal_last_index = last,
                "the state machine is ahead of the WAL: finishing an interrupted snapshot install"
            );
            wal.reset_to_snapshot(&applied)?;
            recovery.finished_install = true;
        } else if let Some(term) = wal.term(applied.index) {
            if applied.index > 0 && term != applied.term && recovery.restored_snapshot.is_some() {
                // A snapshot holds only committed state. A WAL entry at its index with another
                // term diverged from the committed log there, so it and everything after it
                // never committed: the snapshot wins.
                tracing::warn!(
                    index = applied.index,
                    snapshot_term = applied.term,
                    wal_term = term,
                    "the WAL diverges from the restored snapshot at its index; resetting the WAL to the snapshot"
                );
                wal.reset_to_snapshot(&applied)?;
                recovery.finished_install = true;
            } else if applied.index > 0 && term != applied.term {
                return Err(refused(
                    data_dir,
                    format!(
                        "the state machine applied index {} at term {}, but the WAL has term {term} there",
                        applied.index, applied.term
                    ),
                ));
            }
        }

        let mut storage = NodeStorage {
            data_dir: data_dir.to_path_buf(),
            wal,
            sm: Arc::new(sm),
            snapshots: Arc::new(snapshots),
            compacted_at: 0,
            recovery,
            opts,
        };
        storage.compacted_at = storage
            .wal
            .snapshot()
            .map_or(0, |m| m.index)
            .min(storage.sm.applied_index());
        let replay_started = Instant::now();
        let commit = storage.wal.hard_state().commit;
        let from = storage.sm.applied_index();
        if commit > from {
            tracing::info!(
                from = from + 1,
                to = commit,
                "replaying committed WAL entries"
            );
        }
        storage.recovery.replayed_entries = storage.apply_committed_inner(commit, true)?;
        storage.recovery.replay_elapsed = replay_started.elapsed();
        storage.recovery.total_elapsed = started.elapsed();
        let r = &storage.recovery;
        tracing::info!(
            data_dir = %data_dir.display(),
            applied_index = storage.sm.applied_index(),
            replayed = r.replayed_entries,
            entries_per_s = (r.replayed_entries as f64 / r.replay_elapsed.as_secs_f64().max(1e-9)) as u64,
            replay_ms = r.replay_elapsed.as_millis() as u64,
            total_ms = r.total_elapsed.as_millis() as u64,
            "node storage recovered"
        );
        Ok(storage)
    }

    /// What recovery found and did.
    pub fn recovery(&self) -> &RecoveryStats {
        &self.recovery
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The WAL (reads: entries, terms, hard state).
    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// The durable hard state (term, vote, commit).
    pub fn hard_state(&self) -> HardState {
        self.wal.hard_state()
    }

    /// Whether nothing was ever written here: no entry, no snapshot, no vote. Only such a
    /// node may bootstrap a configuration (anything else must restart from what it has).
    pub fn is_fresh(&self) -> bool {
        let fresh = self.wal.last_index() == 0
            && self.wal.snapshot().is_none()
            && self.wal.hard_state() == HardState::default();
        debug_assert!(
            !fresh || self.sm.applied_index() == 0,
            "open refuses a state machine ahead of an empty WAL"
        );
        fresh
    }

    /// The durable log, hard state and applied index the consensus core restarts from.
    pub fn restart_state(&self) -> Result<RestartState, NodeStorageError> {
        let (first, last) = (self.wal.first_index(), self.wal.last_index());
        let applied = self.sm.applied_index();
        // Applied entries are read in bounded chunks and kept as terms and sizes only, so a
        // long uncompacted log does not come back into memory at restart.
        let mut prefix = LogPrefix::default();
        let mut next = first;
        while next <= last.min(applied) {
            let chunk = self
                .wal
                .entries(next, last.min(applied) + 1, RESTART_CHUNK_BYTES)?;
            assert!(!chunk.is_empty(), "a WAL read returns at least one entry");
            for e in &chunk {
                prefix.push(e);
            }
            next += chunk.len() as u64;
            // The chunk's mapped pages need not stay resident (one madvise per segment).
            self.wal.release_mapped_pages();
        }
        let entries = if last >= next {
            self.wal.entries(next, last + 1, usize::MAX)?
        } else {
            Vec::new()
        };
        debug_assert!(
            entries.windows(2).all(|w| w[1].index == w[0].index + 1),
            "the WAL's entries are contiguous"
        );
        let snapshot = self.wal.snapshot().cloned();
        debug_assert!(
            applied >= snapshot.as_ref().map_or(0, |m| m.index),
            "open replays up to the snapshot at least"
        );
        Ok(RestartState {
            hard_state: self.wal.hard_state(),
            snapshot,
            prefix,
            entries,
            applied,
        })
    }

    /// Entries `lo..=hi` from the WAL, for an append to a follower whose entries the
    /// consensus core no longer holds in memory.
    pub fn read_entries(&self, lo: u64, hi: u64) -> Result<Vec<Entry>, NodeStorageError> {
        assert!(lo <= hi, "an empty read");
        let entries = self.wal.entries(lo, hi + 1, usize::MAX)?;
        debug_assert_eq!(entries.len() as u64, hi - lo + 1, "a WAL read is whole");
        Ok(entries)
    }

    /// The state machine (reads, and the applied position).
    pub fn sm(&self) -> &StateMachine {
        &self.sm
    }

    /// The snapshot files.
    pub fn snapshots(&self) -> &SnapshotStore {
        &self.snapshots
    }

    /// The state machine, shared: reads and snapshot files may be served from other threads
    /// while this `NodeStorage` appends and applies.
    pub fn shared_sm(&self) -> Arc<StateMachine> {
        self.sm.clone()
    }

    /// The snapshot files, shared (a snapshot file can be written off the apply thread).
    pub fn shared_snapshots(&self) -> Arc<SnapshotStore> {
        self.snapshots.clone()
    }

    /// Appends to the WAL: one write, one fdatasync (see [`Wal::append`]).
    pub fn append(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<crate::wal::AppendStats, NodeStorageError> {
        Ok(self.wal.append(entries, hard_state)?)
    }

    /// Applies the WAL's entries after the applied index up to `commit` (which the caller
    /// knows to be committed), in batches of `replay_batch_bytes`.
    pub fn apply_committed(&mut self, commit: u64) -> Result<Vec<AppliedEntry>, NodeStorageError> {
        let mut out = Vec::new();
        let last = commit.min(self.wal.last_index());
        while self.sm.applied_index() < last {
            let lo = self.sm.applied_index() + 1;
            let batch = self
                .wal
                .entries(lo, last + 1, self.opts.replay_batch_bytes)?;
            out.extend(self.sm.apply(&batch)?);
        }
        Ok(out)
    }

    fn apply_committed_inner(
        &mut self,
        commit: u64,
        log_progress: bool,
    ) -> Result<u64, NodeStorageError> {
        let last = commit.min(self.wal.last_index());
        let started = Instant::now();
        let from = self.sm.applied_index();
        let mut next_log = from + 100_000;
        while self.sm.applied_index() < last {
            let lo = self.sm.applied_index() + 1;
            let batch = self
                .wal
                .entries(lo, last + 1, self.opts.replay_batch_bytes)?;
            self.sm.apply(&batch)?;
            let at = self.sm.applied_index();
            if log_progress && at >= next_log {
                let done = at - from;
                tracing::info!(
                    replayed = done,
                    remaining = last - at,
                    entries_per_s =
                        (done as f64 / started.elapsed().as_secs_f64().max(1e-9)) as u64,
                    "replaying"
                );
                next_log = at + 100_000;
            }
        }
        Ok(self.sm.applied_index() - from)
    }

    /// Whether `snapshot_every` entries were applied since the last compaction.
    pub fn compaction_due(&self) -> bool {
        self.sm.applied_index() >= self.compacted_at + self.opts.snapshot_every.max(1)
    }

    /// Compacts: sled flush, WAL snapshot marker + fsync, purge below `S − catchup_margin`
    /// (see the module doc) — or below `retain_after` (the leader's replication floor: a
    /// follower still needs the entries after it) if that is lower and within
    /// `catchup_hold_entries_max` of `S`. Costs what was written since the last compaction.
    pub fn compact(
        &mut self,
        retain_after: Option<u64>,
    ) -> Result<CompactionReport, NodeStorageError> {
        let snapshot = self.sm.flush()?;
        let marked = match self.wal.snapshot() {
            Some(m) => m.index >= snapshot.index,
            None => false,
        };
        if !marked {
            self.wal.record_snapshot(&snapshot)?;
        }
        let mut purged_upto = snapshot.index.saturating_sub(self.opts.catchup_margin);
        if let Some(floor) = retain_after {
            if snapshot.index.saturating_sub(floor) <= self.opts.catchup_hold_entries_max {
                purged_upto = purged_upto.min(floor);
            }
        }
        debug_assert!(purged_upto <= snapshot.index);
        let purge = self.wal.purge(purged_upto)?;
        self.compacted_at = snapshot.index;
        tracing::debug!(
            index = snapshot.index,
            purged_upto,
            segments_removed = purge.segments_removed,
            "compacted"
        );
        Ok(CompactionReport {
            purged_upto_term: self.wal.term(purged_upto),
            snapshot,
            purged_upto,
            segments_removed: purge.segments_removed,
            wal_first_index: purge.first_index,
        })
    }

    /// Writes a snapshot file of the current state (for a lagging follower or a backup);
    /// applies go on meanwhile (see `sm::cow`). Keeps the newest files only.
    pub fn create_snapshot_file(&self) -> Result<CreatedSnapshot, NodeStorageError> {
        Ok(self.snapshots.create(&self.sm)?)
    }

    /// Installs a snapshot file from the leader (already in `snap/`): the state machine is
    /// replaced atomically, then the WAL restarts after the snapshot.
    pub fn install_snapshot(
        &mut self,
        file: &SnapshotFile,
    ) -> Result<SnapshotMeta, NodeStorageError> {
        let meta = self.snapshots.install(file, &self.sm)?;
        self.wal.reset_to_snapshot(&meta)?;
        self.compacted_at = meta.index;
        Ok(meta)
    }
}

pub mod restore;

#[cfg(test)]
mod tests;
