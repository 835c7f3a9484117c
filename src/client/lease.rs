//! Leases: grant one, attach keys to it, keep it alive, look at it, revoke it; and
//! [`LeaseKeeper`], which keeps one alive in the background.
//!
//! A grant and a revoke are writes: they go out under an exactly-once session like key writes
//! (a resent grant never grants twice). A keepalive, a get and a list are idempotent and are
//! retried like reads. A 404 of kind `lease_not_found` is [`ClientError::LeaseNotFound`] (a
//! routing 404 stays a rejection).
//!
//! **The keeper.** [`Client::keep_alive`] renews the lease once (so a lease that is already
//! gone is an error at once), then a background task (`tokio::spawn`: call it inside a Tokio
//! runtime) renews it every TTL/3 after the last success. Each renewal goes round the
//! endpoints with the client's backoff, with each request bounded by TTL/3 (at least
//! 500 ms) so a hung node does not eat the lease's time, and the retries of one renewal by
//! the TTL; after a renewal that found no node, the next one starts after
//! `min(TTL/3, 500 ms)`. The keeper's [`KeeperStatus`] says how it goes: `Alive` after each
//! renewal (with the time the leader had left), `Failing` while renewals get no answer (the
//! lease may well be alive: only the leader expires leases), `Lost` once the cluster said the
//! lease does not exist (or refused the keepalive): then the task ends. Dropping the keeper or
//! calling [`LeaseKeeper::stop`] stops the renewals; it does not revoke the lease, which then
//! expires after its TTL.

use super::{error_kind, expect_json, key_path_and_query, lock, Answer, Client, ClientError, Mode};
use crate::api::types::*;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The error kind of a 404 for a lease that does not exist.
const KIND_LEASE_NOT_FOUND: &str = "lease_not_found";

/// The shortest time a keeper allows one keepalive request.
const KEEPALIVE_REQUEST_MIN_MS: u64 = 500;
/// The longest pause before a keeper tries again after a renewal that found no node.
const KEEPALIVE_RETRY_PAUSE_MAX_MS: u64 = 500;
/// The shortest period between renewals (TTLs are whole seconds: TTL/3 is 333 ms or more).
const KEEPALIVE_PERIOD_MIN_MS: u64 = 100;

impl Client {
    /// Grants a lease of `ttl_s` seconds (the server bounds the range: 400 outside it, 413
    /// when the cluster holds as many leases as it allows).
    pub async fn lease_grant(&self, ttl_s: u64) -> Result<LeaseGrantResponse, ClientError> {
        let body = serde_json::to_vec(&LeaseGrantBody { ttl_s })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let Answer { status, bytes, .. } = self
            .write(reqwest::Method::POST, "/lease".into(), Some(body))
            .await?;
        expect_json(status, &bytes)
    }

    /// Renews lease `id`: the leader restarts its TTL; the answer says the time left.
    pub async fn lease_keepalive(&self, id: u64) -> Result<LeaseResponse, ClientError> {
        let path = format!("/lease/{id}/keepalive");
        let answer = self
            .request(reqwest::Method::POST, &path, None, Mode::Read)
            .await?;
        lease_answer(id, &answer)
    }

    /// Lease `id`: its TTL, the time left and its keys.
    pub async fn lease_get(&self, id: u64) -> Result<LeaseResponse, ClientError> {
        let path = format!("/lease/{id}");
        let answer = self
            .request(reqwest::Method::GET, &path, None, Mode::Read)
            .await?;
        lease_answer(id, &answer)
    }

    /// Revokes lease `id` and deletes its keys, atomically.
    pub async fn lease_revoke(&self, id: u64) -> Result<LeaseRevokeResponse, ClientError> {
        let answer = self
            .write(reqwest::Method::DELETE, format!("/lease/{id}"), None)
            .await?;
        lease_answer(id, &answer)
    }

