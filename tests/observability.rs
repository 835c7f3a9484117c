//! What an operator sees of a running cluster from outside: `GET /metrics` on every member
//! and the JSON log lines (`--log-format json`), judged on real `raftkv serve` processes.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::{cluster, http_client, Node};

/// Every sample of a Prometheus/OpenMetrics text exposition: series text → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("`series value`");
            (series.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

async fn scrape(http: &reqwest::Client, node: &Node) -> BTreeMap<String, f64> {
    let r = http
        .get(format!("{}/metrics", node.url()))
        .send()
        .await
        .expect("scrape");
    assert_eq!(r.status(), 200);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("application/openmetrics-text"));
    let text = r.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "an exposition ends with # EOF");
    samples(&text)
}

fn value(s: &BTreeMap<String, f64>, series: &str) -> f64 {
    *s.get(series)
        .unwrap_or_else(|| panic!("no series {series}; have {:?}", s.keys()))
}

/// Waits until exactly one member says it leads and every member knows a leader.
async fn settled(http: &reqwest::Client, nodes: &[Node]) -> Vec<BTreeMap<String, f64>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut all = Vec::new();
        for n in nodes {
            all.push(scrape(http, n).await);
        }
        let leaders: f64 = all
            .iter()
            .map(|s| value(s, "raftkv_server_is_leader"))
            .sum();
        let known = all
            .iter()
            .all(|s| value(s, "raftkv_server_has_leader") == 1.0);
        if leaders == 1.0 && known {
            return all;
        }
        assert!(Instant::now() < deadline, "no settled leader: {leaders}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_json_logs_tell_an_operator_what_the_cluster_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), "observe", 3, &["--log-format", "json"]);
    for n in &mut nodes {
        n.start();
    }
    let http = http_client();
    for n in &nodes {
        n.ready(&http).await;
    }
    // Writes through every member (followers forward to the leader).
    let writes = 60;
    for i in 0..writes {
        let node = &nodes[i % nodes.len()];
        let r = http
            .put(format!("{}/kv/k{i}", node.url()))
            .body(r#"{"value":"v"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    // Let heartbeats run so round trips are measured.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = settled(&http, &nodes).await;
    let leader = all
        .iter()
        .position(|s| value(s, "raftkv_server_is_leader") == 1.0)
        .unwrap();
    let terms: Vec<f64> = all.iter().map(|s| value(s, "raftkv_server_term")).collect();
    assert!(
        terms.iter().all(|t| *t == terms[0] && *t >= 1.0),
        "{terms:?}"
    );
    for (i, s) in all.iter().enumerate() {
        let id = nodes[i].id;
        assert!(value(s, "raftkv_server_leader_changes_seen_total") >= 1.0);
        // Every member holds and applied every write (plus the leader's no-ops).
        assert!(value(s, "raftkv_raft_applied_index") >= writes as f64);
        assert!(value(s, "raftkv_raft_commit_index") >= value(s, "raftkv_raft_applied_index"));
        assert!(value(s, "raftkv_raft_last_index") >= value(s, "raftkv_raft_commit_index"));
        assert!(value(s, "raftkv_server_proposals_applied_total") >= writes as f64);
        assert!(value(s, "raftkv_wal_fsync_duration_seconds_count") >= 1.0);
        assert!(value(s, "raftkv_wal_append_bytes_total") > 0.0);
        assert!(value(s, "raftkv_apply_duration_seconds_count") >= 1.0);
        assert!(value(s, "raftkv_db_size_bytes") > 0.0);
        // The session gauge is exported; these writes carried no session.
        assert_eq!(value(s, "raftkv_sessions"), 0.0);
        // Watch and lease gauges are exported; nothing watched, no lease granted.
        assert_eq!(value(s, "raftkv_watchers"), 0.0);
        assert_eq!(value(s, "raftkv_watch_queued_bytes"), 0.0);
        assert_eq!(value(s, "raftkv_watchers_cancelled"), 0.0);
        assert_eq!(value(s, "raftkv_leases"), 0.0);
        // Followers talk to the leader only; the leader to everyone.
        let leader_id = nodes[leader].id;
        let talked_to = nodes
            .iter()
            .map(|n| n.id)
            .filter(|p| *p != id && (id == leader_id || *p == leader_id));
        for peer in talked_to {
            let sent = format!("raftkv_peer_sent_bytes_total{{peer=\"{peer}\"}}");
            let received = format!("raftkv_peer_received_bytes_total{{peer=\"{peer}\"}}");
            assert!(value(s, &sent) > 0.0, "node {id} sent nothing to {peer}");
            assert!(
                value(s, &received) > 0.0,
                "node {id} got nothing from {peer}"
            );
        }
        // Each member counted the writes it received, by route and code: a third each, and
        // the leader also the two thirds the followers forwarded to it.
        let puts = value(
            s,
            "raftkv_http_requests_total{route=\"PUT /kv/{key}\",code=\"200\"}",
        );
        let expected = if i == leader {
            writes
        } else {
            writes / nodes.len()
        };
        assert_eq!(puts, expected as f64, "node {id}");
    }
    let l = &all[leader];
    assert_eq!(value(l, "raftkv_server_proposals_pending_total"), 0.0);
    assert_eq!(value(l, "raftkv_server_proposals_failed_total"), 0.0);
    assert!(value(l, "raftkv_server_proposals_committed_total") >= writes as f64);
    for peer in nodes
        .iter()
        .map(|n| n.id)
        .filter(|p| *p != nodes[leader].id)
    {
        let rtt = format!("raftkv_peer_round_trip_seconds_count{{peer=\"{peer}\"}}");
        assert!(
            value(l, &rtt) >= 1.0,
            "the leader timed no heartbeat to {peer}"
        );
    }
    for n in &mut nodes {
        n.kill();
    }
    check_json_logs(&nodes, nodes[leader].id, terms[0] as u64);
}

/// Every log line is one JSON object; the leadership events carry their fields as numbers.
fn check_json_logs(nodes: &[Node], leader: u64, term: u64) {
    for n in nodes {
        let log = std::fs::read_to_string(&n.log).unwrap();
        let mut events = Vec::new();
        for line in log.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("node {}: not JSON ({e}): {line}", n.id));
            for field in ["timestamp", "level", "message", "target"] {
                assert!(v.get(field).is_some(), "no {field} in {line}");
            }
            events.push(v);
        }
        let changed = events
            .iter()
            .rev()
            .find(|v| v["message"] == "leader changed")
            .unwrap_or_else(|| panic!("node {} logged no leader change", n.id));
        assert_eq!(changed["leader"].as_u64(), Some(leader), "node {}", n.id);
        assert_eq!(changed["term"].as_u64(), Some(term), "node {}", n.id);
        if n.id == leader {
            let became = events
                .iter()
                .rev()
                .find(|v| v["message"] == "became leader")
                .expect("the leader logged it");
            assert_eq!(became["term"].as_u64(), Some(term));
        }
    }
}

#[test]
fn a_bad_log_level_is_a_usage_error() {
    let out = std::process::Command::new(support::BIN)
        .args(["--log-level", "loud=[", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--log-level"), "{stderr}");
}

/// `promtool` (Debian's `prometheus` package; `.ci/run` installs it) accepts the alert rules
/// and the sample configuration in `tools/monitoring/`.
#[test]
fn the_alert_rules_and_prometheus_config_are_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/monitoring");
    let check = |what: &str, file: &str| {
        std::process::Command::new("promtool")
            .args(["check", what, &format!("{dir}/{file}")])
            .output()
    };
    let out = match check("rules", "raftkv-alerts.yml") {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIPPED: promtool is not installed ({e}); apt-get install prometheus");
            return;
        }
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = check("config", "prometheus.yml").unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
