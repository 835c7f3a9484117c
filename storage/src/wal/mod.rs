//! The write-ahead log: each node's Raft log and hard state, checksummed and segmented.
//!
//! Shape, and why:
//! - **Segments** (`<seq:016x>-<first-index:016x>.wal`, preallocated to `segment_bytes_max`)
//!   so that compaction is deleting whole files, and appends never allocate blocks.
//! - **One write and one fdatasync per [`Wal::append`]**, hard state and entries together:
//!   the caller batches (group commit) and the WAL never syncs twice for one batch.
//! - **Our own framing** ([`record`]) with a CRC bound to the segment, so a torn or flipped byte
//!   is detected, never served: reads re-check the CRC, not just the open-time scan.
//! - **Every segment repeats the hard state and the latest snapshot marker** after its header,
//!   so a segment is readable on its own once older ones are purged.
//! - **Overwrites are records** (truncate, reset) rather than in-place edits, so the file is
//!   append-only and replay reconstructs the exact log.
//! - An in-memory index ([`scan::EntryLoc`] per live entry) answers term lookups without I/O;
//!   sealed segments are memory-mapped for reads, the active one is read with `pread`.
//!
//! Invariants (asserted where they can break):
//! - The in-memory index never runs ahead of the disk: it changes only after a successful
//!   fdatasync. Any failed write or sync poisons the WAL; only a reopen (which re-reads the
//!   disk) clears it — after a failed fsync the kernel may have dropped dirty pages, so
//!   retrying on the same file could report success for lost data.
//! - Live entries are contiguous from `first_index` to `last_index`, terms non-decreasing.
//! - Nothing at or below the latest snapshot marker is truncated; purging never goes beyond it.

pub mod record;
pub mod scan;

use crate::types::{Entry, HardState, SnapshotMeta};
use crate::vfs::{FileBytes, StdFs, Vfs, VfsFile};
use record::SegmentHeader;
use scan::{Corruption, EntryLoc, ReplayedLog, ScanOptions, TornTail};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use scan::{parse_segment_name, scan_dir, segment_file_name, Scan};

/// Tunables of a WAL.
#[derive(Clone, Copy, Debug)]
pub struct WalOptions {
    /// A segment is sealed and a new one started when the next write would pass this size.
    pub segment_bytes_max: u64,
    /// The largest record payload accepted on write or read (checked before allocating).
    pub record_bytes_max: u64,
    /// Write `segment_bytes_max` zero bytes into a new segment before using it. Overwriting
    /// written blocks lets fdatasync flush data alone; appending into fresh or fallocated
    /// (unwritten) blocks makes every fdatasync commit file-system metadata too (BENCHMARKS.md,
    /// `raftkv check disk --fallocated`: 0.68x the throughput at batch 256 on ext4).
    pub preallocate: bool,
    /// Prepare the next segment file (zero-filled, synced) on a background thread while the
    /// current one fills, so rotation does not stall appends. Tests on the simulated disk
    /// turn it off to keep the order of file operations deterministic.
    pub prepare_ahead: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes_max: 64 << 20,
            record_bytes_max: 8 << 20,
            preallocate: true,
            prepare_ahead: true,
        }
    }
}

/// Everything that can go wrong with the WAL.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("wal corrupt: {0}")]
    Corrupt(Corruption),
    #[error("wal unusable after an earlier failure ({0}); reopen it to recover from disk")]
    Poisoned(String),
    #[error("invalid wal operation: {0}")]
    Invalid(String),
    #[error("entry {index} is compacted (first index is {first_index})")]
    Compacted { index: u64, first_index: u64 },
    #[error("entry {index} is beyond the last index {last_index}")]
    Unavailable { index: u64, last_index: u64 },
    #[error("record of {len_bytes} bytes exceeds the limit of {bytes_max} bytes")]
    TooLarge { len_bytes: u64, bytes_max: u64 },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What opening the WAL found and did.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub records: u64,
    pub entries: u64,
    pub elapsed: Duration,
    /// The torn tail cut off the last segment, if any, and where its bytes were copied.
    pub torn_tail: Option<(TornTail, PathBuf)>,
    /// The stored commit index was above the last durable entry and was lowered to it.
    pub commit_clamped_from: Option<u64>,
    pub temp_files_removed: Vec<String>,
}

/// What [`Wal::purge`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PurgeReport {
    pub segments_removed: usize,
    pub first_index: u64,
}

