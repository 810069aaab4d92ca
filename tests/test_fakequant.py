"""The built-in fake quantizers: hand-computed values, ModelOpt bit equality, offloaded models, export."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

import offload_export as oe
from offload_export.adapters.builtin import E4M3_MAX, _e2m1_round, _fp8_fake_quant
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
