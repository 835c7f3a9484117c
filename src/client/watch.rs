//! Watching keys: a stream of committed changes that survives the loss of the node serving it.
//!
//! [`Client::watch`] opens `GET /watch` on one endpoint (any node serves watches, no leader
//! needed) and returns a [`WatchStream`]. Its [`WatchStream::next`] yields, in revision order:
//! - `put` and `delete` events, each exactly once;
//! - `progress` events (every ~2 s when idle: everything up to `revision` was sent). They are
//!   yielded so a caller can track how far it is known to be up to date; ignore them if not.
//!
//! `error` lines are never yielded: they end a connection, not the watch.
//!
//! **Resuming.** When the connection drops, the node ends the stream (`watcher_too_slow`,
//! `shutting_down`, and `compacted`: another node may keep more history), nothing (not even a
//! progress event) arrives for `idle_timeout_ms`, or the node cannot be reached, the stream
//! reconnects by itself to the *next* endpoint of the list. One revision can hold several
//! events (a transaction, a delete of a prefix, a lease's revoke deleting its keys), and a
//! connection can break between two of them; so the stream resumes *at* the revision of the
//! last event yielded (with `start_revision` = that `mod_revision`) and drops as many events
//! of that revision as it has yielded already — a revision's events come in the same order
//! from every node. It resumes after a revision known complete: one below a later event, a
//! progress revision, or the revision before an ending line's `revision`. A failed
//! connection moves on round the list, backing off after each full round; the retry budget
//! starts at the first failure since the last event and, once spent with no node serving,
//! ends the watch with [`ClientError::Unavailable`] (before the first connection: as soon as
//! no endpoint answered within `unreachable_ms`, like every request). Any event already
//! yielded (a resent one) is dropped, so none is ever yielded twice or out of order.
//!
//! **Terminal errors.** A start revision older than the history a node keeps (HTTP 410) is
//! [`ClientError::Compacted`] with the node's `compact_revision`; a 4xx is
//! [`ClientError::Rejected`]; a line that is not a watch event, or longer than
//! `line_bytes_max`, is [`ClientError::Protocol`]. After an error, `next` returns `None`.
//!
//! **No total timeout.** A watch lasts as long as it is read: only opening it is bounded (the
//! client's `request_timeout_ms` for the response headers); then each read waits at most
//! `idle_timeout_ms`. `next` is cancel-safe: dropping its future (a `select!` with Ctrl-C)
//! loses no event.

use super::lines::LineBuffer;
use super::{build_http, percent_encode, Client, ClientConfig, ClientError, RetryState};
use crate::api::http::REVISION_HEADER;
use crate::api::types::{CompactedBody, WatchEvent};
use axum::body::Bytes;
use futures_util::StreamExt;
use std::pin::Pin;
use std::time::Duration;

/// Reconnect when no byte arrived for this long: three times the server's progress interval.
pub const WATCH_IDLE_TIMEOUT_MS_DEFAULT: u64 = 10_000;

/// The longest line accepted by default: a largest value with every byte escaped by JSON as
/// `\u00XX` (6 bytes), plus room for the key (8 KiB, escaped too) and the envelope.
pub const WATCH_LINE_BYTES_MAX_DEFAULT: usize =
    6 * crate::storage::command::VALUE_BYTES_MAX_DEFAULT + (64 << 10);

/// The keys a watch follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchTarget {
    /// This one key.
    Key(String),
    /// Every key starting with this prefix (empty: every key).
    Prefix(String),
}

/// What to watch, from where, and how patiently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchSpec {
    pub target: WatchTarget,
    /// The first revision wanted; `None`: the node's current revision + 1.
    pub start_revision: Option<u64>,
    /// Reconnect elsewhere when nothing arrived for this long.
    pub idle_timeout_ms: u64,
    /// A longer line is a protocol error.
    pub line_bytes_max: usize,
}

impl WatchSpec {
    /// Watch one key, from now on.
    pub fn key(key: impl Into<String>) -> WatchSpec {
        WatchSpec::new(WatchTarget::Key(key.into()))
    }

    /// Watch every key under `prefix` (empty: every key), from now on.
    pub fn prefix(prefix: impl Into<String>) -> WatchSpec {
        WatchSpec::new(WatchTarget::Prefix(prefix.into()))
    }

