"""The NVFP4 packing of format="modelopt" gives ModelOpt's own bits: E2M1 codes at every rounding midpoint, signed
zeros, NaN and infinities, block scales at both ends of their clamp, all-zero blocks, stacks of experts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_export.formats._nvfp4 import e2m1_codes, pack

pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.export.quant_utils import to_quantized_weight  # noqa: E402
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MIDPOINTS = tuple((a + b) / 2 for a, b in zip(E2M1, E2M1[1:]))


def _around(x: float) -> list[float]:
    """``x`` and the float32 values either side of it."""
    t = torch.tensor([x], dtype=torch.float32)
    return [x, *(torch.nextafter(t, torch.tensor([d], dtype=torch.float32)).item() for d in (-math.inf, math.inf))]


EDGES = sorted({v for x in (*E2M1, *MIDPOINTS, 7.0, 1e30, 1e-40, 2.0 ** -149) for v in _around(x)})
special = st.sampled_from([*EDGES, math.inf, math.nan, -0.0])
values = st.one_of(special, st.floats(-8, 8, width=32), st.floats(width=32, allow_nan=True, allow_infinity=True))


def modelopt_pack(weight: torch.Tensor, block: int, scale_2: torch.Tensor, dtype: torch.dtype):
    """What ModelOpt's export computes for an NVFP4 weight with per-tensor scale ``scale_2``."""
    per_block = NVFP4QTensor.get_weights_scaling_factor(weight, block, weights_scaling_factor_2=scale_2)[0]
    return to_quantized_weight(weight.to(dtype), per_block, "nvfp4", scale_2, block), per_block


def assert_same_bits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert torch.equal(ours.view(torch.uint8), theirs.view(torch.uint8))


@SETTINGS
@given(st.lists(st.one_of(values, st.sampled_from(EDGES).map(lambda v: -v)), min_size=1, max_size=64))
def test_e2m1_codes_are_modelopts_at_every_midpoint_and_special_value(xs):
    x = torch.tensor(xs, dtype=torch.float32)
    assert_same_bits(e2m1_codes(x.clone()), NVFP4QTensor._cast_fp4(x.clone()))


@st.composite
def weights(draw):
    """A weight (2-D, or a stack of experts with a per-expert scale), its per-tensor scale and the export dtype;
    some blocks scaled so that their values land on E2M1's midpoints exactly (block maximum 6, scale_2 1), some
    all zero, some scale_2 far from the weight's amax (block scales clamped at either end)."""
    experts = draw(st.sampled_from([None, 1, 3]))
    rows, blocks, block = draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.sampled_from([16, 32]))
    shape = (rows, blocks * block) if experts is None else (experts, rows, blocks * block)
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["random", "midpoints", "zeros", "wide"]))
    if kind == "midpoints":
        grid = torch.tensor([*E2M1, *MIDPOINTS])
        w = grid[torch.randint(len(grid), shape)] * (torch.randint(2, shape) * 2 - 1)
        w.view(-1, block)[:, 0] = 6.0  # every block's maximum 6: with scale_2 1 its scale is 1 exactly
    elif kind == "zeros":
        w = torch.randn(shape)
        w.view(-1, block)[::2] = 0
    elif kind == "wide":
        w = torch.randn(shape) * torch.logspace(-30, 30, shape[-1])
    else:
        w = torch.randn(shape)
    w = w.to(draw(st.sampled_from([dtype, torch.float32])))
    if kind == "midpoints":
        scale_2 = torch.tensor(1.0)
    else:
        scale_2 = w.float().abs().amax() / (6 * 448) * draw(st.sampled_from([1.0, 1e-6, 1e6]))
    if experts is not None:
        scale_2 = (scale_2 * torch.rand(experts).add(0.5)).view(-1, 1, 1)
    return w, block, scale_2.float(), dtype


@SETTINGS
@given(weights())
def test_pack_is_modelopts(case):
    weight, block, scale_2, dtype = case
    packed, scales = pack(weight, block, scale_2, dtype)
    theirs_packed, theirs_scales = modelopt_pack(weight, block, scale_2, dtype)
    assert_same_bits(packed, theirs_packed)
    assert_same_bits(scales, theirs_scales)


def test_pack_names_a_weight_not_made_of_blocks():
    with pytest.raises(ValueError, match=r"shape \(2, 24\).*blocks of 16"):
        pack(torch.ones(2, 24), 16, torch.tensor(1.0), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pack_on_a_gpu_is_modelopts_and_never_waits_for_it():
    """On a GPU the bits are ModelOpt's (its CPU bits too) and no call waits for the GPU's queue (torch's sync debug
    mode makes every synchronising call raise)."""
    torch.manual_seed(0)
    weight = torch.randn(3, 256, 512, dtype=torch.bfloat16, device="cuda")
    scale_2 = (weight.float().abs().amax((1, 2)) / (6 * 448)).view(-1, 1, 1)
    theirs = modelopt_pack(weight, 16, scale_2, torch.bfloat16)
    edges = torch.tensor([*EDGES, math.inf, math.nan, -0.0, *(-v for v in EDGES)])
    on_gpu = edges.cuda()  # e2m1_codes overwrites its input
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ours = pack(weight, 16, scale_2, torch.bfloat16)
        codes = e2m1_codes(on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_cpu = pack(weight.cpu(), 16, scale_2.cpu(), torch.bfloat16)
    for mine, other, host in zip(ours, theirs, on_cpu):
        assert_same_bits(mine, other)
        assert_same_bits(mine.cpu(), host)
    assert_same_bits(codes.cpu(), NVFP4QTensor._cast_fp4(edges))
