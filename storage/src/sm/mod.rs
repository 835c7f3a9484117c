//! The key-value state machine: committed log entries applied into sled 0.34.
//!
//! Layout (one sled `Db` in `<data-dir>/sm/`):
//! - The default tree holds one key, `raftkv/current-tree`, naming the tree that holds the
//!   state now (`kv.<generation:016x>`). Installing a snapshot builds the next generation's
//!   tree beside it, makes it durable, then flips this pointer: the swap is one atomic sled
//!   insert, so a crash leaves either the old state or the new one, never a mix.
//! - In the state tree, user key `k` is stored as `d` ‖ `k`, its value as a record carrying its
//!   revisions (see [`record`]); the session table lives under `s` ‖ client id and
//!   `c/sessions` (see [`sessions`]); bookkeeping lives under `m/`:
//!   `m/format` (u32 BE, [`SM_FORMAT_VERSION`]), `m/applied` (index u64 BE ‖ term u64 BE) and
//!   `m/membership` (the codec-encoded [`Membership`]). Every [`StateMachine::apply`] writes
//!   its data changes *and* `m/applied` (and `m/membership` when a Config entry is among them)
//!   in one `Tree::apply_batch`, which sled recovers atomically: data and applied index can
//!   never disagree after a crash.
//!
//! Everything but `m/` is the state a snapshot carries: a snapshot file (format 2) holds
//! these internal keys and records as they are, so revisions and sessions travel with it and
//! installing one is a straight copy. Commands run through [`exec`].
//!
//! Format 1 (round 1: raw values, no revisions, no sessions) is upgraded on open into a new
//! tree generation, as an install is: every key gets `create_revision = mod_revision =` the
//! applied index and `version = 1`, the only history that state still knows.
//!
//! Durability: sled does not fsync each batch (it flushes every `flush_every_ms`, 500 ms by
//! default). The WAL is the source of truth; after a crash sled recovers a *prefix* of its
//! batches (tested in `tests/sled_crash.rs`), and recovery replays the WAL from sled's applied
//! index. [`StateMachine::flush`] makes everything applied so far durable and says up to where.
//!
//! Concurrency: one thread applies; any number read. `current` is a `RwLock`: an apply holds
//! it for writing while it builds and applies its batch, so a read sees the data and the
//! applied index of one moment and can say which index it reflects. A snapshot's consistent
//! view comes from the copy-on-write side table in [`cow`].
//!
//! Invariants:
//! - The applied index only grows through `apply` (by exactly the entries applied, no gaps)
//!   and is replaced only by `install`.
//! - At most one snapshot view is open at a time.

mod cow;
pub mod exec;
pub mod history;
mod install;
pub mod leases;
pub mod record;
pub mod sessions;

use crate::command::{CommandError, CommandRef, CommandResult, KeyRecord};
use crate::types::{Entry, EntryKind, Membership, SnapshotMeta};
use cow::CowTable;
use exec::{data_key, Exec, DATA_PREFIX};
use history::{ChangeEvent, Compacted, HistoryPage, HistoryState, KeyFilter};
use leases::{LeaseIndex, LeaseInfo};
use sessions::SessionIndex;
use sled::IVec;
use std::collections::VecDeque;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

pub use install::TreeBuilder;

/// The version of the layout inside a state tree.
pub const SM_FORMAT_VERSION: u32 = 2;
/// Round 1's layout: raw values without revisions. Upgraded on open.
const SM_FORMAT_V1: u32 = 1;

const CURRENT_TREE_KEY: &[u8] = b"raftkv/current-tree";
const TREE_NAME_PREFIX: &[u8] = b"kv.";
/// The first key past every data key.
const DATA_END: &[u8] = b"e";
const META_FORMAT: &[u8] = b"m/format";
const META_APPLIED: &[u8] = b"m/applied";
const META_MEMBERSHIP: &[u8] = b"m/membership";
/// The prefix byte of bookkeeping keys, which snapshots leave out.
const META_PREFIX: u8 = b'm';

/// Tuning of the state machine.
#[derive(Clone, Debug)]
pub struct StateMachineOptions {
    /// sled's background flush period; `None` flushes only on [`StateMachine::flush`].
    pub flush_every_ms: Option<u64>,
    /// sled's page cache size in bytes.
    pub cache_bytes: u64,
    /// The most pairs one scan returns, whatever the caller asks.
    pub scan_limit_max: usize,
    /// The most bytes of old values the snapshot side table holds before applies wait for
    /// the snapshot copy to finish.
    pub cow_bytes_max: usize,
    /// Live pairs a snapshot walk reads per side-table lookup (see [`SnapshotPairs`]).
    pub snapshot_block_pairs: usize,
    /// Threads inserting a snapshot's pairs into sled while the caller reads the file (see
    /// `sm/install.rs`); 0 (the default) inserts on the caller's thread. Two threads install
    /// ~1.3× faster on an idle 2-core machine but take both cores while they run, which
    /// starved the other nodes of a test cluster sharing them into elections.
    pub install_threads: usize,
    /// Revisions of watch history kept (see [`history`]).
    pub watch_history_revisions: u64,
    /// Bytes of watch history kept at most (see [`history`]).
    pub watch_history_bytes_max: u64,
}

