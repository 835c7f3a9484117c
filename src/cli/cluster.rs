//! `raftkv cluster up`: a local cluster of child processes, for trying raftkv on one machine.
//!
//! Node i listens for clients on 127.0.0.1:800i and for peers on 127.0.0.1:900i, keeps its data
//! in `DATA_DIR/node<i>`, and has its log lines prefixed with `[n<i>]`. The peers authenticate
//! with a cluster secret generated once in `DATA_DIR/peer-secret` (mode 600), and know each
//! other's client URLs from their flags. Ctrl-C (or SIGTERM)
//! stops every node gracefully; running it again resumes from the same data.

use super::kv::render_table;
use super::local::{ensure_peer_secret, nodes, terminate, LocalTls};
use anyhow::Context;
use raftkv::client::{Client, ClientConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// How many nodes (3 or 5).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=5))]
    pub nodes: u64,
    /// Parent directory of the nodes' data dirs.
    #[arg(long, default_value = "./data", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// TLS on the client and peer ports (mutual on the peer port), with a development CA
    /// generated once into DATA_DIR/pki (clients: `--cacert DATA_DIR/pki/ca.pem`).
    #[arg(long)]
    pub tls: bool,
    /// Start every node with --lease-reads (`?consistency=lease` served from the leader's
    /// lease).
    #[arg(long)]
    pub lease_reads: bool,
}

const CLIENT_PORT_BASE: u16 = 8000;
const PEER_PORT_BASE: u16 = 9000;

pub fn up(args: &UpArgs, log_args: Vec<String>) -> anyhow::Result<ExitCode> {
    if args.nodes != 3 && args.nodes != 5 {
        return Err(super::UsageError("--nodes must be 3 or 5".into()).into());
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let secret = ensure_peer_secret(&args.data_dir)?;
    let pki = match args.tls {
        true => Some(ensure_dev_pki(&args.data_dir, args.nodes)?),
        false => None,
    };
    let specs: Vec<_> = nodes(
        args.nodes,
        CLIENT_PORT_BASE,
        PEER_PORT_BASE,
        &args.data_dir,
        "local",
    )
    .into_iter()
    .map(|mut n| {
        n.show_logs = true;
        n.log_args = log_args.clone();
        n.peer_secret_file = Some(secret.clone());
        if args.lease_reads {
            n.extra_args.push("--lease-reads".into());
        }
        n.tls = pki.as_ref().and_then(|pki| {
            let node = pki.nodes.get(&n.id)?;
            Some(LocalTls {
                ca: pki.ca_cert.clone(),
                cert: node.cert.clone(),
                key: node.key.clone(),
            })
        });
        n
    })
    .collect();
    let mut children = Vec::new();
    for spec in &specs {
        match spec.spawn() {
            Ok(child) => children.push((spec.id, child)),
            Err(e) => {
                stop_all(&mut children);
                return Err(e);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut client_config = ClientConfig::new(specs.iter().map(|s| s.url()).collect());
    client_config.ca_file = pki.as_ref().map(|p| p.ca_cert.clone());
    let client = Client::new(client_config)?;
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
                if led && pki.is_some() {
                    let ca = pki.as_ref().map(|p| p.ca_cert.display().to_string()).unwrap_or_default();
                    let urls: Vec<String> = specs.iter().map(|s| s.url()).collect();
                    println!("cluster is up (TLS). Try: export RAFTKV_CACERT={ca} RAFTKV_ENDPOINTS={}; raftkv put hello world && raftkv get hello   (Ctrl-C stops all nodes)\n", urls.join(","));
                } else if led {
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
                    // A node that dies is reported and left dead, as in a real cluster: the
                    // others keep serving while a majority lives (and the operator can replace
                    // it: README, "Replace a failed node").
                    children.retain_mut(|(id, child)| match child.try_wait() {
                        Ok(Some(status)) => {
                            eprintln!("node {id} exited ({status}); the others keep running (Ctrl-C stops them)");
                            false
                        }
                        _ => true,
                    });
                    if children.is_empty() {
                        eprintln!("every node has exited");
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    });
    println!("stopping all nodes");
    stop_all(&mut children);
    Ok(code)
}

/// The development CA and node certificates in `DATA_DIR/pki`: made once (for 127.0.0.1 and
/// localhost), reused while every node's files are there, so a restarted cluster keeps its
/// identities.
fn ensure_dev_pki(root: &std::path::Path, n: u64) -> anyhow::Result<raftkv::tls::DevPki> {
    let dir = root.join("pki");
    let ids: Vec<u64> = (1..=n).collect();
    let existing = raftkv::tls::DevPki {
        ca_cert: dir.join("ca.pem"),
        nodes: ids
            .iter()
            .map(|id| {
                let identity = raftkv::tls::DevIdentity {
                    cert: dir.join(format!("node{id}.pem")),
                    key: dir.join(format!("node{id}-key.pem")),
                };
                (*id, identity)
            })
            .collect(),
    };
    let complete = existing.ca_cert.exists()
        && existing
            .nodes
            .values()
            .all(|n| n.cert.exists() && n.key.exists());
    if complete {
        return Ok(existing);
    }
    let pki = raftkv::tls::generate_dev_pki(&dir, &ids, &["127.0.0.1", "localhost"])
        .with_context(|| format!("cannot generate certificates in {}", dir.display()))?;
    println!(
        "generated a development CA and node certificates in {}",
        dir.display()
    );
    Ok(pki)
}

fn stop_all(children: &mut [(u64, std::process::Child)]) {
    for (id, child) in children.iter_mut() {
        match terminate(child, Duration::from_secs(10)) {
            Ok(status) => println!("node {id} stopped ({status})"),
            Err(e) => eprintln!("node {id}: {e}"),
        }
    }
}
