//! The verdict on a data dir — clean, torn tail, or corrupt — and the `--verify` report.
//!
//! The WAL's verdict comes straight from `raftkv_storage::wal::scan_dir`, the same scan
//! `Wal::open` runs, so the tool says exactly what opening would do: a torn tail is what
//! opening would cut off (exit 2); corruption is what would make opening refuse (exit 1).
//! A snapshot file that fails verification is corrupt too (recovery would set it aside); the
//! data dir's verdict is the worst of the two ([`Verdict::worst`]).

use crate::snapshots::SnapshotsReport;
use raftkv_storage::wal::scan::{Corruption, Scan, TornTail};
use serde::Serialize;
use std::fmt::Write as _;
use std::process::ExitCode;

/// What the scan concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Clean,
    TornTail,
    Corrupt,
}

impl Verdict {
    pub fn of(scan: &Scan) -> Verdict {
        if scan.corruption.is_some() {
            Verdict::Corrupt
        } else if scan.torn_tail.is_some() {
            Verdict::TornTail
        } else {
            Verdict::Clean
        }
    }

    /// The more serious of two verdicts (corrupt over torn tail over clean): the verdict of a
    /// data dir is the worst of its WAL's and its snapshot files'.
    pub fn worst(self, other: Verdict) -> Verdict {
        let rank = |v: Verdict| match v {
            Verdict::Clean => 0,
            Verdict::TornTail => 1,
            Verdict::Corrupt => 2,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }

    /// 0 clean, 1 corrupt, 2 torn tail only.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Clean => 0,
            Verdict::Corrupt => 1,
            Verdict::TornTail => 2,
        }
    }

    pub fn to_exit_code(self) -> ExitCode {
        ExitCode::from(self.exit_code())
    }

    pub fn name(self) -> &'static str {
        match self {
            Verdict::Clean => "clean",
            Verdict::TornTail => "torn-tail",
            Verdict::Corrupt => "corrupt",
        }
    }
}

/// Where the first damage that is not a torn tail is.
#[derive(Clone, Debug, Serialize)]
pub struct CorruptionView {
    pub file: String,
    /// Byte offset in `file` of the first record that fails.
    pub offset: u64,
    /// The last entry index replayed before the problem (0 if none).
    pub last_good_index: u64,
    /// The first index that could not be verified: `last_good_index + 1`.
    pub index: u64,
    pub reason: String,
}

impl CorruptionView {
    pub fn new(c: &Corruption) -> CorruptionView {
        CorruptionView {
            file: c.file.display().to_string(),
            offset: c.offset,
            last_good_index: c.last_good_index,
            index: c.last_good_index + 1,
            reason: c.reason.clone(),
        }
    }
}

/// The unacknowledged end of the last write, which opening would cut off.
#[derive(Clone, Debug, Serialize)]
pub struct TornTailView {
    pub file: String,
    pub offset: u64,
    /// Non-zero bytes from `offset` that opening would copy aside and zero.
    pub bytes: u64,
    pub reason: String,
}

impl TornTailView {
    pub fn new(t: &TornTail) -> TornTailView {
        TornTailView {
            file: t.file.display().to_string(),
            offset: t.offset,
            bytes: t.bytes,
            reason: t.reason.clone(),
        }
    }
}

/// The `--verify` report.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub dir: String,
    /// The worst of the WAL's verdict and the snapshot files' (what the exit code says).
    pub verdict: Verdict,
    pub exit_code: u8,
    /// The WAL's own verdict.
    pub wal_verdict: Verdict,
    pub segments_checked: usize,
    /// Segment files after the corruption, which were not read.
    pub segments_not_checked: Vec<String>,
    pub records_checked: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub torn_tail: Option<TornTailView>,
    pub corruption: Option<CorruptionView>,
    /// The data dir's snapshot files, when it has a `snap/` (or `--snapshots` named one).
    pub snapshots: Option<SnapshotsReport>,
}

impl VerifyReport {
    pub fn new(scan: &Scan, snapshots: Option<SnapshotsReport>) -> VerifyReport {
        let wal_verdict = Verdict::of(scan);
        let verdict = snapshots
            .as_ref()
            .map_or(wal_verdict, |s| wal_verdict.worst(s.verdict));
        VerifyReport {
            dir: scan.dir.display().to_string(),
            verdict,
            exit_code: verdict.exit_code(),
            wal_verdict,
            segments_checked: scan.segments.len(),
            segments_not_checked: scan.unscanned.clone(),
            records_checked: scan.records,
            first_index: scan.log.first_index,
            last_index: scan.log.last_index(),
            torn_tail: scan.torn_tail.as_ref().map(TornTailView::new),
            corruption: scan.corruption.as_ref().map(CorruptionView::new),
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
        match (&self.corruption, &self.torn_tail) {
            (Some(c), _) => {
                writeln!(out, "CORRUPT: {}", self.dir)?;
                writeln!(out, "  file:            {}", c.file)?;
                writeln!(out, "  byte offset:     {} (0x{:x})", c.offset, c.offset)?;
                writeln!(
                    out,
                    "  index:           {} (first index not verified)",
                    c.index
                )?;
                writeln!(out, "  last good index: {}", c.last_good_index)?;
                writeln!(out, "  reason:          {}", c.reason)?;
                if !self.segments_not_checked.is_empty() {
                    writeln!(
                        out,
                        "  not checked:     {}",
                        self.segments_not_checked.join(", ")
                    )?;
                }
                writeln!(out, "opening this WAL would refuse; nothing was changed")?;
            }
            (None, Some(t)) => {
                writeln!(out, "TORN TAIL: {}", self.dir)?;
                writeln!(out, "  file:            {}", t.file)?;
                writeln!(out, "  byte offset:     {} (0x{:x})", t.offset, t.offset)?;
                writeln!(out, "  bytes to cut:    {}", t.bytes)?;
                writeln!(out, "  last index kept: {}", self.last_index)?;
                writeln!(out, "  reason:          {}", t.reason)?;
                writeln!(
                    out,
                    "opening this WAL would copy those bytes to a .broken file and cut them; nothing was changed"
                )?;
            }
            (None, None) => {
                writeln!(out, "CLEAN: {}", self.dir)?;
            }
        }
        writeln!(
            out,
            "checked {} segments, {} records; entries {}..={}",
            self.segments_checked, self.records_checked, self.first_index, self.last_index
        )?;
        if let Some(snapshots) = &self.snapshots {
            snapshots.write_verify_text(out)?;
            writeln!(
                out,
                "verdict: {} (WAL {}, snapshots {})",
                self.verdict.name(),
                self.wal_verdict.name(),
                snapshots.verdict.name()
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Verdict::{self, *};

    #[test]
    fn the_worst_verdict_wins_in_either_order() {
        let all = [Clean, TornTail, Corrupt];
        for a in all {
            for b in all {
                let want = if a == Corrupt || b == Corrupt {
                    Corrupt
                } else if a == TornTail || b == TornTail {
                    TornTail
                } else {
                    Clean
                };
                assert_eq!(a.worst(b), want, "{a:?} worst {b:?}");
            }
        }
        assert_eq!(Verdict::Corrupt.exit_code(), 1);
    }
}
