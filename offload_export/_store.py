"""Reading and writing offload store entries without mmap: ``pread`` into buffers we own.

Reading through mmap (what accelerate and safetensors do) grows the process's RSS by every page touched;
``os.preadv`` into a tensor's own memory keeps it at the tensor's size.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import stat
import struct
import threading
from dataclasses import dataclass
from functools import lru_cache

import torch

from ._buffers import anon_empty
from ._hooks import Store

__all__ = ["MAX_HEADER_BYTES", "SAFETENSORS_DTYPES", "CorruptHeader", "FileSpan", "SafetensorsHeader", "check_store",
           "open_regular", "parse_safetensors_header", "pread_exact", "read_safetensors_header", "read_store",
           "safetensors_header", "store_span", "write_store"]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_lock = threading.Lock()


# safetensors' own limit (MAX_HEADER_SIZE): a larger length is a corrupt file, not a header to read
MAX_HEADER_BYTES = 100_000_000
# serde_json's recursion limit, as safetensors parses headers: 127 nested arrays / objects parse, 128 do not
_MAX_DEPTH = 127
# bits per element of the dtypes safetensors knows; ours (SAFETENSORS_DTYPES) plus those we cannot load
_DTYPE_BITS = {**{name: dt.itemsize * 8 for name, dt in SAFETENSORS_DTYPES.items()},
               "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64}
_U64 = 2**64


class CorruptHeader(ValueError):
    """A safetensors file that the safetensors library refuses; ``what`` says why, without the advice."""

    def __init__(self, path: str, what: str):
        self.what = what
        super().__init__(f"{path}: {what}.\n  The safetensors file is corrupt (the safetensors library rejects it too); "
                         f"nothing was read from it. Restore the file (re-download or re-save the checkpoint) and "
                         f"reload the model.")


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors header as safetensors reads it.

    Attributes:
        start: the data section's offset in the file (8 + header length).
        tensors: ``name -> {"dtype", "shape", "data_offsets"}`` (data offsets relative to ``start``).
        metadata: the ``__metadata__`` object, or None.
        size: the file's size; ``start + data_end == size`` in a valid file.
        data_end: the end of the last tensor's data, relative to ``start``.
    """

    start: int
    tensors: dict
    metadata: dict | None
    size: int
    data_end: int


def _is_u64(x: object) -> bool:
    return type(x) is int and 0 <= x < _U64


def _not_regular(path: str, mode: int) -> OSError | ValueError:
    if stat.S_ISDIR(mode):  # what reading it would raise
        return IsADirectoryError(errno.EISDIR, "Is a directory", path)
    kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a character device"
            if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else "not a regular file")
    return ValueError(f"{path}: is {kind}, not a regular file; nothing was read from it. An offload store or "
                      f"checkpoint file must be a regular file: put the original file back (or re-save the "
                      f"checkpoint) and reload the model.")


