//! Tests, rather than assumes, what sled 0.34 guarantees after a crash: the recovered state is
//! exactly the state after some *prefix of its batches* (never a torn batch, never a later
//! batch without an earlier one), the applied index stored in the same batch agrees with the
//! data, and everything before a returned `flush()` survives.
//!
//! The test binary re-invokes itself as a child (env `RAFTKV_SLED_CRASH_CHILD=<dir>`) that
//! applies deterministic batches through [`StateMachine::apply`] forever, calling `flush()`
//! now and then and printing `flushed <index>` after it returns. The parent kills it with
//! SIGKILL at a seeded random moment, reopens the database and checks the guarantee against a
//! model rebuilt from the same deterministic batches; then it starts the next child on the
//! same directory, which continues from the recovered index.

use raftkv_storage::command::Command;
use raftkv_storage::sm::{StateMachine, StateMachineOptions};
use raftkv_storage::{Entry, EntryKind};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::ops::Bound;
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const CHILD_ENV: &str = "RAFTKV_SLED_CRASH_CHILD";
const SEED: u64 = 0x5eed_0034;
const ROUNDS: u64 = 8;
const KEYS: u64 = 700;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The command at log index `index` (a pure function of the seed and the index).
fn command_at(index: u64) -> Command {
    let r = mix(SEED ^ index.wrapping_mul(0x100_0000_01b3));
    let key = format!("key-{:04}", r % KEYS).into_bytes();
    if r.is_multiple_of(5) {
        Command::Delete { key }
    } else {
        let mut value = format!("v{index}-").into_bytes();
        value.resize(64 + (r >> 32) as usize % 400, b'x');
        Command::Put { key, value }
    }
}

/// The size of the batch that starts at `first_index` (1..=64).
fn batch_len_at(first_index: u64) -> u64 {
    1 + mix(SEED.rotate_left(17) ^ first_index) % 64
}

fn entry_at(index: u64) -> Entry {
    Entry {
        index,
        term: 1 + index / 10_000,
        kind: EntryKind::Normal,
        payload: command_at(index).encode().unwrap().into(),
    }
}

fn open(dir: &Path) -> StateMachine {
    StateMachine::open(dir, StateMachineOptions::default()).unwrap()
}

fn run_child(dir: &Path) -> ! {
    let sm = open(dir);
    let mut next = sm.applied_index() + 1;
    let mut batches = 0u64;
    loop {
        let len = batch_len_at(next);
        let batch: Vec<Entry> = (next..next + len).map(entry_at).collect();
        sm.apply(&batch).unwrap();
        next += len;
        batches += 1;
        if batches.is_multiple_of(200) {
            let durable = sm.flush().unwrap();
            println!("flushed {}", durable.index);
        }
    }
}

fn all_pairs(sm: &StateMachine) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let lower = match &after {
            Some(k) => Bound::Excluded(k.as_slice()),
            None => Bound::Unbounded,
        };
        let page = sm.scan(lower, Bound::Unbounded, 10_000).unwrap();
        after = page.value.pairs.last().map(|(k, _)| k.clone());
        out.extend(page.value.pairs);
        if !page.value.more {
            return out;
        }
    }
}

#[test]
fn sled_recovers_a_prefix_of_its_batches_after_sigkill() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        run_child(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    // Batch boundaries, as the children cut them: every recovered index must be one.
    let mut boundaries = BTreeSet::from([0u64]);
    let mut previous_applied = 0;
    for round in 0..ROUNDS {
        let mut child = Process::new(&exe)
            .args([
                "--exact",
                "sled_recovers_a_prefix_of_its_batches_after_sigkill",
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
                if let Some(n) = line.strip_prefix("flushed ") {
                    if tx.send(n.trim().parse::<u64>().unwrap()).is_err() {
                        break;
                    }
                }
            }
        });
        // Wait for one explicit flush (so the round has durable progress however slow the
        // machine is), then let the child run a seeded while longer: background flushes
        // (every 500 ms) and more explicit ones land at unknown points.
        let mut flushed = rx.recv_timeout(Duration::from_secs(300)).unwrap();
        std::thread::sleep(Duration::from_millis(mix(SEED + round) % 1200));
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        while let Ok(n) = rx.try_recv() {
            flushed = flushed.max(n);
        }

        let sm = open(dir.path());
        let applied = sm.applied();
        // Rebuild the batch boundaries the children used up to here.
        let mut at = *boundaries.iter().next_back().unwrap();
        while at < applied.index {
            at += batch_len_at(at + 1);
            boundaries.insert(at);
        }
        let replay = format!(
            "seed {SEED:#x}, round {round}: replay with `cargo test -p raftkv-storage --test sled_crash`"
        );
        assert!(
            boundaries.contains(&applied.index),
            "{replay}: applied index {} is inside a batch: a torn batch was recovered",
            applied.index
        );
        assert!(
            applied.index >= flushed,
            "{replay}: flush() returned at index {flushed} but only {} survived",
            applied.index
        );
        assert!(
            applied.index >= previous_applied,
            "{replay}: recovered index went back from {previous_applied} to {}",
            applied.index
        );
        assert_eq!(applied.term, 1 + applied.index / 10_000, "{replay}");
        let mut model = BTreeMap::new();
        for index in 1..=applied.index {
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
        assert!(
            all_pairs(&sm) == model,
            "{replay}: the data is not the state after batches 1..={}",
            applied.index
        );
        previous_applied = applied.index;
        eprintln!(
            "round {round}: recovered index {} (last explicit flush {flushed})",
            applied.index
        );
    }
}
