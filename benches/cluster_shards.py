"""One measurement of benches/cluster-shards.sh: gateways sharing TOPICS topics through their
broker; one subscriber per gateway subscribed to every topic; publisher processes send batches
(POST /api/publish_batch, BATCH items, topics round-robin) to the gateways in turn as fast as
they are answered for SECONDS. Subscribers and publishers are processes of their own, so that
the load does not queue behind one Python interpreter.

Prints one JSON line: publishes/s acknowledged, deliveries, the gateways' CPU (user + system,
from /proc) per 1,000 deliveries, Redis's CPU per publish (all its nodes), and the busiest
Redis node's CPU as a share of one core (with `--redis-cpu-limit`: of its budget), the commands
per round trip to a Redis node and the messages per pass of the listener (the gateways'
/metrics), and the voluntary context switches and CPU time of each kind of gateway thread per
1,000 deliveries (/proc). With RATE=N in the environment, the publishers together send N
publishes a second instead of as fast as they are answered. With
BATCHES=N in the environment, each publisher sends N batches, whatever the time. With
PERF_SYSCALLS=1 in the environment, also the gateways' system calls and context switches per
delivery (`perf stat -e raw_syscalls:sys_enter,context-switches` attached to them over the same
window).

Usage: python3 benches/cluster_shards.py NAME TOPICS SECONDS PUBLISHERS BATCH
           GATEWAY_PORT:PID[,...] REDIS_PID[,...] [REDIS_CPU_BUDGET]
"""

import asyncio
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from http.client import HTTPConnection

API_KEY = os.environ.get("GALE_API_KEY", "bench-key")
TICK = os.sysconf("SC_CLK_TCK")


