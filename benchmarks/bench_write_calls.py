"""How the size of each ``pwrite`` call, and the number of threads writing, change the time to write a file from
memory (+ fsync).

    python benchmarks/bench_write_calls.py [--gb 1.2] [--repeats 3] [--calls 512,65536] [--threads 2,4,8] [--direct 1,2] [--dir DIR]
        [--out results.json]

The writer sends tensors out of process memory with ``pwrite``; this measures the same bytes written from
one pre-touched buffer in calls of 256 KiB .. 64 MiB, each + fsync, against ``copy_file_range`` of a file
holding them (the floor), interleaved, fresh files each time. With ``--threads``, also the writer's way (512 KiB
calls, the writeback of each 64 MiB step started with ``POSIX_FADV_DONTNEED``) from 1 and from each given number
of threads, the steps dealt out round-robin: whether one thread's buffered writes, not the disk, set the rate; the
writer's way with each step's writeback started in a second thread while the next step is written (as the writer
does); and the writer's way with the writeback started by ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` instead (Linux). With
``--direct``, also ``O_DIRECT`` writes of 16 MiB from page-aligned memory (no copy into the page cache) from each
given number of threads, each + fsync, into a file that grows and into one allocated first: what writing around
the page cache would give the writer.
Prints a table of median seconds, system CPU seconds and the ratio to the floor; writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CALLS = (256 << 10, 512 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20)
STEP, CALL = 64 << 20, 512 << 10  # the writer's writeback step and its write calls


def timed(fn) -> tuple[float, float]:
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_stime - r0.ru_stime


def write_calls(buf: memoryview, dest: Path, nbytes: int, call: int) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < nbytes:
            n = min(call, nbytes - done, len(buf))
            done += os.pwrite(fd, buf[:n], done)
        os.fsync(fd)
    finally:
        os.close(fd)
    dest.unlink()


def _in_threads(fd: int, dest: Path, work, threads: int) -> None:
    """``work(k)`` for k < ``threads``, each in its own thread, then one fsync; the file closed, then removed."""
    try:
        workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        os.fsync(fd)
    finally:
        os.close(fd)
    dest.unlink()


def _write_step(fd: int, buf: memoryview, at: int, n: int) -> None:
    """``n`` bytes of ``buf`` written at ``at`` in the writer's 512 KiB calls."""
    for d in range(0, n, CALL):
        os.pwrite(fd, buf[d:min(d + CALL, n)], at + d)


def write_threads(buf: memoryview, dest: Path, nbytes: int, threads: int) -> None:
    """``nbytes`` in 64 MiB steps dealt round-robin to ``threads`` threads, each step in 512 KiB calls and its
    writeback started at its end (as the writer does), then one fsync."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def work(first: int) -> None:
        for at in range(first * STEP, nbytes, threads * STEP):
            n = min(STEP, nbytes - at)
            _write_step(fd, buf, at, n)
            os.posix_fadvise(fd, at, n, os.POSIX_FADV_DONTNEED)

    _in_threads(fd, dest, work, threads)


def write_advised_beside(buf: memoryview, dest: Path, nbytes: int) -> None:
    """The writer's way from one thread, each 64 MiB step's writeback started in a second thread while the first
    writes the next step (as ``ShardWriter._advise`` does with checksum threads): the disk's writeback then runs
    beside the copies into the page cache instead of between them."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    advising = None
    try:
        with ThreadPoolExecutor(1) as beside:
            for at in range(0, nbytes, STEP):
                n = min(STEP, nbytes - at)
                _write_step(fd, buf, at, n)
                if advising is not None:
                    advising.result()
                advising = beside.submit(os.posix_fadvise, fd, at, n, os.POSIX_FADV_DONTNEED)
        os.fsync(fd)
    finally:
        os.close(fd)
    dest.unlink()


def _sync_file_range():
    """libc's ``sync_file_range`` through ctypes (Python's ``os`` has none), or None off Linux."""
    import ctypes

    fn = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


