//! `raftkv check disk`: how fast this disk makes the WAL durable, against the disk itself.
//!
//! An operator's check in the spirit of `etcdctl check perf`: write `entries` entries through
//! the real [`Wal`] in batches (one write and one fdatasync per batch), and after each batch
//! write exactly as many bytes raw, `pwrite` + `fdatasync`, into a file in the same directory
//! prepared the way a WAL segment is (zero-filled and synced beforehand, untimed, as the WAL
//! prepares its next segment off the append path). The ratio of the two throughputs says how
//! much the WAL costs above the disk; the fdatasync latencies say what the disk costs.
//!
//! Shape, and why:
//! - The WAL runs on a [`Vfs`] wrapper that times each `sync_data` and records each write's
//!   size on the appending thread, so the raw run repeats the WAL's own write sizes and the
//!   WAL's fdatasync latency is measured inside it, not guessed from the outside. The WAL's
//!   background segment preparation is left out of the trace, and the timed run starts only
//!   once the preparation that opening started has finished (a steady-state WAL).
//! - WAL and raw writes alternate batch by batch rather than running one after the other, so
//!   both see the same disk: on a shared or virtualized disk the fdatasync latency can change
//!   by an order of magnitude within seconds, which would otherwise decide the ratio. Which
//!   goes first rotates every batch, because the first fdatasync after a pause (building the
//!   batch) is slower on some disks (measured on the development VM: whichever went first
//!   lost 10-30% at batch 256).
//! - Only the `append` calls (and, for raw, the write + fdatasync) are timed; building the
//!   entries is the caller's cost and is excluded from both.
//! - Optionally (`fallocated`) the raw run is repeated on a file preallocated with
//!   `fallocate` (unwritten extents), which shows what that preallocation would cost per
//!   fdatasync on this file system.
//! - Nothing is written outside `dir`; unless `keep`, everything written is removed again.
//!
//! Invariants: every buffer is bounded by the options, which are checked first
//! ([`CheckDiskOptions::validate`]); latency vectors hold one sample per batch.

use raftkv_storage::vfs::{FileBytes, StdFs, Vfs, VfsFile};
use raftkv_storage::wal::record::ENTRY_OVERHEAD_BYTES;
use raftkv_storage::wal::{Wal, WalError, WalOptions};
use raftkv_storage::{Entry, EntryKind};
use serde::Serialize;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// The largest number of batches one check writes (bounds the latency samples).
pub const BATCHES_MAX: u64 = 1_000_000;

/// What to measure.
#[derive(Clone, Debug)]
pub struct CheckDiskOptions {
    /// Where to write; created if missing. The WAL goes in `dir/wal`.
    pub dir: PathBuf,
    pub entries: u64,
    /// Entries per append (one write and one fdatasync each).
    pub batch: u64,
    /// Payload bytes per entry.
    pub value_bytes: usize,
    /// Leave the WAL in `dir/wal` (for `wal-inspect`) instead of removing it.
    pub keep: bool,
    /// Also measure raw writes into a file preallocated with `fallocate` (unwritten extents)
    /// instead of prepared like a WAL segment.
    pub fallocated: bool,
    pub wal: WalOptions,
}

impl CheckDiskOptions {
    pub const DEFAULT_ENTRIES: u64 = 25_600;
    pub const DEFAULT_BATCH: u64 = 256;
    pub const DEFAULT_VALUE_BYTES: usize = 256;

    /// Defaults for `dir`: 25,600 entries of 256 bytes in batches of 256 (100 fdatasyncs).
    pub fn new(dir: impl Into<PathBuf>) -> CheckDiskOptions {
        CheckDiskOptions {
            dir: dir.into(),
            entries: Self::DEFAULT_ENTRIES,
            batch: Self::DEFAULT_BATCH,
            value_bytes: Self::DEFAULT_VALUE_BYTES,
            keep: false,
            fallocated: false,
            wal: WalOptions::default(),
        }
    }

    /// Bytes one full batch writes.
    pub fn batch_bytes(&self) -> u64 {
        self.batch * (ENTRY_OVERHEAD_BYTES + self.value_bytes) as u64
    }

