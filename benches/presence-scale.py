#!/usr/bin/env python3
"""Presence at scale: what `GET /api/presence_stats/{topic}` and `GET /api/presence/{topic}`
cost as one topic's subscribers grow, on one `gale serve` node and over several nodes sharing
presence through Redis.

Subscribers are `gale-loadgen fanout --protocol gale` clients holding a subscription to
`room:big` (a namespace with presence on), each with a token (so each is a listed member of
one user); nothing is published while the reads are timed (one publish per 1,000 s), so the
server CPU measured is the reads'. Once the gateway counts them all, the script times
REQUESTS presence_stats reads and REQUESTS/10 presence lists on one keep-alive HTTP connection,
and measures the server CPU they took (the node's, plus redis-server's in cluster mode).
The gateways' logs go to target/bench/presence-scale/.

One process may hold at most 20,000 open files here, so one node holds at most ~19,000
subscribers; the cluster case spreads NODES x PER_NODE subscribers over NODES gateways (one
load generator each).

Usage: benches/presence-scale.py [--single 1,1000,10000,19000] [--nodes 6] [--per-node 17000]
       [--requests 2000] [--skip-build] [--json FILE]
"""

import argparse
import base64
import hashlib
import hmac
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPIC = "room:big"
SECRET = "presence-bench-secret"
KEY = "presence-bench-key"
CONFIG = f"""
[server]
threads = 1
[auth]
jwt_secret = "{SECRET}"
api_key = "{KEY}"
[websocket]
idle_timeout = 0
[presence]
ttl = 15
[[namespaces]]
pattern = "room:*"
subscribe = true
publish = false
presence = true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token(sub: str) -> str:
    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, "exp": int(time.time()) + 86400, "info": {"name": sub}}).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Api:
    """A keep-alive connection to one node's HTTP API."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def get(self, path: str) -> dict:
        try:
            self.conn.request("GET", path, headers={"Authorization": f"Bearer {KEY}"})
            r = self.conn.getresponse()
            body = r.read()
        except (ConnectionError, http.client.HTTPException) as e:
            # Say so rather than reconnect: a timed read must not include a new connection.
            raise RuntimeError(f"GET {path}: {e}") from e
        if r.status != 200:
            raise RuntimeError(f"GET {path}: {r.status} {body[:200]!r}")
        return json.loads(body)


def start_gateway(gale: str, config: str, port: int, broker: str | None, log: str) -> subprocess.Popen:
    cmd = [gale, "serve", "--config", config, "--listen", f"127.0.0.1:{port}"]
    if broker:
        cmd += ["--broker", broker]
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return p
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise RuntimeError(f"gale serve on {port} did not start")


def start_subscribers(loadgen: str, port: int, count: int, user: str, log: str) -> subprocess.Popen:
    url = f"ws://127.0.0.1:{port}/ws?token={token(user)}"
    cmd = [loadgen, "fanout", "--protocol", "gale", "--topic", TOPIC, "-c", str(count),
           "--url", url, "--publish-url", f"http://127.0.0.1:{port}", "--api-key", KEY,
           "--rate", "0.001", "-d", "3600", "--warmup", "0", "--timeout", "120",
           # Source addresses 127.0.0.1-8: past ~60,000 connections from one address, finding
           # a free local port for each connect gets slow, then fails.
           "--source-ips", "8"]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def wait_for(api: Api, count: int, procs: list[subprocess.Popen], limit: float = 600) -> float:
    start = time.time()
    while time.time() - start < limit:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} {p.args[1]} exited ({p.returncode}) before all subscribed")
        try:
            if api.get(f"/api/presence_stats/{TOPIC}")["connections"] >= count:
                return time.time() - start
        except RuntimeError as e:
            # While the subscribes queue up in front of it (cluster mode: every join is a
            # script in Redis), a read may wait longer than the gateway keeps an HTTP request
            # open (10 s): ask again on a new connection.
            print(f"while waiting: {e}", file=sys.stderr)
            api.conn.close()
        time.sleep(0.5)
    raise RuntimeError(f"{count} subscribers were not all counted within {limit} s")


def timed(api: Api, path: str, n: int, pids: list[int]) -> dict:
    cpu0 = sum(cpu_seconds(p) for p in pids)
    times = []
    answer = None
    for _ in range(n):
        t = time.perf_counter()
        answer = api.get(path)
        times.append((time.perf_counter() - t) * 1e6)
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    times.sort()
    return {
        "requests": n,
        "p50_us": round(statistics.median(times), 1),
        "p99_us": round(times[int(len(times) * 0.99) - 1], 1),
        "server_cpu_us_per_request": round(cpu / n * 1e6, 1),
        "answer_bytes": len(json.dumps(answer)),
        "connections": answer["connections"],
        "users": answer["users"],
        "listed": len(answer.get("clients", [])),
    }


