//! Backup and restore with real processes: a 3-node cluster takes 100k writes from concurrent
//! writers; `raftkv snapshot save` runs while they keep writing; the file is checked with
//! `wal-inspect --snapshot FILE --verify` (and a damaged copy refused with its location),
//! restored into three new data dirs under a new cluster id, and the new cluster must hold
//! every write acknowledged before the save started (linearizable reads), accept writes, and
//! never talk to the old cluster's nodes. Keys are written once each, with values derived from
//! the key and a fixed seed, so "present with its value" is exact.

mod support;

use raftkv::api::Consistency;
use raftkv::client::{Client, ClientConfig, ClientError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{cluster, http_client, Node, BIN};

/// Keys acknowledged before the save starts.
const KEYS: usize = 100_000;
/// Concurrent writers; writer `w` writes `key(w, 0)`, `key(w, 1)`, ... in order.
const WRITERS: usize = 48;
/// Part of every value: a run is replayed exactly by the same seed.
const SEED: u64 = 14;

fn key(writer: usize, i: usize) -> String {
    format!("w{writer:02}/{i:06}")
}

fn value(writer: usize, i: usize) -> String {
    format!("v{SEED}-{writer}-{i}")
}

fn client(nodes: &[Node]) -> Client {
    let mut c = ClientConfig::new(nodes.iter().map(Node::url).collect());
    c.retry_budget_ms = 20_000;
    Client::new(c).unwrap()
}

fn endpoints(nodes: &[Node]) -> String {
    nodes.iter().map(Node::url).collect::<Vec<_>>().join(",")
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `wal-inspect` binary beside `raftkv`, built (same profile, same target dir) if this
/// test run did not build it.
fn wal_inspect_bin() -> PathBuf {
    let profile_dir = Path::new(BIN).parent().unwrap();
    let bin = profile_dir.join("wal-inspect");
    if !bin.exists() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "wal-inspect", "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(profile_dir.parent().unwrap());
        if profile_dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "building wal-inspect failed: {status}");
    }
    bin
}

/// Writers that each write their keys in order until stopped; a write is retried (same key,
/// same value: idempotent) until acknowledged, so each writer's acknowledged keys are exactly
/// `0..acked[w]`.
struct Load {
    acked: Arc<Vec<AtomicUsize>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(nodes: &[Node]) -> Load {
        let acked: Arc<Vec<AtomicUsize>> =
            Arc::new((0..WRITERS).map(|_| AtomicUsize::new(0)).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..WRITERS)
            .map(|w| {
                let (c, acked, stop) = (client(nodes), acked.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        match c.put(&key(w, i), &value(w, i)).await {
                            Ok(_) => {
                                i += 1;
                                acked[w].store(i, Ordering::SeqCst);
                            }
                            Err(ClientError::OutcomeUnknown(_) | ClientError::Unavailable(_)) => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(e) => panic!("writer {w}, key {}: {e}", key(w, i)),
                        }
                    }
                })
            })
            .collect();
        Load { acked, stop, tasks }
    }

    fn acked(&self) -> Vec<usize> {
        self.acked
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .collect()
    }

    async fn stop(mut self) -> Vec<usize> {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.tasks) {
            t.await.unwrap();
        }
        self.acked()
    }
}

/// `raftkv snapshot save FILE` against `nodes`; returns the index and key count it printed.
fn save(nodes: &[Node], file: &Path) -> (u64, u64) {
    let out = Command::new(BIN)
        .args(["snapshot", "save"])
        .arg(file)
        .args(["--endpoints", &endpoints(nodes)])
        .output()
        .unwrap();
    assert!(out.status.success(), "save failed: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}");
    let number_before = |word: &str| -> u64 {
        let at = stdout
            .find(word)
            .unwrap_or_else(|| panic!("no {word:?} in {stdout}"));
        let digits: String = stdout[..at]
            .trim_end()
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.chars().rev().collect::<String>().parse().unwrap()
    };
    let index: u64 = stdout
        .split("index ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no index in {stdout}"));
    (index, number_before(" keys"))
}

/// `wal-inspect --snapshot FILE --verify` passes on the backup; a copy with one flipped byte
/// in the middle is refused with its byte offset and chunk.
fn inspect(file: &Path, cluster_id: &str, dir: &Path) {
    let wal_inspect = wal_inspect_bin();
    let out = Command::new(&wal_inspect)
        .arg("--snapshot")
        .arg(file)
        .arg("--verify")
        .output()
        .unwrap();
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains(": ok") && shown.contains(cluster_id),
        "{shown}"
    );
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    let damaged = dir.join("damaged.rkv");
    std::fs::write(&damaged, &bytes).unwrap();
    let out = Command::new(&wal_inspect)
        .arg("--snapshot")
        .arg(&damaged)
        .arg("--verify")
        .output()
        .unwrap();
    let shown = text(&out);
    assert_eq!(out.status.code(), Some(1), "{shown}");
    assert!(
        shown.contains("CORRUPT BACKUP")
            && shown.contains("byte offset")
            && shown.contains("chunk"),
        "a flip at byte {at}: {shown}"
    );
}