def open_regular(path: str) -> int:
    """A read-only descriptor of ``path``, which must be a regular file; never blocks.

    Opened non-blocking, so that a FIFO or device put in the file's place cannot block ``open`` (a FIFO
    waits for a writer), then checked with ``fstat``.

    Raises:
        ValueError: ``path`` is not a regular file (a FIFO, a device, a socket).
        OSError: it cannot be opened; IsADirectoryError: it is a directory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _entry_span(path: str, name: str, entry: object) -> tuple[int, int]:
    """``(begin, end)`` of a header entry after checking its dtype, shape and offsets against each other."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CorruptHeader(path, f"tensor {name!r}: header entry {entry!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
        raise CorruptHeader(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise CorruptHeader(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets)
            or offsets[1] < offsets[0]):
        raise CorruptHeader(path, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end] with "
                                  f"0 <= begin <= end")
    elements = 1
    for d in shape:  # safetensors multiplies with overflow checks, left to right
        elements *= d
        if elements >= _U64:
            raise CorruptHeader(path, f"tensor {name!r}: shape {shape} has more than 2^64 elements")
    bits = elements * _DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        raise CorruptHeader(path, f"tensor {name!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, "
                                  f"but shape {shape} of {dtype} needs {bits / 8:g}")
    return offsets[0], offsets[1]


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _depth(value: object) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (without recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            todo += [(c, depth + 1) for c in children]
    return deepest


def parse_safetensors_header(path: str, raw: bytes, size: int) -> SafetensorsHeader:
    """Validate the header bytes ``raw`` of a ``size``-byte safetensors file as the safetensors library does.

    Everything but the file's size is checked here (JSON as serde_json reads it, an object, a
    ``{string: string}`` ``__metadata__``, each entry's dtype, shape and offsets, entries tiling the data
    from byte 0): ``data_end`` says where the data should end. :func:`safetensors_header` also requires
    the file to end there.

    Raises:
        CorruptHeader: a header safetensors refuses (the message names the file and the tensor).
    """
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CorruptHeader(path, f"header is not JSON ({e})") from None
    except RecursionError:
        raise CorruptHeader(path, f"header nests arrays or objects deeper than safetensors' limit of {_MAX_DEPTH}") \
            from None
    if _depth(header) > _MAX_DEPTH:
        raise CorruptHeader(path, f"header nests arrays or objects deeper than safetensors' limit of {_MAX_DEPTH}")
    if not isinstance(header, dict):
        raise CorruptHeader(path, f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise CorruptHeader(path, "__metadata__ is not a {string: string} object")
    pos = 0
    for begin, end, name in sorted((*_entry_span(path, k, v), k) for k, v in header.items()):
        if begin != pos:  # safetensors: entries tile the data section, in offset order, without gaps or overlaps
            raise CorruptHeader(path, f"tensor {name!r}: data_offsets start at byte {begin}, expected {pos} "
                                      f"(a gap or an overlap with the previous tensor)")
        pos = end
    return SafetensorsHeader(8 + len(raw), header, metadata, size, pos)


def read_safetensors_header(path: str) -> SafetensorsHeader:
    """Read and validate a safetensors file's header (:func:`parse_safetensors_header`), not its size.

    Raises:
        CorruptHeader: a header safetensors refuses, or a length prefix that does not fit the file.
        OSError: the file cannot be read.
    """
    size = os.stat(path).st_size
    fd = open_regular(path)
    try:
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptHeader(path, f"file is {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise CorruptHeader(path, f"header length {length} exceeds safetensors' limit of {MAX_HEADER_BYTES} bytes")
        if 8 + length > size:
            raise CorruptHeader(path, f"header length {length} runs past the end of the {size}-byte file")
        raw = f.read(length)
    return parse_safetensors_header(path, raw, size)


@lru_cache(maxsize=256)
def _header_cached(path: str, mtime_ns: int, size: int) -> tuple[int, dict]:
    parsed = read_safetensors_header(path)
    if parsed.start + parsed.data_end != parsed.size:
        raise CorruptHeader(path, f"file is {parsed.size} bytes, its header describes {parsed.start + parsed.data_end} "
                                  f"(truncated or trailing data)")
    return parsed.start, parsed.tensors


def safetensors_header(path: str) -> tuple[int, dict]:
    """Parse and validate a safetensors file's header: ``(data start offset, {name: {dtype, shape, data_offsets}})``.

    Validated as the safetensors library does (:func:`parse_safetensors_header`), and the data must end
    where the file ends. Cached per ``(path, mtime, size)``.

    Raises:
        ValueError: the file is not a valid safetensors file, or not a regular file (the message names the file
            and the tensor).
        OSError: the file cannot be read.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # checked again on the descriptor: the lock is never held in a blocking open
        raise _not_regular(path, st.st_mode)
    with _lock:
        return _header_cached(path, st.st_mtime_ns, st.st_size)


def _safetensors_entry(store: Store, dtype: torch.dtype | None, shape: tuple[int, ...]) -> tuple[int, dict]:
    """``(data start, header entry)`` of a safetensors store entry, checked against what the module expects.

    Run at prepare time and again at every read (the header is re-read when the file's mtime or size
    changed): a file replaced after the plan was made is refused, not read with another meaning.
    """
    start, header = safetensors_header(store.path)
    entry = header.get(store.file_key)
    if entry is None:
        raise ValueError(f"{store.path}: has no tensor {store.file_key!r}, which the offload store of "
                         f"{store.key!r} points to; the file changed after the model was loaded: reload the model")
    stored = SAFETENSORS_DTYPES.get(entry["dtype"])
    if stored is None:
        raise ValueError(f"{store.path}: tensor {store.file_key!r} is stored as {entry['dtype']}, which torch "
                         f"cannot read here (supported: {', '.join(SAFETENSORS_DTYPES)})")
    if tuple(entry["shape"]) != tuple(shape):
        raise ValueError(f"{store.path}: tensor {store.file_key!r} has shape {list(entry['shape'])}, the module "
                         f"expects {list(shape)} for {store.key!r}; the file changed after the model was loaded: "
                         f"reload the model")
    if dtype is not None and stored.is_floating_point != dtype.is_floating_point:
        raise ValueError(f"{store.path}: tensor {store.file_key!r} is stored as {entry['dtype']}, the module holds "
                         f"{store.key!r} as {dtype}: a cast cannot turn one into the other; the file changed after "
                         f"the model was loaded: reload the model")
    return start, entry


def check_store(store: Store, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> None:
    """Check, without reading data, that a ``"disk"`` or ``"safetensors"`` store entry can supply ``shape``
    (and, for a safetensors entry, a tensor of ``dtype``'s kind: floating point or not).

    Other stores (tensors in RAM) are not checked. Meant to run before an export writes anything.

    Raises:
        ValueError: a corrupt safetensors header, an entry missing from it, a stored shape that is not
            ``shape``, a stored dtype that no cast turns into ``dtype`` (an integer for a float tensor), a
            ``.dat`` file of the wrong size, or a file that is not a regular file (the message names the file and
            tensor).
        OSError: the file is missing or unreadable.
    """
    if store.kind == "safetensors":
        _safetensors_entry(store, dtype, shape)
    elif store.kind == "disk":
        need = math.prod(shape) * store.file_dtype.itemsize
        st = os.stat(store.path)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(store.path, st.st_mode)
        size = st.st_size
        if size != need:
            raise ValueError(f"{store.path}: offload file of {store.key!r} is {size} bytes, its shape {list(shape)} "
                             f"of {store.file_dtype} needs {need}; the offload folder is damaged: reload the model")


def pread_exact(fd: int, out: torch.Tensor, offset: int, name: str = "") -> None:
    """Fill the contiguous CPU tensor ``out`` with the bytes of open file ``fd`` starting at ``offset``.

    Raises:
        OSError: the file ends first (the message starts with ``name`` when given).
    """
    view, done = memoryview(out.view(-1).view(torch.uint8).numpy()), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise OSError(f"{name + ': ' if name else ''}unexpected end of file at byte {offset + done}")
        done += n


def _pread_into(path: str, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous CPU tensor ``out`` with bytes of ``path`` (a regular file) starting at ``offset``."""
    fd = open_regular(path)
    try:
        pread_exact(fd, out, offset, path)
    finally:
        os.close(fd)


def _read_file(path: str, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    out = anon_empty(shape, dtype)
    if out.numel():
        _pread_into(path, offset, out)
    return out


@dataclass(frozen=True)
class FileSpan:
    """A tensor's bytes in a file, not read yet: ``read()`` returns what :func:`read_store` would.

    A writer can copy the bytes file to file inside the kernel instead (``copy_file_range``), and a
    checker can compare them without decoding.
    """

    path: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self) -> torch.Tensor:
        return _read_file(self.path, self.offset, self.dtype, self.shape)

    def read_into(self, out: torch.Tensor, start: int = 0) -> None:
        """Fill the contiguous CPU tensor ``out`` with the span's bytes from byte ``start`` of the span on.

        Raises:
            OSError: the file ends first, or cannot be read.
        """
        _pread_into(self.path, self.offset + start, out)


def store_span(store: Store, dtype: torch.dtype, shape: tuple[int, ...]) -> FileSpan | None:
    """The file bytes of a store entry when they already are the tensor ``read_store`` returns, else None.

    That is a ``.dat`` or safetensors entry stored in ``dtype`` with ``shape``; anything that needs a
    cast, another shape (``read_store`` raises for it) or is not in a file gives None.
    """
    if store.kind == "disk":
        if store.file_dtype != dtype:
            return None
        span = FileSpan(store.path, 0, dtype, tuple(shape))
        try:
            size = os.path.getsize(store.path)
        except OSError:
            return None  # read_store reports it
        return span if size >= span.nbytes else None
    if store.kind == "safetensors":
        start, entry = _safetensors_entry(store, dtype, shape)
        if SAFETENSORS_DTYPES[entry["dtype"]] != dtype:
            return None
        span = FileSpan(store.path, start + entry["data_offsets"][0], dtype, tuple(shape))
        return span if entry["data_offsets"][1] - entry["data_offsets"][0] == span.nbytes else None
    return None


def read_store(store: Store, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Read one store entry as a CPU tensor of ``dtype`` and ``shape`` (accelerate casts to the module dtype too).

    ``"cpu"`` entries are returned without a copy when the dtype already matches.

    Raises:
        ValueError: the stored shape differs from the module's.
    """
    if store.kind == "disk":
        value = _read_file(store.path, 0, store.file_dtype, shape)
    elif store.kind == "safetensors":
        start, entry = _safetensors_entry(store, dtype, shape)
        value = _read_file(store.path, start + entry["data_offsets"][0], SAFETENSORS_DTYPES[entry["dtype"]],
                           tuple(entry["shape"]))
    else:
        value = store.dataset[store.key]
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"offload store entry {store.key!r} has shape {tuple(value.shape)}, "
                         f"the module expects {tuple(shape)}; the offload store does not match the model")
    return value.to(dtype)


def _write_dat(path: str, value: torch.Tensor) -> None:
    """Replace ``path`` by a file holding ``value``'s bytes, atomically: written and fsynced under a temporary name
    in the same folder, then renamed over ``path`` (the folder fsynced too); a failure leaves ``path`` as it was
    and removes the temporary file."""
    data = memoryview(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    folder, name = os.path.split(path)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mode = 0o644
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            done = 0
            while done < len(data):
                done += os.pwrite(fd, data[done:], done)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_store(store: Store, value: torch.Tensor) -> None:
    """Persist ``value`` into the offload store entry, never into a user's safetensors file.

    ``"cpu"`` entries are replaced by a fresh tensor (the old one may be an mmap of the user's file);
    ``.dat`` entries are replaced atomically (a new file renamed over the old one: a failure leaves the old bytes); safetensors entries are written as a new ``.dat`` in the
    loader's offload folder (or kept in its in-memory ``state_dict`` when it has no folder) and the index
    is repointed.

    Raises:
        RuntimeError: the store cannot take writes.
    """
    if store.kind == "cpu":
        old = store.dataset[store.key]
        store.dataset[store.key] = value.detach().to("cpu", old.dtype, copy=True)
    elif store.kind == "disk":
        _write_dat(store.path, value.to(store.file_dtype))
    elif store.kind == "safetensors":
        loader = store.dataset
        if getattr(loader, "save_folder", None):
            _write_dat(os.path.join(loader.save_folder, f"{store.key}.dat"), value)
            dtype = str(value.dtype).removeprefix("torch.")
            loader.index[store.key] = {"dtype": dtype, "shape": list(value.shape)}
        else:
            loader.state_dict[store.key] = value.detach().to("cpu", copy=True)
    elif hasattr(store.dataset, "__setitem__"):
        store.dataset[store.key] = value.detach().to("cpu", copy=True)
    else:
        raise RuntimeError(f"cannot write back {store.key!r}: its offload store "
                           f"{type(store.dataset).__name__} is read-only")
