"""``save_clean()``: plan, then stream one module at a time (read, fold, write), then commit atomically."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import _atomic
from ._hooks import offloaded_tensors
from ._store import check_store, read_store
from .conversion import save_conversion
from .layout import Layout, _declared_ties, layout
from .pipeline import UnitReader
from .plan import ExportPlan, parse_size, plan_export
from .quantizers import Quantizer, find_quantizers
from .writer import ShardWriter, TensorSpec

__all__ = ["ExportReport", "save_clean"]

INDEX_NAME = "model.safetensors.index.json"
QUANTIZER_STATE_NAME = "quantizer_state.safetensors"
_CONFIG_KEYS_DROPPED = ("auto_map", "quantization_config")


@dataclass
class ExportReport:
    """What :func:`save_clean` wrote.

    Attributes:
        out_dir: the checkpoint directory.
        files: file names written, sorted.
        tensors: number of weight tensors; bytes: their total size.
        shards: number of safetensors weight files.
        folded: weights written as their fake-quantized value.
        dropped: state-dict keys left out of the weights, with the reason.
        largest_tensor: bytes of the largest weight tensor.
        seconds: wall time of the export.
    """

    out_dir: str
    files: list[str]
    tensors: int
    bytes: int
    shards: int
    folded: list[str]
    dropped: dict[str, str]
    largest_tensor: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        lines = [f"ExportReport({self.out_dir})",
                 f"  {self.tensors} tensors, {self.bytes / 1e6:.1f} MB in {self.shards} shard(s), "
                 f"{self.seconds:.2f} s ({self.bytes / 1e6 / max(self.seconds, 1e-9):.0f} MB/s)",
                 f"  folded: {len(self.folded)} weight(s); dropped: {len(self.dropped)} key(s) "
                 f"({_count_reasons(self.dropped)})",
                 f"  files: {', '.join(self.files)}"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _count_reasons(dropped: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for reason in dropped.values():
        reason = "tied" if reason.startswith("tied") else reason
        counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(f"{n} {r}" for r, n in counts.items()) or "none"


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype (e.g. 'bfloat16', 'float16', torch.float32)")
    return value


def _check_model(model: nn.Module, lay: Layout, *, allow_missing: bool = False) -> None:
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise ValueError("got a torch.compile wrapper; pass the original module: model._orig_mod")
    missing = [k for k, i in lay.items() if i.kind == "missing"]
    if missing and not allow_missing:
        raise RuntimeError(
            f"{missing[0]} is on the meta device and no accelerate hook can supply its data "
            f"({len(missing)} such tensor(s)).\n  Load the model with device_map/offload_folder so that "
            f"offloaded weights have a weights_map, or materialize them before exporting.")


def _check_shared_storage(model: nn.Module, lay: Layout, skip: set[str]) -> None:
    """Resident weights sharing memory without being one tensor or a declared tie would be silently untied."""
    ties = _declared_ties(model)
    seen: dict[tuple, str] = {}
    for key, info in lay.items():
        t = info.tensor
        if info.kind != "resident" or key in skip or not isinstance(t, torch.Tensor) or not t.numel():
            continue
        other = seen.setdefault((t.device, t.untyped_storage().data_ptr()), key)
        if other != key and ties.get(key) != other and ties.get(other) != key:
            raise ValueError(
                f"{other} and {key} share memory but are neither the same tensor nor a declared tie;\n"
                f"  the checkpoint would hold two copies that load untied. Make them one Parameter "
                f"(tie them) or give {key} its own memory: nn.Parameter({key.rpartition('.')[2]}.detach().clone())")


def _conversion(model: nn.Module, lay: Layout) -> Callable | None:
    """transformers' save-time weight conversion (fused experts -> per-expert), or None when it is the identity."""
    if not hasattr(model, "config"):
        return None
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    meta = {k: torch.empty(i.shape, dtype=i.dtype, device="meta") for k, i in lay.items()}
    out = revert_weight_conversion(model, dict(meta))
    if set(out) == set(meta):
        return None
    return lambda state: revert_weight_conversion(model, state)


def _weight_folds(quantizers: list[Quantizer], lay: Layout) -> dict[str, Quantizer]:
    folds = {}
    for q in quantizers:
        if q.role != "weight" or q.target is None or not q.enabled:
            continue
        key = f"{q.owner_name}.{q.target}" if q.owner_name else q.target
        info = lay.get(key)
        if info is None:
            continue
        if info.kind == "tied":
            raise ValueError(f"{key} is tied to {info.tied_to} but has an enabled weight quantizer ({q.name});\n"
                             f"  one tensor cannot hold both values: untie the weights or disable {q.name}")
        folds[key] = q
    return folds


