//! The peer transport: persistent TCP connections between cluster members.
//!
//! Shape, and why:
//! - **One outbound connection per peer**, owned by a writer task that drains a bounded queue.
//!   Raft tolerates lost messages, not unbounded memory: when a peer is slow or dead its queue
//!   fills and [`PeerTransport::send`] fails at once with [`SendError::QueueFull`], which the
//!   node reports to the consensus core as "peer unreachable".
//! - The writer also watches its connection's read half: the acceptor never writes after the
//!   handshake, so EOF there means the peer died or restarted, and the writer reconnects
//!   before the next message would be written into a dead socket and lost.
//! - **Inbound connections only read.** Each one starts with a handshake carrying the cluster
//!   id, both node ids and the dialer's client URL; a dialer from another cluster, with an
//!   unknown id, or addressing another node is refused (and logged) before any message is
//!   accepted. Inbound messages go to one bounded channel; when the node falls behind, reading
//!   stops and TCP flow control pushes back on the sender.
//! - **Reconnect with exponential backoff** (`reconnect_backoff_min_ms` doubling to `_max_ms`).
//!   Messages queued while disconnected wait (bounded); a connection error is reported once per
//!   outage as [`TransportEvent::Unreachable`], and so is an inbound connection the peer
//!   closed (a dead peer's kernel closes it at once: a follower learns its leader died
//!   without waiting for an election timeout).
//! - The writer batches: after one message it writes whatever else is queued (up to
//!   `write_batch_bytes_max`) before one flush, so a burst costs one syscall.
//!
//! The transport is generic over the message type: the node sends Raft messages and snapshot
//! chunks through it; tests send strings.

pub mod frame;

use frame::{read_frame, write_frame, FrameError};
use raftkv_storage::NodeId;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// The handshake protocol version; bumped on any incompatible change of the peer protocol.
pub const PROTOCOL_VERSION: u32 = 1;

/// Settings of the transport.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Identifies the cluster; peers of another cluster are refused.
    pub cluster_id: String,
    pub node_id: NodeId,
    /// This node's client (HTTP) URL, announced to peers so they can point clients at it.
    pub client_url: String,
    /// The other members' peer addresses (`host:port`), by id.
    pub peers: BTreeMap<NodeId, String>,
    /// Messages queued per peer before `send` fails with `QueueFull`.
    pub queue_messages_max: usize,
    /// Inbound messages buffered for the node before readers stop reading.
    pub inbound_messages_max: usize,
    /// The largest frame accepted or sent.
    pub frame_bytes_max: u32,
    /// Bytes written before a flush when messages are queued back to back.
    pub write_batch_bytes_max: usize,
    pub connect_timeout_ms: u64,
    pub handshake_timeout_ms: u64,
    pub reconnect_backoff_min_ms: u64,
    pub reconnect_backoff_max_ms: u64,
}

impl TransportConfig {
    /// A configuration with default limits.
    pub fn new(
        cluster_id: impl Into<String>,
        node_id: NodeId,
        client_url: impl Into<String>,
        peers: BTreeMap<NodeId, String>,
    ) -> TransportConfig {
        TransportConfig {
            cluster_id: cluster_id.into(),
            node_id,
            client_url: client_url.into(),
            peers,
            queue_messages_max: 4096,
            inbound_messages_max: 4096,
            frame_bytes_max: 16 << 20,
            write_batch_bytes_max: 1 << 20,
            connect_timeout_ms: 1000,
            handshake_timeout_ms: 2000,
            reconnect_backoff_min_ms: 50,
            reconnect_backoff_max_ms: 2000,
        }
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

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    version: u32,
    cluster_id: String,
    from: NodeId,
    to: NodeId,
    client_url: String,
}

#[derive(Debug, Serialize, Deserialize)]
enum HelloReply {
    Accepted { client_url: String },
    Refused { reason: String },
}

/// Client URLs that peers announced in handshakes, by node id.
type ClientUrls = Arc<Mutex<BTreeMap<NodeId, String>>>;

/// A running transport. Dropping it without [`PeerTransport::shutdown`] stops its tasks.
pub struct PeerTransport<M> {
    node_id: NodeId,
    queues: BTreeMap<NodeId, mpsc::Sender<M>>,
    client_urls: ClientUrls,
    local_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
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
        let listener =
            TcpListener::bind(listen_addr)
                .await
                .map_err(|source| TransportError::Listen {
                    addr: listen_addr.to_string(),
                    source,
                })?;
        PeerTransport::start_with_listener(config, listener)
    }

