"""Packed and fake-quant export of big offloaded models beside ModelOpt's exporters and the I/O floor, in one run.

``--part tables``: the Qwen3-4B shape (``device_map="auto"``, ``max_memory`` GPU 2 GiB + CPU 3 GiB, an offload
folder) and the Qwen3-MoE shape (GPU 2 GiB + CPU 2 GiB), NVFP4 and FP8 (ModelOpt ``NVFP4_DEFAULT_CFG`` /
``FP8_DEFAULT_CFG``). Per case: ModelOpt's ``export_hf_checkpoint`` of the resident twin (the reference), then on
the offloaded model (calibrated the same way): ours ``format="modelopt"``, ours with the shared-input groups found
the other way (twin / forward of the model), ModelOpt's ``export_hf_checkpoint`` of the offloaded model (its
streaming path; it breaks the model, so it runs last). Each export: seconds, time to first byte (ours: the writer's
first write call, :class:`FirstWrite`; ModelOpt's: first non-empty ``*.safetensors`` seen by the sampler), host peak
above the start (RssAnon and VmRSS, sampled every 5 ms), tensors equal to the reference.

``--part curve``: the cost curve over GPU 2 GiB + CPU 8 GiB + disk (an explicit device map, :func:`budget_map`):
fake-quant NVFP4 at 0.6B/4B/8B and ``format="modelopt"`` NVFP4 at 0.6B/4B/14B (``--curve-packed 0.6b,4b,8b``
when 14B does not fit): seconds per GB read, host peak, fraction of the floor.

The floor, measured in the same run on the same filesystem: reading the checkpoint's files (4 MiB
``readv``, as warm in the page cache as the export's reads) and writing + fsync-ing fresh bytes (64 MiB
``pwrite``, each step's writeback started at once as our writer does); a case's floor is its disk-held source
bytes at the read rate plus its output bytes at the write rate (CPU-held tensors count as free).

``--part ct``: ``format="compressed-tensors"`` (presets NVFP4, FP8) of the 4B shape dispatched over GPU 2 GiB +
CPU 3 GiB + disk beside llm-compressor's save path on the resident twin (:func:`ct_case`), and the floor.

``--part big``: the 8B shape in the issue's layout (``device_map="auto"``: calibration against the resident twin,
fake-quant there, calibration inside ``oe.materialized(model, device="cuda")``), then 8B (fake-quant, packed) and
14B (packed) with disk-held weights (ModelOpt calibration's CPU copies of them dropped: :func:`drop_promoted`).

Usage (GPU machine, modelopt installed; compressed-tensors for ct): python benchmarks/gpu_big.py --part tables|ct|curve|big --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import mmap
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from gpu_packed_check import PeakRSS, build_checkpoint, calib_loop, compare
from transformers import AutoModelForCausalLM, Qwen3Config

import offload_export as oe

VOCAB = 151936
CURVE = {"0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                      tie_word_embeddings=True),
         "4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                    tie_word_embeddings=True),
         "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                    tie_word_embeddings=False),
         "14b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                     tie_word_embeddings=False)}
TABLE_MEMORY = {"4b": {0: "2GiB", "cpu": "3GiB"}, "moe": {0: "2GiB", "cpu": "2GiB"}}  # device_map="auto" (the issue's)
CURVE_MEMORY = (2, 8)
TABLE_CPU_GPU = (2, 3)  # GiB on GPU 0, then on the CPU, for the compressed-tensors table (an explicit map)


class FirstWrite:
    """Time of the first ``os.pwritev`` / ``os.pwrite`` / ``os.write`` / ``os.copy_file_range`` or batch of writes
    (``offload_export._aio.pwritev_many``, where the loaded package has it) inside the block: our writer."""

    def __enter__(self):
        self.t = None
        aio = sys.modules.get("offload_export._aio")
        self._saved = {(os, n): getattr(os, n) for n in ("pwritev", "pwrite", "write", "copy_file_range")}
        if aio is not None:
            self._saved[aio, "pwritev_many"] = aio.pwritev_many
        for (owner, n), fn in self._saved.items():
            setattr(owner, n, self._wrap(fn))
        return self

    def _wrap(self, fn):
        def call(*a, **k):
            if self.t is None:
                self.t = time.perf_counter()
            return fn(*a, **k)
        return call

    def __exit__(self, *exc):
        for (owner, n), fn in self._saved.items():
            setattr(owner, n, fn)


class FirstFile(PeakRSS):
    """PeakRSS that also notes when a non-empty ``*.safetensors`` first appears under ``folder``, and reads the
    sectors written and the milliseconds with a request in flight (``io_ticks``) of the block device holding
    ``folder``'s parent from ``/proc/diskstats`` at each sample, with the process's anonymous memory then (one thread
    for all: each sampling thread takes the GIL from the export every 5 ms)."""

    def __init__(self, folder: Path):
        self.folder, self.t = folder, None
        dev = os.stat(folder.parent).st_dev
        self._device = Path(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")).name
        self.disk: list[tuple[float, int, int, int]] = [(*self._disk(), self._read()["RssAnon"])]

    def _disk(self) -> tuple[float, int, int]:
        with open("/proc/diskstats") as f:
            for line in f:
                parts = line.split()
                if parts[2] == self._device:
                    return time.perf_counter(), int(parts[9]), int(parts[12])
        raise LookupError(self._device)

    def _run(self):
        while not self._stop.wait(0.005):
            now = self._sample()
            self.disk.append((*self._disk(), now["RssAnon"]))
            if self.t is None and self.folder.exists():
                if any(p.stat().st_size > 0 for p in self.folder.rglob("*.safetensors")):
                    self.t = time.perf_counter()

    def disk_summary(self, t0: float, first_byte: float | None) -> dict:
        """The disk's busy fraction from ``t0`` to the first byte and from it to the end; its timeline (per 100 ms:
        ``[MB written, busy fraction, MB of anonymous memory grown since the block began, at the step's end]``); GB
        it wrote in the block."""
        def window(a: float, b: float) -> list[tuple[float, int, int, int]]:
            return [s for s in self.disk if a <= s[0] <= b]

        def busy(inside: list[tuple[float, int, int, int]]) -> float | None:
            if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
                return None
            return round((inside[-1][2] - inside[0][2]) / 1e3 / (inside[-1][0] - inside[0][0]), 2)

        end = self.disk[-1][0]
        split = t0 + (first_byte or 0.0)
        steps = [w for k in range(int((end - t0) / 0.1) + 1) for w in [window(t0 + k * 0.1, t0 + (k + 1) * 0.1)]
                 if len(w) >= 2]
        return {"disk_busy_before_first_byte": busy(window(t0, split)), "disk_busy_after_first_byte": busy(window(split, end)),
                "disk": [[round((w[-1][1] - w[0][1]) * 512 / 1e6), busy(w), round((w[-1][3] - self.disk[0][3]) / 2**20)]
                         for w in steps],
                "disk_GB": round((self.disk[-1][1] - self.disk[0][1]) * 512 / 1e9, 3)}


def _machine_cpu() -> list[int]:
    """The machine's CPU time so far, in ticks: ``/proc/stat``'s first line (user, nice, system, idle, iowait, ...)."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def _machine_busy(before: list[int], after: list[int]) -> float:
    """The fraction of all cores' time between two :func:`_machine_cpu` that was not idle nor waiting for I/O."""
    spent = [b - a for a, b in zip(before, after)]
    return round(1 - (spent[3] + spent[4]) / max(1, sum(spent)), 3)


def _pinned() -> dict:
    """The pinned host allocator's statistics (``torch.cuda.host_memory_stats``; empty where torch lacks it)."""
    return torch.cuda.host_memory_stats() if hasattr(torch.cuda, "host_memory_stats") else {}


def timed(fn, out: Path) -> dict:
    """Run the export ``fn`` writing into ``out``: seconds, time to first byte, host and GPU peaks, GB written, and
    the disk's busy time (:meth:`FirstFile.disk_summary`). ``host_peak_at_s``: when the host's anonymous memory peaked;
    ``pinned_MB``: what torch's pinned-memory pool grew by (its blocks are anonymous memory it keeps) and the most
    of it handed out at once; ``process_cpu_s``: the process's user and system CPU seconds; ``machine_busy``: the
    fraction of the machine's cores busy; ``minor_faults``: pages the process touched for the first time (fresh
    memory, zeroed by the kernel); ``cuda_mallocs``: segments torch's caching allocator asked the driver for."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
        torch.cuda.reset_peak_host_memory_stats()
    pinned = _pinned().get("allocated_bytes.current", 0)
    os.sync()
    faults, segments = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, _segments()
    with FirstFile(out) as rss, FirstWrite() as first:
        times, machine, t0 = os.times(), _machine_cpu(), time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        cpu, busy = os.times(), _machine_busy(machine, _machine_cpu())
    t_first = first.t or rss.t
    ttfb = round(t_first - t0, 2) if t_first else None
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
    stats = _pinned()
    return {"s": round(seconds, 2), "ttfb_s": ttfb, "host_peak_MB": rss.delta_mb,
            "host_peak_at_s": round(rss.peak_at - t0, 2) if rss.peak_at else None,
            "pinned_MB": {"grown": round((stats.get("allocated_bytes.current", 0) - pinned) / 2**20),
                          "active_peak": round(stats.get("active_bytes.peak", 0) / 2**20)},
            "process_cpu_s": {k: round(getattr(cpu, k) - getattr(times, k), 3) for k in ("user", "system")},
            "machine_busy": busy, "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
            "cuda_mallocs": _segments() - segments,
            "gpu_peak_MB": round(torch.cuda.max_memory_allocated() / 2**20), "written_GB": round(written / 1e9, 3),
            **rss.disk_summary(t0, ttfb)}


def _segments() -> int:
    return torch.cuda.memory_stats().get("segment.all.allocated", 0)


def floor_rates(src: Path, work: Path) -> dict:
    """GB/s reading the checkpoint's files (4 MiB readv) and writing + fsync-ing 4 GiB: the faster of 64 MiB
    ``pwrite`` through the page cache (each step's writeback started at once) and 4 MiB ``pwrite`` with ``O_DIRECT``
    (past it), both kept."""
    files = sorted(src.glob("*.safetensors"))
    buf = bytearray(4 << 20)
    total, t = 0, time.perf_counter()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    read = total / 1e9 / (time.perf_counter() - t)
    chunk = os.urandom(1 << 20) * 64
    path = work / "floor_write"
    write = write_rate(path, [chunk] * 64)
    direct = _direct_write_rate(path, chunk)
    return {"read_GBps": round(read, 3), "write_GBps": round(max(write, direct), 3),
            "write_buffered_GBps": round(write, 3), "write_direct_GBps": round(direct, 3),
            "read_GB": round(total / 1e9, 2)}


def write_rate(path: Path, chunks: list, *, sync: bool = True) -> float:
    """GB/s writing ``chunks`` end to end into a new ``path`` with one ``pwrite`` each, each chunk's writeback started
    at once (our writer's way), then fsync; the file removed after. Without ``sync``: only the ``pwrite`` calls (the
    copy into the page cache), the file synced before it is removed."""
    os.sync()
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    at = 0
    try:
        for chunk in chunks:
            os.pwrite(fd, chunk, at)
            if sync:
                os.posix_fadvise(fd, at, len(chunk), os.POSIX_FADV_DONTNEED)
            at += len(chunk)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t
    if not sync:
        os.sync()
    path.unlink()
    return at / 1e9 / seconds


def _direct_write_rate(path: Path, chunk: bytes) -> float:
    """GB/s writing + fsync-ing 64 x ``chunk`` with ``O_DIRECT`` from one page-aligned 4 MiB buffer; 0 where the
    filesystem takes no direct writes."""
    buf = mmap.mmap(-1, 4 << 20)
    buf[:] = chunk[:4 << 20]
    os.sync()
    t = time.perf_counter()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError:
        return 0.0
    try:
        os.ftruncate(fd, 64 * len(chunk))
        view = memoryview(buf)
        for at in range(0, 64 * len(chunk), len(buf)):
            done = 0
            while done < len(buf):  # a short write goes on where it stopped (bench_export's direct copy does too)
                done += os.pwrite(fd, view[done:], at + done)
        os.fsync(fd)
    except OSError:
        return 0.0
    finally:
        os.close(fd)
        path.unlink()
    return 64 * len(chunk) / 1e9 / (time.perf_counter() - t)


def disk_bytes(model) -> tuple[int, dict]:
    summary = oe.layout(model).summary()
    return sum(b for k, (_, b) in summary.items() if k in ("disk", "safetensors")), summary


def floor_s(rates: dict, read_bytes: int, written_GB: float) -> float:
    return round(read_bytes / 1e9 / rates["read_GBps"] + written_GB / rates["write_GBps"], 2)


def budget_map(src: Path, gpu_gib: float, cpu_gib: float) -> dict[str, object]:
    """A device map filling GPU 0 up to ``gpu_gib``, then the CPU up to ``cpu_gib``, the rest on disk, in module
    order (embedding, layers, norm, lm_head; a tied lm_head stays with the embedding). transformers' own
    ``device_map="auto"`` let the CPU hold twice its ``max_memory`` here, leaving nothing on disk."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    units = [("model.embed_tokens", model.model.embed_tokens)]
    units += [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    units += [("model.norm", model.model.norm), ("model.rotary_emb", model.model.rotary_emb)]
    if not cfg.tie_word_embeddings:
        units.append(("lm_head", model.lm_head))
    budgets, used, out = [(0, gpu_gib * 2**30), ("cpu", cpu_gib * 2**30)], [0, 0], {}
    for name, module in units:
        size = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
        for i, (device, budget) in enumerate(budgets):
            if used[i] + size <= budget:
                used[i] += size
                out[name] = device
                break
        else:
            out[name] = "disk"
    if cfg.tie_word_embeddings:
        out["lm_head"] = out["model.embed_tokens"]
    return out


def offloaded(src: Path, memory: dict, work: Path):
    device_map = budget_map(src, *memory)
    model = AutoModelForCausalLM.from_pretrained(src, device_map=device_map, dtype=torch.bfloat16,
                                                 offload_folder=str(work / "offload"))
    model.config.architectures = [type(model).__name__]
    return model


def timed_forwards(fn, out: Path, model) -> dict:
    """:func:`timed`, plus how many times ``model``'s own forward ran (``model_forwards``: 1 when the shared-input
    groups came from a forward of the model, 0 from the twin)."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        row = timed(fn, out)
    finally:
        handle.remove()
    return {**row, "model_forwards": len(calls)}


def other_groups(fake: bool):
    """Ours with the shared-input groups always from the twin (``fake``) or from a forward of the model."""
    from offload_export.formats import modelopt as fmt

    saved = fmt.shared_input_groups
    fmt.shared_input_groups = lambda model, device, **kw: saved(model, device, fake=fake)
    return saved


def table_case(src: Path, work: Path, shape: str, cfg_name: str, rates: dict) -> dict:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    from offload_export.formats import modelopt as fmt

    qcfg = getattr(mtq, cfg_name)
    row: dict = {"shape": shape, "config": cfg_name}
    resident = AutoModelForCausalLM.from_pretrained(src, device_map={"": 0}, dtype=torch.bfloat16)
    resident.config.architectures = [type(resident).__name__]
    mtq.quantize(resident, copy.deepcopy(qcfg), calib_loop())
    row["modelopt_resident"] = timed(lambda: export_hf_checkpoint(resident, export_dir=work / "resident"),
                                     work / "resident")
    resident = None  # noqa: F841
    gc.collect()
    torch.cuda.empty_cache()

    model = auto_offloaded(src, work, TABLE_MEMORY[shape])
    mtq.quantize(model, copy.deepcopy(qcfg), calib_loop())
    read, row["layout"] = disk_bytes(model)
    row["read_disk_GB"] = round(read / 1e9, 2)
    row["ours"] = timed_forwards(lambda: oe.save_clean(model, work / "ours", format="modelopt"), work / "ours", model)
    row["ours_vs_resident"] = compare(work / "ours", work / "resident")
    shutil.rmtree(work / "ours")
    if "NVFP4" in cfg_name:  # FP8 forms no groups: the same code path either way
        saved = other_groups(fake=not read)
        try:
            row["ours_other_groups"] = timed_forwards(
                lambda: oe.save_clean(model, work / "ours_fwd", format="modelopt"), work / "ours_fwd", model)
        finally:
            fmt.shared_input_groups = saved
        shutil.rmtree(work / "ours_fwd")
    try:
        row["modelopt_streaming"] = timed(lambda: export_hf_checkpoint(model, export_dir=work / "streaming"),
                                          work / "streaming")
        row["streaming_vs_resident"] = compare(work / "streaming", work / "resident")
    except Exception as e:
        row["modelopt_streaming"] = f"raised {type(e).__name__}: {str(e)[:200]}"
    written = row["ours"]["written_GB"]
    row["floor_s"] = floor_s(rates, read, written)
    model = None  # noqa: F841
    gc.collect()
    torch.cuda.empty_cache()
    return row


def ct_calibrated(src: Path, preset: str):
    """``src`` loaded resident on GPU 0 and calibrated with the compressed-tensors ``preset``
    (``gpu_compressed_tensors.calibrate``: min/max qparams)."""
    from gpu_compressed_tensors import calibrate

    model = AutoModelForCausalLM.from_pretrained(src, device_map={"": 0}, dtype=torch.bfloat16).eval()
    model.config.architectures = [type(model).__name__]
    calibrate(model, preset)
    return model


def ct_dispatched(model, src: Path, work: Path):
    """``model`` dispatched over GPU 2 GiB + CPU 3 GiB + disk (:func:`budget_map`, an offload folder in ``work``)."""
    from accelerate import dispatch_model

    return dispatch_model(model, budget_map(src, *TABLE_CPU_GPU), main_device=0, offload_dir=str(work / "offload"))


def ct_model(work: Path, preset: str = "NVFP4"):
    """:func:`ct_case`'s dispatched model, without the reference: the 4B checkpoint built in ``work / "src"``, the
    floor measured, the model calibrated resident with ``preset`` and dispatched.

    Returns:
        ``(model, floor rates, bytes read from disk, layout summary)``.
    """
    from gpu_packed_check import config

    build_checkpoint(work / "src", config("4b", None))
    rates = floor_rates(work / "src", work)
    model = ct_dispatched(ct_calibrated(work / "src", preset), work / "src", work)
    read, summary = disk_bytes(model)
    return model, rates, read, summary


def ct_case(src: Path, work: Path, preset: str, rates: dict) -> dict:
    """``format="compressed-tensors"`` of the 4B shape beside llm-compressor's save of the resident twin.

    The model is calibrated resident on the GPU (``gpu_compressed_tensors.calibrate``: min/max qparams); the
    reference is llm-compressor's save path (``ModelCompressor.compress_model`` + ``save_pretrained`` +
    ``update_config``) on a deep copy; the model is then dispatched over GPU 2 GiB + CPU 3 GiB + disk
    (:func:`budget_map`, accelerate ``dispatch_model`` with an offload folder) and exported by us."""
    from compressed_tensors.compressors import ModelCompressor
    from gpu_compressed_tensors import compare as ct_compare

    row: dict = {"shape": "4b", "config": f"compressed-tensors {preset}"}
    model = ct_calibrated(src, preset)
    twin = copy.deepcopy(model)

    def llm_compressor_save():
        compressor = ModelCompressor.from_pretrained_model(twin)
        compressor.compress_model(twin)
        twin.save_pretrained(work / "reference")
        compressor.update_config(work / "reference")
        os.sync()  # ours fsyncs its files; the reference is timed to the same point

    row["llm_compressor_resident"] = timed(llm_compressor_save, work / "reference")
    twin = None  # noqa: F841
    gc.collect()
    torch.cuda.empty_cache()
    model = ct_dispatched(model, src, work)
    read, row["layout"] = disk_bytes(model)
    row["read_disk_GB"] = round(read / 1e9, 2)
    row["ours"] = timed(lambda: oe.save_clean(model, work / "ours", format="compressed-tensors"), work / "ours")
    row["ours_vs_reference"] = ct_compare(work / "ours", work / "reference")
    row["floor_s"] = floor_s(rates, read, row["ours"]["written_GB"])
    model = None  # noqa: F841
    gc.collect()
    torch.cuda.empty_cache()
    return row


def amax_to(model, device) -> int:
    """Move every ModelOpt quantizer buffer left on the CPU to ``device`` (the fold's); returns how many."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    moved = 0
    for m in model.modules():
        if isinstance(m, TensorQuantizer):
            for k, b in list(m._buffers.items()):
                if b is not None and b.device.type == "cpu":
                    m._buffers[k] = b.to(device)
                    moved += 1
    return moved


def curve_case(src: Path, work: Path, shape: str, kinds: list[str], rates: dict, disk_held: bool = False) -> list[dict]:
    import modelopt.torch.quantization as mtq

    model = offloaded(src, CURVE_MEMORY, work)
    t = time.perf_counter()
    mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), calib_loop())
    calib_s = round(time.perf_counter() - t, 1)
    promoted = drop_promoted(model) if disk_held else 0
    read, summary = disk_bytes(model)
    source_GB = sum(b for k, (_, b) in summary.items() if k not in ("tied", "missing")) / 1e9
    rows = []
    for kind in kinds:
        fmt = "modelopt" if kind == "packed" else "fake-quant"
        row = {"shape": shape, "export": kind, "layout": summary, "disk_held": disk_held,
               "promoted_GB_dropped": round(promoted / 1e9, 2), "calibrate_s": calib_s, "source_GB": round(source_GB, 2),
               "read_disk_GB": round(read / 1e9, 2)}
        out = work / kind
        try:
            row.update(timed(lambda: oe.save_clean(model, out, format=fmt), out))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            shutil.rmtree(out, ignore_errors=True)
            row["amax_moved_to_cuda"] = amax_to(model, torch.device("cuda"))
            try:
                row.update(timed(lambda: oe.save_clean(model, out, format=fmt), out))
            except Exception as e2:
                row["error2"] = f"{type(e2).__name__}: {str(e2)[:300]}"
                rows.append(row)
                continue
        row["s_per_source_GB"] = round(row["s"] / source_GB, 3)
        row["floor_s"] = floor_s(rates, read, row["written_GB"])
        row["x_floor"] = round(row["s"] / row["floor_s"], 2)
        shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    model = None  # noqa: F841
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def amax_state(model) -> dict[str, tuple[torch.Tensor, str]]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {f"{n}.{k}": (b.detach().float().cpu().clone(), str(b.device)) for n, m in model.named_modules()
            if isinstance(m, TensorQuantizer) for k, b in m._buffers.items() if b is not None}


def compare_amax(got: dict, ref: dict) -> dict:
    diff = [k for k in ref if k not in got or not torch.equal(got[k][0], ref[k][0])]
    rel = [float(((got[k][0] - ref[k][0]).abs() / ref[k][0].abs().clamp_min(1e-30)).max()) for k in diff if k in got]
    return {"buffers": len(ref), "differ": len(diff), "first": diff[:6], "max_rel": max(rel, default=0.0),
            "input_differ": sum("input_quantizer" in k for k in diff), "weight_differ": sum("weight_quantizer" in k for k in diff),
            "devices": sorted({d for _, d in got.values()})}


def layer_inputs(model) -> tuple[list, dict]:
    """Forward pre-hooks on every decoder layer recording (abs max, sum) of its hidden-state input."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, kwargs, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(i, []).append((float(x.float().abs().max()), float(x.double().sum())))
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles, seen


def auto_offloaded(src: Path, work: Path, max_memory: dict | None = None):
    """The issue's layouts: transformers' ``device_map="auto"`` with ``max_memory`` (``{0: "2GiB", "cpu": "3GiB"}``)."""
    model = AutoModelForCausalLM.from_pretrained(src, device_map="auto", max_memory=max_memory or TABLE_MEMORY["4b"],
                                                 dtype=torch.bfloat16, offload_folder=str(work / "offload"))
    model.config.architectures = [type(model).__name__]
    return model


def execution_devices(model) -> dict[str, int]:
    from offload_export._hooks import align_hooks

    out: dict[str, int] = {}
    for m in model.modules():
        for h in align_hooks(m):
            d = str(getattr(h, "execution_device", None))
            out[d] = out.get(d, 0) + 1
    return out


def drop_promoted(model) -> int:
    """Drop the CPU copies ModelOpt 0.47's calibration puts into accelerate's disk loaders (``_writeback_params_
    to_weights_map`` promotes every disk-offloaded weight of a quantized module into the loader's ``state_dict``;
    max calibration leaves the weights unchanged), so the export reads them from disk again. Returns bytes."""
    from offload_export._hooks import align_hooks

    seen, dropped = set(), 0
    for m in model.modules():
        for h in align_hooks(m):
            ds = getattr(getattr(h, "weights_map", None), "dataset", None)
            if ds is None or id(ds) in seen or not hasattr(ds, "index") or not hasattr(ds, "state_dict"):
                continue
            seen.add(id(ds))
            for k in [k for k in ds.state_dict if k in ds.index]:
                dropped += ds.state_dict.pop(k).nbytes
    return dropped


def disk_held_model(work: Path, shape: str = "14b", drop: bool = True):
    """The cost curve's disk-held packed case: ``shape``'s checkpoint built in ``work / "src"``, the floor measured,
    the model loaded over GPU 2 GiB + CPU 8 GiB + disk, NVFP4-calibrated, ModelOpt's promoted CPU copies dropped
    (``drop=False``: kept, the curve's layout as calibration leaves it).

    Returns:
        ``(model, floor rates, bytes read from disk, layout summary)``.
    """
    import modelopt.torch.quantization as mtq

    build_checkpoint(work / "src", Qwen3Config(vocab_size=VOCAB, num_key_value_heads=8, head_dim=128, **CURVE[shape]))
    rates = floor_rates(work / "src", work)
    model = offloaded(work / "src", CURVE_MEMORY, work)
    mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), calib_loop())
    if drop:
        drop_promoted(model)
    read, summary = disk_bytes(model)
    return model, rates, read, summary


def table_model(work: Path, shape: str = "4b", cfg_name: str = "NVFP4_DEFAULT_CFG", max_memory: dict | None = None):
    """A table case's offloaded model (:func:`table_case`'s, without the resident reference): ``shape``'s
    checkpoint built in ``work / "src"``, the floor measured, the model loaded as :func:`auto_offloaded` (with
    ``max_memory`` instead of the table's) and calibrated with ModelOpt's ``cfg_name``.

    Returns:
        ``(model, floor rates, bytes read from disk, layout summary)``.
    """
    import modelopt.torch.quantization as mtq
    from gpu_packed_check import config

    build_checkpoint(work / "src", config(shape, None))
    rates = floor_rates(work / "src", work)
    model = auto_offloaded(work / "src", work, max_memory or TABLE_MEMORY[shape])
    mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), calib_loop())
    read, summary = disk_bytes(model)
    return model, rates, read, summary


def calibration_experiment(src: Path, work: Path, result: dict, shape: str = "4b", issue_layout: bool = False) -> None:
    """Why the offloaded model's calibration differs from the resident twin's, and whether calibrating it inside
    ``oe.materialized(model, device="cuda")`` gives the resident twin's export."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    from offload_export.formats import modelopt as fmt

    qcfg = mtq.NVFP4_DEFAULT_CFG
    row: dict = {"shape": shape, "config": "NVFP4_DEFAULT_CFG",
                 "map": "device_map=auto, max_memory GPU 2 GiB, CPU 3 GiB" if issue_layout else "GPU 1 GiB + CPU 2 GiB + disk"}

    def calibrate(model, inside=None):
        handles, seen = layer_inputs(model)
        try:
            if inside is None:
                mtq.quantize(model, copy.deepcopy(qcfg), calib_loop())
            else:
                with inside(model):
                    mtq.quantize(model, copy.deepcopy(qcfg), calib_loop())
        finally:
            for h in handles:
                h.remove()
        return seen

    resident = AutoModelForCausalLM.from_pretrained(src, device_map={"": 0}, dtype=torch.bfloat16)
    resident.config.architectures = [type(resident).__name__]
    ref_inputs = calibrate(resident)
    ref = amax_state(resident)
    export_hf_checkpoint(resident, export_dir=work / "resident")
    resident = None  # noqa: F841
    gc.collect()
    torch.cuda.empty_cache()
    for label, inside in (("offloaded", None), ("inside_materialized_cuda", lambda m: oe.materialized(m, device="cuda"))):
        try:
            model = auto_offloaded(src, work) if issue_layout else offloaded(src, (1, 2), work)
            row[f"{label}_layout"] = oe.layout(model).summary()
            row[f"{label}_execution_devices"] = execution_devices(model)
            got_inputs = calibrate(model, inside)
            row[f"{label}_amax"] = compare_amax(amax_state(model), ref)
            bad = [i for i in sorted(ref_inputs) if got_inputs.get(i) != ref_inputs[i]]
            row[f"{label}_first_layer_input_differs"] = bad[0] if bad else None
            row[f"{label}_layer_devices"] = {i: str(model.hf_device_map.get(f"model.layers.{i}")) for i in bad[:3]}
            row[f"{label}_ours"] = timed(lambda: oe.save_clean(model, work / "ours", format="modelopt"), work / "ours")
            row[f"{label}_ours_vs_resident"] = compare(work / "ours", work / "resident")
            row[f"{label}_layout_after_calibration"] = oe.layout(model).summary()
            shutil.rmtree(work / "ours")
            if issue_layout and label == "offloaded":
                try:
                    row["offloaded_fake_quant"] = timed(lambda: oe.save_clean(model, work / "fq"), work / "fq")
                except Exception as e:
                    row["offloaded_fake_quant"] = f"raised {type(e).__name__}: {str(e)[:200]}"
                shutil.rmtree(work / "fq", ignore_errors=True)
            if label == "offloaded":
                saved = other_groups(fake=False)
                try:
                    row["offloaded_ours_forward_groups"] = timed(
                        lambda: oe.save_clean(model, work / "ours", format="modelopt"), work / "ours")
                finally:
                    fmt.shared_input_groups = saved
                shutil.rmtree(work / "ours")
        except Exception as e:
            row[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row[f"{label}_trace"] = traceback.format_exc()[-1200:]
        model = None  # noqa: F841
        gc.collect()
        torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in row.items() if k.startswith(label)}), flush=True)
    result.setdefault("calibration", []).append(row)
    shutil.rmtree(work / "resident", ignore_errors=True)


