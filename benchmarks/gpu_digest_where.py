"""Where resume's in-memory digest should run on a GPU export: a background pass vs inside the read-ahead thread.

Qwen3-4B shape in ``gpu_big``'s table layout, ModelOpt FP8 and NVFP4, rounds of interleaved exports:
``none`` (no digest: not resumable), ``background`` (the shipped pass over every memory-held tensor in its own
thread), ``reader`` (a prototype: each unit's memory-held sources CRC-ed by the read-ahead thread right after
``UnitReader.read``, GPU tensors copied off on a side stream), each also with ``sys.setswitchinterval(0.5 ms)``
(tests whether the cost is the GIL). Seconds, TTFB, digest wall time to ``$OUT/digest_where_h200.json``.

Usage (GPU machine, modelopt installed): python benchmarks/gpu_digest_where.py
"""

import copy
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from gpu_big import TABLE_MEMORY, auto_offloaded, timed
from gpu_packed_check import build_checkpoint, calib_loop, config
import modelopt.torch.quantization as mtq

import offload_export as oe
from offload_export import fingerprint as F
from offload_export import pipeline as P
from offload_export import resume as R
from offload_export.layout import layout

work = Path(tempfile.mkdtemp())
build_checkpoint(work / "src", config("4b", None))
real_digest, real_read = R.memory_digest, P.UnitReader.read
side = torch.cuda.Stream()
digest_s: list[float] = []


def timed_digest(*a, **k):
    t = time.perf_counter()
    v = real_digest(*a, **k)
    digest_s.append(round(time.perf_counter() - t, 2) if v is not None else None)
    return v


def crc(t: torch.Tensor) -> int:
    raw = t.detach().contiguous().view(-1).view(torch.uint8)
    if raw.device.type == "cpu":
        return zlib.crc32(memoryview(raw.numpy()))
    c = 0
    with torch.cuda.stream(side):
        side.wait_stream(torch.cuda.default_stream(raw.device))
        for s in range(0, raw.numel(), 16 << 20):
            c = zlib.crc32(memoryview(raw[s:s + (16 << 20)].cpu().numpy()), c)
    return c


def reading_read(self, unit):
    raw = real_read(self, unit)
    for k, v in raw.items():
        if isinstance(v, torch.Tensor) and self.lay[k].kind in ("resident", "cpu", "mapping"):
            crc(v)
    return raw


def setup(variant: str) -> None:
    R.memory_digest = timed_digest if variant.startswith("background") else (lambda *a, **k: None)
    P.UnitReader.read = reading_read if variant.startswith("reader") else real_read
    sys.setswitchinterval(0.0005 if variant.endswith("fast_switch") else 0.005)


t = time.perf_counter()
buf = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8)
zlib.crc32(memoryview(buf.numpy()))
out = {"crc32_GBps": round(1.074 / (time.perf_counter() - t), 2)}
del buf
variants = ("none", "background", "reader", "none_fast_switch", "background_fast_switch")
for cfg in ("FP8_DEFAULT_CFG", "NVFP4_DEFAULT_CFG"):
    model = auto_offloaded(work / "src", work, TABLE_MEMORY["4b"])
    mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg)), calib_loop())
    for rep in range(2):
        for variant in variants:
            setup(variant)
            digest_s.clear()
            row = timed(lambda: oe.save_clean(model, work / "o", format="modelopt"), work / "o")
            row["digest_s"] = list(digest_s)
            shutil.rmtree(work / "o")
            out.setdefault(f"{cfg} {variant}", []).append(row)
            print(cfg, variant, row, flush=True)
    setup("none")
    t = time.perf_counter()
    F.memory_digest(layout(model), threads=1)
    out.setdefault(f"{cfg} digest_alone_s", round(time.perf_counter() - t, 2))
    model = None
    torch.cuda.empty_cache()
setup("none")
R.memory_digest = real_digest
print(json.dumps(out))
(Path(os.environ.get("OUT", ".")) / "digest_where_h200.json").write_text(json.dumps(out, indent=1))