    fn new(target: WatchTarget) -> WatchSpec {
        WatchSpec {
            target,
            start_revision: None,
            idle_timeout_ms: WATCH_IDLE_TIMEOUT_MS_DEFAULT,
            line_bytes_max: WATCH_LINE_BYTES_MAX_DEFAULT,
        }
    }

    /// Start at `revision` (the events of earlier revisions are not sent).
    pub fn from_revision(mut self, revision: u64) -> WatchSpec {
        self.start_revision = Some(revision);
        self
    }

    /// `/watch?key=K` or `/watch?prefix=P`, and `&start_revision=R` when given.
    fn path(&self, start_revision: Option<u64>) -> String {
        let mut path = match &self.target {
            WatchTarget::Key(k) => format!("/watch?key={}", percent_encode(k)),
            WatchTarget::Prefix(p) => format!("/watch?prefix={}", percent_encode(p)),
        };
        if let Some(r) = start_revision {
            path.push_str(&format!("&start_revision={r}"));
        }
        path
    }
}

type Body = Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A watch in progress: see the module doc.
pub struct WatchStream {
    http: reqwest::Client,
    config: ClientConfig,
    spec: WatchSpec,
    /// The open response body, if connected.
    body: Option<Body>,
    lines: LineBuffer,
    /// The endpoint of the open connection, or the next one to try.
    cursor: usize,
    /// Every event up to this revision was yielded (`None` only before the first connection
    /// when no start revision was given).
    complete: Option<u64>,
    /// The revision of the last event yielded, above `complete`, whose further events may
    /// still come.
    open_revision: Option<OpenRevision>,
    /// The retry budget, from the first failure since the last event.
    retry: Option<RetryState>,
    /// Failed connections since the last backoff.
    failures_in_round: usize,
    reconnects: u64,
    done: bool,
}

/// A revision some of whose events were yielded; it may hold more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct OpenRevision {
    revision: u64,
    /// Its events yielded so far.
    yielded: usize,
    /// Its events read on the open connection (the first `yielded` of them were resent).
    read: usize,
}

/// What opening a stream on one endpoint gave.
enum Open {
    Streaming {
        body: Body,
        revision: Option<u64>,
    },
    /// Try another endpoint; `answered`: the endpoint took the connection.
    Retry {
        why: String,
        answered: bool,
    },
    Fatal(ClientError),
}

/// What reading the open stream gave.
enum Read {
    Event(WatchEvent),
    /// The connection is over: reconnect elsewhere.
    Broken(String),
    Fatal(ClientError),
}

impl Client {
    /// Opens a watch (see the module doc); fails when no endpoint serves it within the retry
    /// budget, or at once on a 410 ([`ClientError::Compacted`]) or another refusal.
    pub async fn watch(&self, spec: WatchSpec) -> Result<WatchStream, ClientError> {
        if spec.target == WatchTarget::Key(String::new()) {
            return Err(ClientError::InvalidInput(
                "the key to watch must not be empty (watch the prefix \"\" for every key)".into(),
            ));
        }
        if spec.idle_timeout_ms == 0 || spec.line_bytes_max == 0 {
            return Err(ClientError::InvalidInput(
                "a watch needs an idle timeout and a line bound above 0".into(),
            ));
        }
        let mut stream = WatchStream {
            http: self.stream_http()?,
            config: self.config.clone(),
            lines: LineBuffer::new(spec.line_bytes_max),
            complete: spec.start_revision.map(|r| r.saturating_sub(1)),
            open_revision: None,
            spec,
            body: None,
            cursor: 0,
            retry: None,
            failures_in_round: 0,
            reconnects: 0,
            done: false,
        };
        stream.connect().await?;
        Ok(stream)
    }

    /// The HTTP client for long streams: no total timeout (built once, then shared).
    fn stream_http(&self) -> Result<reqwest::Client, ClientError> {
        if let Some(http) = self.stream_http.get() {
            return Ok(http.clone());
        }
        let http = build_http(&self.config, |b| b)?;
        Ok(self.stream_http.get_or_init(|| http).clone())
    }
}

