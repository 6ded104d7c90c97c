#!/usr/bin/env bash
# Cluster shards: two `gale serve` gateways sharing topics through one Redis primary, then
# through a Redis Cluster of three primaries (no replicas), with 1,000 and 10,000 topics, side
# by side. Each run (benches/cluster_shards.py) subscribes one client per gateway to every
# topic, then publishes batches of BATCH items over HTTP, topics round-robin, to the two
# gateways in turn as fast as they answer; it reports the publishes acknowledged per second,
# the gateways' CPU per 1,000 deliveries, Redis's CPU per publish and the busiest Redis node's
# CPU, and what shapes a gateway's cost per delivery: the commands each round trip to a Redis
# node carries, the messages each pass of the listener brings (from the gateways' /metrics), and
# how often the gateways' threads went to sleep (voluntary context switches, /proc). Every
# process is on this machine.
#
# With REDIS_CPU set (a share of one core, e.g. 0.25), every Redis node runs in a cgroup of its
# own with that CPU budget, as if each were a machine of that size: the regime where one
# primary's CPU is the limit, which on one small machine the gateways and the load would
# otherwise reach first. It needs a writable cgroup cpu controller (v1 or v2; root).
# REDIS_CORES and GATEWAY_CORES (taskset lists, e.g. 1 and 0) pin the Redis nodes and the
# gateways to cores of their own, so that the gateways share no core with Redis; LOAD_CORES
# pins the publishers and subscribers (Python processes), e.g. beside Redis.
# PERF_SYSCALLS=1 adds the gateways' system calls and context switches per delivery (perf);
# PERF_RECORD=DIR records their profiles (`perf record -g`) into DIR, one file per setup.
# ONE_SHARD=1 adds a third setup between the two: a Redis Cluster of one primary holding every
# slot, so that the cluster's layout and protocol (hash tags, sharded channels, the registry
# per slot, the topic count) are measured apart from talking to three nodes.
# ROUNDS (default 1) repeats the runs, interleaved (one primary, then the cluster, for each
# count of topics, round after round); the table gives the median of each figure over the
# rounds and the range of the gateways' CPU per delivery.
# CALLGRIND="SHORT LONG" counts instead the user-space instructions per delivery of one
# gateway (epoll backend, under `valgrind --tool=callgrind`; the other gateway runs as usual):
# each publisher sends SHORT batches in one gateway life and LONG in another, and the
# difference of the two counts over the difference of their deliveries leaves out what both
# lives share (start, subscribes, shutdown); a life without callgrind publishes to every topic
# first, so that both meet the same Redis. A repeatable figure where seconds of CPU are not.
# Work done once a second (the cluster's topic count, `Broker::count_and_check`, and the scan
# for topics nobody subscribes to, `Broker::forget_idle_topics`) grows with a life's length,
# which callgrind stretches some 50 times while the deliveries stay as many: the table gives
# the instructions per delivery with and without it, and each life's length.
# RAW=1 adds, after each gateway run, a run of `peer-redis-raw` (benches/peers) on the same
# Redis setup, on the gateways' cores, at the publishes per second the gateways just reached and
# with as many publishes per round trip as theirs carried (or PIPELINE): a client that makes the
# gateways' round trips to Redis (pipelined publishes split over the nodes that own them; one
# subscribed connection per primary, read on an edge-triggered poll) and does nothing else; the
# publishers and subscribers are not running then. What three primaries add to its CPU per
# message is what they add to a client that reads each primary's arrivals as they come; a
# second table sets that against what they add to a gateway's.
# RATE=N paces the publishers to N publishes a second in all (default: as fast as answered), so
# that every setup is measured at the same rate: a cost per delivery depends on how many
# deliveries each wake-up and round trip carries, and so on the rate.
# Results: target/bench/cluster-shards/results.jsonl (raw.jsonl) and the tables printed at the end.
#
# Usage: [REDIS_CPU=0.25] [REDIS_CORES=1 GATEWAY_CORES=0 [LOAD_CORES=1]] [BATCH=100] [TOPICS="1000 10000"] [ROUNDS=1]
#        [PERF_SYSCALLS=1] [PERF_RECORD=DIR] [ONE_SHARD=1] [RAW=1 [PIPELINE=N]] [RATE=N]
#        benches/cluster-shards.sh [SECONDS] [PUBLISHERS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS_PER_RUN=${1:-5}
PUBLISHERS=${2:-4}
BATCH=${BATCH:-100}
TOPICS=${TOPICS:-1000 10000}
REDIS_CPU=${REDIS_CPU:-}
ROUNDS=${ROUNDS:-1}
RAW=${RAW:-}
PIPELINE=${PIPELINE:-}
cargo build --release -p gale
[ -z "$RAW" ] || cargo build --release -p gale-peers --bin peer-redis-raw
R="${CARGO_TARGET_DIR:-target}/release"
OUT=target/bench/cluster-shards
mkdir -p "$OUT"
: >"$OUT/results.jsonl"
: >"$OUT/raw.jsonl"
export GALE_API_KEY=bench-key
DATA=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PIDS=()
CGROUPS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for g in "${CGROUPS[@]}"; do rmdir "$g" 2>/dev/null || true; done
    rm -rf "$DATA"
}
trap cleanup EXIT

