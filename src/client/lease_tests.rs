//! Lease calls and the lease keeper against scripted nodes: what goes out (paths, bodies,
//! sessions), what comes back (typed not-found), and the keeper's renewals and verdicts.

use super::scripted::{quick_client, requests, serve, Log, Reply, Script, Seen};
use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn lease(id: u64, ttl_s: u64, remaining_ms: u64) -> String {
    serde_json::to_string(&LeaseResponse {
        id,
        ttl_s,
        remaining_s: remaining_ms.div_ceil(1000),
        remaining_ms,
        keys: Vec::new(),
        keys_count: 0,
        keys_more: false,
        leader: 1,
    })
    .unwrap()
}

const NOT_FOUND: &str = r#"{"error":"lease 7 not found","kind":"lease_not_found"}"#;

/// A node answering each lease call as a healthy leader would, for lease 7.
fn leader_script() -> Script {
    Arc::new(
        |_, seen: &Seen| match (seen.method.as_str(), seen.path.as_str()) {
            ("POST", "/lease") => {
                Reply::json(200, r#"{"id":7,"ttl_s":10,"revision":7,"leader":1}"#)
            }
            ("POST", "/lease/7/keepalive") => Reply::json(200, lease(7, 10, 10_000)),
            ("GET", "/lease/7") => {
                let mut r: LeaseResponse = serde_json::from_str(&lease(7, 10, 8000)).unwrap();
                r.keys = vec!["svc/a".into()];
                r.keys_count = 1;
                Reply::json(200, serde_json::to_string(&r).unwrap())
            }
            ("DELETE", "/lease/7") => {
                Reply::json(200, r#"{"id":7,"deleted":1,"revision":9,"leader":1}"#)
            }
            ("GET", "/lease") => Reply::json(
                200,
                r#"{"leases":[{"id":7,"ttl_s":10,"keys_count":1,"remaining_ms":8000}],"revision":9,"leader":1}"#,
            ),
            ("PUT", "/kv/svc%2Fa?lease=7") => Reply::json(
                200,
                r#"{"key":"svc/a","value":"x","index":8,"leader":1,"revision":8,"create_revision":8,"mod_revision":8,"version":1}"#,
            ),
            _ => Reply::json(404, NOT_FOUND),
        },
    )
}

#[tokio::test]
async fn a_conditional_leased_put_carries_both_and_reads_each_answer() {
    let log = Log::default();
    let script: Script = Arc::new(|_, seen: &Seen| match seen.path.as_str() {
        "/kv/svc%2Fa?if_mod_revision=0&lease=7" => Reply::json(
            200,
            r#"{"key":"svc/a","value":"x","index":8,"leader":1,"revision":8,"create_revision":8,"mod_revision":8,"version":1}"#,
        ),
        "/kv/svc%2Fa?if_mod_revision=3&lease=7" => Reply::json(
            412,
            r#"{"error":"mod_revision is 8, not 3","kind":"condition_failed","current":{"key":"svc/a","value":"x","create_revision":8,"mod_revision":8,"version":1,"lease":7},"revision":8}"#,
        ),
        _ => Reply::json(404, NOT_FOUND),
    });
    let url = serve(log.clone(), script).await;
    let c = quick_client(vec![url], 2000);
    let put = c.put_if_with_lease("svc/a", "x", 0, 7).await.unwrap();
    assert_eq!(put.unwrap().mod_revision, 8);
    let failed = c.put_if_with_lease("svc/a", "y", 3, 7).await.unwrap();
    let failed = failed.unwrap_err();
    assert_eq!(
        (failed.revision, failed.current.map(|k| k.mod_revision)),
        (8, Some(8))
    );
    let err = c.put_if_with_lease("svc/a", "x", 0, 9).await.unwrap_err();
    assert!(matches!(err, ClientError::LeaseNotFound { id: 9 }), "{err}");
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen
        .iter()
        .all(|s| s.method == "PUT" && s.client_id.is_some()));
}

#[tokio::test]
async fn lease_calls_go_out_as_the_contract_says() {
    let log = Log::default();
    let url = serve(log.clone(), leader_script()).await;
    let c = quick_client(vec![url], 2000);
    let granted = c.lease_grant(10).await.unwrap();
    assert_eq!((granted.id, granted.ttl_s), (7, 10));
    let put = c.put_with_lease("svc/a", "x", 7).await.unwrap();
    assert_eq!(put.mod_revision, 8);
    assert_eq!(c.lease_keepalive(7).await.unwrap().remaining_ms, 10_000);
    let got = c.lease_get(7).await.unwrap();
    assert_eq!(
        (got.keys.as_slice(), got.remaining_s),
        (&["svc/a".to_string()][..], 8)
    );
    assert_eq!(c.lease_list().await.unwrap().leases[0].keys_count, 1);
    assert_eq!(c.lease_revoke(7).await.unwrap().deleted, 1);
    for err in [
        c.lease_keepalive(8).await.unwrap_err(),
        c.lease_get(8).await.unwrap_err(),
        c.lease_revoke(8).await.unwrap_err(),
        c.put_with_lease("other", "x", 8).await.unwrap_err(),
    ] {
        assert!(matches!(err, ClientError::LeaseNotFound { id: 8 }), "{err}");
        assert!(!err.is_retryable());
    }
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen[0].body, r#"{"ttl_s":10}"#);
    // Grants, revokes and puts carry a session; keepalives, gets and lists do not.
    let sessioned: Vec<(&str, bool)> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.client_id.is_some()))
        .collect();
    assert_eq!(
        sessioned,
        [
            ("POST", true),
            ("PUT", true),
            ("POST", false),
            ("GET", false),
            ("GET", false),
            ("DELETE", true),
            ("POST", false),
            ("GET", false),
            ("DELETE", true),
            ("PUT", true),
        ]
    );
}

