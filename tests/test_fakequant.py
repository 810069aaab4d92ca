"""The built-in fake quantizers: hand-computed values, ModelOpt bit equality, offloaded models, export."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

import offload_export as oe
from offload_export.adapters.builtin import E4M3_MAX, _e2m1_round, _fp8_fake_quant, _nvfp4_scales
from layouts import LayoutSpec, apply_layout, forward_logits, make_model

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (tells -0.0 from 0.0 and compares nan payloads)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(_INT_VIEW[a.dtype]), b.view(_INT_VIEW[b.dtype]))


def fake_quant(scheme: str, w: torch.Tensor) -> torch.Tensor:
    q = oe.FakeQuantizer(scheme, tuple(w.shape))
    q.calibrate(w)
    return q(w)


@st.composite
def weights(draw, max_rows: int = 6, max_cols: int = 300):
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols // 16)) * 16  # nvfp4 (ModelOpt) needs whole 16-blocks
    seed = draw(st.integers(0, 2**16))
    scale = draw(st.sampled_from([1e-3, 0.05, 3.0]))
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    if draw(st.booleans()):
        w[0] = 0  # an all-zero row / block
    return w


# --------------------------------------------------------------------------- hand-computed values


def test_int8_hand_values():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]])
    # row 0: s = 127 / 1; -0.5 * 127 = -63.5 -> -64 (half to even), 0.25 * 127 = 31.75 -> 32; row 1: amax 0 -> 0
    expected = torch.tensor([[127.0, -64.0, 32.0], [0.0, 0.0, 0.0]]) / torch.tensor([[127.0], [1.0]])
    assert bits_equal(fake_quant("int8", w), expected)


def test_fp8_hand_values():
    w = torch.tensor([[2.0, 0.3, -1.0, 0.0]])
    # s = 448 / 2 = 224: 0.3 * 224 = 67.2 -> e4m3 64 (step 8 in [64, 128)), -1 * 224 = -224 exactly
    expected = torch.tensor([[448.0, 64.0, -224.0, 0.0]]) * (1 / torch.tensor(224.0))
    assert bits_equal(fake_quant("fp8", w), expected)


def test_int4_groups_of_128_with_a_shorter_last_group():
    w = torch.zeros(2, 130)
    w[0, :128] = torch.linspace(-7, 7, 128)  # group 0: amax 7, s = 1 -> round half to even
    w[0, 128:] = torch.tensor([0.7, -0.35])  # partial group: amax 0.7, s = 10: -3.5 -> -4
    q = oe.FakeQuantizer("int4-g128", (2, 130))
    q.calibrate(w)
    assert q.amax.shape == (2, 2) and q.amax[0].tolist() == pytest.approx([7.0, 0.7])
    out = q(w)
    assert torch.equal(out[0, :128], torch.round(w[0, :128]))
    assert bits_equal(out[0, 128:], torch.tensor([7.0, -4.0]) / (torch.tensor(7.0) / torch.tensor(0.7)))
    assert torch.equal(out[1], torch.zeros(130))


def test_e2m1_rounds_ties_to_even_and_saturates():
    x = torch.tensor([0.0, 0.25, 0.26, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.1, 7.0, -0.1, -0.75, -2.5, -3.5, -9.0])
    expected = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 6.0, 0.0, -1.0, -2.0, -4.0, -6.0])
    assert bits_equal(_e2m1_round(x), expected)  # also: a negative rounding to zero is +0.0 (ModelOpt)


def test_e4m3_rounding_by_arithmetic_equals_torchs_fp8_cast_for_every_binade():
    """The fp8 fold rounds with float32 arithmetic instead of torch's (slow) fp8 casts: same bits."""
    mags = torch.cat([torch.logspace(-45, 2.652, 400_000), torch.linspace(0, E4M3_MAX, 400_001),
                      torch.tensor([2**-6, 2**-7, 2**-9, 2**-10, 3 * 2**-10, 240.0, 248.0, 440.0, 447.9])])
    x = torch.cat([mags, -mags, torch.tensor([0.0, -0.0])])
    expected = x.to(torch.float8_e4m3fn).to(torch.float32)
    assert bits_equal(_fp8_fake_quant(x.clone(), torch.tensor(1.0), torch.tensor(0.125)), expected)


