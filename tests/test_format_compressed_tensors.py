"""save_clean(format="compressed-tensors") against compressed-tensors' own save path, on real accelerate layouts.

The reference is what llm-compressor writes for the resident twin: ``ModelCompressor.from_pretrained_model``
-> ``compress_model`` -> ``save_pretrained`` -> ``update_config`` on a deep copy. No mocks.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM, Qwen3Config

import offload_export as oe
from layouts import METHODS, LayoutSpec, apply_layout, draw_offloaded, fixed_input_ids, forward_logits, layout_specs, make_model
from memory_child import measure

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor, ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
    preset_name_to_scheme,
)
from test_compressed_tensors import _calibrate, _config  # noqa: E402

from offload_export.formats import compressed_tensors as ct_format  # noqa: E402

CT = "compressed-tensors"
W8_CHANNEL = {"weights": QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True)}
SCHEMES = {  # scheme -> compressed-tensors format written
    "w8a16_channel": (W8_CHANNEL, "pack-quantized"),
    "w4a16_g128": ("W4A16", "pack-quantized"),
    "w4a16_g128_asym": ("W4A16_ASYM", "pack-quantized"),
    "w8a8_int": ("W8A8", "int-quantized"),
    "fp8_w8a8": ("FP8", "float-quantized"),
    "fp8_dynamic": ("FP8_DYNAMIC", "float-quantized"),
    "nvfp4": ("NVFP4", "nvfp4-pack-quantized"),
    "fp8_block": ("FP8_BLOCK", "float-quantized"),
}
SMALL_GROUPS = [s for s in SCHEMES if "g128" not in s and "block" not in s]  # the layouts' models have hidden size 64
FAST = settings(max_examples=5, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def quantize_ct(model, scheme_name: str):
    """compressed-tensors' scheme on every Linear but lm_head, static qparams from min/max, FROZEN."""
    spec = SCHEMES[scheme_name][0]
    scheme = preset_name_to_scheme(spec, ["Linear"]) if isinstance(spec, str) else QuantizationScheme(
        targets=["Linear"], **spec)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            (_calibrate_blocks if module.quantization_scheme.weights.strategy == "block" else _calibrate)(module)
    return model


