"""save_clean() over real accelerate layouts: the output equals the resident reference, bit for bit."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import (MODEL_KINDS, LayoutSpec, apply_layout_with_artifacts, draw_offloaded, fixed_input_ids,
                     forward_logits, layout_specs, make_model)
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import offload_export as oe
from offload_export.formats.fake_quant import QUANTIZER_STATE_NAME

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
kinds_and_specs = st.sampled_from(MODEL_KINDS).flatmap(lambda k: st.tuples(st.just(k), layout_specs(k)))
shard_sizes = st.sampled_from([10**9, 40_000, 9_000])


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, checking the index against the files."""
    files = sorted(p.name for p in path.glob("*.safetensors") if p.name != QUANTIZER_STATE_NAME)
    tensors = {}
    for name in files:
        with safe_open(path / name, "pt") as f:
            for key in f.keys():
                assert key not in tensors, f"{key} written twice"
                tensors[key] = f.get_tensor(key)
    index = path / "model.safetensors.index.json"
    if len(files) > 1:
        data = json.loads(index.read_text())
        assert set(data["weight_map"]) == set(tensors)
        assert sorted(set(data["weight_map"].values())) == files
        assert data["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    else:
        assert files == ["model.safetensors"] and not index.exists()
    return tensors


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype and actual[key].shape == value.shape, key
        assert torch.equal(actual[key], value), key


def _state(model) -> tuple:
    lay = oe.layout(model)
    return ([(k, i.kind, str(i.device), id(i.tensor)) for k, i in lay.items()],
            [(q.name, q.enabled) for q in oe.find_quantizers(model)])


@SETTINGS
@given(kinds_and_specs, shard_sizes, st.sampled_from([torch.float32, torch.bfloat16]))
def test_export_equals_save_pretrained_of_the_resident_model(kind_spec, shard_size, dtype):
    kind, spec = kind_spec
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference, model = draw_offloaded(kind, spec, tmp / "layout", dtype=dtype)
        reference.save_pretrained(tmp / "expected")
        logits = forward_logits(model)  # accelerate replaces parameter objects on every forward: snapshot after
        before = _state(model)
        report = oe.save_clean(model, tmp / "out", max_shard_size=shard_size)
        assert_same_tensors(read_checkpoint(tmp / "out"), read_checkpoint(tmp / "expected"))
        assert report.shards == len(list((tmp / "out").glob("model*.safetensors")))
        assert _state(model) == before
        assert torch.equal(forward_logits(model), logits)
        config = json.loads((tmp / "out" / "config.json").read_text())
        assert "auto_map" not in config and config["architectures"] == [type(reference).__name__]
        assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []


def _int8(model, calib):
    mtq = pytest.importorskip("modelopt.torch.quantization")
    return mtq.quantize(model, mtq.INT8_WEIGHT_ONLY_CFG, lambda m: m(input_ids=calib, use_cache=False))


def _modelopt_reference(model, out: Path) -> dict[str, torch.Tensor]:
    from modelopt.torch.export.plugins.vllm_fakequant_hf import export_hf_vllm_fq_checkpoint

    export_hf_vllm_fq_checkpoint(copy.deepcopy(model), out)
    return read_checkpoint(out)


# from_pretrained reloads lose ModelOpt's quantizers (covered below by quantizing after the reload);
# accelerate's place_submodules init_hook cannot place ModelOpt's dynamic `_global_amax` attribute.
non_reloading_specs = st.sampled_from(MODEL_KINDS).flatmap(
    lambda k: st.tuples(st.just(k), layout_specs(k).filter(
        lambda s: s.method not in ("from_pretrained", "place_submodules"))))


@pytest.mark.slow
@SETTINGS
@given(non_reloading_specs, shard_sizes)
def test_modelopt_int8_export_matches_modelopt_resident_export_on_every_layout(kind_spec, shard_size):
    kind, spec = kind_spec
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        quantized = _int8(make_model(kind), fixed_input_ids(seed=7))
        expected = _modelopt_reference(quantized, tmp / "modelopt")
        fake_quant_logits = forward_logits(quantized)
        model, _ = apply_layout_with_artifacts(quantized, spec, tmp / "layout")
        forward_logits(model)
        before = _state(model)
        report = oe.save_clean(model, tmp / "out", max_shard_size=shard_size)
        written = read_checkpoint(tmp / "out")
        assert_same_tensors(written, expected)
        assert not [k for k in written if "quantizer" in k]
        assert report.folded and set(report.folded) <= set(oe.layout(model))
        assert _state(model) == before
        assert torch.equal(forward_logits(model), fake_quant_logits)
        with safe_open(tmp / "out" / QUANTIZER_STATE_NAME, "pt") as f:
            configs = json.loads(f.metadata()["quantizers"])
            assert any(k.endswith("weight_quantizer._amax") for k in f.keys())
        assert all(c["adapter"] == "modelopt" for c in configs.values())
        reloaded = AutoModelForCausalLM.from_pretrained(tmp / "out")
        close = torch.equal if kind != "qwen3_moe" else (lambda a, b: torch.allclose(a, b, atol=1e-5))
        assert close(forward_logits(reloaded), fake_quant_logits)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_modelopt_export_of_a_reloaded_disk_offloaded_model_reloads_offloaded(kind, tmp_path):
    """Quantize after from_pretrained(device_map) (ModelOpt's accelerate plugin), export, reload offloaded."""
    calib = fixed_input_ids(seed=7)
    resident = _int8(make_model(kind), calib)
    expected = _modelopt_reference(resident, tmp_path / "modelopt")
    place = {"model.embed_tokens": "disk", "lm_head": "disk", "model.norm": "resident"}
    place.update({f"model.layers.{i}": "disk" for i in range(2)})
    spec = LayoutSpec("from_pretrained", placement=tuple(place.items()))
    model, art = apply_layout_with_artifacts(make_model(kind), spec, tmp_path / "layout")
    _int8(model, calib)
    oe.save_clean(model, tmp_path / "out")
    assert_same_tensors(read_checkpoint(tmp_path / "out"), expected)
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map=device_map,
                                                    offload_folder=str(tmp_path / "reload-offload"))
    assert oe.layout(reloaded).summary().get("safetensors")  # really offloaded
    assert torch.allclose(forward_logits(reloaded), forward_logits(resident), atol=1e-5)


