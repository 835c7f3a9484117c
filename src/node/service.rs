//! [`NodeService`]: the client API ([`KvService`]) of a running node.
//!
//! Writes become proposals to the consensus task and wait (at most `request_timeout_ms`) for
//! their entry to apply; a timeout is 504 "outcome unknown". Linearizable reads wait for a
//! ReadIndex confirmation, then read the shared state machine; stale reads read it at once.
//! A membership change waits (at most `request_timeout_ms` too) for the consensus step to say
//! it completed; a timeout is 504 "outcome unknown: the change may still complete".
//! Every request is checked against the limits before it reaches the log.

use super::apply::Pending;
use super::lessor::{KeepaliveError, Lessor};
use super::NodeConfig;
use crate::api::{
    key_value, Applied, ClientSession, ClusterStatus, Consistency, KvService, Limits, ListQuery,
    Listed, ReadValue, ServiceError, SnapshotFileOut,
};
use crate::api::{LeaseListResponse, LeaseResponse, LeaseSummary};
use crate::metrics::Metrics;
use crate::raft::{MembershipProposal, ReadLevel};
use crate::watch::{WatchError, WatchHub, WatchStream};
use raftkv_storage::command::{CommandRef, SessionRef};
use raftkv_storage::sm::history::KeyFilter;
use raftkv_storage::sm::leases::LeaseInfo;
use raftkv_storage::sm::StateMachine;
use raftkv_storage::snapshot::SnapshotStore;
use raftkv_storage::NodeId;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub use super::messages::{ProposalOutcome, Request};

/// The node's client API.
pub struct NodeService {
    id: NodeId,
    cluster_id: String,
    limits: Limits,
    requests: mpsc::Sender<Request>,
    sm: Arc<StateMachine>,
    snapshots: Arc<SnapshotStore>,
    request_timeout: Duration,
    /// The writes waiting to apply (for `raftkv_server_proposals_pending_total`).
    pending: Arc<Pending>,
    metrics: Arc<Metrics>,
    hub: Arc<WatchHub>,
    lessor: std::sync::Mutex<Lessor>,
    /// The lessor's clock: milliseconds since this instant (monotonic).
    clock_origin: std::time::Instant,
    leases_max: u64,
}

impl NodeService {
    pub fn new(
        config: &NodeConfig,
        requests: mpsc::Sender<Request>,
        sm: Arc<StateMachine>,
        snapshots: Arc<SnapshotStore>,
        pending: Arc<Pending>,
        metrics: Arc<Metrics>,
        hub: Arc<WatchHub>,
    ) -> NodeService {
        NodeService {
            id: config.id,
            cluster_id: config.cluster_id.clone(),
            limits: config.limits,
            requests,
            sm,
            snapshots,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            pending,
            metrics,
            hub,
            lessor: std::sync::Mutex::new(Lessor::new()),
            clock_origin: std::time::Instant::now(),
            leases_max: config.leases.leases_max,
        }
    }

