"""The attack suite's harness: a fresh `gale echo` or `gale serve` per attack, started with
small limits and a low descriptor limit; its memory, CPU and descriptors sampled from /proc; a
normal client probing it from a separate process while the attack runs; the checks every
attack must pass; and the raw WebSocket pieces the attacks are made of.

A separate process probes so that an attacker busy in this process's event loop never delays
a probe: a late echo is the server's fault, not the suite's.
"""

import asyncio
import base64
import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from gale_process import START_TIMEOUT, backend_args, gale_bin, output_dir, read_ready_line  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
LOG_DIR = output_dir("attack")

KIB = 1024
MIB = 1024 * KIB

# A normal client must connect and get its echo within this, during and after every attack.
PROBE_DEADLINE = 1.0
# Time between two probes while an attack runs.
PROBE_INTERVAL = 0.2
# After an attack, how long the server may take to release every attacker's descriptor.
RECOVERY_TIMEOUT = 5.0
# Once recovered and idle, the server may use at most this much CPU over IDLE_WINDOW: more
# means a loop spins on something the attack left behind.
IDLE_WINDOW = 0.3
IDLE_CPU_MAX = 0.05
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Nice value added to the server and the prober (negative: sooner), when permitted.
PRIORITY = -10


# The smallest max_backpressure gale serve accepts is about 1.34 MiB (see Limits.for_server).
GATEWAY_MIN_BACKPRESSURE = 3 * MIB // 2


@dataclass(frozen=True)
class Limits:
    """The configuration a server is started with; the memory bounds are computed from it."""

    loops: int = 2
    max_payload: int = 64 * KIB
    max_backpressure: int = 64 * KIB
    backpressure_timeout: int = 1
    message_timeout: int = 1
    partial_message_budget: int = 256 * KIB
    idle_timeout: int = 4
    # Descriptors the server process may hold (RLIMIT_NOFILE).
    nofile: int = 1024
    compression: str = "shared"
    # gale serve: bytes of message history kept over all topics (history.total_bytes).
    history_bytes: int = 512 * KIB

    def with_(self, **changes) -> "Limits":
        return replace(self, **changes)

    def for_server(self, kind: str) -> "Limits":
        """The limits a `kind` server runs with: gale serve needs max_backpressure to hold its
        largest delivery (an HTTP publish of 1 MiB, in base64 and JSON: about 1.34 MiB)."""
        if kind == "serve":
            return self.with_(max_backpressure=max(self.max_backpressure, GATEWAY_MIN_BACKPRESSURE))
        return self

    def receive_buffers(self, backend: str) -> int:
        """Bytes of receive buffers one loop may have resident (ServerConfig defaults): 32
        provided buffers of 64 KiB on io_uring, one 512 KiB buffer on epoll."""
        return 32 * 64 * KIB if backend == "uring" else 512 * KIB

    def one_receive(self, backend: str) -> int:
        """Most bytes one read hands a connection before the server can stop reading it: the
        loop's receive buffer on epoll; on io_uring one batch of receive completions, which can
        be the whole ring of provided buffers (the multishot receive is cancelled only with the
        next submission)."""
        return 32 * 64 * KIB if backend == "uring" else 512 * KIB


# Each limit: `gale echo` flag, `gale serve` section and key, and the Limits field.
LIMIT_SETTINGS = [
    ("--max-payload", "websocket", "max_payload", "max_payload"),
    ("--idle-timeout", "websocket", "idle_timeout", "idle_timeout"),
    ("--compression", "websocket", "compression", "compression"),
    ("--max-backpressure", "websocket", "max_backpressure", "max_backpressure"),
    ("--backpressure-timeout", "websocket", "backpressure_timeout", "backpressure_timeout"),
    ("--message-timeout", "websocket", "message_timeout", "message_timeout"),
    ("--partial-message-budget", "server", "partial_message_budget", "partial_message_budget"),
]

_supported: dict[str, set[str]] = {}


