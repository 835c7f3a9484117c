//! The consensus task: owns the core, turns events into core calls and `Ready`s into I/O.
//!
//! Invariants kept here:
//! - Every message from a peer passes `peer::validate` (sender = the connection's peer,
//!   recipient = this node, terms, indexes and sizes in range) before the core or the storage
//!   thread sees it; refusals are counted per peer and logged at most once per interval.
//! - A snapshot is streamed to a peer at most once at a time; the core asks for it again only
//!   after the follower acknowledged (or never acknowledged, in time) the previous install.
//! - `messages_after_persist` leave only after the storage thread reported the fsync that
//!   covers them (they ride with the job and come back in `Persisted`).
//! - A proposal is registered in [`Pending`] under its index and term and answered by the
//!   apply thread (see [`super::apply`]); "outcome unknown" (504) comes from the waiting
//!   handler if neither happens in time.
//! - Committed entries go straight to the apply thread, in order; a snapshot install is a
//!   rendezvous point in that same queue, queued before anything committed after it.
//! - A read is answered only from a `ReadState` (leadership confirmed after it arrived, its
//!   index applied) or dropped with "retry".

use super::apply::{ApplyJob, Pending};
use super::peer::{self, PeerMessage, RefusalLog, SnapshotChunk, SNAPSHOT_CHUNK_BYTES};
use super::service::Request;
use super::storage_loop::{StorageEvent, StorageJob};
use super::NodeConfig;
use crate::api::{ClusterStatus, LeaderHint, LeaderInfo, MemberStatus, ServiceError};
use crate::metrics::{seconds, Metrics};
use crate::raft::{Message, MessageBody, Raft, RaftError, Ready, Role};
use crate::transport::{PeerTransport, SendError, TransportEvent};
use raftkv_storage::sm::StateMachine;
use raftkv_storage::snapshot::SnapshotStore;
use raftkv_storage::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch, Notify};

/// A heartbeat round-trip probe older than this many ticks is dropped unanswered (the
/// heartbeat or its response was lost; measuring from it would overstate the round trip).
const ROUND_TRIP_PROBE_TICKS_MAX: u64 = 10;

/// What the consensus task last logged about leadership, to log each change once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seen {
    role: Role,
    term: u64,
    leader: Option<NodeId>,
}

/// One heartbeat in flight to a peer, timed for `raftkv_peer_round_trip_seconds`.
#[derive(Clone, Copy, Debug)]
struct Probe {
    read_round: u64,
    sent: Instant,
    tick: u64,
}

type ReadReply = oneshot::Sender<Result<(u64, NodeId), ServiceError>>;

/// The consensus task's side of the apply thread.
pub struct ApplyQueue {
    pub jobs: std::sync::mpsc::SyncSender<ApplyJob>,
    pub pending: Arc<Pending>,
    /// Notified after every applied batch.
    pub applied: Arc<Notify>,
    /// Why the apply thread stopped, if it failed.
    pub failed: mpsc::Receiver<String>,
}

