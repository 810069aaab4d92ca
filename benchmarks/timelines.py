"""Where each export thread spent its time, from the sampled rounds of ``gpu_versions.py --sample`` results.

    python benchmarks/timelines.py RESULTS.json [--top 8]

For every sampled row (version, round): per thread (the packing lane, the read-ahead, the writer staging, the I/O
thread), the milliseconds spent in each stack (innermost offload_export frame | innermost frame) after the first byte,
largest first, and the main thread's stages before it (``main_before_first_byte``, in time order, runs of one stack
merged).
"""

from __future__ import annotations

import argparse
import collections
import json

_SAMPLE_MS = 5.3  # the sampler's period as measured (5 ms and its own cost)


def after_first_byte(row: dict) -> dict[str, collections.Counter]:
    """Per thread: milliseconds per stack from the first byte on (a run's length plus one sample period)."""
    start = row["ttfb_s"] * 1000
    out = {}
    for thread, runs in row["timelines"].items():
        out[thread] = collections.Counter()
        for a, b, stack in runs:
            if a >= start:
                out[thread][stack] += b - a + _SAMPLE_MS
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    rows = json.load(open(args.results))["rows"]
    for row in (r for r in rows if "timelines" in r):
        print(f"== {row['version']}, round {row['round']}: {row['s']} s, first byte {row['ttfb_s']} s")
        for thread, stacks in after_first_byte(row).items():
            print(f"  {thread}: {sum(stacks.values()):.0f} ms after the first byte")
            for stack, ms in stacks.most_common(args.top):
                print(f"    {ms:7.0f}  {stack}")
        print("  main thread before the first byte (ms from the start):")
        for a, b, stack in row.get("main_before_first_byte", []):
            print(f"    {a:7.1f}-{b:7.1f}  {stack}")


if __name__ == "__main__":
    main()
