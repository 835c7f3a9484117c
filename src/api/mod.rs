//! The client API: what a node offers clients, independent of HTTP.
//!
//! [`KvService`] is the seam between the HTTP layer ([`http`]) and the node runtime: the node
//! implements it over the consensus core and the state machine; the HTTP tests implement it
//! over a map. The wire types ([`types`]) are shared with the Rust client, so the server and
//! the client cannot drift apart.
//!
//! Errors carry their meaning ([`ServiceError`]), and the HTTP layer alone decides status
//! codes: 400 bad input, 413 over a limit, 503 (+ `Retry-After`) no leader or no quorum,
//! 504 a write whose outcome is unknown, 500 only for a node-side failure.
//!
//! The client port is hostile ground, so it is bounded layer by layer: [`server`] accepts
//! and bounds connections (count, header/idle timeouts, TLS from [`crate::tls`]), [`auth`]
//! checks the bearer token, [`body`] bounds request bodies in time and bytes, and [`http`]
//! validates everything else before the service sees it.

pub mod auth;
pub mod body;
pub mod http;
pub mod server;
#[doc(hidden)]
pub mod test_service;
pub mod types;

use crate::raft::MembershipProposal;
use crate::watch::{WatchError, WatchStream};
use raftkv_storage::command::{
    CommandError, CommandLimits, CommandRef, CommandResult, KeyRecord, SessionRef,
};
use raftkv_storage::sm::history::KeyFilter;
use raftkv_storage::txn::TxnLimits;
use raftkv_storage::NodeId;
use std::future::Future;
pub use types::*;

/// How a read is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// ReadIndex: the leader confirms its leadership with a quorum, then serves once applied.
    Linearizable,
    /// The leader serves from its lease without a quorum round (bounded clock drift assumed).
    Lease,
    /// Any node serves from its local state, possibly behind.
    Stale,
}

impl Consistency {
    /// Parses the query-string value.
    pub fn parse(s: &str) -> Option<Consistency> {
        match s {
            "linearizable" => Some(Consistency::Linearizable),
            "lease" => Some(Consistency::Lease),
            "stale" => Some(Consistency::Stale),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Linearizable => "linearizable",
            Consistency::Lease => "lease",
            Consistency::Stale => "stale",
        }
    }
}

/// The leader as far as a node knows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaderHint {
    pub id: NodeId,
    /// The leader's client URL, if this node has learned it.
    pub client_url: Option<String>,
}

/// Why a request could not be served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    TooLarge(String),
    /// This node cannot serve the request; the leader can (if known).
    #[error("not the leader")]
    NotLeader { leader: Option<LeaderHint> },
    /// No leader, no quorum, or shutting down: try again shortly.
    #[error("{0}")]
    Unavailable(String),
    /// The write was proposed but not seen committed in time: it may or may not apply.
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
    /// The request conflicts with the cluster's state (a membership change in flight, a
    /// learner not caught up, ...): 409, nothing was changed.
    #[error("{0}")]
    Conflict(String),
    /// What the request names does not exist: 404.
    #[error("{0}")]
    NotFound(String),
}

/// Size limits clients are held to (checked before anything reaches the log).
///
/// Key and value sizes are the storage layer's [`CommandLimits`], held here rather than
/// copied: the HTTP layer checks requests with them, and the node's service checks every
/// command with [`raftkv_storage::command::Command::validate`] against the same values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Key and value bytes (`key_bytes_max`, `value_bytes_max`).
    pub command: CommandLimits,
    /// The most keys one list request returns.
    pub list_limit_max: usize,
    /// Compares, operations per branch and bytes of one transaction.
    pub txn: TxnLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            command: CommandLimits::default(),
            list_limit_max: 10_000,
            txn: TxnLimits::default(),
        }
    }
}

/// A write's client session (`X-Raftkv-Client-Id`, `X-Raftkv-Seq`): makes the write
/// exactly-once however often it is retried (see `raftkv_storage::sm::sessions`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSession {
    pub client_id: String,
    pub seq: u64,
}

impl ClientSession {
    /// The session as a log entry carries it: stamped with this node's wall clock (the
    /// session clock, see `raftkv_storage::sm::sessions`) and checked.
    pub fn stamped(&self) -> Result<SessionRef<'_>, ServiceError> {
        let session = SessionRef {
            client: self.client_id.as_bytes(),
            seq: self.seq,
            now_ms: crate::node::service::wall_clock_ms(),
        };
        session.validate()?;
        Ok(session)
    }
}

/// A committed and applied write: the state machine's result (for a session's retry, the
/// original write's) and the node that led when it committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub result: CommandResult,
    pub leader: NodeId,
}

/// A command over a limit is the client's fault: 413 if too large, 400 otherwise.
impl From<CommandError> for ServiceError {
    fn from(e: CommandError) -> ServiceError {
        match e {
            CommandError::KeyTooLarge { .. } | CommandError::ValueTooLarge { .. } => {
                ServiceError::TooLarge(e.to_string())
            }
            CommandError::TxnTooLarge(_) => ServiceError::TooLarge(e.to_string()),
            CommandError::EmptyKey
            | CommandError::InvalidSession(_)
            | CommandError::InvalidLease(_)
            | CommandError::UnsupportedVersion(_)
            | CommandError::Decode(_)
            | CommandError::Encode(_) => ServiceError::InvalidInput(e.to_string()),
        }
    }
}

