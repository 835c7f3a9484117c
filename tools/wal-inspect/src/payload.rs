//! How bytes are shown: keys, values and entry payloads, and the [`PayloadDecoder`] seam.
//!
//! [`BytesView`] is the one rule for showing bytes a person may want to read: text when they
//! are short, valid UTF-8 without control characters; a hex prefix otherwise. Keys and values
//! in snapshot dumps and the raw display of payloads all use it, so the same bytes look the
//! same everywhere.
//!
//! [`CommandPayload`] (the tool's decoder) reads a `Normal` entry's payload as a client
//! [`Command`] and shows `put KEY (N bytes)` / `del KEY`. A payload that does not decode, and
//! every other entry kind, falls back to [`RawPayload`]; the fallback says why, so a
//! command the tool cannot read is never mistaken for one it understood. A new command
//! encoding means a new decoder behind the same trait; nothing else in the tool changes.

use raftkv_storage::command::{Command, KEY_BYTES_MAX_DEFAULT};
use raftkv_storage::EntryKind;
use serde::Serialize;
use std::fmt::Write as _;

/// Bytes as the tool shows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BytesView {
    /// How `value` is to be read: `"text"`, `"hex"` or `"empty"`.
    pub format: &'static str,
    pub value: String,
    /// True when `value` shows only a prefix of the bytes.
    pub truncated: bool,
}

impl BytesView {
    /// Text if `bytes` is at most `text_bytes_max` of printable UTF-8, else the first
    /// `hex_bytes_max` bytes in hex.
    pub fn new(bytes: &[u8], text_bytes_max: usize, hex_bytes_max: usize) -> BytesView {
        if bytes.is_empty() {
            return BytesView {
                format: "empty",
                value: String::new(),
                truncated: false,
            };
        }
        if bytes.len() <= text_bytes_max {
            if let Ok(text) = std::str::from_utf8(bytes) {
                if !text.chars().any(char::is_control) {
                    return BytesView {
                        format: "text",
                        value: text.to_string(),
                        truncated: false,
                    };
                }
            }
        }
        let shown = &bytes[..bytes.len().min(hex_bytes_max)];
        let mut value = String::with_capacity(shown.len() * 2);
        for byte in shown {
            // Writing to a String cannot fail.
            let _ = write!(value, "{byte:02x}");
        }
        BytesView {
            format: "hex",
            value,
            truncated: shown.len() < bytes.len(),
        }
    }

    /// A key, in full up to the default key limit (8 KiB): keys are what a person looks for.
    pub fn key(key: &[u8]) -> BytesView {
        BytesView::new(key, KEY_BYTES_MAX_DEFAULT, KEY_BYTES_MAX_DEFAULT)
    }

    /// A value: text when short, else a short hex prefix (the size is shown beside it).
    pub fn value(value: &[u8]) -> BytesView {
        BytesView::new(value, 64, 16)
    }

    /// One token for a text line: `"quoted text"`, `hex:0a1b…` or `-` when empty.
    pub fn render(&self) -> String {
        let more = if self.truncated { "…" } else { "" };
        match self.format {
            "text" => format!("{:?}", self.value),
            "empty" => "-".to_string(),
            format => format!("{format}:{}{more}", self.value),
        }
    }
}

/// A decoded client command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CommandView {
    /// `put`, `del`, `del-prefix`, `txn` or `expire-sessions`.
    pub op: &'static str,
    pub key: BytesView,
    /// A put's value size; `None` for a delete.
    pub value_bytes: Option<usize>,
    /// A put's value (text when short, else a hex prefix).
    pub value: Option<BytesView>,
}

/// A payload as the tool shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PayloadView {
    /// How `value` is to be read: `"text"`, `"hex"`, `"empty"`, or `"command"` (a decoded
    /// client command, also given structured in `command`).
    pub format: &'static str,
    pub value: String,
    /// True when `value` shows only a prefix of the payload.
    pub truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandView>,
    /// Why a payload that should hold a command is shown raw instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_a_command: Option<String>,
}

