//! Filling a fresh state tree from a snapshot's pairs (snapshot install, backup restore, the
//! format-1 upgrade), as fast as sled 0.34 allows.
//!
//! Why it is built this way (figures: `storage/examples/install_timing.rs`, 1M keys × 256 B):
//! - sled costs ~10 µs of CPU per insert — node splits, page consolidation, its log — against
//!   < 0.5 µs for reading, checking and decoding a pair, so the fill is the install. It runs
//!   on worker threads ([`FillPool`]) while the caller reads and verifies the next pairs, and
//!   `Tree::insert` (which takes sled's concurrency lock shared) lets the workers fill at once;
//!   `apply_batch` would serialize them on its exclusive lock, and atomicity per batch buys
//!   nothing here: the tree is invisible until the pointer flip, and a crash before it drops
//!   the whole tree.
//! - A block of sorted pairs is inserted in three passes (pairs 0, 3, 6, …, then 1, 4, 7, …,
//!   then 2, 5, 8, …). sled splits a leaf past 16 entries into 8 + 9, rewriting both halves
//!   and the parent index node; fed in key order it splits every 8 keys and leaves every leaf
//!   half full. The first pass builds leaves of 8 spanning 24 keys, the second fills them to
//!   16 without a split, the third splits each once into two leaves of ~12. Bytes sled wrote
//!   for 1M keys (346 MB file), by order within a block: key order 2055 MiB (11.8 s CPU);
//!   sled `Batch`'s hash order 1611 MiB; evens then odds 1790 MiB; 3 passes 1415–1473 MiB
//!   (6.4–8.7 s CPU), the least of 2 to 8 passes.
//! - Pairs arrive in strictly increasing key order from a snapshot file (its reader checks
//!   it), so blocks never share a key and their order of insertion does not matter. The API
//!   takes any order: a key at or below the previous one waits for every block in flight
//!   first, so of two writes of one key the later still wins.
//!
//! Nothing here changes what is durable or when: [`TreeBuilder::finish`] waits for every insert
//! before it writes the bookkeeping, builds the indexes, flushes and flips the pointer.

use super::{
    data_key, record, write_meta, SmError, StateMachine, CURRENT_TREE_KEY, DATA_PREFIX, META_PREFIX,
};
use crate::types::SnapshotMeta;
use sled::IVec;
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Passes over a block (see [`insert_block`]).
const FILL_STRIDE: usize = 3;
/// Pairs handed to a fill worker at a time.
pub(super) const FILL_BLOCK_PAIRS: usize = 2048;
/// Blocks waiting for a worker, per worker, before the reader waits (bounds memory to
/// `(workers × this + workers)` blocks).
const BLOCKS_QUEUED_PER_WORKER: usize = 2;

type Block = Vec<(IVec, IVec)>;

/// Inserts one block of strictly increasing keys in [`FILL_STRIDE`] passes: every third
/// pair from the first, then from the second, then from the third (see the module doc).
fn insert_block(tree: &sled::Tree, block: Block) -> sled::Result<()> {
    for phase in 0..FILL_STRIDE {
        for (key, value) in block.iter().skip(phase).step_by(FILL_STRIDE) {
            tree.insert(key, value.clone())?;
        }
    }
    Ok(())
}

#[derive(Default)]
struct PoolState {
    queue: VecDeque<Block>,
    /// Blocks queued or being inserted.
    in_flight: usize,
    /// No more blocks: workers exit once the queue is empty.
    closed: bool,
    /// Stop now (an error, or the builder was dropped): workers exit at once.
    aborted: bool,
    /// The first insert error; later blocks are not inserted.
    error: Option<sled::Error>,
}

struct PoolShared {
    state: Mutex<PoolState>,
    changed: Condvar,
}

impl PoolShared {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Workers hold the lock only to move blocks and counters, never across a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, PoolState>) -> MutexGuard<'a, PoolState> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }
}

/// Worker threads inserting blocks into one tree. Zero workers: blocks are inserted by the
/// caller, in [`submit`](Self::submit).
struct FillPool {
    tree: sled::Tree,
    shared: Arc<PoolShared>,
    workers: Vec<JoinHandle<()>>,
}