#[tokio::test]
async fn a_routing_404_is_not_a_missing_lease() {
    let url = serve(
        Log::default(),
        Arc::new(|_, _| {
            Reply::json(
                404,
                r#"{"error":"no such endpoint","kind":"no_such_endpoint"}"#,
            )
        }),
    )
    .await;
    let err = quick_client(vec![url], 2000)
        .lease_keepalive(7)
        .await
        .unwrap_err();
    assert_eq!(err.rejected_status(), Some(404), "{err}");
}

#[tokio::test]
async fn a_keepalive_is_retried_on_another_endpoint() {
    let log = Log::default();
    let failing = serve(log.clone(), Arc::new(|_, _| Reply::drop_connection())).await;
    let healthy = serve(log.clone(), leader_script()).await;
    let c = quick_client(vec![failing.clone(), healthy.clone()], 2000);
    assert_eq!(c.lease_keepalive(7).await.unwrap().id, 7);
    let servers: Vec<String> = requests(&log).into_iter().map(|r| r.0).collect();
    assert_eq!(servers, [failing, healthy]);
}

#[tokio::test]
async fn the_keeper_renews_every_third_of_the_ttl_and_reports_the_loss() {
    let log = Log::default();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    // TTL 1 s: a renewal every ~333 ms. The 4th keepalive finds no node; the 6th finds the
    // lease gone.
    let url = serve(
        log.clone(),
        Arc::new(move |_, _| match seen.fetch_add(1, Ordering::SeqCst) {
            0..=2 | 4 => Reply::json(200, lease(7, 1, 1000)),
            3 => Reply::json(503, r#"{"error":"no leader"}"#),
            _ => Reply::json(404, NOT_FOUND),
        }),
    )
    .await;
    let mut config = ClientConfig::new(vec![url]);
    config.backoff_min_ms = 5;
    config.backoff_max_ms = 20;
    let c = Client::new(config).unwrap();
    let started = std::time::Instant::now();
    let mut keeper = c.keep_alive(7).await.unwrap();
    assert_eq!(keeper.id(), 7);
    assert_eq!(
        keeper.status(),
        KeeperStatus::Alive {
            renewals: 1,
            ttl_s: 1,
            remaining_ms: 1000
        }
    );
    let mut statuses = Vec::new();
    while let Some(s) = tokio::time::timeout(Duration::from_secs(5), keeper.changed())
        .await
        .expect("a status within 5 s")
    {
        statuses.push(s);
    }
    let elapsed = started.elapsed();
    // The 503 is retried within the renewal (no Failing status): 2nd, 3rd, 4th (after the
    // 503), then the loss.
    assert_eq!(
        statuses
            .iter()
            .map(|s| match s {
                KeeperStatus::Alive { renewals, .. } => format!("alive {renewals}"),
                KeeperStatus::Failing { .. } => "failing".into(),
                KeeperStatus::Lost(why) => format!("lost: {why}"),
            })
            .collect::<Vec<_>>(),
        [
            "alive 2",
            "alive 3",
            "alive 4",
            "lost: the lease does not exist (expired or revoked)"
        ]
    );
    assert_eq!(keeper.lost().await, LeaseLost::NotFound);
    // Four periods of ~333 ms after the first renewal, give or take the scripted retries.
    assert!(
        elapsed >= Duration::from_millis(1300) && elapsed < Duration::from_millis(2500),
        "{elapsed:?}"
    );
    let paths: Vec<String> = requests(&log).into_iter().map(|r| r.2).collect();
    assert_eq!(paths.len(), 6);
    assert!(paths.iter().all(|p| p == "/lease/7/keepalive"), "{paths:?}");
}

#[tokio::test]
async fn a_keeper_reports_failing_renewals_and_stops_when_told() {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let url = serve(
        Log::default(),
        Arc::new(move |_, _| match seen.fetch_add(1, Ordering::SeqCst) {
            0 => Reply::json(200, lease(7, 1, 1000)),
            _ => Reply::json(503, r#"{"error":"no leader"}"#),
        }),
    )
    .await;
    let mut config = ClientConfig::new(vec![url]);
    config.backoff_min_ms = 5;
    config.backoff_max_ms = 20;
    let c = Client::new(config).unwrap();
    let mut keeper = c.keep_alive(7).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), keeper.changed())
        .await
        .unwrap();
    // Renewals are retried for one TTL (1 s), then reported failing: the lease may live on.
    assert!(
        matches!(&next, Some(KeeperStatus::Failing { renewals: 1, error }) if error.contains("no leader")),
        "{next:?}"
    );
    keeper.stop().await;
    let after_stop = count.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        count.load(Ordering::SeqCst),
        after_stop,
        "no keepalive after stop"
    );
    // A lease that is already gone is an error at once.
    let gone = serve(Log::default(), Arc::new(|_, _| Reply::json(404, NOT_FOUND))).await;
    let err = quick_client(vec![gone], 2000)
        .keep_alive(7)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::LeaseNotFound { id: 7 }), "{err}");
}
