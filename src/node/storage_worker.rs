//! The storage worker: the only owner of a node's [`NodeStorage`], as deterministic steps.
//!
//! It takes [`StorageJob`]s in order and answers with [`StorageOutput`]s; the node's storage
//! thread ([`run`]) and the simulator drive the same [`StorageWorker`]:
//! - **Group commit.** Everything submitted before a [`StorageWorker::run`] is merged — hard
//!   states (last wins) and entries (a later batch that starts at or below an earlier one's
//!   end replaces that suffix) — into **one WAL append: one write, one fdatasync**, and only
//!   then are the messages that had to wait for that fsync handed out (the shell sends them
//!   straight to the transport: no hop back through the consensus step) and the log reported
//!   persisted. The thread submits everything queued while the previous fsync ran.
//! - **Commit-only hard states are not fsynced** on their own (see [`plan_hard_state`]).
//! - **Compact** when `snapshot_every` entries were applied since the last time (the apply
//!   worker advances the state machine; this one flushes it, marks the WAL and purges).
//! - **Install** a received snapshot file, ordered with the appends (everything before it is
//!   persisted first) and with the applies: [`StorageWorker::run`] stops at the install with
//!   [`Progress::AwaitingApply`]; the shell calls [`StorageWorker::install`] once the apply
//!   worker reached the same point, then runs on.
//! - **Receive** snapshot chunks into `snap/` through [`ChunkSink`] (over the `Vfs`).
//!
//! Any storage failure is fatal ([`WorkerError`]): the node stops and recovery on restart
//! sorts out the disk (the WAL is poisoned after a failed fsync anyway). The clock is read
//! only to time metrics and log lines, never to decide anything.

use super::messages::{PeerMessage, StorageEvent, StorageJob, WorkerError};
use crate::metrics::{seconds, Metrics};
use crate::raft::{Message, MessageBody};
use crate::transport::PeerTransport;
use raftkv_storage::node_storage::{NodeStorage, NodeStorageError};
use raftkv_storage::snapshot::transfer::{ChunkSink, Received, SnapshotChunk};
use raftkv_storage::snapshot::{self, SnapshotFile};
use raftkv_storage::wal::WalError;
use raftkv_storage::{Entry, HardState, NodeId, SnapshotMeta};
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// The most queued jobs merged into one group commit.
pub const GROUP_JOBS_MAX: usize = 1024;

/// What the storage worker hands back, in order.
#[derive(Debug)]
pub enum StorageOutput {
    /// A message whose promise is now durable: send it.
    Send(Message),
    /// A report for the consensus step.
    Event(StorageEvent),
}

/// Where [`StorageWorker::run`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Every submitted job is done.
    Idle,
    /// At a snapshot install: call [`StorageWorker::install`] once the apply worker is at the
    /// same point, then `run` again.
    AwaitingApply,
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
        debug_assert!(
            self.entries
                .windows(2)
                .all(|w| w[1].index == w[0].index + 1),
            "a group's entries are contiguous"
        );
    }
}

/// The storage worker's state between steps.
pub struct StorageWorker {
    storage: NodeStorage,
    /// Jobs submitted and not yet done, in order.
    queued: VecDeque<StorageJob>,
    /// The install [`run`](Self::run) stopped at: (snapshot, hard state written with it).
    install: Option<(SnapshotMeta, Option<HardState>)>,
    sink: ChunkSink,
    /// A hard state that changed only the commit index, not yet written (see
    /// [`plan_hard_state`]).
    deferred: Option<HardState>,
    /// The leader's replication floor, as the consensus step last sent it.
    retain_after: Option<u64>,
    metrics: Arc<Metrics>,
}

impl StorageWorker {
    pub fn new(storage: NodeStorage, metrics: Arc<Metrics>) -> StorageWorker {
        StorageWorker {
            storage,
            queued: VecDeque::new(),
            install: None,
            sink: ChunkSink::default(),
            deferred: None,
            retain_after: None,
            metrics,
        }
    }

    /// The storage (reads only: the worker owns every write).
    pub fn storage(&self) -> &NodeStorage {
        &self.storage
    }

    /// Whether jobs wait to be run.
    pub fn has_work(&self) -> bool {
        !self.queued.is_empty() || self.install.is_some()
    }

    /// Queues `jobs` behind those submitted before; [`run`](Self::run) does them as one group.
    pub fn submit(&mut self, jobs: impl IntoIterator<Item = StorageJob>) {
        self.queued.extend(jobs);
    }

