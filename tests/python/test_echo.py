"""`gale echo` seen by a third-party Python client: the `websockets` package.

Covers text (ASCII, CJK/emoji) and binary echo across the frame-length boundaries,
subprotocol selection, ping/pong, close code/reason echo, fragmented messages, UTF-8
validation (1007), concurrent connections, any path, GET /healthz, --max-payload (1009),
--idle-timeout, close 1001 on SIGTERM, and wss:// with a throwaway certificate (TLS 1.2
and 1.3, ALPN, an untrusted certificate, plain HTTP on the TLS port).

Run: python3 tests/python/test_echo.py   (GALE_BIN overrides target/debug/gale)
"""

import asyncio
import random
import ssl
import tempfile
import time
import unittest
import urllib.error
import urllib.request
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gale_process import GaleEcho, make_certificate

# Frame payload lengths around the 7-bit / 16-bit / 64-bit length encodings, then a large one.
SIZES = [0, 125, 126, 65535, 65536, 1 << 20]
# Every await is bounded; generous because the machine is shared with builds.
TIMEOUT = 60.0

server: GaleEcho


def setUpModule():
    global server
    server = GaleEcho("python")


def tearDownModule():
    server.stop()


def open_ws(url, **kwargs):
    # No keepalive pings (they would race with the explicit ping test) and no cap on
    # message size (the 1 MiB echo is exactly at websockets' default limit).
    options = dict(max_size=None, ping_interval=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT)
    options.update(kwargs)
    return connect(url, **options)