# A cgroup with REDIS_CPU of one core for process $1.
limit_cpu() {
    local pid=$1 quota g
    quota=$(python3 -c "print(int(float('$REDIS_CPU') * 100000))")
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then # v2
        g=/sys/fs/cgroup/gale-bench-redis-$pid
        mkdir "$g" && echo "$quota 100000" >"$g/cpu.max" && echo "$pid" >"$g/cgroup.procs"
    elif [ -d /sys/fs/cgroup/cpu ]; then # v1
        g=/sys/fs/cgroup/cpu/gale-bench-redis-$pid
        mkdir "$g" && echo 100000 >"$g/cpu.cfs_period_us" && echo "$quota" >"$g/cpu.cfs_quota_us" &&
            echo "$pid" >"$g/tasks"
    else
        echo "cluster-shards: REDIS_CPU needs a cgroup cpu controller; none is mounted" >&2
        exit 2
    fi || { echo "cluster-shards: cannot make the cgroup $g (REDIS_CPU needs root)" >&2; exit 2; }
    CGROUPS+=("$g")
}

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
    ${REDIS_CORES:+taskset -c "$REDIS_CORES"} redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no --dir "$DATA/$1" "${extra[@]}" \
        >/dev/null 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    until redis-cli -p "$1" PING >/dev/null 2>&1; do sleep 0.05; done
    [ -z "$REDIS_CPU" ] || limit_cpu "$LAST_PID"
}
start_gateway() { # port broker [command prefix...]
    local port=$1 broker=$2
    shift 2
    ${GATEWAY_CORES:+taskset -c "$GATEWAY_CORES"} "$@" "$R/gale" serve --config "$CONFIG" --listen "127.0.0.1:$port" --threads 1 --broker "$broker" \
        ${CALLGRIND:+--backend epoll} >/dev/null 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
    until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; do sleep 0.1; done
}

SINGLE=$(free_port)
start_redis "$SINGLE"
SINGLE_PID=$LAST_PID
CLUSTER=()
CLUSTER_PIDS=()
for _ in 1 2 3; do
    p=$(free_port)
    start_redis "$p" "$(free_port)"
    CLUSTER+=("127.0.0.1:$p")
    CLUSTER_PIDS+=("$LAST_PID")
done
redis-cli --cluster create "${CLUSTER[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
cluster_ok() { [ "$(redis-cli -p "$1" CLUSTER INFO | tr -d '\r' | grep cluster_state)" = "cluster_state:ok" ]; }
until cluster_ok "${CLUSTER[0]#*:}"; do sleep 0.1; done
if [ "${ONE_SHARD:-}" = 1 ]; then
    ONE_SHARD_PORT=$(free_port)
    start_redis "$ONE_SHARD_PORT" "$(free_port)"
    ONE_SHARD_PID=$LAST_PID
    redis-cli -p "$ONE_SHARD_PORT" CLUSTER ADDSLOTSRANGE 0 16383 >/dev/null
    until cluster_ok "$ONE_SHARD_PORT"; do sleep 0.1; done
fi

