//! Prometheus metrics of a node, served at `GET /metrics` in the OpenMetrics text format.
//!
//! Why this shape: an operator's dashboards and alerts for etcd are built on a handful of
//! series (`has_leader`, `leader_changes_seen_total`, `wal_fsync_duration_seconds`, ...); the
//! same names under `raftkv_` let them be carried over. The metrics must not slow the write
//! path, so:
//! - what the hot path records is an atomic add (counters) or one short lock per *batch*
//!   (the fsync and apply histograms observe once per group commit and once per apply batch,
//!   not per request);
//! - what can be read when scraped is read then, not maintained: the term, the indexes,
//!   leadership, the pending proposals and the database size are gauges set by
//!   [`Metrics::refresh`] from the consensus task's status just before encoding;
//! - per-peer and per-route handles are created once (peers at start or when the transport
//!   adds a member, routes on first use) so recording never allocates; the transport and the
//!   driver look a peer's handles up once per connection or heartbeat answer, not per byte.
//!
//! Histogram buckets resolve what matters for each: fsyncs from 25 µs (a fast NVMe's
//! fdatasync is ~50–100 µs; a slow disk's 10+ ms), requests from 50 µs to 10 s, snapshots
//! from 1 ms to ~10 minutes.
//!
//! The metric names are public interface (DESIGN.md lists them; `tools/monitoring/` builds
//! on them).

use crate::api::ClusterStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use raftkv_storage::NodeId;
use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Label of the per-peer series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: NodeId,
}

/// Labels of `raftkv_http_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// `METHOD path-template`, e.g. `PUT /kv/{key}`; `other` for unknown paths.
    pub route: &'static str,
    pub code: u16,
}

/// Label of `raftkv_http_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

/// One peer's traffic and heartbeat round trip.
#[derive(Clone, Debug)]
pub struct PeerMetrics {
    pub sent_bytes: Counter,
    pub received_bytes: Counter,
    pub round_trip: Histogram,
}

/// Every metric of a node. Cheap to clone handles out of; shared as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    // Leadership and progress (gauges set at scrape time, counters by the consensus task).
    pub has_leader: Gauge,
    pub is_leader: Gauge,
    pub leader_changes_seen: Counter,
    pub term: Gauge,
    pub commit_index: Gauge,
    pub applied_index: Gauge,
    pub last_index: Gauge,
    pub snapshot_index: Gauge,
    // Proposals.
    pub proposals_committed: Counter,
    pub proposals_applied: Counter,
    pub proposals_pending: Gauge,
    pub proposals_failed: Counter,
    /// Reads served from the leader's lease, without a heartbeat round.
    pub lease_reads: Counter,
    /// Appends to followers whose entries were read back from the WAL.
    pub log_reads: Counter,
    /// Bytes of log payload the consensus core holds in memory.
    pub log_held_bytes: Gauge,
    // Storage.
    pub wal_fsync_duration: Histogram,
    pub wal_append_bytes: Counter,
    pub apply_duration: Histogram,
    pub snapshot_create_duration: Histogram,
    pub snapshot_send_duration: Histogram,
    pub snapshot_install_duration: Histogram,
    pub db_size_bytes: Gauge,
    /// Client sessions the state machine remembers (exactly-once writes).
    pub sessions: Gauge,
    /// Watch streams open on this node.
    pub watchers: Gauge,
    /// Bytes of events queued for this node's watchers.
    pub watch_queued_bytes: Gauge,
    /// Watchers cancelled for falling behind (as counted by the hub; set at scrape time).
    pub watchers_cancelled: Gauge,
    /// Live leases.
    pub leases: Gauge,
    // Peers and clients.
    peers: PeerSeries,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<RouteLabels, Histogram>,
}

/// The per-peer families and the handles of the current peers. Members come and go at run
/// time (`PeerTransport::set_peers`), so the handles sit behind a lock; it is taken once per
/// connection or heartbeat answer, never per byte.
#[derive(Debug)]
struct PeerSeries {
    sent: Family<PeerLabels, Counter>,
    received: Family<PeerLabels, Counter>,
    round_trip: Family<PeerLabels, Histogram, fn() -> Histogram>,
    by_peer: RwLock<BTreeMap<NodeId, Arc<PeerMetrics>>>,
}

