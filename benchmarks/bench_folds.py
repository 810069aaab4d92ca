"""Fold-kernel throughput: the built-in fake quantizers now against two earlier implementations, side by side.

    python benchmarks/bench_folds.py [--repeats 5] [--threads 0] [--fresh] [--out benchmarks/results/folds.json]
    python benchmarks/bench_folds.py --device cuda --out benchmarks/results/folds_cuda.json   # GPU check

Input: the Linear weights of one Qwen3-0.6B layer (q 2048x1024, k/v 1024x1024 ... down 1024x3072, bf16,
random normal), 16 layers' worth per timing (~500 MB of bf16). Throughput is GB of bf16 input per second of
wall time (and of process CPU time), the median over ``--repeats`` rounds; each round runs every kind, in an
order rotated from round to round. The kinds:

- ``issue``: the kernels of commit 6ab636a, which issue 15 measured (fp8 0.84, nvfp4 0.28 GB/s on 2 cores):
  torch's float8 casts for fp8, a where-chain for E2M1, fresh float32 temporaries per 1 M-element step;
- ``before``: commit 8068b9c (unchanged until 121b769): E4M3 / E2M1 rounding by ``(|x| + C) - C`` with the
  sign put back by a bit-or, nvfp4 scales converted from fp8 per step and divided as a full-size copy, the
  per-row factors computed per step;
- ``now``: this checkout.

Every result is checked bit for bit against ``now``. The folds run inside ``_buffers.reusing()``, as in an
export (output buffers come back to a pool); ``--fresh`` maps fresh memory for every output instead. With
``--device cuda`` the folds run there (times synchronized) and "now" is also checked bit for bit against the
CPU fold of the same weights (``bit_identical_to_cpu``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

import offload_export as oe
from offload_export._buffers import reusing
from offload_export.adapters import builtin as fq

SCHEMES = ("int8", "int4-g128", "fp8", "nvfp4")
QWEN3_LAYER = ((2048, 1024), (1024, 1024), (1024, 1024), (1024, 2048), (3072, 1024), (3072, 1024), (1024, 3072))


class _SteppedFakeQuantizer(fq.FakeQuantizer):
    """An earlier kernel as it ran then: 1 M-element steps, each step's factors taken from the buffers."""

    def forward(self, w, rows=None):
        start = range(self.shape[0])[rows or slice(None)].start if len(w) else 0
        out = fq.anon_empty(tuple(w.shape), w.dtype) if w.device.type == "cpu" else torch.empty_like(w)
        step = max(1, (1 << 20) // w.shape[1])
        scratch = self._scratch(min(step, w.shape[0]) * math.ceil(self.shape[1] / self.group_size) * self.group_size,
                                w.device)
        for a in range(0, w.shape[0], step):
            chunk = w[a:a + step]
            out[a:a + step] = self._step(chunk, slice(start + a, start + a + len(chunk)), scratch)
        return out

    def _scratch(self, size, device):
        return None  # fresh temporaries per step

    def _step(self, w, rows, scratch):
        raise NotImplementedError


# ------------------------------------------------------------------ the kernels issue 15 measured (commit 6ab636a)
def _issue_fp8(x, amax):
    safe_amax = torch.where(amax <= fq._EPS, torch.ones_like(amax), amax)
    scale = fq.E4M3_MAX / safe_amax
    x = x.mul_(scale).clamp_(min=-fq.E4M3_MAX, max=fq.E4M3_MAX)
    return x.to(torch.float8_e4m3fn).to(torch.float32).mul_(1 / scale)


def _issue_e2m1(x):
    m = x.abs()
    r = torch.where(m < 2, (m * 2).round_().mul_(0.5), torch.where(m < 4, m.round(), (m * 0.5).round_().mul_(2)))
    r.clamp_(max=fq.E2M1_MAX)
    return torch.where(x < 0, -r, r).add_(0.0)


def _issue_nvfp4(x, block_scale, global_scale):
    scale = (block_scale.to(torch.float32) * global_scale).unsqueeze(-1)
    scaled = torch.where(scale > 0, x / scale, 0.0)
    return _issue_e2m1(scaled) * scale


class IssueFakeQuantizer(_SteppedFakeQuantizer):
    def _step(self, w, rows, scratch):
        x = fq._groups(w.to(torch.float32, copy=True), self.group_size)
        if self.scheme == "nvfp4":
            out = _issue_nvfp4(x, self.block_scale[rows], self.global_scale)
        elif self.scheme == "fp8":
            out = _issue_fp8(x, self.amax[rows].unsqueeze(-1))
        else:
            out = _old_int(x, self.amax[rows].unsqueeze(-1), fq._INT_MAX[self.scheme])
        return out.reshape(out.shape[0], -1)[:, : self.shape[1]]


# ------------------------------------------------------------------ the previous kernels (commit 8068b9c)
def _old_int(x, amax, max_bound):
    bound = torch.tensor(max_bound, device=amax.device)
    scale = bound / amax
    zero = amax <= fq._EPS
    scale = torch.where(zero, 0.0, scale)
    return x.mul_(scale).round_().clamp_(-max_bound - 1.0, max_bound).div_(torch.where(zero, 1.0, scale))


def _old_round_mantissa(x, mantissa_bits, min_exponent, scratch):
    bits = x.view(torch.int32)
    magic, sign = scratch
    torch.bitwise_and(bits, 0x7F800000, out=magic)
    magic.clamp_min_((min_exponent + 127) << 23).add_((23 - mantissa_bits) << 23)
    torch.bitwise_and(bits, -(1 << 31), out=sign)
    c = magic.view(torch.float32)
    x.abs_().add_(c).sub_(c)
    bits.bitwise_or_(sign)
    return x


def _old_fp8(x, amax, scratch):
    safe_amax = torch.where(amax <= fq._EPS, torch.ones_like(amax), amax)
    scale = fq.E4M3_MAX / safe_amax
    scale_inv = 1 / scale
    x = x.mul_(scale).clamp_(min=-fq.E4M3_MAX, max=fq.E4M3_MAX)
    return _old_round_mantissa(x, 3, -6, scratch).mul_(scale_inv)


def _old_nvfp4(x, block_scale, global_scale, scratch):
    scale = (block_scale.to(torch.float32) * global_scale).unsqueeze(-1)
    full = scratch[0].view(torch.float32).copy_(scale.expand(x.shape))
    x = _old_round_mantissa(x.div_(full), 1, 0, scratch[1:]).clamp_(min=-fq.E2M1_MAX, max=fq.E2M1_MAX).add_(0.0)
    return x.mul_(full)


_OLD_SCRATCH: list[torch.Tensor] = []


def _old_scratch(size: int, device: torch.device) -> list[torch.Tensor]:
    if not _OLD_SCRATCH or _OLD_SCRATCH[0].numel() < size or _OLD_SCRATCH[0].device != device:
        _OLD_SCRATCH[:] = [torch.empty(size, dtype=torch.int32, device=device) for _ in range(4)]
    return [b[:size] for b in _OLD_SCRATCH]


class OldFakeQuantizer(_SteppedFakeQuantizer):
    def _scratch(self, size, device):
        return _old_scratch(size, device)

    def _step(self, w, rows, scratch):
        n, cols = w.shape
        groups = math.ceil(cols / self.group_size)
        x, *work = (t[:n * groups * self.group_size].view(n, groups, self.group_size) for t in scratch)
        x = x.view(torch.float32)
        flat = x.view(n, -1)
        flat[:, :cols].copy_(w)
        if flat.shape[1] > cols:
            flat[:, cols:].zero_()
        if self.scheme == "nvfp4":
            out = _old_nvfp4(x, self.block_scale[rows], self.global_scale, work)
        elif self.scheme == "fp8":
            out = _old_fp8(x, self.amax[rows].unsqueeze(-1), work[:2])
        else:
            out = _old_int(x, self.amax[rows].unsqueeze(-1), fq._INT_MAX[self.scheme])
        return out.reshape(out.shape[0], -1)[:, : self.shape[1]]


def _time(quantizers, weights) -> tuple[float, float]:
    """Wall and CPU seconds to fold every weight; each result is dropped at once, as an export does after writing
    it (keeping them all alive made whichever kind ran second fault in memory the kernel had to compact first)."""
    w0, c0 = time.perf_counter(), time.process_time()
    for q, w in zip(quantizers, weights):
        q(w)
    if weights[0].device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0


def _bit_identical(quantizers: list, reference: list, weights) -> bool:
    return all(torch.equal(q(w).view(torch.int16), r(w).view(torch.int16)) for q, r, w in zip(quantizers, reference, weights))


def _same_as_cpu(quantizers, weights) -> bool:
    """The device fold equals the CPU fold of the same weight with the same (copied) scales, bit for bit."""
    same = True
    for q, w in zip(quantizers, weights):
        q_cpu = oe.FakeQuantizer(q.scheme, q.shape)
        q_cpu.load_state_dict({k: v.cpu() for k, v in q.state_dict().items()})
        same &= torch.equal(q(w).cpu().view(torch.int16), q_cpu(w.cpu()).view(torch.int16))
    return same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--device", default="cpu", help="where the weights, scales and folds live (cpu, cuda)")
    p.add_argument("--fresh", action="store_true", help="fresh memory for every output (no buffer pool)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16).to(args.device)
               for _ in range(args.layers) for s in QWEN3_LAYER]
    gb = sum(w.numel() * 2 for w in weights) / 1e9
    kinds = {"issue": IssueFakeQuantizer, "before": OldFakeQuantizer, "now": oe.FakeQuantizer}
    results = {"input_gb_bf16": gb, "threads": torch.get_num_threads(), "cpu": os.cpu_count(), "issue": "6ab636a",
               "before": "8068b9c", "device": str(weights[0].device), "pool": not args.fresh,
               "load_before": os.getloadavg(), "schemes": {}}
    print(f"{gb:.2f} GB of bf16 weights, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}, "
          f"{'fresh outputs' if args.fresh else 'outputs reused (as in an export)'}")
    print("| scheme | issue GB/s | before GB/s | now GB/s | now / issue | now / before | now GB/cpu-s | bit-identical |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for scheme in args.schemes.split(","):
        qs = {k: [] for k in kinds}
        for w in weights:
            for k, cls in kinds.items():
                q = cls(scheme, tuple(w.shape), device=w.device)
                q.calibrate(w)
                qs[k].append(q)
        walls, cpus = {k: [] for k in kinds}, {k: [] for k in kinds}
        order = list(kinds)
        with contextlib.nullcontext() if args.fresh else reusing():
            for i in range(args.repeats):
                for k in order[i % 3:] + order[:i % 3]:
                    wall, cpu = _time(qs[k], weights)
                    walls[k].append(wall)
                    cpus[k].append(cpu)
        same = all(_bit_identical(qs[k], qs["now"], weights) for k in ("issue", "before"))
        if weights[0].device.type != "cpu":
            results["schemes"].setdefault(scheme, {})["bit_identical_to_cpu"] = _same_as_cpu(qs["now"], weights)
            print(f"{scheme}: {weights[0].device} fold bit-identical to the CPU fold: "
                  f"{results['schemes'][scheme]['bit_identical_to_cpu']}", flush=True)
        rate = {k: gb / statistics.median(walls[k]) for k in kinds}
        cpu_rate = {k: gb / statistics.median(cpus[k]) for k in kinds}
        results["schemes"].setdefault(scheme, {}).update({
            **{f"{k}_gb_s": rate[k] for k in kinds}, **{f"{k}_gb_cpu_s": cpu_rate[k] for k in kinds},
            "speedup_vs_issue": rate["now"] / rate["issue"], "speedup": rate["now"] / rate["before"],
            "bit_identical": same, "walls": walls, "cpus": cpus})
        print(f"| {scheme} | {rate['issue']:.2f} | {rate['before']:.2f} | {rate['now']:.2f} | "
              f"{rate['now'] / rate['issue']:.2f} x | {rate['now'] / rate['before']:.2f} x | {cpu_rate['now']:.2f} | "
              f"{'yes' if same else 'NO'} |", flush=True)
    results["load_after"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
