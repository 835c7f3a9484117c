//! What nodes send each other over the transport: Raft messages, and snapshot files in chunks.
//!
//! Snapshot data never rides inside a Raft message. The leader streams the file as
//! [`PeerMessage::SnapshotChunk`]s of at most [`SNAPSHOT_CHUNK_BYTES`]; the follower writes
//! them to a temp file in order, and when the last one arrives, syncs and renames it into
//! `snap/` and steps its core with `InstallSnapshot`. Memory stays bounded by one chunk (plus
//! the transport's bounded queue) on both sides.
//!
//! Every message a peer sends passes [`validate`] right after it is decoded and before the
//! node acts on it: the sender must be the connection's authenticated peer, the recipient
//! this node, and every term, index and size within `raft::limits` (a snapshot chunk's file
//! name becomes a file name on disk, so it must be exactly the one the storage layer would
//! give its metadata). What fails is dropped, counted, and logged by [`RefusalLog`] at most
//! once per peer per [`REFUSAL_LOG_INTERVAL_MS`].

use crate::raft::limits::{self, InvalidMessage, SNAPSHOT_BYTES_MAX};
use crate::raft::{Message, MessageBody};
pub use raftkv_storage::snapshot::transfer::SnapshotChunk;
use raftkv_storage::snapshot::transfer::CHUNK_BYTES_MAX;
use raftkv_storage::{snapshot, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bytes of snapshot data per chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = CHUNK_BYTES_MAX;

/// One message between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMessage {
    Raft(Message),
    SnapshotChunk(SnapshotChunk),
}

/// Checks a message received on the connection authenticated as `link_peer` by node `me`.
pub fn validate(
    link_peer: NodeId,
    me: NodeId,
    message: &PeerMessage,
) -> Result<(), InvalidMessage> {
    match message {
        PeerMessage::Raft(m) => validate_raft(link_peer, me, m),
        PeerMessage::SnapshotChunk(chunk) => validate_chunk(chunk),
    }
}

fn validate_raft(link_peer: NodeId, me: NodeId, m: &Message) -> Result<(), InvalidMessage> {
    let kind = m.body.name();
    if m.from != link_peer || m.from == me {
        return Err(InvalidMessage::new(
            kind,
            format!("sender {} on the connection of node {link_peer}", m.from),
        ));
    }
    if m.to != me {
        return Err(InvalidMessage::new(
            kind,
            format!("addressed to node {} (this is node {me})", m.to),
        ));
    }
    if let MessageBody::InstallSnapshot { .. } = m.body {
        // Only the node itself synthesizes it, once a streamed snapshot arrived in full.
        return Err(InvalidMessage::new(kind, "not accepted from the network"));
    }
    limits::check_message(m)
}

fn validate_chunk(chunk: &SnapshotChunk) -> Result<(), InvalidMessage> {
    const KIND: &str = "SnapshotChunk";
    if chunk.term >= limits::TERM_MAX {
        return Err(InvalidMessage::new(
            KIND,
            format!("term {} out of range", chunk.term),
        ));
    }
    limits::check_snapshot_meta(KIND, &chunk.meta, chunk.term)?;
    let expected = snapshot::file_name(chunk.meta.index, chunk.meta.term);
    if chunk.file_name != expected {
        return Err(InvalidMessage::new(
            KIND,
            format!("file name {:?} instead of {expected:?}", chunk.file_name),
        ));
    }
    let len = chunk.data.len() as u64;
    let end = chunk.offset.checked_add(len);
    let plausible = chunk.data.len() <= SNAPSHOT_CHUNK_BYTES
        && chunk.total_bytes <= SNAPSHOT_BYTES_MAX
        && end.is_some_and(|end| end <= chunk.total_bytes)
        && (len > 0 || chunk.offset == chunk.total_bytes);
    if !plausible {
        return Err(InvalidMessage::new(
            KIND,
            format!(
                "{len} bytes at offset {} of {} (chunks hold at most {SNAPSHOT_CHUNK_BYTES}, \
                 files at most {SNAPSHOT_BYTES_MAX})",
                chunk.offset, chunk.total_bytes
            ),
        ));
    }
    Ok(())
}

/// Shortest gap between two log lines about refused messages from one peer.
pub const REFUSAL_LOG_INTERVAL_MS: u64 = 10_000;

/// Counts refused messages per peer and says when a refusal should be logged: the first one
/// from a peer, then at most once per [`REFUSAL_LOG_INTERVAL_MS`] (a hostile peer must not be
/// able to flood the log). Time is passed in, so this is deterministic.
#[derive(Debug, Default)]
pub struct RefusalLog {
    /// Per peer: refusals in total, refusals since the last log line, when that line was.
    peers: BTreeMap<NodeId, RefusalCount>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RefusalCount {
    total: u64,
    unlogged: u64,
    logged_at_ms: u64,
}

impl RefusalLog {
    /// Records one refusal from `peer` at `now_ms`. Returns `Some(refusals since the last
    /// line, including this one)` when a line should be logged now.
    pub fn refused(&mut self, peer: NodeId, now_ms: u64) -> Option<u64> {
        if !self.peers.contains_key(&peer) && self.peers.len() >= limits::MEMBERS_MAX {
            return None; // bounded: only members reach here, and they are at most this many
        }
        let mut first = false;
        let c = self.peers.entry(peer).or_insert_with(|| {
            first = true;
            RefusalCount {
                total: 0,
                unlogged: 0,
                logged_at_ms: now_ms,
            }
        });
        c.total = c.total.saturating_add(1);
        c.unlogged = c.unlogged.saturating_add(1);
        if first || now_ms.saturating_sub(c.logged_at_ms) >= REFUSAL_LOG_INTERVAL_MS {
            c.logged_at_ms = now_ms;
            return Some(std::mem::take(&mut c.unlogged));
        }
        None
    }

