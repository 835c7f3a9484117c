//! Watch history: every change to a user key, kept in the state tree by revision so a watcher
//! can resume from any retained revision on any node, after a restart, and on a follower
//! that installed a snapshot.
//!
//! Why in the state tree and not in the Raft log or in memory: the log is compacted by
//! snapshots on a schedule of its own (the issue asks for history independent of it), and an
//! in-memory ring dies with the process. Records written in the same sled batch as the change
//! itself can never disagree with the data; because they sit in the state tree, snapshots
//! carry them, so a follower that installs a snapshot keeps the leader's history.
//!
//! ```text
//! h ‖ revision u64 ‖ seq u32   → kind u8 (1 put, 2 delete) ‖ key len u32 ‖ key ‖ key record (put)
//! c/history                    → compact revision u64 (every record at or below it is gone)
//!                                ‖ bytes u64 (of every history record's key and value)
//! ```
//!
//! Bounds: once records at or below `last applied − retain_revisions` span more than a slack
//! ([`prune_slack`]: up to 1,024 revisions), an apply batch removes them (at most as many as
//! it wrote plus [`PRUNE_RECORDS_PER_BATCH`], always a whole revision, so a lowered bound is
//! caught up over a few batches) and `c/history` advances. Revisions are Raft indexes, so a
//! bound of N revisions is N log entries, whatever they changed. A second bound is in bytes
//! (`bytes_max`, `--watch-history-mb`): N revisions of large values could otherwise fill
//! the disk and every snapshot; past it the oldest revisions go (down to 15/16 of the bound)
//! even within the revision bound, and a watch from before them is answered `compacted`.

use super::exec::Exec;
use super::record::{self, KeyMeta};
use super::SmError;
use crate::command::KeyRecord;
use sled::IVec;

/// The prefix byte of history records.
pub const HISTORY_PREFIX: u8 = b'h';
/// The key of the compact revision.
pub const COMPACT_KEY: &[u8] = b"c/history";
/// Revisions retained by default (`--watch-history-revisions`).
pub const HISTORY_REVISIONS_DEFAULT: u64 = 100_000;
/// History records removed per apply batch at most, beyond as many as the batch wrote (so
/// pruning keeps up with any write rate) and beyond finishing a revision.
pub const PRUNE_RECORDS_PER_BATCH: usize = 4096;
/// Bytes of matching changes a history page holds at most (cut at a revision boundary; one
/// revision is always taken whole), so a replay's memory does not grow with the value sizes.
pub const PAGE_BYTES_MAX: usize = 1 << 20;
const EVENT_PUT: u8 = 1;
const EVENT_DELETE: u8 = 2;
const HISTORY_KEY_BYTES: usize = 13;

/// One change to a user key, as applied at `revision`: what a watcher is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeEvent {
    pub revision: u64,
    pub key: Vec<u8>,
    /// The key's record after a put (revisions, lease, value); `None` for a delete.
    pub record: Option<IVec>,
}

impl ChangeEvent {
    /// The key's revisions and value after a put; `None` for a delete.
    pub fn put_record(&self) -> Result<Option<(KeyMeta, &[u8])>, String> {
        match &self.record {
            None => Ok(None),
            Some(raw) => record::decode_key(raw).map(Some),
        }
    }

    /// Bytes this event holds (for watchers' memory budgets).
    pub fn size_bytes(&self) -> usize {
        self.key.len() + self.record.as_ref().map_or(0, |r| r.len()) + 48
    }

    /// The key's record after a put, owned.
    pub fn key_record(&self) -> Result<Option<KeyRecord>, String> {
        match &self.record {
            None => Ok(None),
            Some(raw) => record::key_record(&self.key, raw).map(Some),
        }
    }
}

/// Which keys a watcher wants.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyFilter {
    Key(Vec<u8>),
    /// Every key starting with the prefix (the empty prefix: every key).
    Prefix(Vec<u8>),
}

impl KeyFilter {
    pub fn matches(&self, key: &[u8]) -> bool {
        match self {
            KeyFilter::Key(k) => k.as_slice() == key,
            KeyFilter::Prefix(p) => key.starts_with(p),
        }
    }
}

/// The revision of a history key (`None`: not one).
fn revision_of(hkey: &[u8]) -> Option<u64> {
    if hkey.len() != HISTORY_KEY_BYTES || hkey[0] != HISTORY_PREFIX {
        return None;
    }
    let mut rev = [0u8; 8];
    rev.copy_from_slice(&hkey[1..9]);
    Some(u64::from_be_bytes(rev))
}

