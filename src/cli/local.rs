//! Local nodes as child processes of this `raftkv` binary: used by `cluster up` and by the
//! recovery and failover benchmarks. Each node is told its peers' client URLs
//! (`--peer-client-urls`), and `cluster up` gives all of them one generated cluster secret.

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
    /// The other members' client ports (passed as `--peer-client-urls`).
    pub peer_client_ports: Vec<(u64, u16)>,
    /// The shared cluster secret (`--peer-secret-file`).
    pub peer_secret_file: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub cluster_id: String,
    pub snapshot_every: Option<u64>,
    pub catchup_margin: Option<u64>,
    /// Print the node's log lines prefixed with `[n<id>]`; otherwise discard them.
    pub show_logs: bool,
    /// `--log-format` / `--log-level` passed on to the node.
    pub log_args: Vec<String>,
    /// TLS on both ports (a generated development CA): `https://` client URLs.
    pub tls: Option<LocalTls>,
    /// Join a running cluster through these client URLs (comma-separated) instead of
    /// bootstrapping with `peers`.
    pub join: Option<String>,
    /// More `serve` flags.
    pub extra_args: Vec<String>,
}

/// The files of a node's TLS identity and the CA that signed every member's.
#[derive(Clone, Debug)]
pub struct LocalTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl LocalNode {
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Starts the node.
    pub fn spawn(&self) -> anyhow::Result<Child> {
        let exe = std::env::current_exe().context("cannot find the raftkv executable")?;
        let peers: Vec<String> = self
            .peers
            .iter()
            .map(|(id, port)| format!("{id}=127.0.0.1:{port}"))
            .collect();
        let client_urls: Vec<String> = self
            .peer_client_ports
            .iter()
            .map(|(id, port)| format!("{id}={}://127.0.0.1:{port}", self.scheme()))
            .collect();
        let mut cmd = Command::new(exe);
        cmd.arg("serve")
            .args(["--id", &self.id.to_string()])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--client-addr", &format!("127.0.0.1:{}", self.client_port)])
            .args(["--peer-addr", &format!("127.0.0.1:{}", self.peer_port)])
            .args(["--cluster-id", &self.cluster_id])
            .stdin(Stdio::null());
        match &self.join {
            Some(urls) => cmd.args(["--join", urls]),
            None => cmd
                .args(["--peers", &peers.join(",")])
                .args(["--peer-client-urls", &client_urls.join(",")]),
        };
        if let Some(secret) = &self.peer_secret_file {
            cmd.arg("--peer-secret-file").arg(secret);
        }
        cmd.args(&self.log_args);
        cmd.args(&self.extra_args);
        if let Some(tls) = &self.tls {
            cmd.arg("--client-url").arg(self.url());
            cmd.arg("--peer-cert").arg(&tls.cert);
            cmd.arg("--peer-key").arg(&tls.key);
            cmd.arg("--peer-ca").arg(&tls.ca);
            cmd.arg("--client-cert").arg(&tls.cert);
            cmd.arg("--client-key").arg(&tls.key);
            // Followers forward to an https:// leader: trust the same CA.
            cmd.arg("--client-ca").arg(&tls.ca);
        }
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
            peer_client_ports: (1..=n)
                .filter(|p| *p != id)
                .map(|p| (p, client_base + p as u16))
                .collect(),
            peer_secret_file: None,
            data_dir: root.join(format!("node{id}")),
            cluster_id: cluster_id.to_string(),
            snapshot_every: None,
            catchup_margin: None,
            show_logs: false,
            log_args: Vec::new(),
            tls: None,
            join: None,
            extra_args: Vec::new(),
        })
        .collect()
}

/// The cluster secret file in `root` (`peer-secret`): kept if it exists and is valid,
/// otherwise created with 32 random bytes (hex) and mode 600.
pub fn ensure_peer_secret(root: &std::path::Path) -> anyhow::Result<PathBuf> {
    let path = root.join("peer-secret");
    if path.exists() {
        raftkv::transport::PeerSecret::load(&path)?;
        return Ok(path);
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("cannot draw random bytes: {e}"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(file, "{hex}").with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_secret_is_generated_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = ensure_peer_secret(dir.path()).unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        assert_eq!(first.trim_end().len(), 64, "32 random bytes in hex");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        }
        assert_eq!(ensure_peer_secret(dir.path()).unwrap(), path);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            first,
            "kept on restart"
        );
        std::fs::write(&path, "short\n").unwrap();
        assert!(
            ensure_peer_secret(dir.path()).is_err(),
            "a bad secret is not used"
        );
    }

    #[test]
    fn nodes_know_every_peer_and_its_client_port() {
        let specs = nodes(3, 8000, 9000, std::path::Path::new("/d"), "c");
        assert_eq!(specs[0].peers, vec![(2, 9002), (3, 9003)]);
        assert_eq!(specs[0].peer_client_ports, vec![(2, 8002), (3, 8003)]);
        assert_eq!(specs[2].peer_client_ports, vec![(1, 8001), (2, 8002)]);
    }
}
