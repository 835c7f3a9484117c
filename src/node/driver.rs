//! The consensus task: the thin async shell around [`Consensus`]. It turns the timer, the
//! transport, the API's requests and the workers' reports into [`Input`]s, and the step's
//! [`Outputs`] into I/O: messages to the transport, jobs to the storage and apply threads,
//! snapshot streams. Every wait is a notification (channel, `Notify`, timer), never a poll.
//!
//! What lives here and not in the step, because it needs a clock or a socket: the heartbeat
//! round-trip probes behind `raftkv_peer_round_trip_seconds`, and the snapshot streams.

use super::consensus::Consensus;
use super::messages::{
    ApplyJob, Input, Outputs, PeerMessage, Request, StorageEvent, StorageJob, WorkerError,
};
use crate::api::ServiceError;
use crate::metrics::{seconds, Metrics};
use crate::raft::{Message, MessageBody};
use crate::transport::{PeerTransport, TransportEvent};
use raftkv_storage::sm::StateMachine;
use raftkv_storage::snapshot::transfer::CHUNK_BYTES_MAX;
use raftkv_storage::snapshot::SnapshotStore;
use raftkv_storage::NodeId;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// A heartbeat round-trip probe older than this many ticks is dropped unanswered (the
/// heartbeat or its response was lost; measuring from it would overstate the round trip).
const ROUND_TRIP_PROBE_TICKS_MAX: u64 = 10;

/// How long a snapshot stream waits for room in a peer's queue before giving up.
const SNAPSHOT_CHUNK_WAIT_MS: u64 = 30_000;

/// One heartbeat in flight to a peer, timed for `raftkv_peer_round_trip_seconds`.
#[derive(Clone, Copy, Debug)]
struct Probe {
    read_round: u64,
    sent: Instant,
    tick: u64,
}

/// The channels the consensus task listens on.
pub struct DriverInputs {
    pub inbound: mpsc::Receiver<TransportEvent<PeerMessage>>,
    pub events: mpsc::Receiver<StorageEvent>,
    pub requests: mpsc::Receiver<Request>,
    /// The apply thread's applied index.
    pub applied: Arc<super::apply::AppliedIndex>,
    pub apply_failed: mpsc::Receiver<WorkerError>,
    pub shutdown: watch::Receiver<bool>,
}

/// The consensus task's state.
pub struct Driver {
    consensus: Consensus,
    transport: Arc<PeerTransport<PeerMessage>>,
    snapshots: Arc<SnapshotStore>,
    sm: Arc<StateMachine>,
    jobs: mpsc::Sender<StorageJob>,
    applies: mpsc::Sender<ApplyJob>,
    shutdown: watch::Sender<bool>,
    tick_ms: u64,
    /// Snapshot streams report (peer, ok) here.
    snapshot_done_tx: mpsc::Sender<(NodeId, bool)>,
    snapshot_done_rx: mpsc::Receiver<(NodeId, bool)>,
    metrics: Arc<Metrics>,
    /// Ticks since start (the age of round-trip probes).
    ticks: u64,
    /// The heartbeat being timed, per peer.
    probes: BTreeMap<NodeId, Probe>,
}

