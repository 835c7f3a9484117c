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
use serde::{de::DeserializeOwned, Serialize};

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

/// Decodes exactly one `T` from all of `bytes`; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    options(bytes.len() as u64)
        .deserialize(bytes)
        .map_err(|e| CodecError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Entry, EntryKind};

    #[test]
    fn round_trip_and_rejects_garbage() {
        let e = Entry {
            index: 7,
            term: 3,
            kind: EntryKind::Normal,
            payload: b"hello".to_vec(),
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
}
