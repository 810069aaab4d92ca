"""Export a fake-quantized, offloaded model with several processes: each rank writes part of the shards.

    torchrun --nproc-per-node 8 examples/distributed_export.py /path/to/checkpoint out/

Every rank loads the same model (here: the GPU part on its own GPU, the rest offloaded to CPU and disk),
applies the same quantization, and calls ``save_clean``: the shards are split across the ranks, and rank 0
commits one checkpoint, byte-for-byte what a single process would have written. If any rank fails, every
rank raises and nothing is left behind. Use ``--backend gloo`` on a machine without GPUs.
"""

import argparse
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import offload_export as oe
from offload_export.adapters.builtin import quantize_weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    parser.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--gpu-memory", default="20GiB", help="what each rank keeps on its GPU; the rest is offloaded")
    args = parser.parse_args()

    local_rank = int(os.environ["LOCAL_RANK"])
    if args.backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(args.backend)
    device_map_budget = {local_rank: args.gpu_memory, "cpu": "64GiB"} if args.backend == "nccl" else None
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, dtype=torch.bfloat16, device_map="auto" if device_map_budget else None,
        max_memory=device_map_budget, offload_folder=f"/tmp/offload-rank{dist.get_rank()}")
    quantize_weights(model, "int8")  # or your toolkit's PTQ (ModelOpt, llm-compressor); identical on every rank

    report = oe.save_clean(model, args.out_dir, max_shard_size="5GB")  # every rank calls it; they split the shards
    if dist.get_rank() == 0:
        print(report)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
