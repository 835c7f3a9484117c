//! The storage thread: the only owner of a node's [`NodeStorage`].
//!
//! It takes jobs from the consensus task in order and answers with events:
//! - **Group commit.** It takes one job, then every job already queued (up to
//!   [`GROUP_JOBS_MAX`]), merges their hard states (last wins) and entries (a later batch that
//!   starts at or below an earlier one's end replaces that suffix) into **one WAL append — one
//!   write, one fdatasync** — and only then reports them persisted, with the messages that had
//!   to wait for that fsync. So everything that became ready while the previous fsync ran goes
//!   into the next one.
//! - **Apply** runs on its own thread: the group's committed entries go to the apply thread
//!   through a bounded queue as soon as they are durable (before the group's fsync when they
//!   were written by an earlier group), so fsyncs overlap the sled writes; the apply thread
//!   reports what each entry did, so waiting proposals answer.
//! - **Commit-only hard states are not fsynced** on their own (see [`flush`]).
//! - **Compact** when `snapshot_every` entries were applied since the last time (the apply
//!   thread advances the state machine; this thread flushes it, marks the WAL and purges).
//! - **Install** a received snapshot file (it is ordered with the appends: everything queued
//!   before it is persisted and applied first).
//! - **Receive** snapshot chunks into a temp file in `snap/`, in order; the last one is synced,
//!   renamed into place, and reported so the core can be told to install it.
//!
//! Any storage failure is fatal: the thread reports it and stops; the node shuts down and
//! recovery on restart sorts out the disk (the WAL is poisoned after a failed fsync anyway).

use super::peer::SnapshotChunk;
use crate::raft::Message;
use raftkv_storage::node_storage::NodeStorage;
use raftkv_storage::sm::AppliedEntry;
use raftkv_storage::sm::StateMachine;
use raftkv_storage::snapshot::{self, SnapshotFile};
use raftkv_storage::{Entry, HardState, NodeId, SnapshotMeta};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;

/// The most queued jobs merged into one group commit.
pub const GROUP_JOBS_MAX: usize = 1024;
/// Committed batches queued for the apply thread.
pub const APPLY_QUEUE_MAX: usize = 1024;

/// Work for the apply thread.
enum ApplyJob {
    Entries(Vec<Entry>),
    /// Answered once everything queued before it is applied.
    Barrier(std::sync::mpsc::SyncSender<()>),
}

