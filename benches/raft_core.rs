//! The consensus core alone: three in-memory cores in one process (`raftkv::raft::harness`),
//! no I/O. Messages are handed from one core to the next directly and every "fsync" completes
//! at once (in memory), so this measures the ceiling that consensus logic itself puts on
//! committed proposals per second, with 1 and with 256 proposals in flight.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use raftkv::raft::harness;
use raftkv::raft::{Config, Raft, Role};

const PAYLOAD_BYTES: usize = 64;
/// Compact every node's log once this many entries are applied beyond the last compaction.
const COMPACT_EVERY: u64 = 10_000;
const IDS: [u64; 3] = [1, 2, 3];
/// The node that is elected and takes the proposals.
const LEADER: u64 = 1;

struct Cluster {
    h: harness::Cluster,
}

impl Cluster {
    fn new() -> Cluster {
        let configs = IDS.into_iter().map(Config::new).collect();
        let h = harness::Cluster::bootstrap(configs, 7, ()).expect("bootstrap");
        let mut c = Cluster { h };
        while c.leader().role() != Role::Leader {
            c.h.raft_mut(LEADER).tick();
            c.pump();
        }
        c.pump();
        c
    }

    fn leader(&self) -> &Raft {
        self.h.raft(LEADER).expect("the leader is up")
    }

    /// Runs every core until nothing moves: one `Ready` from each (persist, send, apply),
    /// then every queued message stepped, again and again.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for id in IDS {
                if self.h.process_one(id) {
                    moved = true;
                    self.maybe_compact(id);
                }
            }
            while let Some(envelope) = self.h.network_mut().pop_front() {
                moved = true;
                self.h.hand_over(envelope);
            }
            if !moved {
                return;
            }
        }
    }

    fn maybe_compact(&mut self, id: u64) {
        let raft = self.h.raft(id).expect("up");
        let applied = raft.applied_index();
        if applied >= raft.log().base_index() + 2 * COMPACT_EVERY {
            self.h
                .compact(id, applied - COMPACT_EVERY)
                .expect("compact");
        }
    }

    /// Proposes `window` commands and runs until all are applied on the leader.
    fn round(&mut self, window: usize) {
        let mut last = 0;
        for _ in 0..window {
            let (index, _) = self
                .h
                .raft_mut(LEADER)
                .propose(vec![7u8; PAYLOAD_BYTES])
                .expect("leader accepts");
            last = index;
        }
        while self.leader().applied_index() < last {
            self.pump();
        }
    }
}

fn committed_proposals(c: &mut Criterion) {
    let mut group = c.benchmark_group("raft_core_committed_proposals");
    for window in [1usize, 256] {
        group.throughput(Throughput::Elements(window as u64));
        group.bench_with_input(BenchmarkId::new("in_flight", window), &window, |b, &w| {
            let mut cluster = Cluster::new();
            b.iter(|| cluster.round(w));
        });
    }
    group.finish();
}

criterion_group!(benches, committed_proposals);
criterion_main!(benches);
