"""``verify()``: stream a written checkpoint against the model, one unit at a time, and list every mismatch.

The expected tensors come from the export's own path (plan, read, fold, cast, convert); the file bytes
are read with ``pread`` into buffers of one tensor, never through mmap, so memory stays bounded like the
export's. A second opinion does not replay that path: the consumers' own parsers (safetensors,
transformers, compressed-tensors) read the files, ties are compared in the model, and a sample of folded
weights is recomputed by the quantizer's own forward.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import reprlib
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ._process import no_full_collections
from ._store import (SAFETENSORS_DTYPES, CorruptHeader, FileSpan, open_regular, pread_exact, read_safetensors_header,
                     read_store)
from .checkpoint import SHARD_METADATA, write_model_files
from .job import INDEX_NAME, Job, prepare_job
from .materialize import materialized, waits_for_blocks
from .pipeline import UnitReader, run_units
from .plan import Unit
from ._hooks import offloaded_tensors
from .vllm_fq import VLLM_FQ_STATE_NAME, write_vllm_fq_state
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
        unchecked: files verify cannot check (a tokenizer's, saved with ``save_clean(tokenizer=...)``).
        forward_checked: folded weights also recomputed through their quantizer's own forward.
    """

    out_dir: str
    tensors: int = 0
    bytes: int = 0
    mismatches: list[str] = field(default_factory=list)
    seconds: float = 0.0
    unchecked: list[str] = field(default_factory=list)
    forward_checked: int = 0

    @property
    def ok(self) -> bool:
        """True when the checkpoint matches the model exactly."""
        return not self.mismatches

    def __repr__(self) -> str:
        status = "OK" if self.ok else f"{len(self.mismatches)} mismatch(es)"
        lines = [f"VerifyReport({self.out_dir}): {status}",
                 f"  {self.tensors} tensors, {self.bytes / 1e6:.1f} MB compared in {self.seconds:.2f} s"]
        if self.unchecked:
            lines.append(f"  not checked (tokenizer files): {', '.join(self.unchecked)}")
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


def _read_header(path: Path, problems: list[str]) -> tuple[dict[str, _Entry], dict | None] | None:
    """The tensor entries of a safetensors file and its ``__metadata__``, or None (with the problem noted).

    Read by the export's one header reader, as strictly as safetensors reads it; a file cut short or with
    trailing bytes keeps its entries (the problem noted: the tensors past the end are reported by name when
    their bytes are compared).
    """
    try:
        parsed = read_safetensors_header(str(path))
    except CorruptHeader as e:
        problems.append(f"{path.name}: not a valid safetensors file: {e.what}")
        return None
    except OSError as e:
        problems.append(f"{path.name}: unreadable ({e})")
        return None
    if parsed.start + parsed.data_end != parsed.size:
        problems.append(f"{path.name}: file is {parsed.size} bytes, its header describes "
                        f"{parsed.start + parsed.data_end} (truncated or trailing data)")
    entries = {}
    for key, meta in parsed.tensors.items():
        dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
        if dtype is None:
            problems.append(f"{path.name}: {key} is stored as {meta['dtype']}, which this export never writes")
            continue
        begin, end = meta["data_offsets"]
        entries[key] = _Entry(path.name, dtype, tuple(meta["shape"]), parsed.start + begin, end - begin)
    return entries, parsed.metadata


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
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        problems.append(f"{INDEX_NAME}: unreadable ({type(e).__name__}: {e})")
        return {}, None
    for key in sorted(set(index) - {"metadata", "weight_map"}):
        problems.append(f"{INDEX_NAME}: has {key!r}, which the export does not write")
    for key in sorted(set(index.get("metadata") or {}) - {"total_size"}):
        problems.append(f"{INDEX_NAME}: metadata has {key!r}, which the export does not write")
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
        header, metadata = read
        if metadata != SHARD_METADATA:
            problems.append(f"{file}: __metadata__ is {metadata!r}, the export writes {SHARD_METADATA!r}")
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
            fd = open_regular(path)
        except (OSError, ValueError):
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
        fd = open_regular(str(path))
        stack.callback(os.close, fd)
        src = open_regular(span.path) if span is not None else -1
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


# what a tokenizer's save_pretrained writes beside the weights (save_clean(tokenizer=...)): verify does not
# know the tokenizer, so these files are listed as unchecked, not as mismatches
_TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                              "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
                              "tokenizer.model", "spiece.model", "sentencepiece.bpe.model"})


