#!/usr/bin/env bash
# Cluster shards: two `gale serve` gateways sharing topics through one Redis primary, then
# through a Redis Cluster of three primaries (no replicas), with 1,000 and 10,000 topics, run
# once side by side. Each run (benches/cluster_shards.py) subscribes one client per gateway to
# every topic, then publishes batches of 100 items over HTTP, topics round-robin, to the two
# gateways in turn as fast as they answer; it reports the publishes acknowledged per second and
# the gateways' CPU (user + system) per 1,000 deliveries. Every process is on this machine.
# Results: target/bench/cluster-shards/results.jsonl and the table printed at the end.
#
# Usage: benches/cluster-shards.sh [SECONDS] [PUBLISHERS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS_PER_RUN=${1:-5}
PUBLISHERS=${2:-4}
cargo build --release -p gale
R="${CARGO_TARGET_DIR:-target}/release"
OUT=target/bench/cluster-shards
mkdir -p "$OUT"
: >"$OUT/results.jsonl"
export GALE_API_KEY=bench-key
DATA=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$DATA"; }
trap cleanup EXIT

CONFIG="$DATA/gale.toml"
cat >"$CONFIG" <<'EOF'
[websocket]
max_subscriptions = 10000
compression = "off"
[limits]
client_subscribe_rate = 100000.0
client_subscribe_burst = 100000
EOF

# Sets LAST_PID (not echoed: a command substitution would run it in a subshell, out of reach
# of the clean-up).
start_redis() { # port [cluster bus port]
    local extra=()
    [ -n "${2:-}" ] && extra=(--cluster-enabled yes --cluster-port "$2" --cluster-config-file nodes.conf
        --cluster-node-timeout 5000)
    mkdir -p "$DATA/$1"
    redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no --dir "$DATA/$1" "${extra[@]}" \
        >/dev/null 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    until redis-cli -p "$1" PING >/dev/null 2>&1; do sleep 0.05; done
}
start_gateway() { # port broker
    "$R/gale" serve --config "$CONFIG" --listen "127.0.0.1:$1" --threads 1 --broker "$2" >/dev/null 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    until curl -sf "http://127.0.0.1:$1/healthz" >/dev/null 2>&1; do sleep 0.1; done
}

SINGLE=$(free_port)
start_redis "$SINGLE"
CLUSTER=()
for _ in 1 2 3; do
    p=$(free_port)
    start_redis "$p" "$(free_port)"
    CLUSTER+=("127.0.0.1:$p")
done
redis-cli --cluster create "${CLUSTER[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
until [ "$(redis-cli -p "${CLUSTER[0]#*:}" CLUSTER INFO | tr -d '\r' | grep cluster_state)" = "cluster_state:ok" ]; do
    sleep 0.1
done

run() { # name broker topics
    local a b pa pb
    a=$(free_port); b=$(free_port)
    start_gateway "$a" "$2"; pa=$LAST_PID
    start_gateway "$b" "$2"; pb=$LAST_PID
    echo "$1, $3 topics" >&2
    python3 benches/cluster_shards.py "$1" "$3" "$SECONDS_PER_RUN" "$PUBLISHERS" "$a:$pa" "$b:$pb" \
        >>"$OUT/results.jsonl"
    kill "$pa" "$pb"
    wait "$pa" "$pb" 2>/dev/null || true
}
CLUSTER_URL="redis+cluster://$(IFS=,; echo "${CLUSTER[*]}")"
for topics in 1000 10000; do
    run "one primary" "redis://127.0.0.1:$SINGLE" "$topics"
    run "3-shard cluster" "$CLUSTER_URL" "$topics"
done
python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| broker | topics | publishes/s | deliveries (expected) | gateway CPU ms / 1k deliveries |")
print("|---|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['setup']} | {r['topics']:,} | {r['publishes_per_sec']:,} | {r['deliveries']:,} "
          f"({r['expected_deliveries']:,}) | {r['gateway_cpu_ms_per_1k_deliveries']:.2f} |")
PY