def test_nvfp4_block_of_16_known_values():
    # amax 6/16: global_scale = amax / 2688, block scale clamps to e4m3 448 -> S = 448 * global_scale = 1/16
    values = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.2, -0.75, -2.6, 0.0, 1.5, 3.0, 4.4, -5.5])
    w = (values / 16).reshape(1, 16)
    q = oe.FakeQuantizer("nvfp4", (1, 16))
    q.calibrate(w)
    assert q.block_scale.dtype == torch.float8_e4m3fn and q.block_scale.float().item() == 448.0
    assert q.scale.item() == 1 / 16
    expected = torch.tensor([6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, -1.0, -3.0, 0.0, 1.5, 3.0, 4.0, -6.0]) / 16
    assert bits_equal(q(w), expected.reshape(1, 16))


def test_nvfp4_second_block_scale_is_e4m3_of_block_amax_over_six():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 16] = 6.0, 0.75  # block 1: 0.75 / (6 * global_scale) = 56 (exact in e4m3)
    q = oe.FakeQuantizer("nvfp4", (1, 32))
    q.calibrate(w)
    assert q.block_scale.float().tolist() == [[448.0, 56.0]]


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("scheme", oe.SCHEMES)
@settings(max_examples=25, deadline=None)
@given(w=weights())
def test_idempotent_given_the_same_scales(scheme, w):
    q = oe.FakeQuantizer(scheme, tuple(w.shape))
    q.calibrate(w)
    once = q(w)
    assert bits_equal(q(once), once)


@pytest.mark.parametrize("scheme", oe.SCHEMES)
@settings(max_examples=20, deadline=None)
@given(w=weights(), data=st.data())
def test_rows_are_chunkable(scheme, w, data):
    a = data.draw(st.integers(0, w.shape[0] - 1))
    b = data.draw(st.integers(a + 1, w.shape[0]))
    q = oe.FakeQuantizer(scheme, tuple(w.shape))
    q.calibrate(w)
    assert bits_equal(q(w[a:b], rows=slice(a, b)), q(w)[a:b])


@pytest.mark.parametrize("scheme", oe.SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shape_dtype_preserved_and_disabled_is_identity(scheme, dtype):
    w = (torch.randn(5, 160, generator=torch.Generator().manual_seed(0)) * 0.1).to(dtype)
    q = oe.FakeQuantizer(scheme, (5, 160))
    q.calibrate(w)
    out = q(w)
    assert out.shape == w.shape and out.dtype == dtype and not torch.equal(out, w)
    assert bits_equal(out, q(w.float()).to(dtype))  # computed in float32, then cast
    q.enabled = False
    assert q(w) is w
    json.dumps(q.config())
    assert q.config()["scheme"] == scheme


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="int8, fp8, int4-g128, nvfp4"):
        oe.FakeQuantizer("int3", (2, 2))
    q = oe.FakeQuantizer("int8", (4, 8))
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        q(torch.zeros(4, 9))
    with pytest.raises(ValueError, match="int8, fp8"):
        oe.quantize_weights(nn.Linear(2, 2), "fp4")
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="1 is a ReLU"):
        oe.quantize_weights(model, modules=["1"])


# --------------------------------------------------------------------------- ModelOpt bit equality