impl ApplyQueue {
    /// Queues `job` in order; waits (without blocking the runtime) while the queue is full.
    async fn push(&self, mut job: ApplyJob) -> Result<(), super::NodeError> {
        loop {
            match self.jobs.try_send(job) {
                Ok(()) => return Ok(()),
                Err(std::sync::mpsc::TrySendError::Full(back)) => {
                    job = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {
                    return Err(super::NodeError::Stopped("the apply thread is gone".into()))
                }
            }
        }
    }
}

/// The consensus task's state.
pub struct Driver {
    id: NodeId,
    cluster_id: String,
    raft: Raft,
    transport: Arc<PeerTransport<PeerMessage>>,
    snapshots: Arc<SnapshotStore>,
    sm: Arc<StateMachine>,
    jobs: mpsc::Sender<StorageJob>,
    applies: ApplyQueue,
    shutdown: watch::Sender<bool>,
    tick_ms: u64,
    peers: BTreeMap<NodeId, String>,
    client_url: String,
    /// Other members' client URLs, from configuration.
    peer_client_urls: BTreeMap<NodeId, String>,
    reads: BTreeMap<u64, ReadReply>,
    next_read_id: u64,
    snapshot_index: u64,
    /// Peers a snapshot is being streamed to.
    sending_snapshots: BTreeSet<NodeId>,
    /// Snapshot senders report (peer, ok) here.
    snapshot_done_tx: mpsc::Sender<(NodeId, bool)>,
    snapshot_done_rx: mpsc::Receiver<(NodeId, bool)>,
    /// Messages from peers refused by `peer::validate`, counted per peer.
    refusals: RefusalLog,
    /// The clock `refusals` is rate-limited by.
    started: std::time::Instant,
    metrics: Arc<Metrics>,
    /// Leadership as last logged.
    seen: Seen,
    /// Ticks since start (the age of round-trip probes).
    ticks: u64,
    /// The heartbeat being timed, per peer.
    probes: BTreeMap<NodeId, Probe>,
}

impl Driver {
    /// A driver for `raft`, talking to the storage thread through `jobs` and to the apply
    /// thread through `applies`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &NodeConfig,
        raft: Raft,
        transport: Arc<PeerTransport<PeerMessage>>,
        snapshots: Arc<SnapshotStore>,
        sm: Arc<StateMachine>,
        jobs: mpsc::Sender<StorageJob>,
        applies: ApplyQueue,
        shutdown: watch::Sender<bool>,
        metrics: Arc<Metrics>,
    ) -> Driver {
        let snapshot_index = raft.log().base_index();
        let seen = Seen {
            role: raft.role(),
            term: raft.term(),
            leader: raft.leader(),
        };
        let (snapshot_done_tx, snapshot_done_rx) = mpsc::channel(64);
        Driver {
            id: config.id,
            cluster_id: config.cluster_id.clone(),
            raft,
            transport,
            snapshots,
            sm,
            jobs,
            applies,
            shutdown,
            tick_ms: config.heartbeat_ms,
            peers: config.peers.clone(),
            client_url: config.client_url.clone(),
            peer_client_urls: config.peer_client_urls.clone(),
            reads: BTreeMap::new(),
            next_read_id: 1,
            snapshot_index,
            sending_snapshots: BTreeSet::new(),
            snapshot_done_tx,
            snapshot_done_rx,
            refusals: RefusalLog::default(),
            started: std::time::Instant::now(),
            metrics,
            seen,
            ticks: 0,
            probes: BTreeMap::new(),
        }
    }

    /// Runs until shutdown or a fatal storage error.
    pub async fn run(
        mut self,
        mut inbound: mpsc::Receiver<TransportEvent<PeerMessage>>,
        mut events: mpsc::Receiver<StorageEvent>,
        mut requests: mpsc::Receiver<Request>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), super::NodeError> {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.tick_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One `Notified` kept across iterations (re-armed when it fires): creating one per
        // iteration costs a lock on the waiter list every time round the loop.
        let applied = self.applies.applied.clone();
        let mut applied_notified = Box::pin(applied.notified());
        let result = loop {
            tokio::select! {
                // Biased, with the timer before the queues: under a steady stream of messages
                // and requests, heartbeats and elections must still tick.
                biased;
                _ = shutdown.changed() => break Ok(()),
                _ = ticker.tick() => self.on_tick(),
                Some(ev) = events.recv() => {
                    if let Err(e) = self.on_storage(ev) {
                        break Err(e);
                    }
                }
                _ = &mut applied_notified => {
                    applied_notified.set(applied.notified());
                    self.raft.applied(self.sm.applied_index());
                }
                Some(why) = self.applies.failed.recv() => break Err(super::NodeError::Stopped(why)),
                Some((peer, ok)) = self.snapshot_done_rx.recv() => {
                    self.sending_snapshots.remove(&peer);
                    self.raft.snapshot_sent(peer, ok);
                }
                Some(ev) = inbound.recv() => self.on_transport(ev).await,
                Some(req) = requests.recv() => self.on_request(req),
            }
            if let Err(e) = self.drain_ready().await {
                break Err(e);
            }
            self.observe_leadership();
        };
        self.fail_all("the node is shutting down");
        refuse_unproposed(&mut requests);
        if let Err(e) = &result {
            tracing::error!(error = %e, "consensus task stopping");
            let _ = self.shutdown.send(true);
        }
        result
    }

