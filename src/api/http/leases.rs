//! The lease routes: `POST /lease` (grant), `DELETE /lease/{id}` (revoke with its keys),
//! `POST /lease/{id}/keepalive`, `GET /lease/{id}` and `GET /lease` (list).
//!
//! Grant and revoke are writes (proposed, forwarded to the leader, exactly-once under a
//! client session). Keepalive, get and list are answered by the leader alone, which keeps
//! lease time (`node::lessor`); a follower forwards them. A lease that does not exist is 404
//! `lease_not_found`.

use super::writes::{propose, KIND_LEASE_NOT_FOUND};
use super::{check_body, error_kind, error_response, forward, parse_json, ApiState, Rejection};
use crate::api::types::*;
use crate::api::{Applied, KvService, ServiceError};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use raftkv_storage::command::{CommandOutcome, CommandRef, LEASE_TTL_MS_MAX, LEASE_TTL_MS_MIN};
use std::sync::Arc;

/// The most keys `GET /lease/{id}` lists.
pub const LEASE_KEYS_LISTED_MAX: usize = 10_000;

fn lease_id(path: Result<Path<String>, PathRejection>) -> Result<u64, Rejection> {
    let bad = || {
        Rejection(
            StatusCode::BAD_REQUEST,
            "a lease id is a positive integer".into(),
        )
    };
    let Path(raw) = path.map_err(|_| bad())?;
    match raw.parse::<u64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(bad()),
    }
}

/// A leader-only lease answer, or the request forwarded to the leader. A missing lease is
/// 404 `lease_not_found`.
async fn leader_answer<S: KvService, T: serde::Serialize>(
    st: &ApiState<S>,
    result: Result<T, ServiceError>,
    method: Method,
    target: &str,
    headers: &HeaderMap,
) -> Response {
    match result {
        Ok(body) => Json(body).into_response(),
        Err(ServiceError::NotFound(why)) => {
            error_kind(StatusCode::NOT_FOUND, KIND_LEASE_NOT_FOUND, why)
        }
        Err(e @ ServiceError::NotLeader { .. }) => {
            forward(st, e, method, target, headers, Bytes::new(), false).await
        }
        Err(e) => error_response(&e),
    }
}

pub(super) async fn grant<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Rejection> {
    let body = check_body(body)?;
    let LeaseGrantBody { ttl_s } = parse_json(&body, r#"{"ttl_s": N}"#)?;
    let ttl_ms = ttl_s.saturating_mul(1000);
    if !(LEASE_TTL_MS_MIN..=LEASE_TTL_MS_MAX).contains(&ttl_ms) {
        return Err(Rejection(
            StatusCode::BAD_REQUEST,
            format!(
                "ttl_s must be from {} to {}",
                LEASE_TTL_MS_MIN / 1000,
                LEASE_TTL_MS_MAX / 1000
            ),
        ));
    }
    let command = CommandRef::LeaseGrant {
        ttl_ms,
        leases_max: st.service.leases_max(),
    };
    let answer = |a: &Applied| match a.result.outcome {
        CommandOutcome::LeaseGranted { id, ttl_ms } => Some(
            Json(LeaseGrantResponse {
                id,
                ttl_s: ttl_ms / 1000,
                revision: a.result.revision,
                leader: a.leader,
            })
            .into_response(),
        ),
        _ => None,
    };
    propose(
        &st,
        command,
        &headers,
        Method::POST,
        "/lease".into(),
        body,
        answer,
    )
    .await
}

pub(super) async fn revoke<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Rejection> {
    let id = lease_id(path)?;
    let answer = |a: &Applied| match a.result.outcome {
        CommandOutcome::LeaseRevoked { deleted } => Some(
            Json(LeaseRevokeResponse {
                id,
                deleted,
                revision: a.result.revision,
                leader: a.leader,
            })
            .into_response(),
        ),
        _ => None,
    };
    let target = format!("/lease/{id}");
    let command = CommandRef::LeaseRevoke { id };
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

pub(super) async fn keepalive<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Rejection> {
    let id = lease_id(path)?;
    let result = st.service.lease_keepalive(id).await;
    let target = format!("/lease/{id}/keepalive");
    Ok(leader_answer(&st, result, Method::POST, &target, &headers).await)
}

pub(super) async fn get_lease<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Rejection> {
    let id = lease_id(path)?;
    let result = st.service.lease_get(id, LEASE_KEYS_LISTED_MAX).await;
    let target = format!("/lease/{id}");
    Ok(leader_answer(&st, result, Method::GET, &target, &headers).await)
}

pub(super) async fn list<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    headers: HeaderMap,
) -> Result<Response, Rejection> {
    let result = st.service.lease_list().await;
    Ok(leader_answer(&st, result, Method::GET, "/lease", &headers).await)
}
