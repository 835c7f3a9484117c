//! A single-node [`KvService`] for tests of the HTTP layer and the client.
//!
//! As a leader it applies every write at once, as the next log entry, to a real state machine
//! in a temporary sled database (so revisions, conditional writes, transactions and sessions
//! behave exactly as on a node) and serves reads from it; as a follower it answers writes and
//! non-stale reads with "not the leader", naming a leader, exactly as the node does.
//! Membership changes apply at once to a small model of the configuration (with the node's
//! 404/409 answers for unknown members, duplicates and the last voter), and every proposal
//! is recorded so that tests can assert what the HTTP layer asked for.
//!
//! Compiled in every build (hidden from the docs, not part of the API) because the
//! `http_request` fuzz target and its corpus replay (`crate::fuzz_targets`) serve it too.

use super::*;
use crate::raft::{MemberChange, MembershipProposal};
use raftkv_storage::command::CommandLimits;
use raftkv_storage::sm::{EntryOutcome, StateMachine, StateMachineOptions};
use raftkv_storage::{Entry, EntryKind, MemberAddrs, NodeId};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// One member of the modelled configuration.
#[derive(Clone, Debug, Default)]
struct ModelMember {
    voter: bool,
    addrs: MemberAddrs,
}

/// The modelled configuration: members by id, and the index of the last change.
type MemberModel = (BTreeMap<NodeId, ModelMember>, u64);

/// A service over a map. As a follower it answers writes and non-stale reads with
/// "not the leader", naming `leader`.
pub struct MapService {
    id: NodeId,
    /// The state machine; the mutex orders writes (each is the next log index).
    sm: StateMachine,
    write_lock: Mutex<()>,
    leader: Option<LeaderHint>,
    /// When set, every write fails with this error.
    pub write_error: Option<ServiceError>,
    /// When set, a leader serves `GET /snapshot` as a snapshot file of the map written here,
    /// from cluster [`SNAPSHOT_CLUSTER_ID`]; otherwise it refuses like any service without
    /// snapshot files.
    pub snapshot_dir: Option<std::path::PathBuf>,
    /// When set, every membership change (on the leader) is recorded, then fails with this.
    pub membership_error: Option<ServiceError>,
    /// Every membership proposal the leader received, in order (clone the `Arc` before
    /// serving the service to read it afterwards).
    pub proposals: Arc<Mutex<Vec<MembershipProposal>>>,
    members: Mutex<MemberModel>,
}

/// The cluster id a map service's snapshots come from (not a valid header value unencoded).
pub const SNAPSHOT_CLUSTER_ID: &str = "test cluster/ü";

impl MapService {
    pub fn leader(id: NodeId) -> MapService {
        MapService::new(id, None)
    }

    pub fn follower(id: NodeId, leader: NodeId, url: Option<String>) -> MapService {
        MapService::new(
            id,
            Some(LeaderHint {
                id: leader,
                client_url: url,
            }),
        )
    }

    /// This node and the leader it names are voters.
    fn new(id: NodeId, leader: Option<LeaderHint>) -> MapService {
        let voter = ModelMember {
            voter: true,
            addrs: MemberAddrs::default(),
        };
        let mut members = BTreeMap::from([(id, voter.clone())]);
        if let Some(l) = &leader {
            members.insert(l.id, voter);
        }
        let sm = StateMachine::open_temporary(StateMachineOptions {
            cache_bytes: 1 << 20,
            ..StateMachineOptions::default()
        })
        .expect("a temporary sled database opens");
        MapService {
            id,
            sm,
            write_lock: Mutex::new(()),
            leader,
            write_error: None,
            snapshot_dir: None,
            membership_error: None,
            proposals: Arc::default(),
            members: Mutex::new((members, 1)),
        }
    }

