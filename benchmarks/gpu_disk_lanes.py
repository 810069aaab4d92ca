"""What the disk takes from several writers at once: GB/s writing + fsync-ing the same bytes (2.82 GB: the 4B NVFP4
export's shards) from 1, 2 and 4 threads, each to a file of its own, the floor's way (64 MiB ``pwrite`` through the page
cache, each step's writeback started at once with ``POSIX_FADV_DONTNEED``), and with ``O_DIRECT`` (4 MiB ``pwrite``).

The floor (``gpu_big.floor_rates``) is one writer; if two beat it, the floor is the writer's CPU work (the page
cache's copy, the writeback's submission), not the disk, and an export writing two shards at once could go below it.

Usage (any Linux machine): python benchmarks/gpu_disk_lanes.py [--gb 2.82] [--rounds 3] [--out FILE]
"""

import argparse
import json
import mmap
import os
import tempfile
import threading
import time
from pathlib import Path

_STEP = 64 << 20


def _write(path: Path, nbytes: int, data: memoryview, direct: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        step = len(data)
        for at in range(0, nbytes, step):
            done = 0
            while done < step:  # a short write goes on where it stopped
                done += os.pwrite(fd, data[done:], at + done)
            if not direct:
                os.posix_fadvise(fd, at, step, os.POSIX_FADV_DONTNEED)  # start writeback (the writer's way)
        os.fsync(fd)
    finally:
        os.close(fd)


def rate(work: Path, gb: float, threads: int, direct: bool) -> float:
    """GB/s of ``threads`` writers sharing ``gb`` GB, each into its own file, all fsync-ed."""
    step = (4 << 20) if direct else _STEP
    buffers = []
    for _ in range(threads):
        buf = mmap.mmap(-1, step)  # page-aligned, as O_DIRECT wants
        buf[:] = os.urandom(1 << 20) * (step >> 20)
        buffers.append(buf)
    each = int(gb * 1e9 / threads) // step * step
    os.sync()
    jobs = [threading.Thread(target=_write, args=(work / f"lane{i}", each, memoryview(b), direct))
            for i, b in enumerate(buffers)]
    t = time.perf_counter()
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    seconds = time.perf_counter() - t
    for i in range(threads):
        (work / f"lane{i}").unlink()
    return each * threads / 1e9 / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=2.82)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="disk_lanes.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    rows = []
    for rnd in range(args.rounds):
        for direct in (False, True):
            for threads in (1, 2, 4):
                row = {"round": rnd, "direct": direct, "threads": threads,
                       "GBps": round(rate(work, args.gb, threads, direct), 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"GB": args.gb, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
