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

/// A client whose writes carry no session (so an unanswered write is never resent).
fn sessionless(endpoints: Vec<String>, budget_ms: u64) -> Client {
    let mut c = ClientConfig::new(endpoints);
    c.retry_budget_ms = budget_ms;
    c.request_timeout_ms = 2000;
    c.backoff_min_ms = 10;
    c.sessions = false;
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
async fn without_sessions_a_504_write_is_outcome_unknown_and_not_retried() {
    let mut svc = MapService::leader(1);
    svc.write_error = Some(ServiceError::Timeout("not committed in time".into()));
    let timing_out = spawn(svc).await;
    let healthy = spawn(MapService::leader(2)).await;
    let c = sessionless(vec![timing_out, healthy.clone()], 5000);
    let err = c.put("k", "v").await.unwrap_err();
    assert!(matches!(err, ClientError::OutcomeUnknown(_)), "{err}");
    // Not retried elsewhere: the healthy node never saw the write.
    let other = client(vec![healthy], 1000);
    assert!(other.get("k", Consistency::Stale).await.unwrap().is_none());
}

#[tokio::test]
async fn without_sessions_a_connection_dropped_after_sending_a_write_is_outcome_unknown() {
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
    let c = sessionless(vec![url], 2000);
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
    assert_eq!(percent_encode("a b/ü?."), "a%20b%2F%C3%BC%3F%2E");
    assert_eq!(
        key_path_and_query("..", "consistency=stale"),
        "/kv/?key=%2E%2E&consistency=stale"
    );
    assert_eq!(key_path_and_query("a.b", ""), "/kv/a%2Eb");
}

#[tokio::test]
async fn awkward_keys_round_trip_through_the_client_and_a_follower() {
    let leader = spawn(MapService::leader(1)).await;
    let follower = spawn(MapService::follower(2, 1, Some(leader.clone()))).await;
    for endpoints in [vec![follower.clone()], vec![leader.clone()]] {
        let c = client(endpoints, 5000);
        for (i, key) in crate::api::http::tests::AWKWARD_KEYS.iter().enumerate() {
            let value = format!("v{i}");
            let w = c.put(key, &value).await.unwrap();
            assert_eq!(w.key, *key);
            let got = c.get(key, Consistency::Linearizable).await.unwrap();
            assert_eq!(got.map(|r| r.value), Some(value), "{key:?}");
        }
        let long = "ü".repeat(32); // 64 bytes: the map service's key limit
        c.put(&long, "x").await.unwrap();
        assert!(c.delete(&long).await.unwrap().deleted);
        let listed = c.list("", 100, Consistency::Linearizable).await.unwrap();
        let mut want: Vec<&str> = crate::api::http::tests::AWKWARD_KEYS.to_vec();
        want.sort();
        let keys: Vec<&str> = listed.items.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys, want);
        for key in crate::api::http::tests::AWKWARD_KEYS {
            assert!(c.delete(key).await.unwrap().deleted, "{key:?}");
            assert!(c
                .get(key, Consistency::Linearizable)
                .await
                .unwrap()
                .is_none());
        }
    }
}