/// `h ‖ revision ‖ seq`.
pub fn history_key(revision: u64, seq: u32) -> [u8; HISTORY_KEY_BYTES] {
    let mut k = [0u8; HISTORY_KEY_BYTES];
    k[0] = HISTORY_PREFIX;
    k[1..9].copy_from_slice(&revision.to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn encode_event(e: &ChangeEvent) -> Vec<u8> {
    let rec: &[u8] = e.record.as_deref().unwrap_or(&[]);
    let mut v = Vec::with_capacity(5 + e.key.len() + rec.len());
    v.push(if e.record.is_some() {
        EVENT_PUT
    } else {
        EVENT_DELETE
    });
    v.extend_from_slice(&(e.key.len() as u32).to_be_bytes());
    v.extend_from_slice(&e.key);
    v.extend_from_slice(rec);
    v
}

/// The changed key of a history record, without copying anything (for filtering a page
/// before its matches are decoded); every length is checked.
fn event_key(value: &[u8]) -> Result<&[u8], String> {
    if value.len() < 5 {
        return Err(format!("a history record of {} bytes", value.len()));
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&value[1..5]);
    let key_len = u32::from_be_bytes(len) as usize;
    let rest = &value[5..];
    if key_len == 0 || key_len > rest.len() {
        return Err(format!("a history record's key of {key_len} bytes"));
    }
    Ok(&rest[..key_len])
}

/// Decodes a history record; every length is checked (the tree is outside data).
pub fn decode_event(hkey: &[u8], value: &[u8]) -> Result<ChangeEvent, String> {
    let revision =
        revision_of(hkey).ok_or_else(|| format!("a history key of {} bytes", hkey.len()))?;
    let key = event_key(value)?;
    let rec = &value[5 + key.len()..];
    let record = match value[0] {
        EVENT_PUT => {
            let (meta, _) = record::decode_key(rec)?;
            if meta.mod_revision != revision {
                return Err(format!(
                    "a history record at revision {revision} holds a write of revision {}",
                    meta.mod_revision
                ));
            }
            Some(IVec::from(rec))
        }
        EVENT_DELETE if rec.is_empty() => None,
        other => return Err(format!("a history record of kind {other}")),
    };
    Ok(ChangeEvent {
        revision,
        key: key.to_vec(),
        record,
    })
}

/// Revisions pruning waits for beyond the bound: none for small bounds (tests), a sixteenth
/// of the bound up to [`PRUNE_SLACK_MAX`] otherwise.
pub fn prune_slack(retain_revisions: u64) -> u64 {
    if retain_revisions < 1024 {
        0
    } else {
        (retain_revisions / 16).min(PRUNE_SLACK_MAX)
    }
}

/// The most revisions pruning waits for beyond the bound.
pub const PRUNE_SLACK_MAX: u64 = 1024;

/// Bytes of history kept by default (`--watch-history-mb`): 1 GiB.
pub const HISTORY_BYTES_DEFAULT: u64 = 1 << 30;

/// The history's bounds and how far it has been pruned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistoryState {
    /// Every change at or below this revision is gone.
    pub compact_revision: u64,
    pub retain_revisions: u64,
    /// Bytes of the history records in the tree (keys and values).
    pub bytes: u64,
    pub bytes_max: u64,
    /// (compact revision, bytes) as `c/history` holds them.
    persisted: (u64, u64),
}

impl HistoryState {
    /// A history that starts after `compact_revision` and holds nothing yet.
    pub fn empty(compact_revision: u64, retain_revisions: u64, bytes_max: u64) -> HistoryState {
        HistoryState {
            compact_revision,
            retain_revisions,
            bytes: 0,
            bytes_max,
            persisted: (compact_revision, 0),
        }
    }

    /// `c/history` as it should be now.
    pub fn encoded(&self) -> [u8; 16] {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&self.compact_revision.to_be_bytes());
        v[8..].copy_from_slice(&self.bytes.to_be_bytes());
        v
    }

    /// Reads `c/history` of `tree`. A tree without it (made before history existed) has no
    /// history up to its applied index: `None` asks the caller to record that. A compact
    /// revision alone (8 bytes, before the byte bound) has its bytes counted once here.
    pub fn load(
        tree: &sled::Tree,
        retain_revisions: u64,
        bytes_max: u64,
    ) -> Result<Option<HistoryState>, String> {
        let Some(raw) = tree.get(COMPACT_KEY).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&raw[at..at + 8]);
            u64::from_be_bytes(w)
        };
        let (compact_revision, bytes) = match raw.len() {
            16 => (word(0), word(8)),
            8 => (word(0), count_bytes(tree)?),
            n => return Err(format!("a history state of {n} bytes")),
        };
        Ok(Some(HistoryState {
            compact_revision,
            retain_revisions,
            bytes,
            bytes_max,
            persisted: (compact_revision, bytes),
        }))
    }

    /// Writes `c/history` if it changed.
    fn persist(&mut self, exec: &mut Exec<'_>) -> Result<(), SmError> {
        let now = (self.compact_revision, self.bytes);
        if now != self.persisted {
            exec.write(COMPACT_KEY.to_vec(), Some(IVec::from(&self.encoded()[..])))?;
            self.persisted = now;
        }
        Ok(())
    }

    /// Writes `events` (this batch's changes, in order) as history records.
    pub fn record(&mut self, exec: &mut Exec<'_>, events: &[ChangeEvent]) -> Result<(), SmError> {
        let mut seq = 0u32;
        let mut last_revision = 0;
        for e in events {
            assert!(e.revision >= last_revision, "events come in revision order");
            if e.revision != last_revision {
                seq = 0;
                last_revision = e.revision;
            }
            let value = encode_event(e);
            self.bytes = self
                .bytes
                .saturating_add((HISTORY_KEY_BYTES + value.len()) as u64);
            exec.write(
                history_key(e.revision, seq).to_vec(),
                Some(IVec::from(value)),
            )?;
            seq = seq
                .checked_add(1)
                .ok_or_else(|| SmError::Record("more than 2^32 changes in one entry".into()))?;
        }
        Ok(())
    }

    /// Removes records at or below `last_index − retain_revisions` from the tree (not those of
    /// this batch, which are all above the applied index), and the oldest beyond that while
    /// the history is over its byte bound — at most as many as the batch wrote (`written`)
    /// plus [`PRUNE_RECORDS_PER_BATCH`], so a backlog shrinks under any write rate — and
    /// advances the compact revision; then writes `c/history` if it changed.
    pub fn prune(
        &mut self,
        exec: &mut Exec<'_>,
        last_index: u64,
        written: usize,
    ) -> Result<(), SmError> {
        let cutoff = last_index.saturating_sub(self.retain_revisions);
        // Pruning by revisions waits until a slack is due (keeping a little more than the
        // bound): one range scan per slack, not per batch.
        let by_revisions = cutoff
            > self
                .compact_revision
                .saturating_add(prune_slack(self.retain_revisions));
        let by_bytes = self.bytes > self.bytes_max;
        if by_revisions || by_bytes {
            let through = if by_bytes { last_index } else { cutoff };
            let allowance = PRUNE_RECORDS_PER_BATCH.saturating_add(written);
            let reached = self.remove_oldest(exec, through, cutoff, allowance)?;
            debug_assert!(reached <= last_index);
            self.compact_revision = self.compact_revision.max(reached);
        }
        self.persist(exec)
    }

    /// Removes whole revisions from the oldest on, up to `through`: all of those at or below
    /// `cutoff`, and later ones while the bytes left are over 15/16 of the bound, stopping
    /// at a revision boundary once `allowance` records are gone. Returns the last revision
    /// removed (or `through` when nothing is left up to it).
    fn remove_oldest(
        &mut self,
        exec: &mut Exec<'_>,
        through: u64,
        cutoff: u64,
        allowance: usize,
    ) -> Result<u64, SmError> {
        let low_water = self.bytes_max - self.bytes_max / 16;
        let end = history_key(through.saturating_add(1), 0);
        let mut doomed: Vec<IVec> = Vec::new();
        let mut freed = 0u64;
        let mut current = None;
        let mut reached = through;
        for item in exec.tree().range(&[HISTORY_PREFIX][..]..&end[..]) {
            let (k, v) = item?;
            let revision =
                revision_of(&k).ok_or_else(|| SmError::Record("a damaged history key".into()))?;
            if current != Some(revision) {
                let small_enough = self.bytes.saturating_sub(freed) <= low_water;
                if doomed.len() >= allowance || (revision > cutoff && small_enough) {
                    reached = revision - 1;
                    break;
                }
                current = Some(revision);
            }
            freed = freed.saturating_add((k.len() + v.len()) as u64);
            doomed.push(k);
        }
        for k in doomed {
            exec.write(k.to_vec(), None)?;
        }
        self.bytes = self.bytes.saturating_sub(freed);
        Ok(reached)
    }
}

