"""Cluster mode on a Redis Cluster: `gale serve --broker redis+cluster://…` gateways share
topics through a real Redis Cluster of 3 primaries and 3 replicas (`redis-server` processes the
module starts on free loopback ports, with their data in a temporary folder, and kills by PID).

One cluster serves the whole module (its tests run in order; the last ones change it): a
publish on any gateway reaching every gateway for topics on every shard, one order per topic
and exactly once within the history (idempotent retries on another gateway), recovery across
gateways, `limits.max_topics` over the shards, presence with a killed gateway's members
expiring, `cluster.ack_replicas` (WAIT), a shard added and slots moved to it while publishing,
and a primary killed mid-stream (503 during the failover, no acknowledged publish lost,
subscribers resume, recovery exactly what the promoted replica holds).

Run: python3 tests/python/test_redis_cluster.py   (GALE_BIN overrides target/debug/gale)
"""

import asyncio
from http.client import HTTPConnection
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

from gale_process import LOG_DIR, GaleServe
from test_cluster import REDIS_ATTEMPTS, free_port, start_redis
from gateway_client import GatewayClient
from test_gateway import SECRET, make_token

TIMEOUT = 20.0
API_KEY = "redis-cluster-key"
SLOTS = 16384


def crc16(data: bytes) -> int:
    """CRC16/XMODEM, Redis Cluster's key hash."""
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def slot_of(topic: str) -> int:
    """The slot of a topic's keys (`gale:{T}:…`)."""
    return crc16(topic.encode()) % SLOTS


def slot_of_key(key: str) -> int:
    """The slot of a Redis key without a hash tag."""
    return crc16(key.encode()) % SLOTS


