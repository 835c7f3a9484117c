//! Client behaviour against map-backed nodes, dead ports and misbehaving servers.

use super::*;
use crate::api::test_service::{spawn, MapService};
use crate::api::ServiceError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn dead_endpoint() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

fn client(endpoints: Vec<String>, budget_ms: u64) -> Client {
    let mut c = ClientConfig::new(endpoints);
    c.retry_budget_ms = budget_ms;
    c.request_timeout_ms = 2000;
    c.backoff_min_ms = 10;
    Client::new(c).unwrap()
}

#[tokio::test]
async fn finds_the_leader_through_dead_nodes_and_followers() {
    let leader = spawn(MapService::leader(1)).await;
    let follower = spawn(MapService::follower(2, 1, Some(leader.clone()))).await;
    let c = client(vec![dead_endpoint().await, follower, leader.clone()], 5000);
    let w = c.put("k e/y", "v1").await.unwrap();
    assert_eq!(
        (w.key.as_str(), w.value.as_str(), w.leader),
        ("k e/y", "v1", Some(1))
    );
    // The write went through the follower, which named the leader's URL: now cached.
    assert_eq!(c.cached_leader(), Some(leader.clone()));
    let got = c
        .get("k e/y", Consistency::Linearizable)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.value, "v1");
    assert!(c
        .get("missing", Consistency::Linearizable)
        .await
        .unwrap()
        .is_none());
    let d = c.delete("k e/y").await.unwrap();
    assert!(d.deleted);
    c.put("p/1", "a").await.unwrap();
    c.put("p/2", "b").await.unwrap();
    c.put("q", "c").await.unwrap();
    let l = c.list("p/", 10, Consistency::Linearizable).await.unwrap();
    assert_eq!(
        l.items.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
        ["p/1", "p/2"]
    );
    let statuses = c.status_all().await;
    assert!(statuses[0].1.is_err());
    assert_eq!(statuses[2].1.as_ref().unwrap().id, 1);
}

#[tokio::test]
async fn no_leader_anywhere_is_unavailable_after_the_budget() {
    let lost = spawn(MapService::follower(2, 1, None)).await;
    let c = client(vec![lost, dead_endpoint().await], 300);
    let started = std::time::Instant::now();
    let err = c.put("k", "v").await.unwrap_err();
    assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
    assert!(err.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_504_write_is_outcome_unknown_and_not_retried() {
    let mut svc = MapService::leader(1);
    svc.write_error = Some(ServiceError::Timeout("not committed in time".into()));
    let timing_out = spawn(svc).await;
    let healthy = spawn(MapService::leader(2)).await;
    let c = client(vec![timing_out, healthy.clone()], 5000);
    let err = c.put("k", "v").await.unwrap_err();
    assert!(matches!(err, ClientError::OutcomeUnknown(_)), "{err}");
    // Not retried elsewhere: the healthy node never saw the write.
    let other = client(vec![healthy], 1000);
    assert!(other.get("k", Consistency::Stale).await.unwrap().is_none());
}

#[tokio::test]
async fn a_connection_dropped_after_sending_a_write_is_outcome_unknown() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.shutdown().await; // read the request, answer nothing
        }
    });
    let c = client(vec![url], 2000);
    let err = c.put("k", "v").await.unwrap_err();
    assert!(matches!(err, ClientError::OutcomeUnknown(_)), "{err}");
    // A read in the same situation is retried until the budget, then unavailable.
    let err = c.get("k", Consistency::Linearizable).await.unwrap_err();
    assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
}

#[tokio::test]
async fn rejections_are_not_retried() {
    let leader = spawn(MapService::leader(1)).await;
    let c = client(vec![leader], 5000);
    let err = c.put(&"k".repeat(100), "v").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected { status: 413, .. }),
        "{err}"
    );
}

#[test]
fn endpoints_parse_and_keys_encode() {
    assert_eq!(
        ClientConfig::parse_endpoints(DEFAULT_ENDPOINTS)
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        ClientConfig::parse_endpoints(" http://a:1/ ,http://b:2").unwrap(),
        ["http://a:1", "http://b:2"]
    );
    assert!(ClientConfig::parse_endpoints("").is_err());
    assert!(ClientConfig::parse_endpoints("a:1").is_err());
    assert_eq!(percent_encode("a b/ü?"), "a%20b%2F%C3%BC%3F");
}
