#!/usr/bin/env bash
# Builds gale, gale-loadgen and the peer servers in release mode, then runs one interleaved
# `gale-loadgen compare` of echo throughput against all of them, on one core each (the load
# generator gets the other core). Results: target/bench/echo.{md,json} and SVG plots in
# target/bench/echo-plots/.
#
# Usage: benches/compare-echo.sh [extra gale-loadgen compare options]
#   e.g. benches/compare-echo.sh --rounds 1 -d 2      (a quick look)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p gale -p gale-loadgen -p gale-peers
if [ ! -d benches/peers/uws/node_modules/uwebsockets ]; then
    (cd benches/peers/uws && npm ci --no-audit --no-fund)
fi
mkdir -p target/bench
R=target/release
# The load generator runs on core 0, every server on core 1: the two never share a core.
exec taskset -c 0 "$R/gale-loadgen" compare \
    --server "gale-uring=taskset -c 1 $R/gale echo --port {port} --threads 1 --backend uring" \
    --server "gale-epoll=taskset -c 1 $R/gale echo --port {port} --threads 1 --backend epoll" \
    --server "uwebsockets.js=taskset -c 1 node benches/peers/uws/echo.mjs --port {port}" \
    --server "tokio-websockets=taskset -c 1 $R/peer-tokio-websockets --port {port} --threads 1" \
    --server "fastwebsockets=taskset -c 1 $R/peer-fastwebsockets --port {port} --threads 1" \
    --server "tokio-tungstenite=taskset -c 1 $R/peer-tokio-tungstenite --port {port} --threads 1" \
    --server "raw-tcp=taskset -c 1 $R/peer-raw-tcp --port {port} --threads 1" \
    -c 100,1000 -s 20,1024 -p 1,16 --rounds 3 -d 5 --warmup 1 \
    --json target/bench/echo.json --md target/bench/echo.md --plot target/bench/echo-plots "$@"
