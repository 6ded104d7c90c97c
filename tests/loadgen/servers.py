"""Tiny WebSocket servers (Python `websockets`) that the load generator is tested against.

    python3 tests/loadgen/servers.py broadcast
        Subscribers connect to /sub; every message received on /pub is sent to all /sub
        connections (what `gale-loadgen fanout --protocol plain` expects).
    python3 tests/loadgen/servers.py lossy-broadcast
        Like broadcast, but drops every 10th message published.
    python3 tests/loadgen/servers.py doubling-broadcast
        Like broadcast, but sends every 10th message published twice.
    python3 tests/loadgen/servers.py corrupt-echo
        Echoes every message on any path except /forbidden, but flips a bit of the first
        character (text) or byte (binary) of every 10th message on each connection, so that
        a load generator that does not check its echoes would not notice.
    python3 tests/loadgen/servers.py capped-echo
        Echoes every message on any path, but at most CAPPED_ECHO_RATE messages per second over
        all connections: past that rate echoes queue and their latency grows without bound.
    python3 tests/loadgen/servers.py silent
        Completes the handshake on any path, reads every message and never sends one.

All listen on a free port of 127.0.0.1, print `NAME listening on ws://127.0.0.1:PORT` once
ready, answer paths they do not serve with HTTP 404, and exit on SIGTERM or SIGINT.
"""

import asyncio
import http
import signal
import sys

from websockets.asyncio.server import broadcast, serve

CORRUPT_EVERY = 10
# lossy-broadcast drops, doubling-broadcast repeats, every Nth message published.
BROADCAST_FAULT_EVERY = 10
# capped-echo echoes at most this many messages per second.
CAPPED_ECHO_RATE = 500


def corrupted(message):
    """The message with a bit of its first character or byte flipped (text stays valid)."""
    if isinstance(message, str):
        return chr(ord(message[0]) ^ 1) + message[1:] if message else "!"
    return bytes([message[0] ^ 1]) + message[1:] if message else b"!"


async def corrupt_echo(ws):
    count = 0
    async for message in ws:
        count += 1
        await ws.send(corrupted(message) if count % CORRUPT_EVERY == 0 else message)


class CappedEcho:
    """Echoes, each in the next free slot of a schedule of CAPPED_ECHO_RATE slots a second
    shared by every connection."""

    def __init__(self):
        self.next_slot = 0.0

    async def handler(self, ws):
        loop = asyncio.get_running_loop()
        async for message in ws:
            now = loop.time()
            self.next_slot = max(now, self.next_slot) + 1 / CAPPED_ECHO_RATE
            await asyncio.sleep(self.next_slot - now)
            await ws.send(message)


def not_found_unless(serves):
    """A process_request hook answering HTTP 404 to an upgrade on a path `serves` rejects."""

    def check(connection, request):
        if not serves(request.path):
            return connection.respond(http.HTTPStatus.NOT_FOUND, "no such path\n")
        return None

    return check


async def silent(ws):
    async for _ in ws:
        pass


class Broadcast:
    """`copies(n)` says how many times the nth message published (from 1) is sent out."""

    def __init__(self, copies=lambda n: 1):
        self.subscribers = set()
        self.copies = copies
        self.published = 0

    async def handler(self, ws):
        if ws.request.path == "/sub":
            self.subscribers.add(ws)
            try:
                await ws.wait_closed()
            finally:
                self.subscribers.discard(ws)
        else:
            async for message in ws:
                self.published += 1
                for _ in range(self.copies(self.published)):
                    broadcast(self.subscribers, message)


def server_for(kind):
    """(handler, process_request) of the server `kind`."""
    pubsub_paths = not_found_unless(lambda path: path in ("/sub", "/pub"))
    faulty = lambda n: n % BROADCAST_FAULT_EVERY == 0  # noqa: E731
    if kind == "broadcast":
        return Broadcast().handler, pubsub_paths
    if kind == "lossy-broadcast":
        return Broadcast(lambda n: 0 if faulty(n) else 1).handler, pubsub_paths
    if kind == "doubling-broadcast":
        return Broadcast(lambda n: 2 if faulty(n) else 1).handler, pubsub_paths
    if kind == "silent":
        return silent, not_found_unless(lambda path: True)
    if kind == "corrupt-echo":
        return corrupt_echo, not_found_unless(lambda path: path != "/forbidden")
    if kind == "capped-echo":
        return CappedEcho().handler, not_found_unless(lambda path: True)
    raise SystemExit(
        f"usage: {sys.argv[0]} broadcast|lossy-broadcast|doubling-broadcast|corrupt-echo|capped-echo|silent"
    )


async def main(kind):
    handler, process_request = server_for(kind)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    # No keepalive pings and no size limit: the load generator drives the traffic.
    options = dict(process_request=process_request, ping_interval=None, max_size=None)
    async with serve(handler, "127.0.0.1", 0, **options) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"{kind} listening on ws://127.0.0.1:{port}", flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else ""))
