"""Quickstart: load a model offloaded to disk, edit an offloaded layer, fake-quantize, export, reload.

Runs on a CPU in a few seconds: a tiny Qwen3-shaped checkpoint with random weights stands in for your
model (replace ``source`` with your own checkpoint directory).

    python examples/quickstart.py
"""

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import offload_export as oe
from offload_export.demo import build_checkpoint


def main(work: Path) -> None:
    source = work / "source"
    build_checkpoint(source, "tiny")  # stand-in for your own checkpoint

    # 1. Load it the way a big model is loaded: whatever does not fit under max_memory is offloaded to disk.
    model = AutoModelForCausalLM.from_pretrained(source, device_map="auto", max_memory={"cpu": "2MB"},
                                                 offload_folder=str(work / "offload"), dtype=torch.bfloat16).eval()
    lay = oe.layout(model)
    print("where the weights live:", {kind: n for kind, (n, _) in lay.summary().items()})
    layer = model.model.layers[-1]
    print("offloaded down_proj weight outside a block:", layer.mlp.down_proj.weight.device)  # meta

    # 2. Inspect and edit an offloaded layer. writeback=True persists the edit into the offload store (never
    #    into the source checkpoint), so later forwards and the export see it.
    with oe.materialized(layer, writeback=True):
        w = layer.mlp.down_proj.weight
        limit = (3 * w.float().std()).to(w.dtype).item()  # a bfloat16 value, so the clamp is exact
        print(f"down_proj |w| max {w.abs().max().item():.4f} -> clamped at 3 sigma = {limit:.4f}")
        w.data.clamp_(-limit, limit)
    with oe.materialized(layer):
        assert layer.mlp.down_proj.weight.abs().max().item() <= limit
    print("after the block the weight is offloaded again:", layer.mlp.down_proj.weight.device)

    # 3. Fake-quantize every Linear but lm_head with a built-in scheme, and compare against the unquantized model.
    ids = torch.tensor([[1, 17, 42, 7, 99, 3, 250, 64]])
    print("fake-quantized linear layers:", oe.quantize_weights(model, scheme="int8"))
    with torch.no_grad():
        quantized = model(ids).logits
        with oe.quantizers_disabled(model):  # every weight quantizer off, restored on exit
            unquantized = model(ids).logits
    print(f"quantization moves the logits by up to {(quantized - unquantized).abs().max().item():.4f}")

    # 4. Export: one module at a time, fake quantization folded into the weights, atomic.
    report = oe.save_clean(model, work / "export", max_shard_size="1MB")
    print(report)

    # 5. The export is a plain checkpoint: transformers loads it without offload_export or any toolkit.
    reloaded = AutoModelForCausalLM.from_pretrained(work / "export", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        diff = (reloaded(ids).logits - quantized).abs().max().item()
    print(f"reloaded export vs fake-quantized model: max |logit diff| = {diff}")
    assert diff == 0.0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="quickstart-") as tmp:
        main(Path(tmp))
