"""The NVIDIA ModelOpt adapter: ``TensorQuantizer`` / ``SequentialQuantizer`` modules, duck-typed (no import)."""

from __future__ import annotations

import torch
from torch import nn

from .._hooks import unhooked
from ..quantizers import Quantizer, QuantizerAdapter, json_safe, module_quantizers, register_adapter

__all__ = ["ModelOptAdapter"]


class ModelOptAdapter(QuantizerAdapter):
    """NVIDIA ModelOpt ``TensorQuantizer`` / ``SequentialQuantizer``, duck-typed (modelopt is not imported).

    The fold is ModelOpt's own (``export_hf_vllm_fq_checkpoint``): ``quantizer(w.float()).to(w.dtype)``, then
    the input quantizer's ``pre_quant_scale`` multiplied in when that input quantizer is disabled. Fused
    MoE experts (``*_weight_quantizers`` lists) fold one expert slice at a time.
    """

    name = "modelopt"
    _SAVED = ("_disabled",)

    @staticmethod
    def _is_tensor_quantizer(m: nn.Module) -> bool:
        return type(m).__module__.startswith("modelopt.") and hasattr(m, "_disabled") and hasattr(m, "is_enabled")

    def _is_quantizer(self, m: nn.Module) -> bool:
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m):
            return all(self._is_tensor_quantizer(c) for c in m)
        return self._is_tensor_quantizer(m)

    def leaves(self, q: Quantizer) -> list[nn.Module]:
        """The ``TensorQuantizer`` modules behind ``q`` (one, or one per fused expert)."""
        return list(q.handle) if isinstance(q.handle, (nn.ModuleList, nn.Sequential)) else [q.handle]

    def find(self, model):
        return module_quantizers(model, self, self._is_quantizer)

    def is_enabled(self, q):
        leaves = self.leaves(q)
        return any(leaf.is_enabled and getattr(leaf, "fake_quant", True) for leaf in leaves)

    def snapshot(self, q):
        return [{a: getattr(leaf, a) for a in self._SAVED if hasattr(leaf, a)} for leaf in self.leaves(q)]

    def disable(self, q):
        """As ModelOpt's own ``disable_quantizer``: no quantization, but a ``pre_quant_scale`` and a rotation still
        apply (SmoothQuant / AWQ scaled the weight by their inverse; the pair is the unquantized product)."""
        for leaf in self.leaves(q):
            leaf._disabled = True  # not disable(): some subclasses override it; the flag is the truth

    def restore(self, q, snapshot):
        for leaf, saved in zip(self.leaves(q), snapshot):
            for attr, value in saved.items():
                setattr(leaf, attr, value)  # never enable(): HardDisabledTensorQuantizer.enable() raises

    def pre_quant_scale(self, q: Quantizer) -> torch.Tensor | None:
        """The paired input quantizer's ``pre_quant_scale`` that the fold multiplies in (it is disabled), else None."""
        attr = q.name.rpartition(".")[2].replace("weight_quantizer", "input_quantizer")
        inp = getattr(q.owner, attr, None)
        scale = getattr(inp, "_pre_quant_scale", None)
        if scale is None or inp.is_enabled:
            return None
        return scale

    def fold(self, q, weight):
        with torch.no_grad():
            if isinstance(q.handle, nn.ModuleList):  # fused experts: one quantizer per leading slice
                out = weight.clone()
                for i, leaf in enumerate(q.handle):
                    if leaf.is_enabled and leaf.fake_quant:
                        out[i] = unhooked(leaf)(weight[i].float()).to(weight.dtype)
                return out
            out = unhooked(q.handle)(weight.float()).to(weight.dtype)
            scale = self.pre_quant_scale(q)
            if scale is not None:
                out = (out * scale.squeeze().to(device=out.device)[None, :]).to(out.dtype)
            return out

    def state(self, q):
        tensors, config = super().state(q)
        leaves = self.leaves(q)
        states = [leaf.get_modelopt_state() if hasattr(leaf, "get_modelopt_state") else {} for leaf in leaves]
        config["modelopt_state"] = json_safe(states[0] if len(states) == 1 else states)
        config["class"] = type(q.handle).__name__
        return tensors, config


register_adapter(ModelOptAdapter())
