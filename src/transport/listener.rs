//! The accepting side of the transport: the accept loop and one reader per inbound connection.
//!
//! Why it is careful: this is the part anyone on the network can reach. An inbound connection
//! holds one of `pending_handshakes_max` permits from accept until it is authenticated (or
//! `handshake_timeout_ms` passes); when none is free the connection is closed at once, so
//! idle strangers cannot hold more than that many sockets and tasks. Until authenticated it
//! can make the reader allocate `handshake_bytes_max` at most. `accept` failing for lack of
//! file descriptors or memory is retried with exponential backoff and logged once per
//! episode; a spinning accept loop would burn a core and flood the log.
//!
//! Who may connect is the transport's current member set (a `watch` that `set_peers` writes):
//! the handshake checks it, and each reader watches it and closes its connection when its
//! peer is removed.

use super::{handshake, sleep_or_shutdown, BoxedIo, FrameError, TransportConfig, TransportEvent};
use raftkv_types::NodeId;
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// Exponential backoff for `accept` failures, with one log line per episode.
#[derive(Debug)]
pub(super) struct AcceptBackoff {
    min_ms: u64,
    max_ms: u64,
    /// The wait after the next failure; `None` outside an episode.
    next_ms: Option<u64>,
    /// Failures in the current episode.
    failures: u64,
}

impl AcceptBackoff {
    pub(super) fn new(min_ms: u64, max_ms: u64) -> AcceptBackoff {
        assert!(
            min_ms > 0 && min_ms <= max_ms,
            "accept backoff {min_ms}..{max_ms} ms"
        );
        AcceptBackoff {
            min_ms,
            max_ms,
            next_ms: None,
            failures: 0,
        }
    }

    /// A failed accept: how long to wait, and whether it starts an episode (to be logged).
    pub(super) fn failed(&mut self) -> (u64, bool) {
        let starts = self.next_ms.is_none();
        let wait_ms = self.next_ms.unwrap_or(self.min_ms);
        self.next_ms = Some(wait_ms.saturating_mul(2).min(self.max_ms));
        self.failures = self.failures.saturating_add(1);
        (wait_ms, starts)
    }

    /// A successful accept: the number of failures of the episode it ends, if one did.
    pub(super) fn succeeded(&mut self) -> Option<u64> {
        self.next_ms.take()?;
        Some(std::mem::take(&mut self.failures))
    }
}

/// Errors of one connection that the listener skips at once (the next accept is unaffected).
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}

/// Counts connections closed because every handshake permit was taken, for one log line per
/// episode.
#[derive(Debug, Default)]
struct Overflow {
    closed: u64,
}

pub(super) async fn run_listener<M: DeserializeOwned + Send + 'static>(
    config: Arc<TransportConfig>,
    listener: TcpListener,
    events: mpsc::Sender<TransportEvent<M>>,
    members: watch::Receiver<BTreeSet<NodeId>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let node = config.node_id;
    let permits = Arc::new(Semaphore::new(config.pending_handshakes_max));
    let mut backoff =
        AcceptBackoff::new(config.accept_backoff_min_ms, config.accept_backoff_max_ms);
    let mut overflow = Overflow::default();
    let mut readers = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        // Reap finished readers so the set stays bounded by live connections.
        while readers.try_join_next().is_some() {}
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_per_connection(&e) => {
                tracing::debug!(node, error = %e, "accept: connection failed");
                continue;
            }
            Err(e) => {
                let (wait_ms, starts) = backoff.failed();
                if starts {
                    tracing::warn!(node, error = %e, "accept failing (out of file descriptors or memory?); backing off");
                }
                if sleep_or_shutdown(wait_ms, &mut shutdown).await {
                    break;
                }
                continue;
            }
        };
        if let Some(failures) = backoff.succeeded() {
            tracing::info!(node, failures, "accept works again");
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if overflow.closed == 0 {
                tracing::warn!(node, %remote, limit = config.pending_handshakes_max, "too many connections in their handshake; closing new ones");
            }
            overflow.closed = overflow.closed.saturating_add(1);
            drop(stream);
            continue;
        };
        if overflow.closed > 0 {
            tracing::info!(node, closed = overflow.closed, "handshake slots free again");
            overflow.closed = 0;
        }
        let _ = stream.set_nodelay(true);
        // Any membership change from now on makes the reader check its peer again.
        let mut members = members.clone();
        members.mark_unchanged();
        readers.spawn(run_reader(
            config.clone(),
            stream,
            remote,
            permit,
            events.clone(),
            members,
            shutdown.clone(),
        ));
    }
    readers.shutdown().await;
}

