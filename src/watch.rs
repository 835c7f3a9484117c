//! Watch: streams of committed changes to a key or a prefix, delivered to many watchers at a
//! bounded cost each.
//!
//! Two halves:
//! - [`WatchHub`] (deterministic, no clock, no task): the apply worker hands it every applied
//!   batch's changes ([`WatchHub::publish`]) and every snapshot install
//!   ([`WatchHub::installed`]); it routes each change to the watchers whose key or prefix
//!   matches (an index by key and by prefix, so an idle watcher costs nothing per write), each
//!   through its own queue bounded in bytes. A watcher whose queue is over its bound is
//!   cancelled — it cannot grow the node's memory — and told so.
//! - [`WatchStream`] (the shell): one per `GET /watch`, turns a watcher's queue into
//!   newline-delimited JSON. It first replays the retained history (`sm::history`) from the
//!   requested revision up to the point it registered at, then follows its queue, and sends
//!   a progress line when idle.
//!
//! No gap, no duplicate: registration reads the published revision `P` under the hub's lock,
//! and every batch is routed and `P` advanced under that lock, so the history replay covers
//! exactly `start..=P` and the queue exactly what comes after `P`. A snapshot install jumps
//! the state without events: the hub sends each watcher a resync mark, and the stream replays
//! the installed state's history (which the snapshot carries) up to the install point.

use crate::api::types::{WatchEvent, WatchKv};
use axum::body::Bytes;
use raftkv_storage::sm::history::{ChangeEvent, Compacted, KeyFilter};
use raftkv_storage::sm::{SmError, StateMachine};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use tokio::sync::mpsc;

/// Bounds and timing of watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchSettings {
    /// Bytes of events queued for one watcher before it is cancelled as too slow (a single
    /// event larger than this is still delivered to a watcher that has nothing queued).
    pub watcher_buffer_bytes_max: usize,
    /// Bytes queued for all watchers together: past it, a watcher that is sent more is
    /// cancelled.
    pub buffer_bytes_max: usize,
    /// Watchers at once; more are refused (503).
    pub watchers_max: usize,
    /// An idle watcher is sent a progress line this often.
    pub progress_ms: u64,
    /// History records read per replay step.
    pub replay_records_max: usize,
}

impl Default for WatchSettings {
    fn default() -> Self {
        WatchSettings {
            watcher_buffer_bytes_max: 2 << 20,
            buffer_bytes_max: 256 << 20,
            watchers_max: 100_000,
            progress_ms: 2_000,
            replay_records_max: 1024,
        }
    }
}

/// History pages a watch stream looks at per step at most before it yields its thread.
pub const REPLAY_PAGES_PER_STEP: usize = 16;

/// Why a watcher's stream ended (its last line's `kind`).
pub const KIND_TOO_SLOW: &str = "watcher_too_slow";
pub const KIND_COMPACTED: &str = "compacted";
pub const KIND_SHUTTING_DOWN: &str = "shutting_down";

/// A change shared by every watcher it is routed to; its JSON line is made once.
#[derive(Debug)]
pub struct HubEvent {
    pub change: ChangeEvent,
    line: OnceLock<Bytes>,
}

impl HubEvent {
    pub fn new(change: ChangeEvent) -> HubEvent {
        HubEvent {
            change,
            line: OnceLock::new(),
        }
    }

    /// The event as one NDJSON line.
    pub fn line(&self) -> Bytes {
        self.line
            .get_or_init(|| line_of(&to_wire(&self.change)))
            .clone()
    }
}

/// The wire form of a change. Keys and values are UTF-8 from the HTTP API.
pub fn to_wire(c: &ChangeEvent) -> WatchEvent {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match c.put_record() {
        Ok(Some((meta, value))) => WatchEvent::Put(WatchKv {
            key: text(&c.key),
            value: text(value),
            create_revision: meta.create_revision,
            mod_revision: meta.mod_revision,
            version: meta.version,
            lease: meta.lease,
        }),
        // A record that does not decode was checked at apply; report the key's change anyway.
        Ok(None) | Err(_) => WatchEvent::Delete(WatchKv {
            key: text(&c.key),
            mod_revision: c.revision,
            ..WatchKv::default()
        }),
    }
}

/// One NDJSON line.
pub fn line_of(e: &WatchEvent) -> Bytes {
    let mut v = serde_json::to_vec(e).unwrap_or_else(|_| b"{}".to_vec());
    v.push(b'\n');
    Bytes::from(v)
}

