"""Where a packed export of an offloaded model spends its time on the GPU machine: cProfile of one export.

Per case (Qwen3-4B / Qwen3-MoE shape, ``gpu_big``'s table layout, ModelOpt NVFP4 or FP8): one export timed
(seconds, time to first byte), then one under cProfile; the profile's top functions (cumulative and own time)
go to ``$OUT/profile_<shape>_<config>.txt``.

Usage (GPU machine, modelopt installed): python benchmarks/profile_gpu.py --cases 4b:NVFP4_DEFAULT_CFG,moe:NVFP4_DEFAULT_CFG,4b:NVFP4_DEFAULT_CFG:fake-quant
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
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
        prof = cProfile.Profile()
        prof.enable()
        oe.save_clean(model, work / "b", format=fmt)
        torch.cuda.synchronize()
        prof.disable()
        shutil.rmtree(work / "b")
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("cumulative").print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top // 2)
        (out / f"profile_{shape}_{cfg_name}_{fmt}.txt").write_text(text.getvalue())
        print(case, fmt, row, flush=True)
        model = None  # noqa: F841
        torch.cuda.empty_cache()
    for path in built.values():
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
