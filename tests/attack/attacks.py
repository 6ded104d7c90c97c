"""Attacks on `gale echo` and `gale serve`, each bounded in seconds, against the backend named
by GALE_BACKEND (the test command runs this once per backend).

Every attack gets a fresh server started with the small limits in harness.Limits (and any the
attack changes) and must leave it: alive, answering a normal client within 1 s during the
attack and after it, with its peak RSS under the attack's stated bound and its descriptors
back to their baseline (see harness.run_attack). The attacks assert the rest themselves: that
the attacker is dropped, and by when.

Run: python3 tests/attack/attacks.py [ATTACK...]   (GALE_BIN overrides target/debug/gale)
"""

import asyncio
import json
import os
import random
import socket
import struct
import sys
import time
import zlib
from dataclasses import dataclass

from harness import (
    BINARY, CONTINUATION, KIB, MASK, MIB, PING, TEXT, Limits, Outcome, Prober, Server, frame, open_ws,
    print_table, read_close_code, read_frame, run_attack, until_closed, upgrade_request,
)

# The server's handshake timeout (ServerConfig::handshake_timeout; no flag sets it).
HANDSHAKE_TIMEOUT = 10.0
# Timers fire on 250 ms ticks and a loop may be busy: a deadline is met within this after it.
TIMER_SLACK = 1.0

# Memory every server may use on top of its baseline, whatever the attack (debug builds, with
# room): the state of one idle connection (about 1.5 KiB measured in the flood), the shared
# compressor and decompressor of a loop, and a slack for the allocator (freed memory it keeps
# in each thread's arena).
CONNECTION_STATE = 8 * KIB
COMPRESSION_STATE = 512 * KIB
SLACK = 8 * MIB


@dataclass(frozen=True)
class Bound:
    """A peak-RSS bound: base + loops x (receive buffers + compression state + per_loop) +
    connections x (connection state + per_connection) + history (gale serve) + slack, where
    per_loop and per_connection name what the attack can fill: a limit (a Limits field), or
    "one_receive" (the bytes one receive hands a connection, and so the most its answer to
    them can add before the server stops reading it)."""

    per_loop: tuple[str, ...] = ()
    per_connection: tuple[str, ...] = ()

    def formula(self) -> str:
        loop = " + ".join(("receive buffers", "compression state", *self.per_loop))
        conn = " + ".join(("connection state", *self.per_connection))
        return f"base + loops x ({loop}) + connections x ({conn}) + history (gale serve) + slack"

    def __call__(self, base: int, limits: Limits, kind: str, backend: str, connections: int) -> int:
        def value(term: str) -> int:
            return limits.one_receive(backend) if term == "one_receive" else getattr(limits, term)

        loop = limits.receive_buffers(backend) + COMPRESSION_STATE + sum(map(value, self.per_loop))
        conn = CONNECTION_STATE + sum(map(value, self.per_connection))
        history = limits.history_bytes if kind == "serve" else 0
        return base + limits.loops * loop + connections * conn + history + SLACK


@dataclass
class Attack:
    """One attack: its coroutine, the servers it applies to, their limits and the bound."""

    name: str
    run: object
    targets: tuple[str, ...]
    limits: Limits
    bound: Bound
    max_cpu: object = None
    expects_exit: bool = False

    @property
    def bound_formula(self) -> str:
        return self.bound.formula()


ATTACKS: list[Attack] = []


def attack(targets=("echo", "serve"), limits=Limits(), bound=Bound(), max_cpu=None, expects_exit=False):
    """Register an attack. `max_cpu(wall)`: most CPU seconds the server may use over it."""

    def register(run):
        ATTACKS.append(Attack(run.__name__, run, targets, limits, bound, max_cpu, expects_exit))
        return run

    return register


def since(start: float) -> float:
    return time.monotonic() - start


async def dropped_by(reader, start: float, deadline: float, what: str) -> float:
    """Wait for the server to end the connection; seconds since `start`. Fails past `deadline`."""
    try:
        await until_closed(reader, deadline - since(start))
    except TimeoutError:
        raise AssertionError(f"{what}: still open {deadline:.1f}s after it began") from None
    return since(start)