def _calibrate_blocks(module) -> None:
    """Static per-block weight scales from each block's min/max (inputs are dynamic), then FROZEN."""
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.utils import calculate_qparams, maybe_pad_tensor_for_block_quant
    args = module.quantization_scheme.weights
    w = maybe_pad_tensor_for_block_quant(module.weight.detach(), tuple(args.block_structure))  # partial blocks: 0s
    (bh, bw), (rows, cols) = args.block_structure, w.shape
    blocks = w.reshape(rows // bh, bh, cols // bw, bw)
    scale, zp = calculate_qparams(blocks.amin((1, 3)), blocks.amax((1, 3)), args)
    module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
    module.weight_zero_point.data.copy_(zp.reshape(module.weight_zero_point.shape))
    module.quantization_status = QuantizationStatus.FROZEN


def ct_model(scheme_name: str, arch: str = "qwen3"):
    torch.manual_seed(0)
    return quantize_ct(AutoModelForCausalLM.from_config(_config(arch)).eval(), scheme_name)


def read_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    weights = {}
    for file in sorted(Path(path).glob("model*.safetensors")):
        with safe_open(file, "pt") as f:
            weights.update({k: f.get_tensor(k) for k in f.keys()})
    return weights, json.loads((Path(path) / "config.json").read_text())


def llm_compressor_save(model, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """llm-compressor's save path, on a deep copy (compress_model works in place)."""
    twin = copy.deepcopy(model)
    compressor = ModelCompressor.from_pretrained_model(twin)
    compressor.compress_model(twin)
    twin.save_pretrained(path)
    compressor.update_config(path)
    return read_dir(path)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(_bits(got[key]), _bits(value)), key


def snapshot(model) -> dict:
    """What the export must leave as it was: schemes (objects and values), statuses, layout kinds."""
    return {"schemes": {n: (m.quantization_scheme, m.quantization_scheme.model_dump()) for n, m in model.named_modules()
                        if hasattr(m, "quantization_scheme")},
            "status": {n: m.quantization_status for n, m in model.named_modules() if hasattr(m, "quantization_status")},
            "layout": {k: (i.kind, i.dtype, i.shape) for k, i in oe.layout(model).items()}}


def assert_untouched(model, before: dict) -> None:
    after = snapshot(model)
    assert after["status"] == before["status"] and after["layout"] == before["layout"]
    for name, (scheme, dump) in before["schemes"].items():
        assert after["schemes"][name][0] is scheme and after["schemes"][name][1] == dump, name


@FAST
@given(scheme_name=st.sampled_from(sorted(SCHEMES)), arch=st.sampled_from(["qwen3", "llama"]),
       how=st.sampled_from(["resident", "cpu_offload", "disk_offload"]))
def test_equals_llm_compressor_save(tmp_path_factory, scheme_name, arch, how):
    from accelerate import cpu_offload, disk_offload
    tmp = tmp_path_factory.mktemp("ct")
    expected, expected_config = llm_compressor_save(ct_model(scheme_name, arch), tmp / "ref")
    model = ct_model(scheme_name, arch)
    if how == "cpu_offload":
        model = cpu_offload(model, execution_device=torch.device("cpu"))
    elif how == "disk_offload":
        model = disk_offload(model, str(tmp / "offload"), execution_device=torch.device("cpu"))
    before, logits = snapshot(model), forward_logits(model)
    report = oe.save_clean(model, tmp / "out", format=CT, max_shard_size="64KB")
    got, config = read_dir(tmp / "out")
    assert_same_tensors(got, expected)
    assert config["quantization_config"] == expected_config["quantization_config"]
    assert config["quantization_config"]["format"] == SCHEMES[scheme_name][1]
    assert report.format == CT and "auto_map" not in config
    assert oe.verify(model, tmp / "out", format=CT).ok
    assert_untouched(model, before)
    assert torch.equal(forward_logits(model), logits)


def test_dtype_casts_only_unpacked_tensors(tmp_path):
    """dtype= casts the tensors of unquantized modules; packed modules keep compressed-tensors' dtypes."""
    oe.save_clean(ct_model("fp8_w8a8"), tmp_path / "a", format=CT)
    oe.save_clean(ct_model("fp8_w8a8"), tmp_path / "b", format=CT, dtype="bfloat16")
    (plain, _), (cast, config) = read_dir(tmp_path / "a"), read_dir(tmp_path / "b")
    assert sorted(plain) == sorted(cast) and config["dtype"] == "bfloat16"
    for key, value in plain.items():
        packed = key.rpartition(".")[0].endswith("_proj")
        expected = value if packed or not value.is_floating_point() else value.to(torch.bfloat16)
        assert cast[key].dtype == expected.dtype and torch.equal(_bits(cast[key]), _bits(expected)), key


@pytest.mark.parametrize("scheme_name", sorted(SCHEMES))
def test_row_chunks_equal_one_call(tmp_path, monkeypatch, scheme_name):
    """Compressing 128 rows at a time (zero points packed across rows included) gives compress() of the whole."""
    monkeypatch.setattr(ct_format, "_CHUNK_ELEMENTS", 1)
    expected, _ = llm_compressor_save(ct_model(scheme_name, "llama"), tmp_path / "ref")
    oe.save_clean(ct_model(scheme_name, "llama"), tmp_path / "out", format=CT)
    assert_same_tensors(read_dir(tmp_path / "out")[0], expected)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "from_pretrained"])  # a reload drops the schemes
@settings(FAST, max_examples=3, suppress_health_check=list(HealthCheck))
@given(data=st.data(), kind=st.sampled_from(["qwen3_tied", "llama_untied", "qwen3_moe"]),
       scheme_name=st.sampled_from(SMALL_GROUPS))
