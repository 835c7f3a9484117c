//! Range limits on everything a peer can put in a message, and the check that enforces them.
//!
//! Why: a message can be perfectly well-formed on the wire and still absurd. One `Vote` with
//! term 2^64−1 used to be adopted and persisted by every node; `term + 1` then wrapped and no
//! leader could ever be elected again, not even after restarts. So every term, index and size
//! a peer sends is range-checked before the core acts on it, in one place:
//! - the node calls `node::peer::validate` (which calls [`check_message`] and adds the checks
//!   that need the connection: sender identity, recipient, snapshot chunks) right after
//!   decoding a frame, and drops what fails;
//! - [`crate::raft::Raft::step`] calls [`check_message`] again (defence in depth), so the core
//!   never adopts a term at or above [`TERM_MAX`] whoever calls it, nor one more than
//!   [`TERM_JUMP_MAX`] above its own.
//!
//! The bounds are far beyond any real cluster (2^62 elections or entries would take millions
//! of years at a million per second) and leave headroom, so the core's `+ 1` on a term or
//! index it holds can never overflow: [`succ`] asserts exactly that.

use raftkv_types::{Entry, SnapshotMeta};

use super::config::LEASE_MS_MAX;
use super::message::{Message, MessageBody};

/// Terms are below this (2^62). The core never adopts a term at or above it, and never
/// campaigns into it.
pub const TERM_MAX: u64 = 1 << 62;
/// The core refuses a message whose term is more than this (2^32) above its own: no real
/// cluster's terms jump that far (one election per millisecond would take 50 days to get
/// there), and without this one forged term just below [`TERM_MAX`] would use up the term
/// space at once.
pub const TERM_JUMP_MAX: u64 = 1 << 32;
/// Log indexes (and commit indexes, and read rounds) are below this (2^62).
pub const INDEX_MAX: u64 = 1 << 62;
/// Most entries in one `Append`. A leader sends at most `append_bytes_max` worth (at least
/// one entry); at ≥ 28 encoded bytes per entry a 16 MiB frame holds fewer than this anyway.
pub const APPEND_ENTRIES_MAX: usize = 1 << 20;
/// Most payload bytes of one entry (the default peer frame limit: no larger entry can arrive).
pub const ENTRY_PAYLOAD_BYTES_MAX: usize = 16 << 20;
/// Most members (voters plus learners) a membership in a message may name.
pub const MEMBERS_MAX: usize = 1024;
/// Largest snapshot file a follower accepts (1 TiB).
pub const SNAPSHOT_BYTES_MAX: u64 = 1 << 40;

/// Why a message was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} message: {reason}")]
pub struct InvalidMessage {
    /// The message kind (`Append`, `Vote`, `SnapshotChunk`, ...).
    pub kind: &'static str,
    pub reason: String,
}

impl InvalidMessage {
    pub fn new(kind: &'static str, reason: impl Into<String>) -> InvalidMessage {
        InvalidMessage {
            kind,
            reason: reason.into(),
        }
    }
}

/// `value + 1` for a term or index the core holds. Such values are below [`TERM_MAX`] /
/// [`INDEX_MAX`] (enforced by [`check_message`] and `Raft::restart`), so this cannot wrap;
/// the assertion states the invariant where it is used.
pub fn succ(value: u64) -> u64 {
    assert!(
        value < INDEX_MAX.max(TERM_MAX),
        "term or index {value} is out of range"
    );
    value + 1
}

/// `value - 1` for an index known to be positive (asserted).
pub fn pred(value: u64) -> u64 {
    assert!(value > 0, "index 0 has no predecessor");
    value - 1
}

fn check_term(kind: &'static str, what: &str, term: u64) -> Result<(), InvalidMessage> {
    if term >= TERM_MAX {
        return Err(InvalidMessage::new(
            kind,
            format!("{what} {term} is not below {TERM_MAX}"),
        ));
    }
    Ok(())
}

fn check_index(kind: &'static str, what: &str, index: u64) -> Result<(), InvalidMessage> {
    if index >= INDEX_MAX {
        return Err(InvalidMessage::new(
            kind,
            format!("{what} {index} is not below {INDEX_MAX}"),
        ));
    }
    Ok(())
}

