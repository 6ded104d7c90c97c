#!/usr/bin/env bash
# Cluster fan-out: the same subscribers and publishes on one `gale serve` node, and spread
# over two nodes sharing topics through Redis (publishing through node A, then through node B),
# interleaved over rounds. Each run is a `gale-loadgen fanout --protocol gale`; server CPU
# counts every process that serves it (the nodes, and redis-server in cluster runs).
# Results: target/bench/cluster/*.json and the table printed at the end.
#
# Usage: benches/cluster-fanout.sh [SUBSCRIBERS] [RATE] [ROUNDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SUBS=${1:-2000}
RATE=${2:-100}
ROUNDS=${3:-3}
cargo build --release -p gale -p gale-loadgen
R=target/release
OUT=target/bench/cluster
mkdir -p "$OUT"
export GALE_API_KEY=bench-key
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

RP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 &
REDIS=$!; PIDS+=("$REDIS")
# Sets LAST_PID (not echoed: a command substitution would run it in a subshell, out of reach
# of the clean-up).
start_node() { # port broker threads
    local extra=()
    [ -n "$2" ] && extra=(--broker "$2")
    "$R/gale" serve --listen "127.0.0.1:$1" --threads "$3" "${extra[@]}" >/dev/null 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}
A=$(free_port); B=$(free_port); S=$(free_port)
start_node "$A" "redis://127.0.0.1:$RP" 1; PA=$LAST_PID
start_node "$B" "redis://127.0.0.1:$RP" 1; PB=$LAST_PID
start_node "$S" "" 2; PS=$LAST_PID
sleep 1
fanout() { # name json args...
    local name=$1; shift
    "$R/gale-loadgen" fanout --protocol gale --topic chat:bench -c "$SUBS" --rate "$RATE" -d 5 --warmup 1 \
        --json "$OUT/$name.json" "$@" >/dev/null 2>&1 || echo "$name: run failed" >&2
}
for round in $(seq 1 "$ROUNDS"); do
    echo "round $round" >&2
    fanout "single-$round" --url "ws://127.0.0.1:$S/ws" --publish-url "http://127.0.0.1:$S" --server-pid "$PS"
    sleep 2
    fanout "cluster-via-a-$round" --url "ws://127.0.0.1:$A/ws" --url "ws://127.0.0.1:$B/ws" \
        --publish-url "http://127.0.0.1:$A" --server-pid "$PA" --server-pid "$PB" --server-pid "$REDIS"
    sleep 2
    fanout "cluster-via-b-$round" --url "ws://127.0.0.1:$A/ws" --url "ws://127.0.0.1:$B/ws" \
        --publish-url "http://127.0.0.1:$B" --server-pid "$PA" --server-pid "$PB" --server-pid "$REDIS"
    sleep 2
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
print("| setup | deliveries/s | lost | dup | p50 µs | p99 µs | server CPU ms / 1k deliveries |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name in ["single", "cluster-via-a", "cluster-via-b"]:
    reps = [json.load(open(f"{out}/{name}-{r}.json")) for r in range(1, rounds + 1)]
    med = lambda f: statistics.median(f(r) for r in reps)
    print(f"| {name} | {med(lambda r: r['deliveries_per_sec']):,.0f} | {sum(r['lost'] for r in reps)} | "
          f"{sum(r['duplicated'] for r in reps)} | {med(lambda r: r['latency_us']['p50']):,.0f} | "
          f"{med(lambda r: r['latency_us']['p99']):,.0f} | {med(lambda r: r['server']['cpu_ms_per_1k_msgs']):.2f} |")
PY