impl PayloadView {
    fn raw(bytes: BytesView) -> PayloadView {
        PayloadView {
            format: bytes.format,
            value: bytes.value,
            truncated: bytes.truncated,
            command: None,
            not_a_command: None,
        }
    }

    /// One column for a text line.
    pub fn render(&self) -> String {
        match (&self.command, &self.not_a_command) {
            (Some(_), _) => self.value.clone(),
            (None, why) => {
                let raw = BytesView {
                    format: self.format,
                    value: self.value.clone(),
                    truncated: self.truncated,
                }
                .render();
                match why {
                    Some(why) => format!("{raw}  (not a command: {why})"),
                    None => raw,
                }
            }
        }
    }
}

/// Turns payload bytes into something a person can read.
pub trait PayloadDecoder {
    fn describe(&self, kind: EntryKind, payload: &[u8]) -> PayloadView;
}

/// Shows payload bytes as text or a hex prefix, with no knowledge of their meaning.
#[derive(Clone, Copy, Debug)]
pub struct RawPayload {
    /// Payloads up to this many bytes that are printable UTF-8 are shown as text.
    pub text_bytes_max: usize,
    /// Other payloads show this many leading bytes in hex.
    pub hex_bytes_max: usize,
}

impl Default for RawPayload {
    fn default() -> Self {
        RawPayload {
            text_bytes_max: 64,
            hex_bytes_max: 32,
        }
    }
}

impl PayloadDecoder for RawPayload {
    fn describe(&self, _kind: EntryKind, payload: &[u8]) -> PayloadView {
        PayloadView::raw(BytesView::new(
            payload,
            self.text_bytes_max,
            self.hex_bytes_max,
        ))
    }
}

/// Decodes `Normal` entries as client commands; everything else, and anything that does not
/// decode, is shown by `raw`.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommandPayload {
    pub raw: RawPayload,
}

impl PayloadDecoder for CommandPayload {
    fn describe(&self, kind: EntryKind, payload: &[u8]) -> PayloadView {
        if kind != EntryKind::Normal {
            return self.raw.describe(kind, payload);
        }
        match Command::decode(payload) {
            Ok(Command::Put { key, value }) => {
                let key = BytesView::key(&key);
                PayloadView {
                    format: "command",
                    value: format!("put {} ({} bytes)", key.render(), value.len()),
                    truncated: false,
                    command: Some(CommandView {
                        op: "put",
                        key,
                        value_bytes: Some(value.len()),
                        value: Some(BytesView::value(&value)),
                    }),
                    not_a_command: None,
                }
            }
            Ok(Command::Delete { key }) => {
                let key = BytesView::key(&key);
                PayloadView {
                    format: "command",
                    value: format!("del {}", key.render()),
                    truncated: false,
                    command: Some(CommandView {
                        op: "del",
                        key,
                        value_bytes: None,
                        value: None,
                    }),
                    not_a_command: None,
                }
            }
            Ok(Command::DeletePrefix { prefix }) => {
                let key = BytesView::key(&prefix);
                command_view("del-prefix", format!("del-prefix {}", key.render()), key)
            }
            Ok(Command::Txn(txn)) => {
                let first = txn
                    .compares
                    .first()
                    .map(|c| c.key.clone())
                    .unwrap_or_default();
                let key = BytesView::key(&first);
                let text = format!(
                    "txn {} compares, {}/{} ops (first key {})",
                    txn.compares.len(),
                    txn.success.len(),
                    txn.failure.len(),
                    key.render()
                );
                command_view("txn", text, key)
            }
            Ok(Command::ExpireSessions {
                now_ms,
                ttl_ms,
                sessions_max,
            }) => command_view(
                "expire-sessions",
                format!("expire-sessions now_ms={now_ms} ttl_ms={ttl_ms} max={sessions_max}"),
                BytesView::key(b""),
            ),
            Ok(Command::PutLeased { key, value, lease }) => {
                let key = BytesView::key(&key);
                let text = format!("put {} ({} bytes) lease={lease}", key.render(), value.len());
                command_view("put-leased", text, key)
            }
            Ok(Command::LeaseGrant { ttl_ms, leases_max }) => command_view(
                "lease-grant",
                format!("lease-grant ttl_ms={ttl_ms} max={leases_max}"),
                BytesView::key(b""),
            ),
            Ok(Command::LeaseRevoke { id }) => command_view(
                "lease-revoke",
                format!("lease-revoke id={id}"),
                BytesView::key(b""),
            ),
            Err(e) => PayloadView {
                not_a_command: Some(e.to_string()),
                ..self.raw.describe(kind, payload)
            },
        }
    }
}

