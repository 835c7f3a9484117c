//! The membership endpoints over a map-backed service: what each asks the service for,
//! what is refused before it gets there, how errors map, and forwarding to the leader.

use super::tests::{bad_leader, call};
use super::*;
use crate::api::test_service::{spawn, spawn_with, MapService};
use crate::raft::{MemberChange, MembershipProposal};
use raftkv_storage::MemberAddrs;
use reqwest::Method;
use std::sync::Mutex;

type Proposals = Arc<Mutex<Vec<MembershipProposal>>>;

/// Serves `service`; returns its URL and the proposals it receives.
async fn serve(service: MapService) -> (String, Proposals) {
    let proposals = service.proposals.clone();
    (spawn(service).await, proposals)
}

fn taken(p: &Proposals) -> Vec<MembershipProposal> {
    std::mem::take(&mut *p.lock().unwrap())
}

fn addrs(id: u64) -> MemberAddrs {
    MemberAddrs {
        peer_addr: format!("n{id}:900{id}"),
        client_url: format!("http://n{id}:800{id}"),
    }
}

fn add_body(id: u64, extra: &str) -> String {
    format!(
        r#"{{"id":{id},"peer_addr":"n{id}:900{id}","client_url":"http://n{id}:800{id}"{extra}}}"#
    )
}

