//! The node runtime: the consensus core, storage, peer transport and HTTP API wired together.
//!
//! The runtime is three deterministic parts and a thin shell around them:
//!
//! ```text
//!  HTTP handlers ──requests (4096)──▶ consensus task ──jobs (4096)──▶ storage thread
//!     ▲    ▲                          │  │  ▲    ▲                      │  │
//!     │    └── oneshot (status, read) ┘  │  │    └──events (4096)───────┘  └─▶ peer transport
//!     │                                  │  │                                (after fsync)
//!     │                  committed (1024)▼  └── Notify + atomic (applied index)
//!     └──── write replies ────────── apply thread ◀─ install rendezvous ─▶ storage thread
//!  peer transport ──inbound (4096)──▶ consensus task ──▶ peer transport (per-peer queues, 4096)
//!  snapshot streams (one per peer at most) ──▶ peer transport
//! ```
//!
//! - [`consensus::Consensus`] owns the [`Raft`](crate::raft::Raft) core and turns one
//!   [`messages::Input`] (tick, peer message, request, storage event, applied index, snapshot
//!   stream done) into [`messages::Outputs`]: messages to send now, storage jobs, apply jobs,
//!   snapshot streams to start. Messages that need nothing durable go out at once (a leader's
//!   appends go out while its own fsync runs); the rest ride with the storage job.
//! - [`storage_worker::StorageWorker`] owns the WAL, sled and the snapshot files (all through
//!   [`NodeStorage`] on the `Vfs`); it group-commits (one write + one fdatasync for everything
//!   queued), compacts, receives snapshot files, installs them, and hands out the messages
//!   that waited for its fsync.
//! - [`apply::ApplyWorker`] applies committed entries to sled while the next fsync runs, and
//!   answers the writes waiting for them. A snapshot install is a rendezvous of the two
//!   workers at the same point of both queues.
//! - The shell — [`driver`] (a tokio task: timer, transport, API, snapshot streams) and the
//!   storage and apply threads ([`storage_worker::run`], [`apply::run`]) — only moves inputs
//!   and outputs; every wait is a notification. `tests/simulation` drives the same three
//!   parts with a simulated clock, disk (`SimFs`) and network instead.
//! - **Reads** are served by the HTTP handlers from the shared state machine, after the
//!   consensus step confirmed a ReadIndex and saw its index applied (linearizable) or
//!   directly (stale).
//!
//! The path of a write: `PUT` → handler validates → consensus `propose` → leader appends and
//! sends `Append` to followers while the storage thread fsyncs its own copy → a quorum of
//! durable copies (the leader counts itself once its fsync is reported) commits → the apply
//! thread applies it and matches it to the waiting proposal (by index and term) → 200 with the
//! index. Hops between threads cost tens of microseconds each on a busy machine, so the path
//! has as few as the ordering rules allow.

pub mod apply;
pub mod consensus;
pub mod driver;
pub mod identity;
pub mod join;
pub mod lessor;
pub mod messages;
pub mod peer;
pub mod rejoin;
pub mod restore;
pub mod service;
pub mod storage_worker;

use crate::api::http::RouterOptions;
use crate::api::server::{ClientPortConfig, Tls};
use crate::api::Limits;
use crate::raft;
use crate::transport::{PeerAuth, PeerTls, PeerTransport, TransportConfig};
use peer::PeerMessage;
use raftkv_storage::node_storage::{NodeStorage, NodeStorageError, NodeStorageOptions};
use raftkv_storage::{Membership, NodeId};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// Bounded capacity of each of the node's internal queues.
pub const QUEUE_CAPACITY: usize = 4096;

/// The smallest WAL segment: one must hold the largest entry (1 MiB value + 8 KiB key, framed).
pub const WAL_SEGMENT_MB_MIN: u64 = 2;
/// The largest WAL segment.
pub const WAL_SEGMENT_MB_MAX: u64 = 1024;
/// The largest in-memory cache of applied log entries (the core's `log_bytes_max`, 1 GiB).
pub const LOG_CACHE_MB_MAX: u64 = 1024;

