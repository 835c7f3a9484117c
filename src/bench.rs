//! The load generator behind `raftkv bench`: closed- or open-loop HTTP load through the Rust
//! client, latencies in an HDR histogram.
//!
//! - **Closed loop** (default): `clients` tasks, each with its own connection pool, issue the
//!   next request as soon as the previous one answers.
//! - **Open loop** (`rate`): a scheduler emits request start times at a fixed rate; the
//!   `clients` workers take them from a bounded queue, and each latency is measured from the
//!   **intended** start time, so a stall shows up in the latencies instead of silently slowing
//!   the offered load (no coordinated omission).
//!
//! Keys are drawn uniformly from `key_space` keys with a seeded generator; values are
//! `value_bytes` long. Errors are counted by kind, never retried blindly: the client itself
//! retries only what is safe (and resends writes under its exactly-once sessions unless
//! `sessions` is off).
//!
//! Beside plain puts and gets, two workloads measure what issue 11 costs: `cas`, conditional
//! puts that succeed (each client owns one key and sends the `mod_revision` its last write
//! returned, so no read is needed), and `txn10`, transactions of 10 puts to random keys.

use crate::api::{Consistency, TxnOp, TxnRequest};
use crate::client::{Client, ClientConfig, ClientError};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Put,
    Get,
    /// This percentage of requests are reads, the rest writes.
    Mixed {
        read_percent: u8,
    },
    /// Writes keys 0, 1, 2, ... once each (modulo `key_space`), across all clients: loads a
    /// state of `key_space` distinct keys in `key_space` requests.
    Fill,
    /// Conditional puts (`if_mod_revision`) that succeed: each client owns a key and tracks
    /// its `mod_revision`.
    Cas,
    /// One transaction of this many puts to random keys per request.
    Txn {
        puts: usize,
    },
}

impl Workload {
    /// Parses `put`, `get`, `fill`, `cas`, `txn10` or `mixed:READ_PERCENT`.
    pub fn parse(s: &str) -> Result<Workload, String> {
        match s {
            "put" => Ok(Workload::Put),
            "get" => Ok(Workload::Get),
            "fill" => Ok(Workload::Fill),
            "cas" => Ok(Workload::Cas),
            "txn10" => Ok(Workload::Txn { puts: 10 }),
            _ => {
                let pct = s.strip_prefix("mixed:").ok_or_else(|| {
                    format!(
                        "unknown workload {s:?}: use put, get, fill, cas, txn10 or \
                         mixed:READ_PERCENT"
                    )
                })?;
                let read_percent: u8 =
                    pct.parse().ok().filter(|p| *p <= 100).ok_or_else(|| {
                        format!("mixed:{pct}: the read percentage must be 0..=100")
                    })?;
                Ok(Workload::Mixed { read_percent })
            }
        }
    }
}

/// When to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    After(Duration),
    Requests(u64),
}

/// A load to run.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub endpoints: Vec<String>,
    pub clients: usize,
    pub stop: Stop,
    pub value_bytes: usize,
    pub key_space: u64,
    pub workload: Workload,
    pub consistency: Consistency,
    /// Requests per second offered in total (open loop); `None` is closed loop.
    pub rate: Option<f64>,
    pub seed: u64,
    /// How long the client may retry one request (unavailable cluster) before counting it.
    pub retry_budget_ms: u64,
    /// Writes under exactly-once sessions (the client's default).
    pub sessions: bool,
}

/// Counts of failed requests by kind.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ErrorCounts {
    pub unavailable: u64,
    pub outcome_unknown: u64,
    pub rejected: u64,
    /// Conditional puts whose condition did not hold (another writer moved the key).
    pub condition_failed: u64,
    pub other: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// What a load run measured.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub workload: String,
    pub clients: usize,
    pub rate: Option<f64>,
    pub elapsed_s: f64,
    pub ok: u64,
    pub errors: ErrorCounts,
    pub throughput_ops_s: f64,
    pub latency: Latency,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid options: {0}")]
    Options(String),
    #[error(transparent)]
    Client(#[from] ClientError),
}

struct Shared {
    done: AtomicU64,
    issued: AtomicU64,
    /// The next key of a `Fill` workload.
    fill_next: AtomicU64,
    progress: Option<indicatif::ProgressBar>,
}

/// A small, seeded, deterministic generator (splitmix64) for keys and the read/write mix.
struct KeyGen(u64);

impl KeyGen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

