//! Optional bearer-token authentication of the client API (`--auth-token-file`).
//!
//! Why: anyone who can reach the client port could otherwise read and write every key. With a
//! token configured, every route except the probes ([`OPEN_PATHS`]) needs
//! `Authorization: Bearer <token>`: none (or another scheme) is `401` JSON with
//! `WWW-Authenticate: Bearer`, a wrong token `403` JSON. The comparison takes the same time
//! wherever the tokens differ. Forwarding passes the client's header on to the leader.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use std::path::Path;
use std::sync::Arc;

/// Routes served without a token: liveness and readiness probes, metrics.
pub const OPEN_PATHS: [&str; 3] = ["/health", "/ready", "/metrics"];
/// The longest token file read.
pub const TOKEN_BYTES_MAX: usize = 4096;

/// Why a token file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the token file {0} is empty, over 4096 bytes, or not printable ASCII")]
    Invalid(String),
}

/// The token clients must present.
#[derive(Clone)]
pub struct AuthToken(Arc<Vec<u8>>);

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthToken(..)")
    }
}

impl AuthToken {
    /// A token; `None` if empty, too long, or not visible ASCII.
    pub fn new(token: &str) -> Option<AuthToken> {
        let ok = !token.is_empty()
            && token.len() <= TOKEN_BYTES_MAX
            && token.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| AuthToken(Arc::new(token.as_bytes().to_vec())))
    }

    /// Reads a token file; surrounding whitespace (a trailing newline) is ignored.
    pub fn from_file(path: &Path) -> Result<AuthToken, AuthError> {
        let invalid = || AuthError::Invalid(path.display().to_string());
        // The token plus a trailing newline (CRLF) at most; never more is read.
        let text = match crate::small_file::read_capped(path, TOKEN_BYTES_MAX as u64 + 2) {
            Ok(text) => text,
            Err(crate::small_file::SmallFileError::TooLarge(_)) => return Err(invalid()),
            Err(crate::small_file::SmallFileError::Io(source)) => {
                return Err(AuthError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        let text = std::str::from_utf8(&text).map_err(|_| invalid())?;
        AuthToken::new(text.trim()).ok_or_else(invalid)
    }

    /// The token itself, to send it (visible ASCII, checked on creation).
    pub fn expose(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Whether `presented` is this token (in constant time).
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(&self.0, presented)
    }
}

/// Equal in time independent of where the inputs differ (only their lengths leak).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Why a request's `Authorization` header is not accepted: the status, error kind and
/// message every path answers with (the router's middleware and the raw watch path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenRefusal {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: &'static str,
}

/// Checks an `Authorization` header value against `token`: none (or one
/// that is not `Bearer …`) is 401, a wrong token 403.
pub fn check_bearer(token: &AuthToken, authorization: Option<&[u8]>) -> Result<(), TokenRefusal> {
    match authorization.and_then(|v| v.strip_prefix(b"Bearer ")) {
        None => Err(TokenRefusal {
            status: StatusCode::UNAUTHORIZED,
            kind: "unauthorized",
            message: "this node requires a token: send Authorization: Bearer <token>",
        }),
        Some(t) if token.matches(t) => Ok(()),
        Some(_) => Err(TokenRefusal {
            status: StatusCode::FORBIDDEN,
            kind: "forbidden",
            message: "the token is not accepted",
        }),
    }
}

/// Middleware: refuses requests without the right token, except on [`OPEN_PATHS`].
pub async fn require_token(State(token): State<AuthToken>, req: Request, next: Next) -> Response {
    if OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match check_bearer(&token, presented) {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            let mut r = super::http::error_kind(refusal.status, refusal.kind, refusal.message);
            if refusal.status == StatusCode::UNAUTHORIZED {
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            r
        }
    }
}