class Node:
    """One redis-server of the cluster: its own port, cluster bus port and data folder."""

    def __init__(self, root):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        for _ in range(REDIS_ATTEMPTS):
            self.port, self.bus = free_port(), free_port()
            self.dir = os.path.join(root, str(self.port))
            os.makedirs(self.dir)
            self.log = open(LOG_DIR / f"redis-cluster-{self.port}.log", "ab")
            if self.started():
                return
        raise RuntimeError(f"redis-server did not start (last port {self.port}; see its log)")

    def started(self):
        """Start the server on its ports; whether it is the one answering there."""
        self.proc = start_redis(
            self.port, self.log, "--cluster-port", str(self.bus), "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000",
            "--cluster-replica-validity-factor", "0", "--dir", self.dir, "--save", "", "--appendonly", "no",
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
        return self.proc is not None

    def start(self):
        """Start the server again (it finds the cluster in its nodes.conf)."""
        if not self.started():
            raise RuntimeError(f"redis-server on {self.port} did not start (see its log)")

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def cli(self, *args):
        """One command with redis-cli; its output, stripped."""
        done = subprocess.run(["redis-cli", "-p", str(self.port), *map(str, args)],
                              capture_output=True, text=True, timeout=TIMEOUT, check=True)
        return done.stdout.strip()

    def cli_ok(self, *args):
        try:
            return self.cli(*args)
        except (subprocess.SubprocessError, OSError):
            return None

    def info(self, section):
        text = self.cli("INFO", section)
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def node_id(self):
        return self.cli("CLUSTER", "MYID")

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(TIMEOUT)

    def role(self):
        return (self.cli_ok("ROLE") or "").split("\n")[0]


class Cluster:
    """3 primaries and 3 replicas, created with `redis-cli --cluster create`."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="gale-redis-cluster-")
        self.nodes = []
        try:
            self.nodes = [Node(self.root) for _ in range(6)]
            redis_cli_cluster("create", *[n.addr for n in self.nodes], "--cluster-replicas", 1, "--cluster-yes")
            self.wait_ok()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self):
        return "redis+cluster://" + ",".join(n.addr for n in self.nodes[:3])

    def alive(self):
        return [n for n in self.nodes if n.proc.poll() is None]

    def wait_ok(self):
        """Until every live node says the cluster is ok with all slots served, and every replica
        is in sync with its primary."""
        deadline = time.monotonic() + TIMEOUT * 2
        while True:
            ready = True
            for n in self.alive():
                info = dict(line.split(":", 1) for line in (n.cli_ok("CLUSTER", "INFO") or "").splitlines()
                            if ":" in line)
                if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
                    ready = False
                    break
                repl = n.info("replication")
                if repl.get("role") == "slave" and repl.get("master_link_status") != "up":
                    ready = False
                    break
            if ready:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not become ready")
            time.sleep(0.1)

    def slot_map(self):
        """[(first, last, port of the primary)] from a live node."""
        for n in self.alive():
            text = n.cli_ok("--json", "CLUSTER", "SLOTS")
            if text:
                return [(r[0], r[1], int(r[2][1])) for r in json.loads(text)]
        raise RuntimeError("no node answers CLUSTER SLOTS")

    def owner(self, slot):
        """The node whose primary serves `slot`."""
        port = next(p for a, b, p in self.slot_map() if a <= slot <= b)
        return next(n for n in self.nodes if n.port == port)

    def primaries(self):
        return sorted({p for _, _, p in self.slot_map()})

    def wait_known(self, count):
        """Until every live node knows `count` nodes."""
        deadline = time.monotonic() + TIMEOUT
        while any(len((n.cli_ok("CLUSTER", "NODES") or "").splitlines()) < count for n in self.alive()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the nodes do not all know {count} nodes")
            time.sleep(0.1)

    def stop(self):
        for n in self.nodes:
            n.kill()
            n.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def redis_cli_cluster(*args):
    """`redis-cli --cluster ARGS…`; raises with its output if it fails."""
    done = subprocess.run(["redis-cli", "--cluster", *map(str, args)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli --cluster {' '.join(map(str, args))}: {done.stdout}{done.stderr}")
    return done.stdout


def http(node, method, path, body=None, headers=None):
    conn = HTTPConnection("127.0.0.1", node.port, timeout=TIMEOUT)
    try:
        h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def publish(node, topic, data, headers=None):
    status, text = http(node, "POST", f"/api/publish/{topic}", json.dumps(data).encode(), headers)
    return status, (json.loads(text) if text else None)


def history(node, topic, settle=0.0, since=0):
    """The topic's history read on `node` (one page, after `since`). With `settle` (seconds), a
    503 is tried again until then: after a failover, a node that has not used the failed
    primary's connection since finds out on this read (503) and reads the slot map again."""
    deadline = time.monotonic() + settle
    while True:
        status, text = http(node, "GET", f"/api/history/{topic}?since_seq={since}&limit=1000")
        if status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200, (status, text)
    return json.loads(text)


def topics_on_each_shard(cluster, prefix, per_shard):
    """Topic names, `per_shard` on each primary."""
    want = {p: per_shard for p in cluster.primaries()}
    slots = cluster.slot_map()
    found, i = [], 0
    while any(want.values()):
        topic = f"{prefix}{i}"
        i += 1
        s = slot_of(topic)
        port = next(p for a, b, p in slots if a <= s <= b)
        if want[port]:
            want[port] -= 1
            found.append(topic)
    return found


CONFIG = """
[history]
size = 1000
[presence]
ttl = 2
[[namespaces]]
pattern = "room:*"
subscribe = true
presence = true
join_leave = true
[[namespaces]]
pattern = "*"
subscribe = true
history = true
"""


def config_file(extra="", base=CONFIG):
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(base + extra)
    return f.name


class RedisClusterTest(unittest.IsolatedAsyncioTestCase):
    """The tests run in the order of their names: the last two add a shard and kill a primary."""

    @classmethod
    def setUpClass(cls):
        cls.cluster = Cluster()
        cls.config = config_file()
        cls.gateways = []
        try:
            cls.gateways = [cls.gateway(f"gw{i}") for i in range(2)]
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def gateway(cls, name, *args, config=None):
        return GaleServe(f"redis-cluster-{name}", "--config", config or cls.config, "--broker", cls.cluster.url,
                         "--jwt-secret", SECRET, *args, env={"GALE_API_KEY": API_KEY})

    @classmethod
    def tearDownClass(cls):
        for g in cls.gateways:
            g.kill()
            g.proc.stdout.close()
        cls.cluster.stop()
        os.unlink(cls.config)

    async def client(self, gateway, user=None):
        url = gateway.url + "/ws"
        if user is not None:
            url += "?token=" + make_token({"sub": user, "exp": int(time.time()) + 600})
        return await GatewayClient.open(url)

    async def subscribe(self, client, topic, **fields):
        reply = await client.command("subscribe", topic=topic, **fields)
        self.assertTrue(reply.get("ok"), reply)
        return reply

    async def test_a_publish_on_any_gateway_reaches_every_gateway_on_every_shard(self):
        a, b = self.gateways
        topics = topics_on_each_shard(self.cluster, "spread:", 2)
        subs = [await self.client(g) for g in (a, b)]
        for s in subs:
            for t in topics:
                await self.subscribe(s, t)
        for i, t in enumerate(topics):
            status, body = await asyncio.to_thread(publish, (a, b)[i % 2], t, {"i": i})
            self.assertEqual((status, body["seq"]), (200, 1), body)
        for s in subs:
            got = {}
            for _ in topics:
                d = await s.delivery()
                got[d["topic"]] = (d["seq"], d["data"])
            self.assertEqual(got, {t: (1, {"i": i}) for i, t in enumerate(topics)})
        await asyncio.sleep(0.3)
        self.assertEqual([s.deliveries for s in subs], [[], []], "nothing twice")
        # A message crosses only its topic's shard: sharded channels, hash-tagged keys.
        t = topics[0]
        owner = self.cluster.owner(slot_of(t))
        self.assertEqual(owner.cli("EXISTS", f"gale:{{{t}}}:seq", f"gale:{{{t}}}:log", f"gale:{{{t}}}:epoch"), "3")
        self.assertIn(f"gale:{{{t}}}", owner.cli("PUBSUB", "SHARDCHANNELS", "gale:*").split())
        for s in subs:
            await s.close()
        for g in self.gateways:
            status, text = await asyncio.to_thread(http, g, "GET", "/healthz")
            self.assertEqual((status, json.loads(text)["broker"]), (200, "up"), text)

    async def test_a2_a_message_is_forwarded_while_another_shard_confirms_a_subscribe(self):
        a, b = self.gateways
        by_owner = {}
        for t in topics_on_each_shard(self.cluster, "edge:", 2):
            by_owner.setdefault(self.cluster.owner(slot_of(t)).port, []).append(t)
        (x_topic, _), (y_topic, y_other) = list(by_owner.values())[:2]
        y = self.cluster.owner(slot_of(y_topic))
        c = await self.client(a)
        for t in (x_topic, y_other):  # the listener of `a` is connected to both primaries
            await self.subscribe(c, t)
        # Y holds the confirmation of the next subscribe for a moment; meanwhile a message on
        # X arrives at the listener, which is waiting for that confirmation.
        y.cli("CLIENT", "PAUSE", "700", "ALL")

        async def publish_meanwhile():
            await asyncio.sleep(0.2)
            return await asyncio.to_thread(publish, b, x_topic, {"n": 1})

        published = asyncio.create_task(publish_meanwhile())
        await self.subscribe(c, y_topic)
        status, body = await published
        self.assertEqual(status, 200, body)
        # Forwarded without waiting for another message on X.
        d = await asyncio.wait_for(c.delivery(), 3)
        self.assertEqual((d["topic"], d["data"]), (x_topic, {"n": 1}))
        await c.close()

    async def test_b_one_order_and_exactly_once_within_the_history(self):
        a, b = self.gateways
        primaries = [n for n in self.cluster.nodes if n.port in self.cluster.primaries()]
        for n in primaries:
            n.cli("CONFIG", "RESETSTAT")
        topic = "order:x"
        subs = [await self.client(g) for g in (a, b)]
        for s in subs:
            await s.command("subscribe", topic=topic)

        def publisher(g, tag):
            for i in range(40):
                status, _ = publish(g, topic, f"{tag}{i}")
                assert status == 200, status

        threads = [threading.Thread(target=publisher, args=(g, tag)) for g, tag in ((a, "a"), (b, "b"))]
        await asyncio.to_thread(lambda: [t.start() for t in threads] and [t.join() for t in threads])
        orders = []
        for s in subs:
            got = [await s.delivery() for _ in range(80)]
            self.assertEqual([d["seq"] for d in got], list(range(1, 81)))
            orders.append([d["data"] for d in got])
        self.assertEqual(orders[0], orders[1])
        # Scripts are called by their SHA1, not sent whole with every call; a node that no longer
        # holds them (flushed here, as a restarted node or a promoted replica) is given them again.
        stats = [n.info("commandstats") for n in primaries]
        self.assertTrue(any("cmdstat_evalsha" in st for st in stats), stats)
        self.assertFalse(any("cmdstat_eval" in st for st in stats), stats)
        for n in primaries:
            n.cli("SCRIPT", "FLUSH")
        fresh = await self.client(b)
        await self.subscribe(fresh, "order:fresh")
        await fresh.close()
        # An idempotent retry on the other gateway: the first publish's position, nothing sent.
        key = {"Idempotency-Key": "k-1"}
        s1, first = await asyncio.to_thread(publish, a, topic, "once", key)
        s2, again = await asyncio.to_thread(publish, b, topic, "once", key)
        self.assertEqual((s1, s2, first["seq"], again["seq"], again.get("duplicate")), (200, 200, 81, 81, True))
        for s in subs:
            d = await s.delivery()
            self.assertEqual((d["seq"], d["data"]), (81, "once"))
        await asyncio.sleep(0.3)
        self.assertEqual([s.deliveries for s in subs], [[], []])
        page = await asyncio.to_thread(history, b, topic)
        self.assertEqual([m["seq"] for m in page["messages"]], list(range(1, 82)))
        for s in subs:
            await s.close()

    async def test_c_recovery_across_gateways(self):
        a, b = self.gateways
        topic = "move:x"
        c = await self.client(a)
        await c.command("subscribe", topic=topic)
        for i in range(3):
            await asyncio.to_thread(publish, b, topic, i)
        seen = [await c.delivery() for _ in range(3)]
        await c.close()
        for i in range(3, 8):
            await asyncio.to_thread(publish, a, topic, i)
        c = await self.client(b)
        reply = await c.command("subscribe", topic=topic, since={"epoch": seen[-1]["epoch"], "seq": 3})
        self.assertEqual((reply["recovered"], reply["missed"], reply["seq"]), (True, 5, 8), reply)
        missed = [await c.delivery() for _ in range(5)]
        self.assertEqual([(d["seq"], d["data"]) for d in missed], [(i + 1, i) for i in range(3, 8)])
        await c.close()

    async def test_d_max_topics_is_counted_over_the_shards(self):
        # An empty cluster (the topics of the tests before are gone), and gateways that hold 6.
        for port in self.cluster.primaries():
            next(n for n in self.cluster.nodes if n.port == port).cli("FLUSHALL")
        config = config_file("[limits]\nmax_topics = 6\n")
        limited = [self.gateway(f"max-topics-{i}", config=config) for i in range(2)]
        try:
            topics = topics_on_each_shard(self.cluster, "full:", 2)
            for i, t in enumerate(topics):
                status, body = await asyncio.to_thread(publish, limited[i % 2], t, i)
                self.assertEqual(status, 200, body)
            # Counted per slot once a second and summed: past a count, a new topic is refused
            # on every shard and gateway, a known one is not.
            await asyncio.sleep(1.5)
            for i, t in enumerate(topics_on_each_shard(self.cluster, "more:", 1)):
                status, body = await asyncio.to_thread(publish, limited[i % 2], t, 0)
                self.assertEqual(status, 503, body)
                self.assertIn("maximum number of topics", body["error"]["reason"])
            status, body = await asyncio.to_thread(publish, limited[1], topics[0], "again")
            self.assertEqual((status, body["seq"]), (200, 2), body)
            c = await self.client(limited[0])
            reply = await c.command("subscribe", topic="more:new")
            self.assertEqual(reply["error"]["code"], 503, reply)
            await c.close()
            # The channel, subscribed before the room was checked, is not kept.
            owner = self.cluster.owner(slot_of("more:new"))
            deadline = time.monotonic() + TIMEOUT
            while "gale:{more:new}" in owner.cli("PUBSUB", "SHARDCHANNELS", "gale:*").split():
                self.assertLess(time.monotonic(), deadline, "still subscribed to a refused topic")
                await asyncio.sleep(0.05)
        finally:
            for g in limited:
                g.kill()
                g.proc.stdout.close()
            os.unlink(config)

    async def test_e_presence_is_kept_per_topic_and_a_dead_gateways_members_expire(self):
        a, _ = self.gateways
        extra = self.gateway("presence")
        try:
            watcher = await self.client(a)
            await watcher.command("subscribe", topic="room:p")
            ann, bob = await self.client(a, "ann"), await self.client(extra, "bob")
            for c in (ann, bob):
                self.assertTrue((await c.command("subscribe", topic="room:p"))["ok"])
            joins = [await watcher.recv() for _ in range(2)]
            self.assertEqual(sorted((e["op"], e["user"]) for e in joins), [("join", "ann"), ("join", "bob")])
            status, text = await asyncio.to_thread(http, a, "GET", "/api/presence_stats/room:p")
            self.assertEqual(json.loads(text), {"topic": "room:p", "connections": 3, "users": 2}, text)
            # The liveness of each gateway is kept with the topic, in its slot: a gateway that
            # dies without a word has its members leave within presence.ttl (2 s).
            extra.kill()
            killed = time.monotonic()
            leave = await watcher.recv()
            self.assertEqual((leave["op"], leave["user"]), ("leave", "bob"))
            self.assertLess(time.monotonic() - killed, 4.0)
            status, text = await asyncio.to_thread(http, a, "GET", "/api/presence_stats/room:p")
            self.assertEqual(json.loads(text)["users"], 1, text)
            for c in (watcher, ann, bob):
                await c.close()
        finally:
            extra.kill()
            extra.proc.stdout.close()

    async def test_f_ack_replicas_waits_for_replicas(self):
        one = config_file("[cluster]\nack_replicas = 1\nack_timeout_ms = 2000\n")
        two = config_file("[cluster]\nack_replicas = 2\nack_timeout_ms = 200\n")
        acked, unacked = self.gateway("ack-1", config=one), self.gateway("ack-2", config=two)
        try:
            topic = "ack:x"
            status, body = await asyncio.to_thread(publish, acked, topic, "kept")
            self.assertEqual((status, body["seq"]), (200, 1), body)
            owner = self.cluster.owner(slot_of(topic))
            replica = next(n for n in self.cluster.alive()
                           if n.info("replication").get("master_port") == str(owner.port))
            # Acknowledged: the replica has it already.
            self.assertEqual(replica_get(replica, f"gale:{{{topic}}}:seq"), "1")
            # Each primary has one replica: two never acknowledge, and the publish is answered
            # 503 (it was carried out by the primary, and is in the history).
            started = time.monotonic()
            status, body = await asyncio.to_thread(publish, unacked, topic, "unacked")
            self.assertEqual(status, 503, body)
            self.assertIn("NOREPLICAS", body["error"]["reason"])
            self.assertGreaterEqual(time.monotonic() - started, 0.2)
            page = await asyncio.to_thread(history, acked, topic)
            self.assertEqual([m["data"] for m in page["messages"]], ["kept", "unacked"])
        finally:
            for g in (acked, unacked):
                g.kill()
                g.proc.stdout.close()
            os.unlink(one)
            os.unlink(two)

    async def test_g_a_shard_added_while_publishing(self):
        a, b = self.gateways
        source = self.cluster.owner(0)
        first = next(s for s, _, p in self.cluster.slot_map() if p == source.port)
        # Topics in the slots that move: the first 200 of the source's.
        topics, i = [], 0
        while len(topics) < 4:
            if first <= slot_of(f"moved:{i}") < first + 200:
                topics.append(f"moved:{i}")
            i += 1
        subs = [await self.client(g) for g in (a, b)]
        for s in subs:
            for t in topics:
                await self.subscribe(s, t)
        new = [Node(self.cluster.root)]
        self.cluster.nodes += new
        redis_cli_cluster("add-node", new[0].addr, source.addr)
        await asyncio.to_thread(self.cluster.wait_known, 7)
        new.append(Node(self.cluster.root))
        self.cluster.nodes.append(new[1])
        redis_cli_cluster("add-node", new[1].addr, source.addr, "--cluster-slave", "--cluster-master-id",
                          new[0].node_id())
        acked = {t: [] for t in topics}
        codes, reasons = [], set()
        stop = threading.Event()

        def publisher():
            n = 0
            while not stop.is_set():
                t = topics[n % len(topics)]
                status, body = publish((a, b)[n % 2], t, n)
                codes.append(status)
                if status == 200:
                    acked[t].append((body["seq"], n))
                else:
                    reasons.add(body["error"]["reason"])
                n += 1

        thread = threading.Thread(target=publisher)
        thread.start()
        try:
            await asyncio.to_thread(self.cluster.wait_known, 8)
            await asyncio.to_thread(self.cluster.wait_ok)
            await asyncio.to_thread(redis_cli_cluster, "reshard", source.addr, "--cluster-from", source.node_id(),
                                    "--cluster-to", new[0].node_id(), "--cluster-slots", 200, "--cluster-yes")
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
        self.assertTrue(all(self.cluster.owner(slot_of(t)) is new[0] for t in topics), self.cluster.slot_map())
        self.assertEqual(set(codes) - {200, 503}, set(), reasons)
        self.assertGreater(codes.count(200), 20)
        # Every subscriber gets every topic's messages once, in order, without a gap (those
        # published while the slot moved come from the log).
        for s in subs:
            got = {t: [] for t in topics}
            for _ in range(sum(len(v) for v in acked.values())):
                d = await s.delivery()
                got[d["topic"]].append((d["seq"], d["data"]))
            for t in topics:
                self.assertEqual(got[t], acked[t], t)
                self.assertEqual([seq for seq, _ in got[t]], list(range(1, len(got[t]) + 1)))
            await s.close()

    async def test_h_a_primary_killed_mid_stream(self):
        # Publishes through gateways that wait for a replica: an acknowledged publish is on the
        # replica that is promoted.
        # A history that holds every publish of the test, however long the failover takes (the
        # publisher does not pause while it succeeds: a slow failover means thousands).
        config = config_file("[cluster]\nack_replicas = 1\nack_timeout_ms = 1000\n",
                             base=CONFIG.replace("size = 1000\n", "size = 1000000\n"))
        pubs = [self.gateway(f"failover-{i}", config=config) for i in range(2)]
        try:
            await self.failover(pubs)
        finally:
            for g in pubs:
                g.kill()
                g.proc.stdout.close()
            os.unlink(config)

    async def failover(self, pubs):
        a, b = self.gateways
        # Not on the shard of the control channel (every gateway listens there): the gateways
        # that publish have nothing else on the victim but their publishes.
        control = self.cluster.owner(slot_of_key("gale#control"))
        topic = next(t for t in (f"fail:{i}" for i in range(100)) if self.cluster.owner(slot_of(t)) is not control)
        victim = self.cluster.owner(slot_of(topic))
        other = next(t for t in (f"calm:{i}" for i in range(100))
                     if self.cluster.owner(slot_of(t)) is not victim)
        subs = [await self.client(g) for g in (a, b)]
        for s in subs:
            await self.subscribe(s, topic)
        acked, failed, codes, reasons = [], set(), [], set()
        stop = threading.Event()

        def publisher():
            n = 0
            while not stop.is_set():
                status, body = publish(pubs[n % 2], topic, n)
                codes.append(status)
                if status == 200:
                    acked.append((body["seq"], n))
                else:
                    failed.add(n)
                    reasons.add(body["error"]["reason"])
                    time.sleep(0.02)
                n += 1

        thread = threading.Thread(target=publisher)
        thread.start()
        try:
            while len(acked) < 30:
                await asyncio.sleep(0.02)
            before = acked[-1][0]
            epoch = (await asyncio.to_thread(history, a, topic))["epoch"]
            replica = next(n for n in self.cluster.alive()
                           if n.info("replication").get("master_port") == str(victim.port))
            victim.kill()
            killed_at = time.monotonic()
            # Another shard is not held up by the failover.
            status, body = await asyncio.to_thread(publish, a, other, "calm")
            self.assertEqual(status, 200, body)
            # Once its replica is promoted, the old primary comes back as its replica (without
            # persistence, it must not come back before: as a primary it would have no data), and
            # the gateways can be acknowledged by a replica again. Meanwhile a gateway's health
            # says what its publishes to that shard meet: degraded, as with one primary down.
            health = set()
            while not replica.role().startswith("master"):
                self.assertLess(time.monotonic() - killed_at, 30, "the replica was not promoted")
                status, text = await asyncio.to_thread(http, pubs[0], "GET", "/healthz")
                health.add((status, json.loads(text)["status"], json.loads(text)["broker"]))
                await asyncio.sleep(0.05)
            self.assertIn((503, "degraded", "down"), health, "a primary is down")
            await asyncio.to_thread(victim.start)
            # Publishing resumes on the promoted replica.
            count = len(acked)
            while len(acked) < count + 30:
                self.assertLess(time.monotonic() - killed_at, 30, f"publishes did not resume: {reasons}")
                await asyncio.sleep(0.05)
            # And healthy again once every slot has a primary that answers.
            while True:
                status, text = await asyncio.to_thread(http, pubs[0], "GET", "/healthz")
                if status == 200:
                    break
                self.assertLess(time.monotonic() - killed_at, 30, f"not healthy again: {text}")
                await asyncio.sleep(0.1)
            self.assertEqual(json.loads(text)["broker"], "up", text)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
        self.assertEqual(set(codes) - {200, 503}, set(), "only 503 while the primary is away")
        page = await asyncio.to_thread(history, b, topic, 10.0)
        held = {m["seq"]: m["data"] for m in page["messages"]}
        while held and max(held) < page["seq"]:  # the rest, a page at a time
            more = await asyncio.to_thread(history, b, topic, 0.0, max(held))
            self.assertTrue(more["messages"], more)
            held.update((m["seq"], m["data"]) for m in more["messages"])
        self.assertEqual(page["epoch"], epoch, "the promoted replica keeps the topic's epoch")
        # No acknowledged publish lost: each is in the promoted replica's history, at its place.
        # (The failure message says what the page held, to tell a lost entry from a short page.)
        shape = {k: page.get(k) for k in ("epoch", "seq", "first_seq")}
        for seq, n in acked:
            self.assertEqual(held.get(seq), n, f"acknowledged publish {n} at {seq}; the page: {shape}, "
                             f"{len(held)} messages from {min(held, default=None)} to {max(held, default=None)}")
        self.assertEqual(sorted(held), list(range(1, page["seq"] + 1)))
        # Live subscribers resume: in order, and what they got is what Redis holds (but a
        # publish answered 503 that the old primary delivered and did not replicate).
        last = acked[-1][0]
        for s in subs:
            got = []
            while not got or got[-1]["seq"] < last:
                got.append(await s.delivery())
            seqs = [d["seq"] for d in got]
            self.assertEqual(seqs, sorted(set(seqs)))
            self.assertGreater(seqs[-1], before)
            for d in got:
                self.assertTrue(held.get(d["seq"]) == d["data"] or d["data"] in failed, d)
            await s.close()
        # Recovery from before the failover, on either gateway: exactly what the promoted
        # replica holds after that position.
        for g in (a, b):
            c = await self.client(g)
            reply = await c.command("subscribe", topic=topic, since={"epoch": epoch, "seq": before})
            self.assertEqual((reply["recovered"], reply["seq"]), (True, page["seq"]), reply)
            missed = [await c.delivery() for _ in range(reply["missed"])]
            self.assertEqual([(d["seq"], d["data"]) for d in missed],
                             [(s, held[s]) for s in range(before + 1, page["seq"] + 1)])
            await c.close()


def replica_get(replica, key):
    """GET on a replica (READONLY for the connection, as redis-cli makes one per call)."""
    done = subprocess.run(["redis-cli", "-p", str(replica.port)], input=f"READONLY\nGET {key}\n",
                          capture_output=True, text=True, timeout=TIMEOUT, check=True)
    return done.stdout.split()[-1]


if __name__ == "__main__":
    unittest.main(verbosity=2)
