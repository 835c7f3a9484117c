//! Client commands: what a `Normal` log entry's payload means to the state machine.
//!
//! A command is encoded as an envelope `{ version: u16, command: Command }` through
//! [`crate::codec`]. Two mechanisms keep old logs readable as the command set grows:
//! - New operations (compare-and-swap, TTL, multi-key transactions) are **new enum variants
//!   appended at the end**: the codec tags a variant by its position, so every existing
//!   payload decodes exactly as before.
//! - `version` changes only if an existing variant's layout ever has to change; the decoder
//!   then knows which layout a payload uses. Today only version 1 exists.
//!
//! [`CommandRef`] is the same command borrowing its key and value, and the one definition of
//! the layout: the node's service encodes a write from the request's own buffers, and the
//! state machine applies a payload without copying the value out of it first. [`Command`]
//! owns its bytes (tests, tools) and converts through it.
//!
//! Version 2 of the envelope adds a client session, `{ version: 2, session, command }`: a
//! write sent with `X-Raftkv-Client-Id`/`X-Raftkv-Seq` carries its client id, sequence
//! number and the proposing leader's clock (see `sm::sessions` for what the state machine
//! does with them). A write without a session is still written as version 1, byte for byte
//! what round 1 wrote.
//!
//! A payload with an unknown version or variant is a typed error ([`CommandError::Decode`])
//! and the state machine refuses to apply it, never skips it: skipping would let a node
//! running older code diverge from one running newer code.
//!
//! Keys and values are **bytes**, not strings. sled orders keys bytewise, and bytewise order of
//! UTF-8 is code-point order, so string keys from the HTTP API sort as users expect; the HTTP
//! layer checks UTF-8 at its own boundary. Keeping the storage layer byte-clean costs nothing
//! and leaves room for binary clients without a format change.
//!
//! Limits ([`CommandLimits`], default key ≤ 8 KiB, value ≤ 1 MiB, key non-empty) are defined
//! here, next to the command they bound, and checked by [`Command::validate`] *before* a command
//! is proposed (the node's service does; the HTTP layer checks keys of reads with
//! [`CommandLimits::check_key`] too). They are not rechecked on apply: once an entry is
//! committed every node must apply it identically, whatever its own configuration.

use crate::codec::{self, CodecError};
use crate::txn::{Txn, TxnRef};
use serde::{Deserialize, Serialize, Serializer};

/// The envelope version of a command without a session.
pub const COMMAND_VERSION: u16 = 1;
/// The envelope version of a command with a session.
pub const COMMAND_VERSION_SESSION: u16 = 2;

/// Default largest key, in bytes.
pub const KEY_BYTES_MAX_DEFAULT: usize = 8 * 1024;
/// Default largest value, in bytes.
pub const VALUE_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
/// The longest client id a session may have.
pub const CLIENT_ID_BYTES_MAX: usize = 64;

/// A client command that owns its key and value. Encodes and decodes through [`CommandRef`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Sets `key` to `value`.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Removes `key` (a no-op if it is absent; the result says which).
    Delete { key: Vec<u8> },
    /// Removes every key starting with `prefix`, atomically.
    DeletePrefix { prefix: Vec<u8> },
    /// A transaction (see [`crate::txn`]).
    Txn(Txn),
    /// Advances the session clock and expires sessions (proposed by the leader).
    ExpireSessions {
        now_ms: u64,
        ttl_ms: u64,
        sessions_max: u64,
    },
    /// Sets `key` to `value`, attached to lease `lease` (which must exist).
    PutLeased {
        key: Vec<u8>,
        value: Vec<u8>,
        lease: u64,
    },
    /// Grants a lease of `ttl_ms` (its id is the entry's revision), unless `leases_max` exist.
    LeaseGrant { ttl_ms: u64, leases_max: u64 },
    /// Revokes lease `id` and deletes its keys, atomically.
    LeaseRevoke { id: u64 },
}

