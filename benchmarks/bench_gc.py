"""What the collector's full passes cost an export, as shipped and without the collector settings (CPU).

    python benchmarks/bench_gc.py [--layers 16] [--rounds 4] [--froze-at-start] [--out benchmarks/results/gc_cpu.json]

A Qwen3-MoE-shaped model (32 fused experts per layer, hidden 256) quantized with ModelOpt's NVFP4 on the CPU,
resident; ``save_clean(format="modelopt")`` timed in one process, alternating the export as shipped (no full pass,
objects older than the call frozen: ``offload_export._process``) and the same export with ``gc.freeze`` made a
no-op and the collector's thresholds left as they are. ``--froze-at-start``: the process freezes the objects it has
before importing anything (a few thousand), as the GPU machine's Python had (a few hundred), so the export's freeze
is skipped. Per export: seconds, time to the first byte written, and the collector's time by generation
(``gc.callbacks``).
"""

from __future__ import annotations

import gc
import sys

if "--froze-at-start" in sys.argv:
    gc.freeze()

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

import offload_export as oe
from offload_export import _process, writer
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
    ap.add_argument("--froze-at-start", action="store_true", help="objects frozen before any import (read above)")
    ap.add_argument("--out", default="benchmarks/results/gc_cpu.json")
    args = ap.parse_args()
    model = build(args.layers)
    pauses: list[list] = []
    gc.callbacks.append(lambda phase, info: pauses.append([time.perf_counter(), info["generation"]])
                        if phase == "start" else pauses[-1].append(time.perf_counter()))
    first: list[float] = []
    pwrite = writer._pwrite_all
    writer._pwrite_all = lambda *a: (first or first.append(time.perf_counter()), pwrite(*a))[1]
    freeze, no_full_pass, rows = gc.freeze, _process._NO_FULL_PASS, []
    for r in range(args.rounds):
        for shipped in ((True, False) if r % 2 == 0 else (False, True)):
            gc.freeze = freeze if shipped else (lambda: None)
            _process._NO_FULL_PASS = no_full_pass if shipped else gc.get_threshold()[2]
            pauses.clear(), first.clear()
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                oe.save_clean(model, Path(d) / "out", format="modelopt")
                seconds = time.perf_counter() - t
            by_gen = {g: round(sum(e - s for s, gen, e in pauses if gen == g), 3) for g in (0, 1, 2)}
            rows.append({"shipped": shipped, "round": r, "s": round(seconds, 3), "ttfb_s": round(first[0] - t, 3),
                         "objects": len(gc.get_objects()), "gc_s_by_generation": by_gen,
                         "full_passes": sum(1 for _, g, _ in pauses if g == 2)})
    gc.freeze, _process._NO_FULL_PASS = freeze, no_full_pass
    print("| collector settings | s | ttfb s | full passes | their s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {'as shipped' if row['shipped'] else 'none'} | {row['s']} | {row['ttfb_s']} | {row['full_passes']} | "
              f"{row['gc_s_by_generation'][2]} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"layers": args.layers, "froze_at_start": args.froze_at_start,
                                          "objects_at_start": rows[0]["objects"], "rows": rows},
                                         indent=1))


if __name__ == "__main__":
    main()