def tables(args, result: dict) -> None:
    from gpu_packed_check import config

    for shape in args.shapes.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"big_{shape}_", dir=args.work))
        build_checkpoint(work / "src", config(shape, None))
        rates = floor_rates(work / "src", work)
        result["floors"][shape] = rates
        print(json.dumps({"floor": shape, **rates}), flush=True)
        for cfg_name in args.configs.split(","):
            case_dir = work / cfg_name
            case_dir.mkdir()
            try:
                row = table_case(work / "src", case_dir, shape, cfg_name, rates)
            except Exception as e:
                row = {"shape": shape, "config": cfg_name, "error": f"{type(e).__name__}: {e}",
                       "trace": traceback.format_exc()[-1500:]}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            args.save(result)
            shutil.rmtree(case_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def ct_tables(args, result: dict) -> None:
    from gpu_packed_check import config

    work = Path(tempfile.mkdtemp(prefix="big_ct_", dir=args.work))
    build_checkpoint(work / "src", config("4b", None))
    rates = floor_rates(work / "src", work)
    result["floors"]["4b ct"] = rates
    for preset in args.ct_presets.split(","):
        case_dir = work / preset
        case_dir.mkdir()
        try:
            row = ct_case(work / "src", case_dir, preset, rates)
        except Exception as e:
            row = {"config": f"compressed-tensors {preset}", "error": f"{type(e).__name__}: {e}",
                   "trace": traceback.format_exc()[-1500:]}
        result["ct_rows"].append(row)
        print(json.dumps(row), flush=True)
        args.save(result)
        shutil.rmtree(case_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


def curve(args, result: dict) -> None:
    fq, packed = args.curve_fake_quant.split(","), args.curve_packed.split(",")
    for shape in sorted(set(fq) | set(packed), key=list(CURVE).index):
        work = Path(tempfile.mkdtemp(prefix=f"curve_{shape}_", dir=args.work))
        cfg = Qwen3Config(vocab_size=VOCAB, num_key_value_heads=8, head_dim=128, **CURVE[shape])
        t = time.perf_counter()
        build_checkpoint(work / "src", cfg)
        build_s = round(time.perf_counter() - t, 1)
        rates = floor_rates(work / "src", work)
        result["floors"][shape] = {**rates, "build_s": build_s}
        print(json.dumps({"floor": shape, **rates, "build_s": build_s}), flush=True)
        kinds = (["fake-quant"] if shape in fq else []) + (["packed"] if shape in packed else [])
        try:
            result["curve"] += curve_case(work / "src", work, shape, kinds, rates)
        except Exception as e:
            result["curve"].append({"shape": shape, "error": f"{type(e).__name__}: {e}",
                                    "trace": traceback.format_exc()[-1500:]})
        args.save(result)
        if shape == "4b" and args.calibration:
            calibration_experiment(work / "src", work, result)
            args.save(result)
        shutil.rmtree(work, ignore_errors=True)


def big(args, result: dict) -> None:
    """8B: the issue's layout (calibration vs the resident twin, fake-quant there, calibration inside
    ``materialized``), then fake-quant and packed with disk-held weights; 14B: packed with disk-held weights."""
    for shape in args.big_shapes.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"big_{shape}_", dir=args.work))
        cfg = Qwen3Config(vocab_size=VOCAB, num_key_value_heads=8, head_dim=128, **CURVE[shape])
        build_checkpoint(work / "src", cfg)
        rates = floor_rates(work / "src", work)
        result["floors"][shape] = rates
        print(json.dumps({"floor": shape, **rates}), flush=True)
        if shape == "8b" and not args.no_issue_layout:
            calibration_experiment(work / "src", work, result, shape, issue_layout=True)
            args.save(result)
        kinds = ["fake-quant", "packed"] if shape == "8b" else ["packed"]
        try:
            result["curve"] += curve_case(work / "src", work, shape, kinds, rates, disk_held=True)
        except Exception as e:
            result["curve"].append({"shape": shape, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]})
        args.save(result)
        shutil.rmtree(work, ignore_errors=True)


