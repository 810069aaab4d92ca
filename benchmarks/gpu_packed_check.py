"""GPU check of ``save_clean(format="modelopt")``: packed export of offloaded models vs ModelOpt's own exports.

For each shape (Qwen3-0.6B, offloaded to CPU with ``max_memory={0: "500MiB"}``; Qwen3-4B, spread over
GPU, CPU and disk with ``max_memory={0: "2GiB", "cpu": "3GiB"}`` + ``offload_folder``; a Qwen3-MoE shape,
``moe``: hidden 2048, 32 fused experts of 768, top-4, 16 layers, 6.2 GB bf16, over GPU + CPU + disk with
``max_memory={0: "2GiB", "cpu": "2GiB"}`` + ``offload_folder``) and each ModelOpt config (NVFP4, FP8,
INT4 AWQ, NVFP4 AWQ; AWQ on fused experts fails in ModelOpt's own export and is refused by ours):

1. the model kept resident on the GPU is quantized and exported with ModelOpt's ``export_hf_checkpoint``
   (the reference: its resident path);
2. the offloaded model is quantized the same way, exported with ``save_clean(format="modelopt")``
   (time, peak host RSS / RssAnon over the call, GPU peak), compared tensor by tensor with the reference,
   its logits checked unchanged;
3. ModelOpt's ``export_hf_checkpoint`` of the same offloaded model (its 0.47 streaming path) is timed and
   measured the same way and compared too; then whether the model still runs.

Prints a compact table and writes ``gpu_packed_check_<shapes>.json``.

Usage (on the GPU machine, modelopt installed from wheels; one shape per call keeps each under 10 min):
    python benchmarks/gpu_packed_check.py --shapes 0.6b            # NVFP4, FP8, INT4 AWQ + NVFP4 AWQ
    python benchmarks/gpu_packed_check.py --shapes 4b --out $OUT   # NVFP4, FP8, INT4 AWQ
    python benchmarks/gpu_packed_check.py --shapes moe --configs NVFP4_DEFAULT_CFG,FP8_DEFAULT_CFG --out $OUT
    options: [--configs A,B] [--nvfp4-awq-shapes 0.6b] [--layers N] (fewer layers for a quick run)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

import offload_export as oe
from gpu_check import read_all  # the same reader as the fake-quant GPU check

SHAPES = {
    "0.6b": dict(config=dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16),
                 max_memory={0: "500MiB", "cpu": "64GiB"}, disk=False),
    "4b": dict(config=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
               max_memory={0: "2GiB", "cpu": "3GiB"}, disk=True),
    "moe": dict(config=dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=32,
                            num_experts_per_tok=4, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=4,
                            head_dim=128, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
                max_memory={0: "2GiB", "cpu": "2GiB"}, disk=True, moe=True),
}
VOCAB = 151936


def config(shape: str, layers: int | None) -> Qwen3Config | Qwen3MoeConfig:
    c = dict(SHAPES[shape]["config"])
    if layers:
        c["num_hidden_layers"] = layers
    if SHAPES[shape].get("moe"):
        return Qwen3MoeConfig(vocab_size=VOCAB, **c)
    return Qwen3Config(vocab_size=VOCAB, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, **c)


def build_checkpoint(path: Path, cfg: Qwen3Config) -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


class PeakRSS:
    """Peak VmRSS and RssAnon above the value at entry, sampled every 5 ms in a thread; ``peak_at``: when RssAnon
    peaked (``time.perf_counter()``; None while it has not grown)."""

    def __enter__(self):
        self.base = self._read()
        self.peak = dict(self.base)
        self.peak_at = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self._sample()

    def _sample(self) -> dict[str, int]:
        """Read the process's memory now, note the peaks; return the reading."""
        now = self._read()
        for k, v in now.items():
            if k == "RssAnon" and v > self.peak[k]:
                self.peak_at = time.perf_counter()
            self.peak[k] = max(self.peak[k], v)
        return now

    @staticmethod
    def _read() -> dict[str, int]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
        return out

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.delta_mb = {k: round((self.peak[k] - self.base[k]) / 2**20) for k in self.base}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def compare(actual: Path, expected: Path) -> dict:
    a, e = read_all(actual), read_all(expected)
    bad = [k for k in e if k not in a or a[k].dtype != e[k].dtype or a[k].shape != e[k].shape
           or not torch.equal(_bytes(a[k]), _bytes(e[k]))]
    files = {}
    for name in ("hf_quant_config.json", "config.json"):
        fa, fe = actual / name, expected / name
        if fe.exists():
            ja, je = json.loads(fa.read_text()) if fa.exists() else {}, json.loads(fe.read_text())
            files[name] = ja == je if name != "config.json" else \
                ja.get("quantization_config") == je.get("quantization_config")
    return {"tensors": len(e), "mismatched": len(bad), "missing": len(set(e) - set(a)),
            "extra": len(set(a) - set(e)), "example": bad[:3], "same_files": files}


def calib_loop():
    ids = torch.randint(0, VOCAB, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
    return lambda m: m(input_ids=ids, use_cache=False)


@torch.no_grad()
def logits(model) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1)).cuda()
    return model(input_ids=ids, use_cache=False).logits.float().cpu()


def offloaded(src: Path, shape: str, work: Path):
    spec = SHAPES[shape]
    kwargs = {"offload_folder": str(work / "offload")} if spec["disk"] else {}
    model = AutoModelForCausalLM.from_pretrained(src, device_map="auto", max_memory=spec["max_memory"],
                                                 dtype=torch.bfloat16, **kwargs)
    model.config.architectures = [type(model).__name__]
    return model, oe.layout(model).summary()