    /// Checks the options before anything is written.
    pub fn validate(&self) -> Result<(), CheckDiskError> {
        let bad = |why: String| Err(CheckDiskError::InvalidOption(why));
        if self.entries == 0 {
            return bad("--entries must be at least 1".into());
        }
        if self.batch == 0 {
            return bad("--batch must be at least 1".into());
        }
        if self.batch > self.entries {
            return bad(format!(
                "--batch ({}) is larger than --entries ({})",
                self.batch, self.entries
            ));
        }
        if self.entries.div_ceil(self.batch) > BATCHES_MAX {
            return bad(format!(
                "--entries / --batch makes more than {BATCHES_MAX} batches"
            ));
        }
        let value_max = self.wal.record_bytes_max.saturating_sub(17);
        if self.value_bytes as u64 > value_max {
            return bad(format!(
                "--value-size ({}) exceeds the WAL's record limit ({value_max} bytes of payload)",
                self.value_bytes
            ));
        }
        // Leave room for the segment preamble: a batch must fit in one segment.
        if self.batch_bytes() > self.wal.segment_bytes_max / 2 {
            return bad(format!(
                "a batch of {} entries of {} bytes is {} bytes, more than half a {} byte WAL segment",
                self.batch,
                self.value_bytes,
                self.batch_bytes(),
                self.wal.segment_bytes_max
            ));
        }
        Ok(())
    }
}

/// Why a check could not run.
#[derive(Debug, thiserror::Error)]
pub enum CheckDiskError {
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("{0} already holds WAL segments; point --dir at a new or empty directory")]
    WalExists(PathBuf),
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("unexpected: {0}")]
    Unexpected(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CheckDiskError + '_ {
    move |source| CheckDiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One run's figures. Throughput is over the timed calls only.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    /// `wal`, `raw`, or `raw_fallocated`.
    pub name: &'static str,
    pub entries: u64,
    /// Writes, each followed by one fdatasync.
    pub writes: u64,
    pub bytes: u64,
    pub elapsed_ms: f64,
    pub entries_per_s: f64,
    /// Megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Per batch: the whole append (WAL) or write + fdatasync (raw).
    pub write_sync_p50_us: f64,
    pub write_sync_p99_us: f64,
    /// The pwrite of each batch alone.
    pub write_p50_us: f64,
    /// Per batch, time outside the pwrite and the fdatasync (for the WAL: encoding, CRC,
    /// bookkeeping, and rotation when it happens).
    pub other_p50_us: f64,
    /// The fdatasync of each batch alone.
    pub fdatasync_p50_us: f64,
    pub fdatasync_p99_us: f64,
    pub fdatasync_max_us: f64,
}

/// Everything a check found.
#[derive(Clone, Debug, Serialize)]
pub struct CheckDiskReport {
    pub dir: String,
    pub wal_dir: String,
    pub entries: u64,
    pub batch: u64,
    pub value_bytes: usize,
    /// Bytes of a full batch as framed in the WAL (and written raw).
    pub batch_bytes: u64,
    pub segment_bytes_max: u64,
    pub wal: Measurement,
    /// Raw writes into a file prepared like a WAL segment.
    pub raw: Measurement,
    /// Raw writes into a fallocated file, if asked for.
    pub raw_fallocated: Option<Measurement>,
    /// WAL entries/s divided by raw entries/s at the same write sizes.
    pub ratio_wal_raw: f64,
    /// WAL p50 append latency divided by raw p50 write + fdatasync latency.
    pub latency_ratio_wal_raw_p50: f64,
    /// Whether the WAL was left in `wal_dir`.
    pub kept: bool,
}

fn percentile_us(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // Nearest rank.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e6
}

/// Per-batch timings of one run.
#[derive(Default)]
struct BatchTimes {
    /// The whole call (WAL append) or pwrite + fdatasync (raw).
    write_sync: Vec<Duration>,
    write: Vec<Duration>,
    fdatasync: Vec<Duration>,
}

impl BatchTimes {
    fn with_capacity(batches: usize) -> BatchTimes {
        BatchTimes {
            write_sync: Vec::with_capacity(batches),
            write: Vec::with_capacity(batches),
            fdatasync: Vec::with_capacity(batches),
        }
    }

