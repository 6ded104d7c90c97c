#!/usr/bin/env bash
# Fan-out against native ceilings: one publisher, many subscribers of one topic, interleaved
# over rounds, with
#   - uws-cpp: uWebSockets (C++) pub/sub on one thread, `app.publish` (built outside this
#     repository, see docs/BENCHMARKS.md "Against μWebSockets (C++) and a raw TCP ceiling");
#     its binary from $UWS_BROADCAST, skipped with a message when that is unset or missing;
#   - raw-tcp: peer-raw-tcp-fanout, one epoll thread that writes each iteration's publishes to
#     every subscriber in one write, and nothing else; raw-tcp-2 the same on two threads (the
#     kernel spreads the subscribers over them, and the thread a publish reaches hands it to
#     the other), the ceiling for two event loops;
#   - gale (the broadcast example) and gale-serve (`gale serve`, HTTP publishing) on 1 and 2
#     event loops, on each backend (epoll, io_uring).
# The first server is the reference for the "× first" column (uws-cpp, or raw-tcp without it);
# the ratios to raw-tcp (and of the two-loop servers to raw-tcp-2) are printed after the table.
# Results: target/bench/fanout-native.{md,json}.
#
# Usage: UWS_BROADCAST=/tmp/uws-pubsub/uws-broadcast benches/compare-fanout-native.sh [extra compare options]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p gale -p gale-loadgen -p gale-peers
cargo build --release -p gale-server --example broadcast
R=${CARGO_TARGET_DIR:-target}/release
mkdir -p target/bench
export GALE_API_KEY=bench-key

SERVERS=()
if [ -n "${UWS_BROADCAST:-}" ] && [ -x "$UWS_BROADCAST" ]; then
    SERVERS+=(--server "uws-cpp=$UWS_BROADCAST --port {port}")
else
    echo "uws-cpp skipped: set UWS_BROADCAST to the uWebSockets C++ broadcast binary (see docs/BENCHMARKS.md)" >&2
fi
SERVERS+=(--server "raw-tcp=$R/peer-raw-tcp-fanout --port {port} --threads 1")
SERVERS+=(--server "raw-tcp-2=$R/peer-raw-tcp-fanout --port {port} --threads 2")
for threads in 1 2; do
    for backend in epoll uring; do
        SERVERS+=(--server "gale-$threads-$backend=$R/examples/broadcast --port {port} --threads $threads --backend $backend")
        SERVERS+=(--server "gale-serve-$threads-$backend=$R/gale serve --listen 127.0.0.1:{port} --threads $threads --backend $backend")
        SERVERS+=(--server-protocol "gale-serve-$threads-$backend=gale")
    done
done

uptime
"$R/gale-loadgen" compare --scenario fanout "${SERVERS[@]}" \
    -c 1000,10000 -s 64 --rate 10,40 --rounds 3 -d 5 --warmup 1 \
    --json target/bench/fanout-native.json --md target/bench/fanout-native.md "$@"
uptime
REFS=(raw-tcp raw-tcp-2@-2-); [ -n "${UWS_BROADCAST:-}" ] && [ -x "$UWS_BROADCAST" ] && REFS=(uws-cpp "${REFS[@]}")
python3 benches/fanout-ratio.py target/bench/fanout-native.json "${REFS[@]}" | tee target/bench/fanout-native-ratios.md
