//! The Rust client: talks HTTP/JSON to any node and finds the leader on its own.
//!
//! Behaviour, and why:
//! - **Endpoint list, leader cached.** Requests go to the cached leader first, then round the
//!   list. Nodes forward to their leader, so any node works; a successful answer that was not
//!   forwarded marks its node as the leader, and a forwarded one carries the leader's client
//!   URL (`x-raftkv-leader-url`), cached if it is one of the client's endpoints.
//! - **Retries where they are safe.** A refused connection (nothing was sent) or a 503 moves on
//!   to the next endpoint, with exponential backoff after each full round, until the retry
//!   budget runs out ([`ClientError::Unavailable`]).
//! - **Never a blind write retry.** A write that got 504, or whose connection failed after the
//!   request was sent, or that met a node-side 500, returns [`ClientError::OutcomeUnknown`]: the
//!   write may or may not be applied, and only the caller knows whether repeating it is safe.
//!   Reads are idempotent and are retried in those cases.

use crate::api::http::{FORWARDED_TO_HEADER, LEADER_URL_HEADER};
use crate::api::types::*;
use crate::api::Consistency;
use raftkv_storage::NodeId;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The endpoints the CLI uses when none are given.
pub const DEFAULT_ENDPOINTS: &str =
    "http://127.0.0.1:8001,http://127.0.0.1:8002,http://127.0.0.1:8003";

/// Settings of a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub endpoints: Vec<String>,
    /// Time allowed for one HTTP request.
    pub request_timeout_ms: u64,
    /// Total time spent retrying one operation before giving up.
    pub retry_budget_ms: u64,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
}

impl ClientConfig {
    /// Default timeouts over `endpoints`.
    pub fn new(endpoints: Vec<String>) -> ClientConfig {
        ClientConfig {
            endpoints,
            request_timeout_ms: 10_000,
            retry_budget_ms: 15_000,
            backoff_min_ms: 50,
            backoff_max_ms: 1000,
        }
    }

    /// Parses a comma-separated endpoint list (`http://host:port,...`).
    pub fn parse_endpoints(list: &str) -> Result<Vec<String>, ClientError> {
        let endpoints: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches('/').to_string())
            .collect();
        if endpoints.is_empty() {
            return Err(ClientError::Config("no endpoints given".into()));
        }
        for e in &endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(ClientError::Config(format!(
                    "endpoint {e:?} must start with http:// or https://"
                )));
            }
        }
        Ok(endpoints)
    }
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The write may or may not have been applied.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// No node could serve the request within the retry budget.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// The request was refused (4xx): retrying will not help.
    #[error("rejected ({status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// A node answered something that is not the API's JSON.
    #[error("unexpected response: {0}")]
    Protocol(String),
}

impl ClientError {
    /// True if a retry by the caller could succeed (not a rejection or bad configuration).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Unavailable(_))
    }
}

/// A raftkv client. Cheap to share: wrap it in an `Arc`, or clone the `ClientConfig`.
pub struct Client {
    http: reqwest::Client,
    config: ClientConfig,
    /// Index into `config.endpoints` of the node believed to lead.
    leader: Mutex<Option<usize>>,
}

enum Attempt {
    Done(u16, Vec<u8>),
    /// Safe to try another endpoint (nothing applied).
    Retry(String),
    /// The request may have been applied.
    Unknown(String),
}

