"""The export's data path: read ahead (a background thread under a byte budget), the format's fold or pack, then a consumer.

:func:`run_units` is the one streaming loop of the export, ``verify`` and the distributed export: it makes
each planned unit's final tensors (one lane per fold device, several GPUs in one process) and hands them
to a consumer thread (the shard writer, or verify's comparison). Nothing here touches files other than
reading the offload stores.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from functools import lru_cache

import torch

from ._buffers import anon_empty, reusing
from ._errors import add_note
from ._process import quick_switching
from ._store import FileSpan, read_store, store_span
from ._transfer import filled_on_device, indexed, small_to_host, to_device, to_host
from .formats import Format, Source
from .layout import TensorInfo
from .materialize import onloaded
from .plan import Unit
from .writer import STREAMED, streams

__all__ = ["UnitReader", "run_units", "usable_cores"]

_MIN_READ_AHEAD = 64 << 20
_MIN_DEVICE_AHEAD = 512 << 20  # a lane's device budget at least: small units are made faster than one is moved
_DEVICE_UNITS = 3  # largest units a lane's device budget holds: the one being written, the one being made, the next
_DEVICE_SPARE = 1 << 30  # GPU memory the read-ahead leaves free beyond its device budget (the pack works in it)


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
        self._refs = source.lay.refs  # the whole model's: hooks above an owner count too

    def read(self, unit: Unit, unread: Mapping[str, FileSpan] | None = None) -> dict[str, torch.Tensor | FileSpan]:
        """The unit's raw source tensors: resident tensors as they are, offloaded ones read from their store.

        A tensor the format passes through unchanged (:meth:`Format.unchanged`) whose store is a file
        holding exactly its bytes is not read: it comes as a :class:`FileSpan` for the writer to copy. So do the
        sources in ``unread`` (:meth:`device_spans`), for the read-ahead to read straight into a GPU.
        """
        unread = unread or {}
        return {k: unread.get(k) or self._passed_through(unit, k) or self._read_one(self.lay[k]) for k in unit.sources}

    def device_spans(self, unit: Unit) -> dict[str, FileSpan]:
        """The unit's sources that the format computes with on a GPU and whose bytes a file holds as they are (a
        ``.dat`` or safetensors entry of their dtype): the read-ahead reads them from the file into pinned buffers
        and on to the GPU, without a copy in host memory first."""
        out = {}
        for k, device in self.format.devices(self, unit).items():
            info = self.lay[k]
            if (device.type == "cuda" and info.ref is not None and not self.format.unchanged(unit, k)
                    and (span := store_span(info.ref.store, info.dtype, info.shape)) is not None):
                out[k] = span
        return out

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
        """Memory a unit holds from its read until its outputs are written: the larger of what reading its
        sources allocates (:meth:`read_bytes`) and its outputs (:meth:`output_bytes`)."""
        return max(self.read_bytes(unit), self.output_bytes(unit))

    def output_bytes(self, unit: Unit) -> int:
        """Host memory a unit's outputs may take: passed-through file spans, :meth:`streamed` tensors and the model's
        own host memory written as it is (:meth:`_written_in_place`) excluded."""
        left = {k for k in unit.sources if self.lay[k].kind != "resident" and self._passed_through(unit, k) is not None
                or self._written_in_place(unit, k)}
        left |= self.streamed(unit)
        return sum(spec.nbytes for spec in unit.outputs if spec.name not in left)

    def _written_in_place(self, unit: Unit, key: str) -> bool:
        """Whether the unit's output ``key`` is its source's memory on the host, which the writer writes as it is (no
        copy): a contiguous CPU source handed over in place (:meth:`_in_place`) that the format leaves unchanged (a
        resident embedding on a machine without a GPU)."""
        info = self.lay[key]
        if not self._in_place(info) or not self.format.unchanged(unit, key):
            return False
        t = info.tensor if info.kind == "resident" else info.ref.store.dataset[info.ref.store.key]
        return t.device.type == "cpu" and t.is_contiguous()

    def onloaded_bytes(self, unit: Unit, moved: Iterable[str]) -> int:
        """Host memory ``unit`` still holds once its sources ``moved`` are on a GPU (:meth:`held_bytes` at most):
        its other sources read, and the outputs the writer does not stream from the GPU (the small ones, copied
        to the host together, and those named as a source left on the host)."""
        kept = set(unit.sources).difference(moved)
        read = sum(self.lay[k].nbytes for k in kept
                   if not self._in_place(self.lay[k]) and self._passed_through(unit, k) is None)
        outputs = sum(spec.nbytes for spec in unit.outputs if spec.nbytes < STREAMED or spec.name in kept)
        return min(self.held_bytes(unit), read + outputs)

    def written_as_read(self, unit: Unit) -> bool:
        """Whether the format writes every source of ``unit`` as it is (:meth:`Format.unchanged`): the unit costs
        the export its I/O only (an unquantized lm_head, a norm)."""
        return all(self.format.unchanged(unit, k) for k in unit.sources)

    def streamed(self, unit: Unit) -> set[str]:
        """The unit's outputs that are the model's own GPU memory, handed to the writer as they are (it streams them
        to the file through pinned buffers, never a host copy of the whole tensor): resident GPU tensors the format
        leaves unchanged, of at least :data:`~offload_export.writer.STREAMED` bytes (a resident embedding)."""
        return {k for k in unit.sources if (info := self.lay[k]).kind == "resident" and info.device.type == "cuda"
                and info.nbytes >= STREAMED and self.format.unchanged(unit, k)}

    def read_ahead_bytes(self, units: Iterable[Unit]) -> int:
        """A read-ahead budget for streaming ``units`` (at least 64 MiB): room for the three stages to work at once
        on units holding the most (:meth:`held_bytes`): one read (or moved to a GPU), the next made, while the largest
        outputs (:meth:`output_bytes`) of the one before are written; but only as far as the memory bound allows, 2 x
        the largest tensor: a made unit's outputs beside its sources (a fold's) come on top of the budget. (With room
        for two, a unit whose outputs come to the host, such as a MoE layer's packed experts, would be read only once
        the outputs before the unit being made are written, and the next make would wait for that read.)

        A unit's lease shrinks to what it still holds once its sources are on a GPU, and becomes what its outputs
        hold on the host once they are made, so that the next units are read meanwhile."""
        held = outputs = largest = 0
        for unit in units:
            made = self.output_bytes(unit)
            held, outputs = max(held, self.read_bytes(unit), made), max(outputs, made)
            largest = max([largest, *(self.lay[k].nbytes for k in unit.sources), *(s.nbytes for s in unit.outputs)])
        return max(held, min(2 * held + outputs, 2 * largest - outputs), _MIN_READ_AHEAD)

    def read_bytes(self, unit: Unit) -> int:
        """Bytes that reading ``unit`` allocates: its sources read from files or mappings, or cast; not the
        resident ones, nor CPU-offloaded ones handed over as they are (:func:`read_store`), nor passed-through
        file spans. (A fold copies the model's memory it is handed, into about the size of the unit's outputs.)"""
        return sum(self.lay[k].nbytes for k in unit.sources
                   if not self._in_place(self.lay[k]) and self._passed_through(unit, k) is None)

    def model_memory(self, raw: Mapping[str, torch.Tensor | FileSpan]) -> set[int]:
        """The host storages (their addresses) of ``raw`` (:meth:`read`) that are the model's own memory handed over
        as it is (:meth:`_in_place`): outputs that are views of them hold none of the export's memory."""
        return {t.untyped_storage().data_ptr() for k, t in raw.items()
                if isinstance(t, torch.Tensor) and t.device.type == "cpu" and self._in_place(self.lay[k])}

    @staticmethod
    def _in_place(info: TensorInfo) -> bool:
        """Whether :meth:`read` hands ``info``'s tensor over as the model's own memory, without a copy: a resident
        tensor, or a CPU-offloaded one stored in the module's dtype."""
        if info.kind == "resident":
            return True
        store = info.ref.store if info.ref is not None else None
        return info.kind == "cpu" and store is not None and store.dataset[store.key].dtype == info.dtype

    def finish(self, unit: Unit, raw: dict[str, torch.Tensor | FileSpan]) -> dict[str, torch.Tensor | FileSpan]:
        """A unit's raw tensors made into its outputs by the format (name -> CPU or device tensor, or a
        :class:`FileSpan` passed through)."""
        spans = {k: v for k, v in raw.items() if isinstance(v, FileSpan)}
        if len(spans) == len(raw):
            return spans
        values = {k: raw.pop(k) for k in list(raw) if k not in spans}  # the format may consume them
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

    def onload_targets(self, unit: Unit, raw: dict[str, torch.Tensor | FileSpan]) -> dict[str, torch.device]:
        """The tensors of ``raw`` (:meth:`read`) still on the host or in a file (:meth:`device_spans`) that the format
        computes with on a GPU (:meth:`Format.devices`), and that GPU; a user's mapping's tensors excepted (see
        :meth:`_borrowed`)."""
        return {k: indexed(d) for k, d in self.format.devices(self, unit).items()
                if d.type == "cuda" and self.lay[k].kind != "mapping"
                and (isinstance(t := raw.get(k), torch.Tensor) and t.device.type == "cpu"
                     or isinstance(t, FileSpan) and not self.format.unchanged(unit, k))}

    def on_gpu(self, unit: Unit, raw: dict[str, torch.Tensor | FileSpan]) -> dict[str, torch.device]:
        """The tensors of ``raw`` (:meth:`read`) that the format computes with on a GPU (:meth:`Format.devices`) and
        that are there already (resident), and that GPU."""
        return {k: device for k, d in self.format.devices(self, unit).items()
                if d.type == "cuda" and isinstance(t := raw.get(k), torch.Tensor)
                and t.device == (device := indexed(d))}

    def device_bytes(self, unit: Unit) -> int:
        """GPU memory ``unit`` takes when the read-ahead readies it there (:func:`_onload`): the larger of the sources
        that the format computes with on a GPU (:meth:`Format.devices`) and that are moved there (not those resident
        on a GPU already) and its outputs; 0 when the format computes with none of its sources on a GPU."""
        devices = self.format.devices(self, unit)
        if not any(d.type == "cuda" for d in devices.values()):
            return 0
        moved = sum(self.lay[k].nbytes for k, d in devices.items()
                    if d.type == "cuda" and not (self.lay[k].kind == "resident" and self.lay[k].device.type == "cuda"))
        return max(moved, sum(spec.nbytes for spec in unit.outputs))

    def _borrowed(self, key: str, t: torch.Tensor) -> bool:
        """Whether ``t``, read for ``key``, may be the model's own memory: :meth:`_in_place` and still where that
        memory is (the read-ahead's copy to a GPU is the export's own), or whatever a user's mapping returns."""
        info = self.lay[key]
        home = info.tensor.device if info.kind == "resident" else torch.device("cpu")
        return info.kind == "mapping" or (self._in_place(info) and t.device == home)

    def fold(self, key: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` passed through its enabled quantizer on :meth:`fold_device`: on the host, but left on the fold
        device when the read-ahead moved ``weight`` there (its unit holds a device lease; the consumer copies it).

        The quantizer gets a tensor of its own: the model's memory (a resident weight, an in-memory store's
        tensor) is copied first unless moving it to the fold device already made a copy.

        An exception from the quantizer propagates as its own type with a note naming the quantizer, the
        weight and the device (and a hint when its kernel seems to need CUDA).
        """
        q = self.folds[key]
        dev = self.fold_device(key)
        try:
            with self.onloaded_quantizers(key):
                moved = to_device(weight, dev)
                borrowed = moved is weight and self._borrowed(key, weight)
                ahead = moved is weight and not borrowed and dev.type == "cuda"  # the read-ahead's copy
                if borrowed:
                    moved = _copy(weight)  # a quantizer that works in place must not change the model
                folded = q.adapter.fold(q, moved)
        except Exception as e:
            needs_cuda = dev.type == "cpu" and "cuda" in f"{type(e).__name__} {e}".lower()
            hint = " (its kernel may need CUDA: pass device='cuda')" if needs_cuda else ""
            add_note(e, f"offload_export: folding {q.name} into {key} on {dev} failed{hint}")
            raise
        return folded if folded.device.type == "cpu" or ahead else to_host(folded)


_OPENMP_RUNTIMES = ("libgomp", "libomp", "libiomp5")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it, else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs its intra-op work on (when that is its parallel backend), else None.

    A process may hold several runtimes (torch's own copy beside a system ``libgomp`` another library loaded):
    the one returned is the one whose ``omp_set_num_threads`` torch reads back. Setting another one leaves
    torch on every core.
    """
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    torch.get_num_threads()  # torch's per-thread initialisation first, or it would overwrite the probe
    try:
        with open("/proc/self/maps") as maps:  # Linux: the libraries already loaded, whichever copies they are
            paths = {line.split()[-1] for line in maps if any(name in line for name in _OPENMP_RUNTIMES)}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            if not (hasattr(lib, "omp_set_num_threads") and hasattr(lib, "omp_get_max_threads")):
                continue
            before = lib.omp_get_max_threads()
            lib.omp_set_num_threads(before + 1)
            try:
                if torch.get_num_threads() == before + 1:
                    return lib
            finally:
                lib.omp_set_num_threads(before)
    except OSError:
        pass
    return None


@contextmanager
def _fold_threads() -> Iterator[None]:
    """A block in which folds (or the read-ahead's copies) in this thread use half the cores the process may (at
    least one); the other half is left to the other threads.

    With every core in the intra-op pool its spinning workers and the I/O threads fight over the cores; on a
    loaded machine the folds then run several times slower, and so do the copies into and out of a GPU's pinned
    buffers, which run on the same pool (benchmarks/README.md has the measurement). OpenMP's thread count is a
    setting of the calling thread (``omp_set_num_threads``), restored after the block; ``torch.set_num_threads``
    would also change the count every thread that starts using torch meanwhile keeps (process-wide state), so it is
    not used.
    """
    omp = _openmp()
    wanted = max(1, usable_cores() // 2)
    torch.get_num_threads()  # torch's per-thread initialisation first, or it would overwrite the setting later
    previous = omp.omp_get_max_threads() if omp is not None else 0
    if omp is None or not 1 <= wanted < previous:
        yield
        return
    omp.omp_set_num_threads(wanted)
    try:
        yield
    finally:
        omp.omp_set_num_threads(previous)


def _copy(t: torch.Tensor) -> torch.Tensor:
    return anon_empty(tuple(t.shape), t.dtype).copy_(t) if t.device.type == "cpu" else t.clone()


class _Budget:
    """At most ``limit`` bytes leased at once (a single lease larger than that is granted alone)."""

    def __init__(self, limit: int, stop: threading.Event):
        self.limit, self.used, self._stop = limit, 0, stop
        self._cond = threading.Condition()

    def lease(self, n: int) -> _Lease | None:
        """Wait until ``n`` bytes fit and lease them; None once the run is stopped."""
        with self._cond:
            while self.used and self.used + n > self.limit and not self._stop.is_set():
                self._cond.wait()
            if self._stop.is_set():
                return None
            self.used += n
        return _Lease(self, n)

    def wake(self) -> None:
        """Wake a waiting :meth:`lease` (the run was stopped)."""
        with self._cond:
            self._cond.notify_all()

    def _take(self, n: int) -> None:
        with self._cond:
            self.used += n

    def _give_back(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class _Lease:
    """Bytes of a :class:`_Budget` held by one unit; :meth:`release` gives them back (once)."""

    __slots__ = ("_budget", "_n")

    def __init__(self, budget: _Budget, n: int):
        self._budget, self._n = budget, n

    def shrink(self, n: int) -> None:
        """Give back what this lease holds beyond ``n`` bytes (the unit holds less now)."""
        if self._budget is not None and n < self._n:
            self._budget._give_back(self._n - n)
            self._n = n

    def hold(self, n: int) -> None:
        """Make this lease ``n`` bytes, what the unit holds now: the excess given back, or the rest taken at once,
        beyond the limit if need be (the memory is taken already: the next lease waits for it instead)."""
        if self._budget is not None and n > self._n:
            self._budget._take(n - self._n)
            self._n = n
        self.shrink(n)

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self._n)


class _Onloaded:
    """One unit whose sources the read-ahead moved to a GPU (``keys``; none when they were all there already),
    holding its lease on the lane's device budget until its outputs (left on the GPU) are written: the writer streams
    the large ones from the GPU; the small ones are copied to the host together, queued behind the work that makes
    them."""

    __slots__ = ("keys", "_lease", "_made")

    def __init__(self, keys: tuple[str, ...], lease: _Lease):
        self.keys, self._lease = keys, lease
        self._made: list[torch.cuda.Event] = []

    def adopt(self, raw: dict[str, torch.Tensor]) -> None:
        """Hand the moved tensors to this thread's streams: their memory is reused only after work queued there."""
        for k in self.keys:
            raw[k].record_stream(torch.cuda.current_stream(raw[k].device))

    def made(self, outputs: dict) -> None:
        """Queue the copies to the host of ``outputs``' GPU tensors the writer does not stream
        (:func:`~offload_export.writer.streams`; :func:`small_to_host`), then mark the end of that work on each of
        their GPUs' current streams (this thread's). The lease becomes the GPU memory the outputs hold: the
        sources are gone, and a packed unit's outputs are a fraction of them (NVFP4: about a quarter), so the
        read-ahead may move the next units meanwhile."""
        small = [k for k, t in outputs.items() if _on_device(t) and not streams(t)]
        devices = {t.device for t in outputs.values() if isinstance(t, torch.Tensor) and t.is_cuda}
        outputs.update(zip(small, small_to_host([outputs[k] for k in small], non_blocking=True)))
        self._lease.hold(_storage_bytes(outputs, "cuda"))  # a stack whose views all went to the host is not held
        for device in devices:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self._made.append(event)

    def wait(self) -> None:
        """Wait for the work that makes the outputs and their copies to the host (:meth:`made`)."""
        for event in self._made:
            event.synchronize()

    def release(self) -> None:
        self._lease.release()


def _outputs_to_host(outputs: dict, kept: set[str]) -> None:
    """Replace ``outputs``' GPU tensors but those in ``kept`` with host copies, in place: the small ones together
    (:func:`small_to_host`: one copy per device and dtype instead of one per tensor, each a wait for the GPU), then
    each large one."""
    moved = [k for k, t in outputs.items() if _on_device(t) and k not in kept]
    outputs.update(zip(moved, small_to_host([outputs[k] for k in moved])))
    outputs.update({k: to_host(outputs[k]) for k in moved if _on_device(outputs[k])})


def _storage_bytes(outputs: dict, device_type: str = "cpu", skip: Collection[int] = ()) -> int:
    """Bytes of the memory of ``device_type`` (``"cpu"``: the host) that ``outputs`` keep alive: each such tensor's
    whole storage, once (a view keeps all of it), but those at an address in ``skip``; a tensor without memory of its
    own (autograd's zero tensor) holds none."""
    storages = {}
    for t in outputs.values():
        if isinstance(t, torch.Tensor) and t.device.type == device_type and t.data_ptr():
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(n for address, n in storages.items() if address not in skip)


def _on_device(t: torch.Tensor | FileSpan) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


def _has_room(device: torch.device, n: int, spare: int) -> bool:
    """Whether ``device`` can take ``n`` more bytes and still have ``spare`` free (the caching allocator's free
    blocks count as free; its statistics, a dictionary built per call, are read only when the driver's free
    memory alone is short)."""
    free = torch.cuda.mem_get_info(device)[0]
    if free < n + spare:
        stats = torch.cuda.memory_stats(device)
        free += stats.get("reserved_bytes.all.current", 0) - stats.get("allocated_bytes.all.current", 0)
    return free >= n + spare


def _onload(reader: UnitReader, unit: Unit, raw: dict, budget: _Budget) -> _Onloaded | None:
    """Ready ``unit`` on the GPU the format computes with its sources on: move them there now (the read-ahead thread,
    while the lane finishes the unit before; host tensors through pinned buffers, :meth:`UnitReader.device_spans`
    read from their files straight into them), under the lane's device ``budget``, whose lease covers the unit's
    outputs too: they stay on the GPU until the consumer writes them (the writer streams them to the file), for a
    unit whose sources were all on the GPU already as well. Only while that GPU keeps the budget and 1 GiB free
    beyond it: readying a unit is an overlap, never a new way to run out of GPU memory.

    Returns:
        What was moved (nothing for a unit whose sources are all on the GPU already), with its lease; None when the
        GPU has no room or none of the sources to move could be (``finish`` then moves them itself and the lane
        copies the outputs to the host).
    """
    targets, ready = reader.onload_targets(unit, raw), reader.on_gpu(unit, raw)
    if not targets and not ready:
        return None
    lease = budget.lease(reader.device_bytes(unit))
    if lease is None:
        return None
    moved: list[str] = []
    room = False
    try:
        wanted: dict[torch.device, int] = dict.fromkeys(ready.values(), 0)
        for k, device in targets.items():
            wanted[device] = wanted.get(device, 0) + raw[k].nbytes
        room = all(_has_room(device, n, budget.limit + _DEVICE_SPARE) for device, n in wanted.items())
        if room:
            for k, device in targets.items():
                t = raw[k]
                raw[k] = (filled_on_device(t.read_into, t.shape, t.dtype, device) if isinstance(t, FileSpan)
                          else to_device(t, device))
                moved.append(k)
    except torch.cuda.OutOfMemoryError:  # another process took the room meanwhile: the rest stays on the host
        pass
    except BaseException:
        lease.release()
        raise
    if not moved and (targets or not room):
        lease.release()
        return None
    return _Onloaded(tuple(moved), lease)


class _Run:
    """What the stages of one :func:`run_units` share: a stop flag, the first error, the lanes' budgets."""

    def __init__(self):
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.budgets: list[_Budget] = []  # host and device budgets of every lane
        self._lock = threading.Lock()

    def fail(self, error: BaseException) -> None:
        """Record ``error`` (the first one wins) and stop every stage."""
        with self._lock:
            if self.error is None:
                self.error = error
        self.stop.set()
        for budget in self.budgets:
            budget.wake()


_DONE = object()


def _fold_lane(reader: UnitReader, unit: Unit) -> Hashable:
    """The device a unit is folded on (the one of its first folded weight), else where its first tensor is."""
    key = next((k for k in unit.sources if k in reader.folds), None)
    # one GPU is one lane however it is spelled (``cuda`` / ``cuda:0``)
    return indexed(reader.fold_device(key) if key is not None else reader.device or reader.lay[unit.sources[0]].device)


def _release_all(items: queue.Queue) -> None:
    """Release the leases of the units left in ``items`` (the run stopped before they were used)."""
    while True:
        try:
            item = items.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, tuple):  # a unit (not _DONE, nor a write's end)
            for lease in item[2:]:
                if lease is not None:
                    lease.release()


def _read_ahead(reader: UnitReader, units: list[Unit], budgets: tuple[_Budget, _Budget], run: _Run,
                ready: queue.Queue) -> None:
    """The read-ahead thread of one lane: lease each unit's bytes, read its sources, move those the format computes
    with on a GPU there (:func:`_onload`, under the lane's device budget)."""
    host, device = budgets
    try:
        with _fold_threads():  # the copies into pinned buffers: the half of the cores the lane's folds leave
            for unit in units:
                lease = host.lease(reader.held_bytes(unit))
                if lease is None:
                    return
                onloaded = None
                try:
                    unread = reader.device_spans(unit)
                    raw = reader.read(unit, unread)
                    onloaded = _onload(reader, unit, raw, device)
                    for k in unread:  # not moved (no room on the GPU): read on the host after all
                        if isinstance(raw[k], FileSpan):
                            raw[k] = raw[k].read()
                    if onloaded is not None and onloaded.keys:  # sources moved: no longer on the host
                        lease.shrink(reader.onloaded_bytes(unit, onloaded.keys))
                    ready.put((unit, raw, onloaded, lease))
                except BaseException:
                    lease.release()
                    if onloaded is not None:
                        onloaded.release()
                    raise
                del raw
    except BaseException as e:
        run.fail(e)
    finally:
        ready.put(_DONE)


def _lane(reader: UnitReader, units: list[Unit], budgets: tuple[_Budget, _Budget], run: _Run,
          handoff: queue.Queue, device: Hashable = None) -> None:
    """Fold or pack one lane's units in this thread while a thread reads ahead; hand each to the consumer.

    A unit's leases go to the consumer with its outputs; on every other path they are released here. The outputs of
    a unit the read-ahead readied on a GPU (:func:`_onload`) go to the consumer as they are (it copies them to the
    host); the others' are copied here, so that a GPU without room for the read-ahead holds one unit's outputs at a
    time.
    """
    ready: queue.Queue = queue.Queue()
    thread = threading.Thread(target=_read_ahead, args=(reader, units, budgets, run, ready),
                              name="offload-export-reader", daemon=True)
    try:
        if isinstance(device, torch.device) and device.type == "cuda":
            torch.cuda.set_device(device)  # kernels that allocate on the current device
        thread.start()
        with _fold_threads():  # once per lane: its settings cost a few system and library calls
            while (item := ready.get()) is not _DONE:
                unit, raw, onloaded, lease = item
                del item
                try:
                    if not run.stop.is_set():
                        if onloaded is not None:
                            onloaded.adopt(raw)
                        model_memory = reader.model_memory(raw)
                        outputs = reader.finish(unit, raw)
                        del raw  # the sources die right after the fold
                        if onloaded is None:
                            _outputs_to_host(outputs, reader.streamed(unit))
                        else:
                            onloaded.made(outputs)
                        lease.hold(_storage_bytes(outputs, skip=model_memory))
                        handoff.put((unit, outputs, onloaded, lease))
                        onloaded = lease = None
                        del outputs
                finally:
                    raw = None
                    if onloaded is not None:
                        onloaded.release()
                    if lease is not None:
                        lease.release()
    except BaseException as e:
        run.fail(e)
    finally:
        if thread.ident is not None:
            thread.join()
        _release_all(ready)


def _consume(consume: Callable[[Unit, dict], Future | None], run: _Run, handoff: queue.Queue) -> None:
    """The consumer thread: wait for the work that makes each unit's outputs left on a GPU and ``consume`` them, in
    arrival order, releasing its leases whatever happens: when ``consume`` returns, or, when it returns a future (its
    writes made in another thread), once that is done. One unit is in flight: the next one is consumed as soon as it
    comes, while the one before is written (its writes then queue behind), and the one in flight is landed as soon as
    its future is done, whichever comes first: the next unit may wait for the leases of the one in flight."""
    flight: tuple[Future, _Onloaded | None, _Lease] | None = None
    try:
        while True:
            item = handoff.get()
            if isinstance(item, Future):  # a write ended: land its unit, unless the next one already did
                if flight is not None and flight[0] is item:
                    _land(flight, run)
                    flight = None
                continue
            if item is _DONE:
                break
            unit, outputs, onloaded, lease = item
            del item
            done = None
            try:
                if not run.stop.is_set():
                    if onloaded is not None:
                        onloaded.wait()
                    done = consume(unit, outputs)
            except BaseException as e:
                run.fail(e)
            finally:
                outputs.clear()  # what an exception's traceback still holds is no longer counted, nor kept
                del outputs
                if done is None:
                    _land((None, onloaded, lease), run)
                else:  # this unit's writes run while the one before them lands
                    landing, flight = flight, (done, onloaded, lease)
                    done.add_done_callback(handoff.put)
                    _land(landing, run)
    finally:
        _land(flight, run)


def _land(flight: tuple[Future | None, _Onloaded | None, _Lease] | None, run: _Run) -> None:
    """Wait for a consumed unit's future (its error stops the run), then release its leases."""
    if flight is None:
        return
    done, onloaded, lease = flight
    try:
        if done is not None:
            done.result()
    except BaseException as e:
        run.fail(e)
    finally:
        if onloaded is not None:
            onloaded.release()
        lease.release()


def run_units(reader: UnitReader, units: Iterable[Unit], consume: Callable[[Unit, dict], Future | None], *,
              read_ahead_bytes: int, lane: Callable[[UnitReader, Unit], Hashable] | None = None,
              name: str = "writer") -> None:
    """Make every unit's outputs and hand them to ``consume(unit, outputs)``: the one streaming loop.

    Three stages work at once: per lane (by default one per fold device) a thread reads the next units'
    sources and the fold / pack runs (in this thread for a single lane, else in one thread per lane);
    one consumer thread then calls ``consume`` with each unit's outputs (name -> tensor or
    :class:`FileSpan`), in order within a lane. ``consume`` may pop from the dict; it is cleared after. It may return
    a future, the unit's work going on in another thread (the writer's system calls): the unit's leases are then held
    until that is done, while the next unit is consumed.

    Memory: each unit holds a lease of :meth:`UnitReader.held_bytes` on its lane's budget of
    ``read_ahead_bytes`` from before its read until ``consume`` (its future) is done, or the run stops (shrunk to what
    the unit still holds on the host once its sources are on a GPU; once its outputs are made, what they hold on the
    host, beyond the budget if a format put more there than planned: the next reads wait for it); a lease is
    released in ``finally`` on every path, so memory stays under about ``read_ahead_bytes`` + the outputs of the
    unit being made per lane and a failure never leaves a stage waiting for bytes. Sources the format computes
    with on a GPU are moved there by the read-ahead (:func:`_onload`) under a second budget per lane
    (:func:`_device_ahead`), from their read until the unit's outputs are written (the lease set to the outputs'
    GPU memory once they are made); so are the outputs of a unit whose sources are resident on that GPU.

    Args:
        reader: the unit reader.
        units: the units, in plan order.
        consume: the writer (or comparer) of one unit's outputs, called in the consumer thread; None or a future.
        read_ahead_bytes: the byte budget of each lane.
        lane: ``(reader, unit) -> key`` grouping units into lanes; by default the unit's fold device.
        name: the consumer thread's name, after ``offload-export-``.

    Raises:
        The first exception of any stage (reading, folding, ``consume``, a ``KeyboardInterrupt`` in this
        thread), once every thread of the run has ended.
    """
    lanes: dict[Hashable, list[Unit]] = {}
    for unit in units:
        lanes.setdefault((lane or _fold_lane)(reader, unit), []).append(unit)
    run = _Run()
    budgets = [(_Budget(read_ahead_bytes, run.stop), _Budget(_device_ahead(reader, lane_units), run.stop))
               for lane_units in lanes.values()]
    run.budgets = [b for pair in budgets for b in pair]
    handoff: queue.Queue = queue.Queue()  # bounded by the budgets, not by a count
    consumer = threading.Thread(target=_consume, args=(consume, run, handoff), name=f"offload-export-{name}",
                                daemon=True)
    with reusing(), quick_switching():  # buffers of units already consumed serve the next ones
        consumer.start()
        try:
            if len(lanes) == 1:
                _lane(reader, *lanes.values(), budgets[0], run, handoff)
            else:
                _lane_threads(reader, lanes, budgets, run, handoff)
        finally:
            handoff.put(_DONE)
            consumer.join()
            _release_all(handoff)
    if run.error is not None:
        raise run.error


def _device_ahead(reader: UnitReader, units: list[Unit]) -> int:
    """A lane's device budget: three times its largest unit's :meth:`UnitReader.device_bytes`, at least 512 MiB
    (several small units ahead); 0 when none of its units computes on a GPU. A unit holds its device lease until its
    outputs are written (shrunk to them once they are made), so with room for two the next unit would be moved only
    once the one before it is written."""
    largest = max(reader.device_bytes(unit) for unit in units)
    return max(_DEVICE_UNITS * largest, _MIN_DEVICE_AHEAD) if largest else 0


def _lane_threads(reader: UnitReader, lanes: dict[Hashable, list[Unit]], budgets: list[tuple[_Budget, _Budget]],
                  run: _Run, handoff: queue.Queue) -> None:
    threads = [threading.Thread(target=_lane, args=(reader, lane_units, pair, run, handoff, key),
                                name=f"offload-export-lane-{key}", daemon=True)
               for (key, lane_units), pair in zip(lanes.items(), budgets)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException as e:  # a KeyboardInterrupt while waiting: stop the lanes, then wait for them
        run.fail(e)
        for t in threads:
            t.join()

