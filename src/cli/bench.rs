//! `raftkv bench`: load against a running cluster; `bench recovery` and `bench failover`
//! against local clusters it starts itself in a temp dir.

use super::local::{free_port_base, nodes, terminate, LocalNode};
use anyhow::{bail, Context};
use raftkv::api::Consistency;
use raftkv::bench::{run_load, LoadOptions, LoadReport, Stop, Workload};
use raftkv::client::{Client, ClientConfig, DEFAULT_ENDPOINTS};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::process::{Child, ExitCode};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub kind: Option<BenchKind>,
    #[command(flatten)]
    pub load: LoadArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchKind {
    /// Time from SIGKILL to /ready for a node with N entries, and a follower's catch-up.
    Recovery(RecoveryArgs),
    /// Time from killing the leader to the first successful write.
    Failover(FailoverArgs),
    /// Add a learner to a loaded cluster, promote it, remove the leader: catch-up time and
    /// the write latency alongside.
    Membership(super::bench_membership::MembershipArgs),
    /// Watch delivery latency (leader commit → event at a follower's watcher) under a write
    /// load, and the memory of many idle watchers.
    Watch(super::bench_watch::WatchBenchArgs),
}

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    #[arg(long, env = "RAFTKV_ENDPOINTS", default_value = DEFAULT_ENDPOINTS, value_name = "URL,...")]
    pub endpoints: String,
    /// Concurrent clients (each its own connections).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// How long to run, e.g. 10s, 500ms, 2m (default 10s unless --requests).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many requests instead.
    #[arg(long, conflicts_with = "duration")]
    pub requests: Option<u64>,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    #[arg(long, default_value_t = 100_000)]
    pub key_space: u64,
    /// put, get, mixed:READ_PERCENT, cas (conditional puts that succeed: each client
    /// owns a key and sends the mod_revision its last write returned) or txn10 (one
    /// transaction of 10 puts to random keys per request).
    #[arg(long, default_value = "put", value_parser = Workload::parse)]
    pub workload: Workload,
    #[arg(long, default_value = "linearizable", value_parser = |s: &str| Consistency::parse(s).ok_or_else(|| format!("unknown consistency {s:?}")))]
    pub consistency: Consistency,
    /// Offer this many requests per second in total (open loop); default closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Send writes without exactly-once sessions (the client's default is with).
    #[arg(long)]
    pub no_sessions: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RecoveryArgs {
    /// Entries to write before the kill.
    #[arg(long, default_value_t = 100_000)]
    pub entries: u64,
    /// Compact every K entries; 0 means never.
    #[arg(long, default_value_t = 10_000)]
    pub snapshot_every: u64,
    /// Skip the follower catch-up measurement.
    #[arg(long)]
    pub skip_catchup: bool,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct FailoverArgs {
    #[arg(long, default_value_t = 10)]
    pub trials: u32,
    #[arg(long)]
    pub json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s or m")),
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("duration {s:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Prints `report` as pretty JSON, or as the text `render` makes of it.
pub(super) fn emit<T: Serialize>(
    json: bool,
    report: &T,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, report)?;
        writeln!(out)?;
    } else {
        out.write_all(render(report).as_bytes())?;
    }
    Ok(())
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    match &args.kind {
        Some(BenchKind::Recovery(r)) => recovery(r),
        Some(BenchKind::Failover(f)) => failover(f),
        Some(BenchKind::Membership(m)) => super::bench_membership::membership(m),
        Some(BenchKind::Watch(w)) => super::bench_watch::watch(w),
        None => load(&args.load),
    }
}

fn load(a: &LoadArgs) -> anyhow::Result<ExitCode> {
    let opts = LoadOptions {
        endpoints: ClientConfig::parse_endpoints(&a.endpoints)
            .map_err(|e| super::UsageError(e.to_string()))?,
        clients: a.clients,
        stop: match (a.requests, a.duration) {
            (Some(n), _) => Stop::Requests(n),
            (None, Some(d)) => Stop::After(d),
            (None, None) => Stop::After(Duration::from_secs(10)),
        },
        value_bytes: a.value_size,
        key_space: a.key_space,
        workload: a.workload,
        consistency: a.consistency,
        rate: a.rate,
        seed: a.seed,
        retry_budget_ms: 15_000,
        sessions: !a.no_sessions,
    };
    let show = !a.json && std::io::stderr().is_terminal();
    let report = runtime()?.block_on(run_load(opts, show))?;
    emit(a.json, &report, render_load)?;
    Ok(ExitCode::SUCCESS)
}

/// The text form of a load report.
pub fn render_load(r: &LoadReport) -> String {
    format!(
        "workload {} | clients {} | {}\n\
         ok {} in {:.2} s = {:.0} ops/s\n\
         errors: unavailable {}, outcome unknown {}, rejected {}, condition failed {}, \
         other {}\n\
         latency ms: p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}\n",
        r.workload,
        r.clients,
        r.rate.map_or("closed loop".to_string(), |x| format!(
            "open loop at {x} req/s"
        )),
        r.ok,
        r.elapsed_s,
        r.throughput_ops_s,
        r.errors.unavailable,
        r.errors.outcome_unknown,
        r.errors.rejected,
        r.errors.condition_failed,
        r.errors.other,
        r.latency.p50_ms,
        r.latency.p90_ms,
        r.latency.p99_ms,
        r.latency.p999_ms,
        r.latency.max_ms,
        r.latency.mean_ms
    )
}

/// Children that are killed when dropped, so a failed benchmark leaves nothing running.
pub(super) struct Procs(Vec<(LocalNode, Option<Child>)>);

impl Procs {
    pub(super) fn start(specs: Vec<LocalNode>) -> anyhow::Result<Procs> {
        let mut p = Procs(specs.into_iter().map(|s| (s, None)).collect());
        for i in 0..p.0.len() {
            p.start_one(i)?;
        }
        Ok(p)
    }
    /// Starts one more node (killed on drop like the rest).
    pub(super) fn start_extra(&mut self, spec: LocalNode) -> anyhow::Result<()> {
        self.0.push((spec, None));
        self.start_one(self.0.len() - 1)
    }
    fn start_one(&mut self, i: usize) -> anyhow::Result<()> {
        let child = self.0[i].0.spawn()?;
        self.0[i].1 = Some(child);
        Ok(())
    }
    /// The process id of node `i`, if it runs.
    pub(super) fn pid(&self, i: usize) -> Option<u32> {
        self.0[i].1.as_ref().map(Child::id)
    }
    fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.0[i].1.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.0[i].1.take() {
            let _ = terminate(&mut c, Duration::from_secs(10));
        }
    }
    pub(super) fn urls(&self) -> Vec<String> {
        self.0.iter().map(|(s, _)| s.url()).collect()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for i in 0..self.0.len() {
            self.kill9(i);
        }
    }
}

