//! `raftkv serve --join URL[,URL...]`: a new member with an empty data dir learns who it is and
//! what the cluster's configuration is before it starts.
//!
//! Why it asks instead of being told by flags: after `raftkv member add` the configuration
//! that names the new node lives in the cluster's log, with the addresses of every member.
//! Copying that into flags would be one more thing to get wrong. So the node asks any member
//! (`GET /cluster/status`, which carries the configuration in effect and each member's
//! addresses), finds itself in it — by `--id` if given, else by its advertised client URL or
//! peer address — and starts its core with that configuration and an empty log
//! (`Raft::join`). The leader then sends it the log, or a snapshot when it is far behind.
//!
//! The configuration it starts with only lets it accept the leader's messages: the log's
//! configurations replace it as they arrive. A member that has not seen the `member add` yet
//! (a lagging follower) is asked again, round after round, until `JOIN_TIMEOUT_MS`.

use super::{NodeConfig, NodeError};
use crate::api::ClusterStatus;
use raftkv_storage::{MemberAddrs, Membership, NodeId};
use std::time::{Duration, Instant};

/// How long a joining node keeps asking before it gives up and exits (its data dir stays
/// empty: a restart asks again).
pub const JOIN_TIMEOUT_MS: u64 = 120_000;
/// The largest status answer read from a member.
const STATUS_BYTES_MAX: usize = 4 << 20;

/// Who this node is in the cluster, and the cluster's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    pub id: NodeId,
    pub membership: Membership,
}