impl Default for StateMachineOptions {
    fn default() -> Self {
        StateMachineOptions {
            flush_every_ms: Some(500),
            cache_bytes: 1024 * 1024 * 1024,
            scan_limit_max: 10_000,
            cow_bytes_max: 256 * 1024 * 1024,
            snapshot_block_pairs: 512,
            install_threads: 0,
            watch_history_revisions: history::HISTORY_REVISIONS_DEFAULT,
            watch_history_bytes_max: history::HISTORY_BYTES_DEFAULT,
        }
    }
}

/// A state-machine failure.
#[derive(Debug, thiserror::Error)]
pub enum SmError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("entry {index}: {source}")]
    Command {
        index: u64,
        #[source]
        source: CommandError,
    },
    #[error("entry {index}: undecodable membership: {source}")]
    Membership {
        index: u64,
        #[source]
        source: crate::types::MembershipError,
    },
    #[error("state machine record: {0}")]
    Record(String),
    #[error("entries must follow the applied index {applied} without a gap, got index {next}")]
    Gap { applied: u64, next: u64 },
    #[error("state machine in {dir} is corrupt: {what}")]
    Corrupt { dir: PathBuf, what: String },
    #[error("a snapshot is already being taken")]
    SnapshotInProgress,
    #[error("cannot install a snapshot at index {snapshot_index} below the applied index {applied_index}")]
    InstallBehind {
        snapshot_index: u64,
        applied_index: u64,
    },
}

/// A read result and the applied index whose state it shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadAt<T> {
    pub value: T,
    pub applied_index: u64,
}

/// One page of an ordered scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanPage {
    /// Pairs in key order.
    pub pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether more pairs lie in the range past the last one returned.
    pub more: bool,
}

/// What applying one entry did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryOutcome {
    Command(CommandResult),
    Noop,
    Config(Membership),
}

/// A lease, up to the asked number of its keys (in key order), and whether it has more.
pub type LeaseKeys = (LeaseInfo, Vec<Vec<u8>>, bool);

/// What one [`StateMachine::apply_with_events`] did: each entry's outcome and the changes to
/// user keys, in revision order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedBatch {
    pub entries: Vec<AppliedEntry>,
    pub events: Vec<ChangeEvent>,
}

/// One applied entry and its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedEntry {
    pub index: u64,
    pub term: u64,
    pub outcome: EntryOutcome,
}

/// The in-memory indexes built from one state tree.
struct Indexes {
    sessions: SessionIndex,
    leases: LeaseIndex,
    history: HistoryState,
}

impl Current {
    /// Makes `indexes` (built from `self.tree`) the ones in use.
    fn set_indexes(&mut self, indexes: Indexes) {
        self.sessions = indexes.sessions;
        self.leases = indexes.leases;
        self.history = indexes.history;
    }
}

#[derive(Debug)]
struct Current {
    tree: sled::Tree,
    tree_name: Vec<u8>,
    /// The applied position and the membership as of it.
    applied: SnapshotMeta,
    sessions: SessionIndex,
    leases: LeaseIndex,
    history: HistoryState,
}

/// The sled-backed key-value state machine. See the module doc.
#[derive(Debug)]
pub struct StateMachine {
    db: sled::Db,
    dir: PathBuf,
    opts: StateMachineOptions,
    created: bool,
    current: RwLock<Current>,
    cow: Mutex<Option<CowTable>>,
    cow_released: Condvar,
}

fn encode_applied(index: u64, term: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&index.to_be_bytes());
    b[8..].copy_from_slice(&term.to_be_bytes());
    b
}

fn tree_name(generation: u64) -> Vec<u8> {
    let mut name = TREE_NAME_PREFIX.to_vec();
    name.extend_from_slice(format!("{generation:016x}").as_bytes());
    name
}

fn tree_generation(name: &[u8]) -> Option<u64> {
    let hex = name.strip_prefix(TREE_NAME_PREFIX)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// The first key after every key starting with `prefix`, or `None` if there is none.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A decoded entry; a command's key and value point into the entry's payload.
enum Op<'a> {
    Command(crate::command::Proposal<'a>),
    Noop,
    Config(Membership),
}

/// Session table figures, for the leader's expiry decisions and for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionsSummary {
    pub count: u64,
    pub oldest_active_ms: Option<u64>,
    pub params: record::SessionParams,
}

