"""What resume's in-memory digest costs a GPU export: ``format="modelopt"`` with and without it, interleaved.

Qwen3-4B shape in ``gpu_big``'s table layout (GPU 2 GiB + CPU 3 GiB, ``device_map="auto"``), ModelOpt FP8 and
NVFP4, two rounds of (with, without); "without" replaces ``resume.memory_digest`` by one that records nothing
(the export then cannot be resumed). Seconds per export to ``$OUT/digest_ab_h200.json``.

Usage (GPU machine, modelopt installed): python benchmarks/gpu_digest_ab.py
"""

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from gpu_big import TABLE_MEMORY, auto_offloaded, timed
from gpu_packed_check import build_checkpoint, calib_loop, config
import modelopt.torch.quantization as mtq

import offload_export as oe
from offload_export import resume as R

work = Path(tempfile.mkdtemp())
build_checkpoint(work / "src", config("4b", None))
real = R.memory_digest
out = {}
for cfg in ("FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"):
    model = auto_offloaded(work / "src", work, TABLE_MEMORY["4b"])
    mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg)), calib_loop())
    for rep in range(2):
        for label in ("digest", "no_digest"):
            R.memory_digest = real if label == "digest" else (lambda *a, **k: None)
            row = timed(lambda: oe.save_clean(model, work / "o", format="modelopt"), work / "o")
            shutil.rmtree(work / "o")
            out.setdefault(f"{cfg} {label}", []).append(row["s"])
            print(cfg, label, row, flush=True)
    model = None
    torch.cuda.empty_cache()
R.memory_digest = real
print(json.dumps(out))
(Path(os.environ.get("OUT", ".")) / "digest_ab_h200.json").write_text(json.dumps(out, indent=1))
