//! `raftkv cluster up`: a local cluster of child processes, for trying raftkv on one machine.
//!
//! Node i listens for clients on 127.0.0.1:800i and for peers on 127.0.0.1:900i, keeps its data
//! in `DATA_DIR/node<i>`, and has its log lines prefixed with `[n<i>]`. Ctrl-C (or SIGTERM)
//! stops every node gracefully; running it again resumes from the same data.

use super::kv::render_table;
use anyhow::{bail, Context};
use raftkv::client::{Client, ClientConfig};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// How many nodes (3 or 5).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=5))]
    pub nodes: u64,
    /// Parent directory of the nodes' data dirs.
    #[arg(long, default_value = "./data", value_name = "DIR")]
    pub data_dir: PathBuf,
}

const CLIENT_PORT_BASE: u64 = 8000;
const PEER_PORT_BASE: u64 = 9000;

fn spawn_node(exe: &PathBuf, id: u64, n: u64, data_dir: &std::path::Path) -> anyhow::Result<Child> {
    let peers: Vec<String> = (1..=n)
        .filter(|p| *p != id)
        .map(|p| format!("{p}=127.0.0.1:{}", PEER_PORT_BASE + p))
        .collect();
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--id")
        .arg(id.to_string())
        .arg("--data-dir")
        .arg(data_dir.join(format!("node{id}")))
        .arg("--client-addr")
        .arg(format!("127.0.0.1:{}", CLIENT_PORT_BASE + id))
        .arg("--peer-addr")
        .arg(format!("127.0.0.1:{}", PEER_PORT_BASE + id))
        .arg("--peers")
        .arg(peers.join(","))
        .arg("--cluster-id")
        .arg("local")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start node {id}"))?;
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
    Ok(child)
}

fn terminate(children: &mut [(u64, Child)]) {
    for (_, child) in children.iter() {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: sending a signal to our own child process.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (id, child) in children.iter_mut() {
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    println!("node {id} stopped ({status})");
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    println!("node {id} killed after the grace period");
                    break;
                }
            }
        }
    }
}

pub fn up(args: &UpArgs) -> anyhow::Result<ExitCode> {
    if args.nodes != 3 && args.nodes != 5 {
        bail!("--nodes must be 3 or 5");
    }
    let exe = std::env::current_exe().context("cannot find the raftkv executable")?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let mut children = Vec::new();
    for id in 1..=args.nodes {
        match spawn_node(&exe, id, args.nodes, &args.data_dir) {
            Ok(child) => children.push((id, child)),
            Err(e) => {
                terminate(&mut children);
                return Err(e);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let endpoints: Vec<String> = (1..=args.nodes)
        .map(|i| format!("http://127.0.0.1:{}", CLIENT_PORT_BASE + i))
        .collect();
    let client = Client::new(ClientConfig::new(endpoints))?;
    let code = runtime.block_on(async {
        // Wait for a leader, then show the members.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all = client.status_all().await;
            let led = all
                .iter()
                .any(|(_, s)| s.as_ref().is_ok_and(|s| s.leader.is_some()));
            if led || Instant::now() > deadline {
                println!("\n{}", render_table(&all));
                if led {
                    println!("cluster is up. Try: raftkv put hello world && raftkv get hello   (Ctrl-C stops all nodes)\n");
                } else {
                    println!("no leader yet; the nodes keep trying (Ctrl-C stops all nodes)\n");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut watch = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
                Some(_) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => return ExitCode::SUCCESS,
                _ = watch.tick() => {
                    for (id, child) in children.iter_mut() {
                        if let Ok(Some(status)) = child.try_wait() {
                            eprintln!("node {id} exited unexpectedly ({status}); stopping the cluster");
                            return ExitCode::FAILURE;
                        }
                    }
                }
            }
        }
    });
    println!("stopping all nodes");
    terminate(&mut children);
    Ok(code)
}
