//! The peer transport: persistent, authenticated TCP (or TLS) connections between members.
//!
//! Shape, and why:
//! - **One outbound connection per peer**, owned by a writer task that drains a bounded queue.
//!   Raft tolerates lost messages, not unbounded memory: when a peer is slow or dead its queue
//!   fills and [`PeerTransport::send`] fails at once with [`SendError::QueueFull`], which the
//!   node reports to the consensus core as "peer unreachable".
//! - The writer also watches its connection's read half: the acceptor never writes after the
//!   handshake, so EOF there means the peer died or restarted, and the writer reconnects
//!   before the next message would be written into a dead socket and lost.
//! - **Inbound connections only read, and only after authentication.** With mutual TLS
//!   ([`PeerTls`]) the TLS handshake comes first: the acceptor requires a client certificate
//!   from the cluster CA and the dialer checks the acceptor's certificate against the same CA
//!   and the host of the peer address. Then the [`handshake`] names cluster, protocol version
//!   and both node ids, and — with a shared secret ([`PeerSecret`]) — both sides prove the
//!   secret by challenge and response. A stranger is refused (and logged) before any message
//!   is decoded. Without TLS and secret the port is open to anyone who can reach it; the node
//!   warns loudly.
//! - **Strangers cost little.** Until the handshake completes a connection may send frames of
//!   `handshake_bytes_max` (4 KiB) only — `frame_bytes_max` (16 MiB) applies after it — and
//!   must finish within `handshake_timeout_ms`; at most `pending_handshakes_max` connections
//!   may be in that state at once (the excess is closed at once). When `accept` fails for
//!   lack of file descriptors or memory the listener backs off (`accept_backoff_min_ms`
//!   doubling to `_max_ms`) and logs one line per episode instead of spinning.
//! - Inbound messages go to one bounded channel; when the node falls behind, reading stops and
//!   TCP flow control pushes back on the sender.
//! - **Reconnect with exponential backoff** (`reconnect_backoff_min_ms` doubling to `_max_ms`).
//!   Messages queued while disconnected wait (bounded); a connection error is reported once per
//!   outage as [`TransportEvent::Unreachable`], and so is an inbound connection the peer
//!   closed (a dead peer's kernel closes it at once: a follower learns its leader died
//!   without waiting for an election timeout).
//! - The writer batches: after one message it writes whatever else is queued (up to
//!   `write_batch_bytes_max`) before one flush, so a burst costs one syscall.
//! - No client URL is exchanged: members' client URLs come from the node's configuration.
//! - **The peer set changes at run time** ([`PeerTransport::set_peers`], for membership
//!   changes): an added peer gets a writer and a queue, a peer whose address changed gets a
//!   new writer dialing the new address (messages queued for the old one are dropped), and a
//!   removed peer's writer stops, its queued messages are dropped, its handshakes are refused
//!   and its open inbound connections are closed. The listener reads the same member set that
//!   `set_peers` writes, so nothing else decides who may connect. At most [`PEERS_MAX`] peers.
//!
//! The transport is generic over the message type: the node sends Raft messages and snapshot
//! chunks through it; tests send strings.

pub mod auth;
pub mod frame;
pub(crate) mod handshake;
mod listener;

