"""``format="fake-quant"`` (the default): weights with fake quantization folded in, quantizer state beside them.

Every enabled weight quantizer is folded into its weight on the quantizer's device (``w_q = quantizer(w)``),
floating-point weights are cast to the export dtype, and fused experts are converted to the names
``save_pretrained`` writes. The quantizers' own state goes into ``quantizer_state.safetensors`` (tensors,
with each quantizer's JSON configuration in the metadata), never among the weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch import nn
from torch.nn.utils import parametrize

from .._buffers import cast
from .._store import read_store
from ..writer import ShardWriter, TensorSpec
from .base import Format, Source, StateDict, register_format

__all__ = ["QUANTIZER_STATE_NAME", "FakeQuant", "quantizer_state"]

QUANTIZER_STATE_NAME = "quantizer_state.safetensors"


def quantizer_state(source: Source) -> tuple[StateDict, dict]:
    """Every quantizer's tensors (``<quantizer>.<name>``, read from their store when offloaded) and configurations.

    Returns:
        ``(tensors on the CPU, {quantizer name: JSON-able configuration})``; the configuration says whether
        the export folded the quantizer into its weight.
    """
    tensors, configs = {}, {}
    for q in source.quantizers:
        state, config = q.adapter.state(q)
        for k, t in state.items():
            info = source.lay.get(f"{q.name}.{k}")
            if t.device.type == "meta":
                if info is None or info.ref is None:
                    raise RuntimeError(f"{q.name}.{k} is on the meta device and no accelerate hook supplies it;\n"
                                       f"  export inside offload_export.materialized(<the module holding it>)")
                t = read_store(info.ref.store, info.dtype, info.shape)
            tensors[f"{q.name}.{k}"] = t.detach().to("cpu").contiguous()
        config["folded"] = q.role == "weight" and f"{q.owner_name}.{q.target}" in source.folds
        configs[q.name] = config
    return tensors, configs


def _transform(model: nn.Module, source: Source) -> tuple[str, str] | None:
    """``(module, what)`` of the first transform the model's forward applies beyond its weights: a
    compressed-tensors transform still attached (an input / output / attention rotation hook, or a weight
    parametrization), a parametrized weight, or a ModelOpt quantizer that rotates its tensor."""
    # a model holds compressed-tensors transforms only after compressed-tensors was imported
    base = sys.modules.get("compressed_tensors.transform.factory.base")
    for name, module in model.named_modules():
        if base is not None and isinstance(module, base.TransformBase):
            return name.rpartition(".")[0], f"a compressed-tensors transform ({name}, {type(module).__name__})"
        if parametrize.is_parametrized(module):
            return name, f"a parametrization of {', '.join(module.parametrizations)}"
    for q in source.quantizers:
        if q.adapter.name != "modelopt":
            continue
        leaves = q.handle if isinstance(q.handle, (nn.ModuleList, nn.Sequential)) else [q.handle]
        if any(getattr(leaf, "rotate_is_enabled", False) and getattr(leaf, "is_enabled", False) for leaf in leaves):
            return q.owner_name, f"a ModelOpt quantizer that rotates its tensor ({q.name}, rotate=True)"
    return None


@register_format
class FakeQuant(Format):
    """Weights as the fake-quantized model computes with them: what evaluation and vLLM's fake-quant worker read.

    Raises:
        ValueError: the model's forward applies a transform the checkpoint cannot express (a compressed-tensors
            rotation such as QuIP's or SpinQuant's, a weight parametrization, ModelOpt's ``rotate``): plain
            transformers would load the weights without it.
    """

    name = "fake-quant"

    def __init__(self, source: Source):
        super().__init__(source)
        found = _transform(source.model, source)
        if found is not None:
            module, what = found
            raise ValueError(f"format='fake-quant': the forward of {module or '<root>'} applies {what}, which a "
                             f"fake-quant checkpoint cannot express (a plain reload computes without it). Export "
                             f"the toolkit's own format (compressed-tensors' or ModelOpt's exporter, which write the "
                             f"transform), or remove the transform before exporting")

    def outputs(self, meta: StateDict) -> StateDict:
        return self.source.convert(meta) if self.source.convert is not None else meta

    def finish(self, reader, unit, values: StateDict) -> StateDict:
        dtype = self.source.dtype
        out = {}
        for key in list(values):
            tensor = values.pop(key)  # the source dies as soon as its fold is made: never source + fold + cast
            if key in self.source.folds:
                tensor = reader.fold(key, tensor)
            out[key] = cast(tensor, dtype)
            del tensor
        return self.source.convert(out) if unit.converted else out

    def devices(self, reader, unit) -> dict:
        return {k: reader.fold_device(k) for k in unit.sources if k in self.source.folds}

    def unchanged(self, unit, key: str) -> bool:
        return not (unit.converted or key in self.source.folds or self.casts(key))

    def write_files(self, tmp: Path) -> list[str]:
        if not self.source.quantizers:
            return []
        tensors, configs = quantizer_state(self.source)
        # our writer, not safetensors' save_file: its metadata map is serialized in random order
        writer = ShardWriter(str(tmp / QUANTIZER_STATE_NAME), [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()],
                             {"format": "pt", "quantizers": json.dumps(configs, sort_keys=True)})
        try:
            for key, value in tensors.items():
                writer.write(key, value)
            writer.close()
        except BaseException:
            writer.abort()  # its descriptor: a failed write must not keep the file's space allocated
            raise
        return [QUANTIZER_STATE_NAME]
