"""The shard writer alone and beside a thread running Python (as an export's fold / pack thread is), in one process.

    python benchmarks/bench_writer_beside.py [--shape moe|dense] [--layers 8] [--rounds 3] [--crc-threads N]
                                             [--dir DIR] [--out results.json] [PACKAGE_DIR ...]

A stream of NVFP4-packed tensors written unit by unit into one shard by ``ShardWriter`` with CRC threads as an
export has them (``--crc-threads``; an export's count on this machine by default; 0: no checksums): ``moe``, a
155 MB embedding then per layer 32 experts x 3 linears, each a weight of 786 KB, a 98 KB scale and two 4-byte
scales (384 tensors a layer); ``dense``, a 389 MB embedding then per layer the 7 linears of a Qwen3-4B layer (0.5-12 MB weights, their
scales: 28 tensors, 69 MB a layer). Units are handed over the way ``save_clean`` does: where the package has
``ShardWriter.stage``, each unit is staged in this thread while a second one makes the writes of the unit before
(one unit in flight); else ``write_many``, else ``write`` per tensor; + fsync. Each round: alone, then beside
a thread looping in Python, with the switch interval an export sets (0.5 ms). Every thread hands the GIL over at
each system call and at some torch calls, and waits for it back while the other thread runs Python. Each
PACKAGE_DIR holds an ``offload_export`` package (``git archive REV offload_export | tar -x -C DIR``) to compare;
the installed one by default. Prints seconds and GB/s per package and case; writes the JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def load(folder: str | None, module: str = "offload_export.writer"):
    """``module`` of the ``offload_export`` package in ``folder`` (the installed package for None), freshly imported."""
    for name in [n for n in sys.modules if n == "offload_export" or n.startswith("offload_export.")]:
        del sys.modules[name]
    if folder:
        sys.path.insert(0, folder)
    try:
        return importlib.import_module(module)
    finally:
        if folder:
            sys.path.remove(folder)


_LINEARS = {"moe": [(f"mlp.experts.{e}.{proj}", shape) for e in range(32)
                     for proj, shape in (("gate_proj", (768, 2048)), ("up_proj", (768, 2048)), ("down_proj", (2048, 768)))],
            "dense": [(f"{part}.{proj}", shape) for part, proj, shape in (
                ("self_attn", "q_proj", (4096, 2560)), ("self_attn", "k_proj", (1024, 2560)),
                ("self_attn", "v_proj", (1024, 2560)), ("self_attn", "o_proj", (2560, 4096)),
                ("mlp", "gate_proj", (9728, 2560)), ("mlp", "up_proj", (9728, 2560)), ("mlp", "down_proj", (2560, 9728)))]}
_EMBEDDING = {"moe": (151936 // 8, 4096 * 2), "dense": (151936 // 2, 2560)}


def units(layers: int, shape: str = "moe") -> list[list[tuple[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)

    def raw(shape, dtype=torch.uint8):
        return torch.randint(0, 255, shape, dtype=torch.uint8, generator=gen).view(dtype)

    rows, cols = _EMBEDDING[shape]
    out = [[("model.embed_tokens.weight", raw((rows, cols * 2)).view(torch.bfloat16))]]
    for layer in range(layers):
        unit = []
        for linear, (rows, cols) in _LINEARS[shape]:
            name = f"model.layers.{layer}.{linear}"
            unit += [(f"{name}.weight", raw((rows, cols // 2))),
                     (f"{name}.weight_scale", raw((rows, cols // 16), torch.float8_e4m3fn)),
                     (f"{name}.weight_scale_2", torch.rand((), generator=gen)),
                     (f"{name}.input_scale", torch.rand((), generator=gen))]
        out.append(unit)
    return out


def write(writer, stream, path: Path, busy: bool, crc_threads: int) -> float:
    stop = threading.Event()

    def spin():
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i

    spinner = threading.Thread(target=spin, daemon=True)
    specs = [writer.TensorSpec(n, t.dtype, tuple(t.shape)) for unit in stream for n, t in unit]
    with ThreadPoolExecutor(max(1, crc_threads), thread_name_prefix="crc") as crc:
        shard = writer.ShardWriter(str(path), specs, {"format": "pt"}, descriptors=writer.Descriptors(),
                                   checksums=crc if crc_threads else None)
        if busy:
            spinner.start()
        t0 = time.perf_counter()
        try:
            if hasattr(shard, "stage"):
                with ThreadPoolExecutor(1, thread_name_prefix="io") as io:
                    flight = None
                    for unit in stream:  # one unit staged while the one before is written, as save_clean does
                        done = io.submit(shard.stage(unit))
                        if flight is not None:
                            flight.result()
                        flight = done
                    flight.result()
            else:
                for unit in stream:
                    if hasattr(shard, "write_many"):
                        shard.write_many(unit)
                    else:
                        for name, tensor in unit:
                            shard.write(name, tensor)
            seconds = time.perf_counter() - t0
        finally:
            stop.set()
    if busy:
        spinner.join()
    path.unlink()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="*", help="folders holding an offload_export package (default: the installed)")
    ap.add_argument("--shape", choices=sorted(_LINEARS), default="moe")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--crc-threads", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: the system's temporary folder)")
    ap.add_argument("--out", default="writer_beside.json")
    args = ap.parse_args()
    stream = units(args.layers, args.shape)
    nbytes = sum(t.numel() * t.element_size() for unit in stream for _, t in unit)
    tensors = sum(len(unit) for unit in stream)
    sys.setswitchinterval(0.0005)
    work = Path(tempfile.mkdtemp(prefix="writer_beside_", dir=args.dir))
    runs: dict[str, list[float]] = {}
    packages = args.packages or [None]
    for _ in range(args.rounds):
        for folder in packages:
            writer = load(folder)
            for busy in (False, True):
                key = f"{Path(folder).name if folder else 'installed'}, {'beside Python' if busy else 'alone'}"
                runs.setdefault(key, []).append(write(writer, stream, work / "shard.safetensors", busy,
                                                      args.crc_threads))
    work.rmdir()
    rows = [{"case": k, "s_median": round(statistics.median(v), 3), "s_min": round(min(v), 3), "s_max": round(max(v), 3),
             "GBps_median": round(nbytes / 1e9 / statistics.median(v), 2)} for k, v in runs.items()]
    print(f"{args.shape}: {tensors} tensors, {nbytes / 1e9:.2f} GB, {args.rounds} rounds, {os.cpu_count()} cores, "
          f"{args.crc_threads} CRC thread(s)")
    print(f"{'package, case':32} {'s median':>9} {'min':>6} {'max':>6} {'GB/s':>6}")
    for r in rows:
        print(f"{r['case']:32} {r['s_median']:>9} {r['s_min']:>6} {r['s_max']:>6} {r['GBps_median']:>6}")
    Path(args.out).write_text(json.dumps({"shape": args.shape, "crc_threads": args.crc_threads, "layers": args.layers,
                                          "tensors": tensors, "bytes": nbytes, "rounds": args.rounds,
                                          "cores": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
