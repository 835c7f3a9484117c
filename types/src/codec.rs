//! The one place raftkv uses a serialization codec (bincode 1.3.3, pinned exactly).
//!
//! bincode is unmaintained (its 3.0.0 release is a compile-error stub), so everything that goes
//! through it goes through these two functions: replacing the codec later touches this file
//! only. Our on-disk framing (WAL records, snapshot chunks) never uses it: only payloads do
//! (client commands, peer messages).
//!
//! Decoding is bounded: a length prefix inside the payload can never make us allocate more
//! than the input's own size allows, so a hostile frame cannot exhaust memory.

use bincode::Options;
use serde::{Deserialize, Serialize};

/// A payload that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("codec: {0}")]
pub struct CodecError(String);

fn options(limit_bytes: u64) -> impl bincode::Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(limit_bytes)
        .reject_trailing_bytes()
}

/// Encodes `value` (little-endian, fixed-width integers).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    options(u64::MAX)
        .serialize(value)
        .map_err(|e| CodecError(e.to_string()))
}

/// Encodes `value` like [`encode`], appended to `out` (no intermediate buffer: a frame
/// writer serializes straight into its batch).
pub fn encode_into<T: Serialize>(out: &mut Vec<u8>, value: &T) -> Result<(), CodecError> {
    options(u64::MAX)
        .serialize_into(out, value)
        .map_err(|e| CodecError(e.to_string()))
}

/// Decodes exactly one `T` from all of `bytes`; trailing bytes are an error. A `T` that
/// borrows (`&[u8]` fields) points into `bytes` instead of copying.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    options(bytes.len() as u64)
        .deserialize(bytes)
        .map_err(|e| CodecError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Bytes, Entry, EntryKind};

    /// `Entry` as it was when its payload was a `Vec<u8>`: the wire format to keep.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct EntryWithVec {
        index: u64,
        term: u64,
        kind: EntryKind,
        payload: Vec<u8>,
    }

    #[test]
    fn round_trip_and_rejects_garbage() {
        let e = Entry {
            index: 7,
            term: 3,
            kind: EntryKind::Normal,
            payload: Bytes::from_static(b"hello"),
        };
        let bytes = encode(&e).unwrap();
        assert_eq!(decode::<Entry>(&bytes).unwrap(), e);
        // A huge length prefix must fail cleanly, not allocate.
        let mut evil = bytes.clone();
        evil[20..28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Entry>(&evil).is_err());
        let mut trailing = bytes;
        trailing.push(0);
        assert!(decode::<Entry>(&trailing).is_err());
    }

    #[test]
    fn a_shared_payload_encodes_exactly_as_a_vec_did() {
        for payload in [Vec::new(), b"v".to_vec(), vec![0xab; 300]] {
            let old = EntryWithVec {
                index: 9,
                term: 4,
                kind: EntryKind::Config,
                payload: payload.clone(),
            };
            let new = Entry {
                index: 9,
                term: 4,
                kind: EntryKind::Config,
                payload: Bytes::from(payload.clone()),
            };
            let bytes = encode(&new).unwrap();
            assert_eq!(bytes, encode(&old).unwrap());
            // The layout itself: index, term, kind's variant (u32), u64 length, the bytes.
            let mut expected = Vec::new();
            expected.extend_from_slice(&9u64.to_le_bytes());
            expected.extend_from_slice(&4u64.to_le_bytes());
            expected.extend_from_slice(&2u32.to_le_bytes());
            expected.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            expected.extend_from_slice(&payload);
            assert_eq!(bytes, expected);
            // Each decodes what the other wrote.
            assert_eq!(decode::<Entry>(&encode(&old).unwrap()).unwrap(), new);
            assert_eq!(decode::<EntryWithVec>(&bytes).unwrap(), old);
        }
    }

    #[test]
    fn encode_into_appends_what_encode_returns() {
        let e = Entry {
            index: 1,
            term: 1,
            kind: EntryKind::Normal,
            payload: Bytes::from_static(b"abc"),
        };
        let mut out = b"head".to_vec();
        encode_into(&mut out, &e).unwrap();
        assert_eq!(&out[..4], b"head");
        assert_eq!(&out[4..], encode(&e).unwrap().as_slice());
    }
}
