"""The export plan: which tensors are written, under which names, in which shard — computed without data.

Pure functions over a :class:`~offload_export.layout.Layout`: quantizer state and ignored keys are dropped,
tied aliases collapse onto the key the model's own convention keeps, and the output format's mapping
(transformers' fused-expert conversion, packing) is applied to meta tensors to learn the output names,
dtypes and shapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from .layout import Layout
from .writer import TensorSpec, safetensors_layout

__all__ = ["ExportPlan", "Shard", "Unit", "parse_size", "plan_export", "select_shards", "shard_specs"]

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MiB"``, ``"10kb"`` (as transformers accepts).

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())):
        value = int(float(m.group(1)) * _UNITS[m.group(2) or "B"])
    else:
        raise ValueError(f"max_shard_size={size!r}: expected a positive int or a string like '5GB' or '500MiB'")
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r}: must be positive")
    return value


@dataclass(frozen=True)
class Unit:
    """Source keys read together and the output tensors made from them (one module at a time).

    Without ``converted``, each output is the source of the same name; a converted unit's outputs are made
    from all of its sources together (fused experts split per expert, packed weights with their scales).
    """

    module: str
    sources: tuple[str, ...]
    outputs: tuple[TensorSpec, ...]
    converted: bool = False


@dataclass(frozen=True)
class Shard:
    filename: str
    tensors: tuple[TensorSpec, ...]
    _layouts: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def layout(self, metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
        """:func:`~offload_export.writer.safetensors_layout` of the shard's tensors, computed once per ``metadata``: the
        plan's fingerprint, the resume and the writer all need the header (a MoE's shard has thousands of tensors)."""
        key = tuple(sorted((metadata or {}).items()))
        if key not in self._layouts:
            self._layouts[key] = safetensors_layout(self.tensors, metadata)
        return self._layouts[key]


@dataclass(frozen=True)
class ExportPlan:
    """Everything about the output that can be known before reading data.

    Attributes:
        units: the read/fold/write units, in model order.
        shards: output files and what each holds.
        dropped: keys left out of the weights, with the reason (quantizer state, tied alias, ignored).
    """

    units: tuple[Unit, ...]
    shards: tuple[Shard, ...]
    dropped: Mapping[str, str]

    @property
    def weight_map(self) -> dict[str, str]:
        return {t.name: s.filename for s in self.shards for t in s.tensors}

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def largest_tensor(self) -> int:
        return max((t.nbytes for s in self.shards for t in s.tensors), default=0)


def _out_dtype(dtype: torch.dtype, cast: torch.dtype | None) -> torch.dtype:
    return cast if cast is not None and dtype.is_floating_point else dtype


def shard_specs(specs: Sequence[TensorSpec], max_shard_size: int) -> tuple[Shard, ...]:
    """Split tensors, in order, into shards of at most ``max_shard_size`` bytes (a larger tensor goes alone).

    One shard is named ``model.safetensors``; several ``model-0000k-of-0000n.safetensors``.
    """
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return (Shard("model.safetensors", tuple(groups[0])),)
    n = len(groups)
    return tuple(Shard(f"model-{i:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups, 1))


def select_shards(plan: ExportPlan, filenames: Iterable[str]) -> ExportPlan:
    """The part of ``plan`` that writes only the shards named: those shards, and of each unit only their outputs."""
    wanted = set(filenames)
    shards = tuple(s for s in plan.shards if s.filename in wanted)
    mine = {t.name for s in shards for t in s.tensors}
    units = []
    for unit in plan.units:
        outputs = tuple(o for o in unit.outputs if o.name in mine)
        if outputs:
            sources = unit.sources if unit.converted else tuple(o.name for o in outputs)
            units.append(replace(unit, sources=sources, outputs=outputs))
    return ExportPlan(tuple(units), shards, plan.dropped)


def _ignored(key: str, patterns: Sequence[str]) -> bool:
    return any(key == p or re.search(p, key) for p in patterns)


def plan_export(lay: Layout, *, quantizer_keys: set[str], ignore: Sequence[str] = (),
                dtype: torch.dtype | None = None, max_shard_size: int = 5 * 10**9,
                outputs: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
                ) -> ExportPlan:
    """Plan an export from a layout.

    Args:
        lay: the model's layout.
        quantizer_keys: state-dict keys that belong to quantizers.
        ignore: keys (or regexes) the model declares as not saved (``_keys_to_ignore_on_save``).
        dtype: cast floating-point tensors to this dtype.
        max_shard_size: bytes per shard.
        outputs: one unit's ``state dict -> output state dict`` on meta tensors (the format's
            :meth:`~offload_export.formats.Format.outputs`); ``None`` writes the sources as they are.

    Returns:
        The plan.
    """
    dropped: dict[str, str] = {}
    kept: dict[str, list[str]] = {}
    for key, info in lay.items():
        if key in quantizer_keys:
            dropped[key] = "quantizer state"
        elif info.kind == "tied":
            dropped[key] = f"tied to {info.tied_to}"
        elif _ignored(key, ignore):
            dropped[key] = "_keys_to_ignore_on_save"
        else:
            kept.setdefault(info.module, []).append(key)
    units = []
    for module, keys in kept.items():
        meta = {k: torch.empty(lay[k].shape, dtype=_out_dtype(lay[k].dtype, dtype), device="meta") for k in keys}
        out = outputs(dict(meta)) if outputs is not None else meta
        converted = set(out) != set(keys) or any(out[k].dtype != meta[k].dtype or out[k].shape != meta[k].shape
                                                 for k in keys)
        out = out if converted else meta
        units.append(Unit(module, tuple(keys),
                          tuple(TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in out.items()), converted))
    specs = [spec for unit in units for spec in unit.outputs]
    return ExportPlan(tuple(units), shard_specs(specs, max_shard_size), dropped)