#[tokio::test]
async fn each_endpoint_asks_for_its_change_and_answers_the_status() {
    let (url, proposals) = serve(MapService::leader(1)).await;
    let members = format!("{url}/cluster/members");
    // A learner, then a voter (the default), then a forced voter.
    let (s, j, _) = call(
        Method::POST,
        &members,
        Some(&add_body(4, r#","learner":true"#)),
    )
    .await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["membership"]["learners"], serde_json::json!([4]));
    assert_eq!(j["members"][1]["role"], "learner");
    assert_eq!(j["members"][1]["peer_addr"], "n4:9004");
    let (s, j, _) = call(Method::POST, &members, Some(&add_body(5, ""))).await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["membership"]["voters"], serde_json::json!([1, 5]));
    let (s, _, _) = call(
        Method::POST,
        &members,
        Some(&add_body(6, r#","learner":false,"force":true"#)),
    )
    .await;
    assert_eq!(s, 200);
    let (s, j, _) = call(Method::POST, &format!("{members}/4/promote"), None).await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["membership"]["voters"], serde_json::json!([1, 4, 5, 6]));
    let (s, j, _) = call(Method::DELETE, &format!("{members}/5?force=true"), None).await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["membership"]["voters"], serde_json::json!([1, 4, 6]));
    let (s, _, _) = call(
        Method::POST,
        &format!("{members}/6/promote?force=false"),
        None,
    )
    .await;
    assert_eq!(s, 409, "already a voter");
    let one = |change, force| MembershipProposal {
        changes: vec![change],
        known_addrs: Default::default(),
        force,
    };
    assert_eq!(
        taken(&proposals),
        [
            one(
                MemberChange::AddLearner {
                    id: 4,
                    addrs: addrs(4)
                },
                false
            ),
            one(
                MemberChange::AddVoter {
                    id: 5,
                    addrs: addrs(5)
                },
                false
            ),
            one(
                MemberChange::AddVoter {
                    id: 6,
                    addrs: addrs(6)
                },
                true
            ),
            one(MemberChange::Promote { id: 4 }, false),
            one(MemberChange::Remove { id: 5 }, true),
            one(MemberChange::Promote { id: 6 }, false),
        ]
    );
    // The list: this node's view, with the leader and the answering node.
    let (s, j, _) = call(Method::GET, &members, None).await;
    assert_eq!(s, 200, "{j}");
    let ids: Vec<u64> = j["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 4, 6]);
    assert_eq!(j["membership"]["change_in_flight"], false);
    assert_eq!(
        (j["leader"]["id"].as_u64(), j["id"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(j["members"][0]["match_index"], j["membership"]["index"]);
    let parsed: MembersResponse = serde_json::from_value(j).unwrap();
    assert_eq!(parsed.membership.learners, Vec::<u64>::new());
}

#[tokio::test]
async fn bad_requests_are_refused_before_the_service() {
    let (url, proposals) = serve(MapService::leader(1)).await;
    let members = format!("{url}/cluster/members");
    let long = format!(
        r#"{{"id":4,"peer_addr":"n:1","client_url":"http://{}:1"}}"#,
        "h".repeat(520)
    );
    let cases: Vec<(Method, String, Option<String>, u16)> = vec![
        (
            Method::POST,
            members.clone(),
            Some(r#"{"id":4,"#.into()),
            400,
        ),
        (Method::POST, members.clone(), Some("not json".into()), 400),
        (Method::POST, members.clone(), Some(r#"[4]"#.into()), 400),
        (Method::POST, members.clone(), None, 400),
        (
            Method::POST,
            members.clone(),
            Some(add_body(4, r#","voter":true"#)),
            400,
        ),
        (Method::POST, members.clone(), Some(add_body(0, "")), 400),
        (
            Method::POST,
            members.clone(),
            Some(add_body(4, r#","learner":"yes""#)),
            400,
        ),
        (
            Method::POST,
            members.clone(),
            Some(r#"{"id":"4","peer_addr":"n:1","client_url":"http://n:2"}"#.into()),
            400,
        ),
        (
            Method::POST,
            members.clone(),
            Some(r#"{"id":4,"peer_addr":"n:1"}"#.into()),
            400,
        ),
        (
            Method::POST,
            members.clone(),
            Some(r#"{"id":4,"peer_addr":"n:1","client_url":"ftp://n:2"}"#.into()),
            400,
        ),
        (
            Method::POST,
            members.clone(),
            Some(r#"{"id":4,"peer_addr":"n:1","client_url":"n:2"}"#.into()),
            400,
        ),
        (
            Method::POST,
            members.clone(),
            Some(r#"{"id":4,"peer_addr":"n:1","client_url":""}"#.into()),
            400,
        ),
        (
            Method::POST,
            members.clone(),
            Some(r#"{"id":4,"peer_addr":"n","client_url":"http://n:2"}"#.into()),
            400,
        ),
        (
            Method::POST,
            members.clone(),
            Some(r#"{"id":4,"peer_addr":"http://n:1","client_url":"http://n:2"}"#.into()),
            400,
        ),
        (
            Method::POST,
            members.clone(),
            Some(r#"{"id":4,"peer_addr":"","client_url":"http://n:2"}"#.into()),
            400,
        ),
        (Method::POST, members.clone(), Some(long), 413),
        (Method::POST, format!("{members}/0/promote"), None, 400),
        (Method::POST, format!("{members}/x/promote"), None, 400),
        (
            Method::POST,
            format!("{members}/4/promote?force=yes"),
            None,
            400,
        ),
        (Method::DELETE, format!("{members}/-1"), None, 400),
        (Method::DELETE, format!("{members}/4?forse=true"), None, 400),
        (Method::DELETE, members.clone(), None, 405),
        (Method::GET, format!("{members}/4"), None, 405),
        (Method::PUT, format!("{members}/4/promote"), None, 405),
    ];
    for (method, u, body, want) in cases {
        let (s, j, h) = call(method.clone(), &u, body.as_deref()).await;
        assert_eq!(s, want, "{method} {u} {body:?}: {j}");
        assert!(
            j["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method} {u}: {j}"
        );
        assert_eq!(h["content-type"], "application/json", "{method} {u}");
    }
    assert_eq!(taken(&proposals), [], "nothing bad reached the service");
    let (s, j, _) = call(Method::POST, &members, Some(&add_body(4, ""))).await;
    assert_eq!(s, 200, "still serving: {j}");
}

#[tokio::test]
async fn service_errors_keep_their_status_kind_and_message() {
    let (url, _) = serve(MapService::leader(1)).await;
    let members = format!("{url}/cluster/members");
    let (s, j, _) = call(Method::POST, &format!("{members}/9/promote"), None).await;
    assert_eq!((s, j["kind"].as_str()), (404, Some(KIND_NOT_FOUND)), "{j}");
    assert_eq!(j["error"], "node 9 is not a member");
    let (s, j, _) = call(Method::DELETE, &format!("{members}/9"), None).await;
    assert_eq!((s, j["kind"].as_str()), (404, Some(KIND_NOT_FOUND)), "{j}");
    let (s, j, _) = call(Method::POST, &members, Some(&add_body(1, ""))).await;
    assert_eq!((s, j["kind"].as_str()), (409, Some(KIND_CONFLICT)), "{j}");
    assert_eq!(j["error"], "node 1 is already a member");
    let (s, j, _) = call(Method::DELETE, &format!("{members}/1"), None).await;
    assert_eq!((s, j["kind"].as_str()), (409, Some(KIND_CONFLICT)), "{j}");

    let scripted = [
        (
            ServiceError::Conflict("a membership change is in flight".into()),
            409,
            "conflict",
        ),
        (
            ServiceError::Unavailable("no quorum".into()),
            503,
            "unavailable",
        ),
        (
            ServiceError::Timeout("outcome unknown: the change may still complete".into()),
            504,
            "outcome_unknown",
        ),
    ];
    for (e, status, kind) in scripted {
        let mut service = MapService::leader(1);
        service.membership_error = Some(e.clone());
        let (url, proposals) = serve(service).await;
        let (s, j, h) = call(Method::DELETE, &format!("{url}/cluster/members/2"), None).await;
        assert_eq!((s, j["kind"].as_str()), (status, Some(kind)), "{e:?}: {j}");
        assert_eq!(
            j["error"].as_str(),
            Some(e.to_string().as_str()),
            "the service's words"
        );
        assert_eq!(h.contains_key("retry-after"), status == 503, "{e:?}");
        assert_eq!(taken(&proposals).len(), 1);
    }
}

#[tokio::test]
async fn a_follower_forwards_changes_and_answers_the_list_itself() {
    let (leader, leader_proposals) = serve(MapService::leader(1)).await;
    let (follower, follower_proposals) =
        serve(MapService::follower(2, 1, Some(leader.clone()))).await;
    let members = format!("{follower}/cluster/members");
    let (s, j, h) = call(
        Method::POST,
        &members,
        Some(&add_body(4, r#","learner":true"#)),
    )
    .await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(h[FORWARDED_TO_HEADER], "1");
    assert_eq!(j["id"], 1, "the leader's status");
    let (s, j, h) = call(
        Method::POST,
        &format!("{members}/4/promote?force=true"),
        None,
    )
    .await;
    assert_eq!(
        (s, &h[FORWARDED_TO_HEADER]),
        (200, &"1".parse().unwrap()),
        "{j}"
    );
    let (s, j, _) = call(Method::DELETE, &format!("{members}/4"), None).await;
    assert_eq!(s, 200, "{j}");
    let (s, j, _) = call(Method::DELETE, &format!("{members}/4"), None).await;
    assert_eq!(
        (s, j["kind"].as_str()),
        (404, Some(KIND_NOT_FOUND)),
        "the leader's 404: {j}"
    );
    let forced: Vec<bool> = taken(&leader_proposals).iter().map(|p| p.force).collect();
    assert_eq!(
        forced,
        [false, true, false, false],
        "the query string went along"
    );
    assert_eq!(taken(&follower_proposals), []);
    // The list is the follower's own view: no progress, the leader named.
    let (s, j, h) = call(Method::GET, &members, None).await;
    assert_eq!(s, 200, "{j}");
    assert!(!h.contains_key(FORWARDED_TO_HEADER));
    assert_eq!(
        (j["id"].as_u64(), j["leader"]["id"].as_u64()),
        (Some(2), Some(1))
    );
    assert!(j["members"][0].get("match_index").is_none(), "{j}");
    // No leader known: 503, nothing changed.
    let (lost, _) = serve(MapService::follower(5, 1, None)).await;
    let (s, _, h) = call(
        Method::POST,
        &format!("{lost}/cluster/members"),
        Some(&add_body(4, "")),
    )
    .await;
    assert_eq!((s, &h["retry-after"]), (503, &"1".parse().unwrap()));
}

#[tokio::test]
async fn a_change_lost_on_its_way_to_the_leader_is_outcome_unknown() {
    let options = RouterOptions {
        port: ClientPortConfig {
            forward_timeout_ms: 300,
            ..ClientPortConfig::default()
        },
        ..RouterOptions::default()
    };
    for hang_up in [false, true] {
        let leader = bad_leader(hang_up).await;
        let follower = spawn_with(
            MapService::follower(2, 1, Some(leader)),
            options.clone(),
            None,
        )
        .await;
        let (s, j, _) = call(
            Method::DELETE,
            &format!("{follower}/cluster/members/3"),
            None,
        )
        .await;
        assert_eq!(s, 504, "hang_up {hang_up}: {j}");
        assert_eq!(j["kind"], "outcome_unknown");
    }
    // Nothing listening: nothing was sent, safe to retry.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let follower = spawn_with(MapService::follower(2, 1, Some(dead)), options, None).await;
    let (s, j, _) = call(
        Method::POST,
        &format!("{follower}/cluster/members"),
        Some(&add_body(4, "")),
    )
    .await;
    assert_eq!(s, 503, "{j}");
}
