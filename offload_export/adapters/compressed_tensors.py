"""The compressed-tensors (llm-compressor) adapter: quantization schemes attached to modules, no quantizer modules.

compressed-tensors' ``apply_quantization_config`` sets ``quantization_scheme`` (weights / input_activations /
output_activations :class:`QuantizationArgs`) and ``quantization_status`` on each quantized ``Linear`` /
``Embedding`` / attention module, registers ``weight_scale``, ``weight_zero_point``, ``input_scale``, ...
as its parameters and wraps its forward (``set_forward_quantized``). That forward reads the scheme on
every call, so one role is switched off by swapping ``quantization_scheme`` for a copy without that role,
and switched back by restoring the very object that was there. compressed-tensors is imported only inside
:meth:`CompressedTensorsAdapter.fold`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .._hooks import offloaded_tensors
from .._store import read_store
from ..quantizers import Quantizer, QuantizerAdapter, register_adapter

__all__ = ["CompressedTensorsAdapter"]

_FIELDS = {"weight": "weights", "input": "input_activations", "output": "output_activations"}
# parameter prefixes of each role; attention modules quantize q/k/v through ``input_activations``
_PREFIXES = {"weight": ("weight",), "input": ("input", "q", "k", "v"), "output": ("output",)}
_SUFFIXES = ("_scale", "_zero_point", "_global_scale", "_g_idx")


def _status(owner: nn.Module) -> str | None:
    status = getattr(owner, "quantization_status", None)
    return getattr(status, "value", status)


def _is_scheme(value: Any) -> bool:
    return all(hasattr(value, f) for f in _FIELDS.values()) and hasattr(value, "model_copy")


class CompressedTensorsAdapter(QuantizerAdapter):
    """compressed-tensors quantization schemes, one :class:`Quantizer` per (module, role) of a scheme.

    The quantizer's ``handle`` is the owning module. Disabling a role replaces ``quantization_scheme`` by
    a copy with that role set to ``None`` (the forward then skips it, other roles untouched); restoring puts
    the original object back. The fold is compressed-tensors' own ``forward_quantize`` of the weight with
    the module's ``weight_scale`` / ``weight_zero_point`` / ``weight_global_scale``, cast to the weight dtype:
    exactly what its forward uses as the weight.
    """

    name = "compressed-tensors"

    def __init__(self) -> None:
        # owner -> the scheme it had before the first disable, so disabled roles are still found
        self._original: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()

    def _scheme(self, owner: nn.Module) -> Any:
        return self._original.get(owner, getattr(owner, "quantization_scheme", None))

    def find(self, model: nn.Module) -> Iterator[Quantizer]:
        for owner_name, owner in model.named_modules():
            scheme = self._scheme(owner)
            if not _is_scheme(scheme):
                continue
            for role, fld in _FIELDS.items():
                if getattr(scheme, fld) is None:
                    continue
                target = _target(owner) if role == "weight" else None
                name = f"{owner_name}.{role}" if owner_name else role
                keys = tuple(f"{owner_name}.{a}" if owner_name else a for a in _state_attrs(owner, role))
                yield Quantizer(name, owner, owner_name, role, target, owner, self, keys)

    def is_enabled(self, q: Quantizer) -> bool:
        current = getattr(q.owner, "quantization_scheme", None)
        return (getattr(q.owner, "quantization_enabled", True) and _status(q.owner) is not None
                and current is not None and getattr(current, _FIELDS[q.role]) is not None
                and not (q.role == "weight" and _status(q.owner) == "decompressed"))

    def snapshot(self, q: Quantizer) -> Any:
        return q.owner.quantization_scheme

    def disable(self, q: Quantizer) -> None:
        current = q.owner.quantization_scheme
        if getattr(current, _FIELDS[q.role]) is None:
            return
        self._original.setdefault(q.owner, current)
        # model_copy skips validation: a scheme with no role left is fine for the forward
        q.owner.quantization_scheme = current.model_copy(update={_FIELDS[q.role]: None})

    def restore(self, q: Quantizer, snapshot: Any) -> None:
        q.owner.quantization_scheme = snapshot
        if self._original.get(q.owner) is snapshot:
            del self._original[q.owner]

    def fold(self, q: Quantizer, weight: torch.Tensor) -> torch.Tensor:
        """compressed-tensors' fake quantization of ``weight`` with the owner's weight qparams.

        Raises:
            RuntimeError: the module is compressed (its weight holds packed/quantized values) or was never
                calibrated (``quantization_status == "initialized"`` with static scales).
        """
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        args = q.owner.quantization_scheme.weights
        status = _status(q.owner)
        if status == "compressed":
            raise RuntimeError(
                f"{q.owner_name} is compressed (quantization_status='compressed'): its {q.target} holds "
                f"quantized/packed values, not a float weight to fold.\n  Decompress the model first "
                f"(compressed_tensors ModelCompressor.decompress_model) or export with fold=False")
        if status == "initialized" and args.dynamic is not True:
            raise RuntimeError(
                f"{q.owner_name}.weight_scale was never calibrated (quantization_status='initialized': "
                f"compressed-tensors allocates it with torch.empty).\n  Calibrate the scales and set "
                f"quantization_status to QuantizationStatus.FROZEN before exporting")
        scale = getattr(q.owner, "weight_scale", None)
        device = scale.device if scale is not None else weight.device
        with torch.no_grad():
            out = forward_quantize(q.owner, weight.to(device), "weight", args)
        return out.to(device=weight.device, dtype=weight.dtype)

    def fold_device(self, q: Quantizer) -> torch.device | None:
        scale = getattr(q.owner, "weight_scale", None)
        if isinstance(scale, torch.Tensor) and scale.device.type != "meta":
            return scale.device
        return None

    def state(self, q: Quantizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The role's qparams keyed without the role prefix (``scale``, ``zero_point``, ``k_scale`` ...).

        Offloaded (meta) qparams are read from their accelerate store when a hook on the owner holds it; one held
        by a hook above the owner (``place_submodules``) stays meta, for the caller to read through
        :func:`offload_export.layout`.
        """
        tensors = {}
        refs = None
        for attr in _state_attrs(q.owner, q.role):
            value = getattr(q.owner, attr)
            if value.device.type == "meta":
                refs = offloaded_tensors(q.owner) if refs is None else refs
                value = _read_offloaded(q, attr, value, refs)
            tensors[attr.removeprefix(f"{q.role}_")] = value.detach()
        scheme = self._scheme(q.owner)
        args = getattr(scheme, _FIELDS[q.role])
        config = {"adapter": self.name, "role": q.role, "enabled": self.is_enabled(q),
                  "quantization_status": _status(q.owner), "args": args.model_dump(mode="json"),
                  "scheme": scheme.model_dump(mode="json")}
        return tensors, config


def _target(owner: nn.Module) -> str | None:
    """The attribute holding the weight: ``weight``, or a compressed form (``weight_packed``) once compressed."""
    for attr in ("weight", "weight_packed"):
        if attr in owner._parameters:  # `in`, not getattr: an OffloadCache would onload the tensor
            return attr
    return None


def _state_attrs(owner: nn.Module, role: str) -> list[str]:
    """The owner's own parameters and buffers that hold qparams of ``role``, in registration order."""
    names = [*owner._parameters, *(b for b in owner._buffers if b not in owner._non_persistent_buffers_set)]
    return [n for n in names if any(n == p + s for p in _PREFIXES[role] for s in _SUFFIXES)]


def _read_offloaded(q: Quantizer, attr: str, value: torch.Tensor, refs: dict) -> torch.Tensor:
    ref = refs.get((id(q.owner), attr))
    return value if ref is None else read_store(ref.store, value.dtype, tuple(value.shape))


register_adapter(CompressedTensorsAdapter())
