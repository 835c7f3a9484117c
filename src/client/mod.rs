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
//! - **Exactly-once writes.** Every key write (put, delete, delete by prefix, transaction)
//!   goes out under a session (module `session`): a client id and a sequence number. A write
//!   that got 504, or whose connection failed after the request was sent, or that met a
//!   node-side 500, is resent with the **same** id and sequence, on any endpoint, with the
//!   usual leader discovery and backoff: the server applies it at most once and answers a
//!   resend from its session table. Only when the retry budget is spent without a definite
//!   answer does the write return [`ClientError::OutcomeUnknown`]. A 409 `session_expired`
//!   (the server forgot the session; nothing was applied) starts a fresh session and resends.
//! - **Never a blind write retry without a session.** With `sessions` off, and for
//!   membership changes, such a write returns [`ClientError::OutcomeUnknown`] at once: only
//!   the caller knows whether repeating it is safe. Reads are idempotent and are retried.
//! - **Conditions are answers.** [`Client::put_if`] and [`Client::delete_if`] answer
//!   `Ok(Err(ConditionFailed))` when the key's `mod_revision` was not the expected one (a 412:
//!   nothing changed), with the key as it is now: a compare-and-swap loop reads nothing more.
//! - **Unreachable is said fast.** Connecting gets `connect_timeout_ms` (1 s); when no
//!   endpoint has answered anything within `unreachable_ms` (2 s), the operation fails as
//!   unavailable at once instead of spending the whole retry budget.
//! - **Keys are keys.** Every byte outside RFC 3986's unreserved set is percent-encoded, and so
//!   is `.`, so `.`/`..` never meet URL dot-segment removal; only a 404 of kind
//!   `key_not_found` means "no such key" (a routing 404 is a rejection).
//! - **TLS and tokens.** `ca_file` is the only CA trusted for `https://` endpoints (without it,
//!   the system's roots); `token` is sent as `Authorization: Bearer <token>`.
//! - **Lists page.** [`Client::list`] follows the server's continuations (`more`/`next`) up to
//!   its limit; each page is a consistent read, the whole list is not one snapshot.
//! - **Snapshots stream.** [`Client::snapshot`] asks the leader for the whole state as a
//!   snapshot file and hands it out piece by piece (see [`download`]).
//! - **Membership changes are writes.** [`Client::add_member`], [`Client::promote_member`] and
//!   [`Client::remove_member`] go to the leader like writes and are never retried once sent;
//!   a guard's refusal (409), an unknown member (404) or bad input (400) is
//!   [`ClientError::Rejected`] with the server's message. [`Client::members`] prefers the
//!   leader's view, which alone has each member's match index.
//! - **Watches resume by themselves.** [`Client::watch`] streams committed changes from any
//!   node and, when that node goes away, resumes on another where it left off (at the last
//!   revision seen, whose events may be several), never yielding an event twice or missing
//!   one (module `watch`).
//! - **Leases.** Grants and revokes are writes (under sessions); keepalives are retried like
//!   reads; [`Client::keep_alive`] renews one in the background (module `lease`).

mod download;
mod lease;
mod lines;
mod session;
mod watch;
mod write;

pub use download::SnapshotDownload;
pub use lease::{KeeperStatus, LeaseKeeper, LeaseLost};
pub use watch::{
    WatchSpec, WatchStream, WatchTarget, WATCH_IDLE_TIMEOUT_MS_DEFAULT,
    WATCH_LINE_BYTES_MAX_DEFAULT,
};
pub use write::{ConditionFailed, Conditional};

