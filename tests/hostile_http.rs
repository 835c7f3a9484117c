//! Hostile clients against a real node's client port: stalled bodies (memory stays bounded and
//! is released), malformed and oversized requests (JSON answers), awkward keys, list byte caps,
//! and a TLS node that requires a token.

use raftkv::api::server::ClientPortConfig;
use raftkv::api::{Consistency, Limits};
use raftkv::client::{Client, ClientConfig, ClientError};
use raftkv::node::{self, ClientPortSettings, NodeConfig, RunningNode};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn config(root: &Path, scheme: &str, client_port: ClientPortSettings) -> NodeConfig {
    let port = free_port();
    NodeConfig {
        id: 1,
        cluster_id: "hostile".into(),
        data_dir: root.join("node1"),
        client_addr: format!("127.0.0.1:{port}"),
        client_url: format!("{scheme}://127.0.0.1:{port}"),
        peer_addr: format!("127.0.0.1:{}", free_port()),
        peers: Default::default(),
        heartbeat_ms: 20,
        election_timeout_ms: 150,
        snapshot_every: 100_000,
        catchup_margin: 10,
        cache_mb: 8,
        log_cache_mb: 8,
        request_timeout_ms: 5000,
        limits: Limits::default(),
        lease_reads: false,
        sessions: Default::default(),
        watch: Default::default(),
        leases: Default::default(),
        client_port,
        wal_segment_mb: 64,
        ..NodeConfig::default()
    }
}

async fn wait_ready(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.put("ready-probe", "x").await.is_err() {
        assert!(Instant::now() < deadline, "the node never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends a head promising 5 MB and `sent_bytes` of body, then stalls; returns the answer.
async fn stalled_body(addr: String, chunk: Arc<Vec<u8>>, sent_bytes: usize) -> String {
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let head = "PUT /kv/slow HTTP/1.1\r\nhost: x\r\ncontent-length: 5000000\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let mut sent = 0;
        while sent < sent_bytes {
            if w.write_all(&chunk).await.is_err() {
                return;
            }
            sent += chunk.len();
        }
        std::future::pending::<()>().await; // keep the write half open: a stall
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut out)).await;
    writer.abort();
    String::from_utf8_lossy(&out).into_owned()
}

async fn raw(addr: &str, request: &[u8]) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    let status = text[9..12].parse().unwrap();
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    (status, serde_json::from_str(body).unwrap())
}

