//! Membership changes on real `raftkv serve` processes, under a steady write load from several
//! clients: replace a node whose data dir was wiped (remove it, add a new id on the same host,
//! `--join`, catch up by snapshot); grow 3 → 5 and shrink 5 → 3 removing the leader last;
//! kill -9 the leader in the middle of a joint change. After each, every acknowledged write is
//! read back from every final member's own state (stale reads once it has applied the
//! leader's commit index). Waits are bounded and generous; nothing asserts speed.

use raftkv::api::{ClusterStatus, Consistency};
use raftkv::client::{Client, ClientConfig};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod support;

use support::{cluster, free_port, http_client, Node, BIN};

/// Compact often and keep a small margin, so a new member catches up by snapshot.
const EXTRA: &[&str] = &["--snapshot-every", "300", "--catchup-margin", "50"];
const WRITERS: usize = 4;

/// Writers putting unique keys until stopped; what was acknowledged (200) is recorded.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(endpoints: Vec<String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let tasks = (0..WRITERS)
            .map(|w| {
                let (stop, acked) = (stop.clone(), acked.clone());
                let mut config = ClientConfig::new(endpoints.clone());
                config.retry_budget_ms = 2_000;
                let client = Client::new(config).expect("client");
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let (key, value) = (format!("w{w}-{n:06}"), format!("v{w}-{n}"));
                        // Unanswered or 504: outcome unknown, not recorded (may or may not be
                        // there); only acknowledged writes are checked.
                        if client.put(&key, &value).await.is_ok() {
                            acked.lock().unwrap().insert(key, value);
                        }
                    }
                })
            })
            .collect();
        Load { stop, acked, tasks }
    }

    async fn stop(self) -> BTreeMap<String, String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("writer");
        }
        let acked = self.acked.lock().unwrap().clone();
        assert!(
            acked.len() > 100,
            "the load hardly wrote: {} acked",
            acked.len()
        );
        acked
    }
}

async fn status(http: &reqwest::Client, url: &str) -> Option<ClusterStatus> {
    let r = http
        .get(format!("{url}/cluster/status"))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// The leader's status, asked of `urls` until one answers as leader (bounded).
async fn leader_status(http: &reqwest::Client, urls: &[String]) -> ClusterStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for u in urls {
            if let Some(s) = status(http, u).await.filter(|s| s.role == "leader") {
                return s;
            }
        }
        assert!(Instant::now() < deadline, "no leader among {urls:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A membership request through the HTTP API; retried while it answers 503 (no leader right
/// now: certainly no effect), then it must answer 200.
async fn change(http: &reqwest::Client, req: reqwest::RequestBuilder, what: &str) -> ClusterStatus {
    let _ = http;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = req.try_clone().expect("a body that can be sent again");
        let r = attempt
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let code = r.status();
        let body = r.text().await.unwrap();
        if code.as_u16() == 503 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        assert!(code.is_success(), "{what}: answered {code}: {body}");
        return serde_json::from_str(&body).unwrap();
    }
}

async fn add(http: &reqwest::Client, via: &str, node: &Node, learner: bool) -> ClusterStatus {
    let body = serde_json::json!({
        "id": node.id,
        "peer_addr": format!("127.0.0.1:{}", node.peer_port),
        "client_url": node.url(),
        "learner": learner,
    });
    let req = http.post(format!("{via}/cluster/members")).json(&body);
    change(http, req, &format!("add {}", node.id)).await
}

async fn promote(http: &reqwest::Client, via: &str, id: u64) -> ClusterStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = http
            .post(format!("{via}/cluster/members/{id}/promote"))
            .send()
            .await
            .unwrap();
        let code = r.status().as_u16();
        let body = r.text().await.unwrap();
        match code {
            200 => return serde_json::from_str(&body).unwrap(),
            // Not caught up yet (or the previous change still completing): the guard says so.
            409 if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            _ => panic!("promote {id}: answered {code}: {body}"),
        }
    }
}

