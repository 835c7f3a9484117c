//! Rejoining with a lost state machine.
//!
//! A node whose sled directory is gone but whose WAL survives still holds what Raft's safety
//! rests on: its term, its vote and every entry it acknowledged. Throwing that away to start
//! fresh could lose a committed entry (this node may be part of the majority holding it) or
//! let it vote twice in a term. What it lacks is only the state below the WAL's first entry,
//! which compaction removed. So instead of refusing to start, it fetches a snapshot of the
//! cluster's state from the leader (`GET /snapshot`, taken after a linearizable barrier, so
//! it covers everything committed before this node stopped), stores it verified in `snap/`,
//! and opens normally: recovery restores that snapshot and keeps the WAL's log and votes.
//! A diverging uncommitted WAL suffix is reset by recovery itself (see `NodeStorage::open`).

use super::{NodeConfig, NodeError};
use bytes_channel::ChannelReader;
use raftkv_storage::snapshot::{SnapshotOptions, SnapshotStore};
use raftkv_storage::vfs::StdFs;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a rejoining node keeps asking the other members for a snapshot before it gives
/// up and exits (a supervisor restarts it; its data dir is unchanged).
pub const REJOIN_TIMEOUT_MS: u64 = 120_000;
/// The largest snapshot accepted from the cluster.
pub const SNAPSHOT_BYTES_MAX: u64 = 64 << 30;

/// Fetches a snapshot at `needed_index` or later from the other members' client URLs and
/// stores it in the data dir's `snap/`. Tries every member in id order, round after round.
pub async fn fetch_snapshot(config: &NodeConfig, needed_index: u64) -> Result<(), NodeError> {
    let urls: Vec<(u64, String)> = config
        .peer_client_urls
        .iter()
        .map(|(id, url)| (*id, url.trim_end_matches('/').to_string()))
        .collect();
    if urls.is_empty() {
        return Err(NodeError::Config(
            "the state machine is lost and no --peer-client-urls are configured to fetch a snapshot from".into(),
        ));
    }
    let http = http_client(config)?;
    let deadline = Instant::now() + Duration::from_millis(REJOIN_TIMEOUT_MS);
    let mut last_error = String::new();
    while Instant::now() < deadline {
        for (id, url) in &urls {
            match fetch_from(config, &http, url, needed_index).await {
                Ok(index) => {
                    tracing::info!(
                        from = id,
                        index,
                        needed_index,
                        "stored a snapshot from the cluster; rejoining"
                    );
                    return Ok(());
                }
                Err(why) => {
                    tracing::info!(from = id, %why, "no snapshot from this member");
                    last_error = format!("node {id}: {why}");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(NodeError::Stopped(format!(
        "could not fetch a snapshot at index {needed_index} or later within {REJOIN_TIMEOUT_MS} ms (last: {last_error})"
    )))
}

/// A client for the other members' client ports: their CA (`--client-ca`) for https URLs —
/// without it the system's CAs, or none where the system has none (a scratch container) —
/// and the cluster's bearer token (`--auth-token-file`) on every request.
pub(super) fn http_client(config: &NodeConfig) -> Result<reqwest::Client, NodeError> {
    crate::tls::ensure_provider();
    let settings = &config.client_port;
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(path) = &settings.auth_token_file {
        let token = crate::api::auth::AuthToken::from_file(path)
            .map_err(|e| NodeError::Config(e.to_string()))?;
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|e| NodeError::Config(format!("auth token: {e}")))?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let configure = |b: reqwest::ClientBuilder| {
        b.connect_timeout(Duration::from_secs(2))
            .read_timeout(Duration::from_secs(30))
            .default_headers(headers.clone())
    };
    crate::tls::http_client(settings.forward_ca.as_deref(), configure)
        .map_err(|e| NodeError::Config(format!("http client: {e}")))
}

/// Why one member gave no usable snapshot.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("request: {0}")]
    Request(#[from] reqwest::Error),
    #[error("answered {0}")]
    Status(reqwest::StatusCode),
    #[error("storing the snapshot: {0}")]
    Store(#[from] raftkv_storage::snapshot::SnapshotError),
    #[error("the storing task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("its snapshot is at index {index}, below the {needed_index} needed")]
    TooOld { index: u64, needed_index: u64 },
}

/// One attempt against one member: only its leader answers (the request is marked as
/// already forwarded, so a follower refuses instead of proxying gigabytes).
async fn fetch_from(
    config: &NodeConfig,
    http: &reqwest::Client,
    url: &str,
    needed_index: u64,
) -> Result<u64, FetchError> {
    let mut response = http
        .get(format!("{url}/snapshot"))
        .header(crate::api::http::FORWARDED_BY_HEADER, config.id.to_string())
        .send()
        .await?;
    if !response.status().is_success() {
        return Err(FetchError::Status(response.status()));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let data_dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || {
        let store = SnapshotStore::open(Arc::new(StdFs), &data_dir, SnapshotOptions::default())?;
        store.receive(&mut ChannelReader::new(rx), SNAPSHOT_BYTES_MAX)
    });
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if tx.send(Ok(chunk)).await.is_err() {
                    break; // the store stopped reading: it says why below
                }
            }
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                break;
            }
        }
    }
    drop(tx);
    let stored = store.await??;
    if stored.meta.index < needed_index {
        return Err(FetchError::TooOld {
            index: stored.meta.index,
            needed_index,
        });
    }
    Ok(stored.meta.index)
}

mod bytes_channel {
    //! A blocking `Read` over chunks sent from async code.
    use axum::body::Bytes;
    use tokio::sync::mpsc;

    pub struct ChannelReader {
        rx: mpsc::Receiver<std::io::Result<Bytes>>,
        current: Bytes,
    }

    impl ChannelReader {
        pub fn new(rx: mpsc::Receiver<std::io::Result<Bytes>>) -> ChannelReader {
            ChannelReader {
                rx,
                current: Bytes::new(),
            }
        }
    }

    impl std::io::Read for ChannelReader {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            while self.current.is_empty() {
                match self.rx.blocking_recv() {
                    Some(Ok(chunk)) => self.current = chunk,
                    Some(Err(e)) => return Err(e),
                    None => return Ok(0),
                }
            }
            let n = out.len().min(self.current.len());
            out[..n].copy_from_slice(&self.current[..n]);
            let _ = self.current.split_to(n);
            Ok(n)
        }
    }
}
