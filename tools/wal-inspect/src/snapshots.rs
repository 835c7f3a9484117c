//! Snapshot files: list a `snap/` directory and verify every snapshot in it, read-only.
//!
//! The tool never goes through `SnapshotStore`: opening one creates the directory and removes
//! temp files, and `wal-inspect` must not change anything. Instead each file is opened with
//! `StdFs::open_read` and streamed through the storage crate's own `SnapshotFileReader`, the
//! code recovery and installs use, so "ok" here means exactly "would verify there": every
//! chunk's CRC and sequence, key order, the end chunk's counts and the body CRC. The reader
//! holds one chunk at a time, so verifying a large snapshot needs no more memory than that.
//!
//! `--snapshot FILE` also takes a backup (`raftkv snapshot save`), told by its magic bytes: the
//! same verification plus the envelope's (cluster id, length, CRC chain), offsets in the
//! backup file.
//!
//! Judged: files named like snapshots (`<term:016x>-<index:016x>.snap`, the names
//! `SnapshotStore` lists). Listed but not judged: `*.tmp` (a snapshot being written, or left
//! by a crash; opening the store removes it), `*.broken` (set aside by recovery) and anything
//! else (the store ignores it). A snapshot that disappears between listing and opening (a
//! live node keeps only the newest two) is reported as `vanished`, not as damage.

use crate::keys::user_pair;
use crate::reader::FileReader;
use crate::verdict::Verdict;
use raftkv_storage::snapshot::backup::{has_backup_magic, BackupHeader};
use raftkv_storage::snapshot::format::FormatError;
use raftkv_storage::snapshot::parse_file_name;
use raftkv_storage::vfs::{StdFs, Vfs};
use serde::Serialize;
use std::fmt::Write as _;
use std::io;
use std::path::Path;

/// Where and why a snapshot file failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DamageView {
    /// Byte offset of the first problem (of the chunk that fails, for a chunk).
    pub offset: u64,
    pub reason: String,
}

/// Why a snapshot file could not be read to its end.
#[derive(Debug)]
pub enum ReadFailure {
    /// The file is gone (deleted after it was listed).
    Vanished,
    /// An I/O error, at a byte offset when the reader got that far.
    Unreadable(DamageView),
    /// The contents are damaged.
    Damaged(DamageView),
}

impl ReadFailure {
    pub fn from_format(e: FormatError) -> ReadFailure {
        match e {
            FormatError::Io { offset, source } => ReadFailure::Unreadable(DamageView {
                offset,
                reason: source.to_string(),
            }),
            FormatError::Corrupt { offset, what } => ReadFailure::Damaged(DamageView {
                offset,
                reason: what,
            }),
        }
    }

    /// Where and why, for a file that is there but failed.
    pub fn into_damage(self) -> Option<DamageView> {
        match self {
            ReadFailure::Vanished => None,
            ReadFailure::Unreadable(d) | ReadFailure::Damaged(d) => Some(d),
        }
    }

    fn from_open(e: io::Error) -> ReadFailure {
        if e.kind() == io::ErrorKind::NotFound {
            ReadFailure::Vanished
        } else {
            ReadFailure::Unreadable(DamageView {
                offset: 0,
                reason: format!("cannot open: {e}"),
            })
        }
    }
}

/// Opens `path` as a snapshot (or a backup) and checks its headers and meta chunk; when
/// `named` gives the (index, term) in its file name, checks that the contents agree (as
/// `SnapshotStore` does).
pub fn open_reader(path: &Path, named: Option<(u64, u64)>) -> Result<FileReader, ReadFailure> {
    let handle = StdFs.open_read(path).map_err(ReadFailure::from_open)?;
    let reader = FileReader::open(handle).map_err(ReadFailure::from_format)?;
    let meta = reader.meta();
    if let Some((index, term)) = named {
        if (meta.index, meta.term) != (index, term) {
            return Err(ReadFailure::Damaged(DamageView {
                offset: 0,
                reason: format!(
                    "contents are at index {} term {}, the name says index {index} term {term}",
                    meta.index, meta.term
                ),
            }));
        }
    }
    Ok(reader)
}

