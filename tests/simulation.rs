//! Deterministic simulation of raftkv clusters under faults (see tests/simulation/sim.rs).
//!
//! `cargo test --release --test simulation` runs `RAFTKV_SIM_SEEDS` seeds (default 1000; 40 in a debug build)
//! starting at `RAFTKV_SIM_SEED_START` (default 0). A failure prints the seed, its parameters
//! and fault schedule, and the command that replays it. Seeds that once found a bug are kept
//! as named regression tests below. `RAFTKV_SIM_NO_MEMBERSHIP=1` leaves membership changes out
//! of every seed (to compare runs with and without them).

#[path = "simulation/linearizability.rs"]
mod linearizability;
#[path = "simulation/sim.rs"]
mod sim;

use sim::{Params, Sim};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Simulated run length per seed, in ms (with faults throughout), before healing.
const RUN_MS: u64 = 60_000;

/// Seeds per default run: about 5 minutes in release on 2 cores (≈0.55 s per seed and core:
/// each seed runs 3 or 5 nodes of the real runtime with sled through 60 simulated seconds of
/// faults, and a reference state machine). Issue 11's client mix (sessions, retries until a
/// definite answer, transactions, session table upkeep) and its checks cost about a quarter
/// more per seed than the put/get/delete clients before it, so the default went from 1200 to
/// 1000 seeds to stay inside the CI budget (about 330 s for the whole test binary).
const DEFAULT_SEEDS: u64 = 1000;

/// Seeds per default run in a debug build (`cargo test` without `--release`).
const DEBUG_DEFAULT_SEEDS: u64 = 40;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}")),
        Err(_) => default,
    }
}

/// Runs one seed; on failure returns the full report.
fn run_seed(seed: u64) -> Result<sim::Stats, String> {
    let params = Params::from_seed(seed, RUN_MS);
    let shown = params.to_string();
    let outcome = std::panic::catch_unwind(|| Sim::new(params).run());
    let err = match outcome {
        Ok(Ok(stats)) => return Ok(stats),
        Ok(Err(e)) => e,
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into()),
    };
    Err(format!(
        "SIMULATION FAILED: {err}\n{shown}replay: RAFTKV_SIM_TRACE=1 RAFTKV_SIM_SEED_START={seed} RAFTKV_SIM_SEEDS=1 \
         cargo test --release --test simulation -- simulation_seeds --nocapture"
    ))
}

