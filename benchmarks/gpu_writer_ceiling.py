"""How fast save_clean writes GPU tensors that need no work: the writer's own ceiling beside the disk's floor.

    python benchmarks/gpu_writer_ceiling.py [--gb 2.8] [--mb 57] [--rounds 3] [--beside none,python,copy,launch]
                                            [--out F]

A packed export's outputs (4B NVFP4: 2.82 GB, ~57 MB a layer) leave the GPU through the writer. Here a module of
uint8 GPU buffers of ``--mb`` each, ``--gb`` in all, no quantizer, is exported by ``save_clean`` (the writer's
path alone: its pinned staging, the I/O thread, the fsyncs), beside the floor (``gpu_big.floor_rates``: 64 MiB
``pwrite`` + writeback started + fsync) measured in the same run. ``--beside``: the same export while another
thread works as an export's other stages do: ``python`` (pure Python: the GIL), ``copy`` (64 MiB host copies on half
the cores: the read-ahead's copies into pinned buffers), ``launch`` (small GPU ops in a loop: a pack's Python and
kernel launches). Prints seconds and the ratio; writes the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

from gpu_big import floor_rates

import offload_export as oe
from offload_export.pipeline import _fold_threads


def _python(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def _copy(stop: threading.Event) -> None:
    src, dst = torch.empty(64 << 20, dtype=torch.uint8), torch.empty(64 << 20, dtype=torch.uint8)
    src.fill_(1)
    with _fold_threads():  # the read-ahead's setting: half the cores
        while not stop.is_set():
            dst.copy_(src)


def _launch(stop: threading.Event) -> None:
    x = torch.ones(1 << 20, device="cuda")
    while not stop.is_set():
        x = (x * 1.0001).clamp_(0, 2)
        torch.cuda.synchronize()


@contextlib.contextmanager
def beside(kind: str):
    """A thread doing ``kind``'s work (none for ``"none"``) for the block's duration."""
    stop = threading.Event()
    work = {"python": _python, "copy": _copy, "launch": _launch}.get(kind)
    thread = threading.Thread(target=work, args=(stop,), daemon=True) if work else None
    if thread:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread:
            thread.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.82)
    parser.add_argument("--mb", type=float, default=57.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--beside", default="none")
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
        floor = nbytes / 1e9 / rates["write_GBps"]
        for kind in args.beside.split(","):
            torch.cuda.synchronize()
            with beside(kind):
                t = time.perf_counter()
                oe.save_clean(model, work / "o")
                s = time.perf_counter() - t
            rows.append({"round": rnd, "beside": kind, "s": round(s, 3), "floor_s": round(floor, 3),
                         "x_floor": round(s / floor, 2), "write_GBps": rates["write_GBps"],
                         "write_buffered_GBps": rates["write_buffered_GBps"]})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(work / "o")
    shutil.rmtree(work)
    if args.out:
        Path(args.out).write_text(json.dumps({"GB": round(nbytes / 1e9, 2), "tensor_MB": args.mb, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
