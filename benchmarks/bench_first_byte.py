"""The Python an export runs before its first byte and before its first quantized linear, per package version.

    python benchmarks/bench_first_byte.py [--layers 36] [--hidden 256] [--vocab 1024] [--rounds 7]
                                          [--config NVFP4_DEFAULT_CFG] [--experts 0] [--out F] [DIR ...]

A Qwen3 (``--experts N``: a Qwen3-MoE of N fused experts a layer) of ``--layers`` layers, quantized by ModelOpt on the
CPU and kept resident, is exported with ``format="modelopt"``. At the default width (hidden 256) its bytes are few, so
the time is the export's Python (the model's layer and module counts set it, not its widths); wider, the packing and
the writes count too. A large ``--vocab`` gives the (tied, unquantized) embedding written first while the groups are
traced, as in a real model (Qwen3-4B: 0.78 GB). Per round and package (interleaved, odd rounds reversed; round 0 pays
for first-call work and is left out): the time to the first byte written (the writer's first write call:
``gpu_big.FirstWrite``), to the first quantized module's outputs made (``first_linear``), the total, and the seconds
(summed over their calls) of the stages the package has: ``prepare_job`` (layout, quantizers, the format and its packer,
the plan), ``plan_facts`` (the resume facts), parts of ``prepare_job`` (``layout``, ``find_quantizers``,
``format_state``: the ModelOpt packer's state read up front, of which ``snapshot``: the quantized modules' copies;
``plan_export``: the plan, with every unit's output names and shapes), ``hub_names`` (ModelOpt's hub-name rules on
each unit's outputs: at plan time, and at pack time where the package does not reuse the plan's names), and the
shared-input groups' trace and fusion (after the first byte: on a background thread beside the first units, whose time
the first quantized pack's wait for it adds to ``groups_fused``; in older packages, by that pack). Each DIR holds an
``offload_export`` package (``git archive REV offload_export | tar -x -C DIR``); the installed one by default. Prints
a table of medians (min-max) and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_writer_beside  # noqa: E402  (its package loader)
from gpu_big import FirstWrite  # noqa: E402

STAGES = {"prepare_job": ("export", "prepare_job"), "plan_facts": ("export", "plan_facts"),
          "groups_traced": ("formats._modelopt_replay", "shared_input_groups"),
          "groups_fused": ("formats.modelopt", "ModelOptPacker._fuse_groups"),
          # parts of prepare_job
          "layout": ("job", "layout"), "find_quantizers": ("job", "find_quantizers"),
          "format_state": ("formats.modelopt", "ModelOptPacker.__init__"),
          "snapshot": ("formats.modelopt", "ModelOptPacker._snapshot"), "plan_export": ("job", "plan_export"),
          # ModelOpt's hub-name rules on each unit's outputs (plan time; pack time too in older packages)
          "hub_names": ("formats.modelopt", "ModelOptPacker._hub_names")}


def load(folder: str | None):
    """``offload_export`` from ``folder`` (the installed package for None), imported afresh with its stages' modules."""
    package = bench_writer_beside.load(folder, "offload_export")
    for module, _ in STAGES.values():
        importlib.import_module(f"offload_export.{module}")
    return package


def timed(times: dict[str, float]) -> None:
    """Wrap each stage the freshly loaded package has so that its seconds add up in ``times``."""
    for stage, (module, attr) in STAGES.items():
        owner = sys.modules[f"offload_export.{module}"]
        *path, name = attr.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        fn = getattr(owner, name, None)
        if fn is None:
            continue

        @functools.wraps(fn)
        def wrapper(*args, _fn=fn, _stage=stage, **kwargs):
            start = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                times[_stage] = times.get(_stage, 0.0) + time.perf_counter() - start
        setattr(owner, name, wrapper)
        if module == "formats._modelopt_replay":  # imported by name into the packer's module
            setattr(sys.modules["offload_export.formats.modelopt"], name, wrapper)


def first_linear() -> list[float]:
    """Wrap the freshly loaded packer's ``pack`` so that the returned list's one item becomes the time its first
    quantized module's outputs were made."""
    packer = sys.modules["offload_export.formats.modelopt"].ModelOptPacker
    pack, when = packer.pack, [float("nan")]

    @functools.wraps(pack)
    def wrapper(self, module, *args, **kwargs):
        out = pack(self, module, *args, **kwargs)
        if module in self.modules and when[0] != when[0]:
            when[0] = time.perf_counter()
        return out
    packer.pack = wrapper
    return when


def model_of(layers: int, hidden: int, vocab: int, config: str, experts: int = 0) -> torch.nn.Module:
    """A Qwen3 (a Qwen3-MoE of ``experts`` fused experts a layer, 4 routed, each of intermediate ``hidden / 2``)
    quantized by ModelOpt with ``config`` on the CPU."""
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    shape = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                 num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128), head_dim=64,
                 vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=64)
    cfg = (Qwen3MoeConfig(num_experts=experts, num_experts_per_tok=4, moe_intermediate_size=hidden // 2, **shape)
           if experts else Qwen3Config(**shape))
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    calib = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    mtq.quantize(model, copy.deepcopy(getattr(mtq, config)), lambda m: m(input_ids=calib, use_cache=False))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packages", nargs="*", help="folders holding an offload_export package (default: the installed)")
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (intermediate: twice it)")
    ap.add_argument("--vocab", type=int, default=1024, help="vocabulary size (the tied embedding's rows)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--config", default="NVFP4_DEFAULT_CFG", help="a ModelOpt config name")
    ap.add_argument("--experts", type=int, default=0, help="a Qwen3-MoE of this many fused experts a layer")
    ap.add_argument("--out", default="first_byte.json")
    args = ap.parse_args()
    model = model_of(args.layers, args.hidden, args.vocab, args.config, args.experts)
    packages = args.packages or [None]
    runs: dict[str, list[dict[str, float]]] = {}
    work = Path(tempfile.mkdtemp(prefix="first_byte_"))
    try:
        for r in range(args.rounds):
            for folder in packages if r % 2 == 0 else packages[::-1]:
                oe = load(folder)
                times: dict[str, float] = {}
                timed(times)
                linear = first_linear()
                with FirstWrite() as first:
                    start = time.perf_counter()
                    oe.save_clean(model, work / "out", format="modelopt")
                    end = time.perf_counter()
                shutil.rmtree(work / "out")
                if r:
                    runs.setdefault(Path(folder).name if folder else "installed", []).append(
                        {"first_byte": first.t - start, "first_linear": linear[0] - start, "total": end - start,
                         **times})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    columns = ["first_byte", "first_linear", "total", *STAGES]
    rows = {name: {c: [round(x[c], 4) for x in xs if c in x] for c in columns} for name, xs in runs.items()}
    kind = f"Qwen3-MoE of {args.experts} experts" if args.experts else "Qwen3"
    print(f"{args.layers}-layer {kind} (hidden {args.hidden}, vocabulary {args.vocab}), {args.config}, "
          f"rounds 1-{args.rounds - 1}, {os.cpu_count()} cores; median (min-max) s")
    print("| package | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, cols in rows.items():
        cells = [f"{statistics.median(v):.3f} ({min(v):.3f}-{max(v):.3f})" if v else "-" for v in cols.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")
    Path(args.out).write_text(json.dumps({"layers": args.layers, "hidden": args.hidden, "vocab": args.vocab,
                                          "experts": args.experts,
                                          "config": args.config,
                                          "rounds": args.rounds, "cores": os.cpu_count(), "seconds": rows}, indent=2)
                              + "\n")


if __name__ == "__main__":
    main()