def _check_files(out_dir: Path, weight_files: set[str], expected: set[str], problems: list[str]) -> list[str]:
    """Every file the export did not write is a problem (tokenizer files aside); every missing one too.

    Returns:
        The tokenizer files present, which verify cannot check.
    """
    names = {p.name: p for p in out_dir.iterdir()}
    known = weight_files | expected | {INDEX_NAME, VLLM_FQ_STATE_NAME}
    unchecked = []
    for name, path in sorted(names.items()):
        if path.is_dir():
            problems.append(f"unexpected directory: {name}")
        elif name.endswith(".safetensors") and name not in known:
            problems.append(f"unexpected file: {name} (a weight file that the index does not reference)")
        elif name.endswith(_PICKLE_SUFFIXES) and name not in known:
            problems.append(f"unexpected file: {name} (only safetensors weights belong in this checkpoint)")
        elif name in _TOKENIZER_FILES:
            unchecked.append(name)
        elif name not in known:
            problems.append(f"unexpected file: {name} (the export does not write it)")
    for name in sorted(expected - set(names)):
        problems.append(f"missing file: {name}")
    return unchecked


def _typed(value: object) -> str:
    """A JSON value as text that tells ``true`` from ``1`` and ``64`` from ``64.0`` (keys sorted)."""
    return json.dumps(value, sort_keys=True)


def _load_json(name: str, path: Path, problems: list[str]) -> object | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        problems.append(f"{name}: unreadable ({type(e).__name__}: {e})")
        return None


def _compare_json(name: str, want: dict, got_path: Path, problems: list[str]) -> None:
    """Key by key, types included: ``true`` is not ``1``, ``64`` is not ``64.0`` (transformers refuses them)."""
    got = _load_json(name, got_path, problems)
    if got is None:
        return
    if not isinstance(got, dict):
        problems.append(f"{name}: not a JSON object")
        return
    for key in sorted(set(got) - set(want)):
        problems.append(f"{name}: has {key!r}, which the export does not write")
    for key in sorted(set(want) - set(got)):
        problems.append(f"{name}: lacks {key!r} (the export writes {want[key]!r})")
    for key in sorted(set(want) & set(got)):
        try:
            same = _typed(want[key]) == _typed(got[key])
        except (RecursionError, ValueError):
            same = False
        if not same:
            problems.append(f"{name}: {key!r} is {_typed_repr(got[key])}, the model gives {_typed_repr(want[key])}")


def _typed_repr(value: object) -> str:
    return f"{reprlib.repr(value)} ({type(value).__name__})"


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


def _same_object(want: object, got: object) -> str | None:
    """Where two loaded ``torch.load`` objects first differ (a path), or None: types, keys, tensors' dtype, shape
    and bytes, every other value by ``==``; walked without recursion."""
    todo = [("", want, got)]
    while todo:
        path, a, b = todo.pop()
        if type(a) is not type(b):
            return f"{path or 'the top'}: {type(b).__name__}, expected {type(a).__name__}"
        if isinstance(a, torch.Tensor):
            if a.dtype != b.dtype or a.shape != b.shape or (a.numel() and not torch.equal(
                    a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))):
                return f"{path}: tensor {b.dtype} {list(b.shape)} differs from the expected {a.dtype} {list(a.shape)}"
        elif isinstance(a, dict):
            if list(a) != list(b):
                return f"{path or 'the top'}: keys {sorted(map(str, b))[:8]}, expected {sorted(map(str, a))[:8]}"
            todo += [(f"{path}[{k!r}]", a[k], b[k]) for k in a]
        elif isinstance(a, (list, tuple)):
            if len(a) != len(b):
                return f"{path or 'the top'}: {len(b)} items, expected {len(a)}"
            todo += [(f"{path}[{i}]", x, y) for i, (x, y) in enumerate(zip(a, b))]
        elif a != b:
            return f"{path}: {reprlib.repr(b)}, expected {reprlib.repr(a)}"
    return None


