//! A real `kill -9` test of a node's whole durable state ([`NodeStorage`]).
//!
//! The test binary re-invokes itself as a child (env `RAFTKV_KILL9_CHILD=<data dir>`) that
//! loops: append a batch to the WAL (commit = its last index, as a single-node cluster would),
//! print `acked <index>` once the append (write + fdatasync) returned, apply the committed
//! entries into sled, compact when due, and write a snapshot file every few compactions.
//! The parent SIGKILLs it at a seeded random moment, at least 50 times; after each kill it
//! reopens the storage (recovery) and checks it against a model:
//! - the applied index equals the WAL's last index and its commit index;
//! - every acknowledged entry survived (applied ≥ the last `acked`);
//! - the state is exactly the model after entries 1..=applied (none lost, none twice);
//! - the recovered index never goes back between rounds;
//! - every snapshot file verifies, and at most two are kept.
//!
//! `RAFTKV_KILL9_ROUNDS` overrides the 50 rounds; the seed is printed on failure.

use raftkv_storage::command::Command;
use raftkv_storage::node_storage::{NodeStorage, NodeStorageOptions};
use raftkv_storage::snapshot::SnapshotOptions;
use raftkv_storage::wal::WalOptions;
use raftkv_storage::{Entry, EntryKind, HardState};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::ops::Bound;
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const CHILD_ENV: &str = "RAFTKV_KILL9_CHILD";
const SEED: u64 = 0x006b_696c_6c39;
const KEYS: u64 = 1000;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn command_at(index: u64) -> Command {
    let r = mix(SEED ^ index);
    let key = format!("key-{:04}", r % KEYS).into_bytes();
    if r.is_multiple_of(7) {
        Command::Delete { key }
    } else {
        let mut value = format!("v{index}-").into_bytes();
        value.resize(100, b'.');
        Command::Put { key, value }
    }
}

fn opts() -> NodeStorageOptions {
    NodeStorageOptions {
        wal: WalOptions {
            segment_bytes_max: 64 * 1024,
            ..WalOptions::default()
        },
        snapshot: SnapshotOptions {
            keep: 2,
            chunk_target_bytes: 16 * 1024,
        },
        snapshot_every: 300,
        catchup_margin: 100,
        ..NodeStorageOptions::default()
    }
}

fn run_child(dir: &Path) -> ! {
    let mut s = NodeStorage::open(dir, opts()).unwrap();
    let mut compactions = 0u64;
    loop {
        let first = s.wal().last_index() + 1;
        let n = 1 + mix(first) % 32;
        let last = first + n - 1;
        let entries: Vec<Entry> = (first..=last)
            .map(|index| Entry {
                index,
                term: 1,
                kind: EntryKind::Normal,
                payload: command_at(index).encode().unwrap().into(),
            })
            .collect();
        let hs = HardState {
            term: 1,
            vote: Some(1),
            commit: last,
        };
        s.append(&entries, Some(&hs)).unwrap();
        println!("acked {last}");
        s.apply_committed(last).unwrap();
        if s.compaction_due() {
            s.compact(None).unwrap();
            compactions += 1;
            if compactions.is_multiple_of(4) {
                s.create_snapshot_file().unwrap();
            }
        }
    }
}

fn state(s: &NodeStorage) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let page = s
        .sm()
        .scan(Bound::Unbounded, Bound::Unbounded, 10_000)
        .unwrap();
    assert!(!page.value.more);
    page.value.pairs.into_iter().collect()
}

#[test]
fn kill_9_at_random_instants_never_loses_or_duplicates_a_committed_entry() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        run_child(Path::new(&dir));
    }
    let rounds: u64 = std::env::var("RAFTKV_KILL9_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut model = BTreeMap::new();
    let mut model_index = 0u64;
    let mut snapshots_seen = 0usize;
    for round in 0..rounds {
        let replay = format!(
            "seed {SEED:#x}, round {round}: replay with `cargo test -p raftkv-storage --test kill9`"
        );
        let mut child = Process::new(&exe)
            .args([
                "--exact",
                "kill_9_at_random_instants_never_loses_or_duplicates_a_committed_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("acked ") {
                    if tx.send(n.trim().parse::<u64>().unwrap()).is_err() {
                        break;
                    }
                }
            }
        });
        // Wait until the child is working (however slow the machine), then a seeded while.
        let mut acked = rx.recv_timeout(Duration::from_secs(300)).unwrap();
        std::thread::sleep(Duration::from_millis(mix(SEED + round) % 400));
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        while let Ok(n) = rx.try_recv() {
            acked = acked.max(n);
        }

        let s = NodeStorage::open(dir.path(), opts()).unwrap_or_else(|e| panic!("{replay}: {e}"));
        let applied = s.sm().applied_index();
        assert_eq!(applied, s.wal().last_index(), "{replay}");
        assert_eq!(applied, s.wal().hard_state().commit, "{replay}");
        assert!(
            applied >= acked,
            "{replay}: entry {acked} was acknowledged, only {applied} recovered"
        );
        assert!(
            applied >= model_index,
            "{replay}: recovered index went back from {model_index} to {applied}"
        );
        for index in model_index + 1..=applied {
            match command_at(index) {
                Command::Put { key, value } => {
                    model.insert(key, value);
                }
                Command::Delete { key } => {
                    model.remove(&key);
                }
                other => unreachable!("the workload writes only puts and deletes: {other:?}"),
            }
        }
        model_index = applied;
        assert!(
            state(&s) == model,
            "{replay}: state is not the model after 1..={applied}"
        );
        let files = s.snapshots().list().unwrap();
        assert!(files.len() <= 2, "{replay}: {} snapshot files", files.len());
        for f in &files {
            s.snapshots()
                .verify(f)
                .unwrap_or_else(|e| panic!("{replay}: {e}"));
        }
        snapshots_seen = snapshots_seen.max(files.len());
        eprintln!(
            "round {round}: acked {acked}, recovered {applied} (replayed {}), wal {}..={}, {} snapshot files",
            s.recovery().replayed_entries,
            s.wal().first_index(),
            s.wal().last_index(),
            files.len()
        );
    }
    assert!(snapshots_seen > 0, "no snapshot file was ever written");
}
