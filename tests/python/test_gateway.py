"""`gale serve` (the push gateway) seen by the Python `websockets` client and plain HTTP.

Covers the JSON protocol (subscribe, unsubscribe, publish, ping, every error), the HTTP
publish API and its API key, 1 MB publishes to a subscriber that pings meanwhile, topic
info, /healthz and /metrics, JWT connection tokens (valid, expired, forged), the origin
allowlist, anonymous namespaces, the client publish
rate limit, ordering of concurrent publishes, recovery (a subscriber whose connection
dies mid-stream reconnects with `since` and gets exactly what it missed), and history reads
(the HTTP API and the `history` command: pages, limits, truncation, who may read, and a page
read then a subscribe with `since` from it missing nothing while a publisher goes on), and the
server-side control API (disconnect, unsubscribe and subscribe a user's connections).

Run: python3 tests/python/test_gateway.py   (GALE_BIN overrides target/debug/gale)
"""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import threading
import time
import unittest
import urllib.error
import urllib.request

from websockets.exceptions import ConnectionClosed, InvalidStatus

from gale_process import GaleServe
from gateway_client import GatewayClient

TIMEOUT = 30.0
API_KEY = "test-key-123"
SECRET = "jwt-secret-for-tests"

server: GaleServe


def setUpModule():
    global server
    server = GaleServe("gateway", "--jwt-secret", SECRET, env={"GALE_API_KEY": API_KEY})