/// Everything a node needs to run.
#[derive(Clone, Debug, Default)]
pub struct NodeConfig {
    pub id: NodeId,
    pub cluster_id: String,
    pub data_dir: PathBuf,
    /// Where the HTTP API listens.
    pub client_addr: String,
    /// The URL clients use to reach the HTTP API (default `http://<client_addr>`); the other
    /// members must be given it in their `peer_client_urls`.
    pub client_url: String,
    /// Where the peer transport listens.
    pub peer_addr: String,
    /// The other members' peer addresses (bootstrap only: once the data dir holds a
    /// configuration, the log's addresses win).
    pub peers: BTreeMap<NodeId, String>,
    /// Join a running cluster through these members' client URLs instead of bootstrapping
    /// (`--join`): used only while the data dir is empty. `id` may then be 0 (found by this
    /// node's advertised client URL or peer address).
    pub join: Vec<String>,
    /// The other members' client URLs, for leader hints and status. Configured, never learned
    /// from a peer: a forged handshake must not redirect clients. A member without one is
    /// named by id only (followers answer 503 with the leader's id).
    pub peer_client_urls: BTreeMap<NodeId, String>,
    /// A file holding the shared cluster secret that peers prove in the handshake.
    pub peer_secret_file: Option<PathBuf>,
    /// Mutual TLS on the peer port.
    pub peer_tls: Option<PeerTlsFiles>,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: u64,
    pub snapshot_every: u64,
    pub catchup_margin: u64,
    /// sled's page cache size in MiB.
    pub cache_mb: u64,
    /// Payloads of applied log entries the consensus core keeps in memory, in MiB; older
    /// ones are read from the WAL (`raft::Config::log_cache_bytes_max`; `--log-cache-mb`).
    pub log_cache_mb: u64,
    /// WAL segment size in MiB: two segments (the active one and the next, prepared ahead)
    /// must fit on the disk beside the state machine.
    pub wal_segment_mb: u64,
    /// How long a write waits to be committed and applied before answering 504.
    pub request_timeout_ms: u64,
    pub limits: Limits,
    /// Serve `consistency=lease` reads from the leader's lease while this node leads (see
    /// `raft::Config::lease_reads`; `--lease-reads`).
    pub lease_reads: bool,
    /// The client port's limits, TLS and authentication.
    pub client_port: ClientPortSettings,
    /// Client sessions (exactly-once writes): TTL and table bound.
    pub sessions: SessionSettings,
    /// Watch history and watcher bounds.
    pub watch: WatchConfig,
    /// Lease bounds.
    pub leases: LeaseSettings,
}

/// Watch history and watcher bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchConfig {
    /// Revisions of history kept for watchers to resume from (`--watch-history-revisions`).
    pub history_revisions: u64,
    /// MiB of history kept at most, whatever the revisions (`--watch-history-mb`).
    pub history_mb: u64,
    pub settings: crate::watch::WatchSettings,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            history_revisions: raftkv_storage::sm::history::HISTORY_REVISIONS_DEFAULT,
            history_mb: raftkv_storage::sm::history::HISTORY_BYTES_DEFAULT >> 20,
            settings: crate::watch::WatchSettings::default(),
        }
    }
}

/// Lease bounds (the TTL range is fixed: `LEASE_TTL_MS_MIN..=LEASE_TTL_MS_MAX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Live leases at most (`--leases-max`): the leader proposes grants with this bound.
    pub leases_max: u64,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            leases_max: raftkv_storage::sm::leases::LEASES_MAX_DEFAULT,
        }
    }
}

/// How often the lease upkeep looks for expired leases: a lease outlives its TTL by at most
/// this much plus the revoke's commit.
pub const LEASE_TICK_MS: u64 = 100;

/// The longest session TTL accepted (30 days).
pub const SESSION_TTL_MS_MAX: u64 = 30 * 24 * 3600 * 1000;
/// The largest session table accepted (each session holds its latest write's result).
pub const SESSIONS_MAX_MAX: u64 = 10_000_000;

/// The most revisions of watch history a node may be asked to keep.
pub const WATCH_HISTORY_REVISIONS_MAX: u64 = 100_000_000;
/// Most `--watch-history-mb` (1 TiB).
pub const WATCH_HISTORY_MB_MAX: u64 = 1 << 20;
/// The most watchers a node may be asked to serve.
pub const WATCHERS_MAX_MAX: usize = 1_000_000;
/// The largest lease bound accepted.
pub const LEASES_MAX_MAX: u64 = 10_000_000;

/// How long client sessions live and how many are kept. The leader proposes them with each
/// `ExpireSessions` entry; the state machine applies what the log says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionSettings {
    pub ttl_ms: u64,
    pub sessions_max: u64,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            ttl_ms: raftkv_storage::sm::record::SESSION_TTL_MS_DEFAULT,
            sessions_max: raftkv_storage::sm::record::SESSIONS_MAX_DEFAULT,
        }
    }
}

