//! `GET /watch?key=K|prefix=P[&start_revision=R]`: a stream of newline-delimited JSON change
//! events (see [`crate::watch`]), served by any node from its own applied state.
//!
//! Errors before the stream starts are ordinary JSON answers: 400 for bad parameters, 410
//! `{"error": "compacted", "compact_revision"}` when the start is older than the retained
//! history, 503 when the node has too many watchers or is stopping. Once streaming, the
//! status is 200 and an ending is said by a last `{"type": "error", ...}` line.

use super::Rejection;
use crate::api::auth::AuthToken;
use crate::api::server::{RawHandler, RawHead};
use crate::api::types::CompactedBody;
use crate::api::types::ErrorBody;
use crate::api::KvService;
use crate::watch::{Step, WatchError, WatchStream, KIND_COMPACTED};
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use raftkv_storage::sm::history::KeyFilter;
use serde::Deserialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

/// A watch that could not start: its status and JSON body.
struct Refused(StatusCode, Vec<u8>);

fn refused_json(status: StatusCode, body: &impl serde::Serialize) -> Refused {
    Refused(status, serde_json::to_vec(body).unwrap_or_default())
}

impl From<Rejection> for Refused {
    fn from(Rejection(status, error): Rejection) -> Refused {
        let kind = super::default_kind(status).to_string();
        refused_json(
            status,
            &ErrorBody {
                error,
                kind: Some(kind),
            },
        )
    }
}

