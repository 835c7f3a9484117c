//! The write routes: `PUT /kv/{key}`, `DELETE /kv/{key}` (both with `?if_mod_revision=N`),
//! `DELETE /kv?prefix=P` and `POST /txn`, with client sessions (`X-Raftkv-Client-Id`,
//! `X-Raftkv-Seq`).
//!
//! A conditional write is proposed as a transaction — `mod_revision == N`, the write on
//! success, a `get` of the key on failure — so a failed condition answers 412 with the key as
//! it was when the entry applied (`current`), on every node alike. Every answer carries the
//! revision it was served at, in the body and in `X-Raftkv-Revision`; a session's retry is
//! answered from the session table with `X-Raftkv-Duplicate: true` and the original revision.
//!
//! Refusals the state machine decided (a prefix delete over its key bound, a session below its
//! remembered sequence or expired) applied as no-ops: 413 and 409, never 5xx.

use super::{
    check_body, check_key, error_kind, error_response, forward, key_target, parse_json,
    same_target, ApiState, KeyArg, Rejection,
};
use crate::api::types::*;
use crate::api::{key_value, Applied, ClientSession, KvService, ServiceError};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use raftkv_storage::command::{CommandOutcome, CommandRef, KeyRecord, OpResult, Refusal};
use raftkv_storage::txn::{CompareOp, CompareRef, OpRef, TargetRef, TxnRef};
use serde::Deserialize;
use std::sync::Arc;

/// On every kv and txn response: the store's revision the answer was served at.
pub const REVISION_HEADER: &str = "x-raftkv-revision";
/// A write's session: the client's id (1–64 of `[A-Za-z0-9._-]`).
pub const CLIENT_ID_HEADER: &str = "x-raftkv-client-id";
/// A write's session: its sequence number (≥ 1, increasing per client).
pub const SEQ_HEADER: &str = "x-raftkv-seq";
/// `true` on the answer to a session's retry, served from the session table.
pub const DUPLICATE_HEADER: &str = "x-raftkv-duplicate";
/// The error kinds of the state machine's refusals and of a failed condition.
pub const KIND_CONDITION_FAILED: &str = "condition_failed";
pub const KIND_SESSION_STALE: &str = "session_stale";
pub const KIND_SESSION_EXPIRED: &str = "session_expired";
pub const KIND_RESULT_NOT_KEPT: &str = "result_not_kept";
pub const KIND_LEASE_NOT_FOUND: &str = "lease_not_found";
pub const KIND_LEASES_FULL: &str = "leases_full";
pub const KIND_LEASE_KEYS_FULL: &str = "lease_keys_full";

#[derive(Debug, Deserialize)]
pub(super) struct WriteParams {
    if_mod_revision: Option<String>,
    prefix: Option<String>,
    lease: Option<String>,
}

fn write_params(q: Result<Query<WriteParams>, QueryRejection>) -> Result<WriteParams, Rejection> {
    q.map(|Query(p)| p).map_err(|e| {
        Rejection(
            StatusCode::BAD_REQUEST,
            format!("invalid query string: {}", e.body_text()),
        )
    })
}

fn if_mod_revision(p: &WriteParams) -> Result<Option<u64>, Rejection> {
    match p.if_mod_revision.as_deref().map(str::parse::<u64>) {
        None => Ok(None),
        Some(Ok(n)) => Ok(Some(n)),
        Some(Err(_)) => Err(Rejection(
            StatusCode::BAD_REQUEST,
            "if_mod_revision must be a non-negative integer (0: only if absent)".into(),
        )),
    }
}

fn lease_param(p: &WriteParams) -> Result<u64, Rejection> {
    match p.lease.as_deref().map(str::parse::<u64>) {
        None => Ok(0),
        Some(Ok(id)) if id > 0 => Ok(id),
        Some(_) => Err(Rejection(
            StatusCode::BAD_REQUEST,
            "lease must be a lease id (a positive integer)".into(),
        )),
    }
}