    /// Does the queued jobs: one group commit up to the next snapshot install (or the end).
    pub fn run(&mut self, out: &mut Vec<StorageOutput>) -> Result<Progress, WorkerError> {
        assert!(self.install.is_none(), "run while an install waits");
        let mut group = Group::new();
        while let Some(job) = self.queued.pop_front() {
            match job {
                StorageJob::Ready {
                    hard_state,
                    install: Some(meta),
                    entries,
                    after_persist,
                } => {
                    self.flush(group, out)?;
                    // A commit index held back from before the snapshot is below it.
                    self.deferred = None;
                    self.install = Some((meta, hard_state));
                    // What came with the install is persisted after it.
                    self.queued.push_front(StorageJob::Ready {
                        hard_state: None,
                        install: None,
                        entries,
                        after_persist,
                    });
                    return Ok(Progress::AwaitingApply);
                }
                StorageJob::Ready {
                    hard_state,
                    install: None,
                    entries,
                    after_persist,
                } => group.merge(hard_state, entries, after_persist),
                StorageJob::Chunk { from, chunk } => self.receive_chunk(from, chunk, out)?,
                StorageJob::SendFromLog { message, lo, hi } => {
                    self.send_from_log(message, lo, hi, out)?
                }
                StorageJob::RetainAfter(index) => self.retain_after = index,
            }
        }
        self.flush(group, out)?;
        Ok(Progress::Idle)
    }

    /// Installs the snapshot [`run`](Self::run) stopped at. The apply worker must be at the
    /// install's point in its queue (everything before it applied) and wait there until this
    /// returns.
    pub fn install(&mut self, out: &mut Vec<StorageOutput>) -> Result<(), WorkerError> {
        let (meta, hard_state) = self.install.take().expect("an install is waiting");
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
        debug_assert_eq!(self.storage.sm().applied_index(), meta.index);
        out.push(StorageOutput::Event(StorageEvent::Persisted {
            last: (meta.index, meta.term),
        }));
        Ok(())
    }

    /// Writes the last commit index held back, if any (a graceful stop).
    pub fn finish(&mut self) {
        if let Some(hs) = self.deferred.take() {
            // Not needed for safety (restart takes the larger of commit and applied); it
            // keeps the WAL's record of the commit index current after a graceful stop.
            if let Err(e) = self.storage.append(&[], Some(&hs)) {
                tracing::warn!(error = %e, "writing the last commit index failed");
            }
        }
    }

    /// One append + fsync for the group, then its waiting messages and a compaction if due.
    fn flush(&mut self, group: Group, out: &mut Vec<StorageOutput>) -> Result<(), WorkerError> {
        let plan = plan_hard_state(
            group.hard_state,
            self.deferred.take(),
            &self.storage.hard_state(),
            !group.entries.is_empty(),
        );
        self.deferred = plan.defer;
        if plan.append {
            let stats = self
                .storage
                .append(&group.entries, plan.write.as_ref())
                .map_err(WorkerError::storage("wal append"))?;
            self.metrics
                .wal_fsync_duration
                .observe(seconds(stats.fsync_duration));
            self.metrics.wal_append_bytes.inc_by(stats.bytes);
        }
        // Everything in the group is durable: what waited for it may leave.
        out.extend(group.after_persist.into_iter().map(StorageOutput::Send));
        if let Some(last) = group.entries.last() {
            out.push(StorageOutput::Event(StorageEvent::Persisted {
                last: (last.index, last.term),
            }));
        }
        if self.storage.compaction_due() {
            self.compact(out)?;
        }
        Ok(())
    }

    fn compact(&mut self, out: &mut Vec<StorageOutput>) -> Result<(), WorkerError> {
        let started = Instant::now();
        let report = self
            .storage
            .compact(self.retain_after)
            .map_err(WorkerError::storage("compaction"))?;
        tracing::info!(
            index = report.snapshot.index,
            term = report.snapshot.term,
            purged_upto = report.purged_upto,
            segments_removed = report.segments_removed,
            duration_ms = started.elapsed().as_millis() as u64,
            "compacted the log"
        );
        if let Some(term) = report.purged_upto_term {
            out.push(StorageOutput::Event(StorageEvent::Compacted {
                index: report.purged_upto,
                term,
                snapshot_index: report.snapshot.index,
            }));
        }
        Ok(())
    }

    /// Fills an append with entries `lo..=hi` from the WAL (none when `lo > hi`) and hands it
    /// out. Entries compaction purged meanwhile are not an error: the append is dropped and
    /// the core told, so it probes the follower (and sends a snapshot if need be).
    fn send_from_log(
        &mut self,
        mut message: Message,
        lo: u64,
        hi: u64,
        out: &mut Vec<StorageOutput>,
    ) -> Result<(), WorkerError> {
        if lo <= hi {
            let entries = match self.storage.read_entries(lo, hi) {
                Ok(entries) => entries,
                Err(NodeStorageError::Wal(
                    e @ (WalError::Compacted { .. } | WalError::Unavailable { .. }),
                )) => {
                    tracing::info!(to = message.to, lo, hi, reason = %e, "append dropped");
                    out.push(StorageOutput::Event(StorageEvent::LogReadFailed {
                        peer: message.to,
                    }));
                    return Ok(());
                }
                Err(e) => return Err(WorkerError::storage("wal read for a follower")(e)),
            };
            match &mut message.body {
                MessageBody::Append { entries: body, .. } => {
                    assert!(body.is_empty(), "a log read's append carries nothing yet");
                    *body = entries;
                }
                other => panic!("a log read carries an append, not {other:?}"),
            }
        }
        out.push(StorageOutput::Send(message));
        Ok(())
    }

