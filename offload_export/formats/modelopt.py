"""``format="modelopt"``: the checkpoint ModelOpt's ``export_hf_checkpoint`` writes, streamed one module at a time.

ModelOpt's resident export packs every quantized linear in place (NVFP4: two E2M1 per byte + FP8
``weight_scale`` per 16 + FP32 ``weight_scale_2``; FP8; INT8; INT4/W4A8 AWQ: two int4 per byte along
the output dim + ``weight_scale`` per block + ``pre_quant_scale``), adds ``input_scale`` and KV-cache
scales, writes ``hf_quant_config.json`` and a ``quantization_config`` into ``config.json``. Before
that it resmooths modules that read one input (``requantize_resmooth_fused_llm_layers``).

:class:`ModelOptPacker` gives the same tensors for a model in any offload layout without touching it:
the model-level resmoothing is replayed on shadows (copies of each quantized module with its
quantizer state and a meta weight), and each module is packed on a fresh copy holding its real weight
with ModelOpt's own ``_dispatch_export_handler`` and ``_postprocess_single_tensor`` -- or, for NVFP4 and
per-tensor FP8 linears, directly with the functions that handler calls (NVFP4's weight packing recomputed with the
same numerics, :mod:`._nvfp4`; the first linear of each kind is packed both ways and compared bit for bit; the copy
and the handler cost more than the packing). Fused MoE experts
(``_QuantFusedExperts``: 3-D ``gate_up_proj`` / ``down_proj``) are split per expert by ModelOpt's own
``_export_fused_experts``, run on a one-expert copy at a time. Output names then go through ModelOpt's
quantization-aware revert of transformers' conversion (``revert_weight_conversion_quant_aware``).
"""

from __future__ import annotations

import copy
import functools
import json
import threading
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from pathlib import Path

from .._errors import add_note
from .._buffers import anon_empty, cast
from .._store import read_store
from .._transfer import small_to_host, to_device, to_host
from ..materialize import onloaded, same_bits
from ..toolkits import require_toolkit
from ._modelopt_replay import Step, clone_module, group_weight_amax, meta_like, shared_input_groups
from ._nvfp4 import pack as nvfp4_pack
from .base import Format, Source, StateDict, register_format

__all__ = ["HF_QUANT_CONFIG_NAME", "ModelOpt", "ModelOptPacker"]

HF_QUANT_CONFIG_NAME = "hf_quant_config.json"
FORMAT = "format='modelopt'"
_KV_MAX_BOUND = 448  # ModelOpt: "kv cache scale as amax / 448 for both FP8 and NVFP4 KV cache"
# formats whose shared-input groups ModelOpt leaves alone (_fuse_shared_input_modules)
_NO_FUSION = ("fp8", "fp8_pb_real", None)
_PACKED = ("int8_wo", "int8_sq", "fp8", "int4_awq", "w4a8_awq", "nvfp4", "nvfp4_awq", "w4a16_nvfp4")
_AMAX_STEPS = ("input_amax", "weight_amax")  # steps that only set a quantizer's amax (its own buffer)


@dataclass
class _Quantized:
    """One module ModelOpt's export packs: its pristine copy, its shadow and the steps between them."""

    name: str
    fmt: str
    pristine: nn.Module       # quantizer state as in the model (CPU), meta weight
    steps: list[Step] = field(default_factory=list)
    _edited: nn.Module | None = None

    @property
    def shadow(self) -> nn.Module:
        """The quantizer state after resmoothing (CPU), meta weight: the pristine copy itself until a step edits it
        (most modules of a format ModelOpt does not fuse never are), read only."""
        return self.pristine if self._edited is None else self._edited

    def apply(self, step: Step) -> None:
        """Record ``step`` and apply it to the shadow. While every step only sets an amax (a group's max, which
        writes the quantizer's own buffer), the shadow is a copy sharing the pristine copy's Python attributes, as
        cheap as the pristine copy; the first other step makes a full copy and replays the steps on it."""
        was_light = all(s.kind in _AMAX_STEPS for s in self.steps)  # so the shadow shares them, if there is one
        light = was_light and step.kind in _AMAX_STEPS
        if self._edited is None or (was_light and not light):
            self._edited = clone_module(self.pristine, read_only=light)
            for earlier in self.steps:
                earlier.apply(self._edited)
        self.steps.append(step)
        step.apply(self._edited)


@dataclass
class _Experts:
    """A fused-experts module (``_QuantFusedExperts``) that ModelOpt's export splits into per-expert linears.

    Attributes:
        name: the module's name.
        pristine: a copy with its quantizer state as in the model (CPU) and meta 3-D weights.
        parts: per 3-D parameter (``gate_up_proj``, or ``up_proj`` for non-gated experts, then ``down_proj``),
            the per-expert projections ModelOpt makes of it.
        fmt: ModelOpt's quantization format of the module.
        planned_bytes: bytes of all its outputs, once planned.
    """

    name: str
    pristine: nn.Module
    parts: dict[str, tuple[str, ...]]
    fmt: str | None = None
    planned_bytes: int = 0

    @property
    def num_experts(self) -> int:
        return self.pristine.num_experts

    @functools.cached_property
    def signatures(self) -> tuple[tuple, ...]:
        """What ModelOpt's outputs for each expert depend on besides its weights' shapes: the
        :func:`_quantizer_signature` of its weight quantizers and of the input quantizers all experts share
        (taken once; the pristine copy never changes)."""
        shared = _quantizer_signature([getattr(self.pristine, f"{p}_input_quantizer") for p in self.parts])
        weights = [getattr(self.pristine, f"{p}_weight_quantizers") for p in self.parts]
        return tuple(_quantizer_signature([w[e] for w in weights]) + shared for e in range(self.num_experts))


def _packed_format(what: str, pristine: nn.Module) -> str | None:
    """ModelOpt's quantization format of a module's copy, None when unquantized.

    Raises:
        ValueError: a format this export does not pack.
    """
    from modelopt.torch.export.quant_utils import get_quantization_format

    fmt = get_quantization_format(pristine)
    if fmt not in _PACKED and fmt is not None:
        raise ValueError(f"{FORMAT}: {what} is quantized as {fmt!r}, which this export does not pack "
                         f"(supported: {', '.join(_PACKED)}). Use format='fake-quant'")
    return fmt


def _host_copies(modules: list[nn.Module]) -> dict[int, object]:
    """CPU copies of the small GPU tensors of ``modules``' children (their quantizer state, and what ModelOpt keeps
    in an attribute's object: its calibrators' running amax), made together (:func:`small_to_host`), as a
    :func:`clone_module` memo (``id`` of the original -> its copy)."""
    tensors = []
    for m in modules:
        for sub in (sub for child in m.children() for sub in child.modules()):
            tensors += [t for t in (*sub._parameters.values(), *sub._buffers.values()) if t is not None]
            tensors += [t for v in vars(sub).values() if hasattr(v, "__dict__") and not isinstance(v, nn.Module)
                        for t in vars(v).values() if isinstance(t, torch.Tensor)]
    return {id(t): copy for t, copy in zip(tensors, small_to_host(tensors)) if copy is not t}


def _meta_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    own = {**{k: v for k, v in module._parameters.items() if v is not None},
           **{k: v for k, v in module._buffers.items() if v is not None}}
    return {k: meta_like(v) for k, v in own.items()}