def _check_vllm_state(job: Job, out_dir: Path, ref: Path, problems: list[str]) -> None:
    """A ``vllm_fq_modelopt_state.pth`` in ``out_dir`` must load with ``weights_only=True`` and equal what
    ``save_clean(vllm_fq_state=True)`` writes for the model."""
    got_path = out_dir / VLLM_FQ_STATE_NAME
    if not got_path.is_file():
        return
    try:
        write_vllm_fq_state(job.model, job.quantizers, offloaded_tensors(job.model), set(job.folds), ref)
    except ValueError as e:
        problems.append(f"{VLLM_FQ_STATE_NAME}: the export does not write it for this model ({e})")
        return
    want = torch.load(ref / VLLM_FQ_STATE_NAME, weights_only=True)
    try:
        got = torch.load(got_path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch.load refuses is a mismatch, not a crash
        problems.append(f"{VLLM_FQ_STATE_NAME}: does not load with torch.load(weights_only=True) "
                        f"({type(e).__name__}: {e})")
        return
    where = _same_object(want, got)
    if where is not None:
        problems.append(f"{VLLM_FQ_STATE_NAME}: differs from what the model gives at {where}")


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
        _check_vllm_state(job, out_dir, Path(ref), problems)
    return names


_SAMPLE = 3  # folded weights checked through their quantizer's own forward per run, unless thorough=True


def _forward_checkable(job: Job, key: str) -> bool:
    """Whether the file holds ``quantizer(weight)`` for ``key`` as the owner's forward computes it: a fake-quant
    export, one quantizer module called on the whole weight, nothing else folded in (no ``pre_quant_scale``)."""
    q = job.folds[key]
    return (job.format.name == "fake-quant" and isinstance(q.handle, nn.Module)
            and not isinstance(q.handle, (nn.ModuleList, nn.ModuleDict)) and q.adapter.name != "compressed-tensors"
            and getattr(q.adapter, "pre_quant_scale", lambda _: None)(q) is None)


def _forward_sample(job: Job, thorough: bool) -> list[str]:
    """The folded weight keys whose values are recomputed through the quantizer's own forward: all with
    ``thorough``, else ``_SAMPLE`` of them spread over the model (the same ones every run)."""
    plain = {s.name for u in job.plan.units if not u.converted for s in u.outputs}
    keys = [k for k in job.folds if k in plain and _forward_checkable(job, k)]
    if thorough or len(keys) <= _SAMPLE:
        return keys
    return [keys[round(i * (len(keys) - 1) / (_SAMPLE - 1))] for i in range(_SAMPLE)]


def _check_forward_values(job: Job, out_dir: Path, entries: dict[str, _Entry], keys: list[str],
                          problems: list[str]) -> int:
    """Compare the file's tensor with the quantizer's own forward on the materialized weight (not the export's
    fold path), cast to the export dtype, for each of ``keys``.

    Returns:
        How many were compared.
    """
    compared = 0
    for key in keys:
        entry = entries.get(key)
        if entry is None:
            continue  # reported as missing
        q, info = job.folds[key], job.lay[key]
        owner = job.model.get_submodule(info.module)
        with torch.no_grad(), materialized(owner):
            weight = getattr(owner, info.attr)
            want = q.handle(weight.detach().clone()).to(weight.dtype)  # a copy: a forward may work in place
            if job.source.dtype is not None and want.is_floating_point():
                want = want.to(job.source.dtype)
            want = want.detach().to("cpu").contiguous()
        if (want.dtype, tuple(want.shape)) != (entry.dtype, entry.shape):
            problems.append(f"{key}: its quantizer's forward gives {want.dtype} {list(want.shape)}, {entry.file} "
                            f"has {entry.dtype} {list(entry.shape)}")
            continue
        try:
            got = FileSpan(str(out_dir / entry.file), entry.offset, entry.dtype, entry.shape).read()
        except OSError:
            continue  # a file cut short: reported with the export's comparison
        a, b = want.reshape(-1).view(torch.uint8), got.reshape(-1).view(torch.uint8)
        if want.numel() and not _equal_bytes(a, b):
            rows = (a.view(want.numel(), -1) != b.view(want.numel(), -1)).any(dim=1)
            worst = (want.float() - got.float()).abs().max().item()
            problems.append(f"{key}: {int(rows.sum())} of {want.numel()} elements differ from its quantizer's own "
                            f"forward on the weight (max |difference| {worst:.3g})")
        compared += 1
    return compared


def _check_ties(job: Job, problems: list[str]) -> None:
    """Each tie the checkpoint writes once must hold one value in the model: both sides read and compared."""
    for key, info in job.lay.items():
        if info.kind != "tied" or info.tied_to not in job.lay:
            continue
        if _same_home(info, job.lay[info.tied_to]):
            continue  # one stored value (one file entry, one CPU tensor): equal without reading it
        a, b = _model_value(info), _model_value(job.lay[info.tied_to])
        if a is None or b is None:
            continue
        if a.dtype != b.dtype or a.shape != b.shape or (a.numel() and not torch.equal(
                a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))):
            problems.append(f"{key}: tied to {info.tied_to} (written once), but the model holds another value for it; "
                            f"the checkpoint cannot reload this model")


