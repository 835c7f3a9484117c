//! Real-process tests: the built `raftkv` binary as a 3-node cluster on loopback, in temp dirs,
//! killed with SIGKILL, restarted, starved into snapshot catch-up, fed a corrupt WAL and bad
//! HTTP input. Assertions are about outcomes (acknowledged writes survive everywhere), never
//! about speed; waits are bounded and generous.

use raftkv::api::Consistency;
use raftkv::client::{Client, ClientConfig, ClientError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod support;

use support::{free_port, BIN};

struct Cluster {
    root: tempfile::TempDir,
    cluster_id: String,
    client_ports: BTreeMap<u64, u16>,
    peer_ports: BTreeMap<u64, u16>,
    children: BTreeMap<u64, Child>,
    snapshot_every: u64,
    catchup_margin: u64,
    /// More settings for every node's config file.
    extra_toml: String,
}

impl Cluster {
    fn new(snapshot_every: u64, catchup_margin: u64) -> Cluster {
        let client_ports: BTreeMap<u64, u16> = (1..=3).map(|i| (i, free_port())).collect();
        Cluster {
            root: tempfile::tempdir().unwrap(),
            // Unique per cluster, so that a stray connection between tests is refused.
            cluster_id: format!("test-{}", client_ports[&1]),
            client_ports,
            peer_ports: (1..=3).map(|i| (i, free_port())).collect(),
            children: BTreeMap::new(),
            snapshot_every,
            catchup_margin,
            extra_toml: String::new(),
        }
    }

    fn data_dir(&self, id: u64) -> PathBuf {
        self.root.path().join(format!("node{id}"))
    }

    fn url(&self, id: u64) -> String {
        format!("http://127.0.0.1:{}", self.client_ports[&id])
    }

    fn command(&self, id: u64) -> Command {
        let config = self.root.path().join(format!("node{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "catchup_margin = {}\nrequest_timeout_ms = 5000\n{}",
                self.catchup_margin, self.extra_toml
            ),
        )
        .unwrap();
        let peers: Vec<String> = self
            .peer_ports
            .iter()
            .filter(|(i, _)| **i != id)
            .map(|(i, p)| format!("{i}=127.0.0.1:{p}"))
            .collect();
        let client_urls: Vec<String> = self
            .client_ports
            .iter()
            .filter(|(i, _)| **i != id)
            .map(|(i, p)| format!("{i}=http://127.0.0.1:{p}"))
            .collect();
        // Every member proves the cluster secret, as `cluster up` sets it up.
        // Written once: rewriting it while an earlier node starts could show that node a
        // truncated file.
        let secret = self.root.path().join("peer-secret");
        if !secret.exists() {
            std::fs::write(
                &secret,
                format!("process-test-secret-{}\n", self.cluster_id),
            )
            .unwrap();
        }
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--id", &id.to_string()])
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .args([
                "--client-addr",
                &format!("127.0.0.1:{}", self.client_ports[&id]),
            ])
            .args([
                "--peer-addr",
                &format!("127.0.0.1:{}", self.peer_ports[&id]),
            ])
            .args(["--peers", &peers.join(",")])
            .args(["--peer-client-urls", &client_urls.join(",")])
            .arg("--peer-secret-file")
            .arg(secret)
            .args(["--snapshot-every", &self.snapshot_every.to_string()])
            .args(["--heartbeat-ms", "30", "--election-timeout-ms", "200"])
            .args(["--cluster-id", &self.cluster_id])
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    fn start(&mut self, id: u64) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join(format!("node{id}.log")))
            .unwrap();
        let child = self
            .command(id)
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn raftkv serve");
        self.children.insert(id, child);
    }

    fn start_all(&mut self) {
        for id in 1..=3 {
            self.start(id);
        }
    }

    fn kill9(&mut self, id: u64) {
        if let Some(mut c) = self.children.remove(&id) {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    fn stop(&mut self, id: u64) {
        if let Some(mut c) = self.children.remove(&id) {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let status = c.wait().unwrap();
            if !status.success() {
                let log = std::fs::read_to_string(self.root.path().join(format!("node{id}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                panic!(
                    "node {id} did not exit cleanly on SIGTERM: {status}; its log ends:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
    }

    fn client(&self) -> Client {
        let mut c = ClientConfig::new((1..=3).map(|i| self.url(i)).collect());
        c.retry_budget_ms = 20_000;
        Client::new(c).unwrap()
    }

    fn client_of(&self, id: u64) -> Client {
        let mut c = ClientConfig::new(vec![self.url(id)]);
        c.retry_budget_ms = 2_000;
        Client::new(c).unwrap()
    }

    async fn leader(&self) -> u64 {
        wait_for("a leader", async || {
            for id in self.children.keys() {
                if let Ok(s) = self.client_of(*id).status_of(&self.url(*id)).await {
                    if s.role == "leader" {
                        return Some(s.id);
                    }
                }
            }
            None
        })
        .await
    }

    /// Waits until every running node has applied at least `index`.
    async fn caught_up(&self, index: u64) {
        for id in self.children.keys() {
            wait_for(&format!("node {id} to apply {index}"), async || {
                let s = self.client_of(*id).status_of(&self.url(*id)).await.ok()?;
                (s.applied_index >= index).then_some(())
            })
            .await;
        }
    }

    /// Every running node holds exactly `want` (stale reads after catch-up).
    async fn check_all(&self, want: &BTreeMap<String, String>) {
        let leader = self.leader().await;
        let commit = self
            .client_of(leader)
            .status_of(&self.url(leader))
            .await
            .unwrap()
            .commit_index;
        self.caught_up(commit).await;
        for id in self.children.keys() {
            let c = self.client_of(*id);
            assert!(want.len() < 10_000, "one list page must cover the data");
            let listed = c.list("", 10_000, Consistency::Stale).await.unwrap();
            let got: BTreeMap<String, String> = listed
                .items
                .into_iter()
                .map(|kv| (kv.key, kv.value))
                .collect();
            let missing: Vec<&String> = want
                .keys()
                .filter(|k| got.get(*k) != want.get(*k))
                .collect();
            if !missing.is_empty() {
                let keep = std::path::PathBuf::from(format!("/tmp/pt-logs-{}", self.cluster_id));
                let _ = std::process::Command::new("cp")
                    .arg("-r")
                    .arg(self.root.path())
                    .arg(&keep)
                    .status();
                eprintln!("kept the data dirs in {}", keep.display());
                for n in 1..=3 {
                    let log =
                        std::fs::read_to_string(self.root.path().join(format!("node{n}.log")))
                            .unwrap_or_default();
                    let tail: Vec<&str> = log
                        .lines()
                        .filter(|l| {
                            !l.contains("peer unreachable") && !l.contains("connected to peer")
                        })
                        .collect();
                    eprintln!(
                        "--- node {n} log ({} lines) ---\n{}",
                        tail.len(),
                        tail[tail.len().saturating_sub(40)..].join("\n")
                    );
                }
            }
            assert!(
                missing.is_empty(),
                "node {id} lost {} of {} acknowledged writes (has {} keys), first {:?}",
                missing.len(),
                want.len(),
                got.len(),
                &missing[..missing.len().min(5)]
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in self.children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writers that record every acknowledged write; unknown outcomes are tolerated (they may or
/// may not apply), errors of any other kind fail the test.
struct Load {
    acked: Arc<Mutex<BTreeMap<String, String>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn start_load(cluster: &Cluster, writers: usize, prefix: &str) -> Load {
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = (0..writers)
        .map(|w| {
            let c = cluster.client();
            let acked = acked.clone();
            let stop = stop.clone();
            let prefix = prefix.to_string();
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 100_000 {
                    let key = format!("{prefix}-{w}-{i:06}");
                    let value = format!("v{i}");
                    match c.put(&key, &value).await {
                        Ok(_) => {
                            acked.lock().unwrap().insert(key, value);
                        }
                        Err(ClientError::OutcomeUnknown(_)) | Err(ClientError::Unavailable(_)) => {}
                        Err(e) => panic!("writer {w}: unexpected error {e}"),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    Load { acked, stop, tasks }
}

impl Load {
    async fn finish(self) -> BTreeMap<String, String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let acked = self.acked.lock().unwrap().clone();
        acked
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_and_reads_through_every_node() {
    let mut cluster = Cluster::new(1000, 100);
    cluster.start_all();
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    cluster
        .client_of(leader)
        .put("via-leader", "1")
        .await
        .unwrap();
    let r = cluster
        .client_of(follower)
        .put("via-follower", "2")
        .await
        .unwrap();
    assert_eq!(
        r.leader,
        Some(leader),
        "the follower forwarded to the leader"
    );
    let got = cluster
        .client_of(follower)
        .get("via-leader", Consistency::Linearizable)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.value, "1", "linearizable read via a follower");
    let want: BTreeMap<String, String> = [("via-leader", "1"), ("via-follower", "2")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    cluster.check_all(&want).await;
    for id in 1..=3 {
        cluster.stop(id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill9_under_load_loses_no_acknowledged_write() {
    let mut cluster = Cluster::new(200, 50);
    cluster.start_all();
    let leader = cluster.leader().await;
    let load = start_load(&cluster, 4, "a");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.kill9(leader);
    let new_leader = cluster.leader().await;
    assert_ne!(new_leader, leader);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let acked = load.finish().await;
    assert!(
        acked.len() > 20,
        "the load made progress: {} writes",
        acked.len()
    );
    eprintln!("{} acknowledged writes across the leader kill", acked.len());
    cluster.start(leader);
    cluster.check_all(&acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn whole_cluster_kill9_under_load_then_restart() {
    let mut cluster = Cluster::new(200, 50);
    cluster.start_all();
    cluster.leader().await;
    let load = start_load(&cluster, 4, "b");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for id in 1..=3 {
        cluster.kill9(id);
    }
    let acked = load.finish().await;
    assert!(
        acked.len() > 20,
        "the load made progress: {} writes",
        acked.len()
    );
    cluster.start_all();
    cluster.check_all(&acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_past_the_catchup_margin_catches_up_by_snapshot() {
    let mut cluster = Cluster::new(100, 20);
    cluster.start_all();
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    cluster.stop(follower);
    let c = cluster.client();
    let mut want = BTreeMap::new();
    for i in 0..600 {
        let (k, v) = (format!("s{i:04}"), format!("v{i}"));
        c.put(&k, &v).await.unwrap();
        want.insert(k, v);
    }
    cluster.start(follower);
    cluster.check_all(&want).await;
    let st = cluster
        .client_of(follower)
        .status_of(&cluster.url(follower))
        .await
        .unwrap();
    assert!(
        st.snapshot_index > 0,
        "the follower installed a snapshot: {st:?}"
    );
    assert!(
        st.first_index > 1,
        "its log starts after the snapshot: {st:?}"
    );
}

/// A follower whose state machine directory is lost but whose WAL (votes, log) survives, past
/// compactions, rejoins by fetching a snapshot from the leader instead of refusing to start,
/// keeps its votes, and ends up with every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_that_lost_its_state_machine_rejoins_from_the_leaders_snapshot() {
    let mut cluster = Cluster::new(100, 20);
    // Small segments, so that compaction purges the WAL's head and the state below it exists
    // nowhere on the follower but in the lost state machine.
    cluster.extra_toml = "wal_segment_mb = 2\n".into();
    cluster.start_all();
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let c = cluster.client();
    let mut want = BTreeMap::new();
    for i in 0..600 {
        let (k, v) = (format!("r{i:04}"), format!("{i}").repeat(2000));
        c.put(&k, &v).await.unwrap();
        want.insert(k, v);
    }
    cluster.caught_up(600).await;
    cluster.stop(follower);
    std::fs::remove_dir_all(cluster.data_dir(follower).join("sm")).unwrap();
    let load = start_load(&cluster, 4, "during-rejoin");
    cluster.start(follower);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (k, v) in load.finish().await {
        want.insert(k, v);
    }
    cluster.check_all(&want).await;
    let log = std::fs::read_to_string(cluster.root.path().join(format!("node{follower}.log")))
        .unwrap_or_default();
    assert!(
        log.contains("stored a snapshot from the cluster; rejoining"),
        "the follower fetched a snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flipped_byte_in_a_followers_wal_refuses_to_start() {
    let mut cluster = Cluster::new(100_000, 5000);
    cluster.start_all();
    let leader = cluster.leader().await;
    let c = cluster.client();
    for i in 0..200 {
        c.put(&format!("f{i:04}"), &"x".repeat(100)).await.unwrap();
    }
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    cluster.caught_up(201).await;
    cluster.stop(follower);
    // Flip one byte in the middle of the records of the follower's first segment.
    let wal_dir = cluster.data_dir(follower).join("wal");
    let scan = raftkv_storage_scan(&wal_dir);
    let (segment, used) = scan;
    let offset = used / 2;
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[offset as usize] ^= 0x40;
    std::fs::write(&segment, bytes).unwrap();
    let out = cluster.command(follower).output().unwrap();
    assert!(!out.status.success(), "a corrupt WAL must not start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let name = segment.file_name().unwrap().to_string_lossy().to_string();
    assert!(stderr.contains(&name), "stderr names the file: {stderr}");
    assert!(
        stderr.contains("offset"),
        "stderr names the offset: {stderr}"
    );
    // wal-inspect agrees (exit 1, same file), when it was built alongside.
    let inspect = Path::new(BIN).with_file_name("wal-inspect");
    if inspect.exists() {
        let v = Command::new(&inspect)
            .arg(&wal_dir)
            .arg("--verify")
            .output()
            .unwrap();
        assert_eq!(
            v.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&v.stdout)
        );
        assert!(String::from_utf8_lossy(&v.stdout).contains(&name));
    }
}

/// The first segment file and the end of its records.
fn raftkv_storage_scan(wal_dir: &Path) -> (PathBuf, u64) {
    let scan = raftkv::storage::wal::scan_dir(
        &raftkv::storage::vfs::StdFs,
        wal_dir,
        raftkv::storage::wal::scan::ScanOptions {
            record_bytes_max: 8 << 20,
        },
    )
    .unwrap();
    let seg = &scan.segments[0];
    (seg.path.clone(), seg.used_bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_http_input_gets_4xx_json_and_the_node_keeps_serving() {
    let mut cluster = Cluster::new(1000, 100);
    cluster.start_all();
    let leader = cluster.leader().await;
    let url = cluster.url(leader);
    raftkv::tls::ensure_provider();
    let http = reqwest::Client::new();
    let long_key = "k".repeat(9000);
    let big = format!(r#"{{"value":"{}"}}"#, "v".repeat((1 << 20) + 1));
    let cases: Vec<(reqwest::Method, String, Option<String>, u16)> = vec![
        (
            reqwest::Method::PUT,
            format!("{url}/kv/k"),
            Some(r#"{"value":"#.into()),
            400,
        ),
        (
            reqwest::Method::PUT,
            format!("{url}/kv/k"),
            Some("{}".into()),
            400,
        ),
        (
            reqwest::Method::PUT,
            format!("{url}/kv/{long_key}"),
            Some(r#"{"value":"x"}"#.into()),
            413,
        ),
        (reqwest::Method::PUT, format!("{url}/kv/k"), Some(big), 413),
        (reqwest::Method::GET, format!("{url}/kv/%C3%28"), None, 400),
        (
            reqwest::Method::GET,
            format!("{url}/kv/k?consistency=whenever"),
            None,
            400,
        ),
        (reqwest::Method::POST, format!("{url}/kv/k"), None, 405),
        (reqwest::Method::GET, format!("{url}/nope"), None, 404),
    ];
    for (method, u, body, want) in cases {
        let mut req = http.request(method.clone(), &u);
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(
            resp.status().as_u16(),
            want,
            "{method} {}",
            &u[..u.len().min(80)]
        );
        let body: serde_json::Value = resp.json().await.unwrap();
        assert!(body["error"].is_string());
    }
    cluster.client().put("still", "serving").await.unwrap();
    let missing = cluster
        .client()
        .get("absent", Consistency::Linearizable)
        .await
        .unwrap();
    assert!(missing.is_none());
}

#[test]
fn corrupt_flags_and_foreign_data_dirs_are_refused() {
    let cluster = Cluster::new(1000, 100);
    // Another node id on an existing data dir.
    std::fs::create_dir_all(cluster.data_dir(1)).unwrap();
    std::fs::write(
        cluster.data_dir(1).join("raftkv.id"),
        format!(r#"{{"cluster_id":"{}","node_id":7}}"#, cluster.cluster_id),
    )
    .unwrap();
    let out = cluster.command(1).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to node 7"));
    let out = Command::new(BIN)
        .args([
            "serve",
            "--id",
            "1",
            "--data-dir",
            "/tmp/x",
            "--peers",
            "1=h:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// Runs `raftkv ready --endpoints ...` as in the container image: with no CA certificates on
/// the system (an empty bundle and an empty certificate directory).
fn ready_probe(endpoints: &[String]) -> std::process::Output {
    let no_cas = tempfile::tempdir().unwrap();
    Command::new(BIN)
        .args(["ready", "--endpoints", &endpoints.join(",")])
        .env("SSL_CERT_FILE", "/dev/null")
        .env("SSL_CERT_DIR", no_cas.path())
        .output()
        .unwrap()
}

/// `raftkv ready`, the health check of the container image, against real nodes and without
/// system CAs (where the client used to refuse to build): exit 1 while a lone member answers
/// but knows no leader, 0 once the cluster is up, 3 — within the probe's timeouts — when an
/// endpoint refuses or accepts and never answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_probe_reports_not_ready_ready_and_unreachable() {
    let mut cluster = Cluster::new(1000, 100);
    cluster.start(1);
    let lone = vec![cluster.url(1)];
    let out = wait_for("node 1 to answer /ready", async || {
        let out = ready_probe(&lone);
        (out.status.code() == Some(1)).then_some(out)
    })
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("not ready (503)"), "{text}");
    cluster.start(2);
    cluster.start(3);
    cluster.leader().await;
    let all: Vec<String> = (1..=3).map(|i| cluster.url(i)).collect();
    let out = wait_for("every node to be ready", async || {
        let out = ready_probe(&all);
        (out.status.code() == Some(0)).then_some(out)
    })
    .await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    for (i, line) in (1..=3).zip(text.lines()) {
        assert_eq!(line, format!("{} ready (node {i})", cluster.url(i)));
    }
    // Nothing listens on one port; the other accepts connections but never answers.
    let refused = format!("http://127.0.0.1:{}", free_port());
    let silent_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = format!("http://{}", silent_listener.local_addr().unwrap());
    for dead in [refused, silent] {
        let started = Instant::now();
        let out = ready_probe(&[all[0].clone(), dead.clone()]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(out.status.code(), Some(3), "{dead}: {text}");
        assert!(text.contains(&format!("{dead} unreachable")), "{text}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{dead}: the probe took {:?}",
            started.elapsed()
        );
    }
    for id in 1..=3 {
        cluster.stop(id);
    }
}