impl FillPool {
    /// Starts up to `threads` workers (fewer if the OS refuses a thread: the fill then runs
    /// on fewer, or on the caller).
    fn start(tree: &sled::Tree, threads: usize) -> FillPool {
        let shared = Arc::new(PoolShared {
            state: Mutex::new(PoolState::default()),
            changed: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (tree, shared) = (tree.clone(), Arc::clone(&shared));
            match std::thread::Builder::new()
                .name(format!("sm-fill-{i}"))
                .spawn(move || fill_worker(&tree, &shared))
            {
                Ok(handle) => workers.push(handle),
                Err(e) => {
                    tracing::warn!(error = %e, started = workers.len(), "could not start a state tree fill thread; filling with fewer");
                    break;
                }
            }
        }
        FillPool {
            tree: tree.clone(),
            shared,
            workers,
        }
    }

    /// The first insert error, taken; an aborted pool whose error was already reported
    /// (or whose worker panicked) keeps refusing.
    fn take_error(state: &mut PoolState) -> Result<(), SmError> {
        match state.error.take() {
            Some(e) => Err(e.into()),
            None if state.aborted => Err(SmError::Sled(sled::Error::Io(std::io::Error::other(
                "the state tree fill stopped after an earlier failure",
            )))),
            None => Ok(()),
        }
    }

    /// Queues `block`, waiting while the queue is full; reports an earlier block's error.
    fn submit(&self, block: Block) -> Result<(), SmError> {
        if self.workers.is_empty() {
            return Ok(insert_block(&self.tree, block)?);
        }
        let queued_max = self.workers.len() * BLOCKS_QUEUED_PER_WORKER;
        let mut state = self.shared.lock();
        while state.queue.len() >= queued_max && !state.aborted {
            state = self.shared.wait(state);
        }
        Self::take_error(&mut state)?;
        assert!(!state.closed, "invariant: blocks go to a live pool");
        state.queue.push_back(block);
        state.in_flight += 1;
        drop(state);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits until every block submitted so far is inserted; reports the first error.
    fn wait_idle(&self) -> Result<(), SmError> {
        let mut state = self.shared.lock();
        while state.in_flight > 0 && !state.aborted {
            state = self.shared.wait(state);
        }
        Self::take_error(&mut state)
    }

    /// Stops the workers (at once if `abort`, else once the queue is empty) and joins them.
    fn stop(&mut self, abort: bool) {
        {
            let mut state = self.shared.lock();
            state.closed = true;
            state.aborted |= abort;
        }
        self.shared.changed.notify_all();
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                tracing::error!("a state tree fill thread panicked");
            }
        }
    }
}

impl Drop for FillPool {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// Aborts the pool if its worker unwinds, so that nobody waits for its block forever.
struct AbortOnPanic<'a>(&'a PoolShared);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock().aborted = true;
            self.0.changed.notify_all();
        }
    }
}

fn fill_worker(tree: &sled::Tree, shared: &PoolShared) {
    let _abort_on_panic = AbortOnPanic(shared);
    loop {
        let block = {
            let mut state = shared.lock();
            loop {
                if state.aborted {
                    return;
                }
                if let Some(block) = state.queue.pop_front() {
                    break block;
                }
                if state.closed {
                    return;
                }
                state = shared.wait(state);
            }
        };
        // Room in the queue for the reader.
        shared.changed.notify_all();
        let result = insert_block(tree, block);
        let mut state = shared.lock();
        state.in_flight -= 1;
        if let Err(e) = result {
            state.error.get_or_insert(e);
            state.aborted = true;
        }
        drop(state);
        shared.changed.notify_all();
    }
}

/// A fresh state tree being filled from a snapshot. Dropped unfinished, it is removed.
pub struct TreeBuilder<'a> {
    sm: &'a StateMachine,
    tree: sled::Tree,
    name: Vec<u8>,
    /// Pairs not yet handed to the pool, keys strictly increasing.
    block: Block,
    /// The last key added since the last wait for the pool (keys above it need no wait).
    run_last: Option<IVec>,
    /// Started with the first full block: a small snapshot never starts threads.
    pool: Option<FillPool>,
    threads: usize,
    key_count: u64,
    finished: bool,
}