impl Driver {
    /// A driver for `consensus`, feeding the storage thread through `jobs` and the apply
    /// thread through `applies`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        consensus: Consensus,
        tick_ms: u64,
        transport: Arc<PeerTransport<PeerMessage>>,
        snapshots: Arc<SnapshotStore>,
        sm: Arc<StateMachine>,
        jobs: mpsc::Sender<StorageJob>,
        applies: mpsc::Sender<ApplyJob>,
        shutdown: watch::Sender<bool>,
        metrics: Arc<Metrics>,
    ) -> Driver {
        let (snapshot_done_tx, snapshot_done_rx) = mpsc::channel(64);
        Driver {
            consensus,
            transport,
            snapshots,
            sm,
            jobs,
            applies,
            shutdown,
            tick_ms,
            snapshot_done_tx,
            snapshot_done_rx,
            metrics,
            ticks: 0,
            probes: BTreeMap::new(),
        }
    }

    /// Runs until shutdown or a fatal storage or apply error.
    pub async fn run(mut self, mut inputs: DriverInputs) -> Result<(), super::NodeError> {
        let clock_origin = Instant::now();
        let mut ticker = tokio::time::interval(Duration::from_millis(self.tick_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = Outputs::default();
        // One `Notified` kept across iterations (re-armed when it fires).
        let applied = inputs.applied.clone();
        let mut applied_changed = Box::pin(applied.changed());
        let result = loop {
            let input = tokio::select! {
                // Biased, with the timer before the queues: under a steady stream of messages
                // and requests, heartbeats and elections must still tick.
                biased;
                _ = inputs.shutdown.changed() => break Ok(()),
                _ = ticker.tick() => {
                    self.on_tick();
                    Input::Tick
                }
                Some(ev) = inputs.events.recv() => Input::Storage(ev),
                _ = &mut applied_changed => {
                    applied_changed.set(applied.changed());
                    Input::Applied { index: applied.get() }
                }
                Some(e) = inputs.apply_failed.recv() => Input::ApplyFailed(e),
                Some((peer, ok)) = self.snapshot_done_rx.recv() => Input::SnapshotSent { peer, ok },
                Some(ev) = inputs.inbound.recv() => match ev {
                    TransportEvent::Message { from, message } => {
                        self.probe_answered(from, &message);
                        Input::Peer { from, message }
                    }
                    TransportEvent::Unreachable { peer } => Input::Unreachable { peer },
                },
                Some(req) = inputs.requests.recv() => Input::Request(req),
            };
            // Read after the input arrived, so a lease is never judged by a time before it.
            let now_ms = u64::try_from(clock_origin.elapsed().as_millis()).unwrap_or(u64::MAX);
            if let Err(e) = self.consensus.step(input, now_ms, &mut out) {
                break Err(super::NodeError::Stopped(e.to_string()));
            }
            if let Err(e) = self.dispatch(&mut out).await {
                break Err(e);
            }
        };
        self.consensus.fail_all("the node is shutting down");
        refuse_unproposed(&mut inputs.requests);
        if let Err(e) = &result {
            tracing::error!(error = %e, "consensus task stopping");
            let _ = self.shutdown.send(true);
        }
        result
    }

    /// Carries out one step's outputs. The storage and apply queues are bounded: a full one
    /// makes this task wait (notified when there is room), which holds back new input.
    async fn dispatch(&mut self, out: &mut Outputs) -> Result<(), super::NodeError> {
        // The peer set first: messages of this step may go to a member it adds.
        if let Some(peers) = out.peers.take() {
            tracing::info!(?peers, "peer set changed");
            self.transport.set_peers(peers);
        }
        // Applies first, so the apply (and the write's answer) starts before anything else.
        for job in out.apply.drain(..) {
            self.applies
                .send(job)
                .await
                .map_err(|_| super::NodeError::Stopped("the apply thread is gone".into()))?;
        }
        for m in out.messages.drain(..) {
            self.probe_sent(&m);
            super::storage_worker::send_message(&self.transport, m);
        }
        for (to, term) in out.snapshot_sends.drain(..) {
            self.start_snapshot_send(to, term);
        }
        for job in out.storage.drain(..) {
            self.jobs
                .send(job)
                .await
                .map_err(|_| super::NodeError::Stopped("the storage thread is gone".into()))?;
        }
        Ok(())
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        let oldest = self.ticks.saturating_sub(ROUND_TRIP_PROBE_TICKS_MAX);
        self.probes.retain(|_, p| p.tick >= oldest);
    }

    /// Times the first heartbeat in flight to each peer.
    fn probe_sent(&mut self, m: &Message) {
        if let MessageBody::Heartbeat { read_round, .. } = m.body {
            let tick = self.ticks;
            // The clock is read only when a probe starts, not for every heartbeat.
            self.probes.entry(m.to).or_insert_with(|| Probe {
                read_round,
                sent: Instant::now(),
                tick,
            });
        }
    }

    /// Observes a heartbeat's round trip when its response arrives.
    fn probe_answered(&mut self, from: NodeId, message: &PeerMessage) {
        let PeerMessage::Raft(m) = message else {
            return;
        };
        let MessageBody::HeartbeatResponse { read_round } = m.body else {
            return;
        };
        let Some(probe) = self.probes.get(&from).copied() else {
            return;
        };
        if read_round < probe.read_round {
            return; // an answer to an older heartbeat
        }
        self.probes.remove(&from);
        if read_round == probe.read_round {
            if let Some(peer) = self.metrics.peer(from) {
                peer.round_trip.observe(seconds(probe.sent.elapsed()));
            }
        }
    }

    /// Streams a fresh snapshot file to `to` (one stream per peer at a time: the consensus
    /// step asks for another only after this one reported).
    fn start_snapshot_send(&mut self, to: NodeId, term: u64) {
        let stream = SnapshotStream {
            snapshots: self.snapshots.clone(),
            sm: self.sm.clone(),
            transport: self.transport.clone(),
            metrics: self.metrics.clone(),
            to,
            term,
        };
        let done = self.snapshot_done_tx.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let ok = match stream.run().await {
                Ok((index, snapshot_term, bytes)) => {
                    let took = started.elapsed();
                    stream.metrics.snapshot_send_duration.observe(seconds(took));
                    tracing::info!(
                        peer = to,
                        index,
                        term = snapshot_term,
                        bytes,
                        duration_ms = took.as_millis() as u64,
                        "snapshot sent"
                    );
                    true
                }
                Err(e) => {
                    tracing::warn!(peer = to, error = %e, "snapshot send failed");
                    false
                }
            };
            let _ = done.send((to, ok)).await;
        });
    }
}

