//! `GET /watch?key=K|prefix=P[&start_revision=R]`: a stream of newline-delimited JSON change
//! events (see [`crate::watch`]), served by any node from its own applied state.
//!
//! Errors before the stream starts are ordinary JSON answers: 400 for bad parameters, 410
//! `{"error": "compacted", "compact_revision"}` when the start is older than the retained
//! history, 503 when the node has too many watchers or is stopping. Once streaming, the
//! status is 200 and an ending is said by a last `{"type": "error", ...}` line.

use super::{error_kind, Rejection};
use crate::api::types::CompactedBody;
use crate::api::{KvService, ServiceError};
use crate::watch::{Step, WatchError, KIND_COMPACTED};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use raftkv_storage::sm::history::KeyFilter;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Deserialize)]
pub(super) struct WatchParams {
    key: Option<String>,
    prefix: Option<String>,
    start_revision: Option<String>,
}

fn watch_filter(p: &WatchParams, key_bytes_max: usize) -> Result<KeyFilter, Rejection> {
    let bad = |m: String| Rejection(StatusCode::BAD_REQUEST, m);
    let filter = match (&p.key, &p.prefix) {
        (Some(k), None) if !k.is_empty() => KeyFilter::Key(k.as_bytes().to_vec()),
        (None, Some(prefix)) => KeyFilter::Prefix(prefix.as_bytes().to_vec()),
        (Some(_), None) => {
            return Err(bad(
                "key must not be empty (use prefix= to watch every key)".into(),
            ))
        }
        _ => return Err(bad("give exactly one of key=K or prefix=P".into())),
    };
    let len = match &filter {
        KeyFilter::Key(k) | KeyFilter::Prefix(k) => k.len(),
    };
    if len > key_bytes_max {
        return Err(Rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a key or prefix of {len} bytes exceeds the limit of {key_bytes_max} bytes"),
        ));
    }
    Ok(filter)
}

fn start_revision(p: &WatchParams) -> Result<Option<u64>, Rejection> {
    match p.start_revision.as_deref().map(str::parse::<u64>) {
        None => Ok(None),
        Some(Ok(r)) if r >= 1 => Ok(Some(r)),
        Some(_) => Err(Rejection(
            StatusCode::BAD_REQUEST,
            "start_revision must be an integer from 1".into(),
        )),
    }
}

pub(super) async fn get_watch<S: KvService>(
    State(st): State<Arc<super::ApiState<S>>>,
    query: Result<Query<WatchParams>, QueryRejection>,
) -> Result<Response, Rejection> {
    let Query(params) = query.map_err(|e| {
        Rejection(
            StatusCode::BAD_REQUEST,
            format!("invalid query string: {}", e.body_text()),
        )
    })?;
    let filter = watch_filter(&params, st.limits.command.key_bytes_max)?;
    let start = start_revision(&params)?;
    let stream = match st.service.watch(filter, start) {
        Ok(stream) => stream,
        Err(WatchError::Compacted(c)) => {
            let body = CompactedBody {
                error: KIND_COMPACTED.into(),
                kind: KIND_COMPACTED.into(),
                compact_revision: c.compact_revision,
            };
            return Ok((StatusCode::GONE, Json(body)).into_response());
        }
        Err(e @ (WatchError::TooMany { .. } | WatchError::Closed)) => {
            return Ok(super::error_response(&ServiceError::Unavailable(
                e.to_string(),
            )))
        }
        Err(WatchError::Storage(e)) => {
            return Ok(error_kind(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("reading watch history: {e}"),
            ))
        }
    };
    let registered_at = stream.registered_at();
    let idle = Duration::from_millis(st.service.watch_progress_ms().max(10));
    let body = futures_util::stream::unfold(stream, move |mut stream| async move {
        let bytes = match stream.next(idle).await? {
            Step::Lines(b) | Step::End(b) => b,
        };
        Some((Ok::<_, std::convert::Infallible>(bytes), stream))
    });
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/x-ndjson"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    h.insert(
        super::writes::REVISION_HEADER,
        HeaderValue::from(registered_at),
    );
    Ok(resp)
}
