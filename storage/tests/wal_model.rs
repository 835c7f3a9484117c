//! Property test: random sequences of append (with conflicts), truncate, snapshot + purge,
//! reset, reopen and crash against a plain in-memory model of the log.
//!
//! Every operation is synced before it returns, so a crash of the simulated disk must lose
//! nothing. proptest prints the failing operation sequence and persists its seed under
//! `proptest-regressions/`; rerun with `cargo test -p raftkv-storage --test wal_model`.

use proptest::prelude::*;
use raftkv_storage::vfs::SimFs;
use raftkv_storage::wal::{Wal, WalOptions};
use raftkv_storage::{Entry, EntryKind, HardState, Membership, SnapshotMeta};
use std::path::Path;
use std::sync::Arc;

#[derive(Clone, Debug)]
enum Op {
    Append {
        back: u64,
        n: u64,
        new_term: bool,
        with_hs: bool,
    },
    Truncate {
        back: u64,
    },
    SnapshotAndPurge {
        back: u64,
        margin: u64,
    },
    Reset {
        ahead: u64,
    },
    Reopen,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..4u64, 1..12u64, any::<bool>(), any::<bool>()).prop_map(|(back, n, new_term, with_hs)| Op::Append { back, n, new_term, with_hs }),
        1 => (0..5u64).prop_map(|back| Op::Truncate { back }),
        1 => (0..10u64, 0..10u64).prop_map(|(back, margin)| Op::SnapshotAndPurge { back, margin }),
        1 => (1..20u64).prop_map(|ahead| Op::Reset { ahead }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

#[derive(Debug, Default)]
struct Model {
    first_index: u64,
    prev_term: u64,
    entries: Vec<Entry>,
    hs: HardState,
    snapshot: Option<SnapshotMeta>,
}

impl Model {
    fn last_index(&self) -> u64 {
        self.first_index + self.entries.len() as u64 - 1
    }
    fn last_term(&self) -> u64 {
        self.entries.last().map_or(self.prev_term, |e| e.term)
    }
    fn term(&self, index: u64) -> Option<u64> {
        if index + 1 == self.first_index {
            return Some(self.prev_term);
        }
        index
            .checked_sub(self.first_index)
            .and_then(|i| self.entries.get(i as usize))
            .map(|e| e.term)
    }
    fn floor(&self) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.index)
    }
}

fn opts() -> WalOptions {
    WalOptions {
        segment_bytes_max: 700,
        record_bytes_max: 1024,
        preallocate: true,
        prepare_ahead: false,
    }
}

fn open(fs: &SimFs) -> Wal {
    Wal::open_with(Arc::new(fs.clone()), Path::new("/n/wal"), opts()).expect("reopen")
}

fn check_same(wal: &Wal, m: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(wal.first_index(), m.first_index);
    prop_assert_eq!(wal.last_index(), m.last_index());
    prop_assert_eq!(wal.term(m.first_index - 1), Some(m.prev_term));
    prop_assert_eq!(wal.hard_state(), m.hs);
    prop_assert_eq!(wal.snapshot(), m.snapshot.as_ref());
    if !m.entries.is_empty() {
        let got = wal
            .entries(m.first_index, m.last_index() + 1, usize::MAX)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&got, &m.entries);
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let fs = SimFs::new();
    let mut wal = open(&fs);
    let mut m = Model {
        first_index: 1,
        ..Model::default()
    };
    let mut counter = 0u64;
    for op in ops {
        match op {
            Op::Append {
                back,
                n,
                new_term,
                with_hs,
            } => {
                let start = (m.last_index() + 1)
                    .saturating_sub(back)
                    .max(m.floor() + 1)
                    .max(m.first_index);
                let prev_term = m.term(start - 1).unwrap_or(0);
                let term = m.hs.term.max(prev_term) + u64::from(new_term || back > 0);
                let batch: Vec<Entry> = (start..start + n)
                    .map(|index| {
                        counter += 1;
                        Entry {
                            index,
                            term,
                            kind: EntryKind::Normal,
                            payload: format!("v{counter}").into_bytes().into(),
                        }
                    })
                    .collect();
                let hs = HardState {
                    term,
                    vote: Some(1 + counter % 3),
                    commit: m.hs.commit.max(m.floor()),
                };
                wal.append(&batch, with_hs.then_some(&hs))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                m.entries.truncate((start - m.first_index) as usize);
                m.entries.extend(batch);
                if with_hs {
                    m.hs = hs;
                }
            }
            Op::Truncate { back } => {
                let from = (m.last_index() + 1).saturating_sub(back);
                if from > m.floor() && from >= m.first_index {
                    wal.truncate_suffix(from)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    m.entries.truncate((from - m.first_index) as usize);
                }
            }
            Op::SnapshotAndPurge { back, margin } => {
                let index = m.last_index().saturating_sub(back);
                if index >= m.first_index && index >= m.floor() {
                    let meta = SnapshotMeta {
                        index,
                        term: m.term(index).unwrap_or(0),
                        membership: Membership::with_voters([1, 2, 3]),
                    };
                    wal.record_snapshot(&meta)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    m.snapshot = Some(meta);
                    let upto = index.saturating_sub(margin);
                    wal.purge(upto)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let first = wal.first_index();
                    prop_assert!(
                        first >= m.first_index && first <= upto.max(m.first_index - 1) + 1,
                        "purge to {} moved first index {} -> {}",
                        upto,
                        m.first_index,
                        first
                    );
                    let drop = (first - m.first_index) as usize;
                    if drop > 0 {
                        m.prev_term = m.entries[drop - 1].term;
                        m.entries.drain(..drop);
                        m.first_index = first;
                    }
                }
            }
            Op::Reset { ahead } => {
                let index = m.last_index() + ahead;
                let term = m.last_term().max(m.hs.term) + 1;
                let meta = SnapshotMeta {
                    index,
                    term,
                    membership: Membership::with_voters([1, 2, 3]),
                };
                wal.reset_to_snapshot(&meta)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                m.snapshot = Some(meta);
                m.first_index = index + 1;
                m.prev_term = term;
                m.entries.clear();
            }
            Op::Reopen => {
                drop(wal);
                wal = open(&fs);
            }
            Op::Crash => {
                drop(wal);
                fs.crash();
                wal = open(&fs);
            }
        }
        check_same(&wal, &m)?;
    }
    drop(wal);
    fs.crash();
    check_same(&open(&fs), &m)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]
    #[test]
    fn wal_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
