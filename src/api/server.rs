//! The client port's own accept loop: every connection is bounded in number, time and bytes.
//!
//! Why not `axum::serve`: it has no header, body or idle timeouts and no connection limit, and
//! its accept loop spins on EMFILE, so a few hundred slow or idle sockets could hold memory
//! and file descriptors forever. Here, with the defaults of [`ClientPortConfig`]:
//! - at most `client_connections_max` connections are served; one beyond that is answered
//!   `503` JSON once (the write bounded by [`REFUSAL_WRITE_TIMEOUT_MS`]) and closed;
//! - a request head must arrive within `header_read_timeout_ms`; when it does not, hyper
//!   closes the connection without a response;
//! - a connection on which nothing was read or written for `idle_timeout_ms` while it waits
//!   for bytes is closed ([`IdleIo`]);
//! - hyper's own error answers (400 malformed request, 431 header too large, 414 URI too
//!   long) are rewritten into JSON on their way out ([`IdleIo`] again);
//! - EMFILE/ENFILE/ENOBUFS/ENOMEM from accept back off 10 ms doubling to 1 s, with one log
//!   line per episode, never a spin;
//! - on shutdown the loop stops accepting, every connection finishes its in-flight request
//!   and closes, bounded by `shutdown_drain_ms`.
//!
//! Request bodies (deadline and the global buffered-bytes budget) are bounded per request by
//! [`super::body`]; TLS, when configured, is negotiated within the header timeout.

use super::body::json_error_bytes;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};

/// How long the one `503` written to a connection over the limit may take.
pub const REFUSAL_WRITE_TIMEOUT_MS: u64 = 1000;
/// hyper's read buffer per connection: the largest request head, and the most body bytes
/// read ahead of the handler. Keys are at most 8 KiB, 24 KiB percent-encoded.
pub const READ_BUFFER_BYTES_MAX: usize = 64 << 10;
const ACCEPT_BACKOFF_MIN_MS: u64 = 10;
const ACCEPT_BACKOFF_MAX_MS: u64 = 1000;

/// Limits of the client port. Defaults are production values; tests shorten them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientPortConfig {
    /// Time allowed for a request head (and the TLS handshake) to arrive.
    pub header_read_timeout_ms: u64,
    /// Time allowed for a whole request body to arrive, counted from its head.
    pub body_read_timeout_ms: u64,
    /// Request-body bytes buffered at once across all connections; a request that cannot
    /// get its bytes within its body deadline is answered 503.
    pub body_buffer_bytes_max: usize,
    /// A connection waiting for bytes this long with no traffic is closed.
    pub idle_timeout_ms: u64,
    /// Connections served at once; the excess is answered 503 and closed.
    pub client_connections_max: usize,
    /// Bytes of keys plus values one list response carries at most.
    pub list_bytes_max: usize,
    /// Time a forwarded request may take at the leader (the node's request timeout).
    pub forward_timeout_ms: u64,
    /// Time in-flight requests get to finish on shutdown.
    pub shutdown_drain_ms: u64,
}

impl Default for ClientPortConfig {
    fn default() -> Self {
        ClientPortConfig {
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            body_buffer_bytes_max: 16 << 20,
            idle_timeout_ms: 60_000,
            client_connections_max: 4096,
            list_bytes_max: 4 << 20,
            forward_timeout_ms: 5_000,
            shutdown_drain_ms: 10_000,
        }
    }
}

impl ClientPortConfig {
    /// Checks every limit is usable, naming the bad one.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("forward_timeout_ms", self.forward_timeout_ms),
            ("client_connections_max", self.client_connections_max as u64),
            ("list_bytes_max", self.list_bytes_max as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if self.client_connections_max > Semaphore::MAX_PERMITS
            || self.body_buffer_bytes_max > u32::MAX as usize
        {
            return Err("client_connections_max or body_buffer_bytes_max is too large".into());
        }
        if self.body_buffer_bytes_max < READ_BUFFER_BYTES_MAX {
            return Err(format!(
                "body_buffer_bytes_max must be at least {READ_BUFFER_BYTES_MAX}"
            ));
        }
        Ok(())
    }
}

/// Something a connection is served over: plain TCP, or TLS over it.
pub type Tls = tokio_rustls::TlsAcceptor;

/// Serves `router` on `listener` until `shutdown` completes, then lets in-flight requests
/// finish (at most `shutdown_drain_ms`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    config: ClientPortConfig,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    serve_with(listener, router, None, config, tls, shutdown).await
}