#[test]
fn simulation_seeds() {
    let start = env_u64("RAFTKV_SIM_SEED_START", 0);
    // Debug builds are ~10x slower: run the minimum there, the full default in release.
    let default = if cfg!(debug_assertions) {
        DEBUG_DEFAULT_SEEDS
    } else {
        DEFAULT_SEEDS
    };
    let count = env_u64("RAFTKV_SIM_SEEDS", default);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(count.max(1) as usize);
    let next = Arc::new(AtomicU64::new(start));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let totals = Arc::new(Mutex::new(sim::Stats::default()));
    let began = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (next, failures, totals) = (next.clone(), failures.clone(), totals.clone());
            std::thread::spawn(move || loop {
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= start + count {
                    break;
                }
                match run_seed(seed) {
                    Ok(s) => totals.lock().unwrap().add(&s),
                    Err(report) => {
                        eprintln!("{report}");
                        failures.lock().unwrap().push(seed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let t = totals.lock().unwrap().clone();
    eprintln!(
        "simulated seeds {start}..{}: {} passed, {} failed in {:.1?} \
         ({} events, {} client ops acknowledged, {} with unknown outcome, {} elections, \
         {} crashes ({} inside a storage group), {} compactions, {} snapshots installed; byzantine-lite frames: {} refused by the decoder, \
         {} by validation, {} plausible ones not injected)",
        start + count,
        count as usize - failures.len(),
        failures.len(),
        began.elapsed(),
        t.events,
        t.ops_ok,
        t.ops_unknown,
        t.elections,
        t.crashes,
        t.power_cuts,
        t.compactions,
        t.snapshots_installed,
        t.frames_undecodable,
        t.frames_refused,
        t.frames_plausible_skipped
    );
    eprintln!("membership changes: {:?}", t.member);
    eprintln!(
        "log: {} appends filled from the WAL, {} dropped as compacted meanwhile",
        t.log_reads, t.log_reads_failed
    );
    eprintln!(
        "sessions: {} sessioned writes, {} retried, {} duplicates answered ({} in the log), \
         {} evicted or expired, {} refused as expired; {} CAS ok, {} CAS failed, {} txns ok, \
         {} txns failed, {} prefix deletes",
        t.writes_sessioned,
        t.sessioned_retries,
        t.duplicates,
        t.duplicates_in_log,
        t.evictions,
        t.session_expired,
        t.cas_ok,
        t.cas_failed,
        t.txns_ok,
        t.txns_failed,
        t.prefix_deletes
    );
    eprintln!(
        "watch: {} events checked, {} resumes, {} starts refused as compacted, {} streams \
         cancelled as too slow; leases: {} granted, {} expired, {} revoked by clients, {} kept \
         alive ({} keepalives acknowledged), {} expiry revokes proposed, {} lease writes refused; \
         {} reads served from a leader's lease, {} pauses on lease-read seeds",
        t.watch_events,
        t.watch_resumes,
        t.watch_compacted,
        t.watch_too_slow,
        t.leases_granted,
        t.leases_expired,
        t.leases_revoked,
        t.leases_kept_alive,
        t.keepalive_acks,
        t.lease_revokes_proposed,
        t.lease_refusals,
        t.lease_reads_served,
        t.lease_seed_pauses
    );
    assert!(failures.is_empty(), "failed seeds: {failures:?}");
    if count >= 100 {
        assert_membership_exercised(&t.member);
        assert_sessions_exercised(&t);
        assert_watch_and_leases_exercised(&t);
        assert!(
            t.lease_reads_served > 0 && t.lease_seed_pauses > 0,
            "lease reads or pauses on their seeds never happened: {t:?}"
        );
        assert!(t.log_reads > 0, "no append was filled from the WAL: {t:?}");
        assert!(
            t.watch_compacted > 0,
            "no watch start refused as compacted: {t:?}"
        );
        assert!(
            t.watch_too_slow > 0,
            "no watcher cancelled as too slow: {t:?}"
        );
    }
}

/// Issue 12's paths all happened: watch events checked across resumes, and leases granted,
/// kept alive, expired and revoked.
fn assert_watch_and_leases_exercised(t: &sim::Stats) {
    let kinds = [
        ("a watch event checked", t.watch_events),
        ("a watch resumed on a node", t.watch_resumes),
        ("a lease granted", t.leases_granted),
        ("a keepalive acknowledged", t.keepalive_acks),
        ("a lease expired (revoked by an upkeep)", t.leases_expired),
        ("a lease revoked by its client", t.leases_revoked),
        ("a lease write refused", t.lease_refusals),
    ];
    for (what, n) in kinds {
        assert!(n > 0, "nothing of the kind: {what}: {t:?}");
    }
}

/// Every kind of membership change completed at least once (and some were refused by a
/// guard): the schedule reaches what it is meant to.
fn assert_membership_exercised(m: &sim::MemberStats) {
    let kinds = [
        ("add a learner", m.add_learner),
        ("add a voter", m.add_voter),
        ("promote a learner", m.promote),
        ("remove a voter", m.remove_voter),
        ("remove the leader", m.remove_leader),
        ("remove a learner", m.remove_learner),
        ("several changes in one joint change", m.joint_multi),
        ("a forced change", m.forced),
        (
            "a crash of the node a change went to, in its middle",
            m.crashed_mid_change,
        ),
        ("a guard refusal (409)", m.refused_conflict),
        ("a node joining", m.joined),
        ("a removed node stopped", m.retired),
    ];
    for (what, n) in kinds {
        assert!(
            n > 0,
            "no completed membership change of the kind: {what}: {m:?}"
        );
    }
}

/// Issue 11's paths all happened: retries answered from the session table, conditional
/// puts that succeeded and failed, transactions both ways, prefix deletes, and sessions
/// evicted with a client told so.
fn assert_sessions_exercised(t: &sim::Stats) {
    let kinds = [
        ("a retry answered from the session table", t.duplicates),
        (
            "a duplicate entry in the committed log",
            t.duplicates_in_log,
        ),
        ("a conditional put that succeeded", t.cas_ok),
        ("a conditional put that failed", t.cas_failed),
        ("a transaction that succeeded", t.txns_ok),
        ("a transaction whose failure branch ran", t.txns_failed),
        ("a prefix delete", t.prefix_deletes),
        ("a session evicted or expired", t.evictions),
        ("a write refused as SessionExpired", t.session_expired),
    ];
    for (what, n) in kinds {
        assert!(n > 0, "nothing of the kind: {what}: {t:?}");
    }
}

/// Asserts that a regression seed passes, printing its report otherwise.
fn assert_seed_passes(seed: u64) {
    if let Err(report) = run_seed(seed) {
        panic!("{report}");
    }
}

/// Found by the simulator (seed 276 at commit 1602468): the hard state was written before the
/// entries of its batch, so a torn write kept a commit index covering a replaced suffix whose
/// new entries were lost, and the restarted follower treated a stale entry as committed. Fixed
/// by writing entries first. The fault generator has gained fault kinds since, so this seed no
/// longer replays that exact schedule; the bug itself is pinned down deterministically by the
/// unit test `raft::core_tests::regression_torn_write_never_commits_a_replaced_entry`.
#[test]
fn regression_seed_276_torn_hard_state_before_entries() {
    assert_seed_passes(276);
}

/// Membership changes (the generator as of the commit adding them): with the consensus step
/// answering a membership change complete without having seen its own entry committed, this
/// seed fails ("retiring a member": the operator was told a removal completed that never took
/// effect). Seeds 377, and 42, 78, 109 at earlier states of the generator, too.
#[test]
fn regression_seed_271_membership_answer_needs_its_own_entry_committed() {
    assert_seed_passes(271);
}

/// Membership changes: with only voters of the newest configuration campaigning, this seed
/// loses liveness (a leader removing itself is crashed after appending C_new; it is the only
/// node able to win the election the joint configuration needs). Seed 62 too; the golden
/// scenario `membership_removed_leader_needed` pins the bug down step by step.
#[test]
fn regression_seed_40_removed_leader_still_needed_campaigns() {
    assert_seed_passes(40);
}

/// Membership changes with watch and lease clients (the generator as of the commit adding
/// them): a voter that had not yet seen a member's promotion ignored that member's vote
/// requests as a non-voter's, though only that member's log held every committed entry: no
/// leader ever again (liveness). Vote requests are now answered whoever sends them.
#[test]
fn regression_seed_964_an_unseen_promotion_still_gets_votes() {
    assert_seed_passes(964);
}

/// Lease reads against their hardest case, on purpose and often: every 1.2 s the leader is
/// frozen for 700–1049 ms and cut off from its peers a little longer; the others wait out its
/// lease and elect a leader, the clients give up on the frozen one and write through the new
/// one; a lease reader's later reads reach the frozen node too and are served when it wakes,
/// before it hears of the new term. Every node's clock drifts (up to ±4 %). Reads at both
/// levels must stay linearizable (the checker runs at the end of each seed). A leader that
/// judged its lease by its own ticks instead of its clock serves stale reads here (tried by
/// hand: seed 0 fails, "history of key k0 is not linearizable").
#[test]
fn lease_reads_stay_linearizable_when_the_leader_is_frozen() {
    let seeds = env_u64("RAFTKV_SIM_LEASE_SEEDS", 12);
    let mut served = 0;
    for seed in 0..seeds {
        let mut params = Params::from_seed(seed, RUN_MS);
        params.nodes = 3;
        params.spares = 0;
        params.clients = params.clients.max(3);
        params.loss_pct = 0;
        params.dup_pct = 0;
        params.pre_vote = true;
        params.check_quorum = true;
        params.lease_reads = true;
        params.byzantine = None;
        params.faults = (1..RUN_MS / 1200)
            .map(|k| {
                let ms = 700 + (seed * 37 + k * 91) % 350;
                (k * 1200, sim::Fault::PauseLeader { ms })
            })
            .collect();
        let shown = params.to_string();
        match Sim::new(params).run() {
            Ok(stats) => served += stats.lease_reads_served,
            Err(e) => panic!(
                "SIMULATION FAILED: {e}\n{shown}replay: RAFTKV_SIM_LEASE_SEEDS={} cargo test \
                 --release --test simulation -- lease_reads_stay_linearizable --nocapture",
                seed + 1
            ),
        }
    }
    println!("{seeds} seeds, {served} reads served from a lease");
    assert!(served > 0, "no read was served from a lease");
}

/// Determinism: the same seed gives the same run, event for event.
#[test]
fn same_seed_same_run() {
    let a = run_seed(7).expect("seed 7 passes");
    let b = run_seed(7).expect("seed 7 passes");
    assert_eq!(
        (a.events, a.ops_ok, a.elections, a.duplicates, a.cas_ok),
        (b.events, b.ops_ok, b.elections, b.duplicates, b.cas_ok)
    );
    assert_eq!(
        (
            a.watch_events,
            a.watch_resumes,
            a.keepalive_acks,
            a.leases_expired
        ),
        (
            b.watch_events,
            b.watch_resumes,
            b.keepalive_acks,
            b.leases_expired
        )
    );
}

/// Byzantine-lite mode: seeds with the mode inject corrupted frames that the real decoder
/// and `node::peer::validate` refuse, and the cluster stays safe and live afterwards.
#[test]
fn byzantine_lite_frames_are_refused_and_the_cluster_stays_live() {
    let (mut checked, mut refusing) = (0, 0);
    for seed in 0..40 {
        let params = Params::from_seed(seed, RUN_MS);
        if params.byzantine.is_none() {
            continue;
        }
        let stats = run_seed(seed).unwrap_or_else(|report| panic!("{report}"));
        println!(
            "seed {seed}: {} undecodable, {} refused, {} plausible not injected",
            stats.frames_undecodable, stats.frames_refused, stats.frames_plausible_skipped
        );
        // How many frames a seed gets to corrupt depends on its whole timeline (a seed may
        // see only a couple of chances), so refusals are required of most seeds, not each.
        if stats.frames_refused > 0 {
            refusing += 1;
        }
        assert!(stats.ops_ok > 0, "seed {seed}: no write completed");
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} of 40 seeds have the mode");
    assert!(
        refusing * 4 >= checked * 3,
        "only {refusing} of {checked} byzantine-lite seeds refused a frame"
    );
}

/// The simulator reaches the runtime's hard paths: crashes inside a storage group (power
/// cuts), compactions and snapshot installs (the three-party rendezvous) all happen, and so
/// does every kind of membership change and every issue-11 path (duplicates answered from
/// the session table, CAS both ways, transactions, prefix deletes, evictions) and every
/// issue-12 path (watch resumes, leases kept alive, expired and revoked) (`simulation_seeds`
/// checks the same of the default seed set).
#[test]
fn the_runtime_paths_that_matter_are_exercised() {
    let mut totals = sim::Stats::default();
    for seed in 0..12 {
        let stats = run_seed(seed).unwrap_or_else(|report| panic!("{report}"));
        totals.add(&stats);
    }
    println!("{totals:?}");
    assert_membership_exercised(&totals.member);
    assert!(totals.power_cuts > 0, "no crash inside a storage group");
    assert!(totals.compactions > 0, "no compaction");
    assert!(totals.snapshots_installed > 0, "no snapshot install");
    assert!(totals.log_reads > 0, "no append filled from the WAL");
    assert_sessions_exercised(&totals);
    assert_watch_and_leases_exercised(&totals);
    assert!(
        totals.ops_ok > 1000,
        "too little client work: {}",
        totals.ops_ok
    );
}