pub use auth::{PeerSecret, SecretError};
use frame::FrameError;
use raftkv_types::NodeId;
use serde::{de::DeserializeOwned, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// The handshake protocol version; bumped on any incompatible change of the peer protocol.
/// 2: challenge–response with the cluster secret; no client URL in the handshake.
/// 3: heartbeats carry the lease a follower promises (`lease_ms`).
pub const PROTOCOL_VERSION: u32 = 3;

/// The most peers a transport talks to; `set_peers` refuses the rest (logged) and a
/// configuration with more does not start.
pub const PEERS_MAX: usize = 1024;

/// How peers prove who they are. Empty (the default) means unauthenticated.
#[derive(Clone, Debug, Default)]
pub struct PeerAuth {
    /// The shared cluster secret, proven in every handshake by both sides.
    pub secret: Option<PeerSecret>,
    /// Mutual TLS.
    pub tls: Option<PeerTls>,
}

impl PeerAuth {
    /// Whether anything authenticates peers.
    pub fn is_enabled(&self) -> bool {
        self.secret.is_some() || self.tls.is_some()
    }
}

/// Mutual TLS on the peer port: built with [`crate::tls::server_config`] (client CA set, so
/// client certificates are required) and [`crate::tls::client_config`] (with this node's
/// identity).
#[derive(Clone, Debug)]
pub struct PeerTls {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

/// Settings of the transport.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Identifies the cluster; peers of another cluster are refused.
    pub cluster_id: String,
    pub node_id: NodeId,
    /// The other members' peer addresses (`host:port`), by id, at start;
    /// [`PeerTransport::set_peers`] replaces them later.
    pub peers: BTreeMap<NodeId, String>,
    pub auth: PeerAuth,
    /// Messages queued per peer before `send` fails with `QueueFull`.
    pub queue_messages_max: usize,
    /// Inbound messages buffered for the node before readers stop reading.
    pub inbound_messages_max: usize,
    /// The largest frame accepted or sent once a connection is authenticated.
    pub frame_bytes_max: u32,
    /// The largest handshake frame: all a connection may send before it is authenticated.
    pub handshake_bytes_max: u32,
    /// Inbound connections still in their handshake at once; more are closed at once.
    pub pending_handshakes_max: usize,
    /// Bytes written before a flush when messages are queued back to back.
    pub write_batch_bytes_max: usize,
    pub connect_timeout_ms: u64,
    /// The whole handshake (TLS included) must complete within this.
    pub handshake_timeout_ms: u64,
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
    /// Wait after `accept` fails for lack of descriptors or memory, doubling up to `_max_ms`.
    pub accept_backoff_min_ms: u64,
    pub accept_backoff_max_ms: u64,
    /// Where per-peer bytes sent and received are counted (`raftkv_peer_*_bytes_total`).
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl TransportConfig {
    /// A configuration with default limits and no authentication.
    pub fn new(
        cluster_id: impl Into<String>,
        node_id: NodeId,
        peers: BTreeMap<NodeId, String>,
    ) -> TransportConfig {
        TransportConfig {
            cluster_id: cluster_id.into(),
            node_id,
            peers,
            auth: PeerAuth::default(),
            queue_messages_max: 4096,
            inbound_messages_max: 4096,
            frame_bytes_max: 16 << 20,
            handshake_bytes_max: 4 << 10,
            pending_handshakes_max: 64,
            write_batch_bytes_max: 1 << 20,
            connect_timeout_ms: 1000,
            handshake_timeout_ms: 2000,
            reconnect_backoff_min_ms: 50,
            reconnect_backoff_max_ms: 2000,
            accept_backoff_min_ms: 10,
            accept_backoff_max_ms: 1000,
            metrics: None,
        }
    }

    /// Checks the settings, naming the bad one.
    fn validate(&self) -> Result<(), TransportError> {
        let bad = |m: String| Err(TransportError::Config(m));
        if self.peers.contains_key(&self.node_id) {
            return bad(format!("node {} lists itself as a peer", self.node_id));
        }
        if self.node_id == 0 || self.peers.contains_key(&0) {
            return bad("node id 0 is reserved".into());
        }
        if self.peers.len() > PEERS_MAX {
            return bad(format!("{} peers, more than {PEERS_MAX}", self.peers.len()));
        }
        if self.queue_messages_max == 0
            || self.inbound_messages_max == 0
            || self.pending_handshakes_max == 0
        {
            return bad("queue limits must be positive".into());
        }
        if self.handshake_bytes_max < 256 {
            // The handshake frames need about 100 bytes plus the cluster id.
            return bad(format!(
                "handshake_bytes_max {} must be at least 256",
                self.handshake_bytes_max
            ));
        }
        if self.auth.tls.is_some() {
            for (id, addr) in &self.peers {
                if let Err(e) = server_name(addr) {
                    return bad(format!("peer {id}: {e}"));
                }
            }
        }
        Ok(())
    }
}

/// What the transport hands to the node.
#[derive(Debug, PartialEq, Eq)]
pub enum TransportEvent<M> {
    Message {
        from: NodeId,
        message: M,
    },
    /// The connection to `peer` failed or `peer` closed its connection to us; messages to it
    /// are being lost or queued.
    Unreachable {
        peer: NodeId,
    },
}

/// Why a message was not queued.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("unknown peer {0}")]
    UnknownPeer(NodeId),
    #[error("queue to peer {0} is full")]
    QueueFull(NodeId),
    #[error("transport is shut down")]
    Closed,
}

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("invalid transport configuration: {0}")]
    Config(String),
}

