//! Three nodes in one process on loopback: elect, write through any node, read at every
//! consistency, restart a node from its data dir, and catch a lagging node up by snapshot.

use raftkv::api::{Consistency, Limits};
use raftkv::client::{Client, ClientConfig};
use raftkv::node::{self, NodeConfig, RunningNode};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

mod support;
// Ports from one counter per process, never handed out twice: a node restarted on its own
// port must not find it taken by another test's node (port 0's answers repeat once released).
use support::free_port;

struct Ports {
    client: BTreeMap<u64, u16>,
    peer: BTreeMap<u64, u16>,
}

fn ports(n: u64) -> Ports {
    Ports {
        client: (1..=n).map(|i| (i, free_port())).collect(),
        peer: (1..=n).map(|i| (i, free_port())).collect(),
    }
}

fn config(id: u64, ports: &Ports, root: &Path, snapshot_every: u64) -> NodeConfig {
    NodeConfig {
        id,
        cluster_id: "test".into(),
        data_dir: root.join(format!("node{id}")),
        client_addr: format!("127.0.0.1:{}", ports.client[&id]),
        client_url: format!("http://127.0.0.1:{}", ports.client[&id]),
        peer_addr: format!("127.0.0.1:{}", ports.peer[&id]),
        peers: ports
            .peer
            .iter()
            .filter(|(i, _)| **i != id)
            .map(|(i, p)| (*i, format!("127.0.0.1:{p}")))
            .collect(),
        join: Vec::new(),
        peer_client_urls: ports
            .client
            .iter()
            .filter(|(i, _)| **i != id)
            .map(|(i, p)| (*i, format!("http://127.0.0.1:{p}")))
            .collect(),
        peer_secret_file: None,
        peer_tls: None,
        heartbeat_ms: 20,
        election_timeout_ms: 150,
        snapshot_every,
        catchup_margin: 10,
        cache_mb: 16,
        log_cache_mb: 8,
        wal_segment_mb: 64,
        request_timeout_ms: 5000,
        limits: Limits::default(),
        lease_reads: false,
        sessions: Default::default(),
        watch: Default::default(),
        leases: Default::default(),
        client_port: Default::default(),
    }
}

fn client(ports: &Ports) -> Client {
    let endpoints = ports
        .client
        .values()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    Client::new(ClientConfig::new(endpoints)).unwrap()
}

async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_write_read_restart_and_catch_up_by_snapshot() {
    let root = tempfile::tempdir().unwrap();
    let ports = ports(3);
    let mut nodes: BTreeMap<u64, RunningNode> = BTreeMap::new();
    for id in 1..=3 {
        nodes.insert(
            id,
            node::start(config(id, &ports, root.path(), 50))
                .await
                .unwrap(),
        );
    }
    let c = client(&ports);
    let w = wait_for("a first write", async || c.put("hello", "world").await.ok()).await;
    assert_eq!(w.value, "world");
    // Every node serves the write, at every consistency.
    for (id, port) in &ports.client {
        let one = Client::new(ClientConfig::new(vec![format!("http://127.0.0.1:{port}")])).unwrap();
        let got = one
            .get("hello", Consistency::Linearizable)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.value, "world", "linearizable via node {id}");
        let stale = wait_for("catch-up", async || {
            one.get("hello", Consistency::Stale).await.ok().flatten()
        })
        .await;
        assert_eq!(stale.value, "world", "stale via node {id}");
    }

    // Stop a follower, write past several compactions, restart it: it catches up by snapshot.
    let status = c
        .status_of(&format!("http://127.0.0.1:{}", ports.client[&1]))
        .await
        .unwrap();
    let leader = status.leader.unwrap().id;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    nodes.remove(&follower).unwrap().shutdown().await.unwrap();
    for i in 0..300 {
        c.put(&format!("k{i:04}"), &format!("v{i}")).await.unwrap();
    }
    let d = c.delete("k0000").await.unwrap();
    assert!(d.deleted);
    nodes.insert(
        follower,
        node::start(config(follower, &ports, root.path(), 50))
            .await
            .unwrap(),
    );
    let f = Client::new(ClientConfig::new(vec![format!(
        "http://127.0.0.1:{}",
        ports.client[&follower]
    )]))
    .unwrap();
    wait_for("the restarted follower to catch up", async || {
        let v = f.get("k0299", Consistency::Stale).await.ok().flatten()?;
        (v.value == "v299").then_some(())
    })
    .await;
    assert!(f.get("k0000", Consistency::Stale).await.unwrap().is_none());
    let listed = f.list("k", 1000, Consistency::Stale).await.unwrap();
    assert_eq!(listed.count, 299);
    let st = f
        .status_of(&format!("http://127.0.0.1:{}", ports.client[&follower]))
        .await
        .unwrap();
    assert!(st.snapshot_index > 0, "compaction ran: {st:?}");

    for (_, n) in nodes {
        n.shutdown().await.unwrap();
    }
}

