//! The HTTP/JSON client API (axum), over any [`KvService`].
//!
//! Routes: `PUT|GET|DELETE /kv/{key}` (writes with `?if_mod_revision=N`),
//! `GET /kv?prefix=P&limit=N&start=K`, `DELETE /kv?prefix=P`, `POST /txn` (see
//! `http/writes.rs` for conditional writes, transactions and client sessions),
//! `GET /cluster/status`, `POST /cluster/transfer-leader`, `GET /health`, `GET /ready`,
//! `GET /snapshot`, `GET /metrics` (Prometheus; every request is counted and timed by route,
//! see [`metrics`]), and the membership endpoints `GET|POST /cluster/members`,
//! `POST /cluster/members/{id}/promote`, `DELETE /cluster/members/{id}` (see `http/members.rs`).
//! Connections are accepted and bounded by [`super::server`]; bodies are buffered under a
//! deadline and a byte budget by [`super::body`]; a token, when configured, is checked by
//! [`super::auth`] before a body is read.
//!
//! Every rejection is JSON `{"error": "...", "kind": "..."}` with a 4xx status — malformed
//! JSON, a body that is not an object (`["x"]`), missing fields, bad percent-encoding,
//! oversized keys and bodies, unknown consistency levels, wrong methods and unknown paths —
//! so bad input never reaches the service and never yields a 500. A 404 says which: kind
//! `key_not_found` (the key does not exist), `not_found` (another named thing, such as a
//! member, does not exist) or `no_such_endpoint` (routing). A 409 is kind `conflict`. Bodies are read
//! whatever their content type (curl's `-d` sends a form type), and capped at a size derived
//! from the value limit.
//!
//! **Keys** are the single path segment after `/kv/`, percent-decoded exactly once and never
//! normalized: `/kv/%2E%2E` is the key `..`, `/kv/a%2Fb` the key `a/b`.
//!
//! **Lists** stop at `limit` pairs or `list_bytes_max` bytes of keys plus values, whichever
//! comes first (always at least one pair). A cut list says `"more": true` and
//! `"next": "<last key returned>"`; `start=<next>` continues strictly after that key.
//!
//! **Forwarding.** When the service answers "not the leader" and names a leader whose client
//! URL is known, the request is proxied there once, marked with `X-Raftkv-Forwarded-By`, with
//! the client's `Authorization` header, under the node's request timeout; the leader's body
//! is streamed back, not buffered. A forwarded request that again meets a non-leader gets 503
//! instead of a second hop (no loops). A forwarded write whose connection fails after it was
//! sent gets 504 (outcome unknown), never a retry. Stale reads are always served locally.

use super::auth::{self, AuthToken};
use super::body::{self, BodyLimits};
use super::server::ClientPortConfig;
use super::{Consistency, KvService, Limits, ListQuery, ServiceError};
use crate::api::types::*;
use crate::metrics::Metrics;
use crate::storage::command::CommandError;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
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
/// Time allowed to open a connection to the leader when forwarding.
pub const FORWARD_CONNECT_TIMEOUT_MS: u64 = 2000;

/// The error kinds of the two different 404s.
pub const KIND_KEY_NOT_FOUND: &str = "key_not_found";
pub const KIND_NO_SUCH_ENDPOINT: &str = "no_such_endpoint";
/// The error kind of a 404 for something named that does not exist (a member).
pub const KIND_NOT_FOUND: &str = "not_found";
/// The error kind of a 409: the request conflicts with the cluster's state; nothing changed.
pub const KIND_CONFLICT: &str = "conflict";

/// How a router is built beyond its service: limits, authentication, forwarding TLS.
#[derive(Clone, Debug, Default)]
pub struct RouterOptions {
    pub port: ClientPortConfig,
    /// When set, every route but the probes needs this bearer token.
    pub auth_token: Option<AuthToken>,
    /// TLS settings for forwarding to `https://` leaders (trusted CAs).
    pub forward_tls: Option<Arc<rustls::ClientConfig>>,
    /// The node's metrics; a router without them keeps its own (HTTP series only).
    pub metrics: Option<Arc<Metrics>>,
}

