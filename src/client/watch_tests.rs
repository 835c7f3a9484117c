//! Watch streams against scripted nodes: resuming elsewhere at the last revision with nothing
//! twice (several events of one revision included), the typed 410, bounded lines, idle
//! connections, and giving up.

use super::scripted::{dead_endpoint, quick_client, requests, serve, Log, Reply, Script, Seen};
use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn put(key: &str, revision: u64) -> String {
    serde_json::to_string(&WatchEvent::Put(WatchKv {
        key: key.into(),
        value: format!("v{revision}"),
        create_revision: revision,
        mod_revision: revision,
        version: 1,
        lease: 0,
    }))
    .unwrap()
}

fn progress(revision: u64) -> String {
    serde_json::to_string(&WatchEvent::Progress { revision }).unwrap()
}

fn ended(kind: &str, revision: u64) -> String {
    serde_json::to_string(&WatchEvent::Error {
        error: format!("scripted {kind}"),
        kind: kind.into(),
        revision,
    })
    .unwrap()
}

fn compacted(compact_revision: u64) -> Reply {
    let body = CompactedBody {
        error: "compacted".into(),
        kind: "compacted".into(),
        compact_revision,
    };
    Reply::json(410, serde_json::to_string(&body).unwrap())
}

/// Makes one reply from the request.
type Replier = Box<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A script that gives its server's k-th request (0-based) the k-th reply of `replies`, and
/// 503 once they run out.
fn in_turn(replies: Vec<Replier>) -> Script {
    let count = AtomicUsize::new(0);
    Arc::new(move |_, seen| {
        let k = count.fetch_add(1, Ordering::SeqCst);
        match replies.get(k) {
            Some(reply) => reply(seen),
            None => Reply::json(503, r#"{"error":"scripted: not serving"}"#),
        }
    })
}

fn with_spec(idle_timeout_ms: u64, spec: WatchSpec) -> WatchSpec {
    WatchSpec {
        idle_timeout_ms,
        ..spec
    }
}

/// The revisions of the events, a progress written as `p<revision>`.
fn describe(events: &[WatchEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            WatchEvent::Put(kv) => format!("put {} {}", kv.key, kv.mod_revision),
            WatchEvent::Delete(kv) => format!("delete {} {}", kv.key, kv.mod_revision),
            WatchEvent::Progress { revision } => format!("p{revision}"),
            WatchEvent::Error { kind, .. } => format!("error {kind}"),
        })
        .collect()
}

async fn take(stream: &mut WatchStream, n: usize) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
        out.push(next.expect("an event within 10 s").unwrap().unwrap());
    }
    out
}

#[tokio::test]
async fn a_cut_stream_resumes_on_the_next_endpoint_from_the_last_revision_without_duplicates() {
    let log = Log::default();
    let a = serve(
        log.clone(),
        in_turn(vec![
            Box::new(|_| Reply::stream(10, &[put("p/a", 11), put("p/b", 12)])),
            Box::new(|_| Reply::stream(13, &[put("p/c", 13), put("p/a", 14)]).held()),
        ]),
    )
    .await;
    let b = serve(
        log.clone(),
        in_turn(vec![Box::new(|_| {
            Reply::stream(
                12,
                &[
                    put("p/b", 12), // resent (revision 12 may have held more): dropped
                    put("p/c", 13),
                    progress(13),
                    progress(12), // behind: dropped
                    ended("watcher_too_slow", 14),
                ],
            )
        })]),
    )
    .await;
    let c = quick_client(vec![a.clone(), b.clone()], 2000);
    let mut w = c.watch(WatchSpec::prefix("p/")).await.unwrap();
    let events = take(&mut w, 5).await;
    assert_eq!(
        describe(&events),
        [
            "put p/a 11",
            "put p/b 12",
            "put p/c 13",
            "p13",
            "put p/a 14"
        ]
    );
    assert_eq!((w.last_revision(), w.reconnects()), (14, 2));
    assert_eq!(w.endpoint(), a);
    assert_eq!(
        requests(&log),
        [
            (a.clone(), "GET".into(), "/watch?prefix=p%2F".into()),
            (
                b,
                "GET".into(),
                "/watch?prefix=p%2F&start_revision=12".into()
            ),
            (
                a,
                "GET".into(),
                "/watch?prefix=p%2F&start_revision=14".into()
            ),
        ]
    );
}