    /// Every lease, by id.
    pub async fn lease_list(&self) -> Result<LeaseListResponse, ClientError> {
        let Answer { status, bytes, .. } = self
            .request(reqwest::Method::GET, "/lease", None, Mode::Read)
            .await?;
        expect_json(status, &bytes)
    }

    /// Writes `key` = `value` attached to lease `lease_id`: the key is deleted when the lease
    /// expires or is revoked. [`ClientError::LeaseNotFound`] (nothing written) if the lease
    /// does not exist.
    pub async fn put_with_lease(
        &self,
        key: &str,
        value: &str,
        lease_id: u64,
    ) -> Result<KvResponse, ClientError> {
        let path = key_path_and_query(key, &format!("lease={lease_id}"));
        let answer = self.send_put(path, value).await?;
        lease_answer(lease_id, &answer)
    }

    /// [`Self::put_with_lease`] only if the key's `mod_revision` is `if_mod_revision` (0: only
    /// if the key is absent). `Ok(Err(_))` when it was not: nothing changed, and the
    /// [`super::ConditionFailed`] holds the key as it is. [`ClientError::LeaseNotFound`]
    /// (nothing written) if the lease does not exist.
    pub async fn put_if_with_lease(
        &self,
        key: &str,
        value: &str,
        if_mod_revision: u64,
        lease_id: u64,
    ) -> Result<super::Conditional<KvResponse>, ClientError> {
        let query = format!("if_mod_revision={if_mod_revision}&lease={lease_id}");
        let answer = self
            .send_put(key_path_and_query(key, &query), value)
            .await?;
        refuse_lease_not_found(lease_id, &answer)?;
        super::write::conditional(answer.status, &answer.bytes)
    }

    /// Keeps lease `id` alive in the background until the keeper is dropped or stopped (see
    /// the module doc). Renews it once first: fails if it does not exist or no node answers.
    pub async fn keep_alive(&self, id: u64) -> Result<LeaseKeeper, ClientError> {
        let first = self.lease_keepalive(id).await?;
        let client = self.keeper_client(first.ttl_s)?;
        let (tx, rx) = watch::channel(KeeperStatus::Alive {
            renewals: 1,
            ttl_s: first.ttl_s,
            remaining_ms: first.remaining_ms,
        });
        let task = tokio::spawn(keep(client, id, first.ttl_s, tx));
        Ok(LeaseKeeper {
            id,
            status: rx,
            task: Some(task),
        })
    }

    /// A client for a keeper: the same endpoints, credentials and known leader, with each
    /// request bounded by TTL/3 (at least 500 ms) and one renewal's retries by the TTL.
    fn keeper_client(&self, ttl_s: u64) -> Result<Client, ClientError> {
        let ttl_ms = ttl_s.saturating_mul(1000);
        let mut config = self.config.clone();
        config.request_timeout_ms = (ttl_ms / 3)
            .max(KEEPALIVE_REQUEST_MIN_MS)
            .min(config.request_timeout_ms);
        config.retry_budget_ms = ttl_ms.max(1000).min(config.retry_budget_ms);
        let client = Client::new(config)?;
        *lock(&client.leader) = *lock(&self.leader);
        Ok(client)
    }
}

/// The body of a lease answer; a 404 `lease_not_found` is [`ClientError::LeaseNotFound`].
fn lease_answer<T: serde::de::DeserializeOwned>(
    id: u64,
    answer: &Answer,
) -> Result<T, ClientError> {
    refuse_lease_not_found(id, answer)?;
    expect_json(answer.status, &answer.bytes)
}

/// A 404 `lease_not_found` as the typed error for lease `id`.
fn refuse_lease_not_found(id: u64, answer: &Answer) -> Result<(), ClientError> {
    if answer.status == 404 && error_kind(&answer.bytes).as_deref() == Some(KIND_LEASE_NOT_FOUND) {
        return Err(ClientError::LeaseNotFound { id });
    }
    Ok(())
}