    /// Starts the transport on an already bound listener (tests bind port 0 first).
    pub fn start_with_listener(
        config: TransportConfig,
        listener: TcpListener,
    ) -> Result<(PeerTransport<M>, mpsc::Receiver<TransportEvent<M>>), TransportError> {
        if config.peers.contains_key(&config.node_id) {
            return Err(TransportError::Config(format!(
                "node {} lists itself as a peer",
                config.node_id
            )));
        }
        if config.node_id == 0 || config.peers.contains_key(&0) {
            return Err(TransportError::Config("node id 0 is reserved".into()));
        }
        if config.queue_messages_max == 0 || config.inbound_messages_max == 0 {
            return Err(TransportError::Config(
                "queue limits must be positive".into(),
            ));
        }
        let local_addr = listener
            .local_addr()
            .map_err(|source| TransportError::Listen {
                addr: "bound listener".into(),
                source,
            })?;
        let config = Arc::new(config);
        let (events_tx, events_rx) = mpsc::channel(config.inbound_messages_max);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let client_urls: ClientUrls = Arc::default();
        let mut tasks = JoinSet::new();
        let mut queues = BTreeMap::new();
        for (&peer, addr) in &config.peers {
            let (tx, rx) = mpsc::channel(config.queue_messages_max);
            queues.insert(peer, tx);
            tasks.spawn(run_writer(
                config.clone(),
                peer,
                addr.clone(),
                rx,
                events_tx.clone(),
                client_urls.clone(),
                shutdown_rx.clone(),
            ));
        }
        tasks.spawn(run_listener(
            config.clone(),
            listener,
            events_tx,
            client_urls.clone(),
            shutdown_rx,
        ));
        tracing::info!(node = config.node_id, addr = %local_addr, peers = ?config.peers, "peer transport listening");
        Ok((
            PeerTransport {
                node_id: config.node_id,
                queues,
                client_urls,
                local_addr,
                shutdown,
                tasks,
            },
            events_rx,
        ))
    }

    /// Queues `message` for `to` without waiting.
    pub fn send(&self, to: NodeId, message: M) -> Result<(), SendError> {
        let queue = self.queues.get(&to).ok_or(SendError::UnknownPeer(to))?;
        queue.try_send(message).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::QueueFull(to),
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    /// The client URL `peer` announced, once it has connected to us or we to it.
    pub fn peer_client_url(&self, peer: NodeId) -> Option<String> {
        lock(&self.client_urls).get(&peer).cloned()
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Stops every task and waits for them; queued messages are dropped.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
    client_urls: ClientUrls,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff_ms = config.reconnect_backoff_min_ms;
    let mut reported_down = false;
    let mut buf = Vec::new();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let stream = match connect(&config, peer, &addr).await {
            Ok((stream, peer_url)) => {
                lock(&client_urls).insert(peer, peer_url);
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
                backoff_ms = (backoff_ms * 2).min(config.reconnect_backoff_max_ms);
                continue;
            }
        };
        // The acceptor never writes after the handshake, so the read half only ever sees the
        // peer going away. Watching it finds a dead or restarted peer at once, instead of at
        // the next write — whose message the kernel would accept and then lose.
        let (mut closed, stream) = stream.into_split();
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
        };
        tracing::warn!(node = config.node_id, peer, error = %failure, "peer connection lost; reconnecting");
        let _ = events.try_send(TransportEvent::Unreachable { peer });
        reported_down = true;
    }
}

/// Opens a connection to `peer` and runs the dialer's side of the handshake.
async fn connect(
    config: &TransportConfig,
    peer: NodeId,
    addr: &str,
) -> Result<(TcpStream, String), String> {
    let connect = tokio::time::timeout(
        Duration::from_millis(config.connect_timeout_ms),
        TcpStream::connect(addr),
    );
    let mut stream = connect
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let hello = Hello {
        version: PROTOCOL_VERSION,
        cluster_id: config.cluster_id.clone(),
        from: config.node_id,
        to: peer,
        client_url: config.client_url.clone(),
    };
    let handshake = async {
        write_frame(&mut stream, &hello, config.frame_bytes_max).await?;
        read_frame::<_, HelloReply>(&mut stream, config.frame_bytes_max).await
    };
    let reply = tokio::time::timeout(
        Duration::from_millis(config.handshake_timeout_ms),
        handshake,
    )
    .await
    .map_err(|_| "handshake timed out".to_string())?
    .map_err(|e| format!("handshake: {e}"))?;
    match reply {
        HelloReply::Accepted { client_url } => Ok((stream, client_url)),
        HelloReply::Refused { reason } => Err(format!("refused by peer: {reason}")),
    }
}

