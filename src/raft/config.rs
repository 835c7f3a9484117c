//! Tunables of the consensus core, in ticks, bytes or counts — and one duration in
//! milliseconds, the leader's lease, measured on the clock readings the node passes in
//! ([`super::Raft::advance_clock`]).
//!
//! The node decides how long a tick is (e.g. `heartbeat_ms / heartbeat_ticks`); the core only
//! counts ticks and compares clock readings it is given, which keeps it free of clocks and
//! deterministic.

use raftkv_types::NodeId;

/// Configuration of one consensus core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This node's id (never 0).
    pub id: NodeId,
    /// Lower bound of the randomized election timeout, in ticks. Also the check-quorum period.
    pub election_timeout_min_ticks: u32,
    /// Upper bound (exclusive) of the randomized election timeout, in ticks.
    pub election_timeout_max_ticks: u32,
    /// A leader sends heartbeats every this many ticks.
    pub heartbeat_ticks: u32,
    /// Run a pre-vote round before a real election, so a node that was partitioned away cannot
    /// disrupt a healthy leader by bumping the term when it rejoins.
    pub pre_vote: bool,
    /// A leader that has not heard from a quorum within `election_timeout_min_ticks` steps
    /// down; followers that heard from a leader recently ignore vote requests.
    pub check_quorum: bool,
    /// Allow reads asked for at [`ReadLevel::Lease`] to be served from the leader's lease
    /// without a heartbeat round. Heartbeats then carry `lease_ms`, and a follower that
    /// receives one promises not to vote — for anyone, itself included — for `lease_ms` by its
    /// own clock. The leader relies on a quorum's promise for `lease_ms` less
    /// [`CLOCK_DRIFT_PERCENT_MAX`] % from the heartbeat's send time, by its own clock: safe as
    /// long as no node's clock runs that much faster than another's. A leader's process pause
    /// is safe too: the clock reading given with each step shows the time that passed.
    /// [`ReadLevel::Linearizable`] reads never use the lease. Requires `check_quorum`. Off by
    /// default.
    ///
    /// [`ReadLevel::Lease`]: super::ReadLevel::Lease
    /// [`ReadLevel::Linearizable`]: super::ReadLevel::Linearizable
    pub lease_reads: bool,
    /// With `lease_reads`: how long a follower that received a heartbeat promises not to
    /// vote, in milliseconds of its clock (1..=[`LEASE_MS_MAX`]; [`Config::lease_ms_for`]).
    pub lease_ms: u64,
    /// A follower told that its leader is unreachable ([`Raft::peer_unreachable`]: the
    /// connection dropped, as it does at once when the leader's process dies) forgets that
    /// leader and campaigns — PreVote first — after `1 + 2 × rank` ticks instead of a whole
    /// election timeout, where `rank` counts the other voters with a lower id (so two
    /// followers that lost the same leader do not split the vote). Safe: PreVote still needs a
    /// quorum that also lost the leader, and a live leader's next message restores it. A
    /// follower that promised a leader its lease waits the promise out first: it campaigns
    /// `election_timeout_min_ticks + 2 × rank` ticks after it last heard from the leader.
    ///
    /// [`Raft::peer_unreachable`]: super::Raft::peer_unreachable
    pub fast_failover: bool,
    /// Most payload bytes in one AppendEntries message (at least one entry is always sent).
    pub append_bytes_max: u64,
    /// Most AppendEntries messages in flight to one follower in replicate state.
    pub inflight_msgs_max: usize,
    /// Most entry bytes in flight to one follower in replicate state.
    pub inflight_bytes_max: u64,
    /// A leader refuses proposals while this many bytes of its log are not yet committed.
    pub uncommitted_bytes_max: u64,
    /// A leader refuses proposals while the log payloads it must keep in memory (entries
    /// not yet applied, which cannot be evicted) hold more than this many bytes.
    pub log_bytes_max: u64,
    /// Payloads of applied entries are kept in memory, newest first, up to this many bytes
    /// (for followers that keep up); older ones are evicted and served from the WAL
    /// ([`super::RaftLog`]), so memory stays flat however rarely the node compacts.
    pub log_cache_bytes_max: u64,
    /// Most entry bytes handed out to apply in one ready batch (at least one entry).
    pub apply_bytes_max: u64,
    /// Most read requests waiting for confirmation or for their index to be applied.
    pub pending_reads_max: usize,
    /// A leader that streamed a snapshot to a follower sends it nothing else (and above all no
    /// second snapshot) until the follower acknowledges the install, or until this many ticks
    /// passed (the follower may have crashed and lost it). Installing a large snapshot takes
    /// a while: a second transfer started meanwhile would only repeat the first.
    pub snapshot_install_wait_ticks: u32,
    /// Most messages buffered for the node between two `ready()` calls; beyond that messages
    /// are dropped (Raft tolerates message loss) and a warning is logged.
    pub outbox_msgs_max: usize,
    /// A learner is promotable while its log is at most this many entries behind the
    /// leader's (etcd refuses to promote a learner that is not caught up, too).
    pub promote_lag_entries_max: u64,
}