/// A connection to a peer, plain or TLS.
trait PeerIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PeerIo for T {}
type BoxedIo = Box<dyn PeerIo>;

/// The TLS server name of a `host:port` peer address: its host, an IP address or DNS name.
fn server_name(addr: &str) -> Result<rustls::pki_types::ServerName<'static>, String> {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _port)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} (from {addr:?}) is not a TLS server name: {e}"))
}

/// The peers a `set_peers` call will use: `peers` less this node, id 0, addresses that are
/// not TLS server names (with TLS) and, past [`PEERS_MAX`], the highest ids; each refusal is
/// logged.
fn admissible_peers(
    node_id: NodeId,
    tls: bool,
    peers: BTreeMap<NodeId, String>,
) -> BTreeMap<NodeId, String> {
    let mut admitted = BTreeMap::new();
    let mut over_limit = 0usize;
    for (peer, addr) in peers {
        if peer == 0 || peer == node_id {
            tracing::warn!(node = node_id, peer, %addr, "ignoring peer: id 0 or this node's own");
            continue;
        }
        if tls {
            if let Err(reason) = server_name(&addr) {
                tracing::warn!(node = node_id, peer, %reason, "ignoring peer: not a TLS server name");
                continue;
            }
        }
        if admitted.len() >= PEERS_MAX {
            over_limit += 1;
            continue;
        }
        admitted.insert(peer, addr);
    }
    if over_limit > 0 {
        tracing::warn!(
            node = node_id,
            refused = over_limit,
            limit = PEERS_MAX,
            "too many peers; refusing those with the highest ids"
        );
    }
    debug_assert!(admitted.len() <= PEERS_MAX);
    debug_assert!(!admitted.contains_key(&node_id) && !admitted.contains_key(&0));
    admitted
}

/// The outbound side of one peer: its address, its queue and the writer task draining it.
/// Dropping the link stops the writer (its queued messages are dropped with it).
struct PeerLink<M> {
    addr: String,
    queue: mpsc::Sender<M>,
    writer: tokio::task::JoinHandle<()>,
}

impl<M> Drop for PeerLink<M> {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

/// A running transport. Dropping it without [`PeerTransport::shutdown`] stops its tasks.
///
/// Shared as `Arc<PeerTransport<M>>` by tasks and threads: [`send`](Self::send) takes a read
/// lock and [`set_peers`](Self::set_peers) a write lock, neither across an `await`.
pub struct PeerTransport<M> {
    config: Arc<TransportConfig>,
    /// The peers messages go to, by id.
    links: RwLock<BTreeMap<NodeId, PeerLink<M>>>,
    /// The ids the listener accepts; readers of a removed id close their connection.
    members: watch::Sender<BTreeSet<NodeId>>,
    /// Where new writers report a peer unreachable.
    events: mpsc::Sender<TransportEvent<M>>,
    /// Where `set_peers` starts writers from any thread.
    runtime: tokio::runtime::Handle,
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    /// The listener.
    tasks: JoinSet<()>,
}

impl<M> PeerTransport<M>
where
    M: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// Binds `listen_addr` and starts the transport.
    pub async fn start(
        config: TransportConfig,
        listen_addr: &str,
    ) -> Result<(PeerTransport<M>, mpsc::Receiver<TransportEvent<M>>), TransportError> {
        config.validate()?;
        let listener =
            TcpListener::bind(listen_addr)
                .await
                .map_err(|source| TransportError::Listen {
                    addr: listen_addr.to_string(),
                    source,
                })?;
        PeerTransport::start_with_listener(config, listener)
    }

