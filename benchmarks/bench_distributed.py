"""Benchmark save_clean split over torch.distributed ranks: speed-up against the number of ranks.

    python benchmarks/bench_distributed.py                       # CPU, gloo, ranks 1 and 2, ~400 MB
    python benchmarks/bench_distributed.py --backend nccl --ranks 1,2,4,8 --size-mb 4000   # a GPU box

Self-contained. A bf16 Llama-shaped model (untied embeddings, weights from ``torch.randn`` on the GPU when
there is one) is built once and written to a disk-offload folder (accelerate ``.dat`` files). For every
rank count, ``torchrun`` starts that many processes; each builds the same module tree on ``meta``, attaches
the offload folder with ``disk_offload`` (execution device ``cuda:LOCAL_RANK`` on GPU, else CPU),
fake-quantizes every Linear with the built-in int8 scheme (calibration is not timed), then after a barrier
times ``save_clean(model, out, group=WORLD)``. Reported per rank count: wall time (the slowest rank),
GB/s of checkpoint written, each rank's peak GPU memory, and whether every file is byte-identical to the
1-rank export. Results: a table on stdout and JSON in ``benchmarks/results/distributed.json``.
The offload files sit in the page cache after they are written, so this measures the export's own work
(read copies, fold, write, fsync), not a cold disk.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ENV = {"TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


def llama_config(size_mb: float):
    """An untied bf16 LlamaConfig of about ``size_mb`` MB: 1024 hidden, 2816 MLP, layers to fit."""
    from transformers import LlamaConfig

    hidden, mlp, vocab, kv = 1024, 2816, 32000, 512
    per_layer = 2 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp + 2 * hidden)
    layers = max(1, round((size_mb * 1e6 - 2 * 2 * vocab * hidden) / per_layer))
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=kv // 64, tie_word_embeddings=False,
                       dtype="bfloat16")


def _meta_model(config):
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers are not in the offload folder
    return model


def build_offload_folder(config, folder: Path) -> int:
    """Write the model's weights (seeded randn, bf16) as accelerate offload files; return their bytes."""
    from accelerate.utils import offload_state_dict

    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    state = {}
    for name, p in _meta_model(config).state_dict().items():
        state[name] = (torch.randn(p.shape, generator=generator, device=device, dtype=torch.float32) * 0.02
                       ).to(torch.bfloat16).cpu()
    offload_state_dict(str(folder), state)
    return sum(t.numel() * t.element_size() for t in state.values())


def _rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    """One rank under torchrun: attach the offload folder, quantize, time save_clean."""
    import torch.distributed as dist
    from accelerate import disk_offload

    import offload_export as oe
    from offload_export.adapters.builtin import quantize_weights

    local = int(os.environ.get("LOCAL_RANK", 0))
    gpu = torch.cuda.is_available() and args.backend == "nccl"
    if gpu:
        torch.cuda.set_device(local)
    dist.init_process_group(args.backend, device_id=torch.device("cuda", local) if gpu else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local) if gpu else torch.device("cpu")
    model = disk_offload(_meta_model(llama_config(args.size_mb)), str(args.work / "offload"), execution_device=device)
    quantize_weights(model, "int8")
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    start = time.perf_counter()
    report = oe.save_clean(model, args.work / f"out-{world}", max_shard_size=f"{args.shard_mb}MB",
                           group=dist.group.WORLD)
    seconds = time.perf_counter() - start
    stats = {"rank": rank, "seconds": seconds, "rss_anon_mb": _rss_anon_mb(),
             "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if gpu else None,
             "bytes": report.bytes, "shards": report.shards, "notes": report.notes}
    (args.work / f"stats-{world}-{rank}.json").write_text(json.dumps(stats))
    dist.destroy_process_group()


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _run(args, n: int) -> list[dict]:
    """One torchrun of ``n`` ranks; each rank's stats."""
    shutil.rmtree(args.work / f"out-{n}", ignore_errors=True)
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
           "--child", "--backend", args.backend, "--size-mb", str(args.size_mb), "--shard-mb", str(args.shard_mb),
           "--work", str(args.work)]
    subprocess.run(cmd, check=True, env=env)
    return [json.loads((args.work / f"stats-{n}-{r}.json").read_text()) for r in range(n)]