/// What the hub puts in a watcher's queue.
#[derive(Debug)]
pub enum Delivery {
    /// Matching changes of one applied batch, in revision order.
    Events(Vec<Arc<HubEvent>>),
    /// A snapshot was installed at this index: replay history up to it.
    Resync { through: u64 },
}

/// What a watcher and the hub share.
#[derive(Debug, Default)]
struct Shared {
    queued_bytes: AtomicUsize,
    /// Set (with `reason`) when the hub cancels the watcher.
    cancelled: AtomicBool,
    reason: OnceLock<&'static str>,
}

impl Shared {
    /// Takes up to `bytes` off this watcher's count and the same amount off the hub's `total`
    /// (never more than was counted: a cancel may have released the watcher's bytes first).
    fn release(&self, total: &AtomicUsize, bytes: usize) {
        let before = self
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(bytes))
            })
            .unwrap_or_else(|v| v);
        let freed = before.min(bytes);
        let total_before = total.fetch_sub(freed, Ordering::AcqRel);
        debug_assert!(
            total_before >= freed,
            "the hub counted every watcher's bytes"
        );
    }
}

#[derive(Debug)]
struct Slot {
    filter: KeyFilter,
    tx: mpsc::UnboundedSender<Delivery>,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Hub {
    next_id: u64,
    watchers: BTreeMap<u64, Slot>,
    by_key: BTreeMap<Vec<u8>, Vec<u64>>,
    by_prefix: BTreeMap<Vec<u8>, Vec<u64>>,
    closed: bool,
}

/// The node's watchers. See the module doc.
#[derive(Debug)]
pub struct WatchHub {
    hub: Mutex<Hub>,
    /// Every change at or below this revision has been routed.
    published: AtomicU64,
    queued_bytes: Arc<AtomicUsize>,
    watchers: AtomicUsize,
    cancelled_total: AtomicU64,
    settings: WatchSettings,
}

/// A watcher's end of the hub: its queue and its registration point.
#[derive(Debug)]
pub struct Registration {
    pub id: u64,
    /// Every change up to here was routed before the watcher existed: replay it.
    pub published: u64,
    rx: mpsc::UnboundedReceiver<Delivery>,
    shared: Arc<Shared>,
    hub: Arc<WatchHub>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.remove(self.id);
        self.shared.release(&self.hub.queued_bytes, usize::MAX);
    }
}

/// Why a watch cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("{0}")]
    Compacted(Compacted),
    #[error("{watchers_max} watchers are open on this node; retry later or on another node")]
    TooMany { watchers_max: usize },
    #[error("the node is shutting down")]
    Closed,
    #[error("state machine: {0}")]
    Storage(#[from] SmError),
}

