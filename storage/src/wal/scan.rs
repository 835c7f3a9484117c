//! Reading a WAL directory without changing it: find the segments, check every record, and
//! replay them into the log they describe.
//!
//! [`Wal::open`](super::Wal::open) and `wal-inspect` share this code, so the tool reports
//! exactly what opening the WAL would do. The scan never writes: cutting a torn tail is the
//! opener's job, and only after the scan has said it is a tail.
//!
//! Rules (see DESIGN.md, "WAL recovery"):
//! - Segment sequence numbers are consecutive; each file starts with a segment header whose
//!   seq and first index match its name, and whose first index continues the log replayed so
//!   far (`last + 1`, with the same previous term).
//! - Entries arrive with index `last + 1` and a term no lower than the previous entry's.
//!   Overwrites come only through a truncate record, and a restart after an installed
//!   snapshot only through a reset record that matches the latest snapshot marker.
//! - Where records stop in the **last** segment, the remaining bytes must be zero (after the
//!   damaged record, if any): then it is a torn tail, the unacknowledged end of the last
//!   write. Any other damage, anywhere, is corruption, reported with file, offset and the
//!   last good index.

use super::record::{self, Frame, FrameError, Record, SegmentHeader};
use crate::types::{HardState, SnapshotMeta};
use crate::vfs::{FileBytes, Vfs};
use std::path::{Path, PathBuf};

/// Where one live entry's record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryLoc {
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
    pub term: u64,
}

/// The log as the records describe it.
#[derive(Clone, Debug, Default)]
pub struct ReplayedLog {
    /// Index of the first entry held (`last_index() + 1` when empty).
    pub first_index: u64,
    /// Term of entry `first_index - 1` (0 if none).
    pub prev_term: u64,
    /// `locs[i]` is entry `first_index + i`.
    pub locs: Vec<EntryLoc>,
    pub hard_state: HardState,
    pub snapshot: Option<SnapshotMeta>,
}

impl ReplayedLog {
    pub fn last_index(&self) -> u64 {
        // `first_index >= 1` (see `reset`), and entries are only appended at
        // `last_index() + 1`, checked: this neither underflows nor overflows.
        self.first_index - 1 + self.locs.len() as u64
    }

    /// The index the next entry must have, `None` if the log already ends at `u64::MAX`.
    fn next_index(&self) -> Option<u64> {
        self.last_index().checked_add(1)
    }

    pub fn last_term(&self) -> u64 {
        self.locs.last().map_or(self.prev_term, |l| l.term)
    }

    /// The term of `index`, if the log knows it (including `first_index - 1`).
    pub fn term(&self, index: u64) -> Option<u64> {
        if index.checked_add(1) == Some(self.first_index) {
            return Some(self.prev_term);
        }
        if index < self.first_index {
            return None;
        }
        self.locs
            .get((index - self.first_index) as usize)
            .map(|l| l.term)
    }

    fn reset(&mut self, next_index: u64, prev_term: u64) {
        assert!(
            next_index >= 1,
            "invariant: a log's first index is at least 1"
        );
        self.first_index = next_index;
        self.prev_term = prev_term;
        self.locs.clear();
    }
}

/// A segment file's name: `<seq:016x>-<first-index:016x>.wal`.
pub fn segment_file_name(seq: u64, first_index: u64) -> String {
    format!("{seq:016x}-{first_index:016x}.wal")
}

/// Parses a segment file name into (seq, first index).
pub fn parse_segment_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".wal")?;
    let (seq, first) = stem.split_once('-')?;
    if seq.len() != 16 || first.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(seq, 16).ok()?,
        u64::from_str_radix(first, 16).ok()?,
    ))
}

/// Damage that is not a torn tail: the WAL must not be opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    pub file: PathBuf,
    pub offset: u64,
    /// The last index replayed before the problem (0 if none).
    pub last_good_index: u64,
    pub reason: String,
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at byte offset {}: {} (last good index {})",
            self.file.display(),
            self.offset,
            self.reason,
            self.last_good_index
        )
    }
}