def supported_settings(kind: str) -> set[str]:
    """The limits this `gale` binary knows: the flags `gale echo --help` lists, or the keys
    `gale serve --print-config` prints. A limit it lacks is left out of the command line (the
    attack that needs it then fails on its own checks) and named once on stderr."""
    if kind not in _supported:
        if kind == "echo":
            text = subprocess.run([str(gale_bin()), "echo", "--help"], capture_output=True, text=True).stdout
            known = {flag for flag, *_ in LIMIT_SETTINGS if re.search(rf"{flag}\b", text)}
        else:
            text = subprocess.run([str(gale_bin()), "serve", "--print-config"], capture_output=True, text=True).stdout
            known = {key for _, _, key, _ in LIMIT_SETTINGS if re.search(rf"^{key}\s*=", text, re.M)}
        missing = [name for flag, _, key, _ in LIMIT_SETTINGS if (name := flag if kind == "echo" else key) not in known]
        if missing:
            print(f"note: gale {kind} does not know {', '.join(missing)}; started without", file=sys.stderr)
        _supported[kind] = known
    return _supported[kind]


def echo_command(limits: Limits) -> list[str]:
    known = supported_settings("echo")
    args = ["echo", "--port", "0", "--threads", str(limits.loops), *backend_args()]
    for flag, _, _, attr in LIMIT_SETTINGS:
        if flag in known:
            args += [flag, str(getattr(limits, attr))]
    return args


def serve_command(limits: Limits, config_path: Path) -> list[str]:
    """`gale serve` with a configuration file holding the limits. Client publishes are not
    rate limited, so a client can make the gateway send as fast as an echo server would."""
    known = supported_settings("serve")
    sections: dict[str, dict[str, object]] = {
        "server": {},
        "websocket": {"ping_interval": 0, "backpressure": "close"},
        "limits": {"client_publish_rate": 1e6, "client_publish_burst": 1_000_000},
        "history": {"topic_bytes": min(limits.max_payload, limits.history_bytes), "total_bytes": limits.history_bytes},
    }
    for _, section, key, attr in LIMIT_SETTINGS:
        if key in known:
            sections[section][key] = getattr(limits, attr)
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    config_path.write_text("\n".join(lines) + "\n")
    return ["serve", "--listen", "127.0.0.1:0", "--threads", str(limits.loops), *backend_args(),
            "--config", str(config_path)]


def raise_priority() -> None:
    """Run before other work on the machine (builds), where allowed: the probes time the
    server, not a machine whose cores are taken by something else."""
    try:
        os.nice(PRIORITY)
    except PermissionError:
        pass