# Callgrind mode: one gateway life under callgrind per size; appends {"setup", "topics",
# "batches", "instructions", "deliveries"} (that gateway's) to the results.
count_run() { # name broker topics redis-pids
    local a b pa pb size out ir
    # First, without callgrind, publish to every topic once: both measured lives then meet a
    # Redis that holds every topic (otherwise the shorter life would create them, paying what
    # the longer one does not).
    a=$(free_port); b=$(free_port)
    start_gateway "$a" "$2"; pa=$LAST_PID
    start_gateway "$b" "$2"; pb=$LAST_PID
    RATE='' BATCHES=$(( ($3 + PUBLISHERS * BATCH - 1) / (PUBLISHERS * BATCH) )) python3 benches/cluster_shards.py \
        "$1" "$3" 1 "$PUBLISHERS" "$BATCH" "$a:$pa,$b:$pb" "$4" "" >/dev/null
    kill -TERM "$pa" "$pb"
    wait "$pa" "$pb" 2>/dev/null || true
    for size in $CALLGRIND; do
        a=$(free_port); b=$(free_port)
        out="$OUT/callgrind-$a.out"
        LIFE_START=$(date +%s.%N)
        start_gateway "$a" "$2" valgrind --tool=callgrind --callgrind-out-file="$out"; pa=$LAST_PID
        start_gateway "$b" "$2"; pb=$LAST_PID
        echo "$1, $3 topics, $size batches per publisher, under callgrind" >&2
        RATE='' BATCHES=$size python3 benches/cluster_shards.py "$1" "$3" 1 "$PUBLISHERS" "$BATCH" \
            "$a:$pa,$b:$pb" "$4" "" >"$OUT/run.json"
        kill -TERM "$pa" "$pb"
        wait "$pa" "$pb" 2>/dev/null || true
        python3 - "$OUT/run.json" "$size" "$out" "$LIFE_START" >>"$OUT/results.jsonl" <<'PY'
import json, re, subprocess, sys, time
r = json.load(open(sys.argv[1]))
out = sys.argv[3]
text = open(out, errors="replace").read()
total = int(re.search(r"^(?:summary|totals): (\d+)", text, re.M).group(1))
# Inclusive instructions of the once-a-second work. A function's code inlined from other
# source files gets lines of its own, each a part of the function's whole, which is the
# largest of them.
annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", out],
                           capture_output=True, text=True).stdout
whole = {}
for line in annotated.splitlines():
    m = re.match(r"\s*([\d,]+) \(.*?\)\s+\S*?:(\S+::(?:count_and_check|forget_idle_topics))\b", line)
    if m:
        whole[m.group(2)] = max(whole.get(m.group(2), 0), int(m.group(1).replace(",", "")))
periodic = sum(whole.values())
print(json.dumps({"setup": r["setup"], "topics": r["topics"], "batches": int(sys.argv[2]),
                  "instructions": total, "periodic": periodic, "deliveries": r["deliveries"] // 2,
                  "life_s": round(time.time() - float(sys.argv[4]), 1)}))
PY
    done
}