class ModelOptPacker:
    """What ``export_hf_checkpoint`` writes for ``model``, module by module, from small state read up front.

    Args:
        model: a transformers model quantized with ``modelopt.torch.quantization`` (any offload layout).
        quantizers: the model's quantizers (:func:`offload_export.find_quantizers`); ModelOpt's are used.
        read: ``state-dict key -> tensor`` for the few weights the resmoothing needs before packing
            (AWQ groups with a per-tensor weight scale); called one key at a time.
        refs: the model's offload map (``offloaded_tensors(model)``), to onload quantizer buffers.
        dtype: the export dtype (``export_hf_checkpoint(dtype=)``); the model's own when None.

    Raises:
        ValueError: no ModelOpt quantizers, a MoE kind this export does not pack (see :meth:`_check_moe`), a
            format or weight shape ModelOpt cannot pack. Linears that read one input but are quantized differently
            (ModelOpt's assertion) are found by the first :meth:`pack` of a quantized module, unless some module has
            a ``pre_quant_scale`` (the groups are found up front then).
    """

    def __init__(self, model: nn.Module, *, quantizers: list, read, refs: dict, dtype: torch.dtype | None = None):
        from modelopt.torch.export.quant_utils import get_quant_config, get_quantization_format
        from modelopt.torch.export.unified_export_hf import _resolve_export_dtype

        quantizers = [q for q in quantizers if q.adapter.name == "modelopt"]
        if not quantizers:
            raise ValueError(f"{FORMAT} needs a model quantized by NVIDIA ModelOpt (mtq.quantize); "
                             f"{type(model).__name__} has no ModelOpt quantizers. Use format='fake-quant'")
        self._model = model
        self._read = read
        self._groups_pending = False  # the shared-input groups are yet to be found and fused (by the first pack)
        self._fusing = threading.Lock()
        self.dtype = _resolve_export_dtype(model, dtype)
        if isinstance(self.dtype, str):  # config.torch_dtype is a string after a save_pretrained round trip
            self.dtype = getattr(torch, self.dtype.removeprefix("torch."))
        self.modules: dict[str, _Quantized] = {}
        self.experts: dict[str, _Experts] = {}
        self._templates: dict[tuple, dict[str, torch.Tensor]] = {}  # expert signature -> its outputs (meta)
        self._direct: dict[tuple, bool] = {}  # linear signature -> packed directly (ModelOpt's export checked)
        self._batched: dict[tuple, bool] = {}  # experts' signature -> packed a stack at a time (the same check)
        self._direct_keys: dict[str, tuple | None] = {}  # module -> its :func:`_direct_quantizers` (once fused)
        self._scalars: dict[tuple[str, torch.device], dict[str, torch.Tensor]] = {}  # made, not yet packed
        self._scalars_lock = threading.Lock()
        self._planned_names: dict[str, dict[str, str]] = {}  # unit -> its outputs' hub names, until it is packed
        self._specs: dict[tuple, dict[str, torch.Tensor]] = {}  # _specs_key -> packed weight and scales (meta)
        self.kv: dict[str, dict[str, torch.Tensor]] = {}      # k_proj/v_proj name -> {out name: scale}
        self.norms: dict[str, torch.Tensor] = {}              # layernorm name -> pre_quant_scale folded in
        with ExitStack() as stack:
            for q in quantizers:
                stack.enter_context(onloaded(q.handle, None, refs))
            self.model_format = get_quantization_format(model)  # the first quantized module's, as ModelOpt reads it
            self._check_moe(model, self.model_format)
            self.hf_quant_config = get_quant_config(model)
            self._snapshot(model, {q.owner_name for q in quantizers})
        self._check_shapes()
        self._resmooth(model)
        self._rules = _hub_name_rules(model, self.hf_quant_config)

    # ---------------------------------------------------------------- state read up front

    @staticmethod
    def _check_moe(model: nn.Module, model_format: str | None) -> None:
        """Refuse the MoE kinds packed here only as ModelOpt would not: ModelOpt 0.47's export fails on
        fused experts under an AWQ format (``get_experts_list`` takes ``len()`` of the experts module), and
        experts that are not ModelOpt's ``_QuantFusedExperts`` (per-expert ``ModuleList``s, Llama4 / GPT-OSS
        BMM experts, DBRX, ``QuantMoELinear``) are not packed by this export yet."""
        import modelopt
        from modelopt.torch.export.hf_export_handlers import _has_fused_experts_quantizers
        from modelopt.torch.export.layer_utils import get_experts_list, is_moe

        awq = model_format is not None and ("awq" in model_format or model_format == "nvfp4_svdquant")
        for name, module in model.named_modules():
            if not is_moe(module):
                continue
            experts = getattr(module, "experts", None)
            if awq:
                try:
                    get_experts_list(module, type(model).__name__.lower())
                except Exception as e:
                    raise ValueError(
                        f"{FORMAT}: {name} ({type(module).__name__}) is a mixture of experts quantized as "
                        f"{model_format}; ModelOpt {modelopt.__version__}'s export_hf_checkpoint fails on it too (its "
                        f"MoE AWQ resmoothing, get_experts_list: {type(e).__name__}: {e}). Quantize the experts "
                        f"with a non-AWQ config (FP8, NVFP4, INT8), or use format='fake-quant'") from e
            if experts is None or not _has_fused_experts_quantizers(experts):
                raise ValueError(
                    f"{FORMAT}: {name} ({type(module).__name__}) is a mixture of experts whose experts "
                    f"({type(experts).__name__}) are not ModelOpt's _QuantFusedExperts (transformers' fused "
                    f"gate_up_proj/down_proj split per expert on export, the MoE kind packed here); packing this MoE "
                    f"kind is not supported yet. Use format='fake-quant', or ModelOpt's export_hf_checkpoint on a "
                    f"resident model")

    def _snapshot(self, model: nn.Module, owners: set[str]) -> None:
        from modelopt.torch.export.hf_export_handlers import _has_fused_experts_quantizers

        kv_format = self.hf_quant_config["quantization"]["kv_cache_quant_algo"]
        owned = [(name, module) for name, module in model.named_modules() if name in owners]
        memo = _host_copies([module for _, module in owned])
        for name, module in owned:
            if hasattr(module, "k_bmm_quantizer") or hasattr(module, "v_bmm_quantizer"):
                self._snapshot_kv(name, module, kv_format)
            if _has_fused_experts_quantizers(module):
                self._snapshot_experts(name, module, memo)
                continue
            if not hasattr(module, "weight_quantizer") or not isinstance(getattr(module, "weight", None), torch.Tensor):
                continue
            pristine = clone_module(module, _meta_tensors(module), torch.device("cpu"), memo=memo, read_only=True)
            fmt = _packed_format(name, pristine)
            if fmt is None:
                continue
            self.modules[name] = _Quantized(name, fmt, pristine)

    def _snapshot_experts(self, name: str, module: nn.Module, memo: dict[int, object]) -> None:
        pristine = clone_module(module, _meta_tensors(module), torch.device("cpu"), memo=memo, read_only=True)
        fmt = _packed_format(f"the experts module {name}", pristine)
        first = getattr(module, "_first_proj_attr", "gate_up_proj")
        gated = getattr(module, "_is_gated", True)
        parts = {first: ("gate_proj", "up_proj") if gated else ("up_proj",), "down_proj": ("down_proj",)}
        self.experts[name] = _Experts(name, pristine, parts, fmt)

    def _snapshot_kv(self, name: str, attn: nn.Module, kv_format) -> None:
        from modelopt.torch.export.quant_utils import _postprocess_single_tensor

        for qname in ("k_bmm_quantizer", "v_bmm_quantizer"):
            q = getattr(attn, qname, None)
            if q is None or not q.is_enabled:
                continue
            for key, value in q.state_dict().items():
                full = f"{name}.{qname}.{key}"
                out, tensor = _postprocess_single_tensor(full, value.detach().to("cpu", copy=True), _KV_MAX_BOUND, kv_format)
                if out is not None:
                    self.kv.setdefault(out.rpartition(".")[0], {})[out] = tensor.contiguous()

    def _check_shapes(self) -> None:
        from modelopt.torch.export.quant_utils import get_weight_block_size

        for name, q in self.modules.items():
            shape = tuple(q.pristine.weight.shape)
            block = get_weight_block_size(q.pristine)
            if q.fmt in ("int4_awq", "w4a8_awq", "nvfp4", "nvfp4_awq", "w4a16_nvfp4"):
                if len(shape) != 2 or not block or shape[-1] % block:
                    raise ValueError(f"{FORMAT}: {name}.weight has shape {shape}; ModelOpt packs {q.fmt} only when "
                                     f"the input dim is a multiple of the block size {block} (partial blocks are not "
                                     f"supported). Exclude this module from quantization, or use format='fake-quant'")
                if q.fmt in ("int4_awq", "w4a8_awq") and shape[0] % 2:
                    raise ValueError(f"{FORMAT}: {name}.weight has an odd output dim {shape[0]}; {q.fmt} packs two "
                                     f"rows per byte. Exclude this module from quantization, or use format='fake-quant'")

    # ---------------------------------------------------------------- requantize_resmooth_fused_llm_layers

    def _resmooth(self, model: nn.Module) -> None:
        """``requantize_resmooth_fused_llm_layers`` on the shadows. Without a ``pre_quant_scale`` to resmooth, the
        groups only set amax values, which change no planned shape: they are then found and fused by the first
        :meth:`pack` of a quantized module, so that the export writes the units before it (the embedding) while
        the groups are traced, rather than before its first byte."""
        if self.model_format is not None and "nvfp4_awq" in self.model_format.lower():
            self._fuse_prequant_to_linear(model)
        if all(q.fmt in _NO_FUSION for q in self.modules.values()):
            return
        self._groups_pending = True
        if any(getattr(q.pristine.input_quantizer, "pre_quant_scale", None) is not None for q in self.modules.values()):
            self._fuse_groups()

    def _fuse_groups(self) -> None:
        """Find the linears that share an input and fuse each group into their shadows, once."""
        with self._fusing:
            if not self._groups_pending:
                return
            self._groups_pending = False
            groups, norms = shared_input_groups(self._model, _input_device(self._model))
            for i, names in enumerate(groups):
                members = [self.modules[n] for n in names if n in self.modules]
                if len(names) < 2 or len(members) != len(names) or members[0].fmt in _NO_FUSION:
                    continue
                self._fuse_group(members)
                if i in norms and "awq" in members[0].fmt:
                    self._fuse_layernorm(norms[i], members)

    def _fuse_prequant_to_linear(self, model: nn.Module) -> None:
        """``fuse_prequant_to_linear``: o_proj/down_proj's ``pre_quant_scale`` into v_proj/up_proj rows."""
        import warnings

        from modelopt.torch.export.quant_utils import PQS_FUSE_MODULE_MAPPING

        for parent_name, parent in model.named_modules():
            for types, (into_attr, from_attr) in PQS_FUSE_MODULE_MAPPING:
                if not any(t in type(parent).__name__ for t in types):
                    continue
                prefix = f"{parent_name}." if parent_name else ""
                into, src = self.modules.get(prefix + into_attr), self.modules.get(prefix + from_attr)
                pqs = getattr(src.shadow.input_quantizer, "_pre_quant_scale", None) if src else None
                if into is None or pqs is None:
                    continue
                if pqs.numel() != into.shadow.weight.shape[-2]:
                    warnings.warn(f"Skipping pattern fuse prequant for {type(parent).__name__}pre_quant_scale dim "
                                  f"{pqs.numel()} != out_channel dim {into.shadow.weight.shape[-2]}")
                    continue
                into.apply(Step("fuse_rows", pqs.clone()))
                src.apply(Step("drop_pqs"))

    def _fuse_group(self, members: list[_Quantized]) -> None:
        """``preprocess_linear_fusion``: mean ``pre_quant_scale`` (weights resmoothed), max input and weight amax."""
        from modelopt.torch.export.quant_utils import all_items_same, get_quantization_format

        shadows = [m.shadow for m in members]
        # a module without steps has its pristine copy's format (a dropped pre_quant_scale may change it)
        if not all_items_same([get_quantization_format(m.shadow) if m.steps else m.fmt for m in members]):
            raise ValueError(f"{FORMAT}: {[m.name for m in members]} read the same input but are quantized "
                             f"differently; ModelOpt's export requires one format per group (its assertion)")
        if shadows[0].input_quantizer.pre_quant_scale is not None:
            avg = torch.mean(torch.stack([s.input_quantizer.pre_quant_scale for s in shadows]), dim=0)
            for m in members:
                if not torch.equal(m.shadow.input_quantizer.pre_quant_scale, avg):
                    m.apply(Step("update_pqs", avg))
            shadows = [m.shadow for m in members]  # an edited module's shadow is now its own copy
        iq = shadows[0].input_quantizer
        if iq.is_enabled and iq.amax is not None:
            self._step_all(members, Step("input_amax", torch.max(torch.stack([s.input_quantizer.amax for s in shadows]))))
        if group_weight_amax(shadows[0]) is not None:
            amaxes = [self._weight_amax_after_steps(m) for m in members]
            self._step_all(members, Step("weight_amax", torch.max(torch.stack(amaxes))))

    def _fuse_layernorm(self, norm: str, members: list[_Quantized]) -> None:
        """``fuse_prequant_layernorm``: the group's ``pre_quant_scale`` into the layernorm weight."""
        pqs = getattr(members[0].shadow.input_quantizer, "_pre_quant_scale", None)
        if pqs is None:
            return
        self.norms[norm] = pqs.clone()
        self._step_all(members, Step("drop_pqs"))

    @staticmethod
    def _step_all(members: list[_Quantized], step: Step) -> None:
        for m in members:
            m.apply(step)

    def _weight_amax_after_steps(self, m: _Quantized) -> torch.Tensor:
        """The weight amax after this module's weight steps: read the weight once and replay them on a copy."""
        if not any(s.needs_weight for s in m.steps):
            return group_weight_amax(m.shadow)
        own = {"weight": self._read(f"{m.name}.weight"), **self._bias(m)}
        # the group max taken over this amax comes next: chunked re-calibration gives the same max
        rows, step = own["weight"].shape[0], _row_step(m, own["weight"], group_max_follows=True)
        if step is None:
            return group_weight_amax(self._replay(m, own, own["weight"].device)).detach().to("cpu", copy=True)
        # the amax taken here is per tensor (a max calibration): the max over row chunks is the same number
        amaxes = []
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            chunk = {k: v[r0:r1] for k, v in own.items()}
            amaxes.append(group_weight_amax(self._replay(m, chunk, own["weight"].device, (r0, r1, rows))).detach())
        return torch.max(torch.stack(amaxes)).to("cpu", copy=True)

    def _bias(self, m: _Quantized) -> dict[str, torch.Tensor]:
        return {"bias": self._read(f"{m.name}.bias")} if getattr(m.pristine, "bias", None) is not None else {}

    def _replay(self, m: _Quantized, tensors: dict[str, torch.Tensor], device: torch.device,
                rows: tuple[int, int, int] | None = None) -> nn.Module:
        """A copy of ``m`` holding ``tensors`` after its steps; ``rows=(r0, r1, n)``: rows r0:r1 of n only."""
        work = clone_module(m.pristine, tensors, device)
        if rows is not None:
            _slice_rows(work.weight_quantizer, *rows)
        for step in m.steps:
            step.apply(work)
        return work

    # ---------------------------------------------------------------- per module

    def outputs(self, module: str, keys: tuple[str, ...], meta: dict[str, torch.Tensor],
                device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Plan time: output name -> meta tensor (exact dtype and shape) of the unit made of ``keys``.

        Names are the ones ModelOpt writes: per expert for fused experts, then reverted to the hub
        checkpoint's names by ModelOpt's rules (kept for the unit's :meth:`pack` where they only rename).
        ``meta`` of fused experts must have the weights' own dtype.
        ``device``: where fused experts' templates are packed (:meth:`_expert_template`); the CPU when None.
        """
        q = self.modules.get(module)
        if module in self.experts:
            out = self._expert_outputs(self.experts[module], meta, device or torch.device("cpu"))
        elif q is None:
            out = dict(meta)
        else:
            out = {}
            for key in keys:
                attr = key.rpartition(".")[2]
                if attr == "weight":
                    out.update(self._packed_specs(q, meta[key]))
                else:
                    out[key] = meta[key]
            out.update(self._quantizer_outputs(q))
        for name, t in self.kv.get(module, {}).items():
            out[name] = meta_like(t)
        named = self._hub_names(out)
        splits, renames = self._rules
        if renames and not splits:  # each name renamed on its own, in order (a split needs the tensors)
            self._planned_names[module] = dict(zip(out, named))
        return named

    def _packed_specs(self, q: _Quantized, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The packed weight and its scales (meta) as ``_export_quantized_weight`` registers them for ``q``."""
        p = f"{q.name}."
        key = _specs_key(q, weight)
        if key not in self._specs:
            self._specs[key] = self._scale_specs(q, weight)
        return {p + name: t for name, t in self._specs[key].items()}

    @staticmethod
    def _scale_specs(q: _Quantized, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`_packed_specs` without the module's prefix, the scales' shapes taken from ModelOpt's functions."""
        from modelopt.torch.export.quant_utils import (
            get_activation_scaling_factor,
            get_weight_scaling_factor,
            get_weight_scaling_factor_2,
        )

        s, fmt = q.shadow, q.fmt
        rows, cols = weight.shape
        meta = lambda shape, dtype: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
        packed = {"fp8": ((rows, cols), torch.float8_e4m3fn), "int8_wo": ((rows, cols), torch.int8),
                  "int8_sq": ((rows, cols), torch.int8), "int4_awq": ((rows // 2, cols), torch.uint8),
                  "w4a8_awq": ((rows // 2, cols), torch.uint8)}.get(fmt, ((rows, cols // 2), torch.uint8))
        out = {"weight": meta(*packed)}
        if fmt == "fp8":
            amax = s.weight_quantizer._amax
            out["weight_scale"] = meta(() if amax.dim() == 1 else tuple(amax.shape), torch.float32)
            if hasattr(s.input_quantizer, "_amax"):
                out["input_scale"] = meta(tuple(s.input_quantizer._amax.squeeze().shape), torch.float32)
            return out
        if "nvfp4" in fmt:
            block = s.weight_quantizer.block_sizes[-1]
            out["weight_scale"] = meta((rows, cols // block), torch.float8_e4m3fn)
        else:
            out["weight_scale"] = meta_like(get_weight_scaling_factor(s))
        iq = s.input_quantizer
        if iq is not None and "disabled" not in repr(iq) and iq.amax is not None:
            out["input_scale"] = meta_like(get_activation_scaling_factor(s).squeeze())
        if fmt in ("nvfp4", "nvfp4_awq", "w4a16_nvfp4", "w4a8_awq"):
            out["weight_scale_2"] = meta_like(get_weight_scaling_factor_2(s).squeeze())
        return out

    def _quantizer_outputs(self, q: _Quantized) -> dict[str, torch.Tensor]:
        """Quantizer state that survives ModelOp's postprocess_state_dict (``pre_quant_scale``)."""
        from modelopt.torch.export.quant_utils import _postprocess_single_tensor

        out = {}
        for attr, child in q.shadow.named_children():
            for key, value in child.state_dict().items():
                name, value = _postprocess_single_tensor(f"{q.name}.{attr}.{key}", value, _KV_MAX_BOUND, None)
                if name is not None:
                    out[name] = meta_like(value)
        return out

    def pack(self, module: str, values: dict[str, torch.Tensor], device: torch.device | None = None,
             owner: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Run time: the unit's source tensors (``key -> tensor``) -> its output tensors, as ModelOpt writes them.

        ``owner`` is the model's module (only its class and structure are used); required for packed and
        layernorm-fused units. A fused-experts unit pops each 3-D weight from ``values`` once it is packed.
        The first quantized module's pack finds and fuses the shared-input groups first (:meth:`_resmooth`); where
        that runs the model's own forward, nothing else may run the model meanwhile (the export reads its stores).
        """
        if module in self.modules:
            self._fuse_groups()
        out = self._pack(module, values, device, owner)
        for name, t in self.kv.get(module, {}).items():
            out[name] = t.to(device) if device is not None else t.clone()
        planned = self._planned_names.pop(module, None)
        if planned is not None and planned.keys() == out.keys():  # the plan's names: ModelOpt's rules run once a name
            return {planned[k]: v for k, v in out.items()}
        return self._hub_names(out)

    def _hub_names(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """ModelOpt's ``revert_weight_conversion_quant_aware`` on one unit's outputs (hub checkpoint names)."""
        from modelopt.torch.export.quant_aware_conversion import QuantConversionUnsupportedError, apply_reverse_rules

        splits, renames = self._rules
        if not splits and not renames:
            return out
        try:
            return apply_reverse_rules(out, splits, renames)
        except QuantConversionUnsupportedError as e:
            raise ValueError(f"{FORMAT}: ModelOpt's revert of transformers' weight names fails on {sorted(out)} ({e}); "
                             f"its export then keeps the in-memory names for the whole checkpoint, which this export "
                             f"does not replay. Use format='fake-quant'") from e

    def _pack(self, module: str, values, device, owner) -> dict[str, torch.Tensor]:
        from modelopt.torch.export.quant_utils import fuse_prequant_layernorm

        prefix = f"{module}." if module else ""
        if module in self.experts:
            return self._pack_experts(self.experts[module], values, device or next(iter(values.values())).device)
        own = {k[len(prefix):]: v for k, v in values.items()}
        q = self.modules.get(module)
        if q is not None:
            return self._pack_linear(q, own, device or next(iter(values.values())).device, prefix)
        if module in self.norms:
            holder = nn.Module()
            holder.input_quantizer = self._pqs_holder(module)
            work = clone_module(owner, own, device)
            with torch.no_grad():
                fuse_prequant_layernorm(work, [holder])
            return {prefix + k: v.detach().contiguous() for k, v in work.state_dict().items() if prefix + k in values}
        return dict(values)

    def _pack_linear(self, q: _Quantized, own: dict, device: torch.device, prefix: str) -> dict[str, torch.Tensor]:
        """One quantized module's outputs: packed directly (:func:`_pack_weight`) where :meth:`_direct_signature`
        allows it, else by ModelOpt's export handler on a copy. The first module of each signature is packed both
        ways: when the direct tensors differ from ModelOpt's, a warning says so and that signature takes the handler
        from then on."""
        signature = self._direct_signature(q, own)
        verdict = self._direct.get(signature) if signature is not None else False
        if verdict:
            return self._pack_direct(q, own, device, prefix)
        step = _row_step(q, own["weight"])
        if step is not None:
            reference = self._pack_rows(q, own, device, prefix, step)
        else:
            reference = _export_copy(self._replay(q, own, device), q.name, prefix, self.dtype)
        if verdict is None:
            trial = self._pack_direct(q, own, device, prefix)
            differs = sorted(set(reference) ^ set(trial)) or \
                [n for n in reference if not same_bits(reference[n], trial[n])]
            if differs:
                warnings.warn(f"{FORMAT}: packing {q.name} directly gives {differs[0]} unlike ModelOpt's export of it; "
                              f"the modules like it are packed by ModelOpt's export handler (slower) instead", stacklevel=2)
            self._direct[signature] = not differs
        return reference

    def _direct_signature(self, q: _Quantized, own: dict[str, torch.Tensor]) -> tuple | None:
        """What a quantized module's outputs depend on besides its weight's values and its per-tensor amax, when
        :meth:`_pack_direct` may compute them (:func:`_direct_quantizers`, a 2-D weight); None otherwise. Called once
        the groups are fused (the quantizers are final then)."""
        key = self._direct_key(q)
        if key is None or own["weight"].dim() != 2:
            return None
        return key, tuple((k, tuple(t.shape), t.dtype) for k, t in own.items())

    def _direct_key(self, q: _Quantized) -> tuple | None:
        """:func:`_direct_quantizers` of ``q``, worked out once."""
        if q.name not in self._direct_keys:
            self._direct_keys[q.name] = _direct_quantizers(q)
        return self._direct_keys[q.name]

    def _scalars_of(self, q: _Quantized, device: torch.device) -> dict[str, torch.Tensor]:
        """:func:`_direct_scalars` of ``q`` on ``device``. Its first call makes them for every module alike (the same
        :func:`_direct_quantizers`) at once: each call of ModelOpt's scale functions reads its result back to check it,
        a wait for the GPU's queue per module otherwise."""
        with self._scalars_lock:
            if (q.name, device) not in self._scalars:
                key = self._direct_key(q)
                alike = [m for m in self.modules.values()
                         if (m.name, device) not in self._scalars and self._direct_key(m) == key]
                for m, scalars in zip(alike, _direct_scalars(alike, device)):
                    self._scalars[(m.name, device)] = scalars
            return self._scalars.pop((q.name, device))

    def _pack_direct(self, q: _Quantized, own: dict, device: torch.device, prefix: str) -> dict[str, torch.Tensor]:
        """What ``_export_quantized_weight`` registers for a :meth:`_direct_signature` module, computed as it
        computes them (:func:`_pack_weight`) on the export device, rows in chunks (both formats pack rows
        independently), then ModelOpt's per-tensor postprocessing."""
        from modelopt.torch.export.quant_utils import _postprocess_single_tensor

        weight = own["weight"]
        scalars = self._scalars_of(q, device)
        scale = scalars[_PER_TENSOR[q.fmt]]
        block = q.shadow.weight_quantizer.block_sizes[-1] if q.fmt == "nvfp4" else None
        rows, cols = weight.shape
        step = max(1, _ROW_CHUNK_BYTES.get(device.type, _DEVICE_ROW_CHUNK_BYTES) // max(1, cols * weight.element_size()))
        made: dict[str, torch.Tensor] = {}
        for r0 in range(0, rows, step):
            packed, extra = _pack_weight(q.fmt, weight[r0:r0 + step], scale, self.dtype, block)
            for name, t in {"weight": packed, **extra}.items():
                if step >= rows:
                    made[name] = t
                    continue
                if name not in made:
                    shape = (rows, *t.shape[1:])
                    made[name] = anon_empty(shape, t.dtype) if t.device.type == "cpu" else t.new_empty(shape)
                made[name][r0:r0 + t.shape[0]].copy_(t)
        bias = {"bias": own["bias"]} if own.get("bias") is not None else {}
        out = {}
        for attr, t in {**made, **bias, **scalars}.items():
            name, t = _postprocess_single_tensor(prefix + attr, t, _KV_MAX_BOUND, None)
            if name is not None:
                out[name] = t.detach().contiguous()
        return out

    def _pack_rows(self, q: _Quantized, own: dict, device, prefix: str, step: int) -> dict[str, torch.Tensor]:
        """Pack a large weight ``step`` rows at a time (every format here packs rows independently), so that
        ModelOpt's float32 temporaries stay small; the per-row and per-block parts are stitched together."""
        rows = own["weight"].shape[0]
        out: dict[str, torch.Tensor] = {}
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            chunk = {k: v[r0:r1] if k in ("weight", "bias") else v for k, v in own.items()}
            work = self._replay(q, chunk, device, (r0, r1, rows))
            for name, t in _export_copy(work, q.name, prefix, self.dtype).items():
                if not _per_row(name, t):
                    out.setdefault(name, t)
                    continue
                factor = t.shape[0] / (r1 - r0)  # 1/2 for int4 (two rows a byte)
                if name not in out:
                    shape = (round(rows * factor), *t.shape[1:])
                    out[name] = anon_empty(shape, t.dtype) if t.device.type == "cpu" else t.new_empty(shape)
                out[name][round(r0 * factor):round(r0 * factor) + t.shape[0]].copy_(t)
        return out

    # ---------------------------------------------------------------- fused experts, one expert at a time

    def _expert_outputs(self, x: _Experts, meta: dict[str, torch.Tensor], device: torch.device
                        ) -> dict[str, torch.Tensor]:
        """Plan time: ModelOpt's per-expert outputs, from a pack of one expert of ones on ``device`` per distinct
        expert signature (weight shapes and quantizer state shapes): names, dtypes and shapes, never values."""
        head = f"{x.name}."
        one = {p: meta[head + p] for p in x.parts}
        out: dict[str, torch.Tensor] = {}
        for e in range(x.num_experts):
            key = (tuple((p, tuple(t.shape[1:]), t.dtype) for p, t in one.items()), x.signatures[e])
            if key not in self._templates:
                self._templates[key] = self._expert_template(x, e, one, device)
            for name, t in self._templates[key].items():
                out[name.replace(_EXPERT, f"{head}{e}.", 1)] = t
        x.planned_bytes = sum(t.numel() * t.element_size() for t in out.values())
        _warn_uncalibrated(x)
        return out

    def _expert_template(self, x: _Experts, e: int, one: dict[str, torch.Tensor], device: torch.device
                         ) -> dict[str, torch.Tensor]:
        """Expert ``e``'s outputs (meta, names with :data:`_EXPERT` for its prefix), packed from ones on ``device``:
        the experts' own execution device, where ModelOpt's elementwise functions over one expert take a
        millisecond, against a tenth of a second or more on the CPU (before the first byte)."""
        ones = {p: torch.ones((1, *t.shape[1:]), dtype=t.dtype, device=device) for p, t in one.items()}
        try:
            # as in the run-time pack, a kernel that allocates on the current device finds the experts' GPU there
            with warnings.catch_warnings(), torch.cuda.device(device) if device.type == "cuda" else nullcontext():
                warnings.simplefilter("ignore")  # ModelOpt's uncalibrated-expert warnings belong to the real pack
                packed = self._pack_expert(x, e, ones, device, _input_quantizers(x, device))
        except Exception as err:
            add_note(err, f"offload_export: ModelOpt's _export_fused_experts failed on expert {e} of {x.name} (shapes "
                          f"{ {p: tuple(t.shape) for p, t in one.items()} }) while planning format='modelopt'; its "
                          f"export_hf_checkpoint of the resident model fails the same way")
            raise
        return {name.replace(f"{x.name}.{e}.", _EXPERT, 1): meta_like(t) for name, t in packed.items()}

    def _pack_experts(self, x: _Experts, values: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """Run time: a stack of experts at a time where :meth:`_batchable` (checked against ModelOpt's own export of
        one expert), else one expert at a time. When the sources and all outputs exceed 2 x the larger 3-D weight (8-bit
        formats), each 3-D weight is packed in its own pass and popped from ``values`` once packed."""
        alone = self._batchable(x)
        if alone is not None:
            out = self._pack_experts_batched(x, values, device, alone)
            if out is not None:
                return out
        head = f"{x.name}."
        sources = {p: values[head + p] for p in x.parts}
        specs = {p: (tuple(t.shape), t.dtype) for p, t in sources.items()}
        largest = max(t.nbytes for t in sources.values())
        one_pass = sum(t.nbytes for t in sources.values()) + x.planned_bytes <= 2 * largest
        del sources
        inputs = _input_quantizers(x, device)  # one for all experts, as in the model (and ModelOpt's export)
        out: dict[str, torch.Tensor] = {}
        for part in [None] if one_pass else list(x.parts):
            for e in range(x.num_experts):
                tensors = {p: values[head + p][e:e + 1] if part in (None, p) else _stand_in(*specs[p], device)
                           for p in x.parts}
                out.update(self._pack_expert(x, e, tensors, device, inputs, part))
            del tensors
            if part is not None:
                values.pop(head + part)
        return out

    @staticmethod
    def _batchable(x: _Experts) -> tuple[int, ...] | None:
        """NVFP4 or per-tensor FP8 experts whose weight quantizers are alike but for their per-tensor amax, without
        ``pre_quant_scale``: what ModelOpt's export computes for each calibrated one is the format's numerics on the
        expert's slice with the expert's own per-tensor scale (NVFP4: ``weight_scale_2``, functions that take a stack
        of experts; FP8: ``weight_scale``, applied to each expert's slice by the call ModelOpt makes for it).

        Returns:
            None when the experts are not packed a stack at a time; else the experts left uncalibrated (amax
            missing or zero), whose amax ModelOpt derives from the weight: packed one at a time.
        """
        from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer
        from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

        if x.fmt not in _PER_TENSOR:
            return None
        alone = set()
        for p in x.parts:
            if getattr(getattr(x.pristine, f"{p}_input_quantizer"), "_pre_quant_scale", None) is not None:
                return None
            for e, q in enumerate(getattr(x.pristine, f"{p}_weight_quantizers")):
                if not isinstance(q, TensorQuantizer) or isinstance(q, SequentialQuantizer) or not q.is_enabled:
                    return None
                if x.fmt == "nvfp4" and NVFP4QTensor._is_static_quantizer(q):
                    return None
                amax = getattr(q, "_amax", None)
                if amax is None or not bool(amax.any()):
                    alone.add(e)
                elif amax.numel() != 1 or (x.fmt == "fp8" and (amax.dim() or q.block_sizes)):
                    return None  # FP8: ModelOpt's per-tensor scale of a 1-element amax takes another branch
        together = [e for e in range(x.num_experts) if e not in alone]
        if not together or any(x.signatures[e] != x.signatures[together[0]] for e in together[1:]):
            return None
        return tuple(sorted(alone))

    def _pack_experts_batched(self, x: _Experts, values: dict[str, torch.Tensor], device: torch.device,
                              alone: tuple[int, ...]) -> dict[str, torch.Tensor] | None:
        """Every expert of a :meth:`_batchable` module, those in ``alone`` one at a time, the others a stack at a time
        (as many as fit the row chunk), each 3-D weight popped from ``values`` once packed. The first calibrated expert
        of the first module of each signature (its class, format, quantizers, weights' shapes and dtypes) is first
        packed both ways: when its tensors differ from ModelOpt's own export of it, a warning says so and the modules
        of that signature return None (nothing popped)."""
        head = f"{x.name}."
        k = next(e for e in range(x.num_experts) if e not in alone)
        signature = (type(x.pristine), x.fmt, x.signatures[k], device.type,
                     tuple((p, tuple(values[head + p].shape), values[head + p].dtype) for p in x.parts))
        verdict = self._batched.get(signature)
        if verdict is False:
            return None
        # ModelOpt's export of one expert (its input quantizers copied to ``device``) only where it runs
        inputs = _input_quantizers(x, device) if verdict is None or alone else {}

        def one(e: int) -> dict[str, torch.Tensor]:
            return self._pack_expert(x, e, {p: values[head + p][e:e + 1] for p in x.parts}, device, inputs)

        shared = _expert_input_scales(x, device)
        if verdict is None:
            reference = one(k)
            trial = self._batched_outputs(x, values, device, shared, alone, k, k + 1)
            differs = sorted(set(reference) ^ set(trial)) or \
                [n for n in reference if not same_bits(reference[n], trial[n])]
            self._batched[signature] = not differs
            if differs:
                warnings.warn(f"{FORMAT}: packing the experts of {x.name} together gives {differs[0]} unlike "
                              f"ModelOpt's export of expert {k}; the experts like them are packed one at a time "
                              f"(slower) instead", stacklevel=2)
                return None
        out = {n: t for e in alone for n, t in one(e).items()}
        out.update(self._batched_outputs(x, values, device, shared, alone, 0, x.num_experts, pop=True))
        return out

    def _batched_outputs(self, x: _Experts, values: dict[str, torch.Tensor], device: torch.device,
                         shared: dict[str, torch.Tensor], alone: tuple[int, ...], start: int, stop: int, *,
                         pop: bool = False) -> dict[str, torch.Tensor]:
        """ModelOpt's per-expert outputs of the experts in ``start:stop`` but those in ``alone``, computed a stack of experts at
        a time (:func:`_pack_weight`); ``shared``: the ``<proj>.input_scale`` outputs (the same for every expert).
        With ``pop``, each 3-D weight is popped from ``values`` once packed."""
        from modelopt.torch.export.quant_utils import _postprocess_single_tensor
        from modelopt.torch.quantization.plugins.huggingface import _get_fused_expert_intermediate_dim

        head, out = f"{x.name}.", {}
        for part, projections in x.parts.items():
            source = values[head + part]
            quantizers = getattr(x.pristine, f"{part}_weight_quantizers")
            scales_here = _per_tensor_scales(x.fmt, quantizers[start:stop], device, [e - start for e in alone])
            scales = to_host(scales_here)
            if len(projections) == 2:  # gated: gate rows, then up rows
                split = _get_fused_expert_intermediate_dim(x.pristine)
                rows = {projections[0]: (0, split), projections[1]: (split, source.shape[1])}
            else:
                rows = {projections[0]: (0, source.shape[1])}
            chunk_bytes = _ROW_CHUNK_BYTES.get(device.type, _DEVICE_ROW_CHUNK_BYTES)
            step = max(1, chunk_bytes // max(1, source[0].numel() * source.element_size()))
            for e0 in range(start, stop, step):
                e1 = min(stop, e0 + step)
                here = scales_here[e0 - start:e1 - start]
                for proj, (r0, r1) in rows.items():
                    weight = source[e0:e1, r0:r1].contiguous()  # ModelOpt packs weight_slice.contiguous()
                    packed, made = self._pack_stack(x, quantizers, weight, here, e0, e1, alone)
                    del weight
                    for e in range(e0, e1):
                        if e in alone:
                            continue
                        tensors = {"weight": packed[e - e0], **{a: t[e - e0] for a, t in made.items()},
                                   _PER_TENSOR[x.fmt]: scales[e - start]}
                        if f"{proj}.input_scale" in shared:
                            tensors["input_scale"] = shared[f"{proj}.input_scale"]
                        for attr, t in tensors.items():
                            name, t = _postprocess_single_tensor(f"{head}{e}.{proj}.{attr}", t, _KV_MAX_BOUND, None)
                            if name is not None:
                                out[name] = t.contiguous()
            del source
            if pop:
                values.pop(head + part)
        return out

    def _pack_stack(self, x: _Experts, quantizers, weight: torch.Tensor, scales: torch.Tensor, e0: int, e1: int,
                    alone: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Experts ``e0:e1``'s packed weights (a stack, where ``weight`` is: the writer streams a GPU stack's
        per-expert views to the file) from their slice ``weight`` and per-tensor ``scales`` (on the export device),
        and the other per-expert tensors made on the way (NVFP4's block ``weight_scale``). FP8 divides each expert's
        slice by its own 0-d scale, as ModelOpt does: dividing the stack by a column of scales would round once from
        float32, where ModelOpt rounds to the weight's dtype first."""
        if x.fmt == "fp8":
            return torch.stack([
                torch.zeros(w.shape, dtype=torch.float8_e4m3fn, device=w.device) if e in alone else
                _pack_weight("fp8", w, s, self.dtype)[0] for e, w, s in zip(range(e0, e1), weight, scales)]), {}
        return _pack_weight("nvfp4", weight, scales.view(-1, 1, 1), self.dtype, quantizers[0].block_sizes[-1])

    def _pack_expert(self, x: _Experts, e: int, tensors: dict[str, torch.Tensor], device: torch.device,
                     inputs: dict[str, nn.Module], part: str | None = None) -> dict[str, torch.Tensor]:
        """ModelOpt's export (``_export_fused_experts``, through its handler registry) of expert ``e`` alone,
        under the names it gives expert ``e``; with ``part``, only the projections made of that 3-D weight."""
        head = f"{x.name}."
        out = {}
        for name, t in _export_copy(_expert_copy(x, e, tensors, device, inputs, part), x.name, head, self.dtype).items():
            index, _, rest = name[len(head):].partition(".")
            if index != "0":  # not per expert (transformers' fused experts hold none)
                out[name] = t
            elif part is None or rest.partition(".")[0] in x.parts[part]:
                out[f"{head}{e}.{rest}"] = t
        return out

    def _pqs_holder(self, norm: str) -> nn.Module:
        """A quantizer whose ``_pre_quant_scale`` is the one folded into layernorm ``norm``."""
        from modelopt.torch.quantization.nn import TensorQuantizer

        holder = TensorQuantizer()
        holder.register_buffer("_pre_quant_scale", self.norms[norm])
        return holder

    # ---------------------------------------------------------------- metadata

    def config_quantization(self) -> dict:
        """``quantization_config`` for config.json (ModelOpt's ``convert_hf_quant_config_format``)."""
        from modelopt.torch.export.convert_hf_config import convert_hf_quant_config_format

        return convert_hf_quant_config_format(copy.deepcopy(self.hf_quant_config))

    def sanitized_config(self) -> dict:
        """config.json keys ModelOpt's ``sanitize_hf_config_for_deployment`` changes for this model."""
        from modelopt.torch.export.plugins import sanitize_hf_config_for_deployment

        config = getattr(self._model, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            return {}
        data = json.loads(config.to_json_string(use_diff=False))
        before = copy.deepcopy(data)
        sanitize_hf_config_for_deployment(data, self._model)
        return {k: v for k, v in data.items() if before.get(k) != v}

    def hf_quant_config_text(self) -> str:
        """``hf_quant_config.json`` as ModelOpt writes it."""
        return json.dumps(self.hf_quant_config, indent=4)


# ModelOpt's float32 temporaries per chunk: cache-sized on the CPU (host memory is the bound there); on a GPU,
# where every chunk costs a few kernel launches per ModelOpt call, large
_ROW_CHUNK_BYTES = {"cpu": 2 * 2**20}
_DEVICE_ROW_CHUNK_BYTES = 256 * 2**20
_EXPERT = "\0"  # "<experts module>.<index>." in an expert's output names planned once for many experts
# the formats whose fused experts are packed a stack at a time, and the name of each expert's per-tensor scale
_PER_TENSOR = {"nvfp4": "weight_scale_2", "fp8": "weight_scale"}
_ROW_FORMATS = ("int8_wo", "int8_sq", "fp8", "int4_awq", "w4a8_awq", "nvfp4", "w4a16_nvfp4")


def _export_copy(work: nn.Module, module: str, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """ModelOpt's per-module export on ``work`` (a copy), then its per-tensor postprocessing of the state dict."""
    from modelopt.torch.export.quant_utils import _postprocess_single_tensor
    from modelopt.torch.export.registry import ExportContext
    from modelopt.torch.export.unified_export_hf import _dispatch_export_handler

    with torch.no_grad():
        _dispatch_export_handler(module, work, ExportContext(model=work, dtype=dtype))
    out = {}
    for key, value in work.state_dict(prefix=prefix).items():
        name, value = _postprocess_single_tensor(key, value, _KV_MAX_BOUND, None)
        if name is not None:
            out[name] = value.detach().contiguous()
    return out


def _input_quantizers(x: _Experts, device: torch.device) -> dict[str, nn.Module]:
    """Copies of the experts' shared input quantizers, by attribute name."""
    return {f"{p}_input_quantizer": clone_module(getattr(x.pristine, f"{p}_input_quantizer"), device=device)
            for p in x.parts}


def _expert_copy(x: _Experts, e: int, tensors: dict[str, torch.Tensor], device: torch.device,
                 inputs: dict[str, nn.Module], part: str | None) -> nn.Module:
    """A copy of the experts module holding expert ``e`` only (``num_experts=1``, a copy of expert ``e``'s weight
    quantizers, the input quantizers ``inputs`` as given); with ``part``, the other weight's quantizer is off,
    so ModelOpt leaves that weight (a stand-in) unpacked."""
    lists = {p: f"{p}_weight_quantizers" for p in x.parts}
    children = {attr: nn.ModuleList([clone_module(getattr(x.pristine, attr)[e], device=device)])
                for attr in lists.values()}
    work = clone_module(x.pristine, tensors, device, children={**children, **inputs})
    work.num_experts = 1
    for p, attr in lists.items():
        if part is not None and p != part:
            getattr(work, attr)[0].disable()
    return work


def _specs_key(q: _Quantized, weight: torch.Tensor) -> tuple:
    """What the shapes and dtypes of a linear's packed weight and scales depend on: its format, its weight's shape and
    dtype, and of each of its weight and input quantizers (a sequence's too) the class, whether enabled, the block
    sizes, the bits and the axis (which decide how ModelOpt reduces an amax) and the buffers' shapes and dtypes
    (ModelOpt's scales are elementwise in the amax). Microseconds, against hundreds for ModelOpt's scale functions."""
    def of(quantizer: nn.Module | None) -> tuple | None:
        if quantizer is None:
            return None
        return tuple((type(leaf), getattr(leaf, "is_enabled", None), repr(getattr(leaf, "block_sizes", None)),
                      repr(getattr(leaf, "num_bits", None)), repr(getattr(leaf, "axis", None)),
                      tuple((k, tuple(b.shape), b.dtype) for k, b in leaf.named_buffers()))
                     for leaf in _weight_leaves(quantizer))

    s = q.shadow
    return q.fmt, tuple(weight.shape), weight.dtype, of(s.weight_quantizer), of(getattr(s, "input_quantizer", None))


def _quantizer_signature(quantizers: list[nn.Module]) -> tuple:
    """The quantizers' properties (but ``_input_dtype``, the dtype a quantizer last saw while disabled, which
    ModelOpt's export never reads), their buffers' shapes, and which buffers are all zero (an uncalibrated amax,
    replaced by the weight's)."""
    signature = []
    for q in quantizers:
        for leaf in _weight_leaves(q):
            props = leaf.get_modelopt_state(properties_only=True) if hasattr(leaf, "get_modelopt_state") else {}
            props = {k: v for k, v in props.items() if k != "_input_dtype"}
            buffers = tuple((k, tuple(b.shape), b.dtype, not bool(b.any())) for k, b in leaf.named_buffers())
            signature.append((type(leaf).__name__, repr(sorted(props.items())), buffers))
    return tuple(signature)


def _warn_uncalibrated(x: _Experts) -> None:
    """ModelOpt's warning about expert weight quantizers without amax (it then takes the weight's), with the
    experts' true indices: ModelOpt's own, raised while packing a one-expert copy, all say 'Expert 0'."""
    missing = {}
    for p in x.parts:
        for e, q in enumerate(getattr(x.pristine, f"{p}_weight_quantizers")):
            amax = getattr(q, "_amax", None)
            if getattr(q, "is_enabled", False) and (amax is None or not bool(amax.any())):
                missing.setdefault(p, []).append(e)
    if missing:
        found = "; ".join(f"{p}: experts {ids}" for p, ids in missing.items())
        warnings.warn(f"{x.name}: weight quantizers not calibrated (amax missing or zero) -- {found}. ModelOpt's export "
                      f"(replayed here) uses the weights' amax as fallback; its own warnings below number each expert "
                      f"'Expert 0' (one expert is packed at a time). Consider more calibration data to activate all "
                      f"experts.", stacklevel=2)


def _per_tensor_scale(fmt: str, q: nn.Module, device: torch.device) -> torch.Tensor:
    """A weight's per-tensor scale (:data:`_PER_TENSOR`) as ModelOpt's export computes it, on ``device`` (where it
    computes it: a CUDA division by a Python scalar multiplies by its reciprocal)."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    if fmt == "fp8":  # _export_quantized_weight: torch.tensor(amax / maxbound) of a 0-d float32 amax
        return q._amax.to(device=device, dtype=torch.float32) / q.maxbound
    return NVFP4QTensor.get_weights_scaling_factor_2_from_quantizer(_read_only_on(q, device)).squeeze()


def _per_tensor_scales(fmt: str, quantizers: list[nn.Module], device: torch.device, ones: list[int]) -> torch.Tensor:
    """:func:`_per_tensor_scale` of each of ``quantizers`` (alike but for their amax), 1 at the indices ``ones``: one
    call of ModelOpt's function on their amax stacked (elementwise, so each is what it computes for that quantizer)."""
    scales = torch.ones(len(quantizers), dtype=torch.float32, device=device)
    together = [i for i in range(len(quantizers)) if i not in ones]
    if together:
        stacked = _stacked([quantizers[i] for i in together])
        scales[together] = _per_tensor_scale(fmt, stacked, device).reshape(len(together))
    return scales


def _stacked(quantizers: list[nn.Module]) -> nn.Module:
    """A shallow copy of the first of ``quantizers`` (alike but for their one-element amax) holding their amaxes
    stacked, for ModelOpt's functions that are elementwise in the amax."""
    stacked = copy.copy(quantizers[0])
    stacked._buffers = {**stacked._buffers,
                        "_amax": torch.stack([q._amax.detach().reshape(()).cpu() for q in quantizers])}
    return stacked


def _read_only_on(quantizer: nn.Module, device: torch.device) -> nn.Module:
    """A shallow copy of ``quantizer`` with its buffers on ``device``, for ModelOpt's functions that only read it:
    its other attributes are the original's."""
    light = copy.copy(quantizer)
    light._buffers = {k: None if b is None else b.to(device) for k, b in quantizer._buffers.items()}
    return light


def _direct_quantizers(q: _Quantized) -> tuple | None:
    """What a quantized module's outputs depend on besides its weight and its per-tensor amaxes, when
    :meth:`ModelOptPacker._pack_direct` may compute them: a linear that ModelOpt's export hands to its plain-linear
    handler, NVFP4 (dynamic blocks) with a calibrated per-tensor weight amax or FP8 with a calibrated 0-d one, an
    input amax of one element if any, no ``pre_quant_scale``, no step that rewrites the weight, and no quantizer
    state that survives the export (KV scales kept on a linear's output quantizer). None otherwise."""
    from modelopt.torch.export.hf_export_handlers import _export_quant_linear
    from modelopt.torch.export.registry import ExportModuleRegistry
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    s = q.shadow
    if q.fmt not in _PER_TENSOR or any(step.needs_weight for step in q.steps):
        return None
    wq, iq = s.weight_quantizer, getattr(s, "input_quantizer", None)
    if not isinstance(wq, TensorQuantizer) or isinstance(wq, SequentialQuantizer) or not wq.is_enabled:
        return None
    amax = getattr(wq, "_amax", None)
    if amax is None or amax.numel() != 1 or not bool(amax.any()):
        return None
    if (q.fmt == "nvfp4" and NVFP4QTensor._is_static_quantizer(wq)) or \
            (q.fmt == "fp8" and (amax.dim() or wq.block_sizes)):
        return None
    if not isinstance(iq, TensorQuantizer) or isinstance(iq, SequentialQuantizer) or \
            getattr(iq, "_pre_quant_scale", None) is not None or hasattr(iq, "_amax_shape_for_export") or \
            (hasattr(iq, "_amax") and (not iq.is_enabled or iq._amax.numel() != 1)):
        return None
    if ExportModuleRegistry.match(s) is not _export_quant_linear or hasattr(s, "weight_packed") or \
            "QuantFP8Linear" in type(s).__name__:
        return None
    if any(_postprocessed(f"{q.name}.{attr}", child) for attr, child in s.named_children()):
        return None
    return type(s), q.fmt, _quantizer_signature([c for c in s.children() if isinstance(c, TensorQuantizer)])


def _postprocessed(name: str, quantizer: nn.Module) -> bool:
    """Whether any of a quantizer's state survives ModelOpt's postprocessing of the state dict."""
    from modelopt.torch.export.quant_utils import _postprocess_single_tensor

    return any(_postprocess_single_tensor(f"{name}.{k}", v, _KV_MAX_BOUND, None)[0] is not None
               for k, v in quantizer.state_dict().items())


def _direct_scalars(members: list[_Quantized], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The per-tensor outputs ``_export_quantized_weight`` registers for each of ``members`` (modules of one
    :func:`_direct_quantizers`: alike but for their amaxes), the weight's per-tensor scale and ``input_scale``,
    computed as it computes them, on ``device``: by one call of ModelOpt's functions on the amaxes stacked
    (elementwise, so each is what it computes for that module alone)."""
    fmt = members[0].fmt
    out = [{_PER_TENSOR[fmt]: scale} for scale in _per_tensor_scales(fmt, [m.shadow.weight_quantizer for m in members],
                                                                     device, [])]
    scales = _input_scales(fmt, [m.shadow.input_quantizer for m in members], device)
    if scales is not None:
        for scalars, scale in zip(out, scales):
            scalars["input_scale"] = scale
    return out


def _input_scales(fmt: str, inputs: list[nn.Module], device: torch.device) -> torch.Tensor | None:
    """The ``input_scale`` ``_export_quantized_weight`` registers for each of the input quantizers ``inputs`` (alike
    but for their one-element amax), on ``device``: one call of ModelOpt's function on their amaxes stacked; None
    when it registers none (FP8 without an input amax, NVFP4 with the input quantizer off)."""
    from modelopt.torch.export.quant_utils import get_scaling_factor
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    iq = inputs[0]
    if fmt == "fp8":
        if not hasattr(iq, "_amax"):
            return None
        iq = _read_only_on(_stacked(inputs), device)
        iq._buffers["_amax"] = iq._amax.to(torch.float32)  # as the export sets it first
        return get_scaling_factor(iq).reshape(len(inputs))
    if "disabled" in repr(iq) or iq.amax is None:
        return None
    return NVFP4QTensor.get_activation_scaling_factor(_read_only_on(_stacked(inputs), device)).reshape(len(inputs))


def _expert_input_scales(x: _Experts, device: torch.device) -> dict[str, torch.Tensor]:
    """The ``<projection>.input_scale`` outputs of every expert of ``x`` (one input quantizer per 3-D weight, shared by
    all experts and by the projections ModelOpt splits it into), on ``device``."""
    out = {}
    for part, projections in x.parts.items():
        scales = _input_scales(x.fmt, [getattr(x.pristine, f"{part}_input_quantizer")], device)
        if scales is not None:
            out.update({f"{proj}.input_scale": scales[0] for proj in projections})
    return out


def _pack_weight(fmt: str, weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                 block: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``weight`` packed as ``_export_quantized_weight`` packs it with its per-tensor ``scale`` (FP8: one 0-d
    ``weight_scale``, by ModelOpt's function; NVFP4: ``weight_scale_2``, broadcast over a stack of experts, by
    :func:`._nvfp4.pack`), and the tensors made on the way (NVFP4's per-block ``weight_scale``)."""
    from modelopt.torch.export import quant_utils

    if fmt == "fp8":
        return quant_utils.to_quantized_weight(weight.to(dtype), scale, "fp8"), {}
    packed, per_block = nvfp4_pack(weight, block, scale, dtype)
    return packed, {"weight_scale": per_block}


def _stand_in(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One expert's worth of a 3-D weight that is not packed in this pass: zeros without memory."""
    return torch.zeros((), dtype=dtype, device=device).expand(1, *shape[1:])


def _hub_name_rules(model: nn.Module, hf_quant_config: dict) -> tuple[list, list]:
    """ModelOpt's split and rename rules back to the hub checkpoint's names (``export_hf_checkpoint``'s
    ``revert_weight_conversion_quant_aware``), with ``hf_quant_config``'s module names renamed in place as
    it does; none when ModelOpt cannot build them (its export then keeps the in-memory names)."""
    from modelopt.torch.export.quant_aware_conversion import (
        QuantConversionUnsupportedError,
        _build_reverse_rules,
        build_reverse_name_mapper,
        revert_quant_config_names,
    )

    try:
        splits, renames, _ = _build_reverse_rules(model)
        mapper = build_reverse_name_mapper(model)
    except QuantConversionUnsupportedError:
        return [], []
    revert_quant_config_names(hf_quant_config.get("quantization", {}), mapper)
    return splits, renames


def _weight_leaves(wq: nn.Module) -> list[nn.Module]:
    return list(wq) if isinstance(wq, (nn.ModuleList, nn.Sequential)) else [wq]


def _row_step(q: _Quantized, weight: torch.Tensor, *, group_max_follows: bool = False) -> int | None:
    """Rows per chunk for a large 2-D weight whose quantizer state splits by rows; None to pack it whole.

    A weight the resmoothing rewrites has its weight quantizer re-calibrated (max) on the rewritten weight:
    per-row / per-block amax come out the same chunk by chunk, a per-tensor one only if the group's max is
    set over it afterwards (a ``weight_amax`` step); otherwise the weight is packed whole.
    """
    if q.fmt not in _ROW_FORMATS or weight.dim() != 2:
        return None
    last_rewrite = max((i for i, s in enumerate(q.steps) if s.needs_weight), default=-1)
    per_tensor = any(b is not None and b.numel() == 1 for leaf in _weight_leaves(q.pristine.weight_quantizer)
                     for b in leaf._buffers.values())
    replaced = group_max_follows or any(s.kind == "weight_amax" for s in q.steps[last_rewrite:])
    if last_rewrite >= 0 and per_tensor and not replaced:
        return None
    rows, cols = weight.shape
    chunk_bytes = _ROW_CHUNK_BYTES.get(weight.device.type, _DEVICE_ROW_CHUNK_BYTES)
    if weight.numel() * weight.element_size() <= chunk_bytes or rows < 4:
        return None
    for leaf in _weight_leaves(q.pristine.weight_quantizer):
        reshape = getattr(leaf, "_block_reshape_size", None)
        if reshape is not None and (len(reshape) != 2 or reshape[0] != -1):  # blocks across rows
            return None
        for buf in leaf._buffers.values():
            if buf is not None and buf.numel() > 1 and (buf.dim() == 0 or buf.shape[0] % rows):
                return None
    return max(2, chunk_bytes // (cols * weight.element_size()) // 2 * 2)


def _slice_rows(wq: nn.Module, r0: int, r1: int, rows: int) -> None:
    """Keep rows ``r0:r1`` of every per-row / per-block buffer of a (copied) weight quantizer."""
    for leaf in _weight_leaves(wq):
        for name, buf in list(leaf._buffers.items()):
            if buf is not None and buf.numel() > 1:
                k = buf.shape[0] // rows
                leaf._buffers[name] = buf[r0 * k:r1 * k].clone()
        shape = getattr(leaf, "_amax_shape_for_export", None)  # (rows, blocks per row) for block quantizers
        if shape is not None and len(shape) and shape[0] == rows:
            leaf._amax_shape_for_export = (r1 - r0, *shape[1:])
        shape = getattr(leaf, "_original_shape", None)  # the weight's shape, checked when re-calibrating
        if shape is not None and len(shape) and shape[0] == rows:
            leaf._original_shape = torch.Size((r1 - r0, *shape[1:]))


def _per_row(name: str, t: torch.Tensor) -> bool:
    """Outputs made of the chunk's rows (stitched), as opposed to per-tensor values (taken once)."""
    return t.dim() >= 1 and name.rpartition(".")[2] in ("weight", "weight_scale", "bias")


@register_format
class ModelOpt(Format):
    """``format="modelopt"``: what ModelOpt's ``export_hf_checkpoint`` writes for the model kept resident.

    Packed weights and their scales under ModelOpt's names, ``hf_quant_config.json``, and ModelOpt's
    ``quantization_config`` in config.json; built with ModelOpt's own functions on copies of one module at
    a time, after replaying its resmoothing of modules that share an input. The model is never changed.

    Raises:
        ValueError: no ModelOpt quantizers, an enabled quantizer of another toolkit (or a user's registered one),
            a MoE kind ModelOpt cannot export (fused experts under AWQ) or this
            export does not pack (experts other than ModelOpt's ``_QuantFusedExperts``), or a format/weight
            shape ModelOpt cannot pack (raised when the export is planned, before anything is written); linears
            that read one input but are quantized differently (raised by the first quantized module's pack: the
            export then fails, its partial files removed).
    """

    name = "modelopt"

    def __init__(self, source: Source):
        require_toolkit(self.name)
        super().__init__(source)
        other = next((q for q in source.quantizers if q.adapter.name != "modelopt" and q.enabled), None)
        if other is not None and any(q.adapter.name == "modelopt" for q in source.quantizers):  # ModelOpt's export knows its own quantizers only: it would write the raw weight
            raise ValueError(f"format='modelopt': {other.owner_name or '<root>'} is quantized by {other.adapter.name} "
                             f"({other.name}), not by NVIDIA ModelOpt; ModelOpt's checkpoint cannot express it and "
                             f"would hold the unquantized weight. Quantize it with ModelOpt, remove or disable that "
                             f"quantizer, or use format='fake-quant'")
        self.packer = ModelOptPacker(source.model, quantizers=source.quantizers, read=self._read, refs=source.lay.refs,
                                     dtype=source.dtype)
        tied = {i.tied_to for i in source.lay.values() if i.kind == "tied"}
        for name in self.packer.modules:
            key = f"{name}.weight" if name else "weight"
            if key in tied or source.lay[key].kind == "tied":
                raise ValueError(f"format='modelopt': {key} is quantized and tied to another weight; ModelOpt's export "
                                 f"leaves such a weight unpacked. Disable its weight quantizer, untie it, or use "
                                 f"format='fake-quant'")

    def _device(self, key: str) -> torch.device:
        dev = self.source.lay[key].device
        return torch.device("cpu") if dev is None or torch.device(dev).type == "meta" else torch.device(dev)

    def _read(self, key: str) -> torch.Tensor:
        info = self.source.lay[key]
        t = info.tensor.detach() if info.kind == "resident" else read_store(info.ref.store, info.dtype, info.shape)
        return t.to(self._device(key))

    def _module(self, keys) -> str:
        return self.source.lay[next(iter(keys))].module

    def outputs(self, meta: StateDict) -> StateDict:
        module = self._module(meta)
        if module not in self.packer.experts:
            return self.packer.outputs(module, tuple(meta), meta)
        # packed from the weights' own dtype, never a cast; the templates on the experts' execution device
        meta = {k: torch.empty(self.source.lay[k].shape, dtype=self.source.lay[k].dtype, device="meta") for k in meta}
        return self.packer.outputs(module, tuple(meta), meta, self._device(next(iter(meta))))

    def _packs(self, module: str) -> bool:
        """Whether ModelOpt's functions make ``module``'s outputs (a quantized module, fused experts, a layernorm
        that takes a ``pre_quant_scale``); the other units are their sources, cast. (``norms`` is complete once the
        packer is built: a layernorm takes a ``pre_quant_scale`` only where some module has one, and then the
        shared-input groups are fused up front.)"""
        return module in self.packer.modules or module in self.packer.experts or module in self.packer.norms

    def _pack_device(self, reader, unit) -> torch.device:
        """Where a unit that :meth:`_packs` is packed: ``device=``, else its weight quantizer's fold device, else
        where its first source computes."""
        weight = f"{unit.module}.weight" if unit.module else "weight"
        if reader.device is not None:
            return reader.device
        if weight in self.source.folds:
            return reader.fold_device(weight)
        return self._device(unit.sources[0])

    def devices(self, reader, unit) -> dict:
        if not self._packs(unit.module):
            return {}
        device = self._pack_device(reader, unit)
        return {k: device for k in unit.sources}

    def unchanged(self, unit, key: str) -> bool:
        return not (unit.converted or self._packs(unit.module) or self.casts(key))

    def finish(self, reader, unit, values: StateDict) -> StateDict:
        module, dtype = unit.module, self.source.dtype
        device = None  # a unit ModelOpt does not pack is cast where its sources are: no round trip through a GPU
        if self._packs(module):
            device = self._pack_device(reader, unit)
            values = {k: to_device(values.pop(k), device) for k in list(values)}  # the only reference
        if dtype is not None and module not in self.packer.modules and module not in self.packer.experts:
            values = {k: cast(v, dtype) for k, v in values.items()}
        try:
            out = self.packer.pack(module, values, device, owner=self.source.model.get_submodule(module))
        except Exception as e:
            add_note(e, f"offload_export: packing {module} for format='modelopt' on {device} failed")
            raise
        return {spec.name: _checked(spec, out, module) for spec in unit.outputs}

    def config_updates(self) -> dict:
        return {"quantization_config": self.packer.config_quantization(), **self.packer.sanitized_config()}

    def write_files(self, tmp: Path) -> list[str]:
        if self.packer.hf_quant_config["quantization"].get("quant_algo") is None and \
                self.packer.hf_quant_config["quantization"].get("kv_cache_quant_algo") is None:
            return []
        (tmp / HF_QUANT_CONFIG_NAME).write_text(self.packer.hf_quant_config_text())
        return [HF_QUANT_CONFIG_NAME]


def _checked(spec, out: StateDict, module: str) -> torch.Tensor:
    t = out.get(spec.name)
    if t is None or t.dtype != spec.dtype or tuple(t.shape) != tuple(spec.shape):
        got = "nothing" if t is None else f"{t.dtype} {tuple(t.shape)}"
        raise RuntimeError(f"format='modelopt': packing {module} gave {got} for {spec.name}, planned {spec.dtype} "
                           f"{tuple(spec.shape)} (outputs: {sorted(out)}); please report this with the model's "
                           f"quantization config")
    return t


def _input_device(model: nn.Module) -> torch.device:
    """Where ModelOpt's dummy forward would put its input: the embedding's execution device, else the model's."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(emb, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]):
        if getattr(h, "execution_device", None) is not None:
            return torch.device(h.execution_device)
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")
