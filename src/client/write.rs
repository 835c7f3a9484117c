//! Key writes: put, delete, their conditional forms, delete by prefix and transactions, all
//! sent under an exactly-once session unless the client's `sessions` setting is off.
//!
//! The session protocol, client side: take a session from the pool, send the write with its
//! id and sequence ([`Client::request`] resends the same pair until a definite answer or the
//! end of the retry budget), then advance the sequence and return the session to the pool.
//! 409 `session_expired` means the server no longer knows the session and applied nothing:
//! the session is dropped and the write goes out again under a fresh one. 409
//! `session_stale` (a sequence below the one the server remembers) cannot happen to a
//! correct client and is reported as [`ClientError::Protocol`].

use super::session::Session;
use super::{error_kind, error_text, expect_json, key_path, key_path_and_query, percent_encode};
use super::{Answer, Client, ClientError, Mode};
use crate::api::http::{
    KIND_CONDITION_FAILED, KIND_RESULT_NOT_KEPT, KIND_SESSION_EXPIRED, KIND_SESSION_STALE,
};
use crate::api::types::*;

/// Fresh sessions tried for one write before the server's `session_expired` answers are
/// taken for a protocol error (a fresh session starts at sequence 1, which cannot expire).
const FRESH_SESSIONS_MAX: usize = 3;

/// A conditional write's condition did not hold (HTTP 412): nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "condition failed at revision {revision}: the key is {}",
    describe(current)
)]
pub struct ConditionFailed {
    /// The key as it is now (`None`: absent), with its revisions.
    pub current: Option<KeyValue>,
    /// The revision the condition was evaluated at.
    pub revision: u64,
}

fn describe(current: &Option<KeyValue>) -> String {
    match current {
        None => "absent".into(),
        Some(kv) => format!(
            "at mod_revision {} (version {})",
            kv.mod_revision, kv.version
        ),
    }
}

/// The answer of a conditional write: `Ok` applied, `Err` the condition did not hold.
pub type Conditional<T> = Result<T, ConditionFailed>;

impl Client {
    /// Writes `key` = `value`; returns once committed and applied, with the key's new
    /// revisions (`mod_revision` = `revision` = the write's log index) and version.
    pub async fn put(&self, key: &str, value: &str) -> Result<KvResponse, ClientError> {
        let Answer { status, bytes, .. } = self.send_put(key_path(key), value).await?;
        expect_json(status, &bytes)
    }

    /// Writes `key` = `value` only if the key's `mod_revision` is `if_mod_revision` (0: only
    /// if the key is absent). `Ok(Err(_))` when it was not: nothing changed, and the
    /// [`ConditionFailed`] holds the key as it is.
    pub async fn put_if(
        &self,
        key: &str,
        value: &str,
        if_mod_revision: u64,
    ) -> Result<Conditional<KvResponse>, ClientError> {
        let path = key_path_and_query(key, &format!("if_mod_revision={if_mod_revision}"));
        let Answer { status, bytes, .. } = self.send_put(path, value).await?;
        conditional(status, &bytes)
    }

    /// Deletes `key`; returns once committed and applied.
    pub async fn delete(&self, key: &str) -> Result<DeleteResponse, ClientError> {
        let Answer { status, bytes, .. } = self
            .write(reqwest::Method::DELETE, key_path(key), None)
            .await?;
        expect_json(status, &bytes)
    }

    /// Deletes `key` only if its `mod_revision` is `if_mod_revision` (0: only if absent,
    /// which deletes nothing). `Ok(Err(_))` when it was not: nothing changed.
    pub async fn delete_if(
        &self,
        key: &str,
        if_mod_revision: u64,
    ) -> Result<Conditional<DeleteResponse>, ClientError> {
        let path = key_path_and_query(key, &format!("if_mod_revision={if_mod_revision}"));
        let Answer { status, bytes, .. } = self.write(reqwest::Method::DELETE, path, None).await?;
        conditional(status, &bytes)
    }