_MODELOPT_CFG = {"int8": "INT8_WEIGHT_ONLY_CFG", "fp8": "FP8_PER_CHANNEL_PER_TOKEN_CFG",
                 "int4-g128": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"}


@pytest.mark.parametrize("scheme", sorted(_MODELOPT_CFG))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 200), (16, 256)])
def test_bit_equal_to_modelopt_fake_quant_on_cpu(scheme, dtype, shape):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    linear = nn.Linear(shape[1], shape[0]).to(dtype)
    with torch.no_grad():
        linear.weight[0] = 0
        linear.weight[1, :5] *= 50
    model = nn.Sequential(linear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(model, copy.deepcopy(getattr(mtq, _MODELOPT_CFG[scheme])), forward_loop=None)
    w = linear.weight.detach()
    expected = linear.weight_quantizer(w.float()).to(dtype)  # ModelOpt's own fold
    assert bits_equal(fake_quant(scheme, w), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=20, deadline=None)
@given(w=weights())
def test_nvfp4_bit_equal_to_modelopt_nvfp4_qtensor(dtype, w):
    # ModelOpt's NVFP4 fake-quant kernel needs CUDA (dynamic_block_quant asserts a CUDA amax); its
    # NVFP4QTensor quantize/dequantize (the export path) runs on CPU and is what we reproduce.
    nvfp4 = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    w = w.to(dtype)
    packed, block_scale, global_scale = nvfp4.NVFP4QTensor.quantize(w, 16)
    expected = packed.dequantize(dtype=dtype, scale=block_scale, double_scale=global_scale, block_sizes={-1: 16})
    q = oe.FakeQuantizer("nvfp4", tuple(w.shape))
    q.calibrate(w)
    if w.abs().max() > 0:  # ModelOpt gives nan for an all-zero weight; we give zeros
        assert torch.equal(q.block_scale.view(torch.uint8), block_scale.view(torch.uint8))
        assert bits_equal(q.global_scale, global_scale)
        assert bits_equal(q(w), expected)


# --------------------------------------------------------------------------- fast kernels, adversarial values
# The kernels round with float32 arithmetic (``round(8y/e)*e`` for E4M3, ``(x + C) - C`` for E2M1) and look block
# scales up in a table; these pin each argument on the values where such tricks break: exact ties, one ulp either
# side of a tie, powers of two, E4M3 / float32 subnormals, the saturation bounds, signed zeros.

_E2M1_TIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E4M3_GRID = sorted(set(torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().abs()
                        .nan_to_num(0.0).tolist()))  # the 127 finite magnitudes (0 ... 448)


def _nudged(v: float, nudge: int) -> float:
    """``v`` moved ``nudge`` float32 ulps (-1, 0 or 1)."""
    t = torch.tensor(v, dtype=torch.float32)
    if nudge:
        t = torch.nextafter(t, torch.tensor(math.copysign(math.inf, nudge), dtype=torch.float32))
    return t.item()


@st.composite
def e4m3_adversarial(draw) -> float:
    """A float32 ``y`` where E4M3 rounding is delicate: a grid value or a midpoint (a tie), maybe one ulp off,
    a power of two (binade edges, E4M3 and float32 subnormals), or past the saturation at 448."""
    kind = draw(st.sampled_from(["grid", "tie", "pow2", "special"]))
    i = draw(st.integers(0, len(_E4M3_GRID) - 2))
    if kind == "grid":
        v = _E4M3_GRID[i]
    elif kind == "tie":
        v = (_E4M3_GRID[i] + _E4M3_GRID[i + 1]) / 2  # exact in float32 (5 significant bits at most)
    elif kind == "pow2":
        v = 2.0 ** draw(st.integers(-149, 10))
    else:
        v = draw(st.sampled_from([0.0, 448.0, 456.0, 464.0, 465.0, 480.0, 1e30, 2.0**-10, 3 * 2.0**-11, 1e-40]))
    v = _nudged(v, draw(st.sampled_from([-1, 0, 0, 1]))) if v else v
    return -v if draw(st.booleans()) else v


@st.composite
def e2m1_adversarial(draw) -> float:
    """A float32 ``x`` where E2M1 rounding is delicate (as :func:`e4m3_adversarial`; saturation at 6)."""
    kind = draw(st.sampled_from(["grid", "tie", "pow2", "special"]))
    if kind == "grid":
        v = draw(st.sampled_from(_E2M1_GRID))
    elif kind == "tie":
        v = draw(st.sampled_from(_E2M1_TIES))
    elif kind == "pow2":
        v = 2.0 ** draw(st.integers(-149, 12))
    else:
        v = draw(st.sampled_from([0.0, 6.5, 7.0, 8.0, 1e30, 1e-40, 2.0**-126]))
    v = _nudged(v, draw(st.sampled_from([-1, 0, 0, 1]))) if v else v
    return -v if draw(st.booleans()) else v


@settings(max_examples=200, deadline=None)
@given(values=st.lists(e4m3_adversarial(), min_size=1, max_size=64))
def test_e4m3_rounding_equals_torchs_fp8_cast_on_adversarial_values(values):
    x = torch.tensor(values, dtype=torch.float32)
    expected = x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()  # ModelOpt: clamp, then cast
    assert bits_equal(_fp8_fake_quant(x.clone(), torch.tensor(1.0), torch.tensor(0.125)), expected)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(e2m1_adversarial(), min_size=1, max_size=64))
