//! The default mode: what is in the WAL, segment by segment.
//!
//! Built from the read-only scan plus one more pass over each segment's valid records (the
//! scan keeps only the final hard state and snapshot marker; the summary also lists every
//! snapshot marker and log rewrite, and counts records by type). The second pass stops where
//! the scan stopped, so it never reads past what the scan vouched for.
//!
//! When the data dir has snapshot files, the summary ends with them (see [`crate::snapshots`]),
//! each verified, and its verdict is the worst of the WAL's and theirs.

use crate::snapshots::SnapshotsReport;
use crate::verdict::{CorruptionView, TornTailView, Verdict};
use raftkv_storage::wal::record::{self, Record};
use raftkv_storage::wal::scan::{Scan, ScannedSegment};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// Records of each type in one segment.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RecordCounts {
    pub segment_header: u64,
    pub entry: u64,
    pub hard_state: u64,
    pub snapshot_marker: u64,
    pub truncate: u64,
    pub reset: u64,
}

/// One segment file.
#[derive(Clone, Debug, Serialize)]
pub struct SegmentSummary {
    pub file: String,
    pub seq: Option<u64>,
    /// The first index named in the segment header.
    pub first_index: Option<u64>,
    pub file_bytes: Option<u64>,
    /// End of the last valid record.
    pub used_bytes: Option<u64>,
    pub records: Option<u64>,
    pub record_counts: Option<RecordCounts>,
    /// Index range of the entry records written in this segment (including later truncated).
    pub first_entry_index: Option<u64>,
    pub last_entry_index: Option<u64>,
    /// `ok`, `torn-tail`, `corrupt`, or `not-checked` (after corruption in an earlier file).
    pub status: &'static str,
    /// The segment opening would append to.
    pub active: bool,
}

/// A snapshot marker record and where it is.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotMarkerView {
    pub file: String,
    pub offset: u64,
    pub index: u64,
    pub term: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

/// A truncate or reset record: the places where the log was rewritten.
#[derive(Clone, Debug, Serialize)]
pub struct RewriteView {
    pub file: String,
    pub offset: u64,
    /// `truncate` (entries from `index` on dropped) or `reset` (log restarts at `index`).
    pub kind: &'static str,
    pub index: u64,
    pub prev_term: u64,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct HardStateView {
    pub term: u64,
    pub vote: Option<u64>,
    pub commit: u64,
}

/// The live log.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LogView {
    pub first_index: u64,
    pub last_index: u64,
    pub last_term: u64,
    pub entries: u64,
}

/// Everything the summary mode prints.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub dir: String,
    /// The worst of the WAL's verdict and the snapshot files' (what the exit code says).
    pub verdict: Verdict,
    /// The WAL's own verdict.
    pub wal_verdict: Verdict,
    pub log: LogView,
    pub hard_state: HardStateView,
    pub records: u64,
    pub segments: Vec<SegmentSummary>,
    pub snapshot_markers: Vec<SnapshotMarkerView>,
    pub rewrites: Vec<RewriteView>,
    /// `*.tmp` files: a next segment prepared ahead, or an interrupted rotation; opening
    /// removes them.
    pub temp_files: Vec<String>,
    pub torn_tail: Option<TornTailView>,
    pub corruption: Option<CorruptionView>,
    /// The data dir's snapshot files, each verified, when it has a `snap/` (or `--snapshots`
    /// named one).
    pub snapshots: Option<SnapshotsReport>,
}

struct SegmentWalk {
    counts: RecordCounts,
    markers: Vec<SnapshotMarkerView>,
    rewrites: Vec<RewriteView>,
}

