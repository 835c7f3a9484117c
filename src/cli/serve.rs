//! `raftkv serve`: run one node.
//!
//! Settings come from, highest first: flags, `RAFTKV_*` environment variables, the TOML file
//! given with `--config`, then defaults. SIGTERM or SIGINT shuts down gracefully: stop
//! accepting, finish in-flight requests, flush, exit 0. A corrupt data dir or one that belongs
//! to another node or cluster exits non-zero with the reason (file and offset for damage).
//!
//! Peers authenticate with a shared secret (`--peer-secret-file`) and/or mutual TLS
//! (`--peer-cert`, `--peer-key`, `--peer-ca`: all three or none); the files are loaded before
//! the data dir is touched. Other members' client URLs come only from `--peer-client-urls`.

use anyhow::{bail, Context};
use raftkv::api::server::ClientPortConfig;
use raftkv::api::Limits;
use raftkv::node::{
    self, ClientPortSettings, LeaseSettings, NodeConfig, PeerTlsFiles, SessionSettings, WatchConfig,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Default, clap::Args)]
pub struct ServeArgs {
    /// This node's id (a positive integer, unique in the cluster). With --join it may be left
    /// out: the cluster knows it from `raftkv member add`.
    #[arg(long, env = "RAFTKV_ID")]
    pub id: Option<u64>,
    /// Where this node keeps its WAL, state machine and snapshots.
    #[arg(long, env = "RAFTKV_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address the HTTP client API listens on.
    #[arg(long, env = "RAFTKV_CLIENT_ADDR", value_name = "HOST:PORT")]
    pub client_addr: Option<String>,
    /// URL clients use to reach the client API (default http://CLIENT_ADDR); give it to the
    /// other nodes in their --peer-client-urls.
    #[arg(long, env = "RAFTKV_CLIENT_URL", value_name = "URL")]
    pub client_url: Option<String>,
    /// Address the peer transport listens on.
    #[arg(long, env = "RAFTKV_PEER_ADDR", value_name = "HOST:PORT")]
    pub peer_addr: Option<String>,
    /// The other members: ID=HOST:PORT of their peer addresses, comma-separated. Only for
    /// bootstrapping a new cluster: once the data dir holds a configuration, it wins.
    #[arg(long, env = "RAFTKV_PEERS", value_name = "ID=HOST:PORT,...")]
    pub peers: Option<String>,
    /// Join a running cluster through these members' client URLs (comma-separated), after
    /// `raftkv member add`: this node asks for its id and the configuration, then catches up
    /// from the leader. Used only while the data dir is empty; excludes --peers.
    #[arg(long, env = "RAFTKV_JOIN", value_name = "URL,...")]
    pub join: Option<String>,
    /// The other members' client URLs, ID=URL comma-separated, for leader hints and status
    /// (never learned from peers).
    #[arg(long, env = "RAFTKV_PEER_CLIENT_URLS", value_name = "ID=URL,...")]
    pub peer_client_urls: Option<String>,
    /// A file with the shared cluster secret (>= 16 bytes; trailing whitespace trimmed) that
    /// peers prove to each other in the handshake.
    #[arg(long, env = "RAFTKV_PEER_SECRET_FILE", value_name = "FILE")]
    pub peer_secret_file: Option<PathBuf>,
    /// This node's certificate (PEM) for mutual TLS on the peer port; needs --peer-key and
    /// --peer-ca.
    #[arg(long, env = "RAFTKV_PEER_CERT", value_name = "FILE")]
    pub peer_cert: Option<PathBuf>,
    /// The private key (PEM) of --peer-cert.
    #[arg(long, env = "RAFTKV_PEER_KEY", value_name = "FILE")]
    pub peer_key: Option<PathBuf>,
    /// The CA (PEM) that signs every member's peer certificate.
    #[arg(long, env = "RAFTKV_PEER_CA", value_name = "FILE")]
    pub peer_ca: Option<PathBuf>,
    /// The cluster's name; peers of another cluster are refused.
    #[arg(long, env = "RAFTKV_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Compact (sled flush, WAL marker, purge) every N applied entries.
    #[arg(long, env = "RAFTKV_SNAPSHOT_EVERY", value_name = "N")]
    pub snapshot_every: Option<u64>,
    /// Entries kept in the WAL below each compaction point for lagging followers.
    #[arg(long, env = "RAFTKV_CATCHUP_MARGIN", value_name = "N")]
    pub catchup_margin: Option<u64>,
    /// sled's page cache for the key-value state, in MiB (default 64; the OS page cache
    /// holds the rest of the data files).
    #[arg(long, env = "RAFTKV_CACHE_MB", value_name = "MIB")]
    pub cache_mb: Option<u64>,
    /// Log entries already applied are kept in memory up to this many MiB (default 8,
    /// 1..=1024) for followers that keep up; older ones are read back from the WAL when a
    /// follower needs them, so memory stays flat however large --snapshot-every is.
    #[arg(long, env = "RAFTKV_LOG_CACHE_MB", value_name = "MIB")]
    pub log_cache_mb: Option<u64>,
    /// WAL segment size in MiB (default 64). Two segments must fit on the disk beside the
    /// state machine: use a small value (e.g. 4) on small disks.
    #[arg(long, env = "RAFTKV_WAL_SEGMENT_MB", value_name = "MIB")]
    pub wal_segment_mb: Option<u64>,
    /// Leader heartbeat interval (one consensus tick).
    #[arg(long, env = "RAFTKV_HEARTBEAT_MS", value_name = "MS")]
    pub heartbeat_ms: Option<u64>,
    /// Election timeout (randomized between 1x and 2x this).
    #[arg(long, env = "RAFTKV_ELECTION_TIMEOUT_MS", value_name = "MS")]
    pub election_timeout_ms: Option<u64>,
    /// Serve `?consistency=lease` reads from the leader's lease, without a round of
    /// heartbeats (default false: served like linearizable reads). Give every member the
    /// same setting and the same --heartbeat-ms and --election-timeout-ms. Safe while no
    /// member's clock runs more than 10 % faster than another's, pauses included; costs
    /// failover time: followers that lose the leader wait out its lease (about one election
    /// timeout) before campaigning. `--lease-reads=false` turns them off.
    #[arg(
        long,
        env = "RAFTKV_LEASE_READS",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub lease_reads: Option<bool>,
    /// Forget a client session (exactly-once writes) after this many seconds without a
    /// write from it (default 3600). Decided through the log: every member expires the same
    /// sessions at the same index.
    #[arg(long, env = "RAFTKV_SESSION_TTL_S", value_name = "S")]
    pub session_ttl_s: Option<u64>,
    /// The most client sessions remembered; beyond it the least recently active expire first
    /// (default 100000).
    #[arg(long, env = "RAFTKV_SESSIONS_MAX", value_name = "N")]
    pub sessions_max: Option<u64>,
    /// Revisions of change history kept for watchers to resume from, independent of log
    /// compaction (default 100000). A watch starting further back is answered 410.
    #[arg(long, env = "RAFTKV_WATCH_HISTORY_REVISIONS", value_name = "N")]
    pub watch_history_revisions: Option<u64>,
    /// MiB of change history kept at most, whatever --watch-history-revisions says (default
    /// 1024): past it the oldest revisions go, so large values cannot fill the disk.
    #[arg(long, env = "RAFTKV_WATCH_HISTORY_MB", value_name = "MIB")]
    pub watch_history_mb: Option<u64>,
    /// Watch streams served at once by this node (default 100000; each also holds a client
    /// connection, see --client-connections-max).
    #[arg(long, env = "RAFTKV_WATCHERS_MAX", value_name = "N")]
    pub watchers_max: Option<usize>,
    /// Live leases at most; a grant beyond it is refused with 413 (default 100000).
    #[arg(long, env = "RAFTKV_LEASES_MAX", value_name = "N")]
    pub leases_max: Option<u64>,
    /// Client connections served at once; more are answered 503 and closed (default 4096).
    #[arg(long, env = "RAFTKV_CLIENT_CONNECTIONS_MAX", value_name = "N")]
    pub client_connections_max: Option<usize>,
    /// Close a client connection idle this long (default 60000).
    #[arg(long, env = "RAFTKV_HTTP_IDLE_TIMEOUT_MS", value_name = "MS")]
    pub http_idle_timeout_ms: Option<u64>,
    /// Serve the client API over HTTPS with this certificate chain (PEM); needs --client-key.
    #[arg(
        long,
        env = "RAFTKV_CLIENT_CERT",
        value_name = "FILE",
        requires = "client_key"
    )]
    pub client_cert: Option<PathBuf>,
    /// The private key (PEM) of --client-cert.
    #[arg(
        long,
        env = "RAFTKV_CLIENT_KEY",
        value_name = "FILE",
        requires = "client_cert"
    )]
    pub client_key: Option<PathBuf>,
    /// The CA (PEM) that signed the members' client certificates, trusted when forwarding
    /// requests to an https:// leader.
    #[arg(long, env = "RAFTKV_CLIENT_CA", value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// Require `Authorization: Bearer <token>` (the token in this file) on every route but
    /// /health and /ready.
    #[arg(long, env = "RAFTKV_AUTH_TOKEN_FILE", value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// A TOML file with the same settings (snake_case keys; `peers` as a table id = "host:port").
    #[arg(long, env = "RAFTKV_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The TOML file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<u64>,
    data_dir: Option<PathBuf>,
    client_addr: Option<String>,
    client_url: Option<String>,
    peer_addr: Option<String>,
    peers: Option<BTreeMap<String, String>>,
    join: Option<Vec<String>>,
    peer_client_urls: Option<BTreeMap<String, String>>,
    peer_secret_file: Option<PathBuf>,
    peer_cert: Option<PathBuf>,
    peer_key: Option<PathBuf>,
    peer_ca: Option<PathBuf>,
    cluster_id: Option<String>,
    snapshot_every: Option<u64>,
    heartbeat_ms: Option<u64>,
    election_timeout_ms: Option<u64>,
    lease_reads: Option<bool>,
    catchup_margin: Option<u64>,
    cache_mb: Option<u64>,
    log_cache_mb: Option<u64>,
    wal_segment_mb: Option<u64>,
    request_timeout_ms: Option<u64>,
    session_ttl_s: Option<u64>,
    sessions_max: Option<u64>,
    watch_history_revisions: Option<u64>,
    watch_history_mb: Option<u64>,
    watchers_max: Option<usize>,
    leases_max: Option<u64>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    auth_token_file: Option<PathBuf>,
    /// Every client-port limit (`[client_port]`, keys as in `ClientPortConfig`).
    client_port: Option<ClientPortConfig>,
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_peers(s: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    parse_id_map(s, "HOST:PORT")
}

