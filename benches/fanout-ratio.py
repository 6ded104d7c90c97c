#!/usr/bin/env python3
"""Server CPU per delivery of every server in a `gale-loadgen compare --scenario fanout` JSON
report, as a Markdown table with its ratio to each reference server named on the command line.
A reference written NAME@PART is compared only with the servers whose names contain PART (and
itself), e.g. `raw-tcp-2@-2-` for the servers on two event loops; the others show "-".

Usage: benches/fanout-ratio.py REPORT.json REFERENCE[@PART] [REFERENCE[@PART]...]
"""
import json
import sys


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    report = json.load(open(sys.argv[1]))
    refs = [(arg.partition("@")[0], arg.partition("@")[2]) for arg in sys.argv[2:]]
    print("| subscribers × publishes/s | server | deliveries/s | p99 µs | server CPU ms / 1k deliveries | "
          + " | ".join(f"× {r}" for r, _ in refs) + " |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(refs))
    for case in report["cases"]:
        by_name = {s["server"]: s for s in case["summaries"]}
        title = f"{case['connections']:,} × {case['rate']}"
        for s in case["summaries"]:
            cpu = s["cpu_ms_per_1k"]
            ratios = []
            for r, part in refs:
                ref = by_name.get(r, {}).get("cpu_ms_per_1k")
                applies = part in s["server"] or s["server"] == r
                ratios.append(f"{cpu / ref:.2f}" if cpu and ref and applies else "-")
            lost = " (errors)" if s["errors"] else ""
            print(f"| {title} | {s['server']}{lost} | {s['rate']:,.0f} | {s['latency_us']['p99']:,} | "
                  + (f"{cpu:.2f}" if cpu else "-") + " | " + " | ".join(ratios) + " |")
            title = ""
    return 0


if __name__ == "__main__":
    sys.exit(main())
