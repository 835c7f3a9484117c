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
    /// Whether this chunk ends the file. `offset` comes off the wire: the sum saturates
    /// rather than wrap (a chunk that far out never matches the receiver's next offset).
    pub fn is_last(&self) -> bool {
        self.offset.saturating_add(self.data.len() as u64) >= self.total_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoded chunk's offset is hostile: `offset + len` must not overflow.
    #[test]
    fn is_last_does_not_overflow_on_a_hostile_offset() {
        let mut chunk = SnapshotChunk {
            term: 1,
            meta: SnapshotMeta::default(),
            file_name: String::new(),
            offset: u64::MAX,
            total_bytes: u64::MAX,
            data: vec![1, 2],
        };
        assert!(chunk.is_last());
        chunk.offset = 10;
        chunk.total_bytes = 20;
        assert!(!chunk.is_last());
        chunk.data = vec![0; 10];
        assert!(chunk.is_last());
    }
}
