//! The HTTP/JSON client API (axum), over any [`KvService`].
//!
//! Routes: `PUT|GET|DELETE /kv/{key}`, `GET /kv?prefix=P&limit=N`, `GET /cluster/status`,
//! `POST /cluster/transfer-leader`, `GET /health`, `GET /ready`.
//!
//! Every rejection is JSON `{"error": "..."}` with a 4xx status — malformed JSON, missing
//! fields, bad percent-encoding, oversized keys and bodies, unknown consistency levels, wrong
//! methods and unknown paths — so bad input never reaches the service and never yields a 500.
//! Bodies are read whatever their content type (curl's `-d` sends a form type), and capped at
//! a size derived from the value limit before they are buffered.
//!
//! **Forwarding.** When the service answers "not the leader" and names a leader whose client
//! URL is known, the request is proxied there once, marked with `X-Raftkv-Forwarded-By`; a
//! forwarded request that again meets a non-leader gets 503 instead of a second hop (no
//! loops). A forwarded write whose connection fails after it was sent gets 504 (outcome
//! unknown), never a retry. Stale reads are always served locally.

use super::{Consistency, KvService, Limits, ServiceError};
use crate::api::types::*;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// Marks a request forwarded by another node (value: that node's id).
pub const FORWARDED_BY_HEADER: &str = "x-raftkv-forwarded-by";
/// On every response: the id of the node that produced it.
pub const NODE_HEADER: &str = "x-raftkv-node";
/// On a forwarded response: the leader's id and client URL.
pub const FORWARDED_TO_HEADER: &str = "x-raftkv-forwarded-to";
pub const LEADER_URL_HEADER: &str = "x-raftkv-leader-url";
/// The default number of keys a list returns.
pub const LIST_LIMIT_DEFAULT: usize = 1000;

struct ApiState<S> {
    service: Arc<S>,
    limits: Limits,
    forwarder: reqwest::Client,
}

/// Builds the router for `service`.
pub fn router<S: KvService>(service: Arc<S>) -> Router {
    let limits = service.limits();
    let node_id = service.node_id();
    // JSON may escape each byte as \u00XX (6 bytes); allow that plus room for the envelope.
    let body_bytes_max = limits.value_bytes_max.saturating_mul(6) + (64 << 10);
    let forwarder = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(64)
        .build()
        .unwrap_or_else(|_| reqwest::Client::new());
    let state = Arc::new(ApiState {
        service,
        limits,
        forwarder,
    });
    Router::new()
        .route(
            "/kv/{key}",
            get(get_key::<S>).put(put_key::<S>).delete(delete_key::<S>),
        )
        .route("/kv", get(list_keys::<S>))
        .route("/kv/", get(empty_key).put(empty_key).delete(empty_key))
        .route("/cluster/status", get(status::<S>))
        .route("/cluster/transfer-leader", post(transfer_leader::<S>))
        .route("/health", get(health::<S>))
        .route("/ready", get(ready::<S>))
        .route("/snapshot", get(snapshot::get_snapshot::<S>))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_bytes_max))
        .layer(axum::middleware::map_response(
            move |mut r: Response| async move {
                r.headers_mut()
                    .insert(NODE_HEADER, HeaderValue::from(node_id));
                r
            },
        ))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
        }),
    )
        .into_response()
}

/// A request refused before it reaches the service.
struct Rejection(StatusCode, String);

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

fn unavailable(message: impl Into<String>) -> Response {
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, message);
    r.headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    r
}

/// The HTTP answer for a service error (forwarding aside).
pub fn error_response(e: &ServiceError) -> Response {
    match e {
        ServiceError::InvalidInput(m) => error(StatusCode::BAD_REQUEST, m.clone()),
        ServiceError::TooLarge(m) => error(StatusCode::PAYLOAD_TOO_LARGE, m.clone()),
        ServiceError::NotLeader { leader } => unavailable(match leader {
            Some(l) => format!(
                "not the leader; node {} leads but its client URL is unknown",
                l.id
            ),
            None => "no leader is known; retry shortly".to_string(),
        }),
        ServiceError::Unavailable(m) => unavailable(m.clone()),
        ServiceError::Timeout(m) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("{m}; the outcome is unknown: the write may or may not be applied"),
        ),
        ServiceError::Internal(m) => error(StatusCode::INTERNAL_SERVER_ERROR, m.clone()),
    }
}

