"""``verify()``: stream a written checkpoint against the model, one unit at a time, and list every mismatch.

The expected tensors come from the export's own path (plan, read, fold, cast, convert); the file bytes
are read with ``pread`` into buffers of one tensor, never through mmap, so memory stays bounded like the
export's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import struct
import tempfile
import threading
import time
from collections.abc import Iterable
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ._store import MAX_HEADER_BYTES, SAFETENSORS_DTYPES, FileSpan, pread_exact
from .checkpoint import write_model_files
from .job import INDEX_NAME, Job, prepare_job
from .pipeline import UnitReader, stream
from .plan import Unit
from .vllm_fq import VLLM_FQ_STATE_NAME
from .writer import TensorSpec

__all__ = ["VerifyReport", "check", "check_staged", "verify"]

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_ANY_SHARD_SIZE = 2**62  # verify reads the shards from the files; only the plan's units matter
_MAX_LISTED = 20  # per kind of mismatch in the repr; ``mismatches`` keeps them all


@dataclass
class VerifyReport:
    """What :func:`verify` found.

    Attributes:
        out_dir: the checkpoint directory.
        tensors: weight tensors whose bytes were compared; bytes: their total size.
        mismatches: every problem found, one line each (empty when the checkpoint matches).
        seconds: wall time of the check.
    """

    out_dir: str
    tensors: int = 0
    bytes: int = 0
    mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the checkpoint matches the model exactly."""
        return not self.mismatches

    def __repr__(self) -> str:
        status = "OK" if self.ok else f"{len(self.mismatches)} mismatch(es)"
        lines = [f"VerifyReport({self.out_dir}): {status}",
                 f"  {self.tensors} tensors, {self.bytes / 1e6:.1f} MB compared in {self.seconds:.2f} s"]
        lines += [f"  - {m}" for m in self.mismatches[:_MAX_LISTED]]
        if len(self.mismatches) > _MAX_LISTED:
            lines.append(f"  ... and {len(self.mismatches) - _MAX_LISTED} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Entry:
    """One tensor of a safetensors file as its header describes it."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute
    nbytes: int


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return TensorSpec("", dtype, shape).nbytes


def _raw_header(path: Path, problems: list[str]) -> tuple[int, dict, int] | None:
    """``(data start, header, file size)`` of a safetensors file, the header as written (``__metadata__``
    included), or None (with the problem noted). Parsed here, not by ``_store``'s strict reader, which refuses
    the whole file: a truncated or damaged shard still names its tensors."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else size
            if length > min(size - 8, MAX_HEADER_BYTES):
                problems.append(f"{name}: not a safetensors file (header length beyond the end of the file)")
                return None
            header = json.loads(f.read(length))
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        problems.append(f"{name}: unreadable safetensors header ({e})")
        return None
    if not isinstance(header, dict):
        problems.append(f"{name}: unreadable safetensors header (a JSON {type(header).__name__}, not an object)")
        return None
    return 8 + length, header, size


def _read_header(path: Path, problems: list[str]) -> tuple[dict[str, _Entry], object] | None:
    """The tensor entries of a safetensors file and its ``__metadata__``, or None (with the problem noted).

    Every entry whose dtype, shape and offsets can be read is kept, also when the file is cut short or its
    entries do not tile the data; each such problem is noted (the tensors past the end are reported by name
    when their bytes are compared).
    """
    raw = _raw_header(path, problems)
    if raw is None:
        return None
    (start, header, size), name = raw, path.name
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        problems.append(f"{name}: __metadata__ is not a {{string: string}} object: {metadata!r}")
    entries: dict[str, _Entry] = {}
    spans = []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape = SAFETENSORS_DTYPES[meta["dtype"]], tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: malformed header entry for {key!r}: {meta!r}")
            continue
        if end - begin != _nbytes(dtype, shape):
            problems.append(f"{name}: {key} spans {end - begin} bytes, its dtype and shape need "
                            f"{_nbytes(dtype, shape)}")
        entries[key] = _Entry(name, dtype, shape, start + begin, end - begin)
        spans.append((begin, end, key))
    pos = 0
    for begin, end, key in sorted(spans):
        if begin != pos:
            problems.append(f"{name}: {key} starts at data byte {begin}, expected {pos} (gap or overlap)")
        pos = max(pos, end)
    if start + pos != size:
        problems.append(f"{name}: file is {size} bytes, its header describes {start + pos} (truncated or trailing data)")
    return entries, metadata


def _index(out_dir: Path, problems: list[str]) -> tuple[dict[str, str] | None, int | None]:
    """``(tensor -> file, metadata.total_size)`` from the index; ``(None, None)`` for a single-file checkpoint."""
    path = out_dir / INDEX_NAME
    if not path.exists():
        if not (out_dir / "model.safetensors").exists():
            problems.append(f"missing file: neither {INDEX_NAME} nor model.safetensors is in {out_dir}")
            return {}, None
        return None, None
    try:
        index = json.loads(path.read_text())
        weight_map, total = index["weight_map"], (index.get("metadata") or {}).get("total_size")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError("weight_map is not a {tensor: file} mapping")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        problems.append(f"{INDEX_NAME}: unreadable ({e})")
        return {}, None
    if not isinstance(total, int):
        problems.append(f"{INDEX_NAME}: metadata.total_size is {total!r}, expected the weights' byte count")
        total = None
    return weight_map, total


def _read_entries(out_dir: Path, problems: list[str]) -> tuple[dict[str, _Entry], set[str]]:
    """Every weight tensor's file entry and the weight files; index <-> files <-> headers checked."""
    weight_map, total = _index(out_dir, problems)
    files = sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]
    entries: dict[str, _Entry] = {}
    for file in files:
        if not (out_dir / file).is_file():
            problems.append(f"missing file: {file} (listed in {INDEX_NAME})")
            continue
        read = _read_header(out_dir / file, problems)
        if read is None:
            continue
        header = read[0]
        for key, entry in header.items():
            if weight_map is not None and weight_map.get(key) != file:
                where = f"maps it to {weight_map[key]}" if key in weight_map else "does not list it"
                problems.append(f"{file}: holds {key}, but {INDEX_NAME} {where}")
            entries.setdefault(key, entry)
        for key in sorted(k for k, f in (weight_map or {}).items() if f == file and k not in header):
            problems.append(f"{INDEX_NAME}: maps {key} to {file}, whose header does not have it")
    actual = sum(e.nbytes for e in entries.values())
    if total is not None and total != actual:
        problems.append(f"{INDEX_NAME}: metadata.total_size is {total}, the shards hold {actual} bytes")
    return entries, set(files)