    /// Refusals from `peer` since the start.
    pub fn total(&self, peer: NodeId) -> u64 {
        self.peers.get(&peer).map_or(0, |c| c.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftkv_storage::{Membership, SnapshotMeta};

    fn chunk(file_name: &str, offset: u64, total_bytes: u64, len: usize) -> PeerMessage {
        PeerMessage::SnapshotChunk(SnapshotChunk {
            term: 3,
            meta: SnapshotMeta {
                index: 40,
                term: 2,
                membership: Membership::with_voters([1, 2, 3]),
            },
            file_name: file_name.to_string(),
            offset,
            total_bytes,
            data: vec![7; len],
        })
    }

    fn vote(from: NodeId, to: NodeId, term: u64) -> PeerMessage {
        PeerMessage::Raft(Message {
            from,
            to,
            term,
            body: MessageBody::Vote {
                pre: false,
                last_index: 5,
                last_term: 1,
                transfer: false,
            },
        })
    }

    #[test]
    fn raft_messages_need_the_link_sender_this_recipient_and_sane_ranges() {
        assert_eq!(validate(1, 2, &vote(1, 2, 3)), Ok(()));
        assert!(validate(1, 2, &vote(3, 2, 3)).is_err(), "forged sender");
        assert!(validate(2, 2, &vote(2, 2, 3)).is_err(), "from itself");
        assert!(validate(1, 2, &vote(1, 3, 3)).is_err(), "wrong recipient");
        assert!(
            validate(1, 2, &vote(1, 2, u64::MAX)).is_err(),
            "term 2^64-1"
        );
        let install = PeerMessage::Raft(Message {
            from: 1,
            to: 2,
            term: 3,
            body: MessageBody::InstallSnapshot {
                meta: SnapshotMeta {
                    index: 4,
                    term: 3,
                    membership: Membership::with_voters([1, 2]),
                },
            },
        });
        assert!(
            validate(1, 2, &install).is_err(),
            "InstallSnapshot is local only"
        );
    }

    #[test]
    fn snapshot_chunks_need_the_exact_file_name_and_consistent_sizes() {
        let name = snapshot::file_name(40, 2);
        let max = SNAPSHOT_CHUNK_BYTES;
        assert_eq!(validate(1, 2, &chunk(&name, 0, 10, 10)), Ok(()));
        assert_eq!(validate(1, 2, &chunk(&name, 4, 10, 6)), Ok(()));
        assert_eq!(validate(1, 2, &chunk(&name, 0, 0, 0)), Ok(()), "empty file");
        for bad_name in [
            "../../x",
            "a/b.snap",
            "x\0",
            "",
            "..",
            &format!("../{name}"),
        ] {
            let err = validate(1, 2, &chunk(bad_name, 0, 10, 10)).unwrap_err();
            assert!(err.reason.contains("file name"), "{bad_name:?}: {err}");
        }
        let bad_sizes = [
            chunk(&name, u64::MAX, u64::MAX, 2),
            chunk(&name, 5, 10, 6),
            chunk(&name, 0, SNAPSHOT_BYTES_MAX + 1, 10),
            chunk(&name, 0, 1 << 30, max + 1),
            chunk(&name, 3, 10, 0),
        ];
        for c in &bad_sizes {
            assert!(validate(1, 2, c).is_err(), "{c:?}");
        }
        let PeerMessage::SnapshotChunk(mut c) = chunk(&name, 0, 10, 10) else {
            unreachable!()
        };
        c.meta.index = u64::MAX;
        c.file_name = snapshot::file_name(u64::MAX, 2);
        assert!(
            validate(1, 2, &PeerMessage::SnapshotChunk(c)).is_err(),
            "index"
        );
    }

    #[test]
    fn refusals_are_counted_and_logged_once_per_interval_per_peer() {
        let mut log = RefusalLog::default();
        assert_eq!(log.refused(1, 0), Some(1), "the first one is logged");
        assert_eq!(log.refused(1, 5), None);
        assert_eq!(log.refused(2, 5), Some(1), "per peer");
        assert_eq!(log.refused(1, REFUSAL_LOG_INTERVAL_MS - 1), None);
        assert_eq!(log.refused(1, REFUSAL_LOG_INTERVAL_MS), Some(3));
        assert_eq!(log.total(1), 4);
        assert_eq!(log.total(3), 0);
    }

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