class Server:
    """One gale process under a descriptor limit; stopped by its own PID only."""

    def __init__(self, kind: str, limits: Limits, name: str):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.kind, self.limits = kind, limits
        self.log_path = LOG_DIR / f"{name}.log"
        command = echo_command(limits) if kind == "echo" else serve_command(limits, LOG_DIR / f"{name}.toml")
        nofile = limits.nofile

        def lower_descriptor_limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            raise_priority()

        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([str(gale_bin()), *command], stdout=subprocess.PIPE, stderr=log,
                                         cwd=REPO_ROOT, preexec_fn=lower_descriptor_limit)
        self.pid = self.proc.pid
        # Descriptors open once started and probed; run_attack sets it.
        self.baseline_fds = 0
        self.host, self.port = self._read_address()
        self.path = "/" if kind == "echo" else "/ws"
        self.url = f"ws://{self.host}:{self.port}{self.path}"

    def _read_address(self):
        match = read_ready_line(self.proc, self.kind, self.log_path, self.kill)
        return match.group(2), int(match.group(3))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def memory(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes."""
        fields = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value, _unit = line.split()
                    fields[name] = int(value) * KIB
        return fields["VmRSS:"], fields["VmHWM:"]

    def cpu_seconds(self) -> float:
        """User plus system time of every thread so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
        return (int(after_name[11]) + int(after_name[12])) / CLOCK_TICKS

    def terminate(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        self.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc.stdout.close()


class Sampler(threading.Thread):
    """Samples the server's resident memory and descriptor count every 20 ms."""

    def __init__(self, server: Server):
        super().__init__(daemon=True)
        self.server = server
        self.peak_rss = 0
        self.peak_fds = 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set() and self.server.alive():
            try:
                self.peak_rss = max(self.peak_rss, self.server.memory()[0])
                self.peak_fds = max(self.peak_fds, self.server.fds())
            except (FileNotFoundError, ProcessLookupError):
                break
            self.done.wait(0.02)

    def stop(self):
        self.done.set()
        self.join()


# ---------------------------------------------------------------------------------------------
# The normal client.


async def probe_once(kind: str, url: str, token: str) -> float:
    """Connect, send one message and get its answer (the echo, or the gateway's reply to a
    `ping` command); returns the seconds it took. Raises past PROBE_DEADLINE."""
    from websockets.asyncio.client import connect

    start = time.monotonic()
    async with asyncio.timeout(PROBE_DEADLINE):
        ws = await connect(url, open_timeout=None, ping_interval=None, close_timeout=0.2, compression=None)
        if kind == "echo":
            await ws.send(token)
            answer = await ws.recv()
            if answer != token:
                raise AssertionError(f"echo {answer!r} is not {token!r}")
        else:
            await ws.send(json.dumps({"id": token, "op": "ping"}))
            reply = json.loads(await ws.recv())
            if reply.get("id") != token or reply.get("ok") is not True:
                raise AssertionError(f"unexpected reply {reply}")
    elapsed = time.monotonic() - start
    try:
        async with asyncio.timeout(PROBE_DEADLINE):
            await ws.close()
    except TimeoutError:
        pass
    return elapsed


class Prober:
    """A child process that probes a server every PROBE_INTERVAL between `start` and `stop`.
    It lives for the whole suite (Python and websockets take a while to load). Protocol: it
    reads `probe KIND URL` or `pause` lines; it prints one line per probe (`ok SECONDS` or
    `fail SECONDS WHY`) and `paused` once a pause is in effect."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__, "prober"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.results: list[tuple[bool, float, str]] = []
        self.probed = threading.Event()
        self.paused = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.strip() == "paused":
                self.paused.set()
                continue
            status, seconds, *why = line.split(maxsplit=2)
            self.results.append((status == "ok", float(seconds), why[0].strip() if why else ""))
            self.probed.set()

    def _send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def start(self, kind: str, url: str) -> None:
        """Probe `url`; returns once the first probe is done (its result is not kept)."""
        self.probed.clear()
        self._send(f"probe {kind} {url}")
        if not self.probed.wait(START_TIMEOUT):
            raise RuntimeError("the prober never reported")
        self.results = []

    def stop(self) -> list[tuple[bool, float, str]]:
        """Stop probing; the results since `start`."""
        self.paused.clear()
        self._send("pause")
        if not self.paused.wait(START_TIMEOUT):
            raise RuntimeError("the prober did not pause")
        return self.results

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def prober_main() -> None:
    """The prober process (see Prober)."""
    # Set by the thread reading commands: what to probe (None: nothing), a pause to confirm,
    # the end of the input.
    state = {"target": None, "ack": False, "eof": False}

    def read_commands():
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["probe"]:
                state["target"] = words[1:]
            else:
                state["target"], state["ack"] = None, True
        state["target"], state["eof"] = None, True

    async def loop():
        n = 0
        while True:
            target = state["target"]
            if target is None:
                if state["ack"]:
                    state["ack"] = False
                    print("paused", flush=True)
                if state["eof"]:
                    return
                await asyncio.sleep(0.02)
                continue
            kind, url = target
            n += 1
            start = time.monotonic()
            try:
                line = f"ok {await probe_once(kind, url, f'probe-{n}'):.4f}"
            except Exception as e:  # noqa: BLE001 - every failure is reported the same way
                line = f"fail {time.monotonic() - start:.4f} {type(e).__name__}: {e}".replace("\n", " ")
            if state["target"] is target:  # a probe that straddles a pause belongs to no attack
                print(line, flush=True)
            await asyncio.sleep(PROBE_INTERVAL)

    raise_priority()
    threading.Thread(target=read_commands, daemon=True).start()
    asyncio.run(loop())


# ---------------------------------------------------------------------------------------------
# Running one attack against one server, with the checks every attack passes.


@dataclass
class Outcome:
    """What an attack reports: when its last attacking connection was dropped by the server
    (seconds after the attack began; None where the server is not meant to drop it) and the
    connections it held at most, for the memory bound."""

    dropped: float | None = None
    connections: int = 0
    detail: str = ""


@dataclass
class Row:
    """One line of the figures table."""

    attack: str
    target: str
    peak_rss: int = 0
    bound: int = 0
    cpu: float = 0.0
    dropped: float | None = None
    wall: float = 0.0
    probes: int = 0
    worst_probe: float = 0.0
    detail: str = ""
    failures: list[str] = field(default_factory=list)


class Check:
    """Collects failed checks instead of stopping at the first, so one run shows them all."""

    def __init__(self, row: Row):
        self.row = row

    def __call__(self, ok: bool, message: str) -> None:
        if not ok:
            self.row.failures.append(message)


def run_attack(attack, kind: str, backend: str, prober: Prober) -> Row:
    """Start a fresh server, run `attack` against it while sampling and probing, then check:
    alive, every probe answered within PROBE_DEADLINE during and after, peak RSS (VmHWM) under
    the attack's bound, descriptors back to their baseline, and no CPU used once idle."""
    row = Row(attack.name, kind)
    check = Check(row)
    limits = attack.limits.for_server(kind)
    try:
        server = Server(kind, limits, f"{attack.name}-{kind}-{backend}")
    except RuntimeError as e:
        check(False, str(e))
        return row
    try:
        asyncio.run(probe_once(kind, server.url, "warm-up"))
        time.sleep(0.05)
        base_rss = server.memory()[0]
        baseline_fds = server.baseline_fds = server.fds()
        cpu_before = server.cpu_seconds()
        sampler = Sampler(server)
        sampler.start()
        prober.start(kind, server.url)
        start = time.monotonic()
        try:
            outcome = asyncio.run(attack.run(server))
        except Exception as e:  # noqa: BLE001 - an attack's own assertion or error is a failed check
            outcome = Outcome()
            check(False, f"{type(e).__name__}: {e}")
        row.wall = time.monotonic() - start
        row.dropped = outcome.dropped
        row.detail = outcome.detail
        probes = prober.stop()
        if attack.expects_exit:
            sampler.stop()
            row.peak_rss = sampler.peak_rss
            return row
        check(server.alive(), f"the server died (exit {server.proc.returncode})")
        if not server.alive():
            return row
        row.cpu = server.cpu_seconds() - cpu_before
        row.probes = len(probes)
        row.worst_probe = max((seconds for _, seconds, _ in probes), default=0.0)
        failed = [f"{seconds:.2f}s {why}" for ok, seconds, why in probes if not ok]
        check(not failed, f"{len(failed)} of {len(probes)} probes failed during the attack: {failed[:3]}")
        check(len(probes) >= 2, f"only {len(probes)} probes ran during the attack")
        try:
            asyncio.run(probe_once(kind, server.url, "after"))
        except Exception as e:  # noqa: BLE001
            check(False, f"probe after the attack failed: {type(e).__name__}: {e}")
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while server.fds() > baseline_fds and time.monotonic() < deadline:
            time.sleep(0.05)
        fds = server.fds()
        check(fds <= baseline_fds, f"{fds} descriptors open {RECOVERY_TIMEOUT:.0f}s after the attack; "
                                    f"{baseline_fds} before it")
        idle_from = server.cpu_seconds()
        time.sleep(IDLE_WINDOW)
        idle_cpu = server.cpu_seconds() - idle_from
        check(idle_cpu <= IDLE_CPU_MAX, f"{idle_cpu:.2f}s of CPU in {IDLE_WINDOW}s once idle: a loop spins")
        sampler.stop()
        row.peak_rss = server.memory()[1]
        row.bound = attack.bound(base_rss, limits, kind, backend, outcome.connections)
        check(row.peak_rss <= row.bound, f"peak RSS {row.peak_rss / MIB:.1f} MiB over the bound "
                                         f"{row.bound / MIB:.1f} MiB ({attack.bound_formula})")
        if attack.max_cpu is not None:
            check(row.cpu <= attack.max_cpu(row.wall),
                  f"{row.cpu:.2f}s of CPU over {row.wall:.1f}s of attack: more than {attack.max_cpu(row.wall):.2f}s")
        return row
    finally:
        server.stop()


def print_table(backend: str, rows: list[Row]) -> None:
    header = ("attack", "target", "peak RSS", "bound", "CPU s", "dropped after", "wall s", "probes (worst)", "result",
              "detail")
    lines = [header]
    for r in rows:
        lines.append((
            r.attack, r.target,
            f"{r.peak_rss / MIB:.1f} MiB" if r.peak_rss else "-",
            f"{r.bound / MIB:.1f} MiB" if r.bound else "-",
            f"{r.cpu:.2f}",
            f"{r.dropped:.2f} s" if r.dropped is not None else "-",
            f"{r.wall:.1f}",
            f"{r.probes} ({r.worst_probe * 1000:.0f} ms)",
            "ok" if not r.failures else "FAILED",
            r.detail,
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    print(f"\nAttack suite, backend {backend}:")
    for n, line in enumerate(lines):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


# ---------------------------------------------------------------------------------------------
# Raw WebSocket pieces for attackers, which send what no library would.


def upgrade_request(server: Server, extensions: str | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    head = (f"GET {server.path} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n")
    if extensions:
        head += f"Sec-WebSocket-Extensions: {extensions}\r\n"
    return (head + "\r\n").encode()


async def open_ws(server: Server, extensions: str | None = None, receive_buffer: int | None = None):
    """A raw upgraded connection: (reader, writer, response head). `receive_buffer` shrinks the
    socket's receive buffer (and so the window the server may fill) before connecting."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(upgrade_request(server, extensions))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        writer.close()
        raise AssertionError(f"upgrade refused: {head[:60]!r}")
    return reader, writer, head


TEXT, BINARY, CONTINUATION, CLOSE, PING = 0x1, 0x2, 0x0, 0x8, 0x9
MASK = b"\x11\x22\x33\x44"


def frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv1: bool = False, length: int | None = None) -> bytes:
    """A masked client frame. `length` announces a different payload length than sent (for
    frames cut short)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    return head + MASK + mask(payload)


def mask(payload: bytes) -> bytes:
    key = (MASK * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(len(payload), "big")


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""
    first, second = await reader.readexactly(2)
    n = second & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first & 0x0F, await reader.readexactly(n)


async def read_close_code(reader: asyncio.StreamReader, timeout: float) -> int | None:
    """Read server frames until its close frame (its code) or the end of the connection (None).
    Raises TimeoutError if the server keeps it open past `timeout`."""
    async with asyncio.timeout(timeout):
        try:
            while True:
                opcode, payload = await read_frame(reader)
                if opcode == CLOSE:
                    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        except (asyncio.IncompleteReadError, ConnectionError):
            return None


async def until_closed(reader: asyncio.StreamReader, timeout: float) -> None:
    """Discard what the server sends until it ends the connection; TimeoutError past `timeout`."""
    async with asyncio.timeout(timeout):
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass


if __name__ == "__main__" and sys.argv[1:2] == ["prober"]:
    prober_main()
