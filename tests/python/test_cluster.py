"""Cluster mode: three `gale serve --broker redis://…` nodes share topics through a real Redis
(`redis-server`, started by the tests on a free loopback port and stopped by its PID).

Covers cross-node delivery, one order per topic with publishers on several nodes, recovery on a
different node than the one a client left, a publish Redis refuses failing alone in its
pipelined batch, `limits.max_topics` over the cluster, replays read in pages, history read
from Redis alike on every node, scripts called by SHA1 and loaded again where Redis lost them,
and the faults: Redis killed and
restarted (publishes get 503 while it is away, /healthz and /metrics say so, nodes reconnect,
and a client told its epoch is gone, and a node refusing publishes meanwhile does not grow in
memory), Redis stalled (SIGSTOP), a node killed with SIGKILL, and server-side control commands
sent to one node acting on a user's connections on another.

Run: python3 tests/python/test_cluster.py   (GALE_BIN overrides target/debug/gale)
"""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import unittest
import urllib.error
import urllib.request

from gale_process import LOG_DIR, GaleServe, shard
from gateway_client import GatewayClient
from test_gateway import SECRET, make_token
from websockets.exceptions import ConnectionClosed

TIMEOUT = 20.0
API_KEY = "cluster-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving_pid(port):
    """The process id of the Redis answering on `port` (`INFO server`), or None if none does
    yet."""
    line = re.compile(rb"process_id:(\d+)\r\n")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"INFO server\r\n")
            reply = b""
            while not line.search(reply):
                chunk = s.recv(65536)
                if not chunk:
                    return None
                reply += chunk
    except OSError:
        return None
    return int(line.search(reply).group(1))


def start_redis(port, log, *options):
    """`redis-server` on `port` with `options`, once it is the process answering there
    (`INFO server`); None, and no process left, if it exits first or another answers there:
    suites run side by side, and a port found free can be taken by another suite's server
    before ours binds it (ours then exits, and a plain PING would reach theirs)."""
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", *options],
                            stdout=log, stderr=log)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if serving_pid(port) == proc.pid:
            return proc
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    return None


# Ports tried before giving up when the free ones found are taken first.
REDIS_ATTEMPTS = 5


class Redis:
    """A throwaway redis-server without persistence on a free port (another one if the
    first is taken before it binds it; `port` given: that one or an error)."""

    def __init__(self, port=None):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        for _ in range(1 if port else REDIS_ATTEMPTS):
            self.port = port or free_port()
            self.log = open(LOG_DIR / f"redis-{self.port}.log", "ab")
            self.proc = start_redis(self.port, self.log, "--save", "", "--appendonly", "no")
            if self.proc:
                return
        raise RuntimeError(f"redis-server did not start (last port {self.port}; see its log)")

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def cli(self, *args):
        """Run one command with redis-cli; its output, stripped."""
        done = subprocess.run(["redis-cli", "-p", str(self.port), *map(str, args)],
                              capture_output=True, text=True, timeout=TIMEOUT, check=True)
        return done.stdout.strip()

    def bytes_sent(self):
        """Bytes Redis has sent to its clients so far."""
        stats = dict(line.split(":", 1) for line in self.cli("INFO", "stats").splitlines() if ":" in line)
        return int(stats["total_net_output_bytes"])

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(TIMEOUT)
        self.log.close()


def http(node, method, path, body=None, key=API_KEY):
    req = urllib.request.Request(node.http_url + path, data=body, method=method)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def publish(node, topic, data):
    status, text = http(node, "POST", f"/api/publish/{topic}", json.dumps(data).encode())
    assert status == 200, (status, text)
    return json.loads(text)


