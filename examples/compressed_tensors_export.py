"""compressed-tensors (llm-compressor's format library) W8A16 on an offloaded model; export fake-quant and packed.

compressed-tensors attaches a ``quantization_scheme`` and ``weight_scale`` / ``weight_zero_point``
parameters to each quantized Linear and wraps its forward (what llm-compressor's ``oneshot`` leaves after
calibration; here a min-max calibration stands in for it). offload_export's compressed-tensors adapter finds
those modules: ``format="fake-quant"`` folds the scheme into the weight and keeps the qparams aside,
``format="compressed-tensors"`` writes the packed checkpoint llm-compressor's ``save_pretrained`` writes (for
vLLM, SGLang, and transformers with compressed-tensors installed).

    pip install -e ".[compressed-tensors]"
    python examples/compressed_tensors_export.py
"""

import json
import tempfile
from pathlib import Path

import accelerate
import torch
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import offload_export as oe
from offload_export.demo import build_checkpoint


def compute_scales(model: torch.nn.Module) -> int:
    """Min/max scales for every quantized Linear, per channel or per group (what a min-max observer computes)."""
    count = 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        args, w = scheme.weights, module.weight.detach()
        if args.strategy == "group":  # W8A16 is int8 in groups of args.group_size input columns
            w = w.unflatten(-1, (-1, args.group_size))
        scale, zero_point = calculate_qparams(w.amin(-1), w.amax(-1), args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
        module.quantization_status = QuantizationStatus.FROZEN
        count += 1
    return count


def main(work: Path) -> None:
    source = work / "source"
    build_checkpoint(source, "tiny")  # stand-in for your own checkpoint
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()

    # 1. Quantize with compressed-tensors: int8 weights in groups of 128, 16-bit activations; lm_head as is.
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("W8A16", ["Linear"])},
                                ignore=["lm_head"])
    apply_quantization_config(model, config)
    print("calibrated linear layers:", compute_scales(model))

    # 2. Offload it (here: every module to disk, the way a model bigger than memory is run).
    model = accelerate.disk_offload(model, str(work / "offload"), execution_device="cpu")
    print("layout:", oe.layout(model).summary())
    ids = torch.tensor([[1, 17, 42, 7, 99, 3, 250, 64]])
    with torch.no_grad():
        quantized = model(ids).logits
        with oe.quantizers_disabled(model):
            unquantized = model(ids).logits
    print(f"W8A16 moves the logits by up to {(quantized - unquantized).abs().max().item():.4f}")

    # 3. Export: weights fake-quantized in place, qparams kept aside in quantizer_state.safetensors.
    report = oe.save_clean(model, work / "export")
    print(report)
    with safe_open(work / "export" / "model.safetensors", "pt") as f:
        assert not any(k.endswith(("_scale", "_zero_point")) for k in f.keys())
    with safe_open(work / "export" / "quantizer_state.safetensors", "pt") as f:
        state = json.loads(f.metadata()["quantizers"])
    name, entry = next(iter(state.items()))
    print(f"{name}: adapter {entry['adapter']}, status {entry['quantization_status']}")

    # 4. The packed checkpoint: int8 codes packed into int32, their scales, quantization_config in config.json.
    packed = oe.save_clean(model, work / "packed", format="compressed-tensors")
    print(packed)
    qc = json.loads((work / "packed" / "config.json").read_text())["quantization_config"]
    with safe_open(work / "packed" / "model.safetensors", "pt") as f:
        weight = f.get_tensor("model.layers.0.mlp.up_proj.weight_packed")
    print(f"packed: {qc['quant_method']} {qc['format']}, up_proj weight_packed {weight.dtype} {tuple(weight.shape)}")
    assert oe.verify(model, work / "packed", format="compressed-tensors").ok

    # 5. Plain transformers reproduces the fake-quantized model.
    reloaded = AutoModelForCausalLM.from_pretrained(work / "export", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        diff = (reloaded(ids).logits - quantized).abs().max().item()
    print(f"reloaded export vs compressed-tensors model: max |logit diff| = {diff}")
    assert diff == 0.0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="compressed-tensors-export-") as tmp:
        main(Path(tmp))
