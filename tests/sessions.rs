//! Exactly-once writes and compare-and-swap on real `raftkv serve` processes, with the leader
//! killed (SIGKILL) while writes are in flight:
//!
//! - 8 clients each add 1 to one shared counter 200 times with read + `if_mod_revision`
//!   loops, through leader kills: the counter ends at exactly 1,600, and its version too
//!   (no increment lost, none applied twice);
//! - a write retried 10 times under the same session (same client id and sequence, raw
//!   HTTP) after killing the leader mid-flight is applied once: every answer carries the
//!   same revision and the key's version is 1.
//!
//! The random choices (when to kill, which endpoint a retry goes to) come from one seed,
//! printed; `RAFTKV_TEST_SEED=<seed>` replays it.

use raftkv::api::http::{CLIENT_ID_HEADER, DUPLICATE_HEADER, SEQ_HEADER};
use raftkv::api::{Consistency, KvResponse};
use raftkv::client::{Client, ClientConfig, ClientError};
use raftkv::raft::rng::Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod support;

use support::{cluster, http_client, leader, Node};

const CLIENTS: u64 = 8;
const INCREMENTS: u64 = 200;

fn seed(test: &str) -> Rng {
    support::seed("sessions", test)
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

/// One client's 200 increments: read, then a conditional put at the revision read; on a
/// failed condition, the 412's current value is the next read.
async fn increment(client: Client, key: String, done: Arc<AtomicU64>) -> u64 {
    let mut attempts = 0u64;
    let mut seen = client
        .get(&key, Consistency::Linearizable)
        .await
        .expect("first read");
    for _ in 0..INCREMENTS {
        loop {
            attempts += 1;
            let (value, revision) = seen.as_ref().map_or((0, 0), |kv| {
                (kv.value.parse::<u64>().unwrap(), kv.mod_revision)
            });
            match client
                .put_if(&key, &(value + 1).to_string(), revision)
                .await
            {
                Ok(Ok(written)) => {
                    seen = Some(written);
                    break;
                }
                Ok(Err(failed)) => {
                    seen = failed.current.map(|kv| KvResponse {
                        key: kv.key,
                        value: kv.value,
                        index: failed.revision,
                        leader: None,
                        revision: failed.revision,
                        create_revision: kv.create_revision,
                        mod_revision: kv.mod_revision,
                        version: kv.version,
                    });
                }
                // Certainly not applied: read again and retry.
                Err(ClientError::Unavailable(why)) => {
                    eprintln!("unavailable, retrying: {why}");
                    seen = read_until_answered(&client, &key).await;
                }
                Err(e) => panic!("an increment failed: {e}"),
            }
        }
        done.fetch_add(1, Ordering::SeqCst);
    }
    attempts
}

async fn read_until_answered(client: &Client, key: &str) -> Option<KvResponse> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.get(key, Consistency::Linearizable).await {
            Ok(kv) => return kv,
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("cannot read {key}: {e}"),
        }
    }
}

/// Waits until `done` reaches `n` (bounded).
async fn until(done: &AtomicU64, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(45);
    while done.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "stuck at {} increments",
            done.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_clients_count_to_1600_with_cas_through_leader_kills() {
    let mut rng = seed("eight_clients_count_to_1600_with_cas_through_leader_kills");
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, http) = start_cluster(root.path(), "sessions-cas").await;
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let key = "counter".to_string();
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let mut config = ClientConfig::new(urls.clone());
            config.retry_budget_ms = 20_000;
            let client = Client::new(config).unwrap();
            tokio::spawn(increment(client, key.clone(), done.clone()))
        })
        .collect();
    // First kill somewhere in the first third, restarted after a while; the second in the
    // second third, left dead (two of three nodes keep the quorum).
    let total = CLIENTS * INCREMENTS;
    let first = total / 8 + rng.range(0, total / 4);
    let second = total / 2 + rng.range(0, total / 4);
    until(&done, first).await;
    let killed = leader(&http, &nodes).await;
    nodes[killed].kill();
    eprintln!(
        "killed the leader, node {}, at {first} increments",
        nodes[killed].id
    );
    tokio::time::sleep(Duration::from_millis(300 + rng.range(0, 700))).await;
    nodes[killed].start();
    nodes[killed].ready(&http).await;
    until(&done, second).await;
    let killed = leader(&http, &nodes).await;
    nodes[killed].kill();
    eprintln!(
        "killed the leader, node {}, at {second} increments",
        nodes[killed].id
    );
    let mut attempts = 0;
    for w in workers {
        attempts += w.await.expect("a client panicked");
    }
    let check = Client::new(ClientConfig::new(urls.clone())).unwrap();
    let end = read_until_answered(&check, &key)
        .await
        .expect("the counter exists");
    eprintln!(
        "1600 increments in {:.1} s, {attempts} conditional puts",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(end.value, total.to_string());
    assert_eq!(end.version, total, "one write per increment: {end:?}");
}

