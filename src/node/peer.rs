//! What nodes send each other over the transport: Raft messages, and snapshot files in chunks.
//!
//! Snapshot data never rides inside a Raft message. The leader streams the file as
//! [`PeerMessage::SnapshotChunk`]s of at most [`SNAPSHOT_CHUNK_BYTES`]; the follower writes
//! them to a temp file in order, and when the last one arrives, syncs and renames it into
//! `snap/` and steps its core with `InstallSnapshot`. Memory stays bounded by one chunk (plus
//! the transport's bounded queue) on both sides.

use crate::raft::Message;
use raftkv_storage::SnapshotMeta;
use serde::{Deserialize, Serialize};

/// Bytes of snapshot data per chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// One message between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    Raft(Message),
    SnapshotChunk(SnapshotChunk),
}

/// A piece of a snapshot file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// The leader's term when it started the transfer.
    pub term: u64,
    pub meta: SnapshotMeta,
    /// The file's name in `snap/` (index and term).
    pub file_name: String,
    pub offset: u64,
    pub total_bytes: u64,
    pub data: Vec<u8>,
}

impl SnapshotChunk {
    /// Whether this chunk ends the file.
    pub fn is_last(&self) -> bool {
        self.offset + self.data.len() as u64 >= self.total_bytes
    }
}
