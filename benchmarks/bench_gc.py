"""What the collector's full passes cost an export, with and without the older objects frozen (CPU).

    python benchmarks/bench_gc.py [--layers 16] [--rounds 4] [--out benchmarks/results/gc_cpu.json]

A Qwen3-MoE-shaped model (32 fused experts per layer, hidden 256) quantized with ModelOpt's NVFP4 on the CPU,
resident; ``save_clean(format="modelopt")`` timed in one process, alternating the export as shipped (objects
older than the call frozen, ``offload_export._process``) and the same export with ``gc.freeze`` made a no-op.
Per export: seconds, time to the first byte written, and the collector's time by generation (``gc.callbacks``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import offload_export as oe
from offload_export import writer
from offload_export.quiet import quiet_libraries


def build(layers: int):
    import modelopt.torch.quantization as mtq

    cfg = Qwen3MoeConfig(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=32,
                         num_experts_per_tok=4, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, vocab_size=512, norm_topk_prob=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    with quiet_libraries():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        model.config.architectures = [type(model).__name__]
        ids = torch.randint(0, 512, (4, 64))
        mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), lambda m: m(input_ids=ids, use_cache=False))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/gc_cpu.json")
    args = ap.parse_args()
    model = build(args.layers)
    pauses: list[list] = []
    gc.callbacks.append(lambda phase, info: pauses.append([time.perf_counter(), info["generation"]])
                        if phase == "start" else pauses[-1].append(time.perf_counter()))
    first: list[float] = []
    pwrite = writer._pwrite_all
    writer._pwrite_all = lambda *a: (first or first.append(time.perf_counter()), pwrite(*a))[1]
    freeze, rows = gc.freeze, []
    for r in range(args.rounds):
        for frozen in ((True, False) if r % 2 == 0 else (False, True)):
            gc.freeze = freeze if frozen else (lambda: None)
            pauses.clear(), first.clear()
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                oe.save_clean(model, Path(d) / "out", format="modelopt")
                seconds = time.perf_counter() - t
            by_gen = {g: round(sum(e - s for s, gen, e in pauses if gen == g), 3) for g in (0, 1, 2)}
            rows.append({"frozen": frozen, "round": r, "s": round(seconds, 3), "ttfb_s": round(first[0] - t, 3),
                         "objects": len(gc.get_objects()), "gc_s_by_generation": by_gen,
                         "full_passes": sum(1 for _, g, _ in pauses if g == 2)})
    gc.freeze = freeze
    print("| objects older than the export | s | ttfb s | full passes | their s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {'frozen' if row['frozen'] else 'not frozen'} | {row['s']} | {row['ttfb_s']} | {row['full_passes']} | "
              f"{row['gc_s_by_generation'][2]} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"layers": args.layers, "objects_at_start": rows[0]["objects"], "rows": rows},
                                         indent=1))


if __name__ == "__main__":
    main()
