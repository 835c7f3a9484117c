//! Watch streams and leases on real `raftkv serve` processes, judged from outside through
//! SIGKILLs (issue 12):
//!
//! - a watcher on a follower sees every write of a 10,000-write load exactly once, in
//!   revision order, while the leader is killed and later its own node is killed too (the
//!   stream resumes on another node by itself); its events are exactly the final state;
//! - a lease of TTL 2 s kept alive by a `raftkv lease keepalive` process keeps its keys while
//!   the process runs, and loses them within 3 s of the process being killed (no sooner than
//!   its TTL allows);
//! - a lease kept alive by the client's keeper keeps its keys through a leader kill;
//! - hostile and edge requests to `/watch` and `/lease` get JSON errors, a too-old start is
//!   410 `compacted`, and a watch stream ends with a `shutting_down` line on SIGTERM.
//!
//! The random choices (when to kill, how long a node stays down) come from one seed per test,
//! printed; `RAFTKV_TEST_SEED=<seed>` replays it.

use raftkv::api::{Consistency, ListResponse, WatchEvent};
use raftkv::client::{Client, ClientConfig, ClientError, KeeperStatus, WatchSpec, WatchStream};
use raftkv::raft::rng::Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

mod support;

use support::{cluster, http_client, leader, Node, BIN};

fn seed(test: &str) -> Rng {
    support::seed("watch_lease", test)
}

async fn start_cluster(root: &std::path::Path, id: &str) -> (Vec<Node>, reqwest::Client) {
    let http = http_client();
    let mut nodes = cluster(root, id, 3, &[]);
    for n in nodes.iter_mut() {
        n.start();
    }
    for n in &nodes {
        n.ready(&http).await;
    }
    (nodes, http)
}

fn urls(nodes: &[Node]) -> Vec<String> {
    nodes.iter().map(|n| n.url()).collect()
}

/// A client over `endpoints` that keeps retrying through an election or two.
fn client(endpoints: Vec<String>) -> Client {
    let mut config = ClientConfig::new(endpoints);
    config.retry_budget_ms = 20_000;
    Client::new(config).expect("a client")
}

/// Kills node `i` (SIGKILL), leaves it down for `down_ms`, restarts it and waits until ready.
async fn kill_and_restart(http: &reqwest::Client, nodes: &mut [Node], i: usize, down_ms: u64) {
    nodes[i].kill();
    tokio::time::sleep(Duration::from_millis(down_ms)).await;
    nodes[i].start();
    nodes[i].ready(http).await;
    eprintln!("node {} restarted after {down_ms} ms down", nodes[i].id);
}

// ---------------------------------------------------------------------------------------
// A watcher on a follower through a load and two kills.

const LOAD_WRITES: u64 = 10_000;
const LOAD_WRITERS: u64 = 6;
const LOAD_PREFIX: &str = "load/";

/// What one writer knows of its writes.
#[derive(Debug, Default)]
struct Ledger {
    /// Key → (value, revision) of each acknowledged write.
    acked: BTreeMap<String, (String, u64)>,
    /// Keys of writes whose outcome is unknown (applied or not).
    unknown: BTreeSet<String>,
}

