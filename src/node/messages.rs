//! Everything the node's parts say to each other, in one place, so that the parts are siblings
//! that share a vocabulary rather than a chain that reaches into its neighbours.
//!
//! ```text
//!  API ──Request──▶ consensus ──StorageJob──▶ storage worker ──StorageEvent──▶ consensus
//!                      │  ▲                          │ (messages after fsync) ──▶ peers
//!                      │  └──── applied index ◀── apply worker ◀──ApplyJob───┘ (install
//!                      └──ApplyJob───────────────────▲                          rendezvous)
//! ```
//!
//! The consensus step ([`super::consensus`]) turns one [`Input`] into [`Outputs`]; the storage
//! and apply workers ([`super::storage_worker`], [`super::apply`]) turn jobs into events. None
//! of them owns a thread, a socket or a clock: the node's shell ([`super::driver`] and the two
//! worker threads) or the simulator (`tests/simulation`) moves these values between them.

use crate::api::{ClusterStatus, ServiceError};
use crate::raft::{MembershipProposal, Message, ReadLevel};
use raftkv_storage::command::{CommandOutcome, CommandResult};
use raftkv_storage::node_storage::NodeStorageError;
use raftkv_storage::sm::SmError;
use raftkv_storage::snapshot::transfer::SnapshotChunk;
use raftkv_storage::snapshot::SnapshotError;
use raftkv_storage::{Entry, HardState, NodeId, SnapshotMeta};
use std::collections::BTreeMap;
use tokio::sync::oneshot;

pub use super::peer::PeerMessage;

/// What an applied write did: the index its entry applied at, and the state machine's
/// result (for a session's retry: the original write's revision and outcome).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProposalOutcome {
    pub index: u64,
    pub result: CommandResult,
}

impl ProposalOutcome {
    /// For a delete: whether the key existed.
    pub fn deleted(&self) -> bool {
        matches!(
            self.result.outcome,
            CommandOutcome::Delete { existed: true }
        )
    }
}

/// Where a write's answer goes.
pub type ProposalReply = oneshot::Sender<Result<ProposalOutcome, ServiceError>>;
/// Where a read barrier's answer goes: (read index, leader that confirmed it).
pub type ReadReply = oneshot::Sender<Result<(u64, NodeId), ServiceError>>;
/// Where a membership change's answer goes: the status once the change completed.
pub type MembershipReply = oneshot::Sender<Result<ClusterStatus, ServiceError>>;

/// A request from the client API to the consensus step.
#[derive(Debug)]
pub enum Request {
    Propose {
        payload: Vec<u8>,
        reply: ProposalReply,
    },
    /// A ReadIndex at `level`; answered once it is safe *and* the state machine has applied
    /// the index.
    Read { level: ReadLevel, reply: ReadReply },
    Transfer {
        to: NodeId,
        reply: oneshot::Sender<Result<(), ServiceError>>,
    },
    Status {
        reply: oneshot::Sender<ClusterStatus>,
    },
    /// A membership change (leader only); answered once it completed: its configuration (and,
    /// for a change of voters, the joint one's successor) is committed.
    ChangeMembership {
        proposal: MembershipProposal,
        reply: MembershipReply,
    },
    Ready {
        reply: oneshot::Sender<Result<(), ServiceError>>,
    },
}

/// One input to the consensus step.
#[derive(Debug)]
pub enum Input {
    /// One heartbeat interval passed.
    Tick,
    /// A message from an authenticated peer (validated by the step before anything else).
    Peer {
        from: NodeId,
        message: PeerMessage,
    },
    /// The transport lost its connection to `peer`.
    Unreachable {
        peer: NodeId,
    },
    Request(Request),
    Storage(StorageEvent),
    /// The apply worker finished a batch or an install: the state machine's applied index
    /// is now `index`.
    Applied {
        index: u64,
    },
    /// The apply worker stopped on an error.
    ApplyFailed(WorkerError),
    /// Streaming a snapshot to `peer` ended (`ok`: every chunk was handed to the transport).
    SnapshotSent {
        peer: NodeId,
        ok: bool,
    },
}

/// What one consensus step asks the shell to do, in order within each list.
#[derive(Debug, Default)]
pub struct Outputs {
    /// Messages that depend on nothing unsynced: send now.
    pub messages: Vec<Message>,
    /// Jobs for the storage worker, in order.
    pub storage: Vec<StorageJob>,
    /// Jobs for the apply worker, in order.
    pub apply: Vec<ApplyJob>,
    /// Start streaming a fresh snapshot to (peer, leader term).
    pub snapshot_sends: Vec<(NodeId, u64)>,
    /// The peers to keep connections to changed (a membership change, a removed member
    /// forgotten): id → peer address, every member and lingering removed member but this node.
    pub peers: Option<BTreeMap<NodeId, String>>,
}

/// Work for the storage worker.
#[derive(Debug)]
pub enum StorageJob {
    /// The durable part of one `Ready`.
    Ready {
        hard_state: Option<HardState>,
        /// A received snapshot to install; the apply worker meets the storage worker at the
        /// matching [`ApplyJob::Install`] before the state machine is swapped.
        install: Option<SnapshotMeta>,
        entries: Vec<Entry>,
        /// Messages that may leave only once this job is durable.
        after_persist: Vec<Message>,
    },
    /// A piece of a snapshot file from `from`.
    Chunk { from: NodeId, chunk: SnapshotChunk },
    /// Leader: send `message` (an append) to its peer, with entries `lo..=hi` read from the
    /// WAL first when `lo <= hi` (the core evicted their payloads: see `raft::LogRead`).
    /// Sent in job order, without waiting for the group's fsync: they promise nothing.
    SendFromLog { message: Message, lo: u64, hi: u64 },
    /// Leader: keep the WAL after this index at the next compactions (a reachable follower
    /// still needs it; see `Raft::replication_floor`). `None`: no such follower.
    RetainAfter(Option<u64>),
}

/// What the storage worker reports to the consensus step.
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
    /// An append to `peer` was dropped: the WAL no longer holds its entries (compaction
    /// purged them since the core asked).
    LogReadFailed { peer: NodeId },
    /// A snapshot file from `from` arrived whole and is in `snap/`.
    SnapshotReceived {
        from: NodeId,
        term: u64,
        meta: SnapshotMeta,
    },
    /// Storage failed; the node must stop.
    Failed(WorkerError),
}

/// Work for the apply worker.
#[derive(Debug, PartialEq, Eq)]
pub enum ApplyJob {
    /// Committed, locally durable entries, in order, following the previous batch.
    Entries(Vec<Entry>),
    /// The install of the snapshot at `index`: everything before is applied first, then the
    /// apply worker waits until the storage worker has swapped the state machine.
    Install { index: u64 },
}

/// Why a worker (storage, apply, snapshot transfer) stopped the node.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{context}: {source}")]
    Storage {
        context: &'static str,
        #[source]
        source: NodeStorageError,
    },
    #[error("snapshot transfer: {0}")]
    Snapshot(#[from] SnapshotError),
    #[error("apply: {0}")]
    Apply(#[from] SmError),
    #[error("snapshot file {name} holds ({found_index}, {found_term}), the leader sent ({index}, {term})")]
    InstallMismatch {
        name: String,
        found_index: u64,
        found_term: u64,
        index: u64,
        term: u64,
    },
    #[error("the {0} is gone")]
    Gone(&'static str),
}

impl WorkerError {
    /// A storage failure while doing `context`.
    pub fn storage(context: &'static str) -> impl FnOnce(NodeStorageError) -> WorkerError {
        move |source| WorkerError::Storage { context, source }
    }
}
