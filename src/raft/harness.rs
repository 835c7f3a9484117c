//! One in-memory driver of consensus cores, for tests and benches only: the golden scenarios
//! (tests/scenarios.rs), the core's unit tests and `benches/raft_core.rs` all take their
//! `Ready` batches through [`process_one`], so the ready/advance contract (DESIGN.md, "The
//! ready/advance contract") is honoured in one place instead of once per caller. The node
//! runtime (`src/node/`) is the production driver; the simulator runs that runtime itself.
//!
//! Durable writes complete at once, in memory ([`Durable`]). Messages and snapshot transfers
//! queue as [`Envelope`]s in the [`Cluster`]'s network and move only when the caller delivers
//! them, one at a time and in the order it chooses; a partition drops what crosses it. An
//! [`Observer`] sees every `Ready` (what was sent, applied, read) and every streamed snapshot.

use super::config::Config;
use super::core::{Raft, RestartState};
use super::message::{Message, MessageBody};
use super::ready::{LogRead, RaftError, Ready};
use raftkv_types::{Entry, HardState, Membership, NodeId, SnapshotMeta};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Sees what the harness handles. Every method defaults to doing nothing.
pub trait Observer {
    /// Called with each non-empty `Ready` of node `id`, before it is handled: its messages are
    /// about to be queued, its committed entries applied, its read states served.
    fn ready(&mut self, _id: NodeId, _rd: &Ready) {}
    /// Called when a snapshot transfer from `from` reaches `to`, before `to` steps it.
    fn snapshot_streamed(&mut self, _from: NodeId, _to: NodeId, _meta: &SnapshotMeta) {}
}

impl Observer for () {}

/// What travels between cores: a message, or a snapshot transfer a core asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Envelope {
    Message(Message),
    /// Stream `from`'s durable snapshot to `to`, which steps `InstallSnapshot` with `term`.
    Snapshot {
        from: NodeId,
        to: NodeId,
        term: u64,
    },
}

impl Envelope {
    /// (sender, recipient).
    pub fn route(&self) -> (NodeId, NodeId) {
        match self {
            Envelope::Message(m) => (m.from, m.to),
            Envelope::Snapshot { from, to, .. } => (*from, *to),
        }
    }
}

/// What one node's disk holds: the hard state, the newest snapshot's meta and the log after it
/// (contiguous). It survives [`Cluster::crash`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Durable {
    pub hard_state: HardState,
    pub snapshot: SnapshotMeta,
    pub log: Vec<Entry>,
}

impl Durable {
    /// Index of the last durable entry (the snapshot's if the log is empty).
    pub fn last_index(&self) -> u64 {
        self.log.last().map_or(self.snapshot.index, |e| e.index)
    }

    /// Writes one batch in the contract's order: snapshot, entries, hard state. Returns the
    /// (index, term) to report with `Raft::persisted`, if anything was written but the hard state.
    fn write(
        &mut self,
        snapshot: Option<SnapshotMeta>,
        entries: Vec<Entry>,
        hard_state: Option<HardState>,
    ) -> Option<(u64, u64)> {
        let mut persisted = None;
        if let Some(meta) = snapshot {
            persisted = Some((meta.index, meta.term));
            self.snapshot = meta;
            self.log.clear();
        }
        for e in entries {
            persisted = Some((e.index, e.term));
            self.append(e);
        }
        if let Some(hs) = hard_state {
            self.hard_state = hs;
        }
        persisted
    }

    /// Appends `e`, replacing the suffix from its index.
    pub fn append(&mut self, e: Entry) {
        if let Some(first) = self.log.first().map(|f| f.index) {
            if e.index <= first {
                self.log.clear();
            } else {
                let keep = usize::try_from(e.index - first).expect("log length fits usize");
                assert!(
                    keep <= self.log.len(),
                    "entry {} leaves a gap after durable index {}",
                    e.index,
                    self.last_index()
                );
                self.log.truncate(keep);
            }
        }
        self.log.push(e);
    }

    /// The append of `read` with its entries read from this disk (`None`, as the node's WAL
    /// read fails, if compaction dropped them: the message is lost).
    pub fn fill(&self, read: LogRead) -> Option<Message> {
        let LogRead {
            mut message,
            lo,
            hi,
        } = read;
        if lo <= hi {
            let first = self.log.first()?.index;
            if lo < first || hi > self.last_index() {
                return None;
            }
            let wal = &self.log[(lo - first) as usize..=(hi - first) as usize];
            if let MessageBody::Append { entries, .. } = &mut message.body {
                debug_assert!(
                    entries.is_empty(),
                    "a log read's append carries nothing yet"
                );
                entries.extend(wal.iter().cloned());
            }
        }
        Some(message)
    }

