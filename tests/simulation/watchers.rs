//! Watchers in the simulator (issue 12): streams of committed changes followed across
//! crashes, leader changes, snapshot installs and history compaction, and checked against the
//! committed log.
//!
//! Why a module of its own: a watcher is a client with a long-lived stream and a resume
//! protocol of its own; its checks compare whole event sequences with the log.
//!
//! Each seed has a few watchers, each with a key or prefix filter over the keys the clients
//! use (`k<n>`, the prefix `k`, leased keys under `l/`, or every key). A watcher opens the
//! production [`WatchStream`] on a random running node and is stepped with
//! [`WatchStream::try_next`] at seeded moments, as a client reading its stream would. The
//! stream's [`WatchStream::next_revision`] after a step stands for the progress line the
//! HTTP shell sends when idle: everything before it was sent.
//!
//! Resuming is the Rust client's (`client::watch`): when the stream ends (its node crashed
//! or was stopped, or it fell behind its buffer bound in seeds with a small one), or when the
//! watcher drops it at a random moment — now and then after reading only some lines of a
//! step, in the middle of a revision —, it resumes on another node *at* the revision of the
//! last event it took if that revision may hold more, else after the last complete revision,
//! and drops the events of the open revision it has taken already. A start older than a
//! node's history is refused as compacted (seeds with a short history): that is counted, the
//! answer is checked to be true (the start is at or below the node's compact revision, and the
//! node kept at least its bound of revisions), and the watcher starts a new segment from the
//! node's current revision.
//!
//! Checked: every event's revision is one the serving node applied (or the watcher's own
//! start), a stream's progress never goes backwards, and — at the end, after a final
//! catch-up on the healed cluster — each segment's events equal, one for one, the committed
//! history for its filter from its start revision to where it stopped (the reference state
//! machine's changes: same keys, values, revisions and versions; no gap, duplicate or
//! reorder), the open revision's events being a prefix of that revision's.

use super::{Event, Sim};
use raftkv::api::types::WatchEvent;
use raftkv::storage::sm::history::{ChangeEvent, KeyFilter};
use raftkv::storage::sm::StateMachine;
use raftkv::storage::NodeId;
use raftkv::watch::{self, Step, WatchError, WatchStream, KIND_COMPACTED, KIND_TOO_SLOW};
use std::sync::Arc;

/// Watchers per seed.
const WATCHERS: usize = 3;
/// A watcher reads its stream every this many ms at most.
const STEP_MS_MAX: u64 = 120;

/// A revision some of whose events the watcher took; it may hold more.
#[derive(Clone, Copy, Debug)]
struct OpenRevision {
    revision: u64,
    /// Its events taken so far.
    taken: usize,
    /// Its events read on the current stream (the first `taken` of them are resent).
    read: usize,
}

/// A stretch of a watcher's history from one start revision (a new one after a compacted
/// answer).
#[derive(Debug)]
struct Segment {
    start: u64,
    events: Vec<WatchEvent>,
    /// Every event up to here was taken.
    complete: u64,
    open: Option<OpenRevision>,
}

impl Segment {
    fn new(start: u64) -> Segment {
        Segment {
            start,
            events: Vec::new(),
            complete: start - 1,
            open: None,
        }
    }

    /// Where to resume: at the open revision, or after the complete ones.
    fn resume_from(&self) -> u64 {
        self.open.map_or(self.complete + 1, |o| o.revision)
    }

    fn mark_complete(&mut self, revision: u64) {
        self.complete = self.complete.max(revision);
        if self.open.is_some_and(|o| o.revision <= self.complete) {
            self.open = None;
        }
    }

    /// Whether a change of `revision` just read is new (to take); counts it if so.
    fn take_change(&mut self, revision: u64) -> Result<bool, String> {
        if revision <= self.complete {
            return Ok(false);
        }
        match self.open.as_mut() {
            Some(open) if open.revision == revision => {
                open.read += 1;
                if open.read <= open.taken {
                    return Ok(false);
                }
                open.taken = open.read;
                Ok(true)
            }
            Some(open) if revision < open.revision => Err(format!(
                "an event of revision {revision} after one of {} (reordered)",
                open.revision
            )),
            _ => {
                self.complete = revision - 1;
                self.open = Some(OpenRevision {
                    revision,
                    taken: 1,
                    read: 1,
                });
                Ok(true)
            }
        }
    }
}

