//! The client's session protocol against scripted servers: what it resends (the same id and
//! sequence), where (any endpoint), for how long (the retry budget), and what it does with
//! the server's session answers (expired, stale) and condition failures.

use super::*;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as a scripted server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    method: String,
    path: String,
    client_id: Option<String>,
    seq: Option<u64>,
    body: String,
}

/// What a scripted server does with a request.
enum Reply {
    Status(u16, String),
    /// Answer with an `X-Raftkv-Revision` header.
    Stamped(u16, String, u64),
    /// Answer after a while.
    Delayed(Duration, u16, String),
    /// Close the connection without answering.
    Drop,
}

/// Decides the reply to the n-th request (0-based, counted over every scripted server
/// sharing the log) given what was seen.
type Script = Arc<dyn Fn(usize, &Seen) -> Reply + Send + Sync>;

/// Every request the scripted servers of a test saw, in arrival order.
type Log = Arc<Mutex<Vec<Seen>>>;

/// A raw HTTP/1.1 server on loopback answering each request as `script` says (one request
/// per connection); returns its URL.
async fn scripted(log: Log, script: Script) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let (log, script) = (log.clone(), script.clone());
            tokio::spawn(async move {
                let Some(seen) = read_request(&mut stream).await else {
                    return;
                };
                let n = {
                    let mut log = log.lock().unwrap();
                    log.push(seen.clone());
                    log.len() - 1
                };
                match script(n, &seen) {
                    Reply::Drop => {}
                    Reply::Delayed(wait, status, body) => {
                        tokio::time::sleep(wait).await;
                        answer(&mut stream, status, &body, None).await;
                    }
                    Reply::Status(status, body) => answer(&mut stream, status, &body, None).await,
                    Reply::Stamped(status, body, revision) => {
                        answer(&mut stream, status, &body, Some(revision)).await
                    }
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    url
}

async fn answer(
    stream: &mut tokio::net::TcpStream,
    status: u16,
    body: &str,
    revision: Option<u64>,
) {
    let stamp = revision.map_or(String::new(), |r| format!("x-raftkv-revision: {r}\r\n"));
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n{stamp}\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Seen> {
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
            method: req.method?.to_string(),
            path: req.path?.to_string(),
            client_id: header(CLIENT_ID_HEADER),
            seq: header(SEQ_HEADER).map(|s| s.parse().unwrap()),
            body: String::from_utf8_lossy(&buf[head_len..head_len + body_len]).into_owned(),
        });
    }
}

fn put_answer(seen: &Seen, index: u64) -> Reply {
    let key = percent_decode(seen.path.trim_start_matches("/kv/")).unwrap();
    let body = serde_json::to_string(&KvResponse {
        key,
        value: "v".into(),
        index,
        leader: Some(1),
        revision: index,
        create_revision: index,
        mod_revision: index,
        version: 1,
    })
    .unwrap();
    Reply::Status(200, body)
}