    fn push(&mut self, write_sync: Duration, write: Duration, fdatasync: Duration) {
        self.write_sync.push(write_sync);
        self.write.push(write);
        self.fdatasync.push(fdatasync);
    }

    fn measurement(self, name: &'static str, entries: u64, bytes: u64) -> Measurement {
        let BatchTimes {
            mut write_sync,
            mut write,
            mut fdatasync,
        } = self;
        let mut other: Vec<Duration> = write_sync
            .iter()
            .zip(write.iter().zip(&fdatasync))
            .map(|(all, (w, f))| all.saturating_sub(*w + *f))
            .collect();
        let elapsed: Duration = write_sync.iter().sum();
        let secs = elapsed.as_secs_f64().max(1e-9);
        for v in [&mut write_sync, &mut write, &mut fdatasync, &mut other] {
            v.sort();
        }
        Measurement {
            name,
            entries,
            writes: write_sync.len() as u64,
            bytes,
            elapsed_ms: secs * 1e3,
            entries_per_s: entries as f64 / secs,
            mb_per_s: bytes as f64 / secs / 1e6,
            write_sync_p50_us: percentile_us(&write_sync, 0.50),
            write_sync_p99_us: percentile_us(&write_sync, 0.99),
            write_p50_us: percentile_us(&write, 0.50),
            other_p50_us: percentile_us(&other, 0.50),
            fdatasync_p50_us: percentile_us(&fdatasync, 0.50),
            fdatasync_p99_us: percentile_us(&fdatasync, 0.99),
            fdatasync_max_us: fdatasync.last().map_or(0.0, |d| d.as_secs_f64() * 1e6),
        }
    }
}

/// What the timing file layer saw since it was last drained.
#[derive(Default)]
struct IoTrace {
    /// (bytes, duration) of each write.
    writes: Vec<(usize, Duration)>,
    syncs: Vec<Duration>,
}

/// The real file system, timing every `sync_data` and recording every write's size.
#[derive(Clone)]
struct TimedFs {
    trace: Arc<Mutex<IoTrace>>,
    /// Only this thread's writes and syncs are traced (the appends).
    traced_thread: ThreadId,
    /// Syncs completed on other threads (the WAL's segment preparation).
    background_syncs: Arc<AtomicUsize>,
}

impl std::fmt::Debug for TimedFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TimedFs")
    }
}

fn with_trace<R>(trace: &Mutex<IoTrace>, f: impl FnOnce(&mut IoTrace) -> R) -> R {
    // The trace is plain data; a panic elsewhere cannot leave it inconsistent.
    let mut guard = trace.lock().unwrap_or_else(PoisonError::into_inner);
    f(&mut guard)
}

impl TimedFs {
    fn new() -> TimedFs {
        TimedFs {
            trace: Arc::default(),
            traced_thread: std::thread::current().id(),
            background_syncs: Arc::default(),
        }
    }

    /// Waits until `count` syncs have completed on other threads, up to `timeout`.
    fn wait_background_syncs(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.background_syncs.load(Ordering::Acquire) < count {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Takes what was recorded since the last call (a handful of items per append).
    fn drain(&self) -> IoTrace {
        with_trace(&self.trace, std::mem::take)
    }
}

struct TimedFile {
    inner: Box<dyn VfsFile>,
    fs: TimedFs,
}

impl TimedFile {
    fn traced(&self) -> bool {
        std::thread::current().id() == self.fs.traced_thread
    }

    fn record(&self, f: impl FnOnce(&mut IoTrace)) {
        if self.traced() {
            with_trace(&self.fs.trace, f)
        }
    }
}

impl VfsFile for TimedFile {
    fn size_bytes(&self) -> io::Result<u64> {
        self.inner.size_bytes()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let started = Instant::now();
        let result = self.inner.write_all_at(buf, offset);
        let took = started.elapsed();
        self.record(|t| t.writes.push((buf.len(), took)));
        result
    }
    fn sync_data(&self) -> io::Result<()> {
        let started = Instant::now();
        let result = self.inner.sync_data();
        let took = started.elapsed();
        if self.traced() {
            self.record(|t| t.syncs.push(took));
        } else if result.is_ok() {
            self.fs.background_syncs.fetch_add(1, Ordering::AcqRel);
        }
        result
    }
    fn allocate(&self, len_bytes: u64) -> io::Result<()> {
        self.inner.allocate(len_bytes)
    }
    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.inner.set_len(len_bytes)
    }
    fn map(&self) -> io::Result<FileBytes> {
        self.inner.map()
    }
}

impl Vfs for TimedFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        StdFs.create_dir_all(dir)
    }
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        StdFs.list_dir(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        StdFs.exists(path)
    }
    fn open(&self, path: &Path, create: bool) -> io::Result<Box<dyn VfsFile>> {
        Ok(Box::new(TimedFile {
            inner: StdFs.open(path, create)?,
            fs: self.clone(),
        }))
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        StdFs.open_read(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        StdFs.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        StdFs.remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        StdFs.sync_dir(dir)
    }
}