def test_offload_layouts_equal_resident(tmp_path_factory, method, data, kind, scheme_name):
    """Every accelerate layout (calibrated resident, then laid out) writes the resident twin's checkpoint."""
    spec = data.draw(layout_specs(kind).filter(lambda s: s.method == method))
    tmp = tmp_path_factory.mktemp("lay")
    expected, expected_config = llm_compressor_save(quantize_ct(make_model(kind), scheme_name), tmp / "ref")
    model = apply_layout(quantize_ct(make_model(kind), scheme_name), spec, tmp / "layout")
    before = snapshot(model)
    oe.save_clean(model, tmp / "out", format=CT)
    got, config = read_dir(tmp / "out")
    assert_same_tensors(got, expected)
    assert config["quantization_config"] == expected_config["quantization_config"]
    assert_untouched(model, before)


# ---------------------------------------------------------------------------------------- built-in schemes


def _from_codes(weights: dict, owner: str, fq: oe.FakeQuantizer) -> torch.Tensor:
    """The fake quantizer's value rebuilt from the checkpoint's codes with its own scales and operations:
    ``q / (bound / amax)`` (int), ``E2M1 * (float(block_scale) * global_scale)`` (nvfp4)."""
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    rows, cols = fq.shape
    if fq.scheme == "nvfp4":
        codes = unpack_fp4_from_uint8(weights[f"{owner}.weight_packed"], rows, cols, dtype=torch.float32)
        scale = (fq.block_scale.to(torch.float32) * fq.global_scale).repeat_interleave(fq.group_size, 1)
        return codes * scale
    bits, bound = (8, 127.0) if fq.scheme == "int8" else (4, 7.0)
    codes = unpack_from_int32(weights[f"{owner}.weight_packed"], bits, torch.Size(fq.shape)).to(torch.float32)
    return codes / (torch.tensor(bound) / fq.amax).repeat_interleave(fq.group_size, 1)[:, :cols]


def _decompressed(weights: dict, config: dict, owner: str, dtype: torch.dtype) -> torch.Tensor:
    """compressed-tensors' own decompression of one packed module of our checkpoint."""
    scheme = QuantizationScheme.model_validate(config["quantization_config"]["config_groups"]["group_0"])
    local = {k.removeprefix(owner + "."): v for k, v in weights.items() if k.startswith(owner + ".")}
    return BaseCompressor.get_value_from_registry(scheme.format).decompress(local, scheme)["weight"].to(dtype)


@pytest.mark.parametrize("method", METHODS)
@settings(FAST, max_examples=3, suppress_health_check=list(HealthCheck))
@given(data=st.data(), kind=st.sampled_from(["qwen3_tied", "llama_untied"]),
       scheme=st.sampled_from(["int8", "fp8", "nvfp4"]))
def test_builtin_schemes_any_layout(tmp_path_factory, method, data, kind, scheme):
    """quantize_weights on any layout (from_pretrained included) -> the resident twin's packed checkpoint, whose
    decompression is the fake-quantized weight (FP8 bit for bit, integer and FP4 codes exactly)."""
    spec = data.draw(layout_specs(kind).filter(lambda s: s.method == method))
    tmp = tmp_path_factory.mktemp("builtin")
    reference, model = draw_offloaded(kind, spec, tmp / "layout")
    oe.quantize_weights(reference, scheme)
    oe.quantize_weights(model, scheme)
    logits = forward_logits(model)
    oe.save_clean(reference, tmp / "ref", format=CT)
    oe.save_clean(model, tmp / "out", format=CT)
    (expected, expected_config), (got, config) = read_dir(tmp / "ref"), read_dir(tmp / "out")
    assert_same_tensors(got, expected)
    assert config["quantization_config"] == expected_config["quantization_config"]
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    assert torch.equal(forward_logits(model), logits)  # untouched
    dtype = reference.dtype
    for name, linear in reference.named_modules():
        if not hasattr(linear, "weight_quantizer"):
            continue
        folded = linear.weight_quantizer(linear.weight.detach())
        out = _decompressed(got, config, name, dtype)
        if scheme == "fp8":
            assert torch.equal(out, folded), name
            continue
        assert torch.equal(_from_codes(got, name, linear.weight_quantizer).to(dtype), folded), name  # the codes
        # compressed-tensors multiplies by a scale where the fake quantizer divides (int) or decompresses FP4
        # to bfloat16: a rounding apart
        torch.testing.assert_close(out, folded, rtol=2**-21 if scheme == "int8" else 2**-8, atol=0), name


