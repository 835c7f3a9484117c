//! `raftkv bench membership`: what a membership change costs on a loaded cluster.
//!
//! Three local nodes load `--keys` distinct keys; then, with an open-loop write load running
//! alongside, a fourth node is added as a learner (`POST /cluster/members`), started with
//! `--join` (it catches up by snapshot: the log was compacted long before), timed until it is
//! promotable (reachable and within the leader's promotion margin), promoted, and finally the
//! leader itself is removed. Reported: the learner's catch-up time, each step's latency and the
//! write load's latency distribution (p99.9, max) over the whole sequence — a stall of the
//! write path anywhere in it shows up there.

use super::bench::{emit, runtime, wait_ready, Procs};
use super::local::{free_port_base, nodes, LocalNode};
use anyhow::{bail, Context};
use raftkv::api::{ClusterStatus, Consistency};
use raftkv::bench::{run_load, LoadOptions, LoadReport, Stop, Workload};
use serde::Serialize;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct MembershipArgs {
    /// Distinct keys in the state before the new member is added.
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Compact every K entries (the learner then catches up by snapshot).
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_every: u64,
    /// The write load running alongside, in requests per second (open loop).
    #[arg(long, default_value_t = 1000.0)]
    pub load_rate: f64,
    /// How long the write load runs; the add → promote → remove sequence must fit in it.
    #[arg(long, default_value_t = 40)]
    pub load_s: u64,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct MembershipReport {
    keys: u64,
    fill_ops_s: f64,
    #[serde(flatten)]
    steps: Steps,
    /// The write load over the whole sequence.
    load: LoadReport,
}

/// How long each step of the sequence took.
#[derive(Serialize)]
struct Steps {
    /// `POST /cluster/members` (learner) until it answered.
    add_learner_ms: f64,
    /// From starting the new node (`serve --join`) until it is promotable.
    learner_catchup_ms: f64,
    promote_ms: f64,
    /// Removing the leader: until the change completed (a new leader took over).
    remove_leader_ms: f64,
}

pub fn membership(a: &MembershipArgs) -> anyhow::Result<ExitCode> {
    if a.keys == 0 || a.load_rate <= 0.0 {
        return Err(super::UsageError("--keys and --load-rate must be positive".into()).into());
    }
    let root = tempfile::tempdir().context("cannot create a temp dir")?;
    let base = free_port_base(10)?;
    let mut specs = nodes(3, base, base + 5, root.path(), "bench-membership");
    for s in &mut specs {
        s.snapshot_every = Some(a.snapshot_every);
    }
    let urls: Vec<String> = specs.iter().map(LocalNode::url).collect();
    let joiner = LocalNode {
        id: 4,
        client_port: base + 4,
        peer_port: base + 9,
        peers: Vec::new(),
        peer_client_ports: Vec::new(),
        data_dir: root.path().join("node4"),
        join: Some(urls.join(",")),
        ..specs[0].clone()
    };
    let mut procs = Procs::start(specs)?;
    let say = |m: &str| {
        if !a.json {
            eprintln!("{m}");
        }
    };
    let rt = runtime()?;
    let report = rt.block_on(async {
        for u in &urls {
            wait_ready(u, Duration::from_secs(30)).await?;
        }
        say(&format!("loading {} keys", a.keys));
        let fill = run_load(fill_options(&urls, a), false).await?;
        say(&format!("loaded at {:.0} writes/s", fill.throughput_ops_s));
        let load = tokio::spawn(run_load(load_options(&urls, a), false));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let steps = sequence(&mut procs, joiner, &urls, &say).await?;
        let load = load.await.context("the load task failed")??;
        anyhow::Ok(MembershipReport {
            keys: a.keys,
            fill_ops_s: fill.throughput_ops_s,
            steps,
            load,
        })
    })?;
    emit(a.json, &report, render)?;
    Ok(ExitCode::SUCCESS)
}

fn fill_options(urls: &[String], a: &MembershipArgs) -> LoadOptions {
    LoadOptions {
        endpoints: urls.to_vec(),
        clients: 64,
        stop: Stop::Requests(a.keys),
        value_bytes: a.value_size,
        key_space: a.keys,
        workload: Workload::Fill,
        consistency: Consistency::Linearizable,
        rate: None,
        seed: 42,
        retry_budget_ms: 30_000,
        sessions: true,
    }
}

fn load_options(urls: &[String], a: &MembershipArgs) -> LoadOptions {
    LoadOptions {
        clients: 32,
        stop: Stop::After(Duration::from_secs(a.load_s)),
        workload: Workload::Put,
        rate: Some(a.load_rate),
        seed: 7,
        ..fill_options(urls, a)
    }
}

/// Add a learner, start it with `--join`, wait until promotable, promote, remove the leader.
async fn sequence(
    procs: &mut Procs,
    joiner: LocalNode,
    urls: &[String],
    say: &impl Fn(&str),
) -> anyhow::Result<Steps> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let body = serde_json::json!({
        "id": joiner.id,
        "peer_addr": format!("127.0.0.1:{}", joiner.peer_port),
        "client_url": joiner.url(),
        "learner": true,
    });
    let t = Instant::now();
    let status = call(
        http.post(format!("{}/cluster/members", urls[0]))
            .json(&body),
    )
    .await?;
    let add_learner_ms = ms(t);
    say(&format!(
        "learner 4 added in {add_learner_ms:.0} ms (configuration index {})",
        status.membership.index
    ));
    let t = Instant::now();
    procs.start_extra(joiner)?;
    wait_promotable(&http, urls, 4).await?;
    let learner_catchup_ms = ms(t);
    say(&format!(
        "learner 4 promotable after {learner_catchup_ms:.0} ms"
    ));
    let t = Instant::now();
    let status = call(http.post(format!("{}/cluster/members/4/promote", urls[0]))).await?;
    let promote_ms = ms(t);
    let leader = status
        .leader
        .map(|l| l.id)
        .context("no leader after the promotion")?;
    say(&format!(
        "promoted in {promote_ms:.0} ms; removing the leader, node {leader}"
    ));
    let t = Instant::now();
    let other = urls
        .iter()
        .enumerate()
        .find(|(i, _)| *i as u64 + 1 != leader)
        .map(|(_, u)| u.clone())
        .context("a second node")?;
    call(http.delete(format!("{other}/cluster/members/{leader}"))).await?;
    let remove_leader_ms = ms(t);
    say(&format!("leader removed in {remove_leader_ms:.0} ms"));
    Ok(Steps {
        add_learner_ms,
        learner_catchup_ms,
        promote_ms,
        remove_leader_ms,
    })
}

