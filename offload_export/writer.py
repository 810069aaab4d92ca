"""A streaming safetensors writer: the header comes from the plan, tensor bytes arrive one at a time.

The file is byte-identical to ``safetensors.torch.save_file(tensors, metadata=...)`` of the same tensors (for
metadata of at most one key: safetensors serializes a longer map in random order, this writer in the order
given), but no shard is ever held in memory: tensors that lie next to each other in the file are written together
by ``pwritev`` straight from their own buffers (small ones sharing a call), or, when a tensor's bytes pass through
unchanged from a file (:class:`FileSpan`), copied by the kernel (``copy_file_range``) without entering the process
at all. A write's Python (checks, host views, the calls' buffers) and its system calls can run in two threads
(:meth:`ShardWriter.stage`).

Descriptors are bounded: a shard's file is opened at its first write, fsync-ed and closed as soon as its
last tensor is written, and at most ``max_open`` shards of one :class:`Descriptors` pool are open at
once (the least recently used one is closed and reopened later), so thousands of shards export under a
small ``ulimit -n``.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import itertools
import json
import math
import mmap
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import _aio
from ._store import SAFETENSORS_DTYPES, FileSpan, open_regular
from ._transfer import host_pieces

__all__ = ["Descriptors", "FileSpan", "ShardWriter", "TensorSpec", "crc32_combine", "range_crc32", "safetensors_layout",
           "streams"]

_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_DEFAULT_MAX_OPEN = 64
_WRITEBACK_STEP = 64 << 20  # bytes written before their disk writeback is started
_WRITE_CALL = 512 << 10  # bytes per pwritev (see _write_calls)
_IOV_MAX = 1024  # buffers per pwritev (Linux's UIO_MAXIOV)
_CRC_BESIDE = 256 << 10  # pieces from this size on are checksummed in other threads while being written
_CRC_BACKLOG = 64 << 20  # bytes whose checksum may still be pending (their buffers kept alive until then)
STREAMED = 1 << 20  # a GPU tensor from this size on is written through pinned buffers, never copied whole to the host
_CRC_PIECE = 4 << 20  # ... in parts of this size, one per task: zlib's CRC-32 runs at 2-3 GB/s per core
# safetensors lays tensors out by its ``Dtype`` enum, descending, then by name (not by element size: BF16
# comes before F16, F32 before U32 and I32, F8_E4M3 before I8 and U8)
_LAYOUT_ORDER = ("U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E8M0", "F8_E4M3",
                 "F8_E5M2", "I8", "U8", "F4", "BOOL")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: output name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def safetensors_layout(specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None
                       ) -> tuple[bytes, dict[str, int]]:
    """The header bytes of a safetensors file and each tensor's absolute byte offset in it.

    Tensors are laid out as safetensors does: by its dtype order, then by name.

    Raises:
        ValueError: a dtype safetensors cannot store, or a duplicate name.
    """
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate tensor names in one shard: {dup}")
    for s in specs:
        if s.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {s.name!r} has dtype {s.dtype}, which safetensors cannot store; "
                             f"pass dtype= to save_clean to cast it")
    order = sorted(specs, key=lambda s: (_LAYOUT_ORDER.index(_DTYPE_NAMES[s.dtype]), s.name))
    header: dict = {"__metadata__": metadata} if metadata else {}
    relative, pos = {}, 0
    for s in order:
        header[s.name] = {"dtype": _DTYPE_NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        relative[s.name] = pos
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = len(raw).to_bytes(8, "little") + raw
    return prefix, {name: len(prefix) + off for name, off in relative.items()}


_CRC_POLY = 0xEDB88320  # CRC-32 (zlib's), reflected


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial (reflected bit order), as zlib's ``multmodp``."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc1 = crc32(A)``, ``crc2 = crc32(B)`` and ``len(B)`` (zlib's
    ``crc32_combine``, which Python's ``zlib`` does not expose): pieces written in any order make one checksum."""
    return _multmodp(_x8n(len2), crc1) ^ crc2