/// Range checks of a snapshot's metadata sent in the leader's `term`.
pub fn check_snapshot_meta(
    kind: &'static str,
    meta: &SnapshotMeta,
    term: u64,
) -> Result<(), InvalidMessage> {
    check_index(kind, "snapshot index", meta.index)?;
    check_term(kind, "snapshot term", meta.term)?;
    if meta.index == 0 || meta.term == 0 || meta.term > term {
        return Err(InvalidMessage::new(
            kind,
            format!(
                "snapshot {}@{} in term {term} is impossible",
                meta.index, meta.term
            ),
        ));
    }
    let members = meta.membership.voters.len() + meta.membership.learners.len();
    if meta.membership.voters.is_empty() || members > MEMBERS_MAX {
        return Err(InvalidMessage::new(
            kind,
            format!("snapshot membership of {members} members"),
        ));
    }
    Ok(())
}

/// Range and consistency checks of one message, independent of who sent it and how: terms and
/// indexes below their bounds, an append's entries contiguous after `prev_index` with terms
/// between `prev_term` and the message's term, sizes within limits, hints that can be true.
pub fn check_message(m: &Message) -> Result<(), InvalidMessage> {
    let kind = m.body.name();
    check_term(kind, "term", m.term)?;
    match &m.body {
        MessageBody::Append {
            prev_index,
            prev_term,
            entries,
            commit,
        } => check_append(m.term, *prev_index, *prev_term, entries, *commit),
        MessageBody::AppendResponse {
            index,
            hint,
            reject,
        } => {
            check_index(kind, "index", *index)?;
            match hint {
                Some((hint_index, hint_term)) if *reject => {
                    check_index(kind, "hint index", *hint_index)?;
                    if hint_index > index || *hint_term > m.term {
                        return Err(InvalidMessage::new(
                            kind,
                            format!("hint {hint_index}@{hint_term} beyond {index}@{}", m.term),
                        ));
                    }
                    Ok(())
                }
                Some(_) => Err(InvalidMessage::new(kind, "hint on a success")),
                None => Ok(()),
            }
        }
        MessageBody::Heartbeat {
            commit,
            read_round,
            lease_ms,
        } => {
            check_index(kind, "commit", *commit)?;
            check_index(kind, "read round", *read_round)?;
            if *lease_ms > LEASE_MS_MAX {
                return Err(InvalidMessage::new(
                    kind,
                    format!("lease of {lease_ms} ms exceeds {LEASE_MS_MAX} ms"),
                ));
            }
            Ok(())
        }
        MessageBody::HeartbeatResponse { read_round } => {
            check_index(kind, "read round", *read_round)
        }
        MessageBody::Vote {
            last_index,
            last_term,
            ..
        } => {
            check_index(kind, "last index", *last_index)?;
            if *last_term > m.term {
                return Err(InvalidMessage::new(
                    kind,
                    format!("last term {last_term} above the term {}", m.term),
                ));
            }
            Ok(())
        }
        MessageBody::InstallSnapshot { meta } => check_snapshot_meta(kind, meta, m.term),
        MessageBody::VoteResponse { .. } | MessageBody::TimeoutNow => Ok(()),
    }
}