/// What a backup's envelope adds to its snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct BackupView {
    /// The cluster the backup was saved from.
    pub cluster_id: String,
    pub saved_at_unix_ms: u64,
    /// Where the embedded snapshot file starts, and its length.
    pub snapshot_offset: u64,
    pub snapshot_bytes: u64,
}

impl BackupView {
    fn of(h: &BackupHeader) -> BackupView {
        BackupView {
            cluster_id: h.cluster_id.clone(),
            saved_at_unix_ms: h.saved_at_unix_ms,
            snapshot_offset: h.snapshot_offset(),
            snapshot_bytes: h.snapshot_bytes,
        }
    }
}

/// Whether the file at `path` starts like a backup (false if it cannot be read).
/// Reads the rest of the file, verifying everything, and counts the user keys among its
/// records (format 2 also holds the session and lease tables and the watch history).
fn count_user_keys(reader: &mut FileReader, version: u32) -> Result<u64, FormatError> {
    let mut keys = 0u64;
    let mut records = 0u64;
    while let Some(pair) = reader.next_pair()? {
        records += 1;
        if user_pair(version, pair).is_some() {
            keys += 1;
        }
    }
    debug_assert!(keys <= records);
    Ok(keys)
}

fn looks_like_backup(path: &Path) -> bool {
    StdFs
        .open_read(path)
        .and_then(|f| has_backup_magic(f.as_ref()))
        .unwrap_or(false)
}

/// One snapshot file (or backup) and what verifying it found.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotFileView {
    pub file: String,
    pub path: String,
    /// From the file name; from the header for a file whose name is not a snapshot name.
    pub index: Option<u64>,
    pub term: Option<u64>,
    pub file_bytes: Option<u64>,
    /// User keys, counted while verifying the whole file (absent when it does not verify:
    /// the count past the damage is unknown).
    pub key_count: Option<u64>,
    /// Records in the file, from the header: the user keys, plus in format 2 the session and
    /// lease tables and the watch history (absent when the header itself is damaged).
    pub record_count: Option<u64>,
    /// Sum of every record's key and value length, from the header.
    pub kv_bytes: Option<u64>,
    pub voters: Option<Vec<u64>>,
    pub learners: Option<Vec<u64>>,
    /// `ok`, `damaged`, `unreadable` or `vanished`.
    pub status: &'static str,
    pub damage: Option<DamageView>,
    /// A backup's envelope (absent for a snapshot file, or when the envelope is damaged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupView>,
    /// The file starts with the backup magic.
    #[serde(skip)]
    pub is_backup: bool,
}

impl SnapshotFileView {
    /// Reads and verifies the whole file at `path`.
    pub fn check(path: &Path) -> SnapshotFileView {
        let file = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        let named = parse_file_name(&file);
        let mut view = SnapshotFileView {
            path: path.display().to_string(),
            index: named.map(|(index, _)| index),
            term: named.map(|(_, term)| term),
            file_bytes: std::fs::metadata(path).ok().map(|m| m.len()),
            key_count: None,
            record_count: None,
            kv_bytes: None,
            voters: None,
            learners: None,
            status: "ok",
            damage: None,
            backup: None,
            is_backup: looks_like_backup(path),
            file,
        };
        let failure = match open_reader(path, named) {
            Ok(mut reader) => {
                let header = reader.header();
                let meta = reader.meta();
                view.index = Some(meta.index);
                view.term = Some(meta.term);
                view.record_count = Some(header.key_count);
                view.kv_bytes = Some(header.kv_bytes);
                let version = header.version;
                view.voters = Some(meta.membership.voters.iter().copied().collect());
                view.learners = Some(meta.membership.learners.iter().copied().collect());
                view.backup = reader.backup().map(BackupView::of);
                match count_user_keys(&mut reader, version) {
                    Ok(keys) => {
                        view.key_count = Some(keys);
                        None
                    }
                    Err(e) => Some(ReadFailure::from_format(e)),
                }
            }
            Err(e) => Some(e),
        };
        match failure {
            None => {}
            Some(ReadFailure::Vanished) => view.status = "vanished",
            Some(ReadFailure::Unreadable(d)) => {
                view.status = "unreadable";
                view.damage = Some(d);
            }
            Some(ReadFailure::Damaged(d)) => {
                view.status = "damaged";
                view.damage = Some(d);
            }
        }
        view
    }

