"""The 14B disk-held packed export (``gpu_big.py --part big``'s last row; ``--shape``, ``--format``: another;
``--as-calibrated``: the curve's layout, the weights ModelOpt's calibration copied into RAM kept; ``--table CONFIG``:
the tables' layout of ``--shape`` calibrated with that ModelOpt config, ``--resident``: all of it on the GPU;
``--ct PRESET``: the compressed-tensors table's 4B model, exported with ``format="compressed-tensors"``) at several
versions of offload_export, interleaved in one process on one calibrated model (odd rounds in the given order, even
rounds reversed).

Each DIR holds an ``offload_export`` package (``git archive REV offload_export | tar -x -C DIR``); the package is
imported afresh from each before its export. Seconds, TTFB, x floor per version to ``$OUT/versions_h200.json``
(written after every export); no export is started after ``--budget`` seconds. ``--sample``: each thread's innermost
frame and innermost frame of offload_export, counted every 5 ms during the first round (``--sample-round``: another),
over the whole export (``stacks``) and before its first byte (``stacks_before_first_byte``; the main thread's samples
in time order: ``main_before_first_byte``). Each row also holds the disk's busy fraction before and after the first
byte (:func:`gpu_big.timed`) and the collector's passes (``gc``); with ``--sample``, ``stalls``: where the sampler
could not run for 100 ms or more, with each thread's stack before and after, and ``timelines``: the lane's (main),
reader's, writer's (staging) and I/O thread's samples over the whole export as runs of one stack, and ``cpu``: per
thread name, the seconds its threads were seen, spent on a CPU and waiting for one (``/proc/self/task/*/schedstat``,
read every 25 ms; the rest they slept: the GIL, a lock, the disk, the GPU). Every row holds the process's CPU seconds
(``process_cpu_s``) and the fraction of the machine's cores busy (``machine_busy``) during the export
(:func:`gpu_big.timed`). ``--disk`` adds the
disk's timeline (``disk``: per 100 ms, MB written to the disk and the fraction of the time it had a request in flight).
``--floor-each`` measures the floor again before each round (a ``floor`` row) and adds each export's ratio to it
(``x_round_floor``): the disk's own rate drifts over minutes on the lent machines. At the end, the versions paired
round by round (``versions_table.py``).

Usage (GPU machine, modelopt installed):
    python benchmarks/gpu_versions.py [--shape 4b --table NVFP4_DEFAULT_CFG] [--rounds 2] [--sample] DIR [DIR ...]
"""

import argparse
import collections
import contextlib
import gc
import importlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from gpu_big import ct_model, disk_held_model, floor_rates, floor_s, table_model, timed
from versions_table import table


def load(folder: str):
    """``offload_export`` as found in ``folder``, with every submodule imported from there."""
    for name in [n for n in sys.modules if n == "offload_export" or n.startswith("offload_export.")]:
        del sys.modules[name]
    sys.path.insert(0, folder)
    try:
        module = importlib.import_module("offload_export")
        module.save_clean  # the package's lazy names resolve while the folder leads sys.path
    finally:
        sys.path.remove(folder)
    return module


