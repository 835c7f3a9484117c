//! `Raft::step`: how a peer's message is checked, judged by its term, and handled by role.
//!
//! Why a module of its own: the term rules (Raft §5.1 with the PreVote and CheckQuorum
//! exceptions) apply to every message whatever this node's role, while what a message means
//! depends on the role. Keeping them apart keeps each short enough to check against the
//! thesis:
//! 1. [`Raft::check_incoming`] refuses what no peer may send (out of range, not for us, not
//!    from a member);
//! 2. [`Raft::step_term`] adopts a newer term or answers a stale one, and says whether the
//!    message goes on;
//! 3. one handler per role ([`Raft::step_leader`], [`Raft::step_candidate`] for pre-candidates
//!    and candidates, [`Raft::step_follower`]) acts on it, with per-message helpers below.
//!
//! Invariants kept here (the module doc of `core` lists the core's): a vote is granted at
//! most once per term, and entries at or below `commit` are never truncated (a leader asking
//! for that is refused, not obeyed).

use super::{Campaign, Raft, Role};
use crate::raft::config::LEASE_MS_MAX;
use crate::raft::limits::{self, pred, succ, INDEX_MAX, TERM_JUMP_MAX};
use crate::raft::membership::ConfigHistory;
use crate::raft::message::{Message, MessageBody};
use crate::raft::progress::ProgressState;
use crate::raft::ready::RaftError;
use raftkv_types::{Entry, EntryKind, NodeId, SnapshotMeta};
use std::cmp::Ordering;

impl Raft {
    /// Handles a message from a peer: checks it, applies the term rules, then hands it to the
    /// handler of this node's role.
    pub fn step(&mut self, m: Message) -> Result<(), RaftError> {
        self.check_incoming(&m)?;
        // A vote request is answered on its merits (term, our vote, the log's freshness)
        // whatever our configuration says of the candidate: a member whose promotion reached
        // a quorum but not us yet may be the only one able to win (its log alone holds every
        // committed entry), and ignoring it would leave the cluster without a leader for good
        // (simulator seed 964; etcd's raft answers non-voters for the same reason). Safety
        // does not depend on the voter's view: the candidate counts votes by its own
        // configuration, and a removed member cannot win, its log lacking the committed
        // removal. Leader stickiness (`in_lease`) and PreVote keep it from disrupting terms.
        if !self.step_term(&m) {
            return Ok(());
        }
        match self.role {
            Role::Leader => self.step_leader(m),
            Role::PreCandidate | Role::Candidate => self.step_candidate(m),
            Role::Follower => self.step_follower(m),
        }
    }

    /// Refuses a message no peer may send: a field out of range, a term too far ahead, another
    /// recipient, or this node as sender. A sender outside our configuration is not refused:
    /// it may lead a configuration we have not seen yet (a new member's first leader) or be a
    /// leader on its way out of a joint configuration; votes are counted only from voters.
    fn check_incoming(&self, m: &Message) -> Result<(), RaftError> {
        // Defence in depth: the node validated the message on receipt already. Whoever calls,
        // no term at or above `TERM_MAX` and no index out of range gets past here.
        limits::check_message(m).map_err(|error| RaftError::InvalidMessage {
            from: m.from,
            error,
        })?;
        if m.term.saturating_sub(self.term) > TERM_JUMP_MAX {
            return Err(RaftError::InvalidMessage {
                from: m.from,
                error: limits::InvalidMessage::new(
                    m.body.name(),
                    format!("term {} jumps too far ahead of {}", m.term, self.term),
                ),
            });
        }
        if m.to != self.config.id {
            return Err(RaftError::WrongRecipient {
                to: m.to,
                id: self.config.id,
            });
        }
        if m.from == 0 || m.from == self.config.id {
            return Err(RaftError::UnknownPeer(m.from));
        }
        Ok(())
    }

    /// The term rules. Returns whether the message goes on to the role's handler: it does if
    /// it is of our term (now), or a pre-vote request or pre-vote grant for a later term.
    fn step_term(&mut self, m: &Message) -> bool {
        match m.term.cmp(&self.term) {
            Ordering::Greater => self.step_higher_term(m),
            Ordering::Less => {
                self.step_lower_term(m);
                false
            }
            Ordering::Equal => true,
        }
    }