def timed(fn):
    torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        t = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t
    return {"s": round(seconds, 2), "host_peak_MB": rss.delta_mb,
            "gpu_peak_MB": round(torch.cuda.max_memory_allocated() / 2**20)}


def case(src: Path, work: Path, shape: str, cfg_name: str) -> dict:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    qcfg = getattr(mtq, cfg_name)
    row: dict = {"shape": shape, "config": cfg_name}
    resident = AutoModelForCausalLM.from_pretrained(src, device_map={"": 0}, dtype=torch.bfloat16)
    resident.config.architectures = [type(resident).__name__]
    mtq.quantize(resident, copy.deepcopy(qcfg), calib_loop())
    reference_logits = logits(resident)
    row["modelopt_resident"] = timed(lambda: export_hf_checkpoint(resident, export_dir=work / "modelopt_resident"))
    resident = None  # noqa: F841  (freed before the offloaded model is loaded)
    torch.cuda.empty_cache()

    model, row["layout"] = offloaded(src, shape, work)
    mtq.quantize(model, copy.deepcopy(qcfg), calib_loop())
    fq_logits = logits(model)
    row["offloaded_vs_resident_fq_logits_max_diff"] = float((fq_logits - reference_logits).abs().max())
    row["ours"] = timed(lambda: oe.save_clean(model, work / "ours", format="modelopt"))
    row["ours_vs_modelopt_resident"] = compare(work / "ours", work / "modelopt_resident")
    row["ours_model_unchanged_logits"] = bool(torch.equal(logits(model), fq_logits))
    try:
        row["modelopt_streaming"] = timed(lambda: export_hf_checkpoint(model, export_dir=work / "modelopt_streaming"))
        row["modelopt_streaming_vs_resident"] = compare(work / "modelopt_streaming", work / "modelopt_resident")
        row["ours_vs_modelopt_streaming"] = compare(work / "ours", work / "modelopt_streaming")
    except Exception as e:  # part of what is measured
        row["modelopt_streaming"] = f"raised {type(e).__name__}: {str(e)[:200]}"
    try:
        row["modelopt_streaming_model_usable_after"] = bool(torch.allclose(logits(model), fq_logits))
    except Exception as e:
        row["modelopt_streaming_model_usable_after"] = f"raised {type(e).__name__}"
    model = None  # noqa: F841
    torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    head = f"{'shape':5} {'config':22} {'ours s':>7} {'ours RSS/anon MB':>17} {'MO-stream s':>11} " \
           f"{'MO-stream RSS/anon MB':>21} {'MO-res s':>8} {'=resident':>10} {'=stream':>8} {'model ok':>8}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['shape']:5} {r['config']:22} ERROR {r['error'][:100]}")
            continue
        ours, ms = r["ours"], r.get("modelopt_streaming")
        ms_s = f"{ms['s']:>11}" if isinstance(ms, dict) else f"{'raised':>11}"
        ms_m = f"{ms['host_peak_MB']['VmRSS']}/{ms['host_peak_MB']['RssAnon']}" if isinstance(ms, dict) else "-"
        eq = r["ours_vs_modelopt_resident"]
        eq_s = r.get("ours_vs_modelopt_streaming", {})
        lines.append(f"{r['shape']:5} {r['config']:22} {ours['s']:>7} "
                     f"{str(ours['host_peak_MB']['VmRSS']) + '/' + str(ours['host_peak_MB']['RssAnon']):>17} "
                     f"{ms_s} {ms_m:>21} {r['modelopt_resident']['s']:>8} "
                     f"{str(eq['tensors'] - eq['mismatched']) + '/' + str(eq['tensors']):>10} "
                     f"{(str(eq_s['tensors'] - eq_s['mismatched']) + '/' + str(eq_s['tensors'])) if eq_s else '-':>8} "
                     f"{str(r['ours_model_unchanged_logits']):>8}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0.6b,4b")
    ap.add_argument("--configs", default="NVFP4_DEFAULT_CFG,FP8_DEFAULT_CFG,INT4_AWQ_CFG")
    ap.add_argument("--nvfp4-awq-shapes", default="0.6b", help="shapes that also run NVFP4_AWQ_LITE_CFG ('' for none)")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (quick runs)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--src", default=None, help="reuse the checkpoint there (built there when missing; one shape)")
    args = ap.parse_args()
    import modelopt

    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "modelopt": modelopt.__version__,
              "transformers": __import__("transformers").__version__, "rows": []}
    for shape in args.shapes.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"packed_{shape}_"))
        src = Path(args.src) if args.src else work / "src"
        if not (src / "config.json").exists():
            build_checkpoint(src, config(shape, args.layers))
        configs = [c for c in args.configs.split(",") if c]
        configs += ["NVFP4_AWQ_LITE_CFG"] if shape in args.nvfp4_awq_shapes.split(",") else []
        for cfg_name in configs:
            case_dir = work / cfg_name
            case_dir.mkdir()
            try:
                row = case(src, case_dir, shape, cfg_name)
            except Exception as e:
                row = {"shape": shape, "config": cfg_name, "error": f"{type(e).__name__}: {e}",
                       "trace": traceback.format_exc()[-1500:]}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(case_dir, ignore_errors=True)
            torch.cuda.empty_cache()
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"gpu_packed_check_{args.shapes.replace(',', '_')}.json").write_text(json.dumps(result, indent=2))
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
