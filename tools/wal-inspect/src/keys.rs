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

/// What the listing found, written after the keys.
struct KeysTrailer {
    keys_listed: u64,
    /// Pairs read (listed or not) before the end or the damage.
    keys_read: u64,
    verdict: Verdict,
    exit_code: u8,
    damage: Option<DamageView>,
}

/// What is known before the keys.
struct KeysHeader<'a> {
    file: String,
    index: Option<u64>,
    term: Option<u64>,
    /// The header's key count (absent when the header itself is damaged).
    key_count: Option<u64>,
    prefix: &'a BytesView,
}

/// Writes `value` as the JSON text of one field's value.
fn json_value(out: &mut dyn Write, value: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    Ok(())
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
    let prefix_view = BytesView::key(prefix);
    let (mut reader, mut damage) = match open_reader(path, parse_file_name(&name)) {
        Ok(reader) => (Some(reader), None),
        Err(ReadFailure::Vanished) => anyhow::bail!("{} disappeared", path.display()),
        Err(ReadFailure::Unreadable(d) | ReadFailure::Damaged(d)) => (None, Some(d)),
    };
    let header = KeysHeader {
        file: path.display().to_string(),
        index: reader.as_ref().map(|r| r.meta().index),
        term: reader.as_ref().map(|r| r.meta().term),
        key_count: reader.as_ref().map(|r| r.header().key_count),
        prefix: &prefix_view,
    };
    if json {
        write!(out, "{{\n  \"file\": ")?;
        json_value(out, &header.file)?;
        write!(out, ",\n  \"index\": ")?;
        json_value(out, &header.index)?;
        write!(out, ",\n  \"term\": ")?;
        json_value(out, &header.term)?;
        write!(out, ",\n  \"key_count\": ")?;
        json_value(out, &header.key_count)?;
        write!(out, ",\n  \"prefix\": ")?;
        json_value(out, header.prefix)?;
        write!(out, ",\n  \"keys\": [")?;
    } else {
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        writeln!(
            out,
            "snapshot {}: index {}, term {}, {} keys; prefix {}",
            header.file,
            opt(header.index),
            opt(header.term),
            opt(header.key_count),
            prefix_view.render()
        )?;
    }
    let mut listed = 0u64;
    let mut read = 0u64;
    if let Some(reader) = reader.as_mut() {
        loop {
            match reader.next_pair() {
                Ok(Some((key, value))) => {
                    read += 1;
                    if !key.starts_with(prefix) {
                        continue;
                    }
                    let pair = PairView {
                        key: BytesView::key(key),
                        value_bytes: value.len(),
                        value: BytesView::value(value),
                    };
                    if json {
                        let sep = if listed == 0 { "" } else { "," };
                        write!(out, "{sep}\n    ")?;
                        json_value(out, &pair)?;
                    } else {
                        writeln!(
                            out,
                            "{}  ({} bytes)  {}",
                            pair.key.render(),
                            pair.value_bytes,
                            pair.value.render()
                        )?;
                    }
                    listed += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    damage = match ReadFailure::from_format(e) {
                        ReadFailure::Unreadable(d) | ReadFailure::Damaged(d) => Some(d),
                        ReadFailure::Vanished => None,
                    };
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
    let trailer = KeysTrailer {
        keys_listed: listed,
        keys_read: read,
        verdict,
        exit_code: verdict.exit_code(),
        damage,
    };
    if json {
        let close = if listed == 0 { "]" } else { "\n  ]" };
        write!(out, "{close},\n  \"keys_listed\": ")?;
        json_value(out, &trailer.keys_listed)?;
        write!(out, ",\n  \"keys_read\": ")?;
        json_value(out, &trailer.keys_read)?;
        write!(out, ",\n  \"verdict\": ")?;
        json_value(out, &trailer.verdict)?;
        write!(out, ",\n  \"exit_code\": ")?;
        json_value(out, &trailer.exit_code)?;
        write!(out, ",\n  \"damage\": ")?;
        json_value(out, &trailer.damage)?;
        writeln!(out, "\n}}")?;
    } else if trailer.damage.is_none() {
        writeln!(
            out,
            "{listed} of {read} keys listed; the whole file verified"
        )?;
    } else {
        writeln!(
            out,
            "{listed} of {read} keys read were listed before the damage; the file does not verify"
        )?;
    }
    out.flush()?;
    if let Some(d) = &trailer.damage {
        eprintln!(
            "wal-inspect: the snapshot {} is damaged at byte offset {}: {}",
            path.display(),
            d.offset,
            d.reason
        );
    }
    Ok(trailer.verdict)
}