struct Worker {
    client: Client,
    keys: KeyGen,
    value: String,
    opts: LoadOptions,
    hist: Histogram<u64>,
    errors: ErrorCounts,
    ok: u64,
    /// `Cas`: this worker's key and its `mod_revision` as the last write left it.
    cas_key: String,
    cas_revision: u64,
}

/// Why one request did not count as done.
enum OpError {
    Client(ClientError),
    ConditionFailed,
}

impl From<ClientError> for OpError {
    fn from(e: ClientError) -> OpError {
        OpError::Client(e)
    }
}

impl Worker {
    /// Before the clock starts: a `Cas` worker learns its key's current revision.
    async fn prepare(&mut self) -> Result<(), ClientError> {
        if self.opts.workload == Workload::Cas {
            let now = self
                .client
                .get(&self.cas_key, Consistency::Linearizable)
                .await?;
            self.cas_revision = now.map_or(0, |kv| kv.mod_revision);
        }
        Ok(())
    }

    async fn one(&mut self, started: Instant, shared: &Shared) {
        let result = self.op(shared).await;
        let micros = started.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        match result {
            Ok(()) => {
                self.ok += 1;
                let _ = self.hist.record(micros.max(1));
            }
            Err(OpError::ConditionFailed) => self.errors.condition_failed += 1,
            Err(OpError::Client(ClientError::Unavailable(_))) => self.errors.unavailable += 1,
            Err(OpError::Client(ClientError::OutcomeUnknown(_))) => {
                self.errors.outcome_unknown += 1
            }
            Err(OpError::Client(ClientError::Rejected { .. })) => self.errors.rejected += 1,
            Err(OpError::Client(_)) => self.errors.other += 1,
        }
    }

    fn random_key(&mut self) -> String {
        format!(
            "bench-{:010}",
            self.keys.next() % self.opts.key_space.max(1)
        )
    }

    async fn op(&mut self, shared: &Shared) -> Result<(), OpError> {
        match self.opts.workload {
            Workload::Fill => {
                let n = shared.fill_next.fetch_add(1, Ordering::Relaxed);
                let key = format!("bench-{:010}", n % self.opts.key_space.max(1));
                self.client.put(&key, &self.value).await?;
            }
            Workload::Put => {
                let key = self.random_key();
                self.client.put(&key, &self.value).await?;
            }
            Workload::Get => self.read().await?,
            Workload::Mixed { read_percent } => {
                if (self.keys.next() % 100) < u64::from(read_percent) {
                    self.read().await?;
                } else {
                    let key = self.random_key();
                    self.client.put(&key, &self.value).await?;
                }
            }
            Workload::Cas => self.cas().await?,
            Workload::Txn { puts } => {
                let success = (0..puts)
                    .map(|_| TxnOp::Put {
                        key: self.random_key(),
                        value: self.value.clone(),
                    })
                    .collect();
                let txn = TxnRequest {
                    compare: Vec::new(),
                    success,
                    failure: Vec::new(),
                };
                self.client.txn(&txn).await?;
            }
        }
        Ok(())
    }

    async fn read(&mut self) -> Result<(), ClientError> {
        let key = self.random_key();
        self.client
            .get(&key, self.opts.consistency)
            .await
            .map(|_| ())
    }

    /// One conditional put of this worker's key at the revision it last saw.
    async fn cas(&mut self) -> Result<(), OpError> {
        let written = self
            .client
            .put_if(&self.cas_key, &self.value, self.cas_revision)
            .await?;
        match written {
            Ok(w) => {
                assert!(w.mod_revision > self.cas_revision, "revisions only grow");
                self.cas_revision = w.mod_revision;
                Ok(())
            }
            Err(failed) => {
                self.cas_revision = failed.current.map_or(0, |kv| kv.mod_revision);
                Err(OpError::ConditionFailed)
            }
        }
    }
}

fn describe(w: Workload) -> String {
    match w {
        Workload::Put => "put".into(),
        Workload::Get => "get".into(),
        Workload::Fill => "fill".into(),
        Workload::Cas => "cas".into(),
        Workload::Txn { puts } => format!("txn{puts}"),
        Workload::Mixed { read_percent } => format!("mixed:{read_percent}"),
    }
}