def metric(text, name):
    """The value of counter `name` in a /metrics answer."""
    return int(re.search(rf"^{name} (\d+)", text, re.M).group(1))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def publish_many(node, topic, n, body=b'"x"'):
    """Statuses of `n` publishes of `body` (JSON) on one keep-alive connection."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=TIMEOUT)
    codes = []
    for _ in range(n):
        conn.request("POST", f"/api/publish/{topic}", body=body,
                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        codes.append(r.status)
    conn.close()
    return codes


class Client(GatewayClient):
    """A client of one node."""

    @classmethod
    async def open(cls, node):
        return await super().open(node.url + "/ws")


class ClusterTest(unittest.IsolatedAsyncioTestCase):
    def setUp(self):
        self.redis = Redis()
        env = {"GALE_API_KEY": API_KEY}
        self.nodes = [GaleServe(f"cluster-{self._testMethodName}-{i}", "--broker", self.redis.url, env=env)
                      for i in range(3)]

    def tearDown(self):
        # Disposable nodes: no graceful shutdown to wait for.
        for n in self.nodes:
            n.kill()
            n.proc.stdout.close()
        self.redis.stop()

    async def test_a_publish_on_any_node_reaches_subscribers_on_every_node_once(self):
        subs = [await Client.open(n) for n in self.nodes]
        for s in subs:
            self.assertTrue((await s.command("subscribe", topic="chat:all"))["ok"])
        r = await asyncio.to_thread(publish, self.nodes[1], "chat:all", {"hi": 1})
        self.assertEqual(r["seq"], 1)
        c = await Client.open(self.nodes[2])
        reply = await c.command("publish", topic="chat:all", data={"hi": 2})
        self.assertEqual(reply["seq"], 2)
        for s in subs:
            got = [await s.delivery() for _ in range(2)]
            self.assertEqual([(d["seq"], d["data"]) for d in got], [(1, {"hi": 1}), (2, {"hi": 2})])
            self.assertEqual(got[0]["epoch"], r["epoch"])
        await asyncio.sleep(0.3)
        self.assertEqual([s.deliveries for s in subs], [[], [], []], "nothing twice")
        # Health and metrics speak of this node: its subscribed topics; the topics' state is in
        # Redis, so the node-local history gauges are left out.
        status, text = await asyncio.to_thread(http, self.nodes[0], "GET", "/healthz", None, None)
        health = json.loads(text)
        self.assertEqual((status, health["broker"], health["topics_subscribed"]), (200, "up", 1), text)
        self.assertNotIn("topics", health)
        status, text = await asyncio.to_thread(http, self.nodes[0], "GET", "/metrics", None, None)
        self.assertIn("gale_topics_subscribed 1", text)
        self.assertNotIn("gale_topics ", text)
        self.assertNotIn("gale_history_bytes", text)

    async def test_scripts_are_called_by_their_sha1_and_loaded_again_where_redis_lost_them(self):
        self.redis.cli("CONFIG", "RESETSTAT")
        a, b = self.nodes[0], self.nodes[1]
        sub = await Client.open(b)
        self.assertTrue((await sub.command("subscribe", topic="chat:sha-a"))["ok"])
        await asyncio.to_thread(publish, a, "chat:sha-a", 1)
        stats = self.redis.cli("INFO", "commandstats")
        # A script's text is not sent with every call (EVAL), only its SHA1 (EVALSHA).
        self.assertIn("cmdstat_evalsha:", stats)
        self.assertNotIn("cmdstat_eval:", stats)
        # Redis forgets its scripts (a restart, a failover to a replica, SCRIPT FLUSH): the next
        # calls load them again and go on, for publishes, subscribes and batches alike.
        self.redis.cli("SCRIPT", "FLUSH")
        await asyncio.to_thread(publish, a, "chat:sha-a", 2)
        self.assertTrue((await sub.command("subscribe", topic="chat:sha-b"))["ok"])
        self.redis.cli("SCRIPT", "FLUSH")
        items = [{"topic": "chat:sha-a", "data": 3}, {"topic": "chat:sha-b", "data": 4}]
        status, text = await asyncio.to_thread(
            http, self.nodes[2], "POST", "/api/publish_batch", json.dumps(items).encode())
        self.assertEqual((status, [r.get("seq") for r in json.loads(text)["results"]]), (200, [3, 1]), text)
        got = [await sub.delivery() for _ in range(4)]
        self.assertEqual([(d["topic"], d["seq"], d["data"]) for d in got],
                         [("chat:sha-a", 1, 1), ("chat:sha-a", 2, 2), ("chat:sha-a", 3, 3), ("chat:sha-b", 1, 4)])
        await sub.close()

    async def test_publishers_on_several_nodes_give_one_order(self):
        subs = [await Client.open(n) for n in self.nodes]
        for s in subs:
            await s.command("subscribe", topic="chat:order")

        def publisher(node):
            for i in range(60):
                publish(node, "chat:order", i)

        threads = [threading.Thread(target=publisher, args=(n,)) for n in self.nodes]
        await asyncio.to_thread(lambda: [t.start() for t in threads] and [t.join() for t in threads])
        orders = []
        for s in subs:
            got = [await s.delivery() for _ in range(180)]
            self.assertEqual([d["seq"] for d in got], list(range(1, 181)))
            orders.append([d["data"] for d in got])
        self.assertEqual(orders[0], orders[1])
        self.assertEqual(orders[1], orders[2])

    async def test_recovery_on_another_node(self):
        a = await Client.open(self.nodes[0])
        first = await a.command("subscribe", topic="chat:move")
        for i in range(3):
            await asyncio.to_thread(publish, self.nodes[1], "chat:move", i)
        seen = [await a.delivery() for _ in range(3)]
        position = {"epoch": seen[-1]["epoch"], "seq": seen[-1]["seq"]}
        self.assertEqual(first["seq"], 0)
        await a.ws.close()
        for i in range(3, 8):
            await asyncio.to_thread(publish, self.nodes[1], "chat:move", i)
        c = await Client.open(self.nodes[2])
        reply = await c.command("subscribe", topic="chat:move", since=position)
        self.assertTrue(reply["recovered"], reply)
        self.assertEqual(reply["missed"], 5)
        got = [await c.delivery() for _ in range(5)]
        self.assertEqual([(d["seq"], d["data"]) for d in got], [(i + 1, i) for i in range(3, 8)])
        await asyncio.to_thread(publish, self.nodes[0], "chat:move", 8)
        self.assertEqual((await c.delivery())["seq"], 9)
        # Counted where they were answered: the recovery on node 2, the HTTP publishes on node 1
        # (eight) and node 0 (one).
        metrics = [(await asyncio.to_thread(http, n, "GET", "/metrics", None, None))[1] for n in self.nodes]
        self.assertIn('gale_recoveries_total{result="recovered"} 1', metrics[2])
        self.assertIn('gale_publishes_total{source="http"} 8', metrics[1])
        self.assertIn('gale_publishes_total{source="http"} 1', metrics[0])

    async def test_a_subscribe_in_flight_is_not_doubled(self):
        for i in range(3):
            await asyncio.to_thread(publish, self.nodes[1], "chat:twice", i)
        c = await Client.open(self.nodes[0])
        position = {"epoch": (await asyncio.to_thread(publish, self.nodes[1], "chat:twice", 3))["epoch"], "seq": 1}
        # Two subscribes sent back to back, before the broker answered the first.
        for cid in (1, 2):
            await c.ws.send(json.dumps({"id": cid, "op": "subscribe", "topic": "chat:twice", "since": position}))
        messages = [await c.recv() for _ in range(5)]
        replies = {m["id"]: m for m in messages if "id" in m}
        self.assertTrue(replies[1]["recovered"], replies)
        self.assertEqual(replies[2]["error"]["code"], 409)
        self.assertEqual([m["seq"] for m in messages if "seq" in m and "id" not in m], [2, 3, 4])

    async def test_subscribes_in_flight_count_against_the_limit_once(self):
        c = await Client.open(self.nodes[0])
        # websocket.max_subscriptions (64) + 1, all sent before the broker answers any.
        for i in range(65):
            await c.ws.send(json.dumps({"id": i, "op": "subscribe", "topic": f"chat:limit-{i}"}))
        replies = {}
        while len(replies) < 65:
            m = await c.recv()
            replies[m["id"]] = m
        self.assertEqual([i for i, m in replies.items() if not m.get("ok")], [64], replies[64])
        self.assertEqual(replies[64]["error"]["code"], 413)
        # Answered: still at the limit, until one is given up.
        self.assertEqual((await c.command("subscribe", topic="chat:limit-more"))["error"]["code"], 413)
        self.assertTrue((await c.command("unsubscribe", topic="chat:limit-0"))["ok"])
        self.assertTrue((await c.command("subscribe", topic="chat:limit-more"))["ok"])

    async def test_a_failing_publish_in_a_batch_fails_alone(self):
        node = self.nodes[0]
        sub = await Client.open(self.nodes[1])
        await sub.command("subscribe", topic="chat:good")
        writer = await Client.open(node)
        # A key of the wrong type: Redis refuses every publish to chat:broken.
        self.redis.cli("SET", "gale:chat:broken:log", "not a stream")
        # Redis holds every command for a moment: the first publish goes out alone and waits,
        # the others queue up behind it and go out together, in one pipeline.
        self.redis.cli("CLIENT", "PAUSE", 700, "ALL")
        results = {}

        def send(name, path, body):
            results[name] = http(node, "POST", path, json.dumps(body).encode())

        first = threading.Thread(target=send, args=("first", "/api/publish/chat:good", 0))
        first.start()
        await asyncio.sleep(0.2)
        batch = [
            ("broken", "/api/publish/chat:broken", 1),
            ("good-a", "/api/publish/chat:good", 2),
            ("broadcast", "/api/broadcast", {"topics": ["chat:other", "chat:broken"], "data": 3}),
            ("good-b", "/api/publish/chat:good", 4),
        ]
        threads = [threading.Thread(target=send, args=b) for b in batch]
        for t in threads:
            t.start()
        reply = await writer.command("publish", topic="chat:good", data=5)
        await asyncio.to_thread(lambda: [t.join() for t in [first, *threads]])
        self.assertEqual(results["first"][0], 200, results)
        # Each publish has its own answer: the refused one an error that says why, the others
        # their positions.
        status, text = results["broken"]
        self.assertEqual(status, 500, text)
        self.assertIn("WRONGTYPE", json.loads(text)["error"]["reason"])
        self.assertEqual([results[k][0] for k in ("good-a", "good-b")], [200, 200], results)
        self.assertTrue(reply.get("ok"), reply)
        seqs = sorted([json.loads(results[k][1])["seq"] for k in ("first", "good-a", "good-b")] + [reply["seq"]])
        self.assertEqual(seqs, [1, 2, 3, 4])
        # A publish to several topics goes to all or none: the broadcast left no trace.
        self.assertEqual(results["broadcast"][0], 500, results["broadcast"])
        for key in ("gale:chat:other:seq", "gale:chat:broken:seq"):
            self.assertEqual(self.redis.cli("EXISTS", key), "0", key)
        # Every accepted publish was delivered, once.
        got = [await sub.delivery() for _ in range(4)]
        self.assertEqual([d["seq"] for d in got], [1, 2, 3, 4])
        self.assertEqual(sorted(d["data"] for d in got), [0, 2, 4, 5])
        await asyncio.sleep(0.3)
        self.assertEqual(sub.deliveries, [], "nothing twice")
        # A refused script is not a lost connection: the node stayed connected.
        status, text = await asyncio.to_thread(http, node, "GET", "/metrics", None, None)
        self.assertIn("gale_broker_reconnects_total 0", text)

    async def test_damaged_keys_fail_alone_and_lost_sequence_numbers_continue(self):
        node = self.nodes[0]
        for data in (1, 2):
            publish(node, "chat:lost", data)
        # The sequence key goes (deleted, or evicted) while the log stays: numbering continues
        # from the log instead of failing on it.
        self.redis.cli("DEL", "gale:chat:lost:seq")
        body = json.dumps({"topics": ["chat:fine", "chat:lost"], "data": 3}).encode()
        status, text = await asyncio.to_thread(http, node, "POST", "/api/broadcast", body)
        self.assertEqual(status, 200, text)
        self.assertEqual([r["seq"] for r in json.loads(text)["results"]], [1, 3])
        # A sequence key that holds no number is refused before anything is written.
        self.redis.cli("SET", "gale:chat:garbled:seq", "abc")
        body = json.dumps({"topics": ["chat:untouched", "chat:garbled"], "data": 4}).encode()
        status, text = await asyncio.to_thread(http, node, "POST", "/api/broadcast", body)
        self.assertEqual(status, 500, text)
        self.assertEqual(self.redis.cli("EXISTS", "gale:chat:untouched:seq"), "0")
        # A subscription whose replay Redis refuses gets an error of its own; the node stays up
        # and connected, and other subscriptions work.
        publish(node, "chat:unreadable", 1)
        epoch = json.loads((await asyncio.to_thread(http, node, "GET", "/api/topics/chat%3Aunreadable"))[1])["epoch"]
        self.redis.cli("DEL", "gale:chat:unreadable:log")
        self.redis.cli("SET", "gale:chat:unreadable:log", "not a stream")
        self.redis.cli("SET", "gale:chat:unreadable:seq", "5")
        c = await Client.open(node)
        reply = await c.command("subscribe", topic="chat:unreadable", since={"epoch": epoch, "seq": 1})
        self.assertEqual(reply["error"]["code"], 500, reply)
        self.assertIn("WRONGTYPE", reply["error"]["reason"])
        self.assertTrue((await c.command("subscribe", topic="chat:fine"))["ok"])
        status, text = await asyncio.to_thread(http, node, "GET", "/healthz", None, None)
        self.assertEqual((status, json.loads(text)["broker"]), (200, "up"), text)
        status, text = await asyncio.to_thread(http, node, "GET", "/metrics", None, None)
        self.assertIn("gale_broker_reconnects_total 0", text)
        # Only what was published counts (two, a broadcast to two topics, one), and the
        # refused subscription is a command error.
        self.assertIn('gale_publishes_total{source="http"} 5', text)
        self.assertIn("gale_command_errors_total 1", text)

    async def test_redis_restart(self):
        sub = await Client.open(self.nodes[0])
        await sub.command("subscribe", topic="chat:fault")
        r = await asyncio.to_thread(publish, self.nodes[1], "chat:fault", "before")
        self.assertEqual((await sub.delivery())["seq"], 1)
        port = self.redis.port
        self.redis.stop(signal.SIGKILL)
        # Publishes are refused with 503 and a reason, quickly; health says so.
        start = time.monotonic()
        status, text = await asyncio.to_thread(
            http, self.nodes[1], "POST", "/api/publish/chat:fault", b'"during"')
        self.assertEqual(status, 503, text)
        self.assertIn("broker", text)
        self.assertLess(time.monotonic() - start, 5)
        await asyncio.sleep(0.5)
        status, text = await asyncio.to_thread(http, self.nodes[0], "GET", "/healthz", None, None)
        self.assertEqual((status, json.loads(text)["broker"]), (503, "down"))
        # Refused publishes leave nothing behind: the node's memory stays flat.
        node = self.nodes[1]
        before = rss_kib(node.proc.pid)
        codes = await asyncio.to_thread(publish_many, node, "chat:fault", 3000)
        self.assertEqual(set(codes), {503})
        self.assertLess(rss_kib(node.proc.pid) - before, 4096, "no growth past 4 MiB over 3,000 refusals")
        status, text = await asyncio.to_thread(http, self.nodes[0], "GET", "/metrics", None, None)
        self.assertIn("gale_broker_up 0", text)
        # Redis comes back empty (no persistence): nodes reconnect, the topic starts a new epoch.
        self.redis = Redis(port)
        deadline = time.monotonic() + TIMEOUT
        while True:
            status, text = await asyncio.to_thread(
                http, self.nodes[1], "POST", "/api/publish/chat:fault", b'"after"')
            if status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        self.assertEqual(status, 200, text)
        after = json.loads(text)
        self.assertNotEqual(after["epoch"], r["epoch"])
        # The node resubscribed: the live subscriber gets it (a subscriber may receive it once the
        # node is back in Redis; wait for it).
        d = await sub.delivery()
        self.assertEqual((d["data"], d["epoch"]), ("after", after["epoch"]))
        # A client recovering from the old epoch is told it cannot (a node that has not used
        # its connection since Redis went away may answer 503 once, as it finds out: retry).
        c = await Client.open(self.nodes[2])
        for _ in range(20):
            reply = await c.command("subscribe", topic="chat:fault", since={"epoch": r["epoch"], "seq": 1})
            if "error" not in reply:
                break
            self.assertEqual(reply["error"]["code"], 503)
            await asyncio.sleep(0.2)
        self.assertIs(reply.get("recovered"), False, reply)
        self.assertIn("epoch", reply["reason"])
        # Every node reconnects on its own (its command connection after a backoff of up to
        # 2 s, once it has found the old one dead): node A reports up within the deadline.
        while True:
            status, text = await asyncio.to_thread(http, self.nodes[0], "GET", "/metrics", None, None)
            if "gale_broker_up 1" in text or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        self.assertIn("gale_broker_up 1", text)
        self.assertRegex(text, r"gale_broker_reconnects_total [1-9]")

    async def test_a_stalled_redis_gives_503_and_recovers(self):
        await asyncio.to_thread(publish, self.nodes[0], "chat:stall", 0)
        os.kill(self.redis.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            status, text = await asyncio.to_thread(
                http, self.nodes[0], "POST", "/api/publish/chat:stall", b"1")
            self.assertEqual(status, 503, text)
            self.assertLess(time.monotonic() - start, 5, "a stalled Redis is given up on quickly")
            # The event loops are not blocked: the node answers its health check meanwhile.
            status, _ = await asyncio.to_thread(http, self.nodes[0], "GET", "/healthz", None, None)
            self.assertIn(status, (200, 503))
        finally:
            os.kill(self.redis.proc.pid, signal.SIGCONT)
        deadline = time.monotonic() + TIMEOUT
        while True:
            status, text = await asyncio.to_thread(http, self.nodes[0], "POST", "/api/publish/chat:stall", b"2")
            if status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        self.assertEqual(status, 200, text)

    async def test_idle_topics_expire_in_redis_with_their_history(self):
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(f'[history]\nttl = 1\n[cluster]\nbroker = "{self.redis.url}"\n')
        node = GaleServe("cluster-ttl", "--config", f.name, env={"GALE_API_KEY": API_KEY})
        try:
            first = await asyncio.to_thread(publish, node, "chat:ttl", 1)
            second = await asyncio.to_thread(publish, node, "chat:ttl", 2)
            self.assertEqual((second["seq"], second["epoch"]), (2, first["epoch"]))
            await asyncio.sleep(1.5)
            third = await asyncio.to_thread(publish, node, "chat:ttl", 3)
            # Forgotten whole: a new epoch, numbered from 1.
            self.assertEqual(third["seq"], 1)
            self.assertNotEqual(third["epoch"], first["epoch"])
        finally:
            node.kill()
            node.proc.stdout.close()
            os.unlink(f.name)

    async def test_max_topics_applies_across_the_cluster(self):
        import tempfile
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(f'[limits]\nmax_topics = 3\n[history]\nttl = 2\n[cluster]\nbroker = "{self.redis.url}"\n')
        a, b = (GaleServe(f"cluster-max-topics-{i}", "--config", f.name, env={"GALE_API_KEY": API_KEY})
                for i in range(2))
        try:
            for node, topic in ((a, "chat:1"), (b, "chat:2"), (a, "chat:3")):
                await asyncio.to_thread(publish, node, topic, "x")
            # The cluster holds three topics: a fourth is refused on every node, with the
            # single-node answer, to backends and clients alike.
            full = "the gateway holds its maximum number of topics"
            status, text = await asyncio.to_thread(http, b, "POST", "/api/publish/chat:4", b'"x"')
            self.assertEqual((status, json.loads(text)["error"]["reason"]), (503, full), text)
            c = await Client.open(a)
            reply = await c.command("publish", topic="chat:4", data="x")
            self.assertEqual((reply["error"]["code"], reply["error"]["reason"]), (503, full))
            reply = await c.command("subscribe", topic="chat:4")
            self.assertEqual((reply["error"]["code"], reply["error"]["reason"]), (503, full))
            # Topics that have state still take publishes and subscribers.
            reply = await c.command("subscribe", topic="chat:1")
            self.assertTrue(reply["ok"], reply)
            self.assertEqual((await asyncio.to_thread(publish, b, "chat:1", "y"))["seq"], 2)
            # A broadcast that would pass the limit publishes nothing, not even to known topics.
            body = json.dumps({"topics": ["chat:2", "chat:5"], "data": "z"}).encode()
            status, text = await asyncio.to_thread(http, a, "POST", "/api/broadcast", body)
            self.assertEqual(status, 503, text)
            status, text = await asyncio.to_thread(http, a, "GET", "/api/topics/chat:2")
            self.assertEqual(json.loads(text)["seq"], 1, text)
            # Topics forgotten with their keys (history.ttl) make room again.
            await asyncio.sleep(2.5)
            self.assertEqual((await asyncio.to_thread(publish, b, "chat:4", "x"))["seq"], 1)
        finally:
            for node in (a, b):
                node.kill()
                node.proc.stdout.close()
            os.unlink(f.name)

    async def test_replays_are_read_in_pages(self):
        node = GaleServe("cluster-pages", "--broker", self.redis.url, "--history-size", "400",
                         env={"GALE_API_KEY": API_KEY})
        try:
            # A replay over several pages is exact.
            codes = await asyncio.to_thread(publish_many, node, "chat:pages", 100)
            self.assertEqual(set(codes), {200})
            epoch = json.loads((await asyncio.to_thread(http, node, "GET", "/api/topics/chat:pages"))[1])["epoch"]
            c = await Client.open(node)
            reply = await c.command("subscribe", topic="chat:pages", since={"epoch": epoch, "seq": 3})
            self.assertEqual((reply["recovered"], reply["missed"]), (True, 97), reply)
            self.assertEqual([(await c.delivery())["seq"] for _ in range(97)], list(range(4, 101)))
            # A history far bigger than a connection may queue (half of max_backpressure, 2 MiB):
            # the replay is refused once what was read passes that, without reading it all.
            body = json.dumps("x" * 40_000).encode()
            codes = await asyncio.to_thread(publish_many, node, "chat:big", 300, body)
            self.assertEqual(set(codes), {200})
            epoch = json.loads((await asyncio.to_thread(http, node, "GET", "/api/topics/chat:big"))[1])["epoch"]
            before = self.redis.bytes_sent()
            reply = await c.command("subscribe", topic="chat:big", since={"epoch": epoch, "seq": 0})
            read = self.redis.bytes_sent() - before
            self.assertIs(reply["recovered"], False, reply)
            self.assertIn("queue", reply["reason"])
            self.assertLess(read, 5_000_000, "12 MB of history, read in pages until past 2 MiB")
        finally:
            node.kill()
            node.proc.stdout.close()

    async def test_recoveries_that_queue_up_together_share_one_read_of_the_log(self):
        node = self.nodes[0]
        live = await Client.open(node)
        await live.command("subscribe", topic="chat:storm")
        codes = await asyncio.to_thread(publish_many, node, "chat:storm", 30)
        self.assertEqual(set(codes), {200})
        epoch = json.loads((await asyncio.to_thread(http, node, "GET", "/api/topics/chat:storm"))[1])["epoch"]
        # Forty clients coming back at positions all over the history, the lowest first.
        sinces = [0] + [(7 * i) % 31 for i in range(1, 40)]
        clients = [await Client.open(node) for _ in sinces]
        # Redis holds every command for a moment: the subscribes queue up at the broker as they
        # do in a reconnect storm, behind the first one's read.
        self.redis.cli("CLIENT", "PAUSE", "400", "ALL")
        replies = await asyncio.gather(*(
            c.command("subscribe", topic="chat:storm", since={"epoch": epoch, "seq": since})
            for c, since in zip(clients, sinces)))
        for c, since, reply in zip(clients, sinces, replies):
            self.assertEqual((reply["recovered"], reply["missed"]), (True, 30 - since), reply)
            got = [(await c.delivery())["seq"] for _ in range(30 - since)]
            self.assertEqual(got, list(range(since + 1, 31)), since)
        text = (await asyncio.to_thread(http, node, "GET", "/metrics", None, None))[1]
        self.assertIn('gale_recoveries_total{result="recovered"} 40', text)
        reads = metric(text, "gale_broker_log_reads_total")
        # One read per client would be 39; shared, one read and one more for each client that
        # reaches the broker with a position below all before it (the loops forward in their
        # own order).
        self.assertLessEqual(reads, 8, text)
        # Live deliveries go on after the replays, once each.
        await asyncio.to_thread(publish, node, "chat:storm", "next")
        for c in clients:
            self.assertEqual((await c.delivery())["seq"], 31)

    async def test_recoveries_of_many_topics_read_their_logs_in_one_round_trip(self):
        node = self.nodes[0]
        topics = [f"chat:many-{i}" for i in range(20)]
        live = await Client.open(node)
        for t in topics:
            await live.command("subscribe", topic=t)
        epochs = {}
        for t in topics:
            self.assertEqual(set(await asyncio.to_thread(publish_many, node, t, 6)), {200})
            epochs[t] = json.loads((await asyncio.to_thread(http, node, "GET", f"/api/topics/{t}"))[1])["epoch"]

        before = (await asyncio.to_thread(http, node, "GET", "/metrics", None, None))[1]
        # Five clients per topic, at positions 1 to 5, all coming back while Redis holds its
        # commands: the subscribes queue up at the broker as one batch.
        clients = [(await Client.open(node), t, 1 + i % 5) for i, t in enumerate(topics * 5)]
        self.redis.cli("CLIENT", "PAUSE", "400", "ALL")
        replies = await asyncio.gather(*(
            c.command("subscribe", topic=t, since={"epoch": epochs[t], "seq": since}) for c, t, since in clients))
        for (c, t, since), reply in zip(clients, replies):
            self.assertEqual((reply["recovered"], reply["missed"]), (True, 6 - since), reply)
            self.assertEqual([(await c.delivery())["seq"] for _ in range(6 - since)], list(range(since + 1, 7)))
        after = (await asyncio.to_thread(http, node, "GET", "/metrics", None, None))[1]
        reads = metric(after, "gale_broker_log_reads_total") - metric(before, "gale_broker_log_reads_total")
        trips = metric(after, "gale_broker_pipelines_total") - metric(before, "gale_broker_pipelines_total")
        # A read per topic and batch, not per client (100 without sharing): one for the
        # subscribe that met the pause, then one per topic for the rest, and as many again if
        # the loops handed them over in two goes (31 seen once)...
        self.assertLessEqual(reads, 1 + 2 * len(topics), after)
        # ...in a pipelined round trip per batch (the one that met the pause, then the rest;
        # a third if the loops handed the subscribes over in two goes).
        self.assertTrue(1 <= trips <= 3, (trips, after))

    async def test_a_read_ahead_past_its_budget_is_left_to_the_subscribes(self):
        # Three messages of 40 KB a topic: more than a read-ahead takes of one topic (64 KiB).
        node = self.nodes[0]
        topics = ["chat:big-0", "chat:big-1"]
        live = await Client.open(node)
        body = json.dumps("x" * 40_000).encode()
        epochs = {}
        for t in topics:
            await live.command("subscribe", topic=t)
            self.assertEqual(set(await asyncio.to_thread(publish_many, node, t, 3, body)), {200})
            epochs[t] = json.loads((await asyncio.to_thread(http, node, "GET", f"/api/topics/{t}"))[1])["epoch"]
        clients = [(await Client.open(node), t) for t in topics * 4]
        self.redis.cli("CLIENT", "PAUSE", "400", "ALL")
        replies = await asyncio.gather(*(
            c.command("subscribe", topic=t, since={"epoch": epochs[t], "seq": 0}) for c, t in clients))
        for (c, t), reply in zip(clients, replies):
            self.assertEqual((reply["recovered"], reply["missed"]), (True, 3), reply)
            got = [await c.delivery() for _ in range(3)]
            self.assertEqual([(d["seq"], len(d["data"])) for d in got], [(1, 40_000), (2, 40_000), (3, 40_000)])

    async def test_publish_options_hold_across_nodes(self):
        def post(node, path, data, headers):
            req = urllib.request.Request(node.http_url + path, data=json.dumps(data).encode(), method="POST")
            for name, value in {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
                                **headers}.items():
                req.add_header(name, value)
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                return r.status, r.headers, json.loads(r.read())

        subs = [await Client.open(n) for n in self.nodes]
        for s in subs:
            self.assertTrue((await s.command("subscribe", topic="chat:opt"))["ok"])
        # An idempotent publish retried on another node: the original position, delivered once.
        key = {"Idempotency-Key": "retry-1"}
        _, _, first = await asyncio.to_thread(post, self.nodes[0], "/api/publish/chat:opt", {"n": 1}, key)
        status, headers, again = await asyncio.to_thread(post, self.nodes[1], "/api/publish/chat:opt", {"n": 1}, key)
        self.assertEqual((status, again["seq"], again["epoch"], again["duplicate"]), (200, 1, first["epoch"], True))
        self.assertEqual(headers["Idempotent-Replayed"], "true")
        self.assertEqual(first["seq"], 1)
        self.assertRegex(self.redis.cli("GET", "gale:chat:opt|idem:retry-1"), r"^[0-9a-f]+:1$")
        self.assertGreater(int(self.redis.cli("PTTL", "gale:chat:opt|idem:retry-1")), 0)
        # exclude_self: the publisher (on node 2) does not get its message; the others do.
        reply = await subs[2].command("publish", topic="chat:opt", data={"n": 2}, exclude_self=True)
        self.assertEqual(reply["seq"], 2)
        # A batch on node 1, its repeated item a duplicate; then a client retry on node 2.
        items = [{"topic": "chat:opt", "data": {"n": 3}, "idempotency_key": "b-3"},
                 {"topic": "chat:opt", "data": {"n": 3}, "idempotency_key": "b-3"},
                 {"topic": "no good", "data": 0}]
        _, _, body = await asyncio.to_thread(post, self.nodes[1], "/api/publish_batch", items, {})
        results = body["results"]
        self.assertEqual((results[0]["seq"], results[1]["seq"], results[1]["duplicate"]), (3, 3, True))
        self.assertEqual(results[2]["error"]["code"], 400)
        retry = await subs[2].command("publish", topic="chat:opt", data={"n": 3}, idempotency_key="b-3")
        self.assertEqual((retry["seq"], retry["duplicate"]), (3, True))
        for i, s in enumerate(subs):
            expected = [1, 3] if i == 2 else [1, 2, 3]
            got = [await s.delivery() for _ in expected]
            self.assertEqual([d["seq"] for d in got], expected)
        await asyncio.sleep(0.3)
        for s in subs:
            await s.command("ping")
        self.assertEqual([s.deliveries for s in subs], [[], [], []], "nothing twice")
        metrics = (await asyncio.to_thread(http, self.nodes[1], "GET", "/metrics", None, None))[1]
        self.assertIn("gale_idempotent_replays_total 2", metrics)
        self.assertIn("gale_batch_items_total 3", metrics)
        # A message's time to live, kept with its entry in Redis: once past, history reads on any
        # node leave it out, and recovery from before it is refused.
        await asyncio.to_thread(post, self.nodes[0], "/api/publish/chat:brief?ttl=1", "brief", {})
        _, _, last = await asyncio.to_thread(post, self.nodes[0], "/api/publish/chat:brief", "after", {})
        self.assertEqual(last["seq"], 2)
        page = json.loads((await asyncio.to_thread(http, self.nodes[1], "GET", "/api/history/chat:brief"))[1])
        self.assertEqual([m["data"] for m in page["messages"]], ["brief", "after"])
        await asyncio.sleep(1.2)
        for n in self.nodes:
            page = json.loads((await asyncio.to_thread(http, n, "GET", "/api/history/chat:brief"))[1])
            self.assertEqual([m["data"] for m in page["messages"]], ["after"])
            self.assertEqual((page["first_seq"], page["truncated"]), (2, True))
        c = await Client.open(self.nodes[2])
        reply = await c.command("subscribe", topic="chat:brief", since={"epoch": last["epoch"], "seq": 0})
        self.assertIs(reply["recovered"], False, reply)
        c = await Client.open(self.nodes[1])
        reply = await c.command("subscribe", topic="chat:brief", since={"epoch": last["epoch"], "seq": 1})
        self.assertEqual((reply["recovered"], reply["missed"]), (True, 1), reply)

    async def test_history_is_read_from_redis_the_same_on_every_node(self):
        a, b, c = self.nodes
        status, text = await asyncio.to_thread(http, b, "GET", "/api/history/chat:h", None, None)
        self.assertEqual(status, 401, text)
        status, text = await asyncio.to_thread(http, b, "GET", "/api/history/chat:h?limit=1001")
        self.assertEqual(status, 400, text)
        self.assertIn("limit", json.loads(text)["error"]["reason"])
        _, text = await asyncio.to_thread(http, b, "GET", "/api/history/chat:h")
        self.assertEqual(json.loads(text)["epoch"], None)
        # More than one page of the stream (32 entries), published on node A.
        self.assertEqual(await asyncio.to_thread(publish_many, a, "chat:h", 40, b'{"n": 1}'), [200] * 40)

        async def read(node, query):
            status, text = await asyncio.to_thread(http, node, "GET", f"/api/history/chat:h{query}")
            self.assertEqual(status, 200, text)
            return json.loads(text)

        whole = await read(b, "")
        self.assertEqual([m["seq"] for m in whole["messages"]], list(range(1, 41)))
        self.assertEqual((whole["seq"], whole["first_seq"], whole["truncated"], whole["more"]), (40, 1, False, False))
        self.assertEqual(whole, await read(c, ""))
        page = await read(c, "?since_seq=30&limit=4")
        self.assertEqual(([m["seq"] for m in page["messages"]], page["more"]), ([31, 32, 33, 34], True))
        self.assertEqual(page, await read(b, "?since_seq=30&limit=4"))
        # The command reads the same, on any node.
        client = await Client.open(c)
        reply = await client.command("history", topic="chat:h", since_seq=30, limit=4)
        self.assertEqual({k: reply[k] for k in page}, page)
        self.assertEqual((await client.command("history", topic="private:x"))["error"]["code"], 403)
        # A topic without state has no epoch; `since` with a null epoch recovers its first one.
        fresh = await Client.open(c)
        self.assertEqual((await fresh.command("history", topic="chat:new"))["epoch"], None)
        for i in range(2):
            await asyncio.to_thread(publish, a, "chat:new", i)
        reply = await fresh.command("subscribe", topic="chat:new", since={"epoch": None, "seq": 0})
        self.assertEqual((reply["recovered"], reply["missed"]), (True, 2), reply)
        self.assertEqual([(await fresh.delivery())["data"] for _ in range(2)], [0, 1])
        # Trimmed from the stream: said so.
        self.redis.cli("XTRIM", "gale:chat:h:log", "MAXLEN", 10)
        page = await read(b, "?since_seq=5&limit=3")
        self.assertEqual(([m["seq"] for m in page["messages"]], page["first_seq"], page["truncated"]),
                         ([31, 32, 33], 31, True))
        # History then subscribe with since, on another node, while node A publishes.
        done = threading.Event()

        def publisher():
            for i in range(41, 141):
                publish(a, "chat:h", {"n": i})
                time.sleep(0.002)
            done.set()

        task = asyncio.get_running_loop().run_in_executor(None, publisher)
        await asyncio.sleep(0.1)
        page = await client.command("history", topic="chat:h", since_seq=35)
        last = page["messages"][-1]["seq"]
        reply = await client.command("subscribe", topic="chat:h", since={"epoch": page["epoch"], "seq": last})
        self.assertTrue(reply["recovered"], reply)
        await task
        seqs = [m["seq"] for m in page["messages"]]
        while seqs[-1] != 140:
            seqs.append((await client.delivery())["seq"])
        self.assertEqual(seqs, list(range(36, 141)))
        metrics = [(await asyncio.to_thread(http, n, "GET", "/metrics", None, None))[1] for n in self.nodes]
        self.assertIn('gale_history_reads_total{source="client"} 3', metrics[2])
        self.assertIn('gale_history_reads_total{source="http"} 4', metrics[1])

    async def test_a_publisher_left_out_stays_out_when_its_node_catches_up(self):
        node = self.nodes[0]
        publisher, other = await Client.open(node), await Client.open(node)
        for c in (publisher, other):
            self.assertTrue((await c.command("subscribe", topic="chat:gap"))["ok"])
        # The node's subscription to Redis is cut and cannot be made again for a while (no new
        # connections), so what is published meanwhile reaches it only by its catch-up from
        # the topic's log.
        admin = socket.create_connection(("127.0.0.1", self.redis.port), timeout=TIMEOUT)
        try:
            admin.sendall(b"CONFIG SET maxclients 1\r\nCLIENT KILL TYPE pubsub\r\n")
            time.sleep(0.3)
            reply = await publisher.command("publish", topic="chat:gap", data="mine", exclude_self=True)
            self.assertEqual(reply["seq"], 1, reply)
        finally:
            admin.sendall(b"CONFIG SET maxclients 10000\r\n")
            time.sleep(0.1)
            admin.close()
        d = await other.delivery()
        self.assertEqual((d["seq"], d["data"]), (1, "mine"))
        await asyncio.to_thread(publish, self.nodes[1], "chat:gap", "next")
        self.assertEqual((await other.delivery())["seq"], 2)
        # The publisher's first delivery is the next message: its own was left out.
        self.assertEqual((await publisher.delivery())["seq"], 2)
        status, text = await asyncio.to_thread(http, node, "GET", "/metrics", None, None)
        self.assertRegex(text, r"gale_broker_reconnects_total [1-9]")

    async def test_a_killed_node_does_not_disturb_the_others(self):
        subs = [await Client.open(n) for n in self.nodes[1:]]
        for s in subs:
            await s.command("subscribe", topic="chat:survive")
        doomed = await Client.open(self.nodes[0])
        await doomed.command("subscribe", topic="chat:survive")
        self.nodes[0].kill()
        r = await asyncio.to_thread(publish, self.nodes[1], "chat:survive", "still here")
        for s in subs:
            self.assertEqual((await s.delivery())["seq"], r["seq"])



PRESENCE_CONFIG = """
[presence]
ttl = 2

