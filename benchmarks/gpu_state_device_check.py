"""GPU check: ModelOpt NVFP4 quantizer state left on the CPU while the weights and the kernel need CUDA.

After ``mtq.quantize`` of a model whose accelerate hooks execute on the CPU, every quantizer's ``_amax`` is on
the CPU; ModelOpt's NVFP4 kernel needs it on CUDA. This calibrates a small Qwen3-shaped model resident on the
GPU, exports it as the reference, then moves every quantizer buffer to the CPU and checks that
``save_clean(device="cuda")`` writes the same bytes and leaves the state on the CPU, and that
``materialized(model, device="cuda")`` makes the model runnable (same logits as before the move).
Prints one JSON object.

Usage: python benchmarks/gpu_state_device_check.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import modelopt.torch.quantization as mtq
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

import offload_export as oe
from gpu_check import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.config.architectures = [type(model).__name__]
    ids = torch.randint(0, 1024, (2, 32), device="cuda")
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, lambda m: m(input_ids=ids))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().cpu()
    result: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        oe.save_clean(model, tmp / "reference")
        buffers = [(m, name) for m in model.modules() if "TensorQuantizer" in type(m).__name__
                   for name, _ in m.named_buffers(recurse=False)]
        for m, name in buffers:  # as calibration of a CPU-executing offloaded model leaves them
            setattr(m, name, getattr(m, name).cpu())
        try:
            oe.save_clean(model, tmp / "plain")
            result["without_device"] = "exported"
        except Exception as e:  # noqa: BLE001  (the report shows what the user meets)
            result["without_device"] = f"{type(e).__name__}: {str(e)[:200]} | notes: {getattr(e, '__notes__', [])}"
        oe.save_clean(model, tmp / "cuda", device="cuda")
        result["export_device_cuda_vs_reference"] = compare(tmp / "cuda", tmp / "reference")
        result["state_left_on_cpu"] = all(getattr(m, name).device.type == "cpu" for m, name in buffers)
        with torch.no_grad(), oe.materialized(model, device="cuda"):
            again = model(input_ids=ids).logits.float().cpu()
        result["materialized_forward_equal"] = torch.equal(again, logits)
        result["state_still_on_cpu_after_block"] = all(getattr(m, name).device.type == "cpu" for m, name in buffers)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out, "gpu_state_device_check.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