def tearDownModule():
    server.stop()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_token(claims: dict, secret: str = SECRET) -> str:
    """An HS256 JWT, built with the standard library."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


def http(method, path, body=None, key=API_KEY, content_type=None, base=None):
    """(status, body text) of an HTTP request to the gateway."""
    req = urllib.request.Request((base or server.http_url) + path, data=body, method=method)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def publish(topic, data, content_type="application/json"):
    body = json.dumps(data).encode() if content_type == "application/json" else data
    status, text = http("POST", f"/api/publish/{topic}", body, content_type=content_type)
    assert status == 200, (status, text)
    return json.loads(text)


class Client(GatewayClient):
    """A client of the server under test."""

    @classmethod
    async def open(cls, query="", **kwargs):
        return await super().open(server.url + "/ws" + query, **kwargs)


class AsyncTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        self.clients = []

    async def client(self, query="", **kwargs):
        c = await Client.open(query, **kwargs)
        self.clients.append(c)
        return c

    async def asyncTearDown(self):
        for c in self.clients:
            await c.close()


class ProtocolTest(AsyncTest):
    async def test_subscribe_and_receive_http_publishes_of_every_kind(self):
        c = await self.client()
        reply = await c.command("subscribe", topic="chat:kinds")
        self.assertTrue(reply["ok"])
        self.assertEqual(reply["seq"], 0)
        epoch = reply["epoch"]
        r = await asyncio.to_thread(publish, "chat:kinds", {"text": "弹幕 🚀", "n": 1})
        self.assertEqual((r["seq"], r["epoch"], r["subscribers"]), (1, epoch, 1))
        d = await c.delivery()
        self.assertEqual(d, {"topic": "chat:kinds", "epoch": epoch, "seq": 1, "data": {"text": "弹幕 🚀", "n": 1}})
        await asyncio.to_thread(publish, "chat:kinds", "plain text".encode(), "text/plain")
        self.assertEqual((await c.delivery())["data"], "plain text")
        await asyncio.to_thread(publish, "chat:kinds", bytes([0, 1, 254, 255]), "application/octet-stream")
        d = await c.delivery()
        self.assertEqual(base64.b64decode(d["binary"]), bytes([0, 1, 254, 255]))
        self.assertEqual(d["seq"], 3)

    async def test_clients_publish_to_each_other(self):
        a = await self.client()
        b = await self.client()
        for c in (a, b):
            self.assertTrue((await c.command("subscribe", topic="chat:pair"))["ok"])
        r = await a.command("publish", topic="chat:pair", data={"text": "hi"})
        self.assertTrue(r["ok"])
        self.assertEqual(r["seq"], 1)
        for c in (a, b):
            d = await c.delivery()
            self.assertEqual((d["seq"], d["data"]), (1, {"text": "hi"}))

    async def test_unsubscribe_and_errors(self):
        c = await self.client()
        self.assertTrue((await c.command("ping"))["ok"])
        self.assertTrue((await c.command("subscribe", topic="chat:u"))["ok"])
        self.assertEqual((await c.command("subscribe", topic="chat:u"))["error"]["code"], 409)
        self.assertTrue((await c.command("unsubscribe", topic="chat:u"))["ok"])
        self.assertEqual((await c.command("unsubscribe", topic="chat:u"))["error"]["code"], 404)
        await asyncio.to_thread(publish, "chat:u", {"x": 1})
        cases = [
            ({"op": "subscribe"}, 400),
            ({"op": "subscribe", "topic": "bad topic"}, 400),
            ({"op": "subscribe", "topic": "x" * 300}, 400),
            ({"op": "fly"}, 400),
            ({"op": "publish", "topic": "chat:u"}, 400),
            ({"op": "subscribe", "topic": "private:1"}, 403),
            ({"op": "publish", "topic": "news:today", "data": 1}, 403),
        ]
        for fields, code in cases:
            reply = await c.command(**fields)
            self.assertEqual(reply["error"]["code"], code, (fields, reply))
            self.assertTrue(reply["error"]["reason"])
        # Not JSON, not an object, binary: an error without an id, and the connection lives on.
        for bad in ["{nope", "[1,2]", b"\x00\x01"]:
            await c.ws.send(bad)
            self.assertEqual((await c.recv())["error"]["code"], 400)
        self.assertTrue((await c.command("ping"))["ok"])
        # The unsubscribed topic's message never arrived.
        self.assertEqual(c.deliveries, [])

    async def test_client_publishes_are_rate_limited(self):
        c = await self.client()
        codes = []
        for i in range(40):
            r = await c.command("publish", topic="chat:flood", data=i)
            codes.append(200 if r.get("ok") else r["error"]["code"])
        self.assertIn(429, codes)
        self.assertGreaterEqual(codes.count(200), 20, "the burst of 20 goes through")

    async def test_subscribe_commands_are_rate_limited(self):
        c = await self.client()
        codes = []
        # 200 subscribes, well past the burst of 100 plus 20 per second of refill.
        for i in range(400):
            r = await c.command("subscribe" if i % 2 == 0 else "unsubscribe", topic="chat:churn")
            codes.append(200 if r.get("ok") else r["error"]["code"])
        self.assertIn(429, codes)

    async def test_concurrent_publishers_are_delivered_in_sequence_order(self):
        subs = [await self.client() for _ in range(6)]
        for s in subs:
            await s.command("subscribe", topic="chat:race")

        def publisher(tag):
            for i in range(100):
                publish("chat:race", {"from": tag, "i": i})

        threads = [threading.Thread(target=publisher, args=(t,)) for t in range(3)]
        await asyncio.to_thread(lambda: [t.start() for t in threads] and [t.join() for t in threads])
        for s in subs:
            seqs = [(await s.delivery())["seq"] for _ in range(300)]
            self.assertEqual(seqs, list(range(1, 301)))


class LargeDeliveryTest(AsyncTest):
    async def test_a_subscriber_that_reads_promptly_and_pings_gets_every_large_publish(self):
        # HTTP publishes of 1 MB, 1.33 MiB in base64 once delivered, each sent once the
        # subscriber has received the one before the previous: the subscriber keeps up, so at
        # most two deliveries are ever held for it, and it pings all the while. Neither a pong
        # waiting in the server nor the previous delivery still on its way may cost it a
        # delivery (with "close", the default, its connection).
        # Without compression, so that each delivery is its full 1.33 MiB on the wire.
        c = await self.client(compression=None)
        self.assertTrue((await c.command("subscribe", topic="chat:large"))["ok"])
        count = 30
        bodies = [os.urandom(1_000_000) for _ in range(count)]
        window = threading.Semaphore(2)
        stop = asyncio.Event()

        async def pinger():
            while not stop.is_set():
                await c.ws.ping()
                await asyncio.sleep(0.002)

        def publisher():
            for body in bodies:
                if not window.acquire(timeout=TIMEOUT):
                    return
                publish("chat:large", body, "application/octet-stream")

        pings = asyncio.create_task(pinger())
        publishes = asyncio.create_task(asyncio.to_thread(publisher))
        try:
            for seq in range(1, count + 1):
                d = await c.delivery()
                window.release()
                self.assertEqual(d["seq"], seq)
                self.assertTrue(base64.b64decode(d["binary"]) == bodies[seq - 1], f"delivery {seq} differs")
            await publishes
        finally:
            stop.set()
            window.release(count)
            await asyncio.gather(pings, return_exceptions=True)
        self.assertTrue((await c.command("ping"))["ok"])


class AuthTest(AsyncTest):
    async def test_tokens_grant_topics_and_bad_tokens_are_refused(self):
        exp = int(time.time()) + 60
        token = make_token({"sub": "ann", "exp": exp, "subscribe": ["private:ann"], "publish": ["news:*"]})
        c = await self.client(f"?token={token}")
        self.assertTrue((await c.command("subscribe", topic="private:ann"))["ok"])
        self.assertEqual((await c.command("subscribe", topic="private:bob"))["error"]["code"], 403)
        self.assertTrue((await c.command("publish", topic="news:today", data="x"))["ok"])
        for bad, reason in [
            (make_token({"sub": "ann", "exp": int(time.time()) - 5}), "expired"),
            (make_token({"sub": "ann", "exp": exp}, secret="wrong"), "signature"),
            ("not.a.token", "malformed"),
        ]:
            with self.assertRaises(InvalidStatus) as caught:
                await Client.open(f"?token={bad}")
            response = caught.exception.response
            self.assertEqual(response.status_code, 401)
            self.assertIn(reason, response.body.decode())

    async def test_a_connection_ends_when_its_token_expires(self):
        token = make_token({"sub": "eve", "exp": int(time.time()) + 2, "subscribe": ["private:eve"]})
        c = await self.client(f"?token={token}")
        self.assertTrue((await c.command("subscribe", topic="private:eve"))["ok"])
        await asyncio.sleep(3)
        await c.ws.send(json.dumps({"op": "ping"}))
        with self.assertRaises(ConnectionClosed):
            await c.recv()
        self.assertEqual(c.ws.close_code, 4001)
        self.assertEqual(c.ws.close_reason, "token expired")

    async def test_origins_outside_the_allowlist_are_refused(self):
        with self.assertRaises(InvalidStatus) as caught:
            await Client.open(origin="http://evil.example")
        self.assertEqual(caught.exception.response.status_code, 403)
        # The gateway's own origin is allowed.
        c = await self.client(origin=f"http://127.0.0.1:{server.port}")
        self.assertTrue((await c.command("ping"))["ok"])


class RecoveryTest(AsyncTest):
    async def test_a_subscriber_that_loses_its_connection_misses_nothing(self):
        topic = "chat:recover"
        total = 400
        done = threading.Event()

        def publisher():
            for i in range(total):
                publish(topic, {"i": i})
                time.sleep(0.002)
            done.set()

        c = await Client.open()
        first = await c.command("subscribe", topic=topic)
        position = {"epoch": first["epoch"], "seq": first["seq"]}
        seen = []
        task = asyncio.get_running_loop().run_in_executor(None, publisher)
        drops = 0
        while len(seen) < total:
            d = await c.delivery()
            self.assertEqual(d["seq"], position["seq"] + 1, "no gap, no duplicate, in order")
            position["seq"] = d["seq"]
            seen.append(d["data"]["i"])
            if len(seen) in (50, 150, 300):
                # Kill the connection mid-stream (no close handshake), stay away a moment,
                # then come back with the last position.
                c.ws.transport.abort()
                drops += 1
                await asyncio.sleep(0.1)
                c = await Client.open()
                reply = await c.command("subscribe", topic=topic, since=position)
                self.assertTrue(reply["recovered"], reply)
        await task
        self.assertTrue(done.is_set())
        self.assertEqual(seen, list(range(total)))
        self.assertEqual(drops, 3)
        await c.close()
        status, text = await asyncio.to_thread(http, "GET", "/metrics")
        self.assertIn('gale_recoveries_total{result="recovered"}', text)

    async def test_recovery_is_refused_when_impossible(self):
        topic = "chat:gap"
        for i in range(105):
            await asyncio.to_thread(publish, topic, i)
        c = await self.client()
        reply = await c.command("subscribe", topic=topic, since={"epoch": "0000", "seq": 3})
        self.assertIs(reply["recovered"], False)
        self.assertIn("epoch", reply["reason"])
        epoch = reply["epoch"]
        await c.command("unsubscribe", topic=topic)
        reply = await c.command("subscribe", topic=topic, since={"epoch": epoch, "seq": 1})
        self.assertIs(reply["recovered"], False)
        self.assertIn("history", reply["reason"])
        await c.command("unsubscribe", topic=topic)
        reply = await c.command("subscribe", topic=topic, since={"epoch": epoch, "seq": 100})
        self.assertIs(reply["recovered"], True)
        self.assertEqual(reply["missed"], 5)
        self.assertEqual([(await c.delivery())["data"] for _ in range(5)], [100, 101, 102, 103, 104])


HISTORY_CONFIG = """
[limits]
client_history_rate = 0.5
client_history_burst = 3

[history]
size = 50
default_limit = 10
max_limit = 20

[[namespaces]]
pattern = "chat:*"
subscribe = true
publish = true