[[namespaces]]
pattern = "room:*"
subscribe = true
presence = true
join_leave = true
"""
PRESENCE_TTL = 2.0


class PresenceClusterTest(unittest.IsolatedAsyncioTestCase):
    """Presence over two nodes: kept in Redis, the same on both, join/leave events crossing
    nodes, and a SIGKILLed node's clients gone within `presence.ttl` (2 s here)."""

    def setUp(self):
        import tempfile

        self.redis = Redis()
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(PRESENCE_CONFIG)
        self.config = f.name
        env = {"GALE_API_KEY": API_KEY}
        self.nodes = [GaleServe(f"cluster-presence-{i}", "--config", f.name, "--broker", self.redis.url,
                                "--jwt-secret", SECRET, env=env) for i in range(2)]

    def tearDown(self):
        for n in self.nodes:
            n.kill()
            n.proc.stdout.close()
        self.redis.stop()
        os.unlink(self.config)

    async def open(self, node, user=None, **claims):
        url = node.url + "/ws"
        if user is not None:
            url += "?token=" + make_token({"sub": user, "exp": int(time.time()) + 60, **claims})
        return await GatewayClient.open(url)

    async def presence(self, node, topic, kind="presence"):
        status, text = await asyncio.to_thread(http, node, "GET", f"/api/{kind}/{topic}")
        self.assertEqual(status, 200, text)
        return json.loads(text)

    async def test_presence_spans_the_nodes_and_a_killed_nodes_clients_expire(self):
        watcher = await self.open(self.nodes[0])
        self.assertTrue((await watcher.command("subscribe", topic="room:c"))["ok"])
        ann = await self.open(self.nodes[0], "ann", info={"name": "Ann"})
        bob = await self.open(self.nodes[1], "bob")
        cat = await self.open(self.nodes[1], "cat")
        anon = await self.open(self.nodes[1])
        for c in (ann, bob, cat, anon):
            self.assertTrue((await c.command("subscribe", topic="room:c"))["ok"])
        # Join events cross nodes: the watcher on node 0 hears of those on node 1.
        joins = [await watcher.recv() for _ in range(3)]
        self.assertEqual([(e["op"], e["user"]) for e in joins], [("join", "ann"), ("join", "bob"), ("join", "cat")])
        for node in self.nodes:
            body = await self.presence(node, "room:c")
            self.assertEqual((body["connections"], body["users"], body["more"]), (5, 3, False), node.port)
            self.assertEqual(sorted((c["user"], c.get("info")) for c in body["clients"]),
                             [("ann", {"name": "Ann"}), ("bob", None), ("cat", None)])
            self.assertEqual(len({c["client"] for c in body["clients"]}), 3, "client ids differ across nodes")
        reply = await anon.command("presence_stats", topic="room:c")
        self.assertEqual((reply["connections"], reply["users"]), (5, 3))
        # A list reads only the hashes of members it shows: the anonymous ones are apart.
        def hashes(kind):
            return self.redis.cli("--scan", "--pattern", f"gale:room:c:p:{kind}:*").split()
        listed = [v for key in hashes("n") for v in self.redis.cli("HVALS", key).splitlines()]
        self.assertEqual(sorted(json.loads(v)["user"] for v in listed), ["ann", "bob", "cat"])
        self.assertEqual(sum(int(self.redis.cli("HLEN", key)) for key in hashes("a")), 2)
        # An unsubscribe on node 1: stats and a leave event on node 0.
        self.assertTrue((await cat.command("unsubscribe", topic="room:c"))["ok"])
        leave = await watcher.recv()
        self.assertEqual((leave["op"], leave["user"], leave["client"]), ("leave", "cat", joins[2]["client"]))
        self.assertEqual(await self.presence(self.nodes[0], "room:c", "presence_stats"),
                         {"topic": "room:c", "connections": 4, "users": 2})
        # Node 1 dies without a word: its clients disappear within presence.ttl.
        killed = time.monotonic()
        self.nodes[1].kill()
        while True:
            body = await self.presence(self.nodes[0], "room:c", "presence_stats")
            if (body["connections"], body["users"]) == (2, 1):
                break
            self.assertLess(time.monotonic() - killed, PRESENCE_TTL + 1.0, body)
            await asyncio.sleep(0.05)
        gone_after = time.monotonic() - killed
        self.assertLessEqual(gone_after, PRESENCE_TTL + 1.0)
        # Its clients with a token leave with their events, sent by the script that forgot it.
        leave = await watcher.recv()
        self.assertEqual((leave["op"], leave["topic"], leave["user"], leave["client"]),
                         ("leave", "room:c", "bob", joins[1]["client"]))
        body = await self.presence(self.nodes[0], "room:c")
        self.assertEqual([c["user"] for c in body["clients"]], ["ann"])
        # The live node keeps its own clients past the TTL (it refreshes them).
        await asyncio.sleep(PRESENCE_TTL + 0.5)
        body = await self.presence(self.nodes[0], "room:c", "presence_stats")
        self.assertEqual((body["connections"], body["users"]), (2, 1))
        await ann.close()
        await watcher.close()
        deadline = time.monotonic() + 5
        while (await self.presence(self.nodes[0], "room:c", "presence_stats"))["connections"] != 0:
            self.assertLess(time.monotonic(), deadline)
            await asyncio.sleep(0.05)
        status, text = await asyncio.to_thread(http, self.nodes[0], "GET", "/metrics", None, None)
        self.assertRegex(text, r'gale_presence_requests_total\{source="http",kind="stats"\} [1-9]')
        self.assertIn("gale_presence_members 0", text)