/// The session headers: both or neither.
pub(super) fn session(headers: &HeaderMap) -> Result<Option<ClientSession>, Rejection> {
    let text = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().map(str::to_string))
            .transpose()
            .map_err(|_| Rejection(StatusCode::BAD_REQUEST, format!("{name} is not text")))
    };
    match (text(CLIENT_ID_HEADER)?, text(SEQ_HEADER)?) {
        (None, None) => Ok(None),
        (Some(client_id), Some(seq)) => {
            raftkv_storage::command::check_client_id(client_id.as_bytes())
                .map_err(|e| Rejection(StatusCode::BAD_REQUEST, e.to_string()))?;
            match seq.parse::<u64>() {
                Ok(seq) if seq >= 1 => Ok(Some(ClientSession { client_id, seq })),
                _ => Err(Rejection(
                    StatusCode::BAD_REQUEST,
                    format!("{SEQ_HEADER} must be an integer from 1"),
                )),
            }
        }
        _ => Err(Rejection(
            StatusCode::BAD_REQUEST,
            format!("{CLIENT_ID_HEADER} and {SEQ_HEADER} go together"),
        )),
    }
}

/// Adds the revision (and, for a retry, the duplicate mark) to a response.
pub(super) fn stamp(mut r: Response, revision: u64, duplicate: bool) -> Response {
    r.headers_mut()
        .insert(REVISION_HEADER, HeaderValue::from(revision));
    if duplicate {
        r.headers_mut()
            .insert(DUPLICATE_HEADER, HeaderValue::from_static("true"));
    }
    r
}

/// The answer for a refusal the state machine applied (nothing changed).
fn refusal(r: &Refusal, revision: u64) -> Response {
    let resp = match r {
        Refusal::RangeTooLarge { keys_max } => error_kind(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("more than {keys_max} keys under the prefix; nothing was deleted: delete under longer prefixes"),
        ),
        Refusal::ResultTooLarge { bytes_max } => error_kind(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the transaction's get results exceed {bytes_max} bytes; nothing was changed"),
        ),
        Refusal::SessionStale { seq, last_seq } => error_kind(
            StatusCode::CONFLICT,
            KIND_SESSION_STALE,
            format!("sequence {seq} is below this session's last applied sequence {last_seq}; nothing was changed"),
        ),
        Refusal::ResultNotKept { result_bytes, bytes_max } => error_kind(
            StatusCode::CONFLICT,
            KIND_RESULT_NOT_KEPT,
            format!("this write already applied at revision {revision}; its result ({result_bytes} bytes) was over the {bytes_max} bytes a session keeps, so a retry cannot repeat it: read the keys"),
        ),
        Refusal::LeaseNotFound { id } => error_kind(
            StatusCode::NOT_FOUND,
            KIND_LEASE_NOT_FOUND,
            format!("lease {id} does not exist (never granted, revoked or expired); nothing was changed"),
        ),
        Refusal::LeasesFull { leases_max } => error_kind(
            StatusCode::PAYLOAD_TOO_LARGE,
            KIND_LEASES_FULL,
            format!("{leases_max} leases exist already (--leases-max); revoke some first"),
        ),
        Refusal::LeaseKeysFull { keys_max } => error_kind(
            StatusCode::PAYLOAD_TOO_LARGE,
            KIND_LEASE_KEYS_FULL,
            format!("the lease holds {keys_max} keys already; nothing was changed: use another lease"),
        ),
        Refusal::SessionExpired { seq } => error_kind(
            StatusCode::CONFLICT,
            KIND_SESSION_EXPIRED,
            format!("unknown or expired session (sequence {seq}); nothing was changed: start a new session at sequence 1"),
        ),
    };
    stamp(resp, revision, false)
}

/// The 412 of a conditional write whose condition did not hold.
fn condition_failed(
    current: Option<raftkv_storage::command::KeyRecord>,
    revision: u64,
) -> Response {
    let body = ConditionFailedBody {
        error: "the condition did not hold; nothing was changed".into(),
        kind: KIND_CONDITION_FAILED.into(),
        current: current.map(key_value),
        revision,
    };
    (StatusCode::PRECONDITION_FAILED, Json(body)).into_response()
}