def _tiny_qwen3(dtype: torch.dtype):
    torch.manual_seed(0)
    cfg = Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=128, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


@pytest.mark.parametrize("scheme,dtype", [("int8", torch.float32), ("int4-g128", torch.float32),
                                          ("fp8", torch.float32), ("nvfp4", torch.bfloat16),
                                          ("int8", torch.bfloat16)])
def test_builtin_reloads_in_transformers(tmp_path, scheme, dtype):
    """transformers (compressed-tensors integration) decompresses the checkpoint to the fake-quant model."""
    model = _tiny_qwen3(dtype)
    oe.quantize_weights(model, scheme)
    oe.save_clean(model, tmp_path / "out", format=CT)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype).eval()
    ids = fixed_input_ids()
    expected, got = forward_logits(model, ids), forward_logits(loaded, ids)
    fq = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert fq["quant_method"] == CT and fq["quantization_status"] == "compressed"
    if (scheme, dtype) == ("fp8", torch.float32):  # the fake quantizer's own multiplication: bit for bit
        assert torch.equal(got, expected)
    elif dtype == torch.float32:  # q * scale where the fake quantizer divides: a float32 rounding per weight
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # bfloat16: transformers keeps int/fp8 scales in bfloat16, FP4 scale products round differently
        torch.testing.assert_close(got, expected, rtol=0.02, atol=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "nvfp4"])
def test_peak_memory_of_a_disk_offloaded_packed_export(tmp_path, scheme):
    """A disk-offloaded 333 MiB bf16 model packed module by module: peak extra RSS (VmHWM, file pages
    included) within 2 x the largest tensor + 64 MiB (+16 MiB interpreter churn, as in test_memory)."""
    result = measure(tmp_path, quantize={"scheme": scheme},
                     export={"format": "compressed-tensors", "max_shard_size": "100MB"})
    assert result["peak_extra"] <= 2 * result["largest"] + 80 * 2**20, result


# ---------------------------------------------------------------------------------------- bad input, faults


def _modelopt_model():
    mtq = pytest.importorskip("modelopt.torch.quantization")
    calib = fixed_input_ids()
    return mtq.quantize(make_model("qwen3_tied"), mtq.INT8_WEIGHT_ONLY_CFG,
                        lambda m: m(input_ids=calib, use_cache=False))


def _int4_on_64():
    model = make_model("qwen3_tied")
    oe.quantize_weights(model, "int4-g128")  # groups of 128 over in_features=64
    return model