class PresenceFaultTest(unittest.IsolatedAsyncioTestCase):
    """Presence through Redis faults, on one node whose presence lives 6 s without a refresh
    (so a stall of 3 s forgets nothing): leaves during a stall, and a join Redis refused."""

    def setUp(self):
        import tempfile

        self.redis = Redis()
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(PRESENCE_CONFIG.replace("ttl = 2", "ttl = 6"))
        self.config = f.name
        self.node = GaleServe("cluster-presence-fault", "--config", f.name, "--broker", self.redis.url,
                              "--jwt-secret", SECRET, env={"GALE_API_KEY": API_KEY})
        self.clients = []

    async def asyncTearDown(self):
        for c in self.clients:
            await c.close()

    def tearDown(self):
        self.node.kill()
        self.node.proc.stdout.close()
        self.redis.stop()
        os.unlink(self.config)

    async def open(self, user=None):
        url = self.node.url + "/ws"
        if user is not None:
            url += "?token=" + make_token({"sub": user, "exp": int(time.time()) + 60})
        c = await GatewayClient.open(url)
        self.clients.append(c)
        return c

    async def stats_become(self, topic, expected, within):
        deadline = time.monotonic() + within
        while True:
            status, text = await asyncio.to_thread(http, self.node, "GET", f"/api/presence_stats/{topic}")
            body = json.loads(text) if status == 200 else None
            if body and (body["connections"], body["users"]) == expected:
                return
            self.assertLess(time.monotonic(), deadline, (status, text))
            await asyncio.sleep(0.1)

    async def test_leaves_while_redis_is_stalled_are_carried_out_with_their_events(self):
        watcher = await self.open()
        self.assertTrue((await watcher.command("subscribe", topic="room:o"))["ok"])
        ann, bob = await self.open("ann"), await self.open("bob")
        for c in (ann, bob):
            self.assertTrue((await c.command("subscribe", topic="room:o"))["ok"])
        self.assertEqual([(await watcher.recv())["user"] for _ in range(2)], ["ann", "bob"])
        os.kill(self.redis.proc.pid, signal.SIGSTOP)
        try:
            # The first leave times out, the node reconnects, and the second waits for Redis.
            for c in (ann, bob):
                self.clients.remove(c)
                await c.close()
            await asyncio.sleep(3)
        finally:
            os.kill(self.redis.proc.pid, signal.SIGCONT)
        # Once Redis answers again, both leave, each with its event.
        leaves = [await watcher.recv() for _ in range(2)]
        self.assertEqual(sorted((e["op"], e["user"]) for e in leaves), [("leave", "ann"), ("leave", "bob")])
        await self.stats_become("room:o", (1, 0), TIMEOUT)

    async def test_a_join_redis_refused_is_made_again(self):
        ann = await self.open("ann")
        self.assertTrue((await ann.command("subscribe", topic="room:j"))["ok"])
        await self.stats_become("room:j", (1, 1), TIMEOUT)
        # The node's member hash is made unusable for a moment: the next join fails in Redis.
        members = self.redis.cli("--scan", "--pattern", "gale:room:j:p:n:*")
        self.redis.cli("RENAME", members, members + ".saved")
        self.redis.cli("SET", members, "not a hash")
        bob = await self.open("bob")
        self.assertTrue((await bob.command("subscribe", topic="room:j"))["ok"])
        self.redis.cli("DEL", members)
        self.redis.cli("RENAME", members + ".saved", members)
        # A refresh (every ttl/4, 1.5 s) joins the node's members again: bob is there, once.
        await self.stats_become("room:j", (2, 2), 4.0)
        await asyncio.sleep(2.0)
        await self.stats_become("room:j", (2, 2), 0.1)