async fn remove(http: &reqwest::Client, via: &str, id: u64) -> ClusterStatus {
    let req = http.delete(format!("{via}/cluster/members/{id}"));
    change(http, req, &format!("remove {id}")).await
}

/// A node that joins the cluster of `like` with a new id, on its own ports and data dir.
fn joiner(root: &Path, like: &Node, id: u64, join: &[String]) -> Node {
    Node {
        id,
        cluster_id: like.cluster_id.clone(),
        data_dir: root.join(format!("node{id}")),
        log: root.join(format!("node{id}.log")),
        client_port: free_port(),
        peer_port: free_port(),
        members: Vec::new(),
        extra: EXTRA
            .iter()
            .map(|s| s.to_string())
            .chain(["--join".to_string(), join.join(",")])
            .collect(),
        files_max: None,
        child: None,
    }
}

/// Every acknowledged write is in every member's own state, once it applied what the leader
/// committed; and every member has the same configuration.
async fn check_everywhere(
    http: &reqwest::Client,
    members: &[&Node],
    acked: &BTreeMap<String, String>,
) {
    let urls: Vec<String> = members.iter().map(|n| n.url()).collect();
    let leader = leader_status(http, &urls).await;
    let want_voters = leader.membership.voters.clone();
    for n in members {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = status(http, &n.url()).await;
            let caught_up = s.as_ref().is_some_and(|s| {
                s.applied_index >= leader.commit_index && s.membership.voters == want_voters
            });
            if caught_up {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never caught up: {s:?}\n{}",
                n.id,
                n.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let client = Client::new(ClientConfig::new(vec![n.url()])).unwrap();
        for (k, v) in acked {
            let got = client
                .get(k, Consistency::Stale)
                .await
                .unwrap_or_else(|e| panic!("node {} {k}: {e}", n.id));
            assert_eq!(
                got.map(|r| r.value).as_deref(),
                Some(v.as_str()),
                "node {} lost the acknowledged write {k}",
                n.id
            );
        }
    }
}

fn start_all(nodes: &mut [Node]) {
    for n in nodes.iter_mut() {
        n.start();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_is_replaced_by_a_new_id_that_joins_and_catches_up_by_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let http = http_client();
    let mut nodes = cluster(root.path(), "replace", 3, EXTRA);
    start_all(&mut nodes);
    for n in &nodes {
        n.ready(&http).await;
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let mut new = joiner(root.path(), &nodes[0], 4, &urls[..2]);
    let mut endpoints = urls.clone();
    endpoints.push(new.url());
    let load = Load::start(endpoints);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Node 3's disk dies: killed, data dir wiped.
    nodes[2].kill();
    std::fs::remove_dir_all(&nodes[2].data_dir).unwrap();
    let after = remove(&http, &urls[0], 3).await;
    assert_eq!(after.membership.voters, vec![1, 2]);
    add(&http, &urls[1], &new, true).await;
    tokio::time::sleep(Duration::from_secs(1)).await; // more entries, more compactions
    new.start();
    let s = promote(&http, &urls[0], 4).await;
    assert_eq!(s.membership.voters, vec![1, 2, 4]);
    assert!(!s.membership.change_in_flight);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked = load.stop().await;
    let joined = status(&http, &new.url()).await.expect("node 4 answers");
    assert!(
        joined.snapshot_index > 0,
        "node 4 caught up by snapshot: {joined:?}"
    );
    check_everywhere(&http, &[&nodes[0], &nodes[1], &new], &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grow_three_to_five_then_shrink_to_three_removing_the_leader_last() {
    let root = tempfile::tempdir().unwrap();
    let http = http_client();
    let mut nodes = cluster(root.path(), "grow", 3, EXTRA);
    start_all(&mut nodes);
    for n in &nodes {
        n.ready(&http).await;
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let mut n4 = joiner(root.path(), &nodes[0], 4, &urls);
    let mut n5 = joiner(root.path(), &nodes[0], 5, &urls);
    let mut endpoints = urls.clone();
    endpoints.extend([n4.url(), n5.url()]);
    let load = Load::start(endpoints.clone());
    for n in [&mut n4, &mut n5] {
        add(&http, &urls[0], n, true).await;
        n.start();
        promote(&http, &urls[1], n.id).await;
    }
    let five = leader_status(&http, &endpoints).await;
    assert_eq!(five.membership.voters, vec![1, 2, 3, 4, 5]);
    // Shrink: remove two followers among the original members, then the leader last.
    let leader = five.leader.as_ref().expect("leader").id;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let via = |skip: &[u64]| {
        let id = (1..=5).find(|id| !skip.contains(id)).unwrap();
        endpoints[id as usize - 1].clone()
    };
    remove(&http, &via(&[follower]), follower).await;
    let s = remove(&http, &via(&[follower, leader]), leader).await;
    let removed = [follower, leader];
    assert_eq!(s.membership.voters.len(), 3, "{s:?}");
    assert!(!s.membership.voters.contains(&leader));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked = load.stop().await;
    let all: Vec<&Node> = nodes.iter().chain([&n4, &n5]).collect();
    let finals: Vec<&Node> = all
        .iter()
        .copied()
        .filter(|n| !removed.contains(&n.id))
        .collect();
    assert_eq!(finals.len(), 3);
    // The removed leader stepped down and says it was removed.
    let old = all.iter().find(|n| n.id == leader).unwrap();
    let s = status(&http, &old.url())
        .await
        .expect("the removed leader still answers");
    assert!(s.membership.removed && s.role != "leader", "{s:?}");
    check_everywhere(&http, &finals, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_in_the_middle_of_a_joint_change_loses_nothing() {
    let root = tempfile::tempdir().unwrap();
    let http = http_client();
    let mut nodes = cluster(root.path(), "jointkill", 3, EXTRA);
    start_all(&mut nodes);
    for n in &nodes {
        n.ready(&http).await;
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.url()).collect();
    let mut n4 = joiner(root.path(), &nodes[0], 4, &urls);
    let mut endpoints = urls.clone();
    endpoints.push(n4.url());
    let load = Load::start(endpoints.clone());
    add(&http, &urls[0], &n4, true).await;
    n4.start();
    // Wait until promotable, then promote and kill the leader while the joint configuration
    // is in flight (the answer never comes: outcome unknown).
    let leader = loop {
        let s = leader_status(&http, &urls).await;
        let m = s.members.iter().find(|m| m.id == 4);
        if m.is_some_and(|m| {
            m.reachable == Some(true) && m.match_index.unwrap_or(0) + 100 >= s.last_index
        }) {
            break s.leader.expect("leader").id;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let leader_url = urls[leader as usize - 1].clone();
    let promote = tokio::spawn({
        let http = http.clone();
        async move {
            http.post(format!("{leader_url}/cluster/members/4/promote"))
                .send()
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    nodes[leader as usize - 1].kill();
    let _ = promote.await;
    // The survivors settle: the joint configuration is completed (C_new) or was never
    // committed and is gone; either way no change is left in flight.
    let survivors: Vec<String> = endpoints
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u64 + 1 != leader)
        .map(|(_, u)| u.clone())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let settled = loop {
        let s = leader_status(&http, &survivors).await;
        if !s.membership.change_in_flight {
            break s;
        }
        assert!(Instant::now() < deadline, "the change never settled: {s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Bring the killed leader back: it must adopt the settled configuration.
    nodes[leader as usize - 1].start();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked = load.stop().await;
    let mut finals: Vec<&Node> = nodes.iter().collect();
    if settled.membership.voters.contains(&4) || settled.membership.learners.contains(&4) {
        finals.push(&n4);
    }
    check_everywhere(&http, &finals, &acked).await;
}

#[test]
fn the_member_commands_use_the_public_names() {
    // `raftkv member --help` lists the four commands of the interface.
    let out = std::process::Command::new(BIN)
        .args(["member", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["list", "add", "promote", "remove"] {
        assert!(
            text.contains(cmd),
            "`raftkv member --help` lacks {cmd}:\n{text}"
        );
    }
}