/// How the client port is served beyond its address.
#[derive(Clone, Debug, Default)]
pub struct ClientPortSettings {
    /// Timeouts and limits (`forward_timeout_ms` is replaced by `request_timeout_ms`).
    pub limits: ClientPortConfig,
    /// Serve HTTPS with this certificate chain and private key (PEM files).
    pub tls_cert_key: Option<(PathBuf, PathBuf)>,
    /// The CA that signed the members' client certificates: trusted when forwarding to an
    /// `https://` leader.
    pub forward_ca: Option<PathBuf>,
    /// Require `Authorization: Bearer <the token in this file>`.
    pub auth_token_file: Option<PathBuf>,
}

/// File descriptors kept free of client connections for the WAL, sled, snapshot files and
/// peer connections.
pub const FDS_RESERVED: u64 = 256;

/// At most the open-file limit minus [`FDS_RESERVED`] client connections: past it, idle
/// clients would take the descriptors the node needs for its files and peers (and every
/// accept would fail with EMFILE). Logged when it lowers the setting.
fn clamp_to_fd_limit(client_connections_max: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and reads nothing else.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if !ok || limit.rlim_cur == libc::RLIM_INFINITY {
        return client_connections_max;
    }
    let room = limit.rlim_cur.saturating_sub(FDS_RESERVED).max(16);
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    if client_connections_max > room {
        tracing::warn!(
            configured = client_connections_max,
            allowed = room,
            open_files_limit = limit.rlim_cur,
            "client connections capped below the open-file limit (raise it with ulimit -n)"
        );
        return room;
    }
    client_connections_max
}

/// Builds the router options and TLS acceptor, reading every file before the disk is touched.
fn client_port(config: &NodeConfig) -> Result<(RouterOptions, Option<Tls>), NodeError> {
    let settings = &config.client_port;
    let mut limits = settings.limits.clone();
    limits.forward_timeout_ms = config.request_timeout_ms;
    limits.client_connections_max = clamp_to_fd_limit(limits.client_connections_max);
    limits.validate().map_err(NodeError::Config)?;
    let tls_err = |e: crate::tls::TlsError| NodeError::Config(e.to_string());
    crate::tls::ensure_provider();
    let tls = match &settings.tls_cert_key {
        Some((cert, key)) => {
            let server = crate::tls::server_config(cert, key, None).map_err(tls_err)?;
            Some(Tls::from(server))
        }
        None => None,
    };
    let forward_tls = match &settings.forward_ca {
        Some(ca) => Some(crate::tls::client_config(ca, None).map_err(tls_err)?),
        None => None,
    };
    let auth_token = match &settings.auth_token_file {
        Some(path) => Some(
            crate::api::auth::AuthToken::from_file(path)
                .map_err(|e| NodeError::Config(e.to_string()))?,
        ),
        None => None,
    };
    let options = RouterOptions {
        port: limits,
        auth_token,
        forward_tls,
        metrics: None,
    };
    Ok((options, tls))
}

