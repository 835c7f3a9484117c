//! The copy-on-write side table that gives a snapshot one consistent view of a live sled tree.
//!
//! sled 0.34 has no point-in-time snapshots, and `Tree::iter` sees writes made while it runs.
//! While a snapshot at applied index `S` is being copied, every apply first saves, for each key
//! it is about to change for the first time since `S`, that key's value *at `S`* (or "absent")
//! here. The snapshot reader walks the live tree and merges in this table: a key found here is
//! emitted with its saved value (or skipped if it was absent at `S`), a key not found here has
//! not changed since `S`, so its live value is its value at `S`.
//!
//! Why that is exact: an apply records a key here *before* its sled batch makes the new value
//! visible, and the reader looks a key up here *after* reading it from the tree. So if the
//! reader saw a post-`S` value, the key is here; if the key is not here at lookup time, the
//! value the reader saw is still the value at `S`. Keys deleted after `S` may be missed by the
//! tree walk; they are here with their old value, and the merge emits them in order.
//!
//! Invariants:
//! - A key's entry is written once per snapshot (the first change after `S`) and never updated.
//! - `saved_bytes` is the sum of key and value lengths held; applies wait (see
//!   [`CowTable::over_budget`]) rather than let it grow past its budget by more than one batch.

use sled::IVec;
use std::collections::BTreeMap;
use std::ops::Bound;

/// Saved values at the snapshot point of every key changed since it.
#[derive(Debug, Default)]
pub struct CowTable {
    saved: BTreeMap<Vec<u8>, Option<IVec>>,
    saved_bytes: usize,
}

impl CowTable {
    /// Whether `user_key` already has its value at the snapshot point saved.
    pub fn contains(&self, user_key: &[u8]) -> bool {
        self.saved.contains_key(user_key)
    }

    /// Saves `user_key`'s value at the snapshot point; a second save of one key is ignored.
    pub fn save(&mut self, user_key: &[u8], value_at_snapshot: Option<IVec>) {
        if self.saved.contains_key(user_key) {
            return;
        }
        self.saved_bytes += user_key.len() + value_at_snapshot.as_ref().map_or(0, |v| v.len());
        self.saved.insert(user_key.to_vec(), value_at_snapshot);
    }

    /// Saved keys in `(after, upto]` in order (`None`: unbounded on that side), with their
    /// saved values.
    pub fn range(&self, after: Option<&[u8]>, upto: Option<&[u8]>) -> Vec<(Vec<u8>, Option<IVec>)> {
        let lower = match after {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        let upper = match upto {
            Some(k) => Bound::Included(k),
            None => Bound::Unbounded,
        };
        if let (Some(a), Some(u)) = (after, upto) {
            if a >= u {
                return Vec::new();
            }
        }
        self.saved
            .range::<[u8], _>((lower, upper))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Number of keys saved.
    pub fn saved_keys(&self) -> usize {
        self.saved.len()
    }

    /// Whether applies must wait for the snapshot copy to finish before saving more.
    pub fn over_budget(&self, budget_bytes: usize) -> bool {
        self.saved_bytes > budget_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_save_wins_and_ranges_are_exclusive() {
        let mut t = CowTable::default();
        t.save(b"b", Some(IVec::from(&b"old"[..])));
        t.save(b"b", Some(IVec::from(&b"newer"[..])));
        t.save(b"d", None);
        assert_eq!(t.saved.get(&b"b"[..]), Some(&Some(IVec::from(&b"old"[..]))));
        assert_eq!(t.saved.get(&b"d"[..]), Some(&None));
        assert_eq!(t.saved.get(&b"c"[..]), None);
        assert_eq!(t.saved_keys(), 2);
        assert_eq!(t.saved_bytes, 1 + 3 + 1);
        let keys =
            |v: Vec<(Vec<u8>, Option<IVec>)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(
            keys(t.range(None, None)),
            vec![b"b".to_vec(), b"d".to_vec()]
        );
        assert_eq!(keys(t.range(Some(b"b"), None)), vec![b"d".to_vec()]);
        assert_eq!(keys(t.range(Some(b"a"), Some(b"b"))), vec![b"b".to_vec()]);
        assert!(t.range(Some(b"b"), Some(b"c")).is_empty());
        assert!(t.range(Some(b"d"), Some(b"b")).is_empty());
        assert!(t.over_budget(4));
        assert!(!t.over_budget(5));
    }
}
