//! The Raft consensus core: a deterministic state machine with no I/O.
//!
//! The node layer drives it with ticks, peer messages, proposals and read requests, and takes
//! back [`Ready`] batches saying what to persist, send and apply (the contract is spelled out in
//! [`ready`] and DESIGN.md ("The consensus core")). It holds no clock, socket, file or thread; randomness comes
//! from a seed, so the deterministic simulator (tests/simulation.rs) can replay any run exactly.
//!
//! - [`core`]: the protocol ([`Raft`]): elections with PreVote and CheckQuorum, replication with
//!   pipelining and fast backtracking, Figure-8-safe commitment, compaction and snapshots,
//!   leadership transfer, ReadIndex and (optional) lease reads.
//! - [`log`]: the in-memory log suffix after the last compaction.
//! - [`membership`]: membership change requests, the joint configuration they enter, and the
//!   history of configurations in the log (the leader's side is in `core/membership.rs`).
//! - [`progress`]: the leader's per-follower replication state.
//! - [`read_index`]: the leader's queues of linearizable reads.
//! - [`message`]: what cores send each other; [`limits`]: the range every field of one must
//!   be in, checked on receipt and again in `Raft::step`.
//! - [`ready`]: what the core hands out, the node's obligations, and errors.
//! - [`config`], [`rng`]: tunables in ticks and bytes; the seeded generator.
//! - `harness` (hidden): an in-memory cluster of cores that honours the ready/advance contract,
//!   shared by the core's unit tests, the golden scenarios and the core bench.

pub mod config;
pub mod core;
#[doc(hidden)]
pub mod harness;
pub mod limits;
pub mod log;
pub mod membership;
pub mod message;
pub mod progress;
pub mod read_index;
pub mod ready;
pub mod rng;

#[cfg(test)]
mod core_tests;
#[cfg(test)]
mod hostile_tests;

pub use self::config::Config;
pub use self::core::{Raft, RestartState, Role};
pub use self::limits::InvalidMessage;
pub use self::log::RaftLog;
pub use self::membership::{MemberChange, MembershipProposal};
pub use self::message::{Message, MessageBody};
pub use self::progress::{Progress, ProgressState};
pub use self::read_index::ReadLevel;
pub use self::ready::{LogRead, RaftError, ReadId, ReadState, Ready, SnapshotSend};
