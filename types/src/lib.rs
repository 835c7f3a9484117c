//! The vocabulary every layer of raftkv shares: log entries, hard state, membership and
//! snapshot metadata, and [`codec`], the one place a serialization codec is used.
//!
//! A leaf crate (serde, bincode, bytes and thiserror only) so that the consensus core
//! (`raftkv::raft`) and the peer transport (`raftkv::transport`) speak the same types as the
//! write-ahead log without linking sled or the storage crate. The WAL (`raftkv-storage`)
//! persists these types byte by byte, and the consensus core hands out exactly these types to
//! persist, with no conversion on the hot path.
//!
//! An entry's payload is a [`Bytes`]: one allocation shared by every clone of the entry (the
//! in-memory log, each `Ready` batch, the `Append` to each follower, the committed batch the
//! state machine applies), so replicating a write never copies its value. On the wire and on
//! disk it is the same length-prefixed byte string a `Vec<u8>` was (see [`codec`]'s tests).
//!
//! Invariants:
//! - Node ids are non-zero: `0` encodes "no vote" on disk.
//! - Log indexes start at 1; index 0 with term 0 is the empty log's sentinel.

pub mod codec;
mod membership;

pub use membership::{MemberAddrs, Membership, MembershipError, ADDR_BYTES_MAX, MEMBERS_MAX};

pub use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A cluster member's id. Never 0.
pub type NodeId = u64;

/// The kind of a log entry. Stored as one byte in the WAL.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum EntryKind {
    /// A client command (payload: an encoded `Command`).
    Normal = 1,
    /// The empty entry a new leader appends at the start of its term.
    Noop = 2,
    /// A membership configuration (payload: an encoded `Membership`).
    Config = 3,
}

impl EntryKind {
    /// Decodes the on-disk byte; `None` for an unknown kind.
    pub fn from_u8(byte: u8) -> Option<EntryKind> {
        match byte {
            1 => Some(EntryKind::Normal),
            2 => Some(EntryKind::Noop),
            3 => Some(EntryKind::Config),
            _ => None,
        }
    }

    /// A short lower-case name for tools and logs.
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::Normal => "normal",
            EntryKind::Noop => "noop",
            EntryKind::Config => "config",
        }
    }
}

/// One Raft log entry. Cloning it shares the payload (a reference count), never copies it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub index: u64,
    pub term: u64,
    pub kind: EntryKind,
    /// Serialized as a byte string (see [`payload_serde`]): bincode writes it exactly as it
    /// wrote the `Vec<u8>` this used to be, a u64 length then the bytes.
    #[serde(with = "payload_serde")]
    pub payload: Bytes,
}

impl Entry {
    /// Bytes this entry takes in a message or a batch budget (payload plus fixed fields).
    pub fn size_bytes(&self) -> usize {
        self.payload.len() + 17
    }
}

/// Log entries described without their payloads: what a restarting core needs to know about
/// the part of its log it leaves on disk (the WAL serves those entries when a follower needs
/// them). Terms are run-length encoded: a log holds few terms, so this costs four bytes per
/// entry (its size) however large the payloads are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogPrefix {
    /// Index of the first entry described (meaningless when `sizes` is empty).
    pub first_index: u64,
    /// (first index, term) of each run of entries with the same term, ascending in both.
    pub term_runs: Vec<(u64, u64)>,
    /// [`Entry::size_bytes`] of each entry, from `first_index` on.
    pub sizes: Vec<u32>,
    /// The `Config` entries among them, in index order (the core rebuilds its membership
    /// history from them).
    pub configs: Vec<Entry>,
}

impl LogPrefix {
    /// Adds the next entry's description (`index` must follow the last one described).
    pub fn push(&mut self, entry: &Entry) {
        if self.sizes.is_empty() {
            self.first_index = entry.index;
        }
        assert_eq!(
            entry.index,
            self.first_index + self.sizes.len() as u64,
            "a log prefix is contiguous"
        );
        if self.term_runs.last().is_none_or(|&(_, t)| t != entry.term) {
            self.term_runs.push((entry.index, entry.term));
        }
        self.sizes
            .push(u32::try_from(entry.size_bytes()).unwrap_or(u32::MAX));
        if entry.kind == EntryKind::Config {
            self.configs.push(entry.clone());
        }
    }

    /// Index of the last entry described, if any.
    pub fn last_index(&self) -> Option<u64> {
        (!self.sizes.is_empty()).then(|| self.first_index + self.sizes.len() as u64 - 1)
    }
}

/// Serde glue for [`Entry::payload`]: one byte string, read into a single buffer that the
/// `Bytes` then owns (no second copy). By hand rather than through the `bytes` crate's `serde`
/// feature, which would change the feature set, and so the build, of every crate that links
/// `bytes` (tokio, hyper, axum).
mod payload_serde {
    use bytes::Bytes;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub fn serialize<S: Serializer>(payload: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(payload)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        d.deserialize_byte_buf(PayloadVisitor)
    }

    struct PayloadVisitor;

    impl<'de> Visitor<'de> for PayloadVisitor {
        type Value = Bytes;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a byte string")
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(v))
        }
        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(v))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
            // Formats that write bytes as a sequence (JSON). Bounded by the input: each element
            // consumes at least one byte of it.
            let mut out = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(Bytes::from(out))
        }
    }
}

/// The Raft state that must be durable before any message that depends on it is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// The current term.
    pub term: u64,
    /// Who this node voted for in `term`, if anyone.
    pub vote: Option<NodeId>,
    /// The highest index known to be committed (may lag; never ahead of a quorum's log).
    pub commit: u64,
}

/// Where a snapshot stands in the log: everything up to `index` (at `term`) is in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
    pub membership: Membership,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_kind_byte_round_trips_and_unknown_bytes_are_rejected() {
        for kind in [EntryKind::Normal, EntryKind::Noop, EntryKind::Config] {
            assert_eq!(EntryKind::from_u8(kind as u8), Some(kind));
        }
        for byte in [0u8, 4, u8::MAX] {
            assert_eq!(EntryKind::from_u8(byte), None);
        }
    }
}