/// A summary of one segment, for tools and status pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub name: String,
    pub seq: u64,
    pub first_index: u64,
    pub used_bytes: u64,
    pub active: bool,
}

struct Sealed {
    name: String,
    header: SegmentHeader,
    bytes: FileBytes,
}

struct Active {
    name: String,
    header: SegmentHeader,
    file: Box<dyn VfsFile>,
    write_offset: u64,
    /// Offset where the preamble (header, hard state, snapshot marker) ends.
    preamble_bytes: u64,
}

/// The write-ahead log of one node. See the module docs.
/// What one [`Wal::append`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppendStats {
    /// Bytes written (records and their headers); 0 when there was nothing to write.
    pub bytes: u64,
    /// How long the fdatasync took.
    pub fsync_duration: Duration,
}

pub struct Wal {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    opts: WalOptions,
    sealed: BTreeMap<u64, Sealed>,
    active: Active,
    log: ReplayedLog,
    poisoned: Option<String>,
    report: RecoveryReport,
    buf: Vec<u8>,
    next_file: Option<NextSegmentFile>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("first_index", &self.first_index())
            .field("last_index", &self.last_index())
            .field("hard_state", &self.log.hard_state)
            .field("segments", &(self.sealed.len() + 1))
            .finish()
    }
}