/// The unacknowledged end of the last write, found in the last segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    /// Where the damaged bytes start (the end of the last good record).
    pub offset: u64,
    /// How many bytes from `offset` are non-zero and would be cut.
    pub bytes: u64,
    pub reason: String,
}

/// What one segment holds, as far as the scan got.
#[derive(Debug)]
pub struct ScannedSegment {
    pub name: String,
    pub path: PathBuf,
    pub header: SegmentHeader,
    pub file_bytes: u64,
    /// End of the last valid record.
    pub used_bytes: u64,
    pub records: u64,
    /// Index range of the entry records written in this segment (live or later truncated).
    pub entry_range: Option<(u64, u64)>,
    /// False when the scan stopped before or inside this segment because of corruption.
    pub complete: bool,
    pub bytes: FileBytes,
}

/// Everything a scan learned.
#[derive(Debug, Default)]
pub struct Scan {
    pub dir: PathBuf,
    /// Segments in seq order, up to and including the one where corruption was found.
    pub segments: Vec<ScannedSegment>,
    /// Segment files not read because the scan stopped at corruption earlier.
    pub unscanned: Vec<String>,
    /// Leftover `*.tmp` files (an interrupted rotation); the opener removes them.
    pub temp_files: Vec<String>,
    pub log: ReplayedLog,
    pub torn_tail: Option<TornTail>,
    pub corruption: Option<Corruption>,
    /// Records checked in all.
    pub records: u64,
}

/// Options that affect how records are judged.
#[derive(Clone, Copy, Debug)]
pub struct ScanOptions {
    pub record_bytes_max: u64,
}

fn all_zero(bytes: &[u8]) -> bool {
    // OR-folding fixed chunks lets the compiler vectorize; this runs over segment tails.
    let mut chunks = bytes.chunks_exact(256);
    for chunk in &mut chunks {
        if chunk.iter().fold(0u8, |acc, b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|b| *b == 0)
}

/// Whether a valid record of segment `seq` starts anywhere in `bytes`.
///
/// Used only on the failure path, where `bytes` is shorter than one record limit.
fn any_valid_frame(bytes: &[u8], seq: u64, record_bytes_max: u64) -> bool {
    (0..bytes.len()).any(|at| {
        let rest = &bytes[at..];
        rest.len() >= record::HEADER_BYTES
            && (1..=6).contains(&rest[4])
            && rest[5..8] == [0, 0, 0]
            && record::read_frame(rest, seq, record_bytes_max).is_ok()
    })
}

/// The offset one past the last non-zero byte of `bytes` (0 if all zero).
fn nonzero_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1)
}

struct Replayer<'a> {
    log: &'a mut ReplayedLog,
    started: bool,
}

