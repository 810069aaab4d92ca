"""Where a packed export of an offloaded model spends its time on the GPU machine: cProfile of one export.

Per case (Qwen3-4B / Qwen3-MoE shape, ``gpu_big``'s table layout, ModelOpt NVFP4 or FP8): one export timed
(seconds, time to first byte), then one under cProfile; the profile's top functions (cumulative and own time)
go to ``$OUT/profile_<shape>_<config>.txt``. ``--torch``: under ``torch.profiler`` (CPU and CUDA; every thread where
torch can) instead: per thread, the time its torch ops ran and the gaps between them (its Python and its waits for the GIL), the host calls
that wait for the GPU (synchronize, blocking copies), the GPU's busy fraction (kernels and copies, merged), and the
ops' own times, to ``$OUT/torch_profile_<shape>_<config>_<format>.{txt,json}``.

Usage (GPU machine, modelopt installed): python benchmarks/profile_gpu.py --cases 4b:NVFP4_DEFAULT_CFG,moe:NVFP4_DEFAULT_CFG,4b:NVFP4_DEFAULT_CFG:fake-quant
"""

from __future__ import annotations

import argparse
import collections
import copy
import cProfile
import io
import json
import os
import pstats
import shutil
import tempfile
from pathlib import Path

import torch
from gpu_big import TABLE_MEMORY, auto_offloaded, timed
from gpu_packed_check import build_checkpoint, calib_loop, config

import offload_export as oe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="4b:NVFP4_DEFAULT_CFG,moe:NVFP4_DEFAULT_CFG")
    ap.add_argument("--format", default="modelopt")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--top", type=int, default=60)
    ap.add_argument("--torch", action="store_true", help="torch.profiler instead of cProfile")
    args = ap.parse_args()
    import modelopt.torch.quantization as mtq

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    built: dict[str, Path] = {}
    for case in args.cases.split(","):
        shape, cfg_name, fmt = (case.split(":") + [args.format])[:3]
        if shape not in built:
            built[shape] = Path(tempfile.mkdtemp(prefix=f"prof_{shape}_"))
            build_checkpoint(built[shape] / "src", config(shape, None))
        work = built[shape]
        model = auto_offloaded(work / "src", work, TABLE_MEMORY[shape])
        mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), calib_loop())
        row = timed(lambda: oe.save_clean(model, work / "a", format=fmt), work / "a")
        shutil.rmtree(work / "a")
        if args.torch:
            torch_profile(lambda: oe.save_clean(model, work / "b", format=fmt), out / f"torch_profile_{shape}_{cfg_name}_{fmt}",
                          args.top)
        else:
            prof = cProfile.Profile()
            prof.enable()
            oe.save_clean(model, work / "b", format=fmt)
            torch.cuda.synchronize()
            prof.disable()
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text)
            stats.sort_stats("cumulative").print_stats(args.top)
            stats.sort_stats("tottime").print_stats(args.top // 2)
            (out / f"profile_{shape}_{cfg_name}_{fmt}.txt").write_text(text.getvalue())
        shutil.rmtree(work / "b")
        print(case, fmt, row, flush=True)
        model = None  # noqa: F841
        torch.cuda.empty_cache()
    for path in built.values():
        shutil.rmtree(path, ignore_errors=True)


def _merged(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``intervals``."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def torch_profile(fn, stem: Path, top: int) -> None:
    """Run ``fn`` under ``torch.profiler`` and write what it shows to ``stem``.txt (tables) and ``stem``.json (numbers)."""
    from torch.profiler import ProfilerActivity, profile

    try:  # every thread's ops (the read-ahead's, the writer's), where this torch can; else the calling thread's only
        from torch._C._profiler import _ExperimentalConfig
        config = {"experimental_config": _ExperimentalConfig(profile_all_threads=True)}
    except (ImportError, TypeError):
        config = {}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], **config) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    start = min(e.time_range.start for e in events)
    wall = max(e.time_range.end for e in events) - start
    gpu = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    threads: dict[int, dict] = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        row = threads.setdefault(e.thread, {"ops": [], "runtime": collections.Counter(), "calls": collections.Counter(),
                                            "names": collections.Counter()})
        if e.name.startswith("cuda"):  # the CUDA runtime's calls (launches, copies, synchronizations)
            row["runtime"][e.name] += e.time_range.end - e.time_range.start
            row["calls"][e.name] += 1
        else:
            row["ops"].append((e.time_range.start, e.time_range.end))
            row["names"][e.name] += e.self_cpu_time_total
    summary = {"wall_ms": round(wall / 1e3, 1), "gpu_busy_ms": round(_merged(gpu) / 1e3, 1), "threads": {}}
    for tid, row in threads.items():
        ops = row["ops"]
        busy = _merged(ops)
        span = (max(b for _, b in ops) - min(a for a, _ in ops)) if ops else 0.0
        # the profiler numbers threads in the order they first ran an op: their busiest ops tell which is which
        summary["threads"][str(tid)] = {"top_ops": [name for name, _ in row["names"].most_common(4)],"ops": len(ops), "op_ms": round(busy / 1e3, 1), "span_ms": round(span / 1e3, 1),
                                        "between_ops_ms": round((span - busy) / 1e3, 1),
                                        "cuda_calls": {name: [row["calls"][name], round(us / 1e3, 1)]
                                                       for name, us in row["runtime"].most_common(6)}}
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    averages = prof.key_averages()
    text = json.dumps(summary, indent=1) + "\n\n"
    text += averages.table(sort_by="self_cpu_time_total", row_limit=top) + "\n\n"
    text += averages.table(sort_by="self_device_time_total", row_limit=top // 2) + "\n"
    stem.with_suffix(".txt").write_text(text)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