/// A request the accept loop answers itself, without hyper, on a plain-HTTP connection whose
/// first request it is: a watch stream lives for hours, and hyper's fixed buffers (about
/// 20 KiB per connection) would dominate the memory of many idle watchers.
pub trait RawHandler: Send + Sync + 'static {
    /// Whether this handler takes a request for `path` (before the `?`).
    fn takes(&self, method: &str, path: &str) -> bool;
    /// Answers the request (head already read off `stream`), then closes the connection.
    fn serve(&self, head: RawHead, stream: TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The parts of a request head a [`RawHandler`] sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawHead {
    /// Path and query, as sent.
    pub target: String,
    pub authorization: Option<Vec<u8>>,
}

/// Bytes of the first request head the accept loop looks at for a [`RawHandler`].
const RAW_PEEK_BYTES: usize = 4096;

/// [`serve`], with requests `raw` takes answered by it (plain HTTP only; on TLS every request
/// goes through hyper).
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    raw: Option<Arc<dyn RawHandler>>,
    config: ClientPortConfig,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let connections = Arc::new(Semaphore::new(config.client_connections_max));
    let (stop_tx, stop_rx) = watch::channel(false);
    let config = Arc::new(config);
    tokio::pin!(shutdown);
    let mut backoff_ms = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                if backoff_ms > 0 {
                    tracing::info!("accepting client connections again");
                    backoff_ms = 0;
                }
                stream
            }
            Err(e) => {
                backoff_ms = accept_backoff(&e, backoff_ms);
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let conn = Connection {
            router: router.clone(),
            raw: raw.clone(),
            config: config.clone(),
            tls: tls.clone(),
            stop: stop_rx.clone(),
        };
        tokio::spawn(async move {
            conn.run(stream).await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drain(&connections, &config).await;
    Ok(())
}

/// The next backoff after an accept error: resource exhaustion backs off exponentially and
/// logs once per episode; anything else (a connection reset before accept) retries soon.
fn accept_backoff(e: &io::Error, backoff_ms: u64) -> u64 {
    let exhausted = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    );
    if !exhausted {
        tracing::debug!(error = %e, "accept failed");
        return ACCEPT_BACKOFF_MIN_MS.max(backoff_ms);
    }
    if backoff_ms == 0 {
        tracing::warn!(error = %e, "cannot accept client connections (out of descriptors or memory); backing off");
        return ACCEPT_BACKOFF_MIN_MS;
    }
    backoff_ms.saturating_mul(2).min(ACCEPT_BACKOFF_MAX_MS)
}

/// Waits until every connection has closed, or the drain deadline.
async fn drain(connections: &Arc<Semaphore>, config: &ClientPortConfig) {
    let all = u32::try_from(config.client_connections_max).unwrap_or(u32::MAX);
    let deadline = Duration::from_millis(config.shutdown_drain_ms);
    if tokio::time::timeout(deadline, connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            open = config.client_connections_max - connections.available_permits(),
            "client connections still open after the shutdown deadline; dropping them"
        );
    }
}

/// Answers a connection over the limit with one 503 and closes it.
async fn refuse(mut stream: TcpStream) {
    tracing::debug!("client connection limit reached; refusing a connection");
    let response = json_error_bytes(
        503,
        "Service Unavailable",
        "overloaded",
        "too many client connections; retry shortly",
    );
    let write = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_millis(REFUSAL_WRITE_TIMEOUT_MS), write).await;
}

/// One accepted connection and what it is served with.
struct Connection {
    router: Router,
    raw: Option<Arc<dyn RawHandler>>,
    config: Arc<ClientPortConfig>,
    tls: Option<Tls>,
    stop: watch::Receiver<bool>,
}

impl Connection {
    async fn run(self, stream: TcpStream) {
        let idle = Duration::from_millis(self.config.idle_timeout_ms);
        match &self.tls {
            None => {
                let mut stream = stream;
                if let Some(raw) = self.raw.clone() {
                    match self.peek_raw(raw.as_ref(), &mut stream).await {
                        Peeked::Raw(head) => return raw.serve(head, stream).await,
                        Peeked::Closed => return,
                        Peeked::Hyper => {}
                    }
                }
                self.serve_io(IdleIo::new(stream, idle)).await
            }
            Some(acceptor) => {
                let handshake_timeout = Duration::from_millis(self.config.header_read_timeout_ms);
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => self.serve_io(IdleIo::new(tls, idle)).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            }
        }
    }

