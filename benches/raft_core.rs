//! The consensus core alone: three in-memory cores in one process, no I/O. Messages are handed
//! from one core to the next directly and every "fsync" completes at once, so this measures
//! the ceiling that consensus logic itself puts on committed proposals per second, with 1 and
//! with 256 proposals in flight, for 64-byte payloads, and with 256 in flight for 256-byte
//! and 4 KiB payloads: an entry's payload is shared, not copied, between the log, each `Ready`
//! and each `Append`, and the sizes show where that starts to pay (copying a small payload is
//! cheaper than counting references to it).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use raftkv::raft::{Config, Message, Raft, Role};
use raftkv::storage::Membership;
use std::collections::VecDeque;

const PAYLOAD_BYTES: usize = 64;
/// Payload sizes of the second group (256 in flight each).
const PAYLOAD_BYTES_SWEEP: [usize; 2] = [256, 4096];
/// Compact every node's log once this many entries are applied beyond the last compaction.
const COMPACT_EVERY: u64 = 10_000;

struct Cluster {
    nodes: Vec<Raft>,
    network: VecDeque<Message>,
    leader_applied: u64,
}

impl Cluster {
    fn new() -> Cluster {
        let membership = Membership::with_voters([1, 2, 3]);
        let nodes = (1..=3)
            .map(|id| Raft::bootstrap(Config::new(id), membership.clone(), 7).expect("bootstrap"))
            .collect();
        let mut c = Cluster {
            nodes,
            network: VecDeque::new(),
            leader_applied: 0,
        };
        while c.nodes[0].role() != Role::Leader {
            c.nodes[0].tick();
            c.pump();
        }
        c.pump();
        c
    }

    /// Runs every core until nothing moves: persist, send, deliver, apply.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for k in 0..self.nodes.len() {
                let node = &mut self.nodes[k];
                let rd = node.ready();
                if rd.is_empty() {
                    continue;
                }
                moved = true;
                if let Some(last) = rd.entries.last() {
                    node.persisted(last.index, last.term);
                }
                self.network.extend(rd.messages_now);
                self.network.extend(rd.messages_after_persist);
                if let Some(last) = rd.committed.last() {
                    let index = last.index;
                    node.applied(index);
                    if k == 0 {
                        self.leader_applied = index;
                    }
                    if index >= node.log().base_index() + 2 * COMPACT_EVERY {
                        let upto = index - COMPACT_EVERY;
                        let term = node.log().term(upto).expect("held");
                        node.compact(upto, term).expect("compact");
                    }
                }
            }
            while let Some(m) = self.network.pop_front() {
                moved = true;
                let to = (m.to - 1) as usize;
                self.nodes[to].step(m).expect("step");
            }
            if !moved {
                return;
            }
        }
    }

    /// Proposes `window` commands of `payload_bytes` each and runs until all are applied on
    /// the leader.
    fn round(&mut self, window: usize, payload_bytes: usize) {
        let mut last = 0;
        for _ in 0..window {
            let (index, _) = self.nodes[0]
                .propose(vec![7u8; payload_bytes])
                .expect("leader accepts");
            last = index;
        }
        while self.leader_applied < last {
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
            b.iter(|| cluster.round(w, PAYLOAD_BYTES));
        });
    }
    group.finish();
}

fn committed_proposals_by_payload(c: &mut Criterion) {
    let mut group = c.benchmark_group("raft_core_committed_proposals_256_in_flight");
    let window = 256usize;
    group.throughput(Throughput::Elements(window as u64));
    for payload_bytes in PAYLOAD_BYTES_SWEEP {
        group.bench_with_input(
            BenchmarkId::new("payload_bytes", payload_bytes),
            &payload_bytes,
            |b, &bytes| {
                let mut cluster = Cluster::new();
                b.iter(|| cluster.round(window, bytes));
            },
        );
    }
    group.finish();
}

criterion_group!(benches, committed_proposals, committed_proposals_by_payload);
criterion_main!(benches);