impl TreeBuilder<'_> {
    pub(super) fn new(
        sm: &StateMachine,
        tree: sled::Tree,
        name: Vec<u8>,
        threads: usize,
    ) -> TreeBuilder<'_> {
        TreeBuilder {
            sm,
            tree,
            name,
            block: Vec::with_capacity(FILL_BLOCK_PAIRS),
            run_last: None,
            pool: None,
            threads,
            key_count: 0,
            finished: false,
        }
    }

    /// Adds one pair of a format-2 snapshot: an internal key and its record, as
    /// [`SnapshotView::pairs`](super::SnapshotView::pairs) gave them (in any order; snapshot
    /// order, key order, is the fast one).
    pub fn insert(&mut self, key: &[u8], value: &[u8]) -> Result<(), SmError> {
        if key.first() == Some(&META_PREFIX) || key.is_empty() {
            return Err(SmError::Record(format!(
                "a snapshot pair with key {:?} outside the state",
                String::from_utf8_lossy(&key[..key.len().min(32)])
            )));
        }
        self.insert_raw(key, value)
    }

    /// Adds one pair of a format-1 snapshot (a user key and its raw value), as a key
    /// created and last written at `revision` (the snapshot's index).
    pub fn insert_v1(&mut self, key: &[u8], value: &[u8], revision: u64) -> Result<(), SmError> {
        let meta = record::KeyMeta {
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            lease: 0,
        };
        self.insert_raw(&data_key(key), &record::encode_key(&meta, value))
    }

    /// Adds one pair read from a snapshot file of `format_version` at `snapshot_index`.
    pub fn insert_snapshot_pair(
        &mut self,
        format_version: u32,
        snapshot_index: u64,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), SmError> {
        if format_version == 1 {
            self.insert_v1(key, value, snapshot_index)
        } else {
            self.insert(key, value)
        }
    }

    fn insert_raw(&mut self, key: &[u8], value: &[u8]) -> Result<(), SmError> {
        if self
            .run_last
            .as_ref()
            .is_some_and(|last| key <= last.as_ref())
        {
            // Out of order: everything before must be in before this goes in.
            self.send_block()?;
            if let Some(pool) = &self.pool {
                pool.wait_idle()?;
            }
        }
        let key = IVec::from(key);
        self.run_last = Some(key.clone());
        if key.first() == Some(&DATA_PREFIX) {
            self.key_count += 1;
        }
        self.block.push((key, IVec::from(value)));
        if self.block.len() >= FILL_BLOCK_PAIRS {
            self.send_block()?;
        }
        Ok(())
    }

    /// Hands the pending pairs to the pool (started on first use).
    fn send_block(&mut self) -> Result<(), SmError> {
        if self.block.is_empty() {
            return Ok(());
        }
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(FILL_BLOCK_PAIRS));
        let (tree, threads) = (&self.tree, self.threads);
        self.pool
            .get_or_insert_with(|| FillPool::start(tree, threads))
            .submit(block)
    }

    /// Inserts what is pending and waits for every insert; stops the workers.
    fn drain(&mut self) -> Result<(), SmError> {
        match self.pool.take() {
            None => Ok(insert_block(&self.tree, std::mem::take(&mut self.block))?),
            Some(mut pool) => {
                let block = std::mem::take(&mut self.block);
                let result = if block.is_empty() {
                    Ok(())
                } else {
                    pool.submit(block)
                };
                let result = result.and_then(|()| pool.wait_idle());
                pool.stop(result.is_err());
                result
            }
        }
    }

    /// User keys added so far (session records are not counted).
    pub fn key_count(&self) -> u64 {
        self.key_count
    }

    /// Makes the new tree durable with `meta` as its applied position, then atomically makes
    /// it the state: build its indexes, flush, flip the current-tree pointer, flush, drop the
    /// old tree. A tree whose indexes cannot be built (damaged records) is refused before the
    /// pointer moves, so the node keeps its old state whole, on disk and in memory.
    pub fn finish(mut self, meta: &SnapshotMeta) -> Result<(), SmError> {
        let applied = self.sm.applied_index();
        if meta.index < applied {
            return Err(SmError::InstallBehind {
                snapshot_index: meta.index,
                applied_index: applied,
            });
        }
        self.drain()?;
        write_meta(&self.tree, meta)?;
        let sm = self.sm;
        let damaged = |what| SmError::Record(format!("snapshot at index {}: {what}", meta.index));
        let indexes = sm.load_indexes(&self.tree, meta.index, damaged)?;
        sm.db.flush()?;
        let old_name = {
            let mut cur = sm.write_current();
            sm.db.insert(CURRENT_TREE_KEY, self.name.clone())?;
            // The pointer names the new tree now: it must not be dropped, and memory follows
            // it even if the flush below fails.
            self.finished = true;
            let old_name = std::mem::replace(&mut cur.tree_name, self.name.clone());
            cur.tree = self.tree.clone();
            cur.applied = meta.clone();
            cur.set_indexes(indexes);
            sm.db.flush()?;
            old_name
        };
        // Dropping the old tree runs outside the apply lock. A snapshot view may still walk
        // it: then it is dropped at the next open instead.
        if sm.lock_cow().is_none() {
            sm.db.drop_tree(&old_name)?;
        }
        tracing::info!(
            index = meta.index,
            term = meta.term,
            keys = self.key_count,
            "installed a snapshot into the state machine"
        );
        Ok(())
    }
}

impl Drop for TreeBuilder<'_> {
    fn drop(&mut self) {
        // Workers first: none may insert into the tree once it is dropped.
        if let Some(mut pool) = self.pool.take() {
            pool.stop(true);
        }
        if !self.finished {
            if let Err(e) = self.sm.db.drop_tree(&self.name) {
                tracing::warn!(error = %e, "could not drop an unfinished state tree; it is dropped at the next open");
            }
        }
    }
}
