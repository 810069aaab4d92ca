"""Replay of what ModelOpt's ``export_hf_checkpoint`` does to each module, on copies.

ModelOpt's resident export edits the model in place: ``requantize_resmooth_fused_llm_layers`` (shared
``pre_quant_scale`` for modules that read one input, max of their ``amax``, ``pre_quant_scale`` folded
into the preceding layernorm for AWQ), then ``_export_quantized_weight`` per module, then
``postprocess_state_dict``. Here the model-level part runs once on *shadows* -- copies of each quantized
module holding its quantizer state (small) and a meta weight -- and records, per module, the steps its
weight goes through. The per-module part then runs on a fresh copy of one module at a time, holding
that module's real weight, with ModelOpt's own functions. The model is never touched.

Only ModelOpt's public-ish export helpers are called; numerics are never re-derived here.
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Step", "clone_module", "meta_like", "shared_input_groups"]

# instance attributes that accelerate's add_hook_to_module puts on a module
_HOOK_ATTRS = frozenset({"_hf_hook", "_old_forward", "forward"})
_TENSOR_DICTS = ("_parameters", "_buffers", "_modules")


def clone_module(module: nn.Module, tensors: dict[str, torch.Tensor] | None = None,
                 device: torch.device | None = None, children: dict[str, nn.Module] | None = None,
                 memo: dict[int, object] | None = None, read_only: bool = False) -> nn.Module:
    """An independent copy of ``module`` (same class), without accelerate hooks or torch hooks.

    Direct parameters/buffers come from ``tensors`` (by attribute name) when given there, else are
    cloned (meta stays meta). Children are cloned recursively, except those given in ``children`` (by
    attribute name), which are taken as they are (the caller's own copies). Python attributes are
    deep-copied, so ModelOpt's in-place setters (``amax``, ``pre_quant_scale``, the calibrator's
    ``reset``) only ever reach the copy. ``memo``: a :func:`copy.deepcopy` memo (``id`` of an original ->
    its copy) shared by several calls: the copies it holds are taken (tensors already on ``device`` among
    them), the ones made are added.

    ``read_only``: the Python attributes (calibrators, ModelOpt's attribute manager) are the original's, not
    deep copies: a snapshot that is only read, and cloned again before any edit, made in a fraction of the time
    (deep-copying them is most of a copy's cost). An attribute's object holding tensors that ``memo`` has copies
    of (a calibrator's running amax) is a shallow copy holding those.
    """
    tensors, children = tensors or {}, children or {}
    new = object.__new__(type(module))
    state = {}
    for key, value in module.__dict__.items():
        if key in _HOOK_ATTRS or key in _TENSOR_DICTS:
            continue
        if "hooks" in key and isinstance(value, dict):
            state[key] = type(value)()
        elif isinstance(value, (nn.Module, torch.Tensor)):
            state[key] = value  # a reference held outside the module tree (e.g. a parent); never edited
        elif read_only:
            state[key] = _holding_copies(value, memo or {})
        else:
            state[key] = copy.deepcopy(value, memo)
    state["_parameters"] = OrderedDict()
    for name, p in module._parameters.items():
        value = tensors[name] if name in tensors else _copy_tensor(p, device, memo)
        state["_parameters"][name] = None if value is None else nn.Parameter(value, requires_grad=False)
    state["_buffers"] = OrderedDict(
        (name, tensors[name] if name in tensors else _copy_tensor(b, device, memo))
        for name, b in module._buffers.items())
    state["_modules"] = OrderedDict(
        (name, children[name] if name in children else
         None if child is None else clone_module(child, device=device, memo=memo, read_only=read_only))
        for name, child in module._modules.items())
    new.__dict__.update(state)  # not through setattr: ModelOpt's modules make each one cost tens of microseconds
    return new


def _holding_copies(value: object, memo: dict[int, object]) -> object:
    """``value``, or a shallow copy of it holding ``memo``'s copies of the tensors in its attributes."""
    held = getattr(value, "__dict__", None)
    if not held or not any(id(t) in memo for t in held.values() if isinstance(t, torch.Tensor)):
        return value
    light = copy.copy(value)
    light.__dict__.update({k: memo[id(t)] for k, t in held.items() if isinstance(t, torch.Tensor) and id(t) in memo})
    return light


def meta_like(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``t``'s shape, strides and dtype. ``torch.empty_like(t, device="meta")`` makes the same through
    torch's Python reference code when ``t`` is meta (an offloaded weight): tens of microseconds a call, for every
    quantized module at the export's start."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _copy_tensor(t: torch.Tensor | None, device: torch.device | None,
                 memo: dict[int, object] | None = None) -> torch.Tensor | None:
    if t is None:
        return None
    copied = memo.get(id(t)) if memo is not None else None
    if isinstance(copied, torch.Tensor) and copied.device == (t.device if device is None else torch.device(device)):
        return copied
    t = t.detach()
    if t.is_meta:
        return meta_like(t)
    return t.to(device, copy=True) if device is not None else t.clone()


@dataclass
class Step:
    """One thing ``requantize_resmooth_fused_llm_layers`` does to a module, replayed in order.

    kind:
        ``"fuse_rows"``: ``weight *= value[:, None]`` and its weight quantizer recalibrated
        (``fuse_prequant_to_linear``, NVFP4-AWQ); ``"update_pqs"``: ``_update_pre_quant_scale(m, value)``
        (weight resmoothed to the group's mean ``pre_quant_scale``, weight quantizer recalibrated);
        ``"input_amax"`` / ``"weight_amax"``: the group's max set into the quantizer;
        ``"drop_pqs"``: ``pre_quant_scale`` deleted (folded elsewhere), ``fused_with_prequant`` set.
    """

    kind: str
    value: torch.Tensor | None = None
    needs_weight: bool = field(init=False)

    def __post_init__(self):
        self.needs_weight = self.kind in ("fuse_rows", "update_pqs")

    def apply(self, m: nn.Module) -> None:
        from modelopt.torch.export.quant_utils import _update_pre_quant_scale
        from modelopt.torch.quantization.nn import NVFP4StaticQuantizer, SequentialQuantizer

        if self.kind == "fuse_rows":
            # the statements of modelopt.torch.export.quant_utils.fuse_prequant_to_linear
            pqs = self.value.to(_device_of(m))
            if m.weight is not None and not m.weight.is_meta:
                m.weight = nn.Parameter(m.weight * pqs.view(-1, 1))
                if getattr(m, "bias", None) is not None:
                    m.bias = nn.Parameter(m.bias * pqs)
                recalibrate(m)
        elif self.kind == "update_pqs":
            if m.weight is not None and not m.weight.is_meta:
                _update_pre_quant_scale(m, self.value.to(_device_of(m)))
            else:  # a shadow: only the quantizer's side of _update_pre_quant_scale
                m.input_quantizer.pre_quant_scale = self.value
        elif self.kind == "input_amax":
            m.input_quantizer.amax = self.value.to(_device_of(m))
        elif self.kind == "weight_amax":
            wq = m.weight_quantizer
            value = self.value.to(_device_of(m))
            if isinstance(wq, SequentialQuantizer):
                wq[-1].amax = value
            elif isinstance(wq, NVFP4StaticQuantizer):
                wq.global_amax = value
            else:
                wq.amax = value
        elif self.kind == "drop_pqs":
            if hasattr(m.input_quantizer, "_pre_quant_scale"):
                delattr(m.input_quantizer, "_pre_quant_scale")
            m.fused_with_prequant = True
        else:
            raise AssertionError(self.kind)


def recalibrate(m: nn.Module) -> None:
    """ModelOpt's "Redo weights collection": reset the weight quantizer's amax and calibrate it on the weight."""
    from modelopt.torch.quantization.model_calib import enable_stats_collection, finish_stats_collection

    m.weight_quantizer.reset_amax()
    enable_stats_collection(m.weight_quantizer)
    m.weight_quantizer(m.weight)
    finish_stats_collection(m.weight_quantizer)


def _device_of(m: nn.Module) -> torch.device:
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and not w.is_meta:
        return w.device
    for b in m.buffers():
        if not b.is_meta:
            return b.device
    return torch.device("cpu")


def group_weight_amax(m: nn.Module) -> torch.Tensor | None:
    """The weight amax ``preprocess_linear_fusion`` takes the group max of, or None when it takes none."""
    from modelopt.torch.quantization.nn import NVFP4StaticQuantizer, SequentialQuantizer

    wq = m.weight_quantizer
    if isinstance(wq, SequentialQuantizer):
        return wq[-1].amax if wq[-1].is_enabled else None
    if isinstance(wq, NVFP4StaticQuantizer):
        return wq.global_amax
    if wq.is_enabled and wq.amax is not None and wq.amax.numel() == 1:
        return wq.amax
    return None


def shared_input_groups(model: nn.Module, device: torch.device, *, fake: bool = True
                        ) -> tuple[list[list[str]], dict[int, str]]:
    """Which quantized linears read the same input tensor, and the layernorm that produced it.

    ModelOpt's ``collect_shared_input_modules``, without its side effects: forward hooks on quantized
    linears (any quantizer enabled) and layernorms, one forward of ``ones(1, 2)`` with every quantizer
    off, no cache. The forward runs on a twin of the model on the CPU (:func:`_twin`: its modules copied
    without hooks, tensors of undefined values, linears and fused experts standing in by the shape of their
    output), so that no weight is read: which tensor object each module receives does not depend on the
    weights' values, and an op whose result shape or Python value would depend on them raises
    (:class:`_UndefinedValues`) rather than taking a branch. Values made of the input alone are real, so the
    twin takes the branches on them the model's forward takes. Where the twin's forward fails, or with
    ``fake=False``, it runs on the model itself, its input on ``device``, as ModelOpt's does.

    Returns:
        The groups in first-call order (module names in call order) and, for each group index, the name
        of the layernorm whose output the group reads (when there is one).
    """
    roles = _hooked_roles(model)
    if not fake:
        return _traced_groups(model, roles, device)
    try:
        twin = _twin(model)
        with _UndefinedValues([*twin.parameters(), *twin.buffers()]):
            return _traced_groups(twin, roles, torch.device("cpu"))
    except Exception:  # a forward that depends on the weights' values, or fails on the CPU: trace the model itself
        return _traced_groups(model, roles, device)


def _hooked_roles(model: nn.Module) -> dict[str, str]:
    """The modules ModelOpt's ``collect_shared_input_modules`` hooks: ``"norm"`` (layernorms) or ``"linear"``."""
    from modelopt.torch.export.layer_utils import is_layernorm, is_quantlinear
    from modelopt.torch.export.unified_export_hf import _is_enabled_quantizer

    roles = {}
    for name, module in model.named_modules():
        if is_layernorm(module):
            roles[name] = "norm"
        elif is_quantlinear(module) and (_is_enabled_quantizer(module.input_quantizer)
                                         or _is_enabled_quantizer(module.weight_quantizer)):
            roles[name] = "linear"
    return roles


def _twin(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree for a forward that reads no weight: same classes, every parameter and buffer a
    new CPU tensor of undefined values (allocated, never filled: untouched pages cost no memory), no accelerate or
    torch hooks; other attributes shared with the module (shallow). Fused experts (``_QuantFusedExperts``) return
    an empty tensor like their input instead of routing, linears (quantized or not) an empty tensor of their
    output's shape and their input's dtype, what their forward returns with every quantizer off (which tensor a
    linear reads is all the trace needs of it); neither has children in the twin nor tensors but meta ones."""
    from modelopt.torch.export.hf_export_handlers import _has_fused_experts_quantizers
    from modelopt.torch.export.layer_utils import is_quantlinear

    stand_in = None
    if _has_fused_experts_quantizers(module):
        # its routing loop depends on values; it holds no quantized linear, and its output is a new tensor either way
        stand_in = _fused_experts_stand_in
    elif is_quantlinear(module) or type(module) is nn.Linear:
        stand_in = functools.partial(_linear_stand_in, module.weight.shape[0])
    device = "meta" if stand_in is not None else "cpu"
    new = object.__new__(type(module))
    new.__dict__.update({k: type(v)() if "hooks" in k and isinstance(v, dict) else v
                         for k, v in module.__dict__.items() if k not in _HOOK_ATTRS and k not in _TENSOR_DICTS})
    new._parameters = OrderedDict((k, None if p is None else nn.Parameter(
        torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=False)) for k, p in module._parameters.items())
    new._buffers = OrderedDict((k, None if b is None else torch.empty(b.shape, dtype=b.dtype, device=device))
                               for k, b in module._buffers.items())
    if stand_in is None:
        new._modules = OrderedDict((k, None if c is None else _twin(c)) for k, c in module._modules.items())
    else:
        new._modules = OrderedDict()
        new.forward = stand_in
    return new


def _fused_experts_stand_in(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return torch.empty_like(hidden_states)


def _linear_stand_in(out_features: int, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


class _ValueDependent(RuntimeError):
    """An op of the twin's forward whose result shape or Python value depends on undefined values."""


# ops whose results are allocated, never filled
_UNFILLED = frozenset({torch.ops.aten.empty.memory_format, torch.ops.aten.empty_like.default,
                       torch.ops.aten.new_empty.default, torch.ops.aten.empty_strided.default,
                       torch.ops.aten.new_empty_strided.default})


_SHAPE_FROM_INDICES = frozenset({torch.ops.aten.index.Tensor})


class _UndefinedValues(TorchDispatchMode):
    """Tracks which tensors hold undefined values (the given ones, what unfilled allocations return, every result
    of an op that reads one: views, in-place results and their bases included) and raises
    :class:`_ValueDependent` for an op tagged data-dependent (``.item()``, ``bool()``, ``torch.equal``) or of
    data-dependent output shape (``nonzero``, ``unique``) that reads one. Values made of defined ones only are
    computed for real. Only dispatched ops are seen: code reading a CPU tensor's memory itself (``.numpy()``,
    ``.tolist()``) is not."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self._undefined: dict[int, weakref.ref] = {}
        for t in tensors:
            self._mark(t)

    def _mark(self, t: torch.Tensor) -> None:
        self._undefined[id(t)] = weakref.ref(t)
        if t._base is not None:  # written through a view: its base holds undefined values too
            self._undefined[id(t._base)] = weakref.ref(t._base)

    def _is_undefined(self, t: object) -> bool:
        ref = self._undefined.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        undefined = any(self._is_undefined(t) for t in _tensors((args, kwargs)))
        if undefined and (torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags):
            # indexing: the result's shape depends on the indices' values only (the tensor indexed may be undefined)
            shaping = _tensors((args[1:], kwargs)) if func in _SHAPE_FROM_INDICES else ()
            if func not in _SHAPE_FROM_INDICES or any(self._is_undefined(t) for t in shaping):
                raise _ValueDependent(f"{func} reads values the twin does not have")
        out = func(*args, **kwargs)
        if undefined or func in _UNFILLED:
            for t in _tensors(out):
                self._mark(t)
        return out


def _tensors(value: object, found: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The tensors in an op's arguments or results (nested tuples, lists and dicts: all an aten op takes or gives), in
    order; ``pytree.tree_leaves`` finds the same at several times the cost, and the twin's forward makes thousands
    of calls."""
    found = [] if found is None else found
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _tensors(v, found)
    elif isinstance(value, dict):
        for v in value.values():
            _tensors(v, found)
    return found


def _traced_groups(model: nn.Module, roles: dict[str, str], device: torch.device):
    from modelopt.torch.utils.dataset_utils import _disable_use_cache

    from ..quantizers import quantizers_disabled

    inputs: dict[int, tuple[torch.Tensor, list[str]]] = {}
    outputs: dict[int, tuple[torch.Tensor, str]] = {}
    handles = []

    def on_linear(name):
        def hook(module, args, output):
            if args and isinstance(args[0], torch.Tensor):
                inputs.setdefault(id(args[0]), (args[0], []))[1].append(name)
        return hook

    def on_norm(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                outputs[id(output)] = (output, name)
        return hook

    for name, module in model.named_modules():
        role = roles.get(name)
        if role is not None:
            handles.append(module.register_forward_hook(on_norm(name) if role == "norm" else on_linear(name)))
    # a disabled ModelOpt quantizer records the dtype it sees (its _input_dtype, part of its saved state)
    seen_dtypes = [(m, m.__dict__["_input_dtype"]) for m in model.modules() if "_input_dtype" in m.__dict__]
    try:
        with torch.no_grad(), quantizers_disabled(model, "all"), _disable_use_cache(model):
            model(torch.ones([1, 2], dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
        for m, dtype in seen_dtypes:
            m.__dict__["_input_dtype"] = dtype
    groups, norms = [], {}
    for key, (_, names) in inputs.items():
        if key in outputs:
            norms[len(groups)] = outputs[key][1]
        groups.append(names)
    return groups, norms
