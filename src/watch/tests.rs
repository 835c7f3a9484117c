//! The hub and its streams over a real state machine: no gap and no duplicate across the
//! replay → live hand-over, filters, slow watchers cancelled within their bound, compacted
//! starts refused, progress only after everything up to it was sent.

use super::*;
use raftkv_storage::command::Command;
use raftkv_storage::sm::{StateMachine, StateMachineOptions};
use raftkv_storage::{Entry, EntryKind};

fn put(index: u64, key: &str, value: &str) -> Entry {
    let cmd = Command::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    };
    Entry {
        index,
        term: 1,
        kind: EntryKind::Normal,
        payload: cmd.encode().unwrap().into(),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    sm: Arc<StateMachine>,
    hub: Arc<WatchHub>,
    next: u64,
}

impl Fixture {
    fn new(settings: WatchSettings, opts: StateMachineOptions) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let sm = Arc::new(StateMachine::open(dir.path(), opts).unwrap());
        let hub = WatchHub::new(sm.applied_index(), settings);
        Fixture {
            _dir: dir,
            sm,
            hub,
            next: 1,
        }
    }

    /// Applies one batch of puts (as the apply worker does) and publishes it.
    fn batch(&mut self, keys: &[&str]) {
        let entries: Vec<Entry> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                put(
                    self.next + i as u64,
                    k,
                    &format!("v{}", self.next + i as u64),
                )
            })
            .collect();
        self.next += keys.len() as u64;
        let applied = self.sm.apply_with_events(&entries).unwrap();
        self.hub.publish(applied.events, self.sm.applied_index());
    }

    fn open(&self, filter: KeyFilter, start: Option<u64>) -> WatchStream {
        WatchStream::open(&self.hub, self.sm.clone(), filter, start).unwrap()
    }
}

/// Every line a stream has ready now.
fn drain(s: &mut WatchStream) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    while let Some(step) = s.try_next() {
        let (Step::Lines(b) | Step::End(b)) = step;
        for line in b.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
            out.push(serde_json::from_slice(line).unwrap());
        }
    }
    out
}

fn revisions(events: &[WatchEvent]) -> Vec<u64> {
    events.iter().map(WatchEvent::seen_revision).collect()
}

#[test]
fn a_stream_replays_then_follows_without_gap_or_duplicate() {
    let mut f = Fixture::new(WatchSettings::default(), StateMachineOptions::default());
    f.batch(&["a/1", "b/1", "a/2"]);
    let mut from_start = f.open(KeyFilter::Prefix(b"a/".to_vec()), Some(1));
    let mut live = f.open(KeyFilter::Key(b"a/3".to_vec()), None);
    f.batch(&["a/3", "b/2"]);
    f.batch(&["a/3"]);
    assert_eq!(revisions(&drain(&mut from_start)), vec![1, 3, 4, 6]);
    let got = drain(&mut live);
    assert_eq!(revisions(&got), vec![4, 6]);
    match &got[1] {
        WatchEvent::Put(kv) => assert_eq!((kv.key.as_str(), kv.version), ("a/3", 2)),
        other => panic!("{other:?}"),
    }
    assert!(drain(&mut live).is_empty(), "nothing twice");
    assert_eq!(f.hub.watchers(), 2);
    drop(live);
    assert_eq!(f.hub.watchers(), 1, "a dropped stream unregisters");
}

#[test]
fn a_start_past_the_published_revision_skips_earlier_events() {
    let mut f = Fixture::new(WatchSettings::default(), StateMachineOptions::default());
    f.batch(&["k"]);
    let mut s = f.open(KeyFilter::Key(b"k".to_vec()), Some(3));
    f.batch(&["k", "k"]);
    assert_eq!(revisions(&drain(&mut s)), vec![3]);
}

#[test]
fn a_compacted_start_is_refused_with_the_compact_revision() {
    let opts = StateMachineOptions {
        watch_history_revisions: 5,
        ..StateMachineOptions::default()
    };
    let mut f = Fixture::new(WatchSettings::default(), opts);
    for _ in 0..12 {
        f.batch(&["k"]);
    }
    let err = WatchStream::open(&f.hub, f.sm.clone(), KeyFilter::Key(b"k".to_vec()), Some(2));
    match err {
        Err(WatchError::Compacted(c)) => assert_eq!(c.compact_revision, 7),
        other => panic!("{other:?}"),
    }
    let mut s = f.open(KeyFilter::Key(b"k".to_vec()), Some(8));
    assert_eq!(revisions(&drain(&mut s)), vec![8, 9, 10, 11, 12]);
}

#[test]
fn a_slow_watcher_is_cancelled_within_its_bound_and_frees_its_queue() {
    let settings = WatchSettings {
        watcher_buffer_bytes_max: 1000,
        ..WatchSettings::default()
    };
    let mut f = Fixture::new(settings, StateMachineOptions::default());
    let mut slow = f.open(KeyFilter::Prefix(Vec::new()), None);
    let mut fast = f.open(KeyFilter::Prefix(Vec::new()), None);
    for _ in 0..40 {
        f.batch(&["some/key"]);
        drain(&mut fast);
        assert!(f.hub.queued_bytes() <= 1000 + 200, "queues stay bounded");
    }
    assert_eq!(f.hub.cancelled_total(), 1);
    assert_eq!(
        f.hub.watchers(),
        1,
        "the slow one is out of the hub at once"
    );
    let got = drain(&mut slow);
    match got.last() {
        Some(WatchEvent::Error { kind, revision, .. }) => {
            assert_eq!(kind, KIND_TOO_SLOW);
            assert!(*revision >= 1, "it says where to resume");
        }
        other => panic!("{other:?}"),
    }
    assert!(slow.ended());
    drop(slow);
    assert_eq!(f.hub.queued_bytes(), 0);
}

