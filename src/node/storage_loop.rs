//! The storage thread: the only owner of a node's [`NodeStorage`].
//!
//! It takes jobs from the consensus task in order and answers with events:
//! - **Group commit.** It takes one job, then every job already queued (up to
//!   [`GROUP_JOBS_MAX`]), merges their hard states (last wins) and entries (a later batch that
//!   starts at or below an earlier one's end replaces that suffix) into **one WAL append — one
//!   write, one fdatasync** — and only then sends the messages that had to wait for that fsync
//!   (straight to the transport: no hop back through the consensus task) and reports the log
//!   persisted. So everything that became ready while the previous fsync ran goes into the
//!   next one.
//! - **Commit-only hard states are not fsynced** on their own (see [`flush`]).
//! - **Compact** when `snapshot_every` entries were applied since the last time (the apply
//!   thread, [`super::apply`], advances the state machine; this thread flushes it, marks the
//!   WAL and purges).
//! - **Install** a received snapshot file, ordered with the appends (everything queued before
//!   it is persisted first) and with the applies (the apply thread stops at the install's
//!   point in its queue until the state machine is swapped).
//! - **Receive** snapshot chunks into a temp file in `snap/`, in order; the last one is synced,
//!   renamed into place, and reported so the core can be told to install it.
//!
//! Any storage failure is fatal: the thread reports it and stops; the node shuts down and
//! recovery on restart sorts out the disk (the WAL is poisoned after a failed fsync anyway).

use super::apply::InstallSync;
use super::peer::{PeerMessage, SnapshotChunk};
use crate::metrics::{seconds, Metrics};
use crate::raft::Message;
use crate::transport::PeerTransport;
use raftkv_storage::node_storage::NodeStorage;
use raftkv_storage::snapshot::{self, SnapshotFile};
use raftkv_storage::{Entry, HardState, NodeId, SnapshotMeta};
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// The most queued jobs merged into one group commit.
pub const GROUP_JOBS_MAX: usize = 1024;

/// Work for the storage thread.
#[derive(Debug)]
pub enum StorageJob {
    /// The durable part of one `Ready`.
    Ready {
        hard_state: Option<HardState>,
        /// A received snapshot to install, with the apply thread's rendezvous for it.
        install: Option<(SnapshotMeta, InstallSync)>,
        entries: Vec<Entry>,
        after_persist: Vec<Message>,
    },
    /// A piece of a snapshot file from `from`.
    Chunk { from: NodeId, chunk: SnapshotChunk },
}

/// What the storage thread reports back.
#[derive(Debug)]
pub enum StorageEvent {
    /// Durable: the log up to (index, term), and the hard state.
    Persisted { last: (u64, u64) },
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
    started: Instant,
    file_name: String,
    tmp: PathBuf,
    file: File,
    next_offset: u64,
}

struct Group {
    hard_state: Option<HardState>,
    entries: Vec<Entry>,
    after_persist: Vec<Message>,
}

impl Group {
    fn new() -> Group {
        Group {
            hard_state: None,
            entries: Vec::new(),
            after_persist: Vec::new(),
        }
    }

    fn merge(&mut self, hard_state: Option<HardState>, entries: Vec<Entry>, after: Vec<Message>) {
        if hard_state.is_some() {
            self.hard_state = hard_state;
        }
        if let Some(first) = entries.first() {
            let keep = self.entries.partition_point(|e| e.index < first.index);
            self.entries.truncate(keep);
        }
        self.entries.extend(entries);
        self.after_persist.extend(after);
    }
}

/// The storage thread's state between groups.
struct StorageLoop {
    storage: NodeStorage,
    transport: Arc<PeerTransport<PeerMessage>>,
    events: mpsc::Sender<StorageEvent>,
    /// A snapshot file being received.
    receiving: Option<Receiving>,
    /// A hard state that changed only the commit index, not yet written (see [`flush`]).
    deferred: Option<HardState>,
    metrics: Arc<Metrics>,
}