impl WatchHub {
    pub fn new(published: u64, settings: WatchSettings) -> Arc<WatchHub> {
        assert!(settings.watcher_buffer_bytes_max > 0 && settings.replay_records_max > 0);
        Arc::new(WatchHub {
            hub: Mutex::new(Hub::default()),
            published: AtomicU64::new(published),
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            watchers: AtomicUsize::new(0),
            cancelled_total: AtomicU64::new(0),
            settings,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Hub> {
        // Every update below leaves the maps consistent before it can panic.
        self.hub.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn settings(&self) -> WatchSettings {
        self.settings
    }

    /// Every change at or below this revision has been routed to the watchers.
    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// Watchers open now.
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Relaxed)
    }

    /// Bytes queued for watchers now.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Watchers cancelled for falling behind, since start.
    pub fn cancelled_total(&self) -> u64 {
        self.cancelled_total.load(Ordering::Relaxed)
    }

    /// Adds a watcher of `filter`.
    pub fn register(self: &Arc<Self>, filter: KeyFilter) -> Result<Registration, WatchError> {
        let mut hub = self.lock();
        if hub.closed {
            return Err(WatchError::Closed);
        }
        if hub.watchers.len() >= self.settings.watchers_max {
            return Err(WatchError::TooMany {
                watchers_max: self.settings.watchers_max,
            });
        }
        hub.next_id += 1;
        let id = hub.next_id;
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        match &filter {
            KeyFilter::Key(k) => hub.by_key.entry(k.clone()).or_default().push(id),
            KeyFilter::Prefix(p) => hub.by_prefix.entry(p.clone()).or_default().push(id),
        }
        let slot = Slot {
            filter,
            tx,
            shared: shared.clone(),
        };
        hub.watchers.insert(id, slot);
        self.watchers.store(hub.watchers.len(), Ordering::Relaxed);
        let published = self.published();
        Ok(Registration {
            id,
            published,
            rx,
            shared,
            hub: self.clone(),
        })
    }

    fn remove(&self, id: u64) {
        let mut hub = self.lock();
        hub.remove(id);
        self.watchers.store(hub.watchers.len(), Ordering::Relaxed);
    }

    /// Routes one applied batch's changes (in revision order) and marks everything up to
    /// `applied_index` published. Called by the apply worker after every batch.
    pub fn publish(&self, changes: Vec<ChangeEvent>, applied_index: u64) {
        debug_assert!(changes.windows(2).all(|w| w[0].revision <= w[1].revision));
        assert!(
            changes.last().is_none_or(|c| c.revision <= applied_index),
            "a change is published with its batch"
        );
        let mut hub = self.lock();
        if !hub.watchers.is_empty() && !changes.is_empty() {
            let routed = route(&hub, changes);
            for (id, events) in routed {
                self.deliver(&mut hub, id, events);
            }
        }
        self.published.fetch_max(applied_index, Ordering::AcqRel);
    }

    /// A snapshot was installed at `index`: every watcher replays history up to it.
    pub fn installed(&self, index: u64) {
        let hub = self.lock();
        for slot in hub.watchers.values() {
            let _ = slot.tx.send(Delivery::Resync { through: index });
        }
        self.published.fetch_max(index, Ordering::AcqRel);
    }

    /// Ends every watch (the node is stopping) and refuses new ones.
    pub fn close(&self) {
        let mut hub = self.lock();
        hub.closed = true;
        for slot in std::mem::take(&mut hub.watchers).into_values() {
            cancel(&slot, KIND_SHUTTING_DOWN);
        }
        hub.by_key.clear();
        hub.by_prefix.clear();
        self.watchers.store(0, Ordering::Relaxed);
    }

    fn deliver(&self, hub: &mut Hub, id: u64, events: Vec<Arc<HubEvent>>) {
        let Some(slot) = hub.watchers.get(&id) else {
            return;
        };
        let bytes: usize = events.iter().map(|e| e.change.size_bytes()).sum();
        let mine = slot.shared.queued_bytes.load(Ordering::Acquire);
        let all = self.queued_bytes.load(Ordering::Acquire);
        // A watcher with nothing queued always takes one batch (however large) within its
        // own bound; the node-wide bound holds for everyone.
        let over = (mine > 0
            && mine.saturating_add(bytes) > self.settings.watcher_buffer_bytes_max)
            || all.saturating_add(bytes) > self.settings.buffer_bytes_max;
        if over {
            self.cancelled_total.fetch_add(1, Ordering::Relaxed);
            cancel(slot, KIND_TOO_SLOW);
            // Its queue is never sent after the cancel: its bytes are free now, not when its
            // connection finally closes.
            slot.shared.release(&self.queued_bytes, usize::MAX);
            // Out of the indexes at once: nothing more is queued for it.
            hub.remove(id);
            self.watchers.store(hub.watchers.len(), Ordering::Relaxed);
            return;
        }
        slot.shared.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        if slot.tx.send(Delivery::Events(events)).is_err() {
            // The stream is gone; its registration's drop removes the slot.
            slot.shared.release(&self.queued_bytes, bytes);
        }
    }
}

impl Hub {
    /// Takes watcher `id` out of the map and the indexes (its queue's sender with it).
    fn remove(&mut self, id: u64) -> Option<Slot> {
        let slot = self.watchers.remove(&id)?;
        let (index, k) = match &slot.filter {
            KeyFilter::Key(k) => (&mut self.by_key, k),
            KeyFilter::Prefix(p) => (&mut self.by_prefix, p),
        };
        if let Some(ids) = index.get_mut(k) {
            ids.retain(|w| *w != id);
            if ids.is_empty() {
                index.remove(k);
            }
        }
        debug_assert!(!self.watchers.contains_key(&id));
        Some(slot)
    }
}

fn cancel(slot: &Slot, reason: &'static str) {
    let _ = slot.shared.reason.set(reason);
    slot.shared.cancelled.store(true, Ordering::Release);
    // Wakes the stream: it sees the flag before the queue.
    let _ = slot.tx.send(Delivery::Resync { through: 0 });
}

/// The matching watchers of each change, per watcher in revision order.
fn route(hub: &Hub, changes: Vec<ChangeEvent>) -> BTreeMap<u64, Vec<Arc<HubEvent>>> {
    let mut routed: BTreeMap<u64, Vec<Arc<HubEvent>>> = BTreeMap::new();
    for change in changes {
        let event = Arc::new(HubEvent::new(change));
        let key = event.change.key.as_slice();
        let mut add = |ids: &Vec<u64>| {
            for id in ids {
                routed.entry(*id).or_default().push(event.clone());
            }
        };
        if let Some(ids) = hub.by_key.get(key) {
            add(ids);
        }
        if !hub.by_prefix.is_empty() {
            for len in 0..=key.len() {
                if let Some(ids) = hub.by_prefix.get(&key[..len]) {
                    add(ids);
                }
            }
        }
    }
    routed
}

/// What a stream step produced.
#[derive(Debug)]
pub enum Step {
    /// Lines to send (never empty).
    Lines(Bytes),
    /// The stream ends after this last line.
    End(Bytes),
}

/// One watcher's stream: replay, then follow. Deterministic given its inputs; the HTTP shell
/// calls [`WatchStream::next`] with a progress deadline.
pub struct WatchStream {
    reg: Registration,
    sm: Arc<StateMachine>,
    filter: KeyFilter,
    /// The next revision this watcher has not been told about.
    next_revision: u64,
    /// Replay history up to here before following the queue.
    replay_through: u64,
    ended: bool,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream")
            .field("id", &self.reg.id)
            .field("next_revision", &self.next_revision)
            .finish()
    }
}

impl WatchStream {
    /// Registers a watcher of `filter` from `start_revision` (`None`: the next revision).
    /// Checks at once that the history still holds `start_revision`.
    pub fn open(
        hub: &Arc<WatchHub>,
        sm: Arc<StateMachine>,
        filter: KeyFilter,
        start_revision: Option<u64>,
    ) -> Result<WatchStream, WatchError> {
        let reg = hub.register(filter.clone())?;
        let next_revision = start_revision.unwrap_or(reg.published + 1).max(1);
        if next_revision <= reg.published {
            // Probe the history's lower bound now, so a compacted start is a 410.
            if let Err(c) = sm.read_history(next_revision, next_revision - 1, &filter, 1)? {
                return Err(WatchError::Compacted(c));
            }
        }
        let replay_through = reg.published;
        Ok(WatchStream {
            reg,
            sm,
            filter,
            next_revision,
            replay_through,
            ended: false,
        })
    }