    /// Damaged or unreadable: what makes the verdict corrupt.
    pub fn failed(&self) -> bool {
        self.damage.is_some()
    }

    pub fn verdict(&self) -> Verdict {
        if self.failed() {
            Verdict::Corrupt
        } else {
            Verdict::Clean
        }
    }

    /// `damaged at byte N: reason`, `ok`, ...
    fn status_text(&self) -> String {
        match &self.damage {
            Some(d) => format!("{} at byte offset {}: {}", self.status, d.offset, d.reason),
            None => self.status.to_string(),
        }
    }

    /// The block `--verify` prints for a file that failed.
    fn write_failure(&self, out: &mut String) -> std::fmt::Result {
        if let Some(d) = &self.damage {
            let what = match (self.status == "unreadable", self.is_backup) {
                (true, false) => "UNREADABLE SNAPSHOT",
                (false, false) => "CORRUPT SNAPSHOT",
                (true, true) => "UNREADABLE BACKUP",
                (false, true) => "CORRUPT BACKUP",
            };
            writeln!(out, "{what}: {}", self.path)?;
            writeln!(out, "  byte offset:     {} (0x{:x})", d.offset, d.offset)?;
            writeln!(out, "  reason:          {}", d.reason)?;
        }
        Ok(())
    }

    /// The text `--snapshot FILE` prints.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_text(&mut out);
        out
    }

    fn write_text(&self, out: &mut String) -> std::fmt::Result {
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let kind = if self.is_backup { "backup" } else { "snapshot" };
        writeln!(out, "{kind} {}: {}", self.path, self.status)?;
        if let Some(b) = &self.backup {
            writeln!(
                out,
                "  cluster {:?}, saved at {} ms since the Unix epoch; snapshot of {} bytes at byte {}",
                b.cluster_id, b.saved_at_unix_ms, b.snapshot_bytes, b.snapshot_offset
            )?;
        }
        writeln!(
            out,
            "  index {}, term {}, {} keys, {} records, {} record bytes, {} file bytes",
            opt(self.index),
            opt(self.term),
            opt(self.key_count),
            opt(self.record_count),
            opt(self.kv_bytes),
            opt(self.file_bytes)
        )?;
        if let (Some(v), Some(l)) = (&self.voters, &self.learners) {
            writeln!(out, "  voters {v:?} learners {l:?}")?;
        }
        if self.failed() {
            self.write_failure(out)?;
        }
        writeln!(out, "verdict: {}", self.verdict().name())
    }
}

/// A file in `snap/` that is listed but not judged.
#[derive(Clone, Debug, Serialize)]
pub struct UnjudgedFileView {
    pub file: String,
    /// `temp` (being written or left by a crash), `broken` (set aside by recovery) or
    /// `other` (a name the store does not read).
    pub kind: &'static str,
    pub file_bytes: Option<u64>,
}

/// Every file of a `snap/` directory, snapshots verified.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotsReport {
    pub dir: String,
    /// Corrupt if any snapshot file is damaged or unreadable, else clean.
    pub verdict: Verdict,
    pub exit_code: u8,
    /// Snapshot files, oldest first (by index, then term), as the store orders them.
    pub snapshots: Vec<SnapshotFileView>,
    /// The newest snapshot that verifies: the one recovery would restore.
    pub newest_verified: Option<String>,
    pub not_judged: Vec<UnjudgedFileView>,
}

