//! The container image and the compose cluster, end to end, judged from the host through the
//! published client ports: `tools/docker/build.sh`, then `compose up --build` of the
//! repository's own `docker-compose.yml` under a unique project name and free host ports.
//!
//! One scenario, in order: write through node 1 and read it through node 3; SIGKILL the
//! leader's container, writes go on, restart it and it catches up; cut the leader off the
//! `peers` network (`docker network disconnect`): the other two keep serving linearizable reads
//! and writes, the isolated node (still reachable on its client port) serves neither, and after
//! `docker network connect` it catches up; a graceful `compose stop` (every node exits 0) and
//! `compose start`. Every acknowledged write is then present on every node; a write whose
//! outcome was unknown is either absent or holds its value.
//!
//! Skipped, with the reason on stderr, when there is no Docker engine, no compose tool
//! (`docker compose` or `docker-compose`), or `RAFTKV_CONTAINER_TESTS=0`. The project is
//! always taken down with its volumes (`down -v`), and the containers' logs are printed when
//! the test fails. Progress goes to stderr directly, so CI logs show it.

use raftkv::api::{ClusterStatus, Consistency};
use raftkv::client::{Client, ClientConfig, ClientError};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The compose file's services are node1..node3.
const NODES: [u64; 3] = [1, 2, 3];
/// How long one docker or compose command may take (an image build included).
const COMMAND_TIMEOUT_MS: u64 = 300_000;
/// How long the build script may take (a cold static build is minutes on 2 cores).
const BUILD_TIMEOUT_MS: u64 = 1_800_000;
/// The bound on every wait for the cluster (a leader, readiness, catch-up).
const WAIT_MS: u64 = 60_000;

/// Progress and skip reasons, straight to stderr: the test harness captures only `eprintln!`.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "[containers] {msg}");
}

/// Runs `cmd` to completion within `timeout_ms`; the output, or why not.
fn run_bounded(mut cmd: Command, timeout_ms: u64) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    let (tx, rx) = std::sync::mpsc::channel();
    cmd.stdin(Stdio::null());
    std::thread::spawn(move || {
        let _ = tx.send(cmd.output());
    });
    match rx.recv_timeout(Duration::from_millis(timeout_ms)) {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(format!("{shown}: cannot run: {e}")),
        Err(_) => Err(format!("{shown}: still running after {timeout_ms} ms")),
    }
}

/// The compose command line to use, or why the test cannot run here.
fn compose_tool() -> Result<Vec<String>, String> {
    if std::env::var("RAFTKV_CONTAINER_TESTS").as_deref() == Ok("0") {
        return Err("RAFTKV_CONTAINER_TESTS=0".into());
    }
    let mut info = Command::new("docker");
    info.args(["info", "--format", "{{.ServerVersion}}"]);
    match run_bounded(info, 30_000) {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let why = String::from_utf8_lossy(&out.stderr);
            return Err(format!("no Docker engine (`docker info`: {})", why.trim()));
        }
        Err(e) => return Err(format!("no Docker engine ({e})")),
    }
    for tool in [&["docker", "compose"][..], &["docker-compose"][..]] {
        let mut version = Command::new(tool[0]);
        version.args(&tool[1..]).arg("version");
        if run_bounded(version, 30_000).is_ok_and(|o| o.status.success()) {
            return Ok(tool.iter().map(|s| s.to_string()).collect());
        }
    }
    Err("neither `docker compose` nor `docker-compose` is installed".into())
}