fn check_append(
    term: u64,
    prev_index: u64,
    prev_term: u64,
    entries: &[Entry],
    commit: u64,
) -> Result<(), InvalidMessage> {
    const KIND: &str = "Append";
    check_index(KIND, "prev index", prev_index)?;
    // The leader's commit may exceed what this append carries (the follower clamps it to the
    // last new entry); it only has to be in range.
    check_index(KIND, "commit", commit)?;
    if prev_term > term {
        return Err(InvalidMessage::new(
            KIND,
            format!("prev term {prev_term} above the term {term}"),
        ));
    }
    if entries.len() > APPEND_ENTRIES_MAX {
        return Err(InvalidMessage::new(
            KIND,
            format!("{} entries (max {APPEND_ENTRIES_MAX})", entries.len()),
        ));
    }
    let mut expected_index = prev_index;
    let mut min_term = prev_term;
    for e in entries {
        // `expected_index < INDEX_MAX` here (checked above or below), so this cannot wrap.
        expected_index = succ(expected_index);
        if e.index != expected_index || e.index >= INDEX_MAX {
            return Err(InvalidMessage::new(
                KIND,
                format!("entry index {} where {expected_index} was due", e.index),
            ));
        }
        if e.term < min_term || e.term > term {
            return Err(InvalidMessage::new(
                KIND,
                format!(
                    "entry {} has term {} outside {min_term}..={term}",
                    e.index, e.term
                ),
            ));
        }
        if e.payload.len() > ENTRY_PAYLOAD_BYTES_MAX {
            return Err(InvalidMessage::new(
                KIND,
                format!("entry {} of {} bytes", e.index, e.payload.len()),
            ));
        }
        min_term = e.term;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftkv_types::{EntryKind, Membership};

    fn msg(term: u64, body: MessageBody) -> Message {
        Message {
            from: 1,
            to: 2,
            term,
            body,
        }
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            payload: vec![1].into(),
        }
    }

    fn append(prev_index: u64, prev_term: u64, entries: Vec<Entry>, commit: u64) -> MessageBody {
        MessageBody::Append {
            prev_index,
            prev_term,
            entries,
            commit,
        }
    }

    #[test]
    fn plausible_messages_pass() {
        let ok = [
            msg(3, append(4, 2, vec![entry(5, 2), entry(6, 3)], 9)),
            msg(3, append(0, 0, vec![], 0)),
            msg(
                TERM_MAX - 1,
                MessageBody::Vote {
                    pre: true,
                    last_index: INDEX_MAX - 1,
                    last_term: 7,
                    transfer: false,
                },
            ),
            msg(
                3,
                MessageBody::AppendResponse {
                    reject: true,
                    index: 9,
                    hint: Some((4, 2)),
                },
            ),
            msg(
                3,
                MessageBody::Heartbeat {
                    commit: 5,
                    read_round: 8,
                    lease_ms: 0,
                },
            ),
            msg(
                3,
                MessageBody::InstallSnapshot {
                    meta: SnapshotMeta {
                        index: 10,
                        term: 3,
                        membership: Membership::with_voters([1, 2, 3]),
                    },
                },
            ),
        ];
        for m in ok {
            assert_eq!(check_message(&m), Ok(()), "{m}");
        }
    }

    #[test]
    fn absurd_messages_are_refused() {
        let vote = |term, last_index, last_term| {
            msg(
                term,
                MessageBody::Vote {
                    pre: false,
                    last_index,
                    last_term,
                    transfer: false,
                },
            )
        };
        let bad = [
            vote(u64::MAX, 1, 1),
            vote(TERM_MAX, 1, 1),
            vote(3, INDEX_MAX, 1),
            vote(3, 1, 4),
            msg(3, append(u64::MAX, 1, vec![], 0)),
            msg(3, append(u64::MAX - 1, 1, vec![entry(u64::MAX, 1)], 0)),
            msg(3, append(4, 2, vec![], u64::MAX)),
            msg(3, append(4, 4, vec![], 1)),
            msg(3, append(4, 2, vec![entry(6, 2)], 1)),
            msg(3, append(4, 2, vec![entry(5, 3), entry(6, 2)], 1)),
            msg(3, append(4, 2, vec![entry(5, 1)], 1)),
            msg(3, append(4, 2, vec![entry(5, 4)], 1)),
            msg(
                3,
                MessageBody::AppendResponse {
                    reject: true,
                    index: 3,
                    hint: Some((4, 2)),
                },
            ),
            msg(
                3,
                MessageBody::AppendResponse {
                    reject: false,
                    index: u64::MAX,
                    hint: None,
                },
            ),
            msg(
                3,
                MessageBody::Heartbeat {
                    commit: u64::MAX,
                    read_round: 0,
                    lease_ms: 0,
                },
            ),
            msg(
                3,
                MessageBody::Heartbeat {
                    commit: 1,
                    read_round: 0,
                    lease_ms: LEASE_MS_MAX + 1,
                },
            ),
            msg(
                3,
                MessageBody::HeartbeatResponse {
                    read_round: u64::MAX,
                },
            ),
            msg(
                3,
                MessageBody::InstallSnapshot {
                    meta: SnapshotMeta {
                        index: 10,
                        term: 4,
                        membership: Membership::with_voters([1]),
                    },
                },
            ),
        ];
        for m in bad {
            assert!(check_message(&m).is_err(), "accepted {m}");
        }
    }

    #[test]
    fn succ_and_pred_assert_their_range() {
        assert_eq!(succ(INDEX_MAX - 1), INDEX_MAX);
        assert_eq!(pred(1), 0);
        assert!(std::panic::catch_unwind(|| succ(u64::MAX)).is_err());
        assert!(std::panic::catch_unwind(|| pred(0)).is_err());
    }
}
