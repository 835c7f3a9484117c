//! The core's view of the Raft log: the term and size of every entry after the last
//! compaction point, and the payloads of a recent suffix of them.
//!
//! Why not the whole log in memory: a node that compacts rarely (or never) would hold every
//! payload since its last snapshot — a gigabyte at a few million entries. Why not behind a
//! storage trait: the node mutates the WAL on its I/O thread while the core runs on another;
//! reading the WAL from the core would need locking and would make the core depend on I/O
//! timing. So the core keeps what it decides with (terms, sizes: four bytes per entry, terms
//! run-length encoded) and the payloads it hands out soon (entries not yet applied, and a
//! recent window for followers that keep up), and *evicts* the payloads of applied entries
//! past `Config::log_cache_bytes_max`. A follower that needs an evicted entry is sent an
//! append that the node fills from the WAL ([`super::LogRead`]). Evicted entries are applied,
//! hence committed and durable: they never change again, so the WAL's copy is the same.
//!
//! Invariants:
//! - entries are contiguous: `sizes[k]` describes entry `base_index + 1 + k`;
//! - `held[k].index == held_from + k`, and `held` runs to the last entry
//!   (`base_index < held_from <= last_index + 1`);
//! - term runs start strictly increasing in index and in term, the first one at
//!   `base_index + 1` (when any entry is held), and `base_term` is at most the first term;
//! - `held_bytes` is the sum of `Entry::size_bytes` over `held`.

use super::limits::{pred, succ};
use raftkv_types::{Entry, LogPrefix};
use std::collections::VecDeque;

/// The log after (`base_index`, `base_term`), the last compacted or snapshotted entry.
#[derive(Clone, Debug, Default)]
pub struct RaftLog {
    base_index: u64,
    base_term: u64,
    /// (first index, term) of each run of equal terms after the base.
    term_runs: VecDeque<(u64, u64)>,
    /// `Entry::size_bytes` of every entry after the base.
    sizes: VecDeque<u32>,
    /// First index whose payload is held (`last_index + 1` when none is).
    held_from: u64,
    /// The entries from `held_from` to the end.
    held: VecDeque<Entry>,
    held_bytes: u64,
}

impl RaftLog {
    /// A log that starts after (`base_index`, `base_term`) with no entries.
    pub fn new(base_index: u64, base_term: u64) -> RaftLog {
        RaftLog {
            base_index,
            base_term,
            term_runs: VecDeque::new(),
            sizes: VecDeque::new(),
            held_from: succ(base_index),
            held: VecDeque::new(),
            held_bytes: 0,
        }
    }

    /// A restarted log: after (`base_index`, `base_term`), the entries `prefix` describes
    /// (payloads left on disk), then `entries` (payloads held). The caller has checked that
    /// both are contiguous and follow the base.
    pub fn restarted(base_index: u64, base_term: u64, prefix: &LogPrefix) -> RaftLog {
        let mut log = RaftLog::new(base_index, base_term);
        if prefix.sizes.is_empty() {
            return log;
        }
        assert_eq!(
            prefix.first_index,
            succ(base_index),
            "prefix follows the base"
        );
        for (k, &(index, term)) in prefix.term_runs.iter().enumerate() {
            assert!(
                k == 0 || (index > prefix.term_runs[k - 1].0 && term > prefix.term_runs[k - 1].1),
                "term runs ascend"
            );
            log.term_runs.push_back((index, term));
        }
        log.sizes.extend(prefix.sizes.iter().copied());
        log.held_from = succ(log.last_index());
        log.debug_check();
        log
    }

    /// Index of the last compacted entry (0 if nothing was compacted).
    pub fn base_index(&self) -> u64 {
        self.base_index
    }

    /// Term of the last compacted entry.
    pub fn base_term(&self) -> u64 {
        self.base_term
    }

    /// Index of the first entry after the base.
    pub fn first_index(&self) -> u64 {
        succ(self.base_index)
    }

    /// Index of the last entry (`base_index` if none).
    pub fn last_index(&self) -> u64 {
        // Bounded: `append` keeps every entry's index below `INDEX_MAX`.
        self.base_index + self.sizes.len() as u64
    }

    /// Term of the last entry.
    pub fn last_term(&self) -> u64 {
        self.term_runs.back().map_or(self.base_term, |&(_, t)| t)
    }

    /// First index whose payload is held; entries before it are read from the WAL.
    pub fn held_from(&self) -> u64 {
        self.held_from
    }