/// Deterministic, incompressible-looking payload bytes (also used by `benches/wal.rs`).
pub fn payload(index: u64, bytes: usize) -> Vec<u8> {
    let mut x = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..bytes)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// How a raw file's blocks are prepared before the timed writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RawPrep {
    /// Written with zeros and synced, as the WAL prepares a segment.
    ZeroFilled,
    /// `fallocate`d: reserved but unwritten extents.
    Fallocated,
    /// Nothing: appends extend the file (a WAL without preallocation).
    Empty,
}

/// One raw file being written sequentially, with its timings.
struct RawRun {
    name: &'static str,
    path: PathBuf,
    file: Box<dyn VfsFile>,
    offset: u64,
    times: BatchTimes,
}

impl RawRun {
    /// Creates `path` with `bytes` prepared as `prep`, synced with its directory (untimed).
    fn create(
        name: &'static str,
        path: PathBuf,
        bytes: u64,
        prep: RawPrep,
        batches: usize,
    ) -> Result<RawRun, CheckDiskError> {
        let file = StdFs.open(&path, true).map_err(io_err(&path))?;
        file.set_len(0).map_err(io_err(&path))?;
        match prep {
            RawPrep::ZeroFilled => {
                let chunk = vec![0u8; (1 << 20).min(bytes as usize)];
                let mut at = 0u64;
                while at < bytes {
                    let n = chunk.len().min((bytes - at) as usize);
                    file.write_all_at(&chunk[..n], at).map_err(io_err(&path))?;
                    at += n as u64;
                }
            }
            RawPrep::Fallocated => file.allocate(bytes).map_err(io_err(&path))?,
            RawPrep::Empty => {}
        }
        file.sync_data().map_err(io_err(&path))?;
        if let Some(dir) = path.parent() {
            StdFs.sync_dir(dir).map_err(io_err(dir))?;
        }
        Ok(RawRun {
            name,
            path,
            file,
            offset: 0,
            times: BatchTimes::with_capacity(batches),
        })
    }

    /// One timed pwrite of `bytes` at the end of what was written, then fdatasync.
    fn write(&mut self, bytes: &[u8]) -> Result<(), CheckDiskError> {
        let started = Instant::now();
        self.file
            .write_all_at(bytes, self.offset)
            .map_err(io_err(&self.path))?;
        let synced = Instant::now();
        self.file.sync_data().map_err(io_err(&self.path))?;
        let done = Instant::now();
        self.times
            .push(done - started, synced - started, done - synced);
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn measurement(self, entries: u64) -> Measurement {
        self.times.measurement(self.name, entries, self.offset)
    }
}

/// Paths the check created outside the WAL directory; removed when it ends.
#[derive(Default)]
struct RawPaths(Vec<PathBuf>);

impl RawPaths {
    fn add(&mut self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        self.0.push(path.clone());
        path
    }

