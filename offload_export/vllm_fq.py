"""The opt-in ``vllm_fq_modelopt_state.pth`` that ModelOpt's vLLM fake-quant worker reads.

Its content is what ModelOpt's ``export_hf_vllm_fq_checkpoint`` writes for the same model (modelopt state
with the weight quantizers switched off, their state dropped, folded ``pre_quant_scale`` set to ones),
built with ModelOpt's own functions while the quantizers' offloaded buffers are onloaded. The file holds
tensors and plain types only: it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from .materialize import onloaded
from .adapters.modelopt import ModelOptAdapter
from .quantizers import Quantizer

__all__ = ["VLLM_FQ_STATE_NAME", "write_vllm_fq_state"]

VLLM_FQ_STATE_NAME = "vllm_fq_modelopt_state.pth"


def _folded_pre_quant_scales(model: nn.Module, weight_qs: list[Quantizer], folded: set[str]) -> set[str]:
    """Input quantizers whose ``pre_quant_scale`` the fold multiplied into a weight (ModelOpt's rule)."""
    from modelopt.torch.utils import get_unwrapped_name

    names = set()
    for q in weight_qs:
        if f"{q.owner_name}.{q.target}" in folded and q.adapter.pre_quant_scale(q) is not None:
            attr = q.name.rpartition(".")[2].replace("weight_quantizer", "input_quantizer")
            names.add(get_unwrapped_name(f"{q.owner_name}.{attr}" if q.owner_name else attr, model))
    return names


def _switch_off(weight_qs: list[Quantizer], stack: ExitStack) -> None:
    """Disable enabled ``*weight_quantizer`` slots and their rotation, as ModelOpt's export does; undone on exit."""
    for q in weight_qs:
        if not q.adapter.is_enabled(q):
            continue
        snapshot = q.adapter.snapshot(q)
        stack.callback(q.adapter.restore, q, snapshot)
        for leaf in q.adapter.leaves(q):
            leaf._disabled = True
            if getattr(leaf, "_rotate", False):
                leaf.disable_rotate()


def write_vllm_fq_state(model: nn.Module, quantizers: list[Quantizer], refs: dict, folded: set[str],
                        out_dir: Path) -> str:
    """Write ``vllm_fq_modelopt_state.pth`` into ``out_dir``; the model is left as it was.

    Args:
        model: a model quantized by NVIDIA ModelOpt (offloaded or not).
        quantizers: the model's quantizers (:func:`offload_export.find_quantizers`).
        refs: the model's offload map (``offloaded_tensors(model)``), to onload quantizer buffers.
        folded: the weight keys the export folded.
        out_dir: the (staging) directory.

    Returns:
        The file name.

    Raises:
        ValueError: the model has no ModelOpt quantizers.
    """
    import modelopt.torch.opt as mto
    from modelopt.torch.export.plugins.vllm_fakequant_hf import is_weight_quantizer_state_key
    from modelopt.torch.quantization.conversion import quantizer_state
    from modelopt.torch.quantization.utils import get_quantizer_state_dict
    from modelopt.torch.utils.serialization import safe_save

    modelopt_qs = [q for q in quantizers if isinstance(q.adapter, ModelOptAdapter)]
    if not modelopt_qs:
        raise ValueError("vllm_fq_state=True needs a model quantized by NVIDIA ModelOpt; this one has none")
    # ModelOpt switches off only the singular `*weight_quantizer` slots (not fused-expert lists)
    weight_qs = [q for q in modelopt_qs if q.role == "weight" and q.name.endswith("weight_quantizer")]
    with ExitStack() as stack:
        for q in modelopt_qs:
            stack.enter_context(onloaded(q.handle, None, refs))
        folded_pqs = _folded_pre_quant_scales(model, weight_qs, folded)
        _switch_off(weight_qs, stack)
        weights = get_quantizer_state_dict(model)
        for key in list(weights):
            if is_weight_quantizer_state_key(key):
                del weights[key]
            elif key in folded_pqs and "_pre_quant_scale" in weights[key]:
                weights[key]["_pre_quant_scale"] = torch.ones_like(weights[key]["_pre_quant_scale"])
        state = mto.modelopt_state(model)
        qstate = {k: v for k, v in quantizer_state(model).items() if not is_weight_quantizer_state_key(k)}
        for _, mode_state in state.get("modelopt_state_dict", []):
            if "quantizer_state" in mode_state.get("metadata", {}):
                mode_state["metadata"]["quantizer_state"] = qstate
        state["modelopt_state_weights"] = weights
        safe_save(state, out_dir / VLLM_FQ_STATE_NAME)
    return VLLM_FQ_STATE_NAME