run() { # name broker topics redis-pids raw-client-nodes...
    local a b pa pb rate pipeline
    if [ -n "${CALLGRIND:-}" ]; then
        count_run "$@"
        return
    fi
    a=$(free_port); b=$(free_port)
    start_gateway "$a" "$2"; pa=$LAST_PID
    start_gateway "$b" "$2"; pb=$LAST_PID
    echo "$1, $3 topics" >&2
    ${LOAD_CORES:+taskset -c "$LOAD_CORES"} python3 benches/cluster_shards.py "$1" "$3" "$SECONDS_PER_RUN" \
        "$PUBLISHERS" "$BATCH" "$a:$pa,$b:$pb" "$4" "$REDIS_CPU" >>"$OUT/results.jsonl"
    kill "$pa" "$pb"
    wait "$pa" "$pb" 2>/dev/null || true
    if [ -n "$RAW" ]; then
        # The gateways' rate, and the publishes of one of their batches: the commands of a
        # round trip to one node times the nodes (the last argument names them).
        read -r rate pipeline < <(tail -n 1 "$OUT/results.jsonl" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(max(1, r["publishes_per_sec"]), max(1, round(r["commands_per_pipeline"] * len(sys.argv[1].split(",")))))' "${*: -1}")
        pipeline=${PIPELINE:-$pipeline}
        echo "$1, $3 topics: the raw client at $rate publishes/s, $pipeline per round trip" >&2
        ${GATEWAY_CORES:+taskset -c "$GATEWAY_CORES"} "$R/peer-redis-raw" "${@:5}" --topics "$3" --rate "$rate" \
            --pipeline "$pipeline" --seconds "$SECONDS_PER_RUN" |
            python3 -c 'import json, sys; r = json.load(sys.stdin); r["setup"] = sys.argv[1]; print(json.dumps(r))' "$1" \
            >>"$OUT/raw.jsonl"
    fi
}
CLUSTER_URL="redis+cluster://$(IFS=,; echo "${CLUSTER[*]}")"
for ((round = 1; round <= ROUNDS; round++)); do
    for topics in $TOPICS; do
        run "one primary" "redis://127.0.0.1:$SINGLE" "$topics" "$SINGLE_PID" --nodes "127.0.0.1:$SINGLE"
        if [ "${ONE_SHARD:-}" = 1 ]; then
            run "1-shard cluster" "redis+cluster://127.0.0.1:$ONE_SHARD_PORT" "$topics" "$ONE_SHARD_PID" \
                --cluster --nodes "127.0.0.1:$ONE_SHARD_PORT"
        fi
        run "3-shard cluster" "$CLUSTER_URL" "$topics" "$(IFS=,; echo "${CLUSTER_PIDS[*]}")" \
            --cluster --nodes "$(IFS=,; echo "${CLUSTER[*]}")"
    done
done
if [ -n "${CALLGRIND:-}" ]; then
    python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
groups = {}
for r in rows:
    groups.setdefault((r["topics"], r["setup"]), []).append(r)
print("| broker | topics | deliveries (short, long) | lives (s) | instructions (long − short) "
      "| instructions / delivery | of which once a second | without it |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
per, net = {}, {}
for (topics, setup), g in groups.items():
    short, long = min(g, key=lambda r: r["batches"]), max(g, key=lambda r: r["batches"])
    d, ir = long["deliveries"] - short["deliveries"], long["instructions"] - short["instructions"]
    periodic = long["periodic"] - short["periodic"]
    per[(topics, setup)] = ir / max(d, 1)
    net[(topics, setup)] = (ir - periodic) / max(d, 1)
    print(f"| {setup} | {topics:,} | {short['deliveries']:,}, {long['deliveries']:,} "
          f"| {short['life_s']:.0f}, {long['life_s']:.0f} | {ir:,} | {ir / max(d, 1):,.0f} "
          f"| {periodic / max(d, 1):,.0f} | {(ir - periodic) / max(d, 1):,.0f} |")
for topics in sorted({t for t, _ in per}):
    if (topics, "3-shard cluster") in per and (topics, "one primary") in per:
        key, one = (topics, "3-shard cluster"), (topics, "one primary")
        print(f"{topics:,} topics: cluster / one primary = {per[key] / per[one]:.3f}; "
              f"without the once-a-second work {net[key] / net[one]:.3f}")
PY
    exit 0
fi
python3 - "$OUT/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
budget = rows[0]["redis_cpu_budget"]
groups = {}
for r in rows:
    groups.setdefault((r["topics"], r["setup"]), []).append(r)
rounds = max(len(g) for g in groups.values())
print(f"Redis CPU budget per node: {budget if budget else 'none (the machine shared)'}; "
      f"{rows[0]['batch']} items per request; "
      + (f"medians of {rounds} rounds" if rounds > 1 else "one run"))
perf = all("gateway_syscalls_per_delivery" in r for r in rows)
print("| broker | topics | publishes/s | deliveries (expected) | gateway CPU ms / 1k deliveries "
      "(range) | of which system | Redis CPU µs / publish | busiest Redis node (cores) | subscribe s |"
      " commands / pipeline | messages / listener pass | sleeps / 1k deliveries (broker, listener, loop) |"
      + (" gateway syscalls / delivery | context switches / delivery |" if perf else ""))
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if perf else ""))
# Medians of the sleeps of the broker's command thread, its listener and the loop.
sleeps = lambda g: ", ".join(f"{statistics.median(r['sleeps_per_1k_deliveries'].get(t, 0) for r in g):.1f}"
                             for t in ("gale-broker", "gale-broker-lis", "gale-loop-0"))
for (topics, setup), g in groups.items():
    med = lambda key: statistics.median(r[key] for r in g)
    cpu = [r["gateway_cpu_ms_per_1k_deliveries"] for r in g]
    span = f" ({min(cpu):.2f}-{max(cpu):.2f})" if len(g) > 1 else ""
    print(f"| {setup} | {topics:,} | {med('publishes_per_sec'):,.0f} | {sum(r['deliveries'] for r in g):,} "
          f"({sum(r['expected_deliveries'] for r in g):,}) | {med('gateway_cpu_ms_per_1k_deliveries'):.2f}{span} "
          f"| {med('gateway_system_ms_per_1k_deliveries'):.2f} "
          f"| {med('redis_cpu_us_per_publish'):.1f} | {med('busiest_redis_cores'):.2f} | {med('subscribe_s'):.1f} |"
          f" {med('commands_per_pipeline'):.1f} | {med('messages_per_listener_pass'):.1f} |"
          f" {sleeps(g)} |"
          + (f" {med('gateway_syscalls_per_delivery'):.2f} | {med('gateway_context_switches_per_delivery'):.3f} |"
             if perf else ""))