    /// The node's published revision when the watch registered.
    pub fn registered_at(&self) -> u64 {
        self.reg.published
    }

    /// The next revision the watcher has not been told about.
    pub fn next_revision(&self) -> u64 {
        self.next_revision
    }

    fn error_line(&mut self, kind: &str, error: String) -> Step {
        self.ended = true;
        Step::End(line_of(&WatchEvent::Error {
            error,
            kind: kind.into(),
            revision: self.next_revision,
        }))
    }

    /// Whether history is still to be replayed before the queue is followed.
    fn replaying(&self) -> bool {
        self.next_revision <= self.replay_through
    }

    /// Replays one page of history with a match, if any is due, looking at no more than
    /// [`REPLAY_PAGES_PER_STEP`] pages: a watcher of a rare key over a long history must not
    /// hold a runtime thread (and the state machine's read lock, page after page) for the whole
    /// of it. `None` with [`Self::replaying`] still true: call again (after yielding).
    fn replay_step(&mut self) -> Option<Step> {
        let mut pages = 0;
        while self.replaying() && pages < REPLAY_PAGES_PER_STEP {
            pages += 1;
            let page = match self.sm.read_history(
                self.next_revision,
                self.replay_through,
                &self.filter,
                self.reg.hub.settings.replay_records_max,
            ) {
                Ok(Ok(page)) => page,
                Ok(Err(c)) => {
                    let why = format!("history up to revision {} is compacted", c.compact_revision);
                    return Some(self.error_line(KIND_COMPACTED, why));
                }
                Err(e) => return Some(self.error_line("internal", e.to_string())),
            };
            assert!(
                page.next_revision > self.next_revision,
                "a replay page progresses"
            );
            self.next_revision = page.next_revision;
            if !page.events.is_empty() {
                let mut out = Vec::new();
                for c in &page.events {
                    out.extend_from_slice(&line_of(&to_wire(c)));
                }
                return Some(Step::Lines(Bytes::from(out)));
            }
        }
        None
    }

