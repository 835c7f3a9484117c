//! raftkv: a durable, Raft-replicated key-value store.
//!
//! The crate holds everything above the storage layer (`raftkv-storage`, re-exported as
//! [`storage`]):
//! - [`raft`]: the consensus core, a deterministic state machine without I/O; it and
//!   [`transport`] take their vocabulary from the leaf crate `raftkv-types`, never from storage
//!   (`tests/seams.rs` checks it);
//! - [`transport`]: peer connections; [`api`]: the HTTP/JSON client API; [`client`]: the Rust
//!   client; [`tls`]: certificates and rustls configurations for both ports;
//! - [`check_disk`]: the operator's disk check.
//! - `fuzz_targets` (hidden): the fuzz target bodies, shared by `fuzz/` and the corpus replay test.

pub mod api;
pub mod bench;
pub mod check_disk;
pub mod client;
#[doc(hidden)]
pub mod fuzz_targets;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod small_file;
pub mod tls;
pub mod transport;
pub mod watch;

pub use raftkv_storage as storage;
