"""The export's data path: read ahead (a background thread under a byte budget), then the format's fold or pack.

``stream()`` yields, unit after unit, the final tensors of each planned output; ``stream_lanes()`` does
the same with one worker per fold device (several GPUs in one process). The writer (and ``verify``)
consume them; nothing here touches files other than reading the offload stores.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import closing, contextmanager

import torch

from ._buffers import reusing
from ._errors import add_note
from ._hooks import offloaded_tensors
from ._store import FileSpan, read_store, store_span
from ._transfer import indexed, to_device, to_host
from .formats import Format, Source
from .layout import TensorInfo
from .materialize import onloaded
from .plan import Unit

__all__ = ["UnitReader", "stream", "stream_lanes"]

_MIN_READ_AHEAD = 64 << 20


class UnitReader:
    """Turns a unit's source tensors into its output tensors.

    Args:
        source: the model being exported (layout, quantizers, folds).
        format: the output format, whose ``finish`` makes the outputs.
        device: fold on this device instead of the quantizer's / module's.
    """

    def __init__(self, source: Source, format: Format, *, device: torch.device | None = None):
        self.source, self.format, self.device = source, format, device
        self.lay, self.folds = source.lay, source.folds
        self._refs = offloaded_tensors(source.model)  # the whole model's: hooks above an owner count too

    def read(self, unit: Unit) -> dict[str, torch.Tensor | FileSpan]:
        """The unit's raw source tensors: resident tensors as they are, offloaded ones read from their store.

        A tensor the format passes through unchanged (:meth:`Format.unchanged`) whose store is a file
        holding exactly its bytes is not read: it comes as a :class:`FileSpan` for the writer to copy.
        """
        return {k: self._passed_through(unit, k) or self._read_one(self.lay[k]) for k in unit.sources}

    def spans(self, unit: Unit) -> dict[str, FileSpan]:
        """The unit's sources that :meth:`read` hands over as a :class:`FileSpan` (not read), by source key."""
        return {k: span for k in unit.sources if (span := self._passed_through(unit, k)) is not None}

    def _passed_through(self, unit: Unit, key: str) -> FileSpan | None:
        info = self.lay[key]
        if info.kind == "resident" or info.ref is None or not self.format.unchanged(unit, key):
            return None
        return store_span(info.ref.store, info.dtype, info.shape)

    @staticmethod
    def _read_one(info: TensorInfo) -> torch.Tensor:
        if info.kind == "resident":
            return info.tensor.detach()
        return read_store(info.ref.store, info.dtype, info.shape)

    def held_bytes(self, unit: Unit) -> int:
        """Memory a unit holds from its read until its outputs are written: the larger of its offloaded
        sources and its outputs (passed-through file spans excluded)."""
        spans = {k for k in unit.sources if self.lay[k].kind != "resident" and self._passed_through(unit, k) is not None}
        outputs = sum(spec.nbytes for spec in unit.outputs if spec.name not in spans)
        return max(self.offloaded_bytes(unit), outputs)

    def read_ahead_bytes(self, units: Iterable[Unit]) -> int:
        """A read-ahead budget for streaming ``units``: the most memory one of them holds (:meth:`held_bytes`;
        passed-through file spans hold none), at least 64 MB. Memory then stays near twice it."""
        return max(max((self.held_bytes(unit) for unit in units), default=0), _MIN_READ_AHEAD)

    def offloaded_bytes(self, unit: Unit) -> int:
        """Bytes that reading ``unit`` brings into memory (passed-through file spans excluded)."""
        return sum(self.lay[k].nbytes for k in unit.sources
                   if self.lay[k].kind != "resident" and self._passed_through(unit, k) is None)

    def finish(self, unit: Unit, raw: dict[str, torch.Tensor | FileSpan]) -> dict[str, torch.Tensor | FileSpan]:
        """A unit's raw tensors made into its outputs by the format (name -> CPU or device tensor, or a
        :class:`FileSpan` passed through)."""
        spans = {k: v for k, v in raw.items() if isinstance(v, FileSpan)}
        if len(spans) == len(raw):
            return spans
        values = {k: raw.pop(k) for k in list(raw) if k not in spans}  # the format may consume them
        with _intra_op_threads(_fold_threads()):
            out = self.format.finish(self, unit, values)
        out.update(spans)
        return out

    def fold_device(self, key: str) -> torch.device:
        """Where ``key`` is folded: ``device=``, else the quantizer's state, else the module's execution device."""
        q = self.folds[key]
        return self.device or q.adapter.fold_device(q) or self.lay[key].device

    @contextmanager
    def onloaded_quantizers(self, key: str) -> Iterator[torch.device]:
        """A block in which the module owning weight ``key`` (its quantizers' state included) is real on the
        fold device, the weight itself excepted (the caller holds it); yields that device."""
        q = self.folds[key]
        dev = self.fold_device(key)
        with onloaded(q.owner, dev, self._refs, skip=frozenset({(id(q.owner), q.target)})):
            yield dev

    def fold(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` passed through its enabled quantizer on :meth:`fold_device`; a CPU tensor or a device one.

        An exception from the quantizer propagates as its own type with a note naming the quantizer, the
        weight and the device (and a hint when its kernel seems to need CUDA).
        """
        q = self.folds[key]
        dev = self.fold_device(key)
        try:
            with self.onloaded_quantizers(key):
                folded = q.adapter.fold(q, to_device(weight, dev))
        except Exception as e:
            needs_cuda = dev.type == "cpu" and "cuda" in f"{type(e).__name__} {e}".lower()
            hint = " (its kernel may need CUDA: pass device='cuda')" if needs_cuda else ""
            add_note(e, f"offload_export: folding {q.name} into {key} on {dev} failed{hint}")
            raise
        return folded if folded.device.type == "cpu" else to_host(folded)


def _fold_threads() -> int:
    """Intra-op threads for CPU folds: one core is left to the reader and writer threads.

    With every core in torch's pool, its spinning workers and the I/O threads fight over the cores: on 2
    cores an int8 export measured 5-15 x slower that way when its writes cost more; with today's writer,
    1.05-1.1 x slower and 1.4 x the CPU time (int8, fp8; 8 interleaved exports each).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


@contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """At most ``n`` torch intra-op threads in this thread for the block (OpenMP's setting is per thread;
    threads started meanwhile inherit it, the caller's setting is restored after)."""
    previous = torch.get_num_threads()
    if n >= previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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


class _Outputs(dict):
    """A unit's outputs as yielded by :func:`stream` (``held=True``): its bytes count until the dict is gone."""

    __slots__ = ("__weakref__",)


def stream(reader: UnitReader, units: Iterable[Unit], *, read_ahead_bytes: int, held: bool = False
           ) -> Iterator[tuple[Unit, dict[str, torch.Tensor]]]:
    """Yield ``(unit, outputs)`` in order while a background thread reads the next units' sources.

    At most ``read_ahead_bytes`` of unit data are in flight (a unit larger than that alone): read ahead,
    and, with ``held``, also every unit whose outputs dict is still alive (being written behind), each
    counted at the larger of its offloaded sources and its outputs. Only the unit being finished (its
    sources and outputs at once during a fold) comes on top, so memory stays under about
    ``read_ahead_bytes`` + the largest unit. With ``held`` the consumer must drop each outputs dict when
    done with it, or reading stalls; without it a unit stops counting once the consumer asks for the next.
    Errors in the reader thread are raised here; closing the generator early (an exception in the
    consumer) stops the thread.
    """
    budget = _ByteBudget(read_ahead_bytes)
    stop = threading.Event()
    ready: queue.Queue = queue.Queue()

    def produce():
        try:
            for unit in units:
                n = reader.held_bytes(unit) if held else reader.offloaded_bytes(unit)
                if not budget.acquire(n, stop):
                    return
                ready.put((unit, reader.read(unit), n))
        except BaseException as e:  # handed to the consumer
            ready.put(e)
        ready.put(_DONE)

    thread = threading.Thread(target=produce, name="offload-export-reader", daemon=True)
    with reusing():  # buffers of units already written serve the next ones
        thread.start()
        try:
            while (item := ready.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                unit, raw, n = item
                del item  # the sources die with ``raw``, right after the fold
                try:
                    outputs = reader.finish(unit, raw)
                except BaseException:
                    budget.release(n)
                    raise
                finally:
                    del raw
                if not held:
                    try:
                        yield unit, outputs
                    finally:
                        del outputs
                        budget.release(n)
                    continue
                outputs = _Outputs(outputs)
                weakref.finalize(outputs, budget.release, n)
                yield unit, outputs
                del outputs
        finally:
            stop.set()
            thread.join()


def _fold_lane(reader: UnitReader, unit: Unit) -> Hashable:
    """The device a unit is folded on (the one of its first folded weight), else where its first tensor is."""
    key = next((k for k in unit.sources if k in reader.folds), None)
    # one GPU is one lane however it is spelled (``cuda`` / ``cuda:0``)
    return indexed(reader.fold_device(key) if key is not None else reader.device or reader.lay[unit.sources[0]].device)


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def stream_lanes(reader: UnitReader, units: Iterable[Unit], *, read_ahead_bytes: int,
                 lane: Callable[[UnitReader, Unit], Hashable] | None = None, held: bool = False
                 ) -> Iterator[tuple[Unit, dict[str, torch.Tensor]]]:
    """:func:`stream` with one worker thread per fold device, working concurrently.

    Units arrive in no fixed order across devices (in order within one); the consumer writes them at
    planned offsets. With a single lane this is ``stream`` itself, in the calling thread's order.

    Args:
        reader: the unit reader.
        units: the units to produce.
        read_ahead_bytes: read-ahead budget of each lane.
        held: as for :func:`stream`.
        lane: ``(reader, unit) -> key`` grouping units into lanes; by default the unit's fold device.

    Yields:
        ``(unit, outputs)`` as each lane finishes a unit.
    """
    units = list(units)
    lanes: dict[Hashable, list[Unit]] = {}
    for unit in units:
        lanes.setdefault((lane or _fold_lane)(reader, unit), []).append(unit)
    if len(lanes) <= 1:
        yield from stream(reader, units, read_ahead_bytes=read_ahead_bytes, held=held)
        return
    out: queue.Queue = queue.Queue(maxsize=len(lanes))
    stop = threading.Event()

    def work(key: Hashable, lane_units: list[Unit]) -> None:
        try:
            if isinstance(key, torch.device) and key.type == "cuda":
                torch.cuda.set_device(key)  # kernels that allocate on the current device
            with closing(stream(reader, lane_units, read_ahead_bytes=read_ahead_bytes, held=held)) as items:
                for item in items:
                    put = _put(out, item, stop)
                    del item  # with ``held``, a unit counts until the consumer drops it
                    if not put:
                        return
        except BaseException as e:  # handed to the consumer
            _put(out, e, stop)
        finally:
            _put(out, _DONE, stop)

    threads = [threading.Thread(target=work, args=item, name=f"offload-export-lane-{item[0]}", daemon=True)
               for item in lanes.items()]
    for t in threads:
        t.start()
    try:
        running = len(threads)
        while running:
            item = out.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
            del item
    finally:
        stop.set()
        for t in threads:
            t.join()