[[namespaces]]
pattern = "feed:*"
subscribe = true
history = false
"""


class HistoryTest(AsyncTest):
    """The history read API and command, on a gateway of its own: a history of 50 messages,
    reads of 10 by default and 20 at most, bursts of 3 history commands, and a namespace whose
    history is off."""

    @classmethod
    def setUpClass(cls):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(HISTORY_CONFIG)
        cls.config = f.name
        cls.server = GaleServe("gateway-history", "--config", f.name, "--jwt-secret", SECRET,
                               env={"GALE_API_KEY": API_KEY})

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        os.unlink(cls.config)

    def get(self, path, key=API_KEY):
        status, text = http("GET", path, key=key, base=self.server.http_url)
        return status, json.loads(text)

    def publish(self, topic, values):
        """Publish each of `values` over one keep-alive connection; their positions."""
        import http.client

        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=TIMEOUT)
        out = []
        for v in values:
            conn.request("POST", f"/api/publish/{topic}", body=json.dumps(v).encode(),
                         headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
            r = conn.getresponse()
            out.append(json.loads(r.read()))
            assert r.status == 200, out[-1]
        conn.close()
        return out

    async def open(self, query=""):
        c = await GatewayClient.open(self.server.url + "/ws" + query)
        self.clients.append(c)
        return c

    def test_the_http_api_reads_pages_of_the_retained_messages(self):
        self.assertEqual(self.get("/api/history/chat:h", key=None)[0], 401)
        self.assertEqual(self.get("/api/history/chat:h", key="wrong")[0], 401)
        for query, named in [("limit=0", "limit"), ("limit=21", "limit"), ("since_seq=x", "since_seq"),
                             ("since_seq=-1", "since_seq"), ("sinceseq=1", "sinceseq")]:
            status, body = self.get(f"/api/history/chat:h?{query}")
            self.assertEqual((status, body["error"]["code"]), (400, 400), query)
            self.assertIn(named, body["error"]["reason"], query)
        self.assertEqual(self.get("/api/history/bad%20topic")[0], 400)
        # A topic without state: no epoch, nothing retained, nothing dropped.
        status, body = self.get("/api/history/chat:h")
        self.assertEqual((status, body["epoch"], body["seq"], body["messages"]), (200, None, 0, []))
        self.assertEqual((body["first_seq"], body["truncated"], body["more"]), (None, False, False))
        epoch = self.publish("chat:h", range(1, 61))[0]["epoch"]
        # A topic with state (a subscriber made it) but no message: no epoch either, since such a
        # topic may be forgotten and start again in another epoch without anything missed.
        import websockets.sync.client as sync_client

        with sync_client.connect(self.server.url + "/ws") as ws:
            ws.send(json.dumps({"op": "subscribe", "topic": "chat:quiet"}))
            self.assertTrue(json.loads(ws.recv(timeout=TIMEOUT))["ok"])
            status, body = self.get("/api/history/chat:quiet")
            self.assertEqual((status, body["epoch"], body["seq"]), (200, None, 0))
        # 60 published, the newest 50 retained: by default the oldest 10 of them.
        status, body = self.get("/api/history/chat%3Ah")
        self.assertEqual((status, body["topic"], body["epoch"], body["seq"]), (200, "chat:h", epoch, 60))
        self.assertEqual((body["first_seq"], body["truncated"], body["more"]), (11, True, True))
        self.assertEqual([m["seq"] for m in body["messages"]], list(range(11, 21)))
        self.assertEqual(body["messages"][0], {"topic": "chat:h", "epoch": epoch, "seq": 11, "data": 11})
        # A page after since_seq, within the history: nothing dropped before it.
        _, body = self.get("/api/history/chat:h?since_seq=30&limit=20")
        self.assertEqual([m["data"] for m in body["messages"]], list(range(31, 51)))
        self.assertEqual((body["truncated"], body["more"]), (False, True))
        _, body = self.get("/api/history/chat:h?limit=5&since_seq=57")
        self.assertEqual([m["seq"] for m in body["messages"]], [58, 59, 60])
        self.assertEqual((body["truncated"], body["more"]), (False, False))
        _, body = self.get("/api/history/chat:h?since_seq=60")
        self.assertEqual((body["messages"], body["truncated"], body["more"], body["seq"]), ([], False, False, 60))
        _, body = self.get("/api/history/chat:h?since_seq=5")
        self.assertTrue(body["truncated"])
        status, text = http("GET", "/metrics", base=self.server.http_url)
        self.assertRegex(text, r'gale_history_reads_total\{source="http"\} (\d{2}|[5-9])')

    async def test_the_history_command_is_allowed_where_subscribing_and_the_namespace_allow_it(self):
        self.publish("chat:cmd", ["a", "b", "c"])
        self.publish("feed:x", ["a"])
        c = await self.open()
        reply = await c.command("history", topic="chat:cmd", since_seq=1, limit=5)
        self.assertEqual((reply["ok"], reply["op"], reply["topic"], reply["seq"]), (True, "history", "chat:cmd", 3))
        self.assertEqual([m["data"] for m in reply["messages"]], ["b", "c"])
        self.assertEqual((reply["truncated"], reply["more"]), (False, False))
        # The namespace with history off: subscribing works, reading the history does not.
        reply = await c.command("history", topic="feed:x")
        self.assertEqual(reply["error"]["code"], 403, reply)
        self.assertEqual(reply["id"], c.next_id - 1)
        self.assertTrue((await c.command("subscribe", topic="feed:x"))["ok"])
        # A topic no namespace lets it subscribe to.
        self.assertEqual((await c.command("history", topic="private:ann"))["error"]["code"], 403)
        for bad in [{"limit": 0}, {"limit": 21}, {"since_seq": -1}, {"limit": "x"}]:
            reply = await c.command("history", topic="chat:cmd", **bad)
            self.assertEqual(reply["error"]["code"], 400, bad)
        self.assertIn("limit", (await c.command("history", topic="chat:cmd", limit=21))["error"]["reason"])
        self.assertEqual((await c.command("history"))["error"]["code"], 400)
        # A token's subscribe patterns let it read the history of those topics, not of others.
        self.publish("private:ann", ["secret"])
        token = make_token({"sub": "ann", "exp": int(time.time()) + 60, "subscribe": ["private:ann"]})
        t = await self.open(f"?token={token}")
        reply = await t.command("history", topic="private:ann")
        self.assertEqual([m["data"] for m in reply["messages"]], ["secret"])
        self.assertEqual((await t.command("history", topic="private:bob"))["error"]["code"], 403)
        # Past the burst of history commands: 429.
        r = await self.open()
        codes = [(await r.command("history", topic="chat:cmd")).get("error", {}).get("code") for _ in range(4)]
        self.assertEqual(codes, [None, None, None, 429])
        status, text = await asyncio.to_thread(http, "GET", "/metrics", base=self.server.http_url)
        self.assertRegex(text, r'gale_history_reads_total\{source="client"\} [2-9]')

    async def test_history_then_subscribe_with_since_misses_nothing_and_repeats_nothing(self):
        topic, total = "chat:flow", 300
        subscribed = []

        async def read_then_subscribe(c):
            """Render a page, then subscribe from its last message; what was rendered."""
            page = await c.command("history", topic=topic)
            last = page["messages"][-1]["seq"] if page["messages"] else page["seq"]
            reply = await c.command("subscribe", topic=topic, since={"epoch": page["epoch"], "seq": last})
            self.assertTrue(reply["recovered"], (page, reply))
            subscribed.append((c, page))

        # Before the topic has state the page has no epoch; `since` with a null epoch then
        # recovers whatever the topic's first epoch holds.
        first = await self.open()
        page = await first.command("history", topic=topic)
        self.assertEqual((page["epoch"], page["seq"], page["messages"]), (None, 0, []))
        await asyncio.to_thread(self.publish, topic, [0, 1, 2])
        reply = await first.command("subscribe", topic=topic, since={"epoch": None, "seq": 0})
        self.assertEqual((reply["recovered"], reply["missed"]), (True, 3), reply)
        subscribed.append((first, page))

        def publisher():
            for i in range(3, total):
                self.publish(topic, [i])
                time.sleep(0.002)

        task = asyncio.get_running_loop().run_in_executor(None, publisher)
        # More readers while the publisher goes on.
        for pause in (0.1, 0.2, 0.2):
            await asyncio.sleep(pause)
            await read_then_subscribe(await self.open())
        await task
        self.assertEqual(len(subscribed), 4)
        for c, page in subscribed:
            seen = [m["data"] for m in page["messages"]]
            while not seen or seen[-1] != total - 1:
                seen.append((await c.delivery())["data"])
            self.assertEqual(seen, list(range(seen[0], total)), "no gap, no duplicate, in order")
            self.assertEqual(seen[0], page["messages"][0]["data"] if page["messages"] else 0)
        # The later pages were read mid-stream, past the start of the history.
        self.assertGreater(subscribed[-1][1]["seq"], 10)


def post(path, data, headers=None):
    """(status, headers, JSON body) of a POST of `data` as JSON with the API key."""
    req = urllib.request.Request(server.http_url + path, data=json.dumps(data).encode(), method="POST")
    req.add_header("Authorization", f"Bearer {API_KEY}")
    req.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def metric(name):
    """The value of one line of /metrics (a name with its labels)."""
    _, text = http("GET", "/metrics", key=None)
    return int(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


class PublishOptionsTest(AsyncTest):
    """Idempotent publishes, exclude_self, batches, message time to live, token refresh."""

    async def test_a_retried_publish_with_its_idempotency_key_is_answered_not_delivered_again(self):
        c = await self.client()
        self.assertTrue((await c.command("subscribe", topic="chat:idem"))["ok"])
        replays = await asyncio.to_thread(metric, "gale_idempotent_replays_total")
        key = {"Idempotency-Key": "order-7f3a"}
        status, headers, first = await asyncio.to_thread(post, "/api/publish/chat:idem", {"n": 1}, key)
        self.assertEqual((status, first["seq"]), (200, 1), first)
        self.assertNotIn("duplicate", first)
        status, headers, again = await asyncio.to_thread(post, "/api/publish/chat:idem", {"n": 1}, key)
        self.assertEqual((status, again["seq"], again["epoch"], again["duplicate"]), (200, 1, first["epoch"], True))
        self.assertEqual(headers["Idempotent-Replayed"], "true")
        # A client publish with a key of its own, retried.
        r1 = await c.command("publish", topic="chat:idem", data={"n": 2}, idempotency_key="c-1")
        r2 = await c.command("publish", topic="chat:idem", data={"n": 2}, idempotency_key="c-1")
        self.assertEqual((r1["seq"], r2["seq"], r2["duplicate"]), (2, 2, True))
        self.assertNotIn("duplicate", r1)
        self.assertEqual([(d["seq"], d["data"]) for d in [await c.delivery(), await c.delivery()]],
                         [(1, {"n": 1}), (2, {"n": 2})])
        await c.command("ping")
        self.assertEqual(c.deliveries, [], "nothing delivered twice")
        self.assertEqual(await asyncio.to_thread(metric, "gale_idempotent_replays_total"), replays + 2)
        # Bad keys: 400 naming the problem; nothing is published.
        for bad, named in [("a b", "' '"), ("k" * 129, "1 to 128")]:
            status, _, body = await asyncio.to_thread(post, "/api/publish/chat:idem", 1, {"Idempotency-Key": bad})
            self.assertEqual(status, 400)
            self.assertIn("idempotency key", body["error"]["reason"])
            self.assertIn(named, body["error"]["reason"])
        reply = await c.command("publish", topic="chat:idem", data=1, idempotency_key="")
        self.assertEqual(reply["error"]["code"], 400)
        status, _, body = await asyncio.to_thread(post, "/api/publish/chat:idem?ttl=x", 1)
        self.assertEqual(status, 400)
        self.assertIn("ttl", body["error"]["reason"])
        self.assertEqual(json.loads((await asyncio.to_thread(http, "GET", "/api/topics/chat:idem"))[1])["seq"], 2)

    async def test_exclude_self_leaves_out_the_publisher_only(self):
        a = await self.client()
        b = await self.client()
        for c in (a, b):
            self.assertTrue((await c.command("subscribe", topic="chat:self"))["ok"])
        r = await a.command("publish", topic="chat:self", data="mine", exclude_self=True)
        self.assertEqual(r["seq"], 1)
        self.assertEqual((await b.delivery())["data"], "mine")
        await a.command("publish", topic="chat:self", data="echoed")
        # The first delivery `a` gets is its second publish: the first went to everyone else.
        self.assertEqual(((await a.delivery())["seq"]), 2)
        self.assertEqual((await b.delivery())["seq"], 2)
        # The message is in the history all the same.
        status, text = await asyncio.to_thread(http, "GET", "/api/history/chat:self")
        self.assertEqual([m["data"] for m in json.loads(text)["messages"]], ["mine", "echoed"])

    async def test_a_batch_publishes_each_item_and_answers_each_in_order(self):
        c = await self.client()
        for t in ("chat:b1", "chat:b2"):
            self.assertTrue((await c.command("subscribe", topic=t))["ok"])
        items = [
            {"topic": "chat:b1", "data": {"i": 0}},
            {"topic": "bad topic", "data": 1},
            {"topic": "chat:b2", "data": {"i": 2}, "idempotency_key": "b-2"},
            {"topic": "chat:b2", "data": {"i": 2}, "idempotency_key": "b-2"},
            {"topic": "chat:b1", "data": {"i": 4}, "ttl": 0},
        ]
        before = await asyncio.to_thread(metric, "gale_batch_items_total")
        status, _, body = await asyncio.to_thread(post, "/api/publish_batch", items)
        self.assertEqual(status, 200, body)
        results = body["results"]
        self.assertEqual([r["topic"] for r in results], [i["topic"] for i in items])
        self.assertEqual((results[0]["seq"], results[2]["seq"], results[3]["seq"]), (1, 1, 1))
        self.assertEqual((results[3]["duplicate"], results[1]["error"]["code"]), (True, 400))
        self.assertIn("ttl", results[4]["error"]["reason"])
        got = sorted((d["topic"], d["data"]["i"]) for d in [await c.delivery(), await c.delivery()])
        self.assertEqual(got, [("chat:b1", 0), ("chat:b2", 2)])
        await c.command("ping")
        self.assertEqual(c.deliveries, [])
        self.assertEqual(await asyncio.to_thread(metric, "gale_batch_items_total"), before + 5)
        for bad, says in [([], "1 to 100"), ([{"topic": "chat:b1", "data": 1}] * 101, "1 to 100"),
                          ({"topic": "chat:b1"}, "body must be"), ([{"topic": "chat:b1"}], "data")]:
            status, _, body = await asyncio.to_thread(post, "/api/publish_batch", bad)
            self.assertEqual(status, 400)
            self.assertIn(says, body["error"]["reason"])
        # A broadcast cannot be made idempotent: refused rather than the key ignored.
        status, _, body = await asyncio.to_thread(post, "/api/broadcast", {"topics": ["chat:b1"], "data": 1},
                                                  {"Idempotency-Key": "k"})
        self.assertEqual(status, 400)
        self.assertIn("publish_batch", body["error"]["reason"])

    async def test_an_expired_message_is_neither_replayed_nor_read(self):
        topic = "chat:ttl"
        first = await asyncio.to_thread(publish, topic, "kept")
        status, _, short = await asyncio.to_thread(post, f"/api/publish/{topic}?ttl=1", "brief")
        self.assertEqual(status, 200, short)
        c = await self.client()
        last = await c.command("publish", topic=topic, data="after", ttl=60)
        self.assertEqual(last["seq"], 3)
        page = json.loads((await asyncio.to_thread(http, "GET", f"/api/history/{topic}"))[1])
        self.assertEqual([m["data"] for m in page["messages"]], ["kept", "brief", "after"])
        await asyncio.sleep(1.2)
        page = json.loads((await asyncio.to_thread(http, "GET", f"/api/history/{topic}"))[1])
        self.assertEqual([m["data"] for m in page["messages"]], ["after"])
        self.assertEqual((page["first_seq"], page["truncated"]), (3, True))
        since = {"epoch": first["epoch"], "seq": 1}
        reply = await c.command("subscribe", topic=topic, since=since)
        self.assertIs(reply["recovered"], False)
        self.assertIn("history", reply["reason"])
        await c.command("unsubscribe", topic=topic)
        reply = await c.command("subscribe", topic=topic, since={**since, "seq": 2})
        self.assertEqual((reply["recovered"], reply["missed"]), (True, 1))
        self.assertEqual((await c.delivery())["data"], "after")

    async def test_refresh_replaces_the_token_of_the_same_user(self):
        exp = int(time.time()) + 2
        c = await self.client(f"?token={make_token({'sub': 'rae', 'exp': exp, 'subscribe': ['private:rae']})}")
        self.assertEqual((await c.command("subscribe", topic="private:rae2"))["error"]["code"], 403)
        refused = await asyncio.to_thread(metric, 'gale_token_refreshes_total{result="refused"}')
        for token, code in [(make_token({"sub": "bob", "exp": exp + 60}), 403),
                            (make_token({"sub": "rae", "exp": exp + 60}, secret="wrong"), 401),
                            (make_token({"sub": "rae", "exp": int(time.time()) - 5}), 401)]:
            reply = await c.command("refresh", token=token)
            self.assertEqual(reply["error"]["code"], code, reply)
        self.assertEqual((await c.command("refresh"))["error"]["code"], 400)
        new = make_token({"sub": "rae", "exp": exp + 60, "subscribe": ["private:rae2"]})
        reply = await c.command("refresh", token=new)
        self.assertEqual((reply["ok"], reply["expires"]), (True, exp + 60))
        # The new scopes replace the old ones for later commands.
        self.assertTrue((await c.command("subscribe", topic="private:rae2"))["ok"])
        self.assertEqual((await c.command("subscribe", topic="private:rae"))["error"]["code"], 403)
        # Past the first token's expiry the connection lives on.
        await asyncio.sleep(max(0.0, exp - time.time()) + 0.3)
        self.assertTrue((await c.command("ping"))["ok"])
        anonymous = await self.client()
        self.assertEqual((await anonymous.command("refresh", token=new))["error"]["code"], 403)
        self.assertEqual(await asyncio.to_thread(metric, 'gale_token_refreshes_total{result="refused"}'), refused + 5)
        self.assertGreaterEqual(await asyncio.to_thread(metric, 'gale_token_refreshes_total{result="ok"}'), 1)



class ControlTest(AsyncTest):
    """The server-side control API: disconnect a user, unsubscribe and subscribe its connections."""

    async def user(self, sub):
        return await self.client(f"?token={make_token({'sub': sub, 'exp': int(time.time()) + 600})}")

    @staticmethod
    async def counter(name):
        """A counter of /metrics, or None when it is missing."""
        _, text = await asyncio.to_thread(http, "GET", "/metrics", None, None)
        found = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
        return int(found[0]) if found else None

    async def closed(self, c):
        """The close code and reason the gateway ended `c` with."""
        with self.assertRaises(ConnectionClosed):
            while True:
                await c.recv()
        return c.ws.close_code, c.ws.close_reason

    async def test_disconnect_closes_every_connection_of_the_user_only(self):
        ann1, ann2, bob = await self.user("dora"), await self.user("dora"), await self.user("dan")
        self.assertTrue((await ann1.command("ping"))["ok"])
        before = await self.counter("gale_server_disconnects_total")
        self.assertIsNotNone(before)
        status, _, body = await asyncio.to_thread(post, "/api/disconnect", {"user": "dora", "reason": "banned"})
        self.assertEqual((status, body), (200, {"user": "dora", "connections": 2}))
        for c in (ann1, ann2):
            self.assertEqual(await self.closed(c), (4403, "banned"))
        self.assertTrue((await bob.command("ping"))["ok"])
        self.assertEqual(await self.counter("gale_server_disconnects_total"), before + 2)
        # Nobody left to close; a reconnecting close code and the default reason.
        status, _, body = await asyncio.to_thread(post, "/api/disconnect", {"user": "dora"})
        self.assertEqual((status, body["connections"]), (200, 0))
        status, _, body = await asyncio.to_thread(post, "/api/disconnect", {"user": "dan", "reconnect": True})
        self.assertEqual((status, body["connections"]), (200, 1))
        self.assertEqual(await self.closed(bob), (4500, "disconnected by the server"))

    async def test_disconnect_needs_the_key_and_a_valid_body(self):
        status, _ = await asyncio.to_thread(http, "POST", "/api/disconnect", b'{"user":"x"}', None)
        self.assertEqual(status, 401)
        for body in [{"user": "x", "code": 1000}, {"user": "x", "code": 5000},
                     {"user": "x", "code": 4100, "reconnect": True}, {"user": "x", "reason": "r" * 124},
                     {"user": ""}, {"code": 4403}, {"user": "x", "extra": 1}]:
            status, _, reply = await asyncio.to_thread(post, "/api/disconnect", body)
            self.assertEqual(status, 400, body)
            self.assertIn("reason", reply["error"])
        status, _, _ = await asyncio.to_thread(post, "/api/unsubscribe", {"user": "x", "topic": "a b"})
        self.assertEqual(status, 400)
        status, _, _ = await asyncio.to_thread(post, "/api/disconnect", {"user": "x", "code": 4999, "reason": "r" * 123})
        self.assertEqual(status, 200)

    async def test_unsubscribe_stops_deliveries_and_tells_the_connection(self):
        topic = "chat:ctl-unsub"
        ann, bob = await self.user("uma"), await self.user("ugo")
        for c in (ann, bob):
            self.assertTrue((await c.command("subscribe", topic=topic))["ok"])
        status, _, body = await asyncio.to_thread(post, "/api/unsubscribe", {"user": "uma", "topic": topic})
        self.assertEqual((status, body), (200, {"user": "uma", "connections": 1}))
        self.assertEqual(await ann.recv(), {"ok": True, "op": "unsubscribed", "topic": topic, "reason": "server"})
        await asyncio.to_thread(publish, topic, {"n": 1})
        self.assertEqual((await bob.delivery())["data"], {"n": 1})
        # Nothing came to uma before the reply to her ping.
        await ann.command("ping")
        self.assertEqual(ann.deliveries, [])
        self.assertEqual((await ann.command("unsubscribe", topic=topic))["error"]["code"], 404)

    async def test_subscribe_starts_deliveries_and_tells_the_connection(self):
        topic = "chat:ctl-sub"
        first = await asyncio.to_thread(publish, topic, {"n": 1})
        await asyncio.to_thread(publish, topic, {"n": 2})
        ann = await self.user("sal")
        since = {"epoch": first["epoch"], "seq": 1}
        status, _, body = await asyncio.to_thread(post, "/api/subscribe", {"user": "sal", "topic": topic, "since": since})
        self.assertEqual((status, body), (200, {"user": "sal", "connections": 1}))
        reply = await ann.recv()
        self.assertEqual((reply["op"], reply["topic"], reply["seq"], reply["server"], reply["recovered"]),
                         ("subscribed", topic, 2, True, True))
        self.assertEqual((await ann.delivery())["data"], {"n": 2})
        await asyncio.to_thread(publish, topic, {"n": 3})
        self.assertEqual((await ann.delivery())["data"], {"n": 3})
        self.assertEqual((await ann.command("subscribe", topic=topic))["error"]["code"], 409)
        # Already subscribed: left alone.
        status, _, body = await asyncio.to_thread(post, "/api/subscribe", {"user": "sal", "topic": topic})
        self.assertEqual((status, body["connections"]), (200, 0))
        self.assertGreaterEqual(await self.counter("gale_server_subscribes_total"), 1)

    async def test_subscribe_keeps_the_limit_of_subscriptions_per_connection(self):
        full = await self.user("max")
        for i in range(64):  # websocket.max_subscriptions
            self.assertTrue((await full.command("subscribe", topic=f"chat:ctl-full-{i}"))["ok"])
        status, _, body = await asyncio.to_thread(post, "/api/subscribe", {"user": "max", "topic": "chat:ctl-more"})
        self.assertEqual((status, body["connections"]), (200, 0))
        error = (await full.recv())["error"]
        self.assertEqual(error["code"], 413)
        self.assertIn("chat:ctl-more", error["reason"])


KEYS_CONFIG = """
[publish]
idempotency_max_keys = 3

