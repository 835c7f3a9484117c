//! raftkv's durable state on one node.
//!
//! - [`wal`]: the checksummed, segmented write-ahead log holding the Raft log and hard state.
//! - [`vfs`]: the file-system layer under it, real ([`vfs::StdFs`]) or simulated with faults
//!   and crashes ([`vfs::SimFs`]) for tests.
//! - [`types`], [`codec`]: re-exported from the leaf crate `raftkv-types` (entries, hard state,
//!   membership, snapshot metadata; the single serialization codec, payloads only), so that
//!   `raftkv_storage::Entry` and `raftkv_storage::codec` paths keep working.
//! - [`command`]: the versioned client commands a `Normal` entry carries, and their limits.
//! - [`txn`]: transactions (compares, then one of two branches of operations) and their limits.
//! - [`sm`]: the key-value state machine on sled: applies committed entries, serves reads.
//! - [`snapshot`]: snapshot files (a consistent image at one applied index): write, verify,
//!   install, keep the newest two.
//! - [`node_storage`]: a node's WAL, state machine and snapshots opened together with crash
//!   recovery, and compacted together.
//! - [`crash_point`]: a file system that dies after N mutating steps, for crash tests.

pub mod command;
pub mod crash_point;
pub mod node_storage;
pub mod sm;
pub mod snapshot;
#[cfg(test)]
mod test_util;
pub mod txn;
pub mod vfs;
pub mod wal;

/// The shared vocabulary, defined in `raftkv-types`; re-exported under its old path.
pub mod types {
    pub use raftkv_types::{
        Bytes, Entry, EntryKind, HardState, LogPrefix, MemberAddrs, Membership, MembershipError,
        NodeId, SnapshotMeta,
    };
}

pub use raftkv_types::codec;
pub use types::{Entry, EntryKind, HardState, MemberAddrs, Membership, NodeId, SnapshotMeta};