struct ApiState<S> {
    service: Arc<S>,
    limits: Limits,
    list_bytes_max: usize,
    forward_timeout: Duration,
    forwarder: reqwest::Client,
    metrics: Arc<Metrics>,
}

/// The raw path of `GET /watch` for `service` (see [`crate::api::server::RawHandler`]): a
/// watch that is a connection's first request costs a few KiB instead of hyper's ~20.
pub fn raw_watch<S: KvService>(
    service: Arc<S>,
    options: &RouterOptions,
) -> Arc<dyn crate::api::server::RawHandler> {
    let limits = service.limits();
    let metrics = options
        .metrics
        .clone()
        .unwrap_or_else(|| Arc::new(Metrics::standalone()));
    Arc::new(watch::RawWatch {
        node_id: service.node_id(),
        metrics,
        service,
        key_bytes_max: limits.command.key_bytes_max,
        token: options.auth_token.clone(),
        write_timeout: Duration::from_millis(options.port.idle_timeout_ms),
    })
}

/// Builds the router for `service` with default options.
pub fn router<S: KvService>(service: Arc<S>) -> Router {
    router_with(service, &RouterOptions::default())
}

/// Builds the router for `service`.
pub fn router_with<S: KvService>(service: Arc<S>, options: &RouterOptions) -> Router {
    let limits = service.limits();
    let node_id = service.node_id();
    // JSON may escape each byte as \u00XX (6 bytes); allow that plus room for the envelope.
    let body_bytes_max = limits.command.value_bytes_max.saturating_mul(6) + (64 << 10);
    let port = &options.port;
    let body_limits = Arc::new(BodyLimits::new(
        port.body_buffer_bytes_max,
        port.body_read_timeout_ms,
        body_bytes_max,
    ));
    let metrics = options
        .metrics
        .clone()
        .unwrap_or_else(|| Arc::new(Metrics::standalone()));
    let state = Arc::new(ApiState {
        service,
        limits,
        list_bytes_max: port.list_bytes_max,
        forward_timeout: Duration::from_millis(port.forward_timeout_ms),
        forwarder: forwarder(options.forward_tls.clone()),
        metrics: metrics.clone(),
    });
    let mut router = Router::new()
        .route(
            "/kv/{key}",
            get(get_key::<S>)
                .put(writes::put_key::<S>)
                .delete(writes::delete_key::<S>),
        )
        .route(
            "/kv",
            get(list_keys::<S>).delete(writes::delete_prefix::<S>),
        )
        .route(
            "/kv/",
            get(get_key::<S>)
                .put(writes::put_key::<S>)
                .delete(writes::delete_key::<S>),
        )
        .route("/txn", post(writes::post_txn::<S>))
        .route("/watch", get(watch::get_watch::<S>))
        .route("/lease", post(leases::grant::<S>).get(leases::list::<S>))
        .route(
            "/lease/{id}",
            get(leases::get_lease::<S>).delete(leases::revoke::<S>),
        )
        .route("/lease/{id}/keepalive", post(leases::keepalive::<S>))
        .route("/cluster/status", get(status::<S>))
        .route("/cluster/transfer-leader", post(transfer_leader::<S>))
        .route(
            "/cluster/members",
            get(members::list_members::<S>).post(members::add_member::<S>),
        )
        .route("/cluster/members/{id}", delete(members::remove_member::<S>))
        .route(
            "/cluster/members/{id}/promote",
            post(members::promote_member::<S>),
        )
        .route("/health", get(health::<S>))
        .route("/ready", get(ready::<S>))
        .route("/snapshot", get(snapshot::get_snapshot::<S>))
        .route("/metrics", get(metrics::get_metrics::<S>))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_bytes_max))
        .layer(axum::middleware::from_fn_with_state(
            body_limits,
            body::buffer_body,
        ));
    if let Some(token) = options.auth_token.clone() {
        router = router.layer(axum::middleware::from_fn_with_state(
            token,
            auth::require_token,
        ));
    }
    // Outermost: refused requests (401, 413, ...) are counted too.
    router = router.layer(axum::middleware::from_fn_with_state(
        metrics,
        self::metrics::record,
    ));
    router
        .layer(axum::middleware::map_response(
            move |mut r: Response| async move {
                r.headers_mut()
                    .insert(NODE_HEADER, HeaderValue::from(node_id));
                r
            },
        ))
        .with_state(state)
}

