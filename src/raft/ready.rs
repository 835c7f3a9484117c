//! What the core hands to the node, what the node reports back, and the core's errors.
//!
//! The contract (see also DESIGN.md ("The consensus core")), for each [`Ready`] in the order they are taken:
//! 1. send `messages_now` (they do not depend on anything of this batch being durable);
//! 2. durably write, in this order, `snapshot` (install the received snapshot file into the
//!    state machine and reset the WAL to start after it), then `entries` (the first entry's
//!    index may be at or below the WAL's last index: the WAL's suffix from there is replaced),
//!    then `hard_state`, and fsync. The order matters for torn writes: a surviving hard state
//!    must never name a commit index whose entries did not survive (a replaced suffix would
//!    otherwise resurrect stale entries as committed);
//! 3. call `Raft::persisted(last entry index, term)` (or with the snapshot's index and term)
//!    and only then send `messages_after_persist`;
//! 4. apply `committed` in order (this may overlap with 1–3: they are already durable) and
//!    report `Raft::applied`; serve each of `read_states` (their index is already applied);
//!    fail the reads in `reads_dropped` with "retry";
//! 5. send `log_reads` in order, each after reading its entries from the WAL (they are
//!    applied, so durable and final; like `messages_now` they wait for nothing of this batch),
//!    and all of them in order behind the `log_reads` of earlier batches;
//! 6. for each of `snapshot_sends`, stream the newest snapshot file to the peer, then step the
//!    receiving core with `InstallSnapshot` and report `Raft::snapshot_sent` to this one (the
//!    leader then waits for the install's acknowledgement, up to
//!    `Config::snapshot_install_wait_ticks`, before it sends that peer anything else).

use super::limits::InvalidMessage;
use super::message::Message;
use raftkv_types::{Entry, HardState, NodeId, SnapshotMeta};

/// An opaque id the node gives a read request, returned with the read's outcome.
pub type ReadId = u64;

/// A read that is safe to serve: leadership was confirmed after the read arrived and the state
/// machine has applied at least `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    pub id: ReadId,
    pub index: u64,
}

/// A request to stream the newest local snapshot to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotSend {
    /// The peer to send to.
    pub to: NodeId,
    /// The leader's term: the `InstallSnapshot` message stepped on the peer carries it.
    pub term: u64,
}

/// An append to a follower whose entries the core no longer holds in memory (see
/// [`super::RaftLog`]): the node reads entries `lo..=hi` from its WAL into the message's
/// `entries` and sends it. With `lo > hi` the message already carries its entries and goes
/// this way only to stay behind earlier reads to the same follower: appends to one follower
/// must arrive in order to be useful.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRead {
    /// An `Append` whose `entries` the read fills.
    pub message: Message,
    pub lo: u64,
    pub hi: u64,
}

/// One batch of work for the node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// Hard state to persist, if it changed.
    pub hard_state: Option<HardState>,
    /// A received snapshot to install before the entries.
    pub snapshot: Option<SnapshotMeta>,
    /// Entries to persist (replacing the WAL's suffix from the first entry's index).
    pub entries: Vec<Entry>,
    /// Messages that may leave before this batch is durable (a leader's appends, heartbeats,
    /// pre-votes).
    pub messages_now: Vec<Message>,
    /// Messages that may leave only once this batch is durable (votes, append
    /// acknowledgements: they promise durable state).
    pub messages_after_persist: Vec<Message>,
    /// Committed entries to apply, in index order. All of them are already durable locally.
    pub committed: Vec<Entry>,
    /// Reads that are now safe to serve.
    pub read_states: Vec<ReadState>,
    /// Reads that will never be confirmed (leadership lost): answer "retry".
    pub reads_dropped: Vec<ReadId>,
    /// Appends to fill from the WAL, then send (in order, behind earlier ones).
    pub log_reads: Vec<LogRead>,
    /// Snapshots to stream to peers.
    pub snapshot_sends: Vec<SnapshotSend>,
}

impl Ready {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.snapshot.is_none()
            && self.entries.is_empty()
            && self.messages_now.is_empty()
            && self.messages_after_persist.is_empty()
            && self.committed.is_empty()
            && self.read_states.is_empty()
            && self.reads_dropped.is_empty()
            && self.log_reads.is_empty()
            && self.snapshot_sends.is_empty()
    }

    /// Whether the node must write and fsync before sending `messages_after_persist`.
    pub fn needs_persist(&self) -> bool {
        self.hard_state.is_some() || self.snapshot.is_some() || !self.entries.is_empty()
    }
}

/// Errors of the consensus core. None of them leaves the core in a bad state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RaftError {
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("leadership transfer to {to} in progress")]
    TransferInProgress { to: NodeId },
    #[error("too many uncommitted bytes ({uncommitted_bytes} >= {uncommitted_bytes_max})")]
    ProposalBacklogFull {
        uncommitted_bytes: u64,
        uncommitted_bytes_max: u64,
    },
    #[error("log holds {log_bytes} bytes (max {log_bytes_max}): compact first")]
    LogFull { log_bytes: u64, log_bytes_max: u64 },
    #[error("too many pending reads (max {pending_reads_max})")]
    ReadBacklogFull { pending_reads_max: usize },
    #[error("node {0} is not a member")]
    UnknownPeer(NodeId),
    #[error("message for node {to} delivered to node {id}")]
    WrongRecipient { to: NodeId, id: NodeId },
    #[error("refused a message from {from}: {error}")]
    InvalidMessage {
        from: NodeId,
        #[source]
        error: InvalidMessage,
    },
    #[error("log index {index} is beyond the index space")]
    IndexSpaceExhausted { index: u64 },
    #[error("malformed message from {from}: {reason}")]
    MalformedMessage { from: NodeId, reason: String },
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    #[error("invalid restart state: {0}")]
    InvalidRestart(String),
    #[error("cannot compact to {index}: {reason}")]
    InvalidCompaction { index: u64, reason: String },
    #[error("a membership change is already in progress: wait for it to complete")]
    MembershipChangeInFlight,
    #[error("invalid membership change: {0}")]
    MembershipInvalid(String),
    #[error("the change would remove the last voter")]
    LastVoter,
    #[error("node {0} is already a member")]
    AlreadyMember(NodeId),
    #[error("node {0} is not a member (or not a learner, for a promotion)")]
    UnknownMember(NodeId),
    #[error("learner {id} is not ready to vote: it matches the log up to {match_index} of {last_index} (promotable at most {lag_max} behind){}", if *reachable { "" } else { ", and has not answered within an election timeout" })]
    LearnerBehind {
        id: NodeId,
        match_index: u64,
        last_index: u64,
        lag_max: u64,
        reachable: bool,
    },
    #[error("the change would leave no reachable quorum (unreachable now: {unreachable:?}); retry with force to do it anyway")]
    QuorumUnreachable { unreachable: Vec<NodeId> },
    #[error("node {0} is not a voter: leadership cannot move to it")]
    NotAVoter(NodeId),
}