fn walk_segment(seg: &ScannedSegment, record_bytes_max: u64) -> SegmentWalk {
    let mut walk = SegmentWalk {
        counts: RecordCounts::default(),
        markers: Vec::new(),
        rewrites: Vec::new(),
    };
    let end = (seg.used_bytes as usize).min(seg.bytes.len());
    let bytes = &seg.bytes[..end];
    let mut offset = 0usize;
    while offset < bytes.len() {
        let Ok(frame) = record::read_frame(&bytes[offset..], seg.header.seq, record_bytes_max)
        else {
            break;
        };
        let at = offset as u64;
        offset += frame.len;
        if frame.rtype == record::RecordType::Entry {
            walk.counts.entry += 1;
            continue;
        }
        match frame.decode() {
            Ok(Record::SegmentHeader(_)) => walk.counts.segment_header += 1,
            Ok(Record::Entry(_)) => walk.counts.entry += 1,
            Ok(Record::HardState(_)) => walk.counts.hard_state += 1,
            Ok(Record::SnapshotMarker(m)) => {
                walk.counts.snapshot_marker += 1;
                walk.markers.push(SnapshotMarkerView {
                    file: seg.name.clone(),
                    offset: at,
                    index: m.index,
                    term: m.term,
                    voters: m.membership.voters.iter().copied().collect(),
                    learners: m.membership.learners.iter().copied().collect(),
                });
            }
            Ok(Record::Truncate {
                from_index,
                prev_term,
            }) => {
                walk.counts.truncate += 1;
                walk.rewrites.push(RewriteView {
                    file: seg.name.clone(),
                    offset: at,
                    kind: "truncate",
                    index: from_index,
                    prev_term,
                });
            }
            Ok(Record::Reset {
                next_index,
                prev_term,
            }) => {
                walk.counts.reset += 1;
                walk.rewrites.push(RewriteView {
                    file: seg.name.clone(),
                    offset: at,
                    kind: "reset",
                    index: next_index,
                    prev_term,
                });
            }
            // The scan stopped at the first record it could not decode; so does the walk.
            Err(_) => break,
        }
    }
    walk
}

fn same_file(a: &Path, b: &str) -> bool {
    a.display().to_string() == b
}

impl Summary {
    pub fn new(scan: &Scan, record_bytes_max: u64, snapshots: Option<SnapshotsReport>) -> Summary {
        let torn_tail = scan.torn_tail.as_ref().map(TornTailView::new);
        let corruption = scan.corruption.as_ref().map(CorruptionView::new);
        let status_of = |path: &Path| {
            if corruption
                .as_ref()
                .is_some_and(|c| same_file(path, &c.file))
            {
                "corrupt"
            } else if torn_tail.as_ref().is_some_and(|t| same_file(path, &t.file)) {
                "torn-tail"
            } else {
                "ok"
            }
        };
        let mut segments = Vec::new();
        let mut snapshot_markers = Vec::new();
        let mut rewrites = Vec::new();
        let last_seq = scan.segments.last().map(|s| s.header.seq);
        for seg in &scan.segments {
            let walk = walk_segment(seg, record_bytes_max);
            segments.push(SegmentSummary {
                file: seg.name.clone(),
                seq: Some(seg.header.seq),
                first_index: Some(seg.header.first_index),
                file_bytes: Some(seg.file_bytes),
                used_bytes: Some(seg.used_bytes),
                records: Some(seg.records),
                record_counts: Some(walk.counts),
                first_entry_index: seg.entry_range.map(|r| r.0),
                last_entry_index: seg.entry_range.map(|r| r.1),
                status: status_of(&seg.path),
                active: scan.unscanned.is_empty() && Some(seg.header.seq) == last_seq,
            });
            snapshot_markers.extend(walk.markers);
            rewrites.extend(walk.rewrites);
        }
        for name in &scan.unscanned {
            let path = scan.dir.join(name);
            let corrupt = corruption
                .as_ref()
                .is_some_and(|c| same_file(&path, &c.file));
            segments.push(SegmentSummary {
                file: name.clone(),
                seq: raftkv_storage::wal::parse_segment_name(name).map(|(seq, _)| seq),
                first_index: None,
                file_bytes: std::fs::metadata(&path).ok().map(|m| m.len()),
                used_bytes: None,
                records: None,
                record_counts: None,
                first_entry_index: None,
                last_entry_index: None,
                status: if corrupt { "corrupt" } else { "not-checked" },
                active: false,
            });
        }
        let log = &scan.log;
        let wal_verdict = Verdict::of(scan);
        Summary {
            dir: scan.dir.display().to_string(),
            verdict: snapshots
                .as_ref()
                .map_or(wal_verdict, |s| wal_verdict.worst(s.verdict)),
            wal_verdict,
            log: LogView {
                first_index: log.first_index,
                last_index: log.last_index(),
                last_term: log.last_term(),
                entries: log.locs.len() as u64,
            },
            hard_state: HardStateView {
                term: log.hard_state.term,
                vote: log.hard_state.vote,
                commit: log.hard_state.commit,
            },
            records: scan.records,
            segments,
            snapshot_markers,
            rewrites,
            temp_files: scan.temp_files.clone(),
            torn_tail,
            corruption,
            snapshots,
        }
    }