#[tokio::test]
async fn every_event_of_a_revision_is_yielded_once_even_when_cut_among_them() {
    let log = Log::default();
    // Revision 11 holds three events (a transaction, a lease's revoke); A breaks off after
    // two of them, B serves the revision whole from its start.
    let a = serve(
        log.clone(),
        in_turn(vec![Box::new(|_| {
            Reply::stream(10, &[put("p/a", 11), put("p/b", 11)])
        })]),
    )
    .await;
    let b = serve(
        log.clone(),
        in_turn(vec![Box::new(|_| {
            let lines = [
                put("p/a", 11),
                put("p/b", 11),
                put("p/c", 11),
                put("p/a", 12),
            ];
            Reply::stream(11, &lines).held()
        })]),
    )
    .await;
    let c = quick_client(vec![a.clone(), b.clone()], 2000);
    let mut w = c.watch(WatchSpec::prefix("p/")).await.unwrap();
    let events = take(&mut w, 4).await;
    assert_eq!(
        describe(&events),
        ["put p/a 11", "put p/b 11", "put p/c 11", "put p/a 12"]
    );
    assert_eq!((w.last_revision(), w.reconnects()), (12, 1));
    assert_eq!(
        requests(&log)[1],
        (
            b,
            "GET".into(),
            "/watch?prefix=p%2F&start_revision=11".into()
        )
    );
}

#[tokio::test]
async fn unreachable_and_idle_nodes_are_passed_over() {
    let log = Log::default();
    // A goes silent after its header: no byte, not even progress.
    let a = serve(
        log.clone(),
        in_turn(vec![Box::new(|_| Reply::stream(5, &[put("k", 6)]).held())]),
    )
    .await;
    let not_serving = serve(log.clone(), in_turn(vec![])).await;
    let hanging_up = serve(log.clone(), Arc::new(|_, _| Reply::drop_connection())).await;
    let b = serve(
        log.clone(),
        in_turn(vec![Box::new(|_| Reply::stream(7, &[put("k", 7)]).held())]),
    )
    .await;
    let endpoints = vec![
        a.clone(),
        dead_endpoint().await,
        not_serving.clone(),
        hanging_up.clone(),
        b.clone(),
    ];
    let c = quick_client(endpoints, 2000);
    let mut w = c.watch(with_spec(300, WatchSpec::key("k"))).await.unwrap();
    let started = std::time::Instant::now();
    let events = take(&mut w, 2).await;
    assert_eq!(describe(&events), ["put k 6", "put k 7"]);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited out the idle timeout"
    );
    assert_eq!(w.endpoint(), b);
    let seen = requests(&log);
    assert_eq!(
        seen.iter()
            .map(|r| (&r.0, r.2.as_str()))
            .collect::<Vec<_>>(),
        [
            (&a, "/watch?key=k"),
            (&not_serving, "/watch?key=k&start_revision=6"),
            (&hanging_up, "/watch?key=k&start_revision=6"),
            (&b, "/watch?key=k&start_revision=6"),
        ]
    );
}

#[tokio::test]
async fn a_compacted_start_is_a_typed_error_at_open_and_after_a_resume() {
    let at_open = serve(Log::default(), Arc::new(|_, _| compacted(7))).await;
    let c = quick_client(vec![at_open], 2000);
    let err = c
        .watch(WatchSpec::key("k").from_revision(3))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            ClientError::Compacted {
                compact_revision: 7
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("up to revision 7"), "{err}");

    // A node ends the stream as compacted: another may keep more history; this one does not.
    let log = Log::default();
    let a = serve(
        log.clone(),
        in_turn(vec![Box::new(|_| {
            Reply::stream(20, &[put("k", 21), ended("compacted", 22)])
        })]),
    )
    .await;
    let b = serve(log.clone(), Arc::new(|_, _| compacted(25))).await;
    let c = quick_client(vec![a, b.clone()], 2000);
    let mut w = c.watch(WatchSpec::key("k")).await.unwrap();
    assert_eq!(describe(&take(&mut w, 1).await), ["put k 21"]);
    let err = w.next().await.unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Compacted {
                compact_revision: 25
            }
        ),
        "{err}"
    );
    assert!(w.next().await.is_none(), "the watch is over");
    assert_eq!(
        requests(&log)[1],
        (b, "GET".into(), "/watch?key=k&start_revision=22".into())
    );
}

