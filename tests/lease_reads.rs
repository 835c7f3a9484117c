//! Lease reads on real `raftkv serve --lease-reads` processes: a `consistency=lease` read is
//! served from the leader's lease (counted in `raftkv_server_lease_reads_total`), a
//! linearizable one never is, and a leader paused (SIGSTOP) past its lease, while the others
//! elect a new leader and write, never answers from its lease when it wakes: its clock, not
//! its ticks, says the lease ran out.

mod support;

use std::time::{Duration, Instant};
use support::{cluster, http_client, leader, status, Node};

async fn put(http: &reqwest::Client, url: &str, key: &str, value: &str) -> u16 {
    let body = serde_json::json!({ "value": value });
    let r = http
        .put(format!("{url}/kv/{key}"))
        .json(&body)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("a put answered");
    r.status().as_u16()
}

/// `(status, value)` of a read at `consistency`.
async fn get(http: &reqwest::Client, url: &str, key: &str, consistency: &str) -> (u16, String) {
    let Ok(r) = http
        .get(format!("{url}/kv/{key}?consistency={consistency}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
    else {
        return (0, String::new());
    };
    let code = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    let value = body["value"].as_str().unwrap_or_default().to_string();
    (code, value)
}

async fn lease_reads_total(http: &reqwest::Client, node: &Node) -> f64 {
    let text = http
        .get(format!("{}/metrics", node.url()))
        .send()
        .await
        .expect("scrape")
        .text()
        .await
        .expect("an exposition");
    text.lines()
        .find_map(|l| l.strip_prefix("raftkv_server_lease_reads_total "))
        .expect("the lease reads counter")
        .parse()
        .expect("a number")
}

fn signal(node: &Node, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(node.pid()).expect("a pid fits pid_t");
    // SAFETY: a plain signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_reads_come_from_the_lease_and_a_paused_leader_never_serves_a_stale_one() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(root.path(), "lease-reads", 3, &["--lease-reads"]);
    for n in nodes.iter_mut() {
        n.start();
    }
    let http = http_client();
    for n in &nodes {
        n.ready(&http).await;
    }
    let old = leader(&http, &nodes).await;
    let old_url = nodes[old].url();
    assert_eq!(put(&http, &old_url, "k", "v1").await, 200);

    // Lease reads on the leader come from its lease (heartbeats renew it every 30 ms; it is
    // trusted for 135 ms): nearly all of them, whatever the machine's load.
    let before = lease_reads_total(&http, &nodes[old]).await;
    for _ in 0..20 {
        assert_eq!(get(&http, &old_url, "k", "lease").await, (200, "v1".into()));
    }
    let served = lease_reads_total(&http, &nodes[old]).await - before;
    assert!(
        served >= 10.0,
        "only {served} of 20 lease reads used the lease"
    );
    // Linearizable reads never do.
    let before = lease_reads_total(&http, &nodes[old]).await;
    for _ in 0..20 {
        assert_eq!(
            get(&http, &old_url, "k", "linearizable").await,
            (200, "v1".into())
        );
    }
    assert_eq!(lease_reads_total(&http, &nodes[old]).await, before);

    // Pause the leader; the others wait out its lease, elect a new leader, and write v2.
    signal(&nodes[old], libc::SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_url = loop {
        let mut found = None;
        for (i, n) in nodes.iter().enumerate() {
            if i == old {
                continue;
            }
            if let Some(s) = status(&http, &n.url()).await {
                if s.role == "leader" && s.id == n.id {
                    found = Some(n.url());
                }
            }
        }
        if let Some(url) = found {
            break url;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader while the old one is paused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(put(&http, &new_url, "k", "v2").await, 200);

    // Wake the old leader and ask it at once: whatever it answers, never the old value.
    signal(&nodes[old], libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut answered = 0;
    while answered < 20 {
        let (code, value) = get(&http, &old_url, "k", "lease").await;
        if code == 200 {
            assert_eq!(value, "v2", "a stale lease read after the pause");
            answered += 1;
        }
        assert!(
            Instant::now() < deadline,
            "the old leader never answered again"
        );
    }
}