    /// Bytes of payload held in memory (plus fixed per-entry overhead).
    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Term of the entry at `index`, `None` if it is compacted away or beyond the end.
    pub fn term(&self, index: u64) -> Option<u64> {
        if index == self.base_index {
            return Some(self.base_term);
        }
        if index < self.base_index || index > self.last_index() {
            return None;
        }
        let run = self.term_runs.partition_point(|&(first, _)| first <= index);
        debug_assert!(run > 0, "the first run starts right after the base");
        Some(self.term_runs[pred(run as u64) as usize].1)
    }

    /// The size of the entry at `index` (`Entry::size_bytes`), if it is after the base.
    pub fn size_bytes(&self, index: u64) -> Option<u64> {
        if index <= self.base_index {
            return None;
        }
        let k = pred(index - self.base_index) as usize;
        self.sizes.get(k).map(|&s| u64::from(s))
    }

    /// The entry at `index` if its payload is held.
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        if index < self.held_from {
            return None;
        }
        self.held.get((index - self.held_from) as usize)
    }

    /// The last index of the run `lo..=hi` (clamped to the log) whose sizes fit `bytes_max`,
    /// at least `lo` itself; `None` if `lo` is not in the log.
    pub fn span_end(&self, lo: u64, hi: u64, bytes_max: u64) -> Option<(u64, u64)> {
        let hi = hi.min(self.last_index());
        let mut bytes = self.size_bytes(lo)?;
        let mut end = lo;
        while end < hi {
            let size = self.size_bytes(succ(end)).unwrap_or(0);
            if bytes + size > bytes_max {
                break;
            }
            bytes += size;
            end = succ(end);
        }
        debug_assert!(end >= lo && end <= hi.max(lo));
        Some((end, bytes))
    }

    /// Held entries `lo..=hi` (clamped to what is held), at most `bytes_max` of them but at
    /// least one if any is in range.
    pub fn slice(&self, lo: u64, hi: u64, bytes_max: u64) -> Vec<Entry> {
        let lo = lo.max(self.held_from);
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
        debug_assert_eq!(
            self.held_from,
            succ(self.last_index()) - self.held.len() as u64
        );
        if self.term_runs.is_empty() || entry.term != self.last_term() {
            self.term_runs.push_back((entry.index, entry.term));
        }
        let size = entry.size_bytes();
        self.sizes
            .push_back(u32::try_from(size).unwrap_or(u32::MAX));
        self.held_bytes += size as u64;
        self.held.push_back(entry);
    }

    /// Drops every entry at or after `index` (which must be after the base, and held: the
    /// entries whose payloads were evicted are applied, so never replaced).
    pub fn truncate_from(&mut self, index: u64) {
        assert!(
            index > self.base_index && index >= self.held_from,
            "cannot truncate compacted or evicted entries (index {index}, base {}, held from {})",
            self.base_index,
            self.held_from
        );
        while self.last_index() >= index {
            self.sizes.pop_back();
            if let Some(e) = self.held.pop_back() {
                self.held_bytes -= e.size_bytes() as u64;
            }
        }
        while self
            .term_runs
            .back()
            .is_some_and(|&(first, _)| first >= index)
        {
            self.term_runs.pop_back();
        }
        self.debug_check();
    }

    /// Drops entries up to and including `index`, which becomes the new base. Returns false
    /// (and changes nothing) if `index` is not in the log.
    pub fn compact(&mut self, index: u64) -> bool {
        if index <= self.base_index {
            return true;
        }
        let Some(term) = self.term(index) else {
            return false;
        };
        let dropped = index - self.base_index;
        self.sizes.drain(..dropped as usize);
        self.base_index = index;
        self.base_term = term;
        self.evict_through(index);
        self.held_from = self.held_from.max(succ(index));
        // Runs that end at or before the new base go; the one the base is in starts after it.
        while self.term_runs.len() > 1 && self.term_runs[1].0 <= succ(index) {
            self.term_runs.pop_front();
        }
        if self.sizes.is_empty() {
            self.term_runs.clear();
        } else if let Some(run) = self.term_runs.front_mut() {
            run.0 = run.0.max(succ(index));
        }
        self.debug_check();
        true
    }

    /// Lets go of the payloads of entries up to and including `index` (they stay in the log
    /// as terms and sizes; the WAL holds them).
    pub fn evict_through(&mut self, index: u64) {
        let index = index.min(self.last_index());
        while self.held_from <= index {
            if let Some(e) = self.held.pop_front() {
                self.held_bytes -= e.size_bytes() as u64;
            }
            self.held_from = succ(self.held_from);
        }
        debug_assert_eq!(
            self.held_from,
            succ(self.last_index()) - self.held.len() as u64
        );
    }

    /// Lets go of the oldest payloads, no further than `limit` (inclusive), until at most
    /// `keep_bytes` are held. Returns the new first held index.
    pub fn evict_to_bytes(&mut self, limit: u64, keep_bytes: u64) -> u64 {
        while self.held_bytes > keep_bytes && self.held_from <= limit {
            let Some(e) = self.held.pop_front() else {
                break;
            };
            self.held_bytes -= e.size_bytes() as u64;
            self.held_from = succ(self.held_from);
        }
        assert!(self.held_from > self.base_index);
        self.held_from
    }

    /// The invariants where they are cheap to check.
    fn debug_check(&self) {
        debug_assert!(
            !self.held.is_empty() || self.held_bytes == 0,
            "an empty cache counts {} bytes",
            self.held_bytes
        );
        debug_assert!(
            self.held_from > self.base_index && self.held_from <= succ(self.last_index())
        );
        debug_assert_eq!(
            self.held_from + self.held.len() as u64,
            succ(self.last_index())
        );
        debug_assert!(
            self.sizes.is_empty() == self.term_runs.is_empty()
                && self
                    .term_runs
                    .front()
                    .is_none_or(|&(first, _)| first == succ(self.base_index)),
            "term runs cover the log from its base"
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
        let i = index.min(self.last_index());
        if i <= self.base_index {
            return (self.base_index, self.base_term);
        }
        // The last run that starts at or before `i` and whose term is at most `term`.
        let upto = self.term_runs.partition_point(|&(first, _)| first <= i);
        for k in (0..upto).rev() {
            let (first, t) = self.term_runs[k];
            if t <= term {
                let end = match self.term_runs.get(k + 1) {
                    Some(&(next, _)) => pred(next).min(i),
                    None => i,
                };
                debug_assert!(end >= first);
                return (end, t);
            }
        }
        (self.base_index, self.base_term)
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
        assert_eq!(log.held_bytes(), 5 * 20);
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
        assert_eq!(log.term(3), Some(2));
        assert_eq!(log.held_bytes(), 20);
        assert!(!log.compact(9));
        assert_eq!(log.find_conflict_by_term(3, 0), (2, 1));
        assert!(log.is_up_to_date(3, 2));
        assert!(!log.is_up_to_date(9, 1));
        assert!(log.is_up_to_date(1, 3));
    }

    #[test]
    fn evicted_entries_keep_their_terms_and_sizes() {
        let mut log = RaftLog::new(0, 0);
        for i in 1..=10 {
            log.append(entry(i, 1 + i / 4));
        }
        log.evict_through(6);
        assert_eq!(log.held_from(), 7);
        assert_eq!(log.held_bytes(), 4 * 20);
        assert!(log.entry(6).is_none());
        assert_eq!(log.entry(7).map(|e| e.index), Some(7));
        assert_eq!(log.term(3), Some(1));
        assert_eq!(log.term(4), Some(2));
        assert_eq!(log.size_bytes(2), Some(20));
        assert_eq!(log.span_end(2, 10, 45), Some((3, 40)));
        assert_eq!(log.span_end(2, 10, 1), Some((2, 20)));
        assert_eq!(
            log.slice(1, 10, u64::MAX).len(),
            4,
            "only held entries are sliced"
        );
        assert_eq!(log.find_conflict_by_term(10, 2), (7, 2));
        assert_eq!(log.evict_to_bytes(8, 20), 9);
        assert_eq!(log.held_bytes(), 40);
        log.truncate_from(10);
        assert_eq!(log.last_index(), 9);
        assert!(log.compact(5));
        assert_eq!((log.base_index(), log.base_term()), (5, 2));
        assert_eq!(log.term(6), Some(2));
        assert_eq!(log.term(8), Some(3));
        assert!(log.compact(9));
        assert_eq!(
            (log.last_index(), log.last_term(), log.held_bytes()),
            (9, 3, 0)
        );
        log.append(entry(10, 4));
        assert_eq!((log.held_from(), log.term(10)), (10, Some(4)));
    }

    #[test]
    fn a_restarted_log_holds_terms_without_payloads() {
        let mut prefix = LogPrefix::default();
        for i in 4..=9 {
            prefix.push(&entry(i, if i < 7 { 2 } else { 5 }));
        }
        let mut log = RaftLog::restarted(3, 2, &prefix);
        assert_eq!(
            (log.last_index(), log.last_term(), log.held_from()),
            (9, 5, 10)
        );
        assert_eq!((log.term(6), log.term(7)), (Some(2), Some(5)));
        assert_eq!(log.find_conflict_by_term(9, 4), (6, 2));
        log.append(entry(10, 5));
        assert_eq!(log.entry(10).map(|e| e.term), Some(5));
        assert_eq!(log.held_bytes(), 20);
    }
}
