#!/usr/bin/env bash
# compare-etcd.sh: raftkv against etcd 3.4 on the same machine, the same disk, the same load.
#
# Starts a 3-node etcd cluster (Debian's etcd-server, default settings) and a 3-node raftkv
# cluster (release build, default settings) on loopback, with data dirs side by side under
# $WORK, and drives both with wrk over HTTP/1.1 keep-alive JSON: raftkv's `PUT/GET /kv/{key}`
# and etcd's `POST /v3/kv/put|range` gateway (base64 keys and values). Both systems fsync every
# write before acknowledging it and serve linearizable reads by default, so the durability and
# consistency are the same. The systems are alternated A/B/A/B (ROUNDS times) and every cell
# is the mean of its rounds. Then failover (kill -9 the leader, time until the first
# successful write through a survivor, probing every PROBE_MS) and RSS per node after
# RSS_WRITES writes.
#
# Usage: benches/compare-etcd.sh            (about 25 minutes with the defaults)
#        QUICK=1 benches/compare-etcd.sh    (a smoke run: 3 s cells, 1 round, 2 trials, 20k writes)
# raftkv runs with --lease-reads (RAFTKV_LEASE_READS=0 turns them off), so the `lease` row is
# served from the leader's lease; etcd has no such level and reads linearizably there. Lease
# reads make raftkv's followers wait out the lease before a failover, so failover is measured
# twice for raftkv: with lease reads on, then with every node restarted with them off.
# Settings (environment): CLIENTS, WORKLOADS, DURATION, ROUNDS, VALUE_SIZE, KEY_SPACE,
# FAILOVER_TRIALS, PROBE_MS, RSS_WRITES, WORK, RAFTKV_BIN, RAFTKV_LEASE_READS,
# RAFTKV_SNAPSHOT_EVERY (raftkv's --snapshot-every; "never" = no compaction), PHASES (any of
# "table failover rss", default all three). Results: a table on stdout, raw wrk output and
# node logs in $WORK.
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ -n "${QUICK:-}" ]]; then
    : "${DURATION:=3s}" "${ROUNDS:=1}" "${FAILOVER_TRIALS:=2}" "${RSS_WRITES:=20000}"
fi
CLIENTS=${CLIENTS:-"1 16 64 256"}
WORKLOADS=${WORKLOADS:-"put get lease"}
RAFTKV_LEASE_READS=${RAFTKV_LEASE_READS:-1}
RAFTKV_SNAPSHOT_EVERY=${RAFTKV_SNAPSHOT_EVERY:-}
SNAPSHOT_EVERY_SHOWN=${RAFTKV_SNAPSHOT_EVERY:-default}
[[ $RAFTKV_SNAPSHOT_EVERY == never ]] && RAFTKV_SNAPSHOT_EVERY=4611686018427387904
PHASES=${PHASES:-"table failover rss"}
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-2}
VALUE_SIZE=${VALUE_SIZE:-256}
KEY_SPACE=${KEY_SPACE:-10000}
FAILOVER_TRIALS=${FAILOVER_TRIALS:-5}
PROBE_MS=${PROBE_MS:-20}
RSS_WRITES=${RSS_WRITES:-1000000}
WORK=${WORK:-$ROOT/target/compare-etcd}
RAFTKV_BIN_GIVEN=${RAFTKV_BIN:+1}
RAFTKV_BIN=${RAFTKV_BIN:-$ROOT/target/release/raftkv}
export COMPARE_LUA_DIR=$ROOT/benches/compare-etcd

RAFTKV_CLIENT=(127.0.0.1:18001 127.0.0.1:18002 127.0.0.1:18003)
RAFTKV_PEER=(127.0.0.1:19001 127.0.0.1:19002 127.0.0.1:19003)
ETCD_CLIENT=(127.0.0.1:22379 127.0.0.1:23379 127.0.0.1:24379)
ETCD_PEER=(127.0.0.1:22380 127.0.0.1:23380 127.0.0.1:24380)
declare -A PID   # "raftkv1" / "etcd2" -> pid

