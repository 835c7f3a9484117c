//! `GET /metrics` and the middleware that counts and times every client request.
//!
//! Requests are labelled by route template, not by path: a key must never become a label
//! (one series per key would grow the node's memory with every key a client invents). The
//! template comes from axum's `MatchedPath` and is mapped onto a fixed table of
//! `&'static str`, so recording allocates nothing; unknown paths and methods count as
//! `other`.

use super::ApiState;
use crate::api::KvService;
use crate::metrics::{Metrics, CONTENT_TYPE};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::time::Instant;

/// The route label of everything the table below does not name.
pub const ROUTE_OTHER: &str = "other";

/// The route label of watches, whether hyper or the raw path served them.
pub const ROUTE_WATCH: &str = "GET /watch";

/// `METHOD template` for a known route, else [`ROUTE_OTHER`].
pub fn route_label(method: &Method, matched: Option<&str>) -> &'static str {
    let Some(path) = matched else {
        return ROUTE_OTHER;
    };
    // `/kv/?key=K` is the same endpoint as `/kv/{key}` (for keys a path cannot carry).
    let path = if path == "/kv/" { "/kv/{key}" } else { path };
    match (method.as_str(), path) {
        ("GET", "/kv/{key}") => "GET /kv/{key}",
        ("PUT", "/kv/{key}") => "PUT /kv/{key}",
        ("DELETE", "/kv/{key}") => "DELETE /kv/{key}",
        ("GET", "/kv") => "GET /kv",
        ("DELETE", "/kv") => "DELETE /kv",
        ("POST", "/txn") => "POST /txn",
        ("GET", "/watch") => ROUTE_WATCH,
        ("POST", "/lease") => "POST /lease",
        ("GET", "/lease") => "GET /lease",
        ("GET", "/lease/{id}") => "GET /lease/{id}",
        ("DELETE", "/lease/{id}") => "DELETE /lease/{id}",
        ("POST", "/lease/{id}/keepalive") => "POST /lease/{id}/keepalive",
        ("GET", "/cluster/status") => "GET /cluster/status",
        ("POST", "/cluster/transfer-leader") => "POST /cluster/transfer-leader",
        ("GET", "/cluster/members") => "GET /cluster/members",
        ("POST", "/cluster/members") => "POST /cluster/members",
        ("POST", "/cluster/members/{id}/promote") => "POST /cluster/members/{id}/promote",
        ("DELETE", "/cluster/members/{id}") => "DELETE /cluster/members/{id}",
        ("GET", "/health") => "GET /health",
        ("GET", "/ready") => "GET /ready",
        ("GET", "/snapshot") => "GET /snapshot",
        ("GET", "/metrics") => "GET /metrics",
        _ => ROUTE_OTHER,
    }
}

/// Counts and times one request (until its response head is ready; a streamed body such as
/// `/snapshot`'s is not included).
pub(super) async fn record(
    State(metrics): State<Arc<Metrics>>,
    request: Request,
    next: Next,
) -> Response {
    let matched = request.extensions().get::<MatchedPath>();
    let route = route_label(request.method(), matched.map(MatchedPath::as_str));
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.observe_http(route, response.status().as_u16(), started.elapsed());
    response
}

/// The node's metrics, refreshed from its current status.
pub(super) async fn get_metrics<S: KvService>(State(st): State<Arc<ApiState<S>>>) -> Response {
    st.service.refresh_metrics(&st.metrics).await;
    let mut response = st.metrics.encode().into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_become_labels() {
        assert_eq!(
            route_label(&Method::PUT, Some("/kv/{key}")),
            "PUT /kv/{key}"
        );
        assert_eq!(route_label(&Method::GET, Some("/kv/")), "GET /kv/{key}");
        assert_eq!(route_label(&Method::GET, Some("/kv")), "GET /kv");
        assert_eq!(route_label(&Method::DELETE, Some("/kv")), "DELETE /kv");
        assert_eq!(route_label(&Method::POST, Some("/txn")), "POST /txn");
        assert_eq!(route_label(&Method::GET, Some("/watch")), ROUTE_WATCH);
        assert_eq!(
            route_label(&Method::POST, Some("/lease/{id}/keepalive")),
            "POST /lease/{id}/keepalive"
        );
        assert_eq!(
            route_label(&Method::DELETE, Some("/lease/{id}")),
            "DELETE /lease/{id}"
        );
        assert_eq!(
            route_label(&Method::DELETE, Some("/cluster/members/{id}")),
            "DELETE /cluster/members/{id}"
        );
        assert_eq!(
            route_label(&Method::POST, Some("/cluster/members/{id}/promote")),
            "POST /cluster/members/{id}/promote"
        );
        assert_eq!(route_label(&Method::PATCH, Some("/kv/{key}")), ROUTE_OTHER);
        assert_eq!(route_label(&Method::GET, None), ROUTE_OTHER);
        assert_eq!(route_label(&Method::GET, Some("/a/b/c")), ROUTE_OTHER);
    }
}