impl NodeConfig {
    /// Checks the settings are usable, naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 && self.join.is_empty() {
            return Err("--id must not be 0 (it may be left out only with --join)".into());
        }
        if !self.join.is_empty() && !self.peers.is_empty() {
            return Err(
                "--join and --peers exclude each other: --peers bootstraps a new cluster, \
                 --join adds this node to a running one (after `raftkv member add`)"
                    .into(),
            );
        }
        for url in &self.join {
            check_client_url(url).map_err(|e| format!("--join {url:?}: {e}"))?;
        }
        if self.peers.contains_key(&self.id) {
            return Err(format!("--peers lists this node's own id {}", self.id));
        }
        if self.heartbeat_ms == 0 {
            return Err("--heartbeat-ms must be positive".into());
        }
        if self.election_timeout_ms < 3 * self.heartbeat_ms {
            return Err(format!(
                "--election-timeout-ms ({}) must be at least 3x --heartbeat-ms ({})",
                self.election_timeout_ms, self.heartbeat_ms
            ));
        }
        if self.snapshot_every == 0 {
            return Err("--snapshot-every must be positive".into());
        }
        if !(1_000..=SESSION_TTL_MS_MAX).contains(&self.sessions.ttl_ms) {
            return Err(format!(
                "--session-ttl-s must be from 1 to {}",
                SESSION_TTL_MS_MAX / 1000
            ));
        }
        if !(1..=SESSIONS_MAX_MAX).contains(&self.sessions.sessions_max) {
            return Err(format!(
                "--sessions-max must be from 1 to {SESSIONS_MAX_MAX}"
            ));
        }
        if !(1..=WATCH_HISTORY_REVISIONS_MAX).contains(&self.watch.history_revisions) {
            return Err(format!(
                "--watch-history-revisions must be from 1 to {WATCH_HISTORY_REVISIONS_MAX}"
            ));
        }
        if !(1..=WATCH_HISTORY_MB_MAX).contains(&self.watch.history_mb) {
            return Err(format!(
                "--watch-history-mb must be from 1 to {WATCH_HISTORY_MB_MAX}"
            ));
        }
        if !(1..=WATCHERS_MAX_MAX).contains(&self.watch.settings.watchers_max) {
            return Err(format!(
                "--watchers-max must be from 1 to {WATCHERS_MAX_MAX}"
            ));
        }
        if !(1..=LEASES_MAX_MAX).contains(&self.leases.leases_max) {
            return Err(format!("--leases-max must be from 1 to {LEASES_MAX_MAX}"));
        }
        if !(1..=LOG_CACHE_MB_MAX).contains(&self.log_cache_mb) {
            return Err(format!(
                "--log-cache-mb must be 1..={LOG_CACHE_MB_MAX}, got {}",
                self.log_cache_mb
            ));
        }
        if !(WAL_SEGMENT_MB_MIN..=WAL_SEGMENT_MB_MAX).contains(&self.wal_segment_mb) {
            return Err(format!(
                "--wal-segment-mb must be from {WAL_SEGMENT_MB_MIN} to {WAL_SEGMENT_MB_MAX}"
            ));
        }
        if self.cluster_id.is_empty() {
            return Err("the cluster id must not be empty".into());
        }
        check_client_url(&self.client_url)
            .map_err(|e| format!("--client-url {:?}: {e}", self.client_url))?;
        for (id, url) in &self.peer_client_urls {
            if *id != self.id && !self.peers.contains_key(id) {
                return Err(format!(
                    "--peer-client-urls names node {id}, which is not in --peers"
                ));
            }
            check_client_url(url).map_err(|e| format!("--peer-client-urls {id}={url}: {e}"))?;
        }
        Ok(())
    }

    /// The core's configuration: one tick per heartbeat, elections after a randomized
    /// `election_timeout_ms ..< 2 × election_timeout_ms`.
    pub fn raft_config(&self) -> raft::Config {
        let mut c = raft::Config::new(self.id);
        let ticks = (self.election_timeout_ms / self.heartbeat_ms).max(3) as u32;
        c.heartbeat_ticks = 1;
        c.election_timeout_min_ticks = ticks;
        c.election_timeout_max_ticks = ticks * 2;
        c.lease_reads = self.lease_reads;
        c.lease_ms = raft::Config::lease_ms_for(self.heartbeat_ms, ticks);
        c.log_cache_bytes_max = self.log_cache_mb.clamp(1, LOG_CACHE_MB_MAX) << 20;
        debug_assert!(c.log_cache_bytes_max <= c.log_bytes_max);
        c
    }

    /// All voters: this node and its peers.
    pub fn membership(&self) -> Membership {
        Membership::with_voters(self.peers.keys().copied().chain([self.id]))
    }
}

/// PEM files for mutual TLS on the peer port.
#[derive(Clone, Debug)]
pub struct PeerTlsFiles {
    /// This node's certificate (chain), presented as server and as client.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signs every member's certificate.
    pub ca: PathBuf,
}

/// Loads the peer secret and TLS material named in `config`; errors name the file.
pub fn peer_auth(config: &NodeConfig) -> Result<PeerAuth, NodeError> {
    let secret = match &config.peer_secret_file {
        Some(path) => Some(crate::transport::PeerSecret::load(path)?),
        None => None,
    };
    let tls = match &config.peer_tls {
        Some(files) => Some(PeerTls {
            server: crate::tls::server_config(&files.cert, &files.key, Some(&files.ca))?,
            client: crate::tls::client_config(&files.ca, Some((&files.cert, &files.key)))?,
        }),
        None => None,
    };
    let auth = PeerAuth { secret, tls };
    if !auth.is_enabled() {
        tracing::warn!(
            id = config.id,
            peer_addr = %config.peer_addr,
            "THE PEER PORT IS UNAUTHENTICATED: anyone who can reach it can act as a member. \
             Set --peer-secret-file and/or --peer-cert/--peer-key/--peer-ca"
        );
    }
    Ok(auth)
}