/// A client command borrowing its key and value. Its serde layout is the on-disk format:
/// append new variants at the end only (see the module doc), in step with [`Command`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandRef<'a> {
    /// Sets `key` to `value`.
    Put {
        #[serde(serialize_with = "byte_str")]
        key: &'a [u8],
        #[serde(serialize_with = "byte_str")]
        value: &'a [u8],
    },
    /// Removes `key` (a no-op if it is absent; the result says which).
    Delete {
        #[serde(serialize_with = "byte_str")]
        key: &'a [u8],
    },
    /// Removes every key starting with `prefix` (non-empty), atomically, in one entry.
    DeletePrefix {
        #[serde(serialize_with = "byte_str")]
        prefix: &'a [u8],
    },
    /// A transaction: compares, then the success or the failure branch.
    Txn(#[serde(borrow)] TxnRef<'a>),
    /// Sets the session clock to at least `now_ms` (the leader's wall clock), the session
    /// TTL and table bound, and expires what they say (see `sm::sessions`).
    ExpireSessions {
        now_ms: u64,
        ttl_ms: u64,
        sessions_max: u64,
    },
    /// Sets `key` to `value`, attached to lease `lease`, which must exist (else refused).
    PutLeased {
        #[serde(serialize_with = "byte_str")]
        key: &'a [u8],
        #[serde(serialize_with = "byte_str")]
        value: &'a [u8],
        lease: u64,
    },
    /// Grants a lease of `ttl_ms` whose id is this entry's revision, unless `leases_max`
    /// leases exist already (see `sm::leases`).
    LeaseGrant { ttl_ms: u64, leases_max: u64 },
    /// Revokes lease `id` and deletes every key attached to it, in this one entry (proposed
    /// by a client, or by the leader when the lease expired).
    LeaseRevoke { id: u64 },
}

/// A write's client session: who sent it, its place in that client's sequence, and the
/// proposing leader's wall clock (milliseconds since the Unix epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRef<'a> {
    #[serde(serialize_with = "byte_str")]
    pub client: &'a [u8],
    pub seq: u64,
    pub now_ms: u64,
}

/// Owned [`SessionRef`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub client: Vec<u8>,
    pub seq: u64,
    pub now_ms: u64,
}

/// A decoded `Normal` payload: the command and, for a version-2 payload, its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal<'a> {
    pub session: Option<SessionRef<'a>>,
    pub command: CommandRef<'a>,
}

/// A key's value and revisions as the state machine holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// The revision (log index) of the put that created the key.
    pub create_revision: u64,
    /// The revision of the key's latest write.
    pub mod_revision: u64,
    /// Puts since the key was created (1 after the first).
    pub version: u64,
    /// The lease the key is attached to, 0 for none.
    pub lease: u64,
}

/// What one transaction operation did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// The key's revisions after the put.
    Put {
        create_revision: u64,
        version: u64,
    },
    Delete {
        existed: bool,
    },
    DeletePrefix {
        deleted: u64,
    },
    /// The key as the earlier operations of the branch left it.
    Get(Option<KeyRecord>),
}

/// A command that applied without changing anything, and why: the service answers with
/// the matching 4xx. Deterministic: every replica refuses the same entry the same way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// A prefix delete (alone or in a transaction) would remove more than
    /// [`DELETE_PREFIX_KEYS_MAX`] keys.
    RangeTooLarge { keys_max: u64 },
    /// A transaction's `get` results would exceed [`TXN_RESULT_BYTES_MAX`].
    ResultTooLarge { bytes_max: u64 },
    /// The sequence number is below the one the session last applied.
    SessionStale { seq: u64, last_seq: u64 },
    /// The client id is unknown (never seen, or expired) and the sequence is not 1.
    SessionExpired { seq: u64 },
    /// A retry of a write that applied (at the result's revision) whose result was too large
    /// to keep in the session table.
    ResultNotKept { result_bytes: u64, bytes_max: u64 },
    /// The lease named does not exist (never granted, revoked or expired).
    LeaseNotFound { id: u64 },
    /// `leases_max` leases exist already.
    LeasesFull { leases_max: u64 },
    /// The lease has [`LEASE_KEYS_MAX`] keys already.
    LeaseKeysFull { keys_max: u64 },
}

/// The most keys one prefix delete removes (a bound on one sled batch); over it the command
/// is refused whole.
pub const DELETE_PREFIX_KEYS_MAX: u64 = 100_000;
/// The most bytes of keys and values a transaction's `get` results may hold.
pub const TXN_RESULT_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// The most keys one lease holds: its revoke deletes them all in one entry (one sled batch).
pub const LEASE_KEYS_MAX: u64 = 100_000;
/// The shortest lease TTL: a lease must outlive a leader election and a keepalive round.
pub const LEASE_TTL_MS_MIN: u64 = 1_000;
/// The longest lease TTL (30 days).
pub const LEASE_TTL_MS_MAX: u64 = 30 * 24 * 3_600_000;