    pub fn render_text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_text(&mut out);
        out
    }

    fn write_text(&self, out: &mut String) -> std::fmt::Result {
        writeln!(out, "WAL {}: {}", self.dir, self.wal_verdict.name())?;
        let log = &self.log;
        writeln!(
            out,
            "log:        entries {}..={} ({} entries), last term {}",
            log.first_index, log.last_index, log.entries, log.last_term
        )?;
        let hs = &self.hard_state;
        let vote = hs.vote.map_or("none".to_string(), |v| v.to_string());
        writeln!(
            out,
            "hard state: term {}, vote {vote}, commit {}",
            hs.term, hs.commit
        )?;
        writeln!(out, "records:    {}", self.records)?;
        writeln!(out, "segments:   {}", self.segments.len())?;
        writeln!(
            out,
            "  {:<37} {:>12} {:>12} {:>9} {:>23}  status",
            "file", "file bytes", "used bytes", "records", "entries"
        )?;
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        for s in &self.segments {
            let entries = match (s.first_entry_index, s.last_entry_index) {
                (Some(lo), Some(hi)) => format!("{lo}..={hi}"),
                _ => "-".to_string(),
            };
            let active = if s.active { " (active)" } else { "" };
            writeln!(
                out,
                "  {:<37} {:>12} {:>12} {:>9} {:>23}  {}{active}",
                s.file,
                opt(s.file_bytes),
                opt(s.used_bytes),
                opt(s.records),
                entries,
                s.status
            )?;
        }
        if self.snapshot_markers.is_empty() {
            writeln!(out, "snapshot markers: none")?;
        } else {
            writeln!(out, "snapshot markers: {}", self.snapshot_markers.len())?;
            for m in &self.snapshot_markers {
                writeln!(
                    out,
                    "  index {} term {} voters {:?} learners {:?}  ({} @ {})",
                    m.index, m.term, m.voters, m.learners, m.file, m.offset
                )?;
            }
        }
        for r in &self.rewrites {
            writeln!(
                out,
                "{} at index {} (previous term {})  ({} @ {})",
                r.kind, r.index, r.prev_term, r.file, r.offset
            )?;
        }
        if !self.temp_files.is_empty() {
            writeln!(
                out,
                "temp files (a prepared next segment or an interrupted rotation; opening removes them): {}",
                self.temp_files.join(", ")
            )?;
        }
        if let Some(t) = &self.torn_tail {
            writeln!(
                out,
                "torn tail: {} at byte offset {}: {} non-zero bytes opening would cut ({})",
                t.file, t.offset, t.bytes, t.reason
            )?;
        }
        if let Some(c) = &self.corruption {
            writeln!(
                out,
                "CORRUPT: {} at byte offset {}, index {} (last good index {}): {}",
                c.file, c.offset, c.index, c.last_good_index, c.reason
            )?;
        }
        if let Some(snapshots) = &self.snapshots {
            snapshots.write_summary_text(out)?;
        }
        Ok(())
    }
}