impl Replayer<'_> {
    /// Applies one record to the log; an `Err` is the corruption reason.
    fn apply(&mut self, seq: u64, offset: u64, frame: &Frame<'_>) -> Result<(), String> {
        let log = &mut *self.log;
        if frame.rtype == record::RecordType::Entry {
            // Hot path: no payload copy.
            let (index, term) = frame.entry_index_term().map_err(|e| e.to_string())?;
            if log.next_index() != Some(index) {
                return Err(format!(
                    "entry index {index} does not follow the last index {}",
                    log.last_index()
                ));
            }
            if term < log.last_term() {
                return Err(format!(
                    "entry {index} has term {term}, lower than the previous term {}",
                    log.last_term()
                ));
            }
            log.locs.push(EntryLoc {
                seq,
                offset,
                len: frame.len as u32,
                term,
            });
            return Ok(());
        }
        match frame.decode().map_err(|e| e.to_string())? {
            Record::SegmentHeader(_) => {
                return Err("segment header in the middle of a segment".into())
            }
            Record::Entry(_) => unreachable!("entries are handled above"),
            Record::HardState(hs) => {
                if hs.term < log.hard_state.term {
                    return Err(format!(
                        "hard state term {} is lower than the previous {}",
                        hs.term, log.hard_state.term
                    ));
                }
                log.hard_state = hs;
            }
            Record::SnapshotMarker(meta) => {
                if let Some(prev) = &log.snapshot {
                    if meta.index < prev.index {
                        return Err(format!(
                            "snapshot marker {} is older than the previous {}",
                            meta.index, prev.index
                        ));
                    }
                }
                log.snapshot = Some(meta);
            }
            Record::Truncate {
                from_index,
                prev_term,
            } => {
                if from_index == 0 {
                    return Err("truncate from index 0".into());
                }
                if log.next_index().is_some_and(|next| from_index > next) {
                    return Err(format!(
                        "truncate from {from_index} beyond the last index {}",
                        log.last_index()
                    ));
                }
                if from_index < log.first_index {
                    // The truncated entries were later purged with their segment.
                    log.reset(from_index, prev_term);
                } else {
                    match log.term(from_index - 1) {
                        Some(t) if t == prev_term => {}
                        other => {
                            return Err(format!(
                                "truncate from {from_index} expects term {prev_term} at {}, log has {other:?}",
                                from_index - 1
                            ))
                        }
                    }
                    log.locs.truncate((from_index - log.first_index) as usize);
                }
            }
            Record::Reset {
                next_index,
                prev_term,
            } => {
                let matches = log.snapshot.as_ref().is_some_and(|s| {
                    s.index.checked_add(1) == Some(next_index) && s.term == prev_term
                });
                if !matches {
                    return Err(format!(
                        "reset to {next_index} does not match the latest snapshot marker"
                    ));
                }
                log.reset(next_index, prev_term);
            }
        }
        Ok(())
    }

    /// Checks a segment header against the file name and the log so far.
    fn header(&mut self, h: &SegmentHeader, name_seq: u64, name_first: u64) -> Result<(), String> {
        if h.seq != name_seq || h.first_index != name_first {
            return Err(format!(
                "segment header says seq {} first index {}, the file name says {name_seq} and {name_first}",
                h.seq, h.first_index
            ));
        }
        if h.first_index == 0 {
            return Err("segment first index is 0".into());
        }
        if !self.started {
            self.started = true;
            self.log.reset(h.first_index, h.prev_term);
            return Ok(());
        }
        if self.log.next_index() != Some(h.first_index) || h.prev_term != self.log.last_term() {
            return Err(format!(
                "segment starts at index {} (previous term {}) but the log ends at {} (term {})",
                h.first_index,
                h.prev_term,
                self.log.last_index(),
                self.log.last_term()
            ));
        }
        Ok(())
    }
}

