//! The write routes over the test service (a real state machine): revisions, conditional
//! writes, prefix deletes, transactions, sessions, and their forwarding from a follower.

use super::tests::call;
use super::*;
use crate::api::test_service::{spawn, spawn_leader_and_follower, MapService};
use reqwest::Method;

async fn call_with(
    method: Method,
    url: &str,
    body: Option<&str>,
    session: (&str, u64),
) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .header(CLIENT_ID_HEADER, session.0)
        .header(SEQ_HEADER, session.1.to_string());
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let json = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    (status, json, headers)
}

fn revision_header(h: &reqwest::header::HeaderMap) -> u64 {
    h[REVISION_HEADER].to_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn every_key_carries_revisions_and_every_answer_its_revision() {
    let url = spawn(MapService::leader(1)).await;
    let put = |v: &'static str| {
        let url = url.clone();
        async move {
            call(
                Method::PUT,
                &format!("{url}/kv/k"),
                Some(&format!(r#"{{"value":"{v}"}}"#)),
            )
            .await
        }
    };
    let (s, j, h) = put("a").await;
    assert_eq!(s, 200, "{j}");
    assert_eq!((j["revision"].as_u64(), revision_header(&h)), (Some(1), 1));
    assert_eq!(
        (j["create_revision"].as_u64(), j["version"].as_u64()),
        (Some(1), Some(1))
    );
    let (_, j, _) = put("b").await;
    assert_eq!(
        (j["create_revision"].as_u64(), j["mod_revision"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(j["version"].as_u64(), Some(2));
    let (s, j, h) = call(Method::GET, &format!("{url}/kv/k"), None).await;
    assert_eq!(s, 200);
    assert_eq!(
        (j["value"].as_str(), j["mod_revision"].as_u64()),
        (Some("b"), Some(2))
    );
    assert_eq!((j["revision"].as_u64(), revision_header(&h)), (Some(2), 2));
    let (_, j, h) = call(Method::GET, &format!("{url}/kv?prefix=k"), None).await;
    assert_eq!(j["items"][0]["version"].as_u64(), Some(2));
    assert_eq!((j["revision"].as_u64(), revision_header(&h)), (Some(2), 2));
    let (s, j, h) = call(Method::GET, &format!("{url}/kv/absent"), None).await;
    assert_eq!(
        (s, j["kind"].as_str(), revision_header(&h)),
        (404, Some("key_not_found"), 2)
    );
}

#[tokio::test]
async fn conditional_writes_succeed_on_the_right_revision_and_answer_412_otherwise() {
    let url = spawn(MapService::leader(1)).await;
    let kv = format!("{url}/kv/lock");
    // 0 means "only if absent".
    let (s, j, _) = call(
        Method::PUT,
        &format!("{kv}?if_mod_revision=0"),
        Some(r#"{"value":"me"}"#),
    )
    .await;
    assert_eq!((s, j["mod_revision"].as_u64()), (200, Some(1)), "{j}");
    let (s, j, h) = call(
        Method::PUT,
        &format!("{kv}?if_mod_revision=0"),
        Some(r#"{"value":"you"}"#),
    )
    .await;
    assert_eq!(
        (s, j["kind"].as_str()),
        (412, Some("condition_failed")),
        "{j}"
    );
    assert_eq!(j["current"]["value"], "me");
    assert_eq!(j["current"]["mod_revision"].as_u64(), Some(1));
    assert_eq!((j["revision"].as_u64(), revision_header(&h)), (Some(2), 2));
    let (s, _, _) = call(
        Method::PUT,
        &format!("{kv}?if_mod_revision=1"),
        Some(r#"{"value":"me2"}"#),
    )
    .await;
    assert_eq!(s, 200);
    let (s, j, _) = call(Method::DELETE, &format!("{kv}?if_mod_revision=1"), None).await;
    assert_eq!((s, j["current"]["value"].as_str()), (412, Some("me2")));
    let (s, j, _) = call(Method::DELETE, &format!("{kv}?if_mod_revision=3"), None).await;
    assert_eq!((s, j["deleted"].as_bool()), (200, Some(true)), "{j}");
    let (s, j, _) = call(Method::DELETE, &format!("{kv}?if_mod_revision=3"), None).await;
    assert_eq!((s, j["current"].is_null()), (412, true), "{j}");
    let (s, _, _) = call(
        Method::PUT,
        &format!("{kv}?if_mod_revision=x"),
        Some(r#"{"value":"v"}"#),
    )
    .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn prefix_deletes_are_atomic_and_need_a_prefix() {
    let url = spawn(MapService::leader(1)).await;
    for k in ["a%2F1", "a%2F2", "a%2F3", "b%2F1"] {
        let (s, _, _) = call(
            Method::PUT,
            &format!("{url}/kv/{k}"),
            Some(r#"{"value":"v"}"#),
        )
        .await;
        assert_eq!(s, 200);
    }
    let (s, j, h) = call(Method::DELETE, &format!("{url}/kv?prefix=a/"), None).await;
    assert_eq!(
        (s, j["deleted"].as_u64(), revision_header(&h)),
        (200, Some(3), 5),
        "{j}"
    );
    let (_, j, _) = call(Method::GET, &format!("{url}/kv?prefix="), None).await;
    assert_eq!(j["count"], 1);
    for bad in ["", "?prefix=", "?prefix=a&if_mod_revision=1"] {
        let (s, j, _) = call(Method::DELETE, &format!("{url}/kv{bad}"), None).await;
        assert_eq!(s, 400, "{bad}: {j}");
    }
}

#[tokio::test]
async fn transactions_run_one_branch_atomically_and_refuse_bad_shapes() {
    let url = spawn(MapService::leader(1)).await;
    let txn = |body: &'static str| {
        let url = url.clone();
        async move { call(Method::POST, &format!("{url}/txn"), Some(body)).await }
    };
    let (s, j, h) = txn(
        r#"{"compare":[{"key":"n","target":"version","op":"==","value":0}],
            "success":[{"put":{"key":"n","value":"1"}},{"get":{"key":"n"}}],
            "failure":[{"get":{"key":"n"}}]}"#,
    )
    .await;
    assert_eq!((s, j["succeeded"].as_bool()), (200, Some(true)), "{j}");
    assert_eq!(j["results"][0]["put"]["version"].as_u64(), Some(1));
    assert_eq!(j["results"][1]["get"]["kv"]["value"], "1");
    assert_eq!(revision_header(&h), 1);
    let (_, j, _) = txn(
        r#"{"compare":[{"key":"n","target":"value","op":">","value":"5"}],
            "success":[{"delete":{"key":"n"}}],
            "failure":[{"delete_prefix":{"prefix":"zz"}},{"get":{"key":"n"}}]}"#,
    )
    .await;
    assert_eq!(j["succeeded"].as_bool(), Some(false), "{j}");
    assert_eq!(
        j["results"][0]["delete_prefix"]["deleted"].as_u64(),
        Some(0)
    );
    assert_eq!(
        j["results"][1]["get"]["kv"]["mod_revision"].as_u64(),
        Some(1)
    );
    for bad in [
        r#"{"compare":[{"key":"n","target":"size","op":"==","value":0}]}"#,
        r#"{"compare":[{"key":"n","target":"version","op":"<=","value":0}]}"#,
        r#"{"compare":[{"key":"n","target":"version","op":"==","value":"0"}]}"#,
        r#"{"success":[{"frobnicate":{"key":"n"}}]}"#,
        r#"{"success":[{"delete_prefix":{"prefix":""}}]}"#,
        r#"["not an object"]"#,
    ] {
        let (s, j, _) = txn(bad).await;
        assert_eq!(s, 400, "{bad}: {j}");
    }
    // The test service allows 8 operations per branch.
    let ops: Vec<String> = (0..9)
        .map(|i| format!(r#"{{"get":{{"key":"k{i}"}}}}"#))
        .collect();
    let body = format!(r#"{{"success":[{}]}}"#, ops.join(","));
    let (s, j, _) = call(Method::POST, &format!("{url}/txn"), Some(&body)).await;
    assert_eq!((s, j["kind"].as_str()), (413, Some("too_large")), "{j}");
}

#[tokio::test]
async fn a_session_retry_is_answered_once_and_stale_or_unknown_sessions_get_409() {
    let url = spawn(MapService::leader(1)).await;
    let kv = format!("{url}/kv/c");
    let body = Some(r#"{"value":"1"}"#);
    let (s, first, h) = call_with(Method::PUT, &kv, body, ("client-a", 1)).await;
    assert_eq!(s, 200, "{first}");
    assert!(!h.contains_key(DUPLICATE_HEADER));
    // The same (client, seq) again: the original answer, nothing applied again.
    for _ in 0..3 {
        let (s, again, h) = call_with(Method::PUT, &kv, body, ("client-a", 1)).await;
        assert_eq!((s, &again), (200, &first));
        assert_eq!(h[DUPLICATE_HEADER], "true");
    }
    let (_, j, _) = call(Method::GET, &kv, None).await;
    assert_eq!(j["version"].as_u64(), Some(1), "a retry applied twice: {j}");
    let (s, j, _) = call_with(Method::PUT, &kv, body, ("client-a", 2)).await;
    assert_eq!((s, j["version"].as_u64()), (200, Some(2)));
    let (s, j, _) = call_with(Method::PUT, &kv, body, ("client-a", 1)).await;
    assert_eq!(
        (s, j["kind"].as_str()),
        (409, Some(KIND_SESSION_STALE)),
        "{j}"
    );
    let (s, j, _) = call_with(Method::PUT, &kv, body, ("client-b", 7)).await;
    assert_eq!(
        (s, j["kind"].as_str()),
        (409, Some(KIND_SESSION_EXPIRED)),
        "{j}"
    );
    // A failed condition is an answer too: its retry is the same 412.
    let cas = format!("{kv}?if_mod_revision=0");
    let (s, j1, _) = call_with(Method::PUT, &cas, body, ("client-a", 3)).await;
    let (s2, j2, h2) = call_with(Method::PUT, &cas, body, ("client-a", 3)).await;
    assert_eq!((s, s2, &j1), (412, 412, &j2));
    assert_eq!(h2[DUPLICATE_HEADER], "true");
    for bad in [("", 1), ("white space", 1), ("ok", 0)] {
        let (s, j, _) = call_with(Method::PUT, &kv, body, bad).await;
        assert_eq!(s, 400, "{bad:?}: {j}");
    }
    let only_id = reqwest::Client::new()
        .put(&kv)
        .header(CLIENT_ID_HEADER, "x")
        .body(r#"{"value":"1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(only_id.status().as_u16(), 400);
}

#[tokio::test]
async fn a_follower_forwards_writes_with_their_session_and_relays_the_revision() {
    let (_leader, follower) = spawn_leader_and_follower(Default::default()).await;
    let kv = format!("{follower}/kv/f");
    let body = Some(r#"{"value":"1"}"#);
    let (s, j, h) = call_with(Method::PUT, &kv, body, ("fwd", 1)).await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(h[FORWARDED_TO_HEADER], "1");
    assert_eq!(revision_header(&h), 1);
    let (s, _, h) = call_with(Method::PUT, &kv, body, ("fwd", 1)).await;
    assert_eq!((s, h[DUPLICATE_HEADER].to_str().unwrap()), (200, "true"));
    let (s, j, _) = call(
        Method::POST,
        &format!("{follower}/txn"),
        Some(r#"{"success":[{"get":{"key":"f"}}]}"#),
    )
    .await;
    assert_eq!(
        (s, j["results"][0]["get"]["kv"]["version"].as_u64()),
        (200, Some(1)),
        "{j}"
    );
}

#[tokio::test]
async fn a_sequence_number_reused_for_another_request_is_409_not_a_crash() {
    let url = spawn(MapService::leader(1)).await;
    let (s, _, _) = call_with(
        Method::PUT,
        &format!("{url}/kv/a"),
        Some(r#"{"value":"1"}"#),
        ("reuse", 1),
    )
    .await;
    assert_eq!(s, 200);
    let txn = r#"{"success":[{"get":{"key":"a"}},{"get":{"key":"b"}}]}"#;
    let (s, j, h) = call_with(Method::POST, &format!("{url}/txn"), Some(txn), ("reuse", 1)).await;
    assert_eq!(
        (s, j["kind"].as_str()),
        (409, Some(KIND_SESSION_STALE)),
        "{j}"
    );
    assert_eq!(h[DUPLICATE_HEADER], "true");
    let (s, _, _) = call_with(Method::DELETE, &format!("{url}/kv/a"), None, ("reuse", 1)).await;
    assert_eq!(s, 409);
    let (_, j, _) = call(Method::GET, &format!("{url}/kv/a"), None).await;
    assert_eq!(
        j["version"].as_u64(),
        Some(1),
        "nothing was applied again: {j}"
    );
}