impl Wal {
    /// Opens (or creates) the WAL in `dir` on the real file system.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<Wal, WalError> {
        Wal::open_with(Arc::new(StdFs), dir, opts)
    }

    /// Opens (or creates) the WAL in `dir` on `vfs`: scans every segment, cuts a torn tail
    /// off the last one (copying it aside to a `.broken` file first) and refuses to open on
    /// any other damage.
    pub fn open_with(vfs: Arc<dyn Vfs>, dir: &Path, opts: WalOptions) -> Result<Wal, WalError> {
        let started = Instant::now();
        vfs.create_dir_all(dir).map_err(io_err(dir))?;
        let scan_opts = ScanOptions {
            record_bytes_max: opts.record_bytes_max,
        };
        let scan = scan_dir(vfs.as_ref(), dir, scan_opts).map_err(io_err(dir))?;
        if let Some(c) = scan.corruption {
            return Err(WalError::Corrupt(c));
        }
        let mut report = RecoveryReport {
            segments: scan.segments.len(),
            records: scan.records,
            ..RecoveryReport::default()
        };
        for name in &scan.temp_files {
            let path = dir.join(name);
            vfs.remove_file(&path).map_err(io_err(&path))?;
            if name.ends_with(".next.tmp") {
                tracing::debug!(file = %path.display(), "removed the segment prepared ahead by the last run");
            } else {
                tracing::warn!(file = %path.display(), "removed a stray temp file from an interrupted rotation");
            }
            report.temp_files_removed.push(name.clone());
        }
        if !scan.temp_files.is_empty() {
            vfs.sync_dir(dir).map_err(io_err(dir))?;
        }
        let mut log = scan.log;
        let mut segments = scan.segments;
        let last = segments.pop();
        let mut sealed = BTreeMap::new();
        for seg in segments {
            sealed.insert(
                seg.header.seq,
                Sealed {
                    name: seg.name,
                    header: seg.header,
                    bytes: seg.bytes,
                },
            );
        }
        let mut wal = match last {
            None => {
                let header = SegmentHeader {
                    seq: 0,
                    first_index: 1,
                    prev_term: 0,
                };
                log.first_index = 1;
                let active = create_segment(vfs.as_ref(), dir, &opts, header, &log, None)?;
                Wal {
                    vfs,
                    dir: dir.to_path_buf(),
                    opts,
                    sealed,
                    active,
                    log,
                    poisoned: None,
                    report: RecoveryReport::default(),
                    buf: Vec::new(),
                    next_file: None,
                }
            }
            Some(seg) => {
                let path = seg.path.clone();
                let mut write_offset = seg.used_bytes;
                if let Some(torn) = &scan.torn_tail {
                    let broken = cut_torn_tail(vfs.as_ref(), dir, &seg.name, &seg.bytes, torn)?;
                    report.torn_tail = Some((torn.clone(), broken));
                    write_offset = torn.offset;
                }
                let preamble_bytes = preamble_end(&seg.bytes, seg.header.seq, &opts);
                drop(seg.bytes);
                let file = vfs.open(&path, false).map_err(io_err(&path))?;
                Wal {
                    vfs,
                    dir: dir.to_path_buf(),
                    opts,
                    sealed,
                    active: Active {
                        name: seg.name,
                        header: seg.header,
                        file,
                        write_offset,
                        preamble_bytes,
                    },
                    log,
                    poisoned: None,
                    report: RecoveryReport::default(),
                    buf: Vec::new(),
                    next_file: None,
                }
            }
        };
        let last_index = wal.last_index();
        if wal.log.hard_state.commit > last_index {
            tracing::warn!(
                commit = wal.log.hard_state.commit,
                last_index,
                "stored commit index is beyond the last durable entry; lowered to it"
            );
            report.commit_clamped_from = Some(wal.log.hard_state.commit);
            wal.log.hard_state.commit = last_index;
        }
        report.entries = wal.log.locs.len() as u64;
        report.elapsed = started.elapsed();
        tracing::info!(
            dir = %dir.display(),
            segments = report.segments,
            entries = report.entries,
            first_index = wal.first_index(),
            last_index,
            elapsed_ms = report.elapsed.as_secs_f64() * 1e3,
            "wal opened"
        );
        wal.report = report;
        wal.prepare_next_file();
        Ok(wal)
    }

    /// Starts preparing the file the next rotation will use, if so configured.
    fn prepare_next_file(&mut self) {
        if self.opts.prepare_ahead && self.opts.preallocate && self.next_file.is_none() {
            self.next_file = Some(NextSegmentFile::start(
                self.vfs.clone(),
                &self.dir,
                self.active.header.seq + 1,
                self.opts.segment_bytes_max,
            ));
        }
    }

    /// What opening found and did.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Index of the first entry held (`last_index() + 1` when the log is empty).
    pub fn first_index(&self) -> u64 {
        self.log.first_index
    }

    /// Index of the last entry (`first_index() - 1` when the log is empty).
    pub fn last_index(&self) -> u64 {
        self.log.last_index()
    }

    /// The term of entry `index`, for `first_index() - 1 ..= last_index()`.
    pub fn term(&self, index: u64) -> Option<u64> {
        self.log.term(index)
    }

    /// The last durable hard state.
    pub fn hard_state(&self) -> HardState {
        self.log.hard_state
    }

    /// The latest durable snapshot marker.
    pub fn snapshot(&self) -> Option<&SnapshotMeta> {
        self.log.snapshot.as_ref()
    }

    /// The segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let mut out: Vec<SegmentInfo> = self
            .sealed
            .values()
            .map(|s| SegmentInfo {
                name: s.name.clone(),
                seq: s.header.seq,
                first_index: s.header.first_index,
                used_bytes: s.bytes.len() as u64,
                active: false,
            })
            .collect();
        out.push(SegmentInfo {
            name: self.active.name.clone(),
            seq: self.active.header.seq,
            first_index: self.active.header.first_index,
            used_bytes: self.active.write_offset,
            active: true,
        });
        out
    }

    fn check_usable(&self) -> Result<(), WalError> {
        match &self.poisoned {
            Some(why) => Err(WalError::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    fn poison<T>(&mut self, path: &Path, what: &str, source: io::Error) -> Result<T, WalError> {
        let why = format!("{what} failed on {}: {source}", path.display());
        tracing::error!("{why}; the wal is now read-only until reopened");
        self.poisoned = Some(why);
        Err(WalError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Appends `entries` and, if given, `hard_state`, with one write and one fdatasync. The
    /// hard state is written after the entries (see the comment in the body: torn writes).
    ///
    /// If the first entry's index is at or below `last_index()`, the log's suffix from there
    /// is replaced (a follower resolving a conflict). Entries must be contiguous with
    /// non-decreasing terms, must not start above `last_index() + 1`, and must not overwrite
    /// the latest snapshot. On `Ok` everything is durable; on `Err` nothing in memory changed.
    pub fn append(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<AppendStats, WalError> {
        self.check_usable()?;
        let truncate_from = self.validate_append(entries, hard_state)?;
        if entries.is_empty() && hard_state.is_none() {
            return Ok(AppendStats::default());
        }
        let mut bytes = 0u64;
        if hard_state.is_some() {
            bytes += (record::HEADER_BYTES + 24) as u64;
        }
        if truncate_from.is_some() {
            bytes += (record::HEADER_BYTES + 16) as u64;
        }
        for e in entries {
            let len = record::entry_record_bytes(e) as u64;
            if len - record::HEADER_BYTES as u64 > self.opts.record_bytes_max {
                return Err(WalError::TooLarge {
                    len_bytes: len,
                    bytes_max: self.opts.record_bytes_max,
                });
            }
            bytes += len;
        }
        self.rotate_if_full(bytes)?;
        let seq = self.active.header.seq;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        // Order matters for a torn write, which keeps only a prefix: the entries come first
        // and the hard state last, so a surviving commit index never covers entries that
        // this very batch was replacing (a stale suffix would then look committed).
        if let Some(from) = truncate_from {
            let prev_term = self.log.term(from - 1).unwrap_or(0);
            record::encode_truncate(&mut buf, seq, from, prev_term);
        }
        let mut locs = Vec::with_capacity(entries.len());
        for e in entries {
            let offset = self.active.write_offset + buf.len() as u64;
            record::encode_entry(&mut buf, seq, e);
            let len = (self.active.write_offset + buf.len() as u64 - offset) as u32;
            locs.push(EntryLoc {
                seq,
                offset,
                len,
                term: e.term,
            });
        }
        if let Some(hs) = hard_state {
            record::encode_hard_state(&mut buf, seq, hs);
        }
        debug_assert_eq!(
            buf.len() as u64,
            bytes,
            "record size estimate must be exact"
        );
        let result = self.write_and_sync(&buf);
        self.buf = buf;
        let fsync_duration = result?;
        // Durable: now, and only now, update memory.
        if let Some(hs) = hard_state {
            self.log.hard_state = *hs;
        }
        if let Some(from) = truncate_from {
            self.log
                .locs
                .truncate((from - self.log.first_index) as usize);
        }
        self.log.locs.extend(locs);
        Ok(AppendStats {
            bytes,
            fsync_duration,
        })
    }

    fn validate_append(
        &self,
        entries: &[Entry],
        hs: Option<&HardState>,
    ) -> Result<Option<u64>, WalError> {
        if let Some(hs) = hs {
            if hs.term < self.log.hard_state.term {
                return Err(WalError::Invalid(format!(
                    "hard state term {} is lower than the durable term {}",
                    hs.term, self.log.hard_state.term
                )));
            }
        }
        let Some(first) = entries.first() else {
            return Ok(None);
        };
        for pair in entries.windows(2) {
            if pair[1].index != pair[0].index + 1 || pair[1].term < pair[0].term {
                return Err(WalError::Invalid(format!(
                    "entries not contiguous with non-decreasing terms at index {}",
                    pair[1].index
                )));
            }
        }
        let last = self.last_index();
        if first.index > last + 1 {
            return Err(WalError::Invalid(format!(
                "entry {} would leave a gap after the last index {last}",
                first.index
            )));
        }
        let floor = self.log.snapshot.as_ref().map_or(0, |s| s.index);
        if first.index <= floor || first.index < self.log.first_index {
            return Err(WalError::Invalid(format!(
                "entry {} would overwrite compacted or snapshotted entries (snapshot at {floor}, first index {})",
                first.index, self.log.first_index
            )));
        }
        let prev_term = self.log.term(first.index - 1).unwrap_or(0);
        if first.term < prev_term {
            return Err(WalError::Invalid(format!(
                "entry {} has term {} below the previous entry's term {prev_term}",
                first.index, first.term
            )));
        }
        Ok((first.index <= last).then_some(first.index))
    }

    /// Drops entries from `from_index` on (durably), e.g. before appending a leader's entries.
    pub fn truncate_suffix(&mut self, from_index: u64) -> Result<(), WalError> {
        self.check_usable()?;
        let last = self.last_index();
        if from_index > last {
            return Ok(());
        }
        let floor = self.log.snapshot.as_ref().map_or(0, |s| s.index);
        if from_index <= floor || from_index < self.log.first_index {
            return Err(WalError::Invalid(format!(
                "cannot truncate from {from_index}: snapshot at {floor}, first index {}",
                self.log.first_index
            )));
        }
        self.rotate_if_full((record::HEADER_BYTES + 16) as u64)?;
        let prev_term = self.log.term(from_index - 1).unwrap_or(0);
        let mut buf = Vec::new();
        record::encode_truncate(&mut buf, self.active.header.seq, from_index, prev_term);
        self.write_and_sync(&buf)?;
        self.log
            .locs
            .truncate((from_index - self.log.first_index) as usize);
        Ok(())
    }

    /// Durably records that a snapshot covers the log up to `meta.index`.
    pub fn record_snapshot(&mut self, meta: &SnapshotMeta) -> Result<(), WalError> {
        self.check_usable()?;
        if meta.index > self.last_index() {
            return Err(WalError::Invalid(format!(
                "snapshot at {} is beyond the last index {}; use reset_to_snapshot",
                meta.index,
                self.last_index()
            )));
        }
        if let Some(term) = self.log.term(meta.index) {
            if term != meta.term {
                return Err(WalError::Invalid(format!(
                    "snapshot at {} has term {}, the log has {term}",
                    meta.index, meta.term
                )));
            }
        }
        if let Some(prev) = &self.log.snapshot {
            if meta.index < prev.index {
                return Err(WalError::Invalid(format!(
                    "snapshot at {} is older than the recorded one at {}",
                    meta.index, prev.index
                )));
            }
        }
        let mut probe = Vec::new();
        record::encode_snapshot_marker(&mut probe, 0, meta);
        self.rotate_if_full(probe.len() as u64)?;
        let mut buf = Vec::new();
        record::encode_snapshot_marker(&mut buf, self.active.header.seq, meta);
        self.write_and_sync(&buf)?;
        self.log.snapshot = Some(meta.clone());
        Ok(())
    }

    /// After installing a snapshot: the log restarts empty at `meta.index + 1`. Older
    /// segments are deleted once the reset is durable.
    pub fn reset_to_snapshot(&mut self, meta: &SnapshotMeta) -> Result<(), WalError> {
        self.check_usable()?;
        if let Some(prev) = &self.log.snapshot {
            if meta.index < prev.index {
                return Err(WalError::Invalid(format!(
                    "snapshot at {} is older than the recorded one at {}",
                    meta.index, prev.index
                )));
            }
        }
        let mut buf = Vec::new();
        record::encode_snapshot_marker(&mut buf, 0, meta);
        record::encode_reset(&mut buf, 0, meta.index + 1, meta.term);
        self.rotate_if_full(buf.len() as u64)?;
        buf.clear();
        let seq = self.active.header.seq;
        record::encode_snapshot_marker(&mut buf, seq, meta);
        record::encode_reset(&mut buf, seq, meta.index + 1, meta.term);
        self.write_and_sync(&buf)?;
        self.log.snapshot = Some(meta.clone());
        self.log.first_index = meta.index + 1;
        self.log.prev_term = meta.term;
        self.log.locs.clear();
        // Start a clean segment at the new first index, then drop every older file.
        self.rotate()?;
        let old: Vec<u64> = self.sealed.keys().copied().collect();
        self.remove_sealed(&old)?;
        Ok(())
    }

    /// Deletes whole segments whose live entries are all at or below `upto_index`, which
    /// must not pass the latest snapshot marker. The active segment is never deleted.
    pub fn purge(&mut self, upto_index: u64) -> Result<PurgeReport, WalError> {
        self.check_usable()?;
        let snapshot_index = self.log.snapshot.as_ref().map_or(0, |s| s.index);
        if upto_index > snapshot_index {
            return Err(WalError::Invalid(format!(
                "cannot purge up to {upto_index}: the latest snapshot is at {snapshot_index}"
            )));
        }
        // Segment k may go when the next one starts at or below upto_index + 1: everything
        // live in k (and before) is below the next segment's first index.
        let seqs: Vec<u64> = self.sealed.keys().copied().collect();
        let mut removable = Vec::new();
        for (i, seq) in seqs.iter().enumerate() {
            let next_first = match seqs.get(i + 1) {
                Some(next) => self.sealed[next].header.first_index,
                None => self.active.header.first_index,
            };
            if next_first > upto_index + 1 {
                break;
            }
            removable.push(*seq);
        }
        let removed = self.remove_sealed(&removable)?;
        Ok(PurgeReport {
            segments_removed: removed,
            first_index: self.first_index(),
        })
    }

    /// Removes the given sealed segments oldest first, syncing the directory after each, so
    /// a crash leaves a contiguous run of segments. Updates the in-memory log to match.
    fn remove_sealed(&mut self, seqs: &[u64]) -> Result<usize, WalError> {
        for seq in seqs {
            let Some(seg) = self.sealed.get(seq) else {
                continue;
            };
            let path = self.dir.join(&seg.name);
            if let Err(e) = self.vfs.remove_file(&path) {
                return self.poison(&path, "remove", e);
            }
            if let Err(e) = self.vfs.sync_dir(&self.dir) {
                let dir = self.dir.clone();
                return self.poison(&dir, "directory fsync", e);
            }
            self.sealed.remove(seq);
            // Drop the entries that lived in it: always a prefix of the index.
            let keep_from = self.log.locs.partition_point(|l| l.seq <= *seq);
            if keep_from > 0 {
                self.log.prev_term = self.log.locs[keep_from - 1].term;
                self.log.first_index += keep_from as u64;
                self.log.locs.drain(..keep_from);
            }
        }
        Ok(seqs.len())
    }

    /// Reads entries `[lo, hi)`, stopping once `max_bytes` is reached (at least one entry).
    /// Every record's CRC is checked again on the way out.
    pub fn entries(&self, lo: u64, hi: u64, max_bytes: usize) -> Result<Vec<Entry>, WalError> {
        if lo < self.log.first_index {
            return Err(WalError::Compacted {
                index: lo,
                first_index: self.log.first_index,
            });
        }
        let last = self.last_index();
        if hi > last + 1 {
            return Err(WalError::Unavailable {
                index: hi - 1,
                last_index: last,
            });
        }
        let mut out = Vec::new();
        let mut total = 0usize;
        let mut index = lo;
        let mut scratch = Vec::new();
        while index < hi {
            // Read a run of entries in the same segment with one read.
            let start = (index - self.log.first_index) as usize;
            let first_loc = self.log.locs[start];
            let mut end = start + 1;
            let run_max = (hi - self.log.first_index) as usize;
            let mut run_bytes = first_loc.len as usize;
            while end < run_max
                && self.log.locs[end].seq == first_loc.seq
                && total + run_bytes < max_bytes.max(1)
            {
                run_bytes += self.log.locs[end].len as usize;
                end += 1;
            }
            let span_end = self.log.locs[end - 1].offset + u64::from(self.log.locs[end - 1].len);
            let span =
                self.segment_span(first_loc.seq, first_loc.offset, span_end, &mut scratch)?;
            for (i, loc) in self.log.locs[start..end].iter().enumerate() {
                let at = (loc.offset - first_loc.offset) as usize;
                let entry =
                    self.decode_entry(&span[at..at + loc.len as usize], loc, index + i as u64)?;
                total += entry.size_bytes();
                out.push(entry);
                if total >= max_bytes {
                    return Ok(out);
                }
            }
            index += (end - start) as u64;
        }
        Ok(out)
    }

    /// Lets go of the sealed segments' mapped pages this process touched (after reading much
    /// of the log back, as a restart does): see [`FileBytes::release_pages`].
    pub fn release_mapped_pages(&self) {
        for seg in self.sealed.values() {
            seg.bytes.release_pages();
        }
    }

    /// Reads one entry.
    pub fn entry(&self, index: u64) -> Result<Entry, WalError> {
        let mut v = self.entries(index, index + 1, usize::MAX)?;
        v.pop().ok_or(WalError::Unavailable {
            index,
            last_index: self.last_index(),
        })
    }

    fn segment_span<'a>(
        &'a self,
        seq: u64,
        from: u64,
        to: u64,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], WalError> {
        if seq == self.active.header.seq {
            scratch.resize((to - from) as usize, 0);
            let path = self.dir.join(&self.active.name);
            self.active
                .file
                .read_exact_at(scratch, from)
                .map_err(io_err(&path))?;
            return Ok(scratch);
        }
        let seg = self.sealed.get(&seq).ok_or_else(|| {
            WalError::Invalid(format!("index points at segment {seq}, which is not open"))
        })?;
        seg.bytes.get(from as usize..to as usize).ok_or_else(|| {
            WalError::Corrupt(Corruption {
                file: self.dir.join(&seg.name),
                offset: from,
                last_good_index: 0,
                reason: "segment shorter than its index says".into(),
            })
        })
    }

    fn decode_entry(&self, bytes: &[u8], loc: &EntryLoc, index: u64) -> Result<Entry, WalError> {
        let name = if loc.seq == self.active.header.seq {
            &self.active.name
        } else {
            self.sealed
                .get(&loc.seq)
                .map_or(&self.active.name, |s| &s.name)
        };
        let corrupt = |reason: String| {
            WalError::Corrupt(Corruption {
                file: self.dir.join(name),
                offset: loc.offset,
                last_good_index: index.saturating_sub(1),
                reason,
            })
        };
        let frame = record::read_frame(bytes, loc.seq, self.opts.record_bytes_max)
            .map_err(|e| corrupt(format!("on read: {e}")))?;
        match frame.decode() {
            Ok(record::Record::Entry(e)) if e.index == index && e.term == loc.term => Ok(e),
            Ok(other) => Err(corrupt(format!("expected entry {index}, found {other:?}"))),
            Err(e) => Err(corrupt(format!("on read: {e}"))),
        }
    }

    /// Writes `buf` at the end of the active segment and fdatasyncs it; returns how long the
    /// fdatasync took (the figure operators watch: `raftkv_wal_fsync_duration_seconds`).
    fn write_and_sync(&mut self, buf: &[u8]) -> Result<Duration, WalError> {
        let path = self.dir.join(&self.active.name);
        if let Err(e) = self.active.file.write_all_at(buf, self.active.write_offset) {
            return self.poison(&path, "write", e);
        }
        let sync_started = Instant::now();
        if let Err(e) = self.active.file.sync_data() {
            return self.poison(&path, "fdatasync", e);
        }
        let fsync_duration = sync_started.elapsed();
        self.active.write_offset += buf.len() as u64;
        Ok(fsync_duration)
    }

    fn rotate_if_full(&mut self, next_write_bytes: u64) -> Result<(), WalError> {
        let full = self.active.write_offset + next_write_bytes > self.opts.segment_bytes_max;
        let has_data = self.active.write_offset > self.active.preamble_bytes;
        if full && has_data {
            self.rotate()?;
        }
        Ok(())
    }

    /// Seals the active segment and starts the next: temp file written and fsynced, renamed,
    /// directory fsynced.
    fn rotate(&mut self) -> Result<(), WalError> {
        let header = SegmentHeader {
            seq: self.active.header.seq + 1,
            first_index: self.last_index() + 1,
            prev_term: self.log.last_term(),
        };
        let prepared = self.next_file.take().map(NextSegmentFile::finish);
        let next = match create_segment(
            self.vfs.as_ref(),
            &self.dir,
            &self.opts,
            header,
            &self.log,
            prepared,
        ) {
            Ok(next) => next,
            Err(e) => {
                self.poisoned = Some(format!("segment rotation failed: {e}"));
                return Err(e);
            }
        };
        let old_path = self.dir.join(&self.active.name);
        let bytes = match self.active.file.map() {
            Ok(bytes) => bytes,
            Err(e) => return self.poison(&old_path, "mmap of sealed segment", e),
        };
        let old = std::mem::replace(&mut self.active, next);
        tracing::debug!(sealed = %old.name, next = %self.active.name, "wal segment rotated");
        self.sealed.insert(
            old.header.seq,
            Sealed {
                name: old.name,
                header: old.header,
                bytes,
            },
        );
        self.prepare_next_file();
        Ok(())
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        // Do not leave a thread writing into the directory after the WAL is gone; its temp
        // file is removed by the next open.
        if let Some(next) = self.next_file.take() {
            let _ = next.finish();
        }
    }
}

/// A zero-filled, synced temp file and its path.
type PreparedFile = (PathBuf, Box<dyn VfsFile>);

/// A segment file being zero-filled on a background thread, ready for the next rotation.
struct NextSegmentFile {
    tmp: PathBuf,
    worker: std::thread::JoinHandle<io::Result<Box<dyn VfsFile>>>,
}

impl NextSegmentFile {
    fn start(vfs: Arc<dyn Vfs>, dir: &Path, seq: u64, len_bytes: u64) -> NextSegmentFile {
        let tmp = dir.join(format!("{seq:016x}.next.tmp"));
        let path = tmp.clone();
        let worker = std::thread::spawn(move || {
            let file = vfs.open(&path, true)?;
            let filled = file
                .set_len(0)
                .and_then(|()| zero_fill(file.as_ref(), len_bytes))
                .and_then(|()| file.sync_data());
            if let Err(e) = filled {
                drop(file);
                remove_temp(vfs.as_ref(), &path);
                return Err(e);
            }
            Ok(file)
        });
        NextSegmentFile { tmp, worker }
    }

    /// Waits for the file; on success returns its temp path and handle.
    fn finish(self) -> Result<PreparedFile, WalError> {
        let tmp = self.tmp;
        match self.worker.join() {
            Ok(Ok(file)) => Ok((tmp, file)),
            Ok(Err(source)) => Err(WalError::Io { path: tmp, source }),
            Err(_) => Err(WalError::Io {
                path: tmp,
                source: io::Error::other("segment preparation thread panicked"),
            }),
        }
    }
}

/// Best-effort removal of a temp file after a failure; the original error is what matters.
fn remove_temp(vfs: &dyn Vfs, tmp: &Path) {
    if let Err(e) = vfs.remove_file(tmp) {
        tracing::warn!(file = %tmp.display(), error = %e, "could not remove a temp file after a failed write");
    }
}

/// Writes `len_bytes` of zeros from offset 0, in bounded chunks.
fn zero_fill(file: &dyn VfsFile, len_bytes: u64) -> io::Result<()> {
    const CHUNK_BYTES: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK_BYTES.min(len_bytes) as usize];
    let mut offset = 0;
    while offset < len_bytes {
        let n = CHUNK_BYTES.min(len_bytes - offset) as usize;
        file.write_all_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// Where the preamble (header, hard state, snapshot marker) of a segment ends.
fn preamble_end(bytes: &[u8], seq: u64, opts: &WalOptions) -> u64 {
    let mut offset = 0usize;
    while let Ok(frame) = record::read_frame(&bytes[offset..], seq, opts.record_bytes_max) {
        if !matches!(
            frame.rtype,
            record::RecordType::SegmentHeader
                | record::RecordType::HardState
                | record::RecordType::SnapshotMarker
        ) {
            break;
        }
        offset += frame.len;
    }
    offset as u64
}

/// Creates a durable segment: header, the current hard state and snapshot marker, written
/// into a zero-filled temp file (`prepared` if a background thread made one), fsynced, then
/// renamed into place and the directory fsynced.
fn create_segment(
    vfs: &dyn Vfs,
    dir: &Path,
    opts: &WalOptions,
    header: SegmentHeader,
    log: &ReplayedLog,
    prepared: Option<Result<PreparedFile, WalError>>,
) -> Result<Active, WalError> {
    let name = segment_file_name(header.seq, header.first_index);
    let path = dir.join(&name);
    let mut buf = Vec::new();
    record::encode_segment_header(&mut buf, &header);
    record::encode_hard_state(&mut buf, header.seq, &log.hard_state);
    if let Some(meta) = &log.snapshot {
        record::encode_snapshot_marker(&mut buf, header.seq, meta);
    }
    let (tmp, file) = match prepared {
        Some(prepared) => prepared?,
        None => {
            let tmp = dir.join(format!("{name}.tmp"));
            let file = vfs.open(&tmp, true).map_err(io_err(&tmp))?;
            let filled = file.set_len(0).and_then(|()| match opts.preallocate {
                true => zero_fill(file.as_ref(), opts.segment_bytes_max),
                false => Ok(()),
            });
            if let Err(e) = filled {
                // A disk too small for one segment must not keep the half-filled file.
                remove_temp(vfs, &tmp);
                return Err(io_err(&tmp)(e));
            }
            (tmp, file)
        }
    };
    let published = file
        .write_all_at(&buf, 0)
        .and_then(|()| file.sync_data())
        .map_err(io_err(&tmp))
        .and_then(|()| vfs.rename(&tmp, &path).map_err(io_err(&path)));
    if let Err(e) = published {
        remove_temp(vfs, &tmp);
        return Err(e);
    }
    vfs.sync_dir(dir).map_err(io_err(dir))?;
    Ok(Active {
        name,
        header,
        file,
        write_offset: buf.len() as u64,
        preamble_bytes: buf.len() as u64,
    })
}

/// Copies the torn bytes aside to `<segment>.<offset>.broken`, then zeroes them in place.
fn cut_torn_tail(
    vfs: &dyn Vfs,
    dir: &Path,
    name: &str,
    bytes: &[u8],
    torn: &TornTail,
) -> Result<PathBuf, WalError> {
    let start = torn.offset as usize;
    let end = start + torn.bytes as usize;
    let broken_name = format!("{name}.{start}.broken");
    let broken = dir.join(&broken_name);
    crate::vfs::write_file_atomic(vfs, dir, &broken_name, &bytes[start..end])
        .map_err(io_err(&broken))?;
    let path = dir.join(name);
    let file = vfs.open(&path, false).map_err(io_err(&path))?;
    file.write_all_at(&vec![0u8; end - start], torn.offset)
        .map_err(io_err(&path))?;
    file.sync_data().map_err(io_err(&path))?;
    tracing::warn!(
        file = %path.display(),
        offset = torn.offset,
        bytes = torn.bytes,
        reason = %torn.reason,
        copy = %broken.display(),
        "cut a torn tail off the last wal segment"
    );
    Ok(broken)
}

#[cfg(test)]
mod tests;
