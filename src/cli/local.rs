//! Local nodes as child processes of this `raftkv` binary: used by `cluster up` and by the
//! recovery and failover benchmarks.

use anyhow::Context;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One node to run.
#[derive(Clone, Debug)]
pub struct LocalNode {
    pub id: u64,
    pub client_port: u16,
    pub peer_port: u16,
    /// The other members: (id, peer port).
    pub peers: Vec<(u64, u16)>,
    pub data_dir: PathBuf,
    pub cluster_id: String,
    pub snapshot_every: Option<u64>,
    pub catchup_margin: Option<u64>,
    /// Print the node's log lines prefixed with `[n<id>]`; otherwise discard them.
    pub show_logs: bool,
}

impl LocalNode {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts the node.
    pub fn spawn(&self) -> anyhow::Result<Child> {
        let exe = std::env::current_exe().context("cannot find the raftkv executable")?;
        let peers: Vec<String> = self
            .peers
            .iter()
            .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
            .collect();
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .args(["--id", &self.id.to_string()])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--client-addr", &format!("127.0.0.1:{}", self.client_port)])
            .args(["--peer-addr", &format!("127.0.0.1:{}", self.peer_port)])
            .args(["--peers", &peers.join(",")])
            .args(["--cluster-id", &self.cluster_id])
            .stdin(Stdio::null());
        if let Some(k) = self.snapshot_every {
            cmd.args(["--snapshot-every", &k.to_string()]);
        }
        if let Some(m) = self.catchup_margin {
            cmd.args(["--catchup-margin", &m.to_string()]);
        }
        if self.show_logs {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "info");
            }
        } else {
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start node {}", self.id))?;
        if self.show_logs {
            let id = self.id;
            for pipe in [
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            ]
            .into_iter()
            .flatten()
            {
                std::thread::spawn(move || {
                    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "[n{id}] {line}");
                    }
                });
            }
        }
        Ok(child)
    }
}

/// `n` nodes on the given port bases: node i gets `client_base + i` and `peer_base + i`.
pub fn nodes(
    n: u64,
    client_base: u16,
    peer_base: u16,
    root: &std::path::Path,
    cluster_id: &str,
) -> Vec<LocalNode> {
    (1..=n)
        .map(|id| LocalNode {
            id,
            client_port: client_base + id as u16,
            peer_port: peer_base + id as u16,
            peers: (1..=n)
                .filter(|p| *p != id)
                .map(|p| (p, peer_base + p as u16))
                .collect(),
            data_dir: root.join(format!("node{id}")),
            cluster_id: cluster_id.to_string(),
            snapshot_every: None,
            catchup_margin: None,
            show_logs: false,
        })
        .collect()
}

/// A base port with `count` free ports after it (probed), for benchmarks in temp dirs.
pub fn free_port_base(count: u16) -> anyhow::Result<u16> {
    let start = 20_000 + (std::process::id() % 200) as u16 * 100;
    for base in (start..60_000).step_by(usize::from(count) + 1) {
        let free =
            (1..=count).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return Ok(base);
        }
    }
    anyhow::bail!("no {count} free loopback ports found")
}

/// SIGTERM, then SIGKILL after `grace`.
pub fn terminate(child: &mut Child, grace: Duration) -> std::io::Result<std::process::ExitStatus> {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            child.kill()?;
            return child.wait();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