    /// A snapshot at `meta.index` is durable: the log keeps only what follows it.
    pub fn compact(&mut self, meta: SnapshotMeta) {
        let index = meta.index;
        let drop = self.log.iter().take_while(|e| e.index <= index).count();
        self.log.drain(..drop);
        self.snapshot = meta;
    }

    /// What a node restarts from. The in-memory state machine is lost with the process, so it
    /// starts again from the snapshot.
    pub fn restart_state(&self) -> RestartState {
        RestartState {
            hard_state: self.hard_state,
            snapshot: self.snapshot.clone(),
            prefix: Default::default(),
            entries: self.log.clone(),
            applied: self.snapshot.index,
        }
    }
}

/// Takes one `Ready` from `raft` and handles it per the contract: `messages_now` queued at
/// once; snapshot, entries and hard state written to `durable`; `persisted` reported; only
/// then `messages_after_persist` queued; committed entries applied (the observer is the state
/// machine) and `applied` reported; read states served and dropped reads answered (by the
/// observer); snapshot sends queued. Returns false if there was nothing to do.
pub fn process_one<O: Observer>(
    raft: &mut Raft,
    durable: &mut Durable,
    network: &mut VecDeque<Envelope>,
    observer: &mut O,
) -> bool {
    let mut rd = raft.ready();
    if rd.is_empty() {
        return false;
    }
    let id = raft.id();
    observer.ready(id, &rd);
    network.extend(rd.messages_now.drain(..).map(Envelope::Message));
    let entries = std::mem::take(&mut rd.entries);
    if let Some((index, term)) = durable.write(rd.snapshot.take(), entries, rd.hard_state) {
        raft.persisted(index, term);
    }
    network.extend(rd.messages_after_persist.drain(..).map(Envelope::Message));
    if let Some(last) = rd.committed.last() {
        raft.applied(last.index);
    }
    for read in rd.log_reads.drain(..) {
        if let Some(m) = durable.fill(read) {
            network.push_back(Envelope::Message(m));
        }
    }
    network.extend(rd.snapshot_sends.iter().map(|s| Envelope::Snapshot {
        from: id,
        to: s.to,
        term: s.term,
    }));
    true
}

/// Handles `Ready` batches from `raft` until it has nothing to do.
pub fn process<O: Observer>(
    raft: &mut Raft,
    durable: &mut Durable,
    network: &mut VecDeque<Envelope>,
    observer: &mut O,
) {
    while process_one(raft, durable, network, observer) {}
}

/// One member: its core (none while crashed), its disk, and what it restarts with.
struct Node {
    raft: Option<Raft>,
    config: Config,
    durable: Durable,
    /// A node that joined a running cluster: the configuration it joined with (it joins
    /// again if it restarts with nothing durable).
    joined: Option<Membership>,
}

/// Cores in one process, with one network queue between them.
pub struct Cluster<O: Observer = ()> {
    nodes: BTreeMap<NodeId, Node>,
    network: VecDeque<Envelope>,
    /// While set, only envelopes within one group are delivered.
    groups: Option<Vec<BTreeSet<NodeId>>>,
    seed: u64,
    observer: O,
}

impl<O: Observer> Cluster<O> {
    /// Bootstraps one voter per config (the membership is their ids) with `seed`. Nothing is
    /// processed yet.
    pub fn bootstrap(configs: Vec<Config>, seed: u64, observer: O) -> Result<Self, RaftError> {
        let membership = Membership::with_voters(configs.iter().map(|c| c.id));
        let mut nodes = BTreeMap::new();
        for config in configs {
            let raft = Raft::bootstrap(config.clone(), membership.clone(), seed)?;
            let node = Node {
                raft: Some(raft),
                config,
                durable: Durable::default(),
                joined: None,
            };
            let duplicate = nodes.insert(node.config.id, node);
            assert!(duplicate.is_none(), "two configs with one id");
        }
        Ok(Cluster {
            nodes,
            network: VecDeque::new(),
            groups: None,
            seed,
            observer,
        })
    }

    /// Member ids, ascending.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// Node `id`'s core, or None if it is down.
    pub fn raft(&self, id: NodeId) -> Option<&Raft> {
        self.node(id).raft.as_ref()
    }

    /// Node `id`'s core. Panics if it is down.
    pub fn raft_mut(&mut self, id: NodeId) -> &mut Raft {
        self.node_mut(id)
            .raft
            .as_mut()
            .unwrap_or_else(|| panic!("node {id} is down"))
    }

