"""The Autobahn|Testsuite cases (run by kosoku, pinned in tests/python/requirements.txt)
against `gale echo`, once per backend.

For each backend it starts `$GALE_BIN echo --port 0` on 127.0.0.1, runs kosoku's
fuzzingclient on the selected cases, reads kosoku's report (index.json), prints one line of
counts per backend, and fails naming every case whose result is FAILED or NON-STRICT (or
missing from the report). INFORMATIONAL and UNIMPLEMENTED are reported, not failures.

Usage: python3 tests/autobahn/run.py [--cases GLOB ...] [--backends uring,epoll]
                                     [--out DIR] [--table]
Default cases: sections 1-7, 9, 10 (there is no 8); `--cases all` adds 12 and 13
(permessage-deflate).
--table prints a Markdown table of counts per section and backend (docs/CONFORMANCE.md).

kosoku 0.1.0 crashes in its 12.x/13.x cases when the server answers a compressed message of
16 to 256 bytes uncompressed, which `gale echo` does below its compression threshold (1 KiB
with shared compression): for those sections the server runs with --compress-min-size 0, so
that every message is compressed and the cases test what they mean to.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET_DIR = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
GALE_BIN = os.environ.get("GALE_BIN", os.path.join(TARGET_DIR, "debug/gale"))
RESULTS = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
# Sections 1-10 (the suite has no section 8).
DEFAULT_CASES = [f"{n}.*" for n in (1, 2, 3, 4, 5, 6, 7, 9, 10)]
# Every case: `--cases all`.
ALL_CASES = DEFAULT_CASES + ["12.*", "13.*"]


def start_gale(backend, extra, log_path):
    """Start `gale echo`; its output goes to `log_path` (a pipe nobody reads would fill and
    stall it). Returns the process and its address, read from the first line."""
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [GALE_BIN, "echo", "--port", "0", "--threads", "2", "--backend", backend, *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        match = re.search(r"ws://(127\.0\.0\.1:\d+)", Path(log_path).read_text())
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    sys.exit(f"gale echo --backend {backend} did not start: {Path(log_path).read_text()!r}")


def run_kosoku(addr, cases, out):
    args = ["kosoku", "-o", str(out), addr]
    for case in cases:
        args[1:1] = ["-i", case]
    # kosoku exits 1 when a case fails: the report says which, read it either way.
    done = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=3600)
    if not (out / "index.json").exists():
        sys.exit(f"kosoku wrote no report (exit {done.returncode}):\n{done.stdout}")
    index = json.loads((out / "index.json").read_text())
    (results,) = index.values()
    return results


def run_backend(backend, cases, out_dir):
    """Run `cases` against one backend; returns {case id: behavior}."""
    deflate = [c for c in cases if c.split(".")[0] in ("12", "13")]
    plain = [c for c in cases if c not in deflate]
    results = {}
    for group, extra in ((plain, []), (deflate, ["--compress-min-size", "0"])):
        if not group:
            continue
        name = f"{backend}{'-deflate' if extra else ''}"
        proc, addr = start_gale(backend, extra, out_dir / f"gale-{name}.log")
        try:
            out = out_dir / name
            for case, result in run_kosoku(addr, group, out).items():
                # A case passes when both its behaviour and its closing behaviour do.
                close = result.get("behaviorClose", "OK")
                behavior = result["behavior"]
                if behavior == "OK" and close not in ("OK", "INFORMATIONAL"):
                    behavior = close
                results[case] = behavior
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return results


def case_key(case):
    return [int(p) for p in case.split(".")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    ap.add_argument("--backends", default="uring,epoll")
    ap.add_argument("--out", help="report directory (default: a temporary one, removed)")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    if args.cases == ["all"]:
        args.cases = ALL_CASES
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="autobahn-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    bad = []
    by_backend = {}
    for backend in args.backends.split(","):
        start = time.monotonic()
        results = run_backend(backend, args.cases, out_dir)
        by_backend[backend] = results
        counts = Counter(results.values())
        summary = ", ".join(f"{counts[r]} {r}" for r in RESULTS if counts[r])
        print(f"autobahn {backend}: {len(results)} cases in {time.monotonic() - start:.1f} s: {summary}")
        bad += [f"{backend} {c}: {r}" for c, r in sorted(results.items(), key=lambda i: case_key(i[0]))
                if r in ("FAILED", "NON-STRICT")]
        if not results:
            bad.append(f"{backend}: no case ran")
    if args.table:
        print_table(by_backend)
    if not args.out:
        shutil.rmtree(out_dir)
    if bad:
        sys.exit("autobahn cases not OK:\n  " + "\n  ".join(bad))


def print_table(by_backend):
    backends = list(by_backend)
    sections = sorted({c.split(".")[0] for r in by_backend.values() for c in r}, key=int)
    head = ["Section"] + [f"{b}: {r}" for b in backends for r in ("cases",)] + [
        f"{b}: {r}" for b in backends for r in RESULTS]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for s in sections + ["all"]:
        row = [s]
        per = {}
        for b in backends:
            cases = {c: r for c, r in by_backend[b].items() if s == "all" or c.split(".")[0] == s}
            per[b] = Counter(cases.values())
            row.append(str(len(cases)))
        for b in backends:
            row += [str(per[b][r]) for r in RESULTS]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
