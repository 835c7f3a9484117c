//! The byte layout of what the state tree stores: key records, session records and the
//! session table's parameters. Our own fixed framing (big-endian integers), not the codec:
//! these bytes are read on every get and scan, and they travel in snapshot files.
//!
//! ```text
//! d ‖ key           → create_revision u64 ‖ mod_revision u64 ‖ version u64 ‖ lease u64 ‖ value
//! s ‖ client id     → seq u64 ‖ revision u64 ‖ active_ms u64 ‖ outcome (codec-encoded)
//! c/sessions        → clock_ms u64 ‖ ttl_ms u64 ‖ sessions_max u64
//! ```
//!
//! Invariants: a stored key record has `create_revision ≤ mod_revision` and `version ≥ 1`;
//! a session record has `seq ≥ 1`. Decoding checks both and the lengths, so a damaged tree is
//! reported as corrupt rather than served.

use crate::codec;
use crate::command::{CommandOutcome, KeyRecord};

/// Bytes before the value in a key record.
pub const KEY_HEADER_BYTES: usize = 32;
/// Bytes before the outcome in a session record.
const SESSION_HEADER_BYTES: usize = 24;

/// A key's revisions, the part of a record before its value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyMeta {
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
    pub lease: u64,
}

/// A session's latest applied write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub seq: u64,
    pub revision: u64,
    /// The session clock when the session last wrote.
    pub active_ms: u64,
    pub outcome: CommandOutcome,
}

/// The session table's clock and bounds, as the latest `ExpireSessions` entry set them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionParams {
    pub clock_ms: u64,
    pub ttl_ms: u64,
    pub sessions_max: u64,
}

/// The default session TTL until an `ExpireSessions` entry says otherwise (one hour).
pub const SESSION_TTL_MS_DEFAULT: u64 = 3_600_000;
/// The default bound on the session table.
pub const SESSIONS_MAX_DEFAULT: u64 = 100_000;

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            clock_ms: 0,
            ttl_ms: SESSION_TTL_MS_DEFAULT,
            sessions_max: SESSIONS_MAX_DEFAULT,
        }
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// A key record: `meta` then `value`.
pub fn encode_key(meta: &KeyMeta, value: &[u8]) -> Vec<u8> {
    debug_assert!(meta.version >= 1 && meta.create_revision <= meta.mod_revision);
    let mut out = Vec::with_capacity(KEY_HEADER_BYTES + value.len());
    out.extend_from_slice(&meta.create_revision.to_be_bytes());
    out.extend_from_slice(&meta.mod_revision.to_be_bytes());
    out.extend_from_slice(&meta.version.to_be_bytes());
    out.extend_from_slice(&meta.lease.to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// Splits a key record into its revisions and its value.
pub fn decode_key(raw: &[u8]) -> Result<(KeyMeta, &[u8]), String> {
    if raw.len() < KEY_HEADER_BYTES {
        return Err(format!(
            "a key record of {} bytes is shorter than its {KEY_HEADER_BYTES}-byte header",
            raw.len()
        ));
    }
    let meta = KeyMeta {
        create_revision: u64_at(raw, 0),
        mod_revision: u64_at(raw, 8),
        version: u64_at(raw, 16),
        lease: u64_at(raw, 24),
    };
    if meta.version == 0 || meta.create_revision > meta.mod_revision {
        return Err(format!("a key record has impossible revisions {meta:?}"));
    }
    Ok((meta, &raw[KEY_HEADER_BYTES..]))
}

/// The owned [`KeyRecord`] of `key` from its raw record.
pub fn key_record(key: &[u8], raw: &[u8]) -> Result<KeyRecord, String> {
    let (meta, value) = decode_key(raw)?;
    Ok(KeyRecord {
        key: key.to_vec(),
        value: value.to_vec(),
        create_revision: meta.create_revision,
        mod_revision: meta.mod_revision,
        version: meta.version,
        lease: meta.lease,
    })
}

pub fn encode_session(rec: &SessionRecord) -> Result<Vec<u8>, String> {
    assert!(rec.seq >= 1, "session sequence numbers start at 1");
    let mut out = Vec::with_capacity(SESSION_HEADER_BYTES + 32);
    out.extend_from_slice(&rec.seq.to_be_bytes());
    out.extend_from_slice(&rec.revision.to_be_bytes());
    out.extend_from_slice(&rec.active_ms.to_be_bytes());
    codec::encode_into(&mut out, &rec.outcome).map_err(|e| format!("session outcome: {e}"))?;
    Ok(out)
}

pub fn decode_session(raw: &[u8]) -> Result<SessionRecord, String> {
    if raw.len() < SESSION_HEADER_BYTES {
        return Err(format!(
            "a session record of {} bytes is too short",
            raw.len()
        ));
    }
    let seq = u64_at(raw, 0);
    if seq == 0 {
        return Err("a session record with sequence 0".into());
    }
    let outcome =
        codec::decode(&raw[SESSION_HEADER_BYTES..]).map_err(|e| format!("session outcome: {e}"))?;
    Ok(SessionRecord {
        seq,
        revision: u64_at(raw, 8),
        active_ms: u64_at(raw, 16),
        outcome,
    })
}

pub fn encode_params(p: &SessionParams) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&p.clock_ms.to_be_bytes());
    b[8..16].copy_from_slice(&p.ttl_ms.to_be_bytes());
    b[16..].copy_from_slice(&p.sessions_max.to_be_bytes());
    b
}

pub fn decode_params(raw: &[u8]) -> Result<SessionParams, String> {
    if raw.len() != 24 {
        return Err(format!("session parameters of {} bytes, not 24", raw.len()));
    }
    let p = SessionParams {
        clock_ms: u64_at(raw, 0),
        ttl_ms: u64_at(raw, 8),
        sessions_max: u64_at(raw, 16),
    };
    if p.ttl_ms == 0 || p.sessions_max == 0 {
        return Err(format!("impossible session parameters {p:?}"));
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_records_round_trip_and_reject_damage() {
        let meta = KeyMeta {
            create_revision: 3,
            mod_revision: 9,
            version: 4,
            lease: 0,
        };
        let raw = encode_key(&meta, b"value");
        assert_eq!(raw.len(), KEY_HEADER_BYTES + 5);
        assert_eq!(decode_key(&raw).unwrap(), (meta, &b"value"[..]));
        assert!(decode_key(&raw[..31]).is_err());
        let mut bad = raw.clone();
        bad[23] = 0; // version 0
        assert!(decode_key(&bad).is_err());
        let rec = key_record(b"k", &raw).unwrap();
        assert_eq!(
            (rec.mod_revision, rec.version, rec.value),
            (9, 4, b"value".to_vec())
        );
    }

    #[test]
    fn session_records_and_params_round_trip() {
        let rec = SessionRecord {
            seq: 7,
            revision: 42,
            active_ms: 1_000,
            outcome: CommandOutcome::Delete { existed: true },
        };
        assert_eq!(decode_session(&encode_session(&rec).unwrap()).unwrap(), rec);
        assert!(decode_session(&[0; 10]).is_err());
        let p = SessionParams {
            clock_ms: 5,
            ttl_ms: 6,
            sessions_max: 7,
        };
        assert_eq!(decode_params(&encode_params(&p)).unwrap(), p);
        assert!(decode_params(&[0; 24]).is_err());
    }
}