/// Parses `1=http://host:port,2=...`; the URLs are checked by `NodeConfig::validate`.
pub fn parse_peer_client_urls(s: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    parse_id_map(s, "URL")
}

/// Parses `ID=VALUE` pairs, comma-separated; ids positive and unique.
fn parse_id_map(s: &str, what: &str) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .with_context(|| format!("peer {part:?} is not ID={what}"))?;
        let id: u64 = id
            .trim()
            .parse()
            .with_context(|| format!("peer id {id:?} is not a number"))?;
        if id == 0 {
            bail!("peer id 0 is reserved");
        }
        if peers.insert(id, addr.trim().to_string()).is_some() {
            bail!("peer {id} is listed twice");
        }
    }
    Ok(peers)
}

/// Resolves flags, environment, file and defaults into a node configuration.
pub fn resolve(args: &ServeArgs) -> anyhow::Result<NodeConfig> {
    let mut file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the config file {}", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("invalid config file {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let client_port = client_port(args, &mut file)?;
    let join: Vec<String> = match (&args.join, file.join.take()) {
        (Some(flag), _) => flag
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(String::from)
            .collect(),
        (None, Some(list)) => list,
        (None, None) => Vec::new(),
    };
    let id = match args.id.or(file.id) {
        Some(id) => id,
        None if !join.is_empty() => 0,
        None => bail!("--id is required (it may be left out only with --join)"),
    };
    let data_dir = args
        .data_dir
        .clone()
        .or(file.data_dir)
        .context("--data-dir is required")?;
    let client_addr = args
        .client_addr
        .clone()
        .or(file.client_addr)
        .unwrap_or_else(|| "127.0.0.1:8001".into());
    let client_url = args
        .client_url
        .clone()
        .or(file.client_url)
        .unwrap_or_else(|| format!("http://{client_addr}"));
    let peer_addr = args
        .peer_addr
        .clone()
        .or(file.peer_addr)
        .unwrap_or_else(|| "127.0.0.1:9001".into());
    let peers = match (&args.peers, file.peers) {
        (Some(flag), _) => parse_peers(flag)?,
        (None, Some(table)) => {
            let joined: Vec<String> = table.iter().map(|(k, v)| format!("{k}={v}")).collect();
            parse_peers(&joined.join(","))?
        }
        (None, None) => BTreeMap::new(),
    };
    let peer_client_urls = match (&args.peer_client_urls, file.peer_client_urls) {
        (Some(flag), _) => parse_peer_client_urls(flag)?,
        (None, Some(table)) => {
            let joined: Vec<String> = table.iter().map(|(k, v)| format!("{k}={v}")).collect();
            parse_peer_client_urls(&joined.join(","))?
        }
        (None, None) => BTreeMap::new(),
    };
    let peer_tls = resolve_peer_tls(
        args.peer_cert.clone().or(file.peer_cert),
        args.peer_key.clone().or(file.peer_key),
        args.peer_ca.clone().or(file.peer_ca),
    )?;
    let config = NodeConfig {
        id,
        cluster_id: args
            .cluster_id
            .clone()
            .or(file.cluster_id)
            .unwrap_or_else(|| "raftkv".into()),
        data_dir,
        client_addr,
        client_url,
        peer_addr,
        peers,
        join,
        peer_client_urls,
        peer_secret_file: args.peer_secret_file.clone().or(file.peer_secret_file),
        peer_tls,
        heartbeat_ms: args.heartbeat_ms.or(file.heartbeat_ms).unwrap_or(50),
        election_timeout_ms: args
            .election_timeout_ms
            .or(file.election_timeout_ms)
            .unwrap_or(300),
        snapshot_every: args
            .snapshot_every
            .or(file.snapshot_every)
            .unwrap_or(10_000),
        catchup_margin: args.catchup_margin.or(file.catchup_margin).unwrap_or(5_000),
        cache_mb: args.cache_mb.or(file.cache_mb).unwrap_or(64),
        log_cache_mb: args.log_cache_mb.or(file.log_cache_mb).unwrap_or(8),
        wal_segment_mb: args.wal_segment_mb.or(file.wal_segment_mb).unwrap_or(64),
        request_timeout_ms: file.request_timeout_ms.unwrap_or(5_000),
        limits: Limits::default(),
        lease_reads: args.lease_reads.or(file.lease_reads).unwrap_or(false),
        sessions: SessionSettings {
            ttl_ms: args
                .session_ttl_s
                .or(file.session_ttl_s)
                .unwrap_or(3600)
                .saturating_mul(1000),
            sessions_max: args.sessions_max.or(file.sessions_max).unwrap_or(100_000),
        },
        client_port,
        watch: WatchConfig {
            history_revisions: args
                .watch_history_revisions
                .or(file.watch_history_revisions)
                .unwrap_or(WatchConfig::default().history_revisions),
            history_mb: args
                .watch_history_mb
                .or(file.watch_history_mb)
                .unwrap_or(WatchConfig::default().history_mb),
            settings: raftkv::watch::WatchSettings {
                watchers_max: args
                    .watchers_max
                    .or(file.watchers_max)
                    .unwrap_or(raftkv::watch::WatchSettings::default().watchers_max),
                ..raftkv::watch::WatchSettings::default()
            },
        },
        leases: LeaseSettings {
            leases_max: args.leases_max.or(file.leases_max).unwrap_or(100_000),
        },
    };
    config.validate().map_err(anyhow::Error::msg)?;
    check_addresses(&config)?;
    Ok(config)
}

/// Every address must be HOST:PORT before anything touches the disk, and the two this node
/// listens on must resolve: a typo there is an immediate usage error. A peer's host need not
/// resolve yet: in a container network a peer's name exists only once that peer's container
/// runs, and the transport resolves it again on every connection attempt. An unresolvable
/// peer is logged, so a typo there still shows (URLs are checked by `NodeConfig::validate`).
fn check_addresses(config: &NodeConfig) -> anyhow::Result<()> {
    resolve_addr("--client-addr", &config.client_addr)?;
    resolve_addr("--peer-addr", &config.peer_addr)?;
    for (id, addr) in &config.peers {
        let flag = format!("--peers {id}");
        check_host_port(&flag, addr)?;
        if let Err(e) = resolve_addr(&flag, addr) {
            tracing::warn!(
                peer = id,
                addr = %addr,
                "{e:#}; will retry on every connection attempt (not up yet, or a typo?)"
            );
        }
    }
    Ok(())
}

/// Checks that `addr` is HOST:PORT with a port in 0..=65535.
fn check_host_port(flag: &str, addr: &str) -> anyhow::Result<()> {
    let (host, port) = addr
        .rsplit_once(':')
        .with_context(|| format!("{flag} {addr:?} is not HOST:PORT"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        bail!("{flag} {addr:?} is not HOST:PORT (port 0..=65535)");
    }
    Ok(())
}

/// Checks that `addr` is HOST:PORT and resolves to at least one address.
fn resolve_addr(flag: &str, addr: &str) -> anyhow::Result<()> {
    use std::net::ToSocketAddrs;
    check_host_port(flag, addr)?;
    let found = addr
        .to_socket_addrs()
        .with_context(|| format!("{flag} {addr:?} does not resolve"))?
        .next();
    if found.is_none() {
        bail!("{flag} {addr:?} resolves to no address");
    }
    Ok(())
}

/// How long a graceful stop (finish in-flight requests, flush) may take before the process
/// exits anyway: SIGTERM always ends the process.
pub const SHUTDOWN_GRACE_MS: u64 = 10_000;
/// How long a node that hit a fatal storage error may take to stop before it exits anyway:
/// the failed disk may hang the clean-up (a sled flush on a full disk), and a supervisor can
/// only restart a process that has ended.
pub const FATAL_EXIT_GRACE_MS: u64 = 3_000;
/// Signals this soon after the first are the same request to stop, not a second one.
pub const SECOND_SIGNAL_AFTER_MS: u64 = 1_000;
/// Exit status after a fatal error, and when a stop overran its grace period.
pub const EXIT_FATAL: u8 = 1;

/// All three peer TLS files, or none.
fn resolve_peer_tls(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
) -> anyhow::Result<Option<PeerTlsFiles>> {
    match (cert, key, ca) {
        (Some(cert), Some(key), Some(ca)) => Ok(Some(PeerTlsFiles { cert, key, ca })),
        (None, None, None) => Ok(None),
        _ => bail!("--peer-cert, --peer-key and --peer-ca go together: give all three or none"),
    }
}

/// The client port's settings: flags over the file's keys and `[client_port]` table.
fn client_port(args: &ServeArgs, file: &mut FileConfig) -> anyhow::Result<ClientPortSettings> {
    let mut limits = file.client_port.take().unwrap_or_default();
    if let Some(n) = args.client_connections_max {
        limits.client_connections_max = n;
    }
    if let Some(ms) = args.http_idle_timeout_ms {
        limits.idle_timeout_ms = ms;
    }
    limits.validate().map_err(anyhow::Error::msg)?;
    let cert = args.client_cert.clone().or(file.client_cert.take());
    let key = args.client_key.clone().or(file.client_key.take());
    let tls_cert_key = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => bail!("--client-cert and --client-key go together"),
    };
    // Unreadable or invalid files are usage errors, reported before the node starts.
    if let Some((cert, key)) = &tls_cert_key {
        raftkv::tls::server_config(cert, key, None)?;
    }
    let auth_token_file = args.auth_token_file.clone().or(file.auth_token_file.take());
    if let Some(path) = &auth_token_file {
        raftkv::api::auth::AuthToken::from_file(path)?;
    }
    Ok(ClientPortSettings {
        limits,
        tls_cert_key,
        forward_ca: args.client_ca.clone().or(file.client_ca.take()),
        auth_token_file,
    })
}

pub fn run(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    // Everything `resolve` refuses is a usage error (exit 2), found before the disk is touched.
    let config = resolve(args).map_err(|e| super::UsageError(format!("{e:#}")))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // Before anything slow: a SIGTERM that arrives while storage is still being
        // recovered must stop the node gracefully once it is up, not kill it.
        let mut signals = ShutdownSignals::install();
        let running = node::start(config.clone()).await.with_context(|| {
            format!(
                "node {} cannot start from {}",
                config.id,
                config.data_dir.display()
            )
        })?;
        let failed = running.failed();
        let fatal = tokio::select! {
            _ = signals.recv() => false,
            _ = failed => true,
        };
        let grace_ms = if fatal {
            FATAL_EXIT_GRACE_MS
        } else {
            SHUTDOWN_GRACE_MS
        };
        exit_after(
            grace_ms,
            if fatal {
                "stopping after a fatal error"
            } else {
                "graceful stop"
            },
        );
        // A second signal during the graceful stop means "now" — unless it comes within a
        // second of the first: Ctrl-C reaches a whole process group, and a supervisor such as
        // `cluster up` then sends its own SIGTERM as well.
        drop(signals);
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(SECOND_SIGNAL_AFTER_MS)).await;
            // Fresh listeners: they report only signals sent from now on (tokio's handler
            // stays installed meanwhile, so none of them kills the process).
            ShutdownSignals::install().recv().await;
            eprintln!("raftkv: second shutdown signal; exiting at once");
            std::process::exit(i32::from(EXIT_FATAL));
        });
        let stopped = if fatal {
            running.abandon().await
        } else {
            running.shutdown().await
        };
        match stopped {
            Ok(()) if !fatal => {
                tracing::info!("node stopped");
                Ok(ExitCode::SUCCESS)
            }
            Ok(()) => Err(anyhow::anyhow!(
                "node {} stopped on a fatal error",
                config.id
            )),
            Err(e) => Err(anyhow::Error::new(e).context(format!(
                "node {} stopped on a fatal error (data dir {})",
                config.id,
                config.data_dir.display()
            ))),
        }
    })
}