/// The apply thread: applies committed entries to the shared state machine, in order.
fn run_apply(
    sm: Arc<StateMachine>,
    jobs: std::sync::mpsc::Receiver<ApplyJob>,
    events: mpsc::Sender<StorageEvent>,
) {
    for job in jobs {
        match job {
            ApplyJob::Entries(entries) => match sm.apply(&entries) {
                Ok(applied) => {
                    let index = sm.applied_index();
                    if events
                        .blocking_send(StorageEvent::Applied {
                            index,
                            entries: applied,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "apply failed; stopping the node");
                    let _ = events.blocking_send(StorageEvent::Failed(format!("apply: {e}")));
                    return;
                }
            },
            ApplyJob::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

struct Appliers {
    jobs: std::sync::mpsc::SyncSender<ApplyJob>,
}

impl Appliers {
    fn apply(&self, entries: Vec<Entry>) -> Result<(), String> {
        self.jobs
            .send(ApplyJob::Entries(entries))
            .map_err(|_| "the apply thread stopped".to_string())
    }

    /// Waits until everything queued so far is applied.
    fn drain(&self) -> Result<(), String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.jobs
            .send(ApplyJob::Barrier(tx))
            .map_err(|_| "the apply thread stopped".to_string())?;
        rx.recv()
            .map_err(|_| "the apply thread stopped".to_string())
    }
}

/// Work for the storage thread.
#[derive(Debug)]
pub enum StorageJob {
    /// The durable part of one `Ready`.
    Ready {
        hard_state: Option<HardState>,
        install: Option<SnapshotMeta>,
        entries: Vec<Entry>,
        after_persist: Vec<Message>,
        committed: Vec<Entry>,
    },
    /// A piece of a snapshot file from `from`.
    Chunk { from: NodeId, chunk: SnapshotChunk },
}

/// What the storage thread reports back.
#[derive(Debug)]
pub enum StorageEvent {
    /// Durable: the log up to `last` (index, term) if any entries were written, and the hard
    /// state; `after_persist` may now be sent.
    Persisted {
        last: Option<(u64, u64)>,
        after_persist: Vec<Message>,
    },
    /// These entries are applied, in order.
    Applied {
        index: u64,
        entries: Vec<AppliedEntry>,
    },
    /// The log up to (`index`, `term`) may leave memory: it is in sled and marked in the WAL.
    Compacted {
        index: u64,
        term: u64,
        snapshot_index: u64,
    },
    /// A snapshot file from `from` arrived whole and is in `snap/`.
    SnapshotReceived {
        from: NodeId,
        term: u64,
        meta: SnapshotMeta,
    },
    /// Storage failed; the node must stop.
    Failed(String),
}

struct Receiving {
    file_name: String,
    tmp: PathBuf,
    file: File,
    next_offset: u64,
}

struct Group {
    hard_state: Option<HardState>,
    entries: Vec<Entry>,
    after_persist: Vec<Message>,
    committed: Vec<Entry>,
}

impl Group {
    fn new() -> Group {
        Group {
            hard_state: None,
            entries: Vec::new(),
            after_persist: Vec::new(),
            committed: Vec::new(),
        }
    }

    fn merge(
        &mut self,
        hard_state: Option<HardState>,
        entries: Vec<Entry>,
        after: Vec<Message>,
        committed: Vec<Entry>,
    ) {
        if hard_state.is_some() {
            self.hard_state = hard_state;
        }
        if let Some(first) = entries.first() {
            let keep = self.entries.partition_point(|e| e.index < first.index);
            self.entries.truncate(keep);
        }
        self.entries.extend(entries);
        self.after_persist.extend(after);
        self.committed.extend(committed);
    }
}

/// Runs the storage thread until the job channel closes or storage fails.
pub fn run(
    mut storage: NodeStorage,
    mut jobs: mpsc::Receiver<StorageJob>,
    events: mpsc::Sender<StorageEvent>,
) {
    let (apply_tx, apply_rx) = std::sync::mpsc::sync_channel(APPLY_QUEUE_MAX);
    let sm = storage.shared_sm();
    let apply_events = events.clone();
    let applier = match std::thread::Builder::new()
        .name("raftkv-apply".into())
        .spawn(move || run_apply(sm, apply_rx, apply_events))
    {
        Ok(handle) => handle,
        Err(e) => {
            let _ = events.blocking_send(StorageEvent::Failed(format!(
                "cannot start the apply thread: {e}"
            )));
            return;
        }
    };
    let appliers = Appliers { jobs: apply_tx };
    let deferred = run_jobs(&mut storage, &mut jobs, &events, &appliers);
    if let Some(hs) = deferred {
        // Not needed for safety (restart takes the larger of commit and applied); it keeps
        // the WAL's record of the commit index current after a graceful stop.
        if let Err(e) = storage.append(&[], Some(&hs)) {
            tracing::warn!(error = %e, "writing the last commit index failed");
        }
    }
    drop(appliers);
    let _ = applier.join();
    // A graceful stop leaves sled flushed, so the next start replays nothing.
    match storage.sm().flush() {
        Ok(at) => tracing::info!(applied_index = at.index, "state machine flushed"),
        Err(e) => {
            tracing::warn!(error = %e, "final state machine flush failed; the WAL still has everything")
        }
    }
}

fn run_jobs(
    storage: &mut NodeStorage,
    jobs: &mut mpsc::Receiver<StorageJob>,
    events: &mpsc::Sender<StorageEvent>,
    appliers: &Appliers,
) -> Option<HardState> {
    let mut receiving: Option<Receiving> = None;
    let mut deferred: Option<HardState> = None;
    let mut batch = Vec::with_capacity(GROUP_JOBS_MAX);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < GROUP_JOBS_MAX {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let result = process(
            storage,
            &mut batch,
            &mut receiving,
            &mut deferred,
            events,
            appliers,
        );
        if let Err(why) = result {
            tracing::error!(error = %why, "storage failed; stopping the node");
            let _ = events.blocking_send(StorageEvent::Failed(why));
            return None;
        }
    }
    deferred
}

fn process(
    storage: &mut NodeStorage,
    batch: &mut Vec<StorageJob>,
    receiving: &mut Option<Receiving>,
    deferred: &mut Option<HardState>,
    events: &mpsc::Sender<StorageEvent>,
    appliers: &Appliers,
) -> Result<(), String> {
    let mut group = Group::new();
    for job in batch.drain(..) {
        match job {
            StorageJob::Ready {
                hard_state,
                install,
                entries,
                after_persist,
                committed,
            } => {
                if let Some(meta) = install {
                    flush(
                        storage,
                        std::mem::replace(&mut group, Group::new()),
                        deferred,
                        events,
                        appliers,
                    )?;
                    appliers.drain()?;
                    // A commit index held back from before the snapshot is below it: moot.
                    *deferred = None;
                    install_snapshot(storage, &meta, hard_state.as_ref())?;
                    send(
                        events,
                        StorageEvent::Persisted {
                            last: Some((meta.index, meta.term)),
                            after_persist: Vec::new(),
                        },
                    )?;
                    group.merge(None, entries, after_persist, committed);
                } else {
                    group.merge(hard_state, entries, after_persist, committed);
                }
            }
            StorageJob::Chunk { from, chunk } => {
                if let Some(event) = receive_chunk(storage, receiving, from, chunk)? {
                    send(events, event)?;
                }
            }
        }
    }
    flush(storage, group, deferred, events, appliers)
}

fn send(events: &mpsc::Sender<StorageEvent>, event: StorageEvent) -> Result<(), String> {
    events
        .blocking_send(event)
        .map_err(|_| "the consensus task is gone".to_string())
}

/// One append + fsync for the group, its applies (on the apply thread) and a compaction if
/// due.
///
/// Two things keep the fsync off the path of a write that is already committed:
/// - Committed entries that are durable in the WAL already (below this group's first entry
///   and at or below the WAL's last index) go to the apply thread **before** the append, so
///   the apply overlaps the fsync; the rest wait for it (a follower may learn that an entry
///   is committed in the same `Ready` that hands it the entry).
/// - A hard state whose term and vote are already durable changes only the commit index,
///   which promises nothing to anyone (etcd's `MustSync` makes the same call): with no entries
///   to write it is held back in `deferred` and written with the next append. Recovery copes
///   with a durable commit index behind the applied one (the core restarts from the larger).
fn flush(
    storage: &mut NodeStorage,
    mut group: Group,
    deferred: &mut Option<HardState>,
    events: &mpsc::Sender<StorageEvent>,
    appliers: &Appliers,
) -> Result<(), String> {
    let durable_last = storage.wal().last_index();
    let first_new = group.entries.first().map_or(u64::MAX, |e| e.index);
    let ready_now = group
        .committed
        .partition_point(|e| e.index <= durable_last && e.index < first_new);
    let after_fsync = group.committed.split_off(ready_now);
    if !group.committed.is_empty() {
        appliers.apply(std::mem::take(&mut group.committed))?;
    }
    // The group's hard state, if any, is newer than the one held back.
    let hard_state = group.hard_state.or(deferred.take());
    let durable = storage.wal().hard_state();
    let must_sync = hard_state
        .as_ref()
        .is_some_and(|hs| hs.term != durable.term || hs.vote != durable.vote);
    if group.entries.is_empty() && !must_sync {
        *deferred = hard_state.filter(|hs| *hs != durable);
    } else {
        storage
            .append(&group.entries, hard_state.as_ref())
            .map_err(|e| format!("wal append: {e}"))?;
    }
    if !group.entries.is_empty() || !group.after_persist.is_empty() {
        send(
            events,
            StorageEvent::Persisted {
                last: group.entries.last().map(|e| (e.index, e.term)),
                after_persist: group.after_persist,
            },
        )?;
    }
    if !after_fsync.is_empty() {
        appliers.apply(after_fsync)?;
    }
    if storage.compaction_due() {
        let report = storage.compact().map_err(|e| format!("compaction: {e}"))?;
        let keep_from = report.purged_upto;
        if let Some(term) = storage.wal().term(keep_from) {
            send(
                events,
                StorageEvent::Compacted {
                    index: keep_from,
                    term,
                    snapshot_index: report.snapshot.index,
                },
            )?;
        }
    }
    Ok(())
}

fn install_snapshot(
    storage: &mut NodeStorage,
    meta: &SnapshotMeta,
    hard_state: Option<&HardState>,
) -> Result<(), String> {
    let name = snapshot::file_name(meta.index, meta.term);
    let file = SnapshotFile {
        path: storage.snapshots().dir().join(&name),
        name,
        index: meta.index,
        term: meta.term,
    };
    let installed = storage
        .install_snapshot(&file)
        .map_err(|e| format!("installing snapshot {}: {e}", file.path.display()))?;
    if installed.index != meta.index || installed.term != meta.term {
        return Err(format!(
            "snapshot file {} holds ({}, {}), expected ({}, {})",
            file.path.display(),
            installed.index,
            installed.term,
            meta.index,
            meta.term
        ));
    }
    if let Some(hs) = hard_state {
        storage
            .append(&[], Some(hs))
            .map_err(|e| format!("wal append: {e}"))?;
    }
    tracing::info!(
        index = meta.index,
        term = meta.term,
        "installed snapshot from the leader"
    );
    Ok(())
}

/// Writes one chunk; returns an event when the file is complete.
fn receive_chunk(
    storage: &NodeStorage,
    receiving: &mut Option<Receiving>,
    from: NodeId,
    chunk: SnapshotChunk,
) -> Result<Option<StorageEvent>, String> {
    let dir = storage.snapshots().dir().to_path_buf();
    let expected = snapshot::file_name(chunk.meta.index, chunk.meta.term);
    if chunk.file_name != expected {
        tracing::warn!(from, name = %chunk.file_name, "snapshot chunk with a malformed file name; dropped");
        return Ok(None);
    }
    if chunk.offset == 0 {
        let tmp = dir.join(format!("{expected}.recv.tmp"));
        let file = File::create(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        *receiving = Some(Receiving {
            file_name: expected.clone(),
            tmp,
            file,
            next_offset: 0,
        });
    }
    let Some(r) = receiving.as_mut() else {
        tracing::warn!(
            from,
            offset = chunk.offset,
            "snapshot chunk without a start; dropped"
        );
        return Ok(None);
    };
    if r.file_name != expected || r.next_offset != chunk.offset {
        tracing::warn!(
            from,
            offset = chunk.offset,
            expected = r.next_offset,
            "out-of-order snapshot chunk; transfer abandoned"
        );
        let _ = std::fs::remove_file(&r.tmp);
        *receiving = None;
        return Ok(None);
    }
    r.file
        .write_all(&chunk.data)
        .map_err(|e| format!("writing {}: {e}", r.tmp.display()))?;
    r.next_offset += chunk.data.len() as u64;
    if !chunk.is_last() {
        return Ok(None);
    }
    let Some(done) = receiving.take() else {
        return Ok(None);
    };
    done.file
        .sync_all()
        .map_err(|e| format!("syncing {}: {e}", done.tmp.display()))?;
    let path = dir.join(&done.file_name);
    std::fs::rename(&done.tmp, &path)
        .map_err(|e| format!("renaming {}: {e}", done.tmp.display()))?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("syncing {}: {e}", dir.display()))?;
    tracing::info!(
        from,
        index = chunk.meta.index,
        bytes = done.next_offset,
        "received snapshot file"
    );
    Ok(Some(StorageEvent::SnapshotReceived {
        from,
        term: chunk.term,
        meta: chunk.meta,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftkv_storage::EntryKind;

    fn e(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            payload: vec![index as u8],
        }
    }

    #[test]
    fn group_merge_keeps_the_last_hard_state_and_replaces_overlapping_suffixes() {
        let mut g = Group::new();
        let hs = |term| HardState {
            term,
            vote: Some(1),
            commit: 0,
        };
        g.merge(
            Some(hs(1)),
            vec![e(1, 1), e(2, 1), e(3, 1)],
            vec![],
            vec![e(1, 1)],
        );
        g.merge(None, vec![e(4, 1)], vec![], vec![]);
        // A new leader's entries replace the suffix from index 3.
        g.merge(Some(hs(2)), vec![e(3, 2), e(4, 2)], vec![], vec![e(2, 1)]);
        assert_eq!(g.hard_state, Some(hs(2)));
        assert_eq!(
            g.entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            [(1, 1), (2, 1), (3, 2), (4, 2)]
        );
        assert_eq!(g.committed.len(), 2);
        // An overwrite reaching below everything merged so far replaces all of it.
        g.merge(None, vec![e(1, 3)], vec![], vec![]);
        assert_eq!(
            g.entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            [(1, 3)]
        );
    }
}