log() { printf '[compare-etcd %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
now_ns() { date +%s%N; }

# ---------------------------------------------------------------- prerequisites
install_missing() {
    local missing=()
    command -v etcd >/dev/null || missing+=(etcd-server)
    command -v etcdctl >/dev/null || missing+=(etcd-client)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v jq >/dev/null || missing+=(jq)
    command -v curl >/dev/null || missing+=(curl)
    ((${#missing[@]} == 0)) && return
    log "installing ${missing[*]} from the system package manager"
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
}

build_raftkv() {
    if [[ -z "${RAFTKV_BIN_GIVEN:-}" ]]; then
        log "building raftkv (release)"
        (cd "$ROOT" && cargo build --release --quiet --bin raftkv)
    fi
    [[ -x "$RAFTKV_BIN" ]] || die "no raftkv binary at $RAFTKV_BIN"
}

# ---------------------------------------------------------------- clusters
raftkv_others() { # node index 0..2, address array, URL prefix -> "2=PREFIXaddr,3=PREFIXaddr"
    local me=$1 prefix=${3:-} out=() j
    local -n addrs=$2
    for j in 0 1 2; do
        ((j == me)) || out+=("$((j + 1))=$prefix${addrs[j]}")
    done
    local IFS=,
    echo "${out[*]}"
}

start_raftkv_node() {
    local i=$1 id=$(($1 + 1))
    RUST_LOG=warn "$RAFTKV_BIN" serve --id "$id" --data-dir "$WORK/raftkv/n$id" \
        --client-addr "${RAFTKV_CLIENT[i]}" --peer-addr "${RAFTKV_PEER[i]}" \
        --peers "$(raftkv_others "$i" RAFTKV_PEER)" \
        --peer-client-urls "$(raftkv_others "$i" RAFTKV_CLIENT http://)" \
        --cluster-id compare-etcd \
        --lease-reads="$( ((RAFTKV_LEASE_READS)) && echo true || echo false)" \
        ${RAFTKV_SNAPSHOT_EVERY:+--snapshot-every "$RAFTKV_SNAPSHOT_EVERY"} \
        >>"$WORK/raftkv/n$id.log" 2>&1 &
    PID[raftkv$id]=$!
}

start_etcd_node() {
    local i=$1 id=$(($1 + 1)) cluster="" j
    for j in 0 1 2; do
        cluster+="${cluster:+,}e$((j + 1))=http://${ETCD_PEER[j]}"
    done
    etcd --name "e$id" --data-dir "$WORK/etcd/e$id" \
        --listen-client-urls "http://${ETCD_CLIENT[i]}" --advertise-client-urls "http://${ETCD_CLIENT[i]}" \
        --listen-peer-urls "http://${ETCD_PEER[i]}" --initial-advertise-peer-urls "http://${ETCD_PEER[i]}" \
        --initial-cluster "$cluster" --initial-cluster-token compare-etcd --initial-cluster-state new \
        --logger zap --log-outputs stderr --log-level warn \
        >>"$WORK/etcd/e$id.log" 2>&1 &
    PID[etcd$id]=$!
}

# A successful write through node $2 (0..2) of system $1.
write_once() { # system node key [max_time_s]
    local sys=$1 i=$2 key=$3 max=${4:-2}
    if [[ $sys == raftkv ]]; then
        curl -sf --max-time "$max" -X PUT -H 'Content-Type: application/json' \
            -d '{"value":"probe"}' "http://${RAFTKV_CLIENT[i]}/kv/$key" >/dev/null
    else
        curl -sf --max-time "$max" -X POST -H 'Content-Type: application/json' \
            -d "{\"key\":\"$(printf '%s' "$key" | base64)\",\"value\":\"cHJvYmU=\"}" \
            "http://${ETCD_CLIENT[i]}/v3/kv/put" >/dev/null
    fi
}

node_ready() { # system node: healthy member of a cluster with a leader
    local sys=$1 i=$2
    if [[ $sys == raftkv ]]; then
        curl -sf --max-time 1 "http://${RAFTKV_CLIENT[i]}/ready" >/dev/null
    else
        etcdctl --endpoints "http://${ETCD_CLIENT[i]}" --command-timeout=1s endpoint health >/dev/null 2>&1
    fi
}

wait_cluster() { # system: every node ready and a write succeeds
    local sys=$1 deadline=$((SECONDS + 60)) i
    for i in 0 1 2; do
        until node_ready "$sys" "$i"; do
            ((SECONDS < deadline)) || die "$sys node $((i + 1)) not ready after 60 s (logs in $WORK/$sys)"
            sleep 0.2
        done
    done
    until write_once "$sys" 0 warmup; do
        ((SECONDS < deadline)) || die "$sys accepts no write after 60 s"
        sleep 0.2
    done
}

leader_index() { # system -> 0..2
    local sys=$1 i
    if [[ $sys == raftkv ]]; then
        local id
        id=$(curl -sf --max-time 2 "http://${RAFTKV_CLIENT[0]}/cluster/status" | jq -r '.leader.id // .leader')
        [[ $id =~ ^[1-3]$ ]] || return 1
        echo $((id - 1))
    else
        local eps="http://${ETCD_CLIENT[0]},http://${ETCD_CLIENT[1]},http://${ETCD_CLIENT[2]}" line
        line=$(etcdctl --endpoints "$eps" --command-timeout=2s endpoint status -w json 2>/dev/null |
            jq -r '.[] | select(.Status.leader == .Status.header.member_id) | .Endpoint' | head -1)
        for i in 0 1 2; do
            [[ $line == "http://${ETCD_CLIENT[i]}" ]] && { echo "$i"; return 0; }
        done
        return 1
    fi
}

leader_url() { # system -> the URL wrk drives (the leader: no forwarding hop for either system)
    local sys=$1 i
    i=$(leader_index "$sys") || die "$sys has no leader"
    if [[ $sys == raftkv ]]; then echo "http://${RAFTKV_CLIENT[i]}"; else echo "http://${ETCD_CLIENT[i]}"; fi
}

stop_all() {
    local k
    for k in "${!PID[@]}"; do kill -TERM "${PID[$k]}" 2>/dev/null || true; done
    for k in "${!PID[@]}"; do wait "${PID[$k]}" 2>/dev/null || true; done
}
trap stop_all EXIT

# ---------------------------------------------------------------- load
# run_wrk system clients duration mode offset -> prints "reqs_per_s p50_ms p99_ms errors requests"
run_wrk() {
    local sys=$1 c=$2 d=$3 mode=$4 offset=${5:-0} keyspace=${6:-$KEY_SPACE} t url out
    t=$((c < 2 ? c : 2))
    url=$(leader_url "$sys")
    out=$(wrk -t "$t" -c "$c" -d "$d" --timeout 10s -s "$COMPARE_LUA_DIR/$sys.lua" "$url" \
        -- "$mode" "$VALUE_SIZE" "$keyspace" "$offset" "$t" 2>&1) || die "wrk failed: $out"
    printf '%s\n### %s c=%s %s\n%s\n' "" "$sys" "$c" "$mode" "$out" >>"$WORK/wrk.log"
    local line
    line=$(grep '^RESULT ' <<<"$out") || die "no RESULT line from wrk: $out"
    awk '{ for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
           ok = v["requests"] - v["errors"]
           printf "%.1f %.3f %.3f %d %d\n", ok / (v["duration_us"] / 1e6), v["p50_us"] / 1000,
                  v["p99_us"] / 1000, v["errors"], v["requests"] }' <<<"$line"
}

declare -A RES   # "sys|workload|clients" -> accumulated "thr p50 p99 errors" sums

measure_table() {
    local round sys c wl r thr p50 p99 err
    for round in $(seq 1 "$ROUNDS"); do
        for wl in $WORKLOADS; do
            for c in $CLIENTS; do
                for sys in raftkv etcd; do
                    r=$(run_wrk "$sys" "$c" "$DURATION" "$wl")
                    read -r thr p50 p99 err _ <<<"$r"
                    log "round $round $wl c=$c $sys: $thr req/s, p50 $p50 ms, p99 $p99 ms, $err errors"
                    local k="$sys|$wl|$c" prev="${RES[$sys|$wl|$c]:-0 0 0 0}"
                    RES[$k]=$(awk -v a="$prev" -v b="$thr $p50 $p99 $err" 'BEGIN {
                        split(a, x); split(b, y)
                        printf "%f %f %f %d", x[1] + y[1], x[2] + y[2], x[3] + y[3], x[4] + y[4] }')
                done
            done
        done
    done
}

print_table() {
    local wl c
    printf '\n%-6s %7s | %12s %8s %8s | %12s %8s %8s | %9s %9s\n' workload clients \
        "raftkv req/s" "p50 ms" "p99 ms" "etcd req/s" "p50 ms" "p99 ms" "thr ratio" "p50 ratio"
    for wl in $WORKLOADS; do
        for c in $CLIENTS; do
            awk -v wl="$wl" -v c="$c" -v n="$ROUNDS" -v a="${RES[raftkv|$wl|$c]}" -v b="${RES[etcd|$wl|$c]}" 'BEGIN {
                split(a, x); split(b, y)
                printf "%-8s %7d | %12.0f %8.2f %8.2f | %12.0f %8.2f %8.2f | %8.2fx %8.2fx%s\n",
                    wl, c, x[1] / n, x[2] / n, x[3] / n, y[1] / n, y[2] / n, y[3] / n,
                    (y[1] > 0 ? x[1] / y[1] : 0), (y[2] > 0 ? x[2] / y[2] : 0),
                    (x[4] + y[4] > 0 ? sprintf("  (errors: raftkv %d, etcd %d)", x[4], y[4]) : "") }'
        done
    done
}

preload() { # every key of the read key space exists in both systems
    local sys
    for sys in raftkv etcd; do
        log "preloading $KEY_SPACE keys into $sys"
        local total=0 r
        while ((total < KEY_SPACE)); do
            r=$(run_wrk "$sys" 16 5s seq "$total")
            total=$((total + $(awk '{ print $5 - $4 }' <<<"$r")))
        done
    done
}

# ---------------------------------------------------------------- failover
# Kill -9 the leader; probers fire a write at each survivor every PROBE_MS (each with a 5 s
# timeout, so a write that waits for the new leader still counts when it succeeds); the
# failover time is the earliest successful completion minus the kill. Then restart the node.
failover_trial() { # system trial -> FAILOVER_MS (not via $(...): it restarts a node, PID must stick)
    local sys=$1 trial=$2 leader survivors=() i t0 stop="$WORK/failover.stop" succ="$WORK/failover.succ"
    leader=$(leader_index "$sys") || die "$sys has no leader before trial $trial"
    for i in 0 1 2; do ((i == leader)) || survivors+=("$i"); done
    rm -f "$stop" "$succ"
    t0=$(now_ns)
    kill -9 "${PID[$sys$((leader + 1))]}"
    wait "${PID[$sys$((leader + 1))]}" 2>/dev/null || true
    local probers=()
    for i in "${survivors[@]}"; do
        (
            n=0
            while [[ ! -e $stop ]]; do
                n=$((n + 1))
                (write_once "$sys" "$i" "failover-$trial-$i-$n" 5 && now_ns >>"$succ") &
                sleep "$(awk -v ms="$PROBE_MS" 'BEGIN { printf "%.3f", ms / 1000 }')"
            done
            wait
        ) &
        probers+=($!)
    done
    local deadline=$((SECONDS + 60))
    until [[ -s $succ ]]; do
        ((SECONDS < deadline)) || die "$sys: no write succeeded within 60 s of killing the leader"
        sleep 0.01
    done
    touch "$stop"
    wait "${probers[@]}" 2>/dev/null || true
    local first
    first=$(sort -n "$succ" | head -1)
    FAILOVER_MS=$(((first - t0) / 1000000))
    if [[ $sys == raftkv ]]; then start_raftkv_node "$leader"; else start_etcd_node "$leader"; fi
    wait_cluster "$sys"
    sleep 3 # let the restarted node catch up and the cluster settle
}

measure_failover() {
    local sys trial ms
    declare -gA FAILOVER
    for trial in $(seq 1 "$FAILOVER_TRIALS"); do
        for sys in raftkv etcd; do
            failover_trial "$sys" "$trial"
            ms=$FAILOVER_MS
            log "failover trial $trial $sys: $ms ms"
            FAILOVER[$sys]+="$ms "
        done
    done
}

# raftkv again with every node restarted with lease reads off (fast failover as before).
measure_failover_without_leases() {
    ((RAFTKV_LEASE_READS)) || return 0
    RAFTKV_LEASE_READS=0
    local i trial
    for i in 0 1 2; do
        kill -TERM "${PID[raftkv$((i + 1))]}" 2>/dev/null || true
        wait "${PID[raftkv$((i + 1))]}" 2>/dev/null || true
        start_raftkv_node "$i"
    done
    wait_cluster raftkv
    for trial in $(seq 1 "$FAILOVER_TRIALS"); do
        failover_trial raftkv "$trial"
        log "failover trial $trial raftkv (lease reads off): $FAILOVER_MS ms"
        FAILOVER[raftkv-nolease]+="$FAILOVER_MS "
    done
}

stats() { # "n n n" -> "median p90 max"
    tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -n | awk '{ v[NR] = $1 } END {
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        p = v[int(0.9 * NR + 0.999)]; if (p == "") p = v[NR]
        printf "%d %d %d", m, p, v[NR] }'
}

# ---------------------------------------------------------------- RSS
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

measure_rss() {
    local sys
    declare -gA RSS
    for sys in raftkv etcd; do
        local total=0 r secs=5
        log "writing $RSS_WRITES distinct keys into $sys (64 clients)"
        while ((total < RSS_WRITES)); do
            r=$(run_wrk "$sys" 64 "${secs}s" seq "$((KEY_SPACE + total))" 0)
            total=$((total + $(awk '{ print $5 - $4 }' <<<"$r")))
            # Size the next chunk from the rate just seen, so the run stops near the target.
            secs=$(awk -v left="$((RSS_WRITES - total))" -v rate="$(awk '{ print $1 }' <<<"$r")" \
                'BEGIN { s = (rate > 0) ? int(left / rate) + 1 : 5; if (s > 30) s = 30; if (s < 1) s = 1; print s }')
            log "  $sys: $total writes"
        done
        sleep 5
        RSS[$sys]="$(rss_kib "${PID[${sys}1]}") $(rss_kib "${PID[${sys}2]}") $(rss_kib "${PID[${sys}3]}") $total"
    done
}

# ---------------------------------------------------------------- main
main() {
    install_missing
    build_raftkv
    rm -rf "$WORK"
    mkdir -p "$WORK/raftkv" "$WORK/etcd"
    log "data under $WORK; etcd $(etcd --version | awk '/etcd Version/ { print $3 }'), wrk $(wrk -v 2>&1 | awk 'NR == 1 { print $2 }')"
    local i
    for i in 0 1 2; do start_raftkv_node "$i"; start_etcd_node "$i"; done
    wait_cluster raftkv
    wait_cluster etcd
    preload
    if has_phase table; then measure_table; fi
    LEASES_IN_TABLE=$RAFTKV_LEASE_READS
    if has_phase failover; then
        measure_failover
        measure_failover_without_leases
    fi
    if has_phase rss; then measure_rss; fi

    echo
    echo "raftkv vs etcd $(etcd --version | awk '/etcd Version/ { print $3 }') on $(nproc) cores, $(uname -r);" \
        "$DURATION per cell, mean of $ROUNDS A/B rounds, ${VALUE_SIZE}-byte values, $KEY_SPACE keys, leader endpoint"
    if has_phase table; then print_table; fi
    if has_phase failover; then print_failover; fi
    if has_phase rss; then print_rss; fi
}

has_phase() { [[ " $PHASES " == *" $1 "* ]]; }

print_failover() {
    local a b leases=$LEASES_IN_TABLE
    a=($(stats "${FAILOVER[raftkv]}"))
    b=($(stats "${FAILOVER[etcd]}"))
    printf '\nfailover (kill -9 leader -> first successful write, %d trials, probe every %d ms)\n' "$FAILOVER_TRIALS" "$PROBE_MS"
    printf '  raftkv: median %d ms, p90 %d ms, max %d ms   [%s]%s\n' "${a[@]}" "${FAILOVER[raftkv]% }" \
        "$( ((leases)) && echo '  (lease reads on)')"
    if [[ -n ${FAILOVER[raftkv-nolease]:-} ]]; then
        local n=($(stats "${FAILOVER[raftkv-nolease]}"))
        printf '  raftkv: median %d ms, p90 %d ms, max %d ms   [%s]  (lease reads off)\n' "${n[@]}" \
            "${FAILOVER[raftkv-nolease]% }"
    fi
    printf '  etcd:   median %d ms, p90 %d ms, max %d ms   [%s]\n' "${b[@]}" "${FAILOVER[etcd]% }"
    awk -v x="${a[0]}" -v y="${b[0]}" 'BEGIN { if (y > 0) printf "  median ratio raftkv/etcd: %.2fx\n", x / y }'
}

print_rss() {
    local a b
    a=(${RSS[raftkv]})
    b=(${RSS[etcd]})
    printf '\nRSS per node after %d (raftkv, --snapshot-every %s) / %d (etcd) writes, MiB\n' \
        "${a[3]}" "$SNAPSHOT_EVERY_SHOWN" "${b[3]}"
    printf '  raftkv: %d %d %d\n' $((a[0] / 1024)) $((a[1] / 1024)) $((a[2] / 1024))
    printf '  etcd:   %d %d %d\n' $((b[0] / 1024)) $((b[1] / 1024)) $((b[2] / 1024))
    awk -v a="${a[0]} ${a[1]} ${a[2]}" -v b="${b[0]} ${b[1]} ${b[2]}" 'BEGIN {
        split(a, x); split(b, y); mx = 0; my = 0
        for (i = 1; i <= 3; i++) { if (x[i] > mx) mx = x[i]; if (y[i] > my) my = y[i] }
        printf "  largest node ratio raftkv/etcd: %.2fx\n", mx / my }'
}

main "$@"
