//! The consensus core's bounded log cache on real `raftkv serve` processes: with a 1 MiB
//! `--log-cache-mb` and no compaction in sight, a leader holds at most its cache of applied
//! payloads (`raftkv_raft_log_held_bytes`), and a follower that was down while several MiB
//! were written catches up from entries the leader reads back from its WAL
//! (`raftkv_raft_log_reads_total`), without a snapshot, ending with the same data.

mod support;

use std::time::{Duration, Instant};
use support::{cluster, http_client, leader, status, Node};

const VALUE_BYTES: usize = 8 << 10;
const WRITES: usize = 640;
const WRITERS: usize = 16;

/// One sample of `name` from the node's `/metrics`.
async fn metric(http: &reqwest::Client, node: &Node, name: &str) -> f64 {
    let text = http
        .get(format!("{}/metrics", node.url()))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("an exposition");
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {name} in the exposition"))
        .parse()
        .expect("a number")
}

/// `WRITES` puts of `VALUE_BYTES` through `url`, `WRITERS` at a time; all must succeed.
async fn fill(http: &reqwest::Client, url: &str) {
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (http, url) = (http.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            for i in (w..WRITES).step_by(WRITERS) {
                let value = format!("{i:06}").repeat(VALUE_BYTES / 6);
                let r = http
                    .put(format!("{url}/kv/key-{i:06}"))
                    .json(&serde_json::json!({ "value": value }))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .expect("a put answered");
                assert_eq!(r.status().as_u16(), 200, "put {i}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("a writer finished");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_log_cache_catches_up_from_the_leaders_wal() {
    let root = tempfile::tempdir().unwrap();
    let extra = ["--log-cache-mb", "1", "--snapshot-every", "1000000"];
    let mut nodes = cluster(root.path(), "log-cache", 3, &extra);
    for n in nodes.iter_mut() {
        n.start();
    }
    let http = http_client();
    for n in &nodes {
        n.ready(&http).await;
    }
    let lead = leader(&http, &nodes).await;
    let behind = (lead + 1) % 3;
    nodes[behind].kill();
    let url = nodes[lead].url();
    fill(&http, &url).await;

    // ~5.3 MB written; the leader keeps at most its 1 MiB cache (plus what is not applied).
    let held = metric(&http, &nodes[lead], "raftkv_raft_log_held_bytes").await;
    assert!(
        held <= (1 << 20) as f64,
        "the leader holds {held} bytes of log"
    );
    let reads_before = metric(&http, &nodes[lead], "raftkv_raft_log_reads_total").await;

    let commit = status(&http, &url)
        .await
        .expect("leader status")
        .commit_index;
    nodes[behind].start();
    let deadline = Instant::now() + Duration::from_secs(60);
    let caught_up = loop {
        if let Some(s) = status(&http, &nodes[behind].url()).await {
            if s.applied_index >= commit {
                break s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the follower did not catch up; its log ends:\n{}",
            nodes[behind].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        caught_up.snapshot_index, 0,
        "caught up from the log, not a snapshot"
    );
    let reads = metric(&http, &nodes[lead], "raftkv_raft_log_reads_total").await - reads_before;
    assert!(reads > 0.0, "no append was read back from the WAL");
    println!("follower caught up to {commit} with {reads} appends read from the WAL");

    // The follower's copy is the leader's: read a few keys where they were stored.
    for i in [0, WRITES / 2, WRITES - 1] {
        let r = http
            .get(format!(
                "{}/kv/key-{i:06}?consistency=stale",
                nodes[behind].url()
            ))
            .send()
            .await
            .expect("a read answered");
        assert_eq!(r.status().as_u16(), 200);
        let body: serde_json::Value = r.json().await.expect("json");
        let value = body["value"].as_str().expect("a value");
        assert_eq!(value, format!("{i:06}").repeat(VALUE_BYTES / 6), "key {i}");
    }
}
