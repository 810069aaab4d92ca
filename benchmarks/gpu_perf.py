"""GPU throughput of ``save_clean`` against the disk floor, with where the time goes (issue 15's H100 targets).

Builds the Qwen3-4B shape (8.04 GB bf16, tied) on the GPU and saves it, measures the floor -- the best of
``copy_file_range``, ``shutil.copyfile`` (sendfile) and 4 MiB ``pread``/``pwrite`` of the checkpoint's
bytes, each + fsync, on the same filesystem -- then, for each layout and case, one child process loads
the model offloaded, quantizes it, and times ``save_clean`` with stage timers (reader, fold/pack, writer,
fsync; ``profile_export.instrument``), then ``verify`` of what it wrote. Fractions are output bytes per second over the floor's.

Layouts: ``gpu+cpu`` (``max_memory={0: "2GiB", "cpu": "64GiB"}``), ``gpu+cpu+disk`` (``{0: "2GiB",
"cpu": "3GiB"}`` + ``offload_folder``: the rest stays in the source safetensors).
Cases: ``builtin-nvfp4`` (``quantize_weights(scheme="nvfp4")``), ``modelopt-nvfp4`` (ModelOpt
``NVFP4_DEFAULT_CFG``, fake-quant export), ``modelopt-nvfp4-packed`` (the same, ``format="modelopt"``).

Usage (GPU machine): python benchmarks/gpu_perf.py --out $OUT [--layouts ...] [--cases ...]
    [--code DIR,...]   other checkouts' roots to time side by side (PYTHONPATH of the children)
    [--src DIR]        reuse / keep the built checkpoint there
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYOUTS = {"gpu+cpu": ({0: "2GiB", "cpu": "64GiB"}, False), "gpu+cpu+disk": ({0: "2GiB", "cpu": "3GiB"}, True)}
CASES = ("builtin-nvfp4", "modelopt-nvfp4", "modelopt-nvfp4-packed")


def floors(src: Path, work: Path) -> dict[str, float]:
    """GB/s of each floor method copying the checkpoint's safetensors files, each + fsync, then the directory."""
    sys.path.insert(0, str(HERE))
    import bench_export as bench

    paths = sorted(str(p) for p in src.glob("*.safetensors"))
    total = sum(os.path.getsize(p) for p in paths)
    out = {}
    for method in ("floor_copy_file_range", "floor_sendfile", "floor_pread"):
        dest = work / method
        os.sync()
        t = time.perf_counter()
        bench.io_floor(method, paths, dest)
        out[method] = round(total / 1e9 / (time.perf_counter() - t), 3)
        shutil.rmtree(dest)
    return out


def child(args: argparse.Namespace) -> None:
    """One layout x case: load, quantize, time save_clean with stage timers; print one JSON line."""
    import torch
    from transformers import AutoModelForCausalLM

    import offload_export as oe
    sys.path.insert(0, str(HERE))
    import profile_export as prof
    from gpu_packed_check import PeakRSS, calib_loop

    max_memory, disk = LAYOUTS[args.layout]
    work = Path(args.work)
    kwargs = {"offload_folder": str(work / "offload")} if disk else {}
    model = AutoModelForCausalLM.from_pretrained(args.src, device_map="auto", max_memory=max_memory,
                                                 dtype=torch.bfloat16, **kwargs)
    model.config.architectures = [type(model).__name__]
    if args.case == "builtin-nvfp4":
        oe.quantize_weights(model, scheme="nvfp4")
    else:
        import modelopt.torch.quantization as mtq
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, calib_loop())
    fmt = "modelopt" if args.case.endswith("-packed") else "fake-quant"
    prof.instrument()
    os.sync()
    torch.cuda.synchronize()
    with PeakRSS() as rss:
        t = time.perf_counter()
        report = oe.save_clean(model, work / "export", format=fmt)
        seconds = time.perf_counter() - t
    stages = {name: [round(w, 2), round(c, 2), n] for name, (w, c, n) in prof.TIMES.items()}
    t = time.perf_counter()
    verified = oe.verify(model, work / "export", format=fmt).ok
    verify_s = time.perf_counter() - t
    digest = hashlib.sha256()
    for shard in sorted((work / "export").glob("*.safetensors")):
        with open(shard, "rb") as f:
            while chunk := f.read(64 << 20):
                digest.update(chunk)
    print(json.dumps({"digest": digest.hexdigest()[:16], "verify_s": round(verify_s, 2), "verify_x_export": round(verify_s / seconds, 2),
                      "verified": verified, "layout": args.layout, "case": args.case, "code": args.code_label, "s": round(seconds, 2),
                      "bytes": report.bytes, "GBps": round(report.bytes / 1e9 / seconds, 3),
                      "host_peak_MB": rss.delta_mb, "gpu_peak_MB": round(torch.cuda.max_memory_allocated() / 2**20),
                      "summary": oe.layout(model).summary(), "stages": stages}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--code", default=str(HERE.parent), help="checkout roots, comma-separated, timed side by side")
    ap.add_argument("--src", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--code-label", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    import torch
    from gpu_packed_check import build_checkpoint, config

    work = Path(tempfile.mkdtemp(prefix="gpu_perf_"))
    src = Path(args.src) if args.src else work / "src"
    if not (src / "config.json").exists():
        build_checkpoint(src, config("4b", None))
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "checkpoint_GB": round(sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1e9, 2),
              "floors_GBps": floors(src, work), "rows": []}
    floor = max(result["floors_GBps"].values())
    print(json.dumps(result), flush=True)
    for layout in args.layouts.split(","):
        for case in args.cases.split(","):
            for code in args.code.split(","):
                run_dir = work / "run"
                run_dir.mkdir()
                env = dict(os.environ, PYTHONPATH=f"{code}:{HERE}")
                cmd = [sys.executable, str(HERE / "gpu_perf.py"), "--child", "--layout", layout, "--case", case,
                       "--src", str(src), "--work", str(run_dir), "--code-label", Path(code).name]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                row = json.loads(lines[-1]) if proc.returncode == 0 and lines else \
                    {"layout": layout, "case": case, "code": code, "error": proc.stderr[-1500:]}
                if "GBps" in row:
                    row["fraction_of_floor"] = round(row["GBps"] / floor, 3)
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(run_dir, ignore_errors=True)
    for layout in args.layouts.split(","):
        for case in args.cases.split(","):
            digests = {r.get("digest") for r in result["rows"] if r["layout"] == layout and r["case"] == case}
            print(f"{layout} {case}: {'same bytes from every checkout' if len(digests) == 1 else 'OUTPUTS DIFFER'}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_perf.json").write_text(json.dumps(result, indent=2))
    print(f"floor {floor} GB/s ({result['floors_GBps']})")
    print(f"{'layout':13} {'case':22} {'code':10} {'s':>6} {'GB/s':>6} {'x floor':>7} {'RSS/anon MB':>12} "
          f"{'verify x export':>15}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['layout']:13} {r['case']:22} ERROR {r['error'][-300:]}")
            continue
        print(f"{r['layout']:13} {r['case']:22} {r['code']:10} {r['s']:>6} {r['GBps']:>6} {r['fraction_of_floor']:>7} "
              f"{str(r['host_peak_MB']['VmRSS']) + '/' + str(r['host_peak_MB']['RssAnon']):>12} "
              f"{r['verify_x_export']:>15}{'' if r['verified'] else ' (MISMATCH)'}")
    if not args.src:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
