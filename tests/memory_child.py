"""Peak-memory harness: a child process exports a disk-offloaded (or resident) bf16 Llama and reports its VmHWM growth.

The parent calls :func:`measure`; the child (this file run as a script) builds the checkpoint, reloads it with
``device_map={"": "disk"}`` (or ``"cpu"``), fake-quantizes it with ``quantize_weights`` and resets the kernel's high-water
mark right before ``save_clean``, so only the export is measured (file pages of any mmap included).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def measure(work: Path, *, vocab: int = 16000, layers: int = 12, quantize: dict | None = None,
            export: dict | None = None, experts: int = 0, modelopt: str | None = None, place: str = "disk") -> dict:
    """Run one export in a child; ``{"peak_extra", "bytes", "largest", "largest_source", "model_bytes", "folded"}``
    (bytes: peak growth, written, largest written tensor, largest tensor of the model, the model; folded weight keys).

    Args:
        work: an empty directory for the checkpoint, the offload folder and the export.
        vocab, layers: the Llama shape (hidden 1024, intermediate 2816, untied embeddings).
        quantize: keyword arguments of ``quantize_weights`` (default int8).
        export: keyword arguments of ``save_clean`` (JSON values: a dtype as its name).
        experts: a Qwen3-MoE of this many fused experts per layer (expert intermediate 1024) instead of Llama.
        modelopt: quantize with this ModelOpt config (``mtq.<name>``, calibrated on 32 tokens) instead.
        place: the reloaded model's ``device_map`` device: ``"disk"`` (offloaded) or ``"cpu"`` (resident).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        pytest.skip(f"cannot reset VmHWM here: {e}")
    spec = {"vocab": vocab, "layers": layers, "quantize": quantize or {"scheme": "int8"}, "export": export or {},
            "experts": experts, "modelopt": modelopt, "place": place}
    run = subprocess.run([sys.executable, __file__, str(work), json.dumps(spec)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _kib(field: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])


def _child(work: str, spec: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

    import offload_export as oe

    shape = dict(vocab_size=spec["vocab"], hidden_size=1024, intermediate_size=2816, num_hidden_layers=spec["layers"],
                 num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False)
    if spec["experts"]:
        config = Qwen3MoeConfig(num_experts=spec["experts"], moe_intermediate_size=1024, num_experts_per_tok=2,
                                head_dim=64, **shape)
    else:
        config = LlamaConfig(**shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02, generator=generator)
    model.save_pretrained(f"{work}/src", max_shard_size="100MB")
    del model
    model = AutoModelForCausalLM.from_pretrained(f"{work}/src", device_map={"": spec["place"]},
                                                 offload_folder=f"{work}/offload", dtype=torch.bfloat16)
    if spec["place"] == "cpu":  # loaded as mappings of the checkpoint: pages the export would fault in, not allocate
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
    if spec["modelopt"]:
        import modelopt.torch.quantization as mtq

        model.config.architectures = [type(model).__name__]
        calib = torch.arange(32).reshape(1, 32) % spec["vocab"]
        mtq.quantize(model, getattr(mtq, spec["modelopt"]), lambda m: m(input_ids=calib, use_cache=False))
    else:
        oe.quantize_weights(model, **spec["quantize"])
    sources = [info.nbytes for info in oe.layout(model).values()]
    base = _kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    report = oe.save_clean(model, f"{work}/out", **spec["export"])
    print(json.dumps({"peak_extra": (_kib("VmHWM") - base) * 1024, "bytes": report.bytes,
                      "largest": report.largest_tensor, "largest_source": max(sources),
                      "model_bytes": sum(sources), "folded": report.folded}))


if __name__ == "__main__":
    _child(sys.argv[1], json.loads(sys.argv[2]))
