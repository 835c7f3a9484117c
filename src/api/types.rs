//! JSON shapes of the client API, shared by the server and the Rust client.
//!
//! Field names are public interface: scripts parse them. Additions are fine; renames are not.

use raftkv_storage::NodeId;
use serde::{Deserialize, Serialize};

/// Body of `PUT /kv/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutBody {
    pub value: String,
}

/// Body of `POST /cluster/transfer-leader`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferBody {
    pub to: NodeId,
}

/// Body of `POST /cluster/members`: a new member, a voter unless `learner`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberAddBody {
    pub id: NodeId,
    /// `host:port` of the new member's peer transport.
    pub peer_addr: String,
    /// `http(s)://host:port` of the new member's client API.
    pub client_url: String,
    /// Add as a learner (receives the log, never votes; promote it once caught up). The
    /// default adds a voter at once, under the reachable-quorum guard.
    #[serde(default)]
    pub learner: bool,
    /// Skip the reachable-quorum guard (never the other guards).
    #[serde(default)]
    pub force: bool,
}

/// Response of `GET /cluster/members`: the answering node's view of the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersResponse {
    /// Every member, sorted by id; `match_index` and `reachable` when the answering node leads.
    pub members: Vec<MemberStatus>,
    pub membership: MembershipStatus,
    /// The leader as the answering node knows it (`null`: none known).
    pub leader: Option<LeaderInfo>,
    /// The node that answered.
    pub id: NodeId,
}

/// A read: the key (if present) and the applied index it reflects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadValue {
    pub kv: Option<KeyValue>,
    pub index: u64,
    /// The leader that confirmed the read (none for a stale read).
    pub leader: Option<NodeId>,
}

/// A listing, in key order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    pub items: Vec<KeyValue>,
    pub index: u64,
    /// The listing stopped at a count or byte cap with more keys under the prefix.
    #[serde(default)]
    pub more: bool,
}

/// One key, its value and its revisions (a list item, a txn `get` result, a 412's `current`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    /// The revision (log index) of the write that created the key.
    #[serde(default)]
    pub create_revision: u64,
    /// The revision (log index) of the key's latest write.
    #[serde(default)]
    pub mod_revision: u64,
    /// Writes since the key was created (1 after its first put).
    #[serde(default)]
    pub version: u64,
}

/// Response of `PUT /kv/{key}` and `GET /kv/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvResponse {
    pub key: String,
    pub value: String,
    /// The log index the write applied at (PUT) or the read reflects (GET); kept for
    /// round-1 scripts, equal to `revision`.
    pub index: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<NodeId>,
    /// The store's revision the response was served at (also `X-Raftkv-Revision`).
    #[serde(default)]
    pub revision: u64,
    #[serde(default)]
    pub create_revision: u64,
    #[serde(default)]
    pub mod_revision: u64,
    #[serde(default)]
    pub version: u64,
}

/// Response of `DELETE /kv/{key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteResponse {
    pub key: String,
    pub deleted: bool,
    pub index: u64,
    pub leader: NodeId,
    /// The revision the delete applied at.
    #[serde(default)]
    pub revision: u64,
}

/// Response of `DELETE /kv?prefix=P`: every key under the prefix went in one entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletePrefixResponse {
    pub prefix: String,
    /// How many keys were deleted.
    pub deleted: u64,
    pub revision: u64,
    pub leader: NodeId,
}

/// A 412 body: a conditional write's condition did not hold, nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConditionFailedBody {
    pub error: String,
    /// Always `condition_failed`.
    pub kind: String,
    /// The key as it is now (`null`: absent).
    pub current: Option<KeyValue>,
    /// The revision the condition was evaluated at.
    pub revision: u64,
}

/// Body of `POST /txn` (and of `raftkv txn --file`): if every compare holds, `success` runs,
/// else `failure`; either way atomically, as one log entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxnRequest {
    #[serde(default)]
    pub compare: Vec<TxnCompare>,
    #[serde(default)]
    pub success: Vec<TxnOp>,
    #[serde(default)]
    pub failure: Vec<TxnOp>,
}

/// One condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxnCompare {
    pub key: String,
    /// `value`, `version`, `create_revision` or `mod_revision`.
    pub target: String,
    /// `==`, `!=`, `<` or `>`.
    pub op: String,
    /// A string for `value`, a non-negative integer for the others.
    pub value: serde_json::Value,
}

/// One operation of a transaction branch: `{"put": {"key", "value"}}`, `{"delete": {"key"}}`,
/// `{"delete_prefix": {"prefix"}}` or `{"get": {"key"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TxnOp {
    Put { key: String, value: String },
    Delete { key: String },
    DeletePrefix { prefix: String },
    Get { key: String },
}

/// Response of `POST /txn`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    /// Whether every compare held (so `success` ran, else `failure`).
    pub succeeded: bool,
    /// One result per operation of the branch that ran, in order.
    pub results: Vec<TxnOpResult>,
    /// The revision (log index) the transaction applied at.
    pub revision: u64,
    pub leader: NodeId,
}

/// The result of one transaction operation, tagged like the operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxnOpResult {
    /// The key's version after the put.
    Put {
        key: String,
        version: u64,
    },
    /// `deleted`: 1 if the key existed, else 0.
    Delete {
        key: String,
        deleted: u64,
    },
    DeletePrefix {
        prefix: String,
        deleted: u64,
    },
    /// `kv`: the key as earlier operations of the same branch left it (`null`: absent).
    Get {
        key: String,
        kv: Option<KeyValue>,
    },
}

