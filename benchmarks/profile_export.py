"""Where an export's time goes: wall and CPU seconds per stage and thread, for one offloaded model.

    python benchmarks/profile_export.py [--size qwen3-0.6b] [--scheme int8] [--verify] [--cprofile]

Builds (once, cached under benchmarks/out/profile-<size>/src) the same checkpoint as bench_export.py,
reloads it fully disk-offloaded, optionally fake-quantizes it, warms the page cache, then runs
``save_clean`` (and ``verify``) with timers around the stages: read (reader thread), fold/cast
(calling thread), write (write-behind thread), fsync. A stage's wall time is summed over its calls; the
calling thread's "waiting" is the export's wall time minus its own stages.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_export as bench  # noqa: E402

TIMES: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # wall, thread cpu, calls


def timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        w, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            cell = TIMES[f"{name} [{threading.current_thread().name.split('_')[0]}]"]
            cell[0] += time.perf_counter() - w
            cell[1] += time.thread_time() - c
            cell[2] += 1
    return wrapper


def instrument() -> None:
    import offload_export
    from offload_export import writer

    pipeline = sys.modules.get("offload_export.pipeline") or __import__("offload_export.pipeline", fromlist=["x"])
    for cls_name, meth in (("UnitReader", "read"), ("UnitReader", "finish"), ("UnitReader", "fold")):
        cls = getattr(pipeline, cls_name, None)
        if cls is not None and hasattr(cls, meth):
            setattr(cls, meth, timed(f"{cls_name}.{meth}", getattr(cls, meth)))
    writer.ShardWriter.write = timed("ShardWriter.write", writer.ShardWriter.write)
    writer.ShardWriter.copy = timed("ShardWriter.copy", writer.ShardWriter.copy)
    verify = __import__("offload_export.verify", fromlist=["x"])
    for name in ("_compare", "_check_model_files", "_read_entries"):
        if hasattr(verify, name):
            setattr(verify, name, timed(f"verify.{name}", getattr(verify, name)))
    os.fsync = timed("os.fsync", os.fsync)
    del offload_export


def report(total: float) -> None:
    print(f"{'stage [thread]':55s} {'wall s':>8s} {'cpu s':>8s} {'calls':>6s}")
    for name, (w, c, n) in sorted(TIMES.items(), key=lambda kv: -kv[1][0]):
        print(f"{name:55s} {w:8.2f} {c:8.2f} {n:6d}")
    print(f"{'total wall':55s} {total:8.2f}")
    TIMES.clear()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="qwen3-0.6b")
    p.add_argument("--scheme", default="none")
    p.add_argument("--verify", action="store_true")
    p.add_argument("--cprofile", action="store_true", help="also cProfile the calling thread")
    args = p.parse_args()
    import offload_export

    work = Path("benchmarks/out") / f"profile-{args.size}"
    if not (work / "src" / "config.json").exists():
        bench.build_checkpoint(args.size, work / "src")
    out = work / "export"
    bench.shutil.rmtree(out, ignore_errors=True)
    model = bench.load_offloaded(work / "src", work / f"offload-{os.getpid()}", args.scheme)
    paths = bench.source_files(model)
    bench.prepare_page_cache(paths, cold=False)
    instrument()
    prof = cProfile.Profile() if args.cprofile else None
    print(f"load {os.getloadavg()[0]:.1f}, torch threads {__import__('torch').get_num_threads()}")
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    report_ = offload_export.save_clean(model, out)
    if prof:
        prof.disable()
    total = time.perf_counter() - t0
    print(report_)
    report(total)
    if prof:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    if args.verify:
        t0 = time.perf_counter()
        r = offload_export.verify(model, out)
        total = time.perf_counter() - t0
        print(r)
        report(total)
    bench.shutil.rmtree(out, ignore_errors=True)
    bench.shutil.rmtree(work / f"offload-{os.getpid()}", ignore_errors=True)


if __name__ == "__main__":
    main()