    /// Starts the transport on an already bound listener (tests bind port 0 first). Must be
    /// called within a tokio runtime: later [`set_peers`](Self::set_peers) calls start
    /// writers on it.
    pub fn start_with_listener(
        config: TransportConfig,
        listener: TcpListener,
    ) -> Result<(PeerTransport<M>, mpsc::Receiver<TransportEvent<M>>), TransportError> {
        config.validate()?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| TransportError::Listen {
                addr: "bound listener".into(),
                source,
            })?;
        let config = Arc::new(config);
        let (events, events_rx) = mpsc::channel(config.inbound_messages_max);
        let (shutdown, shutdown_rx) = watch::channel(false);
        // The configured peers are members from the first accept on (`set_peers` below only
        // confirms them): a peer dialling in before it must not be refused.
        let initial = admissible_peers(
            config.node_id,
            config.auth.tls.is_some(),
            config.peers.clone(),
        );
        let (members, members_rx) =
            watch::channel(initial.keys().copied().collect::<BTreeSet<_>>());
        let mut tasks = JoinSet::new();
        tasks.spawn(listener::run_listener(
            config.clone(),
            listener,
            events.clone(),
            members_rx,
            shutdown_rx,
        ));
        let transport = PeerTransport {
            config: config.clone(),
            links: RwLock::new(BTreeMap::new()),
            members,
            events,
            runtime: tokio::runtime::Handle::current(),
            local_addr,
            shutdown,
            tasks,
        };
        transport.set_peers(config.peers.clone());
        debug_assert_eq!(
            transport.peers(),
            config.peers,
            "validate() admits every peer"
        );
        tracing::info!(
            node = config.node_id,
            addr = %local_addr,
            peers = ?config.peers,
            secret = config.auth.secret.is_some(),
            tls = config.auth.tls.is_some(),
            "peer transport listening"
        );
        Ok((transport, events_rx))
    }

    /// Replaces the peer set; callable from any thread, returns without waiting for the
    /// network. A new id gets a writer and a queue; an id whose address changed gets a new
    /// writer to the new address (messages queued for the old one are dropped); a missing id's
    /// writer stops, its queued messages are dropped, its handshakes are refused and its open
    /// inbound connections are closed. This node's id, id 0, peers past [`PEERS_MAX`] and
    /// (with TLS) addresses that are not server names are skipped with a warning — as if
    /// absent from `peers`. Per-peer metrics series are added and removed to match.
    pub fn set_peers(&self, peers: BTreeMap<NodeId, String>) {
        let node = self.config.node_id;
        let wanted = admissible_peers(node, self.config.auth.tls.is_some(), peers);
        let mut links = self.links.write().unwrap_or_else(PoisonError::into_inner);
        let metrics = self.config.metrics.as_deref();
        // Series first, so a new member's first connection finds them.
        if let Some(m) = metrics {
            for &peer in wanted.keys().filter(|p| !links.contains_key(p)) {
                m.add_peer(peer);
            }
        }
        // Stop accepting the removed before their writers stop, so they cannot come back in.
        // Readers are woken (to check their peer) only when the set changed.
        let ids: BTreeSet<NodeId> = wanted.keys().copied().collect();
        self.members.send_if_modified(|members| {
            let changed = *members != ids;
            *members = ids;
            changed
        });
        links.retain(|&peer, link| {
            let keep = wanted.get(&peer) == Some(&link.addr);
            if !keep {
                tracing::info!(node, peer, addr = %link.addr, "stopping peer link");
                if let (Some(m), false) = (metrics, wanted.contains_key(&peer)) {
                    m.remove_peer(peer);
                }
            }
            keep
        });
        for (peer, addr) in wanted {
            if let std::collections::btree_map::Entry::Vacant(slot) = links.entry(peer) {
                tracing::info!(node, peer, %addr, "starting peer link");
                slot.insert(self.start_link(peer, addr));
            }
        }
        debug_assert!(links.len() <= PEERS_MAX);
        debug_assert!(links.keys().eq(self.members.borrow().iter()));
    }

    /// Starts the writer of `peer` at `addr` with an empty queue.
    fn start_link(&self, peer: NodeId, addr: String) -> PeerLink<M> {
        debug_assert!(peer != self.config.node_id && peer != 0);
        let (queue, rx) = mpsc::channel(self.config.queue_messages_max);
        let writer = self.runtime.spawn(run_writer(
            self.config.clone(),
            peer,
            addr.clone(),
            rx,
            self.events.clone(),
            self.shutdown.subscribe(),
        ));
        PeerLink {
            addr,
            queue,
            writer,
        }
    }

    /// The current peers and their addresses.
    pub fn peers(&self) -> BTreeMap<NodeId, String> {
        let links = self.links.read().unwrap_or_else(PoisonError::into_inner);
        links
            .iter()
            .map(|(&peer, link)| (peer, link.addr.clone()))
            .collect()
    }

    /// Queues `message` for `to` without waiting.
    pub fn send(&self, to: NodeId, message: M) -> Result<(), SendError> {
        let links = self.links.read().unwrap_or_else(PoisonError::into_inner);
        let link = links.get(&to).ok_or(SendError::UnknownPeer(to))?;
        link.queue.try_send(message).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::QueueFull(to),
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    /// Queues `message` for `to`, waiting (by notification, not polling) while the peer's
    /// queue is full. For bulk transfers that must not drop a piece (snapshot chunks); the
    /// caller bounds the wait. A peer removed meanwhile fails it with `UnknownPeer`; one whose
    /// address changed meanwhile with `Closed`.
    pub async fn send_wait(&self, to: NodeId, message: M) -> Result<(), SendError> {
        let queue = {
            let links = self.links.read().unwrap_or_else(PoisonError::into_inner);
            let link = links.get(&to).ok_or(SendError::UnknownPeer(to))?;
            link.queue.clone()
        };
        queue.send(message).await.map_err(|_| {
            let links = self.links.read().unwrap_or_else(PoisonError::into_inner);
            if links.contains_key(&to) {
                SendError::Closed
            } else {
                SendError::UnknownPeer(to)
            }
        })
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    /// Stops every task and waits for them; queued messages are dropped.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let links = std::mem::take(self.links.get_mut().unwrap_or_else(PoisonError::into_inner));
        for (_, mut link) in links {
            let _ = (&mut link.writer).await;
        }
        while self.tasks.join_next().await.is_some() {}
    }
}