_CHUNK = 1 << 20  # bytes compared at a time: two chunks fit in this core's L2 cache
_PREFETCH_MIN = 256 << 20  # checkpoint bytes asked of the disk ahead of the comparisons, at least
_WILLNEED_FALLBACK = 128 << 10  # Linux's default read_ahead_kb


@lru_cache(maxsize=64)
def _willneed_step(device: int) -> int:
    """The most bytes one ``posix_fadvise(WILLNEED)`` reads on the block device ``device`` (an ``st_dev``).

    Linux reads at most ``max(read_ahead_kb, max_sectors_kb)`` of the device's queue per call and silently
    drops the rest of the range; the queue of a partition is its disk's. 128 KiB where there is no queue
    (not Linux, not a block device).
    """
    base = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    for queue in (base / "queue", base / ".." / "queue"):
        try:
            kb = max(int((queue / name).read_text()) for name in ("read_ahead_kb", "max_sectors_kb"))
        except (OSError, ValueError):
            continue
        return max(kb << 10, _WILLNEED_FALLBACK)
    return _WILLNEED_FALLBACK


class _Prefetch:
    """A thread that asks the kernel for the file bytes the comparisons need next, ``window`` bytes ahead.

    ``posix_fadvise(WILLNEED)`` starts the disk reads and returns, so the disk works while earlier tensors
    are folded and compared instead of each comparison's ``pread`` waiting for it. Right after an export
    part of the checkpoint is not in the page cache (the writer drops written pages once their writeback
    starts: measured, the 311 MB embedding of a 1.19 GB export), and a checkpoint checked later may be
    cold altogether, with the source files of the tensors compared file to file. Only the page cache holds
    the prefetched bytes (not the process's memory); the window keeps them from pushing out the pages
    compared next. A hint: a no-op without ``posix_fadvise``.

    Args:
        ranges: ``(path, offset, nbytes)`` in the order the comparisons read them.
        window: bytes requested ahead of the comparisons.
    """

    def __init__(self, ranges: list[tuple[str, int, int]], window: int):
        self._ranges, self._window = ranges, window
        self._target, self._closed = window, False
        self._cond = threading.Condition()
        self._thread = None
        if hasattr(os, "posix_fadvise"):  # absent on macOS and Windows
            self._thread = threading.Thread(target=self._run, name="offload-export-verify-prefetch", daemon=True)
            self._thread.start()

    def advance(self, compared: int) -> None:
        """The first ``compared`` bytes of the ranges are compared or being compared: request ``window`` beyond."""
        with self._cond:
            self._target = compared + self._window
            self._cond.notify()

    def close(self) -> None:
        """Stop requesting (a request under way ends at its next step) and wait for the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        requested = 0
        for path, offset, nbytes in self._ranges:
            with self._cond:
                while not self._closed and requested >= self._target:
                    self._cond.wait()
                if self._closed:
                    return
            self._advise(path, offset, nbytes)
            requested += nbytes

    def _advise(self, path: str, offset: int, nbytes: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return  # the comparison reports it
        try:
            step = _willneed_step(os.fstat(fd).st_dev)
            for pos in range(offset, offset + nbytes, step):
                if self._closed:
                    return
                os.posix_fadvise(fd, pos, min(step, offset + nbytes - pos), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


class _Buffers:
    """Two reused chunk buffers (expected bytes, file bytes): a comparison holds 2 MiB, never a tensor's worth."""

    def __init__(self):
        self._want = self._got = None

    def views(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._want is None or len(self._want) < n:
            size = min(_CHUNK, max(n, 1 << 16))
            self._want, self._got = (torch.empty(size, dtype=torch.uint8) for _ in range(2))
        return self._want[:n], self._got[:n]


def _libc_memcmp():
    try:
        memcmp = ctypes.CDLL(ctypes.util.find_library("c") or None).memcmp
    except (OSError, AttributeError, TypeError):
        return None
    memcmp.argtypes, memcmp.restype = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t), ctypes.c_int
    return memcmp