class Sampler:
    """Every 5 ms, each thread's innermost frame and innermost offload_export frame, with the time, per thread name."""

    def __enter__(self):
        self.samples: list[tuple[float, str, str]] = []
        self.sched: dict[int, tuple] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        names, tick = {}, 0
        while not self._stop.wait(0.005):
            now = time.perf_counter()
            live = threading.enumerate()
            names.update({t.ident: t.name.split("_")[0] for t in live})
            tick += 1
            if tick % 5 == 0:
                self._sched_read(live)
            for ident, frame in sys._current_frames().items():
                if ident == threading.get_ident():
                    continue
                inner, ours = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}", None
                f = frame
                while f is not None and ours is None:
                    if "offload_export" in f.f_code.co_filename:
                        ours = f"{Path(f.f_code.co_filename).name}:{f.f_code.co_name}:{f.f_lineno}"
                    f = f.f_back
                self.samples.append((now, names.get(ident, str(ident)), f"{ours} | {inner}"))
            frame = f = None  # a frame kept until the next sample would keep its tensors alive (a higher host peak)

    def _sched_read(self, live) -> None:
        """Each live thread's ``/proc/self/task/<tid>/schedstat`` (ns on a CPU, ns waiting for one), first and last
        seen, by native thread id."""
        for t in live:
            try:
                run, wait, _ = map(int, Path(f"/proc/self/task/{t.native_id}/schedstat").read_text().split())
            except (OSError, ValueError, TypeError):
                continue
            first = self.sched.get(t.native_id, (t.name.split("_")[0], time.perf_counter(), run, wait))[:4]
            self.sched[t.native_id] = (*first, time.perf_counter(), run, wait)

    def cpu(self) -> dict:
        """Per thread name, over the span each thread was seen: seconds seen, on a CPU, waiting for a CPU
        (the rest it slept: a lock, a queue, the disk, the GPU)."""
        out: dict[str, list] = {}
        for name, t0, run0, wait0, t1, run1, wait1 in self.sched.values():
            row = out.setdefault(name, [0.0, 0.0, 0.0, 0])
            row[0] += t1 - t0
            row[1] += (run1 - run0) / 1e9
            row[2] += (wait1 - wait0) / 1e9
            row[3] += 1
        return {name: {"seen_s": round(a, 3), "on_cpu_s": round(b, 3), "runqueue_s": round(c, 3), "threads": n}
                for name, (a, b, c, n) in out.items()}

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def top(self, n: int = 20, since: float = 0.0, until: float = float("inf")) -> dict:
        """The ``n`` commonest stacks of each thread sampled more than 20 times between ``since`` and ``until``
        (perf_counter)."""
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for t, name, key in self.samples:
            if since <= t < until:
                counts[name][key] += 1
        return {name: c.most_common(n) for name, c in counts.items() if sum(c.values()) > 20}

    def stalls(self, since: float, until: float, min_ms: float = 100.0) -> list:
        """Where the sampler itself could not run for ``min_ms`` or more (another thread held the GIL, or the
        process stood still): ``[start ms, end ms, {thread: [stack before, stack after]}]``."""
        ticks: dict[float, dict[str, str]] = {}
        for t, name, key in self.samples:
            if since <= t < until:
                ticks.setdefault(t, {})[name] = key
        times, out = sorted(ticks), []
        for a, b in zip(times, times[1:]):
            if (b - a) * 1000 >= min_ms:
                threads = {n: [ticks[a].get(n), ticks[b].get(n)] for n in {*ticks[a], *ticks[b]}}
                out.append([round((a - since) * 1000, 1), round((b - since) * 1000, 1), threads])
        return out

    def timeline(self, thread: str, since: float, until: float) -> list:
        """``thread``'s samples between ``since`` and ``until`` as runs of one stack: ``[start ms, end ms, stack]``
        (the gaps between samples show where the sampler waited for the GIL)."""
        runs: list = []
        for t, name, key in self.samples:
            if name != thread or not since <= t < until:
                continue
            ms = round((t - since) * 1000, 1)
            if runs and runs[-1][2] == key:
                runs[-1][1] = ms
            else:
                runs.append([ms, ms, key])
        return runs


