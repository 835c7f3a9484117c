//! The HTTP layer over a map-backed service: routes, rejections, forwarding.

use super::*;
use crate::api::test_service::MapService;

use crate::api::test_service::spawn;

async fn call(
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
    tokio::spawn(serve(a_listener, a, std::future::pending()));
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
    ];
    for (e, want) in cases {
        assert_eq!(error_response(&e).status().as_u16(), want, "{e:?}");
    }
}