def _ct_preset(preset: str):
    model = make_model("qwen3_tied")
    scheme = preset_name_to_scheme(preset, ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    return model


def _status(status: str):
    def make():
        from compressed_tensors.quantization import QuantizationStatus
        model = ct_model("w8a16_channel")
        model.model.layers[0].self_attn.k_proj.quantization_status = QuantizationStatus(status)
        return model
    return make


def _disabled():
    model = ct_model("w8a16_channel")
    model.model.layers[0].mlp.up_proj.quantization_enabled = False
    return model


BAD = {
    "modelopt": (_modelopt_model, {}, r"model\.\S+: quantized by modelopt.*\n.*format='modelopt'"),
    "no quantizers": (lambda: make_model("qwen3_tied"), {}, r"the model has no quantizers"),
    "int4 partial group": (_int4_on_64, {}, r"model\.layers\.0\..*groups of 128 do not divide in_features=64"),
    "mxfp4": (lambda: _ct_preset("MXFP4A16"), {}, r"model\.layers\.0\..*'mxfp4-pack-quantized' is not written"),
    "fold=False": (lambda: ct_model("w8a16_channel"), {"fold": False}, r"model\.layers\.0\..*disabled or not applied \(fold=False\)"),
    "disabled": (_disabled, {}, r"model\.layers\.0\.mlp\.up_proj: its weight quantizer"),
    "decompressed": (_status("decompressed"), {}, r"model\.layers\.0\.self_attn\.k_proj: .*'decompressed'"),
    "compressed": (_status("compressed"), {}, r"model\.layers\.0\.self_attn\.k_proj: already compressed"),
    "uncalibrated": (_status("initialized"), {}, r"model\.layers\.0\.self_attn\.k_proj: .*never calibrated"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_before_writing(tmp_path, case):
    make, kwargs, message = BAD[case]
    model = make()
    error = RuntimeError if case == "uncalibrated" else ValueError  # a bad state, not a bad argument
    with pytest.raises(error, match=r"format='compressed-tensors': " + message):
        oe.save_clean(model, tmp_path / "out", format=CT, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_exception_part_way_leaves_nothing(tmp_path, monkeypatch):
    """An error in compressed-tensors' compressor on the 5th module: its own type, no files, model as it was."""
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    original = compressor.compress.__func__
    calls = []

    def failing(cls, state_dict, scheme):
        calls.append(1)
        if len(calls) == 5:
            raise torch.OutOfMemoryError("boom")
        return original(cls, state_dict, scheme)

    monkeypatch.setattr(compressor, "compress", classmethod(failing))
    model = make_model("llama_untied")
    oe.quantize_weights(model, "int8")
    model = apply_layout(model, LayoutSpec("disk_offload"), tmp_path / "l")
    logits = forward_logits(model)
    with pytest.raises(torch.OutOfMemoryError, match="boom"):
        oe.save_clean(model, tmp_path / "out", format=CT)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["l"]
    assert torch.equal(forward_logits(model), logits)


@pytest.mark.parametrize("schemes,dtype", [(("int8", "int4-g128"), torch.float32), (("fp8", "nvfp4"), torch.bfloat16)])
def test_two_builtin_schemes_reload_in_transformers(tmp_path, schemes, dtype):
    """int8 attention + int4 MLP (fp8 + nvfp4): each config group targets its modules, transformers loads it."""
    model = _tiny_qwen3(dtype)
    attention = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".self_attn." in n]
    mlp = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".mlp." in n]
    oe.quantize_weights(model, schemes[0], modules=attention)
    oe.quantize_weights(model, schemes[1], modules=mlp)
    oe.save_clean(model, tmp_path / "out", format=CT)
    groups = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted(sorted(g["targets"]) for g in groups.values()) == sorted([sorted(attention), sorted(mlp)])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype).eval()
    ids = fixed_input_ids()
    tol = 1e-5 if dtype == torch.float32 else 0.02
    torch.testing.assert_close(forward_logits(loaded, ids), forward_logits(model, ids), rtol=tol, atol=tol)
    assert oe.verify(model, tmp_path / "out", format=CT).ok


@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4-g128", "nvfp4"])
def test_bfloat16_reload_bounds(tmp_path, scheme):
    """What a bf16 model's packed checkpoint gives back in transformers (the README's statement): decompressed at
    load (``CompressedTensorsConfig(run_compressed=False)``) every weight and logit is bit-exact; a plain
    ``from_pretrained`` keeps ``weight_scale`` in bfloat16 and computes with it, logits within 1 % of the
    largest logit (measured: 0.58 %, one bfloat16 step; nvfp4 exact)."""
    from transformers import CompressedTensorsConfig

    model = _tiny_qwen3(torch.bfloat16)
    oe.quantize_weights(model, scheme)
    oe.save_clean(model, tmp_path / "out", format=CT)
    ids = fixed_input_ids()
    expected = forward_logits(model, ids)
    decompressed = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
    for name, module in model.named_modules():
        if hasattr(module, "weight_quantizer"):
            with torch.no_grad():
                want = module.weight_quantizer(module.weight)
            assert torch.equal(decompressed.get_submodule(name).weight, want), name
    assert torch.equal(forward_logits(decompressed, ids), expected)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).eval()
    got = forward_logits(plain, ids)
    assert (got.float() - expected.float()).abs().max() <= 0.01 * expected.float().abs().max()