async fn not_found(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

async fn empty_key() -> Response {
    error(StatusCode::BAD_REQUEST, "the key must not be empty")
}

fn check_key(
    path: Result<Path<String>, PathRejection>,
    limits: &Limits,
) -> Result<String, Rejection> {
    let Path(key) = path.map_err(|e| {
        Rejection(
            StatusCode::BAD_REQUEST,
            format!("invalid key in path: {}", e.body_text()),
        )
    })?;
    if key.is_empty() {
        return Err(Rejection(
            StatusCode::BAD_REQUEST,
            "the key must not be empty".into(),
        ));
    }
    if key.len() > limits.key_bytes_max {
        return Err(Rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "key of {} bytes exceeds the limit of {} bytes",
                key.len(),
                limits.key_bytes_max
            ),
        ));
    }
    Ok(key)
}

fn check_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Rejection> {
    body.map_err(|e| {
        let status = e.status();
        let status = if status == StatusCode::PAYLOAD_TOO_LARGE {
            status
        } else {
            StatusCode::BAD_REQUEST
        };
        Rejection(
            status,
            format!("cannot read the request body: {}", e.body_text()),
        )
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes, shape: &str) -> Result<T, Rejection> {
    serde_json::from_slice(body).map_err(|e| {
        Rejection(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body ({e}); expected {shape}"),
        )
    })
}

#[derive(Debug, Deserialize)]
struct ReadParams {
    consistency: Option<String>,
    prefix: Option<String>,
    limit: Option<String>,
}

fn read_params(
    q: Result<Query<ReadParams>, QueryRejection>,
) -> Result<(ReadParams, Consistency), Rejection> {
    let Query(params) = q.map_err(|e| {
        Rejection(
            StatusCode::BAD_REQUEST,
            format!("invalid query string: {}", e.body_text()),
        )
    })?;
    let consistency = match params.consistency.as_deref() {
        None => Consistency::Linearizable,
        Some(c) => Consistency::parse(c).ok_or_else(|| {
            Rejection(
                StatusCode::BAD_REQUEST,
                format!("unknown consistency {c:?}: use linearizable, lease or stale"),
            )
        })?,
    };
    Ok((params, consistency))
}

/// Proxies the request to the leader, or explains why not.
async fn forward<S: KvService>(
    st: &ApiState<S>,
    e: ServiceError,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    is_write: bool,
) -> Response {
    let ServiceError::NotLeader { leader } = &e else {
        return error_response(&e);
    };
    if headers.contains_key(FORWARDED_BY_HEADER) {
        return unavailable("leadership moved while the request was being forwarded; retry");
    }
    let Some(LeaderHintUrl { id, url }) = leader.as_ref().and_then(|l| {
        l.client_url.as_ref().map(|u| LeaderHintUrl {
            id: l.id,
            url: u.trim_end_matches('/').to_string(),
        })
    }) else {
        return error_response(&e);
    };
    let target = format!(
        "{url}{}",
        uri.path_and_query().map_or(uri.path(), |p| p.as_str())
    );
    let request = st
        .forwarder
        .request(method, &target)
        .header(FORWARDED_BY_HEADER, st.service.node_id().to_string())
        .header("content-type", "application/json")
        .body(body);
    match request.send().await {
        Ok(resp) => {
            let status = resp.status();
            let retry_after = resp.headers().get("retry-after").cloned();
            match resp.bytes().await {
                Ok(bytes) => {
                    let mut out = (status, bytes).into_response();
                    out.headers_mut()
                        .insert("content-type", HeaderValue::from_static("application/json"));
                    if let Some(v) = retry_after {
                        out.headers_mut().insert("retry-after", v);
                    }
                    out.headers_mut()
                        .insert(FORWARDED_TO_HEADER, HeaderValue::from(id));
                    if let Ok(v) = HeaderValue::from_str(&url) {
                        out.headers_mut().insert(LEADER_URL_HEADER, v);
                    }
                    out
                }
                Err(err) if is_write => error(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("the leader (node {id}) did not finish answering: {err}; the outcome is unknown"),
                ),
                Err(err) => unavailable(format!("the leader (node {id}) did not finish answering: {err}")),
            }
        }
        Err(err) if err.is_connect() || !is_write => unavailable(format!(
            "cannot reach the leader (node {id}) at {url}: {err}"
        )),
        Err(err) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("forwarding to the leader (node {id}) failed: {err}; the outcome is unknown"),
        ),
    }
}

struct LeaderHintUrl {
    id: u64,
    url: String,
}

async fn put_key<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    uri: Uri,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Rejection> {
    let key = check_key(path, &st.limits)?;
    let body = check_body(body)?;
    let PutBody { value } = parse_json(&body, r#"{"value": "..."}"#)?;
    if value.len() > st.limits.value_bytes_max {
        return Err(Rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "value of {} bytes exceeds the limit of {} bytes",
                value.len(),
                st.limits.value_bytes_max
            ),
        ));
    }
    Ok(match st.service.put(key.clone(), value.clone()).await {
        Ok(w) => Json(KvResponse {
            key,
            value,
            index: w.index,
            leader: Some(w.leader),
        })
        .into_response(),
        Err(e) => forward(&st, e, Method::PUT, &uri, &headers, body, true).await,
    })
}