/// Sends a membership request; anything but 200 is an error naming the answer.
async fn call(req: reqwest::RequestBuilder) -> anyhow::Result<ClusterStatus> {
    let r = req.send().await?;
    let code = r.status();
    let text = r.text().await?;
    if !code.is_success() {
        bail!("membership request answered {code}: {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

/// Polls the leader until `id` is reachable and within the promotion margin.
async fn wait_promotable(http: &reqwest::Client, urls: &[String], id: u64) -> anyhow::Result<()> {
    // The core's promotion margin, as `serve` configures it.
    let lag_max = raftkv::raft::Config::new(1).promote_lag_entries_max;
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        for u in urls {
            let Ok(r) = http.get(format!("{u}/cluster/status")).send().await else {
                continue;
            };
            let Ok(s) = r.json::<ClusterStatus>().await else {
                continue;
            };
            if s.role != "leader" {
                continue;
            }
            let m = s.members.iter().find(|m| m.id == id);
            let ready = m.is_some_and(|m| {
                m.reachable == Some(true)
                    && m.match_index.is_some_and(|i| i + lag_max >= s.last_index)
            });
            if ready {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("learner {id} not promotable within 300 s")
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn render(r: &MembershipReport) -> String {
    let (l, s) = (&r.load.latency, &r.steps);
    format!(
        "membership change on {} keys (filled at {:.0} writes/s):\n  add learner {:.0} ms; learner catch-up {:.0} ms; promote {:.0} ms; remove the leader {:.0} ms\n  write load alongside: {} ok, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; errors {:?}\n",
        r.keys,
        r.fill_ops_s,
        s.add_learner_ms,
        s.learner_catchup_ms,
        s.promote_ms,
        s.remove_leader_ms,
        r.load.ok,
        r.load.throughput_ops_s,
        l.p50_ms,
        l.p99_ms,
        l.p999_ms,
        l.max_ms,
        r.load.errors,
    )
}
