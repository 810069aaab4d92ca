"""How fast save_clean writes GPU tensors that need no work: the writer's own ceiling beside the disk's floor.

    python benchmarks/gpu_writer_ceiling.py [--gb 2.8] [--mb 57] [--rounds 3] [--out F]

A packed export's outputs (4B NVFP4: 2.82 GB, ~57 MB a layer) leave the GPU through the writer. Here a module of
uint8 GPU buffers of ``--mb`` each, ``--gb`` in all, no quantizer, is exported by ``save_clean`` (the writer's
path alone: its pinned staging, the I/O thread, the fsyncs), beside the floor (``gpu_big.floor_rates``: 64 MiB
``pwrite`` + writeback started + fsync) measured in the same run. Prints seconds and the ratio; writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from gpu_big import floor_rates

import offload_export as oe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.82)
    parser.add_argument("--mb", type=float, default=57.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = nn.Module()
    n = int(args.gb * 1e3 / args.mb)
    for i in range(n):
        model.register_buffer(f"b{i}", torch.randint(0, 255, (int(args.mb * 1e6),), dtype=torch.uint8, device="cuda"))
    nbytes = sum(b.nbytes for b in model.buffers())
    work = Path(tempfile.mkdtemp())
    (work / "src").mkdir()
    rows = []
    for rnd in range(args.rounds):
        rates = floor_rates(work / "src", work)
        torch.cuda.synchronize()
        t = time.perf_counter()
        oe.save_clean(model, work / "o")
        s = time.perf_counter() - t
        floor = nbytes / 1e9 / rates["write_GBps"]
        rows.append({"round": rnd, "s": round(s, 3), "floor_s": round(floor, 3), "x_floor": round(s / floor, 2),
                     "write_GBps": rates["write_GBps"], "write_buffered_GBps": rates["write_buffered_GBps"]})
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(work / "o")
    shutil.rmtree(work)
    if args.out:
        Path(args.out).write_text(json.dumps({"GB": round(nbytes / 1e9, 2), "tensor_MB": args.mb, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
