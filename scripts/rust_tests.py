#!/usr/bin/env python3
"""Runs the workspace's Rust test binaries once per configuration, several at a time.

`cargo test` runs one test binary after another, and most of Gale's binaries spend their time
waiting on sockets and timers (one full run: 61 s of wall time for 15 s of CPU). Running the
binaries of every configuration side by side keeps both cores busy instead.

Usage: rust_tests.py [--jobs N] CONFIG... -- CARGO_TEST_ARGS...
  CONFIG is NAME[:VAR=VALUE,...][:TARGET,...]: a label, the environment of its run, and
  optionally the only test targets (integration test files by name) it runs; without targets
  it runs every test binary. CARGO_TEST_ARGS select the packages, as for `cargo test`.

Example: rust_tests.py uring:GALE_BACKEND=uring epoll:GALE_BACKEND=epoll -- --workspace

Prints one line per finished binary, the whole output of any that failed, the slowest
binaries, and exits non-zero if one failed. No retries: a flaky test is a bug to fix.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

# A test binary that runs longer than this is stuck; it is killed and counted as failed.
BINARY_TIMEOUT_S = 600


@dataclass
class Config:
    """One run of the test binaries: its label, extra environment and optional target filter."""

    name: str
    env: dict = field(default_factory=dict)
    targets: set | None = None


@dataclass
class Binary:
    """A test executable as cargo reported it."""

    package: str
    label: str
    path: str
    package_dir: str
    kind: str
    target: str


def parse_config(text):
    parts = text.split(":")
    if not parts[0] or len(parts) > 3:
        raise ValueError(f"configuration {text!r}: expected NAME[:VAR=VALUE,...][:TARGET,...]")
    env = {}
    if len(parts) > 1 and parts[1]:
        for pair in parts[1].split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"configuration {text!r}: {pair!r} is not VAR=VALUE")
            env[key] = value
    targets = set(parts[2].split(",")) if len(parts) > 2 and parts[2] else None
    return Config(parts[0], env, targets)


def list_binaries(cargo_args):
    """Builds the test binaries (a no-op when fresh) and returns them in cargo's order."""
    command = ["cargo", "test", *cargo_args, "--no-run", "--message-format=json-render-diagnostics"]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"rust_tests: `{' '.join(command)}` failed (exit {result.returncode})")
    binaries = []
    for line in result.stdout.splitlines():
        message = json.loads(line)
        if message.get("reason") != "compiler-artifact" or not message.get("executable"):
            continue
        if not message["profile"]["test"]:
            continue
        target = message["target"]
        package_dir = str(Path(message["manifest_path"]).parent)
        package = Path(package_dir).name
        kind = target["kind"][0]
        label = f"{package} {'unit' if kind in ('lib', 'bin') else kind} {target['name']}"
        binaries.append(Binary(package, label, message["executable"], package_dir, kind, target["name"]))
    return binaries


def run_binary(binary, config):
    env = dict(os.environ, CARGO_MANIFEST_DIR=binary.package_dir, **config.env)
    start = time.monotonic()
    try:
        result = subprocess.run(
            [binary.path], cwd=binary.package_dir, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", timeout=BINARY_TIMEOUT_S)
        output, code = result.stdout, result.returncode
    except subprocess.TimeoutExpired as timeout:
        output = (timeout.output or "") + f"\n(killed after {BINARY_TIMEOUT_S} s)\n"
        code = -1
    return output, code, time.monotonic() - start


def summary_of(output):
    for line in reversed(output.splitlines()):
        if line.startswith("test result:"):
            return line.removeprefix("test result: ").split(";")[0] + ";" + line.split(";")[1]
    return "no test result line"


def main():
    argv = sys.argv[1:]
    cargo_args = []
    if "--" in argv:
        cut = argv.index("--")
        argv, cargo_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2 * (os.cpu_count() or 1))
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    try:
        configs = [parse_config(text) for text in args.configs]
    except ValueError as error:
        parser.error(str(error))

    binaries = list_binaries(cargo_args)
    known = {b.target for b in binaries if b.kind == "test"}
    for config in configs:
        unknown = (config.targets or set()) - known
        if unknown:
            sys.exit(f"rust_tests: configuration {config.name}: no test target {', '.join(sorted(unknown))}")
    jobs = [(b, c) for c in configs for b in binaries if c.targets is None or b.target in c.targets]
    print(f"rust_tests: {len(jobs)} runs of {len(binaries)} test binaries, {args.jobs} at a time",
          flush=True)

    start = time.monotonic()
    failed, durations = [], []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        pending = {pool.submit(run_binary, b, c): (b, c) for b, c in jobs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                binary, config = pending.pop(future)
                output, code, seconds = future.result()
                durations.append((seconds, config.name, binary.label))
                status = "ok" if code == 0 else "FAILED"
                print(f"{status:6} {config.name:8} {binary.label:42} {seconds:6.1f} s  {summary_of(output)}",
                      flush=True)
                if code != 0:
                    failed.append((config.name, binary.label))
                    print(f"----- output of {binary.label} ({config.name}, exit {code}) -----")
                    print(output.rstrip())
                    print("-----", flush=True)

    print("\nslowest:")
    for seconds, name, label in sorted(durations, reverse=True)[:5]:
        print(f"  {seconds:6.1f} s  {name:8} {label}")
    elapsed = time.monotonic() - start
    if failed:
        print(f"\nrust_tests: {len(failed)} of {len(jobs)} runs FAILED in {elapsed:.0f} s:")
        for name, label in failed:
            print(f"  {name} {label}")
        sys.exit(1)
    print(f"\nrust_tests: {len(jobs)} runs passed in {elapsed:.0f} s")


if __name__ == "__main__":
    main()