impl StateMachine {
    /// Opens (or creates) the state machine in `dir`.
    pub fn open(dir: &Path, opts: StateMachineOptions) -> Result<StateMachine, SmError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(opts.cache_bytes)
            .flush_every_ms(opts.flush_every_ms)
            .open()?;
        Self::from_db(db, dir, opts)
    }

    /// A state machine in a temporary sled database, removed when dropped: the HTTP tests'
    /// stand-in service applies its writes through the real state machine with it.
    pub fn open_temporary(opts: StateMachineOptions) -> Result<StateMachine, SmError> {
        let db = sled::Config::new()
            .temporary(true)
            .cache_capacity(opts.cache_bytes)
            .flush_every_ms(None)
            .open()?;
        Self::from_db(db, Path::new("(temporary)"), opts)
    }

    fn from_db(
        db: sled::Db,
        dir: &Path,
        opts: StateMachineOptions,
    ) -> Result<StateMachine, SmError> {
        let corrupt = |what: String| SmError::Corrupt {
            dir: dir.to_path_buf(),
            what,
        };
        let (current, created, format) = match db.get(CURRENT_TREE_KEY)? {
            None => {
                let name = tree_name(1);
                db.drop_tree(&name)?;
                let tree = db.open_tree(&name)?;
                let applied = SnapshotMeta::default();
                write_meta(&tree, &applied)?;
                db.flush()?;
                db.insert(CURRENT_TREE_KEY, name.clone())?;
                db.flush()?;
                (
                    Current {
                        tree,
                        tree_name: name,
                        applied,
                        sessions: SessionIndex::default(),
                        leases: LeaseIndex::default(),
                        history: HistoryState::default(),
                    },
                    true,
                    SM_FORMAT_VERSION,
                )
            }
            Some(name) => {
                if tree_generation(&name).is_none() {
                    return Err(corrupt(format!(
                        "current-tree pointer {:?} is not a state tree name",
                        String::from_utf8_lossy(&name)
                    )));
                }
                let tree = db.open_tree(&name)?;
                let (applied, format) = read_meta(&tree).map_err(corrupt)?;
                let sessions = SessionIndex::load(&tree, applied.index).map_err(corrupt)?;
                let current = Current {
                    tree,
                    tree_name: name.to_vec(),
                    applied,
                    sessions,
                    leases: LeaseIndex::default(),
                    history: HistoryState::default(),
                };
                (current, false, format)
            }
        };
        // Trees of an install that crashed before its pointer flip are garbage.
        for name in db.tree_names() {
            if name.starts_with(TREE_NAME_PREFIX) && name.as_ref() != current.tree_name.as_slice() {
                tracing::info!(tree = %String::from_utf8_lossy(&name), "dropping a stale state tree");
                db.drop_tree(&name)?;
            }
        }
        tracing::info!(
            dir = %dir.display(),
            applied_index = current.applied.index,
            applied_term = current.applied.term,
            created,
            "state machine open"
        );
        let sm = StateMachine {
            db,
            dir: dir.to_path_buf(),
            opts,
            created,
            current: RwLock::new(current),
            cow: Mutex::new(None),
            cow_released: Condvar::new(),
        };
        if format == SM_FORMAT_V1 {
            sm.upgrade_v1()?;
        }
        sm.reload_indexes(&mut sm.write_current())?;
        Ok(sm)
    }

    /// Rewrites a round-1 state (raw values) into a new tree generation with revisions,
    /// through the install path: a crash midway leaves the old tree in place (the unfinished
    /// one is dropped at the next open) and the upgrade reruns.
    fn upgrade_v1(&self) -> Result<(), SmError> {
        let (old_tree, applied) = {
            let cur = self.read_current();
            (cur.tree.clone(), cur.applied.clone())
        };
        let mut builder = self.begin_install()?;
        for item in old_tree.range(vec![DATA_PREFIX]..DATA_END.to_vec()) {
            let (k, v) = item?;
            builder.insert_v1(&k[1..], &v, applied.index)?;
        }
        let keys = builder.key_count();
        builder.finish(&applied)?;
        tracing::info!(
            keys,
            revision = applied.index,
            "upgraded the state machine from format 1 (no revisions) to 2"
        );
        Ok(())
    }

    /// Whether [`open`](Self::open) found no state and created an empty one.
    pub fn was_created(&self) -> bool {
        self.created
    }

    /// The directory sled lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn read_current(&self) -> RwLockReadGuard<'_, Current> {
        // A panic while applying poisons the lock; the state it guards is sled's, which is
        // consistent at batch granularity, so carry on.
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_current(&self) -> RwLockWriteGuard<'_, Current> {
        self.current.write().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_cow(&self) -> MutexGuard<'_, Option<CowTable>> {
        self.cow.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The applied position (index, term) and the membership as of it.
    pub fn applied(&self) -> SnapshotMeta {
        self.read_current().applied.clone()
    }

    /// The applied index.
    pub fn applied_index(&self) -> u64 {
        self.read_current().applied.index
    }

    /// Applies committed entries in order. Entries at or below the applied index are skipped
    /// (a replay after a crash); the rest must continue it without a gap. Data changes, the
    /// session table and the new applied position go to sled in one atomic batch; an error
    /// applies nothing.
    pub fn apply(&self, entries: &[Entry]) -> Result<Vec<AppliedEntry>, SmError> {
        self.apply_with_events(entries).map(|b| b.entries)
    }

    /// [`apply`](Self::apply), also handing out the batch's changes to user keys (the watch
    /// events, in revision order) — exactly those the history records.
    pub fn apply_with_events(&self, entries: &[Entry]) -> Result<AppliedBatch, SmError> {
        self.wait_for_cow_budget();
        let mut cur = self.write_current();
        let applied = cur.applied.index;
        let fresh = match entries.iter().position(|e| e.index > applied) {
            Some(start) => &entries[start..],
            None => return Ok(AppliedBatch::default()),
        };
        let ops = decode_entries(applied, fresh)?;
        let result = {
            let mut cow = self.lock_cow();
            let cur = &mut *cur;
            let mut exec = Exec::new(&cur.tree, cow.as_mut(), &mut cur.leases);
            let out = execute(&mut exec, &mut cur.sessions, &mut cur.history, fresh, &ops);
            out.map(|(out, events, membership)| (out, events, membership, exec.batch))
        };
        let (out, events, membership, mut batch) = match result {
            Ok(done) => done,
            Err(e) => {
                // The in-memory indexes may hold half of this batch: rebuild them.
                self.reload_indexes(&mut cur)?;
                return Err(e);
            }
        };
        let last = &fresh[fresh.len() - 1];
        batch.insert(META_APPLIED, &encode_applied(last.index, last.term)[..]);
        if let Some(m) = &membership {
            batch.insert(META_MEMBERSHIP, encode_membership(m)?);
        }
        if let Err(e) = cur.tree.apply_batch(batch) {
            self.reload_indexes(&mut cur)?;
            return Err(e.into());
        }
        cur.applied.index = last.index;
        cur.applied.term = last.term;
        if let Some(m) = membership {
            cur.applied.membership = m;
        }
        debug_assert_eq!(out.len(), fresh.len());
        debug_assert!(events.iter().all(|e| e.revision <= last.index));
        Ok(AppliedBatch {
            entries: out,
            events,
        })
    }

    /// Rebuilds the in-memory session, lease and history indexes from the current tree (on
    /// open, and after a failed apply left them half-updated).
    fn reload_indexes(&self, cur: &mut Current) -> Result<(), SmError> {
        let dir = self.dir.clone();
        let corrupt = |what| SmError::Corrupt {
            dir: dir.clone(),
            what,
        };
        let indexes = self.load_indexes(&cur.tree, cur.applied.index, corrupt)?;
        cur.set_indexes(indexes);
        Ok(())
    }

    /// Builds the session, lease and history indexes of `tree` at `applied_index` without
    /// touching the current state, so an install can refuse a tree before it becomes the
    /// state; `damaged` turns a bad record into the caller's error. A tree made before watch
    /// history existed gets its compact revision (its applied index) recorded in it.
    fn load_indexes(
        &self,
        tree: &sled::Tree,
        applied_index: u64,
        damaged: impl Fn(String) -> SmError,
    ) -> Result<Indexes, SmError> {
        let sessions = SessionIndex::load(tree, applied_index).map_err(&damaged)?;
        let leases = LeaseIndex::load(tree, applied_index).map_err(&damaged)?;
        let retain = self.opts.watch_history_revisions.max(1);
        let bytes_max = self.opts.watch_history_bytes_max.max(1);
        let history = match HistoryState::load(tree, retain, bytes_max).map_err(&damaged)? {
            Some(h) => h,
            None => {
                let h = HistoryState::empty(applied_index, retain, bytes_max);
                tree.insert(history::COMPACT_KEY, &h.encoded()[..])?;
                h
            }
        };
        Ok(Indexes {
            sessions,
            leases,
            history,
        })
    }

    /// Every change of revisions `from..=through` (capped at the applied index) that `filter`
    /// matches, looking at `records_max` history records at most (see
    /// [`HistoryPage::next_revision`]); `Err(Compacted)` if `from` is at or below the compact
    /// revision. Consistent: it reads under the apply lock.
    pub fn read_history(
        &self,
        from: u64,
        through: u64,
        filter: &KeyFilter,
        records_max: usize,
    ) -> Result<Result<HistoryPage, Compacted>, SmError> {
        let cur = self.read_current();
        let compact_revision = cur.history.compact_revision;
        if from <= compact_revision {
            return Ok(Err(Compacted { compact_revision }));
        }
        let through = through.min(cur.applied.index);
        history::read_page(&cur.tree, from, through, filter, records_max).map(Ok)
    }

    /// The revision at and below which watch history is gone.
    pub fn history_compact_revision(&self) -> u64 {
        self.read_current().history.compact_revision
    }

    /// Every live lease, by id, and the lease epoch (it moves with every grant and revoke,
    /// past every epoch before it, reloads included: see `LeaseIndex`).
    pub fn leases(&self) -> (Vec<LeaseInfo>, u64) {
        let cur = self.read_current();
        (cur.leases.all(), cur.leases.epoch())
    }

    /// The lease epoch alone (cheap: the lessor polls it).
    pub fn lease_epoch(&self) -> u64 {
        self.read_current().leases.epoch()
    }

    /// Lease `id` and up to `keys_max` of its keys in key order (`more` if cut), at one
    /// applied index.
    pub fn lease(&self, id: u64, keys_max: usize) -> Result<ReadAt<Option<LeaseKeys>>, SmError> {
        let cur = self.read_current();
        let applied_index = cur.applied.index;
        let Some(info) = cur.leases.get(id) else {
            return Ok(ReadAt {
                value: None,
                applied_index,
            });
        };
        let mut keys = Vec::new();
        let mut more = false;
        for item in cur.tree.scan_prefix(leases::attach_key(id, &[])) {
            let (k, _) = item?;
            if keys.len() >= keys_max {
                more = true;
                break;
            }
            keys.push(k[9..].to_vec());
        }
        Ok(ReadAt {
            value: Some((info, keys, more)),
            applied_index,
        })
    }

    /// The session table's size, oldest activity and parameters.
    pub fn sessions_summary(&self) -> SessionsSummary {
        let cur = self.read_current();
        SessionsSummary {
            count: cur.sessions.len() as u64,
            oldest_active_ms: cur.sessions.oldest_active_ms(),
            params: cur.sessions.params,
        }
    }

    fn wait_for_cow_budget(&self) {
        let mut cow = self.lock_cow();
        let mut waited_since = None;
        while cow
            .as_ref()
            .is_some_and(|t| t.over_budget(self.opts.cow_bytes_max))
        {
            waited_since.get_or_insert_with(Instant::now);
            cow = self
                .cow_released
                .wait(cow)
                .unwrap_or_else(|p| p.into_inner());
        }
        if let Some(since) = waited_since {
            tracing::warn!(
                waited_ms = since.elapsed().as_millis() as u64,
                cow_bytes_max = self.opts.cow_bytes_max,
                "applies waited for a snapshot copy: its side table was full"
            );
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Result<ReadAt<Option<Vec<u8>>>, SmError> {
        let read = self.get_record(key)?;
        Ok(ReadAt {
            value: read.value.map(|r| r.value),
            applied_index: read.applied_index,
        })
    }

    /// `key` with its value and revisions.
    pub fn get_record(&self, key: &[u8]) -> Result<ReadAt<Option<KeyRecord>>, SmError> {
        let cur = self.read_current();
        let value = match cur.tree.get(data_key(key))? {
            Some(raw) => Some(record::key_record(key, &raw).map_err(SmError::Record)?),
            None => None,
        };
        Ok(ReadAt {
            value,
            applied_index: cur.applied.index,
        })
    }

    /// Pairs with keys in `(start, end)`, in key order, at most `limit` of them (and never more
    /// than `scan_limit_max`).
    pub fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<ReadAt<ScanPage>, SmError> {
        self.scan_bounded(start, end, limit, usize::MAX)
    }

    /// Like [`StateMachine::scan`], but also stops before the keys plus values returned would
    /// exceed `bytes_max` (always returning at least one pair, so a caller paging through
    /// makes progress). sled is not read past the pair that crossed the cap.
    pub fn scan_bounded(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<ReadAt<ScanPage>, SmError> {
        self.scan_records(start, end, limit, bytes_max)
            .map(pairs_page)
    }

    /// Like [`StateMachine::scan_bounded`], with each key's revisions; `(records, more)`.
    pub fn scan_records(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<ReadAt<(Vec<KeyRecord>, bool)>, SmError> {
        let limit = limit.min(self.opts.scan_limit_max);
        let lower = match start {
            Bound::Included(k) => Bound::Included(data_key(k)),
            Bound::Excluded(k) => Bound::Excluded(data_key(k)),
            Bound::Unbounded => Bound::Included(vec![DATA_PREFIX]),
        };
        let upper = match end {
            Bound::Included(k) => Bound::Included(data_key(k)),
            Bound::Excluded(k) => Bound::Excluded(data_key(k)),
            Bound::Unbounded => Bound::Excluded(DATA_END.to_vec()),
        };
        let cur = self.read_current();
        let mut records = Vec::new();
        let mut more = false;
        // An empty range (start after end) yields nothing rather than a sled panic.
        if range_is_empty(&lower, &upper) {
            return Ok(ReadAt {
                value: (records, more),
                applied_index: cur.applied.index,
            });
        }
        let mut bytes = 0usize;
        for item in cur.tree.range((lower, upper)) {
            let (k, v) = item?;
            let value_bytes = v.len().saturating_sub(record::KEY_HEADER_BYTES);
            let size = k.len().saturating_sub(1).saturating_add(value_bytes);
            if records.len() == limit
                || (!records.is_empty() && bytes.saturating_add(size) > bytes_max)
            {
                more = true;
                break;
            }
            bytes = bytes.saturating_add(size);
            records.push(record::key_record(&k[1..], &v).map_err(SmError::Record)?);
        }
        Ok(ReadAt {
            value: (records, more),
            applied_index: cur.applied.index,
        })
    }

    /// Pairs whose key starts with `prefix`, in key order, at most `limit` of them.
    pub fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<ReadAt<ScanPage>, SmError> {
        self.scan_prefix_page(prefix, None, limit, usize::MAX)
    }

    /// One page of the pairs whose key starts with `prefix`: strictly after `after` (the
    /// last key of the previous page) when given, at most `limit` pairs and `bytes_max` bytes
    /// of keys plus values (see [`StateMachine::scan_bounded`]).
    pub fn scan_prefix_page(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<ReadAt<ScanPage>, SmError> {
        self.scan_prefix_records(prefix, after, limit, bytes_max)
            .map(pairs_page)
    }

    /// Like [`StateMachine::scan_prefix_page`], with each key's revisions; `(records, more)`.
    pub fn scan_prefix_records(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<ReadAt<(Vec<KeyRecord>, bool)>, SmError> {
        // A continuation key below the prefix starts at the prefix; one above it yields an
        // empty range.
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        match prefix_end(prefix) {
            Some(end) => {
                self.scan_records(start, Bound::Excluded(end.as_slice()), limit, bytes_max)
            }
            None => self.scan_records(start, Bound::Unbounded, limit, bytes_max),
        }
    }

    /// Makes everything applied so far durable (sled flush + fsync) and returns the applied
    /// position that is now durable.
    pub fn flush(&self) -> Result<SnapshotMeta, SmError> {
        let applied = self.applied();
        self.db.flush()?;
        Ok(applied)
    }

    /// Opens a consistent view of the whole state at the current applied index, for writing
    /// a snapshot file. Applies go on while it is open; see [`cow`]. Only one view at a time.
    pub fn begin_snapshot(&self) -> Result<SnapshotView<'_>, SmError> {
        let cur = self.write_current();
        let mut cow = self.lock_cow();
        if cow.is_some() {
            return Err(SmError::SnapshotInProgress);
        }
        *cow = Some(CowTable::default());
        Ok(SnapshotView {
            sm: self,
            tree: cur.tree.clone(),
            meta: cur.applied.clone(),
        })
    }

    /// Starts building a fresh state tree from a snapshot's pairs; nothing is visible until
    /// [`TreeBuilder::finish`] swaps it in.
    pub fn begin_install(&self) -> Result<TreeBuilder<'_>, SmError> {
        let generation =
            tree_generation(&self.read_current().tree_name).map_or(1, |g| g.wrapping_add(1).max(1));
        let name = tree_name(generation);
        self.db.drop_tree(&name)?;
        let tree = self.db.open_tree(&name)?;
        Ok(TreeBuilder::new(
            self,
            tree,
            name,
            self.opts.install_threads,
        ))
    }

    /// Bytes sled uses on disk.
    pub fn size_on_disk_bytes(&self) -> Result<u64, SmError> {
        Ok(self.db.size_on_disk()?)
    }
}

/// Decodes `fresh` (which must continue `applied` without a gap) before anything runs.
fn decode_entries(applied: u64, fresh: &[Entry]) -> Result<Vec<Op<'_>>, SmError> {
    let mut ops = Vec::with_capacity(fresh.len());
    for (i, e) in fresh.iter().enumerate() {
        let expected = applied + 1 + i as u64;
        if e.index != expected {
            return Err(SmError::Gap {
                applied: expected - 1,
                next: e.index,
            });
        }
        ops.push(match e.kind {
            EntryKind::Normal => {
                Op::Command(CommandRef::decode_proposal(&e.payload).map_err(|source| {
                    SmError::Command {
                        index: e.index,
                        source,
                    }
                })?)
            }
            EntryKind::Noop => Op::Noop,
            EntryKind::Config => Op::Config(Membership::decode(&e.payload).map_err(|source| {
                SmError::Membership {
                    index: e.index,
                    source,
                }
            })?),
        });
    }
    Ok(ops)
}

/// Runs decoded entries into `exec`; returns their outcomes and the last membership set.
#[allow(clippy::type_complexity)]
fn execute(
    exec: &mut Exec<'_>,
    sessions: &mut SessionIndex,
    history: &mut HistoryState,
    fresh: &[Entry],
    ops: &[Op<'_>],
) -> Result<(Vec<AppliedEntry>, Vec<ChangeEvent>, Option<Membership>), SmError> {
    let mut membership = None;
    let mut out = Vec::with_capacity(ops.len());
    for (e, op) in fresh.iter().zip(ops) {
        exec.begin_entry(e.index);
        let outcome = match op {
            Op::Command(p) => EntryOutcome::Command(match (&p.session, &p.command) {
                (
                    _,
                    CommandRef::ExpireSessions {
                        now_ms,
                        ttl_ms,
                        sessions_max,
                    },
                ) => CommandResult {
                    revision: e.index,
                    outcome: sessions.expire(exec, *now_ms, *ttl_ms, *sessions_max)?,
                    duplicate: false,
                },
                (Some(session), cmd) => sessions.apply_sessioned(exec, e.index, session, cmd)?,
                (None, cmd) => CommandResult {
                    revision: e.index,
                    outcome: exec.run(e.index, cmd)?,
                    duplicate: false,
                },
            }),
            Op::Noop => EntryOutcome::Noop,
            Op::Config(m) => {
                membership = Some(m.clone());
                EntryOutcome::Config(m.clone())
            }
        };
        out.push(AppliedEntry {
            index: e.index,
            term: e.term,
            outcome,
        });
    }
    sessions.flush_params(exec)?;
    let events = exec.take_events();
    history.record(exec, &events)?;
    if let Some(last) = fresh.last() {
        history.prune(exec, last.index, events.len())?;
    }
    Ok((out, events, membership))
}

/// A page of records as key-value pairs (the revisions dropped).
fn pairs_page(read: ReadAt<(Vec<KeyRecord>, bool)>) -> ReadAt<ScanPage> {
    let (records, more) = read.value;
    ReadAt {
        value: ScanPage {
            pairs: records.into_iter().map(|r| (r.key, r.value)).collect(),
            more,
        },
        applied_index: read.applied_index,
    }
}

fn range_is_empty(lower: &Bound<Vec<u8>>, upper: &Bound<Vec<u8>>) -> bool {
    let (lo, lo_inclusive) = match lower {
        Bound::Included(k) => (k, true),
        Bound::Excluded(k) => (k, false),
        Bound::Unbounded => return false,
    };
    match upper {
        Bound::Included(hi) => lo > hi || (lo == hi && !lo_inclusive),
        Bound::Excluded(hi) => lo >= hi,
        Bound::Unbounded => false,
    }
}

fn encode_membership(m: &Membership) -> Result<Vec<u8>, SmError> {
    m.encode()
        .map_err(|source| SmError::Membership { index: 0, source })
}

fn write_meta(tree: &sled::Tree, applied: &SnapshotMeta) -> Result<(), SmError> {
    let mut batch = sled::Batch::default();
    batch.insert(META_FORMAT, &SM_FORMAT_VERSION.to_be_bytes()[..]);
    batch.insert(
        META_APPLIED,
        &encode_applied(applied.index, applied.term)[..],
    );
    batch.insert(META_MEMBERSHIP, encode_membership(&applied.membership)?);
    tree.apply_batch(batch)?;
    Ok(())
}

/// The applied position and membership, and the layout version (1 or 2).
fn read_meta(tree: &sled::Tree) -> Result<(SnapshotMeta, u32), String> {
    let get = |key: &[u8]| -> Result<IVec, String> {
        tree.get(key)
            .map_err(|e| format!("reading {}: {e}", String::from_utf8_lossy(key)))?
            .ok_or_else(|| format!("{} is missing", String::from_utf8_lossy(key)))
    };
    let format = get(META_FORMAT)?;
    let format = match <[u8; 4]>::try_from(format.as_ref()).map(u32::from_be_bytes) {
        Ok(v) if v == SM_FORMAT_VERSION || v == SM_FORMAT_V1 => v,
        _ => {
            return Err(format!(
                "m/format is {:?}, this build reads {SM_FORMAT_V1} and {SM_FORMAT_VERSION}",
                format.as_ref()
            ))
        }
    };
    let applied = get(META_APPLIED)?;
    if applied.len() != 16 {
        return Err(format!("m/applied is {} bytes, not 16", applied.len()));
    }
    let mut index = [0u8; 8];
    let mut term = [0u8; 8];
    index.copy_from_slice(&applied[..8]);
    term.copy_from_slice(&applied[8..]);
    let membership =
        Membership::decode(&get(META_MEMBERSHIP)?).map_err(|e| format!("m/membership: {e}"))?;
    let meta = SnapshotMeta {
        index: u64::from_be_bytes(index),
        term: u64::from_be_bytes(term),
        membership,
    };
    Ok((meta, format))
}

/// Whether a pair of a snapshot file of `format_version` is a user key (format 1: every
/// pair; format 2: `d ‖ key`, not session bookkeeping).
pub fn is_user_key(format_version: u32, key: &[u8]) -> bool {
    format_version < 2 || key.first() == Some(&DATA_PREFIX)
}

/// A user key and value as a format-2 snapshot pair: `d ‖ key` and a record created and
/// last written at `revision` (for tools and tests that write snapshot files by hand).
pub fn snapshot_pair(key: &[u8], value: &[u8], revision: u64) -> (Vec<u8>, Vec<u8>) {
    let meta = record::KeyMeta {
        create_revision: revision,
        mod_revision: revision,
        version: 1,
        lease: 0,
    };
    (data_key(key), record::encode_key(&meta, value))
}

/// A consistent view of the state at one applied index, open while a snapshot is copied.
/// Dropping it ends the copy-on-write bookkeeping.
#[derive(Debug)]
pub struct SnapshotView<'a> {
    sm: &'a StateMachine,
    tree: sled::Tree,
    meta: SnapshotMeta,
}

impl SnapshotView<'_> {
    /// The applied position and membership the view shows.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// Every pair of the state at [`meta`](Self::meta)`.index`, in key order: internal keys
    /// (`d ‖ key`, `s ‖ client`, `c/sessions`) and their records, everything but `m/`.
    pub fn pairs(&self) -> SnapshotPairs<'_> {
        SnapshotPairs {
            sm: self.sm,
            live: self.tree.iter(),
            live_done: false,
            ready: VecDeque::new(),
            resolved_upto: None,
            finished: false,
        }
    }

    /// Keys saved by applies since the view opened (how much copy-on-write work it caused).
    pub fn saved_keys(&self) -> usize {
        self.sm.lock_cow().as_ref().map_or(0, |t| t.saved_keys())
    }
}