[[namespaces]]
pattern = "chat:*"
subscribe = true
publish = true
"""


class IdempotencyBoundTest(AsyncTest):
    """The bound on idempotency keys (3 here, for the HTTP API and for clients each), on a
    gateway of its own."""

    @classmethod
    def setUpClass(cls):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(KEYS_CONFIG)
        cls.config = f.name
        cls.server = GaleServe("gateway-keys", "--config", f.name, env={"GALE_API_KEY": API_KEY})

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        os.unlink(cls.config)

    def post(self, topic, data, key):
        req = urllib.request.Request(f"{self.server.http_url}/api/publish/{topic}",
                                     data=json.dumps(data).encode(), method="POST")
        for name, value in [("Authorization", f"Bearer {API_KEY}"), ("Content-Type", "application/json"),
                            ("Idempotency-Key", key)]:
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    async def test_clients_cannot_make_the_api_forget_its_keys_and_a_key_past_the_bound_is_refused(self):
        c = await GatewayClient.open(self.server.url + "/ws")
        self.clients.append(c)
        # An anonymous client fills its bound with keys of topics of its own...
        for i in range(3):
            reply = await c.command("publish", topic=f"chat:spam{i}", data=i, idempotency_key=f"s-{i}")
            self.assertTrue(reply["ok"], reply)
        # ...and its next key is refused, nothing published, rather than accepted and forgotten.
        reply = await c.command("publish", topic="chat:spam9", data=9, idempotency_key="s-9")
        self.assertEqual(reply["error"]["code"], 503, reply)
        self.assertIn("idempotency keys", reply["error"]["reason"])
        status, text = await asyncio.to_thread(http, "GET", "/api/topics/chat:spam9", base=self.server.http_url)
        self.assertEqual(json.loads(text)["seq"], 0)
        # The backend's keyed publish is remembered all the same: its retry is not published again.
        status, first = await asyncio.to_thread(self.post, "orders:1", {"n": 1}, "order-1")
        self.assertEqual((status, first["seq"]), (200, 1), first)
        status, again = await asyncio.to_thread(self.post, "orders:1", {"n": 1}, "order-1")
        self.assertEqual((status, again["seq"], again.get("duplicate")), (200, 1, True), again)
        # The client's keys accepted are all still remembered.
        reply = await c.command("publish", topic="chat:spam0", data=0, idempotency_key="s-0")
        self.assertEqual((reply["seq"], reply.get("duplicate")), (1, True), reply)
        # Past its own bound the API is told too.
        for i in range(2, 4):
            status, body = await asyncio.to_thread(self.post, f"orders:{i}", i, f"order-{i}")
            self.assertEqual(status, 200, body)
        status, body = await asyncio.to_thread(self.post, "orders:5", 5, "order-5")
        self.assertEqual(status, 503, body)


class HttpApiTest(unittest.TestCase):
    def test_api_key_is_required(self):
        self.assertEqual(http("POST", "/api/publish/chat:k", b"{}", key=None)[0], 401)
        self.assertEqual(http("POST", "/api/publish/chat:k", b"{}", key="wrong")[0], 401)
        status, text = http("POST", "/api/publish/chat:k", b"{", content_type="application/json")
        self.assertEqual(status, 400)
        self.assertIn("JSON", text)
        self.assertEqual(http("POST", "/api/publish/bad%20topic", b"x")[0], 400)

    def test_broadcast_topic_info_health_and_metrics(self):
        body = json.dumps({"topics": ["news:a", "news:b"], "data": {"score": "2-1"}}).encode()
        status, text = http("POST", "/api/broadcast", body, content_type="application/json")
        self.assertEqual(status, 200, text)
        results = json.loads(text)["results"]
        self.assertEqual([r["topic"] for r in results], ["news:a", "news:b"])
        status, text = http("GET", "/api/topics/news%3Aa")
        info = json.loads(text)
        self.assertEqual((status, info["topic"], info["seq"], info["subscribers"]), (200, "news:a", 1, 0))
        status, text = http("GET", "/healthz", key=None)
        health = json.loads(text)
        self.assertEqual((status, health["status"]), (200, "ok"), text)
        # The server is shared with the other tests of the class: at least the two topics above.
        self.assertGreaterEqual(health["topics"], 2, text)
        self.assertIsInstance(health["topics_subscribed"], int, text)
        status, text = http("GET", "/metrics", key=None)
        self.assertEqual(status, 200)
        for name in ['gale_connections{loop="0"}', "gale_messages_sent_total", "gale_bytes_received_total",
                     "gale_backpressure_drops_total", "gale_reads_paused_total", "gale_backpressure_timeouts_total",
                     'gale_publishes_total{source="http"}', "gale_topics"]:
            self.assertIn(name, text)
        status, text = http("GET", "/", key=None)
        self.assertEqual(status, 200)
        self.assertIn("<title>Gale", text)

    def test_without_a_key_the_api_answers_403_and_says_why(self):
        other = GaleServe("gateway-nokey", env={"GALE_API_KEY": ""})
        try:
            status, text = http("POST", "/api/publish/chat:x", b"hi", base=other.http_url)
            self.assertEqual(status, 403)
            self.assertIn("no API key", text)
        finally:
            other.stop()


PRESENCE_CONFIG = """
[presence]
max_clients = 3