#[test]
fn the_node_wide_bound_holds_for_empty_queues_and_a_cancel_frees_its_bytes_at_once() {
    // One batch of one put counts 83 bytes: the node-wide bound of 200 lets two watchers
    // hold one batch each, not three, even with empty queues.
    let settings = WatchSettings {
        buffer_bytes_max: 200,
        ..WatchSettings::default()
    };
    let mut f = Fixture::new(settings, StateMachineOptions::default());
    let mut streams: Vec<WatchStream> = (0..3)
        .map(|_| f.open(KeyFilter::Prefix(Vec::new()), None))
        .collect();
    f.batch(&["k"]);
    assert_eq!(
        f.hub.cancelled_total(),
        1,
        "the third empty queue is over the bound"
    );
    assert_eq!(f.hub.watchers(), 2);
    let one = f.hub.queued_bytes() / 2;
    assert!(one > 66 && 2 * one <= 200 && 3 * one > 200, "{one}");
    for s in &mut streams[..2] {
        assert_eq!(revisions(&drain(s)), vec![1]);
    }
    assert_eq!(f.hub.queued_bytes(), 0);
    // Neither client reads now: the next batch fits both, the one after that overflows the
    // node-wide bound at the first watcher, which is cancelled — and its bytes are free at
    // the cancel, not when its stream is dropped: the second fits again.
    f.batch(&["k"]);
    f.batch(&["k"]);
    assert_eq!(f.hub.cancelled_total(), 2);
    assert_eq!(
        f.hub.queued_bytes(),
        2 * one,
        "only the second watcher's two batches"
    );
    let ended = drain(&mut streams[0]);
    assert!(matches!(ended.last(), Some(WatchEvent::Error { kind, .. }) if kind == KIND_TOO_SLOW));
    assert_eq!(revisions(&drain(&mut streams[1])), vec![2, 3]);
    assert_eq!(f.hub.queued_bytes(), 0);
    drop(streams);
    assert_eq!(f.hub.queued_bytes(), 0);
}

#[test]
fn an_idle_stream_whose_batch_was_dropped_by_a_cancel_ends_instead_of_claiming_progress() {
    let settings = WatchSettings {
        watcher_buffer_bytes_max: 100,
        ..WatchSettings::default()
    };
    let mut f = Fixture::new(settings, StateMachineOptions::default());
    let mut s = f.open(KeyFilter::Prefix(Vec::new()), None);
    // While the stream waits idle, two batches come: the second is dropped and the watcher
    // cancelled; `published` moves past both. Then the idle timer fires (`progress`).
    f.batch(&["a"]);
    f.batch(&["b"]);
    assert_eq!(f.hub.cancelled_total(), 1);
    let Some(Step::End(last)) = s.progress() else {
        panic!("the idle timer must end the stream, not claim revision 2")
    };
    let lines: Vec<WatchEvent> = last
        .split(|c| *c == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(
        revisions(&lines[..1]),
        vec![1],
        "what was queued goes out first"
    );
    assert!(
        matches!(&lines[1], WatchEvent::Error { kind, revision, .. }
            if kind == KIND_TOO_SLOW && *revision == 2),
        "{lines:?}"
    );
    assert!(s.ended());
}

#[test]
fn a_key_watcher_over_a_long_history_replays_in_bounded_steps() {
    let settings = WatchSettings {
        replay_records_max: 4,
        ..WatchSettings::default()
    };
    let mut f = Fixture::new(settings, StateMachineOptions::default());
    let keys: Vec<&str> = std::iter::repeat_n("noise", 200).chain(["x"]).collect();
    f.batch(&keys);
    let mut s = f.open(KeyFilter::Key(b"x".to_vec()), Some(1));
    // 200 revisions of other keys, 4 records a page, 16 pages a step: the step returns
    // without a line while the replay is still going, then the event comes.
    assert!(s.replay_step().is_none());
    assert!(s.replaying());
    assert_eq!(s.next_revision(), 1 + 16 * 4);
    assert_eq!(revisions(&drain(&mut s)), vec![201]);
}

#[test]
fn progress_claims_only_what_was_sent_and_close_ends_every_stream() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut f = Fixture::new(WatchSettings::default(), StateMachineOptions::default());
    let mut s = f.open(KeyFilter::Key(b"x".to_vec()), None);
    f.batch(&["y", "x", "y"]);
    rt.block_on(async {
        let idle = std::time::Duration::from_millis(5);
        let Some(Step::Lines(first)) = s.next(idle).await else {
            panic!("the put of x")
        };
        assert!(std::str::from_utf8(&first)
            .unwrap()
            .contains("\"mod_revision\":2"));
        let Some(Step::Lines(p)) = s.next(idle).await else {
            panic!("a progress line")
        };
        let line: WatchEvent = serde_json::from_slice(p.trim_ascii_end()).unwrap();
        assert_eq!(line, WatchEvent::Progress { revision: 3 });
        f.hub.close();
        let Some(Step::End(end)) = s.next(idle).await else {
            panic!("a last line")
        };
        assert!(std::str::from_utf8(&end)
            .unwrap()
            .contains(KIND_SHUTTING_DOWN));
        assert!(s.next(idle).await.is_none());
    });
    assert!(matches!(
        WatchStream::open(&f.hub, f.sm.clone(), KeyFilter::Key(b"x".to_vec()), None),
        Err(WatchError::Closed)
    ));
}
