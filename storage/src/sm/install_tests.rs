//! The threaded fill of a fresh state tree (`install.rs`) against the serial one: same tree,
//! same key count, last write wins for keys given out of order, and a file damaged in the
//! middle of a fill with its workers running still leaves the old state whole.

use super::install::FILL_BLOCK_PAIRS;
use super::*;
use crate::snapshot::{SnapshotError, SnapshotOptions, SnapshotStore};
use crate::vfs::{SimFs, Vfs};
use std::collections::BTreeMap;
use std::sync::Arc;

fn open_with_threads(dir: &Path, install_threads: usize) -> StateMachine {
    let opts = StateMachineOptions {
        install_threads,
        ..StateMachineOptions::default()
    };
    crate::test_util::retry_sled_lock(|| StateMachine::open(dir, opts.clone())).unwrap()
}

/// A deterministic xorshift stream (the tests are seeded, never random).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `n` format-2 pairs in key order, values of 0–300 bytes.
fn sorted_pairs(n: usize, seed: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|i| {
            let len = (rng.next() % 301) as usize;
            let value: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            snapshot_pair(format!("key-{i:08}").as_bytes(), &value, 77)
        })
        .collect()
}

fn meta_at(index: u64) -> SnapshotMeta {
    SnapshotMeta {
        index,
        term: 3,
        membership: Membership::with_voters([1, 2, 3]),
    }
}

/// Every pair of the current tree, bookkeeping included.
fn whole_tree(sm: &StateMachine) -> Vec<(IVec, IVec)> {
    sm.read_current().tree.iter().map(Result::unwrap).collect()
}

/// State trees in the database (an unfinished install's would be one too many).
fn state_trees(sm: &StateMachine) -> Vec<IVec> {
    sm.db
        .tree_names()
        .into_iter()
        .filter(|n| n.starts_with(TREE_NAME_PREFIX))
        .collect()
}

#[test]
fn a_threaded_fill_builds_the_same_tree_as_a_serial_one() {
    let pairs = sorted_pairs(3 * FILL_BLOCK_PAIRS + 17, 0x5eed);
    let mut trees = Vec::new();
    for threads in [0, 1, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let sm = open_with_threads(dir.path(), threads);
        let mut builder = sm.begin_install().unwrap();
        for (k, v) in &pairs {
            builder.insert(k, v).unwrap();
        }
        assert_eq!(builder.key_count(), pairs.len() as u64, "{threads} threads");
        builder.finish(&meta_at(500)).unwrap();
        assert_eq!(sm.applied(), meta_at(500));
        let tree = whole_tree(&sm);
        let data: Vec<(Vec<u8>, Vec<u8>)> = tree
            .iter()
            .filter(|(k, _)| k.first() == Some(&DATA_PREFIX))
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(data, pairs, "{threads} threads");
        assert_eq!(state_trees(&sm).len(), 1);
        trees.push(tree);
    }
    assert!(trees.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn keys_given_out_of_order_keep_the_last_write() {
    // Runs of increasing keys, each longer than a block, that go back and rewrite keys of
    // the runs before: with the fill on two workers, the later value must still win.
    let mut rng = Rng(0xdecade);
    let mut model = BTreeMap::new();
    let mut given = Vec::new();
    for run in 0..4u64 {
        let start = rng.next() % 3000;
        for i in start..start + FILL_BLOCK_PAIRS as u64 + 500 {
            let (k, v) = snapshot_pair(format!("k{i:06}").as_bytes(), &run.to_le_bytes(), 9);
            model.insert(k.clone(), v.clone());
            given.push((k, v));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let sm = open_with_threads(dir.path(), 2);
    let mut builder = sm.begin_install().unwrap();
    for (k, v) in &given {
        builder.insert(k, v).unwrap();
    }
    builder.finish(&meta_at(9)).unwrap();
    let data: BTreeMap<Vec<u8>, Vec<u8>> = whole_tree(&sm)
        .into_iter()
        .filter(|(k, _)| k.first() == Some(&DATA_PREFIX))
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(data, model);
}

#[test]
fn a_file_damaged_mid_fill_is_refused_and_the_old_state_kept() {
    let sim = SimFs::new();
    let vfs: Arc<dyn Vfs> = Arc::new(sim.clone());
    let store = SnapshotStore::open(
        vfs,
        Path::new("/data"),
        SnapshotOptions {
            keep: 2,
            chunk_target_bytes: 16 * 1024,
        },
    )
    .unwrap();
    let src_dir = tempfile::tempdir().unwrap();
    let src = open_with_threads(src_dir.path(), 2);
    let keys = 4 * FILL_BLOCK_PAIRS as u64;
    let entries: Vec<Entry> = (1..=keys)
        .map(|i| tests::put(i, 1, format!("key-{i:08}").as_bytes(), &[b'v'; 100]))
        .collect();
    src.apply(&entries).unwrap();
    let created = store.create(&src).unwrap();
    let good = sim.read(&created.file.path).unwrap();

    let dst_dir = tempfile::tempdir().unwrap();
    let dst = open_with_threads(dst_dir.path(), 2);
    dst.apply(&[tests::put(1, 1, b"mine", b"1")]).unwrap();
    let before = whole_tree(&dst);
    // Damage past the first blocks (workers busy by then), and at the very end (every pair
    // read, the body CRC or the end chunk refuses it).
    for at in [good.len() * 3 / 4, good.len() - 3] {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        sim.overwrite(&created.file.path, bad).unwrap();
        let err = store.install(&created.file, &dst).expect_err("damaged");
        assert!(matches!(err, SnapshotError::Format { .. }), "{err}");
        assert_eq!(whole_tree(&dst), before, "damage at {at}");
        assert_eq!(dst.applied_index(), 1);
        assert_eq!(state_trees(&dst).len(), 1, "the unfinished tree is dropped");
    }
    sim.overwrite(&created.file.path, good).unwrap();
    store.install(&created.file, &dst).unwrap();
    assert_eq!(dst.applied_index(), keys);
    let read = dst.get(format!("key-{keys:08}").as_bytes()).unwrap();
    assert_eq!(read.value, Some(vec![b'v'; 100]));
}