/// Writes until `LOAD_WRITES` writes are acknowledged across all writers. Each attempt writes
/// a key of its own, so a write whose outcome is unknown is never confused with its retry.
async fn load_writer(
    client: Client,
    writer: u64,
    tickets: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
) -> Ledger {
    let mut ledger = Ledger::default();
    loop {
        let ticket = tickets.fetch_add(1, Ordering::SeqCst);
        if ticket >= LOAD_WRITES {
            return ledger;
        }
        for attempt in 0u64.. {
            assert!(attempt < 20, "ticket {ticket}: 20 writes without an answer");
            let key = format!("{LOAD_PREFIX}{ticket:05}-{attempt}");
            let value = format!("w{writer}-t{ticket}-a{attempt}");
            match client.put(&key, &value).await {
                Ok(kv) => {
                    assert_eq!(kv.version, 1, "a fresh key: {kv:?}");
                    ledger.acked.insert(key, (value, kv.mod_revision));
                    acked.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                Err(e @ (ClientError::OutcomeUnknown(_) | ClientError::Unavailable(_))) => {
                    eprintln!("writer {writer}: {key} unknown ({e}); writing another key");
                    ledger.unknown.insert(key);
                }
                Err(e) => panic!("writer {writer}: {key} failed: {e}"),
            }
        }
    }
}

/// What the watcher saw.
#[derive(Debug, Default)]
struct Seen {
    events: Vec<WatchEvent>,
    /// The endpoints that served events, in the order they started to.
    endpoints: Vec<String>,
    reconnects: u64,
}

/// Reads the watch until it has seen everything up to `target` (set once the load is over).
async fn follow(mut stream: WatchStream, target: Arc<AtomicU64>) -> Seen {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut seen = Seen::default();
    while stream.last_revision() < target.load(Ordering::SeqCst) {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("the watch is stuck at {}", stream.last_revision()));
        match next {
            Some(Ok(WatchEvent::Progress { .. })) => continue,
            Some(Ok(event)) => seen.events.push(event),
            Some(Err(e)) => panic!("the watch failed: {e}"),
            None => panic!("the watch ended"),
        }
        if seen.endpoints.last().map(String::as_str) != Some(stream.endpoint()) {
            seen.endpoints.push(stream.endpoint().to_string());
        }
    }
    seen.reconnects = stream.reconnects();
    seen
}