/// How a [`LeaseKeeper`] is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeeperStatus {
    /// The last renewal succeeded; the leader had `remaining_ms` left after it.
    Alive {
        /// Successful renewals so far (the first one, by `keep_alive`, included).
        renewals: u64,
        ttl_s: u64,
        remaining_ms: u64,
    },
    /// Renewals found no node to answer since the last success (the lease may be alive).
    Failing { renewals: u64, error: String },
    /// The lease is gone: the keeper has stopped.
    Lost(LeaseLost),
}

/// Why a kept lease is lost.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeaseLost {
    /// The cluster says it does not exist: it expired or was revoked.
    #[error("the lease does not exist (expired or revoked)")]
    NotFound,
    /// The cluster refused the keepalive (a 4xx other than not found).
    #[error("the keepalive was refused: {0}")]
    Refused(String),
    /// The keeper's task ended without a verdict (it panicked).
    #[error("the keeper stopped unexpectedly")]
    KeeperEnded,
}

/// Keeps a lease alive in the background while it exists (see the module doc).
#[derive(Debug)]
pub struct LeaseKeeper {
    id: u64,
    status: watch::Receiver<KeeperStatus>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LeaseKeeper {
    /// The lease kept alive.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How the keeper is doing now.
    pub fn status(&self) -> KeeperStatus {
        self.status.borrow().clone()
    }

    /// Waits for the next change of status (a renewal, a failure, the loss); `None` once the
    /// keeper has ended and its last status was seen.
    pub async fn changed(&mut self) -> Option<KeeperStatus> {
        self.status.changed().await.ok()?;
        Some(self.status.borrow_and_update().clone())
    }

    /// Waits until the lease is lost.
    pub async fn lost(&mut self) -> LeaseLost {
        match self
            .status
            .wait_for(|s| matches!(s, KeeperStatus::Lost(_)))
            .await
        {
            Ok(s) => match &*s {
                KeeperStatus::Lost(why) => why.clone(),
                _ => LeaseLost::KeeperEnded,
            },
            Err(_) => LeaseLost::KeeperEnded,
        }
    }

    /// Stops the renewals (the lease is not revoked) and waits for the task to end, so no
    /// keepalive is sent after this returns.
    pub async fn stop(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The time between renewals: a third of the TTL.
fn keepalive_period(ttl_s: u64) -> Duration {
    Duration::from_millis((ttl_s.saturating_mul(1000) / 3).max(KEEPALIVE_PERIOD_MIN_MS))
}

/// The keeper's task: renew every TTL/3 until the lease is lost (or the task is aborted).
async fn keep(client: Client, id: u64, ttl_s: u64, status: watch::Sender<KeeperStatus>) {
    let period = keepalive_period(ttl_s);
    let retry_pause = period.min(Duration::from_millis(KEEPALIVE_RETRY_PAUSE_MAX_MS));
    let mut renewals = 1u64;
    let mut next = Instant::now() + period;
    loop {
        tokio::time::sleep_until(next.into()).await;
        let started = Instant::now();
        match client.lease_keepalive(id).await {
            Ok(r) => {
                renewals += 1;
                next = started + period;
                status.send_replace(KeeperStatus::Alive {
                    renewals,
                    ttl_s: r.ttl_s,
                    remaining_ms: r.remaining_ms,
                });
            }
            Err(ClientError::LeaseNotFound { .. }) => {
                tracing::info!(lease = id, "lease lost: it no longer exists");
                status.send_replace(KeeperStatus::Lost(LeaseLost::NotFound));
                return;
            }
            Err(e @ ClientError::Rejected { .. }) => {
                tracing::info!(lease = id, error = %e, "lease keepalive refused; keeper stops");
                status.send_replace(KeeperStatus::Lost(LeaseLost::Refused(e.to_string())));
                return;
            }
            Err(e) => {
                tracing::debug!(lease = id, error = %e, "lease keepalive failed; retrying");
                next = Instant::now() + retry_pause;
                status.send_replace(KeeperStatus::Failing {
                    renewals,
                    error: e.to_string(),
                });
            }
        }
    }
}
