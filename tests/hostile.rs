//! The hostile-input battery against real node processes: what an unauthenticated network
//! peer and a misbehaving client could do to a round-1 node, replayed. Every case names the
//! attack; every assertion is about the node's behaviour afterwards (still elects, still
//! serves, memory bounded, no busy loop). Unit-level cases (frame and message decoding, HTTP
//! parsing, key handling) live beside their code and in `hostile_http.rs`; the fuzz corpora
//! are replayed by the fuzz replay tests.

mod support;

use raftkv::node::peer::PeerMessage;
use raftkv::raft::{Message, MessageBody};
use raftkv::transport::{PeerTransport, TransportConfig};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::{cluster, http_client, Node};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Writes through any member until one succeeds (bounded).
async fn write_somewhere(nodes: &[Node], http: &reqwest::Client, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for n in nodes {
            let r = http
                .put(format!("{}/kv/{key}", n.url()))
                .json(&serde_json::json!({ "value": "v" }))
                .send()
                .await;
            if r.is_ok_and(|r| r.status().is_success()) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no member accepted a write");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The highest term any member reports.
async fn max_term(nodes: &[Node], http: &reqwest::Client) -> u64 {
    let mut term = 0;
    for n in nodes {
        let status: serde_json::Value = http
            .get(format!("{}/cluster/status", n.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        term = term.max(status["term"].as_u64().unwrap());
    }
    term
}

/// An impostor claiming to be member 3, with no secret, sending the frames that bricked a
/// round-1 cluster: a Vote with term 2^64 − 1, one just below the wire bound, and an Append
/// with absurd indexes.
async fn impostor_attacks(cluster_id: &str, targets: &[&Node]) -> PeerTransport<PeerMessage> {
    let peers: BTreeMap<u64, String> = targets
        .iter()
        .map(|n| (n.id, format!("127.0.0.1:{}", n.peer_port)))
        .collect();
    let config = TransportConfig::new(cluster_id, 3, peers);
    let (impostor, _inbound) = PeerTransport::<PeerMessage>::start(config, "127.0.0.1:0")
        .await
        .unwrap();
    for n in targets {
        for (term, body) in [
            (
                u64::MAX,
                MessageBody::Vote {
                    pre: false,
                    last_index: u64::MAX,
                    last_term: u64::MAX,
                    transfer: true,
                },
            ),
            (
                (1 << 62) - 1,
                MessageBody::Vote {
                    pre: false,
                    last_index: 1 << 40,
                    last_term: (1 << 62) - 1,
                    transfer: true,
                },
            ),
            (
                u64::MAX - 1,
                MessageBody::Append {
                    prev_index: u64::MAX,
                    prev_term: u64::MAX,
                    entries: Vec::new(),
                    commit: u64::MAX,
                },
            ),
        ] {
            let m = Message {
                from: 3,
                to: n.id,
                term,
                body,
            };
            let _ = impostor.send(n.id, PeerMessage::Raft(m));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    impostor
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_votes_from_an_unauthenticated_peer_do_not_brick_the_cluster() {
    let root = tempfile::tempdir().unwrap();
    let mut nodes = cluster(root.path(), "hostile-open", 3, &[]);
    nodes.iter_mut().for_each(Node::start);
    let http = http_client();
    write_somewhere(&nodes, &http, "before").await;
    let impostor = impostor_attacks("hostile-open", &[&nodes[0], &nodes[1]]).await;
    impostor.shutdown().await;
    // Round 1 persisted the forged term on every node; restarting them all did not help.
    for n in nodes.iter_mut() {
        n.kill();
        n.start();
    }
    write_somewhere(&nodes, &http, "after").await;
    let term = max_term(&nodes, &http).await;
    assert!(term < 1000, "a forged term was adopted: {term}");
    let refused = nodes[..2].iter().any(|n| {
        std::fs::read_to_string(&n.log)
            .unwrap_or_default()
            .contains("refus")
    });
    assert!(refused, "the forged messages were not reported as refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_impostor_without_the_cluster_secret_is_refused_before_any_frame() {
    let root = tempfile::tempdir().unwrap();
    let secret = root.path().join("secret");
    std::fs::write(&secret, "battery-cluster-secret-0123456789\n").unwrap();
    let secret_arg = secret.display().to_string();
    let mut nodes = cluster(
        root.path(),
        "hostile-secret",
        3,
        &["--peer-secret-file", &secret_arg],
    );
    nodes.iter_mut().for_each(Node::start);
    let http = http_client();
    write_somewhere(&nodes, &http, "before").await;
    let term_before = max_term(&nodes, &http).await;
    let impostor = impostor_attacks("hostile-secret", &[&nodes[0], &nodes[1]]).await;
    impostor.shutdown().await;
    write_somewhere(&nodes, &http, "after").await;
    assert_eq!(
        max_term(&nodes, &http).await,
        term_before,
        "the impostor moved the term"
    );
    let log = std::fs::read_to_string(&nodes[0].log).unwrap_or_default();
    assert!(
        !log.contains("frames refused") && !log.contains("message refused"),
        "a frame of the impostor was decoded"
    );
}

/// 100 clients that send a large body's head and 1 MiB of it, then stall; 40 peer
/// connections that announce a 16 MiB frame before any handshake and send 1 MiB of it.
/// Round 1 buffered all of it (RSS 100 → 855 MB, +630 MiB); the node's memory must stay
/// within twice its idle RSS, and it must keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_stays_bounded_under_stalled_bodies_and_huge_pre_handshake_frames() {
    let root = tempfile::tempdir().unwrap();
    let mut node = Node::new(root.path(), &[]);
    node.start();
    let http = http_client();
    node.ready(&http).await;
    write_somewhere(std::slice::from_ref(&node), &http, "warm").await;
    let idle_kib = node.rss_kib();

    let chunk = vec![b'a'; 64 << 10];
    let mut held = Vec::new();
    for i in 0..100 {
        let mut s = TcpStream::connect(("127.0.0.1", node.client_port))
            .await
            .unwrap();
        let head = format!(
            "PUT /kv/slow{i} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 6000000\r\n\r\n{{\"value\":\""
        );
        s.write_all(head.as_bytes()).await.unwrap();
        for _ in 0..16 {
            // A node that stopped reading (budget spent) makes this block: bounded.
            if tokio::time::timeout(Duration::from_millis(200), s.write_all(&chunk))
                .await
                .is_err()
            {
                break;
            }
        }
        held.push(s);
    }
    for _ in 0..40 {
        let mut s = TcpStream::connect(("127.0.0.1", node.peer_port))
            .await
            .unwrap();
        let mut frame = Vec::from(((16u32 << 20) - 1).to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        let _ = s.write_all(&frame).await;
        for _ in 0..16 {
            let sent = tokio::time::timeout(Duration::from_millis(200), s.write_all(&chunk));
            if !matches!(sent.await, Ok(Ok(()))) {
                break; // refused at the header: the node closed the connection
            }
        }
        held.push(s);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attacked_kib = node.rss_kib();
    eprintln!("RSS idle {idle_kib} KiB, under attack {attacked_kib} KiB");
    assert!(
        attacked_kib <= 2 * idle_kib,
        "RSS grew from {idle_kib} KiB to {attacked_kib} KiB"
    );
    // Still answering, with JSON, while the attack holds.
    let r = http
        .get(format!("{}/kv/warm", node.url()))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "read during the attack: {}",
        r.status()
    );
    drop(held);
    write_somewhere(std::slice::from_ref(&node), &http, "after").await;
}

/// Round 1: ~1,000 idle sockets under a 1024 open-file limit locked clients out, and the
/// accept loop spun on EMFILE. Now connections are capped below the limit (the excess is
/// answered 503 and closed), the accept loop backs off, and once the sockets go the node
/// serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_sockets_at_the_open_file_limit_neither_spin_nor_lock_clients_out() {
    let root = tempfile::tempdir().unwrap();
    let mut node = Node::new(root.path(), &[]);
    node.files_max = Some(1024);
    node.start();
    let http = http_client();
    node.ready(&http).await;
    let mut held = Vec::new();
    for _ in 0..1100 {
        match TcpStream::connect(("127.0.0.1", node.client_port)).await {
            Ok(s) => held.push(s),
            Err(e) => panic!("connect: {e}"),
        }
    }
    let ticks_before = node.cpu_ticks();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = node.cpu_ticks() - ticks_before;
    assert!(
        used < 100,
        "the node used {used} ticks of CPU in 2 s while idle sockets were open"
    );
    // The newest connections were over the cap: answered 503 JSON, then closed.
    let mut last = held.pop().unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut last, &mut answer),
    )
    .await;
    assert!(
        read.is_ok(),
        "an over-the-cap connection was neither answered nor closed"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("{\"error\""), "{answer}");
    drop(held);
    let started = Instant::now();
    write_somewhere(std::slice::from_ref(&node), &http, "after").await;
    assert!(started.elapsed() < Duration::from_secs(5));
}
