//! Three nodes in one process on loopback: elect, write through any node, read at every
//! consistency, restart a node from its data dir, and catch a lagging node up by snapshot.

use raftkv::api::{Consistency, Limits};
use raftkv::client::{Client, ClientConfig};
use raftkv::node::{self, NodeConfig, RunningNode};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

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
        heartbeat_ms: 20,
        election_timeout_ms: 150,
        snapshot_every,
        catchup_margin: 10,
        cache_mb: 16,
        request_timeout_ms: 5000,
        limits: Limits::default(),
        lease_reads: false,
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