async fn start(config: NodeConfig) -> RunningNode {
    node::start(config).await.expect("the node starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_keep_memory_bounded_and_bad_requests_get_json() {
    let root = tempfile::tempdir().unwrap();
    let settings = ClientPortSettings {
        limits: ClientPortConfig {
            body_read_timeout_ms: 3000,
            body_buffer_bytes_max: 1 << 20,
            list_bytes_max: 64 << 10,
            ..ClientPortConfig::default()
        },
        ..ClientPortSettings::default()
    };
    let config = config(root.path(), "http", settings);
    let addr = config.client_addr.clone();
    let running = start(config).await;
    let c = Client::new(ClientConfig::new(vec![format!("http://{addr}")])).unwrap();
    wait_ready(&c).await;

    // Awkward keys, and a list of large values cut by the 64 KiB cap, continued exactly once.
    for key in [".", "..", "a/b", "%", "?x", "#y", "a b", "ü", "../x"] {
        c.put(key, key).await.unwrap();
        let got = c.get(key, Consistency::Linearizable).await.unwrap();
        assert_eq!(got.map(|r| r.value).as_deref(), Some(key));
    }
    // The longest key: 8 KiB of two-byte characters, 24 KiB once percent-encoded.
    let longest = "ü".repeat(4096);
    c.put(&longest, "long").await.unwrap();
    let got = c.get(&longest, Consistency::Linearizable).await.unwrap();
    assert_eq!(got.map(|r| r.value).as_deref(), Some("long"));
    let too_long = format!("{longest}x");
    let err = c.put(&too_long, "x").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected { status: 413, .. }),
        "{err}"
    );
    let big_value = "v".repeat(20_000);
    for i in 0..10 {
        c.put(&format!("big/{i}"), &big_value).await.unwrap();
    }
    let page = c
        .list_page("big/", None, 100, Consistency::Linearizable)
        .await
        .unwrap();
    assert!(page.more && page.count == 3, "{} items", page.count);
    let all = c
        .list("big/", 100, Consistency::Linearizable)
        .await
        .unwrap();
    let keys: Vec<String> = all.items.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(
        keys,
        (0..10).map(|i| format!("big/{i}")).collect::<Vec<_>>()
    );
    // 100 connections each send 2 MiB of a 5 MB body and stall. Without the budget the
    // node would hold 200 MiB; with it, 1 MiB plus one read buffer per connection. Idle RSS
    // is measured after the node has done some work.
    let idle_kib = rss_kib();
    let chunk = Arc::new(vec![b'x'; 64 << 10]);
    let stalls: Vec<_> = (0..100)
        .map(|_| tokio::spawn(stalled_body(addr.clone(), chunk.clone(), 2 << 20)))
        .collect();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let loaded_kib = rss_kib();
    println!("RSS idle {idle_kib} KiB, under 100 stalled bodies {loaded_kib} KiB");
    assert!(
        loaded_kib <= 2 * idle_kib,
        "RSS grew from {idle_kib} to {loaded_kib} KiB"
    );
    for s in stalls {
        let answer = s.await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 408") || answer.starts_with("HTTP/1.1 503"),
            "{answer}"
        );
        assert!(answer.contains(r#""kind":"#), "{answer}");
    }
    // The node serves again once they are gone.
    c.put("after", "stalls").await.unwrap();

    let (status, json) = raw(&addr, b"NOT HTTP\r\n\r\n").await;
    assert_eq!((status, json["kind"].as_str()), (400, Some("bad_request")));
    let mut big = b"GET /health HTTP/1.1\r\nx-big: ".to_vec();
    big.resize(raftkv::api::server::READ_BUFFER_BYTES_MAX, b'a');
    let (status, json) = raw(&addr, &big).await;
    assert_eq!(
        (status, json["kind"].as_str()),
        (431, Some("header_too_large"))
    );
    let put_array =
        b"PUT /kv/k HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\n[\"x\"]";
    let (status, json) = raw(&addr, put_array).await;
    assert_eq!(status, 400, "{json}");

    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_node_with_a_token_serves_only_trusting_clients_with_the_token() {
    let root = tempfile::tempdir().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let dir = root.path();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("token"), "tok-123\n").unwrap();
    let settings = ClientPortSettings {
        tls_cert_key: Some((dir.join("cert.pem"), dir.join("key.pem"))),
        forward_ca: Some(dir.join("ca.pem")),
        auth_token_file: Some(dir.join("token")),
        ..ClientPortSettings::default()
    };
    let config = config(dir, "https", settings);
    let url = config.client_url.clone();
    let running = start(config).await;
    let mut trusted = ClientConfig::new(vec![url.clone()]);
    trusted.ca_file = Some(dir.join("ca.pem"));
    trusted.token = Some("tok-123".into());
    let c = Client::new(trusted.clone()).unwrap();
    wait_ready(&c).await;
    c.put("k", "secret").await.unwrap();

    let mut no_token = trusted.clone();
    no_token.token = None;
    let err = Client::new(no_token)
        .unwrap()
        .put("k", "x")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected { status: 401, .. }),
        "{err}"
    );
    let mut wrong = trusted.clone();
    wrong.token = Some("tok-124".into());
    let err = Client::new(wrong).unwrap().put("k", "x").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected { status: 403, .. }),
        "{err}"
    );
    let mut untrusting = trusted;
    untrusting.ca_file = None;
    let err = Client::new(untrusting)
        .unwrap()
        .put("k", "x")
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
    running.shutdown().await.unwrap();
}
