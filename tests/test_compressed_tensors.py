"""The compressed-tensors adapter on real compressed-tensors schemes (apply_quantization_config), no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload, disk_offload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

import offload_export as oe
from offload_export.formats.fake_quant import QUANTIZER_STATE_NAME

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.lifecycle.forward import fake_quantize  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

W8_CHANNEL = {"weights": QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True)}
SCHEMES = {
    "w8a16_channel": W8_CHANNEL,
    "w4a16_g128": "W4A16",
    "w4a16_g128_asym": "W4A16_ASYM",
    "fp8_w8a8": "FP8",  # static per-tensor weight and input scales
    "fp8_dynamic": "FP8_DYNAMIC",  # per-channel weights, dynamic per-token inputs (no input qparams)
    "nvfp4": "NVFP4",  # tensor_group with a global scale
}
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CPU = torch.device("cpu")


def _config(arch: str):
    common = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=128, max_position_embeddings=32)
    if arch == "qwen3":
        return Qwen3Config(tie_word_embeddings=True, **common)
    return LlamaConfig(tie_word_embeddings=False, **common)


def _calibrate(module: torch.nn.Module) -> None:
    """Static qparams from the weight's own min/max, as a min-max observer would; then FROZEN."""
    scheme = module.quantization_scheme
    args, w = scheme.weights, module.weight.detach()
    if args.strategy == "tensor_group":
        gscale = generate_gparam(w.min(), w.max())
        module.weight_global_scale.data.copy_(gscale)
        module.input_global_scale.data.copy_(generate_gparam(torch.tensor(-4.0), torch.tensor(4.0)))
    if args.strategy in ("group", "tensor_group"):
        lo, hi = w.unflatten(-1, (-1, args.group_size)).amin(-1), w.unflatten(-1, (-1, args.group_size)).amax(-1)
    elif args.strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        lo, hi = w.min(), w.max()
    gscale = getattr(module, "weight_global_scale", None)
    scale, zp = calculate_qparams(lo, hi, args, global_scale=gscale)
    module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
    module.weight_zero_point.data.copy_(zp.reshape(module.weight_zero_point.shape))
    inp = scheme.input_activations
    if inp is not None and not inp.dynamic:
        scale, zp = calculate_qparams(torch.tensor(-4.0), torch.tensor(4.0), inp)
        module.input_scale.data.copy_(scale.reshape(module.input_scale.shape))
        module.input_zero_point.data.copy_(zp.reshape(module.input_zero_point.shape))
    module.quantization_status = QuantizationStatus.FROZEN