/// One worker per client, each with its own connections and seeded key generator.
fn build_workers(opts: &LoadOptions) -> Result<Vec<Worker>, BenchError> {
    (0..opts.clients)
        .map(|w| {
            let mut config = ClientConfig::new(opts.endpoints.clone());
            config.retry_budget_ms = opts.retry_budget_ms;
            config.sessions = opts.sessions;
            Ok(Worker {
                cas_key: format!("bench-cas-{w:04}"),
                cas_revision: 0,
                client: Client::new(config)?,
                keys: KeyGen(opts.seed ^ (w as u64).wrapping_mul(0xA24B_AED4_963E_E407)),
                value: "x".repeat(opts.value_bytes),
                opts: opts.clone(),
                hist: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .map_err(|e| BenchError::Options(e.to_string()))?,
                errors: ErrorCounts::default(),
                ok: 0,
            })
        })
        .collect()
}

/// Runs the load and reports. `show_progress` draws a progress bar on stderr.
pub async fn run_load(opts: LoadOptions, show_progress: bool) -> Result<LoadReport, BenchError> {
    if opts.clients == 0 || opts.clients > 4096 {
        return Err(BenchError::Options("--clients must be 1..=4096".into()));
    }
    if let Some(r) = opts.rate {
        if !(r > 0.0 && r.is_finite()) {
            return Err(BenchError::Options(
                "--rate must be a positive number".into(),
            ));
        }
    }
    let progress = show_progress.then(|| {
        let pb = match opts.stop {
            Stop::Requests(n) => indicatif::ProgressBar::new(n),
            Stop::After(d) => indicatif::ProgressBar::new(d.as_secs().max(1)),
        };
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb
    });
    let shared = Arc::new(Shared {
        done: AtomicU64::new(0),
        issued: AtomicU64::new(0),
        fill_next: AtomicU64::new(0),
        progress,
    });
    // Every client is built before the clock starts: building one takes milliseconds, and
    // an open loop's first slots would otherwise pile up behind it and be lost.
    let mut workers = build_workers(&opts)?;
    futures_util::future::try_join_all(workers.iter_mut().map(Worker::prepare)).await?;
    let started = Instant::now();
    let deadline = match opts.stop {
        Stop::After(d) => Some(started + d),
        Stop::Requests(_) => None,
    };
    let limit = match opts.stop {
        Stop::Requests(n) => n,
        Stop::After(_) => u64::MAX,
    };
    // Open loop: intended start times, bounded queue.
    let (slots_tx, slots_rx) = async_channel(opts.clients * 4);
    if let Some(rate) = opts.rate {
        let interval = Duration::from_secs_f64(1.0 / rate);
        tokio::spawn(async move {
            let mut next = Instant::now();
            let mut n = 0u64;
            while n < limit && deadline.is_none_or(|d| next < d) {
                tokio::time::sleep_until(next.into()).await;
                if slots_tx.send(next).await.is_err() {
                    return;
                }
                n += 1;
                next += interval;
            }
        });
    } else {
        drop(slots_tx);
    }
    let mut tasks = Vec::with_capacity(opts.clients);
    for mut worker in workers {
        let shared = shared.clone();
        let slots = slots_rx.clone();
        let open_loop = opts.rate.is_some();
        tasks.push(tokio::spawn(async move {
            loop {
                let intended = if open_loop {
                    match slots.recv().await {
                        Some(t) => t,
                        None => break,
                    }
                } else {
                    if shared.issued.fetch_add(1, Ordering::Relaxed) >= limit {
                        break;
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    Instant::now()
                };
                worker.one(intended, &shared).await;
                let done = shared.done.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(pb) = &shared.progress {
                    match deadline {
                        Some(_) => pb.set_position(intended.duration_since(started).as_secs()),
                        None => pb.set_position(done),
                    }
                }
            }
            worker
        }));
    }
    drop(slots_rx);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| BenchError::Options(e.to_string()))?;
    let mut errors = ErrorCounts::default();
    let mut ok = 0;
    for t in tasks {
        let w = t
            .await
            .map_err(|e| BenchError::Options(format!("a load task failed: {e}")))?;
        let _ = hist.add(&w.hist);
        ok += w.ok;
        errors.unavailable += w.errors.unavailable;
        errors.outcome_unknown += w.errors.outcome_unknown;
        errors.rejected += w.errors.rejected;
        errors.condition_failed += w.errors.condition_failed;
        errors.other += w.errors.other;
    }
    if let Some(pb) = &shared.progress {
        pb.finish_and_clear();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ms = |v: u64| v as f64 / 1000.0;
    Ok(LoadReport {
        workload: describe(opts.workload),
        clients: opts.clients,
        rate: opts.rate,
        elapsed_s: elapsed,
        ok,
        errors,
        throughput_ops_s: ok as f64 / elapsed.max(1e-9),
        latency: Latency {
            p50_ms: ms(hist.value_at_quantile(0.50)),
            p90_ms: ms(hist.value_at_quantile(0.90)),
            p99_ms: ms(hist.value_at_quantile(0.99)),
            p999_ms: ms(hist.value_at_quantile(0.999)),
            max_ms: ms(hist.max()),
            mean_ms: hist.mean() / 1000.0,
        },
    })
}

/// A bounded multi-consumer channel of start times (tokio's mpsc has one consumer).
fn async_channel(capacity: usize) -> (SlotSender, SlotReceiver) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
    (
        SlotSender(tx),
        SlotReceiver(Arc::new(tokio::sync::Mutex::new(rx))),
    )
}