/// Checks the parameters and opens the stream: shared by the hyper route and the raw path.
fn open<S: KvService>(
    service: &S,
    params: &WatchParams,
    key_bytes_max: usize,
) -> Result<WatchStream, Refused> {
    let filter = watch_filter(params, key_bytes_max)?;
    let start = start_revision(params)?;
    service.watch(filter, start).map_err(|e| match e {
        WatchError::Compacted(c) => refused_json(
            StatusCode::GONE,
            &CompactedBody {
                error: KIND_COMPACTED.into(),
                kind: KIND_COMPACTED.into(),
                compact_revision: c.compact_revision,
            },
        ),
        e @ (WatchError::TooMany { .. } | WatchError::Closed) => {
            Rejection(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into()
        }
        WatchError::Storage(e) => Rejection(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading watch history: {e}"),
        )
        .into(),
    })
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
    let stream = match open(
        st.service.as_ref(),
        &params,
        st.limits.command.key_bytes_max,
    ) {
        Ok(stream) => stream,
        Err(Refused(status, body)) => {
            let mut r = Response::new(Body::from(body));
            *r.status_mut() = status;
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            return Ok(r);
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

/// `GET /watch` answered on the socket itself when it is a connection's first request (see
/// [`RawHandler`]): the same checks, answers and stream as the route, in chunked HTTP/1.1,
/// and the connection closes when the stream ends. A write that cannot go out within the
/// idle timeout, or the client closing its side, ends it.
pub struct RawWatch<S> {
    pub service: Arc<S>,
    /// Where the request is counted, under the same route label as a watch served by hyper.
    pub metrics: Arc<crate::metrics::Metrics>,
    pub key_bytes_max: usize,
    pub token: Option<AuthToken>,
    pub node_id: u64,
    pub write_timeout: Duration,
}

impl<S: KvService> RawHandler for RawWatch<S> {
    fn takes(&self, method: &str, path: &str) -> bool {
        method == "GET" && path == "/watch"
    }

    fn serve(&self, head: RawHead, stream: TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let (service, token) = (self.service.clone(), self.token.clone());
        let (key_bytes_max, node_id, write_timeout) =
            (self.key_bytes_max, self.node_id, self.write_timeout);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let opened = raw_open(service.as_ref(), &head, token.as_ref(), key_bytes_max);
            // Counted like hyper's requests: when the response head is decided.
            let code = opened.as_ref().map_or_else(|r| r.0.as_u16(), |_| 200);
            metrics.observe_http(super::metrics::ROUTE_WATCH, code, started.elapsed());
            let idle = Duration::from_millis(service.watch_progress_ms().max(10));
            let _ = serve_raw(opened, stream, node_id, idle, write_timeout).await;
        })
    }
}

fn raw_open<S: KvService>(
    service: &S,
    head: &RawHead,
    token: Option<&AuthToken>,
    key_bytes_max: usize,
) -> Result<WatchStream, Refused> {
    if let Some(token) = token {
        // The same answers as the router's `require_token`.
        crate::api::auth::check_bearer(token, head.authorization.as_deref())
            .map_err(|r| Rejection(r.status, r.message.into()))?;
    }
    let bad = |e: String| Rejection(StatusCode::BAD_REQUEST, e);
    let uri: axum::http::Uri = head
        .target
        .parse()
        .map_err(|_| bad("invalid request target".into()))?;
    let Query(params) = Query::<WatchParams>::try_from_uri(&uri)
        .map_err(|e| bad(format!("invalid query string: {}", e.body_text())))?;
    open(service, &params, key_bytes_max)
}

async fn serve_raw(
    opened: Result<WatchStream, Refused>,
    stream: TcpStream,
    node_id: u64,
    idle: Duration,
    write_timeout: Duration,
) -> std::io::Result<()> {
    let (mut rd, mut wr) = stream.into_split();
    let mut watch = match opened {
        Ok(w) => w,
        Err(Refused(status, body)) => {
            let head = format!(
                "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}: {node_id}\r\nconnection: close\r\n\r\n",
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                body.len(),
                super::NODE_HEADER,
            );
            let mut out = head.into_bytes();
            out.extend_from_slice(&body);
            let _ = tokio::time::timeout(write_timeout, wr.write_all(&out)).await;
            return Ok(());
        }
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\n{}: {node_id}\r\n{}: {}\r\n\r\n",
        super::NODE_HEADER,
        super::writes::REVISION_HEADER,
        watch.registered_at(),
    );
    write_within(&mut wr, head.as_bytes(), write_timeout).await?;
    let mut probe = [0u8; 64];
    loop {
        let step = tokio::select! {
            step = watch.next(idle) => step,
            read = rd.read(&mut probe) => match read {
                // The client closed (or broke) its side; bytes it sends are ignored.
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => continue,
            },
        };
        let (bytes, last) = match step {
            None => return Ok(()),
            Some(Step::Lines(b)) => (b, false),
            Some(Step::End(b)) => (b, true),
        };
        let mut chunk = format!("{:x}\r\n", bytes.len()).into_bytes();
        chunk.extend_from_slice(&bytes);
        chunk.extend_from_slice(b"\r\n");
        if last {
            chunk.extend_from_slice(b"0\r\n\r\n");
        }
        write_within(&mut wr, &chunk, write_timeout).await?;
        if last {
            return Ok(());
        }
    }
}

async fn write_within(
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
    bytes: &[u8],
    timeout: Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(timeout, wr.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::test_service::MapService;

    fn status_of(authorization: Option<&[u8]>) -> Option<u16> {
        let head = RawHead {
            target: "/watch?key=a".into(),
            authorization: authorization.map(<[u8]>::to_vec),
        };
        let token = AuthToken::new("s3cret").unwrap();
        raw_open(&MapService::leader(1), &head, Some(&token), 100)
            .err()
            .map(|r| r.0.as_u16())
    }

    #[test]
    fn the_raw_path_answers_tokens_as_the_router_does() {
        assert_eq!(status_of(None), Some(401), "no token");
        assert_eq!(status_of(Some(b"Bearer wrong")), Some(403), "a wrong token");
        assert_eq!(
            status_of(Some(b"Basic s3cret")),
            Some(401),
            "not a bearer token"
        );
        let right = status_of(Some(b"Bearer s3cret"));
        assert!(!matches!(right, Some(401 | 403)), "{right:?}");
    }
}