class ControlClusterTest(unittest.IsolatedAsyncioTestCase):
    """The server-side control API sent to one node acts on the user's connections on every node."""

    def setUp(self):
        self.redis = Redis()
        env = {"GALE_API_KEY": API_KEY}
        self.nodes = [GaleServe(f"cluster-control-{i}", "--broker", self.redis.url, "--jwt-secret", SECRET,
                                env=env) for i in range(2)]

    def tearDown(self):
        for n in self.nodes:
            n.kill()
            n.proc.stdout.close()
        self.redis.stop()

    async def user(self, node, sub):
        token = make_token({"sub": sub, "exp": int(time.time()) + 600})
        return await GatewayClient.open(f"{node.url}/ws?token={token}")

    def command(self, node, op, body):
        status, text = http(node, "POST", f"/api/{op}", json.dumps(body).encode())
        return status, json.loads(text)

    async def test_commands_sent_to_one_node_act_on_the_other(self):
        a, b = self.nodes
        topic = "chat:ctl"
        on_b, on_a, other = await self.user(b, "kim"), await self.user(a, "kim"), await self.user(b, "lee")
        self.assertTrue((await on_b.command("ping"))["ok"])
        status, body = await asyncio.to_thread(self.command, a, "subscribe", {"user": "kim", "topic": topic})
        self.assertEqual((status, body), (200, {"user": "kim", "connections": 1, "nodes": 2}))
        for c in (on_b, on_a):
            reply = await c.recv()
            self.assertEqual((reply["op"], reply["topic"], reply["server"]), ("subscribed", topic, True))
        await asyncio.to_thread(publish, a, topic, {"n": 1})
        for c in (on_b, on_a):
            self.assertEqual((await c.delivery())["data"], {"n": 1})
        status, body = await asyncio.to_thread(self.command, a, "unsubscribe", {"user": "kim", "topic": topic})
        self.assertEqual((status, body["connections"]), (200, 1))
        for c in (on_b, on_a):
            self.assertEqual(await c.recv(), {"ok": True, "op": "unsubscribed", "topic": topic, "reason": "server"})
        status, body = await asyncio.to_thread(self.command, a, "disconnect", {"user": "kim", "code": 4100,
                                                                                "reason": "bye"})
        self.assertEqual((status, body), (200, {"user": "kim", "connections": 1, "nodes": 2}))
        for c in (on_b, on_a):
            with self.assertRaises(ConnectionClosed):
                while True:
                    await c.recv()
            self.assertEqual((c.ws.close_code, c.ws.close_reason), (4100, "bye"))
        self.assertTrue((await other.command("ping"))["ok"])
        _, text = await asyncio.to_thread(http, b, "GET", "/metrics", None, None)
        for line in ["gale_server_subscribes_total 1", "gale_server_unsubscribes_total 1",
                     "gale_server_disconnects_total 1"]:
            self.assertIn(line, text)
        await other.close()


def load_tests(loader, tests, pattern):
    """GALE_TEST_SHARD=I/N: this process's share of the tests (each starts its own Redis and
    nodes)."""
    return shard(tests, by_class=False)


if __name__ == "__main__":
    unittest.main(verbosity=2)