fn error(kind: &str) -> String {
    format!(r#"{{"error":"scripted {kind}","kind":"{kind}"}}"#)
}

fn client_over(endpoints: Vec<String>, budget_ms: u64, sessions: bool) -> Client {
    let mut c = ClientConfig::new(endpoints);
    c.retry_budget_ms = budget_ms;
    c.request_timeout_ms = 2000;
    c.backoff_min_ms = 5;
    c.backoff_max_ms = 20;
    c.sessions = sessions;
    Client::new(c).unwrap()
}

/// The (client id, seq) pairs of the log, in order.
fn pairs(log: &Log) -> Vec<(String, u64)> {
    log.lock()
        .unwrap()
        .iter()
        .map(|s| (s.client_id.clone().unwrap(), s.seq.unwrap()))
        .collect()
}

#[tokio::test]
async fn an_unanswered_write_is_resent_with_the_same_session_on_any_endpoint() {
    let log = Log::default();
    // The first endpoint drops every connection after reading the request; the second
    // answers 504 twice, then applies.
    let dropping = scripted(log.clone(), Arc::new(|_, _| Reply::Drop)).await;
    let answered = Arc::new(Mutex::new(0));
    let count = answered.clone();
    let slow = scripted(
        log.clone(),
        Arc::new(move |n, seen| {
            let mut c = count.lock().unwrap();
            *c += 1;
            match *c {
                1 | 2 => Reply::Status(504, error("timeout")),
                _ => put_answer(seen, n as u64 + 10),
            }
        }),
    )
    .await;
    let c = client_over(vec![dropping, slow], 5000, true);
    let w = c.put("k", "v").await.unwrap();
    assert_eq!(w.key, "k");
    let sent = pairs(&log);
    assert_eq!(sent.len(), 6, "{sent:?}"); // drop, 504, drop, 504, drop, 200
    assert!(sent.iter().all(|p| *p == sent[0]), "{sent:?}");
    assert_eq!(sent[0].1, 1, "a new session starts at sequence 1");
    assert_eq!(sent[0].0.len(), 32);
    assert!(sent[0].0.bytes().all(|b| b.is_ascii_hexdigit()));
    // Answered: the session is back in the pool, and its next write has the next sequence.
    assert_eq!(c.sessions.idle(), 1);
    c.put("k2", "v").await.unwrap();
    let last = pairs(&log).pop().unwrap();
    assert_eq!(last, (sent[0].0.clone(), 2));
}

#[tokio::test]
async fn a_budget_spent_without_an_answer_is_outcome_unknown_and_drops_the_session() {
    let log = Log::default();
    let url = scripted(
        log.clone(),
        Arc::new(|_, _| Reply::Status(504, error("timeout"))),
    )
    .await;
    let c = client_over(vec![url], 300, true);
    let err = c.put("k", "v").await.unwrap_err();
    assert!(matches!(err, ClientError::OutcomeUnknown(_)), "{err}");
    assert!(err.to_string().contains("same session"), "{err}");
    let sent = pairs(&log);
    assert!(sent.len() >= 3, "resent until the budget ran out: {sent:?}");
    assert!(sent.iter().all(|p| *p == sent[0]), "{sent:?}");
    // Its sequence may yet apply: the session is never reused.
    assert_eq!(c.sessions.idle(), 0);
    let _ = c.put("k", "v").await.unwrap_err();
    let next = pairs(&log).pop().unwrap();
    assert_ne!(next.0, sent[0].0);
    assert_eq!(next.1, 1);
}

#[tokio::test]
async fn an_expired_session_is_replaced_and_the_write_resent() {
    let log = Log::default();
    let url = scripted(
        log.clone(),
        Arc::new(|n, seen| match n {
            1 => Reply::Status(409, error("session_expired")),
            _ => put_answer(seen, n as u64 + 1),
        }),
    )
    .await;
    let c = client_over(vec![url], 5000, true);
    c.put("a", "v").await.unwrap(); // session X, seq 1
    c.put("b", "v").await.unwrap(); // X seq 2: expired; then Y seq 1
    let sent = pairs(&log);
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!((sent[0].0 == sent[1].0, sent[1].1), (true, 2));
    assert_ne!(sent[2].0, sent[0].0);
    assert_eq!(sent[2].1, 1);
    assert_eq!(c.sessions.idle(), 1, "only the fresh session is kept");
}

#[tokio::test]
async fn a_stale_session_is_a_protocol_error() {
    let log = Log::default();
    let url = scripted(
        log.clone(),
        Arc::new(|_, _| Reply::Status(409, error("session_stale"))),
    )
    .await;
    let c = client_over(vec![url], 5000, true);
    let err = c.delete("k").await.unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
    assert_eq!(log.lock().unwrap().len(), 1, "not resent");
    // Any other 409 is the server's refusal, as before.
    let url = scripted(
        Log::default(),
        Arc::new(|_, _| Reply::Status(409, error("conflict"))),
    )
    .await;
    let err = client_over(vec![url], 5000, true)
        .delete("k")
        .await
        .unwrap_err();
    assert_eq!(err.rejected_status(), Some(409), "{err}");
}

#[tokio::test]
async fn without_sessions_a_write_carries_no_session_and_is_not_resent() {
    let log = Log::default();
    let url = scripted(
        log.clone(),
        Arc::new(|_, _| Reply::Status(504, error("timeout"))),
    )
    .await;
    let c = client_over(vec![url], 5000, false);
    let err = c.put("k", "v").await.unwrap_err();
    assert!(matches!(err, ClientError::OutcomeUnknown(_)), "{err}");
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].client_id.as_deref(), seen[0].seq), (None, None));
}

#[tokio::test]
async fn overlapping_writes_never_share_a_session() {
    let log = Log::default();
    // Every answer waits long enough for all four writes to be in flight together.
    let url = scripted(
        log.clone(),
        Arc::new(|n, seen| {
            let Reply::Status(status, body) = put_answer(seen, n as u64 + 1) else {
                unreachable!()
            };
            Reply::Delayed(Duration::from_millis(300), status, body)
        }),
    )
    .await;
    let c = Arc::new(client_over(vec![url], 5000, true));
    let writes = (0..4).map(|i| {
        let c = c.clone();
        async move { c.put(&format!("k{i}"), "v").await.unwrap() }
    });
    futures_util::future::join_all(writes).await;
    let sent = pairs(&log);
    let mut ids: Vec<&str> = sent.iter().map(|p| p.0.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "{sent:?}");
    assert!(sent.iter().all(|p| p.1 == 1), "{sent:?}");
    assert_eq!(c.sessions.idle(), 4);
    // The next write reuses one of them, at its next sequence.
    c.put("k", "v").await.unwrap();
    let last = pairs(&log).pop().unwrap();
    assert!(ids.contains(&last.0.as_str()) && last.1 == 2, "{last:?}");
    assert_eq!(c.sessions.idle(), 4);
}

