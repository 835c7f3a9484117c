//! The apply worker: applies committed entries to the state machine, in log order, and
//! answers the proposals waiting for them — as deterministic steps ([`ApplyWorker`]) that the
//! node's apply thread ([`run`]) and the simulator drive alike.
//!
//! It is fed straight by the consensus step, not through the storage worker: the core hands
//! out only entries that are already durable locally (`commit.min(persisted)`), so nothing
//! has to wait for the next fsync, and a write's answer leaves as soon as sled has it — no hop
//! back through the consensus task. That task learns the applied index through
//! [`AppliedIndex`] (an atomic and a `Notify`), which never blocks the apply thread (a blocking
//! report could deadlock against the consensus task waiting on a full apply queue).
//!
//! Invariants:
//! - Entries reach the state machine in index order with no gap: everything goes through one
//!   FIFO queue, and a snapshot install is a point in that queue ([`ApplyJob::Install`]) at
//!   which the apply worker stops until the storage worker has installed it. Entries handed
//!   out after the snapshot queue behind that point.
//! - A proposal is answered once: success if the entry applied at its index has its term,
//!   "not applied" if another entry took the index, "outcome unknown" if a snapshot covered
//!   the index before its entry was seen here.

use super::messages::{ApplyJob, ProposalOutcome, ProposalReply, WorkerError};
use crate::api::ServiceError;
use crate::metrics::Metrics;
use crate::watch::WatchHub;
use raftkv_storage::sm::{AppliedBatch, AppliedEntry, EntryOutcome, StateMachine};
use raftkv_storage::Entry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{mpsc, Notify};

/// Committed batches queued for the apply worker.
pub const APPLY_QUEUE_MAX: usize = 1024;
/// The most proposals waiting for their entry to apply.
pub const PENDING_PROPOSALS_MAX: usize = 65_536;
/// Entries merged into one state machine batch at most: one sled batch has a fixed cost of
/// tens of microseconds, so everything queued while the last one ran goes in the next.
pub const APPLY_BATCH_ENTRIES_MAX: usize = 4096;

/// Proposals waiting for their entry, by log index: (term, reply). Shared by the consensus
/// task (which adds them) and the apply thread (which answers them).
#[derive(Default)]
pub struct Pending {
    by_index: Mutex<BTreeMap<u64, (u64, ProposalReply)>>,
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, (u64, ProposalReply)>> {
        // A panic while holding this lock leaves a map that is still consistent.
        self.by_index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for the entry proposed at (`index`, `term`); refuses when too many wait.
    pub fn insert(&self, index: u64, term: u64, reply: ProposalReply) -> Result<(), ProposalReply> {
        let mut map = self.lock();
        if map.len() >= PENDING_PROPOSALS_MAX {
            return Err(reply);
        }
        if let Some((_, old)) = map.insert(index, (term, reply)) {
            let _ = old.send(Err(ServiceError::Unavailable(
                "another write took this log position; it was not applied".into(),
            )));
        }
        Ok(())
    }

    /// Answers the proposals of `applied`, then those at or below `applied_index` that no
    /// entry answered (a snapshot covered them).
    pub fn resolve(&self, applied: &[AppliedEntry], applied_index: u64) {
        let mut map = self.lock();
        for entry in applied {
            let Some((term, reply)) = map.remove(&entry.index) else {
                continue;
            };
            let result = if term == entry.term {
                match &entry.outcome {
                    EntryOutcome::Command(result) => Ok(ProposalOutcome {
                        index: entry.index,
                        result: result.clone(),
                    }),
                    other => Err(ServiceError::Internal(format!(
                        "a write's log position holds a {other:?} entry of the same term"
                    ))),
                }
            } else {
                Err(ServiceError::Unavailable(
                    "leadership changed before the write committed; it was not applied".into(),
                ))
            };
            let _ = reply.send(result);
        }
        while let Some(entry) = map.first_entry() {
            if *entry.key() > applied_index {
                break;
            }
            let (_, reply) = entry.remove();
            let _ = reply.send(Err(ServiceError::Timeout(
                "the entry was covered by a snapshot before its result was seen".into(),
            )));
        }
    }

    /// Answers every waiting proposal with "outcome unknown" (504): each of them is in the
    /// log, and a log entry may commit and apply after this node stops watching it (another
    /// node may already have committed it), so "did not happen" (503) would be a lie.
    pub fn fail_all(&self, why: &str) {
        let waiting = std::mem::take(&mut *self.lock());
        for (index, (_, reply)) in waiting {
            let _ = reply.send(Err(ServiceError::Timeout(format!(
                "{why} while the write at index {index} was in flight"
            ))));
        }
    }
}

/// The apply worker: the state machine's writer, and the one that answers waiting writes.
pub struct ApplyWorker {
    sm: Arc<StateMachine>,
    pending: Arc<Pending>,
    metrics: Arc<Metrics>,
    /// Every applied batch's changes go to the watchers.
    hub: Arc<WatchHub>,
    /// An install point taken off the queue while merging entries, done next.
    held: Option<ApplyJob>,
}

/// What [`ApplyWorker::next`] found to do.
#[derive(Debug, PartialEq, Eq)]
pub enum ApplyWork {
    /// Apply these entries (merged from every queued batch up to an install point).
    Entries(Vec<Entry>),
    /// Stop at the install of the snapshot at this index until the storage worker has done
    /// it, then call [`ApplyWorker::installed`].
    Install { index: u64 },
}

impl ApplyWorker {
    pub fn new(
        sm: Arc<StateMachine>,
        pending: Arc<Pending>,
        metrics: Arc<Metrics>,
        hub: Arc<WatchHub>,
    ) -> ApplyWorker {
        ApplyWorker {
            sm,
            pending,
            metrics,
            hub,
            held: None,
        }
    }

