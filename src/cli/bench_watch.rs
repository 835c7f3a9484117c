//! `raftkv bench watch`: what watches cost — delivery latency under a write load, and the
//! memory of many idle watchers.
//!
//! Three local nodes. **Latency:** one watcher of prefix `w/` on each follower and one on the
//! leader; writers send `--rate` puts per second (open loop, spread over `--writers`
//! connections, each key unique) straight to the leader for `--duration-s`. For each key the
//! bench records when it sent the put, when the leader acknowledged it, and when each watcher
//! received the event. The leader acknowledges a put after it committed and applied it, so
//! `follower event − ack` is a lower bound of "commit on the leader → event at a follower's
//! watcher" and `follower event − send` an upper bound; both are reported (negative values,
//! an event that beat its own acknowledgement, count as 0). A commit needs one follower's
//! fsync, so of the two followers one usually has the entry durable when it commits and the
//! other may still be syncing it: both are reported, and the first of the two per write.
//! The watchers read on threads of their own with blocking sockets, so an event's time is not
//! the bench's own scheduling of 64 writer tasks.
//! **Idle watchers:** the follower's resident memory (`VmRSS`) is read, `--idle-watchers`
//! watch streams (one connection each, one key each) are opened to it and left idle, and the
//! memory is read again once they are all open and have had a progress line.

use super::bench::{emit, leader_index, runtime, wait_ready, Procs};
use super::local::{free_port_base, nodes};
use anyhow::{bail, Context};
use raftkv::client::{percent_encode, Client, ClientConfig};
use serde::Serialize;
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, clap::Args)]
pub struct WatchBenchArgs {
    /// Puts per second offered to the leader (open loop).
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Connections the puts are spread over.
    #[arg(long, default_value_t = 64)]
    pub writers: usize,
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Idle watch streams opened to one follower for the memory figure (0: skip).
    #[arg(long, default_value_t = 10_000)]
    pub idle_watchers: usize,
    #[arg(long)]
    pub json: bool,
}

