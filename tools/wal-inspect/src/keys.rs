//! `--snapshot FILE --keys [PREFIX]`: the pairs of one snapshot file, in key order, streamed.
//!
//! The file is read once through the storage crate's `SnapshotFileReader`, which verifies each
//! chunk before handing out its pairs and the whole file at the end. Every key is written out
//! as soon as it is read, so memory stays at one chunk whatever the snapshot's size; the same
//! holds for `--json`, whose document is written by hand around one serialized object per key
//! (a `Serialize` impl could not report damage found after the last key).
//!
//! With a PREFIX only matching keys are shown, but the reader still goes to the end of the
//! file: the verdict is about the whole file, and the body CRC covers all of it. Damage stops
//! the listing where it is found; what was shown before it passed its chunk's CRC, and the
//! exit status (1) and the location (file, byte offset, reason) say the file as a whole did
//! not verify. A header that does not verify lists no keys: nothing in the file can be
//! trusted.

use crate::payload::BytesView;
use crate::snapshots::{open_reader, DamageView, ReadFailure};
use crate::verdict::Verdict;
use raftkv_storage::snapshot::parse_file_name;
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// One pair as listed.
#[derive(Serialize)]
struct PairView {
    key: BytesView,
    value_bytes: usize,
    value: BytesView,
}

/// What is known before the keys.
struct KeysHeader {
    /// `snapshot` or `backup`.
    kind: &'static str,
    file: String,
    index: Option<u64>,
    term: Option<u64>,
    /// The header's record count: user keys, plus in format 2 the session and lease tables
    /// and the watch history (absent when the header itself is damaged).
    record_count: Option<u64>,
    prefix: BytesView,
}

/// What the listing found, written after the keys.
struct KeysTrailer {
    keys_listed: u64,
    /// User keys read (listed or not) before the end or the damage.
    keys_read: u64,
    verdict: Verdict,
    damage: Option<DamageView>,
}

/// Writes the listing as it is read: text lines, or one JSON document whose `keys` array is
/// written one element at a time.
struct KeysWriter<'a> {
    out: &'a mut dyn Write,
    json: bool,
    listed: u64,
}

impl KeysWriter<'_> {
    /// A JSON object field `"name": value`, preceded by a comma unless it is the first.
    fn field(&mut self, name: &str, value: &impl Serialize, first: bool) -> anyhow::Result<()> {
        let sep = if first { "{" } else { "," };
        write!(self.out, "{sep}\n  \"{name}\": ")?;
        serde_json::to_writer(&mut *self.out, value)?;
        Ok(())
    }

    fn begin(&mut self, h: &KeysHeader) -> anyhow::Result<()> {
        if self.json {
            self.field("file", &h.file, true)?;
            self.field("index", &h.index, false)?;
            self.field("term", &h.term, false)?;
            self.field("record_count", &h.record_count, false)?;
            self.field("prefix", &h.prefix, false)?;
            write!(self.out, ",\n  \"keys\": [")?;
        } else {
            let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
            writeln!(
                self.out,
                "{} {}: index {}, term {}, {} records; prefix {}",
                h.kind,
                h.file,
                opt(h.index),
                opt(h.term),
                opt(h.record_count),
                h.prefix.render()
            )?;
        }
        Ok(())
    }

    fn pair(&mut self, p: &PairView) -> anyhow::Result<()> {
        if self.json {
            let sep = if self.listed == 0 { "" } else { "," };
            write!(self.out, "{sep}\n    ")?;
            serde_json::to_writer(&mut *self.out, p)?;
        } else {
            writeln!(
                self.out,
                "{}  ({} bytes)  {}",
                p.key.render(),
                p.value_bytes,
                p.value.render()
            )?;
        }
        self.listed += 1;
        Ok(())
    }

    fn end(&mut self, t: &KeysTrailer) -> anyhow::Result<()> {
        if self.json {
            let close = if self.listed == 0 { "]" } else { "\n  ]" };
            write!(self.out, "{close}")?;
            self.field("keys_listed", &t.keys_listed, false)?;
            self.field("keys_read", &t.keys_read, false)?;
            self.field("verdict", &t.verdict, false)?;
            self.field("exit_code", &t.verdict.exit_code(), false)?;
            self.field("damage", &t.damage, false)?;
            writeln!(self.out, "\n}}")?;
        } else if t.damage.is_none() {
            writeln!(
                self.out,
                "{} of {} keys listed; the whole file verified",
                t.keys_listed, t.keys_read
            )?;
        } else {
            writeln!(
                self.out,
                "{} of {} keys read were listed before the damage; the file does not verify",
                t.keys_listed, t.keys_read
            )?;
        }
        self.out.flush()?;
        Ok(())
    }
}

