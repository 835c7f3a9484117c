//! A scripted HTTP/1.1 server for client tests that need streamed answers: each reply is a
//! status, headers and a body sent piece by piece (with pauses), then the connection is
//! closed or held open silently until the client goes away.

use super::*;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as a scripted server saw it, and which server (its URL) saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Seen {
    pub(super) server: String,
    pub(super) method: String,
    pub(super) path: String,
    pub(super) client_id: Option<String>,
    pub(super) seq: Option<u64>,
    pub(super) body: String,
}

/// A piece of a streamed body.
pub(super) enum Piece {
    Bytes(Vec<u8>),
    Pause(Duration),
}

/// What a scripted server answers.
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Vec<Piece>,
    /// After the body: keep the connection open, sending nothing.
    pub(super) hold: bool,
    /// Announce the body's length (a plain answer) or let the close end it (a stream).
    pub(super) sized: bool,
}

impl Reply {
    /// A plain JSON answer.
    pub(super) fn json(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: vec![Piece::Bytes(body.into().into_bytes())],
            hold: false,
            sized: true,
        }
    }

    /// A 200 watch stream, stamped with the node's revision, of `lines` (each sent apart).
    pub(super) fn stream(revision: u64, lines: &[String]) -> Reply {
        Reply {
            status: 200,
            headers: vec![
                ("content-type".into(), "application/x-ndjson".into()),
                ("x-raftkv-revision".into(), revision.to_string()),
            ],
            body: lines
                .iter()
                .flat_map(|l| {
                    [
                        Piece::Bytes(format!("{l}\n").into_bytes()),
                        Piece::Pause(Duration::from_millis(5)),
                    ]
                })
                .collect(),
            hold: false,
            sized: false,
        }
    }

    /// The same, held open after its lines.
    pub(super) fn held(mut self) -> Reply {
        self.hold = true;
        self
    }

    /// Close the connection without answering.
    pub(super) fn drop_connection() -> Reply {
        Reply {
            status: 0,
            headers: Vec::new(),
            body: Vec::new(),
            hold: false,
            sized: false,
        }
    }
}

/// Decides the reply to the n-th request (0-based, over every server sharing the log).
pub(super) type Script = Arc<dyn Fn(usize, &Seen) -> Reply + Send + Sync>;

/// Every request the scripted servers of a test saw, in arrival order.
pub(super) type Log = Arc<Mutex<Vec<Seen>>>;

/// The log's requests, as (server, method, path).
pub(super) fn requests(log: &Log) -> Vec<(String, String, String)> {
    log.lock()
        .unwrap()
        .iter()
        .map(|s| (s.server.clone(), s.method.clone(), s.path.clone()))
        .collect()
}

/// A server on loopback answering each request (one per connection) as `script` says.
pub(super) async fn serve(log: Log, script: Script) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = url.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let (log, script, server) = (log.clone(), script.clone(), server.clone());
            tokio::spawn(async move {
                let Some(seen) = read_request(&mut stream, server).await else {
                    return;
                };
                let n = {
                    let mut log = log.lock().unwrap();
                    log.push(seen.clone());
                    log.len() - 1
                };
                let reply = script(n, &seen);
                if reply.status != 0 {
                    send(&mut stream, reply).await;
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    url
}

async fn send(stream: &mut tokio::net::TcpStream, reply: Reply) {
    let mut head = format!("HTTP/1.1 {} X\r\n", reply.status);
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if reply.sized {
        let len: usize = reply
            .body
            .iter()
            .map(|p| match p {
                Piece::Bytes(b) => b.len(),
                Piece::Pause(_) => 0,
            })
            .sum();
        head.push_str(&format!("content-length: {len}\r\n"));
    }
    head.push_str("connection: close\r\n\r\n");
    if stream.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    for piece in reply.body {
        match piece {
            Piece::Bytes(b) => {
                if stream.write_all(&b).await.is_err() {
                    return;
                }
            }
            Piece::Pause(d) => tokio::time::sleep(d).await,
        }
    }
    if reply.hold {
        // Silent until the client hangs up (or a minute passes).
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf)).await;
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream, server: String) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let httparse::Status::Complete(head_len) = req.parse(&buf).ok()? else {
            continue;
        };
        let header = |name: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        let body_len: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
        if buf.len() < head_len + body_len {
            continue;
        }
        return Some(Seen {
            server,
            method: req.method?.to_string(),
            path: req.path?.to_string(),
            client_id: header(CLIENT_ID_HEADER),
            seq: header(SEQ_HEADER).map(|s| s.parse().unwrap()),
            body: String::from_utf8_lossy(&buf[head_len..head_len + body_len]).into_owned(),
        });
    }
}

/// A URL nothing listens on.
pub(super) async fn dead_endpoint() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

/// A client with short retries over `endpoints`.
pub(super) fn quick_client(endpoints: Vec<String>, budget_ms: u64) -> Client {
    let mut c = ClientConfig::new(endpoints);
    c.retry_budget_ms = budget_ms;
    c.request_timeout_ms = 2000;
    c.backoff_min_ms = 5;
    c.backoff_max_ms = 20;
    Client::new(c).unwrap()
}
