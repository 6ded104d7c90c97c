#!/usr/bin/env bash
# Memory per idle WebSocket connection, epoll against io_uring: the server's resident memory
# (user space) and the kernel's slab memory (sockets, epoll items, io_uring requests), as the
# slope between two connection counts so that per-loop costs drop out (the loop's receive
# buffers are made resident before the first count, see `measure`). Runs are interleaved
# (epoll, uring, epoll, uring …) and every run uses its own server port, so that client sockets
# left in TIME_WAIT by one run do not collide with the next.
#
# The slab figure is machine-wide: it holds the load generator's sockets as well as the
# server's, identical for both backends, so the difference between the backends is the
# backend's own kernel cost. Reading /proc/slabinfo needs root.
#
# Usage: benches/memory-per-conn.sh [LOW HIGH ROUNDS]   (default 4000 14000 3)
# GALE=path/to/gale measures another build of the server (an earlier commit's, to compare).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOW=${1:-4000}
HIGH=${2:-14000}
ROUNDS=${3:-3}
[ -r /proc/slabinfo ] || { echo "memory-per-conn.sh: cannot read /proc/slabinfo (run as root)" >&2; exit 1; }

cargo build --release -p gale -p gale-loadgen
R=${CARGO_TARGET_DIR:-target}/release
GALE=${GALE:-$R/gale}
OUT=target/bench/memory-per-conn.tsv
mkdir -p target/bench
# Kernel objects that differ between the backends: epoll's items and per-file heads,
# io_uring's requests (an armed multishot receive holds one, with its poll entry in kmalloc-96).
CACHES="eventpoll_epi ep_head io_kiocb kmalloc-96"
echo -e "round\tbackend\tconnections\tserver_rss_bytes\tslab_bytes\t${CACHES// /\\t}" > "$OUT"

slab_bytes() { awk 'NR > 2 { total += $3 * $4 } END { printf "%d\n", total }' /proc/slabinfo; }
# Active objects of each cache in $CACHES, tab-separated.
cache_objects() {
    awk -v list="$CACHES" 'BEGIN { n = split(list, want, " ") } { have[$1] = $2 }
        END { for (i = 1; i <= n; i++) printf "%s%d", (i > 1 ? "\t" : ""), have[want[i]]; print "" }' /proc/slabinfo
}
rss_bytes() { awk '/^VmRSS:/ { print $2 * 1024 }' "/proc/$1/status"; }
established() { ss -Htn state established "( sport = :$1 )" | wc -l; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# One run: start a one-loop server, measure it idle, open N connections, measure again.
# Sets MEASURED to "rss_delta slab_delta object_deltas…" (not echoed: a command substitution
# would run it in a subshell, whose PIDs the clean-up would not see).
measure() {
    local backend=$1 n=$2 port=$3
    "$GALE" echo --port "$port" --threads 1 --compression off --backend "$backend" >/dev/null 2>&1 &
    local server=$!
    PIDS+=("$server")
    sleep 1
    # A few MiB through one connection first: the receive buffers are then resident before
    # the first reading. io_uring's ring (2 MiB per loop, consumed piece by piece) is
    # otherwise touched progressively by the handshakes themselves, about 200 bytes each,
    # and its pages would count as a per-connection cost in the slope.
    "$R/gale-loadgen" echo --url "ws://127.0.0.1:$port/" -c 1 -d 1 --warmup 0 -s 16384 \
        >/dev/null 2>&1 || true
    sleep 2
    local rss0 slab0 rss1 slab1 objs0 objs1
    rss0=$(rss_bytes "$server")
    slab0=$(slab_bytes)
    objs0=$(cache_objects)
    "$R/gale-loadgen" connect --url "ws://127.0.0.1:$port/" -c "$n" --hold 4 --source-ips 4 \
        >/dev/null 2>&1 &
    local client=$!
    PIDS+=("$client")
    for _ in $(seq 1 120); do
        [ "$(established "$port")" -ge "$n" ] && break
        sleep 0.25
    done
    sleep 0.5
    rss1=$(rss_bytes "$server")
    slab1=$(slab_bytes)
    objs1=$(cache_objects)
    wait "$client" || true
    kill "$server"
    wait "$server" 2>/dev/null || true
    MEASURED="$((rss1 - rss0)) $((slab1 - slab0)) $(paste <(echo "$objs0" | tr '\t' '\n') \
        <(echo "$objs1" | tr '\t' '\n') | awk '{ printf "%d ", $2 - $1 }')"
}

port=9700
for round in $(seq 1 "$ROUNDS"); do
    for n in "$LOW" "$HIGH"; do
        for backend in epoll uring; do
            port=$((port + 1))
            measure "$backend" "$n" "$port"
            read -r rss slab objs <<< "$MEASURED"
            echo -e "$round\t$backend\t$n\t$rss\t$slab\t${objs// /\\t}" >> "$OUT"
            echo "round $round: $backend, $n connections: server RSS +$rss B, slab +$slab B" >&2
        done
    done
done

python3 - "$OUT" "$LOW" "$HIGH" <<'EOF'
import csv, statistics, sys
path, low, high = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = list(csv.DictReader(open(path), delimiter="\t"))
print(f"| backend | server RSS per connection | kernel slab per connection (both ends) | sum |")
print("|---|---:|---:|---:|")
for backend in ("epoll", "uring"):
    slopes = {"rss": [], "slab": []}
    for rnd in sorted({r["round"] for r in rows}):
        pick = {int(r["connections"]): r for r in rows if r["round"] == rnd and r["backend"] == backend}
        for key, col in (("rss", "server_rss_bytes"), ("slab", "slab_bytes")):
            slopes[key].append((int(pick[high][col]) - int(pick[low][col])) / (high - low))
    rss, slab = statistics.median(slopes["rss"]), statistics.median(slopes["slab"])
    spread = lambda xs: f"{min(xs):.0f}-{max(xs):.0f}"
    print(f"| {backend} | {rss:.0f} B ({spread(slopes['rss'])}) | {slab:.0f} B ({spread(slopes['slab'])}) | {rss + slab:.0f} B |")
caches = list(rows[0].keys())[5:]
print()
print("| backend | " + " | ".join(f"{c} objects per connection" for c in caches) + " |")
print("|---|" + "---:|" * len(caches))
for backend in ("epoll", "uring"):
    cells = []
    for c in caches:
        per = []
        for rnd in sorted({r["round"] for r in rows}):
            pick = {int(r["connections"]): r for r in rows if r["round"] == rnd and r["backend"] == backend}
            per.append((int(pick[high][c]) - int(pick[low][c])) / (high - low))
        cells.append(f"{statistics.median(per):.2f}")
    print(f"| {backend} | " + " | ".join(cells) + " |")
EOF