    fn check_write(&self) -> Result<(), ServiceError> {
        self.redirect()?;
        match &self.write_error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn redirect(&self) -> Result<(), ServiceError> {
        match &self.leader {
            Some(l) => Err(ServiceError::NotLeader {
                leader: Some(l.clone()),
            }),
            None => Ok(()),
        }
    }
}

/// Applies one change to the modelled configuration, answering as the node does.
fn apply_member_change(
    members: &mut BTreeMap<NodeId, ModelMember>,
    change: &MemberChange,
) -> Result<(), ServiceError> {
    let id = change.id();
    match change {
        MemberChange::AddLearner { addrs, .. } | MemberChange::AddVoter { addrs, .. } => {
            if members.contains_key(&id) {
                return Err(ServiceError::Conflict(format!(
                    "node {id} is already a member"
                )));
            }
            let voter = matches!(change, MemberChange::AddVoter { .. });
            let addrs = addrs.clone();
            members.insert(id, ModelMember { voter, addrs });
        }
        MemberChange::Promote { .. } => match members.get_mut(&id) {
            None => return Err(ServiceError::NotFound(format!("node {id} is not a member"))),
            Some(m) if m.voter => {
                return Err(ServiceError::Conflict(format!(
                    "node {id} is already a voter"
                )))
            }
            Some(m) => m.voter = true,
        },
        MemberChange::Remove { .. } => {
            if members.remove(&id).is_none() {
                return Err(ServiceError::NotFound(format!("node {id} is not a member")));
            }
            if !members.values().any(|m| m.voter) {
                return Err(ServiceError::Conflict(
                    "the change would remove the last voter".into(),
                ));
            }
        }
    }
    Ok(())
}

impl MapService {
    /// The modelled configuration as a status reports it.
    fn member_statuses(&self) -> (Vec<MemberStatus>, MembershipStatus) {
        let (members, index) = self
            .members
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let is_leader = self.leader.is_none();
        let statuses = members
            .iter()
            .map(|(&id, m)| MemberStatus {
                id,
                role: if m.voter { "voter" } else { "learner" }.into(),
                joint: None,
                peer_addr: m.addrs.peer_addr.clone(),
                client_url: Some(m.addrs.client_url.clone()).filter(|u| !u.is_empty()),
                reachable: is_leader.then_some(true),
                match_index: is_leader.then_some(index),
            })
            .collect();
        let ids = |voter: bool| {
            members
                .iter()
                .filter(|(_, m)| m.voter == voter)
                .map(|(&id, _)| id)
                .collect()
        };
        let membership = MembershipStatus {
            voters: ids(true),
            learners: ids(false),
            voters_outgoing: Vec::new(),
            index,
            change_in_flight: false,
            removed: !members.contains_key(&self.id),
        };
        (statuses, membership)
    }
}

impl KvService for MapService {
    fn node_id(&self) -> NodeId {
        self.id
    }

    fn limits(&self) -> Limits {
        Limits {
            command: CommandLimits {
                key_bytes_max: 64,
                value_bytes_max: 1024,
            },
            list_limit_max: 100,
            txn: raftkv_storage::txn::TxnLimits {
                compares_max: 8,
                ops_max: 8,
                bytes_max: 4096,
            },
        }
    }

    async fn write(
        &self,
        command: raftkv_storage::command::CommandRef<'_>,
        session: Option<&ClientSession>,
    ) -> Result<Applied, ServiceError> {
        self.check_write()?;
        crate::node::service::validate_write(&command, &self.limits())?;
        let session = session.map(ClientSession::stamped).transpose()?;
        let payload = command
            .encode_with(session)
            .map_err(|e| ServiceError::InvalidInput(e.to_string()))?;
        let _order = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let entry = Entry {
            index: self.sm.applied_index() + 1,
            term: 1,
            kind: EntryKind::Normal,
            payload: payload.into(),
        };
        let applied = self
            .sm
            .apply(&[entry])
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        match applied.into_iter().next().map(|a| a.outcome) {
            Some(EntryOutcome::Command(result)) => Ok(Applied {
                result,
                leader: self.id,
            }),
            other => Err(ServiceError::Internal(format!("applied {other:?}"))),
        }
    }

    async fn get(&self, key: String, c: Consistency) -> Result<ReadValue, ServiceError> {
        if c != Consistency::Stale {
            self.redirect()?;
        }
        let read = self
            .sm
            .get_record(key.as_bytes())
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(ReadValue {
            kv: read.value.map(key_value),
            index: read.applied_index,
            leader: (c != Consistency::Stale).then_some(self.id),
        })
    }

    async fn list(&self, q: ListQuery, c: Consistency) -> Result<Listed, ServiceError> {
        if c != Consistency::Stale {
            self.redirect()?;
        }
        let page = self
            .sm
            .scan_prefix_records(
                q.prefix.as_bytes(),
                q.after.as_ref().map(|a| a.as_bytes()),
                q.limit,
                q.bytes_max,
            )
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let (records, more) = page.value;
        Ok(Listed {
            items: records.into_iter().map(key_value).collect(),
            index: page.applied_index,
            more,
        })
    }

    async fn status(&self) -> Result<ClusterStatus, ServiceError> {
        let (members, membership) = self.member_statuses();
        let leader = match &self.leader {
            Some(l) => LeaderInfo {
                id: l.id,
                client_url: l.client_url.clone(),
            },
            None => LeaderInfo {
                id: self.id,
                client_url: None,
            },
        };
        Ok(ClusterStatus {
            id: self.id,
            cluster_id: "test".into(),
            role: if self.leader.is_some() {
                "follower"
            } else {
                "leader"
            }
            .into(),
            term: 1,
            leader: Some(leader),
            first_index: 1,
            last_index: 0,
            commit_index: 0,
            applied_index: 0,
            snapshot_index: 0,
            members,
            membership,
        })
    }