/// Ends the process with [`EXIT_FATAL`] if it is still running `grace_ms` from now, whatever
/// its threads are blocked in: a plain OS thread, so a stuck runtime cannot hold it up.
fn exit_after(grace_ms: u64, what: &'static str) {
    let spawned = std::thread::Builder::new()
        .name("raftkv-exit-watchdog".into())
        .spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(grace_ms));
            eprintln!("raftkv: {what} did not finish within {grace_ms} ms; exiting");
            std::process::exit(i32::from(EXIT_FATAL));
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the exit watchdog; exiting now");
        std::process::exit(i32::from(EXIT_FATAL));
    }
}

/// SIGTERM and SIGINT, caught from the moment they are installed (a signal that arrives
/// before [`ShutdownSignals::recv`] is waited on is kept, not lost).
struct ShutdownSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    fn install() -> ShutdownSignals {
        use tokio::signal::unix::{signal, SignalKind};
        ShutdownSignals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Resolves on the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        match (&mut self.term, &mut self.int) {
            (Some(term), Some(int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutdown signal received; stopping gracefully");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn peers_parse_and_reject_garbage() {
        let p = parse_peers("2=127.0.0.1:9002, 3=h:9003").unwrap();
        assert_eq!(p[&2], "127.0.0.1:9002");
        assert_eq!(p[&3], "h:9003");
        assert!(parse_peers("2").is_err());
        assert!(parse_peers("x=h:1").is_err());
        assert!(parse_peers("0=h:1").is_err());
        assert!(parse_peers("2=a:1,2=b:2").is_err());
    }

    #[test]
    fn flags_beat_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "id = 2\ndata_dir = \"/tmp/x\"\nheartbeat_ms = 40\nelection_timeout_ms = 400\n[peers]\n1 = \"127.0.0.1:9001\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            heartbeat_ms: Some(30),
            ..ServeArgs::default()
        };
        let c = resolve(&args).unwrap();
        assert_eq!((c.id, c.heartbeat_ms, c.election_timeout_ms), (2, 30, 400));
        assert_eq!(c.peers[&1], "127.0.0.1:9001");
        assert!(c.peer_client_urls.is_empty() && c.peer_tls.is_none());
        std::fs::write(&file, "id = 2\nbogus = 1\n").unwrap();
        assert!(resolve(&args).is_err(), "unknown keys are errors");
    }

