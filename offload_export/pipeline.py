"""The export's data path: read ahead (a background thread under a byte budget), fold, cast, convert.

``stream()`` yields, unit after unit, the final tensors of each planned output. The writer (and
``verify``) consume it; nothing here touches files other than reading the offload stores.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ._hooks import offloaded_tensors
from ._store import anon_empty, read_store
from .layout import Layout, TensorInfo
from .materialize import onloaded
from .plan import Unit
from .quantizers import Quantizer

__all__ = ["UnitReader", "stream"]


@dataclass
class UnitReader:
    """Turns a unit's source tensors into its output tensors.

    Args:
        model: the model (quantizers are onloaded from its hooks for folding).
        lay: its layout.
        folds: ``state-dict key -> enabled weight quantizer`` to fold.
        dtype: cast floating-point outputs to this dtype.
        device: fold on this device instead of the quantizer's / module's.
        convert: the model's save-time weight conversion for converted units.
    """

    model: nn.Module
    lay: Layout
    folds: dict[str, Quantizer]
    dtype: torch.dtype | None = None
    device: torch.device | None = None
    convert: Callable | None = None

    def __post_init__(self):
        self._refs = offloaded_tensors(self.model)  # the whole model's: hooks above an owner count too

    def read(self, unit: Unit) -> dict[str, torch.Tensor]:
        """The unit's raw source tensors: resident tensors as they are, offloaded ones read from their store."""
        return {k: self._read_one(self.lay[k]) for k in unit.sources}

    @staticmethod
    def _read_one(info: TensorInfo) -> torch.Tensor:
        if info.kind == "resident":
            return info.tensor.detach()
        return read_store(info.ref.store, info.dtype, info.shape)

    def offloaded_bytes(self, unit: Unit) -> int:
        return sum(self.lay[k].nbytes for k in unit.sources if self.lay[k].kind != "resident")

    def finish(self, unit: Unit, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold, cast and convert a unit's raw tensors into its outputs (name -> CPU or device tensor)."""
        values = {}
        for key, tensor in raw.items():
            if key in self.folds:
                tensor = self._fold(key, tensor)
            values[key] = tensor.to(self.dtype) if self.dtype is not None and tensor.is_floating_point() else tensor
        if unit.converted:
            values = self.convert(values)
        return values

    def fold_device(self, key: str) -> torch.device:
        """Where ``key`` is folded: ``device=``, else the quantizer's state, else the module's execution device."""
        q = self.folds[key]
        return self.device or q.adapter.fold_device(q) or self.lay[key].device

    def _fold(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        q = self.folds[key]
        dev = self.fold_device(key)
        try:
            # the quantizer's own state may be offloaded too; the weight itself we already hold
            with onloaded(q.owner, dev, self._refs, skip=frozenset({(id(q.owner), q.target)})):
                folded = q.adapter.fold(q, weight.to(dev, non_blocking=True))
        except Exception as e:
            needs_cuda = dev.type == "cpu" and "cuda" in f"{type(e).__name__} {e}".lower()
            hint = " (its kernel may need CUDA: pass device='cuda')" if needs_cuda else ""
            raise RuntimeError(f"folding {q.name} into {key} on {dev} failed{hint}: {e}") from e
        if folded.device.type == "cpu":
            return folded
        return anon_empty(tuple(folded.shape), folded.dtype).copy_(folded)


class _ByteBudget:
    """At most ``limit`` bytes in flight; a single item larger than the limit is still let through alone."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self._cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> bool:
        with self._cond:
            while self.used and self.used + n > self.limit and not stop.is_set():
                self._cond.wait(0.1)
            self.used += n
            return not stop.is_set()

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


_DONE = object()


def stream(reader: UnitReader, units: Iterable[Unit], *, read_ahead_bytes: int
           ) -> Iterator[tuple[Unit, dict[str, torch.Tensor]]]:
    """Yield ``(unit, outputs)`` in order while a background thread reads the next units' sources.

    At most ``read_ahead_bytes`` of offloaded data are held beyond the unit being yielded (a unit larger
    than that is read alone). Errors in the reader thread are raised here; closing the generator early
    (an exception in the consumer) stops the thread.
    """
    budget = _ByteBudget(read_ahead_bytes)
    stop = threading.Event()
    ready: queue.Queue = queue.Queue()

    def produce():
        try:
            for unit in units:
                n = reader.offloaded_bytes(unit)
                if not budget.acquire(n, stop):
                    return
                ready.put((unit, reader.read(unit), n))
        except BaseException as e:  # handed to the consumer
            ready.put(e)
        ready.put(_DONE)

    thread = threading.Thread(target=produce, name="offload-export-reader", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            unit, raw, n = item
            try:
                yield unit, reader.finish(unit, raw)
            finally:
                del raw
                budget.release(n)
    finally:
        stop.set()
        thread.join()
