//! The consensus task: owns the core, turns events into core calls and `Ready`s into I/O.
//!
//! Invariants kept here:
//! - `messages_after_persist` leave only after the storage thread reported the fsync that
//!   covers them (they ride with the job and come back in `Persisted`).
//! - A proposal is answered when the entry at its index is applied: success if the applied
//!   entry has the proposal's term, "not applied" if another entry took that index, "outcome
//!   unknown" (504, from the waiting handler) if neither happens in time.
//! - A read is answered only from a `ReadState` (leadership confirmed after it arrived, its
//!   index applied) or dropped with "retry".

use super::peer::{PeerMessage, SnapshotChunk, SNAPSHOT_CHUNK_BYTES};
use super::service::{ProposalOutcome, Request};
use super::storage_loop::{StorageEvent, StorageJob};
use super::NodeConfig;
use crate::api::{ClusterStatus, LeaderHint, LeaderInfo, MemberStatus, ServiceError};
use crate::raft::{Message, MessageBody, Raft, RaftError, Ready, Role};
use crate::transport::{PeerTransport, SendError, TransportEvent};
use raftkv_storage::command::CommandOutcome;
use raftkv_storage::sm::{EntryOutcome, StateMachine};
use raftkv_storage::snapshot::SnapshotStore;
use raftkv_storage::NodeId;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// The most proposals waiting for their entry to apply.
pub const PENDING_PROPOSALS_MAX: usize = 65_536;

type ProposalReply = oneshot::Sender<Result<ProposalOutcome, ServiceError>>;
type ReadReply = oneshot::Sender<Result<(u64, NodeId), ServiceError>>;

/// The consensus task's state.
pub struct Driver {
    id: NodeId,
    cluster_id: String,
    raft: Raft,
    transport: Arc<PeerTransport<PeerMessage>>,
    snapshots: Arc<SnapshotStore>,
    sm: Arc<StateMachine>,
    jobs: mpsc::Sender<StorageJob>,
    shutdown: watch::Sender<bool>,
    tick_ms: u64,
    peers: BTreeMap<NodeId, String>,
    client_url: String,
    /// Proposals by log index: (term, reply).
    proposals: BTreeMap<u64, (u64, ProposalReply)>,
    reads: BTreeMap<u64, ReadReply>,
    next_read_id: u64,
    snapshot_index: u64,
    /// Peers a snapshot is being streamed to.
    sending_snapshots: BTreeSet<NodeId>,
    /// Snapshot senders report (peer, ok) here.
    snapshot_done_tx: mpsc::Sender<(NodeId, bool)>,
    snapshot_done_rx: mpsc::Receiver<(NodeId, bool)>,
}