use crate::api::http::{
    CLIENT_ID_HEADER, DUPLICATE_HEADER, FORWARDED_TO_HEADER, KIND_KEY_NOT_FOUND, LEADER_URL_HEADER,
    REVISION_HEADER, SEQ_HEADER,
};
use crate::api::types::*;
use crate::api::Consistency;
use raftkv_storage::NodeId;
use std::path::PathBuf;
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
    /// Time allowed to open a connection to one endpoint.
    pub connect_timeout_ms: u64,
    /// Give up once no endpoint has answered anything for this long.
    pub unreachable_ms: u64,
    /// Trust only this CA (PEM) for `https://` endpoints.
    pub ca_file: Option<PathBuf>,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// The most pairs asked for in one list page.
    pub list_page_max: usize,
    /// Send key writes under exactly-once sessions (resent safely until answered); off, a
    /// write whose outcome is unknown is reported at once as [`ClientError::OutcomeUnknown`].
    pub sessions: bool,
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
            connect_timeout_ms: 1000,
            unreachable_ms: 2000,
            ca_file: None,
            token: None,
            list_page_max: 1000,
            sessions: true,
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
    /// A node answered something that is not the API's JSON (or broke the session rules).
    #[error("unexpected response: {0}")]
    Protocol(String),
    /// A resent write had applied (at `revision`), but its result was too large for the
    /// server to keep for a resend (a transaction's big gets, a failed condition's big current
    /// value): whether its condition held is unknown here; read the keys.
    #[error("the write applied at revision {revision:?}, but its result was not kept: {message}")]
    ResultNotKept {
        revision: Option<u64>,
        message: String,
    },
    /// The arguments cannot make a valid request (e.g. an empty prefix to delete).
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// A watch's start revision is older than the history the node keeps (HTTP 410): the
    /// events up to and including `compact_revision` are gone. Re-read the keys, then watch
    /// from the revision of that read + 1.
    #[error(
        "the watch start revision is compacted: history up to revision {compact_revision} is gone"
    )]
    Compacted { compact_revision: u64 },
    /// The lease does not exist (it expired or was revoked): HTTP 404 `lease_not_found`.
    #[error("lease {id} not found (expired or revoked)")]
    LeaseNotFound { id: u64 },
}

