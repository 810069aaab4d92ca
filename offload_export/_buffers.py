"""Big transient CPU buffers: each in its own anonymous mapping, reused while an export streams.

Every offloaded tensor an export reads and every weight it folds needs a buffer of its size. Fresh memory
costs the kernel a zeroing and a page fault per page on first touch (on a VM whose guest hands free memory
back to the host, also a fault in the host). While :func:`reusing` is open, a buffer whose storage dies
goes to an idle list, and the next request of about its size takes it back instead of mapping new memory:
an int8 export of a 1.2 GB model mapped ~1.7 GB of fresh buffers before, 140-160 MB with reuse.
"""

from __future__ import annotations

import math
import mmap
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["anon_empty", "cast", "reusing"]

_ANON_MIN_BYTES = 1 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only


def _new_mapping(nbytes: int) -> mmap.mmap:
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: counted as RssAnon
    if nbytes >= _HUGE_PAGE and _MADV_HUGEPAGE is not None:
        # 2 MiB pages: a fresh mapping's first touch costs one fault per 2 MiB instead of per 4 KiB (measured
        # 0.65 -> 0.12 CPU s per GB here); a hint, ignored where transparent huge pages are off
        try:
            buffer.madvise(_MADV_HUGEPAGE)
        except OSError:
            pass
    return buffer


class _Pool:
    """The idle mappings, and the bytes mapped through the pool (live + idle).

    The pool never maps more than the most bytes its buffers had live at once: a request no idle buffer
    fits first unmaps the least recently freed idle ones until ``mapped + size`` is within that peak, so
    reuse never raises the memory high-water mark of an export above what it was without reuse.
    """

    def __init__(self):
        self.lock = threading.RLock()  # a finalizer can run in a thread already inside the pool
        self.users = 0
        self.idle: list[tuple[int, mmap.mmap]] = []  # least recently freed first
        self.idle_bytes = self.mapped = self.peak = 0

    def open(self) -> None:
        with self.lock:
            if not self.users:
                self.peak = self.mapped
            self.users += 1

    def close(self) -> None:
        with self.lock:
            self.users -= 1
            if not self.users:
                self.mapped -= self.idle_bytes
                self.idle, self.idle_bytes = [], 0

    def get(self, nbytes: int) -> tuple[mmap.mmap, int, bool]:
        """A mapping of at least ``nbytes``: the smallest idle one of at most twice that (the most recently
        freed of equals), else a new one, for which idle mappings are unmapped as the peak requires.

        Returns:
            ``(mapping, its size, counted)``: a counted mapping (every one while the pool is open) must
            come back through :meth:`give_back` when it dies.
        """
        with self.lock:
            if not self.users:
                return _new_mapping(nbytes), nbytes, False
            fits = [i for i, (size, _) in enumerate(self.idle) if nbytes <= size <= 2 * nbytes]
            if fits:
                size, buffer = self.idle.pop(min(reversed(fits), key=lambda i: self.idle[i][0]))
                self.idle_bytes -= size
                return buffer, size, True
            self.peak = max(self.peak, self.mapped - self.idle_bytes + nbytes)
            while self.idle and self.mapped + nbytes > self.peak:
                size, _ = self.idle.pop(0)
                self.idle_bytes -= size
                self.mapped -= size
            self.mapped += nbytes
            return _new_mapping(nbytes), nbytes, True

    def give_back(self, nbytes: int, buffer: mmap.mmap) -> None:
        """``buffer`` is no longer referenced by any tensor: keep it idle while the pool is open."""
        with self.lock:
            if self.users:
                self.idle.append((nbytes, buffer))
                self.idle_bytes += nbytes
            else:
                self.mapped -= nbytes


_POOL = _Pool()


@contextmanager
def reusing() -> Iterator[None]:
    """A block in which :func:`anon_empty` buffers are reused once their tensors die (blocks may nest and
    run in several threads); idle buffers are unmapped when the last block ends."""
    _POOL.open()
    try:
        yield
    finally:
        _POOL.close()


def anon_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in its own anonymous mapping, unmapped as soon as it dies (inside
    :func:`reusing`: kept for the next buffer of its size instead).

    Transient multi-MB buffers from the C heap are kept by glibc after ``free`` (its adaptive mmap
    threshold and per-thread arenas), so a streaming export's RSS would creep up to several times the
    live data; a private mapping per buffer keeps RSS equal to what is alive (plus, inside ``reusing``,
    idle buffers bounded as :class:`_Pool` says).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _ANON_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    buffer, size, counted = _POOL.get(nbytes)
    out = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)
    if counted:
        # the storage object lives exactly as long as any view of this memory (torch keeps one Python
        # object per storage), so the buffer returns when nothing can read or write it any more
        weakref.finalize(out.untyped_storage(), _POOL.give_back, size, buffer).atexit = False
    return out


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype`` if it is floating point and ``dtype`` is given (an export's ``dtype=``), else ``t``
    itself; a cast on the CPU goes into an :func:`anon_empty` buffer."""
    if dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    if t.device.type != "cpu":
        return t.to(dtype)
    return anon_empty(tuple(t.shape), dtype).copy_(t)
