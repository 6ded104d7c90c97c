#!/usr/bin/env bash
# Fan-out: one publisher, many subscribers of one topic, every server on both cores (two
# event loops or worker threads; uWebSockets.js has one) with the load generator beside them.
# Gale's pub/sub core (the `broadcast` example of gale-server), the push gateway (`gale serve`,
# its JSON protocol, publishing over HTTP), a tokio-tungstenite broadcast server and
# uWebSockets.js's own pub/sub, interleaved over rounds. Results: target/bench/fanout.{md,json}
# and SVG plots in target/bench/fanout-plots/.
#
# Usage: benches/compare-fanout.sh [extra gale-loadgen compare options]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p gale -p gale-loadgen -p gale-peers
cargo build --release -p gale-server --example broadcast
if [ ! -d benches/peers/uws/node_modules/uwebsockets ]; then
    (cd benches/peers/uws && npm ci --no-audit --no-fund)
fi
mkdir -p target/bench
R=target/release
export GALE_API_KEY=bench-key
exec "$R/gale-loadgen" compare --scenario fanout \
    --server "gale=$R/examples/broadcast --port {port} --threads 2" \
    --server "gale-serve=$R/gale serve --listen 127.0.0.1:{port} --threads 2" \
    --server-protocol gale-serve=gale \
    --server "uwebsockets.js=node benches/peers/uws/broadcast.mjs --port {port}" \
    --server "tokio-tungstenite=$R/peer-tokio-tungstenite-broadcast --port {port} --threads 2" \
    -c 1000,10000 -s 64 --rate 10,40 --rounds 3 -d 5 --warmup 1 \
    --json target/bench/fanout.json --md target/bench/fanout.md --plot target/bench/fanout-plots "$@"