    #[test]
    fn the_watch_history_byte_bound_comes_from_the_flag_or_the_file_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "id = 1\ndata_dir = \"/tmp/x\"\nwatch_history_mb = 64\n",
        )
        .unwrap();
        let mut args = ServeArgs {
            config: Some(file),
            ..ServeArgs::default()
        };
        assert_eq!(resolve(&args).unwrap().watch.history_mb, 64);
        args.watch_history_mb = Some(8);
        let mut c = resolve(&args).unwrap();
        assert_eq!(c.watch.history_mb, 8);
        c.watch.history_mb = raftkv::node::WATCH_HISTORY_MB_MAX + 1;
        assert!(c.validate().unwrap_err().contains("--watch-history-mb"));
        args.watch_history_mb = Some(0);
        let err = format!("{:#}", resolve(&args).unwrap_err());
        assert!(err.contains("--watch-history-mb"), "{err}");
        assert_eq!(
            raftkv::node::WatchConfig::default().history_mb,
            1024,
            "the default is 1 GiB"
        );
    }

    #[test]
    fn peer_client_urls_and_tls_files_resolve_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "id = 1\ndata_dir = \"/tmp/x\"\npeer_secret_file = \"/s\"\n\
             [peers]\n2 = \"127.0.0.1:9002\"\n3 = \"127.0.0.1:9003\"\n\
             [peer_client_urls]\n2 = \"http://127.0.0.1:8002\"\n",
        )
        .unwrap();
        let mut args = ServeArgs {
            config: Some(file),
            ..ServeArgs::default()
        };
        let c = resolve(&args).unwrap();
        assert_eq!(c.peer_client_urls[&2], "http://127.0.0.1:8002");
        assert!(!c.peer_client_urls.contains_key(&3), "unconfigured: no URL");
        assert_eq!(c.peer_secret_file.as_deref(), Some(Path::new("/s")));
        args.peer_client_urls = Some("2=https://n2.example:8443,3=http://[::1]:8003".into());
        let c = resolve(&args).unwrap();
        assert_eq!(c.peer_client_urls[&2], "https://n2.example:8443");
        assert_eq!(c.peer_client_urls[&3], "http://[::1]:8003");
        for bad in ["4=http://h:1", "2=ftp://h:1", "2=nonsense", "2=http://"] {
            args.peer_client_urls = Some(bad.into());
            assert!(resolve(&args).is_err(), "{bad} must be refused");
        }
        args.peer_client_urls = None;
        args.peer_cert = Some("/c.pem".into());
        let err = resolve(&args).unwrap_err();
        assert!(err.to_string().contains("all three"), "{err}");
        args.peer_key = Some("/k.pem".into());
        args.peer_ca = Some("/ca.pem".into());
        let tls = resolve(&args).unwrap().peer_tls.unwrap();
        assert_eq!(tls.ca, Path::new("/ca.pem"));
    }

    #[test]
    fn a_peer_that_does_not_resolve_yet_is_accepted_but_a_listen_address_is_not() {
        // `.invalid` never resolves (RFC 6761): a peer container that is not up yet.
        let mut args = ServeArgs {
            id: Some(1),
            data_dir: Some("/tmp/x".into()),
            peers: Some("2=node2-peer.invalid:9001,3=127.0.0.1:9003".into()),
            ..ServeArgs::default()
        };
        let c = resolve(&args).unwrap();
        assert_eq!(c.peers[&2], "node2-peer.invalid:9001");
        for malformed in ["2=node2-peer.invalid", "2=:9001", "2=h:70000"] {
            args.peers = Some(malformed.into());
            assert!(resolve(&args).is_err(), "{malformed} must be refused");
        }
        args.peers = None;
        for (flag, listen) in [
            ("client", "nowhere.invalid:8001"),
            ("peer", "nowhere.invalid:9001"),
        ] {
            let mut a = ServeArgs {
                id: Some(1),
                data_dir: Some("/tmp/x".into()),
                ..ServeArgs::default()
            };
            match flag {
                "client" => a.client_addr = Some(listen.into()),
                _ => a.peer_addr = Some(listen.into()),
            }
            let err = resolve(&a).unwrap_err();
            assert!(
                err.to_string().contains("does not resolve"),
                "{flag}: {err}"
            );
        }
    }

    #[test]
    fn client_port_flags_beat_the_file_and_bad_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "id = 1\ndata_dir = \"/tmp/x\"\n[client_port]\nidle_timeout_ms = 5000\nclient_connections_max = 10\nlist_bytes_max = 1000\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            client_connections_max: Some(20),
            ..ServeArgs::default()
        };
        let c = resolve(&args).unwrap();
        let limits = &c.client_port.limits;
        assert_eq!(
            (
                limits.idle_timeout_ms,
                limits.client_connections_max,
                limits.list_bytes_max
            ),
            (5000, 20, 1000)
        );
        let zero = ServeArgs {
            config: Some(file.clone()),
            http_idle_timeout_ms: Some(0),
            ..ServeArgs::default()
        };
        assert!(resolve(&zero).is_err());
        let missing = ServeArgs {
            config: Some(file),
            auth_token_file: Some(dir.path().join("no-such-token")),
            ..ServeArgs::default()
        };
        assert!(resolve(&missing).is_err());
    }
}
