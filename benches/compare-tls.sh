#!/usr/bin/env bash
# TLS: `gale echo` plain (ws://) and with TLS (wss://), and tokio-tungstenite behind
# tokio-rustls, on one core each (the load generator on the other), with a throwaway ECDSA
# P-256 certificate. Echo throughput, then new connections per second (each a TCP connect, a
# TLS handshake and a WebSocket upgrade). Results: target/bench/tls-echo.{md,json} and
# target/bench/tls-connect.{md,json}.
#
# Usage: benches/compare-tls.sh [extra gale-loadgen compare options]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p gale -p gale-loadgen -p gale-peers
mkdir -p target/bench/tls
CERT=target/bench/tls/cert.pem
KEY=target/bench/tls/key.pem
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$KEY" -out "$CERT" \
    -days 2 -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -addext "basicConstraints=critical,CA:FALSE" 2>/dev/null
R=target/release
TLS="--tls-cert $CERT --tls-key $KEY"
SERVERS=(
    --server "gale-wss=taskset -c 1 $R/gale echo --port {port} --threads 1 --backend epoll --compression off $TLS"
    --server "gale-ws=taskset -c 1 $R/gale echo --port {port} --threads 1 --backend epoll --compression off"
    --server "tokio-tungstenite-wss=taskset -c 1 $R/peer-tokio-tungstenite-tls --port {port} --threads 1 $TLS"
)
taskset -c 0 "$R/gale-loadgen" compare --insecure "${SERVERS[@]}" \
    -c 100 -s 20,1024 -p 1,16 --rounds 3 -d 5 --warmup 1 \
    --json target/bench/tls-echo.json --md target/bench/tls-echo.md "$@"
taskset -c 0 "$R/gale-loadgen" compare --insecure --scenario connect "${SERVERS[@]}" \
    -c 2000 --rounds 3 -d 1 \
    --json target/bench/tls-connect.json --md target/bench/tls-connect.md "$@"
