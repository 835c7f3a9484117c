//! Failure modes of a real `raftkv serve` process, judged from outside: usage errors exit 2
//! before the disk is touched; SIGTERM under load and a full disk end the process promptly;
//! and every answer a client got is honest about what happened — 200 applied, 503 not
//! applied (safe to retry), 504 unknown — checked against what a restarted node holds.
//!
//! The full-disk tests mount a small tmpfs, which needs root; without it they print why and
//! pass without running (CI runs as root).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{http_client, Node};

/// What a client was told about one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Told {
    Applied,
    NotApplied,
    Unknown,
}

/// Writers that record what they were told for every key, until `stop` or until the node
/// stops answering.
struct Load {
    told: Arc<Mutex<BTreeMap<String, Told>>>,
    first_failure: Arc<Mutex<Option<Instant>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn start_load(url: String, writers: usize, value_bytes: usize) -> Load {
    let told = Arc::new(Mutex::new(BTreeMap::new()));
    let first_failure = Arc::new(Mutex::new(None));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    raftkv::tls::ensure_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let tasks = (0..writers)
        .map(|w| {
            let (told, first_failure, stop) = (told.clone(), first_failure.clone(), stop.clone());
            let (http, url) = (http.clone(), url.clone());
            let value = "v".repeat(value_bytes);
            tokio::spawn(async move {
                for i in 0..1_000_000u64 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let key = format!("w{w}-{i:07}");
                    let sent = http
                        .put(format!("{url}/kv/{key}"))
                        .json(&serde_json::json!({ "value": value }))
                        .send()
                        .await;
                    let outcome = match sent {
                        Ok(r) if r.status().is_success() => Told::Applied,
                        Ok(r) if r.status() == 503 => Told::NotApplied,
                        Ok(r) if r.status() == 504 => Told::Unknown,
                        Ok(r) => panic!("writer {w}: unexpected status {}", r.status()),
                        // Refused: the request never reached a node.
                        Err(e) if e.is_connect() => Told::NotApplied,
                        Err(_) => Told::Unknown,
                    };
                    if outcome != Told::Applied {
                        first_failure
                            .lock()
                            .unwrap()
                            .get_or_insert_with(Instant::now);
                    }
                    told.lock().unwrap().insert(key, outcome);
                    if outcome != Told::Applied {
                        // Keep writing, gently: the node may answer a few more before it stops.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();
    Load {
        told,
        first_failure,
        stop,
        tasks,
    }
}

impl Load {
    async fn finish(self) -> BTreeMap<String, Told> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let told = self.told.lock().unwrap().clone();
        told
    }
}

/// Restarts `node` and checks every answer against what it holds: applied writes present,
/// writes answered "not applied" absent.
async fn check_answers(node: &mut Node, told: &BTreeMap<String, Told>) {
    node.start();
    let http = http_client();
    node.ready(&http).await;
    let mut counts = BTreeMap::new();
    for (key, t) in told {
        *counts.entry(format!("{t:?}")).or_insert(0usize) += 1;
        let r = http
            .get(format!("{}/kv/{key}", node.url()))
            .send()
            .await
            .unwrap();
        let present = match r.status().as_u16() {
            200 => true,
            404 => false,
            s => panic!("reading {key} back: status {s}"),
        };
        match t {
            Told::Applied => assert!(present, "{key} was acknowledged but is missing"),
            Told::NotApplied => assert!(
                !present,
                "{key} was answered 503 (\"not applied, safe to retry\") but it was applied"
            ),
            Told::Unknown => {}
        }
    }
    eprintln!("answers checked after restart: {counts:?}");
    assert!(
        counts.get("Applied").copied().unwrap_or(0) > 0,
        "the load wrote nothing"
    );
}

#[test]
fn usage_errors_exit_2_before_the_disk_is_touched() {
    let root = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--peers", "2=nonsense"], "--peers 2"),
        (&["--peers", "2=127.0.0.1:notaport"], "--peers 2"),
        (&["--client-addr", "127.0.0.1:99999"], "--client-addr"),
        (&["--client-url", "not a url"], "--client-url"),
        (&["--wal-segment-mb", "0"], "--wal-segment-mb"),
    ];
    for (args, names) in cases {
        let node = Node::new(root.path(), args);
        let out = node.command().output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(names),
            "{args:?} should name {names}: {stderr}"
        );
        assert!(
            !node.data_dir.exists(),
            "{args:?}: the data dir was created before the flags were checked"
        );
    }
    // Well-formed but unusable: an address this machine does not have. The start fails, but
    // leaves no WAL or identity behind to block the corrected start.
    let node = Node::new(root.path(), &["--client-addr", "192.0.2.1:8001"]);
    let out = node.command().output().unwrap();
    assert!(!out.status.success());
    assert!(
        !node.data_dir.join("raftkv.id").exists() && !node.data_dir.join("wal").exists(),
        "a failed bind left data behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_ends_the_process_and_every_answer_is_honest() {
    let root = tempfile::tempdir().unwrap();
    let mut node = Node::new(root.path(), &[]);
    node.start();
    node.ready(&http_client()).await;
    let load = start_load(node.url(), 16, 256);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = node.child.as_ref().unwrap().id();
    let signalled = Instant::now();
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let (status, took) = node.wait_exit(signalled, Duration::from_secs(15));
    assert!(status.success(), "SIGTERM: {status}\n{}", node.log_tail());
    eprintln!("stopped {took:?} after SIGTERM");
    let told = load.finish().await;
    check_answers(&mut node, &told).await;
}

/// A tmpfs of `size_mb` mounted on a fresh dir under `root`, or `None` (with the reason
/// printed) where this process may not mount.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(root: &Path, size_mb: u64) -> Option<Tmpfs> {
        let dir = root.join("disk");
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(dir)),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs (needs root): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    fn resize(&self, size_mb: u64) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size_mb}m")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_stops_the_node_promptly_and_every_answer_is_honest() {
    let root = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(root.path(), 48) else {
        return;
    };
    let mut node = Node::new(&disk.0, &["--wal-segment-mb", "4"]);
    node.log = root.path().join("node1.log");
    node.start();
    node.ready(&http_client()).await;
    let load = start_load(node.url(), 8, 32 << 10);
    let started = Instant::now();
    let (status, _) = node.wait_exit(started, Duration::from_secs(120));
    let first_failure = load.first_failure.lock().unwrap().unwrap_or(started);
    let since_failure = first_failure.elapsed();
    let told = load.finish().await;
    let log = std::fs::read_to_string(&node.log).unwrap_or_default();
    assert!(!status.success(), "a full disk must end the node non-zero");
    assert!(
        log.contains("No space left") || log.contains("os error 28"),
        "the cause is logged:\n{}",
        node.log_tail()
    );
    assert!(
        since_failure < Duration::from_secs(10),
        "the node took {since_failure:?} after its first failed write to exit"
    );
    eprintln!("exited {status} {since_failure:?} after the first failed write");
    disk.resize(512);
    check_answers(&mut node, &told).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_small_disk_refuses_big_segments_cleanly_and_runs_with_small_ones() {
    let root = tempfile::tempdir().unwrap();
    let Some(disk) = Tmpfs::mount(root.path(), 20) else {
        return;
    };
    // 64 MiB segments cannot fit on 20 MB: a clear refusal, no temp file left behind.
    let mut node = Node::new(&disk.0, &[]);
    node.log = root.path().join("node1.log");
    let out = node.command().output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("No space left") || stderr.contains("os error 28"),
        "{stderr}"
    );
    let leftovers: Vec<String> = walk(&node.data_dir)
        .into_iter()
        .filter(|p| p.ends_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temp files left behind: {leftovers:?}"
    );
    // With 4 MiB segments the same disk holds a working node.
    node.extra = vec!["--wal-segment-mb".into(), "4".into()];
    node.start();
    let http = http_client();
    node.ready(&http).await;
    for i in 0..200 {
        let r = http
            .put(format!("{}/kv/k{i}", node.url()))
            .json(&serde_json::json!({ "value": "x".repeat(1024) }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "write {i}: {}", r.status());
    }
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}