struct SlotSender(tokio::sync::mpsc::Sender<Instant>);

impl SlotSender {
    async fn send(&self, t: Instant) -> Result<(), ()> {
        self.0.send(t).await.map_err(|_| ())
    }
}

#[derive(Clone)]
struct SlotReceiver(Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Instant>>>);

impl SlotReceiver {
    async fn recv(&self) -> Option<Instant> {
        self.0.lock().await.recv().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::test_service::{spawn, MapService};

    #[test]
    fn workloads_parse() {
        assert_eq!(Workload::parse("put"), Ok(Workload::Put));
        assert_eq!(
            Workload::parse("mixed:90"),
            Ok(Workload::Mixed { read_percent: 90 })
        );
        assert!(Workload::parse("mixed:101").is_err());
        assert_eq!(Workload::parse("cas"), Ok(Workload::Cas));
        assert_eq!(Workload::parse("txn10"), Ok(Workload::Txn { puts: 10 }));
        assert_eq!(describe(Workload::Txn { puts: 10 }), "txn10");
        assert!(Workload::parse("scan").is_err());
    }

    fn opts(url: String, stop: Stop, rate: Option<f64>, workload: Workload) -> LoadOptions {
        LoadOptions {
            endpoints: vec![url],
            clients: 4,
            stop,
            value_bytes: 16,
            key_space: 50,
            workload,
            consistency: Consistency::Linearizable,
            rate,
            seed: 7,
            retry_budget_ms: 200,
            sessions: true,
        }
    }

    #[tokio::test]
    async fn closed_loop_runs_exactly_the_requested_count() {
        let url = spawn(MapService::leader(1)).await;
        let r = run_load(
            opts(
                url,
                Stop::Requests(200),
                None,
                Workload::Mixed { read_percent: 50 },
            ),
            false,
        )
        .await
        .unwrap();
        assert_eq!(
            r.ok + r.errors.rejected
                + r.errors.other
                + r.errors.unavailable
                + r.errors.outcome_unknown,
            200
        );
        assert_eq!(r.ok, 200, "{r:?}");
        assert!(r.latency.p50_ms > 0.0 && r.latency.p50_ms <= r.latency.max_ms);
    }

    #[tokio::test]
    async fn conditional_puts_and_transactions_all_succeed() {
        let url = spawn(MapService::leader(1)).await;
        // The map service allows 8 ops per branch: txn5 stands for txn10.
        for workload in [Workload::Cas, Workload::Txn { puts: 5 }] {
            let r = run_load(
                opts(url.clone(), Stop::Requests(120), None, workload),
                false,
            )
            .await
            .unwrap();
            assert_eq!(r.ok, 120, "{workload:?}: {r:?}");
            assert_eq!(r.errors, ErrorCounts::default(), "{workload:?}");
        }
        // A second cas run starts from the revisions the first left (read before the clock).
        let r = run_load(opts(url, Stop::Requests(40), None, Workload::Cas), false)
            .await
            .unwrap();
        assert_eq!((r.ok, r.errors.condition_failed), (40, 0), "{r:?}");
    }

    #[tokio::test]
    async fn open_loop_offers_the_rate_for_the_duration() {
        let url = spawn(MapService::leader(1)).await;
        let r = run_load(
            opts(
                url,
                Stop::After(Duration::from_millis(500)),
                Some(200.0),
                Workload::Put,
            ),
            false,
        )
        .await
        .unwrap();
        // 200/s for 0.5 s is 100 requests, give or take the last tick.
        assert!((95..=101).contains(&r.ok), "{r:?}");
    }

    #[tokio::test]
    async fn errors_are_counted_not_hidden() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        let mut o = opts(dead, Stop::Requests(4), None, Workload::Get);
        o.clients = 2;
        let r = tokio::time::timeout(Duration::from_secs(60), run_load(o, false))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.ok, 0);
        assert_eq!(r.errors.unavailable, 4);
    }
}
