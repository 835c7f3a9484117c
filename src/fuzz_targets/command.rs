//! The `command` target: a `Normal` entry's payload through `storage::command::Command::decode`,
//! which every node runs on every committed entry it applies.

use crate::storage::command::{Command, CommandLimits};

/// Fuzz body: what decodes must re-encode to exactly the same bytes (the envelope encoding is
/// canonical: fixed-width integers, no trailing bytes), and validation must not panic.
pub fn command(data: &[u8]) {
    let Ok((session, cmd)) = Command::decode_with_session(data) else {
        return;
    };
    match cmd.encode_with(session.as_ref()) {
        Ok(encoded) => assert_eq!(encoded, data, "a decoded command re-encodes to its input"),
        Err(e) => panic!("a decoded command {cmd:?} does not encode: {e}"),
    }
    let _ = cmd.validate(&CommandLimits::default());
}