/// Asks the members at `config.join` (in order, round after round) until one names this node.
pub async fn discover(config: &NodeConfig) -> Result<Joined, NodeError> {
    assert!(!config.join.is_empty(), "discover needs --join URLs");
    let http = super::rejoin::http_client(config)?;
    let deadline = Instant::now() + Duration::from_millis(JOIN_TIMEOUT_MS);
    let mut last_error = String::new();
    while Instant::now() < deadline {
        for url in &config.join {
            match ask(&http, url).await {
                Ok(status) => match find_self(config, &status) {
                    Ok(joined) => {
                        tracing::info!(from = %url, id = joined.id, voters = ?joined.membership.voters, learners = ?joined.membership.learners, "found this node in the cluster's configuration");
                        return Ok(joined);
                    }
                    Err(JoinError::OtherCluster(e)) => return Err(NodeError::Config(e)),
                    Err(JoinError::NotYet(why)) => last_error = format!("{url}: {why}"),
                },
                Err(why) => last_error = format!("{url}: {why}"),
            }
            tracing::info!(%last_error, "not joined yet; asking again");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(NodeError::Stopped(format!(
        "could not join within {JOIN_TIMEOUT_MS} ms (last: {last_error}); was this node added with `raftkv member add`?"
    )))
}

/// One member's status, size-bounded.
async fn ask(http: &reqwest::Client, url: &str) -> Result<ClusterStatus, String> {
    let url = format!("{}/cluster/status", url.trim_end_matches('/'));
    let mut response = http.get(&url).send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("answered {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > STATUS_BYTES_MAX {
            return Err(format!("status larger than {STATUS_BYTES_MAX} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("not a cluster status: {e}"))
}

/// Why an answer did not let this node join.
#[derive(Debug, PartialEq, Eq)]
enum JoinError {
    /// The member belongs to another cluster: asking again will not help.
    OtherCluster(String),
    /// Not (yet) a member in this answer; another member or a later answer may do.
    NotYet(String),
}

/// This node in `status`'s configuration: by `config.id` if set, else by advertised client
/// URL, else by peer address.
fn find_self(config: &NodeConfig, status: &ClusterStatus) -> Result<Joined, JoinError> {
    if status.cluster_id != config.cluster_id {
        return Err(JoinError::OtherCluster(format!(
            "the member answering is of cluster {:?}, not {:?} (--cluster-id)",
            status.cluster_id, config.cluster_id
        )));
    }
    let membership = membership_of(status).map_err(JoinError::NotYet)?;
    let by_addr = status.members.iter().find(|m| {
        m.client_url.as_deref() == Some(config.client_url.as_str())
            || m.peer_addr == config.peer_addr
    });
    let id = match (config.id, by_addr) {
        (0, Some(m)) => m.id,
        (0, None) => {
            return Err(JoinError::NotYet(format!(
                "no member has client URL {} or peer address {}",
                config.client_url, config.peer_addr
            )))
        }
        (id, _) => id,
    };
    if !membership.contains(id) {
        return Err(JoinError::NotYet(format!(
            "node {id} is not in the configuration (voters {:?}, learners {:?})",
            membership.voters, membership.learners
        )));
    }
    debug_assert!(id != 0 && membership.contains(id));
    Ok(Joined { id, membership })
}

/// The configuration a status describes, with the members' addresses.
fn membership_of(status: &ClusterStatus) -> Result<Membership, String> {
    let s = &status.membership;
    let mut m = Membership {
        voters: s.voters.iter().copied().collect(),
        learners: s.learners.iter().copied().collect(),
        voters_outgoing: s.voters_outgoing.iter().copied().collect(),
        ..Membership::default()
    };
    for member in status.members.iter().filter(|m| !m.peer_addr.is_empty()) {
        let addrs = MemberAddrs {
            peer_addr: member.peer_addr.clone(),
            client_url: member.client_url.clone().unwrap_or_default(),
        };
        m.addrs.insert(member.id, addrs);
    }
    m.validate()
        .map_err(|e| format!("the configuration it reports is unusable: {e}"))?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MemberStatus, MembershipStatus};

    fn status() -> ClusterStatus {
        let member = |id: u64, role: &str| MemberStatus {
            id,
            role: role.into(),
            joint: None,
            peer_addr: format!("h{id}:9000"),
            client_url: Some(format!("http://h{id}:8000")),
            reachable: None,
            match_index: None,
        };
        ClusterStatus {
            id: 1,
            cluster_id: "c".into(),
            role: "leader".into(),
            term: 2,
            leader: None,
            first_index: 1,
            last_index: 9,
            commit_index: 9,
            applied_index: 9,
            snapshot_index: 0,
            members: vec![
                member(1, "voter"),
                member(2, "voter"),
                member(3, "voter"),
                member(4, "learner"),
            ],
            membership: MembershipStatus {
                voters: vec![1, 2, 3],
                learners: vec![4],
                index: 9,
                ..MembershipStatus::default()
            },
        }
    }

    fn config(id: u64, client_url: &str) -> NodeConfig {
        NodeConfig {
            id,
            cluster_id: "c".into(),
            client_url: client_url.into(),
            peer_addr: "0.0.0.0:9000".into(),
            ..NodeConfig::default()
        }
    }

    #[test]
    fn a_new_member_finds_itself_by_id_or_by_its_advertised_url() {
        let by_url = find_self(&config(0, "http://h4:8000"), &status()).unwrap();
        assert_eq!(by_url.id, 4);
        assert_eq!(by_url.membership.learners, [4].into());
        assert_eq!(by_url.membership.addrs[&2].peer_addr, "h2:9000");
        let by_id = find_self(&config(4, "http://elsewhere:1"), &status()).unwrap();
        assert_eq!(by_id, by_url);
    }

    #[test]
    fn not_a_member_yet_is_retried_and_another_cluster_is_not() {
        assert!(matches!(
            find_self(&config(5, "http://h5:8000"), &status()),
            Err(JoinError::NotYet(_))
        ));
        assert!(matches!(
            find_self(&config(0, "http://h5:8000"), &status()),
            Err(JoinError::NotYet(_))
        ));
        let mut other = config(4, "http://h4:8000");
        other.cluster_id = "d".into();
        assert!(matches!(
            find_self(&other, &status()),
            Err(JoinError::OtherCluster(_))
        ));
    }
}