    /// The next unit of work: a held install point, or `first` merged with what `more`
    /// yields (up to [`APPLY_BATCH_ENTRIES_MAX`] entries, stopping at an install point, which
    /// is held for the next call). `None` when there is nothing.
    pub fn next(
        &mut self,
        first: Option<ApplyJob>,
        mut more: impl FnMut() -> Option<ApplyJob>,
    ) -> Option<ApplyWork> {
        let job = match self.held.take() {
            Some(held) => {
                debug_assert!(first.is_none(), "nothing is taken while an install is held");
                held
            }
            None => first.or_else(&mut more)?,
        };
        let mut entries = match job {
            ApplyJob::Install { index } => return Some(ApplyWork::Install { index }),
            ApplyJob::Entries(entries) => entries,
        };
        while entries.len() < APPLY_BATCH_ENTRIES_MAX {
            match more() {
                Some(ApplyJob::Entries(next)) => entries.extend(next),
                Some(install) => {
                    self.held = Some(install);
                    break;
                }
                None => break,
            }
        }
        debug_assert!(
            entries.windows(2).all(|w| w[1].index == w[0].index + 1),
            "committed batches follow each other"
        );
        Some(ApplyWork::Entries(entries))
    }

    /// Applies `entries` (in one sled batch), answers the writes waiting for them, then hands
    /// their changes to the watchers.
    pub fn apply(&mut self, entries: &[Entry]) -> Result<(), WorkerError> {
        let AppliedBatch {
            entries: applied,
            events,
        } = self.sm.apply_with_events(entries)?;
        self.metrics.proposals_applied.inc_by(entries.len() as u64);
        let at = self.sm.applied_index();
        debug_assert!(
            entries.last().is_none_or(|e| e.index <= at),
            "a successful apply reaches its last entry"
        );
        self.pending.resolve(&applied, at);
        self.hub.publish(events, at);
        Ok(())
    }

    /// After the storage worker installed the snapshot at `index`: answers the writes the
    /// snapshot covered.
    pub fn installed(&mut self, index: u64) {
        let at = self.sm.applied_index();
        assert!(
            at >= index,
            "the state machine is at {at} after installing {index}"
        );
        self.pending.resolve(&[], at);
        self.hub.installed(at);
    }

    /// Whether an install point taken off the queue waits to be done next: then there is
    /// work even with an empty queue.
    pub fn holds_install(&self) -> bool {
        self.held.is_some()
    }

    /// The state machine's applied index.
    pub fn applied_index(&self) -> u64 {
        self.sm.applied_index()
    }
}

/// The apply thread's half of the install rendezvous with the storage thread.
pub struct InstallMeeting {
    /// Tells the storage thread everything before the install point is applied.
    pub reached: SyncSender<()>,
    /// The storage thread says the state machine is swapped.
    pub installed: Receiver<()>,
}

/// Both halves of the node's install rendezvous (one pair serves every install: both threads
/// meet the installs in the same order).
pub fn install_meeting() -> (InstallMeeting, super::storage_worker::InstallMeeting) {
    let (reached_tx, reached_rx) = std::sync::mpsc::sync_channel(1);
    let (installed_tx, installed_rx) = std::sync::mpsc::sync_channel(1);
    (
        InstallMeeting {
            reached: reached_tx,
            installed: installed_rx,
        },
        super::storage_worker::InstallMeeting {
            reached: reached_rx,
            installed: installed_tx,
        },
    )
}

/// The applied index as the apply thread publishes it after every batch: an atomic for the
/// value and a `Notify` for the wake-up, so the consensus task can keep one `Notified` armed
/// across its loop (creating a waiter per iteration costs a lock on the waiter list each time).
#[derive(Debug, Default)]
pub struct AppliedIndex {
    index: AtomicU64,
    changed: Notify,
}

impl AppliedIndex {
    pub fn new(index: u64) -> AppliedIndex {
        AppliedIndex {
            index: AtomicU64::new(index),
            changed: Notify::new(),
        }
    }