impl Client {
    /// A client over `config.endpoints`.
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        if config.endpoints.is_empty() {
            return Err(ClientError::Config("no endpoints given".into()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .connect_timeout(Duration::from_millis(config.request_timeout_ms.min(2000)))
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        Ok(Client {
            http,
            config,
            leader: Mutex::new(None),
        })
    }

    /// The endpoint currently believed to lead, if any.
    pub fn cached_leader(&self) -> Option<String> {
        let leader = *lock(&self.leader);
        leader.map(|i| self.config.endpoints[i].clone())
    }

    /// The endpoints this client uses.
    pub fn endpoints(&self) -> &[String] {
        &self.config.endpoints
    }

    /// Writes `key` = `value`; returns once committed and applied.
    pub async fn put(&self, key: &str, value: &str) -> Result<KvResponse, ClientError> {
        let body = serde_json::to_vec(&PutBody {
            value: value.to_string(),
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let (status, bytes) = self
            .request(reqwest::Method::PUT, &key_path(key), Some(body), true)
            .await?;
        expect_json(status, &bytes)
    }

    /// Reads `key`; `Ok(None)` if it does not exist.
    pub async fn get(
        &self,
        key: &str,
        consistency: Consistency,
    ) -> Result<Option<KvResponse>, ClientError> {
        let path = format!("{}?consistency={}", key_path(key), consistency.as_str());
        let (status, bytes) = self
            .request(reqwest::Method::GET, &path, None, false)
            .await?;
        if status == 404 {
            return Ok(None);
        }
        expect_json(status, &bytes).map(Some)
    }

    /// Deletes `key`; returns once committed and applied.
    pub async fn delete(&self, key: &str) -> Result<DeleteResponse, ClientError> {
        let (status, bytes) = self
            .request(reqwest::Method::DELETE, &key_path(key), None, true)
            .await?;
        expect_json(status, &bytes)
    }

    /// Lists keys starting with `prefix`, in order.
    pub async fn list(
        &self,
        prefix: &str,
        limit: usize,
        consistency: Consistency,
    ) -> Result<ListResponse, ClientError> {
        let path = format!(
            "/kv?prefix={}&limit={limit}&consistency={}",
            percent_encode(prefix),
            consistency.as_str()
        );
        let (status, bytes) = self
            .request(reqwest::Method::GET, &path, None, false)
            .await?;
        expect_json(status, &bytes)
    }

    /// Asks the cluster to move leadership to `to`.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), ClientError> {
        let body = serde_json::to_vec(&TransferBody { to })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let (status, bytes) = self
            .request(
                reqwest::Method::POST,
                "/cluster/transfer-leader",
                Some(body),
                false,
            )
            .await?;
        expect_json::<serde_json::Value>(status, &bytes).map(|_| ())
    }

    /// One node's status (no retries, no forwarding).
    pub async fn status_of(&self, endpoint: &str) -> Result<ClusterStatus, ClientError> {
        let url = format!("{}/cluster/status", endpoint.trim_end_matches('/'));
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| ClientError::Unavailable(format!("{endpoint}: {e}")))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Unavailable(format!("{endpoint}: {e}")))?;
        expect_json(status, &bytes)
    }

    /// Every endpoint's status, in endpoint order.
    pub async fn status_all(&self) -> Vec<(String, Result<ClusterStatus, ClientError>)> {
        let mut out = Vec::with_capacity(self.config.endpoints.len());
        for e in &self.config.endpoints {
            out.push((e.clone(), self.status_of(e).await));
        }
        out
    }

    /// Sends one request with leader discovery and safe retries.
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        is_write: bool,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let deadline = Instant::now() + Duration::from_millis(self.config.retry_budget_ms);
        let n = self.config.endpoints.len();
        let mut backoff_ms = self.config.backoff_min_ms;
        let mut last_error = String::from("no attempt made");
        let mut round = 0usize;
        loop {
            let start = (*lock(&self.leader)).unwrap_or(round % n);
            for step in 0..n {
                let i = (start + step) % n;
                match self.attempt(i, &method, path, body.clone(), is_write).await {
                    Attempt::Done(status, bytes) => return Ok((status, bytes)),
                    Attempt::Unknown(why) => return Err(ClientError::OutcomeUnknown(why)),
                    Attempt::Retry(why) => {
                        // A node that could not serve is not the leader.
                        let mut leader = lock(&self.leader);
                        if *leader == Some(i) {
                            *leader = None;
                        }
                        last_error = why;
                    }
                }
                if Instant::now() >= deadline {
                    return Err(ClientError::Unavailable(last_error));
                }
            }
            round += 1;
            let sleep = Duration::from_millis(backoff_ms)
                .min(deadline.saturating_duration_since(Instant::now()));
            if sleep.is_zero() {
                return Err(ClientError::Unavailable(last_error));
            }
            tokio::time::sleep(sleep).await;
            backoff_ms = (backoff_ms * 2).min(self.config.backoff_max_ms);
        }
    }

    async fn attempt(
        &self,
        i: usize,
        method: &reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        is_write: bool,
    ) -> Attempt {
        let endpoint = &self.config.endpoints[i];
        let mut req = self
            .http
            .request(method.clone(), format!("{endpoint}{path}"));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Attempt::Retry(format!("{endpoint}: {e}")),
            Err(e) if is_write => {
                return Attempt::Unknown(format!(
                    "{endpoint}: the request was sent but failed: {e}"
                ))
            }
            Err(e) => return Attempt::Retry(format!("{endpoint}: {e}")),
        };
        let status = resp.status().as_u16();
        let forwarded = resp.headers().contains_key(FORWARDED_TO_HEADER);
        let leader_url = resp
            .headers()
            .get(LEADER_URL_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.trim_end_matches('/').to_string());
        let bytes = match resp.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) if is_write => {
                return Attempt::Unknown(format!("{endpoint}: the answer was cut off: {e}"))
            }
            Err(e) => return Attempt::Retry(format!("{endpoint}: {e}")),
        };
        match status {
            503 => Attempt::Retry(format!("{endpoint}: {}", error_text(&bytes))),
            504 | 500 if is_write => {
                Attempt::Unknown(format!("{endpoint}: {}", error_text(&bytes)))
            }
            500..=599 => Attempt::Retry(format!("{endpoint}: {}", error_text(&bytes))),
            _ => {
                if (200..300).contains(&status) {
                    self.learn_leader(i, forwarded, leader_url.as_deref());
                }
                Attempt::Done(status, bytes)
            }
        }
    }

    fn learn_leader(&self, answered: usize, forwarded: bool, leader_url: Option<&str>) {
        let leader = match (forwarded, leader_url) {
            (false, _) => Some(answered),
            (true, Some(url)) => self.config.endpoints.iter().position(|e| e == url),
            (true, None) => None,
        };
        if leader.is_some() {
            *lock(&self.leader) = leader;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn error_text(bytes: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(e) => e.error,
        Err(_) => String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
    }
}

fn expect_json<T: serde::de::DeserializeOwned>(
    status: u16,
    bytes: &[u8],
) -> Result<T, ClientError> {
    if !(200..300).contains(&status) {
        return Err(ClientError::Rejected {
            status,
            message: error_text(bytes),
        });
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ClientError::Protocol(format!("{e}: {}", error_text(bytes))))
}

/// `/kv/<key, percent-encoded>`.
fn key_path(key: &str) -> String {
    format!("/kv/{}", percent_encode(key))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