def cpu_split(pid):
    """User and system CPU seconds of process `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_s(pid):
    return sum(cpu_split(pid))


def by_thread(pids, read):
    """`read(task_dir)` of each of `pids`' threads, summed by thread name (a thread that ends
    meanwhile, or whose file does not parse, is left out)."""
    total = {}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            task = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{task}/comm") as f:
                    name = f.read().strip()
                value = read(task)
            except (OSError, ValueError, IndexError, StopIteration):
                continue
            total[name] = total.get(name, 0) + value
    return total


def cpu_by_thread(pids):
    """CPU seconds of `pids`' threads, summed by thread name: their time on a CPU in
    nanoseconds (/proc/PID/task/TID/schedstat), not the 10 ms ticks of /proc/PID/stat, which at
    a few thousand deliveries a tick would blur a thread's share."""
    def on_cpu(task):
        with open(f"{task}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    return by_thread(pids, on_cpu)


def switches_by_thread(pids):
    """Voluntary context switches (a thread going to sleep) of `pids`' threads, summed by
    thread name: {name: count}."""
    def sleeps(task):
        with open(f"{task}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
    return by_thread(pids, sleeps)


def perf_start(pids):
    """`perf stat` counting the system calls and context switches of `pids`, or None."""
    if os.environ.get("PERF_SYSCALLS") != "1":
        return None
    return subprocess.Popen(
        ["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter,context-switches", "-p", ",".join(map(str, pids))],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def perf_record_start(pids, name, topics_n):
    """With PERF_RECORD=DIR, `perf record` (call graphs, 4,999 samples a second) of `pids` into
    DIR/NAME-TOPICS.data (a later round of the same setup overwrites it), or None."""
    out = os.environ.get("PERF_RECORD")
    if not out:
        return None
    path = os.path.join(out, f"{name.replace(' ', '-')}-{topics_n}.data")
    return subprocess.Popen(
        ["perf", "record", "-F", "4999", "-g", "-o", path, "-p", ",".join(map(str, pids))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def perf_stop(perf):
    """The counts of a `perf_start`: {event: count}."""
    if perf is None:
        return {}
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate()
    counts = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit():
            counts[fields[2]] = int(fields[0])
    return counts


BROKER_COUNTERS = ("gale_broker_pipelines_total", "gale_broker_pipelined_total",
                   "gale_broker_listener_passes_total", "gale_broker_forwarded_total")


def broker_counters(ports):
    """The broker's counters (GET /metrics), summed over the gateways at `ports`."""
    total = dict.fromkeys(BROKER_COUNTERS, 0)
    for port in ports:
        conn = HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
        for line in conn.getresponse().read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in total:
                total[name] += int(float(value))
        conn.close()
    return total


def topic_names(n):
    return [f"chat:bench-{i}" for i in range(n)]


def subscriber(port, topics_n, count, ready, failed):
    """Subscribe to every topic on the gateway at `port`, then count deliveries into `count`."""
    from websockets.asyncio.client import connect

    async def run():
        ws = await connect(f"ws://127.0.0.1:{port}/ws", max_size=None, ping_interval=None, open_timeout=30)
        pending = 0
        for i, t in enumerate(topic_names(topics_n)):
            await ws.send(json.dumps({"id": i, "op": "subscribe", "topic": t}))
            pending += 1
            while pending >= 200 or (pending and i == topics_n - 1):
                reply = json.loads(await ws.recv())
                if not reply.get("ok"):
                    failed.value = 1
                    raise SystemExit(f"subscribe refused: {reply}")
                pending -= 1
        ready.set()
        async for _ in ws:
            count.value += 1  # this process is its only writer

    try:
        asyncio.run(run())
    except Exception as e:  # a failed subscriber ends the run with its reason
        failed.value = 1
        print(f"subscriber on {port}: {e}", file=sys.stderr)


def publisher(ports, topics_n, batch, start, deadline, acked, refused, every, offset):
    """Publish batches to `ports` in turn until `deadline`, each as soon as the last is
    answered, or with `every` seconds set, one every `every` seconds from `offset` seconds on
    (none made up for when behind)."""
    topics = topic_names(topics_n)
    due = time.monotonic() + offset
    if every:
        time.sleep(offset)
    conns = {p: HTTPConnection("127.0.0.1", p, timeout=30) for p in ports}
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    n, ok_total, bad_total = start, 0, 0
    # With BATCHES set, a fixed amount of work instead of a time (benches/cluster-shards.sh's
    # callgrind mode).
    batches = int(os.environ.get("BATCHES", "0"))
    while (n - start < batches) if batches else (time.monotonic() < deadline):
        port = ports[n % len(ports)]
        items = [{"topic": topics[(n * batch + i) % topics_n], "data": n} for i in range(batch)]
        conns[port].request("POST", "/api/publish_batch", body=json.dumps(items), headers=headers)
        r = conns[port].getresponse()
        body = json.loads(r.read())
        ok = sum(1 for item in body.get("results", []) if "seq" in item)
        ok_total += ok
        bad_total += batch - ok
        n += 1
        if every:
            due = max(due + every, time.monotonic())
            time.sleep(max(0.0, due - time.monotonic()))
    with acked.get_lock():
        acked.value += ok_total
    with refused.get_lock():
        refused.value += bad_total


def main():
    name, topics_n, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    publishers, batch = int(sys.argv[4]), int(sys.argv[5])
    gateways = [tuple(map(int, g.split(":"))) for g in sys.argv[6].split(",")]
    redis_pids = [int(p) for p in sys.argv[7].split(",")]
    budget = float(sys.argv[8]) if len(sys.argv) > 8 and sys.argv[8] else None
    ports = [p for p, _ in gateways]

    counts = [mp.Value("q", 0, lock=False) for _ in ports]
    readies = [mp.Event() for _ in ports]
    failed = mp.Value("b", 0)
    subs = [mp.Process(target=subscriber, args=(p, topics_n, c, r, failed), daemon=True)
            for p, c, r in zip(ports, counts, readies)]
    setup = time.monotonic()
    for s in subs:
        s.start()
    while not all(r.is_set() for r in readies):
        if failed.value:
            raise SystemExit("a subscriber failed")
        time.sleep(0.05)
    setup = time.monotonic() - setup

    acked, refused = mp.Value("q", 0), mp.Value("q", 0)
    gateway_pids = [pid for _, pid in gateways]
    gw0 = sum(cpu_s(pid) for pid in gateway_pids)
    gw_sys0 = sum(cpu_split(pid)[1] for pid in gateway_pids)
    redis0 = [cpu_s(pid) for pid in redis_pids]
    counters0 = broker_counters(ports)
    sleeps0 = switches_by_thread(gateway_pids)
    threads0 = cpu_by_thread(gateway_pids)
    perf = perf_start(gateway_pids)
    recording = perf_record_start(gateway_pids, name, topics_n)
    seen0 = sum(c.value for c in counts)
    started = time.monotonic()
    deadline = started + seconds
    # With RATE set (publishes a second, all publishers together), each publisher is paced.
    rate = float(os.environ.get("RATE") or 0)
    every = batch * publishers / rate if rate else 0.0
    # Paced publishers start spread over one interval, not all at once.
    pubs = [mp.Process(target=publisher, args=(ports, topics_n, batch, i * 7919, deadline, acked, refused, every,
                                               i * every / publishers))
            for i in range(publishers)]
    for p in pubs:
        p.start()
    for p in pubs:
        p.join()
    elapsed = time.monotonic() - started
    redis_busy = [cpu_s(pid) - c for pid, c in zip(redis_pids, redis0)]
    # The last deliveries: until none arrive for half a second.
    last = -1
    while last != sum(c.value for c in counts):
        last = sum(c.value for c in counts)
        time.sleep(0.5)
    kernel = perf_stop(perf)
    if recording is not None:
        recording.send_signal(signal.SIGINT)
        recording.wait()
    counters = {k: v - counters0[k] for k, v in broker_counters(ports).items()}
    sleeps = {k: v - sleeps0.get(k, 0) for k, v in switches_by_thread(gateway_pids).items()}
    threads = {k: v - threads0.get(k, 0) for k, v in cpu_by_thread(gateway_pids).items()}
    if not any(threads.values()):
        print("cluster_shards: no thread CPU read from /proc/PID/task/TID/schedstat "
              "(a kernel without schedstats?): the by-thread figures are empty", file=sys.stderr)
    gw = sum(cpu_s(pid) for pid in gateway_pids) - gw0
    gw_sys = sum(cpu_split(pid)[1] for pid in gateway_pids) - gw_sys0
    redis = sum(cpu_s(pid) for pid in redis_pids) - sum(redis0)
    deliveries = sum(c.value for c in counts) - seen0
    for s in subs:
        s.terminate()
    expected = acked.value * len(ports)
    print(json.dumps({
        "setup": name, "topics": topics_n, "batch": batch, "subscribe_s": round(setup, 2),
        "redis_cpu_budget": budget,
        "publishes_per_sec": round(acked.value / elapsed), "refused": refused.value,
        "deliveries": deliveries, "expected_deliveries": expected,
        "gateway_cpu_ms_per_1k_deliveries": round(gw / max(deliveries, 1) * 1e6, 2),
        "gateway_system_ms_per_1k_deliveries": round(gw_sys / max(deliveries, 1) * 1e6, 2),
        "redis_cpu_us_per_publish": round(redis / max(acked.value, 1) * 1e6, 1),
        # While publishing: the busiest node's CPU time over the wall time, in cores.
        "busiest_redis_cores": round(max(redis_busy) / elapsed, 2),
        # How much each round trip to a Redis node carries, and each pass of the listener.
        "commands_per_pipeline": round(counters["gale_broker_pipelined_total"]
                                       / max(counters["gale_broker_pipelines_total"], 1), 1),
        "messages_per_listener_pass": round(counters["gale_broker_forwarded_total"]
                                            / max(counters["gale_broker_listener_passes_total"], 1), 1),
        # How often each of the gateways' threads went to sleep, per 1,000 deliveries.
        "sleeps_per_1k_deliveries": {k: round(v / max(deliveries, 1) * 1e3, 1) for k, v in sorted(sleeps.items()) if v},
        # And the CPU time of each kind of thread, ms per 1,000 deliveries.
        "thread_cpu_ms_per_1k_deliveries": {k: round(v / max(deliveries, 1) * 1e6, 3)
                                            for k, v in sorted(threads.items()) if v},
        **({"gateway_syscalls_per_delivery": round(kernel.get("raw_syscalls:sys_enter", 0) / max(deliveries, 1), 3),
            "gateway_context_switches_per_delivery": round(kernel.get("context-switches", 0) / max(deliveries, 1), 3)}
           if kernel else {}),
    }))


if __name__ == "__main__":
    main()