    fn take_delivery(&mut self, d: Delivery) -> Option<Step> {
        match d {
            Delivery::Resync { through } => {
                self.replay_through = self.replay_through.max(through);
                self.replay_step()
            }
            Delivery::Events(events) => {
                let bytes: usize = events.iter().map(|e| e.change.size_bytes()).sum();
                self.reg.shared.release(&self.reg.hub.queued_bytes, bytes);
                let mut out = Vec::new();
                for e in events {
                    // Events below the start (or already replayed) are skipped.
                    if e.change.revision >= self.next_revision {
                        out.extend_from_slice(&e.line());
                        self.next_revision = e.change.revision;
                    }
                }
                if out.is_empty() {
                    return None;
                }
                self.next_revision += 1;
                Some(Step::Lines(Bytes::from(out)))
            }
        }
    }

    fn cancelled(&mut self) -> Option<Step> {
        if !self.reg.shared.cancelled.load(Ordering::Acquire) {
            return None;
        }
        let kind = self
            .reg
            .shared
            .reason
            .get()
            .copied()
            .unwrap_or(KIND_SHUTTING_DOWN);
        let why = if kind == KIND_TOO_SLOW {
            "the watcher fell behind its buffer bound and was cancelled; resume from `revision`"
        } else {
            "the node is shutting down; resume on another node from `revision`"
        };
        Some(self.error_line(kind, why.into()))
    }

    /// The next lines if any are ready now, without waiting (the simulator's step; no
    /// progress lines). `None`: nothing now, or the stream has ended ([`Self::ended`]).
    pub fn try_next(&mut self) -> Option<Step> {
        if self.ended {
            return None;
        }
        loop {
            if let Some(step) = self.cancelled() {
                return Some(step);
            }
            if let Some(step) = self.replay_step() {
                return Some(step);
            }
            if self.replaying() {
                continue;
            }
            match self.reg.rx.try_recv() {
                Ok(d) => {
                    if let Some(step) = self.take_delivery(d) {
                        return Some(step);
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => return None,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    let step = self.cancelled();
                    return Some(step.unwrap_or_else(|| {
                        self.error_line(KIND_SHUTTING_DOWN, "the node is shutting down".into())
                    }));
                }
            }
        }
    }

    /// Whether the stream has sent its last line.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Waits for the next lines; `None` once the stream has ended. A progress line is sent
    /// when nothing came for `idle` (the shell's timer).
    pub async fn next(&mut self, idle: std::time::Duration) -> Option<Step> {
        if self.ended {
            return None;
        }
        loop {
            if let Some(step) = self.cancelled() {
                return Some(step);
            }
            if let Some(step) = self.replay_step() {
                return Some(step);
            }
            if self.replaying() {
                tokio::task::yield_now().await;
                continue;
            }
            let d = match tokio::time::timeout(idle, self.reg.rx.recv()).await {
                Ok(Some(d)) => d,
                Ok(None) => {
                    let step = self.cancelled();
                    return Some(step.unwrap_or_else(|| {
                        self.error_line(KIND_SHUTTING_DOWN, "the node is shutting down".into())
                    }));
                }
                Err(_) => match self.progress() {
                    Some(step) => return Some(step),
                    None => continue,
                },
            };
            if let Some(step) = self.take_delivery(d) {
                return Some(step);
            }
        }
    }

    /// Drains what is queued, then says everything up to the published revision was sent
    /// (`None` when a resync came: its replay goes first).
    fn progress(&mut self) -> Option<Step> {
        let published = self.reg.hub.published();
        let mut out = Vec::new();
        while let Ok(d) = self.reg.rx.try_recv() {
            match d {
                Delivery::Resync { through } => {
                    self.replay_through = self.replay_through.max(through);
                    if self.next_revision <= self.replay_through {
                        break;
                    }
                }
                events => {
                    if let Some(Step::Lines(b)) = self.take_delivery(events) {
                        out.extend_from_slice(&b);
                    }
                }
            }
        }
        if self.next_revision <= self.replay_through {
            return (!out.is_empty()).then(|| Step::Lines(Bytes::from(out)));
        }
        // A cancel drops batches at or below `published`: progress must not cover them (the
        // flag is set before `published` moves past a dropped batch).
        if let Some(end) = self.cancelled() {
            return Some(match end {
                Step::End(last) => Step::End(Bytes::from([out.as_slice(), &last].concat())),
                lines => lines,
            });
        }
        self.next_revision = self.next_revision.max(published + 1);
        let revision = self.next_revision - 1;
        out.extend_from_slice(&line_of(&WatchEvent::Progress { revision }));
        Some(Step::Lines(Bytes::from(out)))
    }
}

#[cfg(test)]
mod tests;