/// Response of `GET /kv?prefix=P&limit=N&start=K`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse {
    pub items: Vec<KeyValue>,
    pub count: usize,
    pub index: u64,
    /// The revision the listing reflects (equal to `index`; also `X-Raftkv-Revision`).
    #[serde(default)]
    pub revision: u64,
    /// More keys lie under the prefix past this page (it stopped at `limit` or the byte cap).
    #[serde(default)]
    pub more: bool,
    /// When `more`: the last key returned; `start=<next>` continues strictly after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Every error body: `{"error": "...", "kind": "..."}`. Kinds include `key_not_found` (a
/// missing key) and `no_such_endpoint` (a routing 404), which clients must not confuse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// Response of `GET /ready` when the node is ready (200); otherwise an [`ErrorBody`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyResponse {
    pub ready: bool,
    pub id: NodeId,
}

/// The leader as reported in a status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    pub id: NodeId,
    pub client_url: Option<String>,
}

/// One member as a node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: NodeId,
    /// `voter` or `learner`.
    #[serde(default)]
    pub role: String,
    /// In a joint configuration: whether the member votes in the outgoing half, the
    /// incoming half, or both (`outgoing`, `incoming`, `both`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joint: Option<String>,
    pub peer_addr: String,
    pub client_url: Option<String>,
    /// On the leader: whether the member answered within an election timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
    /// On the leader: the highest index known replicated on this member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_index: Option<u64>,
}

/// Response of `GET /cluster/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub id: NodeId,
    pub cluster_id: String,
    /// `leader`, `follower`, `candidate` or `pre-candidate`.
    pub role: String,
    pub term: u64,
    pub leader: Option<LeaderInfo>,
    pub first_index: u64,
    pub last_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub members: Vec<MemberStatus>,
    /// The configuration in effect (see `members` for each member's address and progress).
    #[serde(default)]
    pub membership: MembershipStatus,
}

/// The configuration a node has in effect, in `GET /cluster/status` and `GET /cluster/members`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipStatus {
    /// Voters (in a joint configuration: the incoming voters), sorted.
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Non-empty only while a change of voters is under way (joint consensus).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub voters_outgoing: Vec<NodeId>,
    /// The log index of the entry (or snapshot) that set this configuration.
    pub index: u64,
    /// A change is under way (joint, or not committed yet): another is refused with 409.
    pub change_in_flight: bool,
    /// This node is not in the configuration: it was removed and takes no part.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

/// One line of a `GET /watch` stream (newline-delimited JSON), tagged by `type`.
///
/// `put` and `delete` events come in revision order, each exactly once; a `delete` carries
/// the key and the revision it was deleted at (`value` empty, `create_revision` and
/// `version` 0). `progress` says every event up to `revision` has been sent. `error` is the
/// last line of a stream the server ended (`kind`: `watcher_too_slow`, `compacted`,
/// `shutting_down`); resume from the last event's `mod_revision + 1` (or a progress
/// `revision + 1`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WatchEvent {
    Put(WatchKv),
    Delete(WatchKv),
    Progress {
        revision: u64,
    },
    Error {
        error: String,
        kind: String,
        /// The next revision the watcher would have sent: resume from here.
        revision: u64,
    },
}

impl WatchEvent {
    /// The revision a watcher has seen everything up to after this line (0 for an error).
    pub fn seen_revision(&self) -> u64 {
        match self {
            WatchEvent::Put(kv) | WatchEvent::Delete(kv) => kv.mod_revision,
            WatchEvent::Progress { revision } => *revision,
            WatchEvent::Error { .. } => 0,
        }
    }
}

/// The key of a watch event and its revisions after the event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchKv {
    pub key: String,
    #[serde(default)]
    pub value: String,
    #[serde(default)]
    pub create_revision: u64,
    pub mod_revision: u64,
    #[serde(default)]
    pub version: u64,
    /// The lease the key is attached to (0: none).
    #[serde(default)]
    pub lease: u64,
}

/// A 410 body: the watch's start revision is older than the history the node keeps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactedBody {
    /// Always `compacted`.
    pub error: String,
    /// Always `compacted`.
    pub kind: String,
    /// History up to and including this revision is gone: start after it (or re-read).
    pub compact_revision: u64,
}

/// Body of `POST /lease`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseGrantBody {
    pub ttl_s: u64,
}

/// Response of `POST /lease`: the new lease (its id is the revision that granted it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrantResponse {
    pub id: u64,
    pub ttl_s: u64,
    pub revision: u64,
    pub leader: NodeId,
}

/// Response of `POST /lease/{id}/keepalive` and `GET /lease/{id}`: the lease's TTL, the time
/// left before the leader expires it, and (for `GET`) its keys in key order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseResponse {
    pub id: u64,
    /// The TTL it was granted with.
    pub ttl_s: u64,
    /// Time left before the leader revokes it, in whole seconds rounded up.
    pub remaining_s: u64,
    pub remaining_ms: u64,
    /// Attached keys (`GET` only; at most the list cap, `keys_more` if cut).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    #[serde(default)]
    pub keys_count: u64,
    #[serde(default)]
    pub keys_more: bool,
    pub leader: NodeId,
}

/// Response of `DELETE /lease/{id}`: the lease is gone and its keys with it, at `revision`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRevokeResponse {
    pub id: u64,
    /// How many keys were deleted with it.
    pub deleted: u64,
    pub revision: u64,
    pub leader: NodeId,
}

/// One lease of `GET /lease`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseSummary {
    pub id: u64,
    pub ttl_s: u64,
    pub keys_count: u64,
    /// Time left before expiry, when answered by the leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_ms: Option<u64>,
}

/// Response of `GET /lease`: every lease, by id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseListResponse {
    pub leases: Vec<LeaseSummary>,
    pub revision: u64,
    pub leader: NodeId,
}
