//! Recovery harness (issue 3): time from `NodeStorage::open` to ready when N committed
//! 256-byte entries sit in the WAL after the state machine's durable applied index (the
//! last compaction), for N = 100,000 and 1,000,000.
//!
//! Each case builds the WAL once (batches of 4096 entries, one fdatasync each) next to a
//! sled state machine at the compaction point, copies that sled directory aside, and then
//! for each run restores the copy and times `NodeStorage::open` (WAL scan + replay of N
//! entries into sled). The page cache is warm (the WAL was just written).
//!
//! Run: `cargo bench --bench recovery` (about 2 minutes on 2 cores);
//! `RAFTKV_BENCH_RECOVERY_ENTRIES=100000,1000000` and `RAFTKV_BENCH_RECOVERY_RUNS=3` override.

use raftkv_storage::command::Command;
use raftkv_storage::node_storage::{NodeStorage, NodeStorageOptions, SM_DIR_NAME};
use raftkv_storage::{Entry, EntryKind, HardState};
use std::path::Path;
use std::time::{Duration, Instant};

fn entry(index: u64) -> Entry {
    let mut value = vec![b'v'; 256];
    value[..8].copy_from_slice(&index.to_le_bytes());
    Entry {
        index,
        term: 1,
        kind: EntryKind::Normal,
        payload: Command::Put {
            // 100k distinct keys: a realistic mix of new keys and overwrites.
            key: format!("key-{:08}", index.wrapping_mul(7919) % 100_000).into_bytes(),
            value,
        }
        .encode()
        .expect("encode")
        .into(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for item in std::fs::read_dir(from).expect("read_dir") {
        let item = item.expect("dir entry");
        let target = to.join(item.file_name());
        if item.file_type().expect("file type").is_dir() {
            copy_dir(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), &target).expect("copy");
        }
    }
}

fn case(entries: u64, runs: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sm_dir = dir.path().join(SM_DIR_NAME);
    let pristine = tempfile::tempdir().expect("tempdir");
    let opts = NodeStorageOptions::default;
    let build = Instant::now();
    {
        let mut s = NodeStorage::open(dir.path(), opts()).expect("open");
        s.sm().flush().expect("flush");
        copy_dir(&sm_dir, pristine.path());
        let mut next = 1;
        while next <= entries {
            let last = (next + 4095).min(entries);
            let batch: Vec<Entry> = (next..=last).map(entry).collect();
            s.append(
                &batch,
                Some(&HardState {
                    term: 1,
                    vote: Some(1),
                    commit: last,
                }),
            )
            .expect("append");
            next = last + 1;
        }
    }
    eprintln!(
        "built a WAL of {entries} entries in {:.1} s",
        build.elapsed().as_secs_f64()
    );
    let mut totals = Vec::new();
    for run in 0..runs {
        std::fs::remove_dir_all(&sm_dir).expect("rm sm");
        copy_dir(pristine.path(), &sm_dir);
        let started = Instant::now();
        let s = NodeStorage::open(dir.path(), opts()).expect("recover");
        let total = started.elapsed();
        let r = s.recovery();
        assert_eq!(r.replayed_entries, entries);
        assert_eq!(s.sm().applied_index(), entries);
        eprintln!(
            "  run {run}: ready in {:.3} s (WAL open {:.3} s, replay {:.3} s = {:.0} entries/s)",
            total.as_secs_f64(),
            (r.total_elapsed - r.replay_elapsed).as_secs_f64(),
            r.replay_elapsed.as_secs_f64(),
            entries as f64 / r.replay_elapsed.as_secs_f64()
        );
        totals.push(total);
    }
    totals.sort();
    let median: Duration = totals[totals.len() / 2];
    println!(
        "recovery/{entries}_entries_x_256B: median {:.3} s to ready over {runs} runs ({:.0} entries/s)",
        median.as_secs_f64(),
        entries as f64 / median.as_secs_f64()
    );
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects nothing here.
    let cases: Vec<u64> = std::env::var("RAFTKV_BENCH_RECOVERY_ENTRIES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100_000, 1_000_000]);
    let runs: usize = std::env::var("RAFTKV_BENCH_RECOVERY_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    for entries in cases {
        case(entries, runs);
    }
}