    pub fn is_up(&self, id: NodeId) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.raft.is_some())
    }

    pub fn durable(&self, id: NodeId) -> &Durable {
        &self.node(id).durable
    }

    /// Node `id`'s disk, to change by hand (e.g. to build divergent logs while it is down).
    pub fn durable_mut(&mut self, id: NodeId) -> &mut Durable {
        &mut self.node_mut(id).durable
    }

    pub fn observer(&self) -> &O {
        &self.observer
    }

    pub fn observer_mut(&mut self) -> &mut O {
        &mut self.observer
    }

    /// The envelopes in flight, oldest first.
    pub fn network(&self) -> &VecDeque<Envelope> {
        &self.network
    }

    /// The envelopes in flight, to reorder, filter or drain.
    pub fn network_mut(&mut self) -> &mut VecDeque<Envelope> {
        &mut self.network
    }

    /// From now on deliver only between members of one group.
    pub fn partition(&mut self, groups: Vec<BTreeSet<NodeId>>) {
        self.groups = Some(groups);
    }

    pub fn heal(&mut self) {
        self.groups = None;
    }

    /// Whether the partition drops envelopes from `from` to `to`.
    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.groups
            .as_ref()
            .is_some_and(|groups| !groups.iter().any(|g| g.contains(&from) && g.contains(&to)))
    }

    /// Handles one `Ready` of node `id` ([`process_one`]); false if it had none or is down.
    pub fn process_one(&mut self, id: NodeId) -> bool {
        let Some(node) = self.nodes.get_mut(&id) else {
            return false;
        };
        let Some(raft) = node.raft.as_mut() else {
            return false;
        };
        process_one(
            raft,
            &mut node.durable,
            &mut self.network,
            &mut self.observer,
        )
    }

    /// Handles node `id`'s `Ready` batches until it has none.
    pub fn process(&mut self, id: NodeId) {
        while self.process_one(id) {}
    }

    /// Steps `envelope` into its recipient without processing anything; for a snapshot,
    /// streams the sender's durable snapshot and reports `snapshot_sent` to the sender.
    /// Returns false if it was dropped (partition, recipient down or unknown). A step error is
    /// a bug in the core or the caller: it panics.
    pub fn hand_over(&mut self, envelope: Envelope) -> bool {
        let (from, to) = envelope.route();
        if self.is_cut(from, to) || !self.is_up(to) {
            return false;
        }
        let message = match envelope {
            Envelope::Message(m) => m,
            Envelope::Snapshot { from, to, term } => {
                let meta = self.node(from).durable.snapshot.clone();
                self.observer.snapshot_streamed(from, to, &meta);
                Message {
                    from,
                    to,
                    term,
                    body: MessageBody::InstallSnapshot { meta },
                }
            }
        };
        let snapshot = matches!(message.body, MessageBody::InstallSnapshot { .. });
        let term = message.term;
        if let Err(e) = self.raft_mut(to).step(message) {
            panic!("step {from}->{to} (term {term}): {e}");
        }
        if snapshot {
            if let Some(r) = self.node_mut(from).raft.as_mut() {
                r.snapshot_sent(to, true);
            }
        }
        true
    }

    /// [`Cluster::hand_over`], then processes the sender (for a snapshot: it was told the
    /// transfer ended) and the recipient.
    pub fn deliver(&mut self, envelope: Envelope) {
        let (from, to) = envelope.route();
        let snapshot = matches!(envelope, Envelope::Snapshot { .. });
        if !self.hand_over(envelope) {
            return;
        }
        if snapshot {
            self.process(from);
        }
        self.process(to);
    }

    /// Takes a snapshot of node `id` at applied index `index`: the core compacts its log and
    /// the durable log is cut after the snapshot.
    pub fn compact(&mut self, id: NodeId, index: u64) -> Result<SnapshotMeta, RaftError> {
        let raft = self.raft_mut(id);
        let term = raft
            .log()
            .term(index)
            .ok_or_else(|| RaftError::InvalidCompaction {
                index,
                reason: "not in the log".into(),
            })?;
        let membership = raft.membership().clone();
        raft.compact(index, term)?;
        let meta = SnapshotMeta {
            index,
            term,
            membership,
        };
        self.durable_mut(id).compact(meta.clone());
        Ok(meta)
    }

    /// A new node `config.id` joins with an empty log, knowing the configuration
    /// `membership` (which names it a learner). Nothing is processed yet.
    pub fn join(&mut self, config: Config, membership: Membership) -> Result<(), RaftError> {
        let raft = Raft::join(config.clone(), membership.clone(), self.seed)?;
        let node = Node {
            raft: Some(raft),
            config,
            durable: Durable::default(),
            joined: Some(membership),
        };
        let duplicate = self.nodes.insert(node.config.id, node);
        assert!(duplicate.is_none(), "joining with the id of a node");
        Ok(())
    }

    /// Node `id` stops: its core is gone (only its [`Durable`] stays) and the envelopes on
    /// their way to it are lost.
    pub fn crash(&mut self, id: NodeId) {
        self.node_mut(id).raft = None;
        self.network.retain(|e| e.route().1 != id);
    }

    /// Node `id` starts again from its durable state. Nothing is processed yet.
    pub fn restart(&mut self, id: NodeId) -> Result<(), RaftError> {
        let seed = self.seed;
        let node = self.node_mut(id);
        let state = node.durable.restart_state();
        let raft = match &node.joined {
            // Nothing durable yet: join again, as the node does.
            Some(m) if state.entries.is_empty() && state.snapshot.index == 0 => {
                Raft::join(node.config.clone(), m.clone(), seed)?
            }
            _ => Raft::restart(node.config.clone(), state, seed)?,
        };
        node.raft = Some(raft);
        Ok(())
    }

    fn node(&self, id: NodeId) -> &Node {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("node {id} is not a member"))
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.nodes
            .get_mut(&id)
            .unwrap_or_else(|| panic!("node {id} is not a member"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Role;
    use raftkv_types::EntryKind;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            kind: EntryKind::Normal,
            payload: vec![].into(),
        }
    }

    fn terms(d: &Durable) -> Vec<(u64, u64)> {
        d.log.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn durable_log_replaces_its_suffix_and_compacts() {
        let mut d = Durable::default();
        for i in 1..=3 {
            d.append(entry(i, 1));
        }
        d.append(entry(2, 2));
        assert_eq!(terms(&d), [(1, 1), (2, 2)]);
        d.append(entry(3, 2));
        d.compact(SnapshotMeta {
            index: 2,
            term: 2,
            membership: Membership::default(),
        });
        assert_eq!(terms(&d), [(3, 2)]);
        assert_eq!(d.restart_state().applied, 2);
        d.append(entry(3, 3));
        assert_eq!((d.last_index(), terms(&d)), (3, vec![(3, 3)]));
    }

    #[test]
    #[should_panic(expected = "gap")]
    fn durable_log_refuses_a_gap() {
        let mut d = Durable::default();
        d.append(entry(1, 1));
        d.append(entry(3, 1));
    }

    fn deliver_all(c: &mut Cluster) {
        while let Some(envelope) = c.network_mut().pop_front() {
            c.deliver(envelope);
        }
    }

    /// Three nodes with node 1 elected and `payload` committed everywhere.
    fn elected(payload: &[u8]) -> Cluster {
        let configs = (1..=3).map(Config::new).collect();
        let mut c = Cluster::bootstrap(configs, 3, ()).unwrap();
        while c.raft(1).map(Raft::role) != Some(Role::Leader) {
            c.raft_mut(1).tick();
            c.process(1);
            deliver_all(&mut c);
        }
        c.raft_mut(1).propose(payload.to_vec()).unwrap();
        c.process(1);
        for _ in 0..3 {
            c.raft_mut(1).tick();
            c.process(1);
            deliver_all(&mut c);
        }
        c
    }

    #[test]
    fn a_node_restarts_from_what_it_persisted() {
        let mut c = elected(b"x");
        let before = c.raft(2).unwrap().log().last_index();
        let term = c.raft(2).unwrap().term();
        assert_eq!(c.durable(2).last_index(), before);
        assert_eq!(c.raft(2).unwrap().applied_index(), before);
        c.crash(2);
        assert!(!c.is_up(2));
        c.restart(2).unwrap();
        c.process(2);
        let r = c.raft(2).unwrap();
        assert_eq!((r.log().last_index(), r.term()), (before, term));
        assert_eq!(
            r.log().entry(before).map(|e| e.payload.clone()),
            Some(b"x".to_vec().into())
        );
    }

    #[test]
    fn a_partition_drops_what_crosses_it() {
        let mut c = elected(b"x");
        c.partition(vec![BTreeSet::from([1]), BTreeSet::from([2, 3])]);
        assert!(c.is_cut(1, 2) && !c.is_cut(2, 3));
        c.raft_mut(1).propose(b"y".to_vec()).unwrap();
        c.process(1);
        let last = c.raft(1).unwrap().log().last_index();
        deliver_all(&mut c);
        assert!(c.raft(2).unwrap().log().last_index() < last);
        c.heal();
        c.raft_mut(1).tick();
        c.process(1);
        deliver_all(&mut c);
        assert_eq!(c.raft(2).unwrap().log().last_index(), last);
    }
}
