"""How a quantization toolkit builds on offload_export: its own quantizer class and its own export loop.

``tinyq`` below is a stand-in for your toolkit. It registers its quantizer class once with
``register_quantizer`` (so ``quantizers_disabled`` and ``save_clean`` know it), and its own real-quant
export walks the model one decoder layer at a time: ``materialized`` makes that layer's offloaded weights
real for the block, ``quantizers_disabled`` gives the unquantized reference inside the same block.

    python examples/toolkit_integration.py
"""

import tempfile
from pathlib import Path

import accelerate
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

import offload_export as oe
from offload_export.demo import build_checkpoint


# ----------------------------------------------------------------------------------------- the toolkit
class TinyQuantizer(nn.Module):
    """Symmetric per-output-channel int8; ``amax`` is its calibrated state, ``enabled`` switches it."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.enabled = True
        self.register_buffer("amax", weight.detach().float().abs().amax(dim=1, keepdim=True))

    def scale(self) -> torch.Tensor:
        return self.amax.clamp(min=1e-8) / 127

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return (w.float() / self.scale()).round().clamp(-127, 127).to(torch.int8)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return (self.quantize(w).float() * self.scale()).to(w.dtype) if self.enabled else w

    def config(self) -> dict:
        return {"bits": 8, "axis": 0, "symmetric": True}


class TinyQuantLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)


oe.register_quantizer(TinyQuantizer)  # once, when the toolkit is imported


def tinyq_quantize(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Attach a calibrated TinyQuantizer to every Linear of a resident model."""
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n not in skip]
    for _, linear in linears:
        linear.weight_quantizer = TinyQuantizer(linear.weight)
        linear.__class__ = TinyQuantLinear
    return len(linears)


def tinyq_export_int8(model: nn.Module, out_dir: Path, probe: torch.Tensor) -> dict[str, float]:
    """The toolkit's own real-quant format: int8 weights + float scales, one file per decoder layer.

    Returns each Linear's relative output error on ``probe`` (quantized vs unquantized).
    """
    out_dir.mkdir(parents=True)
    errors = {}
    for i, layer in enumerate(model.model.layers):
        tensors = {}
        with oe.materialized(layer):  # this layer's offloaded weights are real until the block ends
            for name, linear in layer.named_modules():
                if not isinstance(linear, TinyQuantLinear):
                    continue
                tensors[f"{name}.qweight"] = linear.weight_quantizer.quantize(linear.weight)
                tensors[f"{name}.scale"] = linear.weight_quantizer.scale().contiguous()
                x = probe[:, : linear.in_features].to(linear.weight.dtype)
                with torch.no_grad():
                    quantized = linear(x)
                    with oe.quantizers_disabled(linear):
                        reference = linear(x)
                errors[f"model.layers.{i}.{name}"] = ((quantized - reference).norm() / reference.norm()).item()
        save_file(tensors, out_dir / f"layer-{i:05d}.safetensors", metadata={"format": "tinyq-int8"})
    return errors


# ------------------------------------------------------------------------------------------- a user
def main(work: Path) -> None:
    build_checkpoint(work / "source", "tiny")  # stand-in for your own checkpoint
    model = AutoModelForCausalLM.from_pretrained(work / "source", dtype=torch.bfloat16).eval()
    print("tinyq quantized linear layers:", tinyq_quantize(model))
    # Offload the decoder layers: even ones to CPU RAM, odd ones to disk.
    for i, layer in enumerate(model.model.layers):
        if i % 2:
            accelerate.disk_offload(layer, str(work / "offload" / str(i)), execution_device="cpu")
        else:
            accelerate.cpu_offload(layer, execution_device="cpu")
    print("layout:", oe.layout(model).summary())

    errors = tinyq_export_int8(model, work / "tinyq", probe=torch.randn(4, 1024))
    worst = max(errors, key=errors.get)
    print(f"tinyq export: {len(errors)} linear layers, worst relative error {errors[worst]:.4f} ({worst})")

    # The same model as a plain HF checkpoint (fake quantization folded) for transformers / vLLM.
    report = oe.save_clean(model, work / "hf")
    print(report)

    # The two exports agree: int8 * scale is exactly the folded weight that save_clean wrote.
    with safe_open(work / "tinyq" / "layer-00001.safetensors", "pt") as q, \
            safe_open(work / "hf" / "model.safetensors", "pt") as hf:
        dequantized = (q.get_tensor("mlp.up_proj.qweight").float() * q.get_tensor("mlp.up_proj.scale"))
        folded = hf.get_tensor("model.layers.1.mlp.up_proj.weight")
        assert torch.equal(dequantized.to(folded.dtype), folded)
    print("tinyq int8 weights x scales == save_clean's folded weights")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="toolkit-integration-") as tmp:
        main(Path(tmp))