/// Proposes `command`, or forwards the request to the leader.
#[allow(clippy::too_many_arguments)]
pub(super) async fn propose<S: KvService>(
    st: &ApiState<S>,
    command: CommandRef<'_>,
    headers: &HeaderMap,
    method: Method,
    target: String,
    body: Bytes,
    answer: impl FnOnce(&Applied) -> Option<Response>,
) -> Result<Response, Rejection> {
    let session = session(headers)?;
    Ok(match st.service.write(command, session.as_ref()).await {
        Ok(applied) => {
            let r = &applied.result;
            let resp = match &r.outcome {
                CommandOutcome::Refused(refused) => return Ok(refusal(refused, r.revision)),
                _ => answer(&applied).unwrap_or_else(|| mismatch(&applied)),
            };
            stamp(resp, r.revision, r.duplicate)
        }
        Err(e @ ServiceError::NotLeader { .. }) => {
            forward(st, e, method, &target, headers, body, true).await
        }
        Err(e) => error_response(&e),
    })
}

/// An outcome that does not answer the request. For a session's retry it is the client's
/// doing — the sequence number was used by another request, whose result the table kept —
/// and is a 409; otherwise the state machine answered out of shape, a 500.
fn mismatch(a: &Applied) -> Response {
    let r = &a.result;
    if r.duplicate {
        return error_kind(
            StatusCode::CONFLICT,
            KIND_SESSION_STALE,
            format!(
                "this session's sequence number was used by a different request, applied at \
                 revision {}; nothing was changed",
                r.revision
            ),
        );
    }
    error_response(&ServiceError::Internal(format!(
        "a write applied with an outcome that does not answer it: {:?}",
        r.outcome
    )))
}

/// What a single-key write did, plain or conditional.
enum KeyWritten {
    Put { create_revision: u64, version: u64 },
    Delete { existed: bool },
}

/// A single-key write's outcome: `Ok` what it did, `Err(current)` a failed condition,
/// `None` an outcome of another shape (see [`mismatch`]).
fn key_written(outcome: &CommandOutcome) -> Option<Result<KeyWritten, Option<KeyRecord>>> {
    let put = |create_revision: &u64, version: &u64| KeyWritten::Put {
        create_revision: *create_revision,
        version: *version,
    };
    match outcome {
        CommandOutcome::Put {
            create_revision,
            version,
        } => Some(Ok(put(create_revision, version))),
        CommandOutcome::Delete { existed } => Some(Ok(KeyWritten::Delete { existed: *existed })),
        CommandOutcome::Txn { succeeded, results } => match (succeeded, results.as_slice()) {
            (
                true,
                [OpResult::Put {
                    create_revision,
                    version,
                }],
            ) => Some(Ok(put(create_revision, version))),
            (true, [OpResult::Delete { existed }]) => {
                Some(Ok(KeyWritten::Delete { existed: *existed }))
            }
            (false, [OpResult::Get(current)]) => Some(Err(current.clone())),
            _ => None,
        },
        _ => None,
    }
}

/// A conditional write's transaction: the write if `mod_revision == n`, else a get.
fn conditional<'a>(key: &'a [u8], n: u64, write: OpRef<'a>) -> CommandRef<'a> {
    CommandRef::Txn(TxnRef {
        compares: vec![CompareRef {
            key,
            op: CompareOp::Equal,
            target: TargetRef::ModRevision(n),
        }],
        success: vec![write],
        failure: vec![OpRef::Get { key }],
    })
}

