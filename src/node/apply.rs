//! The apply thread: applies committed entries to the state machine, in log order, and
//! answers the proposals waiting for them.
//!
//! It is fed straight by the consensus task, not through the storage thread: the core hands
//! out only entries that are already durable locally (`commit.min(persisted)`), so nothing
//! has to wait for the next fsync, and a write's answer leaves as soon as sled has it — no hop
//! back through the consensus task. That task learns the applied index through a
//! [`tokio::sync::Notify`], which never blocks the apply thread (a blocking report could
//! deadlock against the consensus task blocked on a full apply queue).
//!
//! Invariants:
//! - Entries reach the state machine in index order with no gap: everything goes through one
//!   FIFO queue, and a snapshot install is a point in that queue ([`ApplyJob::Install`]) at
//!   which the apply thread stops until the storage thread has installed it. Entries handed
//!   out after the snapshot queue behind that point.
//! - A proposal is answered once: success if the entry applied at its index has its term,
//!   "not applied" if another entry took the index, "outcome unknown" if a snapshot covered
//!   the index before its entry was seen here.

use super::service::ProposalOutcome;
use crate::api::ServiceError;
use raftkv_storage::command::CommandOutcome;
use raftkv_storage::sm::{AppliedEntry, EntryOutcome, StateMachine};
use raftkv_storage::Entry;
use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::{oneshot, Notify};

/// Committed batches queued for the apply thread.
pub const APPLY_QUEUE_MAX: usize = 1024;
/// The most proposals waiting for their entry to apply.
pub const PENDING_PROPOSALS_MAX: usize = 65_536;

pub type ProposalReply = oneshot::Sender<Result<ProposalOutcome, ServiceError>>;

/// Work for the apply thread.
pub enum ApplyJob {
    /// Committed, locally durable entries, in order, following the previous batch.
    Entries(Vec<Entry>),
    /// A snapshot install: tell `reached` that everything before is applied, then wait on
    /// `installed` while the storage thread swaps the state machine.
    Install {
        reached: SyncSender<()>,
        installed: Receiver<()>,
    },
}

/// The storage thread's half of an [`ApplyJob::Install`].
#[derive(Debug)]
pub struct InstallSync {
    pub reached: Receiver<()>,
    pub installed: SyncSender<()>,
}

/// Both halves of one install rendezvous.
pub fn install_sync() -> (ApplyJob, InstallSync) {
    let (reached_tx, reached_rx) = std::sync::mpsc::sync_channel(1);
    let (installed_tx, installed_rx) = std::sync::mpsc::sync_channel(1);
    (
        ApplyJob::Install {
            reached: reached_tx,
            installed: installed_rx,
        },
        InstallSync {
            reached: reached_rx,
            installed: installed_tx,
        },
    )
}

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
                Ok(ProposalOutcome {
                    index: entry.index,
                    deleted: matches!(
                        entry.outcome,
                        EntryOutcome::Command(CommandOutcome::Delete { existed: true })
                    ),
                })
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

