//! Real `raftkv serve` processes for the integration tests that judge a node from outside
//! (`failures.rs`, `hostile.rs`): start, restart, wait for readiness or exit, read the log
//! tail and the resident memory. A node is a single voter, or one of a cluster made by
//! [`cluster`] (every member knows the others' peer addresses and client URLs).

#![allow(dead_code)] // each test binary uses its own part

use raftkv::api::ClusterStatus;
use raftkv::raft::rng::Rng;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_raftkv");

/// A port no other node of this test binary uses, probed free (ports come from one counter
/// per process: ports the OS hands out for port 0 can repeat once released). The range stays
/// below Linux's ephemeral ports (32768 and up): a port probed free there can be taken by an
/// outgoing connection before the node that was given it binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        10_000 + (std::process::id() % 220) as u16 * 100,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A plain HTTP client (the process-wide TLS provider installed first, as reqwest requires).
pub fn http_client() -> reqwest::Client {
    raftkv::tls::ensure_provider();
    reqwest::Client::new()
}

/// One node process, restartable on the same data dir.
pub struct Node {
    pub id: u64,
    pub cluster_id: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
    /// The other members: (id, peer port, client port).
    pub members: Vec<(u64, u16, u16)>,
    pub extra: Vec<String>,
    /// Open-file limit for the process (`RLIMIT_NOFILE`), if set.
    pub files_max: Option<u64>,
    pub child: Option<Child>,
}

impl Node {
    /// A single voter: it elects itself at once.
    pub fn new(root: &Path, extra: &[&str]) -> Node {
        Node {
            id: 1,
            cluster_id: "failures".into(),
            data_dir: root.join("node1"),
            log: root.join("node1.log"),
            client_port: free_port(),
            peer_port: free_port(),
            members: Vec::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            files_max: None,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--id", &self.id.to_string()])
            .args(["--cluster-id", &self.cluster_id])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--client-addr", &format!("127.0.0.1:{}", self.client_port)])
            .args(["--peer-addr", &format!("127.0.0.1:{}", self.peer_port)])
            .args(["--heartbeat-ms", "30", "--election-timeout-ms", "200"]);
        if !self.members.is_empty() {
            let join = |f: &dyn Fn(&(u64, u16, u16)) -> String| {
                self.members.iter().map(f).collect::<Vec<_>>().join(",")
            };
            cmd.args(["--peers", &join(&|m| format!("{}=127.0.0.1:{}", m.0, m.1))]);
            cmd.args([
                "--peer-client-urls",
                &join(&|m| format!("{}=http://127.0.0.1:{}", m.0, m.2)),
            ]);
        }
        cmd.args(&self.extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(files_max) = self.files_max {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: files_max,
                        rlim_max: files_max,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(self.command().stderr(log).spawn().unwrap());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }

    /// Resident memory of the running process, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// CPU time (user + system) the process used so far, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces) in parentheses.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// Waits (bounded) for the process to end by itself; returns its status and how long it
    /// took from `since`.
    pub fn wait_exit(
        &mut self,
        since: Instant,
        bound: Duration,
    ) -> (std::process::ExitStatus, Duration) {
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return (status, since.elapsed());
            }
            assert!(
                since.elapsed() < bound,
                "the node did not exit within {bound:?}; its log ends:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) until `/ready` answers 200.
    pub async fn ready(&self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{}/ready", self.url())).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {} not ready; its log ends:\n{}",
                self.id,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Asks the node to stop gracefully (SIGTERM); [`Node::wait_exit`] waits for it.
    pub fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.pid()).expect("a pid fits pid_t");
        // SAFETY: a plain signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM sent");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` members of cluster `cluster_id` under `root`, not started.
pub fn cluster(root: &Path, cluster_id: &str, n: u64, extra: &[&str]) -> Vec<Node> {
    let ports: Vec<(u64, u16, u16)> = (1..=n).map(|id| (id, free_port(), free_port())).collect();
    ports
        .iter()
        .map(|&(id, peer_port, client_port)| Node {
            id,
            cluster_id: cluster_id.into(),
            data_dir: root.join(format!("node{id}")),
            log: root.join(format!("node{id}.log")),
            client_port,
            peer_port,
            members: ports.iter().filter(|m| m.0 != id).copied().collect(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            files_max: None,
            child: None,
        })
        .collect()
}

/// `/cluster/status` of the node at `url`, if it answers within 500 ms.
pub async fn status(http: &reqwest::Client, url: &str) -> Option<ClusterStatus> {
    let r = http
        .get(format!("{url}/cluster/status"))
        .timeout(Duration::from_millis(500))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// The index (into `nodes`) of the running node that leads, waited for (bounded).
pub async fn leader(http: &reqwest::Client, nodes: &[Node]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (i, n) in nodes.iter().enumerate() {
            if n.child.is_none() {
                continue;
            }
            if let Some(s) = status(http, &n.url()).await {
                if s.role == "leader" && s.id == n.id {
                    return i;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A test's random source: the seed from `RAFTKV_TEST_SEED`, else the clock, printed with the
/// command that replays it (`binary` is the test file's name, `test` the test's).
pub fn seed(binary: &str, test: &str) -> Rng {
    let seed = std::env::var("RAFTKV_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!(
        "{test}: seed {seed}; replay: RAFTKV_TEST_SEED={seed} cargo test --release --test \
         {binary} {test}"
    );
    Rng::new(seed)
}