def make_quantized(scheme_name: str, arch: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A tiny model from config with a compressed-tensors scheme applied to every Linear but lm_head."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch)).eval()
    spec = SCHEMES[scheme_name]
    if isinstance(spec, str):
        scheme = preset_name_to_scheme(spec, ["Linear"])
    else:
        scheme = QuantizationScheme(targets=["Linear"], **spec)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            _calibrate(module)
    return model


def quantized_modules(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}


def library_fold(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' own fake quantization of ``weight`` with the module's weight qparams."""
    return fake_quantize(weight, module.weight_scale, getattr(module, "weight_zero_point", None),
                         module.quantization_scheme.weights,
                         global_scale=getattr(module, "weight_global_scale", None)).to(weight.dtype)


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(_ids()).logits


def _read_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    weights, state, meta = {}, {}, {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            if file.name == QUANTIZER_STATE_NAME:
                state = {k: f.get_tensor(k) for k in f.keys()}
                meta = json.loads(f.metadata()["quantizers"])
            else:
                weights.update({k: f.get_tensor(k) for k in f.keys()})
    return weights, state, meta


@pytest.mark.parametrize("scheme_name", sorted(SCHEMES))
def test_find_roles_and_state_keys(scheme_name):
    model = make_quantized(scheme_name)
    quantizers = [q for q in oe.find_quantizers(model) if q.adapter.name == "compressed-tensors"]
    modules = quantized_modules(model)
    expected = set()
    for name, m in modules.items():
        s = m.quantization_scheme
        expected |= {(name, r) for r, f in (("weight", s.weights), ("input", s.input_activations),
                                           ("output", s.output_activations)) if f is not None}
    assert {(q.owner_name, q.role) for q in quantizers} == expected
    for q in quantizers:
        assert q.owner is modules[q.owner_name] and q.enabled
        assert q.target == ("weight" if q.role == "weight" else None)
        params = {f"{q.owner_name}.{n}" for n, _ in q.owner.named_parameters(recurse=False)}
        assert set(q.state_keys) <= params and f"{q.owner_name}.weight" not in q.state_keys
        assert all(k.rpartition(".")[2].startswith(q.role) for k in q.state_keys)
    # every qparam of every quantized module is some quantizer's state, the weights are none's
    all_keys = {k for q in quantizers for k in q.state_keys}
    qparams = {f"{n}.{p}" for n, m in modules.items() for p, _ in m.named_parameters(recurse=False) if p != "weight"}
    assert all_keys == qparams
    assert oe.find_quantizers(model, "input") == [] or all(q.role == "input" for q in oe.find_quantizers(model, "input"))


@pytest.mark.parametrize("scheme_name", sorted(SCHEMES))
def test_fold_is_the_forwards_weight(scheme_name):
    model = make_quantized(scheme_name)
    for q in oe.find_quantizers(model, "weight"):
        w = q.owner.weight.detach()
        x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(2))
        folded = q.adapter.fold(q, w)
        assert folded.dtype == w.dtype and folded.shape == w.shape
        assert torch.equal(folded, library_fold(q.owner, w))
        assert not torch.equal(folded, w)
        assert q.adapter.fold_device(q) == CPU
        # the module's forward with only the weight role active == a plain linear with the folded weight
        with oe.quantizers_disabled(model, "input"), oe.quantizers_disabled(model, "output"):
            with torch.no_grad():
                assert torch.equal(q.owner(x), torch.nn.functional.linear(x, folded, q.owner.bias))


def test_quantizers_disabled_roles_and_restore():
    model = make_quantized("fp8_w8a8")
    reference = make_quantized("fp8_w8a8")
    with torch.no_grad():  # the unquantized twin: identical weights, no scheme
        plain = AutoModelForCausalLM.from_config(_config("llama")).eval()
        plain.load_state_dict({k: v for k, v in reference.state_dict().items() if k in plain.state_dict()})
    schemes = {n: m.quantization_scheme for n, m in quantized_modules(model).items()}
    quantized_logits = _logits(model)
    with oe.quantizers_disabled(model, "all") as qs:
        assert {q.role for q in qs} == {"weight", "input"} and not any(q.enabled for q in qs)
        assert torch.equal(_logits(model), _logits(plain))
    with oe.quantizers_disabled(model, "weight"):
        assert [q.enabled for q in oe.find_quantizers(model, "input")] == [True] * len(schemes)
        assert not any(q.enabled for q in oe.find_quantizers(model, "weight"))
        partial = _logits(model)
        with oe.quantizers_disabled(model, "input"):  # nests: both off inside
            assert torch.equal(_logits(model), _logits(plain))
        assert torch.equal(_logits(model), partial)
    assert not torch.equal(partial, quantized_logits)
    assert torch.equal(_logits(model), quantized_logits)
    # the very scheme objects come back (compressed-tensors shares one scheme object between modules)
    assert all(m.quantization_scheme is schemes[n] for n, m in quantized_modules(model).items())


def test_already_disabled_stays_disabled_and_error_restores():
    model = make_quantized("w8a16_channel")
    mod = model.model.layers[0].mlp.down_proj
    mod.quantization_enabled = False  # compressed-tensors' own switch (disable_quantization)
    q = next(q for q in oe.find_quantizers(model, "weight") if q.owner is mod)
    assert not q.enabled
    schemes = {n: m.quantization_scheme for n, m in quantized_modules(model).items()}
    with pytest.raises(KeyError):
        with oe.quantizers_disabled(model, "weight"):
            raise KeyError("boom")
    assert not q.enabled and mod.quantization_enabled is False
    assert all(m.quantization_scheme is schemes[n] for n, m in quantized_modules(model).items())
    assert all(q.enabled for q in oe.find_quantizers(model, "weight") if q.owner is not mod)


def _offload(model, how: str, tmp_path: Path):
    if how == "cpu_offload":
        return cpu_offload(model, execution_device=CPU)
    if how == "disk_offload":
        return disk_offload(model, str(tmp_path / "offload"), execution_device=CPU)
    return model


def _expected_weights(reference) -> dict[str, torch.Tensor]:
    """save_pretrained's names and values, with every enabled weight quantizer folded by the library."""
    modules = quantized_modules(reference)
    out = {}
    for key, value in reference.state_dict().items():
        owner, _, attr = key.rpartition(".")
        if owner in modules and attr != "weight":
            continue
        out[key] = library_fold(modules[owner], value) if owner in modules else value
    if reference.config.tie_word_embeddings:
        out.pop("lm_head.weight")
    return out


@SETTINGS
@given(scheme_name=st.sampled_from(sorted(SCHEMES)), arch=st.sampled_from(["llama", "qwen3"]),
       how=st.sampled_from(["resident", "cpu_offload", "disk_offload"]))
def test_save_clean_folds_bitwise(tmp_path_factory, scheme_name, arch, how):
    tmp = tmp_path_factory.mktemp("ct")
    reference = make_quantized(scheme_name, arch)
    model = _offload(make_quantized(scheme_name, arch), how, tmp)
    if how != "resident":
        assert {i.kind for k, i in oe.layout(model).items() if k.endswith("weight_scale")} <= {"cpu", "disk"}
    report = oe.save_clean(model, tmp / "out")
    weights, state, meta = _read_dir(tmp / "out")
    expected = _expected_weights(reference)
    assert sorted(weights) == sorted(expected)
    for key, value in expected.items():
        assert weights[key].dtype == value.dtype and torch.equal(weights[key], value), key
    assert not any(k.endswith(("_scale", "_zero_point")) for k in weights)
    # the quantizer state: every qparam, under `<owner>.<role>.<name>`, with its scheme and status
    for name, module in quantized_modules(reference).items():
        for attr, value in module.named_parameters(recurse=False):
            if attr == "weight":
                continue
            role, _, rest = attr.partition("_")
            assert torch.equal(state[f"{name}.{role}.{rest}"], value), (name, attr)
        config = meta[f"{name}.weight"]
        assert config["adapter"] == "compressed-tensors" and config["folded"] is True
        assert config["quantization_status"] == "frozen"
        assert config["scheme"] == json.loads(json.dumps(module.quantization_scheme.model_dump(mode="json")))
    assert len(report.folded) == len(quantized_modules(reference))
    assert torch.equal(_logits(model), _logits(reference))  # the model is untouched


def test_compressed_and_uncalibrated_modules_refuse_to_fold(tmp_path):
    model = make_quantized("w8a16_channel")
    mod = model.model.layers[0].self_attn.k_proj
    mod.quantization_status = QuantizationStatus.INITIALIZED
    with pytest.raises(RuntimeError, match="model.layers.0.self_attn.k_proj.*never calibrated"):
        oe.save_clean(model, tmp_path / "a")
    mod.quantization_status = QuantizationStatus.COMPRESSED
    with pytest.raises(RuntimeError, match="model.layers.0.self_attn.k_proj is compressed"):
        oe.save_clean(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # decompressed: the forward no longer fake-quantizes the weight, so it is written as it is
    mod.quantization_status = QuantizationStatus.DECOMPRESSED
    report = oe.save_clean(model, tmp_path / "c")
    assert "model.layers.0.self_attn.k_proj.weight" not in report.folded
    weights, _, meta = _read_dir(tmp_path / "c")
    assert torch.equal(weights["model.layers.0.self_attn.k_proj.weight"], mod.weight)
    assert meta["model.layers.0.self_attn.k_proj.weight"]["folded"] is False


def _ct_offload(model, where: str, tmp_path: Path):
    """compressed-tensors' own offloading: every module's tensor dicts become OffloadCaches."""
    from compressed_tensors.offload import offload_module
    tmp_path.mkdir(exist_ok=True)
    for module in model.modules():
        if module._parameters or module._buffers:
            offload_module(module, CPU, where, **({"offload_dir": str(tmp_path)} if where == "disk" else {}))
    return model


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_compressed_tensors_offload_layout_materialized_save_clean(tmp_path, where):
    from compressed_tensors.offload import OffloadCache, disable_offloading
    reference = make_quantized("fp8_w8a8", "qwen3")
    model = _ct_offload(make_quantized("fp8_w8a8", "qwen3"), where, tmp_path / "ct")
    assert isinstance(model.model.layers[0].mlp.up_proj._parameters, OffloadCache)
    lay = oe.layout(model)
    assert {i.kind for i in lay.values()} == {"cpu" if where == "cpu" else "mapping", "tied"}
    assert lay["lm_head.weight"].tied_to == "model.embed_tokens.weight"
    proj = model.model.layers[0].mlp.up_proj
    with oe.materialized(proj):
        assert torch.equal(proj.weight, reference.model.layers[0].mlp.up_proj.weight)
    with oe.materialized(proj, writeback=True):  # a dict of copies for the block, written back through the cache
        pass
    assert isinstance(proj._parameters, OffloadCache)
    oe.save_clean(model, tmp_path / "out")
    weights, state, _ = _read_dir(tmp_path / "out")
    expected = _expected_weights(reference)
    assert sorted(weights) == sorted(expected)
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
    assert torch.equal(state["model.layers.0.mlp.up_proj.input.scale"],
                       reference.model.layers[0].mlp.up_proj.input_scale)
    # compressed-tensors' forward re-reads `self.weight`: with disk offload it needs disable_offloading
    with disable_offloading():
        assert torch.equal(_logits(model), _logits(reference))