impl SnapshotsReport {
    /// Lists `dir` and verifies every snapshot file in it.
    pub fn new(dir: &Path) -> anyhow::Result<SnapshotsReport> {
        use anyhow::Context as _;
        let names = StdFs
            .list_dir(dir)
            .with_context(|| format!("cannot list the snapshot directory {}", dir.display()))?;
        let mut named = Vec::new();
        let mut not_judged = Vec::new();
        for name in names {
            match parse_file_name(&name) {
                Some((index, term)) => named.push((index, term, name)),
                None => {
                    let kind = if name.ends_with(".tmp") {
                        "temp"
                    } else if name.ends_with(".broken") {
                        "broken"
                    } else {
                        "other"
                    };
                    not_judged.push(UnjudgedFileView {
                        file_bytes: std::fs::metadata(dir.join(&name)).ok().map(|m| m.len()),
                        file: name,
                        kind,
                    });
                }
            }
        }
        named.sort();
        let snapshots: Vec<SnapshotFileView> = named
            .iter()
            .map(|(_, _, name)| SnapshotFileView::check(&dir.join(name)))
            .collect();
        let verdict = snapshots
            .iter()
            .map(SnapshotFileView::verdict)
            .fold(Verdict::Clean, Verdict::worst);
        let newest_verified = snapshots
            .iter()
            .rev()
            .find(|s| s.status == "ok")
            .map(|s| s.file.clone());
        Ok(SnapshotsReport {
            dir: dir.display().to_string(),
            verdict,
            exit_code: verdict.exit_code(),
            snapshots,
            newest_verified,
            not_judged,
        })
    }

    fn write_unjudged(&self, out: &mut String) -> std::fmt::Result {
        if self.not_judged.is_empty() {
            return Ok(());
        }
        let files: Vec<String> = self
            .not_judged
            .iter()
            .map(|f| {
                let bytes = f.file_bytes.map_or("-".to_string(), |b| b.to_string());
                format!("{} ({}, {bytes} bytes)", f.file, f.kind)
            })
            .collect();
        writeln!(out, "  not judged: {}", files.join(", "))
    }

    /// The snapshot section of the summary.
    pub fn write_summary_text(&self, out: &mut String) -> std::fmt::Result {
        writeln!(
            out,
            "snapshots {}: {} files, {}",
            self.dir,
            self.snapshots.len(),
            self.verdict.name()
        )?;
        if !self.snapshots.is_empty() {
            writeln!(
                out,
                "  {:<39} {:>12} {:>8} {:>12} {:>10} {:>10}  status",
                "file", "index", "term", "file bytes", "keys", "records"
            )?;
        }
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        for s in &self.snapshots {
            writeln!(
                out,
                "  {:<39} {:>12} {:>8} {:>12} {:>10} {:>10}  {}",
                s.file,
                opt(s.index),
                opt(s.term),
                opt(s.file_bytes),
                opt(s.key_count),
                opt(s.record_count),
                s.status_text()
            )?;
        }
        if let Some(newest) = &self.newest_verified {
            writeln!(out, "  newest that verifies: {newest}")?;
        }
        self.write_unjudged(out)
    }

    /// The snapshot section of `--verify`: every failure located, or one line when clean.
    pub fn write_verify_text(&self, out: &mut String) -> std::fmt::Result {
        let failed = self.snapshots.iter().filter(|s| s.failed()).count();
        for s in self.snapshots.iter().filter(|s| s.failed()) {
            s.write_failure(out)?;
        }
        if failed == 0 {
            writeln!(out, "CLEAN: snapshots {}", self.dir)?;
        }
        let vanished = self
            .snapshots
            .iter()
            .filter(|s| s.status == "vanished")
            .count();
        let gone = if vanished > 0 {
            format!(", {vanished} vanished while listed")
        } else {
            String::new()
        };
        writeln!(
            out,
            "checked {} snapshot files: {} verified, {failed} failed{gone}",
            self.snapshots.len(),
            self.snapshots.iter().filter(|s| s.status == "ok").count(),
        )?;
        self.write_unjudged(out)
    }