def ascii_text(size: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 "
    return (alphabet * (size // len(alphabet) + 1))[:size]


def unicode_text(min_bytes: int) -> str:
    # 1-, 2-, 3- and 4-byte UTF-8 sequences, so code points straddle frame and read boundaries.
    unit = "a ñ 漢字テスト 한국어 🚀🌍👍🏽 "
    return unit * (min_bytes // len(unit.encode()) + 1)


def random_bytes(size: int) -> bytes:
    return random.Random(size).randbytes(size)


class AsyncTest(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        # unittest runs the loop in debug mode, which logs every step slower than 0.1 s:
        # only noise on a machine loaded by builds.
        asyncio.get_running_loop().slow_callback_duration = 10.0


class EchoTest(AsyncTest):
    async def echo(self, message, **connect_kwargs):
        async with asyncio.timeout(TIMEOUT), open_ws(server.url, **connect_kwargs) as ws:
            await ws.send(message)
            return await ws.recv()

    async def test_ascii_text_sizes(self):
        for size in SIZES:
            with self.subTest(size=size):
                message = ascii_text(size)
                self.assertEqual(await self.echo(message), message)

    async def test_unicode_text(self):
        for min_bytes in [10, 70_000, 1 << 20]:
            with self.subTest(min_bytes=min_bytes):
                message = unicode_text(min_bytes)
                echoed = await self.echo(message)
                self.assertIsInstance(echoed, str)
                self.assertEqual(echoed, message)

    async def test_binary_sizes(self):
        for size in SIZES:
            with self.subTest(size=size):
                message = random_bytes(size)
                echoed = await self.echo(message)
                self.assertIsInstance(echoed, bytes)
                self.assertEqual(echoed, message)

    async def test_any_path(self):
        for path in ["/", "/chat/room-1", "/a/b?x=1&y=%20"]:
            with self.subTest(path=path):
                async with asyncio.timeout(TIMEOUT), open_ws(server.url + path) as ws:
                    await ws.send(path)
                    self.assertEqual(await ws.recv(), path)

    async def test_many_messages_on_one_connection(self):
        async with asyncio.timeout(TIMEOUT), open_ws(server.url) as ws:
            for i in range(100):
                message = f"message {i}" if i % 2 else random_bytes(i)
                await ws.send(message)
                self.assertEqual(await ws.recv(), message)

    async def test_subprotocol_client_first_choice(self):
        async with asyncio.timeout(TIMEOUT):
            async with open_ws(server.url, subprotocols=["chat", "superchat"]) as ws:
                self.assertEqual(ws.subprotocol, "chat")
            async with open_ws(server.url, subprotocols=["superchat", "chat"]) as ws:
                self.assertEqual(ws.subprotocol, "superchat")
            async with open_ws(server.url) as ws:
                self.assertIsNone(ws.subprotocol)

    async def test_ping_pong(self):
        async with asyncio.timeout(TIMEOUT), open_ws(server.url) as ws:
            for payload in [b"", b"are you there?", random_bytes(125)]:
                pong = await ws.ping(payload)
                latency = await pong
                self.assertGreaterEqual(latency, 0)
            # A ping between data messages does not disturb the echo.
            await ws.send("after pings")
            self.assertEqual(await ws.recv(), "after pings")

    async def test_close_code_and_reason_echoed(self):
        # The last reason is the longest allowed: 123 bytes fill a 125-byte control payload.
        for code, reason in [(4000, "bye"), (1000, ""), (3001, "再见 👋"), (4999, "r" * 123)]:
            with self.subTest(code=code, reason=reason[:10]):
                async with asyncio.timeout(TIMEOUT):
                    ws = await open_ws(server.url)
                    await ws.close(code, reason)
                    self.assertEqual(ws.close_code, code)
                    self.assertEqual(ws.close_reason, reason)

    async def test_close_without_code(self):
        async with asyncio.timeout(TIMEOUT):
            ws = await open_ws(server.url)
            await ws.close()
            self.assertEqual(ws.close_code, 1000)

    async def test_fragmented_text(self):
        fragments = ["Hel", "lo, ", "", "漢字", " 🚀", "!"]
        self.assertEqual(await self.echo(fragments), "".join(fragments))

    async def test_fragmented_binary(self):
        fragments = [random_bytes(n) for n in (1, 0, 125, 126, 70_000)]
        self.assertEqual(await self.echo(fragments), b"".join(fragments))

    async def test_code_points_split_across_fragments(self):
        # Raw UTF-8 fragments sent as one text message: "漢" and "🚀" are cut mid-sequence,
        # which is valid as long as the whole message is.
        fragments = [b"ab\xe6", b"\xbc", b"\xa2\xf0\x9f", b"\x9a\x80"]
        async with asyncio.timeout(TIMEOUT), open_ws(server.url) as ws:
            await ws.send(fragments, text=True)
            self.assertEqual(await ws.recv(), "ab漢🚀")

    async def test_invalid_utf8_closes_1007(self):
        for message in [b"ab\xff", [b"ab\xe6", b"\xbc"]]:  # a bad byte; a truncated sequence
            with self.subTest(message=message):
                async with asyncio.timeout(TIMEOUT), open_ws(server.url) as ws:
                    await ws.send(message, text=True)
                    with self.assertRaises(ConnectionClosed) as closed:
                        await ws.recv()
                    self.assertIsNotNone(closed.exception.rcvd, "server sent no close frame")
                    self.assertEqual(closed.exception.rcvd.code, 1007)

    async def test_fragments_sent_with_pauses(self):
        # An async iterator that yields to the loop, so each fragment leaves in its own
        # segment and the server must hold the partial message across reads.
        async def slow_fragments():
            for part in ["first ", "second ", "third"]:
                await asyncio.sleep(0.05)
                yield part

        self.assertEqual(await self.echo(slow_fragments()), "first second third")

    async def test_concurrent_connections(self):
        async def client(n):
            async with open_ws(server.url) as ws:
                sent = [f"conn {n} msg {i}" if i % 2 else random_bytes(n * 100 + i) for i in range(20)]
                # Pipelined: all sends first, so the server must keep the order under load.
                for message in sent:
                    await ws.send(message)
                received = [await ws.recv() for _ in sent]
                return sent == received

        async with asyncio.timeout(TIMEOUT * 2):
            results = await asyncio.gather(*(client(n) for n in range(50)))
        self.assertEqual(results, [True] * 50)

    async def test_healthz(self):
        def get():
            with urllib.request.urlopen(f"{server.http_url}/healthz", timeout=TIMEOUT) as resp:
                return resp.status, resp.read()

        self.assertEqual(await asyncio.to_thread(get), (200, b"ok\n"))


class ServerProtocolListTest(AsyncTest):
    """`--protocol superchat --protocol chat`: the server's own order of preference wins."""

    @classmethod
    def setUpClass(cls):
        cls.server = GaleEcho("python-protocol", "--protocol", "superchat", "--protocol", "chat")

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    async def subprotocol(self, offer):
        async with asyncio.timeout(TIMEOUT), open_ws(self.server.url, subprotocols=offer) as ws:
            await ws.send("still echoes")
            self.assertEqual(await ws.recv(), "still echoes")
            return ws.subprotocol

    async def test_first_of_server_list_that_client_offers(self):
        # The client lists chat first, but superchat comes first in the server's list.
        self.assertEqual(await self.subprotocol(["chat", "superchat"]), "superchat")

    async def test_only_offered_one_in_server_list(self):
        self.assertEqual(await self.subprotocol(["other", "chat"]), "chat")

    async def test_nothing_in_common_accepts_without_subprotocol(self):
        self.assertIsNone(await self.subprotocol(["other"]))


class MaxPayloadTest(AsyncTest):
    """`--max-payload 1024`: a message up to the limit echoes, one byte more closes with 1009."""

    @classmethod
    def setUpClass(cls):
        cls.server = GaleEcho("python-max-payload", "--max-payload", "1024")

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    async def test_at_limit_echoes(self):
        async with asyncio.timeout(TIMEOUT), open_ws(self.server.url) as ws:
            await ws.send(random_bytes(1024))
            self.assertEqual(await ws.recv(), random_bytes(1024))

    async def assert_closed_1009(self, message):
        async with asyncio.timeout(TIMEOUT), open_ws(self.server.url) as ws:
            await ws.send(message)
            with self.assertRaises(ConnectionClosed) as closed:
                await ws.recv()
            self.assertIsNotNone(closed.exception.rcvd, "server sent no close frame")
            self.assertEqual(closed.exception.rcvd.code, 1009)

    async def test_over_limit_closes_1009(self):
        await self.assert_closed_1009(random_bytes(1025))

    async def test_fragments_over_limit_close_1009(self):
        # Each fragment is small; only the reassembled message is over the limit.
        await self.assert_closed_1009([random_bytes(600), random_bytes(600)])


class CompressionTest(AsyncTest):
    """permessage-deflate as the websockets client offers it, against each server mode."""

    @classmethod
    def setUpClass(cls):
        cls.shared = server
        cls.dedicated = GaleEcho("python-dedicated", "--compression", "dedicated")
        cls.off = GaleEcho("python-no-compression", "--compression", "off")
        cls.small = GaleEcho("python-bomb", "--max-payload", "65536")

    @classmethod
    def tearDownClass(cls):
        for s in (cls.dedicated, cls.off, cls.small):
            s.stop()

    async def negotiated(self, url):
        async with asyncio.timeout(TIMEOUT), open_ws(url) as ws:
            extensions = ws.response.headers.get("Sec-WebSocket-Extensions")
            messages = [f'{{"user":"u{i}","text":"弹幕 {i} 哈哈哈哈 666","room":"lobby"}}' for i in range(50)]
            for m in messages:
                await ws.send(m)
            for m in messages:
                self.assertEqual(await ws.recv(), m)
            return extensions

    async def test_default_server_negotiates_shared_compression(self):
        ext = await self.negotiated(self.shared.url)
        self.assertEqual(ext, "permessage-deflate; server_no_context_takeover; client_no_context_takeover")

    async def test_dedicated_compression_keeps_context(self):
        self.assertEqual(await self.negotiated(self.dedicated.url), "permessage-deflate")

    async def test_no_compression_when_off(self):
        self.assertIsNone(await self.negotiated(self.off.url))

    async def test_client_without_compression(self):
        async with asyncio.timeout(TIMEOUT), open_ws(self.shared.url, compression=None) as ws:
            self.assertIsNone(ws.response.headers.get("Sec-WebSocket-Extensions"))
            await ws.send("plain")
            self.assertEqual(await ws.recv(), "plain")

    async def test_compressed_bomb_closes_1009(self):
        # 1 MiB of one letter compresses to about 1 KiB; the server allows 64 KiB inflated.
        async with asyncio.timeout(TIMEOUT), open_ws(self.small.url) as ws:
            await ws.send("a" * (1 << 20))
            with self.assertRaises(ConnectionClosed) as closed:
                await ws.recv()
            self.assertIsNotNone(closed.exception.rcvd, "server sent no close frame")
            self.assertEqual(closed.exception.rcvd.code, 1009)


class TlsTest(AsyncTest):
    """`--tls-cert/--tls-key`: the same client over wss:// with a throwaway certificate."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory(prefix="gale-tls-")
        cls.cert, key = make_certificate(Path(cls.dir.name))
        cls.tls = GaleEcho("python-tls", "--tls-cert", str(cls.cert), "--tls-key", str(key))
        cls.context = ssl.create_default_context(cafile=str(cls.cert))

    @classmethod
    def tearDownClass(cls):
        cls.tls.stop()
        cls.dir.cleanup()

    async def test_echo_over_tls_with_compression(self):
        self.assertTrue(self.tls.url.startswith("wss://"))
        async with asyncio.timeout(TIMEOUT), open_ws(self.tls.url + "/tls", ssl=self.context) as ws:
            for size in SIZES:
                text = unicode_text(size)
                await ws.send(text)
                self.assertEqual(await ws.recv(), text)
                data = random_bytes(size)
                await ws.send(data)
                self.assertEqual(await ws.recv(), data)
            self.assertIsNotNone(ws.response.headers.get("Sec-WebSocket-Extensions"))
            await ws.close(4000, "bye")
            self.assertEqual(ws.close_code, 4000)

    async def test_alpn_and_tls_versions(self):
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            context = ssl.create_default_context(cafile=str(self.cert))
            context.minimum_version = context.maximum_version = version
            context.set_alpn_protocols(["http/1.1"])
            async with asyncio.timeout(TIMEOUT), open_ws(self.tls.url, ssl=context) as ws:
                tls = ws.transport.get_extra_info("ssl_object")
                self.assertEqual(tls.version(), {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version])
                self.assertEqual(tls.selected_alpn_protocol(), "http/1.1")
                await ws.send("versions")
                self.assertEqual(await ws.recv(), "versions")

    async def test_untrusted_certificate_is_refused_by_the_client(self):
        with self.assertRaises(ssl.SSLCertVerificationError):
            async with asyncio.timeout(TIMEOUT), open_ws(self.tls.url, ssl=ssl.create_default_context()):
                pass

    def test_plain_http_on_the_tls_port_gets_400(self):
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{self.tls.port}/healthz", timeout=TIMEOUT)
        self.assertEqual(caught.exception.code, 400)
        self.assertIn(b"expects TLS", caught.exception.read())

    def test_https_healthz(self):
        with urllib.request.urlopen(f"{self.tls.http_url}/healthz", timeout=TIMEOUT, context=self.context) as r:
            self.assertEqual((r.status, r.read()), (200, b"ok\n"))


class IdleTimeoutTest(AsyncTest):
    """`--idle-timeout 1`: a silent connection is closed with 1001 (going away)."""

    async def test_silent_connection_closed_1001(self):
        idle = GaleEcho("python-idle", "--idle-timeout", "1")
        try:
            async with asyncio.timeout(TIMEOUT), open_ws(idle.url) as ws:
                start = time.monotonic()
                with self.assertRaises(ConnectionClosed) as closed:
                    await ws.recv()
                # Only a lower bound (the server's timer wheel ticks every 250 ms): an upper
                # one would be flaky on a loaded machine.
                self.assertGreaterEqual(time.monotonic() - start, 0.7)
                self.assertIsNotNone(closed.exception.rcvd, "server sent no close frame")
                self.assertEqual(closed.exception.rcvd.code, 1001)
        finally:
            idle.stop()


class ShutdownTest(AsyncTest):
    async def test_sigterm_closes_with_1001(self):
        doomed = GaleEcho("python-sigterm")
        try:
            async with asyncio.timeout(TIMEOUT):
                clients = [await open_ws(doomed.url) for _ in range(3)]
                for ws in clients:
                    await ws.send("before shutdown")
                    self.assertEqual(await ws.recv(), "before shutdown")
                doomed.terminate()
                for ws in clients:
                    with self.assertRaises(ConnectionClosed) as closed:
                        await ws.recv()
                    self.assertIsNotNone(closed.exception.rcvd, "server sent no close frame")
                    self.assertEqual(closed.exception.rcvd.code, 1001)
                    self.assertEqual(ws.close_code, 1001)
            self.assertEqual(await asyncio.to_thread(doomed.wait), 0)
        finally:
            doomed.stop()


if __name__ == "__main__":
    unittest.main(verbosity=2)