pub(super) async fn put_key<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    uri: Uri,
    headers: HeaderMap,
    path: KeyArg,
    query: Result<Query<WriteParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Rejection> {
    let key = check_key(path, &st.limits)?;
    let params = write_params(query)?;
    let body = check_body(body)?;
    let PutBody { value } = parse_json(&body, r#"{"value": "..."}"#)?;
    st.limits
        .command
        .check_value(value.as_bytes())
        .map_err(super::limit_rejection)?;
    let (k, v) = (key.as_bytes(), value.as_bytes());
    let lease = lease_param(&params)?;
    let command = match (if_mod_revision(&params)?, lease) {
        (None, 0) => CommandRef::Put { key: k, value: v },
        (None, lease) => CommandRef::PutLeased {
            key: k,
            value: v,
            lease,
        },
        (Some(n), lease) => conditional(
            k,
            n,
            OpRef::Put {
                key: k,
                value: v,
                lease,
            },
        ),
    };
    let target = key_target(&key, &uri);
    let answer = |a: &Applied| {
        let revision = a.result.revision;
        Some(match key_written(&a.result.outcome)? {
            Ok(KeyWritten::Put {
                create_revision,
                version,
            }) => Json(KvResponse {
                key: key.clone(),
                value: value.clone(),
                index: revision,
                leader: Some(a.leader),
                revision,
                create_revision,
                mod_revision: revision,
                version,
            })
            .into_response(),
            Err(current) => condition_failed(current, revision),
            Ok(KeyWritten::Delete { .. }) => return None,
        })
    };
    propose(&st, command, &headers, Method::PUT, target, body, answer).await
}

pub(super) async fn delete_key<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    uri: Uri,
    headers: HeaderMap,
    path: KeyArg,
    query: Result<Query<WriteParams>, QueryRejection>,
) -> Result<Response, Rejection> {
    let key = check_key(path, &st.limits)?;
    let params = write_params(query)?;
    let k = key.as_bytes();
    let command = match if_mod_revision(&params)? {
        None => CommandRef::Delete { key: k },
        Some(n) => conditional(k, n, OpRef::Delete { key: k }),
    };
    let target = key_target(&key, &uri);
    let answer = |a: &Applied| {
        let revision = a.result.revision;
        Some(match key_written(&a.result.outcome)? {
            Ok(KeyWritten::Delete { existed }) => Json(DeleteResponse {
                key: key.clone(),
                deleted: existed,
                index: revision,
                leader: a.leader,
                revision,
            })
            .into_response(),
            Err(current) => condition_failed(current, revision),
            Ok(KeyWritten::Put { .. }) => return None,
        })
    };
    propose(
        &st,
        command,
        &headers,
        Method::DELETE,
        target,
        Bytes::new(),
        answer,
    )
    .await
}

pub(super) async fn delete_prefix<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    uri: Uri,
    headers: HeaderMap,
    query: Result<Query<WriteParams>, QueryRejection>,
) -> Result<Response, Rejection> {
    let params = write_params(query)?;
    let Some(prefix) = params.prefix.filter(|p| !p.is_empty()) else {
        return Err(Rejection(
            StatusCode::BAD_REQUEST,
            "DELETE /kv needs a non-empty ?prefix= (the keys under it are deleted atomically)"
                .into(),
        ));
    };
    if params.if_mod_revision.is_some() {
        return Err(Rejection(
            StatusCode::BAD_REQUEST,
            "if_mod_revision applies to one key: use a transaction to guard a prefix delete".into(),
        ));
    }
    let command = CommandRef::DeletePrefix {
        prefix: prefix.as_bytes(),
    };
    let answer = |a: &Applied| match &a.result.outcome {
        CommandOutcome::DeletePrefix { deleted } => Some(
            Json(DeletePrefixResponse {
                prefix: prefix.clone(),
                deleted: *deleted,
                revision: a.result.revision,
                leader: a.leader,
            })
            .into_response(),
        ),
        _ => None,
    };
    let target = same_target(&uri);
    propose(
        &st,
        command,
        &headers,
        Method::DELETE,
        target,
        Bytes::new(),
        answer,
    )
    .await
}

