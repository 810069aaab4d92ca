"""GPU check: fused-expert MoE (Qwen3-MoE, Mixtral) with ModelOpt NVFP4 / FP8, offloaded, vs ModelOpt's own export.

NVFP4's fake-quant fold needs CUDA, so the CPU tests (tests/test_conversion.py) export it unfolded only.
Here each model is calibrated resident on the GPU, ModelOpt's ``export_hf_vllm_fq_checkpoint`` of a copy is
the reference, then the model is dispatched (experts to disk, attention to CPU RAM, the rest on the GPU)
and ``save_clean`` must write the same tensors, bit for bit, under ``save_pretrained``'s names.
The GPU image has transformers 5.17, where ``save_clean`` failed before ``offload_export.conversion``.

Run (with ModelOpt wheels carried, see ../shared/GPU.md):
    python benchmarks/gpu_moe_conversion.py
Prints one line per (model, scheme) and exits non-zero on any mismatch.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from accelerate import dispatch_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

import offload_export as oe

warnings.filterwarnings("ignore")
CUDA = torch.cuda.is_available()
MAIN = torch.device("cuda:0") if CUDA else torch.device("cpu")  # the CPU run is a dry run of the script (INT8 only)
_COMMON = dict(hidden_size=64, num_hidden_layers=2, vocab_size=128, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.1)
CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                        num_experts_per_tok=2, norm_topk_prob=True, **_COMMON),
    "mixtral": lambda: MixtralConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, **_COMMON),
}


def _read(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def _model(kind: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "gate.weight" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.config.architectures = [type(model).__name__]
    return model


def _device_map() -> dict[str, object]:
    place = {"model.embed_tokens": MAIN, "model.norm": MAIN, "model.rotary_emb": MAIN, "lm_head": "cpu"}
    for i in range(2):
        place.update({f"model.layers.{i}.self_attn": "cpu", f"model.layers.{i}.mlp.gate": MAIN,
                      f"model.layers.{i}.mlp.experts": "disk", f"model.layers.{i}.input_layernorm": MAIN,
                      f"model.layers.{i}.post_attention_layernorm": "cpu"})
    return place


def check(kind: str, scheme: str, tmp: Path) -> bool:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.plugins.vllm_fakequant_hf import export_hf_vllm_fq_checkpoint

    calib = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(7)).to(MAIN)
    model = mtq.quantize(_model(kind).to(MAIN), getattr(mtq, scheme), lambda m: m(input_ids=calib, use_cache=False))
    export_hf_vllm_fq_checkpoint(copy.deepcopy(model), tmp / "modelopt")
    expected = _read(tmp / "modelopt")
    _model(kind).save_pretrained(tmp / "unquantized")
    names = set(_read(tmp / "unquantized"))
    model = dispatch_model(model, _device_map(), main_device=MAIN, offload_dir=str(tmp / "offload"))
    report = oe.save_clean(model, tmp / "out")
    written = _read(tmp / "out")
    bad = [k for k in expected if k not in written or not torch.equal(written[k], expected[k])]
    ok = not bad and set(written) == set(expected) == names
    print(f"{kind:10s} {scheme:18s} {oe.layout(model).summary()} tensors={report.tensors} "
          f"folded={len(report.folded)} equal_to_modelopt={ok} {bad[:3]}", flush=True)
    return ok


def main() -> int:
    import transformers
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name() if CUDA else 'CPU (dry run)'}")
    ok = True
    for kind in CONFIGS:
        for scheme in ("NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG", "INT8_WEIGHT_ONLY_CFG") if CUDA else ("INT8_WEIGHT_ONLY_CFG",):
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    ok &= check(kind, scheme, Path(tmp))
                except Exception as e:  # report and go on to the next case
                    print(f"{kind:10s} {scheme:18s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
