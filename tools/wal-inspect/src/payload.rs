//! How an entry's payload is shown: the [`PayloadDecoder`] seam.
//!
//! Today payloads are opaque bytes, so [`RawPayload`] shows them as text when they are short,
//! valid UTF-8 without control characters, and as a hex prefix otherwise. When commands get an
//! encoding, a decoder for them implements the same trait and `wal-inspect` picks it; nothing
//! else in the tool changes.

use raftkv_storage::EntryKind;
use serde::Serialize;
use std::fmt::Write as _;

/// A payload as the tool shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PayloadView {
    /// How `value` is to be read: `"text"`, `"hex"`, `"empty"`, or a decoder's own name.
    pub format: &'static str,
    pub value: String,
    /// True when `value` shows only a prefix of the payload.
    pub truncated: bool,
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
        if payload.is_empty() {
            return PayloadView {
                format: "empty",
                value: String::new(),
                truncated: false,
            };
        }
        if payload.len() <= self.text_bytes_max {
            if let Ok(text) = std::str::from_utf8(payload) {
                if !text.chars().any(char::is_control) {
                    return PayloadView {
                        format: "text",
                        value: text.to_string(),
                        truncated: false,
                    };
                }
            }
        }
        let shown = &payload[..payload.len().min(self.hex_bytes_max)];
        let mut value = String::with_capacity(shown.len() * 2);
        for byte in shown {
            // Writing to a String cannot fail.
            let _ = write!(value, "{byte:02x}");
        }
        PayloadView {
            format: "hex",
            value,
            truncated: shown.len() < payload.len(),
        }
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
        let view = decoder.describe(EntryKind::Normal, b"hello");
        assert_eq!((view.format, view.value.as_str()), ("hex", "68656c"));
        let view = decoder.describe(EntryKind::Noop, b"");
        assert_eq!(view.format, "empty");
    }
}
