//! Benchmarks of the sled state machine and snapshot files (issue 3):
//! - `sm_apply/batch_1`, `sm_apply/batch_256`: apply throughput of 256-byte puts;
//! - `snapshot/create_1M_x_256B`: writing a snapshot file of the state (MB/s of key+value bytes);
//! - `snapshot/install_1M_x_256B`: installing that file into an empty state machine;
//! - an apply-stall report printed before the groups: the latency of single-entry applies
//!   running back to back while a snapshot is taken, against the same without a snapshot.
//!
//! `RAFTKV_BENCH_SNAPSHOT_KEYS` overrides the 1,000,000 keys of the snapshot benches.
//! Run: `cargo bench --bench state_machine` (about 3 minutes on 2 cores).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use raftkv_storage::command::Command;
use raftkv_storage::sm::{StateMachine, StateMachineOptions};
use raftkv_storage::snapshot::{SnapshotOptions, SnapshotStore};
use raftkv_storage::vfs::StdFs;
use raftkv_storage::{Entry, EntryKind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VALUE_BYTES: usize = 256;

fn snapshot_keys() -> u64 {
    std::env::var("RAFTKV_BENCH_SNAPSHOT_KEYS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
}

fn put_entry(index: u64, key: u64) -> Entry {
    let mut value = vec![b'v'; VALUE_BYTES];
    value[..8].copy_from_slice(&index.to_le_bytes());
    Entry {
        index,
        term: 1,
        kind: EntryKind::Normal,
        payload: Command::Put {
            key: format!("key-{key:012}").into_bytes(),
            value,
        }
        .encode()
        .expect("encode")
        .into(),
    }
}

fn open_sm(dir: &std::path::Path) -> StateMachine {
    StateMachine::open(dir, StateMachineOptions::default()).expect("open state machine")
}

fn bench_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("sm_apply");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(8));
    for batch in [1u64, 256] {
        let dir = tempfile::tempdir().expect("tempdir");
        let sm = open_sm(dir.path());
        let mut next = 1u64;
        group.throughput(Throughput::Elements(batch));
        group.bench_function(format!("batch_{batch}"), |b| {
            b.iter_batched(
                || {
                    let entries: Vec<Entry> = (next..next + batch)
                        .map(|i| put_entry(i, i.wrapping_mul(0x9E37_79B9) % 10_000_000))
                        .collect();
                    next += batch;
                    entries
                },
                |entries| sm.apply(&entries).expect("apply"),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

/// A state machine holding `keys` keys with 256-byte values (applied in batches of 1024).
fn filled_sm(dir: &std::path::Path, keys: u64) -> StateMachine {
    let sm = open_sm(dir);
    let started = Instant::now();
    let mut next = 1;
    while next <= keys {
        let end = (next + 1024).min(keys + 1);
        let batch: Vec<Entry> = (next..end).map(|i| put_entry(i, i)).collect();
        sm.apply(&batch).expect("apply");
        next = end;
    }
    sm.flush().expect("flush");
    eprintln!(
        "filled {keys} keys x {VALUE_BYTES} B in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    sm
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Single-entry applies back to back for `during`'s duration; their latencies, sorted.
fn apply_latencies(sm: &StateMachine, stop: &AtomicBool, first_index: u64) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut index = first_index;
    let started = Instant::now();
    let mut slow = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let e = put_entry(index, index % 50_000);
        let t = Instant::now();
        sm.apply(std::slice::from_ref(&e)).expect("apply");
        let took = t.elapsed();
        if took > Duration::from_millis(20) && slow.len() < 20 {
            slow.push((t - started, took));
        }
        out.push(took);
        index += 1;
    }
    for (at, took) in slow {
        eprintln!("  slow apply at +{at:?}: {took:?}");
    }
    out.sort();
    out
}

fn report(label: &str, lat: &[Duration]) {
    eprintln!(
        "{label}: {} applies, p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
        lat.len(),
        percentile(lat, 0.5),
        percentile(lat, 0.99),
        percentile(lat, 0.999),
        lat.last().copied().unwrap_or_default()
    );
}

fn bench_snapshot(c: &mut Criterion) {
    let keys = snapshot_keys();
    let sm_dir = tempfile::tempdir().expect("tempdir");
    let data_dir = tempfile::tempdir().expect("tempdir");
    let sm = filled_sm(sm_dir.path(), keys);
    let store = SnapshotStore::open(Arc::new(StdFs), data_dir.path(), SnapshotOptions::default())
        .expect("snapshot store");

    // Apply stall: applies of single entries while a snapshot is taken vs. without.
    {
        let stop = AtomicBool::new(false);
        let baseline = std::thread::scope(|s| {
            let h = s.spawn(|| apply_latencies(&sm, &stop, sm.applied_index() + 1));
            std::thread::sleep(Duration::from_secs(2));
            stop.store(true, Ordering::SeqCst);
            h.join().expect("join")
        });
        report("apply latency, no snapshot", &baseline);
        stop.store(false, Ordering::SeqCst);
        let (during, created) = std::thread::scope(|s| {
            let h = s.spawn(|| apply_latencies(&sm, &stop, sm.applied_index() + 1));
            std::thread::sleep(Duration::from_millis(100));
            let t = Instant::now();
            let created = store.create(&sm).expect("create");
            eprintln!("  snapshot ran from +100ms for {:?}", t.elapsed());
            stop.store(true, Ordering::SeqCst);
            (h.join().expect("join"), created)
        });
        report("apply latency, during a snapshot", &during);
        eprintln!(
            "snapshot under load: {} keys, {} bytes, view open {:?} (applies held), copy {:?}, sync {:?}, {} keys saved copy-on-write",
            created.header.key_count,
            created.header.file_bytes,
            created.view_open,
            created.copy,
            created.sync,
            created.saved_keys
        );
    }

    // The walk alone (tree + side table, no file): the floor of snapshot creation.
    {
        let started = Instant::now();
        let view = sm.begin_snapshot().expect("view");
        let mut bytes = 0usize;
        for pair in view.pairs() {
            let (k, v) = pair.expect("pair");
            bytes += k.len() + v.len();
        }
        let took = started.elapsed();
        eprintln!(
            "snapshot walk only (no file): {:.3} s, {:.1} MB/s",
            took.as_secs_f64(),
            bytes as f64 / 1e6 / took.as_secs_f64()
        );
    }
    let probe = store.create(&sm).expect("create");
    let kv_bytes = probe.header.kv_bytes;
    let total = probe.view_open + probe.copy + probe.sync;
    eprintln!(
        "snapshot: {} keys, {:.1} MB of keys+values, {:.1} MB file; {:.0} keys/s, {:.1} MB/s",
        probe.header.key_count,
        kv_bytes as f64 / 1e6,
        probe.header.file_bytes as f64 / 1e6,
        probe.header.key_count as f64 / total.as_secs_f64(),
        kv_bytes as f64 / 1e6 / total.as_secs_f64()
    );

    let mut group = c.benchmark_group("snapshot");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Bytes(kv_bytes));
    let label = if keys == 1_000_000 {
        "1M_x_256B".to_string()
    } else {
        format!("{keys}_x_256B")
    };
    group.bench_function(format!("create_{label}"), |b| {
        b.iter(|| store.create(&sm).expect("create"))
    });
    let file = store.list().expect("list").pop().expect("a snapshot file");
    group.bench_function(format!("install_{label}"), |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().expect("tempdir");
                let target = open_sm(dir.path());
                (dir, target)
            },
            |(dir, target)| {
                store.install(&file, &target).expect("install");
                (dir, target)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, bench_apply, bench_snapshot);
criterion_main!(benches);