/// The HTTP client that forwards to the leader (its timeout is set per request). Without
/// `--client-ca` it trusts the system's CAs, or none where the system has none (a scratch
/// container): forwarding to an `http://` leader works either way.
fn forwarder(tls: Option<Arc<rustls::ClientConfig>>) -> reqwest::Client {
    crate::tls::ensure_provider();
    let configure = |b: reqwest::ClientBuilder| {
        b.connect_timeout(Duration::from_millis(FORWARD_CONNECT_TIMEOUT_MS))
            .pool_max_idle_per_host(64)
    };
    if let Some(tls) = tls {
        match configure(reqwest::Client::builder())
            .tls_backend_preconfigured((*tls).clone())
            .build()
        {
            Ok(client) => return client,
            Err(e) => tracing::error!(
                error = %e,
                "cannot build the forwarding client with --client-ca; using the system's CAs"
            ),
        }
    }
    match crate::tls::http_client_with_system_roots(configure) {
        Ok((client, false)) => client,
        Ok((client, true)) => {
            tracing::warn!(
                "no CA certificates on this system: forwarding to an https:// leader needs --client-ca"
            );
            client
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot build the forwarding client; using the defaults");
            reqwest::Client::new()
        }
    }
}

/// A JSON error whose kind follows from its status.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    error_kind(status, default_kind(status), message)
}

/// A JSON error `{"error": message, "kind": kind}`.
pub(crate) fn error_kind(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.into(),
            kind: Some(kind.to_string()),
        }),
    )
        .into_response()
}

fn default_kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => KIND_NO_SUCH_ENDPOINT,
        405 => "method_not_allowed",
        408 => "request_timeout",
        409 => KIND_CONFLICT,
        413 => "too_large",
        503 => "unavailable",
        504 => "outcome_unknown",
        _ => "internal",
    }
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
        ServiceError::Conflict(m) => error(StatusCode::CONFLICT, m.clone()),
        ServiceError::NotFound(m) => error_kind(StatusCode::NOT_FOUND, KIND_NOT_FOUND, m.clone()),
    }
}

async fn not_found(uri: Uri) -> Response {
    error_kind(
        StatusCode::NOT_FOUND,
        KIND_NO_SUCH_ENDPOINT,
        format!("no such endpoint: {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed on {}", uri.path()),
    )
}

/// The key a request addresses: the path segment after `/kv/`, percent-decoded once, or for
/// `/kv/?key=K` the query parameter — the form for `.` and `..`, which URL libraries
/// (WHATWG parsers, reqwest's included) remove as dot segments even when percent-encoded.
struct KeyArg(Result<String, Rejection>);

#[derive(Deserialize)]
struct KeyQuery {
    key: Option<String>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for KeyArg {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        if parts.uri.path() == "/kv/" {
            let key = Query::<KeyQuery>::try_from_uri(&parts.uri)
                .map_err(|e| {
                    Rejection(
                        StatusCode::BAD_REQUEST,
                        format!("invalid query string: {}", e.body_text()),
                    )
                })
                .map(|Query(q)| q.key.unwrap_or_default());
            return Ok(KeyArg(key));
        }
        let path = Path::<String>::from_request_parts(parts, state).await;
        Ok(KeyArg(path.map(|Path(k)| k).map_err(|e: PathRejection| {
            Rejection(
                StatusCode::BAD_REQUEST,
                format!("invalid key in path: {}", e.body_text()),
            )
        })))
    }
}

