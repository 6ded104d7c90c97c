#!/usr/bin/env bash
# User-space instructions per delivery of plain fan-out servers (subscribers on /sub, a
# WebSocket publisher on /pub: Gale's broadcast example, peer-raw-tcp-fanout, uWebSockets'
# C++ pub/sub), counted by callgrind: a repeatable figure on a busy machine, where seconds of
# CPU are not. Each server runs under callgrind twice per round, serving one
# `gale-loadgen fanout` run of SHORT and of LONG seconds (after 1 s of warm-up); the
# difference of the two instruction counts over the difference of their deliveries leaves out
# what both runs share (start, handshakes, subscribes, shutdown). Kernel work (the TCP sends
# themselves) is not counted: callgrind sees user space only. The counts are taken with
# `callgrind_control -d` when the run is over, so Gale's io_uring backend, whose loop never
# exits under valgrind 3.19, is measured too.
#
# PROTOCOL=gale measures `gale serve` the same way (subscribers on /ws, HTTP publishes; the
# command then takes `--listen 127.0.0.1:{port}`), so that it can be set against the example.
#
# Usage: [LOADGEN=path] [SHORT=s] [LONG=s] [PROTOCOL=plain|gale] benches/callgrind-fanout-plain.sh "NAME=COMMAND --port {port}" ... [-- SUBSCRIBERS RATE ROUNDS]
#   e.g. benches/callgrind-fanout-plain.sh "raw-tcp=target/release/peer-raw-tcp-fanout --port {port} --threads 1" -- 1000 10 1
#        PROTOCOL=gale benches/callgrind-fanout-plain.sh "gale-serve-1-epoll=target/release/gale serve --listen 127.0.0.1:{port} --threads 1 --backend epoll" -- 1000 40 1
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SERVERS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do SERVERS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
SUBS=${1:-1000}
RATE=${2:-10}
ROUNDS=${3:-1}
SHORT=${SHORT:-2}
LONG=${LONG:-8}
PROTOCOL=${PROTOCOL:-plain}
case "$PROTOCOL" in
    plain) CLIENT=(--protocol plain); SUB_PATH=/sub; PUB_URL=ws://127.0.0.1:{port}/pub ;;
    gale) CLIENT=(--protocol gale --topic chat:bench); SUB_PATH=/ws; PUB_URL=http://127.0.0.1:{port}
          export GALE_API_KEY=${GALE_API_KEY:-bench-key} ;;
    *) echo "PROTOCOL is plain or gale" >&2; exit 2 ;;
esac
[ ${#SERVERS[@]} -gt 0 ] || { echo "usage: $0 \"NAME=COMMAND --port {port}\" ... [-- SUBSCRIBERS RATE ROUNDS]" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt install valgrind)" >&2; exit 2; }
# LOADGEN=path skips the build (a build of gale-loadgen alone relinks it with other features).
if [ -z "${LOADGEN:-}" ]; then
    cargo build --release -p gale-loadgen
    LOADGEN=${CARGO_TARGET_DIR:-target}/release/gale-loadgen
fi
OUT=target/bench/callgrind-fanout-plain
mkdir -p "$OUT"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# One server life under callgrind serving one fan-out run of $2 seconds: "instructions deliveries".
measure() {
    local name=$1 cmd=$2 secs=$3 tag=$4 port server ir got
    port=$(free_port)
    rm -f "$OUT/$tag.out" "$OUT/$tag.out".*
    # shellcheck disable=SC2086 # the command is split into words on purpose
    valgrind --tool=callgrind --callgrind-out-file="$OUT/$tag.out" ${cmd//\{port\}/$port} >"$OUT/$tag.log" 2>&1 &
    server=$!
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    "$LOADGEN" fanout "${CLIENT[@]}" -c "$SUBS" --rate "$RATE" -d "$secs" --warmup 1 --timeout 60 \
        --url "ws://127.0.0.1:$port$SUB_PATH" --publish-url "${PUB_URL//\{port\}/$port}" \
        --json "$OUT/$tag.json" >/dev/null 2>&1 || echo "$name: the fan-out run failed" >&2
    # The counts are dumped (callgrind_control) once the run is over, before the server is
    # stopped: its shutdown is left out, and a server that never exits under valgrind (Gale's
    # io_uring loop) is measured all the same. Then SIGINT, SIGTERM, and SIGKILL for one that
    # ignores both.
    callgrind_control -d "$server" >/dev/null 2>&1 || echo "$name: no dump" >&2
    kill -INT "$server"
    for _ in $(seq 1 30); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
    kill -TERM "$server" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$server" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server" 2>/dev/null || true
    wait "$server" || true
    ir=$(sed -n 's/^summary: \([0-9]*\).*/\1/p' "$OUT/$tag.out.1" 2>/dev/null)
    got=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["delivered"])' "$OUT/$tag.json" 2>/dev/null || echo 0)
    echo "${ir:-0} $got"
}

echo "| round | server | subscribers × publishes/s | deliveries (${LONG} s − ${SHORT} s) | instructions (difference) | instructions / delivery |"
echo "|---|---|---|---:|---:|---:|"
for round in $(seq 1 "$ROUNDS"); do
    for server in "${SERVERS[@]}"; do
        name=${server%%=*}; cmd=${server#*=}
        read -r ir_short got_short <<<"$(measure "$name" "$cmd" "$SHORT" "$name-$round-short")"
        read -r ir_long got_long <<<"$(measure "$name" "$cmd" "$LONG" "$name-$round-long")"
        python3 -c '
import sys
name, rnd, case, i1, d1, i2, d2 = sys.argv[1:]
di, dd = int(i2) - int(i1), int(d2) - int(d1)
per = f"{di / dd:,.0f}" if dd > 0 and int(i1) and int(i2) else "-"
print(f"| {rnd} | {name} | {case} | {dd:,} | {di:,} | {per} |")
' "$name" "$round" "$SUBS × $RATE" "$ir_short" "$got_short" "$ir_long" "$got_long"
    done
done
