//! The cluster configuration: who votes, who only receives the log, and where each member is
//! reached — and the quorum arithmetic every decision of the consensus core goes through.
//!
//! Why here: a configuration lives in the log (Config entries), in snapshot metadata, in the
//! WAL's snapshot marker and in the state machine, so all layers must share one type and one
//! notion of "a quorum of it".
//!
//! **Joint consensus** (Raft paper §6): while a change of voters is under way the
//! configuration is *joint*: `voters_outgoing` holds the old voter set and `voters` the new one,
//! and every decision (an election, a commit, a read confirmation, check-quorum) needs a
//! majority of **each**. Outside a change `voters_outgoing` is empty and a majority of
//! `voters` suffices. Learners receive the log and never count toward any quorum.
//!
//! **On disk** a Config entry's payload is this type through [`crate::codec`]. The first two
//! fields are the original (round 1) form, so [`Membership::decode`] reads both the current
//! form and the older one (voters and learners only). The hand-framed WAL snapshot marker and
//! snapshot meta chunk append [`Membership::encode_tail`] after their voter and learner lists;
//! an empty tail is the older form.
//!
//! Invariants (checked by [`Membership::validate`]): `voters` is not empty; no id is 0; a
//! learner is not a voter of either half; at most [`MEMBERS_MAX`] members; every address is at
//! most [`ADDR_BYTES_MAX`] bytes and belongs to a member.

use crate::{codec, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Most members (voters of both halves plus learners) a configuration may name.
pub const MEMBERS_MAX: usize = 1024;
/// Longest peer address or client URL a configuration may carry.
pub const ADDR_BYTES_MAX: usize = 512;

/// Where a member is reached: its peer port and the URL clients use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAddrs {
    /// `host:port` of the member's peer transport.
    pub peer_addr: String,
    /// `http(s)://host:port` of the member's client API (may be empty: unknown).
    pub client_url: String,
}

/// A cluster configuration (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// The voters (in a joint configuration: the incoming voters).
    pub voters: BTreeSet<NodeId>,
    /// Members that receive the log but never vote or count toward a quorum.
    pub learners: BTreeSet<NodeId>,
    /// Non-empty only in a joint configuration: the outgoing voters.
    pub voters_outgoing: BTreeSet<NodeId>,
    /// Addresses of members added through a membership change (and, from the first change on,
    /// of every member). Members bootstrapped from flags have none until then.
    pub addrs: BTreeMap<NodeId, MemberAddrs>,
}

/// The round-1 form of a Config payload: voters and learners only.
#[derive(Deserialize)]
struct MembershipV1 {
    voters: BTreeSet<NodeId>,
    learners: BTreeSet<NodeId>,
}

/// A configuration that breaks an invariant of the module doc.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("a configuration needs at least one voter")]
    NoVoters,
    #[error("node id 0 is reserved")]
    ZeroId,
    #[error("node {0} is both a learner and a voter")]
    LearnerVotes(NodeId),
    #[error("{0} members exceed the limit of {MEMBERS_MAX}")]
    TooMany(usize),
    #[error("the address of node {0} is too long or names no member")]
    BadAddr(NodeId),
    #[error("undecodable configuration: {0}")]
    Undecodable(String),
}

impl Membership {
    /// A configuration of voters only.
    pub fn with_voters(voters: impl IntoIterator<Item = NodeId>) -> Membership {
        Membership {
            voters: voters.into_iter().collect(),
            ..Membership::default()
        }
    }

    /// Whether a change of voters is under way (two voter sets decide together).
    pub fn is_joint(&self) -> bool {
        !self.voters_outgoing.is_empty()
    }

