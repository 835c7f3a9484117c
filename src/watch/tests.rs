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