/// Runs the storage thread until the job channel closes or storage fails.
pub fn run(
    storage: NodeStorage,
    transport: Arc<PeerTransport<PeerMessage>>,
    mut jobs: mpsc::Receiver<StorageJob>,
    events: mpsc::Sender<StorageEvent>,
    metrics: Arc<Metrics>,
) {
    let mut state = StorageLoop {
        storage,
        transport,
        events,
        receiving: None,
        deferred: None,
        metrics,
    };
    let mut batch = Vec::with_capacity(GROUP_JOBS_MAX);
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < GROUP_JOBS_MAX {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if let Err(why) = state.process(&mut batch) {
            tracing::error!(error = %why, "storage failed; stopping the node");
            let _ = state.events.blocking_send(StorageEvent::Failed(why));
            return;
        }
    }
    if let Some(hs) = state.deferred.take() {
        // Not needed for safety (restart takes the larger of commit and applied); it keeps
        // the WAL's record of the commit index current after a graceful stop.
        if let Err(e) = state.storage.append(&[], Some(&hs)) {
            tracing::warn!(error = %e, "writing the last commit index failed");
        }
    }
}

/// Flushes sled once the apply thread is done, so the next start replays nothing. Called by
/// the node after both threads stopped.
pub fn flush_state_machine(sm: &raftkv_storage::sm::StateMachine) {
    match sm.flush() {
        Ok(at) => tracing::info!(applied_index = at.index, "state machine flushed"),
        Err(e) => {
            tracing::warn!(error = %e, "final state machine flush failed; the WAL still has everything")
        }
    }
}

impl StorageLoop {
    fn process(&mut self, batch: &mut Vec<StorageJob>) -> Result<(), String> {
        let mut group = Group::new();
        for job in batch.drain(..) {
            match job {
                StorageJob::Ready {
                    hard_state,
                    install,
                    entries,
                    after_persist,
                } => {
                    if let Some((meta, sync)) = install {
                        self.flush(std::mem::replace(&mut group, Group::new()))?;
                        // A commit index held back from before the snapshot is below it.
                        self.deferred = None;
                        sync.reached
                            .recv()
                            .map_err(|_| "the apply thread stopped".to_string())?;
                        let started = Instant::now();
                        install_snapshot(&mut self.storage, &meta, hard_state.as_ref())?;
                        let took = started.elapsed();
                        self.metrics
                            .snapshot_install_duration
                            .observe(seconds(took));
                        tracing::info!(
                            index = meta.index,
                            term = meta.term,
                            duration_ms = took.as_millis() as u64,
                            "installed snapshot from the leader"
                        );
                        // The apply thread may go on past the install point.
                        let _ = sync.installed.send(());
                        self.send(StorageEvent::Persisted {
                            last: (meta.index, meta.term),
                        })?;
                        group.merge(None, entries, after_persist);
                    } else {
                        group.merge(hard_state, entries, after_persist);
                    }
                }
                StorageJob::Chunk { from, chunk } => {
                    let event = receive_chunk(&self.storage, &mut self.receiving, from, chunk)?;
                    if let Some(event) = event {
                        self.send(event)?;
                    }
                }
            }
        }
        self.flush(group)
    }

    fn send(&self, event: StorageEvent) -> Result<(), String> {
        self.events
            .blocking_send(event)
            .map_err(|_| "the consensus task is gone".to_string())
    }

    /// One append + fsync for the group, then its waiting messages and a compaction if due.
    ///
    /// A hard state whose term and vote are already durable changes only the commit index,
    /// which promises nothing to anyone (etcd's `MustSync` makes the same call): with no
    /// entries to write it is held back in `deferred` and written with the next append.
    /// Recovery copes with a durable commit index behind the applied one (the core restarts
    /// from the larger of the two).
    fn flush(&mut self, group: Group) -> Result<(), String> {
        let plan = plan_hard_state(
            group.hard_state,
            self.deferred.take(),
            &self.storage.wal().hard_state(),
            !group.entries.is_empty(),
        );
        self.deferred = plan.defer;
        if plan.append {
            let stats = self
                .storage
                .append(&group.entries, plan.write.as_ref())
                .map_err(|e| format!("wal append: {e}"))?;
            self.metrics
                .wal_fsync_duration
                .observe(seconds(stats.fsync_duration));
            self.metrics.wal_append_bytes.inc_by(stats.bytes);
        }
        // Everything in the group is durable: what waited for it may leave.
        for m in group.after_persist {
            send_message(&self.transport, m);
        }
        if let Some(last) = group.entries.last() {
            self.send(StorageEvent::Persisted {
                last: (last.index, last.term),
            })?;
        }
        if self.storage.compaction_due() {
            let started = Instant::now();
            let report = self
                .storage
                .compact()
                .map_err(|e| format!("compaction: {e}"))?;
            let keep_from = report.purged_upto;
            tracing::info!(
                index = report.snapshot.index,
                term = report.snapshot.term,
                purged_upto = keep_from,
                segments_removed = report.segments_removed,
                duration_ms = started.elapsed().as_millis() as u64,
                "compacted the log"
            );
            if let Some(term) = self.storage.wal().term(keep_from) {
                self.send(StorageEvent::Compacted {
                    index: keep_from,
                    term,
                    snapshot_index: report.snapshot.index,
                })?;
            }
        }
        Ok(())
    }
}

