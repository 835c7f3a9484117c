//! The core's view of the Raft log: entries after the last compaction point, held in memory.
//!
//! Why in memory and not behind a storage trait: the node mutates the WAL on its I/O thread
//! while the core runs on another; reading the WAL from the core would need locking and would
//! make the core's behaviour depend on I/O timing. Keeping the suffix after the compaction
//! point here keeps the core single-threaded and deterministic. The bound is explicit: the
//! node compacts (see `Raft::compact`) every `snapshot_every` applied entries, and a leader
//! refuses proposals once the log exceeds `Config::log_bytes_max`.
//!
//! Invariants:
//! - entries are contiguous: `entries[k].index == base_index + 1 + k`;
//! - terms never decrease along the log, and `base_term` is at most the first entry's term;
//! - `bytes` is the sum of `Entry::size_bytes` over `entries`.

use super::limits::{pred, succ};
use raftkv_types::Entry;
use std::collections::VecDeque;

/// The log suffix after (`base_index`, `base_term`), the last compacted or snapshotted entry.
#[derive(Clone, Debug, Default)]
pub struct RaftLog {
    base_index: u64,
    base_term: u64,
    entries: VecDeque<Entry>,
    bytes: u64,
}

impl RaftLog {
    /// A log that starts after (`base_index`, `base_term`) with no entries.
    pub fn new(base_index: u64, base_term: u64) -> RaftLog {
        RaftLog {
            base_index,
            base_term,
            entries: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Index of the last compacted entry (0 if nothing was compacted).
    pub fn base_index(&self) -> u64 {
        self.base_index
    }

    /// Term of the last compacted entry.
    pub fn base_term(&self) -> u64 {
        self.base_term
    }

    /// Index of the first entry held (one past `base_index`).
    pub fn first_index(&self) -> u64 {
        succ(self.base_index)
    }

    /// Index of the last entry (`base_index` if none is held).
    pub fn last_index(&self) -> u64 {
        // Bounded: `append` keeps every entry's index below `INDEX_MAX`.
        self.base_index + self.entries.len() as u64
    }

    /// Term of the last entry.
    pub fn last_term(&self) -> u64 {
        self.entries.back().map_or(self.base_term, |e| e.term)
    }

    /// Bytes held (payloads plus fixed per-entry overhead).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Term of the entry at `index`, `None` if it is compacted away or beyond the end.
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.base_index {
            return Some(self.base_term);
        }
        self.entry(index).map(|e| e.term)
    }

    /// The entry at `index` if held.
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        if index <= self.base_index {
            return None;
        }
        self.entries.get(pred(index - self.base_index) as usize)
    }

    /// Entries `lo..=hi` (clamped to what is held), at most `bytes_max` of them but at least
    /// one if any is in range.
    pub fn slice(&self, lo: u64, hi: u64, bytes_max: u64) -> Vec<Entry> {
        let lo = lo.max(self.first_index());
        let hi = hi.min(self.last_index());
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut index = lo;
        while index <= hi {
            let Some(e) = self.entry(index) else { break };
            let size = e.size_bytes() as u64;
            if !out.is_empty() && bytes + size > bytes_max {
                break;
            }
            bytes += size;
            out.push(e.clone());
            index = succ(index);
        }
        out
    }

    /// Appends one entry at the end.
    pub fn append(&mut self, entry: Entry) {
        assert_eq!(
            entry.index,
            succ(self.last_index()),
            "log append must be contiguous"
        );
        assert!(
            entry.index < super::limits::INDEX_MAX && entry.term < super::limits::TERM_MAX,
            "entry {}@{} out of range",
            entry.index,
            entry.term
        );
        assert!(
            entry.term >= self.last_term(),
            "log terms must not decrease"
        );
        self.bytes += entry.size_bytes() as u64;
        self.entries.push_back(entry);
    }

    /// Drops every entry at or after `index` (which must be after the base).
    pub fn truncate_from(&mut self, index: u64) {
        assert!(
            index > self.base_index,
            "cannot truncate compacted entries (index {index}, base {})",
            self.base_index
        );
        while self.last_index() >= index {
            if let Some(e) = self.entries.pop_back() {
                self.bytes -= e.size_bytes() as u64;
            }
        }
        self.debug_check();
    }

    /// Drops entries up to and including `index`, which becomes the new base. Returns false
    /// (and changes nothing) if `index` is not held.
    pub fn compact(&mut self, index: u64) -> bool {
        if index <= self.base_index {
            return true;
        }
        let Some(term) = self.term(index) else {
            return false;
        };
        while self.base_index < index {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= e.size_bytes() as u64;
            }
            self.base_index = succ(self.base_index);
        }
        self.base_term = term;
        self.debug_check();
        true
    }

    /// The `bytes` invariant where it is cheap to check: an empty log holds no bytes (and
    /// removing an entry never underflows, which debug builds check on every subtraction).
    fn debug_check(&self) {
        debug_assert!(
            !self.entries.is_empty() || self.bytes == 0,
            "an empty log counts {} bytes",
            self.bytes
        );
    }

    /// Discards everything: the log now starts after (`index`, `term`) (snapshot install).
    pub fn reset(&mut self, index: u64, term: u64) {
        *self = RaftLog::new(index, term);
    }

    /// Whether a log ending at (`last_index`, `last_term`) is at least as up to date as ours
    /// (Raft §5.4.1): a higher last term wins, equal terms compare length.
    pub fn is_up_to_date(&self, last_index: u64, last_term: u64) -> bool {
        last_term > self.last_term()
            || (last_term == self.last_term() && last_index >= self.last_index())
    }

    /// The largest index `<= index` whose term is `<= term`, with its term. Used for the
    /// conflict hint (follower side) and to act on it (leader side). Stops at the base.
    pub fn find_conflict_by_term(&self, index: u64, term: u64) -> (u64, u64) {
        let mut i = index.min(self.last_index());
        loop {
            match self.term(i) {
                Some(t) if t > term && i > self.base_index => i = pred(i),
                Some(t) => return (i, t),
                None => return (self.base_index, self.base_term),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftkv_types::EntryKind;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            payload: vec![0; 3].into(),
        }
    }

    #[test]
    fn append_truncate_compact_and_terms() {
        let mut log = RaftLog::new(0, 0);
        for (i, t) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)] {
            log.append(entry(i, t));
        }
        assert_eq!((log.last_index(), log.last_term()), (5, 3));
        assert_eq!(log.bytes(), 5 * 20);
        assert_eq!(log.term(0), Some(0));
        assert_eq!(log.term(6), None);
        assert_eq!(log.find_conflict_by_term(5, 2), (4, 2));
        assert_eq!(log.find_conflict_by_term(5, 1), (2, 1));
        assert_eq!(log.find_conflict_by_term(5, 0), (0, 0));
        assert_eq!(log.slice(2, 5, 45).len(), 2);
        assert_eq!(log.slice(2, 5, 1).len(), 1);
        log.truncate_from(4);
        assert_eq!(log.last_index(), 3);
        assert!(log.compact(2));
        assert_eq!(
            (log.base_index(), log.base_term(), log.first_index()),
            (2, 1, 3)
        );
        assert_eq!(log.term(1), None);
        assert_eq!(log.bytes(), 20);
        assert!(!log.compact(9));
        assert_eq!(log.find_conflict_by_term(3, 0), (2, 1));
        assert!(log.is_up_to_date(3, 2));
        assert!(!log.is_up_to_date(9, 1));
        assert!(log.is_up_to_date(1, 3));
    }
}