/// One snapshot stream to a peer.
struct SnapshotStream {
    snapshots: Arc<SnapshotStore>,
    sm: Arc<StateMachine>,
    transport: Arc<PeerTransport<PeerMessage>>,
    metrics: Arc<Metrics>,
    to: NodeId,
    term: u64,
}

/// Why a snapshot stream stopped.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error(transparent)]
    Snapshot(#[from] raftkv_storage::snapshot::SnapshotError),
    #[error("the peer's queue stayed full for {0} ms")]
    Stalled(u64),
    #[error("sending a chunk: {0}")]
    Send(#[from] crate::transport::SendError),
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

impl SnapshotStream {
    /// Creates a snapshot file of the current state and sends it in chunks; returns its
    /// (index, term, bytes).
    async fn run(&self) -> Result<(u64, u64, u64), StreamError> {
        let (snapshots, sm) = (self.snapshots.clone(), self.sm.clone());
        let create_started = Instant::now();
        let created = tokio::task::spawn_blocking(move || snapshots.create(&sm)).await??;
        self.metrics
            .snapshot_create_duration
            .observe(seconds(create_started.elapsed()));
        let mut source = self.snapshots.chunk_source(
            &created.file,
            &created.meta,
            self.term,
            CHUNK_BYTES_MAX,
        )?;
        loop {
            let (back, chunk) = tokio::task::spawn_blocking(move || {
                let chunk = source.next_chunk();
                (source, chunk)
            })
            .await?;
            source = back;
            let Some(chunk) = chunk? else {
                return Ok((created.meta.index, created.meta.term, source.sent_bytes()));
            };
            let wait = Duration::from_millis(SNAPSHOT_CHUNK_WAIT_MS);
            let message = PeerMessage::SnapshotChunk(chunk);
            tokio::time::timeout(wait, self.transport.send_wait(self.to, message))
                .await
                .map_err(|_| StreamError::Stalled(SNAPSHOT_CHUNK_WAIT_MS))??;
        }
    }
}

/// Answers the requests still queued when the consensus task stops: none of them reached the
/// core, so a write among them certainly had no effect (503, safe to retry).
fn refuse_unproposed(requests: &mut mpsc::Receiver<Request>) {
    requests.close();
    let stopping = || ServiceError::Unavailable("the node is shutting down".into());
    while let Ok(req) = requests.try_recv() {
        match req {
            Request::Propose { reply, .. } => drop(reply.send(Err(stopping()))),
            Request::Read { reply, .. } => drop(reply.send(Err(stopping()))),
            Request::Transfer { reply, .. } => drop(reply.send(Err(stopping()))),
            Request::Ready { reply } => drop(reply.send(Err(stopping()))),
            Request::ChangeMembership { reply, .. } => drop(reply.send(Err(stopping()))),
            Request::Status { .. } => {}
        }
    }
}