/// One raw PUT under session (`client_id`, 1) to `url`: the answer's status, body and
/// whether it came from the session table; `None` when no answer arrived.
async fn sessioned_put(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    client_id: &str,
) -> Option<(u16, String, bool)> {
    let r = http
        .put(format!("{url}/kv/{key}"))
        .header(CLIENT_ID_HEADER, client_id)
        .header(SEQ_HEADER, "1")
        .json(&serde_json::json!({"value": "once"}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    let duplicate = r
        .headers()
        .get(DUPLICATE_HEADER)
        .is_some_and(|v| v == "true");
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?, duplicate))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_resent_ten_times_under_one_session_after_a_leader_kill_applies_once() {
    let mut rng =
        seed("a_write_resent_ten_times_under_one_session_after_a_leader_kill_applies_once");
    let root = tempfile::tempdir().unwrap();
    let (mut nodes, http) = start_cluster(root.path(), "sessions-once").await;
    let client_id = format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64());
    let key = format!("once-{:08x}", rng.next_u64() as u32);
    // Load the leader a little so the kill lands among other writes too.
    let busy = Client::new(ClientConfig::new(nodes.iter().map(|n| n.url()).collect())).unwrap();
    for i in 0..20 {
        busy.put(&format!("before-{i}"), "x").await.unwrap();
    }
    let killed = leader(&http, &nodes).await;
    let first = {
        let (http, url, key, id) = (
            http.clone(),
            nodes[killed].url(),
            key.clone(),
            client_id.clone(),
        );
        tokio::spawn(async move { sessioned_put(&http, &url, &key, &id).await })
    };
    tokio::time::sleep(Duration::from_micros(rng.range(0, 3000))).await;
    nodes[killed].kill();
    let first = first.await.unwrap();
    eprintln!(
        "killed node {} mid-flight; its answer: {first:?}",
        nodes[killed].id
    );
    let mut answers = Vec::new();
    if let Some((200, body, dup)) = &first {
        answers.push((serde_json::from_str::<KvResponse>(body).unwrap(), *dup));
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut resent = 0;
    while resent < 10 {
        if resent == 5 && nodes[killed].child.is_none() {
            nodes[killed].start(); // the old leader takes resends too, once back
        }
        let to = rng.range(0, nodes.len() as u64) as usize;
        match sessioned_put(&http, &nodes[to].url(), &key, &client_id).await {
            Some((200, body, duplicate)) => {
                resent += 1;
                answers.push((
                    serde_json::from_str::<KvResponse>(&body).unwrap(),
                    duplicate,
                ));
            }
            // No leader yet, the node is down or restarting: nothing was decided, again.
            Some((503 | 504, _, _)) | None => {}
            Some((status, body, _)) => panic!("resend answered {status}: {body}"),
        }
        assert!(
            Instant::now() < deadline,
            "only {resent} resends answered in time"
        );
        tokio::time::sleep(Duration::from_millis(10 + rng.range(0, 40))).await;
    }
    let revision = answers[0].0.revision;
    for (answer, _) in &answers {
        assert_eq!(
            (answer.revision, answer.mod_revision, answer.version),
            (revision, revision, 1),
            "every answer is the first one's: {answers:?}"
        );
    }
    // The first answer to apply was not a duplicate; every later one was.
    assert!(
        answers.iter().filter(|(_, dup)| !dup).count() <= 1,
        "{answers:?}"
    );
    let check = Client::new(ClientConfig::new(nodes.iter().map(|n| n.url()).collect())).unwrap();
    let kv = read_until_answered(&check, &key)
        .await
        .expect("the key exists");
    assert_eq!(
        (kv.version, kv.mod_revision, kv.create_revision),
        (1, revision, revision)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_session_expired_resends_under_a_fresh_one() {
    let root = tempfile::tempdir().unwrap();
    let http = http_client();
    let mut node = Node::new(root.path(), &["--session-ttl-s", "1"]);
    node.start();
    node.ready(&http).await;
    let client = Client::new(ClientConfig::new(vec![node.url()])).unwrap();
    // A raw session of our own shows when the node has expired the idle ones.
    let raw = |seq: u64| {
        http.put(format!("{}/kv/raw", node.url()))
            .header(CLIENT_ID_HEADER, "raw-session")
            .header(SEQ_HEADER, seq.to_string())
            .json(&serde_json::json!({"value": "r"}))
            .send()
    };
    assert_eq!(raw(1).await.unwrap().status().as_u16(), 200);
    let first = client.put("k", "1").await.unwrap(); // the client's session, sequence 1
    assert_eq!(first.version, 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = raw(2).await.unwrap();
        let (status, body) = (r.status().as_u16(), r.text().await.unwrap());
        if status == 409 {
            assert!(body.contains("session_expired"), "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}"); // not expired yet: applied as sequence 2
        assert!(Instant::now() < deadline, "no session expired within 20 s");
        // Idle again from here: the next check uses sequence 2 once more (a duplicate).
    }
    // The client's session expired too: its next write is refused, then resent fresh.
    let second = client.put("k", "2").await.unwrap();
    assert_eq!(second.version, 2, "applied once: {second:?}");
}