/// What applying a command did, handed back to whoever proposed it (and kept in the session
/// table for a session's latest write).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandOutcome {
    /// The key now holds the value; its revisions after the put.
    Put { create_revision: u64, version: u64 },
    /// The key is gone; `existed` says whether it was there before.
    Delete { existed: bool },
    /// `deleted` keys under the prefix are gone.
    DeletePrefix { deleted: u64 },
    /// Whether the compares held, and one result per operation of the branch that ran.
    Txn {
        succeeded: bool,
        results: Vec<OpResult>,
    },
    /// Sessions removed by an `ExpireSessions` entry.
    SessionsExpired { expired: u64 },
    /// A lease was granted: its id (the entry's revision) and TTL.
    LeaseGranted { id: u64, ttl_ms: u64 },
    /// A lease was revoked with its `deleted` keys.
    LeaseRevoked { deleted: u64 },
    /// Nothing changed (see [`Refusal`]).
    Refused(Refusal),
}

/// A command's outcome and the revision it took effect at. For a duplicate of a session's
/// latest write, the original revision and outcome, with `duplicate` set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub revision: u64,
    pub outcome: CommandOutcome,
    pub duplicate: bool,
}

/// Configurable size limits on commands, checked before proposing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandLimits {
    pub key_bytes_max: usize,
    pub value_bytes_max: usize,
}

impl Default for CommandLimits {
    fn default() -> Self {
        CommandLimits {
            key_bytes_max: KEY_BYTES_MAX_DEFAULT,
            value_bytes_max: VALUE_BYTES_MAX_DEFAULT,
        }
    }
}

impl CommandLimits {
    /// A key is non-empty and at most `key_bytes_max` long (for writes and reads alike).
    pub fn check_key(&self, key: &[u8]) -> Result<(), CommandError> {
        if key.is_empty() {
            return Err(CommandError::EmptyKey);
        }
        if key.len() > self.key_bytes_max {
            return Err(CommandError::KeyTooLarge {
                len_bytes: key.len(),
                bytes_max: self.key_bytes_max,
            });
        }
        Ok(())
    }

    /// A value is at most `value_bytes_max` long.
    pub fn check_value(&self, value: &[u8]) -> Result<(), CommandError> {
        if value.len() > self.value_bytes_max {
            return Err(CommandError::ValueTooLarge {
                len_bytes: value.len(),
                bytes_max: self.value_bytes_max,
            });
        }
        Ok(())
    }
}

/// A client id is 1 to [`CLIENT_ID_BYTES_MAX`] bytes of `[A-Za-z0-9._-]`.
pub fn check_client_id(client: &[u8]) -> Result<(), CommandError> {
    let ok = !client.is_empty()
        && client.len() <= CLIENT_ID_BYTES_MAX
        && client
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CommandError::InvalidSession(format!(
            "a client id is 1 to {CLIENT_ID_BYTES_MAX} characters of A-Z a-z 0-9 . _ -"
        )))
    }
}

/// A command that is invalid or cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("key of {len_bytes} bytes exceeds the limit of {bytes_max} bytes")]
    KeyTooLarge { len_bytes: usize, bytes_max: usize },
    #[error("value of {len_bytes} bytes exceeds the limit of {bytes_max} bytes")]
    ValueTooLarge { len_bytes: usize, bytes_max: usize },
    #[error("the key must not be empty")]
    EmptyKey,
    #[error("transaction too large: {0}")]
    TxnTooLarge(String),
    #[error("invalid session: {0}")]
    InvalidSession(String),
    #[error("invalid lease: {0}")]
    InvalidLease(String),
    #[error(
        "command format version {0} is not supported (this build reads versions {COMMAND_VERSION} and {COMMAND_VERSION_SESSION})"
    )]
    UnsupportedVersion(u16),
    #[error("undecodable command: {0}")]
    Decode(#[source] CodecError),
    #[error("unencodable command: {0}")]
    Encode(#[source] CodecError),
}

#[derive(Serialize)]
struct EnvelopeOut<'b, 'a> {
    version: u16,
    command: &'b CommandRef<'a>,
}

#[derive(Serialize)]
struct SessionEnvelopeOut<'b, 'a> {
    version: u16,
    session: SessionRef<'a>,
    command: &'b CommandRef<'a>,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u16,
}

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    #[allow(dead_code)]
    version: u16,
    #[serde(borrow)]
    command: CommandRef<'a>,
}

#[derive(Deserialize)]
struct SessionEnvelopeIn<'a> {
    #[allow(dead_code)]
    version: u16,
    #[serde(borrow)]
    session: SessionRef<'a>,
    #[serde(borrow)]
    command: CommandRef<'a>,
}