def _load_state(path: Path):
    return torch.load(path, weights_only=True, map_location="cpu")


def _assert_same_state(actual, expected, where="state"):
    assert type(actual) is type(expected), where
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert sorted(actual, key=str) == sorted(expected, key=str), where
        for k in expected:
            _assert_same_state(actual[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_same_state(a, e, f"{where}[{i}]")
    else:
        assert actual == expected, where


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("method", ["resident", "cpu_offload", "disk_offload"])
def test_vllm_fq_state_equals_modelopts_and_loads_weights_only(kind, method, tmp_path):
    quantized = _int8(make_model(kind), fixed_input_ids(seed=7))
    _modelopt_reference(quantized, tmp_path / "modelopt")
    model, _ = apply_layout_with_artifacts(quantized, LayoutSpec(method, offload_buffers=True), tmp_path / "layout")
    before = _state(model)
    report = oe.save_clean(model, tmp_path / "out", vllm_fq_state=True, verify=True)
    assert "vllm_fq_modelopt_state.pth" in report.files
    _assert_same_state(_load_state(tmp_path / "out" / "vllm_fq_modelopt_state.pth"),
                       _load_state(tmp_path / "modelopt" / "vllm_fq_modelopt_state.pth"))
    assert _state(model) == before  # quantizer states and (offloaded) buffers as they were


def test_vllm_fq_state_needs_modelopt(tmp_path):
    with pytest.raises(ValueError, match="ModelOpt"):
        oe.save_clean(make_model("llama_untied"), tmp_path / "out", vllm_fq_state=True)
    assert not (tmp_path / "out").exists()


def test_the_units_written_as_read_at_the_plans_end_are_written_second(tmp_path, monkeypatch):
    """An untied lm_head and the norms after the last quantized linear (written as read) come last in the plan:
    written second, their writes overlap the folds instead of following them; every planned tensor is written."""
    from transformers import Qwen3Config

    from offload_export.writer import ShardWriter

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    oe.quantize_weights(model, "int8")
    staged, stage = [], ShardWriter.stage

    def spy(self, items):
        if self.path.endswith("model.safetensors"):  # the weights, not the quantizer state
            staged.append([name for name, _ in items])
        return stage(self, items)

    monkeypatch.setattr(ShardWriter, "stage", spy)
    oe.save_clean(model, tmp_path / "out")
    assert staged[:5] == [["model.embed_tokens.weight"], ["model.layers.1.input_layernorm.weight"],
                          ["model.layers.1.post_attention_layernorm.weight"], ["model.norm.weight"], ["lm_head.weight"]]
    assert staged[-1] == ["model.layers.1.mlp.down_proj.weight"]
    assert sorted(n for names in staged for n in names) == sorted(read_checkpoint(tmp_path / "out"))
