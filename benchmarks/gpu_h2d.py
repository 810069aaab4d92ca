"""Host -> GPU rates of the ways an export's read-ahead could move offloaded weights, on one GPU.

    python benchmarks/gpu_h2d.py [--gb 2] [--mb 50] [--rounds 3] [--out F]

An export of a CPU- and disk-offloaded model moves every offloaded weight to the GPU before its pack: the
read-ahead's rate bounds how fast the packed bytes can reach the writer. Cases, each moving ``--gb`` of tensors of
``--mb`` (a 4B linear is 21-50 MB) in the read-ahead's thread settings (half the cores, ``pipeline``'s block):
``to_device`` (what the read-ahead does: two pinned 16 MiB buffers, the host copy by the intra-op threads, the DMA
overlapped), the same with 4 / 64 MiB buffers, the driver's pageable copy (``.to``), ``cudaHostRegister`` of each
source before an async copy (and unregister after), from a file in the page cache (``filled_on_device`` with the
span's ``pread``, one call per buffer, and with four threads per buffer), and the two halves alone: the DMA from one
pinned tensor and the host copy into pinned memory. Prints GB/s (best, median of ``--rounds``); writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from offload_export import _store, _transfer, pipeline


def timed(fn, rounds: int, nbytes: int) -> dict:
    rates = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        rates.append(nbytes / 1e9 / (time.perf_counter() - t))
    return {"best_GBps": round(max(rates), 2), "median_GBps": round(statistics.median(rates), 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    numel = int(args.mb * 1e6) // 2
    sources = [torch.full((numel,), float(i), dtype=torch.bfloat16) for i in range(int(args.gb * 1e3 / args.mb))]
    nbytes = sum(t.nbytes for t in sources)
    folder = Path(tempfile.mkdtemp())
    path = folder / "weights.bin"
    with open(path, "wb") as f:
        for t in sources:
            f.write(t.view(torch.uint8).numpy())
    spans = [_store.FileSpan(str(path), i * sources[0].nbytes, torch.bfloat16, (numel,)) for i in range(len(sources))]
    pinned = torch.empty(sources[0].nbytes, dtype=torch.uint8, pin_memory=True)
    pool = ThreadPoolExecutor(4)
    cudart = torch.cuda.cudart()

    def parallel_fill(span):
        def fill(buffer, start):
            step = -(-buffer.numel() // 4)
            list(pool.map(lambda at: span.read_into(buffer[at:at + step], start + at), range(0, buffer.numel(), step)))
        return fill

    def registered():
        for t in sources:
            if err := int(cudart.cudaHostRegister(t.data_ptr(), t.nbytes, 0)):
                raise RuntimeError(f"cudaHostRegister: error {err}")
            t.to(device, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
            cudart.cudaHostUnregister(t.data_ptr())

    def with_chunk(n, fn):
        def run():
            old, _transfer._CHUNK = _transfer._CHUNK, n
            _transfer._local.__dict__.pop("staging", None)
            try:
                fn()
            finally:
                _transfer._CHUNK = old
                _transfer._local.__dict__.pop("staging", None)
        return run

    def staged():
        for t in sources:
            _transfer.to_device(t, device)

    cases = {
        "to_device 2x16 MiB": staged,
        "to_device 2x4 MiB": with_chunk(4 << 20, staged),
        "to_device 2x64 MiB": with_chunk(64 << 20, staged),
        "pageable .to": lambda: [t.to(device) for t in sources],
        "cudaHostRegister + async": registered,
        "file span, 1 pread per buffer": lambda: [
            _transfer.filled_on_device(s.read_into, s.shape, s.dtype, device) for s in spans],
        "file span, 4 preads per buffer": lambda: [
            _transfer.filled_on_device(parallel_fill(s), s.shape, s.dtype, device) for s in spans],
        "DMA alone (pinned -> GPU)": lambda: [pinned.to(device, non_blocking=True) for _ in sources],
        "host copy alone (-> pinned)": lambda: [pinned.copy_(t.view(torch.uint8)) for t in sources],
    }
    result = {"device": torch.cuda.get_device_name(device), "cores": pipeline.usable_cores(), "GB": round(nbytes / 1e9, 2),
              "tensor_MB": args.mb, "cases": {}}
    with pipeline._fold_threads():
        for name, fn in cases.items():
            try:
                fn()  # warm: buffers, the driver's staging, the page cache
                result["cases"][name] = timed(fn, args.rounds, nbytes)
            except Exception as e:  # one way failing here (a driver refusing to register memory) leaves the others
                result["cases"][name] = f"{type(e).__name__}: {e}"
            print(f"| {name} | {result['cases'][name]} |", flush=True)
    result["cases"]["to_device 2x16 MiB, all cores"] = timed(staged, args.rounds, nbytes)
    print("| to_device 2x16 MiB, all cores |", result["cases"]["to_device 2x16 MiB, all cores"], flush=True)
    path.unlink()
    os.rmdir(folder)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