/// Bytes of every history record in `tree` (once, for a state written before they were
/// counted).
fn count_bytes(tree: &sled::Tree) -> Result<u64, String> {
    let mut bytes = 0u64;
    for item in tree.scan_prefix([HISTORY_PREFIX]) {
        let (k, v) = item.map_err(|e| e.to_string())?;
        bytes = bytes.saturating_add((k.len() + v.len()) as u64);
    }
    Ok(bytes)
}

/// One page of history read for a watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryPage {
    /// Matching changes, in revision order.
    pub events: Vec<ChangeEvent>,
    /// The revision the next page starts at (past `through` when the range is done).
    pub next_revision: u64,
}

/// Why history cannot be read from a revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("history up to revision {compact_revision} is compacted")]
pub struct Compacted {
    pub compact_revision: u64,
}

/// Reads the changes of revisions `from..=through` that `filter` matches, looking at most at
/// `records_max` records (then `next_revision` says where to go on, always at a revision
/// boundary).
pub fn read_page(
    tree: &sled::Tree,
    from: u64,
    through: u64,
    filter: &KeyFilter,
    records_max: usize,
) -> Result<HistoryPage, SmError> {
    assert!(records_max > 0, "a page looks at one record at least");
    let mut events = Vec::new();
    let mut last_revision = None;
    let start = history_key(from, 0);
    let end = history_key(through.saturating_add(1), 0);
    if from > through {
        return Ok(HistoryPage {
            events,
            next_revision: from,
        });
    }
    let mut bytes = 0usize;
    for (looked, item) in tree.range(&start[..]..&end[..]).enumerate() {
        let (k, v) = item?;
        let revision = revision_of(&k)
            .ok_or_else(|| SmError::Record(format!("a history key of {} bytes", k.len())))?;
        let full = looked >= records_max || bytes >= PAGE_BYTES_MAX;
        if full && last_revision != Some(revision) {
            return Ok(HistoryPage {
                events,
                next_revision: revision,
            });
        }
        last_revision = Some(revision);
        if filter.matches(event_key(&v).map_err(SmError::Record)?) {
            let e = decode_event(&k, &v).map_err(SmError::Record)?;
            bytes = bytes.saturating_add(e.size_bytes());
            events.push(e);
        }
    }
    debug_assert!(events.windows(2).all(|w| w[0].revision <= w[1].revision));
    Ok(HistoryPage {
        events,
        next_revision: through.saturating_add(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_records_round_trip_and_reject_damage() {
        let meta = KeyMeta {
            create_revision: 3,
            mod_revision: 9,
            version: 2,
            lease: 0,
        };
        let put = ChangeEvent {
            revision: 9,
            key: b"a/b".to_vec(),
            record: Some(IVec::from(record::encode_key(&meta, b"v"))),
        };
        let del = ChangeEvent {
            revision: 10,
            key: b"a/c".to_vec(),
            record: None,
        };
        for e in [&put, &del] {
            let k = history_key(e.revision, 0);
            assert_eq!(decode_event(&k, &encode_event(e)).unwrap(), *e);
        }
        let k = history_key(9, 0);
        let good = encode_event(&put);
        assert!(decode_event(&k, &good[..4]).is_err());
        assert!(
            decode_event(&history_key(8, 0), &good).is_err(),
            "revision mismatch"
        );
        let mut bad_len = good.clone();
        bad_len[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_event(&k, &bad_len).is_err());
        let mut bad_kind = good;
        bad_kind[0] = 7;
        assert!(decode_event(&k, &bad_kind).is_err());
        assert!(decode_event(&k[..5], &encode_event(&del)).is_err());
    }

    #[test]
    fn filters_match_keys_and_prefixes() {
        assert!(KeyFilter::Key(b"a".to_vec()).matches(b"a"));
        assert!(!KeyFilter::Key(b"a".to_vec()).matches(b"ab"));
        assert!(KeyFilter::Prefix(b"a".to_vec()).matches(b"ab"));
        assert!(KeyFilter::Prefix(Vec::new()).matches(b"z"));
        assert!(!KeyFilter::Prefix(b"b".to_vec()).matches(b"a"));
    }
}