impl PeerSeries {
    /// Creates `peer`'s series unless they exist; `false` when at [`PEER_SERIES_MAX`].
    fn add(&self, peer: NodeId) -> bool {
        let mut by_peer = self.by_peer.write().unwrap_or_else(PoisonError::into_inner);
        if by_peer.contains_key(&peer) {
            return true;
        }
        if by_peer.len() >= PEER_SERIES_MAX {
            tracing::warn!(
                peer,
                limit = PEER_SERIES_MAX,
                "too many peers; no metrics for this one"
            );
            return false;
        }
        let labels = PeerLabels { peer };
        let m = PeerMetrics {
            sent_bytes: self.sent.get_or_create_owned(&labels),
            received_bytes: self.received.get_or_create_owned(&labels),
            round_trip: self.round_trip.get_or_create_owned(&labels),
        };
        by_peer.insert(peer, Arc::new(m));
        debug_assert!(by_peer.len() <= PEER_SERIES_MAX);
        true
    }

    /// Drops `peer`'s handles and series (a re-added member starts from zero, which Prometheus
    /// reads as a counter reset).
    fn remove(&self, peer: NodeId) {
        let mut by_peer = self.by_peer.write().unwrap_or_else(PoisonError::into_inner);
        if by_peer.remove(&peer).is_some() {
            let labels = PeerLabels { peer };
            self.sent.remove(&labels);
            self.received.remove(&labels);
            self.round_trip.remove(&labels);
        }
        debug_assert!(!by_peer.contains_key(&peer));
    }
}

/// At most this many peers have series (the transport's own bound is the same).
pub const PEER_SERIES_MAX: usize = crate::transport::PEERS_MAX;

fn fsync_buckets() -> impl Iterator<Item = f64> {
    // 25 µs .. ~1.6 s, doubling.
    exponential_buckets(25e-6, 2.0, 17)
}

fn request_buckets() -> impl Iterator<Item = f64> {
    // 50 µs .. ~13 s, doubling.
    exponential_buckets(50e-6, 2.0, 19)
}

fn snapshot_buckets() -> impl Iterator<Item = f64> {
    // 1 ms .. ~9 minutes, doubling.
    exponential_buckets(1e-3, 2.0, 20)
}

fn round_trip_buckets() -> impl Iterator<Item = f64> {
    // 25 µs .. ~0.8 s, doubling.
    exponential_buckets(25e-6, 2.0, 16)
}