def test_e2m1_rounding_equals_modelopt_cast_fp4_on_adversarial_values(values):
    nvfp4 = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    x = torch.tensor(values, dtype=torch.float32)
    expected = nvfp4.e2m1_values[nvfp4.NVFP4QTensor._cast_fp4(x.clone()).long()]  # ModelOpt's table
    assert bits_equal(_e2m1_round(x.clone()), expected)


def test_nvfp4_scale_lookup_equals_torchs_fp8_cast_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    for global_scale in (1.0, 3e-7, 2.0**-140, 0.0):
        g = torch.tensor(global_scale)
        assert bits_equal(_nvfp4_scales(codes, g), codes.float() * g)


def _every_float32(top: float, chunk: int = 1 << 24):
    """Every float32 of magnitude at most ``top``, both signs (zeros, subnormals included), in chunks."""
    last = torch.tensor(top).view(torch.int32).item()
    for sign in (0, -(1 << 31)):
        for a in range(0, last + 1, chunk):
            yield (torch.arange(a, min(a + chunk, last + 1), dtype=torch.int32) | sign).view(torch.float32)


@pytest.mark.slow
def test_e4m3_rounding_equals_torchs_fp8_cast_for_every_float32():
    """All 2.3e9 float32 values the fp8 fold rounds (|y| <= 448 after its clamp): ~1.5 min on one core."""
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    for y in _every_float32(E4M3_MAX):
        expected = table[y.to(torch.float8_e4m3fn).view(torch.uint8).long()]
        assert bits_equal(_fp8_fake_quant(y.clone(), torch.tensor(1.0), torch.tensor(0.125)), expected)


@pytest.mark.slow
def test_e2m1_rounding_equals_modelopt_cast_fp4_for_every_float32_up_to_16():
    """All 2.2e9 float32 values of magnitude <= 16 (the saturation included): ~3.5 min on one core."""
    nvfp4 = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    for x in _every_float32(16.0):
        expected = nvfp4.e2m1_values[nvfp4.NVFP4QTensor._cast_fp4(x.clone()).long()]
        assert bits_equal(_e2m1_round(x.clone()), expected)


