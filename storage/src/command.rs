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
use serde::{Deserialize, Serialize, Serializer};

/// The envelope version this code writes.
pub const COMMAND_VERSION: u16 = 1;

/// Default largest key, in bytes.
pub const KEY_BYTES_MAX_DEFAULT: usize = 8 * 1024;
/// Default largest value, in bytes.
pub const VALUE_BYTES_MAX_DEFAULT: usize = 1024 * 1024;

/// A client command that owns its key and value. Encodes and decodes through [`CommandRef`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Sets `key` to `value`.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Removes `key` (a no-op if it is absent; the result says which).
    Delete { key: Vec<u8> },
}

/// A client command borrowing its key and value. Its serde layout is the on-disk format:
/// append new variants at the end only (see the module doc), in step with [`Command`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// What applying a command did, handed back to whoever proposed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandOutcome {
    /// The key now holds the value.
    Put,
    /// The key is gone; `existed` says whether it was there before.
    Delete { existed: bool },
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

/// A command that is invalid or cannot be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("key of {len_bytes} bytes exceeds the limit of {bytes_max} bytes")]
    KeyTooLarge { len_bytes: usize, bytes_max: usize },
    #[error("value of {len_bytes} bytes exceeds the limit of {bytes_max} bytes")]
    ValueTooLarge { len_bytes: usize, bytes_max: usize },
    #[error("the key must not be empty")]
    EmptyKey,
    #[error(
        "command format version {0} is not supported (this build reads version {COMMAND_VERSION})"
    )]
    UnsupportedVersion(u16),
    #[error("undecodable command: {0}")]
    Decode(#[source] CodecError),
    #[error("unencodable command: {0}")]
    Encode(#[source] CodecError),
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    version: u16,
    command: CommandRef<'a>,
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

impl Command {
    /// The borrowed view of this command.
    pub fn borrowed(&self) -> CommandRef<'_> {
        match self {
            Command::Put { key, value } => CommandRef::Put { key, value },
            Command::Delete { key } => CommandRef::Delete { key },
        }
    }

    /// The key this command touches.
    pub fn key(&self) -> &[u8] {
        match self {
            Command::Put { key, .. } | Command::Delete { key } => key,
        }
    }

    /// Checks the size limits (key first, then value); call before proposing.
    pub fn validate(&self, limits: &CommandLimits) -> Result<(), CommandError> {
        self.borrowed().validate(limits)
    }

    /// The payload of a `Normal` log entry carrying this command.
    pub fn encode(&self) -> Result<Vec<u8>, CommandError> {
        self.borrowed().encode()
    }

    /// Decodes a `Normal` entry's payload into owned bytes.
    pub fn decode(payload: &[u8]) -> Result<Command, CommandError> {
        CommandRef::decode(payload).map(CommandRef::to_command)
    }
}

impl<'a> CommandRef<'a> {
    /// The key this command touches.
    pub fn key(&self) -> &'a [u8] {
        match *self {
            CommandRef::Put { key, .. } | CommandRef::Delete { key } => key,
        }
    }

    /// Checks the size limits (key first, then value); call before proposing.
    pub fn validate(&self, limits: &CommandLimits) -> Result<(), CommandError> {
        limits.check_key(self.key())?;
        if let CommandRef::Put { value, .. } = self {
            limits.check_value(value)?;
        }
        Ok(())
    }

    /// The payload of a `Normal` log entry carrying this command: the one copy of the key
    /// and value on their way into the log.
    pub fn encode(&self) -> Result<Vec<u8>, CommandError> {
        codec::encode(&EnvelopeOut {
            version: COMMAND_VERSION,
            command: *self,
        })
        .map_err(CommandError::Encode)
    }

    /// Decodes a `Normal` entry's payload; the key and value point into `payload`.
    pub fn decode(payload: &'a [u8]) -> Result<CommandRef<'a>, CommandError> {
        // The version is the first two bytes; read it alone so an unknown version is reported
        // as such rather than as a garbled body.
        let head = &payload[..payload.len().min(2)];
        let version = codec::decode::<VersionOnly>(head)
            .map_err(CommandError::Decode)?
            .version;
        if version != COMMAND_VERSION {
            return Err(CommandError::UnsupportedVersion(version));
        }
        let envelope: EnvelopeIn<'a> = codec::decode(payload).map_err(CommandError::Decode)?;
        Ok(envelope.command)
    }

    /// An owned copy.
    pub fn to_command(self) -> Command {
        match self {
            CommandRef::Put { key, value } => Command::Put {
                key: key.to_vec(),
                value: value.to_vec(),
            },
            CommandRef::Delete { key } => Command::Delete { key: key.to_vec() },
        }
    }
}

/// Writes a byte slice as one byte string (a u64 length, then the bytes), not as a sequence
/// of u8 (the same bytes with bincode, but encoded one element at a time). Reading it back
/// borrows the bytes from the input (serde's `&[u8]` does that by itself).
fn byte_str<S: Serializer>(bytes: &&[u8], s: S) -> Result<S::Ok, S::Error> {
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
        bytes[0] = 2;
        assert!(matches!(
            Command::decode(&bytes),
            Err(CommandError::UnsupportedVersion(2))
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
}
