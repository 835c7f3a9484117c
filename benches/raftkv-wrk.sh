#!/usr/bin/env bash
# raftkv-wrk.sh: raftkv alone under wrk, for before/after numbers while optimizing.
#
# Starts a fresh 3-node raftkv cluster on loopback (data under $WORK), preloads KEY_SPACE keys,
# then runs wrk against the leader with the same Lua script as compare-etcd.sh, once per
# (clients, workload) cell, and prints wrk's RESULT line for each, with the nodes' CPU time
# per request (all three nodes, user + system) and each node's mean fdatasync during the cell
# (from its /metrics). Cheaper than the full etcd
# comparison (no etcd, no failover, no RSS phase), so it can be run after every change.
#
# Usage: benches/raftkv-wrk.sh ["1 64 256"] ["put get cas"] [5s]
# Workloads: put, get, lease (GET ?consistency=lease: run with EXTRA="--lease-reads"), cas
# (conditional puts that succeed: if_mod_revision=0 on fresh keys).
# Settings (environment): VALUE_SIZE (256), KEY_SPACE (10000), WORK, RAFTKV_BIN, EXTRA (more
# `raftkv serve` flags, e.g. EXTRA="--cache-mb 16").
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLIENTS=${1:-"1 64 256"}
WORKLOADS=${2:-"put get"}
DURATION=${3:-5s}
VALUE_SIZE=${VALUE_SIZE:-256}
KEY_SPACE=${KEY_SPACE:-10000}
WORK=${WORK:-$ROOT/target/raftkv-wrk}
RAFTKV_BIN=${RAFTKV_BIN:-$ROOT/target/release/raftkv}
export COMPARE_LUA_DIR=$ROOT/benches/compare-etcd
[[ -x $RAFTKV_BIN ]] || { echo "no raftkv binary at $RAFTKV_BIN (cargo build --release)" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is missing (apt-get install wrk)" >&2; exit 1; }

rm -rf "$WORK"
mkdir -p "$WORK"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT
for i in 1 2 3; do
    peers=""
    for j in 1 2 3; do
        [[ $j == "$i" ]] || peers+="${peers:+,}$j=127.0.0.1:1910$j"
    done
    # shellcheck disable=SC2086 # EXTRA is a list of flags
    RUST_LOG=warn "$RAFTKV_BIN" serve --id "$i" --data-dir "$WORK/n$i" \
        --client-addr "127.0.0.1:1810$i" --peer-addr "127.0.0.1:1910$i" \
        --peers "$peers" --cluster-id raftkv-wrk ${EXTRA:-} >"$WORK/n$i.log" 2>&1 &
    pids+=($!)
done
for _ in $(seq 300); do
    curl -sf -X PUT -d '{"value":"x"}' http://127.0.0.1:18101/kv/warmup >/dev/null && break
    sleep 0.2
done
leader=$(curl -sf http://127.0.0.1:18101/cluster/status | sed -n 's/.*"leader":{"id":\([0-9]*\).*/\1/p')
[[ -n $leader ]] || { echo "no leader" >&2; exit 1; }
url="http://127.0.0.1:1810$leader"
wrk -t2 -c16 -d3s -s "$COMPARE_LUA_DIR/raftkv.lua" "$url" -- seq "$VALUE_SIZE" "$KEY_SPACE" 0 2 >/dev/null
# CPU time (user + system, clock ticks) of the three nodes together: CPU per request is far
# steadier than throughput on a shared VM, where the same binary's req/s moves by tens of %.
cpu_ticks() {
    local total=0 pid
    for pid in "${pids[@]}"; do
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
    done
    echo "$total"
}
# Each node's fdatasync total (seconds) and count from /metrics: the cell's mean fsync per
# node shows how much of a write's latency is the disk.
fsync_totals() {
    local i
    for i in 1 2 3; do
        curl -sf "http://127.0.0.1:1810$i/metrics" |
            awk '/^raftkv_wal_fsync_duration_seconds_sum/ { s = $2 } /^raftkv_wal_fsync_duration_seconds_count/ { c = $2 } END { printf "%s %s ", s, c }'
    done
}
hz=$(getconf CLK_TCK)
for c in $CLIENTS; do
    for w in $WORKLOADS; do
        t=$((c < 2 ? c : 2))
        before=$(cpu_ticks)
        fsync_before=$(fsync_totals)
        line=$(wrk -t"$t" -c"$c" -d"$DURATION" -s "$COMPARE_LUA_DIR/raftkv.lua" "$url" \
            -- "$w" "$VALUE_SIZE" "$KEY_SPACE" 0 "$t" | grep '^RESULT')
        ticks=$(($(cpu_ticks) - before))
        fsync_after=$(fsync_totals)
        echo "c=$c $w: $line cpu_ticks=$ticks hz=$hz" | awk '{ for (i = 3; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
            ok = v["requests"] - v["errors"]
            printf "%s %s %8.0f req/s  p50 %6.3f ms  p99 %6.3f ms  errors %d  cpu %5.1f us/req", $1, $2,
                ok / (v["duration_us"] / 1e6), v["p50_us"] / 1000, v["p99_us"] / 1000, v["errors"],
                (ok > 0 ? v["cpu_ticks"] / v["hz"] * 1e6 / ok : 0) }'
        # Mean fdatasync per node during the cell (node 1, 2, 3; the leader is node $leader).
        awk -v a="$fsync_before" -v b="$fsync_after" 'BEGIN { split(a, x); split(b, y); printf "  fsync mean"
            for (i = 0; i < 3; i++) { n = y[2 * i + 2] - x[2 * i + 2]
                printf " %s", (n > 0 ? sprintf("%.0f", (y[2 * i + 1] - x[2 * i + 1]) / n * 1e6) : "-") }
            printf " us (%d, %d, %d syncs)\n", y[2] - x[2], y[4] - x[4], y[6] - x[6] }'
    done
done