/// Waits until `count` reaches `n` (bounded).
async fn until(count: &AtomicU64, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while count.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "stuck at {} writes",
            count.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Kills the leader in the first half of the load, then the watcher's node (`watched`) in
/// the second half, restarting each after a while.
async fn kill_during_load(
    rng: &mut Rng,
    http: &reqwest::Client,
    nodes: &mut [Node],
    watched: usize,
    acked: &AtomicU64,
) {
    let first = LOAD_WRITES * 15 / 100 + rng.range(0, LOAD_WRITES / 5);
    let second = LOAD_WRITES * 55 / 100 + rng.range(0, LOAD_WRITES / 5);
    until(acked, first).await;
    let lead = leader(http, nodes).await;
    eprintln!(
        "killing the leader, node {}, at {first} writes",
        nodes[lead].id
    );
    kill_and_restart(http, nodes, lead, 300 + rng.range(0, 700)).await;
    until(acked, second).await;
    eprintln!(
        "killing the watcher's node {} at {second} writes (it leads: {})",
        nodes[watched].id,
        leader(http, nodes).await == watched
    );
    kill_and_restart(http, nodes, watched, 300 + rng.range(0, 700)).await;
}

/// The watcher saw each write once in revision order, every acknowledged one at its revision,
/// no write nobody made, and exactly the final state under the prefix.
fn check_load(ledgers: &[Ledger], list: &ListResponse, seen: &Seen) {
    let mut last = 0;
    let mut by_key: BTreeMap<&str, (&str, u64)> = BTreeMap::new();
    for e in &seen.events {
        let WatchEvent::Put(kv) = e else {
            panic!("only puts happen under the prefix: {e:?}")
        };
        assert!(kv.mod_revision > last, "{} after {last}", kv.mod_revision);
        last = kv.mod_revision;
        assert_eq!(
            (kv.version, kv.create_revision),
            (1, kv.mod_revision),
            "{kv:?}"
        );
        let first = by_key.insert(&kv.key, (&kv.value, kv.mod_revision));
        assert!(first.is_none(), "{} seen twice", kv.key);
    }
    let acked: BTreeMap<&str, (&str, u64)> = ledgers
        .iter()
        .flat_map(|l| &l.acked)
        .map(|(k, (v, r))| (k.as_str(), (v.as_str(), *r)))
        .collect();
    let unknown: BTreeSet<&str> = ledgers
        .iter()
        .flat_map(|l| &l.unknown)
        .map(String::as_str)
        .collect();
    assert_eq!(acked.len() as u64, LOAD_WRITES);
    for (key, write) in &acked {
        assert_eq!(by_key.get(key), Some(write), "acknowledged write {key}");
    }
    let extra: Vec<_> = by_key.keys().filter(|k| !acked.contains_key(*k)).collect();
    assert!(
        extra.iter().all(|k| unknown.contains(*k)),
        "events of writes nobody made: {extra:?}"
    );
    let state: BTreeMap<&str, (&str, u64)> = list
        .items
        .iter()
        .map(|kv| (kv.key.as_str(), (kv.value.as_str(), kv.mod_revision)))
        .collect();
    assert!(
        state == by_key,
        "the watch's events are not the final state"
    );
    eprintln!(
        "{} events, {} of writes with an unknown outcome ({} such writes)",
        by_key.len(),
        extra.len(),
        unknown.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_on_a_follower_sees_every_write_once_in_order_through_kills() {
    let mut rng = seed("a_watcher_on_a_follower_sees_every_write_once_in_order_through_kills");
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, http) = start_cluster(root.path(), "watch-load").await;
    let all = urls(&nodes);
    let watched = (leader(&http, &nodes).await + 1 + rng.range(0, 2) as usize) % nodes.len();
    let check = client(all.clone());
    let before = check.put("before-the-load", "x").await.unwrap();
    // The follower first: the stream starts there and moves on round the list.
    let mut endpoints = all.clone();
    endpoints.rotate_left(watched);
    let mut spec = WatchSpec::prefix(LOAD_PREFIX).from_revision(before.revision + 1);
    spec.idle_timeout_ms = 3_000;
    let stream = client(endpoints).watch(spec).await.unwrap();
    let target = Arc::new(AtomicU64::new(u64::MAX));
    let watcher = tokio::spawn(follow(stream, target.clone()));

    let started = Instant::now();
    let (tickets, acked) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let writers: Vec<_> = (0..LOAD_WRITERS)
        .map(|w| {
            // Half the writers without sessions: their writes cut by a kill are unknown.
            let mut config = ClientConfig::new(all.clone());
            config.retry_budget_ms = 20_000;
            config.sessions = w % 2 == 0;
            let c = Client::new(config).unwrap();
            tokio::spawn(load_writer(c, w, tickets.clone(), acked.clone()))
        })
        .collect();
    kill_during_load(&mut rng, &http, &mut nodes, watched, &acked).await;
    let mut ledgers = Vec::new();
    for w in writers {
        ledgers.push(w.await.expect("a writer panicked"));
    }
    eprintln!(
        "{LOAD_WRITES} writes in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let list = check
        .list(LOAD_PREFIX, 1_000_000, Consistency::Linearizable)
        .await
        .unwrap();
    target.store(list.revision, Ordering::SeqCst);
    let seen = watcher.await.expect("the watcher panicked");
    eprintln!(
        "the watch ran on {:?}, {} reconnects",
        seen.endpoints, seen.reconnects
    );
    check_load(&ledgers, &list, &seen);
    assert_eq!(
        seen.endpoints[0], all[watched],
        "it started on the follower"
    );
    assert!(seen.endpoints.len() >= 2, "it moved to another node");
}

// ---------------------------------------------------------------------------------------
// Leases.

const TTL_S: u64 = 2;
const LEASED: [&str; 3] = ["svc/a", "svc/b", "svc/c"];

/// Grants a lease of `TTL_S` and puts the `LEASED` keys under it; returns its id and the
/// revision of the last put.
async fn leased_keys(c: &Client) -> (u64, u64) {
    let lease = c.lease_grant(TTL_S).await.unwrap();
    assert_eq!(lease.ttl_s, TTL_S);
    let mut revision = 0;
    for key in LEASED {
        revision = c
            .put_with_lease(key, "up", lease.id)
            .await
            .unwrap()
            .revision;
    }
    (lease.id, revision)
}

/// Every event of a watch of `prefix` from `from`, with the time it arrived, until the
/// receiver is dropped. A failed watch ends the channel.
fn watch_events(c: &Client, prefix: &str, from: u64) -> mpsc::Receiver<(Instant, WatchEvent)> {
    let c = client(c.endpoints().to_vec());
    let mut spec = WatchSpec::prefix(prefix).from_revision(from);
    spec.idle_timeout_ms = 3_000;
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut stream = c.watch(spec).await.expect("the watch opens");
        while let Some(event) = stream.next().await {
            let event = event.expect("the watch goes on");
            if tx.send((Instant::now(), event)).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// Reads events until a progress line says everything up to `revision` was sent; returns
/// the puts and deletes read, with their arrival times.
async fn events_through(
    rx: &mut mpsc::Receiver<(Instant, WatchEvent)>,
    revision: u64,
    bound: Duration,
) -> Vec<(Instant, WatchEvent)> {
    let deadline = tokio::time::Instant::now() + bound;
    let mut out = Vec::new();
    loop {
        let (at, event) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no progress to revision {revision} in {bound:?}"))
            .expect("the watch ended");
        match event {
            WatchEvent::Progress { revision: r } if r >= revision => return out,
            WatchEvent::Progress { .. } => {}
            event => out.push((at, event)),
        }
    }
}

/// A `raftkv lease keepalive ID -w json` process and the renewals it printed.
struct CliKeeper {
    child: Child,
    lines: std::sync::mpsc::Receiver<(Instant, String)>,
    /// When each renewal line was read.
    renewals: Vec<Instant>,
    id: u64,
}

impl CliKeeper {
    fn spawn(id: u64, endpoints: &[String], stderr: std::fs::File) -> CliKeeper {
        let mut child = Command::new(BIN)
            .args(["lease", "keepalive", &id.to_string(), "-w", "json"])
            .args(["--endpoints", &endpoints.join(",")])
            .env("RAFTKV_LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("the keeper starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        CliKeeper {
            child,
            lines,
            renewals: Vec::new(),
            id,
        }
    }

    /// Takes the lines printed so far: each is one renewal of this lease.
    fn drain(&mut self) {
        while let Ok((at, line)) = self.lines.try_recv() {
            let json: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            assert_eq!(json["id"], self.id, "{line}");
            assert_eq!(json["ttl_s"], TTL_S, "{line}");
            self.renewals.push(at);
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CliKeeper {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The `LEASED` keys a linearizable GET finds: key → value.
async fn leased_state(c: &Client) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for key in LEASED {
        if let Some(kv) = c.get(key, Consistency::Linearizable).await.unwrap() {
            found.insert(kv.key, kv.value);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_cli_keeper_is_killed_loses_its_keys_within_3_s() {
    let root = tempfile::tempdir().unwrap();
    let (nodes, _http) = start_cluster(root.path(), "lease-keeper").await;
    let c = client(urls(&nodes));
    let (id, revision) = leased_keys(&c).await;
    let stderr = std::fs::File::create(root.path().join("keeper.log")).unwrap();
    let mut keeper = CliKeeper::spawn(id, &urls(&nodes), stderr);
    let mut events = watch_events(&c, "svc/", revision + 1);
    // Alive past twice its TTL while the keeper runs.
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    assert!(keeper.running(), "the keeper runs");
    keeper.drain();
    assert!(
        keeper.renewals.len() >= 5,
        "renewed every TTL/3: {} renewals in 5 s",
        keeper.renewals.len()
    );
    assert_eq!(leased_state(&c).await.len(), LEASED.len(), "keys kept");
    let now = c.lease_get(id).await.unwrap();
    assert_eq!(now.keys_count, LEASED.len() as u64);
    let before_kill = events_through(&mut events, revision, Duration::from_secs(5)).await;
    assert!(before_kill.is_empty(), "no change yet: {before_kill:?}");

    let last_renewal = *keeper.renewals.last().unwrap();
    let killed_at = Instant::now();
    keeper.kill();
    keeper.drain();
    let last_renewal = keeper.renewals.last().copied().unwrap_or(last_renewal);
    let mut deleted = BTreeSet::new();
    let deadline = tokio::time::Instant::from_std(killed_at + Duration::from_secs(3));
    while deleted.len() < LEASED.len() {
        let (at, event) = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("only {deleted:?} deleted within 3 s of the kill"))
            .expect("the watch goes on");
        match event {
            WatchEvent::Delete(kv) => {
                // The leader counts the TTL from before it confirmed the last renewal.
                let after = at.duration_since(last_renewal);
                assert!(
                    after >= Duration::from_millis(1_500),
                    "deleted {after:?} after"
                );
                assert!(deleted.insert(kv.key.clone()), "{} deleted twice", kv.key);
            }
            WatchEvent::Progress { .. } => {}
            other => panic!("only deletes after the kill: {other:?}"),
        }
    }
    eprintln!("deleted {:?} after the kill", killed_at.elapsed());
    assert!(leased_state(&c).await.is_empty(), "the keys are gone");
    let gone = c.lease_get(id).await.unwrap_err();
    assert!(matches!(gone, ClientError::LeaseNotFound { .. }), "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_lease_keeps_its_keys_through_a_leader_kill() {
    let mut rng = seed("a_kept_alive_lease_keeps_its_keys_through_a_leader_kill");
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, http) = start_cluster(root.path(), "lease-leader").await;
    let c = client(urls(&nodes));
    let (id, revision) = leased_keys(&c).await;
    let keeper = c.keep_alive(id).await.unwrap();
    let mut events = watch_events(&c, "svc/", revision + 1);
    // The kill lands anywhere between two renewals.
    tokio::time::sleep(Duration::from_millis(rng.range(0, 1_500))).await;
    let lead = leader(&http, &nodes).await;
    let renewals_at_kill = match keeper.status() {
        KeeperStatus::Alive { renewals, .. } => renewals,
        other => panic!("kept alive before the kill: {other:?}"),
    };
    nodes[lead].kill();
    eprintln!("killed the leader, node {}", nodes[lead].id);
    tokio::time::sleep(Duration::from_secs(3 * TTL_S)).await;

    let renewals = match keeper.status() {
        KeeperStatus::Alive { renewals, .. } => renewals,
        other => panic!("still kept alive: {other:?}"),
    };
    assert!(
        renewals >= renewals_at_kill + 3,
        "renewed on the new leader"
    );
    let state = leased_state(&c).await;
    assert_eq!(state.len(), LEASED.len(), "keys kept: {state:?}");
    let listed = c.lease_list().await.unwrap();
    assert!(listed.leases.iter().any(|l| l.id == id), "{listed:?}");
    let seen = events_through(&mut events, listed.revision, Duration::from_secs(10)).await;
    assert!(seen.is_empty(), "no delete: {seen:?}");

    // Revoked by hand, its keys go at once, all at one revision.
    keeper.stop().await;
    let revoked = c.lease_revoke(id).await.unwrap();
    assert_eq!(revoked.deleted, LEASED.len() as u64);
    let seen = events_through(&mut events, revoked.revision, Duration::from_secs(10)).await;
    let deletes: BTreeSet<(String, u64)> = seen
        .iter()
        .map(|(_, e)| match e {
            WatchEvent::Delete(kv) => (kv.key.clone(), kv.mod_revision),
            other => panic!("only deletes: {other:?}"),
        })
        .collect();
    let expected = LEASED.iter().map(|k| (k.to_string(), revoked.revision));
    assert_eq!(deletes, expected.collect());
}

// ---------------------------------------------------------------------------------------
// Hostile and edge requests to the watch and lease endpoints.

/// The status and JSON body of an answer that must not be a stream.
async fn answer(req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
    let r = req
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("an answer");
    let status = r.status().as_u16();
    assert_ne!(status, 200, "{:?} answered 200", r.url().as_str());
    let body = r.text().await.expect("a body");
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}

/// Asserts a JSON error of `status` and `kind`, with a message.
fn assert_error(got: &(u16, serde_json::Value), status: u16, kind: &str, what: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    assert_eq!(got.1["kind"], kind, "{what}: {}", got.1);
    assert!(
        got.1["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: {}",
        got.1
    );
}

async fn bad_watches(http: &reqwest::Client, url: &str) {
    let long = "p".repeat(8193);
    let cases: [(String, u16, &str); 11] = [
        ("".into(), 400, "bad_request"),
        ("?key=".into(), 400, "bad_request"),
        ("?key=a&prefix=a".into(), 400, "bad_request"),
        ("?key=a&start_revision=0".into(), 400, "bad_request"),
        ("?key=a&start_revision=-1".into(), 400, "bad_request"),
        ("?key=a&start_revision=ten".into(), 400, "bad_request"),
        ("?key=a&start_revision=1.5".into(), 400, "bad_request"),
        (
            "?key=a&start_revision=18446744073709551616".into(),
            400,
            "bad_request",
        ),
        (
            "?key=a&start_revision=1&start_revision=2".into(),
            400,
            "bad_request",
        ),
        (format!("?prefix={long}"), 413, "too_large"),
        (format!("?key={long}"), 413, "too_large"),
    ];
    for (query, status, kind) in cases {
        let got = answer(http.get(format!("{url}/watch{query}"))).await;
        assert_error(&got, status, kind, &format!("/watch{:.60}", query));
    }
}

/// Opens `/watch{query}` (a 200 stream) and reads lines until `done` says so (bounded).
async fn read_watch(
    http: &reqwest::Client,
    url: &str,
    query: &str,
    done: impl Fn(&[WatchEvent]) -> bool,
) -> Vec<WatchEvent> {
    use futures_util::StreamExt;
    let r = http
        .get(format!("{url}/watch{query}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "/watch{query}");
    let mut body = r.bytes_stream();
    let (mut events, mut buf) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !done(&events) {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .unwrap_or_else(|_| panic!("/watch{query}: stuck after {events:?}"));
        let Some(chunk) = chunk else { break };
        buf.extend_from_slice(&chunk.expect("the stream reads"));
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            events.push(serde_json::from_slice(&line).expect("a watch event"));
        }
    }
    events
}

/// 50 writes on a node keeping 10 revisions of history: a watch from 1 is 410 `compacted`
/// with where history starts; from just after it, the stream replays the rest.
async fn compacted_history(http: &reqwest::Client, url: &str) {
    let c = client(vec![url.to_string()]);
    let mut written = Vec::new();
    for i in 0..50 {
        let kv = c.put(&format!("hist/{i:02}"), "x").await.unwrap();
        written.push((kv.key, kv.mod_revision));
    }
    let last = written.last().unwrap().1;
    let got = answer(http.get(format!("{url}/watch?key=hist/00&start_revision=1"))).await;
    assert_eq!(got.0, 410, "{}", got.1);
    assert_eq!(got.1["error"], "compacted", "{}", got.1);
    let compact = got.1["compact_revision"]
        .as_u64()
        .expect("compact_revision");
    assert!(compact >= 1 && compact + 10 <= last, "{compact} of {last}");
    let at = answer(http.get(format!("{url}/watch?prefix=hist/&start_revision={compact}"))).await;
    assert_eq!(
        (at.0, &at.1["compact_revision"]),
        (410, &got.1["compact_revision"])
    );
    let query = format!("?prefix=hist/&start_revision={}", compact + 1);
    let replayed = read_watch(http, url, &query, |e| {
        e.last().is_some_and(|e| e.seen_revision() >= last)
    })
    .await;
    let replayed: Vec<(String, u64)> = replayed
        .into_iter()
        .filter_map(|e| match e {
            WatchEvent::Put(kv) => Some((kv.key, kv.mod_revision)),
            _ => None,
        })
        .collect();
    let kept: Vec<(String, u64)> = written.into_iter().filter(|w| w.1 > compact).collect();
    assert_eq!(replayed, kept, "the history after {compact}");
}

async fn bad_leases(http: &reqwest::Client, url: &str) {
    for body in [
        r#"{"ttl_s": 0}"#,
        r#"{"ttl_s": 18446744073709551615}"#,
        r#"{"ttl_s": 1000000000000}"#,
        r#"{"ttl_s": -1}"#,
        r#"{"ttl_s": "5"}"#,
        r#"{}"#,
        "",
    ] {
        let req = http.post(format!("{url}/lease")).body(body);
        let got = answer(req.header("content-type", "application/json")).await;
        assert_error(&got, 400, "bad_request", &format!("POST /lease {body}"));
    }
    for id in ["abc", "0", "-1", "1.5", "18446744073709551616"] {
        for req in [
            http.post(format!("{url}/lease/{id}/keepalive")),
            http.get(format!("{url}/lease/{id}")),
            http.delete(format!("{url}/lease/{id}")),
        ] {
            assert_error(
                &answer(req).await,
                400,
                "bad_request",
                &format!("lease {id}"),
            );
        }
    }
    let unknown = [
        http.post(format!("{url}/lease/999999/keepalive")),
        http.get(format!("{url}/lease/999999")),
        http.delete(format!("{url}/lease/999999")),
        http.put(format!("{url}/kv/orphan?lease=999999"))
            .json(&serde_json::json!({"value": "v"})),
    ];
    for req in unknown {
        let got = answer(req).await;
        assert_error(&got, 404, "lease_not_found", "an unknown lease");
    }
    let orphan = answer(http.get(format!("{url}/kv/orphan"))).await;
    assert_error(
        &orphan,
        404,
        "key_not_found",
        "nothing written under an unknown lease",
    );
    let bad_put = http.put(format!("{url}/kv/orphan?lease=abc"));
    let got = answer(bad_put.json(&serde_json::json!({"value": "v"}))).await;
    assert_error(&got, 400, "bad_request", "PUT ?lease=abc");
}

/// `--leases-max 2`: a third grant is 413 `leases_full` until one is revoked.
async fn leases_full(http: &reqwest::Client, url: &str) {
    let c = client(vec![url.to_string()]);
    let first = c.lease_grant(60).await.unwrap();
    c.lease_grant(60).await.unwrap();
    let req = http
        .post(format!("{url}/lease"))
        .json(&serde_json::json!({"ttl_s": 60}));
    assert_error(&answer(req).await, 413, "leases_full", "a third lease");
    c.lease_revoke(first.id).await.unwrap();
    c.lease_grant(60).await.unwrap();
    assert_eq!(c.lease_list().await.unwrap().leases.len(), 2);
}

/// A stream open when the node is asked to stop (SIGTERM) ends with a `shutting_down` line
/// saying where to resume; the node then exits cleanly.
async fn watch_ends_on_sigterm(http: &reqwest::Client, node: &mut Node) {
    let url = node.url();
    let put = client(vec![url.clone()])
        .put("last", "before stop")
        .await
        .unwrap();
    let query = format!("?prefix=&start_revision={}", put.mod_revision);
    let opened = read_watch(http, &url, &query, |e| !e.is_empty()).await;
    assert!(
        matches!(&opened[0], WatchEvent::Put(kv) if kv.key == "last"),
        "{opened:?}"
    );
    let stream = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move {
            read_watch(&http, &url, &query, |e| {
                matches!(e.last(), Some(WatchEvent::Error { .. }))
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await; // the stream is open
    let stopped_at = Instant::now();
    node.terminate();
    let events = stream.await.expect("the stream is read");
    match events.last() {
        Some(WatchEvent::Error { kind, revision, .. }) => {
            assert_eq!(kind, "shutting_down", "{events:?}");
            assert!(*revision > put.mod_revision, "{events:?}");
        }
        other => panic!("the stream ended without an error line: {other:?}"),
    }
    let (status, took) = node.wait_exit(stopped_at, Duration::from_secs(20));
    assert!(
        status.success(),
        "{status:?} after {took:?}:\n{}",
        node.log_tail()
    );
}

/// `raftkv_http_requests_total{route="GET /watch",code}` at `url`.
async fn watches_counted(http: &reqwest::Client, url: &str, code: u16) -> u64 {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("raftkv_http_requests_total{{route=\"GET /watch\",code=\"{code}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().expect("a counter"))
}

/// A watch that is a connection's first request is served on the socket itself, not by
/// hyper: it is counted under the same route label, with its status.
async fn raw_watches_are_counted(http: &reqwest::Client, url: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let (ok_before, bad_before) = (
        watches_counted(http, url, 200).await,
        watches_counted(http, url, 400).await,
    );
    for (query, status) in [("?key=counted", "200"), ("?key=", "400")] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET /watch{query} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut head = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut head))
            .await
            .expect("a response head")
            .unwrap();
        let head = String::from_utf8_lossy(&head[..n]);
        assert!(head.starts_with(&format!("HTTP/1.1 {status}")), "{head}");
    }
    assert_eq!(watches_counted(http, url, 200).await, ok_before + 1);
    assert_eq!(watches_counted(http, url, 400).await, bad_before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_watch_and_lease_requests_get_json_errors_and_streams_end_on_sigterm() {
    let root = tempfile::tempdir().unwrap();
    let http = http_client();
    let extra = ["--watch-history-revisions", "10", "--leases-max", "2"];
    let mut node = Node::new(root.path(), &extra);
    node.start();
    node.ready(&http).await;
    let url = node.url();
    bad_watches(&http, &url).await;
    compacted_history(&http, &url).await;
    bad_leases(&http, &url).await;
    leases_full(&http, &url).await;
    raw_watches_are_counted(&http, &url).await;
    watch_ends_on_sigterm(&http, &mut node).await;
}
