"""NVIDIA ModelOpt INT8 weight-only on an offloaded model, on a CPU; export fake-quant and packed; reload.

ModelOpt's accelerate plugin calibrates offloaded modules in place (it onloads each one around its
calibration), so ``mtq.quantize`` runs on the offloaded model directly. Its own HF export reads
``model.state_dict()`` and so gets meta tensors for offloaded weights; ``save_clean`` streams them instead:
``format="fake-quant"`` (weights with the quantization folded in: what transformers reloads for evaluation)
and ``format="modelopt"`` (the packed checkpoint ModelOpt's ``export_hf_checkpoint`` writes, for TensorRT-LLM,
vLLM and SGLang), both one module at a time.

    pip install -e ".[modelopt]"
    python examples/modelopt_export.py
"""

import json
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import offload_export as oe
from offload_export.demo import build_checkpoint

warnings.filterwarnings("ignore", message="transformers .* is not tested with current version of modelopt")
import modelopt.torch.quantization as mtq  # noqa: E402  (after the filter: it warns on import)


def main(work: Path) -> None:
    source = work / "source"
    build_checkpoint(source, "tiny")  # stand-in for your own checkpoint
    model = AutoModelForCausalLM.from_pretrained(source, device_map="auto", max_memory={"cpu": "2MB"},
                                                 offload_folder=str(work / "offload"), dtype=torch.bfloat16).eval()
    print("before quantization:", oe.layout(model).summary())

    calibration = [torch.tensor([[1, 17, 42, 7, 99, 3, 250, 64]]), torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])]

    def forward_loop(m):
        for ids in calibration:
            m(ids)

    with warnings.catch_warnings():  # ModelOpt keeps calibrated disk weights in RAM and says so
        warnings.simplefilter("ignore", RuntimeWarning)
        mtq.quantize(model, mtq.INT8_WEIGHT_ONLY_CFG, forward_loop=forward_loop)
    print("after quantization:", oe.layout(model).summary())
    weight_quantizers = [q for q in oe.find_quantizers(model, "weight") if q.enabled]
    print(f"{len(weight_quantizers)} enabled ModelOpt weight quantizers, e.g. {weight_quantizers[0].name}")

    ids = calibration[0]
    with torch.no_grad():
        quantized = model(ids).logits
    report = oe.save_clean(model, work / "export")
    print(report)

    # The quantizers' state (amax, ModelOpt config) is kept beside the weights, never pickled.
    with safe_open(work / "export" / "quantizer_state.safetensors", "pt") as f:
        configs = json.loads(f.metadata()["quantizers"])
        name = weight_quantizers[0].name
        print(f"{name}: amax {tuple(f.get_tensor(name + '._amax').shape)}, config keys {sorted(configs[name])}")

    # The packed checkpoint: int8 weights, per-channel weight_scale, hf_quant_config.json.
    packed = oe.save_clean(model, work / "packed", format="modelopt")
    print(packed)
    quant = json.loads((work / "packed" / "hf_quant_config.json").read_text())["quantization"]
    with safe_open(work / "packed" / "model.safetensors", "pt") as f:
        key = weight_quantizers[0].name.removesuffix("weight_quantizer")
        weight, scale = f.get_tensor(key + "weight"), f.get_tensor(key + "weight_scale")
    print(f"packed: quant_algo {quant['quant_algo']}, {key}weight {weight.dtype} {tuple(weight.shape)}, "
          f"weight_scale {tuple(scale.shape)}")
    assert weight.dtype == torch.int8 and oe.verify(model, work / "packed", format="modelopt").ok

    reloaded = AutoModelForCausalLM.from_pretrained(work / "export", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        diff = (reloaded(ids).logits - quantized).abs().max().item()
    print(f"reloaded export vs ModelOpt fake-quantized model: max |logit diff| = {diff}")
    assert diff == 0.0


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="modelopt-export-") as tmp:
        main(Path(tmp))
