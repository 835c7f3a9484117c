//! The HTTP layer over a map-backed service: routes, rejections, forwarding.

use super::*;
use crate::api::test_service::MapService;

use crate::api::test_service::{spawn, spawn_leader_and_follower, spawn_with};
use crate::client::percent_encode;

pub(super) async fn call(
    method: reqwest::Method,
    url: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
    let client = reqwest::Client::new();
    let mut req = client.request(method, url);
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON body {text:?}: {e}"));
    (status, json, headers)
}

#[tokio::test]
async fn put_get_delete_list_round_trip() {
    let url = spawn(MapService::leader(1)).await;
    let (s, j, h) = call(
        reqwest::Method::PUT,
        &format!("{url}/kv/greeting"),
        Some(r#"{"value":"héllo"}"#),
    )
    .await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["key"], "greeting");
    assert_eq!(j["value"], "héllo");
    assert_eq!(j["index"], 1);
    assert_eq!(h[NODE_HEADER], "1");
    let (s, j, _) = call(reqwest::Method::GET, &format!("{url}/kv/greeting"), None).await;
    assert_eq!((s, j["value"].as_str()), (200, Some("héllo")));
    let (s, j, _) = call(
        reqwest::Method::GET,
        &format!("{url}/kv/greeting?consistency=stale"),
        None,
    )
    .await;
    assert_eq!((s, j["value"].as_str()), (200, Some("héllo")));
    // Keys are percent-decoded UTF-8.
    let (s, _, _) = call(
        reqwest::Method::PUT,
        &format!("{url}/kv/a%2Fb%20c"),
        Some(r#"{"value":"1"}"#),
    )
    .await;
    assert_eq!(s, 200);
    let (s, j, _) = call(
        reqwest::Method::GET,
        &format!("{url}/kv?prefix=a&limit=10"),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(j["count"], 1);
    assert_eq!(j["items"][0]["key"], "a/b c");
    let (s, j, _) = call(reqwest::Method::DELETE, &format!("{url}/kv/greeting"), None).await;
    assert_eq!((s, j["deleted"].as_bool()), (200, Some(true)));
    let (s, j, _) = call(reqwest::Method::DELETE, &format!("{url}/kv/greeting"), None).await;
    assert_eq!((s, j["deleted"].as_bool()), (200, Some(false)));
    let (s, j, _) = call(reqwest::Method::GET, &format!("{url}/kv/greeting"), None).await;
    assert_eq!(s, 404);
    assert!(j["error"].as_str().unwrap().contains("not found"));
}

#[tokio::test]
async fn bad_input_gets_json_4xx_and_the_node_keeps_serving() {
    let url = spawn(MapService::leader(1)).await;
    let long_key = "k".repeat(65);
    let big_value = format!(r#"{{"value":"{}"}}"#, "v".repeat(1025));
    let huge_body = "x".repeat(200_000);
    let cases: Vec<(reqwest::Method, String, Option<&str>, u16)> = vec![
        (
            reqwest::Method::PUT,
            format!("{url}/kv/k"),
            Some(r#"{"value":"#),
            400,
        ),
        (
            reqwest::Method::PUT,
            format!("{url}/kv/k"),
            Some("not json"),
            400,
        ),
        (reqwest::Method::PUT, format!("{url}/kv/k"), Some("{}"), 400),
        (
            reqwest::Method::PUT,
            format!("{url}/kv/k"),
            Some(r#"{"value":5}"#),
            400,
        ),
        (
            reqwest::Method::PUT,
            format!("{url}/kv/k"),
            Some(r#"{"value":"x","extra":1}"#),
            400,
        ),
        (reqwest::Method::PUT, format!("{url}/kv/k"), None, 400),
        (
            reqwest::Method::PUT,
            format!("{url}/kv/{long_key}"),
            Some(r#"{"value":"x"}"#),
            413,
        ),
        (
            reqwest::Method::PUT,
            format!("{url}/kv/k"),
            Some(&big_value),
            413,
        ),
        (
            reqwest::Method::PUT,
            format!("{url}/kv/k"),
            Some(&huge_body),
            413,
        ),
        (reqwest::Method::GET, format!("{url}/kv/%FF%FE"), None, 400),
        (
            reqwest::Method::GET,
            format!("{url}/kv/k?consistency=eventual"),
            None,
            400,
        ),
        (
            reqwest::Method::GET,
            format!("{url}/kv?limit=abc"),
            None,
            400,
        ),
        (reqwest::Method::GET, format!("{url}/kv?limit=0"), None, 400),
        (
            reqwest::Method::GET,
            format!("{url}/kv?limit=101"),
            None,
            400,
        ),
        (
            reqwest::Method::POST,
            format!("{url}/kv/k"),
            Some("{}"),
            405,
        ),
        (reqwest::Method::PATCH, format!("{url}/kv"), None, 405),
        (
            reqwest::Method::DELETE,
            format!("{url}/cluster/status"),
            None,
            405,
        ),
        (reqwest::Method::GET, format!("{url}/nope"), None, 404),
        (
            reqwest::Method::PUT,
            format!("{url}/kv/"),
            Some(r#"{"value":"x"}"#),
            400,
        ),
        (
            reqwest::Method::POST,
            format!("{url}/cluster/transfer-leader"),
            Some(r#"{"to":"two"}"#),
            400,
        ),
        (
            reqwest::Method::POST,
            format!("{url}/cluster/transfer-leader"),
            Some(r#"{"to":99}"#),
            400,
        ),
    ];
    for (method, u, body, want) in cases {
        let (s, j, h) = call(method.clone(), &u, body).await;
        assert_eq!(s, want, "{method} {u}: {j}");
        assert!(
            j["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method} {u}: {j}"
        );
        assert_eq!(h["content-type"], "application/json", "{method} {u}");
    }
    let (s, _, _) = call(
        reqwest::Method::PUT,
        &format!("{url}/kv/k"),
        Some(r#"{"value":"ok"}"#),
    )
    .await;
    assert_eq!(s, 200, "still serving");
}

#[tokio::test]
async fn follower_forwards_to_the_leader_once() {
    let leader = spawn(MapService::leader(1)).await;
    let follower = spawn(MapService::follower(2, 1, Some(leader.clone()))).await;
    let (s, j, h) = call(
        reqwest::Method::PUT,
        &format!("{follower}/kv/x"),
        Some(r#"{"value":"via follower"}"#),
    )
    .await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["leader"], 1);
    assert_eq!(h["x-raftkv-forwarded-to"], "1");
    let (s, j, _) = call(reqwest::Method::GET, &format!("{leader}/kv/x"), None).await;
    assert_eq!((s, j["value"].as_str()), (200, Some("via follower")));
    // A linearizable read through the follower is the leader's answer.
    let (s, j, _) = call(reqwest::Method::GET, &format!("{follower}/kv/x"), None).await;
    assert_eq!((s, j["value"].as_str()), (200, Some("via follower")));
    // A stale read is served locally (the follower's map is empty).
    let (s, _, _) = call(
        reqwest::Method::GET,
        &format!("{follower}/kv/x?consistency=stale"),
        None,
    )
    .await;
    assert_eq!(s, 404);

    // Two followers pointing at each other: one hop, then 503, never a loop.
    let a_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_url = format!("http://{}", a_listener.local_addr().unwrap());
    let b = spawn(MapService::follower(4, 3, Some(a_url.clone()))).await;
    let a = router(Arc::new(MapService::follower(3, 4, Some(b.clone()))));
    tokio::spawn(crate::api::server::serve(
        a_listener,
        a,
        ClientPortConfig::default(),
        None,
        std::future::pending(),
    ));
    let (s, j, h) = call(
        reqwest::Method::PUT,
        &format!("{b}/kv/x"),
        Some(r#"{"value":"v"}"#),
    )
    .await;
    assert_eq!(s, 503, "{j}");
    assert_eq!(h["retry-after"], "1");

    // No leader known: 503 with Retry-After; /ready says not ready.
    let lost = spawn(MapService::follower(5, 1, None)).await;
    let (s, _, h) = call(
        reqwest::Method::PUT,
        &format!("{lost}/kv/x"),
        Some(r#"{"value":"v"}"#),
    )
    .await;
    assert_eq!(s, 503);
    assert_eq!(h["retry-after"], "1");
    let (s, _, _) = call(reqwest::Method::GET, &format!("{lost}/ready"), None).await;
    assert_eq!(s, 503);
    let (s, j, _) = call(reqwest::Method::GET, &format!("{lost}/health"), None).await;
    assert_eq!((s, j["status"].as_str()), (200, Some("ok")));
}

#[tokio::test]
async fn unreachable_leader_is_503_for_reads_and_writes() {
    // A port nothing listens on.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let follower = spawn(MapService::follower(2, 1, Some(dead))).await;
    let (s, j, _) = call(
        reqwest::Method::PUT,
        &format!("{follower}/kv/x"),
        Some(r#"{"value":"v"}"#),
    )
    .await;
    assert_eq!(
        s, 503,
        "a refused connection sent nothing: safe to retry ({j})"
    );
    let (s, _, _) = call(reqwest::Method::GET, &format!("{follower}/kv/x"), None).await;
    assert_eq!(s, 503);
}

#[test]
fn service_errors_map_to_statuses() {
    let cases = [
        (ServiceError::InvalidInput("x".into()), 400),
        (ServiceError::TooLarge("x".into()), 413),
        (ServiceError::NotLeader { leader: None }, 503),
        (ServiceError::Unavailable("x".into()), 503),
        (ServiceError::Timeout("x".into()), 504),
        (ServiceError::Internal("x".into()), 500),
        (ServiceError::Conflict("x".into()), 409),
        (ServiceError::NotFound("x".into()), 404),
    ];
    for (e, want) in cases {
        assert_eq!(error_response(&e).status().as_u16(), want, "{e:?}");
    }
}

#[test]
fn command_limit_errors_map_to_the_statuses_of_the_http_checks() {
    use crate::storage::command::Command;
    let limits = Limits::default().command;
    let cases = [
        (Command::Delete { key: Vec::new() }, 400),
        (
            Command::Delete {
                key: vec![b'k'; limits.key_bytes_max + 1],
            },
            413,
        ),
        (
            Command::Put {
                key: b"k".to_vec(),
                value: vec![b'v'; limits.value_bytes_max + 1],
            },
            413,
        ),
    ];
    for (command, want) in cases {
        let e = command.validate(&limits).unwrap_err();
        // What the node's service answers, and what the HTTP layer's own check answers.
        let service = error_response(&ServiceError::from(e)).status().as_u16();
        let e = command.validate(&limits).unwrap_err();
        let http = limit_rejection(e).into_response().status().as_u16();
        assert_eq!((service, http), (want, want), "{command:?}");
    }
}

#[tokio::test]
async fn values_must_be_strings_in_an_object() {
    let url = spawn(MapService::leader(1)).await;
    for body in [
        r#"["x"]"#,
        "1",
        "null",
        "{}",
        r#""x""#,
        r#"{"value":["x"]}"#,
        r#"{"value":null}"#,
    ] {
        let (s, j, _) = call(reqwest::Method::PUT, &format!("{url}/kv/k"), Some(body)).await;
        assert_eq!(s, 400, "{body}: {j}");
        let e = j["error"].as_str().unwrap();
        assert!(
            e.contains(r#"{"value": "..."}"#),
            "{body}: names the shape: {e}"
        );
    }
}

#[tokio::test]
async fn the_two_404s_have_different_kinds() {
    let url = spawn(MapService::leader(1)).await;
    let (s, j, _) = call(reqwest::Method::GET, &format!("{url}/kv/missing"), None).await;
    assert_eq!((s, j["kind"].as_str()), (404, Some(KIND_KEY_NOT_FOUND)));
    let (s, j, _) = call(reqwest::Method::GET, &format!("{url}/kv/a/b"), None).await;
    assert_eq!((s, j["kind"].as_str()), (404, Some(KIND_NO_SUCH_ENDPOINT)));
}

/// Keys that URL handling likes to mangle.
pub(crate) const AWKWARD_KEYS: [&str; 10] = [
    ".", "..", "a/b", "%", "?x", "#y", "a b", "ü", "../..", "a/./b",
];

#[tokio::test]
async fn awkward_keys_round_trip_through_a_forwarding_follower() {
    let leader = spawn(MapService::leader(1)).await;
    let follower = spawn(MapService::follower(2, 1, Some(leader.clone()))).await;
    for (i, key) in AWKWARD_KEYS.iter().enumerate() {
        let path = crate::client::key_path_and_query(key, "");
        let body = format!(r#"{{"value":"v{i}"}}"#);
        let (s, j, h) = call(
            reqwest::Method::PUT,
            &format!("{follower}{path}"),
            Some(&body),
        )
        .await;
        assert_eq!((s, j["key"].as_str()), (200, Some(*key)), "{key:?}: {j}");
        assert_eq!(h[FORWARDED_TO_HEADER], "1");
        let (s, j, _) = call(reqwest::Method::GET, &format!("{leader}{path}"), None).await;
        assert_eq!(
            (s, j["value"].as_str()),
            (200, Some(format!("v{i}").as_str())),
            "{key:?}"
        );
        let (s, j, _) = call(reqwest::Method::GET, &format!("{follower}{path}"), None).await;
        assert_eq!((s, j["key"].as_str()), (200, Some(*key)), "{key:?}");
    }
    let (s, j, _) = call(
        reqwest::Method::GET,
        &format!("{leader}/kv?limit=100"),
        None,
    )
    .await;
    assert_eq!(
        (s, j["count"].as_u64()),
        (200, Some(AWKWARD_KEYS.len() as u64)),
        "{j}"
    );
}

#[tokio::test]
async fn lists_stop_at_the_byte_cap_and_continue_exactly_once() {
    let mut options = RouterOptions::default();
    options.port.list_bytes_max = 2000;
    let (leader, follower) = spawn_leader_and_follower(options).await;
    // 20 pairs of ~510 bytes: at most 3 fit in 2000 bytes.
    let mut want = Vec::new();
    for i in 0..20 {
        let key = format!("p/{i:02}");
        let body = format!(r#"{{"value":"{}"}}"#, "v".repeat(506));
        let u = format!("{leader}/kv/{}", percent_encode(&key));
        let (s, _, _) = call(reqwest::Method::PUT, &u, Some(&body)).await;
        assert_eq!(s, 200);
        want.push(key);
    }
    call(
        reqwest::Method::PUT,
        &format!("{leader}/kv/q"),
        Some(r#"{"value":"x"}"#),
    )
    .await;
    // Page through the follower (forwarded, streamed) with the continuation token.
    let mut got = Vec::new();
    let mut start: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut u = format!("{follower}/kv?prefix=p%2F&limit=100");
        if let Some(s) = &start {
            u.push_str(&format!("&start={}", percent_encode(s)));
        }
        let (s, j, _) = call(reqwest::Method::GET, &u, None).await;
        assert_eq!(s, 200, "{j}");
        let items = j["items"].as_array().unwrap();
        assert!(!items.is_empty() && items.len() <= 3, "{}", items.len());
        got.extend(
            items
                .iter()
                .map(|kv| kv["key"].as_str().unwrap().to_string()),
        );
        pages += 1;
        if j["more"] != true {
            assert!(j.get("next").is_none());
            break;
        }
        assert_eq!(j["next"], items.last().unwrap()["key"]);
        start = j["next"].as_str().map(String::from);
    }
    assert_eq!(got, want, "every key exactly once, in order");
    assert!(pages >= 7, "{pages} pages");
}

#[tokio::test]
async fn a_token_is_required_except_on_probes() {
    let options = RouterOptions {
        auth_token: crate::api::auth::AuthToken::new("s3cret"),
        ..RouterOptions::default()
    };
    let (leader, follower) = spawn_leader_and_follower(options).await;
    let client = reqwest::Client::new();
    let put = |url: String, auth: Option<&'static str>| {
        let mut r = client.put(url).body(r#"{"value":"v"}"#);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    let r = put(format!("{leader}/kv/k"), None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["kind"], "unauthorized");
    let r = put(format!("{leader}/kv/k"), Some("Bearer wrong"))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let j: serde_json::Value = r.json().await.unwrap();
    assert_eq!(j["kind"], "forbidden");
    let r = put(format!("{leader}/kv/k"), Some("Basic czNjcmV0"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Right token, through the follower: the header is passed on to the leader.
    let r = put(format!("{follower}/kv/k"), Some("Bearer s3cret"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[FORWARDED_TO_HEADER], "1");
    for probe in ["/health", "/ready"] {
        let r = client.get(format!("{leader}{probe}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{probe}");
    }
    let r = client.get(format!("{leader}/nope")).send().await.unwrap();
    assert_eq!(r.status(), 401, "unknown paths are not probes");
}

#[test]
fn constant_time_eq_compares() {
    use crate::api::auth::constant_time_eq;
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"ab"));
    assert!(constant_time_eq(b"", b""));
}

/// A "leader" that reads each request and then, per `answer`, hangs or hangs up.
pub(super) async fn bad_leader(hang_up: bool) -> String {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if !hang_up {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    url
}

#[tokio::test]
async fn forwarding_honours_the_request_timeout_and_a_lost_write_is_504() {
    let options = RouterOptions {
        port: ClientPortConfig {
            forward_timeout_ms: 300,
            ..ClientPortConfig::default()
        },
        ..RouterOptions::default()
    };
    let silent = bad_leader(false).await;
    let follower = spawn_with(
        MapService::follower(2, 1, Some(silent)),
        options.clone(),
        None,
    )
    .await;
    let started = std::time::Instant::now();
    let (s, j, _) = call(reqwest::Method::GET, &format!("{follower}/kv/k"), None).await;
    assert_eq!(s, 503, "a read is safe to retry: {j}");
    let (s, j, _) = call(
        reqwest::Method::PUT,
        &format!("{follower}/kv/k"),
        Some(r#"{"value":"v"}"#),
    )
    .await;
    assert_eq!(s, 504, "a sent write's outcome is unknown: {j}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let hanging_up = bad_leader(true).await;
    let follower = spawn_with(MapService::follower(2, 1, Some(hanging_up)), options, None).await;
    let (s, j, _) = call(
        reqwest::Method::PUT,
        &format!("{follower}/kv/k"),
        Some(r#"{"value":"v"}"#),
    )
    .await;
    assert_eq!(s, 504, "{j}");
}

#[tokio::test]
async fn metrics_count_requests_by_route_template_never_by_key() {
    let url = spawn(MapService::leader(1)).await;
    for key in ["a", "b", "c"] {
        let (s, _, _) = call(
            reqwest::Method::PUT,
            &format!("{url}/kv/{key}"),
            Some(r#"{"value":"1"}"#),
        )
        .await;
        assert_eq!(s, 200);
    }
    let (s, _, _) = call(reqwest::Method::GET, &format!("{url}/kv/missing"), None).await;
    assert_eq!(s, 404);
    let (s, _, _) = call(reqwest::Method::GET, &format!("{url}/no/such/path"), None).await;
    assert_eq!(s, 404);
    let resp = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], crate::metrics::CONTENT_TYPE);
    let text = resp.text().await.unwrap();
    for line in [
        "raftkv_http_requests_total{route=\"PUT /kv/{key}\",code=\"200\"} 3",
        "raftkv_http_requests_total{route=\"GET /kv/{key}\",code=\"404\"} 1",
        "raftkv_http_requests_total{route=\"other\",code=\"404\"} 1",
        "raftkv_http_request_duration_seconds_count{route=\"PUT /kv/{key}\"} 3",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    for key in ["\"a\"", "missing", "/no/such"] {
        assert!(!text.contains(key), "a key or path became a label: {key}");
    }
}