impl Driver {
    /// A driver for `raft`, talking to the storage thread through `jobs`.
    pub fn new(
        config: &NodeConfig,
        raft: Raft,
        transport: Arc<PeerTransport<PeerMessage>>,
        snapshots: Arc<SnapshotStore>,
        sm: Arc<StateMachine>,
        jobs: mpsc::Sender<StorageJob>,
        shutdown: watch::Sender<bool>,
    ) -> Driver {
        let snapshot_index = raft.log().base_index();
        let (snapshot_done_tx, snapshot_done_rx) = mpsc::channel(64);
        Driver {
            id: config.id,
            cluster_id: config.cluster_id.clone(),
            raft,
            transport,
            snapshots,
            sm,
            jobs,
            shutdown,
            tick_ms: config.heartbeat_ms,
            peers: config.peers.clone(),
            client_url: config.client_url.clone(),
            proposals: BTreeMap::new(),
            reads: BTreeMap::new(),
            next_read_id: 1,
            snapshot_index,
            sending_snapshots: BTreeSet::new(),
            snapshot_done_tx,
            snapshot_done_rx,
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
        let result = loop {
            tokio::select! {
                // Biased, with the timer before the queues: under a steady stream of messages
                // and requests, heartbeats and elections must still tick.
                biased;
                _ = shutdown.changed() => break Ok(()),
                _ = ticker.tick() => self.raft.tick(),
                Some(ev) = events.recv() => {
                    if let Err(e) = self.on_storage(ev) {
                        break Err(e);
                    }
                }
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
        };
        self.fail_all("the node is shutting down");
        if let Err(e) = &result {
            tracing::error!(error = %e, "consensus task stopping");
            let _ = self.shutdown.send(true);
        }
        result
    }

    fn fail_all(&mut self, why: &str) {
        for (_, (_, reply)) in std::mem::take(&mut self.proposals) {
            let _ = reply.send(Err(ServiceError::Unavailable(why.into())));
        }
        for (_, reply) in std::mem::take(&mut self.reads) {
            let _ = reply.send(Err(ServiceError::Unavailable(why.into())));
        }
    }

    fn on_storage(&mut self, ev: StorageEvent) -> Result<(), super::NodeError> {
        match ev {
            StorageEvent::Persisted {
                last,
                after_persist,
            } => {
                if let Some((index, term)) = last {
                    self.raft.persisted(index, term);
                }
                for m in after_persist {
                    self.send(m);
                }
            }
            StorageEvent::Applied { index, entries } => {
                for applied in entries {
                    let Some((term, reply)) = self.proposals.remove(&applied.index) else {
                        continue;
                    };
                    let result = if term == applied.term {
                        Ok(match applied.outcome {
                            EntryOutcome::Command(CommandOutcome::Delete { existed }) => {
                                ProposalOutcome {
                                    index: applied.index,
                                    deleted: existed,
                                }
                            }
                            _ => ProposalOutcome {
                                index: applied.index,
                                deleted: false,
                            },
                        })
                    } else {
                        Err(ServiceError::Unavailable(
                            "leadership changed before the write committed; it was not applied"
                                .into(),
                        ))
                    };
                    let _ = reply.send(result);
                }
                // Proposals at indexes that were applied with no entry reported (covered by an
                // installed snapshot) can no longer be matched: their outcome is unknown.
                let stale: Vec<u64> = self.proposals.range(..=index).map(|(i, _)| *i).collect();
                for i in stale {
                    if let Some((_, reply)) = self.proposals.remove(&i) {
                        let _ = reply.send(Err(ServiceError::Timeout(
                            "the entry was covered by a snapshot before its result was seen".into(),
                        )));
                    }
                }
                self.raft.applied(index);
            }
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
            TransportEvent::Message { from, message } => match message {
                PeerMessage::Raft(m) => {
                    if m.from != from {
                        tracing::warn!(
                            from,
                            claimed = m.from,
                            "message with a forged sender; dropped"
                        );
                        return;
                    }
                    match self.raft.step(m) {
                        Ok(()) => {}
                        Err(RaftError::UnknownPeer(p)) => {
                            tracing::warn!(peer = p, "message from an unknown peer")
                        }
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
            },
            TransportEvent::Unreachable { peer } => self.raft.peer_unreachable(peer),
        }
    }

    fn leader_hint(&self) -> Option<LeaderHint> {
        self.raft.leader().map(|id| LeaderHint {
            id,
            client_url: if id == self.id {
                Some(self.client_url.clone())
            } else {
                self.transport.peer_client_url(id)
            },
        })
    }

    fn on_request(&mut self, req: Request) {
        match req {
            Request::Propose { payload, reply } => {
                if self.proposals.len() >= PENDING_PROPOSALS_MAX {
                    let _ = reply.send(Err(ServiceError::Unavailable(
                        "too many writes in flight".into(),
                    )));
                    return;
                }
                match self.raft.propose(payload) {
                    Ok((index, term)) => {
                        if let Some((_, old)) = self.proposals.insert(index, (term, reply)) {
                            let _ = old.send(Err(ServiceError::Unavailable(
                                "another write took this log position; it was not applied".into(),
                            )));
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
                client_url: self.transport.peer_client_url(*id),
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

    fn send(&self, m: Message) {
        let to = m.to;
        match self.transport.send(to, PeerMessage::Raft(m)) {
            Ok(()) => {}
            Err(SendError::QueueFull(_)) => {
                tracing::debug!(peer = to, "peer queue full; message dropped");
            }
            Err(e) => tracing::debug!(peer = to, error = %e, "message not sent"),
        }
    }

    /// Takes every `Ready` the core has and dispatches it.
    async fn drain_ready(&mut self) -> Result<(), super::NodeError> {
        loop {
            let rd: Ready = self.raft.ready();
            if rd.is_empty() {
                return Ok(());
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
                || rd.snapshot.is_some()
                || !rd.entries.is_empty()
                || !rd.messages_after_persist.is_empty()
                || !rd.committed.is_empty();
            if durable {
                let job = StorageJob::Ready {
                    hard_state: rd.hard_state,
                    install: rd.snapshot,
                    entries: rd.entries,
                    after_persist: rd.messages_after_persist,
                    committed: rd.committed,
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
        tokio::task::spawn_blocking(move || {
            let ok = match stream_snapshot(&snapshots, &sm, &transport, to, term) {
                Ok(bytes) => {
                    tracing::info!(peer = to, bytes, "snapshot sent");
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

/// Creates a snapshot file of the current state and sends it in chunks; returns its size.
fn stream_snapshot(
    snapshots: &SnapshotStore,
    sm: &StateMachine,
    transport: &PeerTransport<PeerMessage>,
    to: NodeId,
    term: u64,
) -> Result<u64, String> {
    let created = snapshots
        .create(sm)
        .map_err(|e| format!("creating a snapshot: {e}"))?;
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
        let chunk = SnapshotChunk {
            term,
            meta: created.meta.clone(),
            file_name: created.file.name.clone(),
            offset,
            total_bytes,
            data: buf[..n].to_vec(),
        };
        let last = chunk.is_last();
        let mut message = PeerMessage::SnapshotChunk(chunk);
        let mut waited_ms = 0;
        loop {
            match transport.send(to, message) {
                Ok(()) => break,
                Err(SendError::QueueFull(_)) if waited_ms < 30_000 => {
                    std::thread::sleep(Duration::from_millis(5));
                    waited_ms += 5;
                    // The message was consumed by try_send's error path; rebuild it.
                    message = PeerMessage::SnapshotChunk(SnapshotChunk {
                        term,
                        meta: created.meta.clone(),
                        file_name: created.file.name.clone(),
                        offset,
                        total_bytes,
                        data: buf[..n].to_vec(),
                    });
                }
                Err(e) => return Err(format!("sending a chunk: {e}")),
            }
        }
        offset += n as u64;
        if last || n == 0 {
            return Ok(offset);
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
