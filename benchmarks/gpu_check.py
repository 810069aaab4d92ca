"""GPU validation: the upstream-reported case (Qwen3-0.6B shape, most layers CPU-offloaded) on one GPU.

For ModelOpt NVFP4 and FP8: quantize the offloaded model, export with ``save_clean``, and compare every
folded tensor with ModelOpt's own export of the same model kept fully on the GPU; ModelOpt's export of
the offloaded model is compared too. Then the built-in ``nvfp4`` is timed against the host->device and
disk-write bandwidths. Prints a table and writes ``gpu_check.json``.

Usage: python benchmarks/gpu_check.py [--layers 28] [--out DIR] [--schemes NVFP4_DEFAULT_CFG,FP8_DEFAULT_CFG]
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
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen3Config

import offload_export as oe

MAX_MEMORY = {0: "500MiB", "cpu": "64GiB"}


def qwen3_06b(layers: int) -> Qwen3Config:
    return Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)


def build_checkpoint(path: Path, layers: int) -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(qwen3_06b(layers), dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("model*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def compare(actual: Path, expected: Path) -> dict:
    a, e = read_all(actual), read_all(expected)
    mismatched = [k for k in e if k not in a or a[k].shape != e[k].shape or not torch.equal(a[k], e[k])]
    return {"tensors": len(e), "mismatched": len(mismatched), "missing": len(set(e) - set(a)),
            "extra": len(set(a) - set(e)), "example": mismatched[:3]}


def offloaded(src: Path):
    model = AutoModelForCausalLM.from_pretrained(src, device_map="auto", max_memory=MAX_MEMORY, dtype=torch.bfloat16)
    params = dict(model.named_parameters(remove_duplicate=False))
    n_meta = sum(p.device.type == "meta" for p in params.values())
    return model, f"{n_meta} of {len(params)} parameters offloaded"


def calib_loop(vocab: int):
    ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
    return lambda m: m(input_ids=ids, use_cache=False)


@torch.no_grad()
def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1)).cuda()
    return model(input_ids=ids, use_cache=False).logits.float().cpu()


def modelopt_case(src: Path, work: Path, cfg_name: str, vocab: int) -> dict:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export.plugins.vllm_fakequant_hf import export_hf_vllm_fq_checkpoint

    qcfg = getattr(mtq, cfg_name)
    row: dict = {"case": f"modelopt {cfg_name}"}
    resident = AutoModelForCausalLM.from_pretrained(src, device_map={"": 0}, dtype=torch.bfloat16)
    mtq.quantize(resident, qcfg, calib_loop(vocab))
    reference_logits = logits(resident, vocab)
    t = time.perf_counter()
    export_hf_vllm_fq_checkpoint(resident, work / "modelopt_resident")
    row["modelopt_resident_s"] = round(time.perf_counter() - t, 2)
    del resident
    torch.cuda.empty_cache()

    model, row["layout"] = offloaded(src)
    mtq.quantize(model, qcfg, calib_loop(vocab))
    fq_logits = logits(model, vocab)
    row["offloaded_vs_resident_fq_logits_max_diff"] = float((fq_logits - reference_logits).abs().max())
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    report = oe.save_clean(model, work / "ours")
    row["ours_s"] = round(time.perf_counter() - t, 2)
    row["ours_GBps"] = round(report.bytes / 1e9 / row["ours_s"], 3)
    row["ours_gpu_peak_MB"] = round(torch.cuda.max_memory_allocated() / 2**20)
    row["ours_vs_modelopt_resident"] = compare(work / "ours", work / "modelopt_resident")
    row["model_unchanged_logits"] = bool(torch.equal(logits(model, vocab), fq_logits))
    try:
        export_hf_vllm_fq_checkpoint(model, work / "modelopt_offloaded")
        row["modelopt_offloaded_vs_resident"] = compare(work / "modelopt_offloaded", work / "modelopt_resident")
    except Exception as e:  # the failure being measured
        row["modelopt_offloaded_vs_resident"] = f"raised {type(e).__name__}: {str(e)[:160]}"
    try:
        row["modelopt_model_usable_after_its_export"] = bool(torch.allclose(logits(model, vocab), fq_logits))
    except Exception as e:
        row["modelopt_model_usable_after_its_export"] = f"raised {type(e).__name__}"
    del model
    torch.cuda.empty_cache()
    reloaded = AutoModelForCausalLM.from_pretrained(work / "ours", device_map={"": 0}, dtype=torch.bfloat16)
    row["reload_vs_fq_logits_max_diff"] = float((logits(reloaded, vocab) - reference_logits).abs().max())
    del reloaded
    return row


def bandwidths(work: Path) -> dict:
    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    h2d = 3 * n / (time.perf_counter() - t) / 1e9
    buf = os.urandom(64 << 20)
    path = work / "disk_probe.bin"
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(32):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    disk = 32 * len(buf) / (time.perf_counter() - t) / 1e9
    path.unlink()
    return {"h2d_pinned_GBps": round(h2d, 2), "disk_write_fsync_GBps": round(disk, 2)}


def builtin_case(src: Path, work: Path, scheme: str, floor: float) -> dict:
    model, layout_note = offloaded(src)
    oe.quantize_weights(model, scheme=scheme)
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    report = oe.save_clean(model, work / f"builtin_{scheme}")
    seconds = time.perf_counter() - t
    gbps = report.bytes / 1e9 / seconds
    return {"case": f"built-in {scheme}", "layout": layout_note, "ours_s": round(seconds, 2),
            "ours_GBps": round(gbps, 3), "fraction_of_floor": round(gbps / floor, 3),
            "ours_gpu_peak_MB": round(torch.cuda.max_memory_allocated() / 2**20), "folded": len(report.folded)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--schemes", default="NVFP4_DEFAULT_CFG,FP8_DEFAULT_CFG")
    ap.add_argument("--builtin", default="nvfp4,int8")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "rows": []}
    try:
        import modelopt
        result["modelopt"] = modelopt.__version__
    except ImportError:
        result["modelopt"] = None
    src = work / "src"
    build_checkpoint(src, args.layers)
    result.update(bandwidths(work))
    floor = min(result["h2d_pinned_GBps"], result["disk_write_fsync_GBps"])
    cases = [("modelopt", s) for s in args.schemes.split(",") if s and result["modelopt"]]
    cases += [("builtin", s) for s in args.builtin.split(",") if s]
    for kind, scheme in cases:
        case_dir = work / f"{kind}_{scheme}"
        case_dir.mkdir()
        try:
            row = modelopt_case(src, case_dir, scheme, 151936) if kind == "modelopt" else \
                builtin_case(src, case_dir, scheme, floor)
        except Exception as e:
            row = {"case": f"{kind} {scheme}", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(case_dir, ignore_errors=True)
        torch.cuda.empty_cache()
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