@st.composite
def amax_and_weight(draw, scheme: str):
    """A weight and a per-row (per-group) amax where the int / fp8 folds hit their edge cases: amax a power of
    two times the bound (exact scale, so ``w * scale`` lands exactly on ties), amax below the weight's max
    (saturation at both bounds), amax 0 or at most 2**-24, zero rows, negative zeros."""
    rows, groups = draw(st.integers(1, 4)), draw(st.integers(1, 3)) if scheme == "int4-g128" else 1
    cols = groups * 128 if scheme == "int4-g128" else draw(st.integers(1, 40))
    bound = {"int8": 127.0, "int4-g128": 7.0, "fp8": E4M3_MAX}[scheme]
    amax = torch.empty(rows, groups)
    for r in range(rows):
        for g in range(groups):
            kind = draw(st.sampled_from(["exact", "exact", "random", "zero", "tiny"]))
            amax[r, g] = {"exact": bound * 2.0 ** draw(st.integers(-20, 4)), "random": draw(st.floats(1e-3, 10.0)),
                          "zero": 0.0, "tiny": 2.0**-25}[kind]
    step = amax.repeat_interleave(cols // groups, dim=1) / bound  # w / step is what gets rounded
    if scheme == "fp8":
        units = torch.tensor(draw(st.lists(e4m3_adversarial(), min_size=rows * cols, max_size=rows * cols)))
    else:
        halves = draw(st.lists(st.integers(-2 * int(bound) - 6, 2 * int(bound) + 6), min_size=rows * cols,
                               max_size=rows * cols))
        units = torch.tensor(halves, dtype=torch.float32) / 2  # integers and ties, some past the bounds
    w = (units.reshape(rows, cols) * torch.where(step > 0, step, 1.0)).clamp(-1e30, 1e30)
    if draw(st.booleans()):
        w[0] = 0.0
    if draw(st.booleans()):
        w[-1, 0] = -0.0
    return amax, w


@pytest.mark.parametrize("scheme", ["int8", "int4-g128", "fp8"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_bit_equal_to_modelopt_functions_on_adversarial_weights_and_amax(scheme, data):
    tq = pytest.importorskip("modelopt.torch.quantization.tensor_quant")
    amax, w = data.draw(amax_and_weight(scheme))
    q = oe.FakeQuantizer(scheme, tuple(w.shape))
    q.amax.copy_(amax)
    if scheme == "fp8":
        expected = tq._fp8_eager(w, amax)
    else:
        groups = w.reshape(w.shape[0], amax.shape[1], -1)
        expected = tq._tensor_quant(groups, amax.unsqueeze(-1), num_bits=8 if scheme == "int8" else 4,
                                    narrow_range=False).reshape(w.shape)
    assert bits_equal(q(w), expected)


@st.composite
def nvfp4_ties(draw):
    """A weight whose global scale is a power of two and whose block scales are E4M3 values, so every element
    ``m * S`` lands exactly on an E2M1 value or tie ``m`` (or one ulp off): each block holds ``6 * S`` (its
    amax), the first block of the first row the weight's amax. Zero blocks, zero rows and -0.0 included."""
    rows, blocks = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    k = draw(st.integers(-30, 10))
    w = torch.zeros(rows, blocks, 16)
    for r in range(rows):
        for b in range(blocks):
            if draw(st.integers(0, 4)) == 0 and (r, b) != (0, 0):
                continue  # an all-zero block
            bs = 448.0 if (r, b) == (0, 0) else draw(st.sampled_from([v for v in _E4M3_GRID if v >= 2.0**-9]))
            ms = draw(st.lists(st.sampled_from(_E2M1_TIES + _E2M1_GRID), min_size=15, max_size=15))
            nudge = draw(st.sampled_from([-1, 0, 0, 1]))
            w[r, b] = torch.tensor([6.0] + [_nudged(m, nudge) if m else -0.0 for m in ms]) * (bs * 2.0**k)
            w[r, b] *= torch.tensor(draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=16, max_size=16)))
    if rows > 1 and draw(st.booleans()):
        w[-1] = 0.0
    return w.reshape(rows, -1)


@settings(max_examples=60, deadline=None)
@given(w=nvfp4_ties())
def test_nvfp4_bit_equal_to_modelopt_on_exact_ties(w):
    nvfp4 = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    packed, block_scale, global_scale = nvfp4.NVFP4QTensor.quantize(w, 16)
    expected = packed.dequantize(dtype=w.dtype, scale=block_scale, double_scale=global_scale, block_sizes={-1: 16})
    q = oe.FakeQuantizer("nvfp4", tuple(w.shape))
    q.calibrate(w)
    assert torch.equal(q.block_scale.view(torch.uint8), block_scale.view(torch.uint8))
    assert bits_equal(q(w), expected)


# --------------------------------------------------------------------------- models, offload, export


_LAYOUTS = {
    "cpu_offload": LayoutSpec("cpu_offload"),
    "disk_offload": LayoutSpec("disk_offload", offload_buffers=True),
    "from_pretrained_disk": LayoutSpec("from_pretrained", (("model.embed_tokens", "resident"),
                                                           ("model.layers.0", "disk"), ("model.layers.1", "resident"),
                                                           ("model.norm", "disk"), ("lm_head", "resident"))),
    "place_submodules_buffers": LayoutSpec("place_submodules", (("model.embed_tokens", "resident"),
                                                                ("model.layers.0", "cpu"), ("model.layers.1", "disk"),
                                                                ("model.norm", "resident"), ("lm_head", "resident")),
                                           offload_buffers=True, append_hook="after"),
    "from_pretrained_cpu": LayoutSpec("from_pretrained", (("model.embed_tokens", "cpu"), ("model.layers.0", "cpu"),
                                                          ("model.layers.1", "resident"), ("model.norm", "cpu"),
                                                          ("lm_head", "cpu"))),
}


@pytest.fixture(scope="module")
def quantized_reference():
    refs = {}
    for scheme in oe.SCHEMES:
        model = make_model("qwen3_tied")
        assert oe.quantize_weights(model, scheme) == 14  # 2 layers x 7 Linear; lm_head skipped
        refs[scheme] = (model, forward_logits(model))
    return refs


@pytest.mark.parametrize("method", sorted(_LAYOUTS))
@pytest.mark.parametrize("scheme", oe.SCHEMES)
def test_offloaded_model_matches_resident_bitwise(method, scheme, quantized_reference, tmp_path):
    reference, expected = quantized_reference[scheme]
    model = apply_layout(make_model("qwen3_tied"), _LAYOUTS[method], tmp_path)
    keys_before = set(model.state_dict())
    assert oe.quantize_weights(model, scheme) == 14
    added = set(model.state_dict()) - keys_before
    assert added and all(".weight_quantizer." in k for k in added)
    assert keys_before <= set(model.state_dict())
    for name, q in ((n, m) for n, m in model.named_modules() if isinstance(m, oe.FakeQuantizer)):
        assert all(b.device.type == "cpu" for b in q.buffers()), name
    assert not hasattr(model.lm_head, "weight_quantizer")
    logits = forward_logits(model)
    assert bits_equal(logits, expected)
    assert bits_equal(forward_logits(model), expected)  # hooks still work on the second forward
    with oe.quantizers_disabled(model):
        plain = forward_logits(model)
    assert not torch.equal(plain, expected)
    assert bits_equal(forward_logits(model), expected)


def test_quantize_weights_changes_the_forward_and_is_reversible_by_disabling():
    model = make_model("llama_untied")
    plain = forward_logits(model)
    assert oe.quantize_weights(model, "int4-g128", modules=["model.layers.0.mlp.down_proj"]) == 1
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "FakeQuantLinear" and isinstance(layer, nn.Linear)
    assert not torch.equal(forward_logits(model), plain)
    with oe.quantizers_disabled(model):
        assert bits_equal(forward_logits(model), plain)
    oe.quantize_weights(model, "fp8", modules=["model.layers.0.mlp.down_proj"])  # re-quantize in place
    assert layer.weight_quantizer.scheme == "fp8"
    assert oe.quantize_weights(make_model("llama_untied"), "int8", skip=()) == 15  # lm_head too


@pytest.mark.parametrize("method", ["cpu_offload", "disk_offload", "place_submodules_buffers"])
def test_save_clean_folds_fake_quant_of_offloaded_model(method, tmp_path):
    raw = make_model("qwen3_tied").state_dict()
    model = apply_layout(make_model("qwen3_tied"), _LAYOUTS[method], tmp_path / "layout")
    oe.quantize_weights(model, "nvfp4")
    forward_logits(model)  # place_submodules + offload_buffers: the quantizer buffers are now offloaded too
    out = tmp_path / "out"
    oe.save_clean(model, out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert not any("quantizer" in k for k in keys)
        for key in keys:
            value = f.get_tensor(key)
            if key.endswith("_proj.weight"):
                assert bits_equal(value, fake_quant("nvfp4", raw[key])), key
            else:
                assert bits_equal(value, raw[key]), key
    with safe_open(str(out / "quantizer_state.safetensors"), "pt") as f:
        state = set(f.keys())
        config = json.loads(f.metadata()["quantizers"])
    assert "model.layers.0.self_attn.q_proj.weight_quantizer.block_scale" in state
    assert config["model.layers.0.self_attn.q_proj.weight_quantizer"]["config"]["scheme"] == "nvfp4"
    assert config["model.layers.0.self_attn.q_proj.weight_quantizer"]["folded"] is True
    reloaded = type(model).from_pretrained(str(out))
    assert bits_equal(forward_logits(reloaded), forward_logits(model))


@pytest.mark.parametrize("scheme", oe.SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_with_grad_enabled_equals_no_grad_and_backward_is_straight_through(scheme, dtype):
    """Training-mode forward (grad enabled) works, gives the no_grad logits bit for bit, and the weight's
    gradient is the one of the plain linear at the fake-quantized weight (fake_quant's derivative: identity)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 48), nn.ReLU(), nn.Linear(48, 8)).to(dtype)
    assert oe.quantize_weights(model, scheme, skip=()) == 2
    x = torch.randn(5, 200, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
    out = model(x)
    assert out.requires_grad and bits_equal(out.detach(), expected)
    out.float().square().sum().backward()
    # the same graph with the fake-quantized weights as plain leaves: their grads must equal the weights' grads
    first, last = model[0], model[2]
    wq = [m.weight_quantizer(m.weight.detach()).requires_grad_() for m in (first, last)]
    h = torch.relu(F.linear(x, wq[0], first.bias.detach()))
    F.linear(h, wq[1], last.bias.detach()).float().square().sum().backward()
    for m, w in zip((first, last), wq):
        assert m.weight.grad is not None and bits_equal(m.weight.grad, w.grad)
    with oe.quantizers_disabled(model), torch.no_grad():
        assert not torch.equal(model(x), expected)


class _OwnForwardLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def _swapped(model: nn.Module) -> list[tuple[str, str, bool]]:
    return [(n, type(m).__name__, hasattr(m, "weight_quantizer")) for n, m in model.named_modules()]


def test_quantize_weights_refused_at_a_later_linear_changes_nothing():
    model = make_model("llama_untied")
    model.model.layers[1].mlp.down_proj.__class__ = _OwnForwardLinear  # the last Linear quantize_weights reaches
    before, logits = _swapped(model), forward_logits(model)
    with pytest.raises(ValueError, match="overrides nn.Linear.forward"):
        oe.quantize_weights(model, "int8")
    assert _swapped(model) == before
    assert bits_equal(forward_logits(model), logits)


@pytest.mark.parametrize("fail_at", [1, 5])
def test_quantize_weights_failing_part_way_on_an_offloaded_model_changes_nothing(fail_at, tmp_path, monkeypatch):
    from offload_export.adapters import builtin

    model = apply_layout(make_model("qwen3_tied"), _LAYOUTS["place_submodules_buffers"], tmp_path)
    oe.quantize_weights(model, "fp8", modules=["model.layers.1.mlp.up_proj"])  # re-quantized below: restored
    before, keys, logits = _swapped(model), set(model.state_dict()), forward_logits(model)
    calls, real = [], builtin.add_store_entry

    def failing(*args):
        calls.append(args[1])
        if len(calls) == fail_at:
            raise RuntimeError("injected store failure")
        return real(*args)

    monkeypatch.setattr(builtin, "add_store_entry", failing)
    with pytest.raises(RuntimeError, match="injected"):
        oe.quantize_weights(model, "nvfp4")
    monkeypatch.undo()
    assert _swapped(model) == before and set(model.state_dict()) == keys
    assert model.model.layers[1].mlp.up_proj.weight_quantizer.scheme == "fp8"
    assert bits_equal(forward_logits(model), logits)