/// A stream open on a node.
struct Serving {
    node: NodeId,
    incarnation: u64,
    stream: WatchStream,
    /// The node's state machine (its applied index bounds what the stream may claim).
    sm: Arc<StateMachine>,
    /// `next_revision()` after the last step.
    progress: u64,
}

pub struct Watcher {
    filter: KeyFilter,
    serving: Option<Serving>,
    segments: Vec<Segment>,
    /// The next stream starts a new segment (at first, and after a compacted answer).
    fresh: bool,
}

impl Watcher {
    fn segment(&mut self) -> &mut Segment {
        self.segments.last_mut().expect("a stream was opened")
    }
}

impl Sim {
    /// Creates the seed's watchers (their first stream opens at a random moment).
    pub(super) fn add_watchers(&mut self) {
        for w in 0..WATCHERS {
            let filter = match self.rng.range(0, 6) {
                0 | 1 => KeyFilter::Key(format!("k{}", self.rng.range(0, super::KEYS)).into()),
                2 => KeyFilter::Prefix(b"k".to_vec()),
                3 | 4 => KeyFilter::Prefix(super::leases::LEASED_PREFIX.into()),
                _ => KeyFilter::Prefix(Vec::new()),
            };
            self.watchers.push(Watcher {
                filter,
                serving: None,
                segments: Vec::new(),
                fresh: true,
            });
            let at = self.rng.range(0, 5_000);
            self.schedule(at, Event::WatchStep(w));
        }
    }

    /// A watcher's turn: read what its stream has (or drop it now and then), or open one.
    pub(super) fn watch_step(&mut self, w: usize) -> Result<(), String> {
        let next = self.rng.range(1, STEP_MS_MAX);
        self.schedule(next, Event::WatchStep(w));
        let serving = self.watchers[w].serving.as_ref();
        let Some((node, incarnation)) = serving.map(|s| (s.node, s.incarnation)) else {
            return self.open_watch(w);
        };
        // A stopped node's streams were ended then (`end_watch_streams`).
        assert_eq!(
            self.incarnation(node),
            incarnation,
            "a stream of a stopped node"
        );
        if self.nodes[&node].paused_until.is_some_and(|u| u > self.now) {
            return Ok(());
        }
        if self.chance(3) {
            // The watcher drops its connection, perhaps in the middle of a step.
            let lines_max = self.rng.range(0, 4) as usize;
            self.read_watch(w, Some(lines_max))?;
            self.watchers[w].serving = None;
            return Ok(());
        }
        self.read_watch(w, None)
    }

    /// Opens watcher `w`'s stream on a random running node, from where it stopped.
    fn open_watch(&mut self, w: usize) -> Result<(), String> {
        let up: Vec<NodeId> = self
            .nodes
            .values()
            .filter(|n| n.live.is_some() && n.paused_until.is_none_or(|u| u <= self.now))
            .map(|n| n.id)
            .collect();
        if up.is_empty() {
            return Ok(());
        }
        let node = up[self.rng.range(0, up.len() as u64) as usize];
        self.open_watch_on(w, node)
    }