async fn sleep_or_shutdown(ms: u64, shutdown: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(ms)) => false,
        _ = shutdown.changed() => true,
    }
}

/// Dials `peer`, handshakes, and streams its queue; reconnects with backoff.
async fn run_writer<M: Serialize + Send + 'static>(
    config: Arc<TransportConfig>,
    peer: NodeId,
    addr: String,
    mut queue: mpsc::Receiver<M>,
    events: mpsc::Sender<TransportEvent<M>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff_ms = config.reconnect_backoff_min_ms;
    let mut reported_down = false;
    let mut buf = Vec::new();
    let sent_bytes = config
        .metrics
        .as_ref()
        .and_then(|m| m.peer(peer))
        .map(|p| p.sent_bytes.clone());
    loop {
        if *shutdown.borrow() {
            return;
        }
        let stream = match connect(&config, peer, &addr).await {
            Ok(stream) => {
                backoff_ms = config.reconnect_backoff_min_ms;
                tracing::info!(node = config.node_id, peer, %addr, "connected to peer");
                stream
            }
            Err(reason) => {
                if !reported_down {
                    tracing::warn!(node = config.node_id, peer, %addr, %reason, "peer unreachable");
                    let _ = events.try_send(TransportEvent::Unreachable { peer });
                    reported_down = true;
                }
                if sleep_or_shutdown(backoff_ms, &mut shutdown).await {
                    return;
                }
                backoff_ms = backoff_ms
                    .saturating_mul(2)
                    .min(config.reconnect_backoff_max_ms);
                continue;
            }
        };
        // The acceptor never writes after the handshake, so the read half only ever sees the
        // peer going away. Watching it finds a dead or restarted peer at once, instead of at
        // the next write — whose message the kernel would accept and then lose.
        let (mut closed, stream) = tokio::io::split(stream);
        let mut writer = BufWriter::new(stream);
        let mut probe = [0u8; 64];
        let failure = loop {
            let first = tokio::select! {
                m = queue.recv() => m,
                r = closed.read(&mut probe) => {
                    break match r {
                        Ok(0) => std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the peer closed the connection",
                        ),
                        Ok(_) => std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "the peer sent data on a write-only connection",
                        ),
                        Err(e) => e,
                    };
                }
                _ = shutdown.changed() => return,
            };
            let Some(first) = first else {
                return; // the transport was dropped
            };
            buf.clear();
            let mut next = Some(first);
            while let Some(message) = next.take() {
                if let Err(e) = frame::encode_frame(&mut buf, &message, config.frame_bytes_max) {
                    tracing::error!(node = config.node_id, peer, error = %e, "dropping unencodable message");
                }
                if buf.len() < config.write_batch_bytes_max {
                    next = queue.try_recv().ok();
                }
            }
            if let Err(e) = writer.write_all(&buf).await {
                break e;
            }
            if let Err(e) = writer.flush().await {
                break e;
            }
            if let Some(counter) = &sent_bytes {
                counter.inc_by(buf.len() as u64);
            }
        };
        tracing::warn!(node = config.node_id, peer, error = %failure, "peer connection lost; reconnecting");
        let _ = events.try_send(TransportEvent::Unreachable { peer });
        reported_down = true;
    }
}