    /// The lessor's monotonic clock.
    fn lease_clock_ms(&self) -> u64 {
        u64::try_from(self.clock_origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock_lessor(&self) -> std::sync::MutexGuard<'_, Lessor> {
        // The lessor's updates leave it consistent before anything can panic.
        self.lessor.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lease upkeep, run every [`LEASE_TICK_MS`](super::LEASE_TICK_MS): tells the lessor
    /// whether this node leads and returns the expired leases whose revoke to propose.
    pub async fn expired_leases(&self) -> Result<Vec<u64>, ServiceError> {
        let status = self.status().await?;
        let now_ms = self.lease_clock_ms();
        let term = (status.role == "leader").then_some(status.term);
        Ok(self.lock_lessor().upkeep(&self.sm, term, now_ms))
    }

    /// Proposes the revoke of an expired lease (the lessor's decision).
    pub async fn revoke_expired(&self, id: u64) -> Result<(), ServiceError> {
        let outcome = self.propose(CommandRef::LeaseRevoke { id }, None).await?;
        tracing::info!(lease = id, revision = outcome.index, result = ?outcome.result.outcome, "lease expired and revoked");
        Ok(())
    }

    /// Confirms this node leads (a ReadIndex round) and returns its term and the lessor clock
    /// from *before* the round (see `lessor`'s time-safety argument).
    async fn confirm_leader(&self) -> Result<(u64, u64), ServiceError> {
        let before_ms = self.lease_clock_ms();
        self.read_barrier(Consistency::Linearizable).await?;
        let status = self.status().await?;
        if status.role != "leader" {
            return Err(ServiceError::Unavailable(
                "leadership moved during the request; retry".into(),
            ));
        }
        Ok((status.term, before_ms))
    }

    fn lease_response(&self, info: LeaseInfo, remaining_ms: u64) -> LeaseResponse {
        LeaseResponse {
            id: info.id,
            ttl_s: info.ttl_ms / 1000,
            remaining_s: remaining_ms.div_ceil(1000),
            remaining_ms,
            keys: Vec::new(),
            keys_count: info.keys,
            keys_more: false,
            leader: self.id,
        }
    }

    fn submit(&self, request: Request) -> Result<(), ServiceError> {
        self.requests.try_send(request).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                ServiceError::Unavailable("the node is overloaded; retry".into())
            }
            mpsc::error::TrySendError::Closed(_) => {
                ServiceError::Unavailable("the node is shutting down".into())
            }
        })
    }

    /// Proposes `command` and waits for it to apply; counts the failures that reached this
    /// node's log or queue (`raftkv_server_proposals_failed_total`): not "not the leader",
    /// which a client or the forwarder resolves, and not invalid input.
    async fn propose(
        &self,
        command: CommandRef<'_>,
        session: Option<SessionRef<'_>>,
    ) -> Result<ProposalOutcome, ServiceError> {
        let result = self.propose_and_wait(command, session).await;
        if let Err(ServiceError::Unavailable(_) | ServiceError::Timeout(_)) = &result {
            self.metrics.proposals_failed.inc();
        }
        result
    }

    async fn propose_and_wait(
        &self,
        command: CommandRef<'_>,
        session: Option<SessionRef<'_>>,
    ) -> Result<ProposalOutcome, ServiceError> {
        let payload = command
            .encode_with(session)
            .map_err(|e| ServiceError::InvalidInput(e.to_string()))?;
        let (reply, rx) = oneshot::channel();
        self.submit(Request::Propose { payload, reply })?;
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ServiceError::Timeout(
                "the node stopped before the write finished".into(),
            )),
            Err(_) => Err(ServiceError::Timeout(format!(
                "the write was not committed within {} ms",
                self.request_timeout.as_millis()
            ))),
        }
    }

    /// Confirms a read point at `consistency` (none for a stale read: any node answers from
    /// what it applied); returns the leader that confirmed it.
    async fn read_barrier(&self, consistency: Consistency) -> Result<Option<NodeId>, ServiceError> {
        let level = match consistency {
            Consistency::Stale => return Ok(None),
            Consistency::Linearizable => ReadLevel::Linearizable,
            Consistency::Lease => ReadLevel::Lease,
        };
        let (reply, rx) = oneshot::channel();
        self.submit(Request::Read { level, reply })?;
        let (index, leader) = match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => {
                return Err(ServiceError::Unavailable(
                    "the node is shutting down".into(),
                ))
            }
            Err(_) => {
                return Err(ServiceError::Unavailable(
                    "the read could not be confirmed in time".into(),
                ))
            }
        };
        // The consensus step answers only once the state machine has applied `index`.
        debug_assert!(
            self.sm.applied_index() >= index,
            "read released before its index applied"
        );
        Ok(Some(leader))
    }

    /// The leader's session upkeep, run every [`session_upkeep_period_ms`]: proposes an
    /// `ExpireSessions` entry (this node's clock, `--session-ttl-s`, `--sessions-max`) when a
    /// session is due to expire, the table is over its bound, or the applied parameters are
    /// not the configured ones. Other nodes do nothing. Returns whether it proposed.
    pub async fn expire_sessions_if_due(
        &self,
        settings: super::SessionSettings,
    ) -> Result<bool, ServiceError> {
        let summary = self.sm.sessions_summary();
        let now_ms = wall_clock_ms();
        let configured = (settings.ttl_ms, settings.sessions_max);
        let due = summary
            .oldest_active_ms
            .is_some_and(|ms| ms.saturating_add(summary.params.ttl_ms) <= now_ms)
            || summary.count > settings.sessions_max
            || (summary.params.ttl_ms, summary.params.sessions_max) != configured;
        if !due || self.status().await?.role != "leader" {
            return Ok(false);
        }
        let command = CommandRef::ExpireSessions {
            now_ms,
            ttl_ms: settings.ttl_ms,
            sessions_max: settings.sessions_max,
        };
        let outcome = self.propose(command, None).await?;
        tracing::debug!(index = outcome.index, result = ?outcome.result.outcome, "session upkeep");
        Ok(true)
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, ServiceError> {
        let (reply, rx) = oneshot::channel();
        self.submit(make(reply))?;
        rx.await
            .map_err(|_| ServiceError::Unavailable("the node is shutting down".into()))
    }
}

