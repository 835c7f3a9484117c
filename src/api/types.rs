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