/// `raftkv snapshot restore` for `node`, a member of the new cluster.
fn restore(file: &Path, node: &Node) -> Output {
    let peers: Vec<String> = node
        .members
        .iter()
        .map(|(id, peer_port, _)| format!("{id}=127.0.0.1:{peer_port}"))
        .collect();
    Command::new(BIN)
        .args(["snapshot", "restore"])
        .arg(file)
        .arg("--data-dir")
        .arg(&node.data_dir)
        .args(["--id", &node.id.to_string()])
        .args(["--peers", &peers.join(",")])
        .args(["--cluster-id", &node.cluster_id])
        .output()
        .unwrap()
}

/// Every key of the new cluster, read linearizably page by page.
async fn all_pairs(c: &Client) -> BTreeMap<String, String> {
    let listed = c
        .list("", usize::MAX, Consistency::Linearizable)
        .await
        .unwrap();
    assert!(!listed.more);
    listed
        .items
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect()
}

async fn start_all(nodes: &mut [Node]) {
    for n in nodes.iter_mut() {
        n.start();
    }
    let http = http_client();
    for n in nodes.iter() {
        n.ready(&http).await;
    }
}

/// Waits (bounded) until `node`'s log contains `needle`.
async fn log_shows(node: &Node, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&node.log)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(
            Instant::now() < deadline,
            "node {}'s log never showed {needle:?}; it ends:\n{}",
            node.id,
            node.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_saved_under_load_restores_into_a_new_cluster() {
    let started = Instant::now();
    let root = tempfile::tempdir().unwrap();
    let secret = root.path().join("peer-secret");
    // One secret for both clusters: only the cluster id keeps them apart.
    std::fs::write(&secret, "backup-test-peer-secret\n").unwrap();
    let extra = ["--peer-secret-file", secret.to_str().unwrap()];
    // Unique per run, so that a stray connection between tests is refused.
    let old_id = format!("old-{}", std::process::id());
    let new_id = format!("new-{}", std::process::id());
    let mut old = cluster(&root.path().join("old"), &old_id, 3, &extra);
    std::fs::create_dir_all(root.path().join("old")).unwrap();
    start_all(&mut old).await;
    eprintln!(
        "seed {SEED}: old cluster {old_id} up at {:?}",
        started.elapsed()
    );

    let load = Load::start(&old);
    while load.acked().iter().sum::<usize>() < KEYS {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = load.acked();
    let before_total: usize = before.iter().sum();
    eprintln!(
        "{before_total} writes acknowledged at {:?}; saving",
        started.elapsed()
    );
    let file = root.path().join("backup.rkv");
    let (index, backup_keys) = {
        let old_ref = &old;
        tokio::task::block_in_place(|| save(old_ref, &file))
    };
    let after = load.stop().await;
    let during: usize = after.iter().sum::<usize>() - before_total;
    eprintln!("saved at index {index} with {backup_keys} keys; {during} writes acknowledged during the save");
    assert!(during > 0, "the writers kept writing during the save");
    assert!(backup_keys >= before_total as u64);
    assert!(!root.path().join("backup.rkv.part").exists());

    inspect(&file, &old_id, root.path());

    let mut new = cluster(&root.path().join("new"), &new_id, 3, &extra);
    std::fs::create_dir_all(root.path().join("new")).unwrap();
    for n in &new {
        let out = restore(&file, n);
        assert!(
            out.status.success(),
            "restore of node {}: {}",
            n.id,
            text(&out)
        );
    }
    let again = restore(&file, &new[0]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(text(&again).contains("not empty"), "{}", text(&again));
    start_all(&mut new).await;
    eprintln!("new cluster {new_id} up at {:?}", started.elapsed());

    let c = client(&new);
    let pairs = all_pairs(&c).await;
    assert_eq!(
        pairs.len() as u64,
        backup_keys,
        "the new cluster holds the backup, exactly"
    );
    for (w, &n) in before.iter().enumerate() {
        for i in 0..n {
            assert_eq!(
                pairs.get(&key(w, i)),
                Some(&value(w, i)),
                "seed {SEED}: {} was acknowledged before the save",
                key(w, i)
            );
        }
    }
    c.put("after-restore", "yes").await.unwrap();
    let got = c
        .get("after-restore", Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(got.map(|r| r.value).as_deref(), Some("yes"));

    // An old member pointed at the new cluster's peer ports is refused by the handshake (it
    // stays a member of the old cluster, whose nodes still dial it)...
    old[0].kill();
    old[0].members = new[0].members.clone();
    old[0].start();
    let refusal = format!("cluster id \"{old_id}\" is not \"{new_id}\"");
    log_shows(&new[1], &refusal).await;
    log_shows(&new[2], &refusal).await;
    // ...and nothing crosses: a write to the old cluster never reaches the new one.
    // Through the two members still configured for the old cluster: old[0] now names the
    // new cluster's client URLs, so a write it forwarded would land there by configuration.
    // The old cluster just lost a member (maybe its leader): a write may meet an election
    // and come back "outcome unknown"; writing the same value again is safe.
    let old_client = client(&old[1..]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = old_client.put("old-only", "x").await {
        assert!(
            Instant::now() < deadline,
            "the old cluster took no write: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        c.get("old-only", Consistency::Linearizable).await.unwrap(),
        None
    );
    let status = c.status_of(&new[0].url()).await.unwrap();
    assert_eq!(status.cluster_id, new_id);
    let members: Vec<u64> = status.members.iter().map(|m| m.id).collect();
    assert_eq!(members, vec![1, 2, 3], "{status:?}");
    eprintln!("done in {:?}", started.elapsed());
}
