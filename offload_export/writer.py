"""A streaming safetensors writer: the header comes from the plan, tensor bytes arrive one at a time.

The file is byte-identical to ``safetensors.torch.save_file(tensors, metadata=...)`` of the same tensors (for
metadata of at most one key: safetensors serializes a longer map in random order, this writer in the order
given), but no shard is ever held in memory: each tensor is ``pwrite``-n straight from its own buffer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ._store import SAFETENSORS_DTYPES

__all__ = ["ShardWriter", "TensorSpec", "safetensors_layout"]

_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
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
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


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


class ShardWriter:
    """Write one safetensors file whose header is known up front; tensors may arrive in any order.

    Args:
        path: the file to create (truncated if it exists).
        specs: every tensor the file will hold.
        metadata: the ``__metadata__`` strings.
    """

    def __init__(self, path: str, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = path
        self._specs = {s.name: s for s in specs}
        header, self._offsets = safetensors_layout(specs, metadata)
        self.nbytes = len(header) + sum(s.nbytes for s in specs)
        self._pending = set(self._specs)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._pwrite(memoryview(header), 0)
        except BaseException:
            self.abort()
            raise

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` (any device; moved to the CPU) as ``name``.

        Raises:
            ValueError: ``name`` is not in this shard, was already written, or its dtype/shape differ.
        """
        spec = self._specs.get(name)
        if spec is None or name not in self._pending:
            raise ValueError(f"tensor {name!r} is not expected in {os.path.basename(self.path)} (or written twice)")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name!r}: planned {spec.dtype} {list(spec.shape)}, "
                             f"got {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._pwrite(memoryview(data.view(-1).view(torch.uint8).numpy()), self._offsets[name])
            # start the disk writeback now (asynchronously) so that close()'s fsync has little left to wait for
            os.posix_fadvise(self._fd, self._offsets[name], spec.nbytes, os.POSIX_FADV_DONTNEED)
        self._pending.discard(name)

    @property
    def complete(self) -> bool:
        return not self._pending

    def close(self) -> None:
        """fsync and close the file.

        Raises:
            RuntimeError: some planned tensors were never written.
        """
        if self._pending:
            missing = sorted(self._pending)
            self.abort()
            raise RuntimeError(f"{self.path}: {len(missing)} planned tensor(s) never written, e.g. {missing[:3]}")
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        """Close without syncing (the caller removes the file)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