/// Dumps the keys of the snapshot at `path` that start with `prefix`, and returns the verdict:
/// clean when the whole file verified, corrupt (with the location on stderr and in the JSON)
/// when it did not.
pub fn dump(
    path: &Path,
    prefix: &[u8],
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<Verdict> {
    if !path.is_file() {
        anyhow::bail!("{} is not a file", path.display());
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (mut reader, mut damage) = match open_reader(path, parse_file_name(&name)) {
        Ok(reader) => (Some(reader), None),
        Err(ReadFailure::Vanished) => anyhow::bail!("{} disappeared", path.display()),
        Err(failure) => (None, failure.into_damage()),
    };
    let mut writer = KeysWriter {
        out,
        json,
        listed: 0,
    };
    let backup = reader.as_ref().is_some_and(|r| r.backup().is_some());
    writer.begin(&KeysHeader {
        kind: if backup { "backup" } else { "snapshot" },
        file: path.display().to_string(),
        index: reader.as_ref().map(|r| r.meta().index),
        term: reader.as_ref().map(|r| r.meta().term),
        record_count: reader.as_ref().map(|r| r.header().key_count),
        prefix: BytesView::key(prefix),
    })?;
    let mut read = 0u64;
    if let Some(reader) = reader.as_mut() {
        let version = reader.header().version;
        loop {
            match reader.next_pair() {
                Ok(Some(pair)) => {
                    // Format 2 holds the state machine's records: `d ‖ key` → 32 bytes of
                    // revisions ‖ value, and session bookkeeping, which is not a key.
                    let Some((key, value)) = user_pair(version, pair) else {
                        continue;
                    };
                    read += 1;
                    if key.starts_with(prefix) {
                        writer.pair(&PairView {
                            key: BytesView::key(key),
                            value_bytes: value.len(),
                            value: BytesView::value(value),
                        })?;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    damage = ReadFailure::from_format(e).into_damage();
                    break;
                }
            }
        }
    }
    let verdict = if damage.is_some() {
        Verdict::Corrupt
    } else {
        Verdict::Clean
    };
    writer.end(&KeysTrailer {
        keys_listed: writer.listed,
        keys_read: read,
        verdict,
        damage: damage.clone(),
    })?;
    if let Some(d) = &damage {
        eprintln!(
            "wal-inspect: the snapshot {} is damaged at byte offset {}: {}",
            path.display(),
            d.offset,
            d.reason
        );
    }
    Ok(verdict)
}

/// A snapshot pair as the user's key and value; `None` for a format-2 pair that is not a key
/// (the session and lease tables, the watch history) or whose record is too short to hold its revisions.
pub(crate) fn user_pair<'a>(
    version: u32,
    (key, value): (&'a [u8], &'a [u8]),
) -> Option<(&'a [u8], &'a [u8])> {
    if version < 2 {
        return Some((key, value));
    }
    match key.split_first() {
        Some((b'd', user_key)) if value.len() >= 32 => Some((user_key, &value[32..])),
        _ => None,
    }
}
