"""The streaming loop's resources are leases released on every path: a failure never hangs, leaks or changes the model."""

from __future__ import annotations

import errno
import glob
import importlib
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import accelerate
import pytest
import torch
from torch import nn

import offload_export as oe
from offload_export import _aio

BOUND = 60  # seconds a failing call may take before it counts as a hang
verify_module = importlib.import_module("offload_export.verify")  # the package exports the function
BIG_CALL = 512 << 10  # only the embedding's data is written in calls this big


def _full_disk(monkeypatch, fails) -> None:
    """Each write that ``fails(fd, offset, nbytes)`` picks raises ENOSPC, made with ``pwritev`` or submitted in a batch
    (Linux AIO): a batch holding one leaves it to ``pwritev``, as a full disk's failed request does."""
    pwritev, batch = os.pwritev, _aio.pwritev_many

    def full(fd, buffers, offset):
        if fails(fd, offset, sum(len(b) for b in buffers)):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return pwritev(fd, buffers, offset)

    def submitted(fd, calls):
        if any(fails(fd, at, sum(len(b) for b in buffers)) for at, buffers in calls):
            return []
        return batch(fd, calls)

    monkeypatch.setattr(os, "pwritev", full)
    monkeypatch.setattr(_aio, "pwritev_many", submitted)


def _big_model(work: Path) -> nn.Module:
    """A 64 MB embedding (the unit holding the whole read-ahead budget) and two small Linears, disk-offloaded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(16384, 1024), nn.Linear(1024, 8), nn.Linear(8, 8))
    return accelerate.disk_offload(model, str(work / "offload"), execution_device="cpu")


def _bounded(fn):
    """``fn()``'s exception (or None), raising AssertionError when it has not returned within BOUND seconds."""
    outcome: list = []

    def call():
        try:
            fn()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), f"still running after {BOUND} s: a hang"
    return outcome[0]


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    work = tmp_path_factory.mktemp("big")
    return _big_model(work), work


def test_a_disk_full_write_of_the_unit_holding_the_budget_raises_instead_of_hanging(big, tmp_path, monkeypatch):
    model, _ = big
    _full_disk(monkeypatch, lambda fd, offset, nbytes: nbytes >= BIG_CALL)
    threads, fds = threading.active_count(), _fds()
    error = _bounded(lambda: oe.save_clean(model, tmp_path / "out", dtype=torch.float16, max_shard_size="1MB"))
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC, error
    assert os.listdir(tmp_path) == []
    assert threading.active_count() == threads
    assert _fds() <= fds


def test_the_unit_holding_the_budget_is_written_and_released_while_no_other_unit_is_ready(big, tmp_path):
    """Its writes run in the I/O thread while the consumer waits for the next unit, which waits for its lease: the
    consumer lands the unit in flight (waits for its writes, releases its lease) before it waits for another."""
    model, _ = big
    assert _bounded(lambda: oe.save_clean(model, tmp_path / "out", dtype=torch.float16, max_shard_size="1MB")) is None
    assert oe.verify(model, tmp_path / "out", dtype=torch.float16).ok


def test_after_a_failed_unit_write_no_later_unit_is_written(big, tmp_path, monkeypatch):
    """The I/O thread makes the writes of the units staged before the failure became known: they are skipped."""
    from offload_export import writer

    model, _ = big
    stage, made = writer.ShardWriter.stage, []

    def staged(self, items):
        writes = stage(self, items)
        names = [name for name, _ in items]

        def logged():
            made.append(names)
            if any(name.startswith("1.") for name in names):
                raise OSError(errno.EIO, "injected")
            writes()

        return logged

    monkeypatch.setattr(writer.ShardWriter, "stage", staged)
    error = _bounded(lambda: oe.save_clean(model, tmp_path / "out", dtype=torch.float16, max_shard_size="1MB"))
    assert isinstance(error, OSError) and error.errno == errno.EIO, error
    assert made[-1][0].startswith("1."), made  # the unit after it (layer 2) never written
    assert os.listdir(tmp_path) == []


def test_a_failing_comparison_of_the_unit_holding_the_budget_raises_instead_of_hanging(big, tmp_path, monkeypatch):
    model, _ = big
    oe.save_clean(model, tmp_path / "out", dtype=torch.float16, max_shard_size="1MB")
    same_bytes = verify_module._same_bytes

    def failing(expected, path, offset, nbytes, bufs):
        if nbytes >= 32 << 20:
            raise MemoryError("injected")
        return same_bytes(expected, path, offset, nbytes, bufs)

    monkeypatch.setattr(verify_module, "_same_bytes", failing)
    threads = threading.active_count()
    error = _bounded(lambda: oe.verify(model, tmp_path / "out", dtype=torch.float16))
    assert isinstance(error, MemoryError), error
    assert threading.active_count() == threads