def _quantizer_state(quantizers: list[Quantizer], lay: Layout, folded: set[str]) -> tuple[dict, dict]:
    tensors, configs = {}, {}
    for q in quantizers:
        state, config = q.adapter.state(q)
        for k, t in state.items():
            info = lay.get(f"{q.name}.{k}")
            if t.device.type == "meta" and info is not None and info.ref is not None:
                t = read_store(info.ref.store, info.dtype, info.shape)
            tensors[f"{q.name}.{k}"] = t.detach().to("cpu").contiguous()
        config["folded"] = q.role == "weight" and f"{q.owner_name}.{q.target}" in folded
        configs[q.name] = config
    return tensors, configs


def _write_config(model: nn.Module, tmp: Path, dtype: torch.dtype | None, notes: list[str]) -> list[str]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        notes.append("not a transformers model: weights written, config.json skipped")
        return []
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    for key in _CONFIG_KEYS_DROPPED:
        if hasattr(config, key):
            delattr(config, key)
            notes.append(f"config.json: dropped {key}")
    config.save_pretrained(tmp)
    data = json.loads((tmp / "config.json").read_text())
    for key in _CONFIG_KEYS_DROPPED:
        data.pop(key, None)
    (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    written = ["config.json"]
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)()
    if generation is not None and can_generate:
        generation.save_pretrained(tmp)
        written.append("generation_config.json")
    return written


def save_clean(model: nn.Module, out_dir: str | os.PathLike, *, fold: bool = True,
               max_shard_size: int | str = "5GB", dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, overwrite: bool = False, tokenizer=None,
               progress: bool = False, group=None, verify: bool = False,
               vllm_fq_state: bool = False) -> ExportReport:
    """Export ``model`` (offloaded or not, fake-quantized or not) as a clean Hugging Face checkpoint.

    One module at a time: its tensors are read from wherever they live (GPU, CPU offload, ``.dat``
    files, the user's safetensors), enabled weight quantizers are folded into their weights on the
    quantizer's device, and the bytes are written into pre-planned safetensors shards. Everything is
    written into a temporary directory beside ``out_dir`` and renamed into place at the end; the model
    is never changed.

    Args:
        model: the model; a ``transformers`` model gets ``config.json`` (without ``auto_map``) and
            ``generation_config.json`` too.
        out_dir: the destination directory; must be absent or empty unless ``overwrite``.
        fold: write enabled weight quantizers' fake-quantized values instead of the raw weights.
        max_shard_size: bytes per shard, an int or a string like ``"5GB"``.
        dtype: cast floating-point weights to this dtype.
        device: fold on this device instead of the quantizer's / the module's execution device.
        overwrite: replace a non-empty ``out_dir`` (only once the new checkpoint is complete).
        tokenizer: saved with ``save_pretrained`` into the checkpoint when given.
        progress: show a progress bar over bytes written.
        group: a ``torch.distributed`` process group whose ranks share the work (see
            :mod:`offload_export.distributed`); when ``None`` and ``torch.distributed`` is initialised
            with several ranks, the default group. Every rank of the group must call ``save_clean``.
        verify: before committing, check the written files against the model with
            :func:`offload_export.verify` (a second pass over the model); any mismatch aborts the export.
        vllm_fq_state: also write ``vllm_fq_modelopt_state.pth`` for ModelOpt's vLLM fake-quant worker
            (ModelOpt models only; tensors and plain types, loadable with ``torch.load(weights_only=True)``).

    Returns:
        An :class:`ExportReport`.

    Raises:
        FileExistsError: ``out_dir`` is not empty and ``overwrite`` is false, or is a file.
        ValueError: a bad argument (shard size, dtype) or a model that cannot be exported as is.
        RuntimeError: a weight that cannot be read or folded (the message names it), or ``verify`` found
            mismatches (they are listed; nothing was committed).

    Example:
        >>> report = offload_export.save_clean(model, "out/", max_shard_size="2GB")  # doctest: +SKIP
    """
    from . import distributed
    if group is not None or distributed.default_group() is not None:
        if verify or vllm_fq_state:
            raise ValueError("verify=True and vllm_fq_state=True are not supported for a distributed export; "
                             "call offload_export.verify(model, out_dir) after it, or export from one process")
        return distributed.save_clean_distributed(
            model, out_dir, fold=fold, max_shard_size=max_shard_size, dtype=dtype, device=device,
            overwrite=overwrite, tokenizer=tokenizer, progress=progress, group=group)
    start = time.perf_counter()
    job = _prepare(model, out_dir, fold=fold, max_shard_size=max_shard_size, dtype=dtype, device=device,
                   overwrite=overwrite)
    notes: list[str] = []
    with _atomic.staging(job.out_dir, overwrite=overwrite) as tmp:
        files = _write_weights(job.reader(model), job.plan, tmp, progress)
        files += _write_metadata(model, job, tmp, tokenizer, notes)
        if vllm_fq_state:
            from .vllm_fq import write_vllm_fq_state
            files.append(write_vllm_fq_state(model, job.quantizers, offloaded_tensors(model), set(job.folds), tmp))
        if verify:
            from .verify import check_staged
            check_staged(model, job, tmp)
    return _report(job, files, time.perf_counter() - start, notes)