async fn delete_key<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    uri: Uri,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, Rejection> {
    let key = check_key(path, &st.limits)?;
    Ok(match st.service.delete(key.clone()).await {
        Ok(d) => Json(DeleteResponse {
            key,
            deleted: d.deleted,
            index: d.index,
            leader: d.leader,
        })
        .into_response(),
        Err(e) => forward(&st, e, Method::DELETE, &uri, &headers, Bytes::new(), true).await,
    })
}

async fn get_key<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    uri: Uri,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Response, Rejection> {
    let key = check_key(path, &st.limits)?;
    let consistency = read_params(query)?.1;
    Ok(match st.service.get(key.clone(), consistency).await {
        Ok(ReadValue {
            value: Some(value),
            index,
            leader,
        }) => Json(KvResponse {
            key,
            value,
            index,
            leader,
        })
        .into_response(),
        Ok(ReadValue {
            value: None, index, ..
        }) => error(
            StatusCode::NOT_FOUND,
            format!("key not found (as of index {index})"),
        ),
        Err(e) => forward(&st, e, Method::GET, &uri, &headers, Bytes::new(), false).await,
    })
}

async fn list_keys<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    uri: Uri,
    headers: HeaderMap,
    query: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Response, Rejection> {
    let (params, consistency) = read_params(query)?;
    let limit = match params.limit.as_deref().map(str::parse::<usize>) {
        None => LIST_LIMIT_DEFAULT,
        Some(Ok(n)) if n >= 1 && n <= st.limits.list_limit_max => n,
        Some(_) => {
            return Err(Rejection(
                StatusCode::BAD_REQUEST,
                format!(
                    "limit must be a number from 1 to {}",
                    st.limits.list_limit_max
                ),
            ))
        }
    };
    let prefix = params.prefix.unwrap_or_default();
    if prefix.len() > st.limits.key_bytes_max {
        return Err(Rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            "prefix exceeds the key size limit".into(),
        ));
    }
    Ok(match st.service.list(prefix, limit, consistency).await {
        Ok(l) => Json(ListResponse {
            count: l.items.len(),
            items: l.items,
            index: l.index,
        })
        .into_response(),
        Err(e) => forward(&st, e, Method::GET, &uri, &headers, Bytes::new(), false).await,
    })
}

async fn status<S: KvService>(State(st): State<Arc<ApiState<S>>>) -> Response {
    match st.service.status().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn transfer_leader<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Rejection> {
    let body = check_body(body)?;
    let TransferBody { to } = parse_json(&body, r#"{"to": <node id>}"#)?;
    Ok(match st.service.transfer_leader(to).await {
        Ok(()) => Json(serde_json::json!({ "transferred_to": to })).into_response(),
        Err(e) => forward(&st, e, Method::POST, &uri, &headers, body, false).await,
    })
}

async fn health<S: KvService>(State(st): State<Arc<ApiState<S>>>) -> Response {
    Json(serde_json::json!({ "status": "ok", "id": st.service.node_id() })).into_response()
}

async fn ready<S: KvService>(State(st): State<Arc<ApiState<S>>>) -> Response {
    match st.service.ready().await {
        Ok(()) => {
            Json(serde_json::json!({ "ready": true, "id": st.service.node_id() })).into_response()
        }
        Err(e) => match e {
            ServiceError::Unavailable(why) => unavailable(format!("not ready: {why}")),
            other => error_response(&other),
        },
    }
}

mod snapshot;
pub use snapshot::{SNAPSHOT_INDEX_HEADER, SNAPSHOT_TERM_HEADER};

#[cfg(test)]
mod tests;