/// Checks a write against the limits before it reaches the log: sizes, transaction bounds,
/// a non-empty prefix to delete. `ExpireSessions` is the leader's own, never a client's.
pub fn validate_write(command: &CommandRef<'_>, limits: &Limits) -> Result<(), ServiceError> {
    match command {
        CommandRef::Txn(txn) => txn.validate(&limits.txn, &limits.command)?,
        CommandRef::ExpireSessions { .. } => {
            return Err(ServiceError::InvalidInput(
                "session expiry is proposed by the leader only".into(),
            ))
        }
        other => other.validate(&limits.command)?,
    }
    Ok(())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it): the session clock a
/// sessioned write carries into the log.
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64)
}

fn sm_error(e: raftkv_storage::sm::SmError) -> ServiceError {
    ServiceError::Internal(format!("state machine: {e}"))
}

impl KvService for NodeService {
    fn node_id(&self) -> NodeId {
        self.id
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    async fn write(
        &self,
        command: CommandRef<'_>,
        session: Option<&ClientSession>,
    ) -> Result<Applied, ServiceError> {
        validate_write(&command, &self.limits)?;
        let session = session.map(ClientSession::stamped).transpose()?;
        let outcome = self.propose(command, session).await?;
        assert!(outcome.result.revision <= outcome.index);
        Ok(Applied {
            result: outcome.result,
            leader: self.id,
        })
    }

    async fn get(&self, key: String, consistency: Consistency) -> Result<ReadValue, ServiceError> {
        self.limits.command.check_key(key.as_bytes())?;
        let leader = self.read_barrier(consistency).await?;
        let read = self.sm.get_record(key.as_bytes()).map_err(sm_error)?;
        Ok(ReadValue {
            kv: read.value.map(key_value),
            index: read.applied_index,
            leader,
        })
    }

    async fn list(&self, q: ListQuery, consistency: Consistency) -> Result<Listed, ServiceError> {
        self.read_barrier(consistency).await?;
        let page = self
            .sm
            .scan_prefix_records(
                q.prefix.as_bytes(),
                q.after.as_ref().map(|a| a.as_bytes()),
                q.limit,
                q.bytes_max,
            )
            .map_err(sm_error)?;
        let (records, more) = page.value;
        Ok(Listed {
            items: records.into_iter().map(key_value).collect(),
            index: page.applied_index,
            more,
        })
    }

    async fn status(&self) -> Result<ClusterStatus, ServiceError> {
        self.ask(|reply| Request::Status { reply }).await
    }

    async fn ready(&self) -> Result<(), ServiceError> {
        self.ask(|reply| Request::Ready { reply }).await?
    }

    async fn transfer_leader(&self, to: NodeId) -> Result<(), ServiceError> {
        self.ask(|reply| Request::Transfer { to, reply }).await?
    }

    async fn change_membership(
        &self,
        proposal: MembershipProposal,
    ) -> Result<ClusterStatus, ServiceError> {
        debug_assert!(
            proposal.known_addrs.is_empty(),
            "the consensus step fills in the known addresses"
        );
        let changes = proposal.changes.len();
        let (reply, rx) = oneshot::channel();
        self.submit(Request::ChangeMembership { proposal, reply })?;
        let result = match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ServiceError::Timeout(
                "outcome unknown: the change may still complete (the node stopped before it \
                 finished)"
                    .into(),
            )),
            Err(_) => Err(ServiceError::Timeout(format!(
                "outcome unknown: the change may still complete (not complete within {} ms)",
                self.request_timeout.as_millis()
            ))),
        };
        if let Err(e) = &result {
            tracing::debug!(changes, error = %e, "membership change not done");
        }
        result
    }

    async fn refresh_metrics(&self, metrics: &Metrics) {
        // A node too busy to answer its status keeps the last scrape's gauges.
        if let Ok(status) = self.status().await {
            let db_size_bytes = self.sm.size_on_disk_bytes().ok();
            metrics.refresh(&status, self.pending.len(), db_size_bytes);
            let sessions = self.sm.sessions_summary().count;
            metrics
                .sessions
                .set(i64::try_from(sessions).unwrap_or(i64::MAX));
            let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            metrics.watchers.set(gauge(self.hub.watchers() as u64));
            metrics
                .watch_queued_bytes
                .set(gauge(self.hub.queued_bytes() as u64));
            metrics
                .watchers_cancelled
                .set(gauge(self.hub.cancelled_total()));
            metrics.leases.set(gauge(self.sm.leases().0.len() as u64));
        }
    }

    fn leases_max(&self) -> u64 {
        self.leases_max
    }

    fn watch(
        &self,
        filter: KeyFilter,
        start_revision: Option<u64>,
    ) -> Result<WatchStream, WatchError> {
        WatchStream::open(&self.hub, self.sm.clone(), filter, start_revision)
    }

    fn watch_progress_ms(&self) -> u64 {
        self.hub.settings().progress_ms
    }

    async fn lease_keepalive(&self, id: u64) -> Result<LeaseResponse, ServiceError> {
        let (term, before_ms) = self.confirm_leader().await?;
        let now_ms = self.lease_clock_ms();
        let renewed = self
            .lock_lessor()
            .keepalive_confirmed(&self.sm, term, id, before_ms, now_ms);
        let remaining_ms = match renewed {
            Ok(remaining_ms) => remaining_ms,
            Err(KeepaliveError::NotFound(id)) => {
                return Err(ServiceError::NotFound(format!(
                    "lease {id} does not exist (never granted, revoked or expired)"
                )))
            }
            Err(KeepaliveError::NotLeader) => {
                return Err(ServiceError::Unavailable("leadership moved; retry".into()))
            }
        };
        let info = self.sm.lease(id, 0).map_err(sm_error)?.value;
        let Some((info, _, _)) = info else {
            return Err(ServiceError::NotFound(format!(
                "lease {id} was just revoked"
            )));
        };
        Ok(self.lease_response(info, remaining_ms))
    }

    async fn lease_get(&self, id: u64, keys_max: usize) -> Result<LeaseResponse, ServiceError> {
        let (term, _) = self.confirm_leader().await?;
        let read = self.sm.lease(id, keys_max).map_err(sm_error)?.value;
        let Some((info, keys, more)) = read else {
            return Err(ServiceError::NotFound(format!(
                "lease {id} does not exist (never granted, revoked or expired)"
            )));
        };
        let remaining_ms = {
            let now_ms = self.lease_clock_ms();
            let mut lessor = self.lock_lessor();
            lessor.sync_with(&self.sm, Some(term), now_ms);
            lessor.remaining_ms(id, now_ms).unwrap_or(info.ttl_ms)
        };
        let mut resp = self.lease_response(info, remaining_ms);
        resp.keys = keys
            .into_iter()
            .map(|k| String::from_utf8_lossy(&k).into_owned())
            .collect();
        resp.keys_more = more;
        Ok(resp)
    }

    async fn lease_list(&self) -> Result<LeaseListResponse, ServiceError> {
        let (term, _) = self.confirm_leader().await?;
        let revision = self.sm.applied_index();
        let (leases, _) = self.sm.leases();
        let now_ms = self.lease_clock_ms();
        let mut lessor = self.lock_lessor();
        lessor.sync_with(&self.sm, Some(term), now_ms);
        let leases = leases
            .into_iter()
            .map(|l| LeaseSummary {
                id: l.id,
                ttl_s: l.ttl_ms / 1000,
                keys_count: l.keys,
                remaining_ms: lessor.remaining_ms(l.id, now_ms),
            })
            .collect();
        Ok(LeaseListResponse {
            leases,
            revision,
            leader: self.id,
        })
    }

    async fn snapshot(&self) -> Result<SnapshotFileOut, ServiceError> {
        // On the leader only (a follower answers "not the leader"), and after a linearizable
        // barrier: the file then holds every write acknowledged before the request arrived.
        let read_index = self.sm.applied_index();
        self.read_barrier(Consistency::Linearizable).await?;
        let (snapshots, sm) = (self.snapshots.clone(), self.sm.clone());
        let started = std::time::Instant::now();
        let created = tokio::task::spawn_blocking(move || snapshots.create(&sm))
            .await
            .map_err(|e| ServiceError::Internal(format!("snapshot task: {e}")))?
            .map_err(|e| ServiceError::Internal(format!("creating a snapshot: {e}")))?;
        let took = started.elapsed();
        self.metrics
            .snapshot_create_duration
            .observe(crate::metrics::seconds(took));
        tracing::info!(
            index = created.meta.index,
            term = created.meta.term,
            duration_ms = took.as_millis() as u64,
            "snapshot file created for a client"
        );
        assert!(
            created.meta.index >= read_index,
            "a snapshot older than the read barrier"
        );
        let bytes = std::fs::metadata(&created.file.path)
            .map_err(|e| ServiceError::Internal(format!("snapshot file: {e}")))?
            .len();
        Ok(SnapshotFileOut {
            index: created.meta.index,
            term: created.meta.term,
            cluster_id: self.cluster_id.clone(),
            path: created.file.path,
            bytes,
        })
    }
}
