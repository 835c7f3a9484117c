//! raftkv's durable state on one node.
//!
//! - [`wal`]: the checksummed, segmented write-ahead log holding the Raft log and hard state.
//! - [`vfs`]: the file-system layer under it, real ([`vfs::StdFs`]) or simulated with faults
//!   and crashes ([`vfs::SimFs`]) for tests.
//! - [`types`]: entries, hard state, membership and snapshot metadata, shared with consensus.
//! - [`codec`]: the single place a serialization codec is used (payloads only, never framing).

pub mod codec;
pub mod types;
pub mod vfs;
pub mod wal;

pub use types::{Entry, EntryKind, HardState, Membership, NodeId, SnapshotMeta};