@lru_cache(maxsize=1024)
def _x8n(n: int) -> int:
    """x^(8n) modulo the polynomial (zlib's ``x2nmodp(n, 3)``); cached: a shard's thousands of pieces (a MoE's
    per-expert tensors) have a few lengths, and this is most of a combine's work."""
    p, k = 1 << 31, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def _pieces(fd: int, offset: int, nbytes: int, size: int) -> Iterator[memoryview]:
    """``nbytes`` of an open file from ``offset``, read into one buffer of at most ``size`` bytes, a piece at a
    time (each piece is valid until the next is read).

    Raises:
        OSError: the file ends before ``offset + nbytes`` (EIO), or a read fails.
    """
    buf = memoryview(bytearray(min(size, max(1, nbytes))))
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [buf[:min(len(buf), nbytes - done)]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of the source file at byte {offset + done}")
        yield buf[:n]
        done += n


def range_crc32(fd: int, offset: int, nbytes: int) -> int:
    """CRC-32 of ``nbytes`` of an open file from ``offset``, read in pieces of at most 8 MiB (``zlib.crc32``
    releases the GIL: several run in parallel).

    Raises:
        OSError: the file ends before ``offset + nbytes`` (EIO), or a read fails.
    """
    crc = 0
    for piece in _pieces(fd, offset, nbytes, 8 << 20):
        crc = zlib.crc32(piece, crc)
    return crc


def default_max_open() -> int:
    """Descriptors one export may hold for its shards: 64, or an eighth of ``RLIMIT_NOFILE`` when lower."""
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return _DEFAULT_MAX_OPEN
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return _DEFAULT_MAX_OPEN
    return max(1, min(_DEFAULT_MAX_OPEN, soft // 8))


class Descriptors:
    """At most ``max_open`` shard files open at once across the writers that share this pool (LRU).

    Args:
        max_open: the cap; default :func:`default_max_open`.
    """

    def __init__(self, max_open: int | None = None):
        self.max_open = max(1, max_open or default_max_open())
        self._open: OrderedDict[int, ShardWriter] = OrderedDict()
        self._lock = threading.Lock()

    def _use(self, writer: ShardWriter) -> None:
        """``writer`` is about to write: mark it most recent; close the least recent beyond the cap."""
        with self._lock:
            self._open[id(writer)] = writer
            self._open.move_to_end(id(writer))
            evict = []
            while len(self._open) > self.max_open:
                _, victim = self._open.popitem(last=False)
                evict.append(victim)
        for victim in evict:
            victim._close_fd()

    def _forget(self, writer: ShardWriter) -> None:
        with self._lock:
            self._open.pop(id(writer), None)

    @property
    def open_count(self) -> int:
        with self._lock:
            return len(self._open)


def _advise_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start the disk writeback of a just-written range (so a later fsync has little left); a hint only.

    Only the whole pages inside the range: a page shared with the next tensor, written back now, would be
    dirtied again and written twice; such pages are left to the fsync.
    """
    advise = getattr(os, "posix_fadvise", None)  # absent on macOS and Windows
    start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if advise is None or end <= start:
        return
    try:
        advise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges in file order, those that touch joined."""
    out: list[tuple[int, int]] = []
    for at, n in sorted(ranges):
        if out and out[-1][0] + out[-1][1] == at:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((at, n))
    return out


def _pwrite_all(fd: int, buffers: Sequence[memoryview], offset: int) -> None:
    """Write ``buffers`` one after the other from ``offset`` (:func:`_write_calls` of their :func:`_planned_calls`).

    Raises:
        OSError: a write fails, or writes nothing (EIO).
    """
    _write_calls(fd, _planned_calls(buffers, offset))


def _planned_calls(buffers: Sequence[memoryview], offset: int) -> list[tuple[int, list[memoryview]]]:
    """``(offset, views)`` of the ``pwritev`` calls that write ``buffers`` one after the other from ``offset``: many
    small buffers (a MoE's per-expert tensors) in one call, a large one in several (:func:`_calls`)."""
    calls, at = [], offset
    for call in _calls(buffers):
        calls.append((at, call))
        at += sum(len(b) for b in call)
    return calls


def _write_calls(fd: int, calls: Sequence[tuple[int, list[memoryview]]]) -> None:
    """Make the ``pwritev`` calls of :func:`_planned_calls`; again for the rest of a call after a short write.

    The calls are submitted together where the system allows (:func:`offload_export._aio.pwritev_many`): every system
    call hands the GIL over, and taking it back waits for the other threads' Python (up to the switch interval), so
    a system call per 512 KiB paces the writer by the pack's Python rather than by the disk
    (``benchmarks/bench_writer_beside.py``). Calls larger than 512 KiB would save those waits too but cost the kernel
    more: on one Linux 6.18 / ext4 VM, 1-8 MiB calls took 1.5-3.5 x the system time of 512 KiB ones
    (``benchmarks/bench_write_calls.py``), and an int8 export writing each 6 MiB weight in one call took 2.1-2.6 s
    against 1.4-2.0 s.

    Raises:
        OSError: a write fails, or writes nothing (EIO).
    """
    done = _aio.pwritev_many(fd, calls) if len(calls) > 1 else []
    for i, (at, call) in enumerate(calls):
        left = sum(len(b) for b in call)
        n = done[i] if i < len(done) else 0  # what the batch wrote of it; short or failed: the rest again here
        while True:
            at, left = at + n, left - n
            if not left:
                break
            if n:
                call = _byte_range(call, n, left)
            n = os.pwritev(fd, call, at)
            if n <= 0:
                raise OSError(errno.EIO, f"pwritev wrote nothing at byte {at}")


def _calls(buffers: Sequence[memoryview]) -> Iterator[list[memoryview]]:
    """``buffers`` cut into the lists of views that :func:`_write_calls` writes a call each (at most 512 KiB and
    1024 views), empty ones left out."""
    call, size = [], 0
    for b in buffers:
        while len(b):
            piece = b[:_WRITE_CALL - size]
            call.append(piece)
            size += len(piece)
            b = b[len(piece):]
            if size == _WRITE_CALL or len(call) == _IOV_MAX:
                yield call
                call, size = [], 0
    if call:
        yield call


def _byte_range(buffers: Sequence[memoryview], start: int, nbytes: int, ends: Sequence[int] | None = None
                ) -> list[memoryview]:
    """Bytes ``start`` to ``start + nbytes`` of ``buffers`` laid one after the other, as views into them.

    ``ends``: where each buffer ends (``itertools.accumulate`` of their lengths), for a caller that cuts one run of
    buffers many times: the first buffer is then found by bisection, not by walking from the run's start."""
    if ends is None:
        ends = list(itertools.accumulate(len(b) for b in buffers))
    out, stop = [], start + nbytes
    i = bisect.bisect_right(ends, start)  # the first buffer ending after ``start``
    while i < len(buffers) and ends[i] - len(buffers[i]) < stop:
        pos = ends[i] - len(buffers[i])
        lo, hi = max(start - pos, 0), min(stop - pos, len(buffers[i]))
        if lo < hi:
            out.append(buffers[i][lo:hi])
        i += 1
    return out


def _crc_of(buffers: Sequence[memoryview]) -> int:
    crc = 0
    for b in buffers:
        crc = zlib.crc32(b, crc)
    return crc


def _host_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes on the host (moved there if needed), C order; the view keeps the tensor alive.

    Through ``ctypes`` rather than ``Tensor.numpy()``, which hands the GIL over: 0.2 ms a tensor beside a busy
    Python thread, as much as writing the tensor."""
    data = (tensor if tensor.is_cpu else tensor.to("cpu")).contiguous()
    if data.is_neg() or data.is_conj():  # a lazily negated view: its memory holds the other values
        data = data.resolve_neg().resolve_conj()
    nbytes = data.numel() * data.element_size()
    if not nbytes:
        return memoryview(b"")
    if not data.data_ptr():  # no memory of its own (autograd's zero tensor): its values made real
        data = data.clone()
    array = (ctypes.c_char * nbytes).from_address(data.data_ptr())
    array.owner = data
    return memoryview(array).cast("B")


def streams(t: torch.Tensor | FileSpan) -> bool:
    """Whether :meth:`ShardWriter.write_many` streams ``t`` from its GPU (a GPU tensor of at least
    :data:`STREAMED` bytes), rather than copying it to the host first."""
    return isinstance(t, torch.Tensor) and t.is_cuda and t.numel() * t.element_size() >= STREAMED


def _copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` between files inside the kernel; ``pread``/``pwrite`` through 512 KiB where unsupported."""
    done = 0
    copy = getattr(os, "copy_file_range", None)
    while copy is not None and done < nbytes:
        try:
            n = copy(src_fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ETXTBSY, errno.EPERM):
                break  # e.g. across filesystems on old kernels, or a filesystem without support
            raise
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of the source file at byte {src_offset + done}")
        done += n
    for piece in _pieces(src_fd, src_offset + done, nbytes - done, _WRITE_CALL):
        _pwrite_all(dst_fd, [piece], dst_offset + done)
        done += len(piece)


def _steps(nbytes: int) -> Iterator[tuple[int, int]]:
    """``(start, length)`` of the 64 MiB steps in which ``nbytes`` are written (:meth:`ShardWriter._in_steps`)."""
    for done in range(0, nbytes, _WRITEBACK_STEP):
        yield done, min(_WRITEBACK_STEP, nbytes - done)


def _runs(tensors: Sequence[tuple[int, str, memoryview | torch.Tensor]]) -> Iterator[tuple[int, list]]:
    """``(offset, buffers)`` of each run of ``(offset, name, bytes or tensor)`` (sorted by offset) that lie end to end."""
    start, run, end = 0, [], None
    for at, _, data in tensors:
        if run and at != end:
            yield start, run
            run = []
        if not run:
            start = at
        run.append(data)
        end = at + (data.numel() * data.element_size() if isinstance(data, torch.Tensor) else len(data))
    if run:
        yield start, run


class ShardWriter:
    """Write one safetensors file whose header is known up front; tensors may arrive in any order.

    The file is created (header written) at the first write, fsync-ed and closed right after the last
    planned tensor; between writes its descriptor may be closed by the shared ``descriptors`` pool.

    With ``checksums``, the CRC-32 of the file's bytes is computed as they are written, beside each write (a
    tensor from its own buffer, a copied span from its source, whose pages the copy reads too) rather than read
    back after: the writer starts each range's writeback and lets the kernel drop its pages, so reading the file
    again would read the disk. It is :attr:`crc32` once the file is complete.

    Args:
        path: the file to create (truncated if it exists).
        specs: every tensor the file will hold.
        metadata: the ``__metadata__`` strings.
        descriptors: the pool that caps open files; a private one of one descriptor by default.
        checksums: where the CRC-32 of each piece is computed (threads beside the writing one); None: no CRC.
        layout: ``safetensors_layout(specs, metadata)`` when the caller has it already.
    """

    def __init__(self, path: str, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None, *,
                 descriptors: Descriptors | None = None, checksums: Executor | None = None,
                 layout: tuple[bytes, dict[str, int]] | None = None):
        self.path = path
        self._specs = {s.name: s for s in specs}
        self._header, self._offsets = layout if layout is not None else safetensors_layout(specs, metadata)
        self.nbytes = len(self._header) + sum(s.nbytes for s in specs)
        self._checksums = checksums
        # (offset, length, crc) of each piece, the oldest pending ones first; a pending crc is a Future
        self._crcs: list[tuple[int, int, Future | int]] = [(0, len(self._header), zlib.crc32(self._header))]
        self._crc_pending = 0  # bytes of the pieces whose crc is a Future
        self._crc_settled = 1  # the pieces before this index hold their crc
        self.crc32: int | None = None
        self._pending = set(self._specs)  # not written yet
        self._unclaimed = set(self._specs)  # not staged yet (:meth:`stage`)
        self._pool = descriptors if descriptors is not None else Descriptors(1)
        self._fd = -1
        self._created = False
        self._done = False
        self._lock = threading.RLock()
        self._unadvised: list[tuple[int, int]] = []  # (offset, length) written since writeback was last started
        self._unadvised_bytes = 0
        self._advising: Future | None = None  # the last writeback started in a checksum thread

    # -- descriptors
    def _open_locked(self) -> int:
        """The descriptor, opened (and the header written at the first open) if needed; hold ``_lock``."""
        if self._done:
            raise RuntimeError(f"{self.path}: already closed")
        if self._fd < 0:
            flags = os.O_WRONLY | (0 if self._created else os.O_CREAT | os.O_TRUNC)
            self._fd = os.open(self.path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
            if not self._created:
                self._created = True
                _pwrite_all(self._fd, [memoryview(self._header)], 0)
        return self._fd

    def _close_fd(self) -> None:
        """Close the descriptor (evicted, aborted); the data already written stays in the page cache."""
        with self._lock:
            if self._fd >= 0:
                self._settle_advice()  # it holds the number of the descriptor, which another file may get next
                fd, self._fd = self._fd, -1
                os.close(fd)

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    # -- writing
    def _check(self, name: str, tensor: torch.Tensor | FileSpan) -> None:
        """Raise ``ValueError`` unless ``tensor`` is what the plan has for ``name``, not staged before."""
        spec = self._specs.get(name)
        if spec is None or name not in self._unclaimed:
            raise ValueError(f"tensor {name!r} is not expected in {os.path.basename(self.path)} (or written twice)")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name!r}: planned {spec.dtype} {list(spec.shape)}, "
                             f"got {tensor.dtype} {list(tensor.shape)}")
        if isinstance(tensor, FileSpan) and tensor.nbytes != spec.nbytes:
            raise ValueError(f"tensor {name!r}: {tensor.path} holds {tensor.nbytes} bytes for it, expected {spec.nbytes}")

    def write(self, name: str, tensor: torch.Tensor | FileSpan) -> None:
        """:meth:`write_many` of one tensor."""
        self.write_many([(name, tensor)])

    def write_many(self, items: Sequence[tuple[str, torch.Tensor | FileSpan]]) -> None:
        """Write each ``(name, tensor)`` now: :meth:`stage` them and make the returned writes.

        Raises:
            ValueError: as :meth:`stage`; nothing of ``items`` is written then.
        """
        self.stage(items)()

    def stage(self, items: Sequence[tuple[str, torch.Tensor | FileSpan]]) -> Callable[[], None]:
        """Prepare the writes of each ``(name, tensor)`` (any device; moved to the CPU), or the copy of a
        :class:`FileSpan`'s bytes, and return the function that makes them.

        The Python of a write is done here: the tensors checked, their host views, the runs of tensors that lie next to
        each other in the file (a unit's tensors of one dtype do; small ones share a system call) cut into their
        ``pwritev`` calls, the checksums of large ones started. The returned function makes the system calls (the file
        opened, written, the writeback started), so that one thread can stage the next unit while another writes the
        one before. It must be called once, after which the shard is fsync-ed and closed if every planned tensor has
        been written; the staged writes of one file may run in any order, one at a time. ``items`` (their memory) must
        stay unchanged until it returns.

        Raises:
            ValueError: a name is not in this shard, was already staged or is given twice, or its dtype/shape (a
                span's size) differ; nothing of ``items`` is staged then.
        """
        if len({name for name, _ in items}) != len(items):
            raise ValueError(f"{os.path.basename(self.path)}: a tensor given twice in one write")
        for name, tensor in items:
            self._check(name, tensor)
        self._unclaimed.difference_update(name for name, _ in items)
        spans = [(name, t) for name, t in items if isinstance(t, FileSpan)]
        streamed = sorted(((self._offsets[name], name, t) for name, t in items if streams(t)), key=lambda e: e[0])
        tensors = sorted(((self._offsets[name], name, _host_bytes(t)) for name, t in items
                          if not isinstance(t, FileSpan) and not streams(t)), key=lambda e: e[0])
        runs = [self._staged_run(at, buffers) for at, buffers in _runs([t for t in tensors if len(t[2])])]

        def write() -> None:
            for name, span in spans:
                self._copy(name, span)
            if not tensors and not streamed:
                return
            self._pool._use(self)  # before taking our lock: it may close other writers' files
            with self._lock:
                fd = self._open_locked()
                for device in dict.fromkeys(t.device for *_, t in streamed):
                    self._stream(fd, [(at, name, t) for at, name, t in streamed if t.device == device])
                for run in runs:
                    run(fd)
                for _, name, _ in tensors:  # an empty tensor has no bytes to place: written all the same
                    self._wrote(name)

        return write

    def _staged_run(self, at: int, buffers: list[memoryview]) -> Callable[[int], None]:
        """The write of ``buffers``, laid end to end from ``at``: its calls planned and its checksum started now, the
        writes made by the returned function (given the descriptor; hold ``_lock``)."""
        ends = list(itertools.accumulate(len(b) for b in buffers))
        nbytes = ends[-1]
        crcs = self._checksum(at, nbytes, lambda a, n: _crc_of(_byte_range(buffers, a, n, ends)))
        steps = [_planned_calls(_byte_range(buffers, done, n, ends), at + done) for done, n in _steps(nbytes)]

        def write(fd: int) -> None:
            self._in_steps(fd, at, nbytes, lambda done, n: _write_calls(fd, steps[done // _WRITEBACK_STEP]))
            self._add_crcs(crcs)

        return write

    def _stream(self, fd: int, items: list[tuple[int, str, torch.Tensor]]) -> None:
        """Write GPU tensors (``(offset, name, tensor)`` sorted by offset, on one device) through pinned buffers: the
        tensors that lie end to end in the file as one run of bytes in 16 MiB pieces (:func:`host_pieces`), each piece
        checksummed beside its write and released (the generator resumed) only when both are done, while the next
        one is copied; hold ``_lock``."""
        tensors = [(at, name, t.detach().contiguous()) for at, name, t in items]
        for start, run in _runs(tensors):
            self._stream_run(fd, start, run)
        for _, name, _ in items:
            self._wrote(name)

    def _stream_run(self, fd: int, start: int, run: list[torch.Tensor]) -> None:
        """Write ``run`` (GPU tensors laid end to end from ``start``) piece by piece (:func:`host_pieces`) in the
        writeback steps of :meth:`_in_steps`; hold ``_lock``. A piece that ends past a step is written whole (the
        step's range is only a hint for the writeback), and the next step writes from where it ended."""
        pieces, at = host_pieces(run), start

        def write(done: int, n: int) -> None:
            nonlocal at
            while at < start + done + n:
                data = _host_bytes(next(pieces))
                crcs = self._checksum(at, len(data), lambda a, m, data=data: zlib.crc32(data[a:a + m]))
                _pwrite_all(fd, [data], at)
                self._add_crcs(crcs, backlog=0)
                at += len(data)

        self._in_steps(fd, start, sum(t.numel() * t.element_size() for t in run), write)

    def _copy(self, name: str, span: FileSpan) -> None:
        """Write ``name`` from the bytes of ``span`` (a range of another file, checked by :meth:`stage`), copied inside
        the kernel."""
        nbytes = self._specs[name].nbytes
        self._pool._use(self)
        with self._lock:
            fd = self._open_locked()
            if nbytes:
                src = open_regular(span.path)
                at, crcs = self._offsets[name], []
                try:
                    # read beside the kernel's copy of the same pages: one of the two reads the disk
                    crcs = self._checksum(at, nbytes, lambda a, n: range_crc32(src, span.offset + a, n))
                    self._in_steps(fd, at, nbytes, lambda done, n: _copy_range(src, span.offset + done, fd, at + done, n))
                    self._add_crcs(crcs, backlog=0)  # they read the source: a failure is this copy's
                finally:
                    wait([c for *_, c in crcs if isinstance(c, Future)])  # they read ``src``: close it only after
                    os.close(src)
            self._wrote(name)

    def _in_steps(self, fd: int, offset: int, nbytes: int, write: Callable[[int, int], None]) -> None:
        """``write(done, n)`` over ``nbytes`` in steps of 64 MiB; hold ``_lock``. The writeback of what was written
        is started each time 64 MiB more were written, by one tensor or by many small ones (a MoE's per-expert
        tensors), so that the disk works meanwhile rather than in the fsync at the end; ranges that touch are
        merged (the pages they share are written once)."""
        for done, n in _steps(nbytes):
            write(done, n)
            self._unadvised.append((offset + done, n))
            self._unadvised_bytes += n
            if self._unadvised_bytes >= _WRITEBACK_STEP:
                self._advise(fd, _merged(self._unadvised))
                self._unadvised, self._unadvised_bytes = [], 0

    def _advise(self, fd: int, ranges: list[tuple[int, int]]) -> None:
        """Start the writeback of ``ranges`` (:func:`_advise_writeback`): in a checksum thread when there are any,
        so that the kernel's work of starting it runs beside the next writes, else here; hold ``_lock``."""
        if self._checksums is None:
            for at, n in ranges:
                _advise_writeback(fd, at, n)
            return
        self._settle_advice()
        self._advising = self._checksums.submit(lambda: [_advise_writeback(fd, at, n) for at, n in ranges])

    def _settle_advice(self) -> None:
        """Wait for the writeback started in a checksum thread to be under way (a hint: its failure is ignored)."""
        if self._advising is not None:
            wait([self._advising])
            self._advising = None

    def _checksum(self, at: int, nbytes: int, crc_of: Callable[[int, int], int]
                  ) -> list[tuple[int, int, Future | int]]:
        """The CRC-32 of the ``nbytes`` being written at ``at``, as ``(offset, length, crc)`` pieces: ``crc_of(a, n)``
        is that of its bytes ``a`` to ``a + n``. A large piece is split among the ``checksums`` threads and computed
        beside the write; a small one here (handing it to another thread costs more than its CRC)."""
        if self._checksums is None:
            return []
        if nbytes < _CRC_BESIDE:
            return [(at, nbytes, crc_of(0, nbytes))]
        return [(at + a, n, self._checksums.submit(crc_of, a, n))
                for a in range(0, nbytes, _CRC_PIECE) for n in [min(_CRC_PIECE, nbytes - a)]]

    def _add_crcs(self, pieces: list[tuple[int, int, Future | int]], backlog: int | None = None) -> None:
        """Note the pieces' checksums; wait for the oldest pending ones until at most ``backlog`` bytes (64 MiB by
        default) are pending: a pending piece keeps its buffer alive, outside the export's memory budget."""
        backlog = _CRC_BACKLOG if backlog is None else backlog
        self._crcs += pieces
        self._crc_pending += sum(n for _, n, crc in pieces if isinstance(crc, Future))
        while self._crc_pending > backlog:
            offset, n, crc = self._crcs[self._crc_settled]
            if isinstance(crc, Future):
                self._crcs[self._crc_settled] = (offset, n, crc.result())
                self._crc_pending -= n
            self._crc_settled += 1

    def _wrote(self, name: str) -> None:
        self._pending.discard(name)
        if not self._pending:
            self._finish()

    def _finish(self) -> None:
        """fsync and close: every planned tensor is in the file; its CRC-32 from the pieces (in file order)."""
        fd = self._open_locked()
        try:
            os.fsync(fd)
        finally:
            self._pool._forget(self)
            self._close_fd()
            self._done = True
        if self._checksums is not None:
            self._add_crcs([], backlog=0)
            crc, end = 0, 0
            for offset, nbytes, piece in sorted(self._crcs):
                if offset != end:
                    raise RuntimeError(f"{self.path}: bytes {end}-{offset} were checksummed by no write")
                crc, end = crc32_combine(crc, piece, nbytes), end + nbytes
            self.crc32 = crc

    @property
    def complete(self) -> bool:
        return not self._pending

    def close(self) -> None:
        """Make sure the file is complete, on disk and closed (a no-op once its last tensor was written).

        Raises:
            RuntimeError: some planned tensors were never written.
        """
        if self._pending:
            missing = sorted(self._pending)
            self.abort()
            raise RuntimeError(f"{self.path}: {len(missing)} planned tensor(s) never written, e.g. {missing[:3]}")
        with self._lock:
            if not self._done:
                self._finish()  # a shard that plans no tensors: header only

    def abort(self) -> None:
        """Close without syncing (the caller removes the file)."""
        with self._lock:
            self._pool._forget(self)
            self._close_fd()
            self._done = True