def ratio(a, b):
    return round(a / b, 2) if isinstance(a, (int, float)) and b else None


def host_mb(row) -> str:
    """``RssAnon/VmRSS`` peak MB of a timed export, or ``-`` (it raised)."""
    return f"{row['host_peak_MB']['RssAnon']}/{row['host_peak_MB']['VmRSS']}" if isinstance(row, dict) else "-"


def print_tables(result: dict) -> None:
    print(f"device {result['device']}")
    if result["rows"]:
        print("| model, config | ours s (ttfb) | ours, other grouping s | MO streaming s (ttfb) | MO resident s | floor s | "
              "ours/stream | ours/floor | host +anon/+rss MB: ours, stream, resident | = resident (ours, stream) | "
              "disk busy after the first byte: ours, stream |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in result["rows"]:
            if "error" in r:
                print(f"| {r['shape']} {r['config']} | ERROR {r['error'][:150]} |")
                continue
            o, s, res = r["ours"], r.get("modelopt_streaming"), r["modelopt_resident"]
            s_ok = isinstance(s, dict)
            eq = lambda c: f"{c['tensors'] - c['mismatched']}/{c['tensors']}" if c else "-"  # noqa: E731
            before = r.get("ours_other_groups", {}).get("s", "-")
            print(f"| {r['shape']} {r['config']} | {o['s']} ({o['ttfb_s']}) | {before} | "
                  f"{(str(s['s']) + ' (' + str(s['ttfb_s']) + ')') if s_ok else s[:60]} | {res['s']} | {r['floor_s']} | "
                  f"{ratio(o['s'], s['s']) if s_ok else '-'} | {ratio(o['s'], r['floor_s'])} | "
                  f"{host_mb(o)}, {host_mb(s)}, {host_mb(res)} | {eq(r['ours_vs_resident'])}, {eq(r.get('streaming_vs_resident'))} | "
                  f"{o.get('disk_busy_after_first_byte')}, {s.get('disk_busy_after_first_byte') if s_ok else '-'} |")
    if result.get("ct_rows"):
        print("| 4B, compressed-tensors | ours s (ttfb) | llm-compressor resident s | floor s | ours/llm-compressor | "
              "ours/floor | host +anon/+rss MB: ours, llm-compressor | = llm-compressor |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["ct_rows"]:
            if "error" in r:
                print(f"| {r['config']} | ERROR {r['error'][:150]} |")
                continue
            o, ref, c = r["ours"], r["llm_compressor_resident"], r["ours_vs_reference"]
            print(f"| {r['config']} | {o['s']} ({o['ttfb_s']}) | {ref['s']} | {r['floor_s']} | {ratio(o['s'], ref['s'])} | "
                  f"{ratio(o['s'], r['floor_s'])} | {host_mb(o)}, {host_mb(ref)} | {c['tensors'] - c['mismatched']}/{c['tensors']}"
                  f"{'' if c['quantization_config_equal'] else ' (config differs)'} |")
    if result["curve"]:
        print("| shape | export | s (ttfb) | GB read from disk | s per source GB | floor s | x floor | host +anon/+rss MB | note |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in result["curve"]:
            if "s" not in r:
                print(f"| {r['shape']} | {r.get('export')} | ERROR {r.get('error', '')[:100]} {r.get('error2', '')[:100]} |")
                continue
            note = f"amax moved to cuda ({r['amax_moved_to_cuda']}) after: {r['error'][:80]}" if "error" in r else ""
            print(f"| {r['shape']}{' disk-held' if r.get('disk_held') else ''} | {r['export']} | {r['s']} ({r['ttfb_s']}) | {r['read_disk_GB']} | "
                  f"{r['s_per_source_GB']} | {r['floor_s']} | {r['x_floor']} | "
                  f"{r['host_peak_MB']['RssAnon']}/{r['host_peak_MB']['VmRSS']} | {note} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="tables", choices=("tables", "ct", "curve", "both", "big"))
    ap.add_argument("--ct-presets", default="NVFP4,FP8")
    ap.add_argument("--shapes", default="4b,moe")
    ap.add_argument("--configs", default="NVFP4_DEFAULT_CFG,FP8_DEFAULT_CFG")
    ap.add_argument("--curve-fake-quant", default="0.6b,4b,8b")
    ap.add_argument("--curve-packed", default="0.6b,4b,14b")
    ap.add_argument("--big-shapes", default="8b,14b")
    ap.add_argument("--no-issue-layout", action="store_true", help="with --part big: skip the 8B issue-layout experiment")
    ap.add_argument("--work", default=None, help="scratch folder (default: the system's temporary folder)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="h200")
    ap.add_argument("--calibration", action="store_true", help="with --part curve: the calibration experiment at 4B")
    args = ap.parse_args()
    import modelopt
    import transformers

    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "modelopt": modelopt.__version__,
              "transformers": transformers.__version__, "floors": {}, "rows": [], "ct_rows": [], "curve": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.save = lambda r: (out / f"gpu_big_{args.part}_{args.tag}.json").write_text(json.dumps(r, indent=2, default=str))
    try:
        if args.part in ("tables", "both"):
            tables(args, result)
        if args.part == "ct":
            ct_tables(args, result)
        if args.part in ("curve", "both"):
            curve(args, result)
        if args.part == "big":
            big(args, result)
    finally:
        args.save(result)
        print_tables(result)


if __name__ == "__main__":
    main()