    /// Publishes `index` (never lowers it) and wakes the waiter.
    pub fn publish(&self, index: u64) {
        self.index.fetch_max(index, Ordering::Release);
        self.changed.notify_one();
    }

    /// The last published index.
    pub fn get(&self) -> u64 {
        self.index.load(Ordering::Acquire)
    }

    /// Resolves after the next [`publish`](Self::publish) (or at once if one happened since the
    /// last wake-up).
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }
}

/// How the apply thread reports: the applied index after every batch, and why it stopped if
/// it failed.
pub struct ApplyReports {
    pub applied: Arc<AppliedIndex>,
    pub failed: mpsc::Sender<WorkerError>,
}

/// Runs the apply thread until the queue closes, an apply fails or an install is abandoned.
pub fn run(
    mut worker: ApplyWorker,
    mut jobs: mpsc::Receiver<ApplyJob>,
    meeting: InstallMeeting,
    reports: ApplyReports,
) {
    loop {
        let first = if worker.holds_install() {
            None
        } else {
            match jobs.blocking_recv() {
                Some(job) => Some(job),
                None => return,
            }
        };
        let Some(work) = worker.next(first, || jobs.try_recv().ok()) else {
            continue;
        };
        match work {
            ApplyWork::Entries(entries) => {
                let started = std::time::Instant::now();
                if let Err(e) = worker.apply(&entries) {
                    tracing::error!(error = %e, "apply failed; stopping the node");
                    let _ = reports.failed.try_send(e);
                    return;
                }
                let took = crate::metrics::seconds(started.elapsed());
                worker.metrics.apply_duration.observe(took);
            }
            ApplyWork::Install { index } => {
                if meeting.reached.send(()).is_err() || meeting.installed.recv().is_err() {
                    // The storage thread gave up on the install: it is stopping the node.
                    return;
                }
                worker.installed(index);
            }
        }
        reports.applied.publish(worker.applied_index());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftkv_storage::command::{Command, CommandOutcome, CommandResult};
    use raftkv_storage::sm::StateMachineOptions;
    use raftkv_storage::EntryKind;
    use std::time::Duration;
    use tokio::sync::oneshot;

    fn test_hub() -> Arc<WatchHub> {
        WatchHub::new(0, crate::watch::WatchSettings::default())
    }

    fn put(index: u64, term: u64, key: &str) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            payload: Command::Put {
                key: key.as_bytes().to_vec(),
                value: b"v".to_vec(),
            }
            .encode()
            .unwrap()
            .into(),
        }
    }

    fn put_result(revision: u64) -> CommandResult {
        CommandResult {
            revision,
            outcome: CommandOutcome::Put {
                create_revision: revision,
                version: 1,
            },
            duplicate: false,
        }
    }

    fn waiting(
        pending: &Pending,
        index: u64,
        term: u64,
    ) -> oneshot::Receiver<Result<ProposalOutcome, ServiceError>> {
        let (tx, rx) = oneshot::channel();
        assert!(pending.insert(index, term, tx).is_ok());
        rx
    }

    #[test]
    fn proposals_are_answered_by_what_applied_at_their_index() {
        let pending = Pending::default();
        let mut same_term = waiting(&pending, 5, 2);
        let mut replaced = waiting(&pending, 6, 2);
        let mut covered = waiting(&pending, 7, 2);
        let mut later = waiting(&pending, 9, 2);
        let applied = [
            AppliedEntry {
                index: 5,
                term: 2,
                outcome: EntryOutcome::Command(put_result(5)),
            },
            AppliedEntry {
                index: 6,
                term: 3,
                outcome: EntryOutcome::Noop,
            },
        ];
        // Index 7 was covered by a snapshot at 8: no entry reports it.
        pending.resolve(&applied, 8);
        assert_eq!(
            same_term.try_recv().unwrap().unwrap(),
            ProposalOutcome {
                index: 5,
                result: put_result(5),
            }
        );
        assert!(matches!(
            replaced.try_recv().unwrap(),
            Err(ServiceError::Unavailable(_))
        ));
        assert!(matches!(
            covered.try_recv().unwrap(),
            Err(ServiceError::Timeout(_))
        ));
        assert!(later.try_recv().is_err(), "index 9 is not applied yet");
        assert_eq!(pending.len(), 1);
        pending.fail_all("stopping");
        // In the log but not seen applied: the outcome is unknown (504), never "did not
        // happen" (503).
        assert!(matches!(
            later.try_recv().unwrap(),
            Err(ServiceError::Timeout(_))
        ));
        assert!(pending.is_empty());
    }

    fn thread(
        sm: &Arc<StateMachine>,
        pending: &Arc<Pending>,
    ) -> (
        mpsc::Sender<ApplyJob>,
        super::super::storage_worker::InstallMeeting,
        Arc<AppliedIndex>,
        mpsc::Receiver<WorkerError>,
        std::thread::JoinHandle<()>,
    ) {
        let (jobs, rx) = mpsc::channel(APPLY_QUEUE_MAX);
        let (failed, failed_rx) = mpsc::channel(1);
        let applied = Arc::new(AppliedIndex::new(0));
        let applied_rx = applied.clone();
        let (ours, storage_half) = install_meeting();
        let metrics = Arc::new(crate::metrics::Metrics::standalone());
        let worker = ApplyWorker::new(sm.clone(), pending.clone(), metrics, test_hub());
        let reports = ApplyReports { applied, failed };
        let handle = std::thread::spawn(move || run(worker, rx, ours, reports));
        (jobs, storage_half, applied_rx, failed_rx, handle)
    }

    fn open_sm(dir: &std::path::Path) -> Arc<StateMachine> {
        Arc::new(StateMachine::open(&dir.join("sm"), StateMachineOptions::default()).unwrap())
    }

    #[test]
    fn the_apply_thread_waits_at_an_install_point_until_the_storage_thread_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open_sm(dir.path());
        let pending = Arc::new(Pending::default());
        let (jobs, storage_half, applied, mut failed_rx, handle) = thread(&sm, &pending);
        let mut first = waiting(&pending, 1, 1);
        jobs.blocking_send(ApplyJob::Entries(vec![put(1, 1, "a"), put(2, 1, "b")]))
            .unwrap();
        jobs.blocking_send(ApplyJob::Install { index: 10 }).unwrap();
        // Queued behind the install point: must not be applied before the install.
        jobs.blocking_send(ApplyJob::Entries(vec![put(11, 2, "c")]))
            .unwrap();
        storage_half
            .reached
            .recv_timeout(Duration::from_secs(10))
            .expect("the apply thread reaches the install point");
        assert_eq!(
            sm.applied_index(),
            2,
            "everything before the point is applied"
        );
        assert!(first.try_recv().unwrap().is_ok());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            sm.applied_index(),
            2,
            "nothing after the point is applied yet"
        );
        // "Install" a snapshot at 10 (the test stands in for the storage thread).
        let entries: Vec<Entry> = (3..=10).map(|i| put(i, 2, "x")).collect();
        sm.apply(&entries).unwrap();
        storage_half.installed.send(()).unwrap();
        drop(jobs);
        handle.join().unwrap();
        assert_eq!(sm.applied_index(), 11);
        assert_eq!(applied.get(), 11, "the applied index is published");
        assert!(failed_rx.try_recv().is_err(), "no failure reported");
    }

    #[test]
    fn an_apply_gap_stops_the_thread_and_reports_why() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open_sm(dir.path());
        let pending = Arc::new(Pending::default());
        let (jobs, _storage_half, _applied, mut failed_rx, handle) = thread(&sm, &pending);
        jobs.blocking_send(ApplyJob::Entries(vec![put(5, 1, "gap")]))
            .unwrap();
        handle.join().unwrap();
        let why = failed_rx.try_recv().unwrap();
        assert!(matches!(why, WorkerError::Apply(_)), "{why}");
    }

    #[test]
    fn batches_merge_up_to_an_install_point_which_is_held_for_the_next_call() {
        let dir = tempfile::tempdir().unwrap();
        let sm = open_sm(dir.path());
        let metrics = Arc::new(crate::metrics::Metrics::standalone());
        let mut worker = ApplyWorker::new(sm, Arc::new(Pending::default()), metrics, test_hub());
        let mut queue: std::collections::VecDeque<ApplyJob> = [
            ApplyJob::Entries(vec![put(1, 1, "a")]),
            ApplyJob::Entries(vec![put(2, 1, "b"), put(3, 1, "c")]),
            ApplyJob::Install { index: 9 },
            ApplyJob::Entries(vec![put(10, 2, "d")]),
        ]
        .into();
        let first = worker.next(None, || queue.pop_front());
        let Some(ApplyWork::Entries(merged)) = first else {
            panic!("{first:?}");
        };
        assert_eq!(
            merged.iter().map(|e| e.index).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(
            worker.next(None, || queue.pop_front()),
            Some(ApplyWork::Install { index: 9 })
        );
        let after = worker.next(None, || queue.pop_front());
        assert!(matches!(after, Some(ApplyWork::Entries(ref e)) if e[0].index == 10));
        assert_eq!(worker.next(None, || queue.pop_front()), None);
    }
}
