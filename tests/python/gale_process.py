"""Start and stop a `gale echo` or `gale serve` process for the Python client suites.

The binary comes from $GALE_BIN (default: target/debug/gale under the repo root).
It listens on --port 0, so the real address is read from the one line it prints on
stdout. It is stopped by its own PID only: other engineers' servers on this machine
are never touched.
"""

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def output_dir(suite: str) -> Path:
    """Where a suite's logs and other outputs go: target/test-output/SUITE/LANE.

    The lane keeps runs side by side apart (the test command runs the backends, and the load
    generator's test classes, at the same time): GALE_TEST_LANE if set, else the backend.
    """
    lane = os.environ.get("GALE_TEST_LANE") or os.environ.get("GALE_BACKEND") or "auto"
    return REPO_ROOT / "target" / "test-output" / suite / lane


LOG_DIR = output_dir("python")
READY_LINE = re.compile(r"^gale (?:echo|serve) listening on (wss?://([^\s/]+):(\d+))\S* \(")

# Generous: the machine is shared with concurrent builds, and a debug binary starts slowly.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def read_ready_line(proc: subprocess.Popen, what: str, log_path, kill) -> re.Match:
    """The first line a starting gale prints on stdout, matched by READY_LINE (url, host,
    port); if none comes within START_TIMEOUT, `kill()` and raise naming `log_path`."""
    # readline() blocks, so it runs in a thread that the timeout can give up on.
    result = {}
    reader = threading.Thread(target=lambda: result.update(line=proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT)
    line = result.get("line", b"").decode("utf-8", "replace").strip()
    match = READY_LINE.match(line)
    if not match:
        kill()
        raise RuntimeError(f"gale {what} did not report its address (got {line!r}); see {log_path}")
    return match


def gale_bin() -> Path:
    path = Path(os.environ.get("GALE_BIN", "target/debug/gale"))
    return path if path.is_absolute() else REPO_ROOT / path


def backend_args():
    """`--backend X` from GALE_BACKEND (epoll, uring or auto); the test command runs the suites
    once per backend."""
    backend = os.environ.get("GALE_BACKEND")
    return ["--backend", backend] if backend else []


class GaleEcho:
    """One `gale echo` process; `url` is its ws:// base, `http_url` the same as http://."""

    COMMAND = ["echo", "--port", "0"]

    def __init__(self, name: str, *extra_args: str, env=None):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        # stderr (tracing logs) goes to a file so a failure can be investigated afterwards
        # without cluttering the test output.
        self.log_path = LOG_DIR / f"gale-{name}.log"
        args = [str(gale_bin()), *self.COMMAND, "--threads", "2", *backend_args(), *extra_args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=log, cwd=REPO_ROOT, env={**os.environ, **(env or {})}
            )
        self.url, self.host, self.port = self._read_address()
        scheme = "https" if self.url.startswith("wss://") else "http"
        self.http_url = f"{scheme}://{self.host}:{self.port}"

    def _read_address(self):
        match = read_ready_line(self.proc, self.COMMAND[0], self.log_path, self.kill)
        return match.group(1), match.group(2), int(match.group(3))

    def terminate(self) -> None:
        """Send SIGTERM (graceful shutdown: every WebSocket gets close 1001)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """Graceful stop, falling back to SIGKILL so a hung server never outlives the suite."""
        self.terminate()
        try:
            self.wait()
        except subprocess.TimeoutExpired:
            self.kill()
        finally:
            self.proc.stdout.close()


class GaleServe(GaleEcho):
    """One `gale serve` process (the gateway) on a free port; `url` is its ws:// base."""

    COMMAND = ["serve", "--listen", "127.0.0.1:0"]


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for localhost and 127.0.0.1 (openssl), and its key."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         # A leaf, not a CA: rustls-based clients (gale-loadgen) refuse a CA as end entity.
         "-addext", "basicConstraints=critical,CA:FALSE"],
        check=True, capture_output=True,
    )
    return cert, key


def shard(tests, by_class=True):
    """The part of a unittest suite this process runs: GALE_TEST_SHARD=I/N keeps the test
    classes (or, with `by_class=False`, the single tests) whose position is I modulo N, so that
    N processes run the whole suite side by side. Without the variable, all of it. For a
    module's `load_tests(loader, tests, pattern)`."""
    import unittest

    spec = os.environ.get("GALE_TEST_SHARD")
    if not spec:
        return tests
    index, _, count = spec.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise SystemExit(f"GALE_TEST_SHARD={spec!r}: expected I/N with 0 <= I < N")
    def single(suite):
        for test in suite:
            yield from single(test) if isinstance(test, unittest.TestSuite) else [test]

    parts = [suite for suite in tests if suite.countTestCases()] if by_class else list(single(tests))
    return unittest.TestSuite(p for i, p in enumerate(parts) if i % int(count) == int(index))