# -- a FIFO in place of a source file: a ValueError, never an open() that blocks (holding the header lock)

_PLACE = (("model.embed_tokens", "disk"), ("model.layers.0", "disk"), ("model.layers.1", "resident"),
          ("model.norm", "resident"), ("lm_head", "disk"))


def _fifo_in_place_of(path: Path) -> None:
    os.remove(path)
    os.mkfifo(path)


@pytest.mark.parametrize("layout", ["disk_offload", "from_pretrained"])
def test_a_fifo_in_place_of_a_source_file_is_a_value_error_not_a_hang(layout, tmp_path):
    from layouts import LayoutSpec, apply_layout_with_artifacts, make_model

    spec = LayoutSpec("from_pretrained", _PLACE) if layout == "from_pretrained" else LayoutSpec("disk_offload")
    model, art = apply_layout_with_artifacts(make_model("llama_untied"), spec, tmp_path / "layout")
    source = art.source_file if layout == "from_pretrained" else sorted(art.offload_dir.glob("*.dat"))[0]
    _fifo_in_place_of(source)
    for call in (lambda: oe.save_clean(model, tmp_path / "out"), lambda: oe.verify(model, tmp_path / "out")):
        error = _bounded(call)
        assert isinstance(error, ValueError) and "FIFO" in str(error) and str(source) in str(error), error
    assert not (tmp_path / "out").exists()


# -- a failed write of quantizer_state.safetensors closes its descriptor