impl Command {
    /// The borrowed view of this command.
    pub fn borrowed(&self) -> CommandRef<'_> {
        match self {
            Command::Put { key, value } => CommandRef::Put { key, value },
            Command::Delete { key } => CommandRef::Delete { key },
            Command::DeletePrefix { prefix } => CommandRef::DeletePrefix { prefix },
            Command::PutLeased { key, value, lease } => CommandRef::PutLeased {
                key,
                value,
                lease: *lease,
            },
            Command::LeaseGrant { ttl_ms, leases_max } => CommandRef::LeaseGrant {
                ttl_ms: *ttl_ms,
                leases_max: *leases_max,
            },
            Command::LeaseRevoke { id } => CommandRef::LeaseRevoke { id: *id },
            Command::Txn(txn) => CommandRef::Txn(txn.borrowed()),
            Command::ExpireSessions {
                now_ms,
                ttl_ms,
                sessions_max,
            } => CommandRef::ExpireSessions {
                now_ms: *now_ms,
                ttl_ms: *ttl_ms,
                sessions_max: *sessions_max,
            },
        }
    }

    /// Checks the size limits (key first, then value); call before proposing.
    pub fn validate(&self, limits: &CommandLimits) -> Result<(), CommandError> {
        self.borrowed().validate(limits)
    }

    /// The payload of a `Normal` log entry carrying this command (no session).
    pub fn encode(&self) -> Result<Vec<u8>, CommandError> {
        self.borrowed().encode()
    }

    /// The payload of a `Normal` entry carrying this command within `session`.
    pub fn encode_with(&self, session: Option<&Session>) -> Result<Vec<u8>, CommandError> {
        let session = session.map(Session::borrowed);
        self.borrowed().encode_with(session)
    }

    /// Decodes a `Normal` entry's payload into owned bytes, ignoring any session.
    pub fn decode(payload: &[u8]) -> Result<Command, CommandError> {
        CommandRef::decode_proposal(payload).map(|p| p.command.to_command())
    }

    /// Decodes a `Normal` entry's payload into an owned command and its session.
    pub fn decode_with_session(payload: &[u8]) -> Result<(Option<Session>, Command), CommandError> {
        let p = CommandRef::decode_proposal(payload)?;
        Ok((p.session.map(|s| s.to_session()), p.command.to_command()))
    }
}

impl Session {
    /// The borrowed view.
    pub fn borrowed(&self) -> SessionRef<'_> {
        SessionRef {
            client: &self.client,
            seq: self.seq,
            now_ms: self.now_ms,
        }
    }
}

impl SessionRef<'_> {
    /// An owned copy.
    pub fn to_session(self) -> Session {
        Session {
            client: self.client.to_vec(),
            seq: self.seq,
            now_ms: self.now_ms,
        }
    }

    /// The client id is well formed and the sequence number is at least 1.
    pub fn validate(&self) -> Result<(), CommandError> {
        check_client_id(self.client)?;
        if self.seq == 0 {
            return Err(CommandError::InvalidSession(
                "sequence numbers start at 1".into(),
            ));
        }
        Ok(())
    }
}