pub(super) async fn wait_ready(url: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()?;
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{url}/ready")).send().await {
            if r.status().is_success() {
                return Ok(started.elapsed());
            }
        }
        if started.elapsed() > timeout {
            bail!("{url} not ready within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(super) async fn leader_index(client: &Client, urls: &[String]) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (i, u) in urls.iter().enumerate() {
            if let Ok(s) = client.status_of(u).await {
                if s.role == "leader" {
                    return Ok(i);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("no leader within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fill(urls: Vec<String>, entries: u64, value_size: usize, key_space: u64) -> LoadOptions {
    LoadOptions {
        endpoints: urls,
        clients: 64,
        stop: Stop::Requests(entries),
        value_bytes: value_size,
        key_space,
        workload: Workload::Put,
        consistency: Consistency::Linearizable,
        rate: None,
        seed: 42,
        retry_budget_ms: 30_000,
        sessions: true,
    }
}

#[derive(Serialize)]
struct RecoveryReport {
    entries: u64,
    snapshot_every: Option<u64>,
    write_ops_s: f64,
    restart_to_ready_ms: f64,
    /// The node's resident memory once the writes are applied (before the kill), and once
    /// it is ready again after the restart.
    rss_after_writes_mib: f64,
    rss_after_restart_mib: f64,
    catchup: Option<CatchupReport>,
}

#[derive(Serialize)]
struct CatchupReport {
    keys: u64,
    follower_catchup_ms: f64,
    follower_snapshot_index: u64,
}

fn recovery(a: &RecoveryArgs) -> anyhow::Result<ExitCode> {
    let root = tempfile::tempdir().context("cannot create a temp dir")?;
    let snapshot_every = (a.snapshot_every > 0).then_some(a.snapshot_every);
    let say = |m: &str| {
        if !a.json {
            eprintln!("{m}");
        }
    };
    let rt = runtime()?;
    // 1. One node: write, SIGKILL, restart, time to /ready.
    let base = free_port_base(4)?;
    let mut spec = nodes(1, base, base + 2, root.path(), "bench-recovery").remove(0);
    spec.snapshot_every = Some(snapshot_every.unwrap_or(1 << 62));
    let mut procs = Procs::start(vec![spec])?;
    let url = procs.urls()[0].clone();
    let (write_ops_s, restart, rss_mib) = rt.block_on(async {
        wait_ready(&url, Duration::from_secs(30)).await?;
        say(&format!(
            "writing {} entries of {} bytes…",
            a.entries, a.value_size
        ));
        let r = run_load(
            fill(vec![url.clone()], a.entries, a.value_size, a.entries),
            !a.json && std::io::stderr().is_terminal(),
        )
        .await?;
        // Let the last applies and the allocator settle before reading the memory.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_writes = node_rss_mib(&procs)?;
        say(&format!(
            "wrote at {:.0} entries/s (RSS {rss_writes:.0} MiB); SIGKILL and restart",
            r.throughput_ops_s
        ));
        procs.kill9(0);
        let started = Instant::now();
        procs.start_one(0)?;
        wait_ready(&url, Duration::from_secs(600)).await?;
        let restart = started.elapsed();
        let rss_restart = node_rss_mib(&procs)?;
        anyhow::Ok((r.throughput_ops_s, restart, (rss_writes, rss_restart)))
    })?;
    drop(procs);
    say(&format!(
        "restart to ready: {:.1} ms",
        restart.as_secs_f64() * 1e3
    ));
    // 2. Three nodes: a stopped follower catches up by snapshot on an `entries`-key state.
    let catchup = if a.skip_catchup {
        None
    } else {
        let base = free_port_base(8)?;
        let specs: Vec<LocalNode> = nodes(
            3,
            base,
            base + 4,
            &root.path().join("catchup"),
            "bench-catchup",
        )
        .into_iter()
        .map(|mut s| {
            // Compact often and keep a small margin, so the follower must take a snapshot.
            s.snapshot_every = Some(a.snapshot_every.clamp(100, (a.entries / 4).max(100)));
            s.catchup_margin = Some(10);
            s
        })
        .collect();
        let mut procs = Procs::start(specs)?;
        let urls = procs.urls();
        let report = rt.block_on(async {
            let client = Client::new(ClientConfig::new(urls.clone()))?;
            let leader = leader_index(&client, &urls).await?;
            let follower = (0..3).find(|i| *i != leader).unwrap_or(0);
            procs.stop(follower);
            say(&format!(
                "follower {} stopped; writing {} keys…",
                follower + 1,
                a.entries
            ));
            let mut others = urls.clone();
            others.remove(follower);
            run_load(
                fill(others, a.entries, a.value_size, u64::MAX),
                !a.json && std::io::stderr().is_terminal(),
            )
            .await?;
            let commit = client.status_of(&urls[leader]).await?.commit_index;
            let started = Instant::now();
            procs.start_one(follower)?;
            let deadline = started + Duration::from_secs(1800);
            let snapshot_index = loop {
                if let Ok(s) = client.status_of(&urls[follower]).await {
                    if s.applied_index >= commit {
                        break s.snapshot_index;
                    }
                }
                if Instant::now() > deadline {
                    bail!("the follower did not catch up within 30 minutes");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            anyhow::Ok(CatchupReport {
                keys: a.entries,
                follower_catchup_ms: started.elapsed().as_secs_f64() * 1e3,
                follower_snapshot_index: snapshot_index,
            })
        })?;
        say(&format!(
            "follower catch-up: {:.1} ms (snapshot at {})",
            report.follower_catchup_ms, report.follower_snapshot_index
        ));
        Some(report)
    };
    let report = RecoveryReport {
        entries: a.entries,
        snapshot_every,
        write_ops_s,
        restart_to_ready_ms: restart.as_secs_f64() * 1e3,
        rss_after_writes_mib: rss_mib.0,
        rss_after_restart_mib: rss_mib.1,
        catchup,
    };
    emit(a.json, &report, |r| {
        let mut text = format!(
            "entries {} | snapshot every {} | restart to ready {:.1} ms | RSS {:.0} MiB after \
             the writes, {:.0} MiB after the restart\n",
            r.entries,
            r.snapshot_every
                .map_or("never".to_string(), |k| k.to_string()),
            r.restart_to_ready_ms,
            r.rss_after_writes_mib,
            r.rss_after_restart_mib
        );
        if let Some(c) = &r.catchup {
            text.push_str(&format!(
                "follower catch-up by snapshot on {} keys: {:.1} ms\n",
                c.keys, c.follower_catchup_ms
            ));
        }
        text
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Resident memory of the one node of the recovery run.
fn node_rss_mib(procs: &Procs) -> anyhow::Result<f64> {
    let pid = procs.pid(0).context("the node is not running")?;
    super::bench_watch::rss_mib(pid)
}

#[derive(Serialize)]
struct FailoverReport {
    trials: Vec<f64>,
    median_ms: f64,
    p90_ms: f64,
    max_ms: f64,
}

fn failover(a: &FailoverArgs) -> anyhow::Result<ExitCode> {
    if a.trials == 0 {
        return Err(super::UsageError("--trials must be at least 1".into()).into());
    }
    let root = tempfile::tempdir().context("cannot create a temp dir")?;
    let base = free_port_base(8)?;
    let mut procs = Procs::start(nodes(3, base, base + 4, root.path(), "bench-failover"))?;
    let urls = procs.urls();
    let rt = runtime()?;
    let mut trials = Vec::new();
    rt.block_on(async {
        let client = Client::new(ClientConfig::new(urls.clone()))?;
        // One pass over the endpoints per attempt: the loop below does the retrying.
        let mut quick = ClientConfig::new(urls.clone());
        quick.retry_budget_ms = 1;
        quick.request_timeout_ms = 1000;
        let quick = Client::new(quick)?;
        for t in 0..a.trials {
            let leader = leader_index(&client, &urls).await?;
            client.put("failover-warmup", "x").await?;
            procs.kill9(leader);
            let killed = Instant::now();
            let mut n = 0u64;
            loop {
                n += 1;
                if quick.put(&format!("failover-{t}-{n}"), "x").await.is_ok() {
                    break;
                }
                if killed.elapsed() > Duration::from_secs(60) {
                    bail!("no write succeeded within 60 s of killing the leader");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let ms = killed.elapsed().as_secs_f64() * 1e3;
            if !a.json {
                eprintln!(
                    "trial {}: killed node {}, first write after {ms:.1} ms",
                    t + 1,
                    leader + 1
                );
            }
            trials.push(ms);
            procs.start_one(leader)?;
            wait_ready(&urls[leader], Duration::from_secs(60)).await?;
            // Let the cluster settle before the next kill: a node that just restarted ignores
            // vote requests for its first election timeout (it cannot know it did not promise
            // a leader its lease), so a kill right after a restart measures two failures.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        anyhow::Ok(())
    })?;
    let mut sorted = trials.clone();
    sorted.sort_by(|x, y| x.total_cmp(y));
    let pick = |q: f64| sorted[((sorted.len() as f64 - 1.0) * q).round() as usize];
    let report = FailoverReport {
        median_ms: pick(0.5),
        p90_ms: pick(0.9),
        max_ms: pick(1.0),
        trials,
    };
    emit(a.json, &report, |r| {
        format!(
            "failover over {} trials: median {:.1} ms, p90 {:.1} ms, max {:.1} ms\n",
            r.trials.len(),
            r.median_ms,
            r.p90_ms,
            r.max_ms
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("x").is_err());
    }
}