/// The clock drift lease reads tolerate: no node's clock runs more than this many percent
/// faster than another's. Real clocks drift by parts per million; the margin is wide on
/// purpose (it costs nothing while heartbeats renew the lease every `heartbeat_ms`).
pub const CLOCK_DRIFT_PERCENT_MAX: u64 = 10;

/// The longest lease a heartbeat may ask a follower to keep (a hostile or misconfigured peer
/// cannot silence a follower's vote for longer).
pub const LEASE_MS_MAX: u64 = 60_000;

impl Config {
    /// The promise a heartbeat may ask for, given the tick length `tick_ms` and the
    /// minimum election timeout in ticks: what every follower's check-quorum stickiness keeps
    /// anyway, since it refuses votes for `election_timeout_min_ticks` ticks after hearing
    /// from its leader, and its next tick may come at once. Capped at [`LEASE_MS_MAX`].
    pub fn lease_ms_for(tick_ms: u64, election_timeout_min_ticks: u32) -> u64 {
        let ticks = u64::from(election_timeout_min_ticks.saturating_sub(1));
        tick_ms.saturating_mul(ticks).min(LEASE_MS_MAX)
    }

    /// How long after sending a heartbeat the leader relies on the promise of those who
    /// acknowledge it: `lease_ms` less the clock drift allowed.
    pub fn lease_trusted_ms(&self) -> u64 {
        let trusted_ms = self.lease_ms.saturating_mul(100 - CLOCK_DRIFT_PERCENT_MAX) / 100;
        debug_assert!(trusted_ms <= self.lease_ms);
        trusted_ms
    }

    /// Defaults suited to a 100 ms tick-free setting: heartbeat every 1 tick, elections after
    /// 10..20 ticks.
    pub fn new(id: NodeId) -> Config {
        Config {
            id,
            election_timeout_min_ticks: 10,
            election_timeout_max_ticks: 20,
            heartbeat_ticks: 1,
            pre_vote: true,
            check_quorum: true,
            lease_reads: false,
            lease_ms: 0,
            fast_failover: true,
            append_bytes_max: 1 << 20,
            inflight_msgs_max: 256,
            inflight_bytes_max: 32 << 20,
            uncommitted_bytes_max: 64 << 20,
            log_bytes_max: 1 << 30,
            log_cache_bytes_max: 8 << 20,
            apply_bytes_max: 16 << 20,
            pending_reads_max: 4096,
            outbox_msgs_max: 1 << 16,
            snapshot_install_wait_ticks: 2400,
            promote_lag_entries_max: 1000,
        }
    }

    /// Checks the configuration is usable, with a message naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("id must not be 0".into());
        }
        if self.heartbeat_ticks == 0 {
            return Err("heartbeat_ticks must be at least 1".into());
        }
        if self.election_timeout_min_ticks <= self.heartbeat_ticks {
            return Err("election_timeout_min_ticks must exceed heartbeat_ticks".into());
        }
        if self.election_timeout_max_ticks <= self.election_timeout_min_ticks {
            return Err("election_timeout_max_ticks must exceed election_timeout_min_ticks".into());
        }
        if self.lease_reads && !self.check_quorum {
            return Err("lease_reads requires check_quorum".into());
        }
        if self.lease_reads && !(1..=LEASE_MS_MAX).contains(&self.lease_ms) {
            return Err(format!(
                "lease_ms must be 1..={LEASE_MS_MAX} with lease_reads"
            ));
        }
        if self.snapshot_install_wait_ticks == 0 {
            return Err("snapshot_install_wait_ticks must be at least 1".into());
        }
        if self.inflight_msgs_max == 0 || self.pending_reads_max == 0 || self.outbox_msgs_max == 0 {
            return Err("queue limits must be at least 1".into());
        }
        if self.log_cache_bytes_max > self.log_bytes_max {
            return Err("log_cache_bytes_max must not exceed log_bytes_max".into());
        }
        if self.append_bytes_max == 0 || self.inflight_bytes_max == 0 || self.apply_bytes_max == 0 {
            return Err("byte limits must be at least 1".into());
        }
        Ok(())
    }
}
