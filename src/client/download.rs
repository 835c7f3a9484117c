//! Downloading the whole state as a snapshot file (`GET /snapshot`), for backups.
//!
//! The leader serves it after a linearizable barrier, so it holds every write acknowledged
//! before the request. A follower would forward the request, but a forwarded body is cut off
//! at the node's forward timeout, so the client first finds the leader (`/cluster/status` of
//! every endpoint) and asks it directly; a 503 (no leader, leadership moved) is retried on the
//! next candidate within the retry budget. The body is handed out piece by piece as it arrives,
//! never buffered whole, under a read timeout instead of a total one: a large state takes as
//! long as it takes, a stalled one fails.

use super::{build_http, error_text, percent_decode, Client, ClientError};
use crate::api::http::{CLUSTER_ID_HEADER, SNAPSHOT_INDEX_HEADER, SNAPSHOT_TERM_HEADER};
use axum::body::Bytes;
use std::time::{Duration, Instant};

/// A snapshot file being received from the cluster.
pub struct SnapshotDownload {
    /// The endpoint that answered.
    pub endpoint: String,
    /// The cluster it came from (the node's `--cluster-id`).
    pub cluster_id: String,
    /// The last log index (and its term) it contains.
    pub index: u64,
    pub term: u64,
    /// The file's length, when the node said it.
    pub bytes: Option<u64>,
    response: reqwest::Response,
    received: u64,
}

impl SnapshotDownload {
    /// The next piece of the file; `None` at its end. A broken stream is
    /// [`ClientError::Unavailable`]: nothing was changed, the whole download may be retried.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        match self.response.chunk().await {
            Ok(Some(piece)) => {
                self.received = self.received.saturating_add(piece.len() as u64);
                if self.bytes.is_some_and(|total| self.received > total) {
                    return Err(ClientError::Protocol(format!(
                        "{} sent more than the {} bytes it announced",
                        self.endpoint,
                        self.bytes.unwrap_or(0)
                    )));
                }
                Ok(Some(piece))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(ClientError::Unavailable(format!(
                "the snapshot from {} broke off after {} bytes: {e}",
                self.endpoint, self.received
            ))),
        }
    }

    /// Bytes received so far.
    pub fn received_bytes(&self) -> u64 {
        self.received
    }
}

/// Why one endpoint did not serve the snapshot.
enum Refusal {
    /// Another endpoint, or a later try, may serve it.
    Retry(String),
    /// Retrying will not help (a 4xx, a malformed answer).
    Fatal(ClientError),
}

/// The most bytes of an error answer read (there is no total timeout here).
const ERROR_BODY_BYTES_MAX: usize = 64 << 10;

/// The start of an error answer's body.
pub(super) async fn error_body(mut resp: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_BYTES_MAX {
        match resp.chunk().await {
            Ok(Some(piece)) => body.extend_from_slice(&piece),
            _ => break,
        }
    }
    body.truncate(ERROR_BODY_BYTES_MAX);
    body
}

fn header_u64(resp: &reqwest::Response, name: &str) -> Result<u64, String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no valid {name} header"))
}

impl Client {
    /// Asks the leader for a snapshot file of the whole state and returns it as a stream
    /// (see the module doc). Fails as unavailable when no endpoint answers or no leader served
    /// it within the retry budget.
    pub async fn snapshot(&self) -> Result<SnapshotDownload, ClientError> {
        let read_timeout = Duration::from_millis(self.config.request_timeout_ms);
        let http = build_http(&self.config, move |b| b.read_timeout(read_timeout))?;
        let deadline = Instant::now() + Duration::from_millis(self.config.retry_budget_ms);
        let mut backoff_ms = self.config.backoff_min_ms;
        loop {
            let mut last_error = String::from("no endpoint answered");
            for url in self.snapshot_candidates().await? {
                match fetch(&http, &url).await {
                    Ok(download) => return Ok(download),
                    Err(Refusal::Fatal(e)) => return Err(e),
                    Err(Refusal::Retry(why)) => last_error = why,
                }
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Unavailable(last_error));
            }
            let sleep = Duration::from_millis(backoff_ms)
                .min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(sleep).await;
            backoff_ms = (backoff_ms * 2).min(self.config.backoff_max_ms);
        }
    }

    /// Where to ask, best first: endpoints that say they lead, then the leader's client URL
    /// as the members report it, then every endpoint that answered (they forward). Fails at
    /// once if no endpoint answers at all.
    async fn snapshot_candidates(&self) -> Result<Vec<String>, ClientError> {
        let all = self.status_all().await;
        let mut out: Vec<String> = Vec::new();
        let mut push = |url: &str| {
            let url = url.trim_end_matches('/').to_string();
            if !out.contains(&url) {
                out.push(url);
            }
        };
        for (endpoint, status) in &all {
            if status.as_ref().is_ok_and(|s| s.role == "leader") {
                push(endpoint);
            }
        }
        for (_, status) in &all {
            let leader_url = status
                .as_ref()
                .ok()
                .and_then(|s| s.leader.as_ref()?.client_url.clone());
            if let Some(url) = leader_url {
                push(&url);
            }
        }
        for (endpoint, status) in &all {
            if status.is_ok() {
                push(endpoint);
            }
        }
        if out.is_empty() {
            let why: Vec<String> = all
                .iter()
                .filter_map(|(_, s)| match s {
                    Ok(_) => None,
                    Err(ClientError::Unavailable(why)) => Some(why.clone()),
                    Err(e) => Some(e.to_string()),
                })
                .collect();
            return Err(ClientError::Unavailable(format!(
                "no endpoint answered: {}",
                why.join("; ")
            )));
        }
        Ok(out)
    }
}

/// One request to one node: the response headers checked, the body not yet read.
async fn fetch(http: &reqwest::Client, url: &str) -> Result<SnapshotDownload, Refusal> {
    let resp = http
        .get(format!("{url}/snapshot"))
        .send()
        .await
        .map_err(|e| Refusal::Retry(format!("{url}: {e}")))?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        let message = error_text(&error_body(resp).await);
        return Err(match status {
            500..=599 => Refusal::Retry(format!("{url}: {message}")),
            _ => Refusal::Fatal(ClientError::Rejected { status, message }),
        });
    }
    let malformed = |why: String| Refusal::Fatal(ClientError::Protocol(format!("{url}: {why}")));
    let cluster_id = resp
        .headers()
        .get(CLUSTER_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(percent_decode)
        .ok_or_else(|| malformed(format!("no valid {CLUSTER_ID_HEADER} header")))?;
    raftkv_storage::snapshot::backup::check_cluster_id(&cluster_id).map_err(malformed)?;
    let index = header_u64(&resp, SNAPSHOT_INDEX_HEADER).map_err(malformed)?;
    let term = header_u64(&resp, SNAPSHOT_TERM_HEADER).map_err(malformed)?;
    Ok(SnapshotDownload {
        endpoint: url.to_string(),
        cluster_id,
        index,
        term,
        bytes: resp.content_length(),
        response: resp,
        received: 0,
    })
}
