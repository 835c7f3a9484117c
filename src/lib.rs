//! raftkv: a durable, Raft-replicated key-value store.
//!
//! The crate holds everything above the storage layer (`raftkv-storage`): operator tools today
//! ([`check_disk`]), and the consensus core, node runtime, server and client as they land.

pub mod check_disk;

pub use raftkv_storage as storage;