/// Milliseconds at percentiles.
#[derive(Debug, Default, Serialize)]
pub struct Dist {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

fn dist(mut v: Vec<f64>) -> Dist {
    if v.is_empty() {
        return Dist::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    Dist {
        count: v.len(),
        p50_ms: at(0.50),
        p90_ms: at(0.90),
        p99_ms: at(0.99),
        max_ms: v[v.len() - 1],
    }
}

#[derive(Debug, Serialize)]
struct WatchReport {
    offered_rate: f64,
    achieved_writes_s: f64,
    acked: usize,
    failed: usize,
    /// Events the follower's watcher received of acknowledged writes.
    follower_events: usize,
    /// Follower watcher: event − leader's acknowledgement (lower bound of commit → event).
    follower_after_ack: Dist,
    /// Follower watcher: event − send (upper bound of commit → event).
    follower_after_send: Dist,
    /// The other follower's watcher: event − leader's acknowledgement.
    other_follower_after_ack: Dist,
    /// Whichever follower had the event first: event − leader's acknowledgement. A commit
    /// needs one follower's fsync; the other may still be syncing its copy.
    first_follower_after_ack: Dist,
    /// Leader watcher: event − send.
    leader_after_send: Dist,
    /// The write's own latency: acknowledgement − send.
    write_latency: Dist,
    idle_watchers: usize,
    rss_before_mib: f64,
    rss_after_mib: f64,
    rss_per_watcher_kib: f64,
}

/// When each key's put was sent and acknowledged.
type Sent = Arc<Mutex<HashMap<String, (Instant, Option<Instant>)>>>;
/// When each key's event arrived.
type Arrived = Arc<Mutex<HashMap<String, Instant>>>;

pub fn watch(a: &WatchBenchArgs) -> anyhow::Result<ExitCode> {
    if a.rate <= 0.0 || a.writers == 0 || a.duration_s == 0 {
        return Err(super::UsageError(
            "--rate, --writers and --duration-s must be positive".into(),
        )
        .into());
    }
    let root = tempfile::tempdir().context("cannot create a temp dir")?;
    let base = free_port_base(8)?;
    let mut specs = nodes(3, base, base + 4, root.path(), "bench-watch");
    let conns = (a.idle_watchers + 2048).to_string();
    for s in &mut specs {
        s.extra_args = vec!["--client-connections-max".into(), conns.clone()];
    }
    let procs = Procs::start(specs)?;
    let urls = procs.urls();
    let rt = runtime()?;
    let report = rt.block_on(async {
        for u in &urls {
            wait_ready(u, Duration::from_secs(30)).await?;
        }
        let client = Client::new(ClientConfig::new(urls.clone()))?;
        let leader = leader_index(&client, &urls).await?;
        let follower = (leader + 1) % urls.len();
        let other = (leader + 2) % urls.len();
        let follower_pid = procs.pid(follower).context("the follower is not running")?;
        let mut report = latency(a, &urls[leader], [&urls[follower], &urls[other]]).await?;
        if a.idle_watchers > 0 {
            idle(a, &urls[follower], follower_pid, &mut report).await?;
        }
        anyhow::Ok(report)
    })?;
    emit(a.json, &report, render)?;
    Ok(ExitCode::SUCCESS)
}

fn render(r: &WatchReport) -> String {
    let d = |name: &str, x: &Dist| {
        format!(
            "  {name:<34} p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms  (n={})\n",
            x.p50_ms, x.p90_ms, x.p99_ms, x.max_ms, x.count
        )
    };
    let mut s = format!(
        "offered {:.0} puts/s, achieved {:.0}/s ({} acked, {} failed); follower watcher got {} events\n",
        r.offered_rate, r.achieved_writes_s, r.acked, r.failed, r.follower_events
    );
    s += &d("follower event - ack (lower bound)", &r.follower_after_ack);
    s += &d("other follower event - ack", &r.other_follower_after_ack);
    s += &d("first follower event - ack", &r.first_follower_after_ack);
    s += &d(
        "follower event - send (upper bound)",
        &r.follower_after_send,
    );
    s += &d("leader event - send", &r.leader_after_send);
    s += &d("write latency (ack - send)", &r.write_latency);
    if r.idle_watchers > 0 {
        s += &format!(
            "{} idle watchers on a follower: RSS {:.1} MiB -> {:.1} MiB ({:.1} KiB per watcher)\n",
            r.idle_watchers, r.rss_before_mib, r.rss_after_mib, r.rss_per_watcher_kib
        );
    }
    s
}

/// Follows a watch stream of prefix `w/` on its own OS thread with a blocking socket,
/// recording each put's arrival as the read returns. A task on the bench's runtime would
/// share its two worker threads with the 64 writers, and an event's timestamp would then
/// measure the bench's own scheduling as much as the node's delivery.
fn follow(
    url: &str,
    arrived: Arrived,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    use std::io::Write;
    let addr = url.trim_start_matches("http://").to_string();
    let mut sock = std::net::TcpStream::connect(&addr)
        .with_context(|| format!("cannot connect a watcher to {addr}"))?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let req = format!("GET /watch?prefix=w%2F HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    sock.write_all(req.as_bytes())?;
    Ok(std::thread::spawn(move || {
        let mut chunks = ChunkedLines::default();
        let mut buf = vec![0u8; 256 << 10];
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let n = match std::io::Read::read(&mut sock, &mut buf) {
                Ok(0) => bail!("the watch stream of {addr} ended"),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
                Err(e) => return Err(e.into()),
            };
            let now = Instant::now();
            let mut arrived = arrived.lock().unwrap_or_else(|p| p.into_inner());
            chunks.feed(&buf[..n], |line| {
                if let Ok(raftkv::api::WatchEvent::Put(kv)) = serde_json::from_slice(line) {
                    arrived.insert(kv.key, now);
                }
            })?;
        }
        Ok(())
    }))
}

/// Splits a chunked HTTP/1.1 response (after its head) into NDJSON lines.
#[derive(Default)]
struct ChunkedLines {
    head_done: bool,
    /// Bytes received and not yet consumed.
    pending: Vec<u8>,
    /// Body bytes (chunk framing removed) not yet ending in a newline.
    line: Vec<u8>,
}

impl ChunkedLines {
    fn feed(&mut self, bytes: &[u8], mut on_line: impl FnMut(&[u8])) -> anyhow::Result<()> {
        self.pending.extend_from_slice(bytes);
        if !self.head_done {
            let Some(end) = find(&self.pending, b"\r\n\r\n") else {
                return Ok(());
            };
            if !self.pending.starts_with(b"HTTP/1.1 200") {
                bail!(
                    "watch refused: {}",
                    String::from_utf8_lossy(&self.pending[..end])
                );
            }
            self.pending.drain(..end + 4);
            self.head_done = true;
        }
        loop {
            let Some(eol) = find(&self.pending, b"\r\n") else {
                return Ok(());
            };
            let size_text = std::str::from_utf8(&self.pending[..eol])?;
            let size = usize::from_str_radix(size_text.trim(), 16)
                .with_context(|| format!("a chunk size of {size_text:?}"))?;
            if self.pending.len() < eol + 2 + size + 2 {
                return Ok(());
            }
            self.line
                .extend_from_slice(&self.pending[eol + 2..eol + 2 + size]);
            self.pending.drain(..eol + 2 + size + 2);
            while let Some(nl) = self.line.iter().position(|b| *b == b'\n') {
                on_line(&self.line[..nl]);
                self.line.drain(..=nl);
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn latency(
    a: &WatchBenchArgs,
    leader: &str,
    [follower, other]: [&str; 2],
) -> anyhow::Result<WatchReport> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let at_follower: Arrived = Arc::default();
    let at_other: Arrived = Arc::default();
    let at_leader: Arrived = Arc::default();
    let f = follow(follower, at_follower.clone(), stop.clone())?;
    let o = follow(other, at_other.clone(), stop.clone())?;
    let l = follow(leader, at_leader.clone(), stop.clone())?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent: Sent = Arc::default();
    let value = "v".repeat(a.value_size);
    let period = Duration::from_secs_f64(a.writers as f64 / a.rate);
    let started = Instant::now();
    let until = started + Duration::from_secs(a.duration_s);
    let mut tasks = Vec::new();
    for w in 0..a.writers {
        let (sent, value, leader) = (sent.clone(), value.clone(), leader.to_string());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + period.mul_f64(w as f64 / 64.0),
                period,
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut failed = 0usize;
            for n in 0u64.. {
                tick.tick().await;
                if Instant::now() >= until {
                    break;
                }
                let key = format!("w/{w}-{n}");
                let url = format!("{leader}/kv/{}", percent_encode(&key));
                let t0 = Instant::now();
                sent.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), (t0, None));
                let ok = http
                    .put(&url)
                    .json(&serde_json::json!({ "value": value }))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    let t1 = Instant::now();
                    sent.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, (t0, Some(t1)));
                } else {
                    failed += 1;
                }
            }
            failed
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap_or(0);
    }
    let elapsed = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (who, t) in [("follower", f), ("other follower", o), ("leader", l)] {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("the {who}'s watcher failed: {e:#}"),
            Err(_) => bail!("the {who}'s watcher panicked"),
        }
    }
    let take = |m: &Arrived| std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner()));
    let sent = std::mem::take(&mut *sent.lock().unwrap_or_else(|p| p.into_inner()));
    let arrived = [take(&at_follower), take(&at_other), take(&at_leader)];
    Ok(summarize(a.rate, &sent, &arrived, failed, elapsed))
}