_MEMCMP = _libc_memcmp()


def _equal_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous CPU uint8 tensors of one length hold the same bytes: libc's ``memcmp`` (about
    12 GB/s here, without the GIL) where there is one, else ``torch.equal`` (an elementwise compare, 0.5 GB/s)."""
    if _MEMCMP is None:
        return torch.equal(a, b)
    return _MEMCMP(a.data_ptr(), b.data_ptr(), a.numel()) == 0


def _same_bytes(expected: torch.Tensor | FileSpan, path: Path, offset: int, nbytes: int, bufs: _Buffers) -> bool:
    """Whether the file's ``nbytes`` at ``offset`` are ``expected``'s bytes (a tensor's, or another file's).

    One thread, a chunk at a time: both chunks stay in the CPU cache between the ``pread`` and the
    ``memcmp``; reading the two files from two threads in 8 MiB chunks measured 2 x slower here.
    """
    span = expected if isinstance(expected, FileSpan) else None
    flat = None if span is not None else expected.reshape(-1).view(torch.uint8)
    with ExitStack() as stack:  # each descriptor closed whatever fails, the other's open or close included
        fd = os.open(path, os.O_RDONLY)
        stack.callback(os.close, fd)
        src = os.open(span.path, os.O_RDONLY) if span is not None else -1
        if src >= 0:
            stack.callback(os.close, src)
        for pos in range(0, nbytes, _CHUNK):
            n = min(_CHUNK, nbytes - pos)
            want, got = bufs.views(n)
            if span is not None:
                pread_exact(src, want, span.offset + pos)
            pread_exact(fd, got, offset + pos)
            if not _equal_bytes(want if span is not None else flat[pos:pos + n], got):
                return False
        return True


def _compare(name: str, expected: torch.Tensor | FileSpan, entry: _Entry, out_dir: Path, problems: list[str],
             bufs: _Buffers | None = None) -> bool:
    """Compare ``expected`` with the file's bytes for ``name``; True when they were compared.

    Bytes are compared a chunk at a time (a :class:`FileSpan` file to file, without decoding); only a
    mismatch reads the whole tensor, to say which elements differ.
    """
    if expected.dtype != entry.dtype or tuple(expected.shape) != entry.shape:
        problems.append(f"{name}: expected {expected.dtype} {list(expected.shape)}, "
                        f"{entry.file} has {entry.dtype} {list(entry.shape)}")
        return False
    if not isinstance(expected, FileSpan):
        expected = expected.detach().to("cpu").contiguous()
    if not entry.nbytes:
        return True
    bufs = bufs or _Buffers()
    try:
        if _same_bytes(expected, out_dir / entry.file, entry.offset, entry.nbytes, bufs):
            return True
        want = expected.read() if isinstance(expected, FileSpan) else expected
        got = FileSpan(str(out_dir / entry.file), entry.offset, want.dtype, tuple(want.shape)).read()
    except OSError as e:
        problems.append(f"{name}: cannot read its bytes from {entry.file} ({e})")
        return False
    a = want.reshape(-1).view(torch.uint8).view(want.numel(), -1)
    b = got.reshape(-1).view(torch.uint8).view(want.numel(), -1)
    differ = (a != b).any(dim=1)
    first = int(differ.nonzero()[0])
    problems.append(f"{name}: {int(differ.sum())} of {want.numel()} elements differ in {entry.file} "
                    f"(first at flat index {first}: expected {want.reshape(-1)[first].item()}, "
                    f"file has {got.reshape(-1)[first].item()})")
    return True


def _check_names(specs: Iterable[TensorSpec], entries: dict[str, _Entry], dropped: dict[str, str],
                 problems: list[str]) -> None:
    expected = {s.name for s in specs}
    for name in sorted(expected - set(entries)):
        problems.append(f"missing tensor: {name} is not in the checkpoint")
    for name in sorted(set(entries) - expected):
        why = f" (it is {dropped[name]})" if name in dropped else ""
        problems.append(f"unexpected tensor: {name} should not be among the weights{why}")


def _check_files(out_dir: Path, weight_files: set[str], expected: set[str], problems: list[str]) -> None:
    """Directories, non-safetensors weight files (.bin, .pt, ...), unreferenced weight files and missing model files."""
    names = {p.name: p for p in out_dir.iterdir()}
    for name, path in sorted(names.items()):
        if path.is_dir():
            problems.append(f"unexpected directory: {name}")
        elif name.endswith(".safetensors") and name not in weight_files and name not in expected:
            problems.append(f"unexpected file: {name} (a weight file that the index does not reference)")
        elif name.endswith(_PICKLE_SUFFIXES) and name != VLLM_FQ_STATE_NAME:  # the opt-in vLLM file
            problems.append(f"unexpected file: {name} (only safetensors weights belong in this checkpoint)")
    for name in sorted(expected - set(names)):
        problems.append(f"missing file: {name}")


def _compare_json(name: str, want: dict, got_path: Path, problems: list[str]) -> None:
    try:
        got = json.loads(got_path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{name}: unreadable ({e})")
        return
    if not isinstance(got, dict):
        problems.append(f"{name}: not a JSON object")
        return
    for key in sorted(set(got) - set(want)):
        problems.append(f"{name}: has {key!r}, which the export does not write")
    for key in sorted(set(want) - set(got)):
        problems.append(f"{name}: lacks {key!r} (the export writes {want[key]!r})")
    for key in sorted(k for k in set(want) & set(got) if want[k] != got[k]):
        problems.append(f"{name}: {key!r} is {got[key]!r}, the model gives {want[key]!r}")


def _compare_safetensors(name: str, ref: Path, got_path: Path, problems: list[str]) -> None:
    read_want, read_got = _read_header(ref, problems), _read_header(got_path, problems)
    if read_want is None or read_got is None:
        return
    (want, want_metadata), (got, got_metadata) = read_want, read_got
    if want_metadata != got_metadata:
        problems.append(f"{name}: its metadata differs from what the model gives")
    for key in sorted(set(want) - set(got)):
        problems.append(f"{name}: missing {key}")
    for key in sorted(set(got) - set(want)):
        problems.append(f"{name}: unexpected {key}")
    bufs = _Buffers()
    for key in sorted(set(want) & set(got)):
        expected = FileSpan(str(ref), want[key].offset, want[key].dtype, want[key].shape)
        _compare(f"{name}: {key}", expected, got[key], got_path.parent, problems, bufs)


def _check_model_files(job: Job, out_dir: Path, problems: list[str]) -> set[str]:
    """Write the model's own files (format files, config.json, ...) aside and compare them with ``out_dir``'s.

    Returns:
        Their names.
    """
    with tempfile.TemporaryDirectory(prefix=".offload-export-verify-") as ref:
        names = set(write_model_files(job, Path(ref), []))
        for name in sorted(names):
            got = out_dir / name
            if not got.is_file():
                continue  # reported by _check_files
            if name.endswith(".json"):
                _compare_json(name, json.loads((Path(ref) / name).read_text()), got, problems)
            elif name.endswith(".safetensors"):
                _compare_safetensors(name, Path(ref) / name, got, problems)
            elif (Path(ref) / name).read_bytes() != got.read_bytes():
                problems.append(f"{name}: differs from what the model gives")
    return names


def _read_order(out_dir: Path, entries: dict[str, _Entry], units: list[Unit], reader: UnitReader
                ) -> list[tuple[str, int, int]]:
    """``(path, offset, nbytes)`` of the file bytes the comparisons read, unit after unit: each output's bytes in
    the checkpoint, then the source file bytes of the tensors compared file to file."""
    ranges = []
    for unit in units:
        ranges += [(str(out_dir / e.file), e.offset, e.nbytes) for e in (entries.get(s.name) for s in unit.outputs) if e]
        ranges += [(span.path, span.offset, span.nbytes) for span in reader.spans(unit).values()]
    return ranges


def check(job: Job, out_dir: Path) -> VerifyReport:
    """Verify ``out_dir`` against an export job (the plan, quantizers and reader of :func:`save_clean`)."""
    start = time.perf_counter()
    report = VerifyReport(str(out_dir))
    problems = report.mismatches
    if not out_dir.is_dir():
        problems.append(f"{out_dir} is not a directory")
        return report
    entries, weight_files = _read_entries(out_dir, problems)
    plan = job.plan
    _check_names([s for u in plan.units for s in u.outputs], entries, dict(plan.dropped), problems)
    wanted = [u for u in plan.units if any(s.name in entries for s in u.outputs)]
    bufs = _Buffers()
    compared = 0

    def compare(unit, outputs):
        nonlocal compared
        for spec in unit.outputs:
            tensor = outputs.pop(spec.name)
            if spec.name in entries:
                prefetch.advance(compared)
                compared += entries[spec.name].nbytes + (tensor.nbytes if isinstance(tensor, FileSpan) else 0)
                if _compare(spec.name, tensor, entries[spec.name], out_dir, problems, bufs):
                    report.tensors += 1
                    report.bytes += spec.nbytes
            del tensor

    # units are compared behind, in order, while the next ones are read and folded (as the export writes
    # behind); the stream's byte budget bounds how far the comparisons may lag
    behind = ThreadPoolExecutor(1, thread_name_prefix="offload-export-verify-compare")
    pending: deque[Future] = deque()
    reader = job.reader()
    read_ahead = reader.read_ahead_bytes(wanted)
    prefetch = _Prefetch(_read_order(out_dir, entries, wanted, reader), max(_PREFETCH_MIN, 2 * read_ahead))
    try:
        for unit, outputs in stream(reader, wanted, read_ahead_bytes=read_ahead, held=True):
            while pending and pending[0].done():
                pending.popleft().result()
            pending.append(behind.submit(compare, unit, outputs))
            del outputs
        while pending:
            pending.popleft().result()
    finally:
        behind.shutdown(wait=True, cancel_futures=True)
        prefetch.close()
    expected = _check_model_files(job, out_dir, problems)
    _check_files(out_dir, weight_files, expected, problems)
    report.seconds = time.perf_counter() - start
    return report


def verify(model: nn.Module, out_dir: str | os.PathLike, *, format: str = "fake-quant", fold: bool = True,
           dtype: torch.dtype | str | None = None, device: torch.device | str | None = None) -> VerifyReport:
    """Check a checkpoint written by :func:`~offload_export.save_clean` against ``model``, tensor by tensor.

    The model is streamed one unit at a time through the export's own read / fold / cast path and each
    expected tensor is compared byte for byte with the file (read with ``pread``). Also checked: the
    index against the files and their headers, ``metadata.total_size``, tensor names, dtypes and
    shapes, extra or missing files, and the content of the files that follow from the model (the
    quantizer state, ``config.json``, ``generation_config.json``, a packed format's own files), written
    again aside and compared key by key and tensor by tensor. The model is not changed.

    Args:
        model: the model that was exported.
        out_dir: the checkpoint directory.
        format, fold, dtype, device: as given to :func:`~offload_export.save_clean`.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` is True when nothing differs, ``report.mismatches``
        lists every difference.

    Raises:
        ValueError: a bad argument or a model that cannot be exported as is (as in ``save_clean``).
        RuntimeError: a weight that cannot be read or folded; the message names it.

    Example:
        >>> report = offload_export.verify(model, "out/")  # doctest: +SKIP
        >>> assert report.ok, report
    """
    job = prepare_job(model, out_dir, format=format, fold=fold, max_shard_size=_ANY_SHARD_SIZE, dtype=dtype,
                      device=device, overwrite=True, check_out=False)
    return check(job, Path(out_dir))


def check_staged(job: Job, tmp: Path) -> None:
    """``save_clean(verify=True)``: check the temporary directory before it is committed.

    Raises:
        RuntimeError: the files differ from the model; every mismatch is listed.
    """
    report = check(job, tmp)
    if not report.ok:
        raise RuntimeError(f"verify found {len(report.mismatches)} mismatch(es) in the export to "
                           f"{job.out_dir}; nothing was committed:\n" + "\n".join(f"  - {m}" for m in report.mismatches))