    /// Whether `id` votes in either half.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.voters_outgoing.contains(&id)
    }

    /// Whether `id` is a voter of either half or a learner.
    pub fn contains(&self, id: NodeId) -> bool {
        self.is_voter(id) || self.learners.contains(&id)
    }

    /// Every voter of either half, sorted.
    pub fn all_voters(&self) -> BTreeSet<NodeId> {
        self.voters.union(&self.voters_outgoing).copied().collect()
    }

    /// Every member (voters of both halves and learners), sorted.
    pub fn members(&self) -> BTreeSet<NodeId> {
        let mut all = self.all_voters();
        all.extend(self.learners.iter().copied());
        all
    }

    /// Whether the nodes for which `yes` holds form a quorum: a majority of `voters` and, in
    /// a joint configuration, a majority of `voters_outgoing` too.
    pub fn is_quorum(&self, yes: impl Fn(NodeId) -> bool) -> bool {
        debug_assert!(!self.voters.is_empty(), "quorum of an empty configuration");
        majority(&self.voters, &yes)
            && (self.voters_outgoing.is_empty() || majority(&self.voters_outgoing, &yes))
    }

    /// Whether the nodes for which `no` holds make a quorum impossible in either half: a
    /// majority of one half said no (an election is lost).
    pub fn is_blocked(&self, no: impl Fn(NodeId) -> bool) -> bool {
        majority(&self.voters, &no)
            || (!self.voters_outgoing.is_empty() && majority(&self.voters_outgoing, &no))
    }

    /// The highest value a quorum has reached, given each voter's value (`value(id)`; 0 for
    /// unknown): the commit rule and the read-round rule in one. In a joint configuration the
    /// smaller of the two halves' results.
    pub fn quorum_value(&self, value: impl Fn(NodeId) -> u64) -> u64 {
        let incoming = majority_value(&self.voters, &value);
        if self.voters_outgoing.is_empty() {
            return incoming;
        }
        incoming.min(majority_value(&self.voters_outgoing, &value))
    }

    /// Checks the invariants of the module doc.
    pub fn validate(&self) -> Result<(), MembershipError> {
        if self.voters.is_empty() {
            return Err(MembershipError::NoVoters);
        }
        self.validate_members()
    }

    /// [`Membership::validate`] without the voter check: an empty configuration is the
    /// "no snapshot yet" placeholder of the hand-framed records.
    fn validate_members(&self) -> Result<(), MembershipError> {
        let members = self.members();
        if members.contains(&0) {
            return Err(MembershipError::ZeroId);
        }
        if let Some(&id) = self.learners.iter().find(|&&id| self.is_voter(id)) {
            return Err(MembershipError::LearnerVotes(id));
        }
        if members.len() > MEMBERS_MAX {
            return Err(MembershipError::TooMany(members.len()));
        }
        for (&id, a) in &self.addrs {
            let too_long =
                a.peer_addr.len() > ADDR_BYTES_MAX || a.client_url.len() > ADDR_BYTES_MAX;
            if too_long || !members.contains(&id) {
                return Err(MembershipError::BadAddr(id));
            }
        }
        Ok(())
    }

    /// The Config entry payload for this configuration.
    pub fn encode(&self) -> Result<Vec<u8>, MembershipError> {
        codec::encode(self).map_err(|e| MembershipError::Undecodable(e.to_string()))
    }

    /// Decodes a Config entry payload, current or round-1 form, and validates it (except for
    /// the voter count: the state machine's "nothing applied yet" value has no voters; the
    /// consensus core checks a Config entry's voters itself).
    pub fn decode(bytes: &[u8]) -> Result<Membership, MembershipError> {
        let m = match codec::decode::<Membership>(bytes) {
            Ok(m) => m,
            Err(current) => match codec::decode::<MembershipV1>(bytes) {
                Ok(v1) => Membership {
                    voters: v1.voters,
                    learners: v1.learners,
                    ..Membership::default()
                },
                Err(_) => return Err(MembershipError::Undecodable(current.to_string())),
            },
        };
        m.validate_members()?;
        Ok(m)
    }

    /// Appends what the hand-framed formats (WAL snapshot marker, snapshot meta chunk) carry
    /// after their voter and learner lists: `u32` count + ids of `voters_outgoing`, then `u32`
    /// count of addresses, each `u64` id, `u16` length + peer address, `u16` length + client
    /// URL (little-endian). Nothing at all when both are empty, so such a record is
    /// byte-identical to the older form.
    pub fn encode_tail(&self, out: &mut Vec<u8>) {
        if self.voters_outgoing.is_empty() && self.addrs.is_empty() {
            return;
        }
        out.extend_from_slice(&(self.voters_outgoing.len() as u32).to_le_bytes());
        for id in &self.voters_outgoing {
            out.extend_from_slice(&id.to_le_bytes());
        }
        out.extend_from_slice(&(self.addrs.len() as u32).to_le_bytes());
        for (id, a) in &self.addrs {
            out.extend_from_slice(&id.to_le_bytes());
            for s in [&a.peer_addr, &a.client_url] {
                debug_assert!(s.len() <= ADDR_BYTES_MAX, "address over the limit");
                out.extend_from_slice(&(s.len() as u16).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
    }

    /// Reads what [`Membership::encode_tail`] wrote (all of `tail`) into `self`, range-checking
    /// every count and length against the bytes present; then validates the whole.
    pub fn decode_tail(&mut self, tail: &[u8]) -> Result<(), MembershipError> {
        let mut r = TailReader { bytes: tail };
        if !tail.is_empty() {
            let outgoing = r.count(8)?;
            for _ in 0..outgoing {
                self.voters_outgoing.insert(r.u64()?);
            }
            let addrs = r.count(12)?;
            for _ in 0..addrs {
                let id = r.u64()?;
                let peer_addr = r.string()?;
                let client_url = r.string()?;
                self.addrs.insert(
                    id,
                    MemberAddrs {
                        peer_addr,
                        client_url,
                    },
                );
            }
            if !r.bytes.is_empty() {
                return Err(MembershipError::Undecodable("trailing bytes".into()));
            }
        }
        self.validate_members()
    }
}

fn majority(set: &BTreeSet<NodeId>, yes: &impl Fn(NodeId) -> bool) -> bool {
    set.iter().filter(|&&id| yes(id)).count() > set.len() / 2
}

fn majority_value(set: &BTreeSet<NodeId>, value: &impl Fn(NodeId) -> u64) -> u64 {
    let mut values: Vec<u64> = set.iter().map(|&id| value(id)).collect();
    values.sort_unstable_by(|a, b| b.cmp(a));
    // The (n/2+1)-th highest: a majority holds at least it.
    values.get(set.len() / 2).copied().unwrap_or(0)
}

/// Little-endian reads off a tail, failing cleanly at its end.
struct TailReader<'a> {
    bytes: &'a [u8],
}

impl TailReader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], MembershipError> {
        if self.bytes.len() < n {
            return Err(MembershipError::Undecodable("truncated tail".into()));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u64(&mut self) -> Result<u64, MembershipError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    /// A `u32` count of items of at least `item_bytes` each, checked against what is left.
    fn count(&mut self, item_bytes: usize) -> Result<usize, MembershipError> {
        let b = self.take(4)?;
        let n = u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
        if n > MEMBERS_MAX || n.saturating_mul(item_bytes) > self.bytes.len() {
            return Err(MembershipError::Undecodable(format!(
                "count {n} out of range"
            )));
        }
        Ok(n)
    }
    fn string(&mut self) -> Result<String, MembershipError> {
        let b = self.take(2)?;
        let n = u16::from_le_bytes(b.try_into().expect("2 bytes")) as usize;
        if n > ADDR_BYTES_MAX {
            return Err(MembershipError::Undecodable(format!(
                "address of {n} bytes"
            )));
        }
        let s = self.take(n)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| MembershipError::Undecodable("address not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joint() -> Membership {
        let mut m = Membership::with_voters([1, 2, 4]);
        m.voters_outgoing = [1, 2, 3].into();
        m.learners = [5].into();
        m.addrs.insert(
            4,
            MemberAddrs {
                peer_addr: "10.0.0.4:7000".into(),
                client_url: "http://10.0.0.4:8000".into(),
            },
        );
        m
    }

    #[test]
    fn a_joint_quorum_needs_a_majority_of_each_half() {
        let m = joint();
        assert!(m.is_quorum(|id| [1, 2].contains(&id)));
        // 2 and 4 are a majority of {1,2,4} but not of {1,2,3}.
        assert!(!m.is_quorum(|id| [2, 4].contains(&id)));
        // Learners never count.
        assert!(!m.is_quorum(|id| [4, 5, 3].contains(&id)));
        assert!(m.is_blocked(|id| [3, 2].contains(&id)));
        assert!(!m.is_blocked(|id| id == 4));
        let matched = |id| match id {
            1 => 9,
            2 => 7,
            3 => 8,
            4 => 3,
            _ => 100,
        };
        // incoming {9,7,3} → 7; outgoing {9,8,7} → 8; joint → 7.
        assert_eq!(m.quorum_value(matched), 7);
        assert_eq!(Membership::with_voters([1]).quorum_value(|_| 5), 5);
    }

    #[test]
    fn round_one_payloads_and_tails_still_decode() {
        #[derive(Serialize)]
        struct V1 {
            voters: BTreeSet<NodeId>,
            learners: BTreeSet<NodeId>,
        }
        let old = codec::encode(&V1 {
            voters: [1, 2, 3].into(),
            learners: BTreeSet::new(),
        })
        .unwrap();
        assert_eq!(
            Membership::decode(&old).unwrap(),
            Membership::with_voters([1, 2, 3])
        );
        let m = joint();
        assert_eq!(Membership::decode(&m.encode().unwrap()).unwrap(), m);
        let mut tail = Vec::new();
        m.encode_tail(&mut tail);
        let mut back = Membership {
            voters: m.voters.clone(),
            learners: m.learners.clone(),
            ..Membership::default()
        };
        back.decode_tail(&tail).unwrap();
        assert_eq!(back, m);
        let mut empty = Vec::new();
        Membership::with_voters([1]).encode_tail(&mut empty);
        assert!(empty.is_empty());
    }

    #[test]
    fn hostile_tails_and_configurations_are_refused() {
        let m = joint();
        let mut tail = Vec::new();
        m.encode_tail(&mut tail);
        for cut in 1..tail.len() {
            let mut back = Membership::with_voters([1, 2, 4]);
            assert!(back.decode_tail(&tail[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = tail.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Membership::with_voters([1]).decode_tail(&huge).is_err());
        let mut bad = joint();
        bad.learners.insert(4);
        assert_eq!(bad.validate(), Err(MembershipError::LearnerVotes(4)));
        assert_eq!(
            Membership::default().validate(),
            Err(MembershipError::NoVoters)
        );
        let mut stray = Membership::with_voters([1]);
        stray.addrs.insert(9, MemberAddrs::default());
        assert_eq!(stray.validate(), Err(MembershipError::BadAddr(9)));
    }
}