impl WatchStream {
    /// The next event; `None` after a terminal error (see the module doc).
    pub async fn next(&mut self) -> Option<Result<WatchEvent, ClientError>> {
        if self.done {
            return None;
        }
        loop {
            if self.body.is_none() {
                if let Err(e) = self.connect().await {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            match self.read_event().await {
                Read::Event(event) => return Some(Ok(event)),
                Read::Broken(why) => self.broke(why),
                Read::Fatal(e) => {
                    self.body = None;
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }

    /// The revision of the last event or progress yielded: every event of an earlier
    /// revision has been yielded (and of this one too, unless it holds more than were read).
    pub fn last_revision(&self) -> u64 {
        let open = self.open_revision.map(|o| o.revision);
        self.complete.max(open).unwrap_or(0)
    }

    /// The `start_revision` to resume from: the open revision, or after the complete ones.
    fn resume_from(&self) -> Option<u64> {
        match self.open_revision {
            Some(open) => Some(open.revision),
            None => self.complete.map(|r| r + 1),
        }
    }

    /// The endpoint serving the stream now (or to be tried next).
    pub fn endpoint(&self) -> &str {
        &self.config.endpoints[self.cursor]
    }

    /// How many times the stream broke off and was resumed.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// The watch as a [`futures_util::Stream`].
    pub fn into_stream(
        self,
    ) -> impl futures_util::Stream<Item = Result<WatchEvent, ClientError>> + Send {
        futures_util::stream::unfold(self, |mut s| async move {
            let item = s.next().await?;
            Some((item, s))
        })
    }

    /// Opens the stream on the next endpoint that serves it, round the list with backoff.
    async fn connect(&mut self) -> Result<(), ClientError> {
        let n = self.config.endpoints.len();
        loop {
            if self.failures_in_round >= n {
                self.failures_in_round = 0;
                self.retry_state().pause().await?;
            }
            let endpoint = self.endpoint().to_string();
            let from = self.resume_from();
            let path = self.spec.path(from);
            let timeout = Duration::from_millis(self.config.request_timeout_ms);
            match open(&self.http, &endpoint, &path, timeout).await {
                Open::Streaming { body, revision } => {
                    if self.complete.is_none() {
                        // Without a start revision the node starts after its current one.
                        let Some(revision) = revision else {
                            return Err(ClientError::Protocol(format!(
                                "{}: a watch answered without {REVISION_HEADER}",
                                self.endpoint()
                            )));
                        };
                        self.complete = Some(revision);
                    }
                    tracing::debug!(endpoint = %self.endpoint(), ?from, "watch stream open");
                    if let Some(open) = self.open_revision.as_mut() {
                        open.read = 0;
                    }
                    self.body = Some(body);
                    self.lines.clear();
                    return Ok(());
                }
                Open::Fatal(e) => return Err(e),
                Open::Retry { why, answered } => {
                    self.cursor = (self.cursor + 1) % n;
                    self.failures_in_round += 1;
                    let retry = self.retry_state();
                    retry.answered |= answered;
                    retry.last_error = why;
                    if let Some(e) = retry.give_up_now() {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// The retry budget in force, started now if none is.
    fn retry_state(&mut self) -> &mut RetryState {
        self.retry
            .get_or_insert_with(|| RetryState::new(&self.config))
    }

    /// The next event of the open stream to yield, reading as needed.
    async fn read_event(&mut self) -> Read {
        let idle = Duration::from_millis(self.spec.idle_timeout_ms);
        loop {
            let parsed = match self.lines.next_line() {
                Err(e) => {
                    let why = format!("{}: the watch stream sent {e}", self.endpoint());
                    return Read::Fatal(ClientError::Protocol(why));
                }
                Ok(Some([])) => continue,
                Ok(Some(line)) => serde_json::from_slice::<WatchEvent>(line),
                Ok(None) => {
                    let Some(body) = self.body.as_mut() else {
                        return Read::Broken("not connected".into());
                    };
                    match tokio::time::timeout(idle, body.next()).await {
                        Ok(Some(Ok(chunk))) => self.lines.push(&chunk),
                        Ok(Some(Err(e))) => return Read::Broken(format!("read failed: {e}")),
                        Ok(None) => return Read::Broken("the stream ended".into()),
                        Err(_) => {
                            let why = format!("nothing arrived for {} ms", idle.as_millis());
                            return Read::Broken(why);
                        }
                    }
                    continue;
                }
            };
            let event = match parsed {
                Ok(event) => event,
                Err(e) => {
                    let why = format!("{}: not a watch event: {e}", self.endpoint());
                    return Read::Fatal(ClientError::Protocol(why));
                }
            };
            if let Some(read) = self.accept(event) {
                return read;
            }
        }
    }

    /// What to do with an event from the stream: yield it, end the connection (an `error`
    /// line), or drop it (`None`: yielded already, or a progress behind).
    fn accept(&mut self, event: WatchEvent) -> Option<Read> {
        match &event {
            WatchEvent::Put(kv) | WatchEvent::Delete(kv) => {
                if !self.take_change(kv.mod_revision) {
                    tracing::debug!(
                        mod_revision = kv.mod_revision,
                        last = self.last_revision(),
                        "dropped a resent event"
                    );
                    return None;
                }
            }
            WatchEvent::Progress { revision } => {
                if *revision < self.last_revision() {
                    return None;
                }
                self.mark_complete(*revision);
            }
            WatchEvent::Error {
                error,
                kind,
                revision,
            } => {
                // Everything before `revision` was sent: it is where to resume.
                self.mark_complete(revision.saturating_sub(1));
                return Some(Read::Broken(format!(
                    "the node ended the stream ({kind}): {error}"
                )));
            }
        }
        self.retry = None;
        self.failures_in_round = 0;
        Some(Read::Event(event))
    }

    /// Every event up to `revision` has been yielded.
    fn mark_complete(&mut self, revision: u64) {
        let complete = self.complete.unwrap_or(0).max(revision);
        self.complete = Some(complete);
        if self.open_revision.is_some_and(|o| o.revision <= complete) {
            self.open_revision = None;
        }
    }

    /// Whether a put or delete of `revision` just read is new (to yield); counts it if so.
    /// Events come in revision order without gaps, so one of a later revision completes the
    /// open one.
    fn take_change(&mut self, revision: u64) -> bool {
        if revision <= self.complete.unwrap_or(0) {
            return false;
        }
        match self.open_revision.as_mut() {
            Some(open) if open.revision == revision => {
                open.read += 1;
                if open.read <= open.yielded {
                    return false;
                }
                open.yielded = open.read;
                true
            }
            // Below the open revision yet not complete: only a misbehaving node sends it.
            Some(open) if revision < open.revision => false,
            _ => {
                self.complete = Some(revision - 1);
                self.open_revision = Some(OpenRevision {
                    revision,
                    yielded: 1,
                    read: 1,
                });
                true
            }
        }
    }

    /// The connection broke off: drop it and move on to the next endpoint.
    fn broke(&mut self, why: String) {
        let n = self.config.endpoints.len();
        tracing::info!(endpoint = %self.endpoint(), %why, resume_from = ?self.resume_from(),
            "watch stream broke off; resuming on another endpoint");
        self.body = None;
        self.lines.clear();
        self.reconnects += 1;
        self.cursor = (self.cursor + 1) % n;
        self.failures_in_round += 1;
        let retry = self.retry_state();
        // The cluster served this watch: spend the whole budget before giving up.
        retry.answered = true;
        retry.last_error = why;
    }
}

/// One `GET` of `path` (a watch) on `endpoint`, its headers awaited for at most `timeout`.
async fn open(http: &reqwest::Client, endpoint: &str, path: &str, timeout: Duration) -> Open {
    let send = http
        .get(format!("{endpoint}{path}"))
        .header(reqwest::header::ACCEPT, "application/x-ndjson")
        .send();
    let resp = match tokio::time::timeout(timeout, send).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            let answered = !e.is_connect();
            let why = format!("{endpoint}: {e}");
            return Open::Retry { why, answered };
        }
        Err(_) => {
            let why = format!("{endpoint}: no answer within {} ms", timeout.as_millis());
            return Open::Retry {
                why,
                answered: true,
            };
        }
    };
    let status = resp.status().as_u16();
    if status == 200 {
        let revision = resp
            .headers()
            .get(REVISION_HEADER)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let body: Body = Box::pin(resp.bytes_stream());
        return Open::Streaming { body, revision };
    }
    let bytes = super::download::error_body(resp).await;
    let message = super::error_text(&bytes);
    match status {
        410 => Open::Fatal(compacted(endpoint, &bytes)),
        500..=599 => Open::Retry {
            why: format!("{endpoint}: {message}"),
            answered: true,
        },
        _ => Open::Fatal(ClientError::Rejected { status, message }),
    }
}

/// The typed error of a 410 (its body must say where history starts).
fn compacted(endpoint: &str, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<CompactedBody>(bytes) {
        Ok(body) => ClientError::Compacted {
            compact_revision: body.compact_revision,
        },
        Err(e) => ClientError::Protocol(format!(
            "{endpoint}: a 410 without a compact revision: {e}: {}",
            super::error_text(bytes)
        )),
    }
}