/// An http:// or https:// URL with a host.
pub fn check_client_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not http or https", parsed.scheme()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    Ok(())
}

/// Why a node could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("storage: {0}")]
    Storage(#[from] raftkv_storage::node_storage::NodeStorageError),
    #[error("consensus: {0}")]
    Raft(#[from] raft::RaftError),
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    #[error(transparent)]
    PeerSecret(#[from] crate::transport::SecretError),
    #[error("peer TLS: {0}")]
    PeerTls(#[from] crate::tls::TlsError),
    #[error("cannot listen for clients on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("the node stopped: {0}")]
    Stopped(String),
}

/// A running node. Dropping it does not stop it: call [`RunningNode::shutdown`].
pub struct RunningNode {
    pub id: NodeId,
    pub client_url: String,
    pub peer_addr: std::net::SocketAddr,
    pub service: Arc<service::NodeService>,
    shutdown: watch::Sender<bool>,
    driver: tokio::task::JoinHandle<Result<(), NodeError>>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    storage: std::thread::JoinHandle<()>,
    apply: std::thread::JoinHandle<()>,
    sm: Arc<raftkv_storage::sm::StateMachine>,
}

impl RunningNode {
    /// Stops accepting requests, finishes in-flight ones, flushes and stops every task.
    pub async fn shutdown(self) -> Result<(), NodeError> {
        let _ = self.shutdown.send(true);
        let http = self.http.await;
        let driver = self.driver.await;
        if let Ok(Err(e)) = http {
            tracing::warn!(error = %e, "http server stopped with an error");
        }
        // The consensus task is gone, so the storage and apply queues are closed: both
        // threads finish the queued work and exit; then sled is flushed, so the next start
        // replays nothing.
        let (storage, apply, sm) = (self.storage, self.apply, self.sm);
        let joined = tokio::task::spawn_blocking(move || {
            let ok = storage.join().is_ok() & apply.join().is_ok();
            storage_worker::flush_state_machine(&sm);
            ok
        })
        .await;
        if !matches!(joined, Ok(true)) {
            tracing::warn!("the storage or apply thread could not be joined");
        }
        match driver {
            Ok(r) => r,
            Err(e) => Err(NodeError::Stopped(format!("consensus task: {e}"))),
        }
    }

    /// The session table as this node's state machine holds it.
    pub fn sessions_summary(&self) -> raftkv_storage::sm::SessionsSummary {
        self.sm.sessions_summary()
    }

    /// Resolves once the node stopped by itself (a fatal storage or apply error): the
    /// consensus task raised the shutdown flag.
    pub fn failed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut flag = self.shutdown.subscribe();
        async move {
            let _ = flag.wait_for(|stopped| *stopped).await;
        }
    }

    /// After a fatal error: stops the HTTP server and collects the consensus task's error,
    /// without waiting for the storage and apply threads or flushing sled — on a failed disk
    /// those can block for good, and the WAL already holds everything acknowledged.
    pub async fn abandon(self) -> Result<(), NodeError> {
        let _ = self.shutdown.send(true);
        let http = self.http.await;
        if let Ok(Err(e)) = http {
            tracing::warn!(error = %e, "http server stopped with an error");
        }
        match self.driver.await {
            Ok(r) => r,
            Err(e) => Err(NodeError::Stopped(format!("consensus task: {e}"))),
        }
    }

    /// Waits until the node stops by itself (a fatal storage error) or `stop` resolves, then
    /// shuts down gracefully.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), NodeError> {
        let mut watch = self.shutdown.subscribe();
        tokio::select! {
            _ = stop => {}
            _ = watch.changed() => {}
        }
        self.shutdown().await
    }
}

/// Opens the data dir (recovering it), starts the transport, the consensus task, the storage
/// thread and the HTTP API.
pub async fn start(mut config: NodeConfig) -> Result<RunningNode, NodeError> {
    config.validate().map_err(NodeError::Config)?;
    // Before the disk is touched: a bad secret or certificate must not leave a data dir.
    let auth = peer_auth(&config)?;
    let (router_options, client_tls) = client_port(&config)?;
    // Both ports before the disk: a typo in an address must not leave a WAL and an identity
    // file behind that then block the corrected start.
    let client_listener = tokio::net::TcpListener::bind(&config.client_addr)
        .await
        .map_err(|source| NodeError::Listen {
            addr: config.client_addr.clone(),
            source,
        })?;
    let peer_listener = tokio::net::TcpListener::bind(&config.peer_addr)
        .await
        .map_err(|source| NodeError::Listen {
            addr: config.peer_addr.clone(),
            source,
        })?;
    let mut discovered = None;
    if config.id == 0 {
        // `--join` without `--id`: the data dir knows, or else the cluster does.
        match identity::read(&config.data_dir)? {
            Some(found) => config.id = found.node_id,
            None => {
                let joined = join::discover(&config).await?;
                config.id = joined.id;
                discovered = Some(joined);
            }
        }
    }
    let identity = identity::check_or_write(
        &config.data_dir,
        &identity::Identity {
            cluster_id: config.cluster_id.clone(),
            node_id: config.id,
            joined: !config.join.is_empty(),
        },
    )?;
    let opts = NodeStorageOptions {
        snapshot_every: config.snapshot_every,
        catchup_margin: config.catchup_margin,
        wal: raftkv_storage::wal::WalOptions {
            segment_bytes_max: config.wal_segment_mb << 20,
            ..Default::default()
        },
        sm: raftkv_storage::sm::StateMachineOptions {
            cache_bytes: config.cache_mb.max(1) * 1024 * 1024,
            watch_history_revisions: config.watch.history_revisions.max(1),
            watch_history_bytes_max: config.watch.history_mb.clamp(1, WATCH_HISTORY_MB_MAX) << 20,
            ..Default::default()
        },
        ..NodeStorageOptions::default()
    };
    let storage = match open_storage(&config, opts.clone()).await {
        Err(NodeError::Storage(NodeStorageError::NeedsSnapshot {
            applied_index,
            needed_index,
            ..
        })) => {
            tracing::warn!(
                applied_index,
                needed_index,
                "the state machine is lost but the WAL is intact; fetching a snapshot from the cluster to rejoin"
            );
            rejoin::fetch_snapshot(&config, needed_index).await?;
            open_storage(&config, opts).await?
        }
        other => other?,
    };
    let seed = config.id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ wall_clock_seed();
    let start = how_to_start(&config, &identity, &storage, discovered).await?;
    let raft = consensus::open_core(config.raft_config(), start, &storage, seed)?;
    warn_if_flags_differ(&config, &raft);
    let metrics = Arc::new(crate::metrics::Metrics::new(config.peers.keys().copied()));
    let sm = storage.shared_sm();
    let snapshots = storage.shared_snapshots();

    let mut transport_config =
        TransportConfig::new(config.cluster_id.clone(), config.id, config.peers.clone());
    transport_config.auth = auth;
    transport_config.metrics = Some(metrics.clone());
    let (transport, inbound) =
        PeerTransport::<PeerMessage>::start_with_listener(transport_config, peer_listener)?;
    let peer_addr = transport.local_addr();
    let transport = Arc::new(transport);

    let (jobs_tx, jobs_rx) = mpsc::channel(QUEUE_CAPACITY);
    let (events_tx, events_rx) = mpsc::channel(QUEUE_CAPACITY);
    let (requests_tx, requests_rx) = mpsc::channel(QUEUE_CAPACITY);
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (apply_meeting, storage_meeting) = apply::install_meeting();

    let worker = storage_worker::StorageWorker::new(storage, metrics.clone());
    let storage_transport = transport.clone();
    let storage_thread = std::thread::Builder::new()
        .name(format!("raftkv-storage-{}", config.id))
        .spawn(move || {
            storage_worker::run(
                worker,
                storage_transport,
                jobs_rx,
                events_tx,
                storage_meeting,
            )
        })
        .map_err(|e| NodeError::Stopped(format!("cannot start the storage thread: {e}")))?;

    let (apply_tx, apply_rx) = mpsc::channel(apply::APPLY_QUEUE_MAX);
    let (apply_failed_tx, apply_failed_rx) = mpsc::channel(1);
    let applied_tx = Arc::new(apply::AppliedIndex::new(sm.applied_index()));
    let applied_rx = applied_tx.clone();
    let pending = Arc::new(apply::Pending::default());
    let hub = crate::watch::WatchHub::new(sm.applied_index(), config.watch.settings);
    let apply_worker =
        apply::ApplyWorker::new(sm.clone(), pending.clone(), metrics.clone(), hub.clone());
    let reports = apply::ApplyReports {
        applied: applied_tx,
        failed: apply_failed_tx,
    };
    let apply_thread = std::thread::Builder::new()
        .name(format!("raftkv-apply-{}", config.id))
        .spawn(move || apply::run(apply_worker, apply_rx, apply_meeting, reports))
        .map_err(|e| NodeError::Stopped(format!("cannot start the apply thread: {e}")))?;

    let service = Arc::new(service::NodeService::new(
        &config,
        requests_tx,
        sm.clone(),
        snapshots.clone(),
        pending.clone(),
        metrics.clone(),
        hub.clone(),
    ));
    let info = consensus::NodeInfo {
        id: config.id,
        cluster_id: config.cluster_id.clone(),
        client_url: config.client_url.clone(),
        peer_addr: advertised_peer_addr(peer_addr, &config.client_url),
        peers: config.peers.clone(),
        peer_client_urls: config.peer_client_urls.clone(),
        tick_ms: config.heartbeat_ms,
    };
    let consensus = consensus::Consensus::new(info, raft, sm.clone(), pending, metrics.clone());
    let driver = driver::Driver::new(
        consensus,
        config.heartbeat_ms,
        transport,
        snapshots,
        sm.clone(),
        jobs_tx,
        apply_tx,
        shutdown.clone(),
        metrics.clone(),
    );
    let inputs = driver::DriverInputs {
        inbound,
        events: events_rx,
        requests: requests_rx,
        applied: applied_rx,
        apply_failed: apply_failed_rx,
        shutdown: shutdown_rx.clone(),
    };
    let driver = tokio::spawn(driver.run(inputs));

    tokio::spawn(session_upkeep(
        service.clone(),
        config.sessions,
        shutdown_rx.clone(),
    ));
    tokio::spawn(lease_upkeep(service.clone(), shutdown_rx.clone()));
    let mut hub_shutdown = shutdown_rx.clone();
    tokio::spawn(async move {
        // Watch streams end (with a last line saying so) before the HTTP server drains.
        while !*hub_shutdown.borrow() {
            if hub_shutdown.changed().await.is_err() {
                break;
            }
        }
        hub.close();
    });
    let router_options = RouterOptions {
        metrics: Some(metrics),
        ..router_options
    };
    let router = crate::api::http::router_with(service.clone(), &router_options);
    let raw_watch = crate::api::http::raw_watch(service.clone(), &router_options);
    let mut http_shutdown = shutdown_rx;
    let http = tokio::spawn(crate::api::server::serve_with(
        client_listener,
        router,
        Some(raw_watch),
        router_options.port.clone(),
        client_tls,
        async move {
            while !*http_shutdown.borrow() {
                if http_shutdown.changed().await.is_err() {
                    break;
                }
            }
        },
    ));
    tracing::info!(
        id = config.id,
        client_url = %config.client_url,
        peer_addr = %peer_addr,
        "node started"
    );
    Ok(RunningNode {
        id: config.id,
        client_url: config.client_url.clone(),
        peer_addr,
        service,
        shutdown,
        driver,
        http,
        storage: storage_thread,
        apply: apply_thread,
        sm,
    })
}

/// How often the session upkeep looks: a tenth of the TTL, between 200 ms and 10 s, so a
/// session outlives its TTL by at most that much.
pub fn session_upkeep_period_ms(settings: SessionSettings) -> u64 {
    (settings.ttl_ms / 10).clamp(200, 10_000)
}

/// Runs [`service::NodeService::expire_sessions_if_due`] until shutdown.
async fn session_upkeep(
    service: Arc<service::NodeService>,
    settings: SessionSettings,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let period = std::time::Duration::from_millis(session_upkeep_period_ms(settings));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            changed = shutdown.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        if *shutdown.borrow() {
            return;
        }
        if let Err(e) = service.expire_sessions_if_due(settings).await {
            tracing::debug!(error = %e, "session upkeep did not run");
        }
    }
}

