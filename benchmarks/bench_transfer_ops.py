"""The Python and tensor ops of the pinned-buffer copies (``_transfer``), alone and beside a thread running Python.

    python benchmarks/bench_transfer_ops.py [--gb 1] [--rounds 5] [--out F] [PACKAGE_DIR ...]

A thread that copies between a GPU and the host through ``offload_export._transfer`` (the read-ahead's
``filled_on_device``, the writer's ``host_pieces``) runs a few tensor ops per 16 MiB chunk besides the copies. Each
op that makes a tensor (a slice, a view) hands the GIL over and waits to take it back, which beside a thread running
Python (the export's pack) costs tens to hundreds of microseconds (the first table). On a machine without a GPU the
pinned buffers, events and stream are stood in for by host buffers (the same ops, the copies host to host), so the
second table times each package's bookkeeping with the copies it makes: ``--gb`` moved in by ``filled_on_device``
and out by ``host_pieces``, alone and beside a thread looping in Python, at the switch interval an export sets
(0.5 ms). Each PACKAGE_DIR holds an ``offload_export`` package (``git archive REV offload_export | tar -x -C DIR``);
the installed one by default. Prints median seconds per case; writes the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_writer_beside  # noqa: E402  (its package loader)


class Spinner:
    """A thread looping in Python while the block runs (none when ``busy`` is false)."""

    def __init__(self, busy: bool):
        self.busy, self.stop = busy, threading.Event()

    def __enter__(self):
        def spin():
            x = 0
            while not self.stop.is_set():
                for i in range(1000):
                    x += i
        self.thread = threading.Thread(target=spin, daemon=True)
        if self.busy:
            self.thread.start()

    def __exit__(self, *exc):
        self.stop.set()
        if self.busy:
            self.thread.join()


def op_costs(rounds: int = 3, n: int = 3000) -> dict[str, dict[str, float]]:
    """Microseconds per call of single tensor ops on a 4 KiB view, alone and beside a thread running Python."""
    views = list(torch.zeros(n, 4096, dtype=torch.uint8))
    buffer = torch.zeros(4096, dtype=torch.uint8)
    ops = {"t.is_contiguous()": lambda t: t.is_contiguous(), "t.is_neg()": lambda t: t.is_neg(),
           "t[1:100] (a view)": lambda t: t[1:100], "t.view(torch.uint8)": lambda t: t.view(torch.uint8),
           "t.reshape(-1)": lambda t: t.reshape(-1), "buffer.copy_(t) (4 KiB)": lambda t: buffer.copy_(t)}
    out: dict[str, dict[str, list[float]]] = {name: {"alone": [], "beside Python": []} for name in ops}
    for _ in range(rounds):
        for case in ("alone", "beside Python"):
            with Spinner(case != "alone"):
                for name, op in ops.items():
                    t0 = time.perf_counter()
                    for v in views:
                        op(v)
                    out[name][case].append((time.perf_counter() - t0) / n * 1e6)
    return {name: {case: round(statistics.median(v), 2) for case, v in cases.items()} for name, cases in out.items()}


class _Event:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


def copies(transfer, source: torch.Tensor, busy: bool) -> float:
    """Seconds for ``source`` in through ``filled_on_device`` (filled by one slice of ``source`` per chunk, the same
    for every package: what differs is ``filled_on_device``'s own ops) and out through ``host_pieces``, with host
    stand-ins for the pinned buffers, events and stream."""
    chunk = transfer._CHUNK
    buffers = tuple(torch.empty(chunk, dtype=torch.uint8) for _ in range(2))
    transfer._staging = lambda device: (buffers, (_Event(), _Event()), None)
    raw = source.view(torch.uint8)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_no_stream())
        stack.enter_context(Spinner(busy))
        t0 = time.perf_counter()
        made = transfer.filled_on_device(lambda b, start: b.copy_(raw[start:start + b.numel()]), tuple(source.shape),
                                         source.dtype, torch.device("cpu"))
        for _ in transfer.host_pieces([made]):
            pass
        return time.perf_counter() - t0


@contextlib.contextmanager
def _no_stream():
    stream = torch.cuda.stream
    torch.cuda.stream = lambda s: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.cuda.stream = stream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="*", help="folders holding an offload_export package (default: the installed)")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="transfer_ops.json")
    args = ap.parse_args()
    sys.setswitchinterval(0.0005)
    ops = op_costs()
    print(f"{'op':26} {'alone us':>9} {'beside Python us':>17}")
    for name, cases in ops.items():
        print(f"{name:26} {cases['alone']:>9} {cases['beside Python']:>17}")
    source = torch.randint(0, 255, (int(args.gb * 1e9) // 2,), dtype=torch.int16)
    runs: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for folder in args.packages or [None]:
            transfer = bench_writer_beside.load(folder, "offload_export._transfer")
            for busy in (False, True):
                key = f"{Path(folder).name if folder else 'installed'}, {'beside Python' if busy else 'alone'}"
                runs.setdefault(key, []).append(copies(transfer, source, busy))
    rows = [{"case": k, "s_median": round(statistics.median(v), 3), "s_min": round(min(v), 3),
             "s_max": round(max(v), 3)} for k, v in runs.items()]
    print(f"\n{args.gb} GB in and out in 16 MiB chunks, host stand-ins, {args.rounds} rounds")
    print(f"{'package, case':32} {'s median':>9} {'min':>6} {'max':>6}")
    for r in rows:
        print(f"{r['case']:32} {r['s_median']:>9} {r['s_min']:>6} {r['s_max']:>6}")
    Path(args.out).write_text(json.dumps({"op_us": ops, "gb": args.gb, "rounds": args.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
