"""The versions of a ``gpu_versions.py`` run side by side, paired round by round.

    python benchmarks/versions_table.py results/gpu_versions_h100_run39a_4b_nvfp4_copy_stream.json [...]

The lent machines differ between calls and drift within one (the disk's rate, the host's speed: the time to first
byte of one process varied 0.24-0.70 s in README run 39), so versions are compared round by round: each round runs
every version once, interleaved. Per version, over the rounds after the first (round 0 is the process's first export):
seconds, seconds after the first byte, the ratio to the round's floor, the disk's busy fraction after the first byte,
and against the first version given: the median of the paired differences and in how many rounds it was faster.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def table(result: dict) -> str:
    """A markdown table of ``result`` (``gpu_versions.py``'s JSON)."""
    versions = list(dict.fromkeys(r["version"] for r in result["rows"] if r["version"] != "floor"))  # as given
    rows = [r for r in result["rows"] if r["version"] != "floor" and "error" not in r and r["round"] > 0]
    by = {(r["version"], r["round"]): r for r in rows}
    lines = ["| version | rounds | s (median) | after the first byte s | x round floor (mean) | disk busy after | "
             f"vs {versions[0]}: median paired s, faster in |", "|---|---|---|---|---|---|---|"]
    for v in versions:
        mine = sorted((r for r in rows if r["version"] == v), key=lambda r: r["round"])
        if not mine:
            continue
        after = [r["s"] - (r["ttfb_s"] or 0) for r in mine]
        ratios = [r["x_round_floor"] for r in mine if r.get("x_round_floor") is not None]
        busy = [r["disk_busy_after_first_byte"] for r in mine if r.get("disk_busy_after_first_byte") is not None]
        pairs = [(r["s"], by[versions[0], r["round"]]["s"]) for r in mine if (versions[0], r["round"]) in by]
        paired = "-" if v == versions[0] or not pairs else (
            f"{statistics.median(a - b for a, b in pairs):+.2f}, {sum(a < b for a, b in pairs)} of {len(pairs)}")
        seconds = [r["s"] for r in mine]
        lines.append(f"| {v} | {len(mine)} | {' / '.join(f'{s:.2f}' for s in seconds)} "
                     f"({statistics.median(seconds):.2f}) | {statistics.median(after):.2f} | "
                     + (f"{statistics.mean(ratios):.2f}" if ratios else "-") + " | "
                     + (f"{statistics.median(busy):.2f}" if busy else "-")
                     + f" | {paired} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path)
    for path in parser.parse_args().results:
        print(f"{path.name}\n{table(json.loads(path.read_text()))}\n")


if __name__ == "__main__":
    main()