/// Runs the lessor every [`LEASE_TICK_MS`] until shutdown: on the leader, proposes the revoke
/// of every expired lease (each in a task of its own, so one slow commit delays no other).
async fn lease_upkeep(
    service: Arc<service::NodeService>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let period = std::time::Duration::from_millis(LEASE_TICK_MS);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            changed = shutdown.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        if *shutdown.borrow() {
            return;
        }
        let due = match service.expired_leases().await {
            Ok(due) => due,
            Err(e) => {
                tracing::debug!(error = %e, "lease upkeep did not run");
                continue;
            }
        };
        for id in due {
            let service = service.clone();
            tokio::spawn(async move {
                if let Err(e) = service.revoke_expired(id).await {
                    tracing::debug!(lease = id, error = %e, "revoking an expired lease failed; retried");
                }
            });
        }
    }
}

/// How the core starts. A data dir that holds a log restarts from it (the flags' peers and
/// `--join` are ignored). An empty one joins (`--join`: the configuration comes from the
/// cluster) or bootstraps (`--peers`) — except that a data dir first created by `--join`
/// never bootstraps: its first log entry would fork the cluster's.
async fn how_to_start(
    config: &NodeConfig,
    identity: &identity::Identity,
    storage: &NodeStorage,
    discovered: Option<join::Joined>,
) -> Result<consensus::Start, NodeError> {
    if !storage.is_fresh() {
        if !config.join.is_empty() {
            tracing::info!(
                id = config.id,
                "the data dir already holds this node's log: --join is not needed and is ignored"
            );
        }
        return Ok(consensus::Start::Bootstrap(config.membership()));
    }
    if config.join.is_empty() {
        if identity.joined {
            return Err(NodeError::Config(format!(
                "the data dir {} was created by --join and holds no log yet: start it with --join again \
                 (bootstrapping with --peers would start a second cluster under the same name)",
                config.data_dir.display()
            )));
        }
        return Ok(consensus::Start::Bootstrap(config.membership()));
    }
    let joined = match discovered {
        Some(joined) => joined,
        None => join::discover(config).await?,
    };
    if joined.id != config.id {
        return Err(NodeError::Config(format!(
            "the cluster names this node {} but --id (or the data dir) says {}",
            joined.id, config.id
        )));
    }
    Ok(consensus::Start::Join(joined.membership))
}