#[tokio::test]
async fn a_failed_condition_is_an_answer_with_the_current_key() {
    let log = Log::default();
    let url = scripted(
        log.clone(),
        Arc::new(|n, _| {
            let current = (n == 0).then(|| KeyValue {
                key: "k".into(),
                value: "now".into(),
                create_revision: 3,
                mod_revision: 7,
                version: 2,
            });
            let body = ConditionFailedBody {
                error: "condition failed".into(),
                kind: if n < 2 { "condition_failed" } else { "other" }.into(),
                current,
                revision: 9,
            };
            Reply::Status(412, serde_json::to_string(&body).unwrap())
        }),
    )
    .await;
    let c = client_over(vec![url], 5000, true);
    let failed = c.put_if("k", "v", 5).await.unwrap().unwrap_err();
    assert_eq!(failed.revision, 9);
    assert_eq!(failed.current.as_ref().map(|kv| kv.mod_revision), Some(7));
    assert!(failed.to_string().contains("mod_revision 7"), "{failed}");
    let failed = c.delete_if("k", 0).await.unwrap().unwrap_err();
    assert_eq!(failed.current, None);
    let err = c.put_if("k", "v", 1).await.unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err}");
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen[0].path, "/kv/k?if_mod_revision=5");
    assert_eq!(
        (seen[1].method.as_str(), seen[1].path.as_str()),
        ("DELETE", "/kv/k?if_mod_revision=0")
    );
    // A condition failure is a definite answer: the session advanced.
    assert_eq!(
        seen.iter().map(|s| s.seq.unwrap()).collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

#[tokio::test]
async fn prefix_deletes_and_transactions_go_out_as_the_contract_says() {
    let log = Log::default();
    let url = scripted(
        log.clone(),
        Arc::new(|_, seen| match seen.path.as_str() {
            "/txn" => Reply::Status(
                200,
                r#"{"succeeded":false,"results":[{"get":{"key":"a","kv":null}}],"revision":4,"leader":1}"#
                    .into(),
            ),
            _ => Reply::Status(
                200,
                r#"{"prefix":"a/b","deleted":3,"revision":5,"leader":1}"#.into(),
            ),
        }),
    )
    .await;
    let c = client_over(vec![url], 5000, true);
    let err = c.delete_prefix("").await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidInput(_)), "{err}");
    assert!(
        log.lock().unwrap().is_empty(),
        "an empty prefix is never sent"
    );
    let d = c.delete_prefix("a/b").await.unwrap();
    assert_eq!((d.deleted, d.revision), (3, 5));
    let txn = TxnRequest {
        compare: vec![TxnCompare {
            key: "a".into(),
            target: "version".into(),
            op: ">".into(),
            value: serde_json::json!(0),
        }],
        success: vec![TxnOp::Put {
            key: "a".into(),
            value: "1".into(),
        }],
        failure: vec![TxnOp::Get { key: "a".into() }],
    };
    let r = c.txn(&txn).await.unwrap();
    assert!(!r.succeeded);
    assert_eq!(
        r.results,
        [TxnOpResult::Get {
            key: "a".into(),
            kv: None
        }]
    );
    let seen = log.lock().unwrap().clone();
    assert_eq!(
        (seen[0].method.as_str(), seen[0].path.as_str()),
        ("DELETE", "/kv?prefix=a%2Fb")
    );
    assert_eq!(
        (seen[1].method.as_str(), seen[1].path.as_str()),
        ("POST", "/txn")
    );
    let sent: TxnRequest = serde_json::from_str(&seen[1].body).unwrap();
    assert_eq!(sent, txn);
    assert!(seen.iter().all(|s| s.client_id.is_some()));
}

#[tokio::test]
async fn a_resend_whose_result_was_not_kept_is_applied_but_typed_apart() {
    let log = Log::default();
    let url = scripted(
        log.clone(),
        Arc::new(|n, _| match n {
            0 => Reply::Drop,
            _ => Reply::Stamped(409, error("result_not_kept"), 17),
        }),
    )
    .await;
    let c = client_over(vec![url], 5000, true);
    let err = c.txn(&TxnRequest::default()).await.unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::ResultNotKept {
                revision: Some(17),
                ..
            }
        ),
        "{err}"
    );
    let sent = pairs(&log);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], sent[1], "resent under the same session");
    // Applied: the sequence is used, and the session goes back to the pool.
    assert_eq!(c.sessions.idle(), 1);
    let _ = c.txn(&TxnRequest::default()).await;
    assert_eq!(pairs(&log).pop().unwrap(), (sent[0].0.clone(), 2));
}