/// What to do with a group's hard state (see [`StorageLoop::flush`]).
#[derive(Debug, PartialEq, Eq)]
struct HardStatePlan {
    /// Whether to append (and fsync) at all.
    append: bool,
    /// The hard state to write with the append.
    write: Option<HardState>,
    /// The hard state to hold back for a later append.
    defer: Option<HardState>,
}

/// Appends when there are entries or the term or vote changed (a promise to other nodes);
/// holds back a hard state that changed only the commit index.
fn plan_hard_state(
    group: Option<HardState>,
    deferred: Option<HardState>,
    durable: &HardState,
    has_entries: bool,
) -> HardStatePlan {
    // The group's hard state, if any, is newer than the one held back.
    let newest = group.or(deferred);
    let must_sync = newest
        .as_ref()
        .is_some_and(|hs| hs.term != durable.term || hs.vote != durable.vote);
    if has_entries || must_sync {
        HardStatePlan {
            append: true,
            write: newest,
            defer: None,
        }
    } else {
        HardStatePlan {
            append: false,
            write: None,
            defer: newest.filter(|hs| hs != durable),
        }
    }
}

/// Sends a Raft message; a full or closed peer queue drops it (Raft retries).
pub fn send_message(transport: &PeerTransport<PeerMessage>, m: Message) {
    let to = m.to;
    if let Err(e) = transport.send(to, PeerMessage::Raft(m)) {
        tracing::debug!(peer = to, error = %e, "message not sent");
    }
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
            started: Instant::now(),
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
        duration_ms = done.started.elapsed().as_millis() as u64,
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
    fn only_term_or_vote_changes_and_entries_force_an_fsync() {
        let hs = |term, vote, commit| HardState { term, vote, commit };
        let durable = hs(2, Some(1), 10);
        // Commit-only: held back, nothing written.
        let p = plan_hard_state(Some(hs(2, Some(1), 11)), None, &durable, false);
        assert_eq!(
            p,
            HardStatePlan {
                append: false,
                write: None,
                defer: Some(hs(2, Some(1), 11))
            }
        );
        // Still commit-only: the newer one replaces what was held back.
        let p = plan_hard_state(Some(hs(2, Some(1), 12)), p.defer, &durable, false);
        assert_eq!(p.defer, Some(hs(2, Some(1), 12)));
        assert!(!p.append);
        // Entries arrive with no hard state of their own: the held-back one rides along.
        let p = plan_hard_state(None, p.defer, &durable, true);
        assert_eq!(
            p,
            HardStatePlan {
                append: true,
                write: Some(hs(2, Some(1), 12)),
                defer: None
            }
        );
        // A new term or vote is a promise: written and fsynced even with no entries.
        for changed in [hs(3, None, 10), hs(2, Some(3), 10)] {
            let p = plan_hard_state(Some(changed), Some(hs(2, Some(1), 11)), &durable, false);
            assert_eq!(p.write, Some(changed));
            assert!(p.append && p.defer.is_none());
        }
        // Nothing new at all: nothing to do.
        assert_eq!(
            plan_hard_state(None, None, &durable, false),
            HardStatePlan {
                append: false,
                write: None,
                defer: None
            }
        );
    }

    #[test]
    fn group_merge_keeps_the_last_hard_state_and_replaces_overlapping_suffixes() {
        let mut g = Group::new();
        let hs = |term| HardState {
            term,
            vote: Some(1),
            commit: 0,
        };
        g.merge(Some(hs(1)), vec![e(1, 1), e(2, 1), e(3, 1)], vec![]);
        g.merge(None, vec![e(4, 1)], vec![]);
        // A new leader's entries replace the suffix from index 3.
        g.merge(Some(hs(2)), vec![e(3, 2), e(4, 2)], vec![]);
        assert_eq!(g.hard_state, Some(hs(2)));
        assert_eq!(
            g.entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            [(1, 1), (2, 1), (3, 2), (4, 2)]
        );
        // An overwrite reaching below everything merged so far replaces all of it.
        g.merge(None, vec![e(1, 3)], vec![]);
        assert_eq!(
            g.entries
                .iter()
                .map(|e| (e.index, e.term))
                .collect::<Vec<_>>(),
            [(1, 3)]
        );
    }
}