    /// A message of a later term: adopt it (following the sender if it leads that term) —
    /// except for pre-votes, which change no term, and for vote requests that arrive while we
    /// keep a leader's lease (leader stickiness), which are ignored.
    fn step_higher_term(&mut self, m: &Message) -> bool {
        match &m.body {
            MessageBody::Vote { pre, transfer, .. } => {
                if self.in_lease() && !transfer {
                    // Heard from a leader recently: ignore (leader stickiness).
                    return false;
                }
                if !pre {
                    self.become_follower(m.term, None);
                }
            }
            MessageBody::VoteResponse {
                pre: true,
                granted: true,
            } => {}
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. }
            | MessageBody::TimeoutNow => self.become_follower(m.term, Some(m.from)),
            _ => self.become_follower(m.term, None),
        }
        true
    }

    /// Whether this node promised a leader not to elect anyone else yet: with CheckQuorum, it
    /// heard from a leader within the election timeout — or just restarted, and so cannot
    /// know it did not: a restarted follower must keep the promise a leader's lease relies on
    /// — or it acknowledged a heartbeat asking for a lease that has not run out (kept even
    /// when fast failover made it forget the leader).
    fn in_lease(&self) -> bool {
        let min_ticks = u64::from(self.config.election_timeout_min_ticks);
        let sticky = (self.leader.is_some() || (self.restarted && self.ticks < min_ticks))
            && self.election_elapsed < self.config.election_timeout_min_ticks;
        (self.config.check_quorum && sticky) || self.lease_promised()
    }

    /// A message of an earlier term is dropped; a stale leader or pre-candidate is told.
    fn step_lower_term(&mut self, m: &Message) {
        match &m.body {
            MessageBody::Append { .. } | MessageBody::Heartbeat { .. } => {
                // Tell a stale leader about the newer term so it steps down. Even without
                // pre-vote and check-quorum our own campaign cannot be trusted to bring the
                // cluster to our term: a node that may not campaign (a learner) never does,
                // and one whose own configuration makes it a voter while the leader's does not
                // (it missed its demotion) campaigns in vain, its votes not counted by the
                // others' candidates. Either would ignore that leader for good.
                self.send(
                    m.from,
                    MessageBody::AppendResponse {
                        reject: true,
                        index: 0,
                        hint: None,
                    },
                );
            }
            MessageBody::Vote { pre: true, .. } => {
                self.send(
                    m.from,
                    MessageBody::VoteResponse {
                        pre: true,
                        granted: false,
                    },
                );
            }
            _ => {}
        }
    }

    /// Leader: takes its followers' answers and answers vote requests. Another leader of its
    /// term cannot exist (votes are granted once per term): an append from one is logged.
    fn step_leader(&mut self, m: Message) -> Result<(), RaftError> {
        debug_assert_eq!(self.role, Role::Leader);
        match m.body {
            MessageBody::Vote {
                pre,
                last_index,
                last_term,
                ..
            } => self.handle_vote(m.from, m.term, pre, last_index, last_term),
            MessageBody::AppendResponse {
                reject,
                index,
                hint,
            } => self.handle_append_response(m.from, reject, index, hint),
            MessageBody::HeartbeatResponse { read_round } => {
                self.handle_heartbeat_response(m.from, read_round);
            }
            MessageBody::Append { .. } => {
                tracing::warn!(
                    from = m.from,
                    term = m.term,
                    "append from another leader of my term"
                );
            }
            // Late vote answers, and what only a leader sends or asks for.
            MessageBody::VoteResponse { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. }
            | MessageBody::TimeoutNow => {}
        }
        Ok(())
    }

    /// Pre-candidate or candidate: counts votes of its round. A message from the leader of its
    /// term makes it that leader's follower, which then handles the message.
    fn step_candidate(&mut self, m: Message) -> Result<(), RaftError> {
        debug_assert!(matches!(self.role, Role::PreCandidate | Role::Candidate));
        match m.body {
            MessageBody::Vote {
                pre,
                last_index,
                last_term,
                ..
            } => self.handle_vote(m.from, m.term, pre, last_index, last_term),
            MessageBody::VoteResponse { pre, granted } => {
                self.handle_vote_response(m.from, m.term, pre, granted);
            }
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::InstallSnapshot { .. } => {
                self.become_follower(m.term, Some(m.from));
                return self.step_follower(m);
            }
            MessageBody::TimeoutNow => self.handle_timeout_now(),
            // Answers to a leadership this node no longer holds.
            MessageBody::AppendResponse { .. } | MessageBody::HeartbeatResponse { .. } => {}
        }
        Ok(())
    }

    /// Follower: follows the leader of its term (appends, heartbeats, snapshots), answers vote
    /// requests, and campaigns at once when the leader hands over leadership (TimeoutNow).
    fn step_follower(&mut self, m: Message) -> Result<(), RaftError> {
        debug_assert_eq!(self.role, Role::Follower);
        let from = m.from;
        match m.body {
            MessageBody::Vote {
                pre,
                last_index,
                last_term,
                ..
            } => self.handle_vote(from, m.term, pre, last_index, last_term),
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => {
                self.follow(from);
                self.handle_append(from, prev_index, prev_term, entries, commit)?;
            }
            MessageBody::Heartbeat {
                commit,
                read_round,
                lease_ms,
            } => {
                self.follow(from);
                self.promise_lease(lease_ms);
                self.handle_heartbeat(from, commit, read_round);
            }
            MessageBody::InstallSnapshot { meta } => {
                self.follow(from);
                self.handle_snapshot(from, meta);
            }
            MessageBody::TimeoutNow => self.handle_timeout_now(),
            // Answers to a candidacy or leadership this node no longer holds.
            MessageBody::VoteResponse { .. }
            | MessageBody::AppendResponse { .. }
            | MessageBody::HeartbeatResponse { .. } => {}
        }
        Ok(())
    }

    // ----- per-message handlers -----

    /// Any role: a (pre-)vote request of our term, or a pre-vote for a later one. A real vote
    /// is granted once per term (to the same candidate again if asked twice), and only to a log
    /// at least as up to date as ours; a pre-vote changes nothing.
    fn handle_vote(&mut self, from: NodeId, term: u64, pre: bool, last_index: u64, last_term: u64) {
        let can_vote = self.vote == Some(from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre && term > self.term);
        if can_vote && self.log.is_up_to_date(last_index, last_term) {
            if !pre {
                debug_assert!(
                    self.vote.is_none() || self.vote == Some(from),
                    "a second vote in term {}",
                    self.term
                );
                debug_assert_eq!(term, self.term, "a real vote is of our term");
                self.vote = Some(from);
                self.election_elapsed = 0;
            }
            // A real grant leaves only after the vote is durable (`send_with_term` holds it
            // back until the hard state is persisted).
            self.send_with_term(from, term, MessageBody::VoteResponse { pre, granted: true });
        } else {
            self.send(
                from,
                MessageBody::VoteResponse {
                    pre,
                    granted: false,
                },
            );
        }
    }

    /// (Pre-)candidate: counts a vote of its round; wins or gives up once a quorum decided.
    fn handle_vote_response(&mut self, from: NodeId, term: u64, pre: bool, granted: bool) {
        if pre && granted && Some(term) != self.term.checked_add(1) {
            return; // a grant from an older pre-vote round
        }
        let expected = if pre {
            Role::PreCandidate
        } else {
            Role::Candidate
        };
        if self.role != expected {
            return;
        }
        self.votes.insert(from, granted);
        if self.votes_won() {
            self.election_won();
        } else if self.votes_lost() {
            self.become_follower(self.term, None);
        }
    }

    /// Follower: the leader asks for `lease_ms` (0: none) in which this node votes for no one.
    /// Kept before the acknowledgement leaves, from the clock reading of this step (taken
    /// after the heartbeat arrived: the promise ends no earlier than the leader assumes).
    fn promise_lease(&mut self, lease_ms: u64) {
        debug_assert!(lease_ms <= LEASE_MS_MAX, "checked on receipt");
        if lease_ms > 0 {
            let until_ms = self.clock_ms.saturating_add(lease_ms);
            self.promised_until_ms = self.promised_until_ms.max(until_ms);
            debug_assert!(self.lease_promised());
        }
    }

    /// Follower: the leader's heartbeat carries its commit index (capped at what it knows we
    /// hold) and the read round to acknowledge.
    fn handle_heartbeat(&mut self, from: NodeId, commit: u64, read_round: u64) {
        let commit = commit.min(self.log.last_index());
        if commit > self.commit {
            self.set_commit(commit);
        }
        self.send(from, MessageBody::HeartbeatResponse { read_round });
    }

    /// Not the leader: the leader hands over leadership, so campaign now, past the lease.
    fn handle_timeout_now(&mut self) {
        debug_assert_ne!(self.role, Role::Leader);
        tracing::debug!(id = self.config.id, "TimeoutNow: campaigning");
        self.campaign(Campaign::Transfer);
    }

    /// A message from the leader of our term: follow it, and restart the election timer (with
    /// a fresh random timeout if an early campaign had been scheduled when it was lost).
    fn follow(&mut self, leader: NodeId) {
        self.leader = Some(leader);
        if self.leader_lost {
            self.leader_lost = false;
            self.reset_election_timeout();
        } else {
            self.election_elapsed = 0;
        }
    }

    /// Follower: an append from the leader of our term. Entries that do not follow
    /// `prev_index` contiguously, or are of a later term than the leader's, are malformed.
    fn handle_append(
        &mut self,
        from: NodeId,
        prev_index: u64,
        prev_term: u64,
        entries: Vec<Entry>,
        leader_commit: u64,
    ) -> Result<(), RaftError> {
        for (k, e) in entries.iter().enumerate() {
            if Some(e.index) != prev_index.checked_add(1 + k as u64) || e.term > self.term {
                return Err(RaftError::MalformedMessage {
                    from,
                    reason: format!("entry {k} has index {} term {}", e.index, e.term),
                });
            }
        }
        if prev_index < self.commit {
            // Everything up to our commit index matches the leader already.
            let index = self.commit;
            self.send(
                from,
                MessageBody::AppendResponse {
                    reject: false,
                    index,
                    hint: None,
                },
            );
            return Ok(());
        }
        if self.log.term(prev_index) != Some(prev_term) {
            let hint = self
                .log
                .find_conflict_by_term(prev_index.min(self.log.last_index()), prev_term);
            self.send(
                from,
                MessageBody::AppendResponse {
                    reject: true,
                    index: prev_index,
                    hint: Some(hint),
                },
            );
            return Ok(());
        }
        // Checked by `limits::check_message`: contiguous entries below `INDEX_MAX`.
        let last_new = prev_index
            .checked_add(entries.len() as u64)
            .filter(|&i| i < INDEX_MAX)
            .ok_or_else(|| RaftError::MalformedMessage {
                from,
                reason: format!("{} entries after {prev_index}", entries.len()),
            })?;
        self.append_after_match(from, entries)?;
        let commit = leader_commit.min(last_new);
        if commit > self.commit {
            self.set_commit(commit);
        }
        self.send(
            from,
            MessageBody::AppendResponse {
                reject: false,
                index: last_new,
                hint: None,
            },
        );
        Ok(())
    }

    /// Follower: `entries` follow an entry our log matches. Skips those we hold, truncates our
    /// log at the first conflict and appends the rest. A conflict at or below `commit` is a
    /// malformed message (a committed entry is never replaced).
    fn append_after_match(&mut self, from: NodeId, entries: Vec<Entry>) -> Result<(), RaftError> {
        // Every configuration is decoded before anything changes: a bad one refuses the whole
        // message.
        let mut configs = Vec::new();
        for e in entries.iter().filter(|e| e.kind == EntryKind::Config) {
            let m = super::decode_config(e).map_err(|reason| RaftError::MalformedMessage {
                from,
                reason: format!("config entry {}: {reason}", e.index),
            })?;
            configs.push((e.index, m));
        }
        let mut conflict_at = None;
        for (k, e) in entries.iter().enumerate() {
            if self.log.term(e.index) != Some(e.term) {
                conflict_at = Some(k);
                break;
            }
        }
        if let Some(k) = conflict_at {
            let first = entries[k].index;
            if first <= self.log.last_index() {
                if first <= self.commit {
                    return Err(RaftError::MalformedMessage {
                        from,
                        reason: format!(
                            "entry {first} conflicts with a committed entry (commit {})",
                            self.commit
                        ),
                    });
                }
                self.log.truncate_from(first);
                self.configs.truncate_from(first);
                self.persisted = self.persisted.min(pred(first));
            }
            self.unstable_from = self.unstable_from.min(first);
            for e in entries.into_iter().skip(k) {
                self.log.append(e);
            }
            let before = self.membership_index();
            for (index, m) in configs.into_iter().filter(|(i, _)| *i >= first) {
                self.configs.push(index, m);
            }
            if self.membership_index() != before || first <= before {
                self.membership_changed();
            }
        }
        Ok(())
    }

    /// Follower: the leader streamed a snapshot; install it unless the log already covers it.
    fn handle_snapshot(&mut self, from: NodeId, meta: SnapshotMeta) {
        if meta.index <= self.commit {
            let index = self.commit;
            self.send(
                from,
                MessageBody::AppendResponse {
                    reject: false,
                    index,
                    hint: None,
                },
            );
            return;
        }
        if self.log.term(meta.index) == Some(meta.term) {
            // We hold the snapshot's last entry: the log matches up to it; just commit.
            self.set_commit(meta.index);
        } else {
            tracing::debug!(
                id = self.config.id,
                index = meta.index,
                "installing snapshot"
            );
            self.log.reset(meta.index, meta.term);
            self.set_commit(meta.index);
            self.persisted = meta.index;
            self.applied = meta.index;
            self.applying = meta.index;
            self.unstable_from = succ(meta.index);
            self.configs = ConfigHistory::new(meta.index, meta.membership.clone());
            self.snapshot_to_install = Some(meta);
            self.membership_changed();
        }
        let index = self.commit;
        self.send(
            from,
            MessageBody::AppendResponse {
                reject: false,
                index,
                hint: None,
            },
        );
    }

    /// Leader: a follower's answer to an append or snapshot. A rejection moves `next_index`
    /// back (by the follower's hint); an acknowledgement advances its progress, may commit,
    /// and may complete a leadership transfer.
    fn handle_append_response(
        &mut self,
        from: NodeId,
        reject: bool,
        index: u64,
        hint: Option<(u64, u64)>,
    ) {
        let last_index = self.log.last_index();
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        pr.heard_at_tick = Some(self.ticks);
        if reject {
            let match_hint = match hint {
                Some((hint_index, hint_term)) => {
                    self.log.find_conflict_by_term(hint_index, hint_term).0
                }
                None => return,
            };
            if pr.maybe_decr_to(index, match_hint) && pr.state == ProgressState::Replicate {
                pr.become_probe();
            }
            return;
        }
        let index = index.min(last_index);
        if !pr.maybe_update(index) {
            return;
        }
        match pr.state {
            ProgressState::Probe => pr.become_replicate(),
            ProgressState::Snapshot { pending_index } if pr.match_index >= pending_index => {
                pr.become_probe();
            }
            ProgressState::Replicate => pr.inflights.free_to(index),
            ProgressState::Snapshot { .. } => {}
        }
        let caught_up = pr.match_index == last_index;
        self.maybe_commit();
        if let Some((to, _)) = self.transfer {
            if to == from && caught_up {
                self.lease_revoked = true;
                self.send(to, MessageBody::TimeoutNow);
            }
        }
    }

    /// Leader: a follower is alive; resume a lagging one and count its read-round ack.
    fn handle_heartbeat_response(&mut self, from: NodeId, read_round: u64) {
        let last_index = self.log.last_index();
        let Some(pr) = self.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        pr.heard_at_tick = Some(self.ticks);
        pr.probe_sent = false;
        if pr.match_index < last_index {
            pr.append_due = true;
            if pr.state == ProgressState::Replicate && pr.inflights.full() {
                pr.inflights.free_first();
            }
        }
        let id = self.config.id;
        let membership = self.configs.current().1;
        self.reads.ack(from, read_round, membership, id);
    }
}