/// How the apply thread reports: `applied` is notified after every batch (the index is the
/// state machine's), `failed` carries the reason it stopped on an error.
pub struct ApplyReports {
    pub applied: Arc<Notify>,
    pub failed: tokio::sync::mpsc::Sender<String>,
    /// `raftkv_apply_duration_seconds` and `raftkv_server_proposals_applied_total`.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Entries merged into one state machine batch at most: one sled batch has a fixed cost of
/// tens of microseconds, so everything queued while the last one ran goes in the next.
pub const APPLY_BATCH_ENTRIES_MAX: usize = 4096;

/// Runs the apply thread until the queue closes, an apply fails or an install is abandoned.
pub fn run(
    sm: Arc<StateMachine>,
    pending: Arc<Pending>,
    jobs: Receiver<ApplyJob>,
    reports: ApplyReports,
) {
    let mut held: Option<ApplyJob> = None;
    loop {
        let job = match held.take() {
            Some(job) => job,
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        match job {
            ApplyJob::Entries(mut entries) => {
                // Merge what else is queued, up to an install point.
                while entries.len() < APPLY_BATCH_ENTRIES_MAX {
                    match jobs.try_recv() {
                        Ok(ApplyJob::Entries(more)) => entries.extend(more),
                        Ok(install) => {
                            held = Some(install);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let started = std::time::Instant::now();
                match sm.apply(&entries) {
                    Ok(applied) => {
                        let m = &reports.metrics;
                        m.apply_duration
                            .observe(crate::metrics::seconds(started.elapsed()));
                        m.proposals_applied.inc_by(entries.len() as u64);
                        pending.resolve(&applied, sm.applied_index());
                        reports.applied.notify_one();
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "apply failed; stopping the node");
                        let _ = reports.failed.try_send(format!("apply: {e}"));
                        return;
                    }
                }
            }
            ApplyJob::Install { reached, installed } => {
                if reached.send(()).is_err() || installed.recv().is_err() {
                    // The storage thread gave up on the install: it is stopping the node.
                    return;
                }
                pending.resolve(&[], sm.applied_index());
                reports.applied.notify_one();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftkv_storage::command::Command;
    use raftkv_storage::sm::StateMachineOptions;
    use raftkv_storage::EntryKind;
    use std::time::Duration;

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
            .unwrap(),
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
                outcome: EntryOutcome::Command(CommandOutcome::Put),
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
                deleted: false
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

    #[test]
    fn the_apply_thread_waits_at_an_install_point_until_the_storage_thread_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let sm = Arc::new(
            StateMachine::open(&dir.path().join("sm"), StateMachineOptions::default()).unwrap(),
        );
        let pending = Arc::new(Pending::default());
        let (jobs, rx) = std::sync::mpsc::sync_channel(APPLY_QUEUE_MAX);
        let (failed, mut failed_rx) = tokio::sync::mpsc::channel(1);
        let reports = ApplyReports {
            applied: Arc::new(Notify::new()),
            failed,
            metrics: Arc::new(crate::metrics::Metrics::standalone()),
        };
        let thread = {
            let (sm, pending) = (sm.clone(), pending.clone());
            std::thread::spawn(move || run(sm, pending, rx, reports))
        };
        let mut first = waiting(&pending, 1, 1);
        jobs.send(ApplyJob::Entries(vec![put(1, 1, "a"), put(2, 1, "b")]))
            .unwrap();
        let (point, storage_half) = install_sync();
        jobs.send(point).unwrap();
        // Queued behind the install point: must not be applied before the install.
        jobs.send(ApplyJob::Entries(vec![put(11, 2, "c")])).unwrap();
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
        thread.join().unwrap();
        assert_eq!(sm.applied_index(), 11);
        assert!(failed_rx.try_recv().is_err(), "no failure reported");
    }

    #[test]
    fn an_apply_gap_stops_the_thread_and_reports_why() {
        let dir = tempfile::tempdir().unwrap();
        let sm = Arc::new(
            StateMachine::open(&dir.path().join("sm"), StateMachineOptions::default()).unwrap(),
        );
        let (jobs, rx) = std::sync::mpsc::sync_channel(4);
        let (failed, mut failed_rx) = tokio::sync::mpsc::channel(1);
        let reports = ApplyReports {
            applied: Arc::new(Notify::new()),
            failed,
            metrics: Arc::new(crate::metrics::Metrics::standalone()),
        };
        let pending = Arc::new(Pending::default());
        let thread = std::thread::spawn(move || run(sm, pending, rx, reports));
        jobs.send(ApplyJob::Entries(vec![put(5, 1, "gap")]))
            .unwrap();
        thread.join().unwrap();
        let why = failed_rx.try_recv().unwrap();
        assert!(why.starts_with("apply:"), "{why}");
    }
}
