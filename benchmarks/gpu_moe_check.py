"""GPU check of the fused-expert MoE export: a Qwen3-MoE shape quantized by ModelOpt, offloaded over GPU + CPU + disk.

The model (hidden 2048, 32 experts of 768, top-4, 16 layers, vocab 151936; 6.2 GB bf16) is built on the GPU and
saved, then (1) quantized resident and exported by ModelOpt's fake-quant exporter, the reference, and (2) loaded
with ``max_memory={0: "2GiB", "cpu": "2GiB"}`` + an offload folder, quantized the same way and exported by
``save_clean``: every tensor must equal the reference, and the model must compute the same logits afterwards.
Prints one JSON row per config and writes ``gpu_moe_check.json``.

Usage: python benchmarks/gpu_moe_check.py [--layers 16] [--configs NVFP4_DEFAULT_CFG] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch
from gpu_check import calib_loop, compare, logits
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import offload_export as oe

VOCAB = 151936
MAX_MEMORY = {0: "2GiB", "cpu": "2GiB"}


def config(layers: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=32, num_experts_per_tok=4, num_hidden_layers=layers, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, decoder_sparse_step=1, mlp_only_layers=[],
                          tie_word_embeddings=False)


def build(path: Path, layers: int) -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config(layers), dtype=torch.bfloat16)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def rss_peak_probe():
    """Peak VmRSS growth of this process while the returned context runs (sampled every 5 ms)."""
    import threading
    from contextlib import contextmanager

    def rss() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    @contextmanager
    def probe(box: dict):
        base, stop = rss(), threading.Event()
        box["peak"] = 0

        def sample():
            while not stop.wait(0.005):
                box["peak"] = max(box["peak"], rss() - base)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
    return probe


def case(src: Path, work: Path, cfg_name: str) -> dict:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.plugins.vllm_fakequant_hf import export_hf_vllm_fq_checkpoint

    probe = rss_peak_probe()
    qcfg = getattr(mtq, cfg_name)
    row: dict = {"case": f"qwen3-moe modelopt {cfg_name}"}
    resident = AutoModelForCausalLM.from_pretrained(src, device_map={"": 0}, dtype=torch.bfloat16)
    mtq.quantize(resident, qcfg, calib_loop(VOCAB))
    reference = logits(resident, VOCAB)
    box: dict = {}
    t = time.perf_counter()
    with probe(box):
        export_hf_vllm_fq_checkpoint(resident, work / "modelopt_resident")
    row["modelopt_resident_s"], row["modelopt_resident_host_peak_MB"] = round(time.perf_counter() - t, 2), box["peak"] >> 20
    del resident
    torch.cuda.empty_cache()

    model = AutoModelForCausalLM.from_pretrained(src, device_map="auto", max_memory=MAX_MEMORY, dtype=torch.bfloat16,
                                                 offload_folder=str(work / "offload"))
    row["layout"] = {k: n for k, (n, _) in oe.layout(model).summary().items()}
    mtq.quantize(model, qcfg, calib_loop(VOCAB))
    before = logits(model, VOCAB)
    row["offloaded_vs_resident_logits_max_diff"] = float((before - reference).abs().max())
    t = time.perf_counter()
    with probe(box):
        report = oe.save_clean(model, work / "ours")
    row["ours_s"], row["ours_host_peak_MB"] = round(time.perf_counter() - t, 2), box["peak"] >> 20
    row["ours_GBps"] = round(report.bytes / 1e9 / row["ours_s"], 3)
    row["ours_vs_modelopt_resident"] = compare(work / "ours", work / "modelopt_resident")
    row["model_unchanged_logits"] = bool(torch.equal(logits(model, VOCAB), before))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--configs", default="NVFP4_DEFAULT_CFG")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu_moe_"))
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "rows": []}
    build(work / "src", args.layers)
    for cfg in args.configs.split(","):
        case_dir = work / cfg
        case_dir.mkdir()
        try:
            row = case(work / "src", case_dir, cfg)
        except Exception as e:
            row = {"case": cfg, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(case_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_moe_check.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