/// Members' client URLs come from configuration: a handshake that claims to be the leader
/// (the version 1 protocol carried a client URL, and the acceptor believed it) is refused
/// without changing anything, and a node with no URL configured for the leader names it by id
/// only. The nodes here also authenticate with a cluster secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_urls_come_from_configuration_not_from_handshakes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let root = tempfile::tempdir().unwrap();
    let secret = root.path().join("peer-secret");
    std::fs::write(&secret, "node-in-process secret\n").unwrap();
    let ports = ports(3);
    let config = |id: u64| {
        let mut c = config(id, &ports, root.path(), 1000);
        c.peer_secret_file = Some(secret.clone());
        c
    };
    let mut nodes: BTreeMap<u64, RunningNode> = BTreeMap::new();
    for id in 1..=3 {
        nodes.insert(id, node::start(config(id)).await.unwrap());
    }
    let c = client(&ports);
    wait_for("a first write", async || c.put("a", "b").await.ok()).await;
    let url = |id: u64| format!("http://127.0.0.1:{}", ports.client[&id]);
    let status = c.status_of(&url(1)).await.unwrap();
    let leader = status.leader.unwrap().id;
    let follower = (1..=3).find(|i| *i != leader).unwrap();

    // A forged version 1 handshake to the follower, claiming to be the leader.
    #[derive(serde::Serialize)]
    struct HelloV1 {
        version: u32,
        cluster_id: String,
        from: u64,
        to: u64,
        client_url: String,
    }
    let forged = HelloV1 {
        version: 1,
        cluster_id: "test".into(),
        from: leader,
        to: follower,
        client_url: "http://attacker.example:1".into(),
    };
    let mut frame = Vec::new();
    raftkv::transport::frame::encode_frame(&mut frame, &forged, 4096).unwrap();
    let peer_addr = format!("127.0.0.1:{}", ports.peer[&follower]);
    let mut raw = tokio::net::TcpStream::connect(&peer_addr).await.unwrap();
    raw.write_all(&frame).await.unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "the forged handshake is refused and closed");

    let st = c.status_of(&url(follower)).await.unwrap();
    let hint = st.leader.expect("the follower knows the leader");
    assert_eq!((hint.id, hint.client_url), (leader, Some(url(leader))));
    for m in &st.members {
        assert_eq!(m.client_url.as_deref(), Some(url(m.id).as_str()), "{m:?}");
    }

    // The follower restarted without configured URLs: the leader is named by id only.
    nodes.remove(&follower).unwrap().shutdown().await.unwrap();
    let mut bare = config(follower);
    bare.peer_client_urls.clear();
    nodes.insert(follower, node::start(bare).await.unwrap());
    let hint = wait_for("the restarted follower to know the leader", async || {
        let leader = c.status_of(&url(follower)).await.ok()?.leader?;
        (leader.id != follower).then_some(leader)
    })
    .await;
    assert_eq!(
        hint.client_url, None,
        "no URL is configured for node {}",
        hint.id
    );

    for (_, n) in nodes {
        n.shutdown().await.unwrap();
    }
}

