"""GPU check of ``save_clean(format="compressed-tensors")`` on the upstream case (Qwen3-0.6B shape, most layers
offloaded to the CPU, some to disk).

1. compressed-tensors schemes (NVFP4, FP8, W4A16): calibrated on the GPU (min/max qparams, FROZEN), the
   reference is llm-compressor's save path on a GPU-resident deep copy; the model is then dispatched with
   most layers on the CPU / disk and exported; every tensor and ``quantization_config`` must be equal.
2. built-in schemes (nvfp4, fp8, int8) on the offloaded model: exported packed, reloaded by transformers
   on the GPU, logits compared with the fake-quantized model.
The model's logits must be unchanged by each export. Prints a table and writes ``gpu_compressed_tensors.json``.

Usage: python benchmarks/gpu_compressed_tensors.py [--layers 28] [--out DIR] [--device cuda]
       (``--device cpu --layers 2`` is a CPU smoke run of the same code: disk offload instead of dispatch)
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen3Config

import offload_export as oe


def qwen3_06b(layers: int) -> Qwen3Config:
    return Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)


def read_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out, json.loads((path / "config.json").read_text())["quantization_config"]


def compare(actual: Path, expected: Path) -> dict:
    (a, qa), (e, qe) = read_dir(actual), read_dir(expected)
    bits = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731
    bad = [k for k in e if k not in a or a[k].dtype != e[k].dtype or a[k].shape != e[k].shape
           or not torch.equal(bits(a[k]), bits(e[k]))]
    return {"tensors": len(e), "mismatched": len(bad), "extra": len(set(a) - set(e)), "example": bad[:3],
            "quantization_config_equal": qa == qe}


@torch.no_grad()
def logits(model, vocab: int, device: str) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1)).to(device)
    return model(input_ids=ids, use_cache=False).logits.float().cpu()


@torch.no_grad()
def calibrate(model, preset: str) -> None:
    """compressed-tensors' preset on every Linear but lm_head; static qparams from each weight's min/max."""
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus, apply_quantization_config,
                                                 preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
    scheme = preset_name_to_scheme(preset, ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for m in model.modules():
        if not hasattr(m, "quantization_scheme"):
            continue
        args, w = m.quantization_scheme.weights, m.weight.float()
        gscale = None
        if args.strategy == "tensor_group":
            gscale = generate_gparam(w.min(), w.max())
            m.weight_global_scale.copy_(gscale)
            if hasattr(m, "input_global_scale"):
                m.input_global_scale.copy_(generate_gparam(torch.tensor(-4.0), torch.tensor(4.0)))
        if args.strategy in ("group", "tensor_group"):
            g = w.unflatten(-1, (-1, args.group_size))
            lo, hi = g.amin(-1), g.amax(-1)
        elif args.strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            lo, hi = w.min(), w.max()
        scale, zp = calculate_qparams(lo, hi, args, global_scale=gscale)
        m.weight_scale.copy_(scale.reshape(m.weight_scale.shape))
        m.weight_zero_point.copy_(zp.reshape(m.weight_zero_point.shape))
        inp = m.quantization_scheme.input_activations
        if inp is not None and not inp.dynamic and hasattr(m, "input_scale"):
            scale, zp = calculate_qparams(torch.tensor(-4.0), torch.tensor(4.0), inp)
            m.input_scale.copy_(scale.reshape(m.input_scale.shape))
            m.input_zero_point.copy_(zp.reshape(m.input_zero_point.shape))
        m.quantization_status = QuantizationStatus.FROZEN


def offload(model, work: Path, device: str):
    """Layers 0-1 stay on the device, the last two go to disk, the rest to the CPU (offloaded)."""
    from accelerate import disk_offload, dispatch_model
    if device == "cpu":
        return disk_offload(model, str(work / "offload"), execution_device=torch.device("cpu"))
    n = model.config.num_hidden_layers
    device_map = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    device_map.update({f"model.layers.{i}": 0 if i < 2 else "disk" if i >= n - 2 else "cpu" for i in range(n)})
    return dispatch_model(model, device_map, main_device="cuda", offload_dir=str(work / "offload"))


def ct_case(preset: str, layers: int, work: Path, device: str) -> dict:
    from compressed_tensors.compressors import ModelCompressor
    row: dict = {"case": f"compressed-tensors {preset}"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen3_06b(layers), dtype=torch.bfloat16).to(device).eval()
    calibrate(model, preset)
    twin = copy.deepcopy(model)
    t = time.perf_counter()
    compressor = ModelCompressor.from_pretrained_model(twin)
    compressor.compress_model(twin)
    twin.save_pretrained(work / "reference")
    compressor.update_config(work / "reference")
    row["llm_compressor_resident_s"] = round(time.perf_counter() - t, 2)
    del twin
    model = offload(model, work, device)
    params = dict(model.named_parameters(remove_duplicate=False))
    row["layout"] = f"{sum(p.device.type == 'meta' for p in params.values())} of {len(params)} parameters offloaded"
    before = logits(model, model.config.vocab_size, device)
    t = time.perf_counter()
    report = oe.save_clean(model, work / "ours", format="compressed-tensors")
    row["ours_s"] = round(time.perf_counter() - t, 2)
    row["ours_MB"] = round(report.bytes / 1e6, 1)
    row["ours_vs_llm_compressor_resident"] = compare(work / "ours", work / "reference")
    row["model_unchanged_logits"] = bool(torch.equal(logits(model, model.config.vocab_size, device), before))
    return row


def builtin_case(scheme: str, layers: int, work: Path, device: str) -> dict:
    row: dict = {"case": f"built-in {scheme}"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(qwen3_06b(layers), dtype=torch.bfloat16).to(device).eval()
    model = offload(model, work, device)
    oe.quantize_weights(model, scheme)
    vocab = model.config.vocab_size
    fq = logits(model, vocab, device)
    t = time.perf_counter()
    report = oe.save_clean(model, work / "ours", format="compressed-tensors")
    row["ours_s"] = round(time.perf_counter() - t, 2)
    row["ours_MB"] = round(report.bytes / 1e6, 1)
    row["model_unchanged_logits"] = bool(torch.equal(logits(model, vocab, device), fq))
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(work / "ours", device_map={"": device}, dtype=torch.bfloat16)
    row["reload_vs_fq_logits_max_diff"] = float((logits(reloaded, vocab, device) - fq).abs().max())
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--out", default=".")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    rows = []
    cases = [(ct_case, p) for p in ("NVFP4", "FP8", "W4A16")] + [(builtin_case, s) for s in ("nvfp4", "fp8", "int8")]
    for case, name in cases:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                rows.append(case(name, args.layers, Path(tmp), args.device))
            except Exception as e:
                rows.append({"case": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]})
        if args.device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out, "gpu_compressed_tensors.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
