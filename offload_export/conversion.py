"""transformers' save-time weight conversion (fused MoE experts saved per expert), kept to weights.

transformers 5 stores a MoE layer's experts as fused 3-D parameters (``mlp.experts.gate_up_proj``) and
converts them back to the per-expert checkpoint names (``mlp.experts.0.gate_proj.weight`` ...) in
``save_pretrained`` through ``transformers.core_model_loading.revert_weight_conversion``. Its patterns are
matched as regexes: before 5.2x, ``mlp.experts.gate_up_proj`` also matches a quantizer's buffer such as
``mlp.experts.gate_up_proj_weight_quantizers.0._amax``, which the converter then tries to split (transformers
5.0-5.17: ``ValueError: Undefined Operation encountered!`` or an ``IndexError`` on a 0-dim ``_amax``).

So the conversion here sees parameters only; quantizer state (``exclude``) is never converted, and other
buffers keep their names unless the conversion merely renames them (a prefix change of a model loaded with
``from_pretrained``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ._errors import add_note

__all__ = ["Conversion", "save_conversion"]

Conversion = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def _revert_function() -> Callable | None:
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: checkpoints hold the model's own names, nothing to revert
        return None
    return revert_weight_conversion


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


def _meta(info: Any) -> torch.Tensor:
    return torch.empty(tuple(info.shape), dtype=info.dtype, device="meta")


def _same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(tuple(a[k].shape) == tuple(b[k].shape) for k in a)


def _renamed(revert: Callable, model: nn.Module, key: str, meta: torch.Tensor) -> str:
    """A buffer's saved name: the conversion's only when it is a pure rename of this one tensor."""
    try:
        out = revert(model, {key: meta})
    except Exception:  # a converter's pattern caught a non-weight: not ours to convert
        return key
    if len(out) != 1:
        return key
    (name, value), = out.items()
    return name if tuple(value.shape) == tuple(meta.shape) else key


class _WeightConversion:
    """``state dict -> state dict``: parameters through transformers' revert, buffers renamed, the rest as is."""

    def __init__(self, model: nn.Module, revert: Callable, weights: frozenset[str], renames: dict[str, str]):
        self._model, self._revert = model, revert
        self.weights, self.renames = weights, renames

    def __call__(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = {k: v for k, v in state.items() if k in self.weights}
        out = dict(self._convert(weights)) if weights else {}
        for key, value in state.items():
            if key in self.weights:
                continue
            name = self.renames.get(key, key)
            if name in out:
                raise RuntimeError(f"transformers' save-time conversion writes {name!r} twice (from {key!r} and "
                                   f"from the weights {sorted(weights)}); the checkpoint names would collide")
            out[name] = value
        return out

    def _convert(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            return self._revert(self._model, weights)
        except Exception as e:
            raise add_note(e, f"offload_export: transformers {_transformers_version()} revert_weight_conversion "
                              f"of {type(self._model).__name__} failed on {sorted(weights)}")


def save_conversion(model: nn.Module, lay: Mapping[str, Any], exclude: set[str] | frozenset[str] = frozenset()
                    ) -> Conversion | None:
    """transformers' save-time weight conversion of ``model``, applied to weights only; ``None`` when it is the identity.

    The parameters among ``lay``'s keys go through ``revert_weight_conversion`` (fused experts become
    per-expert tensors under ``save_pretrained``'s names); keys in ``exclude`` (quantizer state) pass through
    unchanged, and other buffers keep their name unless the conversion only renames them.

    Args:
        model: the model; anything without a ``config`` (not a transformers model) has no conversion.
        lay: ``state-dict key -> info`` with ``shape``, ``dtype`` and ``kind`` (a
            :class:`~offload_export.layout.Layout`); ``"tied"`` entries are not saved and not converted.
        exclude: keys never converted (quantizer state such as ``..._weight_quantizers.0._amax``).

    Returns:
        ``convert(state) -> state`` for any subset of the keys (one module's tensors, real or meta), or
        ``None`` when the conversion leaves every name and shape as it is (and on transformers 4.x).

    Raises:
        Whatever transformers raises on the model's weights, with a note naming the model, the keys and
        the transformers version.

    Example:
        >>> convert = save_conversion(model, oe.layout(model), exclude=quantizer_keys)  # doctest: +SKIP
        >>> sorted(convert({"model.layers.0.mlp.experts.down_proj": w}))[:1]  # doctest: +SKIP
        ['model.layers.0.mlp.experts.0.down_proj.weight']
    """
    if not hasattr(model, "config"):
        return None
    revert = _revert_function()
    if revert is None:
        return None
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    saved = {k: i for k, i in lay.items() if k not in exclude and getattr(i, "kind", None) != "tied"}
    weights = frozenset(k for k in saved if k in params)
    renames = {k: n for k in saved if k not in weights and (n := _renamed(revert, model, k, _meta(saved[k]))) != k}
    convert = _WeightConversion(model, revert, weights, renames)
    meta = {k: _meta(i) for k, i in saved.items()}
    out = convert(dict(meta))
    return None if _same(dict(sorted(out.items())), dict(sorted(meta.items()))) else convert
