//! Criterion benches of the WAL: append + fdatasync by batch size, and replay on open.
//!
//! - `wal_append_fdatasync/<batch>`: `Wal::append` of `batch` entries of 256-byte payloads,
//!   one write and one fdatasync each, reported in entries/s. Building the entries is not
//!   timed. The WAL runs as configured by default (64 MiB zero-filled segments, the next one
//!   prepared on a background thread); it is recreated, untimed, once it passes
//!   `WAL_BYTES_RESET` so the bench does not fill the disk.
//! - `raw_write_fdatasync/<batch>`: the disk's own figure for the same write sizes: `pwrite` of
//!   `batch` × 285 bytes (the framed size of a 256-byte entry) + `fdatasync`, sequentially into
//!   a 64 MiB file zero-filled beforehand (as a WAL segment is), wrapping to offset 0 at its end.
//! - `wal_replay/warm`: `Wal::open` of a 1,000,000-entry WAL of 256-byte entries whose files
//!   are in the page cache, in entries/s.
//! - `wal_replay/cold`: the same after dropping the segment files from the page cache with
//!   `posix_fadvise(POSIX_FADV_DONTNEED)` before each open (untimed). Only these files are
//!   dropped, not the whole machine's cache (which `/proc/sys/vm/drop_caches` would do).
//!
//! The replay benches open with `prepare_ahead: false`: preparing the next segment happens on
//! a background thread after open returns, so it is not part of replay, and it would otherwise
//! write 64 MiB per iteration and leave a temp file for the next open to remove.
//!
//! Files go under `$RAFTKV_BENCH_DIR` if set, else the system temp dir: put it on the disk you
//! want to measure. Performance is measured here, never asserted in tests.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use raftkv::check_disk::payload;
use raftkv::storage::wal::{Wal, WalOptions};
use raftkv::storage::{Entry, EntryKind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PAYLOAD_BYTES: usize = 256;
const BATCHES: [u64; 4] = [1, 16, 256, 4096];
const REPLAY_ENTRIES: u64 = 1_000_000;
/// Recreate the append bench's WAL once it holds this many bytes.
const WAL_BYTES_RESET: u64 = 512 << 20;

fn bench_root() -> PathBuf {
    std::env::var_os("RAFTKV_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from)
}

fn tempdir() -> tempfile::TempDir {
    let root = bench_root();
    std::fs::create_dir_all(&root).expect("create the bench directory");
    tempfile::tempdir_in(root).expect("create a temp dir for the bench")
}

fn batch(first: u64, n: u64) -> Vec<Entry> {
    (first..first + n)
        .map(|index| Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            payload: payload(index, PAYLOAD_BYTES).into(),
        })
        .collect()
}

fn append_fdatasync(c: &mut Criterion) {
    let mut group = c.benchmark_group("wal_append_fdatasync");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    for n in BATCHES {
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            // (Wal, TempDir): the WAL drops (joining its preparation thread) before its dir.
            let mut state: Option<(Wal, tempfile::TempDir)> = None;
            let record_bytes = (29 + PAYLOAD_BYTES) as u64;
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let full = state
                        .as_ref()
                        .is_some_and(|(wal, _)| wal.last_index() * record_bytes > WAL_BYTES_RESET);
                    if full {
                        state = None;
                    }
                    let (wal, _) = state.get_or_insert_with(|| {
                        let dir = tempdir();
                        let wal = Wal::open(&dir.path().join("wal"), WalOptions::default())
                            .expect("open the bench WAL");
                        (wal, dir)
                    });
                    let entries = batch(wal.last_index() + 1, n);
                    let started = Instant::now();
                    wal.append(&entries, None).expect("append");
                    timed += started.elapsed();
                }
                timed
            });
        });
    }
    group.finish();
}

fn raw_write_fdatasync(c: &mut Criterion) {
    use std::os::unix::fs::FileExt;
    const FILE_BYTES: u64 = 64 << 20;
    let tmp = tempdir();
    let path = tmp.path().join("raw");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("create the raw file");
    let zeros = vec![0u8; 1 << 20];
    for chunk in 0..FILE_BYTES / zeros.len() as u64 {
        file.write_all_at(&zeros, chunk * zeros.len() as u64)
            .expect("zero-fill the raw file");
    }
    file.sync_all().expect("sync the raw file");
    let record_bytes = 29 + PAYLOAD_BYTES;
    let data: Vec<u8> = (0..BATCHES[BATCHES.len() - 1] as usize * record_bytes)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let mut group = c.benchmark_group("raw_write_fdatasync");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    for n in BATCHES {
        let bytes = &data[..n as usize * record_bytes];
        group.throughput(Throughput::Elements(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            let mut offset = 0u64;
            b.iter(|| {
                if offset + bytes.len() as u64 > FILE_BYTES {
                    offset = 0;
                }
                file.write_all_at(bytes, offset).expect("pwrite");
                file.sync_data().expect("fdatasync");
                offset += bytes.len() as u64;
            });
        });
    }
    group.finish();
}

/// Writes entries 1..=REPLAY_ENTRIES into `dir` in batches of 4096.
fn build_replay_wal(dir: &Path) {
    let mut wal = Wal::open(dir, WalOptions::default()).expect("open the replay WAL");
    let mut next = 1;
    while next <= REPLAY_ENTRIES {
        let n = 4096.min(REPLAY_ENTRIES - next + 1);
        wal.append(&batch(next, n), None).expect("append");
        next += n;
    }
}

fn replay_options() -> WalOptions {
    WalOptions {
        prepare_ahead: false,
        ..WalOptions::default()
    }
}

fn open_and_check(dir: &Path) -> Duration {
    let started = Instant::now();
    let wal = Wal::open(dir, replay_options()).expect("open");
    let took = started.elapsed();
    assert_eq!(wal.last_index(), REPLAY_ENTRIES, "replayed the whole log");
    took
}

/// Drops `dir`'s files from the page cache. Returns how many files were dropped.
fn drop_from_page_cache(dir: &Path) -> usize {
    use std::os::fd::AsRawFd;
    let mut dropped = 0;
    for entry in std::fs::read_dir(dir).expect("list the replay WAL") {
        let path = entry.expect("dir entry").path();
        let file = std::fs::File::open(&path).expect("open a segment");
        // SAFETY: plain syscall on a valid, owned descriptor.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "posix_fadvise(DONTNEED) on {}", path.display());
        dropped += 1;
    }
    dropped
}

fn replay(c: &mut Criterion) {
    let tmp = tempdir();
    let dir = tmp.path().join("wal");
    let started = Instant::now();
    build_replay_wal(&dir);
    eprintln!(
        "built a {REPLAY_ENTRIES}-entry WAL in {:.1} s in {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    let mut group = c.benchmark_group("wal_replay");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Elements(REPLAY_ENTRIES));
    group.bench_function("warm", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| open_and_check(&dir)).sum())
    });
    group.bench_function("cold", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    drop_from_page_cache(&dir);
                    open_and_check(&dir)
                })
                .sum()
        })
    });
    group.finish();
}

criterion_group!(benches, append_fdatasync, raw_write_fdatasync, replay);
criterion_main!(benches);