fn check_key(key: KeyArg, limits: &Limits) -> Result<String, Rejection> {
    let key = key.0?;
    limits
        .command
        .check_key(key.as_bytes())
        .map_err(limit_rejection)?;
    Ok(key)
}

/// A request over a command limit, answered as the service answers it (413 or 400).
fn limit_rejection(e: CommandError) -> Rejection {
    match ServiceError::from(e) {
        ServiceError::TooLarge(m) => Rejection(StatusCode::PAYLOAD_TOO_LARGE, m),
        other => Rejection(StatusCode::BAD_REQUEST, other.to_string()),
    }
}

/// Where a key request is forwarded: the key re-encoded by the client's rules, with the
/// original query but its `key` parameter.
fn key_target(key: &str, uri: &Uri) -> String {
    let rest: Vec<&str> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("key="))
        .collect();
    crate::client::key_path_and_query(key, &rest.join("&"))
}

/// Where any other request is forwarded: its own path and query.
fn same_target(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or(uri.path(), |p| p.as_str())
        .to_string()
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

/// Parses a JSON object body. serde would read a struct from an array too (`["x"]`), so
/// anything but an object is refused first.
fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes, shape: &str) -> Result<T, Rejection> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(Rejection(
            StatusCode::BAD_REQUEST,
            format!("the body must be a JSON object: expected {shape}"),
        ));
    }
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
    /// A list continues strictly after this key (the `next` of the previous page).
    start: Option<String>,
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
    target_path: &str,
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
    let target = format!("{url}{target_path}");
    let mut request = st
        .forwarder
        .request(method, &target)
        .timeout(st.forward_timeout)
        .header(FORWARDED_BY_HEADER, st.service.node_id().to_string())
        .header("content-type", "application/json")
        .body(body);
    // The client's credentials and session travel with the write.
    for name in [
        header::AUTHORIZATION.as_str(),
        writes::CLIENT_ID_HEADER,
        writes::SEQ_HEADER,
    ] {
        if let Some(v) = headers.get(name) {
            request = request.header(name, v.clone());
        }
    }
    match request.send().await {
        Ok(resp) => relay(resp, id, &url),
        Err(err) if err.is_connect() || !is_write => unavailable(format!(
            "cannot reach the leader (node {id}) at {url}: {err}"
        )),
        Err(err) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("forwarding to the leader (node {id}) failed: {err}; the outcome is unknown"),
        ),
    }
}

/// The leader's answer, its body streamed through as it arrives. A body cut off midway
/// cuts the client's response off too, which the client reads as "outcome unknown".
fn relay(resp: reqwest::Response, id: u64, url: &str) -> Response {
    let status = resp.status();
    let retry_after = resp.headers().get("retry-after").cloned();
    let content_type = resp.headers().get("content-type").cloned();
    let snapshot_headers: Vec<(&str, HeaderValue)> = snapshot::SNAPSHOT_HEADERS
        .iter()
        .chain(&[writes::REVISION_HEADER, writes::DUPLICATE_HEADER])
        .filter_map(|name| Some((*name, resp.headers().get(*name)?.clone())))
        .collect();
    let mut out = Response::new(Body::from_stream(resp.bytes_stream()));
    *out.status_mut() = status;
    let h = out.headers_mut();
    h.insert(
        "content-type",
        content_type.unwrap_or(HeaderValue::from_static("application/json")),
    );
    if let Some(v) = retry_after {
        h.insert("retry-after", v);
    }
    for (name, v) in snapshot_headers {
        h.insert(name, v);
    }
    h.insert(FORWARDED_TO_HEADER, HeaderValue::from(id));
    if let Ok(v) = HeaderValue::from_str(url) {
        h.insert(LEADER_URL_HEADER, v);
    }
    out
}