/// A short secret or a missing certificate stops the start before the data dir is created.
#[tokio::test]
async fn bad_peer_auth_files_are_refused_before_the_disk_is_touched() {
    let root = tempfile::tempdir().unwrap();
    let ports = ports(3);
    let short = root.path().join("short-secret");
    std::fs::write(&short, "too short\n").unwrap();
    let mut c = config(1, &ports, root.path(), 1000);
    c.peer_secret_file = Some(short);
    let err = node::start(c.clone())
        .await
        .err()
        .expect("a short secret is refused");
    assert!(err.to_string().contains("short-secret"), "{err}");
    assert!(!c.data_dir.exists(), "nothing was written");

    c.peer_secret_file = None;
    c.peer_tls = Some(node::PeerTlsFiles {
        cert: root.path().join("missing-cert.pem"),
        key: root.path().join("missing-key.pem"),
        ca: root.path().join("missing-ca.pem"),
    });
    let err = node::start(c.clone())
        .await
        .err()
        .expect("a missing certificate is refused");
    assert!(err.to_string().contains("missing-cert.pem"), "{err}");
    assert!(!c.data_dir.exists(), "nothing was written");
}

/// Three nodes with mutual TLS and a cluster secret on the peer port elect a leader and
/// replicate a write to every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_peer_tls_and_a_secret_replicates() {
    let root = tempfile::tempdir().unwrap();
    let pki = raftkv::tls::generate_dev_pki(
        &root.path().join("pki"),
        &[1, 2, 3],
        &["127.0.0.1", "localhost"],
    )
    .unwrap();
    let secret = root.path().join("peer-secret");
    std::fs::write(&secret, "tls cluster secret, 16+ bytes\n").unwrap();
    let ports = ports(3);
    let mut nodes = Vec::new();
    for id in 1..=3 {
        let mut c = config(id, &ports, root.path(), 1000);
        c.peer_secret_file = Some(secret.clone());
        c.peer_tls = Some(node::PeerTlsFiles {
            cert: pki.nodes[&id].cert.clone(),
            key: pki.nodes[&id].key.clone(),
            ca: pki.ca_cert.clone(),
        });
        nodes.push(node::start(c).await.unwrap());
    }
    let c = client(&ports);
    wait_for("a write over TLS", async || {
        c.put("tls", "works").await.ok()
    })
    .await;
    for port in ports.client.values() {
        let one = Client::new(ClientConfig::new(vec![format!("http://127.0.0.1:{port}")])).unwrap();
        let got = wait_for("replication", async || {
            one.get("tls", Consistency::Stale).await.ok().flatten()
        })
        .await;
        assert_eq!(got.value, "works");
    }
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

