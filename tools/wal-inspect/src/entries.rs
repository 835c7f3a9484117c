//! The `--entries` mode: one line (or JSON object) per live entry in an index range.
//!
//! Entries are read straight from the scanned segment bytes at the locations the replay
//! recorded, re-checking each record's CRC, and streamed out one at a time so that dumping a
//! million-entry WAL needs no more memory than the scan itself. How a payload is shown is the
//! decoder's business ([`crate::payload`]): `wal-inspect` passes one that decodes `Normal`
//! entries as client commands.

use crate::payload::{PayloadDecoder, PayloadView};
use raftkv_storage::wal::record::{self, Record};
use raftkv_storage::wal::scan::{Scan, ScannedSegment};
use serde::ser::{Error as _, SerializeSeq as _};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;

/// An inclusive index range; `None` ends are open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexRange {
    pub from: Option<u64>,
    pub to: Option<u64>,
}

impl std::str::FromStr for IndexRange {
    type Err = String;

    /// `N`, `FROM..TO` (TO excluded), `FROM..=TO`, `FROM..`, `..TO`, `..=TO` or `..`.
    fn from_str(s: &str) -> Result<IndexRange, String> {
        let num = |t: &str| {
            t.trim()
                .parse::<u64>()
                .map_err(|_| format!("`{t}` is not an index in range `{s}`"))
        };
        let bound = |t: &str| -> Result<Option<u64>, String> {
            if t.trim().is_empty() {
                Ok(None)
            } else {
                num(t).map(Some)
            }
        };
        let Some((lo, hi)) = s.split_once("..") else {
            let n = num(s)?;
            return Ok(IndexRange {
                from: Some(n),
                to: Some(n),
            });
        };
        let from = bound(lo)?;
        let to = if let Some(hi) = hi.strip_prefix('=') {
            bound(hi)?
        } else {
            match bound(hi)? {
                Some(0) => return Err(format!("range `{s}` is empty")),
                Some(n) => Some(n - 1),
                None => None,
            }
        };
        if let (Some(f), Some(t)) = (from, to) {
            if f > t {
                return Err(format!("range `{s}` is empty"));
            }
        }
        Ok(IndexRange { from, to })
    }
}

/// One entry as shown.
#[derive(Clone, Debug, Serialize)]
pub struct EntryView {
    pub index: u64,
    pub term: u64,
    pub kind: &'static str,
    pub payload_bytes: usize,
    pub file: String,
    pub offset: u64,
    pub payload: PayloadView,
}

/// The live entries of `scan` in `range`, clamped to the log, in index order.
pub struct EntryListing<'a> {
    scan: &'a Scan,
    by_seq: BTreeMap<u64, &'a ScannedSegment>,
    decoder: &'a dyn PayloadDecoder,
    record_bytes_max: u64,
    /// Inclusive bounds actually listed; `lo > hi` when nothing is.
    pub lo: u64,
    pub hi: u64,
}

impl<'a> EntryListing<'a> {
    pub fn new(
        scan: &'a Scan,
        range: IndexRange,
        decoder: &'a dyn PayloadDecoder,
        record_bytes_max: u64,
    ) -> EntryListing<'a> {
        let log = &scan.log;
        let lo = range.from.unwrap_or(0).max(log.first_index);
        let hi = range.to.unwrap_or(u64::MAX).min(log.last_index());
        EntryListing {
            scan,
            by_seq: scan.segments.iter().map(|s| (s.header.seq, s)).collect(),
            decoder,
            record_bytes_max,
            lo,
            hi,
        }
    }

    pub fn len(&self) -> u64 {
        if self.lo > self.hi {
            0
        } else {
            self.hi - self.lo + 1
        }
    }

    /// Reads and decodes entry `index` from the segment bytes.
    pub fn entry(&self, index: u64) -> Result<EntryView, String> {
        let log = &self.scan.log;
        let loc = log
            .locs
            .get((index - log.first_index) as usize)
            .ok_or_else(|| format!("entry {index} is not in the log"))?;
        let seg = self
            .by_seq
            .get(&loc.seq)
            .ok_or_else(|| format!("entry {index} points at unscanned segment {}", loc.seq))?;
        let start = loc.offset as usize;
        let bytes = seg
            .bytes
            .get(start..start + loc.len as usize)
            .ok_or_else(|| format!("entry {index} lies past the end of {}", seg.name))?;
        let frame = record::read_frame(bytes, loc.seq, self.record_bytes_max)
            .map_err(|e| format!("entry {index} in {} @ {start}: {e}", seg.name))?;
        match frame.decode() {
            Ok(Record::Entry(e)) if e.index == index => Ok(EntryView {
                index: e.index,
                term: e.term,
                kind: e.kind.name(),
                payload_bytes: e.payload.len(),
                file: seg.name.clone(),
                offset: loc.offset,
                payload: self.decoder.describe(e.kind, &e.payload),
            }),
            Ok(other) => Err(format!(
                "expected entry {index} in {} @ {start}, found {other:?}",
                seg.name
            )),
            Err(e) => Err(format!("entry {index} in {} @ {start}: {e}", seg.name)),
        }
    }

    /// Writes one text line per entry, after a header line.
    pub fn write_text(&self, out: &mut dyn Write) -> anyhow::Result<()> {
        writeln!(
            out,
            "{:>12} {:>8} {:<6} {:>8}  payload",
            "index", "term", "kind", "bytes"
        )?;
        for index in self.lo..=self.hi {
            let e = self.entry(index).map_err(anyhow::Error::msg)?;
            writeln!(
                out,
                "{:>12} {:>8} {:<6} {:>8}  {}",
                e.index,
                e.term,
                e.kind,
                e.payload_bytes,
                e.payload.render()
            )?;
        }
        Ok(())
    }
}

/// The JSON form: the range and the entries, streamed.
#[derive(Serialize)]
pub struct EntriesJson<'a> {
    pub dir: String,
    pub verdict: crate::verdict::Verdict,
    pub first_index: u64,
    pub last_index: u64,
    pub count: u64,
    pub entries: &'a EntryListing<'a>,
}

impl Serialize for EntryListing<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.len() as usize))?;
        for index in self.lo..=self.hi {
            seq.serialize_element(&self.entry(index).map_err(S::Error::custom)?)?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::IndexRange;

    fn r(from: Option<u64>, to: Option<u64>) -> IndexRange {
        IndexRange { from, to }
    }

    #[test]
    fn ranges_parse() {
        assert_eq!("7".parse(), Ok(r(Some(7), Some(7))));
        assert_eq!("3..10".parse(), Ok(r(Some(3), Some(9))));
        assert_eq!("3..=10".parse(), Ok(r(Some(3), Some(10))));
        assert_eq!("3..".parse(), Ok(r(Some(3), None)));
        assert_eq!("..10".parse(), Ok(r(None, Some(9))));
        assert_eq!("..=10".parse(), Ok(r(None, Some(10))));
        assert_eq!("..".parse(), Ok(r(None, None)));
        assert!("5..5".parse::<IndexRange>().is_err());
        assert!("..0".parse::<IndexRange>().is_err());
        assert!("x..4".parse::<IndexRange>().is_err());
        assert!("9..=3".parse::<IndexRange>().is_err());
        assert!("".parse::<IndexRange>().is_err());
    }
}