#[tokio::test]
async fn a_routing_404_is_not_a_missing_key() {
    let url = spawn(MapService::leader(1)).await;
    // An endpoint with a path prefix the server does not have: every route is unknown.
    let c = client(vec![format!("{url}/not-raftkv")], 1000);
    let err = c.get("k", Consistency::Linearizable).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected { status: 404, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn list_follows_continuations_up_to_its_limit() {
    let url = spawn(MapService::leader(1)).await;
    let mut c = ClientConfig::new(vec![url]);
    c.list_page_max = 3;
    let c = Client::new(c).unwrap();
    for i in 0..10 {
        c.put(&format!("k{i}"), "v").await.unwrap();
    }
    let all = c.list("k", 100, Consistency::Linearizable).await.unwrap();
    let keys: Vec<String> = all.items.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, (0..10).map(|i| format!("k{i}")).collect::<Vec<_>>());
    assert!(!all.more);
    let some = c.list("k", 7, Consistency::Linearizable).await.unwrap();
    assert_eq!((some.count, some.more), (7, true));
    assert_eq!(some.next.as_deref(), Some("k6"));
}

#[tokio::test]
async fn unreachable_endpoints_are_reported_within_two_seconds() {
    let dead = vec![
        dead_endpoint().await,
        dead_endpoint().await,
        dead_endpoint().await,
    ];
    let c = Client::new(ClientConfig::new(dead)).unwrap(); // the CLI's defaults: 15 s budget
    let started = std::time::Instant::now();
    let err = c.get("k", Consistency::Linearizable).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
    assert!(elapsed < Duration::from_millis(2500), "{elapsed:?}");
    assert!(err.to_string().contains("no endpoint answered"), "{err}");
}

#[tokio::test]
async fn https_works_with_the_cacert_and_fails_without_it() {
    let (url, pki) = crate::api::test_service::spawn_tls(MapService::leader(1)).await;
    assert!(url.starts_with("https://"));
    let mut config = ClientConfig::new(vec![url.clone()]);
    config.ca_file = Some(pki.path().join("ca.pem"));
    let c = Client::new(config).unwrap();
    c.put("k", "over tls").await.unwrap();
    let got = c
        .get("k", Consistency::Linearizable)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.value, "over tls");
    let untrusting = Client::new(ClientConfig::new(vec![url])).unwrap();
    let err = untrusting
        .get("k", Consistency::Linearizable)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Unavailable(_)), "{err}");
    let mut bad = ClientConfig::new(vec!["https://127.0.0.1:1".into()]);
    bad.ca_file = Some(pki.path().join("missing.pem"));
    assert!(matches!(Client::new(bad), Err(ClientError::Config(_))));
}

#[tokio::test]
async fn the_token_is_sent_on_every_request() {
    let options = crate::api::http::RouterOptions {
        auth_token: crate::api::auth::AuthToken::new("t0ken"),
        ..Default::default()
    };
    let url = crate::api::test_service::spawn_with(MapService::leader(1), options, None).await;
    let mut config = ClientConfig::new(vec![url.clone()]);
    config.token = Some("t0ken".into());
    let c = Client::new(config).unwrap();
    c.put("k", "v").await.unwrap();
    let anonymous = client(vec![url], 1000);
    let err = anonymous.put("k", "v").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Rejected { status: 401, .. }),
        "{err}"
    );
}

#[test]
fn percent_decoding_inverts_encoding_and_refuses_garbage() {
    for s in ["", "plain", "test cluster/ü", "%", "a%2Fb", "日本"] {
        assert_eq!(percent_decode(&percent_encode(s)).as_deref(), Some(s));
    }
    for bad in ["%", "%4", "%zz", "%ff", "a%e6%97"] {
        assert_eq!(percent_decode(bad), None, "{bad:?}");
    }
}