impl<'a> CommandRef<'a> {
    /// The key this command touches (a transaction's or an expiry's: none).
    pub fn key(&self) -> Option<&'a [u8]> {
        match *self {
            CommandRef::Put { key, .. }
            | CommandRef::Delete { key }
            | CommandRef::PutLeased { key, .. } => Some(key),
            CommandRef::DeletePrefix { prefix } => Some(prefix),
            CommandRef::Txn(_)
            | CommandRef::ExpireSessions { .. }
            | CommandRef::LeaseGrant { .. }
            | CommandRef::LeaseRevoke { .. } => None,
        }
    }

    /// Checks the size limits (key first, then value); call before proposing. A
    /// transaction is checked against the default [`crate::txn::TxnLimits`] here; the
    /// service checks it against its own first.
    pub fn validate(&self, limits: &CommandLimits) -> Result<(), CommandError> {
        match self {
            CommandRef::Put { key, value } => {
                limits.check_key(key)?;
                limits.check_value(value)
            }
            CommandRef::Delete { key } | CommandRef::DeletePrefix { prefix: key } => {
                limits.check_key(key)
            }
            CommandRef::Txn(txn) => txn.validate(&crate::txn::TxnLimits::default(), limits),
            CommandRef::ExpireSessions {
                ttl_ms,
                sessions_max,
                ..
            } => {
                if *ttl_ms == 0 || *sessions_max == 0 {
                    return Err(CommandError::InvalidSession(
                        "a session TTL and the session bound must be positive".into(),
                    ));
                }
                Ok(())
            }
            CommandRef::PutLeased { key, value, lease } => {
                limits.check_key(key)?;
                limits.check_value(value)?;
                if *lease == 0 {
                    return Err(CommandError::InvalidLease(
                        "lease id 0 names no lease".into(),
                    ));
                }
                Ok(())
            }
            CommandRef::LeaseGrant { ttl_ms, leases_max } => {
                if !(LEASE_TTL_MS_MIN..=LEASE_TTL_MS_MAX).contains(ttl_ms) {
                    return Err(CommandError::InvalidLease(format!(
                        "a lease TTL is {} to {} seconds",
                        LEASE_TTL_MS_MIN / 1000,
                        LEASE_TTL_MS_MAX / 1000
                    )));
                }
                if *leases_max == 0 {
                    return Err(CommandError::InvalidLease(
                        "the lease bound must be positive".into(),
                    ));
                }
                Ok(())
            }
            CommandRef::LeaseRevoke { id } => {
                if *id == 0 {
                    return Err(CommandError::InvalidLease(
                        "lease id 0 names no lease".into(),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The payload of a `Normal` log entry carrying this command: the one copy of the key
    /// and value on their way into the log.
    pub fn encode(&self) -> Result<Vec<u8>, CommandError> {
        self.encode_with(None)
    }

    /// The payload of a `Normal` entry carrying this command, within `session` if given
    /// (envelope version 2; version 1 without).
    pub fn encode_with(&self, session: Option<SessionRef<'a>>) -> Result<Vec<u8>, CommandError> {
        match session {
            None => codec::encode(&EnvelopeOut {
                version: COMMAND_VERSION,
                command: self,
            }),
            Some(session) => codec::encode(&SessionEnvelopeOut {
                version: COMMAND_VERSION_SESSION,
                session,
                command: self,
            }),
        }
        .map_err(CommandError::Encode)
    }

    /// Decodes a `Normal` entry's payload, dropping any session.
    pub fn decode(payload: &'a [u8]) -> Result<CommandRef<'a>, CommandError> {
        Self::decode_proposal(payload).map(|p| p.command)
    }

    /// Decodes a `Normal` entry's payload; the key and value point into `payload`.
    pub fn decode_proposal(payload: &'a [u8]) -> Result<Proposal<'a>, CommandError> {
        // The version is the first two bytes; read it alone so an unknown version is reported
        // as such rather than as a garbled body.
        let head = &payload[..payload.len().min(2)];
        let version = codec::decode::<VersionOnly>(head)
            .map_err(CommandError::Decode)?
            .version;
        match version {
            COMMAND_VERSION => {
                let envelope: EnvelopeIn<'a> =
                    codec::decode(payload).map_err(CommandError::Decode)?;
                Ok(Proposal {
                    session: None,
                    command: envelope.command,
                })
            }
            COMMAND_VERSION_SESSION => {
                let envelope: SessionEnvelopeIn<'a> =
                    codec::decode(payload).map_err(CommandError::Decode)?;
                Ok(Proposal {
                    session: Some(envelope.session),
                    command: envelope.command,
                })
            }
            other => Err(CommandError::UnsupportedVersion(other)),
        }
    }

    /// An owned copy.
    pub fn to_command(&self) -> Command {
        match self {
            CommandRef::Put { key, value } => Command::Put {
                key: key.to_vec(),
                value: value.to_vec(),
            },
            CommandRef::Delete { key } => Command::Delete { key: key.to_vec() },
            CommandRef::DeletePrefix { prefix } => Command::DeletePrefix {
                prefix: prefix.to_vec(),
            },
            CommandRef::Txn(txn) => Command::Txn(txn.to_txn()),
            CommandRef::ExpireSessions {
                now_ms,
                ttl_ms,
                sessions_max,
            } => Command::ExpireSessions {
                now_ms: *now_ms,
                ttl_ms: *ttl_ms,
                sessions_max: *sessions_max,
            },
            CommandRef::PutLeased { key, value, lease } => Command::PutLeased {
                key: key.to_vec(),
                value: value.to_vec(),
                lease: *lease,
            },
            CommandRef::LeaseGrant { ttl_ms, leases_max } => Command::LeaseGrant {
                ttl_ms: *ttl_ms,
                leases_max: *leases_max,
            },
            CommandRef::LeaseRevoke { id } => Command::LeaseRevoke { id: *id },
        }
    }
}

/// Writes a byte slice as one byte string (a u64 length, then the bytes), not as a sequence
/// of u8 (the same bytes with bincode, but encoded one element at a time). Reading it back
/// borrows the bytes from the input (serde's `&[u8]` does that by itself).
pub(crate) fn byte_str<S: Serializer>(bytes: &&[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_put_and_delete() {
        let put = Command::Put {
            key: b"k\xff\x00".to_vec(),
            value: vec![7; 300],
        };
        let del = Command::Delete {
            key: b"key".to_vec(),
        };
        for cmd in [put, del] {
            let bytes = cmd.encode().unwrap();
            assert_eq!(Command::decode(&bytes).unwrap(), cmd);
        }
    }

    #[test]
    fn decoding_borrows_the_key_and_value_from_the_payload() {
        let payload = Command::Put {
            key: b"key".to_vec(),
            value: vec![9; 100],
        }
        .encode()
        .unwrap();
        let CommandRef::Put { key, value } = CommandRef::decode(&payload).unwrap() else {
            panic!("a put decodes as a put");
        };
        assert_eq!((key, value), (&b"key"[..], &[9u8; 100][..]));
        let inside = payload.as_ptr_range();
        assert!(inside.contains(&key.as_ptr()) && inside.contains(&value.as_ptr()));
        // Borrowed and owned encode to the same bytes.
        let again = CommandRef::Put { key, value }.encode().unwrap();
        assert_eq!(again, payload);
    }

    #[test]
    fn v1_layout_is_stable() {
        // The byte layout is part of the on-disk format: version u16, variant u32, then
        // length-prefixed byte strings (u64 LE). Changing it breaks every existing log.
        let bytes = Command::Put {
            key: b"a".to_vec(),
            value: b"bc".to_vec(),
        }
        .encode()
        .unwrap();
        let mut expected = vec![1, 0, 0, 0, 0, 0];
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.push(b'a');
        expected.extend_from_slice(&2u64.to_le_bytes());
        expected.extend_from_slice(b"bc");
        assert_eq!(bytes, expected);
        let del = Command::Delete { key: b"a".to_vec() }.encode().unwrap();
        assert_eq!(&del[..6], &[1, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn unknown_version_and_variant_are_typed_errors() {
        let mut bytes = Command::Delete { key: b"a".to_vec() }.encode().unwrap();
        bytes[0] = 3;
        assert!(matches!(
            Command::decode(&bytes),
            Err(CommandError::UnsupportedVersion(3))
        ));
        bytes[0] = 1;
        bytes[2] = 9; // variant 9 does not exist (yet)
        assert!(matches!(
            Command::decode(&bytes),
            Err(CommandError::Decode(_))
        ));
        assert!(matches!(Command::decode(&[]), Err(CommandError::Decode(_))));
        assert!(matches!(
            Command::decode(&[1]),
            Err(CommandError::Decode(_))
        ));
        // A length prefix far beyond the input must fail without allocating it.
        let mut evil = Command::Delete { key: b"a".to_vec() }.encode().unwrap();
        evil[6..14].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Command::decode(&evil),
            Err(CommandError::Decode(_))
        ));
    }

    #[test]
    fn limits_are_enforced_with_typed_errors() {
        let limits = CommandLimits {
            key_bytes_max: 4,
            value_bytes_max: 8,
        };
        let ok = Command::Put {
            key: b"abcd".to_vec(),
            value: vec![0; 8],
        };
        assert!(ok.validate(&limits).is_ok());
        let long_key = Command::Delete {
            key: b"abcde".to_vec(),
        };
        assert!(matches!(
            long_key.validate(&limits),
            Err(CommandError::KeyTooLarge {
                len_bytes: 5,
                bytes_max: 4
            })
        ));
        let long_value = Command::Put {
            key: b"a".to_vec(),
            value: vec![0; 9],
        };
        assert!(matches!(
            long_value.validate(&limits),
            Err(CommandError::ValueTooLarge {
                len_bytes: 9,
                bytes_max: 8
            })
        ));
        let empty = Command::Delete { key: Vec::new() };
        assert!(matches!(
            empty.validate(&limits),
            Err(CommandError::EmptyKey)
        ));
        // The key is judged first, as the HTTP layer does before it reads the body.
        let both_bad = Command::Put {
            key: Vec::new(),
            value: vec![0; 9],
        };
        assert!(matches!(
            both_bad.validate(&limits),
            Err(CommandError::EmptyKey)
        ));
        assert!(limits.check_key(b"abcd").is_ok());
        assert_eq!(
            limits.check_key(b"abcde").unwrap_err().to_string(),
            "key of 5 bytes exceeds the limit of 4 bytes"
        );
        let defaults = CommandLimits::default();
        assert_eq!(defaults.key_bytes_max, 8192);
        assert_eq!(defaults.value_bytes_max, 1 << 20);
    }

    fn sample_txn() -> Txn {
        use crate::txn::{Compare, CompareOp, Target, TxnOp};
        Txn {
            compares: vec![
                Compare {
                    key: b"k".to_vec(),
                    op: CompareOp::Equal,
                    target: Target::ModRevision(0),
                },
                Compare {
                    key: b"k\xff".to_vec(),
                    op: CompareOp::NotEqual,
                    target: Target::Value(vec![0, 1, 2]),
                },
                Compare {
                    key: b"v".to_vec(),
                    op: CompareOp::Less,
                    target: Target::Version(u64::MAX),
                },
                Compare {
                    key: b"c".to_vec(),
                    op: CompareOp::Greater,
                    target: Target::CreateRevision(7),
                },
            ],
            success: vec![
                TxnOp::Put {
                    key: b"k".to_vec(),
                    value: vec![9; 300],
                    lease: 0,
                },
                TxnOp::Delete {
                    key: b"old".to_vec(),
                },
                TxnOp::DeletePrefix {
                    prefix: b"p/".to_vec(),
                },
                TxnOp::Get { key: b"k".to_vec() },
            ],
            failure: vec![TxnOp::Get { key: b"k".to_vec() }],
        }
    }

    fn every_command() -> Vec<Command> {
        vec![
            Command::Put {
                key: b"k\x00".to_vec(),
                value: Vec::new(),
            },
            Command::Delete {
                key: b"key".to_vec(),
            },
            Command::DeletePrefix {
                prefix: b"p/".to_vec(),
            },
            Command::Txn(sample_txn()),
            Command::Txn(Txn::default()),
            Command::ExpireSessions {
                now_ms: 1_700_000_000_000,
                ttl_ms: 3_600_000,
                sessions_max: 100_000,
            },
            Command::PutLeased {
                key: b"svc/a".to_vec(),
                value: b"10.0.0.1".to_vec(),
                lease: 7,
            },
            Command::LeaseGrant {
                ttl_ms: 10_000,
                leases_max: 100_000,
            },
            Command::LeaseRevoke { id: 7 },
        ]
    }

    #[test]
    fn every_command_round_trips_with_and_without_a_session() {
        let session = Session {
            client: b"client-1.A_z".to_vec(),
            seq: 42,
            now_ms: 1_700_000_000_123,
        };
        for cmd in every_command() {
            let plain = cmd.encode().unwrap();
            assert_eq!(&plain[..2], &COMMAND_VERSION.to_le_bytes());
            assert_eq!(Command::decode(&plain).unwrap(), cmd);
            assert_eq!(
                Command::decode_with_session(&plain).unwrap(),
                (None, cmd.clone())
            );
            let with = cmd.encode_with(Some(&session)).unwrap();
            assert_eq!(&with[..2], &COMMAND_VERSION_SESSION.to_le_bytes());
            assert_eq!(
                Command::decode_with_session(&with).unwrap(),
                (Some(session.clone()), cmd.clone())
            );
            // A reader that ignores sessions still reads the command.
            assert_eq!(Command::decode(&with).unwrap(), cmd);
            // Borrowed and owned encode the same bytes.
            let p = CommandRef::decode_proposal(&with).unwrap();
            assert_eq!(p.session, Some(session.borrowed()));
            assert_eq!(p.command.encode_with(p.session).unwrap(), with);
            // Truncated or extended payloads are errors, never a different command.
            for len in 0..with.len() {
                assert!(
                    Command::decode_with_session(&with[..len]).is_err(),
                    "{cmd:?} cut at {len}"
                );
            }
            let mut longer = with.clone();
            longer.push(0);
            assert!(matches!(
                Command::decode(&longer),
                Err(CommandError::Decode(_))
            ));
        }
    }

    #[test]
    fn a_payload_without_a_session_is_byte_identical_to_version_1() {
        // The exact bytes round 1 wrote for `Put { a, bc }` (see v1_layout_is_stable).
        let mut round_1 = vec![1, 0, 0, 0, 0, 0];
        round_1.extend_from_slice(&1u64.to_le_bytes());
        round_1.push(b'a');
        round_1.extend_from_slice(&2u64.to_le_bytes());
        round_1.extend_from_slice(b"bc");
        let put = Command::Put {
            key: b"a".to_vec(),
            value: b"bc".to_vec(),
        };
        assert_eq!(put.encode_with(None).unwrap(), round_1);
        assert_eq!(put.borrowed().encode_with(None).unwrap(), round_1);
        assert_eq!(Command::decode_with_session(&round_1).unwrap(), (None, put));
        // New variants are appended after round 1's: Put 0, Delete 1, then 2, 3, 4.
        for (cmd, variant) in every_command().into_iter().skip(2).zip([2u8, 3, 3, 4]) {
            assert_eq!(&cmd.encode().unwrap()[2..6], &[variant, 0, 0, 0], "{cmd:?}");
        }
    }

    #[test]
    fn v2_layout_is_stable() {
        // version u16 2 ‖ client (u64 length ‖ bytes) ‖ seq u64 ‖ now_ms u64 ‖ the command.
        let session = Session {
            client: b"c1".to_vec(),
            seq: 3,
            now_ms: 0x0102,
        };
        let bytes = Command::Delete { key: b"a".to_vec() }
            .encode_with(Some(&session))
            .unwrap();
        let mut expected = vec![2, 0];
        expected.extend_from_slice(&2u64.to_le_bytes());
        expected.extend_from_slice(b"c1");
        expected.extend_from_slice(&3u64.to_le_bytes());
        expected.extend_from_slice(&0x0102u64.to_le_bytes());
        expected.extend_from_slice(&[1, 0, 0, 0]);
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.push(b'a');
        assert_eq!(bytes, expected);
    }

    #[test]
    fn txn_payloads_round_trip_and_borrow_from_the_payload() {
        let cmd = Command::Txn(sample_txn());
        let bytes = cmd.encode().unwrap();
        let CommandRef::Txn(t) = CommandRef::decode(&bytes).unwrap() else {
            panic!("a txn decodes as a txn");
        };
        assert_eq!(t.to_txn(), sample_txn());
        let inside = bytes.as_ptr_range();
        let crate::txn::OpRef::Put { value, .. } = t.success[0] else {
            panic!("the first success op is a put");
        };
        assert!(inside.contains(&value.as_ptr()));
        assert!(inside.contains(&t.compares[1].key.as_ptr()));
        assert_eq!(CommandRef::Txn(t).encode().unwrap(), bytes);
        // The default limits accept it; validation goes through the command too.
        assert!(cmd.validate(&CommandLimits::default()).is_ok());
        let mut huge = sample_txn();
        huge.compares = vec![huge.compares[0].clone(); crate::txn::TXN_COMPARES_MAX_DEFAULT + 1];
        assert!(matches!(
            Command::Txn(huge).validate(&CommandLimits::default()),
            Err(CommandError::TxnTooLarge(_))
        ));
        let mut empty_prefix = sample_txn();
        empty_prefix.failure = vec![crate::txn::TxnOp::DeletePrefix { prefix: Vec::new() }];
        assert!(matches!(
            Command::Txn(empty_prefix).validate(&CommandLimits::default()),
            Err(CommandError::EmptyKey)
        ));
    }

    #[test]
    fn sessions_and_client_ids_are_validated_at_their_edges() {
        let ok = |client: &[u8], seq| {
            SessionRef {
                client,
                seq,
                now_ms: 0,
            }
            .validate()
        };
        let longest = [b'x'; CLIENT_ID_BYTES_MAX];
        let too_long = [b'x'; CLIENT_ID_BYTES_MAX + 1];
        let every_allowed = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-";
        assert!(every_allowed.len() > CLIENT_ID_BYTES_MAX);
        for (client, seq) in [
            (&b"a"[..], 1),
            (&longest[..], u64::MAX),
            (&every_allowed[..32], 1),
            (&every_allowed[32..], 1),
            (b"-", 1),
            (b"..", 1),
        ] {
            assert!(
                ok(client, seq).is_ok(),
                "{:?}",
                String::from_utf8_lossy(client)
            );
            assert!(check_client_id(client).is_ok());
        }
        for bad in [
            &b""[..],
            &too_long[..],
            b"a b",
            b"a/b",
            b"a:b",
            b"a\0",
            b"caf\xc3\xa9",
            b"\xff",
            b"a+b",
        ] {
            let err = ok(bad, 1).unwrap_err();
            assert!(matches!(err, CommandError::InvalidSession(_)), "{bad:?}");
            assert!(check_client_id(bad).is_err());
        }
        let err = ok(b"a", 0).unwrap_err();
        assert!(err.to_string().contains("start at 1"), "{err}");
        // A bad id is reported before a bad sequence number.
        assert!(ok(b"", 0).unwrap_err().to_string().contains("client id"));
    }

    #[test]
    fn expiry_and_key_of_the_new_commands() {
        let limits = CommandLimits::default();
        let expire = |ttl_ms| Command::ExpireSessions {
            now_ms: 0,
            ttl_ms,
            sessions_max: 1,
        };
        assert!(matches!(
            expire(0).validate(&limits),
            Err(CommandError::InvalidSession(_))
        ));
        assert!(expire(1).validate(&limits).is_ok());
        assert!(matches!(
            Command::DeletePrefix { prefix: Vec::new() }.validate(&limits),
            Err(CommandError::EmptyKey)
        ));
        let cmds = every_command();
        let keys: Vec<_> = cmds.iter().map(|c| c.borrowed().key()).collect();
        assert_eq!(
            keys,
            vec![
                Some(&b"k\x00"[..]),
                Some(&b"key"[..]),
                Some(&b"p/"[..]),
                None,
                None,
                None,
                Some(&b"svc/a"[..]),
                None,
                None
            ]
        );
    }
}