impl ClientError {
    /// True if a retry by the caller could succeed (not a rejection or bad configuration).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ClientError::Unavailable(_))
    }

    /// The status of a rejection (400, 404, 409, ...), if this is one.
    pub fn rejected_status(&self) -> Option<u16> {
        match self {
            ClientError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A raftkv client. Cheap to share: wrap it in an `Arc`, or clone the `ClientConfig`.
pub struct Client {
    http: reqwest::Client,
    config: ClientConfig,
    /// Index into `config.endpoints` of the node believed to lead.
    leader: Mutex<Option<usize>>,
    /// Idle exactly-once sessions (used when `config.sessions`).
    sessions: session::SessionPool,
    /// The HTTP client of watch streams (no total timeout), built on first use.
    stream_http: std::sync::OnceLock<reqwest::Client>,
}

/// How a request may be retried.
#[derive(Clone, Copy, Debug)]
enum Mode<'a> {
    /// Idempotent: retried after any failure.
    Read,
    /// A write without a session: never resent once it may have been sent.
    Write,
    /// A write under a session: resent with the same id and sequence until answered.
    Session { client_id: &'a str, seq: u64 },
}

impl Mode<'_> {
    fn is_write(self) -> bool {
        !matches!(self, Mode::Read)
    }
}

/// A definite answer: its status, its body and the revision it was served at (the
/// `X-Raftkv-Revision` header, on key reads and writes).
struct Answer {
    status: u16,
    bytes: Vec<u8>,
    revision: Option<u64>,
}

enum Attempt {
    Done(Answer),
    /// Safe to try another endpoint (nothing applied); the endpoint answered.
    Retry(String),
    /// Nothing was sent: the endpoint could not be reached.
    Unreachable(String),
    /// The request may have been applied.
    Unknown(String),
}

/// The retry budget of one request, and what its attempts have seen so far.
struct RetryState {
    deadline: Instant,
    started: Instant,
    unreachable: Duration,
    backoff_ms: u64,
    backoff_max_ms: u64,
    last_error: String,
    /// Some endpoint answered (or took the request): the cluster is there.
    answered: bool,
    /// A sessioned write may have been applied by an attempt without a definite answer.
    maybe_applied: bool,
}

impl RetryState {
    fn new(config: &ClientConfig) -> RetryState {
        let started = Instant::now();
        RetryState {
            deadline: started + Duration::from_millis(config.retry_budget_ms),
            started,
            unreachable: Duration::from_millis(config.unreachable_ms),
            backoff_ms: config.backoff_min_ms,
            backoff_max_ms: config.backoff_max_ms,
            last_error: String::from("no attempt made"),
            answered: false,
            maybe_applied: false,
        }
    }

    /// The error to end with: the outcome is unknown if an attempt may have applied.
    fn give_up(&self) -> ClientError {
        if self.maybe_applied {
            ClientError::OutcomeUnknown(format!(
                "resent with the same session until the retry budget ran out; last: {}",
                self.last_error
            ))
        } else {
            ClientError::Unavailable(self.last_error.clone())
        }
    }

    /// After a failed attempt: give up when nothing answered in time or the budget is spent.
    fn give_up_now(&self) -> Option<ClientError> {
        if !self.answered && self.started.elapsed() >= self.unreachable {
            return Some(ClientError::Unavailable(format!(
                "no endpoint answered within {} ms; last: {}",
                self.unreachable.as_millis(),
                self.last_error
            )));
        }
        (Instant::now() >= self.deadline).then(|| self.give_up())
    }

    /// Backs off after a full round of endpoints; errs when the budget leaves no time.
    async fn pause(&mut self) -> Result<(), ClientError> {
        // While nothing has answered, wake in time to give up within `unreachable`.
        let give_up_at = if self.answered {
            self.deadline
        } else {
            self.deadline.min(self.started + self.unreachable)
        };
        let sleep = Duration::from_millis(self.backoff_ms)
            .min(give_up_at.saturating_duration_since(Instant::now()));
        if sleep.is_zero() && self.answered {
            return Err(self.give_up());
        }
        tokio::time::sleep(sleep).await;
        self.backoff_ms = (self.backoff_ms * 2).min(self.backoff_max_ms);
        Ok(())
    }
}

impl Client {
    /// A client over `config.endpoints`.
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        if config.endpoints.is_empty() {
            return Err(ClientError::Config("no endpoints given".into()));
        }
        let http = http_client(&config)?;
        Ok(Client {
            http,
            config,
            leader: Mutex::new(None),
            sessions: session::SessionPool::default(),
            stream_http: std::sync::OnceLock::new(),
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

    /// Reads `key`; `Ok(None)` if it does not exist.
    pub async fn get(
        &self,
        key: &str,
        consistency: Consistency,
    ) -> Result<Option<KvResponse>, ClientError> {
        let path = key_path_and_query(key, &format!("consistency={}", consistency.as_str()));
        let Answer { status, bytes, .. } = self
            .request(reqwest::Method::GET, &path, None, Mode::Read)
            .await?;
        if status == 404 && error_kind(&bytes).as_deref() == Some(KIND_KEY_NOT_FOUND) {
            return Ok(None);
        }
        expect_json(status, &bytes).map(Some)
    }

    /// Lists up to `limit` keys starting with `prefix`, in order, following the server's
    /// continuations; `more`/`next` say whether keys remain past `limit`.
    pub async fn list(
        &self,
        prefix: &str,
        limit: usize,
        consistency: Consistency,
    ) -> Result<ListResponse, ClientError> {
        let mut out = ListResponse {
            items: Vec::new(),
            count: 0,
            index: 0,
            revision: 0,
            more: false,
            next: None,
        };
        let mut start: Option<String> = None;
        while out.items.len() < limit {
            let want = (limit - out.items.len()).min(self.config.list_page_max.max(1));
            let page = self
                .list_page(prefix, start.as_deref(), want, consistency)
                .await?;
            out.index = out.index.max(page.index);
            out.revision = out.revision.max(page.revision);
            out.items.extend(page.items);
            out.more = page.more;
            out.next = page.next.clone();
            match page.next {
                Some(next) if page.more => start = Some(next),
                _ => break,
            }
        }
        out.count = out.items.len();
        Ok(out)
    }

    /// One page of a listing: at most `limit` keys under `prefix`, strictly after `start`.
    pub async fn list_page(
        &self,
        prefix: &str,
        start: Option<&str>,
        limit: usize,
        consistency: Consistency,
    ) -> Result<ListResponse, ClientError> {
        let mut path = format!(
            "/kv?prefix={}&limit={limit}&consistency={}",
            percent_encode(prefix),
            consistency.as_str()
        );
        if let Some(start) = start {
            path.push_str("&start=");
            path.push_str(&percent_encode(start));
        }
        let Answer { status, bytes, .. } = self
            .request(reqwest::Method::GET, &path, None, Mode::Read)
            .await?;
        expect_json(status, &bytes)
    }

    /// Asks the cluster to move leadership to `to`.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), ClientError> {
        let body = serde_json::to_vec(&TransferBody { to })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let Answer { status, bytes, .. } = self
            .request(
                reqwest::Method::POST,
                "/cluster/transfer-leader",
                Some(body),
                Mode::Read,
            )
            .await?;
        expect_json::<serde_json::Value>(status, &bytes).map(|_| ())
    }

    /// The configuration, preferably as the leader sees it (with each member's match index
    /// and reachability): asked of any node (cached leader first); when that node does not
    /// lead but names a leader whose client URL it knows, the leader is asked once more
    /// directly, and the first answer stands if the leader cannot give one.
    pub async fn members(&self) -> Result<MembersResponse, ClientError> {
        let Answer { status, bytes, .. } = self
            .request(reqwest::Method::GET, "/cluster/members", None, Mode::Read)
            .await?;
        let first: MembersResponse = expect_json(status, &bytes)?;
        let leader_url = match &first.leader {
            Some(l) if l.id == first.id => return Ok(first),
            Some(l) => l.client_url.clone(),
            None => None,
        };
        // Any node answers this GET itself: the one that did is not the leader after all.
        let url = leader_url.map(|u| u.trim_end_matches('/').to_string());
        *lock(&self.leader) = url
            .as_ref()
            .and_then(|u| self.config.endpoints.iter().position(|e| e == u));
        let Some(url) = url else {
            return Ok(first);
        };
        match self.members_of(&url).await {
            Ok(from_leader)
                if from_leader.leader.as_ref().map(|l| l.id) == Some(from_leader.id) =>
            {
                Ok(from_leader)
            }
            _ => Ok(first),
        }
    }

    /// One node's view of the configuration (no retries, no forwarding).
    pub async fn members_of(&self, endpoint: &str) -> Result<MembersResponse, ClientError> {
        let url = format!("{}/cluster/members", endpoint.trim_end_matches('/'));
        let unavailable = |e: reqwest::Error| ClientError::Unavailable(format!("{endpoint}: {e}"));
        let resp = self.http.get(&url).send().await.map_err(unavailable)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(unavailable)?;
        expect_json(status, &bytes)
    }

    /// Adds member `id` (a voter, or a learner with `learner`); returns the leader's status
    /// once the change is committed. `force` skips the reachable-quorum guard only.
    pub async fn add_member(
        &self,
        id: NodeId,
        peer_addr: &str,
        client_url: &str,
        learner: bool,
        force: bool,
    ) -> Result<ClusterStatus, ClientError> {
        let body = serde_json::to_vec(&MemberAddBody {
            id,
            peer_addr: peer_addr.to_string(),
            client_url: client_url.to_string(),
            learner,
            force,
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.change_membership(reqwest::Method::POST, "/cluster/members".into(), Some(body))
            .await
    }

    /// Promotes learner `id` to a voter (refused with 409 until it has caught up).
    pub async fn promote_member(
        &self,
        id: NodeId,
        force: bool,
    ) -> Result<ClusterStatus, ClientError> {
        let path = format!("/cluster/members/{id}/promote{}", force_query(force));
        self.change_membership(reqwest::Method::POST, path, None)
            .await
    }

    /// Removes member `id` (a voter or a learner).
    pub async fn remove_member(
        &self,
        id: NodeId,
        force: bool,
    ) -> Result<ClusterStatus, ClientError> {
        let path = format!("/cluster/members/{id}{}", force_query(force));
        self.change_membership(reqwest::Method::DELETE, path, None)
            .await
    }

    /// Sends a membership change as a write: never retried once sent (504, a cut-off
    /// answer: [`ClientError::OutcomeUnknown`]); 400/404/409 are [`ClientError::Rejected`]
    /// with the server's message.
    async fn change_membership(
        &self,
        method: reqwest::Method,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<ClusterStatus, ClientError> {
        let Answer { status, bytes, .. } = self.request(method, &path, body, Mode::Write).await?;
        expect_json(status, &bytes)
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

    /// One node's readiness (`GET /ready`, no retries, no forwarding): its id when it
    /// answered 200; [`ClientError::Rejected`] when it answered anything else (not ready: no
    /// leader known, behind on applying, stopping); [`ClientError::Unavailable`] when it could
    /// not be reached or did not answer within the request timeout.
    pub async fn ready_of(&self, endpoint: &str) -> Result<NodeId, ClientError> {
        let url = format!("{}/ready", endpoint.trim_end_matches('/'));
        let unavailable = |e: reqwest::Error| {
            // reqwest's own text omits the cause ("connection refused", "timed out").
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why.push_str(&format!(": {s}"));
                source = s.source();
            }
            ClientError::Unavailable(format!("{endpoint}: {why}"))
        };
        let resp = self.http.get(&url).send().await.map_err(unavailable)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(unavailable)?;
        let ready: ReadyResponse = expect_json(status, &bytes)?;
        match ready.ready {
            true => Ok(ready.id),
            false => Err(ClientError::Protocol(format!(
                "{endpoint}: answered 200 with \"ready\": false"
            ))),
        }
    }

    /// Every endpoint's status, in endpoint order.
    pub async fn status_all(&self) -> Vec<(String, Result<ClusterStatus, ClientError>)> {
        let all = self
            .config
            .endpoints
            .iter()
            .map(|e| async move { (e.clone(), self.status_of(e).await) });
        futures_util::future::join_all(all).await
    }

    /// Sends one request with leader discovery and the retries `mode` allows.
    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        mode: Mode<'_>,
    ) -> Result<Answer, ClientError> {
        let mut state = RetryState::new(&self.config);
        let n = self.config.endpoints.len();
        let mut round = 0usize;
        loop {
            let start = (*lock(&self.leader)).unwrap_or(round % n);
            for step in 0..n {
                let i = (start + step) % n;
                let why = match self.attempt(i, &method, path, body.clone(), mode).await {
                    Attempt::Done(answer) => return Ok(answer),
                    Attempt::Unknown(why) => match mode {
                        Mode::Session { .. } => {
                            tracing::debug!(%why, "resending a sessioned write");
                            state.maybe_applied = true;
                            state.answered = true;
                            why
                        }
                        _ => return Err(ClientError::OutcomeUnknown(why)),
                    },
                    Attempt::Unreachable(why) => why,
                    Attempt::Retry(why) => {
                        state.answered = true;
                        why
                    }
                };
                self.forget_leader(i);
                state.last_error = why;
                if let Some(e) = state.give_up_now() {
                    return Err(e);
                }
            }
            round += 1;
            state.pause().await?;
        }
    }

    /// A node that could not serve is not the leader.
    fn forget_leader(&self, i: usize) {
        let mut leader = lock(&self.leader);
        if *leader == Some(i) {
            *leader = None;
        }
    }

    async fn attempt(
        &self,
        i: usize,
        method: &reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        mode: Mode<'_>,
    ) -> Attempt {
        let is_write = mode.is_write();
        let endpoint = &self.config.endpoints[i];
        let mut req = self
            .http
            .request(method.clone(), format!("{endpoint}{path}"));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        if let Mode::Session { client_id, seq } = mode {
            req = req
                .header(CLIENT_ID_HEADER, client_id)
                .header(SEQ_HEADER, seq.to_string());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Attempt::Unreachable(format!("{endpoint}: {e}")),
            Err(e) if is_write => {
                return Attempt::Unknown(format!(
                    "{endpoint}: the request was sent but failed: {e}"
                ))
            }
            Err(e) => return Attempt::Retry(format!("{endpoint}: {e}")),
        };
        let status = resp.status().as_u16();
        if resp.headers().contains_key(DUPLICATE_HEADER) {
            tracing::debug!(%endpoint, ?mode, status, "answered from the session table");
        }
        let forwarded = resp.headers().contains_key(FORWARDED_TO_HEADER);
        let revision = resp
            .headers()
            .get(REVISION_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok());
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
                Attempt::Done(Answer {
                    status,
                    bytes,
                    revision,
                })
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

/// The HTTP client: timeouts, the trusted CA, the bearer token. Without `ca_file`, the
/// system's CAs — or none where the system has none (a scratch container, where `raftkv
/// ready` is the health check): `http://` endpoints work either way.
fn http_client(config: &ClientConfig) -> Result<reqwest::Client, ClientError> {
    let total = Duration::from_millis(config.request_timeout_ms);
    build_http(config, move |b| b.timeout(total))
}

/// The connect timeout, the trusted CA and the bearer token, then `finish` (the caller's own
/// timeouts: a total one for requests, a read timeout for a long stream).
fn build_http(
    config: &ClientConfig,
    finish: impl Fn(reqwest::ClientBuilder) -> reqwest::ClientBuilder,
) -> Result<reqwest::Client, ClientError> {
    crate::tls::ensure_provider();
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = &config.token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| ClientError::Config("the token is not printable ASCII".into()))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let configure = |b: reqwest::ClientBuilder| {
        finish(
            b.connect_timeout(Duration::from_millis(
                config.connect_timeout_ms.min(config.request_timeout_ms),
            ))
            .pool_max_idle_per_host(64)
            .default_headers(headers.clone()),
        )
    };
    crate::tls::http_client(config.ca_file.as_deref(), configure)
        .map_err(|e| ClientError::Config(e.to_string()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn error_kind(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<ErrorBody>(bytes).ok()?.kind
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

/// `?force=true` when forcing, else nothing.
fn force_query(force: bool) -> &'static str {
    if force {
        "?force=true"
    } else {
        ""
    }
}

/// `/kv/<key, percent-encoded>`.
fn key_path(key: &str) -> String {
    key_path_and_query(key, "")
}

/// The path (and query) addressing `key`, with `query` (already encoded) appended:
/// `/kv/<key, percent-encoded>?query`, except for the keys `.` and `..`, which every WHATWG
/// URL parser removes as dot segments even percent-encoded: `/kv/?key=%2E%2E&query`.
pub fn key_path_and_query(key: &str, query: &str) -> String {
    let encoded = percent_encode(key);
    let sep = |first: char| match query.is_empty() {
        true => String::new(),
        false => format!("{first}{query}"),
    };
    if key == "." || key == ".." {
        format!("/kv/?key={encoded}{}", sep('&'))
    } else {
        format!("/kv/{encoded}{}", sep('?'))
    }
}

/// Decodes `%XX` escapes; `None` if an escape is malformed or the result is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Percent-encodes everything but RFC 3986 unreserved characters, and `.` too, so no URL
/// library or proxy ever sees a dot segment (`..` is sent as `%2E%2E`).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod lease_tests;
#[cfg(test)]
mod scripted;
#[cfg(test)]
mod session_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod watch_tests;