    async fn change_membership(
        &self,
        proposal: MembershipProposal,
    ) -> Result<ClusterStatus, ServiceError> {
        self.redirect()?;
        self.proposals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(proposal.clone());
        if let Some(e) = &self.membership_error {
            return Err(e.clone());
        }
        {
            let mut model = self.members.lock().unwrap_or_else(|p| p.into_inner());
            // All or nothing, as one configuration entry.
            let mut next = model.0.clone();
            for change in &proposal.changes {
                apply_member_change(&mut next, change)?;
            }
            model.0 = next;
            model.1 += 1;
        }
        self.status().await
    }

    async fn ready(&self) -> Result<(), ServiceError> {
        match &self.leader {
            Some(l) if l.client_url.is_none() => Err(ServiceError::Unavailable("no leader".into())),
            _ => Ok(()),
        }
    }

    async fn transfer_leader(&self, to: NodeId) -> Result<(), ServiceError> {
        self.redirect()?;
        if to == 99 {
            return Err(ServiceError::InvalidInput("unknown node 99".into()));
        }
        Ok(())
    }

    async fn snapshot(&self) -> Result<SnapshotFileOut, ServiceError> {
        self.redirect()?;
        let Some(dir) = &self.snapshot_dir else {
            return Err(ServiceError::InvalidInput(
                "this service keeps no snapshot files".into(),
            ));
        };
        let view = self
            .sm
            .begin_snapshot()
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let index = view.meta().index.max(1);
        let meta = raftkv_storage::SnapshotMeta {
            index,
            term: 1,
            membership: raftkv_storage::Membership::with_voters([self.id]),
        };
        let path = dir.join(raftkv_storage::snapshot::file_name(index, 1));
        let internal = |e: std::io::Error| ServiceError::Internal(e.to_string());
        let written = (|| {
            use raftkv_storage::vfs::Vfs as _;
            let file = raftkv_storage::vfs::StdFs.open(&path, true)?;
            let mut w = raftkv_storage::snapshot::format::SnapshotFileWriter::new(file, meta, 256)?;
            for pair in view.pairs() {
                let (k, v) = pair.map_err(std::io::Error::other)?;
                w.push(&k, &v)?;
            }
            w.finish()
        })()
        .map_err(internal)?;
        Ok(SnapshotFileOut {
            index,
            term: 1,
            cluster_id: SNAPSHOT_CLUSTER_ID.into(),
            path,
            bytes: written.file_bytes,
        })
    }
}

/// Serves `service` on a free loopback port with default options; returns its base URL.
#[cfg(test)]
pub(crate) async fn spawn(service: MapService) -> String {
    spawn_with(service, http::RouterOptions::default(), None).await
}

/// Serves `service` on a free loopback port; returns its base URL (`https://` with `tls`).
#[cfg(test)]
pub(crate) async fn spawn_with(
    service: MapService,
    options: http::RouterOptions,
    tls: Option<server::Tls>,
) -> String {
    crate::tls::ensure_provider(); // for the tests' own reqwest clients
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}", listener.local_addr().unwrap());
    let app = http::router_with(std::sync::Arc::new(service), &options);
    tokio::spawn(server::serve(
        listener,
        app,
        options.port,
        tls,
        std::future::pending(),
    ));
    url
}

/// A leader (node 1) and a follower (node 2) that names it, both served with `options`;
/// returns their URLs.
#[cfg(test)]
pub(crate) async fn spawn_leader_and_follower(options: http::RouterOptions) -> (String, String) {
    let leader = spawn_with(MapService::leader(1), options.clone(), None).await;
    let follower = spawn_with(
        MapService::follower(2, 1, Some(leader.clone())),
        options,
        None,
    )
    .await;
    (leader, follower)
}

/// A test CA and a certificate for `127.0.0.1`/`localhost` it signed, written as PEM files
/// into `dir`: (ca.pem, cert.pem, key.pem). Generated at run time: nothing secret is checked in.
#[cfg(test)]
pub(crate) fn test_pki(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// Serves `service` over HTTPS with a fresh test PKI; returns its URL and the PKI's dir
/// (`ca.pem` in it).
#[cfg(test)]
pub(crate) async fn spawn_tls(service: MapService) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = test_pki(dir.path());
    let config = crate::tls::server_config(&cert, &key, None).unwrap();
    let url = spawn_with(
        service,
        http::RouterOptions::default(),
        Some(server::Tls::from(config)),
    )
    .await;
    (url, dir)
}