#[tokio::test]
async fn a_snapshot_streams_from_the_leader_into_a_verified_backup() {
    use crate::api::test_service::SNAPSHOT_CLUSTER_ID;
    use raftkv_storage::snapshot::backup::BackupWriter;
    let dir = tempfile::tempdir().unwrap();
    let mut leader = MapService::leader(1);
    leader.snapshot_dir = Some(dir.path().to_path_buf());
    let leader = spawn(leader).await;
    let follower = spawn(MapService::follower(2, 1, Some(leader.clone()))).await;
    // Without sessions: the snapshot then holds the 300 keys, the watch history of their 300
    // puts and the history's compact revision (a session table's records would count too).
    let c = sessionless(
        vec![dead_endpoint().await, follower.clone(), leader.clone()],
        5000,
    );
    for i in 0..300 {
        c.put(&format!("key/{i:03}"), &format!("value {i}"))
            .await
            .unwrap();
    }
    let mut download = c.snapshot().await.unwrap();
    // Found through the status of every endpoint: the leader, asked directly.
    assert_eq!(download.endpoint, leader);
    assert_eq!(download.cluster_id, SNAPSHOT_CLUSTER_ID);
    assert_eq!((download.index, download.term), (300, 1));
    let file = dir.path().join("backup.rkv");
    let vfs = std::sync::Arc::new(raftkv_storage::vfs::StdFs);
    let mut w = BackupWriter::create(vfs, &file, &download.cluster_id, 0, 1 << 30).unwrap();
    while let Some(piece) = download.chunk().await.unwrap() {
        w.write(&piece).unwrap();
    }
    assert_eq!(Some(download.received_bytes()), download.bytes);
    let saved = w.finish().unwrap();
    assert_eq!(saved.header.cluster_id, SNAPSHOT_CLUSTER_ID);
    assert_eq!(
        (saved.header.index, saved.snapshot.key_count),
        (300, 300 + 300 + 1)
    );

    // Through a follower alone: forwarded, with the snapshot headers relayed.
    let via = client(vec![follower], 5000);
    let mut download = via.snapshot().await.unwrap();
    assert_eq!(download.cluster_id, SNAPSHOT_CLUSTER_ID);
    assert_eq!(download.index, 300);
    let mut bytes = 0;
    while let Some(piece) = download.chunk().await.unwrap() {
        bytes += piece.len() as u64;
    }
    assert_eq!(bytes, saved.snapshot.file_bytes);

    // A leader that keeps no snapshot files rejects the request: not retried.
    let plain = client(vec![spawn(MapService::leader(1)).await], 5000);
    let err = plain.snapshot().await.err().unwrap();
    assert!(
        matches!(err, ClientError::Rejected { status: 400, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn membership_changes_go_to_the_leader_and_refusals_are_typed() {
    let leader = spawn(MapService::leader(1)).await;
    let follower = spawn(MapService::follower(2, 1, Some(leader.clone()))).await;
    let c = client(
        vec![dead_endpoint().await, follower.clone(), leader.clone()],
        5000,
    );
    let s = c
        .add_member(4, "n4:9004", "http://n4:8004", true, false)
        .await
        .unwrap();
    assert_eq!((s.id, s.membership.learners.as_slice()), (1, &[4][..]));
    assert_eq!(c.cached_leader(), Some(leader.clone()));
    let s = c.promote_member(4, false).await.unwrap();
    assert_eq!(s.membership.voters, [1, 4]);
    let s = c
        .add_member(5, "n5:9005", "http://n5:8005", false, true)
        .await
        .unwrap();
    assert_eq!(s.membership.voters, [1, 4, 5]);
    let s = c.remove_member(5, true).await.unwrap();
    assert_eq!(s.membership.voters, [1, 4]);
    // Refusals carry the status and the server's words, and are not retried.
    let err = c.remove_member(5, false).await.unwrap_err();
    assert_eq!(err.rejected_status(), Some(404), "{err}");
    assert!(err.to_string().contains("node 5 is not a member"), "{err}");
    let err = c
        .add_member(4, "n4:9004", "http://n4:8004", false, false)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Rejected { status: 409, message } if message == "node 4 is already a member"),
        "{err}"
    );
    assert!(!err.is_retryable());
    let err = c
        .add_member(6, "n6", "http://n6:8006", false, false)
        .await
        .unwrap_err();
    assert_eq!(err.rejected_status(), Some(400), "{err}");
}

#[tokio::test]
async fn the_member_list_prefers_the_leaders_view() {
    let leader = spawn(MapService::leader(1)).await;
    let follower = spawn(MapService::follower(2, 1, Some(leader.clone()))).await;
    // Only the follower is an endpoint: it names the leader, which is asked directly.
    let c = client(vec![follower.clone()], 5000);
    let view = c.members().await.unwrap();
    assert_eq!((view.id, view.leader.as_ref().map(|l| l.id)), (1, Some(1)));
    assert!(
        view.members.iter().all(|m| m.match_index.is_some()),
        "{view:?}"
    );
    assert_eq!(
        c.cached_leader(),
        None,
        "the follower is not cached as the leader"
    );
    // The follower's own view when the leader cannot be reached.
    let lost = spawn(MapService::follower(3, 1, Some(dead_endpoint().await))).await;
    let c = client(vec![lost], 5000);
    let view = c.members().await.unwrap();
    assert_eq!((view.id, view.leader.as_ref().map(|l| l.id)), (3, Some(1)));
    assert!(
        view.members.iter().all(|m| m.match_index.is_none()),
        "{view:?}"
    );
    // A 504 from the leader is outcome unknown, not retried.
    let mut svc = MapService::leader(1);
    svc.membership_error = Some(ServiceError::Timeout(
        "outcome unknown: the change may still complete".into(),
    ));
    let proposals = svc.proposals.clone();
    let c = client(vec![spawn(svc).await], 5000);
    let err = c.remove_member(2, false).await.unwrap_err();
    assert!(matches!(err, ClientError::OutcomeUnknown(_)), "{err}");
    assert_eq!(proposals.lock().unwrap().len(), 1, "sent once");
}

#[tokio::test]
async fn revisions_conditions_transactions_and_prefix_deletes_round_trip() {
    let leader = spawn(MapService::leader(1)).await;
    let follower = spawn(MapService::follower(2, 1, Some(leader.clone()))).await;
    let c = client(vec![follower, leader], 5000);
    // Only if absent, then a compare-and-swap chain on mod_revision.
    let first = c.put_if("lock", "a", 0).await.unwrap().unwrap();
    assert_eq!(
        (first.version, first.create_revision),
        (1, first.mod_revision)
    );
    let failed = c.put_if("lock", "b", 0).await.unwrap().unwrap_err();
    assert_eq!(
        failed
            .current
            .as_ref()
            .map(|kv| (kv.value.as_str(), kv.mod_revision)),
        Some(("a", first.mod_revision))
    );
    let second = c
        .put_if("lock", "b", first.mod_revision)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.version, 2);
    assert!(second.mod_revision > first.mod_revision);
    let got = c
        .get("lock", Consistency::Linearizable)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((got.mod_revision, got.version), (second.mod_revision, 2));
    assert!(c
        .delete_if("lock", first.mod_revision)
        .await
        .unwrap()
        .is_err());
    assert!(
        c.delete_if("lock", second.mod_revision)
            .await
            .unwrap()
            .unwrap()
            .deleted
    );
    // A transaction: create two keys only if the first is absent; again, the failure branch.
    let txn: TxnRequest = serde_json::from_value(serde_json::json!({
        "compare": [{"key": "p/1", "target": "version", "op": "==", "value": 0}],
        "success": [{"put": {"key": "p/1", "value": "x"}}, {"put": {"key": "p/2", "value": "y"}}],
        "failure": [{"get": {"key": "p/1"}}]
    }))
    .unwrap();
    let ran = c.txn(&txn).await.unwrap();
    assert!(ran.succeeded);
    assert_eq!(ran.results.len(), 2);
    let again = c.txn(&txn).await.unwrap();
    assert!(!again.succeeded);
    assert!(
        matches!(&again.results[..], [TxnOpResult::Get { kv: Some(kv), .. }] if kv.mod_revision == ran.revision),
        "{again:?}"
    );
    let gone = c.delete_prefix("p/").await.unwrap();
    assert_eq!(gone.deleted, 2);
    assert!(c
        .list("p/", 10, Consistency::Linearizable)
        .await
        .unwrap()
        .items
        .is_empty());
    // Every write above went out under the one session, in order.
    assert_eq!(c.sessions.idle(), 1);
}