pub(super) async fn post_txn<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Rejection> {
    let body = check_body(body)?;
    let request: TxnRequest = parse_json(
        &body,
        r#"{"compare": [...], "success": [...], "failure": [...]}"#,
    )?;
    let txn = txn_ref(&request)?;
    let answer = |a: &Applied| {
        let CommandOutcome::Txn { succeeded, results } = &a.result.outcome else {
            return None;
        };
        let ops = if *succeeded {
            &request.success
        } else {
            &request.failure
        };
        if ops.len() != results.len() {
            return None;
        }
        let results = ops.iter().zip(results).map(|(op, r)| op_result(op, r));
        Some(
            Json(TxnResponse {
                succeeded: *succeeded,
                results: results.collect::<Option<Vec<_>>>()?,
                revision: a.result.revision,
                leader: a.leader,
            })
            .into_response(),
        )
    };
    let target = same_target(&uri);
    let command = CommandRef::Txn(txn);
    propose(
        &st,
        command,
        &headers,
        Method::POST,
        target,
        body.clone(),
        answer,
    )
    .await
}

/// The storage form of a transaction request; bad shapes are 400 (limits are the service's).
fn txn_ref(request: &TxnRequest) -> Result<TxnRef<'_>, Rejection> {
    let bad = |m: String| Rejection(StatusCode::BAD_REQUEST, m);
    let mut compares = Vec::with_capacity(request.compare.len());
    for (i, c) in request.compare.iter().enumerate() {
        let op = CompareOp::parse(&c.op).ok_or_else(|| {
            bad(format!(
                "compare {i}: op must be ==, !=, < or >, not {:?}",
                c.op
            ))
        })?;
        let number = || {
            c.value.as_u64().ok_or_else(|| {
                bad(format!(
                    "compare {i}: {} needs a non-negative integer value",
                    c.target
                ))
            })
        };
        let target = match c.target.as_str() {
            "value" => TargetRef::Value(
                c.value
                    .as_str()
                    .ok_or_else(|| bad(format!("compare {i}: value needs a string value")))?
                    .as_bytes(),
            ),
            "version" => TargetRef::Version(number()?),
            "create_revision" => TargetRef::CreateRevision(number()?),
            "mod_revision" => TargetRef::ModRevision(number()?),
            other => {
                return Err(bad(format!(
                    "compare {i}: target must be value, version, create_revision or mod_revision, not {other:?}"
                )))
            }
        };
        compares.push(CompareRef {
            key: c.key.as_bytes(),
            op,
            target,
        });
    }
    fn ops(ops: &[TxnOp]) -> Vec<OpRef<'_>> {
        ops.iter()
            .map(|op| match op {
                TxnOp::Put { key, value } => OpRef::Put {
                    key: key.as_bytes(),
                    value: value.as_bytes(),
                    lease: 0,
                },
                TxnOp::Delete { key } => OpRef::Delete {
                    key: key.as_bytes(),
                },
                TxnOp::DeletePrefix { prefix } => OpRef::DeletePrefix {
                    prefix: prefix.as_bytes(),
                },
                TxnOp::Get { key } => OpRef::Get {
                    key: key.as_bytes(),
                },
            })
            .collect()
    }
    Ok(TxnRef {
        compares,
        success: ops(&request.success),
        failure: ops(&request.failure),
    })
}

/// The wire result of `op`; `None` when `r` is another operation's result (see [`mismatch`]).
fn op_result(op: &TxnOp, r: &OpResult) -> Option<TxnOpResult> {
    Some(match (op, r) {
        (TxnOp::Put { key, .. }, OpResult::Put { version, .. }) => TxnOpResult::Put {
            key: key.clone(),
            version: *version,
        },
        (TxnOp::Delete { key }, OpResult::Delete { existed }) => TxnOpResult::Delete {
            key: key.clone(),
            deleted: u64::from(*existed),
        },
        (TxnOp::DeletePrefix { prefix }, OpResult::DeletePrefix { deleted }) => {
            TxnOpResult::DeletePrefix {
                prefix: prefix.clone(),
                deleted: *deleted,
            }
        }
        (TxnOp::Get { key }, OpResult::Get(found)) => TxnOpResult::Get {
            key: key.clone(),
            kv: found.clone().map(key_value),
        },
        _ => return None,
    })
}
