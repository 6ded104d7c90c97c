"""One measurement of benches/cluster-shards.sh: gateways sharing TOPICS topics through their
broker; one subscriber per gateway subscribed to every topic; publishers send batches
(POST /api/publish_batch, 100 items, topics round-robin) to the gateways in turn as fast as
they are answered for SECONDS. Prints one JSON line: publishes/s acknowledged, deliveries, and
the gateways' CPU (user + system, from /proc) per 1,000 deliveries.

Usage: python3 benches/cluster_shards.py NAME TOPICS SECONDS PUBLISHERS GATEWAY_PORT:PID...
"""

import asyncio
import json
import os
import sys
import threading
import time
from http.client import HTTPConnection

from websockets.asyncio.client import connect

API_KEY = os.environ.get("GALE_API_KEY", "bench-key")
BATCH = 100
TICK = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / TICK


async def subscriber(port, topics, counts, ready):
    ws = await connect(f"ws://127.0.0.1:{port}/ws", max_size=None, ping_interval=None, open_timeout=30)
    pending = 0
    for i, t in enumerate(topics):
        await ws.send(json.dumps({"id": i, "op": "subscribe", "topic": t}))
        pending += 1
        while pending >= 200:
            reply = json.loads(await ws.recv())
            assert reply.get("ok"), reply
            pending -= 1
    while pending:
        reply = json.loads(await ws.recv())
        assert reply.get("ok"), reply
        pending -= 1
    ready.set()
    async for _ in ws:
        counts[port] += 1


def publisher(ports, topics, start, deadline, acked, errors):
    conns = {p: HTTPConnection("127.0.0.1", p, timeout=30) for p in ports}
    n = start
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    while time.monotonic() < deadline:
        port = ports[n % len(ports)]
        items = [{"topic": topics[(n * BATCH + i) % len(topics)], "data": n} for i in range(BATCH)]
        conns[port].request("POST", "/api/publish_batch", body=json.dumps(items), headers=headers)
        r = conns[port].getresponse()
        body = json.loads(r.read())
        ok = sum(1 for item in body.get("results", []) if "seq" in item)
        acked[0] += ok
        errors[0] += BATCH - ok
        n += 1


async def main():
    name, topics_n, seconds, publishers = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    gateways = [tuple(map(int, g.split(":"))) for g in sys.argv[5:]]
    ports = [p for p, _ in gateways]
    topics = [f"chat:bench-{i}" for i in range(topics_n)]
    counts = {p: 0 for p in ports}
    readies = [asyncio.Event() for _ in ports]
    tasks = [asyncio.create_task(subscriber(p, topics, counts, r)) for p, r in zip(ports, readies)]
    setup = time.monotonic()
    while not all(r.is_set() for r in readies):
        for t in tasks:
            if t.done():
                t.result()  # a subscriber that failed (a refused subscription) ends the run
        await asyncio.sleep(0.05)
    setup = time.monotonic() - setup
    acked, errors = [0], [0]
    cpu0 = sum(cpu_ms(pid) for _, pid in gateways)
    seen0 = sum(counts.values())
    started = time.monotonic()
    deadline = started + seconds
    threads = [threading.Thread(target=publisher, args=(ports, topics, i * 7919, deadline, acked, errors))
               for i in range(publishers)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    # The last deliveries: until none arrive for half a second.
    last = -1
    while last != sum(counts.values()):
        last = sum(counts.values())
        await asyncio.sleep(0.5)
    cpu = sum(cpu_ms(pid) for _, pid in gateways) - cpu0
    deliveries = sum(counts.values()) - seen0
    for t in tasks:
        t.cancel()
    print(json.dumps({
        "setup": name, "topics": topics_n, "subscribe_s": round(setup, 1),
        "publishes_per_sec": round(acked[0] / elapsed), "refused": errors[0],
        "deliveries": deliveries, "expected_deliveries": acked[0] * len(ports),
        "gateway_cpu_ms_per_1k_deliveries": round(cpu / max(deliveries, 1) * 1000, 2),
    }))


asyncio.run(main())