/// Reads and checks every segment in `dir` without modifying anything.
///
/// An I/O error (unreadable directory or file) is returned as `Err`; damage found in the
/// data is reported in [`Scan::corruption`] or [`Scan::torn_tail`].
pub fn scan_dir(vfs: &dyn Vfs, dir: &Path, opts: ScanOptions) -> std::io::Result<Scan> {
    let mut scan = Scan {
        dir: dir.to_path_buf(),
        ..Scan::default()
    };
    let mut names = Vec::new();
    for name in vfs.list_dir(dir)? {
        if name.ends_with(".tmp") {
            scan.temp_files.push(name);
        } else if let Some((seq, first)) = parse_segment_name(&name) {
            names.push((seq, first, name));
        }
    }
    names.sort();
    let mut log = ReplayedLog {
        first_index: 1,
        ..ReplayedLog::default()
    };
    let mut replayer = Replayer {
        log: &mut log,
        started: false,
    };
    let count = names.len();
    for (i, (seq, first, name)) in names.iter().enumerate() {
        let path = dir.join(name);
        if scan.corruption.is_some() {
            scan.unscanned.push(name.clone());
            continue;
        }
        let last_good = replayer.log.last_index();
        let corrupt = |offset: u64, reason: String| Corruption {
            file: path.clone(),
            offset,
            last_good_index: last_good,
            reason,
        };
        if i > 0 && names[i - 1].0.checked_add(1) != Some(*seq) {
            scan.corruption = Some(corrupt(
                0,
                format!(
                    "segment seq {seq:x} follows {:x}: a segment file is missing",
                    names[i - 1].0
                ),
            ));
            scan.unscanned.push(name.clone());
            continue;
        }
        let bytes = vfs.open_read(&path)?.map()?;
        let is_last = i + 1 == count;
        let mut seg = ScannedSegment {
            name: name.clone(),
            path: path.clone(),
            header: SegmentHeader {
                seq: *seq,
                first_index: *first,
                prev_term: 0,
            },
            file_bytes: bytes.len() as u64,
            used_bytes: 0,
            records: 0,
            entry_range: None,
            complete: false,
            bytes: FileBytes::Owned(Vec::new()),
        };
        let mut offset = 0usize;
        let mut blame: Option<(PathBuf, u64)> = None;
        let outcome = loop {
            let frame = match record::read_frame(&bytes[offset..], *seq, opts.record_bytes_max) {
                Ok(frame) => frame,
                Err(e) => break Some(e),
            };
            let result = if offset == 0 {
                match frame.decode() {
                    Ok(Record::SegmentHeader(h)) => {
                        seg.header = h;
                        let continues =
                            !replayer.started || h.seq != *seq || h.first_index != *first;
                        let result = replayer.header(&h, *seq, *first);
                        if let (Err(_), false, Some(prev)) =
                            (&result, continues, scan.segments.last())
                        {
                            // The log stops short of where this segment starts: the damage is
                            // at the end of the previous segment's records.
                            blame = Some((prev.path.clone(), prev.used_bytes));
                        }
                        result
                    }
                    Ok(_) => Err("the first record is not a segment header".to_string()),
                    Err(e) => Err(e.to_string()),
                }
            } else {
                if frame.rtype == record::RecordType::Entry {
                    if let Ok((index, _)) = frame.entry_index_term() {
                        seg.entry_range = Some(
                            seg.entry_range
                                .map_or((index, index), |(lo, _)| (lo, index)),
                        );
                    }
                }
                replayer.apply(*seq, offset as u64, &frame)
            };
            if let Err(reason) = result {
                let mut c = Corruption {
                    last_good_index: replayer.log.last_index(),
                    ..corrupt(offset as u64, reason)
                };
                if let Some((file, at)) = blame.take() {
                    c.reason = format!("records end early: the next segment {name}: {}", c.reason);
                    c.file = file;
                    c.offset = at;
                }
                scan.corruption = Some(c);
                break None;
            }
            seg.records += 1;
            scan.records += 1;
            offset += frame.len;
        };
        seg.used_bytes = offset as u64;
        if let Some(err) = outcome {
            // Records stop here. Zeros to the end is a clean end; in the last segment, a damaged
            // record followed only by zeros is a torn tail; anything else is corruption.
            let rest = &bytes[offset..];
            let damaged_end = match &err {
                FrameError::Zero => 0,
                FrameError::BadCrc { .. } | FrameError::BadPayload(_) => {
                    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                    (record::HEADER_BYTES + len).min(rest.len())
                }
                // A short record runs to the end of the file: torn, unless a valid record
                // starts inside what it claims (then its length field is what is damaged).
                FrameError::Short { .. } => {
                    let after = &rest[record::HEADER_BYTES.min(rest.len())..];
                    if any_valid_frame(after, *seq, opts.record_bytes_max) {
                        record::HEADER_BYTES.min(rest.len())
                    } else {
                        rest.len()
                    }
                }
                _ => record::HEADER_BYTES.min(rest.len()),
            };
            let clean_after = all_zero(&rest[damaged_end..]);
            let is_header = offset == 0;
            if matches!(err, FrameError::Zero) && clean_after && !is_header {
                seg.complete = true;
            } else if is_last && clean_after && !is_header {
                scan.torn_tail = Some(TornTail {
                    file: path.clone(),
                    offset: offset as u64,
                    bytes: nonzero_end(rest) as u64,
                    reason: err.to_string(),
                });
                seg.complete = true;
            } else {
                let reason = if clean_after {
                    err.to_string()
                } else if matches!(err, FrameError::Zero) {
                    "zeroed bytes followed by non-zero data".to_string()
                } else {
                    format!("{err}, followed by non-zero data")
                };
                scan.corruption = Some(Corruption {
                    last_good_index: replayer.log.last_index(),
                    ..corrupt(offset as u64, reason)
                });
            }
        } else if scan.corruption.is_none() {
            // Records ran exactly to the end of the file.
            seg.complete = true;
        }
        // Every byte was read: let the mapped pages go now, segment by segment, so a long
        // log's scan does not hold the whole WAL resident at once.
        bytes.release_pages();
        seg.bytes = bytes;
        scan.segments.push(seg);
    }
    scan.log = log;
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        let name = segment_file_name(3, 0x1234);
        assert_eq!(name, "0000000000000003-0000000000001234.wal");
        assert_eq!(parse_segment_name(&name), Some((3, 0x1234)));
        assert_eq!(parse_segment_name("3-1234.wal"), None);
        assert_eq!(
            parse_segment_name("0000000000000003-0000000000001234.wal.broken"),
            None
        );
    }

    /// Scans one segment (seq 1) holding `records` after a header with `first_index`.
    fn scan_one(first_index: u64, records: impl FnOnce(&mut Vec<u8>)) -> Scan {
        let vfs = crate::vfs::SimFs::new();
        let dir = Path::new("/wal");
        let mut bytes = Vec::new();
        record::encode_segment_header(
            &mut bytes,
            &SegmentHeader {
                seq: 1,
                first_index,
                prev_term: 1,
            },
        );
        records(&mut bytes);
        let path = dir.join(segment_file_name(1, first_index));
        vfs.open(&path, true)
            .and_then(|f| f.write_all_at(&bytes, 0))
            .unwrap();
        scan_dir(
            &vfs,
            dir,
            ScanOptions {
                record_bytes_max: 1 << 20,
            },
        )
        .unwrap()
    }

    fn noop(index: u64) -> crate::Entry {
        crate::Entry {
            index,
            term: 1,
            kind: crate::EntryKind::Noop,
            payload: Default::default(),
        }
    }

    /// Found by the `wal_record` fuzz target: a truncate record from index 0 made the log's
    /// first index 0 and `last_index()` underflowed (a panic in debug builds, a wrapped index
    /// in release builds).
    #[test]
    fn a_truncate_from_index_zero_is_corruption_not_an_underflow() {
        let scan = scan_one(10, |b| {
            record::encode_entry(b, 1, &noop(10));
            record::encode_truncate(b, 1, 0, 0);
        });
        let corruption = scan.corruption.expect("a truncate from 0 is corruption");
        assert!(corruption.reason.contains("index 0"), "{corruption}");
        assert_eq!(scan.log.last_index(), 10);
    }

    /// Indexes at the top of the range: no `+ 1` may overflow while replaying them.
    #[test]
    fn indexes_at_u64_max_are_refused_without_overflow() {
        let scan = scan_one(u64::MAX, |b| {
            record::encode_entry(b, 1, &noop(u64::MAX));
            record::encode_entry(b, 1, &noop(u64::MAX));
        });
        assert!(scan.corruption.is_some());
        assert_eq!(scan.log.last_index(), u64::MAX);
        assert_eq!(scan.log.term(u64::MAX), Some(1));
        let scan = scan_one(5, |b| {
            let meta = crate::SnapshotMeta {
                index: u64::MAX,
                term: 1,
                membership: crate::Membership::with_voters([1]),
            };
            record::encode_snapshot_marker(b, 1, &meta);
            record::encode_reset(b, 1, 0, 1);
            record::encode_truncate(b, 1, u64::MAX, 1);
        });
        let corruption = scan
            .corruption
            .expect("a reset past u64::MAX is corruption");
        assert!(corruption.reason.contains("reset"), "{corruption}");
    }

    #[test]
    fn zero_detection() {
        assert!(all_zero(&[0u8; 37]));
        let mut b = vec![0u8; 37];
        b[36] = 1;
        assert!(!all_zero(&b));
        assert_eq!(nonzero_end(&b), 37);
        assert_eq!(nonzero_end(&[0u8; 5]), 0);
    }
}
