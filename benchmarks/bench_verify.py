"""verify x export, this checkout's ``verify`` against another commit's, interleaved in one process.

    python benchmarks/bench_verify.py --schemes none,int8,int4-g128,fp8,nvfp4 --before 121b769 --repeats 3

(121b769: the verify before the prefetch / one-thread compare work.)

For each scheme: reload the checkpoint fully disk-offloaded (as ``bench_export.py`` does), fake-quantize,
then ``repeats`` rounds of: warm the sources, ``save_clean``, ``os.sync()``, one ``verify`` — this
checkout's ("after") and ``--before``'s ``offload_export/verify.py`` ("before", loaded from git beside it,
on the same job / pipeline code), alternating, so each verify runs right after its own export, as in
``bench_export.py``. A verify's ratio is to the export right before it; the 1-minute load average is
recorded before each export. Prints one row per (scheme, variant): median export and verify seconds,
median and range of the ratio (``--cold``: the sources and the checkpoint are dropped from the page
cache before each verify), the median ratio of CPU seconds (all threads of the process: steadier than
wall time on a shared machine, but blind to the kernel's writeback threads, so it flatters the export),
max load. ``--device cuda`` exports and verifies with ``device=``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_export as bench  # noqa: E402


def load_before(ref: str):
    """``ref``'s ``offload_export/verify.py``, loaded as ``offload_export._verify_before`` (this checkout's package)."""
    source = subprocess.run(["git", "show", f"{ref}:offload_export/verify.py"], check=True, capture_output=True,
                            text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-verify-")) / "verify_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("offload_export._verify_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    shutil.rmtree(path.parent)
    return module


def bench_scheme(scheme: str, args: argparse.Namespace, variants: dict) -> list[dict]:
    import offload_export

    work = Path(args.work) / f"verify-{args.size}"
    if not (work / "src" / "config.json").exists():
        bench.build_checkpoint(args.size, work / "src")
    offload, out = work / f"offload-{os.getpid()}", work / "export"
    model = bench.load_offloaded(work / "src", offload, scheme)
    paths = bench.source_files(model)
    rows = []
    try:
        names = list(variants)
        for r in range(args.repeats):
            for name in names[r % 2:] + names[:r % 2]:  # alternate which goes first
                bench.shutil.rmtree(out, ignore_errors=True)
                bench.prepare_page_cache(paths, cold=False)
                load = os.getloadavg()[0]
                t0, c0 = time.perf_counter(), time.process_time()
                offload_export.save_clean(model, out, device=args.device)
                export_s, export_cpu = time.perf_counter() - t0, time.process_time() - c0
                os.sync()
                if args.cold:  # verify later: neither the sources nor the checkpoint in the page cache
                    bench.prepare_page_cache(paths + [str(f) for f in out.glob("*.safetensors")], cold=True)
                t0, c0 = time.perf_counter(), time.process_time()
                report = variants[name].verify(model, out, device=args.device)
                verify_s, verify_cpu = time.perf_counter() - t0, time.process_time() - c0
                row = {"scheme": scheme, "variant": name, "export_s": export_s, "verify_s": verify_s,
                       "ratio": verify_s / export_s, "export_cpu": export_cpu, "verify_cpu": verify_cpu,
                       "cpu_ratio": verify_cpu / export_cpu, "ok": report.ok, "load": load}
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        bench.shutil.rmtree(out, ignore_errors=True)
        bench.shutil.rmtree(offload, ignore_errors=True)
        del model
        gc.collect()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="qwen3-0.6b")
    p.add_argument("--schemes", default="none,int8,int4-g128,fp8,nvfp4")
    p.add_argument("--before", default=None, help="git ref whose verify.py is the baseline (omit: after only)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--cold", action="store_true", help="drop the sources and the checkpoint from the page cache "
                                                       "before each verify")
    p.add_argument("--work", default="benchmarks/out")
    p.add_argument("--out", default=None, help="write every row as JSON here")
    args = p.parse_args()
    import offload_export

    variants = {"after": offload_export}
    if args.before:
        variants = {"before": load_before(args.before), **variants}
    rows = [row for scheme in args.schemes.split(",") for row in bench_scheme(scheme, args, variants)]
    print(f"\n{'scheme':10s} {'variant':8s} {'export s':>9s} {'verify s':>9s} {'ratio':>6s} {'(min-max)':>12s} "
          f"{'cpu ratio':>9s} {'max load':>8s} ok")
    for scheme in args.schemes.split(","):
        for name in variants:
            sel = [r for r in rows if r["scheme"] == scheme and r["variant"] == name]
            ratios = [r["ratio"] for r in sel]
            print(f"{scheme:10s} {name:8s} {statistics.median(r['export_s'] for r in sel):9.2f} "
                  f"{statistics.median(r['verify_s'] for r in sel):9.2f} {statistics.median(ratios):6.2f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) {statistics.median(r['cpu_ratio'] for r in sel):9.2f} "
                  f"{max(r['load'] for r in sel):8.2f} "
                  f"{all(r['ok'] for r in sel)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