def _same_home(a, b) -> bool:
    """Whether two layout entries are held by one stored value: the same file entry, or the same tensor."""
    if a.ref is not None and b.ref is not None:
        sa, sb = a.ref.store, b.ref.store
        if sa.kind in ("disk", "safetensors"):
            return (sa.kind, sa.path, sa.file_key) == (sb.kind, sb.path, sb.file_key)
        return sa.dataset is sb.dataset and sa.key == sb.key
    return a.ref is None and b.ref is None and isinstance(a.tensor, torch.Tensor) and a.tensor is b.tensor


def _model_value(info) -> torch.Tensor | None:
    if info.ref is not None:
        return read_store(info.ref.store, info.dtype, info.shape)
    t = info.tensor
    return t.detach().to("cpu") if isinstance(t, torch.Tensor) and t.device.type != "meta" else None


def _check_with_consumers(job: Job, out_dir: Path, weight_files: set[str], problems: list[str]) -> None:
    """What consumers read, read by their own code: every shard by ``safetensors.safe_open``, config.json by
    transformers' ``AutoConfig``, generation_config.json by ``GenerationConfig``, a compressed-tensors
    ``quantization_config`` by compressed-tensors' ``ModelCompressor``, ``hf_quant_config.json`` as ModelOpt's
    loaders read it."""
    from safetensors import safe_open

    for name in sorted(weight_files):
        path = out_dir / name
        if not path.is_file():
            continue
        try:
            with safe_open(str(path), "pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
            problems.append(f"{name}: safetensors refuses it ({type(e).__name__}: {e})")
    if not (out_dir / "config.json").is_file() or getattr(job.model, "config", None) is None:
        return
    from transformers import AutoConfig, GenerationConfig

    consumers = [("config.json", lambda: AutoConfig.from_pretrained(str(out_dir)))]
    if (out_dir / "generation_config.json").is_file():
        consumers.append(("generation_config.json", lambda: GenerationConfig.from_pretrained(str(out_dir))))
    for name, load in consumers:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load()
        except Exception as e:  # noqa: BLE001 - whatever the consumer raises is a mismatch
            problems.append(f"{name}: transformers cannot load it ({type(e).__name__}: {e})")
    config = _load_json("config.json", out_dir / "config.json", [])
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors":
        try:  # as transformers' CompressedTensorsHfQuantizer reads it
            from compressed_tensors.compressors import ModelCompressor
            from transformers.utils.quantization_config import CompressedTensorsConfig

            ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(quant))
        except Exception as e:  # noqa: BLE001
            problems.append(f"config.json: compressed-tensors cannot read its quantization_config "
                            f"({type(e).__name__}: {e})")
    if (out_dir / "hf_quant_config.json").is_file():
        _check_hf_quant_config(out_dir / "hf_quant_config.json", problems)


def _check_hf_quant_config(path: Path, problems: list[str]) -> None:
    """The structure vLLM's and TensorRT-LLM's ModelOpt loaders read: ``producer`` {name, version} and
    ``quantization`` {quant_algo, kv_cache_quant_algo, exclude_modules, ...}."""
    data = _load_json(path.name, path, problems)
    if data is None:
        return
    quant = data.get("quantization") if isinstance(data, dict) else None
    producer = data.get("producer") if isinstance(data, dict) else None
    if not isinstance(producer, dict) or not isinstance(producer.get("name"), str):
        problems.append(f"{path.name}: producer is not an object with a name")
    if not isinstance(quant, dict):
        problems.append(f"{path.name}: quantization is not an object")
        return
    if not isinstance(quant.get("quant_algo"), (str, type(None))):
        problems.append(f"{path.name}: quantization.quant_algo is {quant.get('quant_algo')!r}, not a string")
    if not isinstance(quant.get("kv_cache_quant_algo"), (str, type(None))):
        problems.append(f"{path.name}: quantization.kv_cache_quant_algo is not a string or null")
    excluded = quant.get("exclude_modules", [])
    if not isinstance(excluded, list) or not all(isinstance(m, str) for m in excluded):
        problems.append(f"{path.name}: quantization.exclude_modules is not a list of module names")
    if "group_size" in quant and type(quant["group_size"]) is not int:
        problems.append(f"{path.name}: quantization.group_size is {quant['group_size']!r}, not an integer")