def test_a_failed_quantizer_state_write_leaves_no_descriptor_open(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    oe.quantize_weights(model, "int8")
    _full_disk(monkeypatch, lambda fd, offset, nbytes:
               os.readlink(f"/proc/self/fd/{fd}").endswith("quantizer_state.safetensors") and offset > 0)
    fds = _fds()
    with pytest.raises(OSError, match="injected"):
        oe.save_clean(model, tmp_path / "out")
    assert _fds() <= fds
    assert os.listdir(tmp_path) == []


# -- the quantizer's fold gets a tensor of its own, never the model's memory

class InPlaceQuantizer(nn.Module):
    """Rounds its input in place (as some kernels do to save memory) and returns it."""

    def __init__(self):
        super().__init__()
        self.enabled = True
        self.register_buffer("step", torch.tensor(0.25))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.div_(self.step).round_().mul_(self.step)


oe.register_quantizer(InPlaceQuantizer)


@pytest.mark.parametrize("where", ["resident", "cpu_offload", "disk_offload"])
def test_a_fold_that_works_in_place_does_not_change_the_model(where, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    for linear in model:
        linear.weight_quantizer = InPlaceQuantizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if where == "cpu_offload":
        model = accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    elif where == "disk_offload":
        model = accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    oe.save_clean(model, tmp_path / "out")
    with oe.materialized(model):
        after = {k: v.clone() for k, v in model.state_dict().items()}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    from safetensors.torch import load_file
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(written["0.weight"], (before["0.weight"] / 0.25).round() * 0.25)


# -- no process-wide thread setting: a thread that starts using torch during a fold gets torch's own count

class ObservingQuantizer(nn.Module):
    """Starts a thread that asks torch for its thread count while the export folds, and records the answer."""

    seen: list[int] = []

    def __init__(self):
        super().__init__()
        self.enabled = True
        self.register_buffer("step", torch.tensor(0.25))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        thread = threading.Thread(target=lambda: type(self).seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        return torch.round(w / self.step) * self.step


oe.register_quantizer(ObservingQuantizer)


def test_an_export_does_not_change_the_thread_count_of_other_threads(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    for linear in model:
        linear.weight_quantizer = ObservingQuantizer()
    model = accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    threads = torch.get_num_threads()
    ObservingQuantizer.seen.clear()
    oe.save_clean(model, tmp_path / "out")
    assert ObservingQuantizer.seen == [threads, threads]
    assert torch.get_num_threads() == threads


# -- the thread switch interval: short while streaming, the caller's own after, also with concurrent exports

class SwitchObservingQuantizer(ObservingQuantizer):
    """Records the interpreter's switch interval while the export folds."""

    intervals: list[float] = []

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        type(self).intervals.append(sys.getswitchinterval())
        return torch.round(w / self.step) * self.step


oe.register_quantizer(SwitchObservingQuantizer)


def test_the_switch_interval_is_short_while_streaming_and_the_callers_after_concurrent_exports(tmp_path):
    def model(name: str) -> nn.Module:
        m = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
        for linear in m:
            linear.weight_quantizer = SwitchObservingQuantizer()
        return accelerate.disk_offload(m, str(tmp_path / f"offload-{name}"), execution_device="cpu")

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.002)  # the caller's own value, not the default
    try:
        SwitchObservingQuantizer.intervals.clear()
        models = [model(str(i)) for i in range(3)]
        threads = [threading.Thread(target=oe.save_clean, args=(m, tmp_path / f"out{i}")) for i, m in enumerate(models)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(SwitchObservingQuantizer.intervals) == 6 and max(SwitchObservingQuantizer.intervals) <= 5e-4
        assert all((tmp_path / f"out{i}" / "model.safetensors").exists() for i in range(3))
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)


# -- the fold's thread count: one core left to the reader and consumer, whichever OpenMP runtimes are loaded

_FOLD_THREADS_CHILD = """
import ctypes, sys
import accelerate, torch
from torch import nn
import offload_export as oe
if sys.argv[1]:
    ctypes.CDLL(sys.argv[1])  # a second OpenMP runtime, as a library loaded beside torch brings

class CountingQuantizer(nn.Module):
    seen = []
    def __init__(self):
        super().__init__()
        self.enabled = True
        self.register_buffer("step", torch.tensor(0.25))
    def forward(self, w):
        type(self).seen.append(torch.get_num_threads())
        return torch.round(w / self.step) * self.step

oe.register_quantizer(CountingQuantizer)
model = nn.Sequential(nn.Linear(32, 32))
model[0].weight_quantizer = CountingQuantizer()
model = accelerate.disk_offload(model, sys.argv[2] + "/offload", execution_device="cpu")
oe.save_clean(model, sys.argv[2] + "/out")
print(CountingQuantizer.seen[0], torch.get_num_threads())
"""


def _other_openmp_runtime() -> str | None:
    """A system libgomp that is not the file torch loads, or None."""
    torch_dir = Path(torch.__file__).parent.resolve()
    for pattern in ("/usr/lib/*/libgomp.so.1", "/lib/*/libgomp.so.1", "/usr/lib64/libgomp.so.1", "/lib64/libgomp.so.1"):
        for path in sorted(glob.glob(pattern)):
            if torch_dir not in Path(path).resolve().parents:
                return path
    return None


def test_folds_run_on_half_the_cores_also_beside_a_second_openmp_runtime(tmp_path):
    """With a system libgomp loaded beside torch's when there is one (its path sorts before torch's here)."""
    cores = len(os.sched_getaffinity(0))
    if cores < 2 or "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("needs 2 cores and torch's OpenMP backend")
    child = subprocess.run([sys.executable, "-c", _FOLD_THREADS_CHILD, _other_openmp_runtime() or "", str(tmp_path)],
                           capture_output=True, text=True, timeout=BOUND)
    assert child.returncode == 0, child.stderr[-2000:]
    in_fold, after = map(int, child.stdout.split()[-2:])
    assert (in_fold, after) == (max(1, cores // 2), cores)


# -- a unit's lease shrinks to what it still holds: the next unit is read while the one before is written

def test_the_next_unit_is_read_while_the_smaller_outputs_of_the_one_before_are_written(tmp_path, monkeypatch):
    """Equal disk-offloaded float32 Linears exported in float16: each unit's outputs are half its sources, so once
    made its lease shrinks to them and the next unit is read while they are written (the memory bound, 2 x the largest
    tensor less the outputs, leaves the budget one unit and the outputs of another, not two units)."""
    from offload_export import pipeline
    from offload_export.job import prepare_job

    monkeypatch.setattr(pipeline, "_MIN_READ_AHEAD", 0)  # the budget the units size, however small they are
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(256, 256, bias=False) for _ in range(6)))
    model = accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    job = prepare_job(model, tmp_path / "out", dtype=torch.float16)
    reader, units = job.reader(), job.plan.units
    held = reader.held_bytes(units[0])
    assert reader.read_ahead_bytes(units) == 2 * held - reader.output_bytes(units[0]) == held * 3 // 2
    assert _reads_while_written(reader, units, ahead=1) == [True] * (len(units) - 1)


def _six_equal_units_after_a_resident_one(tmp_path, monkeypatch):
    """``(reader, units)`` of a larger resident Linear (no budget) then six equal disk-offloaded int8 ones, whose
    read-ahead budget holds three of them (the floor of 64 MiB lifted)."""
    from offload_export import pipeline
    from offload_export.job import prepare_job

    monkeypatch.setattr(pipeline, "_MIN_READ_AHEAD", 0)  # the budget the units size, however small they are
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False), *(nn.Linear(256, 256, bias=False) for _ in range(6)))
    oe.quantize_weights(model, "int8", skip=["0"])
    for i in range(1, len(model)):
        accelerate.disk_offload(model[i], str(tmp_path / f"offload{i}"), execution_device="cpu")
    job = prepare_job(model, tmp_path / "out")
    return job.reader(), job.plan.units


def test_a_unit_is_read_while_the_one_before_is_made_and_the_outputs_before_that_are_written(tmp_path, monkeypatch):
    """Equal disk-offloaded int8 fake-quantized Linears (read, folded into outputs their size) after a larger resident
    one (written from the model's memory: it holds no budget): under the memory bound the budget has room for three of
    them, one read, one made and one's outputs written, so the three stages work at once: each unit's write waits here
    for the read of the unit two after it, which a budget of two units would only start once that write had ended."""
    reader, units = _six_equal_units_after_a_resident_one(tmp_path, monkeypatch)
    held = reader.held_bytes(units[1])
    assert reader.held_bytes(units[0]) == 0 and reader.output_bytes(units[1]) == held
    assert reader.read_ahead_bytes(units) == 3 * held
    assert _reads_while_written(reader, units, ahead=2) == [True] * (len(units) - 2)


def test_a_unit_written_in_another_thread_holds_its_lease_until_written_while_the_next_is_staged(tmp_path,
                                                                                                   monkeypatch):
    """``consume`` returning a future (the writer's system calls in its I/O thread): the next unit is consumed while
    that future runs, and the unit's lease is held until it is done, so the read-ahead stays within its budget of
    three units (the one written, the one staged, the one made) however slow the writes are."""
    from offload_export import pipeline

    reader, units = _six_equal_units_after_a_resident_one(tmp_path, monkeypatch)
    reads, events = [], []
    read = reader.read

    def reading(unit, *rest):
        reads.append(unit)
        return read(unit, *rest)

    reader.read = reading

    def write(i):
        time.sleep(0.2)
        events.append(("written", i, len(reads)))

    with ThreadPoolExecutor(1) as io:
        def consume(unit, outputs):
            i = units.index(unit)
            events.append(("staged", i, len(reads)))
            return io.submit(write, i)

        pipeline.run_units(reader, units, consume, read_ahead_bytes=reader.read_ahead_bytes(units))
    order = [(what, i) for what, i, _ in events]
    for i in range(2, len(units)):  # unit i staged while unit i - 1 was being written (the first fold may be late)
        assert order.index(("staged", i)) < order.index(("written", i - 1)), order
    for what, i, started in events:  # reads started: unit 0 (resident) and three of the budget, no more
        assert what != "written" or started <= min(i + 4, len(units)), events


def test_a_unit_made_while_the_one_before_is_written_is_staged_at_once_not_after_that_write(tmp_path, monkeypatch):
    """The consumer waits for whichever comes first, the next unit or the end of the write in flight: a unit made
    while the one before is being written is staged then, so that its writes queue behind and the I/O thread never
    waits for the Python of the next unit's staging."""
    from offload_export import pipeline

    reader, units = _six_equal_units_after_a_resident_one(tmp_path, monkeypatch)
    writing = [threading.Event() for _ in units]
    events = []
    read = reader.read

    def reading(unit, *rest):
        i = units.index(unit)
        if i >= 2:  # made only once the unit before is being written
            assert writing[i - 1].wait(10)
            time.sleep(0.05)
        return read(unit, *rest)

    reader.read = reading

    def write(i):
        writing[i].set()
        time.sleep(0.3)
        events.append(("written", i))

    with ThreadPoolExecutor(1) as io:
        def consume(unit, outputs):
            i = units.index(unit)
            events.append(("staged", i))
            return io.submit(write, i)

        pipeline.run_units(reader, units, consume, read_ahead_bytes=reader.read_ahead_bytes(units))
    for i in range(2, len(units)):
        assert events.index(("staged", i)) < events.index(("written", i - 1)), events


def _reads_while_written(reader, units, *, ahead: int) -> list[bool]:
    """Stream ``units`` (their own budget); the write of each unit that has one ``ahead`` units after it waits for
    that unit's read to start (10 s, then not at all once one did not): whether each read started."""
    from offload_export import pipeline

    started = {u.module: threading.Event() for u in units}
    read = reader.read

    def reading(unit, *rest):
        started[unit.module].set()
        return read(unit, *rest)

    reader.read = reading
    overlapped = []

    def consume(unit, outputs):
        i = units.index(unit)
        if i + ahead < len(units):
            overlapped.append(started[units[i + ahead].module].wait(10 if all(overlapped) else 0))

    pipeline.run_units(reader, units, consume, read_ahead_bytes=reader.read_ahead_bytes(units))
    return overlapped


def test_the_budget_leaves_no_room_beside_a_fold_whose_outputs_are_its_sources_size(tmp_path):
    """A fold that keeps the dtype makes outputs the size of its sources: the unit holding the most (the largest
    tensor) then has the budget to itself, as the memory bound (2 x the largest tensor) requires."""
    from layouts import LayoutSpec, apply_layout, make_model

    from offload_export.job import prepare_job

    model = make_model("llama_untied")
    oe.quantize_weights(model, "int8", skip=[])
    model = apply_layout(model, LayoutSpec("disk_offload"), tmp_path / "layout")
    job = prepare_job(model, tmp_path / "out")
    reader, units = job.reader(), job.plan.units
    largest = max(job.lay[k].nbytes for u in units for k in u.sources)
    assert max(reader.held_bytes(u) for u in units) == largest
    assert reader.read_ahead_bytes(units) == max(largest, 64 << 20)


def test_a_unit_moved_to_a_gpu_holds_only_its_small_outputs_and_the_sources_left_on_the_host(tmp_path, monkeypatch):
    """The host lease of a unit whose folded weight the read-ahead moved to a GPU: that weight and its (streamed)
    output no longer count; the sources left on the host and the small outputs do. Arithmetic only (no GPU)."""
    from layouts import LayoutSpec, apply_layout, make_model

    from offload_export import pipeline
    from offload_export.job import prepare_job

    monkeypatch.setattr(pipeline, "STREAMED", 4096)  # the tiny model's weights count as large
    model = make_model("llama_untied")
    oe.quantize_weights(model, "int8")
    model = apply_layout(model, LayoutSpec("disk_offload"), tmp_path / "layout")
    job = prepare_job(model, tmp_path / "out")
    reader = job.reader()
    checked = 0
    for unit in job.plan.units:
        moved = [k for k in unit.sources if k in job.folds]
        if not moved:
            continue
        kept = [k for k in unit.sources if k not in moved]
        small = sum(s.nbytes for s in unit.outputs if s.nbytes < 4096 or s.name in kept)
        expected = sum(job.lay[k].nbytes for k in kept) + small
        assert reader.onloaded_bytes(unit, moved) == min(expected, reader.held_bytes(unit)) < reader.held_bytes(unit)
        assert reader.onloaded_bytes(unit, []) == reader.held_bytes(unit)
        checked += 1
    assert checked >= 7


def test_a_lease_made_larger_than_its_budget_holds_the_next_lease_back_until_it_shrinks():
    """A unit's outputs may hold more than its lease planned (a format's outputs on the host where the plan had them
    stay on a GPU): the lease takes that at once, beyond the limit, and the next unit's lease waits until the memory
    is given back, so that the queue of made units stays within the budget plus one unit."""
    from offload_export import pipeline

    budget = pipeline._Budget(100, threading.Event())
    made = budget.lease(10)
    made.hold(150)
    assert budget.used == 150
    granted = []
    waiting = threading.Thread(target=lambda: granted.append(budget.lease(60)))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive() and not granted
    made.hold(40)  # written in part: 40 + 60 fit
    waiting.join(BOUND)
    assert granted and budget.used == 100
    made.release()
    granted[0].release()
    assert budget.used == 0


class ZeroQuantizer(nn.Module):
    """Folds a weight into autograd's zero tensor: a tensor without memory of its own."""

    def __init__(self):
        super().__init__()
        self.enabled = True
        self.register_buffer("step", torch.tensor(1.0))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch._efficientzerotensor(w.shape, dtype=w.dtype)


oe.register_quantizer(ZeroQuantizer)


@pytest.mark.parametrize("where", ["resident", "disk_offload"])
def test_a_fold_into_a_tensor_without_memory_is_written_as_its_zeros(where, tmp_path):
    """The read-ahead's lease is shrunk to the outputs' host memory: one that has none counts as none."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    model[0].weight_quantizer = ZeroQuantizer()
    if where == "disk_offload":
        model = accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    oe.save_clean(model, tmp_path / "out")
    from safetensors.torch import load_file
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(written["0.weight"], torch.zeros(32, 32)) and written["1.weight"].abs().sum() > 0