impl Drop for SnapshotView<'_> {
    fn drop(&mut self) {
        *self.sm.lock_cow() = None;
        self.sm.cow_released.notify_all();
    }
}

/// The pairs of a [`SnapshotView`]: the live tree merged with the copy-on-write side table.
///
/// It reads a block of live pairs (`snapshot_block_pairs`) without any lock, then under the side-table lock resolves
/// the block against every saved key in the key range the block covers (see [`cow`] for why
/// that is exact). Taking the side-table lock once per block, not once per key, keeps the walk
/// from competing with applies for that lock key by key. Memory: one block plus the saved keys
/// in its range.
pub struct SnapshotPairs<'a> {
    sm: &'a StateMachine,
    live: sled::Iter,
    live_done: bool,
    ready: VecDeque<(Vec<u8>, IVec)>,
    /// Every key up to and including this one has been resolved into `ready` (or emitted).
    resolved_upto: Option<Vec<u8>>,
    finished: bool,
}

impl SnapshotPairs<'_> {
    fn fill(&mut self) -> Result<(), SmError> {
        let block_pairs = self.sm.opts.snapshot_block_pairs.max(1);
        let mut block: Vec<(Vec<u8>, IVec)> = Vec::with_capacity(block_pairs);
        while block.len() < block_pairs {
            match self.live.next() {
                Some(Ok((k, _))) if k.first() == Some(&META_PREFIX) => {}
                Some(Ok((k, v))) => block.push((k.to_vec(), v)),
                Some(Err(e)) => return Err(e.into()),
                None => {
                    self.live_done = true;
                    break;
                }
            }
        }
        // The block covers (resolved_upto, its last key], or everything after resolved_upto
        // once the tree walk is over.
        let upper = if self.live_done {
            None
        } else {
            block.last().map(|(k, _)| k.clone())
        };
        let cow = self.sm.lock_cow();
        let table = cow
            .as_ref()
            .expect("invariant: the side table exists while a snapshot view is open");
        let saved = table.range(self.resolved_upto.as_deref(), upper.as_deref());
        drop(cow);
        let mut saved = saved.into_iter().peekable();
        for (key, live_value) in block {
            while let Some((skey, _)) = saved.peek() {
                if skey.as_slice() >= key.as_slice() {
                    break;
                }
                if let Some((skey, Some(svalue))) = saved.next() {
                    self.ready.push_back((skey, svalue));
                }
            }
            match saved.peek() {
                Some((skey, _)) if *skey == key => {
                    if let Some((skey, Some(svalue))) = saved.next() {
                        self.ready.push_back((skey, svalue));
                    }
                }
                _ => self.ready.push_back((key, live_value)),
            }
        }
        for (skey, svalue) in saved {
            if let Some(svalue) = svalue {
                self.ready.push_back((skey, svalue));
            }
        }
        self.resolved_upto = upper;
        if self.live_done {
            self.finished = true;
        }
        Ok(())
    }
}

impl Iterator for SnapshotPairs<'_> {
    type Item = Result<(Vec<u8>, IVec), SmError>;

    fn next(&mut self) -> Option<Self::Item> {
        while self.ready.is_empty() && !self.finished {
            if let Err(e) = self.fill() {
                self.finished = true;
                return Some(Err(e));
            }
        }
        self.ready.pop_front().map(Ok)
    }
}

#[cfg(test)]
mod install_tests;
#[cfg(test)]
mod session_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod txn_tests;
#[cfg(test)]
mod watch_lease_tests;
