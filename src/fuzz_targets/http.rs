//! The `http_request` target: raw bytes written as a client connection into the real router
//! (`api::http::router`) over the in-memory `MapService`, through hyper's HTTP/1 connection
//! handling on an in-memory duplex stream, as the client port serves them.
//!
//! Input: the connection's bytes, whole (one or more pipelined requests, or garbage). Every
//! response must be well-formed HTTP/1.1; every response the router produced must carry a
//! JSON body; the connection must finish within [`CONNECTION_TIMEOUT_MS`].
//!
//! The connection is wrapped in the client port's own [`IdleIo`] and read-buffer limit, so
//! the answers hyper writes itself to a request it cannot parse (400, 414, 431) arrive
//! rewritten as JSON, as on a real node: those too must carry a JSON body.

use crate::api::http::{router, NODE_HEADER};
use crate::api::server::{IdleIo, READ_BUFFER_BYTES_MAX};
use crate::api::test_service::MapService;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one connection may take, writing the input to reading the last response byte.
pub const CONNECTION_TIMEOUT_MS: u64 = 10_000;
/// The most response bytes read per connection (responses to fuzz inputs are far smaller).
const RESPONSE_BYTES_MAX: u64 = 16 << 20;
/// Bytes the in-memory stream buffers each way.
const DUPLEX_BYTES: usize = 64 << 10;

/// Fuzz body: serve `data` as one connection and check every response.
pub fn http_request(data: &[u8]) {
    let output = super::block_on(async {
        let timeout = Duration::from_millis(CONNECTION_TIMEOUT_MS);
        match tokio::time::timeout(timeout, serve_connection(data)).await {
            Ok(output) => output,
            Err(_) => panic!("the connection did not finish within {CONNECTION_TIMEOUT_MS} ms"),
        }
    });
    check_responses(&output);
}

/// Writes `data` into a served connection, half-closes it and reads everything back.
async fn serve_connection(data: &[u8]) -> Vec<u8> {
    let app = router(Arc::new(MapService::leader(1)));
    let (client, server) = tokio::io::duplex(DUPLEX_BYTES);
    let served = tokio::spawn(
        // half_close: the client half-closes after its last byte; every request already
        // sent (pipelined) is still answered.
        hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .max_buf_size(READ_BUFFER_BYTES_MAX)
            .serve_connection(
                TokioIo::new(IdleIo::new(
                    server,
                    Duration::from_millis(CONNECTION_TIMEOUT_MS),
                )),
                TowerToHyperService::new(app),
            ),
    );
    let (read_half, mut write_half) = tokio::io::split(client);
    let write = async {
        // The server may close early (a parse error): later writes then fail, which is fine.
        if write_half.write_all(data).await.is_ok() {
            let _ = write_half.shutdown().await;
        }
    };
    let read = async {
        let mut output = Vec::new();
        let mut limited = read_half.take(RESPONSE_BYTES_MAX);
        let _ = limited.read_to_end(&mut output).await;
        output
    };
    let ((), output) = tokio::join!(write, read);
    // The connection's own result (a parse error, an early close) is the client's problem.
    let _ = served.await;
    output
}

/// Checks that `output` is a sequence of complete HTTP/1.1 responses.
fn check_responses(mut output: &[u8]) {
    while !output.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let head_bytes = match response.parse(output) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => panic!("a truncated response head: {output:?}"),
            Err(e) => panic!("an invalid response head ({e}): {output:?}"),
        };
        let status = response.code.unwrap_or(0);
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let from_router = header(NODE_HEADER).is_some();
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let content_bytes = header("content-length").map(|v| match v.trim().parse::<usize>() {
            Ok(n) => n,
            Err(_) => panic!("an invalid content-length {v:?}"),
        });
        let rest = &output[head_bytes..];
        let (body, used) = if (100..200).contains(&status) || head_only(rest) {
            (Vec::new(), 0)
        } else if chunked {
            dechunk(rest)
        } else {
            let n = content_bytes.unwrap_or(rest.len());
            assert!(
                n <= rest.len(),
                "a response body shorter than its content-length"
            );
            (rest[..n].to_vec(), n)
        };
        if from_router && !head_only(rest) {
            let json = serde_json::from_slice::<serde_json::Value>(&body);
            assert!(
                json.is_ok(),
                "status {status}: a router response without a JSON body: {body:?}"
            );
        } else if !from_router {
            assert!(
                hyper_made(status),
                "status {status} without the router's node header"
            );
            let json = serde_json::from_slice::<serde_json::Value>(&body);
            assert!(
                status < 400 || json.is_ok(),
                "status {status}: an error answered by the HTTP stack without a JSON body: {body:?}"
            );
        }
        output = &rest[used..];
    }
}