    fn remove(&mut self) -> Result<(), CheckDiskError> {
        for path in self.0.drain(..) {
            if path.exists() {
                StdFs.remove_file(&path).map_err(io_err(&path))?;
            }
        }
        Ok(())
    }
}

/// Runs the check. Unless `opts.keep`, removes everything it wrote, also on failure.
pub fn check_disk(opts: &CheckDiskOptions) -> Result<CheckDiskReport, CheckDiskError> {
    opts.validate()?;
    let dir = opts.dir.clone();
    let dir_created = !dir.exists();
    StdFs.create_dir_all(&dir).map_err(io_err(&dir))?;
    let wal_dir = dir.join("wal");
    let wal_dir_created = !wal_dir.exists();
    if !wal_dir_created {
        let names = StdFs.list_dir(&wal_dir).map_err(io_err(&wal_dir))?;
        if names.iter().any(|n| n.ends_with(".wal")) {
            return Err(CheckDiskError::WalExists(wal_dir));
        }
    }
    let mut raw_paths = RawPaths::default();
    let result = measure(opts, &wal_dir, &mut raw_paths);
    let raw_removed = raw_paths.remove();
    let keep_wal = opts.keep && result.is_ok();
    if !keep_wal {
        remove_wal(&wal_dir, wal_dir_created)?;
        if dir_created {
            // Only if now empty: never remove what someone else put there.
            let _ = std::fs::remove_dir(&dir);
        }
    }
    let mut report = result?;
    raw_removed?;
    report.kept = keep_wal;
    Ok(report)
}

/// Appends batch after batch to the WAL and, right after each, writes the same number of
/// bytes raw (and raw into a fallocated file, if asked), so every run sees the same disk.
fn measure(
    opts: &CheckDiskOptions,
    wal_dir: &Path,
    raw_paths: &mut RawPaths,
) -> Result<CheckDiskReport, CheckDiskError> {
    let batches = opts.entries.div_ceil(opts.batch) as usize;
    let total_bytes = opts.entries * (ENTRY_OVERHEAD_BYTES + opts.value_bytes) as u64;
    let prep = if opts.wal.preallocate {
        RawPrep::ZeroFilled
    } else {
        RawPrep::Empty
    };
    let path = raw_paths.add(&opts.dir, "raftkv-check-disk.raw");
    let mut raw = RawRun::create("raw", path, total_bytes, prep, batches)?;
    let mut raw_fallocated = if opts.fallocated {
        let path = raw_paths.add(&opts.dir, "raftkv-check-disk-fallocated.raw");
        let kind = RawPrep::Fallocated;
        Some(RawRun::create(
            "raw_fallocated",
            path,
            total_bytes,
            kind,
            batches,
        )?)
    } else {
        None
    };
    let raw_bytes = payload(u64::MAX, opts.batch_bytes() as usize);

    let fs = TimedFs::new();
    let mut wal = Wal::open_with(Arc::new(fs.clone()), wal_dir, opts.wal)?;
    if opts.wal.prepare_ahead
        && opts.wal.preallocate
        && !fs.wait_background_syncs(1, Duration::from_secs(120))
    {
        tracing::warn!("the WAL's next segment was not prepared within 120 s; measuring anyway");
    }
    fs.drain();
    let mut wal_times = BatchTimes::with_capacity(batches);
    let mut wal_bytes = 0u64;
    let mut next = wal.last_index() + 1;
    let last = wal.last_index() + opts.entries;
    let mut batch = Vec::with_capacity(opts.batch as usize);
    let mut batch_no = 0usize;
    while next <= last {
        let hi = (next + opts.batch - 1).min(last);
        batch.clear();
        batch.extend((next..=hi).map(|index| Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            payload: payload(index, opts.value_bytes).into(),
        }));
        let size = batch.len() * (ENTRY_OVERHEAD_BYTES + opts.value_bytes);
        let same = raw_bytes.get(..size).ok_or_else(|| {
            CheckDiskError::Unexpected(format!("a batch of {size} bytes is over the limit"))
        })?;
        // Rotate who goes first: the first fdatasync after a pause (building the batch) is
        // measurably slower on some disks, and that must not land on one run only.
        let runs = if raw_fallocated.is_some() { 3 } else { 2 };
        for turn in 0..runs {
            match (batch_no + turn) % runs {
                0 => {
                    let started = Instant::now();
                    wal.append(&batch, None)?;
                    let append = started.elapsed();
                    let trace = fs.drain();
                    // The batch's own write and fdatasync come last; a rotation may precede.
                    let (Some(&(written, write)), Some(&sync)) =
                        (trace.writes.last(), trace.syncs.last())
                    else {
                        return Err(CheckDiskError::Unexpected(
                            "the WAL appended without a write and an fdatasync".into(),
                        ));
                    };
                    if written != size {
                        return Err(CheckDiskError::Unexpected(format!(
                            "the WAL wrote {written} bytes for a batch of {size} bytes"
                        )));
                    }
                    wal_times.push(append, write, sync);
                    wal_bytes += written as u64;
                }
                1 => raw.write(same)?,
                _ => {
                    if let Some(run) = raw_fallocated.as_mut() {
                        run.write(same)?;
                    }
                }
            }
        }
        batch_no += 1;
        next = hi + 1;
    }
    drop(wal);
    tracing::info!(dir = %wal_dir.display(), batches, "check disk done");
    let wal = wal_times.measurement("wal", opts.entries, wal_bytes);
    let raw = raw.measurement(opts.entries);
    let ratio_wal_raw = wal.entries_per_s / raw.entries_per_s.max(1e-9);
    let latency_ratio = wal.write_sync_p50_us / raw.write_sync_p50_us.max(1e-9);
    Ok(CheckDiskReport {
        dir: opts.dir.display().to_string(),
        wal_dir: wal_dir.display().to_string(),
        entries: opts.entries,
        batch: opts.batch,
        value_bytes: opts.value_bytes,
        batch_bytes: opts.batch_bytes(),
        segment_bytes_max: opts.wal.segment_bytes_max,
        wal,
        raw,
        raw_fallocated: raw_fallocated.map(|r| r.measurement(opts.entries)),
        ratio_wal_raw,
        latency_ratio_wal_raw_p50: latency_ratio,
        kept: false,
    })
}

