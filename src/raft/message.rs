//! The messages consensus cores exchange. The node frames them with `raftkv_types::codec` over TCP.
//!
//! Every message carries the sender's term; the term rules in `core.rs` look at it before the
//! body. Snapshot data never travels in a message: the node streams the snapshot file in
//! chunks and, once the follower holds all of it, steps an [`MessageBody::InstallSnapshot`]
//! carrying only the metadata into the follower's core.

use raftkv_types::{Entry, NodeId, SnapshotMeta};
use serde::{Deserialize, Serialize};

/// One message between two cores.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    /// The sender's term (for a pre-vote request and its grant: the term it would campaign in).
    pub term: u64,
    pub body: MessageBody,
}

/// What a message says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageBody {
    /// Leader → follower: append `entries` after (`prev_index`, `prev_term`); the leader has
    /// committed up to `commit`.
    Append {
        prev_index: u64,
        prev_term: u64,
        entries: Vec<Entry>,
        commit: u64,
    },
    /// Follower → leader. On success `index` is the follower's last index matching the leader.
    /// On reject `index` is the rejected `prev_index` and `hint` the follower's (index, term)
    /// of its last entry whose term is at most the leader's `prev_term`, so the leader skips
    /// a whole conflicting term per round trip.
    AppendResponse {
        reject: bool,
        index: u64,
        hint: Option<(u64, u64)>,
    },
    /// Leader → follower: "I am still leader"; `commit` is capped at what the follower is known
    /// to hold; `read_round` identifies the ReadIndex round this heartbeat confirms; with lease
    /// reads, `lease_ms` (else 0) is how long the follower promises not to vote after it.
    Heartbeat {
        commit: u64,
        read_round: u64,
        lease_ms: u64,
    },
    /// Follower → leader: acknowledges a heartbeat of `read_round`.
    HeartbeatResponse { read_round: u64 },
    /// A (pre-)candidate asks for a vote. `transfer` is set when a leadership transfer asked for
    /// the election, which lets it through followers' check-quorum lease.
    Vote {
        pre: bool,
        last_index: u64,
        last_term: u64,
        transfer: bool,
    },
    /// The answer to a (pre-)vote request.
    VoteResponse { pre: bool, granted: bool },
    /// Node-synthesized once a streamed snapshot arrived completely: install it.
    InstallSnapshot { meta: SnapshotMeta },
    /// Leader → transfer target: start an election now (its log is caught up).
    TimeoutNow,
}

impl MessageBody {
    /// A short name for logs and golden output.
    pub fn name(&self) -> &'static str {
        match self {
            MessageBody::Append { .. } => "Append",
            MessageBody::AppendResponse { .. } => "AppendResponse",
            MessageBody::Heartbeat { .. } => "Heartbeat",
            MessageBody::HeartbeatResponse { .. } => "HeartbeatResponse",
            MessageBody::Vote { pre: true, .. } => "PreVote",
            MessageBody::Vote { pre: false, .. } => "Vote",
            MessageBody::VoteResponse { pre: true, .. } => "PreVoteResponse",
            MessageBody::VoteResponse { pre: false, .. } => "VoteResponse",
            MessageBody::InstallSnapshot { .. } => "InstallSnapshot",
            MessageBody::TimeoutNow => "TimeoutNow",
        }
    }
}

impl std::fmt::Display for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}->{} {} t{}",
            self.from,
            self.to,
            self.body.name(),
            self.term
        )?;
        match &self.body {
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => {
                write!(f, " prev={prev_index}@{prev_term} commit={commit} [")?;
                for (i, e) in entries.iter().enumerate() {
                    if i > 0 {
                        write!(f, " ")?;
                    }
                    write!(f, "{}@{}", e.index, e.term)?;
                    match e.kind {
                        raftkv_types::EntryKind::Normal => {
                            write!(f, ":{}", String::from_utf8_lossy(&e.payload))?
                        }
                        raftkv_types::EntryKind::Noop => write!(f, ":noop")?,
                        raftkv_types::EntryKind::Config => write!(f, ":config")?,
                    }
                }
                write!(f, "]")
            }
            MessageBody::AppendResponse {
                reject,
                index,
                hint,
            } => {
                if *reject {
                    write!(f, " reject index={index}")?;
                    if let Some((i, t)) = hint {
                        write!(f, " hint={i}@{t}")?;
                    }
                    Ok(())
                } else {
                    write!(f, " ok index={index}")
                }
            }
            MessageBody::Heartbeat {
                commit,
                read_round,
                lease_ms,
            } => {
                write!(f, " commit={commit} round={read_round}")?;
                if *lease_ms > 0 {
                    write!(f, " lease={lease_ms}ms")?;
                }
                Ok(())
            }
            MessageBody::HeartbeatResponse { read_round } => write!(f, " round={read_round}"),
            MessageBody::Vote {
                last_index,
                last_term,
                transfer,
                ..
            } => {
                write!(f, " last={last_index}@{last_term}")?;
                if *transfer {
                    write!(f, " transfer")?;
                }
                Ok(())
            }
            MessageBody::VoteResponse { granted, .. } => {
                write!(f, " {}", if *granted { "granted" } else { "rejected" })
            }
            MessageBody::InstallSnapshot { meta } => {
                write!(f, " snapshot={}@{}", meta.index, meta.term)
            }
            MessageBody::TimeoutNow => Ok(()),
        }
    }
}