def _second_opinion(job: Job, out_dir: Path, entries: dict[str, _Entry], weight_files: set[str],
                    report: VerifyReport, thorough: bool) -> None:
    """The checks that do not replay the export's own path: consumers' parsers, ties, quantizer forwards."""
    _check_with_consumers(job, out_dir, weight_files, report.mismatches)
    _check_ties(job, report.mismatches)
    report.forward_checked = _check_forward_values(job, out_dir, entries, _forward_sample(job, thorough),
                                                   report.mismatches)


def _read_order(out_dir: Path, entries: dict[str, _Entry], units: list[Unit], reader: UnitReader
                ) -> list[tuple[str, int, int]]:
    """``(path, offset, nbytes)`` of the file bytes the comparisons read, unit after unit: each output's bytes in
    the checkpoint, then the source file bytes of the tensors compared file to file."""
    ranges = []
    for unit in units:
        ranges += [(str(out_dir / e.file), e.offset, e.nbytes) for e in (entries.get(s.name) for s in unit.outputs) if e]
        ranges += [(span.path, span.offset, span.nbytes) for span in reader.spans(unit).values()]
    return ranges


def _one_lane(reader: UnitReader, unit: Unit) -> int:
    return 0


def check(job: Job, out_dir: Path, *, thorough: bool = False) -> VerifyReport:
    """Verify ``out_dir`` against an export job (the plan, quantizers and reader of :func:`save_clean`); with
    ``thorough``, every folded weight is also recomputed through its quantizer's forward (else a sample)."""
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

    # units are compared behind, in order, by the loop's consumer thread while the next ones are read and folded
    # (as the export writes behind); one lane keeps the order the prefetch requests the bytes in
    reader = job.reader()
    read_ahead = reader.read_ahead_bytes(wanted)
    prefetch = _Prefetch(_read_order(out_dir, entries, wanted, reader), max(_PREFETCH_MIN, 2 * read_ahead))
    try:
        run_units(reader, wanted, compare, read_ahead_bytes=read_ahead, lane=_one_lane, name="verify-compare")
    finally:
        prefetch.close()
    expected = _check_model_files(job, out_dir, problems)
    report.unchecked = _check_files(out_dir, weight_files, expected, problems)
    _second_opinion(job, out_dir, entries, weight_files, report, thorough)
    report.seconds = time.perf_counter() - start
    return report


@no_full_collections  # a full pass would walk the model's objects mid-plan
@waits_for_blocks  # another thread's materialized() block would change tensors mid-read
def verify(model: nn.Module, out_dir: str | os.PathLike, *, format: str = "fake-quant", fold: bool = True,
           dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
           thorough: bool = False) -> VerifyReport:
    """Check a checkpoint written by :func:`~offload_export.save_clean` against ``model``, tensor by tensor.

    Two opinions. The export's own: the model is streamed one unit at a time through the export's read /
    fold / cast path and each expected tensor is compared byte for byte with the file (read with
    ``pread``); the index against the files and their headers, ``metadata.total_size``, tensor names,
    dtypes and shapes, each shard's ``__metadata__``, every file the export did not write (tokenizer
    files are listed in ``report.unchecked``) or that is missing, and the files that follow from the model
    (the quantizer state, ``config.json``, ``generation_config.json``, a packed format's own files,
    ``vllm_fq_modelopt_state.pth`` when present), written again aside and compared key by key with JSON
    types. And the consumers': every shard opened by ``safetensors.safe_open``, ``config.json`` and
    ``generation_config.json`` loaded by transformers' ``AutoConfig`` / ``GenerationConfig``, a
    compressed-tensors ``quantization_config`` by ``ModelCompressor.from_compression_config``,
    ``hf_quant_config.json``'s structure as ModelOpt's loaders read it, each tie the checkpoint writes once
    holding one value in the model, and folded weights recomputed by their quantizer's own forward on the
    materialized module (fake-quant exports; a few per run, the same ones each time; all with
    ``thorough=True``). The model is not changed.

    Args:
        model: the model that was exported.
        out_dir: the checkpoint directory.
        format, fold, dtype, device: as given to :func:`~offload_export.save_clean`.
        thorough: recompute every folded weight through its quantizer's forward, not a sample.

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
    return check(job, Path(out_dir), thorough=thorough)


def check_staged(job: Job, tmp: Path) -> None:
    """``save_clean(verify=True)``: check the temporary directory before it is committed.

    Raises:
        RuntimeError: the files differ from the model; every mismatch is listed.
    """
    report = check(job, tmp)
    if not report.ok:
        raise RuntimeError(f"verify found {len(report.mismatches)} mismatch(es) in the export to "
                           f"{job.out_dir}; nothing was committed:\n" + "\n".join(f"  - {m}" for m in report.mismatches))