    fn open_watch_on(&mut self, w: usize, node: NodeId) -> Result<(), String> {
        let incarnation = self.incarnation(node);
        let live = self.live_ref(node);
        let (hub, sm) = (live.hub.clone(), live.sm.clone());
        let watcher = &mut self.watchers[w];
        let start = (!watcher.fresh).then(|| watcher.segment().resume_from());
        let stream = match WatchStream::open(&hub, sm.clone(), watcher.filter.clone(), start) {
            Ok(stream) => stream,
            Err(WatchError::Compacted(c)) => {
                let start = start.expect("a start from now is never compacted");
                let applied = sm.applied_index();
                let retain = self.params.watch_history_revisions;
                if start > c.compact_revision || c.compact_revision + retain > applied {
                    return Err(format!(
                        "watcher {w}: node {node} refused the start {start} as compacted at \
                         {}, applied {applied}, keeping {retain} revisions",
                        c.compact_revision
                    ));
                }
                self.stats.watch_compacted += 1;
                watcher.fresh = true;
                return Ok(());
            }
            Err(e) => return Err(format!("watcher {w}: node {node} refused a watch: {e}")),
        };
        if watcher.fresh {
            watcher.fresh = false;
            watcher
                .segments
                .push(Segment::new(stream.registered_at() + 1));
        } else {
            self.stats.watch_resumes += 1;
            if let Some(open) = watcher.segment().open.as_mut() {
                open.read = 0;
            }
        }
        watcher.serving = Some(Serving {
            node,
            incarnation,
            progress: stream.next_revision(),
            stream,
            sm,
        });
        self.read_watch(w, None)
    }