    /// The text of summary (or `--verify`) when there is no WAL to report on.
    pub fn render_text(&self, verify: bool) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = if verify {
            self.write_verify_text(&mut out)
        } else {
            self.write_summary_text(&mut out)
        };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftkv_storage::snapshot::file_name;
    use raftkv_storage::snapshot::format::SnapshotFileWriter;
    use raftkv_storage::{Membership, SnapshotMeta};

    /// Writes a snapshot at (index 5, term 2), voters {1, 2, 3}, with three user keys and one
    /// history record, to `path`.
    fn write_snapshot(path: &Path) {
        let meta = SnapshotMeta {
            index: 5,
            term: 2,
            membership: Membership {
                voters: [1, 2, 3].into_iter().collect(),
                ..Membership::default()
            },
        };
        let file = StdFs.open(path, true).unwrap();
        let mut w = SnapshotFileWriter::new(file, meta, 64).unwrap();
        for (k, v) in [("a", "1"), ("b", "22"), ("c", "333")] {
            // A key record: `d ‖ key` → 32 bytes of revisions ‖ value.
            let record = [&[0u8; 32][..], v.as_bytes()].concat();
            w.push(format!("d{k}").as_bytes(), &record).unwrap();
        }
        w.push(b"h1", b"x").unwrap();
        w.finish().unwrap();
    }

    #[test]
    fn a_good_file_verifies_with_its_header_facts() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(file_name(5, 2));
        write_snapshot(&path);
        let view = SnapshotFileView::check(&path);
        assert_eq!(view.status, "ok", "{view:?}");
        assert_eq!((view.index, view.term), (Some(5), Some(2)));
        assert_eq!(
            (view.key_count, view.record_count, view.kv_bytes),
            (Some(3), Some(4), Some(35 + 36 + 37 + 3))
        );
        assert_eq!(view.voters, Some(vec![1, 2, 3]));
        assert_eq!(view.verdict(), Verdict::Clean);
    }

    #[test]
    fn a_name_that_disagrees_with_the_contents_is_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(file_name(6, 2));
        write_snapshot(&path);
        let view = SnapshotFileView::check(&path);
        assert_eq!(view.status, "damaged");
        let damage = view.damage.clone().unwrap();
        assert!(
            damage.reason.contains("the name says index 6"),
            "{damage:?}"
        );
        assert_eq!(view.verdict(), Verdict::Corrupt);

        // Under a name that is not a snapshot name (a copy, a .broken file) the contents
        // alone decide, and say where they are.
        let copy = tmp.path().join("backup.bin");
        std::fs::rename(&path, &copy).unwrap();
        let view = SnapshotFileView::check(&copy);
        assert_eq!(view.status, "ok");
        assert_eq!((view.index, view.term), (Some(5), Some(2)));
    }

    #[test]
    fn a_file_gone_before_it_is_read_is_not_damage() {
        let tmp = tempfile::tempdir().unwrap();
        let view = SnapshotFileView::check(&tmp.path().join(file_name(5, 2)));
        assert_eq!(view.status, "vanished");
        assert!(!view.failed());
        assert_eq!(view.verdict(), Verdict::Clean);
    }

    #[test]
    fn a_truncated_file_is_damage_at_its_end() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(file_name(5, 2));
        write_snapshot(&path);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 1).unwrap();
        let view = SnapshotFileView::check(&path);
        assert_eq!(view.status, "damaged");
        assert_eq!(view.damage.unwrap().offset, len - 1);
    }
}