/// The report from when each put was sent and acknowledged and when each watcher (follower,
/// other follower, leader) had its event.
fn summarize(
    offered_rate: f64,
    sent: &HashMap<String, (Instant, Option<Instant>)>,
    [at_f, at_o, at_l]: &[HashMap<String, Instant>; 3],
    failed: usize,
    elapsed_s: f64,
) -> WatchReport {
    let ms = |later: Instant, earlier: Instant| {
        later.saturating_duration_since(earlier).as_secs_f64() * 1e3
    };
    let (mut after_ack, mut after_send, mut leader_after_send, mut write) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut other_after_ack, mut first_after_ack) = (Vec::new(), Vec::new());
    let mut acked = 0;
    for (key, (t0, t1)) in sent {
        let Some(t1) = t1 else { continue };
        acked += 1;
        write.push(ms(*t1, *t0));
        let (tf, to) = (at_f.get(key), at_o.get(key));
        if let Some(tf) = tf {
            after_ack.push(ms(*tf, *t1));
            after_send.push(ms(*tf, *t0));
        }
        if let Some(to) = to {
            other_after_ack.push(ms(*to, *t1));
        }
        if let Some(first) = tf.into_iter().chain(to).min() {
            first_after_ack.push(ms(*first, *t1));
        }
        if let Some(tl) = at_l.get(key) {
            leader_after_send.push(ms(*tl, *t0));
        }
    }
    assert!(after_ack.len() <= acked && first_after_ack.len() <= acked);
    WatchReport {
        offered_rate,
        achieved_writes_s: acked as f64 / elapsed_s,
        acked,
        failed,
        follower_events: after_ack.len(),
        follower_after_ack: dist(after_ack),
        follower_after_send: dist(after_send),
        other_follower_after_ack: dist(other_after_ack),
        first_follower_after_ack: dist(first_after_ack),
        leader_after_send: dist(leader_after_send),
        write_latency: dist(write),
        idle_watchers: 0,
        rss_before_mib: 0.0,
        rss_after_mib: 0.0,
        rss_per_watcher_kib: 0.0,
    }
}

/// `VmRSS` of process `pid` in MiB.
pub(super) fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

/// Opens `a.idle_watchers` idle watch streams to `url` (plain HTTP/1.1 over TCP, one per
/// connection) and reads the node's memory before and after.
async fn idle(a: &WatchBenchArgs, url: &str, pid: u32, r: &mut WatchReport) -> anyhow::Result<()> {
    let addr = url.trim_start_matches("http://").to_string();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_mib(pid)?;
    let mut streams = Vec::with_capacity(a.idle_watchers);
    for i in 0..a.idle_watchers {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .with_context(|| format!("opening idle watcher {i}"))?;
        let req = format!("GET /watch?key=idle%2F{i} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut head = [0u8; 512];
        let n = s.read(&mut head).await?;
        if !head[..n].starts_with(b"HTTP/1.1 200") {
            bail!(
                "idle watcher {i}: {}",
                String::from_utf8_lossy(&head[..n])
                    .lines()
                    .next()
                    .unwrap_or("")
            );
        }
        streams.push(s);
    }
    // Every stream has sent a progress line by now: its state is warm.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = rss_mib(pid)?;
    r.idle_watchers = streams.len();
    r.rss_before_mib = before;
    r.rss_after_mib = after;
    r.rss_per_watcher_kib = (after - before) * 1024.0 / streams.len() as f64;
    drop(streams);
    Ok(())
}