/// Seconds of `d` for a histogram.
pub fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// A gauge value from an index or term (which stay below 2^62, `raft::limits`).
fn gauge_value(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// All metrics, with per-peer series for `peers` (the other members).
    pub fn new(peers: impl IntoIterator<Item = NodeId>) -> Metrics {
        let mut r = Registry::default();
        let has_leader = Gauge::default();
        r.register(
            "raftkv_server_has_leader",
            "1 when this node knows a leader, else 0",
            has_leader.clone(),
        );
        let is_leader = Gauge::default();
        r.register(
            "raftkv_server_is_leader",
            "1 when this node is the leader, else 0",
            is_leader.clone(),
        );
        let leader_changes_seen = Counter::default();
        r.register(
            "raftkv_server_leader_changes_seen",
            "Times this node saw a new leader",
            leader_changes_seen.clone(),
        );
        let term = Gauge::default();
        r.register("raftkv_server_term", "The current term", term.clone());
        let index = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let commit_index = index(&mut r, "raftkv_raft_commit_index", "The commit index");
        let applied_index = index(
            &mut r,
            "raftkv_raft_applied_index",
            "The state machine's applied index",
        );
        let last_index = index(&mut r, "raftkv_raft_last_index", "The log's last index");
        let snapshot_index = index(
            &mut r,
            "raftkv_raft_snapshot_index",
            "The index of the latest snapshot (log compaction point)",
        );
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let proposals_committed = counter(
            &mut r,
            "raftkv_server_proposals_committed",
            "Log entries this node saw committed",
        );
        let proposals_applied = counter(
            &mut r,
            "raftkv_server_proposals_applied",
            "Log entries this node applied to its state machine",
        );
        // The public name keeps `_total` although this is a gauge (etcd's
        // `etcd_server_proposals_pending` is one too).
        let proposals_pending = index(
            &mut r,
            "raftkv_server_proposals_pending_total",
            "Writes proposed on this node and waiting to be applied",
        );
        let proposals_failed = counter(
            &mut r,
            "raftkv_server_proposals_failed",
            "Writes that failed after reaching this node (not the leader's 'try the leader')",
        );
        let lease_reads = counter(
            &mut r,
            "raftkv_server_lease_reads",
            "Reads at consistency=lease this node served from its lease as leader, without a \
             heartbeat round (--lease-reads)",
        );
        let log_reads = counter(
            &mut r,
            "raftkv_raft_log_reads",
            "Appends to followers whose entries this node read back from its WAL (the core no \
             longer held them in memory)",
        );
        let log_held_bytes = index(
            &mut r,
            "raftkv_raft_log_held_bytes",
            "Bytes of log entries the consensus core holds in memory (unapplied entries and a \
             recent window up to --log-cache-mb; older ones are read from the WAL)",
        );
        let histogram = |r: &mut Registry, name: &str, help: &str, b: &dyn Fn() -> Vec<f64>| {
            let h = Histogram::new(b());
            r.register(name, help, h.clone());
            h
        };
        let wal_fsync_duration = histogram(
            &mut r,
            "raftkv_wal_fsync_duration_seconds",
            "fdatasync of one WAL group commit",
            &|| fsync_buckets().collect(),
        );
        let wal_append_bytes = counter(
            &mut r,
            "raftkv_wal_append_bytes",
            "Bytes appended to the WAL",
        );
        let apply_duration = histogram(
            &mut r,
            "raftkv_apply_duration_seconds",
            "Applying one batch of committed entries to the state machine",
            &|| fsync_buckets().collect(),
        );
        let snapshot_create_duration = histogram(
            &mut r,
            "raftkv_snapshot_create_duration_seconds",
            "Writing a snapshot file of the state machine",
            &|| snapshot_buckets().collect(),
        );
        let snapshot_send_duration = histogram(
            &mut r,
            "raftkv_snapshot_send_duration_seconds",
            "Streaming a snapshot file to a follower",
            &|| snapshot_buckets().collect(),
        );
        let snapshot_install_duration = histogram(
            &mut r,
            "raftkv_snapshot_install_duration_seconds",
            "Installing a received snapshot into the state machine",
            &|| snapshot_buckets().collect(),
        );
        let db_size_bytes = index(
            &mut r,
            "raftkv_db_size_bytes",
            "The state machine's size on disk",
        );
        let sessions = index(
            &mut r,
            "raftkv_sessions",
            "Client sessions in the state machine's session table",
        );
        let watchers = index(&mut r, "raftkv_watchers", "Watch streams open on this node");
        let watch_queued_bytes = index(
            &mut r,
            "raftkv_watch_queued_bytes",
            "Bytes of change events queued for this node's watchers",
        );
        let watchers_cancelled = index(
            &mut r,
            "raftkv_watchers_cancelled",
            "Watchers this node cancelled for falling behind their buffer bound, since start",
        );
        let leases = index(&mut r, "raftkv_leases", "Live leases in the state machine");
        let (peers, http_requests, http_duration) = Self::register_traffic(&mut r, peers);
        Metrics {
            registry: r,
            has_leader,
            is_leader,
            leader_changes_seen,
            term,
            commit_index,
            applied_index,
            last_index,
            snapshot_index,
            proposals_committed,
            proposals_applied,
            proposals_pending,
            proposals_failed,
            lease_reads,
            log_reads,
            log_held_bytes,
            wal_fsync_duration,
            wal_append_bytes,
            apply_duration,
            snapshot_create_duration,
            snapshot_send_duration,
            snapshot_install_duration,
            db_size_bytes,
            sessions,
            watchers,
            watch_queued_bytes,
            watchers_cancelled,
            leases,
            peers,
            http_requests,
            http_duration,
        }
    }

    /// The per-peer and per-route families; the initial peers' series exist from the start.
    fn register_traffic(
        r: &mut Registry,
        peers: impl IntoIterator<Item = NodeId>,
    ) -> (
        PeerSeries,
        Family<HttpLabels, Counter>,
        Family<RouteLabels, Histogram>,
    ) {
        let sent = Family::<PeerLabels, Counter>::default();
        let received = Family::<PeerLabels, Counter>::default();
        let round_trip =
            Family::<PeerLabels, Histogram, fn() -> Histogram>::new_with_constructor(|| {
                Histogram::new(round_trip_buckets())
            });
        let series = PeerSeries {
            sent: sent.clone(),
            received: received.clone(),
            round_trip: round_trip.clone(),
            by_peer: RwLock::new(BTreeMap::new()),
        };
        for peer in peers {
            series.add(peer);
        }
        r.register(
            "raftkv_peer_sent_bytes",
            "Bytes written to a peer's connection",
            sent,
        );
        r.register(
            "raftkv_peer_received_bytes",
            "Bytes read from a peer's connection",
            received,
        );
        r.register(
            "raftkv_peer_round_trip_seconds",
            "Heartbeat to response, as the leader sees it (network and the peer's event loop)",
            round_trip,
        );
        let requests = Family::<HttpLabels, Counter>::default();
        r.register(
            "raftkv_http_requests",
            "Client requests by route and status code",
            requests.clone(),
        );
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(request_buckets())) as fn() -> Histogram,
        );
        r.register(
            "raftkv_http_request_duration_seconds",
            "Client request handling time by route",
            duration.clone(),
        );
        (series, requests, duration)
    }

    /// Metrics with no peers, for services that are not a node (tests, tools).
    pub fn standalone() -> Metrics {
        Metrics::new([])
    }

    /// `peer`'s metrics; `None` for an id that is not a current peer. Clone the handles out
    /// once per connection rather than calling this per message.
    pub fn peer(&self, peer: NodeId) -> Option<Arc<PeerMetrics>> {
        let by_peer = self
            .peers
            .by_peer
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        by_peer.get(&peer).cloned()
    }

    /// Creates the series of `peer`, a member added at run time; nothing if they exist.
    /// `false` (logged) when [`PEER_SERIES_MAX`] peers have series already.
    pub fn add_peer(&self, peer: NodeId) -> bool {
        self.peers.add(peer)
    }

    /// Drops the series of `peer`, a member removed at run time; nothing if it has none.
    pub fn remove_peer(&self, peer: NodeId) {
        self.peers.remove(peer)
    }

    /// Records one client request.
    pub fn observe_http(&self, route: &'static str, code: u16, took: Duration) {
        self.http_requests
            .get_or_create(&HttpLabels { route, code })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels { route })
            .observe(seconds(took));
    }

    /// Sets the scrape-time gauges from the consensus task's status and the storage's
    /// numbers.
    pub fn refresh(&self, status: &ClusterStatus, pending: usize, db_size_bytes: Option<u64>) {
        let leader = status.leader.as_ref().map(|l| l.id);
        self.has_leader.set(i64::from(leader.is_some()));
        self.is_leader.set(i64::from(leader == Some(status.id)));
        self.term.set(gauge_value(status.term));
        self.commit_index.set(gauge_value(status.commit_index));
        self.applied_index.set(gauge_value(status.applied_index));
        self.last_index.set(gauge_value(status.last_index));
        self.snapshot_index.set(gauge_value(status.snapshot_index));
        self.proposals_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        if let Some(bytes) = db_size_bytes {
            self.db_size_bytes.set(gauge_value(bytes));
        }
    }

    /// The whole registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        // Writing into a String cannot fail.
        let encoded = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        debug_assert!(encoded.is_ok());
        assert!(
            out.ends_with("# EOF\n"),
            "an OpenMetrics exposition ends with # EOF"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::LeaderInfo;

    fn status(id: NodeId, leader: Option<NodeId>) -> ClusterStatus {
        ClusterStatus {
            id,
            cluster_id: "c".into(),
            role: "follower".into(),
            term: 7,
            leader: leader.map(|id| LeaderInfo {
                id,
                client_url: None,
            }),
            first_index: 1,
            last_index: 40,
            commit_index: 39,
            applied_index: 38,
            snapshot_index: 20,
            members: vec![],
            membership: Default::default(),
        }
    }

    /// The value of the sample line that starts with `series ` (exact series text).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().expect("a number"))
    }

    #[test]
    fn every_documented_series_is_exposed_with_its_value() {
        let m = Metrics::new([2, 3]);
        m.refresh(&status(1, Some(1)), 5, Some(4096));
        m.leader_changes_seen.inc();
        m.wal_fsync_duration.observe(150e-6);
        m.wal_append_bytes.inc_by(300);
        m.peer(2).unwrap().sent_bytes.inc_by(11);
        m.peer(3).unwrap().round_trip.observe(0.0004);
        m.observe_http("PUT /kv/{key}", 200, Duration::from_micros(700));
        let text = m.encode();
        for (series, want) in [
            ("raftkv_server_has_leader", 1.0),
            ("raftkv_server_is_leader", 1.0),
            ("raftkv_server_leader_changes_seen_total", 1.0),
            ("raftkv_server_term", 7.0),
            ("raftkv_raft_commit_index", 39.0),
            ("raftkv_raft_applied_index", 38.0),
            ("raftkv_raft_last_index", 40.0),
            ("raftkv_raft_snapshot_index", 20.0),
            ("raftkv_server_proposals_pending_total", 5.0),
            ("raftkv_server_proposals_committed_total", 0.0),
            ("raftkv_server_proposals_applied_total", 0.0),
            ("raftkv_server_proposals_failed_total", 0.0),
            ("raftkv_server_lease_reads_total", 0.0),
            ("raftkv_raft_log_reads_total", 0.0),
            ("raftkv_raft_log_held_bytes", 0.0),
            ("raftkv_wal_append_bytes_total", 300.0),
            ("raftkv_wal_fsync_duration_seconds_count", 1.0),
            // 150 µs falls in the 200 µs bucket, not the 100 µs one: 100 µs fsyncs resolve.
            (
                "raftkv_wal_fsync_duration_seconds_bucket{le=\"0.0001\"}",
                0.0,
            ),
            (
                "raftkv_wal_fsync_duration_seconds_bucket{le=\"0.0002\"}",
                1.0,
            ),
            ("raftkv_apply_duration_seconds_count", 0.0),
            ("raftkv_snapshot_create_duration_seconds_count", 0.0),
            ("raftkv_snapshot_send_duration_seconds_count", 0.0),
            ("raftkv_snapshot_install_duration_seconds_count", 0.0),
            ("raftkv_peer_sent_bytes_total{peer=\"2\"}", 11.0),
            ("raftkv_peer_received_bytes_total{peer=\"3\"}", 0.0),
            ("raftkv_peer_round_trip_seconds_count{peer=\"3\"}", 1.0),
            (
                "raftkv_http_requests_total{route=\"PUT /kv/{key}\",code=\"200\"}",
                1.0,
            ),
            (
                "raftkv_http_request_duration_seconds_count{route=\"PUT /kv/{key}\"}",
                1.0,
            ),
            ("raftkv_db_size_bytes", 4096.0),
        ] {
            assert_eq!(sample(&text, series), Some(want), "{series} in\n{text}");
        }
    }

    /// Every `raftkv_*` series that `tools/monitoring/` queries is one this node exposes.
    #[test]
    fn the_dashboard_and_alerts_use_only_series_that_exist() {
        let m = Metrics::new([2]);
        m.peer(2).unwrap().round_trip.observe(0.001);
        m.observe_http("GET /kv", 200, Duration::from_millis(1));
        let text = m.encode();
        let exposed: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let tools = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/monitoring/");
        let mut checked = 0;
        for file in ["raftkv-alerts.yml", "raftkv-dashboard.json"] {
            let text = std::fs::read_to_string(format!("{tools}{file}")).unwrap();
            let mut rest = text.as_str();
            while let Some(at) = rest.find("raftkv_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                assert!(
                    exposed.contains(name.as_str()),
                    "{file} uses {name}, not exposed"
                );
                checked += 1;
                rest = &rest[at + name.len()..];
            }
        }
        assert!(checked > 30, "only {checked} references found");
    }

    #[test]
    fn a_follower_without_a_leader_says_so() {
        let m = Metrics::new([2]);
        m.refresh(&status(1, Some(2)), 0, None);
        let text = m.encode();
        assert_eq!(sample(&text, "raftkv_server_has_leader"), Some(1.0));
        assert_eq!(sample(&text, "raftkv_server_is_leader"), Some(0.0));
        m.refresh(&status(1, None), 0, None);
        let text = m.encode();
        assert_eq!(sample(&text, "raftkv_server_has_leader"), Some(0.0));
        assert!(
            m.peer(9).is_none(),
            "no series for a node that is not a peer"
        );
    }

    /// A member added at run time gets its series; a removed one loses them.
    #[test]
    fn peers_added_and_removed_at_run_time_gain_and_lose_their_series() {
        let m = Metrics::new([2]);
        assert!(m.peer(4).is_none());
        assert!(m.add_peer(4));
        assert!(m.add_peer(4), "adding twice is harmless");
        m.peer(4).unwrap().sent_bytes.inc_by(7);
        let text = m.encode();
        assert_eq!(
            sample(&text, "raftkv_peer_sent_bytes_total{peer=\"4\"}"),
            Some(7.0)
        );
        m.remove_peer(4);
        m.remove_peer(4);
        assert!(m.peer(4).is_none());
        let text = m.encode();
        assert_eq!(
            sample(&text, "raftkv_peer_sent_bytes_total{peer=\"4\"}"),
            None
        );
        assert_eq!(
            sample(&text, "raftkv_peer_sent_bytes_total{peer=\"2\"}"),
            Some(0.0)
        );
        // Bounded: the series of at most PEER_SERIES_MAX peers.
        for peer in 10..(10 + PEER_SERIES_MAX as NodeId) {
            m.add_peer(peer);
        }
        assert!(!m.add_peer(1 << 20));
        assert!(m.peer(1 << 20).is_none());
    }
}
