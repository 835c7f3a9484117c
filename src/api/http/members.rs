//! The membership endpoints: `GET /cluster/members`, `POST /cluster/members`,
//! `POST /cluster/members/{id}/promote` and `DELETE /cluster/members/{id}`.
//!
//! A module of its own because a membership change is checked more strictly than a write:
//! a bad address recorded in the log would be dialled by every member for as long as the
//! configuration lasts, so the id, the peer address (`host:port`) and the client URL are
//! validated here, before the service (and the log) sees them.
//!
//! - `GET` answers from this node's own view (no forwarding); `match_index` and `reachable`
//!   are there only when this node leads.
//! - The three changes answer 200 with the leader's [`ClusterStatus`] once the change is
//!   committed and no joint configuration is left. On a follower they are forwarded to the
//!   leader like writes: not idempotent, so a forward that fails after sending is 504.
//! - `force` (`"force": true` in the body, `?force=true` on promote and remove) skips the
//!   reachable-quorum guard, never the others.
//! - Errors: 400 bad input, 413 an address over [`ADDR_BYTES_MAX`], 404 an unknown member,
//!   409 a guard refused the change (nothing changed), 503 certainly no effect, 504 the
//!   outcome is unknown (the change may still complete).

use super::{
    check_body, error, error_response, forward, parse_json, same_target, ApiState, Rejection,
};
use crate::api::types::{MemberAddBody, MembersResponse};
use crate::api::{KvService, ServiceError};
use crate::raft::{MemberChange, MembershipProposal};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use raftkv_storage::{MemberAddrs, NodeId};
use raftkv_types::ADDR_BYTES_MAX;
use serde::Deserialize;
use std::sync::Arc;

/// The shape named in a rejected `POST /cluster/members` body.
const ADD_SHAPE: &str = r#"{"id": N, "peer_addr": "host:port", "client_url": "http://host:port", "learner": false, "force": false}"#;

/// The query string of promote and remove.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ForceParams {
    force: Option<String>,
}

/// `GET /cluster/members`: this node's view of the configuration.
pub(super) async fn list_members<S: KvService>(State(st): State<Arc<ApiState<S>>>) -> Response {
    match st.service.status().await {
        Ok(s) => Json(MembersResponse {
            members: s.members,
            membership: s.membership,
            leader: s.leader,
            id: s.id,
        })
        .into_response(),
        Err(e) => error_response(&e),
    }
}

/// `POST /cluster/members`: adds a voter, or a learner with `"learner": true`.
pub(super) async fn add_member<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Rejection> {
    let body = check_body(body)?;
    let add: MemberAddBody = parse_json(&body, ADD_SHAPE)?;
    let proposal = add_proposal(add)?;
    Ok(propose(&st, proposal, Method::POST, &uri, &headers, body).await)
}

/// `POST /cluster/members/{id}/promote[?force=true]`: a caught-up learner becomes a voter.
pub(super) async fn promote_member<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    uri: Uri,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<ForceParams>, QueryRejection>,
) -> Result<Response, Rejection> {
    let id = member_id(id)?;
    let force = force_param(query)?;
    let proposal = one_change(MemberChange::Promote { id }, force);
    Ok(propose(&st, proposal, Method::POST, &uri, &headers, Bytes::new()).await)
}

/// `DELETE /cluster/members/{id}[?force=true]`: a voter or learner leaves.
pub(super) async fn remove_member<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    uri: Uri,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    query: Result<Query<ForceParams>, QueryRejection>,
) -> Result<Response, Rejection> {
    let id = member_id(id)?;
    let force = force_param(query)?;
    let proposal = one_change(MemberChange::Remove { id }, force);
    Ok(propose(&st, proposal, Method::DELETE, &uri, &headers, Bytes::new()).await)
}

/// Hands the change to the service; a follower forwards it to the leader as a write.
async fn propose<S: KvService>(
    st: &ApiState<S>,
    proposal: MembershipProposal,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    debug_assert!(proposal.known_addrs.is_empty(), "the node fills them in");
    debug_assert!(!proposal.changes.is_empty());
    match st.service.change_membership(proposal).await {
        Ok(status) => Json(status).into_response(),
        // The service's message already says the outcome is unknown (and that it is a
        // change, not a write).
        Err(ServiceError::Timeout(m)) => error(StatusCode::GATEWAY_TIMEOUT, m),
        Err(e) => forward(st, e, method, &same_target(uri), headers, body, true).await,
    }
}