def write_started_by_range(buf: memoryview, dest: Path, nbytes: int, start) -> None:
    """The writer's way from one thread, each 64 MiB step's writeback started by ``start(fd, at, n, WRITE)``."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for at in range(0, nbytes, STEP):
            n = min(STEP, nbytes - at)
            _write_step(fd, buf, at, n)
            start(fd, at, n, 2)  # SYNC_FILE_RANGE_WRITE
        os.fsync(fd)
    finally:
        os.close(fd)
    dest.unlink()


def write_direct(buf: memoryview, dest: Path, nbytes: int, threads: int, preallocate: bool = False) -> None:
    """``nbytes`` (rounded up to 4 KiB) in 16 MiB ``O_DIRECT`` writes from page-aligned memory, dealt round-robin to
    ``threads`` threads, then one fsync. ``preallocate``: the file's blocks allocated first (``posix_fallocate``), so
    that no write extends the file (ext4 runs a direct write that extends the file under the inode's exclusive lock,
    one at a time)."""
    chunk = 16 << 20
    nbytes = -(-nbytes // 4096) * 4096
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    if preallocate:
        os.posix_fallocate(fd, 0, nbytes)

    def work(first: int) -> None:
        for at in range(first * chunk, nbytes, threads * chunk):
            os.pwrite(fd, buf[:min(chunk, nbytes - at)], at)

    _in_threads(fd, dest, work, threads)


def copy_range(src: Path, dest: Path, nbytes: int) -> None:
    with open(src, "rb") as f, open(dest, "wb") as g:
        done = 0
        while done < nbytes:
            done += os.copy_file_range(f.fileno(), g.fileno(), nbytes - done)
        os.fsync(g.fileno())
    dest.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", default=",".join(str(c >> 10) for c in CALLS),
                    help="comma-separated pwrite call sizes in KiB (default: all of 256 .. 65536)")
    ap.add_argument("--threads", default="", help="comma-separated thread counts for the writer's way (with 1)")
    ap.add_argument("--direct", default="", help="comma-separated thread counts for O_DIRECT 16 MiB writes")
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary directory under the cwd)")
    ap.add_argument("--out", default="write_calls.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="write_calls_", dir=args.dir or "."))
    nbytes = int(args.gb * 1e9)
    buf = mmap.mmap(-1, 64 << 20)
    buf.write(os.urandom(1 << 20) * 64)  # touched: no page faults on the source side
    view = memoryview(buf)
    src = work / "src.bin"
    with open(src, "wb") as f:
        for done in range(0, nbytes, len(buf)):
            f.write(view[:min(len(buf), nbytes - done)])
    open(src, "rb").read()  # in the page cache, as a warm offload store is
    runs: dict[str, list[tuple[float, float]]] = {}
    start = _sync_file_range()
    for _ in range(args.repeats):
        runs.setdefault("copy_file_range", []).append(timed(lambda: copy_range(src, work / "dest", nbytes)))
        for call in [int(c) << 10 for c in args.calls.split(",") if c]:
            runs.setdefault(f"pwrite {call >> 10} KiB", []).append(
                timed(lambda call=call: write_calls(view, work / "dest", nbytes, call)))
        for k in ([1] + [int(t) for t in args.threads.split(",")] if args.threads else []):
            runs.setdefault(f"writer's way x{k}", []).append(
                timed(lambda k=k: write_threads(view, work / "dest", nbytes, k)))
        if args.threads:
            runs.setdefault("writer's way, advice beside", []).append(
                timed(lambda: write_advised_beside(view, work / "dest", nbytes)))
        if args.threads and start is not None:
            runs.setdefault("writer's way, sync_file_range", []).append(
                timed(lambda: write_started_by_range(view, work / "dest", nbytes, start)))
        for k in ([int(t) for t in args.direct.split(",")] if args.direct else []):
            runs.setdefault(f"O_DIRECT 16 MiB x{k}", []).append(
                timed(lambda k=k: write_direct(view, work / "dest", nbytes, k)))
            runs.setdefault(f"O_DIRECT 16 MiB x{k}, fallocated", []).append(
                timed(lambda k=k: write_direct(view, work / "dest", nbytes, k, preallocate=True)))
    src.unlink()
    work.rmdir()
    floor = statistics.median(s for s, _ in runs["copy_file_range"])
    rows = [{"method": m, "s_median": round(statistics.median(s for s, _ in r), 3),
             "s_min": round(min(s for s, _ in r), 3), "s_max": round(max(s for s, _ in r), 3),
             "sys_s_median": round(statistics.median(c for _, c in r), 3),
             "x_floor": round(statistics.median(s for s, _ in r) / floor, 2)} for m, r in runs.items()]
    print(f"{nbytes / 1e9:.2f} GB, {args.repeats} repeats, {platform.platform()}")
    print(f"{'method':31} {'s median':>9} {'min':>6} {'max':>6} {'sys s':>6} {'x floor':>7}")
    for r in rows:
        print(f"{r['method']:31} {r['s_median']:>9} {r['s_min']:>6} {r['s_max']:>6} {r['sys_s_median']:>6} {r['x_floor']:>7}")
    Path(args.out).write_text(json.dumps({"platform": platform.platform(), "bytes": nbytes, "repeats": args.repeats,
                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