@dataclass
class _Job:
    """What an export knows before reading data (shared by :func:`save_clean` and its distributed form)."""

    out_dir: Path
    lay: Layout
    quantizers: list[Quantizer]
    folds: dict[str, Quantizer]
    convert: Callable | None
    plan: ExportPlan
    dtype: torch.dtype | None
    device: torch.device | None

    def reader(self, model: nn.Module) -> UnitReader:
        return UnitReader(model, self.lay, self.folds, dtype=self.dtype, device=self.device, convert=self.convert)


def _prepare(model: nn.Module, out_dir, *, fold: bool, max_shard_size, dtype, device, overwrite: bool,
             allow_missing: bool = False, check_out: bool = True) -> _Job:
    """Check the arguments and the model (and ``out_dir`` when ``check_out``), find quantizers and plan the export."""
    out_dir = Path(out_dir)
    shard_bytes = parse_size(max_shard_size)
    dtype = _as_dtype(dtype)
    device = torch.device(device) if device is not None else None
    if check_out:
        _atomic.check_destination(out_dir, overwrite=overwrite)
    lay = layout(model)
    _check_model(model, lay, allow_missing=allow_missing)
    for info in lay.values():  # corrupt offload files fail here, before anything is written
        if info.ref is not None:
            check_store(info.ref.store, info.shape)
    quantizers = find_quantizers(model)
    quantizer_keys = {k for q in quantizers for k in q.state_keys}
    _check_shared_storage(model, lay, quantizer_keys)
    folds = _weight_folds(quantizers, lay) if fold else {}
    convert = save_conversion(model, lay, exclude=quantizer_keys)
    plan = plan_export(lay, quantizer_keys=quantizer_keys, ignore=sorted(getattr(model, "_keys_to_ignore_on_save", None) or ()),
                       dtype=dtype, max_shard_size=shard_bytes, convert=convert)
    return _Job(out_dir, lay, quantizers, folds, convert, plan, dtype, device)


def _write_metadata(model: nn.Module, job: _Job, tmp: Path, tokenizer, notes: list[str]) -> list[str]:
    """Everything but the weight shards: index, quantizer state, config, tokenizer."""
    files = []
    if len(job.plan.shards) > 1:
        index = {"metadata": {"total_size": job.plan.total_size},
                 "weight_map": dict(sorted(job.plan.weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        files.append(INDEX_NAME)
    if job.quantizers:
        tensors, configs = _quantizer_state(job.quantizers, job.lay, set(job.folds))
        # our writer, not safetensors' save_file: its metadata map is serialized in random order
        writer = ShardWriter(str(tmp / QUANTIZER_STATE_NAME), [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()],
                             {"format": "pt", "quantizers": json.dumps(configs, sort_keys=True)})
        for key, value in tensors.items():
            writer.write(key, value)
        writer.close()
        files.append(QUANTIZER_STATE_NAME)
    files += _write_config(model, tmp, job.dtype, notes)
    if tokenizer is not None:
        files += [os.path.basename(f) for f in tokenizer.save_pretrained(tmp)]
    return files


def _report(job: _Job, files: list[str], seconds: float, notes: list[str]) -> ExportReport:
    plan = job.plan
    files = sorted(set(files) | {s.filename for s in plan.shards})
    return ExportReport(str(job.out_dir), files, sum(len(s.tensors) for s in plan.shards), plan.total_size,
                        len(plan.shards), sorted(job.folds), dict(plan.dropped), plan.largest_tensor, seconds, notes)


def _write_weights(reader: UnitReader, plan: ExportPlan, tmp: Path, progress: bool) -> list[str]:
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=plan.total_size, unit="B", unit_scale=True, desc="offload-export")
    from .distributed import stream_lanes
    writers = {s.filename: ShardWriter(str(tmp / s.filename), s.tensors, {"format": "pt"}) for s in plan.shards}
    shard_of = plan.weight_map

    def write(unit, outputs):
        for spec in unit.outputs:
            writers[shard_of[spec.name]].write(spec.name, outputs.pop(spec.name))
            if bar is not None:
                bar.update(spec.nbytes)

    # one unit is written behind while the next one is folded: the disk and the CPU/GPU work at once
    behind = ThreadPoolExecutor(1, thread_name_prefix="offload-export-writer")
    pending = None
    try:
        for unit, outputs in stream_lanes(reader, plan.units, read_ahead_bytes=_read_ahead_bytes(plan)):
            if pending is not None:
                pending.result()
            pending = behind.submit(write, unit, outputs)
            del outputs
        if pending is not None:
            pending.result()
        for w in writers.values():
            w.close()
    except BaseException:
        behind.shutdown(wait=True, cancel_futures=True)
        for w in writers.values():
            w.abort()
        raise
    finally:
        behind.shutdown(wait=True)
        if bar is not None:
            bar.close()
    return list(writers)


def _read_ahead_bytes(plan: ExportPlan) -> int:
    """Read ahead about one largest tensor (and at least 64 MB): memory stays near 2 x the largest tensor."""
    return max(plan.largest_tensor, 64 * 2**20)
