#!/usr/bin/env bash
# permessage-deflate on a realistic chat/danmaku stream (short JSON messages with repeating keys
# and Chinese text): `gale echo` with compression off, shared (no context takeover; with its
# default 1 KiB threshold, and compressing everything from 64 bytes), and
# dedicated (context takeover, 15- and 10-bit windows), the load generator offering
# permessage-deflate. Reports messages/s, server CPU per message, server memory, and the bytes
# on the wire per payload byte. Results: target/bench/deflate.{md,json}.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p gale -p gale-loadgen
mkdir -p target/bench
R=target/release
G="taskset -c 1 $R/gale echo --port {port} --threads 1 --backend epoll"
exec taskset -c 0 "$R/gale-loadgen" compare \
    --server "off=$G --compression off" \
    --server "shared=$G --compression shared" \
    --server "shared-all=$G --compression shared --compress-min-size 64" \
    --server "dedicated-15=$G --compression dedicated --compression-window 15" \
    --server "dedicated-10=$G --compression dedicated --compression-window 10" \
    --deflate --payload chat -c 100,5000 -p 1,16 --rounds 3 -d 5 --warmup 1 \
    --json target/bench/deflate.json --md target/bench/deflate.md "$@"