async fn run_listener<M: DeserializeOwned + Send + 'static>(
    config: Arc<TransportConfig>,
    listener: TcpListener,
    events: mpsc::Sender<TransportEvent<M>>,
    client_urls: ClientUrls,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut readers = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        // Reap finished readers so the set stays bounded by live connections.
        while readers.try_join_next().is_some() {}
        match accepted {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                readers.spawn(run_reader(
                    config.clone(),
                    stream,
                    remote,
                    events.clone(),
                    client_urls.clone(),
                    shutdown.clone(),
                ));
            }
            Err(e) => {
                tracing::warn!(node = config.node_id, error = %e, "accept failed");
                if sleep_or_shutdown(50, &mut shutdown).await {
                    break;
                }
            }
        }
    }
    readers.shutdown().await;
}

/// Checks a dialer's handshake; `Err` is the reason it is refused.
fn check_hello(config: &TransportConfig, hello: &Hello) -> Result<(), String> {
    if hello.version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} is not {PROTOCOL_VERSION}",
            hello.version
        ));
    }
    if hello.cluster_id != config.cluster_id {
        return Err(format!(
            "cluster id {:?} is not {:?}",
            hello.cluster_id, config.cluster_id
        ));
    }
    if hello.to != config.node_id {
        return Err(format!(
            "addressed to node {}, this is node {}",
            hello.to, config.node_id
        ));
    }
    if !config.peers.contains_key(&hello.from) {
        return Err(format!("node {} is not a member", hello.from));
    }
    Ok(())
}

async fn run_reader<M: DeserializeOwned + Send + 'static>(
    config: Arc<TransportConfig>,
    stream: TcpStream,
    remote: SocketAddr,
    events: mpsc::Sender<TransportEvent<M>>,
    client_urls: ClientUrls,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut stream = BufReader::new(stream);
    let hello = tokio::time::timeout(
        Duration::from_millis(config.handshake_timeout_ms),
        read_frame::<_, Hello>(&mut stream, config.frame_bytes_max),
    )
    .await;
    let hello = match hello {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => {
            tracing::warn!(node = config.node_id, %remote, error = %e, "bad handshake; closing");
            return;
        }
        Err(_) => {
            tracing::warn!(node = config.node_id, %remote, "handshake timed out; closing");
            return;
        }
    };
    if let Err(reason) = check_hello(&config, &hello) {
        tracing::warn!(node = config.node_id, %remote, from = hello.from, %reason, "refused peer connection");
        let reply = HelloReply::Refused { reason };
        let _ = write_frame(stream.get_mut(), &reply, config.frame_bytes_max).await;
        return;
    }
    let reply = HelloReply::Accepted {
        client_url: config.client_url.clone(),
    };
    if write_frame(stream.get_mut(), &reply, config.frame_bytes_max)
        .await
        .is_err()
    {
        return;
    }
    let from = hello.from;
    lock(&client_urls).insert(from, hello.client_url);
    loop {
        let next = tokio::select! {
            f = read_frame::<_, M>(&mut stream, config.frame_bytes_max) => f,
            _ = shutdown.changed() => return,
        };
        match next {
            Ok(message) => {
                if events
                    .send(TransportEvent::Message { from, message })
                    .await
                    .is_err()
                {
                    return; // the node is gone
                }
            }
            Err(FrameError::Closed) => {
                // The peer closed its side: its process stopped or died (the kernel closes a
                // killed process's sockets at once), or it is replacing the connection.
                // Either way the node should know now rather than after a timeout.
                tracing::info!(
                    node = config.node_id,
                    peer = from,
                    "peer closed its connection"
                );
                let _ = events.try_send(TransportEvent::Unreachable { peer: from });
                return;
            }
            Err(e) => {
                tracing::warn!(node = config.node_id, peer = from, error = %e, "bad frame from peer; closing connection");
                let _ = events.try_send(TransportEvent::Unreachable { peer: from });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
