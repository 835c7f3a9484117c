//! Request bodies are buffered under a deadline and a process-wide byte budget.
//!
//! Why: a client that sends a few MiB of body and then stalls must not hold that memory
//! forever, and many such clients together must not exhaust the process. So each request's
//! whole body must arrive within `body_read_timeout_ms` of its head (else `408` and the
//! connection closes, releasing what was buffered), and every buffered body byte holds a
//! permit of one semaphore of `body_buffer_bytes_max` bytes shared by all connections until
//! its response is produced. A request that cannot get its bytes before its deadline is
//! answered `503` (retry shortly); a body over the size limit `413`. Beyond the budget, at
//! most hyper's read buffer ([`super::server::READ_BUFFER_BYTES_MAX`]) per connection is held.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What bounds request bodies; one per router, shared by all its connections.
pub struct BodyLimits {
    budget: Arc<Semaphore>,
    read_timeout: Duration,
    body_bytes_max: usize,
}

impl BodyLimits {
    pub fn new(budget_bytes: usize, read_timeout_ms: u64, body_bytes_max: usize) -> BodyLimits {
        BodyLimits {
            budget: Arc::new(Semaphore::new(budget_bytes.min(Semaphore::MAX_PERMITS))),
            read_timeout: Duration::from_millis(read_timeout_ms),
            body_bytes_max,
        }
    }

    /// Body bytes that may still be buffered (for tests and metrics).
    pub fn available_bytes(&self) -> usize {
        self.budget.available_permits()
    }
}

/// Middleware: buffers the body under the limits, then runs the handler with it.
pub async fn buffer_body(
    State(limits): State<Arc<BodyLimits>>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    if http_body::Body::is_end_stream(&body) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let (bytes, held) = match read_body(&limits, body).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    drop(held);
    response
}

/// Reads the whole body, taking budget permits for every byte; an error is the answer.
async fn read_body(
    limits: &BodyLimits,
    mut body: Body,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), Response> {
    let deadline = tokio::time::Instant::now() + limits.read_timeout;
    // Chunks as they came (no copy, no doubling growth): memory tracks the permits held.
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut buffered = 0usize;
    let mut held: Option<OwnedSemaphorePermit> = None;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(closing(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!(
                        "the request body did not arrive within {} ms",
                        limits.read_timeout.as_millis()
                    ),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(closing(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("cannot read the request body: {e}"),
                ))
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry no body bytes
        };
        if buffered.saturating_add(data.len()) > limits.body_bytes_max {
            return Err(closing(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "the request body exceeds the limit of {} bytes",
                    limits.body_bytes_max
                ),
            ));
        }
        let permits = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let acquire = limits.budget.clone().acquire_many_owned(permits);
        let permit = match tokio::time::timeout_at(deadline, acquire).await {
            Ok(Ok(p)) => p,
            _ => {
                let mut r = closing(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "the node is buffering too many request bodies; retry shortly",
                );
                r.headers_mut()
                    .insert("retry-after", HeaderValue::from_static("1"));
                return Err(r);
            }
        };
        match &mut held {
            Some(h) => h.merge(permit),
            None => held = Some(permit),
        }
        buffered += data.len();
        chunks.push(data);
    }
    let bytes = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => {
            let mut whole = Vec::with_capacity(buffered);
            chunks.drain(..).for_each(|c| whole.extend_from_slice(&c));
            Bytes::from(whole)
        }
    };
    debug_assert_eq!(bytes.len(), buffered);
    Ok((bytes, held))
}

/// A JSON error that also closes the connection (its body may be unread).
fn closing(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let mut r = super::http::error_kind(status, kind, message);
    r.headers_mut()
        .insert("connection", HeaderValue::from_static("close"));
    r
}

/// A whole raw HTTP/1.1 JSON error response that closes the connection, for answers
/// written below hyper (connection refusals, hyper's own parse errors).
pub fn json_error_bytes(code: u16, reason: &str, kind: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({ "error": message, "kind": kind }).to_string();
    format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(chunks: Vec<&'static [u8]>) -> Body {
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c))),
        );
        Body::from_stream(stream)
    }

    #[tokio::test]
    async fn a_body_that_cannot_get_budget_in_time_is_503_and_holds_nothing() {
        let limits = BodyLimits::new(10, 200, 1000);
        let started = std::time::Instant::now();
        let err = read_body(&limits, chunked(vec![b"01234", b"56789", b"abcde"]))
            .await
            .expect_err("over the budget");
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.headers()["retry-after"], "1");
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(limits.available_bytes(), 10, "permits released on failure");
    }

    #[tokio::test]
    async fn a_body_within_the_budget_holds_its_bytes_until_dropped() {
        let limits = BodyLimits::new(10, 200, 1000);
        let (bytes, held) = read_body(&limits, chunked(vec![b"0123", b"4567"]))
            .await
            .expect("fits");
        assert_eq!(&bytes[..], b"01234567");
        assert_eq!(limits.available_bytes(), 2);
        drop(held);
        assert_eq!(limits.available_bytes(), 10);
        let small = BodyLimits::new(5000, 200, 15);
        let err = read_body(&small, chunked(vec![b"0123456789", b"0123456789"]))
            .await
            .expect_err("over the size limit");
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
