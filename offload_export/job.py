"""What exporting this model means, known before any data is read: layout, quantizers, folds, format, plan.

:func:`prepare_job` checks the arguments and the model and returns a :class:`Job`; ``save_clean``,
``verify`` and the distributed export all start from one. Nothing here reads tensor data or writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import _atomic
from ._store import check_store
from .conversion import save_conversion
from .formats import Format, Source, get_format
from .layout import Layout, declared_ties, layout
from .pipeline import UnitReader
from .plan import ExportPlan, parse_size, plan_export
from .quantizers import Quantizer, find_quantizers

__all__ = ["INDEX_NAME", "Job", "as_dtype", "prepare_job"]

INDEX_NAME = "model.safetensors.index.json"


@dataclass
class Job:
    """One export, planned: where it goes, what it reads, what it folds, and which files hold what.

    Attributes:
        out_dir: the destination.
        source: the model as the format sees it (layout, quantizers, folds, conversion, dtype).
        format: the output format, built for this model.
        plan: units, shards and dropped keys.
        device: fold on this device instead of each quantizer's own, or None.
    """

    out_dir: Path
    source: Source
    format: Format
    plan: ExportPlan
    device: torch.device | None

    @property
    def model(self) -> nn.Module:
        return self.source.model

    @property
    def lay(self) -> Layout:
        return self.source.lay

    @property
    def quantizers(self) -> list[Quantizer]:
        return self.source.quantizers

    @property
    def folds(self) -> dict[str, Quantizer]:
        return self.source.folds

    def reader(self) -> UnitReader:
        """A reader that turns this job's units into their output tensors."""
        return UnitReader(self.source, self.format, device=self.device)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16`` from ``"bfloat16"`` / ``"torch.bfloat16"`` / the dtype itself; None stays None.

    Raises:
        ValueError: not a torch dtype, or not a floating-point one (an integer or bool cast would turn every
            weight into integers, zeros or True).
    """
    if dtype is None:
        return None
    value = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype (e.g. 'bfloat16', 'float16', torch.float32)")
    if not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating-point dtype: dtype= casts the model's "
                         f"floating-point weights (use 'bfloat16', 'float16' or 'float32'; packed formats choose "
                         f"their own integer and fp8 dtypes)")
    return value


def _check_model(model: nn.Module, lay: Layout, *, allow_missing: bool) -> None:
    compiled = next((name for name, m in model.named_modules()
                     if type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod")), None)
    if compiled is not None:
        where = f"model.{compiled}" if compiled else "model"
        raise ValueError(f"got a torch.compile wrapper at {where!r}: its state-dict keys carry '_orig_mod.' and "
                         f"would not load; pass the original module ({where}._orig_mod) instead")
    if lay.opaque:
        key, kind = next(iter(lay.opaque.items()))
        raise ValueError(f"{key} is a {kind} (the extra state of module {key.rpartition('.')[0]!r}, from its "
                         f"get_extra_state), not a tensor: a safetensors checkpoint cannot hold it and a reload would "
                         f"lose it ({len(lay.opaque)} such entr(ies)). Make get_extra_state return a tensor, or export "
                         f"a model without it")
    missing = [k for k, i in lay.items() if i.kind == "missing"]
    if missing and not allow_missing:
        raise RuntimeError(
            f"{missing[0]} is on the meta device and no accelerate hook can supply its data "
            f"({len(missing)} such tensor(s)).\n  Load the model with device_map/offload_folder so that "
            f"offloaded weights have a weights_map, or materialize them before exporting.")


def _check_shared_storage(model: nn.Module, lay: Layout, skip: set[str]) -> None:
    """Resident weights sharing memory without being one tensor or a declared tie would be silently untied."""
    ties = declared_ties(model)
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


def prepare_job(model: nn.Module, out_dir, *, fold: bool = True, format: str = "fake-quant",
                max_shard_size: int | str = "5GB", dtype: torch.dtype | str | None = None,
                device: torch.device | str | None = None, overwrite: bool = False,
                allow_missing: bool = False, check_out: bool = True) -> Job:
    """Check the arguments and the model (and ``out_dir`` when ``check_out``), find quantizers and plan the export.

    Args:
        model, out_dir, fold, format, max_shard_size, dtype, device, overwrite: as for ``save_clean``.
        allow_missing: accept meta tensors without a hook (ranks that hold part of a model).
        check_out: check that ``out_dir`` can be written (``verify`` reads it instead).

    Returns:
        The :class:`Job`.

    Raises:
        ValueError: a bad argument, a model that cannot be exported in ``format``, or an ``out_dir`` that is
            (or contains) an offload folder or source file the model reads its weights from, is ``""``, the
            current directory or a mount point, or (with ``overwrite``) holds more than a checkpoint.
            Also a corrupt offload store (a safetensors header that the safetensors library rejects, a ``.dat``
            file of the wrong size), named by file and tensor, before anything is written.
        RuntimeError: a meta tensor that no hook supplies.
        FileExistsError, PermissionError: ``out_dir`` cannot be written.
    """
    format_cls = get_format(format)
    shard_bytes = parse_size(max_shard_size)
    dtype = as_dtype(dtype)
    device = torch.device(device) if device is not None else None
    lay = layout(model)
    if check_out:  # the stores are found from the hooks, so this holds inside materialized() too
        _atomic.check_destination(out_dir, overwrite=overwrite, protected=lay.source_paths())
    out_dir = Path(out_dir)
    _check_model(model, lay, allow_missing=allow_missing)
    for info in lay.values():  # corrupt offload files fail here, before anything is written
        if info.ref is not None:
            check_store(info.ref.store, info.shape, info.dtype)
    quantizers = find_quantizers(model)
    quantizer_keys = {k for q in quantizers for k in q.state_keys}
    _check_shared_storage(model, lay, quantizer_keys)
    folds = _weight_folds(quantizers, lay) if fold else {}
    source = Source(model, lay, quantizers, folds, save_conversion(model, lay, quantizer_keys), dtype)
    fmt = format_cls(source)
    plan = plan_export(lay, quantizer_keys=quantizer_keys, ignore=sorted(getattr(model, "_keys_to_ignore_on_save", None) or ()),
                       dtype=dtype, max_shard_size=shard_bytes, outputs=fmt.outputs)
    return Job(out_dir, source, fmt, plan, device)
