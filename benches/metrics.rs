//! What the metrics cost on the write path (issue 14: "cheap on the hot path").
//!
//! Per client request a node records one `raftkv_http_requests_total` increment and one
//! `raftkv_http_request_duration_seconds` observation (`observe_http`); per peer frame one
//! counter add; per group commit and per apply batch one histogram observation. These benches
//! time each, single-threaded and with two threads contending for the same series (the
//! worst case: every request hits one route). Compare with a write's CPU cost of tens of
//! microseconds (BENCHMARKS.md, "Metrics (issue 14)").
//!
//! Run: `cargo bench --bench metrics` (about 30 s).

use criterion::{criterion_group, criterion_main, Criterion};
use raftkv::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;

fn per_request(c: &mut Criterion) {
    let m = Metrics::new([2, 3]);
    let took = Duration::from_micros(700);
    let mut g = c.benchmark_group("metrics");
    g.bench_function("observe_http", |b| {
        b.iter(|| m.observe_http("PUT /kv/{key}", 200, took))
    });
    let peer = m.peer(2).unwrap().sent_bytes.clone();
    g.bench_function("peer_bytes_inc", |b| b.iter(|| peer.inc_by(512)));
    g.bench_function("fsync_histogram_observe", |b| {
        b.iter(|| m.wal_fsync_duration.observe(150e-6))
    });
    g.bench_function("encode_scrape", |b| b.iter(|| m.encode().len()));
    // Another thread records the same series all the time.
    let shared = Arc::new(Metrics::new([2, 3]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                shared.observe_http("PUT /kv/{key}", 200, took);
            }
        })
    };
    g.bench_function("observe_http_contended", |b| {
        b.iter(|| shared.observe_http("PUT /kv/{key}", 200, took))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    other.join().unwrap();
    g.finish();
}

criterion_group!(benches, per_request);
criterion_main!(benches);