/// The membership API on real nodes: a learner added through a follower (forwarded to the
/// leader), refused promotion while it has not caught up (it never starts), refused twice,
/// then removed; the leader's view has every member's match index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_is_added_refused_promotion_and_removed_through_the_api() {
    let root = tempfile::tempdir().unwrap();
    let ports = ports(3);
    let mut nodes = Vec::new();
    for id in 1..=3 {
        nodes.push(
            node::start(config(id, &ports, root.path(), 1000))
                .await
                .unwrap(),
        );
    }
    let c = client(&ports);
    wait_for("a first write", async || c.put("a", "b").await.ok()).await;
    let url = |id: u64| format!("http://127.0.0.1:{}", ports.client[&id]);
    let leader = c.status_of(&url(1)).await.unwrap().leader.unwrap().id;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let via_follower = Client::new(ClientConfig::new(vec![url(follower)])).unwrap();

    let view = c.members().await.unwrap();
    assert_eq!(
        (view.id, view.membership.voters.as_slice()),
        (leader, &[1, 2, 3][..])
    );
    assert!(
        view.members.iter().all(|m| m.match_index.is_some()),
        "{view:?}"
    );

    let learner_peer = format!("127.0.0.1:{}", free_port());
    let s = via_follower
        .add_member(4, &learner_peer, "http://127.0.0.1:1", true, false)
        .await
        .unwrap();
    assert_eq!((s.id, s.membership.learners.as_slice()), (leader, &[4][..]));
    assert!(
        !s.membership.change_in_flight,
        "answered once complete: {s:?}"
    );
    let added = s.members.iter().find(|m| m.id == 4).unwrap();
    assert_eq!(
        (added.role.as_str(), added.peer_addr.as_str()),
        ("learner", learner_peer.as_str())
    );

    let err = via_follower.promote_member(4, false).await.unwrap_err();
    assert_eq!(err.rejected_status(), Some(409), "{err}");
    let err = c
        .add_member(4, &learner_peer, "http://127.0.0.1:1", true, false)
        .await
        .unwrap_err();
    assert_eq!(err.rejected_status(), Some(409), "{err}");
    let err = c.remove_member(9, false).await.unwrap_err();
    assert_eq!(err.rejected_status(), Some(404), "{err}");

    let s = via_follower.remove_member(4, false).await.unwrap();
    assert!(s.membership.learners.is_empty(), "{s:?}");
    assert_eq!(s.membership.voters, [1, 2, 3]);
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

/// A sessioned PUT of `key` through `url`: (status, error kind or "").
async fn session_put(url: &str, key: &str, client: &str, seq: u64) -> (u16, String) {
    let resp = reqwest::Client::new()
        .put(format!("{url}/kv/{key}"))
        .header(raftkv::api::http::CLIENT_ID_HEADER, client)
        .header(raftkv::api::http::SEQ_HEADER, seq.to_string())
        .body(r#"{"value":"v"}"#)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap();
    (status, body["kind"].as_str().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_and_are_evicted_through_the_log_on_every_node() {
    let root = tempfile::tempdir().unwrap();
    let ports = ports(3);
    let mut nodes: BTreeMap<u64, RunningNode> = BTreeMap::new();
    for id in 1..=3 {
        let mut cfg = config(id, &ports, root.path(), 1000);
        cfg.sessions = node::SessionSettings {
            ttl_ms: 1500,
            sessions_max: 2,
        };
        nodes.insert(id, node::start(cfg).await.unwrap());
    }
    let c = client(&ports);
    wait_for("a leader", async || c.put("warm", "up").await.ok()).await;
    let url = format!("http://127.0.0.1:{}", ports.client[&1]);
    // The leader's upkeep puts the configured bounds into the log.
    wait_for("the configured session bounds applied", async || {
        nodes
            .values()
            .all(|n| n.sessions_summary().params.sessions_max == 2)
            .then_some(())
    })
    .await;
    for client in ["s1", "s2", "s3"] {
        assert_eq!(
            session_put(&url, "k", client, 1).await,
            (200, String::new())
        );
    }
    // Three sessions in a table of two: the least recently active one was evicted.
    assert_eq!(
        session_put(&url, "k", "s1", 2).await,
        (409, "session_expired".to_string())
    );
    assert_eq!(session_put(&url, "k", "s3", 2).await.0, 200);
    assert_eq!(session_put(&url, "k", "s3", 2).await.0, 200, "a retry");
    // Idle past the TTL: the upkeep's entry expires s2 and s3 on every node alike.
    wait_for("idle sessions expired everywhere", async || {
        nodes
            .values()
            .all(|n| n.sessions_summary().count == 0)
            .then_some(())
    })
    .await;
    assert_eq!(
        session_put(&url, "k", "s3", 2).await,
        (409, "session_expired".to_string())
    );
    for (_, n) in nodes {
        n.shutdown().await.unwrap();
    }
}