PY
[ -z "$RAW" ] || python3 - "$OUT/results.jsonl" "$OUT/raw.jsonl" <<'PY'
import json, statistics, sys
gateway = [json.loads(line) for line in open(sys.argv[1])]
raw = [json.loads(line) for line in open(sys.argv[2])]
def cpu(r, side):
    """The raw client's CPU per 1k messages on one `side` (publisher, listener), user + system."""
    return r[f"{side}_user_ms_per_1k"] + r[f"{side}_system_ms_per_1k"]
# A gateway publishes half of the messages (the publishers alternate between the two) and
# receives all of them, one delivery each: the raw client's share of a gateway's work per
# delivery is half its publishing CPU per message plus its listening CPU per message.
def share(r):
    return 0.5 * cpu(r, "publisher") + cpu(r, "listener")
groups = {}
for r in gateway:
    groups.setdefault((r["topics"], r["setup"]), {"gateway": [], "raw": [], "threads": []})
    groups[(r["topics"], r["setup"])]["gateway"].append(r["gateway_cpu_ms_per_1k_deliveries"])
    groups[(r["topics"], r["setup"])]["threads"].append(r["thread_cpu_ms_per_1k_deliveries"])
for r in raw:
    groups[(r["topics"], r["setup"])]["raw"].append(r)
print()
print("The raw client on the same setups (medians; CPU per 1k messages, user + system; "
      "sleeps per 1k messages):")
print("| broker | topics | publishes/s | publishing ms / 1k (sleeps) | listening ms / 1k (sleeps) "
      "| raw share of a gateway's ms / 1k deliveries | change from one primary (median per round) "
      "| gateway ms / 1k deliveries | change from one primary (median per round) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
med = statistics.median
for (topics, setup), g in groups.items():
    base = groups.get((topics, "one primary"))
    rs = g["raw"]
    pub = med(cpu(r, "publisher") for r in rs)
    lis = med(cpu(r, "listener") for r in rs)
    # Changes are the medians of each round's difference from that round's one primary.
    raw_change = med(share(r) - share(b) for r, b in zip(rs, base["raw"]))
    gw_change = med(x - b for x, b in zip(g["gateway"], base["gateway"]))
    print(f"| {setup} | {topics:,} | {med(r['publishes_per_sec'] for r in rs):,.0f} "
          f"| {pub:.3f} ({med(r['publisher_sleeps_per_1k'] for r in rs):.1f}) "
          f"| {lis:.3f} ({med(r['listener_sleeps_per_1k'] for r in rs):.1f}) "
          f"| {med(share(r) for r in rs):.3f} | {raw_change:+.3f} "
          f"| {med(g['gateway']):.2f} | {gw_change:+.2f} |")
# Where a gateway's change goes, by thread, beside the raw client's two threads.
THREADS = (("command thread", "gale-broker"), ("listener", "gale-broker-lis"), ("loop", "gale-loop-0"))
print()
print("Change from one primary by thread (medians per round; ms per 1k deliveries; the raw "
      "client's publishing counted half, as a gateway publishes half):")
print("| broker | topics | " + " | ".join(f"gateway {t}" for t, _ in THREADS)
      + " | gateway, other threads | raw publishing (half) | raw listening |")
print("|---|---:|" + "---:|" * (len(THREADS) + 3))
for (topics, setup), g in groups.items():
    base = groups.get((topics, "one primary"))
    if setup == "one primary":
        continue
    cells = []
    for _, name in THREADS:
        cells.append(med(t.get(name, 0) - b.get(name, 0) for t, b in zip(g["threads"], base["threads"])))
    named = {n for _, n in THREADS}
    other = lambda t: sum(v for k, v in t.items() if k not in named)
    cells.append(med(other(t) - other(b) for t, b in zip(g["threads"], base["threads"])))
    cells.append(med(0.5 * (cpu(r, "publisher") - cpu(b, "publisher")) for r, b in zip(g["raw"], base["raw"])))
    cells.append(med(cpu(r, "listener") - cpu(b, "listener") for r, b in zip(g["raw"], base["raw"])))
    print(f"| {setup} | {topics:,} | " + " | ".join(f"{c:+.3f}" for c in cells) + " |")
PY