    /// Deletes every key starting with `prefix` (not empty), atomically; the answer counts
    /// them. The server refuses (413) a prefix with more than 100,000 keys under it.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<DeletePrefixResponse, ClientError> {
        if prefix.is_empty() {
            return Err(ClientError::InvalidInput(
                "the prefix to delete must not be empty".into(),
            ));
        }
        let path = format!("/kv?prefix={}", percent_encode(prefix));
        let Answer { status, bytes, .. } = self.write(reqwest::Method::DELETE, path, None).await?;
        expect_json(status, &bytes)
    }

    /// Runs a transaction: if every compare holds, the `success` ops, else the `failure` ops,
    /// atomically. `succeeded` in the answer says which branch ran.
    pub async fn txn(&self, txn: &TxnRequest) -> Result<TxnResponse, ClientError> {
        let body = serde_json::to_vec(txn).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let Answer { status, bytes, .. } = self
            .write(reqwest::Method::POST, "/txn".into(), Some(body))
            .await?;
        expect_json(status, &bytes)
    }

    pub(super) async fn send_put(&self, path: String, value: &str) -> Result<Answer, ClientError> {
        let body = serde_json::to_vec(&PutBody {
            value: value.to_string(),
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        self.write(reqwest::Method::PUT, path, Some(body)).await
    }

    /// Sends a key write under a session from the pool (or without one when sessions are
    /// off); returns the definite answer's status and body.
    pub(super) async fn write(
        &self,
        method: reqwest::Method,
        path: String,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ClientError> {
        if !self.config.sessions {
            return self.request(method, &path, body, Mode::Write).await;
        }
        for _ in 0..FRESH_SESSIONS_MAX {
            let mut session = self.sessions.take().map_err(no_randomness)?;
            let sent = self
                .request(
                    method.clone(),
                    &path,
                    body.clone(),
                    Mode::Session {
                        client_id: &session.client_id,
                        seq: session.seq,
                    },
                )
                .await;
            let answer = match sent {
                Ok(answer) => answer,
                // Nothing was sent that could apply: the sequence is still unused.
                Err(e @ ClientError::Unavailable(_)) => {
                    self.sessions.give_back(session);
                    return Err(e);
                }
                // The session's last write has no definite answer: never reuse it.
                Err(e) => return Err(e),
            };
            let kind = error_kind(&answer.bytes);
            match (answer.status, kind.as_deref()) {
                (409, Some(KIND_SESSION_EXPIRED)) => {
                    tracing::debug!(client_id = %session.client_id, seq = session.seq,
                        "session expired on the server; resending under a fresh one");
                    continue;
                }
                (409, Some(KIND_SESSION_STALE)) => {
                    return Err(ClientError::Protocol(format!(
                        "the server says sequence {} of session {} is stale",
                        session.seq, session.client_id
                    )))
                }
                (409, Some(KIND_RESULT_NOT_KEPT)) => {
                    self.finish(&mut session, 200); // applied: the sequence is used
                    return Err(ClientError::ResultNotKept {
                        revision: answer.revision,
                        message: error_text(&answer.bytes),
                    });
                }
                _ => {
                    self.finish(&mut session, answer.status);
                    return Ok(answer);
                }
            }
        }
        Err(ClientError::Protocol(format!(
            "{FRESH_SESSIONS_MAX} fresh sessions in a row were answered session_expired"
        )))
    }

    /// After a definite answer: the sequence is used; the session goes back to the pool,
    /// unless it never had a write accepted (a refused first write: dropping it spares the
    /// server a `session_expired` round trip on its next use).
    fn finish(&self, session: &mut Session, status: u16) {
        let accepted = (200..300).contains(&status) || status == 412;
        if session.seq == 1 && !accepted {
            return;
        }
        session.seq += 1;
        self.sessions.give_back(session.clone());
    }
}

fn no_randomness(e: getrandom::Error) -> ClientError {
    ClientError::Config(format!("cannot draw a random session id: {e}"))
}

/// Parses a conditional write's answer: the body of a 2xx, or a 412's [`ConditionFailed`].
pub(super) fn conditional<T: serde::de::DeserializeOwned>(
    status: u16,
    bytes: &[u8],
) -> Result<Conditional<T>, ClientError> {
    if status != 412 {
        return expect_json(status, bytes).map(Ok);
    }
    let body: ConditionFailedBody = serde_json::from_slice(bytes).map_err(|e| {
        ClientError::Protocol(format!("a 412 that is not a condition failure: {e}"))
    })?;
    if body.kind != KIND_CONDITION_FAILED {
        return Err(ClientError::Protocol(format!(
            "a 412 of kind {:?}: {}",
            body.kind, body.error
        )));
    }
    Ok(Err(ConditionFailed {
        current: body.current,
        revision: body.revision,
    }))
}