    /// Looks at the first request without taking it: a complete head of a request `raw`
    /// takes is read off the socket and handed over; anything else (including a head not
    /// complete in the first segment) is left for hyper.
    async fn peek_raw(&self, raw: &dyn RawHandler, stream: &mut TcpStream) -> Peeked {
        let timeout = Duration::from_millis(self.config.header_read_timeout_ms);
        if tokio::time::timeout(timeout, stream.readable())
            .await
            .is_err()
        {
            return Peeked::Closed;
        }
        let mut buf = vec![0u8; RAW_PEEK_BYTES];
        let n = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return Peeked::Closed,
            Ok(n) => n,
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = req.parse(&buf[..n]) else {
            return Peeked::Hyper;
        };
        let (Some(method), Some(target)) = (req.method, req.path) else {
            return Peeked::Hyper;
        };
        let path = target.split('?').next().unwrap_or("");
        let bodiless = !req.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("content-length")
                || h.name.eq_ignore_ascii_case("transfer-encoding")
        });
        if !bodiless || !raw.takes(method, path) {
            return Peeked::Hyper;
        }
        let head = RawHead {
            target: target.to_string(),
            authorization: req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                .map(|h| h.value.to_vec()),
        };
        debug_assert!(head_len <= n);
        // The head is in the socket's buffer: this read returns at once.
        match tokio::time::timeout(timeout, stream.read_exact(&mut buf[..head_len])).await {
            Ok(Ok(_)) => Peeked::Raw(head),
            _ => Peeked::Closed,
        }
    }

    async fn serve_io<I>(mut self, io: IdleIo<I>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper_util::service::TowerToHyperService::new(self.router.clone());
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_millis(self.config.header_read_timeout_ms))
            .max_buf_size(READ_BUFFER_BYTES_MAX)
            .keep_alive(true);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut stopping = *self.stop.borrow();
        if stopping {
            conn.as_mut().graceful_shutdown();
        }
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                    return;
                }
                changed = self.stop.changed(), if !stopping => {
                    if changed.is_err() || *self.stop.borrow() {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        }
    }
}

enum Peeked {
    Raw(RawHead),
    Hyper,
    Closed,
}

/// An IO wrapper that (1) fails a read left waiting for `idle` with no traffic, closing an
/// idle connection, and (2) rewrites the bodiless error answers hyper writes on its own into
/// JSON. Every response the router produces carries [`super::http::NODE_HEADER`]; a 4xx/5xx
/// head without it came from hyper.
pub struct IdleIo<I> {
    inner: I,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The last read or write. The timer is not re-armed on every I/O (that costs a timer
    /// wheel update per call on the hot path): when it fires, it is pushed to
    /// `last_activity + idle` if traffic happened meanwhile.
    last_activity: tokio::time::Instant,
    /// A JSON answer being written in place of hyper's, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<I> IdleIo<I> {
    pub fn new(inner: I, idle: Duration) -> IdleIo<I> {
        IdleIo {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            last_activity: tokio::time::Instant::now(),
            replacement: None,
        }
    }

    fn touch(&mut self) {
        self.last_activity = tokio::time::Instant::now();
    }

    /// Ready once the connection has been idle for `idle`: re-arms the timer while traffic
    /// since it was set keeps the connection alive.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.last_activity + self.idle;
            if deadline <= tokio::time::Instant::now() {
                return Poll::Ready(());
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for IdleIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.touch();
                Poll::Ready(r)
            }
            Poll::Pending => match this.poll_idle(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client connection idle for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for IdleIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.touch();
        if this.replacement.is_none() {
            if let Some(json) = rewrite_hyper_error(buf) {
                this.replacement = Some((json, 0));
            }
        }
        let Some((bytes, written)) = &mut this.replacement else {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        };
        while *written < bytes.len() {
            match Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        // hyper closes a connection it answered on its own: its bytes stand replaced.
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// If `buf` starts an error response head that hyper wrote by itself, the JSON answer to
/// write instead.
fn rewrite_hyper_error(buf: &[u8]) -> Option<Vec<u8>> {
    let head = buf.strip_prefix(b"HTTP/1.")?;
    let status = std::str::from_utf8(head.get(2..5)?).ok()?;
    let code: u16 = status.parse().ok()?;
    if code < 400 {
        return None;
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let lower = buf[..end].to_ascii_lowercase();
    let marker = super::http::NODE_HEADER.as_bytes();
    if lower.windows(marker.len()).any(|w| w == marker) {
        return None;
    }
    let (reason, kind, message) = match code {
        431 => (
            "Request Header Fields Too Large",
            "header_too_large",
            "the request head is too large",
        ),
        414 => (
            "URI Too Long",
            "uri_too_long",
            "the request URI is too long",
        ),
        505 => (
            "HTTP Version Not Supported",
            "unsupported_version",
            "only HTTP/1.0 and HTTP/1.1 are served",
        ),
        _ => (
            "Bad Request",
            "bad_request",
            "malformed HTTP request (request line, method, URI, version or header)",
        ),
    };
    Some(json_error_bytes(code, reason, kind, message))
}

#[cfg(test)]
mod tests;