/// A response to HEAD has a content-length but no body: the next bytes (if any) are the next
/// response. A JSON body never starts with "HTTP/".
fn head_only(rest: &[u8]) -> bool {
    rest.is_empty() || rest.starts_with(b"HTTP/")
}

/// The statuses hyper answers with itself, before the router sees a request.
fn hyper_made(status: u16) -> bool {
    (100..200).contains(&status) || (400..600).contains(&status)
}

/// Decodes a chunked body at the start of `rest`: (body, bytes used).
fn dechunk(rest: &[u8]) -> (Vec<u8>, usize) {
    let mut body = Vec::new();
    let mut at = 0usize;
    loop {
        let line_end = match rest[at..].windows(2).position(|w| w == b"\r\n") {
            Some(p) => at + p,
            None => panic!("a chunk size line without CRLF"),
        };
        let size_text = String::from_utf8_lossy(&rest[at..line_end]).into_owned();
        let size = match usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        {
            Ok(size) => size,
            Err(_) => panic!("an invalid chunk size {size_text:?}"),
        };
        at = line_end + 2;
        if size == 0 {
            assert!(
                rest[at..].starts_with(b"\r\n"),
                "a chunked body without its final CRLF"
            );
            return (body, at + 2);
        }
        assert!(rest.len() >= at + size + 2, "a chunk shorter than its size");
        body.extend_from_slice(&rest[at..at + size]);
        at += size + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: &str, headers: &str, body: &str) -> Vec<u8> {
        format!(
            "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn router_responses_must_have_json_bodies() {
        let node = format!("{NODE_HEADER}: 1\r\n");
        let good = response("200 OK", &node, r#"{"value":"x"}"#);
        // The HTTP stack's own errors (no node header) must be JSON too, as the client
        // port's rewrite makes them; an empty-bodied one is a finding.
        let stack_400 = response(
            "400 Bad Request",
            "",
            r#"{"error":"x","kind":"bad_request"}"#,
        );
        check_responses(&[good.clone(), stack_400].concat());
        let bare_400 = response("400 Bad Request", "", "");
        assert!(std::panic::catch_unwind(|| check_responses(&bare_400)).is_err());
        let bad = response("200 OK", &node, "not json");
        assert!(std::panic::catch_unwind(|| check_responses(&bad)).is_err());
        let truncated = &good[..good.len() - 2];
        assert!(std::panic::catch_unwind(|| check_responses(truncated)).is_err());
        let unmarked_ok = response("200 OK", "", "{}");
        assert!(std::panic::catch_unwind(|| check_responses(&unmarked_ok)).is_err());
    }

    #[test]
    fn chunked_bodies_are_reassembled() {
        let body = b"4\r\n{\"a\"\r\n4\r\n:1}\n\r\n0\r\n\r\nrest";
        let (decoded, used) = dechunk(body);
        assert_eq!(decoded, b"{\"a\":1}\n");
        assert_eq!(&body[used..], b"rest");
    }

    #[test]
    fn a_put_then_get_is_served_and_checked() {
        let request =
            "PUT /kv/k HTTP/1.1\r\nhost: x\r\ncontent-length: 13\r\n\r\n{\"value\":\"v\"}\
                       GET /kv/k HTTP/1.1\r\nhost: x\r\n\r\n";
        let output = crate::fuzz_targets::block_on(serve_connection(request.as_bytes()));
        let text = String::from_utf8_lossy(&output);
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
        assert!(text.contains(r#""value":"v""#), "{text}");
        check_responses(&output);
    }
}