/// `count` host ports that are free now (probed), from a range that depends on the process id.
fn free_ports(count: usize) -> Vec<u16> {
    let start = 24_000 + (std::process::id() % 400) as u16 * 10;
    (start..60_000)
        .filter(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .take(count)
        .collect()
}

/// One compose project of the repository's `docker-compose.yml`; taken down with its volumes
/// when dropped.
struct Cluster {
    tool: Vec<String>,
    project: String,
    root: PathBuf,
    ports: BTreeMap<u64, u16>,
    /// Container ids, learned once all are up (they survive kill, stop and start).
    containers: BTreeMap<u64, String>,
}

impl Cluster {
    fn new(tool: Vec<String>) -> Cluster {
        let ports = free_ports(NODES.len());
        assert_eq!(ports.len(), NODES.len(), "no free host ports");
        Cluster {
            tool,
            // Lower-case letters and digits only: both compose versions keep it as it is.
            project: format!("raftkvtest{}", std::process::id()),
            root: PathBuf::from(env!("CARGO_MANIFEST_DIR")),
            ports: NODES.iter().copied().zip(ports).collect(),
            containers: BTreeMap::new(),
        }
    }

    /// `compose -p PROJECT -f docker-compose.yml ARGS`, with this project's host ports.
    fn compose_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.tool[0]);
        cmd.args(&self.tool[1..])
            .args(["-p", &self.project, "-f"])
            .arg(self.root.join("docker-compose.yml"))
            .args(args)
            .current_dir(&self.root)
            .env("RAFTKV_PUBLISH_ADDR", "127.0.0.1");
        for (id, port) in &self.ports {
            cmd.env(format!("RAFTKV_NODE{id}_PORT"), port.to_string());
        }
        cmd
    }

    /// Runs a compose command that must succeed; its stdout.
    fn compose(&self, args: &[&str]) -> String {
        succeed(run_bounded(self.compose_command(args), COMMAND_TIMEOUT_MS))
    }

    fn container(&self, id: u64) -> &str {
        &self.containers[&id]
    }

    fn url(&self, id: u64) -> String {
        format!("http://127.0.0.1:{}", self.ports[&id])
    }

    /// A client over the given nodes' published ports.
    fn client(&self, ids: &[u64]) -> Client {
        let mut config = ClientConfig::new(ids.iter().map(|id| self.url(*id)).collect());
        config.retry_budget_ms = 20_000;
        Client::new(config).unwrap()
    }

    /// One read through node `id` alone; the value, `None` for a missing key.
    async fn read(&self, id: u64, key: &str, consistency: Consistency) -> Option<String> {
        let got = self.client(&[id]).get(key, consistency).await;
        let got =
            got.unwrap_or_else(|e| panic!("{consistency:?} read of {key} via node {id}: {e}"));
        got.map(|r| r.value)
    }

    async fn status(&self, id: u64) -> Option<ClusterStatus> {
        self.client(&[id]).status_of(&self.url(id)).await.ok()
    }

    fn peer_network(&self) -> String {
        format!("{}_peers", self.project)
    }

    fn logs(&self) -> String {
        match run_bounded(self.compose_command(&["logs", "--no-color"]), 60_000) {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(e) => e,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            say(&format!(
                "the test failed; the containers' logs:\n{}",
                self.logs()
            ));
        }
        let down = self.compose_command(&["down", "-v", "--remove-orphans", "--timeout", "20"]);
        match run_bounded(down, 120_000) {
            Ok(out) if out.status.success() => say(&format!("{}: down -v", self.project)),
            Ok(out) => say(&format!(
                "{}: down -v failed: {}",
                self.project,
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(e) => say(&format!("{}: down -v: {e}", self.project)),
        }
    }
}

/// The stdout of a command that must have run and succeeded.
fn succeed(result: Result<Output, String>) -> String {
    let out = result.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn docker(args: &[&str]) -> String {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    succeed(run_bounded(cmd, COMMAND_TIMEOUT_MS))
}

async fn wait_for<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_millis(WAIT_MS);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The leader as the given nodes agree on it: one of them says it leads, and every one of
/// them names it.
async fn leader_of(cluster: &Cluster, ids: &[u64]) -> u64 {
    wait_for(&format!("a leader among {ids:?}"), async || {
        let mut named = Vec::new();
        for id in ids {
            named.push(cluster.status(*id).await?.leader?.id);
        }
        let leader = named[0];
        (ids.contains(&leader) && named.iter().all(|l| *l == leader)).then_some(leader)
    })
    .await
}

/// Waits until every given node answers `/ready` 200.
async fn ready(cluster: &Cluster, ids: &[u64]) {
    for id in ids {
        let client = cluster.client(&[*id]);
        wait_for(&format!("node {id} ready"), async || {
            client.ready_of(&cluster.url(*id)).await.ok()
        })
        .await;
    }
}

/// Waits until node `id` has applied everything `leader` has committed now.
async fn caught_up(cluster: &Cluster, id: u64, leader: u64) {
    let commit = cluster
        .status(leader)
        .await
        .expect("leader status")
        .commit_index;
    wait_for(&format!("node {id} to apply {commit}"), async || {
        let s = cluster.status(id).await?;
        (s.applied_index >= commit).then_some(())
    })
    .await;
}

/// Every write's outcome, by key (each key is written once).
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<String, String>,
    /// Writes whose outcome is unknown: absent, or holding this value.
    maybe: BTreeMap<String, String>,
}

impl Ledger {
    /// Writes `key` through `client`; true if acknowledged. Unavailable means not applied.
    async fn put(&mut self, client: &Client, key: &str, value: &str) -> bool {
        match client.put(key, value).await {
            Ok(_) => {
                self.acked.insert(key.into(), value.into());
                true
            }
            Err(ClientError::OutcomeUnknown(why)) => {
                say(&format!("{key}: outcome unknown ({why})"));
                self.maybe.insert(key.into(), value.into());
                false
            }
            Err(ClientError::Unavailable(why)) => {
                say(&format!("{key}: unavailable ({why})"));
                false
            }
            Err(e) => panic!("{key}: {e}"),
        }
    }

    /// Writes `count` keys `{prefix}/NNN` through `client`; all must be acknowledged.
    async fn put_all(&mut self, client: &Client, prefix: &str, count: usize) {
        for i in 0..count {
            let key = format!("{prefix}/{i:03}");
            assert!(
                self.put(client, &key, &format!("{prefix}-{i}")).await,
                "{key} was not acknowledged"
            );
        }
    }
}

/// Every node holds every acknowledged write (stale reads once it has caught up with the
/// leader), and an unknown one only with its value; a linearizable read through every node
/// sees the last acknowledged write.
async fn check_every_node(cluster: &Cluster, ledger: &Ledger) {
    let leader = leader_of(cluster, &NODES).await;
    for id in NODES {
        caught_up(cluster, id, leader).await;
        let client = cluster.client(&[id]);
        let got: BTreeMap<String, String> = client
            .list("", 100_000, Consistency::Stale)
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect();
        let missing: Vec<&String> = ledger
            .acked
            .iter()
            .filter(|(k, v)| got.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        assert!(
            missing.is_empty(),
            "node {id} lacks {} of {} acknowledged writes: {missing:?}",
            missing.len(),
            ledger.acked.len()
        );
        for (k, v) in &ledger.maybe {
            let held = got.get(k);
            assert!(
                held.is_none() || held == Some(v),
                "node {id}: {k} = {held:?}"
            );
        }
        let (last_key, last_value) = ledger.acked.iter().next_back().expect("writes");
        assert_eq!(
            cluster
                .read(id, last_key, Consistency::Linearizable)
                .await
                .as_deref(),
            Some(last_value.as_str()),
            "present"
        );
    }
    say(&format!(
        "every node holds all {} acknowledged writes ({} unknown outcomes consistent)",
        ledger.acked.len(),
        ledger.maybe.len()
    ));
}

/// Builds the binary and the image, starts the project and learns its container ids.
fn build_and_up(cluster: &mut Cluster) {
    let started = Instant::now();
    let mut build = Command::new(cluster.root.join("tools/docker/build.sh"));
    build.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    let status = run_bounded(build, BUILD_TIMEOUT_MS).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        status.status.success(),
        "tools/docker/build.sh: {}",
        status.status
    );
    say(&format!(
        "build.sh took {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let started = Instant::now();
    cluster.compose(&["up", "--build", "-d"]);
    say(&format!(
        "project {} up in {:.1} s; client ports {:?}",
        cluster.project,
        started.elapsed().as_secs_f64(),
        cluster.ports
    ));
    for id in NODES {
        let ps = cluster.compose(&["ps", "-q", &format!("node{id}")]);
        let container = ps.trim().to_string();
        assert!(!container.is_empty(), "no container for node{id}");
        cluster.containers.insert(id, container);
    }
    let size = docker(&["image", "inspect", "-f", "{{.Size}}", "raftkv:local"]);
    let user = docker(&["image", "inspect", "-f", "{{.Config.User}}", "raftkv:local"]);
    say(&format!(
        "image raftkv:local: {} bytes, user {}",
        size.trim(),
        user.trim()
    ));
    let uid = user
        .trim()
        .split(':')
        .next()
        .and_then(|u| u.parse::<u32>().ok());
    assert!(
        uid.is_some_and(|uid| uid > 0),
        "the image must run as a numeric non-root user"
    );
}

/// Point 1: a write through node 1 is read through node 3.
async fn write_through_one_read_through_three(cluster: &Cluster, ledger: &mut Ledger) {
    ready(cluster, &NODES).await;
    assert!(
        ledger
            .put(&cluster.client(&[1]), "first", "via-node-1")
            .await
    );
    assert_eq!(
        cluster
            .read(3, "first", Consistency::Linearizable)
            .await
            .as_deref(),
        Some("via-node-1"),
        "present"
    );
    say("wrote through node 1, read through node 3");
}

/// Point 2: SIGKILL the leader's container; writes go on; restarted, it catches up.
async fn kill_the_leader(cluster: &Cluster, ledger: &mut Ledger) {
    let leader = leader_of(cluster, &NODES).await;
    let rest: Vec<u64> = NODES.into_iter().filter(|id| *id != leader).collect();
    docker(&["kill", cluster.container(leader)]);
    say(&format!("killed node {leader}'s container (SIGKILL)"));
    ledger
        .put_all(&cluster.client(&rest), "after-kill", 20)
        .await;
    let new_leader = leader_of(cluster, &rest).await;
    say(&format!("20 writes acknowledged; node {new_leader} leads"));
    docker(&["start", cluster.container(leader)]);
    ready(cluster, &[leader]).await;
    caught_up(cluster, leader, new_leader).await;
    assert_eq!(
        cluster
            .read(leader, "after-kill/019", Consistency::Stale)
            .await
            .as_deref(),
        Some("after-kill-19"),
        "caught up"
    );
    say(&format!("node {leader} restarted and caught up"));
}

/// Point 3: cut the leader off the peer network; the majority serves, it does not; it comes
/// back and catches up.
async fn partition_the_leader(cluster: &Cluster, ledger: &mut Ledger) {
    let isolated = leader_of(cluster, &NODES).await;
    let majority: Vec<u64> = NODES.into_iter().filter(|id| *id != isolated).collect();
    docker(&[
        "network",
        "disconnect",
        &cluster.peer_network(),
        cluster.container(isolated),
    ]);
    say(&format!(
        "node {isolated} (the leader) cut off the peer network"
    ));
    let new_leader = leader_of(cluster, &majority).await;
    ledger
        .put_all(&cluster.client(&majority), "partitioned", 20)
        .await;
    for id in &majority {
        assert_eq!(
            cluster
                .read(*id, "partitioned/019", Consistency::Linearizable)
                .await
                .as_deref(),
            Some("partitioned-19"),
            "present"
        );
    }
    say(&format!(
        "the majority {majority:?} (node {new_leader} leads) serves writes and linearizable reads"
    ));
    refuses_while_isolated(cluster, isolated, ledger).await;
    let alias = format!("node{isolated}-peer");
    docker(&[
        "network",
        "connect",
        "--alias",
        &alias,
        &cluster.peer_network(),
        cluster.container(isolated),
    ]);
    ready(cluster, &[isolated]).await;
    caught_up(cluster, isolated, leader_of(cluster, &NODES).await).await;
    assert_eq!(
        cluster
            .read(isolated, "partitioned/019", Consistency::Stale)
            .await
            .as_deref(),
        Some("partitioned-19"),
        "caught up"
    );
    say(&format!("node {isolated} reconnected and caught up"));
}

/// The isolated node answers on its client port, but neither a write nor a linearizable
/// read succeeds there.
async fn refuses_while_isolated(cluster: &Cluster, isolated: u64, ledger: &mut Ledger) {
    raftkv::tls::ensure_provider();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = cluster.url(isolated);
    let put = http
        .put(format!("{url}/kv/isolated-put"))
        .json(&serde_json::json!({"value": "must-not-be-acknowledged"}))
        .send()
        .await
        .expect("the isolated node answers on its client port");
    let put_status = put.status().as_u16();
    assert_ne!(put_status, 200, "a write was served by the isolated node");
    // A 504 may have left the write in the old leader's log: it must then be overwritten.
    ledger
        .maybe
        .insert("isolated-put".into(), "must-not-be-acknowledged".into());
    let get = http
        .get(format!("{url}/kv/first?consistency=linearizable"))
        .send()
        .await
        .expect("the isolated node answers on its client port");
    let get_status = get.status().as_u16();
    assert_ne!(
        get_status, 200,
        "a linearizable read was served by the isolated node"
    );
    let stale = http
        .get(format!("{url}/kv/first?consistency=stale"))
        .send()
        .await;
    assert_eq!(
        stale.map(|r| r.status().as_u16()).ok(),
        Some(200),
        "stale reads are local"
    );
    say(&format!(
        "node {isolated} while isolated: PUT {put_status}, linearizable GET {get_status}, stale GET 200"
    ));
}

/// A graceful stop of every node (each exits 0 within the grace period), then a start.
async fn stop_and_start(cluster: &Cluster) {
    let started = Instant::now();
    cluster.compose(&["stop"]);
    let took = started.elapsed();
    for id in NODES {
        let code = docker(&[
            "inspect",
            "-f",
            "{{.State.ExitCode}}",
            cluster.container(id),
        ]);
        assert_eq!(
            code.trim(),
            "0",
            "node {id} did not stop cleanly on SIGTERM"
        );
    }
    say(&format!(
        "compose stop: every node exited 0, in {:.1} s",
        took.as_secs_f64()
    ));
    cluster.compose(&["start"]);
    ready(cluster, &NODES).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_cluster_survives_a_killed_leader_and_a_partition() {
    let tool = match compose_tool() {
        Ok(tool) => tool,
        Err(why) => {
            say(&format!("SKIPPED: {why}"));
            return;
        }
    };
    let started = Instant::now();
    let mut cluster = Cluster::new(tool);
    say(&format!(
        "using `{}`, project {}",
        cluster.tool.join(" "),
        cluster.project
    ));
    build_and_up(&mut cluster);
    let scenario = Instant::now();
    let mut ledger = Ledger::default();
    write_through_one_read_through_three(&cluster, &mut ledger).await;
    kill_the_leader(&cluster, &mut ledger).await;
    partition_the_leader(&cluster, &mut ledger).await;
    check_every_node(&cluster, &ledger).await;
    stop_and_start(&cluster).await;
    check_every_node(&cluster, &ledger).await;
    say(&format!(
        "scenario {:.1} s, whole test {:.1} s",
        scenario.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
}