    fn receive_chunk(
        &mut self,
        from: NodeId,
        chunk: SnapshotChunk,
        out: &mut Vec<StorageOutput>,
    ) -> Result<(), WorkerError> {
        let offset = chunk.offset;
        match self.sink.receive(self.storage.snapshots(), from, chunk)? {
            Received::Partial => {}
            Received::Dropped(why) => {
                tracing::warn!(from, offset, reason = %why, "snapshot chunk dropped")
            }
            Received::Complete { term, meta, bytes } => {
                tracing::info!(from, index = meta.index, bytes, "received snapshot file");
                out.push(StorageOutput::Event(StorageEvent::SnapshotReceived {
                    from,
                    term,
                    meta,
                }));
            }
        }
        Ok(())
    }
}

/// What to do with a group's hard state (see [`plan_hard_state`]).
#[derive(Debug, PartialEq, Eq)]
pub struct HardStatePlan {
    /// Whether to append (and fsync) at all.
    pub append: bool,
    /// The hard state to write with the append.
    pub write: Option<HardState>,
    /// The hard state to hold back for a later append.
    pub defer: Option<HardState>,
}

/// Appends when there are entries or the term or vote changed (a promise to other nodes);
/// holds back a hard state that changed only the commit index, which promises nothing to
/// anyone (etcd's `MustSync` makes the same call): with no entries to write it waits for the
/// next append. Recovery copes with a durable commit index behind the applied one (the core
/// restarts from the larger of the two).
pub fn plan_hard_state(
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
    debug_assert!(
        newest.as_ref().is_none_or(|hs| hs.term >= durable.term),
        "the term never goes back"
    );
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

fn install_snapshot(
    storage: &mut NodeStorage,
    meta: &SnapshotMeta,
    hard_state: Option<&HardState>,
) -> Result<(), WorkerError> {
    let name = snapshot::file_name(meta.index, meta.term);
    let file = SnapshotFile {
        path: storage.snapshots().dir().join(&name),
        name,
        index: meta.index,
        term: meta.term,
    };
    let installed = storage
        .install_snapshot(&file)
        .map_err(WorkerError::storage("installing a snapshot"))?;
    if installed.index != meta.index || installed.term != meta.term {
        return Err(WorkerError::InstallMismatch {
            name: file.name,
            found_index: installed.index,
            found_term: installed.term,
            index: meta.index,
            term: meta.term,
        });
    }
    if let Some(hs) = hard_state {
        storage
            .append(&[], Some(hs))
            .map_err(WorkerError::storage("wal append"))?;
    }
    Ok(())
}

/// The storage thread's half of the install rendezvous with the apply thread.
pub struct InstallMeeting {
    /// The apply thread says it reached the install point.
    pub reached: Receiver<()>,
    /// Tells the apply thread the state machine is swapped.
    pub installed: SyncSender<()>,
}

/// Runs the storage thread: submits everything queued, runs the worker, sends what it hands
/// out; until the job channel closes or storage fails.
pub fn run(
    mut worker: StorageWorker,
    transport: Arc<PeerTransport<PeerMessage>>,
    mut jobs: mpsc::Receiver<StorageJob>,
    events: mpsc::Sender<StorageEvent>,
    meeting: InstallMeeting,
) {
    let mut out = Vec::new();
    while let Some(first) = jobs.blocking_recv() {
        worker.submit(std::iter::once(first));
        let mut taken = 1;
        while taken < GROUP_JOBS_MAX {
            match jobs.try_recv() {
                Ok(job) => worker.submit(std::iter::once(job)),
                Err(_) => break,
            }
            taken += 1;
        }
        if let Err(e) = drive(&mut worker, &meeting, &transport, &events, &mut out) {
            tracing::error!(error = %e, "storage failed; stopping the node");
            let _ = events.blocking_send(StorageEvent::Failed(e));
            return;
        }
    }
    worker.finish();
}

/// Runs the worker until it is idle, meeting the apply thread at installs.
fn drive(
    worker: &mut StorageWorker,
    meeting: &InstallMeeting,
    transport: &PeerTransport<PeerMessage>,
    events: &mpsc::Sender<StorageEvent>,
    out: &mut Vec<StorageOutput>,
) -> Result<(), WorkerError> {
    loop {
        let progress = worker.run(out);
        dispatch(out, transport, events)?;
        match progress? {
            Progress::Idle => return Ok(()),
            Progress::AwaitingApply => {
                meeting
                    .reached
                    .recv()
                    .map_err(|_| WorkerError::Gone("apply thread"))?;
                let installed = worker.install(out);
                dispatch(out, transport, events)?;
                installed?;
                // The apply thread may go on past the install point.
                let _ = meeting.installed.send(());
            }
        }
    }
}

fn dispatch(
    out: &mut Vec<StorageOutput>,
    transport: &PeerTransport<PeerMessage>,
    events: &mpsc::Sender<StorageEvent>,
) -> Result<(), WorkerError> {
    for o in out.drain(..) {
        match o {
            StorageOutput::Send(m) => send_message(transport, m),
            StorageOutput::Event(ev) => events
                .blocking_send(ev)
                .map_err(|_| WorkerError::Gone("consensus task"))?,
        }
    }
    Ok(())
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

/// Sends a Raft message; a full or closed peer queue drops it (Raft retries).
pub fn send_message(transport: &PeerTransport<PeerMessage>, m: Message) {
    let to = m.to;
    if let Err(e) = transport.send(to, PeerMessage::Raft(m)) {
        tracing::debug!(peer = to, error = %e, "message not sent");
    }
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
            payload: vec![index as u8].into(),
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

#[cfg(test)]
mod log_read_tests {
    use super::*;
    use crate::raft::MessageBody;
    use raftkv_storage::command::Command;
    use raftkv_storage::node_storage::NodeStorageOptions;
    use raftkv_storage::wal::WalOptions;
    use raftkv_storage::EntryKind;

    fn put(index: u64) -> Entry {
        let command = Command::Put {
            key: format!("k{index}").into_bytes(),
            value: vec![b'v'; 64],
        };
        Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            payload: command.encode().unwrap().into(),
        }
    }

    fn append(to: NodeId) -> Message {
        Message {
            from: 1,
            to,
            term: 1,
            body: MessageBody::Append {
                prev_index: 0,
                prev_term: 0,
                entries: Vec::new(),
                commit: 0,
            },
        }
    }

    /// An append is filled from the WAL in job order; one whose entries compaction purged is
    /// dropped and reported (the core then probes that follower), never an error.
    #[test]
    fn appends_are_filled_from_the_wal_or_reported_lost() {
        let dir = tempfile::tempdir().unwrap();
        let opts = NodeStorageOptions {
            wal: WalOptions {
                segment_bytes_max: 4096,
                prepare_ahead: false,
                ..WalOptions::default()
            },
            snapshot_every: 40,
            catchup_margin: 0,
            ..NodeStorageOptions::default()
        };
        let mut storage = NodeStorage::open(dir.path(), opts).unwrap();
        let entries: Vec<Entry> = (1..=60).map(put).collect();
        let hs = HardState {
            term: 1,
            vote: Some(1),
            commit: 60,
        };
        storage.append(&entries, Some(&hs)).unwrap();
        storage.apply_committed(60).unwrap();
        storage.compact(None).unwrap();
        let first = storage.wal().first_index();
        assert!(
            first > 3,
            "the purge removed the first segments (first index {first})"
        );
        let more: Vec<Entry> = (61..=65).map(put).collect();
        storage.append(&more, None).unwrap();
        let mut worker = StorageWorker::new(storage, Arc::new(Metrics::new([2, 3])));
        worker.submit([
            StorageJob::SendFromLog {
                message: append(2),
                lo: 1,
                hi: 3,
            },
            StorageJob::SendFromLog {
                message: append(3),
                lo: 61,
                hi: 63,
            },
            StorageJob::SendFromLog {
                message: append(3),
                lo: 1,
                hi: 0,
            },
        ]);
        let mut out = Vec::new();
        assert_eq!(worker.run(&mut out).unwrap(), Progress::Idle);
        assert_eq!(out.len(), 3, "{out:?}");
        assert!(matches!(
            out[0],
            StorageOutput::Event(StorageEvent::LogReadFailed { peer: 2 })
        ));
        match &out[1] {
            StorageOutput::Send(Message {
                to: 3,
                body: MessageBody::Append { entries, .. },
                ..
            }) => assert_eq!(entries, &(61..=63).map(put).collect::<Vec<_>>()),
            other => panic!("expected the filled append, got {other:?}"),
        }
        assert!(matches!(
            &out[2],
            StorageOutput::Send(Message { body: MessageBody::Append { entries, .. }, .. }) if entries.is_empty()
        ));
    }
}
