"""NVFP4 weight packing: ModelOpt's functions (as its export calls them) against ``offload_export.formats._nvfp4``.

    python benchmarks/bench_nvfp4_pack.py [--rounds 5] [--devices cpu,cuda] [--out benchmarks/results/nvfp4_pack_cpu.json]

Every linear shape of one Qwen3-4B layer (bf16, per-tensor scale from the weight's amax), packed on each device as
``format="modelopt"`` packs a linear: on the CPU in row chunks of 2 MiB, on a GPU whole. Per shape and method: the
median seconds over ``--rounds`` (after one warm-up), on a GPU also the seconds until the calls return (what the
pack thread waits; the rest runs on the GPU behind it) and the synchronising calls made (torch's sync debug mode).
Both methods' bits are compared before timing. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from modelopt.torch.export.quant_utils import to_quantized_weight
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

from offload_export.formats._nvfp4 import pack

SHAPES = {"q_proj": (4096, 2560), "k_proj": (1024, 2560), "o_proj": (2560, 4096), "gate_proj": (9728, 2560),
          "down_proj": (2560, 9728)}  # Qwen3-4B; v_proj as k_proj, up_proj as gate_proj
CPU_CHUNK_BYTES = 2 * 2**20  # format="modelopt"'s row chunk on the CPU


def modelopt(weight: torch.Tensor, block: int, scale_2: torch.Tensor, dtype: torch.dtype):
    per_block = NVFP4QTensor.get_weights_scaling_factor(weight, block, weights_scaling_factor_2=scale_2)[0]
    return to_quantized_weight(weight.to(dtype), per_block, "nvfp4", scale_2, block), per_block


METHODS = {"modelopt": modelopt, "offload_export": pack}


def chunks(weight: torch.Tensor) -> list[torch.Tensor]:
    rows = weight.shape[0] if weight.is_cuda else max(1, CPU_CHUNK_BYTES // (weight.shape[1] * weight.element_size()))
    return [weight[r:r + rows] for r in range(0, weight.shape[0], rows)]


def run(method, weight: torch.Tensor, scale_2: torch.Tensor) -> tuple[float, float, int]:
    """Seconds in all, seconds until the calls returned, synchronising calls."""
    sync = weight.is_cuda
    if sync:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rows in chunks(weight):
            method(rows, 16, scale_2, torch.bfloat16)
    returned = time.perf_counter() - start
    if sync:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return time.perf_counter() - start, returned, syncs


def measure(device: str, rounds: int) -> list[dict]:
    rows_out = []
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        weight = torch.randn(shape, dtype=torch.bfloat16, device=device)
        scale_2 = weight.float().abs().amax() / (6 * 448)
        bits = [torch.cat([t.view(torch.uint8).flatten() for t in METHODS[m](weight, 16, scale_2, torch.bfloat16)])
                for m in METHODS]
        same = torch.equal(*bits)
        for method, fn in METHODS.items():
            run(fn, weight, scale_2)  # warm-up
            times = [run(fn, weight, scale_2) for _ in range(rounds)]
            rows_out.append({"device": device, "linear": name, "shape": list(shape), "method": method,
                             "s": statistics.median(t[0] for t in times),
                             "s_returned": statistics.median(t[1] for t in times),
                             "syncs": times[0][2], "bits_equal": same})
    return rows_out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--devices", default="cpu,cuda")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "nvfp4_pack_cpu.json")
    args = p.parse_args()
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    rows = [r for d in devices for r in measure(d, args.rounds)]
    print(f"{'device':6} {'linear':10} {'method':15} {'ms':>8} {'ms returned':>12} {'syncs':>6} {'x ModelOpt':>10} bits")
    for r in rows:
        base = next(b for b in rows if b["device"] == r["device"] and b["linear"] == r["linear"]
                    and b["method"] == "modelopt")
        print(f"{r['device']:6} {r['linear']:10} {r['method']:15} {r['s'] * 1e3:8.1f} {r['s_returned'] * 1e3:12.1f} "
              f"{r['syncs']:6d} {r['s'] / base['s']:10.2f} {'same' if r['bits_equal'] else 'DIFFER'}")
    meta = {"torch": torch.__version__, "machine": platform.machine(), "cpus": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if "cuda" in devices else None, "rounds": args.rounds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