struct LeaderHintUrl {
    id: u64,
    url: String,
}

async fn get_key<S: KvService>(
    State(st): State<Arc<ApiState<S>>>,
    uri: Uri,
    headers: HeaderMap,
    path: KeyArg,
    query: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Response, Rejection> {
    let key = check_key(path, &st.limits)?;
    let consistency = read_params(query)?.1;
    Ok(match st.service.get(key.clone(), consistency).await {
        Ok(ReadValue {
            kv: Some(kv),
            index,
            leader,
        }) => with_revision(
            Json(KvResponse {
                key,
                value: kv.value,
                index,
                leader,
                revision: index,
                create_revision: kv.create_revision,
                mod_revision: kv.mod_revision,
                version: kv.version,
            })
            .into_response(),
            index,
        ),
        Ok(ReadValue {
            kv: None, index, ..
        }) => with_revision(
            error_kind(
                StatusCode::NOT_FOUND,
                KIND_KEY_NOT_FOUND,
                format!("key not found (as of revision {index})"),
            ),
            index,
        ),
        Err(e) => {
            let target = key_target(&key, &uri);
            forward(&st, e, Method::GET, &target, &headers, Bytes::new(), false).await
        }
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
    let start = params.start;
    let too_long = |k: &str| k.len() > st.limits.command.key_bytes_max;
    if too_long(&prefix) || start.as_deref().is_some_and(too_long) {
        return Err(Rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            "prefix or start exceeds the key size limit".into(),
        ));
    }
    let query = ListQuery {
        prefix,
        after: start,
        limit,
        bytes_max: st.list_bytes_max,
    };
    Ok(match st.service.list(query, consistency).await {
        Ok(l) => {
            let next = if l.more {
                l.items.last().map(|kv| kv.key.clone())
            } else {
                None
            };
            let revision = l.index;
            with_revision(
                Json(ListResponse {
                    count: l.items.len(),
                    items: l.items,
                    index: l.index,
                    revision,
                    more: l.more,
                    next,
                })
                .into_response(),
                revision,
            )
        }
        Err(e) => {
            let target = same_target(&uri);
            forward(&st, e, Method::GET, &target, &headers, Bytes::new(), false).await
        }
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
        Err(e) => {
            let target = same_target(&uri);
            forward(&st, e, Method::POST, &target, &headers, body, false).await
        }
    })
}

async fn health<S: KvService>(State(st): State<Arc<ApiState<S>>>) -> Response {
    Json(serde_json::json!({ "status": "ok", "id": st.service.node_id() })).into_response()
}

async fn ready<S: KvService>(State(st): State<Arc<ApiState<S>>>) -> Response {
    match st.service.ready().await {
        Ok(()) => Json(ReadyResponse {
            ready: true,
            id: st.service.node_id(),
        })
        .into_response(),
        Err(e) => match e {
            ServiceError::Unavailable(why) => unavailable(format!("not ready: {why}")),
            other => error_response(&other),
        },
    }
}

/// Sets `X-Raftkv-Revision` on a read's answer.
fn with_revision(mut r: Response, revision: u64) -> Response {
    r.headers_mut()
        .insert(writes::REVISION_HEADER, HeaderValue::from(revision));
    r
}

mod leases;
mod members;
mod metrics;
mod snapshot;
mod watch;
mod writes;
pub use members::check_peer_addr;
pub use snapshot::{CLUSTER_ID_HEADER, SNAPSHOT_INDEX_HEADER, SNAPSHOT_TERM_HEADER};
pub use writes::{
    CLIENT_ID_HEADER, DUPLICATE_HEADER, KIND_CONDITION_FAILED, KIND_RESULT_NOT_KEPT,
    KIND_SESSION_EXPIRED, KIND_SESSION_STALE, REVISION_HEADER, SEQ_HEADER,
};

#[cfg(test)]
mod members_tests;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod writes_tests;