async def gather_all(coroutines) -> list:
    """Run them all; raise the first failure once every one has finished."""
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


# An attack that is over sooner is repeated, in rounds, for at least this long, so that the
# normal client probes the server a few times while it is under attack.
MIN_ATTACK = 1.5


async def rounds(one_round) -> list:
    """Run `one_round()` again and again until MIN_ATTACK has passed; every round's result."""
    start, results = time.monotonic(), []
    while not results or since(start) < MIN_ATTACK:
        results.append(await one_round())
    return results


# ---------------------------------------------------------------------------------------------
# Slowloris


SLOW_CONNECTIONS = 40


@attack(bound=Bound(per_loop=("partial_message_budget",)))
async def slowloris(server: Server) -> Outcome:
    """Connections that never finish: request heads cut in half and then trickled (gale echo
    only: the head is read by the same code in both servers, and the handshake timeout is 10 s),
    frames cut in half and stalled, frames trickled a byte every 0.5 s, and a message whose
    first fragment came but no other (kept busy by pings). A trickle keeps the idle timeout from
    firing; the handshake timeout must close the heads, the message timeout the rest."""
    message_deadline = server.limits.message_timeout + TIMER_SLACK

    async def half_head():
        reader, writer = await asyncio.open_connection(server.host, server.port)
        start = time.monotonic()
        request = upgrade_request(server)
        writer.write(request[: len(request) // 2])
        return await hold(reader, writer, start, HANDSHAKE_TIMEOUT + TIMER_SLACK, "half request head",
                          drip=request[len(request) // 2 : -2], every=1.0)

    async def half_frame():
        reader, writer, _ = await open_ws(server)
        start = time.monotonic()
        writer.write(frame(TEXT, b"h" * 1000)[:500])
        return await hold(reader, writer, start, message_deadline, "half frame")

    async def trickled_frame():
        reader, writer, _ = await open_ws(server)
        start = time.monotonic()
        return await hold(reader, writer, start, message_deadline, "trickled frame",
                          drip=frame(TEXT, b"t" * 1000), every=0.5)

    async def stalled_fragments():
        reader, writer, _ = await open_ws(server)
        start = time.monotonic()
        writer.write(frame(TEXT, b"first fragment", fin=False))
        return await hold(reader, writer, start, message_deadline, "unfinished fragmented message",
                          drip_frames=[frame(PING, b"busy")] * 100, every=0.5)

    kinds = {"half frames": half_frame, "trickled frames": trickled_frame, "stalled fragments": stalled_fragments}
    if server.kind == "echo":
        kinds["half heads"] = half_head
    groups = {name: gather_all([make() for _ in range(SLOW_CONNECTIONS)]) for name, make in kinds.items()}
    times = dict(zip(groups, await gather_all(groups.values())))
    worst = {name: max(t) for name, t in times.items()}
    return Outcome(dropped=max(worst.values()), connections=SLOW_CONNECTIONS * len(kinds),
                   detail=", ".join(f"{name} {t:.1f}s" for name, t in worst.items()))


async def hold(reader, writer, start, deadline, what, drip=b"", drip_frames=(), every=0.0) -> float:
    """Keep a connection open, sending `drip` a byte (or `drip_frames` a frame) every `every`
    seconds, until the server drops it; the seconds that took."""

    async def dripping():
        try:
            for piece in drip_frames or [bytes([b]) for b in drip]:
                await asyncio.sleep(every)
                writer.write(piece)
                await writer.drain()
        except ConnectionError:
            pass

    dripper = asyncio.create_task(dripping())
    try:
        return await dropped_by(reader, start, deadline, what)
    finally:
        dripper.cancel()
        writer.close()


# ---------------------------------------------------------------------------------------------
# Connection flood


FLOOD_WAVES = 3
# A wave holds every descriptor this long before its RST teardown: a probe that comes in
# meanwhile waits in the listen backlog and must be served within its 1 s once they are freed.
FLOOD_HOLD = 0.3


@attack(limits=Limits(nofile=1024), max_cpu=lambda wall: 0.25 * wall)
async def flood(server: Server) -> Outcome:
    """Waves of TCP connections past the server's descriptor limit (every other one sends an
    upgrade request), each held FLOOD_HOLD and then torn down with RST (SO_LINGER 0). The server
    must not spin while out of descriptors (its CPU time stays under a quarter of the wall
    time), and must take new connections again once they are freed."""
    count = server.limits.nofile + 64
    peak = 0
    for _ in range(FLOOD_WAVES):
        sockets = []
        for i in range(count):
            s = socket.create_connection((server.host, server.port), timeout=2)
            if i % 2 == 0:
                s.sendall(upgrade_request(server))
            sockets.append(s)
        wave_peak = await settled_fds(server)
        peak = max(peak, wave_peak)
        await asyncio.sleep(FLOOD_HOLD)
        for s in sockets:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
    start = time.monotonic()
    # The prober may hold one connection of its own.
    while server.fds() > server.baseline_fds + 1:
        if since(start) > 5:
            raise AssertionError(f"{server.fds()} descriptors still open 5 s after the last teardown")
        await asyncio.sleep(0.02)
    released = since(start)
    if peak < server.limits.nofile - 16:
        raise AssertionError(f"the flood reached {peak} descriptors, not the limit {server.limits.nofile}")
    return Outcome(dropped=released, connections=count,
                   detail=f"{peak} of {server.limits.nofile} descriptors; released {released:.2f}s after the last RST")


async def settled_fds(server: Server) -> int:
    """The server's descriptor count once it stops growing (accepting has caught up or hit the
    limit)."""
    last, stable_since = -1, time.monotonic()
    while since(stable_since) < 0.15:
        n = server.fds()
        if n != last:
            last, stable_since = n, time.monotonic()
        await asyncio.sleep(0.02)
    return last


# ---------------------------------------------------------------------------------------------
# 1-byte fragments


def one_byte_fragments(length: int, byte: int = ord("f")) -> bytes:
    """A text message of `length` bytes sent as `length` frames of one byte each."""
    masked = bytes([byte ^ MASK[0]])
    first = bytes([TEXT, 0x81]) + MASK + masked
    middle = bytes([CONTINUATION, 0x81]) + MASK + masked
    last = bytes([0x80 | CONTINUATION, 0x81]) + MASK + masked
    return first + middle * (length - 2) + last


@attack(targets=("echo",), bound=Bound(per_loop=("partial_message_budget",), per_connection=("max_payload",)))
async def fragments(server: Server) -> Outcome:
    """Messages of max_payload bytes as max_payload frames of 1 byte each (2 connections a
    round; each must come back whole), and one byte longer (2 connections; each must be closed
    with 1009 once it passes max_payload)."""
    limit = server.limits.max_payload

    async def valid():
        reader, writer, _ = await open_ws(server)
        start = time.monotonic()
        writer.write(one_byte_fragments(limit))
        async with asyncio.timeout(10):
            opcode, payload = await read_frame(reader)
        writer.close()
        if (opcode, payload) != (TEXT, b"f" * limit):
            raise AssertionError(f"echo of the fragmented message: opcode {opcode}, {len(payload)} bytes")
        return since(start)

    async def oversize():
        reader, writer, _ = await open_ws(server)
        start = time.monotonic()
        writer.write(one_byte_fragments(limit + 1))
        code = await read_close_code(reader, 10)
        writer.close()
        if code != 1009:
            raise AssertionError(f"a message past max_payload in 1-byte fragments closed with {code}, not 1009")
        return since(start)

    async def one_round():
        return await gather_all([valid() for _ in range(2)] + [oversize() for _ in range(2)])

    results = await rounds(one_round)
    echoed = max(max(r[:2]) for r in results)
    closed = max(max(r[2:]) for r in results)
    return Outcome(dropped=closed, connections=4,
                   detail=f"{len(results)} rounds; {limit} fragments echoed in {echoed:.2f}s, "
                          f"one more closed in {closed:.2f}s")


# ---------------------------------------------------------------------------------------------
# Readers that never read


NON_READERS = 8
# The non-readers' socket receive buffer: small, so that the server's output backs up into
# its own buffers after a few KiB instead of the megabytes loopback would take.
NON_READER_BUFFER = 16 * KIB


async def send_until_dropped(writer, message: bytes, start: float, deadline: float, what: str) -> float:
    """Send `message` over and over, never reading, until the server drops the connection (a
    send fails); the seconds since `start` that took."""
    try:
        async with asyncio.timeout(deadline - since(start)):
            while True:
                writer.write(message)
                await writer.drain()
    except ConnectionError:
        return since(start)
    except TimeoutError:
        raise AssertionError(f"{what}: still open {deadline:.1f}s after it began") from None
    finally:
        writer.close()


@attack(targets=("echo",), bound=Bound(per_connection=("max_backpressure", "one_receive")))
async def ping_flood(server: Server) -> Outcome:
    """Masked pings with 125-byte payloads, as fast as the server takes them, from clients that
    never read: the pongs pile up. Past max_backpressure the server must stop reading them and
    drop the client within backpressure_timeout."""
    deadline = server.limits.backpressure_timeout + 3 * TIMER_SLACK
    pings = frame(PING, bytes(range(125))) * 64

    async def pinger():
        _, writer, _ = await open_ws(server, receive_buffer=NON_READER_BUFFER)
        return await send_until_dropped(writer, pings, time.monotonic(), deadline, "ping flood")

    times = await rounds(lambda: gather_all([pinger() for _ in range(NON_READERS)]))
    return Outcome(dropped=max(map(max, times)), connections=NON_READERS, detail=f"{len(times)} rounds")


# Room in the partial-message budget for every non-reader's message in progress at once: the
# attack is about output. A message turned away by the budget (1013) would leave its sender
# to the close timeout instead, waiting for a peer that never reads the close.
LARGE_NO_READ_LIMITS = Limits(partial_message_budget=1 * MIB)


@attack(limits=LARGE_NO_READ_LIMITS,
        bound=Bound(per_connection=("max_backpressure", "max_payload", "one_receive", "one_receive")))
async def large_no_read(server: Server) -> Outcome:
    """Messages of max_payload bytes (gale serve: publishes to a topic the client subscribed
    to, each delivered back to it) from clients that never read the answers. Past
    max_backpressure the server must stop reading and drop them within backpressure_timeout.
    Memory per connection: its output, a message, and one receive's worth twice (the input
    while its messages are handled, and the answers they make)."""
    limits = server.limits
    deadline = limits.backpressure_timeout + 3 * TIMER_SLACK

    async def non_reader(n):
        _, writer, _ = await open_ws(server, receive_buffer=NON_READER_BUFFER)
        if server.kind == "echo":
            message = frame(BINARY, os.urandom(limits.max_payload))
        else:
            topic = f"chat:slow-{n}"
            writer.write(frame(TEXT, json.dumps({"id": 0, "op": "subscribe", "topic": topic}).encode()))
            envelope = len(json.dumps({"id": 1, "op": "publish", "topic": topic, "data": ""}))
            data = "d" * (limits.max_payload - envelope)
            message = frame(TEXT, json.dumps({"id": 1, "op": "publish", "topic": topic, "data": data}).encode())
        return await send_until_dropped(writer, message, time.monotonic(), deadline, "non-reader")

    times = await rounds(lambda: gather_all([non_reader(n) for n in range(NON_READERS)]))
    return Outcome(dropped=max(map(max, times)), connections=NON_READERS, detail=f"{len(times)} rounds")


# ---------------------------------------------------------------------------------------------
# Deflate bombs


BOMB_LIMITS = Limits(max_payload=1 * MIB, partial_message_budget=1 * MIB)
_bomb: bytes | None = None


def build_bomb() -> bytes:
    """1 GiB of zeros, raw-deflated (permessage-deflate's form, without the final empty
    block's 00 00 FF FF): about 1 MiB. Built from 4 MiB pieces each ending in a sync flush,
    whose compressed form repeats exactly once the window is full of zeros."""
    global _bomb
    if _bomb is None:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        zeros = bytes(4 * MIB)
        first, steady = (compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH) for _ in range(2))
        assert compressor.compress(zeros) + compressor.flush(zlib.Z_SYNC_FLUSH) == steady
        _bomb = (first + steady * 255)[:-4]
    return _bomb


@attack(limits=BOMB_LIMITS, bound=Bound(per_loop=("partial_message_budget",), per_connection=("max_payload", "max_payload")))
async def deflate_bomb(server: Server) -> Outcome:
    """permessage-deflate negotiated, then a ~1 MiB compressed message that inflates to 1 GiB,
    sent in one frame (4 connections) and in 64 KiB fragments (4 connections). The server must
    stop inflating at max_payload and close with 1009 (or refuse the compressed bytes with 1013
    once the bombs in flight pass the loop's budget): memory stays a few max_payloads."""
    bomb = build_bomb()
    if len(bomb) > server.limits.max_payload:
        raise AssertionError(f"the bomb ({len(bomb)} bytes) does not fit max_payload on the wire")
    step = 64 * KIB
    pieces = [bomb[i : i + step] for i in range(0, len(bomb), step)]
    fragmented = b"".join(
        frame(BINARY if i == 0 else CONTINUATION, piece, fin=i == len(pieces) - 1, rsv1=i == 0)
        for i, piece in enumerate(pieces)
    )
    whole = frame(BINARY, bomb, rsv1=True)

    async def bomber(wire: bytes):
        reader, writer, head = await open_ws(server, "permessage-deflate; client_max_window_bits")
        if b"permessage-deflate" not in head.lower():
            raise AssertionError("the server did not accept permessage-deflate")
        start = time.monotonic()
        writer.write(wire)
        code = await read_close_code(reader, 10)
        writer.close()
        # 1009 once inflating passes max_payload; 1013 when the compressed bytes of the
        # bombs in flight together pass the loop's partial_message_budget first.
        if code not in (1009, 1013):
            raise AssertionError(f"a deflate bomb closed with {code}, not 1009 or 1013")
        return since(start)

    times = await rounds(lambda: gather_all([bomber(whole) for _ in range(4)] + [bomber(fragmented) for _ in range(4)]))
    return Outcome(dropped=max(map(max, times)), connections=8, detail=f"{len(times)} rounds")


# ---------------------------------------------------------------------------------------------
# Malformed and smuggling-shaped HTTP


SMUGGLED = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def http_cases(server: Server) -> dict[str, tuple[bytes, list[int]]]:
    """Each case: the bytes sent, and the statuses expected in order before the server closes
    (0: any 4xx). The smuggling-shaped requests are a GET /healthz (answered 200 and kept
    alive when read as valid) whose body, by one reading of its framing, is a second GET
    /healthz: it must be refused with a 4xx and the connection closed, so that the smuggled
    request is never answered."""
    host = f"{server.host}:{server.port}".encode()
    get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    return {
        "Content-Length 34\\xff": (get + b"Content-Length: 34\xff\r\n\r\n" + SMUGGLED, [400]),
        "Transfer-Encoding chunked\\xff": (
            get + b"Transfer-Encoding: chunked\xff\r\n\r\n" + SMUGGLED, [0]),
        "conflicting Content-Length": (get + b"Content-Length: 0\r\nContent-Length: 34\r\n\r\n" + SMUGGLED, [400]),
        "duplicate Content-Length": (get + b"Content-Length: 34\r\nContent-Length: 34\r\n\r\n" + SMUGGLED, [400]),
        "Content-Length list": (get + b"Content-Length: 34, 0\r\n\r\n" + SMUGGLED, [400]),
        "Content-Length and Transfer-Encoding": (
            get + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, [0]),
        "absolute-form target": (
            b"GET http://" + host + b"/healthz HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n", [200]),
        "head over 8 KiB": (get + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", [431]),
        "100 header fields": (get + b"X-A: b\r\n" * 100 + b"\r\n", [431]),
        "pipelined junk": (SMUGGLED + b"\x00\x01\x02junk \xff\r\n\r\n" + SMUGGLED, [200, 400]),
    }


def statuses_match(statuses: list[int], expected: list[int]) -> bool:
    return len(statuses) == len(expected) and all(
        s == e or (e == 0 and 400 <= s < 500) for s, e in zip(statuses, expected))


STATUS_LINE = b"HTTP/1.1 "
# How long a connection may stay open after the answers it expects.
HTTP_CLOSE_DEADLINE = 3.0


async def http_exchange(server: Server, request: bytes, endless: bool = False) -> tuple[list[int], float | None]:
    """Send `request` and read until the server closes: the statuses it answered, and when it
    closed (None if it was still open after HTTP_CLOSE_DEADLINE). With `endless`, header lines
    keep following the request (a head that never ends) until the server stops reading."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    start = time.monotonic()
    writer.write(request)

    async def endless_head():
        try:
            while True:
                writer.write(b"X-More: " + b"m" * 1000 + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0)
        except ConnectionError:
            pass

    streamer = asyncio.create_task(endless_head()) if endless else None
    received, closed = b"", None
    try:
        async with asyncio.timeout(HTTP_CLOSE_DEADLINE):
            try:
                while chunk := await reader.read(65536):
                    received += chunk
            except ConnectionError:
                pass
            closed = since(start)
    except TimeoutError:
        pass
    finally:
        if streamer:
            streamer.cancel()
        writer.close()
    statuses = [int(part[:3]) for part in received.split(STATUS_LINE)[1:]]
    return statuses, closed


@attack(bound=Bound())
async def malformed_http(server: Server) -> Outcome:
    """Smuggling-shaped and malformed requests, 5 connections each: a non-UTF-8 Content-Length
    (400) or Transfer-Encoding (4xx), conflicting, duplicate and listed Content-Length (400),
    Content-Length with Transfer-Encoding (4xx), each with a smuggled request that must never
    be answered; an absolute-form target (served by its path); a head over 8 KiB and one with
    100 fields (431); junk pipelined after a valid request (200, then 400); and heads that never
    end, streamed as fast as the server reads (431). Every connection must then be closed."""
    cases = {**http_cases(server), "endless head": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", [431])}
    failures, times = {}, []

    async def run(name, request, expected):
        statuses, closed = await http_exchange(server, request, endless=name == "endless head")
        if closed is not None:
            times.append(closed)
        if not statuses_match(statuses, expected) or closed is None:
            open_note = f"still open {HTTP_CLOSE_DEADLINE:.0f}s later" if closed is None else "closed"
            failures[name] = f"{name}: answered {statuses}, {open_note}; expected {expected} and close"

    await rounds(lambda: gather_all([run(name, *case) for name, case in cases.items() for _ in range(5)]))
    if failures:
        raise AssertionError("; ".join(failures.values()))
    return Outcome(dropped=max(times), connections=len(cases) * 5)


# ---------------------------------------------------------------------------------------------
# Garbage frames


GARBAGE_CONNECTIONS = 2000


@attack(targets=("echo",), limits=Limits(nofile=4096), bound=Bound(per_loop=("partial_message_budget",)))
async def garbage(server: Server) -> Outcome:
    """2000 connections upgrade properly, then send 1 KiB of random bytes (seeded: the same run
    every time). The server must close every one (a protocol error, or a timeout for random
    bytes that happen to start a valid frame) within the message or idle timeout."""
    rng = random.Random(6455)
    blobs = [rng.randbytes(1024) for _ in range(GARBAGE_CONNECTIONS)]
    deadline = max(server.limits.idle_timeout, server.limits.message_timeout) + TIMER_SLACK + 2
    opened = asyncio.Semaphore(200)

    async def garbler(blob):
        async with opened:
            reader, writer, _ = await open_ws(server)
        start = time.monotonic()
        writer.write(blob)
        try:
            return await dropped_by(reader, start, deadline, "garbage")
        finally:
            writer.close()

    results = await rounds(lambda: gather_all(garbler(b) for b in blobs))
    times = sorted(t for result in results for t in result)
    return Outcome(dropped=times[-1], connections=GARBAGE_CONNECTIONS,
                   detail=f"{len(results)} rounds; median {times[len(times) // 2]:.2f}s, last {times[-1]:.2f}s")


# ---------------------------------------------------------------------------------------------
# SIGTERM under load


LOADED_CLIENTS = 50
# The connections with half a request head get a lingering close (the server shuts down its
# side and waits 2 s, 8 ticks, for the peer's end), which the clients answering their close at
# once do not: the server must be gone within that and the timer slack.
LINGER = 2.0
SHUTDOWN_DEADLINE = LINGER + TIMER_SLACK


@attack(expects_exit=True)
async def sigterm(server: Server) -> Outcome:
    """50 clients sending and reading as fast as they can (gale serve: publishing to their own
    topics), and 20 connections with half a request head, when SIGTERM comes. The server must
    exit with code 0 within SHUTDOWN_DEADLINE (well inside its 5 s shutdown timeout), every
    client having been sent close 1001."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    ready = 0

    async def loaded(n):
        nonlocal ready
        ws = await connect(server.url, open_timeout=5, ping_interval=None, close_timeout=1, max_size=None)
        topic = f"chat:load-{n}"
        if server.kind == "serve":
            await ws.send(json.dumps({"id": 0, "op": "subscribe", "topic": topic}))
            await ws.recv()
        ready += 1
        i = 0
        try:
            while True:
                i += 1
                if server.kind == "echo":
                    await ws.send(f"load {n} {i}" * 20)
                    await ws.recv()
                else:
                    await ws.send(json.dumps({"id": i, "op": "publish", "topic": topic, "data": i}))
                    await ws.recv()  # the reply and the delivery, in either order
                    await ws.recv()
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None

    heads = []
    for _ in range(20):
        s = socket.create_connection((server.host, server.port))
        s.sendall(upgrade_request(server)[:40])
        heads.append(s)
    clients = [asyncio.create_task(loaded(n)) for n in range(LOADED_CLIENTS)]
    async with asyncio.timeout(10):
        while ready < LOADED_CLIENTS:
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)
    start = time.monotonic()
    server.terminate()
    try:
        code = await asyncio.to_thread(server.proc.wait, 10)
    except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
        raise AssertionError("the server did not exit within 10 s of SIGTERM") from None
    exited = since(start)
    codes = await asyncio.gather(*clients, return_exceptions=True)
    for s in heads:
        s.close()
    problems = []
    if code != 0:
        problems.append(f"exit code {code}")
    if exited > SHUTDOWN_DEADLINE:
        problems.append(f"exited {exited:.2f}s after SIGTERM, over {SHUTDOWN_DEADLINE}s")
    not_1001 = [c for c in codes if c != 1001]
    if not_1001:
        problems.append(f"{len(not_1001)} clients were not sent close 1001 (got {not_1001[:3]})")
    if problems:
        raise AssertionError("; ".join(problems))
    return Outcome(dropped=exited, connections=LOADED_CLIENTS + 20, detail=f"exit code {code}")


# ---------------------------------------------------------------------------------------------


def main() -> int:
    backend = os.environ.get("GALE_BACKEND", "auto")
    wanted = sys.argv[1:]
    unknown = set(wanted) - {a.name for a in ATTACKS}
    if unknown:
        print(f"unknown attack(s) {sorted(unknown)}; attacks: {[a.name for a in ATTACKS]}", file=sys.stderr)
        return 2
    rows = []
    suite_start = time.monotonic()
    prober = Prober()
    try:
        for a in ATTACKS:
            if wanted and a.name not in wanted:
                continue
            for kind in a.targets:
                row = run_attack(a, kind, backend, prober)
                status = "ok" if not row.failures else "FAILED: " + " | ".join(row.failures)
                print(f"{a.name} against gale {kind} ({backend}): {status}", flush=True)
                rows.append(row)
    finally:
        prober.close()
    print_table(backend, rows)
    failed = [r for r in rows if r.failures]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} passed in {since(suite_start):.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