fn one_change(change: MemberChange, force: bool) -> MembershipProposal {
    MembershipProposal {
        changes: vec![change],
        known_addrs: Default::default(),
        force,
    }
}

/// The proposal an add body asks for, once its fields are checked.
fn add_proposal(add: MemberAddBody) -> Result<MembershipProposal, Rejection> {
    let bad = |m: String| Rejection(StatusCode::BAD_REQUEST, m);
    if add.id == 0 {
        return Err(bad("id must be a positive node id (0 is reserved)".into()));
    }
    for (field, value) in [
        ("peer_addr", &add.peer_addr),
        ("client_url", &add.client_url),
    ] {
        if value.len() > ADDR_BYTES_MAX {
            return Err(Rejection(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{field} is longer than {ADDR_BYTES_MAX} bytes"),
            ));
        }
    }
    check_peer_addr(&add.peer_addr).map_err(|e| bad(format!("peer_addr: {e}")))?;
    crate::node::check_client_url(&add.client_url)
        .map_err(|e| bad(format!("client_url {:?}: {e}", add.client_url)))?;
    let (id, force) = (add.id, add.force);
    let addrs = MemberAddrs {
        peer_addr: add.peer_addr,
        client_url: add.client_url,
    };
    let change = match add.learner {
        true => MemberChange::AddLearner { id, addrs },
        false => MemberChange::AddVoter { id, addrs },
    };
    Ok(one_change(change, force))
}

/// Checks that `addr` is `host:port` (a port from 1 to 65535; an IPv6 host in brackets),
/// not a URL, without whitespace.
pub fn check_peer_addr(addr: &str) -> Result<(), String> {
    if addr.is_empty() {
        return Err("empty: expected host:port".into());
    }
    if addr.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{addr:?} contains whitespace or control characters"
        ));
    }
    if addr.contains('/') {
        return Err(format!("{addr:?} is a URL or path: expected host:port"));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("{addr:?} has no port: expected host:port"));
    };
    if host.is_empty() {
        return Err(format!("{addr:?} has no host: expected host:port"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "{addr:?}: an IPv6 host goes in brackets, [::1]:9000"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!(
            "{addr:?}: the port must be a number from 1 to 65535"
        )),
    }
}

/// The `{id}` path segment: a positive node id.
fn member_id(id: Result<Path<String>, PathRejection>) -> Result<NodeId, Rejection> {
    let bad = |m: String| Rejection(StatusCode::BAD_REQUEST, m);
    let Path(raw) = id.map_err(|e| bad(format!("invalid member id in path: {}", e.body_text())))?;
    match raw.parse::<NodeId>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(bad(format!("member id {raw:?} is not a positive node id"))),
    }
}

/// `?force=true|false` (absent: false); any other parameter is refused.
fn force_param(query: Result<Query<ForceParams>, QueryRejection>) -> Result<bool, Rejection> {
    let bad = |m: String| Rejection(StatusCode::BAD_REQUEST, m);
    let Query(params) = query.map_err(|e| {
        bad(format!(
            "invalid query string: {}; only force=true|false",
            e.body_text()
        ))
    })?;
    match params.force.as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(bad(format!(
            "force={other:?}: use force=true or force=false"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::check_peer_addr;

    #[test]
    fn peer_addresses_are_host_and_port() {
        for ok in [
            "n4:9004",
            "127.0.0.1:9000",
            "[::1]:9000",
            "a.b.example:65535",
        ] {
            assert_eq!(check_peer_addr(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "n4",
            ":9000",
            "n4:",
            "n4:0",
            "n4:65536",
            "n4:x",
            "http://n4:9000",
            "n 4:9000",
            "::1:9000",
            "n4:9000\n",
        ] {
            assert!(check_peer_addr(bad).is_err(), "{bad:?}");
        }
    }
}