/// The wire form of a state machine record (keys and values are UTF-8 from the HTTP API).
pub fn key_value(r: KeyRecord) -> KeyValue {
    KeyValue {
        key: lossy(r.key),
        value: lossy(r.value),
        create_revision: r.create_revision,
        mod_revision: r.mod_revision,
        version: r.version,
    }
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// One page of a listing: keys under `prefix`, strictly after `after`, in key order, at most
/// `limit` of them and at most `bytes_max` bytes of keys plus values (but always at least one
/// pair, so a listing always progresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListQuery {
    pub prefix: String,
    pub after: Option<String>,
    pub limit: usize,
    pub bytes_max: usize,
}

/// What a node offers clients. Every method may be called concurrently.
pub trait KvService: Send + Sync + 'static {
    /// This node's id.
    fn node_id(&self) -> NodeId;
    /// The limits requests are checked against.
    fn limits(&self) -> Limits;
    /// Proposes a write (a put, a delete, a prefix delete or a transaction), within
    /// `session` if given; completes once it is committed and applied, with what it did.
    /// Borrowed: the HTTP layer keeps the key and value to echo them, and the service copies
    /// them only once, into the log entry's payload.
    fn write(
        &self,
        command: CommandRef<'_>,
        session: Option<&ClientSession>,
    ) -> impl Future<Output = Result<Applied, ServiceError>> + Send;
    /// Reads `key` (value and revisions) at the given consistency.
    fn get(
        &self,
        key: String,
        consistency: Consistency,
    ) -> impl Future<Output = Result<ReadValue, ServiceError>> + Send;
    /// One page of keys as `query` says; `Listed::more` if the page was cut by a cap.
    fn list(
        &self,
        query: ListQuery,
        consistency: Consistency,
    ) -> impl Future<Output = Result<Listed, ServiceError>> + Send;
    /// This node's view of the cluster.
    fn status(&self) -> impl Future<Output = Result<ClusterStatus, ServiceError>> + Send;
    /// `Ok` when the node knows a leader and has applied its entries up to the leader's
    /// no-op of the current term; `Err(Unavailable(why))` otherwise.
    fn ready(&self) -> impl Future<Output = Result<(), ServiceError>> + Send;
    /// Asks the leader to hand leadership to `to`.
    fn transfer_leader(&self, to: NodeId) -> impl Future<Output = Result<(), ServiceError>> + Send;
    /// Proposes a membership change (on the leader; elsewhere `NotLeader`). Completes once
    /// the change is committed and no joint configuration is left, with this node's status
    /// at that moment. Errors: `Conflict` (a change in flight, a learner not caught up, the
    /// last voter, no reachable quorum without `force`), `NotFound` (an unknown member),
    /// `Unavailable` (certainly no effect), `Timeout` (the outcome is unknown).
    fn change_membership(
        &self,
        proposal: MembershipProposal,
    ) -> impl Future<Output = Result<ClusterStatus, ServiceError>> + Send;
    /// Sets `metrics`' scrape-time gauges (leadership, indexes, pending writes, database
    /// size) just before `GET /metrics` encodes them. A service without them sets none.
    fn refresh_metrics(
        &self,
        metrics: &crate::metrics::Metrics,
    ) -> impl Future<Output = ()> + Send {
        let _ = metrics;
        async {}
    }
    /// The lease bound a grant is proposed with (`--leases-max`).
    fn leases_max(&self) -> u64 {
        raftkv_storage::sm::leases::LEASES_MAX_DEFAULT
    }
    /// Opens a watch of `filter` on this node from `start_revision` (`None`: the next
    /// revision). Any node serves watches; no leader is needed.
    fn watch(
        &self,
        filter: KeyFilter,
        start_revision: Option<u64>,
    ) -> Result<WatchStream, WatchError> {
        let _ = (filter, start_revision);
        Err(WatchError::Closed)
    }
    /// How often an idle watch stream gets a progress line.
    fn watch_progress_ms(&self) -> u64 {
        crate::watch::WatchSettings::default().progress_ms
    }
    /// On the leader: renews lease `id` for its full TTL (after confirming leadership).
    fn lease_keepalive(
        &self,
        id: u64,
    ) -> impl Future<Output = Result<LeaseResponse, ServiceError>> + Send {
        let _ = id;
        async {
            Err(ServiceError::InvalidInput(
                "this service has no leases".into(),
            ))
        }
    }
    /// On the leader: lease `id`, its time left and up to `keys_max` of its keys.
    fn lease_get(
        &self,
        id: u64,
        keys_max: usize,
    ) -> impl Future<Output = Result<LeaseResponse, ServiceError>> + Send {
        let _ = (id, keys_max);
        async {
            Err(ServiceError::InvalidInput(
                "this service has no leases".into(),
            ))
        }
    }
    /// On the leader: every lease and its time left.
    fn lease_list(&self) -> impl Future<Output = Result<LeaseListResponse, ServiceError>> + Send {
        async {
            Err(ServiceError::InvalidInput(
                "this service has no leases".into(),
            ))
        }
    }
    /// On the leader, after a linearizable read barrier: a fresh snapshot file of the whole
    /// state (for a backup, or a member rejoining without its state machine). Services
    /// without snapshot files refuse.
    fn snapshot(&self) -> impl Future<Output = Result<SnapshotFileOut, ServiceError>> + Send {
        async {
            Err(ServiceError::InvalidInput(
                "this service keeps no snapshot files".into(),
            ))
        }
    }
}

/// A snapshot file ready to be streamed to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFileOut {
    /// The last log index (and its term) the snapshot contains.
    pub index: u64,
    pub term: u64,
    /// The cluster the snapshot was taken from (a backup records it).
    pub cluster_id: String,
    pub path: std::path::PathBuf,
    pub bytes: u64,
}