/// A restarted node follows the configuration in its data dir (the cluster agreed on it
/// through the log); flags naming other members are stale. Says so, and which wins.
fn warn_if_flags_differ(config: &NodeConfig, raft: &crate::raft::Raft) {
    if config.peers.is_empty() {
        return;
    }
    let flags: std::collections::BTreeSet<NodeId> =
        config.peers.keys().copied().chain([config.id]).collect();
    let m = raft.membership();
    if flags != m.members() {
        tracing::warn!(
            flag_members = ?flags,
            voters = ?m.voters,
            learners = ?m.learners,
            configuration_index = raft.membership_index(),
            "--peers names other members than the data dir's configuration: the data dir wins \
             (the cluster agreed on it through the log; --peers only bootstraps a new cluster). \
             Update the flags to silence this"
        );
    }
}

/// The peer address other members reach this node at, as it records it in the configuration
/// and shows in its status: the bound address, unless that is a wildcard (`0.0.0.0`, `::`,
/// as in a container), then the host of the advertised client URL with the bound port.
pub fn advertised_peer_addr(bound: std::net::SocketAddr, client_url: &str) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let host = reqwest::Url::parse(client_url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string));
    match host {
        Some(h) if h.contains(':') && !h.starts_with('[') => format!("[{h}]:{}", bound.port()),
        Some(h) => format!("{h}:{}", bound.port()),
        None => bound.to_string(),
    }
}