/// TLS (when configured), then the handshake; the authenticated peer's id and stream.
async fn authenticate(
    config: &TransportConfig,
    stream: TcpStream,
    members: &watch::Receiver<BTreeSet<NodeId>>,
) -> Result<(BoxedIo, u64), super::LinkError> {
    let mut io: BoxedIo = match &config.auth.tls {
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
            let tls_stream = acceptor
                .accept(stream)
                .await
                .map_err(super::LinkError::Tls)?;
            Box::new(tls_stream)
        }
        None => Box::new(stream),
    };
    let from = handshake::accept(&mut io, config, |id| members.borrow().contains(&id)).await?;
    Ok((io, from))
}

async fn run_reader<M: DeserializeOwned + Send + 'static>(
    config: Arc<TransportConfig>,
    stream: TcpStream,
    remote: SocketAddr,
    permit: OwnedSemaphorePermit,
    events: mpsc::Sender<TransportEvent<M>>,
    mut members: watch::Receiver<BTreeSet<NodeId>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let node = config.node_id;
    let authenticated = tokio::time::timeout(
        Duration::from_millis(config.handshake_timeout_ms),
        authenticate(&config, stream, &members),
    )
    .await;
    let (io, from) = match authenticated {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(reason)) => {
            tracing::warn!(node, %remote, %reason, "refused peer connection");
            return;
        }
        Err(_) => {
            tracing::warn!(node, %remote, "peer handshake timed out; closing");
            return;
        }
    };
    drop(permit);
    tracing::debug!(node, peer = from, %remote, "peer authenticated");
    let mut stream = BufReader::new(io);
    let received_bytes = config
        .metrics
        .as_ref()
        .and_then(|m| m.peer(from))
        .map(|p| p.received_bytes.clone());
    loop {
        let Some(next) =
            next_frame::<M, _>(&mut stream, &config, from, &mut members, &mut shutdown).await
        else {
            return;
        };
        match next {
            Ok((message, frame_bytes)) => {
                if let Some(counter) = &received_bytes {
                    counter.inc_by(frame_bytes as u64);
                }
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
                tracing::info!(node, peer = from, "peer closed its connection");
                let _ = events.try_send(TransportEvent::Unreachable { peer: from });
                return;
            }
            Err(e) => {
                tracing::warn!(node, peer = from, error = %e, "bad frame from peer; closing connection");
                let _ = events.try_send(TransportEvent::Unreachable { peer: from });
                return;
            }
        }
    }
}

/// The next frame from `from`; `None` when the reader must stop because the transport shuts
/// down or `from` is no longer a member. A membership change that keeps `from` does not
/// cancel a frame read half-way (that would lose the stream's framing).
async fn next_frame<M: DeserializeOwned, R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    config: &TransportConfig,
    from: NodeId,
    members: &mut watch::Receiver<BTreeSet<NodeId>>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Result<(M, usize), FrameError>> {
    let read = super::frame::read_frame_sized::<_, M>(stream, config.frame_bytes_max);
    tokio::pin!(read);
    loop {
        // Biased: once `from` is removed, no frame of its is delivered at the next poll.
        tokio::select! {
            biased;
            _ = shutdown.changed() => return None,
            changed = members.changed() => {
                if changed.is_err() || !members.borrow_and_update().contains(&from) {
                    tracing::info!(node = config.node_id, peer = from, "peer is no longer a member; closing its connection");
                    return None;
                }
            }
            f = &mut read => return Some(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_backoff_doubles_to_its_cap_and_logs_once_per_episode() {
        let mut b = AcceptBackoff::new(10, 1000);
        assert_eq!(b.succeeded(), None, "no episode yet");
        let waits: Vec<(u64, bool)> = (0..9).map(|_| b.failed()).collect();
        assert_eq!(
            waits,
            vec![
                (10, true),
                (20, false),
                (40, false),
                (80, false),
                (160, false),
                (320, false),
                (640, false),
                (1000, false),
                (1000, false),
            ]
        );
        assert_eq!(b.succeeded(), Some(9));
        assert_eq!(b.succeeded(), None);
        assert_eq!(
            b.failed(),
            (10, true),
            "a new episode starts from the minimum"
        );
    }

    #[test]
    fn descriptor_exhaustion_backs_off_but_a_reset_does_not() {
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        let enfile = std::io::Error::from_raw_os_error(libc::ENFILE);
        let aborted = std::io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert!(!is_per_connection(&emfile));
        assert!(!is_per_connection(&enfile));
        assert!(is_per_connection(&aborted));
    }
}