/// Opens a connection to `peer` (TLS when configured) and runs the dialer's side of the
/// handshake, all within the connect and handshake timeouts.
/// Why a peer connection could not be set up (logged; the link retries with backoff).
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    ServerName(String),
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("handshake: {0}")]
    Handshake(#[from] handshake::HandshakeError),
    #[error("handshake timed out")]
    HandshakeTimeout,
}

/// Opens a connection to `peer` (TLS when configured) and runs the dialer's side of the
/// handshake, all within the connect and handshake timeouts.
async fn connect(config: &TransportConfig, peer: NodeId, addr: &str) -> Result<BoxedIo, LinkError> {
    let connect = tokio::time::timeout(
        Duration::from_millis(config.connect_timeout_ms),
        TcpStream::connect(addr),
    );
    let tcp = connect
        .await
        .map_err(|_| LinkError::ConnectTimeout)?
        .map_err(LinkError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        let mut io: BoxedIo = match &config.auth.tls {
            Some(tls) => {
                let name = server_name(addr).map_err(LinkError::ServerName)?;
                let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
                let stream = connector.connect(name, tcp).await.map_err(LinkError::Tls)?;
                Box::new(stream)
            }
            None => Box::new(tcp),
        };
        handshake::dial(&mut io, config, peer).await?;
        Ok::<_, LinkError>(io)
    };
    tokio::time::timeout(
        Duration::from_millis(config.handshake_timeout_ms),
        handshake,
    )
    .await
    .map_err(|_| LinkError::HandshakeTimeout)?
}

#[cfg(test)]
mod tests;