def _floor(work: Path, streams: int) -> dict:
    """The best of the copy floors (``bench_export.io_floor``) over the 1-rank export's shard files -- the
    bytes every export writes -- with ``streams`` files copied at once (one per rank)."""
    sys.path.insert(0, str(HERE))
    import bench_export

    paths = sorted(str(p) for p in (work / "out-1").glob("*.safetensors"))
    best = None
    for method in ("floor_copy_file_range", "floor_sendfile", "floor_pread"):
        dest = work / "floor"
        shutil.rmtree(dest, ignore_errors=True)
        os.sync()
        t = time.perf_counter()
        bench_export.io_floor(method, paths, dest, streams)
        seconds = time.perf_counter() - t
        shutil.rmtree(dest)
        if best is None or seconds < best["seconds"]:
            best = {"method": method, "seconds": seconds}
    return {**best, "streams": streams, "bytes": sum(os.path.getsize(p) for p in paths)}


def launch(args) -> None:
    ranks = sorted({1, *args.ranks})
    args.work.mkdir(parents=True, exist_ok=True)
    config = llama_config(args.size_mb)
    if not (args.work / "offload" / "index.json").exists():
        build_offload_folder(config, args.work / "offload")
        os.sync()  # its dirty pages would otherwise be written back during the first timed run
    runs: dict[int, list[list[dict]]] = {n: [] for n in ranks}
    for _ in range(args.repeats):  # interleaved, so that slow phases of a shared machine hit every rank count
        for n in ranks:
            runs[n].append(_run(args, n))
    floors = {n: _floor(args.work, n) for n in ranks}
    rows = []
    for n in ranks:
        stats = min(runs[n], key=lambda run: max(s["seconds"] for s in run))  # the best repeat
        wall = max(s["seconds"] for s in stats)
        rows.append({"ranks": n, "seconds": wall, "gb_per_s": stats[0]["bytes"] / wall / 1e9,
                     "per_rank_gb_per_s": stats[0]["bytes"] / wall / 1e9 / n,
                     "rank_seconds": [s["seconds"] for s in stats],
                     "repeat_seconds": [max(s["seconds"] for s in run) for run in runs[n]], "rss_anon_mb": [s["rss_anon_mb"] for s in stats],
                     "gpu_peak_mb": [s["gpu_peak_mb"] for s in stats], "shards": stats[0]["shards"],
                     "bytes": stats[0]["bytes"], "split": stats[0]["notes"][0] if n > 1 else "",
                     "identical_to_1_rank": _digest(args.work / f"out-{n}") == _digest(args.work / "out-1")})
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = base / row["seconds"]
        row["floor"] = floors[row["ranks"]]
        row["x_floor"] = row["seconds"] / row["floor"]["seconds"]
    print(f"\n{rows[0]['bytes'] / 1e6:.0f} MB bf16 Llama, int8 folded, {rows[0]['shards']} shards of <= "
          f"{args.shard_mb} MB, backend {args.backend}")
    for n, floor in floors.items():
        print(f"floor, {n} stream(s): {floor['method']} of the 1-rank export's {floor['bytes'] / 1e6:.0f} MB "
              f"+ fsync, {floor['seconds']:.2f} s ({floor['bytes'] / floor['seconds'] / 1e9:.3f} GB/s)")
    print(f"{'ranks':>5} {'wall s':>8} {'GB/s':>7} {'speed-up':>8} {'x floor':>7} {'identical':>9}  GPU peak MB per rank"
          f"  (x floor: against the floor with as many streams as ranks)")
    for row in rows:
        gpu = ", ".join(f"{m:.0f}" for m in row["gpu_peak_mb"]) if row["gpu_peak_mb"][0] is not None else "-"
        print(f"{row['ranks']:>5} {row['seconds']:>8.2f} {row['gb_per_s']:>7.3f} {row['speedup']:>8.2f} "
              f"{row['x_floor']:>7.2f} {str(row['identical_to_1_rank']):>9}  {gpu}")
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "backend": args.backend, "size_mb": args.size_mb, "repeats": args.repeats, "shard_mb": args.shard_mb, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not all(row["identical_to_1_rank"] for row in rows):
        sys.exit("outputs differ from the 1-rank export")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--size-mb", type=float, default=400)
    parser.add_argument("--shard-mb", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=HERE / "out" / "distributed")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "distributed.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.backend == "nccl" and not torch.cuda.is_available():
        parser.error("--backend nccl needs CUDA")
    child(args) if args.child else launch(args)


if __name__ == "__main__":
    main()