def measure(api: Api, pids: list[int], requests: int) -> dict:
    return {
        "presence_stats": timed(api, f"/api/presence_stats/{TOPIC}", requests, pids),
        "presence": timed(api, f"/api/presence/{TOPIC}", max(requests // 10, 20), pids),
    }


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def single(args, config: str) -> list[dict]:
    rows = []
    for n in args.single:
        port = free_port()
        node = start_gateway(args.gale, config, port, None, os.path.join(args.logs, f"single-{n}.log"))
        procs = [node]
        try:
            api = Api(port)
            subs = [] if n == 0 else [start_subscribers(args.loadgen, port, n, "u", os.path.join(args.logs, f"loadgen-{n}.log"))]
            procs += subs
            took = wait_for(api, n, subs + [node]) if n else 0.0
            time.sleep(1)
            row = {"setup": "single node", "subscribers": n, "subscribe_s": round(took, 1),
                   "rss": rss_bytes(node.pid), **measure(api, [node.pid], args.requests)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        finally:
            stop(procs)
    return rows


def cluster(args, config: str) -> list[dict]:
    procs = []
    with tempfile.TemporaryDirectory() as data:
        try:
            rport = free_port()
            redis = subprocess.Popen(
                ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", data],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(redis)
            time.sleep(0.5)
            ports = [free_port() for _ in range(args.nodes)]
            broker = f"redis://127.0.0.1:{rport}"
            nodes = [start_gateway(args.gale, config, p, broker, os.path.join(args.logs, f"node-{i}.log"))
                     for i, p in enumerate(ports)]
            procs += nodes
            api = Api(ports[0])
            pids = [nodes[0].pid, redis.pid]
            rows = []
            base = {"setup": f"{args.nodes} nodes + Redis", "subscribe_s": 0.0, "rss": 0}
            rows.append({**base, "subscribers": 0, **measure(api, pids, args.requests)})
            print(json.dumps(rows[-1]), file=sys.stderr)
            subs = []
            for i, p in enumerate(ports):
                subs.append(start_subscribers(args.loadgen, p, args.per_node, f"u{i}",
                                              os.path.join(args.logs, f"loadgen-node-{i}.log")))
            procs += subs
            total = args.nodes * args.per_node
            took = wait_for(api, total, subs + nodes)
            time.sleep(1)
            rows.append({**base, "subscribers": total, "subscribe_s": round(took, 1),
                         "rss": rss_bytes(redis.pid), **measure(api, pids, args.requests)})
            print(json.dumps(rows[-1]), file=sys.stderr)
            return rows
        finally:
            stop(procs[::-1])


def table(rows: list[dict]) -> str:
    out = ["| setup | subscribers | read | p50 µs | p99 µs | server CPU µs / read | answer bytes | connections / users / listed |",
           "|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        for what in ("presence_stats", "presence"):
            m = r[what]
            out.append(f"| {r['setup']} | {r['subscribers']:,} | {what} | {m['p50_us']:,} | {m['p99_us']:,} | "
                       f"{m['server_cpu_us_per_request']:,} | {m['answer_bytes']:,} | "
                       f"{m['connections']:,} / {m['users']} / {m['listed']} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--single", default="1,1000,10000,19000",
                    type=lambda s: [int(x) for x in s.split(",") if x != ""],
                    help="subscriber counts on one node (comma-separated; empty: skip)")
    ap.add_argument("--nodes", type=int, default=6, help="gateways in the cluster case (0: skip)")
    ap.add_argument("--per-node", type=int, default=17000, help="subscribers per gateway")
    ap.add_argument("--requests", type=int, default=2000, help="presence_stats reads per case")
    ap.add_argument("--skip-build", action="store_true", help="use the release binaries as they are")
    ap.add_argument("--json", help="write the rows as JSON to this file")
    args = ap.parse_args()
    if max(args.single, default=0) > 19000 or args.per_node > 19000:
        ap.error("at most 19000 subscribers per process (the open-files limit is 20,000)")
    if not args.skip_build:
        subprocess.run(["cargo", "build", "--release", "-p", "gale", "-p", "gale-loadgen"], cwd=ROOT, check=True)
    args.logs = os.path.join(ROOT, "target", "bench", "presence-scale")
    os.makedirs(args.logs, exist_ok=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    args.gale = os.path.join(target, "release", "gale")
    args.loadgen = os.path.join(target, "release", "gale-loadgen")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(CONFIG)
        config = f.name
    try:
        rows = single(args, config) if args.single else []
        if args.nodes > 0:
            rows += cluster(args, config)
    finally:
        os.unlink(config)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