class GcPauses:
    """The cyclic collector's passes while open (``gc.callbacks``): their total and those of 20 ms or more (start ms,
    generation, ms, objects collected), and its state when opened (objects frozen, counts, generation 2's size)."""

    def __enter__(self):
        self.passes: list[tuple[float, int, float, int]] = []  # (start, generation, seconds, objects collected)
        self.at_start = {"frozen": gc.get_freeze_count(), "counts": gc.get_count(),
                         "generation_2": len(gc.get_objects(generation=2))}
        self._start = 0.0
        gc.callbacks.append(self._callback)
        return self

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.passes.append((self._start, info["generation"], time.perf_counter() - self._start,
                                info["collected"]))

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def summary(self, since: float) -> dict:
        """The passes from ``since`` (the export's start; not the benchmark's own ``gc.collect()`` before it)."""
        passes = [p for p in self.passes if p[0] >= since]
        return {"total_ms": round(sum(s for _, _, s, _ in passes) * 1000, 1), "at_start": self.at_start,
                "over_20ms": [[round((t - since) * 1000, 1), g, round(s * 1000, 1), n] for t, g, s, n in passes
                              if s >= 0.02]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--shape", default="14b")
    parser.add_argument("--table", default=None, metavar="CONFIG",
                        help="the table layout (gpu_big.table_model) calibrated with this ModelOpt config instead")
    parser.add_argument("--ct", default=None, metavar="PRESET",
                        help="the compressed-tensors table's model (gpu_big.ct_model) with this preset instead")
    parser.add_argument("--format", default="modelopt", help="save_clean's format (fake-quant: the NVFP4 fold)")
    parser.add_argument("--resident", action="store_true",
                        help="with --table: the whole model on the GPU (the resident twin's layout)")
    parser.add_argument("--as-calibrated", action="store_true",
                        help="keep the weights ModelOpt's calibration copied into RAM (the curve's layout)")
    parser.add_argument("--budget", type=float, default=540)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sample", action="store_true", help="count each thread's stacks (5 ms) in one round")
    parser.add_argument("--sample-round", type=int, default=0, help="the round --sample counts (0: the first)")
    parser.add_argument("--disk", action="store_true", help="keep the disk's timeline (per 100 ms) in each row")
    parser.add_argument("--floor-each", action="store_true",
                        help="measure the floor again before each round (the disk's rate drifts): x_round_floor")
    args = parser.parse_args()
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp())
    if args.ct:
        model, rates, read, summary = ct_model(work, args.ct)
        args.format = "compressed-tensors"
    elif args.table:
        model, rates, read, summary = table_model(work, args.shape, args.table,
                                                  {0: "60GiB", "cpu": "8GiB"} if args.resident else None)
    else:
        model, rates, read, summary = disk_held_model(work, args.shape, drop=not args.as_calibrated)
    out = {"floor_rates": rates, "layout": summary, "setup_s": round(time.perf_counter() - start, 1), "rows": []}
    print("setup", out["setup_s"], rates, flush=True)
    for rnd, order in enumerate(args.dirs[::-1] if r % 2 else args.dirs for r in range(args.rounds)):
        if args.floor_each and time.perf_counter() - start <= args.budget:
            round_rates = floor_rates(work / "src", work)
            out["rows"].append({"version": "floor", "round": rnd, **round_rates})
            print(json.dumps(out["rows"][-1]), flush=True)
        for folder in order:
            if time.perf_counter() - start > args.budget:
                break
            oe = load(folder)
            row = {"version": Path(folder).name, "round": rnd}
            sampler = Sampler() if args.sample and rnd == args.sample_round else contextlib.nullcontext()
            started = []

            def export(oe=oe):
                started.append(time.perf_counter())  # timed()'s start, to the microsecond
                oe.save_clean(model, work / "o", format=args.format)

            try:
                with sampler, GcPauses() as pauses:
                    row.update(timed(export, work / "o"))
                row["gc"] = pauses.summary(started[0])
                if not args.disk:
                    del row["disk"]
                if args.sample and rnd == args.sample_round:
                    row["stacks"] = sampler.top(since=started[0])
                    if row["ttfb_s"] is not None:
                        first_byte = started[0] + row["ttfb_s"]
                        row["stacks_before_first_byte"] = sampler.top(since=started[0], until=first_byte)
                        row["main_before_first_byte"] = sampler.timeline("MainThread", started[0], first_byte)
                    row["stalls"] = sampler.stalls(started[0], float("inf"))
                    row["cpu"] = sampler.cpu()
                    row["timelines"] = {name: sampler.timeline(name, started[0], float("inf")) for name in
                                        ("MainThread", "offload-export-reader", "offload-export-writer",
                                         "offload-export-io")}
                row["x_floor"] = round(row["s"] / floor_s(rates, read, row["written_GB"]), 2)
                if args.floor_each:
                    row["x_round_floor"] = round(row["s"] / floor_s(round_rates, read, row["written_GB"]), 2)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            shutil.rmtree(work / "o", ignore_errors=True)
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            (Path(os.environ.get("OUT", ".")) / "versions_h200.json").write_text(json.dumps(out, indent=1))
    if args.rounds > 1:
        print(table(out), flush=True)


if __name__ == "__main__":
    main()