/// A command without a value to show.
fn command_view(op: &'static str, value: String, key: BytesView) -> PayloadView {
    PayloadView {
        format: "command",
        value,
        truncated: false,
        command: Some(CommandView {
            op,
            key,
            value_bytes: None,
            value: None,
        }),
        not_a_command: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_printable_text_is_shown_as_text() {
        let view = RawPayload::default().describe(EntryKind::Normal, b"put k v");
        assert_eq!(view.format, "text");
        assert_eq!(view.value, "put k v");
        assert!(!view.truncated);
        assert_eq!(view.render(), "\"put k v\"");
    }

    #[test]
    fn binary_and_long_payloads_are_shown_as_a_hex_prefix() {
        let decoder = RawPayload {
            text_bytes_max: 4,
            hex_bytes_max: 3,
        };
        let view = decoder.describe(EntryKind::Normal, &[0, 1, 0xab, 0xff]);
        assert_eq!((view.format, view.value.as_str()), ("hex", "0001ab"));
        assert!(view.truncated);
        assert_eq!(view.render(), "hex:0001ab…");
        let view = decoder.describe(EntryKind::Normal, b"hello");
        assert_eq!((view.format, view.value.as_str()), ("hex", "68656c"));
        let view = decoder.describe(EntryKind::Noop, b"");
        assert_eq!(view.format, "empty");
        assert_eq!(view.render(), "-");
    }

    #[test]
    fn commands_decode_to_put_and_del() {
        let decoder = CommandPayload::default();
        let put = Command::Put {
            key: b"user/7".to_vec(),
            value: vec![0xff; 300],
        }
        .encode()
        .unwrap();
        let view = decoder.describe(EntryKind::Normal, &put);
        assert_eq!(view.format, "command");
        assert_eq!(view.render(), "put \"user/7\" (300 bytes)");
        let cmd = view.command.unwrap();
        assert_eq!((cmd.op, cmd.value_bytes), ("put", Some(300)));
        assert_eq!(cmd.value.unwrap().format, "hex");

        let del = Command::Delete {
            key: vec![0, 1, 0xfe],
        }
        .encode()
        .unwrap();
        let view = decoder.describe(EntryKind::Normal, &del);
        assert_eq!(view.render(), "del hex:0001fe");
        assert_eq!(view.command.unwrap().value_bytes, None);
    }

    #[test]
    fn undecodable_payloads_fall_back_to_raw_and_say_so() {
        let decoder = CommandPayload::default();
        let view = decoder.describe(EntryKind::Normal, b"hello");
        assert_eq!((view.format, view.value.as_str()), ("text", "hello"));
        assert!(view.command.is_none());
        let why = view.not_a_command.clone().unwrap();
        assert!(
            view.render().starts_with("\"hello\"  (not a command: "),
            "{why}"
        );

        // Other kinds are never decoded as commands, and say nothing about it.
        let view = decoder.describe(EntryKind::Noop, b"hello");
        assert_eq!(view.render(), "\"hello\"");
        assert!(view.not_a_command.is_none());
        let view = decoder.describe(EntryKind::Normal, b"");
        assert_eq!(view.format, "empty");
        assert!(view.not_a_command.is_some());
    }
}