    /// Reads watcher `w`'s stream until nothing more is ready (or `lines_max` lines).
    fn read_watch(&mut self, w: usize, lines_max: Option<usize>) -> Result<(), String> {
        let mut budget = lines_max.unwrap_or(usize::MAX);
        loop {
            let watcher = &mut self.watchers[w];
            let Some(serving) = watcher.serving.as_mut() else {
                return Ok(());
            };
            let (bytes, last) = match serving.stream.try_next() {
                None => break,
                Some(Step::Lines(b)) => (b, false),
                Some(Step::End(b)) => (b, true),
            };
            for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                if budget == 0 {
                    return Ok(());
                }
                budget -= 1;
                let event: WatchEvent = serde_json::from_slice(line)
                    .map_err(|e| format!("watcher {w}: not a watch event: {e}"))?;
                self.take_event(w, event)?;
            }
            if last {
                self.watchers[w].serving = None;
                return Ok(());
            }
        }
        self.check_progress(w)
    }

    /// One line of watcher `w`'s stream.
    fn take_event(&mut self, w: usize, event: WatchEvent) -> Result<(), String> {
        let watcher = &mut self.watchers[w];
        let serving = watcher.serving.as_ref().expect("reading a stream");
        let (node, applied) = (serving.node, serving.sm.applied_index());
        let start = watcher.segment().resume_from();
        let claimed = match &event {
            WatchEvent::Put(kv) | WatchEvent::Delete(kv) => kv.mod_revision,
            WatchEvent::Progress { revision } => *revision,
            WatchEvent::Error { revision, .. } => revision.saturating_sub(1),
        };
        if claimed > applied.max(start.saturating_sub(1)) {
            return Err(format!(
                "watcher {w}: node {node} (applied {applied}) sent {event:?}"
            ));
        }
        let segment = watcher.segment();
        match &event {
            WatchEvent::Put(_) | WatchEvent::Delete(_) => {
                let new = segment
                    .take_change(claimed)
                    .map_err(|e| format!("watcher {w} on node {node}: {e}"))?;
                if new {
                    segment.events.push(event);
                    self.stats.watch_events += 1;
                }
            }
            WatchEvent::Progress { revision } => segment.mark_complete(*revision),
            WatchEvent::Error { kind, revision, .. } => {
                segment.mark_complete(revision.saturating_sub(1));
                match kind.as_str() {
                    KIND_TOO_SLOW => self.stats.watch_too_slow += 1,
                    KIND_COMPACTED => self.stats.watch_compacted += 1,
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// After a step: the stream's progress never goes back, never claims a revision its node
    /// has not applied (but the watcher's own start), and tells the watcher what is complete.
    fn check_progress(&mut self, w: usize) -> Result<(), String> {
        let watcher = &mut self.watchers[w];
        let Some(serving) = watcher.serving.as_mut() else {
            return Ok(());
        };
        let (node, next) = (serving.node, serving.stream.next_revision());
        if next < serving.progress {
            return Err(format!(
                "watcher {w}: node {node}'s stream went back from {} to {next}",
                serving.progress
            ));
        }
        serving.progress = next;
        let applied = serving.sm.applied_index();
        let segment = watcher.segment();
        if next - 1 > applied.max(segment.resume_from() - 1) {
            return Err(format!(
                "watcher {w}: node {node} (applied {applied}) claims revision {} sent",
                next - 1
            ));
        }
        segment.mark_complete(next - 1);
        Ok(())
    }

    /// Node `id` stops (a crash or its retirement; its hub is closed): its watchers read the
    /// end of their streams and let go of them (and of the node's state machine).
    pub(super) fn end_watch_streams(&mut self, id: NodeId) -> Result<(), String> {
        for w in 0..self.watchers.len() {
            if self.watchers[w]
                .serving
                .as_ref()
                .is_some_and(|s| s.node == id)
            {
                self.read_watch(w, None)?;
                self.watchers[w].serving = None;
            }
        }
        Ok(())
    }

    /// After healing: every watcher catches up (on the leader if its own stream's node is
    /// gone), then each segment is compared with the committed history.
    pub(super) fn check_watchers(&mut self, leader: NodeId) -> Result<(), String> {
        let applied = self.effects.reference().applied_index();
        for w in 0..self.watchers.len() {
            let keep = self.watchers[w].serving.as_ref().is_some_and(|s| {
                let n = &self.nodes[&s.node];
                n.incarnation == s.incarnation && n.live.is_some() && !self.stranded(s.node, leader)
            });
            if keep {
                self.read_watch(w, None)?;
            }
            let behind = |s: &Sim| {
                let watcher = &s.watchers[w];
                watcher.fresh
                    || watcher
                        .segments
                        .last()
                        .is_some_and(|g| g.complete < applied)
            };
            // Twice: a resume the leader refuses as compacted starts a new segment.
            for _ in 0..2 {
                if behind(self) {
                    self.watchers[w].serving = None;
                    self.open_watch_on(w, leader)?;
                }
            }
            if behind(self) {
                return Err(format!(
                    "watcher {w} stalled: it has everything up to {:?}, the log is at {applied}",
                    self.watchers[w].segments.last().map(|g| g.complete)
                ));
            }
            self.watchers[w].serving = None;
            for segment in &self.watchers[w].segments {
                let filter = &self.watchers[w].filter;
                check_segment(w, filter, segment, &self.effects.events)?;
            }
        }
        Ok(())
    }
}

/// A segment's events equal the committed changes its filter matches from its start to
/// where it stopped; those of its open revision are a prefix of that revision's.
fn check_segment(
    w: usize,
    filter: &KeyFilter,
    segment: &Segment,
    log: &[ChangeEvent],
) -> Result<(), String> {
    let last = segment.open.map_or(segment.complete, |o| o.revision);
    let from = log.partition_point(|c| c.revision < segment.start);
    let to = log.partition_point(|c| c.revision <= last);
    let want: Vec<(u64, WatchEvent)> = log[from..to]
        .iter()
        .filter(|c| filter.matches(&c.key))
        .map(|c| (c.revision, watch::to_wire(c)))
        .collect();
    let mut want = want.into_iter();
    for (k, got) in segment.events.iter().enumerate() {
        let Some((_, expected)) = want.next() else {
            return Err(format!(
                "watcher {w} ({filter:?}, from {}): event {k} {got:?} is not in the log \
                 (duplicate or invented)",
                segment.start
            ));
        };
        if *got != expected {
            return Err(format!(
                "watcher {w} ({filter:?}, from {}): event {k} is {got:?}, the log says \
                 {expected:?} (gap, duplicate or reorder)",
                segment.start
            ));
        }
    }
    // What is left may only be the untaken rest of the open revision.
    if let Some((revision, missed)) = want.find(|(r, _)| *r <= segment.complete) {
        return Err(format!(
            "watcher {w} ({filter:?}, from {}, complete through {}): missed {missed:?} of \
             revision {revision}",
            segment.start, segment.complete
        ));
    }
    Ok(())
}
