#!/usr/bin/env bash
# Instructions per delivery of `gale serve` builds, counted by callgrind: a repeatable figure
# on a busy machine, where seconds of CPU are not. Each build serves the same fan-out (one
# `gale-loadgen fanout --protocol gale` run: SUBSCRIBERS subscribers of one topic, HTTP
# publishes at RATE per second for 1 + 5 s) on one epoll loop under callgrind, ROUNDS times
# interleaved. Instructions are the server's user-space ones over its whole life (start,
# handshakes and subscribes included: the same work for every build).
#
# Usage: benches/callgrind-fanout.sh "NAME=GALE_BINARY" ... [-- SUBSCRIBERS RATE ROUNDS]
#   e.g. benches/callgrind-fanout.sh before=/tmp/old/gale after=target/release/gale -- 1000 40 2
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUILDS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do BUILDS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
SUBS=${1:-1000}
RATE=${2:-40}
ROUNDS=${3:-2}
[ ${#BUILDS[@]} -gt 0 ] || { echo "usage: $0 NAME=GALE_BINARY ... [-- SUBSCRIBERS RATE ROUNDS]" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt install valgrind)" >&2; exit 2; }
cargo build --release -p gale-loadgen
LOADGEN=${CARGO_TARGET_DIR:-target}/release/gale-loadgen
OUT=target/bench/callgrind-fanout
mkdir -p "$OUT"
export GALE_API_KEY=bench-key
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
echo "| round | build | subscribers × publishes/s | deliveries measured | instructions | instructions / delivery |"
echo "|---|---|---|---:|---:|---:|"
for round in $(seq 1 "$ROUNDS"); do
    for build in "${BUILDS[@]}"; do
        name=${build%%=*}; bin=${build#*=}
        port=$(free_port)
        valgrind --tool=callgrind --callgrind-out-file="$OUT/$name-$round.out" \
            "$bin" serve --listen "127.0.0.1:$port" --threads 1 --backend epoll >"$OUT/$name-$round.log" 2>&1 &
        server=$!
        for _ in $(seq 1 100); do
            (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
            sleep 0.1
        done
        "$LOADGEN" fanout --protocol gale --topic chat:bench -c "$SUBS" --rate "$RATE" -d 5 --warmup 1 \
            --timeout 60 --url "ws://127.0.0.1:$port/ws" --publish-url "http://127.0.0.1:$port" \
            --json "$OUT/$name-$round.json" >/dev/null 2>&1 || echo "$name round $round: the fan-out run failed" >&2
        kill -INT "$server"
        wait "$server" || true
        ir=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$OUT/$name-$round.log")
        got=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["delivered"])' "$OUT/$name-$round.json" 2>/dev/null || echo 0)
        per=$(python3 -c 'import sys; i,d=int(sys.argv[1] or 0),int(sys.argv[2]); print(f"{i/d:,.0f}" if d else "-")' "$ir" "$got")
        printf '| %s | %s | %s × %s | %s | %s | %s |\n' "$round" "$name" "$SUBS" "$RATE" "$got" "$ir" "$per"
    done
done