/// Removes the WAL the check wrote: its segment and temp files, and the directory if the
/// check created it.
fn remove_wal(wal_dir: &Path, created: bool) -> Result<(), CheckDiskError> {
    if !wal_dir.exists() {
        return Ok(());
    }
    for name in StdFs.list_dir(wal_dir).map_err(io_err(wal_dir))? {
        if name.ends_with(".wal") || name.ends_with(".tmp") || name.ends_with(".broken") {
            let path = wal_dir.join(&name);
            StdFs.remove_file(&path).map_err(io_err(&path))?;
        }
    }
    if created {
        std::fs::remove_dir(wal_dir).map_err(io_err(wal_dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile_us(&d, 0.5), 50.0);
        assert_eq!(percentile_us(&d, 0.99), 99.0);
        assert_eq!(percentile_us(&d[..1], 0.99), 1.0);
        assert_eq!(percentile_us(&[], 0.5), 0.0);
    }

    #[test]
    fn bad_options_are_rejected_before_writing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("never");
        let mut opts = CheckDiskOptions::new(&dir);
        opts.entries = 0;
        assert!(matches!(
            check_disk(&opts),
            Err(CheckDiskError::InvalidOption(_))
        ));
        opts.entries = 10;
        opts.batch = 11;
        assert!(matches!(
            check_disk(&opts),
            Err(CheckDiskError::InvalidOption(_))
        ));
        opts.batch = 10;
        opts.value_bytes = 64 << 20;
        assert!(matches!(
            check_disk(&opts),
            Err(CheckDiskError::InvalidOption(_))
        ));
        assert!(!dir.exists(), "nothing may be written for bad options");
    }

    #[test]
    fn the_wal_run_and_the_raw_run_write_the_same_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut opts = CheckDiskOptions::new(tmp.path().join("d"));
        opts.entries = 100;
        opts.batch = 16;
        opts.value_bytes = 40;
        opts.fallocated = true;
        let report = check_disk(&opts).unwrap();
        assert_eq!(report.wal.writes, 7);
        assert_eq!(report.raw.writes, 7);
        assert_eq!(report.wal.bytes, 100 * (29 + 40));
        assert_eq!(report.raw.bytes, report.wal.bytes);
        assert_eq!(
            report.raw_fallocated.as_ref().map(|m| m.bytes),
            Some(report.wal.bytes)
        );
        assert!(!report.kept);
        assert!(!tmp.path().join("d").exists(), "everything removed");
    }
}
