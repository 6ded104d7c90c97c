#!/usr/bin/env bash
# io_uring against epoll: `gale echo --backend uring` and `--backend epoll`, one core each (the
# load generator on the other), interleaved over rounds. Results: target/bench/backends.{md,json}
# and SVG plots in target/bench/backends-plots/.
#
# Usage: benches/compare-backends.sh [extra gale-loadgen compare options]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p gale -p gale-loadgen
mkdir -p target/bench
R=target/release
exec taskset -c 0 "$R/gale-loadgen" compare \
    --server "uring=taskset -c 1 $R/gale echo --port {port} --threads 1 --backend uring" \
    --server "epoll=taskset -c 1 $R/gale echo --port {port} --threads 1 --backend epoll" \
    -c 100,1000,10000 -s 20,1024 -p 1,16 --rounds 3 -d 5 --warmup 1 \
    --json target/bench/backends.json --md target/bench/backends.md --plot target/bench/backends-plots "$@"