#[tokio::test]
async fn with_no_node_serving_the_watch_ends_unavailable_after_the_budget() {
    let c = quick_client(vec![dead_endpoint().await, dead_endpoint().await], 5000);
    let started = std::time::Instant::now();
    let err = c.watch(WatchSpec::prefix("")).await.err().unwrap();
    assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "fails fast"
    );

    // Served once, then only 503s: the whole budget is spent, then the watch ends.
    let a = serve(
        Log::default(),
        in_turn(vec![Box::new(|_| Reply::stream(1, &[put("k", 2)]))]),
    )
    .await;
    let c = quick_client(vec![a], 400);
    let mut w = c.watch(WatchSpec::prefix("")).await.unwrap();
    assert_eq!(describe(&take(&mut w, 1).await), ["put k 2"]);
    let started = std::time::Instant::now();
    let err = w.next().await.unwrap().unwrap_err();
    assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("not serving"), "{err}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert!(w.next().await.is_none());
}

#[tokio::test]
async fn bad_lines_refusals_and_bad_specs_end_the_watch() {
    let long = format!(
        "{{\"type\":\"progress\",\"revision\":1{}}}",
        " ".repeat(100)
    );
    let cases: Vec<(Reply, &str)> = vec![
        (Reply::stream(1, &[long]), "longer than 64 bytes"),
        (
            Reply::stream(1, &["{\"type\":\"gossip\"}".into()]),
            "not a watch event",
        ),
        (Reply::stream(1, &["not json".into()]), "not a watch event"),
    ];
    for (reply, want) in cases {
        let reply = Arc::new(Mutex::new(Some(reply)));
        let url = serve(
            Log::default(),
            Arc::new(move |_, _| reply.lock().unwrap().take().unwrap()),
        )
        .await;
        let c = quick_client(vec![url], 2000);
        let spec = WatchSpec {
            line_bytes_max: 64,
            ..WatchSpec::prefix("")
        };
        let mut w = c.watch(spec).await.unwrap();
        let err = w.next().await.unwrap().unwrap_err();
        assert!(matches!(err, ClientError::Protocol(_)), "{err}");
        assert!(err.to_string().contains(want), "{err}");
        assert!(w.next().await.is_none());
    }
    // A stream without the revision header cannot say where "now" is: refused.
    let unstamped = serve(
        Log::default(),
        Arc::new(|_, _| {
            let mut r = Reply::stream(0, &[]);
            r.headers.retain(|(name, _)| name != "x-raftkv-revision");
            r
        }),
    )
    .await;
    let c = quick_client(vec![unstamped], 2000);
    let err = c.watch(WatchSpec::key("k")).await.err().unwrap();
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
    // A 400 is the server's refusal, not retried.
    let log = Log::default();
    let refusing = serve(
        log.clone(),
        Arc::new(|_, _| Reply::json(400, r#"{"error":"bad start_revision"}"#)),
    )
    .await;
    let c = quick_client(vec![refusing.clone(), refusing], 2000);
    let err = c.watch(WatchSpec::key("k")).await.err().unwrap();
    assert_eq!(err.rejected_status(), Some(400), "{err}");
    assert!(err.to_string().contains("bad start_revision"), "{err}");
    assert_eq!(log.lock().unwrap().len(), 1);
    let err = c.watch(WatchSpec::key("")).await.err().unwrap();
    assert!(matches!(err, ClientError::InvalidInput(_)), "{err}");
}

#[tokio::test]
async fn a_start_revision_is_sent_and_older_events_are_dropped() {
    let log = Log::default();
    let url = serve(
        log.clone(),
        Arc::new(|_, _| {
            let delete = serde_json::to_string(&WatchEvent::Delete(WatchKv {
                key: "a b/.".into(),
                mod_revision: 6,
                ..Default::default()
            }))
            .unwrap();
            Reply::stream(9, &[put("a b/.", 4), put("a b/.", 5), delete]).held()
        }),
    )
    .await;
    let c = quick_client(vec![url], 2000);
    let mut w = c
        .watch(WatchSpec::key("a b/.").from_revision(5))
        .await
        .unwrap();
    let events = take(&mut w, 2).await;
    assert_eq!(describe(&events), ["put a b/. 5", "delete a b/. 6"]);
    assert_eq!(
        requests(&log)[0].2,
        "/watch?key=a%20b%2F%2E&start_revision=5"
    );
}

/// A tiny deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// The `start_revision` of a watch request's path.
fn start_of(path: &str) -> Option<u64> {
    path.split(['?', '&'])
        .find_map(|p| p.strip_prefix("start_revision="))
        .and_then(|r| r.parse().ok())
}

/// The events of revision `r` of the history `random_cuts` serves: one to three.
fn events_of(r: u64) -> Vec<(u64, String)> {
    (0..1 + r % 3)
        .map(|i| (r, format!("k{}-{i}", r % 5)))
        .collect()
}

/// Nodes that each serve a random stretch of one history (re-sending a few events before
/// the start they were asked for, mixing in progress lines) then end the stream in a random
/// way (an abrupt end anywhere, among a revision's events too): the watcher sees the
/// history exactly once, in order.
async fn random_cuts(seed: u64) {
    const LAST: u64 = 60;
    let rng = Arc::new(Mutex::new(Rng(seed | 1)));
    let script: Script = Arc::new(move |_, seen| {
        let mut rng = rng.lock().unwrap();
        let start = start_of(&seen.path).unwrap_or(1);
        let from = start.saturating_sub(rng.below(4)).max(1);
        let to = (start + rng.below(8)).min(LAST);
        let mut lines = Vec::new();
        for r in from..=to {
            for (r, key) in events_of(r) {
                lines.push(put(&key, r));
            }
            if rng.below(4) == 0 {
                lines.push(progress(r));
            }
        }
        match (to == LAST, rng.below(3)) {
            (true, _) => Reply::stream(to, &lines).held(),
            (false, 0) => {
                let cut = 1 + rng.below(lines.len() as u64) as usize;
                lines.truncate(cut);
                Reply::stream(to, &lines)
            }
            (false, 1) => {
                lines.push(ended("shutting_down", to + 1));
                Reply::stream(to, &lines)
            }
            (false, _) => {
                lines.push(ended("watcher_too_slow", to + 1));
                Reply::stream(to, &lines)
            }
        }
    });
    let log = Log::default();
    let mut endpoints = Vec::new();
    for _ in 0..3 {
        endpoints.push(serve(log.clone(), script.clone()).await);
    }
    let c = quick_client(endpoints, 2000);
    let mut w = c
        .watch(WatchSpec::prefix("").from_revision(1))
        .await
        .unwrap();
    let history: Vec<(u64, String)> = (1..=LAST).flat_map(events_of).collect();
    let mut seen = Vec::new();
    while seen.len() < history.len() {
        match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Ok(WatchEvent::Put(kv)))) => seen.push((kv.mod_revision, kv.key)),
            Ok(Some(Ok(WatchEvent::Progress { revision }))) => {
                assert!(seen.last().is_some_and(|(r, _)| *r <= revision))
            }
            other => panic!("{other:?} after {seen:?}"),
        }
    }
    assert_eq!(seen, history);
    assert!(
        log.lock().unwrap().len() > 2,
        "the stream was cut and resumed"
    );
}

#[tokio::test]
async fn randomly_cut_streams_yield_the_history_exactly_once() {
    let seeds: Vec<u64> = match std::env::var("RAFTKV_WATCH_SEED") {
        Ok(s) => vec![s.parse().expect("RAFTKV_WATCH_SEED is a number")],
        Err(_) => (1..=8).collect(),
    };
    for seed in seeds {
        let run = tokio::spawn(random_cuts(seed));
        if let Err(e) = run.await {
            panic!(
                "seed {seed} failed: {e}\nreplay: RAFTKV_WATCH_SEED={seed} cargo test --release \
                 --lib client::watch_tests::randomly_cut_streams"
            );
        }
    }
}