[limits]
client_presence_rate = 1.0
client_presence_burst = 3

[[namespaces]]
pattern = "room:*"
subscribe = true
publish = true
presence = true
join_leave = true

[[namespaces]]
pattern = "chat:*"
subscribe = true
publish = true

[[namespaces]]
pattern = "staff:*"
presence = true

[[namespaces]]
pattern = "user:*"
subscribe = true
personal = true
"""


class PresenceTest(AsyncTest):
    """Presence, join/leave events and personal topics, on a gateway of its own: `room:*` keeps
    presence and sends join/leave events, `chat:*` keeps none, `staff:*` keeps presence but
    only tokens may subscribe, `user:*` is personal; lists show at most 3 clients."""

    @classmethod
    def setUpClass(cls):
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(PRESENCE_CONFIG)
        cls.config = f.name
        cls.server = GaleServe("gateway-presence", "--config", f.name, "--jwt-secret", SECRET,
                               env={"GALE_API_KEY": API_KEY})

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        os.unlink(cls.config)

    async def open(self, user=None, **claims):
        query = ""
        if user is not None:
            query = "?token=" + make_token({"sub": user, "exp": int(time.time()) + 60, **claims})
        c = await GatewayClient.open(self.server.url + "/ws" + query)
        self.clients.append(c)
        return c

    async def get(self, path, key=API_KEY):
        status, text = await asyncio.to_thread(http, "GET", path, key=key, base=self.server.http_url)
        return status, json.loads(text)

    async def stats_become(self, topic, expected):
        """Poll presence_stats until it is `expected` (a close is handled after the client's
        close returns)."""
        deadline = time.monotonic() + 5
        while True:
            _, body = await self.get(f"/api/presence_stats/{topic}")
            got = (body["connections"], body["users"])
            if got == expected or time.monotonic() > deadline:
                return got
            await asyncio.sleep(0.02)

    async def next_message(self, c):
        return c.deliveries.pop(0) if c.deliveries else await c.recv()

    async def test_presence_lists_users_with_their_info_and_counts_anonymous_connections(self):
        ann = await self.open("ann", info={"name": "Ann", "role": "admin"})
        ann2 = await self.open("ann")
        bob = await self.open("bob", info={"name": "Bob"})
        anon = await self.open()
        for c in (ann, ann2, bob, anon):
            self.assertTrue((await c.command("subscribe", topic="room:p"))["ok"])
        status, body = await self.get("/api/presence/room%3Ap")
        self.assertEqual((status, body["topic"], body["connections"], body["users"]), (200, "room:p", 4, 2))
        self.assertFalse(body["more"])
        clients = body["clients"]
        self.assertEqual(len(clients), 3, "the anonymous connection is counted, not listed")
        self.assertEqual(len({c["client"] for c in clients}), 3)
        for c in clients:
            self.assertRegex(c["client"], r"^[0-9a-f]{16}-\d+$")
        listed = sorted((c["user"], json.dumps(c.get("info"), sort_keys=True)) for c in clients)
        self.assertEqual(listed, [("ann", "null"), ("ann", json.dumps({"name": "Ann", "role": "admin"}, sort_keys=True)),
                                  ("bob", json.dumps({"name": "Bob"}))])
        # The same through the commands, for any client that may subscribe.
        reply = await anon.command("presence", topic="room:p")
        self.assertEqual((reply["ok"], reply["op"], reply["connections"], reply["users"]), (True, "presence", 4, 2))
        self.assertEqual(sorted(c["client"] for c in reply["clients"]), sorted(c["client"] for c in clients))
        reply = await ann.command("presence_stats", topic="room:p")
        self.assertEqual((reply["op"], reply["connections"], reply["users"], "clients" in reply),
                         ("presence_stats", 4, 2, False))
        # Past presence.max_clients the list stops; the counts stay whole.
        cat = await self.open("cat")
        self.assertTrue((await cat.command("subscribe", topic="room:p"))["ok"])
        _, body = await self.get("/api/presence/room:p")
        self.assertEqual((len(body["clients"]), body["more"], body["connections"], body["users"]), (3, True, 5, 3))
        # Disconnects and unsubscribes leave; a user with another connection stays.
        await ann2.close()
        await anon.close()
        self.assertEqual((await bob.command("unsubscribe", topic="room:p"))["ok"], True)
        self.assertEqual(await self.stats_become("room:p", (2, 2)), (2, 2))
        await cat.close()
        self.assertEqual(await self.stats_become("room:p", (1, 1)), (1, 1))
        _, body = await self.get("/api/presence/room:p")
        self.assertEqual([(c["user"], c["info"]) for c in body["clients"]], [("ann", {"name": "Ann", "role": "admin"})])
        status, text = await asyncio.to_thread(http, "GET", "/metrics", base=self.server.http_url)
        self.assertRegex(text, r'gale_presence_requests_total\{source="http",kind="list"\} [3-9]')
        self.assertRegex(text, r'gale_presence_requests_total\{source="client",kind="stats"\} [1-9]')
        self.assertRegex(text, r"gale_presence_members [1-9]")

    async def test_presence_is_refused_where_the_namespace_or_the_rights_do_not_allow_it(self):
        c = await self.open()
        self.assertTrue((await c.command("subscribe", topic="chat:np"))["ok"])
        for op in ("presence", "presence_stats"):
            reply = await c.command(op, topic="chat:np")
            self.assertEqual(reply["error"]["code"], 403, (op, reply))
            # A namespace with presence, but this client may not subscribe there.
            self.assertEqual((await c.command(op, topic="staff:ops"))["error"]["code"], 403, op)
        self.assertEqual((await c.command("presence"))["error"]["code"], 400)
        # A token that may subscribe there may read it.
        staff = await self.open("sam", subscribe=["staff:*"])
        self.assertTrue((await staff.command("subscribe", topic="staff:ops"))["ok"])
        reply = await staff.command("presence", topic="staff:ops")
        self.assertEqual((reply["connections"], [x["user"] for x in reply["clients"]]), (1, ["sam"]))
        # The HTTP API: the key, and a topic that keeps presence.
        self.assertEqual((await self.get("/api/presence/room:x", key=None))[0], 401)
        status, body = await self.get("/api/presence/chat:np")
        self.assertEqual(status, 404, body)
        self.assertIn("presence", body["error"]["reason"])
        self.assertEqual((await self.get("/api/presence_stats/chat:np"))[0], 404)
        self.assertEqual((await self.get("/api/presence_stats/room:x?limit=1"))[0], 400)
        # Past the burst of presence commands: 429.
        r = await self.open()
        codes = [(await r.command("presence_stats", topic="room:x")).get("error", {}).get("code") for _ in range(4)]
        self.assertEqual(codes, [None, None, None, 429])
        status, body = await self.get("/api/presence_stats/room:nobody")
        self.assertEqual((status, body), (200, {"topic": "room:nobody", "connections": 0, "users": 0}))

    async def test_join_and_leave_events_are_delivered_but_not_numbered_kept_or_replayed(self):
        watcher = await self.open()
        reply = await watcher.command("subscribe", topic="room:j")
        epoch = reply["epoch"]
        await asyncio.to_thread(http, "POST", "/api/publish/room:j", b'"one"', content_type="application/json",
                                base=self.server.http_url)
        ann = await self.open("ann", info={"name": "Ann"})
        self.assertTrue((await ann.command("subscribe", topic="room:j"))["ok"])
        anon = await self.open()
        self.assertTrue((await anon.command("subscribe", topic="room:j"))["ok"])
        await asyncio.to_thread(http, "POST", "/api/publish/room:j", b'"two"', content_type="application/json",
                                base=self.server.http_url)
        await ann.close()
        got = [await self.next_message(watcher) for _ in range(4)]
        self.assertEqual((got[0]["seq"], got[0]["data"]), (1, "one"))
        client = got[1]["client"]
        self.assertEqual(got[1], {"op": "join", "topic": "room:j", "client": client, "user": "ann", "info": {"name": "Ann"}})
        self.assertEqual((got[2]["seq"], got[2]["data"]), (2, "two"), "an anonymous client joins silently")
        self.assertEqual(got[3], {"op": "leave", "topic": "room:j", "client": client, "user": "ann", "info": {"name": "Ann"}})
        # Not in the history, and recovery replays only the numbered messages.
        _, body = await self.get("/api/history/room:j")
        self.assertEqual([m["data"] for m in body["messages"]], ["one", "two"])
        late = await self.open()
        reply = await late.command("subscribe", topic="room:j", since={"epoch": epoch, "seq": 0})
        self.assertEqual((reply["recovered"], reply["missed"]), (True, 2))
        self.assertEqual([(await self.next_message(late))["seq"] for _ in range(2)], [1, 2])
        self.assertTrue((await late.command("ping"))["ok"])
        self.assertEqual(late.deliveries, [], "nothing but the two messages before the ping's reply")
        # Topics whose namespace sends no events: none.
        quiet = await self.open()
        self.assertTrue((await quiet.command("subscribe", topic="chat:quiet"))["ok"])
        bob = await self.open("bob")
        self.assertTrue((await bob.command("subscribe", topic="chat:quiet"))["ok"])
        await bob.close()
        self.assertTrue((await quiet.command("ping"))["ok"])
        self.assertEqual(quiet.deliveries, [])
        status, text = await asyncio.to_thread(http, "GET", "/metrics", base=self.server.http_url)
        self.assertRegex(text, r"gale_join_leave_events_total [2-9]")

    async def test_server_side_subscriptions_join_and_leave_like_a_clients_own(self):
        watcher = await self.open()
        self.assertTrue((await watcher.command("subscribe", topic="room:s"))["ok"])
        dan = await self.open("dan")
        for op in ("subscribe", "unsubscribe"):
            status, text = await asyncio.to_thread(http, "POST", f"/api/{op}",
                                                   json.dumps({"user": "dan", "topic": "room:s"}).encode(),
                                                   base=self.server.http_url)
            self.assertEqual((status, json.loads(text)["connections"]), (200, 1), text)
            notice = await dan.recv()
            while notice["op"] == "join":  # its own join event (sent to every subscriber)
                notice = await dan.recv()
            self.assertEqual(notice["op"], op + "d")
            event = await self.next_message(watcher)
            self.assertEqual((event["op"], event["user"]), ("join" if op == "subscribe" else "leave", "dan"))
            self.assertEqual(await self.stats_become("room:s", (2, 1) if op == "subscribe" else (1, 0)),
                             (2, 1) if op == "subscribe" else (1, 0))

    async def test_personal_topics_are_only_their_owners(self):
        owner = await self.open("42")
        self.assertTrue((await owner.command("subscribe", topic="user:#42"))["ok"])
        for c, topic in [(owner, "user:#43"), (owner, "user:42"), (await self.open("4"), "user:#42"),
                         (await self.open(), "user:#42"), (await self.open("42x"), "user:#42")]:
            reply = await c.command("subscribe", topic=topic)
            self.assertEqual(reply["error"]["code"], 403, (topic, reply))
        # A backend pushes to the user (the # percent-encoded in the path).
        status, text = await asyncio.to_thread(http, "POST", "/api/publish/user:%2342", b'{"n": 1}',
                                               content_type="application/json", base=self.server.http_url)
        self.assertEqual(status, 200, text)
        d = await owner.delivery()
        self.assertEqual((d["topic"], d["data"]), ("user:#42", {"n": 1}))


class ConfigTest(unittest.TestCase):
    def test_bad_configuration_is_refused_with_the_key_named(self):
        import subprocess
        import tempfile
        from gale_process import gale_bin

        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write("[websocket]\nmax_payload = -1\n")
        result = subprocess.run([str(gale_bin()), "serve", "--config", f.name], capture_output=True,
                                text=True, timeout=TIMEOUT)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("websocket.max_payload", result.stderr)
        # A subscriber must be able to hold the largest delivery of a 1 MiB HTTP publish.
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write("[websocket]\nmax_backpressure = 1048576\n")
        result = subprocess.run([str(gale_bin()), "serve", "--config", f.name], capture_output=True,
                                text=True, timeout=TIMEOUT)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("websocket.max_backpressure", result.stderr)
        result = subprocess.run([str(gale_bin()), "serve", "--config", "/nonexistent.toml"],
                                capture_output=True, text=True, timeout=TIMEOUT)
        self.assertIn("cannot read /nonexistent.toml", result.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