/// Opens (recovers) the data dir on a blocking thread.
async fn open_storage(
    config: &NodeConfig,
    opts: NodeStorageOptions,
) -> Result<NodeStorage, NodeError> {
    let data_dir = config.data_dir.clone();
    tokio::task::spawn_blocking(move || NodeStorage::open(&data_dir, opts))
        .await
        .map_err(|e| NodeError::Stopped(format!("storage open: {e}")))?
        .map_err(NodeError::from)
}

/// Seeds the election-timeout randomness; only timing depends on it, never safety.
fn wall_clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::advertised_peer_addr;

    #[test]
    fn a_wildcard_peer_address_is_advertised_under_the_client_url_host() {
        let bound = "0.0.0.0:9001".parse().unwrap();
        assert_eq!(
            advertised_peer_addr(bound, "http://node1-peer:8001"),
            "node1-peer:9001"
        );
        let bound = "10.0.0.1:9001".parse().unwrap();
        assert_eq!(
            advertised_peer_addr(bound, "http://node1:8001"),
            "10.0.0.1:9001"
        );
        let bound = "[::]:9001".parse().unwrap();
        assert_eq!(
            advertised_peer_addr(bound, "http://[fd00::1]:8001"),
            "[fd00::1]:9001"
        );
    }
}