    fn on_tick(&mut self) {
        self.raft.tick();
        self.ticks += 1;
        let oldest = self.ticks.saturating_sub(ROUND_TRIP_PROBE_TICKS_MAX);
        self.probes.retain(|_, p| p.tick >= oldest);
    }

    /// Logs each change of role, term or leader once, and counts new leaders.
    fn observe_leadership(&mut self) {
        let now = Seen {
            role: self.raft.role(),
            term: self.raft.term(),
            leader: self.raft.leader(),
        };
        if now == self.seen {
            return;
        }
        let before = std::mem::replace(&mut self.seen, now);
        debug_assert!(now.term >= before.term, "the term never decreases");
        if now.role != before.role || now.term != before.term {
            match now.role {
                Role::PreCandidate | Role::Candidate => tracing::info!(
                    term = now.term,
                    pre_vote = now.role == Role::PreCandidate,
                    last_index = self.raft.log().last_index(),
                    "election started"
                ),
                Role::Leader => tracing::info!(
                    term = now.term,
                    last_index = self.raft.log().last_index(),
                    commit_index = self.raft.commit_index(),
                    "became leader"
                ),
                Role::Follower if before.role == Role::Leader => {
                    tracing::info!(term = now.term, previous_term = before.term, "stepped down")
                }
                Role::Follower => {}
            }
        }
        if now.leader != before.leader {
            match now.leader {
                Some(leader) => {
                    self.metrics.leader_changes_seen.inc();
                    tracing::info!(
                        term = now.term,
                        leader,
                        previous_leader = before.leader.unwrap_or(0),
                        "leader changed"
                    );
                }
                None => tracing::info!(
                    term = now.term,
                    previous_leader = before.leader.unwrap_or(0),
                    "leader lost"
                ),
            }
        }
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
    fn probe_answered(&mut self, from: NodeId, m: &Message) {
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

    /// Answers what is in flight as the task stops: proposals in the log get "outcome
    /// unknown", reads get "retry".
    fn fail_all(&mut self, why: &str) {
        self.applies.pending.fail_all(why);
        for (_, reply) in std::mem::take(&mut self.reads) {
            let _ = reply.send(Err(ServiceError::Unavailable(why.into())));
        }
    }

    fn on_storage(&mut self, ev: StorageEvent) -> Result<(), super::NodeError> {
        match ev {
            StorageEvent::Persisted {
                last: (index, term),
            } => self.raft.persisted(index, term),
            StorageEvent::Compacted {
                index,
                term,
                snapshot_index,
            } => {
                self.snapshot_index = snapshot_index;
                // The apply thread's report of this index may still be in flight.
                self.raft.applied(self.sm.applied_index());
                if let Err(e) = self.raft.compact(index, term) {
                    tracing::warn!(index, term, error = %e, "core compaction refused");
                }
            }
            StorageEvent::SnapshotReceived { from, term, meta } => {
                let m = Message {
                    from,
                    to: self.id,
                    term,
                    body: MessageBody::InstallSnapshot { meta },
                };
                if let Err(e) = self.raft.step(m) {
                    tracing::warn!(from, error = %e, "snapshot install refused by the core");
                }
            }
            StorageEvent::Failed(why) => return Err(super::NodeError::Stopped(why)),
        }
        Ok(())
    }

    async fn on_transport(&mut self, ev: TransportEvent<PeerMessage>) {
        match ev {
            TransportEvent::Message { from, message } => {
                if let Err(e) = peer::validate(from, self.id, &message) {
                    self.refused(from, &e);
                    return;
                }
                self.on_peer_message(from, message).await;
            }
            TransportEvent::Unreachable { peer } => self.raft.peer_unreachable(peer),
        }
    }

    /// Counts a refused message from `peer`; logs it at most once per peer per interval.
    fn refused(&mut self, peer: NodeId, error: &dyn std::error::Error) {
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(count) = self.refusals.refused(peer, now_ms) {
            tracing::warn!(
                peer,
                refused = count,
                refused_total = self.refusals.total(peer),
                error = %error,
                "invalid message from a peer; dropped"
            );
        }
    }

    /// Acts on a message that passed `peer::validate`.
    async fn on_peer_message(&mut self, from: NodeId, message: PeerMessage) {
        match message {
            PeerMessage::Raft(m) => {
                self.probe_answered(from, &m);
                match self.raft.step(m) {
                    Ok(()) => {}
                    Err(RaftError::UnknownPeer(p)) => {
                        tracing::warn!(peer = p, "message from an unknown peer")
                    }
                    Err(e @ RaftError::InvalidMessage { .. }) => self.refused(from, &e),
                    Err(e) => tracing::debug!(from, error = %e, "message refused"),
                }
            }
            PeerMessage::SnapshotChunk(chunk) => {
                if self
                    .jobs
                    .send(super::storage_loop::StorageJob::Chunk { from, chunk })
                    .await
                    .is_err()
                {
                    tracing::warn!("storage thread gone; dropping a snapshot chunk");
                }
            }
        }
    }

    fn leader_hint(&self) -> Option<LeaderHint> {
        self.raft.leader().map(|id| LeaderHint {
            id,
            client_url: if id == self.id {
                Some(self.client_url.clone())
            } else {
                self.peer_client_urls.get(&id).cloned()
            },
        })
    }

    fn on_request(&mut self, req: Request) {
        match req {
            Request::Propose { payload, reply } => {
                if self.applies.pending.len() >= super::apply::PENDING_PROPOSALS_MAX {
                    let _ = reply.send(Err(ServiceError::Unavailable(
                        "too many writes in flight".into(),
                    )));
                    return;
                }
                match self.raft.propose(payload) {
                    Ok((index, term)) => {
                        // Only this task inserts, after the check above: this cannot be full.
                        // The entry is in the log now: whatever happens next, a refusal
                        // here could only say "outcome unknown".
                        if let Err(reply) = self.applies.pending.insert(index, term, reply) {
                            let _ = reply.send(Err(ServiceError::Timeout(format!(
                                "too many writes in flight to watch the one at index {index}"
                            ))));
                        }
                    }
                    Err(e) => {
                        let _ = reply.send(Err(self.map_raft_error(e)));
                    }
                }
            }
            Request::Read { reply } => {
                let id = self.next_read_id;
                self.next_read_id += 1;
                match self.raft.read_index(id) {
                    Ok(()) => {
                        self.reads.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(self.map_raft_error(e)));
                    }
                }
            }
            Request::Transfer { to, reply } => {
                let result = self
                    .raft
                    .transfer_leadership(to)
                    .map_err(|e| self.map_raft_error(e));
                let _ = reply.send(result);
            }
            Request::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Request::Ready { reply } => {
                let _ = reply.send(self.readiness());
            }
        }
    }

    fn map_raft_error(&self, e: RaftError) -> ServiceError {
        match e {
            RaftError::NotLeader { .. } => ServiceError::NotLeader {
                leader: self.leader_hint(),
            },
            RaftError::UnknownPeer(p) => {
                ServiceError::InvalidInput(format!("node {p} is not a member"))
            }
            RaftError::TransferInProgress { to } => {
                ServiceError::Unavailable(format!("leadership is moving to node {to}"))
            }
            other => ServiceError::Unavailable(other.to_string()),
        }
    }

    fn readiness(&self) -> Result<(), ServiceError> {
        let Some(_) = self.raft.leader() else {
            return Err(ServiceError::Unavailable("no leader is known".into()));
        };
        let commit = self.raft.commit_index();
        if self.raft.log().term(commit) != Some(self.raft.term()) {
            return Err(ServiceError::Unavailable(
                "the leader's first entry of this term is not committed here yet".into(),
            ));
        }
        // The state machine, not the core, says what is applied: the core counts an
        // accepted snapshot as applied before the storage thread has installed it.
        let applied = self.sm.applied_index();
        if applied < commit {
            return Err(ServiceError::Unavailable(format!(
                "applied {applied} of {commit} committed entries"
            )));
        }
        Ok(())
    }

    fn status(&self) -> ClusterStatus {
        let leader = self.raft.leader().map(|id| LeaderInfo {
            id,
            client_url: self.leader_hint().and_then(|h| h.client_url),
        });
        let is_leader = self.raft.role() == Role::Leader;
        let mut members: Vec<MemberStatus> = self
            .peers
            .iter()
            .map(|(id, addr)| MemberStatus {
                id: *id,
                peer_addr: addr.clone(),
                client_url: self.peer_client_urls.get(id).cloned(),
                match_index: if is_leader {
                    self.raft.progress(*id).map(|p| p.match_index)
                } else {
                    None
                },
            })
            .collect();
        members.push(MemberStatus {
            id: self.id,
            peer_addr: self.transport.local_addr().to_string(),
            client_url: Some(self.client_url.clone()),
            match_index: is_leader.then(|| self.raft.persisted_index()),
        });
        members.sort_by_key(|m| m.id);
        ClusterStatus {
            id: self.id,
            cluster_id: self.cluster_id.clone(),
            role: self.raft.role().name().to_string(),
            term: self.raft.term(),
            leader,
            first_index: self.raft.log().first_index(),
            last_index: self.raft.log().last_index(),
            commit_index: self.raft.commit_index(),
            applied_index: self.sm.applied_index(),
            snapshot_index: self.snapshot_index.max(self.raft.log().base_index()),
            members,
        }
    }

    fn send(&mut self, m: Message) {
        self.probe_sent(&m);
        super::storage_loop::send_message(&self.transport, m);
    }

    /// Takes every `Ready` the core has and dispatches it.
    async fn drain_ready(&mut self) -> Result<(), super::NodeError> {
        loop {
            let rd: Ready = self.raft.ready();
            if rd.is_empty() {
                return Ok(());
            }
            // The install's point in the apply queue comes before anything committed after it.
            let install = match rd.snapshot {
                Some(meta) => {
                    let (apply_point, storage_half) = super::apply::install_sync();
                    self.applies.push(apply_point).await?;
                    Some((meta, storage_half))
                }
                None => None,
            };
            // First, so the apply (and the write's answer) starts before anything else here.
            // Committed entries are durable here already (the core hands out only entries at or
            // below what was reported persisted): they need not wait for the storage thread.
            if !rd.committed.is_empty() {
                let committed = rd.committed.len() as u64;
                self.applies.push(ApplyJob::Entries(rd.committed)).await?;
                self.metrics.proposals_committed.inc_by(committed);
            }
            for m in rd.messages_now {
                self.send(m);
            }
            for rs in rd.read_states {
                if let Some(reply) = self.reads.remove(&rs.id) {
                    let _ = reply.send(Ok((rs.index, self.raft.leader().unwrap_or(self.id))));
                }
            }
            for id in rd.reads_dropped {
                if let Some(reply) = self.reads.remove(&id) {
                    let _ = reply.send(Err(ServiceError::Unavailable(
                        "leadership changed before the read was confirmed; retry".into(),
                    )));
                }
            }
            for send in rd.snapshot_sends {
                self.start_snapshot_send(send.to, send.term);
            }
            let durable = rd.hard_state.is_some()
                || install.is_some()
                || !rd.entries.is_empty()
                || !rd.messages_after_persist.is_empty();
            if durable {
                let job = StorageJob::Ready {
                    hard_state: rd.hard_state,
                    install,
                    entries: rd.entries,
                    after_persist: rd.messages_after_persist,
                };
                self.jobs
                    .send(job)
                    .await
                    .map_err(|_| super::NodeError::Stopped("the storage thread is gone".into()))?;
            }
        }
    }

    /// Streams a fresh snapshot file to `to` on a blocking thread (one per peer at a time).
    fn start_snapshot_send(&mut self, to: NodeId, term: u64) {
        if !self.sending_snapshots.insert(to) {
            return;
        }
        let snapshots = self.snapshots.clone();
        let sm = self.sm.clone();
        let transport = self.transport.clone();
        let done = self.snapshot_done_tx.clone();
        let metrics = self.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let ok = match stream_snapshot(&snapshots, &sm, &transport, to, term, &metrics) {
                Ok(sent) => {
                    let took = started.elapsed();
                    metrics.snapshot_send_duration.observe(seconds(took));
                    tracing::info!(
                        peer = to,
                        index = sent.index,
                        term = sent.term,
                        bytes = sent.bytes,
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
            let _ = done.blocking_send((to, ok));
        });
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
            Request::Read { reply } => drop(reply.send(Err(stopping()))),
            Request::Transfer { reply, .. } => drop(reply.send(Err(stopping()))),
            Request::Ready { reply } => drop(reply.send(Err(stopping()))),
            Request::Status { .. } => {}
        }
    }
}

/// What [`stream_snapshot`] sent.
struct SnapshotSent {
    index: u64,
    term: u64,
    bytes: u64,
}

/// Creates a snapshot file of the current state and sends it in chunks.
fn stream_snapshot(
    snapshots: &SnapshotStore,
    sm: &StateMachine,
    transport: &PeerTransport<PeerMessage>,
    to: NodeId,
    term: u64,
    metrics: &Metrics,
) -> Result<SnapshotSent, String> {
    let create_started = Instant::now();
    let created = snapshots
        .create(sm)
        .map_err(|e| format!("creating a snapshot: {e}"))?;
    metrics
        .snapshot_create_duration
        .observe(seconds(create_started.elapsed()));
    let mut file = std::fs::File::open(&created.file.path)
        .map_err(|e| format!("opening {}: {e}", created.file.path.display()))?;
    let total_bytes = file
        .metadata()
        .map_err(|e| format!("stat {}: {e}", created.file.path.display()))?
        .len();
    let mut offset = 0u64;
    let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
    loop {
        let n = read_full(&mut file, &mut buf).map_err(|e| format!("reading the snapshot: {e}"))?;
        // A full queue consumes the message it refuses, so each attempt builds its own.
        let chunk = || SnapshotChunk {
            term,
            meta: created.meta.clone(),
            file_name: created.file.name.clone(),
            offset,
            total_bytes,
            data: buf[..n].to_vec(),
        };
        let first = chunk();
        let last = first.is_last();
        let mut attempt = Some(first);
        let mut waited_ms = 0;
        loop {
            let message = PeerMessage::SnapshotChunk(attempt.take().unwrap_or_else(chunk));
            match transport.send(to, message) {
                Ok(()) => break,
                Err(SendError::QueueFull(_)) if waited_ms < 30_000 => {
                    std::thread::sleep(Duration::from_millis(5));
                    waited_ms += 5;
                }
                Err(e) => return Err(format!("sending a chunk: {e}")),
            }
        }
        offset += n as u64;
        if last || n == 0 {
            return Ok(SnapshotSent {
                index: created.meta.index,
                term: created.meta.term,
                bytes: offset,
            });
        }
    }
}

fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}
