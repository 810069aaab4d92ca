"""transformers' save-time weight conversion: the names ``save_pretrained`` writes (fused experts -> per expert)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .layout import Layout

__all__ = ["save_conversion"]

StateDict = dict[str, torch.Tensor]


def save_conversion(model: nn.Module, lay: Layout, exclude: set[str]) -> Callable[[StateDict], StateDict] | None:
    """transformers' ``revert_weight_conversion`` for ``model``, or None when it leaves the names as they are.

    Only weights go through it: ``exclude`` (quantizer state) never does, as transformers' conversion
    operations expect weight-shaped tensors.

    Args:
        model: the model (a non-transformers model has no conversion).
        lay: its layout.
        exclude: keys that are not weights.

    Returns:
        ``state dict -> state dict`` with the names and tensors ``save_pretrained`` writes, or None.
    """
    if not hasattr(model, "config"):
        return None
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    meta = {k: torch.empty(i.shape, dtype=i.dtype, device="meta") for k, i in lay.items() if k not in exclude}
    out = revert_weight_conversion(model, dict(meta))
    if set(out) == set(meta):
        return None
    return lambda state: revert_weight_conversion(model, state)
